//! Benchmark tables: printed, and written into one section of docs/BENCHMARKS.md
//! so that each benchmark group updates its own part of the file.

use std::path::Path;

/// A Markdown table.
#[derive(Debug, Default)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn to_markdown(&self) -> String {
        let mut s = format!("| {} |\n", self.header.join(" | "));
        s += &format!("|{}\n", "---|".repeat(self.header.len()));
        for r in &self.rows {
            s += &format!("| {} |\n", r.join(" | "));
        }
        s
    }
}

/// The median of `v` (NaN if empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `p`-quantile (0..=1) of `v` by nearest rank (NaN if empty).
pub fn quantile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// `median [min-max]` of per-round values, with `digits` decimals.
pub fn median_range(v: &[f64], digits: usize) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "{:.digits$} [{min:.digits$}-{max:.digits$}]",
        median(v.to_vec())
    )
}

/// Replaces (or appends) the section `name` of `file` with `body`. Sections are
/// delimited by `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`.
pub fn write_section(file: &Path, name: &str, body: &str) -> std::io::Result<()> {
    let start = format!("<!-- bench:{name} -->");
    let end = format!("<!-- /bench:{name} -->");
    let old = std::fs::read_to_string(file).unwrap_or_else(|_| {
        "# Benchmarks\n\nWritten by `target/release/bench` (see README). Each section is replaced by its own run.\n".to_string()
    });
    let block = format!("{start}\n{}\n{end}", body.trim_end());
    let new = match (old.find(&start), old.find(&end)) {
        (Some(a), Some(b)) if b > a => format!("{}{}{}", &old[..a], block, &old[b + end.len()..]),
        _ => format!("{}\n{}\n", old.trim_end(), block),
    };
    std::fs::write(file, new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
        assert_eq!(median_range(&[0.9, 1.1, 0.8], 2), "0.90 [0.80-1.10]");
    }

    #[test]
    fn section_is_replaced_not_duplicated() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("B.md");
        write_section(&f, "a", "one").unwrap();
        write_section(&f, "b", "two").unwrap();
        write_section(&f, "a", "three").unwrap();
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(text.contains("three") && text.contains("two") && !text.contains("one"));
        assert_eq!(text.matches("<!-- bench:a -->").count(), 1);
    }
}

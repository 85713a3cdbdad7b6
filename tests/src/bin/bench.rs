//! `bench [machine|witness|ftkv|pair|failover|reprotect|all] [--quick]`: runs benchmark groups against the
//! release binaries next to this executable, prints each group's table and
//! writes it into its own section of docs/BENCHMARKS.md.
//!
//! Build first: `cargo build --release --workspace && ./target/release/bench`.

use anyhow::{bail, Context};
use ftvm_tests::report;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// A benchmark group: its name (also its section in docs/BENCHMARKS.md), the
/// binaries it needs, and how to run it. To add one, add a row here.
struct Group {
    name: &'static str,
    needs: &'static [&'static str],
    run: fn(&Path, bool) -> anyhow::Result<String>,
}

const GROUPS: &[Group] = &[
    Group {
        name: "machine",
        needs: &["ftvm"],
        run: ftvm_tests::bench_machine::run,
    },
    Group {
        name: "witness",
        needs: &["ftvm-witness"],
        // No quick variant: it takes a few seconds.
        run: |bin_dir, _quick| ftvm_tests::bench_witness::run(bin_dir),
    },
    Group {
        name: "ftkv",
        needs: &["ftvm"],
        run: ftvm_tests::bench_ftkv::run,
    },
    Group {
        name: "pair",
        needs: &["ftvm", "ftvm-witness", "wan-relay"],
        run: ftvm_tests::bench_pair::run,
    },
    Group {
        name: "failover",
        needs: &["ftvm", "ftvm-witness", "wan-relay"],
        run: ftvm_tests::bench_drills::failover,
    },
    Group {
        name: "reprotect",
        needs: &["ftvm", "ftvm-witness", "wan-relay"],
        run: ftvm_tests::bench_drills::reprotect,
    },
];

const USAGE: &str = "usage: bench [machine|witness|ftkv|pair|failover|reprotect|all] [--quick]";

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return Ok(());
    }
    let (which, quick) = parse_args(&args)?;
    let groups: Vec<&Group> = GROUPS
        .iter()
        .filter(|g| which == "all" || g.name == which)
        .collect();

    let bin_dir = bin_dir()?;
    for g in &groups {
        for b in g.needs {
            if !bin_dir.join(b).exists() {
                bail!(
                    "{} is not built; run `cargo build --release --workspace` first",
                    bin_dir.join(b).display()
                );
            }
        }
    }

    let command = format!(
        "cargo build --release --workspace && ./target/release/bench {}",
        args.join(" ")
    );
    let file = ftvm_tests::repo_root().join("docs").join("BENCHMARKS.md");
    for g in groups {
        eprintln!("bench: running {}", g.name);
        let body =
            (g.run)(&bin_dir, quick).with_context(|| format!("benchmark group {}", g.name))?;
        let section = stamp(&body, &run_info(command.trim_end()));
        println!("{section}\n");
        report::write_section(&file, g.name, &section)
            .with_context(|| format!("writing {}", file.display()))?;
        eprintln!("bench: wrote section `{}` of {}", g.name, file.display());
    }
    Ok(())
}

fn parse_args(args: &[String]) -> anyhow::Result<(String, bool)> {
    let mut which = None;
    let mut quick = false;
    for a in args {
        match a.as_str() {
            "--quick" => quick = true,
            name if which.is_none() && (name == "all" || GROUPS.iter().any(|g| g.name == name)) => {
                which = Some(name.to_string())
            }
            other => bail!("unexpected argument {other:?}\n{USAGE}"),
        }
    }
    Ok((which.unwrap_or_else(|| "all".into()), quick))
}

/// The directory of this executable (`target/release`), where cargo puts the
/// workspace's binaries.
fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .context("executable has no directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Inserts `info` after the section's heading line (or at the top).
fn stamp(body: &str, info: &str) -> String {
    match body.split_once('\n') {
        Some((head, rest)) if head.starts_with('#') => {
            format!("{head}\n\n{info}\n\n{}", rest.trim_start_matches('\n'))
        }
        _ => format!("{info}\n\n{body}"),
    }
}

/// When, where and how this run was made.
fn run_info(command: &str) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| cpu_model(&s))
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let kvm = if Path::new("/sys/module/kvm_pvm").exists() {
        ", KVM: PVM (kvm_pvm)"
    } else {
        ""
    };
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!(
        "Run {} UTC on {} cores, {cpu}, Linux {kernel}{kvm}. Command: `{command}`.",
        utc_date_time(secs),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    )
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// `YYYY-MM-DD HH:MM` for seconds since the Unix epoch (UTC, proleptic Gregorian).
fn utc_date_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc_date_time(0), "1970-01-01 00:00");
        assert_eq!(utc_date_time(951_782_400 + 3_661), "2000-02-29 01:01");
        assert_eq!(utc_date_time(1_795_305_600), "2026-11-22 00:00");
    }

    #[test]
    fn args() {
        let a = |v: &[&str]| parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(a(&[]).unwrap(), ("all".into(), false));
        assert_eq!(
            a(&["machine", "--quick"]).unwrap(),
            ("machine".into(), true)
        );
        assert!(a(&["nope"]).is_err());
        assert!(a(&["machine", "witness"]).is_err());
    }

    #[test]
    fn stamp_goes_after_heading() {
        assert_eq!(stamp("## T\n\ntext", "INFO"), "## T\n\nINFO\n\ntext");
        assert_eq!(stamp("text", "INFO"), "INFO\n\ntext");
        assert_eq!(
            cpu_model("processor\t: 0\nmodel name\t: Xeon X\n").as_deref(),
            Some("Xeon X")
        );
    }
}

//! `ftvm disk create|hash|diff`.

use crate::merkle::to_hex;
use crate::{diff, DiskImage, StorageError, DEFAULT_CHUNK_SIZE};
use std::io::Write;
use std::path::PathBuf;

/// The `ftvm disk` subcommands. The `ftvm` binary embeds this as
/// `Disk { #[command(subcommand)] cmd: ftvm_storage::DiskCommand }` and calls
/// [`run_disk`].
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DiskCommand {
    /// Create a new zero-filled raw image (sparse; refuses to overwrite).
    Create {
        /// Image file to create.
        path: PathBuf,
        /// Size: bytes, or with a binary suffix K, M, G, T (e.g. 64M, 1G).
        #[arg(long)]
        size: String,
        /// Chunk size used for the root printed after creation.
        #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE, value_parser = parse_chunk_size_arg)]
        chunk_size: u64,
    },
    /// Print an image's Merkle root and chunk count.
    Hash {
        /// Image file (or block device).
        path: PathBuf,
        /// Chunk size in bytes (a power of two; suffixes K, M allowed).
        #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE, value_parser = parse_chunk_size_arg)]
        chunk_size: u64,
    },
    /// List the chunk ranges where two images differ (exit code 1 if they do).
    Diff {
        a: PathBuf,
        b: PathBuf,
        /// Chunk size in bytes (a power of two; suffixes K, M allowed).
        #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE, value_parser = parse_chunk_size_arg)]
        chunk_size: u64,
    },
}

/// What a disk command found, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskCommandOutcome {
    /// The command did its work (for `diff`: the images are identical).
    Success,
    /// `diff` found differences.
    Differs,
}

impl DiskCommandOutcome {
    /// The process exit code, like `cmp`: 0 on success or identical, 1 when
    /// the images differ. (An `Err` from [`run_disk`] should exit with 2.)
    pub fn exit_code(self) -> i32 {
        match self {
            DiskCommandOutcome::Success => 0,
            DiskCommandOutcome::Differs => 1,
        }
    }
}

/// Parses a size: plain bytes (`4096`) or a number with a binary suffix
/// `K`, `M`, `G`, `T` (also `KiB`, `MB`, ... : all mean powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, StorageError> {
    let bad = |reason: &str| StorageError::InvalidSize {
        text: text.to_string(),
        reason: reason.to_string(),
    };
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(digits_end);
    if digits.is_empty() {
        return Err(bad(
            "expected a number of bytes, optionally with K, M, G or T",
        ));
    }
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(bad("unknown suffix (use K, M, G or T)")),
    };
    let n: u64 = digits.parse().map_err(|_| bad("number too large"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| bad("number too large"))
}

fn parse_chunk_size_arg(text: &str) -> Result<u64, String> {
    let n = parse_size(text).map_err(|e| e.to_string())?;
    crate::check_chunk_size(n).map_err(|e| e.to_string())?;
    Ok(n)
}

/// Runs one disk command, printing its report to `out`.
///
/// Output (one `key: value` per line, stable for scripts):
/// - `create`: `created: PATH`, `size`, `chunk_size`, `chunks`, `root`.
/// - `hash`: `root: HEX`, `size`, `chunk_size`, `chunks`.
/// - `diff`: one line per differing range,
///   `chunks FIRST..END bytes START..END` (half-open), then a summary
///   `identical: root HEX` or `differs: N chunks (B bytes) in R ranges`;
///   a `size differs: A vs B` line comes first when the sizes differ.
pub fn run_disk(
    cmd: &DiskCommand,
    out: &mut dyn Write,
) -> Result<DiskCommandOutcome, StorageError> {
    match cmd {
        DiskCommand::Create {
            path,
            size,
            chunk_size,
        } => {
            let size = parse_size(size)?;
            let disk = DiskImage::create(path, size, *chunk_size)?;
            writeln!(out, "created: {}", path.display()).map_err(StorageError::Output)?;
            print_geometry(&disk, out)?;
            writeln!(out, "root: {}", to_hex(&disk.merkle_root())).map_err(StorageError::Output)?;
            Ok(DiskCommandOutcome::Success)
        }
        DiskCommand::Hash { path, chunk_size } => {
            let disk = DiskImage::open_read_only(path, *chunk_size)?;
            writeln!(out, "root: {}", to_hex(&disk.merkle_root())).map_err(StorageError::Output)?;
            print_geometry(&disk, out)?;
            Ok(DiskCommandOutcome::Success)
        }
        DiskCommand::Diff { a, b, chunk_size } => {
            let da = DiskImage::open_read_only(a, *chunk_size)?;
            let db = DiskImage::open_read_only(b, *chunk_size)?;
            let (ha, hb) = (da.chunk_hashes(), db.chunk_hashes());
            let w = |out: &mut dyn Write, line: String| {
                writeln!(out, "{line}").map_err(StorageError::Output)
            };
            if ha.size() != hb.size() {
                w(
                    out,
                    format!("size differs: {} vs {} bytes", ha.size(), hb.size()),
                )?;
            }
            let ranges = diff(&ha, &hb)?;
            // Byte ranges are taken against the larger disk.
            let wide = if ha.size() >= hb.size() { &ha } else { &hb };
            let mut chunks = 0;
            let mut bytes = 0;
            for r in &ranges {
                let br = wide.byte_range(r);
                chunks += r.end - r.start;
                bytes += br.end - br.start;
                w(
                    out,
                    format!(
                        "chunks {}..{} bytes {}..{}",
                        r.start, r.end, br.start, br.end
                    ),
                )?;
            }
            if ranges.is_empty() && ha.size() == hb.size() {
                w(
                    out,
                    format!("identical: root {}", to_hex(&da.merkle_root())),
                )?;
                Ok(DiskCommandOutcome::Success)
            } else {
                w(
                    out,
                    format!(
                        "differs: {chunks} chunks ({bytes} bytes) in {} ranges",
                        ranges.len()
                    ),
                )?;
                Ok(DiskCommandOutcome::Differs)
            }
        }
    }
}

fn print_geometry(disk: &DiskImage, out: &mut dyn Write) -> Result<(), StorageError> {
    writeln!(
        out,
        "size: {}\nchunk_size: {}\nchunks: {}",
        disk.size(),
        disk.chunk_size(),
        disk.chunk_count()
    )
    .map_err(StorageError::Output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: DiskCommand,
    }

    fn run(args: &[&str]) -> (Result<DiskCommandOutcome, StorageError>, String) {
        let cli = Cli::try_parse_from(std::iter::once("disk").chain(args.iter().copied()))
            .expect("arguments parse");
        let mut out = Vec::new();
        let r = run_disk(&cli.cmd, &mut out);
        (r, String::from_utf8(out).unwrap())
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("512k").unwrap(), 512 << 10);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        for bad in ["", "M", "12X", "-1", "99999999999999999999", "20000000T"] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn create_hash_diff() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        let b = dir.path().join("b.img");
        let (a_s, b_s) = (a.to_str().unwrap(), b.to_str().unwrap());
        let (r, text) = run(&["create", a_s, "--size", "1M"]);
        assert_eq!(r.unwrap(), DiskCommandOutcome::Success);
        assert!(text.contains("size: 1048576\n"), "{text}");
        run(&["create", b_s, "--size", "1M"]).0.unwrap();

        let (r, text) = run(&["hash", a_s]);
        assert_eq!(r.unwrap().exit_code(), 0);
        assert!(text.starts_with("root: "), "{text}");
        assert!(text.contains("chunks: 16\n"), "{text}");

        let (r, text) = run(&["diff", a_s, b_s]);
        assert_eq!(r.unwrap().exit_code(), 0);
        assert!(text.starts_with("identical: root "), "{text}");

        let mut disk = DiskImage::open(&b, DEFAULT_CHUNK_SIZE).unwrap();
        disk.write_at(65536 * 3 + 5, &[1u8; 65536]).unwrap();
        disk.flush().unwrap();
        drop(disk);
        let (r, text) = run(&["diff", a_s, b_s]);
        assert_eq!(r.unwrap().exit_code(), 1);
        assert_eq!(
            text,
            "chunks 3..5 bytes 196608..327680\ndiffers: 2 chunks (131072 bytes) in 1 ranges\n"
        );

        let (r, _) = run(&["diff", a_s, b_s, "--chunk-size", "4K"]);
        assert_eq!(r.unwrap(), DiskCommandOutcome::Differs);

        let (r, _) = run(&["hash", dir.path().join("nope").to_str().unwrap()]);
        assert!(r.unwrap_err().to_string().contains("nope: open"));
        assert!(Cli::try_parse_from(["disk", "hash", a_s, "--chunk-size", "1000"]).is_err());
    }
}

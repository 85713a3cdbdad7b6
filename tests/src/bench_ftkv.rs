//! ftkv benchmark: `redis-benchmark` SET/GET against ftkv in a recorded VM and
//! against a native `redis-server` in the same network namespace, in one run,
//! with and without pipelining. Also reports exits and log bytes per request.

use crate::report::Table;
use crate::site::{self, FtkvSite, Guard, GUEST_IP};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// One redis-benchmark test result.
#[derive(Debug, Clone)]
struct Result1 {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Parses redis-benchmark `--csv` output (one line per test, quoted fields:
/// test, rps, avg, min, p50, p95, p99, max).
fn parse_csv(text: &str) -> Vec<(String, Result1)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(|x| x.trim_matches('"')).collect();
            if f.len() < 7 {
                return None;
            }
            Some((
                f[0].to_string(),
                Result1 {
                    rps: f[1].parse().ok()?,
                    p50_ms: f[4].parse().ok()?,
                    p99_ms: f[6].parse().ok()?,
                },
            ))
        })
        .collect()
}

fn benchmark(
    ns: &site::NetNs,
    host: &str,
    port: &str,
    n: u32,
    pipeline: u32,
) -> Result<Vec<(String, Result1)>> {
    let out = ns
        .command("timeout")
        .args(["600", "redis-benchmark"])
        .args(["-h", host, "-p", port, "-t", "set,get", "-c", "50", "--csv"])
        .args(["-n", &n.to_string(), "-P", &pipeline.to_string()])
        .output()
        .context("running redis-benchmark")?;
    if !out.status.success() {
        bail!(
            "redis-benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let r = parse_csv(&String::from_utf8_lossy(&out.stdout));
    if r.len() < 2 {
        bail!(
            "unexpected redis-benchmark output: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(r)
}

/// Runs the group; returns the Markdown section.
pub fn run(bin_dir: &Path, quick: bool) -> Result<String> {
    let n: u32 = if quick { 20_000 } else { 100_000 };
    let dir = tempfile::tempdir()?;
    let ftvm = bin_dir.join("ftvm");
    let mut table = Table::new(&[
        "test",
        "pipeline",
        "native rps",
        "ftkv rps",
        "ftkv / native",
        "native p50/p99 ms",
        "ftkv p50/p99 ms",
        "exits / request",
        "log bytes / request",
    ]);
    for pipeline in [1u32, 16] {
        // A fresh VM, recorded, per pipeline depth: exits and log bytes are per run.
        let disk = dir.path().join(format!("ftkv-{pipeline}.img"));
        let st = Command::new(&ftvm)
            .args(["disk", "create"])
            .arg(&disk)
            .args(["--size", "256M"])
            .output()?;
        if !st.status.success() {
            bail!("ftvm disk create: {}", String::from_utf8_lossy(&st.stderr));
        }
        let sub = dir.path().join(format!("p{pipeline}"));
        std::fs::create_dir_all(&sub)?;
        let cfg = site::ftkv_config(&sub, &disk, site::FTKV_MEMORY_MIB)?;
        let mut s = FtkvSite::new("ftkv-bench", cfg.clone())?;
        let native = Guard::spawn(
            s.ns.command("redis-server")
                .args([
                    "--port",
                    "6380",
                    "--bind",
                    "10.0.2.1",
                    "--protected-mode",
                    "no",
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                ])
                .args(["--appendfsync", "always", "--dir"])
                .arg(&sub)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        std::thread::sleep(Duration::from_millis(300));
        let log = sub.join("ftkv.ftlog");
        let mut cmd = s.ns.command(&ftvm);
        cmd.args(["record", "--log"])
            .arg(&log)
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        s.vm = Some(Guard::spawn(&mut cmd)?);
        site::wait_for_ping(&s.ns, Duration::from_secs(30))?;
        let nat = benchmark(&s.ns, "10.0.2.1", "6380", n, pipeline)?;
        let vm = benchmark(&s.ns, GUEST_IP, "6379", n, pipeline)?;
        let out = s.stop()?;
        drop(native);
        let exits: f64 = out
            .lines()
            .find_map(|l| l.strip_prefix("record: exits="))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|x| x.parse().ok())
            .context("no record line")?;
        let log_bytes = std::fs::metadata(&log)?.len() as f64;
        let requests = f64::from(2 * n);
        for ((name, a), (_, b)) in nat.iter().zip(vm.iter()) {
            table.row(vec![
                name.clone(),
                pipeline.to_string(),
                format!("{:.0}", a.rps),
                format!("{:.0}", b.rps),
                format!("{:.2}", b.rps / a.rps),
                format!("{:.2} / {:.2}", a.p50_ms, a.p99_ms),
                format!("{:.2} / {:.2}", b.p50_ms, b.p99_ms),
                format!("{:.3}", exits / requests),
                format!("{:.0}", log_bytes / requests),
            ]);
        }
    }
    let md = table.to_markdown();
    println!("{md}");
    Ok(format!(
        "## ftkv in the VM vs native redis-server\n\n\
         `redis-benchmark -t set,get -c 50 -n {n} [-P 16] --csv`, from a client in the same \
         network namespace, against ftkv in a VM under `ftvm record` (a primary's work: every input \
         logged) and, in the same run, a native `redis-server --appendonly yes --appendfsync always` \
         (acknowledges writes after fsync, like ftkv, which acknowledges after a virtio-blk FLUSH). \
         Exits and log bytes per request are over the whole recorded run (boot included) divided by \
         the {} requests of both tests.\n\n{md}",
        2 * n
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_lines_parse() {
        let text = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\"SET\",\"1234.5\",\"1.0\",\"0.1\",\"0.9\",\"2.0\",\"3.5\",\"9\"\n";
        let r = parse_csv(text);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, "SET");
        assert_eq!(r[0].1.p99_ms, 3.5);
    }
}

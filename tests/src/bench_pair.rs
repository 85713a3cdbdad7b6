//! Pair benchmark: ftkv replicated by a pair in the three-site lab vs the
//! same primary running solo, side by side in one lab at each one-way WAN
//! delay (0, 5, 20 and 50 ms through the relay): `redis-benchmark`
//! throughput and latency, log bandwidth idle and per request, the
//! backup's replay lag under load, CPU time per request on each site, and
//! the log bytes of an AOF replay at boot with `disk_reads = ship` vs
//! `backup-reads`.

use crate::bench_ftkv::{parse_csv, BenchResult};
use crate::lab::{Lab, Site};
use crate::report::{quantile, Table};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const FAILURE_TIMEOUT_MS: u64 = 2000;
/// Disk size of the long run's pair.
const SOAK_DISK: &str = "2G";

/// Clock ticks per second of /proc/PID/stat (USER_HZ on Linux).
const TICKS_PER_S: f64 = 100.0;

/// CPU time (user + system) in a `/proc/.../stat` file, ms.
fn stat_cpu_ms(path: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(path)?;
    let rest = stat.rsplit(')').next().context("odd /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15.
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks * 1e3 / TICKS_PER_S)
}

/// CPU time (user + system) of process `pid`, ms.
fn cpu_ms(pid: i32) -> Result<f64> {
    stat_cpu_ms(&format!("/proc/{pid}/stat"))
}

/// CPU time of process `pid` per thread name (`vcpu0`, `ftvm-net`,
/// `output-gate`, `tap-*`...), ms: where a site's time goes. Threads that
/// ended are missing, which only undercounts short-lived ones.
fn thread_cpu_ms(pid: i32) -> Result<BTreeMap<String, f64>> {
    let mut by_name = BTreeMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = t?.path();
        let (Ok(name), Ok(ms)) = (
            std::fs::read_to_string(dir.join("comm")),
            stat_cpu_ms(&dir.join("stat").to_string_lossy()),
        ) else {
            continue;
        };
        *by_name.entry(name.trim().to_string()).or_insert(0.0) += ms;
    }
    Ok(by_name)
}

/// `after - before` per thread name, per request.
fn per_request(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    requests: f64,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), (v - before.get(k).unwrap_or(&0.0)) / requests))
        .collect()
}

fn node_pid(lab: &mut Lab, site: Site) -> Result<i32> {
    Ok(lab.node(site).context("node not running")?.pid())
}

/// Frames the primary's output gate held and their total hold time (ms).
fn holds(lab: &Lab) -> Result<(f64, f64)> {
    let h = &lab.status(Site::A)?["held_outputs"];
    let waited = h["waited"].as_f64().unwrap_or(0.0);
    Ok((waited, waited * h["mean_hold_ms"].as_f64().unwrap_or(0.0)))
}

fn log_bytes(lab: &Lab) -> Result<f64> {
    lab.status(Site::A)?["log"]["bytes"]
        .as_f64()
        .context("no log.bytes in the primary's status")
}

/// `redis-benchmark -t set,get -c 50 -n N -P P --csv` from the client LAN.
fn benchmark(lab: &Lab, n: u64, pipeline: u32) -> Result<Vec<(String, BenchResult)>> {
    let out = lab
        .command("c", "timeout")
        .args([
            "600",
            "redis-benchmark",
            "--csv",
            "-h",
            crate::site::GUEST_IP,
        ])
        .args(["-t", "set,get", "-c", "50", "-n", &n.to_string()])
        .args(["-P", &pipeline.to_string()])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let r = parse_csv(&text);
    if !out.status.success() || r.len() < 2 {
        bail!(
            "redis-benchmark: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(r)
}

/// One load on the pair or the solo primary: per test (SET/GET × -P 1/16),
/// the result; and CPU ms per request of A and (paired) B, log bytes per
/// request, and the backup's replay lag samples.
struct Load {
    results: Vec<(String, BenchResult)>,
    cpu_a_per_req: f64,
    cpu_b_per_req: Option<f64>,
    /// Per thread name: CPU ms per request of A, and of B (paired).
    threads_a: BTreeMap<String, f64>,
    threads_b: BTreeMap<String, f64>,
    log_bytes_per_req: f64,
    lag_ms: Vec<f64>,
    /// Mean time a reply waited in the output gate for its ack, ms.
    mean_hold_ms: f64,
}

fn load(lab: &mut Lab, n: u64, paired: bool) -> Result<Load> {
    let pid_a = node_pid(lab, Site::A)?;
    let pid_b = if paired {
        Some(node_pid(lab, Site::B)?)
    } else {
        None
    };
    let (a0, b0, l0) = (
        cpu_ms(pid_a)?,
        pid_b.map(cpu_ms).transpose()?,
        log_bytes(lab)?,
    );
    let (ta0, tb0) = (thread_cpu_ms(pid_a)?, pid_b.map(thread_cpu_ms).transpose()?);
    let h0 = holds(lab)?;
    // The backup's replay lag, sampled from its status during the load.
    let lags = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = paired.then(|| {
        let (lags, stop) = (lags.clone(), stop.clone());
        let status = lab.status_command(Site::B);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(l) = status()
                    .ok()
                    .and_then(|v: Value| v["replay"]["lag_ms"].as_f64())
                {
                    lags.lock().unwrap_or_else(|p| p.into_inner()).push(l);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    });
    let mut results = benchmark(lab, n, 1)?;
    results.extend(benchmark(lab, n, 16)?);
    stop.store(true, Ordering::Relaxed);
    if let Some(s) = sampler {
        let _ = s.join();
    }
    let requests = 4.0 * n as f64;
    let h1 = holds(lab)?;
    let lag_ms = lags.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(Load {
        results,
        cpu_a_per_req: (cpu_ms(pid_a)? - a0) / requests,
        cpu_b_per_req: match (pid_b, b0) {
            (Some(p), Some(b0)) => Some((cpu_ms(p)? - b0) / requests),
            _ => None,
        },
        threads_a: per_request(&ta0, &thread_cpu_ms(pid_a)?, requests),
        threads_b: match (pid_b, tb0) {
            (Some(p), Some(b0)) => per_request(&b0, &thread_cpu_ms(p)?, requests),
            _ => BTreeMap::new(),
        },
        log_bytes_per_req: (log_bytes(lab)? - l0) / requests,
        lag_ms,
        mean_hold_ms: (h1.1 - h0.1) / (h1.0 - h0.0).max(1.0),
    })
}

/// Log bytes from power-on until ftkv answers, booting a disk whose AOF
/// holds the keys the load wrote, with `disk_reads` = `mode` on both sites.
fn boot_log_bytes(lab: &mut Lab, mode: &str) -> Result<f64> {
    lab.reset_from(Site::A)?;
    for s in [Site::A, Site::B] {
        lab.set_ft(s, "disk_reads", &format!("\"{mode}\""))?;
    }
    lab.start_pair()?;
    log_bytes(lab)
}

/// The long run: a pair at 0 ms with [`SOAK_DISK`] disks under
/// `redis-benchmark` load (SET, GET, INCR, MSET over 100k keys, 20
/// clients, rounds back to back) for
/// `duration`, the backup's replay lag sampled throughout; then a clean
/// stop. Fails unless the backup reported no divergence, checked digests
/// and outputs all along, and both disks end byte-identical.
fn soak(duration: Duration) -> Result<Vec<String>> {
    let mut lab = Lab::up(0)?;
    lab.set_failure_timeout(FAILURE_TIMEOUT_MS)?;
    // ftkv's log is append-only (no compaction): 10 minutes of writes need
    // more than the lab's 64 MiB.
    for s in [Site::A, Site::B] {
        crate::reprotect::fresh_disk(&lab.dir.join(format!("node-{}.img", s.letter())), SOAK_DISK)?;
    }
    lab.start_pair()?;
    let status_b = lab.status_command(Site::B);
    let t0 = Instant::now();
    let (mut requests, mut rounds, mut lags) = (0u64, 0u64, Vec::new());
    while t0.elapsed() < duration {
        let n = 20_000u64;
        let out = lab
            .command("c", "timeout")
            .args(["600", "redis-benchmark", "-q", "-h", crate::site::GUEST_IP])
            .args(["-t", "set,get,incr,mset", "-r", "100000", "-c", "20"])
            .args(["-n", &n.to_string()])
            .output()?;
        if !out.status.success() {
            bail!(
                "redis-benchmark failed in round {rounds}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        requests += 4 * n;
        rounds += 1;
        let b: Value = status_b()?;
        if !b["divergence"].is_null() {
            bail!(
                "the backup diverged after {rounds} rounds: {}",
                b["divergence"]
            );
        }
        if let Some(l) = b["replay"]["lag_ms"].as_f64() {
            lags.push(l);
        }
    }
    let elapsed = t0.elapsed();
    let b = lab.wait_status(Site::B, "replay to catch up with the primary", |v| {
        v["replay"]["replayed_index"] == v["replay"]["received_index"]
    })?;
    if !b["divergence"].is_null() {
        bail!("the backup diverged: {}", b["divergence"]);
    }
    let digests = b["replay"]["digests_checked"].as_u64().unwrap_or(0);
    let outputs = b["replay"]["outputs_checked"].as_u64().unwrap_or(0);
    if digests == 0 || outputs == 0 {
        bail!("the backup checked {digests} digests and {outputs} outputs: nothing was compared");
    }
    let root = lab.stop_pair_cleanly(Site::A)?;
    Ok(vec![
        format!("{:.0} s", elapsed.as_secs_f64()),
        requests.to_string(),
        digests.to_string(),
        outputs.to_string(),
        "none".into(),
        format!("{:.0} / {:.0}", quantile(&lags, 0.5), quantile(&lags, 0.99)),
        format!("yes ({})", root.trim().chars().take(22).collect::<String>()),
    ])
}

pub fn run(_bin_dir: &Path, quick: bool) -> Result<String> {
    let delays: &[u64] = if quick { &[0, 20] } else { &[0, 5, 20, 50] };
    let n: u64 = if quick { 2000 } else { 20000 };
    let idle = Duration::from_secs(if quick { 3 } else { 10 });
    let soak_for = Duration::from_secs(if quick { 60 } else { 600 });
    let mut throughput = Table::new(&[
        "one-way delay",
        "site RTT (ms)",
        "SET -P1 pair/solo",
        "GET -P1 pair/solo",
        "SET -P16 pair/solo",
        "GET -P16 pair/solo",
        "SET -P1 p50 / p99 pair (solo) ms",
        "added p50 in RTTs",
        "mean reply hold (ms)",
        "log idle (kbit/s)",
        "log bytes / request",
        "replay lag p50 / p99 (ms)",
        "CPU ms/request: primary paired / solo / backup",
    ]);
    let mut threads = Table::new(&[
        "one-way delay",
        "thread",
        "primary paired",
        "primary solo",
        "backup",
    ]);
    // The long run first: a failure there shows before the shorter loads.
    let mut long = Table::new(&[
        "duration",
        "requests",
        "digests checked",
        "outputs checked",
        "divergence",
        "replay lag p50 / p99 (ms)",
        "disks byte-identical after a clean stop",
    ]);
    long.row(soak(soak_for)?);
    let mut boot = None;
    for &delay in delays {
        let mut lab = Lab::up(delay)?;
        lab.set_failure_timeout(FAILURE_TIMEOUT_MS)?;
        lab.start_pair()?;
        let rtt = lab.status(Site::A)?["peer"]["rtt_ms"]
            .as_f64()
            .unwrap_or(f64::NAN);
        let i0 = log_bytes(&lab)?;
        let t0 = Instant::now();
        std::thread::sleep(idle);
        let idle_kbit = (log_bytes(&lab)? - i0) * 8.0 / t0.elapsed().as_secs_f64() / 1e3;
        let pair = load(&mut lab, n, true)?;
        lab.stop_node(Site::B, libc::SIGKILL)?;
        lab.wait_status(Site::A, "the primary to go solo", |v| v["role"] == "solo")?;
        let solo = load(&mut lab, n, false)?;
        let ratio = |k: usize| {
            format!(
                "{:.2} ({:.0} / {:.0})",
                pair.results[k].1.rps / solo.results[k].1.rps,
                pair.results[k].1.rps,
                solo.results[k].1.rps
            )
        };
        let (p, s) = (&pair.results[0].1, &solo.results[0].1);
        throughput.row(vec![
            format!("{delay} ms"),
            format!("{rtt:.1}"),
            ratio(0),
            ratio(1),
            ratio(2),
            ratio(3),
            format!(
                "{:.2} / {:.2} ({:.2} / {:.2})",
                p.p50_ms, p.p99_ms, s.p50_ms, s.p99_ms
            ),
            if delay == 0 {
                "-".into()
            } else {
                format!("{:.2}", (p.p50_ms - s.p50_ms) / rtt)
            },
            format!("{:.2}", pair.mean_hold_ms),
            format!("{idle_kbit:.1}"),
            format!("{:.0}", pair.log_bytes_per_req),
            format!(
                "{:.0} / {:.0}",
                quantile(&pair.lag_ms, 0.5),
                quantile(&pair.lag_ms, 0.99)
            ),
            format!(
                "{:.3} / {:.3} / {:.3}",
                pair.cpu_a_per_req,
                solo.cpu_a_per_req,
                pair.cpu_b_per_req.unwrap_or(f64::NAN)
            ),
        ]);
        let names: std::collections::BTreeSet<&String> = pair
            .threads_a
            .keys()
            .chain(solo.threads_a.keys())
            .chain(pair.threads_b.keys())
            .collect();
        for name in names {
            let cell =
                |m: &BTreeMap<String, f64>| m.get(name).map_or("-".into(), |v| format!("{v:.4}"));
            let (pa, so, b) = (
                cell(&pair.threads_a),
                cell(&solo.threads_a),
                cell(&pair.threads_b),
            );
            // Threads that did (next to) nothing in every run say nothing.
            let idle = |c: &str| c == "-" || c.parse::<f64>().is_ok_and(|v| v < 0.0005);
            if !(idle(&pa) && idle(&so) && idle(&b)) {
                threads.row(vec![format!("{delay} ms"), name.clone(), pa, so, b]);
            }
        }
        if delay == 0 {
            lab.stop_node(Site::A, libc::SIGTERM)?;
            let ship = boot_log_bytes(&mut lab, "ship")?;
            let reads = boot_log_bytes(&mut lab, "backup-reads")?;
            boot = Some((ship, reads));
        }
    }
    let boot = match boot {
        Some((ship, reads)) => format!(
            "Log bytes from power-on until ftkv answers, its AOF replayed from a disk \
             holding every key the 0 ms load wrote (goal: `backup-reads` 90 % below \
             `ship`): `ship` {:.1} kB, `backup-reads` {:.1} kB ({:+.1} %). With \
             `backup-reads` a disk read is logged as its status and a blake3 of the \
             data, so the AOF's bytes never cross the WAN.",
            ship / 1e3,
            reads / 1e3,
            (reads / ship - 1.0) * 100.0
        ),
        None => String::new(),
    };
    Ok(format!(
        "## Pair vs solo primary\n\n\
         ftkv in a pair in the lab (`scripts/lab.sh`, guest memory 1 GiB, \
         `disk_reads = ship`), against the same primary solo after its backup \
         was killed, in one lab per delay. `redis-benchmark -t set,get -c 50 \
         -n {n} -P 1|16` from the client LAN. Goals: throughput pair/solo ≥ \
         0.95 at 0 ms; added p50 ≤ 1.1 RTT + 0.5 ms; idle log < 50 kbit/s; \
         replay lag p99 ≤ 100 ms at 0 ms. Both sites, the witness, the relay \
         and the 50 clients share this machine's two cores, so throughput \
         understates two real sites; CPU ms per request is what each site \
         pays.\n\n{}\n\
         How to read the ratios: `redis-benchmark` keeps 50 requests (or 50 \
         pipelines) outstanding and sends the next when a reply arrives, so \
         its throughput is 50 / latency. The output rule holds every reply \
         until the backup acks the log it depends on (the mean reply hold \
         column: one site round trip plus the backup's receive and ack), so \
         pair/solo is about solo latency / (solo latency + hold) whatever the \
         sites' CPUs. At 0 ms the hold is the relay's and both sites' \
         scheduling on the shared cores; ≥ 0.95 at -P 1 would need a hold \
         under 5 % of ftkv's own sub-millisecond reply time, which no round \
         trip between two sites gives. VMware FT's 0.94-0.99 are \
         throughput-bound workloads (many outstanding requests per client).\n\n\
         Where each site's CPU goes: CPU ms per request of each thread (by \
         name: `vcpu0` runs the guest, reads the TAP and records or replays; \
         `ftvm-net` is the QUIC runtime, which also applies the backup's acks \
         and writes the replies they release to the TAP), over the same \
         loads.\n\n{}\n\
         The long run: a pair at 0 ms on 2 GiB disks under `redis-benchmark -t \
         set,get,incr,mset -r 100000 -c 20` rounds back to back, then a clean \
         stop of the primary (the backup stops at the same exit). The bench \
         fails if the backup reports a divergence (a state digest or an \
         output digest that differs), checks nothing, or the disks differ.\n\n{}\n{boot}",
        throughput.to_markdown(),
        threads.to_markdown(),
        long.to_markdown()
    ))
}

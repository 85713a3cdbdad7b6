//! Machine benchmark: the real `ftvm` binary running the demo guest, as a user
//! runs it (`ftvm run|record|replay --config ...`), one process per
//! measurement.
//!
//! - **exits/s**: `workload=exits` (nothing but platform NOPs);
//! - **cost of recording**: `record` wall time / `run` wall time, and
//! - **replay speed**: `replay` wall time / `record` wall time, both on
//!   `workload=busy` (compute, heap churn, entropy and NOP exits, no waits:
//!   a live `WAIT` sleeps until its deadline while a replayed one returns at
//!   once, so a wait-heavy workload would flatter replay; `mixed`, which
//!   waits, is measured too for comparison);
//! - **log bytes per exit**: log file size / exits of each recording;
//! - **guest compute vs native**: the `kernels` crate run by the guest at
//!   CPL3 (`workload=kernel`, timed with the platform clock) and by this
//!   process natively, same code and inputs, checksums compared.
//!
//! Modes are interleaved round by round (run, record, replay of that record;
//! every other round record first), so the ratios compare runs made side by
//! side; each ratio is the median of the per-round ratios.

use crate::report::{median, Table};
use anyhow::{anyhow, bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The guest image, relative to the directory holding `ftvm`
/// (`<target>/release` -> `<target>/guest/...`), as appliance/build.rs puts it.
const GUEST_IMAGE: &str = "../guest/x86_64-unknown-linux-gnu/release/demo";
const MEMORY_MIB: u64 = 64;

/// Goals from the issue.
const GOAL_RECORD_OVER_RUN: f64 = 1.05;
const GOAL_REPLAY_OVER_RECORD: f64 = 1.0;
const GOAL_NATIVE_OVER_GUEST: f64 = 0.95;

/// How much work each measurement does.
struct Plan {
    rounds: usize,
    /// `iterations` of `workload=exits` (20,000 NOPs each).
    exits_iterations: u64,
    busy_iterations: u64,
    mixed_iterations: u64,
    /// Guest processes for the kernel comparison, and timed runs in each.
    kernel_processes: usize,
    kernel_runs: u64,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                rounds: 1,
                exits_iterations: 1,
                busy_iterations: 1,
                mixed_iterations: 1,
                kernel_processes: 1,
                kernel_runs: 2,
            }
        } else {
            Plan {
                rounds: 7,
                exits_iterations: 2,
                busy_iterations: 3,
                mixed_iterations: 1,
                kernel_processes: 5,
                kernel_runs: 3,
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Run,
    Record,
    Replay,
    /// `record` with periodic state digests off (`digest_interval` above
    /// the run's exits): what the log itself costs.
    RecordNoDigests,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Run => "run",
            Mode::Record => "record",
            Mode::Replay => "replay",
            Mode::RecordNoDigests => "record, no periodic digests",
        }
    }
}

/// One finished `ftvm` process.
struct ProcRun {
    wall: Duration,
    /// User + system CPU time (guest execution counts as user time).
    cpu: Duration,
    max_rss_kib: u64,
    stdout: String,
}

/// Runs `ftvm <args>` with stdout and stderr in files under `dir`, waits with
/// `wait4` (for the peak RSS) and fails unless it exited 0.
fn run_ftvm(ftvm: &Path, args: &[&str], dir: &Path, tag: &str) -> anyhow::Result<ProcRun> {
    let out_path = dir.join(format!("{tag}.stdout"));
    let err_path = dir.join(format!("{tag}.stderr"));
    let start = Instant::now();
    let child = Command::new(ftvm)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("starting {}", ftvm.display()))?;
    let pid = libc::pid_t::try_from(child.id())?;
    let (status, rusage) = wait4(pid)?;
    let wall = start.elapsed();
    // The child is reaped; dropping `child` does not wait again.
    drop(child);
    let stdout = std::fs::read_to_string(&out_path)?;
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if !ok {
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        bail!(
            "ftvm {} failed (wait status {status:#x})\nstdout:\n{stdout}\nstderr:\n{stderr}",
            args.join(" ")
        );
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    Ok(ProcRun {
        wall,
        cpu: tv(rusage.ru_utime) + tv(rusage.ru_stime),
        max_rss_kib: u64::try_from(rusage.ru_maxrss).unwrap_or(0),
        stdout,
    })
}

fn wait4(pid: libc::pid_t) -> anyhow::Result<(i32, libc::rusage)> {
    let mut status = 0;
    // SAFETY: rusage is plain old data; all zeroes is a valid value.
    let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `pid` is our own unreaped child; both pointers are live locals.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut rusage) };
        if r == pid {
            return Ok((status, rusage));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(anyhow!("wait4({pid}): {err}"));
        }
    }
}

/// `exits=<n>` from ftvm's `record: exits=...` / `replay: OK exits=...` line.
pub fn parse_exits(stdout: &str) -> Option<u64> {
    stdout
        .lines()
        .filter(|l| l.starts_with("record:") || l.starts_with("replay: OK"))
        .flat_map(|l| l.split_whitespace())
        .find_map(|w| w.strip_prefix("exits="))
        .and_then(|n| n.parse().ok())
}

/// `digest=<hex>` from the same lines.
pub fn parse_digest(stdout: &str) -> Option<&str> {
    stdout
        .lines()
        .filter(|l| l.starts_with("record:") || l.starts_with("replay: OK"))
        .flat_map(|l| l.split_whitespace())
        .find_map(|w| w.strip_prefix("digest="))
}

/// `(kernel_ns, checksum)` of every `kernel: run=<i> kernel_ns=<n> checksum=<hex>` line.
pub fn parse_kernel_runs(console: &str) -> Vec<(u64, u64)> {
    console
        .lines()
        .filter(|l| l.starts_with("kernel: run="))
        .filter_map(|l| {
            let mut ns = None;
            let mut sum = None;
            for w in l.split_whitespace() {
                if let Some(v) = w.strip_prefix("kernel_ns=") {
                    ns = v.parse().ok();
                } else if let Some(v) = w.strip_prefix("checksum=") {
                    sum = u64::from_str_radix(v, 16).ok();
                }
            }
            Some((ns?, sum?))
        })
        .collect()
}

/// Sums of `(nops, us)` over the guest's `exits: <n> NOPs in <us> us` lines.
pub fn parse_guest_exit_timing(console: &str) -> Option<(u64, u64)> {
    let mut total = (0, 0);
    let mut seen = false;
    for l in console.lines() {
        let Some(rest) = l.strip_prefix("exits: ") else {
            continue;
        };
        let w: Vec<&str> = rest.split_whitespace().collect();
        if let [n, "NOPs", "in", us, "us"] = w[..] {
            total.0 += n.parse::<u64>().ok()?;
            total.1 += us.parse::<u64>().ok()?;
            seen = true;
        }
    }
    seen.then_some(total)
}

fn median_u64(v: Vec<u64>) -> f64 {
    median(v.into_iter().map(|x| x as f64).collect())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

struct Bench {
    ftvm: PathBuf,
    image: PathBuf,
    dir: PathBuf,
}

/// Per workload: the samples of each mode, in round order.
#[derive(Default)]
struct Samples {
    run: Vec<ProcRun>,
    record: Vec<ProcRun>,
    replay: Vec<ProcRun>,
    record_no_digests: Vec<ProcRun>,
    exits: Vec<u64>,
    log_bytes: Vec<u64>,
    /// Guest-timed NOPs of the `run` processes: (nops, us).
    guest_exit_timing: Vec<(u64, u64)>,
}

impl Samples {
    fn of(&self, mode: Mode) -> &[ProcRun] {
        match mode {
            Mode::Run => &self.run,
            Mode::Record => &self.record,
            Mode::Replay => &self.replay,
            Mode::RecordNoDigests => &self.record_no_digests,
        }
    }

    fn median_wall_s(&self, mode: Mode) -> f64 {
        median(self.of(mode).iter().map(|p| p.wall.as_secs_f64()).collect())
    }

    /// Median over rounds of `a`'s wall time / `b`'s wall time.
    fn ratio(&self, a: Mode, b: Mode) -> f64 {
        median(
            self.of(a)
                .iter()
                .zip(self.of(b))
                .map(|(x, y)| x.wall.as_secs_f64() / y.wall.as_secs_f64())
                .collect(),
        )
    }
}

impl Bench {
    /// Writes the config `<name>.toml` for `workload`, with `extra` appended;
    /// the console goes to `<name>.console`.
    fn config(
        &self,
        name: &str,
        workload: &str,
        iterations: u64,
        extra: &str,
    ) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!("{name}.toml"));
        let console = self.dir.join(format!("{name}.console"));
        std::fs::write(
            &path,
            format!(
                "[machine]\nimage = {:?}\nmemory_mib = {MEMORY_MIB}\ncmdline = \"workload={workload} iterations={iterations}\"\n\n[console]\noutput = {:?}\n{extra}",
                self.image.display().to_string(),
                console.display().to_string(),
            ),
        )?;
        Ok(path)
    }

    /// One `ftvm` process. The console file appends, so it is removed first:
    /// afterwards it holds this run's output only.
    fn once(&self, mode: Mode, cfg: &Path, log: &Path, tag: &str) -> anyhow::Result<ProcRun> {
        match std::fs::remove_file(cfg.with_extension("console")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let cfg = cfg.to_str().ok_or_else(|| anyhow!("non-UTF-8 temp path"))?;
        let log = log.to_str().ok_or_else(|| anyhow!("non-UTF-8 temp path"))?;
        let args: Vec<&str> = match mode {
            Mode::Run => vec!["run", "--config", cfg],
            Mode::Record | Mode::RecordNoDigests => vec!["record", "--config", cfg, "--log", log],
            Mode::Replay => vec!["replay", "--config", cfg, "--log", log],
        };
        run_ftvm(&self.ftvm, &args, &self.dir, tag)
    }

    /// `rounds` rounds of run, record and replay of `workload` (and, if
    /// `no_digests`, a record with periodic digests off), after one untimed
    /// warm-up round.
    fn workload(
        &self,
        workload: &str,
        iterations: u64,
        rounds: usize,
        no_digests: bool,
    ) -> anyhow::Result<Samples> {
        let cfg = self.config(workload, workload, iterations, "")?;
        let light_name = format!("{workload}-no-digests");
        let light_cfg = self.config(
            &light_name,
            workload,
            iterations,
            "\n[replay]\ndigest_interval = 1000000000\n",
        )?;
        let console = self.dir.join(format!("{workload}.console"));
        let mut s = Samples::default();
        for round in 0..=rounds {
            let warmup = round == 0;
            let log = self.dir.join(format!("{workload}-{round}.ftlog"));
            let order = if round % 2 == 0 {
                [Mode::Run, Mode::Record, Mode::Replay]
            } else {
                [Mode::Record, Mode::Run, Mode::Replay]
            };
            let mut record_digest = String::new();
            if no_digests {
                let log = self.dir.join(format!("{light_name}.ftlog"));
                let tag = format!("{light_name}-{round}");
                let p = self.once(Mode::RecordNoDigests, &light_cfg, &log, &tag)?;
                std::fs::remove_file(&log)?;
                if !warmup {
                    s.record_no_digests.push(p);
                }
            }
            for mode in order {
                let tag = format!("{workload}-{round}-{}", mode.name());
                let p = self
                    .once(mode, &cfg, &log, &tag)
                    .with_context(|| format!("{workload}: {}", mode.name()))?;
                match mode {
                    Mode::Run => {
                        if let Some(t) =
                            parse_guest_exit_timing(&std::fs::read_to_string(&console)?)
                        {
                            if !warmup {
                                s.guest_exit_timing.push(t);
                            }
                        }
                    }
                    Mode::Record => {
                        let exits = parse_exits(&p.stdout)
                            .ok_or_else(|| anyhow!("no `record: exits=` in {:?}", p.stdout))?;
                        record_digest = parse_digest(&p.stdout).unwrap_or("").to_string();
                        if !warmup {
                            s.exits.push(exits);
                            s.log_bytes.push(std::fs::metadata(&log)?.len());
                        }
                    }
                    Mode::Replay => {
                        if parse_digest(&p.stdout) != Some(record_digest.as_str()) {
                            bail!(
                                "{workload}: replay did not end OK with the recorded digest {record_digest}: {}",
                                p.stdout.trim()
                            );
                        }
                        std::fs::remove_file(&log)?;
                    }
                    Mode::RecordNoDigests => unreachable!("not in `order`"),
                }
                if !warmup {
                    match mode {
                        Mode::Run => s.run.push(p),
                        Mode::Record => s.record.push(p),
                        Mode::RecordNoDigests => s.record_no_digests.push(p),
                        Mode::Replay => s.replay.push(p),
                    }
                }
            }
        }
        Ok(s)
    }

    /// Guest and native kernel timings (ns), interleaved: one guest process,
    /// then the same number of native runs, and so on.
    fn kernel(&self, plan: &Plan) -> anyhow::Result<KernelResult> {
        let cfg = self.config("kernel", "kernel", plan.kernel_runs, "")?;
        let console = self.dir.join("kernel.console");
        let mut scratch = vec![0u8; kernels::SCRATCH_LEN];
        let expected = kernels::run(&mut scratch);
        let mut guest = Vec::new();
        let mut native = Vec::new();
        for round in 0..plan.kernel_processes {
            let p = self.once(Mode::Run, &cfg, Path::new("-"), &format!("kernel-{round}"))?;
            let runs = parse_kernel_runs(&std::fs::read_to_string(&console)?);
            if runs.len() as u64 != plan.kernel_runs {
                bail!(
                    "kernel: expected {} `kernel: run=` lines on the console, got {} (stdout: {})",
                    plan.kernel_runs,
                    runs.len(),
                    p.stdout
                );
            }
            for (ns, checksum) in runs {
                if checksum != expected {
                    bail!("kernel: guest checksum {checksum:016x} != native {expected:016x}");
                }
                guest.push(ns);
            }
            for _ in 0..plan.kernel_runs {
                let t = Instant::now();
                let checksum = kernels::run(std::hint::black_box(&mut scratch));
                native.push(t.elapsed().as_nanos() as u64);
                if checksum != expected {
                    bail!("kernel: native checksum changed between runs");
                }
            }
        }
        Ok(KernelResult {
            guest_ns: median_u64(guest),
            native_ns: median_u64(native),
            samples: plan.kernel_processes as u64 * plan.kernel_runs,
            checksum: expected,
        })
    }
}

struct KernelResult {
    guest_ns: f64,
    native_ns: f64,
    samples: u64,
    checksum: u64,
}

/// Runs the machine benchmark with the `ftvm` binary in `bin_dir` and returns
/// its Markdown section (without the date/machine line, which the caller adds).
pub fn run(bin_dir: &Path, quick: bool) -> anyhow::Result<String> {
    let ftvm = bin_dir.join("ftvm");
    let image = bin_dir.join(GUEST_IMAGE);
    for p in [&ftvm, &image] {
        if !p.exists() {
            bail!(
                "{} is not built; run `cargo build --release --workspace` first",
                p.display()
            );
        }
    }
    let image = image.canonicalize()?;
    let tmp = tempfile::tempdir()?;
    let b = Bench {
        ftvm,
        image,
        dir: tmp.path().to_path_buf(),
    };
    let plan = Plan::new(quick);

    let workloads = [
        ("exits", plan.exits_iterations, false),
        ("busy", plan.busy_iterations, true),
        ("mixed", plan.mixed_iterations, false),
    ];
    let mut results = Vec::new();
    for (w, it, no_digests) in workloads {
        eprintln!(
            "bench machine: {w} (iterations={it}), {} rounds",
            plan.rounds
        );
        results.push((w, it, b.workload(w, it, plan.rounds, no_digests)?));
    }
    eprintln!(
        "bench machine: kernel, {} guest processes x {} runs",
        plan.kernel_processes, plan.kernel_runs
    );
    let k = b.kernel(&plan)?;

    let mut t = Table::new(&[
        "workload",
        "mode",
        "wall, median (ms)",
        "CPU, median (ms)",
        "exits",
        "exits/s",
        "log bytes/exit",
        "peak RSS (MiB)",
    ]);
    for (w, it, s) in &results {
        let exits = median_u64(s.exits.clone());
        for mode in [Mode::Run, Mode::Record, Mode::Replay, Mode::RecordNoDigests] {
            if s.of(mode).is_empty() {
                continue;
            }
            let wall = s.median_wall_s(mode);
            let rss = median_u64(s.of(mode).iter().map(|p| p.max_rss_kib).collect()) / 1024.0;
            let log = if mode == Mode::Record {
                format!(
                    "{:.1}",
                    median(
                        s.log_bytes
                            .iter()
                            .zip(&s.exits)
                            .map(|(b, e)| *b as f64 / *e as f64)
                            .collect()
                    )
                )
            } else {
                String::new()
            };
            t.row(vec![
                format!("`{w}` ×{it}"),
                mode.name().to_string(),
                format!("{:.0}", wall * 1e3),
                format!(
                    "{:.0}",
                    median(s.of(mode).iter().map(|p| p.cpu.as_secs_f64()).collect()) * 1e3
                ),
                format!("{exits:.0}"),
                format!("{:.0}", exits / wall),
                log,
                format!("{rss:.1}"),
            ]);
        }
    }

    let get = |name: &str| {
        results
            .iter()
            .find(|(w, _, _)| *w == name)
            .map(|(_, _, s)| s)
            .expect("measured above")
    };
    let busy = get("busy");
    let exits = get("exits");
    let mixed = get("mixed");
    let rec_run = busy.ratio(Mode::Record, Mode::Run);
    let rep_rec = busy.ratio(Mode::Replay, Mode::Record);
    let native_guest = k.native_ns / k.guest_ns;

    let mut g = Table::new(&["measure", "value", "goal", "result"]);
    g.row(vec![
        "cost of recording: record / run wall time, `busy`".into(),
        format!("{rec_run:.3}"),
        format!("< {GOAL_RECORD_OVER_RUN}"),
        verdict(rec_run < GOAL_RECORD_OVER_RUN).into(),
    ]);
    g.row(vec![
        "record with periodic digests off / run, `busy`".into(),
        format!("{:.3}", busy.ratio(Mode::RecordNoDigests, Mode::Run)),
        "(information: the log without state digests)".into(),
        String::new(),
    ]);
    g.row(vec![
        "replay speed: replay / record wall time, `busy`".into(),
        format!("{rep_rec:.3}"),
        format!("≤ {GOAL_REPLAY_OVER_RECORD:.1}"),
        verdict(rep_rec <= GOAL_REPLAY_OVER_RECORD).into(),
    ]);
    g.row(vec![
        "guest compute vs native: native / guest kernel time".into(),
        format!("{native_guest:.3}"),
        format!("≥ {GOAL_NATIVE_OVER_GUEST}"),
        verdict(native_guest >= GOAL_NATIVE_OVER_GUEST).into(),
    ]);
    for (label, s) in [("`exits`", exits), ("`mixed` (waits)", mixed)] {
        g.row(vec![
            format!("record / run, {label}"),
            format!("{:.3}", s.ratio(Mode::Record, Mode::Run)),
            "(information)".into(),
            String::new(),
        ]);
        g.row(vec![
            format!("replay / record, {label}"),
            format!("{:.3}", s.ratio(Mode::Replay, Mode::Record)),
            "(information)".into(),
            String::new(),
        ]);
    }

    let (nops, us) = exits
        .guest_exit_timing
        .iter()
        .fold((0, 0), |a, t| (a.0 + t.0, a.1 + t.1));
    let guest_rate = if us > 0 {
        format!(
            "{:.0} exits/s ({:.1} µs per exit)",
            nops as f64 * 1e6 / us as f64,
            us as f64 / nops as f64
        )
    } else {
        "not reported".into()
    };

    Ok(format!(
        "## Machine: exits, recording, replay, guest compute\n\n\
         The release `ftvm` binary running the demo guest ({MEMORY_MIB} MiB, default \
         `[replay]` digest settings), one process per measurement, wall time from spawn \
         to exit (so machine setup is included). {rounds} round(s) after one warm-up \
         round; each round runs `ftvm run`, `ftvm record` and `ftvm replay` of that \
         recording (record first in odd rounds); walls are medians, ratios are medians \
         of the per-round ratios; every replay ended `OK` with the recorded digest. \
         CPU is the process's user + system time (guest execution counts as user \
         time); peak RSS is its `ru_maxrss`.\n\n\
         Workloads (`guest/demo`): `exits` = 20,000 platform NOPs per iteration; \
         `busy` = entropy, 2,000 NOP exits, the `compute` and `heap` workloads per \
         iteration, **no waits** — used for the goals because a live `WAIT` sleeps \
         until its deadline while a replayed one returns at once, which would make \
         replay look faster than it is; `mixed` (200 short waits per iteration) is \
         shown for comparison. `record, no periodic digests` is `busy` recorded with \
         `[replay] digest_interval = 1000000000` (no state digest during the run; the \
         final one is still taken), run in the same rounds, to separate the cost of the \
         log from the cost of the digests.\n\n{}\n\
         In-guest exit rate (`exits`, `ftvm run`, timed by the guest with the platform \
         clock, no process setup): {guest_rate}.\n\n\
         Guest compute: `guest/kernels` (FNV-1a over 4 MiB, sieve below 4 Mi, \
         Mandelbrot 320×240×512 in f64, 400k Newton square roots in f32), run by the \
         guest at CPL3 (`workload=kernel`, after one untimed warm-up run, each run timed \
         with the platform clock between two NOPs) and natively by the bench process \
         (release build, same inputs, checksum {:016x} on both), interleaved: median \
         of {} runs each: guest {:.1} ms, native {:.1} ms.\n\n{}",
        t.to_markdown(),
        k.checksum,
        k.samples,
        k.guest_ns / 1e6,
        k.native_ns / 1e6,
        g.to_markdown(),
        rounds = plan.rounds,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ftvm_and_guest_lines() {
        let out = "disk: root=ab\nrecord: exits=20017 digest=00ff\n";
        assert_eq!(parse_exits(out), Some(20017));
        assert_eq!(parse_digest(out), Some("00ff"));
        assert_eq!(parse_exits("replay: OK exits=5 digest=1"), Some(5));
        assert_eq!(parse_exits("replay: DIVERGED at exit 3: x"), None);

        let console = "demo: x\nkernel: run=0 kernel_ns=1200 checksum=00000000000000ff\n\
                       kernel: run=1 kernel_ns=1100 checksum=00000000000000ff\nresult=1\n";
        assert_eq!(parse_kernel_runs(console), vec![(1200, 255), (1100, 255)]);

        let console = "exits: 600 NOPs in 18000 us\nbusy: x\nexits: 800 NOPs in 24000 us\n";
        assert_eq!(parse_guest_exit_timing(console), Some((1400, 42000)));
        assert_eq!(parse_guest_exit_timing("result=1"), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}

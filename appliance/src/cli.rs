//! The `ftvm` command line.

use crate::devices::console::Console;
use crate::machine::{Machine, MachineError, RunSummary};
use crate::replay::digest::hex;
use crate::replay::live::{LiveWorld, Waker};
use crate::replay::log::{DiskReads, LogReader, LogWriter};
use crate::replay::recorder::{DigestSchedule, Recorder};
use crate::replay::replayer::Replayer;
use crate::vstate::vcpu::VcpuControl;
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ftvm_config::appliance::{ApplianceConfig, ConsoleOutput};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Debug, Parser)]
#[command(name = "ftvm", version, about = "Fault-tolerant VM appliance")]
pub struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a machine. With an `[ft]` section in the config, run this
    /// node of a fault-tolerant pair: as its backup by default, or as its
    /// first primary with `--primary`.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Start as the pair's first primary: claim the first epoch from the
        /// witness, then run the guest and wait for the backup. Without it a
        /// node with `[ft]` starts as the backup of its configured peer.
        #[arg(long)]
        primary: bool,
        /// With --primary, after the WHOLE pair was lost (both nodes down,
        /// both fenced on restart): start the service again from this node's
        /// disk, claiming the epoch after the witness's current one. Only
        /// when the other node is known not to be live; see docs/runbook.md.
        #[arg(long, requires = "primary")]
        cold_start: bool,
        /// Return as the backup of the live node through re-protection:
        /// copy the live node's disk and memory while it keeps serving,
        /// then follow its log. For a node that ran before (a fenced old
        /// primary, a restarted backup); with `[ft] reprotect = "auto"` the
        /// node asks by itself. See docs/runbook.md.
        #[arg(long, conflicts_with = "primary")]
        join: bool,
    },
    /// Hand the live role to the protected backup, planned (maintenance).
    ///
    /// Asks the LIVE node: it stops its vCPU at an exit boundary, lets the
    /// backup replay the last entry, and the backup goes live in the next
    /// epoch with the guest's connections intact; this node then follows
    /// as the new backup. Refused unless the pair is protected.
    Switchover {
        #[arg(long)]
        config: PathBuf,
    },
    /// Make a running BACKUP go live WITHOUT the witness. DANGEROUS.
    ///
    /// For an operator who has verified that the other site is down (its
    /// ftvm process is not running, or its host is off) while the witness
    /// cannot answer. If the other site is in fact still live, both sites
    /// serve clients at once and their data diverge: writes acknowledged on
    /// one are missing on the other, and nothing can merge them afterwards.
    /// Normally the witness decides, and no answer from it means no go-live.
    GoLive {
        #[arg(long)]
        config: PathBuf,
        /// Required: confirms that the other site was verified down.
        #[arg(long)]
        force: bool,
    },
    /// Rehearse a failure against a running pair and report what clients saw.
    ///
    /// Needs a targets file (`scripts/lab.sh up` writes `lab-out/drill.toml`
    /// for the lab). Each iteration starts from a healthy pair (a fresh one
    /// when needed), drives real Redis clients, injects the fault, and
    /// writes `<scenario>-<n>.json`, `<scenario>-<n>.svg` and `summary.md`
    /// into `--out`. Exit code 0 when every iteration passed.
    Drill {
        #[arg(long)]
        targets: PathBuf,
        #[arg(long, value_enum)]
        scenario: crate::drill::Scenario,
        #[arg(long, default_value_t = 1)]
        repeat: u32,
        /// Seed of the random fault moments and client operations.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Client connections of the write load.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Seconds of load after the fault was handled, before the checks.
        #[arg(long, default_value_t = 8)]
        settle: u64,
        #[arg(long, default_value = "drill-out")]
        out: PathBuf,
    },
    /// Print the status of a running node (its admin endpoint, `ft.admin`).
    Status {
        #[arg(long)]
        config: PathBuf,
        /// Print the raw JSON of `/status`.
        #[arg(long)]
        json: bool,
    },
    /// Run one machine and record its execution log to a file.
    Record {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        log: PathBuf,
        /// How disk reads are logged: `ship` (the data) or `backup-reads`
        /// (a hash; replay reads its own disk copy and checks it).
        #[arg(long, default_value = "ship", value_parser = parse_disk_reads)]
        disk_reads: DiskReads,
    },
    /// Replay a recorded log and check the guest follows it exactly.
    Replay {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        log: PathBuf,
        /// Where the replayed guest's console goes (stdout, log, none, or a file).
        #[arg(long, default_value = "none")]
        console: String,
        /// Replay against this disk image instead of the config's (it must
        /// hold the same bytes the recording started from).
        #[arg(long)]
        disk: Option<PathBuf>,
    },
    /// Development PKI: a cluster CA and node certificates (for tests and labs).
    Certs {
        #[command(subcommand)]
        cmd: ftvm_transport::pki::CertsCommand,
    },
    /// Virtual disk images: create, hash (Merkle root), diff.
    Disk {
        #[command(subcommand)]
        cmd: ftvm_storage::DiskCommand,
    },
    /// Print a log's header and entries, one per line (for operators and debugging).
    LogDump {
        #[arg(long)]
        log: PathBuf,
        /// Print only the last N entries.
        #[arg(long)]
        tail: Option<usize>,
    },
    /// The local demo: record the demo guest, then replay it.
    Demo {
        #[arg(long, default_value = "examples/demo.toml")]
        config: PathBuf,
        /// Directory for the demo's log file.
        #[arg(long, default_value = "demo-out")]
        dir: PathBuf,
    },
}

fn init_tracing(json: bool) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: a log file gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Entry point of the `ftvm` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_json);
    match dispatch(cli.command) {
        Ok(code) => code,
        // The reader of our output went away (`ftvm ... | head`): not an error.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ftvm: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn dispatch(cmd: Command) -> Result<ExitCode> {
    match cmd {
        Command::Run {
            config,
            primary,
            cold_start,
            join,
        } => run(&config, primary, cold_start, join),
        Command::GoLive { config, force } => go_live(&config, force),
        Command::Switchover { config } => switchover(&config),
        Command::Drill {
            targets,
            scenario,
            repeat,
            seed,
            clients,
            settle,
            out,
        } => {
            let t = crate::drill::Targets::load(&targets)?;
            let all = crate::drill::run(
                &t,
                &crate::drill::DrillOptions {
                    scenario,
                    repeat,
                    seed,
                    clients,
                    out: out.clone(),
                    settle: std::time::Duration::from_secs(settle),
                },
            )?;
            print!("{}", std::fs::read_to_string(out.join("summary.md"))?);
            Ok(if all.iter().all(|i| i.passed) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Command::Status { config, json } => status(&config, json),
        Command::Record {
            config,
            log,
            disk_reads,
        } => {
            let cfg = ApplianceConfig::load(&config)?;
            record(&cfg, &log, disk_reads)
        }
        Command::Replay {
            config,
            log,
            console,
            disk,
        } => {
            let mut cfg = ApplianceConfig::load(&config)?;
            cfg.console.output = console_arg(&console);
            if let Some(path) = disk {
                match cfg.disk.as_mut() {
                    Some(d) => d.path = path,
                    None => anyhow::bail!(
                        "--disk given, but {} has no [disk] section",
                        config.display()
                    ),
                }
            }
            Ok(replay(&cfg, &log))
        }
        Command::Demo { config, dir } => demo(&config, &dir),
        Command::LogDump { log, tail } => log_dump(&log, tail),
        Command::Certs { cmd } => {
            ftvm_transport::pki::run_certs(&cmd)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Disk { cmd } => {
            let outcome = ftvm_storage::run_disk(&cmd, &mut std::io::stdout().lock())
                .map_err(anyhow::Error::from);
            match outcome {
                Ok(o) => Ok(ExitCode::from(o.exit_code() as u8)),
                Err(e) if is_broken_pipe(&e) => Ok(ExitCode::SUCCESS),
                Err(e) => {
                    eprintln!("ftvm: error: {e:#}");
                    Ok(ExitCode::from(2))
                }
            }
        }
    }
}

fn parse_disk_reads(s: &str) -> Result<DiskReads, String> {
    match s {
        "ship" => Ok(DiskReads::Ship),
        "backup-reads" => Ok(DiskReads::BackupReads),
        other => Err(format!("{other:?} is not `ship` or `backup-reads`")),
    }
}

fn console_arg(s: &str) -> ConsoleOutput {
    match s {
        "stdout" => ConsoleOutput::Stdout,
        "log" => ConsoleOutput::Log,
        "none" => ConsoleOutput::None,
        path => ConsoleOutput::File(PathBuf::from(path)),
    }
}

fn open_console(cfg: &ApplianceConfig) -> Result<Console> {
    Console::open(&cfg.console.output).with_context(|| {
        format!(
            "{}: key `console.output`: cannot open {:?}",
            cfg.source.display(),
            cfg.console.output
        )
    })
}

fn outcome_exit_code(summary: &RunSummary) -> ExitCode {
    use crate::replay::env::Outcome;
    match summary.outcome {
        Outcome::PowerOff { code } => ExitCode::from(code.clamp(0, 255) as u8),
        Outcome::Stopped => ExitCode::SUCCESS,
        _ => ExitCode::from(3),
    }
}

fn report_outcome(summary: &RunSummary) {
    if summary.outcome.is_clean() {
        tracing::info!(exits = summary.exits, "machine {}", summary.outcome);
    } else {
        eprintln!("ftvm: {} (after exit {})", summary.outcome, summary.exits);
    }
}

/// The live world for `cfg`: host clock and entropy, and the TAP if the guest has a network card.
fn live_world(cfg: &ApplianceConfig) -> Result<LiveWorld> {
    let mut live = LiveWorld::new()?;
    if let Some(net) = &cfg.net {
        live.attach_tap(&net.tap)
            .with_context(|| format!("{}: key `net.tap`", cfg.source.display()))?;
    }
    Ok(live)
}

/// A controller whose vCPU stops cleanly (at an exit boundary, with an end
/// marker in the log) on SIGINT or SIGTERM.
fn stop_on_signals(waker: Waker) -> Result<Arc<VcpuControl>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let control = Arc::new(VcpuControl::new());
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing SIGINT/SIGTERM handlers")?;
    let c = control.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                tracing::warn!(signal = sig, "stopping the machine at its next exit");
                c.stop();
                waker.stop();
                c.kick_until_finished(std::time::Duration::from_millis(20));
            }
        })
        .context("starting the signal thread")?;
    Ok(control)
}

fn report_disk(machine: &Machine) {
    if let Some(root) = machine.disk_root() {
        println!("disk: root={}", hex(&root));
    }
}

fn run(config: &Path, primary: bool, cold_start: bool, join: bool) -> Result<ExitCode> {
    let cfg = ApplianceConfig::load(config)?;
    if cfg.ft.is_some() {
        return run_node(&cfg, primary, cold_start, join);
    }
    if primary || join {
        anyhow::bail!(
            "--{} given, but {} has no [ft] section (a single machine has no pair)",
            if primary { "primary" } else { "join" },
            config.display()
        );
    }
    let mut machine = Machine::new(&cfg, open_console(&cfg)?)?;
    let mut env = live_world(&cfg)?;
    let control = stop_on_signals(env.waker())?;
    let summary = machine.run(&mut env, &control)?;
    report_outcome(&summary);
    Ok(outcome_exit_code(&summary))
}

/// Runs this node of a pair.
fn run_node(
    cfg: &ApplianceConfig,
    primary: bool,
    cold_start: bool,
    join: bool,
) -> Result<ExitCode> {
    use crate::ft::node::{self, NodeOutcome, StartAs};
    let start = if primary {
        StartAs::Primary { cold_start }
    } else {
        StartAs::Backup { join }
    };
    match node::run(cfg, start, open_console(cfg)?)? {
        NodeOutcome::Finished {
            role,
            summary,
            disk_root,
        } => {
            report_outcome(&summary);
            // The backup's last line matches `ftvm replay`'s, the primary's
            // `ftvm record`'s: same exits and digest when the pair agreed.
            let what = if role == crate::ft::role::Role::Backup {
                "replay: OK"
            } else {
                "record:"
            };
            if let Some(root) = disk_root {
                println!("disk: root={}", hex(&root));
            }
            println!(
                "{what} exits={} digest={}",
                summary.exits,
                hex(&summary.digest)
            );
            Ok(outcome_exit_code(&summary))
        }
        NodeOutcome::Stopped => Ok(ExitCode::SUCCESS),
        NodeOutcome::Fenced(reason) => {
            println!("fenced: {reason}");
            Ok(ExitCode::from(4))
        }
    }
}

/// Asks a running backup to go live without the witness.
fn go_live(config: &Path, force: bool) -> Result<ExitCode> {
    let cfg = ApplianceConfig::load(config)?;
    let ft = cfg
        .ft
        .as_ref()
        .with_context(|| format!("{} has no [ft] section", config.display()))?;
    if !force {
        anyhow::bail!(
            "refusing without --force: going live without the witness is safe only when the other site is verified down (see `ftvm go-live --help` and docs/runbook.md)"
        );
    }
    let answer = crate::admin::request(ft.admin, "POST", "/go-live?force=yes")?;
    print!("{answer}");
    Ok(ExitCode::SUCCESS)
}

/// Asks the live node to hand over to its backup; prints its answer.
fn switchover(config: &Path) -> Result<ExitCode> {
    let cfg = ApplianceConfig::load(config)?;
    let ft = cfg
        .ft
        .as_ref()
        .with_context(|| format!("{} has no [ft] section", config.display()))?;
    let answer = crate::admin::request(ft.admin, "POST", "/switchover")?;
    print!("{answer}");
    Ok(ExitCode::SUCCESS)
}

/// Prints a running node's status.
fn status(config: &Path, json: bool) -> Result<ExitCode> {
    let cfg = ApplianceConfig::load(config)?;
    let ft = cfg
        .ft
        .as_ref()
        .with_context(|| format!("{} has no [ft] section", config.display()))?;
    let body = crate::admin::get(ft.admin, "/status")?;
    if json {
        println!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let v: serde_json::Value =
        serde_json::from_str(&body).context("the admin endpoint's /status is not JSON")?;
    print!("{}", crate::ft::status::render_text(&v));
    Ok(ExitCode::SUCCESS)
}

/// Records a run of `cfg` into `log`; prints `record: exits=<N> digest=<hex>`.
pub fn record(cfg: &ApplianceConfig, log: &Path, disk_reads: DiskReads) -> Result<ExitCode> {
    let mut machine = Machine::new(cfg, open_console(cfg)?)?;
    let writer = LogWriter::create(log, &machine.log_header(disk_reads, "", 0))?;
    let schedule = DigestSchedule {
        interval: cfg.replay.digest_interval,
        full_every: cfg.replay.full_digest_every,
    };
    let live = live_world(cfg)?;
    let control = stop_on_signals(live.waker())?;
    let mut rec = Recorder::new(live, writer, schedule, disk_reads);
    let summary = machine.run(&mut rec, &control)?;
    let (bytes, entries) = rec.log_stats();
    report_outcome(&summary);
    report_disk(&machine);
    tracing::info!(log_bytes = bytes, entries, log = %log.display(), "log written");
    println!(
        "record: exits={} digest={}",
        summary.exits,
        hex(&summary.digest)
    );
    Ok(if summary.outcome.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// Replays `log` against `cfg`; prints `replay: OK ...` or `replay: DIVERGED ...`.
pub fn replay(cfg: &ApplianceConfig, log: &Path) -> ExitCode {
    match try_replay(cfg, log) {
        Ok(summary) => {
            println!(
                "replay: OK exits={} digest={}",
                summary.exits,
                hex(&summary.digest)
            );
            ExitCode::SUCCESS
        }
        Err(ReplayFailure::Diverged(ordinal, what)) => {
            println!("replay: DIVERGED at exit {ordinal}: {what}");
            ExitCode::from(2)
        }
        Err(ReplayFailure::Other(e)) => {
            println!("replay: ERROR: {e:#}");
            ExitCode::from(1)
        }
    }
}

enum ReplayFailure {
    Diverged(u64, String),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for ReplayFailure {
    fn from(e: anyhow::Error) -> Self {
        ReplayFailure::Other(e)
    }
}

fn try_replay(cfg: &ApplianceConfig, log: &Path) -> Result<RunSummary, ReplayFailure> {
    let reader = LogReader::open(log).map_err(anyhow::Error::from)?;
    let mut machine = Machine::new(cfg, open_console(cfg)?).map_err(anyhow::Error::from)?;
    machine.check_log_header(&reader.header).map_err(|why| {
        anyhow::anyhow!("log {} does not match this machine: {why}", log.display())
    })?;
    let mut replayer = Replayer::new(reader);
    match machine.run(&mut replayer, &VcpuControl::new()) {
        Ok(s) => {
            report_disk(&machine);
            Ok(s)
        }
        Err(e) => match e.divergence() {
            Some((ordinal, what)) => Err(ReplayFailure::Diverged(ordinal, what.to_string())),
            None => Err(ReplayFailure::Other(MachineError::into(e))),
        },
    }
}

fn demo(config: &Path, dir: &Path) -> Result<ExitCode> {
    let cfg = ApplianceConfig::load(config)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let log = dir.join("demo.ftlog");
    println!(
        "== recording {} into {}",
        cfg.machine.image.display(),
        log.display()
    );
    let code = record(&cfg, &log, DiskReads::Ship)?;
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    println!(
        "== replaying {} (the guest's console is silent on replay)",
        log.display()
    );
    let mut quiet = cfg.clone();
    quiet.console.output = ConsoleOutput::None;
    Ok(replay(&quiet, &log))
}

fn log_dump(path: &Path, tail: Option<usize>) -> Result<ExitCode> {
    use crate::replay::log::{read_all, Entry, TxCheck};
    let (h, entries) = read_all(path)?;
    println!(
        "header: format={} image={} memory={} MiB cmdline={:?} disk_reads={} epoch={} first_index={} entries={}",
        h.format_version,
        &hex(&h.shape.image_hash)[..16],
        h.shape.memory_size >> 20,
        h.shape.cmdline,
        h.disk_reads.name(),
        h.epoch,
        h.first_index,
        entries.len()
    );
    let skip = tail.map_or(0, |n| entries.len().saturating_sub(n));
    let list = |inputs: &[crate::replay::env::Input]| {
        inputs
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    };
    let tail_of = |more: bool, tx: &Option<TxCheck>| {
        let mut t = String::new();
        if let Some(tx) = tx {
            t.push_str(&format!(" tx={}:{}", tx.frames, &hex(&tx.digest)[..16]));
        }
        if more {
            t.push_str(" (continues)");
        }
        t
    };
    for (i, e) in entries.iter().enumerate().skip(skip) {
        let index = h.first_index + i as u64;
        match e {
            Entry::Exit {
                ordinal,
                point,
                clock_ns,
                inputs,
                more,
                tx,
            } => println!(
                "#{index} exit {ordinal}: {point} clock={clock_ns} [{}]{}",
                list(inputs),
                tail_of(*more, tx)
            ),
            Entry::Digest {
                ordinal,
                full,
                pages,
                hash,
            } => println!(
                "#{index} digest {ordinal}: {} {}",
                if *full {
                    "full".to_string()
                } else {
                    format!(
                        "{} pages",
                        pages.iter().fold(0u64, |a, r| a.saturating_add(r.count))
                    )
                },
                &hex(hash)[..16]
            ),
            Entry::End {
                ordinal,
                outcome,
                digest,
            } => println!("#{index} end {ordinal}: {outcome} {}", &hex(digest)[..16]),
            Entry::Inputs {
                ordinal,
                inputs,
                more,
                tx,
            } => println!(
                "#{index} inputs {ordinal}: [{}]{}",
                list(inputs),
                tail_of(*more, tx)
            ),
            Entry::Invalid => println!("#{index} invalid"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

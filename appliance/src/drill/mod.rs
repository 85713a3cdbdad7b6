//! `ftvm drill`: rehearse a failure against a running pair (DESIGN.md 10).
//!
//! A drill reads a targets file (`drill.toml`: the service address, and the
//! commands that start, kill and query each site, the witness and the WAN;
//! `scripts/lab.sh up` writes one for the lab, Ansible one for a
//! deployment), makes sure the pair is healthy, starts a write load of real
//! Redis clients on long-lived connections, injects the scenario's fault,
//! watches which site ends live, and checks what the clients saw: every
//! acknowledged write present, the histories linearizable, no connection
//! broken, and (from a capture on the client LAN) no moment with two live
//! sites. Each run writes a JSON report and a readable summary.

pub mod capture;
pub mod linearizable;
pub mod load;
pub mod report;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Whether a request sent at or after `fault` has been answered.
fn answered_after(history: &load::History, fault: Instant) -> bool {
    history
        .records
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .any(|r| r.start >= fault && r.end.is_some() && r.error.is_none())
}

/// Moves the calling thread into network namespace `name` (its sockets are
/// then that namespace's).
pub fn enter_netns(name: &str) -> std::io::Result<()> {
    let path = Path::new("/run/netns").join(name);
    let f = std::fs::File::open(&path)?;
    // SAFETY: setns on an open namespace fd; it changes only this thread.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A command line in a targets file.
pub type Cmd = Vec<String>;

/// One site of the pair, as the drill drives it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteTargets {
    pub name: String,
    /// Prints the node's `/status` JSON.
    pub status: Cmd,
    pub start_primary: Cmd,
    pub start_backup: Cmd,
    /// Starts the node as a joining backup (`ftvm run --join`).
    #[serde(default)]
    pub join: Option<Cmd>,
    /// Asks the node, as primary, to hand over (`ftvm switchover`).
    #[serde(default)]
    pub switchover: Option<Cmd>,
    pub kill: Cmd,
}

/// Where to watch for frames from each site's guest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureTargets {
    pub netns: String,
    pub a: String,
    pub b: String,
}

/// The targets file. The commands that inject a fault (`kill`,
/// `kill_witness`, `partition_sites`, `isolate_a`, `isolate_b`) must return
/// as soon as the fault is in place (a kill once the signal is sent, not
/// when the process is gone): the drill counts the fault from their return.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    pub service: String,
    #[serde(default)]
    pub client_netns: Option<String>,
    pub guest_mac: String,
    #[serde(default)]
    pub wan_delay_ms: u64,
    pub failure_timeout_ms: u64,
    /// Stops everything and prepares a fresh pair from one site's disk (the
    /// drill appends `--from a|b`).
    pub reset: Cmd,
    pub start_witness: Cmd,
    pub kill_witness: Cmd,
    pub partition_sites: Cmd,
    pub heal_sites: Cmd,
    pub isolate_a: Cmd,
    pub isolate_b: Cmd,
    pub heal_all: Cmd,
    #[serde(default)]
    pub capture: Option<CaptureTargets>,
    pub site: HashMap<String, SiteTargets>,
}

impl Targets {
    pub fn load(path: &Path) -> Result<Targets> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let t: Targets = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        for s in ["a", "b"] {
            if !t.site.contains_key(s) {
                bail!("{}: no [site.{s}] table", path.display());
            }
        }
        Ok(t)
    }

    fn site(&self, s: Side) -> &SiteTargets {
        &self.site[s.key()]
    }

    fn mac(&self) -> Result<[u8; 6]> {
        ftvm_config::appliance::parse_mac(&self.guest_mac)
            .with_context(|| format!("guest_mac {:?} is not a MAC address", self.guest_mac))
    }
}

/// Runs a targets command; its stdout.
pub fn run_cmd(cmd: &[String], extra: &[&str]) -> Result<String> {
    let (prog, args) = cmd
        .split_first()
        .context("empty command in the targets file")?;
    let out = std::process::Command::new(prog)
        .args(args)
        .args(extra)
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} {extra:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One of the two sites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    A,
    B,
}

impl Side {
    pub fn key(self) -> &'static str {
        match self {
            Side::A => "a",
            Side::B => "b",
        }
    }
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

/// The drills `ftvm drill` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    KillPrimary,
    KillBackup,
    PartitionSites,
    IsolatePrimary,
    KillWitness,
    PartitionAndWitnessDown,
    Hiccup,
    /// A planned switchover (`ftvm switchover` on the primary): the roles
    /// swap and the pair stays protected.
    Switchover,
    /// Kill the primary, fail over, restart the killed node with `--join`:
    /// it re-protects the survivor.
    Rejoin,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::KillPrimary => "kill-primary",
            Scenario::KillBackup => "kill-backup",
            Scenario::PartitionSites => "partition-sites",
            Scenario::IsolatePrimary => "isolate-primary",
            Scenario::KillWitness => "kill-witness",
            Scenario::PartitionAndWitnessDown => "partition-and-witness-down",
            Scenario::Hiccup => "hiccup",
            Scenario::Switchover => "switchover",
            Scenario::Rejoin => "rejoin",
        }
    }
}

/// A node's status, or why it could not be read (a dead node).
fn status(t: &Targets, s: Side) -> Option<serde_json::Value> {
    run_cmd(&t.site(s).status, &[])
        .ok()
        .and_then(|o| serde_json::from_str(&o).ok())
}

fn role(v: &Option<serde_json::Value>) -> String {
    v.as_ref()
        .and_then(|v| v["role"].as_str())
        .unwrap_or("down")
        .to_string()
}

fn is_live(r: &str) -> bool {
    r == "primary" || r == "solo"
}

/// A node's role and when it entered it (its status's `role_since_s`,
/// counted back from when the status command returned).
fn role_entered(t: &Targets, s: Side) -> Option<(String, Instant)> {
    let v = status(t, s)?;
    let read = Instant::now();
    let since = Duration::try_from_secs_f64(v["role_since_s"].as_f64()?).ok()?;
    Some((role(&Some(v)), read.checked_sub(since)?))
}

/// Polls until `pred(role a, role b)` holds; returns when it was seen.
fn wait_roles(
    t: &Targets,
    what: &str,
    limit: Duration,
    pred: impl Fn(&str, &str) -> bool,
) -> Result<Instant> {
    let start = Instant::now();
    loop {
        let (a, b) = (role(&status(t, Side::A)), role(&status(t, Side::B)));
        if pred(&a, &b) {
            return Ok(Instant::now());
        }
        if start.elapsed() > limit {
            bail!("waited {limit:?} for {what}; roles now: a={a} b={b}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Options of one drill run.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    pub scenario: Scenario,
    pub repeat: u32,
    pub seed: u64,
    pub clients: usize,
    pub out: PathBuf,
    /// Load after the fault was handled, before the checks.
    pub settle: Duration,
}

/// What one iteration found.
#[derive(Debug, Clone, Serialize)]
pub struct Iteration {
    pub scenario: &'static str,
    pub iteration: u32,
    pub seed: u64,
    pub wan_delay_ms: u64,
    pub primary_before: Side,
    pub live_after: Option<Side>,
    pub expected_live_after: Side,
    /// Fault to the first reply to a request sent after the fault.
    pub first_reply_after_fault_ms: Option<f64>,
    /// Fault to the new live site's role change (from its status).
    pub fault_to_live_ms: Option<f64>,
    /// How long the command that injected the fault took (the fault landed
    /// within that time before the moment the report counts from).
    pub fault_command_ms: f64,
    pub failover: Option<serde_json::Value>,
    pub writes_acknowledged: u64,
    pub writes_lost: u64,
    pub reads: u64,
    pub linearizable: String,
    pub connections_broken: u64,
    pub two_live_moments: Option<u64>,
    pub restarted_node_fenced: Option<bool>,
    pub nobody_live_while_witness_down: Option<bool>,
    /// The worst latency of a request answered after the fault: the pause
    /// clients saw.
    pub worst_latency_after_fault_ms: Option<f64>,
    /// Rejoin: the live node's re-protection progress once the pair was
    /// protected again (bytes copied, rounds, cut-over pause).
    pub reprotect: Option<serde_json::Value>,
    /// Every request: (seconds since the fault, latency ms, answered).
    #[serde(skip)]
    pub latencies: Vec<(f64, f64, bool)>,
    pub passed: bool,
    pub problems: Vec<String>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The one site whose node is live, if exactly one is.
fn live_side(t: &Targets) -> Option<Side> {
    match (
        is_live(&role(&status(t, Side::A))),
        is_live(&role(&status(t, Side::B))),
    ) {
        (true, false) => Some(Side::A),
        (false, true) => Some(Side::B),
        _ => None,
    }
}

/// Makes sure a healthy pair runs (a fresh one from `disk_from`'s disk if
/// not); returns the primary's side.
fn ensure_pair(t: &Targets, disk_from: Side) -> Result<Side> {
    let (a, b) = (role(&status(t, Side::A)), role(&status(t, Side::B)));
    let healthy = |p: &str, q: &str| p == "primary" && q == "backup";
    if healthy(&a, &b) {
        return Ok(Side::A);
    }
    if healthy(&b, &a) {
        return Ok(Side::B);
    }
    tracing::info!(a = %a, b = %b, from = disk_from.key(), "starting a fresh pair for the drill");
    run_cmd(&t.reset, &["--from", disk_from.key()])?;
    run_cmd(&t.start_witness, &[])?;
    std::thread::sleep(Duration::from_millis(500));
    run_cmd(&t.site(disk_from).start_primary, &[])?;
    run_cmd(&t.site(disk_from.other()).start_backup, &[])?;
    let want = disk_from;
    wait_roles(
        t,
        "a healthy pair",
        Duration::from_secs(180),
        |a, b| match want {
            Side::A => healthy(a, b),
            Side::B => healthy(b, a),
        },
    )?;
    Ok(want)
}

/// Runs the drill: `repeat` iterations; each one's report is written to
/// `out` as it ends. Returns every iteration.
pub fn run(t: &Targets, o: &DrillOptions) -> Result<Vec<Iteration>> {
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let mut all = Vec::new();
    // A fresh pair starts from the disk of the site that is live now (a
    // previous drill's survivor holds writes the other site never saw).
    let mut disk_from = live_side(t).unwrap_or(Side::A);
    for i in 1..=o.repeat {
        let seed = o.seed.wrapping_add(u64::from(i));
        let primary = ensure_pair(t, disk_from)?;
        let it = iteration(t, o, i, seed, primary)?;
        tracing::info!(
            iteration = i,
            passed = it.passed,
            live_after = ?it.live_after,
            first_reply_ms = ?it.first_reply_after_fault_ms,
            lost = it.writes_lost,
            "drill iteration done"
        );
        disk_from = it.live_after.unwrap_or(primary);
        report::write_iteration(&o.out, &it)?;
        all.push(it);
    }
    report::write_summary(&o.out, &all)?;
    Ok(all)
}

fn iteration(t: &Targets, o: &DrillOptions, i: u32, seed: u64, primary: Side) -> Result<Iteration> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let backup = primary.other();
    let timeout = Duration::from_millis(t.failure_timeout_ms);
    let limit = Duration::from_secs(120) + timeout * 10;
    let capture = match &t.capture {
        Some(c) => Some(capture::Capture::start(
            &c.netns,
            &[c.a.clone(), c.b.clone()],
            t.mac()?,
        )?),
        None => None,
    };
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let prefix = format!("drill:{run_id:x}:{i}");
    let load = load::Load::start(
        &t.service,
        t.client_netns.as_deref(),
        o.clients,
        &prefix,
        seed,
    );
    std::thread::sleep(Duration::from_millis(rng.gen_range(1000..3000)));
    let mut problems = Vec::new();
    let mut restarted = None;
    let mut nobody_live = None;
    // The fault counts from when its command returned: a remote command
    // (ssh to a site) can take a second to land, and requests answered
    // meanwhile by the old primary are no failover.
    let inject = |cmd: &Cmd| -> Result<Instant> {
        run_cmd(cmd, &[])?;
        Ok(Instant::now())
    };
    let issued = Instant::now();
    let (expected, fault) = match o.scenario {
        Scenario::KillPrimary => (backup, inject(&t.site(primary).kill)?),
        Scenario::KillBackup => (primary, inject(&t.site(backup).kill)?),
        // Both sites still reach the witness: either may win the race.
        Scenario::PartitionSites => (primary, inject(&t.partition_sites)?),
        Scenario::IsolatePrimary => {
            let cut = if primary == Side::A {
                &t.isolate_a
            } else {
                &t.isolate_b
            };
            (backup, inject(cut)?)
        }
        Scenario::KillWitness => (primary, inject(&t.kill_witness)?),
        Scenario::PartitionAndWitnessDown => {
            run_cmd(&t.kill_witness, &[])?;
            let fault = inject(&t.partition_sites)?;
            // Without the witness nobody may go live, however long it takes.
            std::thread::sleep(timeout * 3);
            let (a, b) = (role(&status(t, Side::A)), role(&status(t, Side::B)));
            let live_now = [(&a, Side::A), (&b, Side::B)]
                .iter()
                .filter(|(r, s)| is_live(r) && *s != primary)
                .count();
            let ok = live_now == 0 && a != "solo" && b != "solo";
            if !ok {
                problems.push(format!(
                    "with the witness down a site went live: a={a} b={b}"
                ));
            }
            nobody_live = Some(ok);
            run_cmd(&t.start_witness, &[])?;
            (primary, fault)
        }
        Scenario::Hiccup => {
            let fault = inject(&t.partition_sites)?;
            std::thread::sleep(timeout / 2);
            run_cmd(&t.heal_sites, &[])?;
            (primary, fault)
        }
        // A switchover's pause starts when it is asked for; the command
        // returns once the roles have swapped.
        Scenario::Switchover => {
            let cmd = t.site(primary).switchover.as_ref().with_context(|| {
                format!(
                    "the targets file has no `switchover` command for site {}",
                    primary.key()
                )
            })?;
            run_cmd(cmd, &[])?;
            (backup, issued)
        }
        Scenario::Rejoin => (backup, inject(&t.site(primary).kill)?),
    };
    let fault_command_ms = ms(fault.duration_since(issued));
    // Wait for the outcome.
    let outcome = match o.scenario {
        Scenario::KillWitness | Scenario::Hiccup => {
            std::thread::sleep(timeout * 2);
            wait_roles(t, "the pair to stay as it was", limit, |a, b| {
                let (p, q) = if primary == Side::A { (a, b) } else { (b, a) };
                p == "primary" && q == "backup"
            })
        }
        Scenario::PartitionSites | Scenario::PartitionAndWitnessDown => wait_roles(
            t,
            "exactly one live site and the other fenced",
            limit,
            |a, b| (is_live(a) && b == "fenced") || (is_live(b) && a == "fenced"),
        ),
        Scenario::Switchover => wait_roles(t, "the roles to swap", limit, |a, b| {
            let (p, q) = if expected == Side::A { (a, b) } else { (b, a) };
            p == "primary" && q == "backup"
        }),
        // The primary goes solo once it declared its backup failed.
        Scenario::KillBackup => wait_roles(t, "the primary to go solo", limit, |a, b| {
            (if expected == Side::A { a } else { b }) == "solo"
        }),
        _ => wait_roles(t, "the expected site to be live", limit, |a, b| {
            let r = if expected == Side::A { a } else { b };
            r == "solo" || r == "primary"
        }),
    };
    if let Err(e) = &outcome {
        problems.push(e.to_string());
    }
    // When the live site took its role, by its own clock: polling status
    // through a slow command (ssh) sees it late.
    let fault_to_live = outcome.ok().map(|seen| {
        let entered = [Side::A, Side::B]
            .into_iter()
            .filter_map(|s| role_entered(t, s))
            .filter(|(r, at)| is_live(r) && *at > fault)
            .map(|(_, at)| at)
            .min();
        ms(entered.unwrap_or(seen).duration_since(fault))
    });
    // Heal what the scenario cut, so the losing site can be seen fenced.
    if matches!(
        o.scenario,
        Scenario::PartitionSites | Scenario::IsolatePrimary | Scenario::PartitionAndWitnessDown
    ) {
        run_cmd(&t.heal_all, &[])?;
    }
    if o.scenario == Scenario::KillWitness {
        run_cmd(&t.start_witness, &[])?;
    }
    let reprotect = if o.scenario == Scenario::Rejoin {
        match rejoin(t, primary, expected, limit) {
            Ok(v) => v,
            Err(e) => {
                problems.push(e.to_string());
                None
            }
        }
    } else {
        None
    };
    // Clients blocked since the fault come back at their TCP's next
    // retransmission, which backs off to many seconds after a long cut:
    // wait for the first reply to a request sent after the fault (an event,
    // bounded only to catch a hang) before the settle time starts.
    let waited_from = Instant::now();
    while waited_from.elapsed() < limit && !answered_after(&load.history, fault) {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(o.settle);
    let (sa, sb) = (status(t, Side::A), status(t, Side::B));
    let live_after = match (is_live(&role(&sa)), is_live(&role(&sb))) {
        (true, false) => Some(Side::A),
        (false, true) => Some(Side::B),
        (true, true) => {
            problems.push("both sites report a live role".into());
            None
        }
        (false, false) => None,
    };
    let failover = live_after
        .and_then(|s| if s == Side::A { sa.clone() } else { sb.clone() })
        .and_then(|v| v.get("failover").cloned())
        .filter(|f| !f.is_null());
    let history = load.stop();
    let frames = capture.map(|c| c.finish());

    // The killed node, restarted, must stay fenced (it lost its guest).
    if matches!(o.scenario, Scenario::KillPrimary | Scenario::KillBackup) {
        let killed = if o.scenario == Scenario::KillPrimary {
            primary
        } else {
            backup
        };
        run_cmd(&t.site(killed).start_backup, &[])?;
        let fenced = wait_roles(
            t,
            "the restarted node to report fenced (or, re-protected, backup)",
            Duration::from_secs(60),
            // With `ft.reprotect = "auto"` the survivor may take it back as
            // its backup at once: either way it never went live.
            |a, b| matches!(if killed == Side::A { a } else { b }, "fenced" | "backup"),
        )
        .is_ok();
        if !fenced {
            problems.push("the restarted node did not stay fenced or become a backup".into());
        }
        restarted = Some(fenced);
    }

    // What the clients saw.
    let records = history
        .records
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut keys: Vec<String> = records.iter().map(|r| r.key.clone()).collect();
    keys.sort();
    keys.dedup();
    // A service that does not answer fails the iteration, and the report
    // still gets written: its acknowledged writes count as lost (no client
    // can read them back).
    let finals =
        load::final_reads(&t.service, t.client_netns.as_deref(), keys).unwrap_or_else(|e| {
            problems.push(format!(
                "the final reads failed ({e}): no acknowledged write could be read back"
            ));
            Vec::new()
        });
    let final_map: HashMap<String, Option<String>> = finals
        .iter()
        .map(|(k, _, v, _)| (k.clone(), v.clone()))
        .collect();
    let writes_lost = load::lost_writes(&records, &final_map);
    let t0 = load_start(&records).unwrap_or(fault);
    let mut hist = load::histories(&records, t0);
    let us = |x: Instant| x.saturating_duration_since(t0).as_nanos() as u64;
    for (k, s, v, e) in &finals {
        hist.entry(k.clone()).or_default().push(linearizable::Op {
            call: us(*s),
            ret: Some(us(*e)),
            kind: linearizable::OpKind::Read(v.clone()),
        });
    }
    let mut lin = "linearizable".to_string();
    for (k, ops) in &hist {
        match linearizable::check(ops, None, 5_000_000) {
            linearizable::Verdict::Linearizable => {}
            linearizable::Verdict::Violation(why) => {
                lin = format!("VIOLATION on {k}: {why}");
                problems.push(lin.clone());
                break;
            }
            linearizable::Verdict::Unknown => {
                lin = format!("unknown (the search on {k} was too large)")
            }
        }
    }
    let writes_acknowledged = records
        .iter()
        .filter(|r| r.write.is_some() && r.end.is_some() && r.error.is_none())
        .count() as u64;
    let reads = records.iter().filter(|r| r.read.is_some()).count() as u64;
    let first_reply = records
        .iter()
        .filter(|r| r.start >= fault && r.error.is_none())
        .filter_map(|r| r.end)
        .min()
        .map(|e| ms(e.duration_since(fault)));
    let latencies = records
        .iter()
        .map(|r| {
            let at = if r.start >= fault {
                r.start.duration_since(fault).as_secs_f64()
            } else {
                -fault.duration_since(r.start).as_secs_f64()
            };
            let lat = r.end.map_or(0.0, |e| ms(e.duration_since(r.start)));
            (at, lat, r.end.is_some() && r.error.is_none())
        })
        .collect();
    let worst_latency_after_fault_ms = records
        .iter()
        .filter(|r| r.error.is_none())
        .filter_map(|r| r.end.filter(|e| *e >= fault).map(|e| ms(e - r.start)))
        .reduce(f64::max);
    let connections_broken = history.broken.load(std::sync::atomic::Ordering::Relaxed);
    let two_live_moments = frames.as_ref().and_then(|f| {
        let winner = live_after?;
        let (wa, wb) = (&f[0].1, &f[1].1);
        let (w, l) = if winner == Side::A {
            (wa, wb)
        } else {
            (wb, wa)
        };
        Some(capture::two_live(w, l, fault) as u64)
    });
    if writes_lost > 0 {
        problems.push(format!("{writes_lost} acknowledged writes lost"));
    }
    if connections_broken > 0 {
        problems.push(format!("{connections_broken} client connections broke"));
    }
    if two_live_moments.unwrap_or(0) > 0 {
        problems.push(format!(
            "{two_live_moments:?} frames from the losing site after the winner spoke"
        ));
    }
    // After a partition either site may win the witness's race.
    let either_wins = matches!(
        o.scenario,
        Scenario::PartitionSites | Scenario::PartitionAndWitnessDown
    );
    if !either_wins && live_after.is_some() && live_after != Some(expected) {
        problems.push(format!(
            "expected site {} live, found {:?}",
            expected.key(),
            live_after
        ));
    }
    if first_reply.is_none() {
        problems.push("no request sent after the fault was ever answered".into());
    }
    Ok(Iteration {
        scenario: o.scenario.name(),
        iteration: i,
        seed,
        wan_delay_ms: t.wan_delay_ms,
        primary_before: primary,
        live_after,
        expected_live_after: expected,
        first_reply_after_fault_ms: first_reply,
        fault_to_live_ms: fault_to_live,
        fault_command_ms,
        failover,
        writes_acknowledged,
        writes_lost,
        reads,
        linearizable: lin,
        connections_broken,
        two_live_moments,
        restarted_node_fenced: restarted,
        nobody_live_while_witness_down: nobody_live,
        worst_latency_after_fault_ms,
        reprotect,
        latencies,
        passed: problems.is_empty(),
        problems,
    })
}

/// Restarts the killed `old` site with `--join` and waits until it is the
/// backup of `live` again; returns the live node's re-protection progress.
fn rejoin(
    t: &Targets,
    old: Side,
    live: Side,
    limit: Duration,
) -> Result<Option<serde_json::Value>> {
    let join = t.site(old).join.as_ref().with_context(|| {
        format!(
            "the targets file has no `join` command for site {}",
            old.key()
        )
    })?;
    let started = Instant::now();
    run_cmd(join, &[])?;
    let done = wait_roles(
        t,
        "the rejoined node to protect the survivor",
        limit,
        |a, b| {
            let (p, q) = if live == Side::A { (a, b) } else { (b, a) };
            p == "primary" && q == "backup"
        },
    )?;
    let mut progress = status(t, live).and_then(|v| v.get("reprotect").cloned());
    // From the join command (a process start) to a protected pair.
    if let Some(serde_json::Value::Object(p)) = progress.as_mut() {
        p.insert(
            "join_to_protected_ms".into(),
            serde_json::json!(ms(done.duration_since(started))),
        );
    }
    Ok(progress)
}

fn load_start(records: &[load::Record]) -> Option<Instant> {
    records.iter().map(|r| r.start).min()
}

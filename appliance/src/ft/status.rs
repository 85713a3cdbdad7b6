//! What `/status` and `/metrics` report: a snapshot read from the parts
//! that own each value (the role cell, the link, the queues, the gate).
//! Nothing here keeps its own copy of the role or of any counter.

use super::channel::LinkState;
use super::log_queue::LogQueue;
use super::output_gate::OutputGate;
use super::replay_queue::ReplayQueue;
use super::role::RoleCell;
use crate::replay::log::DiskReads;
use serde::Serialize;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Carries an operator's command (from the admin endpoint) to the node.
pub type CommandHandler =
    Box<dyn Fn(crate::admin::AdminCommand) -> Result<String, String> + Send + Sync>;

/// The witness's answer to a status poll: (epoch, holder), or why none came.
pub type WitnessAnswer = Result<(u64, Option<String>), String>;

/// How the last go-live went (DESIGN.md 6), for the operator.
#[derive(Debug, Clone, Serialize, Default)]
pub struct FailoverReport {
    pub live_at_exit: Option<u64>,
    pub detection_to_grant_ms: Option<f64>,
    pub detection_to_live_ms: Option<f64>,
    /// From the last log batch received from the old primary to the first
    /// frame this node's guest sent live.
    pub last_entry_to_first_frame_ms: Option<f64>,
    /// Frames that reached the silent TAP before go-live, dropped.
    pub dropped_rx_frames: usize,
}

/// A divergence found by replay.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Divergence {
    pub ordinal: u64,
    pub what: String,
}

/// The parts a node's status is read from. A part a role does not have
/// (a backup's log queue) is `None`; going live installs the live parts.
pub struct StatusSources {
    pub node: String,
    pub cluster: String,
    pub peer: String,
    pub disk_reads: DiskReads,
    pub role: RoleCell,
    pub link: Arc<LinkState>,
    pub log: Mutex<Option<Arc<LogQueue>>>,
    pub gate: Mutex<Option<OutputGate>>,
    pub replay: Mutex<Option<Arc<ReplayQueue>>>,
    pub divergence: Mutex<Option<Divergence>>,
    failover: Mutex<Option<Arc<super::go_live::GoLive>>>,
    reprotect: Mutex<Option<super::reprotect::SharedProgress>>,
    witness: Mutex<Option<(Instant, WitnessAnswer)>>,
    commands: Mutex<Option<CommandHandler>>,
    /// Per-second rates, refreshed by [`StatusSources::sample`].
    rates: Mutex<Rates>,
    started: Instant,
}

#[derive(Debug, Default, Clone, Copy)]
struct Rates {
    at: Option<Instant>,
    entries: u64,
    bytes: u64,
    entries_per_s: f64,
    bytes_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct PeerReport {
    pub name: String,
    pub connected: bool,
    pub rtt_ms: f64,
    /// Time since anything was heard from the peer (null: never).
    pub silent_ms: Option<u64>,
    pub sessions: u64,
    /// The last pairing refusal, either way.
    pub refused: Option<String>,
}

#[derive(Debug, Serialize, Default)]
pub struct LogReport {
    pub entries: u64,
    pub bytes: u64,
    pub entries_per_s: f64,
    pub bytes_per_s: f64,
    pub last_index: u64,
    pub last_acked: u64,
    pub buffer_bytes: u64,
    pub buffer_capacity: u64,
    pub waited_full_ms: u64,
    pub slowed_ms: u64,
}

#[derive(Debug, Serialize, Default)]
pub struct ReplayReport {
    pub exit_ordinal: u64,
    pub replayed_index: u64,
    pub received_index: u64,
    pub lag_ms: f64,
    pub buffer_bytes: u64,
    pub digests_checked: u64,
    pub outputs_checked: u64,
}

#[derive(Debug, Serialize, Default)]
pub struct HeldReport {
    pub frames: u64,
    pub bytes: u64,
    pub oldest_ms: Option<u64>,
    pub sent: u64,
    pub dropped: u64,
    pub max_hold_ms: f64,
    /// Frames that waited for an ack before leaving, and their mean wait.
    pub waited: u64,
    pub mean_hold_ms: f64,
}

/// The `/status` document.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub node: String,
    pub cluster: String,
    pub role: &'static str,
    pub epoch: u64,
    pub role_reason: String,
    pub role_since_s: f64,
    /// Live and a backup has every entry outputs depend on.
    pub protected: bool,
    pub peer: PeerReport,
    pub log: Option<LogReport>,
    pub replay: Option<ReplayReport>,
    pub held_outputs: Option<HeldReport>,
    pub disk_reads: &'static str,
    pub divergence: Option<Divergence>,
    pub replication_stopped: Option<String>,
    pub failover: Option<FailoverReport>,
    /// The last (or current) join of a backup, from either side.
    pub reprotect: Option<super::reprotect::Progress>,
    pub witness: Option<WitnessReport>,
    pub uptime_s: f64,
}

/// The witness as this node sees it (a status poll every second).
#[derive(Debug, Serialize)]
pub struct WitnessReport {
    pub reachable: bool,
    /// The cluster's epoch and its holder, as the witness last said.
    pub epoch: Option<u64>,
    pub holder: Option<String>,
    pub error: Option<String>,
    pub checked_ms_ago: u64,
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

impl std::fmt::Debug for StatusSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusSources")
            .field("node", &self.node)
            .field("role", &self.role)
            .finish()
    }
}

impl StatusSources {
    pub fn new(
        node: &str,
        cluster: &str,
        peer: &str,
        disk_reads: DiskReads,
        role: RoleCell,
        link: Arc<LinkState>,
    ) -> Arc<Self> {
        Arc::new(StatusSources {
            node: node.into(),
            cluster: cluster.into(),
            peer: peer.into(),
            disk_reads,
            role,
            link,
            log: Mutex::new(None),
            gate: Mutex::new(None),
            replay: Mutex::new(None),
            divergence: Mutex::new(None),
            failover: Mutex::new(None),
            reprotect: Mutex::new(None),
            witness: Mutex::new(None),
            commands: Mutex::new(None),
            rates: Mutex::new(Rates::default()),
            started: Instant::now(),
        })
    }

    fn log_queue(&self) -> Option<Arc<LogQueue>> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn gate(&self) -> Option<OutputGate> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn replay_queue(&self) -> Option<Arc<ReplayQueue>> {
        self.replay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_commands(&self, h: CommandHandler) {
        *self.commands.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
    }

    /// Hands an operator's command to the node; its answer.
    pub fn command(&self, cmd: crate::admin::AdminCommand) -> Result<String, String> {
        match &*self.commands.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(h) => h(cmd),
            None => Err("this node takes no commands".into()),
        }
    }

    /// The witness's last answer to a status poll (or why none came).
    pub fn note_witness(&self, answer: WitnessAnswer) {
        *self.witness.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), answer));
    }

    pub fn set_failover(&self, g: Arc<super::go_live::GoLive>) {
        *self.failover.lock().unwrap_or_else(|p| p.into_inner()) = Some(g);
    }

    /// Where joins and re-protections stand (either side of one).
    pub fn set_reprotect(&self, p: super::reprotect::SharedProgress) {
        *self.reprotect.lock().unwrap_or_else(|p| p.into_inner()) = Some(p);
    }

    /// A live node that became a backup again has no go-live to report.
    pub fn clear_failover(&self) {
        *self.failover.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub fn set_divergence(&self, d: Divergence) {
        *self.divergence.lock().unwrap_or_else(|p| p.into_inner()) = Some(d);
    }

    /// Refreshes the per-second log rates (called once a second).
    pub fn sample(&self) {
        let Some(q) = self.log_queue() else {
            return;
        };
        let entries = q.stats.entries.load(Ordering::Relaxed);
        let bytes = q.stats.bytes.load(Ordering::Relaxed);
        let mut r = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some(at) = r.at {
            let dt = now.duration_since(at).as_secs_f64().max(1e-3);
            r.entries_per_s = entries.saturating_sub(r.entries) as f64 / dt;
            r.bytes_per_s = bytes.saturating_sub(r.bytes) as f64 / dt;
        }
        r.at = Some(now);
        r.entries = entries;
        r.bytes = bytes;
    }

    pub fn report(&self) -> StatusReport {
        let role = self.role.get();
        let link = &self.link;
        let connected = link.connected.load(Ordering::Relaxed);
        let log = self.log_queue().map(|q| {
            let r = *self.rates.lock().unwrap_or_else(|p| p.into_inner());
            let (buf, cap) = q.fill();
            LogReport {
                entries: q.stats.entries.load(Ordering::Relaxed),
                bytes: q.stats.bytes.load(Ordering::Relaxed),
                entries_per_s: r.entries_per_s,
                bytes_per_s: r.bytes_per_s,
                last_index: q.last_index(),
                last_acked: q.acked(),
                buffer_bytes: buf as u64,
                buffer_capacity: cap as u64,
                waited_full_ms: q.stats.waited_full_us.load(Ordering::Relaxed) / 1000,
                slowed_ms: q.stats.slowed_us.load(Ordering::Relaxed) / 1000,
            }
        });
        let replay = match (self.replay_queue(), self.log_queue()) {
            (Some(rq), _) => {
                let p = &rq.progress;
                let (buf, _) = rq.fill();
                Some(ReplayReport {
                    exit_ordinal: p.ordinal.load(Ordering::Relaxed),
                    replayed_index: p.replayed.load(Ordering::Relaxed),
                    received_index: rq.received(),
                    lag_ms: ms(p
                        .received_clock_ns
                        .load(Ordering::Relaxed)
                        .saturating_sub(p.clock_ns.load(Ordering::Relaxed))),
                    buffer_bytes: buf as u64,
                    digests_checked: p.digests.load(Ordering::Relaxed),
                    outputs_checked: p.output_checks.load(Ordering::Relaxed),
                })
            }
            // A primary sees its backup's replay through the status reports.
            (None, Some(q)) if q.stats.backup_reporting.load(Ordering::Relaxed) => {
                Some(ReplayReport {
                    lag_ms: ms(q
                        .stats
                        .primary_clock_ns
                        .load(Ordering::Relaxed)
                        .saturating_sub(q.stats.replayed_clock_ns.load(Ordering::Relaxed))),
                    ..ReplayReport::default()
                })
            }
            _ => None,
        };
        let held_outputs = self.gate().map(|g| {
            let (frames, bytes, oldest) = g.held();
            let st = g.stats();
            HeldReport {
                frames: frames as u64,
                bytes: bytes as u64,
                oldest_ms: oldest.map(|d| d.as_millis() as u64),
                sent: st.sent.load(Ordering::Relaxed),
                dropped: st.dropped.load(Ordering::Relaxed),
                max_hold_ms: st.max_hold_us.load(Ordering::Relaxed) as f64 / 1000.0,
                waited: st.waited.load(Ordering::Relaxed),
                mean_hold_ms: st.hold_us_total.load(Ordering::Relaxed) as f64
                    / 1000.0
                    / st.waited.load(Ordering::Relaxed).max(1) as f64,
            }
        });
        let replication_stopped = link.replication_stopped();
        StatusReport {
            node: self.node.clone(),
            cluster: self.cluster.clone(),
            role: role.role.name(),
            epoch: role.epoch,
            role_reason: role.reason,
            role_since_s: role.since.elapsed().as_secs_f64(),
            protected: role.role == super::role::Role::Primary
                && connected
                && replication_stopped.is_none(),
            peer: PeerReport {
                name: self.peer.clone(),
                connected,
                rtt_ms: link.rtt_us.load(Ordering::Relaxed) as f64 / 1000.0,
                silent_ms: link.silent_for().map(|d| d.as_millis() as u64),
                sessions: link.sessions.load(Ordering::Relaxed),
                refused: link
                    .refused
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            },
            log,
            replay,
            held_outputs,
            disk_reads: self.disk_reads.name(),
            divergence: self
                .divergence
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            replication_stopped,
            failover: self
                .failover
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_deref()
                .map(FailoverReport::from),
            reprotect: self
                .reprotect
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|p| p.lock().unwrap_or_else(|e| e.into_inner()).clone())
                .filter(|p| !p.phase.is_empty()),
            witness: self
                .witness
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|(at, a)| WitnessReport {
                    reachable: a.is_ok(),
                    epoch: a.as_ref().ok().map(|(e, _)| *e),
                    holder: a.as_ref().ok().and_then(|(_, h)| h.clone()),
                    error: a.as_ref().err().cloned(),
                    checked_ms_ago: at.elapsed().as_millis() as u64,
                }),
            uptime_s: self.started.elapsed().as_secs_f64(),
        }
    }
}

/// `/status` for a person (`ftvm status` without `--json`).
pub fn render_text(v: &serde_json::Value) -> String {
    use std::fmt::Write;
    let s = |p: &str| {
        v.pointer(p)
            .and_then(|x| x.as_str())
            .unwrap_or("?")
            .to_string()
    };
    let n = |p: &str| v.pointer(p).and_then(|x| x.as_f64()).unwrap_or(0.0);
    let mut out = String::new();
    let protected = if v.pointer("/protected").and_then(|x| x.as_bool()) == Some(true) {
        "protected"
    } else {
        "NOT protected"
    };
    let _ = writeln!(
        out,
        "{} (cluster {}): {}, epoch {} - {protected}",
        s("/node"),
        s("/cluster"),
        s("/role"),
        n("/epoch")
    );
    let _ = writeln!(
        out,
        "  since {:.1} s: {}",
        n("/role_since_s"),
        s("/role_reason")
    );
    let connected = v.pointer("/peer/connected").and_then(|x| x.as_bool()) == Some(true);
    let heard = match v.pointer("/peer/silent_ms").and_then(|x| x.as_u64()) {
        Some(ms) => format!("last heard {ms} ms ago"),
        None => "never heard".into(),
    };
    let _ = writeln!(
        out,
        "  peer {}: {}, rtt {:.2} ms, {heard}, {} session(s)",
        s("/peer/name"),
        if connected {
            "connected"
        } else {
            "NOT connected"
        },
        n("/peer/rtt_ms"),
        n("/peer/sessions")
    );
    if let Some(r) = v.pointer("/peer/refused").and_then(|x| x.as_str()) {
        let _ = writeln!(out, "  last pairing refusal: {r}");
    }
    if v.pointer("/log").is_some_and(|x| !x.is_null()) {
        let _ = writeln!(
            out,
            "  log: {} entries ({:.1} MB), {:.0} entries/s, {:.1} kB/s; acked {} of {}; buffer {:.1} of {:.0} MiB; vCPU slowed {} ms, waited {} ms",
            n("/log/entries"),
            n("/log/bytes") / 1e6,
            n("/log/entries_per_s"),
            n("/log/bytes_per_s") / 1e3,
            n("/log/last_acked"),
            n("/log/last_index"),
            n("/log/buffer_bytes") / 1048576.0,
            n("/log/buffer_capacity") / 1048576.0,
            n("/log/slowed_ms"),
            n("/log/waited_full_ms")
        );
    }
    if v.pointer("/replay").is_some_and(|x| !x.is_null()) {
        let _ = writeln!(
            out,
            "  replay: exit {}, entry {} of {} received, lag {:.1} ms; {} state digests and {} exits' output checked",
            n("/replay/exit_ordinal"),
            n("/replay/replayed_index"),
            n("/replay/received_index"),
            n("/replay/lag_ms"),
            n("/replay/digests_checked"),
            n("/replay/outputs_checked")
        );
    }
    if v.pointer("/held_outputs").is_some_and(|x| !x.is_null()) {
        let _ = writeln!(
            out,
            "  held outputs: {} frames now; {} sent ({} after a wait, {:.2} ms on average), {} dropped, longest hold {:.1} ms",
            n("/held_outputs/frames"),
            n("/held_outputs/sent"),
            n("/held_outputs/waited"),
            n("/held_outputs/mean_hold_ms"),
            n("/held_outputs/dropped"),
            n("/held_outputs/max_hold_ms")
        );
    }
    match v.pointer("/witness").filter(|x| !x.is_null()) {
        Some(w) if w["reachable"] == true => {
            let _ = writeln!(
                out,
                "  witness: reachable; cluster epoch {} held by {}",
                w["epoch"],
                w["holder"].as_str().unwrap_or("nobody")
            );
        }
        Some(w) => {
            let _ = writeln!(
                out,
                "  witness: NOT reachable ({})",
                w["error"].as_str().unwrap_or("?")
            );
        }
        None => {}
    }
    let _ = writeln!(out, "  disk reads: {}", s("/disk_reads"));
    match v.pointer("/divergence").filter(|x| !x.is_null()) {
        Some(d) => {
            let _ = writeln!(
                out,
                "  DIVERGED at exit {}: {}",
                d.pointer("/ordinal").and_then(|x| x.as_u64()).unwrap_or(0),
                d.pointer("/what").and_then(|x| x.as_str()).unwrap_or("?")
            );
        }
        None => {
            let _ = writeln!(out, "  divergence: none");
        }
    }
    if let Some(r) = v.pointer("/replication_stopped").and_then(|x| x.as_str()) {
        let _ = writeln!(out, "  REPLICATION STOPPED: {r}");
    }
    if v.pointer("/reprotect").is_some_and(|x| !x.is_null()) {
        let eta = match v.pointer("/reprotect/eta_s").and_then(|x| x.as_f64()) {
            Some(e) => format!(", about {e:.0} s left"),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "  re-protection: {} (round {}); disk {:.1} MB copied, {:.1} MB left; memory {:.1} MB copied, {:.1} MB left{eta}; {} join(s) done",
            s("/reprotect/phase"),
            n("/reprotect/round"),
            n("/reprotect/disk_bytes_copied") / 1e6,
            n("/reprotect/disk_bytes_left") / 1e6,
            n("/reprotect/memory_bytes_copied") / 1e6,
            n("/reprotect/memory_bytes_left") / 1e6,
            n("/reprotect/joins_completed")
        );
    }
    out
}

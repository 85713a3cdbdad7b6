//! Go-live on the backup (DESIGN.md 6): once the witness granted this node
//! the next epoch, replay every whole exit received, then switch the
//! machine from the replayer to the live world at that exit boundary:
//!
//! - the guest's clock continues from the last logged value (forward,
//!   never back);
//! - frames that reached the silent TAP before go-live are dropped, the
//!   TAP (opened at start, silent until now) becomes the guest's network;
//! - virtio requests the guest had posted complete from the live world at
//!   this same exit;
//! - the guest's MAC is announced with a gratuitous ARP (or a RARP when the
//!   guest's address is not known yet) so bridges and switches move it here;
//! - from here the machine records a log for a future backup.
//!
//! [`FtEnv`] is the backup's environment: a [`Replayer`] until the switch,
//! a [`Recorder`] after. Devices and the exit loop see one `Environment`.

use super::log_queue::QueueSink;
use super::output_gate::OutputGate;
use super::replay_queue::LiveSource;
use crate::devices::tap::TapWriter;
use crate::replay::digest::PageRun;
use crate::replay::env::{
    DigestDue, EnvError, Environment, ExitPoint, Gather, LocalRead, Outcome, WaitOutcome,
};
use crate::replay::live::LiveWorld;
use crate::replay::log::DiskReads;
use crate::replay::recorder::{DigestSchedule, Recorder};
use crate::replay::replayer::Replayer;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What the node hands the vCPU thread when it is to go live.
#[derive(Debug)]
pub struct LivePlan {
    pub epoch: u64,
    /// Where the new primary's log goes (a future backup's).
    pub sink: QueueSink,
    /// The output gate, already open (this node holds the epoch alone).
    pub gate: Option<OutputGate>,
}

/// What the node hands the vCPU thread when a live node is to become a
/// backup (the old primary of a planned switchover): the log to replay
/// from the next exit on.
#[derive(Debug)]
pub struct BackupPlan {
    pub source: LiveSource,
}

/// Shared between the node thread (which orders a switch) and the vCPU
/// thread (which performs it at an exit boundary).
#[derive(Debug, Default)]
pub struct GoLive {
    plan: Mutex<Option<LivePlan>>,
    backup_plan: Mutex<Option<BackupPlan>>,
    report: Mutex<GoLiveReport>,
}

/// When each step of a go-live happened.
#[derive(Debug, Default, Clone)]
pub struct GoLiveReport {
    pub detected: Option<Instant>,
    pub granted: Option<Instant>,
    pub last_entry: Option<Instant>,
    /// The exit at which the machine went live, and when.
    pub live: Option<(u64, Instant)>,
    pub first_frame: Option<Instant>,
    pub dropped_rx_frames: usize,
}

impl GoLive {
    fn lock_report(&self) -> std::sync::MutexGuard<'_, GoLiveReport> {
        self.report.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Orders the switch; the vCPU performs it at the end of the log.
    pub fn order(&self, plan: LivePlan) {
        *self.plan.lock().unwrap_or_else(|p| p.into_inner()) = Some(plan);
    }

    fn take_plan(&self) -> Option<LivePlan> {
        self.plan.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Orders a live machine back to replay: its next exit is replayed
    /// from `plan`'s log. Order it while the vCPU is stopped at a boundary.
    pub fn order_backup(&self, plan: BackupPlan) {
        *self.backup_plan.lock().unwrap_or_else(|p| p.into_inner()) = Some(plan);
    }

    fn take_backup_plan(&self) -> Option<BackupPlan> {
        self.backup_plan
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    pub fn note_detected(&self) {
        self.lock_report().detected = Some(Instant::now());
    }

    pub fn note_granted(&self, last_entry: Option<Instant>) {
        let mut r = self.lock_report();
        r.granted = Some(Instant::now());
        r.last_entry = last_entry;
    }

    pub fn report(&self) -> GoLiveReport {
        self.lock_report().clone()
    }
}

enum Mode {
    Replaying(Box<Replayer<LiveSource>>),
    Live(Box<Recorder<QueueSink>>),
}

/// The backup's environment, replaying until it goes live.
pub struct FtEnv {
    mode: Mode,
    /// The live world, opened at start and silent until the switch.
    live: Option<LiveWorld>,
    tap: Option<TapWriter>,
    mac: Option<[u8; 6]>,
    guest_ip: Option<Ipv4Addr>,
    schedule: DigestSchedule,
    disk_reads: DiskReads,
    go_live: Arc<GoLive>,
}

impl std::fmt::Debug for FtEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.mode {
            Mode::Replaying(_) => "replaying",
            Mode::Live(_) => "live",
        };
        f.debug_struct("FtEnv").field("mode", &mode).finish()
    }
}

impl FtEnv {
    pub fn new(
        replayer: Replayer<LiveSource>,
        live: LiveWorld,
        mac: Option<[u8; 6]>,
        schedule: DigestSchedule,
        disk_reads: DiskReads,
        go_live: Arc<GoLive>,
    ) -> Self {
        let tap = live.tap_writer().ok().flatten();
        FtEnv {
            mode: Mode::Replaying(Box::new(replayer)),
            live: Some(live),
            tap,
            mac,
            guest_ip: None,
            schedule,
            disk_reads,
            go_live,
        }
    }

    /// A live node's environment (a primary from the start).
    pub fn new_live(
        recorder: Recorder<QueueSink>,
        tap: Option<TapWriter>,
        mac: Option<[u8; 6]>,
        schedule: DigestSchedule,
        disk_reads: DiskReads,
        go_live: Arc<GoLive>,
    ) -> Self {
        let env = FtEnv {
            mode: Mode::Live(Box::new(recorder)),
            live: None,
            tap,
            mac,
            guest_ip: None,
            schedule,
            disk_reads,
            go_live,
        };
        // The service may have run on the other site last: move its MAC
        // here before the guest's first reply (switches learn from frames).
        env.announce();
        env
    }

    /// The replayer's checks so far: (digests, exits whose output was checked).
    pub fn checks(&self) -> Option<(u64, u64)> {
        match &self.mode {
            Mode::Replaying(r) => Some((r.digests_checked, r.outputs_checked)),
            _ => None,
        }
    }

    pub fn is_live(&self) -> bool {
        matches!(self.mode, Mode::Live(_))
    }

    fn env(&mut self) -> &mut dyn Environment {
        match &mut self.mode {
            Mode::Replaying(r) => r.as_mut(),
            Mode::Live(r) => r.as_mut(),
        }
    }

    /// Switches to the live world before exit `ordinal`.
    fn switch(&mut self, ordinal: u64, plan: LivePlan) -> Result<(), EnvError> {
        let Mode::Replaying(replayer) = &self.mode else {
            return Ok(());
        };
        let last_clock = replayer.last_clock_ns();
        let mut live = self.live.take().ok_or(EnvError::Interrupted { ordinal })?;
        live.continue_clock_from(last_clock);
        let dropped = live.discard_received();
        if let Some(g) = plan.gate {
            live.set_output(Box::new(g));
        }
        self.announce();
        {
            let mut r = self.go_live.lock_report();
            r.live = Some((ordinal, Instant::now()));
            r.dropped_rx_frames = dropped;
        }
        tracing::warn!(
            exit = ordinal,
            epoch = plan.epoch,
            clock_ns = last_clock,
            dropped_rx_frames = dropped,
            "LIVE: the machine left replay and runs on the live world"
        );
        self.mode = Mode::Live(Box::new(Recorder::new(
            live,
            plan.sink,
            self.schedule,
            self.disk_reads,
        )));
        Ok(())
    }

    /// Back to replay before exit `ordinal` (the old primary of a switchover).
    fn become_backup(&mut self, ordinal: u64, plan: BackupPlan) {
        let replay = Mode::Replaying(Box::new(Replayer::new(plan.source)));
        if let Mode::Live(rec) = std::mem::replace(&mut self.mode, replay) {
            let (world, _sink) = rec.into_parts();
            self.live = Some(world);
        }
        tracing::warn!(
            exit = ordinal,
            "BACKUP: the machine replays the new primary's log from this exit"
        );
    }

    /// Gratuitous ARP for the guest's address (learned from its own frames),
    /// or RARP from its MAC: either moves the MAC to this site's port.
    fn announce(&self) {
        let (Some(tap), Some(mac)) = (&self.tap, self.mac) else {
            return;
        };
        let frame = match self.guest_ip {
            Some(ip) => garp(mac, ip),
            None => rarp(mac),
        };
        for _ in 0..3 {
            tap.send(&frame);
        }
        tracing::warn!(
            ip = ?self.guest_ip,
            mac = %format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]),
            "announced the guest's MAC on this site's network"
        );
    }

    /// Remembers the guest's IPv4 address from a frame it sends.
    fn learn_ip(&mut self, frame: &[u8]) {
        if frame.len() < 14 {
            return;
        }
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        let ip = match ethertype {
            0x0800 if frame.len() >= 34 => {
                Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29])
            }
            0x0806 if frame.len() >= 42 => {
                Ipv4Addr::new(frame[28], frame[29], frame[30], frame[31])
            }
            _ => return,
        };
        if !ip.is_unspecified() {
            self.guest_ip = Some(ip);
        }
    }
}

/// An Ethernet broadcast ARP request announcing `ip` at `mac`.
pub fn garp(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip.octets());
    f.resize(60, 0);
    f
}

/// A RARP request from `mac` (what hypervisors send after moving a VM).
pub fn rarp(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x80, 0x35]); // RARP
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 3]); // request reverse
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}

impl Environment for FtEnv {
    fn exit(&mut self, ordinal: u64, point: &ExitPoint) -> Result<u64, EnvError> {
        if matches!(self.mode, Mode::Live(_)) {
            if let Some(plan) = self.go_live.take_backup_plan() {
                self.become_backup(ordinal, plan);
            }
        }
        if let Mode::Replaying(r) = &mut self.mode {
            match r.exit(ordinal, point) {
                Err(EnvError::LogEnded { .. }) => {
                    let Some(plan) = self.go_live.take_plan() else {
                        return Err(EnvError::LogEnded { ordinal });
                    };
                    self.switch(ordinal, plan)?;
                }
                other => return other,
            }
        }
        self.env().exit(ordinal, point)
    }
    fn entropy(&mut self, buf: &mut [u8]) -> Result<(), EnvError> {
        self.env().entropy(buf)
    }
    fn wait(&mut self, deadline_ns: u64, gather: Gather) -> Result<WaitOutcome, EnvError> {
        self.env().wait(deadline_ns, gather)
    }
    fn net_rx(&mut self) -> Result<Option<Vec<u8>>, EnvError> {
        self.env().net_rx()
    }
    fn net_tx(&mut self, frame: &[u8]) -> Result<(), EnvError> {
        match self.mode {
            Mode::Replaying(_) => self.learn_ip(frame),
            Mode::Live(_) => {
                let mut r = self.go_live.lock_report();
                if r.first_frame.is_none() {
                    r.first_frame = Some(Instant::now());
                }
            }
        }
        self.env().net_tx(frame)
    }
    fn disk_read(
        &mut self,
        offset: u64,
        buf: &mut [u8],
        local: LocalRead<'_>,
    ) -> Result<(), EnvError> {
        self.env().disk_read(offset, buf, local)
    }
    fn exit_done(&mut self) -> Result<(), EnvError> {
        self.env().exit_done()
    }
    fn digest_due(&mut self, ordinal: u64) -> Result<Option<DigestDue>, EnvError> {
        self.env().digest_due(ordinal)
    }
    fn digest_taken(
        &mut self,
        ordinal: u64,
        full: bool,
        pages: &[PageRun],
        hash: [u8; 32],
    ) -> Result<(), EnvError> {
        self.env().digest_taken(ordinal, full, pages, hash)
    }
    fn stopped_at(&mut self, ordinal: u64) -> Result<bool, EnvError> {
        self.env().stopped_at(ordinal)
    }
    fn finish(
        &mut self,
        ordinal: u64,
        outcome: &Outcome,
        digest: [u8; 32],
    ) -> Result<(), EnvError> {
        self.env().finish(ordinal, outcome, digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_carry_the_mac_and_address() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let g = garp(mac, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(g.len(), 60);
        assert_eq!(&g[6..12], &mac);
        assert_eq!(&g[12..14], &[0x08, 0x06]);
        assert_eq!(&g[28..32], &[10, 0, 2, 15]);
        assert_eq!(&g[38..42], &[10, 0, 2, 15]);
        let r = rarp(mac);
        assert_eq!(&r[12..14], &[0x80, 0x35]);
        assert_eq!(&r[32..38], &mac);
    }
}

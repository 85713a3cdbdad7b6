//! One node of a pair, from start to stop: reads its durable state, asks
//! the witness (primary) or the primary (backup) what it is, builds the
//! parts for that role around the same [`Machine`], and runs it; watches its
//! peer and, when the failure detector says so, claims the next epoch and
//! goes live (backup), goes solo (primary) or fences itself (the loser).
//!
//! The main thread coordinates through one event channel (signals, the
//! vCPU's end, witness answers, admin commands, and a tick for the failure
//! detector); the vCPU runs on its own thread; QUIC, the admin endpoint and
//! the witness client run on a small tokio runtime.
//!
//! Restart rules (DESIGN.md 6, docs/runbook.md): a node never goes live on
//! stored state. A stored fence stays. A node that already ran as primary
//! or backup lost its guest state with its process, so it fences itself
//! and can only come back through re-protection; `--primary --cold-start`
//! starts the service again from this node's disk after the whole pair was
//! lost, claiming the next epoch from wherever the witness is.

use super::channel::{
    open_endpoint, quic_options, BackupChannel, ChannelError, ChannelSettings, LinkState,
    PrimaryChannel,
};
use super::failure_detector::{FailureDetector, Verdict};
use super::go_live::{FtEnv, GoLive, LivePlan};
use super::log_queue::{LogQueue, QueueSink, Retention};
use super::node_state::{NodeState, NodeStateError, StoredRole};
use super::output_gate::{GateMode, OutputGate};
use super::pairing::Identity;
use super::proto::{Control, CLOSE_SHUTDOWN};
use super::replay_queue::ReplayQueue;
use super::role::{Event, Role, RoleCell};
use super::status::{Divergence, FailoverReport, StatusSources};
use super::witness::{claim, ClaimResult};
use crate::admin::AdminCommand;
use crate::devices::console::Console;
use crate::machine::{Machine, MachineError, RunSummary};
use crate::replay::env::{EnvError, Environment};
use crate::replay::live::{LiveWorld, Waker};
use crate::replay::log::{DiskReads, LogHeader};
use crate::replay::recorder::{DigestSchedule, Recorder};
use crate::replay::replayer::Replayer;
use crate::vstate::vcpu::VcpuControl;
use ftvm_config::appliance::{ApplianceConfig, DiskReadsMode, FtConfig};
use ftvm_transport::quic::TlsFiles;
use ftvm_transport::quinn;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often the node looks at its failure detector.
const TICK: Duration = Duration::from_millis(50);

/// How this node was asked to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAs {
    /// `--primary`: claim the pair's first epoch and run the guest.
    /// `cold_start`: the whole pair was lost; claim the epoch after the
    /// witness's current one and run from this node's disk.
    Primary { cold_start: bool },
    /// Default: pair with the configured peer as its backup.
    Backup,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("starting the node's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    State(#[from] NodeStateError),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    #[error("witness client: {0}")]
    Witness(#[from] ftvm_witness::ClientError),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Setup(String),
}

/// How a node's run ended.
#[derive(Debug)]
pub enum NodeOutcome {
    /// The machine ended (primary), or replay reached the end of the
    /// primary's log (backup). `role` is the role the node ended in.
    Finished {
        role: Role,
        summary: RunSummary,
        disk_root: Option<[u8; 32]>,
    },
    /// Stopped by a signal before the machine ended.
    Stopped,
    /// The node stopped being a valid copy or lost the epoch; it stayed up
    /// reporting that until it was stopped.
    Fenced(String),
}

enum NodeEvent {
    Signal(i32),
    MachineDone(Result<RunSummary, MachineError>),
    Claimed(ClaimResult),
    Command(AdminCommand, mpsc::Sender<Result<String, String>>),
}

/// Everything the node's parts share.
struct Node {
    cfg: ApplianceConfig,
    ft: FtConfig,
    rt: tokio::runtime::Runtime,
    state: NodeState,
    role: RoleCell,
    link: Arc<LinkState>,
    status: Arc<StatusSources>,
    settings: ChannelSettings,
    endpoint: quinn::Endpoint,
    events: mpsc::Receiver<NodeEvent>,
    events_tx: mpsc::Sender<NodeEvent>,
    /// One witness client for the node's life: its connection is kept warm
    /// by status polls, so a claim costs a request, not a handshake.
    witness: Arc<dyn ftvm_witness::WitnessBackend>,
    /// Tells the tokio tasks the node is stopping.
    stop_tx: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
}

/// The parts of a live node (a primary, or a backup that went live).
struct Live {
    queue: Arc<LogQueue>,
    gate: Option<OutputGate>,
    channel: Arc<PrimaryChannel>,
    detector: FailureDetector,
    claiming: bool,
}

fn disk_reads(mode: DiskReadsMode) -> DiskReads {
    match mode {
        DiskReadsMode::Ship => DiskReads::Ship,
        DiskReadsMode::BackupReads => DiskReads::BackupReads,
    }
}

/// Runs this node of the pair described by `cfg` until it is stopped.
pub fn run(
    cfg: &ApplianceConfig,
    start: StartAs,
    console: Console,
) -> Result<NodeOutcome, NodeError> {
    let ft = cfg
        .ft
        .clone()
        .ok_or_else(|| NodeError::Setup(format!("{}: no [ft] section", cfg.source.display())))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ftvm-net")
        .enable_all()
        .build()
        .map_err(NodeError::Runtime)?;
    let state = NodeState::open(&ft.state_dir, &ft.cluster)?;
    let role = RoleCell::new(state.record().epoch);
    let link = Arc::new(LinkState::default());
    let reads = disk_reads(ft.disk_reads);
    let status = StatusSources::new(
        &ft.node,
        &ft.cluster,
        &ft.peer.name,
        reads,
        role.clone(),
        link.clone(),
    );
    let settings = ChannelSettings {
        me: Identity {
            node: ft.node.clone(),
            cluster: ft.cluster.clone(),
            peer: ft.peer.name.clone(),
            disk_reads: reads,
        },
        peer_address: ft.peer.address.clone(),
        listen: ft.listen,
        tls: TlsFiles {
            ca: ft.ca.clone(),
            cert: ft.cert.clone(),
            key: ft.key.clone(),
        },
        quic: quic_options(&ft),
        heartbeat: Duration::from_millis(ft.heartbeat_ms),
    };
    let (events_tx, events) = mpsc::channel();
    let commands = events_tx.clone();
    status.set_commands(Box::new(move |cmd| {
        let (tx, rx) = mpsc::channel();
        commands
            .send(NodeEvent::Command(cmd, tx))
            .map_err(|_| "the node is stopping".to_string())?;
        rx.recv_timeout(Duration::from_secs(30))
            .map_err(|_| "the node did not answer".to_string())?
    }));
    rt.block_on(crate::admin::start(ft.admin, status.clone()))?;
    forward_signals(events_tx.clone())?;
    let endpoint = {
        let _g = rt.enter();
        open_endpoint(&settings)?
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let witness: Arc<dyn ftvm_witness::WitnessBackend> = Arc::from(witness_client(cfg, &ft, &rt)?);
    rt.spawn(poll_witness(
        witness.clone(),
        status.clone(),
        stop_rx.clone(),
    ));
    let mut node = Node {
        cfg: cfg.clone(),
        ft,
        rt,
        state,
        role,
        link,
        status,
        settings,
        endpoint,
        events,
        events_tx,
        witness,
        stop_tx,
        stop_rx,
    };
    let rec = node.state.record().clone();
    if let Some(reason) = rec.fenced.clone() {
        if start != (StartAs::Primary { cold_start: true }) {
            node.role.apply_quiet(Event::Fence {
                reason: format!("stored fence: {reason}"),
            });
            return node.stay_fenced(reason);
        }
    }
    match (start, rec.role) {
        (StartAs::Primary { cold_start: true }, _) => {
            let epoch = match node.cold_start()? {
                Some(e) => e,
                None => return Ok(NodeOutcome::Stopped),
            };
            let machine = Machine::new(cfg, console)?;
            node.run_primary(machine, epoch)
        }
        (StartAs::Primary { .. }, StoredRole::None) if rec.epoch == 0 => {
            let epoch = match node.first_claim()? {
                Some(e) => e,
                None => return Ok(NodeOutcome::Stopped),
            };
            let machine = Machine::new(cfg, console)?;
            node.run_primary(machine, epoch)
        }
        (StartAs::Backup, StoredRole::None) => {
            let machine = Machine::new(cfg, console)?;
            node.run_backup(machine)
        }
        (_, was) => {
            let reason = format!(
                "this node restarted after running as {was:?} in epoch {}: its guest's state ended with its process, so it must not go live or replay again; it can only return as a backup through re-protection (or, if the whole pair was lost, start again with --primary --cold-start)",
                rec.epoch
            );
            node.fence(&reason)?;
            node.stay_fenced(reason)
        }
    }
}

fn witness_client(
    cfg: &ApplianceConfig,
    ft: &FtConfig,
    rt: &tokio::runtime::Runtime,
) -> Result<Box<dyn ftvm_witness::WitnessBackend>, NodeError> {
    let mut w = cfg
        .witness
        .clone()
        .ok_or_else(|| NodeError::Setup(format!("{}: no [witness] table", cfg.source.display())))?;
    w.cluster.get_or_insert_with(|| ft.cluster.clone());
    let _guard = rt.enter();
    Ok(ftvm_witness::from_config(&w)?)
}

/// Asks the witness for the cluster's state every second: keeps the
/// connection warm for a claim and tells status whether it answers.
async fn poll_witness(
    witness: Arc<dyn ftvm_witness::WitnessBackend>,
    status: Arc<StatusSources>,
    mut stop: watch::Receiver<bool>,
) {
    let mut t = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = t.tick() => {}
            _ = stop.changed() => {
                if *stop.borrow() {
                    return;
                }
            }
        }
        let answer = witness.status().await.map(|s| (s.epoch, s.holder));
        status.note_witness(answer.map_err(|e| e.to_string()));
    }
}

fn forward_signals(tx: mpsc::Sender<NodeEvent>) -> Result<(), NodeError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| NodeError::Setup(format!("installing SIGINT/SIGTERM handlers: {e}")))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if tx.send(NodeEvent::Signal(sig)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| NodeError::Setup(format!("starting the signal thread: {e}")))?;
    Ok(())
}

/// Starts `machine` on its own thread with `env`; reports to `events`.
fn spawn_vcpu<E: Environment + Send + 'static>(
    mut machine: Machine,
    mut env: E,
    control: Arc<VcpuControl>,
    events: mpsc::Sender<NodeEvent>,
) -> Result<std::thread::JoinHandle<(Machine, E)>, NodeError> {
    std::thread::Builder::new()
        .name("vcpu0".into())
        .spawn(move || {
            let r = machine.run(&mut env, &control);
            let _ = events.send(NodeEvent::MachineDone(r));
            (machine, env)
        })
        .map_err(|e| NodeError::Setup(format!("starting the vCPU thread: {e}")))
}

/// Asks the vCPU to stop at its next exit, kicking it until it has.
fn stop_vcpu(control: &Arc<VcpuControl>, waker: &Waker) {
    control.stop();
    waker.stop();
    let c = control.clone();
    std::thread::spawn(move || c.kick_until_finished(Duration::from_millis(20)));
}

impl Node {
    fn live_world(&self) -> Result<LiveWorld, NodeError> {
        let mut live = LiveWorld::new().map_err(|e| NodeError::Setup(e.to_string()))?;
        if let Some(net) = &self.cfg.net {
            live.attach_tap(&net.tap).map_err(|e| {
                NodeError::Setup(format!("{}: key `net.tap`: {e}", self.cfg.source.display()))
            })?;
        }
        Ok(live)
    }

    fn schedule(&self) -> DigestSchedule {
        DigestSchedule {
            interval: self.cfg.replay.digest_interval,
            full_every: self.cfg.replay.full_digest_every,
        }
    }

    fn capacity(&self) -> usize {
        (self.ft.log_buffer_mib as usize) << 20
    }

    /// Records that this node is fenced, durably, and why.
    fn fence(&mut self, reason: &str) -> Result<(), NodeError> {
        tracing::error!(%reason, "FENCED: this node emits nothing more and needs re-protection");
        self.state.update(|r| r.fenced = Some(reason.to_string()))?;
        self.role.apply_quiet(Event::Fence {
            reason: reason.to_string(),
        });
        Ok(())
    }

    /// Reports the fence until a signal stops the process.
    fn stay_fenced(&mut self, reason: String) -> Result<NodeOutcome, NodeError> {
        let _ = self.stop_tx.send(true);
        loop {
            match self.events.recv() {
                Ok(NodeEvent::Signal(_)) | Err(_) => return Ok(NodeOutcome::Fenced(reason)),
                Ok(NodeEvent::Command(_, reply)) => {
                    let _ = reply.send(Err(format!("this node is fenced: {reason}")));
                }
                Ok(_) => {}
            }
        }
    }

    /// Claims `epoch_seen + 1` in the background; the answer comes back as
    /// an event.
    fn spawn_claim(&self, epoch_seen: u64, why: String) -> Result<(), NodeError> {
        let witness = self.witness.clone();
        let tx = self.events_tx.clone();
        let mut stop = self.stop_rx.clone();
        self.rt.spawn(async move {
            let r = claim(witness.as_ref(), epoch_seen, &why, &mut stop).await;
            let _ = tx.send(NodeEvent::Claimed(r));
        });
        Ok(())
    }

    /// Waits for a claim's answer; `None` if the node was stopped first.
    fn wait_claim(&mut self) -> Option<ClaimResult> {
        loop {
            match self.events.recv() {
                Ok(NodeEvent::Claimed(r)) => return Some(r),
                Ok(NodeEvent::Signal(_)) | Err(_) => {
                    let _ = self.stop_tx.send(true);
                    return None;
                }
                Ok(NodeEvent::Command(_, reply)) => {
                    let _ = reply.send(Err("the node is starting".into()));
                }
                Ok(NodeEvent::MachineDone(_)) => {}
            }
        }
    }

    /// The pair's first primary: config alone never makes a node live, so
    /// it holds the first epoch before its guest runs.
    fn first_claim(&mut self) -> Result<Option<u64>, NodeError> {
        self.spawn_claim(0, "starting as the pair's first primary".into())?;
        self.settle_start_claim()
    }

    /// After the whole pair was lost: the epoch after the witness's current.
    fn cold_start(&mut self) -> Result<Option<u64>, NodeError> {
        let st = self.rt.block_on(self.witness.status()).map_err(|e| {
            NodeError::Refused(format!("cold start needs the witness's answer: {e}"))
        })?;
        tracing::warn!(
            epoch = st.epoch,
            holder = st.holder.as_deref().unwrap_or("nobody"),
            "COLD START: claiming the epoch after the witness's current one; make sure the other node is not live"
        );
        self.spawn_claim(
            st.epoch,
            "cold start of the pair from this node's disk".into(),
        )?;
        self.settle_start_claim()
    }

    fn settle_start_claim(&mut self) -> Result<Option<u64>, NodeError> {
        match self.wait_claim() {
            Some(ClaimResult::Granted { epoch }) => {
                self.state.update(|r| {
                    r.epoch = epoch;
                    r.role = StoredRole::Primary;
                    r.fenced = None;
                })?;
                let _ = self.role.apply(Event::Granted { epoch });
                Ok(Some(epoch))
            }
            Some(ClaimResult::Denied { holder, epoch }) => {
                let reason = format!(
                    "the witness gave epoch {epoch} to {}; this node must not start as primary",
                    holder.as_deref().unwrap_or("another node")
                );
                self.role.apply_quiet(Event::Denied { holder, epoch });
                Err(NodeError::Refused(reason))
            }
            Some(ClaimResult::Refused(why)) => Err(NodeError::Refused(why)),
            Some(ClaimResult::Stopped) | None => Ok(None),
        }
    }

    fn set_live_status(&self, queue: &Arc<LogQueue>, gate: &Option<OutputGate>) {
        *self.status.log.lock().unwrap_or_else(|p| p.into_inner()) = Some(queue.clone());
        *self.status.gate.lock().unwrap_or_else(|p| p.into_inner()) = gate.clone();
    }

    /// The gate on `live`'s TAP, in `mode`; `None` without a network card.
    fn gate(&self, live: &LiveWorld, mode: GateMode) -> Result<Option<OutputGate>, NodeError> {
        match live
            .tap_writer()
            .map_err(|e| NodeError::Setup(e.to_string()))?
        {
            Some(w) => Ok(Some(OutputGate::new(Box::new(w), mode).map_err(|e| {
                NodeError::Setup(format!("starting the output gate: {e}"))
            })?)),
            None => Ok(None),
        }
    }

    /// The live parts around a log starting at `first_index`: queue, gate
    /// (already in `live` when it has a TAP), channel serving backups.
    fn live_parts(
        &self,
        epoch: u64,
        header: Option<LogHeader>,
        retention: Retention,
        gate: Option<OutputGate>,
    ) -> Live {
        let queue = LogQueue::new(
            epoch,
            1,
            self.capacity(),
            retention,
            Duration::from_millis(self.ft.max_lag_ms),
        );
        let channel = PrimaryChannel::new(
            self.settings.clone(),
            queue.clone(),
            gate.clone(),
            header,
            self.role.clone(),
            self.link.clone(),
        );
        self.rt.spawn(channel.clone().serve(self.endpoint.clone()));
        self.set_live_status(&queue, &gate);
        Live {
            queue,
            gate,
            channel,
            detector: FailureDetector::new(
                self.link.clone(),
                Duration::from_millis(self.ft.failure_timeout_ms),
            )
            .with_first_backup_grace(first_backup_grace(&self.ft)),
            claiming: false,
        }
    }

    fn run_primary(mut self, machine: Machine, epoch: u64) -> Result<NodeOutcome, NodeError> {
        let reads = self.settings.me.disk_reads;
        let header = machine.log_header(reads, &self.ft.cluster, epoch);
        let mut world = self.live_world()?;
        let gate = self.gate(&world, GateMode::Protected)?;
        if let Some(g) = &gate {
            world.set_output(Box::new(g.clone()));
        }
        let mut live = self.live_parts(epoch, Some(header), Retention::ForBackup, gate);
        let waker = world.waker();
        let env = Recorder::new(
            world,
            QueueSink::new(live.queue.clone()),
            self.schedule(),
            reads,
        );
        let control = Arc::new(VcpuControl::new());
        let vcpu = spawn_vcpu(machine, env, control.clone(), self.events_tx.clone())?;
        tracing::info!(node = %self.ft.node, epoch, listen = %self.ft.listen, "primary running; waiting for the backup {}", self.ft.peer.name);
        let end = self.live_loop(&mut live, &control, &waker)?;
        let (machine, _env) = vcpu
            .join()
            .map_err(|_| NodeError::Setup("the vCPU thread panicked".into()))?;
        self.finish_live(end, &live, &machine)
    }

    /// Runs a live node until its machine ends or it is fenced. Returns the
    /// machine's result, or the fence reason.
    fn live_loop(
        &mut self,
        live: &mut Live,
        control: &Arc<VcpuControl>,
        waker: &Waker,
    ) -> Result<LiveEnd, NodeError> {
        loop {
            let ev = match self.events.recv_timeout(TICK) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => {
                    self.live_tick(live)?;
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Ok(LiveEnd::Machine(Err(MachineError::Internal(
                        "event channel closed".into(),
                    ))))
                }
            };
            match ev {
                NodeEvent::Signal(sig) => {
                    tracing::warn!(signal = sig, "stopping the machine at its next exit");
                    live.queue.stopping();
                    stop_vcpu(control, waker);
                }
                NodeEvent::MachineDone(r) => return Ok(LiveEnd::Machine(r)),
                NodeEvent::Claimed(r) => {
                    live.claiming = false;
                    if let Some(reason) = self.solo_claim_answered(live, r)? {
                        // Lost the epoch: nothing may leave, and the guest stops now.
                        if let Some(g) = &live.gate {
                            g.set_mode(GateMode::Closed);
                        }
                        live.queue.stopping();
                        stop_vcpu(control, waker);
                        return Ok(LiveEnd::Fenced(reason));
                    }
                }
                NodeEvent::Command(cmd, reply) => {
                    let _ = reply.send(Err(format!(
                        "{cmd:?}: this node is {}, already live",
                        self.role.role().name()
                    )));
                }
            }
        }
    }

    /// The failure detector's turn on a live node.
    fn live_tick(&mut self, live: &mut Live) -> Result<(), NodeError> {
        let role = self.role.role();
        if role == Role::Solo {
            // A backup that came back and caught up protects the service again.
            let acked = live.queue.acked();
            if live.channel.attached() && acked + 64 >= live.queue.last_index() {
                if let Some(g) = &live.gate {
                    g.set_mode(GateMode::Protected);
                }
                live.queue.set_retention(Retention::ForBackup);
                live.detector.reset();
                let _ = self.role.apply(Event::Paired {
                    peer: self.ft.peer.name.clone(),
                    epoch: live.queue.epoch(),
                });
            }
            return Ok(());
        }
        if role != Role::Primary || live.claiming {
            return Ok(());
        }
        if let Verdict::Failed(why) = live.detector.check_backup(live.queue.last_index()) {
            self.role
                .apply_quiet(Event::PeerFailed { why: why.clone() });
            live.channel.set_accepting(false);
            live.channel
                .close_session(CLOSE_SHUTDOWN, "declared failed");
            live.claiming = true;
            let epoch = self.role.get().epoch;
            self.spawn_claim(epoch, format!("going solo: {why}"))?;
        }
        Ok(())
    }

    /// Acts on the witness's answer to a solo claim; `Some(reason)` when
    /// this node lost the epoch and must fence itself.
    fn solo_claim_answered(
        &mut self,
        live: &mut Live,
        r: ClaimResult,
    ) -> Result<Option<String>, NodeError> {
        match r {
            ClaimResult::Granted { epoch } => {
                self.state.update(|s| {
                    s.epoch = epoch;
                    s.role = StoredRole::Primary;
                })?;
                live.queue.set_epoch(epoch);
                live.queue.set_retention(Retention::BestEffort);
                if let Some(g) = &live.gate {
                    g.set_mode(GateMode::Solo);
                }
                let _ = self.role.apply(Event::Granted { epoch });
                live.channel.set_accepting(true);
                tracing::warn!(epoch, "SOLO: running unprotected; held outputs released");
                Ok(None)
            }
            ClaimResult::Denied { holder, epoch } => {
                let reason = format!(
                    "lost the claim for epoch {epoch}: {} holds it",
                    holder.as_deref().unwrap_or("another node")
                );
                self.role.apply_quiet(Event::Denied { holder, epoch });
                self.fence(&reason)?;
                Ok(Some(reason))
            }
            ClaimResult::Refused(why) => {
                tracing::error!(%why, "the witness refused the claim; staying primary with outputs held");
                live.channel.set_accepting(true);
                Ok(None)
            }
            ClaimResult::Stopped => Ok(None),
        }
    }

    /// After a live node's machine ended: let the backup have the end of
    /// the log, say goodbye, close.
    fn finish_live(
        &mut self,
        end: LiveEnd,
        live: &Live,
        machine: &Machine,
    ) -> Result<NodeOutcome, NodeError> {
        let result = match end {
            LiveEnd::Fenced(reason) => {
                self.rt.block_on(async {
                    live.channel.close_session(CLOSE_SHUTDOWN, "fenced");
                });
                if let Some(g) = &live.gate {
                    g.shutdown();
                }
                return self.stay_fenced(reason);
            }
            LiveEnd::Machine(r) => r,
        };
        if self.role.role() == Role::Primary {
            // The log ends with the machine's end marker: let the backup have
            // it before saying goodbye, so it stops at the same exit.
            let last = live.queue.last_index();
            let grace = Duration::from_millis(self.ft.failure_timeout_ms.max(2500) * 2);
            let deadline = Instant::now() + grace;
            while live.queue.acked() < last && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if live.queue.acked() >= last {
                tracing::info!(last, "the backup has the whole log");
            } else {
                tracing::warn!(
                    last,
                    acked = live.queue.acked(),
                    "the backup did not receive the end of the log within {grace:?}; it will not stop at the same exit"
                );
            }
        }
        let _ = self.stop_tx.send(true);
        let endpoint = self.endpoint.clone();
        self.rt.block_on(async {
            live.channel
                .say_goodbye("the primary's machine ended")
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            live.channel
                .close_session(CLOSE_SHUTDOWN, "primary stopping");
            endpoint.close(CLOSE_SHUTDOWN.into(), b"primary stopping");
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        });
        if let Some(g) = &live.gate {
            g.shutdown();
        }
        let role = self.role.role();
        self.role.apply_quiet(Event::Stop {
            why: "the machine ended".into(),
        });
        let summary = result?;
        Ok(NodeOutcome::Finished {
            role,
            summary,
            disk_root: machine.disk_root(),
        })
    }

    fn run_backup(mut self, machine: Machine) -> Result<NodeOutcome, NodeError> {
        let rec = self.state.record().clone();
        let queue = ReplayQueue::new(1, self.capacity());
        *self.status.replay.lock().unwrap_or_else(|p| p.into_inner()) = Some(queue.clone());
        let channel = BackupChannel::new(
            self.settings.clone(),
            queue.clone(),
            self.role.clone(),
            self.link.clone(),
            machine.shape().clone(),
            machine.disk_root(),
            rec.epoch,
        );
        let (welcome_tx, mut welcome_rx) = tokio::sync::oneshot::channel();
        let (link_stop_tx, link_stop) = watch::channel(false);
        let link_task = self.rt.spawn(channel.clone().run(
            self.endpoint.clone(),
            welcome_tx,
            link_stop,
        ));
        tracing::info!(node = %self.ft.node, peer = %self.ft.peer.name, address = %self.ft.peer.address, "backup starting; dialling the primary");
        // The TAP opens now and stays silent until go-live.
        let world = self.live_world()?;
        let mut tap_for_gate = world
            .tap_writer()
            .map_err(|e| NodeError::Setup(e.to_string()))?;
        let welcome = loop {
            match self.events.recv_timeout(TICK) {
                Ok(NodeEvent::Signal(_)) => {
                    let _ = link_stop_tx.send(true);
                    let _ = self.stop_tx.send(true);
                    return Ok(NodeOutcome::Stopped);
                }
                Ok(NodeEvent::Command(_, reply)) => {
                    let _ = reply.send(Err("not paired yet: nothing to take over".into()));
                }
                _ => {}
            }
            if let Ok(w) = welcome_rx.try_recv() {
                break w;
            }
            if link_task.is_finished() {
                return match self.rt.block_on(link_task) {
                    Ok(Err(e)) => Err(e.into()),
                    _ => Ok(NodeOutcome::Stopped),
                };
            }
        };
        let epoch = welcome.epoch;
        self.state.update(|r| {
            r.epoch = epoch;
            r.role = StoredRole::Backup;
        })?;
        let _ = self.role.apply(Event::Paired {
            peer: welcome.node.clone(),
            epoch,
        });
        let go_live = Arc::new(GoLive::default());
        let waker = world.waker();
        let mac = self.cfg.net.as_ref().and_then(|n| n.mac_bytes());
        let env = FtEnv::new(
            Replayer::new(queue.source()),
            world,
            mac,
            self.schedule(),
            self.settings.me.disk_reads,
            go_live.clone(),
        );
        let control = Arc::new(VcpuControl::new());
        let vcpu = spawn_vcpu(machine, env, control.clone(), self.events_tx.clone())?;
        let detector = FailureDetector::new(
            self.link.clone(),
            Duration::from_millis(self.ft.failure_timeout_ms),
        );

        let mut live: Option<Live> = None;
        let mut claiming = false;
        let end = loop {
            let ev = match self.events.recv_timeout(TICK) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(l) = live.as_mut() {
                        self.live_tick(l)?;
                    } else if self.role.role() == Role::Backup
                        && !claiming
                        && !self.link.goodbye.load(std::sync::atomic::Ordering::Relaxed)
                    {
                        if let Verdict::Failed(why) = detector.check_primary() {
                            // Stop receiving (and acking) before claiming: from
                            // here the old primary can release nothing more.
                            let _ = link_stop_tx.send(true);
                            go_live.note_detected();
                            self.role
                                .apply_quiet(Event::PeerFailed { why: why.clone() });
                            claiming = true;
                            self.spawn_claim(epoch, format!("taking over: {why}"))?;
                        }
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    break BackupEnd::Machine(Err(MachineError::Internal(
                        "event channel closed".into(),
                    )))
                }
            };
            match ev {
                NodeEvent::Signal(sig) => {
                    tracing::warn!(signal = sig, role = self.role.role().name(), "stopping");
                    let _ = link_stop_tx.send(true);
                    let _ = self.stop_tx.send(true);
                    queue.interrupt();
                    if let Some(l) = &live {
                        l.queue.stopping();
                    }
                    stop_vcpu(&control, &waker);
                }
                NodeEvent::MachineDone(r) => break BackupEnd::Machine(r),
                NodeEvent::Claimed(r) if live.is_none() => {
                    claiming = false;
                    match r {
                        ClaimResult::Granted { epoch } => {
                            live = Some(self.go_live(
                                epoch,
                                &go_live,
                                &queue,
                                &mut tap_for_gate,
                                Event::Granted { epoch },
                            )?);
                        }
                        ClaimResult::Denied { holder, epoch } => {
                            let reason = format!(
                                "lost the claim for epoch {epoch}: {} holds it",
                                holder.as_deref().unwrap_or("another node")
                            );
                            self.role.apply_quiet(Event::Denied { holder, epoch });
                            self.fence(&reason)?;
                            queue.interrupt();
                            stop_vcpu(&control, &waker);
                            break BackupEnd::Fenced(reason);
                        }
                        ClaimResult::Refused(why) => {
                            tracing::error!(%why, "the witness refused the claim; NOT going live");
                            let _ = self.role.apply(Event::PeerBack);
                        }
                        ClaimResult::Stopped => {}
                    }
                }
                NodeEvent::Claimed(r) => {
                    if let Some(l) = live.as_mut() {
                        l.claiming = false;
                        if let Some(reason) = self.solo_claim_answered(l, r)? {
                            if let Some(g) = &l.gate {
                                g.set_mode(GateMode::Closed);
                            }
                            stop_vcpu(&control, &waker);
                            break BackupEnd::Fenced(reason);
                        }
                    }
                }
                NodeEvent::Command(AdminCommand::ForceGoLive, reply) => {
                    let role = self.role.role();
                    if live.is_some() || !matches!(role, Role::Backup | Role::GoingLive) {
                        let _ =
                            reply.send(Err(format!("this node is {}, not a backup", role.name())));
                        continue;
                    }
                    let epoch = self.state.record().epoch + 1;
                    tracing::error!(
                        epoch,
                        "FORCED GO-LIVE by an operator, WITHOUT the witness: if the other site is still live, both serve clients and their data diverge"
                    );
                    let _ = link_stop_tx.send(true);
                    go_live.note_detected();
                    live = Some(self.go_live(
                        epoch,
                        &go_live,
                        &queue,
                        &mut tap_for_gate,
                        Event::Forced { epoch },
                    )?);
                    let _ = reply.send(Ok(format!(
                        "going live in epoch {epoch} without the witness"
                    )));
                }
            }
        };
        let (machine, env) = vcpu
            .join()
            .map_err(|_| NodeError::Setup("the vCPU thread panicked".into()))?;
        // A divergence is told to the primary before the link closes.
        if let BackupEnd::Machine(Err(e)) = &end {
            if let Some((ordinal, what)) = e.divergence() {
                self.rt.block_on(channel.tell_primary(Control::Diverged {
                    ordinal,
                    what: what.to_string(),
                }));
            }
        }
        let _ = link_stop_tx.send(true);
        let _ = self
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(2), link_task).await });
        match (end, live) {
            (BackupEnd::Fenced(reason), _) => self.stay_fenced(reason),
            (BackupEnd::Machine(r), Some(l)) => self.finish_live(LiveEnd::Machine(r), &l, &machine),
            (BackupEnd::Machine(r), None) => self.finish_backup(r, &machine, &env),
        }
    }

    /// The witness granted `epoch` (or an operator forced it): order the
    /// switch at the end of the log and become a live node.
    fn go_live(
        &mut self,
        epoch: u64,
        go_live: &Arc<GoLive>,
        queue: &Arc<ReplayQueue>,
        tap: &mut Option<crate::devices::tap::TapWriter>,
        event: Event,
    ) -> Result<Live, NodeError> {
        self.state.update(|r| {
            r.epoch = epoch;
            r.role = StoredRole::Primary;
        })?;
        go_live.note_granted(queue.last_arrival());
        // Until a new backup joins through re-protection, this node runs solo.
        let gate = match tap.take() {
            Some(w) => Some(
                OutputGate::new(Box::new(w), GateMode::Solo)
                    .map_err(|e| NodeError::Setup(format!("starting the output gate: {e}")))?,
            ),
            None => None,
        };
        let live = self.live_parts(epoch, None, Retention::BestEffort, gate.clone());
        go_live.order(LivePlan {
            epoch,
            sink: QueueSink::new(live.queue.clone()),
            gate,
        });
        queue.end_for_go_live();
        let _ = self.role.apply(event);
        *self.status.replay.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.status.set_failover(go_live.clone());
        Ok(live)
    }

    fn finish_backup(
        &mut self,
        r: Result<RunSummary, MachineError>,
        machine: &Machine,
        env: &FtEnv,
    ) -> Result<NodeOutcome, NodeError> {
        let _ = self.stop_tx.send(true);
        match r {
            Ok(summary) => {
                if let Some((digests, outputs)) = env.checks() {
                    tracing::info!(
                        exits = summary.exits,
                        digests,
                        outputs,
                        "replay reached the end of the primary's log"
                    );
                }
                self.role.apply_quiet(Event::Stop {
                    why: "the primary's machine ended".into(),
                });
                Ok(NodeOutcome::Finished {
                    role: Role::Backup,
                    summary,
                    disk_root: machine.disk_root(),
                })
            }
            Err(e) => {
                if let Some((ordinal, what)) = e.divergence() {
                    let report = format!("replay DIVERGED at exit {ordinal}: {what}");
                    self.status.set_divergence(Divergence {
                        ordinal,
                        what: what.to_string(),
                    });
                    self.role.apply_quiet(Event::Diverged {
                        ordinal,
                        what: what.to_string(),
                    });
                    self.state.update(|r| r.fenced = Some(report.clone()))?;
                    tracing::error!(
                        "{report}; this node is no longer a backup (it needs re-protection)"
                    );
                    self.stay_fenced(report)
                } else if matches!(e, MachineError::Env(EnvError::Interrupted { .. })) {
                    self.role.apply_quiet(Event::Stop {
                        why: "backup stopped".into(),
                    });
                    Ok(NodeOutcome::Stopped)
                } else {
                    Err(e.into())
                }
            }
        }
    }
}

/// How a live loop ended.
enum LiveEnd {
    Machine(Result<RunSummary, MachineError>),
    Fenced(String),
}

/// How a backup's loop ended.
enum BackupEnd {
    Machine(Result<RunSummary, MachineError>),
    Fenced(String),
}

/// How long a new primary waits for its first backup before going solo:
/// both sites are usually started together, and a backup boots its own
/// machine before it dials.
pub fn first_backup_grace(ft: &FtConfig) -> Duration {
    Duration::from_millis((ft.failure_timeout_ms * 10).max(20_000))
}

impl From<&GoLive> for FailoverReport {
    fn from(g: &GoLive) -> Self {
        let r = g.report();
        let ms = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
            (Some(a), Some(b)) => Some(b.saturating_duration_since(a).as_secs_f64() * 1e3),
            _ => None,
        };
        FailoverReport {
            live_at_exit: r.live.map(|(o, _)| o),
            detection_to_grant_ms: ms(r.detected, r.granted),
            detection_to_live_ms: ms(r.detected, r.live.map(|(_, t)| t)),
            last_entry_to_first_frame_ms: ms(r.last_entry, r.first_frame),
            dropped_rx_frames: r.dropped_rx_frames,
        }
    }
}

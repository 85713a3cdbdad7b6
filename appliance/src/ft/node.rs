//! One node of a pair, from start to stop: reads its durable state, asks
//! the witness (a first primary) or the primary (a backup) what it is,
//! builds the parts for that role around one [`Machine`] and one vCPU
//! thread, and moves between roles as the pair's life goes: a backup goes
//! live (failover, or a planned switchover), a primary goes solo or becomes
//! the backup of a switchover, the loser of a claim is fenced, and a fenced
//! or restarted node comes back as a backup through re-protection when the
//! live node lets it (DESIGN.md 6 and 8).
//!
//! The main thread coordinates through one event channel (signals, the
//! vCPU's end, witness answers, admin commands, link events, and a tick for
//! the failure detector); the vCPU runs on its own thread for the node's
//! whole life; QUIC, the admin endpoint and the witness client run on a
//! small tokio runtime.
//!
//! Restart rules (docs/runbook.md): a node never goes live on stored state.
//! A node that already ran (or was fenced) lost its guest's state with its
//! process: it reports itself fenced and asks the live node to re-protect
//! it; `--join` asks as an operator (accepted whatever the live node's
//! `ft.reprotect`), and `--primary --cold-start` starts the service again
//! from this node's disk after the whole pair was lost.

use super::channel::{
    open_endpoint, quic_options, BackupChannel, ChannelError, ChannelSettings, JoinPlan, LinkEvent,
    LinkState, Paired, PrimaryChannel,
};
use super::failure_detector::{FailureDetector, Verdict};
use super::go_live::{BackupPlan, FtEnv, GoLive, LivePlan};
use super::log_queue::{LogQueue, QueueSink, Retention};
use super::node_state::{NodeState, NodeStateError, StoredRole};
use super::output_gate::{GateMode, OutputGate};
use super::pairing::Identity;
use super::proto::{Control, JoinRequest, CLOSE_SHUTDOWN};
use super::replay_queue::ReplayQueue;
use super::reprotect::{JoinSource, JoinTarget, SharedProgress};
use super::role::{Event, Role, RoleCell};
use super::status::{Divergence, FailoverReport, StatusSources};
use super::witness::{claim, ClaimResult};
use crate::admin::AdminCommand;
use crate::devices::console::Console;
use crate::devices::tap::{TapError, TapWriter};
use crate::machine::{Machine, MachineError, RunSummary};
use crate::replay::env::EnvError;
use crate::replay::live::{LiveWorld, Waker};
use crate::replay::log::{DiskReads, LogHeader, LOG_FORMAT_VERSION};
use crate::replay::recorder::{DigestSchedule, Recorder};
use crate::replay::replayer::Replayer;
use crate::vstate::layout::PAGE_SIZE;
use crate::vstate::vcpu::VcpuControl;
use ftvm_config::appliance::{ApplianceConfig, DiskReadsMode, FtConfig, Reprotect};
use ftvm_transport::quic::TlsFiles;
use ftvm_transport::quinn;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often the node looks at its failure detector.
/// How long a TAP still held by this node's previous world is waited for.
const TAP_BUSY_WAIT: Duration = Duration::from_secs(10);
const TICK: Duration = Duration::from_millis(50);
/// A fenced node asks the live node to re-protect it at most this often.
const MAX_REJOIN_BACKOFF: Duration = Duration::from_secs(60);

/// How this node was asked to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAs {
    /// `--primary`: claim the pair's first epoch and run the guest.
    /// `cold_start`: the whole pair was lost; claim the epoch after the
    /// witness's current one and run from this node's disk.
    Primary { cold_start: bool },
    /// Default: pair with the configured peer as its backup. `join`: an
    /// operator asks for re-protection (`--join`).
    Backup { join: bool },
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
    Link(LinkEvent),
    /// A backup link's first pairing (or why there was none).
    Paired(Result<Paired, ChannelError>),
}

/// The parts of a live node (a primary, or a backup that went live).
struct Live {
    queue: Arc<LogQueue>,
    gate: Option<OutputGate>,
    channel: Arc<PrimaryChannel>,
    detector: FailureDetector,
    claiming: bool,
}

/// A planned switchover seen from the backup: the primary stopped at exit
/// `ordinal` after entry `last_index`.
#[derive(Debug, Clone, Copy)]
struct Switch {
    ordinal: u64,
    last_index: u64,
    disk_root: Option<[u8; 32]>,
}

/// The parts of a backup.
struct Follower {
    queue: Arc<ReplayQueue>,
    channel: Arc<BackupChannel>,
    shape: crate::replay::log::MachineShape,
    link_task: tokio::task::JoinHandle<Result<(), ChannelError>>,
    link_stop: watch::Sender<bool>,
    detector: FailureDetector,
    claiming: bool,
    switch: Option<Switch>,
}

enum Parts {
    Live(Live),
    Follower(Follower),
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
    /// The primary channel that answers incoming backups now, if live.
    serving: Arc<Mutex<Option<Arc<PrimaryChannel>>>>,
    events: mpsc::Receiver<NodeEvent>,
    events_tx: mpsc::Sender<NodeEvent>,
    /// One witness client for the node's life: its connection is kept warm
    /// by status polls, so a claim costs a request, not a handshake.
    witness: Arc<dyn ftvm_witness::WitnessBackend>,
    /// Tells the node's tokio tasks (witness polls, claims) that the node
    /// has ended: sent once, when the node is dropped. A fence is not an
    /// end: a fenced node runs on as a follower and may claim again.
    stop_tx: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
    progress: SharedProgress,
    go_live: Arc<GoLive>,
    control: Arc<VcpuControl>,
    waker: Option<Waker>,
    /// What a joining backup is copied from (this node's running machine).
    join_source: Option<JoinSource>,
    /// This node's TAP, for the output gate once it is live.
    tap: Option<TapWriter>,
}

impl Drop for Node {
    fn drop(&mut self) {
        // The node's life ended (whichever path): its tasks end with it,
        // and a claim still retrying gives up.
        let _ = self.stop_tx.send(true);
    }
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
    let progress = SharedProgress::default();
    status.set_reprotect(progress.clone());
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
        rx.recv_timeout(Duration::from_secs(60))
            .map_err(|_| "the node did not answer".to_string())?
    }));
    rt.block_on(crate::admin::start(ft.admin, status.clone()))?;
    forward_signals(events_tx.clone())?;
    let endpoint = {
        let _g = rt.enter();
        open_endpoint(&settings)?
    };
    let serving: Arc<Mutex<Option<Arc<PrimaryChannel>>>> = Arc::default();
    rt.spawn(accept_backups(endpoint.clone(), serving.clone()));
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
        serving,
        events,
        events_tx,
        witness,
        stop_tx,
        stop_rx,
        progress,
        go_live: Arc::new(GoLive::default()),
        control: Arc::new(VcpuControl::new()),
        waker: None,
        join_source: None,
        tap: None,
    };
    let rec = node.state.record().clone();
    let ran_before = rec.fenced.is_some() || rec.role != StoredRole::None || rec.epoch != 0;
    match start {
        StartAs::Primary { cold_start: true } => {
            let Some(epoch) = node.cold_start()? else {
                return Ok(NodeOutcome::Stopped);
            };
            let machine = Machine::new(cfg, console)?;
            node.run_live_from_start(machine, epoch)
        }
        StartAs::Primary { cold_start: false } if !ran_before => {
            let Some(epoch) = node.first_claim()? else {
                return Ok(NodeOutcome::Stopped);
            };
            let machine = Machine::new(cfg, console)?;
            node.run_live_from_start(machine, epoch)
        }
        StartAs::Backup { join } if !ran_before => {
            let machine = Machine::new(cfg, console)?;
            let request = if join {
                JoinRequest::Operator
            } else {
                JoinRequest::IfAllowed
            };
            node.run_follower(machine, request, None)
        }
        StartAs::Backup { join: true } => {
            tracing::warn!(
                "--join: this node ran before ({:?} in epoch {}); it returns as a backup through re-protection",
                rec.role,
                rec.epoch
            );
            let machine = Machine::new(cfg, console)?;
            let reason = rec.fenced.clone().unwrap_or_else(|| "restarted".into());
            node.role.apply_quiet(Event::Fence {
                reason: reason.clone(),
            });
            node.run_follower(machine, JoinRequest::Operator, Some(reason))
        }
        _ => {
            let reason = match &rec.fenced {
                Some(r) => format!("stored fence: {r}"),
                None => format!(
                    "this node restarted after running as {:?} in epoch {}: its guest's state ended with its process, so it must not go live or replay again; it can only return as a backup through re-protection (or, if the whole pair was lost, start again with --primary --cold-start)",
                    rec.role, rec.epoch
                ),
            };
            node.fence(&reason)?;
            let machine = Machine::new(cfg, console)?;
            node.run_follower(machine, JoinRequest::IfAllowed, Some(reason))
        }
    }
}

/// Hands each incoming connection to the primary channel serving now.
async fn accept_backups(
    endpoint: quinn::Endpoint,
    serving: Arc<Mutex<Option<Arc<PrimaryChannel>>>>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let current = serving.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match current {
            Some(ch) => {
                tokio::spawn(ch.handle(incoming));
            }
            None => {
                // Not a primary now: the dialler learns it at the handshake.
                incoming.refuse();
            }
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

/// Asks the vCPU to stop at its next exit, kicking it until it has.
fn stop_vcpu(control: &Arc<VcpuControl>, waker: &Option<Waker>) {
    control.stop();
    if let Some(w) = waker {
        w.stop();
    }
    let c = control.clone();
    std::thread::spawn(move || c.kick_until_finished(Duration::from_millis(20)));
}

/// How the main loop ended.
enum LoopEnd {
    Machine(Result<RunSummary, MachineError>),
    Fenced(String),
}

impl Node {
    /// Forgets the parts of a live run (the channel answering backups, the
    /// status's queue and gate, this node's TAP writer) before the next
    /// run opens the TAP again.
    fn release_live_parts(&mut self) {
        *self.serving.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.status.log.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.status.gate.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.tap = None;
    }

    /// Remembers `machine`'s world as the one a joining backup copies from
    /// (this node may go live with it later).
    fn offer_joins(&mut self, machine: &Machine, waker: Waker, reads: DiskReads) {
        self.waker = Some(waker.clone());
        self.join_source = Some(JoinSource::of(
            machine,
            self.control.clone(),
            waker,
            self.disk_cfg(),
            reads,
            &self.ft.cluster,
        ));
    }

    fn live_world(&self) -> Result<LiveWorld, NodeError> {
        let mut live = LiveWorld::new().map_err(|e| NodeError::Setup(e.to_string()))?;
        if let Some(net) = &self.cfg.net {
            // After a role change the previous world's TAP may still be
            // closing (a gate's sender thread lets go of it last): a busy
            // TAP is waited for, briefly.
            let deadline = Instant::now() + TAP_BUSY_WAIT;
            loop {
                match live.attach_tap(&net.tap) {
                    Ok(()) => break,
                    Err(TapError::SetIff { source, .. })
                        if source.raw_os_error() == Some(libc::EBUSY)
                            && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => {
                        return Err(NodeError::Setup(format!(
                            "{}: key `net.tap`: {e}",
                            self.cfg.source.display()
                        )))
                    }
                }
            }
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

    fn mac(&self) -> Option<[u8; 6]> {
        self.cfg.net.as_ref().and_then(|n| n.mac_bytes())
    }

    fn disk_cfg(&self) -> Option<(std::path::PathBuf, u64)> {
        self.cfg
            .disk
            .as_ref()
            .map(|d| (d.path.clone(), d.chunk_size))
    }

    fn detector(&self) -> FailureDetector {
        FailureDetector::new(
            self.link.clone(),
            Duration::from_millis(self.ft.failure_timeout_ms),
        )
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

    /// Claims `epoch_seen + 1` in the background; the answer comes back as
    /// an event.
    fn spawn_claim(&self, epoch_seen: u64, why: String) {
        let witness = self.witness.clone();
        let tx = self.events_tx.clone();
        let mut stop = self.stop_rx.clone();
        self.rt.spawn(async move {
            let r = claim(witness.as_ref(), epoch_seen, &why, &mut stop).await;
            let _ = tx.send(NodeEvent::Claimed(r));
        });
    }

    /// Waits for a claim's answer; `None` if the node was stopped first.
    fn wait_claim(&mut self) -> Option<ClaimResult> {
        loop {
            match self.events.recv() {
                Ok(NodeEvent::Claimed(r)) => return Some(r),
                Ok(NodeEvent::Signal(_)) | Err(_) => return None,
                Ok(NodeEvent::Command(_, reply)) => {
                    let _ = reply.send(Err("the node is starting".into()));
                }
                Ok(_) => {}
            }
        }
    }

    /// The pair's first primary: config alone never makes a node live, so
    /// it holds the first epoch before its guest runs.
    fn first_claim(&mut self) -> Result<Option<u64>, NodeError> {
        self.spawn_claim(0, "starting as the pair's first primary".into());
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
        );
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

    /// Builds the live parts: a log queue from index 1, the gate, and the
    /// primary channel (which then answers incoming backups).
    fn live_parts(
        &mut self,
        epoch: u64,
        header: Option<LogHeader>,
        retention: Retention,
        gate_mode: GateMode,
    ) -> Result<Live, NodeError> {
        // A writer of its own each time this node goes live: a switchover
        // makes a node live, backup and live again on the same TAP.
        let gate = match &self.tap {
            Some(w) => {
                let w = w
                    .try_clone()
                    .map_err(|e| NodeError::Setup(format!("TAP for the output gate: {e}")))?;
                Some(OutputGate::new(Box::new(w), gate_mode))
            }
            None => None,
        };
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
            self.ft.reprotect == Reprotect::Auto,
            self.progress.clone(),
        );
        if let Some(src) = &self.join_source {
            channel.set_join_source(src.clone());
        }
        let tx = self.events_tx.clone();
        channel.set_notifier(Box::new(move |e| {
            let _ = tx.send(NodeEvent::Link(e));
        }));
        *self.serving.lock().unwrap_or_else(|p| p.into_inner()) = Some(channel.clone());
        *self.status.log.lock().unwrap_or_else(|p| p.into_inner()) = Some(queue.clone());
        *self.status.gate.lock().unwrap_or_else(|p| p.into_inner()) = gate.clone();
        Ok(Live {
            queue,
            gate,
            channel,
            detector: self
                .detector()
                .with_first_backup_grace(first_backup_grace(&self.ft)),
            claiming: false,
        })
    }

    /// The pair's first primary, from power-on.
    fn run_live_from_start(
        mut self,
        machine: Machine,
        epoch: u64,
    ) -> Result<NodeOutcome, NodeError> {
        self.control = Arc::new(VcpuControl::new());
        self.go_live = Arc::new(GoLive::default());
        self.release_live_parts();
        let reads = self.settings.me.disk_reads;
        let header = machine.log_header(reads, &self.ft.cluster, epoch);
        let mut world = self.live_world()?;
        self.tap = world
            .tap_writer()
            .map_err(|e| NodeError::Setup(e.to_string()))?;
        let env_tap = world
            .tap_writer()
            .map_err(|e| NodeError::Setup(e.to_string()))?;
        self.offer_joins(&machine, world.waker(), reads);
        let live = self.live_parts(
            epoch,
            Some(header),
            Retention::ForBackup,
            GateMode::Protected,
        )?;
        if let Some(g) = &live.gate {
            world.set_output(Box::new(g.clone()));
        }
        let env = FtEnv::new_live(
            Recorder::new(
                world,
                QueueSink::new(live.queue.clone()),
                self.schedule(),
                reads,
            ),
            env_tap,
            self.mac(),
            self.schedule(),
            reads,
            self.go_live.clone(),
        );
        let vcpu = self.spawn_vcpu(machine, env)?;
        tracing::info!(node = %self.ft.node, epoch, listen = %self.ft.listen, "primary running; waiting for the backup {}", self.ft.peer.name);
        self.main_loop(Parts::Live(live), vcpu)
    }

    fn spawn_vcpu(
        &self,
        mut machine: Machine,
        mut env: FtEnv,
    ) -> Result<std::thread::JoinHandle<(Machine, FtEnv)>, NodeError> {
        let control = self.control.clone();
        let events = self.events_tx.clone();
        std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || {
                let r = machine.run(&mut env, &control);
                let _ = events.send(NodeEvent::MachineDone(r));
                (machine, env)
            })
            .map_err(|e| NodeError::Setup(format!("starting the vCPU thread: {e}")))
    }

    /// Starts a backup link to the peer; its first pairing comes back as an
    /// event.
    fn start_follower(
        &self,
        queue: Arc<ReplayQueue>,
        start: (u64, Option<[u8; 32]>),
        request: JoinRequest,
        target: Option<JoinTarget>,
        shape: crate::replay::log::MachineShape,
    ) -> Follower {
        let (start_ordinal, disk_root) = start;
        let channel = BackupChannel::new(
            self.settings.clone(),
            queue.clone(),
            self.role.clone(),
            self.link.clone(),
            shape.clone(),
            disk_root,
            self.state.record().epoch,
            start_ordinal,
            JoinPlan { request, target },
            self.progress.clone(),
        );
        let tx = self.events_tx.clone();
        channel.set_notifier(Box::new(move |e| {
            let _ = tx.send(NodeEvent::Link(e));
        }));
        let (paired_tx, paired_rx) = tokio::sync::oneshot::channel();
        let (link_stop, link_stop_rx) = watch::channel(false);
        let link_task = self.rt.spawn(channel.clone().run(
            self.endpoint.clone(),
            paired_tx,
            link_stop_rx,
        ));
        let tx = self.events_tx.clone();
        self.rt.spawn(async move {
            if let Ok(p) = paired_rx.await {
                let _ = tx.send(NodeEvent::Paired(Ok(p)));
            }
        });
        *self.status.replay.lock().unwrap_or_else(|p| p.into_inner()) = Some(queue.clone());
        Follower {
            queue,
            channel,
            shape,
            link_task,
            link_stop,
            detector: self.detector(),
            claiming: false,
            switch: None,
        }
    }

    /// A backup: dials the primary, follows its log (from power-on) or is
    /// copied (re-protection), then replays. `fenced`: the node reports
    /// itself fenced until a live node takes it back.
    fn run_follower(
        mut self,
        mut machine: Machine,
        request: JoinRequest,
        fenced: Option<String>,
    ) -> Result<NodeOutcome, NodeError> {
        self.control = Arc::new(VcpuControl::new());
        self.go_live = Arc::new(GoLive::default());
        self.release_live_parts();
        let world = self.live_world()?;
        self.tap = world
            .tap_writer()
            .map_err(|e| NodeError::Setup(e.to_string()))?;
        let target = {
            let (mem, _) = machine.memory();
            JoinTarget {
                mem,
                pages: machine.shape().memory_size / PAGE_SIZE,
                disk: self.disk_cfg(),
            }
        };
        tracing::info!(node = %self.ft.node, peer = %self.ft.peer.name, address = %self.ft.peer.address, "backup starting; dialling the primary");
        let mut backoff = Duration::from_secs(5);
        let (follower, paired) = loop {
            let queue = ReplayQueue::new(1, self.capacity());
            let f = self.start_follower(
                queue,
                (machine.ordinal(), machine.disk_root()),
                request,
                Some(target.clone()),
                machine.shape().clone(),
            );
            match self.wait_paired(&f) {
                Some(Ok(p)) => break (f, p),
                None => {
                    let _ = f.link_stop.send(true);
                    return Ok(match fenced {
                        Some(r) => NodeOutcome::Fenced(r),
                        None => NodeOutcome::Stopped,
                    });
                }
                Some(Err(e)) if fenced.is_some() => {
                    tracing::warn!(error = %e, retry_in_s = backoff.as_secs(), "still fenced: the live node does not take this node back yet");
                    if self.sleep_or_signal(backoff) {
                        return Ok(NodeOutcome::Fenced(fenced.unwrap_or_default()));
                    }
                    backoff = (backoff * 2).min(MAX_REJOIN_BACKOFF);
                }
                Some(Err(e)) => return Err(e.into()),
            }
        };
        let welcome = match paired {
            Paired::Follow(w) => w,
            Paired::Joined { state, welcome } => {
                machine.reopen_disk(&self.cfg)?;
                machine.restore_state(&state)?;
                if machine.disk_root() != welcome.header.disk_root {
                    return Err(NodeError::Refused(
                        "re-protection ended with a disk that differs from the primary's".into(),
                    ));
                }
                tracing::warn!(
                    exit = state.ordinal,
                    "re-protected: this node's machine is the primary's at its cut-over; replaying from there"
                );
                welcome
            }
        };
        let epoch = welcome.epoch;
        self.state.update(|r| {
            r.epoch = epoch;
            r.role = StoredRole::Backup;
            r.fenced = None;
        })?;
        let event = if fenced.is_some() {
            Event::Rejoined {
                peer: welcome.node.clone(),
                epoch,
            }
        } else {
            Event::Paired {
                peer: welcome.node.clone(),
                epoch,
            }
        };
        let _ = self.role.apply(event);
        self.offer_joins(&machine, world.waker(), self.settings.me.disk_reads);
        let env = FtEnv::new(
            Replayer::new(follower.queue.source()),
            world,
            self.mac(),
            self.schedule(),
            self.settings.me.disk_reads,
            self.go_live.clone(),
        );
        let vcpu = self.spawn_vcpu(machine, env)?;
        self.main_loop(Parts::Follower(follower), vcpu)
    }

    /// Waits for a follower's first pairing; `None` on a signal.
    fn wait_paired(&mut self, f: &Follower) -> Option<Result<Paired, ChannelError>> {
        loop {
            match self.events.recv_timeout(TICK) {
                Ok(NodeEvent::Signal(_)) => return None,
                Ok(NodeEvent::Paired(p)) => return Some(p),
                Ok(NodeEvent::Command(_, reply)) => {
                    let _ = reply.send(Err("not paired yet: nothing to take over".into()));
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if f.link_task.is_finished() {
                // The link ended before a pairing: refused (the channel
                // noted why).
                let why = f
                    .channel
                    .link
                    .refused
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                return Some(Err(ChannelError::Refused(
                    why.unwrap_or_else(|| "the link to the primary ended".into()),
                )));
            }
        }
    }

    /// Sleeps `d` unless a signal comes first (true then).
    fn sleep_or_signal(&mut self, d: Duration) -> bool {
        let until = Instant::now() + d;
        while Instant::now() < until {
            match self.events.recv_timeout(TICK) {
                Ok(NodeEvent::Signal(_)) | Err(RecvTimeoutError::Disconnected) => return true,
                Ok(NodeEvent::Command(_, reply)) => {
                    let _ = reply.send(Err("this node is fenced".into()));
                }
                _ => {}
            }
        }
        false
    }

    /// The node's life once its vCPU runs: roles change here.
    fn main_loop(
        mut self,
        mut parts: Parts,
        vcpu: std::thread::JoinHandle<(Machine, FtEnv)>,
    ) -> Result<NodeOutcome, NodeError> {
        let mut stopping = false;
        // The detector's turn comes every TICK, however busy the event
        // channel is: a stream of events must not delay a failover.
        let mut next_tick = Instant::now() + TICK;
        let end = loop {
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + TICK;
                if !stopping {
                    if let Some(reason) = self.tick(&mut parts)? {
                        break LoopEnd::Fenced(reason);
                    }
                }
            }
            let ev = match self
                .events
                .recv_timeout(next_tick.saturating_duration_since(Instant::now()))
            {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    break LoopEnd::Machine(Err(MachineError::Internal(
                        "event channel closed".into(),
                    )))
                }
            };
            match ev {
                NodeEvent::Signal(sig) => {
                    tracing::warn!(
                        signal = sig,
                        role = self.role.role().name(),
                        "stopping at the machine's next exit"
                    );
                    stopping = true;
                    match &parts {
                        Parts::Live(l) => l.queue.stopping(),
                        Parts::Follower(f) => {
                            let _ = f.link_stop.send(true);
                            f.queue.interrupt();
                        }
                    }
                    stop_vcpu(&self.control, &self.waker);
                }
                NodeEvent::MachineDone(r) => break LoopEnd::Machine(r),
                NodeEvent::Claimed(r) => {
                    if let Some(reason) = self.on_claim(&mut parts, r)? {
                        break LoopEnd::Fenced(reason);
                    }
                }
                NodeEvent::Command(cmd, reply) => {
                    let answer = self.on_command(&mut parts, cmd);
                    let _ = reply.send(answer);
                }
                NodeEvent::Link(e) => self.on_link(&mut parts, e)?,
                NodeEvent::Paired(Ok(Paired::Follow(w))) => {
                    // The old primary of a switchover, paired with the new one.
                    self.state.update(|r| {
                        r.epoch = w.epoch;
                        r.role = StoredRole::Backup;
                    })?;
                    tracing::info!(epoch = w.epoch, "following the new primary's log");
                }
                NodeEvent::Paired(_) => {}
            }
        };
        let (machine, env) = vcpu
            .join()
            .map_err(|_| NodeError::Setup("the vCPU thread panicked".into()))?;
        self.finish(end, parts, machine, env)
    }

    /// The failure detector's turn (and a backup's switchover progress).
    /// `Some(reason)`: this node is fenced.
    fn tick(&mut self, parts: &mut Parts) -> Result<Option<String>, NodeError> {
        match parts {
            Parts::Live(live) => {
                self.live_tick(live);
                Ok(None)
            }
            Parts::Follower(f) => {
                if f.claiming || self.role.role() != Role::Backup {
                    return Ok(None);
                }
                if let Some(sw) = f.switch {
                    // A planned switchover: once everything up to the primary's
                    // stop is replayed, this node claims the next epoch.
                    let p = &f.queue.progress;
                    use std::sync::atomic::Ordering::Relaxed;
                    if p.ordinal.load(Relaxed) > sw.ordinal {
                        // The primary gave up waiting and went on: so does
                        // this node, as its backup.
                        tracing::warn!(
                            exit = sw.ordinal,
                            "planned switchover abandoned by the primary; following its log again"
                        );
                        f.switch = None;
                        f.detector.reset();
                        return Ok(None);
                    }
                    if p.ordinal.load(Relaxed) == sw.ordinal
                        && f.queue.received() >= sw.last_index
                        && p.replayed.load(Relaxed) >= sw.last_index
                    {
                        f.claiming = true;
                        self.spawn_claim(
                            self.state.record().epoch,
                            format!("planned switchover at exit {}", sw.ordinal),
                        );
                        return Ok(None);
                    }
                    if let Verdict::Failed(why) = f.detector.check_primary() {
                        // The primary went silent before the handover
                        // completed: an ordinary failover from here.
                        tracing::warn!(%why, "the primary went silent during a planned switchover");
                        f.switch = None;
                    } else {
                        return Ok(None);
                    }
                }
                if self.link.goodbye.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(None);
                }
                if let Verdict::Failed(why) = f.detector.check_primary() {
                    // Stop receiving (and acking) before claiming: from here
                    // the old primary can release nothing more.
                    let _ = f.link_stop.send(true);
                    self.go_live.note_detected();
                    self.role
                        .apply_quiet(Event::PeerFailed { why: why.clone() });
                    f.claiming = true;
                    self.spawn_claim(self.state.record().epoch, format!("taking over: {why}"));
                }
                Ok(None)
            }
        }
    }

    fn live_tick(&mut self, live: &mut Live) {
        let role = self.role.role();
        if role == Role::Solo {
            // A backup that came back (or joined) and caught up protects
            // the service again.
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
            return;
        }
        if role != Role::Primary || live.claiming {
            return;
        }
        if let Verdict::Failed(why) = live.detector.check_backup(live.queue.last_index()) {
            self.drop_backup(live, why);
        }
    }

    /// The backup is declared failed: stop talking to it (no more acks, so
    /// held outputs stay held) and claim the next epoch; granted, this node
    /// runs solo, denied, it fences (`on_claim`).
    fn drop_backup(&mut self, live: &mut Live, why: String) {
        self.role
            .apply_quiet(Event::PeerFailed { why: why.clone() });
        live.channel.set_accepting(false);
        live.channel
            .close_session(CLOSE_SHUTDOWN, "declared failed");
        live.claiming = true;
        self.spawn_claim(self.role.get().epoch, format!("going solo: {why}"));
    }

    /// The witness gave `epoch` to `holder`: the role says so; returns the
    /// fence's reason.
    fn lost_claim(&mut self, holder: Option<String>, epoch: u64) -> String {
        let reason = format!(
            "lost the claim for epoch {epoch}: {} holds it",
            holder.as_deref().unwrap_or("another node")
        );
        self.role.apply_quiet(Event::Denied { holder, epoch });
        reason
    }

    /// Acts on a witness answer. `Some(reason)`: this node lost the epoch.
    fn on_claim(&mut self, parts: &mut Parts, r: ClaimResult) -> Result<Option<String>, NodeError> {
        match parts {
            Parts::Live(live) => {
                live.claiming = false;
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
                        let reason = self.lost_claim(holder, epoch);
                        // Nothing may leave, and the guest stops now.
                        if let Some(g) = &live.gate {
                            g.set_mode(GateMode::Closed);
                        }
                        live.queue.stopping();
                        stop_vcpu(&self.control, &self.waker);
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
            Parts::Follower(f) => {
                f.claiming = false;
                match r {
                    ClaimResult::Granted { epoch } => {
                        let live = match f.switch {
                            Some(sw) => {
                                // Planned switchover: tell the old primary, then
                                // take over from its stopping point.
                                self.rt.block_on(
                                    f.channel.tell_primary(Control::SwitchedOver { epoch }),
                                );
                                let _ = f.link_stop.send(true);
                                let header = LogHeader {
                                    format_version: LOG_FORMAT_VERSION,
                                    shape: f.shape.clone(),
                                    disk_reads: self.settings.me.disk_reads,
                                    disk_root: sw.disk_root,
                                    cluster: self.ft.cluster.clone(),
                                    epoch,
                                    first_index: 1,
                                    start_ordinal: sw.ordinal,
                                };
                                self.go_live(
                                    epoch,
                                    &f.queue,
                                    Some(header),
                                    Event::SwitchedOver { epoch },
                                )?
                            }
                            None => {
                                self.go_live(epoch, &f.queue, None, Event::Granted { epoch })?
                            }
                        };
                        *parts = Parts::Live(live);
                        Ok(None)
                    }
                    ClaimResult::Denied { holder, epoch } => {
                        let reason = self.lost_claim(holder, epoch);
                        let _ = f.link_stop.send(true);
                        f.queue.interrupt();
                        stop_vcpu(&self.control, &self.waker);
                        self.fence(&reason)?;
                        Ok(Some(reason))
                    }
                    ClaimResult::Refused(why) => {
                        tracing::error!(%why, "the witness refused the claim; NOT going live");
                        let _ = self.role.apply(Event::PeerBack);
                        Ok(None)
                    }
                    ClaimResult::Stopped => Ok(None),
                }
            }
        }
    }

    /// The witness granted `epoch` (or an operator forced it, or a planned
    /// switchover): order the switch at the end of the log and become live.
    /// `header`: where a backup can follow this node's log from (after a
    /// switchover, the old primary); `None` after a failover.
    fn go_live(
        &mut self,
        epoch: u64,
        queue: &Arc<ReplayQueue>,
        header: Option<LogHeader>,
        event: Event,
    ) -> Result<Live, NodeError> {
        self.state.update(|r| {
            r.epoch = epoch;
            r.role = StoredRole::Primary;
        })?;
        self.go_live.note_granted(queue.last_arrival());
        // After a failover this node runs solo until a backup joins; after
        // a switchover the old primary follows at once, so outputs wait for it.
        let (retention, mode) = match header {
            Some(_) => (Retention::ForBackup, GateMode::Protected),
            None => (Retention::BestEffort, GateMode::Solo),
        };
        let mut live = self.live_parts(epoch, header, retention, mode)?;
        live.detector.reset();
        self.go_live.order(LivePlan {
            epoch,
            sink: QueueSink::new(live.queue.clone()),
            gate: live.gate.clone(),
        });
        queue.end_for_go_live();
        let _ = self.role.apply(event);
        *self.status.replay.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.status.set_failover(self.go_live.clone());
        Ok(live)
    }

    fn on_command(&mut self, parts: &mut Parts, cmd: AdminCommand) -> Result<String, String> {
        match (cmd, &mut *parts) {
            (AdminCommand::ForceGoLive, Parts::Follower(f)) => {
                let role = self.role.role();
                if !matches!(role, Role::Backup | Role::GoingLive) {
                    return Err(format!("this node is {}, not a backup", role.name()));
                }
                let epoch = self.state.record().epoch + 1;
                tracing::error!(
                    epoch,
                    "FORCED GO-LIVE by an operator, WITHOUT the witness: if the other site is still live, both serve clients and their data diverge"
                );
                let _ = f.link_stop.send(true);
                self.go_live.note_detected();
                let queue = f.queue.clone();
                let live = self
                    .go_live(epoch, &queue, None, Event::Forced { epoch })
                    .map_err(|e| e.to_string())?;
                *parts = Parts::Live(live);
                Ok(format!("going live in epoch {epoch} without the witness"))
            }
            (AdminCommand::ForceGoLive, Parts::Live(_)) => Err(format!(
                "this node is {}, already live",
                self.role.role().name()
            )),
            (AdminCommand::Switchover, Parts::Live(live)) => {
                let (msg, follower) = self.switchover(live)?;
                if let Some(g) = &live.gate {
                    g.shutdown();
                }
                *parts = Parts::Follower(follower);
                Ok(msg)
            }
            (AdminCommand::Switchover, Parts::Follower(_)) => Err(format!(
                "this node is the backup; run the switchover on the primary ({})",
                self.ft.peer.name
            )),
        }
    }

    fn on_link(&mut self, parts: &mut Parts, e: LinkEvent) -> Result<(), NodeError> {
        match (e, parts) {
            (
                LinkEvent::SwitchOver {
                    ordinal,
                    last_index,
                    disk_root,
                },
                Parts::Follower(f),
            ) => {
                tracing::warn!(exit = ordinal, last_index, "planned switchover: the primary stopped; replaying to its stop, then taking over");
                f.switch = Some(Switch {
                    ordinal,
                    last_index,
                    disk_root,
                });
            }
            (other, _) => tracing::debug!(event = ?other, "link event not for this role"),
        }
        Ok(())
    }

    /// A planned switchover, run on the primary: the vCPU stops at an exit
    /// boundary, the backup gets the whole log, replays it, claims the next
    /// epoch through the witness and goes live from that exit; this node
    /// then replays the new primary's log as its backup. Its machine and
    /// disk are the new primary's at that exit: no copy is needed.
    fn switchover(&mut self, live: &mut Live) -> Result<(String, Follower), String> {
        if self.role.role() != Role::Primary || !live.channel.attached() {
            return Err(format!(
                "a switchover needs a protected primary with its backup attached; this node is {}{}",
                self.role.role().name(),
                if live.channel.attached() { "" } else { " without a backup" }
            ));
        }
        let started = Instant::now();
        let (state_tx, state_rx) = mpsc::channel();
        let (resume_tx, resume_rx) = mpsc::channel::<()>();
        self.control
            .run_at_boundary(Box::new(move |m: &mut Machine| {
                let _ = state_tx.send((m.ordinal(), m.disk_root(), m.shape().clone()));
                let _ = resume_rx.recv_timeout(Duration::from_secs(120));
            }));
        if let Some(w) = &self.waker {
            w.wake();
        }
        let resume = Resume(Some(resume_tx));
        let (ordinal, disk_root, shape) = state_rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| "the vCPU did not reach an exit boundary".to_string())?;
        // Everything logged must reach the backup before it can take over.
        let last = live.queue.last_index();
        live.queue.urge();
        let deadline = Instant::now() + Duration::from_millis(self.ft.failure_timeout_ms * 3);
        while live.queue.acked() < last {
            if Instant::now() > deadline {
                return Err(format!(
                    "the backup did not ack the log up to {last} in time; switchover abandoned, this node goes on as primary"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // From here the backup may claim the next epoch and go live from
        // this exit: this node may not simply go on in this epoch. If the
        // handover fails it drops the backup and claims the next epoch
        // itself; the witness grants it to one of the two.
        if !self
            .rt
            .block_on(live.channel.tell_backup(Control::SwitchOver {
                ordinal,
                last_index: last,
                disk_root,
            }))
        {
            self.drop_backup(live, "the backup was lost during a switchover".into());
            return Err("the backup is gone: switchover abandoned; this node claims the next epoch to go on solo (if it is denied, the backup is live and this node fences)".into());
        }
        // The backup replays to here, claims the next epoch and says so.
        let wait =
            Duration::from_millis(self.ft.failure_timeout_ms * 5).max(Duration::from_secs(20));
        let until = Instant::now() + wait;
        let epoch = loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.drop_backup(live, "the backup did not take over in a switchover".into());
                return Err("the backup did not take over in time: switchover abandoned; this node claims the next epoch to go on solo (if it is denied, the backup is live and this node fences)".into());
            }
            match self.events.recv_timeout(left.min(TICK)) {
                Ok(NodeEvent::Link(LinkEvent::SwitchedOver { epoch })) => break epoch,
                Ok(NodeEvent::Signal(_)) => {
                    return Err("stopping: switchover abandoned".into());
                }
                Ok(NodeEvent::Command(_, reply)) => {
                    let _ = reply.send(Err("a switchover is under way".into()));
                }
                _ => {}
            }
        };
        // This node is now the backup of the new primary, from this exit.
        if let Some(g) = &live.gate {
            g.set_mode(GateMode::Closed);
        }
        live.channel.set_accepting(false);
        live.channel.close_session(CLOSE_SHUTDOWN, "switched over");
        *self.serving.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.status.log.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.status.gate.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.status.clear_failover();
        self.state
            .update(|r| {
                r.epoch = epoch;
                r.role = StoredRole::Backup;
            })
            .map_err(|e| e.to_string())?;
        let _ = self.role.apply(Event::SwitchedOver { epoch });
        let queue = ReplayQueue::new(1, self.capacity());
        self.go_live.order_backup(BackupPlan {
            source: queue.source(),
        });
        let follower = self.start_follower(
            queue,
            (ordinal, disk_root),
            JoinRequest::IfAllowed,
            None,
            shape,
        );
        drop(resume);
        let pause = started.elapsed();
        Ok((
            format!(
                "switched over at exit {ordinal}: the peer is primary in epoch {epoch}, this node its backup (vCPU stopped {:.0} ms)",
                pause.as_secs_f64() * 1e3
            ),
            follower,
        ))
    }

    fn finish(
        self,
        end: LoopEnd,
        parts: Parts,
        machine: Machine,
        env: FtEnv,
    ) -> Result<NodeOutcome, NodeError> {
        match (end, parts) {
            (LoopEnd::Fenced(reason), parts) => {
                if let Parts::Live(l) = &parts {
                    l.channel.close_session(CLOSE_SHUTDOWN, "fenced");
                    if let Some(g) = &l.gate {
                        g.shutdown();
                    }
                }
                // The environment holds the TAP the next run opens again.
                drop(env);
                drop(parts);
                self.stay_fenced(reason, machine)
            }
            (LoopEnd::Machine(r), Parts::Live(live)) => self.finish_live(r, &live, &machine),
            (LoopEnd::Machine(r), Parts::Follower(f)) => self.finish_follower(r, f, machine, env),
        }
    }

    /// Fenced at run time: reports it, and asks the live node to take this
    /// node back as a backup (re-protection), with the same machine.
    fn stay_fenced(self, reason: String, machine: Machine) -> Result<NodeOutcome, NodeError> {
        self.run_follower(machine, JoinRequest::IfAllowed, Some(reason))
    }

    /// After a live node's machine ended: let the backup have the end of
    /// the log, say goodbye, close.
    fn finish_live(
        self,
        result: Result<RunSummary, MachineError>,
        live: &Live,
        machine: &Machine,
    ) -> Result<NodeOutcome, NodeError> {
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

    fn finish_follower(
        mut self,
        r: Result<RunSummary, MachineError>,
        f: Follower,
        machine: Machine,
        env: FtEnv,
    ) -> Result<NodeOutcome, NodeError> {
        // A divergence is told to the primary before the link closes.
        if let Err(e) = &r {
            if let Some((ordinal, what)) = e.divergence() {
                self.rt.block_on(f.channel.tell_primary(Control::Diverged {
                    ordinal,
                    what: what.to_string(),
                }));
            }
        }
        let _ = f.link_stop.send(true);
        let _ = self
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(2), f.link_task).await });
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
                    drop(env);
                    self.stay_fenced(report, machine)
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

/// Lets a parked vCPU go on however the switchover ends.
struct Resume(Option<mpsc::Sender<()>>);

impl Drop for Resume {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
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

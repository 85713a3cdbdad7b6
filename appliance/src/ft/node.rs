//! One node of a pair, from start to stop: reads its durable state, asks
//! the witness (primary) or the primary (backup) what it is, builds the
//! parts for that role around the same [`Machine`], and runs it. The main
//! thread coordinates; the vCPU runs on its own thread; QUIC, the admin
//! endpoint and the witness client run on a small tokio runtime.

use super::channel::{
    open_endpoint, quic_options, BackupChannel, ChannelError, ChannelSettings, LinkState,
    PrimaryChannel,
};
use super::log_queue::{LogQueue, QueueSink, Retention};
use super::node_state::{NodeState, NodeStateError, StoredRole};
use super::output_gate::{GateMode, OutputGate};
use super::pairing::Identity;
use super::proto::{Control, CLOSE_SHUTDOWN};
use super::replay_queue::ReplayQueue;
use super::role::{Event, Role, RoleCell};
use super::status::{Divergence, StatusSources};
use super::witness::{claim, ClaimResult};
use crate::devices::console::Console;
use crate::machine::{Machine, MachineError, RunSummary};
use crate::replay::env::EnvError;
use crate::replay::live::LiveWorld;
use crate::replay::log::DiskReads;
use crate::replay::recorder::{DigestSchedule, Recorder};
use crate::replay::replayer::Replayer;
use crate::vstate::vcpu::VcpuControl;
use ftvm_config::appliance::{ApplianceConfig, DiskReadsMode, FtConfig};
use ftvm_transport::quic::TlsFiles;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How this node was asked to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAs {
    /// `--primary`: claim the pair's first epoch and run the guest.
    Primary,
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
    #[error(
        "this node is fenced ({reason}); it may only return as a backup through re-protection"
    )]
    Fenced { reason: String },
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
}

/// Everything the node's tasks share.
struct Node {
    cfg: ApplianceConfig,
    ft: FtConfig,
    rt: tokio::runtime::Runtime,
    state: NodeState,
    role: RoleCell,
    link: Arc<LinkState>,
    status: Arc<StatusSources>,
    settings: ChannelSettings,
    events: mpsc::Receiver<NodeEvent>,
    events_tx: mpsc::Sender<NodeEvent>,
    stop_tx: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
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
    if let Some(reason) = &state.record().fenced {
        return Err(NodeError::Fenced {
            reason: reason.clone(),
        });
    }
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
    rt.block_on(crate::admin::start(ft.admin, status.clone()))?;
    let (events_tx, events) = mpsc::channel();
    forward_signals(events_tx.clone())?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let node = Node {
        cfg: cfg.clone(),
        ft,
        rt,
        state,
        role,
        link,
        status,
        settings,
        events,
        events_tx,
        stop_tx,
        stop_rx,
    };
    let machine = Machine::new(cfg, console)?;
    match start {
        StartAs::Primary => node.run_primary(machine),
        StartAs::Backup => node.run_backup(machine),
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
fn spawn_vcpu<E: crate::replay::env::Environment + Send + 'static>(
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

    fn witness(&self) -> Result<ftvm_witness::WitnessClient, NodeError> {
        let w = self.cfg.witness.as_ref().ok_or_else(|| {
            NodeError::Setup(format!("{}: no [witness] table", self.cfg.source.display()))
        })?;
        let mut w = w.clone();
        w.cluster.get_or_insert_with(|| self.ft.cluster.clone());
        let _guard = self.rt.enter();
        Ok(ftvm_witness::WitnessClient::from_config(&w)?)
    }

    fn schedule(&self) -> DigestSchedule {
        DigestSchedule {
            interval: self.cfg.replay.digest_interval,
            full_every: self.cfg.replay.full_digest_every,
        }
    }

    /// Waits for a signal, reporting the fence until then.
    fn stay_fenced(&mut self, reason: String) -> Result<NodeOutcome, NodeError> {
        loop {
            match self.events.recv() {
                Ok(NodeEvent::Signal(_)) | Err(_) => return Ok(NodeOutcome::Fenced(reason)),
                Ok(NodeEvent::MachineDone(_)) => {}
            }
        }
    }

    fn run_primary(mut self, machine: Machine) -> Result<NodeOutcome, NodeError> {
        let rec = self.state.record().clone();
        if rec.role != StoredRole::None || rec.epoch != 0 {
            return Err(NodeError::Refused(format!(
                "{}: this node already ran in epoch {} as {:?}; a pair starts from a node state that never ran (restart rules are in docs/runbook.md)",
                self.state.path().display(),
                rec.epoch,
                rec.role
            )));
        }
        // Config alone never makes a node live: hold the first epoch first.
        let witness = self.witness()?;
        let mut stop = self.stop_rx.clone();
        let tx = self.stop_tx.clone();
        let outcome = self.rt.block_on(async {
            tokio::select! {
                r = claim(&witness, rec.epoch, "starting as the pair's first primary", &mut stop) => r,
                _ = wait_signal(&self.events) => { let _ = tx.send(true); ClaimResult::Stopped }
            }
        });
        let epoch = match outcome {
            ClaimResult::Granted { epoch } => epoch,
            ClaimResult::Denied { holder, epoch } => {
                let reason = format!(
                    "the witness gave epoch {epoch} to {}; this node must not start as primary",
                    holder.as_deref().unwrap_or("another node")
                );
                let _ = self.role.apply(Event::Denied { holder, epoch });
                return Err(NodeError::Refused(reason));
            }
            ClaimResult::Refused(why) => return Err(NodeError::Refused(why)),
            ClaimResult::Stopped => return Ok(NodeOutcome::Stopped),
        };
        self.state.update(|r| {
            r.epoch = epoch;
            r.role = StoredRole::Primary;
        })?;
        let _ = self.role.apply(Event::Granted { epoch });

        let reads = self.settings.me.disk_reads;
        let header = machine.log_header(reads, &self.ft.cluster, epoch);
        let queue = LogQueue::new(
            epoch,
            header.first_index,
            (self.ft.log_buffer_mib as usize) << 20,
            Retention::ForBackup,
            Duration::from_millis(self.ft.max_lag_ms),
        );
        let mut live = self.live_world()?;
        let gate = match live
            .tap_writer()
            .map_err(|e| NodeError::Setup(e.to_string()))?
        {
            Some(w) => Some(
                OutputGate::new(Box::new(w), GateMode::Protected)
                    .map_err(|e| NodeError::Setup(format!("starting the output gate: {e}")))?,
            ),
            None => None,
        };
        if let Some(g) = &gate {
            live.set_output(Box::new(g.clone()));
        }
        *self.status.log.lock().unwrap_or_else(|p| p.into_inner()) = Some(queue.clone());
        *self.status.gate.lock().unwrap_or_else(|p| p.into_inner()) = gate.clone();
        let endpoint = {
            let _g = self.rt.enter();
            open_endpoint(&self.settings)?
        };
        let channel = PrimaryChannel::new(
            self.settings.clone(),
            queue.clone(),
            gate.clone(),
            header,
            self.role.clone(),
            self.link.clone(),
        );
        self.rt.spawn(channel.clone().serve(endpoint.clone()));
        let waker = live.waker();
        let env = Recorder::new(live, QueueSink::new(queue.clone()), self.schedule(), reads);
        let control = Arc::new(VcpuControl::new());
        let vcpu = spawn_vcpu(machine, env, control.clone(), self.events_tx.clone())?;
        tracing::info!(node = %self.ft.node, epoch, listen = %self.ft.listen, "primary running; waiting for the backup {}", self.ft.peer.name);

        let result = loop {
            match self.events.recv() {
                Ok(NodeEvent::Signal(sig)) => {
                    tracing::warn!(signal = sig, "stopping the machine at its next exit");
                    queue.stopping();
                    control.stop();
                    waker.stop();
                    let c = control.clone();
                    std::thread::spawn(move || c.kick_until_finished(Duration::from_millis(20)));
                }
                Ok(NodeEvent::MachineDone(r)) => break r,
                Err(_) => break Err(MachineError::Internal("event channel closed".into())),
            }
        };
        let (machine, _env) = vcpu
            .join()
            .map_err(|_| NodeError::Setup("the vCPU thread panicked".into()))?;
        // The log ends with the machine's end marker: let the backup have it
        // before saying goodbye, so it stops at the same exit. A backup that
        // is still catching up gets a while; one that never came, less.
        let last = queue.last_index();
        let grace = Duration::from_millis(self.ft.failure_timeout_ms.max(2500) * 2);
        let deadline = Instant::now() + grace;
        while queue.acked() < last && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if queue.acked() >= last {
            tracing::info!(last, "the backup has the whole log");
        } else {
            tracing::warn!(
                last,
                acked = queue.acked(),
                "the backup did not receive the end of the log within {grace:?}; it will not stop at the same exit"
            );
        }
        self.rt.block_on(async {
            channel.say_goodbye("the primary's machine ended").await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            channel.close_session(CLOSE_SHUTDOWN, "primary stopping");
            endpoint.close(CLOSE_SHUTDOWN.into(), b"primary stopping");
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        });
        if let Some(g) = &gate {
            g.shutdown();
        }
        let _ = self.role.apply(Event::Stop {
            why: "the machine ended".into(),
        });
        let summary = result?;
        Ok(NodeOutcome::Finished {
            role: Role::Primary,
            summary,
            disk_root: machine.disk_root(),
        })
    }

    fn run_backup(self, machine: Machine) -> Result<NodeOutcome, NodeError> {
        let rec = self.state.record().clone();
        if rec.role == StoredRole::Primary {
            return Err(NodeError::Refused(format!(
                "{}: this node was the primary in epoch {}; it may only return as a backup through re-protection",
                self.state.path().display(),
                rec.epoch
            )));
        }
        if rec.role == StoredRole::Backup {
            return Err(NodeError::Refused(format!(
                "{}: this node was already a backup in epoch {}; its replayed state is gone, so it can only rejoin through re-protection",
                self.state.path().display(),
                rec.epoch
            )));
        }
        let queue = ReplayQueue::new(1, (self.ft.log_buffer_mib as usize) << 20);
        *self.status.replay.lock().unwrap_or_else(|p| p.into_inner()) = Some(queue.clone());
        let endpoint = {
            let _g = self.rt.enter();
            open_endpoint(&self.settings)?
        };
        let channel = BackupChannel::new(
            self.settings.clone(),
            queue.clone(),
            self.role.clone(),
            self.link.clone(),
            machine.shape().clone(),
            machine.disk_root(),
            rec.epoch,
        );
        let (welcome_tx, welcome_rx) = tokio::sync::oneshot::channel();
        let link_task = self.rt.spawn(channel.clone().run(
            endpoint.clone(),
            welcome_tx,
            self.stop_rx.clone(),
        ));
        tracing::info!(node = %self.ft.node, peer = %self.ft.peer.name, address = %self.ft.peer.address, "backup starting; dialling the primary");
        // Wait to be paired (or refused, or stopped).
        let mut welcome_rx = welcome_rx;
        let welcome = loop {
            if let Ok(NodeEvent::Signal(_)) = self.events.try_recv() {
                let _ = self.stop_tx.send(true);
                return Ok(NodeOutcome::Stopped);
            }
            if link_task.is_finished() {
                return match self.rt.block_on(link_task) {
                    Ok(Err(e)) => Err(e.into()),
                    _ => Ok(NodeOutcome::Stopped),
                };
            }
            let waited = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(100), &mut welcome_rx).await
            });
            match waited {
                Ok(Ok(w)) => break w,
                // The link task ended before a pairing: refused, or stopped.
                Ok(Err(_)) => {
                    return match self.rt.block_on(link_task) {
                        Ok(Err(e)) => Err(e.into()),
                        _ => Ok(NodeOutcome::Stopped),
                    }
                }
                Err(_) => {}
            }
        };
        self.start_replay(welcome, machine, queue, channel, endpoint, link_task)
    }

    fn start_replay(
        mut self,
        welcome: super::proto::Welcome,
        machine: Machine,
        queue: Arc<ReplayQueue>,
        channel: Arc<BackupChannel>,
        endpoint: ftvm_transport::quinn::Endpoint,
        link_task: tokio::task::JoinHandle<Result<(), ChannelError>>,
    ) -> Result<NodeOutcome, NodeError> {
        let epoch = welcome.epoch;
        self.state.update(|r| {
            r.epoch = epoch;
            r.role = StoredRole::Backup;
        })?;
        let _ = self.role.apply(Event::Paired {
            peer: welcome.node.clone(),
            epoch,
        });
        let env = Replayer::new(queue.source());
        let control = Arc::new(VcpuControl::new());
        let vcpu = spawn_vcpu(machine, env, control.clone(), self.events_tx.clone())?;
        let result = loop {
            match self.events.recv() {
                Ok(NodeEvent::Signal(sig)) => {
                    tracing::warn!(signal = sig, "backup stopping");
                    let _ = self.stop_tx.send(true);
                    queue.interrupt();
                    control.stop();
                    let c = control.clone();
                    std::thread::spawn(move || c.kick_until_finished(Duration::from_millis(20)));
                }
                Ok(NodeEvent::MachineDone(r)) => break r,
                Err(_) => break Err(MachineError::Internal("event channel closed".into())),
            }
        };
        let (machine, env) = vcpu
            .join()
            .map_err(|_| NodeError::Setup("the vCPU thread panicked".into()))?;
        let outcome = match result {
            Ok(summary) => {
                tracing::info!(
                    exits = summary.exits,
                    digests = env.digests_checked,
                    outputs = env.outputs_checked,
                    "replay reached the end of the primary's log"
                );
                let _ = self.role.apply(Event::Stop {
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
                    let _ = self.role.apply(Event::Diverged {
                        ordinal,
                        what: what.to_string(),
                    });
                    self.rt.block_on(channel.tell_primary(Control::Diverged {
                        ordinal,
                        what: what.to_string(),
                    }));
                    self.state.update(|r| r.fenced = Some(report.clone()))?;
                    tracing::error!(
                        "{report}; this node is no longer a backup (it needs re-protection)"
                    );
                    let _ = self.stop_tx.send(true);
                    self.stay_fenced(report)
                } else if matches!(e, MachineError::Env(EnvError::Interrupted { .. })) {
                    Ok(NodeOutcome::Stopped)
                } else {
                    Err(e.into())
                }
            }
        };
        let _ = self.stop_tx.send(true);
        self.rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(2), link_task).await;
            endpoint.close(CLOSE_SHUTDOWN.into(), b"backup stopping");
        });
        if self.role.role() != Role::Stopped && self.role.role() != Role::Fenced {
            let _ = self.role.apply(Event::Stop {
                why: "backup stopped".into(),
            });
        }
        outcome
    }
}

async fn wait_signal(events: &mpsc::Receiver<NodeEvent>) {
    loop {
        if let Ok(NodeEvent::Signal(_)) = events.try_recv() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

//! The log channel (DESIGN.md 5): one QUIC connection with mutual TLS
//! between the two nodes, dialled by the backup. The protocol is drawn in
//! [`super::proto`]; this file holds the tasks that own the connection.
//!
//! - Primary ([`PrimaryChannel`]): accepts one backup at a time, checks
//!   its hello ([`super::pairing`]), sends the log from where the backup
//!   stands, feeds acks to the [`LogQueue`] and the [`OutputGate`], sends
//!   heartbeats.
//! - Backup ([`BackupChannel`]): dials the primary until it answers, says
//!   hello, pushes every batch that decodes into the [`ReplayQueue`], acks
//!   what it received, reports its replay position, sends heartbeats. A
//!   frame that does not decode ends the connection at once and nothing
//!   from it reaches replay; the next connection resumes from the last
//!   entry received.
//!
//! The vCPU thread never touches QUIC: it only sees the two queues.

use super::log_queue::{Batch, LogQueue};
use super::output_gate::OutputGate;
use super::pairing::{check_hello, check_join, check_welcome, Identity};
use super::proto::{
    self, Control, Hello, JoinRequest, Position, ProtoError, Welcome, CLOSE_BAD_FRAME, CLOSE_DONE,
    CLOSE_REFUSED, CLOSE_REPLACED, FRAME_CONTROL, MAX_CONTROL_FRAME, PROTOCOL_VERSION,
};
use super::replay_queue::ReplayQueue;
use super::reprotect::{self, JoinSource, JoinTarget, SharedProgress};
use super::role::RoleCell;
use crate::replay::log::{
    decode_batch, encode_batch, BatchHeader, MachineShape, FRAME_ENTRIES, LOG_FORMAT_VERSION,
    MAX_LOG_FRAME,
};
use ftvm_transport::frame::{self, read_frame_async, write_frame_async};
use ftvm_transport::quic::{self, QuicOptions, TlsFiles, ALPN_LOG};
use ftvm_transport::quinn;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// How often the backup reports its replay position.
const STATUS_EVERY: Duration = Duration::from_millis(100);
/// Longest wait for a hello or its answer.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause between two attempts to reach the primary.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Test hook: corrupt the Nth log frame this primary sends (1-based) after
/// framing, as a fault on the wire would, so a test can check that the
/// backup ends the connection and replays nothing of it.
pub const TEST_CORRUPT_FRAME_ENV: &str = "FTVM_TEST_CORRUPT_LOG_FRAME";

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("log channel setup: {0}")]
    Setup(#[from] quic::QuicError),
    #[error("pairing refused: {0}")]
    Refused(String),
}

/// Settings of the channel, from the `[ft]` table.
#[derive(Debug, Clone)]
pub struct ChannelSettings {
    pub me: Identity,
    pub peer_address: String,
    pub listen: SocketAddr,
    pub tls: TlsFiles,
    pub quic: QuicOptions,
    pub heartbeat: Duration,
}

/// The peer link as status and the failure detector see it.
#[derive(Debug, Default)]
pub struct LinkState {
    pub connected: AtomicBool,
    pub rtt_us: AtomicU64,
    /// Primary: last entry the backup acked. Backup: last entry received.
    pub acked: AtomicU64,
    pub sessions: AtomicU64,
    /// The peer said goodbye (a clean stop, not a failure).
    pub goodbye: AtomicBool,
    last_heard: Mutex<Option<Instant>>,
    /// Why replication stopped (the backup diverged), if it did.
    pub replication_stopped: Mutex<Option<String>>,
    /// The last pairing refusal, either way.
    pub refused: Mutex<Option<String>>,
}

impl LinkState {
    pub fn touch(&self) {
        *self.last_heard.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Time since the peer was last heard from (`None`: never).
    pub fn silent_for(&self) -> Option<Duration> {
        self.last_heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed())
    }

    fn note_refusal(&self, reason: &str) {
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_string());
    }

    pub fn replication_stopped(&self) -> Option<String> {
        self.replication_stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The QUIC options of the log channel for `[ft]`.
pub fn quic_options(ft: &ftvm_config::appliance::FtConfig) -> QuicOptions {
    use ftvm_config::appliance::Congestion;
    let window = ft.wan.window_bytes();
    QuicOptions {
        keep_alive: Duration::from_millis(ft.heartbeat_ms),
        // Longer than the failure timeout: the failure detector, not QUIC,
        // decides that the peer is gone, and a short cut must not kill the
        // connection.
        idle_timeout: Duration::from_millis((ft.failure_timeout_ms * 3).max(10_000)),
        max_bidi_streams: 4,
        max_uni_streams: 4,
        receive_window: Some(window),
        send_window: Some(window),
        congestion: match ft.wan.congestion {
            Congestion::Cubic => quic::CongestionControl::Cubic,
            Congestion::Bbr => quic::CongestionControl::Bbr,
            Congestion::NewReno => quic::CongestionControl::NewReno,
        },
    }
}

/// The node's QUIC endpoint: accepts its peer (when primary) and dials it
/// (when backup). Must be called inside a tokio runtime.
pub fn open_endpoint(s: &ChannelSettings) -> Result<quinn::Endpoint, ChannelError> {
    let server = quic::server_config(&s.tls, &[ALPN_LOG], &s.quic)?;
    let client = quic::client_config(&s.tls, &[ALPN_LOG], &s.quic)?;
    Ok(quic::dual_endpoint(s.listen, server, client)?)
}

/// Writes one control message.
async fn send_control(send: &mut quinn::SendStream, msg: &Control) -> Result<(), String> {
    let payload = proto::encode(msg).map_err(|e| e.to_string())?;
    write_frame_async(send, FRAME_CONTROL, &payload, MAX_CONTROL_FRAME)
        .await
        .map_err(|e| e.to_string())
}

/// Reads one control message; `Ok(None)` when the peer finished the stream.
async fn read_control(recv: &mut quinn::RecvStream) -> Result<Option<Control>, String> {
    let Some(f) = read_frame_async(recv, MAX_CONTROL_FRAME)
        .await
        .map_err(|e| format!("bad control frame: {e}"))?
    else {
        return Ok(None);
    };
    if f.kind != FRAME_CONTROL {
        return Err(format!("control frame of kind {}", f.kind));
    }
    proto::decode(&f.payload).map(Some).map_err(|e| match e {
        ProtoError::Version { found } => format!(
            "the peer speaks log channel protocol version {found}, this node speaks {PROTOCOL_VERSION}"
        ),
        other => other.to_string(),
    })
}

/// Sends a refusal, gives the peer a moment to read it, and closes.
async fn refuse(conn: &quinn::Connection, send: Option<&mut quinn::SendStream>, reason: &str) {
    if let Some(send) = send {
        let _ = send_control(
            send,
            &Control::Refused {
                reason: reason.to_string(),
            },
        )
        .await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    }
    let mut text = reason.as_bytes().to_vec();
    text.truncate(512);
    conn.close(CLOSE_REFUSED.into(), &text);
}

/// Reads control messages into a channel, so the session loop can select
/// on them without cancelling a half-read frame. A message `inline` takes
/// (returns true for) is handled here and not passed on: the primary's acks,
/// which release held replies and should not wait for another task.
fn spawn_reader(
    mut recv: quinn::RecvStream,
    inline: impl Fn(&Control) -> bool + Send + 'static,
) -> mpsc::Receiver<Result<Control, String>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let r = read_control(&mut recv).await;
            if let Ok(Some(m)) = &r {
                if inline(m) {
                    continue;
                }
            }
            let done = !matches!(r, Ok(Some(_)));
            let msg = match r {
                Ok(Some(m)) => Ok(m),
                Ok(None) => Err("the peer closed the control stream".to_string()),
                Err(e) => Err(e),
            };
            if tx.send(msg).await.is_err() || done {
                return;
            }
        }
    });
    rx
}

/// The backup has every entry up to `received`: the log queue may drop
/// them and the output gate release the replies that depended on them.
fn on_ack(queue: &LogQueue, gate: Option<&OutputGate>, link: &LinkState, received: u64) {
    queue.ack(received);
    if let Some(g) = gate {
        g.release_upto(received);
    }
    link.acked.store(received, Ordering::Relaxed);
}

/// Writes queued control messages in order.
fn spawn_writer(mut send: quinn::SendStream) -> mpsc::Sender<Control> {
    let (tx, mut rx) = mpsc::channel::<Control>(256);
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if send_control(&mut send, &m).await.is_err() {
                return;
            }
        }
        let _ = send.finish();
    });
    tx
}

/// The primary's side.
pub struct PrimaryChannel {
    pub settings: ChannelSettings,
    pub queue: Arc<LogQueue>,
    /// `None` for a machine without a network card: no output to hold.
    pub gate: Option<OutputGate>,
    /// Where the log a backup can follow starts (from power-on, after a
    /// switchover, or after a join's cut-over); `None` when only a join can
    /// protect this node (after a go-live).
    header: Mutex<Option<crate::replay::log::LogHeader>>,
    pub role: RoleCell,
    pub link: Arc<LinkState>,
    /// False while this node claims an epoch after declaring its backup failed.
    accepting: AtomicBool,
    /// What a joining backup is copied from, once the machine runs.
    join: Mutex<Option<JoinSource>>,
    /// Accept joins from the configured peer without an operator's `--join`.
    auto_reprotect: bool,
    pub progress: SharedProgress,
    /// Tells the node what the backup said that concerns it.
    notify: Mutex<Option<LinkNotifier>>,
    session: Mutex<Option<Attached>>,
    next_session: AtomicU64,
    corrupt_frame: Option<u64>,
}

/// What a channel tells its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// Backup side: the primary stopped for a planned switchover.
    SwitchOver {
        ordinal: u64,
        last_index: u64,
        disk_root: Option<[u8; 32]>,
    },
    /// Primary side: the backup took over at the next epoch.
    SwitchedOver { epoch: u64 },
}

pub type LinkNotifier = Box<dyn Fn(LinkEvent) + Send + Sync>;

impl std::fmt::Debug for PrimaryChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryChannel")
            .field("node", &self.settings.me.node)
            .field("attached", &self.attached())
            .finish()
    }
}

/// The backup attached now.
#[derive(Debug)]
struct Attached {
    id: u64,
    conn: quinn::Connection,
    to_backup: mpsc::Sender<Control>,
}

impl PrimaryChannel {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: ChannelSettings,
        queue: Arc<LogQueue>,
        gate: Option<OutputGate>,
        header: Option<crate::replay::log::LogHeader>,
        role: RoleCell,
        link: Arc<LinkState>,
        auto_reprotect: bool,
        progress: SharedProgress,
    ) -> Arc<Self> {
        let corrupt_frame = std::env::var(TEST_CORRUPT_FRAME_ENV)
            .ok()
            .and_then(|v| v.parse().ok());
        if let Some(n) = corrupt_frame {
            tracing::warn!(
                frame = n,
                "test hook {TEST_CORRUPT_FRAME_ENV} is set: that log frame will be corrupted"
            );
        }
        Arc::new(PrimaryChannel {
            settings,
            queue,
            gate,
            header: Mutex::new(header),
            role,
            link,
            accepting: AtomicBool::new(true),
            join: Mutex::new(None),
            auto_reprotect,
            progress,
            notify: Mutex::new(None),
            session: Mutex::new(None),
            next_session: AtomicU64::new(1),
            corrupt_frame,
        })
    }

    /// Accepts backups until the endpoint closes.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let me = self.clone();
            tokio::spawn(async move { me.handle(incoming).await });
        }
    }

    /// Joins can be served from `src` (the running machine's parts).
    pub fn set_join_source(&self, src: JoinSource) {
        *self.join.lock().unwrap_or_else(|p| p.into_inner()) = Some(src);
    }

    /// Where a following backup's log starts from now on.
    pub fn set_header(&self, h: Option<crate::replay::log::LogHeader>) {
        *self.header.lock().unwrap_or_else(|p| p.into_inner()) = h;
    }

    pub fn set_notifier(&self, n: LinkNotifier) {
        *self.notify.lock().unwrap_or_else(|p| p.into_inner()) = Some(n);
    }

    fn tell_node(&self, e: LinkEvent) {
        if let Some(n) = &*self.notify.lock().unwrap_or_else(|p| p.into_inner()) {
            n(e);
        }
    }

    /// The control channel to the attached backup, if any.
    fn backup_sender(&self) -> Option<mpsc::Sender<Control>> {
        self.session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|a| a.to_backup.clone())
    }

    /// Sends `m` to the attached backup, if any.
    pub async fn tell_backup(&self, m: Control) -> bool {
        let tx = self.backup_sender();
        match tx {
            Some(tx) => tx.send(m).await.is_ok(),
            None => false,
        }
    }

    /// Whether a backup is attached to this primary now.
    pub fn attached(&self) -> bool {
        self.session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Whether new backups are let in.
    pub fn set_accepting(&self, on: bool) {
        self.accepting.store(on, Ordering::Relaxed);
    }

    /// Closes the backup's connection, if any.
    pub fn close_session(&self, code: u32, why: &str) {
        if let Some(a) = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            a.conn.close(code.into(), why.as_bytes());
        }
    }

    pub async fn handle(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let conn = match tokio::time::timeout(HELLO_TIMEOUT, incoming).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::warn!(%remote, error = %e, "log channel: handshake failed (certificate, CA or protocol)");
                return;
            }
            Err(_) => {
                tracing::warn!(%remote, "log channel: handshake timed out");
                return;
            }
        };
        let cert_name = match quic::peer_node_name(&conn) {
            Ok(n) => n,
            Err(e) => {
                let reason = format!("unusable peer certificate: {e}");
                tracing::error!(%remote, %reason, "refusing pairing");
                refuse(&conn, None, &reason).await;
                return;
            }
        };
        let (mut send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(%remote, peer = %cert_name, error = %e, "log channel: no control stream");
                return;
            }
            Err(_) => {
                tracing::warn!(%remote, peer = %cert_name, "log channel: no hello in time");
                conn.close(CLOSE_REFUSED.into(), b"no hello in time");
                return;
            }
        };
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_control(&mut recv)).await {
            Ok(Ok(Some(Control::Hello(h)))) => h,
            Ok(Ok(other)) => {
                let reason = format!("expected a hello, got {other:?}");
                tracing::error!(%remote, peer = %cert_name, %reason, "refusing pairing");
                refuse(&conn, Some(&mut send), &reason).await;
                return;
            }
            Ok(Err(reason)) => {
                tracing::error!(%remote, peer = %cert_name, %reason, "refusing pairing");
                self.link.note_refusal(&reason);
                refuse(&conn, Some(&mut send), &reason).await;
                return;
            }
            Err(_) => {
                conn.close(CLOSE_REFUSED.into(), b"no hello in time");
                return;
            }
        };
        match self.judge(&cert_name, &hello) {
            Ok(admission) => self.session(conn, send, recv, hello, admission).await,
            Err(reason) => {
                tracing::error!(%remote, peer = %cert_name, %reason, "refusing pairing");
                self.link.note_refusal(&reason);
                refuse(&conn, Some(&mut send), &reason).await;
            }
        }
    }

    fn judge(&self, cert_name: &str, hello: &Hello) -> Result<Admission, String> {
        let role = self.role.get();
        if !role.role.is_live() {
            return Err(format!(
                "this node is {}, not a live primary",
                role.role.name()
            ));
        }
        if !self.accepting.load(Ordering::Relaxed) {
            return Err(
                "this primary declared its backup failed and is asking the witness for the next epoch"
                    .into(),
            );
        }
        let header = self
            .header
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let follow = match &header {
            Some(h) if self.link.replication_stopped().is_none() => {
                check_hello(&self.settings.me, cert_name, hello, role.epoch, h).and_then(|()| {
                    self.queue
                        .resume_from(hello.position.received)
                        .map_err(|e| e.to_string())
                })
            }
            Some(_) => Err(format!(
                "replication to this backup stopped ({}); it must rejoin with a full copy",
                self.link.replication_stopped().unwrap_or_default()
            )),
            None => Err(format!(
                "this node went live in epoch {}; its log does not start from power-on",
                role.epoch
            )),
        };
        let why_not = match follow {
            Ok(resume_from) => return Ok(Admission::Follow { resume_from }),
            Err(why) => why,
        };
        // It cannot follow the log: a full copy (re-protection), if allowed.
        let allowed = match hello.join {
            JoinRequest::Operator => true,
            JoinRequest::IfAllowed => self.auto_reprotect,
            JoinRequest::No | JoinRequest::Invalid => false,
        };
        if !allowed {
            return Err(format!(
                "{why_not}; it needs re-protection: start it with --join, or set ft.reprotect = \"auto\" on this node"
            ));
        }
        let src = self.join.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(src) = src else {
            return Err("this node's machine is not running yet; try again".into());
        };
        if self.attached() {
            return Err("a backup is attached already".into());
        }
        check_join(&self.settings.me, cert_name, hello, role.epoch, &src.shape)?;
        Ok(Admission::Join)
    }

    async fn session(
        self: Arc<Self>,
        conn: quinn::Connection,
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
        hello: Hello,
        admission: Admission,
    ) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let epoch = self.queue.epoch();
        let resume_from = match admission {
            Admission::Follow { resume_from } => resume_from,
            Admission::Join => match self.serve_join(&conn, &mut send, &hello).await {
                Ok(first) => first,
                Err(e) => {
                    tracing::warn!(peer = %hello.node, error = %e, "re-protection broke off; this node goes on as it was");
                    conn.close(CLOSE_DONE.into(), b"join failed");
                    return;
                }
            },
        };
        let Some(header) = self
            .header
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return;
        };
        let welcome = Welcome {
            node: self.settings.me.node.clone(),
            epoch,
            header,
            resume_from,
        };
        if let Err(e) = send_control(&mut send, &Control::Welcome(welcome)).await {
            tracing::warn!(peer = %hello.node, error = %e, "log channel: welcome not sent");
            return;
        }
        let acked = resume_from - 1;
        if let Some(g) = &self.gate {
            g.release_upto(acked);
        }
        self.link.acked.store(acked, Ordering::Relaxed);
        self.link.connected.store(true, Ordering::Relaxed);
        self.link.goodbye.store(false, Ordering::Relaxed);
        self.link.sessions.fetch_add(1, Ordering::Relaxed);
        self.link.touch();
        tracing::info!(peer = %hello.node, epoch, resume_from, "backup attached");
        let log = match conn.open_uni().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(peer = %hello.node, error = %e, "log channel: cannot open the log stream");
                return;
            }
        };
        let sender = tokio::spawn(send_log(
            self.queue.clone(),
            log,
            resume_from,
            epoch,
            self.corrupt_frame,
        ));
        let writer = spawn_writer(send);
        if let Some(old) = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(Attached {
                id,
                conn: conn.clone(),
                to_backup: writer.clone(),
            })
        {
            old.conn
                .close(CLOSE_REPLACED.into(), b"replaced by a new session");
        }
        let acks = (self.queue.clone(), self.gate.clone(), self.link.clone());
        let mut reader = spawn_reader(recv, move |m| match m {
            Control::Ack { received } => {
                let (queue, gate, link) = &acks;
                link.touch();
                on_ack(queue, gate.as_ref(), link, *received);
                true
            }
            _ => false,
        });
        let mut heartbeat = tokio::time::interval(self.settings.heartbeat);
        let started = Instant::now();
        let why = loop {
            tokio::select! {
                msg = reader.recv() => match msg {
                    Some(Ok(m)) => {
                        self.link.touch();
                        if let Some(end) = self.on_control(&hello.node, m) {
                            break end;
                        }
                    }
                    Some(Err(e)) => break e,
                    None => break "control stream ended".to_string(),
                },
                _ = heartbeat.tick() => {
                    self.link.rtt_us.store(conn.rtt().as_micros() as u64, Ordering::Relaxed);
                    let sent_ns = started.elapsed().as_nanos() as u64;
                    if writer.send(Control::Heartbeat { sent_ns }).await.is_err() {
                        break "control stream closed".to_string();
                    }
                }
                e = conn.closed() => break format!("connection closed: {e}"),
            }
        };
        sender.abort();
        let mut current = self.session.lock().unwrap_or_else(|p| p.into_inner());
        // Unless a newer session of the backup replaced this one, the
        // backup is gone (also when `close_session` took it out).
        if current.as_ref().is_none_or(|a| a.id == id) {
            *current = None;
            self.link.connected.store(false, Ordering::Relaxed);
            self.queue
                .stats
                .backup_reporting
                .store(false, Ordering::Relaxed);
        }
        drop(current);
        if self.link.goodbye.load(Ordering::Relaxed) {
            tracing::info!(peer = %hello.node, "backup session ended: {why}");
        } else {
            tracing::warn!(peer = %hello.node, "backup session ended: {why}");
        }
        conn.close(CLOSE_DONE.into(), b"session ended");
    }

    /// Copies this node to a joining backup; returns the first log index it
    /// follows (the header is set to the cut-over's).
    async fn serve_join(
        &self,
        conn: &quinn::Connection,
        send: &mut quinn::SendStream,
        hello: &Hello,
    ) -> Result<u64, String> {
        let src = self
            .join
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or("no join source")?;
        send_control(
            send,
            &Control::JoinAccepted {
                epoch: self.queue.epoch(),
                group: reprotect::GROUP,
            },
        )
        .await?;
        tracing::warn!(peer = %hello.node, "re-protection: a backup joins; copying disk and memory");
        let (tx, rx) = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi())
            .await
            .map_err(|_| "no sync stream in time".to_string())?
            .map_err(|e| format!("no sync stream: {e}"))?;
        let (header, _pause) = reprotect::serve(
            tx,
            rx,
            &src,
            &self.queue,
            self.gate.as_ref(),
            &self.progress,
        )
        .await?;
        let first = header.first_index;
        self.set_header(Some(header));
        // A new copy: a divergence of the old backup is history.
        *self
            .link
            .replication_stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        Ok(first)
    }

    /// Handles one message from the backup; `Some(reason)` ends the session.
    fn on_control(&self, peer: &str, m: Control) -> Option<String> {
        match m {
            Control::Ack { received } => {
                on_ack(&self.queue, self.gate.as_ref(), &self.link, received);
                None
            }
            Control::ReplayStatus { clock_ns, .. } => {
                let stats = &self.queue.stats;
                stats.replayed_clock_ns.store(clock_ns, Ordering::Relaxed);
                stats.backup_reporting.store(true, Ordering::Relaxed);
                None
            }
            Control::Heartbeat { .. } => None,
            Control::Diverged { ordinal, what } => {
                let report = format!("the backup {peer} diverged at exit {ordinal}: {what}");
                tracing::error!(
                    "REPLICATION STOPPED: {report}. Outputs stay held: re-protect the backup (or, once failover exists, this node goes solo through the witness)"
                );
                *self
                    .link
                    .replication_stopped
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
                Some(report)
            }
            Control::Goodbye { reason } => {
                self.link.goodbye.store(true, Ordering::Relaxed);
                Some(format!("the backup said goodbye: {reason}"))
            }
            Control::Refused { reason } => {
                tracing::error!(peer, %reason, "the backup refused this primary");
                self.link.note_refusal(&reason);
                Some(format!("refused by the backup: {reason}"))
            }
            Control::SwitchedOver { epoch } => {
                self.link.goodbye.store(true, Ordering::Relaxed);
                self.tell_node(LinkEvent::SwitchedOver { epoch });
                Some(format!(
                    "the backup took over in epoch {epoch} (switchover)"
                ))
            }
            other => Some(format!("unexpected control message {other:?}")),
        }
    }

    /// Tells the backup this node is stopping and the log ends.
    pub async fn say_goodbye(&self, reason: &str) {
        let tx = self.backup_sender();
        if let Some(tx) = tx {
            let _ = tx
                .send(Control::Goodbye {
                    reason: reason.to_string(),
                })
                .await;
        }
    }
}

/// Sends the log from `cursor` on until the stream fails.
async fn send_log(
    queue: Arc<LogQueue>,
    mut stream: quinn::SendStream,
    mut cursor: u64,
    epoch: u64,
    corrupt: Option<u64>,
) {
    let mut frames = 0u64;
    loop {
        let batch: Batch = queue.next_batch(cursor).await;
        let header = BatchHeader {
            epoch,
            first_index: batch.first_index,
            count: batch.count,
        };
        let mut buf = Vec::with_capacity(batch.entries.len() + 64);
        let framed = encode_batch(&header, &batch.entries).and_then(|p| {
            frame::encode_frame(FRAME_ENTRIES, &p, MAX_LOG_FRAME, &mut buf)
                .map_err(crate::replay::log::LogError::EntryTooLarge)
        });
        if let Err(e) = framed {
            tracing::error!(error = %e, "cannot frame a log batch; ending the session");
            return;
        }
        frames += 1;
        if corrupt == Some(frames) {
            let mid = buf.len() / 2;
            buf[mid] ^= 0xff;
            tracing::warn!(
                frame = frames,
                first = batch.first_index,
                "test hook: corrupted this log frame"
            );
        }
        if let Err(e) = stream.write_all(&buf).await {
            tracing::debug!(error = %e, "log stream closed");
            return;
        }
        cursor = batch.last_index() + 1;
    }
}

/// How the primary takes a backup in.
#[derive(Debug, Clone, Copy)]
enum Admission {
    /// It follows the log from `resume_from`.
    Follow { resume_from: u64 },
    /// It is copied first (re-protection).
    Join,
}

/// How a backup session ended.
#[derive(Debug)]
enum SessionEnd {
    Refused(String),
    Lost(String),
    Goodbye,
    Stopped,
}

/// The backup's side.
pub struct BackupChannel {
    pub settings: ChannelSettings,
    pub queue: Arc<ReplayQueue>,
    pub role: RoleCell,
    pub link: Arc<LinkState>,
    shape: MachineShape,
    disk_root: Option<[u8; 32]>,
    /// The epoch this node has stored (the Hello says it; a Welcome must
    /// not be older).
    epoch_seen: AtomicU64,
    /// Exits this node's machine has made (the log it follows must start there).
    start_ordinal: u64,
    /// Whether to ask for a full copy when it cannot follow the log, and
    /// where that copy goes.
    join: JoinRequest,
    target: Option<JoinTarget>,
    pub progress: SharedProgress,
    to_primary: Mutex<Option<mpsc::Sender<Control>>>,
    notify: Mutex<Option<LinkNotifier>>,
}

impl std::fmt::Debug for BackupChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupChannel")
            .field("node", &self.settings.me.node)
            .field("join", &self.join)
            .finish()
    }
}

/// How a backup was taken in.
#[derive(Debug)]
pub enum Paired {
    /// It follows the primary's log as its machine stands.
    Follow(Welcome),
    /// It was copied (re-protection): restore `state` (disk and memory are
    /// written), then follow the log from the welcome.
    Joined {
        state: Box<crate::persist::MachineState>,
        welcome: Welcome,
    },
}

/// How a backup that may be copied asks for it.
#[derive(Debug, Clone)]
pub struct JoinPlan {
    pub request: JoinRequest,
    pub target: Option<JoinTarget>,
}

impl BackupChannel {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: ChannelSettings,
        queue: Arc<ReplayQueue>,
        role: RoleCell,
        link: Arc<LinkState>,
        shape: MachineShape,
        disk_root: Option<[u8; 32]>,
        epoch_seen: u64,
        start_ordinal: u64,
        join: JoinPlan,
        progress: SharedProgress,
    ) -> Arc<Self> {
        Arc::new(BackupChannel {
            settings,
            queue,
            role,
            link,
            shape,
            disk_root,
            epoch_seen: AtomicU64::new(epoch_seen),
            start_ordinal,
            join: join.request,
            target: join.target,
            progress,
            to_primary: Mutex::new(None),
            notify: Mutex::new(None),
        })
    }

    pub fn set_notifier(&self, n: LinkNotifier) {
        *self.notify.lock().unwrap_or_else(|p| p.into_inner()) = Some(n);
    }

    fn tell_node(&self, e: LinkEvent) {
        if let Some(n) = &*self.notify.lock().unwrap_or_else(|p| p.into_inner()) {
            n(e);
        }
    }

    /// Sends `m` to the primary if connected (divergence reports, goodbye).
    pub async fn tell_primary(&self, m: Control) {
        let tx = self
            .to_primary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(tx) = tx {
            let _ = tx.send(m).await;
            // Let the writer flush it before the caller closes anything.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Dials the primary until paired, then keeps the link up, resuming
    /// after every loss. The first Welcome goes to `welcome` (the node
    /// starts replay on it). Returns when the primary said goodbye, when
    /// `stop` is set, or with the reason of a refused pairing.
    pub async fn run(
        self: Arc<Self>,
        endpoint: quinn::Endpoint,
        welcome: oneshot::Sender<Paired>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), ChannelError> {
        let mut welcome = Some(welcome);
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0u64;
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            attempt += 1;
            let conn = match self.dial(&endpoint).await {
                Ok(c) => c,
                Err(e) => {
                    if attempt == 1 || attempt.is_multiple_of(10) {
                        tracing::warn!(peer = %self.settings.me.peer, attempt, error = %e, "cannot reach the primary yet; retrying");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            let end = self.session(&conn, &mut welcome, &mut stop).await;
            self.link.connected.store(false, Ordering::Relaxed);
            *self.to_primary.lock().unwrap_or_else(|p| p.into_inner()) = None;
            match end {
                SessionEnd::Refused(reason) => {
                    self.link.note_refusal(&reason);
                    return Err(ChannelError::Refused(reason));
                }
                SessionEnd::Goodbye => {
                    tracing::info!(peer = %self.settings.me.peer, "the primary said goodbye; the log ends");
                    return Ok(());
                }
                SessionEnd::Stopped => {
                    conn.close(CLOSE_DONE.into(), b"backup stopping");
                    return Ok(());
                }
                SessionEnd::Lost(why) => {
                    tracing::warn!(peer = %self.settings.me.peer, received = self.queue.received(), "connection to the primary lost ({why}); reconnecting");
                    conn.close(CLOSE_DONE.into(), b"lost");
                }
            }
        }
    }

    async fn dial(&self, endpoint: &quinn::Endpoint) -> Result<quinn::Connection, String> {
        let addr = tokio::net::lookup_host(&self.settings.peer_address)
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", self.settings.peer_address))?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", self.settings.peer_address))?;
        quic::connect(endpoint, addr, &self.settings.me.peer, HELLO_TIMEOUT)
            .await
            .map_err(|e| e.to_string())
    }

    async fn session(
        &self,
        conn: &quinn::Connection,
        welcome_out: &mut Option<oneshot::Sender<Paired>>,
        stop: &mut watch::Receiver<bool>,
    ) -> SessionEnd {
        let peer = self.settings.me.peer.clone();
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => return SessionEnd::Lost(format!("no control stream: {e}")),
        };
        let received = self.queue.received();
        let hello = Hello {
            cluster: self.settings.me.cluster.clone(),
            node: self.settings.me.node.clone(),
            peer: peer.clone(),
            epoch: self.epoch_seen.load(Ordering::Relaxed),
            log_format: LOG_FORMAT_VERSION,
            shape: self.shape.clone(),
            disk_root: self.disk_root,
            disk_reads: self.settings.me.disk_reads,
            position: Position {
                received,
                ordinal: self.start_ordinal,
            },
            // A backup that already follows the log never asks to be copied.
            join: if received > 0 {
                JoinRequest::No
            } else {
                self.join
            },
        };
        if let Err(e) = send_control(&mut send, &Control::Hello(hello)).await {
            return SessionEnd::Lost(format!("hello not sent: {e}"));
        }
        let reply = match tokio::time::timeout(HELLO_TIMEOUT, read_control(&mut recv)).await {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => {
                return SessionEnd::Lost("the primary closed the control stream".into())
            }
            Ok(Err(e)) => {
                if e.contains("protocol version") {
                    tracing::error!(%peer, reason = %e, "refusing the primary");
                    refuse(conn, Some(&mut send), &e).await;
                    return SessionEnd::Refused(e);
                }
                return SessionEnd::Lost(e);
            }
            Err(_) => return SessionEnd::Lost("no answer to the hello".into()),
        };
        let mut joined = None;
        let reply = match reply {
            Control::JoinAccepted { epoch, .. } => {
                let Some(target) = &self.target else {
                    let why = "the primary offers a full copy, but this node cannot take one now";
                    refuse(conn, Some(&mut send), why).await;
                    return SessionEnd::Refused(why.into());
                };
                tracing::warn!(%peer, epoch, "re-protection: receiving the primary's disk and memory");
                let (tx, rx) = match conn.open_bi().await {
                    Ok(s) => s,
                    Err(e) => return SessionEnd::Lost(format!("no sync stream: {e}")),
                };
                match reprotect::receive(tx, rx, target, &self.progress).await {
                    Ok((state, header)) => {
                        self.queue.restart_at(header.first_index);
                        joined = Some(state);
                    }
                    Err(e) => return SessionEnd::Lost(format!("re-protection broke off: {e}")),
                }
                match tokio::time::timeout(HELLO_TIMEOUT, read_control(&mut recv)).await {
                    Ok(Ok(Some(m))) => m,
                    Ok(Ok(None)) => {
                        return SessionEnd::Lost("the primary closed the control stream".into())
                    }
                    Ok(Err(e)) => return SessionEnd::Lost(e),
                    Err(_) => return SessionEnd::Lost("no welcome after the copy".into()),
                }
            }
            other => other,
        };
        let welcome = match reply {
            Control::Welcome(w) => w,
            Control::Refused { reason } => {
                tracing::error!(%peer, %reason, "the primary refused the pairing");
                conn.close(CLOSE_DONE.into(), b"refused");
                return SessionEnd::Refused(reason);
            }
            other => return SessionEnd::Lost(format!("expected a welcome, got {other:?}")),
        };
        let received = self.queue.received();
        // A copied backup's disk is the primary's now (checked again once
        // its machine reopens it).
        let disk_root = if joined.is_some() {
            welcome.header.disk_root
        } else {
            self.disk_root
        };
        if let Err(reason) = check_welcome(
            &self.settings.me,
            &welcome,
            self.epoch_seen.load(Ordering::Relaxed),
            &self.shape,
            &disk_root,
            received,
        ) {
            tracing::error!(%peer, %reason, "refusing the primary");
            refuse(conn, Some(&mut send), &reason).await;
            return SessionEnd::Refused(reason);
        }
        let epoch = welcome.epoch;
        self.epoch_seen.store(epoch, Ordering::Relaxed);
        // The welcome is the primary speaking: the node's failure detector
        // starts from here, not from before a copy or a partition.
        self.link.touch();
        if let Some(tx) = welcome_out.take() {
            let paired = match joined.take() {
                Some(state) => Paired::Joined {
                    state: Box::new(state),
                    welcome,
                },
                None => Paired::Follow(welcome),
            };
            let _ = tx.send(paired);
        }
        let log = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_uni()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return SessionEnd::Lost(format!("no log stream: {e}")),
            Err(_) => return SessionEnd::Lost("no log stream in time".into()),
        };
        self.link.connected.store(true, Ordering::Relaxed);
        self.link.goodbye.store(false, Ordering::Relaxed);
        self.link.sessions.fetch_add(1, Ordering::Relaxed);
        self.link.touch();
        tracing::info!(%peer, epoch, resume_from = received + 1, "paired with the primary");
        let (ack_tx, mut ack_rx) = watch::channel(received);
        let writer = spawn_writer(send);
        let receiver = tokio::spawn(receive_log(
            self.queue.clone(),
            log,
            epoch,
            ack_tx,
            writer.clone(),
            conn.clone(),
        ));
        *self.to_primary.lock().unwrap_or_else(|p| p.into_inner()) = Some(writer.clone());
        let mut reader = spawn_reader(recv, |_| false);
        let mut heartbeat = tokio::time::interval(self.settings.heartbeat);
        let mut status = tokio::time::interval(STATUS_EVERY);
        let started = Instant::now();
        let end = loop {
            tokio::select! {
                changed = ack_rx.changed() => {
                    if changed.is_err() {
                        break SessionEnd::Lost("the log stream ended".into());
                    }
                    let received = *ack_rx.borrow_and_update();
                    self.link.acked.store(received, Ordering::Relaxed);
                }
                _ = status.tick() => {
                    let p = &self.queue.progress;
                    let m = Control::ReplayStatus {
                        replayed: p.replayed.load(Ordering::Relaxed),
                        ordinal: p.ordinal.load(Ordering::Relaxed),
                        clock_ns: p.clock_ns.load(Ordering::Relaxed),
                    };
                    if writer.send(m).await.is_err() {
                        break SessionEnd::Lost("control stream closed".into());
                    }
                }
                _ = heartbeat.tick() => {
                    self.link.rtt_us.store(conn.rtt().as_micros() as u64, Ordering::Relaxed);
                    let sent_ns = started.elapsed().as_nanos() as u64;
                    if writer.send(Control::Heartbeat { sent_ns }).await.is_err() {
                        break SessionEnd::Lost("control stream closed".into());
                    }
                }
                msg = reader.recv() => match msg {
                    Some(Ok(Control::Heartbeat { .. })) => self.link.touch(),
                    Some(Ok(Control::Goodbye { reason })) => {
                        tracing::info!(%peer, %reason, "the primary is stopping; its log ends with the machine's end");
                        self.link.goodbye.store(true, Ordering::Relaxed);
                    }
                    Some(Ok(Control::Refused { reason })) => {
                        tracing::error!(%peer, %reason, "the primary refused this backup");
                        break SessionEnd::Refused(reason);
                    }
                    Some(Ok(Control::SwitchOver { ordinal, last_index, disk_root })) => {
                        self.tell_node(LinkEvent::SwitchOver { ordinal, last_index, disk_root });
                    }
                    Some(Ok(other)) => break SessionEnd::Lost(format!("unexpected control message {other:?}")),
                    Some(Err(e)) => break SessionEnd::Lost(e),
                    None => break SessionEnd::Lost("control stream ended".into()),
                },
                _ = stop.changed() => {
                    if *stop.borrow() {
                        let _ = writer.send(Control::Goodbye { reason: "the backup is stopping".into() }).await;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        break SessionEnd::Stopped;
                    }
                }
                e = conn.closed() => {
                    break if self.link.goodbye.load(Ordering::Relaxed) {
                        SessionEnd::Goodbye
                    } else {
                        SessionEnd::Lost(format!("connection closed: {e}"))
                    };
                }
            }
        };
        receiver.abort();
        if self.link.goodbye.load(Ordering::Relaxed) && matches!(end, SessionEnd::Lost(_)) {
            return SessionEnd::Goodbye;
        }
        end
    }
}

/// Pushes every batch that decodes into the replay queue, acks it to the
/// primary and publishes the last index received; a frame that does not
/// decode ends the connection. The ack leaves from here, not from the
/// session loop: each hop between tasks is added to every held reply.
async fn receive_log(
    queue: Arc<ReplayQueue>,
    mut log: quinn::RecvStream,
    epoch: u64,
    ack: watch::Sender<u64>,
    writer: mpsc::Sender<Control>,
    conn: quinn::Connection,
) {
    let path = Path::new("log channel");
    loop {
        let frame = match read_frame_async(&mut log, MAX_LOG_FRAME).await {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                bad_frame(&conn, &format!("corrupt log frame: {e}"));
                return;
            }
        };
        if frame.kind != FRAME_ENTRIES {
            bad_frame(&conn, &format!("log frame of kind {}", frame.kind));
            return;
        }
        let (header, entries) = match decode_batch(path, &frame.payload) {
            Ok(b) => b,
            Err(e) => {
                bad_frame(&conn, &e.to_string());
                return;
            }
        };
        if header.epoch != epoch {
            bad_frame(
                &conn,
                &format!(
                    "log batch of epoch {}, the session is in epoch {epoch}",
                    header.epoch
                ),
            );
            return;
        }
        match queue
            .push(header.first_index, entries, frame.payload.len())
            .await
        {
            Ok(received) => {
                ack.send_replace(received);
                if writer.send(Control::Ack { received }).await.is_err() {
                    // The session loop sees the control stream close.
                    return;
                }
            }
            Err(e) => {
                bad_frame(&conn, &e.to_string());
                return;
            }
        }
    }
}

fn bad_frame(conn: &quinn::Connection, why: &str) {
    tracing::error!(
        reason = %why,
        "log channel: bad frame from the primary; ending the connection (nothing from it is replayed)"
    );
    let mut text = why.as_bytes().to_vec();
    text.truncate(512);
    conn.close(CLOSE_BAD_FRAME.into(), &text);
}

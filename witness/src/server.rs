//! The witness: claim decisions ([`Witness`]) and the QUIC service around
//! them ([`serve`]).

use crate::decide::{decide, log_decision, Decision};
use crate::proto::{
    self, ClusterStatus, RefuseCode, Request, RequestBody, Response, ResponseBody, CLOSE_BAD_FRAME,
    CLOSE_BAD_IDENTITY, CLOSE_SHUTDOWN, KIND_REQUEST, KIND_RESPONSE, PROTOCOL_VERSION,
};
use crate::store::{ClusterState, Store, StoreError};
use ftvm_config::witness::WitnessConfig;
use ftvm_transport::frame::{read_frame_async, write_frame_async, FrameError};
use ftvm_transport::quic::{self, QuicError, QuicOptions, TlsFiles, ALPN_WITNESS};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The claimer holds `epoch`; the decision is on disk.
    Granted { epoch: u64 },
    /// `holder` holds `epoch` (the current one); the claimer does not.
    Denied { holder: Option<String>, epoch: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("unknown cluster {0:?}")]
    UnknownCluster(String),
    #[error("node {node:?} is not a member of cluster {cluster:?}")]
    NotMember { cluster: String, node: String },
    #[error("epoch {0} cannot be followed")]
    EpochOverflow(u64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Claim decisions for a set of clusters, persisted in a [`Store`].
#[derive(Debug)]
pub struct Witness {
    store: Store,
    /// cluster name -> member node names.
    clusters: BTreeMap<String, Vec<String>>,
    /// Serialises decide + write + flush so that two claims never interleave.
    decide: Mutex<()>,
}

impl Witness {
    /// A witness serving `clusters` (name, members) from `store`.
    pub fn new(store: Store, clusters: impl IntoIterator<Item = (String, Vec<String>)>) -> Self {
        let clusters: BTreeMap<_, _> = clusters.into_iter().collect();
        if let Ok(all) = store.all() {
            for (name, st) in all {
                if !clusters.contains_key(&name) {
                    tracing::warn!(cluster = %name, epoch = st.epoch, "database holds a cluster the config does not list; it is not served");
                }
            }
        }
        Witness {
            store,
            clusters,
            decide: Mutex::new(()),
        }
    }

    /// Whether `node` is a member of `cluster`.
    pub fn is_member(&self, cluster: &str, node: &str) -> Result<bool, WitnessError> {
        let members = self
            .clusters
            .get(cluster)
            .ok_or_else(|| WitnessError::UnknownCluster(cluster.to_string()))?;
        Ok(members.iter().any(|m| m == node))
    }

    /// `node` asks for epoch `epoch_seen + 1` of `cluster`.
    ///
    /// - If the current epoch is `epoch_seen`, the node is granted
    ///   `epoch_seen + 1`; the grant is flushed to disk before this returns.
    /// - If the node already holds `epoch_seen + 1`, it is granted again
    ///   (idempotent; nothing is written).
    /// - Otherwise (someone else won `epoch_seen + 1`, or `epoch_seen` is stale,
    ///   or it is ahead of anything this witness granted) the claim is denied
    ///   with the current holder and epoch.
    ///
    /// Unknown clusters and non-members are errors, and change nothing.
    pub fn claim(
        &self,
        cluster: &str,
        node: &str,
        epoch_seen: u64,
    ) -> Result<ClaimOutcome, WitnessError> {
        if !self.is_member(cluster, node)? {
            tracing::warn!(
                cluster,
                node,
                epoch_seen,
                outcome = "refused",
                "claim refused: not a member"
            );
            return Err(WitnessError::NotMember {
                cluster: cluster.to_string(),
                node: node.to_string(),
            });
        }
        let _guard = self.decide.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.store.get(cluster)?;
        let outcome = match decide(&cur, cluster, node, epoch_seen) {
            Decision::Grant { epoch } => {
                let new = ClusterState {
                    epoch,
                    holder: Some(node.to_string()),
                };
                if let Err(e) = self.store.put_durable(cluster, &new) {
                    tracing::error!(cluster, node, epoch, error = %e, outcome = "failed", "could not persist grant; not granted");
                    return Err(e.into());
                }
                ClaimOutcome::Granted { epoch }
            }
            Decision::Answer(outcome) => outcome,
            Decision::Overflow => return Err(WitnessError::EpochOverflow(epoch_seen)),
        };
        log_decision("ftvm", cluster, node, epoch_seen, &outcome);
        Ok(outcome)
    }

    /// The state of one served cluster.
    pub fn status(&self, cluster: &str) -> Result<ClusterState, WitnessError> {
        if !self.clusters.contains_key(cluster) {
            return Err(WitnessError::UnknownCluster(cluster.to_string()));
        }
        Ok(self.store.get(cluster)?)
    }

    /// The state of every served cluster, by name.
    pub fn status_all(&self) -> Result<Vec<ClusterStatus>, WitnessError> {
        let mut out = Vec::new();
        for name in self.clusters.keys() {
            let st = self.store.get(name)?;
            out.push(ClusterStatus {
                name: name.clone(),
                epoch: st.epoch,
                holder: st.holder,
            });
        }
        Ok(out)
    }

    /// Names of the served clusters.
    pub fn clusters(&self) -> impl Iterator<Item = &str> {
        self.clusters.keys().map(|s| s.as_str())
    }

    /// Flushes the store (on shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.store.flush()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Quic(#[from] QuicError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "{cert}: certificate names node {found:?} but the config says server.node = {expected:?}"
    )]
    WrongIdentity {
        cert: std::path::PathBuf,
        found: String,
        expected: String,
    },
}

/// What the service needs besides the [`Witness`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub tls: TlsFiles,
    pub quic: QuicOptions,
    pub max_frame: usize,
    pub request_timeout: Duration,
    pub max_connections: usize,
    /// Nodes that may read the status of every cluster.
    pub operators: Vec<String>,
}

impl ServeOptions {
    /// The options a config file describes.
    pub fn from_config(cfg: &WitnessConfig) -> Self {
        let s = &cfg.server;
        ServeOptions {
            listen: s.listen,
            tls: TlsFiles {
                ca: s.ca.clone(),
                cert: s.cert.clone(),
                key: s.key.clone(),
            },
            quic: QuicOptions {
                keep_alive: Duration::from_millis(s.keep_alive_ms),
                idle_timeout: Duration::from_millis(s.idle_timeout_ms),
                max_bidi_streams: 8,
                max_uni_streams: 0,
                ..QuicOptions::default()
            },
            max_frame: s.max_frame_bytes as usize,
            request_timeout: Duration::from_millis(s.request_timeout_ms),
            max_connections: s.max_connections as usize,
            operators: s.operators.clone(),
        }
    }
}

/// Checks that the certificate in `tls.cert` carries `node`.
pub fn check_own_identity(tls: &TlsFiles, node: &str) -> Result<(), ServeError> {
    let certs = quic::load_certs(&tls.cert)?;
    let found = match certs.first() {
        Some(c) => quic::node_name_from_cert(c)?,
        None => String::new(),
    };
    if found != node {
        return Err(ServeError::WrongIdentity {
            cert: tls.cert.clone(),
            found,
            expected: node.to_string(),
        });
    }
    Ok(())
}

/// A bound, not yet serving, witness endpoint.
pub struct Server {
    endpoint: quinn::Endpoint,
    witness: Arc<Witness>,
    opts: Arc<ServeOptions>,
}

use ftvm_transport::quinn;

impl Server {
    /// Builds the TLS config (naming any bad file) and binds the UDP socket.
    /// Must be called inside a tokio runtime.
    pub fn bind(witness: Arc<Witness>, opts: ServeOptions) -> Result<Server, ServeError> {
        let mut cfg = quic::server_config(&opts.tls, &[ALPN_WITNESS], &opts.quic)?;
        cfg.max_incoming(opts.max_connections.max(1));
        let endpoint = quic::server_endpoint(opts.listen, cfg)?;
        Ok(Server {
            endpoint,
            witness,
            opts: Arc::new(opts),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Serves until `shutdown` resolves, then closes every connection and
    /// flushes the store.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        let active = Arc::new(AtomicUsize::new(0));
        tokio::pin!(shutdown);
        loop {
            let incoming = tokio::select! {
                _ = &mut shutdown => break,
                inc = self.endpoint.accept() => match inc {
                    Some(i) => i,
                    None => break,
                },
            };
            if active.load(Ordering::Relaxed) >= self.opts.max_connections {
                tracing::warn!(remote = %incoming.remote_address(), "connection refused: too many connections");
                incoming.refuse();
                continue;
            }
            active.fetch_add(1, Ordering::Relaxed);
            let witness = self.witness.clone();
            let opts = self.opts.clone();
            let active = active.clone();
            tokio::spawn(async move {
                handle_connection(incoming, witness, opts).await;
                active.fetch_sub(1, Ordering::Relaxed);
            });
        }
        self.endpoint
            .close(CLOSE_SHUTDOWN.into(), b"witness shutting down");
        if let Err(e) = self.witness.flush() {
            tracing::error!(error = %e, "flush at shutdown failed");
        }
        tracing::info!("witness stopped");
    }
}

async fn handle_connection(
    incoming: quinn::Incoming,
    witness: Arc<Witness>,
    opts: Arc<ServeOptions>,
) {
    let remote = incoming.remote_address();
    let handshake = opts.quic.idle_timeout;
    let conn = match tokio::time::timeout(handshake, async { incoming.accept()?.await }).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::warn!(%remote, reason = %e, "connection refused at the TLS handshake");
            return;
        }
        Err(_) => {
            tracing::warn!(%remote, "handshake timed out");
            return;
        }
    };
    let node = match quic::peer_node_name(&conn) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(%remote, reason = %e, "connection refused: unusable client certificate");
            conn.close(CLOSE_BAD_IDENTITY.into(), e.to_string().as_bytes());
            return;
        }
    };
    tracing::debug!(%remote, node, "connection accepted");
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%remote, node, reason = %e, "connection ended");
                return;
            }
        };
        let conn = conn.clone();
        let witness = witness.clone();
        let opts = opts.clone();
        let node = node.clone();
        tokio::spawn(async move {
            let mut send = send;
            if let Err(reason) = handle_stream(&mut send, recv, &witness, &opts, &node).await {
                tracing::warn!(%remote, node, %reason, "closing connection: bad frame");
                // Close while the stream is still open: dropping a quinn send
                // stream finishes it, and a client that saw that clean end
                // before the close would not learn why it got no answer.
                conn.close(CLOSE_BAD_FRAME.into(), reason.as_bytes());
            }
            drop(send);
        });
    }
}

/// Serves requests on one stream until the client finishes it. An `Err` is
/// a frame-level fault: the caller closes the connection with that reason.
async fn handle_stream(
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
    witness: &Arc<Witness>,
    opts: &ServeOptions,
    node: &str,
) -> Result<(), String> {
    loop {
        let frame = match tokio::time::timeout(
            opts.request_timeout,
            read_frame_async(&mut recv, opts.max_frame),
        )
        .await
        {
            Err(_) => {
                return Err(format!(
                    "no complete request within {:?}",
                    opts.request_timeout
                ))
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(f))) => f,
            Ok(Err(FrameError::Io(e))) => {
                // The stream or connection went away: nothing to answer.
                tracing::debug!(node, reason = %e, "stream ended");
                return Ok(());
            }
            Ok(Err(e)) => return Err(format!("bad frame: {e}")),
        };
        if frame.kind != KIND_REQUEST {
            return Err(format!(
                "bad frame: kind {} is not a request (expected {KIND_REQUEST})",
                frame.kind
            ));
        }
        let body = match proto::decode_request(&frame.payload) {
            Ok(Request { body, .. }) => answer(witness, opts, node, body).await,
            Err(e @ proto::ProtoError::UnsupportedVersion { .. }) => {
                tracing::warn!(node, reason = %e, outcome = "refused", "request refused");
                refused(RefuseCode::UnsupportedVersion, e.to_string())
            }
            Err(e) => {
                tracing::warn!(node, reason = %e, outcome = "refused", "request refused");
                refused(RefuseCode::BadRequest, e.to_string())
            }
        };
        let bytes = proto::encode(&Response {
            version: PROTOCOL_VERSION,
            body,
        })
        .map_err(|e| e.to_string())?;
        if let Err(e) =
            write_frame_async(send, KIND_RESPONSE, &bytes, proto::MAX_RESPONSE_FRAME).await
        {
            tracing::debug!(node, reason = %e, "could not send the answer");
            return Ok(());
        }
    }
    let _ = send.finish();
    Ok(())
}

fn refused(code: RefuseCode, reason: String) -> ResponseBody {
    ResponseBody::Refused { code, reason }
}

async fn answer(
    witness: &Arc<Witness>,
    opts: &ServeOptions,
    node: &str,
    body: RequestBody,
) -> ResponseBody {
    match body {
        RequestBody::Claim {
            cluster,
            epoch_seen,
        } => {
            let w = witness.clone();
            let n = node.to_string();
            let c = cluster.clone();
            // The flush blocks: keep it off the async workers.
            let res = tokio::task::spawn_blocking(move || w.claim(&c, &n, epoch_seen)).await;
            match res {
                Ok(Ok(ClaimOutcome::Granted { epoch })) => ResponseBody::Granted { cluster, epoch },
                Ok(Ok(ClaimOutcome::Denied { holder, epoch })) => ResponseBody::Denied {
                    cluster,
                    holder,
                    epoch,
                },
                Ok(Err(e)) => refusal(node, &e),
                Err(e) => {
                    tracing::error!(cluster, node, error = %e, "claim task failed; not granted");
                    refused(RefuseCode::Internal, "internal error; not granted".into())
                }
            }
        }
        RequestBody::Status { cluster } => {
            let operator = opts.operators.iter().any(|o| o == node);
            match cluster {
                None if operator => match witness.status_all() {
                    Ok(clusters) => ResponseBody::Status { clusters },
                    Err(e) => refusal(node, &e),
                },
                None => {
                    tracing::warn!(
                        node,
                        outcome = "refused",
                        "status of all clusters refused: not an operator"
                    );
                    refused(
                        RefuseCode::NotAuthorized,
                        format!("node {node:?} is not an operator; ask for your own cluster"),
                    )
                }
                Some(c) => {
                    let allowed = match witness.is_member(&c, node) {
                        Ok(m) => m || operator,
                        Err(e) => return refusal(node, &e),
                    };
                    if !allowed {
                        let e = WitnessError::NotMember {
                            cluster: c,
                            node: node.to_string(),
                        };
                        return refusal(node, &e);
                    }
                    match witness.status(&c) {
                        Ok(st) => ResponseBody::Status {
                            clusters: vec![ClusterStatus {
                                name: c,
                                epoch: st.epoch,
                                holder: st.holder,
                            }],
                        },
                        Err(e) => refusal(node, &e),
                    }
                }
            }
        }
    }
}

fn refusal(node: &str, e: &WitnessError) -> ResponseBody {
    let code = match e {
        WitnessError::UnknownCluster(_) => RefuseCode::UnknownCluster,
        WitnessError::NotMember { .. } => RefuseCode::NotMember,
        WitnessError::EpochOverflow(_) => RefuseCode::BadRequest,
        WitnessError::Store(_) => RefuseCode::Internal,
    };
    tracing::warn!(node, reason = %e, outcome = "refused", "request refused");
    refused(code, e.to_string())
}

/// Opens the store and binds the service described by `cfg`; every error
/// names the file, key or database that is wrong.
pub fn start(cfg: &WitnessConfig) -> Result<Server, ServeError> {
    let opts = ServeOptions::from_config(cfg);
    // Check the identity files before touching the database.
    quic::server_config(&opts.tls, &[ALPN_WITNESS], &opts.quic)?;
    check_own_identity(&opts.tls, &cfg.server.node)?;
    let store = Store::open(&cfg.server.db)?;
    let witness = Witness::new(
        store,
        cfg.clusters
            .iter()
            .map(|c| (c.name.clone(), c.members.clone())),
    );
    Server::bind(Arc::new(witness), opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn witness() -> (tempfile::TempDir, Witness) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let w = Witness::new(
            store,
            [("c".to_string(), vec!["a".to_string(), "b".to_string()])],
        );
        (dir, w)
    }

    #[test]
    fn first_claim_wins_loser_told_holder() {
        let (_d, w) = witness();
        assert_eq!(
            w.claim("c", "a", 0).unwrap(),
            ClaimOutcome::Granted { epoch: 1 }
        );
        assert_eq!(
            w.claim("c", "b", 0).unwrap(),
            ClaimOutcome::Denied {
                holder: Some("a".into()),
                epoch: 1
            }
        );
        // Idempotent for the winner.
        assert_eq!(
            w.claim("c", "a", 0).unwrap(),
            ClaimOutcome::Granted { epoch: 1 }
        );
        // Next epoch: first to ask wins, even the previous loser.
        assert_eq!(
            w.claim("c", "b", 1).unwrap(),
            ClaimOutcome::Granted { epoch: 2 }
        );
        // Stale and future claims are denied with the current state.
        for seen in [0, 5] {
            assert_eq!(
                w.claim("c", "a", seen).unwrap(),
                ClaimOutcome::Denied {
                    holder: Some("b".into()),
                    epoch: 2
                }
            );
        }
    }

    #[test]
    fn strangers_and_unknown_clusters_change_nothing() {
        let (_d, w) = witness();
        assert!(matches!(
            w.claim("c", "x", 0),
            Err(WitnessError::NotMember { .. })
        ));
        assert!(matches!(
            w.claim("nope", "a", 0),
            Err(WitnessError::UnknownCluster(_))
        ));
        assert_eq!(w.status("c").unwrap(), ClusterState::default());
    }
}

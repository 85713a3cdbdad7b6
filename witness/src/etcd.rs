//! The etcd witness backend: claims decided by an etcd v3 cluster (gRPC over
//! TLS with client certificates) instead of one `ftvm-witness` process, so
//! the witness survives the loss of any minority of its members.
//!
//! Each cluster has one key, `<key_prefix>/<cluster>/epoch`, whose value is
//! the text record `ftvm-witness/1 epoch=<E> holder=<node>` (absent: epoch 0,
//! no holder). A claim on `epoch_seen` by `node` (the name in this client's
//! certificate) is:
//!
//! 1. a linearizable GET of the key: its record and mod revision;
//! 2. [`decide`] on that state, the same rule the `ftvm-witness` service
//!    applies;
//! 3. for a grant, ONE transaction: *if* the key's value is still the record
//!    read and its mod revision is still the one read (mod revision 0: the
//!    key is still absent), *then* put `epoch_seen + 1` with `node` as
//!    holder. GRANTED only if etcd answers that the transaction succeeded;
//!    if it did not (someone else wrote first), the key is read again and
//!    decided again, which denies the claim and names the winner.
//!
//! A transaction that succeeded is committed by raft: in the log of a
//! majority of members, each of which fsynced its WAL before acknowledging,
//! and applied before the answer left. So a grant is durable before it is
//! answered, as with `ftvm-witness`. A member cut off from the majority
//! cannot commit, and with `require_leader` and linearizable reads it cannot
//! answer a read either: the minority side answers nothing, and "no answer"
//! is never a grant.
//!
//! Idempotence: a claim whose transaction committed but whose answer was
//! lost is asked again by the client (or by the node later). The GET then
//! shows this node holding `epoch_seen + 1`, which [`decide`] grants again
//! without writing. Safe because the GET is linearizable: it sees every
//! transaction committed before it started.

use crate::backend::{error_chain, BoxFuture, RetryPolicy, Tries, WitnessBackend};
use crate::client::ClientError;
use crate::decide::{decide, log_decision, Decision};
use crate::proto::{ClusterStatus, RefuseCode};
use crate::server::ClaimOutcome;
use crate::store::ClusterState;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, TlsOptions, Txn,
    TxnOp,
};
use ftvm_config::witness::{check_cluster_name, check_node_name, WitnessClientConfig, WitnessKind};
use ftvm_transport::quic;
use std::time::Duration;

/// First word of every record this backend writes (the format's version).
pub const RECORD_FORMAT: &str = "ftvm-witness/1";
/// Name of the per-cluster key under `<key_prefix>/<cluster>/`.
const EPOCH_KEY: &str = "epoch";
/// Most clusters `status_all` lists (one witness serves at most 128 for `ftvm-witness`).
const MAX_LISTED: i64 = 1024;
/// GET, decide, transaction rounds in one try before it counts as no answer
/// (another claim won each time in between: only possible under a storm).
const ROUNDS_PER_TRY: u32 = 3;

/// The record an epoch key holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochRecord {
    pub epoch: u64,
    pub holder: String,
}

impl EpochRecord {
    /// The bytes stored in etcd.
    pub fn encode(&self) -> Vec<u8> {
        format!(
            "{RECORD_FORMAT} epoch={} holder={}",
            self.epoch, self.holder
        )
        .into_bytes()
    }

    /// Parses a stored value; `None` when it is not a record of this format.
    pub fn decode(value: &[u8]) -> Option<EpochRecord> {
        let text = std::str::from_utf8(value).ok()?;
        let mut words = text.split(' ');
        let (format, epoch, holder) = (words.next()?, words.next()?, words.next()?);
        if format != RECORD_FORMAT || words.next().is_some() {
            return None;
        }
        let epoch: u64 = epoch.strip_prefix("epoch=")?.parse().ok()?;
        let holder = holder.strip_prefix("holder=")?;
        if epoch == 0 || check_node_name(holder).is_err() {
            return None;
        }
        Some(EpochRecord {
            epoch,
            holder: holder.to_string(),
        })
    }
}

/// The key holding `cluster`'s epoch under `key_prefix`.
pub fn epoch_key(key_prefix: &str, cluster: &str) -> String {
    format!("{key_prefix}/{cluster}/{EPOCH_KEY}")
}

/// A client that claims epochs in an etcd cluster. It talks to one member
/// at a time (connecting on first use); a try that gets no answer drops
/// that connection and moves to the next member, so a dead or cut-off
/// member costs one try, not one in every few requests.
pub struct EtcdWitness {
    endpoints: Vec<String>,
    /// "etcd at <endpoints>", for messages.
    target: String,
    key_prefix: String,
    cluster: Option<String>,
    /// This node's name, from its certificate: the holder it writes.
    node: String,
    retry: RetryPolicy,
    request_timeout: Duration,
    options: ConnectOptions,
    members: tokio::sync::Mutex<Members>,
}

/// One connection per endpoint (made on use), and the endpoint in use.
#[derive(Default)]
struct Members {
    clients: Vec<Option<Client>>,
    current: usize,
}

impl std::fmt::Debug for EtcdWitness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdWitness")
            .field("endpoints", &self.endpoints)
            .field("key_prefix", &self.key_prefix)
            .field("cluster", &self.cluster)
            .field("node", &self.node)
            .finish()
    }
}

/// Why one try got no decision.
enum TryError {
    /// No answer (unreachable, no leader, timed out, ...): tried again.
    NoAnswer(String),
    /// etcd answered and refused, or answered nonsense: not tried again.
    Final(ClientError),
}

fn classify(what: &str, e: etcd_client::Error) -> TryError {
    use tonic::Code;
    if let etcd_client::Error::GRpcStatus(s) = &e {
        let refused = |code| {
            TryError::Final(ClientError::Refused {
                code,
                reason: format!("etcd refused the {what}: {}", s.message()),
            })
        };
        match s.code() {
            Code::PermissionDenied | Code::Unauthenticated => {
                return refused(RefuseCode::NotAuthorized)
            }
            Code::InvalidArgument => return refused(RefuseCode::BadRequest),
            _ => {}
        }
    }
    TryError::NoAnswer(format!("{what}: {}", error_chain(&e)))
}

impl EtcdWitness {
    /// A client as a `[witness]` table with `kind = "etcd"` describes. Reads
    /// and checks the PEM files now, naming any bad one.
    pub fn from_config(cfg: &WitnessClientConfig) -> Result<Self, ClientError> {
        if cfg.kind != WitnessKind::Etcd {
            return Err(ClientError::Config(format!(
                "kind = {:?} is not an etcd witness",
                cfg.kind.name()
            )));
        }
        if cfg.endpoints.is_empty() {
            return Err(ClientError::Config(
                "an etcd witness client needs `endpoints` in its [witness] table".into(),
            ));
        }
        // Parse every file first so that a bad one is named (tonic would
        // only fail at the first connection, without the path).
        quic::load_certs(&cfg.ca)?;
        let certs = quic::load_certs(&cfg.cert)?;
        quic::load_key(&cfg.key)?;
        let node = match certs.first() {
            Some(c) => quic::node_name_from_cert(c)?,
            None => return Err(ClientError::Config("no certificate".into())),
        };
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| ClientError::Config(format!("{}: {e}", p.display())))
        };
        let mut tls = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(&cfg.ca)?))
            .identity(Identity::from_pem(read(&cfg.cert)?, read(&cfg.key)?));
        if let Some(name) = &cfg.server_name {
            tls = tls.domain_name(name.clone());
        }
        let request_timeout = Duration::from_millis(cfg.request_timeout_ms);
        let options = ConnectOptions::new()
            .with_tls(tls)
            .with_connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .with_timeout(request_timeout)
            .with_keep_alive(
                Duration::from_millis(cfg.keep_alive_ms),
                Duration::from_millis(cfg.idle_timeout_ms),
            )
            // A member without a leader fails a request at once instead of
            // holding it: the minority side of a partition answers nothing, fast.
            .with_require_leader(true);
        Ok(EtcdWitness {
            target: format!("etcd at {}", cfg.endpoints.join(", ")),
            endpoints: cfg.endpoints.clone(),
            key_prefix: cfg.key_prefix().to_string(),
            cluster: cfg.cluster.clone(),
            node,
            retry: RetryPolicy::from_config(cfg),
            request_timeout,
            options,
            members: tokio::sync::Mutex::new(Members {
                clients: vec![None; cfg.endpoints.len()],
                current: 0,
            }),
        })
    }

    /// This node's name (from its certificate), written as the holder.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The key holding `cluster`'s epoch.
    pub fn epoch_key(&self, cluster: &str) -> String {
        epoch_key(&self.key_prefix, cluster)
    }

    /// The connection to the member in use (made on first use; tonic
    /// connects lazily, this only sets the endpoint up), and its index.
    async fn connection(&self) -> (usize, Result<Client, String>) {
        let mut m = self.members.lock().await;
        let i = m.current;
        if let Some(c) = m.clients.get(i).and_then(|c| c.clone()) {
            return (i, Ok(c));
        }
        let made = Client::connect([&self.endpoints[i]], Some(self.options.clone()))
            .await
            .map_err(|e| format!("connecting: {}", error_chain(&e)));
        if let (Ok(c), Some(slot)) = (&made, m.clients.get_mut(i)) {
            *slot = Some(c.clone());
        }
        (i, made)
    }

    /// Member `i` gave no answer: drop its connection and use the next one.
    async fn give_up_on(&self, i: usize) {
        let mut m = self.members.lock().await;
        if let Some(slot) = m.clients.get_mut(i) {
            *slot = None;
        }
        if m.current == i {
            m.current = (i + 1) % self.endpoints.len().max(1);
        }
    }

    /// Runs `op` up to the configured attempts, each bounded by the request
    /// timeout, moving to the next member after a try that got no answer.
    async fn with_tries<T, F, Fut>(&self, op: F) -> Result<T, ClientError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, TryError>>,
    {
        let mut tries = Tries::new(self.retry, &self.target);
        while tries.next().await.is_some() {
            let (i, connection) = self.connection().await;
            let result = match connection {
                Ok(client) => match tokio::time::timeout(self.request_timeout, op(client)).await {
                    Ok(r) => r,
                    Err(_) => Err(TryError::NoAnswer(format!(
                        "no answer within {:?}",
                        self.request_timeout
                    ))),
                },
                Err(why) => Err(TryError::NoAnswer(why)),
            };
            match result {
                Ok(v) => return Ok(v),
                Err(TryError::Final(e)) => return Err(e),
                Err(TryError::NoAnswer(why)) => {
                    self.give_up_on(i).await;
                    tries.failed(format!("{}: {why}", self.endpoints[i]));
                }
            }
        }
        Err(tries.no_answer())
    }

    /// Claims epoch `epoch_seen + 1` of `cluster` (see the module doc).
    async fn claim_epoch(
        &self,
        cluster: &str,
        epoch_seen: u64,
    ) -> Result<ClaimOutcome, ClientError> {
        check_cluster_name(cluster).map_err(|reason| ClientError::Refused {
            code: RefuseCode::UnknownCluster,
            reason,
        })?;
        let key = self.epoch_key(cluster);
        let outcome = self
            .with_tries(|client| self.claim_once(client, cluster, &key, epoch_seen))
            .await?;
        log_decision("etcd", cluster, &self.node, epoch_seen, &outcome);
        Ok(outcome)
    }

    async fn claim_once(
        &self,
        mut client: Client,
        cluster: &str,
        key: &str,
        epoch_seen: u64,
    ) -> Result<ClaimOutcome, TryError> {
        for _ in 0..ROUNDS_PER_TRY {
            let (state, stored) = read_epoch(&mut client, key).await?;
            match decide(&state, cluster, &self.node, epoch_seen) {
                Decision::Grant { epoch } => {
                    let record = EpochRecord {
                        epoch,
                        holder: self.node.clone(),
                    };
                    let unchanged = match &stored {
                        Some((value, revision)) => vec![
                            Compare::value(key, CompareOp::Equal, value.clone()),
                            Compare::mod_revision(key, CompareOp::Equal, *revision),
                        ],
                        // An absent key compares as mod revision 0.
                        None => vec![Compare::mod_revision(key, CompareOp::Equal, 0)],
                    };
                    let txn = Txn::new().when(unchanged).and_then(vec![TxnOp::put(
                        key,
                        record.encode(),
                        None,
                    )]);
                    let resp = client
                        .txn(txn)
                        .await
                        .map_err(|e| classify("claim transaction", e))?;
                    if resp.succeeded() {
                        return Ok(ClaimOutcome::Granted { epoch });
                    }
                    // Someone wrote first: read again and decide again.
                }
                Decision::Answer(outcome) => return Ok(outcome),
                Decision::Overflow => {
                    return Err(TryError::Final(ClientError::Refused {
                        code: RefuseCode::BadRequest,
                        reason: format!("epoch {epoch_seen} cannot be followed"),
                    }))
                }
            }
        }
        Err(TryError::NoAnswer(format!(
            "{key} changed under {ROUNDS_PER_TRY} claims in a row"
        )))
    }

    /// The state of `cluster` (a linearizable read).
    async fn status_of(&self, cluster: &str) -> Result<ClusterStatus, ClientError> {
        check_cluster_name(cluster).map_err(|reason| ClientError::Refused {
            code: RefuseCode::UnknownCluster,
            reason,
        })?;
        let key = self.epoch_key(cluster);
        let state = self
            .with_tries(|mut client| {
                let key = &key;
                async move { read_epoch(&mut client, key).await.map(|(s, _)| s) }
            })
            .await?;
        Ok(ClusterStatus {
            name: cluster.to_string(),
            epoch: state.epoch,
            holder: state.holder,
        })
    }

    /// Every cluster with an epoch key under the prefix, by name.
    async fn list(&self) -> Result<Vec<ClusterStatus>, ClientError> {
        let prefix = format!("{}/", self.key_prefix);
        let kvs = self
            .with_tries(|mut client| {
                let prefix = prefix.clone();
                async move {
                    let opts = GetOptions::new().with_prefix().with_limit(MAX_LISTED);
                    let resp = client
                        .get(prefix, Some(opts))
                        .await
                        .map_err(|e| classify("read", e))?;
                    Ok(resp
                        .kvs()
                        .iter()
                        .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
                        .collect::<Vec<_>>())
                }
            })
            .await?;
        let mut out = Vec::new();
        for (key, value) in kvs {
            let Some(cluster) = std::str::from_utf8(&key)
                .ok()
                .and_then(|k| k.strip_prefix(&prefix))
                .and_then(|k| k.strip_suffix(&format!("/{EPOCH_KEY}")))
                .filter(|c| check_cluster_name(c).is_ok())
            else {
                // Not an epoch key of ours (another tool's key under the prefix).
                continue;
            };
            let state = state_of(&String::from_utf8_lossy(&key), &value).map_err(|e| match e {
                TryError::Final(e) => e,
                TryError::NoAnswer(m) => ClientError::Protocol(m),
            })?;
            out.push(ClusterStatus {
                name: cluster.to_string(),
                epoch: state.epoch,
                holder: state.holder,
            });
        }
        Ok(out)
    }

    /// Drops the connections (a later request reconnects).
    async fn disconnect(&self) {
        for c in self.members.lock().await.clients.iter_mut() {
            *c = None;
        }
    }
}

/// The stored value and mod revision of an epoch key, when present.
type Stored = Option<(Vec<u8>, i64)>;

fn state_of(key: &str, value: &[u8]) -> Result<ClusterState, TryError> {
    let record = EpochRecord::decode(value).ok_or_else(|| {
        TryError::Final(ClientError::Protocol(format!(
            "etcd key {key} holds {:?}, not a witness record ({RECORD_FORMAT} epoch=<n> holder=<node>); not a grant",
            String::from_utf8_lossy(&value[..value.len().min(120)])
        )))
    })?;
    Ok(ClusterState {
        epoch: record.epoch,
        holder: Some(record.holder),
    })
}

/// Reads an epoch key (linearizable: it reflects every committed write).
async fn read_epoch(client: &mut Client, key: &str) -> Result<(ClusterState, Stored), TryError> {
    let resp = client
        .get(key, None)
        .await
        .map_err(|e| classify("read", e))?;
    match resp.kvs() {
        [] => Ok((ClusterState::default(), None)),
        [kv] => Ok((
            state_of(key, kv.value())?,
            Some((kv.value().to_vec(), kv.mod_revision())),
        )),
        more => Err(TryError::Final(ClientError::Protocol(format!(
            "etcd answered {} keys for the one key {key}",
            more.len()
        )))),
    }
}

impl WitnessBackend for EtcdWitness {
    fn kind(&self) -> WitnessKind {
        WitnessKind::Etcd
    }

    fn target(&self) -> &str {
        &self.target
    }

    fn cluster(&self) -> Option<&str> {
        self.cluster.as_deref()
    }

    fn claim_in<'a>(
        &'a self,
        cluster: &'a str,
        epoch_seen: u64,
    ) -> BoxFuture<'a, Result<ClaimOutcome, ClientError>> {
        Box::pin(self.claim_epoch(cluster, epoch_seen))
    }

    fn status_in<'a>(
        &'a self,
        cluster: &'a str,
    ) -> BoxFuture<'a, Result<ClusterStatus, ClientError>> {
        Box::pin(self.status_of(cluster))
    }

    fn status_all(&self) -> BoxFuture<'_, Result<Vec<ClusterStatus>, ClientError>> {
        Box::pin(self.list())
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.disconnect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let r = EpochRecord {
            epoch: 7,
            holder: "node-a".into(),
        };
        assert_eq!(r.encode(), b"ftvm-witness/1 epoch=7 holder=node-a");
        assert_eq!(EpochRecord::decode(&r.encode()), Some(r));
        for bad in [
            &b""[..],
            b"ftvm-witness/1 epoch=7",
            b"ftvm-witness/2 epoch=7 holder=node-a",
            b"ftvm-witness/1 epoch=0 holder=node-a",
            b"ftvm-witness/1 epoch=-1 holder=node-a",
            b"ftvm-witness/1 epoch=7 holder=Node A",
            b"ftvm-witness/1 epoch=7 holder=node-a extra",
            b"ftvm-witness/1  epoch=7 holder=node-a",
            b"\xff\xfe",
        ] {
            assert_eq!(EpochRecord::decode(bad), None, "{bad:?}");
        }
        assert_eq!(
            epoch_key("/ftvm/witness", "prod"),
            "/ftvm/witness/prod/epoch"
        );
    }
}

//! The client the appliance (and `ftvm-witness claim`) uses to ask the witness.
//!
//! Every request gets `attempts` tries, each bounded by the connect and
//! request timeouts, with a doubling pause between them. Retrying a claim is
//! safe: a claim the witness already granted to this node is granted again
//! (idempotent). When no try gets an answer the result is
//! [`ClientError::NoAnswer`], which is never a grant: the caller must not go
//! live on it.

use crate::backend::{BoxFuture, RetryPolicy, Tries, WitnessBackend};
use crate::proto::{
    self, ClusterStatus, RefuseCode, Request, RequestBody, Response, ResponseBody, CLOSE_DONE,
    KIND_REQUEST, KIND_RESPONSE, PROTOCOL_VERSION,
};
use crate::server::ClaimOutcome;
use ftvm_config::witness::{WitnessClientConfig, WitnessKind};
use ftvm_transport::frame::{read_frame_async, write_frame_async};
use ftvm_transport::quic::{self, QuicError, QuicOptions, TlsFiles, ALPN_WITNESS};
use ftvm_transport::quinn;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("witness client setup: {0}")]
    Setup(#[from] QuicError),
    /// The `[witness]` table cannot make this client (e.g. a required key is
    /// missing because the table was not validated).
    #[error("witness client setup: {0}")]
    Config(String),
    #[error("no cluster configured for this witness client")]
    NoCluster,
    /// No answer after every attempt. This is NOT a grant.
    #[error(
        "no answer from {target} after {attempts} attempt(s) (last: {last}); this is not a grant"
    )]
    NoAnswer {
        target: String,
        attempts: u32,
        last: String,
    },
    /// The witness answered and refused the request; nothing changed.
    #[error("witness refused the request ({code:?}): {reason}")]
    Refused { code: RefuseCode, reason: String },
    /// The witness's answer made no sense. This is NOT a grant.
    #[error("witness protocol violation: {0}; this is not a grant")]
    Protocol(String),
}

/// Timeouts and retries of a [`WitnessClient`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub attempts: u32,
    pub retry_backoff: Duration,
    pub quic: QuicOptions,
}

impl ClientOptions {
    fn retry(&self) -> RetryPolicy {
        RetryPolicy {
            attempts: self.attempts,
            backoff: self.retry_backoff,
        }
    }
}

/// A connection to one witness, opened on first use and reopened after a fault.
pub struct WitnessClient {
    address: String,
    /// "the witness at <address>", for messages.
    target: String,
    server_name: String,
    cluster: Option<String>,
    opts: ClientOptions,
    config: quinn::ClientConfig,
    state: tokio::sync::Mutex<Option<(quinn::Endpoint, quinn::Connection)>>,
}

impl std::fmt::Debug for WitnessClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WitnessClient")
            .field("address", &self.address)
            .field("server_name", &self.server_name)
            .field("cluster", &self.cluster)
            .finish()
    }
}

/// Why one attempt got no answer (retried).
struct Transient(String);

impl WitnessClient {
    /// A client as described by a `[witness]` (or `[control]`) table. Reads
    /// and checks the PEM files now, naming any bad one.
    pub fn from_config(cfg: &WitnessClientConfig) -> Result<Self, ClientError> {
        let missing = |k: &str| {
            ClientError::Config(format!(
                "an ftvm-witness client needs `{k}` in its [witness] table"
            ))
        };
        if cfg.kind != WitnessKind::Ftvm {
            return Err(ClientError::Config(format!(
                "kind = {:?} is not an ftvm-witness",
                cfg.kind.name()
            )));
        }
        let address = cfg.address.as_deref().ok_or_else(|| missing("address"))?;
        let server_name = cfg
            .server_name
            .as_deref()
            .ok_or_else(|| missing("server_name"))?;
        let retry = RetryPolicy::from_config(cfg);
        let opts = ClientOptions {
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            request_timeout: Duration::from_millis(cfg.request_timeout_ms),
            attempts: retry.attempts,
            retry_backoff: retry.backoff,
            quic: QuicOptions {
                keep_alive: Duration::from_millis(cfg.keep_alive_ms),
                idle_timeout: Duration::from_millis(cfg.idle_timeout_ms),
                max_bidi_streams: 0,
                max_uni_streams: 0,
                ..QuicOptions::default()
            },
        };
        let tls = TlsFiles {
            ca: cfg.ca.clone(),
            cert: cfg.cert.clone(),
            key: cfg.key.clone(),
        };
        Self::new(address, server_name, cfg.cluster.clone(), &tls, opts)
    }

    /// A client for the witness at `address` (`host:port`) whose certificate
    /// names `server_name`, authenticating with `tls`.
    pub fn new(
        address: &str,
        server_name: &str,
        cluster: Option<String>,
        tls: &TlsFiles,
        opts: ClientOptions,
    ) -> Result<Self, ClientError> {
        let config = quic::client_config(tls, &[ALPN_WITNESS], &opts.quic)?;
        Ok(WitnessClient {
            address: address.to_string(),
            target: format!("the witness at {address}"),
            server_name: server_name.to_string(),
            cluster,
            opts,
            config,
            state: tokio::sync::Mutex::new(None),
        })
    }

    /// Claims epoch `epoch_seen + 1` of the configured cluster.
    pub async fn claim(&self, epoch_seen: u64) -> Result<ClaimOutcome, ClientError> {
        let cluster = self.cluster.clone().ok_or(ClientError::NoCluster)?;
        self.claim_in(&cluster, epoch_seen).await
    }

    /// Claims epoch `epoch_seen + 1` of `cluster`.
    pub async fn claim_in(
        &self,
        cluster: &str,
        epoch_seen: u64,
    ) -> Result<ClaimOutcome, ClientError> {
        let body = RequestBody::Claim {
            cluster: cluster.to_string(),
            epoch_seen,
        };
        match self.request(body).await? {
            ResponseBody::Granted { cluster: c, epoch } if c == cluster => {
                if epoch_seen.checked_add(1) != Some(epoch) {
                    return Err(ClientError::Protocol(format!(
                        "granted epoch {epoch} for a claim on epoch {epoch_seen}"
                    )));
                }
                Ok(ClaimOutcome::Granted { epoch })
            }
            ResponseBody::Denied {
                cluster: c,
                holder,
                epoch,
            } if c == cluster => Ok(ClaimOutcome::Denied { holder, epoch }),
            other => Err(ClientError::Protocol(format!(
                "unexpected answer to a claim on {cluster:?}: {other:?}"
            ))),
        }
    }

    /// The state of the configured cluster.
    pub async fn status(&self) -> Result<ClusterStatus, ClientError> {
        let cluster = self.cluster.as_deref().ok_or(ClientError::NoCluster)?;
        self.status_in(cluster).await
    }

    /// The state of `cluster`, or of every cluster (operators only).
    pub async fn status_of(
        &self,
        cluster: Option<&str>,
    ) -> Result<Vec<ClusterStatus>, ClientError> {
        let body = RequestBody::Status {
            cluster: cluster.map(str::to_string),
        };
        match self.request(body).await? {
            ResponseBody::Status { clusters } => Ok(clusters),
            other => Err(ClientError::Protocol(format!(
                "unexpected answer to status: {other:?}"
            ))),
        }
    }

    /// Sends one request and returns the answer; a refusal is an error.
    pub async fn request(&self, body: RequestBody) -> Result<ResponseBody, ClientError> {
        let payload = proto::encode(&Request {
            version: PROTOCOL_VERSION,
            body,
        })
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut state = self.state.lock().await;
        let mut tries = Tries::new(self.opts.retry(), &self.target);
        while tries.next().await.is_some() {
            match self.attempt(&mut state, &payload).await {
                Ok(resp) => {
                    return match resp.body {
                        ResponseBody::Refused { code, reason } => {
                            Err(ClientError::Refused { code, reason })
                        }
                        body => Ok(body),
                    }
                }
                Err(Transient(why)) => {
                    // Start over with a fresh connection.
                    if let Some((ep, conn)) = state.take() {
                        conn.close(CLOSE_DONE.into(), b"retry");
                        ep.close(CLOSE_DONE.into(), b"retry");
                    }
                    tries.failed(why);
                }
            }
        }
        Err(tries.no_answer())
    }

    async fn resolve(&self) -> Result<SocketAddr, Transient> {
        let mut addrs = tokio::net::lookup_host(&self.address)
            .await
            .map_err(|e| Transient(format!("cannot resolve {}: {e}", self.address)))?;
        addrs
            .next()
            .ok_or_else(|| Transient(format!("{} resolves to no address", self.address)))
    }

    async fn attempt(
        &self,
        state: &mut Option<(quinn::Endpoint, quinn::Connection)>,
        payload: &[u8],
    ) -> Result<Response, Transient> {
        if state
            .as_ref()
            .is_some_and(|(_, c)| c.close_reason().is_some())
        {
            *state = None;
        }
        if state.is_none() {
            let addr = self.resolve().await?;
            let bind: SocketAddr = if addr.is_ipv6() {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            };
            let ep = quic::client_endpoint(bind, self.config.clone())
                .map_err(|e| Transient(e.to_string()))?;
            let conn = quic::connect(&ep, addr, &self.server_name, self.opts.connect_timeout)
                .await
                .map_err(|e| Transient(e.to_string()))?;
            *state = Some((ep, conn));
        }
        let conn = match state.as_ref() {
            Some((_, c)) => c.clone(),
            None => return Err(Transient("no connection".into())),
        };
        let exchange = async {
            let (mut send, mut recv) =
                conn.open_bi().await.map_err(|e| Transient(e.to_string()))?;
            write_frame_async(&mut send, KIND_REQUEST, payload, proto::DEFAULT_MAX_FRAME)
                .await
                .map_err(|e| Transient(e.to_string()))?;
            let _ = send.finish();
            let frame = read_frame_async(&mut recv, proto::MAX_RESPONSE_FRAME)
                .await
                .map_err(|e| Transient(format!("reading the answer: {e}")))?
                .ok_or_else(|| Transient("stream ended without an answer".into()))?;
            Ok::<_, Transient>(frame)
        };
        let frame = match tokio::time::timeout(self.opts.request_timeout, exchange).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Transient(format!(
                    "no answer within {:?}",
                    self.opts.request_timeout
                )))
            }
        };
        if frame.kind != KIND_RESPONSE {
            return Err(Transient(format!("answer frame of kind {}", frame.kind)));
        }
        proto::decode_response(&frame.payload)
            .map_err(|e| Transient(format!("undecodable answer: {e}")))
    }

    /// Closes the connection, if any.
    pub async fn close(&self) {
        if let Some((ep, conn)) = self.state.lock().await.take() {
            conn.close(CLOSE_DONE.into(), b"bye");
            ep.wait_idle().await;
        }
    }
}

impl WitnessBackend for WitnessClient {
    fn kind(&self) -> WitnessKind {
        WitnessKind::Ftvm
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
        Box::pin(WitnessClient::claim_in(self, cluster, epoch_seen))
    }

    fn status_in<'a>(
        &'a self,
        cluster: &'a str,
    ) -> BoxFuture<'a, Result<ClusterStatus, ClientError>> {
        Box::pin(async move {
            let mut all = self.status_of(Some(cluster)).await?;
            match all.pop() {
                Some(s) if all.is_empty() && s.name == cluster => Ok(s),
                _ => Err(ClientError::Protocol(
                    "status answer for another cluster".into(),
                )),
            }
        })
    }

    fn status_all(&self) -> BoxFuture<'_, Result<Vec<ClusterStatus>, ClientError>> {
        Box::pin(self.status_of(None))
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(WitnessClient::close(self))
    }
}

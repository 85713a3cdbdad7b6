//! One interface to the witness, whatever answers it: an `ftvm-witness`
//! process ([`crate::WitnessClient`]) or an etcd cluster
//! ([`crate::EtcdWitness`]). The appliance and `ftvm-witness claim|status`
//! hold a `Box<dyn WitnessBackend>` made by [`from_config`] from a
//! `[witness]` table, so both backends are asked, retried and reported the
//! same way.
//!
//! The three answers a claim can get are kept apart by type:
//!
//! - `Ok(ClaimOutcome::Granted { epoch })`: GRANTED, and durably recorded
//!   before it was answered. The only answer on which a node may go live.
//! - `Ok(ClaimOutcome::Denied { holder, epoch })`: DENIED; `holder` holds `epoch`.
//! - `Err(ClientError::NoAnswer { .. })`: NO ANSWER after every attempt.
//!   Never a grant. (Other errors, a refusal or a nonsensical answer, are not
//!   grants either.)

use crate::client::{ClientError, WitnessClient};
use crate::etcd::EtcdWitness;
use crate::proto::ClusterStatus;
use crate::server::ClaimOutcome;
use ftvm_config::witness::{WitnessClientConfig, WitnessKind};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A boxed future that can move between threads (what an object-safe async
/// method returns).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A witness client. Object safe (`Box<dyn WitnessBackend>`); every method
/// may be called from any tokio task, concurrently.
pub trait WitnessBackend: Send + Sync + std::fmt::Debug {
    /// Which backend this is.
    fn kind(&self) -> WitnessKind;

    /// Where it asks, for messages: the witness's address, or the etcd endpoints.
    fn target(&self) -> &str;

    /// The cluster of the `[witness]` table, if it named one.
    fn cluster(&self) -> Option<&str>;

    /// Claims epoch `epoch_seen + 1` of `cluster` for this node (the name in
    /// its certificate). Retried up to the configured attempts; a claim
    /// this node already won is granted again, so a retry after a lost
    /// answer is safe.
    fn claim_in<'a>(
        &'a self,
        cluster: &'a str,
        epoch_seen: u64,
    ) -> BoxFuture<'a, Result<ClaimOutcome, ClientError>>;

    /// The current epoch and holder of `cluster`.
    fn status_in<'a>(
        &'a self,
        cluster: &'a str,
    ) -> BoxFuture<'a, Result<ClusterStatus, ClientError>>;

    /// Every cluster the witness knows (an `ftvm-witness` answers this to
    /// operators only; etcd lists the clusters under the key prefix).
    fn status_all(&self) -> BoxFuture<'_, Result<Vec<ClusterStatus>, ClientError>>;

    /// Closes connections (they are reopened on the next request).
    fn close(&self) -> BoxFuture<'_, ()>;

    /// Claims epoch `epoch_seen + 1` of the configured cluster.
    fn claim(&self, epoch_seen: u64) -> BoxFuture<'_, Result<ClaimOutcome, ClientError>> {
        match self.cluster() {
            Some(cluster) => self.claim_in(cluster, epoch_seen),
            None => Box::pin(async { Err(ClientError::NoCluster) }),
        }
    }

    /// The state of the configured cluster.
    fn status(&self) -> BoxFuture<'_, Result<ClusterStatus, ClientError>> {
        match self.cluster() {
            Some(cluster) => self.status_in(cluster),
            None => Box::pin(async { Err(ClientError::NoCluster) }),
        }
    }
}

/// The client a `[witness]` table describes (`kind = "ftvm"` or `"etcd"`).
/// Reads and checks the PEM files now, naming any bad one; connects on first
/// use. Call it inside a tokio runtime.
pub fn from_config(cfg: &WitnessClientConfig) -> Result<Box<dyn WitnessBackend>, ClientError> {
    Ok(match cfg.kind {
        WitnessKind::Ftvm => Box::new(WitnessClient::from_config(cfg)?),
        WitnessKind::Etcd => Box::new(EtcdWitness::from_config(cfg)?),
    })
}

/// How often and how patiently a request is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries per request (at least 1).
    pub attempts: u32,
    /// Pause before the second try; doubles before each later one.
    pub backoff: Duration,
}

impl RetryPolicy {
    /// The policy of a `[witness]` table.
    pub fn from_config(cfg: &WitnessClientConfig) -> Self {
        RetryPolicy {
            attempts: cfg.attempts.max(1),
            backoff: Duration::from_millis(cfg.retry_backoff_ms),
        }
    }
}

/// Counts the tries of one request: `while let Some(n) = tries.next().await`
/// runs the request, `failed` records why a try got no answer, and
/// `no_answer` is the result when every try failed.
pub(crate) struct Tries<'a> {
    policy: RetryPolicy,
    target: &'a str,
    done: u32,
    pause: Duration,
    last: String,
}

impl<'a> Tries<'a> {
    pub(crate) fn new(policy: RetryPolicy, target: &'a str) -> Self {
        Tries {
            policy,
            target,
            done: 0,
            pause: policy.backoff,
            last: String::new(),
        }
    }

    /// The number of the next try (from 1), after the pause that precedes
    /// it; `None` when every try was used.
    pub(crate) async fn next(&mut self) -> Option<u32> {
        if self.done >= self.policy.attempts.max(1) {
            return None;
        }
        if self.done > 0 {
            tokio::time::sleep(self.pause).await;
            self.pause = self.pause.saturating_mul(2);
        }
        self.done += 1;
        Some(self.done)
    }

    /// The current try got no answer, because of `why`.
    pub(crate) fn failed(&mut self, why: String) {
        tracing::warn!(target_witness = %self.target, attempt = self.done, attempts = self.policy.attempts, reason = %why, "witness request got no answer");
        self.last = why;
    }

    /// Every try failed: no answer, which is not a grant.
    pub(crate) fn no_answer(self) -> ClientError {
        ClientError::NoAnswer {
            target: self.target.to_string(),
            attempts: self.done,
            last: self.last,
        }
    }
}

/// An error and its causes as one line, skipping a cause whose text the
/// previous message already contains (libraries often repeat their source).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut prev = String::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !prev.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
            prev = text;
        }
        cur = err.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tries_pause_doubling_and_report_the_last_reason() {
        let policy = RetryPolicy {
            attempts: 3,
            backoff: Duration::from_millis(100),
        };
        let mut tries = Tries::new(policy, "witness at x");
        let start = tokio::time::Instant::now();
        let mut seen = Vec::new();
        while let Some(n) = tries.next().await {
            seen.push((n, start.elapsed().as_millis()));
            tries.failed(format!("reason {n}"));
        }
        assert_eq!(seen, [(1, 0), (2, 100), (3, 300)]);
        match tries.no_answer() {
            ClientError::NoAnswer {
                target,
                attempts,
                last,
            } => assert_eq!(
                (target.as_str(), attempts, last.as_str()),
                ("witness at x", 3, "reason 3")
            ),
            other => panic!("{other:?}"),
        }
    }

    /// A stand-in backend, to test the trait's own methods (the layer above
    /// the real clients, which are tested against real witnesses).
    #[derive(Debug)]
    struct Recorder {
        cluster: Option<String>,
        asked: std::sync::Mutex<Vec<(String, u64)>>,
    }

    impl WitnessBackend for Recorder {
        fn kind(&self) -> WitnessKind {
            WitnessKind::Ftvm
        }
        fn target(&self) -> &str {
            "recorder"
        }
        fn cluster(&self) -> Option<&str> {
            self.cluster.as_deref()
        }
        fn claim_in<'a>(
            &'a self,
            cluster: &'a str,
            epoch_seen: u64,
        ) -> BoxFuture<'a, Result<ClaimOutcome, ClientError>> {
            self.asked
                .lock()
                .unwrap()
                .push((cluster.to_string(), epoch_seen));
            Box::pin(async move {
                Ok(ClaimOutcome::Granted {
                    epoch: epoch_seen + 1,
                })
            })
        }
        fn status_in<'a>(
            &'a self,
            cluster: &'a str,
        ) -> BoxFuture<'a, Result<ClusterStatus, ClientError>> {
            Box::pin(async move {
                Ok(ClusterStatus {
                    name: cluster.to_string(),
                    epoch: 0,
                    holder: None,
                })
            })
        }
        fn status_all(&self) -> BoxFuture<'_, Result<Vec<ClusterStatus>, ClientError>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn close(&self) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    #[tokio::test]
    async fn claim_and_status_use_the_configured_cluster_from_any_task() {
        let recorder = std::sync::Arc::new(Recorder {
            cluster: Some("prod".into()),
            asked: Default::default(),
        });
        let backend: std::sync::Arc<dyn WitnessBackend> = recorder.clone();
        // The futures are Send: a claim can run on any tokio worker.
        let b = backend.clone();
        let outcome = tokio::spawn(async move { b.claim(4).await })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(outcome, ClaimOutcome::Granted { epoch: 5 });
        assert_eq!(*recorder.asked.lock().unwrap(), [("prod".to_string(), 4)]);
        assert_eq!(backend.status().await.unwrap().name, "prod");
        let none: Box<dyn WitnessBackend> = Box::new(Recorder {
            cluster: None,
            asked: Default::default(),
        });
        assert!(matches!(none.claim(0).await, Err(ClientError::NoCluster)));
        assert!(matches!(none.status().await, Err(ClientError::NoCluster)));
    }

    #[test]
    fn error_chain_skips_repeated_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Outer(#[source] Inner);
        #[derive(Debug, thiserror::Error)]
        #[error("inner")]
        struct Inner(#[source] std::io::Error);
        let e = Outer(Inner(std::io::Error::other("disk")));
        assert_eq!(error_chain(&e), "outer: inner: disk");
    }
}

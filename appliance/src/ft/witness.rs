//! Asking the witness (DESIGN.md 6). No answer is never a grant: a claim is
//! retried with backoff, every attempt logged, until the witness answers or
//! the node is told to stop. Until then the node stays silent.

use ftvm_witness::{ClaimOutcome, ClientError, WitnessBackend};
use std::time::Duration;
use tokio::sync::watch;

/// Longest pause between two claim attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How a claim ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimResult {
    Granted {
        epoch: u64,
    },
    Denied {
        holder: Option<String>,
        epoch: u64,
    },
    /// The witness refused the request itself (not a member, unknown
    /// cluster): retrying cannot help.
    Refused(String),
    /// The node was told to stop before the witness answered.
    Stopped,
}

/// Claims epoch `epoch_seen + 1`, retrying until an answer or `stop`.
pub async fn claim(
    witness: &dyn WitnessBackend,
    epoch_seen: u64,
    why: &str,
    stop: &mut watch::Receiver<bool>,
) -> ClaimResult {
    let mut backoff = Duration::from_millis(200);
    let mut attempt = 0u32;
    loop {
        if *stop.borrow() {
            tracing::warn!(
                epoch = epoch_seen + 1,
                attempt,
                "claim abandoned: the node is stopping"
            );
            return ClaimResult::Stopped;
        }
        attempt += 1;
        tracing::warn!(
            attempt,
            epoch = epoch_seen + 1,
            reason = why,
            "claiming the next epoch from the witness"
        );
        match witness.claim(epoch_seen).await {
            Ok(ClaimOutcome::Granted { epoch }) => {
                tracing::warn!(epoch, "the witness GRANTED epoch {epoch}");
                return ClaimResult::Granted { epoch };
            }
            Ok(ClaimOutcome::Denied { holder, epoch }) => {
                tracing::error!(
                    holder = holder.as_deref().unwrap_or("nobody"),
                    epoch,
                    "the witness DENIED the claim"
                );
                return ClaimResult::Denied { holder, epoch };
            }
            Err(ClientError::Refused { code, reason }) => {
                let why = format!("the witness refused the request ({code:?}): {reason}");
                tracing::error!("{why}");
                return ClaimResult::Refused(why);
            }
            Err(e) => {
                tracing::error!(attempt, error = %e, retry_in_ms = backoff.as_millis() as u64, "no answer from the witness: NOT going live; staying silent and retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

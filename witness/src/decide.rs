//! The claim rule, in one place: both backends (the `ftvm-witness` service
//! and the etcd client) decide a claim from the cluster's current state with
//! [`decide`], so they cannot drift apart. See docs/witness.md, "Semantics".

use crate::server::ClaimOutcome;
use crate::store::ClusterState;

/// What a claim on `epoch_seen` by a node gets, given the current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The current epoch is `epoch_seen`: the node gets `epoch`
    /// (`epoch_seen + 1`) once that is durably recorded with it as holder.
    Grant { epoch: u64 },
    /// An answer that writes nothing: `Granted` again when the node already
    /// holds `epoch_seen + 1` (its earlier claim won, e.g. one whose answer
    /// was lost); otherwise `Denied` with the current holder and epoch
    /// (someone else won `epoch_seen + 1`, or `epoch_seen` is stale, or it is
    /// ahead of anything granted, which is logged as a warning).
    Answer(ClaimOutcome),
    /// `epoch_seen` is `u64::MAX`: there is no next epoch.
    Overflow,
}

/// Decides a claim by `node` in `cluster` on `epoch_seen` against `current`.
pub fn decide(current: &ClusterState, cluster: &str, node: &str, epoch_seen: u64) -> Decision {
    let next = epoch_seen.checked_add(1);
    if epoch_seen == current.epoch {
        return match next {
            Some(epoch) => Decision::Grant { epoch },
            None => Decision::Overflow,
        };
    }
    if next == Some(current.epoch) && current.holder.as_deref() == Some(node) {
        return Decision::Answer(ClaimOutcome::Granted {
            epoch: current.epoch,
        });
    }
    if epoch_seen > current.epoch {
        // The node's epoch did not come from this witness (e.g. its state
        // was replaced): granting would not be safe to reason about.
        tracing::warn!(
            cluster,
            node,
            epoch_seen,
            epoch = current.epoch,
            "claim names an epoch the witness never granted"
        );
    }
    Decision::Answer(ClaimOutcome::Denied {
        holder: current.holder.clone(),
        epoch: current.epoch,
    })
}

/// Logs a decided claim at `info` with the fields docs/witness.md names
/// (`cluster`, `node`, `epoch_seen`, `epoch`, `holder`, `outcome`), and
/// which backend decided it.
pub fn log_decision(
    backend: &str,
    cluster: &str,
    node: &str,
    epoch_seen: u64,
    outcome: &ClaimOutcome,
) {
    match outcome {
        ClaimOutcome::Granted { epoch } => tracing::info!(
            backend,
            cluster,
            node,
            epoch_seen,
            epoch,
            outcome = "granted",
            "claim decided"
        ),
        ClaimOutcome::Denied { holder, epoch } => tracing::info!(
            backend,
            cluster,
            node,
            epoch_seen,
            epoch,
            holder = holder.as_deref().unwrap_or("-"),
            outcome = "denied",
            "claim decided"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(epoch: u64, holder: Option<&str>) -> ClusterState {
        ClusterState {
            epoch,
            holder: holder.map(str::to_string),
        }
    }

    #[test]
    fn the_rule() {
        let d = |st: &ClusterState, node: &str, seen: u64| decide(st, "c", node, seen);
        assert_eq!(d(&state(0, None), "a", 0), Decision::Grant { epoch: 1 });
        assert_eq!(
            d(&state(1, Some("a")), "a", 0),
            Decision::Answer(ClaimOutcome::Granted { epoch: 1 })
        );
        assert_eq!(
            d(&state(1, Some("a")), "b", 0),
            Decision::Answer(ClaimOutcome::Denied {
                holder: Some("a".into()),
                epoch: 1
            })
        );
        // Stale by two: denied even for the holder of the current epoch;
        // ahead: denied too.
        for (node, seen) in [("a", 1), ("b", 7)] {
            assert_eq!(
                d(&state(3, Some("a")), node, seen),
                Decision::Answer(ClaimOutcome::Denied {
                    holder: Some("a".into()),
                    epoch: 3
                })
            );
        }
        assert_eq!(
            d(&state(u64::MAX, Some("a")), "b", u64::MAX),
            Decision::Overflow
        );
    }
}

//! The claim rule, in one place: both backends (the `ftvm-witness` service
//! and the etcd client) decide a claim from the cluster's current state with
//! [`decide`], so they cannot drift apart. See docs/witness.md, "Semantics".

use crate::store::ClusterState;

/// What a claim on `epoch_seen` by a node gets, given the current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The current epoch is `epoch_seen`: the node gets `epoch`
    /// (`epoch_seen + 1`) once that is durably recorded with it as holder.
    Grant { epoch: u64 },
    /// The node already holds `epoch_seen + 1` (its earlier claim won, e.g.
    /// one whose answer was lost): granted again, nothing is written.
    AlreadyHeld { epoch: u64 },
    /// Someone else won `epoch_seen + 1`, or `epoch_seen` is stale, or it is
    /// ahead of anything granted (`ahead`): denied with the current state.
    Deny {
        holder: Option<String>,
        epoch: u64,
        ahead: bool,
    },
    /// `epoch_seen` is `u64::MAX`: there is no next epoch.
    Overflow,
}

/// Decides a claim by `node` on `epoch_seen` against `current`.
pub fn decide(current: &ClusterState, node: &str, epoch_seen: u64) -> Decision {
    let next = epoch_seen.checked_add(1);
    if epoch_seen == current.epoch {
        match next {
            Some(epoch) => Decision::Grant { epoch },
            None => Decision::Overflow,
        }
    } else if next == Some(current.epoch) && current.holder.as_deref() == Some(node) {
        Decision::AlreadyHeld {
            epoch: current.epoch,
        }
    } else {
        Decision::Deny {
            holder: current.holder.clone(),
            epoch: current.epoch,
            ahead: epoch_seen > current.epoch,
        }
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
        assert_eq!(
            decide(&state(0, None), "a", 0),
            Decision::Grant { epoch: 1 }
        );
        assert_eq!(
            decide(&state(1, Some("a")), "a", 0),
            Decision::AlreadyHeld { epoch: 1 }
        );
        assert_eq!(
            decide(&state(1, Some("a")), "b", 0),
            Decision::Deny {
                holder: Some("a".into()),
                epoch: 1,
                ahead: false
            }
        );
        // Stale by two: denied even for the holder of the current epoch.
        assert!(matches!(
            decide(&state(3, Some("a")), "a", 1),
            Decision::Deny { ahead: false, .. }
        ));
        assert!(matches!(
            decide(&state(3, Some("a")), "b", 7),
            Decision::Deny { ahead: true, .. }
        ));
        assert_eq!(
            decide(&state(u64::MAX, Some("a")), "b", u64::MAX),
            Decision::Overflow
        );
    }
}

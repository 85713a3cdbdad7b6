//! The node's role: one state machine, every transition in [`next`], each
//! logged with its reason. Status and metrics read the role from here; no
//! other part of the node keeps its own copy.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Starting
//!     Starting --> Primary: Granted (first epoch, started with --primary)
//!     Starting --> Backup: Paired (hello accepted by the primary)
//!     Starting --> Fenced: Denied / Fence (stored fence, stale epoch)
//!     Backup --> GoingLive: PeerFailed (detector verdict)
//!     GoingLive --> Solo: Granted (witness: next epoch is ours)
//!     GoingLive --> Fenced: Denied (the other site holds it)
//!     GoingLive --> Backup: PeerBack (the primary answered again before any claim)
//!     Primary --> Solo: Granted (backup failed; witness: next epoch is ours)
//!     Primary --> Fenced: Denied (the backup won the epoch)
//!     Solo --> Primary: Paired (a new backup attached)
//!     Backup --> Fenced: Diverged (no longer a valid copy)
//!     Backup --> Solo: Forced (operator: go-live --force)
//!     GoingLive --> Solo: Forced
//!     Primary --> Fenced: Fence
//!     Solo --> Fenced: Fence
//!     Fenced --> Backup: Rejoined (re-protection)
//!     Primary --> Backup: SwitchedOver (planned switchover)
//!     Backup --> Primary: SwitchedOver
//! ```
//!
//! Any state may go to `Stopped` (clean shutdown). Every other (state,
//! event) pair is refused with an error and changes nothing.

use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What a node is doing in the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Reading stored state, asking the witness or the peer.
    Starting,
    /// Replaying the primary's log; silent on the network.
    Backup,
    /// Live, protected: outputs wait until the backup has the log entries
    /// they depend on.
    Primary,
    /// Live, unprotected: the witness granted this node the epoch in which
    /// it runs alone; outputs leave at once.
    Solo,
    /// A backup whose primary failed: claiming the next epoch, then draining
    /// the log and switching to the live world.
    GoingLive,
    /// Stopped for good in this epoch; emits nothing; can only come back as
    /// a backup through re-protection.
    Fenced,
    /// Shut down on purpose.
    Stopped,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Starting => "starting",
            Role::Backup => "backup",
            Role::Primary => "primary",
            Role::Solo => "solo",
            Role::GoingLive => "going-live",
            Role::Fenced => "fenced",
            Role::Stopped => "stopped",
        }
    }

    /// Whether the guest's outputs may reach the network in this role.
    pub fn is_live(self) -> bool {
        matches!(self, Role::Primary | Role::Solo)
    }
}

/// Something that may change the role, with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The witness granted this node `epoch`.
    Granted { epoch: u64 },
    /// The witness gave the epoch to `holder`.
    Denied { holder: Option<String>, epoch: u64 },
    /// A pairing was accepted (`peer` is the other node).
    Paired { peer: String, epoch: u64 },
    /// The failure detector declared the peer failed.
    PeerFailed { why: String },
    /// The peer answered again before this node claimed anything.
    PeerBack,
    /// Replay diverged at `ordinal`.
    Diverged { ordinal: u64, what: String },
    /// Stop emitting and never go live in this epoch.
    Fence { reason: String },
    /// An operator forced go-live (`ftvm go-live --force`).
    Forced { epoch: u64 },
    /// Re-protection made this node a backup again.
    Rejoined { peer: String, epoch: u64 },
    /// A planned switchover swapped the roles.
    SwitchedOver { epoch: u64 },
    /// Clean shutdown.
    Stop { why: String },
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Granted { epoch } => write!(f, "the witness granted epoch {epoch}"),
            Event::Denied { holder, epoch } => write!(
                f,
                "the witness denied the claim: {} holds epoch {epoch}",
                holder.as_deref().unwrap_or("nobody")
            ),
            Event::Paired { peer, epoch } => write!(f, "paired with {peer} in epoch {epoch}"),
            Event::PeerFailed { why } => write!(f, "peer failed: {why}"),
            Event::PeerBack => write!(f, "the peer answered again"),
            Event::Diverged { ordinal, what } => write!(f, "diverged at exit {ordinal}: {what}"),
            Event::Fence { reason } => write!(f, "fenced: {reason}"),
            Event::Forced { epoch } => {
                write!(f, "an operator forced go-live in epoch {epoch}")
            }
            Event::Rejoined { peer, epoch } => {
                write!(f, "rejoined {peer} as its backup in epoch {epoch}")
            }
            Event::SwitchedOver { epoch } => write!(f, "switchover to epoch {epoch}"),
            Event::Stop { why } => write!(f, "stopping: {why}"),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("role {from} refuses event: {event}")]
pub struct TransitionRefused {
    pub from: &'static str,
    pub event: String,
}

/// The transition table: the next role for `event` in `role`, or a refusal.
pub fn next(role: Role, event: &Event) -> Result<Role, TransitionRefused> {
    use Event as E;
    use Role as R;
    let to = match (role, event) {
        (R::Stopped, _) => None,
        (_, E::Stop { .. }) => Some(R::Stopped),
        (R::Starting, E::Granted { .. }) => Some(R::Primary),
        (R::Starting, E::Paired { .. }) => Some(R::Backup),
        (R::Starting, E::Denied { .. }) => Some(R::Fenced),
        (R::Backup, E::PeerFailed { .. }) => Some(R::GoingLive),
        (R::Backup, E::Diverged { .. }) => Some(R::Fenced),
        (R::Backup, E::SwitchedOver { .. }) => Some(R::Primary),
        (R::GoingLive, E::Granted { .. }) => Some(R::Solo),
        (R::GoingLive, E::Denied { .. }) => Some(R::Fenced),
        (R::GoingLive, E::PeerBack) => Some(R::Backup),
        (R::Backup | R::GoingLive | R::Starting, E::Forced { .. }) => Some(R::Solo),
        (R::Primary, E::PeerFailed { .. }) => Some(R::Primary),
        (R::Primary, E::Granted { .. }) => Some(R::Solo),
        (R::Primary, E::Denied { .. }) => Some(R::Fenced),
        (R::Primary, E::Paired { .. }) => Some(R::Primary),
        (R::Primary, E::SwitchedOver { .. }) => Some(R::Backup),
        (R::Solo, E::Paired { .. }) => Some(R::Primary),
        (R::Fenced, E::Rejoined { .. }) => Some(R::Backup),
        (R::Fenced, E::Fence { .. }) => Some(R::Fenced),
        (R::Primary | R::Solo | R::Backup | R::GoingLive | R::Starting, E::Fence { .. }) => {
            Some(R::Fenced)
        }
        _ => None,
    };
    to.ok_or_else(|| TransitionRefused {
        from: role.name(),
        event: event.to_string(),
    })
}

/// The role now, the epoch it belongs to, and why it was entered.
#[derive(Debug, Clone, Serialize)]
pub struct RoleSnapshot {
    pub role: Role,
    pub epoch: u64,
    pub reason: String,
    #[serde(skip)]
    pub since: Instant,
}

/// The node's one copy of its role, shared by every task of the node.
#[derive(Debug, Clone)]
pub struct RoleCell {
    inner: Arc<Mutex<RoleSnapshot>>,
}

impl RoleCell {
    pub fn new(epoch: u64) -> Self {
        RoleCell {
            inner: Arc::new(Mutex::new(RoleSnapshot {
                role: Role::Starting,
                epoch,
                reason: "starting".into(),
                since: Instant::now(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RoleSnapshot> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self) -> RoleSnapshot {
        self.lock().clone()
    }

    pub fn role(&self) -> Role {
        self.lock().role
    }

    /// [`RoleCell::apply`] where a refusal needs no handling (it is logged).
    pub fn apply_quiet(&self, event: Event) {
        let _ = self.apply(event);
    }

    /// Applies `event`: the new role, or a refusal that changes nothing.
    /// Events that carry an epoch move the recorded epoch forward.
    pub fn apply(&self, event: Event) -> Result<Role, TransitionRefused> {
        let mut s = self.lock();
        let to = match next(s.role, &event) {
            Ok(to) => to,
            Err(e) => {
                tracing::error!(role = s.role.name(), event = %event, "role transition refused");
                return Err(e);
            }
        };
        let from = s.role;
        if let Event::Granted { epoch }
        | Event::Paired { epoch, .. }
        | Event::Forced { epoch }
        | Event::Rejoined { epoch, .. }
        | Event::SwitchedOver { epoch } = &event
        {
            s.epoch = s.epoch.max(*epoch);
        }
        s.role = to;
        s.reason = event.to_string();
        s.since = Instant::now();
        if matches!(to, Role::Fenced) {
            tracing::error!(from = from.name(), to = to.name(), epoch = s.epoch, reason = %s.reason, "role change");
        } else {
            tracing::warn!(from = from.name(), to = to.name(), epoch = s.epoch, reason = %s.reason, "role change");
        }
        Ok(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLES: [Role; 7] = [
        Role::Starting,
        Role::Backup,
        Role::Primary,
        Role::Solo,
        Role::GoingLive,
        Role::Fenced,
        Role::Stopped,
    ];

    fn events() -> Vec<Event> {
        vec![
            Event::Granted { epoch: 2 },
            Event::Denied {
                holder: Some("b".into()),
                epoch: 2,
            },
            Event::Paired {
                peer: "b".into(),
                epoch: 1,
            },
            Event::PeerFailed { why: "x".into() },
            Event::PeerBack,
            Event::Diverged {
                ordinal: 1,
                what: "x".into(),
            },
            Event::Fence { reason: "x".into() },
            Event::Forced { epoch: 2 },
            Event::Rejoined {
                peer: "a".into(),
                epoch: 2,
            },
            Event::SwitchedOver { epoch: 2 },
            Event::Stop { why: "x".into() },
        ]
    }

    #[test]
    fn no_transition_makes_two_live_roles_from_one_without_the_witness() {
        // Only a grant (or an operator's force) may make a non-live node
        // live; a backup never becomes live on a detector verdict alone.
        for role in ROLES {
            for e in events() {
                if let Ok(to) = next(role, &e) {
                    if to.is_live() && !role.is_live() {
                        assert!(
                            matches!(
                                e,
                                Event::Granted { .. }
                                    | Event::Forced { .. }
                                    | Event::SwitchedOver { .. }
                            ),
                            "{role:?} --{e}--> {to:?} goes live without the witness"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn fenced_and_stopped_are_sticky() {
        for e in events() {
            if let Ok(to) = next(Role::Fenced, &e) {
                assert!(
                    matches!(to, Role::Fenced | Role::Backup | Role::Stopped),
                    "fenced --{e}--> {to:?}"
                );
                if to == Role::Backup {
                    assert!(matches!(e, Event::Rejoined { .. }));
                }
            }
            assert!(next(Role::Stopped, &e).is_err());
        }
    }

    #[test]
    fn table_walk() {
        assert_eq!(
            next(Role::Backup, &Event::PeerFailed { why: "x".into() }),
            Ok(Role::GoingLive)
        );
        assert_eq!(
            next(Role::GoingLive, &Event::Granted { epoch: 2 }),
            Ok(Role::Solo)
        );
        assert!(next(Role::Backup, &Event::Granted { epoch: 2 }).is_err());
        assert!(next(Role::Solo, &Event::Granted { epoch: 3 }).is_err());
        let cell = RoleCell::new(0);
        assert_eq!(cell.apply(Event::Granted { epoch: 1 }), Ok(Role::Primary));
        assert_eq!(cell.get().epoch, 1);
        assert!(cell.apply(Event::PeerBack).is_err());
        assert_eq!(cell.role(), Role::Primary, "a refusal changes nothing");
    }
}

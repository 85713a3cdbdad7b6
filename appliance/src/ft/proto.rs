//! The log channel's wire protocol between the two nodes of a pair.
//!
//! One QUIC connection (ALPN `ftvm-log/1`, mutual TLS with the cluster CA),
//! dialled by the backup to the primary's `ft.listen` address:
//!
//! ```mermaid
//! sequenceDiagram
//!     participant B as backup
//!     participant P as primary
//!     B->>P: connect (QUIC + mutual TLS, ALPN ftvm-log/1)
//!     B->>P: control stream: Hello {version, cluster, node, epoch, shape, disk root, received}
//!     alt any check fails (either side)
//!         P-->>B: Refused {reason}   (or B-->>P: Refused)
//!         P-->>B: close connection
//!     else paired
//!         P->>B: Welcome {node, epoch, log header, resume_from}
//!         P->>B: log stream (unidirectional): entries frames from resume_from
//!         loop
//!             B->>P: Ack {received}            (entries received, not yet replayed)
//!             B->>P: ReplayStatus {replayed, ordinal, clock}
//!             P->>B: Heartbeat / B->>P: Heartbeat
//!         end
//!         B->>P: Diverged {ordinal, what}      (the backup is no longer a copy)
//!         P->>B: Goodbye {reason}              (clean stop: the log ends with End)
//!     end
//! ```
//!
//! Control messages are [`Message`]s (postcard) in frames of kind
//! [`FRAME_CONTROL`] on the bidirectional control stream; the log stream
//! carries frames of kind `replay::log::FRAME_ENTRIES` only, each one a
//! batch with its epoch and first index. A frame that does not decode ends
//! the connection; nothing from it is replayed.
//!
//! **Versioning.** Every control message starts with the sender's protocol
//! version, decoded on its own before the rest. A node accepts only
//! [`PROTOCOL_VERSION`]; a Hello from another version is answered with
//! `Refused` naming both versions (encoded in this node's version). The
//! version is bumped for breaking changes only. The log format version is
//! agreed in the Hello as well.
//!
//! Every enum starts with a reserved `Invalid = 0`, so a zeroed buffer never
//! decodes to a meaningful message.

use crate::replay::log::{DiskReads, LogHeader, MachineShape};
use serde::{Deserialize, Serialize};

/// The log channel protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 2;
/// Frame kind of a control message.
pub const FRAME_CONTROL: u8 = 3;
/// Largest control frame payload.
pub const MAX_CONTROL_FRAME: usize = 64 << 10;

/// QUIC application close codes of the log channel.
pub const CLOSE_DONE: u32 = 0;
/// The pairing was refused (the reason went in a `Refused` message).
pub const CLOSE_REFUSED: u32 = 1;
/// A frame did not decode.
pub const CLOSE_BAD_FRAME: u32 = 2;
/// A newer session from the same peer replaced this one.
pub const CLOSE_REPLACED: u32 = 3;
/// This node is stopping.
pub const CLOSE_SHUTDOWN: u32 = 4;

/// A control message: the version first, then the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub version: u16,
    pub body: Control,
}

/// Where a backup stands, sent in its Hello so the primary resumes there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Index of the last log entry received (0: none yet).
    pub received: u64,
    /// Exits its machine has made (0 from power-on; after a switchover, the
    /// exit at which the roles swapped).
    pub ordinal: u64,
}

/// Whether a backup asks for a full copy (re-protection) when it cannot
/// follow the primary's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinRequest {
    Invalid,
    /// Only follow the log (from power-on, or resuming).
    No,
    /// Join if the primary's policy (`ft.reprotect = "auto"`) allows it.
    IfAllowed,
    /// An operator started this node with `--join`: join.
    Operator,
}

/// The backup's opening message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub cluster: String,
    /// The sender's node name (also checked against its certificate).
    pub node: String,
    /// The node the sender believes it talks to.
    pub peer: String,
    /// The sender's stored epoch.
    pub epoch: u64,
    pub log_format: u16,
    pub shape: MachineShape,
    /// The sender's disk Merkle root now.
    pub disk_root: Option<[u8; 32]>,
    pub disk_reads: DiskReads,
    pub position: Position,
    pub join: JoinRequest,
}

/// The primary's acceptance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub node: String,
    pub epoch: u64,
    /// The header of the log the primary records (where it starts).
    pub header: LogHeader,
    /// The first entry index the log stream will carry.
    pub resume_from: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    Invalid,
    Hello(Hello),
    Welcome(Welcome),
    /// The pairing is refused; `reason` says why. The connection closes.
    Refused {
        reason: String,
    },
    /// Backup: every entry up to `received` has arrived (not yet replayed).
    Ack {
        received: u64,
    },
    /// Backup: where replay is.
    ReplayStatus {
        /// Index of the last entry replayed.
        replayed: u64,
        /// Exit ordinal reached.
        ordinal: u64,
        /// Guest clock of the last exit replayed, ns.
        clock_ns: u64,
    },
    /// Either side: still alive (`sent_ns` is the sender's monotonic time,
    /// echoed for round-trip measurement).
    Heartbeat {
        sent_ns: u64,
    },
    /// Backup: replay diverged; the backup is no longer a valid copy.
    Diverged {
        ordinal: u64,
        what: String,
    },
    /// Either side: the session ends on purpose (clean stop).
    Goodbye {
        reason: String,
    },
    /// Primary: the backup will be re-protected: a full copy over the sync
    /// stream, then a Welcome at the cut-over.
    JoinAccepted {
        epoch: u64,
        /// Leaves per group of the disk comparison.
        group: u64,
    },
    /// Primary: a planned switchover: this node stopped at exit `ordinal`
    /// after log entry `last_index` (its disk's root there is `disk_root`);
    /// the backup takes over from there.
    SwitchOver {
        ordinal: u64,
        last_index: u64,
        disk_root: Option<[u8; 32]>,
    },
    /// Backup: it holds `epoch` now and runs from the switchover's exit.
    SwitchedOver {
        epoch: u64,
    },
}

/// Frame kind of a re-protection (sync stream) message.
pub const FRAME_SYNC: u8 = 4;
/// Largest sync frame: a disk chunk (at most [`MAX_SYNC_CHUNK`]) or a batch
/// of pages, with room for the header.
pub const MAX_SYNC_FRAME: usize = 4 << 20;
/// Disks with larger chunks cannot be re-protected over the sync stream.
pub const MAX_SYNC_CHUNK: u64 = 2 << 20;

/// Messages of re-protection's sync stream (docs/protocol.md, "Joining").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncMsg {
    Invalid,
    /// Joiner: group hashes of its disk (`first` is the first group's index).
    Groups {
        first: u64,
        hashes: Vec<[u8; 32]>,
    },
    /// Joiner: every group hash was sent.
    GroupsDone,
    /// Primary: the groups whose hashes differ.
    WantLeaves {
        groups: Vec<u64>,
    },
    /// Joiner: the leaf hashes of one wanted group.
    Leaves {
        group: u64,
        hashes: Vec<[u8; 32]>,
    },
    /// Primary: one chunk of its disk.
    Chunk {
        index: u64,
        data: Vec<u8>,
    },
    /// Primary: pages `first..first+count`; empty `data` means all zero.
    Pages {
        first: u64,
        count: u32,
        data: Vec<u8>,
    },
    /// Primary: where the copy stands.
    Progress {
        round: u32,
        disk_bytes_left: u64,
        memory_bytes_left: u64,
    },
    /// Primary: the machine's state at the cut-over, and where its log
    /// continues; the Welcome follows on the control stream.
    State {
        state: Vec<u8>,
        header: LogHeader,
    },
}

/// Encodes a sync message (no version of its own: the control stream's
/// Hello agreed the protocol version).
pub fn encode_sync(m: &SyncMsg) -> Result<Vec<u8>, ProtoError> {
    postcard::to_stdvec(m).map_err(|e| ProtoError::Encode(e.to_string()))
}

pub fn decode_sync(payload: &[u8]) -> Result<SyncMsg, ProtoError> {
    match postcard::from_bytes(payload) {
        Ok(SyncMsg::Invalid) => Err(ProtoError::Invalid),
        Ok(m) => Ok(m),
        Err(e) => Err(ProtoError::Decode(e.to_string())),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("undecodable control message: {0}")]
    Decode(String),
    #[error(
        "peer speaks log channel protocol version {found}; this node speaks {PROTOCOL_VERSION}"
    )]
    Version { found: u16 },
    #[error("reserved (invalid) control message")]
    Invalid,
    #[error("encoding a control message failed: {0}")]
    Encode(String),
}

/// Encodes `body` in this build's protocol version.
pub fn encode(body: &Control) -> Result<Vec<u8>, ProtoError> {
    postcard::to_stdvec(&Message {
        version: PROTOCOL_VERSION,
        body: body.clone(),
    })
    .map_err(|e| ProtoError::Encode(e.to_string()))
}

/// Encodes `body` claiming protocol `version` (tests of version refusal).
pub fn encode_as(version: u16, body: &Control) -> Result<Vec<u8>, ProtoError> {
    postcard::to_stdvec(&Message {
        version,
        body: body.clone(),
    })
    .map_err(|e| ProtoError::Encode(e.to_string()))
}

/// Decodes a control payload: the version first, then the message.
pub fn decode(payload: &[u8]) -> Result<Control, ProtoError> {
    let (version, _) =
        postcard::take_from_bytes::<u16>(payload).map_err(|e| ProtoError::Decode(e.to_string()))?;
    if version != PROTOCOL_VERSION {
        return Err(ProtoError::Version { found: version });
    }
    let msg: Message =
        postcard::from_bytes(payload).map_err(|e| ProtoError::Decode(e.to_string()))?;
    if msg.body == Control::Invalid {
        return Err(ProtoError::Invalid);
    }
    Ok(msg.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_version_first() {
        let m = Control::Ack { received: 42 };
        assert_eq!(decode(&encode(&m).unwrap()).unwrap(), m);
        let future = encode_as(99, &m).unwrap();
        assert!(matches!(
            decode(&future),
            Err(ProtoError::Version { found: 99 })
        ));
    }

    #[test]
    fn zeroed_and_garbage_payloads_are_refused() {
        // version 1 followed by a zero byte: the reserved Invalid variant.
        let zeroed = [PROTOCOL_VERSION as u8, 0];
        assert!(matches!(decode(&zeroed), Err(ProtoError::Invalid)));
        assert!(decode(&[]).is_err());
        assert!(decode(&[1, 250, 250, 250]).is_err());
    }
}

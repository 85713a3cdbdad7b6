//! Save and restore (DESIGN.md 8): what a machine is at an exit boundary,
//! apart from its memory and disk contents (which re-protection moves by
//! dirty pages and Merkle diff). Each part keeps its state struct beside its
//! code (`vstate/persist.rs`, `devices/persist.rs`,
//! `devices/virtio/persist.rs`); [`MachineState`] gathers them with the
//! machine's shape and replay position.
//!
//! States are postcard-encoded, versioned ([`STATE_FORMAT_VERSION`], decoded
//! first) and bounded ([`MAX_STATE_BYTES`]). A restore refuses a state of
//! another version, or of another machine (image, memory, devices), with a
//! reason.

use crate::devices::persist::PioState;
use crate::devices::virtio::persist::TransportState;
use crate::replay::log::MachineShape;
use crate::vstate::persist::VcpuState;
use serde::{Deserialize, Serialize};

/// Version of the state encoding. Bumped for breaking changes only.
pub const STATE_FORMAT_VERSION: u16 = 1;
/// A machine state never exceeds this (it holds registers and device
/// registers, not memory).
pub const MAX_STATE_BYTES: usize = 1 << 20;

/// Save/restore of one component: its state, and what a restore needs that
/// a state cannot carry (guest memory, a console, a disk image, a TAP).
pub trait Persist: Sized {
    type State: Serialize + for<'de> Deserialize<'de> + Clone;
    type ConstructorArgs;

    fn save(&self) -> Result<Self::State, PersistError>;
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, PersistError>;
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PersistError {
    #[error("reading or writing vCPU state: {0}")]
    Vcpu(String),
    #[error(
        "machine state of format version {found}; this ftvm reads version {STATE_FORMAT_VERSION}"
    )]
    Version { found: u16 },
    #[error("machine state is for another machine: {0}")]
    Shape(String),
    #[error("device state does not fit this machine: {0}")]
    Device(String),
    #[error("undecodable machine state: {0}")]
    Decode(String),
    #[error("encoding machine state: {0}")]
    Encode(String),
}

/// The whole machine at an exit boundary (memory and disk apart).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineState {
    pub format_version: u16,
    pub shape: MachineShape,
    /// Guest-caused exits made so far: the backup's next exit is `ordinal + 1`.
    pub ordinal: u64,
    /// The guest clock of the last exit, ns (a node going live continues it).
    pub clock_ns: u64,
    pub vcpu: VcpuState,
    /// The port I/O devices, in the order they were registered.
    pub pio: Vec<PioState>,
    /// The virtio-mmio slots, in order (`None`: empty slot).
    pub mmio: Vec<Option<TransportState>>,
}

impl MachineState {
    pub fn encode(&self) -> Result<Vec<u8>, PersistError> {
        let v = postcard::to_stdvec(self).map_err(|e| PersistError::Encode(e.to_string()))?;
        if v.len() > MAX_STATE_BYTES {
            return Err(PersistError::Encode(format!(
                "{} bytes is over the limit of {MAX_STATE_BYTES}",
                v.len()
            )));
        }
        Ok(v)
    }

    /// Decodes a state, its version first.
    pub fn decode(bytes: &[u8]) -> Result<MachineState, PersistError> {
        if bytes.len() > MAX_STATE_BYTES {
            return Err(PersistError::Decode(format!(
                "{} bytes is over the limit of {MAX_STATE_BYTES}",
                bytes.len()
            )));
        }
        let (version, _) = postcard::take_from_bytes::<u16>(bytes)
            .map_err(|e| PersistError::Decode(e.to_string()))?;
        if version != STATE_FORMAT_VERSION {
            return Err(PersistError::Version { found: version });
        }
        postcard::from_bytes(bytes).map_err(|e| PersistError::Decode(e.to_string()))
    }
}

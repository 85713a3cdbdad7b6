//! Device models. They are the same code on primary and backup: anything
//! non-deterministic they need comes from the `Environment` in the context.

pub mod console;
pub mod persist;
pub mod platform;
pub mod serial;
pub mod tap;
pub mod virtio;

use crate::replay::env::{EnvError, Environment, Outcome};
use crate::vstate::memory::GuestMemory;

/// What a device sees while it handles an exit.
pub struct ExitContext<'a> {
    pub mem: &'a GuestMemory,
    pub env: &'a mut dyn Environment,
    pub ordinal: u64,
    /// Whether devices may hand the guest outside input (received frames)
    /// now. Only the service pass after the exit's device access does, so
    /// replay can never deliver a frame at an earlier point of the exit than
    /// the recording (an empty answer from the live world is not logged).
    pub deliver_input: bool,
}

/// What the machine does after a device handled an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum DeviceAction {
    Continue,
    /// The guest ended the machine (power-off, panic).
    Stop(Outcome),
    /// A CPL0 exception stub reported `vector`; the machine fills in the rest.
    GuestException(u8),
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error("guest memory access at {addr:#x} failed: {source}")]
    Memory {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("console output failed: {0}")]
    Console(#[source] std::io::Error),
    #[error("virtqueue: {0}")]
    Queue(#[source] virtio_queue::Error),
    #[error("disk I/O failed, stopping rather than diverging: {0}")]
    Disk(#[source] ftvm_storage::StorageError),
}

/// A device on the port I/O bus.
pub trait PioDevice: Send {
    fn pio_read(
        &mut self,
        ctx: &mut ExitContext<'_>,
        offset: u16,
        data: &mut [u8],
    ) -> Result<DeviceAction, DeviceError>;
    fn pio_write(
        &mut self,
        ctx: &mut ExitContext<'_>,
        offset: u16,
        data: &[u8],
    ) -> Result<DeviceAction, DeviceError>;
    /// The device's state, for save/restore.
    fn save_state(&self) -> persist::PioState {
        persist::PioState::Stateless
    }
    /// Takes a saved state (of the same kind of device).
    fn restore_state(
        &mut self,
        state: &persist::PioState,
    ) -> Result<(), crate::persist::PersistError> {
        match state {
            persist::PioState::Stateless => Ok(()),
            other => Err(crate::persist::PersistError::Device(format!(
                "a stateless device cannot take {other:?}"
            ))),
        }
    }
}

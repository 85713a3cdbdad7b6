//! virtio 1.x devices on the MMIO transport. There are no interrupts on this
//! platform: the VMM services every ready queue at every guest-caused exit and
//! tells the driver not to notify (VIRTQ_USED_F_NO_NOTIFY), so a request costs
//! no exit of its own; the guest's next exit (a platform WAIT or NOP, or a
//! notify if the driver sends one anyway) is when the device runs.

pub mod block;
pub mod mmio;
pub mod net;
pub mod persist;

use super::{DeviceError, ExitContext};
use crate::vstate::memory::GuestMemory;
use virtio_queue::Queue;

/// Feature bit every device offers: virtio 1.x.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// A virtio device model behind an MMIO transport.
pub trait VirtioDevice: Send {
    /// virtio device ID (1 = net, 2 = block).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Services the queues; called at every exit once the driver set DRIVER_OK.
    fn process(
        &mut self,
        ctx: &mut ExitContext<'_>,
        queues: &mut [Queue],
    ) -> Result<(), DeviceError>;
    /// A digest of everything the device has sent out, compared between
    /// primary and backup along with memory.
    fn output_digest(&self) -> Option<[u8; 32]> {
        None
    }
    /// Extra state that belongs in the state digest (e.g. the disk's Merkle root).
    fn state_digest(&self) -> Option<[u8; 32]> {
        None
    }
    /// The disk behind a block device.
    fn disk(&self) -> Option<&ftvm_storage::DiskImage> {
        None
    }
    /// The device's own state, for save/restore.
    fn save_state(&self) -> persist::VirtioDeviceState;
    /// Takes a saved state (of the same kind of device).
    fn restore_state(
        &mut self,
        state: &persist::VirtioDeviceState,
    ) -> Result<(), crate::persist::PersistError>;
}

/// Serves a config-space read from `config`: bytes past its end read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| config.get(o + i))
            .copied()
            .unwrap_or(0);
    }
}

/// Copies `src` into guest memory across the writable descriptors of a chain.
pub(crate) fn write_chain(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    src: &[u8],
) -> Result<u32, DeviceError> {
    use vm_memory::Bytes;
    let mut done = 0usize;
    for desc in chain.writable() {
        if done == src.len() {
            break;
        }
        let n = (desc.len() as usize).min(src.len() - done);
        mem.write_slice(&src[done..done + n], desc.addr())
            .map_err(|source| DeviceError::Memory {
                addr: desc.addr().0,
                source,
            })?;
        done += n;
    }
    Ok(done as u32)
}

/// Reads every readable descriptor of a chain into one buffer (bounded by `max`).
pub(crate) fn read_chain(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    max: usize,
) -> Result<Vec<u8>, DeviceError> {
    use vm_memory::Bytes;
    let mut out = Vec::new();
    for desc in chain.readable() {
        let n = (desc.len() as usize).min(max.saturating_sub(out.len()));
        let start = out.len();
        out.resize(start + n, 0);
        mem.read_slice(&mut out[start..], desc.addr())
            .map_err(|source| DeviceError::Memory {
                addr: desc.addr().0,
                source,
            })?;
    }
    Ok(out)
}

//! virtio-net. Frames received from the outside world are inputs: the device
//! asks the environment for one each time the guest has an RX buffer
//! available (live: the TAP; replay: the log). Frames the guest sends are
//! outputs handed to the environment (live: the TAP; replay: dropped), and
//! folded into a running digest that primary and backup compare.

use super::{read_chain, write_chain, VirtioDevice};
use crate::devices::{DeviceError, ExitContext};
use std::num::Wrapping;
use std::sync::atomic::Ordering;
use virtio_queue::{Queue, QueueT};

pub const VIRTIO_ID_NET: u32 = 1;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// `virtio_net_hdr_v1`: the header in front of every frame in virtio 1.x.
pub const NET_HDR_LEN: usize = 12;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const QUEUE_SIZES: [u16; 2] = [256, 256];
/// Largest frame accepted from the guest (header + 64 KiB).
const MAX_TX: usize = NET_HDR_LEN + 65536;

#[derive(Debug)]
pub struct Net {
    mac: [u8; 6],
    /// Chained: blake3(previous || length || frame) for every frame sent
    /// (32 bytes, so it can be saved and restored, unlike a running hasher).
    tx_digest: [u8; 32],
    pub tx_frames: u64,
    pub rx_frames: u64,
    pub rx_dropped: u64,
}

impl Net {
    pub fn new(mac: [u8; 6]) -> Self {
        Net {
            mac,
            tx_digest: [0; 32],
            tx_frames: 0,
            rx_frames: 0,
            rx_dropped: 0,
        }
    }
}

fn has_available(q: &Queue, mem: &crate::vstate::memory::GuestMemory) -> bool {
    q.avail_idx(mem, Ordering::Acquire)
        .map(|idx| idx != Wrapping(q.next_avail()))
        .unwrap_or(false)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_NET_F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        super::read_config_bytes(&config, offset, data);
    }

    fn process(
        &mut self,
        ctx: &mut ExitContext<'_>,
        queues: &mut [Queue],
    ) -> Result<(), DeviceError> {
        let mem = ctx.mem;
        if let Some(tx) = queues.get_mut(TX_QUEUE).filter(|q| q.ready()) {
            while let Some(chain) = tx.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let bytes = read_chain(mem, chain, MAX_TX)?;
                if bytes.len() > NET_HDR_LEN {
                    let frame = &bytes[NET_HDR_LEN..];
                    let mut h = blake3::Hasher::new();
                    h.update(&self.tx_digest);
                    h.update(&(frame.len() as u64).to_le_bytes());
                    h.update(frame);
                    self.tx_digest = *h.finalize().as_bytes();
                    self.tx_frames += 1;
                    ctx.env.net_tx(frame)?;
                }
                tx.add_used(mem, head, 0).map_err(DeviceError::Queue)?;
            }
        }
        if let Some(rx) = queues
            .get_mut(RX_QUEUE)
            .filter(|q| ctx.deliver_input && q.ready())
        {
            while has_available(rx, mem) {
                let Some(frame) = ctx.env.net_rx()? else {
                    break;
                };
                let Some(chain) = rx.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                let capacity: usize = chain.clone().writable().map(|d| d.len() as usize).sum();
                if NET_HDR_LEN + frame.len() > capacity {
                    // Too big for the buffer: dropped, the same way on both sides.
                    self.rx_dropped += 1;
                    rx.add_used(mem, head, 0).map_err(DeviceError::Queue)?;
                    continue;
                }
                let mut buf = Vec::with_capacity(NET_HDR_LEN + frame.len());
                buf.extend_from_slice(&[0u8; NET_HDR_LEN]);
                buf[10] = 1; // num_buffers
                buf.extend_from_slice(&frame);
                let len = write_chain(mem, chain, &buf)?;
                rx.add_used(mem, head, len).map_err(DeviceError::Queue)?;
                self.rx_frames += 1;
            }
        }
        Ok(())
    }

    fn output_digest(&self) -> Option<[u8; 32]> {
        Some(self.tx_digest)
    }

    fn save_state(&self) -> super::persist::VirtioDeviceState {
        super::persist::VirtioDeviceState::Net {
            mac: self.mac,
            tx_digest: self.tx_digest,
            tx_frames: self.tx_frames,
            rx_frames: self.rx_frames,
            rx_dropped: self.rx_dropped,
        }
    }

    fn restore_state(
        &mut self,
        state: &super::persist::VirtioDeviceState,
    ) -> Result<(), crate::persist::PersistError> {
        let super::persist::VirtioDeviceState::Net {
            mac,
            tx_digest,
            tx_frames,
            rx_frames,
            rx_dropped,
        } = state
        else {
            return Err(crate::persist::PersistError::Device(format!(
                "virtio-net cannot take {state:?}"
            )));
        };
        if *mac != self.mac {
            return Err(crate::persist::PersistError::Shape(format!(
                "the state's network card has MAC {mac:02x?}, this machine's {:02x?}",
                self.mac
            )));
        }
        self.tx_digest = *tx_digest;
        self.tx_frames = *tx_frames;
        self.rx_frames = *rx_frames;
        self.rx_dropped = *rx_dropped;
        Ok(())
    }
}

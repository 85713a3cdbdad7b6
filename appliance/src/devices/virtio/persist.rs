//! Save/restore state of the virtio-mmio transport, its queues and its
//! devices. In-flight requests need none: every request is completed within
//! the exit that took it, so at an exit boundary a queue's state is its
//! ring addresses and positions.

use crate::persist::PersistError;
use serde::{Deserialize, Serialize};

/// One virtqueue (virtio-queue's `QueueState`, serializable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<&virtio_queue::QueueState> for QueueSnapshot {
    fn from(q: &virtio_queue::QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl QueueSnapshot {
    pub fn to_queue(&self) -> Result<virtio_queue::Queue, PersistError> {
        virtio_queue::Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| PersistError::Device(format!("virtqueue: {e}")))
    }
}

/// A virtio device's own state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    /// Reserved: a zeroed state never restores.
    Invalid,
    Net {
        mac: [u8; 6],
        /// Chained digest of every frame sent so far.
        tx_digest: [u8; 32],
        tx_frames: u64,
        rx_frames: u64,
        rx_dropped: u64,
    },
    Block {
        /// The disk's size: the disk itself is moved apart (Merkle diff).
        size: u64,
        reads: u64,
        writes: u64,
        flushes: u64,
    },
}

/// A virtio-mmio transport and its device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub status: u32,
    pub active: bool,
    pub queues: Vec<QueueSnapshot>,
    pub device: VirtioDeviceState,
}

//! The port I/O bus: devices registered by port range. Unclaimed ports read
//! as all ones and ignore writes, which is deterministic.

use crate::devices::{DeviceAction, DeviceError, ExitContext, PioDevice};

struct Slot {
    base: u16,
    len: u16,
    device: Box<dyn PioDevice>,
}

#[derive(Default)]
pub struct PioBus {
    slots: Vec<Slot>,
}

impl std::fmt::Debug for PioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self
            .slots
            .iter()
            .map(|s| format!("{:#x}+{}", s.base, s.len))
            .collect();
        f.debug_struct("PioBus").field("ranges", &ranges).finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("port range {base:#x}+{len} overlaps a registered device")]
pub struct BusOverlap {
    base: u16,
    len: u16,
}

impl PioBus {
    pub fn register(
        &mut self,
        base: u16,
        len: u16,
        device: Box<dyn PioDevice>,
    ) -> Result<(), BusOverlap> {
        let end = u32::from(base) + u32::from(len);
        if self.slots.iter().any(|s| {
            u32::from(s.base) < end && u32::from(base) < u32::from(s.base) + u32::from(s.len)
        }) {
            return Err(BusOverlap { base, len });
        }
        self.slots.push(Slot { base, len, device });
        Ok(())
    }

    /// Every device's state, in registration order.
    pub fn save_state(&self) -> Vec<crate::devices::persist::PioState> {
        self.slots.iter().map(|s| s.device.save_state()).collect()
    }

    pub fn restore_state(
        &mut self,
        states: &[crate::devices::persist::PioState],
    ) -> Result<(), crate::persist::PersistError> {
        if states.len() != self.slots.len() {
            return Err(crate::persist::PersistError::Shape(format!(
                "{} port I/O devices in the state, {} on this machine",
                states.len(),
                self.slots.len()
            )));
        }
        for (slot, st) in self.slots.iter_mut().zip(states) {
            slot.device.restore_state(st)?;
        }
        Ok(())
    }

    fn find(&mut self, port: u16) -> Option<(&mut Box<dyn PioDevice>, u16)> {
        self.slots
            .iter_mut()
            .find(|s| port >= s.base && u32::from(port) < u32::from(s.base) + u32::from(s.len))
            .map(|s| (&mut s.device, port - s.base))
    }

    pub fn read(
        &mut self,
        ctx: &mut ExitContext<'_>,
        port: u16,
        data: &mut [u8],
    ) -> Result<DeviceAction, DeviceError> {
        match self.find(port) {
            Some((dev, off)) => dev.pio_read(ctx, off, data),
            None => {
                data.fill(0xff);
                Ok(DeviceAction::Continue)
            }
        }
    }

    pub fn write(
        &mut self,
        ctx: &mut ExitContext<'_>,
        port: u16,
        data: &[u8],
    ) -> Result<DeviceAction, DeviceError> {
        match self.find(port) {
            Some((dev, off)) => dev.pio_write(ctx, off, data),
            None => Ok(DeviceAction::Continue),
        }
    }
}

use crate::devices::virtio::mmio::MmioTransport;
use crate::vstate::layout::{VIRTIO_MMIO_BASE, VIRTIO_MMIO_SLOT, VIRTIO_MMIO_SLOTS};

/// The virtio-mmio window: fixed slots, each empty or holding one transport.
#[derive(Debug, Default)]
pub struct MmioBus {
    slots: Vec<Option<MmioTransport>>,
}

impl MmioBus {
    pub fn new() -> Self {
        MmioBus {
            slots: (0..VIRTIO_MMIO_SLOTS).map(|_| None).collect(),
        }
    }

    pub fn attach(&mut self, slot: usize, transport: MmioTransport) {
        if let Some(s) = self.slots.get_mut(slot) {
            *s = Some(transport);
        }
    }

    /// Whether `addr` falls in the virtio window.
    pub fn claims(addr: u64) -> bool {
        (VIRTIO_MMIO_BASE..VIRTIO_MMIO_BASE + VIRTIO_MMIO_SLOTS * VIRTIO_MMIO_SLOT).contains(&addr)
    }

    fn locate(addr: u64) -> (usize, u64) {
        let rel = addr - VIRTIO_MMIO_BASE;
        ((rel / VIRTIO_MMIO_SLOT) as usize, rel % VIRTIO_MMIO_SLOT)
    }

    pub fn read(&mut self, addr: u64, data: &mut [u8]) {
        let (slot, off) = Self::locate(addr);
        match self.slots.get_mut(slot).and_then(Option::as_mut) {
            Some(t) => t.read(off, data),
            // An empty slot: magic and device ID read as zero.
            None => data.fill(0),
        }
    }

    pub fn write(
        &mut self,
        ctx: &mut ExitContext<'_>,
        addr: u64,
        data: &[u8],
    ) -> Result<DeviceAction, DeviceError> {
        let (slot, off) = Self::locate(addr);
        match self.slots.get_mut(slot).and_then(Option::as_mut) {
            Some(t) => t.write(ctx, off, data),
            None => Ok(DeviceAction::Continue),
        }
    }

    /// Services every active device's queues.
    pub fn poll(&mut self, ctx: &mut ExitContext<'_>) -> Result<(), DeviceError> {
        for t in self.slots.iter_mut().flatten() {
            t.poll(ctx)?;
        }
        Ok(())
    }

    /// Output and state digests of all devices, in slot order, for state digests.
    pub fn digest_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for t in self.slots.iter().flatten() {
            for d in [t.device().output_digest(), t.device().state_digest()]
                .into_iter()
                .flatten()
            {
                out.extend_from_slice(&d);
            }
        }
        out
    }

    /// Every slot's state (`None`: empty).
    pub fn save_state(&self) -> Vec<Option<crate::devices::virtio::persist::TransportState>> {
        self.slots
            .iter()
            .map(|s| s.as_ref().map(MmioTransport::save_state))
            .collect()
    }

    pub fn restore_state(
        &mut self,
        states: &[Option<crate::devices::virtio::persist::TransportState>],
    ) -> Result<(), crate::persist::PersistError> {
        if states.len() != self.slots.len() {
            return Err(crate::persist::PersistError::Shape(format!(
                "{} virtio slots in the state, {} on this machine",
                states.len(),
                self.slots.len()
            )));
        }
        for (i, (slot, st)) in self.slots.iter_mut().zip(states).enumerate() {
            match (slot, st) {
                (Some(t), Some(st)) => t.restore_state(st)?,
                (None, None) => {}
                (have, _) => {
                    return Err(crate::persist::PersistError::Shape(format!(
                        "virtio slot {i} is {} here but {} in the state",
                        if have.is_some() { "used" } else { "empty" },
                        if have.is_some() { "empty" } else { "used" }
                    )))
                }
            }
        }
        Ok(())
    }

    pub fn transports(&self) -> impl Iterator<Item = &MmioTransport> {
        self.slots.iter().flatten()
    }
}

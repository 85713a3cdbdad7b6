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

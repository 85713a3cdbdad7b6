//! The virtio-mmio transport (virtio 1.x, "version 2" register layout).

use super::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::{DeviceAction, DeviceError, ExitContext};
use virtio_queue::{Queue, QueueT};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4654_564d; // "FTVM"

const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 128;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    active: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .finish()
    }
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| Queue::new(max).ok())
            .collect();
        MmioTransport {
            device,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            active: false,
        }
    }

    fn features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.active = false;
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR,
            0x010 => match self.device_features_sel {
                0 => self.features() as u32,
                1 => (self.features() >> 32) as u32,
                _ => 0,
            },
            0x034 => self
                .selected()
                .map(|q| u32::from(q.max_size()))
                .unwrap_or(0),
            0x044 => self.selected().map(|q| u32::from(q.ready())).unwrap_or(0),
            0x060 => 0, // no interrupts on this platform
            0x070 => self.status,
            0x0fc => 0, // config generation: the config never changes
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    pub fn write(
        &mut self,
        ctx: &mut ExitContext<'_>,
        offset: u64,
        data: &[u8],
    ) -> Result<DeviceAction, DeviceError> {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return Ok(DeviceAction::Continue),
                };
                let mask = 0xffff_ffffu64 << shift;
                self.driver_features =
                    (self.driver_features & !mask) | ((u64::from(v) << shift) & self.features());
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => {
                if let Some(q) = self.selected() {
                    q.set_size(v as u16);
                }
            }
            0x044 => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            0x050 => {} // queue notify: every exit services the queues anyway
            0x064 => {} // interrupt ack
            0x070 => {
                if v == 0 {
                    self.reset();
                } else {
                    self.status = v;
                    // A driver that did not accept VIRTIO_F_VERSION_1 is refused
                    // at FEATURES_OK: the bit reads back clear (virtio 1.x 3.1.1).
                    if v & STATUS_FEATURES_OK != 0 && self.driver_features & VIRTIO_F_VERSION_1 == 0
                    {
                        self.status &= !STATUS_FEATURES_OK;
                    }
                    if v & STATUS_DRIVER_OK != 0 && v & STATUS_FAILED == 0 && !self.active {
                        self.activate(ctx);
                    }
                }
            }
            0x080 => self.set_addr(|q, l| q.set_desc_table_address(Some(l), None), v),
            0x084 => self.set_addr(|q, h| q.set_desc_table_address(None, Some(h)), v),
            0x090 => self.set_addr(|q, l| q.set_avail_ring_address(Some(l), None), v),
            0x094 => self.set_addr(|q, h| q.set_avail_ring_address(None, Some(h)), v),
            0x0a0 => self.set_addr(|q, l| q.set_used_ring_address(Some(l), None), v),
            0x0a4 => self.set_addr(|q, h| q.set_used_ring_address(None, Some(h)), v),
            _ => {}
        }
        Ok(DeviceAction::Continue)
    }

    fn set_addr(&mut self, f: impl FnOnce(&mut Queue, u32), v: u32) {
        if let Some(q) = self.selected() {
            f(q, v);
        }
    }

    fn activate(&mut self, ctx: &mut ExitContext<'_>) {
        if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            tracing::warn!(
                device = self.device.device_type(),
                "driver did not accept VIRTIO_F_VERSION_1; device stays inactive"
            );
            self.status |= STATUS_FAILED;
            return;
        }
        for q in &mut self.queues {
            if q.ready() && q.is_valid(ctx.mem) {
                // Ask the driver not to notify: queues are serviced at every exit.
                let _ = q.disable_notification(ctx.mem);
            }
        }
        self.active = true;
    }

    /// Services the device's queues (at every exit, once active).
    pub fn poll(&mut self, ctx: &mut ExitContext<'_>) -> Result<(), DeviceError> {
        if !self.active {
            return Ok(());
        }
        self.device.process(ctx, &mut self.queues)
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The transport's registers, queues and device state.
    pub fn save_state(&self) -> super::persist::TransportState {
        super::persist::TransportState {
            device_type: self.device.device_type(),
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            active: self.active,
            queues: self.queues.iter().map(|q| (&q.state()).into()).collect(),
            device: self.device.save_state(),
        }
    }

    /// Takes a saved state of a transport holding the same kind of device.
    pub fn restore_state(
        &mut self,
        s: &super::persist::TransportState,
    ) -> Result<(), crate::persist::PersistError> {
        use crate::persist::PersistError;
        if s.device_type != self.device.device_type() {
            return Err(PersistError::Device(format!(
                "a virtio device of type {} cannot take the state of type {}",
                self.device.device_type(),
                s.device_type
            )));
        }
        if s.queues.len() != self.queues.len() {
            return Err(PersistError::Device(format!(
                "{} queues in the state, {} on this device",
                s.queues.len(),
                self.queues.len()
            )));
        }
        let queues = s
            .queues
            .iter()
            .map(super::persist::QueueSnapshot::to_queue)
            .collect::<Result<Vec<_>, _>>()?;
        self.device.restore_state(&s.device)?;
        self.queues = queues;
        self.queue_sel = s.queue_sel;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.status = s.status;
        self.active = s.active;
        Ok(())
    }
}

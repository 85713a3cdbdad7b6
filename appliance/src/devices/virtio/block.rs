//! virtio-blk over a local raw image (`ftvm-storage`). Writes and flushes go
//! to this site's own disk on both primary and backup (they are not outputs);
//! read data is an input (in `ship` mode the primary's data travel in the
//! log). A failed host write, read or flush stops the machine: a disk that
//! silently differs from the peer's is worse than a stopped pair.

use super::VirtioDevice;
use crate::devices::{DeviceError, ExitContext};
use ftvm_storage::DiskImage;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

pub const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZES: [u16; 1] = [256];

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Largest single request the device accepts (bigger ones get IOERR).
const MAX_REQUEST: u64 = 4 << 20;
/// Reads are handed to the environment in pieces of at most this size.
const READ_PIECE: u64 = 128 << 10;

pub struct Block {
    disk: DiskImage,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("disk", &self.disk.path())
            .finish()
    }
}

struct Desc {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

impl Block {
    pub fn new(disk: DiskImage) -> Self {
        Block {
            disk,
            reads: 0,
            writes: 0,
            flushes: 0,
        }
    }

    pub fn disk(&self) -> &DiskImage {
        &self.disk
    }

    fn mem_err(addr: GuestAddress) -> impl FnOnce(vm_memory::GuestMemoryError) -> DeviceError {
        move |source| DeviceError::Memory {
            addr: addr.0,
            source,
        }
    }

    /// Executes one request; returns (status, bytes written into guest buffers).
    fn execute(
        &mut self,
        ctx: &mut ExitContext<'_>,
        descs: &[Desc],
    ) -> Result<(u8, u32), DeviceError> {
        let mem = ctx.mem;
        let Some(head) = descs.first().filter(|d| !d.writable && d.len >= 16) else {
            return Ok((S_IOERR, 0));
        };
        let kind: u32 = mem.read_obj(head.addr).map_err(Self::mem_err(head.addr))?;
        let sector: u64 = mem
            .read_obj(head.addr.unchecked_add(8))
            .map_err(Self::mem_err(head.addr))?;
        let data = &descs[1..descs.len() - 1];
        let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
        let in_range = |total: u64| {
            total <= MAX_REQUEST
                && sector
                    .checked_mul(SECTOR_SIZE)
                    .and_then(|o| o.checked_add(total))
                    .is_some_and(|end| end <= self.disk.size())
        };
        match kind {
            T_IN => {
                if !in_range(total) || data.iter().any(|d| !d.writable) {
                    return Ok((S_IOERR, 0));
                }
                let mut offset = sector * SECTOR_SIZE;
                for d in data {
                    // In pieces, so each logged read fits a log entry.
                    let mut done = 0u64;
                    while done < u64::from(d.len) {
                        let n = (u64::from(d.len) - done).min(READ_PIECE);
                        let mut buf = vec![0u8; n as usize];
                        let disk = &self.disk;
                        let at = offset;
                        ctx.env.disk_read(at, &mut buf, &mut |b: &mut [u8]| {
                            disk.read_at(at, b).map_err(|e| e.to_string())
                        })?;
                        let addr = d.addr.unchecked_add(done);
                        mem.write_slice(&buf, addr).map_err(Self::mem_err(addr))?;
                        offset += n;
                        done += n;
                    }
                }
                self.reads += 1;
                Ok((S_OK, total as u32))
            }
            T_OUT => {
                if !in_range(total) || data.iter().any(|d| d.writable) {
                    return Ok((S_IOERR, 0));
                }
                let mut offset = sector * SECTOR_SIZE;
                for d in data {
                    let mut buf = vec![0u8; d.len as usize];
                    mem.read_slice(&mut buf, d.addr)
                        .map_err(Self::mem_err(d.addr))?;
                    self.disk
                        .write_at(offset, &buf)
                        .map_err(DeviceError::Disk)?;
                    offset += u64::from(d.len);
                }
                self.writes += 1;
                Ok((S_OK, 0))
            }
            T_FLUSH => {
                self.disk.flush().map_err(DeviceError::Disk)?;
                self.flushes += 1;
                Ok((S_OK, 0))
            }
            T_GET_ID => {
                let Some(d) = data.first().filter(|d| d.writable) else {
                    return Ok((S_IOERR, 0));
                };
                let mut id = [0u8; 20];
                let name = b"ftvm-disk0";
                id[..name.len()].copy_from_slice(name);
                let n = (d.len as usize).min(20);
                mem.write_slice(&id[..n], d.addr)
                    .map_err(Self::mem_err(d.addr))?;
                Ok((S_OK, n as u32))
            }
            _ => Ok((S_UNSUPP, 0)),
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_BLK_F_FLUSH
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (u64, in sectors) is the only field offered.
        let cap = (self.disk.size() / SECTOR_SIZE).to_le_bytes();
        super::read_config_bytes(&cap, offset, data);
    }

    fn process(
        &mut self,
        ctx: &mut ExitContext<'_>,
        queues: &mut [Queue],
    ) -> Result<(), DeviceError> {
        let Some(q) = queues.first_mut().filter(|q| q.ready()) else {
            return Ok(());
        };
        let mem = ctx.mem;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<Desc> = chain
                .map(|d| Desc {
                    addr: d.addr(),
                    len: d.len(),
                    writable: d.is_write_only(),
                })
                .collect();
            let (status, written) = match descs.last() {
                Some(s) if s.writable && s.len >= 1 && descs.len() >= 2 => {
                    let (status, written) = self.execute(ctx, &descs)?;
                    mem.write_obj(status, s.addr)
                        .map_err(Self::mem_err(s.addr))?;
                    (status, written + 1)
                }
                _ => (S_IOERR, 0),
            };
            if status != S_OK {
                tracing::debug!(status, "virtio-blk request failed");
            }
            q.add_used(mem, head, written).map_err(DeviceError::Queue)?;
        }
        Ok(())
    }

    fn state_digest(&self) -> Option<[u8; 32]> {
        Some(self.disk.merkle_root())
    }

    fn disk(&self) -> Option<&DiskImage> {
        Some(&self.disk)
    }

    fn save_state(&self) -> super::persist::VirtioDeviceState {
        super::persist::VirtioDeviceState::Block {
            size: self.disk.size(),
            reads: self.reads,
            writes: self.writes,
            flushes: self.flushes,
        }
    }

    fn restore_state(
        &mut self,
        state: &super::persist::VirtioDeviceState,
    ) -> Result<(), crate::persist::PersistError> {
        let super::persist::VirtioDeviceState::Block {
            size,
            reads,
            writes,
            flushes,
        } = state
        else {
            return Err(crate::persist::PersistError::Device(format!(
                "virtio-blk cannot take {state:?}"
            )));
        };
        if *size != self.disk.size() {
            return Err(crate::persist::PersistError::Shape(format!(
                "the state's disk has {size} bytes, this machine's {}",
                self.disk.size()
            )));
        }
        self.reads = *reads;
        self.writes = *writes;
        self.flushes = *flushes;
        Ok(())
    }
}

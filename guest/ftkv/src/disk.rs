//! The virtio-blk disk: a small driver on virtio-drivers' `VirtQueue` that
//! puts a whole batch of requests (reads, or writes followed by a FLUSH) in
//! the queue and makes **one** exit (`nop()`) for all of them.
//!
//! `VirtIOBlk` is not used: its `flush()` (and every other blocking call)
//! spins on the used ring without an exit, which hangs on this platform
//! (the VMM services queues only at exits and never raises an interrupt),
//! and it has no non-blocking flush.
//!
//! The VMM executes the chains of one exit in ring order, so a FLUSH placed
//! after the writes of the same batch covers them; when `nop()` returns,
//! every request of the batch is complete (`docs/platform.md`).

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use bitflags::bitflags;
use ftvm_guest_rt::nop;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::{DeviceType, Transport};

use crate::hal::PlatformHal;

pub const SECTOR: usize = 512;
/// Bytes per request. The device accepts up to 4 MiB; 1 MiB keeps each
/// host write modest while a whole batch still fits one exit.
pub const MAX_REQUEST: usize = 1 << 20;
const QUEUE_SIZE: usize = 64;
/// A data request takes three descriptors (header, data, status).
const MAX_CHAINS: usize = QUEUE_SIZE / 3;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

bitflags! {
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct BlkFeatures: u64 {
        const FLUSH = 1 << 9;
        const VERSION_1 = 1 << 32;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskError {
    /// The device answered with this status (1 IOERR, 2 UNSUPP).
    Status(u8),
    Queue(virtio_drivers::Error),
    /// A request outside the disk or not whole sectors.
    BadRange,
    /// The slot holds another kind of device.
    NotABlockDevice,
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskError::Status(s) => write!(f, "device status {s}"),
            DiskError::Queue(e) => write!(f, "virtqueue: {e:?}"),
            DiskError::BadRange => f.write_str("request outside the disk"),
            DiskError::NotABlockDevice => f.write_str("slot 1 is not a block device"),
        }
    }
}

enum Data<'a> {
    None,
    In(&'a mut [u8]),
    Out(&'a [u8]),
}

struct Request<'a> {
    kind: u32,
    sector: u64,
    data: Data<'a>,
}

pub struct Disk {
    transport: MmioTransport<'static>,
    queue: VirtQueue<PlatformHal, QUEUE_SIZE>,
    capacity: u64,
    has_flush: bool,
}

impl Disk {
    /// Initialises the device behind `transport` (a few MMIO exits, once).
    pub fn new(mut transport: MmioTransport<'static>) -> Result<Disk, DiskError> {
        if transport.device_type() != DeviceType::Block {
            return Err(DiskError::NotABlockDevice);
        }
        let features = transport.begin_init(BlkFeatures::FLUSH | BlkFeatures::VERSION_1);
        let lo: u32 = transport.read_config_space(0).map_err(DiskError::Queue)?;
        let hi: u32 = transport.read_config_space(4).map_err(DiskError::Queue)?;
        let sectors = u64::from(lo) | (u64::from(hi) << 32);
        let queue = VirtQueue::new(&mut transport, 0, false, false).map_err(DiskError::Queue)?;
        transport.finish_init();
        Ok(Disk {
            transport,
            queue,
            capacity: sectors.saturating_mul(SECTOR as u64),
            has_flush: features.contains(BlkFeatures::FLUSH),
        })
    }

    /// Disk size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Reads `buf.len()` bytes (whole sectors) at byte `offset`: one exit
    /// for up to `MAX_CHAINS` MiB. Keep reads under 1 MiB per call when the
    /// machine is recorded (all inputs of one exit form one log entry of at
    /// most 1 MiB).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.check_range(offset, buf.len())?;
        let first = offset / SECTOR as u64;
        let mut reqs: Vec<Request<'_>> = buf
            .chunks_mut(MAX_REQUEST)
            .enumerate()
            .map(|(i, chunk)| Request {
                kind: T_IN,
                sector: first + (i * MAX_REQUEST / SECTOR) as u64,
                data: Data::In(chunk),
            })
            .collect();
        self.execute(&mut reqs)
    }

    /// Writes `data` (whole sectors) at byte `offset`, then FLUSHes: durable
    /// when this returns Ok. One exit for a batch of up to `MAX_CHAINS - 1`
    /// MiB (the log writer's batches are smaller).
    pub fn write_durable(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.check_range(offset, data.len())?;
        let first = offset / SECTOR as u64;
        let mut reqs: Vec<Request<'_>> = data
            .chunks(MAX_REQUEST)
            .enumerate()
            .map(|(i, chunk)| Request {
                kind: T_OUT,
                sector: first + (i * MAX_REQUEST / SECTOR) as u64,
                data: Data::Out(chunk),
            })
            .collect();
        if self.has_flush {
            reqs.push(Request {
                kind: T_FLUSH,
                sector: 0,
                data: Data::None,
            });
        }
        self.execute(&mut reqs)
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<(), DiskError> {
        let ok = offset.is_multiple_of(SECTOR as u64)
            && len.is_multiple_of(SECTOR)
            && len > 0
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= self.capacity);
        if ok {
            Ok(())
        } else {
            Err(DiskError::BadRange)
        }
    }

    /// Queues the requests (in rounds of at most `MAX_CHAINS`), one exit per
    /// round, and collects every completion of the round.
    fn execute(&mut self, reqs: &mut [Request<'_>]) -> Result<(), DiskError> {
        let mut result = Ok(());
        for round in reqs.chunks_mut(MAX_CHAINS) {
            // Header and status bytes live in these vectors, which are not
            // resized while the device holds pointers into them.
            let headers: Vec<[u8; 16]> = round
                .iter()
                .map(|r| {
                    let mut h = [0u8; 16];
                    h[0..4].copy_from_slice(&r.kind.to_le_bytes());
                    h[8..16].copy_from_slice(&r.sector.to_le_bytes());
                    h
                })
                .collect();
            let mut status: Vec<[u8; 1]> = vec![[0xff]; round.len()];
            let mut tokens: Vec<Option<u16>> = Vec::with_capacity(round.len());
            for (i, (req, st)) in round.iter_mut().zip(status.iter_mut()).enumerate() {
                let header: &[u8] = &headers[i];
                // SAFETY: header, data and status buffers stay alive and
                // untouched until `pop_used` below returns them (every added
                // chain is popped before this function returns).
                let token = unsafe {
                    match &mut req.data {
                        Data::None => self.queue.add(&[header], &mut [st.as_mut_slice()]),
                        Data::In(buf) => self
                            .queue
                            .add(&[header], &mut [&mut **buf, st.as_mut_slice()]),
                        Data::Out(buf) => self.queue.add(&[header, *buf], &mut [st.as_mut_slice()]),
                    }
                };
                match token {
                    Ok(t) => tokens.push(Some(t)),
                    Err(e) => {
                        tokens.push(None);
                        result = Err(DiskError::Queue(e));
                    }
                }
            }
            if self.queue.should_notify() {
                // The VMM sets NO_NOTIFY; a notify would be one more exit.
                self.transport.notify(0);
            }
            // The exit that completes the whole round.
            nop();
            for (i, (req, st)) in round.iter_mut().zip(status.iter_mut()).enumerate() {
                let Some(token) = tokens[i] else { continue };
                let header: &[u8] = &headers[i];
                // SAFETY: the same buffers as given to `add` for this token.
                let popped = unsafe {
                    match &mut req.data {
                        Data::None => {
                            self.queue
                                .pop_used(token, &[header], &mut [st.as_mut_slice()])
                        }
                        Data::In(buf) => self.queue.pop_used(
                            token,
                            &[header],
                            &mut [&mut **buf, st.as_mut_slice()],
                        ),
                        Data::Out(buf) => {
                            self.queue
                                .pop_used(token, &[header, *buf], &mut [st.as_mut_slice()])
                        }
                    }
                };
                if let Err(e) = popped {
                    // Not completed at the exit: the platform contract is
                    // broken and the buffers may still be written. Stop.
                    panic!("virtio-blk: request not complete after an exit: {e:?}");
                }
                // SAFETY: a live, aligned byte the device wrote during the exit.
                let s = unsafe { core::ptr::read_volatile(&st[0]) };
                if s != 0 && result.is_ok() {
                    result = Err(DiskError::Status(s));
                }
            }
        }
        result
    }
}

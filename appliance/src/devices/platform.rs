//! The platform device (docs/platform.md): a request port taking the address
//! of a request block, the crash port the CPL0 stubs use, and the platform
//! page with boot information and the clock.

use super::console::Console;
use super::{DeviceAction, DeviceError, ExitContext, PioDevice};
use crate::replay::env::{Gather, Outcome};
use crate::vstate::layout::*;
use crate::vstate::memory::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

pub const PLATFORM_BASE: u16 = 0x500;
pub const PLATFORM_LEN: u16 = 8;
const REQUEST_OFFSET: u16 = 0;
const CRASH_OFFSET: u16 = 4;

pub const OP_NOP: u32 = 0;
pub const OP_CONSOLE_WRITE: u32 = 1;
pub const OP_ENTROPY: u32 = 2;
pub const OP_WAIT: u32 = 3;
pub const OP_POWER_OFF: u32 = 4;
pub const OP_PANIC: u32 = 5;

pub const MAX_CONSOLE_WRITE: u64 = 64 << 10;
pub const MAX_ENTROPY: u64 = 4096;
/// Longest gathering window a `WAIT` may ask for (1 ms): moderation, not sleep.
pub const MAX_GATHER_NS: u64 = 1_000_000;
pub const MAX_PANIC_MESSAGE: u64 = 4096;
const REQUEST_SIZE: u64 = 64;

const STATUS_OK: u32 = 0;
const STATUS_BAD_REQUEST: u32 = 1;

fn mem_err(addr: u64) -> impl FnOnce(vm_memory::GuestMemoryError) -> DeviceError {
    move |source| DeviceError::Memory { addr, source }
}

/// Fills the platform page and command line before the first instruction.
pub fn write_boot_info(
    mem: &GuestMemory,
    mem_size: u64,
    cmdline: &str,
    image_end: u64,
) -> Result<(), DeviceError> {
    let p = PLATFORM_PAGE;
    mem.write_slice(&PLATFORM_MAGIC, GuestAddress(p + PP_MAGIC))
        .map_err(mem_err(p))?;
    mem.write_obj(PLATFORM_VERSION, GuestAddress(p + PP_VERSION))
        .map_err(mem_err(p))?;
    mem.write_obj(cmdline.len() as u32, GuestAddress(p + PP_CMDLINE_LEN))
        .map_err(mem_err(p))?;
    mem.write_obj(mem_size, GuestAddress(p + PP_MEM_SIZE))
        .map_err(mem_err(p))?;
    mem.write_obj(image_end, GuestAddress(p + PP_IMAGE_END))
        .map_err(mem_err(p))?;
    mem.write_obj(VIRTIO_MMIO_BASE, GuestAddress(p + PP_VIRTIO_BASE))
        .map_err(mem_err(p))?;
    mem.write_obj(VIRTIO_MMIO_SLOTS as u32, GuestAddress(p + PP_VIRTIO_SLOTS))
        .map_err(mem_err(p))?;
    mem.write_slice(cmdline.as_bytes(), GuestAddress(CMDLINE_ADDR))
        .map_err(mem_err(CMDLINE_ADDR))?;
    Ok(())
}

/// Refreshes the clock (and the informational exit ordinal) in the platform page.
pub fn write_clock(mem: &GuestMemory, clock_ns: u64, ordinal: u64) -> Result<(), DeviceError> {
    let p = PLATFORM_PAGE;
    mem.write_obj(clock_ns, GuestAddress(p + PP_CLOCK_NS))
        .map_err(mem_err(p))?;
    mem.write_obj(ordinal, GuestAddress(p + PP_EXIT_ORDINAL))
        .map_err(mem_err(p))?;
    Ok(())
}

#[derive(Debug)]
pub struct Platform {
    console: Console,
    mem_size: u64,
}

struct Request {
    op: u32,
    args: [u64; 3],
}

impl Platform {
    pub fn new(console: Console, mem_size: u64) -> Self {
        Platform { console, mem_size }
    }

    fn in_memory(&self, addr: u64, len: u64) -> bool {
        addr.checked_add(len)
            .is_some_and(|end| end <= self.mem_size)
    }

    fn read_request(&self, mem: &GuestMemory, addr: u64) -> Result<Request, DeviceError> {
        let mut raw = [0u8; REQUEST_SIZE as usize];
        mem.read_slice(&mut raw, GuestAddress(addr))
            .map_err(mem_err(addr))?;
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[o..o + 8]);
            u64::from_le_bytes(b)
        };
        Ok(Request {
            op: u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]),
            args: [u64_at(0x08), u64_at(0x10), u64_at(0x18)],
        })
    }

    fn complete(
        &self,
        mem: &GuestMemory,
        addr: u64,
        status: u32,
        ret: [u64; 2],
    ) -> Result<(), DeviceError> {
        mem.write_obj(status, GuestAddress(addr + 4))
            .map_err(mem_err(addr))?;
        mem.write_obj(ret[0], GuestAddress(addr + 0x20))
            .map_err(mem_err(addr))?;
        mem.write_obj(ret[1], GuestAddress(addr + 0x28))
            .map_err(mem_err(addr))?;
        Ok(())
    }

    fn read_guest(&self, mem: &GuestMemory, addr: u64, len: u64) -> Result<Vec<u8>, DeviceError> {
        let mut buf = vec![0u8; len as usize];
        mem.read_slice(&mut buf, GuestAddress(addr))
            .map_err(mem_err(addr))?;
        Ok(buf)
    }

    fn request(
        &mut self,
        ctx: &mut ExitContext<'_>,
        addr: u64,
    ) -> Result<DeviceAction, DeviceError> {
        if !addr.is_multiple_of(8) || !self.in_memory(addr, REQUEST_SIZE) {
            // Nowhere to write a status: ignore, deterministically.
            tracing::debug!(addr, "platform request block outside memory or misaligned");
            return Ok(DeviceAction::Continue);
        }
        let req = self.read_request(ctx.mem, addr)?;
        let [a0, a1, a2] = req.args;
        let mut ret = [0u64; 2];
        let ok = match req.op {
            OP_NOP => true,
            OP_CONSOLE_WRITE if a1 <= MAX_CONSOLE_WRITE && self.in_memory(a0, a1) => {
                let bytes = self.read_guest(ctx.mem, a0, a1)?;
                self.console
                    .write_bytes(&bytes)
                    .map_err(DeviceError::Console)?;
                true
            }
            OP_ENTROPY if a1 <= MAX_ENTROPY && self.in_memory(a0, a1) => {
                let mut buf = vec![0u8; a1 as usize];
                ctx.env.entropy(&mut buf)?;
                ctx.mem
                    .write_slice(&buf, GuestAddress(a0))
                    .map_err(mem_err(a0))?;
                true
            }
            OP_WAIT if a1 <= MAX_GATHER_NS => {
                let gather = Gather {
                    window_ns: a1,
                    frames: a2,
                };
                let out = ctx.env.wait(a0, gather)?;
                write_clock(ctx.mem, out.now_ns, ctx.ordinal)?;
                ret[0] = u64::from(out.input_arrived);
                true
            }
            OP_POWER_OFF => {
                self.complete(ctx.mem, addr, STATUS_OK, ret)?;
                return Ok(DeviceAction::Stop(Outcome::PowerOff { code: a0 as i32 }));
            }
            OP_PANIC if self.in_memory(a0, a1.min(MAX_PANIC_MESSAGE)) => {
                let bytes = self.read_guest(ctx.mem, a0, a1.min(MAX_PANIC_MESSAGE))?;
                self.complete(ctx.mem, addr, STATUS_OK, ret)?;
                return Ok(DeviceAction::Stop(Outcome::Panic {
                    message: String::from_utf8_lossy(&bytes).into_owned(),
                }));
            }
            _ => false,
        };
        let status = if ok { STATUS_OK } else { STATUS_BAD_REQUEST };
        self.complete(ctx.mem, addr, status, ret)?;
        Ok(DeviceAction::Continue)
    }
}

fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl PioDevice for Platform {
    fn pio_read(
        &mut self,
        _ctx: &mut ExitContext<'_>,
        _offset: u16,
        data: &mut [u8],
    ) -> Result<DeviceAction, DeviceError> {
        data.fill(0);
        Ok(DeviceAction::Continue)
    }

    fn pio_write(
        &mut self,
        ctx: &mut ExitContext<'_>,
        offset: u16,
        data: &[u8],
    ) -> Result<DeviceAction, DeviceError> {
        match offset {
            REQUEST_OFFSET => self.request(ctx, le_value(data)),
            CRASH_OFFSET => Ok(DeviceAction::GuestException(le_value(data) as u8)),
            _ => Ok(DeviceAction::Continue),
        }
    }
}

//! The platform device and the platform page (`docs/platform.md`).

use core::arch::asm;
use core::ptr::{self, addr_of, addr_of_mut};
use core::sync::atomic::{compiler_fence, Ordering};

/// Guest-physical (= virtual) address of the platform page.
pub const PLATFORM_PAGE: usize = 0x2_0000;
/// Guest-physical address of the boot command line.
pub const CMDLINE_ADDR: usize = 0x2_1000;
/// Longest boot command line.
pub const CMDLINE_MAX: usize = 2048;
/// Port taking the 32-bit address of a request block.
pub const REQUEST_PORT: u16 = 0x500;
/// Platform page magic.
pub const MAGIC: [u8; 8] = *b"FTVMPLAT";
/// Platform version this runtime implements.
pub const VERSION: u32 = 1;

/// Largest CONSOLE_WRITE the VMM accepts in one request.
pub const MAX_CONSOLE_WRITE: usize = 64 * 1024;
/// Largest ENTROPY buffer the VMM fills in one request.
pub const MAX_ENTROPY: usize = 4096;
/// Largest PANIC message.
pub const MAX_PANIC_MESSAGE: usize = 4096;

/// Field offsets in the platform page.
mod page {
    pub const MAGIC: usize = 0x00;
    pub const VERSION: usize = 0x08;
    pub const CMDLINE_LEN: usize = 0x0c;
    pub const MEM_SIZE: usize = 0x10;
    pub const CLOCK_NS: usize = 0x18;
    pub const EXIT_ORDINAL: usize = 0x20;
    pub const IMAGE_END: usize = 0x28;
}

/// Platform request operations.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Nop = 0,
    ConsoleWrite = 1,
    Entropy = 2,
    Wait = 3,
    PowerOff = 4,
    Panic = 5,
}

/// Status the VMM writes for a request it performed.
pub const STATUS_OK: u32 = 0;
/// Status for a request the VMM refused (bad op, address or length).
pub const STATUS_BAD_REQUEST: u32 = 1;

/// What the VMM wrote back into a request block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u32,
    pub ret0: u64,
    pub ret1: u64,
}

impl Response {
    pub fn is_ok(&self) -> bool {
        self.status == STATUS_OK
    }
}

/// The 64-byte request block; its address is what the guest writes to 0x500.
#[repr(C, align(64))]
struct RequestBlock {
    op: u32,
    status: u32,
    args: [u64; 3],
    ret: [u64; 2],
    reserved: [u64; 2],
}

const _: () = assert!(core::mem::size_of::<RequestBlock>() == 64);

fn read_page_u64(offset: usize) -> u64 {
    // SAFETY: the platform page lies in guest RAM (memory is at least 8 MiB),
    // is identity mapped and user accessible, and the offset is one of the
    // 8-byte-aligned fields above. Volatile: the VMM rewrites it at every exit.
    unsafe { ptr::read_volatile((PLATFORM_PAGE + offset) as *const u64) }
}

fn read_page_u32(offset: usize) -> u32 {
    // SAFETY: as in `read_page_u64`, for a 4-byte-aligned field.
    unsafe { ptr::read_volatile((PLATFORM_PAGE + offset) as *const u32) }
}

/// True if the platform page carries the magic and a version this runtime knows.
pub fn page_is_valid() -> bool {
    read_page_u64(page::MAGIC) == u64::from_le_bytes(MAGIC)
        && read_page_u32(page::VERSION) == VERSION
}

/// Platform version from the platform page.
pub fn version() -> u32 {
    read_page_u32(page::VERSION)
}

/// Guest memory size in bytes.
pub fn mem_size() -> u64 {
    read_page_u64(page::MEM_SIZE)
}

/// First byte after the loaded image (4 KiB aligned), as the VMM computed it.
pub fn image_end() -> u64 {
    read_page_u64(page::IMAGE_END)
}

/// Boot command line length in bytes, as the VMM wrote it (not clamped).
pub fn cmdline_len() -> u32 {
    read_page_u32(page::CMDLINE_LEN)
}

/// Monotonic nanoseconds since boot, as of the guest's last exit. Costs no exit;
/// call [`nop`] first for a fresher value.
pub fn now_ns() -> u64 {
    read_page_u64(page::CLOCK_NS)
}

/// Ordinal of the exit that last refreshed the platform page (informational).
pub fn exit_ordinal() -> u64 {
    read_page_u64(page::EXIT_ORDINAL)
}

/// Performs one platform request: one VM exit.
///
/// # Safety
///
/// Addresses in the arguments are handed to the VMM, which reads or writes
/// guest memory there: for CONSOLE_WRITE and PANIC `arg0..arg0+arg1` must be
/// readable, for ENTROPY it must be memory the caller may have overwritten.
pub unsafe fn request(op: u32, arg0: u64, arg1: u64, arg2: u64) -> Response {
    let mut block = RequestBlock {
        op,
        status: u32::MAX,
        args: [arg0, arg1, arg2],
        ret: [0; 2],
        reserved: [0; 2],
    };
    let block_ptr = addr_of_mut!(block);
    // Guest memory ends below 4 GiB (at most 3 GiB), so the stack address fits
    // the 32-bit port write.
    let address = block_ptr as usize as u32;
    // The VMM reads the block and writes status/ret during the `out`: keep the
    // compiler from moving the stores after it or the loads before it.
    compiler_fence(Ordering::SeqCst);
    // SAFETY: port 0x500 is the platform device; the `out` exits to the VMM,
    // which accesses only the request block and the memory the caller vouched
    // for. No `nomem`: the asm is a memory clobber for the exposed block.
    unsafe {
        asm!("out dx, eax", in("dx") REQUEST_PORT, in("eax") address,
             options(nostack, preserves_flags));
    }
    compiler_fence(Ordering::SeqCst);
    // SAFETY: the block is a live local; volatile because the VMM wrote it.
    unsafe {
        Response {
            status: ptr::read_volatile(addr_of!((*block_ptr).status)),
            ret0: ptr::read_volatile(addr_of!((*block_ptr).ret[0])),
            ret1: ptr::read_volatile(addr_of!((*block_ptr).ret[1])),
        }
    }
}

/// One exit that does nothing but refresh the platform page (clock).
pub fn nop() {
    // SAFETY: NOP carries no addresses.
    let r = unsafe { request(Op::Nop as u32, 0, 0, 0) };
    check(r, "NOP");
}

/// Writes bytes to the console directly (one exit per 64 KiB). Most code
/// wants [`crate::print!`], which buffers lines.
pub fn console_write(bytes: &[u8]) {
    for chunk in bytes.chunks(MAX_CONSOLE_WRITE) {
        // SAFETY: the VMM only reads `chunk`, which is a live slice.
        let r = unsafe {
            request(
                Op::ConsoleWrite as u32,
                chunk.as_ptr() as u64,
                chunk.len() as u64,
                0,
            )
        };
        check(r, "CONSOLE_WRITE");
    }
}

/// Fills `buf` with random bytes from the VMM (an input: recorded), one exit
/// per 4 KiB.
pub fn entropy(buf: &mut [u8]) {
    for chunk in buf.chunks_mut(MAX_ENTROPY) {
        // SAFETY: the VMM writes exactly `chunk`, which we borrow mutably.
        let r = unsafe {
            request(
                Op::Entropy as u32,
                chunk.as_mut_ptr() as u64,
                chunk.len() as u64,
                0,
            )
        };
        check(r, "ENTROPY");
    }
}

/// Sleeps until the monotonic clock reaches `deadline_ns` or device input
/// arrives, whichever is first. Returns true if input arrived. [`now_ns`]
/// shows the wake time afterwards.
pub fn wait_until(deadline_ns: u64) -> bool {
    wait_gathering(deadline_ns, 0, 0)
}

/// Longest gathering window [`wait_gathering`] may ask for.
pub const MAX_GATHER_NS: u64 = 1_000_000;

/// [`wait_until`], and once input has arrived, let the VMM gather more for
/// up to `window_ns` after the wait began (at most [`MAX_GATHER_NS`]), or
/// until `frames` frames wait (0: the whole window). A guest under load
/// uses it to take a batch per exit instead of one exit per few frames.
pub fn wait_gathering(deadline_ns: u64, window_ns: u64, frames: u64) -> bool {
    // SAFETY: WAIT carries no addresses.
    let r = unsafe {
        request(
            Op::Wait as u32,
            deadline_ns,
            window_ns.min(MAX_GATHER_NS),
            frames,
        )
    };
    check(r, "WAIT");
    r.ret0 != 0
}

/// Stops the machine; `ftvm run` exits with `code`. Flushes the console first.
pub fn power_off(code: u32) -> ! {
    crate::console::flush();
    // SAFETY: POWER_OFF carries no addresses.
    let _ = unsafe { request(Op::PowerOff as u32, u64::from(code), 0, 0) };
    contract_broken()
}

/// Stops the machine with a guest panic report carrying `message` (truncated
/// to 4 KiB). Used by the panic handler.
pub fn guest_panic(message: &[u8]) -> ! {
    let message = &message[..message.len().min(MAX_PANIC_MESSAGE)];
    // SAFETY: the VMM only reads `message`, a live slice.
    let _ = unsafe {
        request(
            Op::Panic as u32,
            message.as_ptr() as u64,
            message.len() as u64,
            0,
        )
    };
    contract_broken()
}

/// POWER_OFF and PANIC never return. If the VMM resumed us anyway, stop
/// loudly (a #UD crash report at a known RIP) instead of spinning forever.
fn contract_broken() -> ! {
    // SAFETY: `ud2` only raises #UD, which ends the machine.
    unsafe { asm!("ud2", options(noreturn, nomem, nostack)) }
}

fn check(r: Response, what: &str) {
    if !r.is_ok() {
        panic!("platform {what} request refused (status {})", r.status);
    }
}

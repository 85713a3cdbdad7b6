//! Entry: `_start` (the ELF entry point the VMM jumps to at CPL3).

use core::ptr::addr_of;

use crate::{heap, platform};

/// Stack reserved at the top of guest memory; the heap ends below it.
pub const STACK_SIZE: usize = 1024 * 1024;

/// Smallest heap the runtime accepts.
const MIN_HEAP: usize = 64 * 1024;

// The VMM enters with RSP = mem_size - 16 (16-byte aligned) and nothing else
// defined; the stack is the top STACK_SIZE bytes of memory. Align RSP anyway,
// end the frame-pointer chain, and call into Rust (the call leaves RSP
// 8 mod 16, as the ABI expects at function entry).
core::arch::global_asm!(
    ".section .text._start,\"ax\",@progbits",
    ".global _start",
    ".type _start,@function",
    "_start:",
    "    and rsp, -16",
    "    xor ebp, ebp",
    "    call {rt_start}",
    "    ud2",
    ".size _start, . - _start",
    rt_start = sym rt_start,
);

extern "C" {
    /// First byte after the image, from the linker script.
    static __image_end: u8;
}

extern "Rust" {
    /// Defined by the guest binary through `entry!`.
    fn __ftvm_guest_main() -> i32;
}

extern "C" fn rt_start() -> ! {
    if !platform::page_is_valid() {
        platform::guest_panic(
            b"ftvm-guest-rt: platform page lacks the FTVMPLAT magic or is not version 1",
        );
    }
    let mem_size = platform::mem_size() as usize;
    // Trust the larger of the VMM's and the linker's idea of the image end.
    let linker_end = addr_of!(__image_end) as usize;
    let heap_bottom = align_up(linker_end.max(platform::image_end() as usize), 4096);
    let stack_bottom = mem_size.saturating_sub(STACK_SIZE);
    if heap_bottom.saturating_add(MIN_HEAP) > stack_bottom {
        panic!(
            "ftvm-guest-rt: {mem_size} bytes of memory leave no heap (image ends at {heap_bottom:#x}, stack {STACK_SIZE} bytes)"
        );
    }
    let rsp: usize;
    // SAFETY: reads RSP into a register; touches nothing else.
    unsafe {
        core::arch::asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags))
    };
    if !(stack_bottom..=mem_size).contains(&rsp) {
        panic!("ftvm-guest-rt: entered with RSP {rsp:#x}, expected just below memory top {mem_size:#x}");
    }
    // SAFETY: [heap_bottom, stack_bottom) lies in guest RAM above the image and
    // below the stack; nothing else uses it.
    unsafe { heap::init(heap_bottom, stack_bottom) };
    // SAFETY: `entry!` defines this symbol with exactly this signature.
    let code = unsafe { __ftvm_guest_main() };
    platform::power_off(code as u32)
}

fn align_up(value: usize, align: usize) -> usize {
    (value + align - 1) & !(align - 1)
}

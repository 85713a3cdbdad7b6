//! The memory builtins the host target's `compiler_builtins` does not export.
//!
//! Written as string instructions in inline asm so LLVM cannot recognise the
//! loops and compile them back into calls to themselves. The System V ABI
//! guarantees the direction flag is clear on entry (and the VMM starts the
//! guest with RFLAGS = 0x2).

use core::arch::asm;

/// # Safety
/// `dest` and `src` valid for `n` bytes and not overlapping (C semantics).
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; `rep movsb` copies forward.
    unsafe {
        asm!("rep movsb",
             inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// `dest` and `src` valid for `n` bytes; they may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // Forward is safe unless dest starts inside [src, src + n).
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // SAFETY: as memcpy; a forward copy never reads a byte it already wrote here.
        unsafe { memcpy(dest, src, n) }
    } else {
        // SAFETY: n > 0 here (n == 0 takes the branch above); copy backwards
        // from the last byte with DF set, and clear DF again as the ABI needs.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rcx") n => _,
                 inout("rdi") dest.add(n - 1) => _,
                 inout("rsi") src.add(n - 1) => _,
                 options(nostack));
        }
        dest
    }
}

/// # Safety
/// `dest` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range; `rep stosb` stores AL n times.
    unsafe {
        asm!("rep stosb",
             inout("rcx") n => _, inout("rdi") dest => _, in("al") value as u8,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// `a` and `b` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    if n == 0 {
        return 0;
    }
    let mut pa = a;
    let mut pb = b;
    // SAFETY: the caller guarantees both ranges; `repe cmpsb` stops after the
    // first differing pair or after n pairs, leaving both pointers one past
    // the last pair it compared.
    unsafe {
        asm!("repe cmpsb",
             inout("rcx") n => _, inout("rsi") pa, inout("rdi") pb,
             options(nostack, readonly));
    }
    // The last compared pair differs iff the ranges differ (it is the first
    // mismatch, or the final pair when all before it matched).
    // SAFETY: pa - 1 and pb - 1 are within the ranges (n >= 1 pairs compared).
    let (x, y) = unsafe { (*pa.sub(1), *pb.sub(1)) };
    i32::from(x) - i32::from(y)
}

/// # Safety
/// `a` and `b` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// The prebuilt `alloc` references the unwinding personality even with
/// `panic = "abort"`; nothing ever unwinds, so it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

/// Landing pads in the prebuilt `core`/`alloc` (compiled for unwinding) end
/// in calls to this; with `panic = "abort"` no landing pad is ever entered.
/// Defined here rather than linking libgcc_eh (and with it libc).
#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    // SAFETY: unreachable by construction; if reached, stop with #UD.
    unsafe { core::arch::asm!("ud2", options(noreturn, nomem, nostack)) }
}

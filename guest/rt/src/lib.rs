//! Runtime for ftvm platform guests (see `docs/platform.md`).
//!
//! A guest binary is `#![no_std] #![no_main]`, depends on this crate and names
//! its main function with [`entry!`]:
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! ftvm_guest_rt::entry!(main);
//! fn main() -> i32 {
//!     ftvm_guest_rt::println!("hello at {} ns", ftvm_guest_rt::now_ns());
//!     0
//! }
//! ```
//!
//! The runtime provides the `_start` entry, a heap for `alloc` (from the end of
//! the image to the bottom of the stack), the memory builtins the host target's
//! `compiler_builtins` lacks, the panic handler (reports through the platform
//! PANIC request), a line-buffered console and the platform device driver.
//! When `main` returns, the console is flushed and the machine powers off with
//! the returned code.
//!
//! Everything here is deterministic except the values the VMM hands in at
//! exits (clock, entropy, wait outcome), which ftvm records and replays.

#![no_std]

extern crate alloc;

pub mod cmdline;
pub mod console;
mod heap;
mod mem;
mod panic;
pub mod platform;
mod start;

pub use heap::{heap_stats, HeapStats};
pub use platform::{
    entropy, exit_ordinal, image_end, mem_size, nop, now_ns, power_off, wait_gathering, wait_until,
    MAX_GATHER_NS,
};
pub use start::STACK_SIZE;

/// Names the guest's main function: `entry!(main)` where `fn main() -> i32`.
///
/// The runtime calls it once the heap is ready; its return value becomes the
/// power-off exit code.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[export_name = "__ftvm_guest_main"]
        pub fn __ftvm_guest_main() -> i32 {
            let main: fn() -> i32 = $main;
            main()
        }
    };
}

//! Line-buffered console over the platform CONSOLE_WRITE request: one exit
//! per line (or per 256 bytes of a long line), not per byte.

use core::cell::{RefCell, RefMut};
use core::fmt;

use crate::platform::{self, Op};

const LINE_CAPACITY: usize = 256;

struct LineBuffer {
    bytes: [u8; LINE_CAPACITY],
    len: usize,
}

impl LineBuffer {
    /// Hands the buffered bytes to `emit` and empties the buffer.
    fn drain(&mut self, emit: fn(&[u8])) {
        if self.len > 0 {
            emit(&self.bytes[..self.len]);
            self.len = 0;
        }
    }

    fn push(&mut self, data: &[u8]) {
        for &byte in data {
            self.bytes[self.len] = byte;
            self.len += 1;
            if byte == b'\n' || self.len == LINE_CAPACITY {
                self.drain(platform::console_write);
            }
        }
    }
}

/// Interior mutability for the runtime's statics.
pub(crate) struct GuestCell<T>(RefCell<T>);

// SAFETY: the guest has one vCPU, no threads and takes no interrupts, so two
// execution contexts never touch a cell at once; RefCell still catches
// re-entrant use on the one context (it panics instead of aliasing).
unsafe impl<T> Sync for GuestCell<T> {}

impl<T> GuestCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        GuestCell(RefCell::new(value))
    }

    /// The value, or `None` if it is already in use further up the stack.
    pub(crate) fn try_borrow_mut(&self) -> Option<RefMut<'_, T>> {
        self.0.try_borrow_mut().ok()
    }
}

static LINE: GuestCell<LineBuffer> = GuestCell::new(LineBuffer {
    bytes: [0; LINE_CAPACITY],
    len: 0,
});

/// Appends bytes to the console; complete lines are written out.
pub fn write_bytes(data: &[u8]) {
    // The borrow is held only while copying plain bytes, never while user
    // formatting code runs, so nested `print!` from a Display impl is fine.
    if let Some(mut line) = LINE.try_borrow_mut() {
        line.push(data);
    }
}

/// Writes out a partial line, if any.
pub fn flush() {
    if let Some(mut line) = LINE.try_borrow_mut() {
        line.drain(platform::console_write);
    }
}

/// For the panic handler: flush without checking the VMM's status (a refused
/// write must not panic again) and without waiting on a held borrow.
pub(crate) fn flush_best_effort() {
    fn emit_unchecked(bytes: &[u8]) {
        // SAFETY: the VMM only reads `bytes`, a live slice of at most 256 bytes.
        let _ = unsafe {
            platform::request(
                Op::ConsoleWrite as u32,
                bytes.as_ptr() as u64,
                bytes.len() as u64,
                0,
            )
        };
    }
    if let Some(mut line) = LINE.try_borrow_mut() {
        line.drain(emit_unchecked);
    }
}

/// A `fmt::Write` sink for the console.
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    let _ = fmt::Write::write_fmt(&mut Console, args);
}

/// Prints to the guest console (buffered until newline).
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

/// Prints a line to the guest console: one platform exit per line.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::_print(format_args!("{}\n", format_args!($($arg)*))) };
}

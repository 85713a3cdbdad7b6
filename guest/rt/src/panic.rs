//! Panics are reported to the VMM (platform PANIC request); the machine stops.

use core::fmt::{self, Write};
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::console::GuestCell;
use crate::platform::{self, MAX_PANIC_MESSAGE};

/// Fixed buffer for the message: a panic must not need the heap (it may be
/// the out-of-memory panic).
struct MessageBuffer {
    bytes: [u8; MAX_PANIC_MESSAGE],
    len: usize,
}

impl Write for MessageBuffer {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.bytes.len() - self.len;
        // Truncate on a char boundary so the report stays valid UTF-8.
        let mut take = s.len().min(room);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.bytes[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

static PANICKING: AtomicBool = AtomicBool::new(false);
static MESSAGE: GuestCell<MessageBuffer> = GuestCell::new(MessageBuffer {
    bytes: [0; MAX_PANIC_MESSAGE],
    len: 0,
});

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    if PANICKING.swap(true, Ordering::Relaxed) {
        platform::guest_panic(b"panic while panicking");
    }
    // Lines printed before the panic should reach the console first.
    crate::console::flush_best_effort();
    let mut message = match MESSAGE.try_borrow_mut() {
        Some(m) => m,
        None => platform::guest_panic(b"panic (message buffer busy)"),
    };
    let _ = write!(message, "{info}");
    let len = message.len;
    platform::guest_panic(&message.bytes[..len])
}

//! The global allocator: talc (a binned, boundary-tagged allocator, close to
//! TLSF) over one heap between the end of the image and the bottom of the
//! stack.
//!
//! Why not a first-fit list: ftkv's keyspace keeps hundreds of thousands of
//! small long-lived blocks (keys, values, B-tree nodes) interleaved with
//! short-lived request buffers. `linked_list_allocator` walks its
//! address-ordered hole list on every allocation *and* every free; with a
//! 200k-key keyspace that walk grew from 177 to over 2,000 holes per call,
//! and a host replay of the engine's MSET work slowed from 7,794 to 1,345
//! requests/s as the keyspace filled (docs/ftkv.md, "Keyspace growth";
//! `tests/examples/ftkv_heap_growth.rs` measures it). talc finds a fitting
//! free block through per-size-class bins and frees in O(1) with
//! coalescing, so its cost does not grow with the number of live blocks.
//! It is deterministic: the same sequence of calls gives the same
//! addresses, which replay relies on.

use talc::source::Manual;
use talc::TalcLock;

#[global_allocator]
static ALLOCATOR: TalcLock<spinning_top::RawSpinlock, Manual> = TalcLock::new(Manual);

/// Hands `[bottom, top)` to the allocator. Called once by the entry code.
///
/// # Safety
///
/// The range must be unused guest memory that nothing else touches afterwards.
pub(crate) unsafe fn init(bottom: usize, top: usize) {
    // SAFETY: the caller guarantees the range is free and exclusively ours.
    let claimed = unsafe { ALLOCATOR.lock().claim(bottom as *mut u8, top - bottom) };
    if claimed.is_none() {
        panic!("ftvm-guest-rt: the heap [{bottom:#x}, {top:#x}) is too small for the allocator");
    }
}

/// Heap usage, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes handed to the allocator.
    pub size: usize,
    /// Bytes of live allocations.
    pub used: usize,
    /// Bytes available for new allocations (the rest is allocator metadata).
    pub free: usize,
}

/// Current heap usage.
pub fn heap_stats() -> HeapStats {
    let counters = *ALLOCATOR.lock().counters();
    HeapStats {
        size: counters.claimed_bytes,
        used: counters.allocated_bytes,
        free: counters.available_bytes,
    }
}

//! The global allocator: a linked-list heap between the end of the image and
//! the bottom of the stack.

use linked_list_allocator::LockedHeap;

#[global_allocator]
static ALLOCATOR: LockedHeap = LockedHeap::empty();

/// Hands `[bottom, top)` to the allocator. Called once by the entry code.
///
/// # Safety
///
/// The range must be unused guest memory that nothing else touches afterwards.
pub(crate) unsafe fn init(bottom: usize, top: usize) {
    // SAFETY: the caller guarantees the range is free and exclusively ours.
    unsafe { ALLOCATOR.lock().init(bottom as *mut u8, top - bottom) }
}

/// Heap usage, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeapStats {
    pub size: usize,
    pub used: usize,
    pub free: usize,
}

/// Current heap usage.
pub fn heap_stats() -> HeapStats {
    let heap = ALLOCATOR.lock();
    HeapStats {
        size: heap.size(),
        used: heap.used(),
        free: heap.free(),
    }
}

//! Guest memory: one anonymous mapping from guest-physical 0. Writes the VMM
//! makes through `vm-memory` are tracked in an `AtomicBitmap`, so the state
//! digest and re-protection can see pages the VMM dirtied as well as those
//! KVM's dirty log reports for the guest.

use super::layout::PAGE_SIZE;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};

pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot allocate {size} bytes of guest memory: {source}")]
    Allocate {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Allocates `size` bytes of guest memory at guest-physical 0.
pub fn create(size: u64) -> Result<GuestMemory, MemoryError> {
    GuestMemory::from_ranges(&[(GuestAddress(0), size as usize)])
        .map_err(|source| MemoryError::Allocate { size, source })
}

/// Takes (and clears) the bitmap of pages the VMM wrote since the last call.
pub fn take_vmm_dirty(mem: &GuestMemory) -> Vec<u64> {
    mem.iter()
        .next()
        .map(|r| std::ops::Deref::deref(r).bitmap().get_and_reset())
        .unwrap_or_default()
}

/// Number of 4 KiB pages in `mem`.
pub fn page_count(mem: &GuestMemory) -> u64 {
    mem.iter().map(|r| r.len()).sum::<u64>() / PAGE_SIZE
}

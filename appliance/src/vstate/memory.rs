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

/// Gives all of guest memory back to the host: every page reads as zero
/// again, and none is resident (a joining backup's memory before the
/// primary's pages arrive). Only while no vCPU runs.
pub fn discard(mem: &GuestMemory) -> std::io::Result<()> {
    for r in mem.iter() {
        let len = r.len() as usize;
        let Ok(host) = r.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
            continue;
        };
        // SAFETY: `host..host+len` is this region's own private anonymous
        // mapping; MADV_DONTNEED on it only drops its pages (later reads see
        // zeros). No vCPU runs and no other reference reads it meanwhile.
        let rc = unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

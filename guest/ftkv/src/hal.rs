//! virtio-drivers' `Hal` for the ftvm platform, and finding the virtio-mmio
//! slots from the platform page (`docs/platform.md`, "virtio devices").
//!
//! Guest memory is identity mapped (physical == virtual) and the VMM reads
//! and writes guest RAM directly, so sharing a buffer is just handing its
//! address over; DMA memory (the virtqueues) comes from the heap, page
//! aligned and zeroed.

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use core::ptr::NonNull;

use ftvm_guest_rt::platform::PLATFORM_PAGE;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// Platform page: base of the virtio-mmio window (u64).
const VIRTIO_BASE_OFFSET: usize = 0x30;
/// Platform page: number of slots (u32).
const VIRTIO_SLOTS_OFFSET: usize = 0x38;
/// Size of one slot.
const SLOT_SIZE: usize = 0x1000;
/// Slot of the network card and of the disk.
pub const NET_SLOT: usize = 0;
pub const BLK_SLOT: usize = 1;

pub struct PlatformHal;

fn dma_layout(pages: usize) -> Option<Layout> {
    Layout::from_size_align(pages.checked_mul(PAGE_SIZE)?, PAGE_SIZE).ok()
}

// SAFETY: `dma_alloc` returns zeroed, page-aligned heap memory that nothing
// else references until `dma_dealloc`; physical == virtual on this platform,
// so the addresses handed to the device are the ones the driver uses.
unsafe impl Hal for PlatformHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Some(layout) = dma_layout(pages).filter(|l| l.size() > 0) else {
            return (0, NonNull::dangling());
        };
        // SAFETY: the layout has a nonzero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        match NonNull::new(ptr) {
            Some(p) => (ptr as usize as PhysAddr, p),
            // virtio-drivers turns paddr 0 into Error::DmaError.
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let Some(layout) = dma_layout(pages) else {
            return -1;
        };
        // SAFETY: the caller passes back what `dma_alloc` returned for `pages`,
        // which was allocated with this same layout.
        unsafe { dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // Identity mapped. Only the PCI transport calls this.
        NonNull::new(paddr as usize as *mut u8).expect("MMIO address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        // The VMM accesses guest RAM in place: no bounce buffer, no IOMMU.
        buffer.as_ptr() as *mut u8 as usize as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

fn read_page<T: Copy>(offset: usize) -> T {
    // SAFETY: the platform page is guest RAM at 0x20000, identity mapped and
    // readable; the offsets used here are naturally aligned fields of it.
    unsafe { core::ptr::read_volatile((PLATFORM_PAGE + offset) as *const T) }
}

/// The virtio-mmio transport of `slot`, or `None` if the slot does not
/// exist or is empty (MagicValue reads 0).
pub fn transport(slot: usize) -> Option<MmioTransport<'static>> {
    let base: u64 = read_page(VIRTIO_BASE_OFFSET);
    let slots: u32 = read_page(VIRTIO_SLOTS_OFFSET);
    if base == 0 || slot >= slots as usize {
        return None;
    }
    let addr = base as usize + slot * SLOT_SIZE;
    let header = NonNull::new(addr as *mut VirtIOHeader)?;
    // SAFETY: the platform page says a virtio-mmio slot of SLOT_SIZE bytes
    // (registers and config space) is at `addr`, page aligned; the VMM keeps
    // it there for the machine's lifetime and each slot is opened once.
    unsafe { MmioTransport::new(header, SLOT_SIZE) }.ok()
}

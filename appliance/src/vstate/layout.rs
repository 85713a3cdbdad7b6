//! Guest-physical memory layout of the platform (docs/platform.md).

/// GDT (8 descriptors: null, kernel code/data, user code32/data/code64, 64-bit TSS).
pub const GDT_ADDR: u64 = 0x1000;
/// IDT: 256 interrupt gates.
pub const IDT_ADDR: u64 = 0x2000;
/// TSS followed by the I/O permission bitmap.
pub const TSS_ADDR: u64 = 0x3000;
pub const TSS_SIZE: u64 = 0x68;
pub const IO_BITMAP_SIZE: u64 = 8192;
/// CPL0 exception stubs, 16 bytes each.
pub const EXCEPTION_STUBS_ADDR: u64 = 0x8000;
pub const EXCEPTION_STUB_SIZE: u64 = 16;
/// Top of the CPL0 stack (TSS.RSP0); exception frames land just below it.
pub const CPL0_STACK_TOP: u64 = 0xa000;
/// Identity-map page tables: PML4, PDPT, then four page directories (4 GiB, 2 MiB pages).
pub const PML4_ADDR: u64 = 0x10000;
pub const PDPT_ADDR: u64 = 0x11000;
pub const PD_ADDR: u64 = 0x12000;
pub const IDENTITY_MAP_GIB: u64 = 4;
/// The platform page the VMM writes and the guest reads.
pub const PLATFORM_PAGE: u64 = 0x20000;
/// The boot command line.
pub const CMDLINE_ADDR: u64 = 0x21000;
/// Lowest address a guest image may be loaded at.
pub const IMAGE_BASE: u64 = 0x20_0000;

/// Platform page fields (offsets from `PLATFORM_PAGE`).
pub const PP_MAGIC: u64 = 0x00;
pub const PP_VERSION: u64 = 0x08;
pub const PP_CMDLINE_LEN: u64 = 0x0c;
pub const PP_MEM_SIZE: u64 = 0x10;
pub const PP_CLOCK_NS: u64 = 0x18;
pub const PP_EXIT_ORDINAL: u64 = 0x20;
pub const PP_IMAGE_END: u64 = 0x28;
pub const PLATFORM_MAGIC: [u8; 8] = *b"FTVMPLAT";
pub const PLATFORM_VERSION: u32 = 1;

/// GDT selectors.
pub const SEL_KERNEL_CS: u16 = 0x08;
pub const SEL_USER_DS: u16 = 0x23;
pub const SEL_USER_CS: u16 = 0x2b;
pub const SEL_TSS: u16 = 0x30;

pub const PAGE_SIZE: u64 = 4096;

/// virtio-mmio window: slot `i` is at `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SLOT`.
/// Slot 0 is the network card, slot 1 the disk; an empty slot reads device ID 0.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SLOT: u64 = 0x1000;
pub const VIRTIO_MMIO_SLOTS: u64 = 2;
pub const PP_VIRTIO_BASE: u64 = 0x30;
pub const PP_VIRTIO_SLOTS: u64 = 0x38;

//! The structures that put the vCPU in 64-bit mode at CPL3: GDT, TSS with an
//! all-open I/O bitmap, IDT whose gates lead to tiny CPL0 stubs that report
//! the exception to the VMM, and identity page tables.
//!
//! Everything the CPU could set by itself (descriptor accessed/busy bits,
//! page-table accessed/dirty bits) is set here in advance, so the CPU never
//! writes these pages and they stay identical on primary and backup.

use super::layout::*;
use super::memory::GuestMemory;
use kvm_bindings::{kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

/// Vectors for which the CPU pushes an error code.
const VECTORS_WITH_ERROR_CODE: [u8; 10] = [8, 10, 11, 12, 13, 14, 17, 21, 29, 30];

/// The port the exception stubs write the vector to.
pub const CRASH_PORT: u16 = 0x504;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

fn gdt_entries() -> [u64; 8] {
    let tss_limit = TSS_SIZE + IO_BITMAP_SIZE; // includes the trailing 0xff byte
    let base = TSS_ADDR;
    // 64-bit available->busy TSS (type 0xB), present, DPL0.
    let tss_low = (tss_limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x8b << 40)
        | (((tss_limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    let tss_high = base >> 32;
    [
        0,
        0x00af_9b00_0000_ffff, // 0x08 kernel code, 64-bit, accessed
        0x00cf_9300_0000_ffff, // 0x10 kernel data, accessed
        0x00cf_fb00_0000_ffff, // 0x18 user code 32-bit (unused)
        0x00cf_f300_0000_ffff, // 0x20 user data, DPL3, accessed
        0x00af_fb00_0000_ffff, // 0x28 user code, 64-bit, DPL3, accessed
        tss_low,               // 0x30 TSS
        tss_high,
    ]
}

/// The CPL0 stub for `vector`: push a zero error code where the CPU does not,
/// write the vector to the crash port, then halt forever.
fn exception_stub(vector: u8) -> Vec<u8> {
    let mut code = Vec::with_capacity(EXCEPTION_STUB_SIZE as usize);
    if !VECTORS_WITH_ERROR_CODE.contains(&vector) {
        code.extend_from_slice(&[0x6a, 0x00]); // push 0
    }
    code.push(0xb8); // mov eax, imm32
    code.extend_from_slice(&u32::from(vector).to_le_bytes());
    code.extend_from_slice(&[0x66, 0xba]); // mov dx, imm16
    code.extend_from_slice(&CRASH_PORT.to_le_bytes());
    code.push(0xef); // out dx, eax
    code.push(0xf4); // hlt
    code.extend_from_slice(&[0xeb, 0xfd]); // jmp back to hlt
    code
}

fn idt_gate(handler: u64) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&SEL_KERNEL_CS.to_le_bytes());
    g[4] = 0; // IST
    g[5] = 0x8e; // present, DPL0, 64-bit interrupt gate
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    g
}

/// Writes GDT, TSS, IDT, exception stubs and page tables into guest memory.
pub fn write_boot_structures(mem: &GuestMemory) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, d) in gdt_entries().iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    // TSS: RSP0 at offset 4, I/O map base at 0x66 pointing right after the TSS.
    mem.write_slice(&[0u8; TSS_SIZE as usize], GuestAddress(TSS_ADDR))?;
    mem.write_obj(CPL0_STACK_TOP, GuestAddress(TSS_ADDR + 4))?;
    mem.write_obj(TSS_SIZE as u16, GuestAddress(TSS_ADDR + 0x66))?;
    mem.write_slice(
        &vec![0u8; IO_BITMAP_SIZE as usize],
        GuestAddress(TSS_ADDR + TSS_SIZE),
    )?;
    mem.write_obj(0xffu8, GuestAddress(TSS_ADDR + TSS_SIZE + IO_BITMAP_SIZE))?;

    for vector in 0..=255u8 {
        let stub_addr = EXCEPTION_STUBS_ADDR + EXCEPTION_STUB_SIZE * u64::from(vector);
        let mut stub = exception_stub(vector);
        stub.resize(EXCEPTION_STUB_SIZE as usize, 0xcc);
        mem.write_slice(&stub, GuestAddress(stub_addr))?;
        mem.write_slice(
            &idt_gate(stub_addr),
            GuestAddress(IDT_ADDR + 16 * u64::from(vector)),
        )?;
    }

    // Present | writable | user | accessed (| dirty | 2 MiB for leaf entries).
    const TABLE: u64 = 0x1 | 0x2 | 0x4 | 0x20;
    const LEAF_2M: u64 = TABLE | 0x40 | 0x80;
    mem.write_obj(PDPT_ADDR | TABLE, GuestAddress(PML4_ADDR))?;
    for gib in 0..IDENTITY_MAP_GIB {
        let pd = PD_ADDR + gib * PAGE_SIZE;
        mem.write_obj(pd | TABLE, GuestAddress(PDPT_ADDR + 8 * gib))?;
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            mem.write_obj(phys | LEAF_2M, GuestAddress(pd + 8 * i))?;
        }
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, dpl: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers for 64-bit mode at CPL3 with this module's structures.
pub fn cpl3_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (8 * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = (256 * 16 - 1) as u16;
    sregs.cs = segment(SEL_USER_CS, 0xb, 3, true);
    let data = segment(SEL_USER_DS, 0x3, 3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS_ADDR,
        limit: (TSS_SIZE + IO_BITMAP_SIZE) as u32,
        selector: SEL_TSS,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.ldt = kvm_segment {
        unusable: 1,
        ..Default::default()
    };
    sregs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stubs_fit_and_differ_by_error_code() {
        for v in 0..=255u8 {
            assert!(exception_stub(v).len() as u64 <= EXCEPTION_STUB_SIZE);
        }
        assert_eq!(exception_stub(0).len(), exception_stub(14).len() + 2);
    }

    #[test]
    fn tss_descriptor_encodes_base_and_limit() {
        let g = gdt_entries();
        let low = g[6];
        assert_eq!(low & 0xffff, TSS_SIZE + IO_BITMAP_SIZE);
        assert_eq!((low >> 16) & 0xff_ffff, TSS_ADDR);
        assert_eq!((low >> 40) & 0xff, 0x8b);
    }
}

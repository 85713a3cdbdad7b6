//! The vCPU's state for save/restore: general and system registers, the
//! XSAVE area and XCRs (x87, SSE and any extended state), the MSRs a
//! platform guest can touch, pending events and the MP state.
//!
//! The FPU goes through KVM_GET/SET_XSAVE, not KVM_SET_FPU: SET_FPU writes
//! the legacy area but leaves the XSAVE header's feature bits as they were,
//! so on a fresh vCPU the SSE registers came back zero at the next entry (a
//! joined backup diverged on XMM6 at its first digest).

use super::vcpu::Vcpu;
use crate::persist::PersistError;
use kvm_bindings::{
    kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use serde::{Deserialize, Serialize};

/// MSRs saved: SYSENTER, PAT, MISC_ENABLE, the SYSCALL MSRs and
/// KERNEL_GS_BASE. EFER, FS and GS bases are in the system registers; the
/// TSC is not guest state on this platform (the guest never reads it).
const MSRS: [u32; 9] = [
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0x1a0,       // MISC_ENABLE
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
];
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Words in KVM's legacy XSAVE buffer (4 KiB): x87, SSE, AVX and the
/// header. A guest with larger state (AMX) would need KVM_GET_XSAVE2; this
/// VMM never enables it.
const XSAVE_WORDS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// `kvm_xsave.region`, word by word.
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
}

fn kvm(e: kvm_ioctls::Error) -> PersistError {
    PersistError::Vcpu(e.to_string())
}

fn msr_list() -> Vec<kvm_msr_entry> {
    MSRS.iter()
        .chain(std::iter::once(&MSR_KERNEL_GS_BASE))
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect()
}

impl Vcpu {
    /// Reads the whole vCPU state. Call only on the vCPU's own thread, with
    /// the vCPU outside KVM_RUN.
    pub fn save_state(&self) -> Result<VcpuState, PersistError> {
        let regs = self.fd.get_regs().map_err(kvm)?;
        let sregs = self.fd.get_sregs().map_err(kvm)?;
        let xsave = self.fd.get_xsave().map_err(kvm)?;
        let xcrs = self.fd.get_xcrs().map_err(kvm)?;
        let mut msrs =
            Msrs::from_entries(&msr_list()).map_err(|e| PersistError::Vcpu(e.to_string()))?;
        let n = self.fd.get_msrs(&mut msrs).map_err(kvm)?;
        let msrs = msrs.as_slice()[..n]
            .iter()
            .map(|e| (e.index, e.data))
            .collect();
        Ok(VcpuState {
            regs,
            sregs,
            xsave: xsave.region.to_vec(),
            xcrs,
            msrs,
            events: self.fd.get_vcpu_events().map_err(kvm)?,
            mp_state: self.fd.get_mp_state().map_err(kvm)?,
        })
    }

    /// Writes a saved state into this vCPU.
    pub fn restore_state(&self, s: &VcpuState) -> Result<(), PersistError> {
        self.fd.set_sregs(&s.sregs).map_err(kvm)?;
        self.fd.set_regs(&s.regs).map_err(kvm)?;
        if s.xsave.len() != XSAVE_WORDS {
            return Err(PersistError::Decode(format!(
                "XSAVE area of {} words, expected {XSAVE_WORDS}",
                s.xsave.len()
            )));
        }
        // XCR0 first: it says which XSAVE components the area may carry.
        self.fd.set_xcrs(&s.xcrs).map_err(kvm)?;
        let mut xsave = kvm_xsave::default();
        xsave.region.copy_from_slice(&s.xsave);
        // SAFETY: `xsave` is a whole 4 KiB `kvm_xsave`, and this VMM never
        // enables dynamic XSTATE features (KVM_CAP_XSAVE2 sizes above 4 KiB),
        // so KVM reads no more than the struct holds.
        unsafe { self.fd.set_xsave(&xsave) }.map_err(kvm)?;
        let entries: Vec<kvm_msr_entry> = s
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| PersistError::Vcpu(e.to_string()))?;
        let n = self.fd.set_msrs(&msrs).map_err(kvm)?;
        if n != entries.len() {
            return Err(PersistError::Vcpu(format!(
                "KVM took {n} of {} MSRs (MSR {:#x} refused)",
                entries.len(),
                entries.get(n).map_or(0, |e| e.index)
            )));
        }
        self.fd.set_vcpu_events(&s.events).map_err(kvm)?;
        self.fd.set_mp_state(s.mp_state).map_err(kvm)?;
        Ok(())
    }
}

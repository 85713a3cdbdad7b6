//! The vCPU's state for save/restore: general and system registers, x87 and
//! SSE state, the MSRs a platform guest can touch, pending events and the
//! MP state.

use super::vcpu::Vcpu;
use crate::persist::PersistError;
use kvm_bindings::{kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, Msrs};
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

/// x87 and SSE state (`kvm_fpu`, field by field).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: Vec<[u8; 16]>,
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: Vec<[u8; 16]>,
    pub mxcsr: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
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
        let f = self.fd.get_fpu().map_err(kvm)?;
        let mut msrs = Msrs::from_entries(&msr_list()).map_err(|e| PersistError::Vcpu(e.to_string()))?;
        let n = self.fd.get_msrs(&mut msrs).map_err(kvm)?;
        let msrs = msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)).collect();
        Ok(VcpuState {
            regs,
            sregs,
            fpu: FpuState {
                fpr: f.fpr.to_vec(),
                fcw: f.fcw,
                fsw: f.fsw,
                ftwx: f.ftwx,
                last_opcode: f.last_opcode,
                last_ip: f.last_ip,
                last_dp: f.last_dp,
                xmm: f.xmm.to_vec(),
                mxcsr: f.mxcsr,
            },
            msrs,
            events: self.fd.get_vcpu_events().map_err(kvm)?,
            mp_state: self.fd.get_mp_state().map_err(kvm)?,
        })
    }

    /// Writes a saved state into this vCPU.
    pub fn restore_state(&self, s: &VcpuState) -> Result<(), PersistError> {
        self.fd.set_sregs(&s.sregs).map_err(kvm)?;
        self.fd.set_regs(&s.regs).map_err(kvm)?;
        let mut fpu = kvm_fpu {
            fcw: s.fpu.fcw,
            fsw: s.fpu.fsw,
            ftwx: s.fpu.ftwx,
            last_opcode: s.fpu.last_opcode,
            last_ip: s.fpu.last_ip,
            last_dp: s.fpu.last_dp,
            mxcsr: s.fpu.mxcsr,
            ..Default::default()
        };
        if s.fpu.fpr.len() != fpu.fpr.len() || s.fpu.xmm.len() != fpu.xmm.len() {
            return Err(PersistError::Decode(format!(
                "FPU state with {} x87 and {} SSE registers",
                s.fpu.fpr.len(),
                s.fpu.xmm.len()
            )));
        }
        fpu.fpr.copy_from_slice(&s.fpu.fpr);
        fpu.xmm.copy_from_slice(&s.fpu.xmm);
        self.fd.set_fpu(&fpu).map_err(kvm)?;
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

//! The vCPU: CPUID filtering, entry state for CPL3, register snapshots for
//! digests, and the controller that lets another thread pause, resume or
//! stop the vCPU thread.

use super::boot;
use super::vm::Vm;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::VcpuFd;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_CREATE_VCPU failed: {0}")]
    Create(#[source] kvm_ioctls::Error),
    #[error("CPUID setup failed: {0}")]
    Cpuid(#[source] kvm_ioctls::Error),
    #[error("reading or writing vCPU registers failed: {0}")]
    Registers(#[source] kvm_ioctls::Error),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

pub struct Vcpu {
    pub fd: VcpuFd,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Vcpu")
    }
}

/// Removes what a platform guest must not see: RDRAND, RDSEED, RDTSCP, the
/// PMU, AVX/XSAVE (XCR0 stays x87|SSE), and the KVM paravirt leaves.
fn filter_cpuid(cpuid: &mut CpuId) {
    let entries = cpuid.as_mut_slice();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ecx &= !(1 << 30); // RDRAND
                e.ecx &= !(1 << 28); // AVX
                e.ecx &= !(1 << 27); // OSXSAVE
                e.ecx &= !(1 << 26); // XSAVE
                e.ecx &= !(1 << 31); // hypervisor present: no paravirt
                e.ecx &= !(1 << 15); // PDCM (perf capabilities)
            }
            7 if e.index == 0 => {
                e.ebx &= !(1 << 18); // RDSEED
                e.ebx &= !(1 << 5); // AVX2
                e.ebx &= !(1 << 16); // AVX512F and friends
                e.ebx &= !(0xffff_0000 & 0xd023_0000);
            }
            0xa => {
                // No architectural PMU.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x8000_0001 => {
                e.edx &= !(1 << 27); // RDTSCP
            }
            _ => {}
        }
    }
    let kept: Vec<_> = entries
        .iter()
        .filter(|e| !(0x4000_0000..0x5000_0000).contains(&e.function) && e.function != 0xd)
        .copied()
        .collect();
    if let Ok(filtered) = CpuId::from_entries(&kept) {
        *cpuid = filtered;
    }
}

impl Vcpu {
    pub fn new(vm: &Vm) -> Result<Self, VcpuError> {
        let fd = vm.fd.create_vcpu(0).map_err(VcpuError::Create)?;
        let mut cpuid = vm
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VcpuError::Cpuid)?;
        filter_cpuid(&mut cpuid);
        fd.set_cpuid2(&cpuid).map_err(VcpuError::Cpuid)?;
        Ok(Vcpu { fd })
    }

    /// Puts the vCPU at `entry` in 64-bit mode at CPL3 with stack `rsp`.
    pub fn setup_cpl3_entry(&self, entry: u64, rsp: u64) -> Result<(), VcpuError> {
        let sregs = self.fd.get_sregs().map_err(VcpuError::Registers)?;
        self.fd
            .set_sregs(&boot::cpl3_sregs(sregs))
            .map_err(VcpuError::Registers)?;
        let regs = kvm_regs {
            rip: entry,
            rsp,
            rflags: 0x2,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(VcpuError::Registers)?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(VcpuError::Registers)?;
        Ok(())
    }

    pub fn regs(&self) -> Result<kvm_regs, VcpuError> {
        self.fd.get_regs().map_err(VcpuError::Registers)
    }

    pub fn sregs(&self) -> Result<kvm_sregs, VcpuError> {
        self.fd.get_sregs().map_err(VcpuError::Registers)
    }

    /// The guest-visible register state in a fixed byte layout, for digests:
    /// general registers, RIP, RFLAGS, control registers, x87/SSE state.
    pub fn state_bytes(&self) -> Result<Vec<u8>, VcpuError> {
        let r = self.regs()?;
        let s = self.sregs()?;
        let f = self.fd.get_fpu().map_err(VcpuError::Registers)?;
        let mut out = Vec::with_capacity(512);
        for v in [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer,
            s.fs.base, s.gs.base,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&f.fcw.to_le_bytes());
        out.extend_from_slice(&f.fsw.to_le_bytes());
        out.extend_from_slice(&f.mxcsr.to_le_bytes());
        for reg in f.fpr.iter().chain(f.xmm.iter()) {
            out.extend_from_slice(reg);
        }
        Ok(out)
    }
}

/// What the vCPU thread is doing, as seen by its controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    Running,
    Paused,
    Finished,
}

struct ControlInner {
    state: VcpuState,
    pause_requested: bool,
    stop_requested: bool,
    thread: Option<libc::pthread_t>,
    /// Work to do on the vCPU thread at the next exit boundary.
    at_boundary: Option<crate::machine::BoundaryTask>,
}

impl std::fmt::Debug for ControlInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlInner")
            .field("state", &self.state)
            .field("stop_requested", &self.stop_requested)
            .field("at_boundary", &self.at_boundary.is_some())
            .finish()
    }
}

/// Lets another thread pause, resume or stop the vCPU thread. A pause takes
/// effect between two KVM_RUNs; a vCPU inside KVM_RUN is kicked out with a
/// signal (a host-caused exit, not counted in the exit ordinal).
#[derive(Debug)]
pub struct VcpuControl {
    inner: Mutex<ControlInner>,
    changed: Condvar,
}

/// What the vCPU loop should do at a checkpoint.
#[derive(Debug, PartialEq, Eq)]
pub enum Checkpoint {
    Continue,
    Stop,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

impl Default for VcpuControl {
    fn default() -> Self {
        Self::new()
    }
}

impl VcpuControl {
    pub fn new() -> Self {
        VcpuControl {
            inner: Mutex::new(ControlInner {
                state: VcpuState::Running,
                pause_requested: false,
                stop_requested: false,
                thread: None,
                at_boundary: None,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ControlInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called once on the vCPU thread before it first enters the guest.
    pub fn attach_current_thread(&self) -> Result<(), VcpuError> {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(VcpuError::Signal)?;
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.lock().thread = Some(me);
        Ok(())
    }

    pub fn state(&self) -> VcpuState {
        self.lock().state
    }

    fn kick(&self, inner: &ControlInner) {
        if let Some(t) = inner.thread {
            // SAFETY: `t` is the vCPU thread, alive until it marks itself
            // Finished (checked by callers under the same lock); the signal
            // has a no-op handler installed.
            unsafe {
                libc::pthread_kill(t, kick_signal());
            }
        }
    }

    /// Asks the vCPU to pause and waits until it has.
    pub fn pause(&self) -> VcpuState {
        let mut inner = self.lock();
        inner.pause_requested = true;
        while inner.state == VcpuState::Running {
            self.kick(&inner);
            let (g, _) = self
                .changed
                .wait_timeout(inner, Duration::from_millis(1))
                .unwrap_or_else(|p| p.into_inner());
            inner = g;
        }
        inner.state
    }

    pub fn resume(&self) {
        let mut inner = self.lock();
        inner.pause_requested = false;
        self.changed.notify_all();
    }

    /// Runs `task` on the vCPU thread at the next exit boundary (after the
    /// exit's I/O completed, before any further guest instruction): the
    /// machine is then in a state a backup can start from. The task may
    /// block; the guest stays stopped until it returns.
    pub fn run_at_boundary(&self, task: crate::machine::BoundaryTask) {
        let mut inner = self.lock();
        inner.at_boundary = Some(task);
        if inner.state == VcpuState::Running {
            self.kick(&inner);
        }
        self.changed.notify_all();
    }

    /// The pending boundary task, if any (the vCPU loop takes it).
    pub fn take_boundary_task(&self) -> Option<crate::machine::BoundaryTask> {
        self.lock().at_boundary.take()
    }

    /// Asks the vCPU loop to stop at its next checkpoint.
    pub fn stop(&self) {
        let mut inner = self.lock();
        inner.stop_requested = true;
        inner.pause_requested = false;
        if inner.state == VcpuState::Running {
            self.kick(&inner);
        }
        self.changed.notify_all();
    }

    /// Keeps kicking the vCPU thread every `every` until it has finished, so a
    /// stop cannot be lost to a kick that landed just before KVM_RUN.
    pub fn kick_until_finished(&self, every: Duration) {
        loop {
            {
                let inner = self.lock();
                if inner.state == VcpuState::Finished {
                    return;
                }
                self.kick(&inner);
            }
            std::thread::sleep(every);
        }
    }

    /// Called by the vCPU loop between KVM_RUNs: blocks while paused.
    pub fn checkpoint(&self) -> Checkpoint {
        let mut inner = self.lock();
        loop {
            if inner.stop_requested {
                return Checkpoint::Stop;
            }
            if !inner.pause_requested {
                if inner.state != VcpuState::Running {
                    inner.state = VcpuState::Running;
                    self.changed.notify_all();
                }
                return Checkpoint::Continue;
            }
            if inner.state != VcpuState::Paused {
                inner.state = VcpuState::Paused;
                self.changed.notify_all();
            }
            inner = self.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Marks the vCPU finished; no more kicks are sent to its thread.
    pub fn finish(&self) {
        let mut inner = self.lock();
        inner.state = VcpuState::Finished;
        inner.thread = None;
        self.changed.notify_all();
    }

    /// Whether a pause or stop is pending (the loop re-checks before KVM_RUN).
    pub fn wants_attention(&self) -> bool {
        let inner = self.lock();
        inner.pause_requested || inner.stop_requested
    }
}

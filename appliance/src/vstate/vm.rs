//! The KVM VM: one memory slot with dirty logging, no in-kernel irqchip or PIT
//! (inputs reach the guest only at exits, DESIGN.md section 2).

use super::memory::{self, GuestMemory};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend as _};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION failed: {0}")]
    MemoryRegion(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_DIRTY_LOG failed: {0}")]
    DirtyLog(#[source] kvm_ioctls::Error),
    #[error("guest memory has no host mapping at 0")]
    NoHostMapping,
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
}

const SLOT: u32 = 0;

pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
    pub mem: GuestMemory,
    mem_size: u64,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("mem_size", &self.mem_size)
            .finish()
    }
}

impl Vm {
    pub fn new(mem_size: u64) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let mem = memory::create(mem_size)?;
        let host = mem
            .get_host_address(GuestAddress(0))
            .map_err(|_| VmError::NoHostMapping)?;
        let region = kvm_userspace_memory_region {
            slot: SLOT,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: mem_size,
            userspace_addr: host as u64,
        };
        // SAFETY: `host` maps `mem_size` bytes owned by `mem`, which lives in
        // this struct as long as the VM fd does.
        unsafe { fd.set_user_memory_region(region) }.map_err(VmError::MemoryRegion)?;
        Ok(Vm {
            kvm,
            fd,
            mem,
            mem_size,
        })
    }

    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// Pages written since the last call, by the guest (KVM's dirty log) or by
    /// the VMM (the vm-memory bitmap), one bit per 4 KiB page.
    pub fn take_dirty_bitmap(&self) -> Result<Vec<u64>, VmError> {
        let mut bits = self
            .fd
            .get_dirty_log(SLOT, self.mem_size as usize)
            .map_err(VmError::DirtyLog)?;
        let vmm = memory::take_vmm_dirty(&self.mem);
        for (b, v) in bits.iter_mut().zip(vmm.iter()) {
            *b |= *v;
        }
        Ok(bits)
    }
}

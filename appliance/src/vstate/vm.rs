//! The KVM VM: one memory slot with dirty logging, no in-kernel irqchip or PIT
//! (inputs reach the guest only at exits, DESIGN.md section 2).

use super::memory::{self, GuestMemory};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VmFd};
use std::sync::{Arc, Mutex};
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
    pub fd: Arc<VmFd>,
    pub mem: GuestMemory,
    mem_size: u64,
    dirty: Arc<DirtyLog>,
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
        let fd = Arc::new(fd);
        let dirty = Arc::new(DirtyLog {
            fd: fd.clone(),
            mem: mem.clone(),
            mem_size,
            inner: Mutex::new(DirtyInner::default()),
        });
        Ok(Vm {
            kvm,
            fd,
            mem,
            mem_size,
            dirty,
        })
    }

    /// The VM's dirty-page log, shared with re-protection's pre-copy.
    pub fn dirty_log(&self) -> Arc<DirtyLog> {
        self.dirty.clone()
    }

    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// Pages written since the last call, for state digests (see [`DirtyLog`]).
    pub fn take_dirty_bitmap(&self) -> Result<Vec<u64>, VmError> {
        self.dirty.take_for_digest()
    }
}

#[derive(Debug, Default)]
struct DirtyInner {
    digest: Vec<u64>,
    migration: Option<Vec<u64>>,
}

/// Who wrote which page: KVM's dirty log (the guest) and vm-memory's bitmap
/// (the VMM), one bit per 4 KiB page. Reading KVM's log clears it, so one
/// owner reads it and hands the bits to every consumer: state digests, and
/// re-protection's pre-copy while it runs. Neither steals the other's bits.
pub struct DirtyLog {
    fd: Arc<VmFd>,
    mem: GuestMemory,
    mem_size: u64,
    inner: Mutex<DirtyInner>,
}

impl std::fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyLog")
            .field("mem_size", &self.mem_size)
            .finish()
    }
}

fn or_into(dst: &mut Vec<u64>, src: &[u64]) {
    if dst.len() < src.len() {
        dst.resize(src.len(), 0);
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d |= *s;
    }
}

impl DirtyLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, DirtyInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn collect(&self, inner: &mut DirtyInner) -> Result<(), VmError> {
        let mut bits = self
            .fd
            .get_dirty_log(SLOT, self.mem_size as usize)
            .map_err(VmError::DirtyLog)?;
        let vmm = memory::take_vmm_dirty(&self.mem);
        or_into(&mut bits, &vmm);
        or_into(&mut inner.digest, &bits);
        if let Some(m) = inner.migration.as_mut() {
            or_into(m, &bits);
        }
        Ok(())
    }

    /// Pages written since the last digest.
    pub fn take_for_digest(&self) -> Result<Vec<u64>, VmError> {
        let mut inner = self.lock();
        self.collect(&mut inner)?;
        Ok(std::mem::take(&mut inner.digest))
    }

    /// Starts collecting pages for a pre-copy (from now on).
    pub fn start_migration(&self) -> Result<(), VmError> {
        let mut inner = self.lock();
        self.collect(&mut inner)?;
        inner.migration = Some(Vec::new());
        Ok(())
    }

    /// Pages written since the last call (or since `start_migration`).
    pub fn take_for_migration(&self) -> Result<Vec<u64>, VmError> {
        let mut inner = self.lock();
        self.collect(&mut inner)?;
        Ok(inner.migration.replace(Vec::new()).unwrap_or_default())
    }

    pub fn stop_migration(&self) {
        self.lock().migration = None;
    }
}

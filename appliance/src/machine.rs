//! The machine: VM, vCPU, devices, and the exit loop that counts guest-caused
//! exits (the exit ordinal, DESIGN.md section 2) and hands every exit to the
//! environment before a device sees it.

use crate::device_manager::{BusOverlap, MmioBus, PioBus};
use crate::devices::console::Console;
use crate::devices::platform::{self, Platform, PLATFORM_BASE, PLATFORM_LEN};
use crate::devices::serial::{Com1, COM1_BASE, COM1_LEN};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::Net;
use crate::devices::{DeviceAction, DeviceError, ExitContext};
use crate::loader::{GuestImage, ImageError, LoadedImage};
use crate::replay::digest::{self, DigestError, PageRun};
use crate::replay::env::{DigestDue, EnvError, Environment, ExitKind, ExitPoint, Outcome};
use crate::replay::log::{DiskReads, DiskShape, LogHeader, MachineShape, LOG_FORMAT_VERSION};
use crate::vstate::boot;
use crate::vstate::layout::PAGE_SIZE;
use crate::vstate::vcpu::{Checkpoint, Vcpu, VcpuControl, VcpuError};
use crate::vstate::vm::{Vm, VmError};
use ftvm_config::appliance::ApplianceConfig;
use kvm_ioctls::VcpuExit;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("writing boot structures failed: {0}")]
    Boot(#[source] vm_memory::GuestMemoryError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error(transparent)]
    Bus(#[from] BusOverlap),
    #[error("KVM_RUN failed: {0}")]
    Run(#[source] kvm_ioctls::Error),
    #[error("{path}: key `{key}`: {message}")]
    Config {
        path: std::path::PathBuf,
        key: &'static str,
        message: String,
    },
    #[error("disk {0}")]
    Disk(#[from] ftvm_storage::StorageError),
    #[error(transparent)]
    Persist(#[from] crate::persist::PersistError),
    #[error("KVM could not run the guest: {0}")]
    Internal(String),
}

impl MachineError {
    /// The divergence this error reports, if it is one.
    pub fn divergence(&self) -> Option<(u64, &str)> {
        match self {
            MachineError::Env(EnvError::Diverged { ordinal, what })
            | MachineError::Device(DeviceError::Env(EnvError::Diverged { ordinal, what })) => {
                Some((*ordinal, what.as_str()))
            }
            _ => None,
        }
    }
}

/// Work run on the vCPU thread at an exit boundary (see
/// [`VcpuControl::run_at_boundary`]).
pub type BoundaryTask = Box<dyn FnOnce(&mut Machine) + Send>;

/// A stop waits at most this long for the guest's next exit.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// What one entry into the guest came back with.
#[derive(Debug)]
enum Step {
    /// KVM_RUN returned for a host reason (a kick): not counted, and guest
    /// instructions may have run since the last counted exit.
    Host,
    /// A counted exit was handled; the machine goes on.
    Guest,
    /// The machine ended at this exit.
    Ended(Outcome),
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub outcome: Outcome,
    /// Guest-caused exits.
    pub exits: u64,
    /// blake3 of the final registers and all of memory.
    pub digest: [u8; 32],
}

pub struct Machine {
    vm: Vm,
    vcpu: Vcpu,
    pio: PioBus,
    mmio: MmioBus,
    image: GuestImage,
    shape: MachineShape,
    ordinal: u64,
    pages: u64,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("image", &self.image.path)
            .field("ordinal", &self.ordinal)
            .finish()
    }
}

fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl Machine {
    /// Builds the machine a config describes, ready to enter the guest.
    pub fn new(cfg: &ApplianceConfig, console: Console) -> Result<Self, MachineError> {
        Self::build(cfg, console, true)
    }

    /// Builds the machine a config describes with zeroed memory and nothing
    /// loaded: what [`Machine::restore_state`] and re-protection's page
    /// transfer fill in.
    pub fn new_for_restore(cfg: &ApplianceConfig, console: Console) -> Result<Self, MachineError> {
        Self::build(cfg, console, false)
    }

    fn build(cfg: &ApplianceConfig, console: Console, boot: bool) -> Result<Self, MachineError> {
        let image = GuestImage::read(&cfg.machine.image)?;
        let mem_size = cfg.machine.memory_mib << 20;
        let vm = Vm::new(mem_size)?;
        let vcpu = Vcpu::new(&vm)?;
        if boot {
            boot::write_boot_structures(&vm.mem).map_err(MachineError::Boot)?;
            let loaded: LoadedImage = image.load(&vm.mem, mem_size)?;
            platform::write_boot_info(&vm.mem, mem_size, &cfg.machine.cmdline, loaded.end)?;
            vcpu.setup_cpl3_entry(loaded.entry, mem_size - 16)?;
        }

        let mut pio = PioBus::default();
        pio.register(COM1_BASE, COM1_LEN, Box::new(Com1::new(console.clone())))?;
        pio.register(
            PLATFORM_BASE,
            PLATFORM_LEN,
            Box::new(Platform::new(console, mem_size)),
        )?;
        let mut mmio = MmioBus::new();
        let mut shape = MachineShape {
            image_hash: image.hash,
            memory_size: mem_size,
            cmdline: cfg.machine.cmdline.clone(),
            net_mac: None,
            disk: None,
        };
        if let Some(net) = &cfg.net {
            let mac = net.mac_bytes().ok_or_else(|| MachineError::Config {
                path: cfg.source.clone(),
                key: "net.mac",
                message: format!("{:?} is not a MAC address", net.mac),
            })?;
            mmio.attach(0, MmioTransport::new(Box::new(Net::new(mac))));
            shape.net_mac = Some(mac);
        }
        if let Some(disk) = &cfg.disk {
            let image = ftvm_storage::DiskImage::open(&disk.path, disk.chunk_size)?;
            shape.disk = Some(DiskShape {
                size: image.size(),
                chunk_size: image.chunk_size(),
            });
            mmio.attach(1, MmioTransport::new(Box::new(Block::new(image))));
        }
        // Setup writes are the same on both sides; digests cover execution only.
        vm.take_dirty_bitmap()?;
        let pages = mem_size / PAGE_SIZE;
        Ok(Machine {
            vm,
            vcpu,
            pio,
            mmio,
            image,
            shape,
            ordinal: 0,
            pages,
        })
    }

    /// The machine at this exit boundary, apart from memory and disk. Call
    /// on the vCPU thread (a boundary task), or before the machine ran.
    pub fn save_state(&self) -> Result<crate::persist::MachineState, MachineError> {
        let clock_ns = self
            .vm
            .mem
            .read_obj(GuestAddress(
                crate::vstate::layout::PLATFORM_PAGE + crate::vstate::layout::PP_CLOCK_NS,
            ))
            .map_err(MachineError::Boot)?;
        Ok(crate::persist::MachineState {
            format_version: crate::persist::STATE_FORMAT_VERSION,
            shape: self.shape.clone(),
            ordinal: self.ordinal,
            clock_ns,
            vcpu: self.vcpu.save_state()?,
            pio: self.pio.save_state(),
            mmio: self.mmio.save_state(),
        })
    }

    /// Takes a saved state (memory and disk are restored apart): refuses a
    /// state of another machine with a reason.
    pub fn restore_state(&mut self, st: &crate::persist::MachineState) -> Result<(), MachineError> {
        use crate::persist::PersistError;
        if st.format_version != crate::persist::STATE_FORMAT_VERSION {
            return Err(PersistError::Version {
                found: st.format_version,
            }
            .into());
        }
        if let Some(why) = self.shape.mismatch(&st.shape, "the state") {
            return Err(PersistError::Shape(why).into());
        }
        self.vcpu.restore_state(&st.vcpu)?;
        self.pio.restore_state(&st.pio)?;
        self.mmio.restore_state(&st.mmio)?;
        self.ordinal = st.ordinal;
        Ok(())
    }

    /// Guest memory (a shared handle: re-protection reads and writes pages
    /// through it) and the dirty-page log.
    pub fn memory(
        &self,
    ) -> (
        crate::vstate::memory::GuestMemory,
        std::sync::Arc<crate::vstate::vm::DirtyLog>,
    ) {
        (self.vm.mem.clone(), self.vm.dirty_log())
    }

    /// The exit ordinal reached.
    pub fn ordinal(&self) -> u64 {
        self.ordinal
    }

    /// The disk's tracker of written chunks, when the machine has a disk.
    pub fn disk_written(&self) -> Option<std::sync::Arc<ftvm_storage::WrittenChunks>> {
        self.mmio
            .transports()
            .find_map(|t| t.device().disk())
            .map(|d| d.written_chunks())
    }

    /// Opens the disk again (its chunk hashes recomputed from the file): a
    /// joiner whose image was rewritten by re-protection before the machine
    /// ran.
    pub fn reopen_disk(&mut self, cfg: &ApplianceConfig) -> Result<(), MachineError> {
        if let Some(d) = &cfg.disk {
            let image = ftvm_storage::DiskImage::open(&d.path, d.chunk_size)?;
            self.mmio
                .attach(1, MmioTransport::new(Box::new(Block::new(image))));
        }
        Ok(())
    }

    /// What a log or a peer must match to run on this machine.
    pub fn shape(&self) -> &MachineShape {
        &self.shape
    }

    /// The header of a log of this machine from its current state.
    pub fn log_header(&self, disk_reads: DiskReads, cluster: &str, epoch: u64) -> LogHeader {
        LogHeader {
            format_version: LOG_FORMAT_VERSION,
            shape: self.shape.clone(),
            disk_reads,
            disk_root: self.disk_root(),
            cluster: cluster.to_string(),
            epoch,
            first_index: 1,
            start_ordinal: self.ordinal,
        }
    }

    /// Checks that a log was recorded from this machine's image, settings
    /// and disk contents.
    pub fn check_log_header(&self, h: &LogHeader) -> Result<(), String> {
        if let Some(why) = self.shape.mismatch(&h.shape, "the log") {
            return Err(format!("{why} ({})", self.image.path.display()));
        }
        if h.start_ordinal != self.ordinal {
            return Err(format!(
                "the log starts after exit {}, this machine is at exit {}",
                h.start_ordinal, self.ordinal
            ));
        }
        if h.disk_root != self.disk_root() {
            let show = |r: Option<[u8; 32]>| {
                r.map_or("no disk".to_string(), |r| digest::hex(&r)[..16].to_string())
            };
            return Err(format!(
                "the log starts from a disk with root {}, this disk's root is {} (replay against a copy of the disk the recording started from)",
                show(h.disk_root),
                show(self.disk_root())
            ));
        }
        Ok(())
    }

    pub fn exits(&self) -> u64 {
        self.ordinal
    }

    /// Runs the guest until it ends or `control` stops it.
    pub fn run(
        &mut self,
        env: &mut dyn Environment,
        control: &VcpuControl,
    ) -> Result<RunSummary, MachineError> {
        control.attach_current_thread()?;
        let result = self.run_loop(env, control);
        control.finish();
        result
    }

    fn run_loop(
        &mut self,
        env: &mut dyn Environment,
        control: &VcpuControl,
    ) -> Result<RunSummary, MachineError> {
        // True while no guest instruction can have run since the last counted
        // exit: only there can a stop be recorded and replayed exactly.
        let mut at_boundary = true;
        let mut stop_since: Option<Instant> = None;
        loop {
            let stop_requested = control.checkpoint() == Checkpoint::Stop;
            if stop_requested && !at_boundary {
                let since = *stop_since.get_or_insert_with(Instant::now);
                if since.elapsed() > STOP_GRACE {
                    // The guest makes no exits: stop between two of them. Such a
                    // state cannot be replayed, so the log gets no end marker.
                    tracing::warn!(
                        exits = self.ordinal,
                        "the guest made no exit within {STOP_GRACE:?} of the stop request; \
                         stopping between exits (the log has no end marker)"
                    );
                    return Ok(RunSummary {
                        outcome: Outcome::Stopped,
                        exits: self.ordinal,
                        digest: self.final_digest()?,
                    });
                }
            }
            if at_boundary && !stop_requested {
                if let Some(task) = control.take_boundary_task() {
                    self.complete_pending_io()?;
                    task(self);
                    continue;
                }
            }
            if (stop_requested && at_boundary) || env.stopped_at(self.ordinal)? {
                self.complete_pending_io()?;
                let digest = self.final_digest()?;
                env.finish(self.ordinal, &Outcome::Stopped, digest)?;
                return Ok(RunSummary {
                    outcome: Outcome::Stopped,
                    exits: self.ordinal,
                    digest,
                });
            }
            match self.step(env)? {
                Step::Host => at_boundary = false,
                Step::Guest => at_boundary = true,
                Step::Ended(outcome) => {
                    let digest = self.final_digest()?;
                    env.finish(self.ordinal, &outcome, digest)?;
                    return Ok(RunSummary {
                        outcome,
                        exits: self.ordinal,
                        digest,
                    });
                }
            }
        }
    }

    /// Lets KVM finish the last exit's I/O (advance past an OUT, load the
    /// value of an IN or MMIO read) without running any guest instruction,
    /// so a stopped machine is in the same state on both sides.
    fn complete_pending_io(&mut self) -> Result<(), MachineError> {
        self.vcpu.fd.set_kvm_immediate_exit(1);
        let result = self.vcpu.fd.run().map(|exit| format!("{exit:?}"));
        self.vcpu.fd.set_kvm_immediate_exit(0);
        match result {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(MachineError::Run(e)),
            Ok(exit) => Err(MachineError::Internal(format!(
                "exit {exit} while completing I/O for a stop"
            ))),
        }
    }

    /// Enters the guest once and handles the exit.
    fn step(&mut self, env: &mut dyn Environment) -> Result<Step, MachineError> {
        let exit = match self.vcpu.fd.run() {
            Ok(exit) => exit,
            // A kick from the controller: host-caused, not counted.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(Step::Host)
            }
            Err(e) => return Err(MachineError::Run(e)),
        };
        let point = match &exit {
            VcpuExit::IoOut(port, data) => ExitPoint {
                kind: ExitKind::PioOut,
                addr: u64::from(*port),
                size: data.len() as u8,
                value: le_value(data),
            },
            VcpuExit::IoIn(port, data) => ExitPoint {
                kind: ExitKind::PioIn,
                addr: u64::from(*port),
                size: data.len() as u8,
                value: 0,
            },
            VcpuExit::MmioWrite(addr, data) => ExitPoint {
                kind: ExitKind::MmioWrite,
                addr: *addr,
                size: data.len() as u8,
                value: le_value(data),
            },
            VcpuExit::MmioRead(addr, data) => ExitPoint {
                kind: ExitKind::MmioRead,
                addr: *addr,
                size: data.len() as u8,
                value: 0,
            },
            VcpuExit::Hlt => ExitPoint {
                kind: ExitKind::Hlt,
                addr: 0,
                size: 0,
                value: 0,
            },
            VcpuExit::Shutdown => ExitPoint {
                kind: ExitKind::Shutdown,
                addr: 0,
                size: 0,
                value: 0,
            },
            VcpuExit::Intr => return Ok(Step::Host),
            other => return Err(MachineError::Internal(format!("{other:?}"))),
        };
        self.ordinal += 1;
        let clock = env.exit(self.ordinal, &point)?;
        platform::write_clock(&self.vm.mem, clock, self.ordinal)?;
        let mut ctx = ExitContext {
            mem: &self.vm.mem,
            env: &mut *env,
            ordinal: self.ordinal,
            deliver_input: false,
        };
        let (pio, mmio) = (&mut self.pio, &mut self.mmio);
        let handled = (|| -> Result<DeviceAction, DeviceError> {
            // Service the virtio queues before the device acts, so that frames
            // and disk requests queued before a WAIT are handled before it
            // sleeps; received frames come only in the pass after it.
            mmio.poll(&mut ctx)?;
            let action = match exit {
                VcpuExit::IoOut(port, data) => pio.write(&mut ctx, port, data)?,
                VcpuExit::IoIn(port, data) => pio.read(&mut ctx, port, data)?,
                VcpuExit::MmioRead(addr, data) if MmioBus::claims(addr) => {
                    mmio.read(addr, data);
                    DeviceAction::Continue
                }
                VcpuExit::MmioWrite(addr, data) if MmioBus::claims(addr) => {
                    mmio.write(&mut ctx, addr, data)?
                }
                VcpuExit::MmioRead(addr, data) => {
                    data.fill(0xff);
                    DeviceAction::Stop(Outcome::BadAccess {
                        kind: ExitKind::MmioRead,
                        addr,
                        rip: 0,
                    })
                }
                VcpuExit::MmioWrite(addr, _) => DeviceAction::Stop(Outcome::BadAccess {
                    kind: ExitKind::MmioWrite,
                    addr,
                    rip: 0,
                }),
                VcpuExit::Hlt => DeviceAction::Stop(Outcome::Halted { rip: 0 }),
                _ => DeviceAction::Stop(Outcome::TripleFault { rip: 0 }),
            };
            // Every exit services the virtio queues: inputs reach the guest here.
            ctx.deliver_input = true;
            mmio.poll(&mut ctx)?;
            Ok(action)
        })();
        let action = match handled {
            Ok(action) => action,
            // The guest handed a device a buffer outside its memory or broke a
            // queue: its own fault, the same on both sides, so it ends the
            // machine as a guest outcome rather than a VMM error.
            Err(e @ (DeviceError::Memory { .. } | DeviceError::Queue(_))) => {
                DeviceAction::Stop(Outcome::DeviceFault {
                    what: e.to_string(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        env.exit_done()?;
        let outcome = match action {
            DeviceAction::Continue => None,
            DeviceAction::Stop(outcome) => Some(self.with_rip(outcome)?),
            DeviceAction::GuestException(vector) => Some(self.exception(vector)?),
        };
        match outcome {
            Some(outcome) => Ok(Step::Ended(outcome)),
            None => {
                if let Some(due) = env.digest_due(self.ordinal)? {
                    self.digest(env, due)?;
                }
                Ok(Step::Guest)
            }
        }
    }

    fn with_rip(&self, outcome: Outcome) -> Result<Outcome, MachineError> {
        let rip = self.vcpu.regs()?.rip;
        Ok(match outcome {
            Outcome::BadAccess { kind, addr, .. } => Outcome::BadAccess { kind, addr, rip },
            Outcome::Halted { .. } => Outcome::Halted { rip },
            Outcome::TripleFault { .. } => Outcome::TripleFault { rip },
            other => other,
        })
    }

    /// A CPL0 stub reported `vector`: read the exception frame it left on the
    /// CPL0 stack (error code, RIP, CS, RFLAGS, RSP, SS).
    fn exception(&self, vector: u8) -> Result<Outcome, MachineError> {
        let rsp = self.vcpu.regs()?.rsp;
        let sregs = self.vcpu.sregs()?;
        let cr2 = sregs.cr2;
        let mut frame = [0u64; 2];
        // Only the CPL0 stubs leave an exception frame; a CPL3 guest writing
        // the crash port itself gets a report with zeros.
        if sregs.cs.dpl == 0 {
            for (i, slot) in frame.iter_mut().enumerate() {
                *slot = rsp
                    .checked_add(8 * i as u64)
                    .and_then(|a| self.vm.mem.read_obj(GuestAddress(a)).ok())
                    .unwrap_or(0);
            }
        }
        Ok(Outcome::Crash {
            vector,
            error_code: frame[0],
            rip: frame[1],
            cr2,
        })
    }

    fn digest(&mut self, env: &mut dyn Environment, due: DigestDue) -> Result<(), MachineError> {
        // Always drain the dirty logs so the next digest covers only what follows.
        let bitmap = self.vm.take_dirty_bitmap()?;
        let regs = self.state_bytes()?;
        let (full, runs): (bool, Vec<PageRun>) = match due {
            DigestDue::Full => (true, Vec::new()),
            DigestDue::Pages(runs) => (false, runs),
            DigestDue::OwnDirtyPages => {
                let runs = digest::runs_from_bitmap(&bitmap, self.pages);
                if runs.len() > digest::MAX_RUNS {
                    (true, Vec::new())
                } else {
                    (false, runs)
                }
            }
        };
        let hash = if full {
            digest::full_digest(&self.vm.mem, self.vm.mem_size(), &regs)
        } else {
            digest::pages_digest(&self.vm.mem, self.pages, &regs, &runs)?
        };
        env.digest_taken(self.ordinal, full, &runs, hash)?;
        Ok(())
    }

    /// vCPU registers plus device digests (frames sent, disk Merkle root).
    fn state_bytes(&self) -> Result<Vec<u8>, MachineError> {
        let mut b = self.vcpu.state_bytes()?;
        b.extend_from_slice(&self.mmio.digest_bytes());
        Ok(b)
    }

    /// The disk's Merkle root, when the machine has a disk.
    pub fn disk_root(&self) -> Option<[u8; 32]> {
        self.mmio
            .transports()
            .find_map(|t| t.device().state_digest())
    }

    /// blake3 of the registers, device digests and all of memory.
    pub fn final_digest(&self) -> Result<[u8; 32], MachineError> {
        let regs = self.state_bytes()?;
        Ok(digest::full_digest(&self.vm.mem, self.vm.mem_size(), &regs))
    }
}

//! Re-protection (DESIGN.md 8): a backup joins a running primary.
//!
//! Over a sync stream of its own on the log channel's connection:
//!
//! 1. **Disk.** The joiner sends one hash per group of [`GROUP`] chunks of
//!    its disk; the primary answers with the groups that differ; the joiner
//!    sends those groups' chunk hashes; the primary sends only the chunks
//!    that differ. Writes the guest makes meanwhile are tracked
//!    (`storage::WrittenChunks`) and sent again in later rounds.
//! 2. **Memory.** Every non-zero page, then the pages dirtied since the last
//!    round (KVM's dirty log plus the VMM's own writes), round after round
//!    until few are left or [`MAX_ROUNDS`] is reached.
//! 3. **Cut-over.** The primary's vCPU stops at an exit boundary; the last
//!    dirty pages and chunks go, then the machine's state (vCPU, devices,
//!    exit ordinal) and where the log continues; the vCPU resumes. The pause
//!    is measured. From the cut-over on, the primary's outputs wait for the
//!    new backup's acks (the output rule), and its log is kept for it.
//!
//! The joiner writes pages into a machine built with zeroed memory and
//! chunks into its own image, then restores the state and replays the log
//! from the cut-over. A join that breaks off leaves the primary serving as
//! it was (solo); the joiner starts again.

use super::log_queue::LogQueue;
use super::output_gate::{GateMode, OutputGate};
use super::proto::{decode_sync, encode_sync, SyncMsg, FRAME_SYNC, MAX_SYNC_CHUNK, MAX_SYNC_FRAME};
use crate::machine::Machine;
use crate::persist::MachineState;
use crate::replay::live::Waker;
use crate::replay::log::{DiskReads, LogHeader, MachineShape, LOG_FORMAT_VERSION};
use crate::vstate::layout::PAGE_SIZE;
use crate::vstate::memory::GuestMemory;
use crate::vstate::vcpu::VcpuControl;
use crate::vstate::vm::DirtyLog;
use ftvm_storage::{ChunkHashes, DiskImage, WrittenChunks};
use ftvm_transport::frame::{read_frame_async, write_frame_async};
use ftvm_transport::quinn;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// Chunks per group in the disk comparison's first round.
pub const GROUP: u64 = 256;
/// Most pre-copy rounds after the first full pass.
pub const MAX_ROUNDS: u32 = 8;
/// Pre-copy stops once a round leaves fewer pages than this dirty.
const ENOUGH_PAGES: usize = 512;
/// Pages per `Pages` message.
const PAGES_PER_MSG: u64 = 128;
/// Group hashes per `Groups` message.
const GROUPS_PER_MSG: usize = 16 * 1024;
/// The vCPU waits at most this long for the cut-over to finish.
const MAX_PAUSE: Duration = Duration::from_secs(60);

/// The primary's disk, as a join needs it.
#[derive(Debug, Clone)]
pub struct DiskSource {
    pub path: PathBuf,
    pub chunk_size: u64,
    pub written: Arc<WrittenChunks>,
}

/// What a primary offers a joiner: its machine's memory, dirty log, disk
/// and vCPU control.
#[derive(Debug, Clone)]
pub struct JoinSource {
    pub control: Arc<VcpuControl>,
    pub waker: Waker,
    pub mem: GuestMemory,
    pub dirty: Arc<DirtyLog>,
    pub pages: u64,
    pub disk: Option<DiskSource>,
    pub shape: MachineShape,
    pub disk_reads: DiskReads,
    pub cluster: String,
}

impl JoinSource {
    /// The parts of `machine` a join needs (taken before its vCPU runs).
    pub fn of(
        machine: &Machine,
        control: Arc<VcpuControl>,
        waker: Waker,
        disk: Option<(PathBuf, u64)>,
        disk_reads: DiskReads,
        cluster: &str,
    ) -> JoinSource {
        let (mem, dirty) = machine.memory();
        JoinSource {
            control,
            waker,
            pages: machine.shape().memory_size / PAGE_SIZE,
            mem,
            dirty,
            disk: disk.and_then(|(path, chunk_size)| {
                machine.disk_written().map(|written| DiskSource {
                    path,
                    chunk_size,
                    written,
                })
            }),
            shape: machine.shape().clone(),
            disk_reads,
            cluster: cluster.to_string(),
        }
    }
}

/// Where a re-protection stands, for `/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    pub phase: String,
    pub round: u32,
    pub disk_bytes_left: u64,
    pub memory_bytes_left: u64,
    /// Bytes of disk chunks sent (the live node) or received (the joiner).
    pub disk_bytes_copied: u64,
    pub disk_chunks_differing: u64,
    /// Bytes of memory pages sent or received (zero pages not counted).
    pub memory_bytes_copied: u64,
    /// Estimated seconds to the cut-over at the rate so far.
    pub eta_s: Option<f64>,
    /// The last cut-over's pause of the primary's vCPU.
    pub last_pause_ms: Option<f64>,
    pub joins_completed: u64,
}

pub type SharedProgress = Arc<Mutex<Progress>>;

fn set(p: &SharedProgress, f: impl FnOnce(&mut Progress)) {
    f(&mut p.lock().unwrap_or_else(|e| e.into_inner()));
}

async fn send(s: &mut quinn::SendStream, m: &SyncMsg) -> Result<(), String> {
    let payload = encode_sync(m).map_err(|e| e.to_string())?;
    write_frame_async(s, FRAME_SYNC, &payload, MAX_SYNC_FRAME)
        .await
        .map_err(|e| format!("sync stream: {e}"))
}

async fn recv(r: &mut quinn::RecvStream) -> Result<SyncMsg, String> {
    let f = read_frame_async(r, MAX_SYNC_FRAME)
        .await
        .map_err(|e| format!("sync stream: {e}"))?
        .ok_or("the sync stream ended")?;
    if f.kind != FRAME_SYNC {
        return Err(format!("sync frame of kind {}", f.kind));
    }
    decode_sync(&f.payload).map_err(|e| e.to_string())
}

fn page_is_zero(p: &[u8]) -> bool {
    p.iter().all(|b| *b == 0)
}

/// Sends pages listed by `runs` of (first, count); zero pages as empty data
/// when `zeros_too`, skipped otherwise. Returns bytes sent.
async fn send_pages(
    s: &mut quinn::SendStream,
    mem: &GuestMemory,
    pfns: impl Iterator<Item = u64>,
    zeros_too: bool,
) -> Result<u64, String> {
    let mut sent = 0u64;
    let mut run: Vec<u8> = Vec::with_capacity((PAGES_PER_MSG * PAGE_SIZE) as usize);
    let mut first = 0u64;
    let mut count = 0u64;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for pfn in pfns {
        mem.read_slice(&mut page, GuestAddress(pfn * PAGE_SIZE))
            .map_err(|e| format!("reading page {pfn}: {e}"))?;
        let zero = page_is_zero(&page);
        if zero {
            if zeros_too {
                // A page that became zero: its own message, data empty.
                if count > 0 {
                    sent += run.len() as u64;
                    send_run(s, first, count, std::mem::take(&mut run)).await?;
                    count = 0;
                }
                send_run(s, pfn, 1, Vec::new()).await?;
                sent += 16;
            }
            continue;
        }
        if count > 0 && (first + count != pfn || count == PAGES_PER_MSG) {
            sent += run.len() as u64;
            send_run(s, first, count, std::mem::take(&mut run)).await?;
            count = 0;
        }
        if count == 0 {
            first = pfn;
        }
        run.extend_from_slice(&page);
        count += 1;
    }
    if count > 0 {
        sent += run.len() as u64;
        send_run(s, first, count, run).await?;
    }
    Ok(sent)
}

async fn send_run(
    s: &mut quinn::SendStream,
    first: u64,
    count: u64,
    data: Vec<u8>,
) -> Result<(), String> {
    send(
        s,
        &SyncMsg::Pages {
            first,
            count: count as u32,
            data,
        },
    )
    .await
}

/// The page numbers set in a dirty bitmap.
fn pfns_of(bits: &[u64], pages: u64) -> Vec<u64> {
    crate::replay::digest::runs_from_bitmap(bits, pages)
        .iter()
        .flat_map(|r| r.first..r.first + r.count)
        .collect()
}

async fn send_chunks(
    s: &mut quinn::SendStream,
    disk: &DiskSource,
    chunks: Vec<u64>,
) -> Result<u64, String> {
    use std::os::unix::fs::FileExt;
    if chunks.is_empty() {
        return Ok(0);
    }
    // A handle of its own: the guest's writes (by the vCPU thread, to the
    // same file) are what it reads.
    let file =
        std::fs::File::open(&disk.path).map_err(|e| format!("{}: {e}", disk.path.display()))?;
    let size = file
        .metadata()
        .map_err(|e| format!("{}: {e}", disk.path.display()))?
        .len();
    let mut sent = 0;
    for index in chunks {
        let from = index.saturating_mul(disk.chunk_size);
        if from >= size {
            return Err(format!("chunk {index} is past the disk's end"));
        }
        let mut data = vec![0u8; disk.chunk_size.min(size - from) as usize];
        file.read_exact_at(&mut data, from)
            .map_err(|e| format!("{}: reading chunk {index}: {e}", disk.path.display()))?;
        sent += data.len() as u64;
        send(s, &SyncMsg::Chunk { index, data }).await?;
    }
    Ok(sent)
}

/// The primary's side of a join. `queue` and `gate` are the live node's:
/// at the cut-over the queue keeps its log from there for the new backup,
/// and the gate holds outputs for its acks. Returns the header of the log
/// the backup follows, and the pause.
pub async fn serve(
    mut tx: quinn::SendStream,
    mut rx: quinn::RecvStream,
    src: &JoinSource,
    queue: &LogQueue,
    gate: Option<&OutputGate>,
    progress: &SharedProgress,
) -> Result<(LogHeader, Duration), String> {
    let started = Instant::now();
    set(progress, |p| {
        *p = Progress {
            phase: "disk".into(),
            last_pause_ms: p.last_pause_ms,
            joins_completed: p.joins_completed,
            ..Progress::default()
        }
    });
    src.dirty.start_migration().map_err(|e| e.to_string())?;
    if let Some(d) = &src.disk {
        d.written.start();
    }
    let result = serve_copy(&mut tx, &mut rx, src, queue, gate, progress, started).await;
    src.dirty.stop_migration();
    if let Some(d) = &src.disk {
        d.written.stop();
    }
    set(progress, |p| {
        p.phase = if result.is_ok() { "done" } else { "failed" }.into();
        if result.is_ok() {
            p.joins_completed += 1;
        }
    });
    result
}

async fn serve_copy(
    tx: &mut quinn::SendStream,
    rx: &mut quinn::RecvStream,
    src: &JoinSource,
    queue: &LogQueue,
    gate: Option<&OutputGate>,
    progress: &SharedProgress,
    started: Instant,
) -> Result<(LogHeader, Duration), String> {
    // 1. The disk, by Merkle groups, then leaves, then chunks.
    let mut theirs_groups: Vec<[u8; 32]> = Vec::new();
    loop {
        match recv(rx).await? {
            SyncMsg::Groups { first, hashes } => {
                if first != theirs_groups.len() as u64 {
                    return Err(format!(
                        "group hashes from {first}, expected {}",
                        theirs_groups.len()
                    ));
                }
                theirs_groups.extend(hashes);
            }
            SyncMsg::GroupsDone => break,
            other => return Err(format!("expected group hashes, got {other:?}")),
        }
    }
    let mut disk_sent = 0u64;
    if let Some(d) = &src.disk {
        let (path, cs) = (d.path.clone(), d.chunk_size);
        let ours = tokio::task::spawn_blocking(move || {
            DiskImage::open_read_only(&path, cs).map(|i| i.chunk_hashes())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let groups = ours.group_hashes(GROUP);
        if groups.len() != theirs_groups.len() {
            return Err(format!(
                "the joiner's disk has {} groups of chunks, this one {}",
                theirs_groups.len(),
                groups.len()
            ));
        }
        let differing: Vec<u64> = (0..groups.len())
            .filter(|&i| groups[i] != theirs_groups[i])
            .map(|i| i as u64)
            .collect();
        send(
            tx,
            &SyncMsg::WantLeaves {
                groups: differing.clone(),
            },
        )
        .await?;
        let mut chunks = Vec::new();
        for _ in &differing {
            let SyncMsg::Leaves { group, hashes } = recv(rx).await? else {
                return Err("expected the leaves of a group".into());
            };
            let first = group * GROUP;
            for (k, h) in hashes.iter().enumerate() {
                let index = first + k as u64;
                if ours.get(index) != Some(h) {
                    chunks.push(index);
                }
            }
        }
        set(progress, |p| {
            p.disk_chunks_differing = chunks.len() as u64;
            p.disk_bytes_left = chunks.len() as u64 * d.chunk_size;
        });
        disk_sent += send_chunks(tx, d, chunks).await?;
    } else if !theirs_groups.is_empty() {
        return Err("the joiner has a disk, this machine none".into());
    }

    // 2. Memory: every non-zero page, then rounds of dirty pages (and chunks).
    set(progress, |p| {
        p.phase = "memory".into();
        p.disk_bytes_copied = disk_sent;
        p.disk_bytes_left = 0;
        p.memory_bytes_left = src.pages * PAGE_SIZE;
    });
    let mut mem_sent = send_pages(tx, &src.mem, 0..src.pages, false).await?;
    let mut round = 0;
    loop {
        round += 1;
        let bits = src.dirty.take_for_migration().map_err(|e| e.to_string())?;
        let pfns = pfns_of(&bits, src.pages);
        let chunks = src
            .disk
            .as_ref()
            .map(|d| d.written.take())
            .unwrap_or_default();
        let left = pfns.len();
        let elapsed = started.elapsed().as_secs_f64();
        set(progress, |p| {
            p.round = round;
            p.memory_bytes_copied = mem_sent;
            p.disk_bytes_copied = disk_sent;
            p.memory_bytes_left = left as u64 * PAGE_SIZE;
            let rate = (mem_sent + disk_sent) as f64 / elapsed.max(1e-3);
            p.eta_s = Some(p.memory_bytes_left as f64 / rate.max(1.0));
        });
        send(
            tx,
            &SyncMsg::Progress {
                round,
                disk_bytes_left: chunks.len() as u64
                    * src.disk.as_ref().map_or(0, |d| d.chunk_size),
                memory_bytes_left: left as u64 * PAGE_SIZE,
            },
        )
        .await?;
        if let Some(d) = &src.disk {
            disk_sent += send_chunks(tx, d, chunks).await?;
        }
        mem_sent += send_pages(tx, &src.mem, pfns.into_iter(), true).await?;
        if left < ENOUGH_PAGES || round >= MAX_ROUNDS {
            break;
        }
    }

    // 3. Cut-over: the vCPU stops at an exit boundary, the rest goes, it resumes.
    set(progress, |p| p.phase = "cut-over".into());
    let (state_tx, state_rx) = std::sync::mpsc::channel();
    let (resume_tx, resume_rx) = std::sync::mpsc::channel::<()>();
    src.control
        .run_at_boundary(Box::new(move |m: &mut Machine| {
            let _ = state_tx.send((m.save_state(), m.disk_root(), Instant::now()));
            // Held until the last pages went (or the join broke off).
            let _ = resume_rx.recv_timeout(MAX_PAUSE);
        }));
    // A guest idling in a WAIT is woken: its exit is where it stops.
    src.waker.wake();
    let (state, disk_root, parked) =
        tokio::task::spawn_blocking(move || state_rx.recv_timeout(MAX_PAUSE))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|_| "the vCPU did not reach an exit boundary".to_string())?;
    let resume = ResumeGuard(Some(resume_tx));
    let state = state.map_err(|e| format!("saving the machine's state: {e}"))?;
    let bits = src.dirty.take_for_migration().map_err(|e| e.to_string())?;
    let last_pfns = pfns_of(&bits, src.pages);
    if let Some(d) = &src.disk {
        let chunks = d.written.take();
        disk_sent += send_chunks(tx, d, chunks).await?;
    }
    mem_sent += send_pages(tx, &src.mem, last_pfns.into_iter(), true).await?;
    // From here the log is kept for the new backup and outputs wait for it.
    let cut = queue.restart_for_backup();
    if let Some(g) = gate {
        g.release_upto(cut);
        g.set_mode(GateMode::Protected);
    }
    drop(resume);
    let pause = parked.elapsed();
    let header = LogHeader {
        format_version: LOG_FORMAT_VERSION,
        shape: src.shape.clone(),
        disk_reads: src.disk_reads,
        disk_root,
        cluster: src.cluster.clone(),
        epoch: queue.epoch(),
        first_index: cut + 1,
        start_ordinal: state.ordinal,
    };
    let bytes = state.encode().map_err(|e| e.to_string())?;
    send(
        tx,
        &SyncMsg::State {
            state: bytes,
            header: header.clone(),
        },
    )
    .await?;
    let _ = tx.finish();
    set(progress, |p| {
        p.memory_bytes_copied = mem_sent;
        p.disk_bytes_copied = disk_sent;
        p.memory_bytes_left = 0;
        p.disk_bytes_left = 0;
        p.eta_s = None;
        p.last_pause_ms = Some(pause.as_secs_f64() * 1e3);
    });
    tracing::warn!(
        exit = state.ordinal,
        first_index = cut + 1,
        pause_ms = pause.as_secs_f64() * 1e3,
        rounds = round,
        memory_bytes = mem_sent,
        disk_bytes = disk_sent,
        "re-protection: cut-over done; the new backup follows the log from here"
    );
    Ok((header, pause))
}

/// Lets the parked vCPU go on however the cut-over ends.
struct ResumeGuard(Option<std::sync::mpsc::Sender<()>>);

impl Drop for ResumeGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// What a joiner fills in: its machine's (zeroed) memory and its disk.
#[derive(Debug, Clone)]
pub struct JoinTarget {
    pub mem: GuestMemory,
    pub pages: u64,
    pub disk: Option<(PathBuf, u64)>,
}

/// The joiner's side: sends its disk's hashes, writes what comes; returns
/// the machine state and the log header at the cut-over.
pub async fn receive(
    mut tx: quinn::SendStream,
    mut rx: quinn::RecvStream,
    target: &JoinTarget,
    progress: &SharedProgress,
) -> Result<(MachineState, LogHeader), String> {
    set(progress, |p| p.phase = "disk".into());
    // Pages the primary does not send are zero on its side.
    crate::vstate::memory::discard(&target.mem)
        .map_err(|e| format!("clearing guest memory: {e}"))?;
    let mut disk = match &target.disk {
        Some((path, cs)) => {
            if *cs > MAX_SYNC_CHUNK {
                return Err(format!(
                    "disk chunks of {cs} bytes are larger than re-protection moves ({MAX_SYNC_CHUNK})"
                ));
            }
            let (path, cs) = (path.clone(), *cs);
            Some(
                tokio::task::spawn_blocking(move || DiskImage::open(&path, cs))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?,
            )
        }
        None => None,
    };
    let hashes: Option<ChunkHashes> = disk.as_ref().map(|d| d.chunk_hashes());
    let groups = hashes
        .as_ref()
        .map(|h| h.group_hashes(GROUP))
        .unwrap_or_default();
    for (k, part) in groups.chunks(GROUPS_PER_MSG).enumerate() {
        send(
            &mut tx,
            &SyncMsg::Groups {
                first: (k * GROUPS_PER_MSG) as u64,
                hashes: part.to_vec(),
            },
        )
        .await?;
    }
    send(&mut tx, &SyncMsg::GroupsDone).await?;
    let (mut disk_received, mut mem_received) = (0u64, 0u64);
    loop {
        match recv(&mut rx).await? {
            SyncMsg::WantLeaves { groups } => {
                let h = hashes
                    .as_ref()
                    .ok_or("asked for leaves of a disk this node lacks")?;
                for g in groups {
                    let from = (g * GROUP) as usize;
                    let leaves = h.as_slice();
                    if from >= leaves.len() {
                        return Err(format!("asked for group {g}, the disk has fewer"));
                    }
                    let to = (from + GROUP as usize).min(leaves.len());
                    send(
                        &mut tx,
                        &SyncMsg::Leaves {
                            group: g,
                            hashes: leaves[from..to].to_vec(),
                        },
                    )
                    .await?;
                }
            }
            SyncMsg::Chunk { index, data } => {
                let d = disk
                    .as_mut()
                    .ok_or("got a disk chunk for a machine without a disk")?;
                disk_received += data.len() as u64;
                d.write_chunk(index, &data).map_err(|e| e.to_string())?;
            }
            SyncMsg::Pages { first, count, data } => {
                let count = u64::from(count);
                if first
                    .checked_add(count)
                    .is_none_or(|end| end > target.pages)
                {
                    return Err(format!("pages {first}+{count} are outside guest memory"));
                }
                let at = GuestAddress(first * PAGE_SIZE);
                if data.is_empty() {
                    let zero = vec![0u8; (count * PAGE_SIZE) as usize];
                    target
                        .mem
                        .write_slice(&zero, at)
                        .map_err(|e| e.to_string())?;
                } else if data.len() as u64 == count * PAGE_SIZE {
                    mem_received += data.len() as u64;
                    target
                        .mem
                        .write_slice(&data, at)
                        .map_err(|e| e.to_string())?;
                } else {
                    return Err(format!("{} bytes for {count} pages", data.len()));
                }
            }
            SyncMsg::Progress {
                round,
                disk_bytes_left,
                memory_bytes_left,
            } => set(progress, |p| {
                p.phase = "memory".into();
                p.round = round;
                p.disk_bytes_left = disk_bytes_left;
                p.memory_bytes_left = memory_bytes_left;
                p.memory_bytes_copied = mem_received;
                p.disk_bytes_copied = disk_received;
            }),
            SyncMsg::State { state, header } => {
                if let Some(d) = disk.as_mut() {
                    d.flush().map_err(|e| e.to_string())?;
                }
                let state = MachineState::decode(&state).map_err(|e| e.to_string())?;
                set(progress, |p| {
                    p.phase = "done".into();
                    p.memory_bytes_left = 0;
                    p.disk_bytes_left = 0;
                    p.memory_bytes_copied = mem_received;
                    p.disk_bytes_copied = disk_received;
                });
                return Ok((state, header));
            }
            other => return Err(format!("unexpected sync message {other:?}")),
        }
    }
}

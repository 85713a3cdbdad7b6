//! The backup's buffer between the log channel and the vCPU thread.
//!
//! The channel's receiver task pushes decoded batches (only frames that
//! decoded whole reach it); the replayer takes entries through a
//! [`LiveSource`]. The buffer is bounded: when it is full the receiver stops
//! reading the QUIC stream, so back-pressure reaches the primary through
//! QUIC flow control, not through memory growth here.
//!
//! The source hands out only whole exits: an exit whose inputs span several
//! entries is released once its last entry arrived, so the backup applies
//! it all at once or not at all. When the channel ends for good the source
//! says so in one of two ways: end of log (go live from here, dropping an
//! incomplete exit) or interrupted (the node stops).

use crate::replay::env::EnvError;
use crate::replay::log::{Entry, EntrySource};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Open,
    /// Replay what is complete, then report the end of the log.
    GoLive,
    /// Stop waiting: the node is stopping.
    Interrupted,
}

#[derive(Debug)]
struct ReplayState {
    entries: VecDeque<(Entry, usize)>,
    /// Entries at the front that form whole exits.
    complete: usize,
    received: u64,
    bytes: usize,
    capacity: usize,
    end: End,
    /// When the last batch arrived.
    last_arrival: Option<std::time::Instant>,
}

/// Where replay stands, for status and for the primary's lag control.
#[derive(Debug, Default)]
pub struct ReplayProgress {
    /// Index of the last entry handed to the replayer.
    pub replayed: AtomicU64,
    /// Exit ordinal of the last exit entry handed out.
    pub ordinal: AtomicU64,
    /// Guest clock of that exit, ns.
    pub clock_ns: AtomicU64,
    /// Guest clock of the last exit entry received, ns.
    pub received_clock_ns: AtomicU64,
    /// State digests handed to the replayer (each is compared at once; a
    /// mismatch stops replay as a divergence).
    pub digests: AtomicU64,
    /// Exits with output handed to the replayer (each one's frames are
    /// compared at the end of the exit).
    pub output_checks: AtomicU64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PushError {
    #[error("batch starts at entry {first}, but entries up to {received} were received: entries {missing}..{first} are missing")]
    Gap {
        first: u64,
        received: u64,
        missing: u64,
    },
    #[error("the replay queue is closed")]
    Closed,
}

/// The shared buffer.
#[derive(Debug)]
pub struct ReplayQueue {
    state: Mutex<ReplayState>,
    arrived: Condvar,
    room: tokio::sync::Notify,
    pub progress: ReplayProgress,
}

impl ReplayQueue {
    /// An empty queue whose next entry is `first_index`.
    pub fn new(first_index: u64, capacity: usize) -> Arc<Self> {
        Arc::new(ReplayQueue {
            state: Mutex::new(ReplayState {
                entries: VecDeque::new(),
                complete: 0,
                received: first_index - 1,
                bytes: 0,
                capacity,
                end: End::Open,
                last_arrival: None,
            }),
            arrived: Condvar::new(),
            room: tokio::sync::Notify::new(),
            progress: ReplayProgress::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReplayState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Index of the last entry received.
    pub fn received(&self) -> u64 {
        self.lock().received
    }

    /// The next entry is `first_index` (a copied backup follows the log
    /// from its cut-over). Only while the queue is empty.
    pub fn restart_at(&self, first_index: u64) {
        let mut s = self.lock();
        if s.entries.is_empty() {
            s.received = first_index.saturating_sub(1);
            // Replay positions are log indices: the entries before the
            // cut-over are in the copied machine already.
            self.progress.replayed.store(s.received, Ordering::Relaxed);
        }
    }

    /// When the last batch arrived (the primary's last words).
    pub fn last_arrival(&self) -> Option<std::time::Instant> {
        self.lock().last_arrival
    }

    /// (bytes buffered, capacity)
    pub fn fill(&self) -> (usize, usize) {
        let s = self.lock();
        (s.bytes, s.capacity)
    }

    /// Adds a decoded batch starting at `first_index`, once there is room;
    /// entries already received (a resend after a reconnect) are skipped.
    /// Returns the index of the last entry received.
    pub async fn push(
        &self,
        first_index: u64,
        entries: Vec<Entry>,
        frame_bytes: usize,
    ) -> Result<u64, PushError> {
        loop {
            let notified = self.room.notified();
            {
                let s = self.lock();
                if s.end != End::Open {
                    return Err(PushError::Closed);
                }
                if s.bytes < s.capacity {
                    break;
                }
            }
            notified.await;
        }
        let mut s = self.lock();
        if first_index > s.received + 1 {
            return Err(PushError::Gap {
                first: first_index,
                received: s.received,
                missing: s.received + 1,
            });
        }
        s.last_arrival = Some(std::time::Instant::now());
        let per_entry = frame_bytes / entries.len().max(1);
        for (k, e) in entries.into_iter().enumerate() {
            let index = first_index + k as u64;
            if index <= s.received {
                continue;
            }
            let whole_exit_ends = !e.continues();
            if let Entry::Exit { clock_ns, .. } = &e {
                self.progress
                    .received_clock_ns
                    .store(*clock_ns, Ordering::Relaxed);
            }
            s.entries.push_back((e, per_entry));
            s.bytes += per_entry;
            s.received = index;
            if whole_exit_ends {
                s.complete = s.entries.len();
            }
        }
        self.arrived.notify_all();
        Ok(s.received)
    }

    /// The log ends here: the replayer gets every whole exit received, then
    /// the end of the log (the node goes live at that exit).
    pub fn end_for_go_live(&self) {
        let mut s = self.lock();
        if s.end == End::Open {
            s.end = End::GoLive;
        }
        self.arrived.notify_all();
        self.room.notify_waiters();
    }

    /// The node is stopping: the replayer stops waiting.
    pub fn interrupt(&self) {
        self.lock().end = End::Interrupted;
        self.arrived.notify_all();
        self.room.notify_waiters();
    }

    /// A source for the replayer, on the vCPU thread.
    pub fn source(self: &Arc<Self>) -> LiveSource {
        LiveSource {
            queue: self.clone(),
            local: VecDeque::new(),
            consumed: 0,
            ordinal: 0,
        }
    }
}

/// The replayer's side of the queue.
#[derive(Debug)]
pub struct LiveSource {
    queue: Arc<ReplayQueue>,
    /// Whole exits taken from the shared queue, not yet handed out.
    local: VecDeque<Entry>,
    consumed: u64,
    ordinal: u64,
}

impl LiveSource {
    /// Fills `local` with whole exits; `Ok(false)` at the end of the log.
    fn fill(&mut self) -> Result<bool, EnvError> {
        if !self.local.is_empty() {
            return Ok(true);
        }
        let mut s = self.queue.lock();
        loop {
            if s.complete > 0 {
                let n = s.complete;
                let mut freed = 0;
                for (e, size) in s.entries.drain(..n) {
                    freed += size;
                    self.local.push_back(e);
                }
                s.complete = 0;
                s.bytes = s.bytes.saturating_sub(freed);
                drop(s);
                self.queue.room.notify_waiters();
                return Ok(true);
            }
            match s.end {
                End::Open => {}
                End::GoLive => {
                    // An exit whose last entry never came is not applied.
                    let dropped = s.entries.len();
                    if dropped > 0 {
                        tracing::warn!(
                            entries = dropped,
                            "the log ends inside an exit; its entries are not applied"
                        );
                    }
                    s.entries.clear();
                    s.bytes = 0;
                    return Ok(false);
                }
                End::Interrupted => {
                    return Err(EnvError::Interrupted {
                        ordinal: self.ordinal,
                    })
                }
            }
            s = self
                .queue
                .arrived
                .wait_timeout(s, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl EntrySource for LiveSource {
    fn next_entry(&mut self) -> Result<Option<Entry>, EnvError> {
        if !self.fill()? {
            return Ok(None);
        }
        let e = self.local.pop_front();
        if let Some(e) = &e {
            self.consumed += 1;
            let p = &self.queue.progress;
            p.replayed.fetch_add(1, Ordering::Relaxed);
            match e {
                Entry::Exit {
                    ordinal,
                    clock_ns,
                    tx,
                    ..
                } => {
                    self.ordinal = *ordinal;
                    p.ordinal.store(*ordinal, Ordering::Relaxed);
                    p.clock_ns.store(*clock_ns, Ordering::Relaxed);
                    if tx.is_some() {
                        p.output_checks.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Entry::Inputs { tx: Some(_), .. } => {
                    p.output_checks.fetch_add(1, Ordering::Relaxed);
                }
                Entry::Digest { .. } => {
                    p.digests.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        Ok(e)
    }

    fn peek_entry(&mut self) -> Result<Option<&Entry>, EnvError> {
        if !self.fill()? {
            return Ok(None);
        }
        Ok(self.local.front())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::env::{ExitKind, ExitPoint};

    fn exit(ordinal: u64, more: bool) -> Entry {
        Entry::Exit {
            ordinal,
            point: ExitPoint {
                kind: ExitKind::PioOut,
                addr: 0x500,
                size: 4,
                value: 0,
            },
            clock_ns: ordinal,
            inputs: vec![],
            more,
            tx: None,
        }
    }

    fn inputs(ordinal: u64, more: bool) -> Entry {
        Entry::Inputs {
            ordinal,
            inputs: vec![],
            more,
            tx: None,
        }
    }

    #[tokio::test]
    async fn an_exit_split_over_entries_is_handed_out_whole_or_not_at_all() {
        let q = ReplayQueue::new(1, 1 << 20);
        let mut src = q.source();
        q.push(1, vec![exit(1, false), exit(2, true)], 100)
            .await
            .unwrap();
        assert_eq!(src.next_entry().unwrap(), Some(exit(1, false)));
        // Exit 2 continues: not available yet. Deliver its end.
        q.push(
            3,
            vec![inputs(2, true), inputs(2, false), exit(3, true)],
            100,
        )
        .await
        .unwrap();
        assert_eq!(src.next_entry().unwrap(), Some(exit(2, true)));
        assert_eq!(src.next_entry().unwrap(), Some(inputs(2, true)));
        assert_eq!(src.next_entry().unwrap(), Some(inputs(2, false)));
        // Exit 3 never completes: go-live drops it and ends the log.
        q.end_for_go_live();
        assert_eq!(src.next_entry().unwrap(), None);
        assert_eq!(q.progress.ordinal.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn resends_are_skipped_and_gaps_refused() {
        let q = ReplayQueue::new(1, 1 << 20);
        assert_eq!(q.push(1, vec![exit(1, false)], 10).await, Ok(1));
        assert_eq!(
            q.push(1, vec![exit(1, false), exit(2, false)], 10).await,
            Ok(2)
        );
        assert_eq!(
            q.push(5, vec![exit(5, false)], 10).await,
            Err(PushError::Gap {
                first: 5,
                received: 2,
                missing: 3
            })
        );
    }

    #[tokio::test]
    async fn a_queue_restarted_at_a_cut_over_counts_log_indices() {
        // A joined backup follows the log from entry 100: its replay
        // position is that index, not a count from 1 (a switchover waits
        // for the position to reach the primary's last index).
        let q = ReplayQueue::new(1, 1 << 20);
        q.restart_at(100);
        let mut src = q.source();
        assert_eq!(q.push(100, vec![exit(7, false)], 10).await, Ok(100));
        assert_eq!(src.next_entry().unwrap(), Some(exit(7, false)));
        assert_eq!(q.progress.replayed.load(Ordering::Relaxed), 100);
        assert_eq!(q.received(), 100);
    }

    #[test]
    fn interrupt_wakes_a_waiting_replayer() {
        let q = ReplayQueue::new(1, 1 << 20);
        let mut src = q.source();
        let t = std::thread::spawn(move || src.next_entry());
        std::thread::sleep(Duration::from_millis(50));
        q.interrupt();
        assert!(matches!(
            t.join().unwrap(),
            Err(EnvError::Interrupted { .. })
        ));
    }
}

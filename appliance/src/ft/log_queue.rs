//! The primary's log buffer between the vCPU thread and the log channel.
//!
//! The vCPU thread appends encoded entries through a [`QueueSink`] (the
//! recorder's [`LogSink`]); the channel's sender task takes batches from
//! the [`LogQueue`] and writes them to the QUIC log stream. Every entry is
//! kept until the backup acks it, so a reconnect resumes from the acked
//! position without losing or repeating anything.
//!
//! Flow control (DESIGN.md 5):
//! - the buffer holds at most `ft.log_buffer_mib` of unacked entries; when
//!   it is full, the vCPU waits (it stays stoppable);
//! - when the backup's replay lags more than `ft.max_lag_ms` of guest time
//!   behind the last logged exit, the vCPU is slowed (it sleeps at exits)
//!   until the lag is back under half of that.
//!
//! A pending output forces the open batch out at once (`flush_for_output`);
//! otherwise a batch leaves when it reaches [`BATCH_TARGET`] or after
//! [`FLUSH_DELAY`].

use crate::replay::log::{batch_has_room, encode_entry, Entry, LogError, LogSink};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A batch is handed to the sender once it holds this many bytes.
pub const BATCH_TARGET: usize = 64 << 10;
/// Entries wait at most this long for more to join their batch.
pub const FLUSH_DELAY: Duration = Duration::from_millis(2);
/// How long one back-pressure wait sleeps before looking again (a stop or a
/// detach may have happened).
const WAIT_STEP: Duration = Duration::from_millis(50);

/// A run of consecutive entries, encoded back to back.
#[derive(Debug, Clone)]
pub struct Batch {
    pub first_index: u64,
    pub count: u32,
    pub entries: Arc<Vec<u8>>,
}

impl Batch {
    pub fn last_index(&self) -> u64 {
        self.first_index + u64::from(self.count) - 1
    }
}

/// What the queue does with entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Keep every entry until the backup acks it (a backup is attached or
    /// expected).
    ForBackup,
    /// No backup is needed to release outputs (a solo primary): entries
    /// are kept while there is room, so a backup that comes back soon can
    /// resume, and the oldest are dropped when the buffer is full. The vCPU
    /// never waits.
    BestEffort,
    /// Entries are counted and dropped.
    Discard,
}

#[derive(Debug)]
struct QueueState {
    open: Vec<u8>,
    open_first: u64,
    open_count: u32,
    open_since: Option<Instant>,
    urgent: bool,
    /// Sealed, not yet acked, in index order.
    sealed: VecDeque<Batch>,
    next_index: u64,
    acked: u64,
    /// Unacked bytes (open and sealed).
    bytes: usize,
    capacity: usize,
    retention: Retention,
    /// A stop is under way: appends never wait for room.
    stopping: bool,
}

/// Counters the status endpoint reads.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub entries: AtomicU64,
    pub bytes: AtomicU64,
    pub waited_full_us: AtomicU64,
    pub slowed_us: AtomicU64,
    /// Guest clock of the last exit logged, ns.
    pub primary_clock_ns: AtomicU64,
    /// Guest clock of the last exit the backup replayed, ns (0: unknown).
    pub replayed_clock_ns: AtomicU64,
    /// Whether a backup reports its replay position (lag is meaningful).
    pub backup_reporting: std::sync::atomic::AtomicBool,
}

/// The buffer shared by the vCPU thread and the sender task.
#[derive(Debug)]
pub struct LogQueue {
    state: Mutex<QueueState>,
    room: Condvar,
    data: tokio::sync::Notify,
    pub stats: QueueStats,
    epoch: AtomicU64,
    max_lag_ns: u64,
}

/// Why the queue cannot serve a backup from where it stands.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ResumeError {
    #[error("the backup has received up to entry {received}, but the log has only {last} entries")]
    Ahead { received: u64, last: u64 },
    #[error("the backup needs entries from {wanted} on, but this primary keeps only entries from {kept} on: it must rejoin with a full copy (re-protection)")]
    Gone { wanted: u64, kept: u64 },
}

impl LogQueue {
    /// A queue whose first entry gets index `first_index`.
    pub fn new(
        epoch: u64,
        first_index: u64,
        capacity: usize,
        retention: Retention,
        max_lag: Duration,
    ) -> Arc<Self> {
        Arc::new(LogQueue {
            state: Mutex::new(QueueState {
                open: Vec::with_capacity(BATCH_TARGET * 2),
                open_first: first_index,
                open_count: 0,
                open_since: None,
                urgent: false,
                sealed: VecDeque::new(),
                next_index: first_index,
                acked: first_index - 1,
                bytes: 0,
                capacity,
                retention,
                stopping: false,
            }),
            room: Condvar::new(),
            data: tokio::sync::Notify::new(),
            stats: QueueStats::default(),
            epoch: AtomicU64::new(epoch),
            max_lag_ns: max_lag.as_nanos() as u64,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    fn seal(s: &mut QueueState) {
        if s.open_count == 0 {
            return;
        }
        let entries = std::mem::replace(&mut s.open, Vec::with_capacity(BATCH_TARGET * 2));
        let batch = Batch {
            first_index: s.open_first,
            count: s.open_count,
            entries: Arc::new(entries),
        };
        s.open_first = s.next_index;
        s.open_count = 0;
        s.open_since = None;
        s.urgent = false;
        match s.retention {
            Retention::ForBackup | Retention::BestEffort => s.sealed.push_back(batch),
            Retention::Discard => s.bytes = s.bytes.saturating_sub(batch.entries.len()),
        }
    }

    /// Appends one encoded entry; returns its index. Waits for room when the
    /// buffer is full (unless stopping).
    fn append_encoded(&self, encoded: &[u8]) -> u64 {
        let mut s = self.lock();
        if s.open_count > 0 && !batch_has_room(s.open.len(), encoded.len()) {
            Self::seal(&mut s);
            self.data.notify_one();
        }
        if s.retention == Retention::BestEffort {
            while s.bytes + encoded.len() > s.capacity {
                let Some(old) = s.sealed.pop_front() else {
                    break;
                };
                s.bytes = s.bytes.saturating_sub(old.entries.len());
            }
        }
        let mut waited: Option<Instant> = None;
        while s.retention == Retention::ForBackup
            && !s.stopping
            && s.bytes + encoded.len() > s.capacity
            && s.bytes > 0
        {
            waited.get_or_insert_with(Instant::now);
            s = self
                .room
                .wait_timeout(s, WAIT_STEP)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if let Some(t) = waited {
            self.stats
                .waited_full_us
                .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        let was_empty = s.open_count == 0;
        s.open.extend_from_slice(encoded);
        s.open_count += 1;
        if was_empty {
            s.open_since = Some(Instant::now());
        }
        s.bytes += encoded.len();
        let index = s.next_index;
        s.next_index += 1;
        if s.open.len() >= BATCH_TARGET {
            Self::seal(&mut s);
            self.data.notify_one();
        } else if was_empty {
            // Starts the sender's flush timer.
            self.data.notify_one();
        }
        self.stats.entries.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes
            .fetch_add(encoded.len() as u64, Ordering::Relaxed);
        index
    }

    /// Slows the vCPU while the backup lags too far behind (DESIGN.md 5).
    fn pace(&self, clock_ns: u64) {
        self.stats
            .primary_clock_ns
            .store(clock_ns, Ordering::Relaxed);
        let mut slept: Option<Instant> = None;
        loop {
            // Only a primary that keeps entries for its backup paces: a solo
            // one never waits (Retention::BestEffort), whatever the last
            // backup said before it went.
            let paced = {
                let s = self.lock();
                !s.stopping && s.retention == Retention::ForBackup
            };
            if !paced || !self.stats.backup_reporting.load(Ordering::Relaxed) {
                break;
            }
            let replayed = self.stats.replayed_clock_ns.load(Ordering::Relaxed);
            let lag = clock_ns.saturating_sub(replayed);
            let limit = if slept.is_some() {
                self.max_lag_ns / 2
            } else {
                self.max_lag_ns
            };
            if replayed == 0 || lag <= limit {
                break;
            }
            slept.get_or_insert_with(Instant::now);
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(t) = slept {
            self.stats
                .slowed_us
                .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
    }

    /// Marks the open batch urgent: an output waits on it.
    pub fn urge(&self) {
        let mut s = self.lock();
        if s.open_count > 0 && !s.urgent {
            s.urgent = true;
            self.data.notify_one();
        }
    }

    /// Index of the last entry appended.
    pub fn last_index(&self) -> u64 {
        self.lock().next_index - 1
    }

    /// Index of the last entry the backup acked.
    pub fn acked(&self) -> u64 {
        self.lock().acked
    }

    /// The backup has received every entry up to `received`.
    pub fn ack(&self, received: u64) {
        let mut s = self.lock();
        if received <= s.acked {
            return;
        }
        s.acked = received.min(s.next_index - 1);
        while s.sealed.front().is_some_and(|b| b.last_index() <= received) {
            if let Some(b) = s.sealed.pop_front() {
                s.bytes = s.bytes.saturating_sub(b.entries.len());
            }
        }
        self.room.notify_all();
    }

    /// Checks that a backup which has received up to `received` can be
    /// served from here, and counts its position as acked.
    pub fn resume_from(&self, received: u64) -> Result<u64, ResumeError> {
        let last = self.last_index();
        if received > last {
            return Err(ResumeError::Ahead { received, last });
        }
        // Everything after the oldest retained batch is still here.
        let kept = {
            let s = self.lock();
            s.sealed.front().map_or(s.open_first, |b| b.first_index)
        };
        if received + 1 < kept {
            return Err(ResumeError::Gone {
                wanted: received + 1,
                kept,
            });
        }
        self.ack(received);
        Ok(received + 1)
    }

    /// Sets what happens to entries from now on. `Discard` drops every
    /// unacked entry and never waits for room.
    pub fn set_retention(&self, retention: Retention) {
        let mut s = self.lock();
        s.retention = retention;
        if retention != Retention::ForBackup {
            self.stats.backup_reporting.store(false, Ordering::Relaxed);
        }
        if retention == Retention::Discard {
            s.sealed.clear();
            s.bytes = s.open.len();
            self.stats.backup_reporting.store(false, Ordering::Relaxed);
        }
        self.room.notify_all();
    }

    /// A new backup starts from the machine's state after the last entry:
    /// drops every entry kept so far, keeps every later one until acked,
    /// and returns the index of the last entry (the backup's starting
    /// point). Called while the vCPU is stopped.
    pub fn restart_for_backup(&self) -> u64 {
        let mut s = self.lock();
        Self::seal(&mut s);
        s.sealed.clear();
        s.bytes = 0;
        s.retention = Retention::ForBackup;
        let last = s.next_index - 1;
        s.acked = last;
        s.open_first = s.next_index;
        self.stats.backup_reporting.store(false, Ordering::Relaxed);
        self.room.notify_all();
        last
    }

    /// The epoch this node now holds: batches sent from here on carry it.
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Relaxed);
    }

    /// A stop is under way: appends no longer wait for room or pace.
    pub fn stopping(&self) {
        self.lock().stopping = true;
        self.room.notify_all();
        self.data.notify_one();
    }

    /// Buffer use: (unacked bytes, capacity).
    pub fn fill(&self) -> (usize, usize) {
        let s = self.lock();
        (s.bytes, s.capacity)
    }

    /// The next batch holding entries from `cursor` on, waiting until one is
    /// ready: sealed, or open and urgent or older than [`FLUSH_DELAY`].
    pub async fn next_batch(&self, cursor: u64) -> Batch {
        loop {
            let wait = {
                let mut s = self.lock();
                if let Some(b) = s.sealed.iter().find(|b| b.last_index() >= cursor) {
                    return b.clone();
                }
                let due = s
                    .open_since
                    .map(|t| FLUSH_DELAY.saturating_sub(t.elapsed()));
                match due {
                    Some(d) if s.urgent || d.is_zero() => {
                        Self::seal(&mut s);
                        continue;
                    }
                    Some(d) => Some(d),
                    None => None,
                }
            };
            match wait {
                Some(d) => {
                    let _ = tokio::time::timeout(d, self.data.notified()).await;
                }
                None => self.data.notified().await,
            }
        }
    }
}

/// The recorder's [`LogSink`] on a primary: entries go into the [`LogQueue`].
#[derive(Debug)]
pub struct QueueSink {
    queue: Arc<LogQueue>,
    last: u64,
    encoded: Vec<u8>,
}

impl QueueSink {
    pub fn new(queue: Arc<LogQueue>) -> Self {
        let last = queue.last_index();
        QueueSink {
            queue,
            last,
            encoded: Vec::with_capacity(1024),
        }
    }
}

impl LogSink for QueueSink {
    fn append(&mut self, entry: &Entry) -> Result<u64, LogError> {
        self.encoded.clear();
        encode_entry(entry, &mut self.encoded)?;
        self.last = self.queue.append_encoded(&self.encoded);
        if let Entry::Exit { clock_ns, .. } = entry {
            self.queue.pace(*clock_ns);
        }
        Ok(self.last)
    }

    fn last_index(&self) -> u64 {
        self.last
    }

    fn flush_for_output(&mut self) -> Result<(), LogError> {
        self.queue.urge();
        Ok(())
    }

    fn flush(&mut self) -> Result<(), LogError> {
        self.queue.urge();
        Ok(())
    }

    fn stats(&self) -> (u64, u64) {
        (
            self.queue.stats.bytes.load(Ordering::Relaxed),
            self.queue.stats.entries.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ordinal: u64) -> Entry {
        Entry::End {
            ordinal,
            outcome: crate::replay::env::Outcome::Stopped,
            digest: [0; 32],
        }
    }

    #[tokio::test]
    async fn batches_resend_from_the_acked_position() {
        let q = LogQueue::new(1, 1, 1 << 20, Retention::ForBackup, Duration::from_secs(1));
        let mut sink = QueueSink::new(q.clone());
        for i in 1..=3 {
            assert_eq!(sink.append(&entry(i)).unwrap(), i);
        }
        sink.flush_for_output().unwrap();
        let b = q.next_batch(1).await;
        assert_eq!((b.first_index, b.count), (1, 3));
        sink.append(&entry(4)).unwrap();
        sink.flush_for_output().unwrap();
        let b2 = q.next_batch(4).await;
        assert_eq!((b2.first_index, b2.count), (4, 1));
        // Nothing acked: a new session starting from 0 gets everything again.
        assert_eq!(q.resume_from(0), Ok(1));
        assert_eq!(q.next_batch(1).await.first_index, 1);
        q.ack(3);
        assert_eq!(
            q.next_batch(1).await.first_index,
            4,
            "acked batches are gone"
        );
        assert_eq!(
            q.resume_from(1),
            Err(ResumeError::Gone { wanted: 2, kept: 4 })
        );
        assert_eq!(
            q.resume_from(9),
            Err(ResumeError::Ahead {
                received: 9,
                last: 4
            })
        );
    }

    #[tokio::test]
    async fn a_full_buffer_blocks_until_acked_or_stopping() {
        // Two entries fit (an End entry encodes to about 35 bytes), a third does not.
        let q = LogQueue::new(1, 1, 80, Retention::ForBackup, Duration::from_secs(1));
        let mut sink = QueueSink::new(q.clone());
        sink.append(&entry(1)).unwrap();
        sink.append(&entry(2)).unwrap();
        sink.flush_for_output().unwrap();
        let sent = q.next_batch(1).await;
        assert_eq!(sent.last_index(), 2);
        let q2 = q.clone();
        let t = std::thread::spawn(move || {
            let mut sink = QueueSink::new(q2);
            sink.append(&entry(3)).unwrap()
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!t.is_finished(), "the append waits for room");
        q.ack(2);
        assert_eq!(t.join().unwrap(), 3);
        // Stopping lifts back-pressure.
        let q3 = q.clone();
        let t = std::thread::spawn(move || {
            let mut sink = QueueSink::new(q3);
            for i in 4..10 {
                sink.append(&entry(i)).unwrap();
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!t.is_finished(), "the appends wait for room");
        q.stopping();
        t.join().unwrap();
        assert_eq!(q.last_index(), 9);
    }

    #[test]
    fn discard_keeps_counting_indexes() {
        let q = LogQueue::new(2, 1, 16, Retention::Discard, Duration::from_secs(1));
        let mut sink = QueueSink::new(q.clone());
        for i in 1..100 {
            sink.append(&entry(i)).unwrap();
        }
        assert_eq!(q.last_index(), 99);
        assert!(q.fill().0 < BATCH_TARGET);
    }

    #[test]
    fn a_lagging_backup_slows_the_vcpu_but_never_a_solo_primarys() {
        let q = LogQueue::new(
            1,
            1,
            1 << 20,
            Retention::ForBackup,
            Duration::from_millis(10),
        );
        // The backup last reported replaying at 1 ns; the primary is at 10 s.
        q.stats.replayed_clock_ns.store(1, Ordering::Relaxed);
        q.stats.backup_reporting.store(true, Ordering::Relaxed);
        let (done_tx, done) = std::sync::mpsc::channel();
        let q2 = q.clone();
        std::thread::spawn(move || {
            q2.pace(10_000_000_000);
            let _ = done_tx.send(());
        });
        assert!(
            done.recv_timeout(Duration::from_millis(100)).is_err(),
            "the vCPU waits for the lagging backup"
        );
        // The backup went away and the primary went solo: the last lag it
        // reported no longer holds the vCPU back.
        q.set_retention(Retention::BestEffort);
        done.recv_timeout(Duration::from_secs(60))
            .expect("a solo primary's vCPU still waits for its departed backup");
        q.pace(20_000_000_000);
        assert!(q.stats.slowed_us.load(Ordering::Relaxed) > 0);
    }
}

//! Failure detection (DESIGN.md 6): a peer is declared failed when it has
//! been silent for `ft.failure_timeout_ms`: no heartbeat, no control
//! message, no log batch. A primary also declares its backup failed when
//! entries wait unacked for that long while the backup still talks (a cut
//! in one direction only: the backup cannot be receiving the log).
//!
//! A QUIC connection error is not itself a verdict: the link reconnects and
//! the pair continues from the acked position if the peer answers within
//! the timeout. A hiccup shorter than the timeout never causes a failover.

use super::channel::LinkState;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the detector thinks of the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Heard from recently enough.
    Alive,
    /// Never paired: there is nothing to take over (a backup) or nobody to
    /// wait for yet (a primary within its first timeout).
    NotPaired,
    /// Failed, with the reason for the log and the witness claim.
    Failed(String),
}

/// Watches one peer link.
#[derive(Debug)]
pub struct FailureDetector {
    link: Arc<LinkState>,
    timeout: Duration,
    /// When the watch began (a primary waits this long for a first backup).
    since: Instant,
    /// Primary: the last ack seen and when it changed.
    last_ack: u64,
    ack_moved: Instant,
    /// How long a new primary waits for its first backup.
    first_backup_grace: Duration,
}

impl FailureDetector {
    pub fn new(link: Arc<LinkState>, timeout: Duration) -> Self {
        let now = Instant::now();
        FailureDetector {
            last_ack: link.acked.load(Ordering::Relaxed),
            link,
            timeout,
            since: now,
            ack_moved: now,
            first_backup_grace: timeout,
        }
    }

    /// A new primary waits this long for a backup that never attached
    /// before it declares it failed (both sites usually start together).
    pub fn with_first_backup_grace(mut self, grace: Duration) -> Self {
        self.first_backup_grace = grace.max(self.timeout);
        self
    }

    /// Starts watching afresh (a backup attached again).
    pub fn reset(&mut self) {
        let now = Instant::now();
        self.since = now;
        self.ack_moved = now;
        self.last_ack = self.link.acked.load(Ordering::Relaxed);
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The backup's view of its primary.
    pub fn check_primary(&self) -> Verdict {
        match self.link.silent_for() {
            None => Verdict::NotPaired,
            Some(s) if s >= self.timeout => Verdict::Failed(format!(
                "no heartbeat, control message or log from the primary for {} ms (failure_timeout {} ms)",
                s.as_millis(),
                self.timeout.as_millis()
            )),
            Some(_) => Verdict::Alive,
        }
    }

    /// The primary's view of its backup. `last_index` is the last entry
    /// logged: entries waiting unacked past the timeout mean the backup is
    /// not receiving.
    pub fn check_backup(&mut self, last_index: u64) -> Verdict {
        let acked = self.link.acked.load(Ordering::Relaxed);
        if acked != self.last_ack {
            self.last_ack = acked;
            self.ack_moved = Instant::now();
        }
        let never = self.link.sessions.load(Ordering::Relaxed) == 0;
        let (silent, limit) = match self.link.silent_for() {
            Some(s) if !never => (s, self.timeout),
            _ => (self.since.elapsed(), self.first_backup_grace),
        };
        if silent >= limit {
            let what = if never {
                "no backup attached"
            } else {
                "no heartbeat or ack from the backup"
            };
            return Verdict::Failed(format!(
                "{what} for {} ms (limit {} ms)",
                silent.as_millis(),
                limit.as_millis()
            ));
        }
        if never {
            // Entries logged before any backup existed have waited for
            // nobody: the clock of a stuck ack starts when one attaches.
            self.ack_moved = Instant::now();
            return Verdict::Alive;
        }
        let stuck = self.ack_moved.elapsed();
        if acked < last_index && stuck >= self.timeout {
            return Verdict::Failed(format!(
                "the backup acked nothing new for {} ms while entries {}..={last_index} waited (failure_timeout {} ms): it is not receiving the log",
                stuck.as_millis(),
                acked + 1,
                self.timeout.as_millis()
            ));
        }
        Verdict::Alive
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_never_takes_over_a_primary_it_never_heard() {
        let link = Arc::new(LinkState::default());
        let d = FailureDetector::new(link.clone(), Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(d.check_primary(), Verdict::NotPaired);
        link.touch();
        assert_eq!(d.check_primary(), Verdict::Alive);
        std::thread::sleep(Duration::from_millis(30));
        assert!(matches!(d.check_primary(), Verdict::Failed(_)));
    }

    #[test]
    fn a_primary_notices_a_backup_that_talks_but_does_not_ack() {
        let link = Arc::new(LinkState::default());
        let mut d = FailureDetector::new(link.clone(), Duration::from_millis(40));
        link.touch();
        link.sessions.fetch_add(1, Ordering::Relaxed);
        assert_eq!(d.check_backup(0), Verdict::Alive);
        for _ in 0..6 {
            std::thread::sleep(Duration::from_millis(10));
            link.touch();
        }
        // Heard all along, but entry 1..=5 never acked.
        let v = d.check_backup(5);
        assert!(
            matches!(&v, Verdict::Failed(w) if w.contains("not receiving")),
            "{v:?}"
        );
        link.acked.store(5, Ordering::Relaxed);
        assert_eq!(d.check_backup(5), Verdict::Alive);
    }

    #[test]
    fn a_first_backup_that_attaches_late_gets_its_own_timeout_to_ack() {
        let link = Arc::new(LinkState::default());
        // A timeout far longer than any pause between two lines here.
        let timeout = Duration::from_secs(1);
        let mut d = FailureDetector::new(link.clone(), timeout)
            .with_first_backup_grace(Duration::from_secs(600));
        // The primary logs for longer than the timeout with no backup yet.
        for _ in 0..4 {
            std::thread::sleep(timeout / 3);
            assert_eq!(d.check_backup(100), Verdict::Alive);
        }
        // Its first backup attaches: it has not acked the old entries yet.
        link.touch();
        link.sessions.fetch_add(1, Ordering::Relaxed);
        assert_eq!(d.check_backup(100), Verdict::Alive);
        // Still nothing acked a timeout later: now it is stuck.
        std::thread::sleep(timeout + timeout / 5);
        link.touch();
        let v = d.check_backup(100);
        assert!(
            matches!(&v, Verdict::Failed(w) if w.contains("not receiving")),
            "{v:?}"
        );
    }
}

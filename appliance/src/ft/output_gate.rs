//! The output rule (DESIGN.md 6): a frame the primary's guest transmits is
//! held until the backup has acked every log entry the frame depends on.
//! The vCPU never waits for it; only the frame does.
//!
//! - Protected (`Primary`): a frame depending on entry `i` leaves once the
//!   backup acked `i`: at once when it already has and nothing older is
//!   held, otherwise written by whoever delivers the ack (the log channel's
//!   task), in the same call. No thread sits between an ack and the frames
//!   it frees: on this platform a thread wake-up per ack cost more CPU than
//!   the TAP writes themselves.
//! - Solo: frames leave at once. The gate is opened only after the witness
//!   granted the epoch in which this node runs alone.
//! - Fenced: every held frame is dropped and no frame leaves again.
//!
//! Frames leave in the order the guest sent them. Held frames are bounded:
//! past [`MAX_HELD_BYTES`] a new frame is dropped, as a full NIC queue
//! would (the guest's TCP retransmits it).

use crate::devices::tap::TapWriter;
use crate::replay::live::FrameOutput;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Bytes of frames held at most.
pub const MAX_HELD_BYTES: usize = 64 << 20;

/// Where the gate lets frames out (a TAP in production; a unit test's
/// collector in the tests below).
pub trait FrameSink: Send + std::fmt::Debug {
    fn write(&mut self, frame: &[u8]);
}

impl FrameSink for TapWriter {
    fn write(&mut self, frame: &[u8]) {
        TapWriter::send(self, frame);
    }
}

/// What the gate does with frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateMode {
    /// Hold each frame until its entries are acked.
    Protected,
    /// Let every frame out at once (witness-granted solo epoch).
    Solo,
    /// Let nothing out, ever (fenced).
    Closed,
}

#[derive(Debug)]
struct GateState {
    mode: GateMode,
    released_upto: u64,
    held: VecDeque<(u64, Vec<u8>, Instant)>,
    held_bytes: usize,
    sink: Box<dyn FrameSink>,
    /// Held frames stay unsent from now on.
    shutdown: bool,
}

/// Counters the status endpoint reads.
#[derive(Debug, Default)]
pub struct GateStats {
    pub sent: AtomicU64,
    pub held_total: AtomicU64,
    pub dropped: AtomicU64,
    /// Longest a frame was held, microseconds.
    pub max_hold_us: AtomicU64,
    /// Sum of the hold times of frames released after a wait, microseconds
    /// (divided by `waited` it is the output delay the pairing adds).
    pub hold_us_total: AtomicU64,
    /// Frames released after a wait.
    pub waited: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<GateState>,
    stats: GateStats,
}

/// The gate; clones share it.
#[derive(Debug, Clone)]
pub struct OutputGate {
    shared: Arc<Shared>,
}

impl OutputGate {
    /// A gate in `mode` writing to `sink`.
    pub fn new(sink: Box<dyn FrameSink>, mode: GateMode) -> Self {
        OutputGate {
            shared: Arc::new(Shared {
                state: Mutex::new(GateState {
                    mode,
                    released_upto: 0,
                    held: VecDeque::new(),
                    held_bytes: 0,
                    sink,
                    shutdown: false,
                }),
                stats: GateStats::default(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> &GateStats {
        &self.shared.stats
    }

    /// Frames and bytes held now, and how long the oldest has waited.
    pub fn held(&self) -> (usize, usize, Option<std::time::Duration>) {
        let s = self.lock();
        (
            s.held.len(),
            s.held_bytes,
            s.held.front().map(|(_, _, t)| t.elapsed()),
        )
    }

    pub fn mode(&self) -> GateMode {
        self.lock().mode
    }

    /// The backup has every entry up to `index`: frames depending on no
    /// more may leave.
    pub fn release_upto(&self, index: u64) {
        let mut s = self.lock();
        if index > s.released_upto {
            s.released_upto = index;
            self.release(&mut s);
        }
    }

    /// Changes the mode. `Closed` drops every held frame for good.
    pub fn set_mode(&self, mode: GateMode) {
        let mut s = self.lock();
        if s.mode == GateMode::Closed {
            return;
        }
        s.mode = mode;
        if mode == GateMode::Closed {
            let n = s.held.len() as u64;
            s.held.clear();
            s.held_bytes = 0;
            self.shared.stats.dropped.fetch_add(n, Ordering::Relaxed);
        }
        self.release(&mut s);
    }

    /// Held frames stay unsent from now on (the node is stopping).
    pub fn shutdown(&self) {
        self.lock().shutdown = true;
    }

    fn releasable(s: &GateState) -> bool {
        match s.held.front() {
            Some((dep, _, _)) => s.mode == GateMode::Solo || *dep <= s.released_upto,
            None => false,
        }
    }

    /// Writes every frame that may leave now, oldest first. Written under
    /// the lock, so a frame the vCPU sends directly never overtakes a held
    /// one.
    fn release(&self, s: &mut GateState) {
        if s.shutdown || s.mode == GateMode::Closed {
            return;
        }
        while Self::releasable(s) {
            if let Some((_, frame, since)) = s.held.pop_front() {
                s.held_bytes -= frame.len();
                s.sink.write(&frame);
                let us = since.elapsed().as_micros() as u64;
                self.shared.stats.sent.fetch_add(1, Ordering::Relaxed);
                self.shared.stats.waited.fetch_add(1, Ordering::Relaxed);
                self.shared
                    .stats
                    .hold_us_total
                    .fetch_add(us, Ordering::Relaxed);
                self.shared
                    .stats
                    .max_hold_us
                    .fetch_max(us, Ordering::Relaxed);
            }
        }
    }
}

impl FrameOutput for OutputGate {
    fn send(&mut self, frame: &[u8], depends_on: u64) {
        let mut s = self.lock();
        let direct = match s.mode {
            GateMode::Closed => {
                self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            GateMode::Solo => s.held.is_empty(),
            GateMode::Protected => s.held.is_empty() && depends_on <= s.released_upto,
        };
        if direct {
            s.sink.write(frame);
            self.shared.stats.sent.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if s.held_bytes + frame.len() > MAX_HELD_BYTES {
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        s.held_bytes += frame.len();
        s.held
            .push_back((depends_on, frame.to_vec(), Instant::now()));
        self.shared.stats.held_total.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Collects what the gate lets out (stands in for the TAP).
    #[derive(Debug, Clone, Default)]
    struct Collector(Arc<Mutex<Vec<Vec<u8>>>>);

    impl FrameSink for Collector {
        fn write(&mut self, frame: &[u8]) {
            self.0.lock().unwrap().push(frame.to_vec());
        }
    }

    impl Collector {
        fn wait_for(&self, n: usize) -> Vec<Vec<u8>> {
            for _ in 0..2000 {
                let v = self.0.lock().unwrap().clone();
                if v.len() >= n {
                    return v;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            self.0.lock().unwrap().clone()
        }
    }

    #[test]
    fn frames_wait_for_their_entries_and_keep_their_order() {
        let out = Collector::default();
        let mut gate = OutputGate::new(Box::new(out.clone()), GateMode::Protected);
        gate.send(b"a", 0);
        gate.send(b"b", 5);
        gate.send(b"c", 3);
        gate.send(b"d", 9);
        assert_eq!(out.wait_for(1), vec![b"a".to_vec()]);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(out.0.lock().unwrap().len(), 1, "b waits for entry 5");
        gate.release_upto(5);
        // c depends on 3 but was sent after b: it leaves after b, not before.
        assert_eq!(
            out.wait_for(3),
            vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
        );
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(gate.held().0, 1);
        gate.set_mode(GateMode::Solo);
        assert_eq!(out.wait_for(4).len(), 4);
        gate.shutdown();
    }

    #[test]
    fn a_closed_gate_drops_everything_for_good() {
        let out = Collector::default();
        let mut gate = OutputGate::new(Box::new(out.clone()), GateMode::Protected);
        gate.send(b"x", 7);
        gate.set_mode(GateMode::Closed);
        gate.release_upto(100);
        gate.set_mode(GateMode::Solo);
        gate.send(b"y", 0);
        std::thread::sleep(Duration::from_millis(50));
        assert!(out.0.lock().unwrap().is_empty());
        assert_eq!(gate.stats().dropped.load(Ordering::Relaxed), 2);
        gate.shutdown();
    }
}

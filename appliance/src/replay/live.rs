//! The live world: the host's monotonic clock, the host's entropy, real waits.

use super::digest::PageRun;
use super::env::{
    DigestDue, EnvError, Environment, ExitPoint, Gather, LocalRead, Outcome, WaitOutcome,
};
use crate::devices::tap::{Tap, TapError, TapWriter};
use std::fs::File;
use std::io::Read;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Wakes a guest that is waiting: the TAP reader once enough frames wait,
/// anyone who needs the guest at an exit ([`Waker::wake`]), and the signal
/// handler when the machine must stop (sticky: every later wait returns at
/// once).
#[derive(Debug, Clone, Default)]
pub struct Waker {
    inner: Arc<(Mutex<WakeState>, Condvar)>,
}

#[derive(Debug, Default)]
struct WakeState {
    /// The frames the current wait asks for are waiting.
    frames: bool,
    /// Something other than a frame needs the guest at an exit; kept until
    /// a wait sees it, so a kick just before a WAIT is not lost.
    kicked: bool,
    stopping: bool,
    /// Frames the current wait asks for (0: nobody waits).
    want: usize,
}

impl Waker {
    /// Ends the current (or next) wait: the guest is needed at an exit.
    pub fn wake(&self) {
        let (lock, cv) = &*self.inner;
        lock.lock().unwrap_or_else(|p| p.into_inner()).kicked = true;
        cv.notify_all();
    }

    /// The machine is stopping: no wait may block any more.
    pub fn stop(&self) {
        let (lock, cv) = &*self.inner;
        lock.lock().unwrap_or_else(|p| p.into_inner()).stopping = true;
        cv.notify_all();
    }

    /// The TAP reader queued a frame; `waiting` frames wait now. Wakes the
    /// guest only when that is what its wait asked for, so a burst costs
    /// one wake-up rather than one per frame.
    pub fn frames_arrived(&self, waiting: usize) {
        let (lock, cv) = &*self.inner;
        let mut w = lock.lock().unwrap_or_else(|p| p.into_inner());
        if w.want > 0 && waiting >= w.want && !w.frames {
            w.frames = true;
            cv.notify_all();
        }
    }

    /// Waits up to `timeout` until `want` frames wait (as `waiting` counts
    /// them), a kick or a stop. True if the frames are there or a kick came.
    fn wait_for(&self, timeout: Duration, want: usize, waiting: impl Fn() -> usize) -> bool {
        let (lock, cv) = &*self.inner;
        let mut w = lock.lock().unwrap_or_else(|p| p.into_inner());
        // Counted under the lock after `want` is set: a frame queued after
        // this look finds `want` and wakes us (the reader counts, then locks).
        w.want = want.max(1);
        w.frames = waiting() >= w.want;
        if !w.frames && !w.kicked && !w.stopping && !timeout.is_zero() {
            w = cv
                .wait_timeout_while(w, timeout, |w| !w.frames && !w.kicked && !w.stopping)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        w.want = 0;
        let kicked = std::mem::take(&mut w.kicked);
        std::mem::take(&mut w.frames) || kicked
    }
}

/// Where the guest's transmitted frames go in the live world: straight to
/// the TAP, or through the output gate (`ft::output_gate`) that holds each
/// frame until the backup has every log entry it depends on.
pub trait FrameOutput: Send + std::fmt::Debug {
    /// Sends `frame`, which depends on log entries up to index `depends_on`
    /// (0 when nothing is logged).
    fn send(&mut self, frame: &[u8], depends_on: u64);
}

impl FrameOutput for TapWriter {
    fn send(&mut self, frame: &[u8], _depends_on: u64) {
        TapWriter::send(self, frame);
    }
}

/// The real world as the primary sees it.
#[derive(Debug)]
pub struct LiveWorld {
    start: Instant,
    /// Added to the time since `start`: a machine that goes live after
    /// replaying continues the guest's clock from the last logged value.
    base_ns: u64,
    last_ns: u64,
    urandom: File,
    waker: Waker,
    tap: Option<Tap>,
    output: Option<Box<dyn FrameOutput>>,
}

impl LiveWorld {
    pub fn new() -> Result<Self, EnvError> {
        Ok(LiveWorld {
            start: Instant::now(),
            base_ns: 0,
            last_ns: 0,
            urandom: File::open("/dev/urandom").map_err(EnvError::Entropy)?,
            waker: Waker::default(),
            tap: None,
            output: None,
        })
    }

    /// Connects the guest's network card to TAP `name`; frames the guest
    /// sends go straight to it until [`LiveWorld::set_output`].
    pub fn attach_tap(&mut self, name: &str) -> Result<(), TapError> {
        let tap = Tap::open(name, self.waker.clone())?;
        self.output = Some(Box::new(tap.writer()?));
        self.tap = Some(tap);
        Ok(())
    }

    /// A writer to the attached TAP, for an output gate to send through.
    pub fn tap_writer(&self) -> Result<Option<TapWriter>, TapError> {
        self.tap.as_ref().map(Tap::writer).transpose()
    }

    /// Sends the guest's frames through `output` from now on.
    pub fn set_output(&mut self, output: Box<dyn FrameOutput>) {
        self.output = Some(output);
    }

    /// Drops frames received so far; returns how many.
    pub fn discard_received(&mut self) -> usize {
        self.tap.as_mut().map_or(0, Tap::discard_received)
    }

    /// The guest's clock goes on from `last_ns` (never back): used when a
    /// backup that replayed up to a logged clock value goes live.
    pub fn continue_clock_from(&mut self, last_ns: u64) {
        self.start = Instant::now();
        self.base_ns = last_ns;
        self.last_ns = last_ns;
    }

    pub fn receive_frame(&mut self) -> Option<Vec<u8>> {
        self.tap.as_mut().and_then(Tap::try_recv)
    }

    pub fn send_frame(&mut self, frame: &[u8], depends_on: u64) {
        if let Some(o) = self.output.as_mut() {
            o.send(frame, depends_on);
        }
    }

    pub fn read_local(buf: &mut [u8], local: LocalRead<'_>) -> Result<(), EnvError> {
        local(buf).map_err(EnvError::DiskRead)
    }

    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// Monotonic nanoseconds since boot; never goes back.
    pub fn now_ns(&mut self) -> u64 {
        let now = self
            .base_ns
            .saturating_add(self.start.elapsed().as_nanos() as u64);
        self.last_ns = self.last_ns.max(now);
        self.last_ns
    }

    pub fn fill_entropy(&mut self, buf: &mut [u8]) -> Result<(), EnvError> {
        self.urandom.read_exact(buf).map_err(EnvError::Entropy)
    }

    /// Frames received and not yet handed to the guest.
    fn frames_waiting(&self) -> usize {
        self.tap.as_ref().map_or(0, Tap::waiting)
    }

    /// Blocks until `want` frames wait, a kick or a stop, or until `until_ns`.
    fn wait_for_frames(&mut self, until_ns: u64, want: usize) -> bool {
        let timeout = Duration::from_nanos(until_ns.saturating_sub(self.now_ns()));
        let tap = self.tap.as_ref();
        self.waker
            .wait_for(timeout, want, || tap.map_or(0, Tap::waiting))
    }

    /// Platform `WAIT`: idles until the deadline or the first input; then,
    /// if `gather` asks, keeps gathering until its window closes or its
    /// frame count waits (a kick or a stop ends it at once).
    pub fn wait_until(&mut self, deadline_ns: u64, gather: Gather) -> WaitOutcome {
        let start = self.now_ns();
        let input_arrived = self.frames_waiting() > 0 || self.wait_for_frames(deadline_ns, 1);
        if input_arrived && gather.window_ns > 0 {
            let want = match gather.frames {
                0 => usize::MAX,
                n => usize::try_from(n).unwrap_or(usize::MAX),
            };
            if self.frames_waiting() < want {
                self.wait_for_frames(start.saturating_add(gather.window_ns), want);
            }
        }
        WaitOutcome {
            input_arrived,
            now_ns: self.now_ns(),
        }
    }
}

/// `ftvm run`: the live world, nothing logged.
impl Environment for LiveWorld {
    fn exit(&mut self, _ordinal: u64, _point: &ExitPoint) -> Result<u64, EnvError> {
        Ok(self.now_ns())
    }
    fn entropy(&mut self, buf: &mut [u8]) -> Result<(), EnvError> {
        self.fill_entropy(buf)
    }
    fn wait(&mut self, deadline_ns: u64, gather: Gather) -> Result<WaitOutcome, EnvError> {
        Ok(self.wait_until(deadline_ns, gather))
    }
    fn net_rx(&mut self) -> Result<Option<Vec<u8>>, EnvError> {
        Ok(self.receive_frame())
    }
    fn net_tx(&mut self, frame: &[u8]) -> Result<(), EnvError> {
        self.send_frame(frame, 0);
        Ok(())
    }
    fn disk_read(
        &mut self,
        _offset: u64,
        buf: &mut [u8],
        local: LocalRead<'_>,
    ) -> Result<(), EnvError> {
        Self::read_local(buf, local)
    }
    fn exit_done(&mut self) -> Result<(), EnvError> {
        Ok(())
    }
    fn digest_due(&mut self, _ordinal: u64) -> Result<Option<DigestDue>, EnvError> {
        Ok(None)
    }
    fn digest_taken(
        &mut self,
        _: u64,
        _: bool,
        _: &[PageRun],
        _: [u8; 32],
    ) -> Result<(), EnvError> {
        Ok(())
    }
    fn finish(&mut self, _: u64, _: &Outcome, _: [u8; 32]) -> Result<(), EnvError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Long enough that only a lost wake-up reaches it.
    const HANG: Duration = Duration::from_secs(60);

    #[test]
    fn a_wait_for_several_frames_ends_when_the_last_of_them_arrives() {
        let waker = Waker::default();
        let count = Arc::new(AtomicUsize::new(0));
        let (w, c) = (waker.clone(), count.clone());
        let reader = std::thread::spawn(move || {
            for _ in 0..3 {
                std::thread::sleep(Duration::from_millis(5));
                let n = c.fetch_add(1, Ordering::AcqRel) + 1;
                w.frames_arrived(n);
            }
        });
        assert!(waker.wait_for(HANG, 3, || count.load(Ordering::Acquire)));
        assert_eq!(count.load(Ordering::Acquire), 3);
        reader.join().unwrap();
    }

    #[test]
    fn fewer_frames_than_asked_for_end_the_wait_only_at_its_timeout() {
        let waker = Waker::default();
        waker.frames_arrived(1);
        assert!(!waker.wait_for(Duration::from_millis(20), 2, || 1));
        // Frames already waiting satisfy a wait at once.
        assert!(waker.wait_for(HANG, 1, || 1));
    }

    #[test]
    fn a_kick_before_the_wait_is_kept_and_ends_it() {
        let waker = Waker::default();
        waker.wake();
        assert!(waker.wait_for(HANG, 1, || 0));
        // Seen once: the next wait is not ended by it.
        assert!(!waker.wait_for(Duration::from_millis(1), 1, || 0));
    }

    #[test]
    fn a_stop_ends_every_wait() {
        let waker = Waker::default();
        waker.stop();
        assert!(!waker.wait_for(HANG, 1, || 0));
        assert!(!waker.wait_for(HANG, 5, || 0));
    }
}

//! The live world: the host's monotonic clock, the host's entropy, real waits.

use super::digest::PageRun;
use super::env::{DigestDue, EnvError, Environment, ExitPoint, LocalRead, Outcome, WaitOutcome};
use crate::devices::tap::{Tap, TapError, TapWriter};
use std::fs::File;
use std::io::Read;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Wakes a guest that is waiting: the TAP reader when a frame arrives, and
/// the signal handler when the machine must stop (sticky: every later wait
/// returns at once).
#[derive(Debug, Clone, Default)]
pub struct Waker {
    inner: Arc<(Mutex<WakeState>, Condvar)>,
}

#[derive(Debug, Default)]
struct WakeState {
    input: bool,
    stopping: bool,
}

impl Waker {
    /// New input may be waiting.
    pub fn wake(&self) {
        let (lock, cv) = &*self.inner;
        lock.lock().unwrap_or_else(|p| p.into_inner()).input = true;
        cv.notify_all();
    }

    /// The machine is stopping: no wait may block any more.
    pub fn stop(&self) {
        let (lock, cv) = &*self.inner;
        lock.lock().unwrap_or_else(|p| p.into_inner()).stopping = true;
        cv.notify_all();
    }

    /// Forgets input wakes already seen (their frames were taken at an exit).
    fn clear_input(&self) {
        self.inner.0.lock().unwrap_or_else(|p| p.into_inner()).input = false;
    }

    /// Waits up to `timeout` for a wake; returns whether input (not a stop) came.
    fn wait_for(&self, timeout: Duration) -> bool {
        let (lock, cv) = &*self.inner;
        let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let (mut guard, _) = cv
            .wait_timeout_while(guard, timeout, |w| !w.input && !w.stopping)
            .unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut guard.input)
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

    pub fn wait_until(&mut self, deadline_ns: u64) -> WaitOutcome {
        let now = self.now_ns();
        // Clear first, then look: a frame arriving after the look sets the
        // flag again and ends the wait, so none is missed and none is stale.
        self.waker.clear_input();
        if self.tap.as_mut().is_some_and(Tap::has_pending) {
            return WaitOutcome {
                input_arrived: true,
                now_ns: now,
            };
        }
        let input_arrived = if deadline_ns > now {
            self.waker.wait_for(Duration::from_nanos(deadline_ns - now))
        } else {
            false
        };
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
    fn wait(&mut self, deadline_ns: u64) -> Result<WaitOutcome, EnvError> {
        Ok(self.wait_until(deadline_ns))
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

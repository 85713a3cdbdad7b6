//! The live world: the host's monotonic clock, the host's entropy, real waits.

use super::digest::PageRun;
use super::env::{
    DigestDue, EnvError, Environment, ExitPoint, Gather, LocalRead, Outcome, WaitOutcome,
};
use crate::devices::tap::{Tap, TapError, TapWriter};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Wakes a guest that is waiting: anyone who needs the guest at an exit
/// ([`Waker::wake`]), and the signal handler when the machine must stop
/// (sticky: every later wait returns at once). Frames need no waker: the
/// waiting vCPU thread polls the TAP itself.
#[derive(Debug, Clone)]
pub struct Waker {
    inner: Arc<WakeState>,
}

#[derive(Debug)]
struct WakeState {
    /// Readable while a wake or stop is unseen (an eventfd).
    event: OwnedFd,
    /// Something other than a frame needs the guest at an exit; kept until
    /// a wait sees it, so a kick just before a WAIT is not lost.
    kicked: AtomicBool,
    stopping: AtomicBool,
}

impl Waker {
    pub fn new() -> std::io::Result<Waker> {
        // SAFETY: plain eventfd(2); the descriptor is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let event = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Waker {
            inner: Arc::new(WakeState {
                event,
                kicked: AtomicBool::new(false),
                stopping: AtomicBool::new(false),
            }),
        })
    }

    /// Ends the current (or next) wait: the guest is needed at an exit.
    pub fn wake(&self) {
        self.inner.kicked.store(true, Ordering::SeqCst);
        self.signal();
    }

    /// The machine is stopping: no wait may block any more.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.signal();
    }

    fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd. A full
        // counter (EAGAIN) already wakes any waiter, so errors are moot.
        let _ = unsafe { libc::write(self.inner.event.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    /// Waits up to `timeout` until `ready` says yes (it is asked again
    /// whenever `input` becomes readable), a kick or a stop. True if ready
    /// or kicked.
    fn wait_for(
        &self,
        timeout: Duration,
        input: Option<RawFd>,
        mut ready: impl FnMut() -> bool,
    ) -> bool {
        // Counted from the start rather than as an Instant deadline: a
        // guest may wait "forever" (u64::MAX ns), which no Instant holds.
        let start = Instant::now();
        loop {
            if ready() || self.inner.kicked.swap(false, Ordering::SeqCst) {
                return true;
            }
            if self.inner.stopping.load(Ordering::SeqCst) {
                return false;
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return false;
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.inner.event.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: input.unwrap_or(-1),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let ts = libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(left.subsec_nanos()),
            };
            // SAFETY: `fds` and `ts` are live for the call; a negative fd
            // is ignored by ppoll.
            let n = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
            if n > 0 && fds[0].revents != 0 {
                let mut count = [0u8; 8];
                // SAFETY: reads 8 bytes into a live buffer (resets the eventfd).
                let _ = unsafe {
                    libc::read(self.inner.event.as_raw_fd(), count.as_mut_ptr().cast(), 8)
                };
            }
        }
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
            waker: Waker::new().map_err(EnvError::Waker)?,
            tap: None,
            output: None,
        })
    }

    /// Connects the guest's network card to TAP `name`; frames the guest
    /// sends go straight to it until [`LiveWorld::set_output`].
    pub fn attach_tap(&mut self, name: &str) -> Result<(), TapError> {
        let tap = Tap::open(name)?;
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
    fn frames_waiting(&mut self) -> usize {
        self.tap.as_mut().map_or(0, Tap::waiting)
    }

    /// Blocks until `want` frames wait, a kick or a stop, or until `until_ns`.
    fn wait_for_frames(&mut self, until_ns: u64, want: usize) -> bool {
        let timeout = Duration::from_nanos(until_ns.saturating_sub(self.now_ns()));
        match self.tap.as_mut() {
            Some(tap) => {
                let fd = tap.fd().as_raw_fd();
                self.waker
                    .wait_for(timeout, Some(fd), || tap.waiting() >= want)
            }
            None => self.waker.wait_for(timeout, None, || false),
        }
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
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    /// Long enough that only a lost wake-up reaches it.
    const HANG: Duration = Duration::from_secs(60);

    /// A stand-in for the TAP: bytes written to one end are "frames"
    /// arriving on the other, which `ready` counts as it reads them.
    fn frames() -> (UnixStream, UnixStream) {
        let (tx, rx) = UnixStream::pair().unwrap();
        rx.set_nonblocking(true).unwrap();
        (tx, rx)
    }

    fn take(mut rx: &UnixStream, seen: &mut usize) {
        let mut b = [0u8; 64];
        while let Ok(n) = rx.read(&mut b) {
            if n == 0 {
                break;
            }
            *seen += n;
        }
    }

    #[test]
    fn a_wait_for_several_frames_ends_when_the_last_of_them_arrives() {
        let waker = Waker::new().unwrap();
        let (mut tx, rx) = frames();
        let sender = std::thread::spawn(move || {
            for _ in 0..3 {
                std::thread::sleep(Duration::from_millis(5));
                tx.write_all(b"f").unwrap();
            }
            tx
        });
        let mut seen = 0;
        assert!(waker.wait_for(HANG, Some(rx.as_raw_fd()), || {
            take(&rx, &mut seen);
            seen >= 3
        }));
        assert_eq!(seen, 3);
        sender.join().unwrap();
    }

    #[test]
    fn fewer_frames_than_asked_for_end_the_wait_only_at_its_timeout() {
        let waker = Waker::new().unwrap();
        let (mut tx, rx) = frames();
        tx.write_all(b"f").unwrap();
        let mut seen = 0;
        let start = Instant::now();
        assert!(
            !waker.wait_for(Duration::from_millis(20), Some(rx.as_raw_fd()), || {
                take(&rx, &mut seen);
                seen >= 2
            })
        );
        assert!(start.elapsed() >= Duration::from_millis(20));
        assert_eq!(seen, 1);
        // Frames already waiting satisfy a wait at once.
        assert!(waker.wait_for(HANG, Some(rx.as_raw_fd()), || seen >= 1));
    }

    #[test]
    fn a_kick_before_the_wait_is_kept_and_ends_it() {
        let waker = Waker::new().unwrap();
        waker.wake();
        assert!(waker.wait_for(HANG, None, || false));
        // Seen once: the next wait is not ended by it.
        assert!(!waker.wait_for(Duration::from_millis(1), None, || false));
    }

    /// A wait of `timeout` that another thread kicks 5 ms in ends kicked.
    fn kicked_from_another_thread(timeout: Duration) {
        let waker = Waker::new().unwrap();
        let w = waker.clone();
        let kicker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            w.wake();
        });
        assert!(waker.wait_for(timeout, None, || false));
        kicker.join().unwrap();
    }

    #[test]
    fn a_kick_from_another_thread_ends_a_wait_in_progress() {
        kicked_from_another_thread(HANG);
    }

    #[test]
    fn a_wait_without_a_deadline_ends_with_a_kick() {
        kicked_from_another_thread(Duration::from_nanos(u64::MAX));
    }

    #[test]
    fn a_stop_ends_every_wait() {
        let waker = Waker::new().unwrap();
        waker.stop();
        assert!(!waker.wait_for(HANG, None, || false));
        assert!(!waker.wait_for(HANG, None, || false));
    }
}

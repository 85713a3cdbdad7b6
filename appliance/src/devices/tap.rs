//! A TAP device: the live world's network. A reader thread takes frames off
//! the TAP into a bounded queue (dropping when it is full, as a NIC would),
//! counts them and tells the guest's [`Waker`]; frames are handed to the
//! guest only at exits.

use crate::replay::live::Waker;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, TrySendError};
use std::sync::Arc;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// Frames waiting for the guest before new ones are dropped.
const RX_BACKLOG: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP {name}: cannot open /dev/net/tun: {source}")]
    Open {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TAP {name}: TUNSETIFF failed (is the name valid and are you root?): {source}")]
    SetIff {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TAP {name}: cannot bring the link up: {source}")]
    LinkUp {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TAP name {0:?} is empty or longer than 15 bytes")]
    Name(String),
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ifreq(name: &str, flags: libc::c_short) -> IfReq {
    let mut r = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    r
}

#[derive(Debug)]
pub struct Tap {
    name: String,
    file: File,
    rx: Receiver<Vec<u8>>,
    /// Frames in `rx`: the reader counts up, taking counts down.
    queued: Arc<AtomicUsize>,
    pub rx_dropped: Arc<AtomicU64>,
}

impl Tap {
    /// Opens (creating if needed) TAP `name`, brings it up, and starts its reader.
    pub fn open(name: &str, waker: Waker) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(TapError::Name(name.to_string()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|source| TapError::Open {
                name: name.into(),
                source,
            })?;
        let mut req = ifreq(name, IFF_TAP | IFF_NO_PI);
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is (same
        // layout as the kernel's struct ifreq: name then a union of 24 bytes).
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(TapError::SetIff {
                name: name.into(),
                source: std::io::Error::last_os_error(),
            });
        }
        link_up(name).map_err(|source| TapError::LinkUp {
            name: name.into(),
            source,
        })?;
        let mut reader = file.try_clone().map_err(|source| TapError::Open {
            name: name.into(),
            source,
        })?;
        let (tx, rx) = sync_channel(RX_BACKLOG);
        let dropped = Arc::new(AtomicU64::new(0));
        let dropped2 = dropped.clone();
        let queued = Arc::new(AtomicUsize::new(0));
        let queued2 = queued.clone();
        let tname = name.to_string();
        std::thread::Builder::new()
            .name(format!("tap-{name}"))
            .spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            // Counted before it is queued, so taking it
                            // (which counts down) never sees it uncounted.
                            let waiting = queued2.fetch_add(1, Ordering::AcqRel) + 1;
                            match tx.try_send(buf[..n].to_vec()) {
                                Ok(()) => waker.frames_arrived(waiting),
                                Err(TrySendError::Full(_)) => {
                                    queued2.fetch_sub(1, Ordering::AcqRel);
                                    dropped2.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(TrySendError::Disconnected(_)) => break,
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            tracing::error!(tap = %tname, error = %e, "TAP read failed; no more frames will arrive");
                            break;
                        }
                    }
                }
            })
            .map_err(|source| TapError::Open {
                name: name.into(),
                source,
            })?;
        tracing::info!(tap = name, "TAP open");
        Ok(Tap {
            name: name.to_string(),
            file,
            rx,
            queued,
            rx_dropped: dropped,
        })
    }

    /// The next received frame, if any.
    pub fn try_recv(&mut self) -> Option<Vec<u8>> {
        let frame = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        Some(frame)
    }

    /// How many received frames wait.
    pub fn waiting(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Sends a frame; a failed send is a lost packet, as on any network.
    pub fn send(&mut self, frame: &[u8]) {
        send_frame(&self.file, &self.name, frame);
    }

    /// A second handle for sending frames from another thread (the output
    /// gate's), writing to the same device.
    pub fn writer(&self) -> Result<TapWriter, TapError> {
        let file = self.file.try_clone().map_err(|source| TapError::Open {
            name: self.name.clone(),
            source,
        })?;
        Ok(TapWriter {
            name: self.name.clone(),
            file,
        })
    }

    /// Drops every frame received so far (a backup going live must not hand
    /// its guest frames that arrived while it was silent).
    pub fn discard_received(&mut self) -> usize {
        let mut n = 0;
        while self.try_recv().is_some() {
            n += 1;
        }
        n
    }
}

/// The sending half of a [`Tap`].
#[derive(Debug)]
pub struct TapWriter {
    name: String,
    file: File,
}

impl TapWriter {
    /// Another writer on the same TAP (a duplicated descriptor).
    pub fn try_clone(&self) -> std::io::Result<TapWriter> {
        Ok(TapWriter {
            name: self.name.clone(),
            file: self.file.try_clone()?,
        })
    }

    /// Sends a frame; a failed send is a lost packet, as on any network.
    pub fn send(&self, frame: &[u8]) {
        send_frame(&self.file, &self.name, frame);
    }
}

fn send_frame(mut file: &File, name: &str, frame: &[u8]) {
    loop {
        match file.write(frame) {
            // The vCPU thread's kick signal can interrupt the write.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(tap = %name, error = %e, "TAP write failed; frame dropped");
            }
            Ok(_) => {}
        }
        return;
    }
}

fn link_up(name: &str) -> std::io::Result<()> {
    // SAFETY: plain socket(2) call; the fd is owned by `sock` below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let sock = unsafe { File::from_raw_fd(fd) };
    let mut req = ifreq(name, 0);
    // SAFETY: SIOCGIFFLAGS fills the flags field of an ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    req.flags |= libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the flags field of an ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

//! A TAP device: the live world's network. The descriptor is non-blocking
//! and read by the vCPU thread itself: at an exit it takes what arrived
//! (frames are handed to the guest only at exits anyway), and a waiting
//! guest's [`Waker`](crate::replay::live::Waker) polls the descriptor. No
//! reader thread: on this host a thread that blocks in `read` and wakes the
//! vCPU thread per frame cost more CPU per request than the guest's work.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// Frames taken off the TAP and not yet handed to the guest; beyond these
/// they wait in the kernel's queue (which drops when full, as a NIC would).
const RX_BACKLOG: usize = 4096;
/// Largest frame read (the TAP has no offloads: at most the MTU plus headers).
const FRAME_BUF: usize = 65536;

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
    /// Frames read and not yet taken, oldest first.
    rx: VecDeque<Vec<u8>>,
    buf: Vec<u8>,
    /// A read failed: no more frames will arrive (logged once).
    broken: bool,
}

impl Tap {
    /// Opens (creating if needed) TAP `name`, non-blocking, and brings it up.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(TapError::Name(name.to_string()));
        }
        let open_err = |source| TapError::Open {
            name: name.into(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(open_err)?;
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
        // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns.
        let nonblocking = unsafe {
            let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            flags >= 0
                && libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
        };
        if !nonblocking {
            return Err(open_err(std::io::Error::last_os_error()));
        }
        link_up(name).map_err(|source| TapError::LinkUp {
            name: name.into(),
            source,
        })?;
        tracing::info!(tap = name, "TAP open");
        Ok(Tap {
            name: name.to_string(),
            file,
            rx: VecDeque::new(),
            buf: vec![0u8; FRAME_BUF],
            broken: false,
        })
    }

    /// Takes the frames that arrived off the descriptor (up to the backlog).
    fn fill(&mut self) {
        while !self.broken && self.rx.len() < RX_BACKLOG {
            match (&self.file).read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => self.rx.push_back(self.buf[..n].to_vec()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::error!(tap = %self.name, error = %e, "TAP read failed; no more frames will arrive");
                    self.broken = true;
                }
            }
        }
    }

    /// The next received frame, if any.
    pub fn try_recv(&mut self) -> Option<Vec<u8>> {
        if self.rx.is_empty() {
            self.fill();
        }
        self.rx.pop_front()
    }

    /// How many received frames wait (taking what arrived first).
    pub fn waiting(&mut self) -> usize {
        self.fill();
        self.rx.len()
    }

    /// The descriptor to poll for arriving frames.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
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

//! Who is live, seen from the client LAN: a packet capture on the ports
//! through which each site's frames reach the clients. A frame whose source
//! is the guest's MAC, arriving from a site's port, was sent by that site's
//! guest. Two sites sending such frames after one of them took over is a
//! moment with two live sites.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ETH_P_ALL: u16 = 0x0003;
const PACKET_OUTGOING: u8 = 4;

/// Frames from the guest's MAC seen arriving on one port.
#[derive(Debug, Default)]
pub struct Seen {
    pub times: Mutex<Vec<Instant>>,
}

/// A running capture on some ports.
#[derive(Debug)]
pub struct Capture {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    pub ports: Vec<(String, Arc<Seen>)>,
}

#[derive(Debug, thiserror::Error)]
#[error("capture on {iface} in {netns}: {what}: {source}")]
pub struct CaptureError {
    netns: String,
    iface: String,
    what: &'static str,
    #[source]
    source: std::io::Error,
}

fn open(iface: &str) -> Result<OwnedFd, (&'static str, std::io::Error)> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ALL.to_be()),
        )
    };
    if fd < 0 {
        return Err(("socket(AF_PACKET)", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name =
        std::ffi::CString::new(iface).map_err(|e| ("interface name", std::io::Error::other(e)))?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(("if_nametoindex", std::io::Error::last_os_error()));
    }
    // SAFETY: sockaddr_ll is plain old data; zeroed is a valid start.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ALL.to_be();
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(("bind", std::io::Error::last_os_error()));
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: SO_RCVTIMEO takes a timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    if rc != 0 {
        return Err(("SO_RCVTIMEO", std::io::Error::last_os_error()));
    }
    Ok(fd)
}

fn listen(fd: OwnedFd, mac: [u8; 6], seen: Arc<Seen>, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: sockaddr_ll is plain old data.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: `buf` and `from` are valid for the lengths passed.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n < 14 || from.sll_pkttype == PACKET_OUTGOING {
            continue;
        }
        if buf[6..12] == mac {
            seen.times
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Instant::now());
        }
    }
}

impl Capture {
    /// Starts capturing in network namespace `netns` on each of `ports`
    /// (names), keeping frames whose source MAC is `mac`.
    pub fn start(netns: &str, ports: &[String], mac: [u8; 6]) -> Result<Capture, CaptureError> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut out = Vec::new();
        for port in ports {
            let seen = Arc::new(Seen::default());
            let (tx, rx) = std::sync::mpsc::channel();
            let (ns, iface, s, st) = (netns.to_string(), port.clone(), seen.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let opened = super::enter_netns(&ns)
                    .map_err(|e| ("setns", e))
                    .and_then(|()| open(&iface));
                match opened {
                    Ok(fd) => {
                        let _ = tx.send(Ok(()));
                        listen(fd, mac, s, st);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            }));
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(())) => {}
                Ok(Err((what, source))) => {
                    stop.store(true, Ordering::Relaxed);
                    return Err(CaptureError {
                        netns: netns.into(),
                        iface: port.clone(),
                        what,
                        source,
                    });
                }
                Err(_) => {
                    stop.store(true, Ordering::Relaxed);
                    return Err(CaptureError {
                        netns: netns.into(),
                        iface: port.clone(),
                        what: "starting",
                        source: std::io::Error::other("the capture thread did not start"),
                    });
                }
            }
            out.push((port.clone(), seen));
        }
        Ok(Capture {
            stop,
            threads,
            ports: out,
        })
    }

    /// Stops the capture; returns each port's frame times.
    pub fn finish(self) -> Vec<(String, Vec<Instant>)> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.ports
            .into_iter()
            .map(|(p, s)| {
                let v = s.times.lock().unwrap_or_else(|e| e.into_inner()).clone();
                (p, v)
            })
            .collect()
    }
}

/// Frames from `loser`'s port after the first frame from `winner`'s port
/// that came after `fault`: moments with two live sites.
pub fn two_live(winner: &[Instant], loser: &[Instant], fault: Instant) -> usize {
    let Some(first) = winner.iter().filter(|t| **t >= fault).min() else {
        return 0;
    };
    loser.iter().filter(|t| *t > first).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_of_the_old_site_after_the_new_one_spoke_count() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let winner = [at(1), at(50), at(60)];
        let loser = [at(2), at(10), at(55)];
        // The fault at 5 ms: the winner's first frame after it is at 50 ms;
        // the loser's frame at 55 ms is a two-live moment, the ones before not.
        assert_eq!(two_live(&winner, &loser, at(5)), 1);
        assert_eq!(two_live(&[], &loser, at(5)), 0);
    }
}

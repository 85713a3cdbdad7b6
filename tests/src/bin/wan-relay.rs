//! `wan-relay`: a userspace UDP relay that stands in for the WAN between the
//! lab's sites (these machines have no netem). Each route listens on one
//! address and forwards to a target; replies come back the same way. Each
//! direction of a route has its own one-way delay, jitter, loss and block
//! switch, changed at run time through a control socket.
//!
//! ```text
//! wan-relay run --control CTL.sock --route NAME=LISTEN>TARGET [--route ...]
//!               [--delay-ms D] [--jitter-ms J] [--loss P]
//! wan-relay ctl --control CTL.sock set ROUTE|all [fwd|rev|both] delay=MS jitter=MS loss=P
//! wan-relay ctl --control CTL.sock block ROUTE|all [fwd|rev|both]
//! wan-relay ctl --control CTL.sock unblock ROUTE|all [fwd|rev|both]
//! wan-relay ctl --control CTL.sock status
//! ```
//!
//! `fwd` is the direction from whoever sent to LISTEN towards TARGET; `rev`
//! the way back. Packets keep their order in each direction (jitter never
//! reorders: a packet never leaves before the one queued ahead of it). A
//! blocked direction drops silently, as a cut WAN does.

use anyhow::{bail, Context, Result};
use rand::Rng;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UdpSocket, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, Default)]
struct Params {
    delay: Duration,
    jitter: Duration,
    loss: f64,
    blocked: bool,
}

#[derive(Debug, Default)]
struct Direction {
    params: Mutex<Params>,
    packets: AtomicU64,
    bytes: AtomicU64,
    dropped: AtomicU64,
    /// Packets waiting in this direction's pipe.
    queued: AtomicU64,
}

type Packet = (Instant, Vec<u8>, Arc<UdpSocket>, Option<SocketAddr>);

impl Direction {
    fn params(&self) -> Params {
        *self.params.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `data` for sending after this direction's delay, or drops it.
    fn submit(
        &self,
        pipe: &mpsc::UnboundedSender<Packet>,
        data: Vec<u8>,
        socket: Arc<UdpSocket>,
        to: Option<SocketAddr>,
    ) {
        let p = self.params();
        if p.blocked || (p.loss > 0.0 && rand::thread_rng().gen_bool(p.loss.min(1.0))) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut delay = p.delay;
        if !p.jitter.is_zero() {
            let j = rand::thread_rng().gen_range(0..=p.jitter.as_micros() as u64 * 2);
            delay = (delay + Duration::from_micros(j)).saturating_sub(p.jitter);
        }
        self.packets.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        // No delay and nothing queued ahead: send from here. A hop through
        // the pipe task would add a task switch to every packet of a "0 ms"
        // WAN, which the sites would see as round-trip time.
        if delay.is_zero() && self.queued.load(Ordering::Acquire) == 0 {
            let sent = match to {
                Some(a) => socket.try_send_to(&data, a),
                None => socket.try_send(&data),
            };
            if !matches!(&sent, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
                return;
            }
        }
        self.queued.fetch_add(1, Ordering::AcqRel);
        let _ = pipe.send((Instant::now() + delay, data, socket, to));
    }
}

#[derive(Debug)]
struct Route {
    name: String,
    listen: SocketAddr,
    target: SocketAddr,
    fwd: Direction,
    rev: Direction,
}

/// Sends queued packets of one direction of `route` at their due time, in
/// queue order.
fn spawn_pipe(route: Arc<Route>, fwd: bool) -> mpsc::UnboundedSender<Packet> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Packet>();
    tokio::spawn(async move {
        let mut last = Instant::now();
        while let Some((due, data, sock, to)) = rx.recv().await {
            // Never before the packet ahead of it: no reordering.
            let due = due.max(last);
            last = due;
            // tokio's timer rounds every deadline up to the next millisecond
            // tick: a packet already due (no delay set) leaves now, or a
            // "0 ms" WAN would add up to 1 ms each way.
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            let _ = match to {
                Some(a) => sock.send_to(&data, a).await,
                None => sock.send(&data).await,
            };
            let dir = if fwd { &route.fwd } else { &route.rev };
            dir.queued.fetch_sub(1, Ordering::AcqRel);
        }
    });
    tx
}

fn big_buffers(s: &UdpSocket) {
    let sock = socket2::SockRef::from(s);
    let _ = sock.set_recv_buffer_size(8 << 20);
    let _ = sock.set_send_buffer_size(8 << 20);
}

async fn run_route(route: Arc<Route>) -> Result<()> {
    let listen = Arc::new(
        UdpSocket::bind(route.listen)
            .await
            .with_context(|| format!("route {}: binding {}", route.name, route.listen))?,
    );
    big_buffers(&listen);
    let fwd_pipe = spawn_pipe(route.clone(), true);
    let rev_pipe = spawn_pipe(route.clone(), false);
    let mut peers: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = listen.recv_from(&mut buf).await?;
        let up = match peers.get(&from) {
            Some(s) => s.clone(),
            None => {
                let bind: SocketAddr = if route.target.is_ipv4() {
                    "0.0.0.0:0".parse()?
                } else {
                    "[::]:0".parse()?
                };
                let s = Arc::new(UdpSocket::bind(bind).await?);
                big_buffers(&s);
                s.connect(route.target).await?;
                peers.insert(from, s.clone());
                let (r, l, p, back) = (route.clone(), listen.clone(), rev_pipe.clone(), s.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        match back.recv(&mut buf).await {
                            Ok(n) => r.rev.submit(&p, buf[..n].to_vec(), l.clone(), Some(from)),
                            // An ICMP "port unreachable" for an earlier packet (the
                            // target was not listening yet): the path stays up.
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                            Err(e) => {
                                eprintln!("wan-relay: route {}: {e}", r.name);
                                return;
                            }
                        }
                    }
                });
                s
            }
        };
        route.fwd.submit(&fwd_pipe, buf[..n].to_vec(), up, None);
    }
}

fn parse_route(s: &str) -> Result<Route> {
    let (name, rest) = s
        .split_once('=')
        .with_context(|| format!("route {s:?}: expected NAME=LISTEN>TARGET"))?;
    let (listen, target) = rest
        .split_once('>')
        .with_context(|| format!("route {s:?}: expected NAME=LISTEN>TARGET"))?;
    Ok(Route {
        name: name.to_string(),
        listen: listen
            .parse()
            .with_context(|| format!("route {name}: listen {listen:?}"))?,
        target: target
            .parse()
            .with_context(|| format!("route {name}: target {target:?}"))?,
        fwd: Direction::default(),
        rev: Direction::default(),
    })
}

/// Applies one control command; returns the answer line(s).
fn control(routes: &[Arc<Route>], line: &str) -> Result<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some((&cmd, rest)) = words.split_first() else {
        bail!("empty command");
    };
    if cmd == "status" {
        let mut out = String::new();
        for r in routes {
            for (dir, d) in [("fwd", &r.fwd), ("rev", &r.rev)] {
                let p = d.params();
                out.push_str(&format!(
                    "{} {dir} {}>{} delay_ms={} jitter_ms={} loss={} blocked={} packets={} bytes={} dropped={}\n",
                    r.name,
                    r.listen,
                    r.target,
                    p.delay.as_millis(),
                    p.jitter.as_millis(),
                    p.loss,
                    p.blocked,
                    d.packets.load(Ordering::Relaxed),
                    d.bytes.load(Ordering::Relaxed),
                    d.dropped.load(Ordering::Relaxed)
                ));
            }
        }
        return Ok(out);
    }
    let Some((&which, mut rest)) = rest.split_first() else {
        bail!("{cmd}: which route? (a name or `all`)");
    };
    let selected: Vec<&Arc<Route>> = routes
        .iter()
        .filter(|r| which == "all" || which.split(',').any(|w| w == r.name))
        .collect();
    if selected.is_empty() {
        bail!("no route named {which:?}");
    }
    let (fwd, rev) = match rest.first().copied() {
        Some("fwd") => (true, false),
        Some("rev") => (false, true),
        _ => (true, true),
    };
    if matches!(rest.first().copied(), Some("fwd" | "rev" | "both")) {
        rest = &rest[1..];
    }
    let apply = |f: &dyn Fn(&mut Params) -> Result<()>| -> Result<()> {
        for r in &selected {
            for (on, d) in [(fwd, &r.fwd), (rev, &r.rev)] {
                if on {
                    f(&mut d.params.lock().unwrap_or_else(|p| p.into_inner()))?;
                }
            }
        }
        Ok(())
    };
    match cmd {
        "block" => apply(&|p| {
            p.blocked = true;
            Ok(())
        })?,
        "unblock" => apply(&|p| {
            p.blocked = false;
            Ok(())
        })?,
        "set" => {
            for kv in rest {
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("{kv:?}: expected key=value"))?;
                let num: f64 = v
                    .parse()
                    .with_context(|| format!("{k}: {v:?} is not a number"))?;
                if num < 0.0 {
                    bail!("{k}: {v} is negative");
                }
                match k {
                    "delay" | "delay_ms" => apply(&|p| {
                        p.delay = Duration::from_micros((num * 1000.0) as u64);
                        Ok(())
                    })?,
                    "jitter" | "jitter_ms" => apply(&|p| {
                        p.jitter = Duration::from_micros((num * 1000.0) as u64);
                        Ok(())
                    })?,
                    "loss" => {
                        if num > 1.0 {
                            bail!("loss {num} is above 1");
                        }
                        apply(&|p| {
                            p.loss = num;
                            Ok(())
                        })?
                    }
                    other => bail!("unknown setting {other:?} (delay, jitter, loss)"),
                }
            }
        }
        other => bail!("unknown command {other:?} (set, block, unblock, status)"),
    }
    Ok("ok\n".into())
}

async fn serve_control(path: PathBuf, routes: Vec<Arc<Route>>) -> Result<()> {
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("control socket {}", path.display()))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let routes = routes.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            if let Ok(Some(line)) = lines.next_line().await {
                let answer = match control(&routes, &line) {
                    Ok(a) => a,
                    Err(e) => format!("error: {e:#}\n"),
                };
                let _ = w.write_all(answer.as_bytes()).await;
            }
        });
    }
}

async fn ctl(path: PathBuf, words: Vec<String>) -> Result<bool> {
    let mut s = UnixStream::connect(&path)
        .await
        .with_context(|| format!("control socket {}", path.display()))?;
    s.write_all(format!("{}\n", words.join(" ")).as_bytes())
        .await?;
    s.shutdown().await?;
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut answer).await?;
    print!("{answer}");
    Ok(!answer.starts_with("error"))
}

fn usage() -> ! {
    eprintln!(
        "usage: wan-relay run --control SOCK --route NAME=LISTEN>TARGET... [--delay-ms D] [--jitter-ms J] [--loss P]\n       wan-relay ctl --control SOCK (set|block|unblock) ROUTE|all [fwd|rev|both] [delay=MS jitter=MS loss=P] | status"
    );
    std::process::exit(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, rest)) = args.split_first() else {
        usage()
    };
    let mut control_path = None;
    let mut routes = Vec::new();
    let mut initial = Vec::new();
    let mut words = Vec::new();
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_else(|| usage());
        match a.as_str() {
            "--control" => control_path = Some(PathBuf::from(value())),
            "--route" if mode == "run" => routes.push(Arc::new(parse_route(&value())?)),
            "--delay-ms" if mode == "run" => initial.push(format!("delay={}", value())),
            "--jitter-ms" if mode == "run" => initial.push(format!("jitter={}", value())),
            "--loss" if mode == "run" => initial.push(format!("loss={}", value())),
            _ if mode == "ctl" => words.push(a.clone()),
            _ => usage(),
        }
    }
    let Some(control_path) = control_path else {
        usage()
    };
    match mode.as_str() {
        "run" => {
            if routes.is_empty() {
                usage()
            }
            if !initial.is_empty() {
                control(&routes, &format!("set all both {}", initial.join(" ")))?;
            }
            let mut tasks = Vec::new();
            for r in &routes {
                tasks.push(tokio::spawn(run_route(r.clone())));
            }
            tokio::spawn(serve_control(control_path, routes.clone()));
            println!("wan-relay: {} routes up", routes.len());
            for t in tasks {
                t.await??;
            }
            Ok(())
        }
        "ctl" => {
            if !ctl(control_path, words).await? {
                std::process::exit(1);
            }
            Ok(())
        }
        _ => usage(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> Vec<Arc<Route>> {
        vec![Arc::new(
            parse_route("a-b=127.0.0.1:1>127.0.0.1:2").unwrap(),
        )]
    }

    #[test]
    fn control_commands_change_one_direction() {
        let r = routes();
        control(&r, "set a-b fwd delay=20 loss=0.5").unwrap();
        assert_eq!(r[0].fwd.params().delay, Duration::from_millis(20));
        assert_eq!(r[0].rev.params().delay, Duration::ZERO);
        control(&r, "block all rev").unwrap();
        assert!(r[0].rev.params().blocked && !r[0].fwd.params().blocked);
        assert!(control(&r, "set a-b loss=2").is_err());
        assert!(control(&r, "block nowhere").is_err());
        assert!(control(&r, "status").unwrap().contains("a-b fwd"));
    }
}

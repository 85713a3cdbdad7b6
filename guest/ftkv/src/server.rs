//! The server loop: smoltcp TCP, one RESP parser and session per
//! connection, the engine, group commit to the log, and the exits that
//! drive the devices.
//!
//! One iteration:
//!
//! 1. collect device completions (no exit), let smoltcp take in every frame
//!    that arrived;
//! 2. for every connection read what fits, execute every complete command
//!    (pipelining) and **hold** the replies; log records go into one batch;
//! 3. if the batch is not empty: one disk write + FLUSH, **one exit**
//!    (`nop()`); only then are the held replies released (group commit: a
//!    reply to a write, and every reply after it, waits for durability);
//! 4. hand replies to the sockets and let smoltcp queue all TX frames;
//! 5. if the commit's exit brought new requests, go round again without an
//!    exit: the replies just queued leave with the next exit (the next
//!    commit's, usually), after at most one such round. Otherwise one exit:
//!    WAIT until smoltcp's next timer (at most 1 s), which sends the queued
//!    frames first (the VMM services the queues before it performs the
//!    request) and returns when a frame arrives. When the last batch had two
//!    frames or more, the WAIT gathers (`gather_us`, `gather_frames`): the VMM
//!    keeps the guest waiting until as many frames as connections are open
//!    wait, or 100 us passed, so one exit takes a batch.
//!
//! So a batch of reads costs one exit, and under a steady write load a
//! batch with writes costs one too, however many requests and connections
//! it holds.

use alloc::vec;
use alloc::vec::Vec;

use ftkv_core::aof::record_len;
use ftkv_core::resp::{self, Limits};
use ftkv_core::{Engine, Parser, Session};
use ftvm_guest_rt::{heap_stats, nop, now_ns, println, wait_gathering};
use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use crate::aof::Aof;
use crate::net::NetDevice;
use crate::settings::Settings;

/// smoltcp receive and send buffer per connection.
pub const SOCKET_RX: usize = 32 * 1024;
pub const SOCKET_TX: usize = 32 * 1024;
/// Stop executing a connection's commands while this many reply bytes wait
/// to be sent (it reads no more either: TCP flow control pushes back).
pub const OUT_HIGH: usize = 256 * 1024;
/// Below this many listening sockets, TIME-WAIT sockets are reused.
const LISTEN_SPARE: usize = 8;
/// Longest WAIT when nothing is scheduled.
const IDLE_WAIT_NS: u64 = 1_000_000_000;
/// Frames in one batch from which the next WAIT gathers (one frame: a
/// single client in step with us, which gathering would only delay).
const GATHER_FROM: u64 = 2;
/// Expired keys are purged (without logging) this often when idle.
const PURGE_EVERY_MS: u64 = 10_000;

/// Worst-case heap a connection can hold: the parser's buffer (up to
/// `max_buffer`, with Vec growth up to twice that) plus one request being
/// assembled, the reply backlog plus one maximal reply (an EXEC's), its
/// queued transaction and watched keys (a copy in the session and one in
/// the engine), and the socket buffers.
fn worst_case_per_connection(limits: &Limits, engine: &ftkv_core::Config) -> usize {
    2 * limits.max_buffer
        + limits.max_request
        + OUT_HIGH
        + engine.max_exec_reply()
        + engine.max_queued_bytes
        + 2 * engine.max_watched_bytes
        + SOCKET_RX
        + SOCKET_TX
}

#[derive(Default)]
struct Conn {
    /// A connection is attached to the socket (established or closing).
    open: bool,
    parser: Parser,
    /// Protocol version and names of the client (HELLO, CLIENT SETNAME).
    session: Session,
    /// Replies ready to send; `out[out_pos..]` is not yet in the socket.
    out: Vec<u8>,
    out_pos: usize,
    /// Replies of this iteration, released after the log batch is durable.
    held: Vec<u8>,
    held_count: usize,
    /// Close once `out` is sent (QUIT or a protocol error); read no more.
    closing: bool,
    close_sent: bool,
    /// The parser holds no complete command (the last `next_command` said
    /// so): with the peer's side closed, nothing more can come.
    drained: bool,
}

impl Conn {
    fn backlog(&self) -> usize {
        self.out.len() - self.out_pos + self.held.len()
    }

    fn reset(&mut self, limits: Limits) {
        *self = Conn {
            parser: Parser::new(limits),
            ..Conn::default()
        };
    }
}

struct Clock {
    base_ms: u64,
}

impl Clock {
    fn now_ms(&self) -> u64 {
        self.base_ms.saturating_add(now_ns() / 1_000_000)
    }
}

fn smol_now() -> Instant {
    Instant::from_micros((now_ns() / 1000) as i64)
}

struct Server {
    engine: Engine,
    log: Option<Aof>,
    limits: Limits,
    clock: Clock,
    /// Error reply that replaces held replies when the log write failed.
    disk_error_reply: Vec<u8>,
    /// A record could not be made durable (write, flush or append failed).
    log_broken: bool,
    failure_handled: bool,
    commits: u64,
    commands: u64,
    /// Client ids handed out so far (CLIENT ID); a counter, so replay
    /// hands out the same ones.
    clients: u64,
}

pub fn run(settings: Settings, engine: Engine, log: Option<Aof>, mut device: NetDevice) -> i32 {
    let limits = Limits::default();
    let mut seed = [0u8; 8];
    ftvm_guest_rt::entropy(&mut seed);
    let mac = device.mac();
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    // TCP initial sequence numbers and other smoltcp randomness derive from
    // this seed: an input from the platform, so replay sees the same.
    config.random_seed = u64::from_le_bytes(seed);
    let mut iface = Interface::new(config, &mut device, smol_now());
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(settings.ip), settings.prefix));
    });
    if let Some(gw) = settings.gateway {
        if iface.routes_mut().add_default_ipv4_route(gw).is_err() {
            println!("ftkv: could not add the default route via {gw}");
        }
    }

    // As many listening sockets as memory allows for worst-case clients.
    let heap_free = heap_stats().free;
    let reserve = 2 * settings.engine.max_memory + 32 * 1024 * 1024;
    let per_conn = worst_case_per_connection(&limits, &settings.engine);
    let fit = heap_free.saturating_sub(reserve) / per_conn;
    let max_clients = settings.max_clients.min(fit).max(1);
    if max_clients < settings.max_clients {
        println!(
            "ftkv: memory allows {max_clients} of the {} connections asked for ({} KiB worst case each, {} MiB kept for the keyspace)",
            settings.max_clients,
            per_conn >> 10,
            reserve >> 20
        );
    }

    let mut sockets = SocketSet::new(Vec::new());
    let mut conns: Vec<(SocketHandle, Conn)> = Vec::with_capacity(max_clients);
    for _ in 0..max_clients {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; SOCKET_RX]),
            tcp::SocketBuffer::new(vec![0u8; SOCKET_TX]),
        );
        configure(&mut socket);
        if let Err(e) = socket.listen(settings.port) {
            println!("ftkv: listen on port {}: {e:?}", settings.port);
            return 1;
        }
        let handle = sockets.add(socket);
        let mut conn = Conn::default();
        conn.reset(limits);
        conns.push((handle, conn));
    }
    let mut disk_error_reply = Vec::new();
    resp::push_error(&mut disk_error_reply, ftkv_core::engine::errors::DISK_ERROR);

    let mut server = Server {
        engine,
        log,
        limits,
        clock: Clock {
            base_ms: settings.clock_base_ms,
        },
        disk_error_reply,
        log_broken: false,
        failure_handled: false,
        commits: 0,
        commands: 0,
        clients: 0,
    };
    println!(
        "ftkv: {} connections, socket buffers {}+{} KiB, mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, heap used {} KiB",
        max_clients,
        SOCKET_RX >> 10,
        SOCKET_TX >> 10,
        mac[0],
        mac[1],
        mac[2],
        mac[3],
        mac[4],
        mac[5],
        heap_stats().used >> 10
    );
    println!("ftkv: listening on {}:{}", settings.ip, settings.port);

    let mut last_purge_ms = server.clock.now_ms();
    // TX frames are queued that no exit has carried yet, and one round of
    // serving fresh input has already gone by without an exit for them.
    let mut tx_waiting = false;
    let mut tx_deferred = false;
    // Frames smoltcp had taken when the last WAIT began.
    let mut frames_at_wait = device.rx_frames();
    loop {
        // 1. Completions of the last exit; everything that arrived.
        device.reclaim();
        iface.poll(smol_now(), &mut device, &mut sockets);

        // 2. Read and execute; replies are held.
        let now_ms = server.clock.now_ms();
        let open = conns.iter().filter(|(_, c)| c.open).count();
        server.engine.set_connected_clients(open);
        let mut listening = 0;
        for (handle, conn) in conns.iter_mut() {
            let socket = sockets.get_mut::<tcp::Socket>(*handle);
            server.service(conn, socket, settings.port, now_ms);
            listening += usize::from(socket.state() == State::Listen);
        }
        if listening < LISTEN_SPARE {
            recycle_time_wait(&mut sockets, &conns, settings.port);
        }
        let served = device.rx_frames();

        // 3. Group commit: one write + FLUSH, one exit.
        if let Some(log) = server.log.as_mut() {
            if log.has_pending() && !server.log_broken {
                server.commits += 1;
                // This exit also carries the TX frames queued so far.
                tx_waiting = false;
                tx_deferred = false;
                if let Err(e) = log.commit() {
                    println!("ftkv: log write failed: {e}; refusing writes from now on");
                    server.log_broken = true;
                }
            }
        }
        if server.log_broken && !server.failure_handled {
            server.write_failed(&mut conns);
            server.failure_handled = true;
        }

        // 4. Release replies into the sockets; queue all TX frames.
        for (handle, conn) in conns.iter_mut() {
            let socket = sockets.get_mut::<tcp::Socket>(*handle);
            release(conn, socket);
        }
        let now = smol_now();
        iface.poll(now, &mut device, &mut sockets);
        for _ in 0..4096 {
            if matches!(
                iface.poll_egress(now, &mut device, &mut sockets),
                PollResult::None
            ) {
                break;
            }
        }

        // 5. One exit, unless input is already here: frames that the commit
        // exit brought were taken by the poll above after the connections
        // were served, so serve them first. Replies queued meanwhile wait
        // for at most one such round; the next exit (a commit's included,
        // which saves the exit of its own) carries them.
        tx_waiting |= device.take_queued() > 0;
        let unserved = device.rx_frames() != served;
        if unserved && !(tx_waiting && tx_deferred) {
            tx_deferred = tx_waiting;
            continue;
        }
        tx_waiting = false;
        tx_deferred = false;
        // Requests already in the sockets must not sit through a WAIT.
        if unserved || device.rx_pending() {
            nop();
            continue;
        }
        let now = smol_now();
        let deadline_ns = match iface.poll_at(now, &sockets) {
            Some(at) if at <= now => {
                nop();
                continue;
            }
            Some(at) => (at.total_micros() as u64).saturating_mul(1000),
            None => u64::MAX,
        };
        let deadline_ns = deadline_ns.min(now_ns().saturating_add(IDLE_WAIT_NS));
        // The WAIT sends the queued frames first (the VMM services the
        // queues before it acts). Under load, when the last batch had
        // frames from more than one request, it gathers: the VMM holds the
        // guest until `gather_frames` frames wait or `gather_us` passed, so
        // one exit (about 30 us) serves a batch instead of a few frames.
        let batch = device.rx_frames() - frames_at_wait;
        let (window_ns, frames) = if batch >= GATHER_FROM {
            // By default, until every open connection could have sent again.
            let frames = match settings.gather_frames {
                0 => open.max(1) as u64,
                n => n,
            };
            (settings.gather_ns, frames)
        } else {
            (0, 0)
        };
        let input = wait_gathering(deadline_ns, window_ns, frames);
        frames_at_wait = device.rx_frames();
        if !input {
            // Woken by the deadline: a good moment for housekeeping.
            let now_ms = server.clock.now_ms();
            if now_ms.saturating_sub(last_purge_ms) >= PURGE_EVERY_MS {
                server.engine.purge_expired(now_ms);
                last_purge_ms = now_ms;
            }
        }
    }
}

/// A socket is one connection slot, and smoltcp keeps a socket that closed
/// first in TIME-WAIT for 10 s. When fewer than `LISTEN_SPARE` slots are
/// listening, TIME-WAIT sockets are put back to listening at once (their
/// final ACK has gone out with an earlier poll; a retransmitted FIN from
/// the peer would now get a RST, which ends its side just the same).
fn recycle_time_wait(sockets: &mut SocketSet<'_>, conns: &[(SocketHandle, Conn)], port: u16) {
    for (handle, _) in conns {
        let socket = sockets.get_mut::<tcp::Socket>(*handle);
        if socket.state() == State::TimeWait {
            socket.abort();
            let _ = socket.listen(port);
        }
    }
}

fn configure(socket: &mut tcp::Socket) {
    // Replies are whole; do not wait to coalesce them.
    socket.set_nagle_enabled(false);
    // Find clients that vanished without a FIN or RST.
    socket.set_keep_alive(Some(Duration::from_secs(60)));
    socket.set_timeout(Some(Duration::from_secs(180)));
}

/// Moves held replies to the output and puts as much as fits into the
/// socket; closes the connection once a closing reply is out.
fn release(conn: &mut Conn, socket: &mut tcp::Socket) {
    if !conn.open {
        return;
    }
    if !conn.held.is_empty() {
        if conn.out_pos == conn.out.len() {
            conn.out.clear();
            conn.out_pos = 0;
        }
        conn.out.extend_from_slice(&conn.held);
        conn.held.clear();
        conn.held_count = 0;
    }
    if socket.may_send() {
        while conn.out_pos < conn.out.len() {
            match socket.send_slice(&conn.out[conn.out_pos..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => conn.out_pos += n,
            }
        }
    } else {
        // The peer can no longer receive (reset, or we already closed).
        conn.out_pos = conn.out.len();
    }
    if conn.out_pos == conn.out.len() {
        conn.out.clear();
        conn.out_pos = 0;
        if conn.out.capacity() > OUT_HIGH {
            conn.out = Vec::new();
        }
    } else if conn.out_pos >= 64 * 1024 {
        conn.out.drain(..conn.out_pos);
        conn.out_pos = 0;
    }
    // The peer closed its side and everything it sent was executed: a
    // partial command left in the parser can never complete (Redis drops
    // it too).
    let peer_done = !socket.may_recv() && !socket.can_recv() && conn.drained;
    if (conn.closing || peer_done) && conn.out.is_empty() && !conn.close_sent {
        socket.close();
        conn.close_sent = true;
    }
}

impl Server {
    /// Attaches/detaches the connection state to the socket's lifecycle,
    /// reads what fits and executes every complete command.
    fn service(&mut self, conn: &mut Conn, socket: &mut tcp::Socket, port: u16, now_ms: u64) {
        match socket.state() {
            State::Closed => {
                self.close(conn);
                // Back to listening for the next client.
                let _ = socket.listen(port);
                return;
            }
            State::Listen | State::SynReceived | State::SynSent | State::TimeWait => {
                self.close(conn);
                return;
            }
            _ if !conn.open => {
                conn.open = true;
                self.clients += 1;
                conn.session = Session::new(self.clients);
            }
            _ => {}
        }
        loop {
            // Execute what is buffered, within the reply backlog.
            conn.drained = false;
            while !conn.closing && conn.backlog() < OUT_HIGH {
                match conn.parser.next_command() {
                    Ok(Some(args)) => self.execute(conn, &args, now_ms),
                    Ok(None) => {
                        conn.drained = true;
                        break;
                    }
                    Err(e) => {
                        conn.held.extend_from_slice(&e.reply());
                        conn.held_count += 1;
                        conn.closing = true;
                    }
                }
            }
            if conn.closing || conn.backlog() >= OUT_HIGH || !socket.can_recv() {
                return;
            }
            let room = conn.parser.room();
            if room == 0 {
                return;
            }
            let fed = socket.recv(|data| {
                let n = data.len().min(room);
                (n, conn.parser.feed(&data[..n]).map(|()| n))
            });
            match fed {
                Ok(Ok(n)) if n > 0 => {}
                Ok(Ok(_)) | Err(_) => return,
                Ok(Err(e)) => {
                    conn.held.extend_from_slice(&e.reply());
                    conn.held_count += 1;
                    conn.closing = true;
                    return;
                }
            }
        }
    }

    /// The connection ended: its slot waits for the next one, and the
    /// engine forgets its transaction and watches.
    fn close(&mut self, conn: &mut Conn) {
        if conn.open {
            self.engine.end_session(&mut conn.session);
            conn.reset(self.limits);
        }
    }

    fn execute(&mut self, conn: &mut Conn, args: &[Vec<u8>], now_ms: u64) {
        self.commands += 1;
        let exec = self.engine.execute(&mut conn.session, args, now_ms);
        if let Some(payload) = &exec.log {
            if let Some(log) = self.log.as_mut() {
                if let Err(e) = log.append(payload) {
                    // The change is in memory but cannot be made durable.
                    println!(
                        "ftkv: cannot log a record of {} bytes: {e}",
                        record_len(payload.len())
                    );
                    self.engine.set_write_error(true);
                    self.log_broken = true;
                    conn.held.extend_from_slice(&self.disk_error_reply);
                    conn.held_count += 1;
                    return;
                }
            }
        }
        conn.held.extend_from_slice(&exec.reply);
        conn.held_count += 1;
        if exec.close {
            conn.closing = true;
        }
    }

    /// A log write failed: nothing held may be acknowledged. Every held
    /// reply becomes an error (the count per connection is kept, so
    /// pipelined clients stay in step), writes are refused from now on, and
    /// the keyspace is rebuilt from what the disk holds.
    fn write_failed(&mut self, conns: &mut [(SocketHandle, Conn)]) {
        self.engine.set_write_error(true);
        for (_, conn) in conns.iter_mut() {
            if conn.held_count > 0 {
                conn.held.clear();
                for _ in 0..conn.held_count {
                    conn.held.extend_from_slice(&self.disk_error_reply);
                }
            }
        }
        let mut engine = Engine::new(*self.engine.config());
        if let Some(log) = self.log.as_mut() {
            match log.reload(&mut engine) {
                Ok(records) => println!("ftkv: keyspace rebuilt from {records} durable records"),
                Err(e) => {
                    println!("ftkv: rebuilding the keyspace from the disk failed: {e}");
                    ftvm_guest_rt::power_off(3);
                }
            }
        }
        engine.set_write_error(true);
        engine.set_log_budget(Some(0));
        // The open connections' watches stay counted, and every pending
        // EXEC with WATCH aborts: the keyspace changed under them.
        engine.take_watches(&mut self.engine);
        self.engine = engine;
    }
}

//! The drill's client load: real Redis clients (the `redis` crate) on
//! long-lived connections through the service address, writing and reading
//! while the fault happens. Every operation is recorded with its start and
//! end, for the linearizability check, the lost-write count and the plot.
//!
//! Each client writes its own keys (so "the last acknowledged write of a
//! key" is well defined: writes to a key are sequential) and reads and
//! writes a few shared keys (so concurrent histories are checked too).

use super::linearizable::{Op, OpKind};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One recorded operation.
#[derive(Debug, Clone)]
pub struct Record {
    pub client: usize,
    pub key: String,
    pub start: Instant,
    /// `None`: no answer (the connection broke, or the load stopped first).
    pub end: Option<Instant>,
    pub write: Option<String>,
    /// For a read that answered: the value read.
    pub read: Option<Option<String>>,
    pub error: Option<String>,
}

/// The shared result of a load run.
#[derive(Debug, Default)]
pub struct History {
    pub records: Mutex<Vec<Record>>,
    /// Connections that failed and had to be opened again.
    pub broken: AtomicU64,
}

/// A load running in the background.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    pub history: Arc<History>,
    pub started: Instant,
}

/// Shared keys every client reads and writes.
pub const SHARED_KEYS: usize = 4;

fn connect(url: &str) -> redis::RedisResult<redis::Connection> {
    let c = redis::Client::open(url)?;
    let con = c.get_connection_with_timeout(Duration::from_secs(30))?;
    // Long: a failover stalls replies for seconds; only a hang should end a call.
    con.set_read_timeout(Some(Duration::from_secs(60)))?;
    con.set_write_timeout(Some(Duration::from_secs(60)))?;
    Ok(con)
}

fn client_loop(
    id: usize,
    url: String,
    prefix: String,
    seed: u64,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (id as u64) << 32);
    let mut con = None;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let c = match con.as_mut() {
            Some(c) => c,
            None => match connect(&url) {
                Ok(c) => con.insert(c),
                Err(e) => {
                    tracing::debug!(client = id, error = %e, "connect failed");
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            },
        };
        n += 1;
        let shared = rng.gen_bool(0.3);
        let key = if shared {
            format!("{prefix}:shared:{}", rng.gen_range(0..SHARED_KEYS))
        } else {
            format!("{prefix}:c{id}:{}", rng.gen_range(0..4))
        };
        let write = rng.gen_bool(0.7).then(|| format!("c{id}-{n}"));
        let start = Instant::now();
        let result: redis::RedisResult<Option<String>> = match &write {
            Some(v) => redis::cmd("SET")
                .arg(&key)
                .arg(v)
                .query::<String>(c)
                .map(|_| None),
            None => redis::cmd("GET").arg(&key).query(c),
        };
        let mut rec = Record {
            client: id,
            key,
            start,
            end: None,
            read: None,
            write: write.clone(),
            error: None,
        };
        match result {
            Ok(v) => {
                rec.end = Some(Instant::now());
                if write.is_none() {
                    rec.read = Some(v);
                }
            }
            Err(e) => {
                // An error answer from the server ("-ERR ...") is an answer
                // of its own; anything else broke the connection, and the
                // operation's effect is unknown.
                if e.kind() == redis::ErrorKind::Io || e.is_connection_dropped() || e.is_timeout() {
                    history.broken.fetch_add(1, Ordering::Relaxed);
                    con = None;
                } else {
                    rec.end = Some(Instant::now());
                }
                rec.error = Some(e.to_string());
            }
        }
        history
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(rec);
        // A little think time keeps each key's history checkable.
        std::thread::sleep(Duration::from_micros(rng.gen_range(500..3000)));
    }
}

impl Load {
    /// Starts `clients` clients against `service` (host:port), each thread
    /// in network namespace `netns` when one is given. Keys start with
    /// `prefix`, new to the service: every key starts out absent.
    pub fn start(
        service: &str,
        netns: Option<&str>,
        clients: usize,
        prefix: &str,
        seed: u64,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let history = Arc::new(History::default());
        let url = format!("redis://{service}/");
        let threads = (0..clients)
            .map(|id| {
                let (url, h, st, ns, p) = (
                    url.clone(),
                    history.clone(),
                    stop.clone(),
                    netns.map(str::to_string),
                    prefix.to_string(),
                );
                std::thread::spawn(move || {
                    if let Some(ns) = ns {
                        if let Err(e) = super::enter_netns(&ns) {
                            tracing::error!(netns = %ns, error = %e, "drill client cannot enter the client namespace");
                            return;
                        }
                    }
                    client_loop(id, url, p, seed, h, st);
                })
            })
            .collect();
        Load {
            stop,
            threads,
            history,
            started: Instant::now(),
        }
    }

    /// Stops the clients (each finishes its operation in flight).
    pub fn stop(self) -> Arc<History> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.history
    }
}

/// A read after the load: key, when it was sent, the value, when it came.
pub type FinalRead = (String, Instant, Option<String>, Instant);

/// Reads every key the load touched, on fresh connections from `netns`.
pub fn final_reads(
    service: &str,
    netns: Option<&str>,
    keys: Vec<String>,
) -> Result<Vec<FinalRead>, String> {
    let url = format!("redis://{service}/");
    let ns = netns.map(str::to_string);
    std::thread::spawn(move || {
        if let Some(ns) = ns {
            super::enter_netns(&ns).map_err(|e| e.to_string())?;
        }
        let mut con = connect(&url).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for k in keys {
            let start = Instant::now();
            let v: Option<String> = redis::cmd("GET")
                .arg(&k)
                .query(&mut con)
                .map_err(|e| format!("final read of {k}: {e}"))?;
            out.push((k, start, v, Instant::now()));
        }
        Ok(out)
    })
    .join()
    .map_err(|_| "the final reader panicked".to_string())?
}

/// Per-key register histories for the checker (times in ns from `t0`).
pub fn histories(records: &[Record], t0: Instant) -> HashMap<String, Vec<Op>> {
    let us = |t: Instant| t.saturating_duration_since(t0).as_nanos() as u64;
    let mut out: HashMap<String, Vec<Op>> = HashMap::new();
    for r in records {
        let kind = match (&r.write, &r.read) {
            (Some(v), _) => OpKind::Write(v.clone()),
            (None, Some(v)) => OpKind::Read(v.clone()),
            // A read without an answer constrains nothing.
            (None, None) => continue,
        };
        // A write answered with an error did not happen.
        if r.write.is_some() && r.end.is_some() && r.error.is_some() {
            continue;
        }
        out.entry(r.key.clone()).or_default().push(Op {
            call: us(r.start),
            ret: r.end.map(us),
            kind,
        });
    }
    out
}

/// Acknowledged writes whose value is gone: for each client-owned key, the
/// final value must be the last acknowledged write or a later one that got
/// no answer.
pub fn lost_writes(records: &[Record], finals: &HashMap<String, Option<String>>) -> u64 {
    let mut lost = 0;
    let mut by_key: HashMap<&str, Vec<&Record>> = HashMap::new();
    for r in records
        .iter()
        .filter(|r| r.write.is_some() && !r.key.contains(":shared:"))
    {
        by_key.entry(&r.key).or_default().push(r);
    }
    for (key, mut ws) in by_key {
        ws.sort_by_key(|r| r.start);
        let Some(last_acked) = ws
            .iter()
            .rposition(|r| r.end.is_some() && r.error.is_none())
        else {
            continue;
        };
        let allowed: Vec<&str> = ws[last_acked..]
            .iter()
            .filter(|r| r.error.is_none() || r.end.is_none())
            .filter_map(|r| r.write.as_deref())
            .collect();
        let fin = finals.get(key).cloned().flatten();
        if !fin.as_deref().is_some_and(|f| allowed.contains(&f)) {
            lost += 1;
        }
    }
    lost
}

//! The keyspace and the commands.
//!
//! [`Engine::execute`] runs one command at the time `now_ms` given by the
//! caller (the engine never reads a clock, so it is deterministic) and
//! returns the reply and, for a command that changed state, the payload of
//! the log record that reproduces the change. The glue appends the record
//! to the log, makes it durable (virtio-blk FLUSH), and only then sends the
//! reply (see `docs/ftkv.md`).
//!
//! Log records describe the resulting state, not the command: `INCR` is
//! logged as "set k to 11 with expiry E", `SET ... EX 10` with the absolute
//! expiry time, `SET NX` on an existing key not at all. Replaying them
//! ([`Engine::apply_record`]) never consults the clock.

use crate::aof;
use crate::resp::{
    parse_i64, push_array_len, push_bulk, push_error, push_error_bytes, push_int, push_null,
    push_simple,
};
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;

/// Bytes charged per key on top of the key and value lengths, for memory
/// accounting (map node, vector headers).
pub const ENTRY_OVERHEAD: usize = 64;

/// Engine settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Writes that would grow the accounted memory past this are refused
    /// with `-OOM`. Default 64 MiB.
    pub max_memory: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_memory: 64 * 1024 * 1024,
        }
    }
}

/// The outcome of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execution {
    /// RESP bytes to send to the client.
    pub reply: Vec<u8>,
    /// For a command that changed state: the log record payload
    /// ([`crate::aof::LogWriter::append`]). The reply must not be sent
    /// before the record is durable.
    pub log: Option<Vec<u8>>,
    /// Close the connection after sending the reply (`QUIT`).
    pub close: bool,
}

impl Execution {
    fn reply(reply: Vec<u8>) -> Self {
        Execution {
            reply,
            log: None,
            close: false,
        }
    }

    fn error(message: &str) -> Self {
        let mut r = Vec::new();
        push_error(&mut r, message);
        Self::reply(r)
    }

    fn ok() -> Self {
        let mut r = Vec::new();
        push_simple(&mut r, "OK");
        Self::reply(r)
    }
}

/// Error replies used in more than one place (without the leading `-`).
pub mod errors {
    pub const NOT_INTEGER: &str = "ERR value is not an integer or out of range";
    pub const OVERFLOW: &str = "ERR increment or decrement would overflow";
    pub const SYNTAX: &str = "ERR syntax error";
    pub const OOM: &str = "OOM command not allowed when used memory > 'maxmemory'.";
    pub const DISK_FULL: &str = "ERR disk full";
    pub const DISK_ERROR: &str = "ERR disk error: writes are refused";
    pub const INVALID_EXPIRE_SET: &str = "ERR invalid expire time in 'set' command";
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    value: Vec<u8>,
    /// Absolute time in ms after which the key no longer exists.
    expire_at: Option<u64>,
}

fn entry_size(key: &[u8], value: &[u8]) -> usize {
    ENTRY_OVERHEAD + key.len() + value.len()
}

/// A change to the keyspace: what a log record holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mutation {
    Set {
        key: Vec<u8>,
        value: Vec<u8>,
        expire_at: Option<u64>,
    },
    MSet(Vec<(Vec<u8>, Vec<u8>)>),
    Del(Vec<Vec<u8>>),
    FlushAll,
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    commands: u64,
    hits: u64,
    misses: u64,
    expired: u64,
}

/// The ftkv keyspace: strings only, one database.
#[derive(Debug)]
pub struct Engine {
    config: Config,
    map: BTreeMap<Vec<u8>, Entry>,
    used_memory: usize,
    /// Keys that have an expiry (for DBSIZE and INFO).
    with_expiry: usize,
    /// Bytes left in the log (None: not limited).
    log_budget: Option<u64>,
    write_error: bool,
    connected_clients: usize,
    stats: Stats,
}

impl Default for Engine {
    fn default() -> Self {
        Self::new(Config::default())
    }
}

type Handler = fn(&mut Engine, &[Vec<u8>], u64) -> Execution;

struct Spec {
    name: &'static str,
    /// Like Redis: n > 0 exactly n arguments (name included), n < 0 at least -n.
    arity: i32,
    handler: Handler,
}

const COMMANDS: &[Spec] = &[
    Spec {
        name: "ping",
        arity: -1,
        handler: Engine::cmd_ping,
    },
    Spec {
        name: "echo",
        arity: 2,
        handler: Engine::cmd_echo,
    },
    Spec {
        name: "get",
        arity: 2,
        handler: Engine::cmd_get,
    },
    Spec {
        name: "set",
        arity: -3,
        handler: Engine::cmd_set,
    },
    Spec {
        name: "del",
        arity: -2,
        handler: Engine::cmd_del,
    },
    Spec {
        name: "exists",
        arity: -2,
        handler: Engine::cmd_exists,
    },
    Spec {
        name: "incr",
        arity: 2,
        handler: Engine::cmd_incr,
    },
    Spec {
        name: "decr",
        arity: 2,
        handler: Engine::cmd_decr,
    },
    Spec {
        name: "incrby",
        arity: 3,
        handler: Engine::cmd_incrby,
    },
    Spec {
        name: "decrby",
        arity: 3,
        handler: Engine::cmd_decrby,
    },
    Spec {
        name: "mget",
        arity: -2,
        handler: Engine::cmd_mget,
    },
    Spec {
        name: "mset",
        arity: -3,
        handler: Engine::cmd_mset,
    },
    Spec {
        name: "ttl",
        arity: 2,
        handler: Engine::cmd_ttl,
    },
    Spec {
        name: "pttl",
        arity: 2,
        handler: Engine::cmd_pttl,
    },
    Spec {
        name: "dbsize",
        arity: 1,
        handler: Engine::cmd_dbsize,
    },
    Spec {
        name: "flushall",
        arity: -1,
        handler: Engine::cmd_flushall,
    },
    Spec {
        name: "flushdb",
        arity: -1,
        handler: Engine::cmd_flushall,
    },
    Spec {
        name: "info",
        arity: -1,
        handler: Engine::cmd_info,
    },
    Spec {
        name: "command",
        arity: -1,
        handler: Engine::cmd_command,
    },
    Spec {
        name: "config",
        arity: -2,
        handler: Engine::cmd_config,
    },
    Spec {
        name: "select",
        arity: 2,
        handler: Engine::cmd_select,
    },
    Spec {
        name: "client",
        arity: -2,
        handler: Engine::cmd_client,
    },
    Spec {
        name: "quit",
        arity: -1,
        handler: Engine::cmd_quit,
    },
];

impl Engine {
    pub fn new(config: Config) -> Self {
        Engine {
            config,
            map: BTreeMap::new(),
            used_memory: 0,
            with_expiry: 0,
            log_budget: None,
            write_error: false,
            connected_clients: 0,
            stats: Stats::default(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Sets how many log bytes are left on the disk (`None`: unlimited).
    /// Each logged write then consumes [`aof::record_len`] of its payload;
    /// a write whose record does not fit is refused with `-ERR disk full`
    /// before it changes anything. Set it from
    /// [`aof::LogWriter::remaining`] after boot.
    pub fn set_log_budget(&mut self, bytes: Option<u64>) {
        self.log_budget = bytes;
    }

    /// Bytes left in the log, if limited.
    pub fn log_budget(&self) -> Option<u64> {
        self.log_budget
    }

    /// After a log write or flush failed, refuse every write with
    /// `-ERR disk error` (reads go on). The glue should also rebuild the
    /// keyspace from the log on disk, because the failed record's change is
    /// in memory but not durable (see `docs/ftkv.md`).
    pub fn set_write_error(&mut self, failed: bool) {
        self.write_error = failed;
    }

    /// For INFO: the number of open client connections.
    pub fn set_connected_clients(&mut self, n: usize) {
        self.connected_clients = n;
    }

    /// Accounted memory in bytes.
    pub fn used_memory(&self) -> usize {
        self.used_memory
    }

    /// Keys that exist at `now_ms` (expired keys not yet removed excluded).
    pub fn dbsize(&self, now_ms: u64) -> usize {
        if self.with_expiry == 0 {
            return self.map.len();
        }
        self.map.values().filter(|e| !is_expired(e, now_ms)).count()
    }

    /// The value of `key` at `now_ms`, without side effects.
    pub fn peek(&self, key: &[u8], now_ms: u64) -> Option<&[u8]> {
        self.map
            .get(key)
            .filter(|e| !is_expired(e, now_ms))
            .map(|e| e.value.as_slice())
    }

    /// Every stored entry (key, value, absolute expiry), in key order,
    /// including expired entries not yet removed.
    pub fn entries(&self) -> impl Iterator<Item = (&[u8], &[u8], Option<u64>)> {
        self.map
            .iter()
            .map(|(k, e)| (k.as_slice(), e.value.as_slice(), e.expire_at))
    }

    /// Removes every key expired at `now_ms` (call after replay at boot, and
    /// from time to time: expiry is otherwise lazy). Deterministic: depends
    /// only on `now_ms`. Not logged: replay gives the same keys, expired.
    pub fn purge_expired(&mut self, now_ms: u64) -> usize {
        if self.with_expiry == 0 {
            return 0;
        }
        let dead: Vec<Vec<u8>> = self
            .map
            .iter()
            .filter(|(_, e)| is_expired(e, now_ms))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &dead {
            self.remove(k);
        }
        self.stats.expired += dead.len() as u64;
        dead.len()
    }

    /// Applies one log record payload (replay at boot). The payload is fully
    /// decoded and checked before anything changes. The memory limit is not
    /// applied: a logged write was acknowledged and must come back.
    pub fn apply_record(&mut self, payload: &[u8]) -> Result<(), aof::RecordError> {
        let m = aof::decode_mutation(payload)?;
        self.apply(m);
        Ok(())
    }

    /// Runs one command at time `now_ms` (ms on a clock that never goes back,
    /// also across restarts: absolute expiry times are stored in the log).
    pub fn execute(&mut self, args: &[Vec<u8>], now_ms: u64) -> Execution {
        self.stats.commands += 1;
        let Some(name) = args.first() else {
            return Execution::error("ERR empty command");
        };
        let Some(spec) = COMMANDS
            .iter()
            .find(|s| name.eq_ignore_ascii_case(s.name.as_bytes()))
        else {
            return unknown_command(args);
        };
        let n = args.len() as i32;
        if (spec.arity > 0 && n != spec.arity) || (spec.arity < 0 && n < -spec.arity) {
            return wrong_arity(spec.name);
        }
        (spec.handler)(self, args, now_ms)
    }

    // ---- keyspace primitives ----

    /// The entry for `key` if it exists at `now`; removes it if expired.
    fn live(&mut self, key: &[u8], now: u64) -> Option<&Entry> {
        if self.map.get(key).is_some_and(|e| is_expired(e, now)) {
            self.remove(key);
            self.stats.expired += 1;
            return None;
        }
        self.map.get(key)
    }

    fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let e = self.map.remove(key)?;
        self.used_memory -= entry_size(key, &e.value);
        if e.expire_at.is_some() {
            self.with_expiry -= 1;
        }
        Some(e)
    }

    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>, expire_at: Option<u64>) {
        self.remove(&key);
        self.used_memory += entry_size(&key, &value);
        if expire_at.is_some() {
            self.with_expiry += 1;
        }
        self.map.insert(key, Entry { value, expire_at });
    }

    fn apply(&mut self, m: Mutation) {
        match m {
            Mutation::Set {
                key,
                value,
                expire_at,
            } => self.insert(key, value, expire_at),
            Mutation::MSet(pairs) => {
                for (k, v) in pairs {
                    self.insert(k, v, None);
                }
            }
            Mutation::Del(keys) => {
                for k in keys {
                    self.remove(&k);
                }
            }
            Mutation::FlushAll => {
                self.map.clear();
                self.used_memory = 0;
                self.with_expiry = 0;
            }
        }
    }

    /// Memory the mutation would add (0 if it frees memory).
    fn growth(&self, m: &Mutation) -> usize {
        let old = |k: &[u8]| self.map.get(k).map_or(0, |e| entry_size(k, &e.value));
        match m {
            Mutation::Set { key, value, .. } => entry_size(key, value).saturating_sub(old(key)),
            Mutation::MSet(pairs) => {
                // The last value of each key wins.
                let mut last: BTreeMap<&[u8], usize> = BTreeMap::new();
                for (k, v) in pairs {
                    last.insert(k, entry_size(k, v));
                }
                let new: usize = last.values().sum();
                let old: usize = last.keys().map(|k| old(k)).sum();
                new.saturating_sub(old)
            }
            Mutation::Del(_) | Mutation::FlushAll => 0,
        }
    }

    /// Checks limits, logs and applies a mutation; `reply` is sent on success.
    fn commit(&mut self, m: Mutation, reply: Vec<u8>) -> Execution {
        if self.write_error {
            return Execution::error(errors::DISK_ERROR);
        }
        let growth = self.growth(&m);
        if growth > 0 && self.used_memory.saturating_add(growth) > self.config.max_memory {
            return Execution::error(errors::OOM);
        }
        let payload = aof::encode_mutation(&m);
        let need = aof::record_len(payload.len());
        if payload.len() > aof::MAX_PAYLOAD {
            return Execution::error("ERR request too large for one log record");
        }
        if let Some(budget) = self.log_budget {
            if need > budget {
                return Execution::error(errors::DISK_FULL);
            }
            self.log_budget = Some(budget - need);
        }
        self.apply(m);
        Execution {
            reply,
            log: Some(payload),
            close: false,
        }
    }

    // ---- commands ----

    fn cmd_ping(&mut self, args: &[Vec<u8>], _now: u64) -> Execution {
        let mut r = Vec::new();
        match args {
            [_] => push_simple(&mut r, "PONG"),
            [_, msg] => push_bulk(&mut r, msg),
            _ => return wrong_arity("ping"),
        }
        Execution::reply(r)
    }

    fn cmd_echo(&mut self, args: &[Vec<u8>], _now: u64) -> Execution {
        let mut r = Vec::new();
        push_bulk(&mut r, &args[1]);
        Execution::reply(r)
    }

    fn cmd_get(&mut self, args: &[Vec<u8>], now: u64) -> Execution {
        let mut r = Vec::new();
        self.push_value(&mut r, &args[1], now);
        Execution::reply(r)
    }

    fn push_value(&mut self, r: &mut Vec<u8>, key: &[u8], now: u64) {
        match self.live(key, now) {
            Some(e) => {
                push_bulk(r, &e.value);
                self.stats.hits += 1;
            }
            None => {
                push_null(r);
                self.stats.misses += 1;
            }
        }
    }

    fn cmd_set(&mut self, args: &[Vec<u8>], now: u64) -> Execution {
        #[derive(PartialEq)]
        enum Cond {
            Always,
            Nx,
            Xx,
        }
        #[derive(PartialEq)]
        enum Ttl {
            Clear,
            Keep,
            At(u64),
        }
        let mut cond = Cond::Always;
        let mut ttl = Ttl::Clear;
        let mut ttl_given = false;
        let mut i = 3;
        while i < args.len() {
            let opt = args[i].to_ascii_uppercase();
            match opt.as_slice() {
                b"NX" if cond != Cond::Xx => cond = Cond::Nx,
                b"XX" if cond != Cond::Nx => cond = Cond::Xx,
                b"KEEPTTL" if !ttl_given => {
                    ttl = Ttl::Keep;
                    ttl_given = true;
                }
                b"EX" | b"PX" | b"EXAT" | b"PXAT" if !ttl_given && i + 1 < args.len() => {
                    let Some(n) = parse_i64(&args[i + 1]) else {
                        return Execution::error(errors::NOT_INTEGER);
                    };
                    if n <= 0 {
                        return Execution::error(errors::INVALID_EXPIRE_SET);
                    }
                    let n = n as u64;
                    let at = match opt.as_slice() {
                        b"EX" => n.checked_mul(1000).and_then(|ms| ms.checked_add(now)),
                        b"PX" => n.checked_add(now),
                        b"EXAT" => n.checked_mul(1000),
                        _ => Some(n),
                    };
                    match at {
                        Some(at) if at <= i64::MAX as u64 => ttl = Ttl::At(at),
                        _ => return Execution::error(errors::INVALID_EXPIRE_SET),
                    }
                    ttl_given = true;
                    i += 1;
                }
                _ => return Execution::error(errors::SYNTAX),
            }
            i += 1;
        }
        let key = &args[1];
        let existing = self.live(key, now).map(|e| e.expire_at);
        let proceed = match cond {
            Cond::Always => true,
            Cond::Nx => existing.is_none(),
            Cond::Xx => existing.is_some(),
        };
        if !proceed {
            let mut r = Vec::new();
            push_null(&mut r);
            return Execution::reply(r);
        }
        let expire_at = match ttl {
            Ttl::Clear => None,
            Ttl::Keep => existing.flatten(),
            Ttl::At(at) => Some(at),
        };
        let mut r = Vec::new();
        push_simple(&mut r, "OK");
        self.commit(
            Mutation::Set {
                key: key.clone(),
                value: args[2].clone(),
                expire_at,
            },
            r,
        )
    }

    fn cmd_del(&mut self, args: &[Vec<u8>], now: u64) -> Execution {
        let mut gone: Vec<Vec<u8>> = Vec::new();
        for key in &args[1..] {
            if !gone.contains(key) && self.live(key, now).is_some() {
                gone.push(key.clone());
            }
        }
        let mut r = Vec::new();
        push_int(&mut r, gone.len() as i64);
        if gone.is_empty() {
            return Execution::reply(r);
        }
        self.commit(Mutation::Del(gone), r)
    }

    fn cmd_exists(&mut self, args: &[Vec<u8>], now: u64) -> Execution {
        let mut n = 0;
        for key in &args[1..] {
            if self.live(key, now).is_some() {
                n += 1;
            }
        }
        let mut r = Vec::new();
        push_int(&mut r, n);
        Execution::reply(r)
    }

    fn incr_by(&mut self, key: &[u8], by: i64, now: u64) -> Execution {
        let (current, expire_at) = match self.live(key, now) {
            None => (0, None),
            Some(e) => match parse_i64(&e.value) {
                Some(n) => (n, e.expire_at),
                None => return Execution::error(errors::NOT_INTEGER),
            },
        };
        let Some(new) = current.checked_add(by) else {
            return Execution::error(errors::OVERFLOW);
        };
        let mut value = Vec::new();
        crate::resp::push_decimal(&mut value, new);
        let mut r = Vec::new();
        push_int(&mut r, new);
        self.commit(
            Mutation::Set {
                key: key.to_vec(),
                value,
                expire_at,
            },
            r,
        )
    }

    fn cmd_incr(&mut self, args: &[Vec<u8>], now: u64) -> Execution {
        self.incr_by(&args[1], 1, now)
    }

    fn cmd_decr(&mut self, args: &[Vec<u8>], now: u64) -> Execution {
        self.incr_by(&args[1], -1, now)
    }

    fn cmd_incrby(&mut self, args: &[Vec<u8>], now: u64) -> Execution {
        match parse_i64(&args[2]) {
            Some(by) => self.incr_by(&args[1], by, now),
            None => Execution::error(errors::NOT_INTEGER),
        }
    }

    fn cmd_decrby(&mut self, args: &[Vec<u8>], now: u64) -> Execution {
        match parse_i64(&args[2]) {
            Some(i64::MIN) => Execution::error("ERR decrement would overflow"),
            Some(by) => self.incr_by(&args[1], -by, now),
            None => Execution::error(errors::NOT_INTEGER),
        }
    }

    fn cmd_mget(&mut self, args: &[Vec<u8>], now: u64) -> Execution {
        let mut r = Vec::new();
        push_array_len(&mut r, args.len() - 1);
        for key in &args[1..] {
            self.push_value(&mut r, key, now);
        }
        Execution::reply(r)
    }

    fn cmd_mset(&mut self, args: &[Vec<u8>], _now: u64) -> Execution {
        if args.len().is_multiple_of(2) {
            return wrong_arity("mset");
        }
        let pairs = args[1..]
            .chunks_exact(2)
            .map(|kv| (kv[0].clone(), kv[1].clone()))
            .collect();
        let mut r = Vec::new();
        push_simple(&mut r, "OK");
        self.commit(Mutation::MSet(pairs), r)
    }

    fn ttl_ms(&mut self, key: &[u8], now: u64) -> i64 {
        match self.live(key, now) {
            None => -2,
            Some(Entry {
                expire_at: None, ..
            }) => -1,
            Some(Entry {
                expire_at: Some(at),
                ..
            }) => at.saturating_sub(now).min(i64::MAX as u64) as i64,
        }
    }

    fn cmd_ttl(&mut self, args: &[Vec<u8>], now: u64) -> Execution {
        let ms = self.ttl_ms(&args[1], now);
        let mut r = Vec::new();
        push_int(&mut r, if ms < 0 { ms } else { (ms + 500) / 1000 });
        Execution::reply(r)
    }

    fn cmd_pttl(&mut self, args: &[Vec<u8>], now: u64) -> Execution {
        let ms = self.ttl_ms(&args[1], now);
        let mut r = Vec::new();
        push_int(&mut r, ms);
        Execution::reply(r)
    }

    fn cmd_dbsize(&mut self, _args: &[Vec<u8>], now: u64) -> Execution {
        let mut r = Vec::new();
        push_int(&mut r, self.dbsize(now) as i64);
        Execution::reply(r)
    }

    fn cmd_flushall(&mut self, args: &[Vec<u8>], _now: u64) -> Execution {
        match args {
            [_] => {}
            [_, mode]
                if mode.eq_ignore_ascii_case(b"sync") || mode.eq_ignore_ascii_case(b"async") => {}
            _ => return Execution::error(errors::SYNTAX),
        }
        let mut r = Vec::new();
        push_simple(&mut r, "OK");
        self.commit(Mutation::FlushAll, r)
    }

    fn cmd_info(&mut self, args: &[Vec<u8>], now: u64) -> Execution {
        let wanted = |section: &str| {
            args.len() == 1
                || args[1..].iter().any(|a| {
                    a.eq_ignore_ascii_case(section.as_bytes())
                        || a.eq_ignore_ascii_case(b"all")
                        || a.eq_ignore_ascii_case(b"default")
                        || a.eq_ignore_ascii_case(b"everything")
                })
        };
        let mut s = String::new();
        let mut section = |name: &str, body: &dyn Fn(&mut String)| {
            if wanted(name) {
                if !s.is_empty() {
                    s.push_str("\r\n");
                }
                let _ = write!(s, "# {}{}\r\n", name[..1].to_ascii_uppercase(), &name[1..]);
                body(&mut s);
            }
        };
        let keys = self.dbsize(now);
        let expires = if self.with_expiry == 0 {
            0
        } else {
            self.map
                .values()
                .filter(|e| e.expire_at.is_some() && !is_expired(e, now))
                .count()
        };
        section("server", &|s| {
            let _ = write!(
                s,
                "redis_version:7.0.0-ftkv\r\nredis_mode:standalone\r\nftkv_version:{}\r\nuptime_in_seconds:{}\r\n",
                env!("CARGO_PKG_VERSION"),
                now / 1000
            );
        });
        section("clients", &|s| {
            let _ = write!(s, "connected_clients:{}\r\n", self.connected_clients);
        });
        section("memory", &|s| {
            let _ = write!(
                s,
                "used_memory:{}\r\nmaxmemory:{}\r\n",
                self.used_memory, self.config.max_memory
            );
        });
        section("persistence", &|s| {
            let _ = write!(
                s,
                "aof_enabled:1\r\naof_last_write_status:{}\r\n",
                if self.write_error { "err" } else { "ok" }
            );
            match self.log_budget {
                Some(b) => {
                    let _ = write!(s, "aof_free_bytes:{b}\r\n");
                }
                None => s.push_str("aof_free_bytes:unlimited\r\n"),
            }
        });
        section("stats", &|s| {
            let _ = write!(
                s,
                "total_commands_processed:{}\r\nkeyspace_hits:{}\r\nkeyspace_misses:{}\r\nexpired_keys:{}\r\n",
                self.stats.commands, self.stats.hits, self.stats.misses, self.stats.expired
            );
        });
        section("keyspace", &|s| {
            if keys > 0 {
                let _ = write!(s, "db0:keys={keys},expires={expires},avg_ttl=0\r\n");
            }
        });
        let mut r = Vec::new();
        push_bulk(&mut r, s.as_bytes());
        Execution::reply(r)
    }

    fn cmd_command(&mut self, args: &[Vec<u8>], _now: u64) -> Execution {
        let mut r = Vec::new();
        match args.get(1) {
            None => push_array_len(&mut r, 0),
            Some(sub) if sub.eq_ignore_ascii_case(b"count") => {
                push_int(&mut r, COMMANDS.len() as i64)
            }
            Some(sub)
                if sub.eq_ignore_ascii_case(b"docs")
                    || sub.eq_ignore_ascii_case(b"info")
                    || sub.eq_ignore_ascii_case(b"list") =>
            {
                push_array_len(&mut r, 0)
            }
            Some(sub) => return unknown_subcommand(sub, "COMMAND"),
        }
        Execution::reply(r)
    }

    fn cmd_config(&mut self, args: &[Vec<u8>], _now: u64) -> Execution {
        let sub = &args[1];
        if sub.eq_ignore_ascii_case(b"get") {
            if args.len() < 3 {
                return wrong_arity("config|get");
            }
            let mut maxmemory = Vec::new();
            crate::resp::push_decimal(&mut maxmemory, self.config.max_memory as i64);
            let params: [(&str, &[u8]); 5] = [
                ("save", b""),
                ("appendonly", b"yes"),
                ("appendfsync", b"always"),
                ("databases", b"1"),
                ("maxmemory", &maxmemory),
            ];
            let mut found: Vec<(&str, &[u8])> = Vec::new();
            for pattern in &args[2..] {
                let pattern = pattern.to_ascii_lowercase();
                for &(name, value) in &params {
                    if glob_match(&pattern, name.as_bytes())
                        && !found.iter().any(|(n, _)| *n == name)
                    {
                        found.push((name, value));
                    }
                }
            }
            let mut r = Vec::new();
            push_array_len(&mut r, found.len() * 2);
            for (name, value) in found {
                push_bulk(&mut r, name.as_bytes());
                push_bulk(&mut r, value);
            }
            Execution::reply(r)
        } else if sub.eq_ignore_ascii_case(b"resetstat") {
            self.stats = Stats::default();
            Execution::ok()
        } else if sub.eq_ignore_ascii_case(b"set") {
            Execution::error("ERR CONFIG SET is not supported by ftkv")
        } else {
            unknown_subcommand(sub, "CONFIG")
        }
    }

    fn cmd_select(&mut self, args: &[Vec<u8>], _now: u64) -> Execution {
        match parse_i64(&args[1]) {
            Some(0) => Execution::ok(),
            Some(_) => Execution::error("ERR DB index is out of range"),
            None => Execution::error(errors::NOT_INTEGER),
        }
    }

    fn cmd_client(&mut self, args: &[Vec<u8>], _now: u64) -> Execution {
        let sub = &args[1];
        if sub.eq_ignore_ascii_case(b"setname") {
            if args.len() != 3 {
                return wrong_arity("client|setname");
            }
            if args[2].iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
                return Execution::error(
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                );
            }
            Execution::ok()
        } else if sub.eq_ignore_ascii_case(b"getname") {
            let mut r = Vec::new();
            push_null(&mut r);
            Execution::reply(r)
        } else if sub.eq_ignore_ascii_case(b"setinfo") {
            if args.len() != 4 {
                return wrong_arity("client|setinfo");
            }
            Execution::ok()
        } else {
            unknown_subcommand(sub, "CLIENT")
        }
    }

    fn cmd_quit(&mut self, _args: &[Vec<u8>], _now: u64) -> Execution {
        let mut e = Execution::ok();
        e.close = true;
        e
    }
}

fn is_expired(e: &Entry, now: u64) -> bool {
    e.expire_at.is_some_and(|at| now > at)
}

fn wrong_arity(name: &str) -> Execution {
    Execution::error(&alloc::format!(
        "ERR wrong number of arguments for '{name}' command"
    ))
}

/// Redis 7's text: `ERR unknown command 'x', with args beginning with: 'a' 'b' `.
fn unknown_command(args: &[Vec<u8>]) -> Execution {
    let mut msg = b"ERR unknown command '".to_vec();
    msg.extend_from_slice(&args[0][..args[0].len().min(128)]);
    msg.extend_from_slice(b"', with args beginning with: ");
    let mut shown = Vec::new();
    for arg in &args[1..] {
        if shown.len() >= 128 {
            break;
        }
        let room = 128 - shown.len();
        shown.push(b'\'');
        shown.extend_from_slice(&arg[..arg.len().min(room)]);
        shown.extend_from_slice(b"' ");
    }
    msg.extend_from_slice(&shown);
    let mut r = Vec::new();
    push_error_bytes(&mut r, &msg);
    Execution::reply(r)
}

fn unknown_subcommand(sub: &[u8], command: &str) -> Execution {
    let mut msg = b"ERR unknown subcommand '".to_vec();
    msg.extend_from_slice(&sub[..sub.len().min(128)]);
    msg.extend_from_slice(b"'. Try ");
    msg.extend_from_slice(command.as_bytes());
    msg.extend_from_slice(b" HELP.");
    let mut r = Vec::new();
    push_error_bytes(&mut r, &msg);
    Execution::reply(r)
}

/// `*` and `?` glob matching (for CONFIG GET): iterative, so no pattern
/// from a client can exhaust the stack; patterns over 256 bytes never match.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    if pattern.len() > 256 {
        return false;
    }
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

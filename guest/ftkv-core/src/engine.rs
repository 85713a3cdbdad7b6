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
use crate::resp::{parse_i64, push_error_bytes, push_simple, Protocol, Reply};
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;
use foldhash::fast::FixedState;

/// The keyspace's table (see [`Engine`]'s `map`).
type KeyMap<V> = hashbrown::HashMap<Vec<u8>, V, FixedState>;

/// Bytes charged per key on top of the key and value lengths, for memory
/// accounting (map node, vector headers).
pub const ENTRY_OVERHEAD: usize = 64;

/// Replies of at most this many bytes always go into an EXEC reply, even
/// past [`Config::max_reply`]: every write's success reply is this small,
/// so the outcome of a write is never hidden.
pub const SMALL_REPLY: usize = 64;

/// Bytes a queued or watched argument is counted as on top of its length
/// (its vector and allocation), for [`Config::max_queued_bytes`] and
/// [`Config::max_watched_bytes`].
pub const ARG_OVERHEAD: usize = 32;

/// Engine settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Writes that would grow the accounted memory past this are refused
    /// with `-OOM`. Default 64 MiB.
    pub max_memory: usize,
    /// Largest reply to one command (MGET beyond it is refused with `-ERR
    /// reply too large`) and to one EXEC (replies beyond it are replaced
    /// by that error, except small ones: [`SMALL_REPLY`]). Default 2 MiB.
    pub max_reply: usize,
    /// Most commands one connection may queue after MULTI. Default 10,000.
    pub max_queued_commands: usize,
    /// Most bytes of commands one connection may queue, each argument
    /// counted as its length plus [`ARG_OVERHEAD`]. Default 1 MiB: as much
    /// as one request may carry; it also keeps the log record of an EXEC
    /// within one record (`aof::MAX_PAYLOAD`).
    pub max_queued_bytes: usize,
    /// Most bytes of keys one connection may WATCH, counted the same way.
    /// Default 64 KiB.
    pub max_watched_bytes: usize,
    /// Seeds the keyspace's hash function. ftkv draws it from the
    /// platform's entropy at boot, so clients cannot choose keys that
    /// collide; replay sees the same seed (entropy is a logged input).
    /// Default 0.
    pub hash_seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_memory: 64 * 1024 * 1024,
            max_reply: 2 * 1024 * 1024,
            max_queued_commands: 10_000,
            max_queued_bytes: 1024 * 1024,
            max_watched_bytes: 64 * 1024,
            hash_seed: 0,
        }
    }
}

impl Config {
    /// The largest reply a connection can get: an EXEC reply holds at most
    /// `max_reply` bytes of large replies plus the small ones.
    pub fn max_exec_reply(&self) -> usize {
        self.max_reply
            .saturating_add(self.max_queued_commands.saturating_mul(SMALL_REPLY))
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
    fn bytes(reply: Vec<u8>) -> Self {
        Execution {
            reply,
            log: None,
            close: false,
        }
    }

    fn reply(reply: Reply) -> Self {
        Self::bytes(reply.into_bytes())
    }

    fn error(message: &str) -> Self {
        Self::error_bytes(message.as_bytes())
    }

    /// An error whose message holds bytes a client sent (CR and LF become spaces).
    fn error_bytes(message: &[u8]) -> Self {
        let mut r = Vec::new();
        push_error_bytes(&mut r, message);
        Self::bytes(r)
    }

    fn ok() -> Self {
        let mut r = Vec::new();
        push_simple(&mut r, "OK");
        Self::bytes(r)
    }
}

/// What ftkv reports as its Redis version (INFO, HELLO).
pub const REDIS_VERSION: &str = "7.0.0-ftkv";

/// Per-connection state: the reply protocol (`HELLO`), the client id, the
/// names a client gives itself (`CLIENT SETNAME`, `CLIENT SETINFO`), and
/// its transaction (MULTI, WATCH). The glue keeps one per connection,
/// passes it to [`Engine::execute`], and hands it to
/// [`Engine::end_session`] when the connection closes.
/// (`Default`: id 0, for a slot with no connection yet.)
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    proto: Protocol,
    id: u64,
    name: Option<Vec<u8>>,
    lib_name: Option<Vec<u8>>,
    lib_ver: Option<Vec<u8>>,
    /// Commands queued since MULTI; `None` outside a transaction.
    multi: Option<Queue>,
    /// Keys WATCHed, as they were at WATCH.
    watching: Vec<Watch>,
    /// `watching` counted for [`Config::max_watched_bytes`].
    watch_bytes: usize,
}

/// The commands of a transaction, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Queue {
    commands: Vec<Vec<Vec<u8>>>,
    bytes: usize,
    /// A command was refused while queueing: EXEC answers EXECABORT.
    failed: bool,
}

/// One WATCHed key of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Watch {
    key: Vec<u8>,
    /// [`WatchedKey::version`] at WATCH.
    version: u64,
    /// The key existed at WATCH (then its expiry also aborts EXEC).
    live: bool,
}

/// A key some session WATCHes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct WatchedKey {
    /// How many sessions watch it.
    watchers: u32,
    /// Bumped by every change to the key (set, delete, expiry, FLUSHALL).
    version: u64,
}

/// What a queued or watched argument counts as (see [`ARG_OVERHEAD`]).
fn counted(arg: &[u8]) -> usize {
    arg.len() + ARG_OVERHEAD
}

impl Session {
    /// A new connection: RESP2, no name. `id` is what `CLIENT ID` and
    /// `HELLO` report; the glue numbers connections 1, 2, 3... (a counter,
    /// so replay gives the same ids).
    pub fn new(id: u64) -> Self {
        Session {
            id,
            ..Session::default()
        }
    }

    pub fn protocol(&self) -> Protocol {
        self.proto
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn name(&self) -> Option<&[u8]> {
        self.name.as_deref()
    }

    /// `(lib-name, lib-ver)` from `CLIENT SETINFO`.
    pub fn library(&self) -> (Option<&[u8]>, Option<&[u8]>) {
        (self.lib_name.as_deref(), self.lib_ver.as_deref())
    }

    /// An empty reply in this connection's protocol.
    fn reply(&self) -> Reply {
        Reply::new(self.proto)
    }

    /// An empty name clears it, as in Redis.
    fn set_name(&mut self, name: &[u8]) {
        self.name = (!name.is_empty()).then(|| name.to_vec());
    }

    /// Between MULTI and EXEC/DISCARD.
    pub fn in_transaction(&self) -> bool {
        self.multi.is_some()
    }

    /// Commands queued since MULTI.
    pub fn queued(&self) -> usize {
        self.multi.as_ref().map_or(0, |q| q.commands.len())
    }

    /// Keys this connection WATCHes.
    pub fn watched(&self) -> usize {
        self.watching.len()
    }

    /// A command was refused while queueing (Redis's "flagTransaction"):
    /// the EXEC that follows answers EXECABORT.
    fn fail_transaction(&mut self) {
        if let Some(q) = &mut self.multi {
            q.failed = true;
        }
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
    pub const DB_OUT_OF_RANGE: &str = "ERR DB index is out of range";
    pub const AUTH_WITHOUT_PASSWORD: &str = "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?";
    pub const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";
    pub const BAD_CLIENT_NAME: &str =
        "ERR Client names cannot contain spaces, newlines or special characters.";
    pub const EXECABORT: &str = "EXECABORT Transaction discarded because of previous errors.";
    pub const EXEC_WITHOUT_MULTI: &str = "ERR EXEC without MULTI";
    pub const DISCARD_WITHOUT_MULTI: &str = "ERR DISCARD without MULTI";
    pub const NESTED_MULTI: &str = "ERR MULTI calls can not be nested";
    pub const WATCH_IN_MULTI: &str = "ERR WATCH inside MULTI is not allowed";
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
    /// The new expiry of an existing key (`None`: PERSIST).
    Expire {
        key: Vec<u8>,
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
    /// A hash table, like Redis's dict: a lookup hashes the key once and
    /// compares it with one or two stored keys, however many there are.
    /// (An ordered map compared ~18 stored keys per lookup at 200k keys,
    /// each behind a pointer: MSET slowed as the keyspace grew.)
    map: KeyMap<Entry>,
    used_memory: usize,
    /// Keys that have an expiry (for DBSIZE and INFO).
    with_expiry: usize,
    /// Bytes left in the log (None: not limited).
    log_budget: Option<u64>,
    write_error: bool,
    connected_clients: usize,
    stats: Stats,
    /// Keys some session WATCHes.
    watched: BTreeMap<Vec<u8>, WatchedKey>,
    /// While EXEC runs: its log record, which collects every change.
    transaction: Option<aof::TransactionRecord>,
    /// Bytes the reply being built may take: `max_reply`, or inside EXEC
    /// what the replies before left of it.
    reply_room: usize,
}

impl Default for Engine {
    fn default() -> Self {
        Self::new(Config::default())
    }
}

type Handler = fn(&mut Engine, &mut Session, &[Vec<u8>], u64) -> Execution;

struct Spec {
    name: &'static str,
    /// Like Redis: n > 0 exactly n arguments (name included), n < 0 at least -n.
    arity: i32,
    handler: Handler,
    /// Subcommands `(name, arity)`, checked like commands (also when
    /// queued); empty for a command without.
    subcommands: &'static [(&'static str, i32)],
    /// Runs at once inside MULTI instead of being queued.
    not_queued: bool,
}

impl Spec {
    const fn new(name: &'static str, arity: i32, handler: Handler) -> Spec {
        Spec {
            name,
            arity,
            handler,
            subcommands: &[],
            not_queued: false,
        }
    }

    const fn subcommands(mut self, subcommands: &'static [(&'static str, i32)]) -> Spec {
        self.subcommands = subcommands;
        self
    }

    const fn not_queued(mut self) -> Spec {
        self.not_queued = true;
        self
    }
}

fn arity_ok(arity: i32, n: usize) -> bool {
    let n = n as i64;
    let arity = arity as i64;
    if arity > 0 {
        n == arity
    } else {
        n >= -arity
    }
}

const COMMANDS: &[Spec] = &[
    Spec::new("ping", -1, Engine::cmd_ping),
    Spec::new("echo", 2, Engine::cmd_echo),
    Spec::new("get", 2, Engine::cmd_get),
    Spec::new("set", -3, Engine::cmd_set),
    Spec::new("del", -2, Engine::cmd_del),
    Spec::new("exists", -2, Engine::cmd_exists),
    Spec::new("incr", 2, Engine::cmd_incr),
    Spec::new("decr", 2, Engine::cmd_decr),
    Spec::new("incrby", 3, Engine::cmd_incrby),
    Spec::new("decrby", 3, Engine::cmd_decrby),
    Spec::new("mget", -2, Engine::cmd_mget),
    Spec::new("mset", -3, Engine::cmd_mset),
    Spec::new("expire", -3, Engine::cmd_expire),
    Spec::new("pexpire", -3, Engine::cmd_pexpire),
    Spec::new("expireat", -3, Engine::cmd_expireat),
    Spec::new("pexpireat", -3, Engine::cmd_pexpireat),
    Spec::new("persist", 2, Engine::cmd_persist),
    Spec::new("ttl", 2, Engine::cmd_ttl),
    Spec::new("pttl", 2, Engine::cmd_pttl),
    Spec::new("dbsize", 1, Engine::cmd_dbsize),
    Spec::new("flushall", -1, Engine::cmd_flushall),
    Spec::new("flushdb", -1, Engine::cmd_flushall),
    Spec::new("info", -1, Engine::cmd_info),
    Spec::new("command", -1, Engine::cmd_command).subcommands(&[
        ("count", 2),
        ("docs", -2),
        ("info", -2),
        ("list", -2),
    ]),
    Spec::new("config", -2, Engine::cmd_config).subcommands(&[
        ("get", -3),
        ("resetstat", 2),
        ("set", -4),
    ]),
    Spec::new("select", 2, Engine::cmd_select),
    Spec::new("auth", -2, Engine::cmd_auth),
    Spec::new("hello", -1, Engine::cmd_hello),
    Spec::new("client", -2, Engine::cmd_client).subcommands(&[
        ("setname", 3),
        ("getname", 2),
        ("id", 2),
        ("setinfo", 4),
    ]),
    Spec::new("quit", -1, Engine::cmd_quit).not_queued(),
    Spec::new("multi", 1, Engine::cmd_multi).not_queued(),
    Spec::new("exec", 1, Engine::cmd_exec).not_queued(),
    Spec::new("discard", 1, Engine::cmd_discard).not_queued(),
    Spec::new("watch", -2, Engine::cmd_watch).not_queued(),
    Spec::new("unwatch", 1, Engine::cmd_unwatch),
];

fn find_command(name: &[u8]) -> Option<&'static Spec> {
    COMMANDS
        .iter()
        .find(|s| name.eq_ignore_ascii_case(s.name.as_bytes()))
}

/// Checks a command's arguments against its spec as Redis does before
/// running or queueing it: the number of arguments, and the subcommand
/// and its number of arguments. The error message without the `-`.
fn check_arguments(spec: &Spec, args: &[Vec<u8>]) -> Result<(), Vec<u8>> {
    if !arity_ok(spec.arity, args.len()) {
        return Err(wrong_arity_message(spec.name, None));
    }
    let (Some(sub), false) = (args.get(1), spec.subcommands.is_empty()) else {
        return Ok(());
    };
    let Some(&(sub_name, arity)) = spec
        .subcommands
        .iter()
        .find(|(n, _)| sub.eq_ignore_ascii_case(n.as_bytes()))
    else {
        return Err(unknown_subcommand_message(sub, spec.name));
    };
    if !arity_ok(arity, args.len()) {
        return Err(wrong_arity_message(spec.name, Some(sub_name)));
    }
    Ok(())
}

impl Engine {
    pub fn new(config: Config) -> Self {
        Engine {
            config,
            map: KeyMap::with_hasher(FixedState::with_seed(config.hash_seed)),
            used_memory: 0,
            with_expiry: 0,
            log_budget: None,
            write_error: false,
            connected_clients: 0,
            stats: Stats::default(),
            watched: BTreeMap::new(),
            transaction: None,
            reply_room: config.max_reply,
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
        let mut all: Vec<(&[u8], &[u8], Option<u64>)> = self
            .map
            .iter()
            .map(|(k, e)| (k.as_slice(), e.value.as_slice(), e.expire_at))
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(b.0));
        all.into_iter()
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

    /// Applies one log record payload of a log of `version` (replay at
    /// boot). The payload is fully decoded and checked before anything
    /// changes, so a transaction is applied whole or not at all. The memory
    /// limit is not applied: a logged write was acknowledged and must come
    /// back.
    pub fn apply_record(&mut self, payload: &[u8], version: u32) -> Result<(), aof::RecordError> {
        match aof::decode_record(payload, version)? {
            aof::Record::One(m) => self.apply(m),
            aof::Record::Transaction(changes) => {
                for m in changes {
                    self.apply(m);
                }
            }
        }
        Ok(())
    }

    /// Runs one command of the connection `session` at time `now_ms` (ms on
    /// a clock that never goes back, also across restarts: absolute expiry
    /// times are stored in the log). The reply is in the session's protocol.
    ///
    /// Inside MULTI a valid command is queued (`+QUEUED`) and runs at EXEC,
    /// whose reply and log record cover the whole transaction.
    pub fn execute(&mut self, session: &mut Session, args: &[Vec<u8>], now_ms: u64) -> Execution {
        let Some(name) = args.first() else {
            return Execution::error("ERR empty command");
        };
        let Some(spec) = find_command(name) else {
            self.stats.commands += 1;
            session.fail_transaction();
            return unknown_command(args);
        };
        if let Err(message) = check_arguments(spec, args) {
            self.stats.commands += 1;
            if spec.name == "exec" {
                // Redis answers a malformed EXEC by discarding the
                // transaction, saying why.
                self.discard_transaction(session);
                let mut msg = b"EXECABORT Transaction discarded because of: ".to_vec();
                msg.extend_from_slice(message.strip_prefix(b"ERR ").unwrap_or(&message));
                return Execution::error_bytes(&msg);
            }
            session.fail_transaction();
            return Execution::error_bytes(&message);
        }
        if session.multi.is_some() && !spec.not_queued {
            return self.queue(session, args);
        }
        self.stats.commands += 1;
        (spec.handler)(self, session, args, now_ms)
    }

    /// Distinct keys WATCHed by any connection.
    pub fn watched_keys(&self) -> usize {
        self.watched.len()
    }

    /// The connection of `session` closed: forget its transaction and
    /// watches (the engine counts watchers per key).
    pub fn end_session(&mut self, session: &mut Session) {
        self.discard_transaction(session);
    }

    /// After the glue rebuilt the keyspace from the log (a failed write):
    /// takes over the watches of the engine it replaces, all marked
    /// changed, so the open connections' sessions stay consistent with it
    /// and every pending EXEC with WATCH aborts.
    pub fn take_watches(&mut self, old: &mut Engine) {
        self.watched = core::mem::take(&mut old.watched);
        for w in self.watched.values_mut() {
            w.version += 1;
        }
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

    /// A watched key changed: EXECs that WATCH it abort.
    fn touch(&mut self, key: &[u8]) {
        if let Some(w) = self.watched.get_mut(key) {
            w.version += 1;
        }
    }

    fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let e = self.map.remove(key)?;
        self.touch(key);
        self.used_memory -= entry_size(key, &e.value);
        if e.expire_at.is_some() {
            self.with_expiry -= 1;
        }
        Some(e)
    }

    /// Sets `key` (replacing any entry): one lookup.
    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>, expire_at: Option<u64>) {
        self.touch(&key);
        self.used_memory += entry_size(&key, &value);
        if expire_at.is_some() {
            self.with_expiry += 1;
        }
        let entry = Entry { value, expire_at };
        match self.map.entry(key) {
            hashbrown::hash_map::Entry::Occupied(mut slot) => {
                let old = core::mem::replace(slot.get_mut(), entry);
                self.used_memory -= entry_size(slot.key(), &old.value);
                if old.expire_at.is_some() {
                    self.with_expiry -= 1;
                }
            }
            hashbrown::hash_map::Entry::Vacant(slot) => {
                slot.insert(entry);
            }
        }
    }

    fn apply(&mut self, m: Mutation) {
        match m {
            Mutation::Set {
                key,
                value,
                expire_at,
            } => self.insert(key, value, expire_at),
            Mutation::Expire { key, expire_at } => {
                // The key exists: the change was made to a live key, and
                // replay has every key the run had (expired ones too).
                if let Some(e) = self.map.get_mut(&key) {
                    match (e.expire_at.is_some(), expire_at.is_some()) {
                        (false, true) => self.with_expiry += 1,
                        (true, false) => self.with_expiry -= 1,
                        _ => {}
                    }
                    e.expire_at = expire_at;
                    self.touch(&key);
                }
            }
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
                // Like Redis: watchers of keys that exist see a change.
                let map = &self.map;
                for (key, w) in self.watched.iter_mut() {
                    if map.contains_key(key) {
                        w.version += 1;
                    }
                }
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
            Mutation::Expire { .. } | Mutation::Del(_) | Mutation::FlushAll => 0,
        }
    }

    /// Checks limits, logs and applies a mutation; `reply` is sent on success.
    fn commit(&mut self, m: Mutation, reply: Reply) -> Execution {
        if self.write_error {
            return Execution::error(errors::DISK_ERROR);
        }
        let growth = self.growth(&m);
        if growth > 0 && self.used_memory.saturating_add(growth) > self.config.max_memory {
            return Execution::error(errors::OOM);
        }
        let payload = aof::encode_mutation(&m);
        let (fits, need) = match &self.transaction {
            None => (
                payload.len() <= aof::MAX_PAYLOAD,
                aof::record_len(payload.len()),
            ),
            // Cannot happen within the transaction limits (docs/ftkv.md).
            Some(t) => (t.fits(payload.len()), t.cost(payload.len())),
        };
        if !fits {
            return Execution::error("ERR request too large for one log record");
        }
        if let Some(budget) = self.log_budget {
            if need > budget {
                return Execution::error(errors::DISK_FULL);
            }
            self.log_budget = Some(budget - need);
        }
        self.apply(m);
        let log = match &mut self.transaction {
            None => Some(payload),
            Some(t) => {
                t.push(&payload);
                None
            }
        };
        Execution {
            reply: reply.into_bytes(),
            log,
            close: false,
        }
    }

    // ---- commands ----

    fn cmd_ping(&mut self, s: &mut Session, args: &[Vec<u8>], _now: u64) -> Execution {
        let mut r = s.reply();
        match args {
            [_] => r.simple("PONG"),
            [_, msg] => r.bulk(msg),
            _ => return wrong_arity("ping"),
        }
        Execution::reply(r)
    }

    fn cmd_echo(&mut self, s: &mut Session, args: &[Vec<u8>], _now: u64) -> Execution {
        let mut r = s.reply();
        r.bulk(&args[1]);
        Execution::reply(r)
    }

    fn cmd_get(&mut self, s: &mut Session, args: &[Vec<u8>], now: u64) -> Execution {
        let mut r = s.reply();
        self.push_value(&mut r, &args[1], now);
        Execution::reply(r)
    }

    fn push_value(&mut self, r: &mut Reply, key: &[u8], now: u64) {
        match self.live(key, now) {
            Some(e) => {
                r.bulk(&e.value);
                self.stats.hits += 1;
            }
            None => {
                r.null();
                self.stats.misses += 1;
            }
        }
    }

    fn cmd_set(&mut self, s: &mut Session, args: &[Vec<u8>], now: u64) -> Execution {
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
        let mut r = s.reply();
        if !proceed {
            r.null();
            return Execution::reply(r);
        }
        let expire_at = match ttl {
            Ttl::Clear => None,
            Ttl::Keep => existing.flatten(),
            Ttl::At(at) => Some(at),
        };
        r.simple("OK");
        self.commit(
            Mutation::Set {
                key: key.clone(),
                value: args[2].clone(),
                expire_at,
            },
            r,
        )
    }

    fn cmd_del(&mut self, s: &mut Session, args: &[Vec<u8>], now: u64) -> Execution {
        let mut gone: Vec<Vec<u8>> = Vec::new();
        for key in &args[1..] {
            if !gone.contains(key) && self.live(key, now).is_some() {
                gone.push(key.clone());
            }
        }
        let mut r = s.reply();
        r.int(gone.len() as i64);
        if gone.is_empty() {
            return Execution::reply(r);
        }
        self.commit(Mutation::Del(gone), r)
    }

    fn cmd_exists(&mut self, s: &mut Session, args: &[Vec<u8>], now: u64) -> Execution {
        let mut n = 0;
        for key in &args[1..] {
            if self.live(key, now).is_some() {
                n += 1;
            }
        }
        let mut r = s.reply();
        r.int(n);
        Execution::reply(r)
    }

    fn incr_by(&mut self, s: &Session, key: &[u8], by: i64, now: u64) -> Execution {
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
        let mut r = s.reply();
        r.int(new);
        self.commit(
            Mutation::Set {
                key: key.to_vec(),
                value,
                expire_at,
            },
            r,
        )
    }

    fn cmd_incr(&mut self, s: &mut Session, args: &[Vec<u8>], now: u64) -> Execution {
        self.incr_by(s, &args[1], 1, now)
    }

    fn cmd_decr(&mut self, s: &mut Session, args: &[Vec<u8>], now: u64) -> Execution {
        self.incr_by(s, &args[1], -1, now)
    }

    fn cmd_incrby(&mut self, s: &mut Session, args: &[Vec<u8>], now: u64) -> Execution {
        match parse_i64(&args[2]) {
            Some(by) => self.incr_by(s, &args[1], by, now),
            None => Execution::error(errors::NOT_INTEGER),
        }
    }

    fn cmd_decrby(&mut self, s: &mut Session, args: &[Vec<u8>], now: u64) -> Execution {
        match parse_i64(&args[2]) {
            Some(i64::MIN) => Execution::error("ERR decrement would overflow"),
            Some(by) => self.incr_by(s, &args[1], -by, now),
            None => Execution::error(errors::NOT_INTEGER),
        }
    }

    fn cmd_mget(&mut self, s: &mut Session, args: &[Vec<u8>], now: u64) -> Execution {
        // The only reply that can grow far beyond its request: sized first.
        let mut size = 0usize;
        for key in &args[1..] {
            let len = self.peek(key, now).map_or(5, |v| v.len() + 16);
            size = size.saturating_add(len);
        }
        if size > self.reply_room {
            return self.reply_too_large();
        }
        let mut r = s.reply();
        r.array(args.len() - 1);
        for key in &args[1..] {
            self.push_value(&mut r, key, now);
        }
        Execution::reply(r)
    }

    fn cmd_mset(&mut self, s: &mut Session, args: &[Vec<u8>], _now: u64) -> Execution {
        if args.len().is_multiple_of(2) {
            return wrong_arity("mset");
        }
        let pairs = args[1..]
            .chunks_exact(2)
            .map(|kv| (kv[0].clone(), kv[1].clone()))
            .collect();
        let mut r = s.reply();
        r.simple("OK");
        self.commit(Mutation::MSet(pairs), r)
    }

    /// EXPIRE, PEXPIRE, EXPIREAT, PEXPIREAT: `to_ms` turns the argument
    /// into an absolute time in ms (None: overflow). Logged as the key's
    /// new state: a SET with the new expiry, or a DEL when the time has
    /// passed already (as Redis does).
    fn expire(
        &mut self,
        s: &Session,
        args: &[Vec<u8>],
        now: u64,
        name: &str,
        to_ms: fn(i64, u64) -> Option<i64>,
    ) -> Execution {
        let Some(n) = parse_i64(&args[2]) else {
            return Execution::error(errors::NOT_INTEGER);
        };
        let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
        for opt in &args[3..] {
            match opt.to_ascii_uppercase().as_slice() {
                b"NX" => nx = true,
                b"XX" => xx = true,
                b"GT" => gt = true,
                b"LT" => lt = true,
                _ => {
                    let mut msg = b"ERR Unsupported option ".to_vec();
                    msg.extend_from_slice(&opt[..opt.len().min(128)]);
                    return Execution::error_bytes(&msg);
                }
            }
        }
        if nx && (xx || gt || lt) {
            return Execution::error(
                "ERR NX and XX, GT or LT options at the same time are not compatible",
            );
        }
        if gt && lt {
            return Execution::error("ERR GT and LT options at the same time are not compatible");
        }
        let Some(at) = to_ms(n, now) else {
            return Execution::error(&alloc::format!(
                "ERR invalid expire time in '{name}' command"
            ));
        };
        let key = &args[1];
        let mut r = s.reply();
        let Some(current) = self.live(key, now).map(|e| e.expire_at) else {
            r.int(0);
            return Execution::reply(r);
        };
        // No expiry counts as an infinite one for GT and LT.
        let allowed = match current {
            None => !(xx || gt),
            Some(old) => !nx && (!gt || at > old as i64) && (!lt || at < old as i64),
        };
        if !allowed {
            r.int(0);
            return Execution::reply(r);
        }
        r.int(1);
        if at <= now as i64 {
            return self.commit(Mutation::Del(alloc::vec![key.clone()]), r);
        }
        self.commit(
            Mutation::Expire {
                key: key.clone(),
                expire_at: Some(at as u64),
            },
            r,
        )
    }

    fn cmd_expire(&mut self, s: &mut Session, args: &[Vec<u8>], now: u64) -> Execution {
        self.expire(s, args, now, "expire", |n, now| {
            n.checked_mul(1000)?.checked_add(now as i64)
        })
    }

    fn cmd_pexpire(&mut self, s: &mut Session, args: &[Vec<u8>], now: u64) -> Execution {
        self.expire(s, args, now, "pexpire", |n, now| n.checked_add(now as i64))
    }

    fn cmd_expireat(&mut self, s: &mut Session, args: &[Vec<u8>], now: u64) -> Execution {
        self.expire(s, args, now, "expireat", |n, _| n.checked_mul(1000))
    }

    fn cmd_pexpireat(&mut self, s: &mut Session, args: &[Vec<u8>], now: u64) -> Execution {
        self.expire(s, args, now, "pexpireat", |n, _| Some(n))
    }

    fn cmd_persist(&mut self, s: &mut Session, args: &[Vec<u8>], now: u64) -> Execution {
        let key = &args[1];
        let mut r = s.reply();
        if self.live(key, now).is_none_or(|e| e.expire_at.is_none()) {
            r.int(0);
            return Execution::reply(r);
        }
        r.int(1);
        self.commit(
            Mutation::Expire {
                key: key.clone(),
                expire_at: None,
            },
            r,
        )
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

    fn cmd_ttl(&mut self, s: &mut Session, args: &[Vec<u8>], now: u64) -> Execution {
        let ms = self.ttl_ms(&args[1], now);
        let mut r = s.reply();
        r.int(if ms < 0 { ms } else { (ms + 500) / 1000 });
        Execution::reply(r)
    }

    fn cmd_pttl(&mut self, s: &mut Session, args: &[Vec<u8>], now: u64) -> Execution {
        let ms = self.ttl_ms(&args[1], now);
        let mut r = s.reply();
        r.int(ms);
        Execution::reply(r)
    }

    fn cmd_dbsize(&mut self, s: &mut Session, _args: &[Vec<u8>], now: u64) -> Execution {
        let mut r = s.reply();
        r.int(self.dbsize(now) as i64);
        Execution::reply(r)
    }

    fn cmd_flushall(&mut self, s: &mut Session, args: &[Vec<u8>], _now: u64) -> Execution {
        match args {
            [_] => {}
            [_, mode]
                if mode.eq_ignore_ascii_case(b"sync") || mode.eq_ignore_ascii_case(b"async") => {}
            _ => return Execution::error(errors::SYNTAX),
        }
        let mut r = s.reply();
        r.simple("OK");
        self.commit(Mutation::FlushAll, r)
    }

    fn cmd_info(&mut self, session: &mut Session, args: &[Vec<u8>], now: u64) -> Execution {
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
                "redis_version:{REDIS_VERSION}\r\nredis_mode:standalone\r\nftkv_version:{}\r\nuptime_in_seconds:{}\r\n",
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
        let mut r = session.reply();
        r.verbatim_text(s.as_bytes());
        Execution::reply(r)
    }

    fn cmd_command(&mut self, s: &mut Session, args: &[Vec<u8>], _now: u64) -> Execution {
        let mut r = s.reply();
        match args.get(1) {
            None => r.array(0),
            Some(sub) if sub.eq_ignore_ascii_case(b"count") => r.int(COMMANDS.len() as i64),
            // No documentation: clients then show no hints.
            Some(sub) if sub.eq_ignore_ascii_case(b"docs") => r.map(0),
            // Like Redis for a command it does not know: a null per name.
            Some(sub) if sub.eq_ignore_ascii_case(b"info") => {
                r.array(args.len() - 2);
                for _ in &args[2..] {
                    r.null();
                }
            }
            Some(sub) if sub.eq_ignore_ascii_case(b"list") => r.array(0),
            Some(sub) => return unknown_subcommand(sub, "command"),
        }
        Execution::reply(r)
    }

    fn cmd_config(&mut self, s: &mut Session, args: &[Vec<u8>], _now: u64) -> Execution {
        let sub = &args[1];
        if sub.eq_ignore_ascii_case(b"get") {
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
            let mut r = s.reply();
            r.map(found.len());
            for (name, value) in found {
                r.bulk(name.as_bytes());
                r.bulk(value);
            }
            Execution::reply(r)
        } else if sub.eq_ignore_ascii_case(b"resetstat") {
            self.stats = Stats::default();
            Execution::ok()
        } else if sub.eq_ignore_ascii_case(b"set") {
            Execution::error("ERR CONFIG SET is not supported by ftkv")
        } else {
            unknown_subcommand(sub, "config")
        }
    }

    fn cmd_select(&mut self, _s: &mut Session, args: &[Vec<u8>], _now: u64) -> Execution {
        match parse_i64(&args[1]) {
            Some(0) => Execution::ok(),
            Some(_) => Execution::error(errors::DB_OUT_OF_RANGE),
            None => Execution::error(errors::NOT_INTEGER),
        }
    }

    /// `AUTH [user] password`. ftkv has no passwords, like a Redis whose
    /// default user is `nopass`: the user `default` is accepted with any
    /// password, the one-argument form is refused as Redis refuses it.
    fn cmd_auth(&mut self, _s: &mut Session, args: &[Vec<u8>], _now: u64) -> Execution {
        match args {
            [_, _] => Execution::error(errors::AUTH_WITHOUT_PASSWORD),
            [_, user, _] => match authenticate(user) {
                Ok(()) => Execution::ok(),
                Err(e) => Execution::error(e),
            },
            _ => Execution::error(errors::SYNTAX),
        }
    }

    /// `HELLO [protover [AUTH user pass] [SETNAME name]]`: switches the
    /// connection's protocol and answers with the server map, in the new
    /// protocol. Nothing changes unless every option is valid.
    fn cmd_hello(&mut self, s: &mut Session, args: &[Vec<u8>], _now: u64) -> Execution {
        let mut proto = s.proto;
        if let Some(v) = args.get(1) {
            proto = match parse_i64(v) {
                Some(2) => Protocol::Resp2,
                Some(3) => Protocol::Resp3,
                Some(_) => return Execution::error("NOPROTO unsupported protocol version"),
                None => {
                    return Execution::error(
                        "ERR Protocol version is not an integer or out of range",
                    )
                }
            };
        }
        let mut name = None;
        let mut i = 2;
        while i < args.len() {
            let more = args.len() - 1 - i;
            let opt = &args[i];
            if opt.eq_ignore_ascii_case(b"auth") && more >= 2 {
                if let Err(e) = authenticate(&args[i + 1]) {
                    return Execution::error(e);
                }
                i += 3;
            } else if opt.eq_ignore_ascii_case(b"setname") && more >= 1 {
                if !valid_attribute(&args[i + 1]) {
                    return Execution::error(errors::BAD_CLIENT_NAME);
                }
                name = Some(&args[i + 1]);
                i += 2;
            } else {
                let mut msg = b"ERR Syntax error in HELLO option '".to_vec();
                msg.extend_from_slice(&opt[..opt.len().min(128)]);
                msg.push(b'\'');
                return Execution::error_bytes(&msg);
            }
        }
        if let Some(name) = name {
            s.set_name(name);
        }
        s.proto = proto;
        let mut r = s.reply();
        r.map(7);
        r.bulk(b"server");
        r.bulk(b"redis");
        r.bulk(b"version");
        r.bulk(REDIS_VERSION.as_bytes());
        r.bulk(b"proto");
        r.int(proto.version());
        r.bulk(b"id");
        r.int(s.id as i64);
        r.bulk(b"mode");
        r.bulk(b"standalone");
        r.bulk(b"role");
        r.bulk(b"master");
        r.bulk(b"modules");
        r.array(0);
        Execution::reply(r)
    }

    fn cmd_client(&mut self, s: &mut Session, args: &[Vec<u8>], _now: u64) -> Execution {
        let sub = &args[1];
        let mut r = s.reply();
        if sub.eq_ignore_ascii_case(b"setname") {
            if !valid_attribute(&args[2]) {
                return Execution::error(errors::BAD_CLIENT_NAME);
            }
            s.set_name(&args[2]);
            return Execution::ok();
        } else if sub.eq_ignore_ascii_case(b"getname") {
            match &s.name {
                Some(name) => r.bulk(name),
                None => r.null(),
            }
        } else if sub.eq_ignore_ascii_case(b"id") {
            r.int(s.id as i64);
        } else if sub.eq_ignore_ascii_case(b"setinfo") {
            // Redis 7.2's CLIENT SETINFO: the library's name and version.
            let (attr, value) = (&args[2], &args[3]);
            let slot = if attr.eq_ignore_ascii_case(b"lib-name") {
                &mut s.lib_name
            } else if attr.eq_ignore_ascii_case(b"lib-ver") {
                &mut s.lib_ver
            } else {
                let mut msg = b"ERR Unrecognized option '".to_vec();
                msg.extend_from_slice(&attr[..attr.len().min(128)]);
                msg.push(b'\'');
                return Execution::error_bytes(&msg);
            };
            if !valid_attribute(value) {
                let mut msg = b"ERR ".to_vec();
                msg.extend_from_slice(attr);
                msg.extend_from_slice(b" cannot contain spaces, newlines or special characters.");
                return Execution::error_bytes(&msg);
            }
            *slot = (!value.is_empty()).then(|| value.clone());
            return Execution::ok();
        } else {
            return unknown_subcommand(sub, "client");
        }
        Execution::reply(r)
    }

    fn cmd_quit(&mut self, _s: &mut Session, _args: &[Vec<u8>], _now: u64) -> Execution {
        let mut e = Execution::ok();
        e.close = true;
        e
    }

    // ---- transactions ----

    fn cmd_multi(&mut self, s: &mut Session, _args: &[Vec<u8>], _now: u64) -> Execution {
        if s.multi.is_some() {
            // Redis does not fail the transaction for this.
            return Execution::error(errors::NESTED_MULTI);
        }
        s.multi = Some(Queue::default());
        Execution::ok()
    }

    /// Queues a checked command of a session in MULTI, within the limits.
    fn queue(&mut self, s: &mut Session, args: &[Vec<u8>]) -> Execution {
        let cost: usize = args.iter().map(|a| counted(a)).sum();
        let Some(q) = s.multi.as_mut() else {
            return Execution::error(errors::EXEC_WITHOUT_MULTI);
        };
        if q.commands.len() >= self.config.max_queued_commands
            || q.bytes + cost > self.config.max_queued_bytes
        {
            q.failed = true;
            return Execution::error(&alloc::format!(
                "ERR transaction too large: at most {} queued commands and {} bytes",
                self.config.max_queued_commands,
                self.config.max_queued_bytes
            ));
        }
        q.commands.push(args.to_vec());
        q.bytes += cost;
        let mut r = s.reply();
        r.simple("QUEUED");
        Execution::reply(r)
    }

    fn cmd_discard(&mut self, s: &mut Session, _args: &[Vec<u8>], _now: u64) -> Execution {
        if s.multi.is_none() {
            return Execution::error(errors::DISCARD_WITHOUT_MULTI);
        }
        self.discard_transaction(s);
        Execution::ok()
    }

    /// Ends the session's transaction (if any) and its watches.
    fn discard_transaction(&mut self, s: &mut Session) {
        s.multi = None;
        self.unwatch_all(s);
    }

    fn cmd_watch(&mut self, s: &mut Session, args: &[Vec<u8>], now: u64) -> Execution {
        if s.multi.is_some() {
            // Redis does not fail the transaction for this.
            return Execution::error(errors::WATCH_IN_MULTI);
        }
        let mut new: Vec<&Vec<u8>> = Vec::new();
        for key in &args[1..] {
            if !new.contains(&key) && !s.watching.iter().any(|w| &w.key == key) {
                new.push(key);
            }
        }
        let cost: usize = new.iter().map(|k| counted(k)).sum();
        if s.watch_bytes + cost > self.config.max_watched_bytes {
            return Execution::error(&alloc::format!(
                "ERR too many watched keys: at most {} bytes of them",
                self.config.max_watched_bytes
            ));
        }
        for key in new {
            // An expired key is removed now (a change seen by whoever
            // watched it while it lived), so its removal later is no change
            // for this session, as in Redis.
            let live = self.live(key, now).is_some();
            let w = self.watched.entry(key.clone()).or_default();
            w.watchers += 1;
            s.watching.push(Watch {
                key: key.clone(),
                version: w.version,
                live,
            });
        }
        s.watch_bytes += cost;
        Execution::ok()
    }

    fn cmd_unwatch(&mut self, s: &mut Session, _args: &[Vec<u8>], _now: u64) -> Execution {
        self.unwatch_all(s);
        Execution::ok()
    }

    fn unwatch_all(&mut self, s: &mut Session) {
        for w in core::mem::take(&mut s.watching) {
            if let Some(k) = self.watched.get_mut(&w.key) {
                k.watchers = k.watchers.saturating_sub(1);
                if k.watchers == 0 {
                    self.watched.remove(&w.key);
                }
            }
        }
        s.watch_bytes = 0;
    }

    /// No key the session WATCHes changed since WATCH, and none that
    /// existed then has expired since.
    fn watches_hold(&self, s: &Session, now: u64) -> bool {
        s.watching.iter().all(|w| {
            self.watched
                .get(&w.key)
                .is_some_and(|k| k.version == w.version)
                && (!w.live || self.peek(&w.key, now).is_some())
        })
    }

    fn cmd_exec(&mut self, s: &mut Session, _args: &[Vec<u8>], now: u64) -> Execution {
        let Some(queue) = s.multi.take() else {
            return Execution::error(errors::EXEC_WITHOUT_MULTI);
        };
        let watches_hold = self.watches_hold(s, now);
        self.unwatch_all(s);
        if queue.failed {
            return Execution::error(errors::EXECABORT);
        }
        let mut r = s.reply();
        if !watches_hold {
            r.null_array();
            return Execution::reply(r);
        }
        r.array(queue.commands.len());
        let mut reply = r.into_bytes();
        self.transaction = Some(aof::TransactionRecord::new());
        let mut used = 0usize;
        for args in &queue.commands {
            self.stats.commands += 1;
            self.reply_room = self.config.max_reply.saturating_sub(used);
            // Checked when queued; only the session's state may differ.
            let e = match find_command(&args[0]) {
                Some(spec) => (spec.handler)(self, s, args, now),
                None => unknown_command(args),
            };
            if e.reply.len() > SMALL_REPLY && used + e.reply.len() > self.config.max_reply {
                reply.extend_from_slice(&self.reply_too_large().reply);
            } else {
                used += e.reply.len();
                reply.extend_from_slice(&e.reply);
            }
        }
        self.reply_room = self.config.max_reply;
        let log = self
            .transaction
            .take()
            .and_then(aof::TransactionRecord::finish);
        Execution {
            reply,
            log,
            close: false,
        }
    }

    fn reply_too_large(&self) -> Execution {
        Execution::error(&alloc::format!(
            "ERR reply too large (limit {} bytes)",
            self.config.max_reply
        ))
    }
}

/// Checks a user name against ftkv's one user, `default`, which has no
/// password (any password is accepted for it, as for Redis's `nopass`).
fn authenticate(user: &[u8]) -> Result<(), &'static str> {
    if user == b"default" {
        Ok(())
    } else {
        Err(errors::WRONGPASS)
    }
}

/// Client names and library attributes: printable ASCII without spaces
/// (Redis's rule); empty clears.
fn valid_attribute(value: &[u8]) -> bool {
    value.iter().all(|b| (b'!'..=b'~').contains(b))
}

fn is_expired(e: &Entry, now: u64) -> bool {
    e.expire_at.is_some_and(|at| now > at)
}

fn wrong_arity(name: &str) -> Execution {
    Execution::error_bytes(&wrong_arity_message(name, None))
}

/// `ERR wrong number of arguments for 'name' command` (`name|sub` for a subcommand).
fn wrong_arity_message(name: &str, sub: Option<&str>) -> Vec<u8> {
    let mut msg = b"ERR wrong number of arguments for '".to_vec();
    msg.extend_from_slice(name.as_bytes());
    if let Some(sub) = sub {
        msg.push(b'|');
        msg.extend_from_slice(sub.as_bytes());
    }
    msg.extend_from_slice(b"' command");
    msg
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
    Execution::error_bytes(&msg)
}

fn unknown_subcommand(sub: &[u8], command: &str) -> Execution {
    Execution::error_bytes(&unknown_subcommand_message(sub, command))
}

/// Redis's text: `ERR unknown subcommand 'x'. Try CONFIG HELP.`
fn unknown_subcommand_message(sub: &[u8], command: &str) -> Vec<u8> {
    let mut msg = b"ERR unknown subcommand '".to_vec();
    msg.extend_from_slice(&sub[..sub.len().min(128)]);
    msg.extend_from_slice(b"'. Try ");
    msg.extend_from_slice(command.to_ascii_uppercase().as_bytes());
    msg.extend_from_slice(b" HELP.");
    msg
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

//! The append-only log on the virtual disk.
//!
//! The whole disk is the log. All integers are little endian.
//!
//! ```text
//! sector 0 (bytes 0..512): header
//!   0   8  magic b"FTKVAOF\0"
//!   8   4  version (2; version 1 logs are read too)
//!   12  4  sector size (512)
//!   16  8  generation: a random nonzero number chosen when the log is made
//!   24  4  CRC-32 of bytes 0..24
//!   28  .. zero
//! from byte 512: records, back to back (no alignment, no padding)
//!   0   4  payload length n, 1..=MAX_PAYLOAD (0: end of the log)
//!   4   4  CRC-32 of (generation, n as 4 bytes, seq as 8 bytes, payload)
//!   8   8  seq: 1 for the first record, +1 for each next one
//!   16  n  payload (a keyspace change, see `encode_mutation`)
//! ```
//!
//! **Versions.** Version 2 added two payloads: a transaction (the changes
//! of one `EXEC`, applied all or nothing) and an expiry change. A version 1
//! log holds neither; it is read as it is, and the glue rewrites its header
//! as version 2 at boot ([`upgrade_header`]) before appending, so an older
//! ftkv refuses the disk (`BadVersion`) instead of stopping at the first
//! record it does not know and writing over the rest.
//!
//! **Boot replay** reads records from byte 512 and stops at the first one
//! that is not valid: a zero length (the normal end: the bytes after the
//! last record are zero), a length over the maximum or past the disk end,
//! a CRC mismatch, a sequence number other than the next expected one, or a
//! payload that does not decode. Everything before it is applied; nothing
//! at or after it is. The generation in every CRC rejects stale records of
//! an earlier log on the same disk, and the sequence number rejects stale
//! records of this log at the wrong place, so bytes after the end are never
//! misread as records. A torn last record (a crash during its write) fails
//! its CRC or length check and is discarded and reported; it was never
//! acknowledged, because replies wait for FLUSH.
//!
//! **Appending** ([`LogWriter`]): records are written in batches of whole
//! sectors starting at the sector that holds the current end; the bytes of
//! that sector before the end are rewritten unchanged (identical bytes, so
//! a torn rewrite cannot damage earlier records), the rest of the last
//! sector is zero. After boot the first write also zeroes
//! [`ZERO_AHEAD`] bytes past the end, wiping any fragments of a batch that
//! was being written when the machine stopped.

use crate::crc32::Crc32;
use crate::engine::{Engine, Mutation};
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

pub const SECTOR: u64 = 512;
pub const MAGIC: [u8; 8] = *b"FTKVAOF\0";
/// The version this code writes.
pub const VERSION: u32 = 2;
/// The oldest version this code reads.
pub const OLDEST_VERSION: u32 = 1;
/// Byte offset of the first record.
pub const LOG_START: u64 = SECTOR;
/// Bytes of a record before its payload.
pub const RECORD_HEADER: u64 = 16;
/// Largest record payload (a request is at most 1 MiB; see `resp::Limits`).
pub const MAX_PAYLOAD: usize = 2 * 1024 * 1024;
/// Most record bytes one [`LogWriter`] batch may hold (one record larger
/// than this still goes alone).
pub const MAX_BATCH: u64 = 4 * 1024 * 1024;
/// Bytes past the end zeroed by the first write after boot: covers any
/// batch that was in flight (at most `MAX_BATCH` plus one record).
pub const ZERO_AHEAD: u64 = MAX_BATCH + RECORD_HEADER + MAX_PAYLOAD as u64 + SECTOR;

/// Size on disk of a record with a payload of `payload_len` bytes.
pub fn record_len(payload_len: usize) -> u64 {
    RECORD_HEADER + payload_len as u64
}

// ---- header ----

/// A parsed log header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogHeader {
    pub generation: u64,
    /// [`OLDEST_VERSION`]..=[`VERSION`].
    pub version: u32,
}

/// Why sector 0 is not a valid log header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// Shorter than a sector.
    TooShort,
    /// All zero: a fresh disk. Format it.
    Blank,
    /// Not an ftkv log (no magic). Formatting it loses whatever it holds.
    BadMagic,
    /// An ftkv log of another version: do not touch.
    BadVersion(u32),
    /// The magic is there but the header is damaged: do not touch.
    BadChecksum,
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::TooShort => f.write_str("log header: shorter than one sector"),
            HeaderError::Blank => f.write_str("log header: blank disk (no log yet)"),
            HeaderError::BadMagic => f.write_str("log header: not an ftkv log (bad magic)"),
            HeaderError::BadVersion(v) => write!(f, "log header: unsupported version {v}"),
            HeaderError::BadChecksum => f.write_str("log header: checksum mismatch"),
        }
    }
}

/// The 512-byte header sector of a new log.
pub fn encode_header(generation: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(SECTOR as u32).to_le_bytes());
    h[16..24].copy_from_slice(&generation.to_le_bytes());
    let crc = crate::crc32::crc32(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Parses sector 0.
pub fn parse_header(sector: &[u8]) -> Result<LogHeader, HeaderError> {
    if sector.len() < SECTOR as usize {
        return Err(HeaderError::TooShort);
    }
    let h = &sector[..SECTOR as usize];
    if h.iter().all(|&b| b == 0) {
        return Err(HeaderError::Blank);
    }
    if h[0..8] != MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let crc = le32(&h[24..28]);
    if crate::crc32::crc32(&h[0..24]) != crc {
        return Err(HeaderError::BadChecksum);
    }
    let version = le32(&h[8..12]);
    if !(OLDEST_VERSION..=VERSION).contains(&version) || le32(&h[12..16]) != SECTOR as u32 {
        return Err(HeaderError::BadVersion(version));
    }
    Ok(LogHeader {
        generation: le64(&h[16..24]),
        version,
    })
}

/// For a log of an older version found at boot: the header sector to
/// write (and FLUSH) over sector 0 before anything is appended. Records of
/// older versions are valid records of this one, so only the version
/// changes. `None` when the log is current.
pub fn upgrade_header(report: &ReplayReport) -> Option<[u8; 512]> {
    (report.version < VERSION).then(|| encode_header(report.generation))
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn record_crc(generation: u64, seq: u64, payload: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(&generation.to_le_bytes());
    c.update(&(payload.len() as u32).to_le_bytes());
    c.update(&seq.to_le_bytes());
    c.update(payload);
    c.finish()
}

/// Appends one encoded record to `out`.
pub fn encode_record(generation: u64, seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    debug_assert!(!payload.is_empty() && payload.len() <= MAX_PAYLOAD);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&record_crc(generation, seq, payload).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
}

// ---- payloads ----

const OP_SET: u8 = 1;
const OP_MSET: u8 = 2;
const OP_DEL: u8 = 3;
const OP_FLUSHALL: u8 = 4;
// Version 2 on:
const OP_TRANSACTION: u8 = 5;
const OP_EXPIRE: u8 = 6;

/// A record payload that does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordError {
    Empty,
    /// An op this version does not have.
    UnknownOp(u8),
    /// A transaction inside a transaction.
    NestedTransaction,
    /// A transaction without changes (never written).
    EmptyTransaction,
    BadFlags(u8),
    Truncated,
    TrailingBytes,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::Empty => f.write_str("empty record"),
            RecordError::UnknownOp(op) => write!(f, "unknown record op {op}"),
            RecordError::NestedTransaction => f.write_str("transaction inside a transaction"),
            RecordError::EmptyTransaction => f.write_str("transaction without changes"),
            RecordError::BadFlags(x) => write!(f, "bad record flags {x:#04x}"),
            RecordError::Truncated => f.write_str("record payload truncated"),
            RecordError::TrailingBytes => f.write_str("record payload has trailing bytes"),
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_expiry(out: &mut Vec<u8>, expire_at: Option<u64>) {
    match expire_at {
        Some(at) => {
            out.push(1);
            out.extend_from_slice(&at.to_le_bytes());
        }
        None => out.push(0),
    }
}

/// Payload encoding:
///
/// ```text
/// SET:         01, flags (bit 0: has expiry), [expire_at_ms u64], key, value
/// MSET:        02, count u32, (key, value) * count     (no expiry)
/// DEL:         03, count u32, key * count
/// FLUSHALL:    04
/// TRANSACTION: 05, count u32, (length u32, payload) * count   (version 2;
///              count >= 1; the payloads are any of the others but 05)
/// EXPIRE:      06, flags (bit 0: has expiry), [expire_at_ms u64], key
///              (version 2: the key's new expiry, none = PERSIST)
/// where key / value = length u32, bytes
/// ```
pub(crate) fn encode_mutation(m: &Mutation) -> Vec<u8> {
    let mut out = Vec::new();
    match m {
        Mutation::Set {
            key,
            value,
            expire_at,
        } => {
            out.reserve(18 + key.len() + value.len());
            out.push(OP_SET);
            put_expiry(&mut out, *expire_at);
            put_bytes(&mut out, key);
            put_bytes(&mut out, value);
        }
        Mutation::Expire { key, expire_at } => {
            out.reserve(14 + key.len());
            out.push(OP_EXPIRE);
            put_expiry(&mut out, *expire_at);
            put_bytes(&mut out, key);
        }
        Mutation::MSet(pairs) => {
            out.push(OP_MSET);
            out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
            for (k, v) in pairs {
                put_bytes(&mut out, k);
                put_bytes(&mut out, v);
            }
        }
        Mutation::Del(keys) => {
            out.push(OP_DEL);
            out.extend_from_slice(&(keys.len() as u32).to_le_bytes());
            for k in keys {
                put_bytes(&mut out, k);
            }
        }
        Mutation::FlushAll => out.push(OP_FLUSHALL),
    }
    out
}

/// The log record of one `EXEC`, built while its commands run: every
/// change they make, in order, in one TRANSACTION payload, so replay
/// applies all of them or none (a record is valid as a whole or not at
/// all).
#[derive(Debug)]
pub(crate) struct TransactionRecord {
    payload: Vec<u8>,
    count: u32,
}

impl TransactionRecord {
    pub fn new() -> Self {
        TransactionRecord {
            payload: vec![OP_TRANSACTION, 0, 0, 0, 0],
            count: 0,
        }
    }

    /// Log bytes that adding a change of `len` payload bytes costs: its
    /// length prefix, and with the first change the record's own header.
    pub fn cost(&self, len: usize) -> u64 {
        let first = if self.count == 0 {
            record_len(self.payload.len())
        } else {
            0
        };
        first + 4 + len as u64
    }

    /// True if a change of `len` payload bytes still fits in the record.
    pub fn fits(&self, len: usize) -> bool {
        self.payload.len() + 4 + len <= MAX_PAYLOAD
    }

    pub fn push(&mut self, change: &[u8]) {
        put_bytes(&mut self.payload, change);
        self.count += 1;
    }

    /// The payload, or `None` if the transaction changed nothing.
    pub fn finish(mut self) -> Option<Vec<u8>> {
        if self.count == 0 {
            return None;
        }
        self.payload[1..5].copy_from_slice(&self.count.to_le_bytes());
        Some(self.payload)
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.0.len() < n {
            return Err(RecordError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(le32(self.take(4)?))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(le64(self.take(8)?))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, RecordError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    /// A count of items of at least `min_item` bytes each, checked against
    /// what is left before anything is allocated for it.
    fn count(&mut self, min_item: usize) -> Result<usize, RecordError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item) > self.0.len() {
            return Err(RecordError::Truncated);
        }
        Ok(n)
    }
}

/// A decoded record payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    One(Mutation),
    /// The changes of one EXEC, to apply together.
    Transaction(Vec<Mutation>),
}

/// Decodes a record payload of a log of `version` completely (nothing is
/// applied before the whole payload has decoded).
pub(crate) fn decode_record(payload: &[u8], version: u32) -> Result<Record, RecordError> {
    if payload.first() != Some(&OP_TRANSACTION) {
        return decode_mutation(payload, version).map(Record::One);
    }
    if version < 2 {
        return Err(RecordError::UnknownOp(OP_TRANSACTION));
    }
    let mut r = Reader(&payload[1..]);
    // Each change takes at least its length and an op byte.
    let n = r.count(5)?;
    let mut changes = Vec::with_capacity(n);
    for _ in 0..n {
        let len = r.u32()? as usize;
        let change = r.take(len)?;
        if change.first() == Some(&OP_TRANSACTION) {
            return Err(RecordError::NestedTransaction);
        }
        changes.push(decode_mutation(change, version)?);
    }
    if !r.0.is_empty() {
        return Err(RecordError::TrailingBytes);
    }
    if changes.is_empty() {
        return Err(RecordError::EmptyTransaction);
    }
    Ok(Record::Transaction(changes))
}

fn get_expiry(r: &mut Reader<'_>) -> Result<Option<u64>, RecordError> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(r.u64()?)),
        x => Err(RecordError::BadFlags(x)),
    }
}

/// One change (not a transaction).
fn decode_mutation(payload: &[u8], version: u32) -> Result<Mutation, RecordError> {
    let mut r = Reader(payload);
    let op = r.u8().map_err(|_| RecordError::Empty)?;
    let m = match op {
        OP_SET => {
            let expire_at = get_expiry(&mut r)?;
            let key = r.bytes()?;
            let value = r.bytes()?;
            Mutation::Set {
                key,
                value,
                expire_at,
            }
        }
        OP_MSET => {
            let n = r.count(8)?;
            let mut pairs = Vec::with_capacity(n);
            for _ in 0..n {
                let k = r.bytes()?;
                let v = r.bytes()?;
                pairs.push((k, v));
            }
            Mutation::MSet(pairs)
        }
        OP_DEL => {
            let n = r.count(4)?;
            let mut keys = Vec::with_capacity(n);
            for _ in 0..n {
                keys.push(r.bytes()?);
            }
            Mutation::Del(keys)
        }
        OP_FLUSHALL => Mutation::FlushAll,
        OP_EXPIRE if version >= 2 => {
            let expire_at = get_expiry(&mut r)?;
            let key = r.bytes()?;
            Mutation::Expire { key, expire_at }
        }
        x => return Err(RecordError::UnknownOp(x)),
    };
    if !r.0.is_empty() {
        return Err(RecordError::TrailingBytes);
    }
    Ok(m)
}

// ---- replay ----

/// Why replay stopped before a clean end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TornReason {
    /// The record runs past the end of the disk (or of the bytes fed).
    Truncated,
    /// A length over [`MAX_PAYLOAD`], or zero with other header bytes set.
    BadLength(u32),
    BadChecksum,
    OutOfSequence {
        expected: u64,
        found: u64,
    },
    /// The CRC matched but the payload does not decode (never written by
    /// this code: corruption or a bug).
    BadRecord(RecordError),
}

/// The invalid record where replay stopped (discarded with everything after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TornTail {
    /// Byte offset of the record on the disk.
    pub offset: u64,
    pub reason: TornReason,
}

/// What boot replay found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    pub generation: u64,
    /// The log's version (see [`upgrade_header`]).
    pub version: u32,
    /// Records applied.
    pub records: u64,
    /// Byte offset just after the last valid record: where appending resumes.
    pub end: u64,
    /// Sequence number for the next record.
    pub next_seq: u64,
    /// `None` at a clean end (zero header or exactly the disk end).
    pub torn: Option<TornTail>,
    /// Disk size in bytes the log was read with.
    pub capacity: u64,
    /// The bytes of the sector holding `end`, before `end` (for the writer).
    tail: Vec<u8>,
}

/// Incremental boot replay: feed the disk's bytes from [`LOG_START`] on,
/// in order and in pieces of any size, until [`Replayer::feed`] returns
/// false or the disk ends; then [`Replayer::finish`]. Holds at most one
/// record in memory.
#[derive(Debug)]
pub struct Replayer {
    generation: u64,
    version: u32,
    capacity: u64,
    /// Disk offset of the next record (of `buf[0]` when `buf` is not empty).
    offset: u64,
    /// The start of a record split across feeds.
    buf: Vec<u8>,
    next_seq: u64,
    records: u64,
    tail: Vec<u8>,
    done: Option<Option<TornTail>>,
}

impl Replayer {
    /// `capacity` is the disk size in bytes (rounded down to whole sectors).
    pub fn new(header: LogHeader, capacity: u64) -> Self {
        Replayer {
            generation: header.generation,
            version: header.version,
            capacity: capacity - capacity % SECTOR,
            offset: LOG_START,
            buf: Vec::new(),
            next_seq: 1,
            records: 0,
            tail: Vec::new(),
            done: None,
        }
    }

    /// Disk offset of the next byte to feed.
    pub fn next_offset(&self) -> u64 {
        self.offset + self.buf.len() as u64
    }

    /// Feeds the next bytes of the disk and applies every complete valid
    /// record to `engine`. Returns false once the end of the log is found
    /// (further bytes are ignored). Only a record split between two feeds
    /// is copied into the replayer's buffer.
    pub fn feed(&mut self, data: &[u8], engine: &mut Engine) -> bool {
        if self.done.is_some() {
            return false;
        }
        // Never read beyond the disk end.
        let room = self.capacity.saturating_sub(self.next_offset());
        let mut data = &data[..data.len().min(room as usize)];
        loop {
            if !self.buf.is_empty() {
                // Complete the record started in an earlier feed.
                let buf = core::mem::take(&mut self.buf);
                let want = match self.examine(&buf, engine) {
                    Examined::Need(n) => {
                        self.buf = buf;
                        n
                    }
                    Examined::Stopped => return false,
                    Examined::Applied(_) => continue,
                };
                let take = (want - self.buf.len()).min(data.len());
                self.buf.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.buf.len() < want {
                    return true;
                }
                continue;
            }
            match self.examine(data, engine) {
                Examined::Need(_) => {
                    self.buf.extend_from_slice(data);
                    return true;
                }
                Examined::Stopped => return false,
                Examined::Applied(n) => data = &data[n..],
            }
        }
    }

    /// Looks at the bytes of the record starting at `self.offset`: applies
    /// it if complete and valid, stops replay if invalid.
    fn examine(&mut self, rec: &[u8], engine: &mut Engine) -> Examined {
        if rec.len() < RECORD_HEADER as usize {
            return Examined::Need(RECORD_HEADER as usize);
        }
        let len = le32(&rec[0..4]);
        let offset = self.offset;
        let torn = |reason| Some(TornTail { offset, reason });
        if len == 0 {
            let end = if rec[..RECORD_HEADER as usize].iter().all(|&b| b == 0) {
                None
            } else {
                torn(TornReason::BadLength(0))
            };
            return self.stop(end);
        }
        if len as usize > MAX_PAYLOAD {
            return self.stop(torn(TornReason::BadLength(len)));
        }
        let total = record_len(len as usize);
        if offset + total > self.capacity {
            return self.stop(torn(TornReason::Truncated));
        }
        if (rec.len() as u64) < total {
            return Examined::Need(total as usize);
        }
        let record = &rec[..total as usize];
        let payload = &record[RECORD_HEADER as usize..];
        let seq = le64(&record[8..16]);
        if record_crc(self.generation, seq, payload) != le32(&record[4..8]) {
            return self.stop(torn(TornReason::BadChecksum));
        }
        if seq != self.next_seq {
            let expected = self.next_seq;
            return self.stop(torn(TornReason::OutOfSequence {
                expected,
                found: seq,
            }));
        }
        if let Err(e) = engine.apply_record(payload, self.version) {
            return self.stop(torn(TornReason::BadRecord(e)));
        }
        // Keep the bytes of the sector holding the new end.
        let end = offset + total;
        let sector_start = end - end % SECTOR;
        if sector_start >= offset {
            self.tail.clear();
            self.tail
                .extend_from_slice(&record[(sector_start - offset) as usize..]);
        } else {
            self.tail.extend_from_slice(record);
        }
        self.records += 1;
        self.next_seq += 1;
        self.offset = end;
        Examined::Applied(total as usize)
    }

    fn stop(&mut self, torn: Option<TornTail>) -> Examined {
        self.done = Some(torn);
        self.buf = Vec::new();
        Examined::Stopped
    }

    /// Ends replay (call when `feed` returned false or the disk ended).
    pub fn finish(mut self) -> ReplayReport {
        let torn = match self.done.take() {
            Some(torn) => torn,
            None => {
                if self.buf.iter().all(|&b| b == 0) {
                    None
                } else {
                    Some(TornTail {
                        offset: self.offset,
                        reason: TornReason::Truncated,
                    })
                }
            }
        };
        ReplayReport {
            generation: self.generation,
            version: self.version,
            records: self.records,
            end: self.offset,
            next_seq: self.next_seq,
            torn,
            capacity: self.capacity,
            tail: self.tail,
        }
    }
}

/// Replays a whole disk image held in memory (tests, tools).
pub fn replay(disk: &[u8], engine: &mut Engine) -> Result<ReplayReport, HeaderError> {
    let header = parse_header(disk)?;
    let mut r = Replayer::new(header, disk.len() as u64);
    r.feed(&disk[LOG_START as usize..], engine);
    Ok(r.finish())
}

enum Examined {
    /// At least this many bytes of the record are needed.
    Need(usize),
    Applied(usize),
    Stopped,
}

// ---- writer ----

/// Why a record cannot be appended now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendError {
    /// The disk has no room for it (the engine's log budget prevents this).
    Full,
    /// Empty or over [`MAX_PAYLOAD`].
    BadSize,
    /// The batch is at [`MAX_BATCH`]: write and flush it, then append again.
    BatchFull,
}

impl fmt::Display for AppendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AppendError::Full => f.write_str("disk full"),
            AppendError::BadSize => f.write_str("record payload empty or too large"),
            AppendError::BatchFull => f.write_str("batch full: write it first"),
        }
    }
}

/// One disk write: whole sectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingWrite {
    /// Byte offset, a multiple of [`SECTOR`].
    pub offset: u64,
    /// A multiple of [`SECTOR`] bytes.
    pub data: Vec<u8>,
}

impl PendingWrite {
    pub fn first_sector(&self) -> u64 {
        self.offset / SECTOR
    }
}

/// Builds the sector writes that append records to the log.
#[derive(Debug)]
pub struct LogWriter {
    generation: u64,
    capacity: u64,
    next_seq: u64,
    /// Start of the bytes not yet handed out by `take_pending`.
    durable_end: u64,
    /// End of the log including pending records.
    end: u64,
    /// Bytes from the sector holding `durable_end` up to `end`.
    pending: Vec<u8>,
    /// Zero the disk up to here with the next write (after boot).
    zero_until: u64,
    dirty: bool,
}

impl LogWriter {
    /// A new, empty log for a disk of `capacity` bytes (rounded down to
    /// whole sectors; at least two sectors). The first [`Self::take_pending`]
    /// writes the header sector. `generation` must be random and nonzero
    /// (take it from the platform's entropy).
    pub fn format(generation: u64, capacity: u64) -> Option<LogWriter> {
        let capacity = capacity - capacity % SECTOR;
        if capacity < 2 * SECTOR || generation == 0 {
            return None;
        }
        Some(LogWriter {
            generation,
            capacity,
            next_seq: 1,
            durable_end: 0,
            end: LOG_START,
            pending: encode_header(generation).to_vec(),
            zero_until: 2 * SECTOR,
            dirty: true,
        })
    }

    /// Continues the log found by boot replay. The first write also zeroes
    /// [`ZERO_AHEAD`] bytes past the end.
    pub fn resume(report: &ReplayReport) -> LogWriter {
        LogWriter {
            generation: report.generation,
            capacity: report.capacity,
            next_seq: report.next_seq,
            durable_end: report.end,
            end: report.end,
            pending: report.tail.clone(),
            zero_until: report.end.saturating_add(ZERO_AHEAD).min(report.capacity),
            dirty: true,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// End of the log (byte offset), pending records included.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Bytes left for records; give it to [`Engine::set_log_budget`].
    pub fn remaining(&self) -> u64 {
        self.capacity - self.end
    }

    /// Adds one record to the current batch.
    pub fn append(&mut self, payload: &[u8]) -> Result<(), AppendError> {
        if payload.is_empty() || payload.len() > MAX_PAYLOAD {
            return Err(AppendError::BadSize);
        }
        let len = record_len(payload.len());
        if len > self.remaining() {
            return Err(AppendError::Full);
        }
        if self.end > self.durable_end && self.end - self.durable_end + len > MAX_BATCH {
            return Err(AppendError::BatchFull);
        }
        encode_record(self.generation, self.next_seq, payload, &mut self.pending);
        self.next_seq += 1;
        self.end += len;
        self.dirty = true;
        Ok(())
    }

    /// True if there is something to write.
    pub fn has_pending(&self) -> bool {
        self.dirty
    }

    /// The sectors to write for everything appended since the last call
    /// (`None` if nothing). Write them, FLUSH, and only then send the
    /// replies that waited for these records. If the write or flush fails,
    /// retry the same `PendingWrite` or stop: do not call this again.
    pub fn take_pending(&mut self) -> Option<PendingWrite> {
        if !self.dirty {
            return None;
        }
        let start = self.durable_end - self.durable_end % SECTOR;
        let stop = self.end.max(self.zero_until);
        let stop = (stop.div_ceil(SECTOR) * SECTOR).min(self.capacity);
        let mut data = self.pending.clone();
        data.resize((stop - start) as usize, 0);
        // Keep only the part of the last sector before the end.
        let keep_from = (self.end - self.end % SECTOR) - start;
        self.pending = self.pending[keep_from as usize..].to_vec();
        self.durable_end = self.end;
        self.zero_until = 0;
        self.dirty = false;
        Some(PendingWrite {
            offset: start,
            data,
        })
    }
}

/// For tests elsewhere: an empty disk image of `sectors` sectors.
pub fn blank_disk(sectors: u64) -> Vec<u8> {
    vec![0u8; (sectors * SECTOR) as usize]
}

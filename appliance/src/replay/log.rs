//! The execution log: a header frame, then frames of entry batches. The same
//! encoding goes to a file (`ftvm record`) and over the log channel between
//! the sites (`ft::channel`).
//!
//! Frames come from `ftvm_transport::frame` (versioned header, max size,
//! CRC). The header's first field is the log format version, decoded on its
//! own first, so a log from a newer ftvm is refused by version, not
//! misparsed. An entries frame starts with a [`BatchHeader`] (the pair's
//! epoch, the index of its first entry and the entry count) followed by the
//! postcard-encoded entries back to back; entry `k` of a batch has index
//! `first_index + k`. Indexes start at 1 and have no gaps: acks, resumption
//! after a reconnect and the output rule all count in them.
//!
//! See docs/replay.md for the format and docs/protocol.md for how it travels.

use super::digest::PageRun;
use super::env::{ExitPoint, Input, Outcome};
use ftvm_transport::frame::{self, FrameError};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Version 2: entry batches with epoch and indexes, per-exit output checks,
/// exits spanning entries marked, disk-read hashes, machine shape and disk
/// root in the header.
pub const LOG_FORMAT_VERSION: u16 = 2;
pub const FRAME_HEADER: u8 = 1;
pub const FRAME_ENTRIES: u8 = 2;
/// Largest frame payload in a log.
pub const MAX_LOG_FRAME: usize = 1 << 20;
/// Room kept in a frame for the batch header.
const BATCH_HEADER_ROOM: usize = 32;
/// A file log frames its batch once it reaches this size.
const FILE_BATCH_TARGET: usize = 64 << 10;
/// Input bytes one entry carries before the rest go into `Inputs` entries
/// (an entry must fit one frame).
pub const INPUT_BYTES_PER_ENTRY: usize = 256 << 10;

/// How the backup gets the data of the guest's disk reads (DESIGN.md 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum DiskReads {
    /// The primary's read data travel in the log.
    #[default]
    Ship,
    /// The log carries a blake3 of the data; the backup reads its own disk
    /// and checks the hash.
    BackupReads,
}

impl DiskReads {
    pub fn name(self) -> &'static str {
        match self {
            DiskReads::Ship => "ship",
            DiskReads::BackupReads => "backup-reads",
        }
    }
}

/// The guest's disk as far as a log is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskShape {
    pub size: u64,
    pub chunk_size: u64,
}

/// What makes two machines able to run the same log: the same image, memory,
/// command line and devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineShape {
    pub image_hash: [u8; 32],
    pub memory_size: u64,
    pub cmdline: String,
    pub net_mac: Option<[u8; 6]>,
    pub disk: Option<DiskShape>,
}

fn mac_text(mac: &Option<[u8; 6]>) -> String {
    match mac {
        Some(m) => m
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
        None => "no network card".into(),
    }
}

fn disk_text(d: &Option<DiskShape>) -> String {
    match d {
        Some(d) => format!("a {} byte disk (chunks of {})", d.size, d.chunk_size),
        None => "no disk".into(),
    }
}

impl MachineShape {
    /// Why a log or peer described by `theirs` cannot run on this machine
    /// (`ours`), in words naming both values; `None` when they match.
    pub fn mismatch(&self, theirs: &MachineShape, them: &str) -> Option<String> {
        let short = |h: &[u8; 32]| super::digest::hex(h)[..16].to_string();
        if theirs.image_hash != self.image_hash {
            return Some(format!(
                "{them} has guest image {}, this machine {}",
                short(&theirs.image_hash),
                short(&self.image_hash)
            ));
        }
        if theirs.memory_size != self.memory_size {
            return Some(format!(
                "{them} has {} MiB of memory, this machine {} MiB",
                theirs.memory_size >> 20,
                self.memory_size >> 20
            ));
        }
        if theirs.cmdline != self.cmdline {
            return Some(format!(
                "{them} has command line {:?}, this machine {:?}",
                theirs.cmdline, self.cmdline
            ));
        }
        if theirs.net_mac != self.net_mac {
            return Some(format!(
                "{them} has network card {}, this machine {}",
                mac_text(&theirs.net_mac),
                mac_text(&self.net_mac)
            ));
        }
        if theirs.disk != self.disk {
            return Some(format!(
                "{them} has {}, this machine {}",
                disk_text(&theirs.disk),
                disk_text(&self.disk)
            ));
        }
        None
    }
}

/// Identifies what was recorded and where the log starts, so a replay on
/// another machine, disk or pair is refused with a reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogHeader {
    pub format_version: u16,
    pub shape: MachineShape,
    pub disk_reads: DiskReads,
    /// The disk's Merkle root when the log starts.
    pub disk_root: Option<[u8; 32]>,
    /// The pair's cluster id (empty for a file recording).
    pub cluster: String,
    /// The epoch the log was started in (0 for a file recording).
    pub epoch: u64,
    /// Index of the first entry (1 for a log from power-on).
    pub first_index: u64,
    /// Exits the machine had made when the log starts (0 from power-on).
    pub start_ordinal: u64,
}

/// The header of an entries frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchHeader {
    pub epoch: u64,
    pub first_index: u64,
    pub count: u32,
}

/// The output check of one exit: how many frames the guest sent during it
/// and a chained blake3 over them ([`TxDigest`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxCheck {
    pub frames: u32,
    pub digest: [u8; 32],
}

/// Chains the frames sent during one exit into a [`TxCheck`].
#[derive(Debug, Clone, Default)]
pub struct TxDigest {
    frames: u32,
    digest: [u8; 32],
}

impl TxDigest {
    pub fn add(&mut self, frame: &[u8]) {
        let mut h = blake3::Hasher::new();
        h.update(&self.digest);
        h.update(&(frame.len() as u64).to_le_bytes());
        h.update(frame);
        self.digest = *h.finalize().as_bytes();
        self.frames += 1;
    }

    /// The check so far (`None` when no frame was sent), and a reset.
    pub fn take(&mut self) -> Option<TxCheck> {
        let t = std::mem::take(self);
        (t.frames > 0).then_some(TxCheck {
            frames: t.frames,
            digest: t.digest,
        })
    }
}

/// One log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// Reserved: a zeroed buffer never decodes to a meaningful entry.
    Invalid,
    /// A guest-caused exit: where it happened, the clock, and the inputs
    /// handed in. `more` says the exit continues in `Inputs` entries; `tx`
    /// is the exit's output check, in the exit's last entry.
    Exit {
        ordinal: u64,
        point: ExitPoint,
        clock_ns: u64,
        inputs: Vec<Input>,
        more: bool,
        tx: Option<TxCheck>,
    },
    /// A state digest taken after exit `ordinal`.
    Digest {
        ordinal: u64,
        full: bool,
        pages: Vec<PageRun>,
        hash: [u8; 32],
    },
    /// The machine ended after exit `ordinal`.
    End {
        ordinal: u64,
        outcome: Outcome,
        digest: [u8; 32],
    },
    /// More inputs of exit `ordinal`, when they do not fit one entry.
    Inputs {
        ordinal: u64,
        inputs: Vec<Input>,
        more: bool,
        tx: Option<TxCheck>,
    },
}

impl Entry {
    pub fn ordinal(&self) -> u64 {
        match self {
            Entry::Invalid => 0,
            Entry::Exit { ordinal, .. }
            | Entry::Digest { ordinal, .. }
            | Entry::End { ordinal, .. }
            | Entry::Inputs { ordinal, .. } => *ordinal,
        }
    }

    /// Whether more entries of the same exit follow this one: a backup
    /// applies an exit only once all of its entries arrived.
    pub fn continues(&self) -> bool {
        matches!(
            self,
            Entry::Exit { more: true, .. } | Entry::Inputs { more: true, .. }
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("log {path}: corrupt frame: {source}")]
    Frame {
        path: PathBuf,
        #[source]
        source: FrameError,
    },
    #[error("log {path}: empty file (no header)")]
    Empty { path: PathBuf },
    #[error("log {path}: first frame is not a log header")]
    NoHeader { path: PathBuf },
    #[error("log {path}: format version {found} is newer than this ftvm supports ({LOG_FORMAT_VERSION})")]
    NewerVersion { path: PathBuf, found: u16 },
    #[error("log {path}: format version {found} is not supported (this ftvm reads version {LOG_FORMAT_VERSION})")]
    OldVersion { path: PathBuf, found: u16 },
    #[error("log {path}: undecodable {what}: {detail}")]
    Decode {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error("log {path}: unexpected frame kind {kind}")]
    FrameKind { path: PathBuf, kind: u8 },
    #[error(
        "log {path}: batch of entries {first}.. follows entry {last} (entries missing or repeated)"
    )]
    Gap {
        path: PathBuf,
        last: u64,
        first: u64,
    },
    #[error("log entry too large to frame: {0}")]
    EntryTooLarge(#[source] FrameError),
    #[error("encoding a log entry failed: {0}")]
    Encode(String),
    #[error("the log channel is closed: {0}")]
    Closed(String),
}

/// Encodes a header payload.
pub fn encode_header(h: &LogHeader) -> Result<Vec<u8>, LogError> {
    postcard::to_stdvec(h).map_err(|e| LogError::Encode(e.to_string()))
}

/// Decodes a header payload, checking the version before anything else.
pub fn decode_header(path: &Path, payload: &[u8]) -> Result<LogHeader, LogError> {
    let (version, _) = postcard::take_from_bytes::<u16>(payload).map_err(|e| LogError::Decode {
        path: path.to_path_buf(),
        what: "header version",
        detail: e.to_string(),
    })?;
    if version > LOG_FORMAT_VERSION {
        return Err(LogError::NewerVersion {
            path: path.to_path_buf(),
            found: version,
        });
    }
    if version < LOG_FORMAT_VERSION {
        return Err(LogError::OldVersion {
            path: path.to_path_buf(),
            found: version,
        });
    }
    postcard::from_bytes(payload).map_err(|e| LogError::Decode {
        path: path.to_path_buf(),
        what: "header",
        detail: e.to_string(),
    })
}

/// Encodes one entry (appended to a batch as is).
pub fn encode_entry(entry: &Entry, out: &mut Vec<u8>) -> Result<(), LogError> {
    let bytes = postcard::to_stdvec(entry).map_err(|e| LogError::Encode(e.to_string()))?;
    if bytes.len() + BATCH_HEADER_ROOM > MAX_LOG_FRAME {
        return Err(LogError::Encode(format!(
            "an entry of {} bytes does not fit a {MAX_LOG_FRAME} byte frame",
            bytes.len()
        )));
    }
    out.extend_from_slice(&bytes);
    Ok(())
}

/// An entries-frame payload: the batch header, then `entries` (already encoded).
pub fn encode_batch(header: &BatchHeader, entries: &[u8]) -> Result<Vec<u8>, LogError> {
    let mut out = postcard::to_stdvec(header).map_err(|e| LogError::Encode(e.to_string()))?;
    out.extend_from_slice(entries);
    Ok(out)
}

/// Whether `more` encoded bytes still fit a batch already holding `len`.
pub fn batch_has_room(len: usize, more: usize) -> bool {
    len + more + BATCH_HEADER_ROOM <= MAX_LOG_FRAME
}

/// Decodes one entries-frame payload, checking that it holds exactly the
/// number of entries its header says and no reserved entry.
pub fn decode_batch(path: &Path, payload: &[u8]) -> Result<(BatchHeader, Vec<Entry>), LogError> {
    let bad = |what: &'static str, detail: String| LogError::Decode {
        path: path.to_path_buf(),
        what,
        detail,
    };
    let (header, mut rest) = postcard::take_from_bytes::<BatchHeader>(payload)
        .map_err(|e| bad("batch header", e.to_string()))?;
    if header.first_index == 0
        || header
            .first_index
            .checked_add(header.count.into())
            .is_none()
    {
        return Err(bad(
            "batch header",
            format!("first index {} is invalid", header.first_index),
        ));
    }
    // A count larger than the payload could hold is refused before allocating.
    if header.count as usize > payload.len() {
        return Err(bad(
            "batch header",
            format!(
                "{} entries cannot fit {} bytes",
                header.count,
                payload.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(header.count as usize);
    while !rest.is_empty() {
        let (e, r) =
            postcard::take_from_bytes::<Entry>(rest).map_err(|e| bad("entry", e.to_string()))?;
        if e == Entry::Invalid {
            return Err(bad(
                "entry",
                format!(
                    "reserved entry kind at index {}",
                    header.first_index + out.len() as u64
                ),
            ));
        }
        out.push(e);
        rest = r;
    }
    if out.len() != header.count as usize {
        return Err(bad(
            "batch",
            format!(
                "header says {} entries, the frame holds {}",
                header.count,
                out.len()
            ),
        ));
    }
    Ok((header, out))
}

/// Where a recorder's entries go: a file ([`LogWriter`]) or the log
/// channel to the backup (`ft::log_queue`).
pub trait LogSink {
    /// Appends an entry; returns its index.
    fn append(&mut self, entry: &Entry) -> Result<u64, LogError>;
    /// Index of the last entry appended (0 before the first).
    fn last_index(&self) -> u64;
    /// A guest output depends on every entry appended so far: make them
    /// leave now rather than when the batch fills.
    fn flush_for_output(&mut self) -> Result<(), LogError>;
    /// Hands everything appended to the underlying writer or channel.
    fn flush(&mut self) -> Result<(), LogError>;
    /// Log bytes (framed) and entries written so far.
    fn stats(&self) -> (u64, u64);
}

/// Writes a log file: header first, then batches of entries.
pub struct LogWriter<W: Write> {
    out: W,
    path: PathBuf,
    epoch: u64,
    batch: Vec<u8>,
    batch_first: u64,
    batch_count: u32,
    next_index: u64,
    /// Bytes written so far (frames included).
    pub bytes: u64,
    /// Entries appended so far.
    pub entries: u64,
}

impl<W: Write> std::fmt::Debug for LogWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWriter")
            .field("path", &self.path)
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl LogWriter<BufWriter<std::fs::File>> {
    pub fn create(path: &Path, header: &LogHeader) -> Result<Self, LogError> {
        let file = std::fs::File::create(path).map_err(|source| LogError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        LogWriter::new(BufWriter::new(file), path, header)
    }
}

impl<W: Write> LogWriter<W> {
    pub fn new(out: W, name: &Path, header: &LogHeader) -> Result<Self, LogError> {
        let mut w = LogWriter {
            out,
            path: name.to_path_buf(),
            epoch: header.epoch,
            batch: Vec::with_capacity(FILE_BATCH_TARGET * 2),
            batch_first: header.first_index,
            batch_count: 0,
            next_index: header.first_index,
            bytes: 0,
            entries: 0,
        };
        let payload = encode_header(header)?;
        w.write_frame(FRAME_HEADER, &payload)?;
        Ok(w)
    }

    fn write_frame(&mut self, kind: u8, payload: &[u8]) -> Result<(), LogError> {
        let mut buf = Vec::with_capacity(payload.len() + frame::HEADER_LEN);
        frame::encode_frame(kind, payload, MAX_LOG_FRAME, &mut buf)
            .map_err(LogError::EntryTooLarge)?;
        self.out.write_all(&buf).map_err(|source| LogError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.bytes += buf.len() as u64;
        Ok(())
    }

    /// Frames whatever entries are batched.
    pub fn flush_batch(&mut self) -> Result<(), LogError> {
        if self.batch_count == 0 {
            return Ok(());
        }
        let header = BatchHeader {
            epoch: self.epoch,
            first_index: self.batch_first,
            count: self.batch_count,
        };
        let payload = encode_batch(&header, &self.batch)?;
        self.write_frame(FRAME_ENTRIES, &payload)?;
        self.batch.clear();
        self.batch_first = self.next_index;
        self.batch_count = 0;
        Ok(())
    }

    pub fn into_inner(mut self) -> Result<W, LogError> {
        LogSink::flush(&mut self)?;
        Ok(self.out)
    }
}

impl<W: Write> LogSink for LogWriter<W> {
    fn append(&mut self, entry: &Entry) -> Result<u64, LogError> {
        let mut encoded = Vec::new();
        encode_entry(entry, &mut encoded)?;
        if !batch_has_room(self.batch.len(), encoded.len()) {
            self.flush_batch()?;
        }
        self.batch.extend_from_slice(&encoded);
        self.batch_count += 1;
        let index = self.next_index;
        self.next_index += 1;
        self.entries += 1;
        if self.batch.len() >= FILE_BATCH_TARGET {
            self.flush_batch()?;
        }
        Ok(index)
    }

    fn last_index(&self) -> u64 {
        self.next_index - 1
    }

    /// A file has no reader waiting on outputs.
    fn flush_for_output(&mut self) -> Result<(), LogError> {
        Ok(())
    }

    fn flush(&mut self) -> Result<(), LogError> {
        self.flush_batch()?;
        self.out.flush().map_err(|source| LogError::Io {
            path: self.path.clone(),
            source,
        })
    }

    fn stats(&self) -> (u64, u64) {
        (self.bytes, self.entries)
    }
}

/// Where a replayer's entries come from: a file ([`LogReader`]) or the log
/// channel from the primary (`ft::replay_queue`).
pub trait EntrySource {
    /// The next entry; `None` at the end of the log (for a live log: the
    /// backup is to go live at this point).
    fn next_entry(&mut self) -> Result<Option<Entry>, super::env::EnvError>;
    /// The next entry without consuming it.
    fn peek_entry(&mut self) -> Result<Option<&Entry>, super::env::EnvError>;
}

/// Reads a log file: the header on open, then entries one at a time.
pub struct LogReader<R: Read> {
    input: R,
    path: PathBuf,
    pub header: LogHeader,
    pending: VecDeque<Entry>,
    next_index: u64,
}

impl<R: Read> std::fmt::Debug for LogReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader")
            .field("path", &self.path)
            .finish()
    }
}

impl LogReader<BufReader<std::fs::File>> {
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let file = std::fs::File::open(path).map_err(|source| LogError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        LogReader::new(BufReader::new(file), path)
    }
}

impl<R: Read> LogReader<R> {
    pub fn new(mut input: R, name: &Path) -> Result<Self, LogError> {
        let path = name.to_path_buf();
        let first = frame::read_frame(&mut input, MAX_LOG_FRAME)
            .map_err(|source| LogError::Frame {
                path: path.clone(),
                source,
            })?
            .ok_or_else(|| LogError::Empty { path: path.clone() })?;
        if first.kind != FRAME_HEADER {
            return Err(LogError::NoHeader { path });
        }
        let header = decode_header(&path, &first.payload)?;
        Ok(LogReader {
            input,
            path,
            next_index: header.first_index,
            header,
            pending: VecDeque::new(),
        })
    }

    fn fill(&mut self) -> Result<bool, LogError> {
        while self.pending.is_empty() {
            let Some(f) = frame::read_frame(&mut self.input, MAX_LOG_FRAME).map_err(|source| {
                LogError::Frame {
                    path: self.path.clone(),
                    source,
                }
            })?
            else {
                return Ok(false);
            };
            if f.kind != FRAME_ENTRIES {
                return Err(LogError::FrameKind {
                    path: self.path.clone(),
                    kind: f.kind,
                });
            }
            let (batch, entries) = decode_batch(&self.path, &f.payload)?;
            if batch.first_index != self.next_index {
                return Err(LogError::Gap {
                    path: self.path.clone(),
                    last: self.next_index - 1,
                    first: batch.first_index,
                });
            }
            self.next_index += u64::from(batch.count);
            self.pending.extend(entries);
        }
        Ok(true)
    }

    /// The next entry, or `None` at the end of the log.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, LogError> {
        if !self.fill()? {
            return Ok(None);
        }
        Ok(self.pending.pop_front())
    }

    /// The next entry without consuming it.
    pub fn peek_entry(&mut self) -> Result<Option<&Entry>, LogError> {
        if !self.fill()? {
            return Ok(None);
        }
        Ok(self.pending.front())
    }
}

impl<R: Read> EntrySource for LogReader<R> {
    fn next_entry(&mut self) -> Result<Option<Entry>, super::env::EnvError> {
        Ok(LogReader::next_entry(self)?)
    }

    fn peek_entry(&mut self) -> Result<Option<&Entry>, super::env::EnvError> {
        Ok(LogReader::peek_entry(self)?)
    }
}

/// Reads a whole log file into memory (tools and tests).
pub fn read_all(path: &Path) -> Result<(LogHeader, Vec<Entry>), LogError> {
    let mut r = LogReader::open(path)?;
    let mut entries = Vec::new();
    while let Some(e) = r.next_entry()? {
        entries.push(e);
    }
    Ok((r.header, entries))
}

/// Writes a whole log file (tools and tests).
pub fn write_all(path: &Path, header: &LogHeader, entries: &[Entry]) -> Result<(), LogError> {
    let mut w = LogWriter::create(path, header)?;
    for e in entries {
        w.append(e)?;
    }
    LogSink::flush(&mut w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::env::ExitKind;

    fn header() -> LogHeader {
        LogHeader {
            format_version: LOG_FORMAT_VERSION,
            shape: MachineShape {
                image_hash: [7; 32],
                memory_size: 64 << 20,
                cmdline: "workload=x".into(),
                net_mac: None,
                disk: None,
            },
            disk_reads: DiskReads::Ship,
            disk_root: None,
            cluster: String::new(),
            epoch: 0,
            first_index: 1,
            start_ordinal: 0,
        }
    }

    fn exit(ordinal: u64) -> Entry {
        Entry::Exit {
            ordinal,
            point: ExitPoint {
                kind: ExitKind::PioOut,
                addr: 0x500,
                size: 4,
                value: 0x3ff_ff00,
            },
            clock_ns: ordinal * 1000,
            inputs: vec![Input::Entropy(vec![1, 2, 3])],
            more: false,
            tx: None,
        }
    }

    #[test]
    fn round_trip_many_batches() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        let entries: Vec<_> = (1..20_000).map(exit).collect();
        write_all(&p, &header(), &entries).unwrap();
        let (h, back) = read_all(&p).unwrap();
        assert_eq!(h, header());
        assert_eq!(back, entries);
    }

    #[test]
    fn newer_version_refused_by_version() {
        let mut h = header();
        h.format_version = LOG_FORMAT_VERSION + 1;
        let payload = encode_header(&h).unwrap();
        let err = decode_header(Path::new("l"), &payload).unwrap_err();
        assert!(
            matches!(err, LogError::NewerVersion { found, .. } if found == LOG_FORMAT_VERSION + 1)
        );
    }

    #[test]
    fn batch_count_and_reserved_entries_are_checked() {
        let mut entries = Vec::new();
        encode_entry(&exit(1), &mut entries).unwrap();
        encode_entry(&exit(2), &mut entries).unwrap();
        let h = |count| BatchHeader {
            epoch: 1,
            first_index: 5,
            count,
        };
        let ok = encode_batch(&h(2), &entries).unwrap();
        let (hdr, back) = decode_batch(Path::new("l"), &ok).unwrap();
        assert_eq!((hdr.first_index, back.len()), (5, 2));
        let wrong = encode_batch(&h(3), &entries).unwrap();
        assert!(decode_batch(Path::new("l"), &wrong).is_err());
        let huge = encode_batch(&h(u32::MAX), &entries).unwrap();
        assert!(decode_batch(Path::new("l"), &huge).is_err());
        // A zeroed entry is the reserved kind, never an exit.
        let mut zeroed = entries.clone();
        zeroed.push(0);
        let z = encode_batch(&h(3), &zeroed).unwrap();
        let err = decode_batch(Path::new("l"), &z).unwrap_err().to_string();
        assert!(err.contains("reserved"), "{err}");
    }

    #[test]
    fn tx_digest_chains_frames_in_order() {
        let mut a = TxDigest::default();
        a.add(b"one");
        a.add(b"two");
        let mut b = TxDigest::default();
        b.add(b"two");
        b.add(b"one");
        let (ca, cb) = (a.take().unwrap(), b.take().unwrap());
        assert_eq!(ca.frames, 2);
        assert_ne!(ca.digest, cb.digest);
        assert!(a.take().is_none(), "take resets");
    }

    #[test]
    fn shapes_name_what_differs() {
        let a = header().shape;
        let mut b = a.clone();
        assert_eq!(a.mismatch(&b, "the log"), None);
        b.net_mac = Some([0x52, 0x54, 0, 1, 2, 3]);
        let why = a.mismatch(&b, "the log").unwrap();
        assert!(why.contains("52:54:00:01:02:03"), "{why}");
        b = a.clone();
        b.memory_size = 128 << 20;
        assert!(a.mismatch(&b, "peer").unwrap().contains("128 MiB"));
    }
}

//! The execution log: a header frame, then frames of entries. The same entry
//! encoding goes to a file (`ftvm record`) and, later, over the log channel.
//!
//! Frames come from `ftvm_transport::frame` (versioned header, max size,
//! CRC); entries inside a frame are postcard-encoded one after another.
//! The header's first field is the log format version, decoded on its own
//! first, so a log from a newer ftvm is refused by version, not misparsed.

use super::digest::PageRun;
use super::env::{ExitPoint, Input, Outcome};
use ftvm_transport::frame::{self, FrameError};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

pub const LOG_FORMAT_VERSION: u16 = 1;
pub const FRAME_HEADER: u8 = 1;
pub const FRAME_ENTRIES: u8 = 2;
/// Largest frame payload in a log.
pub const MAX_LOG_FRAME: usize = 1 << 20;
/// A batch of entries is framed once it reaches this size.
const BATCH_TARGET: usize = 64 << 10;

/// Identifies what was recorded, so a replay with another image or machine is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogHeader {
    pub format_version: u16,
    pub image_hash: [u8; 32],
    pub memory_size: u64,
    pub cmdline: String,
}

/// One log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// A guest-caused exit: where it happened, the clock, and the inputs handed in.
    Exit {
        ordinal: u64,
        point: ExitPoint,
        clock_ns: u64,
        inputs: Vec<Input>,
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
    Inputs { ordinal: u64, inputs: Vec<Input> },
}

/// Input bytes one entry carries before the rest go into `Inputs` entries
/// (an entry must fit one frame).
pub const INPUT_BYTES_PER_ENTRY: usize = 256 << 10;

impl Entry {
    pub fn ordinal(&self) -> u64 {
        match self {
            Entry::Exit { ordinal, .. }
            | Entry::Digest { ordinal, .. }
            | Entry::End { ordinal, .. }
            | Entry::Inputs { ordinal, .. } => *ordinal,
        }
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
    #[error("log {path}: format version {found} is not supported")]
    OldVersion { path: PathBuf, found: u16 },
    #[error("log {path}: undecodable {what}: {detail}")]
    Decode {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error("log {path}: unexpected frame kind {kind}")]
    FrameKind { path: PathBuf, kind: u8 },
    #[error("log entry too large to frame: {0}")]
    EntryTooLarge(#[source] FrameError),
    #[error("encoding a log entry failed: {0}")]
    Encode(String),
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

/// Decodes every entry of one entries-frame payload.
pub fn decode_entries(path: &Path, payload: &[u8]) -> Result<Vec<Entry>, LogError> {
    let mut out = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        let (e, r) = postcard::take_from_bytes::<Entry>(rest).map_err(|e| LogError::Decode {
            path: path.to_path_buf(),
            what: "entry",
            detail: e.to_string(),
        })?;
        out.push(e);
        rest = r;
    }
    Ok(out)
}

/// Writes a log: header first, then entries in batches.
pub struct LogWriter<W: Write> {
    out: W,
    path: PathBuf,
    batch: Vec<u8>,
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
            batch: Vec::with_capacity(BATCH_TARGET * 2),
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

    pub fn append(&mut self, entry: &Entry) -> Result<(), LogError> {
        let encoded = postcard::to_stdvec(entry).map_err(|e| LogError::Encode(e.to_string()))?;
        if self.batch.len() + encoded.len() > MAX_LOG_FRAME {
            self.flush_batch()?;
        }
        self.batch.extend_from_slice(&encoded);
        self.entries += 1;
        if self.batch.len() >= BATCH_TARGET {
            self.flush_batch()?;
        }
        Ok(())
    }

    /// Frames whatever entries are batched.
    pub fn flush_batch(&mut self) -> Result<(), LogError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.write_frame(FRAME_ENTRIES, &batch)?;
        self.batch = batch;
        self.batch.clear();
        Ok(())
    }

    /// Flushes everything to the underlying writer.
    pub fn flush(&mut self) -> Result<(), LogError> {
        self.flush_batch()?;
        self.out.flush().map_err(|source| LogError::Io {
            path: self.path.clone(),
            source,
        })
    }

    pub fn into_inner(mut self) -> Result<W, LogError> {
        self.flush()?;
        Ok(self.out)
    }
}

/// Reads a log: the header on open, then entries one at a time.
pub struct LogReader<R: Read> {
    input: R,
    path: PathBuf,
    pub header: LogHeader,
    pending: VecDeque<Entry>,
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
            self.pending.extend(decode_entries(&self.path, &f.payload)?);
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
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::env::ExitKind;

    fn header() -> LogHeader {
        LogHeader {
            format_version: LOG_FORMAT_VERSION,
            image_hash: [7; 32],
            memory_size: 64 << 20,
            cmdline: "workload=x".into(),
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
}

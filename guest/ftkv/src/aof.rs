//! The append-only log on the disk (format: `docs/ftkv.md`, code:
//! `ftkv_core::aof`): boot replay and durable batch writes.

use alloc::format;
use alloc::string::String;
use alloc::vec;

use ftkv_core::aof::{self, HeaderError, LogWriter, ReplayReport, Replayer};
use ftkv_core::Engine;

use crate::disk::{Disk, DiskError, SECTOR};

/// Bytes read per exit during boot replay. Disk reads are inputs: `ftvm
/// record` logs all inputs of one exit as one log entry, and an entry is
/// at most 1 MiB (`transport::frame`), so one exit must not read more than
/// that, with room left for the RX frames delivered at the same exit.
const READ_CHUNK: usize = 512 << 10;

pub struct Aof {
    disk: Disk,
    writer: LogWriter,
    /// A write or flush failed: nothing more is written (see `docs/ftkv.md`).
    failed: bool,
}

/// What boot found on the disk.
pub enum Boot {
    /// A blank (or, with `format`, foreign) disk got a new log.
    Formatted { generation: u64 },
    /// An existing log was replayed.
    Replayed(ReplayReport),
}

fn random_generation() -> u64 {
    loop {
        let mut b = [0u8; 8];
        ftvm_guest_rt::entropy(&mut b);
        let g = u64::from_le_bytes(b);
        if g != 0 {
            return g;
        }
    }
}

/// Reads the log from `disk` into `engine`. A blank disk is formatted (and
/// the header made durable at once); a disk without the ftkv magic only if
/// `allow_format`; a damaged header or an unknown version is refused, and
/// the disk is left untouched. A log of an older version gets the current
/// version's header (made durable before anything is appended, so an older
/// ftkv refuses the disk rather than misread the new records).
pub fn boot(disk: Disk, engine: &mut Engine, allow_format: bool) -> Result<(Aof, Boot), String> {
    let mut disk = disk;
    let capacity = disk.capacity() - disk.capacity() % SECTOR as u64;
    if capacity < 2 * SECTOR as u64 {
        return Err(format!("disk of {capacity} bytes is too small for a log"));
    }
    let report = match replay(&mut disk, engine) {
        Ok(v) => v,
        Err(HeaderError::Blank) => return format_log(disk, capacity),
        Err(HeaderError::BadMagic) if allow_format => return format_log(disk, capacity),
        Err(HeaderError::BadMagic) => {
            return Err(String::from(
                "the disk holds no ftkv log (no FTKVAOF magic); boot with `format` on the command line to overwrite it",
            ))
        }
        Err(e) => return Err(format!("{e}; refusing to start (the disk is not changed)")),
    };
    if let Some(header) = aof::upgrade_header(&report) {
        disk.write_durable(0, &header)
            .map_err(|e| format!("upgrading the log header failed: {e}"))?;
    }
    let writer = LogWriter::resume(&report);
    Ok((
        Aof {
            disk,
            writer,
            failed: false,
        },
        Boot::Replayed(report),
    ))
}

/// Replays the whole log into `engine` (one exit per 512 KiB read).
fn replay(disk: &mut Disk, engine: &mut Engine) -> Result<ReplayReport, HeaderError> {
    let capacity = disk.capacity() - disk.capacity() % SECTOR as u64;
    let mut buf = vec![0u8; READ_CHUNK.min(capacity as usize)];
    let first = buf.len();
    if let Err(e) = disk.read(0, &mut buf[..first]) {
        panic!("ftkv: reading the log failed: {e}");
    }
    let header = aof::parse_header(&buf[..SECTOR])?;
    let mut replayer = Replayer::new(header, capacity);
    let mut more = replayer.feed(&buf[aof::LOG_START as usize..first], engine);
    let mut offset = first as u64;
    while more && offset < capacity {
        let n = (capacity - offset).min(READ_CHUNK as u64) as usize;
        if let Err(e) = disk.read(offset, &mut buf[..n]) {
            panic!("ftkv: reading the log at byte {offset} failed: {e}");
        }
        more = replayer.feed(&buf[..n], engine);
        offset += n as u64;
    }
    Ok(replayer.finish())
}

fn format_log(disk: Disk, capacity: u64) -> Result<(Aof, Boot), String> {
    let generation = random_generation();
    let writer = LogWriter::format(generation, capacity)
        .ok_or_else(|| String::from("disk too small for a log"))?;
    let mut log = Aof {
        disk,
        writer,
        failed: false,
    };
    log.commit()
        .map_err(|e| format!("writing the new log header failed: {e}"))?;
    Ok((log, Boot::Formatted { generation }))
}

impl Aof {
    /// Bytes left for records (the engine's log budget).
    pub fn remaining(&self) -> u64 {
        self.writer.remaining()
    }

    pub fn capacity(&self) -> u64 {
        self.disk.capacity()
    }

    /// Adds a record to the current batch; a full batch is written first
    /// (one exit). Err: the record cannot be made durable.
    pub fn append(&mut self, payload: &[u8]) -> Result<(), String> {
        if self.failed {
            return Err(String::from("log writes failed earlier"));
        }
        match self.writer.append(payload) {
            Ok(()) => Ok(()),
            Err(aof::AppendError::BatchFull) => {
                self.commit().map_err(|e| format!("{e}"))?;
                self.writer.append(payload).map_err(|e| format!("{e}"))
            }
            Err(e) => Err(format!("{e}")),
        }
    }

    pub fn has_pending(&self) -> bool {
        !self.failed && self.writer.has_pending()
    }

    /// Writes and FLUSHes everything appended so far: one exit. After an
    /// error nothing more is written (the writer must not be reused).
    pub fn commit(&mut self) -> Result<(), DiskError> {
        if self.failed {
            return Err(DiskError::BadRange);
        }
        let Some(pending) = self.writer.take_pending() else {
            return Ok(());
        };
        let r = self.disk.write_durable(pending.offset, &pending.data);
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    /// After a failed write: a keyspace rebuilt from what is on the disk.
    pub fn reload(&mut self, engine: &mut Engine) -> Result<u64, String> {
        replay(&mut self.disk, engine)
            .map(|report| report.records)
            .map_err(|e| format!("{e}"))
    }
}

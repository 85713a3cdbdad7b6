//! Virtual disk images for ftvm.
//!
//! A disk is a raw image file (or block device). [`DiskImage`] reads and
//! writes it at byte offsets and keeps a blake3 hash of every fixed-size
//! chunk plus a Merkle tree over them, updated as writes land (O(log n) per
//! chunk written). Two sites compare disks by exchanging their
//! [`ChunkHashes`] (or first just their [`DiskImage::merkle_root`]) in one
//! round trip, [`diff`] names the chunk ranges that differ, and
//! [`DiskImage::read_chunk`] / [`DiskImage::write_chunk`] move only those.
//!
//! The exact hash definitions are in `docs/storage.md` and in [`merkle`].
//! This crate knows nothing of KVM or the network.
#![forbid(unsafe_code)]

mod cli;
mod image;
pub mod merkle;

pub use cli::{parse_size, run_disk, DiskCommand, DiskCommandOutcome};
pub use image::{DiskImage, WrittenChunks};
pub use merkle::{diff, ChunkHashes, Hash32};

use std::io;
use std::path::PathBuf;

/// Default chunk size: 64 KiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 * 1024;
/// Smallest accepted chunk size (one sector).
pub const MIN_CHUNK_SIZE: u64 = 512;
/// Largest accepted chunk size (64 MiB).
pub const MAX_CHUNK_SIZE: u64 = 64 * 1024 * 1024;

/// An error from a disk image or a disk command. Errors about a file name
/// the file and the operation.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {op} out of range: offset {offset} + length {len} is past the disk size of {size} bytes")]
    OutOfRange {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{path}: {op}: chunk {index} out of range (the disk has {count} chunks)")]
    ChunkOutOfRange {
        path: PathBuf,
        op: &'static str,
        index: u64,
        count: u64,
    },
    #[error("{path}: write_chunk {index}: got {got} bytes, the chunk is {expected} bytes")]
    ChunkLength {
        path: PathBuf,
        index: u64,
        got: usize,
        expected: u64,
    },
    #[error("chunk size {0} is invalid: it must be a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes")]
    InvalidChunkSize(u64),
    #[error("disk size {text:?} is invalid: {reason}")]
    InvalidSize { text: String, reason: String },
    #[error("{path}: {op} refused: the image is open read-only")]
    ReadOnly { path: PathBuf, op: &'static str },
    #[error("{path}: {op} refused: a failed write left the image's contents unknown; reopen it")]
    Poisoned { path: PathBuf, op: &'static str },
    #[error("cannot compare chunk hashes made with chunk sizes {a} and {b}")]
    ChunkSizeMismatch { a: u64, b: u64 },
    #[error("chunk hash list is malformed: {0}")]
    Decode(&'static str),
    #[error("writing command output: {0}")]
    Output(#[source] io::Error),
}

impl StorageError {
    /// True when the error is the device or file system being full (or a
    /// quota exceeded): the VMM reports it to the guest as an I/O error and
    /// stops, never ignores it.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StorageError::Io { source, .. } => {
                matches!(
                    source.kind(),
                    io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
                ) || matches!(
                    source.raw_os_error(),
                    Some(28 /* ENOSPC */) | Some(122 /* EDQUOT */)
                )
            }
            _ => false,
        }
    }
}

/// Checks a chunk size against [`MIN_CHUNK_SIZE`], [`MAX_CHUNK_SIZE`] and
/// the power-of-two rule.
pub fn check_chunk_size(chunk_size: u64) -> Result<(), StorageError> {
    if chunk_size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        Ok(())
    } else {
        Err(StorageError::InvalidChunkSize(chunk_size))
    }
}

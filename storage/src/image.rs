//! Raw image files with chunk hashes kept up to date. A write that covers
//! whole chunks hashes them from its data; a chunk a write covers only in
//! part is marked stale and hashed again from the file when the hashes are
//! next read (`merkle_root`, `chunk_hashes`), so a log that appends a few
//! KiB per write into the same chunk costs one chunk hash per digest, not
//! one per write.

use crate::merkle::{chunk_bytes, chunk_count, leaf_hash, ChunkHashes, Hash32, MerkleTree};
use crate::{check_chunk_size, StorageError};
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Chunks written since tracking started: what a disk resync must send
/// again because it changed while the copy ran. Shared between the image's
/// owner (which writes) and the resync (which takes the set).
#[derive(Debug, Default)]
pub struct WrittenChunks {
    set: Mutex<Option<BTreeSet<u64>>>,
}

impl WrittenChunks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<BTreeSet<u64>>> {
        self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts (or restarts) tracking, from nothing.
    pub fn start(&self) {
        *self.lock() = Some(BTreeSet::new());
    }

    /// The chunks written since the last call (or since `start`).
    pub fn take(&self) -> Vec<u64> {
        let mut g = self.lock();
        match g.as_mut() {
            Some(set) => std::mem::take(set).into_iter().collect(),
            None => Vec::new(),
        }
    }

    pub fn stop(&self) {
        *self.lock() = None;
    }

    fn note(&self, chunks: std::ops::Range<u64>) {
        if let Some(set) = self.lock().as_mut() {
            set.extend(chunks);
        }
    }
}

/// Bytes read per batch while hashing a whole image.
const HASH_BATCH: u64 = 4 * 1024 * 1024;
/// At most this many threads hash an image on open.
const MAX_HASH_THREADS: usize = 8;

/// A raw disk image with blake3 chunk hashes and a Merkle root that follow
/// every write.
///
/// I/O may start at any byte offset (sector alignment is not required); I/O
/// that would reach past the end is an error naming the offset, length and
/// size. A failed write (for example a full file system under a sparse
/// image) is always returned as an error, see [`StorageError::is_disk_full`].
#[derive(Debug)]
pub struct DiskImage {
    path: PathBuf,
    file: File,
    writable: bool,
    size: u64,
    chunk_size: u64,
    /// Set when a failed write left chunk contents unknown and they could
    /// not be re-read: every later call fails until the image is reopened.
    poisoned: AtomicBool,
    /// Behind a lock so that reading the hashes (`&self`) can bring stale
    /// leaves up to date.
    hashes: Mutex<Hashes>,
    written: Arc<WrittenChunks>,
}

#[derive(Debug)]
struct Hashes {
    tree: MerkleTree,
    /// Chunks written in part since their leaf was last computed.
    stale: BTreeSet<u64>,
}

impl DiskImage {
    /// The set of chunks written while tracking is on (off until started).
    pub fn written_chunks(&self) -> Arc<WrittenChunks> {
        self.written.clone()
    }

    /// Creates a new zero-filled image of `size_bytes` (sparse where the file
    /// system allows: blocks are allocated as they are written, so a full
    /// file system shows up as a failed [`DiskImage::write_at`] or
    /// [`DiskImage::flush`]). Refuses to replace an existing file.
    pub fn create(
        path: impl AsRef<Path>,
        size_bytes: u64,
        chunk_size: u64,
    ) -> Result<DiskImage, StorageError> {
        let path = path.as_ref();
        check_chunk_size(chunk_size)?;
        if size_bytes == 0 {
            return Err(StorageError::InvalidSize {
                text: "0".into(),
                reason: "a disk must have at least one byte".into(),
            });
        }
        let io_err = |op, source| StorageError::Io {
            path: path.to_path_buf(),
            op,
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| io_err("create", e))?;
        file.set_len(size_bytes)
            .map_err(|e| io_err("set length", e))?;
        file.sync_all().map_err(|e| io_err("sync", e))?;
        let leaves =
            hash_parallel(size_bytes, chunk_size, |_, _| Ok(())).map_err(|e| io_err("hash", e))?;
        Ok(DiskImage {
            path: path.to_path_buf(),
            file,
            writable: true,
            size: size_bytes,
            chunk_size,
            poisoned: AtomicBool::new(false),
            hashes: Hashes::new(ChunkHashes::new(size_bytes, chunk_size, leaves)?),
            written: Arc::default(),
        })
    }

    /// Opens an existing image (a regular file or a block device) for
    /// reading and writing and hashes all of it.
    pub fn open(path: impl AsRef<Path>, chunk_size: u64) -> Result<DiskImage, StorageError> {
        Self::open_with(path.as_ref(), chunk_size, true)
    }

    /// Opens an existing image read-only (writes are refused) and hashes it.
    pub fn open_read_only(
        path: impl AsRef<Path>,
        chunk_size: u64,
    ) -> Result<DiskImage, StorageError> {
        Self::open_with(path.as_ref(), chunk_size, false)
    }

    fn open_with(path: &Path, chunk_size: u64, writable: bool) -> Result<DiskImage, StorageError> {
        check_chunk_size(chunk_size)?;
        let io_err = |op, source| StorageError::Io {
            path: path.to_path_buf(),
            op,
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| io_err("open", e))?;
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| io_err("find size", e))?;
        let leaves = hash_parallel(size, chunk_size, |offset, buf| {
            file.read_exact_at(buf, offset)
        })
        .map_err(|e| io_err("read for hashing", e))?;
        Ok(DiskImage {
            path: path.to_path_buf(),
            file,
            writable,
            size,
            chunk_size,
            poisoned: AtomicBool::new(false),
            hashes: Hashes::new(ChunkHashes::new(size, chunk_size, leaves)?),
            written: Arc::default(),
        })
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Number of chunks (the last may be shorter than the chunk size).
    pub fn chunk_count(&self) -> u64 {
        chunk_count(self.size, self.chunk_size)
    }

    /// Length in bytes of chunk `index` (0 past the end).
    pub fn chunk_len(&self, index: u64) -> u64 {
        let r = self.chunk_range(index);
        r.end - r.start
    }

    /// The bytes of chunk `index` (empty past the end).
    fn chunk_range(&self, index: u64) -> std::ops::Range<u64> {
        chunk_bytes(
            self.size,
            self.chunk_size,
            &(index..index.saturating_add(1)),
        )
    }

    /// The current leaf hashes (to send to the other site).
    pub fn chunk_hashes(&self) -> ChunkHashes {
        self.settled().tree.leaves().clone()
    }

    /// The current Merkle root (see `docs/storage.md`) of what the file
    /// holds after every write so far.
    pub fn merkle_root(&self) -> Hash32 {
        self.settled().tree.root()
    }

    fn lock_hashes(&self) -> MutexGuard<'_, Hashes> {
        self.hashes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The hashes with every stale leaf computed again from the file. If
    /// the file cannot be read, the image is poisoned (every later call
    /// fails, so the machine using it stops) and the leaf stays stale.
    fn settled(&self) -> MutexGuard<'_, Hashes> {
        let mut h = self.lock_hashes();
        while let Some(index) = h.stale.first().copied() {
            match self.rehash_from_file(index, "read back to hash") {
                Ok(hash) => {
                    h.tree.set_leaf(index as usize, hash);
                    h.stale.remove(&index);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot hash a written chunk; the disk refuses further use");
                    self.poisoned.store(true, Ordering::SeqCst);
                    break;
                }
            }
        }
        h
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), StorageError> {
        self.check_usable("read")?;
        self.check_range("read", offset, buf.len())?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.io_err("read", e))
    }

    /// Writes `data` at `offset` and updates the hashes of every chunk it
    /// touches. Not durable until [`DiskImage::flush`].
    ///
    /// If the write fails, the hashes of the touched chunks are recomputed
    /// from what the file now holds and the error is returned; if even that
    /// fails, the image refuses further use until reopened.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        self.check_writable("write")?;
        self.check_range("write", offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let written = self.file.write_all_at(data, offset);
        let cs = self.chunk_size();
        let end = offset + data.len() as u64;
        let chunks = offset / cs..end.div_ceil(cs);
        // Tracked whatever the outcome: a failed write may have changed them.
        self.written.note(chunks.clone());
        match written {
            Ok(()) => {
                let h = self.hashes.get_mut().unwrap_or_else(|p| p.into_inner());
                for index in chunks {
                    let range = chunk_bytes(self.size, cs, &(index..index + 1));
                    if range.start >= offset && range.end <= end {
                        let from = (range.start - offset) as usize;
                        let to = (range.end - offset) as usize;
                        h.tree
                            .set_leaf(index as usize, leaf_hash(index, &data[from..to]));
                        h.stale.remove(&index);
                    } else {
                        // Hashed from the file when the hashes are read.
                        h.stale.insert(index);
                    }
                }
                Ok(())
            }
            Err(source) => {
                for index in chunks {
                    match self.rehash_from_file(index, "read back after failed write") {
                        Ok(hash) => {
                            let h = self.hashes.get_mut().unwrap_or_else(|p| p.into_inner());
                            h.tree.set_leaf(index as usize, hash);
                            h.stale.remove(&index);
                        }
                        Err(_) => {
                            self.poisoned.store(true, Ordering::SeqCst);
                            break;
                        }
                    }
                }
                Err(self.io_err("write", source))
            }
        }
    }

    /// Makes every completed write durable (`fdatasync`).
    pub fn flush(&mut self) -> Result<(), StorageError> {
        self.check_usable("flush")?;
        self.file
            .sync_data()
            .map_err(|e| self.io_err("flush (fdatasync)", e))
    }

    /// Reads all of chunk `index` (for sync).
    pub fn read_chunk(&self, index: u64) -> Result<Vec<u8>, StorageError> {
        self.check_chunk("read_chunk", index)?;
        let range = self.chunk_range(index);
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        self.read_at(range.start, &mut buf)?;
        Ok(buf)
    }

    /// Replaces all of chunk `index` (for sync); `data` must be exactly the
    /// chunk's length. Compare [`crate::merkle::leaf_hash`]`(index, data)`
    /// with the sender's hash before writing to check the transfer.
    pub fn write_chunk(&mut self, index: u64, data: &[u8]) -> Result<(), StorageError> {
        self.check_chunk("write_chunk", index)?;
        let expected = self.chunk_len(index);
        if data.len() as u64 != expected {
            return Err(StorageError::ChunkLength {
                path: self.path.clone(),
                index,
                got: data.len(),
                expected,
            });
        }
        self.write_at(index * self.chunk_size(), data)
    }

    fn rehash_from_file(&self, index: u64, op: &'static str) -> Result<Hash32, StorageError> {
        let range = self.chunk_range(index);
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        self.file
            .read_exact_at(&mut buf, range.start)
            .map_err(|e| self.io_err(op, e))?;
        Ok(leaf_hash(index, &buf))
    }

    fn io_err(&self, op: &'static str, source: io::Error) -> StorageError {
        StorageError::Io {
            path: self.path.clone(),
            op,
            source,
        }
    }

    fn check_usable(&self, op: &'static str) -> Result<(), StorageError> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(StorageError::Poisoned {
                path: self.path.clone(),
                op,
            });
        }
        Ok(())
    }

    fn check_writable(&self, op: &'static str) -> Result<(), StorageError> {
        self.check_usable(op)?;
        if !self.writable {
            return Err(StorageError::ReadOnly {
                path: self.path.clone(),
                op,
            });
        }
        Ok(())
    }

    fn check_range(&self, op: &'static str, offset: u64, len: usize) -> Result<(), StorageError> {
        let len = len as u64;
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(StorageError::OutOfRange {
                path: self.path.clone(),
                op,
                offset,
                len,
                size: self.size(),
            }),
        }
    }

    fn check_chunk(&self, op: &'static str, index: u64) -> Result<(), StorageError> {
        if index >= self.chunk_count() {
            return Err(StorageError::ChunkOutOfRange {
                path: self.path.clone(),
                op,
                index,
                count: self.chunk_count(),
            });
        }
        Ok(())
    }
}

impl Hashes {
    fn new(leaves: ChunkHashes) -> Mutex<Hashes> {
        Mutex::new(Hashes {
            tree: MerkleTree::new(leaves),
            stale: BTreeSet::new(),
        })
    }
}

/// Hashes every chunk of a `size`-byte disk. `fill(offset, buf)` must fill
/// `buf` with the bytes at `offset` (buffers start zeroed). Work is split
/// into contiguous chunk ranges, one per thread.
fn hash_parallel<F>(size: u64, chunk_size: u64, fill: F) -> io::Result<Vec<Hash32>>
where
    F: Fn(u64, &mut [u8]) -> io::Result<()> + Sync,
{
    let count = chunk_count(size, chunk_size);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(MAX_HASH_THREADS) as u64;
    // Only split when each thread gets at least a few batches' worth.
    let threads = threads.min((size / (4 * HASH_BATCH)).max(1));
    let per = count.div_ceil(threads.max(1)).max(1);
    let batch_chunks = (HASH_BATCH / chunk_size).max(1);
    let work = |first: u64, last: u64| -> io::Result<Vec<Hash32>> {
        let mut out = Vec::with_capacity((last - first) as usize);
        let mut buf = vec![0u8; (batch_chunks * chunk_size) as usize];
        let mut index = first;
        while index < last {
            let n = batch_chunks.min(last - index);
            let start = index * chunk_size;
            let end = ((index + n) * chunk_size).min(size);
            let bytes = &mut buf[..(end - start) as usize];
            fill(start, bytes)?;
            for (k, chunk) in bytes.chunks(chunk_size as usize).enumerate() {
                out.push(leaf_hash(index + k as u64, chunk));
            }
            index += n;
        }
        Ok(out)
    };
    if count <= per {
        return work(0, count);
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..count)
            .step_by(per as usize)
            .map(|first| {
                let last = (first + per).min(count);
                let work = &work;
                scope.spawn(move || work(first, last))
            })
            .collect();
        let mut leaves = Vec::with_capacity(count as usize);
        for handle in handles {
            let part = handle
                .join()
                .map_err(|_| io::Error::other("hashing thread panicked"))??;
            leaves.extend(part);
        }
        Ok(leaves)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic PRNG (xorshift64*), so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn incremental_root_matches_scratch_after_random_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        // 37 chunks of 512 bytes plus a short tail: odd levels and a short last chunk.
        let size = 37 * 512 + 100;
        let mut disk = DiskImage::create(&path, size, 512).unwrap();
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng(0x1234_5678);
        for round in 0..300 {
            let offset = rng.below(size);
            let len = rng.below((size - offset).min(3000) + 1);
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            disk.write_at(offset, &data).unwrap();
            model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            assert_eq!(
                disk.merkle_root(),
                disk.chunk_hashes().merkle_root(),
                "round {round}"
            );
        }
        let mut back = vec![0u8; size as usize];
        disk.read_at(0, &mut back).unwrap();
        assert_eq!(back, model);
        disk.flush().unwrap();
        let root = disk.merkle_root();
        drop(disk);
        let reopened = DiskImage::open(&path, 512).unwrap();
        assert_eq!(reopened.merkle_root(), root);
        // A from-scratch leaf computation over the model agrees.
        let leaves: Vec<_> = model
            .chunks(512)
            .enumerate()
            .map(|(i, c)| leaf_hash(i as u64, c))
            .collect();
        let scratch = ChunkHashes::new(size, 512, leaves).unwrap();
        assert_eq!(scratch, reopened.chunk_hashes());
    }

    /// Partial writes leave their chunk stale; reading the root brings it
    /// up to date, and a whole-chunk write over a stale chunk replaces it.
    #[test]
    fn stale_chunks_are_hashed_when_the_root_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = DiskImage::create(dir.path().join("a"), 8 * 1024, 1024).unwrap();
        for i in 0..10u64 {
            a.write_at(2048 + i * 7, &[i as u8 + 1; 7]).unwrap();
        }
        a.write_at(4096 + 1000, &[9u8; 100]).unwrap();
        a.write_at(5 * 1024, &[3u8; 1024]).unwrap();
        let root = a.merkle_root();
        // The same bytes, hashed from scratch.
        let reopened = DiskImage::open_read_only(dir.path().join("a"), 1024).unwrap();
        assert_eq!(root, reopened.merkle_root());
        assert_eq!(a.chunk_hashes(), reopened.chunk_hashes());
        // A later partial write into a settled chunk is seen too.
        a.write_at(2048, b"x").unwrap();
        assert_ne!(a.merkle_root(), root);
    }

    #[test]
    fn diff_finds_exactly_the_modified_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = DiskImage::create(dir.path().join("a"), 64 * 1024, 1024).unwrap();
        let mut b = DiskImage::create(dir.path().join("b"), 64 * 1024, 1024).unwrap();
        assert_eq!(a.merkle_root(), b.merkle_root());
        // Same bytes in both: no difference.
        a.write_at(5000, b"same").unwrap();
        b.write_at(5000, b"same").unwrap();
        // Chunk 3 only; chunks 10..13 (crossing two boundaries); last chunk.
        b.write_at(3 * 1024 + 17, b"x").unwrap();
        b.write_at(10 * 1024 + 1000, &[7u8; 2000]).unwrap();
        b.write_at(64 * 1024 - 1, b"z").unwrap();
        let d = crate::diff(&a.chunk_hashes(), &b.chunk_hashes()).unwrap();
        assert_eq!(d, vec![3..4, 10..13, 63..64]);
        assert_eq!(a.chunk_hashes().byte_range(&d[1]), 10240..13312);
        // Syncing those chunks makes the disks equal.
        for range in &d {
            for index in range.clone() {
                let data = b.read_chunk(index).unwrap();
                assert_eq!(
                    &leaf_hash(index, &data),
                    b.chunk_hashes().get(index).unwrap()
                );
                a.write_chunk(index, &data).unwrap();
            }
        }
        assert_eq!(a.merkle_root(), b.merkle_root());
        assert!(crate::diff(&a.chunk_hashes(), &b.chunk_hashes())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn out_of_range_is_an_error_naming_offset_len_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = DiskImage::create(dir.path().join("d"), 4096, 512).unwrap();
        let err = d.write_at(4000, &[0u8; 200]).unwrap_err();
        let text = err.to_string();
        for part in ["4000", "200", "4096", "write", "/d"] {
            assert!(text.contains(part), "{text}");
        }
        let mut buf = [0u8; 1];
        assert!(matches!(
            d.read_at(4096, &mut buf),
            Err(StorageError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.read_at(u64::MAX, &mut buf),
            Err(StorageError::OutOfRange { .. })
        ));
        d.read_at(4095, &mut buf).unwrap();
        d.write_at(4096, &[]).unwrap();
        assert!(matches!(
            d.read_chunk(8),
            Err(StorageError::ChunkOutOfRange {
                index: 8,
                count: 8,
                ..
            })
        ));
        assert!(matches!(
            d.write_chunk(0, &[0u8; 100]),
            Err(StorageError::ChunkLength { .. })
        ));
    }

    #[test]
    fn create_validates_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        assert!(matches!(
            DiskImage::create(&p, 4096, 1000),
            Err(StorageError::InvalidChunkSize(1000))
        ));
        assert!(DiskImage::create(&p, 0, 512).is_err());
        DiskImage::create(&p, 4096, 512).unwrap();
        let err = DiskImage::create(&p, 4096, 512).unwrap_err();
        assert!(err.to_string().contains("create"), "{err}");
        let err = DiskImage::open(dir.path().join("missing"), 512).unwrap_err();
        assert!(err.to_string().contains("missing: open"), "{err}");
    }

    #[test]
    fn read_only_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        DiskImage::create(&p, 4096, 512).unwrap();
        let mut d = DiskImage::open_read_only(&p, 512).unwrap();
        assert!(matches!(
            d.write_at(0, b"x"),
            Err(StorageError::ReadOnly { .. })
        ));
    }

    #[test]
    fn parallel_hashing_matches_sequential() {
        // Big enough for several threads and batches, with a short tail.
        let size = 40 * 1024 * 1024 + 123;
        let pattern = |offset: u64, buf: &mut [u8]| {
            for (i, b) in buf.iter_mut().enumerate() {
                let x = offset + i as u64;
                *b = (x ^ (x >> 9)) as u8;
            }
            Ok(())
        };
        let par = hash_parallel(size, 64 * 1024, pattern).unwrap();
        let mut all = vec![0u8; size as usize];
        pattern(0, &mut all).unwrap();
        let seq: Vec<_> = all
            .chunks(64 * 1024)
            .enumerate()
            .map(|(i, c)| leaf_hash(i as u64, c))
            .collect();
        assert_eq!(par, seq);
    }
}

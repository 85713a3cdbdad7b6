//! Chunk hashes and the disk Merkle tree.
//!
//! For a disk of `size` bytes cut into chunks of `chunk_size` bytes (the last
//! chunk may be shorter), with `n = ceil(size / chunk_size)` chunks:
//!
//! ```text
//! leaf(i)   = blake3("ftvm-disk-leaf-v1\0" || le64(i) || bytes of chunk i)
//! node(l,r) = blake3("ftvm-disk-node-v1\0" || l || r)
//! level 0   = leaf(0) .. leaf(n-1)
//! level k+1 = node(level_k[2j], level_k[2j+1]) for each pair; a last node
//!             without a sibling is carried up unchanged
//! top       = the single node of the last level (32 zero bytes when n = 0)
//! root      = blake3("ftvm-disk-root-v1\0" || le64(size) || le64(chunk_size) || top)
//! ```
//!
//! The index in each leaf makes equal contents at different places hash
//! differently; the size and chunk size in the root make disks of
//! different geometry never share a root.

use crate::{check_chunk_size, StorageError};
use std::ops::Range;

/// A 32-byte blake3 digest.
pub type Hash32 = [u8; 32];

pub const LEAF_PREFIX: &[u8] = b"ftvm-disk-leaf-v1\0";
pub const NODE_PREFIX: &[u8] = b"ftvm-disk-node-v1\0";
pub const ROOT_PREFIX: &[u8] = b"ftvm-disk-root-v1\0";

/// Hash of chunk `index` whose contents are `data`.
pub fn leaf_hash(index: u64, data: &[u8]) -> Hash32 {
    let mut h = blake3::Hasher::new();
    h.update(LEAF_PREFIX);
    h.update(&index.to_le_bytes());
    h.update(data);
    *h.finalize().as_bytes()
}

/// Hash of an inner node from its two children.
pub fn node_hash(left: &Hash32, right: &Hash32) -> Hash32 {
    let mut h = blake3::Hasher::new();
    h.update(NODE_PREFIX);
    h.update(left);
    h.update(right);
    *h.finalize().as_bytes()
}

/// The root from the tree's top node and the disk geometry.
pub fn root_hash(size: u64, chunk_size: u64, top: &Hash32) -> Hash32 {
    let mut h = blake3::Hasher::new();
    h.update(ROOT_PREFIX);
    h.update(&size.to_le_bytes());
    h.update(&chunk_size.to_le_bytes());
    h.update(top);
    *h.finalize().as_bytes()
}

/// Lower-case hex of a digest.
pub fn to_hex(hash: &Hash32) -> String {
    blake3::Hash::from_bytes(*hash).to_hex().to_string()
}

/// Number of chunks of `chunk_size` bytes needed for `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u64) -> u64 {
    size.div_ceil(chunk_size)
}

/// The bytes of chunks `chunks` of a `size`-byte disk (clipped to the disk).
pub fn chunk_bytes(size: u64, chunk_size: u64, chunks: &Range<u64>) -> Range<u64> {
    let start = chunks.start.saturating_mul(chunk_size).min(size);
    let end = chunks.end.saturating_mul(chunk_size).min(size);
    start..end
}

fn parent_level(level: &[Hash32]) -> Vec<Hash32> {
    level
        .chunks(2)
        .map(|pair| match pair {
            [l, r] => node_hash(l, r),
            [only] => *only,
            _ => unreachable!("chunks(2) yields one or two items"),
        })
        .collect()
}

/// The leaf hashes of a disk, with its geometry. This is what one site sends
/// the other to compare disks (see [`ChunkHashes::encode`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHashes {
    size: u64,
    chunk_size: u64,
    leaves: Vec<Hash32>,
}

const ENCODE_MAGIC: &[u8; 4] = b"FTCH";
const ENCODE_VERSION: u8 = 1;
const ENCODE_HEADER: usize = 32;

impl ChunkHashes {
    /// Builds a list from its parts; `leaves.len()` must be the chunk count
    /// of `size` and `chunk_size`.
    pub fn new(size: u64, chunk_size: u64, leaves: Vec<Hash32>) -> Result<Self, StorageError> {
        check_chunk_size(chunk_size)?;
        if leaves.len() as u64 != chunk_count(size, chunk_size) {
            return Err(StorageError::Decode(
                "leaf count does not match the disk size and chunk size",
            ));
        }
        Ok(ChunkHashes {
            size,
            chunk_size,
            leaves,
        })
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Number of chunks.
    pub fn len(&self) -> u64 {
        self.leaves.len() as u64
    }

    /// True for a zero-byte disk.
    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty()
    }

    /// The leaf hash of chunk `index`.
    pub fn get(&self, index: u64) -> Option<&Hash32> {
        usize::try_from(index).ok().and_then(|i| self.leaves.get(i))
    }

    /// All leaf hashes, in chunk order.
    pub fn as_slice(&self) -> &[Hash32] {
        &self.leaves
    }

    /// The bytes covered by a range of chunk indices (clamped to the disk size).
    pub fn byte_range(&self, chunks: &Range<u64>) -> Range<u64> {
        chunk_bytes(self.size, self.chunk_size, chunks)
    }

    /// One hash per group of `group` consecutive leaves (the last group may
    /// be shorter): comparing these first finds which groups differ, so a
    /// resync sends leaves only for those (a few round trips, whatever the
    /// disk's size).
    pub fn group_hashes(&self, group: u64) -> Vec<Hash32> {
        let group = group.max(1) as usize;
        self.leaves
            .chunks(group)
            .map(|g| {
                let mut h = blake3::Hasher::new();
                h.update(b"ftvm-chunk-group-v1");
                for leaf in g {
                    h.update(leaf);
                }
                *h.finalize().as_bytes()
            })
            .collect()
    }

    /// The Merkle root computed from scratch from the leaves (O(n)).
    /// [`crate::DiskImage::merkle_root`] keeps the same value up to date
    /// incrementally.
    pub fn merkle_root(&self) -> Hash32 {
        let mut level = self.leaves.clone();
        while level.len() > 1 {
            level = parent_level(&level);
        }
        let top = level.first().copied().unwrap_or([0u8; 32]);
        root_hash(self.size, self.chunk_size, &top)
    }

    /// Serialises the list for the wire or a file:
    ///
    /// ```text
    /// 0   4  magic b"FTCH"
    /// 4   1  version (1)
    /// 5   3  zero
    /// 8   8  disk size, le64
    /// 16  8  chunk size, le64
    /// 24  8  chunk count, le64
    /// 32  32*count leaf hashes in chunk order
    /// ```
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENCODE_HEADER + 32 * self.leaves.len());
        out.extend_from_slice(ENCODE_MAGIC);
        out.extend_from_slice(&[ENCODE_VERSION, 0, 0, 0]);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.len().to_le_bytes());
        for leaf in &self.leaves {
            out.extend_from_slice(leaf);
        }
        out
    }

    /// Parses [`ChunkHashes::encode`]'s output. Lengths are checked against
    /// the input before anything is allocated.
    pub fn decode(bytes: &[u8]) -> Result<Self, StorageError> {
        if bytes.len() < ENCODE_HEADER {
            return Err(StorageError::Decode("shorter than its header"));
        }
        if &bytes[0..4] != ENCODE_MAGIC {
            return Err(StorageError::Decode("bad magic"));
        }
        if bytes[4] != ENCODE_VERSION || bytes[5..8] != [0, 0, 0] {
            return Err(StorageError::Decode("unsupported version"));
        }
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let (size, chunk_size, count) = (word(8), word(16), word(24));
        check_chunk_size(chunk_size)?;
        if count != chunk_count(size, chunk_size) {
            return Err(StorageError::Decode(
                "chunk count does not match the disk size and chunk size",
            ));
        }
        let body = &bytes[ENCODE_HEADER..];
        if (body.len() as u64) != count.saturating_mul(32) {
            return Err(StorageError::Decode(
                "length does not match the chunk count",
            ));
        }
        let leaves = body
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                h
            })
            .collect();
        Ok(ChunkHashes {
            size,
            chunk_size,
            leaves,
        })
    }
}

/// The chunk-index ranges (coalesced, ascending) where `a` and `b` differ.
///
/// Both must use the same chunk size. If the disk sizes differ, chunks
/// present in only one list count as differing (and a short last chunk
/// hashes differently from a full one), so syncing those ranges plus a
/// resize makes the disks equal. Use [`ChunkHashes::byte_range`] for bytes.
pub fn diff(a: &ChunkHashes, b: &ChunkHashes) -> Result<Vec<Range<u64>>, StorageError> {
    if a.chunk_size != b.chunk_size {
        return Err(StorageError::ChunkSizeMismatch {
            a: a.chunk_size,
            b: b.chunk_size,
        });
    }
    let n = a.leaves.len().max(b.leaves.len());
    let mut out: Vec<Range<u64>> = Vec::new();
    for i in 0..n {
        if a.leaves.get(i) == b.leaves.get(i) {
            continue;
        }
        let i = i as u64;
        match out.last_mut() {
            Some(last) if last.end == i => last.end = i + 1,
            _ => out.push(i..i + 1),
        }
    }
    Ok(out)
}

/// The incremental tree kept by a [`crate::DiskImage`]: the leaves plus
/// every level above them.
#[derive(Debug, Clone)]
pub(crate) struct MerkleTree {
    leaves: ChunkHashes,
    /// `upper[0]` is the level just above the leaves; the last level has one
    /// node (empty when there are fewer than two leaves).
    upper: Vec<Vec<Hash32>>,
}

impl MerkleTree {
    pub(crate) fn new(leaves: ChunkHashes) -> Self {
        let mut upper = Vec::new();
        let mut current = &leaves.leaves;
        while current.len() > 1 {
            upper.push(parent_level(current));
            current = upper.last().expect("just pushed");
        }
        MerkleTree { leaves, upper }
    }

    pub(crate) fn leaves(&self) -> &ChunkHashes {
        &self.leaves
    }

    /// Sets leaf `index` and recomputes its path to the top: O(log n).
    pub(crate) fn set_leaf(&mut self, index: usize, hash: Hash32) {
        self.leaves.leaves[index] = hash;
        let mut idx = index;
        for level in 0..self.upper.len() {
            idx /= 2;
            let below: &[Hash32] = if level == 0 {
                &self.leaves.leaves
            } else {
                &self.upper[level - 1]
            };
            let left = below[2 * idx];
            let value = match below.get(2 * idx + 1) {
                Some(right) => node_hash(&left, right),
                None => left,
            };
            self.upper[level][idx] = value;
        }
    }

    pub(crate) fn root(&self) -> Hash32 {
        let top = match self.upper.last() {
            Some(level) => level[0],
            None => self.leaves.leaves.first().copied().unwrap_or([0u8; 32]),
        };
        root_hash(self.leaves.size, self.leaves.chunk_size, &top)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(n: usize, seed: u8) -> ChunkHashes {
        let leaves = (0..n)
            .map(|i| leaf_hash(i as u64, &[seed, i as u8]))
            .collect();
        ChunkHashes::new(n as u64 * 512, 512, leaves).unwrap()
    }

    #[test]
    fn incremental_matches_scratch_for_many_sizes() {
        for n in 0..40 {
            let mut h = hashes(n, 1);
            let mut tree = MerkleTree::new(h.clone());
            assert_eq!(tree.root(), h.merkle_root(), "n={n}");
            for i in 0..n {
                let new = leaf_hash(i as u64, b"changed");
                tree.set_leaf(i, new);
                h.leaves[i] = new;
                assert_eq!(tree.root(), h.merkle_root(), "n={n} i={i}");
            }
        }
    }

    #[test]
    fn hand_computed_three_leaf_root() {
        let h = hashes(3, 7);
        let l = h.as_slice();
        let top = node_hash(&node_hash(&l[0], &l[1]), &l[2]);
        assert_eq!(h.merkle_root(), root_hash(1536, 512, &top));
    }

    #[test]
    fn geometry_is_in_the_root() {
        let a = ChunkHashes::new(1024, 512, vec![[0; 32], [0; 32]]).unwrap();
        let b = ChunkHashes::new(1000, 512, vec![[0; 32], [0; 32]]).unwrap();
        assert_ne!(a.merkle_root(), b.merkle_root());
    }

    #[test]
    fn diff_coalesces_and_handles_sizes() {
        let a = hashes(10, 1);
        let mut b = a.clone();
        for i in [2usize, 3, 4, 7, 9] {
            b.leaves[i] = [9; 32];
        }
        assert_eq!(diff(&a, &b).unwrap(), vec![2..5, 7..8, 9..10]);
        assert_eq!(diff(&a, &a).unwrap(), Vec::<Range<u64>>::new());
        let short = hashes(6, 1);
        assert_eq!(diff(&a, &short).unwrap(), vec![6..10]);
        let other = ChunkHashes::new(1024, 1024, vec![[0; 32]]).unwrap();
        assert!(matches!(
            diff(&a, &other),
            Err(StorageError::ChunkSizeMismatch { a: 512, b: 1024 })
        ));
        assert_eq!(a.byte_range(&(2..5)), 1024..2560);
        assert_eq!(a.byte_range(&(9..12)), 4608..5120);
    }

    #[test]
    fn encode_decode_round_trip_and_rejects_garbage() {
        let a = hashes(5, 3);
        let bytes = a.encode();
        assert_eq!(ChunkHashes::decode(&bytes).unwrap(), a);
        for cut in 0..bytes.len() {
            assert!(ChunkHashes::decode(&bytes[..cut]).is_err(), "cut {cut}");
        }
        let mut bad = bytes.clone();
        bad[24] = 0xff; // absurd count
        assert!(ChunkHashes::decode(&bad).is_err());
        let mut bad = bytes;
        bad[0] = b'X';
        assert!(ChunkHashes::decode(&bad).is_err());
    }
}

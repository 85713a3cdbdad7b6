//! State digests: blake3 over the vCPU's register state and the contents of
//! a set of pages (those dirtied since the last digest, named in the log so
//! the backup hashes the same ones), or of all of memory.

use crate::vstate::layout::PAGE_SIZE;
use crate::vstate::memory::GuestMemory;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

/// Consecutive pages `[first, first + count)` (page frame numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    pub first: u64,
    pub count: u64,
}

/// Above this many runs a digest covers all of memory instead (keeps entries small).
pub const MAX_RUNS: usize = 16 * 1024;

/// Turns a dirty bitmap (one bit per page) into runs.
pub fn runs_from_bitmap(bits: &[u64], pages: u64) -> Vec<PageRun> {
    let mut runs: Vec<PageRun> = Vec::new();
    for (w, word) in bits.iter().enumerate() {
        let mut word = *word;
        while word != 0 {
            let bit = word.trailing_zeros() as u64;
            word &= word - 1;
            let pfn = w as u64 * 64 + bit;
            if pfn >= pages {
                break;
            }
            match runs.last_mut() {
                Some(r) if r.first + r.count == pfn => r.count += 1,
                _ => runs.push(PageRun {
                    first: pfn,
                    count: 1,
                }),
            }
        }
    }
    runs
}

#[derive(Debug, thiserror::Error)]
#[error("digest: page run {first}+{count} is out of order or outside guest memory ({pages} pages)")]
pub struct DigestError {
    first: u64,
    count: u64,
    pages: u64,
}

fn hash_range(h: &mut blake3::Hasher, mem: &GuestMemory, addr: u64, len: u64, buf: &mut [u8]) {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        // The range was checked against memory size; a failure here would be a VMM bug.
        if mem
            .read_slice(&mut buf[..n], GuestAddress(addr + done))
            .is_err()
        {
            h.update(b"unreadable");
        }
        h.update(&buf[..n]);
        done += n as u64;
    }
}

/// Digest of `regs` and the listed pages.
pub fn pages_digest(
    mem: &GuestMemory,
    pages_total: u64,
    regs: &[u8],
    runs: &[PageRun],
) -> Result<[u8; 32], DigestError> {
    let mut h = blake3::Hasher::new();
    h.update(b"ftvm-digest-pages-v1");
    h.update(&(regs.len() as u64).to_le_bytes());
    h.update(regs);
    // Runs from a log must be ascending, disjoint and inside memory, so a
    // hostile log cannot make the backup hash memory over and over.
    let mut next_free = 0u64;
    for r in runs {
        if r.first < next_free || r.first.checked_add(r.count).is_none_or(|e| e > pages_total) {
            return Err(DigestError {
                first: r.first,
                count: r.count,
                pages: pages_total,
            });
        }
        next_free = r.first + r.count;
    }
    let mut buf = vec![0u8; 64 << 10];
    for r in runs {
        h.update(&r.first.to_le_bytes());
        h.update(&r.count.to_le_bytes());
        hash_range(
            &mut h,
            mem,
            r.first * PAGE_SIZE,
            r.count * PAGE_SIZE,
            &mut buf,
        );
    }
    Ok(*h.finalize().as_bytes())
}

/// Digest of `regs` and all of memory.
pub fn full_digest(mem: &GuestMemory, mem_size: u64, regs: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"ftvm-digest-full-v1");
    h.update(&(regs.len() as u64).to_le_bytes());
    h.update(regs);
    let mut buf = vec![0u8; 1 << 20];
    hash_range(&mut h, mem, 0, mem_size, &mut buf);
    *h.finalize().as_bytes()
}

pub fn hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_or_outside_runs_are_refused() {
        let mem = crate::vstate::memory::create(1 << 20).unwrap();
        let run = |first, count| PageRun { first, count };
        assert!(pages_digest(&mem, 256, b"r", &[run(0, 2), run(5, 1)]).is_ok());
        assert!(pages_digest(&mem, 256, b"r", &[run(0, 2), run(1, 1)]).is_err());
        assert!(pages_digest(&mem, 256, b"r", &[run(250, 10)]).is_err());
        assert!(pages_digest(&mem, 256, b"r", &[run(u64::MAX, 2)]).is_err());
    }

    #[test]
    fn bitmap_runs_coalesce() {
        let bits = [0b1110_0001u64, 1];
        let runs = runs_from_bitmap(&bits, 128);
        assert_eq!(
            runs,
            vec![
                PageRun { first: 0, count: 1 },
                PageRun { first: 5, count: 3 },
                PageRun {
                    first: 64,
                    count: 1
                }
            ]
        );
    }
}

//! Loads a platform guest: a static x86-64 ELF executable whose `PT_LOAD`
//! segments sit at or above `IMAGE_BASE`. `.bss` (memsz beyond filesz) is
//! zeroed here, since memory may not be fresh.

use crate::vstate::layout::{IMAGE_BASE, PAGE_SIZE};
use crate::vstate::memory::GuestMemory;
use std::path::{Path, PathBuf};
use vm_memory::{Bytes, GuestAddress};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("guest image {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest image {path}: not an ELF file ({why})")]
    NotElf { path: PathBuf, why: &'static str },
    #[error("guest image {path}: unsupported ELF: {why}")]
    Unsupported { path: PathBuf, why: String },
    #[error("guest image {path}: segment at {addr:#x}+{size:#x} does not fit guest memory [{IMAGE_BASE:#x}, {limit:#x})")]
    DoesNotFit {
        path: PathBuf,
        addr: u64,
        size: u64,
        limit: u64,
    },
    #[error("guest image {path}: writing to guest memory failed: {source}")]
    Memory {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// A guest image read from disk.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    /// blake3 of the file: logs name the image they were recorded with.
    pub hash: [u8; 32],
}

/// Where an image landed.
#[derive(Debug, Clone, Copy)]
pub struct LoadedImage {
    pub entry: u64,
    /// First byte after the highest segment, rounded up to a page.
    pub end: u64,
}

#[derive(Debug)]
struct Segment {
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

fn field<const N: usize>(b: &[u8], off: usize) -> Option<[u8; N]> {
    b.get(off..off.checked_add(N)?)?.try_into().ok()
}
fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    field(b, off).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    field(b, off).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    field(b, off).map(u64::from_le_bytes)
}

impl GuestImage {
    pub fn read(path: &Path) -> Result<Self, ImageError> {
        let bytes = std::fs::read(path).map_err(|source| ImageError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let hash = *blake3::hash(&bytes).as_bytes();
        Ok(GuestImage {
            path: path.to_path_buf(),
            bytes,
            hash,
        })
    }

    fn not_elf(&self, why: &'static str) -> ImageError {
        ImageError::NotElf {
            path: self.path.clone(),
            why,
        }
    }

    fn unsupported(&self, why: impl Into<String>) -> ImageError {
        ImageError::Unsupported {
            path: self.path.clone(),
            why: why.into(),
        }
    }

    fn parse(&self) -> Result<(u64, Vec<Segment>), ImageError> {
        let b = &self.bytes;
        if b.len() < 64 || b[0..4] != *b"\x7fELF" {
            return Err(self.not_elf("no ELF magic"));
        }
        if b[4] != 2 {
            return Err(self.unsupported("not a 64-bit ELF"));
        }
        if b[5] != 1 {
            return Err(self.unsupported("not little endian"));
        }
        let short = || self.not_elf("header truncated");
        let e_type = u16_at(b, 16).ok_or_else(short)?;
        let machine = u16_at(b, 18).ok_or_else(short)?;
        if e_type != 2 {
            return Err(self.unsupported(format!(
                "e_type {e_type} is not a static executable (ET_EXEC)"
            )));
        }
        if machine != 62 {
            return Err(self.unsupported(format!("e_machine {machine} is not x86-64")));
        }
        let entry = u64_at(b, 24).ok_or_else(short)?;
        let phoff = u64_at(b, 32).ok_or_else(short)?;
        let phentsize = u16_at(b, 54).ok_or_else(short)? as u64;
        let phnum = u16_at(b, 56).ok_or_else(short)? as u64;
        if phentsize < 56 {
            return Err(self.not_elf("program header entries too small"));
        }
        let mut segs = Vec::new();
        for i in 0..phnum {
            let off = phoff
                .checked_add(i * phentsize)
                .ok_or_else(|| self.not_elf("program header offset overflows"))?
                as usize;
            let short = || self.not_elf("program headers truncated");
            let p_type = u32_at(b, off).ok_or_else(short)?;
            match p_type {
                1 => {}
                3 => return Err(self.unsupported("has PT_INTERP (dynamically linked)")),
                _ => continue,
            }
            let seg = Segment {
                offset: u64_at(b, off + 8).ok_or_else(short)?,
                paddr: u64_at(b, off + 24).ok_or_else(short)?,
                filesz: u64_at(b, off + 32).ok_or_else(short)?,
                memsz: u64_at(b, off + 40).ok_or_else(short)?,
            };
            if seg.filesz > seg.memsz
                || seg
                    .offset
                    .checked_add(seg.filesz)
                    .is_none_or(|end| end > b.len() as u64)
            {
                return Err(self.not_elf("segment lies outside the file"));
            }
            segs.push(seg);
        }
        if segs.is_empty() {
            return Err(self.unsupported("no PT_LOAD segments"));
        }
        Ok((entry, segs))
    }

    /// Copies the image into guest memory below `limit`.
    pub fn load(&self, mem: &GuestMemory, limit: u64) -> Result<LoadedImage, ImageError> {
        let (entry, segs) = self.parse()?;
        let mut end = IMAGE_BASE;
        for s in &segs {
            let top = s.paddr.checked_add(s.memsz);
            if s.paddr < IMAGE_BASE || top.is_none_or(|t| t > limit) {
                return Err(ImageError::DoesNotFit {
                    path: self.path.clone(),
                    addr: s.paddr,
                    size: s.memsz,
                    limit,
                });
            }
            let file = &self.bytes[s.offset as usize..(s.offset + s.filesz) as usize];
            let mem_err = |source| ImageError::Memory {
                path: self.path.clone(),
                source,
            };
            mem.write_slice(file, GuestAddress(s.paddr))
                .map_err(mem_err)?;
            let bss = (s.memsz - s.filesz) as usize;
            if bss > 0 {
                mem.write_slice(&vec![0u8; bss], GuestAddress(s.paddr + s.filesz))
                    .map_err(mem_err)?;
            }
            end = end.max(s.paddr + s.memsz);
        }
        if !segs
            .iter()
            .any(|s| (s.paddr..s.paddr + s.memsz).contains(&entry))
        {
            return Err(
                self.unsupported(format!("entry point {entry:#x} is outside every segment"))
            );
        }
        Ok(LoadedImage {
            entry,
            end: end.div_ceil(PAGE_SIZE) * PAGE_SIZE,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(bytes: Vec<u8>) -> GuestImage {
        GuestImage {
            path: PathBuf::from("t.elf"),
            hash: [0; 32],
            bytes,
        }
    }

    #[test]
    fn non_elf_is_named() {
        let err = image(b"#!/bin/sh\necho hi\n".repeat(8))
            .parse()
            .unwrap_err();
        assert!(err.to_string().contains("not an ELF"), "{err}");
    }

    #[test]
    fn truncated_header_is_an_error_not_a_panic() {
        let mut b = vec![0u8; 64];
        b[0..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[16] = 2;
        b[18] = 62;
        b[32..40].copy_from_slice(&u64::MAX.to_le_bytes()); // phoff
        b[54] = 56;
        b[56] = 1;
        assert!(image(b).parse().is_err());
    }
}

//! Length-delimited frames with a versioned header and an integrity check.
//!
//! ```text
//! offset size field
//! 0      2    magic  b"FT"
//! 2      1    version (FRAME_VERSION)
//! 3      1    kind   (meaning chosen by the protocol using the frame)
//! 4      4    length of the payload, little endian
//! 8      4    CRC-32 (IEEE) of bytes 0..8 and of the payload, little endian
//! 12     len  payload
//! ```
//!
//! A reader never trusts a length it reads: it refuses any frame longer than
//! the maximum it was given before allocating, and a frame whose checksum
//! does not match is an error, never handed on.

use std::io::{self, Read, Write};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const FRAME_MAGIC: [u8; 2] = *b"FT";
pub const FRAME_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 12;
/// Default upper bound on a payload (1 MiB).
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("bad frame magic {0:02x?} (not an ftvm frame)")]
    BadMagic([u8; 2]),
    #[error("frame version {found} is not supported (this build speaks version {FRAME_VERSION})")]
    UnsupportedVersion { found: u8 },
    #[error("frame of {len} bytes is over the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("frame checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("frame truncated: {0}")]
    Truncated(&'static str),
    #[error("frame i/o: {0}")]
    Io(#[from] io::Error),
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub payload: Vec<u8>,
}

fn header(kind: u8, len: u32) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[0..2].copy_from_slice(&FRAME_MAGIC);
    h[2] = FRAME_VERSION;
    h[3] = kind;
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h
}

fn checksum(head: &[u8], payload: &[u8]) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(head);
    c.update(payload);
    c.finalize()
}

/// Appends one encoded frame to `out`.
pub fn encode_frame(
    kind: u8,
    payload: &[u8],
    max: usize,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    if payload.len() > max || payload.len() > u32::MAX as usize {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            max,
        });
    }
    let head = header(kind, payload.len() as u32);
    out.extend_from_slice(&head);
    out.extend_from_slice(&checksum(&head, payload).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// Checks a 12-byte header and returns (kind, payload length, stored checksum).
fn parse_header(h: &[u8; HEADER_LEN], max: usize) -> Result<(u8, usize, u32), FrameError> {
    let magic = [h[0], h[1]];
    if magic != FRAME_MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    if h[2] != FRAME_VERSION {
        return Err(FrameError::UnsupportedVersion { found: h[2] });
    }
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let stored = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    Ok((h[3], len, stored))
}

fn finish(
    h: &[u8; HEADER_LEN],
    kind: u8,
    stored: u32,
    payload: Vec<u8>,
) -> Result<Frame, FrameError> {
    let computed = checksum(&h[..8], &payload);
    if computed != stored {
        return Err(FrameError::Checksum { stored, computed });
    }
    Ok(Frame { kind, payload })
}

/// Reads one frame. `Ok(None)` at a clean end of stream (no byte of a new frame).
pub fn read_frame<R: Read>(r: &mut R, max: usize) -> Result<Option<Frame>, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated("end of stream inside a header")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (kind, len, stored) = parse_header(&h, max)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated("end of stream inside a payload"),
        _ => FrameError::Io(e),
    })?;
    finish(&h, kind, stored, payload).map(Some)
}

/// Writes one frame.
pub fn write_frame<W: Write>(
    w: &mut W,
    kind: u8,
    payload: &[u8],
    max: usize,
) -> Result<(), FrameError> {
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    encode_frame(kind, payload, max, &mut buf)?;
    w.write_all(&buf)?;
    Ok(())
}

/// Async form of [`read_frame`] for QUIC streams.
pub async fn read_frame_async<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Frame>, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]).await {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated("end of stream inside a header")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (kind, len, stored) = parse_header(&h, max)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => FrameError::Truncated("end of stream inside a payload"),
            _ => FrameError::Io(e),
        })?;
    finish(&h, kind, stored, payload).map(Some)
}

/// Async form of [`write_frame`].
pub async fn write_frame_async<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: u8,
    payload: &[u8],
    max: usize,
) -> Result<(), FrameError> {
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    encode_frame(kind, payload, max, &mut buf)?;
    w.write_all(&buf).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_frame(kind, payload, DEFAULT_MAX_PAYLOAD, &mut v).unwrap();
        v
    }

    #[test]
    fn round_trip_and_clean_eof() {
        let mut bytes = one(7, b"hello");
        bytes.extend(one(9, b""));
        let mut r = &bytes[..];
        assert_eq!(
            read_frame(&mut r, 64).unwrap().unwrap(),
            Frame {
                kind: 7,
                payload: b"hello".to_vec()
            }
        );
        assert_eq!(read_frame(&mut r, 64).unwrap().unwrap().kind, 9);
        assert!(read_frame(&mut r, 64).unwrap().is_none());
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let bytes = one(3, b"some payload bytes");
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            let mut r = &bad[..];
            assert!(read_frame(&mut r, 1024).is_err(), "flip at {i} not caught");
        }
    }

    #[test]
    fn oversized_length_refused_before_allocating() {
        let mut bytes = one(1, b"x");
        bytes[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = read_frame(&mut &bytes[..], 1024).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
        assert!(encode_frame(1, &[0; 10], 5, &mut Vec::new()).is_err());
    }

    #[test]
    fn newer_version_and_truncation_named() {
        let mut bytes = one(1, b"abc");
        bytes[2] = FRAME_VERSION + 1;
        assert!(matches!(
            read_frame(&mut &bytes[..], 64),
            Err(FrameError::UnsupportedVersion { .. })
        ));
        let bytes = one(1, b"abc");
        assert!(matches!(
            read_frame(&mut &bytes[..5], 64),
            Err(FrameError::Truncated(_))
        ));
        assert!(matches!(
            read_frame(&mut &bytes[..13], 64),
            Err(FrameError::Truncated(_))
        ));
    }
}

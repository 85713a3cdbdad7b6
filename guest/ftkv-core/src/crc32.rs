//! CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), the same checksum
//! as zlib's `crc32`, with tables built at compile time. Slicing-by-8: eight
//! bytes per step through eight tables (every log record is checksummed,
//! so this is on the write path of every command that changes a key).

const TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// `SLICES[k][i]`: the CRC of byte `i` followed by `k` zero bytes.
const SLICES: [[u32; 256]; 8] = {
    let mut t = [[0u32; 256]; 8];
    t[0] = TABLE;
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ TABLE[(prev & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    t
};

/// An incremental CRC-32.
#[derive(Debug, Clone, Copy)]
pub struct Crc32(u32);

impl Default for Crc32 {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc32 {
    pub const fn new() -> Self {
        Crc32(0xffff_ffff)
    }

    pub fn update(&mut self, data: &[u8]) {
        let mut c = self.0;
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            let lo = c ^ u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            let hi = u32::from_le_bytes([w[4], w[5], w[6], w[7]]);
            c = SLICES[7][(lo & 0xff) as usize]
                ^ SLICES[6][((lo >> 8) & 0xff) as usize]
                ^ SLICES[5][((lo >> 16) & 0xff) as usize]
                ^ SLICES[4][(lo >> 24) as usize]
                ^ SLICES[3][(hi & 0xff) as usize]
                ^ SLICES[2][((hi >> 8) & 0xff) as usize]
                ^ SLICES[1][((hi >> 16) & 0xff) as usize]
                ^ SLICES[0][(hi >> 24) as usize];
        }
        for &b in words.remainder() {
            c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
        }
        self.0 = c;
    }

    pub fn finish(self) -> u32 {
        self.0 ^ 0xffff_ffff
    }
}

/// CRC-32 of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(data);
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414f_a339
        );
        let mut c = Crc32::new();
        c.update(b"1234");
        c.update(b"56789");
        assert_eq!(c.finish(), 0xcbf4_3926);
    }

    /// The eight-byte steps give what one byte at a time gives, for every
    /// length and split.
    #[test]
    fn slicing_matches_bytewise() {
        let data: Vec<u8> = (0..200u32).map(|i| (i * 37 + 11) as u8).collect();
        for len in 0..data.len() {
            let mut slow = 0xffff_ffffu32;
            for &b in &data[..len] {
                slow = TABLE[((slow ^ b as u32) & 0xff) as usize] ^ (slow >> 8);
            }
            assert_eq!(crc32(&data[..len]), slow ^ 0xffff_ffff, "len {len}");
            let mut split = Crc32::new();
            split.update(&data[..len / 3]);
            split.update(&data[len / 3..len]);
            assert_eq!(split.finish(), slow ^ 0xffff_ffff, "split {len}");
        }
    }
}

//! Host tests of the engine and the log (the parser's are in `resp`).

mod aof;
mod engine;
mod protocol;
mod transaction;

/// A small deterministic PRNG (xorshift64*), so failures reproduce.
pub(crate) struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Runs one command on a RESP2 connection (client id 1).
pub(crate) fn execute_resp2(e: &mut crate::Engine, cmd: &[Vec<u8>], now: u64) -> crate::Execution {
    e.execute(&mut crate::Session::new(1), cmd, now)
}

pub(crate) fn args(words: &[&str]) -> Vec<Vec<u8>> {
    words.iter().map(|w| w.as_bytes().to_vec()).collect()
}

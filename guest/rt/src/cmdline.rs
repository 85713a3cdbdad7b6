//! The boot command line: whitespace-separated `key=value` words (or bare
//! `flag` words). Later words override earlier ones.

use crate::platform::{self, CMDLINE_ADDR, CMDLINE_MAX};

/// The whole command line. Invalid UTF-8 is cut at the first bad byte.
pub fn cmdline() -> &'static str {
    let len = (platform::cmdline_len() as usize).min(CMDLINE_MAX);
    // SAFETY: the VMM writes the command line at 0x21000 (up to 2048 bytes, in
    // guest RAM, identity mapped) before boot and never changes it afterwards,
    // and nothing in the guest writes there, so a shared 'static view is sound.
    let bytes = unsafe { core::slice::from_raw_parts(CMDLINE_ADDR as *const u8, len) };
    match core::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
    }
}

/// Each word as `(key, Some(value))` for `key=value`, `(word, None)` otherwise.
pub fn args() -> impl Iterator<Item = (&'static str, Option<&'static str>)> {
    parse(cmdline())
}

/// Parses a command line (exposed for tests and other sources of words).
pub fn parse(line: &str) -> impl Iterator<Item = (&str, Option<&str>)> {
    line.split_ascii_whitespace()
        .map(|word| match word.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (word, None),
        })
}

/// The value of the last `key=value` word, or `Some("")` for a bare `key`.
pub fn get(key: &str) -> Option<&'static str> {
    args()
        .filter(|(k, _)| *k == key)
        .last()
        .map(|(_, v)| v.unwrap_or(""))
}

/// The value of `key` parsed as a decimal or `0x` hex integer.
/// `None` if absent, `Some(Err(value))` if it is not a number.
pub fn get_u64(key: &str) -> Option<Result<u64, &'static str>> {
    let value = get(key)?;
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    };
    Some(parsed.map_err(|_| value))
}

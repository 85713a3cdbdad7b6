//! RESP: an incremental request parser with strict limits, and reply
//! builders for RESP2 and RESP3.
//!
//! Requests look the same in both protocol versions; replies differ. A
//! connection speaks RESP2 until it negotiates RESP3 with `HELLO 3`
//! ([`crate::engine::Session`]); [`Reply`] then encodes nulls, maps and
//! verbatim strings the RESP3 way.
//!
//! One [`Parser`] per connection. The glue [`Parser::feed`]s the bytes it
//! received and calls [`Parser::next_command`] until it returns `Ok(None)`.
//! Requests are either RESP arrays of bulk strings (what every client
//! library sends) or inline commands (`PING\r\n`, as typed into telnet).
//! On a [`ProtocolError`] the glue sends [`ProtocolError::reply`] and closes
//! the connection, as Redis does; the parser stays failed.
//!
//! No length read from the wire is trusted: a bulk or array length above
//! the limits is refused before anything is allocated for it.

use alloc::vec::Vec;
use core::fmt;

/// Request limits. The defaults are documented in `docs/ftkv.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest bulk string (a key or a value), bytes.
    pub max_bulk: usize,
    /// Most arguments in one command (the command name included).
    pub max_args: usize,
    /// Longest inline command line, bytes.
    pub max_inline: usize,
    /// Largest whole request (all of one command's bytes on the wire).
    pub max_request: usize,
    /// Most bytes buffered in the parser at once (see [`Parser::room`]).
    pub max_buffer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk: 512 * 1024,
            max_args: 1024,
            max_inline: 64 * 1024,
            max_request: 1024 * 1024,
            max_buffer: 1024 * 1024 + 64 * 1024,
        }
    }
}

/// Longest `*<n>` / `$<n>` header line accepted, without its CRLF.
const MAX_HEADER_LINE: usize = 32;
/// Consumed bytes are dropped from the buffer once there are this many.
const COMPACT_AT: usize = 4096;

/// A request that cannot be parsed. The connection must be closed after
/// sending [`ProtocolError::reply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// `*<n>` with a bad number or more than `max_args`.
    InvalidMultibulkLength,
    /// `$<n>` with a bad number or more than `max_bulk`.
    InvalidBulkLength,
    /// An array element that is not a bulk string.
    ExpectedDollar(u8),
    /// A header line or bulk string not ended by CRLF.
    ExpectedCrlf,
    /// A header line longer than any valid one.
    HeaderTooLong,
    /// An inline line longer than `max_inline`.
    InlineTooLong,
    /// An inline command with a quote that is never closed.
    UnbalancedQuotes,
    /// An inline command with more than `max_args` words.
    TooManyArguments,
    /// One command larger than `max_request`.
    RequestTooLarge,
    /// More bytes fed than `max_buffer` allows.
    BufferFull,
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::InvalidMultibulkLength => f.write_str("invalid multibulk length"),
            ProtocolError::InvalidBulkLength => f.write_str("invalid bulk length"),
            ProtocolError::ExpectedDollar(b) if b.is_ascii_graphic() => {
                write!(f, "expected '$', got '{}'", *b as char)
            }
            ProtocolError::ExpectedDollar(b) => write!(f, "expected '$', got byte 0x{b:02x}"),
            ProtocolError::ExpectedCrlf => f.write_str("expected CRLF"),
            ProtocolError::HeaderTooLong => f.write_str("too big count string"),
            ProtocolError::InlineTooLong => f.write_str("too big inline request"),
            ProtocolError::UnbalancedQuotes => f.write_str("unbalanced quotes in request"),
            ProtocolError::TooManyArguments => f.write_str("too many arguments"),
            ProtocolError::RequestTooLarge => f.write_str("request too large"),
            ProtocolError::BufferFull => f.write_str("too many pending bytes"),
        }
    }
}

impl ProtocolError {
    /// The reply to send before closing: `-ERR Protocol error: ...\r\n`.
    pub fn reply(&self) -> Vec<u8> {
        let mut out = Vec::new();
        push_error(&mut out, &alloc::format!("ERR Protocol error: {self}"));
        out
    }
}

#[derive(Debug)]
enum State {
    /// Between commands.
    Idle,
    /// Inside `*<n>`: `remaining` bulk strings still to come.
    Array {
        remaining: usize,
        args: Vec<Vec<u8>>,
        /// Wire bytes of this command so far.
        size: usize,
        /// Length of the bulk whose `$<n>` header has been read.
        bulk: Option<usize>,
    },
    Failed(ProtocolError),
}

/// An incremental RESP2 request parser for one connection.
#[derive(Debug)]
pub struct Parser {
    limits: Limits,
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    pos: usize,
    /// Bytes after `pos` already searched for an inline line end.
    inline_scanned: usize,
    state: State,
}

impl Default for Parser {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl Parser {
    pub fn new(limits: Limits) -> Self {
        Parser {
            limits,
            buf: Vec::new(),
            pos: 0,
            inline_scanned: 0,
            state: State::Idle,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Bytes received and not yet consumed by a complete command.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// How many more bytes [`Parser::feed`] accepts now. The glue reads at
    /// most this much from the socket (TCP flow control does the rest).
    pub fn room(&self) -> usize {
        self.limits.max_buffer.saturating_sub(self.buffered())
    }

    /// True once a protocol error was returned (the connection must close).
    pub fn is_failed(&self) -> bool {
        matches!(self.state, State::Failed(_))
    }

    /// Appends received bytes. Feeding more than [`Parser::room`] is a
    /// protocol error.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), ProtocolError> {
        if let State::Failed(e) = &self.state {
            return Err(e.clone());
        }
        if data.len() > self.room() {
            return Err(self.fail(ProtocolError::BufferFull));
        }
        if self.pos >= COMPACT_AT || (self.pos > 0 && self.pos == self.buf.len()) {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    fn fail(&mut self, e: ProtocolError) -> ProtocolError {
        self.state = State::Failed(e.clone());
        // Nothing more will be parsed: free the buffer.
        self.buf = Vec::new();
        self.pos = 0;
        e
    }

    /// The next complete command, `Ok(None)` when more bytes are needed.
    /// Empty commands (`*0`, blank inline lines) are skipped.
    pub fn next_command(&mut self) -> Result<Option<Vec<Vec<u8>>>, ProtocolError> {
        loop {
            match self.step() {
                Ok(Step::Command(args)) if args.is_empty() => continue,
                Ok(Step::Command(args)) => return Ok(Some(args)),
                Ok(Step::NeedMore) => return Ok(None),
                Err(e) => return Err(self.fail(e)),
            }
        }
    }

    fn rest(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn step(&mut self) -> Result<Step, ProtocolError> {
        match &mut self.state {
            State::Failed(e) => Err(e.clone()),
            State::Idle => {
                let Some(&first) = self.rest().first() else {
                    return Ok(Step::NeedMore);
                };
                if first != b'*' {
                    return self.inline();
                }
                let Some((n, used)) = header_line(self.rest())? else {
                    return Ok(Step::NeedMore);
                };
                self.pos += used;
                if n <= 0 {
                    return Ok(Step::Command(Vec::new()));
                }
                if n as u64 > self.limits.max_args as u64 {
                    return Err(ProtocolError::InvalidMultibulkLength);
                }
                let n = n as usize;
                self.state = State::Array {
                    remaining: n,
                    args: Vec::with_capacity(n.min(16)),
                    size: used,
                    bulk: None,
                };
                self.array()
            }
            State::Array { .. } => self.array(),
        }
    }

    fn array(&mut self) -> Result<Step, ProtocolError> {
        loop {
            let rest_len = self.buf.len() - self.pos;
            let State::Array {
                remaining,
                args,
                size,
                bulk,
            } = &mut self.state
            else {
                unreachable!("array() is only called in the Array state");
            };
            if *remaining == 0 {
                let args = core::mem::take(args);
                self.state = State::Idle;
                return Ok(Step::Command(args));
            }
            match *bulk {
                None => {
                    let rest = &self.buf[self.pos..];
                    let Some(&first) = rest.first() else {
                        return Ok(Step::NeedMore);
                    };
                    if first != b'$' {
                        return Err(ProtocolError::ExpectedDollar(first));
                    }
                    let Some((n, used)) = header_line(rest)? else {
                        return Ok(Step::NeedMore);
                    };
                    if n < 0 || n as u64 > self.limits.max_bulk as u64 {
                        return Err(ProtocolError::InvalidBulkLength);
                    }
                    *size += used + n as usize + 2;
                    if *size > self.limits.max_request {
                        return Err(ProtocolError::RequestTooLarge);
                    }
                    self.pos += used;
                    *bulk = Some(n as usize);
                }
                Some(n) => {
                    if rest_len < n + 2 {
                        return Ok(Step::NeedMore);
                    }
                    let start = self.pos;
                    if &self.buf[start + n..start + n + 2] != b"\r\n" {
                        return Err(ProtocolError::ExpectedCrlf);
                    }
                    args.push(self.buf[start..start + n].to_vec());
                    *remaining -= 1;
                    *bulk = None;
                    self.pos += n + 2;
                }
            }
        }
    }

    fn inline(&mut self) -> Result<Step, ProtocolError> {
        let rest = self.rest();
        let from = self.inline_scanned.min(rest.len());
        let Some(nl) = rest[from..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| i + from)
        else {
            if rest.len() > self.limits.max_inline {
                return Err(ProtocolError::InlineTooLong);
            }
            self.inline_scanned = rest.len();
            return Ok(Step::NeedMore);
        };
        if nl > self.limits.max_inline {
            return Err(ProtocolError::InlineTooLong);
        }
        let mut line = &rest[..nl];
        if let [head @ .., b'\r'] = line {
            line = head;
        }
        let args = split_inline(line, self.limits.max_args)?;
        self.pos += nl + 1;
        self.inline_scanned = 0;
        Ok(Step::Command(args))
    }
}

enum Step {
    Command(Vec<Vec<u8>>),
    NeedMore,
}

/// Parses `*<n>\r\n` or `$<n>\r\n` at the start of `data`: the number and
/// the bytes used, or `None` if the line is not complete yet.
fn header_line(data: &[u8]) -> Result<Option<(i64, usize)>, ProtocolError> {
    let bad = if data[0] == b'*' {
        ProtocolError::InvalidMultibulkLength
    } else {
        ProtocolError::InvalidBulkLength
    };
    let window = &data[..data.len().min(MAX_HEADER_LINE + 2)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        if data.len() > MAX_HEADER_LINE + 1 {
            return Err(ProtocolError::HeaderTooLong);
        }
        return Ok(None);
    };
    let Some(&lf) = data.get(cr + 1) else {
        return Ok(None);
    };
    if lf != b'\n' {
        return Err(ProtocolError::ExpectedCrlf);
    }
    let n = parse_i64(&data[1..cr]).ok_or(bad)?;
    Ok(Some((n, cr + 2)))
}

/// Parses a decimal integer the way Redis's `string2ll` does: optional `-`,
/// digits, no leading zeros (except "0"), no spaces or `+`, no overflow.
pub fn parse_i64(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    if digits[0] == b'0' && (digits.len() > 1 || neg) {
        return None;
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((d - b'0') as u64)?;
    }
    if neg {
        if v > i64::MAX as u64 + 1 {
            None
        } else {
            Some((v as i64).wrapping_neg())
        }
    } else {
        i64::try_from(v).ok()
    }
}

/// Splits an inline command line into words like Redis's `sdssplitargs`:
/// blanks separate words; `"..."` allows `\n \r \t \b \a \\ \" \xHH`
/// escapes; `'...'` allows `\'`; a closing quote must be followed by a
/// blank or the end.
fn split_inline(line: &[u8], max_args: usize) -> Result<Vec<Vec<u8>>, ProtocolError> {
    let mut args = Vec::new();
    let mut i = 0;
    let blank = |b: u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n' | 0x0b | 0x0c);
    loop {
        while i < line.len() && blank(line[i]) {
            i += 1;
        }
        if i >= line.len() {
            return Ok(args);
        }
        if args.len() >= max_args {
            return Err(ProtocolError::TooManyArguments);
        }
        let mut word = Vec::new();
        match line[i] {
            b'"' => {
                i += 1;
                loop {
                    let Some(&c) = line.get(i) else {
                        return Err(ProtocolError::UnbalancedQuotes);
                    };
                    match c {
                        b'\\'
                            if i + 3 < line.len()
                                && line[i + 1] == b'x'
                                && line[i + 2].is_ascii_hexdigit()
                                && line[i + 3].is_ascii_hexdigit() =>
                        {
                            word.push(hex(line[i + 2]) << 4 | hex(line[i + 3]));
                            i += 4;
                        }
                        b'\\' if i + 1 < line.len() => {
                            word.push(match line[i + 1] {
                                b'n' => b'\n',
                                b'r' => b'\r',
                                b't' => b'\t',
                                b'b' => 0x08,
                                b'a' => 0x07,
                                other => other,
                            });
                            i += 2;
                        }
                        b'"' => {
                            i += 1;
                            if i < line.len() && !blank(line[i]) {
                                return Err(ProtocolError::UnbalancedQuotes);
                            }
                            break;
                        }
                        _ => {
                            word.push(c);
                            i += 1;
                        }
                    }
                }
            }
            b'\'' => {
                i += 1;
                loop {
                    let Some(&c) = line.get(i) else {
                        return Err(ProtocolError::UnbalancedQuotes);
                    };
                    match c {
                        b'\\' if line.get(i + 1) == Some(&b'\'') => {
                            word.push(b'\'');
                            i += 2;
                        }
                        b'\'' => {
                            i += 1;
                            if i < line.len() && !blank(line[i]) {
                                return Err(ProtocolError::UnbalancedQuotes);
                            }
                            break;
                        }
                        _ => {
                            word.push(c);
                            i += 1;
                        }
                    }
                }
            }
            _ => {
                while i < line.len() && !blank(line[i]) {
                    word.push(line[i]);
                    i += 1;
                }
            }
        }
        args.push(word);
    }
}

fn hex(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    }
}

// ---- replies ----

/// The reply protocol of a connection, chosen with `HELLO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// What every connection starts with.
    #[default]
    Resp2,
    Resp3,
}

impl Protocol {
    /// The number `HELLO` takes and reports (`proto`).
    pub fn version(self) -> i64 {
        match self {
            Protocol::Resp2 => 2,
            Protocol::Resp3 => 3,
        }
    }
}

/// One command's reply, encoded for the connection's [`Protocol`]. Types
/// both versions share (simple strings, errors, integers, bulk strings,
/// arrays) encode the same; a null is `$-1` in RESP2 and `_` in RESP3, a
/// map a flat array of keys and values in RESP2, a verbatim string a bulk
/// string in RESP2.
#[derive(Debug)]
pub struct Reply {
    out: Vec<u8>,
    proto: Protocol,
}

impl Reply {
    pub fn new(proto: Protocol) -> Self {
        Reply {
            out: Vec::new(),
            proto,
        }
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.out
    }

    pub fn simple(&mut self, text: &str) {
        push_simple(&mut self.out, text);
    }

    pub fn error(&mut self, message: &str) {
        push_error(&mut self.out, message);
    }

    pub fn int(&mut self, n: i64) {
        push_int(&mut self.out, n);
    }

    pub fn bulk(&mut self, data: &[u8]) {
        push_bulk(&mut self.out, data);
    }

    /// A missing value: `$-1` / `_`.
    pub fn null(&mut self) {
        match self.proto {
            Protocol::Resp2 => push_null(&mut self.out),
            Protocol::Resp3 => self.out.extend_from_slice(b"_\r\n"),
        }
    }

    /// A missing array (EXEC aborted by WATCH): `*-1` / `_`.
    pub fn null_array(&mut self) {
        match self.proto {
            Protocol::Resp2 => self.out.extend_from_slice(b"*-1\r\n"),
            // RESP3 has one null for every type.
            Protocol::Resp3 => self.null(),
        }
    }

    /// An array of `n` elements, pushed next.
    pub fn array(&mut self, n: usize) {
        push_array_len(&mut self.out, n);
    }

    /// A map of `n` pairs, pushed next as key, value, key, value...
    pub fn map(&mut self, n: usize) {
        match self.proto {
            Protocol::Resp2 => push_array_len(&mut self.out, 2 * n),
            Protocol::Resp3 => {
                self.out.push(b'%');
                push_decimal(&mut self.out, n as i64);
                self.out.extend_from_slice(b"\r\n");
            }
        }
    }

    /// Text for people (INFO): RESP3 `=len\r\ntxt:...`, RESP2 a bulk string.
    pub fn verbatim_text(&mut self, text: &[u8]) {
        match self.proto {
            Protocol::Resp2 => push_bulk(&mut self.out, text),
            Protocol::Resp3 => {
                self.out.push(b'=');
                push_decimal(&mut self.out, text.len() as i64 + 4);
                self.out.extend_from_slice(b"\r\ntxt:");
                self.out.extend_from_slice(text);
                self.out.extend_from_slice(b"\r\n");
            }
        }
    }
}

/// `+text\r\n` (text must not contain CR or LF).
pub fn push_simple(out: &mut Vec<u8>, text: &str) {
    out.push(b'+');
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `-message\r\n`; CR and LF in `message` become spaces. `message` starts
/// with the error code, e.g. `ERR syntax error`.
pub fn push_error(out: &mut Vec<u8>, message: &str) {
    push_error_bytes(out, message.as_bytes());
}

/// [`push_error`] for a message that may hold arbitrary bytes.
pub fn push_error_bytes(out: &mut Vec<u8>, message: &[u8]) {
    out.push(b'-');
    out.extend(
        message
            .iter()
            .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

/// `:n\r\n`
pub fn push_int(out: &mut Vec<u8>, n: i64) {
    out.push(b':');
    push_decimal(out, n);
    out.extend_from_slice(b"\r\n");
}

/// `$len\r\ndata\r\n`
pub fn push_bulk(out: &mut Vec<u8>, data: &[u8]) {
    out.push(b'$');
    push_decimal(out, data.len() as i64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The null bulk string `$-1\r\n`.
pub fn push_null(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

/// `*n\r\n`, followed by `n` elements pushed by the caller.
pub fn push_array_len(out: &mut Vec<u8>, n: usize) {
    out.push(b'*');
    push_decimal(out, n as i64);
    out.extend_from_slice(b"\r\n");
}

/// Appends the decimal digits of `n`.
pub fn push_decimal(out: &mut Vec<u8>, n: i64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(p: &mut Parser) -> Result<Vec<Vec<Vec<u8>>>, ProtocolError> {
        let mut v = Vec::new();
        while let Some(c) = p.next_command()? {
            v.push(c);
        }
        Ok(v)
    }

    fn cmd(words: &[&str]) -> Vec<Vec<u8>> {
        words.iter().map(|w| w.as_bytes().to_vec()).collect()
    }

    const PIPELINE: &[u8] = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nva\r\nl\r\n\
PING\r\n*1\r\n$4\r\nPING\r\n*0\r\n\r\n  \r\n*2\r\n$4\r\nECHO\r\n$0\r\n\r\n\
echo \"a b\\x41\\n\" 'c\\'d'\n*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n";

    fn expected() -> Vec<Vec<Vec<u8>>> {
        vec![
            cmd(&["SET", "key", "va\r\nl"]),
            cmd(&["PING"]),
            cmd(&["PING"]),
            cmd(&["ECHO", ""]),
            cmd(&["echo", "a bA\n", "c'd"]),
            cmd(&["GET", "key"]),
        ]
    }

    #[test]
    fn pipeline_in_one_feed() {
        let mut p = Parser::default();
        p.feed(PIPELINE).unwrap();
        assert_eq!(all(&mut p).unwrap(), expected());
        assert_eq!(p.buffered(), 0);
    }

    #[test]
    fn pipeline_split_at_every_boundary_parses_the_same() {
        for cut in 0..=PIPELINE.len() {
            let mut p = Parser::default();
            p.feed(&PIPELINE[..cut]).unwrap();
            let mut got = all(&mut p).unwrap();
            p.feed(&PIPELINE[cut..]).unwrap();
            got.extend(all(&mut p).unwrap());
            assert_eq!(got, expected(), "cut at {cut}");
        }
        // And one byte at a time.
        let mut p = Parser::default();
        let mut got = Vec::new();
        for b in PIPELINE {
            p.feed(core::slice::from_ref(b)).unwrap();
            got.extend(all(&mut p).unwrap());
        }
        assert_eq!(got, expected());
    }

    #[test]
    fn two_gigabyte_bulk_is_refused_without_waiting_or_allocating() {
        let mut p = Parser::default();
        p.feed(b"*2\r\n$3\r\nSET\r\n$2147483648\r\n").unwrap();
        assert_eq!(p.next_command(), Err(ProtocolError::InvalidBulkLength));
        assert!(p.is_failed());
        assert_eq!(
            ProtocolError::InvalidBulkLength.reply(),
            b"-ERR Protocol error: invalid bulk length\r\n"
        );
        // Stays failed.
        assert!(p.feed(b"PING\r\n").is_err());
        assert!(p.next_command().is_err());
        let mut p = Parser::default();
        p.feed(b"*2147483647\r\n").unwrap();
        assert_eq!(p.next_command(), Err(ProtocolError::InvalidMultibulkLength));
        let mut p = Parser::default();
        p.feed(b"*1\r\n$99999999999999999999999\r\n").unwrap();
        assert_eq!(p.next_command(), Err(ProtocolError::InvalidBulkLength));
    }

    #[test]
    fn limits_and_malformed_input() {
        let cases: &[(&[u8], ProtocolError)] = &[
            (b"*1\r\n$-1\r\n", ProtocolError::InvalidBulkLength),
            (b"*x\r\n", ProtocolError::InvalidMultibulkLength),
            (b"*1\r\n:1\r\n", ProtocolError::ExpectedDollar(b':')),
            (b"*1\r\n$3\r\nabcXY", ProtocolError::ExpectedCrlf),
            (b"*1\rX", ProtocolError::ExpectedCrlf),
            (b"*1\r\n$524289\r\n", ProtocolError::InvalidBulkLength),
            (b"*1025\r\n", ProtocolError::InvalidMultibulkLength),
            (
                b"*000000000000000000000000000000000000000000",
                ProtocolError::HeaderTooLong,
            ),
            (b"echo \"abc\n", ProtocolError::UnbalancedQuotes),
            (b"echo 'abc'x\n", ProtocolError::UnbalancedQuotes),
        ];
        for (input, err) in cases {
            let mut p = Parser::default();
            p.feed(input).unwrap();
            assert_eq!(p.next_command().as_ref(), Err(err), "{input:?}");
        }
        // Three 512 KiB values exceed the 1 MiB request limit.
        let mut p = Parser::default();
        let big = vec![b'a'; 512 * 1024];
        let mut req = b"*4\r\n$4\r\nMSET\r\n$1\r\nk\r\n$524288\r\n".to_vec();
        req.extend_from_slice(&big);
        req.extend_from_slice(b"\r\n$524288\r\n");
        p.feed(&req).unwrap();
        assert_eq!(p.next_command(), Err(ProtocolError::RequestTooLarge));
        // Inline line over 64 KiB.
        let mut p = Parser::default();
        p.feed(&vec![b'a'; 64 * 1024 + 1]).unwrap();
        assert_eq!(p.next_command(), Err(ProtocolError::InlineTooLong));
        // Too many bytes fed at once.
        let mut p = Parser::default();
        assert_eq!(
            p.feed(&vec![b'*'; p.room() + 1]),
            Err(ProtocolError::BufferFull)
        );
        // Inline with more than max_args words.
        let mut p = Parser::default();
        let mut line = Vec::new();
        for _ in 0..1025 {
            line.extend_from_slice(b"a ");
        }
        line.push(b'\n');
        p.feed(&line).unwrap();
        assert_eq!(p.next_command(), Err(ProtocolError::TooManyArguments));
    }

    #[test]
    fn largest_allowed_value_parses() {
        let mut p = Parser::default();
        let mut req = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$524288\r\n".to_vec();
        req.extend(core::iter::repeat_n(b'v', 512 * 1024));
        req.extend_from_slice(b"\r\n");
        p.feed(&req).unwrap();
        let c = p.next_command().unwrap().unwrap();
        assert_eq!(c[2].len(), 512 * 1024);
    }

    #[test]
    fn integers_parse_like_redis() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"-12"), Some(-12));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"-",
            b"+1",
            b" 1",
            b"01",
            b"-0",
            b"1a",
            b"9223372036854775808",
            b"-9223372036854775809",
        ] {
            assert_eq!(parse_i64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn replies_encode() {
        let mut o = Vec::new();
        push_simple(&mut o, "OK");
        push_error(&mut o, "ERR a\r\nb");
        push_int(&mut o, -42);
        push_int(&mut o, i64::MIN);
        push_bulk(&mut o, b"hi");
        push_null(&mut o);
        push_array_len(&mut o, 0);
        assert_eq!(
            o,
            b"+OK\r\n-ERR a  b\r\n:-42\r\n:-9223372036854775808\r\n$2\r\nhi\r\n$-1\r\n*0\r\n"
        );
    }

    #[test]
    fn reply_types_encode_per_protocol() {
        let build = |proto| {
            let mut r = Reply::new(proto);
            r.map(2);
            r.bulk(b"a");
            r.null();
            r.bulk(b"b");
            r.array(1);
            r.int(7);
            r.verbatim_text(b"x:1\r\n");
            r.simple("OK");
            r.error("ERR e");
            r.into_bytes()
        };
        assert_eq!(
            build(Protocol::Resp2),
            b"*4\r\n$1\r\na\r\n$-1\r\n$1\r\nb\r\n*1\r\n:7\r\n$5\r\nx:1\r\n\r\n+OK\r\n-ERR e\r\n"
        );
        assert_eq!(
            build(Protocol::Resp3),
            b"%2\r\n$1\r\na\r\n_\r\n$1\r\nb\r\n*1\r\n:7\r\n=9\r\ntxt:x:1\r\n\r\n+OK\r\n-ERR e\r\n"
        );
        assert_eq!(Protocol::default(), Protocol::Resp2);
    }

    use crate::tests::Rng;

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let alphabet = b"*$\r\n0123456789-abc \"'\\x";
        for _ in 0..100_000 {
            let mut p = Parser::default();
            let len = (rng.next() % 64) as usize;
            let structured = rng.next().is_multiple_of(2);
            let input: Vec<u8> = (0..len)
                .map(|_| {
                    let r = rng.next();
                    if structured {
                        alphabet[(r % alphabet.len() as u64) as usize]
                    } else {
                        r as u8
                    }
                })
                .collect();
            let cut = if len == 0 {
                0
            } else {
                (rng.next() as usize) % len
            };
            for part in [&input[..cut], &input[cut..]] {
                if p.feed(part).is_err() {
                    break;
                }
                let _ = all(&mut p);
            }
        }
    }
}

//! The environment boundary.

use super::log::LogError;
use serde::{Deserialize, Serialize};
use std::fmt;

/// What kind of guest-caused exit happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitKind {
    PioIn,
    PioOut,
    MmioRead,
    MmioWrite,
    Hlt,
    Shutdown,
}

/// Where the guest exited, precisely enough for the backup to check that it
/// is at the same place: kind, port or address, access size, and the value
/// written (0 for reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitPoint {
    pub kind: ExitKind,
    pub addr: u64,
    pub size: u8,
    pub value: u64,
}

impl fmt::Display for ExitPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ExitKind::PioOut | ExitKind::MmioWrite => write!(
                f,
                "{:?} {:#x} size {} value {:#x}",
                self.kind, self.addr, self.size, self.value
            ),
            ExitKind::PioIn | ExitKind::MmioRead => {
                write!(f, "{:?} {:#x} size {}", self.kind, self.addr, self.size)
            }
            ExitKind::Hlt | ExitKind::Shutdown => write!(f, "{:?}", self.kind),
        }
    }
}

/// An input handed to the guest during an exit, besides the clock.
///
/// Byte payloads are (de)serialized as byte strings (`serde_bytes`): in
/// postcard that is the same encoding as a sequence of `u8` (a varint
/// length, then the bytes), written with one copy instead of element by
/// element.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Input {
    /// Random bytes for a platform ENTROPY request.
    Entropy(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The outcome of a platform WAIT: whether input arrived, and the wake time.
    Wake { input_arrived: bool, now_ns: u64 },
    /// A network frame delivered into the guest's RX queue.
    NetRx(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Data a disk read returned (`ship` mode: the primary's bytes).
    DiskRead(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A disk read's length and the blake3 of its data (`backup-reads`
    /// mode: the backup reads its own disk and checks the hash).
    DiskReadHash { len: u32, hash: [u8; 32] },
}

impl Input {
    /// Bytes of payload this input carries.
    pub fn payload_len(&self) -> usize {
        match self {
            Input::Entropy(b) | Input::NetRx(b) | Input::DiskRead(b) => b.len(),
            Input::Wake { .. } => 16,
            Input::DiskReadHash { .. } => 36,
        }
    }
}

impl fmt::Display for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short = |b: &[u8]| blake3::hash(b).to_hex()[..16].to_string();
        match self {
            Input::Entropy(b) => write!(f, "{} entropy bytes ({})", b.len(), short(b)),
            Input::Wake {
                input_arrived,
                now_ns,
            } => write!(f, "wake at {now_ns} ns (input arrived: {input_arrived})"),
            Input::NetRx(b) => write!(f, "received frame of {} bytes ({})", b.len(), short(b)),
            Input::DiskRead(b) => write!(f, "disk read of {} bytes ({})", b.len(), short(b)),
            Input::DiskReadHash { len, hash } => write!(
                f,
                "disk read of {len} bytes, data hash {}",
                &blake3::Hash::from(*hash).to_hex()[..16]
            ),
        }
    }
}

/// What a WAIT returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitOutcome {
    pub input_arrived: bool,
    pub now_ns: u64,
}

/// How long a `WAIT` that found input may go on gathering more before the
/// guest resumes (platform `WAIT`, `arg1` and `arg2`): interrupt moderation,
/// asked for by the guest. Fewer, fuller exits cost less than many small
/// ones (an exit costs about 30 us on PVM); the outcome is recorded as for
/// any wait, so replay does not need to know.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gather {
    /// At most this long after the wait began (0: resume at the first input).
    pub window_ns: u64,
    /// Resume earlier once this many frames wait (0: the whole window).
    pub frames: u64,
}

/// How the machine ended; recorded so that replay checks it ends the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    PowerOff {
        code: i32,
    },
    Panic {
        message: String,
    },
    Crash {
        vector: u8,
        error_code: u64,
        rip: u64,
        cr2: u64,
    },
    TripleFault {
        rip: u64,
    },
    Halted {
        rip: u64,
    },
    BadAccess {
        kind: ExitKind,
        addr: u64,
        rip: u64,
    },
    /// The guest gave a device an invalid request (a buffer outside its
    /// memory, a broken virtqueue).
    DeviceFault {
        what: String,
    },
    /// Stopped from outside (operator, shutdown); not a guest decision.
    Stopped,
}

pub fn vector_name(vector: u8) -> &'static str {
    match vector {
        0 => "#DE divide error",
        1 => "#DB debug",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 error",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD error",
        _ => "interrupt",
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::PowerOff { code } => write!(f, "powered off with code {code}"),
            Outcome::Panic { message } => write!(f, "guest panic: {message}"),
            Outcome::Crash {
                vector,
                error_code,
                rip,
                cr2,
            } => {
                write!(
                    f,
                    "guest crashed: {} (vector {vector}) error_code={error_code:#x} rip={rip:#x}",
                    vector_name(*vector)
                )?;
                if *vector == 14 {
                    write!(f, " address={cr2:#x}")?;
                }
                Ok(())
            }
            Outcome::TripleFault { rip } => write!(f, "guest triple fault near rip={rip:#x}"),
            Outcome::Halted { rip } => write!(f, "guest halted at rip={rip:#x}"),
            Outcome::BadAccess { kind, addr, rip } => write!(
                f,
                "guest crashed: {kind:?} at unmapped address {addr:#x} rip={rip:#x}"
            ),
            Outcome::DeviceFault { what } => {
                write!(f, "guest crashed: invalid device request: {what}")
            }
            Outcome::Stopped => write!(f, "stopped"),
        }
    }
}

impl Outcome {
    /// Whether the guest ended on its own terms (not a crash).
    pub fn is_clean(&self) -> bool {
        matches!(self, Outcome::PowerOff { .. } | Outcome::Stopped)
    }
}

/// Which pages a state digest covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DigestDue {
    /// Hash the pages this side saw dirtied (the recording side decides).
    OwnDirtyPages,
    /// Hash all of memory.
    Full,
    /// Hash exactly these page runs (the replaying side follows the log).
    Pages(Vec<super::digest::PageRun>),
}

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("DIVERGED at exit {ordinal}: {what}")]
    Diverged { ordinal: u64, what: String },
    #[error("the log ends at exit {ordinal}, before the machine finished (no end marker)")]
    LogEnded { ordinal: u64 },
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("entropy source failed: {0}")]
    Entropy(#[source] std::io::Error),
    #[error("cannot create the eventfd that wakes a waiting guest: {0}")]
    Waker(#[source] std::io::Error),
    #[error("local disk read failed, stopping rather than diverging: {0}")]
    DiskRead(String),
    /// The machine was asked to stop while it waited for the log or for
    /// room in it; the exit in progress was not completed.
    #[error("stopped while waiting for the log at exit {ordinal}")]
    Interrupted { ordinal: u64 },
}

/// Reads this site's own disk into a buffer.
pub type LocalRead<'a> = &'a mut dyn FnMut(&mut [u8]) -> Result<(), String>;

/// The boundary through which every non-deterministic input passes.
pub trait Environment {
    /// A guest-caused exit numbered `ordinal` happened at `point`; returns the
    /// clock value (monotonic ns) the guest sees from this exit on.
    fn exit(&mut self, ordinal: u64, point: &ExitPoint) -> Result<u64, EnvError>;
    /// Random bytes for the guest.
    fn entropy(&mut self, buf: &mut [u8]) -> Result<(), EnvError>;
    /// Idles until `deadline_ns` or until input arrives, then gathers more
    /// input as `gather` allows.
    fn wait(&mut self, deadline_ns: u64, gather: Gather) -> Result<WaitOutcome, EnvError>;
    /// One frame from the outside world for the guest, if one is waiting.
    fn net_rx(&mut self) -> Result<Option<Vec<u8>>, EnvError>;
    /// A frame the guest sent (an output).
    fn net_tx(&mut self, frame: &[u8]) -> Result<(), EnvError>;
    /// Data for a guest disk read of `buf.len()` bytes at byte `offset`;
    /// `local` reads this site's own disk.
    fn disk_read(
        &mut self,
        offset: u64,
        buf: &mut [u8],
        local: LocalRead<'_>,
    ) -> Result<(), EnvError>;
    /// The exit has been handled.
    fn exit_done(&mut self) -> Result<(), EnvError>;
    /// Whether a state digest is taken after exit `ordinal`, and of which pages.
    fn digest_due(&mut self, ordinal: u64) -> Result<Option<DigestDue>, EnvError>;
    /// The digest taken after exit `ordinal` over `pages` (empty when `full`).
    fn digest_taken(
        &mut self,
        ordinal: u64,
        full: bool,
        pages: &[super::digest::PageRun],
        hash: [u8; 32],
    ) -> Result<(), EnvError>;
    /// Whether the recording was stopped from outside right after exit
    /// `ordinal` (replay stops at the same exit; live sides are stopped by
    /// their `VcpuControl`).
    fn stopped_at(&mut self, _ordinal: u64) -> Result<bool, EnvError> {
        Ok(false)
    }
    /// The machine ended after exit `ordinal` with `outcome` and final state `digest`.
    fn finish(&mut self, ordinal: u64, outcome: &Outcome, digest: [u8; 32])
        -> Result<(), EnvError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Input` as it was encoded before its payloads became byte strings.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum PlainInput {
        Entropy(Vec<u8>),
        Wake { input_arrived: bool, now_ns: u64 },
        NetRx(Vec<u8>),
        DiskRead(Vec<u8>),
        DiskReadHash { len: u32, hash: [u8; 32] },
    }

    /// Logs written before keep reading, and new ones read the same.
    #[test]
    fn byte_payloads_encode_as_the_plain_sequence_did() {
        let frame: Vec<u8> = (0..=255u8).cycle().take(1500).collect();
        let cases = [
            (
                Input::NetRx(frame.clone()),
                PlainInput::NetRx(frame.clone()),
            ),
            (Input::DiskRead(vec![]), PlainInput::DiskRead(vec![])),
            (Input::Entropy(vec![7; 8]), PlainInput::Entropy(vec![7; 8])),
        ];
        for (new, plain) in cases {
            let a = postcard::to_stdvec(&new).unwrap();
            let b = postcard::to_stdvec(&plain).unwrap();
            assert_eq!(a, b);
            assert_eq!(postcard::from_bytes::<Input>(&b).unwrap(), new);
            assert_eq!(postcard::from_bytes::<PlainInput>(&a).unwrap(), plain);
        }
    }
}

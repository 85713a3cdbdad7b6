//! Does ftkv's engine slow down as its keyspace grows, and is the heap why?
//!
//! Replays issue 8's workload on the host, through the same code the guest
//! runs (RESP parser, engine, log writer), with the process's allocator
//! chosen on the command line:
//!
//! ```text
//! cargo run --release -p ftvm-tests --example ftkv_heap_growth -- talc
//! cargo run --release -p ftvm-tests --example ftkv_heap_growth -- linked-list
//! cargo run --release -p ftvm-tests --example ftkv_heap_growth -- system
//! ```
//!
//! `talc` is the guest's heap since issue 8, `linked-list` the first-fit
//! `linked_list_allocator` it had before, `system` glibc's malloc. Each round
//! is 10,000 `MSET` of 10 keys drawn from 200,000 (`key:%012d`, 64-byte
//! values, as `redis-benchmark -t mset -r 200000 -d 64` sends them) from 30
//! connections, 4 pipelined each; it prints requests/s, keys and allocations
//! per request. A measurement to read, not a test: nothing is asserted.

use ftkv_core::aof::LogWriter;
use ftkv_core::{Config, Engine, Parser, Session};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::Instant;

const ARENA_SIZE: usize = 1 << 30;
/// The heap the custom allocators share out (untouched pages cost nothing).
static mut ARENA: [u8; ARENA_SIZE] = [0; ARENA_SIZE];

const SYSTEM: u8 = 0;
const TALC: u8 = 1;
const LINKED_LIST: u8 = 2;

/// Which allocator serves new allocations; frees go by address.
static CHOICE: AtomicU8 = AtomicU8::new(SYSTEM);
static READY: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static TALC_HEAP: talc::TalcLock<spinning_top::RawSpinlock, talc::source::Manual> =
    talc::TalcLock::new(talc::source::Manual);
static LIST_HEAP: linked_list_allocator::LockedHeap = linked_list_allocator::LockedHeap::empty();

struct Switch;

fn arena() -> (usize, usize) {
    let start = (&raw mut ARENA) as usize;
    (start, start + ARENA_SIZE)
}

impl Switch {
    /// Gives each custom allocator half of the arena, once.
    fn init(&self) {
        if READY.swap(true, Ordering::SeqCst) {
            return;
        }
        let (start, _) = arena();
        let half = ARENA_SIZE / 2;
        // SAFETY: the arena is used by nothing else, and each half is handed
        // to exactly one allocator, once (READY).
        unsafe {
            let _ = TALC_HEAP.lock().claim(start as *mut u8, half);
            LIST_HEAP.lock().init((start + half) as *mut u8, half);
        }
    }
}

// SAFETY: every allocation is served by one of three allocators and freed by
// the same one (chosen by the address range it came from).
unsafe impl GlobalAlloc for Switch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.init();
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe {
            match CHOICE.load(Ordering::Relaxed) {
                TALC => TALC_HEAP.alloc(layout),
                LINKED_LIST => LIST_HEAP.alloc(layout),
                _ => System.alloc(layout),
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let (start, end) = arena();
        let at = ptr as usize;
        // SAFETY: `ptr` came from the allocator owning its address range.
        unsafe {
            if !(start..end).contains(&at) {
                System.dealloc(ptr, layout)
            } else if at < start + ARENA_SIZE / 2 {
                TALC_HEAP.dealloc(ptr, layout)
            } else {
                LIST_HEAP.dealloc(ptr, layout)
            }
        }
    }
}

#[global_allocator]
static ALLOCATOR: Switch = Switch;

/// Four pipelined `MSET`s of 10 random keys, as RESP.
fn requests(rng: &mut StdRng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..4 {
        out.extend_from_slice(b"*21\r\n$4\r\nMSET\r\n");
        for _ in 0..10 {
            let key = format!("key:{:012}", rng.gen_range(0..200_000));
            out.extend_from_slice(format!("${}\r\n{key}\r\n$64\r\n", key.len()).as_bytes());
            out.extend_from_slice(&[b'x'; 64]);
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

fn main() {
    let choice = match std::env::args().nth(1).as_deref() {
        Some("talc") => TALC,
        Some("linked-list") => LINKED_LIST,
        Some("system") => SYSTEM,
        _ => {
            eprintln!("usage: ftkv_heap_growth talc|linked-list|system");
            std::process::exit(2);
        }
    };
    CHOICE.store(choice, Ordering::SeqCst);
    let mut engine = Engine::new(Config {
        max_memory: 256 << 20,
        ..Config::default()
    });
    let Some(mut log) = LogWriter::format(1, 1 << 40) else {
        unreachable!("a 1 TiB log can be formatted");
    };
    let mut connections: Vec<(Parser, Session)> = (1..=30)
        .map(|id| (Parser::default(), Session::new(id)))
        .collect();
    // Seeded: the same keys in every run.
    let mut rng = StdRng::seed_from_u64(42);
    for round in 1..=8 {
        let start = Instant::now();
        let allocations = ALLOCATIONS.load(Ordering::Relaxed);
        let mut done = 0;
        while done < 10_000 {
            for (parser, session) in connections.iter_mut() {
                parser.feed(&requests(&mut rng)).expect("valid RESP");
                while let Some(args) = parser.next_command().expect("valid RESP") {
                    let exec = engine.execute(session, &args, 0);
                    if let Some(record) = exec.log {
                        log.append(&record).expect("room in the log");
                    }
                    done += 1;
                }
            }
            let _ = log.take_pending();
        }
        let secs = start.elapsed().as_secs_f64();
        let per_request = (ALLOCATIONS.load(Ordering::Relaxed) - allocations) as f64 / done as f64;
        println!(
            "round {round}: {:>6.0} requests/s, {:>6} keys, {per_request:.0} allocations per request",
            f64::from(done) / secs,
            engine.dbsize(0),
        );
    }
    // Freeing 200k keys one by one through the first-fit list takes
    // minutes (every free walks it): leave that to process exit.
    std::mem::forget(engine);
}

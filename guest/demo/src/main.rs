//! ftvm demo guest: exercises the clock, entropy, heap and plain computation,
//! prints `result=<16 hex digits>` and powers off with code 0.
//!
//! Command line: `workload=<name>` (default `mixed`) and `iterations=<n>`
//! (default 1). `exits`, `busy` and `kernel` are the machine benchmark's
//! workloads (`bench machine`). The result folds in every clock value and entropy byte the
//! guest consumed, so replaying with one logged input changed changes it.
//! `fault-*` and `panic` workloads end the machine abnormally on purpose.

#![no_std]
#![no_main]

extern crate alloc;

mod workloads;

use ftvm_guest_rt::{cmdline, heap_stats, image_end, mem_size, now_ns, println};
use workloads::Digest;

ftvm_guest_rt::entry!(main);

const WORKLOADS: &str = "compute heap clock entropy mixed exits busy kernel \
     fault-ud fault-pf fault-gp fault-de panic";

fn main() -> i32 {
    let workload = cmdline::get("workload").unwrap_or("mixed");
    let iterations = match cmdline::get_u64("iterations") {
        None => 1,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            println!(
                "demo: iterations must be a positive integer (cmdline: {:?})",
                cmdline::cmdline()
            );
            return 2;
        }
    };
    let start_ns = now_ns();
    let heap = heap_stats();
    println!(
        "demo: workload={workload} iterations={iterations} memory={} MiB image_end={:#x} heap={} KiB",
        mem_size() >> 20,
        image_end(),
        heap.size >> 10
    );

    let mut digest = Digest::new();
    digest.fold(start_ns);
    match workload {
        "compute" => (0..iterations).for_each(|_| workloads::compute(&mut digest, 1)),
        "heap" => (0..iterations).for_each(|_| workloads::heap(&mut digest, 1)),
        "clock" => (0..iterations).for_each(|_| workloads::clock(&mut digest, 200)),
        "entropy" => (0..iterations).for_each(|_| workloads::entropy(&mut digest, 4)),
        "mixed" => workloads::mixed(&mut digest, iterations),
        "exits" => (0..iterations).for_each(|_| workloads::exits(&mut digest, 20_000)),
        "busy" => workloads::busy(&mut digest, iterations),
        "kernel" => workloads::kernel(&mut digest, iterations),
        "fault-ud" | "fault-pf" | "fault-gp" | "fault-de" | "panic" => workloads::fault(workload),
        other => {
            println!("demo: unknown workload {other:?}; known: {WORKLOADS}");
            return 2;
        }
    }
    let end_ns = now_ns();
    digest.fold(end_ns);
    let heap = heap_stats();
    println!(
        "demo: done in {} us, heap used {} bytes",
        end_ns.saturating_sub(start_ns) / 1000,
        heap.used
    );
    println!("result={:016x}", digest.finish());
    0
}

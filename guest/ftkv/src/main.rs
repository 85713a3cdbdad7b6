//! **ftkv**, ftvm's reference guest: a Redis-compatible key-value server.
//!
//! RESP2 and RESP3 (HELLO) over TCP (smoltcp on virtio-net), the engine of
//! `ftkv-core`, and an append-only log on the whole virtio-blk disk,
//! replayed at boot. A write is acknowledged only after its log record was
//! written and FLUSHed. See `guest/ftkv/README.md` for the command line,
//! limits and exits per request.

#![no_std]
#![no_main]

extern crate alloc;

mod aof;
mod disk;
mod hal;
mod net;
mod server;
mod settings;

use ftkv_core::Engine;
use ftvm_guest_rt::{heap_stats, mem_size, println};

use crate::settings::Settings;

ftvm_guest_rt::entry!(main);

fn main() -> i32 {
    let settings = match Settings::from_cmdline() {
        Ok(s) => s,
        Err(e) => {
            println!("ftkv: bad command line: {e}");
            return 2;
        }
    };
    println!(
        "ftkv: memory {} MiB, heap {} MiB",
        mem_size() >> 20,
        heap_stats().size >> 20
    );

    let mut engine = Engine::new(settings.engine);
    let log = match hal::transport(hal::BLK_SLOT).map(disk::Disk::new) {
        None => {
            println!("ftkv: no disk: running WITHOUT persistence (writes are kept in memory only)");
            None
        }
        Some(Err(e)) => {
            println!("ftkv: disk: initialisation failed: {e}");
            return 1;
        }
        Some(Ok(disk)) => match aof::boot(disk, &mut engine, settings.format) {
            Ok((log, boot)) => {
                match boot {
                    aof::Boot::Formatted { generation } => {
                        println!(
                            "ftkv: formatted a new log (generation {generation:016x}, {} MiB)",
                            log.capacity() >> 20
                        );
                        println!("ftkv: replayed 0 records");
                    }
                    aof::Boot::Replayed(report) => {
                        if report.version < ftkv_core::aof::VERSION {
                            println!(
                                "ftkv: log format version {} upgraded to {}",
                                report.version,
                                ftkv_core::aof::VERSION
                            );
                        }
                        if let Some(torn) = report.torn {
                            println!(
                                "ftkv: log ends with an invalid record at byte {} ({:?}): discarded",
                                torn.offset, torn.reason
                            );
                        }
                        println!(
                            "ftkv: replayed {} records ({} bytes of log, {} keys)",
                            report.records,
                            report.end,
                            engine.dbsize(0)
                        );
                    }
                }
                Some(log)
            }
            Err(e) => {
                println!("ftkv: log: {e}");
                return 1;
            }
        },
    };
    if let Some(log) = &log {
        engine.set_log_budget(Some(log.remaining()));
    }

    let Some(transport) = hal::transport(hal::NET_SLOT) else {
        println!("ftkv: no network card in slot 0");
        return 1;
    };
    let device = match net::NetDevice::new(transport) {
        Ok(d) => d,
        Err(e) => {
            println!("ftkv: network card: initialisation failed: {e:?}");
            return 1;
        }
    };
    server::run(settings, engine, log, device)
}

//! The engine of **ftkv**, ftvm's reference guest: a small Redis-compatible
//! key-value server (RESP2 and RESP3) with an append-only log on the
//! virtual disk.
//!
//! This crate is the pure part, testable on the host: no I/O, no clock, no
//! allocation beyond `alloc`. The guest's glue (smoltcp TCP, virtio-blk)
//! drives it:
//!
//! - [`resp::Parser`] per connection turns received bytes into commands;
//! - a [`Session`] per connection holds its protocol (`HELLO`) and names;
//! - [`Engine::execute`] runs a command of a session at a given time and
//!   returns the reply (in the session's protocol) and, for a write, a log
//!   record payload;
//! - [`aof::LogWriter`] turns record payloads into whole-sector disk
//!   writes; replies to writes are sent only after those are flushed;
//! - at boot, [`aof::Replayer`] rebuilds the keyspace from the disk.
//!
//! See `docs/ftkv.md` for the commands, limits and the log format.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod aof;
pub mod crc32;
pub mod engine;
pub mod resp;

pub use engine::{Config, Engine, Execution, Session};
pub use resp::{Limits, Parser, Protocol, ProtocolError};

#[cfg(test)]
mod tests;

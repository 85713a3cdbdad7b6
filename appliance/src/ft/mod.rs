//! Fault tolerance (DESIGN.md 5-6): a node of a pair, one file per noun.
//!
//! | file | rule of DESIGN.md it holds |
//! |---|---|
//! | [`role`] | the node's one role state machine (starting, backup, primary, solo, going live, fenced) |
//! | [`proto`] | the log channel's messages, versions and sequence (docs/protocol.md) |
//! | [`pairing`] | who may pair: cluster, names against certificates, epoch, image, VM shape, disk root |
//! | [`channel`] | the log channel: QUIC tasks, acks, heartbeats, resumption |
//! | [`log_queue`] | the primary's bounded log buffer, batching, flow control and lag pacing |
//! | [`replay_queue`] | the backup's bounded receive buffer; whole exits only |
//! | [`output_gate`] | the output rule |
//! | [`failure_detector`] | when a silent peer is declared failed |
//! | [`go_live`] | a backup's switch from replay to the live world |
//! | [`reprotect`] | a backup joining a running primary: disk diff, memory pre-copy, cut-over |
//! | [`witness`] | claiming epochs: no answer is never a grant |
//! | [`node_state`] | the durable epoch, role and fence |
//! | [`status`] | what `/status` and `/metrics` report |
//! | [`node`] | one node from start to stop |
//!
//! `machine.rs` never learns which site it runs on, and devices stay
//! role-free: everything here works through the `Environment` boundary
//! (the recorder's `LogSink`, the replayer's `EntrySource`, the live
//! world's `FrameOutput`).

pub mod channel;
pub mod failure_detector;
pub mod go_live;
pub mod log_queue;
pub mod node;
pub mod node_state;
pub mod output_gate;
pub mod pairing;
pub mod proto;
pub mod replay_queue;
pub mod reprotect;
pub mod role;
pub mod status;
pub mod witness;

//! Record and replay (DESIGN.md sections 3-4). Everything that is not a pure
//! function of the guest's state enters through an [`env::Environment`]: the
//! live world (optionally with a [`recorder::Recorder`]) on the primary, a
//! [`replayer::Replayer`] on the backup. Device code is the same on both.

pub mod digest;
pub mod env;
pub mod live;
pub mod log;
pub mod recorder;
pub mod replayer;

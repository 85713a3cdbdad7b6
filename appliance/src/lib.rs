//! The ftvm appliance: a KVM machine whose single vCPU runs a platform guest
//! at CPL3 (docs/platform.md), and the record/replay engine around it.

pub mod admin;
pub mod cli;
pub mod device_manager;
pub mod devices;
pub mod drill;
pub mod ft;
pub mod loader;
pub mod machine;
pub mod persist;
pub mod replay;
pub mod vstate;

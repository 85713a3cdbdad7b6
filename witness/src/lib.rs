//! The witness service and its client.
//!
//! The witness is the external tiebreaker of an ftvm pair (DESIGN.md section
//! 6): for a cluster, at most one node is ever granted a given epoch. See
//! docs/witness.md for the protocol, semantics and operations.
#![forbid(unsafe_code)]

pub mod backend;
pub mod client;
pub mod decide;
pub mod etcd;
pub mod proto;
pub mod server;
pub mod store;

pub use backend::{from_config, WitnessBackend};
pub use client::{ClientError, ClientOptions, WitnessClient};
pub use etcd::EtcdWitness;
pub use server::{ClaimOutcome, Witness, WitnessError};
pub use store::{ClusterState, Store, StoreError};

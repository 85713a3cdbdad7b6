//! KVM state: the VM (memory slots, dirty log), the vCPU and its controller.

pub mod boot;
pub mod layout;
pub mod memory;
pub mod persist;
pub mod vcpu;
pub mod vm;

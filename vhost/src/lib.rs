//! pvm-vhost: the data plane outside the VMM process.
//!
//! Kernel vhost-net and vhost-user frontends let a virtio device's queues be served by the host
//! kernel or by another process, so the VMM is not in the packet path. Like pvm-virtio it never
//! imports from the VMM crate.

pub mod dirty;
mod kernel;
pub mod net;
mod relay;
mod rings;
pub mod user;
pub mod vsock;

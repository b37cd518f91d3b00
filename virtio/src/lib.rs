//! pvm-virtio: the guest-visible virtio world of pvm.
//!
//! This crate holds the virtio transports (virtio-mmio, virtio-pci) and the devices behind them
//! (console, block, net, rng). It deliberately has no dependency on kvm-ioctls: a device sees
//! guest memory (vm-memory), eventfds for queue kicks and an interrupt trait, so every device can
//! be unit-tested and fuzzed without /dev/kvm. The VMM (the `pvm` crate) wires transports to KVM
//! ioeventfds and irqfds in one place.

#[cfg(test)]
mod alloc_count;
pub mod balloon;
pub mod block;
mod chain;
pub mod console;
pub mod data_plane;
pub mod device;
pub mod dirty;
pub mod fs;
pub mod net;
pub mod rate_limiter;
pub mod rng;
pub mod snapshot;
// Test helpers, for this crate's tests and, with the `testing` feature, for its benches, other
// crates' tests and the fuzz targets. Not part of the API a VMM uses.
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod testing;
pub mod thread;
pub mod transport;
pub mod vsock;
mod worker;

pub use balloon::{Balloon, BalloonConfig, BalloonHandle};
pub use block::{Block, BlockError, DiskErrors, DiskImage, DiskSwap};
pub use chain::Chain;
pub use console::{Console, ConsoleError, ConsoleInput};
pub use device::{ActivateError, Activation, ActiveQueue, Interrupt, PauseError, VirtioDevice};
pub use fs::{Fs, FsConfig, FsError};
pub use net::{Net, NetBackend, NetCounters, NetError, Tap, TapError};
pub use rate_limiter::{BucketConfig, RateLimit, RateLimiter};
pub use rng::Rng;
pub use transport::mmio::MmioTransport;
pub use transport::pci::{MsiMessage, MsiSink, PciTransport};
pub use vsock::{Vsock, VsockError};
pub use worker::{CHAINS_PER_PASS, DeviceQueue, SharedLimiter, read_config_bytes};

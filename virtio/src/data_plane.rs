//! Data planes that serve a device's queues outside the device's own worker thread: the kernel's
//! vhost-net, or a vhost-user backend process. The device keeps everything guest-visible
//! (features, configuration space, the tap and its offloads); at activation it hands the queues
//! to the data plane instead of starting its worker. Implementations live in pvm-vhost.

use std::fmt::Debug;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use crate::device::{ActivateError, ActiveQueue, Interrupt};

/// Feature bits 0..=23 are device-specific; a data plane only restricts the others.
pub const DEVICE_FEATURE_MASK: u64 = (1 << 24) - 1;

/// Serves a device's queues once the driver is ready; stops on reset.
pub trait DataPlane: Send + Debug {
    /// Transport and ring features (bits 24 and up) this data plane can honour; the device
    /// offers none it cannot.
    fn supported_features(&self) -> u64;

    /// Starts serving `queues` with the negotiated `features`.
    fn start(
        &mut self,
        memory: &GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Result<(), ActivateError>;

    /// Stops serving (device reset or driver unload); `start` may follow again.
    fn stop(&mut self);

    /// Multiqueue: whether the plane moves frames, for a queue pair the guest turns on or off
    /// (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET). While started it pauses or resumes the queues and
    /// keeps the rings as they are; while stopped it says how the next `start` begins. Planes
    /// that cannot refuse, and serve a single queue pair.
    fn set_enabled(&mut self, _enabled: bool) -> Result<(), ActivateError> {
        Err(ActivateError::Backend(format!(
            "{} cannot pause a queue pair",
            self.name()
        )))
    }

    /// A short description for pvm's messages, e.g. "vhost-net".
    fn name(&self) -> &'static str;
}

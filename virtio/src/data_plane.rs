//! Data planes that serve a device's queues outside pvm's own device workers: the kernel's
//! vhost-net for pvm's virtio-net device. The device keeps everything guest-visible (features,
//! configuration space, the tap and its offloads); at activation it hands the queues to the data
//! plane instead of starting its worker. Implementations live in pvm-vhost. (A vhost-user
//! backend is not a data plane of a pvm device: the backend owns the whole device, and pvm's
//! side of it is a device of its own, `pvm_vhost::user::VhostUserDevice`.)

use std::fmt::Debug;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use crate::device::{ActiveQueue, Interrupt};
use crate::snapshot::{QueuePosition, SnapshotError};

/// Feature bits 0..=23 are device-specific; a data plane only restricts the others.
pub const DEVICE_FEATURE_MASK: u64 = (1 << 24) - 1;

/// The cause behind a [`DataPlaneError`], kept as it came (an ioctl's errno, a protocol error).
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why a data plane could not do what was asked of it.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    /// The kernel or the backend refused a request.
    #[error("{plane} {request}: {source}")]
    Request {
        plane: &'static str,
        request: &'static str,
        #[source]
        source: Cause,
    },
    /// A host resource (eventfd, epoll, thread) could not be set up.
    #[error("{plane}: cannot set up the {what}: {source}")]
    Host {
        plane: &'static str,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{plane}: cannot start its thread: {source}")]
    Thread {
        plane: &'static str,
        source: crate::thread::ThreadError,
    },
    #[error("{plane}: guest memory at {address:#x} is not shareable (no file descriptor)")]
    Unshareable { plane: &'static str, address: u64 },
    #[error("{plane}: ring at {address:#x}+{len} is not in one RAM region")]
    RingOutsideRegion {
        plane: &'static str,
        address: u64,
        len: u64,
    },
    #[error("{plane}: the backend stopped queue {queue} at position {base}, beyond any ring")]
    BadRingBase {
        plane: &'static str,
        queue: u16,
        base: u32,
    },
    #[error("{0} is already serving queues")]
    AlreadyStarted(&'static str),
    #[error("{0} cannot turn a queue pair on or off")]
    CannotToggle(&'static str),
    #[error("{0} cannot be restored from a snapshot")]
    CannotRestore(&'static str),
}

impl DataPlaneError {
    /// A refused request, keeping its cause.
    pub fn request(
        plane: &'static str,
        request: &'static str,
        source: impl Into<Cause>,
    ) -> DataPlaneError {
        DataPlaneError::Request {
            plane,
            request,
            source: source.into(),
        }
    }
}

/// Serves a device's queues once the driver is ready; pauses and resumes with them; stops on
/// reset.
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
    ) -> Result<(), DataPlaneError>;

    /// Stops serving (device reset or driver unload); `start` may follow again.
    fn stop(&mut self);

    /// Stops moving data and takes each ring's position back from whoever serves it, keeping
    /// the rest of the set-up; nothing when not started or already paused.
    fn pause(&mut self) -> Result<(), DataPlaneError>;

    /// Serves the rings again from the positions [`Self::pause`] took; nothing when not paused.
    fn resume(&mut self) -> Result<(), DataPlaneError>;

    /// Multiqueue: whether the plane moves frames, for a queue pair the guest turns on or off
    /// (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET). While started it pauses or resumes the queues and
    /// keeps the rings as they are; while stopped it says how the next `start` begins. Planes
    /// that cannot, refuse, and serve a single queue pair.
    fn set_enabled(&mut self, _enabled: bool) -> Result<(), DataPlaneError> {
        Err(DataPlaneError::CannotToggle(self.name()))
    }

    /// Where each ring stopped, as the last [`Self::pause`] took it back, for a snapshot.
    fn positions(&self) -> Result<Vec<QueuePosition>, SnapshotError> {
        Err(SnapshotError::PlaneUnsupported { plane: self.name() })
    }

    /// [`Self::start`] for a restored device: sets the rings up from the queues' positions but
    /// stays paused; [`Self::resume`] starts serving.
    fn start_paused(
        &mut self,
        _memory: &GuestMemoryMmap,
        _interrupt: Arc<dyn Interrupt>,
        _queues: Vec<ActiveQueue>,
        _features: u64,
    ) -> Result<(), DataPlaneError> {
        Err(DataPlaneError::CannotRestore(self.name()))
    }

    /// A short description for pvm's messages, e.g. "vhost-net".
    fn name(&self) -> &'static str;
}

//! The contract between a virtio transport (mmio, pci) and a device (block, net, console, rng).
//!
//! The transport owns the guest-visible register state: feature negotiation, device status,
//! queue configuration. When the driver sets DRIVER_OK it hands the device everything the data
//! plane needs in one [`Activation`]: guest memory, the configured queues with their kick
//! eventfds (KVM ioeventfds in the VMM, plain eventfds in tests), an [`Interrupt`] and the
//! negotiated features. The device then runs on its own worker thread (or hands its rings to a
//! [`crate::data_plane::DataPlane`]); [`VirtioDevice::pause`] and [`VirtioDevice::resume`]
//! stop and restart it keeping its queues, and [`VirtioDevice::reset`] stops it and makes the
//! device ready for a new activation (driver reload).

use std::fmt::Debug;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::data_plane::DataPlaneError;
use crate::snapshot::{DeviceState, RestoreError, SavedDevice, SnapshotError};
use crate::worker::WorkerError;

/// How a device tells the driver that something happened. Implementations: the mmio transport's
/// interrupt status + irqfd, the pci transport's MSI-X vectors (one irqfd each).
pub trait Interrupt: Send + Sync + Debug {
    /// The used ring of `queue` has new entries.
    fn notify_queue(&self, queue: u16) -> std::io::Result<()>;
    /// The device configuration space changed.
    fn notify_config(&self) -> std::io::Result<()>;

    /// An eventfd that raises `queue`'s interrupt when written, for a data plane outside pvm
    /// (vhost) to signal directly: the irqfd of the queue's MSI-X vector. None where writing a
    /// bare eventfd cannot raise the interrupt correctly (virtio-mmio must also set its
    /// interrupt status), in which case the caller relays through [`Self::notify_queue`].
    fn queue_irqfd(&self, _queue: u16) -> Option<EventFd> {
        None
    }
}

/// One configured queue, handed to the device at activation.
#[derive(Debug)]
pub struct ActiveQueue {
    /// The queue's index within the device.
    pub index: u16,
    /// The queue as the driver configured it (size, ring addresses, ready, event_idx).
    pub queue: Queue,
    /// Signalled when the driver notifies this queue.
    pub kick: EventFd,
}

/// Everything a device needs to start its data plane, handed over in one call at DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    /// Guest memory, shared with the transport.
    pub memory: GuestMemoryMmap,
    /// How the device interrupts the driver.
    pub interrupt: Arc<dyn Interrupt>,
    /// The queues the driver made ready, in index order.
    pub queues: Vec<ActiveQueue>,
    /// The features the driver accepted: a subset of [`VirtioDevice::features`], checked by the
    /// transport when the driver set FEATURES_OK. Devices keep no copy of their own.
    pub features: u64,
}

impl Activation {
    /// Whether the driver accepted feature bit `bit`.
    pub fn has_feature(&self, bit: u32) -> bool {
        bit < 64 && self.features & (1 << bit) != 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver configured {got} queues, the device needs {want}")]
    QueueCount { got: usize, want: usize },
    #[error("the device is already active")]
    AlreadyActive,
    #[error("cannot start the device worker: {0}")]
    Worker(#[from] WorkerError),
    #[error(transparent)]
    DataPlane(#[from] DataPlaneError),
}

/// Why a device could not pause or resume its data plane.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("cannot pause or resume the device worker: {0}")]
    Worker(#[from] WorkerError),
    #[error(transparent)]
    DataPlane(#[from] DataPlaneError),
}

/// A virtio device as a transport sees it.
pub trait VirtioDevice: Send + Debug {
    /// The virtio device ID (VIRTIO_ID_BLOCK, VIRTIO_ID_NET, ...).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers (including VIRTIO_F_VERSION_1).
    fn features(&self) -> u64;

    /// Reads the device-specific configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific configuration space; writes to read-only fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the data plane (DRIVER_OK) with the queues and features the driver set up.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;

    /// Stops the data plane and returns to the state before activation (status written 0, or a
    /// device error). Must be callable in any state, repeatedly, paused included.
    fn reset(&mut self);

    /// Stops moving data without losing any: the data plane finishes the request or frame in
    /// hand, then keeps its queues (ring positions), pending host data and counters until
    /// [`Self::resume`]. Kicks that arrive meanwhile wait in their eventfds. Nothing happens
    /// when the device is not active or already paused.
    fn pause(&mut self) -> Result<(), PauseError>;

    /// Serves the queues again from where [`Self::pause`] left them, starting with whatever
    /// arrived meanwhile. Nothing happens when the device is not paused.
    fn resume(&mut self) -> Result<(), PauseError>;

    /// The device's private state and the positions of the queues its data plane holds, for a
    /// snapshot. Only while paused or never started; a running device refuses with
    /// [`SnapshotError::NotPaused`].
    fn save_state(&self) -> Result<SavedDevice, SnapshotError> {
        Err(SnapshotError::NotImplemented {
            device_type: self.device_type(),
        })
    }

    /// Takes `state` (from [`Self::save_state`] of a device built with the same configuration,
    /// but untrusted: validated here) into this fresh device. With `activation` (the driver had
    /// set DRIVER_OK) the data plane is set up with the queues at their saved positions but left
    /// PAUSED: nothing is served until [`Self::resume`].
    fn restore(
        &mut self,
        _activation: Option<Activation>,
        _state: &DeviceState,
    ) -> Result<(), RestoreError> {
        Err(RestoreError::NotImplemented {
            device_type: self.device_type(),
        })
    }
}

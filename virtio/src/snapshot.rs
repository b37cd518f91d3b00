//! Device snapshots: the state of a transport and its device as plain serde data, and the
//! errors of taking and restoring it.
//!
//! A snapshot is taken of a paused device ([`crate::MmioTransport::save_state`],
//! [`crate::PciTransport::save_state`]) and restored into a transport the VMM freshly built with
//! the same device configuration (`restore_state`). The state holds no host resources (fds,
//! host addresses): disks and taps are reopened by the VMM, guest memory comes from the memory
//! file. A snapshot file is untrusted input, so restoring checks every field against the fresh
//! device and guest memory and refuses with a [`RestoreError`] that names the field.
//!
//! Ring positions live in one place, [`QueueState`]: the transport reads them from the device
//! at save ([`SavedDevice::queues`]) and hands them back as the queues' positions in the
//! [`crate::Activation`] of a restore.

use serde::{Deserialize, Serialize};

use crate::data_plane::DataPlaneError;
use crate::device::ActivateError;
use crate::transport::QueueConfigError;

/// One virtqueue: the registers the driver programmed and, for a queue the device serves, where
/// the device had got to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// The device's maximum (checked against the fresh device).
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    /// The available ring ("driver area").
    pub avail_ring: u64,
    /// The used ring ("device area").
    pub used_ring: u64,
    /// The next available-ring entry the device pops.
    pub next_avail: u16,
    /// The next used-ring entry the device fills.
    pub next_used: u16,
    /// Whether VIRTIO_RING_F_EVENT_IDX applies (it must match the driver features).
    pub event_idx: bool,
}

/// Where a device's data plane stopped in one of its queues, as the device reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePosition {
    /// The queue's index within the device.
    pub index: u16,
    pub next_avail: u16,
    /// `None` when the data plane keeps no copy of its own (kernel vhost, vhost-user: the
    /// backend wrote it to the used ring's idx); the transport then reads it from guest memory.
    pub next_used: Option<u16>,
}

/// What a device reports when saved: its private state and its queues' positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedDevice {
    pub state: DeviceState,
    /// One per queue the data plane holds; none for a device the driver has not started.
    pub queues: Vec<QueuePosition>,
}

/// Per-device private state: what a device needs, besides its queues, to continue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    Block(BlockState),
    Net(NetState),
    Console(ConsoleState),
    Rng,
    VhostUser(VhostUserState),
    Balloon(BalloonState),
    Vsock(VsockState),
}

impl DeviceState {
    /// The kind's name, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceState::Block(_) => "block",
            DeviceState::Net(_) => "net",
            DeviceState::Console(_) => "console",
            DeviceState::Rng => "rng",
            DeviceState::VhostUser(_) => "vhost-user",
            DeviceState::Balloon(_) => "balloon",
            DeviceState::Vsock(_) => "vsock",
        }
    }
}

/// virtio-blk: requests are complete when used, so a paused disk has nothing in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The capacity the guest sees; the reopened disk must have the same.
    pub sectors: u64,
}

/// virtio-net. A frame the tap delivered while the guest had no receive buffer is not part of
/// the state: it is dropped, as a network may drop any frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The queue pairs the guest enabled (VQ_PAIRS_SET; 1 without multiqueue).
    pub active_pairs: u16,
}

/// virtio-console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    /// Host input not yet delivered to the guest.
    pub pending_input: Vec<u8>,
}

/// pvm's side of a vhost-user device; the backend process keeps (or rebuilds) its own state.
/// A balloon's state: what the host asked for, what the driver reported, the statistics
/// interval (the API may have changed it), the features it offered, the statistics buffer
/// it holds until the next interval, and which pages are in the balloon (one bit per 4 KiB
/// frame of guest RAM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    pub features: u64,
    pub target_pages: u32,
    pub actual_pages: u32,
    pub stats_interval_s: u32,
    pub stats_head: Option<u16>,
    pub inflated: Vec<u64>,
}

/// A vsock device's state: its guest CID. Connections are not saved: the restored device
/// resets the transport, as Firecracker does, and the guest closes its sockets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostUserState {
    /// The virtio device type the backend serves.
    pub device_type: u32,
}

/// The transport-independent registers (virtio 1.2, 2.1 and 3.1) and the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoreState {
    /// The virtio device ID, checked against the fresh device.
    pub device_type: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    /// As the driver wrote them.
    pub driver_features: u64,
    pub status: u8,
    pub queue_select: u16,
    pub queues: Vec<QueueState>,
    pub device: DeviceState,
}

/// A virtio-mmio transport and its device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub core: CoreState,
    pub interrupt_status: u32,
    pub config_generation: u32,
}

/// One MSI-X table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntryState {
    pub address_low: u32,
    pub address_high: u32,
    pub data: u32,
    pub vector_control: u32,
}

/// The MSI-X state of a virtio-pci function. Enable and function mask are in the MSI-X
/// capability of [`PciState::config_space`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub table: Vec<MsixEntryState>,
    /// The pending bit array, 64 vectors per element.
    pub pending: Vec<u64>,
    pub config_vector: u16,
    /// One per queue.
    pub queue_vectors: Vec<u16>,
}

/// A virtio-pci transport and its device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciState {
    pub core: CoreState,
    /// The 256-byte configuration space (command register, BAR0, MSI-X control, ...).
    pub config_space: Vec<u8>,
    pub isr: u8,
    pub config_generation: u32,
    pub msix: MsixState,
}

/// Why a device's state could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("device type {device_type} is running: pause it before taking its state")]
    NotPaused { device_type: u32 },
    #[error("device type {device_type} cannot be snapshotted yet")]
    NotImplemented { device_type: u32 },
    #[error("{plane} cannot report its ring positions")]
    PlaneUnsupported { plane: &'static str },
    #[error("device type {device_type}: cannot read the used index of queue {index}: {source}")]
    UsedIndex {
        device_type: u32,
        index: u16,
        source: vm_memory::GuestMemoryError,
    },
    #[error(transparent)]
    DataPlane(#[from] DataPlaneError),
}

/// Why a state was refused (or could not be applied) on restore. Messages name the field.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("device type {saved} in the snapshot, {here} here")]
    DeviceType { saved: u32, here: u32 },
    #[error("{saved} device state in the snapshot, a {here} device here")]
    DeviceKind {
        saved: &'static str,
        here: &'static str,
    },
    #[error("the transport was already used by a driver; restore needs a fresh one")]
    NotFresh,
    #[error("{saved} queues in the snapshot, the device has {here}")]
    QueueCount { saved: usize, here: usize },
    #[error("queue {index}: maximum size {saved} in the snapshot, {here} here")]
    QueueMaxSize { index: u16, saved: u16, here: u16 },
    #[error("queue {index}: size {size} exceeds the device's maximum {max}")]
    QueueSizeTooBig { index: u16, size: u16, max: u16 },
    #[error(
        "queue {index}: event_idx {saved} disagrees with the driver features (EVENT_IDX {acked})"
    )]
    QueueEventIdx {
        index: u16,
        saved: bool,
        acked: bool,
    },
    #[error(
        "queue {index}: next_avail {next_avail} is more than the queue size {size} ahead of next_used {next_used}"
    )]
    QueuePosition {
        index: u16,
        next_avail: u16,
        next_used: u16,
        size: u16,
    },
    #[error("queue {index}: the device reports {what} for a queue that is not ready")]
    QueueNotReady { index: u16, what: &'static str },
    #[error(transparent)]
    Queue(#[from] QueueConfigError),
    #[error(
        "queue_select {select} is past the {queues} queues and not a value a driver reads back"
    )]
    QueueSelect { select: u16, queues: usize },
    #[error("device status {status:#x} is not one the status state machine reaches")]
    Status { status: u8 },
    #[error(
        "driver features {features:#x} include {unoffered:#x}, which the device does not offer"
    )]
    Features { features: u64, unoffered: u64 },
    #[error("driver features {features:#x} lack VIRTIO_F_VERSION_1 though FEATURES_OK is set")]
    NoVersion1 { features: u64 },
    #[error("{field} {value:#x} has bits the register cannot hold")]
    Register { field: &'static str, value: u64 },
    #[error("block: the snapshot's disk has {saved} sectors, the disk here {here}")]
    DiskSize { saved: u64, here: u64 },
    #[error("net: {saved} active queue pairs in the snapshot, the device has {pairs}")]
    NetPairs { saved: u16, pairs: usize },
    #[error("net: cannot use {pairs} queue pairs: {source}")]
    NetPairSwitch {
        pairs: u16,
        source: crate::net::PairError,
    },
    #[error("console: {len} bytes of pending input, at most {max} can be held")]
    ConsoleInput { len: usize, max: usize },
    #[error("config space: {len} bytes in the snapshot, {want} here")]
    ConfigSpaceLength { len: usize, want: usize },
    #[error("config space byte {offset:#x}: {saved:#04x} differs from the read-only {here:#04x}")]
    ConfigSpaceByte { offset: usize, saved: u8, here: u8 },
    #[error("MSI-X: {saved} table entries in the snapshot, {here} here")]
    MsixTableSize { saved: usize, here: usize },
    #[error("MSI-X: {saved} pending words in the snapshot, {here} here")]
    MsixPendingSize { saved: usize, here: usize },
    #[error("MSI-X: vector {vector} has pending or control bits past the table")]
    MsixBits { vector: usize },
    #[error("MSI-X: {saved} queue vectors in the snapshot, {here} queues here")]
    MsixQueueVectors { saved: usize, here: usize },
    #[error("MSI-X: the config vector {vector} is past the table of {size}")]
    MsixConfigVector { vector: u16, size: usize },
    #[error("MSI-X: queue {queue}'s vector {vector} is past the table of {size}")]
    MsixQueueVector {
        queue: u16,
        vector: u16,
        size: usize,
    },
    #[error("{device}: {what} {saved:#x} in the snapshot, {here:#x} here")]
    Mismatch {
        device: &'static str,
        what: &'static str,
        saved: u64,
        here: u64,
    },
    #[error("{device}: {what} {value} is not one the device could have saved")]
    Value {
        device: &'static str,
        what: &'static str,
        value: u64,
    },
    #[error("device type {device_type} cannot be restored yet")]
    NotImplemented { device_type: u32 },
    #[error("cannot duplicate the kick eventfd of queue {index}: {source}")]
    Kick { index: u16, source: std::io::Error },
    #[error("cannot start the restored device: {0}")]
    Activate(#[from] ActivateError),
    #[error(transparent)]
    DataPlane(#[from] DataPlaneError),
}

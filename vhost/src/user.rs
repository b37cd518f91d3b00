//! vhost-user frontend: a virtio device whose queues a backend process serves (pvm's own
//! `pvm-vhost-user-net` / `pvm-vhost-user-blk`, or any other vhost-user backend).
//!
//! The device is built when the VM is: pvm connects to the backend's socket, claims it
//! (SET_OWNER), learns its features and, with VHOST_USER_PROTOCOL_F_CONFIG, its configuration
//! space (a block device's capacity comes from there), all before the guest runs and before
//! the seccomp filters go in. The guest negotiates against the backend's features, filtered to
//! what pvm's transports and this frontend handle. At DRIVER_OK the frontend hands the backend
//! the negotiated features, the guest memory (memfd-backed, so its fds travel in
//! SET_MEM_TABLE) and each ring: addresses, position, the queue's ioeventfd as kick and its
//! MSI-X irqfd as call (virtio-pci) or an eventfd that a relay thread turns into an interrupt
//! with the right interrupt status (virtio-mmio). A device reset stops every ring
//! (GET_VRING_BASE); the next DRIVER_OK programs them afresh. After start-up the frontend only
//! sends and receives messages on the connected socket (sendmsg/recvmsg), which is all the
//! vCPU threads' seccomp filter adds for it.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pvm_virtio::data_plane::DataPlaneError;
use pvm_virtio::snapshot::{DeviceState, RestoreError, SavedDevice, SnapshotError, VhostUserState};
use pvm_virtio::thread::DeviceThread;
use pvm_virtio::{
    ActivateError, Activation, ActiveQueue, Interrupt, PauseError, VirtioDevice, read_config_bytes,
};
use vhost::VhostBackend;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_net::*;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_NET};
use vm_memory::GuestMemoryMmap;

use crate::rings::{RingAddresses, Rings, Served, memory_table};

/// Descriptors per queue pvm offers the driver (the backend must accept it in SET_VRING_NUM).
pub const QUEUE_SIZE: u16 = 256;

/// What the backend serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// virtio-net: a receive and a transmit queue.
    Net,
    /// virtio-blk: one request queue.
    Block,
}

impl Kind {
    fn queues(self) -> usize {
        match self {
            Kind::Net => 2,
            Kind::Block => 1,
        }
    }

    fn device_type(self) -> u32 {
        match self {
            Kind::Net => VIRTIO_ID_NET,
            Kind::Block => VIRTIO_ID_BLOCK,
        }
    }

    fn config_len(self) -> usize {
        match self {
            Kind::Net => std::mem::size_of::<virtio_net_config>(),
            Kind::Block => std::mem::size_of::<virtio_blk_config>(),
        }
    }

    /// The device feature bits (0..=23) this frontend passes through: those that need nothing
    /// from pvm beyond the configuration space (no control queue, no multiqueue, no writable
    /// configuration).
    fn device_features(self, config: bool) -> u64 {
        // Offloads and buffers: nothing to read from a configuration space.
        const NET: &[u32] = &[
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_HOST_UFO,
            VIRTIO_NET_F_MRG_RXBUF,
        ];
        // Only with a configuration space: the MAC, MTU and status live there.
        const NET_CONFIG: &[u32] = &[VIRTIO_NET_F_MTU, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS];
        let bits: &[u32] = match self {
            Kind::Net if config => return mask(NET) | mask(NET_CONFIG),
            Kind::Net => NET,
            Kind::Block => &[
                VIRTIO_BLK_F_SIZE_MAX,
                VIRTIO_BLK_F_SEG_MAX,
                VIRTIO_BLK_F_GEOMETRY,
                VIRTIO_BLK_F_RO,
                VIRTIO_BLK_F_BLK_SIZE,
                VIRTIO_BLK_F_FLUSH,
                VIRTIO_BLK_F_TOPOLOGY,
                VIRTIO_BLK_F_DISCARD,
                VIRTIO_BLK_F_WRITE_ZEROES,
            ],
        };
        mask(bits)
    }
}

/// The feature mask with `bits` set.
fn mask(bits: &[u32]) -> u64 {
    bits.iter().fold(0, |mask, bit| mask | 1 << bit)
}

/// Transport and ring features this frontend passes through (split rings only: pvm's
/// transports have no packed rings; no ACCESS_PLATFORM: there is no IOMMU).
const RING_FEATURES: u64 =
    1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_RING_F_INDIRECT_DESC;

/// What this frontend asks of the backend's protocol: the configuration space, and an
/// acknowledgement for every request so a refused one fails the activation, not the guest's
/// I/O later.
const WANTED_PROTOCOL: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::CONFIG.union(VhostUserProtocolFeatures::REPLY_ACK);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect: {0}")]
    Connect(vhost::Error),
    #[error("the backend refused {what}: {source}")]
    Protocol {
        what: &'static str,
        source: vhost::Error,
    },
    #[error("the backend does not offer VIRTIO_F_VERSION_1 (features {0:#x})")]
    NoVersion1(u64),
    #[error("the backend offers no VHOST_USER_PROTOCOL_F_CONFIG, so the disk capacity is unknown")]
    NoBlockConfig,
}

fn protocol(what: &'static str) -> impl Fn(vhost::Error) -> Error {
    move |source| Error::Protocol { what, source }
}

const PLANE: &str = "vhost-user";

fn refused(request: &'static str) -> impl Fn(vhost::Error) -> DataPlaneError {
    move |e| DataPlaneError::request(PLANE, request, e)
}

/// A virtio device served by a vhost-user backend.
pub struct VhostUserDevice {
    kind: Kind,
    socket: PathBuf,
    frontend: Frontend,
    /// Whether VHOST_USER_F_PROTOCOL_FEATURES was negotiated (rings then start disabled and
    /// are enabled with SET_VRING_ENABLE).
    protocol_features: bool,
    offered_features: u64,
    config: Vec<u8>,
    queue_sizes: Vec<u16>,
    relay_thread: DeviceThread,
    running: Option<Served>,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("kind", &self.kind)
            .field("socket", &self.socket)
            .field(
                "offered_features",
                &format_args!("{:#x}", self.offered_features),
            )
            .field("running", &self.running.is_some())
            .field("paused", &self.running.as_ref().is_some_and(|r| r.paused))
            .finish()
    }
}

impl VhostUserDevice {
    /// Connects to the backend listening on `socket` and negotiates what can be before the
    /// guest runs. `index` numbers the relay thread (vhost-user-relayN).
    pub fn connect(kind: Kind, socket: &Path, index: usize) -> Result<Self, Error> {
        let mut frontend =
            Frontend::connect(socket, kind.queues() as u64).map_err(Error::Connect)?;
        frontend.set_owner().map_err(protocol("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(protocol("GET_FEATURES"))?;
        if backend_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(Error::NoVersion1(backend_features));
        }
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let protocol_features = backend_features & protocol_bit != 0;
        let mut negotiated = VhostUserProtocolFeatures::empty();
        if protocol_features {
            // GET_PROTOCOL_FEATURES needs the bit acked first (the crate checks).
            frontend
                .set_features(protocol_bit)
                .map_err(protocol("SET_FEATURES"))?;
            let offered = frontend
                .get_protocol_features()
                .map_err(protocol("GET_PROTOCOL_FEATURES"))?;
            negotiated = offered & WANTED_PROTOCOL;
            frontend
                .set_protocol_features(negotiated)
                .map_err(protocol("SET_PROTOCOL_FEATURES"))?;
            if negotiated.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let has_config = negotiated.contains(VhostUserProtocolFeatures::CONFIG);
        let config = if has_config {
            let len = kind.config_len();
            let (_, data) = frontend
                .get_config(
                    0,
                    len as u32,
                    VhostUserConfigFlags::empty(),
                    &vec![0u8; len],
                )
                .map_err(protocol("GET_CONFIG"))?;
            data
        } else if kind == Kind::Block {
            return Err(Error::NoBlockConfig);
        } else {
            Vec::new()
        };
        let offered_features =
            backend_features & (RING_FEATURES | kind.device_features(has_config));
        log::info!(
            "vhost-user {}: backend features {backend_features:#x}, protocol {:#x}, offering \
             {offered_features:#x}",
            socket.display(),
            negotiated.bits()
        );
        Ok(VhostUserDevice {
            kind,
            socket: socket.to_owned(),
            frontend,
            protocol_features,
            offered_features,
            config,
            queue_sizes: vec![QUEUE_SIZE; kind.queues()],
            relay_thread: DeviceThread::spawn(format!("vhost-user-relay{index}")),
            running: None,
        })
    }

    /// The connected socket's descriptor: the only one the vCPU threads' seccomp filter lets
    /// them send and receive messages on.
    pub fn socket_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }

    /// For block devices: the capacity in 512-byte sectors the backend reports.
    pub fn capacity_sectors(&self) -> Option<u64> {
        let at = std::mem::offset_of!(virtio_blk_config, capacity);
        let bytes = self.config.get(at..at + 8)?;
        (self.kind == Kind::Block).then(|| u64::from_le_bytes(bytes.try_into().unwrap_or([0; 8])))
    }

    /// Each ring's device queue index and position as the last pause took it back (the
    /// driver's at activation before any pause).
    pub fn ring_bases(&self) -> Vec<(u16, u16)> {
        self.running
            .as_ref()
            .map_or_else(Vec::new, |r| r.rings.bases())
    }

    /// Programs the backend for `queues` with the negotiated `features` and starts the rings;
    /// `started` gets every ring the backend was told of. With `paused` (a restore) the rings
    /// are only prepared: the resume programs and enables them from the queues' positions.
    fn program(
        &mut self,
        memory: &GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
        started: &mut Vec<usize>,
        paused: bool,
    ) -> Result<Rings, DataPlaneError> {
        let mut features = features;
        if self.protocol_features {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.frontend
            .set_features(features)
            .map_err(refused("SET_FEATURES"))?;
        self.frontend
            .set_mem_table(&memory_table(PLANE, memory, true)?)
            .map_err(refused("SET_MEM_TABLE"))?;
        let queues = queues
            .into_iter()
            .map(|active| (usize::from(active.index), active))
            .collect();
        let mut rings = Rings::new(
            PLANE,
            memory,
            queues,
            RingAddresses::Host,
            interrupt,
            &mut self.relay_thread,
        )?;
        if paused {
            return Ok(rings);
        }
        if let Err(e) = self.start_rings(&rings, started) {
            rings.stop_relay(&mut self.relay_thread);
            return Err(e);
        }
        Ok(rings)
    }

    /// Programs `rings` from their bases and enables them.
    fn start_rings(
        &mut self,
        rings: &Rings,
        started: &mut Vec<usize>,
    ) -> Result<(), DataPlaneError> {
        rings.program(&self.frontend, started)?;
        if self.protocol_features {
            for vring in rings.vrings() {
                self.frontend
                    .set_vring_enable(vring, true)
                    .map_err(refused("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Stops the backend's rings: disabled first (with protocol features), then
    /// GET_VRING_BASE, after which the backend must not touch them. Errors are logged: a
    /// reset must go on.
    fn stop_rings(&mut self, vrings: &[usize]) {
        for &index in vrings {
            if let Err(e) = self.disable_ring(index) {
                log::debug!("vhost-user {}: {e}", self.socket.display());
            }
            if let Err(e) = self.frontend.get_vring_base(index) {
                log::warn!(
                    "vhost-user {}: stopping ring {index} (GET_VRING_BASE): {e}",
                    self.socket.display()
                );
            }
        }
    }

    fn disable_ring(&mut self, index: usize) -> Result<(), DataPlaneError> {
        if self.protocol_features {
            self.frontend
                .set_vring_enable(index, false)
                .map_err(refused("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }
}

impl VhostUserDevice {
    /// [`VirtioDevice::restore`]: the backend gets the features and memory now, the rings at
    /// the resume (from the snapshot's positions, with SET_VRING_BASE).
    fn restore_paused(
        &mut self,
        activation: Option<Activation>,
        state: &DeviceState,
    ) -> Result<(), RestoreError> {
        let here = self.kind.device_type();
        let DeviceState::VhostUser(saved) = state else {
            return Err(RestoreError::DeviceKind {
                saved: state.kind(),
                here: "vhost-user",
            });
        };
        if saved.device_type != here {
            return Err(RestoreError::DeviceType {
                saved: saved.device_type,
                here,
            });
        }
        match activation {
            Some(activation) => Ok(self.serve(activation, true)?),
            None => Ok(()),
        }
    }

    /// Activation, or with `paused` the paused activation of a restore: the backend gets the
    /// features and memory, and the rings unless `paused` (then the resume programs them).
    fn serve(&mut self, activation: Activation, paused: bool) -> Result<(), ActivateError> {
        if self.running.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let Activation {
            memory,
            interrupt,
            queues,
            features,
        } = activation;
        let count = queues.len();
        if count != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount {
                got: count,
                want: self.queue_sizes.len(),
            });
        }
        let mut started = Vec::new();
        match self.program(&memory, interrupt, queues, features, &mut started, paused) {
            Ok(rings) => {
                log::info!(
                    "vhost-user {}: serving {count} queues ({} relayed){}",
                    self.socket.display(),
                    rings.relayed(),
                    if paused {
                        " from a snapshot, paused"
                    } else {
                        ""
                    }
                );
                self.running = Some(Served { rings, paused });
                Ok(())
            }
            Err(e) => {
                // Rings already handed over must not keep being served while the driver
                // resets them.
                self.stop_rings(&started);
                Err(e.into())
            }
        }
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        // The relay's job must end before its thread can; the backend learns that the VM is
        // gone when the socket closes (no messages here: the VM may be ending on any thread).
        if let Some(mut running) = self.running.take() {
            running.rings.stop_relay(&mut self.relay_thread);
        }
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.kind.device_type()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.offered_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // No writable field is offered (no CONFIG_WCE, no CTRL_MAC_ADDR): ignored, as virtio
        // asks.
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.serve(activation, false)
    }

    fn reset(&mut self) {
        if let Some(mut running) = self.running.take() {
            let vrings: Vec<usize> = running.rings.vrings().collect();
            // Paused rings are stopped already; GET_VRING_BASE again would find no ring.
            if !running.paused {
                self.stop_rings(&vrings);
            }
            running.rings.stop_relay(&mut self.relay_thread);
        }
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        let Some(mut running) = self.running.take() else {
            return Ok(());
        };
        let result = if running.paused {
            Ok(())
        } else {
            let vrings: Vec<usize> = running.rings.vrings().collect();
            vrings
                .iter()
                .try_for_each(|&vring| self.disable_ring(vring))
                // GET_VRING_BASE stops each ring and tells where the backend stopped.
                .and_then(|()| running.rings.take_bases(&self.frontend))
                .map(|()| running.paused = true)
        };
        self.running = Some(running);
        Ok(result?)
    }

    fn resume(&mut self) -> Result<(), PauseError> {
        let Some(mut running) = self.running.take() else {
            return Ok(());
        };
        let result = if running.paused {
            self.start_rings(&running.rings, &mut Vec::new())
                .map(|()| running.paused = false)
        } else {
            Ok(())
        };
        self.running = Some(running);
        Ok(result?)
    }

    fn save_state(&self) -> Result<SavedDevice, SnapshotError> {
        let device_type = self.kind.device_type();
        Ok(SavedDevice {
            state: DeviceState::VhostUser(VhostUserState { device_type }),
            queues: self
                .running
                .as_ref()
                .map_or(Ok(Vec::new()), |running| running.positions(device_type))?,
        })
    }

    fn restore(
        &mut self,
        activation: Option<Activation>,
        state: &DeviceState,
    ) -> Result<(), RestoreError> {
        self.restore_paused(activation, state)
    }
}

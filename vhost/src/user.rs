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

use pvm_virtio::thread::DeviceThread;
use pvm_virtio::{ActivateError, ActiveQueue, Interrupt, VirtioDevice, read_config_bytes};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_net::*;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_NET};
use virtio_queue::QueueT;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::relay::Relay;

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

fn activate_err(what: &'static str) -> impl Fn(vhost::Error) -> ActivateError {
    move |e| ActivateError::Backend(format!("vhost-user {what}: {e}"))
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
    acked_features: u64,
    config: Vec<u8>,
    queue_sizes: Vec<u16>,
    relay_thread: DeviceThread,
    running: Option<Running>,
}

/// One activation: the rings the backend serves and the call relay, if any.
struct Running {
    queues: Vec<usize>,
    relay: Option<Relay>,
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
            acked_features: 0,
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

    /// Programs the backend for `queues`; returns the call relay (virtio-mmio) if any.
    fn program(
        &mut self,
        memory: &GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: &[ActiveQueue],
        started: &mut Vec<usize>,
    ) -> Result<Option<Relay>, ActivateError> {
        let mut features = self.acked_features;
        if self.protocol_features {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.frontend
            .set_features(features)
            .map_err(activate_err("SET_FEATURES"))?;
        self.frontend
            .set_mem_table(&memory_regions(memory)?)
            .map_err(activate_err("SET_MEM_TABLE"))?;
        let mut relayed = Vec::new();
        for active in queues {
            let index = usize::from(active.index);
            let queue = &active.queue;
            let size = queue.size();
            self.frontend
                .set_vring_num(index, size)
                .map_err(activate_err("SET_VRING_NUM"))?;
            let ring = |addr: u64, len: u64| host_address(memory, addr, len);
            let config = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: size,
                flags: 0,
                desc_table_addr: ring(queue.desc_table(), 16 * u64::from(size))?,
                used_ring_addr: ring(queue.used_ring(), 6 + 8 * u64::from(size))?,
                avail_ring_addr: ring(queue.avail_ring(), 6 + 2 * u64::from(size))?,
                log_addr: None,
            };
            self.frontend
                .set_vring_addr(index, &config)
                .map_err(activate_err("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(index, queue.next_avail())
                .map_err(activate_err("SET_VRING_BASE"))?;
            started.push(index);
            // The call before the kick: once it has a kick the backend may use the ring, and a
            // call it made without a call fd would be lost.
            let call = match interrupt.queue_irqfd(active.index) {
                Some(irqfd) => irqfd,
                None => {
                    let call = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?;
                    relayed.push((
                        active.index,
                        call.try_clone().map_err(ActivateError::Worker)?,
                    ));
                    call
                }
            };
            self.frontend
                .set_vring_call(index, &call)
                .map_err(activate_err("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(index, &active.kick)
                .map_err(activate_err("SET_VRING_KICK"))?;
            if self.protocol_features {
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(activate_err("SET_VRING_ENABLE"))?;
            }
        }
        if relayed.is_empty() {
            return Ok(None);
        }
        Relay::start(&mut self.relay_thread, "vhost-user", relayed, interrupt).map(Some)
    }

    /// Stops the backend's rings: disabled first (with protocol features), then
    /// GET_VRING_BASE, after which the backend must not touch them.
    fn stop_rings(&mut self, queues: &[usize]) {
        for &index in queues {
            if self.protocol_features {
                if let Err(e) = self.frontend.set_vring_enable(index, false) {
                    log::debug!(
                        "vhost-user {}: disabling ring {index}: {e}",
                        self.socket.display()
                    );
                }
            }
            if let Err(e) = self.frontend.get_vring_base(index) {
                log::warn!(
                    "vhost-user {}: stopping ring {index} (GET_VRING_BASE): {e}",
                    self.socket.display()
                );
            }
        }
    }
}

/// The guest memory table for SET_MEM_TABLE: every region must be a shared file mapping.
fn memory_regions(
    memory: &GuestMemoryMmap,
) -> Result<Vec<VhostUserMemoryRegionInfo>, ActivateError> {
    memory
        .iter()
        .map(|region| {
            let file = region.file_offset().ok_or_else(|| {
                ActivateError::Backend(format!(
                    "vhost-user: guest memory at {:#x} is not shareable (no file descriptor)",
                    region.start_addr().raw_value()
                ))
            })?;
            Ok(VhostUserMemoryRegionInfo {
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                mmap_offset: file.start(),
                mmap_handle: file.file().as_raw_fd(),
            })
        })
        .collect()
}

/// pvm's address of the `len` guest bytes at `addr`, which must lie in one region: vhost-user
/// names rings by the frontend's addresses.
fn host_address(memory: &GuestMemoryMmap, addr: u64, len: u64) -> Result<u64, ActivateError> {
    let bad = || {
        ActivateError::Backend(format!(
            "vhost-user: ring at {addr:#x}+{len} is not in one RAM region"
        ))
    };
    let len = usize::try_from(len).map_err(|_| bad())?;
    let slice =
        GuestMemoryBackend::get_slice(memory, GuestAddress(addr), len).map_err(|_| bad())?;
    Ok(slice.ptr_guard().as_ptr() as u64)
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        // The relay's job must end before its thread can; the backend learns that the VM is
        // gone when the socket closes (no messages here: the VM may be ending on any thread).
        if let Some(relay) = self.running.take().and_then(|r| r.relay) {
            relay.stop(&mut self.relay_thread);
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

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.offered_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // No writable field is offered (no CONFIG_WCE, no CTRL_MAC_ADDR): ignored, as virtio
        // asks.
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if self.running.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: self.queue_sizes.len(),
            });
        }
        let mut started = Vec::new();
        match self.program(&memory, interrupt, &queues, &mut started) {
            Ok(relay) => {
                log::info!(
                    "vhost-user {}: serving {} queues ({} relayed)",
                    self.socket.display(),
                    queues.len(),
                    relay.as_ref().map_or(0, Relay::queues)
                );
                self.running = Some(Running {
                    queues: started,
                    relay,
                });
                Ok(())
            }
            Err(e) => {
                // Rings already handed over must not keep being served while the driver
                // resets them.
                self.stop_rings(&started);
                Err(e)
            }
        }
    }

    fn reset(&mut self) {
        if let Some(running) = self.running.take() {
            self.stop_rings(&running.queues);
            if let Some(relay) = running.relay {
                relay.stop(&mut self.relay_thread);
            }
        }
        self.acked_features = 0;
    }
}

//! virtio-net over a tap (or any [`NetBackend`]): one receive and one transmit queue.
//!
//! Frames keep the `virtio_net_hdr_v1` layout end to end: the tap is configured for the same
//! 12-byte header the guest uses, so checksum and segmentation offloads pass through. Guest-side
//! offloads (what the tap may hand the guest) are enabled on the tap only after the guest
//! accepted them.
//!
//! Receive copies each frame from the tap into a host buffer, then into guest buffers. When the
//! guest has no receive buffers the tap is taken out of the epoll set (it is level-triggered)
//! until the guest kicks the receive queue, so the worker neither spins nor drops frames while
//! the guest is merely slow.

mod rxtx;
pub mod tap;
#[cfg(test)]
mod tests;

use std::io;
use std::mem::offset_of;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use log::warn;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_net::*;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use vm_memory::GuestMemoryMmap;

pub use self::rxtx::{Delivery, deliver_frame, transmit};
pub use self::tap::{NetBackend, Tap, TapError, read_frame};
use crate::data_plane::{DEVICE_FEATURE_MASK, DataPlane};
use crate::device::{ActivateError, ActiveQueue, Interrupt, VirtioDevice};
use crate::worker::{
    DeviceQueue, EventHandler, EventLoop, WorkerSlot, device_queues, feature, read_config_bytes,
};

pub const QUEUE_SIZE: u16 = 256;
/// Size of `virtio_net_hdr_v1`, the header in front of every frame on both sides.
pub const VNET_HDR_LEN: usize = 12;
/// The largest frame (without vnet header) either way: a 64 KiB GSO packet plus Ethernet and
/// VLAN headers, with slack.
pub const MAX_FRAME_LEN: usize = 65536 + 256;
/// Frames received per pass before the worker looks at its other events.
const FRAMES_PER_PASS: usize = 256;
const RX_KICK: u64 = 0;
const TX_KICK: u64 = 1;
const BACKEND_READY: u64 = 2;
static NEXT_NET_INDEX: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
}

/// Traffic and error counts, readable by the VMM while the device runs.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames the backend refused to send (dropped).
    pub tx_errors: AtomicU64,
    /// Transmit chains that were not a valid frame (dropped).
    pub tx_malformed: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames too large for the guest's receive buffers (dropped).
    pub rx_dropped: AtomicU64,
    /// Failed reads from the backend.
    pub rx_errors: AtomicU64,
}

impl NetCounters {
    /// "name=value" pairs, for pvm's --stats.
    pub fn summary(&self) -> String {
        let get = |c: &AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        format!(
            "tx_frames={} tx_bytes={} tx_errors={} tx_malformed={} rx_frames={} rx_bytes={} rx_dropped={} rx_errors={}",
            get(&self.tx_frames),
            get(&self.tx_bytes),
            get(&self.tx_errors),
            get(&self.tx_malformed),
            get(&self.rx_frames),
            get(&self.rx_bytes),
            get(&self.rx_dropped),
            get(&self.rx_errors)
        )
    }
}

/// A virtio-net device.
#[derive(Debug)]
pub struct Net {
    backend: Arc<dyn NetBackend>,
    mac: [u8; 6],
    offered_features: u64,
    acked_features: u64,
    counters: Arc<NetCounters>,
    worker: WorkerSlot,
    /// Serves the queues instead of `worker` when set (kernel vhost-net).
    data_plane: Option<Box<dyn DataPlane>>,
}

impl Net {
    /// A device on the tap interface `tap_name`, with `mac` or a generated locally administered
    /// one.
    pub fn with_tap(tap_name: &str, mac: Option<[u8; 6]>) -> Result<Self, NetError> {
        Ok(Self::new(Arc::new(Tap::open(tap_name)?), mac))
    }

    /// Hands the queues to `plane` (kernel vhost-net) instead of pvm's worker, and stops
    /// offering ring features the plane cannot serve. Call before the guest sees the device.
    pub fn set_data_plane(&mut self, plane: Box<dyn DataPlane>) {
        self.offered_features &= DEVICE_FEATURE_MASK | plane.supported_features();
        self.data_plane = Some(plane);
    }

    /// What serves the queues: "vhost-net" or "in-process".
    pub fn data_plane_name(&self) -> &'static str {
        self.data_plane.as_ref().map_or("in-process", |p| p.name())
    }

    /// A device on any backend.
    pub fn new(backend: Arc<dyn NetBackend>, mac: Option<[u8; 6]>) -> Self {
        let offered_features = offered_features(backend.supported_offloads());
        let index = NEXT_NET_INDEX.fetch_add(1, Ordering::Relaxed);
        Net {
            backend,
            mac: mac.unwrap_or_else(generated_mac),
            offered_features,
            acked_features: 0,
            counters: Arc::new(NetCounters::default()),
            worker: WorkerSlot::new(format!("virtio-net{index}")),
            data_plane: None,
        }
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The device's counters; they stay valid across resets.
    pub fn counters(&self) -> Arc<NetCounters> {
        Arc::clone(&self.counters)
    }

    /// Sends one transmit chain to the backend on the calling thread, as the worker does for
    /// each chain it pops. For pvm-virtio's benchmarks (benches/net.rs) only; not part of the API.
    #[doc(hidden)]
    pub fn bench_transmit(
        &self,
        memory: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        transmit(self.backend.as_ref(), memory, chain, &self.counters)
    }

    fn config_space(&self) -> [u8; 8] {
        config_space(self.mac)
    }
}

/// The feature bits a virtio-net device on a backend with `guest_offloads` (TUN_F_* flags it
/// can deliver to the guest) offers: shared with pvm's vhost-user net backend.
pub fn offered_features(guest_offloads: u32) -> u64 {
    let mut offered_features = feature(VIRTIO_F_VERSION_1)
        | feature(VIRTIO_RING_F_EVENT_IDX)
        | feature(VIRTIO_RING_F_INDIRECT_DESC)
        | feature(VIRTIO_NET_F_MAC)
        | feature(VIRTIO_NET_F_STATUS)
        | feature(VIRTIO_NET_F_MRG_RXBUF)
        // The tap takes partially checksummed and GSO frames from us as they are.
        | feature(VIRTIO_NET_F_CSUM)
        | feature(VIRTIO_NET_F_HOST_TSO4)
        | feature(VIRTIO_NET_F_HOST_TSO6)
        | feature(VIRTIO_NET_F_HOST_ECN);
    for (tun_flag, guest_feature) in GUEST_OFFLOAD_FEATURES {
        if guest_offloads & tun_flag != 0 {
            offered_features |= feature(guest_feature);
        }
    }
    offered_features
}

/// The little-endian `struct virtio_net_config` prefix pvm fills in: the MAC and a link that
/// is up.
pub fn config_space(mac: [u8; 6]) -> [u8; 8] {
    let mut config = [0u8; 8];
    let at = offset_of!(virtio_net_config, mac);
    config[at..at + 6].copy_from_slice(&mac);
    let status = offset_of!(virtio_net_config, status);
    config[status..status + 2].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    config
}

/// Which TUN_F_* offload each guest-side feature corresponds to.
const GUEST_OFFLOAD_FEATURES: [(u32, u32); 4] = [
    (libc::TUN_F_CSUM, VIRTIO_NET_F_GUEST_CSUM),
    (libc::TUN_F_TSO4, VIRTIO_NET_F_GUEST_TSO4),
    (libc::TUN_F_TSO6, VIRTIO_NET_F_GUEST_TSO6),
    (libc::TUN_F_TSO_ECN, VIRTIO_NET_F_GUEST_ECN),
];

/// The TUN_F_* offloads to enable for the guest-side features in `acked`. Segmentation offloads
/// need checksum offload (the kernel refuses them alone), so without GUEST_CSUM none is enabled.
pub fn tun_offloads(acked: u64) -> u32 {
    if acked & feature(VIRTIO_NET_F_GUEST_CSUM) == 0 {
        return 0;
    }
    GUEST_OFFLOAD_FEATURES
        .iter()
        .filter(|(_, f)| acked & feature(*f) != 0)
        .fold(0, |flags, (tun_flag, _)| flags | tun_flag)
}

/// A random unicast, locally administered MAC.
pub fn generated_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    if crate::rng::fill_random(&mut mac).is_err() {
        // Still unique enough per host without entropy: derive from the pid and time.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        mac[1..5].copy_from_slice(&(std::process::id() ^ nanos).to_le_bytes());
    }
    mac[0] = (mac[0] & !0x01) | 0x02;
    mac
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.offered_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.offered_features;
        let offloads = tun_offloads(self.acked_features);
        if let Err(e) = self.backend.set_offloads(offloads) {
            // The tap then sends only plain frames, which every guest handles.
            warn!(
                "tap {}: cannot enable offloads {offloads:#x}: {e}",
                self.backend.name()
            );
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only (no CTRL_MAC_ADDR); writes are ignored as virtio 1.x asks.
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if let Some(plane) = self.data_plane.as_mut() {
            if queues.len() != 2 {
                return Err(ActivateError::QueueCount {
                    got: queues.len(),
                    want: 2,
                });
            }
            return plane.start(&memory, interrupt, queues, self.acked_features);
        }
        self.worker.start(|| {
            let [rx, tx] = device_queues(queues, self.acked_features)?;
            Ok(NetWorker {
                memory,
                interrupt,
                rx,
                tx,
                backend: Arc::clone(&self.backend),
                counters: Arc::clone(&self.counters),
                mergeable: self.acked_features & feature(VIRTIO_NET_F_MRG_RXBUF) != 0,
                frame: vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN],
                pending_len: None,
                backend_watched: false,
            })
        })
    }

    fn reset(&mut self) {
        match self.data_plane.as_mut() {
            Some(plane) => plane.stop(),
            None => self.worker.stop(),
        }
        self.acked_features = 0;
        if let Err(e) = self.backend.set_offloads(0) {
            warn!("tap {}: cannot clear offloads: {e}", self.backend.name());
        }
    }
}

struct NetWorker {
    memory: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    rx: DeviceQueue,
    tx: DeviceQueue,
    backend: Arc<dyn NetBackend>,
    counters: Arc<NetCounters>,
    mergeable: bool,
    /// One frame read from the backend; `pending_len` bytes of it wait for guest buffers.
    frame: Vec<u8>,
    pending_len: Option<usize>,
    backend_watched: bool,
}

impl NetWorker {
    fn transmit_all(&mut self) {
        let (memory, backend, counters) = (&self.memory, &self.backend, &self.counters);
        self.tx.process(memory, self.interrupt.as_ref(), |chain| {
            transmit(backend.as_ref(), memory, chain, counters)
        });
    }

    fn watch_backend(&mut self, events: &EventLoop, watch: bool) {
        if watch == self.backend_watched {
            return;
        }
        let result = if watch {
            events.watch(self.backend.as_ref(), BACKEND_READY)
        } else {
            events.unwatch(self.backend.as_ref())
        };
        match result {
            Ok(()) => self.backend_watched = watch,
            Err(e) => warn!(
                "tap {}: cannot update the epoll set: {e}",
                self.backend.name()
            ),
        }
    }

    /// Moves frames from the backend to the guest until the backend is empty (then waits for it)
    /// or the guest is out of buffers (then waits for a receive-queue kick instead).
    fn receive(&mut self, events: &EventLoop) {
        let mut frames = 0;
        loop {
            if frames == FRAMES_PER_PASS {
                // Let the transmit queue and a reset in; the level-triggered backend fd brings
                // the worker straight back.
                self.watch_backend(events, true);
                break;
            }
            if self.rx.is_stopped() {
                self.watch_backend(events, false);
                break;
            }
            let len = match self.pending_len {
                Some(len) => len,
                None if !self.rx.has_available(&self.memory) => {
                    if self.rx.notify_on_more(&self.memory) {
                        // Counted too: a driver rewriting avail.idx under us must not be able
                        // to keep the worker away from its kill eventfd.
                        frames += 1;
                        continue;
                    }
                    self.watch_backend(events, false);
                    break;
                }
                None => match tap::read_frame(self.backend.as_ref(), &mut self.frame) {
                    Ok(len) if len >= VNET_HDR_LEN => len,
                    Ok(_) => {
                        // Too short to carry a vnet header; counts toward the pass budget so
                        // a backend that keeps returning nothing cannot hold the worker.
                        self.counters.rx_errors.fetch_add(1, Ordering::Relaxed);
                        frames += 1;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.watch_backend(events, true);
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // Retried on the next receive-queue kick rather than spinning on it.
                        if self.counters.rx_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            warn!("tap {}: read failed: {e}", self.backend.name());
                        }
                        self.watch_backend(events, false);
                        break;
                    }
                },
            };
            let frame = &mut self.frame[..len];
            match deliver_frame(
                &mut self.rx,
                &self.memory,
                frame,
                self.mergeable,
                &self.counters,
            ) {
                Delivery::Delivered | Delivery::Dropped => {
                    self.pending_len = None;
                    frames += 1;
                }
                Delivery::NoBuffers => {
                    self.pending_len = Some(len);
                    if self.rx.notify_on_more(&self.memory) {
                        // Counted too: a driver rewriting avail.idx under us must not be able
                        // to keep the worker away from its kill eventfd.
                        frames += 1;
                        continue;
                    }
                    self.watch_backend(events, false);
                    break;
                }
            }
        }
        self.rx.signal_used(&self.memory, self.interrupt.as_ref());
    }
}

impl EventHandler for NetWorker {
    fn register(&mut self, events: &EventLoop) -> io::Result<()> {
        events.watch(&self.rx.kick, RX_KICK)?;
        events.watch(&self.tx.kick, TX_KICK)?;
        events.watch(self.backend.as_ref(), BACKEND_READY)?;
        self.backend_watched = true;
        Ok(())
    }

    fn start(&mut self, events: &EventLoop) {
        self.transmit_all();
        self.receive(events);
    }

    fn handle_event(&mut self, events: &EventLoop, token: u64) {
        match token {
            RX_KICK => {
                self.rx.clear_kick();
                self.receive(events);
            }
            TX_KICK => {
                self.tx.clear_kick();
                self.transmit_all();
            }
            BACKEND_READY => self.receive(events),
            _ => {}
        }
    }
}

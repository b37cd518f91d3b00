//! virtio-net over a tap (or any [`NetBackend`]): one receive and one transmit queue, or with
//! multiqueue N pairs of them and a control queue (see [`multiqueue`]), each pair on its own tap
//! queue and its own worker thread.
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

mod multiqueue;
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

use self::multiqueue::{CTRL_KICK, CtrlCounters, CtrlQueue, CtrlWorker, PairLink, Pairs};
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
/// The pair was turned on or off (multiqueue).
const PAIR_CHANGED: u64 = 3;
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
    /// The sum of `parts` (a multiqueue device's per-pair counters).
    pub fn total(parts: &[Arc<NetCounters>]) -> NetCounters {
        let total = NetCounters::default();
        let add = |to: &AtomicU64, from: &AtomicU64| {
            to.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        };
        for part in parts {
            add(&total.tx_frames, &part.tx_frames);
            add(&total.tx_bytes, &part.tx_bytes);
            add(&total.tx_errors, &part.tx_errors);
            add(&total.tx_malformed, &part.tx_malformed);
            add(&total.rx_frames, &part.rx_frames);
            add(&total.rx_bytes, &part.rx_bytes);
            add(&total.rx_dropped, &part.rx_dropped);
            add(&total.rx_errors, &part.rx_errors);
        }
        total
    }

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
    /// Queue pairs beyond the first; None with one pair.
    multi: Option<MultiQueue>,
    queue_sizes: Vec<u16>,
}

/// The parts of a multiqueue device beyond pair 0 (which uses the single-pair fields).
#[derive(Debug)]
struct MultiQueue {
    pairs: Arc<Pairs>,
    /// The workers of pairs 1.. (pvm's own data plane; empty with vhost-net).
    workers: Vec<WorkerSlot>,
    /// The counters of pairs 1...
    counters: Vec<Arc<NetCounters>>,
    ctrl_counters: Arc<CtrlCounters>,
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

    /// A multiqueue device on `taps`, one queue of the same tap per pair (see
    /// [`Tap::open_queues`]); with one tap it is the same as [`Self::new`].
    pub fn with_pairs(taps: Vec<Arc<dyn NetBackend>>, mac: Option<[u8; 6]>) -> io::Result<Self> {
        let Some(first) = taps.first() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a net device needs a backend",
            ));
        };
        let mut net = Self::new(Arc::clone(first), mac);
        if taps.len() == 1 {
            return Ok(net);
        }
        if taps.len() > usize::from(u16::MAX / 2) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} queue pairs", taps.len()),
            ));
        }
        let pairs = Arc::new(Pairs::new(taps)?);
        let name = net.worker.name().to_string();
        let count = pairs.count();
        net.offered_features |= feature(VIRTIO_NET_F_MQ) | feature(VIRTIO_NET_F_CTRL_VQ);
        net.queue_sizes = vec![QUEUE_SIZE; 2 * count + 1];
        net.multi = Some(MultiQueue {
            workers: (1..count)
                .map(|pair| WorkerSlot::new(format!("{name}q{pair}")))
                .collect(),
            counters: (1..count)
                .map(|_| Arc::new(NetCounters::default()))
                .collect(),
            ctrl_counters: Arc::new(CtrlCounters::default()),
            pairs,
        });
        Ok(net)
    }

    /// Hands each queue pair to its own plane (kernel vhost-net), in pair order, instead of
    /// pvm's workers; pvm keeps serving the control queue. As [`Self::set_data_plane`] with
    /// one pair.
    pub fn set_pair_data_planes(
        &mut self,
        mut planes: Vec<Box<dyn DataPlane>>,
    ) -> Result<(), String> {
        if planes.len() != self.pair_count() {
            return Err(format!(
                "{} data planes for {} queue pairs",
                planes.len(),
                self.pair_count()
            ));
        }
        let first = planes.remove(0);
        if let Some(multi) = self.multi.as_mut() {
            for plane in &planes {
                self.offered_features &= DEVICE_FEATURE_MASK | plane.supported_features();
            }
            multi.pairs.set_planes(planes)?;
            // Their threads would stay idle.
            multi.workers.clear();
        }
        self.set_data_plane(first);
        Ok(())
    }

    /// The number of receive/transmit queue pairs.
    pub fn pair_count(&self) -> usize {
        self.multi.as_ref().map_or(1, |m| m.pairs.count())
    }

    /// The queue pairs the guest uses right now (VQ_PAIRS_SET; 1 after a reset).
    pub fn active_pairs(&self) -> usize {
        self.multi.as_ref().map_or(1, |m| m.pairs.active())
    }

    /// Each queue pair's counters, in pair order (what pvm's own workers moved).
    pub fn pair_counters(&self) -> Vec<Arc<NetCounters>> {
        let mut all = vec![Arc::clone(&self.counters)];
        if let Some(multi) = &self.multi {
            all.extend(multi.counters.iter().cloned());
        }
        all
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
            multi: None,
            queue_sizes: vec![QUEUE_SIZE, QUEUE_SIZE],
        }
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The device's counters (the first queue pair's with multiqueue, see
    /// [`Self::pair_counters`]); they stay valid across resets.
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

    fn config_space(&self) -> [u8; 10] {
        // At most u16::MAX / 2, checked in with_pairs.
        config_space(self.mac, self.pair_count() as u16)
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
pub fn config_space(mac: [u8; 6], pairs: u16) -> [u8; 10] {
    let mut config = [0u8; 10];
    let at = offset_of!(virtio_net_config, mac);
    config[at..at + 6].copy_from_slice(&mac);
    let status = offset_of!(virtio_net_config, status);
    config[status..status + 2].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    let at = offset_of!(virtio_net_config, max_virtqueue_pairs);
    config[at..at + 2].copy_from_slice(&pairs.to_le_bytes());
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
        &self.queue_sizes
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
        if self.multi.is_some() {
            if self.worker.is_active() {
                // Also with vhost-net: the control queue's worker runs from activation to reset.
                return Err(ActivateError::AlreadyActive);
            }
            let result = self.activate_pairs(memory, interrupt, queues);
            if result.is_err() {
                // Whatever started goes, so the driver's reset finds a stopped device.
                self.stop_data_planes();
            }
            return result;
        }
        if let Some(plane) = self.data_plane.as_mut() {
            if queues.len() != 2 {
                return Err(ActivateError::QueueCount {
                    got: queues.len(),
                    want: 2,
                });
            }
            return plane.start(&memory, interrupt, queues, self.acked_features);
        }
        if self.worker.is_active() {
            return Err(ActivateError::AlreadyActive);
        }
        let [rx, tx] = device_queues(queues, self.acked_features)?;
        let worker = self.net_worker(memory, interrupt, rx, tx);
        self.worker.start(|| Ok(worker))
    }

    fn reset(&mut self) {
        self.stop_data_planes();
        self.acked_features = 0;
        if let Err(e) = self.backend.set_offloads(0) {
            warn!("tap {}: cannot clear offloads: {e}", self.backend.name());
        }
    }
}

impl Net {
    /// Stops every worker and data plane; with multiqueue, back to one active pair.
    fn stop_data_planes(&mut self) {
        // First `worker`: pair 0's (with the control queue), or with vhost-net and multiqueue
        // the control queue's, which must not switch pairs while they stop.
        self.worker.stop();
        if let Some(plane) = self.data_plane.as_mut() {
            plane.stop();
        }
        if let Some(multi) = self.multi.as_mut() {
            for worker in &mut multi.workers {
                worker.stop();
            }
            multi.pairs.with_planes(|planes| {
                for plane in planes {
                    plane.stop();
                }
            });
            multi.pairs.reset();
        }
    }

    /// Pair 0's worker, for one pair or as the start of a multiqueue activation.
    fn net_worker(
        &self,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        rx: DeviceQueue,
        tx: DeviceQueue,
    ) -> NetWorker {
        NetWorker {
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
            link: None,
            fallback: None,
            ctrl: None,
        }
    }

    /// Multiqueue activation: the pairs the driver set up (all their queues ready, counted from
    /// pair 0; only pair 0 without VIRTIO_NET_F_MQ) each get their worker or vhost-net plane,
    /// pair 0 only active; the control queue (2N with MQ, else 2) goes to pair 0's worker, or
    /// with vhost-net to a worker of its own on the device thread.
    fn activate_pairs(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        let Some(multi) = self.multi.as_mut() else {
            return Err(ActivateError::Backend(
                "not a multiqueue device".to_string(),
            ));
        };
        let count = multi.pairs.count();
        let acked = self.acked_features;
        let mq =
            acked & feature(VIRTIO_NET_F_MQ) != 0 && acked & feature(VIRTIO_NET_F_CTRL_VQ) != 0;
        let ctrl_index = if mq {
            2 * count
        } else if acked & feature(VIRTIO_NET_F_CTRL_VQ) != 0 {
            2
        } else {
            usize::MAX
        };
        let event_idx = acked & feature(VIRTIO_RING_F_EVENT_IDX) != 0;
        let got = queues.len();
        let mut slots: Vec<Option<ActiveQueue>> = (0..2 * count + 1).map(|_| None).collect();
        for queue in queues {
            match slots.get_mut(usize::from(queue.index)) {
                Some(slot) => *slot = Some(queue),
                None => warn!("virtio-net: queue {} does not exist, ignored", queue.index),
            }
        }
        let ctrl = slots
            .get_mut(ctrl_index)
            .and_then(Option::take)
            .map(|queue| CtrlQueue {
                queue: DeviceQueue::new(queue, event_idx),
                pairs: Arc::clone(&multi.pairs),
                mq,
                counters: Arc::clone(&multi.ctrl_counters),
            });
        let max_pairs = if mq { count } else { 1 };
        let mut pair_queues = Vec::new();
        for pair in 0..max_pairs {
            match (slots[2 * pair].take(), slots[2 * pair + 1].take()) {
                (Some(rx), Some(tx)) => pair_queues.push(vec![rx, tx]),
                _ => break,
            }
        }
        let unused = slots.iter().filter(|s| s.is_some()).count();
        if unused > 0 {
            warn!(
                "virtio-net: {unused} ready queues beyond the {} complete queue pairs are not served",
                pair_queues.len()
            );
        }
        if pair_queues.is_empty() {
            return Err(ActivateError::QueueCount { got, want: 2 });
        }
        let usable = pair_queues.len();
        multi.pairs.activate(usable);
        let pairs = Arc::clone(&multi.pairs);
        let pair_counters = multi.counters.clone();
        let mut pair_queues = pair_queues.into_iter();
        let first = pair_queues.next().unwrap_or_default();

        if let Some(plane) = self.data_plane.as_mut() {
            plane.start(&memory, Arc::clone(&interrupt), first, acked)?;
            pairs.with_planes(|planes| {
                for (plane, queues) in planes.iter_mut().zip(pair_queues) {
                    plane.start(&memory, Arc::clone(&interrupt), queues, acked)?;
                }
                Ok::<(), ActivateError>(())
            })?;
            if let Some(ctrl) = ctrl {
                self.worker.start(|| {
                    Ok(CtrlWorker {
                        memory,
                        interrupt,
                        ctrl,
                    })
                })?;
            }
            return Ok(());
        }

        for ((pair, queues), counters) in (1..).zip(pair_queues).zip(pair_counters) {
            let [rx, tx] = device_queues(queues, acked)?;
            let mut worker = self.net_worker(memory.clone(), Arc::clone(&interrupt), rx, tx);
            worker.backend = Arc::clone(pairs.tap(pair));
            worker.counters = counters;
            worker.link = Some(Arc::clone(pairs.link(pair)));
            worker.fallback = Some(Arc::clone(pairs.tap(0)));
            let slot = self
                .multi
                .as_mut()
                .and_then(|multi| multi.workers.get_mut(pair - 1))
                .ok_or_else(|| {
                    ActivateError::Backend(format!("queue pair {pair} has no worker"))
                })?;
            slot.start(|| Ok(worker))?;
        }
        let [rx, tx] = device_queues(first, acked)?;
        let mut worker = self.net_worker(memory, interrupt, rx, tx);
        worker.ctrl = ctrl;
        self.worker.start(|| Ok(worker))
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
    /// Multiqueue pairs 1..: whether the pair is on.
    link: Option<Arc<PairLink>>,
    /// Multiqueue pairs 1..: pair 0's tap queue, which sends what the guest still queues on
    /// this pair while it is off (its own tap queue is detached then).
    fallback: Option<Arc<dyn NetBackend>>,
    /// The control queue (multiqueue, pair 0).
    ctrl: Option<CtrlQueue>,
}

impl NetWorker {
    fn enabled(&self) -> bool {
        self.link.as_ref().is_none_or(|link| link.enabled())
    }

    fn transmit_all(&mut self) {
        let backend = match &self.fallback {
            Some(fallback) if !self.enabled() => fallback,
            _ => &self.backend,
        };
        let (memory, counters) = (&self.memory, &self.counters);
        self.tx.process(memory, self.interrupt.as_ref(), |chain| {
            transmit(backend.as_ref(), memory, chain, counters)
        });
    }

    fn serve_ctrl(&mut self) {
        if let Some(ctrl) = self.ctrl.as_mut() {
            ctrl.queue.clear_kick();
            ctrl.serve(&self.memory, self.interrupt.as_ref());
        }
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
        if !self.enabled() {
            // The pair is off and its tap queue detached: nothing to read until it is on again
            // (PAIR_CHANGED).
            self.watch_backend(events, false);
            return;
        }
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
                    Err(_) if !self.enabled() => {
                        // The pair went off and its queue was detached under this read; not a
                        // tap failure.
                        self.watch_backend(events, false);
                        break;
                    }
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
        if let Some(link) = &self.link {
            events.watch(&link.wake, PAIR_CHANGED)?;
        }
        if let Some(ctrl) = &self.ctrl {
            events.watch(&ctrl.queue.kick, CTRL_KICK)?;
        }
        if self.enabled() {
            events.watch(self.backend.as_ref(), BACKEND_READY)?;
            self.backend_watched = true;
        }
        Ok(())
    }

    fn start(&mut self, events: &EventLoop) {
        self.serve_ctrl();
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
            PAIR_CHANGED => {
                if let Some(link) = &self.link {
                    link.clear_wake();
                }
                // Turned on: the tap queue is attached again and watched; off: unwatched.
                self.receive(events);
            }
            CTRL_KICK => self.serve_ctrl(),
            _ => {}
        }
    }
}

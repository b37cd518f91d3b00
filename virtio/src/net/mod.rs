//! virtio-net over a tap (or any [`NetBackend`]): N identical receive/transmit queue pairs (N = 1
//! unless multiqueue), each on its own tap queue and served by its own worker thread
//! ([`pair`]) or by a kernel vhost-net instance; with N > 1 also a control queue on a worker of
//! its own (see [`multiqueue`]).
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
mod pair;
mod receive;
mod rxtx;
mod snapshot;
pub mod tap;
#[cfg(test)]
mod tests;

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

pub use self::multiqueue::PairError;
use self::multiqueue::{CtrlCounters, CtrlQueue, CtrlWorker, Pairs};
use self::pair::{PairParts, PairWorker, QueuePlan};
pub use self::receive::{PendingFrame, TapSource};
pub use self::rxtx::{Delivery, deliver_frame, transmit};
pub use self::tap::{NetBackend, Tap, TapError, read_frame};
use crate::data_plane::{DEVICE_FEATURE_MASK, DataPlane};
use crate::device::{ActivateError, Activation, PauseError, VirtioDevice};
use crate::rate_limiter::RateLimit;
use crate::snapshot::{DeviceState, RestoreError, SavedDevice, SnapshotError};
use crate::worker::{DeviceQueue, SharedLimiter, WorkerSlot, feature, read_config_bytes};

pub const QUEUE_SIZE: u16 = 256;
/// Size of `virtio_net_hdr_v1`, the header in front of every frame on both sides.
pub const VNET_HDR_LEN: usize = 12;
/// The largest frame (without vnet header) either way: a 64 KiB GSO packet plus Ethernet and
/// VLAN headers, with slack.
pub const MAX_FRAME_LEN: usize = 65536 + 256;
static NEXT_NET_INDEX: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("a net device needs at least one tap queue")]
    NoBackend,
    #[error("{0} queue pairs, at most {max} are possible", max = u16::MAX / 2)]
    TooManyPairs(usize),
    #[error(transparent)]
    Pairs(#[from] PairError),
    #[error("a rate-limited interface cannot be served by {0}, which cannot enforce the limit")]
    LimitedDataPlane(&'static str),
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
    mac: [u8; 6],
    offered_features: u64,
    queue_sizes: Vec<u16>,
    pairs: Arc<Pairs>,
    /// pvm's own worker of each pair, in pair order; none when data planes serve the pairs.
    workers: Vec<WorkerSlot<PairWorker>>,
    /// The control queue's worker and counters, with more than one pair.
    ctrl: Option<(WorkerSlot<CtrlWorker>, Arc<CtrlCounters>)>,
    /// Receive and transmit rate limiters, shared by every pair and kept across resets.
    rx_limiter: SharedLimiter,
    tx_limiter: SharedLimiter,
}

impl Net {
    /// A device on the tap interface `tap_name`, with `mac` or a generated locally administered
    /// one.
    pub fn with_tap(tap_name: &str, mac: Option<[u8; 6]>) -> Result<Self, NetError> {
        Self::with_pairs(vec![Arc::new(Tap::open(tap_name)?)], mac)
    }

    /// A device on any backend, with one queue pair.
    pub fn new(backend: Arc<dyn NetBackend>, mac: Option<[u8; 6]>) -> Result<Self, NetError> {
        Self::with_pairs(vec![backend], mac)
    }

    /// A device with one queue pair per backend in `taps` (queues of the same tap, see
    /// [`Tap::open_queues`]); with more than one it offers VIRTIO_NET_F_MQ and a control queue.
    pub fn with_pairs(
        taps: Vec<Arc<dyn NetBackend>>,
        mac: Option<[u8; 6]>,
    ) -> Result<Self, NetError> {
        let Some(first) = taps.first() else {
            return Err(NetError::NoBackend);
        };
        let count = taps.len();
        if count > usize::from(u16::MAX / 2) {
            return Err(NetError::TooManyPairs(count));
        }
        let mut offered_features = offered_features(first.supported_offloads());
        let index = NEXT_NET_INDEX.fetch_add(1, Ordering::Relaxed);
        let name = format!("virtio-net{index}");
        let workers = (0..count)
            .map(|pair| match pair {
                0 => WorkerSlot::new(name.clone()),
                _ => WorkerSlot::new(format!("{name}q{pair}")),
            })
            .collect();
        let mut queue_sizes = vec![QUEUE_SIZE; 2 * count];
        let ctrl = (count > 1).then(|| {
            offered_features |= feature(VIRTIO_NET_F_MQ) | feature(VIRTIO_NET_F_CTRL_VQ);
            queue_sizes.push(QUEUE_SIZE);
            (
                WorkerSlot::new(format!("{name}ctl")),
                Arc::new(CtrlCounters::default()),
            )
        });
        Ok(Net {
            mac: mac.unwrap_or_else(generated_mac),
            offered_features,
            queue_sizes,
            pairs: Arc::new(Pairs::new(taps)?),
            workers,
            ctrl,
            rx_limiter: SharedLimiter::new(RateLimit::default()),
            tx_limiter: SharedLimiter::new(RateLimit::default()),
        })
    }

    /// Receives and transmits no faster than `rx` and `tx` allow (each frame is one operation
    /// and its bytes without the vnet header), summed over all queue pairs. Only pvm's own
    /// workers enforce a limit: a limited device refuses [`Self::set_data_planes`].
    pub fn with_rate_limits(mut self, rx: RateLimit, tx: RateLimit) -> Self {
        self.rx_limiter = SharedLimiter::new(rx);
        self.tx_limiter = SharedLimiter::new(tx);
        self
    }

    /// The receive and transmit rate limits, if any.
    pub fn rate_limits(&self) -> (Option<RateLimit>, Option<RateLimit>) {
        (self.rx_limiter.limit(), self.tx_limiter.limit())
    }

    /// The receive and transmit rate limiters, whose limits may be changed while the device
    /// runs (in-process data plane only: see [`Self::set_data_planes`]).
    pub fn rate_limiters(&self) -> (SharedLimiter, SharedLimiter) {
        (self.rx_limiter.clone(), self.tx_limiter.clone())
    }

    /// Hands each queue pair to its own data plane (kernel vhost-net), in pair order, instead
    /// of pvm's workers, and stops offering ring features a plane cannot serve; pvm keeps
    /// serving the control queue. Call before the guest sees the device.
    pub fn set_data_planes(&mut self, planes: Vec<Box<dyn DataPlane>>) -> Result<(), NetError> {
        if self.rx_limiter.is_limited() || self.tx_limiter.is_limited() {
            let name = planes.first().map_or("a data plane", |p| p.name());
            return Err(NetError::LimitedDataPlane(name));
        }
        let supported = planes
            .iter()
            .fold(u64::MAX, |all, plane| all & plane.supported_features());
        self.pairs.set_planes(planes)?;
        self.offered_features &= DEVICE_FEATURE_MASK | supported;
        // Their threads would stay idle.
        self.workers.clear();
        Ok(())
    }

    /// The number of receive/transmit queue pairs.
    pub fn pair_count(&self) -> usize {
        self.pairs.count()
    }

    /// The queue pairs the guest uses right now (VQ_PAIRS_SET; 1 after a reset).
    pub fn active_pairs(&self) -> usize {
        self.pairs.active()
    }

    /// Each queue pair's counters, in pair order (what pvm's own workers moved); they stay
    /// valid across resets.
    pub fn pair_counters(&self) -> Vec<Arc<NetCounters>> {
        self.pairs.counters().to_vec()
    }

    /// What serves the queues: "vhost-net" or "in-process".
    pub fn data_plane_name(&self) -> &'static str {
        self.pairs
            .with_planes(|planes| planes.first().map_or("in-process", |p| p.name()))
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The first queue pair's counters (see [`Self::pair_counters`]).
    pub fn counters(&self) -> Arc<NetCounters> {
        Arc::clone(&self.pairs.counters()[0])
    }

    /// Sends one transmit chain to the backend on the calling thread, as the worker does for
    /// each chain it pops. For pvm-virtio's benchmarks (benches/net.rs) only; not part of the API.
    #[doc(hidden)]
    pub fn bench_transmit(
        &self,
        memory: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        transmit(
            self.pairs.tap(0).as_ref(),
            memory,
            chain,
            &self.pairs.counters()[0],
        )
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

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only (no CTRL_MAC_ADDR); writes are ignored as virtio 1.x asks.
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if self.is_active() {
            return Err(ActivateError::AlreadyActive);
        }
        let result = self.start_pairs(activation, false);
        if result.is_err() {
            // Whatever started goes, so the driver's reset finds a stopped device.
            self.stop_pairs();
        }
        result
    }

    fn reset(&mut self) {
        self.stop_pairs();
        // Offloads belong to the tap as a whole: set through pair 0's queue.
        let tap = self.pairs.tap(0);
        if let Err(e) = tap.set_offloads(0) {
            warn!("tap {}: cannot clear offloads: {e}", tap.name());
        }
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        // The control queue first: pairs must not switch while they pause.
        if let Some((ctrl, _)) = self.ctrl.as_mut() {
            ctrl.pause()?;
        }
        for worker in &mut self.workers {
            worker.pause()?;
        }
        self.pairs
            .with_planes(|planes| planes.iter_mut().try_for_each(|plane| plane.pause()))?;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), PauseError> {
        self.pairs
            .with_planes(|planes| planes.iter_mut().try_for_each(|plane| plane.resume()))?;
        for worker in &mut self.workers {
            worker.resume()?;
        }
        if let Some((ctrl, _)) = self.ctrl.as_mut() {
            ctrl.resume()?;
        }
        Ok(())
    }

    fn save_state(&self) -> Result<SavedDevice, SnapshotError> {
        self.save_snapshot()
    }

    fn restore(
        &mut self,
        activation: Option<Activation>,
        state: &DeviceState,
    ) -> Result<(), RestoreError> {
        self.restore_snapshot(activation, state)
    }
}

impl Net {
    fn is_active(&self) -> bool {
        self.workers.iter().any(WorkerSlot::is_active)
            || self.ctrl.as_ref().is_some_and(|(ctrl, _)| ctrl.is_active())
            || self.pairs.is_usable()
    }

    /// Activation: the tap gets the offloads the driver accepted, each pair the driver set up
    /// its worker or data plane (pair 0 active, the rest off until VQ_PAIRS_SET), the control
    /// queue its worker. `paused` (a restore) sets all of it up without serving anything.
    fn start_pairs(&mut self, activation: Activation, paused: bool) -> Result<(), ActivateError> {
        let Activation {
            memory,
            interrupt,
            queues,
            features,
        } = activation;
        let tap = self.pairs.tap(0);
        let offloads = tun_offloads(features);
        if let Err(e) = tap.set_offloads(offloads) {
            // The tap then sends only plain frames, which every guest handles.
            warn!(
                "tap {}: cannot enable offloads {offloads:#x}: {e}",
                tap.name()
            );
        }
        let plan = QueuePlan::new(queues, self.pairs.count(), features)?;
        self.pairs.activate(plan.pairs.len());
        let event_idx = features & feature(VIRTIO_RING_F_EVENT_IDX) != 0;
        for (index, [rx, tx]) in plan.pairs.into_iter().enumerate() {
            if let Some(worker) = self.workers.get_mut(index) {
                let parts = PairParts {
                    memory: memory.clone(),
                    interrupt: Arc::clone(&interrupt),
                    tap: Arc::clone(self.pairs.tap(index)),
                    counters: Arc::clone(&self.pairs.counters()[index]),
                    mergeable: features & feature(VIRTIO_NET_F_MRG_RXBUF) != 0,
                    link: Arc::clone(self.pairs.link(index)),
                    fallback: Arc::clone(self.pairs.tap(0)),
                    rx_limiter: self.rx_limiter.clone(),
                    tx_limiter: self.tx_limiter.clone(),
                };
                let (rx, tx) = (
                    DeviceQueue::new(rx, event_idx),
                    DeviceQueue::new(tx, event_idx),
                );
                let build = || PairWorker::new(parts, rx, tx);
                match paused {
                    true => worker.start_paused(build)?,
                    false => worker.start(build)?,
                }
            } else {
                self.pairs
                    .with_planes(|planes| match planes.get_mut(index) {
                        Some(plane) => {
                            let (interrupt, queues) = (Arc::clone(&interrupt), vec![rx, tx]);
                            match paused {
                                true => plane.start_paused(&memory, interrupt, queues, features),
                                false => plane.start(&memory, interrupt, queues, features),
                            }
                        }
                        None => Ok(()),
                    })?;
            }
        }
        if let (Some(queue), Some((worker, counters))) = (plan.ctrl, self.ctrl.as_mut()) {
            let ctrl = CtrlQueue {
                queue: DeviceQueue::new(queue, event_idx),
                pairs: Arc::clone(&self.pairs),
                mq: features & feature(VIRTIO_NET_F_MQ) != 0,
                counters: Arc::clone(counters),
            };
            let build = || {
                Ok(CtrlWorker {
                    memory,
                    interrupt,
                    ctrl,
                })
            };
            match paused {
                true => worker.start_paused(build)?,
                false => worker.start(build)?,
            }
        }
        Ok(())
    }

    /// Stops every worker and data plane; back to one active pair.
    fn stop_pairs(&mut self) {
        // The control queue first: it must not switch pairs while they stop.
        if let Some((ctrl, _)) = self.ctrl.as_mut() {
            ctrl.stop();
        }
        for worker in &mut self.workers {
            worker.stop();
        }
        self.pairs.with_planes(|planes| {
            for plane in planes {
                plane.stop();
            }
        });
        self.pairs.reset();
    }
}

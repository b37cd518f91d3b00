//! Multiqueue virtio-net (VIRTIO_NET_F_MQ): N receive/transmit queue pairs, each on its own tap
//! queue, and the control queue through which the driver says how many it uses
//! (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, virtio 1.2 section 5.1.6.5.5).
//!
//! Every pair is served the same way (see [`super::pair`], or a vhost-net plane per pair); the
//! control queue has a worker of its own. Pair 0 is always on. A pair beyond the active count
//! has its tap queue detached
//! (TUNSETQUEUE with IFF_DETACH_QUEUE), so the kernel steers no flow to a queue the guest does not
//! serve, and its data plane paused: the in-process worker stops reading the tap (and sends what
//! the guest still queues through pair 0's tap queue), vhost-net has its backend removed. After
//! a reset one pair is active, the spec's default. Offloads and the vnet header size belong to
//! the tap as a whole: they are set through pair 0's queue, which is never detached.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use log::warn;
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{NetBackend, NetCounters};
use crate::chain::{Chain, ChainError, split_chain};
use crate::data_plane::{DataPlane, DataPlaneError};
use crate::device::Interrupt;
use crate::snapshot::QueuePosition;
use crate::worker::{DeviceQueue, EventHandler, EventLoop, QueuePositions};

/// Why the queue pairs in use could not be switched.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error("the driver asked for {asked} queue pairs, it set up {usable}")]
    NotSetUp { asked: usize, usable: usize },
    #[error("cannot {action} queue {pair} of tap {tap}: {source}")]
    TapQueue {
        action: &'static str,
        pair: usize,
        tap: String,
        source: io::Error,
    },
    #[error("queue pair {pair}: {source}")]
    Plane { pair: usize, source: DataPlaneError },
    #[error("{planes} data planes for {pairs} queue pairs")]
    PlaneCount { planes: usize, pairs: usize },
}

/// Why a control command was refused (the driver gets VIRTIO_NET_ERR).
#[derive(Debug, thiserror::Error)]
enum CommandError {
    #[error("cannot read the command: {0}")]
    Read(ChainError),
    #[error("VQ_PAIRS_SET with {0} bytes, 4 expected")]
    PairsSetLength(u64),
    #[error("class {class} command {command} is not supported{}", if *.without_mq {
        " (VIRTIO_NET_F_MQ was not negotiated)"
    } else {
        ""
    })]
    Unsupported {
        class: u32,
        command: u32,
        without_mq: bool,
    },
    #[error(transparent)]
    Pairs(#[from] PairError),
}

/// Tells a pair's in-process worker whether its pair is on; the wake eventfd makes it look.
#[derive(Debug)]
pub(crate) struct PairLink {
    enabled: AtomicBool,
    pub(crate) wake: EventFd,
}

impl PairLink {
    fn new(enabled: bool) -> io::Result<Self> {
        Ok(PairLink {
            enabled: AtomicBool::new(enabled),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    fn set(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Release);
        // Fails only if the counter would overflow, i.e. a wake-up is pending anyway.
        let _ = self.wake.write(1);
    }

    /// Consumes the wake-up so the level-triggered epoll stops reporting it.
    pub(crate) fn clear_wake(&self) {
        let _ = self.wake.read();
    }
}

/// A device's queue pairs: what each pair is served with, and the switch that turns them on and
/// off, shared by the device and the worker serving the control queue.
#[derive(Debug)]
pub(crate) struct Pairs {
    /// One tap queue per pair.
    taps: Vec<Arc<dyn NetBackend>>,
    /// One per pair; pair 0's is always on.
    links: Vec<Arc<PairLink>>,
    /// One per pair, valid across resets: what pvm's own workers moved.
    counters: Vec<Arc<NetCounters>>,
    state: Mutex<PairState>,
}

#[derive(Debug)]
struct PairState {
    /// Pairs the guest uses (VQ_PAIRS_SET), 1 after a reset.
    active: usize,
    /// Pairs the driver set up at activation (0 when not active): the most it may enable.
    usable: usize,
    /// Whether each pair's tap queue is attached.
    attached: Vec<bool>,
    /// vhost-net: the data plane of each pair. Empty when pvm's own workers serve the pairs.
    planes: Vec<Box<dyn DataPlane>>,
}

impl Pairs {
    /// Pairs over `taps` (all attached, as just opened); pairs beyond the first are turned off
    /// at once, as after a reset. Fails if a tap queue cannot be detached.
    pub(crate) fn new(taps: Vec<Arc<dyn NetBackend>>) -> Result<Self, PairError> {
        let links = (0..taps.len())
            .map(|pair| PairLink::new(pair == 0).map(Arc::new))
            .collect::<io::Result<_>>()
            .map_err(|source| PairError::TapQueue {
                action: "watch",
                pair: 0,
                tap: taps
                    .first()
                    .map_or_else(String::new, |t| t.name().to_string()),
                source,
            })?;
        let counters = taps.iter().map(|_| Arc::default()).collect();
        let pairs = Pairs {
            counters,
            state: Mutex::new(PairState {
                active: taps.len(),
                usable: 0,
                attached: vec![true; taps.len()],
                planes: Vec::new(),
            }),
            taps,
            links,
        };
        {
            let mut state = pairs.lock();
            pairs.apply(&mut state, 1)?;
        }
        Ok(pairs)
    }

    pub(crate) fn count(&self) -> usize {
        self.taps.len()
    }

    pub(crate) fn tap(&self, pair: usize) -> &Arc<dyn NetBackend> {
        &self.taps[pair]
    }

    pub(crate) fn link(&self, pair: usize) -> &Arc<PairLink> {
        &self.links[pair]
    }

    pub(crate) fn counters(&self) -> &[Arc<NetCounters>] {
        &self.counters
    }

    fn lock(&self) -> MutexGuard<'_, PairState> {
        // A panic while holding it left valid (if possibly stale) flags; carry on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pairs the guest currently uses.
    pub(crate) fn active(&self) -> usize {
        self.lock().active
    }

    /// Hands over one data plane per pair, in pair order; all but pair 0's start turned off.
    pub(crate) fn set_planes(&self, mut planes: Vec<Box<dyn DataPlane>>) -> Result<(), PairError> {
        if planes.len() != self.taps.len() {
            return Err(PairError::PlaneCount {
                planes: planes.len(),
                pairs: self.taps.len(),
            });
        }
        for (pair, plane) in planes.iter_mut().enumerate().skip(1) {
            plane
                .set_enabled(false)
                .map_err(|source| PairError::Plane { pair, source })?;
        }
        self.lock().planes = planes;
        Ok(())
    }

    /// Runs `f` on the data planes, in pair order (activation, pause, reset).
    pub(crate) fn with_planes<R>(&self, f: impl FnOnce(&mut [Box<dyn DataPlane>]) -> R) -> R {
        f(&mut self.lock().planes)
    }

    /// Whether the device was activated (and not reset since): some pairs are usable.
    pub(crate) fn is_usable(&self) -> bool {
        self.lock().usable > 0
    }

    /// The driver set up `usable` pairs and the device starts with one active.
    pub(crate) fn activate(&self, usable: usize) {
        self.lock().usable = usable.min(self.taps.len());
    }

    /// Back to one active pair with nothing usable: every other pair's tap queue detached and
    /// its data plane off. Errors are logged; the next activation starts from here.
    pub(crate) fn reset(&self) {
        let mut state = self.lock();
        state.usable = 0;
        if let Err(e) = self.apply(&mut state, 1) {
            warn!("tap {}: {e}", self.taps[0].name());
        }
    }

    /// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: uses `pairs` queue pairs from now on, if the driver set
    /// up that many. On failure the previous count stays in force.
    pub(crate) fn set_active(&self, pairs: usize) -> Result<(), PairError> {
        let mut state = self.lock();
        if pairs == 0 || pairs > state.usable {
            return Err(PairError::NotSetUp {
                asked: pairs,
                usable: state.usable,
            });
        }
        let previous = state.active;
        self.apply(&mut state, pairs).inspect_err(|_| {
            if let Err(e) = self.apply(&mut state, previous) {
                warn!(
                    "tap {}: going back to {previous} pairs: {e}",
                    self.taps[0].name()
                );
            }
        })
    }

    /// Turns pairs `1..pairs` on and the rest off.
    fn apply(&self, state: &mut PairState, pairs: usize) -> Result<(), PairError> {
        let mut result = Ok(());
        for pair in 1..self.taps.len() {
            let step = if pair < pairs {
                self.enable(state, pair)
            } else {
                self.disable(state, pair)
            };
            if result.is_ok() {
                result = step;
            }
        }
        if result.is_ok() {
            state.active = pairs;
        }
        result
    }

    fn enable(&self, state: &mut PairState, pair: usize) -> Result<(), PairError> {
        let tap = &self.taps[pair];
        if !state.attached[pair] {
            // Attach first, so frames can arrive once the pair is served.
            tap.set_queue_attached(true)
                .map_err(|source| tap_queue_error("attach", pair, tap.as_ref(), source))?;
            state.attached[pair] = true;
        }
        if let Some(plane) = state.planes.get_mut(pair) {
            plane
                .set_enabled(true)
                .map_err(|source| PairError::Plane { pair, source })?;
        }
        if !self.links[pair].enabled() {
            self.links[pair].set(true);
        }
        Ok(())
    }

    fn disable(&self, state: &mut PairState, pair: usize) -> Result<(), PairError> {
        let tap = &self.taps[pair];
        let mut result = Ok(());
        // Stop serving first, then detach (which drops what the queue held): a read racing
        // the detach finds the queue empty or fails, and the worker, seeing the pair off, does
        // not count that as an error.
        if self.links[pair].enabled() {
            self.links[pair].set(false);
        }
        if let Some(plane) = state.planes.get_mut(pair) {
            if let Err(source) = plane.set_enabled(false) {
                result = Err(PairError::Plane { pair, source });
            }
        }
        if state.attached[pair] {
            match tap.set_queue_attached(false) {
                Ok(()) => state.attached[pair] = false,
                Err(source) if result.is_ok() => {
                    result = Err(tap_queue_error("detach", pair, tap.as_ref(), source));
                }
                Err(_) => {}
            }
        }
        result
    }
}

fn tap_queue_error(
    action: &'static str,
    pair: usize,
    tap: &dyn NetBackend,
    source: io::Error,
) -> PairError {
    PairError::TapQueue {
        action,
        pair,
        tap: tap.name().to_string(),
        source,
    }
}

/// The control queue's counters of commands refused and chains that were not a command.
#[derive(Debug, Default)]
pub(crate) struct CtrlCounters {
    pub(crate) refused: AtomicU64,
    pub(crate) malformed: AtomicU64,
}

/// The control queue and what its commands act on.
pub(crate) struct CtrlQueue {
    pub(crate) queue: DeviceQueue,
    pub(crate) pairs: Arc<Pairs>,
    /// VIRTIO_NET_F_MQ was negotiated (else VQ_PAIRS_SET is refused).
    pub(crate) mq: bool,
    pub(crate) counters: Arc<CtrlCounters>,
}

impl CtrlQueue {
    pub(crate) fn serve(&mut self, memory: &GuestMemoryMmap, interrupt: &dyn Interrupt) {
        let (pairs, mq, counters) = (&self.pairs, self.mq, &self.counters);
        self.queue.process(memory, interrupt, |chain| {
            ctrl_command(memory, chain, pairs, mq, counters)
        });
    }
}

/// Serves one control chain: `class, command, data...` device-readable, then the one-byte ack
/// device-writable. Returns the used length (1 when an ack was written, else 0).
pub(crate) fn ctrl_command(
    memory: &GuestMemoryMmap,
    chain: Chain<'_>,
    pairs: &Pairs,
    mq: bool,
    counters: &CtrlCounters,
) -> u32 {
    let malformed = |what: &dyn std::fmt::Display| {
        if counters.malformed.fetch_add(1, Ordering::Relaxed) == 0 {
            warn!("virtio-net: malformed control chain, not answered: {what}");
        }
        0
    };
    let mut segments = Vec::new();
    let buffers = match split_chain(chain, &mut segments) {
        Ok(buffers) => buffers,
        Err(e) => return malformed(&e),
    };
    let mut writable = buffers.writable;
    let Some(ack) = writable.take_front(1) else {
        return malformed(&"no device-writable byte for the ack");
    };
    // The ack must be writable before the command runs: a command the driver cannot learn the
    // outcome of is not executed.
    if let Err(e) = ack.write_from(memory, &[VIRTIO_NET_ERR as u8]) {
        return malformed(&e);
    }
    let status = match execute(memory, &buffers.readable, pairs, mq) {
        Ok(()) => VIRTIO_NET_OK,
        Err(e) => {
            if counters.refused.fetch_add(1, Ordering::Relaxed) == 0 {
                warn!("virtio-net: control command refused: {e}");
            }
            VIRTIO_NET_ERR
        }
    } as u8;
    match ack.write_from(memory, &[status]) {
        Ok(_) => 1,
        Err(e) => malformed(&e),
    }
}

fn execute(
    memory: &GuestMemoryMmap,
    command: &crate::chain::Segments,
    pairs: &Pairs,
    mq: bool,
) -> Result<(), CommandError> {
    let mut header = [0u8; 2];
    command
        .read_into(memory, &mut header)
        .map_err(CommandError::Read)?;
    match (u32::from(header[0]), u32::from(header[1])) {
        (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) if mq => {
            // class, command, le16 virtqueue_pairs.
            if command.len() != 4 {
                return Err(CommandError::PairsSetLength(command.len()));
            }
            let mut bytes = [0u8; 4];
            command
                .read_into(memory, &mut bytes)
                .map_err(CommandError::Read)?;
            let count = u16::from_le_bytes([bytes[2], bytes[3]]);
            Ok(pairs.set_active(usize::from(count))?)
        }
        (class, command) => Err(CommandError::Unsupported {
            class,
            command,
            without_mq: class == VIRTIO_NET_CTRL_MQ && !mq,
        }),
    }
}

/// The epoll token of the control queue's kick.
const CTRL_KICK: u64 = 0;

/// Serves the control queue, on a worker of its own (the device's pairs are all alike, served
/// in-process or by vhost-net).
pub(crate) struct CtrlWorker {
    pub(crate) memory: GuestMemoryMmap,
    pub(crate) interrupt: Arc<dyn Interrupt>,
    pub(crate) ctrl: CtrlQueue,
}

impl QueuePositions for CtrlWorker {
    fn positions(&self) -> Vec<QueuePosition> {
        vec![self.ctrl.queue.position()]
    }
}

impl EventHandler for CtrlWorker {
    fn register(&mut self, events: &EventLoop) -> io::Result<()> {
        events.watch(&self.ctrl.queue.kick, CTRL_KICK)
    }

    fn start(&mut self, _events: &EventLoop) {
        self.ctrl.serve(&self.memory, self.interrupt.as_ref());
    }

    fn handle_event(&mut self, _events: &EventLoop, _token: u64) {
        self.ctrl.queue.clear_kick();
        self.ctrl.serve(&self.memory, self.interrupt.as_ref());
    }
}

//! Event-loop plumbing shared by every device's data plane.
//!
//! Each active device runs its data plane on a worker: an [`EventHandler`] sleeping in epoll over
//! its queues' kick eventfds, its backend fds (tap, console input) and a kill eventfd, on the
//! device's own thread. [`DeviceQueue`] wraps a virtqueue with the notification-suppression loops
//! ([`DeviceQueue::process`] for requests, [`DeviceQueue::fill`] for host data flowing to the
//! guest) and the policy for a misbehaving driver: a queue the guest corrupted is stopped (logged
//! once), never a panic and never a busy loop. Devices start, pause, resume and stop their worker
//! through a [`WorkerSlot`]: the kill eventfd ends the event loop, which hands the handler, with
//! its queues and pending data, back to the slot, so a paused data plane loses nothing.

use std::io;
use std::os::fd::AsRawFd;

use log::error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

pub use self::queue::{CHAINS_PER_PASS, DeviceQueue, FillEnd, FillSource, FillStep};
pub(crate) use self::single_queue::{ChainServer, SingleQueueHandler, device_queues};
pub(crate) use self::slot::{QueuePositions, WorkerSlot};
pub use self::throttle::SharedLimiter;
pub(crate) use self::throttle::{Throttle, chain_bytes};
use crate::thread::ThreadError;

mod queue;
mod single_queue;
mod slot;
mod throttle;

/// The epoll token of the kill eventfd; handlers use small tokens of their own.
const KILL_TOKEN: u64 = u64::MAX;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot create the worker's epoll: {0}")]
    Epoll(io::Error),
    #[error("cannot create the worker's kill eventfd: {0}")]
    KillEvent(io::Error),
    #[error("cannot signal the worker to stop: {0}")]
    Kill(io::Error),
    #[error("cannot create the rate limiter's timer: {0}")]
    Timer(io::Error),
    #[error("cannot watch the device's file descriptors: {0}")]
    Watch(io::Error),
    #[error("the worker on {0} ended without handing its queues back")]
    Lost(String),
    #[error(transparent)]
    Thread(#[from] ThreadError),
}

/// The feature bit `bit` as a mask.
pub(crate) const fn feature(bit: u32) -> u64 {
    1 << bit
}

/// Copies `offset..offset + data.len()` of a device's config space into `data`; bytes past the
/// end of the config read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// The epoll set a worker sleeps in; handlers use it to watch and unwatch backend fds.
pub(crate) struct EventLoop {
    epoll: Epoll,
}

impl EventLoop {
    fn new() -> Result<Self, WorkerError> {
        Ok(EventLoop {
            epoll: Epoll::new().map_err(WorkerError::Epoll)?,
        })
    }

    /// Watches `fd` for input, level-triggered: the handler must drain it or unwatch it.
    pub(crate) fn watch(&self, fd: &(impl AsRawFd + ?Sized), token: u64) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        )
    }

    pub(crate) fn unwatch(&self, fd: &(impl AsRawFd + ?Sized)) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Delete,
            fd.as_raw_fd(),
            EpollEvent::default(),
        )
    }
}

/// A device's data plane, run on its worker thread.
pub(crate) trait EventHandler: Send + 'static {
    /// Watches the handler's fds in a fresh event loop (at start and at every resume). Runs on
    /// the activating thread so errors reach `activate`.
    fn register(&mut self, events: &EventLoop) -> io::Result<()>;

    /// Runs on the worker thread before it sleeps: the driver may have queued buffers (or the
    /// host input) before the worker existed or while it was paused.
    fn start(&mut self, events: &EventLoop);

    /// One of the handler's fds is ready.
    fn handle_event(&mut self, events: &EventLoop, token: u64);
}

/// The event loop of a worker: returns the handler when the kill eventfd fires (or epoll
/// fails, which is logged), so whoever stopped it can keep the handler's state.
fn run<H: EventHandler>(events: EventLoop, mut handler: H) -> H {
    handler.start(&events);
    let mut ready = [EpollEvent::default(); 8];
    loop {
        let count = match events.epoll.wait(-1, &mut ready) {
            Ok(count) => count,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("device worker: epoll_wait failed, the device stops: {e}");
                return handler;
            }
        };
        if ready[..count].iter().any(|ev| ev.data() == KILL_TOKEN) {
            return handler;
        }
        for ev in &ready[..count] {
            handler.handle_event(&events, ev.data());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let mut data = [0xffu8; 4];
        read_config_bytes(&[1, 2, 3], 1, &mut data);
        assert_eq!(data, [2, 3, 0, 0]);
        read_config_bytes(&[1, 2, 3], u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }
}

//! What every device's `activate` and `reset` have in common, so a device states only its own
//! part: the [`WorkerSlot`] that refuses a second activation and starts and stops the worker,
//! [`device_queues`] for the queues the transport hands over, and [`SingleQueueHandler`], the
//! whole data plane of a device with one request queue.

use std::io;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::GuestMemoryMmap;

use super::{DeviceQueue, EventHandler, EventLoop, Worker, feature};
use crate::chain::Chain;
use crate::device::{ActivateError, ActiveQueue, Interrupt};
use crate::thread::DeviceThread;

/// Where a device keeps its worker: the device's thread, spawned with the device (before the
/// guest runs) and named after it (virtio-blk0, ...), and the data plane running on it from
/// `activate` until `reset`.
#[derive(Debug)]
pub(crate) struct WorkerSlot {
    thread: DeviceThread,
    worker: Option<Worker>,
}

impl WorkerSlot {
    pub(crate) fn new(name: String) -> Self {
        WorkerSlot {
            thread: DeviceThread::spawn(name),
            worker: None,
        }
    }

    /// Whether a data plane runs (between `start` and `stop`).
    pub(crate) fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// The device thread's name (virtio-net0, ...).
    pub(crate) fn name(&self) -> &str {
        self.thread.name()
    }

    /// Runs the handler `build` makes on the device thread; `build` is the device-specific
    /// part of `activate`. An active device refuses before `build` runs, so a repeated
    /// activation neither looks at the new queues nor disturbs the running worker.
    pub(crate) fn start<H: EventHandler>(
        &mut self,
        build: impl FnOnce() -> Result<H, ActivateError>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let handler = build()?;
        self.worker = Some(Worker::start(&mut self.thread, handler)?);
        Ok(())
    }

    /// Ends the data plane and waits for it. Nothing to do when none runs: a reset may come in
    /// any state.
    pub(crate) fn stop(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop(&mut self.thread);
        }
    }
}

impl Drop for WorkerSlot {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Turns the queues the driver configured into a device's `N` worker queues, in index order,
/// with EVENT_IDX as the driver acked it; any other number of queues is refused.
pub(crate) fn device_queues<const N: usize>(
    queues: Vec<ActiveQueue>,
    acked_features: u64,
) -> Result<[DeviceQueue; N], ActivateError> {
    let got = queues.len();
    let event_idx = acked_features & feature(VIRTIO_RING_F_EVENT_IDX) != 0;
    let mut queues: Vec<DeviceQueue> = queues
        .into_iter()
        .map(|q| DeviceQueue::new(q, event_idx))
        .collect();
    // Transports hand queues over in index order; sort anyway rather than trust it.
    queues.sort_by_key(|q| q.index);
    queues
        .try_into()
        .map_err(|_| ActivateError::QueueCount { got, want: N })
}

/// The epoll token of a [`SingleQueueHandler`]'s queue kick.
const QUEUE_KICK: u64 = 0;

/// The data plane of a device with a single queue whose requests are served synchronously, one
/// chain at a time, by `serve_chain` (block, rng): it returns the number of bytes it wrote into
/// the chain. Every kick drains the queue.
pub(crate) struct SingleQueueHandler<F> {
    memory: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    queue: DeviceQueue,
    serve_chain: F,
}

impl<F> SingleQueueHandler<F>
where
    F: FnMut(&GuestMemoryMmap, Chain<'_>) -> u32 + Send + 'static,
{
    pub(crate) fn new(
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queue: DeviceQueue,
        serve_chain: F,
    ) -> Self {
        SingleQueueHandler {
            memory,
            interrupt,
            queue,
            serve_chain,
        }
    }

    fn serve(&mut self) {
        let (memory, serve_chain) = (&self.memory, &mut self.serve_chain);
        self.queue
            .process(memory, self.interrupt.as_ref(), |chain| {
                serve_chain(memory, chain)
            });
    }
}

impl<F> EventHandler for SingleQueueHandler<F>
where
    F: FnMut(&GuestMemoryMmap, Chain<'_>) -> u32 + Send + 'static,
{
    fn register(&mut self, events: &EventLoop) -> io::Result<()> {
        events.watch(&self.queue.kick, QUEUE_KICK)
    }

    fn start(&mut self, _events: &EventLoop) {
        self.serve();
    }

    fn handle_event(&mut self, _events: &EventLoop, _token: u64) {
        self.queue.clear_kick();
        self.serve();
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::QueueT;

    use super::*;
    use crate::testing::{TestQueue, test_memory};

    #[test]
    fn device_queues_come_in_index_order_with_acked_event_idx() {
        let mem = test_memory();
        let (q0, q1) = (TestQueue::new(&mem, 16), TestQueue::new(&mem, 16));
        let reversed = vec![q1.active_queue(1), q0.active_queue(0)];
        let [rx, tx] = device_queues(reversed, feature(VIRTIO_RING_F_EVENT_IDX)).unwrap();
        assert_eq!((rx.index, tx.index), (0, 1));
        assert!(rx.queue.event_idx_enabled() && tx.queue.event_idx_enabled());
        let [only] = device_queues::<1>(vec![q0.active_queue(0)], 0).unwrap();
        assert!(!only.queue.event_idx_enabled());
        assert!(matches!(
            device_queues::<2>(vec![q0.active_queue(0)], 0),
            Err(ActivateError::QueueCount { got: 1, want: 2 })
        ));
    }
}

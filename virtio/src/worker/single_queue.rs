//! The data plane of a device with a single request queue served synchronously (block, rng),
//! and [`device_queues`], which turns what the transport hands over into a device's queues.

use std::io;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::GuestMemoryMmap;

use super::{
    DeviceQueue, EventHandler, EventLoop, QueuePositions, SharedLimiter, Throttle, WorkerError,
};
use crate::chain::Chain;
use crate::device::{ActivateError, Activation, ActiveQueue, Interrupt};
use crate::snapshot::QueuePosition;

/// Turns the queues of `activation` into a device's `N` worker queues, in index order, with
/// EVENT_IDX as the driver accepted it; any other number of queues is refused.
pub(crate) fn device_queues<const N: usize>(
    queues: Vec<ActiveQueue>,
    features: u64,
) -> Result<[DeviceQueue; N], ActivateError> {
    let got = queues.len();
    let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
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

/// Serves one request chain of a [`SingleQueueHandler`]'s queue.
pub(crate) trait ChainServer: Send + 'static {
    /// Serves `chain`; returns the number of bytes written into it and the data bytes the
    /// request moved as a rate limiter counts them (from the parse the I/O used).
    fn serve(&mut self, memory: &GuestMemoryMmap, chain: Chain<'_>) -> (u32, u64);

    /// The data bytes serving `chain` will move, estimated before serving it from its
    /// descriptors (which the guest may still change: [`Self::serve`] has the final count).
    fn data_bytes(&self, chain: &Chain<'_>) -> u64;
}

/// The epoll token of a [`SingleQueueHandler`]'s queue kick.
const QUEUE_KICK: u64 = 0;
/// The epoll token of its rate limiter's timer.
const LIMIT_TIMER: u64 = 1;

/// The data plane of a device with a single queue whose requests are served synchronously, one
/// chain at a time, by a [`ChainServer`]. Every kick drains the queue; a request is complete
/// when its chain is used, so a paused handler has nothing in flight. With a rate limiter, a
/// request the limiter refuses stays in the ring until the limiter's timer fires.
pub(crate) struct SingleQueueHandler<S> {
    memory: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    queue: DeviceQueue,
    server: S,
    throttle: Option<Throttle>,
}

impl<S: ChainServer> SingleQueueHandler<S> {
    /// The handler for `activation`, which must hold exactly one queue.
    pub(crate) fn new(activation: Activation, server: S) -> Result<Self, ActivateError> {
        let [queue] = device_queues(activation.queues, activation.features)?;
        Ok(SingleQueueHandler {
            memory: activation.memory,
            interrupt: activation.interrupt,
            queue,
            server,
            throttle: None,
        })
    }

    /// Serves requests only as fast as `limiter` allows.
    pub(crate) fn with_limiter(mut self, limiter: SharedLimiter) -> Result<Self, ActivateError> {
        self.throttle = Some(Throttle::new(limiter).map_err(WorkerError::Timer)?);
        Ok(self)
    }

    /// What serves the chains, to replace while the handler is paused.
    pub(crate) fn server_mut(&mut self) -> &mut S {
        &mut self.server
    }

    fn serve(&mut self) {
        let (memory, server) = (&self.memory, &mut self.server);
        let Some(throttle) = self.throttle.as_mut().filter(|t| t.is_limited()) else {
            self.queue
                .process(memory, self.interrupt.as_ref(), |chain| {
                    server.serve(memory, chain).0
                });
            return;
        };
        if throttle.is_waiting() {
            return;
        }
        self.queue
            .process_until(memory, self.interrupt.as_ref(), |chain| {
                let paid = server.data_bytes(&chain);
                if !throttle.admit(paid) {
                    return None;
                }
                let (used, moved) = server.serve(memory, chain);
                throttle.settle(paid, moved);
                Some(used)
            });
    }
}

impl<S> QueuePositions for SingleQueueHandler<S> {
    fn positions(&self) -> Vec<QueuePosition> {
        vec![self.queue.position()]
    }
}

impl<S: ChainServer> EventHandler for SingleQueueHandler<S> {
    fn register(&mut self, events: &EventLoop) -> io::Result<()> {
        events.watch(&self.queue.kick, QUEUE_KICK)?;
        if let Some(throttle) = &self.throttle {
            throttle.register(events, LIMIT_TIMER)?;
        }
        Ok(())
    }

    fn start(&mut self, _events: &EventLoop) {
        self.serve();
    }

    fn handle_event(&mut self, _events: &EventLoop, token: u64) {
        match (token, self.throttle.as_mut()) {
            (LIMIT_TIMER, Some(throttle)) => throttle.expired(),
            _ => self.queue.clear_kick(),
        }
        self.serve();
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::QueueT;

    use super::*;
    use crate::testing::{TestQueue, test_memory};
    use crate::worker::feature;

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

    /// Claims no bytes up front but reports `moved` after serving: a guest that changed its
    /// descriptors between the two looks.
    struct Understated {
        moved: u64,
    }

    impl ChainServer for Understated {
        fn serve(&mut self, _memory: &GuestMemoryMmap, _chain: Chain<'_>) -> (u32, u64) {
            (0, self.moved)
        }

        fn data_bytes(&self, _chain: &Chain<'_>) -> u64 {
            0
        }
    }

    #[test]
    fn what_a_request_really_moved_is_charged() {
        use std::time::{Duration, Instant};

        use crate::rate_limiter::{BucketConfig, RateLimit};
        use crate::testing::{RecordingInterrupt, activation, assert_within_5_percent, writable};
        use crate::worker::WorkerSlot;

        // 10 kB/s, a 1000-byte bucket; each request moves 1000 bytes it did not pay for. The
        // first two go at once (the second one into debt), then one per 100 ms: 12 take 1 s.
        let limit = RateLimit {
            bandwidth: Some(BucketConfig {
                size: 1000,
                one_time_burst: 0,
                refill_time: Duration::from_millis(100),
            }),
            ops: None,
        };
        let mem = test_memory();
        let tq = TestQueue::new(&mem, 16);
        let active = tq.active_queue(0);
        let kick = active.kick.try_clone().unwrap();
        let interrupt = Arc::new(RecordingInterrupt::default());
        tq.add_chain(&[writable(0x10_000, 8)]);
        for _ in 1..12 {
            tq.publish(&mem, 0);
        }
        let mut slot = WorkerSlot::new("understated".to_string());
        let start = Instant::now();
        slot.start(|| {
            SingleQueueHandler::new(
                activation(&mem, &interrupt, vec![active], 0),
                Understated { moved: 1000 },
            )?
            .with_limiter(SharedLimiter::new(limit))
        })
        .unwrap();
        kick.write(1).unwrap();
        while tq.used(&mem).len() < 12 && start.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_within_5_percent(start.elapsed(), Duration::from_secs(1));
        slot.stop();
    }
}

//! A disk's request queues: one worker thread per queue (VIRTIO_BLK_F_MQ), each serving its
//! queue on the sync engine or on its own io_uring.

use std::io;
use std::sync::Arc;

use super::engine::{IoEngine, SharedRing};
use super::request::DiskImage;
use super::uring::UringHandler;
use super::{DiskServer, NEXT_BLOCK_INDEX};
use crate::device::{ActivateError, Activation, ActiveQueue, PauseError};
use crate::snapshot::{QueuePosition, SnapshotError};
use crate::worker::{
    EventHandler, EventLoop, QueuePositions, SharedLimiter, SingleQueueHandler, WorkerSlot,
};

/// The data plane of one queue.
pub(crate) enum QueueWorker {
    Sync(SingleQueueHandler<DiskServer>),
    Uring(UringHandler),
}

impl QueueWorker {
    /// Serves `disk` from now on; only while paused, with nothing in flight.
    fn set_disk(&mut self, disk: Arc<DiskImage>) {
        match self {
            QueueWorker::Sync(handler) => handler.server_mut().0 = disk,
            QueueWorker::Uring(handler) => handler.disk = disk,
        }
    }
}

impl QueuePositions for QueueWorker {
    fn positions(&self) -> Vec<QueuePosition> {
        match self {
            QueueWorker::Sync(h) => h.positions(),
            QueueWorker::Uring(h) => vec![h.position()],
        }
    }
}

impl EventHandler for QueueWorker {
    fn register(&mut self, events: &EventLoop) -> io::Result<()> {
        match self {
            QueueWorker::Sync(h) => h.register(events),
            QueueWorker::Uring(h) => h.register(events),
        }
    }

    fn start(&mut self, events: &EventLoop) {
        match self {
            QueueWorker::Sync(h) => h.start(events),
            QueueWorker::Uring(h) => h.start(events),
        }
    }

    fn handle_event(&mut self, events: &EventLoop, token: u64) {
        match self {
            QueueWorker::Sync(h) => h.handle_event(events, token),
            QueueWorker::Uring(h) => h.handle_event(events, token),
        }
    }

    fn quiesce(&mut self) {
        match self {
            QueueWorker::Sync(h) => h.quiesce(),
            QueueWorker::Uring(h) => h.quiesce(),
        }
    }
}

/// The workers of a disk's queues, their threads spawned with the device, and the rings of the
/// io_uring engine, kept across resets (the worker threads may not create rings).
#[derive(Debug)]
pub(crate) struct QueueWorkers {
    slots: Vec<WorkerSlot<QueueWorker>>,
    /// One per queue with the io_uring engine, none with the sync engine.
    rings: Vec<SharedRing>,
}

impl QueueWorkers {
    /// `queues` idle workers (threads virtio-blkN, virtio-blkNq1, ...) over `rings`.
    pub(crate) fn new(queues: u16, rings: Vec<SharedRing>) -> Self {
        let index = NEXT_BLOCK_INDEX.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let slots = (0..queues)
            .map(|q| match q {
                0 => WorkerSlot::new(format!("virtio-blk{index}")),
                _ => WorkerSlot::new(format!("virtio-blk{index}q{q}")),
            })
            .collect();
        QueueWorkers { slots, rings }
    }

    pub(crate) fn engine(&self) -> IoEngine {
        if self.rings.is_empty() {
            IoEngine::Sync
        } else {
            IoEngine::IoUring
        }
    }

    pub(crate) fn is_active(&self) -> bool {
        self.slots.iter().any(WorkerSlot::is_active)
    }

    /// Whether some worker is paused (and so takes a new disk before it resumes).
    pub(crate) fn any_paused(&mut self) -> bool {
        self.slots.iter_mut().any(|s| s.paused_mut().is_some())
    }

    /// Starts a worker for each queue the driver made ready (a driver may use fewer queues
    /// than offered, e.g. one per vCPU).
    pub(crate) fn start(
        &mut self,
        activation: Activation,
        disk: &Arc<DiskImage>,
        limiter: &SharedLimiter,
    ) -> Result<(), ActivateError> {
        self.start_as(activation, disk, limiter, false)
    }

    /// [`Self::start`] for a restored device: every worker is built paused, serving nothing
    /// until [`Self::resume`].
    pub(crate) fn start_paused(
        &mut self,
        activation: Activation,
        disk: &Arc<DiskImage>,
        limiter: &SharedLimiter,
    ) -> Result<(), ActivateError> {
        self.start_as(activation, disk, limiter, true)
    }

    /// The positions of every paused worker's queue, for a snapshot; an error while one runs.
    pub(crate) fn saved_positions(
        &self,
        device_type: u32,
    ) -> Result<Vec<QueuePosition>, SnapshotError> {
        let mut positions = Vec::new();
        for slot in &self.slots {
            positions.extend(slot.saved_positions(device_type)?);
        }
        Ok(positions)
    }

    fn start_as(
        &mut self,
        activation: Activation,
        disk: &Arc<DiskImage>,
        limiter: &SharedLimiter,
        paused: bool,
    ) -> Result<(), ActivateError> {
        if self.is_active() {
            return Err(ActivateError::AlreadyActive);
        }
        let Activation {
            memory,
            interrupt,
            queues,
            features,
        } = activation;
        let got = queues.len();
        let want = self.slots.len();
        if got == 0 || got > want {
            return Err(ActivateError::QueueCount { got, want });
        }
        let result = queues.into_iter().try_for_each(|queue: ActiveQueue| {
            let index = usize::from(queue.index);
            let one = Activation {
                memory: memory.clone(),
                interrupt: Arc::clone(&interrupt),
                queues: vec![queue],
                features,
            };
            let ring = self.rings.get(index).cloned();
            let slot = self
                .slots
                .get_mut(index)
                .ok_or(ActivateError::QueueCount { got, want })?;
            let disk = Arc::clone(disk);
            let limiter = limiter.clone();
            let build = || {
                Ok(match ring {
                    Some(ring) => QueueWorker::Uring(
                        UringHandler::new(one, disk, ring)?.with_limiter(limiter)?,
                    ),
                    None => QueueWorker::Sync(
                        SingleQueueHandler::new(one, DiskServer(disk))?.with_limiter(limiter)?,
                    ),
                })
            };
            if paused {
                slot.start_paused(build)
            } else {
                slot.start(build)
            }
        });
        if result.is_err() {
            // Whatever started goes, so the driver's reset finds a stopped device.
            self.stop();
        }
        result
    }

    pub(crate) fn stop(&mut self) {
        self.slots.iter_mut().for_each(WorkerSlot::stop);
    }

    pub(crate) fn pause(&mut self) -> Result<(), PauseError> {
        for slot in &mut self.slots {
            slot.pause()?;
        }
        Ok(())
    }

    pub(crate) fn resume(&mut self) -> Result<(), PauseError> {
        for slot in &mut self.slots {
            slot.resume()?;
        }
        Ok(())
    }

    /// Has every paused worker serve `disk` when it resumes.
    pub(crate) fn set_disk(&mut self, disk: &Arc<DiskImage>) {
        for slot in &mut self.slots {
            if let Some(worker) = slot.paused_mut() {
                worker.set_disk(Arc::clone(disk));
            }
        }
    }
}

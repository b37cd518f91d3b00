//! [`WorkerSlot`]: where a device keeps its worker, from activation through pauses to reset.

use std::sync::mpsc::{Receiver, channel};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{EventHandler, EventLoop, KILL_TOKEN, WorkerError, run};
use crate::device::ActivateError;
use crate::snapshot::{QueuePosition, SnapshotError};
use crate::thread::DeviceThread;

/// A device's data plane and the thread it runs on. The thread is spawned with the device
/// (before the guest runs) and named after it (virtio-blk0, ...); the handler runs on it from
/// `start` until `pause` or `stop`. A paused handler is kept here, queues and pending data
/// included, until `resume` runs it again or `stop` drops it.
pub(crate) struct WorkerSlot<H> {
    thread: DeviceThread,
    state: State<H>,
}

enum State<H> {
    Idle,
    Running {
        kill: EventFd,
        /// Where the event loop hands the handler back when it returns.
        handback: Receiver<H>,
    },
    Paused(H),
}

impl<H> std::fmt::Debug for WorkerSlot<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            State::Idle => "idle",
            State::Running { .. } => "running",
            State::Paused(_) => "paused",
        };
        f.debug_struct("WorkerSlot")
            .field("thread", &self.thread.name())
            .field("state", &state)
            .finish()
    }
}

impl<H: EventHandler> WorkerSlot<H> {
    pub(crate) fn new(name: String) -> Self {
        WorkerSlot {
            thread: DeviceThread::spawn(name),
            state: State::Idle,
        }
    }

    /// Whether a data plane was started and not stopped (running or paused).
    pub(crate) fn is_active(&self) -> bool {
        !matches!(self.state, State::Idle)
    }

    /// The paused handler, for a look at its state (tests, snapshots).
    pub(crate) fn paused(&self) -> Option<&H> {
        match &self.state {
            State::Paused(handler) => Some(handler),
            _ => None,
        }
    }

    /// The paused handler, to change what it serves before it resumes (a new disk image).
    pub(crate) fn paused_mut(&mut self) -> Option<&mut H> {
        match &mut self.state {
            State::Paused(handler) => Some(handler),
            _ => None,
        }
    }

    /// Runs the handler `build` makes on the device thread; `build` is the device-specific
    /// part of `activate`. An active device refuses before `build` runs, so a repeated
    /// activation neither looks at the new queues nor disturbs the running worker.
    pub(crate) fn start(
        &mut self,
        build: impl FnOnce() -> Result<H, ActivateError>,
    ) -> Result<(), ActivateError> {
        if self.is_active() {
            return Err(ActivateError::AlreadyActive);
        }
        let handler = build()?;
        self.launch(handler)?;
        Ok(())
    }

    /// [`Self::start`] for a restored device: keeps the handler `build` makes as if paused, so
    /// it serves nothing until [`Self::resume`].
    pub(crate) fn start_paused(
        &mut self,
        build: impl FnOnce() -> Result<H, ActivateError>,
    ) -> Result<(), ActivateError> {
        if self.is_active() {
            return Err(ActivateError::AlreadyActive);
        }
        self.state = State::Paused(build()?);
        Ok(())
    }

    /// Registers `handler`'s fds in a fresh event loop on the calling thread (so errors reach
    /// the caller), then runs the loop on the device thread.
    fn launch(&mut self, mut handler: H) -> Result<(), WorkerError> {
        let events = EventLoop::new()?;
        let kill = EventFd::new(EFD_NONBLOCK).map_err(WorkerError::KillEvent)?;
        events
            .watch(&kill, KILL_TOKEN)
            .map_err(WorkerError::Watch)?;
        handler.register(&events).map_err(WorkerError::Watch)?;
        let (handback_tx, handback) = channel();
        if cfg!(fuzzing) {
            // Fuzzing builds serve the first pass on the calling thread and stop: a worker
            // racing the harness would change the coverage libFuzzer steers by from run to
            // run, and CI's fixed-seed fuzzing must give the same answer twice.
            kill.write(1).map_err(WorkerError::Kill)?;
            let _ = handback_tx.send(run(events, handler));
            self.state = State::Running { kill, handback };
            return Ok(());
        }
        self.thread.run(move || {
            // The receiver goes only with the slot, which waits for this job first.
            let _ = handback_tx.send(run(events, handler));
        })?;
        self.state = State::Running { kill, handback };
        Ok(())
    }

    /// Ends the event loop and takes the handler back; nothing to do unless running.
    fn halt(&mut self) -> Result<Option<H>, WorkerError> {
        let State::Running { kill, .. } = &self.state else {
            return Ok(None);
        };
        // Without the kill event the loop would never return; waiting would hang, so the
        // worker stays as it is.
        kill.write(1).map_err(WorkerError::Kill)?;
        self.thread.wait();
        let State::Running { handback, .. } = std::mem::replace(&mut self.state, State::Idle)
        else {
            unreachable!("checked above");
        };
        handback
            .try_recv()
            .map(Some)
            .map_err(|_| WorkerError::Lost(self.thread.name().to_string()))
    }

    /// Stops the data plane after the chain or frame in hand and keeps the handler until
    /// [`Self::resume`]. Nothing to do unless running.
    pub(crate) fn pause(&mut self) -> Result<(), WorkerError> {
        if let Some(handler) = self.halt()? {
            self.state = State::Paused(handler);
        }
        Ok(())
    }

    /// Runs the paused handler again; it first serves whatever arrived meanwhile. Nothing to
    /// do unless paused. On failure the handler is gone and the device needs a reset.
    pub(crate) fn resume(&mut self) -> Result<(), WorkerError> {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Paused(handler) => self.launch(handler),
            other => {
                self.state = other;
                Ok(())
            }
        }
    }

    /// Ends the data plane (running or paused) and drops it. Nothing to do when none runs: a
    /// reset may come in any state.
    pub(crate) fn stop(&mut self) {
        if let Err(e) = self.halt() {
            log::error!("{}: {e}", self.thread.name());
            return;
        }
        self.state = State::Idle;
    }
}

/// A handler that can say where its queues stand, for snapshots.
pub(crate) trait QueuePositions {
    fn positions(&self) -> Vec<QueuePosition>;
}

impl<H: EventHandler + QueuePositions> WorkerSlot<H> {
    /// The positions of the paused handler's queues; none when no data plane was started. A
    /// running handler is not looked at: its queues move.
    pub(crate) fn saved_positions(
        &self,
        device_type: u32,
    ) -> Result<Vec<QueuePosition>, SnapshotError> {
        match &self.state {
            State::Idle => Ok(Vec::new()),
            State::Running { .. } => Err(SnapshotError::NotPaused { device_type }),
            State::Paused(handler) => Ok(handler.positions()),
        }
    }
}

impl<H> Drop for WorkerSlot<H> {
    fn drop(&mut self) {
        if let State::Running { kill, .. } = &self.state {
            if kill.write(1).is_ok() {
                self.thread.wait();
            }
        }
    }
}

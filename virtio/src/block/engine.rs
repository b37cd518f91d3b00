//! How a disk is served: [`BlockOptions`] (engine, O_DIRECT, queues, queue size) and the
//! io_uring instances of the io_uring engine.
//!
//! A ring is created with its device, before the guest runs and before any sandbox is
//! installed: device threads may not call io_uring_setup (nor io_uring_register), only
//! io_uring_enter. Each ring is created disabled, gets its completion eventfd and a
//! restriction to the three operations the engine submits (READV, WRITEV, FSYNC), and only then
//! is enabled: a thread that can submit to it cannot make the kernel open, connect or read
//! anything else through it, which seccomp would not see.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use io_uring::{IoUring, opcode, register::Restriction};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// The largest queue size `queue_size=` takes; also the most requests one ring holds.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// The smallest: room for a request's header, a data buffer and its status.
pub const MIN_QUEUE_SIZE: u16 = 4;
/// The most request queues `queues=` takes.
pub const MAX_QUEUES: u16 = 16;

/// What does a disk's I/O.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// preadv/pwritev/fdatasync on the queue's worker thread, one request at a time.
    #[default]
    Sync,
    /// An io_uring per queue: the requests of a kick are submitted in one io_uring_enter and
    /// complete in any order.
    IoUring,
}

/// How a disk is served; [`Default`] is one synchronous queue of 256 on the page cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockOptions {
    pub engine: IoEngine,
    /// O_DIRECT: bypass the host page cache.
    pub direct: bool,
    /// Request queues (VIRTIO_BLK_F_MQ when more than one), each with its own worker thread.
    pub queues: u16,
    /// Descriptors per queue: a power of two in [`MIN_QUEUE_SIZE`]..=[`MAX_QUEUE_SIZE`].
    pub queue_size: u16,
}

impl Default for BlockOptions {
    fn default() -> Self {
        BlockOptions {
            engine: IoEngine::Sync,
            direct: false,
            queues: 1,
            queue_size: super::QUEUE_SIZE,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    #[error("queues={0}: use 1 to {MAX_QUEUES}")]
    Queues(u16),
    #[error("queue_size={0}: use a power of two from {MIN_QUEUE_SIZE} to {MAX_QUEUE_SIZE}")]
    QueueSize(u16),
}

impl BlockOptions {
    /// Refuses a queue count or size the device cannot serve.
    pub fn validate(&self) -> Result<(), OptionsError> {
        if !(1..=MAX_QUEUES).contains(&self.queues) {
            return Err(OptionsError::Queues(self.queues));
        }
        if !(MIN_QUEUE_SIZE..=MAX_QUEUE_SIZE).contains(&self.queue_size)
            || !self.queue_size.is_power_of_two()
        {
            return Err(OptionsError::QueueSize(self.queue_size));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error(
        "the host kernel refuses io_uring ({0}); it may be disabled \
         (sysctl kernel.io_uring_disabled) or filtered: use engine=sync"
    )]
    Setup(io::Error),
    #[error("cannot create the io_uring completion eventfd: {0}")]
    EventFd(io::Error),
    #[error("cannot set up the io_uring (register {what}): {source}")]
    Register {
        what: &'static str,
        source: io::Error,
    },
}

/// One queue's io_uring and the eventfd the kernel signals on each completion.
pub(crate) struct Ring {
    pub(crate) uring: IoUring,
    pub(crate) completion: EventFd,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("entries", &self.uring.params().sq_entries())
            .finish()
    }
}

/// A ring shared by the device, which keeps it across resets, and the worker serving it.
pub(crate) type SharedRing = Arc<Mutex<Ring>>;

/// Locks a ring; a poisoned lock still holds a usable ring (its state is the kernel's).
pub(crate) fn lock(ring: &SharedRing) -> MutexGuard<'_, Ring> {
    ring.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ring {
    /// A restricted ring of `entries` submissions (its completion queue holds twice that, so
    /// a full queue's completions always fit).
    pub(crate) fn new(entries: u16) -> Result<Self, RingError> {
        let uring = IoUring::builder()
            .setup_r_disabled()
            .build(u32::from(entries))
            .map_err(RingError::Setup)?;
        let completion = EventFd::new(EFD_NONBLOCK).map_err(RingError::EventFd)?;
        let register = |what, result: io::Result<()>| {
            result.map_err(|source| RingError::Register { what, source })
        };
        let submitter = uring.submitter();
        register(
            "eventfd",
            submitter.register_eventfd(completion_fd(&completion)),
        )?;
        let mut allowed = [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
        ];
        register(
            "restrictions",
            submitter.register_restrictions(&mut allowed),
        )?;
        register("enable", submitter.register_enable_rings())?;
        Ok(Ring { uring, completion })
    }

    /// `count` rings of `entries` for a device's queues, as shared rings.
    pub(crate) fn for_queues(count: u16, entries: u16) -> Result<Vec<SharedRing>, RingError> {
        (0..count)
            .map(|_| Ring::new(entries).map(|ring| Arc::new(Mutex::new(ring))))
            .collect()
    }
}

fn completion_fd(eventfd: &EventFd) -> std::os::fd::RawFd {
    use std::os::fd::AsRawFd;
    eventfd.as_raw_fd()
}

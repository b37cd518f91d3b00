//! Two [`Interrupt`]s for tests: one that counts, one that an eventfd per queue carries.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::eventually;
use crate::device::Interrupt;

/// How long [`EventInterrupt::wait`] waits for an interrupt before it reports none.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(10);

/// An [`Interrupt`] that counts notifications per queue and config changes.
#[derive(Debug, Default)]
pub struct RecordingInterrupt {
    queue_counts: Mutex<Vec<u32>>,
    config_count: Mutex<u32>,
    /// With `Some(n)`, a notification for queue n or above panics: the device signalled a queue
    /// it was never given.
    queues: Option<u16>,
}

impl RecordingInterrupt {
    /// One for a device given `queues` queues, which panics on a notification for any other.
    pub fn for_queues(queues: u16) -> Self {
        RecordingInterrupt {
            queues: Some(queues),
            ..Default::default()
        }
    }

    pub fn count(&self, queue: u16) -> u32 {
        let counts = self.queue_counts.lock().unwrap();
        counts.get(usize::from(queue)).copied().unwrap_or(0)
    }

    pub fn config_count(&self) -> u32 {
        *self.config_count.lock().unwrap()
    }

    /// Waits up to two seconds for the count of `queue` to reach `want`.
    pub fn wait_for(&self, queue: u16, want: u32) -> bool {
        eventually(|| self.count(queue) >= want)
    }
}

impl Interrupt for RecordingInterrupt {
    fn notify_queue(&self, queue: u16) -> io::Result<()> {
        if let Some(queues) = self.queues {
            assert!(
                queue < queues,
                "interrupt for queue {queue}, which the device was never given"
            );
        }
        let mut counts = self.queue_counts.lock().unwrap();
        let i = usize::from(queue);
        if counts.len() <= i {
            counts.resize(i + 1, 0);
        }
        counts[i] += 1;
        Ok(())
    }

    fn notify_config(&self) -> io::Result<()> {
        *self.config_count.lock().unwrap() += 1;
        Ok(())
    }
}

/// An [`Interrupt`] that writes one eventfd per queue, as KVM irqfds (or MSI-X vectors) would;
/// a vhost backend gets the eventfds themselves through `queue_irqfd`. The test waits on them.
#[derive(Debug)]
pub struct EventInterrupt {
    queues: Vec<EventFd>,
}

impl EventInterrupt {
    pub fn new(queues: usize) -> Arc<Self> {
        let queues = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK).expect("interrupt eventfd"))
            .collect();
        Arc::new(EventInterrupt { queues })
    }

    /// Waits until `queue`'s interrupt fired and consumes it; false after [`WAIT_TIMEOUT`]
    /// without one.
    pub fn wait(&self, queue: u16) -> bool {
        let fd = &self.queues[usize::from(queue)];
        let mut pollfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout_ms = WAIT_TIMEOUT.as_millis() as libc::c_int;
        loop {
            // SAFETY: poll reads and writes the one pollfd we own, for the duration of the call.
            match unsafe { libc::poll(&mut pollfd, 1, timeout_ms) } {
                1 => break,
                0 => return false,
                _ => {
                    let err = io::Error::last_os_error();
                    assert_eq!(err.kind(), io::ErrorKind::Interrupted, "poll: {err}");
                }
            }
        }
        fd.read().expect("read the interrupt eventfd");
        true
    }
}

impl Interrupt for EventInterrupt {
    fn notify_queue(&self, queue: u16) -> io::Result<()> {
        match self.queues.get(usize::from(queue)) {
            Some(fd) => fd.write(1),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no interrupt eventfd for queue {queue}"),
            )),
        }
    }

    fn notify_config(&self) -> io::Result<()> {
        Ok(())
    }

    fn queue_irqfd(&self, queue: u16) -> Option<EventFd> {
        self.queues.get(usize::from(queue))?.try_clone().ok()
    }
}

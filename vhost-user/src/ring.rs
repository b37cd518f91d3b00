//! Serving a vring the library keeps with pvm-virtio's [`DeviceQueue`] logic (notification
//! suppression, chains-per-pass bound, a broken ring stopped rather than trusted).
//!
//! The library owns each ring's `Queue` (it configures it from the frontend's messages and
//! reads its position for GET_VRING_BASE); a backend keeps a [`DeviceQueue`] per ring and, for
//! the time it serves the ring, swaps the library's `Queue` into it under the vring's write
//! lock, so no message sees the ring half-served.

use std::fmt;

use pvm_virtio::{DeviceQueue, Interrupt};
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vmm_sys_util::event::EventNotifier;

use crate::Vring;

/// A vring's call eventfd as pvm-virtio's interrupt.
struct Call<'a>(Option<&'a EventNotifier>);

impl fmt::Debug for Call<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Call(eventfd)"
        } else {
            "Call(none)"
        })
    }
}

impl Interrupt for Call<'_> {
    fn notify_queue(&self, _queue: u16) -> std::io::Result<()> {
        match self.0 {
            Some(call) => call.notify(),
            // No call fd: the frontend polls.
            None => Ok(()),
        }
    }

    fn notify_config(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `serve` with `queue` holding `vring`'s ring and its call fd as the interrupt; None (and
/// `serve` does not run) while the ring is not started and enabled.
pub(crate) fn with_ring<R>(
    vring: &Vring,
    queue: &mut DeviceQueue,
    serve: impl FnOnce(&mut DeviceQueue, &dyn Interrupt) -> R,
) -> Option<R> {
    let mut state = vring.get_mut();
    if !state.get_queue().ready() || !state.is_enabled() {
        return None;
    }
    std::mem::swap(state.get_queue_mut(), &mut queue.queue);
    let result = {
        let call = Call(state.get_call().as_ref());
        serve(queue, &call)
    };
    std::mem::swap(state.get_queue_mut(), &mut queue.queue);
    Some(result)
}

/// A [`DeviceQueue`] to swap rings into; `wake` is what a long pass signals to come back.
pub(crate) fn device_queue(
    index: u16,
    max_size: u16,
    wake: vmm_sys_util::eventfd::EventFd,
) -> std::io::Result<DeviceQueue> {
    let queue = virtio_queue::Queue::new(max_size)
        .map_err(|e| std::io::Error::other(format!("queue {index}: {e}")))?;
    Ok(DeviceQueue::from_queue(index, queue, wake))
}

//! Receiving from a tap: the [`FillSource`] that feeds a receive queue from a tap queue, shared
//! by pvm's in-process queue pairs and pvm's vhost-user net backend.

use std::io;
use std::sync::atomic::Ordering;

use log::warn;
use vm_memory::GuestMemoryMmap;

use super::multiqueue::PairLink;
use super::{
    Delivery, MAX_FRAME_LEN, NetBackend, NetCounters, VNET_HDR_LEN, deliver_frame, read_frame,
};
use crate::worker::{DeviceQueue, FillSource, FillStep, Throttle};

/// One frame read from the tap, kept while it waits for guest buffers: part of a queue pair's
/// state, so a pause or a full receive queue loses no frame.
#[derive(Debug)]
pub struct PendingFrame {
    buf: Vec<u8>,
    /// The length of the frame waiting in `buf`, if one is.
    len: Option<usize>,
    /// Whether the waiting frame was already taken from the rate limiter (it then only waits
    /// for buffers and is not counted again).
    paid: bool,
}

impl Default for PendingFrame {
    fn default() -> Self {
        PendingFrame {
            buf: vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN],
            len: None,
            paid: false,
        }
    }
}

impl PendingFrame {
    /// The length (vnet header included) of the frame waiting for guest buffers, if any.
    pub fn waiting(&self) -> Option<usize> {
        self.len
    }
}

/// A tap queue as the source of a receive queue's [`DeviceQueue::fill`] loop: a frame is read
/// only when the guest has posted buffers, and one that does not fit yet stays in the
/// [`PendingFrame`].
pub struct TapSource<'a> {
    tap: &'a dyn NetBackend,
    pending: &'a mut PendingFrame,
    mergeable: bool,
    counters: &'a NetCounters,
    /// Multiqueue: the pair's on/off switch; a read that fails because the pair was just
    /// turned off (its tap queue detached) is not a tap failure.
    link: Option<&'a PairLink>,
    /// The receive rate limiter: a frame it refuses waits in the [`PendingFrame`].
    throttle: Option<&'a mut Throttle>,
}

impl<'a> TapSource<'a> {
    /// `mergeable`: the driver accepted VIRTIO_NET_F_MRG_RXBUF.
    pub fn new(
        tap: &'a dyn NetBackend,
        pending: &'a mut PendingFrame,
        mergeable: bool,
        counters: &'a NetCounters,
    ) -> Self {
        TapSource {
            tap,
            pending,
            mergeable,
            counters,
            link: None,
            throttle: None,
        }
    }

    pub(crate) fn with_throttle(mut self, throttle: Option<&'a mut Throttle>) -> Self {
        self.throttle = throttle;
        self
    }

    pub(crate) fn with_link(mut self, link: &'a PairLink) -> Self {
        self.link = Some(link);
        self
    }

    /// Reads the next frame into the buffer, or says which step to report instead.
    fn read(&mut self) -> Result<usize, FillStep> {
        match read_frame(self.tap, &mut self.pending.buf) {
            Ok(len) if len >= VNET_HDR_LEN => Ok(len),
            Ok(_) => {
                // Too short to carry a vnet header; counts toward the pass budget so a backend
                // that keeps returning nothing cannot hold the worker.
                self.counters.rx_errors.fetch_add(1, Ordering::Relaxed);
                Err(FillStep::Skipped)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(FillStep::SourceEmpty),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(FillStep::Skipped),
            Err(_) if self.link.is_some_and(|link| !link.enabled()) => Err(FillStep::SourceFailed),
            Err(e) => {
                // Logged once; retried on the next event rather than spinning on it.
                if self.counters.rx_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    warn!("tap {}: read failed: {e}", self.tap.name());
                }
                Err(FillStep::SourceFailed)
            }
        }
    }
}

impl FillSource for TapSource<'_> {
    fn fill_one(&mut self, rx: &mut DeviceQueue, memory: &GuestMemoryMmap) -> FillStep {
        let len = match self.pending.len {
            Some(len) => len,
            None if !rx.has_available(memory) => return FillStep::NoBuffers,
            None => match self.read() {
                Ok(len) => len,
                Err(step) => return step,
            },
        };
        if let (Some(throttle), false) = (self.throttle.as_deref_mut(), self.pending.paid) {
            if !throttle.admit((len - VNET_HDR_LEN) as u64) {
                // The frame waits for the limiter's timer; nothing more is read meanwhile.
                self.pending.len = Some(len);
                return FillStep::SourceEmpty;
            }
            self.pending.paid = true;
        }
        let frame = &mut self.pending.buf[..len];
        match deliver_frame(rx, memory, frame, self.mergeable, self.counters) {
            Delivery::Delivered | Delivery::Dropped => {
                self.pending.len = None;
                self.pending.paid = false;
                FillStep::Moved
            }
            Delivery::NoBuffers => {
                self.pending.len = Some(len);
                FillStep::NoBuffers
            }
        }
    }
}

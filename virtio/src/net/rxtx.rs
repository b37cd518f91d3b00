//! Moving frames between virtqueues and the backend: plain functions over guest memory, a fd
//! and the counters, unit-tested with pvm_virtio::testing's queues and a socket pair.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use log::warn;
use vm_memory::{GuestMemoryMmap, Permissions};

use super::{MAX_FRAME_LEN, NetCounters, VNET_HDR_LEN};
use crate::chain::{Chain, ChainScratch, append_chain, split_chain, with_scratch};
use crate::worker::DeviceQueue;

/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Sends the device-readable part of one transmitq chain (vnet header + frame) to the backend
/// as one frame. Malformed chains and backend errors are counted and the frame dropped. Returns
/// the used length, always 0 as the device writes nothing into transmit buffers.
pub fn transmit(
    backend: &(impl AsRawFd + ?Sized),
    mem: &GuestMemoryMmap,
    chain: Chain<'_>,
    counters: &NetCounters,
) -> u32 {
    with_scratch(|scratch| transmit_with(backend, mem, chain, counters, scratch))
}

/// [`transmit`] with the buffers it fills (the worker thread's, reused between frames).
fn transmit_with(
    backend: &(impl AsRawFd + ?Sized),
    mem: &GuestMemoryMmap,
    chain: Chain<'_>,
    counters: &NetCounters,
    scratch: &mut ChainScratch,
) -> u32 {
    let ChainScratch { segments, io, .. } = scratch;
    let frame = match split_chain(chain, segments) {
        Ok(buffers) => buffers.readable,
        Err(e) => {
            count_malformed(counters, &e);
            return 0;
        }
    };
    let len = frame.len();
    if len < VNET_HDR_LEN as u64 || len > (VNET_HDR_LEN + MAX_FRAME_LEN) as u64 {
        count_malformed(counters, &format_args!("transmit frame of {len} bytes"));
        return 0;
    }
    let iovecs = match frame.iovecs(mem, Permissions::Read, io) {
        Ok(iovecs) => iovecs,
        Err(e) => {
            count_malformed(counters, &e);
            return 0;
        }
    };
    match iovecs.write_once(backend) {
        Ok(_) => {
            counters.tx_frames.fetch_add(1, Ordering::Relaxed);
            counters
                .tx_bytes
                .fetch_add(len - VNET_HDR_LEN as u64, Ordering::Relaxed);
        }
        Err(e) => {
            // Logged once; the counter tells how many followed.
            if counters.tx_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                warn!("virtio-net: cannot send a frame to the backend, dropping it: {e}");
            }
        }
    }
    0
}

fn count_malformed(counters: &NetCounters, what: &dyn std::fmt::Display) {
    if counters.tx_malformed.fetch_add(1, Ordering::Relaxed) == 0 {
        warn!("virtio-net: dropping malformed transmit chain: {what}");
    }
}

/// What became of a received frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// In the guest's buffers.
    Delivered,
    /// Not enough receive buffers right now; nothing was consumed, try again after a kick.
    NoBuffers,
    /// Can never fit (without mergeable buffers, the next chain is too small); counted.
    Dropped,
}

/// Copies one frame (`frame` starts with the 12-byte vnet header) into receiveq buffers. With
/// mergeable buffers the frame may span several chains and `num_buffers` says how many;
/// otherwise the next chain must hold the whole frame. A malformed receive chain stops the queue.
pub fn deliver_frame(
    rx: &mut DeviceQueue,
    mem: &GuestMemoryMmap,
    frame: &mut [u8],
    mergeable: bool,
    counters: &NetCounters,
) -> Delivery {
    with_scratch(|scratch| deliver_with(rx, mem, frame, mergeable, counters, scratch))
}

/// [`deliver_frame`] with the buffers it fills (the worker thread's, reused between frames).
fn deliver_with(
    rx: &mut DeviceQueue,
    mem: &GuestMemoryMmap,
    frame: &mut [u8],
    mergeable: bool,
    counters: &NetCounters,
    scratch: &mut ChainScratch,
) -> Delivery {
    // Every chain popped for this frame is appended to one segment list; `chains` says where.
    let ChainScratch {
        segments, chains, ..
    } = scratch;
    segments.clear();
    chains.clear();
    let mut capacity = 0u64;
    while capacity < frame.len() as u64 {
        let Some(chain) = rx.pop(mem) else {
            rx.unpop(chains.len() as u16);
            return Delivery::NoBuffers;
        };
        let head = chain.head_index();
        let layout = match append_chain(chain, segments) {
            Ok(layout) => layout,
            Err(e) => {
                rx.fail(&format_args!("malformed receive chain: {e}"));
                return Delivery::NoBuffers;
            }
        };
        let buffers = layout.buffers(segments);
        if !buffers.readable.is_empty() || buffers.writable.len() < VNET_HDR_LEN as u64 {
            rx.fail(&"receive chain too short for the header or with device-readable buffers");
            return Delivery::NoBuffers;
        }
        capacity += buffers.writable.len();
        chains.push((head, layout));
        if !mergeable && capacity < frame.len() as u64 {
            // Leave the chain for a smaller frame.
            rx.unpop(1);
            counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
            return Delivery::Dropped;
        }
    }

    // At most the queue size (<= 32768) chains were popped.
    let num_buffers = chains.len() as u16;
    frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&num_buffers.to_le_bytes());
    let mut offset = 0usize;
    for &(head, layout) in chains.iter() {
        let writable = layout.buffers(segments).writable;
        let take =
            (frame.len() - offset).min(usize::try_from(writable.len()).unwrap_or(usize::MAX));
        if let Err(e) = writable.write_from(mem, &frame[offset..offset + take]) {
            rx.fail(&format_args!("receive buffer outside guest memory: {e}"));
            counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
            return Delivery::Dropped;
        }
        rx.add_used(mem, head, take as u32);
        offset += take;
    }
    counters.rx_frames.fetch_add(1, Ordering::Relaxed);
    counters
        .rx_bytes
        .fetch_add((frame.len() - VNET_HDR_LEN) as u64, Ordering::Relaxed);
    Delivery::Delivered
}

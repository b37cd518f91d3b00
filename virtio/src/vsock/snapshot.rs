//! Snapshots of a vsock device. Connections are not saved, as in Firecracker: their host ends
//! are sockets of the old process. The restored device starts with none and, when it first
//! runs, puts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue: the guest driver then
//! resets every socket (its peers see ECONNRESET) and reads the guest CID again. The host-side
//! listener is the fresh device's own, bound by the VMM at `uds_path` when it built it.
//!
//! The kernel's vhost-vsock (pvm-vhost) restores the same way and sends the same reset with
//! [`send_transport_reset`], checking the saved state with [`check_state`].

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::desc::split::Descriptor;
use vm_memory::Bytes;

use super::packet::EVENT_TRANSPORT_RESET;
use super::worker::VsockWorker;
use super::{Vsock, data_plane};
use crate::device::{Activation, Interrupt};
use crate::snapshot::{
    DeviceState, QueuePosition, RestoreError, SavedDevice, SnapshotError, VsockState,
};
use crate::worker::{DeviceQueue, QueuePositions};
use vm_memory::GuestMemoryMmap;

const DEVICE: &str = "vsock";
/// struct virtio_vsock_event { le32 id; }
const EVENT_LEN: u32 = 4;

impl Vsock {
    pub(super) fn save_snapshot(&self) -> Result<SavedDevice, SnapshotError> {
        Ok(SavedDevice {
            state: DeviceState::Vsock(VsockState {
                guest_cid: self.cid,
            }),
            queues: self.worker.saved_positions(VIRTIO_ID_VSOCK)?,
        })
    }

    pub(super) fn restore_snapshot(
        &mut self,
        activation: Option<Activation>,
        state: &DeviceState,
    ) -> Result<(), RestoreError> {
        check_state(state, self.cid)?;
        let Some(activation) = activation else {
            // The driver never started the device: it has no sockets to reset.
            return Ok(());
        };
        let core = self.core();
        self.worker
            .start_paused(|| data_plane(core, activation, true))?;
        Ok(())
    }
}

/// Checks a saved vsock `state` against a fresh device whose guest CID is `cid`.
pub fn check_state(state: &DeviceState, cid: u64) -> Result<(), RestoreError> {
    let DeviceState::Vsock(saved) = state else {
        return Err(RestoreError::DeviceKind {
            saved: state.kind(),
            here: DEVICE,
        });
    };
    if saved.guest_cid != cid {
        return Err(RestoreError::Mismatch {
            device: DEVICE,
            what: "guest CID",
            saved: saved.guest_cid,
            here: cid,
        });
    }
    Ok(())
}

/// Puts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET into the next buffer of the event queue `event` and
/// interrupts the driver. False when the driver has no event buffer posted (its driver keeps
/// the queue filled; otherwise its next kick brings one): nothing was sent.
pub fn send_transport_reset(
    event: &mut DeviceQueue,
    memory: &GuestMemoryMmap,
    interrupt: &dyn Interrupt,
) -> bool {
    let Some(chain) = event.pop(memory) else {
        return false;
    };
    let head = chain.head_index();
    let written = chain
        .filter(Descriptor::is_write_only)
        .find(|desc| desc.len() >= EVENT_LEN)
        .and_then(|desc| {
            crate::dirty::mark_guest(memory, desc.addr(), EVENT_LEN as usize);
            memory
                .write_obj(EVENT_TRANSPORT_RESET.to_le(), desc.addr())
                .ok()
        })
        .map_or(0, |()| EVENT_LEN);
    if written == 0 {
        log::warn!("virtio-vsock: the guest's event buffer cannot take the transport reset");
    }
    event.add_used(memory, head, written);
    event.signal_used(memory, interrupt);
    true
}

impl QueuePositions for VsockWorker {
    fn positions(&self) -> Vec<QueuePosition> {
        [&self.rx, &self.tx, &self.event]
            .into_iter()
            .map(DeviceQueue::position)
            .collect()
    }
}

impl VsockWorker {
    /// Sends the transport reset a restored device owes, once the guest has an event buffer
    /// (its driver keeps the event queue filled; otherwise the next kick brings one).
    pub(super) fn send_pending_reset(&mut self) {
        if !self.reset_pending {
            return;
        }
        if send_transport_reset(&mut self.event, &self.memory, self.interrupt.as_ref()) {
            self.reset_pending = false;
        }
    }
}

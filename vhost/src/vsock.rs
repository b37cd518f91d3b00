//! Kernel vhost-vsock as the whole data plane of a virtio-vsock device: the kernel moves the
//! guest's packets (host processes use AF_VSOCK directly); pvm keeps the guest-visible device
//! (features, the CID in its config space) and the event queue, and programs the receive and
//! transmit rings like vhost-net's (calls relayed on virtio-mmio). A pause stops the kernel's
//! worker (VHOST_VSOCK_SET_RUNNING 0) and takes the rings' positions back; a reset hands the
//! instance back (RESET_OWNER), which drops every connection.
//!
//! Snapshots: the state is the guest CID and the three rings' positions (the kernel's from
//! the pause, the event queue's pvm's own). Connections are not saved (their host ends belong
//! to the old instance): a restored device claims the CID in a new instance, programs the
//! rings at the resume, and then puts a transport reset on the event queue, as the hybrid
//! vsock does, so the guest drops its stale sockets and reads the CID again.

use std::sync::Arc;

use pvm_virtio::data_plane::DataPlaneError;
use pvm_virtio::snapshot::{DeviceState, RestoreError, SavedDevice, SnapshotError, VsockState};
use pvm_virtio::thread::DeviceThread;
use pvm_virtio::{
    ActivateError, Activation, ActiveQueue, DeviceQueue, Interrupt, PauseError, VirtioDevice,
    read_config_bytes,
};
use vhost::VhostBackend;
use vhost::vhost_kern::vsock::Vsock as KernelVsock;
use vhost::vsock::VhostVsock as _;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_ACCESS_PLATFORM;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use vm_memory::GuestMemoryMmap;

use crate::kernel;
use crate::rings::{RingAddresses, Rings, Served, memory_table};

/// Where the kernel's vhost-vsock device lives.
pub const VHOST_VSOCK_PATH: &str = "/dev/vhost-vsock";
const PLANE: &str = "vhost-vsock";
const QUEUE_SIZE: u16 = 256;
/// The event queue: pvm keeps it (the kernel serves only receive and transmit).
const EVENT_QUEUE: u16 = 2;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{VHOST_VSOCK_PATH}: {0}")]
    Open(std::io::Error),
    #[error("{VHOST_VSOCK_PATH}: cannot read its features: {0}")]
    Features(std::io::Error),
    #[error("guest CID {cid}: {source}")]
    Cid { cid: u64, source: vhost::Error },
    #[error(
        "guest CID {cid} is in use by another VM on this host (a VM restored from the same \
         snapshot, or the one it was taken of, may still run)"
    )]
    CidInUse { cid: u64 },
}

impl Error {
    /// The kernel's answer to a CID another instance holds is EADDRINUSE.
    fn cid(cid: u64, source: vhost::Error) -> Self {
        match &source {
            vhost::Error::IoctlError(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
                Error::CidInUse { cid }
            }
            _ => Error::Cid { cid, source },
        }
    }
}

/// pvm's half of the device: the event queue, which the kernel does not serve.
struct EventQueue {
    queue: DeviceQueue,
    memory: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    /// A restored device owes the guest a transport reset, sent at its first resume.
    reset_pending: bool,
}

impl EventQueue {
    fn new(active: ActiveQueue, activation: (&GuestMemoryMmap, &Arc<dyn Interrupt>, u64)) -> Self {
        let (memory, interrupt, features) = activation;
        EventQueue {
            queue: DeviceQueue::new(active, features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0),
            memory: memory.clone(),
            interrupt: Arc::clone(interrupt),
            reset_pending: false,
        }
    }

    fn send_pending_reset(&mut self) {
        if !self.reset_pending {
            return;
        }
        let sent = pvm_virtio::vsock::send_transport_reset(
            &mut self.queue,
            &self.memory,
            self.interrupt.as_ref(),
        );
        if sent {
            self.reset_pending = false;
        } else {
            // pvm does not watch this queue's kicks; Linux keeps it filled from probe on.
            log::warn!("vhost-vsock: no event buffer for the transport reset after restore");
        }
    }
}

/// A virtio-vsock device served by the kernel.
pub struct VhostVsock {
    cid: u64,
    features: u64,
    vsock: KernelVsock<Arc<GuestMemoryMmap>>,
    relay_thread: DeviceThread,
    running: Option<Served>,
    /// The event queue while active: its buffers wait for a transport reset.
    event_queue: Option<EventQueue>,
}

impl std::fmt::Debug for VhostVsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostVsock")
            .field("cid", &self.cid)
            .field("features", &format_args!("{:#x}", self.features))
            .field("running", &self.running.is_some())
            .finish_non_exhaustive()
    }
}

impl VhostVsock {
    /// Opens a vhost-vsock instance for `memory` and claims guest CID `cid` on the host, now,
    /// before the sandbox and before the guest runs.
    pub fn new(cid: u64, memory: &GuestMemoryMmap) -> Result<Self, Error> {
        let vsock =
            kernel::opened(KernelVsock::new(Arc::new(memory.clone()))).map_err(Error::Open)?;
        let features = kernel::features(&vsock).map_err(Error::Features)?;
        vsock
            .set_guest_cid(cid)
            .map_err(|source| Error::cid(cid, source))?;
        Ok(VhostVsock {
            cid,
            features: features & !(1 << VIRTIO_F_ACCESS_PLATFORM),
            vsock,
            relay_thread: DeviceThread::spawn("vhost-vsock-relay".to_string()),
            running: None,
            event_queue: None,
        })
    }

    /// Owns the instance and programs it for the receive and transmit queues. With `paused`
    /// (a restore) the rings are only prepared: the resume programs and starts them.
    fn program(
        &mut self,
        memory: &GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
        started: &mut Vec<usize>,
        paused: bool,
    ) -> Result<Rings, DataPlaneError> {
        let refused = |request| move |e| DataPlaneError::request(PLANE, request, e);
        self.vsock.set_owner().map_err(refused("SET_OWNER"))?;
        self.vsock
            .set_features(features)
            .map_err(refused("SET_FEATURES"))?;
        self.vsock
            .set_mem_table(&memory_table(PLANE, memory, false)?)
            .map_err(refused("SET_MEM_TABLE"))?;
        let queues = queues.into_iter().enumerate().collect();
        let mut rings = Rings::new(
            PLANE,
            memory,
            queues,
            RingAddresses::Guest,
            interrupt,
            &mut self.relay_thread,
        )?;
        if paused {
            return Ok(rings);
        }
        let programmed = rings
            .program(&self.vsock, started)
            .and_then(|()| self.vsock.start().map_err(refused("SET_RUNNING")));
        if let Err(e) = programmed {
            rings.stop_relay(&mut self.relay_thread);
            return Err(e);
        }
        Ok(rings)
    }

    /// Stops the kernel's worker and hands the instance back, forgetting rings and owner.
    fn release(&mut self) {
        if let Err(e) = self.vsock.stop() {
            log::debug!("vhost-vsock: SET_RUNNING 0: {e}");
        }
        if let Err(e) = self.vsock.reset_owner() {
            log::warn!("vhost-vsock: RESET_OWNER: {e}");
        }
    }
}

impl VirtioDevice for VhostVsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.start(activation, false)
    }

    fn reset(&mut self) {
        if let Some(mut running) = self.running.take() {
            running.rings.stop_relay(&mut self.relay_thread);
            self.release();
        }
        self.event_queue = None;
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        let Some(running) = self.running.as_mut().filter(|r| !r.paused) else {
            return Ok(());
        };
        // Stopping the worker makes the ring positions final.
        self.vsock
            .stop()
            .map_err(|e| DataPlaneError::request(PLANE, "SET_RUNNING", e))?;
        running.rings.take_bases(&self.vsock)?;
        running.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), PauseError> {
        let Some(running) = self.running.as_mut().filter(|r| r.paused) else {
            return Ok(());
        };
        running.rings.program(&self.vsock, &mut Vec::new())?;
        self.vsock
            .start()
            .map_err(|e| DataPlaneError::request(PLANE, "SET_RUNNING", e))?;
        running.paused = false;
        if let Some(event) = self.event_queue.as_mut() {
            event.send_pending_reset();
        }
        Ok(())
    }

    fn save_state(&self) -> Result<SavedDevice, SnapshotError> {
        let state = DeviceState::Vsock(VsockState {
            guest_cid: self.cid,
        });
        let Some(running) = &self.running else {
            return Ok(SavedDevice {
                state,
                queues: Vec::new(),
            });
        };
        let mut queues = running.positions(VIRTIO_ID_VSOCK)?;
        queues.extend(self.event_queue.as_ref().map(|e| e.queue.position()));
        Ok(SavedDevice { state, queues })
    }

    fn restore(
        &mut self,
        activation: Option<Activation>,
        state: &DeviceState,
    ) -> Result<(), RestoreError> {
        pvm_virtio::vsock::check_state(state, self.cid)?;
        let Some(activation) = activation else {
            // The driver never started the device: it has no sockets to reset.
            return Ok(());
        };
        self.start(activation, true)?;
        if let Some(event) = self.event_queue.as_mut() {
            event.reset_pending = true;
        }
        Ok(())
    }
}

impl VhostVsock {
    /// Activation, or with `paused` a restore's: claims the instance and sets the rings up
    /// (programmed and running, or prepared for the resume); pvm keeps the event queue.
    fn start(&mut self, activation: Activation, paused: bool) -> Result<(), ActivateError> {
        if self.running.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let Activation {
            memory,
            interrupt,
            mut queues,
            features,
        } = activation;
        queues.sort_by_key(|q| q.index);
        if queues.len() != 3 || queues[2].index != EVENT_QUEUE {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: 3,
            });
        }
        let event = queues
            .pop()
            .map(|q| EventQueue::new(q, (&memory, &interrupt, features)));
        let mut started = Vec::new();
        match self.program(&memory, interrupt, queues, features, &mut started, paused) {
            Ok(rings) => {
                log::info!(
                    "vhost-vsock serves cid {} ({} relayed){}",
                    self.cid,
                    rings.relayed(),
                    if paused {
                        ", from a snapshot, paused"
                    } else {
                        ""
                    }
                );
                self.running = Some(Served { rings, paused });
                self.event_queue = event;
                Ok(())
            }
            Err(e) => {
                self.release();
                Err(e.into())
            }
        }
    }
}

impl Drop for VhostVsock {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cid_another_vm_holds_is_named_as_such() {
        let in_use = vhost::Error::IoctlError(std::io::Error::from_raw_os_error(libc::EADDRINUSE));
        let e = Error::cid(5, in_use);
        assert!(matches!(e, Error::CidInUse { cid: 5 }), "{e}");
        let text = e.to_string();
        assert!(
            text.starts_with("guest CID 5 is in use by another VM"),
            "{text}"
        );
        // Any other refusal keeps the kernel's answer.
        let other = vhost::Error::IoctlError(std::io::Error::from_raw_os_error(libc::EINVAL));
        let e = Error::cid(5, other);
        assert!(matches!(e, Error::Cid { cid: 5, .. }), "{e}");
        assert!(e.to_string().contains("os error 22"), "{e}");
    }
}

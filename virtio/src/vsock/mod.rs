//! virtio-vsock with Firecracker's hybrid Unix-socket semantics: the host side of every guest
//! connection is a Unix socket.
//!
//! - Host to guest: a host process connects to `uds_path`, writes `CONNECT <port>\n`, and once
//!   the guest's listener on `port` accepted, reads `OK <host_port>\n`; the socket then carries
//!   the connection's bytes.
//! - Guest to host: a guest connection to CID 2, port P, is connected to the Unix socket
//!   listening at `<uds_path>_<P>`.
//!
//! The listener is bound when the device is made (before the sandbox); the device thread
//! accepts on it and connects the guest's connections. A reset (driver reload) drops the worker
//! and with it every connection: host peers read EOF. See worker.rs for flow control, and
//! snapshot.rs for what a snapshot keeps (no connections: a transport reset on restore).

mod conn;
pub mod packet;
mod snapshot;
mod sock;
mod worker;

use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;

use crate::device::{ActivateError, Activation, PauseError, VirtioDevice};
use crate::snapshot::{DeviceState, RestoreError, SavedDevice, SnapshotError};
use crate::worker::{WorkerSlot, device_queues, feature, read_config_bytes};

pub use conn::BUF_ALLOC;
pub use snapshot::{check_state, send_transport_reset};
pub use sock::{ACCEPT_FLAGS, SOCKET_TYPE, accept, connect};
pub use worker::{MAX_CONNECTIONS, MAX_CONTROL, MAX_PAYLOAD};

pub const QUEUE_SIZE: u16 = 256;
/// The lowest CID a guest may have: 0 to 2 are the hypervisor, local and the host.
pub const MIN_GUEST_CID: u64 = 3;
/// CIDs are 32-bit on the socket API (`svm_cid`), and u32::MAX is VMADDR_CID_ANY.
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;
/// The device thread's name starts with this (then the device's index): the VMM gives that
/// thread the sandbox rules for its Unix sockets.
pub const THREAD_PREFIX: &str = "virtio-vsock";
static NEXT_VSOCK_INDEX: AtomicUsize = AtomicUsize::new(0);

const OFFERED_FEATURES: u64 = feature(VIRTIO_F_VERSION_1)
    | feature(VIRTIO_RING_F_EVENT_IDX)
    | feature(VIRTIO_RING_F_INDIRECT_DESC);

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is outside {MIN_GUEST_CID}..={MAX_GUEST_CID}")]
    Cid(u64),
    #[error("cannot listen on {}: {source}", .path.display())]
    Listen { path: PathBuf, source: io::Error },
}

/// A virtio-vsock device whose host side is Unix sockets.
#[derive(Debug)]
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    listener: Arc<UnixListener>,
    worker: WorkerSlot<worker::VsockWorker>,
}

impl Vsock {
    /// A device for a guest with CID `cid`, listening for host processes at `uds_path`
    /// (which must not exist).
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&cid) {
            return Err(VsockError::Cid(cid));
        }
        let listen = |source| VsockError::Listen {
            path: uds_path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(listen)?;
        listener.set_nonblocking(true).map_err(listen)?;
        let index = NEXT_VSOCK_INDEX.fetch_add(1, Ordering::Relaxed);
        Ok(Vsock {
            cid,
            uds_path: uds_path.to_path_buf(),
            listener: Arc::new(listener),
            worker: WorkerSlot::new(format!("{THREAD_PREFIX}{index}")),
        })
    }

    pub fn cid(&self) -> u64 {
        self.cid
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// A data plane's connection state, empty, over this device's listener.
    fn core(&self) -> worker::Core {
        worker::Core::new(self.cid, self.uds_path.clone(), self.listener.clone())
    }

    /// The open connections of a paused device (tests).
    #[cfg(test)]
    fn paused_connections(&self) -> Option<usize> {
        self.worker.paused().map(|w| w.core.connections())
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        OFFERED_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // guest_cid is read-only.
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let core = self.core();
        self.worker.start(|| data_plane(core, activation, false))
    }

    fn reset(&mut self) {
        self.worker.stop();
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        Ok(self.worker.pause()?)
    }

    fn resume(&mut self) -> Result<(), PauseError> {
        Ok(self.worker.resume()?)
    }

    fn save_state(&self) -> Result<SavedDevice, SnapshotError> {
        self.save_snapshot()
    }

    fn restore(
        &mut self,
        activation: Option<Activation>,
        state: &DeviceState,
    ) -> Result<(), RestoreError> {
        self.restore_snapshot(activation, state)
    }
}

/// The worker over `activation`'s queues; `reset_pending` for a restored device (snapshot.rs).
fn data_plane(
    core: worker::Core,
    activation: Activation,
    reset_pending: bool,
) -> Result<worker::VsockWorker, ActivateError> {
    let Activation {
        memory,
        interrupt,
        queues,
        features,
    } = activation;
    let [rx, tx, event] = device_queues(queues, features)?;
    Ok(worker::VsockWorker {
        memory,
        interrupt,
        rx,
        tx,
        event,
        core,
        reset_pending,
    })
}

#[cfg(test)]
mod tests;

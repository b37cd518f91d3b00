//! pvm's vhost-user backends: virtio devices served from a process of their own, for pvm or any
//! other VMM that speaks vhost-user.
//!
//! - [`net`]: a tap (IFF_VNET_HDR, offloads as negotiated, mergeable receive buffers,
//!   EVENT_IDX), binary `pvm-vhost-user-net`;
//! - [`block`]: a raw image file (IN/OUT/FLUSH/GET_ID/DISCARD/WRITE_ZEROES, read-only refusal),
//!   binary `pvm-vhost-user-blk`.
//!
//! The protocol is the `vhost-user-backend` crate's; the request logic is pvm-virtio's own
//! (chain validation, block requests, frame transmit and receive), so a guest sees the same
//! device whether pvm serves it in-process or through one of these backends. Each backend
//! serves one frontend connection and exits when the frontend goes away.

pub mod block;
pub mod cli;
pub mod net;
mod ring;
pub mod sandbox;

use std::os::fd::RawFd;
use std::path::Path;

use pvm_common::logger::to_stderr;
use vhost::vhost_user::{Error as ProtocolError, Listener};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

/// Guest memory as the backends see it: whatever the frontend's SET_MEM_TABLE mapped.
pub type Memory = GuestMemoryAtomic<GuestMemoryMmap>;
/// The vrings the library keeps for the backends.
pub type Vring = VringRwLock<Memory>;

/// The feature bit `bit` as a mask.
pub(crate) const fn feature(bit: u32) -> u64 {
    1 << bit
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {path}: {source}")]
    Listen { path: String, source: ProtocolError },
    /// The library's error (it implements Display but not std::error::Error).
    #[error("{0}")]
    Daemon(vhost_user_backend::Error),
    #[error("the backend's lock was poisoned by a panic")]
    Poisoned,
    #[error("the library started no vring worker")]
    NoWorker,
    #[error("cannot watch the backend's fds: {0}")]
    Watch(std::io::Error),
    #[error(transparent)]
    Sandbox(#[from] pvm_common::seccomp::Error),
}

/// The eventfd pair that ends a vring worker (the backends' `exit_event`).
pub(crate) fn exit_event() -> Option<(EventConsumer, EventNotifier)> {
    match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
        Ok(pair) => Some(pair),
        Err(e) => {
            log::error!("cannot create the vring worker's exit eventfd: {e}");
            None
        }
    }
}

/// A backend's own fds (the tap, wake-up eventfds) for the library's vring worker to watch,
/// with their events and tokens (above the queue tokens).
pub trait Watched {
    fn watched(&self) -> Vec<(RawFd, EventSet, u64)>;

    /// What the backend did, printed when its frontend has gone (e.g. frame counters).
    fn report(&self) -> Option<String> {
        None
    }
}

/// Listens on `socket` (replacing a stale socket file), serves one frontend until it
/// disconnects and returns. `ready` runs once the socket accepts connections. With `sandbox`,
/// every thread is confined ([`sandbox::confine`]) as soon as the frontend is connected.
pub fn serve<B>(
    name: &'static str,
    backend: B,
    socket: &Path,
    sandbox: bool,
    ready: impl FnOnce(),
) -> Result<(), ServeError>
where
    B: VhostUserBackendMut<Bitmap = (), Vring = Vring> + Watched + 'static,
{
    let backend = std::sync::Arc::new(std::sync::RwLock::new(backend));
    let mut daemon = VhostUserDaemon::new(
        name.to_string(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(ServeError::Daemon)?;
    let watched = backend.read().map_err(|_| ServeError::Poisoned)?.watched();
    // One worker thread serves all queues (queues_per_thread's default).
    let handlers = daemon.get_epoll_handlers();
    let handler = handlers.first().ok_or(ServeError::NoWorker)?;
    for (fd, events, token) in watched {
        handler
            .register_listener(fd, events, token)
            .map_err(ServeError::Watch)?;
    }
    let mut listener = Listener::new(socket, true).map_err(|source| ServeError::Listen {
        path: socket.display().to_string(),
        source,
    })?;
    ready();
    daemon.start(&mut listener).map_err(ServeError::Daemon)?;
    // One frontend only: the socket file goes now (the sandbox forbids unlink later).
    drop(listener);
    if sandbox {
        crate::sandbox::confine(name)?;
    }
    let result = daemon.wait();
    if let Some(report) = backend.read().ok().and_then(|b| b.report()) {
        to_stderr(&format!("{name}: {report}\n"));
    }
    // The vring worker ends on its exit event; the daemon joins it when dropped.
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    match result {
        Ok(()) => Ok(()),
        // The frontend went away: the normal end of a VM.
        Err(vhost_user_backend::Error::HandleRequest(
            ProtocolError::Disconnected
            | ProtocolError::PartialMessage
            | ProtocolError::SocketBroken(_),
        )) => Ok(()),
        Err(e) => Err(ServeError::Daemon(e)),
    }
}

//! pvm's side of the Uffd backend: the userfaultfd over the restored VM's anonymous RAM, the
//! one message to the handler, and the socket pvm then watches (a handler gone would leave
//! every vCPU that touches a new page blocked for good).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use userfaultfd::{FeatureFlags, Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// How long sending the message may take: the socket's buffer takes it at once unless the
/// handler is wedged.
const SEND_LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot create the userfaultfd for guest memory: {0}")]
    Create(userfaultfd::Error),
    #[error(
        "cannot register guest memory ({size} bytes at {host:#x}) with the userfaultfd: {source}"
    )]
    Register {
        host: u64,
        size: u64,
        source: userfaultfd::Error,
    },
    #[error("cannot connect to the page-fault handler at {}: {source}", .path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot send the memory mappings and the userfaultfd to the page-fault handler at {}: {source}", .path.display())]
    Send {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the page-fault handler at {} took only {sent} of the mappings message's {len} bytes",
        .path.display()
    )]
    ShortSend {
        path: PathBuf,
        sent: usize,
        len: usize,
    },
}

/// The handler serving the VM's RAM: pvm keeps its copy of the userfaultfd (so that a handler
/// that exits never turns the RAM into plain zero-filled memory under the guest: faults stay
/// pending and pvm ends the VM) and its end of the socket, which the main loop watches.
#[derive(Debug)]
pub struct PageServer {
    _uffd: Uffd,
    socket: UnixStream,
    path: PathBuf,
}

impl PageServer {
    /// Registers every region of `memory` (anonymous, nothing touched yet) with a new
    /// userfaultfd in MISSING mode, connects to the handler at `path` and sends it the
    /// mappings and the userfaultfd, as Firecracker does.
    pub fn start(path: &Path, memory: &GuestMemoryMmap) -> Result<Self, BackendError> {
        // EVENT_REMOVE: the balloon's MADV_DONTNEED tells the handler which pages went back,
        // so it serves zeros for them afterwards rather than the snapshot's old contents.
        let uffd = UffdBuilder::new()
            .require_features(FeatureFlags::EVENT_REMOVE)
            .close_on_exec(true)
            .non_blocking(true)
            // The vCPUs' faults come from KVM, in the kernel.
            .user_mode_only(false)
            .create()
            .map_err(BackendError::Create)?;
        let mut regions = Vec::new();
        for region in memory.iter() {
            let (host, size) = (region.as_ptr() as u64, region.len());
            uffd.register(region.as_ptr().cast(), size as usize)
                .map_err(|source| BackendError::Register { host, size, source })?;
            regions.push((host, size));
        }
        let message = super::build_message(&regions);
        let socket = UnixStream::connect(path).map_err(|source| BackendError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let send_err = |source| BackendError::Send {
            path: path.to_path_buf(),
            source,
        };
        socket
            .set_write_timeout(Some(SEND_LIMIT))
            .map_err(send_err)?;
        let sent = socket
            .send_with_fd(message.as_bytes(), uffd.as_raw_fd())
            .map_err(|e| send_err(std::io::Error::from_raw_os_error(e.errno())))?;
        if sent != message.len() {
            return Err(BackendError::ShortSend {
                path: path.to_path_buf(),
                sent,
                len: message.len(),
            });
        }
        log::info!(
            "guest memory served by the page-fault handler at {} ({} regions)",
            path.display(),
            regions.len()
        );
        Ok(PageServer {
            _uffd: uffd,
            socket,
            path: path.to_path_buf(),
        })
    }

    /// pvm's end of the handler's socket: it hangs up when the handler goes away.
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// What pvm says when the handler went away while the VM ran.
    pub fn gone_message(&self) -> String {
        format!(
            "the page-fault handler at {} closed its socket: the guest's memory is no longer \
             served, so the VM is ended",
            self.path.display()
        )
    }
}

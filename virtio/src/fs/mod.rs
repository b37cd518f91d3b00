//! virtio-fs, read-only and served in-process: the guest mounts a host directory
//! (`mount -t virtiofs TAG /mnt`) and reads it through FUSE requests pvm answers itself.
//!
//! - [`abi`]: the FUSE wire structs; [`server`]: the request dispatcher (bytes in, bytes out,
//!   fuzzed on its own); [`inodes`]: the bounded inode and handle tables; [`host`]: the system
//!   calls, each relative to a descriptor the share holds.
//! - The guest cannot leave the shared directory: every inode is an O_PATH descriptor opened
//!   relative to its parent with one path component (no '/', no "..") and O_NOFOLLOW, so
//!   symlinks are the guest's to resolve; files are only ever opened O_RDONLY, and every
//!   operation that would change the share answers EROFS. The host's procfs (whose `self` is
//!   pvm) is not shown even where it is mounted inside the share.
//! - Two queues: hiprio (FORGETs) and one request queue, both served by the device's worker.
//! - No DAX window, no notifications, no snapshot support (saving a VM with a share refuses).

pub mod abi;
#[cfg(test)]
mod device_tests;
mod host;
mod inodes;
pub mod server;
#[cfg(test)]
mod tests;

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use log::warn;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vm_memory::GuestMemoryMmap;

use crate::chain::{Chain, Segment, split_chain, with_scratch};
use crate::device::{ActivateError, Activation, Interrupt, PauseError, VirtioDevice};
use crate::worker::{
    DeviceQueue, EventHandler, EventLoop, QueuePositions, WorkerSlot, device_queues, feature,
    read_config_bytes,
};

use self::inodes::Root;
pub use self::server::{RequestError, Served, Server};

/// The virtio device ID of a file system device.
pub const VIRTIO_ID_FS: u32 = 26;
/// Device threads are named `virtio-fs0`, ...; the sandbox gives them the file system calls.
pub const THREAD_PREFIX: &str = "virtio-fs";
/// The tag a share gets unless told otherwise.
pub const DEFAULT_TAG: &str = "hostfs";
/// The longest tag the config space holds.
pub const MAX_TAG_LEN: usize = 36;
/// The inodes a guest may hold at once unless told otherwise (each is a host descriptor).
pub const DEFAULT_MAX_INODES: usize = 65536;
/// The files and directories a guest may have open at once unless told otherwise.
pub const DEFAULT_MAX_HANDLES: usize = 4096;
/// The most device-readable bytes of a request read: a read-only share's requests are
/// headers, names and small arguments (a longer one is cut here and answered by what remains).
pub const MAX_REQUEST: usize = 64 * 1024;
pub const QUEUE_SIZE: u16 = 128;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];
static NEXT_FS_INDEX: AtomicUsize = AtomicUsize::new(0);

/// What a share serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsConfig {
    /// The host directory the guest sees.
    pub root: PathBuf,
    /// What the guest mounts it by (`mount -t virtiofs TAG`).
    pub tag: String,
    /// The most inodes the guest may hold (lookups not yet forgotten); more get ENFILE.
    pub max_inodes: usize,
    /// The most open files and directories; more get ENFILE.
    pub max_handles: usize,
}

impl FsConfig {
    /// `root` under `tag`, with the default limits.
    pub fn new(root: impl Into<PathBuf>, tag: impl Into<String>) -> Self {
        FsConfig {
            root: root.into(),
            tag: tag.into(),
            max_inodes: DEFAULT_MAX_INODES,
            max_handles: DEFAULT_MAX_HANDLES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("tag '{0}' must be 1 to 36 bytes without NUL")]
    Tag(String),
    #[error("cannot open the shared directory {path}: {source}")]
    Root { path: PathBuf, source: io::Error },
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("cannot open /proc/self/fd (needed to open shared files): {0}")]
    ProcFds(io::Error),
    #[error("the open-file limit ({0}) leaves no room for a share's descriptors")]
    FdLimit(u64),
}

/// A read-only virtio-fs device.
#[derive(Debug)]
pub struct Fs {
    root: Arc<Root>,
    tag: String,
    config: [u8; MAX_TAG_LEN + 4],
    worker: WorkerSlot<FsHandler>,
}

impl Fs {
    /// Opens `config.root` (now, before the sandbox) for a share tagged `config.tag`. Raises
    /// the process's open-file soft limit to its hard limit and keeps the share's descriptors
    /// (inodes and handles) within half of it.
    pub fn new(config: FsConfig) -> Result<Fs, FsError> {
        let tag = config.tag.as_bytes();
        if tag.is_empty() || tag.len() > MAX_TAG_LEN || tag.contains(&0) {
            return Err(FsError::Tag(config.tag));
        }
        let root_err = |source| FsError::Root {
            path: config.root.clone(),
            source,
        };
        let path = CString::new(config.root.as_os_str().as_bytes())
            .map_err(|_| root_err(io::ErrorKind::InvalidInput.into()))?;
        // Without O_DIRECTORY: a file is reported as such below rather than as ENOTDIR.
        let fd = open(&path, libc::O_PATH | libc::O_CLOEXEC).map_err(root_err)?;
        let st = host::stat(fd.as_fd()).map_err(|e| root_err(io::Error::from_raw_os_error(e.0)))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(FsError::NotADirectory(config.root));
        }
        let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
        let proc_fds = open(c"/proc/self/fd", flags).map_err(FsError::ProcFds)?;
        let budget = usize::try_from(host::raise_fd_limit() / 2).unwrap_or(usize::MAX);
        if budget < 16 {
            return Err(FsError::FdLimit(budget as u64 * 2));
        }
        let max_handles = config.max_handles.min(budget / 8).max(1);
        let max_inodes = config.max_inodes.min(budget - max_handles).max(1);
        let mut space = [0u8; MAX_TAG_LEN + 4];
        space[..tag.len()].copy_from_slice(tag);
        // num_request_queues, little-endian.
        space[MAX_TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        let index = NEXT_FS_INDEX.fetch_add(1, Ordering::Relaxed);
        Ok(Fs {
            root: Arc::new(Root {
                fd,
                key: (st.st_dev, st.st_ino),
                proc_fds,
                max_inodes,
                max_handles,
            }),
            tag: config.tag,
            config: space,
            worker: WorkerSlot::new(format!("{THREAD_PREFIX}{index}")),
        })
    }

    /// A FUSE session over this share, as the device's worker runs one per activation: for
    /// tests and fuzzing that drive the request dispatcher without queues.
    pub fn session(&self) -> Server {
        Server::new(Arc::clone(&self.root))
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The inode and handle limits in force (the configured ones, lowered to fit the
    /// process's open-file limit).
    pub fn limits(&self) -> (usize, usize) {
        (self.root.max_inodes, self.root.max_handles)
    }
}

fn open(path: &std::ffi::CStr, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: `path` is NUL-terminated; open returns a new descriptor or -1.
    let fd = unsafe { libc::open(path.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

const OFFERED_FEATURES: u64 = feature(VIRTIO_F_VERSION_1)
    | feature(VIRTIO_RING_F_EVENT_IDX)
    | feature(VIRTIO_RING_F_INDIRECT_DESC);

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        OFFERED_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let root = Arc::clone(&self.root);
        self.worker.start(|| FsHandler::new(activation, root))
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
}

/// The data plane: both queues carry FUSE requests to the same session.
struct FsHandler {
    memory: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    queues: [DeviceQueue; 2],
    server: Server,
    input: Vec<u8>,
    reply: Vec<u8>,
}

impl FsHandler {
    fn new(activation: Activation, root: Arc<Root>) -> Result<Self, ActivateError> {
        let queues = device_queues(activation.queues, activation.features)?;
        Ok(FsHandler {
            memory: activation.memory,
            interrupt: activation.interrupt,
            queues,
            server: Server::new(root),
            input: Vec::new(),
            reply: Vec::new(),
        })
    }

    fn serve(&mut self, index: usize) {
        let FsHandler {
            memory,
            interrupt,
            queues,
            server,
            input,
            reply,
        } = self;
        let Some(queue) = queues.get_mut(index) else {
            return;
        };
        queue.process(memory, interrupt.as_ref(), |chain| {
            serve_chain(memory, chain, server, input, reply)
        });
    }
}

/// Serves one chain; returns the bytes written into it. A chain that cannot carry a request
/// and its reply is returned unanswered with a log line.
pub fn serve_chain(
    memory: &GuestMemoryMmap,
    chain: Chain<'_>,
    server: &mut Server,
    input: &mut Vec<u8>,
    reply: &mut Vec<u8>,
) -> u32 {
    with_scratch(|scratch| serve_split(memory, chain, &mut scratch.segments, server, input, reply))
}

fn serve_split(
    memory: &GuestMemoryMmap,
    chain: Chain<'_>,
    segments: &mut Vec<Segment>,
    server: &mut Server,
    input: &mut Vec<u8>,
    reply: &mut Vec<u8>,
) -> u32 {
    let buffers = match split_chain(chain, segments) {
        Ok(buffers) => buffers,
        Err(e) => {
            warn!("virtio-fs: request dropped: {e}");
            return 0;
        }
    };
    let len = usize::try_from(buffers.readable.len()).map_or(MAX_REQUEST, |n| n.min(MAX_REQUEST));
    input.clear();
    input.resize(len, 0);
    if let Err(e) = buffers.readable.read_into(memory, input) {
        warn!("virtio-fs: request dropped: {e}");
        return 0;
    }
    let room = usize::try_from(buffers.writable.len()).unwrap_or(usize::MAX);
    match server.handle(input, room, reply) {
        Ok(Served::NoReply) => 0,
        Ok(Served::Reply) => match buffers.writable.write_from(memory, reply) {
            Ok(n) => n as u32,
            Err(e) => {
                warn!("virtio-fs: reply lost: {e}");
                0
            }
        },
        Err(e) => {
            warn!("virtio-fs: request dropped: {e}");
            0
        }
    }
}

impl QueuePositions for FsHandler {
    fn positions(&self) -> Vec<crate::snapshot::QueuePosition> {
        self.queues.iter().map(DeviceQueue::position).collect()
    }
}

impl EventHandler for FsHandler {
    fn register(&mut self, events: &EventLoop) -> io::Result<()> {
        for (token, queue) in (0u64..).zip(&self.queues) {
            events.watch(&queue.kick, token)?;
        }
        Ok(())
    }

    fn start(&mut self, _events: &EventLoop) {
        self.serve(0);
        self.serve(1);
    }

    fn handle_event(&mut self, _events: &EventLoop, token: u64) {
        let index = usize::try_from(token).unwrap_or(usize::MAX);
        if let Some(queue) = self.queues.get(index) {
            queue.clear_kick();
            self.serve(index);
        }
    }
}

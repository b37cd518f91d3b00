//! The state a share keeps for the guest: inodes (O_PATH descriptors keyed by the host's
//! (dev, ino), with the guest's lookup counts) and open handles, both bounded so a guest that
//! never forgets or never releases gets errors (ENFILE) instead of exhausting pvm's descriptors.

use std::collections::HashMap;
use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use super::abi::ROOT_ID;
use super::host::{self, Errno};

/// A host inode's identity.
pub type Key = (u64, u64);

/// What a share opened before the sandbox, shared by every activation of the device.
#[derive(Debug)]
pub struct Root {
    /// The shared directory, O_PATH.
    pub fd: OwnedFd,
    pub key: Key,
    /// /proc/self/fd, O_PATH: how an inode's O_PATH descriptor is reopened for reading.
    pub proc_fds: OwnedFd,
    pub max_inodes: usize,
    pub max_handles: usize,
}

struct Inode {
    fd: OwnedFd,
    key: Key,
    /// The guest's references: one per LOOKUP (and READDIRPLUS entry) answered, less FORGETs.
    lookups: u64,
}

/// An open file or directory.
pub enum Handle {
    File(File),
    Dir(File),
}

pub struct Inodes {
    root: Arc<Root>,
    by_id: HashMap<u64, Inode>,
    by_key: HashMap<Key, u64>,
    next_id: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
}

/// Whether `name` is one path component the guest may look up: not empty, no '/', not "."
/// or "..", at most NAME_MAX bytes. Anything else could leave the directory it names.
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name.len() <= 255 && !name.contains(&b'/') && name != b"." && name != b".."
}

impl Inodes {
    /// Empty tables: no system call, so this runs on the activating vCPU thread.
    pub fn new(root: Arc<Root>) -> Self {
        let mut by_key = HashMap::new();
        by_key.insert(root.key, ROOT_ID);
        Inodes {
            root,
            by_id: HashMap::new(),
            by_key,
            next_id: ROOT_ID + 1,
            handles: HashMap::new(),
            next_fh: 1,
        }
    }

    /// Forgets every inode and handle (INIT, DESTROY).
    pub fn clear(&mut self) {
        self.by_id.clear();
        self.by_key.clear();
        self.by_key.insert(self.root.key, ROOT_ID);
        self.handles.clear();
    }

    pub fn inode_count(&self) -> usize {
        self.by_id.len()
    }

    pub fn handle_count(&self) -> usize {
        self.handles.len()
    }

    /// The O_PATH descriptor of node `id`; ESTALE for a node the guest does not hold.
    pub fn fd(&self, id: u64) -> Result<BorrowedFd<'_>, Errno> {
        if id == ROOT_ID {
            return Ok(self.root.fd.as_fd());
        }
        self.by_id
            .get(&id)
            .map(|inode| inode.fd.as_fd())
            .ok_or(Errno(libc::ESTALE))
    }

    fn dev(&self, id: u64) -> u64 {
        if id == ROOT_ID {
            return self.root.key.0;
        }
        self.by_id.get(&id).map_or(0, |inode| inode.key.0)
    }

    /// Looks `name` up in directory `parent`: the child's node ID (its lookup count raised by
    /// one) and attributes.
    pub fn lookup(&mut self, parent: u64, name: &[u8]) -> Result<(u64, libc::stat64), Errno> {
        if !valid_name(name) {
            return Err(Errno(libc::EINVAL));
        }
        let mut cname = Vec::with_capacity(name.len() + 1);
        cname.extend_from_slice(name);
        cname.push(0);
        let cname = CStr::from_bytes_with_nul(&cname).map_err(|_| Errno(libc::EINVAL))?;
        let fd = host::open_path(self.fd(parent)?, cname)?;
        let st = host::stat(fd.as_fd())?;
        let key = (st.st_dev, st.st_ino);
        if key.0 != self.dev(parent) && st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            host::check_mount(fd.as_fd())?;
        }
        if let Some(&id) = self.by_key.get(&key) {
            // Already known (a hard link, or looked up again): the new descriptor is dropped.
            if let Some(inode) = self.by_id.get_mut(&id) {
                inode.lookups = inode.lookups.saturating_add(1);
            }
            return Ok((id, st));
        }
        if self.by_id.len() >= self.root.max_inodes {
            return Err(Errno(libc::ENFILE));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.by_id.insert(
            id,
            Inode {
                fd,
                key,
                lookups: 1,
            },
        );
        self.by_key.insert(key, id);
        Ok((id, st))
    }

    /// Drops `count` of the guest's references to `id`; the inode goes with the last one.
    /// Unknown nodes and the root are ignored (FORGET has no reply to carry an error).
    pub fn forget(&mut self, id: u64, count: u64) {
        let Some(inode) = self.by_id.get_mut(&id) else {
            return;
        };
        inode.lookups = inode.lookups.saturating_sub(count);
        if inode.lookups == 0 {
            let key = inode.key;
            self.by_id.remove(&id);
            self.by_key.remove(&key);
        }
    }

    /// Opens node `id` for reading, as a file or a directory; returns the handle's number.
    pub fn open(&mut self, id: u64, dir: bool) -> Result<u64, Errno> {
        if self.handles.len() >= self.root.max_handles {
            return Err(Errno(libc::ENFILE));
        }
        let fd = self.fd(id)?;
        let kind = host::stat(fd)?.st_mode & libc::S_IFMT;
        let handle = match (dir, kind) {
            (true, libc::S_IFDIR) => Handle::Dir(host::open_dir(fd)?),
            (true, _) => return Err(Errno(libc::ENOTDIR)),
            (false, libc::S_IFREG) => {
                Handle::File(host::open_file(self.root.proc_fds.as_fd(), fd)?)
            }
            (false, libc::S_IFDIR) => return Err(Errno(libc::EISDIR)),
            // FIFOs, sockets and devices are the guest's own (the kernel never opens them
            // through FUSE); opening a host FIFO would block the worker.
            (false, _) => return Err(Errno(libc::EACCES)),
        };
        let fh = self.next_fh;
        self.next_fh = self.next_fh.wrapping_add(1).max(1);
        self.handles.insert(fh, handle);
        Ok(fh)
    }

    pub fn handle(&self, fh: u64) -> Result<&Handle, Errno> {
        self.handles.get(&fh).ok_or(Errno(libc::EBADF))
    }

    pub fn release(&mut self, fh: u64) {
        self.handles.remove(&fh);
    }
}

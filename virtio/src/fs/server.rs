//! The FUSE request dispatcher of a read-only share: one request's bytes in, one reply's bytes
//! out, no guest memory involved, so it is unit-tested and fuzzed on its own. Every operation
//! that would change the share answers EROFS whatever its arguments; unknown ones ENOSYS.

use std::mem::size_of;
use std::sync::Arc;

use vm_memory::ByteValued;

use super::abi::{self, Attr, Dirent, EntryOut, InHeader, OutHeader};
use super::host::{self, Errno};
use super::inodes::{Handle, Inodes, Root};

/// How long the guest may cache names and attributes, in seconds: short, as the host may
/// change the shared files under it.
const CACHE_SECONDS: u64 = 1;
/// Pages per request the driver may use (max_pages): 128 KiB reads.
const MAX_PAGES: u16 = 32;
/// The largest READ pvm serves, whatever the guest asks and offers.
pub const MAX_READ: usize = MAX_PAGES as usize * 4096;
/// Background requests the driver may have in flight.
const MAX_BACKGROUND: u16 = 16;

/// Why a request got no reply at all: its chain is returned unanswered (and logged).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("the request holds {0} device-readable bytes, less than a FUSE header (40)")]
    ShortHeader(usize),
    #[error("the reply buffers hold {0} bytes, less than a FUSE reply header (16)")]
    NoReplyRoom(usize),
}

/// What became of a request that was understood.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    /// `out` holds the reply.
    Reply,
    /// FORGET and BATCH_FORGET: the driver expects nothing back.
    NoReply,
}

/// The FUSE session of one activation of a share.
pub struct Server {
    pub(super) inodes: Inodes,
    pub(super) initialized: bool,
    /// Scratch for getdents and readlink, kept between requests.
    scratch: Vec<u8>,
}

impl Server {
    /// A session over `root` that waits for the driver's INIT.
    pub fn new(root: Arc<Root>) -> Self {
        Server {
            inodes: Inodes::new(root),
            initialized: false,
            scratch: Vec::new(),
        }
    }

    /// The inodes and handles the guest holds now.
    pub fn counts(&self) -> (usize, usize) {
        (self.inodes.inode_count(), self.inodes.handle_count())
    }

    /// Serves one request: `input` is what the driver wrote (header and arguments), `room`
    /// the bytes the reply may take. The reply goes into `out` (cleared first).
    pub fn handle(
        &mut self,
        input: &[u8],
        room: usize,
        out: &mut Vec<u8>,
    ) -> Result<Served, RequestError> {
        out.clear();
        let header: InHeader =
            abi::read_full(input).ok_or(RequestError::ShortHeader(input.len()))?;
        let forget = matches!(header.opcode, abi::FORGET | abi::BATCH_FORGET);
        if room < size_of::<OutHeader>() && !forget {
            return Err(RequestError::NoReplyRoom(room));
        }
        out.extend_from_slice(OutHeader::default().as_slice());
        // The header's length should match what came; a shorter claim cuts the arguments
        // short, a longer one (the rest never came) leaves what did.
        let claimed = usize::try_from(header.len).unwrap_or(usize::MAX);
        let result = if claimed < size_of::<InHeader>() {
            Err(Errno(libc::EINVAL))
        } else {
            let body = &input[size_of::<InHeader>()..input.len().min(claimed)];
            let room = room - size_of::<OutHeader>().min(room);
            self.dispatch(&header, body, room, out)
        };
        if forget {
            // The driver never waits for a FORGET, so even a malformed one gets no reply.
            out.clear();
            return Ok(Served::NoReply);
        }
        let error = match result {
            Ok(()) => 0,
            Err(Errno(e)) => {
                out.truncate(size_of::<OutHeader>());
                -e
            }
        };
        let reply = OutHeader {
            len: out.len() as u32,
            error,
            unique: header.unique,
        };
        out[..size_of::<OutHeader>()].copy_from_slice(reply.as_slice());
        Ok(Served::Reply)
    }

    /// Serves the request, appending the reply's payload to `out`; `room` is what fits.
    fn dispatch(
        &mut self,
        header: &InHeader,
        body: &[u8],
        room: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), Errno> {
        let op = header.opcode;
        if op == abi::INIT {
            return self.init(body, room, out);
        }
        if !self.initialized {
            return Err(Errno(libc::EIO));
        }
        if abi::WRITE_OPS.contains(&op) {
            return Err(Errno(libc::EROFS));
        }
        let node = header.nodeid;
        match op {
            abi::LOOKUP => {
                let name = body.split(|&b| b == 0).next().filter(|_| body.contains(&0));
                let name = name.ok_or(Errno(libc::EINVAL))?;
                let (id, st) = self.inodes.lookup(node, name)?;
                put(out, room, &entry(id, host::attr(&st)))
            }
            abi::FORGET => {
                let arg: abi::ForgetIn = abi::read_full(body).ok_or(Errno(libc::EINVAL))?;
                self.inodes.forget(node, arg.nlookup);
                Ok(())
            }
            abi::BATCH_FORGET => {
                let arg: abi::BatchForgetIn = abi::read_full(body).ok_or(Errno(libc::EINVAL))?;
                let items = body[size_of::<abi::BatchForgetIn>()..].chunks_exact(16);
                for item in items.take(arg.count as usize) {
                    if let Some(one) = abi::read_full::<abi::ForgetOne>(item) {
                        self.inodes.forget(one.nodeid, one.nlookup);
                    }
                }
                Ok(())
            }
            abi::GETATTR => {
                let st = host::stat(self.inodes.fd(node)?)?;
                let reply = abi::AttrOut {
                    attr_valid: CACHE_SECONDS,
                    attr: host::attr(&st),
                    ..Default::default()
                };
                put(out, room, &reply)
            }
            abi::READLINK => {
                host::readlink(self.inodes.fd(node)?, &mut self.scratch)?;
                if self.scratch.len() > room {
                    return Err(Errno(libc::ENAMETOOLONG));
                }
                out.extend_from_slice(&self.scratch);
                Ok(())
            }
            abi::OPEN | abi::OPENDIR => {
                let arg: abi::OpenIn = abi::read_full(body).ok_or(Errno(libc::EINVAL))?;
                let flags = arg.flags as i32;
                if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
                    return Err(Errno(libc::EROFS));
                }
                let fh = self.inodes.open(node, op == abi::OPENDIR)?;
                let reply = abi::OpenOut {
                    fh,
                    ..Default::default()
                };
                put(out, room, &reply).inspect_err(|_| self.inodes.release(fh))
            }
            abi::RELEASE | abi::RELEASEDIR => {
                let arg: abi::ReleaseIn = abi::read_struct(body, 8).ok_or(Errno(libc::EINVAL))?;
                self.inodes.release(arg.fh);
                Ok(())
            }
            abi::READ => {
                let arg: abi::ReadIn = abi::read_full(body).ok_or(Errno(libc::EINVAL))?;
                let Handle::File(file) = self.inodes.handle(arg.fh)? else {
                    return Err(Errno(libc::EISDIR));
                };
                let len = (arg.size as usize).min(room).min(MAX_READ);
                host::pread(file, arg.offset, len, out)
            }
            abi::READDIR | abi::READDIRPLUS => {
                let arg: abi::ReadIn = abi::read_full(body).ok_or(Errno(libc::EINVAL))?;
                let room = (arg.size as usize).min(room).min(MAX_READ);
                self.readdir(node, &arg, room, op == abi::READDIRPLUS, out)
            }
            abi::STATFS => {
                let st = host::statfs(self.inodes.fd(node)?)?;
                let reply = abi::Kstatfs {
                    blocks: st.f_blocks,
                    bfree: st.f_bfree,
                    bavail: st.f_bavail,
                    files: st.f_files,
                    ffree: st.f_ffree,
                    bsize: st.f_bsize as u32,
                    namelen: st.f_namelen as u32,
                    frsize: st.f_frsize as u32,
                    ..Default::default()
                };
                put(out, room, &reply)
            }
            abi::ACCESS => {
                let arg: abi::AccessIn = abi::read_full(body).ok_or(Errno(libc::EINVAL))?;
                self.inodes.fd(node)?;
                if arg.mask & libc::W_OK as u32 != 0 {
                    return Err(Errno(libc::EROFS));
                }
                Ok(())
            }
            // Nothing was written, so there is nothing to flush or sync.
            abi::FLUSH | abi::FSYNC | abi::FSYNCDIR | abi::SYNCFS => Ok(()),
            abi::DESTROY => {
                self.inodes.clear();
                self.initialized = false;
                Ok(())
            }
            // GETXATTR, LISTXATTR (the driver stops asking after ENOSYS), INTERRUPT,
            // SETUPMAPPING (no DAX window), locks, ioctl, poll, lseek and anything newer.
            _ => Err(Errno(libc::ENOSYS)),
        }
    }

    /// INIT: agrees on the protocol and the features both sides know; a fresh session.
    fn init(&mut self, body: &[u8], room: usize, out: &mut Vec<u8>) -> Result<(), Errno> {
        let arg: abi::InitIn = abi::read_struct(body, 8).ok_or(Errno(libc::EINVAL))?;
        if arg.major < abi::KERNEL_VERSION {
            return Err(Errno(libc::EPROTO));
        }
        if arg.major > abi::KERNEL_VERSION {
            // The driver asks again with the major version given here.
            let reply = abi::InitOut {
                major: abi::KERNEL_VERSION,
                minor: abi::KERNEL_MINOR_VERSION,
                ..Default::default()
            };
            return put_prefix(out, room, &reply, abi::COMPAT_22_INIT_OUT_SIZE);
        }
        let offered = abi::ASYNC_READ
            | abi::DO_READDIRPLUS
            | abi::READDIRPLUS_AUTO
            | abi::PARALLEL_DIROPS
            | abi::MAX_PAGES
            | abi::CACHE_SYMLINKS;
        let minor = arg.minor.min(abi::KERNEL_MINOR_VERSION);
        let reply = abi::InitOut {
            major: abi::KERNEL_VERSION,
            minor,
            max_readahead: arg.max_readahead,
            flags: arg.flags & offered,
            max_background: MAX_BACKGROUND,
            congestion_threshold: MAX_BACKGROUND * 3 / 4,
            max_write: MAX_READ as u32,
            time_gran: 1,
            max_pages: MAX_PAGES,
            ..Default::default()
        };
        let size = if minor < 23 {
            abi::COMPAT_22_INIT_OUT_SIZE
        } else {
            size_of::<abi::InitOut>()
        };
        put_prefix(out, room, &reply, size)?;
        self.inodes.clear();
        self.initialized = true;
        Ok(())
    }

    /// READDIR(PLUS): the directory's entries from `arg.offset` on, as many as fit in `room`.
    /// Each READDIRPLUS entry counts as a lookup of its node (except "." and "..", which the
    /// driver does not count); an entry whose lookup fails goes out without a node.
    fn readdir(
        &mut self,
        node: u64,
        arg: &abi::ReadIn,
        room: usize,
        plus: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), Errno> {
        let Handle::Dir(dir) = self.inodes.handle(arg.fh)? else {
            return Err(Errno(libc::ENOTDIR));
        };
        let mut host_entries = std::mem::take(&mut self.scratch);
        // A host record is never larger than its FUSE dirent, so `room` bytes of them are at
        // least as many entries as fit.
        let read = host::getdents(dir, arg.offset, &mut host_entries, room.max(512));
        let start = out.len();
        let result = read.and_then(|()| {
            for ent in host::dirents(&host_entries) {
                let namelen = ent.name.len();
                let dirent_len = (abi::DIRENT_NAME_OFFSET + namelen).next_multiple_of(8);
                let need = dirent_len + if plus { size_of::<EntryOut>() } else { 0 };
                if out.len() - start + need > room {
                    if out.len() == start {
                        return Err(Errno(libc::EINVAL));
                    }
                    break;
                }
                if plus {
                    let dot = ent.name == b"." || ent.name == b"..";
                    let looked_up = if dot {
                        None
                    } else {
                        self.inodes.lookup(node, ent.name).ok()
                    };
                    let reply = match looked_up {
                        Some((id, st)) => entry(id, host::attr(&st)),
                        None => EntryOut::default(),
                    };
                    out.extend_from_slice(reply.as_slice());
                }
                let dirent = Dirent {
                    ino: ent.ino,
                    off: ent.off,
                    namelen: namelen as u32,
                    kind: u32::from(ent.kind),
                };
                out.extend_from_slice(dirent.as_slice());
                out.extend_from_slice(ent.name);
                out.resize(
                    out.len() + dirent_len - abi::DIRENT_NAME_OFFSET - namelen,
                    0,
                );
            }
            Ok(())
        });
        self.scratch = host_entries;
        result
    }
}

/// The entry reply for node `id`.
fn entry(id: u64, attr: Attr) -> EntryOut {
    EntryOut {
        nodeid: id,
        entry_valid: CACHE_SECONDS,
        attr_valid: CACHE_SECONDS,
        attr,
        ..Default::default()
    }
}

/// Appends `value` if it fits in `room`.
fn put<T: ByteValued>(out: &mut Vec<u8>, room: usize, value: &T) -> Result<(), Errno> {
    put_prefix(out, room, value, size_of::<T>())
}

/// Appends the first `len` bytes of `value` if they fit in `room`.
fn put_prefix<T: ByteValued>(
    out: &mut Vec<u8>,
    room: usize,
    value: &T,
    len: usize,
) -> Result<(), Errno> {
    if len > room {
        return Err(Errno(libc::ERANGE));
    }
    out.extend_from_slice(&value.as_slice()[..len]);
    Ok(())
}

//! The host system calls behind a read-only share, each on a descriptor the share already holds
//! and a single path component at most, so no request can name anything outside the shared
//! directory. Errors are the host's errno, which the guest gets back as the reply's error.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::abi::Attr;

/// A host errno, sent to the guest negated in the reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    fn last() -> Self {
        Errno(
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    }
}

impl From<io::Error> for Errno {
    fn from(e: io::Error) -> Self {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

/// procfs's statfs magic: a share never shows the host's /proc, whose `self` is pvm itself.
const PROC_SUPER_MAGIC: i64 = 0x9fa0;

/// Opens `name` in `dir` as an O_PATH descriptor without following a symlink, for an inode.
pub fn open_path(dir: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd, Errno> {
    open_at(
        dir.as_raw_fd(),
        name,
        libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
    )
}

/// `openat(dir, name, flags)` with the flags checked to be read-only ones.
fn open_at(dir: RawFd, name: &CStr, flags: i32) -> Result<OwnedFd, Errno> {
    debug_assert_eq!(flags & (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC), 0);
    // SAFETY: `name` is a valid NUL-terminated string; openat returns a new descriptor or -1.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the directory an O_PATH descriptor refers to, for reading its entries.
pub fn open_dir(inode: BorrowedFd<'_>) -> Result<File, Errno> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    open_at(inode.as_raw_fd(), c".", flags).map(File::from)
}

/// Opens the regular file an O_PATH descriptor refers to, read-only, through its
/// /proc/self/fd entry (`proc_fds`, opened before the sandbox): the only way to turn an O_PATH
/// descriptor into a readable one without a path the guest could have changed meanwhile.
pub fn open_file(proc_fds: BorrowedFd<'_>, inode: BorrowedFd<'_>) -> Result<File, Errno> {
    let name =
        std::ffi::CString::new(inode.as_raw_fd().to_string()).map_err(|_| Errno(libc::EIO))?;
    let flags = libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY;
    open_at(proc_fds.as_raw_fd(), &name, flags).map(File::from)
}

/// The attributes of whatever `fd` refers to (O_PATH descriptors included; a symlink's own).
pub fn stat(fd: BorrowedFd<'_>) -> Result<libc::stat64, Errno> {
    // SAFETY: all-zero is a valid stat64 (integers only).
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    let flags = libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW;
    // SAFETY: the empty path is NUL-terminated and `st` is a valid, writable stat64.
    let rc = unsafe { libc::fstatat64(fd.as_raw_fd(), c"".as_ptr(), &mut st, flags) };
    if rc < 0 {
        return Err(Errno::last());
    }
    Ok(st)
}

/// Refuses a directory on another filesystem than its parent's if that filesystem is procfs.
pub fn check_mount(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    let st = statfs(fd)?;
    if st.f_type == PROC_SUPER_MAGIC {
        return Err(Errno(libc::EACCES));
    }
    Ok(())
}

pub fn statfs(fd: BorrowedFd<'_>) -> Result<libc::statfs64, Errno> {
    // SAFETY: all-zero is a valid statfs64 (integers only).
    let mut st: libc::statfs64 = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable statfs64.
    if unsafe { libc::fstatfs64(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(Errno::last());
    }
    Ok(st)
}

/// The target of the symlink `fd` refers to, into `buf` (PATH_MAX bytes at most).
pub fn readlink(fd: BorrowedFd<'_>, buf: &mut Vec<u8>) -> Result<(), Errno> {
    buf.clear();
    buf.resize(libc::PATH_MAX as usize, 0);
    // SAFETY: the empty path is NUL-terminated; readlinkat writes at most `buf.len()` bytes.
    let n = unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(Errno::last());
    }
    buf.truncate(n as usize);
    Ok(())
}

/// Reads up to `len` bytes at `offset` appended to `buf`.
pub fn pread(file: &File, offset: u64, len: usize, buf: &mut Vec<u8>) -> Result<(), Errno> {
    let start = buf.len();
    buf.resize(start + len, 0);
    let offset = libc::off64_t::try_from(offset).map_err(|_| Errno(libc::EINVAL))?;
    let n = loop {
        // SAFETY: the destination is the `len` bytes just added to `buf`.
        let n = unsafe {
            libc::pread64(
                file.as_raw_fd(),
                buf[start..].as_mut_ptr().cast(),
                len,
                offset,
            )
        };
        if n >= 0 {
            break n as usize;
        }
        let err = Errno::last();
        if err.0 != libc::EINTR {
            buf.truncate(start);
            return Err(err);
        }
    };
    buf.truncate(start + n);
    Ok(())
}

/// Reads the directory's entries from the position `offset` (0, or a `d_off` it returned)
/// into `buf` as `linux_dirent64` records; an empty `buf` is the end of the directory.
pub fn getdents(dir: &File, offset: u64, buf: &mut Vec<u8>, room: usize) -> Result<(), Errno> {
    let offset = libc::off64_t::try_from(offset).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: lseek on a descriptor the handle owns.
    if unsafe { libc::lseek64(dir.as_raw_fd(), offset, libc::SEEK_SET) } < 0 {
        return Err(Errno::last());
    }
    buf.clear();
    buf.resize(room, 0);
    // SAFETY: getdents64 writes at most `buf.len()` bytes into `buf`.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            dir.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    if n < 0 {
        buf.clear();
        return Err(Errno::last());
    }
    buf.truncate(n as usize);
    Ok(())
}

/// One record of a getdents64 buffer.
pub struct HostDirent<'a> {
    pub ino: u64,
    pub off: u64,
    pub kind: u8,
    pub name: &'a [u8],
}

/// The records of a getdents64 buffer, stopping at the first malformed one.
pub fn dirents(buf: &[u8]) -> impl Iterator<Item = HostDirent<'_>> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let rec = buf.get(at..)?;
        let ino = u64::from_ne_bytes(rec.get(0..8)?.try_into().ok()?);
        let off = u64::from_ne_bytes(rec.get(8..16)?.try_into().ok()?);
        let reclen = usize::from(u16::from_ne_bytes(rec.get(16..18)?.try_into().ok()?));
        let kind = *rec.get(18)?;
        let name = rec.get(19..reclen)?;
        let name = &name[..name.iter().position(|&b| b == 0)?];
        at += reclen;
        Some(HostDirent {
            ino,
            off,
            kind,
            name,
        })
    })
}

/// Raises this process's open-file soft limit to its hard limit (every inode of a share holds
/// a descriptor) and returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit64 fills the valid `lim`.
    if unsafe { libc::getrlimit64(libc::RLIMIT_NOFILE, &mut lim) } < 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit64 {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit64 only reads `raised`.
        if unsafe { libc::setrlimit64(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    lim.rlim_cur
}

/// A host stat as FUSE attributes.
pub fn attr(st: &libc::stat64) -> Attr {
    Attr {
        ino: st.st_ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: st.st_atime as u64,
        mtime: st.st_mtime as u64,
        ctime: st.st_ctime as u64,
        atimensec: st.st_atime_nsec as u32,
        mtimensec: st.st_mtime_nsec as u32,
        ctimensec: st.st_ctime_nsec as u32,
        mode: st.st_mode,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

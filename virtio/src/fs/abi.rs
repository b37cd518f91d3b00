//! The FUSE wire format as virtio-fs carries it: the subset of the kernel's FUSE ABI
//! (include/uapi/linux/fuse.h, protocol 7.x) a read-only share needs, as `repr(C)` types whose
//! layout is the ABI's (all little-endian on the hosts pvm runs on, x86_64).
//!
//! Every type here is plain old data: integers only, laid out without padding, so any byte
//! pattern is a valid value and [`read_struct`] can fill one from whatever the guest sent.

use vm_memory::ByteValued;

/// The protocol major version pvm speaks; a driver with another major is refused or asked again.
pub const KERNEL_VERSION: u32 = 7;
/// The protocol minor version pvm implements (everything used here exists since 7.31).
pub const KERNEL_MINOR_VERSION: u32 = 31;
/// The node ID of the share's root directory.
pub const ROOT_ID: u64 = 1;
/// The size of `fuse_init_out` a driver older than 7.23 expects.
pub const COMPAT_22_INIT_OUT_SIZE: usize = 24;

// Opcodes (enum fuse_opcode).
pub const LOOKUP: u32 = 1;
pub const FORGET: u32 = 2;
pub const GETATTR: u32 = 3;
pub const SETATTR: u32 = 4;
pub const READLINK: u32 = 5;
pub const SYMLINK: u32 = 6;
pub const MKNOD: u32 = 8;
pub const MKDIR: u32 = 9;
pub const UNLINK: u32 = 10;
pub const RMDIR: u32 = 11;
pub const RENAME: u32 = 12;
pub const LINK: u32 = 13;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const WRITE: u32 = 16;
pub const STATFS: u32 = 17;
pub const RELEASE: u32 = 18;
pub const FSYNC: u32 = 20;
pub const SETXATTR: u32 = 21;
pub const GETXATTR: u32 = 22;
pub const LISTXATTR: u32 = 23;
pub const REMOVEXATTR: u32 = 24;
pub const FLUSH: u32 = 25;
pub const INIT: u32 = 26;
pub const OPENDIR: u32 = 27;
pub const READDIR: u32 = 28;
pub const RELEASEDIR: u32 = 29;
pub const FSYNCDIR: u32 = 30;
pub const ACCESS: u32 = 34;
pub const CREATE: u32 = 35;
pub const INTERRUPT: u32 = 36;
pub const DESTROY: u32 = 38;
pub const BATCH_FORGET: u32 = 42;
pub const FALLOCATE: u32 = 43;
pub const READDIRPLUS: u32 = 44;
pub const RENAME2: u32 = 45;
pub const COPY_FILE_RANGE: u32 = 47;
pub const SETUPMAPPING: u32 = 48;
pub const SYNCFS: u32 = 50;
pub const TMPFILE: u32 = 51;

/// Every operation that would change the share: answered EROFS whatever its arguments.
pub const WRITE_OPS: &[u32] = &[
    SETATTR,
    SYMLINK,
    MKNOD,
    MKDIR,
    UNLINK,
    RMDIR,
    RENAME,
    LINK,
    WRITE,
    SETXATTR,
    REMOVEXATTR,
    CREATE,
    FALLOCATE,
    RENAME2,
    COPY_FILE_RANGE,
    TMPFILE,
];

// fuse_init_in/out flags pvm understands. Only these are ever granted, and only when the
// driver asked for them; DAX (MAP_ALIGNMENT, SETUPMAPPING) and WRITEBACK_CACHE never are.
pub const ASYNC_READ: u32 = 1 << 0;
pub const DO_READDIRPLUS: u32 = 1 << 13;
pub const READDIRPLUS_AUTO: u32 = 1 << 14;
pub const PARALLEL_DIROPS: u32 = 1 << 18;
pub const MAX_PAGES: u32 = 1 << 22;
pub const CACHE_SYMLINKS: u32 = 1 << 23;

/// The name of a dirent starts this far in (`FUSE_NAME_OFFSET`); entries are 8-byte aligned.
pub const DIRENT_NAME_OFFSET: usize = 24;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub total_extlen: u16,
    pub padding: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OutHeader {
    pub len: u32,
    pub error: i32,
    pub unique: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub flags2: u32,
    pub unused: [u32; 11],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InitOut {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub time_gran: u32,
    pub max_pages: u16,
    pub map_alignment: u16,
    pub flags2: u32,
    pub max_stack_depth: u32,
    pub unused: [u32; 6],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EntryOut {
    pub nodeid: u64,
    pub generation: u64,
    pub entry_valid: u64,
    pub attr_valid: u64,
    pub entry_valid_nsec: u32,
    pub attr_valid_nsec: u32,
    pub attr: Attr,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AttrOut {
    pub attr_valid: u64,
    pub attr_valid_nsec: u32,
    pub dummy: u32,
    pub attr: Attr,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ForgetIn {
    pub nlookup: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchForgetIn {
    pub count: u32,
    pub dummy: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ForgetOne {
    pub nodeid: u64,
    pub nlookup: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenIn {
    pub flags: u32,
    pub open_flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOut {
    pub fh: u64,
    pub open_flags: u32,
    pub backing_id: i32,
}

/// The fields of `fuse_release_in` pvm reads (the handle comes first in flush, release and
/// fsync alike).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReleaseIn {
    pub fh: u64,
    pub flags: u32,
    pub release_flags: u32,
    pub lock_owner: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    pub read_flags: u32,
    pub lock_owner: u64,
    pub flags: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Dirent {
    pub ino: u64,
    pub off: u64,
    pub namelen: u32,
    pub kind: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Kstatfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
    pub padding: u32,
    pub spare: [u32; 6],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AccessIn {
    pub mask: u32,
    pub padding: u32,
}

// SAFETY: every type below is repr(C), made only of integers (and arrays of them) laid out
// without padding (the field order keeps each field naturally aligned and the sizes are
// checked in the tests), so every byte pattern is a valid value.
unsafe impl ByteValued for InHeader {}
// SAFETY: as above.
unsafe impl ByteValued for OutHeader {}
// SAFETY: as above.
unsafe impl ByteValued for InitIn {}
// SAFETY: as above.
unsafe impl ByteValued for InitOut {}
// SAFETY: as above.
unsafe impl ByteValued for Attr {}
// SAFETY: as above.
unsafe impl ByteValued for EntryOut {}
// SAFETY: as above.
unsafe impl ByteValued for AttrOut {}
// SAFETY: as above.
unsafe impl ByteValued for ForgetIn {}
// SAFETY: as above.
unsafe impl ByteValued for BatchForgetIn {}
// SAFETY: as above.
unsafe impl ByteValued for ForgetOne {}
// SAFETY: as above.
unsafe impl ByteValued for OpenIn {}
// SAFETY: as above.
unsafe impl ByteValued for OpenOut {}
// SAFETY: as above.
unsafe impl ByteValued for ReleaseIn {}
// SAFETY: as above.
unsafe impl ByteValued for ReadIn {}
// SAFETY: as above.
unsafe impl ByteValued for Dirent {}
// SAFETY: as above.
unsafe impl ByteValued for Kstatfs {}
// SAFETY: as above.
unsafe impl ByteValued for AccessIn {}

/// A `T` from the front of `bytes`; bytes the guest did not send read as zero (older drivers
/// send shorter structs, e.g. a 16-byte `fuse_init_in`), `None` when fewer than `min` came.
pub fn read_struct<T: ByteValued + Default>(bytes: &[u8], min: usize) -> Option<T> {
    if bytes.len() < min {
        return None;
    }
    let mut value = T::default();
    let dst = value.as_mut_slice();
    let n = dst.len().min(bytes.len());
    dst[..n].copy_from_slice(&bytes[..n]);
    Some(value)
}

/// A `T` that must be sent whole.
pub fn read_full<T: ByteValued + Default>(bytes: &[u8]) -> Option<T> {
    read_struct(bytes, std::mem::size_of::<T>())
}

/// A request as a driver frames it: the header (its length filled in) followed by `body`. For
/// tests, fuzz seeds and tools that talk to the device.
pub fn request(opcode: u32, nodeid: u64, unique: u64, body: &[u8]) -> Vec<u8> {
    let header = InHeader {
        len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
        opcode,
        unique,
        nodeid,
        ..Default::default()
    };
    let mut bytes = header.as_slice().to_vec();
    bytes.extend_from_slice(body);
    bytes
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use super::*;

    #[test]
    fn layouts_match_the_kernel_abi() {
        assert_eq!(size_of::<InHeader>(), 40);
        assert_eq!(size_of::<OutHeader>(), 16);
        assert_eq!(size_of::<InitIn>(), 64);
        assert_eq!(size_of::<InitOut>(), 64);
        assert_eq!(size_of::<Attr>(), 88);
        assert_eq!(size_of::<EntryOut>(), 128);
        assert_eq!(size_of::<AttrOut>(), 104);
        assert_eq!(size_of::<OpenOut>(), 16);
        assert_eq!(size_of::<ReleaseIn>(), 24);
        assert_eq!(size_of::<ReadIn>(), 40);
        assert_eq!(size_of::<Dirent>(), DIRENT_NAME_OFFSET);
        assert_eq!(size_of::<Kstatfs>(), 80);
        assert_eq!(size_of::<ForgetOne>(), 16);
    }

    #[test]
    fn short_input_reads_as_zero_or_none() {
        let init: InitIn = read_struct(&[7, 0, 0, 0, 31, 0, 0, 0], 8).unwrap();
        assert_eq!((init.major, init.minor, init.flags), (7, 31, 0));
        assert!(read_struct::<InitIn>(&[7, 0, 0], 8).is_none());
        assert!(read_full::<ReadIn>(&[0; 39]).is_none());
        assert!(read_full::<ReadIn>(&[0; 40]).is_some());
    }
}

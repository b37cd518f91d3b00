//! `direct=on`: the image is opened with O_DIRECT, so the host page cache is bypassed. O_DIRECT
//! takes only file offsets, lengths and buffer addresses aligned to the host's logical block
//! size; a request that is not (a guest may use any 512-byte sector and any buffer) is served
//! through an aligned bounce buffer instead of failing with EINVAL. Writes that do not cover
//! whole blocks read the blocks around them first (read-modify-write).

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::ptr::NonNull;

use vm_memory::GuestMemoryMmap;

use super::request::{DiskImage, RequestError, SECTOR_SIZE};
use crate::chain::Segments;

/// The alignment assumed when the host does not say (a filesystem without STATX_DIOALIGN):
/// no logical block size in use is larger.
const FALLBACK_ALIGN: u64 = 4096;
/// STATX_DIOALIGN (Linux 6.1): ask for the O_DIRECT alignment.
const STATX_DIOALIGN: u32 = 0x2000;

/// The alignment O_DIRECT needs on `file`: the larger of its memory and offset alignments,
/// and at least a sector. Errors when the file cannot do direct I/O at all.
pub(crate) fn alignment(file: &File) -> io::Result<u64> {
    if file.metadata()?.file_type().is_block_device() {
        let mut size: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int into `size`, which outlives the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) };
        if ret == 0 && size > 0 {
            return Ok((size as u64).max(SECTOR_SIZE));
        }
    }
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: statx fills the struct `stx` points to; an empty path with AT_EMPTY_PATH
    // describes the open fd.
    let ret = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if ret != 0 {
        return Ok(FALLBACK_ALIGN);
    }
    // SAFETY: statx succeeded and initialised the struct (it was zeroed before anyway).
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & STATX_DIOALIGN == 0 {
        return Ok(FALLBACK_ALIGN);
    }
    let (mem, offset) = (
        u64::from(stx.stx_dio_mem_align),
        u64::from(stx.stx_dio_offset_align),
    );
    if mem == 0 || offset == 0 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the filesystem does not support O_DIRECT",
        ));
    }
    Ok(mem.max(offset).max(SECTOR_SIZE).next_power_of_two())
}

impl DiskImage {
    /// Whether a transfer of `len` bytes at `offset` over `iovecs` breaks O_DIRECT's rules.
    pub(crate) fn needs_bounce(&self, offset: u64, len: u64, iovecs: &[libc::iovec]) -> bool {
        let Some(align) = self.direct_align else {
            return false;
        };
        let mask = align - 1;
        offset & mask != 0
            || len & mask != 0
            || iovecs
                .iter()
                .any(|iov| (iov.iov_base as u64) & mask != 0 || (iov.iov_len as u64) & mask != 0)
    }

    /// The whole blocks around `len` bytes at `offset`: their start and length.
    fn blocks_around(&self, offset: u64, len: u64) -> Result<(u64, usize), RequestError> {
        let align = self.direct_align.unwrap_or(SECTOR_SIZE);
        let start = offset - offset % align;
        let end = (offset + len).div_ceil(align) * align;
        let span = usize::try_from(end - start)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok((start, span))
    }
}

/// A read into misaligned guest buffers: whole blocks into an aligned buffer, then copied.
pub(crate) fn read_bounced(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    buffers: &Segments<'_>,
    offset: u64,
) -> Result<(), RequestError> {
    if buffers.is_empty() {
        return Ok(());
    }
    let (start, span) = disk.blocks_around(offset, buffers.len())?;
    let mut bounce = AlignedBuf::new(span, disk.direct_align.unwrap_or(SECTOR_SIZE))?;
    read_blocks(&disk.file, bounce.as_mut(), start)?;
    let skip = (offset - start) as usize;
    buffers.write_from(mem, &bounce.as_mut()[skip..])?;
    Ok(())
}

/// A write from misaligned guest buffers or of partial blocks: the blocks it touches are read
/// (only when it does not cover them whole), overlaid with the guest's data and written back.
pub(crate) fn write_bounced(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    buffers: &Segments<'_>,
    offset: u64,
) -> Result<(), RequestError> {
    let len = buffers.len();
    if len == 0 {
        return Ok(());
    }
    let (start, span) = disk.blocks_around(offset, len)?;
    let mut bounce = AlignedBuf::new(span, disk.direct_align.unwrap_or(SECTOR_SIZE))?;
    if start != offset || span as u64 != len {
        read_blocks(&disk.file, bounce.as_mut(), start)?;
    }
    let skip = (offset - start) as usize;
    let end = skip + len as usize;
    buffers.read_into(mem, &mut bounce.as_mut()[skip..end])?;
    disk.file.write_all_at(bounce.as_mut(), start)?;
    Ok(())
}

/// Fills `buf` from `file` at `offset`; what lies past the end of the file reads as zeros.
fn read_blocks(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A zeroed heap buffer aligned as O_DIRECT needs.
struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize, align: u64) -> io::Result<Self> {
        let invalid = || io::Error::from(io::ErrorKind::InvalidInput);
        let align = usize::try_from(align).map_err(|_| invalid())?;
        let layout = Layout::from_size_align(len.max(1), align).map_err(|_| invalid())?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(AlignedBuf { ptr, layout })
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` owns `layout.size()` initialised (zeroed) bytes for the buffer's life.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout, freed once.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

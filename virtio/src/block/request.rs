//! One virtio-blk request: parse and validate the chain, do the I/O against the image, report a
//! status. Plain functions over guest memory and a file, free of threads and eventfds, so they are
//! unit-tested on chains from a test driver's queue (crate::testing).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use log::{debug, warn};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Permissions};

use super::{SEG_MAX, SEGMENT_MAX_BYTES, direct};
use crate::chain::{
    Chain, ChainError, ChainScratch, Direction, GuestIovecs, IovecScratch, Segments, split_chain,
    with_scratch,
};

/// virtio-blk addresses the disk in 512-byte sectors, whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// `struct virtio_blk_outhdr`: type, ioprio, sector.
const HEADER_LEN: u64 = 16;
/// `struct virtio_blk_discard_write_zeroes`: sector, num_sectors, flags.
const RANGE_LEN: u64 = 16;
/// The largest DISCARD / WRITE_ZEROES range the device accepts (advertised in config space), so
/// one request cannot keep the worker writing zeros for long.
pub const MAX_RANGE_SECTORS: u32 = 1 << 21; // 1 GiB
/// Chunk size when falling back to writing zeros by hand.
const ZERO_CHUNK: usize = 64 * 1024;

/// The open image and what the guest may do with it; shared by the device and its worker.
#[derive(Debug)]
pub struct DiskImage {
    pub(crate) file: File,
    /// Size in sectors, fixed at open.
    pub(crate) sectors: u64,
    pub(crate) read_only: bool,
    /// GET_ID answer: the serial, zero-padded to 20 bytes.
    pub(crate) id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// Names the disk in log messages (its path).
    pub(crate) name: String,
    /// Host I/O failures, shared with the VMM for --stats.
    pub(crate) errors: Arc<DiskErrors>,
    /// Set once an fdatasync failed: see [`RequestError::EarlierFlushFailed`].
    pub(crate) flush_failed: AtomicBool,
    /// The alignment O_DIRECT needs (file offsets, lengths and buffer addresses) when the
    /// image was opened with it; None for buffered I/O.
    pub(crate) direct_align: Option<u64>,
}

/// The host I/O failures of one disk. Every failed request is counted; each distinct cause
/// (errno) is logged only the first time, so a guest that keeps writing to a full or failing
/// host disk cannot flood pvm's log.
#[derive(Debug, Default)]
pub struct DiskErrors {
    count: AtomicU64,
    /// The causes logged so far (error messages: one per errno, so few).
    logged: Mutex<Vec<String>>,
}

impl DiskErrors {
    /// Requests that failed on the host side so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Counts one failure; true if its cause is new, i.e. the caller should log it.
    pub(crate) fn record(&self, cause: &str) -> bool {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut logged = self.logged.lock().unwrap_or_else(PoisonError::into_inner);
        if logged.iter().any(|c| c == cause) {
            return false;
        }
        logged.push(cause.to_string());
        true
    }
}

/// Why a request failed; each maps to the status byte the driver sees.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("malformed chain: {0}")]
    Chain(#[from] ChainError),
    #[error("request header shorter than 16 bytes")]
    ShortHeader,
    #[error("data buffers of a {0} request point the wrong way")]
    DataDirection(&'static str),
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    #[error("sectors {sector}+{bytes} bytes lie beyond the disk end or overflow")]
    OutOfRange { sector: u64, bytes: u64 },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("range flags {0:#x} are not supported")]
    UnsupportedFlags(u32),
    #[error("{0} ranges in one request, the device takes one")]
    TooManyRanges(u64),
    #[error(
        "{segments} data buffers, the largest {largest} bytes: beyond the advertised seg_max \
         {SEG_MAX} / size_max {SEGMENT_MAX_BYTES}"
    )]
    TooLarge { segments: usize, largest: u64 },
    #[error("range of {0} sectors exceeds the advertised maximum")]
    RangeTooLong(u32),
    #[error("host I/O: {0}")]
    Io(#[from] io::Error),
    /// A failed fdatasync leaves the host page cache unreliable: Linux marks the pages it could
    /// not write back clean, so the next fdatasync succeeds although the data never reached
    /// the disk. Once a flush failed, none may succeed (as QEMU does): the guest must not be
    /// told that writes it made before are durable.
    #[error("host I/O: an earlier flush failed, so data written before it may be lost")]
    EarlierFlushFailed,
}

impl RequestError {
    pub(crate) fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::UnsupportedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// Where a request's reads, writes and flushes go: done on the spot ([`SyncIo`]) or queued on
/// an io_uring (see `super::uring`), which completes them later through [`complete`].
pub(crate) trait IoBackend {
    /// Moves the guest buffers `iovecs` from (`ToFile`) or to (`FromFile`) the disk at
    /// `offset`. `ticket` says how to complete the request when the I/O is queued.
    fn transfer(
        &mut self,
        disk: &DiskImage,
        iovecs: GuestIovecs<'_>,
        offset: u64,
        direction: Direction,
        ticket: Ticket,
    ) -> Result<Started, RequestError>;

    /// fdatasync, once the once-failed-flush rule was checked.
    fn flush(&mut self, disk: &DiskImage, ticket: Ticket) -> Result<Started, RequestError>;
}

/// What a queued request needs to complete: its status byte and the bytes it writes into the
/// guest's buffers when it succeeds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ticket {
    pub(crate) status: GuestAddress,
    pub(crate) guest_bytes: u64,
}

/// Whether the I/O of a request is done or queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Started {
    Done,
    Queued,
}

/// The sync engine: preadv/pwritev/fdatasync on the calling thread.
pub(crate) struct SyncIo;

impl IoBackend for SyncIo {
    fn transfer(
        &mut self,
        disk: &DiskImage,
        mut iovecs: GuestIovecs<'_>,
        offset: u64,
        direction: Direction,
        _ticket: Ticket,
    ) -> Result<Started, RequestError> {
        match direction {
            Direction::FromFile => iovecs.read_exact_at(&disk.file, offset)?,
            Direction::ToFile => iovecs.write_all_at(&disk.file, offset)?,
        }
        Ok(Started::Done)
    }

    fn flush(&mut self, disk: &DiskImage, _ticket: Ticket) -> Result<Started, RequestError> {
        disk.file
            .sync_data()
            .map_err(|e| disk.flush_error(RequestError::Io(e)))?;
        Ok(Started::Done)
    }
}

/// Serves one chain and returns the used length: bytes written into device-writable buffers,
/// including the status byte, or 0 when the chain has no usable status byte.
pub(crate) fn handle_request(disk: &DiskImage, mem: &GuestMemoryMmap, chain: Chain<'_>) -> u32 {
    handle_request_counted(disk, mem, chain).0
}

/// [`handle_request`], also returning the request's data bytes as parsed for the I/O (its
/// buffers without header and status), which a rate limiter charges.
pub(crate) fn handle_request_counted(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    chain: Chain<'_>,
) -> (u32, u64) {
    let (used, data_bytes) = start_request(disk, mem, chain, &mut SyncIo);
    // The sync engine never queues.
    (used.unwrap_or(0), data_bytes)
}

/// Starts one chain on `backend`: the used length when it is complete (None while its I/O is
/// queued) and the data bytes a rate limiter charges.
pub(crate) fn start_request(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    chain: Chain<'_>,
    backend: &mut dyn IoBackend,
) -> (Option<u32>, u64) {
    with_scratch(|scratch| serve(disk, mem, chain, scratch, backend))
}

/// [`start_request`] with the buffers it fills (the worker thread's, reused between requests).
fn serve(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    chain: Chain<'_>,
    scratch: &mut ChainScratch,
    backend: &mut dyn IoBackend,
) -> (Option<u32>, u64) {
    let ChainScratch { segments, io, .. } = scratch;
    let buffers = match split_chain(chain, segments) {
        Ok(buffers) => buffers,
        Err(e) => {
            debug!("virtio-blk: dropping request: {e}");
            return (Some(0), 0);
        }
    };
    if !buffers.ends_writable {
        debug!("virtio-blk: dropping request whose last descriptor is not a writable status byte");
        return (Some(0), 0);
    }
    let (readable, mut writable) = (buffers.readable, buffers.writable);
    let Some(status) = writable.take_back(1).and_then(|s| s.first_addr()) else {
        return (Some(0), 0);
    };
    let data_bytes = (readable.len() + writable.len()).saturating_sub(HEADER_LEN);
    let mut ticket = Ticket {
        status,
        guest_bytes: 0,
    };
    let result = match execute(disk, mem, readable, writable, io, &mut ticket, backend) {
        Ok(Started::Queued) => return (None, data_bytes),
        Ok(Started::Done) => Ok(ticket.guest_bytes),
        Err(e) => Err(e),
    };
    (Some(complete(disk, mem, status, result)), data_bytes)
}

/// Ends a request: logs a host failure (once per cause), writes the status byte and returns
/// the used length (0 when the status byte cannot be written). `result` is the number of
/// bytes written into the guest's data buffers, or why the request failed.
pub(crate) fn complete(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    status: GuestAddress,
    result: Result<u64, RequestError>,
) -> u32 {
    let (code, data_len) = match result {
        Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
        Err(e) => {
            // Host-side failures (EIO, ENOSPC) matter to the operator, once per cause; the rest
            // is the guest's doing and would only let it flood the log.
            if matches!(e, RequestError::Io(_) | RequestError::EarlierFlushFailed) {
                let cause = e.to_string();
                if disk.errors.record(&cause) {
                    warn!(
                        "disk {}: request failed: {cause} (logged once per cause; --stats counts all)",
                        disk.name
                    );
                }
            } else {
                debug!("virtio-blk: request failed: {e}");
            }
            (e.status(), 0)
        }
    };
    crate::dirty::mark_guest(mem, status, 1);
    if let Err(e) = mem.write_obj(code, status) {
        debug!("virtio-blk: cannot write the status byte: {e}");
        return 0;
    }
    // The chain is at most 4 GiB (virtio-queue stops iterating past that), so this fits.
    u32::try_from(data_len + 1).unwrap_or(u32::MAX)
}

/// Runs a parsed request, or queues its I/O on `backend`; `ticket.guest_bytes` is set to the
/// number of data bytes it writes into guest buffers.
fn execute(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    mut readable: Segments<'_>,
    writable: Segments<'_>,
    io: &mut IovecScratch,
    ticket: &mut Ticket,
    backend: &mut dyn IoBackend,
) -> Result<Started, RequestError> {
    let header = readable
        .take_front(HEADER_LEN)
        .ok_or(RequestError::ShortHeader)?;
    let mut raw = [0u8; HEADER_LEN as usize];
    header.read_into(mem, &mut raw)?;
    let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let sector = u64::from_le_bytes([
        raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
    ]);
    let data = readable;
    // What the config space advertises is what the device takes: at most SEG_MAX buffers of
    // at most SEGMENT_MAX_BYTES each (so at most 254 MiB per request).
    for buffers in [&data, &writable] {
        let largest = buffers.largest();
        if buffers.count() > usize::from(SEG_MAX) || largest > u64::from(SEGMENT_MAX_BYTES) {
            return Err(RequestError::TooLarge {
                segments: buffers.count(),
                largest,
            });
        }
    }
    match kind {
        VIRTIO_BLK_T_IN => {
            if !data.is_empty() {
                return Err(RequestError::DataDirection("read"));
            }
            let offset = disk.byte_range(sector, writable.len(), true)?;
            ticket.guest_bytes = writable.len();
            let iovecs = writable.iovecs(mem, Permissions::Write, io)?;
            if disk.needs_bounce(offset, writable.len(), iovecs.as_slice()) {
                drop(iovecs);
                direct::read_bounced(disk, mem, &writable, offset)?;
                return Ok(Started::Done);
            }
            backend.transfer(disk, iovecs, offset, Direction::FromFile, *ticket)
        }
        VIRTIO_BLK_T_OUT => {
            if !writable.is_empty() {
                return Err(RequestError::DataDirection("write"));
            }
            disk.check_writable()?;
            let offset = disk.byte_range(sector, data.len(), true)?;
            let iovecs = data.iovecs(mem, Permissions::Read, io)?;
            if disk.needs_bounce(offset, data.len(), iovecs.as_slice()) {
                drop(iovecs);
                direct::write_bounced(disk, mem, &data, offset)?;
                return Ok(Started::Done);
            }
            backend.transfer(disk, iovecs, offset, Direction::ToFile, *ticket)
        }
        VIRTIO_BLK_T_FLUSH => {
            // fdatasync: when the driver sees OK, everything written before is on stable storage.
            if disk.flush_failed.load(Ordering::Relaxed) {
                return Err(RequestError::EarlierFlushFailed);
            }
            backend.flush(disk, *ticket)
        }
        VIRTIO_BLK_T_GET_ID => {
            ticket.guest_bytes = writable.write_from(mem, &disk.id)? as u64;
            Ok(Started::Done)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if !writable.is_empty() {
                return Err(RequestError::DataDirection("discard/write-zeroes"));
            }
            disk.check_writable()?;
            if data.len() % RANGE_LEN != 0 {
                return Err(RequestError::ShortHeader);
            }
            match data.len() / RANGE_LEN {
                0 => Ok(Started::Done),
                1 => {
                    let mut range = [0u8; RANGE_LEN as usize];
                    data.read_into(mem, &mut range)?;
                    disk.erase(kind == VIRTIO_BLK_T_DISCARD, &range)?;
                    Ok(Started::Done)
                }
                n => Err(RequestError::TooManyRanges(n)),
            }
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

impl DiskImage {
    /// Marks the disk's flushes failed for good (see [`RequestError::EarlierFlushFailed`]) and
    /// returns `error`: for whichever engine saw an fdatasync fail.
    pub(crate) fn flush_error(&self, error: RequestError) -> RequestError {
        self.flush_failed.store(true, Ordering::Relaxed);
        error
    }

    fn check_writable(&self) -> Result<(), RequestError> {
        if self.read_only {
            Err(RequestError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Validates `bytes` starting at `sector` against the disk size; returns the byte offset.
    pub(crate) fn byte_range(
        &self,
        sector: u64,
        bytes: u64,
        aligned: bool,
    ) -> Result<u64, RequestError> {
        if aligned && bytes % SECTOR_SIZE != 0 {
            return Err(RequestError::UnalignedLength(bytes));
        }
        let out_of_range = || RequestError::OutOfRange { sector, bytes };
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(out_of_range)?;
        let end = offset.checked_add(bytes).ok_or_else(out_of_range)?;
        if end > self.sectors * SECTOR_SIZE {
            return Err(out_of_range());
        }
        Ok(offset)
    }

    /// DISCARD (`discard`) or WRITE_ZEROES of one `virtio_blk_discard_write_zeroes` range.
    fn erase(&self, discard: bool, range: &[u8; RANGE_LEN as usize]) -> Result<(), RequestError> {
        let sector = u64::from_le_bytes([
            range[0], range[1], range[2], range[3], range[4], range[5], range[6], range[7],
        ]);
        let num_sectors = u32::from_le_bytes([range[8], range[9], range[10], range[11]]);
        let flags = u32::from_le_bytes([range[12], range[13], range[14], range[15]]);
        let allowed_flags = if discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        if flags & !allowed_flags != 0 {
            return Err(RequestError::UnsupportedFlags(flags));
        }
        if num_sectors > MAX_RANGE_SECTORS {
            return Err(RequestError::RangeTooLong(num_sectors));
        }
        let len = u64::from(num_sectors) * SECTOR_SIZE;
        let offset = self.byte_range(sector, len, false)?;
        if len == 0 {
            return Ok(());
        }
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        let mode = if discard || unmap {
            libc::FALLOC_FL_PUNCH_HOLE
        } else {
            libc::FALLOC_FL_ZERO_RANGE
        };
        match fallocate(&self.file, mode | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
            Ok(()) => Ok(()),
            // The filesystem cannot do it. A discard is only a hint, so skipping it is correct;
            // zeroes must still be written.
            Err(e) if is_unsupported(&e) => {
                if discard {
                    Ok(())
                } else {
                    write_zeros(&self.file, offset, len).map_err(RequestError::Io)
                }
            }
            Err(e) => Err(RequestError::Io(e)),
        }
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS)
    )
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let invalid = || io::Error::from_raw_os_error(libc::EINVAL);
    let offset = libc::off_t::try_from(offset).map_err(|_| invalid())?;
    let len = libc::off_t::try_from(len).map_err(|_| invalid())?;
    loop {
        // SAFETY: fallocate only acts on the file behind a valid, owned fd; no memory is passed.
        let ret = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if ret == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn write_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; ZERO_CHUNK];
    let mut done = 0u64;
    while done < len {
        let chunk = (len - done).min(ZERO_CHUNK as u64) as usize;
        file.write_all_at(&zeros[..chunk], offset + done)?;
        done += chunk as u64;
    }
    Ok(())
}

//! Descriptor chains as devices see them: the device-readable bytes followed by the
//! device-writable bytes, each a list of guest memory segments.
//!
//! virtio 1.x (VERSION_1 implies ANY_LAYOUT) lets a driver frame a request over descriptors any
//! way it likes, so devices treat the two halves as byte streams and cut them into header, data
//! and status by length, never by descriptor boundaries. Everything here validates what the guest
//! wrote: direction order, address overflow and that every byte lies in guest RAM, so a hostile
//! chain becomes an error value and never a panic.
//!
//! Nothing here allocates per request: a chain's segments go into a list its caller reuses,
//! header, data and status are views cut from it, and iovecs go into reusable storage as well.
//! The request entry points take these from their thread's [`ChainScratch`] ([`with_scratch`]).

use std::cell::Cell;
use std::io;
use std::marker::PhantomData;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};

use virtio_queue::DescriptorChain;
use vm_memory::volatile_memory::PtrGuardMut;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, Permissions,
};

/// A descriptor chain over the VMM's guest memory.
pub type Chain<'m> = DescriptorChain<&'m GuestMemoryMmap>;

/// The most iovecs one `preadv`/`pwritev`/`writev` call accepts.
const MAX_IOVECS: usize = libc::UIO_MAXIOV as usize;

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("descriptor at {addr:#x} with length {len} wraps around the address space")]
    AddressOverflow { addr: u64, len: u32 },
    #[error("the chain holds {have} bytes where {need} are needed")]
    TooShort { have: u64, need: u64 },
    #[error("the buffers span {0} memory segments, more than one vectored I/O allows")]
    TooManySegments(usize),
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// A run of guest-physical bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub(crate) addr: GuestAddress,
    pub(crate) len: u64,
}

/// Appends a segment to `list`; empty segments are dropped as they carry no bytes.
fn push_segment(list: &mut Vec<Segment>, addr: GuestAddress, len: u64) {
    if len > 0 {
        list.push(Segment { addr, len });
    }
}

/// An ordered list of guest memory segments read or written as one byte stream: a view into a
/// segment list that [`split_chain`] filled, so cutting it into header, data and status copies
/// and allocates nothing.
///
/// Every segment of the view, after trimming `skip` bytes off the first and `cut` bytes off the
/// last, holds at least one byte; an empty view has no segments.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Segments<'s> {
    list: &'s [Segment],
    /// Bytes at the start of `list[0]` that are not part of the stream (taken off the front).
    skip: u64,
    /// Bytes at the end of the last segment that are not part of the stream (taken off the back).
    cut: u64,
    total: u64,
}

impl<'s> Segments<'s> {
    /// The whole of `list`, whose `total` bytes are all in non-empty segments.
    fn whole(list: &'s [Segment], total: u64) -> Self {
        Segments {
            list,
            skip: 0,
            cut: 0,
            total,
        }
    }

    /// The segments of the stream, trimmed to the bytes that belong to it.
    fn iter(&self) -> impl Iterator<Item = Segment> + '_ {
        let last = self.list.len().wrapping_sub(1);
        self.list.iter().enumerate().map(move |(i, seg)| {
            let mut seg = *seg;
            if i == 0 {
                // `split_chain` checked that no segment wraps and `skip` < the segment's length.
                seg.addr = seg.addr.unchecked_add(self.skip);
                seg.len -= self.skip;
            }
            if i == last {
                seg.len -= self.cut;
            }
            seg
        })
    }

    /// The number of bytes in all segments.
    pub(crate) fn len(&self) -> u64 {
        self.total
    }

    /// The length of the largest buffer (0 when there is none).
    pub(crate) fn largest(&self) -> u64 {
        self.iter().map(|s| s.len).max().unwrap_or(0)
    }

    /// The number of (non-empty) buffers.
    pub(crate) fn count(&self) -> usize {
        self.list.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Where the stream starts in guest memory (None when empty): a one-byte status buffer is
    /// remembered this way while its request is in flight.
    pub(crate) fn first_addr(&self) -> Option<GuestAddress> {
        self.iter().next().map(|seg| seg.addr)
    }

    /// The first `n` bytes and the rest; `n` must be at most `self.total`.
    fn split_at(&self, n: u64) -> (Segments<'s>, Segments<'s>) {
        if n == 0 {
            return (Segments::default(), *self);
        }
        if n >= self.total {
            return (*self, Segments::default());
        }
        // The front ends inside (or at the end of) segment `i`, after `within` of its bytes.
        let mut before = 0u64;
        for (i, piece) in self.iter().enumerate() {
            if before + piece.len < n {
                before += piece.len;
                continue;
            }
            let within = n - before;
            let start = if i == 0 { self.skip } else { 0 };
            let front = Segments {
                list: &self.list[..=i],
                skip: self.skip,
                cut: self.list[i].len - start - within,
                total: n,
            };
            // n < total, so bytes remain after the front, and the last segment is among them.
            let rest = if within == piece.len {
                Segments {
                    list: &self.list[i + 1..],
                    skip: 0,
                    cut: self.cut,
                    total: self.total - n,
                }
            } else {
                Segments {
                    list: &self.list[i..],
                    skip: start + within,
                    cut: self.cut,
                    total: self.total - n,
                }
            };
            return (front, rest);
        }
        (*self, Segments::default())
    }

    /// Removes the first `n` bytes and returns them, or `None` (and changes nothing) if there are
    /// fewer than `n`.
    pub(crate) fn take_front(&mut self, n: u64) -> Option<Segments<'s>> {
        if n > self.total {
            return None;
        }
        let (front, rest) = self.split_at(n);
        *self = rest;
        Some(front)
    }

    /// Removes the last `n` bytes and returns them, or `None` if there are fewer than `n`.
    pub(crate) fn take_back(&mut self, n: u64) -> Option<Segments<'s>> {
        let keep = self.total.checked_sub(n)?;
        let (front, back) = self.split_at(keep);
        *self = front;
        Some(back)
    }

    /// Copies the first `buf.len()` bytes of the stream out of guest memory.
    pub(crate) fn read_into(
        &self,
        mem: &GuestMemoryMmap,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        let need = buf.len() as u64;
        if need > self.total {
            return Err(ChainError::TooShort {
                have: self.total,
                need,
            });
        }
        self.for_each_piece(buf.len(), |addr, piece| {
            mem.read_slice(&mut buf[piece], addr)
        })?;
        Ok(())
    }

    /// Copies `data` into guest memory, as much as fits; returns the number of bytes copied.
    pub(crate) fn write_from(
        &self,
        mem: &GuestMemoryMmap,
        data: &[u8],
    ) -> Result<usize, ChainError> {
        self.for_each_piece(data.len(), |addr, piece| {
            crate::dirty::mark_guest(mem, addr, piece.len());
            mem.write_slice(&data[piece], addr)
        })
    }

    /// Lays a host buffer of `len` bytes over the stream and calls `copy` once per segment it
    /// reaches, with the segment's address and the piece of the buffer that falls on it; stops
    /// at the end of the buffer or of the segments. Returns the number of bytes laid over.
    fn for_each_piece(
        &self,
        len: usize,
        mut copy: impl FnMut(GuestAddress, Range<usize>) -> Result<(), GuestMemoryError>,
    ) -> Result<usize, ChainError> {
        let mut done = 0usize;
        for seg in self.iter() {
            if done == len {
                break;
            }
            let chunk = usize::try_from(seg.len)
                .unwrap_or(usize::MAX)
                .min(len - done);
            copy(seg.addr, done..done + chunk)?;
            done += chunk;
        }
        Ok(done)
    }

    /// Resolves the segments to host iovecs for vectored I/O, in `scratch`. `access` is what the
    /// I/O does to guest memory (`Write` for a read from a file into the guest).
    pub(crate) fn iovecs<'a>(
        &self,
        mem: &'a GuestMemoryMmap,
        access: Permissions,
        scratch: &'a mut IovecScratch,
    ) -> Result<GuestIovecs<'a>, ChainError> {
        // Cleared again when `iovecs` is dropped, also on the error returns below.
        let iovecs = GuestIovecs::new(scratch);
        for seg in self.iter() {
            let len = usize::try_from(seg.len).map_err(|_| ChainError::TooShort {
                have: self.total,
                need: seg.len,
            })?;
            // Fully qualified: GuestMemoryMmap also has GuestMemoryBackend::get_slices.
            for slice in GuestMemory::get_slices(mem, seg.addr, len, access)? {
                let slice = slice?;
                let guard = slice.ptr_guard_mut();
                if access.allow(Permissions::Write) {
                    // The I/O writes these bytes past vm-memory: a Diff snapshot must see them.
                    crate::dirty::mark_host(guard.as_ptr(), slice.len());
                }
                iovecs.scratch.iovecs.push(libc::iovec {
                    iov_base: guard.as_ptr().cast(),
                    iov_len: slice.len(),
                });
                iovecs.scratch.guards.push(guard);
            }
        }
        Ok(iovecs)
    }
}

impl PartialEq for Segments<'_> {
    /// The same bytes in the same segments, however each view was cut.
    fn eq(&self, other: &Self) -> bool {
        self.total == other.total && self.iter().eq(other.iter())
    }
}

impl Eq for Segments<'_> {}

/// Where one chain's descriptors lie in a segment list (see [`append_chain`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChainLayout {
    start: usize,
    /// The first device-writable segment.
    split: usize,
    end: usize,
    readable_len: u64,
    writable_len: u64,
    ends_writable: bool,
}

impl ChainLayout {
    /// The chain's halves in `list`, the list [`append_chain`] appended it to.
    pub(crate) fn buffers<'s>(&self, list: &'s [Segment]) -> ChainBuffers<'s> {
        ChainBuffers {
            readable: Segments::whole(&list[self.start..self.split], self.readable_len),
            writable: Segments::whole(&list[self.split..self.end], self.writable_len),
            ends_writable: self.ends_writable,
        }
    }
}

/// The device-readable and device-writable halves of a chain.
#[derive(Debug, Default)]
pub(crate) struct ChainBuffers<'s> {
    pub(crate) readable: Segments<'s>,
    pub(crate) writable: Segments<'s>,
    /// Whether the chain's last descriptor is device-writable and at least one byte long: the
    /// place a status byte goes.
    pub(crate) ends_writable: bool,
}

/// Walks a chain (virtio-queue bounds its length and catches loops) and sorts its descriptors
/// into the readable and writable halves, insisting that readable ones come first. `list` is
/// the caller's to reuse: it is cleared and refilled, so a warm list costs no allocation.
pub(crate) fn split_chain<'s>(
    chain: Chain<'_>,
    list: &'s mut Vec<Segment>,
) -> Result<ChainBuffers<'s>, ChainError> {
    list.clear();
    let layout = append_chain(chain, list)?;
    Ok(layout.buffers(list))
}

/// [`split_chain`] for a caller that holds several chains at once: appends this chain's
/// segments to `list` after those already there and says where they are.
pub(crate) fn append_chain(
    chain: Chain<'_>,
    list: &mut Vec<Segment>,
) -> Result<ChainLayout, ChainError> {
    let start = list.len();
    let mut layout = ChainLayout {
        start,
        split: start,
        end: start,
        readable_len: 0,
        writable_len: 0,
        ends_writable: false,
    };
    for desc in chain {
        let addr = desc.addr();
        let len = u64::from(desc.len());
        if addr.checked_add(len).is_none() {
            return Err(ChainError::AddressOverflow {
                addr: addr.raw_value(),
                len: desc.len(),
            });
        }
        if desc.is_write_only() {
            push_segment(list, addr, len);
            layout.writable_len += len;
        } else if layout.writable_len > 0 {
            return Err(ChainError::ReadableAfterWritable);
        } else {
            // Empty writable descriptors before this one left no segment behind.
            push_segment(list, addr, len);
            layout.readable_len += len;
            layout.split = list.len();
        }
        layout.ends_writable = desc.is_write_only() && len > 0;
    }
    layout.end = list.len();
    Ok(layout)
}

/// Entries a scratch list keeps between requests; a list grown beyond it (by a chain of
/// thousands of descriptors, which only a hostile or broken driver sends) is shrunk back, so
/// one such chain does not pin its memory in the worker for good.
const SCRATCH_KEEP: usize = 1024;

/// The buffers one request's parsing and I/O fill, kept from one request to the next so that a
/// request does not allocate (one per thread, see [`with_scratch`]).
#[derive(Debug, Default)]
pub(crate) struct ChainScratch {
    /// What [`split_chain`] and [`append_chain`] fill.
    pub(crate) segments: Vec<Segment>,
    /// What [`Segments::iovecs`] fills.
    pub(crate) io: IovecScratch,
    /// The chains a receive holds before it knows the frame fits (head index, where it lies in
    /// `segments`).
    pub(crate) chains: Vec<(u16, ChainLayout)>,
}

impl ChainScratch {
    const fn new() -> Self {
        ChainScratch {
            segments: Vec::new(),
            io: IovecScratch::new(),
            chains: Vec::new(),
        }
    }

    /// Empties the lists and gives back what a huge chain made them grow to.
    fn release(&mut self) {
        self.segments.clear();
        self.segments.shrink_to(SCRATCH_KEEP);
        self.chains.clear();
        self.chains.shrink_to(SCRATCH_KEEP);
        self.io.clear();
        self.io.iovecs.shrink_to(SCRATCH_KEEP);
        self.io.guards.shrink_to(SCRATCH_KEEP);
    }
}

/// Runs `f` with this thread's [`ChainScratch`]. A device's requests are served on its worker
/// thread (a vhost-user backend's on its vring threads), so the scratch is in effect the
/// worker's, without a parameter through the device entry points. A nested call (none exists
/// today) gets a fresh scratch rather than a panic.
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut ChainScratch) -> R) -> R {
    thread_local! {
        static SCRATCH: Cell<ChainScratch> = const { Cell::new(ChainScratch::new()) };
    }
    // Taken out for the call (leaving an empty one, which costs nothing) and put back after.
    let mut scratch = SCRATCH.try_with(Cell::take).unwrap_or_default();
    let result = f(&mut scratch);
    scratch.release();
    // Fails only while the thread exits; the scratch is then simply dropped.
    let _ = SCRATCH.try_with(|cell| cell.set(scratch));
    result
}

/// Reusable storage for the host iovecs of one vectored I/O.
#[derive(Debug, Default)]
pub(crate) struct IovecScratch {
    iovecs: Vec<libc::iovec>,
    /// Keeps the host mappings pinned for backends that map on demand (a no-op for plain mmap).
    guards: Vec<PtrGuardMut>,
}

impl IovecScratch {
    const fn new() -> Self {
        IovecScratch {
            iovecs: Vec::new(),
            guards: Vec::new(),
        }
    }

    fn clear(&mut self) {
        self.iovecs.clear();
        self.guards.clear();
    }
}

/// Host iovecs pointing into guest memory, valid while the memory borrow `'a` lives; they are
/// cleared from the scratch they live in when this is dropped.
pub(crate) struct GuestIovecs<'a> {
    scratch: &'a mut IovecScratch,
    _memory: PhantomData<&'a GuestMemoryMmap>,
}

impl<'a> GuestIovecs<'a> {
    fn new(scratch: &'a mut IovecScratch) -> Self {
        scratch.clear();
        GuestIovecs {
            scratch,
            _memory: PhantomData,
        }
    }
}

impl Drop for GuestIovecs<'_> {
    fn drop(&mut self) {
        // No pointer into guest memory outlives the borrow of it, and the guards are released.
        self.scratch.clear();
    }
}

impl GuestIovecs<'_> {
    /// Fills the buffers completely from `file` at `offset`; end of file is an error.
    pub(crate) fn read_exact_at(
        &mut self,
        file: &(impl AsRawFd + ?Sized),
        offset: u64,
    ) -> io::Result<()> {
        self.transfer_at(file.as_raw_fd(), offset, Direction::FromFile)
    }

    /// Writes the buffers completely to `file` at `offset`.
    pub(crate) fn write_all_at(
        &mut self,
        file: &(impl AsRawFd + ?Sized),
        offset: u64,
    ) -> io::Result<()> {
        self.transfer_at(file.as_raw_fd(), offset, Direction::ToFile)
    }

    /// Writes all buffers with a single `writev`: one frame for a tap or a datagram socket.
    pub(crate) fn write_once(&self, fd: &(impl AsRawFd + ?Sized)) -> io::Result<usize> {
        let iovecs = &self.scratch.iovecs;
        if iovecs.len() > MAX_IOVECS {
            return Err(io::Error::other(ChainError::TooManySegments(iovecs.len())));
        }
        loop {
            // SAFETY: the iovecs point into guest memory that stays mapped while `'a` lives and
            // were bounds-checked by get_slices; writev only reads from them.
            let n = unsafe {
                libc::writev(fd.as_raw_fd(), iovecs.as_ptr(), iovecs.len() as libc::c_int)
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    fn transfer_at(&mut self, fd: RawFd, offset: u64, direction: Direction) -> io::Result<()> {
        transfer_iovecs(&mut self.scratch.iovecs, fd, offset, direction)
    }

    /// The host iovecs, for an I/O submitted elsewhere (io_uring) while the memory borrow lives.
    pub(crate) fn as_slice(&self) -> &[libc::iovec] {
        &self.scratch.iovecs
    }
}

/// Moves all of `iovecs` from or to `fd` at `offset` with preadv/pwritev, resuming after short
/// transfers (normal for large requests); the iovecs are advanced past what was done.
///
/// # Safety contract (checked by callers, not the compiler)
/// The iovecs must point into guest memory that stays mapped for the call, as
/// [`Segments::iovecs`] makes them.
pub(crate) fn transfer_iovecs(
    iovecs: &mut [libc::iovec],
    fd: RawFd,
    offset: u64,
    direction: Direction,
) -> io::Result<()> {
    let mut offset = offset;
    let mut first = 0;
    while first < iovecs.len() {
        let batch = &iovecs[first..iovecs.len().min(first + MAX_IOVECS)];
        let file_offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let n = match direction {
            // SAFETY: the iovecs point into mapped guest memory checked by get_slices (the
            // caller keeps it mapped); preadv writes at most their total length.
            Direction::FromFile => unsafe {
                libc::preadv(fd, batch.as_ptr(), batch.len() as libc::c_int, file_offset)
            },
            // SAFETY: as above; pwritev only reads from the iovecs.
            Direction::ToFile => unsafe {
                libc::pwritev(fd, batch.as_ptr(), batch.len() as libc::c_int, file_offset)
            },
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(match direction {
                Direction::FromFile => io::ErrorKind::UnexpectedEof.into(),
                Direction::ToFile => io::ErrorKind::WriteZero.into(),
            });
        }
        offset += n as u64;
        first += advance_iovecs(&mut iovecs[first..], n as usize);
    }
    Ok(())
}

/// Drops `done` bytes off the front of `iovecs`, splitting the first partial one; returns how
/// many iovecs were used up entirely.
pub(crate) fn advance_iovecs(iovecs: &mut [libc::iovec], mut done: usize) -> usize {
    let mut first = 0;
    while done > 0 && first < iovecs.len() {
        let iov = &mut iovecs[first];
        if done >= iov.iov_len {
            done -= iov.iov_len;
            first += 1;
        } else {
            // SAFETY: `done < iov_len`, so the advanced pointer stays inside the buffer.
            iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(done) }.cast();
            iov.iov_len -= done;
            done = 0;
        }
    }
    first
}

/// Which way a vectored I/O moves data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    FromFile,
    ToFile,
}

#[cfg(test)]
mod tests;

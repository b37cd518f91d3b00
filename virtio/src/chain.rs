//! Descriptor chains as devices see them: the device-readable bytes followed by the
//! device-writable bytes, each a list of guest memory segments.
//!
//! virtio 1.x (VERSION_1 implies ANY_LAYOUT) lets a driver frame a request over descriptors any
//! way it likes, so devices treat the two halves as byte streams and cut them into header, data
//! and status by length, never by descriptor boundaries. Everything here validates what the guest
//! wrote: direction order, address overflow and that every byte lies in guest RAM, so a hostile
//! chain becomes an error value and never a panic.

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

/// An ordered list of guest memory segments read or written as one byte stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Segments {
    list: Vec<Segment>,
    total: u64,
}

impl Segments {
    /// Appends a segment; empty segments are dropped as they carry no bytes.
    pub(crate) fn push(&mut self, addr: GuestAddress, len: u64) {
        if len > 0 {
            self.list.push(Segment { addr, len });
            self.total += len;
        }
    }

    /// The number of bytes in all segments.
    pub(crate) fn len(&self) -> u64 {
        self.total
    }

    /// The length of the largest buffer (0 when there is none).
    pub(crate) fn largest(&self) -> u64 {
        self.list.iter().map(|s| s.len).max().unwrap_or(0)
    }

    /// The number of (non-empty) buffers.
    pub(crate) fn count(&self) -> usize {
        self.list.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Removes the first `n` bytes and returns them, or `None` (and changes nothing) if there are
    /// fewer than `n`.
    pub(crate) fn take_front(&mut self, n: u64) -> Option<Segments> {
        if n > self.total {
            return None;
        }
        let mut front = Segments::default();
        let mut rest = Segments::default();
        let mut need = n;
        for seg in self.list.drain(..) {
            if need >= seg.len {
                need -= seg.len;
                front.push(seg.addr, seg.len);
            } else {
                // `split_chain` checked that no segment wraps, so the split point is in range.
                front.push(seg.addr, need);
                rest.push(seg.addr.unchecked_add(need), seg.len - need);
                need = 0;
            }
        }
        *self = rest;
        Some(front)
    }

    /// Removes the last `n` bytes and returns them, or `None` if there are fewer than `n`.
    pub(crate) fn take_back(&mut self, n: u64) -> Option<Segments> {
        let keep = self.total.checked_sub(n)?;
        let front = self.take_front(keep)?;
        Some(std::mem::replace(self, front))
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
        for seg in &self.list {
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

    /// Resolves the segments to host iovecs for vectored I/O. `access` is what the I/O does to
    /// guest memory (`Write` for a read from a file into the guest).
    pub(crate) fn iovecs<'m>(
        &self,
        mem: &'m GuestMemoryMmap,
        access: Permissions,
    ) -> Result<GuestIovecs<'m>, ChainError> {
        let mut iovecs = Vec::with_capacity(self.list.len());
        let mut guards = Vec::with_capacity(self.list.len());
        for seg in &self.list {
            let len = usize::try_from(seg.len).map_err(|_| ChainError::TooShort {
                have: self.total,
                need: seg.len,
            })?;
            // Fully qualified: GuestMemoryMmap also has GuestMemoryBackend::get_slices.
            for slice in GuestMemory::get_slices(mem, seg.addr, len, access)? {
                let slice = slice?;
                let guard = slice.ptr_guard_mut();
                iovecs.push(libc::iovec {
                    iov_base: guard.as_ptr().cast(),
                    iov_len: slice.len(),
                });
                guards.push(guard);
            }
        }
        Ok(GuestIovecs {
            iovecs,
            _guards: guards,
            _memory: PhantomData,
        })
    }
}

/// The device-readable and device-writable halves of a chain.
#[derive(Debug, Default)]
pub(crate) struct ChainBuffers {
    pub(crate) readable: Segments,
    pub(crate) writable: Segments,
    /// Whether the chain's last descriptor is device-writable and at least one byte long: the
    /// place a status byte goes.
    pub(crate) ends_writable: bool,
}

/// Walks a chain (virtio-queue bounds its length and catches loops) and sorts its descriptors
/// into the readable and writable halves, insisting that readable ones come first.
pub(crate) fn split_chain(chain: Chain<'_>) -> Result<ChainBuffers, ChainError> {
    let mut buffers = ChainBuffers::default();
    for desc in chain {
        let addr = desc.addr();
        if addr.checked_add(u64::from(desc.len())).is_none() {
            return Err(ChainError::AddressOverflow {
                addr: addr.raw_value(),
                len: desc.len(),
            });
        }
        if desc.is_write_only() {
            buffers.writable.push(addr, u64::from(desc.len()));
        } else if !buffers.writable.is_empty() {
            return Err(ChainError::ReadableAfterWritable);
        } else {
            buffers.readable.push(addr, u64::from(desc.len()));
        }
        buffers.ends_writable = desc.is_write_only() && desc.len() > 0;
    }
    Ok(buffers)
}

/// Host iovecs pointing into guest memory, valid while the memory borrow `'m` lives.
pub(crate) struct GuestIovecs<'m> {
    iovecs: Vec<libc::iovec>,
    /// Keeps the host mappings pinned for backends that map on demand (a no-op for plain mmap).
    _guards: Vec<PtrGuardMut>,
    _memory: PhantomData<&'m GuestMemoryMmap>,
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
        if self.iovecs.len() > MAX_IOVECS {
            return Err(io::Error::other(ChainError::TooManySegments(
                self.iovecs.len(),
            )));
        }
        loop {
            // SAFETY: the iovecs point into guest memory that stays mapped while `'m` lives and
            // were bounds-checked by get_slices; writev only reads from them.
            let n = unsafe {
                libc::writev(
                    fd.as_raw_fd(),
                    self.iovecs.as_ptr(),
                    self.iovecs.len() as libc::c_int,
                )
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
        let mut offset = offset;
        let mut first = 0;
        // Skip past completed iovecs, splitting the first partial one, until all are done; short
        // transfers are normal for large requests.
        while first < self.iovecs.len() {
            let batch = &self.iovecs[first..self.iovecs.len().min(first + MAX_IOVECS)];
            let file_offset = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            let n = match direction {
                // SAFETY: the iovecs point into mapped guest memory checked by get_slices, valid
                // for the lifetime of `self`; preadv writes at most their total length.
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
            let mut done = n as usize;
            offset += done as u64;
            while done > 0 && first < self.iovecs.len() {
                let iov = &mut self.iovecs[first];
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
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Direction {
    FromFile,
    ToFile,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(parts: &[(u64, u64)]) -> Segments {
        let mut s = Segments::default();
        for &(addr, len) in parts {
            s.push(GuestAddress(addr), len);
        }
        s
    }

    #[test]
    fn take_front_and_back_split_segments() {
        let mut s = segments(&[(0x1000, 10), (0x2000, 0), (0x3000, 6)]);
        assert_eq!(s.len(), 16);
        let front = s.take_front(12).unwrap();
        assert_eq!(front, segments(&[(0x1000, 10), (0x3000, 2)]));
        assert_eq!(s, segments(&[(0x3002, 4)]));
        let back = s.take_back(1).unwrap();
        assert_eq!(back, segments(&[(0x3005, 1)]));
        assert_eq!(s, segments(&[(0x3002, 3)]));
        assert!(s.take_front(4).is_none());
        assert!(s.take_back(4).is_none());
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn copies_across_segments() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let s = segments(&[(0x100, 3), (0x200, 5)]);
        assert_eq!(s.write_from(&mem, b"abcdefghij").unwrap(), 8);
        let mut buf = [0u8; 8];
        s.read_into(&mem, &mut buf).unwrap();
        assert_eq!(&buf, b"abcdefgh");
        let mut too_big = [0u8; 9];
        assert!(matches!(
            s.read_into(&mem, &mut too_big),
            Err(ChainError::TooShort { have: 8, need: 9 })
        ));
        // Outside guest memory.
        let bad = segments(&[(0xfff0, 0x20)]);
        assert!(bad.iovecs(&mem, Permissions::Read).is_err());
    }
}

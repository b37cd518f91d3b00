//! Guest RAM mapped at 2 MiB-aligned host addresses.
//!
//! KVM maps guest memory with 2 MiB pages (one NPT/EPT entry, one TLB entry) only where the
//! host backs it with a huge page *and* the guest-physical and host-virtual addresses agree
//! modulo 2 MiB. Guest RAM starts at guest-physical 0, but a plain `mmap` returns any 4 KiB
//! boundary, so without this every guest page is a 4 KiB mapping however the host backs it:
//! 512 times the nested page faults on first touch and far more TLB misses afterwards. In the
//! emulated host the guest's first writes to fresh memory ran 3-6x slower than Firecracker's,
//! which aligns its guest memory the same way (BENCHMARKS.md, "Boot").
//!
//! vm-memory maps only at addresses the kernel picks, so pvm maps the ranges itself: reserve
//! 2 MiB more than needed, map the range over the first aligned address inside (MAP_FIXED
//! within pvm's own reservation), trim the rest. vm-memory gets the mapping as a raw one, and
//! [`MappedRange`] unmaps it when the last reference to its region is gone.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

/// The host-address alignment of every guest RAM range (the x86 huge page size).
pub const ALIGNMENT: usize = 2 << 20;

/// How a range is mapped: the `mmap` protection and flags, and the file behind it, if any.
pub struct Spec {
    pub prot: libc::c_int,
    pub flags: libc::c_int,
    pub file: Option<FileOffset>,
}

/// Maps `size` bytes as `spec` says at a 2 MiB-aligned address; returns the address.
fn map_aligned(size: usize, spec: &Spec) -> io::Result<*mut u8> {
    let reserve = size
        .checked_add(ALIGNMENT)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a new inaccessible anonymous mapping at an address the kernel picks; no existing
    // memory is touched.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let start = base as usize;
    let aligned = start.next_multiple_of(ALIGNMENT);
    let (fd, offset) = match &spec.file {
        Some(f) => (f.file().as_raw_fd(), f.start()),
        None => (-1, 0),
    };
    let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput);
    let mapped = offset.map_err(io::Error::from).and_then(|offset| {
        // SAFETY: MAP_FIXED replaces only pages of the reservation just made, which nothing
        // else uses: [aligned, aligned + size) lies within [start, start + reserve).
        let addr = unsafe {
            libc::mmap(
                aligned as *mut libc::c_void,
                size,
                spec.prot,
                spec.flags | libc::MAP_FIXED,
                fd,
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            Err(io::Error::last_os_error())
        } else {
            Ok(addr)
        }
    });
    if let Err(e) = mapped {
        // SAFETY: the whole reservation is pvm's own and unused.
        unsafe { libc::munmap(base, reserve) };
        return Err(e);
    }
    let head = aligned - start;
    let tail = start + reserve - (aligned + size);
    // SAFETY: the head and tail are the unused ends of the reservation, outside the range.
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((aligned + size) as *mut libc::c_void, tail);
        }
    }
    Ok(aligned as *mut u8)
}

/// A guest RAM region at `start` of `size` bytes, mapped as `spec` says at a 2 MiB-aligned
/// host address, and the handle that unmaps it.
pub fn region(start: GuestAddress, size: usize, spec: Spec) -> io::Result<MappedRange> {
    let addr = map_aligned(size, &spec)?;
    let unmap = |e: io::Error| {
        // SAFETY: the mapping was just made here and is referenced by nothing yet.
        unsafe { libc::munmap(addr.cast(), size) };
        e
    };
    let mut builder = MmapRegionBuilder::new(size)
        .with_mmap_prot(spec.prot)
        .with_mmap_flags(spec.flags);
    if let Some(file) = spec.file {
        builder = builder.with_file_offset(file);
    }
    // SAFETY: `addr` is a mapping of `size` bytes with these protection and flags, made above,
    // which stays mapped until the `MappedRange` returned releases it (see its drop).
    let mapping = unsafe { builder.with_raw_mmap_pointer(addr) }
        .build()
        .map_err(|e| unmap(io::Error::other(e)))?;
    let region = GuestRegionMmap::new(mapping, start)
        .ok_or_else(|| unmap(io::ErrorKind::InvalidInput.into()))?;
    Ok(MappedRange {
        region: Some(Arc::new(region)),
    })
}

/// A region [`region`] mapped. Cloned into guest memory (`GuestMemoryMmap::from_arc_regions`),
/// the region may be held by devices and vCPUs too; dropping this unmaps it only if nobody
/// else holds it any more, otherwise the mapping stays until the process ends (a device that
/// still holds guest memory must never find it unmapped).
#[derive(Debug)]
pub struct MappedRange {
    region: Option<Arc<GuestRegionMmap>>,
}

impl MappedRange {
    pub fn region(&self) -> Arc<GuestRegionMmap> {
        self.region.clone().expect("present until drop")
    }
}

impl Drop for MappedRange {
    fn drop(&mut self) {
        let Some(region) = self.region.take() else {
            return;
        };
        if let Ok(region) = Arc::try_unwrap(region) {
            use vm_memory::GuestMemoryRegion;
            let (addr, len) = (region.as_ptr(), region.len() as usize);
            drop(region);
            // SAFETY: this was the last reference to the region (vm-memory's own is not an
            // owning one), so no one can reach the mapping any more.
            unsafe { libc::munmap(addr.cast(), len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap, GuestMemoryRegion};

    fn anonymous() -> Spec {
        Spec {
            prot: libc::PROT_READ | libc::PROT_WRITE,
            flags: libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            file: None,
        }
    }

    /// Whether `addr` is mapped in this process (mincore fails with ENOMEM where it is not).
    fn is_mapped(addr: *mut u8) -> bool {
        let mut vec = 0u8;
        // SAFETY: mincore only reads the page tables; `vec` holds one page's byte.
        unsafe { libc::mincore(addr.cast(), 4096, &mut vec) == 0 }
    }

    #[test]
    fn ranges_are_aligned_usable_and_unmapped_with_the_last_reference() {
        for size in [4096usize, 64 << 20, (6 << 20) + 4096] {
            let range = region(GuestAddress(0x10_0000), size, anonymous()).unwrap();
            let region = range.region();
            let addr = region.as_ptr();
            assert_eq!(addr as usize % ALIGNMENT, 0, "size {size}");
            assert_eq!(region.len() as usize, size);
            let memory = GuestMemoryMmap::from_arc_regions(vec![region]).unwrap();
            let last = GuestAddress(0x10_0000 + size as u64 - 8);
            memory.write_obj(0x1234_5678_u64, last).unwrap();
            assert_eq!(memory.read_obj::<u64>(last).unwrap(), 0x1234_5678);
            // Still referenced by `memory`: dropping the handle leaves it mapped.
            drop(range);
            assert!(is_mapped(addr));
            assert_eq!(memory.read_obj::<u64>(last).unwrap(), 0x1234_5678);
            drop(memory);
        }
        // The last reference goes with the handle: the range is unmapped.
        let range = region(GuestAddress(0), 8 << 20, anonymous()).unwrap();
        let addr = range.region().as_ptr();
        assert!(is_mapped(addr));
        drop(range);
        assert!(!is_mapped(addr));
    }

    #[test]
    fn a_file_range_maps_the_file_at_its_offset() {
        let file = crate::memfd::with_bytes(c"aligned-test", &[7u8; 3 * 4096]).unwrap();
        let spec = Spec {
            prot: libc::PROT_READ | libc::PROT_WRITE,
            flags: libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            file: Some(FileOffset::new(file, 4096)),
        };
        let range = region(GuestAddress(0), 2 * 4096, spec).unwrap();
        let memory = GuestMemoryMmap::from_arc_regions(vec![range.region()]).unwrap();
        assert_eq!(memory.read_obj::<u8>(GuestAddress(0)).unwrap(), 7);
        assert_eq!(range.region().as_ptr() as usize % ALIGNMENT, 0);
        assert!(range.region().file_offset().is_some());
    }
}

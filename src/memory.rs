//! Guest RAM: anonymous MAP_NORESERVE mappings (vm-memory), advised for transparent hugepages,
//! registered with KVM one slot per range. With a vhost-user device the RAM must be shared with
//! the backend process: each range is then a memfd mapped MAP_SHARED, whose descriptor pvm hands
//! over in SET_MEM_TABLE.

use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot create shareable guest memory (memfd of {size} bytes): {source}")]
    Memfd { size: u64, source: std::io::Error },
    #[error("KVM refused guest memory slot {slot}: {source}")]
    RegisterSlot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// Maps the guest's RAM (not yet visible to KVM); `shared` backs it with memfds another process
/// can map (vhost-user).
pub fn create(mem_bytes: u64, shared: bool) -> Result<GuestMemoryMmap, Error> {
    let mut ranges = Vec::new();
    for (start, size) in layout::ram_ranges(mem_bytes) {
        let file = if shared {
            Some(FileOffset::new(memfd(size)?, 0))
        } else {
            None
        };
        ranges.push((start, size as usize, file));
    }
    let memory = GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(|source| Error::Map {
        size: mem_bytes,
        source,
    })?;
    for region in memory.iter() {
        // SAFETY: the range is a mapping vm-memory owns for the life of `memory`; MADV_HUGEPAGE
        // only changes how the kernel backs it. Failure (no THP) is harmless, so it is ignored.
        unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            );
        }
    }
    Ok(memory)
}

/// A memfd of `size` bytes (sparse: pages are allocated as the guest touches them).
fn memfd(size: u64) -> Result<File, Error> {
    let fail = |source| Error::Memfd { size, source };
    // SAFETY: the name is a NUL-terminated string that outlives the call; no other memory is
    // passed.
    let fd = unsafe { libc::memfd_create(c"pvm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(fail)?;
    Ok(file)
}

/// Makes every region of `memory` guest-physical memory of `vm`.
pub fn register(vm: &VmFd, memory: &GuestMemoryMmap) -> Result<(), Error> {
    for (slot, region) in memory.iter().enumerate() {
        let slot = slot as u32;
        let entry = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the host range stays mapped for as long as the VM exists: `memory` is kept by
        // the Vm that owns `vm` and is dropped after it.
        unsafe { vm.set_user_memory_region(entry) }
            .map_err(|source| Error::RegisterSlot { slot, source })?;
    }
    Ok(())
}

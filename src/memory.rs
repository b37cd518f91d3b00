//! Guest RAM: anonymous MAP_NORESERVE mappings (vm-memory), advised for transparent hugepages,
//! registered with KVM one slot per range.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("KVM refused guest memory slot {slot}: {source}")]
    RegisterSlot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// Maps the guest's RAM (not yet visible to KVM).
pub fn create(mem_bytes: u64) -> Result<GuestMemoryMmap, Error> {
    let ranges: Vec<_> = layout::ram_ranges(mem_bytes)
        .into_iter()
        .map(|(start, size)| (start, size as usize))
        .collect();
    let memory = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| Error::Map {
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

//! Guest RAM: anonymous MAP_NORESERVE mappings (vm-memory), advised for transparent hugepages,
//! registered with KVM one slot per range. With a vhost-user device the RAM must be shared with
//! the backend process: each range is then a memfd mapped MAP_SHARED, whose descriptor pvm hands
//! over in SET_MEM_TABLE.
//!
//! [`VmMemory`] owns the VM fd and the RAM together, so that the one thing KVM requires of the
//! RAM, that it stays mapped while a slot points at it, is kept by one type's drop.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

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
    #[error("cannot map the memory file ({size} bytes at offset {offset}): {source}")]
    MapFile {
        size: u64,
        offset: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("the memory file's mappings do not make guest memory: {0}")]
    Regions(vm_memory::GuestRegionCollectionError),
    #[error("KVM refused guest memory slot {slot}: {source}")]
    RegisterSlot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// The KVM VM and the guest RAM registered with it.
///
/// KVM reads and writes a slot's host range until the slot is deleted, and a VM's slots outlive
/// any one fd of it: the vCPU fds, irqfds and the GSI router's fd clone keep the VM alive. So
/// rather than rely on which fd closes last, dropping a `VmMemory` deletes every slot it
/// registered first and only then releases its reference to the RAM.
#[derive(Debug)]
pub struct VmMemory {
    vm: Arc<VmFd>,
    /// The regions are reference-counted mappings (device workers and vCPUs hold clones); this
    /// reference keeps them mapped at least until the slots below are deleted.
    memory: GuestMemoryMmap,
    /// The slots registered so far, deleted on drop.
    slots: Vec<kvm_userspace_memory_region>,
}

impl VmMemory {
    /// Maps `mem_bytes` of guest RAM and makes it guest-physical memory of `vm`; `shared` backs
    /// it with memfds another process can map (vhost-user).
    pub fn new(vm: Arc<VmFd>, mem_bytes: u64, shared: bool) -> Result<Self, Error> {
        let mut owned = VmMemory {
            vm,
            memory: create(mem_bytes, shared)?,
            slots: Vec::new(),
        };
        // On an error the slots registered so far are deleted when `owned` drops.
        owned.register()?;
        Ok(owned)
    }

    /// Guest RAM from a snapshot's memory file (already checked to hold `mem_bytes`), each
    /// range mapped MAP_PRIVATE from its offset: pages are read when first touched, and the
    /// guest's writes stay in this process.
    pub fn from_file(vm: Arc<VmFd>, mem_bytes: u64, file: &File) -> Result<Self, Error> {
        let mut owned = VmMemory {
            vm,
            memory: map_file(mem_bytes, file)?,
            slots: Vec::new(),
        };
        owned.register()?;
        Ok(owned)
    }

    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm
    }

    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Makes every region of the RAM a slot of the VM.
    fn register(&mut self) -> Result<(), Error> {
        for (slot, region) in self.memory.iter().enumerate() {
            let slot = slot as u32;
            let entry = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: KVM may access the host range until the slot is deleted. The range is a
            // mapping of `self.memory`, and `Drop` deletes every slot recorded in `self.slots`
            // before `self.memory` is released (or, if deleting fails, never releases it). A
            // slot KVM refused is not recorded and was never visible to it.
            unsafe { self.vm.set_user_memory_region(entry) }
                .map_err(|source| Error::RegisterSlot { slot, source })?;
            self.slots.push(entry);
        }
        Ok(())
    }
}

impl Drop for VmMemory {
    fn drop(&mut self) {
        for mut entry in self.slots.drain(..).rev() {
            entry.memory_size = 0;
            // SAFETY: a zero size deletes the slot; when the ioctl returns KVM no longer uses
            // its host range. No memory is handed to KVM.
            if let Err(e) = unsafe { self.vm.set_user_memory_region(entry) } {
                // KVM may still use the range: it must never be unmapped (and reused) while
                // the VM exists, so this reference to the RAM is leaked. pvm is ending anyway.
                log::error!(
                    "cannot delete guest memory slot {}: {e}; the guest RAM stays mapped",
                    entry.slot
                );
                std::mem::forget(self.memory.clone());
                return;
            }
        }
    }
}

/// Maps the guest's RAM (not yet visible to KVM); `shared` backs it with memfds another process
/// can map (vhost-user).
fn create(mem_bytes: u64, shared: bool) -> Result<GuestMemoryMmap, Error> {
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

/// The RAM ranges of a `mem_bytes` guest mapped privately from `file`, back to back.
fn map_file(mem_bytes: u64, file: &File) -> Result<GuestMemoryMmap, Error> {
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, size) in layout::ram_ranges(mem_bytes) {
        let fail = |source| Error::MapFile {
            size,
            offset,
            source,
        };
        let descriptor = file
            .try_clone()
            .map_err(|e| fail(vm_memory::mmap::MmapRegionError::Mmap(e)))?;
        let mapping = MmapRegionBuilder::new(size as usize)
            .with_file_offset(FileOffset::new(descriptor, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(fail)?;
        // Ranges come from the layout, sorted and apart: a region always fits its start.
        let region = GuestRegionMmap::new(mapping, start)
            .ok_or_else(|| fail(vm_memory::mmap::MmapRegionError::InvalidPointer))?;
        regions.push(region);
        offset += size;
    }
    GuestMemoryMmap::from_regions(regions).map_err(Error::Regions)
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

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn dropping_vm_memory_deletes_its_slots_though_the_vm_lives_on() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("no usable /dev/kvm: test skipped");
            return;
        };
        // Another mapping for a slot over the same guest range; it outlives the VM (locals
        // drop in reverse order), as a registered range must.
        let other = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        let ram = VmMemory::new(vm.clone(), 64 << 20, false).unwrap();
        assert_eq!(ram.guest_memory().iter().count(), 1);
        let overlapping = kvm_userspace_memory_region {
            slot: 7,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 0x1000,
            userspace_addr: other.iter().next().unwrap().as_ptr() as u64,
        };
        // SAFETY: `other` is mapped until after `vm` is gone.
        let refused = unsafe { vm.set_user_memory_region(overlapping) };
        assert_eq!(
            refused.map_err(|e| e.errno()),
            Err(libc::EEXIST),
            "guest RAM's slot is in the way"
        );
        drop(ram);
        // SAFETY: as above.
        unsafe { vm.set_user_memory_region(overlapping) }
            .expect("the RAM's slot was deleted when VmMemory dropped");
    }
}

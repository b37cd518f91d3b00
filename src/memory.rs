//! Guest RAM: anonymous MAP_NORESERVE mappings (vm-memory), advised for transparent hugepages,
//! registered with KVM one slot per range. With a vhost-user device the RAM must be shared with
//! the backend process: each range is then a memfd mapped MAP_SHARED, whose descriptor pvm hands
//! over in SET_MEM_TABLE. With 2 MiB huge pages (`--huge-pages 2M`, Firecracker's `huge_pages`)
//! each range is a hugetlbfs memfd, mapped MAP_SHARED (so vhost-user works the same), whose pages
//! are all allocated up front: a host short of huge pages fails the VM's build with the numbers,
//! instead of the guest dying of SIGBUS when it first touches a page nobody could give it.
//!
//! [`VmMemory`] owns the VM fd and the RAM together, so that the one thing KVM requires of the
//! RAM, that it stays mapped while a slot points at it, is kept by one type's drop.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::config::{GuestPages, HUGE_PAGE_BYTES};
use crate::layout;
use crate::memory_map::{self, MappedRange, Spec};
use crate::uffd::backend::PageServer;

/// Where the kernel counts the host's free 2 MiB huge pages.
const FREE_HUGE_PAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map { size: u64, source: std::io::Error },
    #[error("cannot create shareable guest memory (memfd of {size} bytes): {source}")]
    Memfd { size: u64, source: std::io::Error },
    #[error(
        "{mib} MiB of guest memory on 2 MiB huge pages needs {needed} free huge pages and the \
         host has {free} ({FREE_HUGE_PAGES}); reserve more with \
         `echo N > /proc/sys/vm/nr_hugepages`"
    )]
    TooFewHugePages { mib: u64, needed: u64, free: u64 },
    #[error("cannot read how many huge pages are free ({FREE_HUGE_PAGES}): {0}")]
    FreeHugePages(std::io::Error),
    #[error("cannot allocate {size} bytes of guest memory on 2 MiB huge pages: {source}")]
    HugePages { size: u64, source: std::io::Error },
    #[error("cannot map the memory file ({size} bytes at offset {offset}): {source}")]
    MapFile {
        size: u64,
        offset: u64,
        source: std::io::Error,
    },
    #[error("the guest memory mappings do not make guest memory: {0}")]
    Regions(vm_memory::GuestRegionCollectionError),
    #[error(transparent)]
    PageServer(#[from] crate::uffd::backend::BackendError),
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
    /// pvm's own handles on the regions' mappings (2 MiB-aligned, see `memory_map`): each
    /// unmaps its range once nothing else references it. Declared after `memory`, so that
    /// its reference is gone first.
    ranges: Vec<MappedRange>,
    /// The slots registered so far, deleted on drop.
    slots: Vec<kvm_userspace_memory_region>,
    /// Which pages were written since the last snapshot, with track_dirty_pages.
    dirty: Option<crate::snapshot::dirty::DirtyTracking>,
    /// The page-fault handler serving the RAM (mem_backend Uffd); dropped after the RAM's
    /// slots are deleted, as the fields drop after `Drop::drop`.
    page_server: Option<PageServer>,
}

impl VmMemory {
    /// Maps `mem_bytes` of guest RAM on `pages` and makes it guest-physical memory of `vm`;
    /// `shared` backs it with memfds another process can map (vhost-user).
    pub fn new(
        vm: Arc<VmFd>,
        mem_bytes: u64,
        shared: bool,
        pages: GuestPages,
    ) -> Result<Self, Error> {
        Self::registered(vm, create(mem_bytes, shared, pages)?, None)
    }

    /// Guest RAM from a snapshot's memory file (already checked to hold `mem_bytes`), each
    /// range mapped MAP_PRIVATE from its offset: pages are read when first touched, and the
    /// guest's writes stay in this process.
    pub fn from_file(vm: Arc<VmFd>, mem_bytes: u64, file: &File) -> Result<Self, Error> {
        Self::registered(vm, map_file(mem_bytes, file)?, None)
    }

    /// Guest RAM served by the page-fault handler at `socket` (Firecracker's Uffd backend):
    /// anonymous private memory, nothing of it touched, registered with a userfaultfd that
    /// goes to the handler with the regions' mappings; every page's first touch waits for it.
    pub fn from_uffd(vm: Arc<VmFd>, mem_bytes: u64, socket: &Path) -> Result<Self, Error> {
        // Not advised for huge pages: the handler fills the RAM a 4 KiB page at a time.
        let mapped = map_ranges(mem_bytes, false, GuestPages::Normal)?;
        let page_server = PageServer::start(socket, &mapped.0)?;
        Self::registered(vm, mapped, Some(page_server))
    }

    /// The RAM `mapped` (and the page server filling it, if any) made guest-physical memory
    /// of `vm`, one slot per region.
    fn registered(
        vm: Arc<VmFd>,
        (memory, ranges): (GuestMemoryMmap, Vec<MappedRange>),
        page_server: Option<PageServer>,
    ) -> Result<Self, Error> {
        let mut owned = VmMemory {
            vm,
            memory,
            ranges,
            slots: Vec::new(),
            dirty: None,
            page_server,
        };
        // On an error the slots registered so far are deleted when `owned` drops.
        owned.register()?;
        Ok(owned)
    }

    /// The page-fault handler serving the RAM, if one does.
    pub fn page_server(&self) -> Option<&PageServer> {
        self.page_server.as_ref()
    }

    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm
    }

    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Logs every write to guest RAM from now on (track_dirty_pages): KVM the vCPUs'
    /// (KVM_MEM_LOG_DIRTY_PAGES on every slot), pvm-virtio's log the devices'. `restored_from`
    /// is the id of the snapshot the RAM was mapped from; a booted VM's RAM is all marked
    /// instead, as what pvm loaded into it (kernel, boot data) is in neither log.
    pub fn track_dirty_pages(&mut self, restored_from: Option<u64>) -> Result<(), Error> {
        for entry in &mut self.slots {
            entry.flags |= kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
            // SAFETY: the same slot over the same host range as registered (see `register`);
            // only its flags change, which KVM applies in place.
            unsafe { self.vm.set_user_memory_region(*entry) }.map_err(|source| {
                Error::RegisterSlot {
                    slot: entry.slot,
                    source,
                }
            })?;
        }
        let log = pvm_virtio::dirty::DirtyLog::track(&self.memory);
        if restored_from.is_none() {
            log.mark_all();
        }
        self.dirty = Some(crate::snapshot::dirty::DirtyTracking::new(
            log,
            restored_from,
        ));
        Ok(())
    }

    /// The dirty page log, when the VM tracks dirty pages.
    pub fn dirty_tracking(&self) -> Option<&crate::snapshot::dirty::DirtyTracking> {
        self.dirty.as_ref()
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
                std::mem::forget(std::mem::take(&mut self.ranges));
                return;
            }
        }
    }
}

/// Maps the guest's RAM (not yet visible to KVM), advised for transparent huge pages; `shared`
/// backs it with memfds another process can map (vhost-user). Huge pages are always memfds, so
/// always shareable.
fn create(
    mem_bytes: u64,
    shared: bool,
    pages: GuestPages,
) -> Result<(GuestMemoryMmap, Vec<MappedRange>), Error> {
    let (memory, ranges) = map_ranges(mem_bytes, shared, pages)?;
    for region in memory.iter().filter(|_| pages == GuestPages::Normal) {
        // SAFETY: the range is a mapping pvm owns for the life of `memory`; MADV_HUGEPAGE
        // only changes how the kernel backs it. Failure (no THP) is harmless, so it is ignored.
        unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            );
        }
    }
    Ok((memory, ranges))
}

/// The guest's RAM ranges, each mapped at a 2 MiB-aligned address (`memory_map`), as
/// [`create`] describes, without advice.
fn map_ranges(
    mem_bytes: u64,
    shared: bool,
    pages: GuestPages,
) -> Result<(GuestMemoryMmap, Vec<MappedRange>), Error> {
    if pages == GuestPages::Huge2M {
        check_free_huge_pages(mem_bytes, read_free_huge_pages()?)?;
    }
    let mut ranges = Vec::new();
    for (start, size) in layout::ram_ranges(mem_bytes) {
        let file = match pages {
            GuestPages::Huge2M => Some(FileOffset::new(huge_memfd(mem_bytes, size)?, 0)),
            GuestPages::Normal if shared => Some(FileOffset::new(memfd(size)?, 0)),
            GuestPages::Normal => None,
        };
        // As vm-memory maps them: memfds shared (vhost-user maps them too), the rest private.
        let flags = match file {
            Some(_) => libc::MAP_SHARED | libc::MAP_NORESERVE,
            None => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        };
        let spec = Spec {
            prot: libc::PROT_READ | libc::PROT_WRITE,
            flags,
            file,
        };
        let len = usize::try_from(size).map_err(|_| Error::Map {
            size: mem_bytes,
            source: std::io::ErrorKind::InvalidInput.into(),
        })?;
        let range = memory_map::region(start, len, spec).map_err(|source| Error::Map {
            size: mem_bytes,
            source,
        })?;
        ranges.push(range);
    }
    let memory =
        GuestMemoryMmap::from_arc_regions(ranges.iter().map(MappedRange::region).collect())
            .map_err(Error::Regions)?;
    Ok((memory, ranges))
}

/// The RAM ranges of a `mem_bytes` guest mapped privately from `file`, back to back.
fn map_file(mem_bytes: u64, file: &File) -> Result<(GuestMemoryMmap, Vec<MappedRange>), Error> {
    let mut ranges = Vec::new();
    let mut offset = 0u64;
    for (start, size) in layout::ram_ranges(mem_bytes) {
        let fail = |source| Error::MapFile {
            size,
            offset,
            source,
        };
        let descriptor = file.try_clone().map_err(fail)?;
        let len =
            usize::try_from(size).map_err(|_| fail(std::io::ErrorKind::InvalidInput.into()))?;
        let spec = Spec {
            prot: libc::PROT_READ | libc::PROT_WRITE,
            flags: libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            file: Some(FileOffset::new(descriptor, offset)),
        };
        ranges.push(memory_map::region(start, len, spec).map_err(fail)?);
        offset += size;
    }
    let memory =
        GuestMemoryMmap::from_arc_regions(ranges.iter().map(MappedRange::region).collect())
            .map_err(Error::Regions)?;
    Ok((memory, ranges))
}

/// A memfd of `size` bytes (sparse: pages are allocated as the guest touches them).
fn memfd(size: u64) -> Result<File, Error> {
    let fail = |source| Error::Memfd { size, source };
    let file = create_memfd(libc::MFD_CLOEXEC).map_err(fail)?;
    file.set_len(size).map_err(fail)?;
    Ok(file)
}

/// A hugetlbfs memfd of `size` bytes (part of `mem_bytes` of guest RAM) with every 2 MiB page
/// allocated now: hugetlbfs has no swap and no overcommit, so a page it cannot give later would
/// be a SIGBUS in whichever thread touched it.
fn huge_memfd(mem_bytes: u64, size: u64) -> Result<File, Error> {
    let fail = |source| Error::HugePages { size, source };
    let file =
        create_memfd(libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB).map_err(fail)?;
    file.set_len(size).map_err(fail)?;
    let len =
        libc::off_t::try_from(size).map_err(|_| fail(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: fallocate on a descriptor this function owns; no memory is passed.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } != 0 {
        let source = std::io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            // Someone took the pages between the check and now: say so with today's numbers.
            let free = read_free_huge_pages()?;
            check_free_huge_pages(mem_bytes, free)?;
        }
        return Err(fail(source));
    }
    Ok(file)
}

/// A new memfd with `flags`.
fn create_memfd(flags: libc::c_uint) -> std::io::Result<File> {
    // SAFETY: the name is a NUL-terminated string that outlives the call; no other memory is
    // passed.
    let fd = unsafe { libc::memfd_create(c"pvm-guest-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The host's free 2 MiB huge pages; a kernel without them (no hugetlbfs) has none.
fn read_free_huge_pages() -> Result<u64, Error> {
    match std::fs::read_to_string(FREE_HUGE_PAGES) {
        Ok(text) => text.trim().parse().map_err(|_| {
            Error::FreeHugePages(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not a number: {:?}", text.trim()),
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(Error::FreeHugePages(e)),
    }
}

/// Refuses `mem_bytes` of huge-page RAM when fewer than its pages are free.
fn check_free_huge_pages(mem_bytes: u64, free: u64) -> Result<(), Error> {
    let needed = mem_bytes.div_ceil(HUGE_PAGE_BYTES);
    if free < needed {
        return Err(Error::TooFewHugePages {
            mib: mem_bytes >> 20,
            needed,
            free,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn dropping_vm_memory_deletes_its_slots_though_the_vm_lives_on() {
        let Some(kvm) = crate::kvm_host::kvm_for_tests() else {
            return;
        };
        // Another mapping for a slot over the same guest range; it outlives the VM (locals
        // drop in reverse order), as a registered range must.
        let other = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        let ram = VmMemory::new(vm.clone(), 64 << 20, false, GuestPages::Normal).unwrap();
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

    #[test]
    fn too_few_huge_pages_is_refused_with_the_numbers() {
        let e = check_free_huge_pages(128 << 20, 10)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("128 MiB") && e.contains("needs 64 free huge pages") && e.contains("has 10"),
            "{e}"
        );
        assert!(check_free_huge_pages(128 << 20, 64).is_ok());
        // Reading the host's count works (0 when the kernel has no hugetlbfs).
        let free = read_free_huge_pages().unwrap();
        if free < 32 {
            let e = create(64 << 20, false, GuestPages::Huge2M).unwrap_err();
            assert!(
                matches!(e, Error::TooFewHugePages { needed: 32, .. }),
                "{e}"
            );
        }
    }
}

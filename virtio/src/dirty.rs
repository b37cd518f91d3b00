//! The pages of guest RAM pvm's devices wrote, for Diff snapshots.
//!
//! KVM logs what the vCPUs write (KVM_GET_DIRTY_LOG), but not what this process writes into
//! guest RAM: used-ring entries, received frames, disk reads into the guest's buffers (preadv
//! and io_uring write through raw iovecs, past any accessor), random bytes, balloon discards.
//! Those writes are marked here, in one bitmap per RAM region, which the VMM ORs with KVM's.
//!
//! Tracking is off unless a VMM turns it on for its RAM ([`DirtyLog::track`]). Every marking
//! function first loads one atomic counter and returns when nothing is tracked, so a VM without
//! `track_dirty_pages` pays a load and a branch per device write and its memory type stays the
//! plain `GuestMemoryMmap`. Marks are keyed by host address: a write into a mapping nobody
//! tracks (another VM's, a test's) marks nothing.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The granularity of the log: KVM's dirty log counts 4 KiB pages as well.
pub const PAGE_BYTES: usize = 4096;

/// How many [`DirtyLog`]s exist: zero keeps every marking function to one load.
static TRACKING: AtomicUsize = AtomicUsize::new(0);
/// Every tracked region of every live [`DirtyLog`].
static REGIONS: RwLock<Vec<Arc<RegionLog>>> = RwLock::new(Vec::new());

/// One RAM region's bitmap: bit `n` is page `n` of the region.
#[derive(Debug)]
pub struct RegionLog {
    host: usize,
    len: usize,
    bits: Box<[AtomicU64]>,
}

impl RegionLog {
    fn new(host: usize, len: usize) -> Self {
        let words = len.div_ceil(PAGE_BYTES).div_ceil(64);
        RegionLog {
            host,
            len,
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Marks the pages of `offset..offset + len` (clamped to the region).
    fn mark(&self, offset: usize, len: usize) {
        let end = offset.saturating_add(len).min(self.len);
        if len == 0 || offset >= end {
            return;
        }
        for page in offset / PAGE_BYTES..=(end - 1) / PAGE_BYTES {
            if let Some(word) = self.bits.get(page / 64) {
                word.fetch_or(1 << (page % 64), Ordering::Relaxed);
            }
        }
    }

    /// The bitmap (64 pages a word, KVM's layout), cleared as it is read.
    pub fn take(&self) -> Vec<u64> {
        self.bits
            .iter()
            .map(|w| w.swap(0, Ordering::Relaxed))
            .collect()
    }

    /// Marks every page.
    fn mark_all(&self) {
        self.mark(0, self.len);
    }
}

/// The device-write log of one guest's RAM, a [`RegionLog`] per region in the memory's order.
/// Tracking ends when it is dropped.
#[derive(Debug)]
pub struct DirtyLog {
    regions: Vec<Arc<RegionLog>>,
}

impl DirtyLog {
    /// Starts logging the writes pvm's devices make into `memory`.
    pub fn track(memory: &GuestMemoryMmap) -> DirtyLog {
        let regions: Vec<Arc<RegionLog>> = memory
            .iter()
            .map(|r| Arc::new(RegionLog::new(r.as_ptr() as usize, r.len() as usize)))
            .collect();
        let mut all = REGIONS.write().unwrap_or_else(PoisonError::into_inner);
        all.extend(regions.iter().cloned());
        TRACKING.fetch_add(1, Ordering::Release);
        DirtyLog { regions }
    }

    /// The log of region `index` (the memory's order).
    pub fn region(&self, index: usize) -> Option<&RegionLog> {
        self.regions.get(index).map(|r| &**r)
    }

    /// Marks all of RAM: what pvm wrote before tracking began (the kernel it loaded, a
    /// restored file's pages) is in no log.
    pub fn mark_all(&self) {
        for region in &self.regions {
            region.mark_all();
        }
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        let mut all = REGIONS.write().unwrap_or_else(PoisonError::into_inner);
        all.retain(|r| !self.regions.iter().any(|mine| Arc::ptr_eq(r, mine)));
        TRACKING.fetch_sub(1, Ordering::Release);
    }
}

/// Whether any RAM is tracked; marking is a no-op otherwise.
#[inline]
fn tracking() -> bool {
    TRACKING.load(Ordering::Relaxed) != 0
}

/// Marks `len` bytes at host address `ptr` as written, when they lie in tracked RAM.
#[inline]
pub fn mark_host(ptr: *const u8, len: usize) {
    if len != 0 && tracking() {
        mark_host_slow(ptr as usize, len);
    }
}

#[cold]
fn mark_host_slow(start: usize, len: usize) {
    let end = start.saturating_add(len);
    let all = REGIONS.read().unwrap_or_else(PoisonError::into_inner);
    for region in all.iter() {
        let from = start.max(region.host);
        let to = end.min(region.host + region.len);
        if from < to {
            region.mark(from - region.host, to - from);
        }
    }
}

/// Marks `len` bytes of guest RAM at `addr` of `mem` as written (the parts that are RAM).
#[inline]
pub fn mark_guest(mem: &GuestMemoryMmap, addr: GuestAddress, len: usize) {
    if len == 0 || !tracking() {
        return;
    }
    let start = addr.0;
    let end = start.saturating_add(len as u64);
    for region in mem.iter() {
        let (base, size) = (region.start_addr().0, region.len());
        let from = start.max(base);
        let to = end.min(base.saturating_add(size));
        if from < to {
            // In bounds of the region's mapping: from - base < size.
            let host = region.as_ptr() as usize + (from - base) as usize;
            mark_host_slow(host, (to - from) as usize);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The dirty pages of region `index`, as page numbers.
    pub(crate) fn pages(log: &DirtyLog, index: usize) -> Vec<usize> {
        let bits = log.region(index).unwrap().take();
        (0..bits.len() * 64)
            .filter(|p| bits[p / 64] & (1 << (p % 64)) != 0)
            .collect()
    }

    #[test]
    fn marks_land_on_the_pages_written_and_only_in_tracked_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10_000),
            (GuestAddress(0x100_000), 0x10_000),
        ])
        .unwrap();
        let other = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_000)]).unwrap();
        // Nothing is tracked yet (in this memory): marks go nowhere.
        mark_guest(&mem, GuestAddress(0x1000), 1);
        let log = DirtyLog::track(&mem);
        assert!(pages(&log, 0).is_empty());
        mark_guest(&mem, GuestAddress(0x1fff), 2); // straddles pages 1 and 2
        mark_guest(&other, GuestAddress(0x5000), 1); // untracked mapping
        mark_guest(&mem, GuestAddress(0xf000), 0x100_000); // runs past region 0 into the gap and region 1
        mark_guest(&mem, GuestAddress(u64::MAX - 1), 100); // hostile: wraps, no RAM
        assert_eq!(pages(&log, 0), vec![1, 2, 15]);
        assert_eq!(pages(&log, 1), (0..15).collect::<Vec<_>>());
        mark_guest(&mem, GuestAddress(0x10_f000), 0x2000); // the last page, and beyond
        assert_eq!(pages(&log, 1), vec![15]);
        assert!(pages(&log, 0).is_empty(), "take clears");
        let host = mem.iter().next().unwrap().as_ptr();
        mark_host(host.wrapping_add(0x3000), 0x1001);
        assert_eq!(pages(&log, 0), vec![3, 4]);
        log.mark_all();
        assert_eq!(pages(&log, 1).len(), 16);
        drop(log);
        assert!(
            !REGIONS
                .read()
                .unwrap()
                .iter()
                .any(|r| r.host == host as usize)
        );
    }
}

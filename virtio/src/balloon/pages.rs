//! Guest pages the balloon holds, and giving guest memory back to the host.
//!
//! The driver names pages by 4 KiB page frame number. None is trusted: a number outside guest
//! RAM, one already in the balloon (inflate) or one not in it (deflate) is refused and counted,
//! never acted on. Returning memory is madvise on pvm's mapping of guest RAM: MADV_DONTNEED for
//! the anonymous private mapping (the pages are freed, a later guest access faults in zeros),
//! MADV_REMOVE for memfd-backed shared RAM (vhost-user), where DONTNEED would only drop pvm's
//! view and leave the pages in the memfd.

use std::io;

use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

/// The balloon's page size, fixed by the virtio spec whatever the guest's page size.
pub const PAGE_SIZE: u64 = 4096;
const PAGE_SHIFT: u32 = 12;

/// Which pages of guest RAM are in the balloon: one bit per 4 KiB page frame up to the end of
/// RAM (the hole below 4 GiB included, which costs a few bits and keeps the lookup simple).
#[derive(Debug)]
pub(crate) struct PageTracker {
    bits: Vec<u64>,
    frames: u64,
}

/// What became of a page number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PageVerdict {
    Accepted,
    /// Not a page of guest RAM.
    OutOfRange,
    /// Inflated while in the balloon, or deflated while not in it.
    Repeated,
}

impl PageTracker {
    pub(crate) fn new(memory: &GuestMemoryMmap) -> Self {
        let end = memory.last_addr().raw_value().saturating_add(1);
        let frames = end >> PAGE_SHIFT;
        PageTracker {
            bits: vec![0; frames.div_ceil(64) as usize],
            frames,
        }
    }

    /// How many pages are in the balloon.
    #[cfg(test)]
    pub(crate) fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The bitmap, for a snapshot.
    pub(crate) fn words(&self) -> &[u64] {
        &self.bits
    }

    /// A tracker for `memory` holding the pages of a snapshot's bitmap; `Err(Some(pfn))`
    /// names a page that is not guest RAM, `Err(None)` a bitmap of the wrong length.
    pub(crate) fn from_words(memory: &GuestMemoryMmap, words: &[u64]) -> Result<Self, Option<u64>> {
        let mut tracker = PageTracker::new(memory);
        if words.len() != tracker.bits.len() {
            return Err(None);
        }
        for (index, &word) in (0u64..).zip(words) {
            let mut rest = word;
            while rest != 0 {
                let pfn = index * 64 + u64::from(rest.trailing_zeros());
                rest &= rest - 1;
                let page = u32::try_from(pfn).map_err(|_| Some(pfn))?;
                if tracker.mark(memory, page, true) != PageVerdict::Accepted {
                    return Err(Some(pfn));
                }
            }
        }
        Ok(tracker)
    }

    /// Puts `pfn` into the balloon (inflate) or takes it out (deflate).
    pub(crate) fn mark(
        &mut self,
        memory: &GuestMemoryMmap,
        pfn: u32,
        inflate: bool,
    ) -> PageVerdict {
        let pfn = u64::from(pfn);
        if pfn >= self.frames || !is_ram(memory, GuestAddress(pfn << PAGE_SHIFT), PAGE_SIZE) {
            return PageVerdict::OutOfRange;
        }
        let (word, bit) = ((pfn / 64) as usize, 1u64 << (pfn % 64));
        let Some(slot) = self.bits.get_mut(word) else {
            return PageVerdict::OutOfRange;
        };
        if (*slot & bit != 0) == inflate {
            return PageVerdict::Repeated;
        }
        *slot ^= bit;
        PageVerdict::Accepted
    }
}

/// Whether `addr..addr + len` lies inside one region of guest RAM.
fn is_ram(memory: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> bool {
    let Some(region) = memory.find_region(addr) else {
        return false;
    };
    let offset = addr.raw_value() - region.start_addr().raw_value();
    offset
        .checked_add(len)
        .is_some_and(|end| end <= region.len())
}

/// Runs of consecutive page frames, so that a buffer of neighbouring pages costs one madvise.
#[derive(Debug, Default)]
pub(crate) struct Runs {
    start: u64,
    pages: u64,
}

impl Runs {
    /// Adds `pfn`; returns the finished run (start address, bytes) when `pfn` does not extend
    /// the current one.
    pub(crate) fn push(&mut self, pfn: u32) -> Option<(GuestAddress, u64)> {
        let pfn = u64::from(pfn);
        if self.pages > 0 && pfn == self.start + self.pages {
            self.pages += 1;
            return None;
        }
        let done = self.take();
        self.start = pfn;
        self.pages = 1;
        done
    }

    /// The run in progress, if any.
    pub(crate) fn take(&mut self) -> Option<(GuestAddress, u64)> {
        let pages = std::mem::take(&mut self.pages);
        (pages > 0).then(|| (GuestAddress(self.start << PAGE_SHIFT), pages * PAGE_SIZE))
    }
}

/// Why guest memory could not be returned to the host.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    #[error("{len} bytes at guest address {addr:#x} are not inside one region of guest RAM")]
    NotRam { addr: u64, len: u64 },
    #[error("madvise of {len} bytes at guest address {addr:#x} failed: {source}")]
    Madvise {
        addr: u64,
        len: u64,
        source: io::Error,
    },
}

/// Gives the whole pages within `addr..addr + len` back to the host (a partial page at either
/// end stays); returns the bytes given back. The range must lie in one region of guest RAM.
pub(crate) fn discard(
    memory: &GuestMemoryMmap,
    addr: GuestAddress,
    len: u64,
) -> Result<u64, DiscardError> {
    let not_ram = || DiscardError::NotRam {
        addr: addr.raw_value(),
        len,
    };
    if !is_ram(memory, addr, len) {
        return Err(not_ram());
    }
    let start = addr.raw_value().next_multiple_of(PAGE_SIZE);
    let end = (addr.raw_value() + len) & !(PAGE_SIZE - 1);
    if end <= start {
        return Ok(0);
    }
    let region = memory.find_region(addr).ok_or_else(not_ram)?;
    let offset = MemoryRegionAddress(start - region.start_addr().raw_value());
    let host = region.get_host_address(offset).map_err(|_| not_ram())?;
    let advice = if region.file_offset().is_some() {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    let bytes = end - start;
    // The pages change (to zeros, or back to a restored file's contents): a Diff snapshot
    // must carry them.
    crate::dirty::mark_host(host.cast_const(), bytes as usize);
    if cfg!(fuzzing) {
        // The fuzz harness keeps its rings in the same small RAM and checks them afterwards; a
        // guest ballooning its own rings only hurts itself, but would void those checks. The
        // range checks above are what is fuzzed; the unit tests cover the madvise itself.
        return Ok(bytes);
    }
    // SAFETY: `host..host + bytes` lies inside the region's mapping (checked above), which
    // lives as long as `memory`. Both advices only drop the pages' contents: the guest sees
    // zeros on its next access, which the balloon protocol allows for pages the driver gave
    // up. No Rust reference into guest memory is held across the call.
    let rc = unsafe { libc::madvise(host.cast(), bytes as usize, advice) };
    if rc != 0 {
        return Err(DiscardError::Madvise {
            addr: start,
            len: bytes,
            source: io::Error::last_os_error(),
        });
    }
    Ok(bytes)
}

//! The kernel vhost dirty log: a bitmap in pvm's memory in which a kernel vhost worker sets a
//! bit for every 4 KiB page of guest-physical memory it writes (received frames, used rings),
//! once its instance acked VHOST_F_LOG_ALL and was given the bitmap's address
//! (VHOST_SET_LOG_BASE). Those writes come from the kernel on pvm's behalf, so neither KVM's
//! dirty log nor pvm-virtio's sees them; a Diff snapshot ORs this log in as well.
//!
//! Layout (the kernel's, include/uapi/linux/vhost.h): bit `n` of the bitmap is guest page `n`,
//! counted from guest-physical address 0; the kernel sets bits with atomic byte-addressed bit
//! operations, which on a little-endian host are bit `n % 64` of 64-bit word `n / 64`. One
//! bitmap serves every vhost instance of a VM: the bits are set atomically, whichever sets them.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap};

/// The size of the page one bit stands for (VHOST_PAGE_SIZE).
pub const LOG_PAGE_BYTES: u64 = 4096;

/// A guest's vhost dirty log, covering guest-physical pages 0 up to its highest RAM page.
pub struct VhostLog {
    /// The kernel writes into these words through the address [`VhostLog::base`] gives it,
    /// for as long as an instance has the address: every holder of that address holds an
    /// `Arc` of the log, so the words outlive the kernel's use of them.
    words: Box<[AtomicU64]>,
    pages: u64,
}

impl VhostLog {
    /// A clean log of `pages` guest pages.
    pub fn new(pages: u64) -> Self {
        let words = pages.div_ceil(64);
        VhostLog {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// A clean log large enough for every RAM page of `memory`: the kernel checks that the
    /// bitmap covers each region of the memory table (log_access_ok) before it logs into it.
    pub fn for_memory(memory: &GuestMemoryMmap) -> Self {
        let end = memory.last_addr().raw_value().saturating_add(1);
        VhostLog::new(end.div_ceil(LOG_PAGE_BYTES))
    }

    /// How many guest pages the log covers.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The bitmap's address, for VHOST_SET_LOG_BASE.
    pub(crate) fn base(&self) -> u64 {
        self.words.as_ptr() as u64
    }

    /// Marks guest page `page` as the kernel does (a page past the log is ignored).
    pub fn mark(&self, page: u64) {
        if let Some(word) = usize::try_from(page / 64)
            .ok()
            .filter(|_| page < self.pages)
            .and_then(|index| self.words.get(index))
        {
            word.fetch_or(1 << (page % 64), Ordering::Relaxed);
        }
    }

    /// Takes and clears the bits of guest pages `first..first + pages`, as a bitmap of 64 pages
    /// a word whose bit 0 is page `first` (KVM's layout for one memory slot). Bits outside the
    /// range stay in the log, though they share a word with it; pages past the log read clean.
    pub fn take(&self, first: u64, pages: u64) -> Vec<u64> {
        let mut out = vec![0u64; usize::try_from(pages.div_ceil(64)).unwrap_or(0)];
        let end = first.saturating_add(pages).min(self.pages);
        let mut page = first;
        while page < end {
            let (word, bit) = (page / 64, page % 64);
            // This word's part of the range: bits `bit..bit + count`.
            let count = (64 - bit).min(end - page);
            let mask = if count == 64 {
                u64::MAX
            } else {
                ((1u64 << count) - 1) << bit
            };
            let Some(cell) = usize::try_from(word)
                .ok()
                .and_then(|index| self.words.get(index))
            else {
                break;
            };
            // Clearing only the taken bits, atomically: the kernel may set others meanwhile.
            let taken = (cell.fetch_and(!mask, Ordering::Relaxed) & mask) >> bit;
            place(&mut out, page - first, count, taken);
            page += count;
        }
        out
    }
}

impl std::fmt::Debug for VhostLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the bits: a large guest has millions.
        f.debug_struct("VhostLog")
            .field("pages", &self.pages)
            .finish()
    }
}

/// Puts the `count` low bits of `bits` into `out` from bit `at` on.
fn place(out: &mut [u64], at: u64, count: u64, bits: u64) {
    let (index, shift) = ((at / 64) as usize, at % 64);
    if let Some(word) = out.get_mut(index) {
        *word |= bits << shift;
    }
    if shift != 0 && shift + count > 64 {
        if let Some(word) = out.get_mut(index + 1) {
            *word |= bits >> (64 - shift);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn pages_of(bits: &[u64]) -> Vec<u64> {
        (0..bits.len() as u64 * 64)
            .filter(|p| bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
            .collect()
    }

    #[test]
    fn the_log_covers_every_ram_page_up_to_the_last() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10_000),
            (GuestAddress(0x100_000), 0x3000),
        ])
        .unwrap();
        let log = VhostLog::for_memory(&memory);
        assert_eq!(log.pages(), 0x103);
        assert_eq!(log.words.len(), 5);
        assert_eq!(log.base() % 8, 0, "the kernel's words are u64-aligned");
    }

    #[test]
    fn taking_a_range_returns_its_bits_from_bit_zero_and_clears_only_them() {
        let log = VhostLog::new(300);
        for page in [0, 63, 64, 100, 127, 128, 200, 299] {
            log.mark(page);
        }
        log.mark(300); // past the log: ignored, not a panic
        log.mark(u64::MAX);
        // An aligned range: words as they are.
        assert_eq!(pages_of(&log.take(0, 64)), [0, 63]);
        assert_eq!(pages_of(&log.take(0, 64)), [] as [u64; 0], "take clears");
        // An unaligned range shifts the bits down and leaves its neighbours' bits set.
        let taken = log.take(100, 100);
        assert_eq!(taken.len(), 2);
        assert_eq!(pages_of(&taken), [0, 27, 28]);
        assert_eq!(pages_of(&log.take(64, 236)), [0, 136, 235]);
        // A range running past the log reads clean there.
        log.mark(299);
        assert_eq!(pages_of(&log.take(290, 1000)), [9]);
        assert!(log.take(u64::MAX - 10, 100).iter().all(|w| *w == 0));
        assert!(log.take(5, 0).is_empty());
    }

    #[test]
    fn a_word_shared_by_two_ranges_gives_each_its_own_bits() {
        let log = VhostLog::new(128);
        for page in 0..128 {
            log.mark(page);
        }
        // Ranges of 40 + 60 + 28 pages cut words 0 and 1 in the middle.
        let a = log.take(0, 40);
        let b = log.take(40, 60);
        let c = log.take(100, 28);
        assert_eq!(pages_of(&a), (0..40).collect::<Vec<_>>());
        assert_eq!(pages_of(&b), (0..60).collect::<Vec<_>>());
        assert_eq!(pages_of(&c), (0..28).collect::<Vec<_>>());
        assert!(log.take(0, 128).iter().all(|w| *w == 0));
    }
}

//! Snapshot restore with a page-fault handler (`mem_backend` `Uffd`), Firecracker's contract:
//! the restored VM's RAM is anonymous private memory registered with a userfaultfd in MISSING
//! mode; pvm connects to the handler's Unix socket and sends ONE message, the JSON list of
//! [`RegionMapping`]s (where each RAM range lives in this process and where its contents are
//! in the memory file) with the userfaultfd attached by SCM_RIGHTS. The handler then serves
//! every first touch of a page (UFFDIO_COPY / UFFDIO_ZEROPAGE).
//!
//! [`backend`] is pvm's side, [`handler`] the reference handler (`pvm uffd-handler`), which
//! takes Firecracker's message as well as pvm's: this module's parser is what both share, and
//! what the fuzz target feeds.

pub mod backend;
pub mod handler;

use serde::{Deserialize, Serialize};

/// The page size pvm's RAM uses (no huge pages on restore).
pub const PAGE_SIZE: u64 = 4096;
/// The longest mappings message the handler reads: a few regions take well under 1 KiB.
pub const MAX_MESSAGE: usize = 64 << 10;
/// At most this many regions (pvm sends one or two, Firecracker a handful).
pub const MAX_REGIONS: usize = 64;

/// One RAM range: its contents are `size` bytes at `offset` of the memory file and go to
/// `base_host_virt_addr` in the VMM. Firecracker's field names and units (bytes); its
/// `page_size_kib` is, despite the name, the page size in bytes too, and is sent for the
/// handlers written against older Firecracker versions, which knew only that field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionMapping {
    pub base_host_virt_addr: u64,
    pub size: u64,
    pub offset: u64,
    pub page_size: u64,
    pub page_size_kib: u64,
}

/// A mappings message as a handler may receive it: either page size field may be missing
/// (older Firecracker sent only `page_size_kib`), unknown fields are ignored as Firecracker's
/// own handlers do, so a newer VMM's additions do not break the handler.
#[derive(Debug, Deserialize)]
struct ReceivedMapping {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    #[serde(default)]
    page_size: Option<u64>,
    #[serde(default)]
    page_size_kib: Option<u64>,
}

/// A checked region: page-aligned, inside the memory file, apart from every other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub host: u64,
    pub size: u64,
    pub offset: u64,
}

impl Region {
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.host && addr - self.host < self.size
    }
}

/// The checked mappings: the regions and the one page size they share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mappings {
    pub regions: Vec<Region>,
    pub page_size: u64,
}

impl Mappings {
    /// The region holding host address `addr`.
    pub fn find(&self, addr: u64) -> Option<&Region> {
        self.regions.iter().find(|r| r.contains(addr))
    }
}

/// Why a mappings message was refused: one line naming what is wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("the mappings message is not a JSON list of region mappings: {0}")]
    Json(String),
    #[error("the mappings message lists no region")]
    Empty,
    #[error("the mappings message lists {0} regions; at most {MAX_REGIONS} are taken")]
    TooMany(usize),
    #[error("region {0}: no page size (page_size or page_size_kib)")]
    NoPageSize(usize),
    #[error("region {index}: page_size {page_size} and page_size_kib {kib} disagree")]
    PageSizes {
        index: usize,
        page_size: u64,
        kib: u64,
    },
    #[error("region {index}: page size {page_size} is not a power of two of at least 4096")]
    BadPageSize { index: usize, page_size: u64 },
    #[error("region {index}: page size {page_size}, region 0's is {first}; one size is served")]
    MixedPageSizes {
        index: usize,
        page_size: u64,
        first: u64,
    },
    #[error(
        "region {index}: address {host:#x}, size {size} or offset {offset} is not a multiple \
         of the page size {page_size}, or the size is 0"
    )]
    Unaligned {
        index: usize,
        host: u64,
        size: u64,
        offset: u64,
        page_size: u64,
    },
    #[error(
        "region {index}: bytes {offset}..+{size} of the memory file are past its end ({file} \
         bytes)"
    )]
    OutsideFile {
        index: usize,
        offset: u64,
        size: u64,
        file: u64,
    },
    #[error("region {index}: address {host:#x} + size {size} wraps around")]
    Wraps { index: usize, host: u64, size: u64 },
    #[error("regions {0} and {1} overlap (in the VMM's addresses or in the memory file)")]
    Overlap(usize, usize),
}

/// pvm's message for `regions` (host address, size): back to back in the memory file, as
/// [`crate::snapshot::memory_file`] writes them.
pub fn build_message(regions: &[(u64, u64)]) -> String {
    let mut offset = 0;
    let mappings: Vec<RegionMapping> = regions
        .iter()
        .map(|&(host, size)| {
            let mapping = RegionMapping {
                base_host_virt_addr: host,
                size,
                offset,
                page_size: PAGE_SIZE,
                page_size_kib: PAGE_SIZE,
            };
            offset += size;
            mapping
        })
        .collect();
    // A Vec of plain integer structs always serializes.
    serde_json::to_string(&mappings).unwrap_or_default()
}

/// Parses and checks a mappings message for a memory file of `file_len` bytes.
pub fn parse_message(bytes: &[u8], file_len: u64) -> Result<Mappings, MessageError> {
    let received: Vec<ReceivedMapping> =
        serde_json::from_slice(bytes).map_err(|e| MessageError::Json(e.to_string()))?;
    if received.is_empty() {
        return Err(MessageError::Empty);
    }
    if received.len() > MAX_REGIONS {
        return Err(MessageError::TooMany(received.len()));
    }
    let mut regions = Vec::with_capacity(received.len());
    let mut first_page_size = None;
    for (index, r) in received.iter().enumerate() {
        let page_size = match (r.page_size, r.page_size_kib) {
            (Some(a), Some(b)) if a != b => {
                return Err(MessageError::PageSizes {
                    index,
                    page_size: a,
                    kib: b,
                });
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => return Err(MessageError::NoPageSize(index)),
        };
        if !page_size.is_power_of_two() || page_size < PAGE_SIZE {
            return Err(MessageError::BadPageSize { index, page_size });
        }
        let first = *first_page_size.get_or_insert(page_size);
        if page_size != first {
            return Err(MessageError::MixedPageSizes {
                index,
                page_size,
                first,
            });
        }
        let mask = page_size - 1;
        if r.size == 0 || (r.base_host_virt_addr | r.size | r.offset) & mask != 0 {
            return Err(MessageError::Unaligned {
                index,
                host: r.base_host_virt_addr,
                size: r.size,
                offset: r.offset,
                page_size,
            });
        }
        if r.offset
            .checked_add(r.size)
            .is_none_or(|end| end > file_len)
        {
            return Err(MessageError::OutsideFile {
                index,
                offset: r.offset,
                size: r.size,
                file: file_len,
            });
        }
        if r.base_host_virt_addr.checked_add(r.size).is_none() {
            return Err(MessageError::Wraps {
                index,
                host: r.base_host_virt_addr,
                size: r.size,
            });
        }
        regions.push(Region {
            host: r.base_host_virt_addr,
            size: r.size,
            offset: r.offset,
        });
    }
    // The sums cannot wrap: both were checked above.
    let apart = |a: u64, b: u64, size_a: u64, size_b: u64| a + size_a <= b || b + size_b <= a;
    for (i, a) in regions.iter().enumerate() {
        for (j, b) in regions.iter().enumerate().skip(i + 1) {
            if !apart(a.host, b.host, a.size, b.size) || !apart(a.offset, b.offset, a.size, b.size)
            {
                return Err(MessageError::Overlap(i, j));
            }
        }
    }
    Ok(Mappings {
        regions,
        page_size: first_page_size.unwrap_or(PAGE_SIZE),
    })
}

#[cfg(test)]
mod tests;

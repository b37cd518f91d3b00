//! The memory file: guest RAM's ranges back to back, in guest-physical order (the layout's
//! RAM ranges for the snapshot's memory size). Pages of zeros are left as holes, so a mostly
//! idle guest's file is sparse. On restore the file is mapped MAP_PRIVATE: the kernel reads a
//! page the first time the guest touches it, and the guest's writes never reach the file.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::SnapshotError;
use crate::layout;

const PAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("memory file {}: {source}", .path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("memory file {}: {size} bytes, the snapshot's guest has {expected}", .path.display())]
    Size {
        path: PathBuf,
        size: u64,
        expected: u64,
    },
    #[error("memory file {}: not a regular file", .path.display())]
    NotAFile { path: PathBuf },
}

/// How many bytes the memory file of a `mem_bytes` guest holds.
pub fn file_bytes(mem_bytes: u64) -> u64 {
    layout::ram_ranges(mem_bytes)
        .iter()
        .map(|&(_, size)| size)
        .sum()
}

/// Writes every RAM region of `memory` to `path` (0600), zero pages as holes, synced.
pub fn write(path: &Path, memory: &GuestMemoryMmap) -> Result<(), SnapshotError> {
    let fail = |source| SnapshotError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = super::file::create_private(path)?;
    let mut total = 0u64;
    for region in memory.iter() {
        let len = region.len() as usize;
        // SAFETY: the region is a live mapping of `len` bytes owned by `memory`, which this
        // borrow keeps alive; no vCPU or device runs (the VM is paused), so nothing writes it
        // while it is read here, and reading guest RAM as bytes has no invalid values.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr().cast_const(), len) };
        let mut at = 0;
        while at < len {
            // Runs of data pages are written in one call; zero pages are skipped.
            let end = (at + PAGE).min(len);
            if bytes[at..end].iter().all(|&b| b == 0) {
                file.seek(SeekFrom::Current((end - at) as i64))
                    .map_err(fail)?;
                at = end;
                continue;
            }
            let mut run_end = end;
            while run_end < len {
                let next = (run_end + PAGE).min(len);
                if bytes[run_end..next].iter().all(|&b| b == 0) {
                    break;
                }
                run_end = next;
            }
            file.write_all(&bytes[at..run_end]).map_err(fail)?;
            at = run_end;
        }
        total += len as u64;
    }
    // Trailing holes: the length says where the RAM ends.
    file.set_len(total).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    Ok(())
}

/// Writes a Diff snapshot's memory file: as large as [`write`]'s, holding the pages `dirty`
/// marks (per region of `memory`, 64 pages a word, as [`super::dirty::DirtyTracking::take`]
/// gives) at their offsets, zero pages included (a page the guest zeroed must overwrite the
/// base's), and holes everywhere else. Returns the bytes written.
pub fn write_diff(
    path: &Path,
    memory: &GuestMemoryMmap,
    dirty: &[Vec<u64>],
) -> Result<u64, SnapshotError> {
    let fail = |source| SnapshotError::Write {
        path: path.to_path_buf(),
        source,
    };
    // Seek and write rather than pwrite: the main thread's seccomp filter allows the calls
    // a Full snapshot makes, and a Diff needs no others.
    let mut file = super::file::create_private(path)?;
    let (mut base, mut written) = (0u64, 0u64);
    for (region, bits) in memory.iter().zip(dirty) {
        let len = region.len() as usize;
        // SAFETY: as in `write`: a live mapping of `len` bytes, the VM paused.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr().cast_const(), len) };
        for run in dirty_runs(bits, len.div_ceil(PAGE)) {
            let (from, to) = (run.start * PAGE, (run.end * PAGE).min(len));
            file.seek(SeekFrom::Start(base + from as u64))
                .and_then(|_| file.write_all(&bytes[from..to]))
                .map_err(fail)?;
            written += (to - from) as u64;
        }
        base += len as u64;
    }
    file.set_len(base).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    Ok(written)
}

/// The runs of set bits among the first `pages` of `bits`, as page ranges.
fn dirty_runs(bits: &[u64], pages: usize) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let set = move |page: usize| {
        bits.get(page / 64)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    };
    let mut page = 0;
    std::iter::from_fn(move || {
        while page < pages && !set(page) {
            // A whole clear word is skipped at once: most of RAM is clean.
            if page % 64 == 0 && bits.get(page / 64) == Some(&0) {
                page += 64;
            } else {
                page += 1;
            }
        }
        if page >= pages {
            return None;
        }
        let start = page;
        while page < pages && set(page) {
            page += 1;
        }
        Some(start..page)
    })
}

/// Opens the memory file for a `mem_bytes` guest, refusing one of another size: mapping a
/// short file would fault (SIGBUS) the first time the guest reached past its end.
pub fn open(path: &Path, mem_bytes: u64) -> Result<File, MemoryFileError> {
    let open_err = |source| MemoryFileError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if !meta.is_file() {
        return Err(MemoryFileError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let expected = file_bytes(mem_bytes);
    if meta.len() != expected {
        return Err(MemoryFileError::Size {
            path: path.to_path_buf(),
            size: meta.len(),
            expected,
        });
    }
    Ok(file)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn ram_is_written_sparse_and_private_and_sizes_are_checked() {
        let dir = tempdir();
        let path = dir.join("mem");
        let mem_bytes = 32u64 << 20;
        let memory = test_ram(mem_bytes);
        memory
            .write_slice(b"hello", GuestAddress(0x10_0000))
            .unwrap();
        write(&path, &memory).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), mem_bytes);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(meta.blocks() * 512 < 1 << 20, "zero pages are holes");
        let data = std::fs::read(&path).unwrap();
        assert_eq!(&data[0x10_0000..0x10_0005], b"hello");
        assert!(open(&path, mem_bytes).is_ok());
        let e = open(&path, 64 << 20).unwrap_err().to_string();
        assert!(
            e.contains("33554432 bytes, the snapshot's guest has 67108864"),
            "{e}"
        );
        let e = open(&dir, mem_bytes).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The data ranges of `path` as SEEK_DATA/SEEK_HOLE see them.
    fn data_ranges(path: &Path) -> Vec<(u64, u64)> {
        use std::os::fd::AsRawFd;
        let file = File::open(path).unwrap();
        let len = file.metadata().unwrap().len() as i64;
        let (mut at, mut ranges) = (0i64, Vec::new());
        while at < len {
            // SAFETY: lseek on an owned descriptor; no memory is passed.
            let start = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
            if start < 0 {
                break;
            }
            // SAFETY: as above.
            let end = unsafe { libc::lseek(file.as_raw_fd(), start, libc::SEEK_HOLE) };
            ranges.push((start as u64, end as u64));
            at = end;
        }
        ranges
    }

    #[test]
    fn a_diff_holds_the_dirty_pages_zeros_included_and_holes_elsewhere() {
        let dir = tempdir().join("diff");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mem");
        let mem_bytes = 32u64 << 20;
        let memory = test_ram(mem_bytes);
        // Written but clean pages (not in the log) stay holes.
        memory
            .write_slice(&[1; 4096], GuestAddress(0x20_0000))
            .unwrap();
        memory
            .write_slice(&[2; 8192], GuestAddress(0x3000))
            .unwrap();
        let mut dirty = vec![0u64; (mem_bytes / PAGE as u64).div_ceil(64) as usize];
        // Pages 3-4 (data), 9 (zeros), and the last page of RAM.
        dirty[0] = 0b11 << 3 | 1 << 9;
        let last = (mem_bytes / PAGE as u64 - 1) as usize;
        dirty[last / 64] |= 1 << (last % 64);
        let written = write_diff(&path, &memory, &[dirty]).unwrap();
        assert_eq!(written, 4 * PAGE as u64);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), mem_bytes);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let p = PAGE as u64;
        assert_eq!(
            data_ranges(&path),
            [(3 * p, 5 * p), (9 * p, 10 * p), (mem_bytes - p, mem_bytes)]
        );
        let data = std::fs::read(&path).unwrap();
        assert!(data[0x3000..0x5000].iter().all(|&b| b == 2));
        assert!(
            data[0x20_0000..0x20_1000].iter().all(|&b| b == 0),
            "clean page"
        );
        // A bitmap shorter than RAM (hostile or stale) writes only what it names.
        write_diff(&path, &memory, &[vec![1]]).unwrap();
        assert_eq!(data_ranges(&path), [(0, p)]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), mem_bytes);
        write_diff(&path, &memory, &[]).unwrap();
        assert!(data_ranges(&path).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dirty_runs_cover_set_bits_only() {
        let bits = [u64::MAX << 62, 0, 0b101];
        let runs: Vec<_> = dirty_runs(&bits, 150).collect();
        assert_eq!(runs, [62..64, 128..129, 130..131]);
        let runs: Vec<_> = dirty_runs(&bits, 63).collect();
        assert_eq!((runs.len(), runs[0].clone()), (1, 62..63));
        assert_eq!(dirty_runs(&[], 1000).count(), 0);
    }

    /// Guest RAM of `mem_bytes` laid out as pvm lays it out.
    pub(crate) fn test_ram(mem_bytes: u64) -> GuestMemoryMmap {
        let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mem_bytes)
            .iter()
            .map(|&(start, size)| (start, size as usize))
            .collect();
        GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap()
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pvm-memfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

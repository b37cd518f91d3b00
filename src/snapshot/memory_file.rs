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
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn ram_is_written_sparse_and_private_and_sizes_are_checked() {
        let dir = tempdir();
        let path = dir.join("mem");
        let mem_bytes = 32u64 << 20;
        let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mem_bytes)
            .iter()
            .map(|&(start, size)| (start, size as usize))
            .collect();
        let memory = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
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

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pvm-memfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

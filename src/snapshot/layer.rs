//! Layering a Diff snapshot's memory file onto the memory file it was taken over
//! (`pvm snapshot-layer`): the Diff's data pages are copied onto the base file in place, its
//! holes leave the base's pages as they are. The base file then goes with the Diff's state
//! file, and is restored with it as any Full memory file is.
//!
//! Both state files are read first, and the layering is refused unless they belong together:
//! the Diff's parent is the base's snapshot (ids pvm drew when it took them), both are of one
//! guest size, and both memory files have that guest's size.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::file::{self, FileError};
use super::memory_file::{self, MemoryFileError};
use super::{Snapshot, SnapshotKind};

/// What `pvm snapshot-layer` was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSpec {
    /// The Diff snapshot's state file and memory file.
    pub diff_snapshot: PathBuf,
    pub diff_mem: PathBuf,
    /// The state file the base memory file goes with (a Full snapshot's, or the Diff's
    /// layered onto it last), and that memory file, which is changed in place.
    pub base_snapshot: PathBuf,
    pub base_mem: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Memory(#[from] MemoryFileError),
    #[error(
        "{}: a Full snapshot; its memory file is complete: restore it as it is",
        .0.display()
    )]
    NotDiff(PathBuf),
    #[error(
        "{}: a Diff taken with every page dirty (the VM had no snapshot since it booted); its \
         memory file is complete: restore it as it is",
        .0.display()
    )]
    Complete(PathBuf),
    #[error(
        "{} was taken over snapshot {parent:016x}, not over {} ({base:016x}): layer it onto \
         the memory file of the snapshot it follows",
        .diff.display(), .base_path.display()
    )]
    Unrelated {
        diff: PathBuf,
        parent: u64,
        base_path: PathBuf,
        base: u64,
    },
    #[error("the Diff's guest has {diff} bytes of RAM, the base's {base}")]
    GuestSize { diff: u64, base: u64 },
    #[error("{}: {what}: {source}", .path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

/// Checks that `spec`'s files belong together and copies the Diff's pages onto the base
/// memory file; returns the bytes copied.
pub fn layer(spec: &LayerSpec) -> Result<u64, LayerError> {
    let diff = file::read(&spec.diff_snapshot)?;
    let base = file::read(&spec.base_snapshot)?;
    check_lineage(spec, &diff, &base)?;
    let mem_bytes = diff.description.mem_bytes;
    let from = memory_file::open(&spec.diff_mem, mem_bytes)?;
    let io = |path: &Path, what| {
        let path = path.to_path_buf();
        move |source| LayerError::Io { path, what, source }
    };
    let onto = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&spec.base_mem)
        .map_err(io(&spec.base_mem, "cannot open for writing"))?;
    // Checks the base's size and kind (a regular file) the way a restore would.
    memory_file::open(&spec.base_mem, mem_bytes)?;
    let copied = copy_data(&from, &onto, memory_file::file_bytes(mem_bytes))
        .map_err(io(&spec.diff_mem, "copying its pages"))?;
    onto.sync_all().map_err(io(&spec.base_mem, "sync"))?;
    Ok(copied)
}

/// Refuses a pair of snapshots that do not follow one another.
fn check_lineage(spec: &LayerSpec, diff: &Snapshot, base: &Snapshot) -> Result<(), LayerError> {
    if diff.memory.kind != SnapshotKind::Diff {
        return Err(LayerError::NotDiff(spec.diff_snapshot.clone()));
    }
    let Some(parent) = diff.memory.parent else {
        return Err(LayerError::Complete(spec.diff_snapshot.clone()));
    };
    if parent != base.memory.id {
        return Err(LayerError::Unrelated {
            diff: spec.diff_snapshot.clone(),
            parent,
            base_path: spec.base_snapshot.clone(),
            base: base.memory.id,
        });
    }
    if diff.description.mem_bytes != base.description.mem_bytes {
        return Err(LayerError::GuestSize {
            diff: diff.description.mem_bytes,
            base: base.description.mem_bytes,
        });
    }
    Ok(())
}

/// Copies the data ranges of `from` (SEEK_DATA / SEEK_HOLE) to the same offsets of `onto`,
/// up to `len` bytes; returns the bytes copied.
fn copy_data(from: &File, onto: &File, len: u64) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let (mut at, mut copied) = (0u64, 0u64);
    while at < len {
        let Some(start) = seek(from, at, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(from, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            from.read_exact_at(&mut buf[..n], pos)?;
            onto.write_all_at(&buf[..n], pos)?;
            pos += n as u64;
        }
        copied += end.saturating_sub(start);
        at = end;
    }
    Ok(copied)
}

/// lseek with SEEK_DATA or SEEK_HOLE; None when there is no more data (ENXIO).
pub(crate) fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: lseek only moves the offset of a descriptor `file` owns; no memory is passed.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if at < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(at as u64))
}

#[cfg(test)]
#[path = "layer_tests.rs"]
mod tests;

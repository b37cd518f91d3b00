//! A new backing file for a running drive (`PATCH /drives/{id}` with `path_on_host`).
//!
//! The main thread may not open files once the VM runs (its seccomp filter has no openat), so
//! the API thread opens, locks and sizes the new file as pvm does a disk at start, in the
//! drive's mode, and hands the [`DiskImage`] to the main thread with the action; the main
//! thread swaps it in under a paused device (see [`super::controller`]). The API thread's
//! filter allows just that: openat of an existing file, read-only or read-write (SECURITY.md).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use pvm_virtio::{BlockError, DiskImage};

/// The running VM's image drives by id: each one's mode and file. Empty until the VM starts.
#[derive(Debug, Clone, Default)]
pub struct DriveModes(Arc<Mutex<HashMap<String, DriveFile>>>);

/// What the API thread knows of a running image drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriveFile {
    pub read_only: bool,
    /// The (device, inode) of the file it serves, if known: the same file opened again is
    /// the drive's own (its lock is held already).
    pub file: Option<FileId>,
}

/// A file's (st_dev, st_ino).
pub type FileId = (u64, u64);

impl DriveModes {
    /// Records the running VM's image drives, (id, read-only, path), on the main thread
    /// before its sandbox is in place (each path is looked at).
    pub fn publish(&self, drives: impl IntoIterator<Item = (String, bool, String)>) {
        *self.lock() = drives
            .into_iter()
            .map(|(id, read_only, path)| {
                let file = std::fs::metadata(&path).ok().map(|m| (m.dev(), m.ino()));
                (id, DriveFile { read_only, file })
            })
            .collect();
    }

    /// Drive `id`, if the running VM has an image drive of that id.
    pub fn get(&self, id: &str) -> Option<DriveFile> {
        self.lock().get(id).copied()
    }

    /// Drive `id` serves `file` now.
    pub fn set_file(&self, id: &str, file: FileId) {
        if let Some(drive) = self.lock().get_mut(id) {
            drive.file = Some(file);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, DriveFile>> {
        // Plain data: a poisoned lock still holds a usable map.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A drive's new image, opened on the API thread, on its way to the main thread. The action
/// that carries it is cloned and compared like any other; the image itself goes to the first
/// taker.
#[derive(Debug, Clone)]
pub struct OpenedDisk(Arc<Mutex<Option<NewImage>>>);

/// A drive's new image as [`open`] made it.
#[derive(Debug)]
pub struct NewImage {
    pub disk: DiskImage,
    /// The file the drive serves already, opened again (e.g. after the host resized it) and
    /// not locked: see [`pvm_virtio::DiskSwap::stage_reopened`].
    pub reopened: bool,
    pub file: FileId,
}

impl OpenedDisk {
    pub fn new(image: NewImage) -> Self {
        OpenedDisk(Arc::new(Mutex::new(Some(image))))
    }

    /// The image, unless taken already.
    pub fn take(&self) -> Option<NewImage> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl PartialEq for OpenedDisk {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Opens `path` for `drive` in its mode, without creating it. A file other than the drive's
/// is locked and sized as a disk at start; the drive's own file (same device and inode) is
/// only sized, its lock being the drive's already.
pub fn open(path: &Path, drive: DriveFile) -> Result<NewImage, BlockError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!drive.read_only)
        .open(path)
        .map_err(|source| BlockError::Open {
            path: path.to_owned(),
            source,
        })?;
    let id = file_id(&file).map_err(|source| BlockError::Size {
        path: path.to_owned(),
        source,
    })?;
    let reopened = drive.file == Some(id);
    let disk = if reopened {
        DiskImage::sized(file, path, drive.read_only)?
    } else {
        DiskImage::from_file(file, path, drive.read_only)?
    };
    Ok(NewImage {
        disk,
        reopened,
        file: id,
    })
}

/// The open file's (device, inode), by the fstat system call itself: std's metadata and
/// glibc's fstat use statx or newfstatat, which take a path too, and the api thread's filter
/// allows only fstat.
fn file_id(file: &std::fs::File) -> std::io::Result<FileId> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: fstat writes a `struct stat` into the buffer, which is large enough, for the
    // valid fd `file` owns.
    let ret = unsafe { libc::syscall(libc::SYS_fstat, file.as_raw_fd(), stat.as_mut_ptr()) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded and filled the buffer (it was zeroed before besides).
    let stat = unsafe { stat.assume_init() };
    Ok((stat.st_dev, stat.st_ino))
}

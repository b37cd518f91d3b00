//! A new backing file for a running drive (`PATCH /drives/{id}` with `path_on_host`).
//!
//! The main thread may not open files once the VM runs (its seccomp filter has no openat), so
//! the API thread opens, locks and sizes the new file as pvm does a disk at start, in the
//! drive's mode, and hands the [`DiskImage`] to the main thread with the action; the main
//! thread swaps it in under a paused device (see [`super::controller`]). The API thread's
//! filter allows just that: openat of an existing file, read-only or read-write (SECURITY.md).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::Path;
use std::sync::{Arc, Mutex};

use pvm_virtio::{BlockError, DiskImage};

/// The running VM's image drives by id, and whether each is read-only: the mode the API
/// thread opens a drive's new file in. Empty until the VM starts.
#[derive(Debug, Clone, Default)]
pub struct DriveModes(Arc<Mutex<HashMap<String, bool>>>);

impl DriveModes {
    /// Records the running VM's image drives: (id, read-only).
    pub fn publish(&self, drives: impl IntoIterator<Item = (String, bool)>) {
        *self.lock() = drives.into_iter().collect();
    }

    /// Whether drive `id` is read-only; None if no image drive of the running VM has the id.
    pub fn read_only(&self, id: &str) -> Option<bool> {
        self.lock().get(id).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, bool>> {
        // Plain data: a poisoned lock still holds a usable map.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A drive's new image, opened on the API thread, on its way to the main thread. The action
/// that carries it is cloned and compared like any other; the image itself goes to the first
/// taker.
#[derive(Debug, Clone)]
pub struct OpenedDisk(Arc<Mutex<Option<DiskImage>>>);

impl OpenedDisk {
    pub fn new(disk: DiskImage) -> Self {
        OpenedDisk(Arc::new(Mutex::new(Some(disk))))
    }

    /// The image, unless taken already.
    pub fn take(&self) -> Option<DiskImage> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl PartialEq for OpenedDisk {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Opens `path` for a drive (read-write, or read-only with `read_only`), without creating it,
/// and locks and sizes it as a disk at start.
pub fn open(path: &Path, read_only: bool) -> Result<DiskImage, BlockError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|source| BlockError::Open {
            path: path.to_owned(),
            source,
        })?;
    DiskImage::from_file(file, path, read_only)
}

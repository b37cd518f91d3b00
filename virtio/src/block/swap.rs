//! A new backing file for a running disk (Firecracker's `PATCH /drives` with `path_on_host`).
//!
//! The VMM stages the new image on the device's [`DiskSwap`] and then pauses and resumes the
//! device: the device takes the image on resume, while its worker is parked with nothing in
//! flight (requests are served synchronously), so no request sees half of each file. The
//! guest learns the new capacity from a configuration-change interrupt the VMM raises after.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use super::{BlockError, DiskImage, SECTOR_SIZE, lock};

/// The image a disk takes when it next resumes; shared between the device and the VMM.
#[derive(Debug, Clone, Default)]
pub struct DiskSwap(Arc<Mutex<Option<DiskImage>>>);

impl DiskSwap {
    /// Makes `disk` the image the device serves from its next resume on (or its next
    /// activation, if the guest has not started it). A disk staged earlier and not yet taken
    /// is dropped.
    pub fn stage(&self, disk: DiskImage) {
        *self.slot() = Some(disk);
    }

    /// The staged image, if any, which is then no longer staged. The device takes it while
    /// its worker does not run; the VMM, to withdraw an image whose swap failed.
    pub fn take(&self) -> Option<DiskImage> {
        self.slot().take()
    }

    /// The staged image's size in sectors, if one is staged.
    pub(super) fn staged_sectors(&self) -> Option<u64> {
        self.slot().as_ref().map(|disk| disk.sectors)
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<DiskImage>> {
        // The slot holds plain data: a poisoned lock still holds a usable value.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl DiskImage {
    /// A disk image on `file`, already opened (read-write, or read-only with `read_only`) by
    /// whoever may open files; it is locked here as [`DiskImage::open`] locks. `path` names it
    /// in messages. The GET_ID answer is empty until [`DiskImage::replacing`] keeps the old.
    pub fn from_file(mut file: File, path: &Path, read_only: bool) -> Result<Self, BlockError> {
        lock(&file, path, read_only)?;
        // Seeking works for block devices too, where metadata reports a length of 0.
        let bytes = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.to_owned(),
                source,
            })?;
        if bytes % SECTOR_SIZE != 0 {
            log::warn!(
                "disk {}: size {bytes} is not a multiple of 512; the tail is not visible to the guest",
                path.display()
            );
        }
        Ok(DiskImage {
            file,
            sectors: bytes / SECTOR_SIZE,
            read_only,
            id: Default::default(),
            name: path.display().to_string(),
            errors: Arc::default(),
            flush_failed: AtomicBool::new(false),
        })
    }

    /// `self` as the successor of `old`: the guest keeps the disk's serial, the VMM's failure
    /// counts keep counting; a failed flush of the old file does not taint the new one.
    pub(super) fn replacing(mut self, old: &DiskImage) -> Self {
        self.id = old.id;
        self.errors = Arc::clone(&old.errors);
        self
    }
}

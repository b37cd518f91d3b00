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
pub struct DiskSwap(Arc<Mutex<Option<Staged>>>);

/// A staged image, and whether it is the drive's own file opened again (a resize).
#[derive(Debug)]
struct Staged {
    disk: DiskImage,
    reopened: bool,
}

impl DiskSwap {
    /// Makes `disk` the image the device serves from its next resume on (or its next
    /// activation, if the guest has not started it). A disk staged earlier and not yet taken
    /// is dropped.
    pub fn stage(&self, disk: DiskImage) {
        *self.slot() = Some(Staged {
            disk,
            reopened: false,
        });
    }

    /// As [`Self::stage`], for `disk` made by [`DiskImage::sized`] on the very file the drive
    /// serves (the same inode, opened again to learn its new size, e.g. after the host grew
    /// it). The drive's own descriptor holds that file's lock, so `disk` could not take it: the
    /// device keeps serving through a duplicate of its descriptor, which shares the lock, with
    /// `disk`'s size.
    pub fn stage_reopened(&self, disk: DiskImage) {
        let mut slot = self.slot();
        match slot.as_mut() {
            // The drive's file is the staged one, not yet taken (the driver has not started
            // the device): that one holds the lock and only learns the new size.
            Some(staged) => staged.disk.sectors = disk.sectors,
            None => {
                *slot = Some(Staged {
                    disk,
                    reopened: true,
                })
            }
        }
    }

    /// The staged image, if any, which is then no longer staged. The device takes it while
    /// its worker does not run; the VMM, to withdraw an image whose swap failed.
    pub fn take(&self) -> Option<DiskImage> {
        self.slot().take().map(|staged| staged.disk)
    }

    /// The staged image and whether it was reopened, for the device.
    pub(super) fn take_staged(&self) -> Option<(DiskImage, bool)> {
        self.slot().take().map(|s| (s.disk, s.reopened))
    }

    /// The staged image's size in sectors, if one is staged.
    pub(super) fn staged_sectors(&self) -> Option<u64> {
        self.slot().as_ref().map(|staged| staged.disk.sectors)
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Staged>> {
        // The slot holds plain data: a poisoned lock still holds a usable value.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl DiskImage {
    /// A disk image on `file`, already opened (read-write, or read-only with `read_only`) by
    /// whoever may open files; it is locked here as [`DiskImage::open`] locks. `path` names it
    /// in messages. The GET_ID answer is empty until [`DiskImage::replacing`] keeps the old.
    pub fn from_file(file: File, path: &Path, read_only: bool) -> Result<Self, BlockError> {
        lock(&file, path, read_only)?;
        Self::sized(file, path, read_only)
    }

    /// [`DiskImage::from_file`] without the lock: only for [`DiskSwap::stage_reopened`], where
    /// the drive's own descriptor of the same file holds it.
    pub fn sized(mut file: File, path: &Path, read_only: bool) -> Result<Self, BlockError> {
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
            direct_align: None,
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

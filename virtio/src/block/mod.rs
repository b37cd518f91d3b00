//! virtio-blk backed by a raw image file (or a host block device).
//!
//! The image is opened and flock'ed at construction so a disk already used by another pvm is
//! refused before the guest boots. Requests are served synchronously on the device's worker
//! thread with preadv/pwritev straight into guest memory (see [`request`]).

#[cfg(test)]
mod limit_tests;
mod request;
mod swap;
#[cfg(test)]
mod swap_tests;
#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::offset_of;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
    virtio_blk_config,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use vm_memory::GuestMemoryMmap;

pub use request::{DiskErrors, DiskImage, MAX_RANGE_SECTORS, SECTOR_SIZE};
pub use swap::DiskSwap;

use crate::device::{ActivateError, Activation, PauseError, VirtioDevice};
use crate::rate_limiter::RateLimit;
use crate::snapshot::{BlockState, DeviceState, RestoreError, SavedDevice, SnapshotError};
use crate::worker::{
    ChainServer, SharedLimiter, SingleQueueHandler, WorkerSlot, chain_bytes, feature,
    read_config_bytes,
};

/// Descriptors per queue; also bounds the segments of one request.
pub const QUEUE_SIZE: u16 = 256;
/// Largest data segment the driver may use (config `size_max`).
pub(crate) const SEGMENT_MAX_BYTES: u32 = 1 << 20;
/// The most data buffers one request may have: two descriptors of each chain hold the header and
/// the status byte.
pub(crate) const SEG_MAX: u16 = QUEUE_SIZE - 2;
/// DISCARD granularity in sectors (4 KiB, the usual filesystem block, so holes are real).
const DISCARD_ALIGNMENT_SECTORS: u32 = 8;
/// Numbers the worker threads virtio-blk0, virtio-blk1, ...
static NEXT_BLOCK_INDEX: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk {}: cannot open: {source}", .path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("disk {}: the image is in use (locked by another process, e.g. another pvm)", .path.display())]
    Locked { path: PathBuf },
    #[error("disk {}: cannot lock the image: {source}", .path.display())]
    Lock { path: PathBuf, source: io::Error },
    #[error("disk {}: cannot determine the size: {source}", .path.display())]
    Size { path: PathBuf, source: io::Error },
    #[error("disk {}: serial {serial:?} is longer than 20 bytes", .path.display())]
    SerialTooLong { path: PathBuf, serial: String },
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct Block {
    disk: Arc<DiskImage>,
    config: Vec<u8>,
    offered_features: u64,
    worker: WorkerSlot<SingleQueueHandler<DiskServer>>,
    /// Kept here so the buckets outlive pauses and resets.
    limiter: SharedLimiter,
    /// A new backing file the VMM staged, taken on resume.
    swap: DiskSwap,
}

/// Serves block requests on the disk, for the device's worker.
struct DiskServer(Arc<DiskImage>);

impl ChainServer for DiskServer {
    fn serve(&mut self, memory: &GuestMemoryMmap, chain: crate::Chain<'_>) -> (u32, u64) {
        request::handle_request_counted(&self.0, memory, chain)
    }

    fn data_bytes(&self, chain: &crate::Chain<'_>) -> u64 {
        // Everything but the 16-byte request header and the status byte.
        chain_bytes(chain).saturating_sub(17)
    }
}

impl Block {
    /// Opens `path` (read-write, or read-only with `read_only`) and locks it: exclusively for a
    /// writable disk, shared for a read-only one. `serial` (at most 20 bytes) is what the guest
    /// reads as the disk ID (/sys/block/vdX/serial).
    pub fn new(path: &Path, read_only: bool, serial: Option<&str>) -> Result<Self, BlockError> {
        let disk = DiskImage::open(path, read_only, serial)?;
        let offered_features = offered_features(read_only);
        let index = NEXT_BLOCK_INDEX.fetch_add(1, Ordering::Relaxed);
        Ok(Block {
            config: config_space(disk.sectors),
            disk: Arc::new(disk),
            offered_features,
            worker: WorkerSlot::new(format!("virtio-blk{index}")),
            limiter: SharedLimiter::new(RateLimit::default()),
            swap: DiskSwap::default(),
        })
    }

    /// Serves requests no faster than `limit` allows: each request is one operation and its
    /// data bytes. A limit that limits nothing leaves the device unlimited.
    pub fn with_rate_limit(mut self, limit: RateLimit) -> Self {
        self.limiter = SharedLimiter::new(limit);
        self
    }

    /// The device's rate limit, if it has one.
    pub fn rate_limit(&self) -> Option<RateLimit> {
        self.limiter.limit()
    }

    /// The device's rate limiter, whose limits may be changed while it runs.
    pub fn rate_limiter(&self) -> SharedLimiter {
        self.limiter.clone()
    }

    /// Where the VMM stages a new backing file; see [`DiskSwap`].
    pub fn disk_swap(&self) -> DiskSwap {
        self.swap.clone()
    }

    /// Serves the staged image from now on, if one was staged: the config space reports its
    /// capacity, and a paused worker serves it when it resumes. Only called while no worker
    /// runs (paused or never started), so no request is in flight.
    fn take_staged_disk(&mut self) {
        let Some((mut new, reopened)) = self.swap.take_staged() else {
            return;
        };
        if new.read_only != self.disk.read_only {
            // The offered features (VIRTIO_BLK_F_RO) cannot change under a driver.
            log::error!(
                "disk {}: {} is not opened as the drive is ({}); keeping the old image",
                self.disk.name,
                new.name,
                if self.disk.read_only {
                    "read-only"
                } else {
                    "read-write"
                }
            );
            return;
        }
        if reopened {
            // The same file: serve it through the descriptor that holds its lock.
            match self.disk.file.try_clone() {
                Ok(file) => new.file = file,
                Err(e) => {
                    log::error!(
                        "disk {}: cannot duplicate its descriptor: {e}; keeping the old size",
                        self.disk.name
                    );
                    return;
                }
            }
        }
        let new = Arc::new(new.replacing(&self.disk));
        log::info!(
            "disk {}: now backed by {} ({} sectors)",
            self.disk.name,
            new.name,
            new.sectors
        );
        self.config = config_space(new.sectors);
        if let Some(handler) = self.worker.paused_mut() {
            handler.server_mut().0 = Arc::clone(&new);
        }
        self.disk = new;
    }

    /// Stops offering VIRTIO_BLK_F_FLUSH: the guest then treats the disk as write-through and
    /// never asks for a flush, so nothing is ever synced to the host's disk (Firecracker's
    /// `cache_type: Unsafe`). A flush a guest sends anyway is still served.
    pub fn without_flush(mut self) -> Self {
        self.offered_features &= !feature(VIRTIO_BLK_F_FLUSH);
        self
    }

    /// The disk size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.sectors
    }

    pub fn is_read_only(&self) -> bool {
        self.disk.read_only
    }

    /// Serves one request chain on the calling thread, as the worker does for each chain it
    /// pops. For pvm-virtio's benchmarks (benches/block.rs) only; not part of the API.
    #[doc(hidden)]
    pub fn bench_serve_request(
        &self,
        memory: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        request::handle_request(&self.disk, memory, chain)
    }

    /// The disk's host I/O failure counts; they stay valid across resets.
    pub fn errors(&self) -> Arc<DiskErrors> {
        Arc::clone(&self.disk.errors)
    }
}

impl DiskImage {
    /// Opens `path` (read-write, or read-only with `read_only`) and locks it: exclusively for a
    /// writable disk, shared for a read-only one. `serial` (at most 20 bytes) is the GET_ID
    /// answer.
    pub fn open(path: &Path, read_only: bool, serial: Option<&str>) -> Result<Self, BlockError> {
        let id = disk_id(path, serial)?;
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        let mut disk = DiskImage::from_file(file, path, read_only)?;
        disk.id = id;
        Ok(disk)
    }

    /// Names the disk in messages (its path).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The disk size in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The disk's host I/O failure counts.
    pub fn errors(&self) -> Arc<DiskErrors> {
        Arc::clone(&self.errors)
    }
}

/// Serves one virtio-blk request chain against `disk` (parse and validate it, do the I/O, write
/// the status byte) and returns the used length. Shared with pvm's vhost-user block backend.
pub fn serve_request(disk: &DiskImage, mem: &GuestMemoryMmap, chain: crate::Chain<'_>) -> u32 {
    request::handle_request(disk, mem, chain)
}

/// The feature bits a virtio-blk device on a raw image offers.
pub fn offered_features(read_only: bool) -> u64 {
    let mut offered_features = feature(VIRTIO_F_VERSION_1)
        | feature(VIRTIO_RING_F_EVENT_IDX)
        | feature(VIRTIO_RING_F_INDIRECT_DESC)
        | feature(VIRTIO_BLK_F_BLK_SIZE)
        | feature(VIRTIO_BLK_F_SEG_MAX)
        | feature(VIRTIO_BLK_F_SIZE_MAX)
        | feature(VIRTIO_BLK_F_FLUSH);
    if read_only {
        offered_features |= feature(VIRTIO_BLK_F_RO);
    } else {
        offered_features |= feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES);
    }
    offered_features
}

fn disk_id(
    path: &Path,
    serial: Option<&str>,
) -> Result<[u8; VIRTIO_BLK_ID_BYTES as usize], BlockError> {
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    if let Some(serial) = serial {
        let bytes = serial.as_bytes();
        if bytes.len() > id.len() {
            return Err(BlockError::SerialTooLong {
                path: path.to_owned(),
                serial: serial.to_owned(),
            });
        }
        id[..bytes.len()].copy_from_slice(bytes);
    }
    Ok(id)
}

/// Takes the image's flock; it lasts as long as the file stays open (the device's lifetime).
fn lock(file: &File, path: &Path, read_only: bool) -> Result<(), BlockError> {
    let mode = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock only acts on the valid fd owned by `file`.
    let ret = unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) };
    if ret == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(BlockError::Locked {
            path: path.to_owned(),
        })
    } else {
        Err(BlockError::Lock {
            path: path.to_owned(),
            source,
        })
    }
}

/// The little-endian `struct virtio_blk_config` image of a disk of `sectors`.
pub fn config_space(sectors: u64) -> Vec<u8> {
    let mut config = vec![0u8; std::mem::size_of::<virtio_blk_config>()];
    let mut put = |offset: usize, bytes: &[u8]| {
        config[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(
        offset_of!(virtio_blk_config, capacity),
        &sectors.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, size_max),
        &SEGMENT_MAX_BYTES.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, seg_max),
        &u32::from(SEG_MAX).to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, blk_size),
        &(SECTOR_SIZE as u32).to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_discard_sectors),
        &MAX_RANGE_SECTORS.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_discard_seg),
        &1u32.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, discard_sector_alignment),
        &DISCARD_ALIGNMENT_SECTORS.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_write_zeroes_sectors),
        &MAX_RANGE_SECTORS.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_write_zeroes_seg),
        &1u32.to_le_bytes(),
    );
    put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
    config
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.offered_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // A device without a worker (the driver has not started it, so the transport does not
        // pause or resume it) takes a staged image only at activation: until then the driver
        // already sees that image's capacity, which it reads before it starts the device.
        if !self.worker.is_active()
            && let Some(sectors) = self.swap.staged_sectors()
        {
            read_config_bytes(&config_space(sectors), offset, data);
            return;
        }
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field is read-only (no CONFIG_WCE).
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.take_staged_disk();
        let disk = Arc::clone(&self.disk);
        let limiter = self.limiter.clone();
        self.worker
            .start(|| SingleQueueHandler::new(activation, DiskServer(disk))?.with_limiter(limiter))
    }

    fn reset(&mut self) {
        self.worker.stop();
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        Ok(self.worker.pause()?)
    }

    fn resume(&mut self) -> Result<(), PauseError> {
        if !self.worker.is_active() || self.worker.paused_mut().is_some() {
            self.take_staged_disk();
        }
        Ok(self.worker.resume()?)
    }

    fn save_state(&self) -> Result<SavedDevice, SnapshotError> {
        // A staged image is what the guest sees from the resume on, and what the VMM's
        // configuration names: the restored device opens that one.
        let sectors = self.swap.staged_sectors().unwrap_or(self.disk.sectors);
        Ok(SavedDevice {
            state: DeviceState::Block(BlockState { sectors }),
            queues: self.worker.saved_positions(VIRTIO_ID_BLOCK)?,
        })
    }

    fn restore(
        &mut self,
        activation: Option<Activation>,
        state: &DeviceState,
    ) -> Result<(), RestoreError> {
        let DeviceState::Block(saved) = state else {
            return Err(RestoreError::DeviceKind {
                saved: state.kind(),
                here: "block",
            });
        };
        self.take_staged_disk();
        if saved.sectors != self.disk.sectors {
            return Err(RestoreError::DiskSize {
                saved: saved.sectors,
                here: self.disk.sectors,
            });
        }
        if let Some(activation) = activation {
            let disk = Arc::clone(&self.disk);
            let limiter = self.limiter.clone();
            self.worker.start_paused(|| {
                SingleQueueHandler::new(activation, DiskServer(disk))?.with_limiter(limiter)
            })?;
        }
        Ok(())
    }
}

//! virtio-blk backed by a raw image file (or a host block device).
//!
//! The image is opened and flock'ed at construction so a disk already used by another pvm is
//! refused before the guest boots. Each request queue has its own worker thread, which serves
//! requests synchronously with preadv/pwritev straight into guest memory (see [`request`]) or
//! through its own io_uring ([`uring`]); [`BlockOptions`] choose.

/// Makes `mod io_uring` in a test module: the named tests of that module again, with
/// [`ENGINE`] set to the io_uring engine (the module's helpers pick the engine from it).
#[cfg(test)]
macro_rules! tests_on_io_uring {
    ($($test:ident),* $(,)?) => {
        mod io_uring {
            $(
                #[test]
                fn $test() {
                    super::ENGINE.set(super::IoEngine::IoUring);
                    super::$test();
                }
            )*
        }
    };
}

#[cfg(test)]
thread_local! {
    /// The engine the request and limit tests serve on (see `tests_on_io_uring!`).
    static ENGINE: std::cell::Cell<IoEngine> = const { std::cell::Cell::new(IoEngine::Sync) };
}

mod direct;
mod engine;
#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod limit_tests;
mod queues;
mod request;
mod swap;
#[cfg(test)]
mod swap_tests;
#[cfg(test)]
mod tests;
mod uring;

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::offset_of;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES, virtio_blk_config,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use vm_memory::GuestMemoryMmap;

pub use engine::{
    BlockOptions, IoEngine, MAX_QUEUE_SIZE, MAX_QUEUES, MIN_QUEUE_SIZE, OptionsError, RingError,
};
pub use request::{DiskErrors, DiskImage, MAX_RANGE_SECTORS, SECTOR_SIZE};
pub use swap::DiskSwap;

use crate::device::{ActivateError, Activation, PauseError, VirtioDevice};
use crate::rate_limiter::RateLimit;
use crate::snapshot::{BlockState, DeviceState, RestoreError, SavedDevice, SnapshotError};
use crate::worker::{ChainServer, SharedLimiter, chain_bytes, feature, read_config_bytes};
use engine::Ring;
use queues::QueueWorkers;

/// Descriptors per queue by default; also bounds the segments of one request.
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
    #[error("disk {}: {source}", .path.display())]
    Options { path: PathBuf, source: OptionsError },
    #[error("disk {}: engine=io_uring: {source}", .path.display())]
    Ring { path: PathBuf, source: RingError },
    #[error("disk {}: direct=on: {source}", .path.display())]
    Direct { path: PathBuf, source: io::Error },
    #[error(
        "disk {}: direct=on: the image size {bytes} is not a multiple of the host's O_DIRECT \
         block size {align}", .path.display()
    )]
    DirectSize {
        path: PathBuf,
        bytes: u64,
        align: u64,
    },
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct Block {
    disk: Arc<DiskImage>,
    config: Vec<u8>,
    offered_features: u64,
    options: BlockOptions,
    /// One entry per queue, as the transport asks.
    queue_sizes: Vec<u16>,
    workers: QueueWorkers,
    /// Kept here so the buckets outlive pauses and resets.
    limiter: SharedLimiter,
    /// A new backing file the VMM staged, taken on resume.
    swap: DiskSwap,
}

/// Serves block requests on the disk, for a queue's sync worker.
pub(crate) struct DiskServer(Arc<DiskImage>);

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
        Self::with_options(path, read_only, serial, BlockOptions::default())
    }

    /// [`Block::new`] served as `options` say. The io_uring engine's rings are created here,
    /// so an engine the host refuses fails now, before the guest runs.
    pub fn with_options(
        path: &Path,
        read_only: bool,
        serial: Option<&str>,
        options: BlockOptions,
    ) -> Result<Self, BlockError> {
        options.validate().map_err(|source| BlockError::Options {
            path: path.to_owned(),
            source,
        })?;
        let disk = DiskImage::open_with(path, read_only, serial, options.direct)?;
        let mut offered_features = offered_features(read_only);
        if options.queues > 1 {
            offered_features |= feature(VIRTIO_BLK_F_MQ);
        }
        let rings = match options.engine {
            IoEngine::Sync => Vec::new(),
            IoEngine::IoUring => {
                Ring::for_queues(options.queues, options.queue_size).map_err(|source| {
                    BlockError::Ring {
                        path: path.to_owned(),
                        source,
                    }
                })?
            }
        };
        let mut block = Block {
            config: Vec::new(),
            disk: Arc::new(disk),
            offered_features,
            options,
            queue_sizes: vec![options.queue_size; usize::from(options.queues)],
            workers: QueueWorkers::new(options.queues, rings),
            limiter: SharedLimiter::new(RateLimit::default()),
            swap: DiskSwap::default(),
        };
        block.config = block.config_for(block.disk.sectors);
        Ok(block)
    }

    /// How the disk is served.
    pub fn options(&self) -> BlockOptions {
        BlockOptions {
            engine: self.workers.engine(),
            ..self.options
        }
    }

    /// The config space of this device over a disk of `sectors`: the queue count (MQ) and a
    /// seg_max the queue size allows.
    fn config_for(&self, sectors: u64) -> Vec<u8> {
        let mut config = config_space(sectors);
        let seg_max = SEG_MAX.min(self.options.queue_size - 2);
        let mut put = |offset: usize, bytes: &[u8]| {
            config[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(
            offset_of!(virtio_blk_config, seg_max),
            &u32::from(seg_max).to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, num_queues),
            &self.options.queues.to_le_bytes(),
        );
        config
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
            // The same file: serve it through the descriptor that holds its lock (and its
            // O_DIRECT flag, which the duplicate shares).
            match self.disk.file.try_clone() {
                Ok(file) => {
                    new.file = file;
                    new.direct_align = self.disk.direct_align;
                }
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
        self.config = self.config_for(new.sectors);
        self.workers.set_disk(&new);
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
        Self::open_with(path, read_only, serial, false)
    }

    /// [`DiskImage::open`], with O_DIRECT when `direct`.
    pub fn open_with(
        path: &Path,
        read_only: bool,
        serial: Option<&str>,
        direct: bool,
    ) -> Result<Self, BlockError> {
        use std::os::unix::fs::OpenOptionsExt;
        let id = disk_id(path, serial)?;
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(path)
            .map_err(|source| {
                if direct && source.raw_os_error() == Some(libc::EINVAL) {
                    BlockError::Direct {
                        path: path.to_owned(),
                        source,
                    }
                } else {
                    BlockError::Open {
                        path: path.to_owned(),
                        source,
                    }
                }
            })?;
        let mut disk = DiskImage::from_file(file, path, read_only)?;
        disk.id = id;
        if direct {
            let direct_error = |source| BlockError::Direct {
                path: path.to_owned(),
                source,
            };
            let align = direct::alignment(&disk.file).map_err(direct_error)?;
            let bytes = disk.file.metadata().map_err(direct_error)?.len();
            // A block device's metadata length is 0; its size is whole blocks anyway.
            if bytes % align != 0 {
                return Err(BlockError::DirectSize {
                    path: path.to_owned(),
                    bytes,
                    align,
                });
            }
            disk.direct_align = Some(align);
        }
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
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.offered_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // A device without a worker (the driver has not started it, so the transport does not
        // pause or resume it) takes a staged image only at activation: until then the driver
        // already sees that image's capacity, which it reads before it starts the device.
        if !self.workers.is_active()
            && let Some(sectors) = self.swap.staged_sectors()
        {
            read_config_bytes(&self.config_for(sectors), offset, data);
            return;
        }
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field is read-only (no CONFIG_WCE).
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if !self.workers.is_active() {
            self.take_staged_disk();
        }
        self.workers.start(activation, &self.disk, &self.limiter)
    }

    fn reset(&mut self) {
        self.workers.stop();
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        self.workers.pause()
    }

    fn resume(&mut self) -> Result<(), PauseError> {
        if !self.workers.is_active() || self.workers.any_paused() {
            self.take_staged_disk();
        }
        self.workers.resume()
    }

    fn save_state(&self) -> Result<SavedDevice, SnapshotError> {
        // A staged image is what the guest sees from the resume on, and what the VMM's
        // configuration names: the restored device opens that one.
        let sectors = self.swap.staged_sectors().unwrap_or(self.disk.sectors);
        Ok(SavedDevice {
            state: DeviceState::Block(BlockState { sectors }),
            queues: self.workers.saved_positions(VIRTIO_ID_BLOCK)?,
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
            self.workers
                .start_paused(activation, &self.disk, &self.limiter)?;
        }
        Ok(())
    }
}

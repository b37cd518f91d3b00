//! virtio-balloon: the guest gives pages back to the host (inflate) and takes them again
//! (deflate) as the host's target asks; optionally reports its memory statistics every interval
//! (VIRTIO_BALLOON_F_STATS_VQ), deflates by itself when it runs out of memory
//! (VIRTIO_BALLOON_F_DEFLATE_ON_OOM) and reports free pages without a target
//! (VIRTIO_BALLOON_F_REPORTING) and hints free pages when the host starts a run
//! (VIRTIO_BALLOON_F_FREE_PAGE_HINT). Pages inflated, reported or hinted go back to the host at
//! once ([`pages`]), so pvm's resident memory falls.

mod hinting;
mod pages;
mod shared;
mod snapshot;
mod worker;

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;

use crate::device::{ActivateError, Activation, PauseError, VirtioDevice};
use crate::snapshot::{DeviceState, RestoreError, SavedDevice, SnapshotError};
use crate::worker::{WorkerSlot, feature, read_config_bytes};

pub use self::pages::{DiscardError, PAGE_SIZE};
pub use self::shared::{
    BalloonCounters, BalloonHandle, GuestStats, HINT_CMD_ID_DONE, HINT_CMD_ID_STOP, HintingError,
    HintingStatus, IntervalError, PAGES_PER_MIB, STAT_NAMES,
};
use self::worker::BalloonHandler;
pub use self::worker::{MAX_PFNS_PER_BUFFER, MAX_STATS_PER_BUFFER};

/// Feature bits of virtio-balloon (virtio 1.2, 5.5.3).
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u32 = 3;
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;

pub const QUEUE_SIZE: u16 = 256;
/// num_pages, actual, free_page_hint_cmd_id, poison_val: four le32.
const CONFIG_LEN: usize = 16;
/// The one field the driver writes: actual.
const ACTUAL_OFFSET: usize = 4;
static NEXT_BALLOON_INDEX: AtomicUsize = AtomicUsize::new(0);

/// How a balloon is configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonConfig {
    /// The balloon size the host asks for at boot, in MiB.
    pub amount_mib: u32,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest takes pages back when it needs them.
    pub deflate_on_oom: bool,
    /// Seconds between statistics requests; 0 means no statistics queue.
    pub stats_interval_s: u32,
    /// Offer VIRTIO_BALLOON_F_REPORTING: the guest reports free pages, which go to the host.
    pub free_page_reporting: bool,
    /// Offer VIRTIO_BALLOON_F_FREE_PAGE_HINT: on the host's command the guest hints its free
    /// pages, which go to the host.
    pub free_page_hinting: bool,
}

/// A virtio-balloon device.
#[derive(Debug)]
pub struct Balloon {
    worker: WorkerSlot<BalloonHandler>,
    handle: BalloonHandle,
    config: BalloonConfig,
    queue_sizes: Vec<u16>,
}

impl Balloon {
    /// A balloon as `config` asks; fails only if its wake-up eventfd cannot be made.
    pub fn new(config: BalloonConfig) -> io::Result<Self> {
        let index = NEXT_BALLOON_INDEX.fetch_add(1, Ordering::Relaxed);
        let target = config.amount_mib.saturating_mul(PAGES_PER_MIB);
        let queues = 2
            + usize::from(config.stats_interval_s > 0)
            + usize::from(config.free_page_hinting)
            + usize::from(config.free_page_reporting);
        Ok(Balloon {
            worker: WorkerSlot::new(format!("virtio-balloon{index}")),
            handle: BalloonHandle::new(target, config.stats_interval_s, config.free_page_hinting)?,
            config,
            queue_sizes: vec![QUEUE_SIZE; queues],
        })
    }

    /// The VMM's side: target, actual size, statistics, counters.
    pub fn handle(&self) -> BalloonHandle {
        self.handle.clone()
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut bytes = [0u8; CONFIG_LEN];
        bytes[..4].copy_from_slice(&self.handle.target_pages().to_le_bytes());
        bytes[4..8].copy_from_slice(&self.handle.actual_pages().to_le_bytes());
        bytes[8..12].copy_from_slice(&self.handle.hint_cmd_id().to_le_bytes());
        bytes
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut features = feature(VIRTIO_F_VERSION_1);
        if self.config.stats_interval_s > 0 {
            features |= feature(VIRTIO_BALLOON_F_STATS_VQ);
        }
        if self.config.deflate_on_oom {
            features |= feature(VIRTIO_BALLOON_F_DEFLATE_ON_OOM);
        }
        if self.config.free_page_hinting {
            features |= feature(VIRTIO_BALLOON_F_FREE_PAGE_HINT);
        }
        if self.config.free_page_reporting {
            features |= feature(VIRTIO_BALLOON_F_REPORTING);
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is the driver's to write; a write that strays past it is ignored
        // beyond it, one into num_pages is ignored altogether.
        let mut bytes = self.config_bytes();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        for (i, byte) in data.iter().enumerate() {
            let at = start.saturating_add(i);
            if (ACTUAL_OFFSET..ACTUAL_OFFSET + 4).contains(&at) {
                bytes[at] = *byte;
            }
        }
        let actual = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        self.handle.0.actual_pages.store(actual, Ordering::Release);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let queues = worker::QueueSet {
            stats: activation.has_feature(VIRTIO_BALLOON_F_STATS_VQ),
            hinting: activation.has_feature(VIRTIO_BALLOON_F_FREE_PAGE_HINT),
            reporting: activation.has_feature(VIRTIO_BALLOON_F_REPORTING),
        };
        let shared = self.handle.0.clone();
        self.worker
            .start(|| BalloonHandler::new(activation, shared, queues))
    }

    fn reset(&mut self) {
        // A reset driver gave every page back: the balloon starts empty.
        self.worker.stop();
        self.handle.0.actual_pages.store(0, Ordering::Release);
        // ... and holds no hinted pages: no run is under way.
        shared::lock(&self.handle.0.hint).status = HintingStatus::default();
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        Ok(self.worker.pause()?)
    }

    fn resume(&mut self) -> Result<(), PauseError> {
        Ok(self.worker.resume()?)
    }

    fn save_state(&self) -> Result<SavedDevice, SnapshotError> {
        self.save_snapshot()
    }

    fn restore(
        &mut self,
        activation: Option<Activation>,
        state: &DeviceState,
    ) -> Result<(), RestoreError> {
        self.restore_snapshot(activation, state)
    }
}

#[cfg(test)]
mod tests;

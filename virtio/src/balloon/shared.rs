//! [`BalloonHandle`]: what the VMM sees of a running balloon (the target it sets, the size the
//! driver reports, the guest's latest statistics, the refusal counters) and how it tells the
//! worker that the statistics interval changed. Shared between the device, its worker and the
//! API; everything in it is plain numbers, so a panicking holder leaves nothing half-made.

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Guest pages per MiB: the balloon counts 4 KiB pages whatever the guest's page size.
pub const PAGES_PER_MIB: u32 = 256;

/// One statistic the driver reports: the virtio tags 0..=15, under Firecracker's names.
pub const STAT_NAMES: [&str; 16] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kill",
    "alloc_stall",
    "async_scan",
    "direct_scan",
    "async_reclaim",
    "direct_reclaim",
];

/// The guest's memory statistics as last reported: a value per tag the driver sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestStats {
    pub values: [Option<u64>; STAT_NAMES.len()],
    /// How many reports arrived since the device was created.
    pub reports: u64,
}

impl GuestStats {
    /// The statistics by Firecracker's field names, those the guest reported.
    pub fn named(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        STAT_NAMES
            .iter()
            .zip(self.values)
            .filter_map(|(name, value)| Some((*name, value?)))
    }
}

/// What the balloon did, for metrics.
#[derive(Debug, Default)]
pub struct BalloonCounters {
    /// Pages the guest gave up and pvm returned to the host.
    pub inflated_pages: AtomicU64,
    /// Pages the guest took back.
    pub deflated_pages: AtomicU64,
    /// Bytes of free memory the guest reported and pvm returned to the host.
    pub reported_bytes: AtomicU64,
    /// Page numbers outside guest RAM, inflated twice or deflated without being inflated.
    pub refused_pages: AtomicU64,
    /// Statistics reports received.
    pub stats_reports: AtomicU64,
    /// madvise failures (the page stayed resident).
    pub discard_failures: AtomicU64,
    /// Bytes of free memory the guest hinted and pvm returned to the host.
    pub hinted_bytes: AtomicU64,
    /// Hinting buffers refused: a malformed command id, or pages hinted outside a run.
    pub refused_hints: AtomicU64,
}

/// The free page hint command id that stops a run (the host's) or ends one (the driver's).
pub const HINT_CMD_ID_STOP: u32 = 0;
/// The host's command id that lets the driver take its hinted pages back.
pub const HINT_CMD_ID_DONE: u32 = 1;

/// Where free page hinting stands: the command id the host last set in the configuration
/// space and the one the driver last sent on the hinting queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HintingStatus {
    pub host_cmd: u32,
    /// None until the driver sent one.
    pub guest_cmd: Option<u32>,
}

#[derive(Debug, Default)]
pub(crate) struct HintState {
    pub(crate) status: HintingStatus,
    /// The id of the latest run started, so the next one gets a fresh id.
    pub(crate) last_run: u32,
    /// Answer the driver's end of a run with DONE at once.
    pub(crate) ack_on_stop: bool,
}

/// Why a free page hinting command was refused.
#[derive(Debug, thiserror::Error)]
pub enum HintingError {
    #[error(
        "free page hinting was not enabled when the balloon was configured \
         (free_page_hinting true)"
    )]
    NotEnabled,
}

#[derive(Debug)]
pub(crate) struct Shared {
    /// num_pages: the balloon size the host asks for, in 4 KiB pages.
    pub(crate) target_pages: AtomicU32,
    /// actual: the balloon size the driver last reported.
    pub(crate) actual_pages: AtomicU32,
    /// Seconds between statistics requests; 0 when statistics are off.
    pub(crate) stats_interval_s: AtomicU32,
    pub(crate) stats: Mutex<GuestStats>,
    pub(crate) counters: BalloonCounters,
    /// Written when the interval changes; the worker re-arms its timer.
    pub(crate) interval_changed: EventFd,
    /// Whether VIRTIO_BALLOON_F_FREE_PAGE_HINT is offered.
    pub(crate) hinting: bool,
    pub(crate) hint: Mutex<HintState>,
}

/// The VMM's side of a balloon device.
#[derive(Debug, Clone)]
pub struct BalloonHandle(pub(crate) Arc<Shared>);

/// Why the statistics interval cannot change.
#[derive(Debug, thiserror::Error)]
pub enum IntervalError {
    #[error(
        "statistics were not enabled when the balloon was configured; they cannot be turned on later"
    )]
    StatsOff,
    #[error("statistics cannot be turned off once the balloon was configured with them")]
    TurnOff,
    #[error("cannot wake the balloon worker: {0}")]
    Wake(io::Error),
}

impl BalloonHandle {
    pub(crate) fn new(target_pages: u32, stats_interval_s: u32, hinting: bool) -> io::Result<Self> {
        Ok(BalloonHandle(Arc::new(Shared {
            target_pages: AtomicU32::new(target_pages),
            actual_pages: AtomicU32::new(0),
            stats_interval_s: AtomicU32::new(stats_interval_s),
            stats: Mutex::new(GuestStats::default()),
            counters: BalloonCounters::default(),
            interval_changed: EventFd::new(EFD_NONBLOCK)?,
            hinting,
            hint: Mutex::new(HintState::default()),
        })))
    }

    /// The balloon size the host asks for, in 4 KiB pages.
    pub fn target_pages(&self) -> u32 {
        self.0.target_pages.load(Ordering::Acquire)
    }

    /// Sets the target; the caller then raises the configuration-change interrupt so the
    /// driver reads it.
    pub fn set_target_pages(&self, pages: u32) {
        self.0.target_pages.store(pages, Ordering::Release);
    }

    /// The balloon size the driver last reported.
    pub fn actual_pages(&self) -> u32 {
        self.0.actual_pages.load(Ordering::Acquire)
    }

    /// Seconds between statistics requests; 0 when statistics are off.
    pub fn stats_interval_s(&self) -> u32 {
        self.0.stats_interval_s.load(Ordering::Acquire)
    }

    /// Changes the statistics interval; statistics cannot be turned on or off (the device
    /// offered the statistics queue or not when the driver loaded). The next request goes out
    /// at once.
    pub fn set_stats_interval(&self, seconds: u32) -> Result<(), IntervalError> {
        match (self.stats_interval_s(), seconds) {
            (0, 0) => return Ok(()),
            (0, _) => return Err(IntervalError::StatsOff),
            (_, 0) => return Err(IntervalError::TurnOff),
            _ => {}
        }
        self.0.stats_interval_s.store(seconds, Ordering::Release);
        self.0
            .interval_changed
            .write(1)
            .map_err(IntervalError::Wake)
    }

    /// The guest's latest statistics.
    pub fn stats(&self) -> GuestStats {
        *lock(&self.0.stats)
    }

    pub fn counters(&self) -> &BalloonCounters {
        &self.0.counters
    }

    /// Starts a free page hinting run: a fresh command id (never STOP or DONE) goes into the
    /// configuration space; the caller then raises the configuration-change interrupt. With
    /// `ack_on_stop` the device answers the driver's end of the run with DONE by itself, so
    /// the guest takes its hinted pages back.
    pub fn start_hinting(&self, ack_on_stop: bool) -> Result<u32, HintingError> {
        let mut hint = self.hint_state()?;
        let mut id = hint.last_run.wrapping_add(1);
        if id <= HINT_CMD_ID_DONE {
            id = HINT_CMD_ID_DONE + 1;
        }
        hint.last_run = id;
        hint.ack_on_stop = ack_on_stop;
        hint.status.host_cmd = id;
        Ok(id)
    }

    /// Ends the hinting run: DONE lets the driver take back the pages it holds; the caller
    /// then raises the configuration-change interrupt.
    pub fn stop_hinting(&self) -> Result<(), HintingError> {
        self.hint_state()?.status.host_cmd = HINT_CMD_ID_DONE;
        Ok(())
    }

    /// The host's and the driver's latest command ids.
    pub fn hinting_status(&self) -> Result<HintingStatus, HintingError> {
        Ok(self.hint_state()?.status)
    }

    /// The command id the configuration space shows.
    pub(crate) fn hint_cmd_id(&self) -> u32 {
        lock(&self.0.hint).status.host_cmd
    }

    fn hint_state(&self) -> Result<MutexGuard<'_, HintState>, HintingError> {
        if !self.0.hinting {
            return Err(HintingError::NotEnabled);
        }
        Ok(lock(&self.0.hint))
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

//! The balloon's data plane: inflate and deflate queues of page frame numbers, the statistics
//! queue (one buffer the device holds and hands back every interval for the driver to refill)
//! the free page hinting queue ([`super::hinting`]) and the free page reporting queue (buffers
//! that are the free pages themselves).

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use log::warn;
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::timerfd::TimerFd;

use super::hinting::{HintRefusal, acknowledge_end, handle_hint_chain};
use super::pages::{PageTracker, PageVerdict, Runs, discard};
use super::shared::{GuestStats, STAT_NAMES, Shared, lock};
use crate::chain::Chain;
use crate::device::{ActivateError, Activation, Interrupt};
use crate::snapshot::QueuePosition;
use crate::worker::{
    CHAINS_PER_PASS, DeviceQueue, EventHandler, EventLoop, QueuePositions, WorkerError,
};

/// The most page numbers read from one inflate or deflate buffer (Linux sends at most 256);
/// the rest of a longer buffer is ignored.
pub const MAX_PFNS_PER_BUFFER: usize = 4096;
/// The most statistics read from one buffer (virtio defines 16 tags).
pub const MAX_STATS_PER_BUFFER: usize = 64;
/// One statistic: a le16 tag and a le64 value, packed.
const STAT_LEN: usize = 10;

const INFLATE: u64 = 0;
const DEFLATE: u64 = 1;
const STATS: u64 = 2;
const REPORTING: u64 = 3;
const STATS_TIMER: u64 = 4;
const INTERVAL_CHANGED: u64 = 5;
const HINTING: u64 = 6;

/// Which of the guest's misbehaviours were logged already: each once per activation.
#[derive(Debug, Default)]
struct Warned {
    out_of_range: bool,
    repeated: bool,
    bad_buffer: bool,
    bad_stats: bool,
    discard: bool,
    bad_hint: bool,
}

/// The optional queues the driver accepted, by feature.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueSet {
    pub(crate) stats: bool,
    pub(crate) hinting: bool,
    pub(crate) reporting: bool,
}

fn warn_once(flag: &mut bool, message: std::fmt::Arguments<'_>) {
    if !std::mem::replace(flag, true) {
        warn!("virtio-balloon: {message}; further cases are only counted");
    }
}

pub(crate) struct BalloonHandler {
    memory: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    inflate: DeviceQueue,
    deflate: DeviceQueue,
    stats: Option<DeviceQueue>,
    hinting: Option<DeviceQueue>,
    reporting: Option<DeviceQueue>,
    timer: TimerFd,
    shared: Arc<Shared>,
    pages: PageTracker,
    /// The statistics buffer the device holds until the next interval.
    stats_head: Option<u16>,
    /// Reused for each buffer's bytes.
    buf: Vec<u8>,
    warned: Warned,
}

impl BalloonHandler {
    /// The data plane for `activation`: inflate and deflate, then the statistics, hinting and
    /// reporting queues if the driver accepted them. Linux numbers the queues it uses
    /// consecutively, so they are taken in index order by what was negotiated.
    pub(crate) fn new(
        activation: Activation,
        shared: Arc<Shared>,
        set: QueueSet,
    ) -> Result<Self, ActivateError> {
        let got = activation.queues.len();
        let want =
            2 + usize::from(set.stats) + usize::from(set.hinting) + usize::from(set.reporting);
        if got != want {
            return Err(ActivateError::QueueCount { got, want });
        }
        let mut queues: Vec<DeviceQueue> = activation
            .queues
            .into_iter()
            .map(|q| DeviceQueue::new(q, false))
            .collect();
        queues.sort_by_key(|q| q.index);
        let mut queues = queues.into_iter();
        let mut next = || queues.next().ok_or(ActivateError::QueueCount { got, want });
        let (inflate, deflate) = (next()?, next()?);
        let mut optional = |on: bool| if on { next().map(Some) } else { Ok(None) };
        let stats = optional(set.stats)?;
        let hinting = optional(set.hinting)?;
        let reporting = optional(set.reporting)?;
        let pages = PageTracker::new(&activation.memory);
        Ok(BalloonHandler {
            memory: activation.memory,
            interrupt: activation.interrupt,
            inflate,
            deflate,
            stats,
            hinting,
            reporting,
            timer: TimerFd::new().map_err(|e| WorkerError::Timer(e.into()))?,
            shared,
            pages,
            stats_head: None,
            buf: Vec::new(),
            warned: Warned::default(),
        })
    }

    /// What a snapshot keeps of the data plane: the held statistics buffer and the pages.
    pub(crate) fn saved(&self) -> (Option<u16>, Vec<u64>) {
        (self.stats_head, self.pages.words().to_vec())
    }

    /// Takes a snapshot's statistics buffer and pages (checked by the caller).
    pub(crate) fn take_saved(&mut self, stats_head: Option<u16>, pages: PageTracker) {
        self.stats_head = stats_head;
        self.pages = pages;
    }

    /// The statistics queue's size, when the driver accepted one.
    pub(crate) fn stats_queue_size(&self) -> Option<u16> {
        self.stats
            .as_ref()
            .map(|q| virtio_queue::QueueT::size(&q.queue))
    }

    /// Pages currently in the balloon.
    #[cfg(test)]
    pub(crate) fn balloon_pages(&self) -> u64 {
        self.pages.count()
    }

    fn serve_pages(&mut self, inflate: bool) {
        let BalloonHandler {
            memory,
            interrupt,
            pages,
            buf,
            shared,
            warned,
            ..
        } = self;
        let queue = if inflate {
            &mut self.inflate
        } else {
            &mut self.deflate
        };
        queue.process(memory, interrupt.as_ref(), |chain| {
            handle_pages(memory, chain, pages, buf, shared, warned, inflate);
            0
        });
    }

    /// Takes the driver's statistics buffers: each is read, and the newest one is held until
    /// the timer asks for fresh numbers (older ones go back at once).
    fn serve_stats(&mut self) {
        let Some(queue) = self.stats.as_mut() else {
            return;
        };
        for _ in 0..CHAINS_PER_PASS {
            let Some(chain) = queue.pop(&self.memory) else {
                break;
            };
            let head = chain.head_index();
            match read_readable(
                &self.memory,
                chain,
                &mut self.buf,
                MAX_STATS_PER_BUFFER * STAT_LEN,
            ) {
                Ok(()) => {
                    let mut stats = lock(&self.shared.stats);
                    parse_stats(&self.buf, &mut stats, &mut self.warned);
                    self.shared
                        .counters
                        .stats_reports
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(()) => warn_once(
                    &mut self.warned.bad_buffer,
                    format_args!("a statistics buffer lies outside guest RAM"),
                ),
            }
            if let Some(old) = self.stats_head.replace(head) {
                queue.add_used(&self.memory, old, 0);
            }
        }
        queue.signal_used(&self.memory, self.interrupt.as_ref());
    }

    /// The interval passed: the held buffer goes back, asking the driver for fresh numbers.
    fn request_stats(&mut self) {
        if let (Some(queue), Some(head)) = (self.stats.as_mut(), self.stats_head.take()) {
            queue.add_used(&self.memory, head, 0);
            queue.signal_used(&self.memory, self.interrupt.as_ref());
        }
    }

    /// Gives every free page range the driver reports back to the host.
    fn serve_reporting(&mut self) {
        let Some(queue) = self.reporting.as_mut() else {
            return;
        };
        let (memory, shared, warned) = (&self.memory, &self.shared, &mut self.warned);
        queue.process(memory, self.interrupt.as_ref(), |chain| {
            for desc in chain {
                match discard(memory, desc.addr(), u64::from(desc.len())) {
                    Ok(bytes) => {
                        shared
                            .counters
                            .reported_bytes
                            .fetch_add(bytes, Ordering::Relaxed);
                    }
                    Err(e) => {
                        shared
                            .counters
                            .discard_failures
                            .fetch_add(1, Ordering::Relaxed);
                        warn_once(&mut warned.discard, format_args!("free page report: {e}"));
                    }
                }
            }
            0
        });
    }

    /// Serves the hinting queue: pages hinted under the host's run go back to the host; the
    /// driver's end of a run is acknowledged with DONE when the host asked for that.
    fn serve_hinting(&mut self) {
        let Some(queue) = self.hinting.as_mut() else {
            return;
        };
        let (memory, shared, warned) = (&self.memory, &self.shared, &mut self.warned);
        let mut ended = false;
        queue.process(memory, self.interrupt.as_ref(), |chain| {
            let outcome = handle_hint_chain(memory, chain, shared);
            ended |= outcome.ended;
            match outcome.refused {
                Some(HintRefusal::BadCommand { len }) => warn_once(
                    &mut warned.bad_hint,
                    format_args!("a hint command id of {len} bytes (not one le32); refused"),
                ),
                Some(HintRefusal::NotRunning) => warn_once(
                    &mut warned.bad_hint,
                    format_args!("free pages hinted outside the host's hinting run; refused"),
                ),
                None => {}
            }
            if let Some(e) = outcome.discard_error {
                warn_once(&mut warned.discard, format_args!("free page hint: {e}"));
            }
            0
        });
        if ended && acknowledge_end(shared) {
            if let Err(e) = self.interrupt.notify_config() {
                warn!("virtio-balloon: cannot tell the driver its hinting run is done: {e}");
            }
        }
    }

    /// Arms the statistics timer: the first request after `first`, then every interval.
    fn arm_timer(&mut self, first: Duration) {
        let seconds = self.shared.stats_interval_s.load(Ordering::Acquire);
        if self.stats.is_none() || seconds == 0 {
            return;
        }
        let interval = Duration::from_secs(u64::from(seconds));
        if let Err(e) = self.timer.reset(first.min(interval), Some(interval)) {
            warn!("virtio-balloon: cannot arm the statistics timer, no statistics: {e}");
        }
    }
}

/// Reads the device-readable bytes of `chain` into `buf`, at most `max`.
fn read_readable(
    memory: &GuestMemoryMmap,
    chain: Chain<'_>,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<(), ()> {
    buf.clear();
    for desc in chain.filter(|d| !d.is_write_only()) {
        let take = (desc.len() as usize).min(max - buf.len());
        let start = buf.len();
        buf.resize(start + take, 0);
        memory
            .read_slice(&mut buf[start..], desc.addr())
            .map_err(|_| ())?;
        if buf.len() == max {
            break;
        }
    }
    Ok(())
}

/// One inflate or deflate buffer: its le32 page numbers, each checked before anything is done
/// with it; inflated pages go back to the host in runs.
fn handle_pages(
    memory: &GuestMemoryMmap,
    chain: Chain<'_>,
    pages: &mut PageTracker,
    buf: &mut Vec<u8>,
    shared: &Shared,
    warned: &mut Warned,
    inflate: bool,
) {
    if read_readable(memory, chain, buf, MAX_PFNS_PER_BUFFER * 4).is_err() {
        warn_once(
            &mut warned.bad_buffer,
            format_args!("a page number buffer lies outside guest RAM"),
        );
        return;
    }
    if buf.len() % 4 != 0 {
        warn_once(
            &mut warned.bad_buffer,
            format_args!(
                "a page number buffer of {} bytes ends in a partial number",
                buf.len()
            ),
        );
    }
    let counters = &shared.counters;
    let mut runs = Runs::default();
    let give_back = |run: Option<(vm_memory::GuestAddress, u64)>, warned: &mut Warned| {
        let Some((addr, len)) = run else { return };
        if let Err(e) = discard(memory, addr, len) {
            counters.discard_failures.fetch_add(1, Ordering::Relaxed);
            warn_once(&mut warned.discard, format_args!("inflate: {e}"));
        }
    };
    for bytes in buf.chunks_exact(4) {
        let pfn = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        match pages.mark(memory, pfn, inflate) {
            PageVerdict::Accepted if inflate => {
                counters.inflated_pages.fetch_add(1, Ordering::Relaxed);
                give_back(runs.push(pfn), warned);
            }
            PageVerdict::Accepted => {
                counters.deflated_pages.fetch_add(1, Ordering::Relaxed);
            }
            PageVerdict::OutOfRange => {
                counters.refused_pages.fetch_add(1, Ordering::Relaxed);
                warn_once(
                    &mut warned.out_of_range,
                    format_args!("page frame {pfn:#x} is not guest RAM; refused"),
                );
            }
            PageVerdict::Repeated => {
                counters.refused_pages.fetch_add(1, Ordering::Relaxed);
                let what = if inflate {
                    "inflated while already in the balloon"
                } else {
                    "deflated while not in the balloon"
                };
                warn_once(
                    &mut warned.repeated,
                    format_args!("page frame {pfn:#x} {what}; refused"),
                );
            }
        }
    }
    give_back(runs.take(), warned);
}

/// Reads packed (le16 tag, le64 value) statistics into `stats`; unknown tags and a partial
/// entry at the end are ignored (logged once).
fn parse_stats(buf: &[u8], stats: &mut GuestStats, warned: &mut Warned) {
    if buf.len() % STAT_LEN != 0 {
        warn_once(
            &mut warned.bad_stats,
            format_args!(
                "a statistics buffer of {} bytes ends in a partial entry",
                buf.len()
            ),
        );
    }
    for entry in buf.chunks_exact(STAT_LEN) {
        let tag = usize::from(u16::from_le_bytes([entry[0], entry[1]]));
        let mut value = [0u8; 8];
        value.copy_from_slice(&entry[2..]);
        match stats.values.get_mut(tag) {
            Some(slot) => *slot = Some(u64::from_le_bytes(value)),
            None => warn_once(
                &mut warned.bad_stats,
                format_args!(
                    "unknown statistic tag {tag} (known: 0..{})",
                    STAT_NAMES.len()
                ),
            ),
        }
    }
    stats.reports += 1;
}

impl QueuePositions for BalloonHandler {
    fn positions(&self) -> Vec<QueuePosition> {
        [&self.inflate, &self.deflate]
            .into_iter()
            .chain(&self.stats)
            .chain(&self.hinting)
            .chain(&self.reporting)
            .map(DeviceQueue::position)
            .collect()
    }
}

impl EventHandler for BalloonHandler {
    fn register(&mut self, events: &EventLoop) -> io::Result<()> {
        events.watch(&self.inflate.kick, INFLATE)?;
        events.watch(&self.deflate.kick, DEFLATE)?;
        if let Some(queue) = &self.stats {
            events.watch(&queue.kick, STATS)?;
            events.watch(&self.timer, STATS_TIMER)?;
            events.watch(&self.shared.interval_changed, INTERVAL_CHANGED)?;
        }
        if let Some(queue) = &self.hinting {
            events.watch(&queue.kick, HINTING)?;
        }
        if let Some(queue) = &self.reporting {
            events.watch(&queue.kick, REPORTING)?;
        }
        Ok(())
    }

    fn start(&mut self, _events: &EventLoop) {
        self.serve_pages(true);
        self.serve_pages(false);
        self.serve_stats();
        self.serve_hinting();
        self.serve_reporting();
        let interval = Duration::from_secs(u64::from(
            self.shared.stats_interval_s.load(Ordering::Acquire),
        ));
        self.arm_timer(interval);
    }

    fn handle_event(&mut self, _events: &EventLoop, token: u64) {
        match token {
            INFLATE => {
                self.inflate.clear_kick();
                self.serve_pages(true);
            }
            DEFLATE => {
                self.deflate.clear_kick();
                self.serve_pages(false);
            }
            STATS => {
                if let Some(queue) = &self.stats {
                    queue.clear_kick();
                }
                self.serve_stats();
            }
            HINTING => {
                if let Some(queue) = &self.hinting {
                    queue.clear_kick();
                }
                self.serve_hinting();
            }
            REPORTING => {
                if let Some(queue) = &self.reporting {
                    queue.clear_kick();
                }
                self.serve_reporting();
            }
            STATS_TIMER => {
                // The timer is readable, so this does not block.
                if let Err(e) = self.timer.wait() {
                    warn!("virtio-balloon: cannot read the statistics timer: {e}");
                }
                self.request_stats();
            }
            INTERVAL_CHANGED => {
                let _ = self.shared.interval_changed.read();
                // The first request under the new interval goes out at once.
                self.arm_timer(Duration::from_millis(1));
            }
            _ => {}
        }
    }
}

//! The balloon against a hostile driver: page numbers out of range or repeated, odd-sized
//! buffers, statistics with bad tags and lengths, reports outside RAM. Nothing panics, nothing
//! out of range is acted on, and what is refused is counted.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::pages::PageTracker;
use super::*;
use crate::testing::{
    RecordingInterrupt, TestQueue, activation, eventually, readable, test_memory, writable,
};

/// Where the test buffers of page numbers and statistics go (pages below hold the rings).
const BUF: u64 = 0x10_000;
/// A page of test RAM the tests inflate (well above the rings and buffers).
const PAGE: u32 = 0x400;

struct Rig {
    mem: GuestMemoryMmap,
    balloon: Balloon,
    queues: Vec<TestQueue>,
    interrupt: Arc<RecordingInterrupt>,
}

impl Rig {
    fn new(config: BalloonConfig) -> Self {
        let mem = test_memory();
        let mut balloon = Balloon::new(config).unwrap();
        let count = balloon.queue_max_sizes().len();
        let queues: Vec<TestQueue> = (0..count)
            .map(|i| TestQueue::at(&mem, GuestAddress(0x2000 * i as u64), 16))
            .collect();
        let interrupt = Arc::new(RecordingInterrupt::for_queues(count as u16));
        let active = queues
            .iter()
            .enumerate()
            .map(|(i, q)| q.active_queue(i as u16))
            .collect();
        let features = balloon.features();
        balloon
            .activate(activation(&mem, &interrupt, active, features))
            .unwrap();
        Rig {
            mem,
            balloon,
            queues,
            interrupt,
        }
    }

    /// Sends `bytes` as one readable buffer on `queue` and waits until it is used.
    fn send(&self, queue: usize, at: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
        self.send_descs(queue, &[readable(at, bytes.len() as u32)]);
    }

    fn send_descs(&self, queue: usize, descs: &[virtio_queue::desc::RawDescriptor]) {
        let q = &self.queues[queue];
        let before = q.used(&self.mem).len();
        q.add_chain(descs);
        q.kick();
        assert!(
            eventually(|| q.used(&self.mem).len() > before),
            "queue {queue} never used the buffer"
        );
    }

    fn counters(&self) -> &BalloonCounters {
        // The handle's counters live as long as the device.
        self.balloon.handle.0.counters_ref()
    }
}

impl shared::Shared {
    fn counters_ref(&self) -> &BalloonCounters {
        &self.counters
    }
}

fn pfns(list: &[u32]) -> Vec<u8> {
    list.iter().flat_map(|p| p.to_le_bytes()).collect()
}

fn load(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn page_byte(mem: &GuestMemoryMmap, pfn: u32) -> u8 {
    mem.read_obj(GuestAddress(u64::from(pfn) * PAGE_SIZE + 100))
        .unwrap()
}

#[test]
fn inflated_pages_go_back_to_the_host_and_bad_numbers_are_refused() {
    let rig = Rig::new(BalloonConfig::default());
    for pfn in [PAGE, PAGE + 1, PAGE + 5] {
        rig.mem
            .write_obj(0xabu8, GuestAddress(u64::from(pfn) * PAGE_SIZE + 100))
            .unwrap();
    }
    // Two in range, one past RAM, one past any u32 address, one repeated in the same buffer.
    rig.send(0, BUF, &pfns(&[PAGE, PAGE + 1, 0x10_0000, u32::MAX, PAGE]));
    assert_eq!(load(&rig.counters().inflated_pages), 2);
    assert_eq!(load(&rig.counters().refused_pages), 3);
    // MADV_DONTNEED on the anonymous test RAM: the pages read as zeros; a page not inflated
    // keeps its contents.
    assert_eq!(page_byte(&rig.mem, PAGE), 0);
    assert_eq!(page_byte(&rig.mem, PAGE + 1), 0);
    assert_eq!(page_byte(&rig.mem, PAGE + 5), 0xab);
    // Inflating them again is refused.
    rig.send(0, BUF, &pfns(&[PAGE + 1]));
    assert_eq!(load(&rig.counters().refused_pages), 4);
    assert_eq!(rig.queues[0].used(&rig.mem), vec![(0, 0), (1, 0)]);
}

#[test]
fn deflating_a_page_not_in_the_balloon_is_refused() {
    let rig = Rig::new(BalloonConfig::default());
    rig.send(0, BUF, &pfns(&[PAGE, PAGE + 1]));
    rig.send(1, BUF, &pfns(&[PAGE, PAGE + 7, PAGE, 0xffff_fff0]));
    let c = rig.counters();
    assert_eq!(load(&c.deflated_pages), 1);
    assert_eq!(load(&c.refused_pages), 3);
    // The deflated page may be inflated again, the other stays in.
    rig.send(0, BUF, &pfns(&[PAGE, PAGE + 1]));
    assert_eq!(load(&c.inflated_pages), 3);
    assert_eq!(load(&c.refused_pages), 4);
}

#[test]
fn odd_sized_and_split_buffers() {
    let rig = Rig::new(BalloonConfig::default());
    // A page number split over two descriptors counts; a trailing partial one does not.
    let bytes = pfns(&[PAGE, PAGE + 1]);
    rig.mem.write_slice(&bytes[..3], GuestAddress(BUF)).unwrap();
    rig.mem
        .write_slice(&bytes[3..], GuestAddress(BUF + 0x100))
        .unwrap();
    rig.mem
        .write_slice(&[1, 2], GuestAddress(BUF + 0x200))
        .unwrap();
    rig.send_descs(
        0,
        &[
            readable(BUF, 3),
            readable(BUF + 0x100, 5),
            readable(BUF + 0x200, 2),
        ],
    );
    assert_eq!(load(&rig.counters().inflated_pages), 2);
    // Empty, writable-only, outside RAM and enormous buffers: used, nothing done.
    rig.send_descs(0, &[readable(BUF, 0)]);
    rig.send_descs(0, &[writable(BUF, 64)]);
    rig.send_descs(0, &[readable(0x40_0000_0000, 64)]);
    rig.send_descs(0, &[readable(0xff_fff0, 64)]);
    rig.mem
        .write_slice(&[0u8; MAX_PFNS_PER_BUFFER * 4], GuestAddress(BUF))
        .unwrap();
    rig.send_descs(0, &[readable(BUF, u32::MAX)]);
    // The huge one reads MAX_PFNS_PER_BUFFER numbers from RAM: page 0 once, repeats refused.
    let c = rig.counters();
    assert_eq!(load(&c.inflated_pages), 3);
    assert_eq!(load(&c.refused_pages), MAX_PFNS_PER_BUFFER as u64 - 1);
}

fn stat(tag: u16, value: u64) -> Vec<u8> {
    let mut entry = tag.to_le_bytes().to_vec();
    entry.extend_from_slice(&value.to_le_bytes());
    entry
}

#[test]
fn statistics_are_held_and_requested_every_interval() {
    let rig = Rig::new(BalloonConfig {
        stats_interval_s: 1,
        ..Default::default()
    });
    assert_ne!(rig.balloon.features() & (1 << VIRTIO_BALLOON_F_STATS_VQ), 0);
    let handle = rig.balloon.handle();
    let mut bytes = stat(4, 1 << 20);
    bytes.extend(stat(5, 2 << 20));
    bytes.extend(stat(99, 7)); // unknown tag: ignored
    bytes.extend([1, 2, 3]); // a partial entry: ignored
    rig.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
    let q = &rig.queues[2];
    q.add_chain(&[readable(BUF, bytes.len() as u32)]);
    q.kick();
    assert!(eventually(|| handle.stats().reports == 1));
    let stats = handle.stats();
    let named: Vec<_> = stats.named().collect();
    assert_eq!(
        named,
        vec![("free_memory", 1 << 20), ("total_memory", 2 << 20)]
    );
    // Held until the interval passes, then handed back for fresh numbers.
    assert!(q.used(&rig.mem).is_empty());
    let start = std::time::Instant::now();
    assert!(rig.interrupt.wait_for(2, 1) || rig.interrupt.wait_for(2, 1));
    assert!(start.elapsed() >= std::time::Duration::from_millis(900));
    assert_eq!(q.used(&rig.mem), vec![(0, 0)]);
    // A new interval takes effect at once; statistics cannot be turned off.
    assert!(handle.set_stats_interval(0).is_err());
    q.add_chain(&[readable(BUF, 10)]);
    q.kick();
    assert!(eventually(|| handle.stats().reports == 2));
    handle.set_stats_interval(5).unwrap();
    assert!(rig.interrupt.wait_for(2, 2));
    assert_eq!(handle.stats_interval_s(), 5);
}

#[test]
fn statistics_cannot_be_turned_on_later() {
    let rig = Rig::new(BalloonConfig::default());
    assert_eq!(rig.balloon.queue_max_sizes().len(), 2);
    assert!(matches!(
        rig.balloon.handle().set_stats_interval(3),
        Err(IntervalError::StatsOff)
    ));
}

#[test]
fn reported_free_pages_go_back_and_bad_reports_are_refused() {
    let rig = Rig::new(BalloonConfig {
        free_page_reporting: true,
        ..Default::default()
    });
    let at = u64::from(PAGE) * PAGE_SIZE;
    rig.mem
        .write_slice(&[0xcd; 0x3000], GuestAddress(at))
        .unwrap();
    // A 2-page report plus an unaligned tail, which keeps its partial page.
    rig.send_descs(2, &[writable(at, 0x2000), writable(at + 0x2000, 0x800)]);
    let c = rig.counters();
    assert_eq!(load(&c.reported_bytes), 0x2000);
    assert_eq!(page_byte(&rig.mem, PAGE), 0);
    assert_eq!(page_byte(&rig.mem, PAGE + 2), 0xcd);
    rig.send_descs(
        2,
        &[writable(0xff_f000, 0x2000), writable(u64::MAX - 10, 100)],
    );
    assert_eq!(load(&c.discard_failures), 2);
    assert_eq!(load(&c.reported_bytes), 0x2000);
}

#[test]
fn config_space_has_the_target_and_takes_only_actual() {
    let mut balloon = Balloon::new(BalloonConfig {
        amount_mib: 64,
        deflate_on_oom: true,
        ..Default::default()
    })
    .unwrap();
    assert_ne!(
        balloon.features() & (1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM),
        0
    );
    let mut word = [0u8; 4];
    balloon.read_config(0, &mut word);
    assert_eq!(u32::from_le_bytes(word), 64 * PAGES_PER_MIB);
    balloon.write_config(0, &[0xff; 8]);
    balloon.write_config(u64::MAX, &[1]);
    balloon.read_config(0, &mut word);
    assert_eq!(
        u32::from_le_bytes(word),
        64 * PAGES_PER_MIB,
        "num_pages is the host's"
    );
    assert_eq!(balloon.handle().actual_pages(), u32::MAX);
    balloon.write_config(5, &[0]);
    assert_eq!(balloon.handle().actual_pages(), 0xffff_00ff);
    balloon.handle().set_target_pages(10);
    balloon.read_config(0, &mut word);
    assert_eq!(u32::from_le_bytes(word), 10);
    balloon.reset();
    assert_eq!(balloon.handle().actual_pages(), 0);
}

#[test]
fn a_wrong_number_of_queues_is_refused() {
    let mem = test_memory();
    let mut balloon = Balloon::new(BalloonConfig::default()).unwrap();
    let tq = TestQueue::new(&mem, 16);
    let interrupt = Arc::new(RecordingInterrupt::default());
    let err = balloon
        .activate(activation(&mem, &interrupt, vec![tq.active_queue(0)], 0))
        .unwrap_err();
    assert!(matches!(err, ActivateError::QueueCount { got: 1, want: 2 }));
}

#[test]
fn pause_keeps_the_balloon() {
    let mut rig = Rig::new(BalloonConfig::default());
    rig.send(0, BUF, &pfns(&[PAGE]));
    rig.balloon.pause().unwrap();
    let paused = rig.balloon.worker.paused().map(|h| h.balloon_pages());
    assert_eq!(paused, Some(1));
    rig.queues[0].add_chain(&[readable(BUF, 4)]);
    rig.queues[0].kick();
    rig.balloon.resume().unwrap();
    assert!(
        eventually(|| load(&rig.counters().refused_pages) == 1),
        "repeat seen after resume"
    );
}

#[test]
fn shared_memfd_ram_is_punched_not_just_unmapped() {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::MetadataExt;

    use vm_memory::FileOffset;

    // Guest RAM as pvm maps it for vhost-user: a memfd mapped MAP_SHARED, where MADV_DONTNEED
    // would leave the pages in the file.
    // SAFETY: a NUL-terminated name; the descriptor is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"balloon-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: memfd_create just returned this descriptor.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(0x20_0000).unwrap();
    let ranges = [(
        GuestAddress(0),
        0x20_0000,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )];
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&ranges).unwrap();
    mem.write_slice(&[0x5a; 0x4000], GuestAddress(0x10_0000))
        .unwrap();
    let blocks = || file.metadata().unwrap().blocks();
    let before = blocks();
    assert!(before >= 0x4000 / 512, "the memfd holds the written pages");
    assert_eq!(
        pages::discard(&mem, GuestAddress(0x10_0000), 0x4000).unwrap(),
        0x4000
    );
    assert_eq!(blocks(), before - 0x4000 / 512, "the pages left the memfd");
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0);
    // A range crossing the end of RAM is refused whole.
    assert!(pages::discard(&mem, GuestAddress(0x1f_f000), 0x2000).is_err());
}

/// A discarded page changes (to zeros, or back to a restored memory file's contents): a Diff
/// snapshot must carry it. Partial pages at either end are left alone and unmarked.
#[test]
fn discarded_pages_are_marked_dirty() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
    let log = crate::dirty::DirtyLog::track(&mem);
    assert_eq!(
        pages::discard(&mem, GuestAddress(0x10_0800), 0x2800).unwrap(),
        0x2000
    );
    assert_eq!(crate::dirty::tests::pages(&log, 0), [0x101, 0x102]);
}

#[path = "hinting_tests.rs"]
mod hinting;
#[test]
fn a_restored_balloon_keeps_its_sizes_interval_pages_and_held_statistics_buffer() {
    use crate::snapshot::{DeviceState, RestoreError};
    let config = BalloonConfig {
        amount_mib: 1,
        deflate_on_oom: true,
        stats_interval_s: 60,
        free_page_reporting: false,
        free_page_hinting: false,
    };
    let rig = Rig::new(config);
    let handle = rig.balloon.handle();
    rig.send(0, BUF, &pfns(&[PAGE, PAGE + 1]));
    let q = &rig.queues[2];
    q.add_chain(&[readable(BUF, 10)]);
    q.kick();
    assert!(eventually(|| handle.stats().reports == 1));
    handle.set_target_pages(512);
    let mut balloon = rig.balloon;
    balloon.write_config(ACTUAL_OFFSET as u64, &2u32.to_le_bytes());
    assert!(balloon.save_state().is_err(), "saved while running");
    balloon.pause().unwrap();
    handle.set_stats_interval(1).unwrap();
    let saved = balloon.save_state().unwrap();
    let DeviceState::Balloon(state) = &saved.state else {
        panic!("{saved:?}");
    };
    assert_eq!(
        (
            state.target_pages,
            state.actual_pages,
            state.stats_interval_s
        ),
        (512, 2, 1)
    );
    assert_eq!(state.features, balloon.features());
    assert_eq!(state.stats_head, Some(0));
    assert_eq!(
        state.inflated.iter().map(|w| w.count_ones()).sum::<u32>(),
        2
    );
    let indices: Vec<u16> = saved.queues.iter().map(|p| p.index).collect();
    assert_eq!(indices, vec![0, 1, 2]);
    drop(balloon);

    let mut restored = Balloon::new(config).unwrap();
    let interrupt = Arc::new(RecordingInterrupt::for_queues(3));
    let features = restored.features();
    let activation_at = |queues| activation(&rig.mem, &interrupt, queues, features);
    restored
        .restore(
            Some(activation_at(crate::testing::restored_queues(
                &rig.queues,
                &saved.queues,
            ))),
            &saved.state,
        )
        .unwrap();
    let new_handle = restored.handle();
    assert_eq!(new_handle.target_pages(), 512);
    assert_eq!(new_handle.actual_pages(), 2);
    assert_eq!(new_handle.stats_interval_s(), 1);
    let mut config_bytes = [0u8; 8];
    restored.read_config(0, &mut config_bytes);
    assert_eq!(config_bytes, [0, 2, 0, 0, 2, 0, 0, 0]);
    restored.resume().unwrap();
    // The held buffer goes back when the saved interval passes.
    assert!(eventually(|| q.used(&rig.mem) == vec![(0, 0)]));
    // The pages inflated before the snapshot can be deflated, not inflated again.
    let before = rig.queues[1].used(&rig.mem).len();
    rig.queues[1].add_chain(&[readable(BUF, 8)]);
    rig.mem
        .write_slice(&pfns(&[PAGE, PAGE + 1]), GuestAddress(BUF))
        .unwrap();
    rig.queues[1].kick();
    assert!(eventually(|| rig.queues[1].used(&rig.mem).len() > before));
    let c = new_handle.counters();
    assert_eq!(load(&c.deflated_pages), 2);
    assert_eq!(load(&c.refused_pages), 0);
    drop(restored);

    // A device configured otherwise refuses the state, naming the value.
    let mut other = Balloon::new(BalloonConfig {
        deflate_on_oom: false,
        ..config
    })
    .unwrap();
    let e = other.restore(None, &saved.state).unwrap_err();
    assert!(e.to_string().contains("features"), "{e}");
    let mut no_stats = Balloon::new(BalloonConfig {
        stats_interval_s: 0,
        ..config
    })
    .unwrap();
    let mut state = state.clone();
    state.features = no_stats.features();
    let e = no_stats
        .restore(None, &DeviceState::Balloon(state.clone()))
        .unwrap_err();
    assert!(e.to_string().contains("statistics interval"), "{e}");
    let e = other.restore(None, &DeviceState::Rng).unwrap_err();
    assert!(matches!(e, RestoreError::DeviceKind { .. }), "{e}");
}

#[test]
fn hostile_balloon_states_are_refused() {
    use crate::snapshot::DeviceState;
    let config = BalloonConfig {
        stats_interval_s: 5,
        ..Default::default()
    };
    let rig = Rig::new(config);
    let mut balloon = rig.balloon;
    balloon.pause().unwrap();
    let DeviceState::Balloon(good) = balloon.save_state().unwrap().state else {
        panic!("not a balloon state");
    };
    drop(balloon);
    type Change = fn(&mut crate::snapshot::BalloonState);
    let cases: [(Change, bool, &str); 4] = [
        (|s| s.inflated.push(0), true, "page bitmap length"),
        (|s| s.inflated.clear(), true, "page bitmap length"),
        (
            |s| s.stats_head = Some(16),
            true,
            "held statistics buffer 16",
        ),
        (|s| s.stats_head = Some(0), false, "never started"),
    ];
    for (change, active, expected) in cases {
        let mut state = good.clone();
        change(&mut state);
        let mut fresh = Balloon::new(config).unwrap();
        let interrupt = Arc::new(RecordingInterrupt::for_queues(3));
        let features = fresh.features();
        let activation = active.then(|| {
            let queues = (0u16..)
                .zip(&rig.queues)
                .map(|(i, q)| q.active_queue(i))
                .collect();
            activation(&rig.mem, &interrupt, queues, features)
        });
        let result = fresh.restore(activation, &DeviceState::Balloon(state));
        let e = result.unwrap_err().to_string();
        assert!(e.contains(expected), "{e}");
    }
    // A page outside RAM: 16 MiB of test RAM fills its bitmap's words exactly, so a hole
    // between two regions stands in for it.
    let holed = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x10_0000),
        (GuestAddress(0x20_0000), 0x10_0000),
    ])
    .unwrap();
    let mut words = vec![0u64; PageTracker::new(&holed).words().len()];
    words[0x100 / 64] = 1; // frame 0x100: the hole at 1 MiB
    assert_eq!(
        PageTracker::from_words(&holed, &words).unwrap_err(),
        Some(0x100)
    );
    words[0x100 / 64] = 0;
    words[0] = 0b101;
    assert!(PageTracker::from_words(&holed, &words).is_ok());
}

#[test]
fn a_balloon_with_hinting_restores_with_its_hinting_queue_and_no_run() {
    let config = BalloonConfig {
        amount_mib: 1,
        deflate_on_oom: false,
        stats_interval_s: 0,
        free_page_reporting: true,
        free_page_hinting: true,
    };
    let rig = Rig::new(config);
    let mut balloon = rig.balloon;
    balloon.pause().unwrap();
    let saved = balloon.save_state().unwrap();
    let indices: Vec<u16> = saved.queues.iter().map(|p| p.index).collect();
    assert_eq!(
        indices,
        vec![0, 1, 2, 3],
        "inflate, deflate, hinting, reporting"
    );
    drop(balloon);
    let mut restored = Balloon::new(config).unwrap();
    let interrupt = Arc::new(RecordingInterrupt::for_queues(4));
    let features = restored.features();
    let queues = crate::testing::restored_queues(&rig.queues, &saved.queues);
    restored
        .restore(
            Some(activation(&rig.mem, &interrupt, queues, features)),
            &saved.state,
        )
        .unwrap();
    restored.resume().unwrap();
    // The inflate queue still works after the restore.
    rig.queues[0].add_chain(&[readable(BUF, 4)]);
    rig.mem
        .write_slice(&pfns(&[PAGE]), GuestAddress(BUF))
        .unwrap();
    rig.queues[0].kick();
    assert!(eventually(|| !rig.queues[0].used(&rig.mem).is_empty()));
}

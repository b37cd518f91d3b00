//! A rate-limited block device measured through its worker: it keeps to its limit and serves
//! every request.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_T_IN;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::rate_limiter::BucketConfig;
use crate::testing::{
    RecordingInterrupt, TestQueue, activation, assert_within_5_percent, readable, test_memory,
    writable,
};

const REQUEST: u32 = 64 << 10;

// The limits again on the io_uring engine, which admits each request before it queues it.
tests_on_io_uring!(
    a_bandwidth_limited_disk_keeps_to_its_limit,
    an_iops_limited_disk_keeps_to_its_limit,
    the_buckets_stay_with_the_device_across_pause_and_resume,
);

/// `size` tokens per `ms` milliseconds.
fn bucket(size: u64, ms: u64) -> Option<BucketConfig> {
    Some(BucketConfig {
        size,
        one_time_burst: 0,
        refill_time: Duration::from_millis(ms),
    })
}

/// A limit on operations only.
fn ops(size: u64, ms: u64) -> RateLimit {
    RateLimit {
        bandwidth: None,
        ops: bucket(size, ms),
    }
}

/// Reads `requests` times 64 KiB through a worker limited by `limit` and returns how long the
/// device took to use them all. At most 128 requests: MockSplitQueue puts the used ring over the
/// second half of a 256-entry available ring.
fn time_reads(limit: RateLimit, requests: u16) -> Duration {
    time_reads_with(limit, requests, |_| {}, |_| {})
}

/// [`time_reads`], running `before` on the active device before any request is there and
/// `meanwhile` right after (pausing it, changing its limits).
fn time_reads_with(
    limit: RateLimit,
    requests: u16,
    before: impl FnOnce(&mut Block),
    meanwhile: impl FnOnce(&mut Block),
) -> Duration {
    assert!(requests <= 128);
    let mem = test_memory();
    let tmp = TempFile::new().unwrap();
    tmp.as_file()
        .write_all_at(&[7u8; REQUEST as usize], 0)
        .unwrap();
    let options = BlockOptions {
        engine: ENGINE.get(),
        ..BlockOptions::default()
    };
    let mut block = Block::with_options(tmp.as_path(), true, None, options)
        .unwrap()
        .with_rate_limit(limit);
    assert_eq!(block.rate_limit(), limit.is_enabled().then_some(limit));
    let tq = TestQueue::new(&mem, 256);
    let active = tq.active_queue(0);
    let kick = active.kick.try_clone().unwrap();
    let interrupt = Arc::new(RecordingInterrupt::default());
    let features = block.features();
    block
        .activate(activation(&mem, &interrupt, vec![active], features))
        .unwrap();
    // Before any request is available: the worker may already be looking.
    before(&mut block);

    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    mem.write_slice(&header, GuestAddress(0x10_000)).unwrap();
    // One chain, made available `requests` times: the device serves them one after another.
    tq.add_chain(&[
        readable(0x10_000, 16),
        writable(0x100_000, REQUEST),
        writable(0x20_000, 1),
    ]);
    for _ in 1..requests {
        tq.publish(&mem, 0);
    }
    let start = Instant::now();
    kick.write(1).unwrap();
    meanwhile(&mut block);
    let deadline = start + Duration::from_secs(5);
    while tq.used(&mem).len() < usize::from(requests) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let elapsed = start.elapsed();
    assert_eq!(
        tq.used(&mem).len(),
        usize::from(requests),
        "every request served"
    );
    assert!(tq.used(&mem).iter().all(|&used| used == (0, REQUEST + 1)));
    block.reset();
    elapsed
}

#[test]
fn a_bandwidth_limited_disk_keeps_to_its_limit() {
    // 3600 KiB/s with a 360 KiB bucket: 120 reads of 64 KiB need (7680 - 360) / 3600 s.
    let limit = RateLimit {
        bandwidth: bucket(360 << 10, 100),
        ops: None,
    };
    let elapsed = time_reads(limit, 120);
    assert_within_5_percent(elapsed, Duration::from_millis(2033));
}

#[test]
fn an_iops_limited_disk_keeps_to_its_limit() {
    // 60 requests/s with a bucket of 6: 120 requests need 1.9 s.
    let limit = ops(6, 100);
    let elapsed = time_reads(limit, 120);
    assert_within_5_percent(elapsed, Duration::from_millis(1900));
}

#[test]
fn the_buckets_stay_with_the_device_across_pause_and_resume() {
    // 60 requests/s with a bucket of 30: 120 requests need 1.5 s. A resume that refilled or
    // forgot the buckets would finish 0.5 s early; the pause itself costs nothing, as the
    // buckets refill meanwhile.
    let limit = ops(30, 500);
    let elapsed = time_reads_with(
        limit,
        120,
        |_| {},
        |block| {
            std::thread::sleep(Duration::from_millis(600));
            block.pause().unwrap();
            std::thread::sleep(Duration::from_millis(200));
            block.resume().unwrap();
        },
    );
    assert_within_5_percent(elapsed, Duration::from_millis(1500));
}

#[test]
fn limits_change_while_the_device_runs() {
    // 60 requests/s with a bucket of 6 (refill 100 ms).
    let limit = ops(6, 100);
    // Set on an active unlimited device: 36 requests need 0.5 s.
    let set = |block: &mut Block| block.rate_limiter().set(limit);
    let elapsed = time_reads_with(RateLimit::default(), 36, set, |_| {});
    assert_within_5_percent(elapsed, Duration::from_millis(500));
    // Lifted after 300 ms of 1.9 s: the rest goes at once.
    let elapsed = time_reads_with(
        limit,
        120,
        |_| {},
        |block| {
            std::thread::sleep(Duration::from_millis(300));
            block.rate_limiter().set(RateLimit::default());
            assert_eq!(block.rate_limit(), None);
        },
    );
    assert!(elapsed < Duration::from_millis(500), "took {elapsed:?}");
}

#[test]
fn a_disk_without_a_limit_has_none() {
    let tmp = TempFile::new().unwrap();
    let block = Block::new(tmp.as_path(), true, None).unwrap();
    assert_eq!(block.rate_limit(), None);
    let block = block.with_rate_limit(RateLimit {
        bandwidth: Some(BucketConfig::per_second(0)),
        ops: None,
    });
    assert_eq!(block.rate_limit(), None, "a zero size limits nothing");
}

//! Rate-limited virtio-net measured through a pair worker on a socket backend: each direction
//! keeps to its limit and nothing is dropped.

use std::time::{Duration, Instant};

use super::*;
use crate::rate_limiter::{BucketConfig, RateLimit};
use crate::testing::assert_within_5_percent;

/// `size` tokens per 100 ms.
fn per_100ms(size: u64) -> Option<BucketConfig> {
    Some(BucketConfig {
        size,
        one_time_burst: 0,
        refill_time: Duration::from_millis(100),
    })
}

/// An active device with `rx` and `tx` limits; returns it with its rx and tx queues' kicks.
fn limited_net(
    mem: &GuestMemoryMmap,
    backend: Arc<SocketBackend>,
    rx: RateLimit,
    tx: RateLimit,
) -> (Net, TestQueue, TestQueue, EventFd, EventFd) {
    let mut net = Net::new(backend, None).unwrap().with_rate_limits(rx, tx);
    let enabled = |limit: RateLimit| limit.is_enabled().then_some(limit);
    assert_eq!(net.rate_limits(), (enabled(rx), enabled(tx)));
    let rxq = TestQueue::at(mem, GuestAddress(0), 256);
    let txq = TestQueue::at(mem, GuestAddress(0x4000), 256);
    let (rx_active, tx_active) = (rxq.active_queue(0), txq.active_queue(1));
    let rx_kick = rx_active.kick.try_clone().unwrap();
    let tx_kick = tx_active.kick.try_clone().unwrap();
    let features = net.features();
    let interrupt = Arc::new(RecordingInterrupt::default());
    net.activate(activation(
        mem,
        &interrupt,
        vec![rx_active, tx_active],
        features,
    ))
    .unwrap();
    (net, rxq, txq, rx_kick, tx_kick)
}

#[test]
fn transmit_keeps_to_its_bandwidth_limit() {
    // 200 kB/s with a 20 kB bucket: 105 frames of 4000 bytes need (420 - 20) / 200 s.
    let mem = test_memory();
    let (backend, peer) = backend(0);
    let tx = RateLimit {
        bandwidth: per_100ms(20_000),
        ops: None,
    };
    let (mut net, _rxq, txq, _, tx_kick) = limited_net(&mem, backend, RateLimit::default(), tx);
    let f = frame(4000);
    mem.write_slice(&f, GuestAddress(0x50_000)).unwrap();
    // One chain made available 105 times (at most 128: MockSplitQueue's used ring overlaps the
    // second half of a 256-entry available ring).
    txq.add_chain(&[readable(0x50_000, f.len() as u32)]);
    for _ in 1..105 {
        txq.publish(&mem, 0);
    }
    let start = Instant::now();
    tx_kick.write(1).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 8192];
    for _ in 0..105 {
        assert_eq!(peer.recv(&mut buf).unwrap(), f.len());
    }
    assert_within_5_percent(start.elapsed(), Duration::from_secs(2));
    assert_eq!(net.counters().tx_errors.load(Ordering::Relaxed), 0);
    net.reset();
}

#[test]
fn receive_keeps_to_its_frame_limit_and_drops_nothing() {
    // 50 frames/s with a bucket of 5: 105 frames need 2 s.
    let mem = test_memory();
    let (backend, peer) = backend(0);
    let rx = RateLimit {
        bandwidth: None,
        ops: per_100ms(5),
    };
    let (mut net, rxq, _txq, rx_kick, _) = limited_net(&mem, backend, rx, RateLimit::default());
    rxq.add_chain(&[writable(0x60_000, 2048)]);
    for _ in 1..105 {
        rxq.publish(&mem, 0);
    }
    let incoming = frame(100);
    let start = Instant::now();
    let sender = std::thread::spawn(move || {
        for _ in 0..105 {
            // Blocks while the device holds frames back: the host side waits, nothing drops.
            peer.send(&incoming).unwrap();
        }
        peer
    });
    rx_kick.write(1).unwrap();
    let deadline = start + Duration::from_secs(5);
    while rxq.used(&mem).len() < 105 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let elapsed = start.elapsed();
    let _peer = sender.join().unwrap();
    assert_eq!(rxq.used(&mem), vec![(0, frame(100).len() as u32); 105]);
    assert_within_5_percent(elapsed, Duration::from_secs(2));
    let counters = net.counters();
    assert_eq!(counters.rx_dropped.load(Ordering::Relaxed), 0);
    assert_eq!(counters.rx_frames.load(Ordering::Relaxed), 105);
    net.reset();
}

#[test]
fn a_limited_device_refuses_a_kernel_data_plane() {
    let (backend, _peer) = backend(0);
    let limit = RateLimit {
        bandwidth: per_100ms(1000),
        ops: None,
    };
    let mut net = Net::new(backend, None)
        .unwrap()
        .with_rate_limits(RateLimit::default(), limit);
    assert!(matches!(
        net.set_data_planes(Vec::new()),
        Err(NetError::LimitedDataPlane(_))
    ));
}

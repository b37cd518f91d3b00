//! What the data-plane benchmarks share: a guest driver's request cycle on
//! pvm_virtio::testing's queue and eventfd interrupt, criterion's settings, and per-case timings
//! kept beside criterion's own statistics for the one-line summaries.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};
use pvm_virtio::Interrupt;
use pvm_virtio::testing::{EventInterrupt, TestQueue, WAIT_TIMEOUT};
use vm_memory::GuestMemoryMmap;

/// Criterion samples per case (its minimum).
pub const SAMPLE_SIZE: usize = 10;

/// Criterion's settings for these benchmarks: short, so `cargo bench -p pvm-virtio` stays within
/// a few minutes on two cores. Command-line options (`--measurement-time`, a filter, ...) apply
/// on top; `--sample-size` would make the summaries pick the wrong calls, so leave it.
pub fn criterion() -> Criterion {
    Criterion::default()
        .sample_size(SAMPLE_SIZE)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args()
}

/// Benchmarks `routine` (which runs the operation `iters` times and returns the time taken) as
/// case `id` of `group`, and returns its median time per operation over criterion's measurement
/// samples, or `None` when criterion did not run the case (filtered out, `--list`).
pub fn bench(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: &str,
    mut routine: impl FnMut(u64) -> Duration,
) -> Option<Duration> {
    let calls = RefCell::new(Vec::new());
    group.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let elapsed = routine(iters);
            calls.borrow_mut().push((iters, elapsed));
            elapsed
        })
    });
    // Criterion calls the routine for its warm-up first, then once per sample.
    let calls = calls.into_inner();
    let samples = &calls[calls.len().saturating_sub(SAMPLE_SIZE)..];
    let mut per_op: Vec<Duration> = samples
        .iter()
        .filter(|(iters, _)| *iters > 0)
        .map(|(iters, elapsed)| elapsed.div_f64(*iters as f64))
        .collect();
    per_op.sort();
    per_op.get(per_op.len() / 2).copied()
}

/// `d` as microseconds with three significant decimals, or "n/a".
pub fn micros(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{:.3} us", d.as_secs_f64() * 1e6),
        None => "n/a".to_string(),
    }
}

/// `pvm / limit` as "1.23x", or "n/a".
pub fn ratio(pvm: Option<Duration>, limit: Option<Duration>) -> String {
    match (pvm, limit) {
        (Some(p), Some(l)) if !l.is_zero() => format!("{:.2}x", p.as_secs_f64() / l.as_secs_f64()),
        _ => "n/a".to_string(),
    }
}

/// Bytes per second over `bytes` moved in `d`, as MiB/s, or "n/a".
pub fn mib_per_s(bytes: usize, d: Option<Duration>) -> String {
    match d {
        Some(d) if !d.is_zero() => {
            format!(
                "{:.0} MiB/s",
                bytes as f64 / d.as_secs_f64() / f64::from(1 << 20)
            )
        }
        _ => "n/a".to_string(),
    }
}

/// Makes the chain at `head` available and asks to be interrupted when it is used (used_event
/// = the used index now: a driver with one request in flight). Returns the used index that
/// marks the request's completion.
pub fn submit(queue: &TestQueue, mem: &GuestMemoryMmap, head: u16) -> u16 {
    let used = queue.used_idx();
    queue.set_used_event(mem, used);
    queue.publish(mem, head);
    used.wrapping_add(1)
}

/// Waits for `interrupt` on `index` until `queue`'s used index reaches `want`.
pub fn wait_used(queue: &TestQueue, interrupt: &EventInterrupt, index: u16, want: u16) {
    loop {
        assert!(
            interrupt.wait(index),
            "no interrupt on queue {index} within {:?}: used idx {} (want {want})",
            WAIT_TIMEOUT,
            queue.used_idx()
        );
        if queue.used_idx() == want {
            return;
        }
    }
}

/// The length the device reported for the latest used entry of `queue`.
pub fn last_used_len(queue: &TestQueue) -> u32 {
    queue.used_entry(queue.used_idx().wrapping_sub(1)).1
}

/// The floor under the `pvm-worker` cases: one round trip between the benchmark thread and
/// another thread over two eventfds (kick, then interrupt), each side sleeping in `poll` as the
/// worker sleeps in epoll and the benchmark thread waits for the interrupt, with no device work.
/// Returns its median time per round trip, like [`bench`].
pub fn wake_up_floor(c: &mut Criterion) -> Option<Duration> {
    let kick = EventInterrupt::new(1);
    let reply = EventInterrupt::new(1);
    let stop = Arc::new(AtomicBool::new(false));
    let peer = {
        let (kick, reply, stop) = (kick.clone(), reply.clone(), stop.clone());
        std::thread::spawn(move || {
            loop {
                while !kick.wait(0) {}
                if stop.load(Ordering::Acquire) {
                    return;
                }
                reply.notify_queue(0).expect("reply");
            }
        })
    };
    let mut group = c.benchmark_group("reference");
    let floor = bench(&mut group, "eventfd-round-trip", |iters| {
        let start = Instant::now();
        for _ in 0..iters {
            kick.notify_queue(0).expect("kick");
            assert!(reply.wait(0), "no reply from the peer thread");
        }
        start.elapsed()
    });
    group.finish();
    stop.store(true, Ordering::Release);
    kick.notify_queue(0).expect("stop the peer");
    peer.join().expect("peer thread");
    floor
}

/// The first lines of a bench's summary: what the figures are and the wake-up floor under them.
pub fn print_summary_header(unit: &str, floor: Option<Duration>) {
    println!("summary (median per {unit}; ratio = pvm / limit):");
    println!(
        "summary reference: eventfd round trip between two threads (kick + interrupt, no device \
         work) {}: the floor under every pvm worker figure",
        micros(floor)
    );
}

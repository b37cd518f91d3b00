//! What the data-plane benchmarks share: the driver's side of a split virtqueue in guest memory,
//! an [`Interrupt`] that wakes the benchmark thread, criterion's settings, and per-case timings
//! kept beside criterion's own statistics for the one-line summaries.

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};
use pvm_virtio::{ActiveQueue, Interrupt};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Criterion samples per case (its minimum).
pub const SAMPLE_SIZE: usize = 10;
/// How long a completion may take before the benchmark gives up instead of hanging.
const COMPLETION_TIMEOUT_MS: libc::c_int = 10_000;

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

/// An [`Interrupt`] that writes one (blocking) eventfd per queue, as an irqfd would.
#[derive(Debug)]
pub struct EventInterrupt {
    queues: Vec<EventFd>,
}

impl EventInterrupt {
    pub fn new(queues: usize) -> Arc<Self> {
        let queues = (0..queues)
            .map(|_| EventFd::new(0).expect("interrupt eventfd"))
            .collect();
        Arc::new(EventInterrupt { queues })
    }

    /// Waits until `queue`'s interrupt fired and consumes it; false after
    /// [`COMPLETION_TIMEOUT_MS`] without one.
    pub fn wait(&self, queue: u16) -> bool {
        let fd = &self.queues[usize::from(queue)];
        let mut pollfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: poll reads and writes the one pollfd we own, for the duration of the call.
            let ready = unsafe { libc::poll(&mut pollfd, 1, COMPLETION_TIMEOUT_MS) };
            match ready {
                1 => break,
                0 => return false,
                _ => {
                    let err = std::io::Error::last_os_error();
                    assert_eq!(err.kind(), std::io::ErrorKind::Interrupted, "poll: {err}");
                }
            }
        }
        fd.read().expect("read the interrupt eventfd");
        true
    }
}

impl Interrupt for EventInterrupt {
    fn notify_queue(&self, queue: u16) -> std::io::Result<()> {
        match self.queues.get(usize::from(queue)) {
            Some(fd) => fd.write(1),
            None => Ok(()),
        }
    }

    fn notify_config(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One guest buffer of a chain: guest address, length, whether the device writes it.
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    pub device_writes: bool,
}

/// The driver's side of one split virtqueue, as a guest driver keeps it: it lays out one chain
/// (descriptors 0..n) and makes it available again and again, asking for an interrupt on each
/// completion (EVENT_IDX's used_event; without EVENT_IDX the device interrupts anyway).
///
/// The rings are laid out here rather than with virtio-queue's `MockSplitQueue`: its 0.18
/// `create` puts the used ring `len` bytes (not `2 * len`) after the available ring's entries,
/// so with more than a few entries in flight, or with used_event, the two rings overlap.
pub struct Driver<'m> {
    mem: &'m GuestMemoryMmap,
    size: u16,
    desc_table: GuestAddress,
    avail_ring: GuestAddress,
    used_ring: GuestAddress,
    avail_idx: u16,
}

impl<'m> Driver<'m> {
    /// A queue of `size` entries whose rings start at `base` (16-byte aligned), zeroed.
    pub fn new(mem: &'m GuestMemoryMmap, base: GuestAddress, size: u16) -> Self {
        let n = u64::from(size);
        let avail_ring = base.unchecked_add(16 * n);
        // flags, idx, ring[size], used_event; the used ring is 4-byte aligned.
        let used_ring = GuestAddress((avail_ring.0 + 4 + 2 * n + 2).next_multiple_of(4));
        // flags, idx, ring[size] of (id, len), avail_event.
        let end = used_ring.unchecked_add(4 + 8 * n + 2);
        let zeros = vec![0u8; (end.0 - base.0) as usize];
        mem.write_slice(&zeros, base).expect("queue memory");
        Driver {
            mem,
            size,
            desc_table: base,
            avail_ring,
            used_ring,
            avail_idx: 0,
        }
    }

    /// The queue as a transport hands it to `activate`, and the kick eventfd's other end.
    pub fn active_queue(&self, index: u16) -> (ActiveQueue, EventFd) {
        let kick = EventFd::new(EFD_NONBLOCK).expect("kick eventfd");
        let ours = kick.try_clone().expect("clone the kick eventfd");
        let active = ActiveQueue {
            index,
            queue: self.queue(),
            kick,
        };
        (active, ours)
    }

    /// The device's view of the queue, as the driver configured it.
    pub fn queue(&self) -> Queue {
        let mut queue = Queue::new(self.size).expect("queue");
        queue.set_size(self.size);
        let split = |addr: GuestAddress| (Some(addr.0 as u32), Some((addr.0 >> 32) as u32));
        let (low, high) = split(self.desc_table);
        queue.set_desc_table_address(low, high);
        let (low, high) = split(self.avail_ring);
        queue.set_avail_ring_address(low, high);
        let (low, high) = split(self.used_ring);
        queue.set_used_ring_address(low, high);
        queue.set_ready(true);
        assert!(queue.is_valid(self.mem), "queue layout");
        queue
    }

    /// Writes `buffers` as one chain at descriptors 0..n (head 0).
    pub fn set_chain(&self, buffers: &[Buffer]) {
        for (i, buffer) in buffers.iter().enumerate() {
            let last = i + 1 == buffers.len();
            let mut flags = 0;
            if buffer.device_writes {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let next = if last { 0 } else { i as u16 + 1 };
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&buffer.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&buffer.len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem
                .write_slice(&raw, self.desc_table.unchecked_add(16 * i as u64))
                .expect("store a descriptor");
        }
    }

    /// Makes the chain at `head` available and asks to be interrupted when it is used. Returns
    /// the used index that marks its completion.
    pub fn publish(&mut self, head: u16) -> u16 {
        let slot = self
            .avail_ring
            .unchecked_add(4 + 2 * u64::from(self.avail_idx % self.size));
        self.mem.write_obj(head.to_le(), slot).expect("avail ring");
        // used_event: interrupt once the used index moves past where it is now.
        let used = self.used_idx();
        self.mem
            .write_obj(used.to_le(), self.used_event_addr())
            .expect("used_event");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .store(
                self.avail_idx.to_le(),
                self.avail_ring.unchecked_add(2),
                Ordering::Release,
            )
            .expect("avail idx");
        used.wrapping_add(1)
    }

    fn used_event_addr(&self) -> GuestAddress {
        self.avail_ring.unchecked_add(4 + 2 * u64::from(self.size))
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        let idx: u16 = self
            .mem
            .load(self.used_ring.unchecked_add(2), Ordering::Acquire)
            .expect("used idx");
        u16::from_le(idx)
    }

    /// The length the device reported for the latest used entry.
    pub fn last_used_len(&self) -> u32 {
        let idx = self.used_idx().wrapping_sub(1);
        let elem = self
            .used_ring
            .unchecked_add(4 + 8 * u64::from(idx % self.size));
        let len: u32 = self
            .mem
            .read_obj(elem.unchecked_add(4))
            .expect("used element");
        u32::from_le(len)
    }

    /// Waits for `interrupt` on `queue` until the used index reaches `want`.
    pub fn wait_used(&self, interrupt: &EventInterrupt, queue: u16, want: u16) {
        loop {
            if !interrupt.wait(queue) {
                let used_event: u16 = self.mem.read_obj(self.used_event_addr()).unwrap_or(0);
                panic!(
                    "no interrupt on queue {queue} within {COMPLETION_TIMEOUT_MS} ms: avail idx {}, \
                     used idx {} (want {want}), used_event {used_event}",
                    self.avail_idx,
                    self.used_idx()
                );
            }
            if self.used_idx() == want {
                return;
            }
        }
    }
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

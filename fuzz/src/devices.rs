//! The virtio devices' request paths, driven the way a transport drives them: the queues are laid
//! out in guest memory from the fuzz input ([`crate::queue`]), the device is activated with them
//! and then reset. A device serves everything already available when its worker starts, before
//! it looks at any event, and reset joins the worker, so one iteration is deterministic and needs
//! no waiting. Then the invariants are checked: no panic anywhere (a worker panic is caught by
//! the join and re-raised here), used entries only for published chains and in order, and the
//! device-specific accounting below.
//!
//! Input of every device target:
//!
//! ```text
//! u8   feature bits: 0 EVENT_IDX, 1 INDIRECT_DESC, 2.. device-specific (see each target)
//! u8   queue size selector (a power of two up to the device's maximum)
//! u16  start: the ring position where the device begins (exercises u16 wrap-around)
//! ...  device-specific prefix (block: serial; net rx: frames; console: host input)
//! ...  each queue (see crate::queue), in index order
//! ...  payload at DATA_BASE
//! ```

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pvm_virtio::block::{BlockOptions, IoEngine};
use pvm_virtio::testing::{RecordingInterrupt, TestQueue};
use pvm_virtio::{
    Activation, Balloon, BalloonConfig, Block, Console, Net, NetBackend, Rng, VirtioDevice,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::input::Input;
use crate::queue::{DriverQueue, MAX_QUEUES, ScratchFile, guest_memory, queue_size, write_payload};

/// Where queues past [`MAX_QUEUES`] keep their (empty) rings: the top page of the high region.
const IDLE_RINGS: GuestAddress = GuestAddress(crate::queue::HIGH_RAM.0 + 0x3_f000);

/// Feature bits of the first input byte.
pub const F_EVENT_IDX: u8 = 1 << 0;
pub const F_INDIRECT: u8 = 1 << 1;
/// block: open the image read-only. net: offer MRG_RXBUF. console: the host output fails.
pub const F_DEVICE_A: u8 = 1 << 2;
/// net: the backend supports guest offloads (GUEST_CSUM, TSO...). block: the io_uring engine.
/// balloon: offer free page hinting.
pub const F_DEVICE_B: u8 = 1 << 3;

/// The block image: 64 KiB, 128 sectors.
pub const DISK_BYTES: usize = 64 * 1024;
/// Frames the net rx target queues on the backend; a unix datagram socket pair holds at most
/// ~10 undelivered datagrams, and staying well below the device's per-pass budget keeps the
/// worker's first pass complete.
pub const MAX_RX_FRAMES: u8 = 8;

pub(crate) struct Common<'a> {
    pub(crate) input: Input<'a>,
    pub(crate) features: u8,
    size_selector: u8,
    start: u16,
    /// What the driver accepted (see [`negotiate`]), handed over at activation.
    pub(crate) acked: u64,
}

pub(crate) fn common(data: &[u8]) -> Common<'_> {
    let mut input = Input::new(data);
    let features = input.u8();
    let size_selector = input.u8();
    let start = input.u16();
    Common {
        input,
        features,
        size_selector,
        start,
        acked: 0,
    }
}

fn feature(bit: u32) -> u64 {
    1 << bit
}

/// What the driver accepts: VERSION_1 and the ring features the input asks for, plus `extra`,
/// limited to what the device offers (as the transport enforces).
pub(crate) fn negotiate(device: &dyn VirtioDevice, features: u8, extra: u64) -> u64 {
    let mut acked = feature(VIRTIO_F_VERSION_1) | extra;
    if features & F_EVENT_IDX != 0 {
        acked |= feature(VIRTIO_RING_F_EVENT_IDX);
    }
    if features & F_INDIRECT != 0 {
        acked |= feature(VIRTIO_RING_F_INDIRECT_DESC);
    }
    acked & device.features()
}

/// Lays out the device's queues, activates it, lets its worker serve them and resets it.
/// Returns the queues and the interrupt for the checks. Queues past [`MAX_QUEUES`] (vsock's
/// event queue) get empty rings the input does not reach, in [`IDLE_RINGS`].
pub(crate) fn run(
    device: &mut dyn VirtioDevice,
    mem: &GuestMemoryMmap,
    c: &mut Common<'_>,
) -> (Vec<DriverQueue>, Arc<RecordingInterrupt>) {
    let max_sizes = device.queue_max_sizes().to_vec();
    let queues: Vec<DriverQueue> = (0u16..)
        .zip(max_sizes.iter().take(MAX_QUEUES as usize))
        .map(|(index, &max)| {
            let size = queue_size(c.size_selector, max);
            DriverQueue::layout(mem, &mut c.input, index, size, max, c.start)
        })
        .collect();
    write_payload(mem, c.input.rest());
    let mut active: Vec<_> = queues.iter().map(DriverQueue::active).collect();
    for index in queues.len()..max_sizes.len() {
        let idle = TestQueue::at(mem, IDLE_RINGS, 16);
        active.push(idle.active_queue(index as u16));
    }
    // A notification for a queue the device was never given panics.
    let interrupt = Arc::new(RecordingInterrupt::for_queues(MAX_QUEUES as u16));
    device
        .activate(Activation {
            memory: mem.clone(),
            interrupt: interrupt.clone(),
            queues: active,
            features: c.acked,
        })
        .expect("activation with the queues the device asked for");
    // Joins the worker; its first pass has served every chain that was available.
    device.reset();
    // A second reset must be harmless.
    device.reset();
    if trace() {
        for q in &queues {
            eprintln!(
                "queue {} (size {}, start {}, {} published, rings untouchable: {}): used {:?}, {} interrupts",
                q.index,
                q.size,
                q.start,
                q.avail_delta,
                q.rings_untouchable(),
                q.used(mem),
                interrupt.count(q.index)
            );
        }
    }
    (queues, interrupt)
}

/// PVM_FUZZ_TRACE set: the device targets print what the device did with each queue (for
/// looking at a seed or a crash with `cargo fuzz run <target> <file>`).
pub fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("PVM_FUZZ_TRACE").is_some())
}

/// The rings still hold only what the driver and the device's used-ring updates wrote.
pub(crate) fn rings_intact(queues: &[DriverQueue]) -> bool {
    queues.iter().all(DriverQueue::rings_untouchable)
}

/// Bit 2: read-only image. After the common header: u8 serial length (0-23; over 20 must be
/// refused), the serial bytes.
pub fn block(data: &[u8]) {
    let mut c = common(data);
    let read_only = c.features & F_DEVICE_A != 0;
    let serial_len = usize::from(c.input.u8() % 24);
    let serial = String::from_utf8_lossy(c.input.bytes(serial_len)).into_owned();
    let (image, _file) = ScratchFile::new("disk", &[0xa5; DISK_BYTES]);
    let options = BlockOptions {
        engine: if c.features & F_DEVICE_B != 0 {
            IoEngine::IoUring
        } else {
            IoEngine::Sync
        },
        ..BlockOptions::default()
    };
    let mut device = match Block::with_options(&image.path, read_only, Some(&serial), options) {
        Ok(device) => device,
        Err(e) => {
            assert!(serial.len() > 20, "Block::new failed: {e}");
            return;
        }
    };
    assert!(
        serial.len() <= 20,
        "a {}-byte serial was accepted",
        serial.len()
    );
    assert_eq!(device.capacity_sectors(), (DISK_BYTES / 512) as u64);
    c.acked = negotiate(&device, c.features, 0);
    let mem = guest_memory();
    let (queues, interrupt) = run(&mut device, &mem, &mut c);
    if rings_intact(&queues) {
        match options.engine {
            IoEngine::Sync => queues[0].check(&mem, interrupt.count(0)),
            IoEngine::IoUring => queues[0].check_any_order(&mem, interrupt.count(0)),
        };
    }
    drop(device);
    // The image's lock is released with the device: the same disk opens again.
    Block::new(&image.path, read_only, None).expect("reopen after the device was dropped");
}

/// A datagram socket standing in for the tap, as virtio's own net tests do.
#[derive(Debug)]
pub struct SocketBackend {
    socket: UnixDatagram,
    supported: u32,
    offloads: Mutex<u32>,
}

impl AsRawFd for SocketBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl NetBackend for SocketBackend {
    fn name(&self) -> &str {
        "fuzz"
    }

    fn supported_offloads(&self) -> u32 {
        self.supported
    }

    fn set_offloads(&self, offloads: u32) -> io::Result<()> {
        assert_eq!(
            offloads & !self.supported,
            0,
            "offloads {offloads:#x} enabled, the backend supports {:#x}",
            self.supported
        );
        *self.offloads.lock().unwrap() = offloads;
        Ok(())
    }
}

/// A backend on `socket` without offloads.
pub fn test_backend(socket: UnixDatagram) -> SocketBackend {
    SocketBackend {
        socket,
        supported: 0,
        offloads: Mutex::new(0),
    }
}

/// The device, its backend, the backend's peer and the features the driver accepts.
fn net_device(features: u8) -> (Net, Arc<SocketBackend>, UnixDatagram, u64) {
    let (ours, peer) = UnixDatagram::pair().expect("socketpair");
    ours.set_nonblocking(true).unwrap();
    peer.set_nonblocking(true).unwrap();
    let supported = if features & F_DEVICE_B != 0 {
        pvm_virtio::net::tap::GUEST_OFFLOADS
    } else {
        0
    };
    let backend = Arc::new(SocketBackend {
        socket: ours,
        supported,
        offloads: Mutex::new(0),
    });
    let net = Net::new(backend.clone(), Some([0x02, 0, 0, 0, 0, 1])).expect("net device");
    let mut extra = 0;
    if features & F_DEVICE_A != 0 {
        extra |= feature(VIRTIO_NET_F_MRG_RXBUF);
    }
    if features & F_DEVICE_B != 0 {
        // Every guest offload the device offers for this backend.
        extra |= net.features() & !feature(VIRTIO_NET_F_MRG_RXBUF);
    }
    let acked = negotiate(&net, features, extra);
    (net, backend, peer, acked)
}

/// Frames on the host side of the net backend, before the device starts: u8 count (at most
/// [`MAX_RX_FRAMES`]), then per frame u16 length and the bytes (vnet header + Ethernet frame).
fn send_frames(peer: &UnixDatagram, input: &mut Input<'_>) -> Vec<usize> {
    let count = input.u8() % (MAX_RX_FRAMES + 1);
    let mut sent = Vec::new();
    for _ in 0..count {
        let len = usize::from(input.u16());
        let frame = input.bytes(len);
        if peer.send(frame).is_ok() {
            sent.push(frame.len());
        }
    }
    sent
}

/// Bit 2: MRG_RXBUF. Bit 3: the backend offers guest offloads. Queue 0 is receiveq (left
/// empty here unless the input fills it), queue 1 transmitq.
pub fn net_tx(data: &[u8]) {
    let mut c = common(data);
    let (mut net, backend, peer, acked) = net_device(c.features);
    c.acked = acked;
    let counters = net.counters();
    let mem = guest_memory();
    let (queues, interrupt) = run(&mut net, &mem, &mut c);
    assert_eq!(
        *backend.offloads.lock().unwrap(),
        0,
        "reset clears offloads"
    );
    let get = |c: &AtomicU64| c.load(Ordering::SeqCst);
    // Every frame the device counted as sent reached the backend as one datagram of at least
    // a vnet header.
    let mut buf = vec![0u8; 70_000];
    let mut delivered = 0;
    while let Ok(n) = peer.recv(&mut buf) {
        assert!(n >= 12, "a {n}-byte frame reached the backend");
        delivered += 1;
    }
    if trace() {
        eprintln!("{delivered} frames at the peer: {}", counters.summary());
    }
    assert_eq!(
        delivered,
        get(&counters.tx_frames),
        "{}",
        counters.summary()
    );
    if rings_intact(&queues) {
        queues[0].check(&mem, interrupt.count(0));
        let used = queues[1].check(&mem, interrupt.count(1));
        assert!(used.iter().all(|&(_, len)| len == 0), "tx used length");
        // Each transmit chain is sent, refused by the backend or dropped as malformed, and
        // returned unless its head was invalid (which stops the queue).
        let accounted =
            get(&counters.tx_frames) + get(&counters.tx_errors) + get(&counters.tx_malformed);
        let consumable = u64::from(queues[1].consumable());
        assert!(
            used.len() as u64 <= accounted && accounted <= consumable,
            "{} used, {consumable} available: {}",
            used.len(),
            counters.summary()
        );
        if queues[1].heads_valid() {
            assert_eq!(accounted, used.len() as u64, "{}", counters.summary());
        }
    }
}

/// Like [`net_tx`], with frames waiting on the backend (see [`send_frames`]) before the queues.
pub fn net_rx(data: &[u8]) {
    let mut c = common(data);
    let (mut net, _backend, peer, acked) = net_device(c.features);
    c.acked = acked;
    let sent = send_frames(&peer, &mut c.input);
    let counters = net.counters();
    let mem = guest_memory();
    let (queues, interrupt) = run(&mut net, &mem, &mut c);
    let get = |c: &AtomicU64| c.load(Ordering::SeqCst);
    if trace() {
        eprintln!("sent {sent:?}: {}", counters.summary());
    }
    let (frames, dropped) = (get(&counters.rx_frames), get(&counters.rx_dropped));
    assert!(
        frames + dropped <= sent.len() as u64,
        "{} frames sent: {}",
        sent.len(),
        counters.summary()
    );
    if rings_intact(&queues) {
        let used = queues[0].check(&mem, interrupt.count(0));
        queues[1].check(&mem, interrupt.count(1));
        if dropped == 0 && queues[0].heads_valid() {
            // Every byte put in receive buffers belongs to a delivered frame (header included).
            let written: u64 = used.iter().map(|&(_, len)| u64::from(len)).sum();
            assert_eq!(
                written,
                get(&counters.rx_bytes) + 12 * frames,
                "{}",
                counters.summary()
            );
        }
    }
}

/// Host output of the console: counts bytes, or fails every write.
struct Output {
    bytes: Arc<AtomicU64>,
    fail: bool,
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.fail {
            return Err(io::Error::other("host output closed"));
        }
        self.bytes.fetch_add(buf.len() as u64, Ordering::SeqCst);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Bit 2: the host output fails. After the common header: u16 length and the host input bytes
/// (keyboard) pushed before the device starts. Queue 0 receiveq, queue 1 transmitq.
pub fn console(data: &[u8]) {
    let mut c = common(data);
    let written = Arc::new(AtomicU64::new(0));
    let output = Output {
        bytes: written.clone(),
        fail: c.features & F_DEVICE_A != 0,
    };
    let mut console = Console::new(Box::new(output)).expect("console");
    c.acked = negotiate(&console, c.features, 0);
    let input_len = usize::from(c.input.u16());
    let host_input = c.input.bytes(input_len);
    let handle = console.input();
    let pushed = handle.push(host_input);
    assert_eq!(pushed, host_input.len(), "the input buffer is empty");
    let mem = guest_memory();
    let (queues, interrupt) = run(&mut console, &mem, &mut c);
    if rings_intact(&queues) {
        let used = queues[0].check(&mem, interrupt.count(0));
        queues[1].check(&mem, interrupt.count(1));
        // Host input is delivered or still pending, never duplicated; and never lost unless a
        // chain could not be returned (an invalid head stops the queue).
        let delivered: usize = used.iter().map(|&(_, len)| len as usize).sum();
        assert!(delivered + handle.pending() <= pushed);
        if queues[0].heads_valid() {
            assert_eq!(delivered + handle.pending(), pushed);
        }
    }
    if c.features & F_DEVICE_A != 0 {
        assert_eq!(written.load(Ordering::SeqCst), 0);
    }
}

/// No device-specific fields.
pub fn rng(data: &[u8]) {
    let mut c = common(data);
    let mut rng = Rng::new();
    c.acked = negotiate(&rng, c.features, 0);
    let mem = guest_memory();
    let (queues, interrupt) = run(&mut rng, &mem, &mut c);
    if rings_intact(&queues) {
        let used = queues[0].check(&mem, interrupt.count(0));
        let max = pvm_virtio::rng::MAX_BYTES_PER_REQUEST as u32;
        assert!(used.iter().all(|&(_, len)| len <= max), "rng used length");
    }
}

/// Bit 2: offer deflate-on-OOM (no queue of its own). Bit 3: offer free page hinting, its
/// queue third, with a run (command id 2) started before the driver loads, so hinted ranges
/// under id 2 reach the range checks. The inflate and deflate queues carry page numbers: guest
/// RAM here is 128 pages, so most numbers are out of range, and in-range ones may name the
/// rings themselves (whose pages then read as zeros: the guest's problem, never a panic).
pub fn balloon(data: &[u8]) {
    let mut c = common(data);
    let hinting = c.features & F_DEVICE_B != 0;
    let mut balloon = Balloon::new(BalloonConfig {
        amount_mib: 1,
        deflate_on_oom: c.features & F_DEVICE_A != 0,
        free_page_hinting: hinting,
        ..Default::default()
    })
    .expect("balloon");
    c.acked = negotiate(&balloon, c.features, (1 << 2) | (1 << 3));
    let handle = balloon.handle();
    if hinting {
        handle.start_hinting(true).expect("hinting is on");
    }
    let mem = guest_memory();
    let (queues, interrupt) = run(&mut balloon, &mem, &mut c);
    if rings_intact(&queues) {
        for q in &queues {
            let used = q.check(&mem, interrupt.count(q.index));
            assert!(used.iter().all(|&(_, len)| len == 0), "balloon used length");
        }
    }
    let counters = handle.counters();
    let (inflated, deflated) = (
        counters.inflated_pages.load(Ordering::Relaxed),
        counters.deflated_pages.load(Ordering::Relaxed),
    );
    let ram_pages = ((crate::queue::LOW_RAM.1 + crate::queue::HIGH_RAM.1) / 4096) as u64;
    assert!(
        deflated <= inflated,
        "deflated {deflated} of {inflated} inflated pages"
    );
    assert!(
        inflated - deflated <= ram_pages,
        "the balloon holds more pages than RAM"
    );
}

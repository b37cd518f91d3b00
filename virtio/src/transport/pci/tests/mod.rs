use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use super::config::{
    BAR0, COMMON_CAP, MSIX_CAP, VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG, VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_CAP_PCI_CFG,
};
use super::msix::{ISR_CONFIG, ISR_QUEUE};
use super::*;
use crate::snapshot::{RestoreError, SnapshotError};
use crate::testing::TestQueue;
use crate::testing::{
    FAKE_DEVICE_TYPE, FAKE_FEATURES, FakeDevice, Lcg, SharedLog, expected_queue, ring_addresses,
    test_memory,
};
use crate::transport::pause_scenarios::{
    DriverPort, SavedPort, addresses, block_pauses_mid_traffic, net_pauses_mid_traffic,
};
use crate::transport::{
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
};

const BAR_ADDRESS: u64 = 0xc001_0000;
const DRIVER_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX);

// virtio_pci_common_cfg offsets, from the spec rather than from the code under test.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// Records what the transport asked of the VMM's MSI routing; fails on demand.
#[derive(Debug, Default)]
struct RecordingSink {
    updates: Mutex<Vec<(u16, Option<MsiMessage>)>>,
    failing: AtomicBool,
}

impl MsiSink for RecordingSink {
    fn update_vector(&self, vector: u16, message: Option<MsiMessage>) -> io::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(io::Error::other("no GSI left"));
        }
        self.updates.lock().unwrap().push((vector, message));
        Ok(())
    }
}

impl RecordingSink {
    fn take(&self) -> Vec<(u16, Option<MsiMessage>)> {
        std::mem::take(&mut self.updates.lock().unwrap())
    }
}

struct Fixture {
    transport: PciTransport,
    log: SharedLog,
    sink: Arc<RecordingSink>,
}

fn fixture(max_sizes: &[u16], vectors: u16) -> Fixture {
    let (device, log) = FakeDevice::new(max_sizes);
    let sink = Arc::new(RecordingSink::default());
    let transport = PciTransport::new(
        Box::new(device),
        test_memory(),
        BAR_ADDRESS,
        vectors,
        sink.clone(),
    )
    .unwrap();
    Fixture {
        transport,
        log,
        sink,
    }
}

impl Fixture {
    fn cfg(&mut self, offset: usize, len: usize) -> u32 {
        let mut data = [0u8; 4];
        self.transport.config_read(offset as u64, &mut data[..len]);
        u32::from_le_bytes(data)
    }

    fn set_cfg(&mut self, offset: usize, len: usize, value: u32) {
        self.transport
            .config_write(offset as u64, &value.to_le_bytes()[..len]);
    }

    fn bar(&mut self, offset: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        self.transport.bar_read(offset, &mut data[..len]);
        u64::from_le_bytes(data)
    }

    fn set_bar(&mut self, offset: u64, len: usize, value: u64) {
        self.transport
            .bar_write(offset, &value.to_le_bytes()[..len]);
    }

    fn add_status(&mut self, bits: u8) {
        let status = self.bar(DEVICE_STATUS, 1);
        self.set_bar(DEVICE_STATUS, 1, status | u64::from(bits));
    }

    fn negotiate(&mut self, features: u64) -> bool {
        self.add_status(STATUS_ACKNOWLEDGE);
        self.add_status(STATUS_DRIVER);
        for half in 0..2 {
            self.set_bar(DRIVER_FEATURE_SELECT, 4, half);
            self.set_bar(DRIVER_FEATURE, 4, (features >> (32 * half)) & 0xffff_ffff);
        }
        self.add_status(STATUS_FEATURES_OK);
        self.bar(DEVICE_STATUS, 1) as u8 & STATUS_FEATURES_OK != 0
    }

    /// Programs queue `index` the way Linux does: 32-bit halves for desc, one 64-bit write for
    /// the others (both forms must work).
    fn configure_queue(&mut self, index: u16, size: u16, vector: u16) {
        let (desc, avail, used) = ring_addresses(index);
        self.configure_queue_at(index, size, [desc, avail, used], vector);
    }

    /// Programs queue `index` with `size` entries at the `[desc, avail, used]` addresses.
    fn configure_queue_at(&mut self, index: u16, size: u16, rings: [u64; 3], vector: u16) {
        let [desc, avail, used] = rings;
        self.set_bar(QUEUE_SELECT, 2, index.into());
        self.set_bar(QUEUE_SIZE, 2, size.into());
        self.set_bar(QUEUE_MSIX_VECTOR, 2, vector.into());
        self.set_bar(QUEUE_DESC, 4, desc & 0xffff_ffff);
        self.set_bar(QUEUE_DESC + 4, 4, desc >> 32);
        self.set_bar(QUEUE_DRIVER, 8, avail);
        self.set_bar(QUEUE_DEVICE, 8, used);
        self.set_bar(QUEUE_ENABLE, 2, 1);
    }

    fn bring_up(&mut self, sizes: &[u16]) {
        assert!(self.negotiate(DRIVER_FEATURES));
        self.set_bar(CONFIG_MSIX_VECTOR, 2, 0);
        for (index, &size) in (0u16..).zip(sizes) {
            self.configure_queue(index, size, index + 1);
        }
        self.add_status(STATUS_DRIVER_OK);
    }

    /// Enables MSI-X and programs + unmasks `vector` with a recognisable message.
    fn program_vector(&mut self, vector: u16) -> MsiMessage {
        let message = MsiMessage {
            address: 0xfee0_0000 | u64::from(vector) << 12,
            data: 0x40 + u32::from(vector),
        };
        let entry = MSIX_TABLE_OFFSET + u64::from(vector) * 16;
        self.set_bar(entry, 8, message.address);
        self.set_bar(entry + 8, 4, message.data.into());
        self.set_bar(entry + 12, 4, 0);
        message
    }

    fn enable_msix(&mut self, function_mask: bool) {
        let mask = if function_mask {
            MSIX_CONTROL_FUNCTION_MASK
        } else {
            0
        };
        self.set_cfg(MSIX_CONTROL, 2, (MSIX_CONTROL_ENABLE | mask).into());
    }

    fn pba(&mut self) -> u64 {
        self.bar(MSIX_PBA_OFFSET, 8)
    }

    fn interrupt(&self) -> Arc<dyn Interrupt> {
        self.log.get().interrupt.clone().unwrap()
    }
}

impl DriverPort for Fixture {
    fn bring_up(&mut self, features: u64, queues: &[&TestQueue]) {
        assert!(self.negotiate(features));
        self.set_bar(CONFIG_MSIX_VECTOR, 2, 0);
        for (index, queue) in (0u16..).zip(queues) {
            self.configure_queue_at(index, queue.size(), addresses(queue), index + 1);
        }
        self.add_status(STATUS_DRIVER_OK);
        assert_eq!(self.transport.device_status() & STATUS_NEEDS_RESET, 0);
    }

    fn notify(&mut self, queue: u16) {
        // The notify region: one 4-byte slot per queue (queue_notify_off * multiplier).
        self.set_bar(0x3000 + 4 * u64::from(queue), 2, queue.into());
    }

    fn status(&mut self) -> u8 {
        self.transport.device_status()
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        self.transport.pause()
    }

    fn resume(&mut self) -> Result<(), PauseError> {
        self.transport.resume()
    }

    fn save(&self) -> Result<SavedPort, SnapshotError> {
        self.transport.save_state().map(SavedPort::Pci)
    }

    fn restore(&mut self, state: &SavedPort) -> Result<(), RestoreError> {
        let SavedPort::Pci(state) = state else {
            panic!("a virtio-mmio state for virtio-pci");
        };
        self.transport.restore_state(state)
    }
}

pub(crate) fn pci_port(
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
) -> Box<dyn DriverPort> {
    let queues = device.queue_max_sizes().len() as u16;
    let sink = Arc::new(RecordingSink::default());
    let transport =
        PciTransport::new(device, memory, BAR_ADDRESS, queues + 1, sink.clone()).unwrap();
    // The log of a device nobody drives: these fixtures run real devices.
    let (_, log) = FakeDevice::new(&[]);
    Box::new(Fixture {
        transport,
        log,
        sink,
    })
}

#[test]
fn a_block_device_pauses_mid_traffic_behind_pci() {
    block_pauses_mid_traffic(pci_port);
}

#[test]
fn a_net_device_pauses_mid_traffic_behind_pci() {
    net_pauses_mid_traffic(pci_port);
}

fn fired(transport: &PciTransport, vector: usize) -> bool {
    transport.vector_irqfds()[vector].read().is_ok()
}

mod msix_delivery;
mod snapshot;

#[test]
fn header_identifies_a_modern_virtio_device() {
    let mut f = fixture(&[16], 2);
    assert_eq!(f.cfg(0x00, 2), 0x1af4);
    assert_eq!(f.cfg(0x02, 2), 0x1040 + FAKE_DEVICE_TYPE);
    assert_eq!(f.cfg(0x08, 1), 1, "revision 1: modern only");
    assert_eq!(f.cfg(0x0e, 1), 0, "type-0 header");
    assert_eq!(f.cfg(0x2c, 2), 0x1af4);
    assert!(f.cfg(0x2e, 2) >= 0x40);
    assert_ne!(f.cfg(0x06, 2) & 0x10, 0, "capability list bit");
    assert_eq!(f.cfg(0x3d, 1), 0, "no INTx pin");
    assert_eq!(
        f.cfg(0x0b, 1),
        0xff,
        "an entropy device has no better class"
    );
    // Read-only fields stay put; the command register takes its writable bits only.
    f.set_cfg(0x00, 4, 0);
    assert_eq!(f.cfg(0x00, 2), 0x1af4);
    f.set_cfg(0x04, 2, 0xffff);
    assert_eq!(f.cfg(0x04, 2), 0x0547);
    // Past the conventional space, bad sizes and dword-crossing accesses read zero.
    assert_eq!(f.cfg(0x100, 4), 0);
    assert_eq!(f.cfg(0x0ffc, 4), 0);
    assert_eq!(f.cfg(0x03, 2), 0);
    assert_eq!(f.cfg(0x00, 3), 0);
}

#[test]
fn bar_sizing_reads_back_the_size_mask_and_restores() {
    let mut f = fixture(&[16], 2);
    assert_eq!(f.transport.bar_size(), 0x1_0000);
    assert_eq!(f.cfg(BAR0, 4), BAR_ADDRESS as u32);
    f.set_cfg(BAR0, 4, 0xffff_ffff);
    assert_eq!(
        f.cfg(BAR0, 4),
        !(0x1_0000u32 - 1),
        "size mask, 32-bit non-prefetchable memory"
    );
    f.set_cfg(BAR0, 4, BAR_ADDRESS as u32);
    assert_eq!(f.transport.bar_address(), BAR_ADDRESS);
    // BAR1..5 and the expansion ROM are not implemented: sizing reads back zero.
    for bar in [0x14, 0x18, 0x1c, 0x20, 0x24, 0x30] {
        f.set_cfg(bar, 4, 0xffff_ffff);
        assert_eq!(f.cfg(bar, 4), 0, "{bar:#x}");
    }
    let bad = |address| {
        let (device, _) = FakeDevice::new(&[16]);
        PciTransport::new(
            Box::new(device),
            test_memory(),
            address,
            2,
            Arc::new(RecordingSink::default()),
        )
        .is_err()
    };
    assert!(bad(BAR_ADDRESS + 0x1000), "misaligned");
    assert!(bad(0xffff_0000 + BAR_SIZE), "above 4 GiB");
}

#[test]
fn capability_list_walk_finds_every_capability() {
    let mut f = fixture(&[16, 16, 16], 4);
    let mut virtio_caps = Vec::new();
    let mut msix = None;
    let mut at = f.cfg(0x34, 1) as usize;
    for _ in 0..48 {
        if at == 0 {
            break;
        }
        assert_eq!(at % 4, 0, "capabilities are dword aligned");
        let (id, next) = (f.cfg(at, 1), f.cfg(at + 1, 1) as usize);
        match id {
            0x09 => {
                let cap = (
                    f.cfg(at + 3, 1) as u8,
                    f.cfg(at + 4, 1),
                    f.cfg(at + 8, 4),
                    f.cfg(at + 12, 4),
                );
                virtio_caps.push((cap, at, f.cfg(at + 2, 1)));
            }
            0x11 => msix = Some(at),
            other => panic!("unexpected capability {other:#x}"),
        }
        at = next;
    }
    assert_eq!(at, 0, "the list terminates");
    let find = |cfg_type: u8| {
        virtio_caps
            .iter()
            .find(|((t, ..), ..)| *t == cfg_type)
            .copied()
            .unwrap()
    };
    let ((_, bar, offset, length), _, cap_len) = find(VIRTIO_PCI_CAP_COMMON_CFG);
    assert_eq!((bar, offset, length, cap_len), (0, 0, 0x3c, 16));
    let ((_, bar, offset, length), notify, cap_len) = find(VIRTIO_PCI_CAP_NOTIFY_CFG);
    assert_eq!(
        (bar, u64::from(offset), length, cap_len),
        (0, NOTIFY_OFFSET, 12, 20)
    );
    assert_eq!(f.cfg(notify + 16, 4), 4, "notify_off_multiplier");
    let ((_, bar, offset, length), ..) = find(VIRTIO_PCI_CAP_ISR_CFG);
    assert_eq!((bar, u64::from(offset)), (0, ISR_OFFSET));
    assert!(length >= 1);
    let ((_, bar, offset, length), ..) = find(VIRTIO_PCI_CAP_DEVICE_CFG);
    assert_eq!(
        (bar, u64::from(offset), length),
        (0, DEVICE_CFG_OFFSET, 0x1000)
    );
    find(VIRTIO_PCI_CAP_PCI_CFG);
    // Every BAR region lies inside the BAR.
    for ((_, _, offset, length), ..) in &virtio_caps {
        assert!(u64::from(*offset) + u64::from(*length) <= BAR_SIZE);
    }
    let msix = msix.expect("MSI-X capability");
    assert_eq!(msix, MSIX_CAP);
    assert_eq!(f.cfg(msix + 2, 2) & 0x7ff, 3, "table size is N - 1");
    assert_eq!(
        u64::from(f.cfg(msix + 4, 4)),
        MSIX_TABLE_OFFSET,
        "table in BAR0"
    );
    assert_eq!(
        u64::from(f.cfg(msix + 8, 4)),
        MSIX_PBA_OFFSET,
        "PBA in BAR0"
    );
    assert_eq!(COMMON_CAP, 0x40);
}

#[test]
fn bring_up_activates_ready_queues_with_their_configuration() {
    let mut f = fixture(&[256, 32, 8], 4);
    assert_eq!(f.bar(NUM_QUEUES, 2), 3);
    for half in 0..3u64 {
        f.set_bar(DEVICE_FEATURE_SELECT, 4, half);
        let expected = if half < 2 {
            (FAKE_FEATURES >> (32 * half)) & 0xffff_ffff
        } else {
            0
        };
        assert_eq!(f.bar(DEVICE_FEATURE, 4), expected);
    }
    f.set_bar(QUEUE_SELECT, 2, 2);
    assert_eq!(f.bar(QUEUE_SIZE, 2), 8, "queue_size starts at the maximum");
    assert_eq!(f.bar(QUEUE_NOTIFY_OFF, 2), 2);
    f.set_bar(QUEUE_SELECT, 2, 3);
    assert_eq!(f.bar(QUEUE_SIZE, 2), 0, "no queue 3");
    f.bring_up(&[128, 32]);
    assert_eq!(
        f.transport.device_status(),
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
    );
    let log = f.log.get();
    assert_eq!(log.acked_features, Some(DRIVER_FEATURES));
    let expected = vec![expected_queue(0, 128), expected_queue(1, 32)];
    assert_eq!(log.activations, vec![expected]);
    drop(log);
    f.set_bar(QUEUE_SELECT, 2, 0);
    assert_eq!(f.bar(QUEUE_DRIVER, 8), ring_addresses(0).1);
    assert_eq!(f.bar(QUEUE_DESC + 4, 4), 0);
}

#[test]
fn features_ok_is_refused_for_unoffered_features() {
    for features in [DRIVER_FEATURES | (1 << 3), 1 << VIRTIO_RING_F_EVENT_IDX] {
        let mut f = fixture(&[16], 2);
        assert!(!f.negotiate(features));
        f.configure_queue(0, 16, 0);
        f.add_status(STATUS_DRIVER_OK);
        assert!(f.log.get().activations.is_empty());
    }
}

#[test]
fn queue_writes_after_driver_ok_are_ignored_and_bad_queues_need_reset() {
    let mut f = fixture(&[16], 2);
    f.bring_up(&[16]);
    f.set_bar(QUEUE_SELECT, 2, 0);
    f.set_bar(QUEUE_SIZE, 2, 2);
    f.set_bar(QUEUE_DESC, 8, 0x8000);
    assert_eq!(f.bar(QUEUE_SIZE, 2), 16);
    assert_eq!(f.bar(QUEUE_DESC, 8), ring_addresses(0).0);

    let mut f = fixture(&[16], 2);
    assert!(f.negotiate(DRIVER_FEATURES));
    f.set_bar(CONFIG_MSIX_VECTOR, 2, 0);
    f.configure_queue(0, 24, 0);
    f.enable_msix(false);
    let message = f.program_vector(0);
    assert_eq!(f.sink.take(), vec![(0, Some(message))]);
    f.add_status(STATUS_DRIVER_OK);
    assert!(f.log.get().activations.is_empty());
    assert_ne!(f.transport.device_status() & STATUS_NEEDS_RESET, 0);
    assert!(fired(&f.transport, 0), "config change interrupt");
    assert_eq!(f.bar(CONFIG_GENERATION, 1), 1);
}

#[test]
fn reset_clears_state_and_allows_reactivation() {
    let mut f = fixture(&[16, 16], 3);
    f.bring_up(&[16, 16]);
    f.interrupt().notify_queue(0).unwrap();
    f.set_bar(DEVICE_STATUS, 1, 0);
    assert_eq!(f.log.get().resets, 1);
    assert_eq!(f.transport.device_status(), 0);
    assert_eq!(f.bar(ISR_OFFSET, 1), 0);
    assert_eq!(f.pba(), 0);
    assert_eq!(
        f.bar(CONFIG_MSIX_VECTOR, 2),
        u64::from(VIRTIO_MSI_NO_VECTOR)
    );
    assert_eq!(f.bar(QUEUE_MSIX_VECTOR, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    assert_eq!(f.bar(QUEUE_ENABLE, 2), 0);
    f.bring_up(&[8]);
    let log = f.log.get();
    assert_eq!(log.activations.len(), 2);
    assert_eq!(log.activations[1].len(), 1);
    assert_eq!(log.activations[1][0].size, 8);
}

#[test]
fn notify_region_kicks_queues() {
    let mut f = fixture(&[16, 16], 2);
    let kicks: Vec<_> = f
        .transport
        .queue_kicks()
        .into_iter()
        .map(|(offset, _)| offset)
        .collect();
    assert_eq!(kicks, vec![0x3000, 0x3004]);
    assert_eq!(f.transport.vector_irqfds().len(), 2);
    f.bring_up(&[16, 16]);
    f.set_bar(0x3004, 2, 1);
    f.set_bar(0x3002, 2, 0); // inside queue 0's slot but not at its start
    f.set_bar(0x3ffc, 2, 0x3ff); // no such queue
    let log = f.log.get();
    assert_eq!(log.active_queues[1].kick.read().unwrap(), 1);
    assert!(log.active_queues[0].kick.read().is_err());
}

#[test]
fn device_config_directly_and_through_the_pci_cfg_window() {
    let mut f = fixture(&[16], 2);
    assert_eq!(f.bar(DEVICE_CFG_OFFSET, 4), 0xa3a2_a1a0);
    f.set_bar(DEVICE_CFG_OFFSET + 4, 2, 0x2211);
    assert_eq!(f.bar(DEVICE_CFG_OFFSET, 8), 0xa7a6_2211_a3a2_a1a0);
    assert_eq!(
        f.bar(DEVICE_CFG_OFFSET + 0xffe, 4),
        0,
        "crosses the region end"
    );
    // The pci_cfg capability: bar 0, offset, length, then data.
    let cap = super::config::PCI_CFG_CAP;
    f.set_cfg(cap + 4, 1, 0);
    f.set_cfg(cap + 8, 4, NUM_QUEUES as u32);
    f.set_cfg(cap + 12, 4, 2);
    assert_eq!(f.cfg(cap + 16, 4), 1, "num_queues read through the window");
    f.set_cfg(cap + 8, 4, DEVICE_CFG_OFFSET as u32);
    f.set_cfg(cap + 12, 4, 1);
    f.set_cfg(cap + 16, 4, 0x55);
    assert_eq!(f.bar(DEVICE_CFG_OFFSET, 1), 0x55);
    // A misaligned window does nothing.
    f.set_cfg(cap + 8, 4, DEVICE_CFG_OFFSET as u32 + 1);
    f.set_cfg(cap + 12, 4, 2);
    f.set_cfg(cap + 16, 4, 0x6666);
    assert_eq!(f.bar(DEVICE_CFG_OFFSET, 4), 0xa3a2_a155);
}

#[test]
fn garbage_config_and_bar_traffic_never_panics() {
    let mut f = fixture(&[16, 4, 256], 4);
    let mut rng = Lcg::new(0xc0ffee);
    let hot_spots = [
        0u64, 0x04, 0x10, 0x14, 0x16, 0x18, 0x1a, 0x1c, 0x20, 0x24, 0x28, 0x30, 0x1000, 0x2000,
        0x3000, 0x4000, 0x400c, 0xc000,
    ];
    for _ in 0..30_000 {
        let len = [0usize, 1, 2, 3, 4, 4, 8, 16][rng.below(8) as usize];
        let value = match rng.below(3) {
            0 => rng.below(4),
            1 => u64::from(u32::MAX),
            _ => rng.next_u64(),
        };
        let bytes = value.to_le_bytes().repeat(2);
        let mut buffer = vec![0u8; len];
        match rng.below(4) {
            0 => f.transport.config_write(rng.below(0x1100), &bytes[..len]),
            1 => f.transport.config_read(rng.below(0x1100), &mut buffer),
            2 => {
                let offset = match rng.below(3) {
                    0 => hot_spots[rng.below(hot_spots.len() as u64) as usize] + rng.below(4),
                    1 => rng.below(BAR_SIZE + 0x100),
                    _ => rng.next_u64(),
                };
                f.transport.bar_write(offset, &bytes[..len]);
            }
            _ => f
                .transport
                .bar_read(rng.below(BAR_SIZE + 0x100), &mut buffer),
        }
        let interrupt = f.log.get().interrupt.clone();
        if let Some(interrupt) = interrupt {
            interrupt.notify_queue(rng.below(4) as u16).unwrap();
            interrupt.notify_config().unwrap();
        }
        for irqfd in f.transport.vector_irqfds() {
            let _ = irqfd.read();
        }
    }
    // Whatever the garbage left, a reset and a clean bring-up still activate the device.
    f.set_cfg(BAR0, 4, BAR_ADDRESS as u32);
    f.set_bar(DEVICE_STATUS, 1, 0);
    let activations = f.log.get().activations.len();
    f.bring_up(&[16, 4, 256]);
    assert_eq!(f.log.get().activations.len(), activations + 1);
}

#[test]
fn transports_can_live_behind_the_vmm_bus_mutex() {
    fn assert_send<T: Send>() {}
    assert_send::<PciTransport>();
    assert_send::<crate::MmioTransport>();
}

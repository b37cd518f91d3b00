use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

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
use crate::transport::snapshot_scenarios;
use crate::transport::{
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
};

const DRIVER_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX);

fn transport(max_sizes: &[u16]) -> (MmioTransport, SharedLog) {
    let (device, log) = FakeDevice::new(max_sizes);
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    (
        MmioTransport::new(Box::new(device), test_memory(), irq).unwrap(),
        log,
    )
}

fn read32(transport: &mut MmioTransport, offset: u32) -> u32 {
    let mut data = [0xffu8; 4];
    transport.read(u64::from(offset), &mut data);
    u32::from_le_bytes(data)
}

fn write32(transport: &mut MmioTransport, offset: u32, value: u32) {
    transport.write(u64::from(offset), &value.to_le_bytes());
}

fn set_status(transport: &mut MmioTransport, bits: u8) {
    let status = read32(transport, VIRTIO_MMIO_STATUS);
    write32(transport, VIRTIO_MMIO_STATUS, status | u32::from(bits));
}

fn negotiate(transport: &mut MmioTransport, features: u64) -> bool {
    set_status(transport, STATUS_ACKNOWLEDGE);
    set_status(transport, STATUS_DRIVER);
    for half in 0..2u32 {
        write32(transport, VIRTIO_MMIO_DRIVER_FEATURES_SEL, half);
        write32(
            transport,
            VIRTIO_MMIO_DRIVER_FEATURES,
            (features >> (32 * half)) as u32,
        );
    }
    set_status(transport, STATUS_FEATURES_OK);
    read32(transport, VIRTIO_MMIO_STATUS) as u8 & STATUS_FEATURES_OK != 0
}

fn configure_queue(transport: &mut MmioTransport, index: u16, size: u16) {
    let (desc, avail, used) = ring_addresses(index);
    configure_queue_at(transport, index, size, [desc, avail, used]);
}

/// Programs queue `index` with `size` entries at the `[desc, avail, used]` addresses.
fn configure_queue_at(transport: &mut MmioTransport, index: u16, size: u16, rings: [u64; 3]) {
    let [desc, avail, used] = rings;
    write32(transport, VIRTIO_MMIO_QUEUE_SEL, index.into());
    write32(transport, VIRTIO_MMIO_QUEUE_NUM, size.into());
    for (low, address) in [
        (VIRTIO_MMIO_QUEUE_DESC_LOW, desc),
        (VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail),
        (VIRTIO_MMIO_QUEUE_USED_LOW, used),
    ] {
        write32(transport, low, address as u32);
        write32(transport, low + 4, (address >> 32) as u32);
    }
    write32(transport, VIRTIO_MMIO_QUEUE_READY, 1);
}

/// The whole driver sequence of spec 3.1.1 with every queue at `sizes[i]`.
fn bring_up(transport: &mut MmioTransport, sizes: &[u16]) {
    assert!(negotiate(transport, DRIVER_FEATURES));
    for (index, &size) in (0u16..).zip(sizes) {
        configure_queue(transport, index, size);
    }
    set_status(transport, STATUS_DRIVER_OK);
}

impl DriverPort for MmioTransport {
    fn bring_up(&mut self, features: u64, queues: &[&TestQueue]) {
        assert!(negotiate(self, features));
        for (index, queue) in (0u16..).zip(queues) {
            configure_queue_at(self, index, queue.size(), addresses(queue));
        }
        set_status(self, STATUS_DRIVER_OK);
        assert_eq!(self.device_status() & STATUS_NEEDS_RESET, 0);
    }

    fn notify(&mut self, queue: u16) {
        write32(self, VIRTIO_MMIO_QUEUE_NOTIFY, queue.into());
    }

    fn status(&mut self) -> u8 {
        self.device_status()
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        MmioTransport::pause(self)
    }

    fn resume(&mut self) -> Result<(), PauseError> {
        MmioTransport::resume(self)
    }

    fn save(&self) -> Result<SavedPort, SnapshotError> {
        self.save_state().map(SavedPort::Mmio)
    }

    fn restore(&mut self, state: &SavedPort) -> Result<(), RestoreError> {
        let SavedPort::Mmio(state) = state else {
            panic!("a virtio-pci state for virtio-mmio");
        };
        self.restore_state(state)
    }
}

pub(crate) fn mmio_port(
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
) -> Box<dyn DriverPort> {
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    Box::new(MmioTransport::new(device, memory, irq).unwrap())
}

#[test]
fn a_block_device_pauses_mid_traffic_behind_mmio() {
    block_pauses_mid_traffic(mmio_port);
}

#[test]
fn a_net_device_pauses_mid_traffic_behind_mmio() {
    net_pauses_mid_traffic(mmio_port);
}

#[test]
fn pause_and_resume_reach_only_a_live_device() {
    let (mut transport, log) = transport(&[16]);
    // Before DRIVER_OK there is nothing to pause.
    transport.pause().unwrap();
    transport.resume().unwrap();
    let counts = |log: &SharedLog| {
        let log = log.get();
        (log.pauses, log.resumes)
    };
    assert_eq!(counts(&log), (0, 0));
    bring_up(&mut transport, &[16]);
    transport.pause().unwrap();
    transport.resume().unwrap();
    assert_eq!(counts(&log), (1, 1));
    // After a reset, again nothing.
    write32(&mut transport, VIRTIO_MMIO_STATUS, 0);
    transport.pause().unwrap();
    assert_eq!(log.get().pauses, 1);
}

#[test]
fn identification_registers() {
    let (mut transport, _) = transport(&[64]);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(
        read32(&mut transport, VIRTIO_MMIO_DEVICE_ID),
        FAKE_DEVICE_TYPE
    );
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
    for half in 0..3u32 {
        write32(&mut transport, VIRTIO_MMIO_DEVICE_FEATURES_SEL, half);
        let expected = if half < 2 {
            (FAKE_FEATURES >> (32 * half)) as u32
        } else {
            0
        };
        assert_eq!(
            read32(&mut transport, VIRTIO_MMIO_DEVICE_FEATURES),
            expected
        );
    }
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_QUEUE_NUM_MAX), 64);
    write32(&mut transport, VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(
        read32(&mut transport, VIRTIO_MMIO_QUEUE_NUM_MAX),
        0,
        "no queue 1"
    );
}

#[test]
fn bring_up_activates_ready_queues_with_their_configuration() {
    let (mut transport, log) = transport(&[256, 16, 8]);
    // Queue 2 is left unready: the device gets only what the driver enabled.
    bring_up(&mut transport, &[128, 16]);
    assert_eq!(
        transport.device_status(),
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
    );
    let log = log.get();
    assert_eq!(log.acked_features, Some(DRIVER_FEATURES));
    assert_eq!(
        log.activations,
        vec![vec![expected_queue(0, 128), expected_queue(1, 16)]]
    );
}

#[test]
fn features_ok_is_refused_for_unoffered_features_or_missing_version_1() {
    for features in [
        DRIVER_FEATURES | (1 << 1),
        DRIVER_FEATURES | (1 << 40),
        1 << VIRTIO_RING_F_EVENT_IDX,
    ] {
        let (mut transport, log) = transport(&[16]);
        assert!(!negotiate(&mut transport, features), "{features:#x}");
        // A driver that ignores the refusal still cannot start the device.
        configure_queue(&mut transport, 0, 16);
        set_status(&mut transport, STATUS_DRIVER_OK);
        assert_eq!(
            transport.device_status() & (STATUS_FEATURES_OK | STATUS_DRIVER_OK),
            0
        );
        assert!(log.get().activations.is_empty());
        assert_eq!(log.get().acked_features, None);
    }
}

#[test]
fn status_bits_follow_the_state_machine() {
    let (mut transport, log) = transport(&[16]);
    // DRIVER without ACKNOWLEDGE, and DRIVER_OK without FEATURES_OK, do not stick.
    write32(&mut transport, VIRTIO_MMIO_STATUS, STATUS_DRIVER.into());
    assert_eq!(transport.device_status(), 0);
    assert!(negotiate(&mut transport, DRIVER_FEATURES));
    // Clearing a bit is not a thing a driver may do; only writing 0 resets.
    write32(
        &mut transport,
        VIRTIO_MMIO_STATUS,
        STATUS_ACKNOWLEDGE.into(),
    );
    assert_eq!(
        transport.device_status(),
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
    );
    // Features are fixed after FEATURES_OK.
    write32(&mut transport, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    write32(&mut transport, VIRTIO_MMIO_DRIVER_FEATURES, 0);
    assert_eq!(
        transport.core.driver_features_half(),
        DRIVER_FEATURES as u32
    );
    // After FAILED nothing but a reset is accepted.
    set_status(&mut transport, STATUS_FAILED);
    configure_queue(&mut transport, 0, 16);
    set_status(&mut transport, STATUS_DRIVER_OK);
    assert!(log.get().activations.is_empty());
    write32(&mut transport, VIRTIO_MMIO_STATUS, 0x100);
    assert_ne!(
        transport.device_status(),
        0,
        "bits past the status byte are not a reset"
    );
    write32(&mut transport, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(transport.device_status(), 0);
}

#[test]
fn queue_writes_after_driver_ok_are_ignored() {
    let (mut transport, log) = transport(&[16]);
    bring_up(&mut transport, &[16]);
    let before = *transport.core.selected_queue().unwrap();
    write32(&mut transport, VIRTIO_MMIO_QUEUE_NUM, 4);
    write32(&mut transport, VIRTIO_MMIO_QUEUE_READY, 0);
    write32(&mut transport, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x9000);
    write32(&mut transport, VIRTIO_MMIO_QUEUE_USED_HIGH, 1);
    assert_eq!(*transport.core.selected_queue().unwrap(), before);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_QUEUE_READY), 1);
    // Setting DRIVER_OK again does not activate twice.
    set_status(&mut transport, STATUS_DRIVER_OK);
    assert_eq!(log.get().activations.len(), 1);
}

#[test]
fn invalid_queue_sets_needs_reset_instead_of_activating() {
    let bad_queues: [(u16, u64); 3] = [(12, 0), (32, 0), (16, 0x3)];
    for (size, misalignment) in bad_queues {
        let (mut transport, log) = transport(&[16]);
        assert!(negotiate(&mut transport, DRIVER_FEATURES));
        configure_queue(&mut transport, 0, size);
        let (desc, ..) = ring_addresses(0);
        write32(
            &mut transport,
            VIRTIO_MMIO_QUEUE_DESC_LOW,
            (desc + misalignment) as u32,
        );
        set_status(&mut transport, STATUS_DRIVER_OK);
        assert!(log.get().activations.is_empty(), "size {size}");
        assert_ne!(transport.device_status() & STATUS_NEEDS_RESET, 0);
        assert_eq!(transport.interrupt_status(), INTERRUPT_CONFIG_CHANGE);
        assert_eq!(transport.irq().read().unwrap(), 1);
        assert_eq!(read32(&mut transport, VIRTIO_MMIO_CONFIG_GENERATION), 1);
    }
    // Rings outside guest memory are just as invalid.
    let (mut transport, log) = transport(&[16]);
    assert!(negotiate(&mut transport, DRIVER_FEATURES));
    configure_queue(&mut transport, 0, 16);
    write32(&mut transport, VIRTIO_MMIO_QUEUE_USED_HIGH, 0x10);
    set_status(&mut transport, STATUS_DRIVER_OK);
    assert!(log.get().activations.is_empty());
    assert_ne!(transport.device_status() & STATUS_NEEDS_RESET, 0);
}

#[test]
fn activation_error_sets_needs_reset() {
    let (device, log) = FakeDevice::refusing(&[16]);
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut transport = MmioTransport::new(Box::new(device), test_memory(), irq).unwrap();
    bring_up(&mut transport, &[16]);
    assert!(log.get().activations.is_empty());
    assert_ne!(transport.device_status() & STATUS_NEEDS_RESET, 0);
    assert_eq!(transport.interrupt_status(), INTERRUPT_CONFIG_CHANGE);
    // The driver's reset clears the condition.
    write32(&mut transport, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(transport.device_status(), 0);
}

#[test]
fn reset_clears_everything_and_allows_reactivation() {
    let (mut transport, log) = transport(&[64, 64]);
    bring_up(&mut transport, &[32, 64]);
    log.get()
        .interrupt
        .clone()
        .unwrap()
        .notify_queue(0)
        .unwrap();
    write32(&mut transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    write32(&mut transport, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(log.get().resets, 1);
    assert_eq!(transport.device_status(), 0);
    assert_eq!(transport.interrupt_status(), 0);
    assert_eq!(transport.core.queue_select(), 0);
    assert_eq!(transport.core.driver_features_half(), 0);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_QUEUE_READY), 0);
    // Driver reload: a different configuration this time.
    bring_up(&mut transport, &[8]);
    let log = log.get();
    assert_eq!(log.activations.len(), 2);
    assert_eq!(log.activations[1], vec![expected_queue(0, 8)]);
    // The kick from the old driver was drained, not carried into the new activation.
    assert!(log.active_queues[0].kick.read().is_err());
}

#[test]
fn interrupt_status_and_ack() {
    let (mut transport, log) = transport(&[16]);
    bring_up(&mut transport, &[16]);
    let interrupt = log.get().interrupt.clone().unwrap();
    interrupt.notify_queue(0).unwrap();
    assert_eq!(
        read32(&mut transport, VIRTIO_MMIO_INTERRUPT_STATUS),
        INTERRUPT_USED_BUFFER
    );
    assert_eq!(transport.irq().read().unwrap(), 1);
    interrupt.notify_config().unwrap();
    assert_eq!(
        read32(&mut transport, VIRTIO_MMIO_INTERRUPT_STATUS),
        INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE
    );
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_CONFIG_GENERATION), 1);
    write32(
        &mut transport,
        VIRTIO_MMIO_INTERRUPT_ACK,
        INTERRUPT_USED_BUFFER,
    );
    assert_eq!(
        read32(&mut transport, VIRTIO_MMIO_INTERRUPT_STATUS),
        INTERRUPT_CONFIG_CHANGE
    );
    write32(
        &mut transport,
        VIRTIO_MMIO_INTERRUPT_ACK,
        INTERRUPT_CONFIG_CHANGE,
    );
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    transport.notify_config_change().unwrap();
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_CONFIG_GENERATION), 2);
}

#[test]
fn queue_notify_signals_the_kick_eventfd() {
    let (mut transport, log) = transport(&[16, 16]);
    let kicks: Vec<_> = transport
        .queue_kicks()
        .into_iter()
        .map(|(offset, index, _)| (offset, index))
        .collect();
    assert_eq!(kicks, vec![(0x50, 0), (0x50, 1)]);
    bring_up(&mut transport, &[16, 16]);
    write32(&mut transport, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    write32(&mut transport, VIRTIO_MMIO_QUEUE_NOTIFY, 7);
    write32(&mut transport, VIRTIO_MMIO_QUEUE_NOTIFY, u32::MAX);
    let log = log.get();
    assert_eq!(log.active_queues[1].kick.read().unwrap(), 1);
    assert!(
        log.active_queues[0].kick.read().is_err(),
        "queue 0 was not kicked"
    );
}

#[test]
fn config_space_reaches_the_device() {
    let (mut transport, _) = transport(&[16]);
    let mut data = [0u8; 4];
    transport.read(0x100, &mut data);
    assert_eq!(data, [0xa0, 0xa1, 0xa2, 0xa3]);
    transport.write(0x102, &[0x11, 0x22]);
    let mut wide = [0u8; 8];
    transport.read(0x100, &mut wide);
    assert_eq!(wide, [0xa0, 0xa1, 0x11, 0x22, 0xa4, 0xa5, 0xa6, 0xa7]);
    // Past the device's config: zeros; past the window or too wide: zeros, writes ignored.
    for (offset, len) in [(0x200, 4), (0xffe, 4), (0x100, 16), (u64::MAX - 1, 4)] {
        let mut data = vec![0xffu8; len];
        transport.read(offset, &mut data);
        assert!(data.iter().all(|&b| b == 0), "{offset:#x}+{len}");
        transport.write(offset, &data);
    }
}

#[test]
fn odd_register_accesses_read_zero_and_write_nothing() {
    let (mut transport, _) = transport(&[16]);
    for (offset, len) in [
        (0u64, 2usize),
        (0, 1),
        (0, 8),
        (1, 4),
        (2, 4),
        (0x4, 0),
        (0x50, 3),
    ] {
        let mut data = vec![0xffu8; len];
        transport.read(offset, &mut data);
        assert!(data.iter().all(|&b| b == 0), "{offset:#x}+{len}");
    }
    transport.write(VIRTIO_MMIO_STATUS.into(), &[1]);
    transport.write(u64::from(VIRTIO_MMIO_STATUS) + 1, &1u32.to_le_bytes());
    transport.write(VIRTIO_MMIO_STATUS.into(), &1u64.to_le_bytes());
    assert_eq!(transport.device_status(), 0);
    // Write-only registers read as zero.
    write32(&mut transport, VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_QUEUE_NUM), 0);
}

#[test]
fn garbage_register_traffic_never_panics() {
    let (mut transport, log) = transport(&[16, 4, 256]);
    let mut rng = Lcg::new(0x5eed);
    let interesting = [
        0x0, 0x14, 0x20, 0x24, 0x30, 0x38, 0x44, 0x50, 0x64, 0x70, 0x80, 0x84, 0x90, 0xa0, 0xfc,
    ];
    for _ in 0..20_000 {
        let offset = match rng.below(3) {
            0 => interesting[rng.below(interesting.len() as u64) as usize],
            1 => rng.below(0x1100),
            _ => rng.next_u64(),
        };
        let len = [0usize, 1, 2, 3, 4, 4, 4, 8, 16][rng.below(9) as usize];
        let value = match rng.below(4) {
            0 => rng.below(8),
            1 => u64::from(1u32 << rng.below(32)),
            _ => rng.next_u64(),
        };
        let bytes = value.to_le_bytes().repeat(2);
        if rng.below(2) == 0 {
            transport.write(offset, &bytes[..len]);
        } else {
            let mut data = vec![0u8; len];
            transport.read(offset, &mut data);
        }
        if let Some(interrupt) = log.get().interrupt.clone() {
            interrupt.notify_queue(0).unwrap();
        }
    }
    // Whatever state the garbage left, a reset and a clean bring-up still work.
    write32(&mut transport, VIRTIO_MMIO_STATUS, 0);
    let activations = log.get().activations.len();
    bring_up(&mut transport, &[16, 4, 256]);
    assert_eq!(log.get().activations.len(), activations + 1);
}

#[test]
fn a_used_ring_overlapping_any_ring_sets_needs_reset() {
    // fuzz/crashes/mmio/avail-idx-under-used-flags: avail.idx and used.flags share two bytes.
    let (mut t, log) = transport(&[16]);
    assert!(negotiate(&mut t, DRIVER_FEATURES));
    configure_queue(&mut t, 0, 4);
    write32(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x1_1002);
    write32(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x1_1004);
    set_status(&mut t, STATUS_DRIVER_OK);
    assert!(log.get().activations.is_empty());
    assert_ne!(t.device_status() & STATUS_NEEDS_RESET, 0);

    // Queue 1's used ring written over queue 0's descriptor table.
    let (mut t, log) = transport(&[16, 16]);
    assert!(negotiate(&mut t, DRIVER_FEATURES));
    configure_queue(&mut t, 0, 16);
    configure_queue(&mut t, 1, 16);
    let (desc0, ..) = ring_addresses(0);
    write32(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, (desc0 + 0x40) as u32);
    set_status(&mut t, STATUS_DRIVER_OK);
    assert!(log.get().activations.is_empty());
    assert_ne!(t.device_status() & STATUS_NEEDS_RESET, 0);

    // Adjacent but disjoint areas are fine: a 16-entry descriptor table is 256 bytes, the
    // available ring 38 (with used_event), the used ring 134 (with avail_event).
    let (mut t, log) = transport(&[16]);
    assert!(negotiate(&mut t, DRIVER_FEATURES));
    configure_queue(&mut t, 0, 16);
    for (register, address) in [
        (VIRTIO_MMIO_QUEUE_DESC_LOW, 0x2_0000u32),
        (VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2_0100),
        (VIRTIO_MMIO_QUEUE_USED_LOW, 0x2_0128),
    ] {
        write32(&mut t, register, address);
    }
    set_status(&mut t, STATUS_DRIVER_OK);
    assert_eq!(log.get().activations.len(), 1);
}

#[test]
fn a_block_device_continues_after_a_restore_behind_mmio() {
    snapshot_scenarios::block_continues_after_restore(mmio_port);
}

#[test]
fn a_net_device_continues_after_a_restore_behind_mmio() {
    snapshot_scenarios::net_continues_after_restore(mmio_port);
}

#[test]
fn a_console_continues_after_a_restore_behind_mmio() {
    snapshot_scenarios::console_continues_after_restore(mmio_port);
}

#[test]
fn an_rng_continues_after_a_restore_behind_mmio() {
    snapshot_scenarios::rng_continues_after_restore(mmio_port);
}

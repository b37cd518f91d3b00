//! Hostile snapshot states: a snapshot file is untrusted input, so every field a restore takes
//! is checked against the fresh device and guest memory, and refused with an error naming it,
//! leaving the transport fresh. (The pci-only fields: pci/tests/snapshot.rs.)

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::tempfile::TempFile;

use super::mmio::MmioTransport;
use super::pause_scenarios::DriverPort;
use crate::device::VirtioDevice;
use crate::snapshot::{
    ConsoleState, DeviceState, MmioState, NetState, RestoreError, SnapshotError,
};
use crate::testing::{Lcg, TestQueue, eventually, test_memory, writable};
use crate::{Block, Console, Rng};

fn mmio(device: Box<dyn VirtioDevice>, mem: &GuestMemoryMmap) -> MmioTransport {
    MmioTransport::new(device, mem.clone(), EventFd::new(EFD_NONBLOCK).unwrap()).unwrap()
}

/// A paused rng behind virtio-mmio that served two requests, saved.
fn saved_rng() -> (MmioState, GuestMemoryMmap) {
    let mem = test_memory();
    let tq = TestQueue::at(&mem, GuestAddress(0x1_0000), 64);
    let mut transport = mmio(Box::new(Rng::new()), &mem);
    DriverPort::bring_up(&mut transport, Rng::new().features(), &[&tq]);
    tq.add_chain(&[writable(0x3_0000, 16)]);
    tq.add_chain(&[writable(0x3_0100, 16)]);
    DriverPort::notify(&mut transport, 0);
    assert!(eventually(|| tq.used(&mem).len() == 2));
    transport.pause().unwrap();
    (transport.save_state().unwrap(), mem)
}

/// The refusal of `state` by a fresh rng transport, which must stay fresh: `good` restores
/// there afterwards.
fn refusal(good: &MmioState, mem: &GuestMemoryMmap, state: &MmioState) -> RestoreError {
    let mut transport = mmio(Box::new(Rng::new()), mem);
    let error = transport.restore_state(state).unwrap_err();
    transport.restore_state(good).unwrap();
    error
}

#[test]
fn hostile_core_states_are_refused_naming_the_field() {
    let (good, mem) = saved_rng();
    let refuse = |mutate: &dyn Fn(&mut MmioState)| {
        let mut state = good.clone();
        mutate(&mut state);
        refusal(&good, &mem, &state)
    };
    let error = refuse(&|s| s.core.device_type = 2);
    assert!(matches!(
        error,
        RestoreError::DeviceType { saved: 2, here: 4 }
    ));
    assert_eq!(error.to_string(), "device type 2 in the snapshot, 4 here");
    let error = refuse(&|s| s.core.queues.push(s.core.queues[0].clone()));
    assert!(matches!(
        error,
        RestoreError::QueueCount { saved: 2, here: 1 }
    ));
    let error = refuse(&|s| s.core.queues[0].max_size = 1024);
    assert!(matches!(error, RestoreError::QueueMaxSize { index: 0, .. }));
    let error = refuse(&|s| s.core.queues[0].size = 512);
    assert_eq!(
        error.to_string(),
        "queue 0: size 512 exceeds the device's maximum 64"
    );
    let error = refuse(&|s| s.core.queues[0].size = 48);
    assert!(matches!(error, RestoreError::Queue(_)), "{error}");
    assert!(error.to_string().contains("power of two"), "{error}");
    let error = refuse(&|s| s.core.queues[0].desc_table += 8);
    assert!(error.to_string().contains("misaligned"), "{error}");
    let error = refuse(&|s| s.core.queues[0].used_ring = 0x1_0000_0000);
    assert!(
        error.to_string().contains("not inside guest memory"),
        "{error}"
    );
    let error = refuse(&|s| s.core.queues[0].used_ring = s.core.queues[0].avail_ring);
    assert!(error.to_string().contains("overlaps"), "{error}");
    let error = refuse(&|s| s.core.queues[0].next_avail = s.core.queues[0].next_used + 65);
    assert!(matches!(
        error,
        RestoreError::QueuePosition { index: 0, .. }
    ));
    let error = refuse(&|s| s.core.queues[0].next_used = 3);
    assert!(matches!(
        error,
        RestoreError::QueuePosition { next_avail: 2, .. }
    ));
    let error = refuse(&|s| s.core.queues[0].event_idx ^= true);
    assert!(matches!(
        error,
        RestoreError::QueueEventIdx { index: 0, .. }
    ));
    let error = refuse(&|s| s.core.status |= 0x20);
    assert!(matches!(error, RestoreError::Status { .. }));
    let error = refuse(&|s| s.core.status &= !super::STATUS_FEATURES_OK);
    assert!(matches!(error, RestoreError::Status { .. }));
    let error = refuse(&|s| s.core.driver_features |= 1 << 40);
    assert!(matches!(error, RestoreError::Features { unoffered, .. } if unoffered == 1 << 40));
    let error = refuse(&|s| s.core.driver_features &= !(1 << 32));
    assert!(matches!(error, RestoreError::NoVersion1 { .. }));
    let error = refuse(&|s| s.interrupt_status = 4);
    assert!(matches!(
        error,
        RestoreError::Register {
            field: "InterruptStatus",
            ..
        }
    ));
    // Refused by the device, after the core took the registers: it is reset to fresh.
    let error = refuse(&|s| s.core.device = DeviceState::Net(NetState { active_pairs: 1 }));
    assert!(matches!(
        error,
        RestoreError::DeviceKind {
            saved: "net",
            here: "rng"
        }
    ));
    // A queue the driver never started has no positions.
    let error = refuse(&|s| {
        s.core.status = 0;
        s.core.queues[0].ready = false;
    });
    assert!(matches!(
        error,
        RestoreError::QueueNotReady { index: 0, .. }
    ));
}

#[test]
fn a_running_device_is_not_saved() {
    let mem = test_memory();
    let tq = TestQueue::at(&mem, GuestAddress(0x1_0000), 64);
    let mut transport = mmio(Box::new(Rng::new()), &mem);
    DriverPort::bring_up(&mut transport, Rng::new().features(), &[&tq]);
    assert!(matches!(
        transport.save_state(),
        Err(SnapshotError::NotPaused { device_type: 4 })
    ));
    transport.pause().unwrap();
    transport.save_state().unwrap();
    transport.resume().unwrap();
    assert!(transport.save_state().is_err());
}

#[test]
fn a_device_the_driver_never_started_restores_as_it_was() {
    let mem = test_memory();
    let transport = mmio(Box::new(Rng::new()), &mem);
    let state = transport.save_state().unwrap();
    let mut fresh = mmio(Box::new(Rng::new()), &mem);
    fresh.restore_state(&state).unwrap();
    assert_eq!(fresh.save_state().unwrap(), state);
    fresh.resume().unwrap();
}

#[test]
fn hostile_device_states_are_refused() {
    let mem = test_memory();
    let image = TempFile::new().unwrap();
    image.as_file().set_len(512 * 8).unwrap();
    let block = || Box::new(Block::new(image.as_path(), false, None).unwrap());
    let mut state = mmio(block(), &mem).save_state().unwrap();
    let DeviceState::Block(disk) = &mut state.core.device else {
        panic!("{:?}", state.core.device);
    };
    disk.sectors = 16;
    let error = mmio(block(), &mem).restore_state(&state).unwrap_err();
    assert_eq!(
        error.to_string(),
        "block: the snapshot's disk has 16 sectors, the disk here 8"
    );

    let console = || Box::new(Console::new(Box::new(std::io::sink())).unwrap());
    let mut state = mmio(console(), &mem).save_state().unwrap();
    state.core.device = DeviceState::Console(ConsoleState {
        pending_input: vec![b'x'; crate::console::INPUT_BUFFER_LIMIT + 1],
    });
    let error = mmio(console(), &mem).restore_state(&state).unwrap_err();
    assert!(matches!(error, RestoreError::ConsoleInput { .. }));

    let (tap, _peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
    let tap = super::pause_scenarios::SocketTap(tap);
    let net = crate::Net::new(Arc::new(tap), None).unwrap();
    let mut transport = mmio(Box::new(net), &mem);
    let mut state = transport.save_state().unwrap();
    for pairs in [0, 2] {
        state.core.device = DeviceState::Net(NetState {
            active_pairs: pairs,
        });
        let mut fresh = mmio(Box::new(Rng::new()), &mem);
        // (An rng refuses net state by kind; the net device itself checks the count.)
        assert!(fresh.restore_state(&state).is_err());
        let error = transport.restore_state(&state).unwrap_err();
        assert!(matches!(error, RestoreError::NetPairs { saved, pairs: 1 } if saved == pairs));
    }
}

/// Random changes to any numeric field of a live state: restored or refused, never a panic,
/// and a restored device resumes and pauses.
#[test]
fn random_hostile_states_never_panic() {
    let (good, mem) = saved_rng();
    let mut lcg = Lcg::new(13);
    for _ in 0..300 {
        let mut state = good.clone();
        for _ in 0..1 + lcg.below(3) {
            let value = lcg.next_u64();
            let queue = &mut state.core.queues[0];
            match lcg.below(12) {
                0 => queue.size = value as u16,
                1 => queue.desc_table = value % 0x200_0000,
                2 => queue.avail_ring = value % 0x200_0000,
                3 => queue.used_ring = value % 0x200_0000,
                4 => queue.next_avail = value as u16,
                5 => queue.next_used = value as u16,
                6 => queue.ready = value & 1 != 0,
                7 => state.core.status = value as u8,
                8 => state.core.driver_features ^= 1 << (value % 64),
                9 => state.core.queue_select = value as u16,
                10 => state.interrupt_status = value as u32 & 7,
                _ => queue.event_idx = value & 1 != 0,
            }
        }
        let mut transport = mmio(Box::new(Rng::new()), &mem);
        if transport.restore_state(&state).is_ok() {
            transport.resume().unwrap();
            transport.pause().unwrap();
        }
    }
}

#[test]
fn a_pending_mmio_interrupt_is_raised_again_and_reads_back() {
    let (mut state, mem) = saved_rng();
    state.interrupt_status = super::mmio::INTERRUPT_USED_BUFFER;
    state.config_generation = 7;
    let mut transport = mmio(Box::new(Rng::new()), &mem);
    transport.restore_state(&state).unwrap();
    assert_eq!(transport.irq().read().unwrap(), 1);
    assert_eq!(transport.interrupt_status(), 1);
    let mut generation = [0u8; 4];
    transport.read(0xfc, &mut generation);
    assert_eq!(u32::from_le_bytes(generation), 7);
}

/// What a [`FakePlane`] saw of a restore: (queue, next_avail) per ring it was handed, and
/// whether it was resumed.
type PlaneLog = Arc<std::sync::Mutex<(Vec<(u16, u16)>, bool)>>;

/// A data plane outside pvm, as vhost-net is: it reports where each ring stopped (no used
/// index: that is in the used ring) and records how it was restored.
#[derive(Debug, Default)]
struct FakePlane {
    restored: PlaneLog,
}

impl crate::data_plane::DataPlane for FakePlane {
    fn supported_features(&self) -> u64 {
        u64::MAX
    }
    fn start(
        &mut self,
        _: &GuestMemoryMmap,
        _: Arc<dyn crate::Interrupt>,
        _: Vec<crate::ActiveQueue>,
        _: u64,
    ) -> Result<(), crate::data_plane::DataPlaneError> {
        Ok(())
    }
    fn stop(&mut self) {}
    fn pause(&mut self) -> Result<(), crate::data_plane::DataPlaneError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), crate::data_plane::DataPlaneError> {
        self.restored.lock().unwrap().1 = true;
        Ok(())
    }
    fn positions(&self) -> Result<Vec<crate::snapshot::QueuePosition>, SnapshotError> {
        let at = |index, next_avail| crate::snapshot::QueuePosition {
            index,
            next_avail,
            next_used: None,
        };
        Ok(vec![at(0, 3), at(1, 5)])
    }
    fn start_paused(
        &mut self,
        _: &GuestMemoryMmap,
        _: Arc<dyn crate::Interrupt>,
        queues: Vec<crate::ActiveQueue>,
        _: u64,
    ) -> Result<(), crate::data_plane::DataPlaneError> {
        use virtio_queue::QueueT;
        let rings = queues.iter().map(|q| (q.index, q.queue.next_avail()));
        self.restored.lock().unwrap().0 = rings.collect();
        Ok(())
    }
    fn name(&self) -> &'static str {
        "fake plane"
    }
}

#[test]
fn a_data_plane_ring_takes_its_used_index_from_guest_memory_and_restores_paused() {
    use vm_memory::{Address, Bytes};

    let mem = test_memory();
    let net_on = |plane: FakePlane| {
        let (tap, _peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let tap = super::pause_scenarios::SocketTap(tap);
        let mut net = crate::Net::new(Arc::new(tap), None).unwrap();
        net.set_data_planes(vec![Box::new(plane)]).unwrap();
        net
    };
    let net = net_on(FakePlane::default());
    let features = net.features();
    let rxq = TestQueue::at(&mem, GuestAddress(0x1_0000), 16);
    let txq = TestQueue::at(&mem, GuestAddress(0x1_8000), 16);
    let mut transport = mmio(Box::new(net), &mem);
    DriverPort::bring_up(&mut transport, features, &[&rxq, &txq]);
    // Where the backend left the used rings.
    mem.write_obj(2u16, rxq.used_addr().unchecked_add(2))
        .unwrap();
    mem.write_obj(5u16, txq.used_addr().unchecked_add(2))
        .unwrap();
    transport.pause().unwrap();
    let state = transport.save_state().unwrap();
    let positions: Vec<_> = state
        .core
        .queues
        .iter()
        .map(|q| (q.next_avail, q.next_used))
        .collect();
    assert_eq!(positions, vec![(3, 2), (5, 5)]);
    drop(transport);

    let plane = FakePlane::default();
    let restored = Arc::clone(&plane.restored);
    let mut transport = mmio(Box::new(net_on(plane)), &mem);
    transport.restore_state(&state).unwrap();
    assert_eq!(*restored.lock().unwrap(), (vec![(0, 3), (1, 5)], false));
    transport.resume().unwrap();
    assert!(restored.lock().unwrap().1, "the plane was not resumed");
}

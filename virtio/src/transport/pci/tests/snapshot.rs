//! Snapshots behind virtio-pci: the device scenarios, and what only pci has (config space, BAR,
//! MSI-X table, PBA, vectors and their routes).

use super::*;
use crate::snapshot::{DeviceState, PciState};
use crate::transport::snapshot_scenarios;

#[test]
fn a_block_device_continues_after_a_restore_behind_pci() {
    snapshot_scenarios::block_continues_after_restore(pci_port);
}

#[test]
fn a_net_device_continues_after_a_restore_behind_pci() {
    snapshot_scenarios::net_continues_after_restore(pci_port);
}

#[test]
fn a_console_continues_after_a_restore_behind_pci() {
    snapshot_scenarios::console_continues_after_restore(pci_port);
}

#[test]
fn an_rng_continues_after_a_restore_behind_pci() {
    snapshot_scenarios::rng_continues_after_restore(pci_port);
}

const COMMAND: usize = 0x04;

/// An rng behind pci with three MSI-X vectors, on `mem`, BAR0 at `bar`.
fn rng_fixture(mem: &GuestMemoryMmap, bar: u64) -> Fixture {
    let sink = Arc::new(RecordingSink::default());
    let transport = PciTransport::new(
        Box::new(crate::Rng::new()),
        mem.clone(),
        bar,
        3,
        sink.clone(),
    )
    .unwrap();
    let (_, log) = FakeDevice::new(&[]);
    Fixture {
        transport,
        log,
        sink,
    }
}

#[test]
fn config_space_bar_and_msix_come_back_and_every_route_is_sent_again() {
    let mem = test_memory();
    let tq = TestQueue::at(&mem, vm_memory::GuestAddress(0x1_0000), 64);
    let mut f = rng_fixture(&mem, BAR_ADDRESS);
    // The guest moves BAR0 and turns on memory decoding and bus mastering.
    f.set_cfg(BAR0, 4, 0xd000_0000);
    f.set_cfg(COMMAND, 2, 0x6);
    let config_message = f.program_vector(0);
    let queue_message = f.program_vector(1);
    f.enable_msix(false);
    let features = crate::Rng::new().features();
    DriverPort::bring_up(&mut f, features, &[&tq]);
    // The queue's vector masked: its interrupt waits in the PBA.
    f.set_bar(MSIX_TABLE_OFFSET + 16 + 12, 4, 1);
    tq.add_chain(&[crate::testing::writable(0x3_0000, 16)]);
    f.notify(0);
    assert!(crate::testing::eventually(|| tq.used(&mem).len() == 1));
    assert!(crate::testing::eventually(|| f.pba() == 0b10));
    f.pause().unwrap();
    let state = f.transport.save_state().unwrap();
    drop(f);

    // The VMM builds the function at its default address; the guest's comes back.
    let mut g = rng_fixture(&mem, BAR_ADDRESS);
    g.transport.restore_state(&state).unwrap();
    assert_eq!(g.transport.bar_address(), 0xd000_0000);
    assert_eq!(g.cfg(COMMAND, 2), 0x6);
    assert_eq!(
        g.sink.take(),
        vec![(0, Some(config_message)), (1, None), (2, None)],
        "every vector's route told to the fresh VMM"
    );
    assert_eq!(g.pba(), 0b10);
    assert_eq!(g.bar(CONFIG_MSIX_VECTOR, 2), 0);
    g.set_bar(QUEUE_SELECT, 2, 0);
    assert_eq!(g.bar(QUEUE_MSIX_VECTOR, 2), 1);
    assert_eq!(g.bar(MSIX_TABLE_OFFSET + 16, 8), queue_message.address);
    let irqfd = g.transport.vector_irqfds()[1].try_clone().unwrap();
    assert!(irqfd.read().is_err(), "a masked vector fired");
    // Unmasked, the pending interrupt fires through a route the VMM is told about.
    g.set_bar(MSIX_TABLE_OFFSET + 16 + 12, 4, 0);
    assert_eq!(g.sink.take(), vec![(1, Some(queue_message))]);
    assert_eq!(irqfd.read().unwrap(), 1);
    assert_eq!(g.pba(), 0);
    g.resume().unwrap();
    // EVENT_IDX: the driver asks to hear of the next used entry.
    tq.set_used_event(&mem, 1);
    tq.add_chain(&[crate::testing::writable(0x3_0100, 16)]);
    g.notify(0);
    assert!(crate::testing::eventually(|| tq.used(&mem).len() == 2));
    assert!(crate::testing::eventually(|| irqfd.read().is_ok()));
}

/// A saved rng function (paused, MSI-X on) and the memory it ran on.
fn saved_rng() -> (PciState, GuestMemoryMmap) {
    let mem = test_memory();
    let tq = TestQueue::at(&mem, vm_memory::GuestAddress(0x1_0000), 64);
    let mut f = rng_fixture(&mem, BAR_ADDRESS);
    f.program_vector(0);
    f.program_vector(1);
    f.enable_msix(false);
    DriverPort::bring_up(&mut f, crate::Rng::new().features(), &[&tq]);
    f.pause().unwrap();
    (f.transport.save_state().unwrap(), mem)
}

/// Restores `state` into a fresh function and returns the refusal; the refused function must
/// still be fresh, so the good state restores there afterwards.
fn refusal(good: &PciState, mem: &GuestMemoryMmap, state: &PciState) -> RestoreError {
    let mut f = rng_fixture(mem, BAR_ADDRESS);
    let error = f.transport.restore_state(state).unwrap_err();
    f.transport.restore_state(good).unwrap();
    error
}

#[test]
fn hostile_pci_states_are_refused_naming_the_field() {
    let (good, mem) = saved_rng();
    let refuse = |mutate: &dyn Fn(&mut PciState)| {
        let mut state = good.clone();
        mutate(&mut state);
        refusal(&good, &mem, &state)
    };
    let error = refuse(&|s| s.config_space.truncate(255));
    assert!(matches!(
        error,
        RestoreError::ConfigSpaceLength { len: 255, .. }
    ));
    // The device id is read-only: a snapshot of another device.
    let error = refuse(&|s| s.config_space[2] ^= 1);
    assert!(matches!(
        error,
        RestoreError::ConfigSpaceByte { offset: 2, .. }
    ));
    assert!(error.to_string().contains("byte 0x2"), "{error}");
    let error = refuse(&|s| s.msix.table.truncate(2));
    assert!(matches!(
        error,
        RestoreError::MsixTableSize { saved: 2, here: 3 }
    ));
    let error = refuse(&|s| s.msix.pending.push(0));
    assert!(matches!(error, RestoreError::MsixPendingSize { .. }));
    let error = refuse(&|s| s.msix.table[1].vector_control = 2);
    assert!(matches!(error, RestoreError::MsixBits { vector: 1 }));
    let error = refuse(&|s| s.msix.pending[0] = 1 << 3);
    assert!(matches!(error, RestoreError::MsixBits { vector: 3 }));
    let error = refuse(&|s| s.msix.config_vector = 3);
    assert!(matches!(
        error,
        RestoreError::MsixConfigVector { vector: 3, size: 3 }
    ));
    let error = refuse(&|s| s.msix.queue_vectors[0] = 7);
    assert!(matches!(
        error,
        RestoreError::MsixQueueVector {
            queue: 0,
            vector: 7,
            ..
        }
    ));
    assert!(error.to_string().contains("queue 0"), "{error}");
    let error = refuse(&|s| s.msix.queue_vectors.push(0));
    assert!(matches!(
        error,
        RestoreError::MsixQueueVectors { saved: 2, here: 1 }
    ));
    let error = refuse(&|s| s.isr = 4);
    assert!(matches!(
        error,
        RestoreError::Register {
            field: "ISR status",
            ..
        }
    ));
    // A device-level refusal comes after the MSI-X state was applied: all of it goes again.
    let error = refuse(&|s| {
        s.core.device = DeviceState::Net(crate::snapshot::NetState { active_pairs: 1 })
    });
    assert!(matches!(
        error,
        RestoreError::DeviceKind {
            saved: "net",
            here: "rng"
        }
    ));
}

#[test]
fn no_vector_is_a_vector_and_survives() {
    let (mut state, mem) = saved_rng();
    state.msix.config_vector = VIRTIO_MSI_NO_VECTOR;
    let mut f = rng_fixture(&mem, BAR_ADDRESS);
    f.transport.restore_state(&state).unwrap();
    assert_eq!(
        f.bar(CONFIG_MSIX_VECTOR, 2),
        u64::from(VIRTIO_MSI_NO_VECTOR)
    );
}

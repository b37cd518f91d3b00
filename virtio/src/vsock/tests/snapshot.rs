//! Snapshots: a restored device has no connections, binds its own listener and tells the
//! guest to reset its sockets (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET) when it first runs.

use super::*;
use crate::snapshot::{DeviceState, RestoreError, VsockState};
use crate::testing::restored_queues;

/// Where the test guest's event buffer goes.
const EVENT_BUFFER: u64 = 0x9_0000;

/// Restores `saved` into `device`, over the guest's queues at the saved positions.
fn restore_into(device: &mut Vsock, guest: &Guest, saved: &crate::snapshot::SavedDevice) {
    let interrupt = Arc::new(RecordingInterrupt::for_queues(3));
    let queues = restored_queues([&guest.rx, &guest.tx, &guest._ev], &saved.queues);
    let features = 1 << VIRTIO_F_VERSION_1;
    device
        .restore(
            Some(activation(&guest.mem, &interrupt, queues, features)),
            &saved.state,
        )
        .unwrap();
}

#[test]
fn a_restored_vsock_drops_its_connections_and_sends_a_transport_reset() {
    let mut guest = Guest::start();
    let listener = guest.listen(9);
    let _host = guest.connect(&listener, 5000, 9);
    assert!(guest.dev.save_state().is_err(), "saved while running");
    guest.dev.pause().unwrap();
    let saved = guest.dev.save_state().unwrap();
    assert_eq!(
        saved.state,
        DeviceState::Vsock(VsockState { guest_cid: CID })
    );
    let indices: Vec<u16> = saved.queues.iter().map(|p| p.index).collect();
    assert_eq!(indices, vec![0, 1, 2]);
    // The snapshot's uds_path is the old device's: a restored VMM binds its own (here another
    // path, since this process still holds the first).
    let uds = guest.dir.as_path().join("restored.sock");
    let mut restored = Vsock::new(CID, &uds).unwrap();
    let other = Vsock::new(CID + 1, &guest.dir.as_path().join("other.sock"));
    let e = other.unwrap().restore(None, &saved.state).unwrap_err();
    assert!(e.to_string().contains("guest CID"), "{e}");
    let e = restored.restore(None, &DeviceState::Rng).unwrap_err();
    assert!(matches!(e, RestoreError::DeviceKind { .. }), "{e}");
    guest
        .mem
        .write_obj(0xffff_ffffu32, GuestAddress(EVENT_BUFFER))
        .unwrap();
    let head = guest._ev.add_chain(&[writable(EVENT_BUFFER, 8)]);
    restore_into(&mut restored, &guest, &saved);
    assert_eq!(restored.paused_connections(), Some(0));
    assert!(guest._ev.used(&guest.mem).is_empty(), "sent while paused");
    let log = crate::dirty::DirtyLog::track(&guest.mem);
    restored.resume().unwrap();
    assert!(eventually(
        || guest._ev.used(&guest.mem) == vec![(u32::from(head), 4)]
    ));
    let event: u32 = guest.mem.read_obj(GuestAddress(EVENT_BUFFER)).unwrap();
    assert_eq!(u32::from_le(event), EVENT_TRANSPORT_RESET);
    // A Diff snapshot carries the event buffer's page.
    let page = (EVENT_BUFFER / 4096) as usize;
    assert!(crate::dirty::tests::pages(&log, 0).contains(&page));
    // The restored device listens at its own path.
    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(b"CONNECT 77\n").unwrap();
    let request = guest.next().0;
    assert_eq!((request.op, request.dst_port), (OP_REQUEST, 77));
}

#[test]
fn a_restored_vsock_without_an_event_buffer_resets_on_the_guests_next_one() {
    let mut guest = Guest::start();
    guest.dev.pause().unwrap();
    let saved = guest.dev.save_state().unwrap();
    let mut restored = Vsock::new(CID, &guest.dir.as_path().join("r.sock")).unwrap();
    restore_into(&mut restored, &guest, &saved);
    restored.resume().unwrap();
    // A buffer too small for the event is handed back empty rather than written past.
    let head = guest._ev.add_chain(&[writable(EVENT_BUFFER, 2)]);
    guest._ev.kick();
    assert!(eventually(
        || guest._ev.used(&guest.mem) == vec![(u32::from(head), 0)]
    ));
}

//! Snapshots of a multiqueue net device: the pair count the driver set through the control
//! queue, every queue's position (control queue included) and the paused restore.

use super::*;
use crate::snapshot::{DeviceState, NetState, RestoreError};

/// The five queues of a two-pair device (rx0, tx0, rx1, tx1, ctrl), at their saved positions.
fn restored_queues(
    queues: &[TestQueue],
    saved: &[crate::snapshot::QueuePosition],
) -> Vec<ActiveQueue> {
    (0u16..)
        .zip(queues)
        .map(|(index, tq)| {
            let mut active = tq.active_queue(index);
            let position = saved.iter().find(|p| p.index == index).unwrap();
            active.queue.set_next_avail(position.next_avail);
            active.queue.set_next_used(position.next_used.unwrap());
            active
        })
        .collect()
}

#[test]
fn two_active_pairs_come_back_paused_and_pair_1_serves_after_the_resume() {
    let mem = test_memory();
    let (sockets, peers) = queue_backends(2);
    let mut net = Net::with_pairs(as_backends(&sockets), None).unwrap();
    let queues: Vec<TestQueue> = (0..5)
        .map(|q| TestQueue::at(&mem, GuestAddress(q * 0x2000), 16))
        .collect();
    let active: Vec<ActiveQueue> = (0u16..)
        .zip(&queues)
        .map(|(i, q)| q.active_queue(i))
        .collect();
    let ctrl_kick = active[4].kick.try_clone().unwrap();
    let features = net.features();
    net.activate(activation(&mem, &Arc::default(), active, features))
        .unwrap();
    queues[4].add_chain(&pairs_set(&mem, 2));
    ctrl_kick.write(1).unwrap();
    assert!(eventually(|| queues[4].used(&mem) == vec![(0, 1)]));
    assert_eq!(net.active_pairs(), 2);
    assert!(net.save_state().is_err(), "saved while running");
    net.pause().unwrap();
    let saved = net.save_state().unwrap();
    assert_eq!(saved.state, DeviceState::Net(NetState { active_pairs: 2 }));
    let indices: Vec<u16> = saved.queues.iter().map(|p| p.index).collect();
    assert_eq!(indices, vec![0, 1, 2, 3, 4]);
    assert_eq!(
        saved.queues[4].next_avail, 1,
        "the control command was taken"
    );
    drop(net);

    let mut restored = Net::with_pairs(as_backends(&sockets), None).unwrap();
    let interrupt = Arc::new(RecordingInterrupt::default());
    let too_many = DeviceState::Net(NetState { active_pairs: 3 });
    assert!(matches!(
        restored.restore(
            Some(activation(
                &mem,
                &interrupt,
                restored_queues(&queues, &saved.queues),
                features
            )),
            &too_many
        ),
        Err(RestoreError::NetPairs { saved: 3, pairs: 2 })
    ));
    restored
        .restore(
            Some(activation(
                &mem,
                &interrupt,
                restored_queues(&queues, &saved.queues),
                features,
            )),
            &saved.state,
        )
        .unwrap();
    assert_eq!(restored.active_pairs(), 2);
    // Paused: a frame for pair 1 and a buffer for it wait.
    let incoming = frame(80);
    peers[1].send(&incoming).unwrap();
    queues[2].add_chain(&[writable(0x60_000, 2048)]);
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert!(queues[2].used(&mem).is_empty(), "served before the resume");
    restored.resume().unwrap();
    assert!(eventually(|| queues[2].used(&mem).len() == 1));
    let mut want = incoming.clone();
    want[10] = 1;
    assert_eq!(guest_bytes(&mem, 0x60_000, incoming.len()), want);
    // The control queue goes on from where it was: the next command is its second chain.
    queues[4].add_chain(&pairs_set(&mem, 1));
    queues[4].kick();
    assert!(eventually(|| queues[4].used(&mem) == vec![(0, 1), (3, 1)]));
    assert_eq!(restored.active_pairs(), 1);
    restored.reset();
}

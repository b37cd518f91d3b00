use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::testing::{
    RecordingInterrupt, SharedWriter, TestQueue, activation, eventually, readable, test_memory,
    writable,
};
use crate::worker::CHAINS_PER_PASS;

struct BrokenWriter;

impl Write for BrokenWriter {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::BrokenPipe))
    }
    fn flush(&mut self) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::BrokenPipe))
    }
}

fn transmit_one(
    output: &mut dyn Write,
    mem: &GuestMemoryMmap,
    descs: &[RawDescriptor],
) -> io::Result<()> {
    let tq = TestQueue::new(mem, 16);
    tq.add_chain(descs);
    let chain = tq.queue().pop_descriptor_chain(mem).unwrap();
    transmit(output, mem, chain)
}

fn guest_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn pending_of(bytes: &[u8]) -> Mutex<VecDeque<u8>> {
    Mutex::new(bytes.iter().copied().collect())
}

#[test]
fn transmit_writes_readable_buffers_in_order() {
    let mem = test_memory();
    mem.write_slice(b"hello ", GuestAddress(0x10_000)).unwrap();
    mem.write_slice(b"world\n", GuestAddress(0x20_000)).unwrap();
    let mut out = Vec::new();
    transmit_one(
        &mut out,
        &mem,
        &[
            readable(0x10_000, 6),
            readable(0x20_000, 6),
            writable(0x30_000, 8),
        ],
    )
    .unwrap();
    assert_eq!(out, b"hello world\n");

    // A large buffer goes out in chunks, complete.
    let big: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    mem.write_slice(&big, GuestAddress(0x40_000)).unwrap();
    let mut out = Vec::new();
    transmit_one(&mut out, &mem, &[readable(0x40_000, 10_000)]).unwrap();
    assert_eq!(out, big);
}

#[test]
fn transmit_survives_bad_buffers_and_broken_output() {
    let mem = test_memory();
    let mut out = Vec::new();
    // Buffers outside guest memory are skipped; output errors are reported to the caller.
    transmit_one(&mut out, &mem, &[readable(0x4000_0000, 16)]).unwrap();
    assert!(out.is_empty());
    assert!(transmit_one(&mut BrokenWriter, &mem, &[readable(0x10_000, 16)]).is_err());
}

#[test]
fn input_is_split_over_receive_buffers() {
    let mem = test_memory();
    let tq = TestQueue::new(&mem, 16);
    tq.add_chain(&[writable(0x10_000, 4)]);
    tq.add_chain(&[writable(0x20_000, 8), writable(0x30_000, 8)]);
    let (mut rx, interrupt) = tq.device_queue(false);
    let pending = pending_of(b"0123456789");
    deliver_input(&mut rx, &mem, interrupt.as_ref(), &pending);
    assert!(pending.lock().unwrap().is_empty());
    assert_eq!(tq.used(&mem), vec![(0, 4), (1, 6)]);
    assert_eq!(guest_bytes(&mem, 0x10_000, 4), b"0123");
    assert_eq!(guest_bytes(&mem, 0x20_000, 6), b"456789");
    assert_eq!(interrupt.count(0), 1);
}

#[test]
fn input_waits_for_buffers_instead_of_being_dropped() {
    let mem = test_memory();
    let tq = TestQueue::new(&mem, 16);
    let (mut rx, interrupt) = tq.device_queue(true);
    let pending = pending_of(b"abc");
    deliver_input(&mut rx, &mem, interrupt.as_ref(), &pending);
    assert_eq!(pending.lock().unwrap().len(), 3);
    assert!(tq.used(&mem).is_empty());

    // A chain without writable bytes is returned empty and the input keeps waiting.
    tq.add_chain(&[readable(0x10_000, 4)]);
    deliver_input(&mut rx, &mem, interrupt.as_ref(), &pending);
    assert_eq!(tq.used(&mem), vec![(0, 0)]);
    assert_eq!(pending.lock().unwrap().len(), 3);

    tq.add_chain(&[writable(0x20_000, 2)]);
    tq.add_chain(&[writable(0x30_000, 2)]);
    deliver_input(&mut rx, &mem, interrupt.as_ref(), &pending);
    assert_eq!(tq.used(&mem), vec![(0, 0), (1, 2), (2, 1)]);
    assert_eq!(guest_bytes(&mem, 0x20_000, 2), b"ab");
    assert_eq!(guest_bytes(&mem, 0x30_000, 1), b"c");
}

#[test]
fn chains_that_take_no_input_cannot_hold_the_worker() {
    // A guest that keeps publishing receive chains without a writable byte: one pass serves
    // CHAINS_PER_PASS of them, then kicks its own queue to come back through epoll.
    let mem = test_memory();
    let tq = TestQueue::new(&mem, 1024);
    tq.store_desc(0, readable(0x10_000, 4));
    for _ in 0..300 {
        tq.publish(&mem, 0);
    }
    let (mut rx, interrupt) = tq.device_queue(false);
    let pending = pending_of(b"abc");
    deliver_input(&mut rx, &mem, interrupt.as_ref(), &pending);
    assert_eq!(tq.used(&mem).len(), CHAINS_PER_PASS);
    assert_eq!(rx.kick.read().unwrap(), 1);
    assert_eq!(pending.lock().unwrap().len(), 3);
    // The next pass (the kick) serves the rest.
    deliver_input(&mut rx, &mem, interrupt.as_ref(), &pending);
    assert_eq!(tq.used(&mem).len(), 300);
}

#[test]
fn push_is_bounded() {
    let console = Console::new(Box::new(Vec::new())).unwrap();
    let input = console.input();
    assert_eq!(
        input.push(&vec![b'x'; INPUT_BUFFER_LIMIT - 1]),
        INPUT_BUFFER_LIMIT - 1
    );
    assert_eq!(input.push(b"yz"), 1);
    assert_eq!(input.push(b"z"), 0);
    assert_eq!(input.pending(), INPUT_BUFFER_LIMIT);
    let mut config = [0xffu8; 4];
    console.read_config(0, &mut config);
    assert_eq!(config, [0; 4], "cols and rows are 0");
}

#[test]
fn worker_moves_output_and_input_and_reactivates() {
    let mem = test_memory();
    let output = SharedWriter::default();
    let mut console = Console::new(Box::new(output.clone())).unwrap();
    let input = console.input();
    // Input typed before the driver is up is delivered once it is.
    input.push(b"early ");
    for (round, base) in [0x0u64, 0x8000].into_iter().enumerate() {
        let rxq = TestQueue::at(&mem, GuestAddress(base), 16);
        let txq = TestQueue::at(&mem, GuestAddress(base + 0x2000), 16);
        let (rx_active, tx_active) = (rxq.active_queue(0), txq.active_queue(1));
        let (rx_kick, tx_kick) = (
            rx_active.kick.try_clone().unwrap(),
            tx_active.kick.try_clone().unwrap(),
        );
        let interrupt = Arc::new(RecordingInterrupt::default());
        let features = console.features();
        console
            .activate(activation(
                &mem,
                &interrupt,
                vec![rx_active, tx_active],
                features,
            ))
            .unwrap();

        mem.write_slice(b"from guest", GuestAddress(0x50_000))
            .unwrap();
        txq.add_chain(&[readable(0x50_000, 10)]);
        tx_kick.write(1).unwrap();
        assert!(interrupt.wait_for(1, 1));
        assert_eq!(txq.used(&mem), vec![(0, 0)]);

        input.push(b"typed");
        rxq.add_chain(&[writable(0x60_000, 64)]);
        rx_kick.write(1).unwrap();
        assert!(interrupt.wait_for(0, 1));
        let want: &[u8] = if round == 0 { b"early typed" } else { b"typed" };
        assert_eq!(rxq.used(&mem), vec![(0, want.len() as u32)]);
        assert_eq!(guest_bytes(&mem, 0x60_000, want.len()), want);
        console.reset();
    }
    assert!(eventually(|| output.contents() == b"from guestfrom guest"));
    assert_eq!(input.pending(), 0);
}

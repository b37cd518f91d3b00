//! The device around the dispatcher: its config space, construction errors, and requests
//! through real queues, broken chains included.

use std::sync::Arc;

use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::abi::{self, request};
use super::tests::{init_body, name, share};
use super::*;
use crate::testing::{RecordingInterrupt, TestQueue, activation, readable, test_memory, writable};

#[test]
fn config_space_and_construction() {
    let dir = share();
    let fs = Fs::new(FsConfig::new(dir.as_path(), DEFAULT_TAG)).unwrap();
    let mut tag = [0u8; 40];
    fs.read_config(0, &mut tag);
    assert_eq!(&tag[..6], b"hostfs");
    assert_eq!(&tag[6..36], &[0; 30]);
    assert_eq!(&tag[36..], &1u32.to_le_bytes());
    assert_eq!(fs.device_type(), VIRTIO_ID_FS);
    assert_eq!(fs.queue_max_sizes().len(), 2);
    for bad in ["", "a\0b", &"t".repeat(37)] {
        let err = Fs::new(FsConfig::new(dir.as_path(), bad)).unwrap_err();
        assert!(matches!(err, FsError::Tag(_)), "{bad:?}");
    }
    let err = Fs::new(FsConfig::new(dir.as_path().join("file"), "t")).unwrap_err();
    assert!(matches!(err, FsError::NotADirectory(_)));
    let err = Fs::new(FsConfig::new(dir.as_path().join("missing"), "t")).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn the_device_serves_both_queues_and_drops_broken_chains() {
    let dir = share();
    let mem = test_memory();
    let mut fs = Fs::new(FsConfig::new(dir.as_path(), "t")).unwrap();
    let hiprio = TestQueue::at(&mem, GuestAddress(0), 16);
    let requests = TestQueue::at(&mem, GuestAddress(0x8000), 16);
    let interrupt = Arc::new(RecordingInterrupt::default());
    let queues = vec![hiprio.active_queue(0), requests.active_queue(1)];
    // Without EVENT_IDX every used buffer interrupts, which is what the test waits for.
    let features = 1 << virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
    fs.activate(activation(&mem, &interrupt, queues, features))
        .unwrap();
    let send =
        |tq: &TestQueue, queue: u16, input: &[u8], descs: &[virtio_queue::desc::RawDescriptor]| {
            mem.write_slice(input, GuestAddress(0x10_000)).unwrap();
            let before = interrupt.count(queue);
            tq.add_chain(descs);
            tq.kick();
            assert!(interrupt.wait_for(queue, before + 1));
        };
    // INIT, split over two readable descriptors; the reply over two writable ones.
    let init = request(abi::INIT, 0, 1, &init_body(7, 31, 0));
    send(
        &requests,
        1,
        &init,
        &[
            readable(0x10_000, 20),
            readable(0x10_014, init.len() as u32 - 20),
            writable(0x20_000, 30),
            writable(0x30_000, 200),
        ],
    );
    assert_eq!(requests.used(&mem), vec![(0, 80)]);
    let lookup = request(abi::LOOKUP, 1, 2, &name("file"));
    send(
        &requests,
        1,
        &lookup,
        &[
            readable(0x10_000, lookup.len() as u32),
            writable(0x20_000, 4096),
        ],
    );
    let mut header = abi::OutHeader::default();
    mem.read_slice(header.as_mut_slice(), GuestAddress(0x20_000))
        .unwrap();
    assert_eq!((header.error, header.unique, header.len), (0, 2, 144));
    // Broken chains: no readable part, no writable part, a header cut short, memory that is
    // not there. Each is used with nothing written and the queue goes on.
    send(&requests, 1, &lookup, &[writable(0x20_000, 4096)]);
    send(
        &requests,
        1,
        &lookup,
        &[readable(0x10_000, lookup.len() as u32)],
    );
    send(
        &requests,
        1,
        &lookup,
        &[readable(0x10_000, 20), writable(0x20_000, 4096)],
    );
    send(
        &requests,
        1,
        &lookup,
        &[readable(0x40_0000_0000, 64), writable(0x20_000, 4096)],
    );
    send(
        &requests,
        1,
        &lookup,
        &[
            readable(0x10_000, lookup.len() as u32),
            writable(0xff_fff8, 4096),
        ],
    );
    let used = requests.used(&mem);
    assert_eq!(
        used[2..].iter().map(|u| u.1).collect::<Vec<_>>(),
        [0, 0, 0, 0, 0]
    );
    // FORGET on the hiprio queue: used, nothing written.
    let forget = request(abi::FORGET, 2, 3, &1u64.to_le_bytes());
    send(
        &hiprio,
        0,
        &forget,
        &[readable(0x10_000, forget.len() as u32)],
    );
    assert_eq!(hiprio.used(&mem), vec![(0, 0)]);
    fs.reset();
}

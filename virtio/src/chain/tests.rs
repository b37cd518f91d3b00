use super::*;

/// A segment list as split_chain builds it (empty segments dropped).
fn list(parts: &[(u64, u64)]) -> Vec<Segment> {
    let mut list = Vec::new();
    for &(addr, len) in parts {
        push_segment(&mut list, GuestAddress(addr), len);
    }
    list
}

fn whole(list: &[Segment]) -> Segments<'_> {
    Segments::whole(list, list.iter().map(|s| s.len).sum())
}

#[test]
fn take_front_and_back_split_segments() {
    let all = list(&[(0x1000, 10), (0x2000, 0), (0x3000, 6)]);
    let mut s = whole(&all);
    assert_eq!(s.len(), 16);
    let front = s.take_front(12).unwrap();
    assert_eq!(front, whole(&list(&[(0x1000, 10), (0x3000, 2)])));
    assert_eq!(s, whole(&list(&[(0x3002, 4)])));
    let back = s.take_back(1).unwrap();
    assert_eq!(back, whole(&list(&[(0x3005, 1)])));
    assert_eq!(s, whole(&list(&[(0x3002, 3)])));
    assert!(s.take_front(4).is_none());
    assert!(s.take_back(4).is_none());
    assert_eq!(s.len(), 3);
}

#[test]
fn cuts_keep_counts_and_sizes_of_what_is_left() {
    let all = list(&[(0x1000, 16), (0x2000, 100), (0x3000, 50), (0x4000, 1)]);
    let mut s = whole(&all);
    // A status byte, a header, and cuts on a segment boundary and inside one.
    assert_eq!(s.take_back(1).unwrap(), whole(&list(&[(0x4000, 1)])));
    assert_eq!(s.take_front(16).unwrap(), whole(&list(&[(0x1000, 16)])));
    assert_eq!((s.count(), s.largest(), s.len()), (2, 100, 150));
    assert_eq!(s.take_front(0).unwrap(), Segments::default());
    assert_eq!(s.take_back(0).unwrap(), Segments::default());
    let mut middle = s.take_front(120).unwrap();
    assert_eq!(middle, whole(&list(&[(0x2000, 100), (0x3000, 20)])));
    assert_eq!(s, whole(&list(&[(0x3014, 30)])));
    // Trimming both ends of one segment.
    assert_eq!(s.take_back(10).unwrap(), whole(&list(&[(0x3028, 10)])));
    assert_eq!(s.take_front(5).unwrap(), whole(&list(&[(0x3014, 5)])));
    assert_eq!(s, whole(&list(&[(0x3019, 15)])));
    assert_eq!((s.count(), s.largest()), (1, 15));
    assert_eq!(
        middle.take_back(120).unwrap(),
        whole(&list(&[(0x2000, 100), (0x3000, 20)]))
    );
    assert!(middle.is_empty());
    assert_eq!((middle.count(), middle.largest()), (0, 0));
}

#[test]
fn copies_across_segments() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let all = list(&[(0x100, 3), (0x200, 5)]);
    let s = whole(&all);
    assert_eq!(s.write_from(&mem, b"abcdefghij").unwrap(), 8);
    let mut buf = [0u8; 8];
    s.read_into(&mem, &mut buf).unwrap();
    assert_eq!(&buf, b"abcdefgh");
    let mut too_big = [0u8; 9];
    assert!(matches!(
        s.read_into(&mem, &mut too_big),
        Err(ChainError::TooShort { have: 8, need: 9 })
    ));
    // A cut view copies only its own bytes.
    let mut tail = s;
    let head = tail.take_front(2).unwrap();
    let mut two = [0u8; 2];
    head.read_into(&mem, &mut two).unwrap();
    assert_eq!(&two, b"ab");
    assert_eq!(tail.write_from(&mem, b"XYZW").unwrap(), 4);
    s.read_into(&mem, &mut buf).unwrap();
    assert_eq!(&buf, b"abXYZWgh");
    // Outside guest memory.
    let bad = list(&[(0xfff0, 0x20)]);
    let mut scratch = IovecScratch::default();
    assert!(
        whole(&bad)
            .iovecs(&mem, Permissions::Read, &mut scratch)
            .is_err()
    );
    assert!(scratch.iovecs.is_empty() && scratch.guards.is_empty());
}

#[test]
fn iovecs_cover_the_view_and_are_cleared_after_use() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let all = list(&[(0x100, 16), (0x200, 8)]);
    let mut s = whole(&all);
    s.take_front(4).unwrap();
    s.take_back(2).unwrap();
    let mut scratch = IovecScratch::default();
    {
        let iovecs = s.iovecs(&mem, Permissions::Read, &mut scratch).unwrap();
        let host =
            vm_memory::GuestMemoryBackend::get_host_address(&mem, GuestAddress(0x104)).unwrap();
        let lens: Vec<usize> = iovecs.scratch.iovecs.iter().map(|v| v.iov_len).collect();
        assert_eq!(lens, [12, 6]);
        assert_eq!(iovecs.scratch.iovecs[0].iov_base.cast::<u8>(), host);
    }
    assert!(scratch.iovecs.is_empty() && scratch.guards.is_empty());
}

/// Writes into the guest (received frames, console input, vsock packets: `write_from`; disk
/// reads: iovecs for `Write`) mark their pages when the memory is tracked; reads do not.
#[test]
fn guest_writes_mark_their_pages_and_reads_do_not() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let log = crate::dirty::DirtyLog::track(&mem);
    let all = list(&[(0x1ffe, 4), (0x5000, 8)]);
    let s = whole(&all);
    assert_eq!(s.write_from(&mem, b"abcdef").unwrap(), 6);
    assert_eq!(crate::dirty::tests::pages(&log, 0), [1, 2, 5]);
    let mut buf = [0u8; 12];
    s.read_into(&mem, &mut buf).unwrap();
    let mut scratch = IovecScratch::default();
    let other = list(&[(0x8000, 4)]);
    drop(
        whole(&other)
            .iovecs(&mem, Permissions::Read, &mut scratch)
            .unwrap(),
    );
    assert!(crate::dirty::tests::pages(&log, 0).is_empty());
    drop(
        whole(&other)
            .iovecs(&mem, Permissions::Write, &mut scratch)
            .unwrap(),
    );
    assert_eq!(crate::dirty::tests::pages(&log, 0), [8]);
}

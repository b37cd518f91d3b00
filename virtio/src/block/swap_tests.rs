//! A new backing file under a paused worker ([`DiskSwap`]).

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::testing::{RecordingInterrupt, TestQueue, activation, readable, test_memory, writable};

const HEADER: u64 = 0x10_000;
const DATA: u64 = 0x20_000;
const STATUS: u64 = 0xf0_000;

/// A temp image of `sectors` sectors, every byte `fill`.
fn image(sectors: u64, fill: u8) -> TempFile {
    let tmp = TempFile::new().unwrap();
    let bytes = vec![fill; (sectors * SECTOR_SIZE) as usize];
    tmp.as_file().write_all_at(&bytes, 0).unwrap();
    tmp
}

fn capacity(block: &Block) -> u64 {
    let mut cap = [0u8; 8];
    block.read_config(0, &mut cap);
    u64::from_le_bytes(cap)
}

fn open(tmp: &TempFile, read_only: bool) -> DiskImage {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(tmp.as_path())
        .unwrap();
    DiskImage::from_file(file, tmp.as_path(), read_only).unwrap()
}

#[test]
fn a_swap_under_a_paused_worker_serves_the_new_file_and_its_size() {
    let mem = test_memory();
    let old = image(64, 0x11);
    let new = image(128, 0x22);
    let mut block = Block::new(old.as_path(), false, Some("keep-me")).unwrap();
    let errors = block.errors();
    let tq = TestQueue::at(&mem, GuestAddress(0), 16);
    let active = tq.active_queue(0);
    let kick = active.kick.try_clone().unwrap();
    let interrupt = Arc::new(RecordingInterrupt::default());
    let features = block.features();
    block
        .activate(activation(&mem, &interrupt, vec![active], features))
        .unwrap();
    let read = |sector: u64, want: usize| {
        mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(HEADER))
            .unwrap();
        mem.write_obj(sector, GuestAddress(HEADER + 8)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        tq.add_chain(&[
            readable(HEADER, 16),
            writable(DATA, 512),
            writable(STATUS, 1),
        ]);
        kick.write(1).unwrap();
        // With EVENT_IDX the worker need not interrupt again: wait for the used entry.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while tq.used(&mem).len() < want && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(tq.used(&mem).len(), want, "the worker served nothing");
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap() as u32,
            VIRTIO_BLK_S_OK
        );
        mem.read_obj::<u8>(GuestAddress(DATA + 100)).unwrap()
    };
    assert_eq!(read(1, 1), 0x11);
    assert_eq!(capacity(&block), 64);

    block.pause().unwrap();
    block.disk_swap().stage(open(&new, false));
    // Staged, not taken: the paused device still reports the old disk.
    assert_eq!(capacity(&block), 64);
    block.resume().unwrap();
    assert_eq!(capacity(&block), 128);
    assert_eq!(block.capacity_sectors(), 128);
    // The worker reads the new file, past the old one's end too.
    assert_eq!(read(100, 2), 0x22);
    // The serial and the failure counts stay the disk's.
    assert_eq!(&block.disk.id[..7], b"keep-me");
    assert!(Arc::ptr_eq(&errors, &block.errors()));
    // The new file is locked as a writable disk's is; the old one is free again.
    assert!(matches!(
        Block::new(new.as_path(), true, None),
        Err(BlockError::Locked { .. })
    ));
    drop(Block::new(old.as_path(), false, None).unwrap());
    block.reset();
}

#[test]
fn a_swap_before_activation_is_served_from_the_start() {
    let old = image(8, 0x11);
    let new = image(16, 0x33);
    let mut block = Block::new(old.as_path(), true, None).unwrap();
    block.disk_swap().stage(open(&new, true));
    // The driver, which reads the capacity before it starts the device, sees the new one.
    assert_eq!(capacity(&block), 16);
    // Pausing and resuming a device the guest never started takes the image.
    block.pause().unwrap();
    block.resume().unwrap();
    assert_eq!(capacity(&block), 16);
}

#[test]
fn an_image_opened_in_the_other_mode_is_not_taken() {
    let old = image(8, 0x11);
    let new = image(16, 0x33);
    let mut block = Block::new(old.as_path(), false, None).unwrap();
    block.disk_swap().stage(open(&new, true));
    block.pause().unwrap();
    block.resume().unwrap();
    assert_eq!(capacity(&block), 8);
    assert!(!block.is_read_only());
}

#[test]
fn the_drive_s_own_file_reopened_after_growing_keeps_its_lock() {
    let tmp = image(8, 0x44);
    let mut block = Block::new(tmp.as_path(), false, None).unwrap();
    tmp.as_file().set_len(32 * SECTOR_SIZE).unwrap();
    // Opened again: the drive's lock refuses the lock, so the VMM stages it unlocked.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(tmp.as_path())
        .unwrap();
    let reopened = DiskImage::sized(file, tmp.as_path(), false).unwrap();
    block.disk_swap().stage_reopened(reopened);
    block.pause().unwrap();
    block.resume().unwrap();
    assert_eq!(capacity(&block), 32);
    // The file is still locked by the drive.
    assert!(matches!(
        Block::new(tmp.as_path(), true, None),
        Err(BlockError::Locked { .. })
    ));
}

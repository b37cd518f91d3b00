//! The virtio-fs request dispatcher (pvm_virtio::fs::Server) of a read-only share: a session of
//! FUSE requests from the fuzz input against a small host directory ([`share`]): a file, a
//! directory with a file and a subdirectory, a symlink to the file, one to "..", an empty file.
//! Input: records of `u16 room, u16 len, len bytes` (little-endian), each one request whose
//! reply may take `room` bytes; a fresh session per input, with small limits (8 inodes, 2
//! handles) so the limits are reached.
//!
//! Checked: no panic; every reply fits its room and its header's length and unique are right,
//! its error a negated errno; the session never holds more than its limits; and the host file
//! is unchanged afterwards, whatever was sent.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use pvm_virtio::fs::abi::{self, request};
use pvm_virtio::fs::{Fs, FsConfig, Served};

use crate::input::{Input, Output};
use crate::seeds::Seeds;

const MAX_INODES: usize = 8;
const MAX_HANDLES: usize = 2;
/// What the shared file holds.
const FILE: &[u8] = b"0123456789abcdef, read-only\n";
/// fuse_open_in asking for read-write access (O_RDWR), which the share refuses.
const O_RDWR: u64 = 2;

/// This process's shared directory and the device over it.
fn share() -> &'static (PathBuf, Mutex<Fs>) {
    static SHARE: OnceLock<(PathBuf, Mutex<Fs>)> = OnceLock::new();
    SHARE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pvm-fuzz-fs-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("dir/sub")).expect("share directory");
        std::fs::write(dir.join("file"), FILE).expect("shared file");
        std::fs::write(dir.join("dir/inner"), "inner").expect("shared file");
        std::fs::write(dir.join("empty"), "").expect("shared file");
        for (target, link) in [("file", "link"), ("..", "up")] {
            let _ = std::fs::remove_file(dir.join(link));
            std::os::unix::fs::symlink(target, dir.join(link)).expect("symlink");
        }
        let mut config = FsConfig::new(&dir, "fuzz");
        config.max_inodes = MAX_INODES;
        config.max_handles = MAX_HANDLES;
        let fs = Fs::new(config).expect("share");
        (dir, Mutex::new(fs))
    })
}

pub fn virtio_fs(data: &[u8]) {
    let (dir, fs) = share();
    let mut server = fs.lock().unwrap_or_else(|e| e.into_inner()).session();
    let mut input = Input::new(data);
    let mut out = Vec::new();
    while !input.is_empty() {
        let room = usize::from(input.u16());
        let len = usize::from(input.u16());
        let req = input.bytes(len);
        match server.handle(req, room, &mut out) {
            Ok(Served::Reply) => {
                assert!(
                    out.len() <= room,
                    "a reply of {} bytes in {room}",
                    out.len()
                );
                let header: abi::OutHeader = abi::read_full(&out).expect("a reply header");
                assert_eq!(header.len as usize, out.len());
                let sent: abi::InHeader = abi::read_full(req).expect("a request header");
                assert_eq!(header.unique, sent.unique);
                assert!(
                    (-4095..=0).contains(&header.error),
                    "error {}",
                    header.error
                );
            }
            Ok(Served::NoReply) => assert!(out.is_empty()),
            Err(_) => {}
        }
        let (inodes, handles) = server.counts();
        assert!(inodes <= MAX_INODES && handles <= MAX_HANDLES);
    }
    drop(server);
    assert_eq!(std::fs::read(dir.join("file")).expect("shared file"), FILE);
}

/// One record of the input format.
fn record(out: &mut Output, room: u16, req: &[u8]) {
    out.u16(room).u16(req.len() as u16).bytes(req);
}

fn init() -> Vec<u8> {
    let mut body = vec![0u8; 64];
    body[0..4].copy_from_slice(&7u32.to_le_bytes());
    body[4..8].copy_from_slice(&31u32.to_le_bytes());
    body[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    request(abi::INIT, 0, 1, &body)
}

fn name(n: &str) -> Vec<u8> {
    let mut v = n.as_bytes().to_vec();
    v.push(0);
    v
}

/// fuse_read_in (also READDIR's).
fn read_in(fh: u64, offset: u64, size: u32) -> Vec<u8> {
    let mut v = fh.to_le_bytes().to_vec();
    v.extend_from_slice(&offset.to_le_bytes());
    v.extend_from_slice(&size.to_le_bytes());
    v.extend_from_slice(&[0; 20]);
    v
}

fn session(requests: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut out = Output::default();
    record(&mut out, 4096, &init());
    for (room, req) in requests {
        record(&mut out, *room, req);
    }
    out.data
}

pub fn seeds() -> Seeds {
    let open_ro = 0u64.to_le_bytes();
    // Node 2 is the first name looked up, handles count from 1.
    let read_file = session(&[
        (4096, request(abi::LOOKUP, 1, 2, &name("file"))),
        (4096, request(abi::GETATTR, 2, 3, &[0; 16])),
        (4096, request(abi::OPEN, 2, 4, &open_ro)),
        (4096, request(abi::READ, 2, 5, &read_in(1, 0, 4096))),
        (20, request(abi::READ, 2, 6, &read_in(1, 3, 4096))),
        (4096, request(abi::FLUSH, 2, 7, &read_in(1, 0, 0))),
        (4096, request(abi::RELEASE, 2, 8, &read_in(1, 0, 0))),
        (0, request(abi::FORGET, 2, 9, &1u64.to_le_bytes())),
    ]);
    let list = session(&[
        // Looked up before READDIRPLUS, whose entries come in the host's order.
        (4096, request(abi::LOOKUP, 1, 2, &name("dir"))),
        (4096, request(abi::LOOKUP, 2, 3, &name("sub"))),
        (4096, request(abi::OPENDIR, 1, 4, &open_ro)),
        (4096, request(abi::READDIR, 1, 5, &read_in(1, 0, 4096))),
        (4096, request(abi::READDIRPLUS, 1, 6, &read_in(1, 0, 4096))),
        (200, request(abi::READDIRPLUS, 1, 7, &read_in(1, 0, 4096))),
        (4096, request(abi::STATFS, 1, 8, &[])),
        (4096, request(abi::RELEASEDIR, 1, 9, &read_in(1, 0, 0))),
    ]);
    let links = session(&[
        (4096, request(abi::LOOKUP, 1, 2, &name("link"))),
        (4096, request(abi::READLINK, 2, 3, &[])),
        (4096, request(abi::LOOKUP, 1, 4, &name("up"))),
        (4096, request(abi::LOOKUP, 3, 5, &name("file"))),
        (4096, request(abi::LOOKUP, 1, 6, &name(".."))),
        (4096, request(abi::LOOKUP, 1, 7, &name("dir/inner"))),
        (4096, request(abi::OPEN, 2, 8, &open_ro)),
    ]);
    let writes = session(&[
        (4096, request(abi::LOOKUP, 1, 2, &name("file"))),
        (4096, request(abi::OPEN, 2, 3, &O_RDWR.to_le_bytes())),
        (4096, request(abi::WRITE, 2, 4, &read_in(1, 0, 4))),
        (4096, request(abi::SETATTR, 2, 5, &[0; 88])),
        (4096, request(abi::CREATE, 1, 6, &name("new"))),
        (4096, request(abi::UNLINK, 1, 7, &name("file"))),
        (4096, request(abi::RENAME2, 1, 8, &name("file"))),
    ]);
    let mut forgets = Vec::new();
    let mut batch = 3u32.to_le_bytes().to_vec();
    batch.extend_from_slice(&[0; 4]);
    for node in 2u64..5 {
        batch.extend_from_slice(&node.to_le_bytes());
        batch.extend_from_slice(&1u64.to_le_bytes());
    }
    for (i, n) in ["file", "dir", "empty", "link"].into_iter().enumerate() {
        forgets.push((4096, request(abi::LOOKUP, 1, i as u64 + 2, &name(n))));
    }
    forgets.push((0, request(abi::BATCH_FORGET, 0, 9, &batch)));
    forgets.push((4096, request(abi::DESTROY, 0, 10, &[])));
    let forgets = session(&forgets);
    vec![
        ("read-file", read_file),
        ("list", list),
        ("links", links),
        ("writes", writes),
        ("forgets", forgets),
    ]
}

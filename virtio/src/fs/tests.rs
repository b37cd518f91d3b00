use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Arc;

use vm_memory::ByteValued;
use vmm_sys_util::tempdir::TempDir;

use super::abi::{self, request};
use super::*;

/// A share of: `file` ("hello, world\n"), `sub/inner`, `link` -> `file`, `out` -> `/`.
pub(super) fn share() -> TempDir {
    let dir = TempDir::new_with_prefix("/tmp/pvm-fs-").unwrap();
    let root = dir.as_path();
    fs::write(root.join("file"), "hello, world\n").unwrap();
    fs::create_dir(root.join("sub")).unwrap();
    fs::write(root.join("sub/inner"), "inner").unwrap();
    symlink("file", root.join("link")).unwrap();
    symlink("/", root.join("out")).unwrap();
    dir
}

fn server_on(root: &Path, max_inodes: usize, max_handles: usize) -> Server {
    let mut config = FsConfig::new(root, "t");
    config.max_inodes = max_inodes;
    config.max_handles = max_handles;
    let fs = Fs::new(config).unwrap();
    let mut server = Server::new(Arc::clone(&fs.root));
    let reply = call(&mut server, abi::INIT, 0, &init_body(7, 31, u32::MAX));
    assert_eq!(reply.error, 0);
    server
}

pub(super) fn init_body(major: u32, minor: u32, flags: u32) -> Vec<u8> {
    let init = abi::InitIn {
        major,
        minor,
        max_readahead: 1 << 20,
        flags,
        ..Default::default()
    };
    init.as_slice().to_vec()
}

struct Reply {
    error: i32,
    unique: u64,
    body: Vec<u8>,
}

/// Sends one request with a roomy reply buffer.
fn call(server: &mut Server, opcode: u32, node: u64, body: &[u8]) -> Reply {
    call_raw(server, &request(opcode, node, 77, body), 1 << 20)
}

fn call_raw(server: &mut Server, input: &[u8], room: usize) -> Reply {
    let mut out = Vec::new();
    assert_eq!(server.handle(input, room, &mut out), Ok(Served::Reply));
    assert!(out.len() <= room, "reply larger than its buffers");
    let header: abi::OutHeader = abi::read_full(&out).unwrap();
    assert_eq!(header.len as usize, out.len());
    Reply {
        error: -header.error,
        unique: header.unique,
        body: out[16..].to_vec(),
    }
}

pub(super) fn name(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn lookup(server: &mut Server, parent: u64, n: &str) -> Result<abi::EntryOut, i32> {
    let reply = call(server, abi::LOOKUP, parent, &name(n));
    match reply.error {
        0 => Ok(abi::read_full(&reply.body).unwrap()),
        e => Err(e),
    }
}

fn open(server: &mut Server, node: u64, op: u32, flags: i32) -> Result<u64, i32> {
    let arg = abi::OpenIn {
        flags: flags as u32,
        open_flags: 0,
    };
    let reply = call(server, op, node, arg.as_slice());
    match reply.error {
        0 => Ok(abi::read_full::<abi::OpenOut>(&reply.body).unwrap().fh),
        e => Err(e),
    }
}

fn read_arg(fh: u64, offset: u64, size: u32) -> Vec<u8> {
    abi::ReadIn {
        fh,
        offset,
        size,
        ..Default::default()
    }
    .as_slice()
    .to_vec()
}

/// The names (and node IDs, for READDIRPLUS) of one directory reply.
fn dirents(body: &[u8], plus: bool) -> Vec<(String, u64, u64)> {
    let mut at = 0;
    let mut names = Vec::new();
    while at < body.len() {
        let mut node = 0;
        if plus {
            node = abi::read_full::<abi::EntryOut>(&body[at..]).unwrap().nodeid;
            at += 128;
        }
        let d: abi::Dirent = abi::read_full(&body[at..]).unwrap();
        let n = &body[at + 24..at + 24 + d.namelen as usize];
        names.push((String::from_utf8(n.to_vec()).unwrap(), node, d.off));
        at += (24 + d.namelen as usize).next_multiple_of(8);
    }
    names
}

#[test]
fn init_grants_only_what_both_sides_know() {
    let dir = share();
    let fs = Fs::new(FsConfig::new(dir.as_path(), "t")).unwrap();
    let mut server = Server::new(Arc::clone(&fs.root));
    // Nothing before INIT.
    assert_eq!(
        call(&mut server, abi::GETATTR, 1, &[0; 16]).error,
        libc::EIO
    );
    let reply = call(&mut server, abi::INIT, 0, &init_body(7, 38, u32::MAX));
    assert_eq!((reply.error, reply.unique), (0, 77));
    let out: abi::InitOut = abi::read_full(&reply.body).unwrap();
    assert_eq!((out.major, out.minor), (7, 31));
    // No DAX (MAP_ALIGNMENT), no writeback cache, no INIT_EXT.
    assert_eq!(out.flags & (1 << 26 | 1 << 16 | 1 << 30), 0);
    assert_ne!(out.flags & abi::DO_READDIRPLUS, 0);
    // Only what the driver asked for; an old driver gets the short reply.
    let reply = call(
        &mut server,
        abi::INIT,
        0,
        &init_body(7, 22, abi::ASYNC_READ),
    );
    assert_eq!(reply.body.len(), abi::COMPAT_22_INIT_OUT_SIZE);
    let out: abi::InitOut = abi::read_struct(&reply.body, 24).unwrap();
    assert_eq!((out.minor, out.flags), (22, abi::ASYNC_READ));
    // A newer major is told ours; an older one is refused; a 4-byte INIT is malformed.
    let reply = call(&mut server, abi::INIT, 0, &init_body(8, 0, 0));
    assert_eq!(
        abi::read_struct::<abi::InitOut>(&reply.body, 8)
            .unwrap()
            .major,
        7
    );
    assert_eq!(
        call(&mut server, abi::INIT, 0, &init_body(6, 0, 0)).error,
        libc::EPROTO
    );
    assert_eq!(
        call(&mut server, abi::INIT, 0, &[7, 0, 0, 0]).error,
        libc::EINVAL
    );
    // DESTROY ends the session.
    assert_eq!(call(&mut server, abi::DESTROY, 0, &[]).error, 0);
    assert_eq!(
        call(&mut server, abi::GETATTR, 1, &[0; 16]).error,
        libc::EIO
    );
}

#[test]
fn lookup_getattr_open_read() {
    let dir = share();
    let mut server = server_on(dir.as_path(), 100, 100);
    let file = lookup(&mut server, abi::ROOT_ID, "file").unwrap();
    assert_eq!(file.attr.size, 13);
    assert_eq!(file.attr.mode & libc::S_IFMT, libc::S_IFREG);
    let reply = call(&mut server, abi::GETATTR, file.nodeid, &[0; 16]);
    let attr: abi::AttrOut = abi::read_full(&reply.body).unwrap();
    assert_eq!(attr.attr, file.attr);
    // The same file looked up again is the same node.
    assert_eq!(lookup(&mut server, 1, "file").unwrap().nodeid, file.nodeid);
    let fh = open(&mut server, file.nodeid, abi::OPEN, libc::O_RDONLY).unwrap();
    let reply = call(&mut server, abi::READ, 0, &read_arg(fh, 0, 4096));
    assert_eq!(reply.body, b"hello, world\n");
    let reply = call(&mut server, abi::READ, 0, &read_arg(fh, 7, 3));
    assert_eq!(reply.body, b"wor");
    assert!(
        call(&mut server, abi::READ, 0, &read_arg(fh, 1 << 40, 10))
            .body
            .is_empty()
    );
    // A read is cut to the reply buffers: 16 bytes of header and 5 of data.
    let reply = call_raw(
        &mut server,
        &request(abi::READ, 0, 1, &read_arg(fh, 0, 4096)),
        21,
    );
    assert_eq!(reply.body, b"hello");
    assert_eq!(
        call(&mut server, abi::FLUSH, file.nodeid, &read_arg(fh, 0, 0)).error,
        0
    );
    let release = abi::ReleaseIn {
        fh,
        ..Default::default()
    };
    assert_eq!(
        call(&mut server, abi::RELEASE, 0, release.as_slice()).error,
        0
    );
    assert_eq!(
        call(&mut server, abi::READ, 0, &read_arg(fh, 0, 1)).error,
        libc::EBADF
    );
    let sub = lookup(&mut server, 1, "sub").unwrap();
    let inner = lookup(&mut server, sub.nodeid, "inner").unwrap();
    assert_eq!(inner.attr.size, 5);
    assert_eq!(lookup(&mut server, 1, "missing").unwrap_err(), libc::ENOENT);
    let reply = call(&mut server, abi::STATFS, 1, &[]);
    assert_eq!(reply.error, 0);
    assert!(abi::read_full::<abi::Kstatfs>(&reply.body).unwrap().bsize > 0);
}

#[test]
fn readdir_and_readdirplus_list_the_directory() {
    let dir = share();
    let mut server = server_on(dir.as_path(), 100, 100);
    let fh = open(
        &mut server,
        1,
        abi::OPENDIR,
        libc::O_RDONLY | libc::O_DIRECTORY,
    )
    .unwrap();
    let reply = call(&mut server, abi::READDIR, 1, &read_arg(fh, 0, 4096));
    let mut names: Vec<String> = dirents(&reply.body, false)
        .into_iter()
        .map(|d| d.0)
        .collect();
    names.sort();
    assert_eq!(names, [".", "..", "file", "link", "out", "sub"]);
    // Resuming at an entry's offset gives the entries after it; the end is an empty reply.
    let all = dirents(&reply.body, false);
    let reply = call(&mut server, abi::READDIR, 1, &read_arg(fh, all[1].2, 4096));
    assert_eq!(dirents(&reply.body, false), all[2..]);
    let last = all.last().unwrap().2;
    assert!(
        call(&mut server, abi::READDIR, 1, &read_arg(fh, last, 4096))
            .body
            .is_empty()
    );
    // A small buffer takes what fits; too small for one entry is an error.
    let reply = call(&mut server, abi::READDIR, 1, &read_arg(fh, 0, 64));
    assert!(!dirents(&reply.body, false).is_empty() && reply.body.len() <= 64);
    assert_eq!(
        call(&mut server, abi::READDIR, 1, &read_arg(fh, 0, 8)).error,
        libc::EINVAL
    );
    // READDIRPLUS looks every entry up but "." and "..".
    let reply = call(&mut server, abi::READDIRPLUS, 1, &read_arg(fh, 0, 4096));
    let plus = dirents(&reply.body, true);
    assert_eq!(plus.len(), 6);
    for (n, node, _) in &plus {
        assert_eq!(*node == 0, n == "." || n == "..", "{n}");
    }
    assert_eq!(server.counts().0, 4);
    // Each entry counted one lookup: one FORGET each frees them all.
    for (_, node, _) in plus.iter().filter(|d| d.1 != 0) {
        let mut out = Vec::new();
        let forget = request(abi::FORGET, *node, 0, &1u64.to_le_bytes());
        assert_eq!(server.handle(&forget, 0, &mut out), Ok(Served::NoReply));
    }
    assert_eq!(server.counts().0, 0);
    // READ on a directory handle, READDIR on a file handle.
    assert_eq!(
        call(&mut server, abi::READ, 0, &read_arg(fh, 0, 10)).error,
        libc::EISDIR
    );
    let file = lookup(&mut server, 1, "file").unwrap().nodeid;
    let ffh = open(&mut server, file, abi::OPEN, libc::O_RDONLY).unwrap();
    assert_eq!(
        call(&mut server, abi::READDIR, 1, &read_arg(ffh, 0, 4096)).error,
        libc::ENOTDIR
    );
    assert_eq!(open(&mut server, file, abi::OPENDIR, 0), Err(libc::ENOTDIR));
    assert_eq!(open(&mut server, 1, abi::OPEN, 0), Err(libc::EISDIR));
}

#[test]
fn symlinks_are_read_never_followed() {
    let dir = share();
    let mut server = server_on(dir.as_path(), 100, 100);
    let link = lookup(&mut server, 1, "link").unwrap();
    assert_eq!(link.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(
        call(&mut server, abi::READLINK, link.nodeid, &[]).body,
        b"file"
    );
    // The link itself cannot be opened, and a link to / is no way out.
    assert_eq!(
        open(&mut server, link.nodeid, abi::OPEN, 0),
        Err(libc::EACCES)
    );
    let out = lookup(&mut server, 1, "out").unwrap();
    assert_eq!(
        lookup(&mut server, out.nodeid, "etc").unwrap_err(),
        libc::ENOTDIR
    );
    assert_eq!(
        open(&mut server, out.nodeid, abi::OPENDIR, 0),
        Err(libc::ENOTDIR)
    );
    // READLINK of a non-link.
    assert_ne!(call(&mut server, abi::READLINK, 1, &[]).error, 0);
}

#[test]
fn names_that_leave_the_directory_are_refused() {
    let dir = share();
    let mut server = server_on(dir.as_path(), 100, 100);
    let sub = lookup(&mut server, 1, "sub").unwrap().nodeid;
    for bad in [
        "..",
        ".",
        "",
        "sub/inner",
        "../file",
        "/etc",
        &"x".repeat(256),
    ] {
        assert_eq!(
            lookup(&mut server, sub, bad).unwrap_err(),
            libc::EINVAL,
            "{bad:?}"
        );
        assert_eq!(
            lookup(&mut server, 1, bad).unwrap_err(),
            libc::EINVAL,
            "{bad:?}"
        );
    }
    // A name without its NUL, and nodes the guest never got.
    assert_eq!(
        call(&mut server, abi::LOOKUP, 1, b"file").error,
        libc::EINVAL
    );
    assert_eq!(lookup(&mut server, 999, "file").unwrap_err(), libc::ESTALE);
    assert_eq!(call(&mut server, abi::GETATTR, 0, &[]).error, libc::ESTALE);
    assert_eq!(server.counts(), (1, 0));
}

#[test]
fn every_write_is_refused_and_the_host_stays_as_it_was() {
    let dir = share();
    let mut server = server_on(dir.as_path(), 100, 100);
    let file = lookup(&mut server, 1, "file").unwrap().nodeid;
    for &op in abi::WRITE_OPS {
        // Whatever the arguments: a plausible name, a long body, nothing.
        for body in [name("new"), vec![0xff; 4096], Vec::new()] {
            assert_eq!(
                call(&mut server, op, file, &body).error,
                libc::EROFS,
                "op {op}"
            );
            assert_eq!(
                call(&mut server, op, 1, &body).error,
                libc::EROFS,
                "op {op}"
            );
        }
    }
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        assert_eq!(open(&mut server, file, abi::OPEN, flags), Err(libc::EROFS));
    }
    let w_ok = abi::AccessIn {
        mask: libc::W_OK as u32,
        padding: 0,
    };
    assert_eq!(
        call(&mut server, abi::ACCESS, file, w_ok.as_slice()).error,
        libc::EROFS
    );
    let r_ok = abi::AccessIn {
        mask: libc::R_OK as u32,
        padding: 0,
    };
    assert_eq!(
        call(&mut server, abi::ACCESS, file, r_ok.as_slice()).error,
        0
    );
    // A handle opened read-only cannot be written through the fd either.
    let fh = open(&mut server, file, abi::OPEN, libc::O_RDONLY).unwrap();
    let Ok(inodes::Handle::File(f)) = server.inodes.handle(fh).map(|h| match h {
        inodes::Handle::File(f) | inodes::Handle::Dir(f) => {
            inodes::Handle::File(f.try_clone().unwrap())
        }
    }) else {
        panic!("a file handle")
    };
    assert!(std::os::unix::fs::FileExt::write_at(&f, b"x", 0).is_err());
    assert_eq!(
        fs::read(dir.as_path().join("file")).unwrap(),
        b"hello, world\n"
    );
    let mut names: Vec<_> = fs::read_dir(dir.as_path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["file", "link", "out", "sub"]);
}

#[test]
fn inodes_and_handles_are_bounded() {
    let dir = share();
    for i in 0..8 {
        fs::write(dir.as_path().join(format!("f{i}")), "x").unwrap();
    }
    let mut server = server_on(dir.as_path(), 4, 2);
    let mut nodes = Vec::new();
    for i in 0..4 {
        nodes.push(lookup(&mut server, 1, &format!("f{i}")).unwrap().nodeid);
    }
    assert_eq!(lookup(&mut server, 1, "f4").unwrap_err(), libc::ENFILE);
    // Known nodes are still found; a forgotten one makes room.
    assert_eq!(lookup(&mut server, 1, "f0").unwrap().nodeid, nodes[0]);
    let forget = |server: &mut Server, node: u64, n: u64| {
        let mut out = Vec::new();
        let req = request(abi::FORGET, node, 0, &n.to_le_bytes());
        assert_eq!(server.handle(&req, 0, &mut out), Ok(Served::NoReply));
    };
    forget(&mut server, nodes[1], 1);
    assert!(lookup(&mut server, 1, "f4").is_ok());
    // Forgetting more than was looked up, the root, or nodes never given changes nothing bad.
    forget(&mut server, nodes[0], u64::MAX);
    forget(&mut server, 1, 5);
    forget(&mut server, 12345, 1);
    assert_eq!(server.counts().0, 3);
    // BATCH_FORGET, with a count that claims more items than came.
    let mut batch = abi::BatchForgetIn {
        count: 1000,
        dummy: 0,
    }
    .as_slice()
    .to_vec();
    for &node in &nodes[2..4] {
        batch.extend_from_slice(
            abi::ForgetOne {
                nodeid: node,
                nlookup: 1,
            }
            .as_slice(),
        );
    }
    let mut out = Vec::new();
    let req = request(abi::BATCH_FORGET, 0, 0, &batch);
    assert_eq!(server.handle(&req, 0, &mut out), Ok(Served::NoReply));
    assert_eq!(server.counts().0, 1);
    // Handles: two at most.
    let f = lookup(&mut server, 1, "file").unwrap().nodeid;
    let a = open(&mut server, f, abi::OPEN, 0).unwrap();
    open(&mut server, 1, abi::OPENDIR, 0).unwrap();
    assert_eq!(open(&mut server, f, abi::OPEN, 0), Err(libc::ENFILE));
    let release = abi::ReleaseIn {
        fh: a,
        ..Default::default()
    };
    call(&mut server, abi::RELEASE, 0, release.as_slice());
    assert!(open(&mut server, f, abi::OPEN, 0).is_ok());
    // INIT starts over.
    call(&mut server, abi::INIT, 0, &init_body(7, 31, 0));
    assert_eq!(server.counts(), (0, 0));
}

#[test]
fn malformed_requests_get_errors_not_panics() {
    let dir = share();
    let mut server = server_on(dir.as_path(), 100, 100);
    let mut out = Vec::new();
    assert_eq!(
        server.handle(&[0; 39], 100, &mut out),
        Err(RequestError::ShortHeader(39))
    );
    let getattr = request(abi::GETATTR, 1, 5, &[0; 16]);
    assert_eq!(
        server.handle(&getattr, 15, &mut out),
        Err(RequestError::NoReplyRoom(15))
    );
    // A reply that does not fit its buffers is ERANGE, in a header that does.
    assert_eq!(call_raw(&mut server, &getattr, 40).error, libc::ERANGE);
    // Lengths that lie: too short for a header, or longer than what came.
    let mut lie = getattr.clone();
    lie[0..4].copy_from_slice(&8u32.to_le_bytes());
    assert_eq!(call_raw(&mut server, &lie, 4096).error, libc::EINVAL);
    lie[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(call_raw(&mut server, &lie, 4096).error, 0);
    // A LOOKUP whose claimed length cuts its name's NUL off.
    let mut cut = request(abi::LOOKUP, 1, 5, &name("file"));
    cut[0..4].copy_from_slice(&43u32.to_le_bytes());
    assert_eq!(call_raw(&mut server, &cut, 4096).error, libc::EINVAL);
    // Arguments too short for their struct.
    for op in [
        abi::READ,
        abi::READDIR,
        abi::OPEN,
        abi::ACCESS,
        abi::RELEASE,
    ] {
        assert_eq!(
            call(&mut server, op, 1, &[1, 2, 3]).error,
            libc::EINVAL,
            "op {op}"
        );
    }
    // FORGETs are never answered, not even malformed ones or those before INIT.
    for (op, body) in [(abi::FORGET, &[1u8][..]), (abi::BATCH_FORGET, &[][..])] {
        let req = request(op, 2, 5, body);
        assert_eq!(server.handle(&req, 0, &mut out), Ok(Served::NoReply));
        assert!(out.is_empty());
    }
    call(&mut server, abi::DESTROY, 0, &[]);
    let forget = request(abi::FORGET, 2, 5, &1u64.to_le_bytes());
    assert_eq!(server.handle(&forget, 0, &mut out), Ok(Served::NoReply));
    server.initialized = true;
    // Unknown and unsupported operations.
    for op in [
        0,
        abi::GETXATTR,
        abi::LISTXATTR,
        abi::INTERRUPT,
        abi::SETUPMAPPING,
        9999,
        u32::MAX,
    ] {
        assert_eq!(
            call(&mut server, op, 1, &[0; 64]).error,
            libc::ENOSYS,
            "op {op}"
        );
    }
    // Handles that were never opened.
    assert_eq!(
        call(&mut server, abi::READ, 0, &read_arg(42, 0, 10)).error,
        libc::EBADF
    );
    assert_eq!(
        call(&mut server, abi::READDIR, 1, &read_arg(0, 0, 10)).error,
        libc::EBADF
    );
}

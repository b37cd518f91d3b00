//! pvm-vsock-helper: both ends of vsock transfers for tests/vsock.rs, with checksums.
//!
//! ```text
//! serve-vsock PORT         accept AF_VSOCK connections on PORT (any CID), each in a thread
//! serve-unix PATH          the same on a Unix socket (pvm's guest-to-host side)
//!     every connection: read to EOF, answer "LEN SUM\n", print "recv LEN SUM"
//! send-vsock CID PORT BYTES CONNS
//! send-unix PATH PORT BYTES CONNS    (CONNECT PORT through pvm's hybrid vsock socket)
//!     CONNS connections at once, each sends BYTES of its own pattern, half-closes, and checks
//!     the receiver's "LEN SUM" against its own; prints "sent OK/BAD LEN SUM" per connection
//!     and "send-done ok=N" at the end
//! ```
//! Connecting retries for up to 60 seconds (the other end may still be starting).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

/// FNV-1a, 64 bits.
fn checksum(sum: u64, data: &[u8]) -> u64 {
    data.iter().fold(sum, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn pattern(conn: usize, offset: usize, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let n = offset + i;
        *b = (n.wrapping_mul(31) ^ (n >> 11) ^ conn.wrapping_mul(7)) as u8;
    }
}

/// A stream socket either end can be.
type Stream = std::fs::File;

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn vsock_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn vsock_connect(cid: u32, port: u32) -> std::io::Result<Stream> {
    let fd = vsock_socket()?;
    let addr = vsock_addr(cid, port);
    let len = std::mem::size_of_val(&addr) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_vm for the call.
    check(unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&raw const addr).cast(),
            len,
        )
    })?;
    Ok(Stream::from(fd))
}

fn serve_vsock(port: u32) -> std::io::Result<()> {
    let fd = vsock_socket()?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    let len = std::mem::size_of_val(&addr) as libc::socklen_t;
    // SAFETY: `addr` is valid for the call; no pointers otherwise.
    check(unsafe { libc::bind(raw, (&raw const addr).cast(), len) })?;
    // SAFETY: no pointers.
    check(unsafe { libc::listen(raw, 64) })?;
    println!("listening vsock {port}");
    loop {
        // SAFETY: no address asked for.
        let conn = unsafe {
            libc::accept4(
                raw,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if conn < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let stream = Stream::from(unsafe { OwnedFd::from_raw_fd(conn) });
        std::thread::spawn(move || receive(stream));
    }
}

fn serve_unix(path: &str) -> std::io::Result<()> {
    let listener = UnixListener::bind(path)?;
    println!("listening unix {path}");
    for stream in listener.incoming() {
        let stream = Stream::from(OwnedFd::from(stream?));
        std::thread::spawn(move || receive(stream));
    }
    Ok(())
}

/// Reads to EOF, answers "LEN SUM\n".
fn receive(mut stream: Stream) {
    let (mut len, mut sum) = (0usize, FNV_START);
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        match stream.read(&mut buf) {
            Ok(0) => break "eof",
            Ok(n) => {
                len += n;
                sum = checksum(sum, &buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break "error",
        }
    };
    println!("recv {len} {sum:016x} {end}");
    let _ = stream.write_all(format!("{len} {sum:016x}\n").as_bytes());
}

/// Connects through pvm's hybrid vsock socket at `path` to guest port `port`.
fn unix_connect(path: &str, port: u32) -> std::io::Result<Stream> {
    let mut stream = UnixStream::connect(path)?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8];
    while stream.read(&mut byte)? == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    if !line.starts_with(b"OK ") {
        return Err(std::io::Error::other("no OK line"));
    }
    Ok(Stream::from(OwnedFd::from(stream)))
}

fn retrying(connect: impl Fn() -> std::io::Result<Stream>) -> std::io::Result<Stream> {
    let start = Instant::now();
    loop {
        match connect() {
            Ok(stream) => return Ok(stream),
            Err(e) if start.elapsed() > Duration::from_secs(60) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn send(stream: Stream, conn: usize, bytes: usize) -> bool {
    let mut stream = stream;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut sent, mut sum) = (0usize, FNV_START);
    while sent < bytes {
        let n = buf.len().min(bytes - sent);
        pattern(conn, sent, &mut buf[..n]);
        if stream.write_all(&buf[..n]).is_err() {
            println!("sent BAD write failed after {sent}");
            return false;
        }
        sum = checksum(sum, &buf[..n]);
        sent += n;
    }
    // SAFETY: shutting down the write side of our own socket.
    unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&stream), libc::SHUT_WR) };
    let mut reply = String::new();
    let _ = BufReader::new(stream).read_line(&mut reply);
    let want = format!("{sent} {sum:016x}");
    let ok = reply.trim() == want;
    println!(
        "sent {} {want} (receiver: {})",
        if ok { "OK" } else { "BAD" },
        reply.trim()
    );
    ok
}

fn send_all(conns: usize, bytes: usize, connect: impl Fn() -> std::io::Result<Stream> + Sync) {
    let ok = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..conns)
            .map(|conn| {
                let connect = &connect;
                scope.spawn(move || match retrying(connect) {
                    Ok(stream) => send(stream, conn, bytes),
                    Err(e) => {
                        println!("sent BAD connect: {e}");
                        false
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join())
            .filter(|r| matches!(r, Ok(true)))
            .count()
    });
    println!("send-done ok={ok}");
}

fn number<T: std::str::FromStr>(arg: Option<&String>) -> T {
    arg.and_then(|a| a.parse().ok()).unwrap_or_else(|| usage())
}

fn usage() -> ! {
    eprintln!(
        "usage: pvm-vsock-helper serve-vsock PORT | serve-unix PATH | send-vsock CID PORT BYTES CONNS | send-unix PATH PORT BYTES CONNS"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve-vsock") => serve_vsock(number(args.get(1))),
        Some("serve-unix") => serve_unix(args.get(1).unwrap_or_else(|| usage())),
        Some("send-vsock") => {
            let (cid, port): (u32, u32) = (number(args.get(1)), number(args.get(2)));
            send_all(number(args.get(4)), number(args.get(3)), || {
                vsock_connect(cid, port)
            });
            Ok(())
        }
        Some("send-unix") => {
            let path = args.get(1).unwrap_or_else(|| usage()).clone();
            let port: u32 = number(args.get(2));
            send_all(number(args.get(4)), number(args.get(3)), || {
                unix_connect(&path, port)
            });
            Ok(())
        }
        _ => usage(),
    };
    if let Err(e) = result {
        eprintln!("pvm-vsock-helper: {e}");
        std::process::exit(1);
    }
}

//! HTTP/1.1 on pvm's API socket, for the tests that drive pvm in Firecracker mode natively.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

/// One HTTP/1.1 exchange on `stream`: the status and the body.
pub fn call(
    stream: &mut UnixStream,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or(""));
    stream.write_all(request.as_bytes()).unwrap();
    read_response(stream)
}

/// Reads one response: head up to the blank line, then Content-Length bytes of body.
pub fn read_response(stream: &mut UnixStream) -> (u16, String) {
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "connection closed");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head:?}"));
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map_or(0, |n| n.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    (status, String::from_utf8(body).unwrap())
}

/// Connects to pvm's API socket, waiting for it (and failing if pvm ends first).
pub fn connect(socket: &Path, child: &mut Child) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(stream) = UnixStream::connect(socket) {
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            return stream;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("pvm ended before serving the API: {status}");
        }
        assert!(Instant::now() < deadline, "no API socket after 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

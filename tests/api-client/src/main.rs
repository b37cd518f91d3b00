//! `pvm-api-client SOCKET METHOD PATH [BODY]`: one HTTP/1.1 request on pvm's API socket.
//!
//! Prints `STATUS BODY` on one line of stdout. Exit code: 0 for a 2xx answer, 1 for any other
//! status, 2 when no answer came (bad usage, no socket within 30 s, connection closed, a
//! malformed response), with a line on stderr saying which.
//!
//! The emulated KVM host runs busybox, whose `nc` speaks no Unix sockets and which has no curl,
//! so tests/api_guest.rs ships this instead. Connecting is retried for 30 s, so a script can
//! start pvm in the background and call at once.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// How long to keep trying to connect while pvm is still creating its socket.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);
/// How long to wait for an answer (a pause waits for every vCPU to park; TCG is slow).
const ANSWER_PATIENCE: Duration = Duration::from_secs(60);

/// Why no answer came.
#[derive(Debug)]
enum ClientError {
    Usage,
    Connect(String, io::Error),
    Io(io::Error),
    Closed,
    BadResponse(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Usage => write!(f, "usage: pvm-api-client SOCKET METHOD PATH [BODY]"),
            ClientError::Connect(path, e) => write!(f, "cannot connect to {path}: {e}"),
            ClientError::Io(e) => write!(f, "talking to the API: {e}"),
            ClientError::Closed => write!(f, "the API closed the connection before answering"),
            ClientError::BadResponse(head) => write!(f, "malformed response head {head:?}"),
        }
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

fn connect(path: &str) -> Result<UnixStream, ClientError> {
    let deadline = Instant::now() + CONNECT_PATIENCE;
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            // The socket is not there yet, or not listening yet.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(ClientError::Connect(path.to_string(), e)),
        }
    }
}

/// Sends one request and returns the status and the body of its answer.
fn exchange(
    socket: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), ClientError> {
    let mut stream = connect(socket)?;
    stream.set_read_timeout(Some(ANSWER_PATIENCE))?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or(""));
    stream.write_all(request.as_bytes())?;

    // The head, byte by byte up to the blank line (the server keeps the connection open).
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(ClientError::Closed);
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| ClientError::BadResponse(head.clone()))?;
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>())
        })
        .transpose()
        .map_err(|_| ClientError::BadResponse(head.clone()))?
        .unwrap_or(0);
    let mut answer = vec![0u8; length];
    stream.read_exact(&mut answer)?;
    Ok((status, String::from_utf8_lossy(&answer).into_owned()))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match &args[..] {
        [socket, method, path] => exchange(socket, method, path, None),
        [socket, method, path, body] => exchange(socket, method, path, Some(body)),
        _ => Err(ClientError::Usage),
    };
    match result {
        Ok((status, body)) => {
            println!("{status} {body}");
            if (200..300).contains(&status) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("pvm-api-client: {e}");
            ExitCode::from(2)
        }
    }
}

//! The subcommands' side of the API: one HTTP/1.1 request on a VM's Unix socket, with
//! timeouts and size limits, since the socket may be anybody's (a stale path reused, a fake).

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a VM may take to answer.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response head and body read.
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1024 * 1024;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{}: no such VM (no socket there)", .0.display())]
    NoSocket(PathBuf),
    #[error("{}: nobody serves this socket any more (the VM has ended)", .0.display())]
    Stale(PathBuf),
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: the answer is not HTTP pvm understands: {why}", .path.display())]
    BadAnswer { path: PathBuf, why: &'static str },
}

/// An answer: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `fault_message` of an error answer, or its body.
    pub fn fault(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("fault_message")?.as_str().map(str::to_string))
            .unwrap_or_else(|| self.body.clone())
    }
}

/// Sends `method path` with `body` (JSON) to the API socket at `socket` and reads the answer.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<Answer, ClientError> {
    let io = |source: std::io::Error| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        ErrorKind::NotFound => ClientError::NoSocket(socket.to_path_buf()),
        ErrorKind::ConnectionRefused => ClientError::Stale(socket.to_path_buf()),
        _ => io(e),
    })?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    let body = body.unwrap_or("");
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if !body.is_empty() {
        text.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    text.push_str("\r\n");
    text.push_str(body);
    stream.write_all(text.as_bytes()).map_err(io)?;
    let mut reply = Vec::new();
    stream
        .take((MAX_HEAD + MAX_BODY) as u64)
        .read_to_end(&mut reply)
        .map_err(io)?;
    parse_answer(&reply).map_err(|why| ClientError::BadAnswer {
        path: socket.to_path_buf(),
        why,
    })
}

/// The pid of the process serving the socket at `socket`, as the kernel knows it
/// (SO_PEERCRED): what `pvm stop` signals, never a pid a VM merely claims.
pub fn server_pid(socket: &Path) -> Result<i32, ClientError> {
    let io = |source: std::io::Error| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        ErrorKind::NotFound => ClientError::NoSocket(socket.to_path_buf()),
        ErrorKind::ConnectionRefused => ClientError::Stale(socket.to_path_buf()),
        _ => io(e),
    })?;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt fills at most `len` bytes of the live ucred and updates `len`.
    let got = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&stream),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if got != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    Ok(cred.pid)
}

/// Parses a whole response (the server closes after it).
fn parse_answer(reply: &[u8]) -> Result<Answer, &'static str> {
    let end = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .filter(|&end| end <= MAX_HEAD)
        .ok_or("no complete head")?;
    let head = std::str::from_utf8(&reply[..end]).map_err(|_| "the head is not text")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut words = status_line.split(' ');
    if !words.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err("no HTTP status line");
    }
    let status: u16 = words
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or("no status code")?;
    let mut length = 0usize;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().map_err(|_| "a bad Content-Length")?;
            }
        }
    }
    let body = &reply[end + 4..];
    if length > MAX_BODY || body.len() < length {
        return Err("the body is cut short or too large");
    }
    let body = String::from_utf8(body[..length].to_vec()).map_err(|_| "the body is not text")?;
    Ok(Answer { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_and_garbage_is_refused() {
        let ok = parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!((ok.status, ok.body.as_str()), (200, "{}"));
        let none = parse_answer(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        assert!(none.ok() && none.body.is_empty());
        let fault = Answer {
            status: 400,
            body: r#"{"fault_message":"no"}"#.to_string(),
        };
        assert_eq!(fault.fault(), "no");
        for garbage in [
            &b""[..],
            b"hello\r\n\r\n",
            b"HTTP/1.1 abc\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n\xff",
            b"\xff\xfe\r\n\r\n",
        ] {
            assert!(parse_answer(garbage).is_err(), "{garbage:?}");
        }
        let long_head = [b'a'; MAX_HEAD + 10];
        assert!(parse_answer(&long_head).is_err());
    }
}

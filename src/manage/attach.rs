//! `pvm console ID`: this terminal on a VM's console socket. The terminal is raw while
//! attached and restored on every way out: detaching, the console closing, an error, a panic
//! (terminal.rs's hook) and SIGTERM/SIGHUP/SIGINT (handlers below).

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use vmm_sys_util::signal::register_signal_handler;

use crate::terminal::RawMode;

/// Ctrl-]: detaches, as telnet's escape does.
pub const DETACH: u8 = 0x1d;

/// Why attaching failed or ended badly.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("console socket {}: {source}", .path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("console socket {}: closed (the VM ended, or another client is attached)", .0.display())]
    Closed(PathBuf),
    #[error("console: {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

extern "C" fn on_signal(signo: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    crate::terminal::restore_from_signal_handler();
    // SAFETY: _exit is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(crate::exit::SIGNAL_BASE + signo) };
}

/// Splits terminal input at the detach key: what to send, and whether to detach after it.
pub fn split_detach(bytes: &[u8]) -> (&[u8], bool) {
    match bytes.iter().position(|&b| b == DETACH) {
        Some(at) => (&bytes[..at], true),
        None => (bytes, false),
    }
}

/// Attaches stdin/stdout to the console socket at `path` until Ctrl-] (or stdin's end).
pub fn attach(path: &Path) -> Result<(), AttachError> {
    let io = |what| move |source| AttachError::Io { what, source };
    let mut socket = UnixStream::connect(path).map_err(|source| AttachError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    for signo in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        register_signal_handler(signo, on_signal).map_err(|e| AttachError::Io {
            what: "installing signal handlers",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
    }
    crate::logger::to_stderr(&format!(
        "pvm: attached to {}; Ctrl-] detaches\r\n",
        path.display()
    ));
    let _raw = RawMode::enter().map_err(io("putting the terminal in raw mode"))?;
    let mut stdout = std::io::stdout();
    let mut buf = [0u8; 4096];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: libc::STDIN_FILENO,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll reads and writes the two pollfd structs of the live array.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(io("poll")(e));
        }
        if fds[1].revents != 0 {
            match socket.read(&mut buf) {
                Ok(0) => return Err(AttachError::Closed(path.to_path_buf())),
                Ok(n) => {
                    stdout.write_all(&buf[..n]).map_err(io("writing stdout"))?;
                    stdout.flush().map_err(io("writing stdout"))?;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io("reading the console socket")(e)),
            }
        }
        if fds[0].revents != 0 {
            // SAFETY: reading into a live stack buffer of the given length.
            let got = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
            if got <= 0 {
                // stdin ended: detach, the VM runs on.
                return Ok(());
            }
            let (send, detach) = split_detach(&buf[..got as usize]);
            socket
                .write_all(send)
                .map_err(io("writing the console socket"))?;
            if detach {
                crate::logger::to_stderr("\r\npvm: detached\r\n");
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_close_bracket_detaches_after_what_came_before() {
        assert_eq!(split_detach(b"ls\r"), (&b"ls\r"[..], false));
        assert_eq!(split_detach(b"ab\x1dcd"), (&b"ab"[..], true));
        assert_eq!(split_detach(b"\x1d"), (&b""[..], true));
    }
}

//! Removing a VM's sockets when its pvm ends. No pvm thread may unlink under the sandbox, so a
//! small helper process, forked while pvm is still one thread with no filter, does it: it
//! closes every descriptor but a pipe whose other end only pvm holds, waits for that pipe to
//! end (pvm exited, however: normally, by a signal, even SIGKILL), and removes each socket that
//! is then stale (connecting is refused), so a socket a newer pvm has bound meanwhile stays.
//! If the helper cannot be started, the sockets stay and are cleaned as stale ones are.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A socket address and path, made before the fork (the child must not allocate).
struct Target {
    path: CString,
    addr: libc::sockaddr_un,
}

fn target(path: &Path) -> Option<Target> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return None;
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (to, &from) in addr.sun_path.iter_mut().zip(bytes) {
        *to = from as libc::c_char;
    }
    Some(Target {
        path: CString::new(bytes).ok()?,
        addr,
    })
}

/// Starts the helper that removes `paths` once this process has ended. Call it while the
/// process has a single thread and no seccomp filter.
pub fn remove_at_exit(paths: &[&Path]) {
    let targets: Vec<Target> = paths.iter().filter_map(|p| target(p)).collect();
    if targets.is_empty() {
        return;
    }
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the live array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        log::info!("no helper to remove the sockets at exit: pipe2 failed");
        return;
    }
    let [read_end, write_end] = fds;
    // SAFETY: fork has no memory-safety preconditions; the child below only makes
    // async-signal-safe system calls on data prepared before the fork, then _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: only async-signal-safe calls on memory prepared before the fork.
        unsafe { child(read_end, &targets) };
    }
    // SAFETY: closing the read end this process does not use; the write end stays open
    // (close-on-exec) until the process ends, which is what the helper waits for.
    unsafe { libc::close(read_end) };
    if pid < 0 {
        log::info!("no helper to remove the sockets at exit: fork failed");
        // SAFETY: the write end is ours and unused now.
        unsafe { libc::close(write_end) };
    }
}

/// The helper's body; never returns.
///
/// # Safety
/// Must run in a freshly forked child, with `targets` prepared before the fork.
unsafe fn child(read_end: i32, targets: &[Target]) -> ! {
    // SAFETY: each call is an async-signal-safe system call on descriptors this process owns
    // or on the live, fully initialised `targets`.
    unsafe {
        for signo in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGUSR1,
            libc::SIGUSR2,
        ] {
            libc::signal(signo, libc::SIG_IGN);
        }
        libc::prctl(
            libc::PR_SET_NAME,
            c"pvm-cleanup".as_ptr() as libc::c_ulong,
            0,
            0,
            0,
        );
        // Keep only the pipe (as fd 0): holding the terminal, pvm's output pipes or the
        // sockets' listeners would keep them open after pvm ends.
        libc::dup2(read_end, 0);
        libc::syscall(libc::SYS_close_range, 1u32, u32::MAX, 0u32);
        let mut byte = 0u8;
        // Nobody writes: read returns 0 (EOF) once every write end, only pvm's, is closed.
        loop {
            let got = libc::read(0, (&mut byte as *mut u8).cast(), 1);
            if got < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            break;
        }
        for target in targets {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                continue;
            }
            let refused = libc::connect(
                fd,
                (&target.addr as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            ) != 0
                && *libc::__errno_location() == libc::ECONNREFUSED;
            libc::close(fd);
            if refused {
                libc::unlink(target.path.as_ptr());
            }
        }
        libc::_exit(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_too_long_for_a_socket_address_are_skipped() {
        assert!(target(Path::new("/run/pvm/a.sock")).is_some());
        let long = format!("/{}", "x".repeat(200));
        assert!(target(Path::new(&long)).is_none());
    }
}

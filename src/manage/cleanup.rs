//! Removing a VM's sockets when its pvm ends. No pvm thread may unlink under the sandbox, so a
//! helper process does it, started before the VM is built, with a pipe from pvm as its stdin
//! and nothing else (stdout and stderr are /dev/null; everything pvm opens is close-on-exec).
//! It waits for that pipe to end (pvm exited, however: normally, by a signal, even SIGKILL),
//! then runs `pvm cleanup-sockets PATH...` (hidden), which removes each socket that is then
//! stale (connecting is refused), so a socket a newer pvm has bound meanwhile stays. If the
//! helper cannot be started, the sockets stay and are cleaned as stale ones are.
//!
//! While it waits the helper is `/bin/sh` (its script's `$0` is `pvm-cleanup`), not the pvm
//! binary: scripts that find the VMM with `pidof pvm` (which matches the executable too) find
//! only the VMM. Its argv[0] stays `/bin/sh`: busybox picks the applet by argv[0] and refuses
//! any other name ("pvm-cleanup: applet not found"), so on a busybox system the helper would
//! end at once and leave the sockets to the stale-socket cleaning.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The helper's subcommand name.
pub const SUBCOMMAND: &str = "cleanup-sockets";

/// The helper's script: $1 is pvm's executable, the rest the sockets. Stop signals are
/// ignored (a Ctrl-C or a signal to pvm's process group must not end it before pvm). It waits
/// with the shell's own `read` (nobody writes, so it returns at the pipe's end), not `cat`:
/// a second exec (with its loader and locale files) cost CPU time at every start, which on a
/// one-CPU host is taken from the guest's boot.
const WAIT_THEN_CLEAN: &str = "trap '' INT TERM HUP USR1 USR2; while read -r _; do :; done; \
                               exe=$1; shift; exec \"$exe\" cleanup-sockets -- \"$@\"";

/// Starts the helper that removes `paths` once this process has ended.
pub fn remove_at_exit(paths: &[&Path]) {
    if paths.is_empty() {
        return;
    }
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the live array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        log::info!(
            "no helper to remove the sockets at exit: pipe2: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    // SAFETY: pipe2 returned two new descriptors that nothing else owns.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            log::info!("no helper to remove the sockets at exit: pvm's own path: {e}");
            return;
        }
    };
    let spawned = Command::new("/bin/sh")
        .args(["-c", WAIT_THEN_CLEAN, "pvm-cleanup"])
        .arg(exe)
        .args(paths)
        .stdin(Stdio::from(read_end))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match spawned {
        // The write end stays open (close-on-exec) until this process ends: that is the
        // helper's signal. Its exit status is nobody's business.
        Ok(_) => std::mem::forget(write_end),
        Err(e) => log::info!("no helper to remove the sockets at exit: {e}"),
    }
}

/// The helper's body: waits for stdin's end, then removes the stale sockets among `paths`.
pub fn run(paths: &[PathBuf]) -> i32 {
    for signo in [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ] {
        // SAFETY: ignoring a signal changes only this process's disposition: a Ctrl-C or a
        // signal to pvm's process group must not end the helper before pvm.
        unsafe { libc::signal(signo, libc::SIG_IGN) };
    }
    let mut sink = [0u8; 64];
    let mut stdin = std::io::stdin();
    // Nobody writes: read returns 0 (EOF) once pvm, the only writer, has ended.
    loop {
        match stdin.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    for path in paths {
        let _ = super::rundir::remove_if_stale(path);
    }
    0
}

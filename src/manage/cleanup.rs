//! Removing a VM's sockets when its pvm ends. No pvm thread may unlink under the sandbox, so a
//! helper process does it, started before the main thread's sandbox goes in (in pvm's own mode
//! once the vCPUs run, so that it does not delay the guest's first instruction), with a pipe from pvm as
//! its stdin and nothing else: stdout and stderr are /dev/null, and every other descriptor is
//! closed in the child before it execs (posix_spawn's closefrom), close-on-exec or not.
//! It waits for that pipe to end (pvm exited, however: normally, by a signal, even SIGKILL),
//! then runs `pvm cleanup-sockets PATH...` (hidden), which removes each socket that is then
//! stale (connecting is refused; one that still accepts is tried again for a few seconds, as
//! the dying pvm may release it after the pipe), so a socket a newer pvm has bound meanwhile
//! stays. If the
//! helper cannot be started, the sockets stay and are cleaned as stale ones are.
//!
//! While it waits the helper is `/bin/sh` (its script's `$0` is `pvm-cleanup`), not the pvm
//! binary: scripts that find the VMM with `pidof pvm` (which matches the executable too) find
//! only the VMM. Its argv[0] stays `/bin/sh`: busybox picks the applet by argv[0] and refuses
//! any other name ("pvm-cleanup: applet not found"), so on a busybox system the helper would
//! end at once and leave the sockets to the stale-socket cleaning.

use std::ffi::{CString, OsStr};
use std::io::Read;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

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
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("-c"),
        OsStr::new(WAIT_THEN_CLEAN),
        OsStr::new("pvm-cleanup"),
        exe.as_os_str(),
    ];
    args.extend(paths.iter().map(|p| p.as_os_str()));
    match spawn_shell(&args, &read_end) {
        // The write end stays open (close-on-exec) until this process ends: that is the
        // helper's signal. Its exit status is nobody's business.
        Ok(()) => std::mem::forget(write_end),
        Err(e) => log::info!("no helper to remove the sockets at exit: {e}"),
    }
}

/// Why the helper could not be started.
#[derive(Debug, thiserror::Error)]
enum SpawnError {
    #[error("an argument or environment entry holds a NUL byte")]
    Nul,
    #[error("{what}: {source}")]
    Spawn {
        what: &'static str,
        source: std::io::Error,
    },
}

/// posix_spawn's calls return an error number rather than setting errno.
fn check(what: &'static str, rc: libc::c_int) -> Result<(), SpawnError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(SpawnError::Spawn {
            what,
            source: std::io::Error::from_raw_os_error(rc),
        })
    }
}

/// A NULL-terminated array of C strings, for argv and envp.
fn c_array(strings: &[CString]) -> Vec<*mut libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr().cast_mut())
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect()
}

/// posix_spawn's file actions and attributes, destroyed when dropped.
struct SpawnSetup {
    actions: MaybeUninit<libc::posix_spawn_file_actions_t>,
    attr: MaybeUninit<libc::posix_spawnattr_t>,
    ready: (bool, bool),
}

impl Drop for SpawnSetup {
    fn drop(&mut self) {
        // SAFETY: each is destroyed only if its init succeeded, once.
        unsafe {
            if self.ready.0 {
                libc::posix_spawn_file_actions_destroy(self.actions.as_mut_ptr());
            }
            if self.ready.1 {
                libc::posix_spawnattr_destroy(self.attr.as_mut_ptr());
            }
        }
    }
}

/// Starts `/bin/sh args...` (not waited for) with `stdin` as its standard input, /dev/null as
/// its output and no other descriptor: pvm's threads may by now hold descriptors without
/// close-on-exec (eventfds, taps), and the helper must hold none of them. Its signal mask is
/// empty and SIGPIPE back to its default, as std's Command does.
fn spawn_shell(args: &[&OsStr], stdin: &OwnedFd) -> Result<(), SpawnError> {
    let program = c"/bin/sh";
    let mut argv = vec![program.to_owned()];
    for arg in args {
        argv.push(CString::new(arg.as_bytes()).map_err(|_| SpawnError::Nul)?);
    }
    let mut envp = Vec::new();
    for (key, value) in std::env::vars_os() {
        let mut entry = key.into_vec();
        entry.push(b'=');
        entry.extend_from_slice(value.as_bytes());
        envp.push(CString::new(entry).map_err(|_| SpawnError::Nul)?);
    }
    let (argv_ptrs, envp_ptrs) = (c_array(&argv), c_array(&envp));
    let mut setup = SpawnSetup {
        actions: MaybeUninit::uninit(),
        attr: MaybeUninit::uninit(),
        ready: (false, false),
    };
    let actions = setup.actions.as_mut_ptr();
    let attr = setup.attr.as_mut_ptr();
    let null = c"/dev/null";
    // SAFETY: `actions` and `attr` point into `setup`, which outlives every use and destroys
    // what was initialised; the strings and arrays outlive posix_spawn, which copies what it
    // keeps. No call here touches memory other than these.
    unsafe {
        check("file actions", libc::posix_spawn_file_actions_init(actions))?;
        setup.ready.0 = true;
        check("attributes", libc::posix_spawnattr_init(attr))?;
        setup.ready.1 = true;
        check(
            "stdin",
            libc::posix_spawn_file_actions_adddup2(actions, stdin.as_raw_fd(), 0),
        )?;
        for fd in [1, 2] {
            check(
                "/dev/null",
                libc::posix_spawn_file_actions_addopen(
                    actions,
                    fd,
                    null.as_ptr(),
                    libc::O_WRONLY,
                    0,
                ),
            )?;
        }
        check(
            "closing the other descriptors",
            libc::posix_spawn_file_actions_addclosefrom_np(actions, 3),
        )?;
        let mut none = MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(none.as_mut_ptr());
        check(
            "signal mask",
            libc::posix_spawnattr_setsigmask(attr, none.as_ptr()),
        )?;
        let mut pipe = MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(pipe.as_mut_ptr());
        libc::sigaddset(pipe.as_mut_ptr(), libc::SIGPIPE);
        check(
            "signal defaults",
            libc::posix_spawnattr_setsigdefault(attr, pipe.as_ptr()),
        )?;
        let flags = libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF;
        check(
            "flags",
            libc::posix_spawnattr_setflags(attr, flags as libc::c_short),
        )?;
        let mut pid: libc::pid_t = 0;
        check(
            "posix_spawn /bin/sh",
            libc::posix_spawn(
                &mut pid,
                program.as_ptr(),
                actions,
                attr,
                argv_ptrs.as_ptr(),
                envp_ptrs.as_ptr(),
            ),
        )
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
        remove_once_released(path, RELEASE_GRACE);
    }
    0
}

/// How long a socket may still accept connections after pvm's end. An exiting process's
/// descriptors are released after its descriptor table is emptied, in an order that is the
/// kernel's: the pipe whose end woke this helper can go before the listening socket, with the
/// VM's descriptors (whose release takes a while) between them. A socket that still accepts
/// right after is tried again until it refuses or this has passed (then a newer pvm holds it).
const RELEASE_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Removes `path` once it is stale, trying for up to `grace` while it still accepts.
fn remove_once_released(path: &Path, grace: std::time::Duration) {
    use super::rundir::{Probe, probe, remove_if_stale};
    let deadline = std::time::Instant::now() + grace;
    while matches!(probe(path), Ok(Probe::Live)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = remove_if_stale(path);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn a_socket_released_after_the_wake_up_is_removed_and_a_live_one_kept() {
        let dir = std::env::temp_dir().join(format!("pvm-cleanup-grace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Still listening when the helper looks, closed 200 ms later: removed.
        let late = dir.join("late.sock");
        let listener = std::os::unix::net::UnixListener::bind(&late).unwrap();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(listener);
        });
        remove_once_released(&late, std::time::Duration::from_secs(5));
        closer.join().unwrap();
        assert!(!late.exists(), "a socket released after the wake-up stays");
        // Listening for good (a newer pvm's): kept once the grace has passed.
        let live = dir.join("live.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
        let start = std::time::Instant::now();
        remove_once_released(&live, std::time::Duration::from_millis(300));
        assert!(start.elapsed() >= std::time::Duration::from_millis(300));
        assert!(live.exists(), "a live socket was removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn wait_for(path: &Path) -> String {
        for _ in 0..500 {
            if let Ok(text) = std::fs::read_to_string(path) {
                if text.ends_with('\n') {
                    return text;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the shell never wrote {}", path.display());
    }

    #[test]
    fn the_shell_gets_no_descriptor_but_its_three() {
        let dir = std::env::temp_dir().join(format!("pvm-cleanup-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        // SAFETY: eventfd returns a new descriptor (deliberately without close-on-exec) or -1.
        let leaky = unsafe { libc::eventfd(0, 0) };
        assert!(leaky > 2);
        // SAFETY: `leaky` is ours alone; the OwnedFd closes it at the end.
        let leaky = unsafe { OwnedFd::from_raw_fd(leaky) };
        let stdin = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let script = format!(
            "if [ -e /proc/$$/fd/{} ]; then echo leaked; else echo clean; fi > \"$1\"",
            leaky.as_raw_fd()
        );
        let args = [
            OsStr::new("-c"),
            OsStr::new(&script),
            OsStr::new("test"),
            out.as_os_str(),
        ];
        spawn_shell(&args, &stdin).unwrap();
        assert_eq!(wait_for(&out), "clean\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_argument_with_a_nul_byte_is_refused() {
        let stdin = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let args = [OsStr::from_bytes(b"-c\0true")];
        assert!(matches!(spawn_shell(&args, &stdin), Err(SpawnError::Nul)));
    }
}

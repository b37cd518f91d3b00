//! Driving a backend binary through pvm's own vhost-user frontend (pvm_vhost::user): memfd guest
//! memory the backend can map, and the backend process. The rings and interrupts are
//! pvm_virtio::testing's.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// 16 MiB of memfd-backed guest RAM at 0 (rings at the bottom, buffers from 1 MiB).
pub fn shared_memory() -> GuestMemoryMmap {
    // SAFETY: a NUL-terminated name; no other memory is passed.
    let fd = unsafe { libc::memfd_create(c"vhost-user-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(16 << 20).unwrap();
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        16 << 20,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap()
}

/// A scratch directory under the target dir, unique per test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A backend process; waits until it listens. `wrapper` runs it (e.g. `ip netns exec NS`).
pub struct Backend {
    pub child: Child,
}

impl Backend {
    pub fn start(wrapper: &[&str], program: &str, args: &[&str]) -> Backend {
        let mut command = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        let mut child = command
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        assert!(line.contains(": serving "), "backend said {line:?}");
        // Keep draining so the backend never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                eprintln!("backend: {line}");
            }
        });
        Backend { child }
    }

    /// Waits for the backend to exit (it does once the frontend disconnected).
    pub fn wait(mut self) -> i32 {
        for _ in 0..100 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("the backend did not exit after the frontend disconnected");
    }
}

//! pvm's sandbox: one seccomp filter per kind of thread, built with seccompiler and installed by
//! each thread itself before any guest code runs.
//!
//! - vCPU threads install theirs first thing, before their first KVM_RUN.
//! - Device threads (one per virtio device, plus vhost-net's call relay) are spawned when the VM
//!   is built and install theirs before taking any work (see `pvm_virtio::thread`). No thread is
//!   created after the guest starts, so no filter allows `clone`.
//! - The main thread (stdin, signals, the end of the VM) installs its own once every other thread
//!   runs.
//!
//! A call outside the filter raises SIGSYS; the handler (`pvm_common::seccomp`, shared with the
//! vhost-user backends like the calls every thread makes) names the thread and the system call
//! on stderr, puts the terminal back and ends pvm with [`crate::exit::SECCOMP_VIOLATION`]. Every
//! `ioctl` is limited to the families pvm uses (KVM, vhost, and the tty/tun 'T' family), and
//! `fcntl` to F_DUPFD_CLOEXEC and F_GETFD. `--seccomp off` turns it all off, for debugging.

use std::collections::BTreeMap;

use pvm_common::seccomp::{self as common, CallFormat, DATA_PLANE, EVERY_THREAD, Reporter};
use seccompiler::{BpfProgram, SeccompCmpArgLen, SeccompCmpOp, SeccompRule};

/// Why a thread's filter could not be built or installed.
pub type Error = common::Error;

/// The kinds of thread pvm runs, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread once the VM runs: host stdin, signals, the end of the VM.
    Main,
    /// A vCPU: KVM_RUN and the device register accesses it dispatches, including device
    /// activation and reset (event loops set up, vhost rings programmed, MSI routes changed).
    Vcpu,
    /// A device's data plane: guest queues, the disk image, the tap, entropy, the relay.
    Device,
    /// The Firecracker API's thread: clients on the Unix socket, requests to the main thread.
    Api,
}

impl ThreadKind {
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::Api => "api",
        }
    }
}

/// Device activation and reset run on the vCPU that wrote DRIVER_OK or 0 to the status: new
/// event loops, eventfds, a rate-limited queue's timerfd and duplicated descriptors.
const VCPU: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
];

/// A device thread's event loop and I/O: the data plane's calls, nothing more.
const DEVICE: &[i64] = DATA_PLANE;

/// A rate-limited queue's worker arms its timerfd when the buckets run dry (pvm's own workers
/// only, so not in the shared data-plane list the vhost-user backends use too).
const RATE_LIMIT: &[i64] = &[libc::SYS_timerfd_settime];

/// The main loop, and the teardown of the VM when it ends. Resuming a paused VM restarts
/// in-process device workers from the main thread: a new event loop and kill eventfd each.
/// Metrics re-read /proc/self/net/dev (opened before the filter) for vhost-net taps, in
/// place. A VM restored with a page-fault handler (mem_backend Uffd) adds nothing: the
/// userfaultfd and the handler's socket are set up before any filter, the main loop watches
/// the socket with epoll_ctl, and the RAM's faults (the vCPUs', a snapshot's reads, the
/// balloon's madvise with its REMOVE event) wait in the kernel, not in a system call of ours.
const MAIN: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_pread64,
];

/// The API thread: its epoll, accepting clients (non-blocking, close-on-exec, so no fcntl or
/// ioctl follows), and reading and writing them (the standard library reads a socket with
/// recvfrom); the channel to the main thread is futexes and its eventfd a write, both allowed
/// to every thread. It holds no socket but the listener and its clients, and may create none.
/// The console socket's thread, under the same filter, asks with a zero-timeout poll whether
/// its attached client has hung up before it refuses a new one as busy.
const API: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_poll,
];

/// What `--stats` adds to the main thread: reading /proc/self/task for per-thread CPU time.
const MAIN_STATS: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_getdents64,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
];

/// `PUT /snapshot/create` on the main thread: the snapshot and memory files are created (see
/// [`create_private`]), narrowed to 0600, written with holes for zero pages, sized and synced.
const SNAPSHOT: &[i64] = &[
    libc::SYS_fchmod,
    libc::SYS_lseek,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
];

/// ioctl "type" bytes (bits 8..16 of the request) pvm uses.
const IOCTL_KVM: u64 = 0xae;
const IOCTL_VHOST: u64 = 0xaf;
/// 'T': the terminal (TCGETS/TCSETS, restoring the host terminal) and tun (TUNSETOFFLOAD,
/// TUNSETQUEUE).
const IOCTL_TTY_TUN: u64 = b'T' as u64;
/// VHOST_NET_SET_BACKEND, _IOW(0xaf, 0x30, struct vhost_vring_file): the one vhost request a
/// device thread makes, when a multiqueue guest turns a queue pair served by vhost-net on or
/// off through the control queue.
const VHOST_NET_SET_BACKEND: u64 = 0x4008_af30;

/// The system calls a thread of `kind` may make, with their argument rules (an empty rule list
/// allows the call unconditionally).
pub fn rules(kind: ThreadKind, stats: bool) -> BTreeMap<i64, Vec<SeccompRule>> {
    rules_with(kind, stats, &[])
}

/// [`rules`] for a VM with vhost-user devices connected on `vhost_user_sockets`: their
/// frontends run on the vCPU threads (device activation and reset) and on the main thread
/// (pausing and resuming the VM), which may then send (`sendmsg` with MSG_NOSIGNAL, as
/// vmm-sys-util sends) and receive (`recvmsg` without flags) messages on exactly those
/// descriptors. Connecting happened before any filter went in.
pub fn rules_with(
    kind: ThreadKind,
    stats: bool,
    vhost_user_sockets: &[i32],
) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules = common::allow(match kind {
        ThreadKind::Main if stats => &[EVERY_THREAD, MAIN, MAIN_STATS, SNAPSHOT],
        ThreadKind::Main => &[EVERY_THREAD, MAIN, SNAPSHOT],
        ThreadKind::Vcpu => &[EVERY_THREAD, VCPU],
        ThreadKind::Device => &[EVERY_THREAD, DEVICE, RATE_LIMIT],
        ThreadKind::Api => &[EVERY_THREAD, API],
    });
    let ioctl_types: &[u64] = match kind {
        // Device threads restore the terminal (in the SIGSYS handler) and attach or detach tap
        // queues (a multiqueue control queue); one vhost request is added below.
        ThreadKind::Device => &[IOCTL_TTY_TUN],
        // Only the SIGSYS handler's terminal restore.
        ThreadKind::Api => &[IOCTL_TTY_TUN],
        ThreadKind::Main | ThreadKind::Vcpu => &[IOCTL_KVM, IOCTL_VHOST, IOCTL_TTY_TUN],
    };
    let mut ioctl: Vec<SeccompRule> = ioctl_types
        .iter()
        .map(|&kind| rule(1, SeccompCmpOp::MaskedEq(0xff00), kind << 8))
        .collect();
    if kind == ThreadKind::Device {
        ioctl.push(rule(1, SeccompCmpOp::Eq, VHOST_NET_SET_BACKEND));
        rules.insert(libc::SYS_io_uring_enter, vec![io_uring_enter()]);
    }
    rules.insert(libc::SYS_ioctl, ioctl);
    if kind == ThreadKind::Main && !stats {
        // --stats opens /proc files freely; otherwise only a snapshot's files are created.
        rules.insert(libc::SYS_openat, create_private());
    }
    if kind == ThreadKind::Api {
        // PATCH /drives: a running drive's new backing file (api::swap).
        rules.insert(libc::SYS_openat, open_existing());
        rules.insert(libc::SYS_flock, Vec::new());
        rules.insert(libc::SYS_lseek, Vec::new());
        rules.insert(libc::SYS_fstat, Vec::new());
    }
    // File::try_clone (eventfds, the tap) is fcntl(F_DUPFD_CLOEXEC); closing a descriptor
    // checks it with F_GETFD in debug builds.
    let mut fcntl = vec![rule(1, SeccompCmpOp::Eq, libc::F_GETFD as u64)];
    if matches!(kind, ThreadKind::Main | ThreadKind::Vcpu) {
        fcntl.push(rule(1, SeccompCmpOp::Eq, libc::F_DUPFD_CLOEXEC as u64));
    }
    rules.insert(libc::SYS_fcntl, fcntl);
    if matches!(kind, ThreadKind::Main | ThreadKind::Vcpu) && !vhost_user_sockets.is_empty() {
        let on_socket = |flags: i32| -> Vec<SeccompRule> {
            vhost_user_sockets
                .iter()
                .map(|&fd| {
                    // The descriptor and flags arguments are ints: compare the low 32 bits.
                    let int_is = |arg, value: i32| {
                        common::condition(
                            arg,
                            SeccompCmpArgLen::Dword,
                            SeccompCmpOp::Eq,
                            value as u64,
                        )
                    };
                    let conditions = vec![int_is(0, fd), int_is(2, flags)];
                    SeccompRule::new(conditions).expect("two conditions")
                })
                .collect()
        };
        rules.insert(libc::SYS_sendmsg, on_socket(libc::MSG_NOSIGNAL));
        rules.insert(libc::SYS_recvmsg, on_socket(0));
    }
    rules
}

/// A rule on the whole 64 bits of argument `arg`.
/// openat of a file that exists, read-only or read-write: the flags (less O_CLOEXEC and
/// O_LARGEFILE, which change nothing that matters here) are exactly O_RDONLY or O_RDWR, so
/// nothing is created (O_CREAT, O_TMPFILE), truncated or opened as a directory or a path.
fn open_existing() -> Vec<SeccompRule> {
    let ignored = (libc::O_CLOEXEC | libc::O_LARGEFILE) as u32;
    [libc::O_RDONLY, libc::O_RDWR]
        .into_iter()
        .map(|flags| {
            common::rule(
                2,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(u64::from(!ignored)),
                flags as u64,
            )
        })
        .collect()
}

/// io_uring_enter as the io_uring block engine's workers make it (`--disk engine=io_uring`):
/// submit and maybe wait (flags 0 or IORING_ENTER_GETEVENTS), with no extended argument or
/// signal mask. The rings were created with their devices before any filter went in (no thread
/// may call io_uring_setup or io_uring_register later) and only take READV, WRITEV and FSYNC
/// (a ring restriction), so what a device thread can make the kernel do through them stays the
/// preadv/pwritev/fdatasync it may call anyway.
fn io_uring_enter() -> SeccompRule {
    const IORING_ENTER_GETEVENTS: u64 = 1;
    SeccompRule::new(vec![
        common::condition(
            3,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(u64::from(u32::MAX) & !IORING_ENTER_GETEVENTS),
            0,
        ),
        common::condition(4, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0),
    ])
    .expect("two conditions")
}

/// openat creating or truncating a file for writing (`snapshot::file::create_private`): the
/// flags, less O_CLOEXEC and O_LARGEFILE, are exactly O_WRONLY | O_CREAT | O_TRUNC, and the
/// mode is 0600. Nothing is read, and no directory or other kind of file is opened.
fn create_private() -> Vec<SeccompRule> {
    let ignored = (libc::O_CLOEXEC | libc::O_LARGEFILE) as u32;
    let flags = common::condition(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(u64::from(!ignored)),
        (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC) as u64,
    );
    let mode = common::condition(3, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, 0o600);
    vec![SeccompRule::new(vec![flags, mode]).expect("two conditions")]
}

fn rule(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompRule {
    common::rule(arg, SeccompCmpArgLen::Qword, op, value)
}

/// The compiled filter for `kind`: allowed calls pass, anything else traps (SIGSYS).
pub fn filter(kind: ThreadKind, stats: bool) -> Result<BpfProgram, Error> {
    filter_with(kind, stats, &[])
}

/// [`filter`] with the vhost-user sockets of [`rules_with`].
pub fn filter_with(
    kind: ThreadKind,
    stats: bool,
    vhost_user_sockets: &[i32],
) -> Result<BpfProgram, Error> {
    common::compile(rules_with(kind, stats, vhost_user_sockets), kind.name())
}

/// How pvm reports a forbidden call: the call by name, and the terminal put back before the
/// exit (the guest may have left it in raw mode).
const REPORTER: Reporter = Reporter {
    program: "pvm",
    call: CallFormat::NameAndNumber,
    consequence: "; stopping the VM",
    before_exit,
};

/// The SIGSYS handler's last step: the terminal put back, the violation counted in metrics.
fn before_exit() {
    crate::terminal::restore_from_signal_handler();
    crate::metrics::write_seccomp_fault_from_signal_handler();
}

/// Installs the filter for `kind` on the calling thread (and, once per process, the SIGSYS
/// handler that reports violations).
pub fn install(kind: ThreadKind, stats: bool) -> Result<(), Error> {
    install_with(kind, stats, &[])
}

/// [`install`] with the vhost-user sockets of [`rules_with`].
pub fn install_with(
    kind: ThreadKind,
    stats: bool,
    vhost_user_sockets: &[i32],
) -> Result<(), Error> {
    install_rules(kind, rules_with(kind, stats, vhost_user_sockets))
}

/// Installs a filter of `rules` for a thread of `kind` on the calling thread.
fn install_rules(kind: ThreadKind, rules: BTreeMap<i64, Vec<SeccompRule>>) -> Result<(), Error> {
    common::install_reporter(REPORTER)?;
    let name = std::thread::current()
        .name()
        .unwrap_or(kind.name())
        .to_string();
    common::set_thread_label(&format!("{name} ({})", kind.name()));
    let program = common::compile(rules, kind.name())?;
    // Read before the filter is in place (it is only memory, but keep it obviously so).
    let probe = std::env::var_os(PROBE_ENV).is_some_and(|v| v == kind.name());
    seccompiler::apply_filter(&program).map_err(|source| common::Error::Install {
        what: format!("{} seccomp filter on {name}", kind.name()),
        source,
    })?;
    if probe {
        // The test hook: a call no filter allows, made right after the filter went in.
        common::forbidden_call();
    }
    Ok(())
}

/// Largest heap of a glibc thread arena (HEAP_MAX_SIZE on 64-bit): a trim threshold this high
/// means a thread arena's heap is never shrunk in place.
const THREAD_HEAP_MAX: libc::c_int = 64 << 20;

/// Keeps glibc's malloc from opening files once the filters are in place. Two paths do, each
/// the first time it is taken, in whichever thread happens to allocate or free:
///
/// - a thread needing a 9th arena: malloc works out its arena limit (8 per CPU) from
///   /sys/devices/system/cpu/online. Setting that same limit here skips the look-up;
/// - a free that shrinks a thread arena's heap in place: malloc reads
///   /proc/sys/vm/overcommit_memory to decide how. A trim threshold of a whole thread heap means
///   thread heaps are only ever unmapped whole, never shrunk (the main arena is trimmed above
///   64 MiB instead of 128 KiB; pvm's own allocations are far smaller).
///
/// Both are openat calls no filter allows: the VM would end with a seccomp violation on a
/// driver reset or at power-off, depending on how many threads the VM has.
pub fn prepare_allocator() {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let arenas = libc::c_int::try_from(cpus.saturating_mul(8)).unwrap_or(libc::c_int::MAX);
    for (param, value, what) in [
        (libc::M_ARENA_MAX, arenas, "arena limit"),
        (libc::M_TRIM_THRESHOLD, THREAD_HEAP_MAX, "trim threshold"),
    ] {
        // SAFETY: mallopt only sets an allocator tunable; this runs before the VM's threads.
        if unsafe { libc::mallopt(param, value) } != 1 {
            log::warn!("cannot set malloc's {what}; an allocation may trip the sandbox");
        }
    }
}

/// Test hook: `PVM_SECCOMP_PROBE=main|vcpu|device` makes every thread of that kind call
/// getppid(2), which no filter allows, as soon as its filter is installed; tests use it to check
/// the report, the exit code and the terminal on a violation in each kind of thread.
pub const PROBE_ENV: &str = "PVM_SECCOMP_PROBE";

/// The same, for device threads spawned by pvm-virtio (`pvm_virtio::thread::set_thread_init`).
/// The thread of a vsock device (named after it) also gets [`vsock_rules`].
pub fn install_device_filter(name: &str) -> Result<(), pvm_virtio::thread::InitError> {
    let mut rules = rules(ThreadKind::Device, false);
    if name.starts_with(pvm_virtio::vsock::THREAD_PREFIX) {
        rules.extend(vsock_rules());
    }
    if name.starts_with(pvm_virtio::fs::THREAD_PREFIX) {
        rules.extend(fs_rules());
    }
    Ok(install_rules(ThreadKind::Device, rules)?)
}

/// What the thread of a virtio-fs share adds (`--share`): it looks names up (openat O_PATH,
/// relative to descriptors it holds), reads attributes, directories and symlinks, and opens
/// files and directories for reading. openat may not write, create, truncate or append: the
/// access mode must be O_RDONLY and O_CREAT, O_TRUNC, O_APPEND and O_TMPFILE clear, so even a
/// bug in the share cannot change a host file.
pub fn fs_rules() -> BTreeMap<i64, Vec<SeccompRule>> {
    /// O_TMPFILE without its O_DIRECTORY bit (__O_TMPFILE), which reads may use.
    const O_TMPFILE_BIT: i32 = 0o20_000_000;
    let writes = libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND | O_TMPFILE_BIT;
    let read_only = common::rule(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(writes as u64),
        0,
    );
    BTreeMap::from([
        (libc::SYS_openat, vec![read_only]),
        (libc::SYS_newfstatat, Vec::new()),
        (libc::SYS_fstatfs, Vec::new()),
        (libc::SYS_readlinkat, Vec::new()),
        (libc::SYS_getdents64, Vec::new()),
        (libc::SYS_lseek, Vec::new()),
    ])
}

/// What the thread of a vsock device adds (`--vsock socket=`): it accepts host processes on
/// the device's listener (bound before the sandbox) and connects guest connections to the
/// Unix sockets beside it. Only Unix stream sockets, made non-blocking and close-on-exec by
/// socket(2) and accept4(2) themselves (no fcntl or ioctl follows); reads are the standard
/// library's recv (recvfrom without flags or address), writes its send (sendto with
/// MSG_NOSIGNAL only: a peer gone is EPIPE, never SIGPIPE); a guest's SHUTDOWN becomes
/// shutdown(2). No bind, listen, sendmsg or recvmsg: no descriptor passing.
pub fn vsock_rules() -> BTreeMap<i64, Vec<SeccompRule>> {
    use pvm_virtio::vsock::{ACCEPT_FLAGS, SOCKET_TYPE};
    let int_is = |arg, value: i32| {
        common::condition(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value as u64)
    };
    let all = |conditions| vec![SeccompRule::new(conditions).expect("conditions")];
    BTreeMap::from([
        (
            libc::SYS_socket,
            all(vec![
                int_is(0, libc::AF_UNIX),
                int_is(1, SOCKET_TYPE),
                int_is(2, 0),
            ]),
        ),
        (libc::SYS_accept4, all(vec![int_is(3, ACCEPT_FLAGS)])),
        (libc::SYS_connect, Vec::new()),
        (libc::SYS_recvfrom, all(vec![int_is(3, 0)])),
        (libc::SYS_sendto, all(vec![int_is(3, libc::MSG_NOSIGNAL)])),
        (libc::SYS_shutdown, Vec::new()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_KINDS: [ThreadKind; 4] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Api,
    ];

    #[test]
    fn only_device_threads_enter_io_uring_and_none_sets_one_up() {
        for kind in ALL_KINDS {
            let rules = rules(kind, true);
            assert_eq!(
                rules.contains_key(&libc::SYS_io_uring_enter),
                kind == ThreadKind::Device,
                "{kind:?}"
            );
            assert!(!rules.contains_key(&libc::SYS_io_uring_setup), "{kind:?}");
            assert!(
                !rules.contains_key(&libc::SYS_io_uring_register),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn only_the_api_thread_accepts_clients() {
        for kind in ALL_KINDS {
            let rules = rules(kind, false);
            assert_eq!(
                rules.contains_key(&libc::SYS_accept4),
                kind == ThreadKind::Api,
                "{}",
                kind.name()
            );
            if kind == ThreadKind::Api {
                for nr in [libc::SYS_ioctl, libc::SYS_fcntl] {
                    assert_eq!(rules[&nr].len(), 1, "{}", common::syscall_name(nr));
                }
                assert!(!rules.contains_key(&libc::SYS_sendmsg));
            }
        }
    }

    #[test]
    fn a_rate_limited_queue_can_make_and_arm_its_timer_under_the_filters() {
        use std::time::Duration;
        use vmm_sys_util::timerfd::TimerFd;

        // Made at activation on a vCPU thread, armed and read by the device thread. A call
        // the filters do not allow ends the test process with the seccomp exit code.
        let timer = std::thread::spawn(|| {
            install(ThreadKind::Vcpu, false).unwrap();
            TimerFd::new().unwrap()
        })
        .join()
        .unwrap();
        std::thread::spawn(move || {
            let mut timer = timer;
            install(ThreadKind::Device, false).unwrap();
            timer.reset(Duration::from_millis(1), None).unwrap();
            assert_eq!(timer.wait().unwrap(), 1);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_device_thread_can_submit_to_and_reap_from_a_ring_made_before_its_filter() {
        use io_uring::{IoUring, opcode, types};
        use std::os::fd::AsRawFd;

        // As --disk engine=io_uring does: the ring made with the device (before any filter),
        // used by its worker under the device filter. A call the filter does not allow ends
        // the test process with the seccomp exit code.
        let tmp = vmm_sys_util::tempfile::TempFile::new().unwrap();
        tmp.as_file().set_len(4096).unwrap();
        let mut ring = IoUring::new(4).unwrap();
        let fd = tmp.as_file().as_raw_fd();
        std::thread::spawn(move || {
            install(ThreadKind::Device, false).unwrap();
            let mut buf = [1u8; 512];
            let iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let read = opcode::Readv::new(types::Fd(fd), &iov, 1).build();
            // SAFETY: `iov` and `buf` outlive the completion, waited for below.
            unsafe { ring.submission().push(&read).unwrap() };
            ring.submit_and_wait(1).unwrap();
            assert_eq!(ring.completion().next().unwrap().result(), 512);
            assert_eq!(buf, [0; 512]);
            // Submitting without waiting is the other form the engine uses.
            ring.submit().unwrap();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_api_thread_may_open_lock_and_size_a_drive_s_new_file() {
        use std::os::unix::fs::FileExt;
        let tmp = vmm_sys_util::tempfile::TempFile::new().unwrap();
        tmp.as_file().write_all_at(&[1; 4096], 0).unwrap();
        let path = tmp.as_path().to_owned();
        let sectors = std::thread::spawn(move || {
            install(ThreadKind::Api, false).unwrap();
            use crate::api::swap::{DriveFile, open};
            let writable = DriveFile {
                read_only: false,
                file: None,
            };
            let rw = open(&path, writable).unwrap();
            // The same file again, as the drive's own: only sized, not locked.
            let again = DriveFile {
                file: Some(rw.file),
                ..writable
            };
            assert!(open(&path, again).unwrap().reopened);
            drop(rw);
            let read_only = DriveFile {
                read_only: true,
                file: None,
            };
            open(&path, read_only).unwrap().disk.sectors()
        })
        .join()
        .unwrap();
        assert_eq!(sectors, 8);
    }

    #[test]
    fn every_kind_compiles() {
        for kind in ALL_KINDS {
            for stats in [false, true] {
                assert!(!filter(kind, stats).unwrap().is_empty());
            }
        }
    }

    #[test]
    fn no_thread_may_create_threads_processes_or_open_files() {
        for kind in ALL_KINDS {
            let rules = rules(kind, false);
            for nr in [
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_unlink,
                libc::SYS_unlinkat,
                libc::SYS_kill,
            ] {
                if kind == ThreadKind::Api && nr == libc::SYS_openat {
                    // Only existing files, read-only or read-write: see the test below.
                    assert_eq!(rules[&nr].len(), 2);
                    continue;
                }
                if kind == ThreadKind::Main && nr == libc::SYS_openat {
                    // Only a snapshot's files: created write-only, truncated, mode 0600.
                    assert_eq!(rules[&nr].len(), 1);
                    assert!(filter(kind, false).is_ok());
                    continue;
                }
                assert!(
                    !rules.contains_key(&nr),
                    "{} may call {}",
                    kind.name(),
                    common::syscall_name(nr)
                );
            }
        }
        // Only the vCPU threads (activation, reset) and the main thread (pause, resume) of a VM
        // with vhost-user devices send and receive messages, and only on those devices' sockets.
        let device = rules_with(ThreadKind::Device, false, &[7]);
        assert!(!device.contains_key(&libc::SYS_sendmsg));
        assert!(!device.contains_key(&libc::SYS_recvmsg));
        for kind in [ThreadKind::Main, ThreadKind::Vcpu] {
            assert!(!rules(kind, false).contains_key(&libc::SYS_sendmsg));
            let with = rules_with(kind, false, &[7, 9]);
            assert_eq!(with[&libc::SYS_sendmsg].len(), 2);
            assert_eq!(with[&libc::SYS_recvmsg].len(), 2);
            assert!(filter_with(kind, false, &[7, 9]).is_ok());
        }
        // Only --stats lets the main thread open /proc/self/task (any openat).
        assert!(rules(ThreadKind::Main, true)[&libc::SYS_openat].is_empty());
    }

    #[test]
    fn a_vsock_thread_may_accept_connect_and_read_unix_sockets_only() {
        use std::io::{Read, Write};
        use std::os::unix::net::{UnixListener, UnixStream};

        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/pvm-seccomp-").unwrap();
        let listener = UnixListener::bind(dir.as_path().join("v")).unwrap();
        listener.set_nonblocking(true).unwrap();
        let target = UnixListener::bind(dir.as_path().join("v_5")).unwrap();
        let mut host = UnixStream::connect(dir.as_path().join("v")).unwrap();
        host.write_all(b"x").unwrap();
        let path = dir.as_path().join("v_5");
        let thread = std::thread::Builder::new()
            .name(format!("{}7", pvm_virtio::vsock::THREAD_PREFIX))
            .spawn(move || {
                install_device_filter("virtio-vsock7").unwrap();
                let mut accepted = pvm_virtio::vsock::accept(&listener).unwrap();
                let mut byte = [0u8];
                accepted.read_exact(&mut byte).unwrap();
                accepted.write_all(b"y").unwrap();
                let stream = pvm_virtio::vsock::connect(&path).unwrap();
                stream.shutdown(std::net::Shutdown::Write).unwrap();
                byte[0]
            })
            .unwrap();
        assert_eq!(thread.join().unwrap(), b'x');
        let mut reply = [0u8];
        host.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"y");
        assert!(target.accept().is_ok());
        // Other device threads get none of it.
        let rules = rules(ThreadKind::Device, false);
        assert!(!rules.contains_key(&libc::SYS_socket));
        assert!(!rules.contains_key(&libc::SYS_accept4));
    }

    #[test]
    fn a_share_thread_may_look_up_read_and_list_its_directory() {
        use pvm_virtio::fs::abi::{self, request};
        use vm_memory::ByteValued;

        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/pvm-seccomp-").unwrap();
        std::fs::write(dir.as_path().join("f"), "data").unwrap();
        std::os::unix::fs::symlink("f", dir.as_path().join("l")).unwrap();
        let fs = pvm_virtio::Fs::new(pvm_virtio::FsConfig::new(dir.as_path(), "t")).unwrap();
        let mut server = fs.session();
        let thread = std::thread::Builder::new()
            .name(format!("{}7", pvm_virtio::fs::THREAD_PREFIX))
            .spawn(move || {
                install_device_filter("virtio-fs7").unwrap();
                let mut out = Vec::new();
                let mut call = |op, node, body: &[u8]| {
                    server
                        .handle(&request(op, node, 1, body), 1 << 16, &mut out)
                        .unwrap();
                    assert_eq!(out[4..8], [0; 4], "op {op} failed");
                    out[16..].to_vec()
                };
                let init = abi::InitIn {
                    major: 7,
                    minor: 31,
                    ..Default::default()
                };
                call(abi::INIT, 0, init.as_slice());
                let f = abi::read_full::<abi::EntryOut>(&call(abi::LOOKUP, 1, b"f\0")).unwrap();
                let l = abi::read_full::<abi::EntryOut>(&call(abi::LOOKUP, 1, b"l\0")).unwrap();
                call(abi::GETATTR, f.nodeid, &[0; 16]);
                call(abi::STATFS, 1, &[]);
                let link = call(abi::READLINK, l.nodeid, &[]);
                let fh = |reply: Vec<u8>| abi::read_full::<abi::OpenOut>(&reply).unwrap().fh;
                let file = fh(call(abi::OPEN, f.nodeid, &[0; 8]));
                let dir = fh(call(abi::OPENDIR, 1, &[0; 8]));
                let read = |fh| abi::ReadIn {
                    fh,
                    size: 4096,
                    ..Default::default()
                };
                let data = call(abi::READ, 0, read(file).as_slice());
                let listing = call(abi::READDIRPLUS, 1, read(dir).as_slice());
                (data, link, listing.len())
            })
            .unwrap();
        let (data, link, listing) = thread.join().unwrap();
        assert_eq!(
            (data.as_slice(), link.as_slice()),
            (&b"data"[..], &b"f"[..])
        );
        assert!(listing > 0);
        // Other device threads open nothing; a share's opens are read-only ones.
        assert!(!rules(ThreadKind::Device, false).contains_key(&libc::SYS_openat));
        assert_eq!(fs_rules()[&libc::SYS_openat].len(), 1);
    }
}

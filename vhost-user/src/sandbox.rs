//! The backends' seccomp filter, installed on every thread at once (TSYNC) once the frontend
//! is connected and the library's threads run: from then on a backend only exchanges messages
//! on its connection, serves rings (its image or tap, eventfds, epoll) and manages memory. It
//! cannot open files, create sockets, threads or processes, or unlink its socket.
//! A call outside the filter raises SIGSYS; the handler names the call on stderr and exits
//! with [`SECCOMP_VIOLATION`].

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Exit code after a forbidden system call (as pvm's).
pub use pvm_common::exit::SECCOMP_VIOLATION;

/// Calls every backend makes once serving: messages, ring and backend I/O, memory, locks,
/// signals, logging, the end of threads and of the process. Thread start-up calls (rseq,
/// set_robust_list, sched_getaffinity) are there because the library's connection thread may
/// still be starting when the filter goes in.
const ALLOWED: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_fallocate,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_sched_getaffinity,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

fn rule(arg: u8, value: u64) -> SeccompRule {
    let condition = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .expect("argument index below 6");
    SeccompRule::new(vec![condition]).expect("one condition")
}

/// The system calls a serving backend may make, with their argument rules.
pub fn rules() -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    // TUNSETOFFLOAD only: the net backend follows the offloads the driver accepted.
    rules.insert(libc::SYS_ioctl, vec![rule(1, libc::TUNSETOFFLOAD)]);
    // Duplicating descriptors received in messages; closing checks them in debug builds.
    rules.insert(
        libc::SYS_fcntl,
        vec![
            rule(1, libc::F_DUPFD_CLOEXEC as u64),
            rule(1, libc::F_GETFD as u64),
        ],
    );
    // The library's connection thread names itself as it starts.
    rules.insert(libc::SYS_prctl, vec![rule(0, libc::PR_SET_NAME as u64)]);
    rules
}

/// The compiled filter: allowed calls pass, anything else traps.
pub fn filter() -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(
        rules(),
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| format!("building the seccomp filter: {e}"))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| format!("compiling the seccomp filter: {e}"))
}

static NAME: OnceLock<&'static str> = OnceLock::new();

/// Test hook: with this variable set, the backend calls getppid(2), which the filter forbids,
/// right after confining itself (tests check the report and the exit code).
pub const PROBE_ENV: &str = "PVM_VHOST_USER_SECCOMP_PROBE";

/// Installs the filter on every thread of the process.
pub fn confine(name: &'static str) -> Result<(), String> {
    let program = filter()?;
    let _ = NAME.set(name);
    let probe = std::env::var_os(PROBE_ENV).is_some();
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
        .map_err(|e| format!("installing the SIGSYS handler: {e}"))?;
    seccompiler::apply_filter_all_threads(&program)
        .map_err(|e| format!("installing the seccomp filter: {e}"))?;
    if probe {
        // SAFETY: getppid has no arguments and no effect; here it only raises SIGSYS.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
    Ok(())
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // siginfo's _sigsys._syscall: after signo, errno, code, padding (16) and the address (8).
    // SAFETY: the kernel passes the SIGSYS's siginfo (SA_SIGINFO); the field is inside it.
    let nr = unsafe { std::ptr::read_unaligned(info.cast::<u8>().add(24).cast::<i32>()) };
    let mut message = [0u8; 160];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(message.len() - len);
        message[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    put(NAME.get().copied().unwrap_or("pvm-vhost-user").as_bytes());
    put(b": seccomp: forbidden system call ");
    let mut digits = [0u8; 12];
    let mut at = digits.len();
    let mut v = nr.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[at..]);
    put(b" (--seccomp off disables the sandbox)\n");
    // SAFETY: write and _exit are async-signal-safe and allowed by the filter.
    unsafe {
        libc::write(libc::STDERR_FILENO, message.as_ptr().cast(), len);
        libc::_exit(SECCOMP_VIOLATION);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_and_forbids_opening_connecting_and_spawning() {
        assert!(!filter().unwrap().is_empty());
        let rules = rules();
        for nr in [
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_accept4,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_execve,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_kill,
            libc::SYS_ptrace,
        ] {
            assert!(!rules.contains_key(&nr), "system call {nr} allowed");
        }
    }
}

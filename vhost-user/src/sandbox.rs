//! The backends' seccomp filter, installed on every thread at once (TSYNC) once the frontend
//! is connected and the library's threads run: from then on a backend only exchanges messages
//! on its connection, serves rings (its image or tap, eventfds, epoll) and manages memory. It
//! cannot open files, create sockets, threads or processes, or unlink its socket.
//! A call outside the filter raises SIGSYS; the handler (`pvm_common::seccomp`, shared with pvm
//! like the calls every thread makes) names the call on stderr and exits with
//! [`SECCOMP_VIOLATION`].

use std::collections::BTreeMap;

use pvm_common::seccomp::{self as common, CallFormat, DATA_PLANE, EVERY_THREAD, Reporter};
use seccompiler::{BpfProgram, SeccompCmpArgLen, SeccompCmpOp, SeccompRule};

/// Exit code after a forbidden system call (as pvm's).
pub use pvm_common::exit::SECCOMP_VIOLATION;

/// What a serving backend calls beyond every thread's calls and the data plane's (its ring and
/// backend I/O): the frontend's messages. Thread start-up calls (rseq, set_robust_list,
/// sched_getaffinity) are there because the library's connection thread may still be starting
/// when the filter goes in.
const BACKEND: &[i64] = &[
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_sched_getaffinity,
];

/// A rule on the low 32 bits of argument `arg`: equal to `value`.
fn rule(arg: u8, value: u64) -> SeccompRule {
    common::rule(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

/// The system calls a serving backend may make, with their argument rules.
pub fn rules() -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules = common::allow(&[EVERY_THREAD, DATA_PLANE, BACKEND]);
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
pub fn filter() -> Result<BpfProgram, common::Error> {
    common::compile(rules(), "seccomp")
}

/// Test hook: with this variable set, the backend calls getppid(2), which the filter forbids,
/// right after confining itself (tests check the report and the exit code).
pub const PROBE_ENV: &str = "PVM_VHOST_USER_SECCOMP_PROBE";

fn no_last_step() {}

/// Installs the filter on every thread of the process; a forbidden call is reported as `name`'s.
pub fn confine(name: &'static str) -> Result<(), common::Error> {
    let program = filter()?;
    let probe = std::env::var_os(PROBE_ENV).is_some();
    common::install_reporter(Reporter {
        program: name,
        call: CallFormat::Number,
        consequence: "",
        before_exit: no_last_step,
    })?;
    seccompiler::apply_filter_all_threads(&program).map_err(|source| common::Error::Install {
        what: "seccomp filter".to_string(),
        source,
    })?;
    if probe {
        common::forbidden_call();
    }
    Ok(())
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

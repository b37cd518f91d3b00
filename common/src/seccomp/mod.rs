//! The seccomp pieces pvm and its backends share: the system calls every thread of either needs
//! ([`EVERY_THREAD`]) and those of a virtio data plane ([`DATA_PLANE`]), building and compiling
//! a filter from lists of calls and argument rules, and the report of a forbidden call
//! ([`Reporter`], the SIGSYS handler). Each binary adds the calls of its own threads and
//! installs the filters its own way (pvm per thread kind, the backends on all threads at once).

mod report;
mod syscall_names;

use std::collections::BTreeMap;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

pub use report::{
    CallFormat, Reporter, forbidden_call, format_decimal, install_reporter, set_thread_label,
    syscall_name, violation_message,
};
pub use syscall_names::SYSCALL_NAMES;

/// Calls every thread makes: memory management (the allocator, thread stacks), locks, logging
/// to stderr, clocks, signal returns, and ending the thread or the process.
pub const EVERY_THREAD: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
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
    // abort() on a failed assertion raises SIGABRT with tgkill.
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// What a virtio data plane calls (pvm-virtio's request code, in pvm's device threads and in the
/// backends alike): its event loop, and reading, writing and syncing its disk image or tap.
pub const DATA_PLANE: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_readv,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_fallocate,
];

/// Why a filter could not be built, compiled or installed; `what` names the filter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("building the {what} filter: {source}")]
    Build {
        what: &'static str,
        source: BackendError,
    },
    #[error("compiling the {what} filter: {source}")]
    Compile {
        what: &'static str,
        source: BackendError,
    },
    #[error("installing the {what}: {source}")]
    Install {
        what: String,
        source: seccompiler::Error,
    },
    #[error("installing the SIGSYS handler: {0}")]
    Handler(#[source] vmm_sys_util::errno::Error),
}

/// Rules that allow each call of `lists` whatever its arguments (an empty rule list).
pub fn allow(lists: &[&[i64]]) -> BTreeMap<i64, Vec<SeccompRule>> {
    lists
        .iter()
        .flat_map(|list| list.iter())
        .map(|&nr| (nr, Vec::new()))
        .collect()
}

/// Argument `arg` (0 to 5) of `len` compared by `op` with `value`.
pub fn condition(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, len, op, value).expect("argument index below 6")
}

/// A rule of one [`condition`].
pub fn rule(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> SeccompRule {
    SeccompRule::new(vec![condition(arg, len, op, value)]).expect("one condition")
}

/// The filter of `rules` for x86_64: allowed calls pass, anything else traps (SIGSYS, which
/// [`install_reporter`]'s handler reports).
pub fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    what: &'static str,
) -> Result<BpfProgram, Error> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|source| Error::Build { what, source })?;
    filter
        .try_into()
        .map_err(|source| Error::Compile { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_lists_compile_and_allow_nothing_that_opens_or_spawns() {
        let mut rules = allow(&[EVERY_THREAD, DATA_PLANE]);
        assert_eq!(rules.len(), EVERY_THREAD.len() + DATA_PLANE.len());
        rules.insert(
            libc::SYS_fcntl,
            vec![rule(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::F_GETFD as u64,
            )],
        );
        for nr in [
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_execve,
            libc::SYS_kill,
            libc::SYS_ptrace,
            libc::SYS_getppid,
        ] {
            assert!(!rules.contains_key(&nr), "{}", syscall_name(nr));
        }
        assert!(!compile(rules, "test").unwrap().is_empty());
    }
}

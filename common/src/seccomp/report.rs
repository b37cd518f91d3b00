//! The report of a forbidden system call. A filter's trap raises SIGSYS in the thread that made
//! the call; the handler writes one line naming the program, the thread (where it has a label)
//! and the call, runs the program's last step (pvm puts the terminal back) and exits with
//! [`SECCOMP_VIOLATION`]. Nothing in the handler allocates or locks.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use super::Error;
use super::syscall_names::SYSCALL_NAMES;
use crate::exit::SECCOMP_VIOLATION;

/// How the report writes the system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallFormat {
    /// "110".
    Number,
    /// "getppid (110)"; "? (NR)" for a number the table does not know.
    NameAndNumber,
}

/// What a process's report says, and does before the process exits.
#[derive(Clone, Copy, Debug)]
pub struct Reporter {
    /// The line's first word: "pvm", "pvm-vhost-user-blk".
    pub program: &'static str,
    pub call: CallFormat,
    /// Said right after the call, e.g. "; stopping the VM"; may be empty.
    pub consequence: &'static str,
    /// Runs in the signal handler once the line is written; must be async-signal-safe.
    pub before_exit: fn(),
}

static REPORTER: OnceLock<Reporter> = OnceLock::new();
static HANDLER_INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The calling thread's label for the report (no allocation in the handler).
    static THREAD_LABEL: Cell<[u8; 32]> = const { Cell::new([0; 32]) };
}

/// Sets the process's reporter (the first one set stays) and, once per process, installs the
/// SIGSYS handler that reports with it. Call it before installing a filter.
pub fn install_reporter(reporter: Reporter) -> Result<(), Error> {
    let _ = REPORTER.set(reporter);
    if HANDLER_INSTALLED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys).map_err(|e| {
        HANDLER_INSTALLED.store(false, Ordering::SeqCst);
        Error::Handler(e)
    })
}

/// Names the calling thread in its reports ("thread LABEL made the forbidden system call");
/// kept to 32 bytes. A thread without a label reports only the call.
pub fn set_thread_label(label: &str) {
    let mut bytes = [0u8; 32];
    let len = label.len().min(bytes.len());
    bytes[..len].copy_from_slice(&label.as_bytes()[..len]);
    THREAD_LABEL.with(|cell| cell.set(bytes));
}

/// Makes a system call no filter allows (getppid), for the test hooks that check the report
/// and the exit code.
pub fn forbidden_call() {
    // SAFETY: getppid has no arguments and no effect; under a filter it only raises SIGSYS.
    unsafe { libc::syscall(libc::SYS_getppid) };
}

/// The name of system call `nr`, or "" when unknown.
pub fn syscall_name(nr: i64) -> &'static str {
    usize::try_from(nr)
        .ok()
        .and_then(|i| SYSCALL_NAMES.get(i))
        .copied()
        .unwrap_or("")
}

/// The report of system call `nr` made by `thread` (empty: no label), written into `out`
/// without allocating; returns its length.
pub fn violation_message(out: &mut [u8], reporter: &Reporter, thread: &[u8], nr: i64) -> usize {
    let mut number = [0u8; 24];
    let digits = format_decimal(&mut number, nr);
    let name = match syscall_name(nr) {
        "" => "?",
        name => name,
    };
    let mut len = 0;
    let mut put = |part: &[u8]| {
        let n = part.len().min(out.len() - len);
        out[len..len + n].copy_from_slice(&part[..n]);
        len += n;
    };
    put(reporter.program.as_bytes());
    put(b": seccomp: ");
    if !thread.is_empty() {
        put(b"thread ");
        put(thread);
        put(b" made the ");
    }
    put(b"forbidden system call ");
    match reporter.call {
        CallFormat::Number => put(digits),
        CallFormat::NameAndNumber => {
            put(name.as_bytes());
            put(b" (");
            put(digits);
            put(b")");
        }
    }
    put(reporter.consequence.as_bytes());
    put(b" (--seccomp off disables the sandbox)\n");
    len
}

/// `value` in decimal, written into the end of `buf` without allocating (for signal
/// handlers); returns the digits.
pub fn format_decimal(buf: &mut [u8; 24], value: i64) -> &[u8] {
    let negative = value < 0;
    let mut v = value.unsigned_abs();
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if negative {
        at -= 1;
        buf[at] = b'-';
    }
    &buf[at..]
}

/// The system call number a SIGSYS from seccomp carries (siginfo's `_sigsys._syscall`: after
/// signo, errno, code and padding (16 bytes), then the call address (8 bytes)).
///
/// # Safety
/// `info` must point to the siginfo_t of a SIGSYS.
unsafe fn sigsys_syscall(info: *const libc::siginfo_t) -> i32 {
    // SAFETY: the caller passes a valid siginfo_t; the field lies within its 128 bytes.
    unsafe { std::ptr::read_unaligned(info.cast::<u8>().add(24).cast::<i32>()) }
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes the SIGSYS's siginfo (SA_SIGINFO).
    let nr = i64::from(unsafe { sigsys_syscall(info) });
    // Always set: the handler is installed only after the reporter.
    if let Some(reporter) = REPORTER.get() {
        let label = THREAD_LABEL.with(Cell::get);
        let thread_len = label.iter().position(|&b| b == 0).unwrap_or(label.len());
        let mut message = [0u8; 256];
        let len = violation_message(&mut message, reporter, &label[..thread_len], nr);
        // SAFETY: write is async-signal-safe and every filter allows it; the buffer is ours.
        unsafe { libc::write(libc::STDERR_FILENO, message.as_ptr().cast(), len) };
        (reporter.before_exit)();
    }
    // SAFETY: _exit is async-signal-safe and every filter allows exit_group.
    unsafe { libc::_exit(SECCOMP_VIOLATION) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(reporter: &Reporter, thread: &[u8], nr: i64) -> String {
        let mut out = [0u8; 256];
        let len = violation_message(&mut out, reporter, thread, nr);
        String::from_utf8(out[..len].to_vec()).unwrap()
    }

    #[test]
    fn the_report_names_program_thread_and_call_as_each_binary_asks() {
        let pvm = Reporter {
            program: "pvm",
            call: CallFormat::NameAndNumber,
            consequence: "; stopping the VM",
            before_exit: || {},
        };
        assert_eq!(
            message(&pvm, b"virtio-blk0 (device)", libc::SYS_openat),
            "pvm: seccomp: thread virtio-blk0 (device) made the forbidden system call openat \
             (257); stopping the VM (--seccomp off disables the sandbox)\n"
        );
        assert!(message(&pvm, b"t", 9999).contains(" ? (9999)"));
        let backend = Reporter {
            program: "pvm-vhost-user-blk",
            call: CallFormat::Number,
            consequence: "",
            before_exit: || {},
        };
        assert_eq!(
            message(&backend, b"", libc::SYS_getppid),
            "pvm-vhost-user-blk: seccomp: forbidden system call 110 (--seccomp off disables \
             the sandbox)\n"
        );
        // A message longer than the buffer is cut, not overrun.
        let mut short = [0u8; 10];
        assert_eq!(violation_message(&mut short, &pvm, b"t", 1), 10);
    }

    #[test]
    fn names_match_libc_and_labels_are_kept_to_32_bytes() {
        assert_eq!(syscall_name(libc::SYS_read), "read");
        assert_eq!(syscall_name(libc::SYS_openat), "openat");
        assert_eq!(syscall_name(libc::SYS_clone3), "clone3");
        assert_eq!(syscall_name(-1), "");
        assert_eq!(syscall_name(100_000), "");
        set_thread_label(&"x".repeat(40));
        assert_eq!(THREAD_LABEL.with(Cell::get), [b'x'; 32]);
    }
}

//! How a VM run ends, and the process exit code for each ending. The first ending reported wins:
//! a pvpanic write followed by the panic's reboot is a panic, not a reboot.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use vmm_sys_util::eventfd::EventFd;

pub const GUEST_POWER_OFF: i32 = 0;
/// pvm itself, KVM or the host failed (an ioctl, an eventfd, a thread, memory); the code the
/// backends use for a failure while serving.
pub const VMM_FAILURE: i32 = pvm_common::exit::FAILURE;
/// The user's mistake: a bad command line, an unreadable file named on it, a missing tap.
pub const USAGE_ERROR: i32 = pvm_common::exit::USAGE_ERROR;
pub const GUEST_PANIC: i32 = 3;
pub const GUEST_TRIPLE_FAULT: i32 = 4;
pub const KVM_RUN_FAILURE: i32 = 5;
/// A pvm thread made a system call its seccomp filter does not allow (see crate::seccomp).
pub use pvm_common::exit::SECCOMP_VIOLATION;
// A bad command line or an unreadable file named on it (see crate::cli).
/// Added to the number of the signal that stopped pvm.
pub const SIGNAL_BASE: i32 = 128;

/// Every exit code pvm ends with and what it means; `pvm --help` lists them from here. A signal
/// N that stops pvm gives [`SIGNAL_BASE`] + N.
pub const EXIT_CODES: &[(i32, &str)] = &[
    (GUEST_POWER_OFF, "guest powered off or rebooted"),
    (VMM_FAILURE, "VMM failure"),
    (USAGE_ERROR, "bad command line"),
    (GUEST_PANIC, "guest panic"),
    (GUEST_TRIPLE_FAULT, "guest triple fault"),
    (KVM_RUN_FAILURE, "KVM could not run the guest"),
    (SECCOMP_VIOLATION, "seccomp violation"),
];

/// The exit-status paragraph of `pvm --help`, from [`EXIT_CODES`].
pub fn exit_status_help() -> String {
    let codes: Vec<String> = EXIT_CODES
        .iter()
        .map(|(code, meaning)| format!("{code} {meaning}"))
        .collect();
    format!(
        "Exit status: {}, {SIGNAL_BASE}+N stopped by signal N.",
        codes.join(", ")
    )
}

/// How the guest (or the run) ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// ACPI S5 or i8042-style power-off.
    PowerOff,
    /// The guest rebooted (i8042 reset); pvm ends the VM rather than restarting it.
    Reboot,
    /// The guest reported a panic through pvpanic.
    Panic,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// KVM could not run the guest (internal error, emulation failure, failed entry); details.
    KvmFailure(String),
    /// pvm was asked to stop by this signal (SIGINT, SIGTERM, SIGHUP).
    Signal(i32),
    /// The user typed the console's quit escape (Ctrl-A x); ends like SIGINT.
    ConsoleQuit,
    /// A pvm thread failed while the guest ran.
    VmmFailure(String),
    /// The sandbox's command ended with this status (crate::devices::exit_port).
    GuestExit(u8),
}

impl Outcome {
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::PowerOff | Outcome::Reboot => GUEST_POWER_OFF,
            Outcome::Panic => GUEST_PANIC,
            Outcome::TripleFault => GUEST_TRIPLE_FAULT,
            Outcome::KvmFailure(_) => KVM_RUN_FAILURE,
            Outcome::Signal(signo) => SIGNAL_BASE + signo,
            Outcome::ConsoleQuit => SIGNAL_BASE + libc::SIGINT,
            Outcome::VmmFailure(_) => VMM_FAILURE,
            Outcome::GuestExit(status) => i32::from(*status),
        }
    }

    /// What pvm prints on stderr for this ending, if anything.
    pub fn message(&self) -> Option<String> {
        match self {
            Outcome::PowerOff | Outcome::Reboot | Outcome::GuestExit(_) => None,
            Outcome::Panic => Some("the guest kernel panicked (pvpanic)".to_string()),
            Outcome::TripleFault => {
                Some("the guest triple-faulted (KVM_EXIT_SHUTDOWN)".to_string())
            }
            Outcome::KvmFailure(detail) => Some(format!("KVM could not run the guest: {detail}")),
            Outcome::Signal(signo) => Some(format!("stopped by signal {signo}")),
            Outcome::ConsoleQuit => Some("stopped from the console (Ctrl-A x)".to_string()),
            Outcome::VmmFailure(detail) => Some(detail.clone()),
        }
    }
}

/// Where devices and vCPUs report that the VM should end; the main loop waits on `event`.
#[derive(Debug)]
pub struct EndSignal {
    outcome: Mutex<Option<Outcome>>,
    /// Set with the outcome; vCPUs read it after every exit, so the one that powered off or
    /// reset the machine never runs the guest again.
    ended: AtomicBool,
    event: EventFd,
}

impl EndSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(EndSignal {
            outcome: Mutex::new(None),
            ended: AtomicBool::new(false),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `outcome` unless an earlier one is recorded, and wakes the main loop.
    pub fn end(&self, outcome: Outcome) {
        let mut slot = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(outcome);
        }
        self.ended.store(true, Ordering::Release);
        // A full eventfd counter still wakes the loop, so a failed write loses nothing.
        let _ = self.event.write(1);
    }

    /// Whether an outcome is recorded: the VM is ending and no vCPU should enter the guest.
    pub fn has_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

/// Formats an error with its chain of sources on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_where_it_matters() {
        assert_eq!(Outcome::PowerOff.exit_code(), 0);
        assert_eq!(Outcome::Reboot.exit_code(), 0);
        assert_eq!(Outcome::Panic.exit_code(), GUEST_PANIC);
        assert_eq!(Outcome::TripleFault.exit_code(), GUEST_TRIPLE_FAULT);
        assert_eq!(Outcome::KvmFailure("x".into()).exit_code(), KVM_RUN_FAILURE);
        assert_eq!(Outcome::Signal(15).exit_code(), 143);
        assert!(Outcome::PowerOff.message().is_none());
        assert!(Outcome::Panic.message().unwrap().contains("panic"));
    }

    #[test]
    fn every_ending_has_a_listed_code() {
        let listed: Vec<i32> = EXIT_CODES.iter().map(|&(code, _)| code).collect();
        for outcome in [
            Outcome::PowerOff,
            Outcome::Reboot,
            Outcome::Panic,
            Outcome::TripleFault,
            Outcome::KvmFailure(String::new()),
            Outcome::VmmFailure(String::new()),
        ] {
            assert!(listed.contains(&outcome.exit_code()), "{outcome:?}");
        }
        for code in [USAGE_ERROR, SECCOMP_VIOLATION] {
            assert!(listed.contains(&code), "{code}");
        }
        let mut distinct = listed.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), listed.len(), "{listed:?}");
        assert!(listed.iter().all(|&code| code < SIGNAL_BASE));
        assert_eq!(Outcome::ConsoleQuit.exit_code(), SIGNAL_BASE + libc::SIGINT);
    }

    #[test]
    fn first_ending_wins() {
        let s = EndSignal::new().unwrap();
        assert_eq!(s.outcome(), None);
        s.end(Outcome::Panic);
        s.end(Outcome::Reboot);
        assert_eq!(s.outcome(), Some(Outcome::Panic));
        assert_eq!(s.event().read().unwrap(), 2);
    }
}

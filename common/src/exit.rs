//! The exit codes pvm and its backends both use. pvm adds the guest's endings (3 to 5, and
//! 128+N for a signal) in its own `exit` module.

/// Something failed after start-up: pvm itself rather than the guest, or a backend while
/// serving.
pub const FAILURE: i32 = 1;
/// A bad command line, or a file or device named on it that cannot be used.
pub const USAGE_ERROR: i32 = 2;
/// A thread made a system call its seccomp filter does not allow.
pub const SECCOMP_VIOLATION: i32 = 6;

//! What pvm and its vhost-user backends (`pvm-vhost-user-blk`, `pvm-vhost-user-net`) share, so
//! each piece exists once: the exit codes both report, the stderr logger, clap errors as one
//! line and the value parsers both take, the system calls every thread needs and the report of
//! a forbidden one. Each binary passes what differs between them (its name, its line ending,
//! how it reports) as parameters.
//!
//! No KVM here: the backends depend on this crate and must not depend on pvm or kvm-ioctls.

pub mod cli;
pub mod exit;
pub mod logger;
pub mod seccomp;

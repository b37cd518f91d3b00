//! pvm's logger: the shared one (`pvm_common::logger`). On stderr its lines are prefixed
//! "pvm: " so they stand apart from the guest console on the terminal; with `--log-path` (or
//! the API's PUT /logger through [`configure`]) they go to a file or FIFO in the line
//! format microVM tooling reads. Level comes from `--level` or `--log-level` (default warn).
//!
//! Everything pvm prints on stderr goes through [`to_stderr`] or the logger, never `eprint!`:
//! that panics when the write fails, e.g. with EPIPE on a pipe whose reader has gone (Rust
//! ignores SIGPIPE), and a lost message must neither stop the guest nor change the exit code.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use log::LevelFilter;
use pvm_common::logger::{FileFormat, LineEnd};

pub use pvm_common::logger::{missed_log_count, to_stderr};

/// The instance id log lines and metrics name when none is given (as Firecracker's).
pub const DEFAULT_INSTANCE_ID: &str = "anonymous-instance";

/// Where and how pvm logs: `--log-path`, `--level`, `--show-level`, `--show-log-origin`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoggerConfig {
    /// A file or FIFO; lines are appended. None: stderr.
    pub log_path: Option<PathBuf>,
    /// None keeps the level set at start (`--log-level`, default warn).
    pub level: Option<LevelFilter>,
    pub show_level: bool,
    pub show_log_origin: bool,
}

/// Why the log file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the log file {}: {source}", .path.display())]
pub struct Error {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Installs the logger once; later calls only change the level.
pub fn init(level: LevelFilter) {
    // The terminal is in raw mode while the guest runs: it needs the explicit carriage return.
    pvm_common::logger::init("pvm", LineEnd::CarriageReturnNewline, level);
}

/// Applies `config` for instance `instance_id`: with a log path, opens it (created if missing,
/// appended to, never truncated; non-blocking, so a FIFO nobody reads loses lines instead of
/// stalling a vCPU) and sends every later line there. [`init`] must have run.
pub fn configure(config: &LoggerConfig, instance_id: &str) -> Result<(), Error> {
    let level = config.level.unwrap_or_else(log::max_level);
    let Some(path) = &config.log_path else {
        log::set_max_level(level);
        return Ok(());
    };
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| Error {
            path: path.clone(),
            source,
        })?;
    let format = FileFormat {
        instance_id: instance_id.to_string(),
        show_level: config.show_level,
        show_origin: config.show_log_origin,
    };
    pvm_common::logger::log_to_file(file, format, level);
    Ok(())
}

/// Parses `--level` as Firecracker spells it: case-insensitive, "warning" for warn.
pub fn parse_level(text: &str) -> Result<LevelFilter, pvm_common::cli::NotALogLevel> {
    if text.eq_ignore_ascii_case("warning") {
        return Ok(LevelFilter::Warn);
    }
    pvm_common::cli::parse_log_level(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_as_firecracker_spells_them() {
        assert_eq!(parse_level("Warning").unwrap(), LevelFilter::Warn);
        assert_eq!(parse_level("INFO").unwrap(), LevelFilter::Info);
        assert_eq!(parse_level("off").unwrap(), LevelFilter::Off);
        assert!(parse_level("loud").is_err());
    }
}

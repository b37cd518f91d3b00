//! A minimal stderr logger for the `log` facade, prefixed so pvm's lines stand apart from the
//! guest console on the terminal. Level comes from `--log-level` (default warn).
//!
//! Everything pvm prints on stderr goes through [`to_stderr`] or the logger, never `eprint!`:
//! that panics when the write fails, e.g. with EPIPE on a pipe whose reader has gone (Rust
//! ignores SIGPIPE), and a lost message must neither stop the guest nor change the exit code.

use std::io::Write;

use log::{LevelFilter, Log, Metadata, Record};

/// Writes `text` to stderr, ignoring failure.
pub fn to_stderr(text: &str) {
    let _ = std::io::stderr().write_all(text.as_bytes());
}

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            // A raw-mode terminal needs the explicit carriage return.
            let _ = write!(
                std::io::stderr(),
                "pvm: {}: {}\r\n",
                record.level().as_str().to_lowercase(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger once; later calls only change the level.
pub fn init(level: LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

//! pvm's stderr logger: the shared one (`pvm_common::logger`), prefixed "pvm: " so pvm's lines
//! stand apart from the guest console on the terminal. Level comes from `--log-level` (default
//! warn).
//!
//! Everything pvm prints on stderr goes through [`to_stderr`] or the logger, never `eprint!`:
//! that panics when the write fails, e.g. with EPIPE on a pipe whose reader has gone (Rust
//! ignores SIGPIPE), and a lost message must neither stop the guest nor change the exit code.

use log::LevelFilter;
use pvm_common::logger::LineEnd;

pub use pvm_common::logger::to_stderr;

/// Installs the logger once; later calls only change the level.
pub fn init(level: LevelFilter) {
    // The terminal is in raw mode while the guest runs: it needs the explicit carriage return.
    pvm_common::logger::init("pvm", LineEnd::CarriageReturnNewline, level);
}

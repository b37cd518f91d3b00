//! A minimal stderr logger for the `log` facade: "PROGRAM: level: message", so a binary's lines
//! stand apart from whatever else shares the terminal (pvm's guest console).
//!
//! Everything these binaries print on stderr goes through [`to_stderr`] or the logger, never
//! `eprint!`: that panics when the write fails, e.g. with EPIPE on a pipe whose reader has gone
//! (Rust ignores SIGPIPE), and a lost message must neither stop the work nor change the exit
//! code.

use std::io::Write;
use std::sync::OnceLock;

use log::{LevelFilter, Log, Metadata, Record};

/// Writes `text` to stderr in one write, ignoring failure.
pub fn to_stderr(text: &str) {
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// How each log line ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineEnd {
    /// "\n".
    Newline,
    /// "\r\n": a terminal in raw mode (pvm's, while the guest runs) moves down a line on "\n"
    /// without going back to the first column.
    CarriageReturnNewline,
}

impl LineEnd {
    fn as_str(self) -> &'static str {
        match self {
            LineEnd::Newline => "\n",
            LineEnd::CarriageReturnNewline => "\r\n",
        }
    }
}

struct StderrLogger {
    program: &'static str,
    line_end: LineEnd,
}

impl StderrLogger {
    fn line(&self, record: &Record) -> String {
        format!(
            "{}: {}: {}{}",
            self.program,
            record.level().as_str().to_lowercase(),
            record.args(),
            self.line_end.as_str()
        )
    }
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            to_stderr(&self.line(record));
        }
    }

    fn flush(&self) {}
}

static LOGGER: OnceLock<StderrLogger> = OnceLock::new();

/// Installs the logger once, as `program` with lines ending in `line_end`; later calls only
/// change the level.
pub fn init(program: &'static str, line_end: LineEnd, level: LevelFilter) {
    let logger = LOGGER.get_or_init(|| StderrLogger { program, line_end });
    let _ = log::set_logger(logger);
    log::set_max_level(level);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_name_the_program_and_level_and_end_as_asked() {
        let line = |line_end| {
            let logger = StderrLogger {
                program: "pvm",
                line_end,
            };
            logger.line(
                &Record::builder()
                    .level(log::Level::Warn)
                    .args(format_args!("disk {} is slow", 0))
                    .build(),
            )
        };
        assert_eq!(line(LineEnd::Newline), "pvm: warn: disk 0 is slow\n");
        assert_eq!(
            line(LineEnd::CarriageReturnNewline),
            "pvm: warn: disk 0 is slow\r\n"
        );
    }
}

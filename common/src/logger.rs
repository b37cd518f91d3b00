//! A minimal logger for the `log` facade. On stderr: "PROGRAM: level: message", so a binary's
//! lines stand apart from whatever else shares the terminal (pvm's guest console). Sent to a
//! file or FIFO instead ([`log_to_file`]), lines take the shape microVM tooling parses:
//! "TIME [INSTANCE:THREAD(:LEVEL)(:FILE:LINE)] message", one write per line.
//!
//! Everything these binaries print on stderr goes through [`to_stderr`] or the logger, never
//! `eprint!`: that panics when the write fails, e.g. with EPIPE on a pipe whose reader has gone
//! (Rust ignores SIGPIPE), and a lost message must neither stop the work nor change the exit
//! code.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, PoisonError, RwLock};

use log::{LevelFilter, Log, Metadata, Record};

unsafe extern "C" {
    /// POSIX tzset(3); the libc crate does not bind it.
    fn tzset();
}

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

/// How lines written to a log file look.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileFormat {
    /// The instance id every line names (pvm's `--id`).
    pub instance_id: String,
    /// Adds ":LEVEL" after the thread name.
    pub show_level: bool,
    /// Adds ":FILE:LINE" of the log call.
    pub show_origin: bool,
}

impl FileFormat {
    /// The line for `record`, logged at `time` (already formatted) by thread `thread`.
    fn line(&self, time: &str, thread: &str, record: &Record) -> String {
        let mut tag = format!("{}:{thread}", self.instance_id);
        if self.show_level {
            tag.push(':');
            tag.push_str(record.level().as_str());
        }
        if self.show_origin {
            tag.push_str(&format!(
                ":{}:{}",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            ));
        }
        format!("{time} [{tag}] {}\n", record.args())
    }
}

/// Lines that could not be written to the log file (a full FIFO, a failing disk).
static MISSED: AtomicU64 = AtomicU64::new(0);

/// How many log lines were lost so far because the log file's write failed.
pub fn missed_log_count() -> u64 {
    MISSED.load(Ordering::Relaxed)
}

/// Local time as "YYYY-MM-DDTHH:MM:SS.nnnnnnnnn".
fn local_time() -> String {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the live local.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
    // SAFETY: an all-zero tm is a valid value of this plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals; localtime_r keeps neither. The time zone was
    // loaded by tzset() in log_to_file, before any sandbox could forbid reading it.
    if unsafe { libc::localtime_r(&now.tv_sec, &mut tm) }.is_null() {
        return format!("{}.{:09}", now.tv_sec, now.tv_nsec);
    }
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        now.tv_nsec
    )
}

struct StderrLogger {
    program: &'static str,
    line_end: LineEnd,
    /// Set by [`log_to_file`]: lines go there, not to stderr.
    file: RwLock<Option<(File, FileFormat)>>,
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
        if !self.enabled(record.metadata()) {
            return;
        }
        let file = self.file.read().unwrap_or_else(PoisonError::into_inner);
        match &*file {
            None => to_stderr(&self.line(record)),
            Some((file, format)) => {
                let mut out: &File = file;
                let thread = std::thread::current();
                let line = format.line(&local_time(), thread.name().unwrap_or("?"), record);
                // One write per line, so lines from several threads do not interleave; a
                // failed one (a FIFO nobody drains) is counted, never waited for.
                if out.write_all(line.as_bytes()).is_err() {
                    MISSED.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn flush(&self) {}
}

static LOGGER: OnceLock<StderrLogger> = OnceLock::new();

/// Installs the logger once, as `program` with lines ending in `line_end`; later calls only
/// change the level.
pub fn init(program: &'static str, line_end: LineEnd, level: LevelFilter) {
    let logger = LOGGER.get_or_init(|| StderrLogger {
        program,
        line_end,
        file: RwLock::new(None),
    });
    let _ = log::set_logger(logger);
    log::set_max_level(level);
}

/// Sends every later line to `file` (opened by the caller: a file or FIFO, for appending) in
/// `format`, at `level`, instead of stderr; [`init`] must have run. Calling it again replaces
/// the file and format.
pub fn log_to_file(file: File, format: FileFormat, level: LevelFilter) {
    // Loads the time zone now: under a seccomp filter localtime_r could not open it.
    // SAFETY: tzset only reads the environment and the zone file into libc's own state.
    unsafe { tzset() };
    if let Some(logger) = LOGGER.get() {
        *logger.file.write().unwrap_or_else(PoisonError::into_inner) = Some((file, format));
    }
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
                file: RwLock::new(None),
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

    #[test]
    fn file_lines_carry_time_instance_thread_and_the_asked_extras() {
        let mut format = FileFormat {
            instance_id: "vm-1".to_string(),
            show_level: false,
            show_origin: false,
        };
        let line = |format: &FileFormat| {
            format.line(
                "2026-12-06T18:00:00.000000001",
                "vcpu0",
                &Record::builder()
                    .level(log::Level::Warn)
                    .file(Some("src/vm/mod.rs"))
                    .line(Some(42))
                    .args(format_args!("tap {} up", "tap0"))
                    .build(),
            )
        };
        assert_eq!(
            line(&format),
            "2026-12-06T18:00:00.000000001 [vm-1:vcpu0] tap tap0 up\n"
        );
        format.show_level = true;
        assert_eq!(
            line(&format),
            "2026-12-06T18:00:00.000000001 [vm-1:vcpu0:WARN] tap tap0 up\n"
        );
        format.show_origin = true;
        assert_eq!(
            line(&format),
            "2026-12-06T18:00:00.000000001 [vm-1:vcpu0:WARN:src/vm/mod.rs:42] tap tap0 up\n"
        );
        format.show_level = false;
        assert_eq!(
            line(&format),
            "2026-12-06T18:00:00.000000001 [vm-1:vcpu0:src/vm/mod.rs:42] tap tap0 up\n"
        );
    }

    #[test]
    fn local_time_has_the_documented_shape() {
        let time = local_time();
        let shape: String = time
            .chars()
            .map(|c| if c.is_ascii_digit() { '9' } else { c })
            .collect();
        assert_eq!(shape, "9999-99-99T99:99:99.999999999", "{time}");
    }
}

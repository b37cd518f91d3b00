//! What both backend binaries share: parsing flags into one-line errors (exit 2), the flags
//! both take, a stderr logger, and running a backend to the end of its connection.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Parser;
use log::LevelFilter;
use pvm_common::cli::{MacError, Stop, parse_log_level, parse_on_off};
use pvm_common::logger::to_stderr;

/// Exit code for a bad command line (or a file or tap named on it that cannot be used), and
/// exit code when serving failed after start-up.
pub use pvm_common::exit::{FAILURE, USAGE_ERROR};

/// Parses `args` for program `name`; on a bad command line prints one line naming the flag
/// and returns Err(exit code); --help and --version print and return Err(0).
pub fn parse<A: Parser>(name: &str, args: impl IntoIterator<Item = OsString>) -> Result<A, i32> {
    pvm_common::cli::parse(args).map_err(|stop| match stop {
        Stop::Info(text) => {
            // Not print!, which panics on a closed pipe.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
            0
        }
        Stop::Usage(line) => {
            to_stderr(&format!("{name}: {line}\n"));
            USAGE_ERROR
        }
    })
}

/// The flags both backends take, after their own.
#[derive(clap::Args, Debug)]
pub struct CommonArgs {
    /// The seccomp sandbox: on (once the frontend is connected every thread may only serve
    /// it; a forbidden system call ends the backend naming it, exit 6) or off, for debugging.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off,
          action = clap::ArgAction::Set)]
    pub seccomp: bool,

    /// How much to log on stderr: off, error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL", default_value = "warn", value_parser = parse_log_level)]
    pub log_level: LevelFilter,
}

/// Parses `--mac`: six colon-separated hex bytes, unicast.
pub fn parse_mac(text: &str) -> Result<[u8; 6], MacError> {
    pvm_common::cli::parse_mac(text).map_err(|e| match e {
        // The backend answers a non-hex byte with the expected form, as it always has.
        MacError::NonHex { text, .. } => MacError::Shape(text),
        e => e,
    })
}

/// `FILE[,ro]` of `--disk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskArg {
    pub path: PathBuf,
    pub read_only: bool,
}

/// A flag value the backends refuse; clap names the flag.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    #[error("a disk needs a file: --disk FILE[,ro]")]
    NoDiskFile,
    #[error("unknown disk option '{0}' (known: ro)")]
    DiskOption(String),
    #[error("the socket needs a path")]
    NoSocketPath,
    #[error("{0} is a directory")]
    SocketIsDirectory(String),
}

pub fn parse_disk(text: &str) -> Result<DiskArg, ArgError> {
    let mut parts = text.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err(ArgError::NoDiskFile);
    }
    let mut disk = DiskArg {
        path: PathBuf::from(path),
        read_only: false,
    };
    for option in parts {
        match option {
            "ro" => disk.read_only = true,
            _ => return Err(ArgError::DiskOption(option.to_string())),
        }
    }
    Ok(disk)
}

/// Parses `--socket`: a path that names no directory.
pub fn parse_socket(text: &str) -> Result<PathBuf, ArgError> {
    if text.is_empty() {
        return Err(ArgError::NoSocketPath);
    }
    let path = PathBuf::from(text);
    if path.is_dir() {
        return Err(ArgError::SocketIsDirectory(text.to_string()));
    }
    Ok(path)
}

/// Sends `log` output to stderr as "NAME: level: message".
pub fn init_logger(name: &'static str, level: LevelFilter) {
    pvm_common::logger::init(name, pvm_common::logger::LineEnd::Newline, level);
}

/// Serves `backend` on `socket` until the frontend disconnects (confined by seccomp with
/// `sandbox`); returns the exit code.
pub fn run<B>(name: &'static str, backend: B, socket: &Path, sandbox: bool, what: &str) -> i32
where
    B: vhost_user_backend::VhostUserBackendMut<Bitmap = (), Vring = crate::Vring>
        + crate::Watched
        + 'static,
{
    let ready = || {
        // Scripts and tests wait for this line before starting the VMM.
        to_stderr(&format!("{name}: serving {what} on {}\n", socket.display()));
    };
    match crate::serve(name, backend, socket, sandbox, ready) {
        Ok(()) => {
            to_stderr(&format!("{name}: the frontend disconnected; exiting\n"));
            0
        }
        Err(e @ crate::ServeError::Listen { .. }) => {
            to_stderr(&format!("{name}: --socket {e}\n"));
            USAGE_ERROR
        }
        Err(e) => {
            to_stderr(&format!("{name}: {e}\n"));
            FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_macs_and_sockets() {
        assert_eq!(
            parse_disk("a.img,ro").unwrap(),
            DiskArg {
                path: PathBuf::from("a.img"),
                read_only: true
            }
        );
        assert!(!parse_disk("a.img").unwrap().read_only);
        assert!(parse_disk(",ro").is_err());
        assert!(
            parse_disk("a.img,rw")
                .unwrap_err()
                .to_string()
                .contains("unknown disk option 'rw'")
        );
        assert_eq!(
            parse_mac("52:54:00:ab:cd:ef").unwrap(),
            [0x52, 0x54, 0, 0xab, 0xcd, 0xef]
        );
        assert!(
            parse_mac("01:00:00:00:00:00")
                .unwrap_err()
                .to_string()
                .contains("multicast")
        );
        assert!(parse_mac("52:54").is_err());
        assert!(
            parse_mac("zz:54:00:ab:cd:ef")
                .unwrap_err()
                .to_string()
                .contains("must be six hex bytes")
        );
        assert!(parse_socket("").is_err());
        assert!(
            parse_socket("/")
                .unwrap_err()
                .to_string()
                .contains("directory")
        );
    }
}

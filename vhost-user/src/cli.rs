//! What both backend binaries share: parsing flags into one-line errors (exit 2), a stderr
//! logger, and running a backend to the end of its connection.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Parser;
use log::LevelFilter;

/// Exit code for a bad command line (or a file or tap named on it that cannot be used), and
/// exit code when serving failed after start-up.
pub use pvm_common::exit::{FAILURE, USAGE_ERROR};

/// Parses `args` for program `name`; on a bad command line prints one line naming the flag
/// and returns Err(exit code); --help and --version print and return Err(0).
pub fn parse<A: Parser>(name: &str, args: impl IntoIterator<Item = OsString>) -> Result<A, i32> {
    A::try_parse_from(args).map_err(|err| {
        use clap::error::ErrorKind;
        match err.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                let _ = std::io::Write::write_all(
                    &mut std::io::stdout(),
                    err.render().to_string().as_bytes(),
                );
                0
            }
            _ => {
                let rendered = err.render().to_string();
                let mut lines = rendered.lines().filter(|l| !l.trim().is_empty());
                let mut first = lines
                    .next()
                    .unwrap_or("invalid command line")
                    .trim_start_matches("error: ")
                    .to_string();
                // "the following required arguments were not provided:" names them below.
                if first.ends_with(':') {
                    if let Some(next) = lines.next() {
                        first = format!("{first} {}", next.trim());
                    }
                }
                eprintln!("{name}: {first}");
                USAGE_ERROR
            }
        }
    })
}

/// Parses `--log-level`.
pub fn parse_log_level(text: &str) -> Result<LevelFilter, String> {
    text.parse()
        .map_err(|_| format!("'{text}' is not a log level (off, error, warn, info, debug, trace)"))
}

/// Parses `--mac`: six colon-separated hex bytes, unicast.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bad = || format!("'{text}' must be six hex bytes like 52:54:00:12:34:56");
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("'{text}' is a multicast address"));
    }
    Ok(mac)
}

/// `FILE[,ro]` of `--disk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskArg {
    pub path: PathBuf,
    pub read_only: bool,
}

pub fn parse_disk(text: &str) -> Result<DiskArg, String> {
    let mut parts = text.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err("a disk needs a file: --disk FILE[,ro]".to_string());
    }
    let mut disk = DiskArg {
        path: PathBuf::from(path),
        read_only: false,
    };
    for option in parts {
        match option {
            "ro" => disk.read_only = true,
            _ => return Err(format!("unknown disk option '{option}' (known: ro)")),
        }
    }
    Ok(disk)
}

/// Parses `--socket`: a path that names no directory.
pub fn parse_socket(text: &str) -> Result<PathBuf, String> {
    if text.is_empty() {
        return Err("the socket needs a path".to_string());
    }
    let path = PathBuf::from(text);
    if path.is_dir() {
        return Err(format!("{text} is a directory"));
    }
    Ok(path)
}

/// Sends `log` output to stderr as "NAME: level: message".
pub fn init_logger(name: &'static str, level: LevelFilter) {
    pvm_common::logger::init(name, pvm_common::logger::LineEnd::Newline, level);
}

/// Parses `--seccomp`.
pub fn parse_on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("'{text}' is neither on nor off")),
    }
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
        eprintln!("{name}: serving {what} on {}", socket.display());
    };
    match crate::serve(name, backend, socket, sandbox, ready) {
        Ok(()) => {
            eprintln!("{name}: the frontend disconnected; exiting");
            0
        }
        Err(e @ crate::ServeError::Listen { .. }) => {
            eprintln!("{name}: --socket {e}");
            USAGE_ERROR
        }
        Err(e) => {
            eprintln!("{name}: {e}");
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
                .contains("unknown disk option 'rw'")
        );
        assert_eq!(
            parse_mac("52:54:00:ab:cd:ef").unwrap(),
            [0x52, 0x54, 0, 0xab, 0xcd, 0xef]
        );
        assert!(
            parse_mac("01:00:00:00:00:00")
                .unwrap_err()
                .contains("multicast")
        );
        assert!(parse_mac("52:54").is_err());
        assert!(parse_mac("zz:54:00:ab:cd:ef").is_err());
        assert!(parse_socket("").is_err());
        assert!(parse_socket("/").unwrap_err().contains("directory"));
    }
}

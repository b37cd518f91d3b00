//! Command-line pieces pvm and the backends share: clap's errors turned into one line, and the
//! value parsers for flags both take (`--log-level`, `--seccomp on|off`, MAC addresses). The
//! errors say what was wrong with the value; clap names the flag in front of them.

use std::ffi::OsString;

use clap::Parser;
use log::LevelFilter;

/// Why parsing stopped before there were arguments to run with.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// `--help` or `--version`: the text for stdout; the program exits 0.
    Info(String),
    /// A bad command line: one line naming the flag and the reason (no program name, no
    /// newline); the program exits with [`crate::exit::USAGE_ERROR`].
    Usage(String),
}

/// Parses the process arguments `args` (the first one is the program name) into `A`.
pub fn parse<A: Parser>(args: impl IntoIterator<Item = OsString>) -> Result<A, Stop> {
    A::try_parse_from(args).map_err(|err| {
        use clap::error::ErrorKind;
        let rendered = err.render().to_string();
        match err.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => Stop::Info(rendered),
            _ => Stop::Usage(one_line(&rendered)),
        }
    })
}

/// The line of clap's several-line error message that names the flag and the reason.
fn one_line(rendered: &str) -> String {
    let mut lines = rendered.lines().filter(|l| !l.trim().is_empty());
    let mut first = lines
        .next()
        .unwrap_or("invalid command line")
        .trim_start_matches("error: ")
        .to_string();
    // "the following required arguments were not provided:" names them on the next line.
    if first.ends_with(':') {
        if let Some(next) = lines.next() {
            first = format!("{first} {}", next.trim());
        }
    }
    first
}

/// A `--log-level` value that is not a level.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{0}' is not a log level (off, error, warn, info, debug, trace)")]
pub struct NotALogLevel(pub String);

/// Parses `--log-level`.
pub fn parse_log_level(text: &str) -> Result<LevelFilter, NotALogLevel> {
    text.parse().map_err(|_| NotALogLevel(text.to_string()))
}

/// An on|off value that is neither.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{0}' is neither on nor off")]
pub struct NotOnOff(pub String);

/// Parses an on|off flag value (`--seccomp`).
pub fn parse_on_off(text: &str) -> Result<bool, NotOnOff> {
    match text {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(NotOnOff(text.to_string())),
    }
}

/// What is wrong with a MAC address; each names the text it was given.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MacError {
    #[error("'{0}' must be six hex bytes like 52:54:00:12:34:56")]
    Shape(String),
    #[error("'{text}' has a non-hex byte '{byte}'")]
    NonHex { text: String, byte: String },
    #[error("'{0}' is a multicast address")]
    Multicast(String),
}

/// Parses a unicast MAC address written as six colon-separated hex bytes.
pub fn parse_mac(text: &str) -> Result<[u8; 6], MacError> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return Err(MacError::Shape(text.to_string()));
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(MacError::Shape(text.to_string()));
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| MacError::NonHex {
            text: text.to_string(),
            byte: part.to_string(),
        })?;
    }
    if mac[0] & 1 != 0 {
        return Err(MacError::Multicast(text.to_string()));
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Parser, Debug)]
    #[command(name = "prog", version)]
    struct Args {
        #[arg(long)]
        socket: String,
        #[arg(long, value_parser = parse_log_level, default_value = "warn")]
        log_level: LevelFilter,
        #[arg(long, value_parser = parse_on_off, default_value = "on",
              action = clap::ArgAction::Set)]
        seccomp: bool,
        #[arg(long, value_parser = parse_mac)]
        mac: Option<[u8; 6]>,
    }

    fn parse_strs(args: &[&str]) -> Result<Args, Stop> {
        parse(
            std::iter::once("prog")
                .chain(args.iter().copied())
                .map(OsString::from),
        )
    }

    fn usage(args: &[&str]) -> String {
        match parse_strs(args) {
            Err(Stop::Usage(line)) => {
                assert!(!line.contains('\n'), "{line:?}");
                line
            }
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn values_parse_and_bad_ones_are_one_line_naming_the_flag() {
        let args = parse_strs(&[
            "--socket",
            "s",
            "--log-level",
            "debug",
            "--seccomp",
            "off",
            "--mac",
            "52:54:00:ab:cd:ef",
        ])
        .unwrap();
        assert_eq!(args.log_level, LevelFilter::Debug);
        assert!(!args.seccomp);
        assert_eq!(args.mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        assert_eq!(args.socket, "s");
        let e = usage(&["--socket", "s", "--log-level", "loud"]);
        assert!(
            e.contains("--log-level") && e.contains("'loud' is not a log level"),
            "{e}"
        );
        let e = usage(&["--socket", "s", "--seccomp", "maybe"]);
        assert!(
            e.contains("--seccomp") && e.ends_with("'maybe' is neither on nor off"),
            "{e}"
        );
        let e = usage(&["--socket", "s", "--mac", "01:00:00:00:00:00"]);
        assert!(e.contains("--mac") && e.contains("multicast"), "{e}");
        let e = usage(&["--socket", "s", "--bogus"]);
        assert!(e.starts_with("unexpected argument '--bogus'"), "{e}");
        // The missing argument is named although clap puts it on a line of its own.
        let e = usage(&[]);
        assert!(
            e.starts_with("the following required arguments were not provided: ")
                && e.contains("--socket"),
            "{e}"
        );
    }

    #[test]
    fn help_and_version_are_text_for_stdout() {
        match parse_strs(&["--help"]) {
            Err(Stop::Info(text)) => assert!(text.contains("--log-level"), "{text}"),
            other => panic!("{other:?}"),
        }
        match parse_strs(&["--version"]) {
            Err(Stop::Info(text)) => assert!(text.starts_with("prog "), "{text}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn macs() {
        assert_eq!(parse_mac("02:00:00:00:00:ff"), Ok([2, 0, 0, 0, 0, 0xff]));
        for bad in ["52:54", "52:54:00:12:34:56:78", "5:54:00:12:34:567", ""] {
            assert_eq!(parse_mac(bad), Err(MacError::Shape(bad.to_string())));
        }
        assert_eq!(
            parse_mac("52:54:00:zz:34:56").unwrap_err().to_string(),
            "'52:54:00:zz:34:56' has a non-hex byte 'zz'"
        );
        assert_eq!(
            parse_mac("01:00:5e:00:00:01").unwrap_err().to_string(),
            "'01:00:5e:00:00:01' is a multicast address"
        );
        assert_eq!(
            parse_mac("52:54").unwrap_err().to_string(),
            "'52:54' must be six hex bytes like 52:54:00:12:34:56"
        );
        assert_eq!(parse_on_off("on"), Ok(true));
        assert_eq!(parse_log_level("trace"), Ok(LevelFilter::Trace));
    }
}

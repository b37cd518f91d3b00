//! The command line's run-directory, console-socket and subcommand parts.

use super::tests::{error_of, parse_strs};
use super::*;

fn launch(args: &[&str]) -> Launch {
    parse_launch(
        std::iter::once("pvm")
            .chain(args.iter().copied())
            .map(OsString::from),
    )
    .unwrap()
}

#[test]
fn ids_the_run_dir_api_and_no_api() {
    let l = launch(&[]);
    assert_eq!(l.id, format!("pvm-{}", std::process::id()));
    assert!(l.run_dir_api && l.firecracker.is_none());
    let l = launch(&["--id", "web-1", "--no-api"]);
    assert_eq!(l.id, "web-1");
    assert!(!l.run_dir_api && l.firecracker.is_none());
    let l = launch(&["--api-sock", "/tmp/fc.sock"]);
    assert_eq!(l.id, DEFAULT_ID);
    assert!(error_of(&["--id", "../etc"]).contains("--id"));
}

#[test]
fn console_sockets() {
    let c = parse_strs(&["--console", "socket=/tmp/c.sock"]).unwrap();
    assert_eq!(c.console, ConsoleKind::Serial);
    assert_eq!(
        c.console_socket,
        Some(ConsoleSocketPath {
            path: PathBuf::from("/tmp/c.sock"),
            in_run_dir: false
        })
    );
    let c = parse_strs(&["--console", "socket=c.sock"]).unwrap();
    let path = c.console_socket.unwrap().path;
    assert!(path.is_absolute() && path.ends_with("c.sock"), "{path:?}");
    let c = parse_strs(&["--console", "virtio,socket=/tmp/c.sock"]).unwrap();
    assert_eq!(c.console, ConsoleKind::Virtio);
    assert!(c.console_socket.is_some());
    assert_eq!(
        parse_strs(&["--console", "virtio"]).unwrap().console_socket,
        None
    );
    for bad in [
        "socket=",
        "serial,virtio",
        "socket,socket=/a",
        "sock",
        "virtio,",
        "",
    ] {
        assert!(error_of(&["--console", bad]).contains("--console"), "{bad}");
    }
}

#[test]
fn subcommands_parse_and_flags_still_boot() {
    let manage = |args: &[&str]| match parse_invocation(
        std::iter::once("pvm")
            .chain(args.iter().copied())
            .map(OsString::from),
    ) {
        Ok(Invocation::Manage(command)) => command,
        other => panic!("{args:?}: {other:?}"),
    };
    assert_eq!(manage(&["list"]), manage::Command::List);
    assert_eq!(
        manage(&["stop", "web-1", "--timeout", "3"]),
        manage::Command::Stop {
            target: manage::Target {
                id: "web-1".to_string()
            },
            timeout: 3
        }
    );
    assert!(matches!(
        manage(&["status", "--json", "x"]),
        manage::Command::Status { json: true, .. }
    ));
    // Flags and subcommands do not mix; a missing id names itself.
    assert!(error_of(&["--cpus", "2", "list"]).contains("list"));
    assert!(error_of(&["pause"]).contains("ID"));
    assert!(error_of(&["frobnicate"]).contains("frobnicate"));
    assert_eq!(launch(&["--cpus", "2"]).config.cpus, 2);
}

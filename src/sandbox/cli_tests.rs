//! The sandbox's command line: when it is asked for, and the flags it refuses.

use std::ffi::OsString;

use super::SandboxSpec;
use crate::cli::{self, CliExit, Launch};

/// A file that opens read-write, for --disk.
fn scratch() -> String {
    let path = std::env::temp_dir().join(format!("pvm-sandbox-cli-{}", std::process::id()));
    std::fs::write(&path, [0u8; 512]).unwrap();
    path.display().to_string()
}

fn launch(args: &[&str]) -> Launch {
    cli::parse_launch(
        std::iter::once("pvm")
            .chain(args.iter().copied())
            .map(OsString::from),
    )
    .unwrap()
}

fn refusal(args: &[&str]) -> String {
    match cli::sandbox_refusal(&launch(args)) {
        Err(CliExit::Message(2, text)) => {
            assert_eq!(text.lines().count(), 1, "{text}");
            text
        }
        other => panic!("{args:?}: {other:?}"),
    }
}

fn sandbox(args: &[&str]) -> Option<Vec<String>> {
    launch(args).sandbox.map(|s| s.command)
}

#[test]
fn nothing_to_boot_or_a_command_asks_for_the_sandbox() {
    assert_eq!(launch(&[]).sandbox, Some(SandboxSpec::default()));
    assert_eq!(sandbox(&["--cpus", "2", "--mem", "1G"]), Some(vec![]));
    assert_eq!(
        sandbox(&["--", "sh", "-c", "exit 7"]),
        Some(vec!["sh".into(), "-c".into(), "exit 7".into()])
    );
    // Flags after `--` are the command's, not pvm's.
    assert_eq!(
        sandbox(&["--cpus", "2", "--", "ls", "--cpus"]),
        Some(vec!["ls".into(), "--cpus".into()])
    );
    let l = launch(&["--kernel", "/proc/self/exe", "--", "true"]);
    assert_eq!(l.sandbox.map(|s| s.command), Some(vec!["true".into()]));
    assert_eq!(
        l.config.kernel.as_deref(),
        Some(std::path::Path::new("/proc/self/exe"))
    );
    cli::sandbox_refusal(&launch(&["--cpus", "2", "--smt", "--", "true"])).unwrap();
    // More shares are fine, under their own tags.
    cli::sandbox_refusal(&launch(&["--share", "/tmp,tag=tmp"])).unwrap();
}

#[test]
fn every_other_command_line_boots_as_before() {
    assert_eq!(sandbox(&["--kernel", "/proc/self/exe"]), None);
    assert_eq!(sandbox(&["--disk", &scratch()]), None);
    assert_eq!(sandbox(&["--disk", "vhost-user=/tmp/b.sock"]), None);
    assert_eq!(sandbox(&["--api-sock", "/tmp/fc.sock"]), None);
    assert_eq!(sandbox(&["--restore", "s", "--mem-file", "m"]), None);
    cli::sandbox_refusal(&launch(&["--kernel", "/proc/self/exe", "--tap", "tap0"])).unwrap();
}

#[test]
fn flags_the_sandbox_cannot_use_are_refused_by_name() {
    for (args, flag) in [
        (&["--tap", "tap0"][..], "--tap "),
        (&["--net", "vhost-user=/tmp/n.sock"][..], "--net "),
        (&["--vsock", "cid=3,vhost=on"][..], "--vsock "),
        (&["--balloon", "amount_mib=1"][..], "--balloon "),
        (&["--console", "virtio"][..], "--console "),
        (
            &["--console", "serial,socket=/tmp/c.sock"][..],
            "--console ",
        ),
        (
            &["--initrd", "/proc/self/exe", "--", "true"][..],
            "--initrd ",
        ),
        (&["--disk", &scratch(), "--", "true"][..], "--disk "),
        (
            &["--api-sock", "/tmp/fc.sock", "--", "true"][..],
            "--api-sock",
        ),
    ] {
        let text = refusal(args);
        assert!(
            text.starts_with(&format!("pvm: {flag}")),
            "{args:?}: {text}"
        );
        assert!(text.contains("does not fit the sandbox"), "{text}");
    }
}

//! The command line: clap parses, [`parse`] validates into a [`VmConfig`]. No KVM here, so all
//! of it is unit-tested. Every bad value becomes one line naming the flag, with exit code 2.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};

use clap::Parser;
use log::LevelFilter;
use pvm_common::cli::{Stop, parse_log_level, parse_on_off};

use crate::config::{self, ConsoleKind, DiskArg, TapSpec, Transport, VmConfig};

/// Exit code for a bad command line or an unreadable file named on it.
pub use pvm_common::exit::USAGE_ERROR;

#[derive(Parser, Debug)]
#[command(
    name = "pvm",
    version,
    about = "pvm: a virtio-first KVM virtual machine monitor",
    long_about = long_about()
)]
struct Args {
    /// Guest kernel: an ELF vmlinux (PVH or 64-bit entry) or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,

    /// Initial ramdisk (initramfs) loaded next to the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Extra kernel command line, appended after what pvm adds itself (console=, reboot=, devices).
    #[arg(long, value_name = "STRING", default_value = "")]
    cmdline: String,

    /// Guest memory: 256M, 2G, or a plain number of MiB.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = config::parse_mem_size)]
    mem: u64,

    /// Number of vCPUs (1 to 255).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=config::MAX_CPUS as i64))]
    cpus: u8,

    /// A raw disk image as a virtio-blk device; repeatable. `ro` makes it read-only, `serial=ID`
    /// sets the id the guest reads. `vhost-user=SOCKET` instead attaches a virtio-blk device
    /// served by a vhost-user backend listening on SOCKET (e.g. pvm-vhost-user-blk); those
    /// come after the image disks in guest order.
    #[arg(long, value_name = "PATH[,ro][,serial=ID] | vhost-user=SOCKET",
          value_parser = config::parse_disk_arg)]
    disk: Vec<DiskArg>,

    /// A host tap device as a virtio-net device; repeatable. `mac=` sets the guest's MAC;
    /// `vhost=` moves its queues into the kernel's vhost-net (auto: when /dev/vhost-net works);
    /// `queues=N` (1..=16, pci only) gives it N receive/transmit queue pairs (multi-queue tap).
    #[arg(long, value_name = "NAME[,mac=MAC][,vhost=on|off|auto][,queues=N]", value_parser = config::parse_tap)]
    tap: Vec<TapSpec>,

    /// A virtio-net device served by a vhost-user backend listening on SOCKET (e.g.
    /// pvm-vhost-user-net); repeatable; after the --tap devices in guest order. The backend
    /// owns the tap and the MAC. Guest RAM is then shared with the backends (memfd).
    #[arg(long, value_name = "vhost-user=SOCKET", value_parser = config::parse_net)]
    net: Vec<PathBuf>,

    /// Where the guest console lives: the 8250 UART (ttyS0) or virtio-console (hvc0).
    #[arg(long, value_name = "serial|virtio", default_value = "serial", value_parser = parse_console)]
    console: ConsoleKind,

    /// How virtio devices reach the guest: pci (modern virtio-pci with MSI-X; every distribution
    /// kernel has the driver) or mmio (virtio-mmio, described in ACPI).
    #[arg(long, value_name = "pci|mmio", default_value = "pci", value_parser = parse_transport)]
    transport: Transport,

    /// Debug: time the boot. pvm prints when the first vCPU enters the guest, and each time the
    /// guest writes 123 to I/O port 0x3f0 (e.g. from /init), both relative to pvm's start.
    #[arg(long)]
    boot_timer: bool,

    /// Print the VM's userspace exits (KVM_RUN returns) by reason on stderr when it ends.
    #[arg(long)]
    stats: bool,

    /// The seccomp sandbox: on (a filter per thread kind: main, vCPU, device; a forbidden system
    /// call ends pvm naming it, exit code 6) or off, for debugging.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off,
          action = clap::ArgAction::Set)]
    seccomp: bool,

    /// How much pvm itself logs to stderr: off, error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL", default_value = "warn", value_parser = parse_log_level)]
    log_level: LevelFilter,

    // Logging and metrics as microVM tooling passes them (Firecracker's flags).
    /// Write pvm's log lines to this file or FIFO (appended; created if missing) instead of
    /// stderr, as "TIME [ID:THREAD] message".
    #[arg(long, value_name = "PATH")]
    log_path: Option<PathBuf>,
    /// The log level (off, error, warn, warning, info, debug, trace; any case); overrides
    /// --log-level.
    #[arg(long, value_name = "LEVEL", value_parser = crate::logger::parse_level)]
    level: Option<LevelFilter>,
    /// Add each line's level after the thread name in --log-path lines.
    #[arg(long)]
    show_level: bool,
    /// Add each line's source file and line in --log-path lines.
    #[arg(long)]
    show_log_origin: bool,
    /// Write metrics as JSON lines to this file or FIFO: every 60 s and when the VM ends.
    #[arg(long, value_name = "PATH")]
    metrics_path: Option<PathBuf>,
}

/// `--help`'s description, its exit-status list made from the codes pvm exits with.
fn long_about() -> String {
    format!(
        "pvm boots a Linux guest on KVM. The guest sees virtio devices plus an 8250 UART for \
         early boot; the UART (ttyS0) is wired to this terminal in raw mode.\n\n\
         SIGUSR1 pauses the VM (every vCPU and virtio device), SIGUSR2 resumes it.\n\n{}",
        crate::exit::exit_status_help()
    )
}

/// A value one of pvm's own keyword flags does not take; clap names the flag.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum KeywordError {
    #[error("'{0}' is not a transport (pci or mmio)")]
    Transport(String),
    #[error("'{0}' is not a console kind (serial or virtio)")]
    Console(String),
}

fn parse_transport(text: &str) -> Result<Transport, KeywordError> {
    match text {
        "pci" => Ok(Transport::Pci),
        "mmio" => Ok(Transport::Mmio),
        _ => Err(KeywordError::Transport(text.to_string())),
    }
}

fn parse_console(text: &str) -> Result<ConsoleKind, KeywordError> {
    match text {
        "serial" => Ok(ConsoleKind::Serial),
        "virtio" => Ok(ConsoleKind::Virtio),
        _ => Err(KeywordError::Console(text.to_string())),
    }
}

/// Why parsing stopped: a text to print and the code to exit with (0 for --help/--version).
#[derive(Debug, PartialEq, Eq)]
pub enum CliExit {
    Message(i32, String),
}

fn usage_error(text: String) -> CliExit {
    CliExit::Message(USAGE_ERROR, format!("pvm: {text}\n"))
}

/// Checks that a file named by `flag` can be opened for reading (and writing, if `write`).
fn check_file(flag: &str, path: &Path, write: bool) -> Result<(), CliExit> {
    let opened = File::options().read(true).write(write).open(path);
    match opened {
        Ok(file) => match file.metadata() {
            Ok(meta) if meta.is_dir() => Err(usage_error(format!(
                "{flag} {}: is a directory",
                path.display()
            ))),
            Ok(_) => Ok(()),
            Err(e) => Err(usage_error(format!("{flag} {}: {e}", path.display()))),
        },
        Err(e) => Err(usage_error(format!("{flag} {}: {e}", path.display()))),
    }
}

/// Parses and validates the process arguments (the first one is the program name).
pub fn parse<I: IntoIterator<Item = OsString>>(args: I) -> Result<VmConfig, CliExit> {
    let args = pvm_common::cli::parse::<Args>(args).map_err(|stop| match stop {
        Stop::Info(text) => CliExit::Message(0, text),
        Stop::Usage(line) => usage_error(line),
    })?;
    if let Some(kernel) = &args.kernel {
        check_file("--kernel", kernel, false)?;
    }
    if let Some(initrd) = &args.initrd {
        check_file("--initrd", initrd, false)?;
    }
    let mut disks = Vec::new();
    let mut vhost_user_disks = Vec::new();
    for disk in args.disk {
        match disk {
            DiskArg::File(disk) => {
                check_file("--disk", &disk.path, !disk.read_only)?;
                disks.push(disk);
            }
            DiskArg::VhostUser(socket) => vhost_user_disks.push(socket),
        }
    }
    if let Some(tap) = args.tap.iter().find(|t| t.queues > 1) {
        if args.transport == Transport::Mmio {
            // Supporting it would work but give nothing: the pairs' interrupts could not reach
            // separate vCPUs.
            return Err(usage_error(format!(
                "--tap {},queues={} needs --transport pci: a virtio-mmio device has a single \
                 interrupt, so its queue pairs cannot interrupt separate vCPUs",
                tap.name, tap.queues
            )));
        }
    }
    if args.cmdline.contains('\0') || args.cmdline.contains('\n') {
        return Err(usage_error(
            "--cmdline must be a single line of text".to_string(),
        ));
    }
    Ok(VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        mem_bytes: args.mem,
        cpus: args.cpus,
        disks,
        taps: args.tap,
        vhost_user_disks,
        vhost_user_nets: args.net,
        console: args.console,
        transport: args.transport,
        stats: args.stats,
        boot_timer: args.boot_timer,
        seccomp: args.seccomp,
        log_level: args.log_level,
        logger: crate::logger::LoggerConfig {
            log_path: args.log_path,
            level: args.level,
            show_level: args.show_level,
            show_log_origin: args.show_log_origin,
        },
        metrics_path: args.metrics_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_strs(args: &[&str]) -> Result<VmConfig, CliExit> {
        parse(
            std::iter::once("pvm")
                .chain(args.iter().copied())
                .map(OsString::from),
        )
    }

    fn error_of(args: &[&str]) -> String {
        match parse_strs(args) {
            Err(CliExit::Message(code, text)) => {
                assert_eq!(code, USAGE_ERROR, "{text}");
                assert_eq!(text.lines().count(), 1, "one line expected: {text:?}");
                text
            }
            Ok(config) => panic!("{args:?} parsed: {config:?}"),
        }
    }

    #[test]
    fn defaults() {
        let c = parse_strs(&[]).unwrap();
        assert_eq!(c.mem_bytes, 512 << 20);
        assert_eq!(c.cpus, 1);
        assert_eq!(c.console, ConsoleKind::Serial);
        assert!(c.kernel.is_none() && c.disks.is_empty() && c.taps.is_empty());
        assert_eq!(c.cmdline, "");
        assert_eq!(c.transport, Transport::Pci);
        assert!(!c.stats);
    }

    #[test]
    fn values() {
        let c = parse_strs(&[
            "--mem",
            "2G",
            "--cpus",
            "4",
            "--cmdline",
            "quiet loglevel=3",
            "--console",
            "virtio",
            "--tap",
            "tap0",
            "--tap",
            "tap1,mac=52:54:00:00:00:01",
        ])
        .unwrap();
        assert_eq!(c.mem_bytes, 2 << 30);
        assert_eq!(c.cpus, 4);
        assert_eq!(c.cmdline, "quiet loglevel=3");
        assert_eq!(c.console, ConsoleKind::Virtio);
        assert_eq!(c.taps.len(), 2);
        assert_eq!(c.taps[1].mac, Some([0x52, 0x54, 0, 0, 0, 1]));
        let c = parse_strs(&[
            "--net",
            "vhost-user=/tmp/n.sock",
            "--disk",
            "vhost-user=/tmp/b.sock",
            "--net",
            "vhost-user=/tmp/m.sock",
        ])
        .unwrap();
        assert_eq!(c.vhost_user_nets.len(), 2);
        assert_eq!(c.vhost_user_disks, vec![PathBuf::from("/tmp/b.sock")]);
        assert!(c.disks.is_empty());
    }

    #[test]
    fn logging_and_metrics_flags() {
        let c = parse_strs(&[]).unwrap();
        assert_eq!(c.logger, crate::logger::LoggerConfig::default());
        assert_eq!(c.metrics_path, None);
        let c = parse_strs(&[
            "--log-path",
            "/tmp/pvm.log",
            "--level",
            "Debug",
            "--show-level",
            "--show-log-origin",
            "--metrics-path",
            "/tmp/pvm.metrics",
        ])
        .unwrap();
        assert_eq!(c.logger.log_path, Some(PathBuf::from("/tmp/pvm.log")));
        assert_eq!(c.logger.level, Some(LevelFilter::Debug));
        assert!(c.logger.show_level && c.logger.show_log_origin);
        assert_eq!(c.metrics_path, Some(PathBuf::from("/tmp/pvm.metrics")));
        assert!(error_of(&["--level", "loud"]).contains("--level"));
    }

    #[test]
    fn bad_values_name_the_flag() {
        assert!(error_of(&["--mem", "12X"]).contains("--mem"));
        assert!(error_of(&["--cpus", "0"]).contains("--cpus"));
        assert!(error_of(&["--cpus", "256"]).contains("--cpus"));
        assert!(error_of(&["--console", "vga"]).contains("--console"));
        assert!(error_of(&["--transport", "isa"]).contains("--transport"));
        assert!(error_of(&["--tap", "tap0,mac=zz"]).contains("--tap"));
        assert!(error_of(&["--tap", "tap0,queues=17"]).contains("--tap"));
        let e = error_of(&["--tap", "tap0,queues=2", "--transport", "mmio"]);
        assert!(
            e.starts_with("pvm: --tap tap0,queues=2 needs --transport pci"),
            "{e}"
        );
        assert!(error_of(&["--disk", "x,rw"]).contains("--disk"));
        assert!(error_of(&["--disk", "vhost-user="]).contains("--disk"));
        assert!(error_of(&["--net", "tap0"]).contains("--net"));
        assert!(error_of(&["--bogus"]).contains("--bogus"));
        assert!(error_of(&["--cmdline", "a\nb"]).contains("--cmdline"));
    }

    #[test]
    fn unreadable_files_name_the_flag_and_path() {
        let e = error_of(&["--kernel", "/nonexistent/vmlinux"]);
        assert!(
            e.contains("--kernel /nonexistent/vmlinux") && e.contains("No such file"),
            "{e}"
        );
        let e = error_of(&["--initrd", "/"]);
        assert!(e.contains("--initrd /"), "{e}");
        let e = error_of(&["--disk", "/nonexistent.img"]);
        assert!(e.contains("--disk /nonexistent.img"), "{e}");
    }

    #[test]
    fn help_exits_zero_and_explains_flags() {
        match parse_strs(&["--help"]) {
            Err(CliExit::Message(0, text)) => {
                for flag in [
                    "--kernel",
                    "--initrd",
                    "--cmdline",
                    "--mem",
                    "--cpus",
                    "--disk",
                    "--tap",
                    "--net",
                    "vhost-user=SOCKET",
                    "--console",
                ] {
                    assert!(text.contains(flag), "{flag} missing from help");
                }
                for (code, meaning) in crate::exit::EXIT_CODES {
                    assert!(
                        text.contains(&format!("{code} {meaning}")),
                        "exit code {code} missing from help"
                    );
                }
                assert!(
                    text.contains("6 seccomp violation, 128+N stopped by signal N."),
                    "{text}"
                );
                assert!(text.contains("SIGUSR1 pauses the VM"), "{text}");
            }
            other => panic!("{other:?}"),
        }
    }
}

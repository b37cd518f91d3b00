//! The command line: clap parses, [`parse`] validates into a [`VmConfig`]. No KVM here, so all
//! of it is unit-tested. Every bad value becomes one line naming the flag, with exit code 2.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use log::LevelFilter;
use pvm_common::cli::{Stop, parse_log_level, parse_on_off};

use crate::config::{
    self, ConsoleKind, ConsoleSocketPath, DiskArg, GuestPages, TapSpec, Transport, VmConfig,
};
use crate::manage::{self, rundir};
use crate::sandbox::SandboxSpec;

/// Exit code for a bad command line or an unreadable file named on it.
pub use pvm_common::exit::USAGE_ERROR;

#[derive(Parser, Debug)]
#[command(
    name = "pvm",
    version,
    about = "pvm: a virtio-first KVM virtual machine monitor",
    long_about = long_about(),
    after_long_help = AFTER_LONG_HELP,
    args_conflicts_with_subcommands = true,
    subcommand_value_name = "COMMAND",
    subcommand_help_heading = "Managing running VMs (see pvm COMMAND --help)"
)]
struct Args {
    #[command(subcommand)]
    command: Option<manage::Command>,

    /// Guest kernel: an ELF vmlinux (PVH or 64-bit entry) or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,

    /// Initial ramdisk (initramfs) loaded next to the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Extra kernel command line, appended after what pvm adds itself (console=, reboot=, devices).
    #[arg(long, value_name = "STRING", default_value = "")]
    cmdline: String,

    /// Guest memory: 256M, 2G, or a plain number of MiB [default: 512M; 128M in Firecracker
    /// mode, where machine-config sets it].
    #[arg(long, value_name = "SIZE", value_parser = config::parse_mem_size)]
    mem: Option<u64>,

    /// Number of vCPUs (1 to 255).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=config::MAX_CPUS as i64))]
    cpus: u8,

    /// Pair the vCPUs as two threads (SMT siblings) of each core, as Firecracker's `smt`; needs
    /// 1 or an even number of --cpus.
    #[arg(long)]
    smt: bool,

    /// Back guest RAM with 2 MiB hugetlbfs pages (`2M`), all reserved at start: --mem must be a
    /// multiple of 2 MiB and the host must have that many free huge pages
    /// (/proc/sys/vm/nr_hugepages).
    #[arg(long, value_name = "2M", value_parser = parse_huge_pages)]
    huge_pages: Option<GuestPages>,

    /// Log which guest pages are written between snapshots, as Firecracker's
    /// `track_dirty_pages`, so that `snapshot_type: Diff` can write only those; taps on the
    /// kernel's vhost-net log their writes through its dirty log. With --restore, tracking
    /// starts from the restored memory.
    #[arg(long)]
    track_dirty_pages: bool,

    /// A raw disk image as a virtio-blk device; repeatable. `ro` makes it read-only, `serial=ID`
    /// sets the id the guest reads, `bw=` (bytes/s, K/M/G) and `iops=` rate-limit it.
    /// `engine=io_uring` serves it through io_uring (default sync), `direct=on` with O_DIRECT,
    /// `queues=N` (1..=16) with N request queues, each on its own thread, `queue_size=N` (a
    /// power of two, 4..=1024, default 256) sets the descriptors per queue.
    /// `vhost-user=SOCKET` instead attaches a virtio-blk device
    /// served by a vhost-user backend listening on SOCKET (e.g. pvm-vhost-user-blk); those
    /// come after the image disks in guest order.
    #[arg(long, value_name = "PATH[,ro][,serial=ID][,bw=BYTES][,iops=N][,engine=sync|io_uring]\
[,direct=on][,queues=N][,queue_size=N] | vhost-user=SOCKET",
          value_parser = config::parse_disk_arg)]
    disk: Vec<DiskArg>,

    /// A host tap device as a virtio-net device; repeatable. `mac=` sets the guest's MAC;
    /// `vhost=` moves its queues into the kernel's vhost-net (auto: when /dev/vhost-net works);
    /// `queues=N` (1..=16, pci only) gives it N receive/transmit queue pairs (multi-queue tap);
    /// `rx_bw=`/`tx_bw=` (bytes/s, K/M/G) and `rx_pps=`/`tx_pps=` (frames/s) rate-limit it,
    /// which keeps it off vhost-net.
    #[arg(long, value_name = "NAME[,mac=MAC][,vhost=on|off|auto][,queues=N][,rx_bw=|tx_bw=BYTES][,rx_pps=|tx_pps=N]",
          value_parser = config::parse_tap)]
    tap: Vec<TapSpec>,

    /// A virtio-net device served by a vhost-user backend listening on SOCKET (e.g.
    /// pvm-vhost-user-net); repeatable; after the --tap devices in guest order. The backend
    /// owns the tap and the MAC. Guest RAM is then shared with the backends (memfd).
    #[arg(long, value_name = "vhost-user=SOCKET", value_parser = config::parse_net)]
    net: Vec<PathBuf>,

    /// A virtio-vsock device for the guest, whose CID is N (3 or more). With `socket=PATH`
    /// pvm serves it (Firecracker's hybrid vsock): host processes connect to PATH and send
    /// `CONNECT <port>\n`, and guest connections to CID 2 port P reach the Unix socket at
    /// PATH_P. With `vhost=on` the kernel's vhost-vsock serves it and host processes use
    /// AF_VSOCK.
    #[arg(long, value_name = "cid=N,socket=PATH | cid=N,vhost=on", value_parser = config::parse_vsock)]
    vsock: Option<config::VsockSpec>,

    /// A host directory the guest mounts read-only over virtio-fs, served by pvm itself:
    /// `mount -t virtiofs NAME /mnt` in the guest (tag default `hostfs`); repeatable, each
    /// with its own tag. Every write is refused (EROFS) and the guest cannot reach outside the
    /// directory; the guest holds at most 65536 inodes and 4096 open files of each share
    /// (ENFILE beyond). A VM with a share cannot be snapshotted.
    #[arg(long, value_name = "PATH[,tag=NAME]", value_parser = config::parse_share)]
    share: Vec<config::ShareSpec>,
    /// Attach a NoCloud seed so a stock cloud image configures itself with cloud-init: a
    /// read-only FAT disk labelled CIDATA (serial `cidata`), after every other disk, holding
    /// user-data, meta-data (default: `instance-id` and `local-hostname` from --id) and
    /// network-config if given. Each file at most 4 MiB; the seed lives in memory only. A
    /// snapshot saves the seed's image and a restore gives the guest that same disk (so not
    /// with --restore).
    #[arg(long, value_name = "user-data=FILE[,meta-data=FILE][,network-config=FILE]",
          value_parser = crate::cloud_init::parse_spec)]
    cloud_init: Option<crate::cloud_init::CloudInitSpec>,

    /// Where the guest console lives: the 8250 UART (ttyS0) or virtio-console (hvc0); and
    /// `socket=PATH` puts it on a Unix socket instead of the terminal (which pvm then leaves
    /// alone): attach with `pvm console ID` or `socat -,raw,echo=0 UNIX-CONNECT:PATH`. Plain
    /// `socket` is ID.console in the run directory. One client at a time (a second is refused);
    /// clients attach and detach freely, the guest runs on; output while nobody reads is kept
    /// up to 64 KiB, the oldest dropped. E.g. `--console virtio,socket`.
    #[arg(long, value_name = "serial|virtio[,socket[=PATH]]", default_value = "serial",
          value_parser = parse_console)]
    console: ConsoleArg,

    /// The UART's output (the serial console) goes to this file or FIFO instead of stdout:
    /// appended to, never truncated; a FIFO nobody reads drops output rather than stall the VM.
    #[arg(long, value_name = "PATH")]
    serial_out: Option<PathBuf>,

    /// How virtio devices reach the guest: pci (modern virtio-pci with MSI-X; every distribution
    /// kernel has the driver) or mmio (virtio-mmio, described in ACPI) [default: pci; mmio in
    /// Firecracker mode unless --enable-pci].
    #[arg(long, value_name = "pci|mmio", value_parser = parse_transport)]
    transport: Option<Transport>,

    /// Debug: time the boot. pvm prints when the first vCPU enters the guest, and each time the
    /// guest writes 123 to I/O port 0x3f0 (e.g. from /init), both relative to pvm's start.
    #[arg(long)]
    boot_timer: bool,

    /// Print the VM's userspace exits (KVM_RUN returns) by reason, and the ports and MMIO
    /// addresses the guest exited for most, on stderr when it ends.
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

    /// A virtio-balloon device: the guest gives `amount_mib` MiB back to the host (changed at
    /// run time with the API's PATCH /balloon); `deflate_on_oom=on` lets it take pages back
    /// when it runs out of memory, `stats_interval=S` has it report memory statistics every S
    /// seconds, `free_page_reporting=on` returns its free memory without a target,
    /// `free_page_hinting=on` hints it when the API asks (PATCH /balloon/hinting/start).
    #[arg(long, value_name = "amount_mib=N[,deflate_on_oom=on|off][,stats_interval=S][,free_page_reporting=on|off][,free_page_hinting=on|off]",
          value_parser = crate::balloon::parse_balloon)]
    balloon: Option<pvm_virtio::BalloonConfig>,
    /// Restore the VM saved in this snapshot file (PUT /snapshot/create, or a paused VM's
    /// snapshot) instead of booting one: its disks and taps are opened again by the names it
    /// recorded; `--tap NAME` flags, one per tap in order, put the clone on other taps.
    #[arg(long, value_name = "SNAPSHOT", requires = "mem_source",
          conflicts_with_all = ["kernel", "initrd", "disk", "net", "config_file"])]
    restore: Option<PathBuf>,

    /// The snapshot's memory file (with --restore); mapped privately, so it stays unchanged
    /// and one file serves many clones.
    #[arg(long, value_name = "MEM", requires = "restore", group = "mem_source")]
    mem_file: Option<PathBuf>,

    /// With --restore, instead of --mem-file: the guest's RAM is served by the page-fault
    /// handler listening on this Unix socket (Firecracker's Uffd backend; `pvm uffd-handler`
    /// is one). pvm sends it the memory mappings and a userfaultfd, and ends the VM with an
    /// error if the handler goes away.
    #[arg(
        long,
        value_name = "SOCKET",
        requires = "restore",
        group = "mem_source",
        conflicts_with = "mem_file"
    )]
    mem_uffd: Option<PathBuf>,

    /// With --restore: leave the restored VM paused (SIGUSR2 or PATCH /vm resumes it).
    #[arg(long, requires = "restore")]
    paused: bool,

    #[command(flatten)]
    firecracker: FirecrackerArgs,

    /// Run COMMAND in the sandbox: the host's kernel and read-only root with a tmpfs overlay
    /// (see "pvm with no arguments" in README.md); pvm prints its output and exits with its
    /// status. With no COMMAND and no --kernel, --initrd or --disk: a shell.
    #[arg(last = true, value_name = "COMMAND")]
    sandbox_command: Vec<String>,
}

/// Firecracker's process flags, so tools that start Firecracker can start pvm instead.
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Firecracker mode (--api-sock or --config-file)")]
struct FirecrackerArgs {
    /// Serve Firecracker's HTTP API on this Unix socket (which must not exist yet); the VM
    /// boots on PUT /actions InstanceStart, or at once with --config-file.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,

    /// A Firecracker JSON configuration: the VM is configured from it and boots at once.
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,

    /// Serve no API: in pvm's own mode, no socket in the run directory (pvm list and the
    /// other subcommands do not see the VM); in Firecracker mode, needs --config-file.
    #[arg(long, conflicts_with = "api_sock")]
    no_api: bool,

    /// The VM's id, for pvm list and the other subcommands and in GET /: 1 to 64 letters,
    /// digits and '-' [default: pvm-PID in pvm's own mode; anonymous-instance in Firecracker
    /// mode].
    #[arg(long, value_name = "ID", value_parser = parse_id)]
    id: Option<String>,

    /// Put the virtio devices on PCI (virtio-pci) instead of virtio-mmio.
    #[arg(long)]
    enable_pci: bool,

    /// Same as --seccomp off.
    #[arg(long)]
    no_seccomp: bool,

    /// Largest request body the API accepts, in bytes.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_PAYLOAD)]
    http_api_max_payload_size: usize,

    /// Accepted for compatibility: pvm has no MMDS (its endpoints are refused), so the limit
    /// applies to nothing; pvm logs that it got one.
    #[arg(long, value_name = "N")]
    mmds_size_limit: Option<usize>,

    /// When the jailer started this process (CLOCK_MONOTONIC, us): with --api-sock, the time
    /// from then until the API is up goes to the metrics (api_server.process_startup_time_us).
    #[arg(long, value_name = "US")]
    start_time_us: Option<u64>,

    /// The jailer's CPU time at that start (us), for api_server.process_startup_time_cpu_us.
    #[arg(long, value_name = "US")]
    start_time_cpu_us: Option<u64>,

    /// The jailer's parent's CPU time (us), added to process_startup_time_cpu_us.
    #[arg(long, value_name = "US")]
    parent_cpu_time_us: Option<u64>,
}

/// Firecracker's default instance id.
pub const DEFAULT_ID: &str = "anonymous-instance";
/// Firecracker's default limit on an API request body (bytes).
pub const DEFAULT_MAX_PAYLOAD: usize = 51200;
/// Firecracker's default guest memory (MiB), when machine-config does not say.
const FIRECRACKER_MEM_BYTES: u64 = 128 << 20;

/// How pvm was asked to run in Firecracker mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirecrackerMode {
    /// Where to serve the API; None with --no-api (or a config file alone).
    pub api_sock: Option<PathBuf>,
    pub config_file: Option<PathBuf>,
    pub id: String,
    pub max_payload: usize,
    /// The jailer's timing flags, reported once the API is up.
    pub startup: crate::metrics::StartupTimes,
    /// `--mmds-size-limit`, logged as having nothing to apply to.
    pub mmds_size_limit: Option<usize>,
    /// A config file without --api-sock or --no-api: the API on the run directory's ID.sock,
    /// as in pvm's own mode.
    pub run_dir_api: bool,
}

/// The whole command line: the VM pvm's own flags describe, and Firecracker mode if asked for.
#[derive(Debug, Clone)]
pub struct Launch {
    pub config: VmConfig,
    pub firecracker: Option<FirecrackerMode>,
    /// The VM's id (Firecracker mode's is in `firecracker` too).
    pub id: String,
    /// pvm's own mode serves its API on the run directory's ID.sock (not with --no-api).
    pub run_dir_api: bool,
    /// `--restore`: the VM comes from a snapshot, not from `config`'s boot files.
    pub restore: Option<crate::vm::RestoreSpec>,
    /// `pvm` with no boot files, or `pvm -- COMMAND`: the sandbox (crate::sandbox).
    pub sandbox: Option<SandboxSpec>,
}

/// What the command line asks for: a VM, or a subcommand.
#[derive(Debug, Clone)]
pub enum Invocation {
    Run(Box<Launch>),
    Manage(manage::Command),
}

/// The clap definition of the whole command line (for the manual page).
pub fn command() -> clap::Command {
    Args::command()
}

/// Whether `id` is a valid VM id (Firecracker's instance id rule).
pub fn is_valid_id(id: &str) -> bool {
    parse_id(id).is_ok()
}

/// `--help`'s closing paragraphs: the run directory and the extra exit codes.
const AFTER_LONG_HELP: &str = "Run directory: every pvm has an id (--id) and serves its API on \
     ID.sock in $XDG_RUNTIME_DIR/pvm/ (or /run/pvm/ for root; a user with neither has none), \
     unless --api-sock or --no-api say otherwise; --console socket puts ID.console beside it. \
     The VM boots even if that socket cannot be made (pvm warns). A helper process removes \
     the sockets when pvm ends; any left (stale: nobody accepts) are removed by pvm list and \
     by the next pvm with the same id.";

/// `--console`: the kind, and the socket if any.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ConsoleArg {
    kind: ConsoleKind,
    /// None: the terminal; Some(None): the run directory's; Some(Some(path)): there.
    socket: Option<Option<PathBuf>>,
}

/// Firecracker's instance id rule.
fn parse_id(text: &str) -> Result<String, KeywordError> {
    let ok = (1..=64).contains(&text.len())
        && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Ok(text.to_string())
    } else {
        Err(KeywordError::Id(text.to_string()))
    }
}

/// `--help`'s description, its exit-status list made from the codes pvm exits with.
fn long_about() -> String {
    format!(
        "pvm boots a Linux guest on KVM. The guest sees virtio devices plus an 8250 UART for \
         early boot; the UART (ttyS0) is wired to this terminal in raw mode (or to a Unix \
         socket, --console socket). pvm COMMAND manages running VMs (pvm list, status, \
         pause, resume, stop, console).\n\n\
         pvm with nothing to boot (no --kernel, --initrd or --disk) runs the sandbox: the \
         host's own kernel with the host's root shared read-only under a tmpfs overlay and a \
         shell on this terminal; pvm -- COMMAND [ARGS...] runs one command that way and exits \
         with its status (125: the sandbox failed; 126, 127: the command cannot run, is not \
         found).\n\n\
         SIGUSR1 pauses the VM (every vCPU and virtio device), SIGUSR2 resumes it.\n\n{}",
        crate::exit::exit_status_help()
    )
}

/// A value one of pvm's own keyword flags does not take; clap names the flag.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum KeywordError {
    #[error("'{0}' is not a transport (pci or mmio)")]
    Transport(String),
    #[error("'{0}' is not a console kind (serial or virtio) nor socket[=PATH]")]
    Console(String),
    #[error("'{0}': socket= needs a path")]
    ConsoleSocketPath(String),
    #[error("'{0}' must be 1 to 64 letters, digits and '-'")]
    Id(String),
    #[error("'{0}' is not a huge page size (pvm supports 2M)")]
    HugePages(String),
}

fn parse_huge_pages(text: &str) -> Result<GuestPages, KeywordError> {
    match text {
        "2M" => Ok(GuestPages::Huge2M),
        _ => Err(KeywordError::HugePages(text.to_string())),
    }
}

fn parse_transport(text: &str) -> Result<Transport, KeywordError> {
    match text {
        "pci" => Ok(Transport::Pci),
        "mmio" => Ok(Transport::Mmio),
        _ => Err(KeywordError::Transport(text.to_string())),
    }
}

fn parse_console(text: &str) -> Result<ConsoleArg, KeywordError> {
    let mut arg = ConsoleArg {
        kind: ConsoleKind::Serial,
        socket: None,
    };
    let mut kinds = 0;
    for part in text.split(',') {
        match part {
            "serial" => arg.kind = ConsoleKind::Serial,
            "virtio" => arg.kind = ConsoleKind::Virtio,
            "socket" if arg.socket.is_none() => arg.socket = Some(None),
            _ => match part.strip_prefix("socket=") {
                Some("") => return Err(KeywordError::ConsoleSocketPath(text.to_string())),
                Some(path) if arg.socket.is_none() => arg.socket = Some(Some(path.into())),
                _ => return Err(KeywordError::Console(text.to_string())),
            },
        }
        if matches!(part, "serial" | "virtio") {
            kinds += 1;
        }
    }
    if kinds > 1 {
        return Err(KeywordError::Console(text.to_string()));
    }
    Ok(arg)
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
    parse_launch(args).map(|launch| launch.config)
}

/// [`parse`], with Firecracker mode's flags; a subcommand is a usage error here.
pub fn parse_launch<I: IntoIterator<Item = OsString>>(args: I) -> Result<Launch, CliExit> {
    match parse_invocation(args)? {
        Invocation::Run(launch) => Ok(*launch),
        Invocation::Manage(_) => Err(usage_error("a subcommand does not boot a VM".to_string())),
    }
}

/// Parses the process arguments into a VM to run or a subcommand.
pub fn parse_invocation<I: IntoIterator<Item = OsString>>(args: I) -> Result<Invocation, CliExit> {
    let mut args = pvm_common::cli::parse::<Args>(args).map_err(|stop| match stop {
        Stop::Info(text) => CliExit::Message(0, text),
        Stop::Usage(line) => usage_error(line),
    })?;
    if let Some(command) = args.command.take() {
        return Ok(Invocation::Manage(command));
    }
    let fc = &args.firecracker;
    let firecracker =
        (fc.api_sock.is_some() || fc.config_file.is_some()).then(|| FirecrackerMode {
            api_sock: fc.api_sock.clone(),
            config_file: fc.config_file.clone(),
            id: fc.id.clone().unwrap_or_else(|| DEFAULT_ID.to_string()),
            max_payload: fc.http_api_max_payload_size,
            startup: crate::metrics::StartupTimes {
                start_us: fc.start_time_us,
                start_cpu_us: fc.start_time_cpu_us,
                parent_cpu_us: fc.parent_cpu_time_us,
            },
            mmds_size_limit: fc.mmds_size_limit,
            run_dir_api: fc.api_sock.is_none() && !fc.no_api,
        });
    let sandbox = sandbox_of(&args, firecracker.is_some());
    let transport = match (args.transport, fc.enable_pci) {
        (Some(Transport::Mmio), true) => {
            return Err(usage_error(
                "--enable-pci contradicts --transport mmio".to_string(),
            ));
        }
        (_, true) => Transport::Pci,
        (Some(transport), false) => transport,
        // Firecracker's devices are on virtio-mmio unless PCI is asked for.
        (None, false) if firecracker.is_some() => Transport::Mmio,
        (None, false) => Transport::Pci,
    };
    let mem = args.mem.unwrap_or(if firecracker.is_some() {
        FIRECRACKER_MEM_BYTES
    } else {
        config::DEFAULT_MEM_BYTES
    });
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
    check_shares(&args.share)?;
    if let Some(tap) = args.tap.iter().find(|t| t.queues > 1) {
        if transport == Transport::Mmio {
            // Supporting it would work but give nothing: the pairs' interrupts could not reach
            // separate vCPUs.
            return Err(usage_error(format!(
                "--tap {},queues={} needs --transport pci: a virtio-mmio device has a single \
                 interrupt, so its queue pairs cannot interrupt separate vCPUs",
                tap.name, tap.queues
            )));
        }
    }
    let id = match (&fc.id, &firecracker) {
        (Some(id), _) => id.clone(),
        (None, Some(mode)) => mode.id.clone(),
        (None, None) => format!("pvm-{}", std::process::id()),
    };
    let console_socket = match args.console.socket.clone() {
        None => None,
        // Absolute: GET /pvm/info reports it to clients in other directories.
        Some(Some(path)) => Some(ConsoleSocketPath {
            path: std::path::absolute(&path).unwrap_or(path),
            in_run_dir: false,
        }),
        Some(None) => {
            let dir = rundir::run_dir()
                .map_err(|e| usage_error(format!("--console socket: {e}; give socket=PATH")))?;
            Some(ConsoleSocketPath {
                path: rundir::console_socket(&dir, &id),
                in_run_dir: true,
            })
        }
    };
    if args.smt && args.cpus > 1 && args.cpus % 2 != 0 {
        return Err(usage_error(format!(
            "--smt pairs vCPUs into cores: --cpus must be 1 or even, not {}",
            args.cpus
        )));
    }
    if args.huge_pages == Some(GuestPages::Huge2M) && mem % config::HUGE_PAGE_BYTES != 0 {
        return Err(usage_error(format!(
            "--huge-pages 2M needs --mem in whole 2 MiB pages, not {mem} bytes"
        )));
    }
    if args.cmdline.contains('\0') || args.cmdline.contains('\n') {
        return Err(usage_error(
            "--cmdline must be a single line of text".to_string(),
        ));
    }
    if let Some(balloon) = &args.balloon {
        crate::balloon::check_fits(balloon, mem)
            .map_err(|e| usage_error(format!("--balloon: {e}")))?;
    }
    let cloud_init = cloud_init_seed(args.cloud_init.as_ref(), &id, args.restore.is_some())?;
    if args.restore.is_some() {
        // A restored VM keeps its snapshot's MAC, queues and limits: only the tap's name is
        // taken, and an option that would be dropped is refused instead.
        if let Some(tap) = args
            .tap
            .iter()
            .find(|t| config::parse_tap(&t.name).ok().as_ref() != Some(*t))
        {
            return Err(usage_error(format!(
                "--tap {} with --restore: only the tap's name is taken (the snapshot keeps its \
                 MAC, queues and rate limits); give the name alone",
                tap.name
            )));
        }
    }
    let ram = match (&args.mem_file, &args.mem_uffd) {
        (Some(file), _) => Some(crate::vm::MemSource::File(file.clone())),
        (None, Some(socket)) => Some(crate::vm::MemSource::Uffd(socket.clone())),
        (None, None) => None,
    };
    let restore = match (&args.restore, ram) {
        (Some(snapshot), Some(mem)) => Some(crate::vm::RestoreSpec {
            snapshot: snapshot.clone(),
            mem,
            taps: args.tap.iter().map(|t| t.name.clone()).collect(),
            overrides: Vec::new(),
            resume: !args.paused,
        }),
        _ => None,
    };
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        mem_bytes: mem,
        cpus: args.cpus,
        disks,
        taps: args.tap,
        vhost_user_disks,
        vhost_user_nets: args.net,
        rng_limit: Default::default(),
        console: args.console.kind,
        transport,
        stats: args.stats,
        boot_timer: args.boot_timer,
        seccomp: args.seccomp && !args.firecracker.no_seccomp,
        log_level: args.log_level,
        logger: crate::logger::LoggerConfig {
            log_path: args.log_path,
            level: args.level,
            show_level: args.show_level,
            show_log_origin: args.show_log_origin,
        },
        metrics_path: args.metrics_path,
        serial_out: args.serial_out,
        balloon: args.balloon,
        console_socket,
        smt: args.smt,
        huge_pages: args.huge_pages.unwrap_or_default(),
        vsock: args.vsock,
        exit_port: false,
        shares: args.share,
        track_dirty_pages: args.track_dirty_pages,
        cloud_init,
    };
    Ok(Invocation::Run(Box::new(Launch {
        config,
        firecracker,
        id,
        run_dir_api: !args.firecracker.no_api,
        restore,
        sandbox,
    })))
}

/// The sandbox, when asked for by `-- COMMAND` or by naming nothing to boot. Which flags it
/// refuses is [`sandbox_refusal`]'s to say, when pvm runs: a command line only parsed (the
/// API's base, the tests) keeps every flag.
fn sandbox_of(args: &Args, firecracker: bool) -> Option<SandboxSpec> {
    let nothing_to_boot = args.kernel.is_none()
        && args.initrd.is_none()
        && args.disk.is_empty()
        && args.restore.is_none()
        && !firecracker;
    (!args.sandbox_command.is_empty() || nothing_to_boot).then(|| SandboxSpec {
        command: args.sandbox_command.clone(),
    })
}

/// Why `launch` cannot run as the sandbox: the first flag whose boot files or devices its
/// guest cannot use, named, as a usage error.
pub fn sandbox_refusal(launch: &Launch) -> Result<(), CliExit> {
    if launch.sandbox.is_none() {
        return Ok(());
    }
    let c = &launch.config;
    let console_elsewhere = c.console != ConsoleKind::Serial || c.console_socket.is_some();
    let no_driver = "the sandbox guest loads no driver for it";
    let refused = [
        (
            c.initrd.is_some(),
            "--initrd",
            "pvm builds the sandbox's initramfs itself",
        ),
        (
            !c.disks.is_empty() || !c.vhost_user_disks.is_empty(),
            "--disk",
            "the sandbox's root is the host's",
        ),
        (
            launch.restore.is_some(),
            "--restore",
            "the sandbox boots afresh",
        ),
        (
            launch.firecracker.is_some(),
            "--api-sock/--config-file",
            "Firecracker mode boots what it is told",
        ),
        (!c.taps.is_empty(), "--tap", no_driver),
        (!c.vhost_user_nets.is_empty(), "--net", no_driver),
        (c.vsock.is_some(), "--vsock", no_driver),
        (c.balloon.is_some(), "--balloon", no_driver),
        (c.cloud_init.is_some(), "--cloud-init", no_driver),
        (
            c.shares.iter().any(|s| s.tag == crate::sandbox::SHARE_TAG),
            "--share",
            "the host's root is the share tagged 'hostfs' there; give another tag=NAME",
        ),
        (
            console_elsewhere,
            "--console",
            "the sandbox's console is this terminal (ttyS0)",
        ),
    ];
    match refused.iter().find(|(given, _, _)| *given) {
        Some((_, flag, why)) => Err(usage_error(format!(
            "{flag} does not fit the sandbox (pvm without --kernel, or pvm -- COMMAND): {why}"
        ))),
        None => Ok(()),
    }
}

/// Every `--share` names a directory, and no two use the same tag (the guest mounts by tag).
fn check_shares(shares: &[config::ShareSpec]) -> Result<(), CliExit> {
    for (i, share) in shares.iter().enumerate() {
        if !share.path.is_dir() {
            return Err(usage_error(format!(
                "--share {}: not a directory",
                share.path.display()
            )));
        }
        if shares[..i].iter().any(|other| other.tag == share.tag) {
            return Err(usage_error(format!(
                "--share {}: tag '{}' is already used by another share; give tag=NAME",
                share.path.display(),
                share.tag
            )));
        }
    }
    Ok(())
}

/// `--cloud-init`'s seed, built now so that an unusable file is a usage error before anything
/// else happens. A restored VM has exactly the devices its snapshot recorded, its seed (saved
/// whole in the snapshot) included.
fn cloud_init_seed(
    spec: Option<&crate::cloud_init::CloudInitSpec>,
    id: &str,
    restore: bool,
) -> Result<Option<std::sync::Arc<crate::cloud_init::Seed>>, CliExit> {
    let Some(spec) = spec else {
        return Ok(None);
    };
    if restore {
        return Err(usage_error(
            "--cloud-init cannot be used with --restore: the restored VM has the devices its \
             snapshot recorded, and the seed it booted with is in the snapshot"
                .to_string(),
        ));
    }
    match crate::cloud_init::Seed::build(spec, id) {
        Ok(seed) => Ok(Some(std::sync::Arc::new(seed))),
        Err(e) if e.is_usage() => Err(usage_error(format!("--cloud-init {e}"))),
        Err(e) => Err(CliExit::Message(
            pvm_common::exit::FAILURE,
            format!("pvm: --cloud-init: {e}\n"),
        )),
    }
}

#[cfg(test)]
#[path = "cli_manage_tests.rs"]
mod manage_tests;

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn parse_strs(args: &[&str]) -> Result<VmConfig, CliExit> {
        parse(
            std::iter::once("pvm")
                .chain(args.iter().copied())
                .map(OsString::from),
        )
    }

    /// The one-line usage error `args` give.
    pub(super) fn error_of(args: &[&str]) -> String {
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
        assert_eq!(c.serial_out, None);
        let c = parse_strs(&[
            "--serial-out",
            "/tmp/pvm.serial",
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
        assert_eq!(c.serial_out, Some(PathBuf::from("/tmp/pvm.serial")));
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

    fn launch(args: &[&str]) -> Launch {
        parse_launch(
            std::iter::once("pvm")
                .chain(args.iter().copied())
                .map(OsString::from),
        )
        .unwrap()
    }

    #[test]
    fn firecracker_mode_defaults_to_mmio_and_128m() {
        let l = launch(&["--api-sock", "/tmp/fc.sock", "--id", "vm-1"]);
        let fc = l.firecracker.unwrap();
        assert_eq!(fc.api_sock, Some(PathBuf::from("/tmp/fc.sock")));
        assert_eq!(
            (fc.id.as_str(), fc.max_payload),
            ("vm-1", DEFAULT_MAX_PAYLOAD)
        );
        assert_eq!(l.config.transport, Transport::Mmio);
        assert_eq!(l.config.mem_bytes, 128 << 20);
        assert!(l.config.seccomp);
        let l = launch(&[
            "--config-file",
            "/tmp/c.json",
            "--no-api",
            "--enable-pci",
            "--no-seccomp",
            "--http-api-max-payload-size",
            "100",
            "--mmds-size-limit",
            "10",
            "--start-time-us",
            "1",
            "--start-time-cpu-us",
            "2",
            "--parent-cpu-time-us",
            "3",
            "--mem",
            "256M",
        ]);
        let fc = l.firecracker.unwrap();
        assert_eq!(fc.api_sock, None);
        assert_eq!(fc.id, DEFAULT_ID);
        assert_eq!(fc.max_payload, 100);
        assert_eq!(l.config.transport, Transport::Pci);
        assert_eq!(l.config.mem_bytes, 256 << 20);
        assert!(!l.config.seccomp);
        // pvm's own mode is unchanged.
        let l = launch(&[]);
        assert!(l.firecracker.is_none());
        assert_eq!(l.config.transport, Transport::Pci);
    }

    #[test]
    fn firecracker_flag_errors() {
        assert!(error_of(&["--no-api", "--api-sock", "/a"]).contains("--no-api"));
        assert!(error_of(&["--id", "bad id"]).contains("--id"));
        assert!(error_of(&["--id", ""]).contains("--id"));
        let e = error_of(&["--enable-pci", "--transport", "mmio"]);
        assert!(e.contains("--enable-pci"), "{e}");
        assert!(error_of(&["--http-api-max-payload-size", "x"]).contains("payload"));
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

    #[test]
    fn restore_takes_a_snapshot_a_memory_file_and_tap_names() {
        let l = launch(&[
            "--restore",
            "vm.snap",
            "--mem-file",
            "vm.mem",
            "--tap",
            "tap7",
            "--paused",
        ]);
        let spec = l.restore.expect("a restore");
        assert_eq!(spec.snapshot, PathBuf::from("vm.snap"));
        assert_eq!(
            spec.mem,
            crate::vm::MemSource::File(PathBuf::from("vm.mem"))
        );
        assert_eq!(spec.taps, vec!["tap7".to_string()]);
        assert!(!spec.resume);
        let e = error_of(&[
            "--restore",
            "s",
            "--mem-file",
            "m",
            "--tap",
            "tap7,vhost=on",
        ]);
        assert!(
            e.contains("--tap tap7 with --restore: only the tap's name"),
            "{e}"
        );
        assert!(launch(&[]).restore.is_none());
        assert!(error_of(&["--restore", "vm.snap"]).contains("--mem-file"));
        assert!(error_of(&["--mem-file", "vm.mem"]).contains("--restore"));
        // --paused needs --restore, which needs --mem-file or --mem-uffd: clap names the first.
        assert!(error_of(&["--paused"]).contains("--restore"));
        let e = error_of(&["--restore", "s", "--mem-file", "m", "--kernel", "k"]);
        assert!(e.contains("--kernel") || e.contains("--restore"), "{e}");
    }

    #[test]
    fn restore_takes_a_page_fault_handler_socket_instead_of_a_memory_file() {
        let l = launch(&["--restore", "vm.snap", "--mem-uffd", "/run/h.sock"]);
        let spec = l.restore.expect("a restore");
        assert_eq!(
            spec.mem,
            crate::vm::MemSource::Uffd(PathBuf::from("/run/h.sock"))
        );
        let e = error_of(&["--restore", "s", "--mem-file", "m", "--mem-uffd", "u"]);
        assert!(e.contains("--mem-uffd") && e.contains("--mem-file"), "{e}");
        assert!(error_of(&["--mem-uffd", "u"]).contains("--restore"));
        assert!(error_of(&["--restore", "vm.snap"]).contains("--mem-uffd"));
    }

    #[test]
    fn shares() {
        let dir = std::env::temp_dir();
        let dir = dir.to_str().unwrap();
        let c = parse_strs(&["--share", dir, "--share", &format!("{dir},tag=two")]).unwrap();
        let tags: Vec<&str> = c.shares.iter().map(|s| s.tag.as_str()).collect();
        assert_eq!(tags, ["hostfs", "two"]);
        assert!(parse_strs(&[]).unwrap().shares.is_empty());
        let e = error_of(&["--share", dir, "--share", dir]);
        assert!(e.contains("tag 'hostfs' is already used"), "{e}");
        let e = error_of(&["--share", "/nonexistent/dir"]);
        assert!(
            e.contains("--share /nonexistent/dir: not a directory"),
            "{e}"
        );
        let e = error_of(&["--share", "/dev/null"]);
        assert!(e.contains("not a directory"), "{e}");
        let e = error_of(&["--share", &format!("{dir},ro")]);
        assert!(e.contains("unknown share option 'ro'"), "{e}");
    }

    #[test]
    fn cloud_init_builds_the_seed_and_refuses_bad_values_naming_flag_and_file() {
        let dir = std::env::temp_dir().join(format!("pvm-cli-cloud-init-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let user = dir.join("user-data");
        std::fs::write(&user, "#cloud-config\n").unwrap();
        let empty = dir.join("empty");
        std::fs::write(&empty, "").unwrap();
        let flag = format!("user-data={}", user.display());
        let seed = parse_strs(&["--id", "vm-9", "--cloud-init", &flag])
            .unwrap()
            .cloud_init
            .expect("a seed");
        assert_eq!(seed.bytes(), 1 << 20);
        assert!(parse_strs(&[]).unwrap().cloud_init.is_none());
        for (value, says) in [
            (
                "user-data=/nonexistent/u".to_string(),
                "--cloud-init user-data=/nonexistent/u: ",
            ),
            (format!("user-data={}", empty.display()), "is empty"),
            (
                format!("{flag},meta-data=/nonexistent/m"),
                "meta-data=/nonexistent/m: ",
            ),
            (format!("{flag},vendor-data=v"), "unknown key 'vendor-data'"),
            (format!("{flag},{flag}"), "user-data= is given twice"),
            ("meta-data=m".to_string(), "user-data=FILE is missing"),
        ] {
            let e = error_of(&["--cloud-init", &value]);
            assert!(e.starts_with("pvm: ") && e.contains("--cloud-init"), "{e}");
            assert!(e.contains(says), "{value}: {e}");
        }
        let e = error_of(&["--cloud-init", &flag, "--cloud-init", &flag]);
        assert!(e.contains("--cloud-init"), "{e}");
        let e = error_of(&["--restore", "s", "--mem-file", "m", "--cloud-init", &flag]);
        assert!(
            e.contains("--cloud-init cannot be used with --restore"),
            "{e}"
        );
    }
}

//! The validated description of a VM. Everything here has already been checked: sizes are in
//! range, files named on the command line could be opened, device options parsed. `vm` builds
//! from this without re-validating.

use std::fmt;
use std::path::PathBuf;

use log::LevelFilter;
use pvm_virtio::block::{BlockOptions, IoEngine, OptionsError};
use pvm_virtio::{BucketConfig, RateLimit};

/// Smallest guest memory pvm accepts: below this no Linux guest gets through early boot.
pub const MIN_MEM_BYTES: u64 = 32 << 20;
/// Largest guest memory pvm accepts (1 TiB): far beyond any host here, but a hard sanity bound.
pub const MAX_MEM_BYTES: u64 = 1 << 40;
/// Default guest memory.
pub const DEFAULT_MEM_BYTES: u64 = 512 << 20;
/// Most vCPUs a guest may have (APIC IDs are 8-bit in the MADT entries pvm writes).
pub const MAX_CPUS: u8 = 255;
/// Most queue pairs one `--tap` may have (`queues=N`): each pair is a tap queue, a device
/// thread or a vhost-net instance, and two MSI-X vectors.
pub const MAX_TAP_QUEUES: u16 = 16;

/// Where the guest console lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleKind {
    /// The legacy 8250 UART at 0x3f8 (ttyS0).
    Serial,
    /// virtio-console (hvc0); the UART still carries early boot messages.
    Virtio,
}

/// How virtio devices reach the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// virtio-mmio, described in the ACPI DSDT (and on the command line for `acpi=off` guests).
    Mmio,
    /// Modern virtio-pci with MSI-X: every distribution kernel has its driver.
    Pci,
}

/// One `--disk` flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
    /// The serial number the guest reads with VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    pub serial: Option<String>,
    /// Offer the guest a flush command (served with fdatasync); false leaves the host's page
    /// cache in charge and the guest never flushes (Firecracker's `cache_type: Unsafe`).
    pub flush: bool,
    /// `bw=`, `iops=`: requests beyond it wait in the ring.
    pub limit: RateLimit,
    /// `engine=`, `direct=`, `queues=`, `queue_size=`: how pvm serves the disk.
    pub options: BlockOptions,
}

/// Whether a tap's queues go to the kernel's vhost-net.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VhostMode {
    /// vhost-net, or fail.
    On,
    /// pvm's own device worker.
    Off,
    /// vhost-net when /dev/vhost-net is usable, else pvm's worker.
    Auto,
}

/// One `--tap` flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapSpec {
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub vhost: VhostMode,
    /// Receive/transmit queue pairs (1..=[`MAX_TAP_QUEUES`]); more than one makes the tap a
    /// multi-queue tap and the device offer VIRTIO_NET_F_MQ.
    pub queues: u16,
    /// `rx_bw=`, `rx_pps=`: frames to the guest, over all queue pairs.
    pub rx_limit: RateLimit,
    /// `tx_bw=`, `tx_pps=`: frames from the guest, over all queue pairs.
    pub tx_limit: RateLimit,
}

impl TapSpec {
    /// Whether a rate limit applies (only pvm's own workers can enforce one).
    pub fn is_limited(&self) -> bool {
        self.rx_limit.is_enabled() || self.tx_limit.is_enabled()
    }
}

/// Where the host side of the guest's vsock lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VsockBackend {
    /// Firecracker's hybrid vsock: host processes use Unix sockets at and beside this path.
    Unix(PathBuf),
    /// The kernel's vhost-vsock: host processes use AF_VSOCK.
    Vhost,
}

/// `--vsock` (or `PUT /vsock`): the guest's vsock device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockSpec {
    pub cid: u64,
    pub backend: VsockBackend,
}

/// `--share PATH[,tag=NAME]`: a host directory the guest mounts read-only over virtio-fs
/// (`mount -t virtiofs NAME /mnt`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareSpec {
    pub path: PathBuf,
    pub tag: String,
}

/// A complete, validated VM description.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// The user's part of the kernel command line, appended after what pvm adds.
    pub cmdline: String,
    pub mem_bytes: u64,
    pub cpus: u8,
    pub disks: Vec<DiskSpec>,
    pub taps: Vec<TapSpec>,
    /// `--disk vhost-user=SOCKET`: block devices served by vhost-user backends, after the
    /// file-backed disks in guest order.
    pub vhost_user_disks: Vec<PathBuf>,
    /// `--net vhost-user=SOCKET`: net devices served by vhost-user backends, after the taps.
    pub vhost_user_nets: Vec<PathBuf>,
    /// The entropy device's rate limit (Firecracker's `PUT /entropy`).
    pub rng_limit: RateLimit,
    pub console: ConsoleKind,
    pub transport: Transport,
    /// Print userspace exit counts by reason when the VM ends.
    pub stats: bool,
    /// The boot-timer debug device on port 0x3f0 (crate::devices::boot_timer).
    pub boot_timer: bool,
    /// Install the per-thread seccomp filters (crate::seccomp).
    pub seccomp: bool,
    pub log_level: LevelFilter,
    /// `--log-path`, `--level`, `--show-level`, `--show-log-origin`.
    pub logger: crate::logger::LoggerConfig,
    /// `--metrics-path`: JSON lines of counters (crate::metrics).
    pub metrics_path: Option<PathBuf>,
    /// `--serial-out`: the UART's output goes to this file or FIFO instead of stdout.
    pub serial_out: Option<PathBuf>,
    /// `--balloon` or `PUT /balloon`: a virtio-balloon device.
    pub balloon: Option<pvm_virtio::BalloonConfig>,
    /// `--console socket[=PATH]`: the console on this Unix socket instead of the terminal
    /// (crate::devices::console_socket).
    pub console_socket: Option<ConsoleSocketPath>,
    /// `--smt` (Firecracker's `smt`): vCPUs are paired as two threads of one core.
    pub smt: bool,
    /// `--huge-pages` (Firecracker's `huge_pages`): what backs guest RAM.
    pub huge_pages: GuestPages,
    /// `--vsock`: a virtio-vsock device (one per VM).
    pub vsock: Option<VsockSpec>,
    /// The sandbox's exit device on port 0xf4 (crate::devices::exit_port); only `pvm` with no
    /// boot files or `pvm -- COMMAND` (crate::sandbox) sets it.
    pub exit_port: bool,
    /// `--share`: read-only virtio-fs shares, after every other device in guest order.
    pub shares: Vec<ShareSpec>,
    /// `--track-dirty-pages` (Firecracker's `track_dirty_pages`): log the pages written
    /// between snapshots, for Diff snapshots.
    pub track_dirty_pages: bool,
    /// `--cloud-init`: the NoCloud seed, a read-only disk after every other disk.
    pub cloud_init: Option<std::sync::Arc<crate::cloud_init::Seed>>,
}

/// Where `--console socket` puts the console's socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleSocketPath {
    pub path: PathBuf,
    /// The run directory's `ID.console` (its directory is made if missing).
    pub in_run_dir: bool,
}

/// What backs guest RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GuestPages {
    /// Ordinary pages, advised for transparent huge pages.
    #[default]
    Normal,
    /// 2 MiB hugetlbfs pages, all reserved when the VM is built.
    Huge2M,
}

/// The bytes of one 2 MiB huge page: guest RAM on huge pages must be a multiple of it.
pub const HUGE_PAGE_BYTES: u64 = 2 << 20;

/// Why a flag's value was refused; clap puts the flag in front of the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("'{0}' is not a size (use 256M, 2G or a number of MiB)")]
    NotASize(String),
    #[error("'{text}' has an unknown unit '{unit}' (use K, M, G or T)")]
    UnknownUnit { text: String, unit: String },
    #[error("'{0}' is too large")]
    SizeTooLarge(String),
    #[error("{0} is below the minimum of {min}M", min = MIN_MEM_BYTES >> 20)]
    BelowMinimum(String),
    #[error("{0} is above the maximum of {max}G", max = MAX_MEM_BYTES >> 30)]
    AboveMaximum(String),
    #[error("{0} is not a whole number of 4 KiB pages")]
    NotWholePages(String),
    #[error("mac {0}")]
    Mac(pvm_common::cli::MacError),
    #[error("vhost-user= needs the backend's socket path")]
    NoSocket,
    #[error("vhost-user={0}: no options are taken; the backend decides (e.g. read-only)")]
    SocketOptions(String),
    #[error("'{0}': use vhost-user=SOCKET (a tap pvm serves itself is --tap NAME)")]
    NotVhostUser(String),
    #[error("a disk needs a path: --disk PATH[,ro][,serial=ID]")]
    NoDiskPath,
    #[error("serial '{0}' must be 1 to 20 ASCII characters")]
    Serial(String),
    #[error(
        "unknown disk option '{0}' (known: ro, serial=ID, bw=BYTES, iops=N, engine=sync|io_uring, \
         direct=on|off, queues=N, queue_size=N)"
    )]
    DiskOption(String),
    #[error("{option}={value}: use {expected}")]
    DiskValue {
        option: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(transparent)]
    DiskQueues(#[from] OptionsError),
    #[error(
        "{option}={value}: use a positive number per second, optionally with K, M or G (e.g. 10M)"
    )]
    Rate { option: String, value: String },
    #[error(
        "vhost=on: the kernel's vhost-net cannot enforce rx_bw/tx_bw/rx_pps/tx_pps; use vhost=auto or off"
    )]
    LimitWithVhost,
    #[error("tap name '{0}' must be 1 to 15 characters without '/' or spaces")]
    TapName(String),
    #[error("vhost={0}: use on, off or auto")]
    VhostMode(String),
    #[error("queues={0}: use 1 to {MAX_TAP_QUEUES} queue pairs")]
    Queues(String),
    #[error(
        "unknown tap option '{0}' (known: mac=MAC, vhost=on|off|auto, queues=N, rx_bw=, tx_bw=, rx_pps=, tx_pps=)"
    )]
    TapOption(String),
    #[error("cid={0}: use a number from 3 to 4294967294")]
    VsockCid(String),
    #[error("needs cid=N and one of socket=PATH or vhost=on: --vsock cid=N,socket=PATH")]
    VsockIncomplete,
    #[error("vhost={0}: use vhost=on (or socket=PATH for pvm's own device)")]
    VsockVhost(String),
    #[error("unknown vsock option '{0}' (known: cid=N, socket=PATH, vhost=on)")]
    VsockOption(String),
    #[error("a share needs a directory: --share PATH[,tag=NAME]")]
    NoSharePath,
    #[error("tag '{0}' must be 1 to 36 bytes")]
    ShareTag(String),
    #[error("unknown share option '{0}' (known: tag=NAME)")]
    ShareOption(String),
}

/// Parses a memory size: `256M`, `2G`, `1T`, `4096K`, or a plain number of MiB.
pub fn parse_mem_size(text: &str) -> Result<u64, ValueError> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "M"),
    };
    if digits.is_empty() {
        return Err(ValueError::NotASize(text.to_string()));
    }
    let shift = match unit.to_ascii_uppercase().as_str() {
        "K" | "KIB" => 10,
        "M" | "MIB" => 20,
        "G" | "GIB" => 30,
        "T" | "TIB" => 40,
        _ => {
            return Err(ValueError::UnknownUnit {
                text: text.to_string(),
                unit: unit.to_string(),
            });
        }
    };
    // Only digits: parsing fails on overflow alone.
    let too_large = || ValueError::SizeTooLarge(text.to_string());
    let value: u64 = digits.parse().map_err(|_| too_large())?;
    let bytes = value.checked_mul(1 << shift).ok_or_else(too_large)?;
    if bytes < MIN_MEM_BYTES {
        return Err(ValueError::BelowMinimum(text.to_string()));
    }
    if bytes > MAX_MEM_BYTES {
        return Err(ValueError::AboveMaximum(text.to_string()));
    }
    if bytes % 4096 != 0 {
        return Err(ValueError::NotWholePages(text.to_string()));
    }
    Ok(bytes)
}

/// Parses a MAC address written as six colon-separated hex bytes (the `mac=` of `--tap`).
pub fn parse_mac(text: &str) -> Result<[u8; 6], ValueError> {
    pvm_common::cli::parse_mac(text).map_err(ValueError::Mac)
}

/// One `--disk` flag: a raw image pvm serves itself, or a vhost-user backend's socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskArg {
    File(DiskSpec),
    VhostUser(PathBuf),
}

/// The `vhost-user=SOCKET` form shared by --disk and --net; None when `text` is not of it.
fn parse_vhost_user(text: &str) -> Option<Result<PathBuf, ValueError>> {
    let socket = text.strip_prefix("vhost-user=")?;
    Some(if socket.is_empty() {
        Err(ValueError::NoSocket)
    } else if socket.contains(',') {
        Err(ValueError::SocketOptions(socket.to_string()))
    } else {
        Ok(PathBuf::from(socket))
    })
}

/// Parses `PATH[,ro][,serial=ID]` or `vhost-user=SOCKET`.
pub fn parse_disk_arg(text: &str) -> Result<DiskArg, ValueError> {
    match parse_vhost_user(text) {
        Some(socket) => socket.map(DiskArg::VhostUser),
        None => parse_disk(text).map(DiskArg::File),
    }
}

/// Parses `--net`: `vhost-user=SOCKET` (taps pvm serves itself are `--tap`).
pub fn parse_net(text: &str) -> Result<PathBuf, ValueError> {
    parse_vhost_user(text).unwrap_or_else(|| Err(ValueError::NotVhostUser(text.to_string())))
}

/// Parses a per-second rate (`bw=10M`, `iops=500`, an optional `/s` after it): a number with an
/// optional binary K, M or G multiplier, at least 1.
pub fn parse_rate(option: &str, value: &str) -> Result<u64, ValueError> {
    let bad = || ValueError::Rate {
        option: option.to_string(),
        value: value.to_string(),
    };
    let text = value.strip_suffix("/s").unwrap_or(value);
    let (digits, shift) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (text, 0),
        Some((i, _)) => match text[i..].to_ascii_uppercase().as_str() {
            "K" => (&text[..i], 10),
            "M" => (&text[..i], 20),
            "G" => (&text[..i], 30),
            _ => return Err(bad()),
        },
    };
    let rate: u64 = digits.parse().map_err(|_| bad())?;
    rate.checked_mul(1 << shift)
        .filter(|r| *r > 0)
        .ok_or_else(bad)
}

/// `rate` per second with a bucket of one second's worth.
fn per_second(option: &str, value: &str) -> Result<Option<BucketConfig>, ValueError> {
    parse_rate(option, value).map(|rate| Some(BucketConfig::per_second(rate)))
}

/// Parses `PATH[,ro][,serial=ID][,bw=BYTES][,iops=N][,engine=E][,direct=on|off][,queues=N]
/// [,queue_size=N]`.
pub fn parse_disk(text: &str) -> Result<DiskSpec, ValueError> {
    let mut parts = text.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err(ValueError::NoDiskPath);
    }
    let mut spec = DiskSpec {
        path: PathBuf::from(path),
        read_only: false,
        serial: None,
        flush: true,
        limit: RateLimit::default(),
        options: BlockOptions::default(),
    };
    for option in parts {
        if parse_disk_serving(option, &mut spec.options)? {
            continue;
        }
        match option.split_once('=') {
            None if option == "ro" => spec.read_only = true,
            Some(("bw", rate)) => spec.limit.bandwidth = per_second("bw", rate)?,
            Some(("iops", rate)) => spec.limit.ops = per_second("iops", rate)?,
            Some(("serial", id)) => {
                if id.is_empty() || id.len() > 20 || !id.is_ascii() {
                    return Err(ValueError::Serial(id.to_string()));
                }
                spec.serial = Some(id.to_string());
            }
            _ => return Err(ValueError::DiskOption(option.to_string())),
        }
    }
    Ok(spec)
}

/// Takes `option` into `options` if it is one of engine=, direct=, queues=, queue_size=;
/// false if it is none of them.
fn parse_disk_serving(option: &str, options: &mut BlockOptions) -> Result<bool, ValueError> {
    let Some((name, value)) = option.split_once('=') else {
        return Ok(false);
    };
    let bad = |option: &'static str, expected: &'static str| ValueError::DiskValue {
        option,
        value: value.to_string(),
        expected,
    };
    let number = |option: &'static str| {
        value
            .parse::<u16>()
            .map_err(|_| bad(option, "a whole number"))
    };
    match name {
        "engine" => {
            options.engine = match value {
                "sync" => IoEngine::Sync,
                "io_uring" => IoEngine::IoUring,
                _ => return Err(bad("engine", "sync or io_uring")),
            }
        }
        "direct" => {
            options.direct = match value {
                "on" => true,
                "off" => false,
                _ => return Err(bad("direct", "on or off")),
            }
        }
        "queues" => options.queues = number("queues")?,
        "queue_size" => options.queue_size = number("queue_size")?,
        _ => return Ok(false),
    }
    options.validate()?;
    Ok(true)
}

/// Parses `NAME[,mac=MAC][,vhost=on|off|auto][,queues=N][,rx_bw=|tx_bw=BYTES][,rx_pps=|tx_pps=N]`.
pub fn parse_tap(text: &str) -> Result<TapSpec, ValueError> {
    let mut parts = text.split(',');
    let name = parts.next().unwrap_or_default();
    // IFNAMSIZ is 16 including the terminating NUL.
    if name.is_empty()
        || name.len() > 15
        || name.contains('/')
        || name.contains(char::is_whitespace)
    {
        return Err(ValueError::TapName(name.to_string()));
    }
    let mut spec = TapSpec {
        name: name.to_string(),
        mac: None,
        vhost: VhostMode::Auto,
        queues: 1,
        rx_limit: RateLimit::default(),
        tx_limit: RateLimit::default(),
    };
    for option in parts {
        match option.split_once('=') {
            Some(("mac", mac)) => spec.mac = Some(parse_mac(mac)?),
            Some(("vhost", mode)) => {
                spec.vhost = match mode {
                    "on" => VhostMode::On,
                    "off" => VhostMode::Off,
                    "auto" => VhostMode::Auto,
                    _ => return Err(ValueError::VhostMode(mode.to_string())),
                }
            }
            Some(("queues", count)) => {
                spec.queues = count
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_TAP_QUEUES).contains(n))
                    .ok_or_else(|| ValueError::Queues(count.to_string()))?;
            }
            Some((name @ "rx_bw", rate)) => spec.rx_limit.bandwidth = per_second(name, rate)?,
            Some((name @ "tx_bw", rate)) => spec.tx_limit.bandwidth = per_second(name, rate)?,
            Some((name @ "rx_pps", rate)) => spec.rx_limit.ops = per_second(name, rate)?,
            Some((name @ "tx_pps", rate)) => spec.tx_limit.ops = per_second(name, rate)?,
            _ => return Err(ValueError::TapOption(option.to_string())),
        }
    }
    if spec.vhost == VhostMode::On && spec.is_limited() {
        return Err(ValueError::LimitWithVhost);
    }
    Ok(spec)
}

/// Parses `cid=N,socket=PATH` or `cid=N,vhost=on`.
pub fn parse_vsock(text: &str) -> Result<VsockSpec, ValueError> {
    let (mut cid, mut socket, mut vhost) = (None, None, false);
    for option in text.split(',') {
        match option.split_once('=') {
            Some(("cid", n)) => {
                let range = pvm_virtio::vsock::MIN_GUEST_CID..=pvm_virtio::vsock::MAX_GUEST_CID;
                cid = Some(
                    n.parse()
                        .ok()
                        .filter(|n| range.contains(n))
                        .ok_or_else(|| ValueError::VsockCid(n.to_string()))?,
                );
            }
            Some(("socket", path)) if !path.is_empty() => socket = Some(PathBuf::from(path)),
            Some(("vhost", "on")) => vhost = true,
            Some(("vhost", other)) => return Err(ValueError::VsockVhost(other.to_string())),
            _ => return Err(ValueError::VsockOption(option.to_string())),
        }
    }
    let backend = match (socket, vhost) {
        (Some(path), false) => VsockBackend::Unix(path),
        (None, true) => VsockBackend::Vhost,
        _ => return Err(ValueError::VsockIncomplete),
    };
    let cid = cid.ok_or(ValueError::VsockIncomplete)?;
    Ok(VsockSpec { cid, backend })
}

/// Parses `PATH[,tag=NAME]` (the tag defaults to `hostfs`).
pub fn parse_share(text: &str) -> Result<ShareSpec, ValueError> {
    let mut parts = text.split(',');
    let path = parts.next().filter(|p| !p.is_empty());
    let mut spec = ShareSpec {
        path: PathBuf::from(path.ok_or(ValueError::NoSharePath)?),
        tag: pvm_virtio::fs::DEFAULT_TAG.to_string(),
    };
    for option in parts {
        match option.split_once('=') {
            Some(("tag", tag)) => {
                if tag.is_empty() || tag.len() > pvm_virtio::fs::MAX_TAG_LEN || tag.contains('\0') {
                    return Err(ValueError::ShareTag(tag.to_string()));
                }
                spec.tag = tag.to_string();
            }
            _ => return Err(ValueError::ShareOption(option.to_string())),
        }
    }
    Ok(spec)
}

impl fmt::Display for ConsoleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConsoleKind::Serial => "serial",
            ConsoleKind::Virtio => "virtio",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_sizes() {
        assert_eq!(parse_mem_size("256M"), Ok(256 << 20));
        assert_eq!(parse_mem_size("2G"), Ok(2 << 30));
        assert_eq!(parse_mem_size("2g"), Ok(2 << 30));
        assert_eq!(parse_mem_size("512"), Ok(512 << 20));
        assert_eq!(parse_mem_size("65536K"), Ok(64 << 20));
        assert!(
            parse_mem_size("")
                .unwrap_err()
                .to_string()
                .contains("not a size")
        );
        assert!(
            parse_mem_size("M")
                .unwrap_err()
                .to_string()
                .contains("not a size")
        );
        assert!(
            parse_mem_size("12X")
                .unwrap_err()
                .to_string()
                .contains("unknown unit")
        );
        assert!(
            parse_mem_size("1M")
                .unwrap_err()
                .to_string()
                .contains("minimum")
        );
        assert!(
            parse_mem_size("2T")
                .unwrap_err()
                .to_string()
                .contains("maximum")
        );
        assert!(
            parse_mem_size("99999999999999999999G")
                .unwrap_err()
                .to_string()
                .contains("too large")
        );
        assert!(
            parse_mem_size("40000001K")
                .unwrap_err()
                .to_string()
                .contains("4 KiB")
        );
    }

    #[test]
    fn disks() {
        let d = parse_disk("/a/b.img,ro,serial=disk0").unwrap();
        assert_eq!(d.path, PathBuf::from("/a/b.img"));
        assert!(d.read_only);
        assert_eq!(d.serial.as_deref(), Some("disk0"));
        assert!(!parse_disk("x.img").unwrap().read_only);
        assert!(parse_disk(",ro").is_err());
        assert!(
            parse_disk("x.img,rw")
                .unwrap_err()
                .to_string()
                .contains("unknown disk option 'rw'")
        );
        assert!(parse_disk("x.img,serial=123456789012345678901").is_err());
    }

    #[test]
    fn disk_engines_direct_and_queues() {
        let d = parse_disk("a.img,engine=io_uring,direct=on,queues=4,queue_size=512").unwrap();
        assert_eq!(
            d.options,
            BlockOptions {
                engine: IoEngine::IoUring,
                direct: true,
                queues: 4,
                queue_size: 512,
            }
        );
        assert_eq!(
            parse_disk("a.img").unwrap().options,
            BlockOptions::default()
        );
        let d = parse_disk("a.img,engine=sync,direct=off").unwrap();
        assert_eq!(d.options, BlockOptions::default());
        for (bad, says) in [
            ("a.img,engine=aio", "sync or io_uring"),
            ("a.img,engine=", "sync or io_uring"),
            ("a.img,direct=yes", "on or off"),
            ("a.img,queues=0", "queues=0"),
            ("a.img,queues=17", "queues=17"),
            ("a.img,queues=-1", "whole number"),
            ("a.img,queues=99999999", "whole number"),
            ("a.img,queue_size=100", "power of two"),
            ("a.img,queue_size=2", "power of two"),
            ("a.img,queue_size=2048", "power of two"),
            ("a.img,queue_size=", "whole number"),
            ("a.img,direct", "unknown disk option 'direct'"),
        ] {
            let e = parse_disk(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn vhost_user_disks_and_nets() {
        assert_eq!(
            parse_disk_arg("vhost-user=/run/blk.sock").unwrap(),
            DiskArg::VhostUser(PathBuf::from("/run/blk.sock"))
        );
        assert!(matches!(
            parse_disk_arg("a.img,ro").unwrap(),
            DiskArg::File(DiskSpec {
                read_only: true,
                ..
            })
        ));
        assert!(
            parse_disk_arg("vhost-user=")
                .unwrap_err()
                .to_string()
                .contains("socket path")
        );
        assert!(
            parse_disk_arg("vhost-user=s,ro")
                .unwrap_err()
                .to_string()
                .contains("no options")
        );
        assert_eq!(
            parse_net("vhost-user=n.sock").unwrap(),
            PathBuf::from("n.sock")
        );
        assert!(
            parse_net("tap0")
                .unwrap_err()
                .to_string()
                .contains("--tap NAME")
        );
        assert!(parse_net("vhost-user=").is_err());
    }

    #[test]
    fn taps_and_macs() {
        assert_eq!(parse_tap("tap0").unwrap().vhost, VhostMode::Auto);
        assert_eq!(parse_tap("tap0,vhost=on").unwrap().vhost, VhostMode::On);
        let t = parse_tap("tap0,vhost=off,mac=52:54:00:00:00:01").unwrap();
        assert_eq!((t.vhost, t.mac.is_some()), (VhostMode::Off, true));
        assert!(
            parse_tap("tap0,vhost=maybe")
                .unwrap_err()
                .to_string()
                .contains("vhost=maybe")
        );
        let t = parse_tap("tap0,mac=52:54:00:ab:cd:ef").unwrap();
        assert_eq!(t.name, "tap0");
        assert_eq!(t.mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        assert!(parse_tap("").is_err());
        assert!(parse_tap("a-very-long-tap-name").is_err());
        assert!(
            parse_tap("tap0,mac=01:00:00:00:00:00")
                .unwrap_err()
                .to_string()
                .contains("multicast")
        );
        assert!(
            parse_tap("tap0,mac=zz:00:00:00:00:00")
                .unwrap_err()
                .to_string()
                .contains("non-hex")
        );
        assert!(parse_tap("tap0,mac=52:54").is_err());
        assert!(
            parse_tap("tap0,rings=2")
                .unwrap_err()
                .to_string()
                .contains("unknown tap option")
        );
    }

    #[test]
    fn tap_queue_pairs() {
        assert_eq!(parse_tap("tap0").unwrap().queues, 1);
        assert_eq!(parse_tap("tap0,queues=2").unwrap().queues, 2);
        let t = parse_tap("tap0,queues=16,vhost=off").unwrap();
        assert_eq!((t.queues, t.vhost), (16, VhostMode::Off));
        for bad in ["0", "17", "-1", "", "two", "65537"] {
            let err = parse_tap(&format!("tap0,queues={bad}")).unwrap_err();
            assert_eq!(err, ValueError::Queues(bad.to_string()));
            assert_eq!(
                err.to_string(),
                format!("queues={bad}: use 1 to 16 queue pairs")
            );
        }
    }

    #[test]
    fn rate_limits_on_disks_and_taps() {
        let second = |rate| Some(BucketConfig::per_second(rate));
        let d = parse_disk("a.img,bw=10M,iops=500").unwrap();
        assert_eq!(
            (d.limit.bandwidth, d.limit.ops),
            (second(10 << 20), second(500))
        );
        assert!(!parse_disk("a.img").unwrap().limit.is_enabled());
        assert_eq!(
            parse_disk("a.img,bw=4K/s").unwrap().limit.bandwidth,
            second(4096)
        );
        let t = parse_tap("tap0,rx_bw=1G,tx_pps=1000,rx_pps=10,tx_bw=123").unwrap();
        assert_eq!(
            (t.rx_limit.bandwidth, t.rx_limit.ops),
            (second(1 << 30), second(10))
        );
        assert_eq!(
            (t.tx_limit.bandwidth, t.tx_limit.ops),
            (second(123), second(1000))
        );
        assert!(t.is_limited() && !parse_tap("tap0").unwrap().is_limited());
        for bad in ["0", "", "x", "10X", "-1", "99999999999G"] {
            let err = parse_disk(&format!("a.img,bw={bad}")).unwrap_err();
            assert_eq!(
                err,
                ValueError::Rate {
                    option: "bw".to_string(),
                    value: bad.to_string()
                }
            );
        }
        assert!(
            parse_tap("tap0,rx_pps=0")
                .unwrap_err()
                .to_string()
                .starts_with("rx_pps=0:")
        );
        assert_eq!(
            parse_tap("tap0,vhost=on,tx_bw=1M").unwrap_err(),
            ValueError::LimitWithVhost
        );
        assert!(parse_tap("tap0,vhost=off,tx_bw=1M").is_ok());
    }

    #[test]
    fn vsock_specs() {
        assert_eq!(
            parse_vsock("cid=3,socket=/tmp/v.sock").unwrap(),
            VsockSpec {
                cid: 3,
                backend: VsockBackend::Unix(PathBuf::from("/tmp/v.sock"))
            }
        );
        assert_eq!(
            parse_vsock("vhost=on,cid=4294967294").unwrap().backend,
            VsockBackend::Vhost
        );
        for bad in [
            "cid=2,socket=/v",
            "cid=4294967295,socket=/v",
            "cid=x,socket=/v",
        ] {
            assert!(
                matches!(parse_vsock(bad), Err(ValueError::VsockCid(_))),
                "{bad}"
            );
        }
        for bad in [
            "cid=3",
            "socket=/v",
            "cid=3,socket=/v,vhost=on",
            "cid=3,socket=",
        ] {
            assert!(parse_vsock(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            parse_vsock("cid=3,vhost=off"),
            Err(ValueError::VsockVhost(_))
        ));
        assert!(matches!(
            parse_vsock("cid=3,port=1"),
            Err(ValueError::VsockOption(_))
        ));
    }

    #[test]
    fn share_specs() {
        let spec = parse_share("/srv/data").unwrap();
        assert_eq!(
            (spec.path, spec.tag.as_str()),
            (PathBuf::from("/srv/data"), "hostfs")
        );
        assert_eq!(parse_share("/srv,tag=data").unwrap().tag, "data");
        assert_eq!(parse_share("/srv,tag=a,tag=b").unwrap().tag, "b");
        assert_eq!(parse_share(""), Err(ValueError::NoSharePath));
        assert_eq!(parse_share(",tag=x"), Err(ValueError::NoSharePath));
        let long = format!("/srv,tag={}", "t".repeat(37));
        for bad in ["/srv,tag=", "/srv,tag=a\0b", long.as_str()] {
            assert!(
                matches!(parse_share(bad), Err(ValueError::ShareTag(_))),
                "{bad:?}"
            );
        }
        for bad in ["/srv,ro", "/srv,tag", "/srv,rw=on", "/srv,"] {
            assert!(
                matches!(parse_share(bad), Err(ValueError::ShareOption(_))),
                "{bad:?}"
            );
        }
    }
}

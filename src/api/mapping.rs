//! From Firecracker's bodies to pvm's [`VmConfig`]: each body's checks, and the mapping of the
//! whole configuration, refusing by name every field pvm cannot honour.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::{
    Balloon, BootSource, CacheType, CpuTemplate, DEFAULT_BOOT_ARGS, Drive, FcConfig, HugePages,
    IoEngine, MAX_VCPUS, MachineConfig, NetworkInterface, RateLimiter, TokenBucket, Vsock,
};
use pvm_virtio::block::BlockOptions;

use crate::config::{
    self, DiskSpec, GuestPages, MAX_MEM_BYTES, MIN_MEM_BYTES, TapSpec, Transport, VhostMode,
    VmConfig, VsockBackend, VsockSpec,
};
use pvm_virtio::{BucketConfig, RateLimit};

impl TokenBucket {
    /// The bucket as pvm's devices take it; `None` when it limits nothing.
    fn to_bucket(&self) -> Option<BucketConfig> {
        self.limits().then(|| BucketConfig {
            size: self.size,
            one_time_burst: self.one_time_burst.unwrap_or(0),
            refill_time: std::time::Duration::from_millis(self.refill_time),
        })
    }
}

/// A device's rate limit as configured: none when `limiter` is absent or limits nothing.
pub(crate) fn rate_limit(limiter: Option<&RateLimiter>) -> RateLimit {
    let bucket = |b: Option<&TokenBucket>| b.and_then(TokenBucket::to_bucket);
    RateLimit {
        bandwidth: bucket(limiter.and_then(|l| l.bandwidth.as_ref())),
        ops: bucket(limiter.and_then(|l| l.ops.as_ref())),
    }
}

/// Config-file sections pvm does not offer; other unknown keys are ignored, as Firecracker does.
const REFUSED_SECTIONS: &[(&str, &str)] = &[
    ("cpu-config", "pvm has no CPU templates"),
    ("mmds-config", "pvm has no MMDS"),
    ("pmem", "pvm has no virtio-pmem device"),
    ("memory-hotplug", "pvm has no memory hotplug"),
];

/// Why a body or the whole configuration cannot become a VM. The texts start with
/// Firecracker's category names, which clients match on.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Boot source error: cannot open the kernel file {path}: {source}")]
    Kernel {
        path: String,
        source: std::io::Error,
    },
    #[error("Boot source error: cannot open the initrd file {path}: {source}")]
    Initrd {
        path: String,
        source: std::io::Error,
    },
    #[error("Boot source error: boot_args must be a single line of text")]
    BootArgs,
    #[error("Drive config error: cannot open the backing file {path}: {source}")]
    DriveFile {
        path: String,
        source: std::io::Error,
    },
    #[error("Drive config error: drive {0} needs either path_on_host or socket (not both)")]
    DriveBackend(String),
    #[error("Drive config error: a root block device already exists")]
    SecondRoot,
    #[error("Network interface error: guest_mac {mac}: {source}")]
    Mac {
        mac: String,
        source: config::ValueError,
    },
    #[error("Network interface error: MAC address {0} is already used by another interface")]
    MacInUse(String),
    #[error("Network interface error: host_dev_name: {0}")]
    TapName(config::ValueError),
    #[error("Machine config error: vcpu_count must be 1 to {MAX_VCPUS}, and 1 or even with smt")]
    VcpuCount,
    #[error(
        "Machine config error: mem_size_mib {0} is outside pvm's range of {min} MiB to {max} MiB",
        min = MIN_MEM_BYTES >> 20,
        max = MAX_MEM_BYTES >> 20
    )]
    MemSize(u64),
    #[error("Balloon device error: {0}")]
    BalloonFit(#[from] crate::balloon::BalloonFitError),
    #[error(
        "Machine config error: mem_size_mib {0} is not a whole number of 2 MiB huge pages, as \
         huge_pages 2M needs"
    )]
    HugePageMemSize(u64),
    #[error("Vsock config error: guest_cid {0} is outside 3..=4294967294 (0 to 2 are reserved)")]
    VsockCid(u32),
    #[error("Vsock config error: uds_path must name a socket to create")]
    VsockNoPath,
    #[error("Vsock config error: uds_path {0} exists already")]
    VsockPathExists(String),
    /// A field pvm does not (yet) implement with the value given.
    #[error("{category} error: {field}: {why}")]
    Refused {
        category: &'static str,
        field: String,
        why: &'static str,
    },
}

fn refused(category: &'static str, field: impl Into<String>, why: &'static str) -> ConfigError {
    ConfigError::Refused {
        category,
        field: field.into(),
        why,
    }
}

/// Checks that `path` opens for reading (and writing with `write`).
fn check_open(path: &str, write: bool) -> std::io::Result<()> {
    File::options().read(true).write(write).open(path).map(drop)
}

impl Vsock {
    /// The device this body asks for: a CID a guest may have, a socket path free to bind.
    fn to_spec(&self) -> Result<VsockSpec, ConfigError> {
        let cid = u64::from(self.guest_cid);
        let allowed = pvm_virtio::vsock::MIN_GUEST_CID..=pvm_virtio::vsock::MAX_GUEST_CID;
        if !allowed.contains(&cid) {
            return Err(ConfigError::VsockCid(self.guest_cid));
        }
        if self.uds_path.is_empty() {
            return Err(ConfigError::VsockNoPath);
        }
        if Path::new(&self.uds_path).symlink_metadata().is_ok() {
            return Err(ConfigError::VsockPathExists(self.uds_path.clone()));
        }
        Ok(VsockSpec {
            cid,
            backend: VsockBackend::Unix(PathBuf::from(&self.uds_path)),
        })
    }

    /// What `--vsock cid=N,socket=PATH` set, in the API's shape (vhost=on has none).
    fn from_vm_config(base: &VmConfig) -> Option<Vsock> {
        let spec = base.vsock.as_ref()?;
        match &spec.backend {
            VsockBackend::Unix(path) => Some(Vsock {
                vsock_id: None,
                guest_cid: u32::try_from(spec.cid).ok()?,
                uds_path: path.display().to_string(),
            }),
            VsockBackend::Vhost => None,
        }
    }
}

impl BootSource {
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_open(&self.kernel_image_path, false).map_err(|source| ConfigError::Kernel {
            path: self.kernel_image_path.clone(),
            source,
        })?;
        if let Some(initrd) = &self.initrd_path {
            check_open(initrd, false).map_err(|source| ConfigError::Initrd {
                path: initrd.clone(),
                source,
            })?;
        }
        match &self.boot_args {
            Some(args) if args.contains(['\0', '\n']) => Err(ConfigError::BootArgs),
            _ => Ok(()),
        }
    }
}

impl MachineConfig {
    /// Firecracker's defaults, with pvm's own flags (`--cpus`, `--mem`) as the starting point.
    pub fn from_vm_config(config: &VmConfig) -> Self {
        MachineConfig {
            vcpu_count: config.cpus,
            mem_size_mib: config.mem_bytes >> 20,
            smt: config.smt,
            track_dirty_pages: config.track_dirty_pages,
            huge_pages: match config.huge_pages {
                GuestPages::Normal => HugePages::None,
                GuestPages::Huge2M => HugePages::Huge2M,
            },
            cpu_template: None,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        const CATEGORY: &str = "Machine config";
        if self.vcpu_count == 0
            || self.vcpu_count > MAX_VCPUS
            || (self.smt && self.vcpu_count > 1 && self.vcpu_count % 2 != 0)
        {
            return Err(ConfigError::VcpuCount);
        }
        let bytes = self.mem_size_mib.checked_mul(1 << 20);
        if !bytes.is_some_and(|b| (MIN_MEM_BYTES..=MAX_MEM_BYTES).contains(&b)) {
            return Err(ConfigError::MemSize(self.mem_size_mib));
        }
        match self.huge_pages {
            HugePages::None => {}
            HugePages::Huge2M if self.mem_size_mib % (config::HUGE_PAGE_BYTES >> 20) != 0 => {
                return Err(ConfigError::HugePageMemSize(self.mem_size_mib));
            }
            HugePages::Huge2M => {}
            HugePages::Transparent => {
                return Err(refused(
                    CATEGORY,
                    "huge_pages Transparent",
                    "pvm always advises transparent huge pages for ordinary guest memory; use \
                     None, or 2M for hugetlbfs pages",
                ));
            }
        }
        if self.cpu_template.is_some_and(|t| t != CpuTemplate::None) {
            return Err(refused(
                CATEGORY,
                "cpu_template",
                "pvm has no CPU templates; use None",
            ));
        }
        Ok(())
    }
}

impl Drive {
    /// How pvm serves the drive: `io_engine: Async` is pvm's io_uring engine.
    pub fn block_options(&self) -> BlockOptions {
        BlockOptions {
            engine: match self.io_engine.unwrap_or_default() {
                IoEngine::Sync => pvm_virtio::block::IoEngine::Sync,
                IoEngine::Async => pvm_virtio::block::IoEngine::IoUring,
            },
            ..BlockOptions::default()
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        const CATEGORY: &str = "Drive config";
        let limited = self.rate_limiter.as_ref().is_some_and(RateLimiter::limits);
        if limited && self.socket.is_some() {
            return Err(refused(
                CATEGORY,
                "rate_limiter",
                "a vhost-user backend moves the data itself and pvm cannot limit it",
            ));
        }
        match (&self.path_on_host, &self.socket) {
            (Some(path), None) => {
                let write = !self.is_read_only.unwrap_or(false);
                check_open(path, write).map_err(|source| ConfigError::DriveFile {
                    path: path.clone(),
                    source,
                })
            }
            // The backend decides everything about the disk.
            (None, Some(_)) if self.is_read_only.is_none() && self.io_engine.is_none() => Ok(()),
            _ => Err(ConfigError::DriveBackend(self.drive_id.clone())),
        }
    }
}

impl NetworkInterface {
    pub fn validate(&self) -> Result<Option<[u8; 6]>, ConfigError> {
        const CATEGORY: &str = "Network interface";
        if self.mtu.is_some() {
            return Err(refused(
                CATEGORY,
                "mtu",
                "pvm does not set a device MTU; set it on the tap and in the guest",
            ));
        }
        config::parse_tap(&self.host_dev_name).map_err(ConfigError::TapName)?;
        self.guest_mac
            .as_deref()
            .map(|mac| {
                config::parse_mac(mac).map_err(|source| ConfigError::Mac {
                    mac: mac.to_string(),
                    source,
                })
            })
            .transpose()
    }
}

/// Where a drive went among the VM's disks.
#[derive(Clone, Copy)]
enum DiskSlot {
    File(usize),
    VhostUser(usize),
}

/// The guest's name for the `index`th virtio disk: vda..vdz, vdaa...
pub(crate) fn disk_name(index: usize) -> String {
    let letter = |i: usize| char::from(b'a' + (i % 26) as u8);
    if index < 26 {
        format!("vd{}", letter(index))
    } else {
        format!("vd{}{}", letter(index / 26 - 1), letter(index))
    }
}

/// Removes every `pci=off` from `cmdline`: with devices on virtio-pci it would hide them all.
pub fn strip_pci_off(cmdline: &str) -> Option<String> {
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    let kept: Vec<&str> = words.iter().copied().filter(|w| *w != "pci=off").collect();
    (kept.len() != words.len()).then(|| kept.join(" "))
}

impl FcConfig {
    /// The machine as configured, or as pvm's flags made it.
    pub fn machine(&self, base: &VmConfig) -> MachineConfig {
        self.machine_config
            .clone()
            .unwrap_or_else(|| MachineConfig::from_vm_config(base))
    }

    /// Refuses the config file's sections pvm has no counterpart for.
    pub fn check_sections(&self) -> Result<(), ConfigError> {
        for (key, value) in &self.other {
            if let Some((_, why)) = REFUSED_SECTIONS.iter().find(|(name, _)| name == key) {
                if !value.is_null() {
                    return Err(refused("Config file", key.clone(), why));
                }
            }
        }
        Ok(())
    }

    /// The VM this configuration describes, on top of what pvm's own flags set in `base`.
    pub fn to_vm_config(&self, base: &VmConfig) -> Result<VmConfig, ConfigError> {
        self.check_sections()?;
        let mut vm = base.clone();
        let machine = self.machine(base);
        machine.validate()?;
        vm.cpus = machine.vcpu_count;
        vm.mem_bytes = machine.mem_size_mib << 20;
        if let Some(balloon) = &self.balloon {
            vm.balloon = Some(balloon.to_config()?);
        }
        if let Some(balloon) = &vm.balloon {
            crate::balloon::check_fits(balloon, vm.mem_bytes)?;
        }
        vm.smt = machine.smt;
        vm.track_dirty_pages = machine.track_dirty_pages;
        vm.huge_pages = match machine.huge_pages {
            HugePages::Huge2M => GuestPages::Huge2M,
            // validate() refused the others.
            HugePages::None | HugePages::Transparent => GuestPages::Normal,
        };
        if let Some(entropy) = &self.entropy {
            vm.rng_limit = rate_limit(entropy.rate_limiter.as_ref());
        }
        if let Some(vsock) = &self.vsock {
            vm.vsock = Some(vsock.to_spec()?);
        }
        if let Some(serial) = &self.serial {
            if serial
                .rate_limiter
                .as_ref()
                .is_some_and(TokenBucket::limits)
            {
                return Err(refused(
                    "Serial config",
                    "rate_limiter",
                    "pvm does not rate-limit the serial console; leave it out",
                ));
            }
            if let Some(path) = &serial.serial_out_path {
                vm.serial_out = Some(PathBuf::from(path));
            }
        }
        let mut root = None;
        for drive in &self.drives {
            drive.validate()?;
            let read_only = drive.is_read_only.unwrap_or(false);
            let slot = match (&drive.path_on_host, &drive.socket) {
                (Some(path), _) => {
                    vm.disks.push(DiskSpec {
                        path: PathBuf::from(path),
                        read_only,
                        // The guest reads the drive's id as the disk's serial, as in Firecracker.
                        serial: (drive.drive_id.len() <= 20).then(|| drive.drive_id.clone()),
                        flush: drive.cache_type == CacheType::Writeback,
                        limit: rate_limit(drive.rate_limiter.as_ref()),
                        options: drive.block_options(),
                    });
                    DiskSlot::File(vm.disks.len() - 1)
                }
                (None, Some(socket)) => {
                    vm.vhost_user_disks.push(PathBuf::from(socket));
                    DiskSlot::VhostUser(vm.vhost_user_disks.len() - 1)
                }
                (None, None) => return Err(ConfigError::DriveBackend(drive.drive_id.clone())),
            };
            if drive.is_root_device {
                if root.is_some() {
                    return Err(ConfigError::SecondRoot);
                }
                root = Some((drive, slot));
            }
        }
        let mut macs = Vec::new();
        for iface in &self.network_interfaces {
            let mac = iface.validate()?;
            if let Some(mac) = mac {
                if macs.contains(&mac) {
                    return Err(ConfigError::MacInUse(
                        iface.guest_mac.clone().unwrap_or_default(),
                    ));
                }
                macs.push(mac);
            }
            vm.taps.push(TapSpec {
                name: iface.host_dev_name.clone(),
                mac,
                // With a rate limit Auto means pvm's own worker: vhost-net cannot enforce it.
                vhost: VhostMode::Auto,
                queues: 1,
                rx_limit: rate_limit(iface.rx_rate_limiter.as_ref()),
                tx_limit: rate_limit(iface.tx_rate_limiter.as_ref()),
            });
        }
        let mut cmdline = match &self.boot_source {
            Some(boot) => {
                boot.validate()?;
                vm.kernel = Some(PathBuf::from(&boot.kernel_image_path));
                vm.initrd = boot.initrd_path.as_ref().map(PathBuf::from);
                boot.boot_args
                    .clone()
                    .unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_string())
            }
            None => base.cmdline.clone(),
        };
        if let Some((drive, slot)) = root {
            // vhost-user disks follow the file-backed ones in guest order.
            let position = match slot {
                DiskSlot::File(i) => i,
                DiskSlot::VhostUser(i) => vm.disks.len() + i,
            };
            let device = match &drive.partuuid {
                Some(uuid) => format!("PARTUUID={uuid}"),
                None => format!("/dev/{}", disk_name(position)),
            };
            let mode = if drive.is_read_only.unwrap_or(false) {
                "ro"
            } else {
                "rw"
            };
            cmdline = format!("{cmdline} root={device} {mode}");
        }
        if vm.transport == Transport::Pci {
            if let Some(stripped) = strip_pci_off(&cmdline) {
                log::info!("pci=off removed from the boot arguments: pvm's devices are on PCI");
                cmdline = stripped;
            }
        }
        vm.cmdline = cmdline;
        Ok(vm)
    }

    /// Replaces the drive with `drive`'s id, or adds it.
    pub fn put_drive(&mut self, drive: Drive) {
        match self
            .drives
            .iter_mut()
            .find(|d| d.drive_id == drive.drive_id)
        {
            Some(slot) => *slot = drive,
            None => self.drives.push(drive),
        }
    }

    /// Replaces the interface with `iface`'s id, or adds it.
    pub fn put_interface(&mut self, iface: NetworkInterface) {
        match self
            .network_interfaces
            .iter_mut()
            .find(|i| i.iface_id == iface.iface_id)
        {
            Some(slot) => *slot = iface,
            None => self.network_interfaces.push(iface),
        }
    }

    /// `GET /vm/config`: the whole configuration in Firecracker's schema, null where unset.
    pub fn to_json(&self, base: &VmConfig) -> serde_json::Value {
        serde_json::json!({
            "balloon": self.balloon.clone().or_else(|| base.balloon.as_ref().map(Balloon::from_config)),
            "drives": self.drives,
            "boot-source": self.boot_source.clone().or_else(|| base.kernel.as_ref().map(|k| BootSource {
                kernel_image_path: k.display().to_string(),
                initrd_path: base.initrd.as_ref().map(|i| i.display().to_string()),
                boot_args: Some(base.cmdline.clone()),
            })),
            "cpu-config": null,
            "logger": null,
            "machine-config": self.machine(base),
            "metrics": null,
            "mmds-config": null,
            "network-interfaces": self.network_interfaces,
            "vsock": self.vsock.clone().or_else(|| Vsock::from_vm_config(base)),
            "entropy": self.entropy,
            "pmem": [],
            "memory-hotplug": null,
        })
    }
}

/// Reads a Firecracker config file.
pub fn read_config_file(path: &Path) -> Result<FcConfig, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ConfigFileError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("--config-file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--config-file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("--config-file: {0}")]
    Config(#[from] ConfigError),
    /// The logger or metrics section was refused, as the API would refuse its PUT.
    #[error("--config-file: {section}: {fault}")]
    Section {
        section: &'static str,
        fault: String,
    },
}

//! Firecracker's JSON bodies (the API's and the config file's), as serde types. Each is only a
//! wire format: `mapping` maps what a client configured onto pvm's one VM
//! description, [`crate::config::VmConfig`], refusing by name every field pvm cannot honour. Nothing is
//! accepted and ignored.

use serde::{Deserialize, Serialize};

#[path = "mapping.rs"]
mod mapping;

#[path = "balloon_models.rs"]
mod balloon_models;
pub use self::balloon_models::{
    Balloon, BalloonStartCmd, BalloonStatsUpdate, BalloonStopCmd, BalloonUpdate,
};

pub(crate) use self::mapping::rate_limit;
pub use self::mapping::{ConfigError, ConfigFileError, read_config_file, strip_pci_off};

/// The command line Firecracker gives a guest whose boot source has no `boot_args`.
pub const DEFAULT_BOOT_ARGS: &str = "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce";
/// Firecracker's vCPU bound (pvm's own flag allows more).
pub const MAX_VCPUS: u8 = 32;

/// `PUT /boot-source`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(default)]
    pub initrd_path: Option<String>,
    #[serde(default)]
    pub boot_args: Option<String>,
}

/// Firecracker's token bucket: `size` units per `refill_time` ms. Unknown fields pass, as there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucket {
    pub size: u64,
    #[serde(default)]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

impl TokenBucket {
    /// A bucket of size 0 or refill time 0 limits nothing.
    pub(crate) fn limits(&self) -> bool {
        self.size != 0 && self.refill_time != 0
    }
}

/// A rate limiter on bytes (`bandwidth`) and requests (`ops`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    #[serde(default)]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default)]
    pub ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// Whether any bucket would limit: one that limits nothing is honoured as it is.
    pub(crate) fn limits(&self) -> bool {
        self.bandwidth
            .iter()
            .chain(&self.ops)
            .any(TokenBucket::limits)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    #[default]
    Unsafe,
    Writeback,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    #[default]
    Sync,
    Async,
}

/// `PUT /drives/{drive_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    pub is_root_device: bool,
    #[serde(default)]
    pub partuuid: Option<String>,
    #[serde(default)]
    pub cache_type: CacheType,
    #[serde(default)]
    pub is_read_only: Option<bool>,
    #[serde(default)]
    pub path_on_host: Option<String>,
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
    #[serde(default)]
    pub io_engine: Option<IoEngine>,
    /// A vhost-user backend's socket instead of a file.
    #[serde(default)]
    pub socket: Option<String>,
}

/// `PATCH /drives/{drive_id}`: a new rate limiter (a bucket left out stays as it is); a new
/// backing file is refused.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    pub drive_id: String,
    #[serde(default)]
    pub path_on_host: Option<String>,
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PATCH /network-interfaces/{iface_id}`: new rate limiters (a bucket left out stays).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    pub iface_id: String,
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

impl RateLimiter {
    /// `self` with the buckets `patch` gives replaced (PATCH semantics).
    pub(crate) fn patched(&self, patch: &RateLimiter) -> RateLimiter {
        RateLimiter {
            bandwidth: patch.bandwidth.clone().or_else(|| self.bandwidth.clone()),
            ops: patch.ops.clone().or_else(|| self.ops.clone()),
        }
    }
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default)]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    #[default]
    None,
    Transparent,
    #[serde(rename = "2M")]
    Huge2M,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuTemplate {
    C3,
    T2,
    T2S,
    T2CL,
    T2A,
    V1N1,
    None,
}

/// `PUT /machine-config` (and what `GET /machine-config` answers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub huge_pages: HugePages,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
}

/// `PATCH /machine-config`: the fields to change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    pub vcpu_count: Option<u8>,
    pub mem_size_mib: Option<u64>,
    pub smt: Option<bool>,
    pub track_dirty_pages: Option<bool>,
    pub huge_pages: Option<HugePages>,
    pub cpu_template: Option<CpuTemplate>,
}

impl MachineConfigUpdate {
    pub fn is_empty(&self) -> bool {
        *self == MachineConfigUpdate::default()
    }

    pub fn apply(&self, to: &MachineConfig) -> MachineConfig {
        MachineConfig {
            vcpu_count: self.vcpu_count.unwrap_or(to.vcpu_count),
            mem_size_mib: self.mem_size_mib.unwrap_or(to.mem_size_mib),
            smt: self.smt.unwrap_or(to.smt),
            track_dirty_pages: self.track_dirty_pages.unwrap_or(to.track_dirty_pages),
            huge_pages: self.huge_pages.unwrap_or(to.huge_pages),
            cpu_template: self.cpu_template.or(to.cpu_template),
        }
    }
}

/// `PUT /entropy`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entropy {
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /vsock`: the guest's vsock device, Firecracker's hybrid Unix-socket kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// Deprecated in Firecracker and unused there too; kept to echo it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    pub guest_cid: u32,
    pub uds_path: String,
}

/// `PUT /logger`: every field optional; what is left out stays as it was, except `level`,
/// which goes back to Info (as in Firecracker).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    #[serde(default)]
    pub log_path: Option<String>,
    /// Firecracker's names in any case: Off, Error, Warning (or Warn), Info, Debug, Trace.
    #[serde(default, deserialize_with = "log_level")]
    pub level: Option<log::LevelFilter>,
    #[serde(default)]
    pub show_level: Option<bool>,
    #[serde(default)]
    pub show_log_origin: Option<bool>,
    /// A module path prefix to keep only that module's lines (pvm refuses it).
    #[serde(default)]
    pub module: Option<String>,
}

fn log_level<'de, D: serde::Deserializer<'de>>(
    from: D,
) -> Result<Option<log::LevelFilter>, D::Error> {
    Option::<String>::deserialize(from)?
        .map(|text| crate::logger::parse_level(&text).map_err(serde::de::Error::custom))
        .transpose()
}

/// `PUT /metrics`. Unknown fields pass, as in Firecracker.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Metrics {
    pub metrics_path: String,
    #[serde(default)]
    pub emit_id: bool,
    #[serde(default)]
    pub properties: Option<std::collections::BTreeMap<String, String>>,
}

/// `PUT /serial`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Serial {
    /// The file or FIFO for the guest's serial output (default: stdout).
    #[serde(default)]
    pub serial_out_path: Option<String>,
    #[serde(default)]
    pub rate_limiter: Option<TokenBucket>,
}

/// What a client configured, in Firecracker's shape: the config file's top level (whose
/// unknown keys pass, as in Firecracker) and the state the API's PUTs build up.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct FcConfig {
    #[serde(rename = "boot-source", default)]
    pub boot_source: Option<BootSource>,
    #[serde(default)]
    pub drives: Vec<Drive>,
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfig>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    #[serde(default)]
    pub entropy: Option<Entropy>,
    #[serde(default)]
    pub balloon: Option<Balloon>,
    pub vsock: Option<Vsock>,
    /// Applied before the VM is built, as `PUT /logger` would be.
    #[serde(default)]
    pub logger: Option<Logger>,
    /// Applied before the VM is built, as `PUT /metrics` would be.
    #[serde(default)]
    pub metrics: Option<Metrics>,
    /// Only through the API: Firecracker's config file has no serial section.
    #[serde(skip)]
    pub serial: Option<Serial>,
    /// Sections pvm has no counterpart for (yet): any non-null value is refused by name.
    #[serde(flatten)]
    pub other: std::collections::BTreeMap<String, serde_json::Value>,
}

#[cfg(test)]
#[path = "models_tests.rs"]
pub(crate) mod tests;

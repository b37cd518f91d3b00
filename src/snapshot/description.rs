//! The VM's shape as a snapshot records it: what [`crate::virtio_devices::attach`] needs to
//! build the same devices in the same order again (disk and tap names, transports, vCPUs,
//! memory size, vhost-net and rate limits). Files and taps are reopened by name on restore;
//! the `--cloud-init` seed, which has no file, is saved whole ([`SeedImage`]).

use std::path::PathBuf;
use std::time::Duration;

use pvm_virtio::{BucketConfig, RateLimit};
use serde::{Deserialize, Serialize};

use super::seed::SeedImage;
use super::{RestoreError, SnapshotError};
use crate::config::{
    self, ConsoleKind, DiskSpec, MAX_TAP_QUEUES, TapSpec, Transport, VhostMode, VmConfig,
    VsockBackend, VsockSpec,
};

/// The longest disk serial the guest can read (VIRTIO_BLK_ID_BYTES).
const MAX_SERIAL_BYTES: usize = 20;
/// More devices than any transport has room for: a larger count is hostile.
const MAX_DEVICES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Description {
    pub mem_bytes: u64,
    pub cpus: u8,
    pub pci: bool,
    pub virtio_console: bool,
    /// The user's part of the kernel command line the guest booted with (informational).
    pub cmdline: String,
    pub disks: Vec<DiskDescription>,
    pub taps: Vec<TapDescription>,
    pub rng_limit: LimitDescription,
    /// Format version 3: the balloon and the (hybrid) vsock device, rebuilt as they were.
    pub balloon: Option<BalloonDescription>,
    pub vsock: Option<VsockDescription>,
    /// Format version 5: the `--cloud-init` seed's image, the disk after the user's disks.
    pub cloud_init: Option<SeedImage>,
}

/// `--balloon` / `PUT /balloon` as configured; the target and interval the API changed since
/// are the device's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonDescription {
    pub amount_mib: u32,
    pub deflate_on_oom: bool,
    pub stats_interval_s: u32,
    pub free_page_reporting: bool,
    pub free_page_hinting: bool,
}

/// The vsock and its guest CID, which the restored VM claims again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockDescription {
    pub cid: u64,
    pub backend: VsockBackendDescription,
}

/// Who serves the vsock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VsockBackendDescription {
    /// pvm (Firecracker's hybrid vsock): the restored VM binds a new listener at this path,
    /// which must not exist then (as in Firecracker).
    Unix(PathBuf),
    /// The kernel's vhost-vsock (format version 5): the restored VM opens a new instance for
    /// the same CID, refused while another VM (the original, a clone) holds it.
    Vhost,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDescription {
    /// The API's `drive_id` of the drive, when the API configured it (format version 2).
    pub drive_id: Option<String>,
    pub path: PathBuf,
    pub read_only: bool,
    pub serial: Option<String>,
    pub flush: bool,
    pub limit: LimitDescription,
    /// `engine=io_uring`: the restored disk is served the same way.
    pub io_uring: bool,
    pub direct: bool,
    /// The queue count and size are part of what the guest negotiated.
    pub queues: u16,
    pub queue_size: u16,
}

impl DiskDescription {
    fn options(&self) -> pvm_virtio::block::BlockOptions {
        pvm_virtio::block::BlockOptions {
            engine: if self.io_uring {
                pvm_virtio::block::IoEngine::IoUring
            } else {
                pvm_virtio::block::IoEngine::Sync
            },
            direct: self.direct,
            queues: self.queues,
            queue_size: self.queue_size,
        }
    }
}

/// The API's ids of a VM's devices, in attach order; `None` where the flags configured one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceIds {
    pub drives: Vec<Option<String>>,
    pub ifaces: Vec<Option<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VhostDescription {
    On,
    Off,
    Auto,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapDescription {
    /// The API's `iface_id` of the interface, when the API configured it.
    pub iface_id: Option<String>,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub vhost: VhostDescription,
    pub queues: u16,
    pub rx_limit: LimitDescription,
    pub tx_limit: LimitDescription,
}

/// A [`RateLimit`]'s two buckets; refill times in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitDescription {
    pub bandwidth: Option<(u64, u64, u64)>,
    pub ops: Option<(u64, u64, u64)>,
}

impl LimitDescription {
    fn of(limit: &RateLimit) -> Self {
        let bucket = |b: &BucketConfig| {
            (
                b.size,
                b.one_time_burst,
                u64::try_from(b.refill_time.as_millis()).unwrap_or(u64::MAX),
            )
        };
        LimitDescription {
            bandwidth: limit.bandwidth.as_ref().map(bucket),
            ops: limit.ops.as_ref().map(bucket),
        }
    }

    fn to_limit(self) -> RateLimit {
        let bucket = |(size, one_time_burst, ms): (u64, u64, u64)| BucketConfig {
            size,
            one_time_burst,
            refill_time: Duration::from_millis(ms),
        };
        RateLimit {
            bandwidth: self.bandwidth.map(bucket),
            ops: self.ops.map(bucket),
        }
    }
}

impl BalloonDescription {
    fn config(self) -> pvm_virtio::BalloonConfig {
        pvm_virtio::BalloonConfig {
            amount_mib: self.amount_mib,
            deflate_on_oom: self.deflate_on_oom,
            stats_interval_s: self.stats_interval_s,
            free_page_reporting: self.free_page_reporting,
            free_page_hinting: self.free_page_hinting,
        }
    }
}

impl Description {
    /// The description of the VM `config` built; a VM whose RAM another process maps
    /// (vhost-user) cannot be snapshotted.
    pub fn of(config: &VmConfig) -> Result<Self, SnapshotError> {
        if let Some(socket) = config
            .vhost_user_disks
            .iter()
            .chain(&config.vhost_user_nets)
            .next()
        {
            return Err(SnapshotError::VhostUser(socket.display().to_string()));
        }
        Ok(Description {
            mem_bytes: config.mem_bytes,
            cpus: config.cpus,
            pci: config.transport == Transport::Pci,
            virtio_console: config.console == ConsoleKind::Virtio,
            cmdline: config.cmdline.clone(),
            disks: config
                .disks
                .iter()
                .map(|d| DiskDescription {
                    drive_id: None,
                    path: d.path.clone(),
                    read_only: d.read_only,
                    serial: d.serial.clone(),
                    flush: d.flush,
                    limit: LimitDescription::of(&d.limit),
                    io_uring: d.options.engine == pvm_virtio::block::IoEngine::IoUring,
                    direct: d.options.direct,
                    queues: d.options.queues,
                    queue_size: d.options.queue_size,
                })
                .collect(),
            taps: config
                .taps
                .iter()
                .map(|t| TapDescription {
                    iface_id: None,
                    name: t.name.clone(),
                    mac: t.mac,
                    vhost: match t.vhost {
                        VhostMode::On => VhostDescription::On,
                        VhostMode::Off => VhostDescription::Off,
                        VhostMode::Auto => VhostDescription::Auto,
                    },
                    queues: t.queues,
                    rx_limit: LimitDescription::of(&t.rx_limit),
                    tx_limit: LimitDescription::of(&t.tx_limit),
                })
                .collect(),
            rng_limit: LimitDescription::of(&config.rng_limit),
            balloon: config.balloon.map(|b| BalloonDescription {
                amount_mib: b.amount_mib,
                deflate_on_oom: b.deflate_on_oom,
                stats_interval_s: b.stats_interval_s,
                free_page_reporting: b.free_page_reporting,
                free_page_hinting: b.free_page_hinting,
            }),
            vsock: config.vsock.as_ref().map(|v| VsockDescription {
                cid: v.cid,
                backend: match &v.backend {
                    VsockBackend::Unix(path) => VsockBackendDescription::Unix(path.clone()),
                    VsockBackend::Vhost => VsockBackendDescription::Vhost,
                },
            }),
            cloud_init: config
                .cloud_init
                .as_deref()
                .map(SeedImage::of)
                .transpose()?,
        })
    }

    /// Names the devices by the API's ids (`None`: the flags configured that one).
    pub fn name_devices(&mut self, ids: &DeviceIds) {
        for (disk, id) in self.disks.iter_mut().zip(&ids.drives) {
            disk.drive_id = id.clone();
        }
        for (tap, id) in self.taps.iter_mut().zip(&ids.ifaces) {
            tap.iface_id = id.clone();
        }
    }

    /// Refuses values no pvm would have written (the file is untrusted).
    pub fn validate(&self) -> Result<(), RestoreError> {
        let bad = |what: String| Err(RestoreError::invalid(what));
        if !(config::MIN_MEM_BYTES..=config::MAX_MEM_BYTES).contains(&self.mem_bytes)
            || self.mem_bytes % 4096 != 0
        {
            return bad(format!(
                "memory size {} bytes is out of range",
                self.mem_bytes
            ));
        }
        if self.cpus == 0 {
            return bad("0 vCPUs".to_string());
        }
        if self.disks.len() + self.taps.len() > MAX_DEVICES {
            return bad(format!(
                "{} disks and {} taps",
                self.disks.len(),
                self.taps.len()
            ));
        }
        for (i, disk) in self.disks.iter().enumerate() {
            if disk
                .serial
                .as_ref()
                .is_some_and(|s| s.len() > MAX_SERIAL_BYTES)
            {
                return bad(format!(
                    "disk {i}: serial longer than {MAX_SERIAL_BYTES} bytes"
                ));
            }
            if let Err(e) = disk.options().validate() {
                return bad(format!("disk {i}: {e}"));
            }
            if let Some(id) = &disk.drive_id {
                if self.disks[..i]
                    .iter()
                    .any(|d| d.drive_id.as_ref() == Some(id))
                {
                    return bad(format!("disk {i}: drive id {id} given twice"));
                }
            }
        }
        if let Some(balloon) = &self.balloon {
            if let Err(e) = crate::balloon::check_fits(&balloon.config(), self.mem_bytes) {
                return bad(format!("balloon: {e}"));
            }
        }
        if let Some(vsock) = &self.vsock {
            let cids = pvm_virtio::vsock::MIN_GUEST_CID..=pvm_virtio::vsock::MAX_GUEST_CID;
            if !cids.contains(&vsock.cid) {
                return bad(format!("vsock: guest CID {} is out of range", vsock.cid));
            }
            if let VsockBackendDescription::Unix(path) = &vsock.backend {
                if path.as_os_str().is_empty() {
                    return bad("vsock: an empty uds_path".to_string());
                }
            }
        }
        if let Some(seed) = &self.cloud_init {
            seed.validate()?;
        }
        for (i, tap) in self.taps.iter().enumerate() {
            if !(1..=MAX_TAP_QUEUES).contains(&tap.queues) || (tap.queues > 1 && !self.pci) {
                return bad(format!("tap {i}: {} queue pairs", tap.queues));
            }
            if let Some(id) = &tap.iface_id {
                if self.taps[..i]
                    .iter()
                    .any(|t| t.iface_id.as_ref() == Some(id))
                {
                    return bad(format!("tap {i}: interface id {id} given twice"));
                }
            }
        }
        Ok(())
    }

    /// The VM to build: this shape, with `base`'s process settings (sandbox, logging,
    /// metrics, serial output). `taps` (when not empty) replaces the tap names, in order;
    /// each (interface, tap) of `overrides` then puts one interface on another tap.
    pub fn to_config(
        &self,
        base: &VmConfig,
        taps: &[String],
        overrides: &[(String, String)],
    ) -> Result<VmConfig, RestoreError> {
        self.validate()?;
        if !taps.is_empty() && taps.len() != self.taps.len() {
            return Err(RestoreError::invalid(format!(
                "{} tap names given for a VM of {} taps",
                taps.len(),
                self.taps.len()
            )));
        }
        if base.cloud_init.is_some() {
            return Err(RestoreError::invalid(
                "pvm was started with --cloud-init, but a restored VM has only the devices \
                 its snapshot recorded (its seed included); start it without --cloud-init",
            ));
        }
        let mut config = base.clone();
        config.kernel = None;
        config.initrd = None;
        config.cmdline = self.cmdline.clone();
        config.mem_bytes = self.mem_bytes;
        config.cpus = self.cpus;
        config.transport = if self.pci {
            Transport::Pci
        } else {
            Transport::Mmio
        };
        config.console = if self.virtio_console {
            ConsoleKind::Virtio
        } else {
            ConsoleKind::Serial
        };
        config.disks = self
            .disks
            .iter()
            .map(|d| DiskSpec {
                path: d.path.clone(),
                read_only: d.read_only,
                serial: d.serial.clone(),
                flush: d.flush,
                limit: d.limit.to_limit(),
                options: d.options(),
            })
            .collect();
        config.taps = self
            .taps
            .iter()
            .enumerate()
            .map(|(i, t)| TapSpec {
                name: taps.get(i).cloned().unwrap_or_else(|| t.name.clone()),
                mac: t.mac,
                vhost: match t.vhost {
                    VhostDescription::On => VhostMode::On,
                    VhostDescription::Off => VhostMode::Off,
                    VhostDescription::Auto => VhostMode::Auto,
                },
                queues: t.queues,
                rx_limit: t.rx_limit.to_limit(),
                tx_limit: t.tx_limit.to_limit(),
            })
            .collect();
        for (iface, tap) in overrides {
            let index = self.tap_index(iface).ok_or_else(|| {
                RestoreError::invalid(format!(
                    "network_overrides: the snapshot has no interface {iface}"
                ))
            })?;
            config.taps[index].name = tap.clone();
        }
        config.vhost_user_disks.clear();
        config.vhost_user_nets.clear();
        config.rng_limit = self.rng_limit.to_limit();
        // The snapshot's, never the process flags': the device list must match the saved one.
        config.balloon = self.balloon.map(|b| b.config());
        config.vsock = self.vsock.as_ref().map(|v| VsockSpec {
            cid: v.cid,
            backend: match &v.backend {
                VsockBackendDescription::Unix(path) => VsockBackend::Unix(path.clone()),
                VsockBackendDescription::Vhost => VsockBackend::Vhost,
            },
        });
        // The saved image, never one built again from the files named at boot.
        config.cloud_init = self
            .cloud_init
            .as_ref()
            .map(|seed| seed.to_seed().map(std::sync::Arc::new))
            .transpose()?;
        Ok(config)
    }

    /// The tap a `network_overrides` entry names: by the API's `iface_id`, else by the tap's
    /// name, else `netN` for the N-th tap (a VM configured by flags has no interface ids).
    pub fn tap_index(&self, iface_id: &str) -> Option<usize> {
        let by_id = self
            .taps
            .iter()
            .position(|t| t.iface_id.as_deref() == Some(iface_id));
        by_id
            .or_else(|| self.taps.iter().position(|t| t.name == iface_id))
            .or_else(|| {
                iface_id
                    .strip_prefix("net")
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|&i| i < self.taps.len())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Description {
        Description {
            mem_bytes: 256 << 20,
            cpus: 2,
            pci: true,
            virtio_console: false,
            cmdline: String::new(),
            disks: vec![DiskDescription {
                drive_id: Some("rootfs".to_string()),
                path: "/images/root.img".into(),
                read_only: false,
                serial: Some("root".to_string()),
                flush: true,
                limit: LimitDescription {
                    bandwidth: Some((1000, 0, 1000)),
                    ops: None,
                },
                io_uring: true,
                direct: false,
                queues: 2,
                queue_size: 128,
            }],
            taps: vec![TapDescription {
                iface_id: None,
                name: "tap0".to_string(),
                mac: Some([2, 0, 0, 0, 0, 1]),
                vhost: VhostDescription::Auto,
                queues: 2,
                rx_limit: LimitDescription::default(),
                tx_limit: LimitDescription::default(),
            }],
            rng_limit: LimitDescription::default(),
            balloon: Some(BalloonDescription {
                amount_mib: 16,
                deflate_on_oom: true,
                stats_interval_s: 5,
                free_page_reporting: false,
                free_page_hinting: true,
            }),
            vsock: Some(VsockDescription {
                cid: 3,
                backend: VsockBackendDescription::Unix("/run/v.sock".into()),
            }),
            cloud_init: None,
        }
    }

    #[test]
    fn a_config_round_trips_and_taps_are_renamed() {
        let base = crate::cli::parse(["pvm".into()]).unwrap();
        let config = sample()
            .to_config(&base, &["tap7".to_string()], &[])
            .unwrap();
        assert_eq!(config.taps[0].name, "tap7");
        assert_eq!(config.cpus, 2);
        let again = Description::of(&config).unwrap();
        let mut expected = sample();
        expected.taps[0].name = "tap7".to_string();
        // The ids are the API's, named afterwards (name_devices).
        expected.disks[0].drive_id = None;
        assert_eq!(again, expected);
        assert!(
            sample()
                .to_config(&base, &["a".into(), "b".into()], &[])
                .is_err()
        );
        let moved = sample()
            .to_config(&base, &[], &[("net0".into(), "tap3".into())])
            .unwrap();
        assert_eq!(moved.taps[0].name, "tap3");
        let e = sample()
            .to_config(&base, &[], &[("eth5".into(), "tap3".into())])
            .unwrap_err();
        assert!(e.to_string().contains("no interface eth5"), "{e}");
    }

    #[test]
    fn hostile_shapes_are_refused_naming_the_value() {
        type Change = fn(&mut Description);
        let cases: Vec<(Change, &str)> = vec![
            (|d| d.mem_bytes = 1 << 50, "memory size"),
            (|d| d.mem_bytes = (256 << 20) + 1, "memory size"),
            (|d| d.cpus = 0, "0 vCPUs"),
            (|d| d.taps[0].queues = 0, "tap 0: 0 queue pairs"),
            (|d| d.taps[0].queues = 500, "tap 0: 500 queue pairs"),
            (
                |d| {
                    d.pci = false;
                    d.taps[0].queues = 2;
                },
                "tap 0: 2 queue pairs",
            ),
            (
                |d| d.disks[0].serial = Some("x".repeat(21)),
                "disk 0: serial",
            ),
            (|d| d.disks = vec![d.disks[0].clone(); 100], "100 disks"),
            (
                |d| d.balloon.as_mut().unwrap().amount_mib = 257,
                "balloon: amount_mib 257",
            ),
            (|d| d.vsock.as_mut().unwrap().cid = 2, "vsock: guest CID 2"),
            (
                |d| d.vsock.as_mut().unwrap().backend = VsockBackendDescription::Unix("".into()),
                "vsock: an empty uds_path",
            ),
            (
                |d| {
                    d.cloud_init = Some(SeedImage {
                        bytes: vec![0; 100],
                    })
                },
                "cloud-init seed: 100 bytes",
            ),
            (
                |d| d.disks = vec![d.disks[0].clone(); 2],
                "disk 1: drive id rootfs given twice",
            ),
            (
                |d| {
                    d.taps[0].iface_id = Some("eth0".into());
                    d.taps = vec![d.taps[0].clone(); 2];
                },
                "tap 1: interface id eth0 given twice",
            ),
        ];
        for (change, expected) in cases {
            let mut d = sample();
            change(&mut d);
            let e = d.validate().unwrap_err().to_string();
            assert!(e.contains(expected), "{e}");
        }
    }

    #[test]
    fn a_vhost_vsock_is_described_and_the_flags_devices_are_not_restored() {
        let mut base = crate::cli::parse(["pvm".into()]).unwrap();
        base.vsock = Some(VsockSpec {
            cid: 7,
            backend: VsockBackend::Vhost,
        });
        let described = Description::of(&base).unwrap();
        let vsock = described.vsock.clone().expect("a vsock");
        assert_eq!(
            (vsock.cid, vsock.backend),
            (7, VsockBackendDescription::Vhost)
        );
        // Restored as it was, not as the process flags say.
        let mut flags = base.clone();
        flags.vsock = None;
        let config = described.to_config(&flags, &[], &[]).unwrap();
        assert_eq!(config.vsock, base.vsock);
        // A restore takes the snapshot's balloon and vsock, never the process flags'.
        let mut bare = sample();
        bare.balloon = None;
        bare.vsock = None;
        let config = bare.to_config(&base, &[], &[]).unwrap();
        assert_eq!((config.balloon, config.vsock), (None, None));
    }

    #[test]
    fn a_cloud_init_seed_is_saved_whole_and_restored_from_the_snapshot_not_the_files() {
        let user = std::env::temp_dir().join(format!("pvm-snap-seed-{}", std::process::id()));
        std::fs::write(&user, "#cloud-config\nhostname: first\n").unwrap();
        let flag = format!("user-data={}", user.display());
        let seeded = crate::cli::parse(["pvm".into(), "--cloud-init".into(), flag.into()]).unwrap();
        let image = seeded.cloud_init.as_ref().unwrap().image().unwrap();
        let described = Description::of(&seeded).unwrap();
        assert_eq!(described.cloud_init.as_ref().unwrap().bytes, image);
        // The files change after the snapshot: the restored seed is still the saved one.
        std::fs::write(&user, "#cloud-config\nhostname: changed\n").unwrap();
        let base = crate::cli::parse(["pvm".into()]).unwrap();
        let config = described.to_config(&base, &[], &[]).unwrap();
        let restored = config.cloud_init.as_ref().expect("a seed");
        assert_eq!(restored.image().unwrap(), image);
        assert_eq!(Description::of(&config).unwrap(), described);
        std::fs::remove_file(&user).unwrap();
        // PUT /snapshot/load in a pvm started with --cloud-init: the flag is not dropped silently.
        let e = sample()
            .to_config(&seeded, &[], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--cloud-init"), "{e}");
    }

    #[test]
    fn interfaces_are_found_by_tap_name_or_position() {
        let d = sample();
        assert_eq!(d.tap_index("tap0"), Some(0));
        assert_eq!(d.tap_index("net0"), Some(0));
        assert_eq!(d.tap_index("net1"), None);
        assert_eq!(d.tap_index("eth0"), None);
    }
}

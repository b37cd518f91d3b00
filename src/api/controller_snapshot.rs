//! `PUT /snapshot/create` and `/snapshot/load` on the main thread (the bodies were checked by
//! `api::snapshot` on the API thread).

use pvm_virtio::balloon::PAGES_PER_MIB;

use super::Controller;
use crate::api::http::Response;
use crate::api::models::{
    CacheType, Drive, IoEngine, MachineConfig, NetworkInterface, RateLimiter, TokenBucket,
};
use crate::exit::error_chain;
use crate::snapshot::Description;
use crate::snapshot::description::{DeviceIds, LimitDescription};
use crate::vm::{self, RunningVm, Vm};

impl Controller {
    /// PUT /snapshot/create on the running VM: only while paused.
    pub(super) fn create_snapshot(
        &self,
        body: &crate::api::snapshot::SnapshotCreate,
        vm: &mut RunningVm<'_, '_>,
    ) -> Response {
        let ids = self.device_ids();
        match vm.create_snapshot(body.kind(), &body.snapshot_path, &body.mem_file_path, &ids) {
            Ok(()) => Response::no_content(),
            Err(e) => Response::fault(&format!("Create snapshot error: {}", error_chain(&e))),
        }
    }

    /// PUT /snapshot/load: builds the snapshot's VM, paused unless `resume_vm`.
    pub(super) fn load_snapshot(
        &mut self,
        request: crate::api::snapshot::LoadRequest,
    ) -> (Response, Option<Vm>) {
        let fc = &self.fc;
        if fc.boot_source.is_some()
            || !fc.drives.is_empty()
            || !fc.network_interfaces.is_empty()
            || fc.machine_config.is_some()
        {
            return (
                Response::fault(
                    "Load snapshot error: Loading a microVM snapshot not allowed after \
                     configuring boot-specific resources.",
                ),
                None,
            );
        }
        let spec = vm::RestoreSpec {
            snapshot: request.snapshot_path,
            mem: request.mem,
            taps: Vec::new(),
            overrides: request
                .network_overrides
                .into_iter()
                .map(|o| (o.iface_id, o.host_dev_name))
                .collect(),
            resume: request.resume_vm,
        };
        let mut base = self.base.clone();
        base.track_dirty_pages |= request.track_dirty_pages;
        match vm::restore_described(&base, &spec) {
            Ok(restored) => {
                self.adopt_restored(&restored);
                log::info!("API: snapshot {} loaded", spec.snapshot.display());
                (Response::no_content(), Some(restored.vm))
            }
            Err(e) => (
                Response::fault(&format!("Load snapshot error: {}", error_chain(&e))),
                None,
            ),
        }
    }
}

impl Controller {
    /// The API's ids of the running VM's disks and taps, in attach order: the flags' devices
    /// come first (no id), then the API's image drives and interfaces.
    fn device_ids(&self) -> DeviceIds {
        let drives = self
            .fc
            .drives
            .iter()
            .filter(|d| d.socket.is_none() && d.path_on_host.is_some())
            .map(|d| Some(d.drive_id.clone()));
        let ifaces = self
            .fc
            .network_interfaces
            .iter()
            .map(|i| Some(i.iface_id.clone()));
        DeviceIds {
            drives: std::iter::repeat_n(None, self.base.disks.len())
                .chain(drives)
                .collect(),
            ifaces: std::iter::repeat_n(None, self.base.taps.len())
                .chain(ifaces)
                .collect(),
        }
    }

    /// Serves a restored VM as one InstanceStart built: its drives, interfaces and machine
    /// configuration become the API's (GET /vm/config, PATCH /drives, /network-interfaces),
    /// with its rate limiters. A device the flags configured (no id in the snapshot) is
    /// named `driveN` / `netN` by its position.
    pub fn adopt_restored(&mut self, restored: &vm::Restored) {
        let (description, config) = (&restored.description, &restored.config);
        self.fc.drives = restored_drives(description);
        self.fc.network_interfaces = restored_interfaces(description);
        self.fc.machine_config = Some(MachineConfig::from_vm_config(config));
        // Every disk and tap is the API's now: none comes before them (see disk_index).
        let mut base = config.clone();
        base.disks.clear();
        base.taps.clear();
        self.base = base;
        self.set_started();
        self.set_running_config(config);
        self.limiters = restored.vm.rate_limiters();
        // The balloon as it stood at the snapshot: a PATCH before it changed the device's
        // target and interval, which the device's restored state holds.
        if let (Some(mut balloon), Some(handle)) = (self.balloon(), &self.limiters.balloon) {
            balloon.amount_mib = handle.target_pages() / PAGES_PER_MIB;
            balloon.stats_polling_interval_s = handle.stats_interval_s();
            self.fc.balloon = Some(balloon);
        }
    }
}

fn restored_drives(description: &Description) -> Vec<Drive> {
    description
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| Drive {
            drive_id: d.drive_id.clone().unwrap_or_else(|| format!("drive{i}")),
            is_root_device: false,
            partuuid: None,
            cache_type: if d.flush {
                CacheType::Writeback
            } else {
                CacheType::Unsafe
            },
            is_read_only: Some(d.read_only),
            path_on_host: Some(d.path.display().to_string()),
            rate_limiter: rate_limiter(d.limit),
            io_engine: Some(if d.io_uring {
                IoEngine::Async
            } else {
                IoEngine::Sync
            }),
            socket: None,
        })
        .collect()
}

fn restored_interfaces(description: &Description) -> Vec<NetworkInterface> {
    description
        .taps
        .iter()
        .enumerate()
        .map(|(i, t)| NetworkInterface {
            iface_id: t.iface_id.clone().unwrap_or_else(|| format!("net{i}")),
            host_dev_name: t.name.clone(),
            guest_mac: t.mac.map(|m| {
                m.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            }),
            mtu: None,
            rx_rate_limiter: rate_limiter(t.rx_limit),
            tx_rate_limiter: rate_limiter(t.tx_limit),
        })
        .collect()
}

/// The API's form of a restored limit; None when it limits nothing.
fn rate_limiter(limit: LimitDescription) -> Option<RateLimiter> {
    let bucket = |(size, burst, refill_time): (u64, u64, u64)| TokenBucket {
        size,
        one_time_burst: (burst != 0).then_some(burst),
        refill_time,
    };
    let limiter = RateLimiter {
        bandwidth: limit.bandwidth.map(bucket),
        ops: limit.ops.map(bucket),
    };
    (limiter != RateLimiter::default()).then_some(limiter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::description::{DiskDescription, TapDescription, VhostDescription};

    #[test]
    fn restored_devices_keep_their_ids_or_are_named_by_position() {
        let limit = LimitDescription {
            bandwidth: None,
            ops: Some((100, 0, 1000)),
        };
        let tap = |iface_id: Option<&str>| TapDescription {
            iface_id: iface_id.map(str::to_string),
            name: "tap0".to_string(),
            mac: Some([2, 0, 0, 0, 0, 0xab]),
            vhost: VhostDescription::Off,
            queues: 1,
            rx_limit: limit,
            tx_limit: LimitDescription::default(),
        };
        let disk = |drive_id: Option<&str>| DiskDescription {
            drive_id: drive_id.map(str::to_string),
            path: "/images/root.img".into(),
            read_only: true,
            serial: None,
            flush: true,
            limit: LimitDescription::default(),
            io_uring: false,
            direct: false,
            queues: 1,
            queue_size: 256,
        };
        let description = Description {
            mem_bytes: 64 << 20,
            cpus: 1,
            pci: false,
            virtio_console: false,
            cmdline: String::new(),
            disks: vec![disk(None), disk(Some("rootfs"))],
            taps: vec![tap(Some("eth0")), tap(None)],
            rng_limit: LimitDescription::default(),
            balloon: None,
            vsock: None,
            cloud_init: None,
        };
        let drives = restored_drives(&description);
        assert_eq!(drives[0].drive_id, "drive0");
        assert_eq!(drives[1].drive_id, "rootfs");
        assert_eq!(drives[1].cache_type, CacheType::Writeback);
        assert_eq!(drives[1].is_read_only, Some(true));
        assert_eq!(drives[1].rate_limiter, None);
        let ifaces = restored_interfaces(&description);
        assert_eq!(ifaces[0].iface_id, "eth0");
        assert_eq!(ifaces[1].iface_id, "net1");
        assert_eq!(ifaces[0].guest_mac.as_deref(), Some("02:00:00:00:00:ab"));
        let ops = ifaces[0]
            .rx_rate_limiter
            .as_ref()
            .and_then(|l| l.ops.clone());
        assert_eq!(
            ops,
            Some(TokenBucket {
                size: 100,
                one_time_burst: None,
                refill_time: 1000
            })
        );
        assert_eq!(ifaces[0].tx_rate_limiter, None);
    }
}

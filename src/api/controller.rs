//! The API's actions on the VMM's main thread. Before InstanceStart the controller holds what
//! the client configured and the [`VmConfig`] it maps to (each PUT is checked by mapping it);
//! InstanceStart builds the VM from that VmConfig. Once the VM runs, the main loop hands each
//! action to [`Controller::runtime`], and pre-boot calls get Firecracker's refusal.

use std::path::{Path, PathBuf};

use super::http::Response;
use super::models::{
    ConfigError, ConfigFileError, FcConfig, Logger, Metrics, PartialDrive, PartialNetworkInterface,
    RateLimiter, rate_limit,
};
use super::routes::Action;
use super::server::ApiInbox;
use super::swap::OpenedDisk;
use crate::config::VmConfig;
use crate::exit::error_chain;
use crate::logger::LoggerConfig;
use crate::virtio_devices::DeviceLimiters;
use crate::vm::{self, ControlPlane, CtrlAltDel, RunningVm, Vm};

/// Firecracker's refusals by VM state; clients match these texts.
pub const AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";
pub const BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";

/// Why a PATCH of a running device was refused; the caller puts the category in front.
#[derive(Debug, thiserror::Error)]
enum PatchError {
    #[error("no device with id {0}")]
    NoDevice(String),
    #[error(
        "{0}: path_on_host: a vhost-user backend serves this drive; give the backend its new \
         file"
    )]
    VhostUserFile(String),
    #[error("{0}: path_on_host: resume the VM first (its devices stay paused until then)")]
    SwapWhilePaused(String),
    #[error("{0}: path_on_host: the device cannot pause or resume: {1}")]
    SwapPause(String, pvm_virtio::PauseError),
    #[error("{0}: path_on_host: the new file is in place but the guest was not told: {1}")]
    SwapNotify(String, std::io::Error),
    #[error(
        "{0}: rate_limiter: a vhost-user backend moves the data itself and pvm cannot limit it"
    )]
    VhostUser(String),
    #[error(
        "{0}: the kernel's vhost-net serves this interface and cannot enforce a rate limit; \
         give the interface a rate limiter before boot to have pvm serve it"
    )]
    VhostNet(String),
    #[error("{0}: the running VM has no such device")]
    NotRunning(String),
}

/// `PUT /snapshot/load` into a process whose VM runs already.
pub const LOAD_AFTER_START: &str = "Load snapshot error: a snapshot is loaded into a fresh pvm \
     process, before any VM runs in it; start another pvm for it";

/// Firecracker's answer to a second metrics configuration; clients match this text.
pub const METRICS_AGAIN: &str = "Metrics error: Cannot initialize the metrics system due to bad \
     user input: Reinitialization of metrics not allowed.";

/// The process-wide logger and metrics the API configures; tests put their own in.
pub(crate) struct Globals {
    pub logger: fn(&LoggerConfig, &str) -> Result<(), crate::logger::Error>,
    pub metrics: fn(&Path) -> Result<(), crate::metrics::Error>,
}

impl Default for Globals {
    fn default() -> Self {
        Globals {
            logger: crate::logger::configure,
            metrics: crate::metrics::init,
        }
    }
}

/// What the API knows of the VM.
pub struct Controller {
    id: String,
    /// What pvm's own flags describe; the API's configuration goes on top.
    base: VmConfig,
    fc: FcConfig,
    started: bool,
    /// The running VM's rate limiters, for PATCH.
    limiters: DeviceLimiters,
    /// The logger as last configured (flags, then PUT /logger): what a PUT leaves out stays.
    logger: LoggerConfig,
    globals: Globals,
    /// When the VM started, for GET /pvm/info's uptime.
    started_at: Option<std::time::Instant>,
    /// The running VM's configuration, for GET /pvm/info: mapping the API's configuration
    /// again would open files, which the sandboxed main thread may not.
    running: Option<VmConfig>,
}

/// `GET /`.
#[derive(serde::Serialize)]
struct InstanceInfo<'a> {
    id: &'a str,
    state: &'a str,
    vmm_version: &'a str,
    app_name: &'a str,
}

fn json<T: serde::Serialize>(value: &T) -> Response {
    match serde_json::to_string(value) {
        Ok(text) => Response::json(text),
        Err(e) => Response::fault(&format!("Internal error: {e}")),
    }
}

impl Controller {
    pub fn new(id: String, base: VmConfig, fc: FcConfig) -> Self {
        Controller {
            id,
            logger: base.logger.clone(),
            base,
            fc,
            started: false,
            limiters: DeviceLimiters::default(),
            globals: Globals::default(),
            started_at: None,
            running: None,
        }
    }

    /// PUT /logger: applied at once, on this (the main) thread.
    /// Applies a config file's logger and metrics sections, in Firecracker's order (logger
    /// first), as their PUTs would; a refusal names the section and says why.
    pub fn apply_file_sections(&mut self, fc: &FcConfig) -> Result<(), ConfigFileError> {
        let sections = [
            ("logger", fc.logger.clone().map(|l| self.put_logger(l))),
            ("metrics", fc.metrics.clone().map(|m| self.put_metrics(m))),
        ];
        for (section, response) in sections {
            if let Some(response) = response.filter(|r| r.status >= 300) {
                return Err(ConfigFileError::Section {
                    section,
                    fault: response.body.unwrap_or_default(),
                });
            }
        }
        Ok(())
    }

    fn put_logger(&mut self, body: Logger) -> Response {
        if let Some(module) = &body.module {
            return Response::fault(&format!(
                "Logger error: module {module:?}: pvm cannot keep only one module's lines; \
                 leave module out"
            ));
        }
        let old = &self.logger;
        let config = LoggerConfig {
            log_path: body.log_path.map(PathBuf::from).or(old.log_path.clone()),
            // As in Firecracker, a PUT without a level goes back to Info.
            level: Some(body.level.unwrap_or(log::LevelFilter::Info)),
            show_level: body.show_level.unwrap_or(old.show_level),
            show_log_origin: body.show_log_origin.unwrap_or(old.show_log_origin),
        };
        match (self.globals.logger)(&config, &self.id) {
            Ok(()) => {
                self.logger = config;
                Response::no_content()
            }
            Err(e) => Response::fault(&format!("Logger error: {}", error_chain(&e))),
        }
    }

    /// PUT /metrics: once per process (the VM's counters are registered when it starts).
    fn put_metrics(&mut self, body: Metrics) -> Response {
        if body.emit_id {
            return Response::fault(
                "Metrics error: emit_id: pvm's metrics lines carry no instance id; use false",
            );
        }
        if body.properties.as_ref().is_some_and(|p| !p.is_empty()) {
            return Response::fault(
                "Metrics error: properties: pvm's metrics lines carry no properties; leave them out",
            );
        }
        match (self.globals.metrics)(Path::new(&body.metrics_path)) {
            Ok(()) => Response::no_content(),
            Err(crate::metrics::Error::AlreadyConfigured { .. }) => Response::fault(METRICS_AGAIN),
            Err(e) => Response::fault(&format!("Metrics error: {}", error_chain(&e))),
        }
    }

    /// The running VM's rate limiters, which PATCH /drives and /network-interfaces change.
    pub fn set_limiters(&mut self, limiters: DeviceLimiters) {
        self.limiters = limiters;
    }

    /// The process's own flags (sandbox, logging, metrics), which a restored VM keeps.
    pub fn base_config(&self) -> VmConfig {
        self.base.clone()
    }

    /// The VM `fc` describes on top of the flags.
    pub fn vm_config(&self) -> Result<VmConfig, ConfigError> {
        self.fc.to_vm_config(&self.base)
    }

    /// Marks the VM as started (booted from a config file, or by InstanceStart).
    pub fn set_started(&mut self) {
        self.started = true;
        self.started_at = Some(std::time::Instant::now());
    }

    /// Records the configuration the VM was built from, for GET /pvm/info.
    pub fn set_running_config(&mut self, config: &VmConfig) {
        self.running = Some(config.clone());
    }

    /// `GET /pvm/info`: the running VM's configuration; before the start, what the API has
    /// configured so far (the flags' part if that does not map yet).
    fn pvm_info(&self, state: &str) -> Response {
        let config = match (&self.running, self.started) {
            (Some(config), _) => config.clone(),
            // Started without a recorded configuration: the flags', never a new mapping.
            (None, true) => self.base.clone(),
            (None, false) => self.vm_config().unwrap_or_else(|_| self.base.clone()),
        };
        json(&crate::manage::info::PvmInfo::of(
            &self.id,
            state,
            &config,
            self.started_at,
        ))
    }

    /// The answers that do not depend on the VM's state beyond `state`.
    fn get(&self, action: &Action, state: &str) -> Option<Response> {
        Some(match action {
            Action::GetInstanceInfo => json(&InstanceInfo {
                id: &self.id,
                state,
                vmm_version: env!("CARGO_PKG_VERSION"),
                app_name: "pvm",
            }),
            Action::GetVersion => json(&serde_json::json!({
                "firecracker_version": env!("CARGO_PKG_VERSION")
            })),
            Action::GetMachineConfig => json(&self.fc.machine(&self.base)),
            Action::GetVmConfig => json(&self.fc.to_json(&self.base)),
            Action::GetBalloon => self.get_balloon(),
            Action::GetPvmInfo => self.pvm_info(state),
            _ => return None,
        })
    }

    /// Applies a configuring action to a copy and keeps it only if the whole still maps onto
    /// a VM: a refused PUT changes nothing.
    fn configure(&mut self, action: Action) -> Response {
        let mut candidate = self.fc.clone();
        match action {
            Action::PutBootSource(boot) => candidate.boot_source = Some(boot),
            Action::PutDrive(drive) => candidate.put_drive(drive),
            Action::PutNetworkInterface(iface) => candidate.put_interface(iface),
            Action::PutMachineConfig(machine) => candidate.machine_config = Some(machine),
            Action::PatchMachineConfig(update) => {
                candidate.machine_config = Some(update.apply(&self.fc.machine(&self.base)));
            }
            Action::PutEntropy(entropy) => candidate.entropy = Some(entropy),
            Action::PutSerial(serial) => candidate.serial = Some(serial),
            // One vsock per VM: a second PUT replaces the first, as in Firecracker.
            Action::PutVsock(vsock) => candidate.vsock = Some(vsock),
            Action::PutLogger(logger) => return self.put_logger(logger),
            Action::PutMetrics(metrics) => return self.put_metrics(metrics),
            Action::PutBalloon(balloon) => candidate.balloon = Some(balloon),
            Action::PatchBalloon(_) | Action::PatchBalloonStats(_) => {
                match self.patched_balloon(&action) {
                    Some(balloon) => candidate.balloon = Some(balloon),
                    None => return Response::fault(balloon::NO_BALLOON),
                }
            }
            _ => return Response::fault(BEFORE_START),
        }
        match candidate.to_vm_config(&self.base) {
            Ok(_) => {
                self.fc = candidate;
                Response::no_content()
            }
            Err(e) => Response::fault(&e.to_string()),
        }
    }

    /// An action before the VM runs; Some(vm) when InstanceStart built it.
    pub fn preboot(&mut self, action: Action) -> (Response, Option<Vm>) {
        if let Some(response) = self.get(&action, "Not started") {
            return (response, None);
        }
        if let Action::LoadSnapshot(request) = action {
            return self.load_snapshot(request);
        }
        if action != Action::InstanceStart {
            return (self.configure(action), None);
        }
        let config = match self.vm_config() {
            Ok(config) if config.kernel.is_some() => config,
            Ok(_) => {
                return (
                    Response::fault(
                        "Start microvm error: no kernel: PUT /boot-source first (or give --kernel)",
                    ),
                    None,
                );
            }
            Err(e) => return (Response::fault(&e.to_string()), None),
        };
        match vm::build(&config) {
            Ok(vm) => {
                self.set_started();
                self.set_running_config(&config);
                self.limiters = vm.rate_limiters();
                log::info!("API: InstanceStart: the VM is built and starts");
                (Response::no_content(), Some(vm))
            }
            Err(e) => (
                Response::fault(&format!("Start microvm error: {}", error_chain(&e))),
                None,
            ),
        }
    }

    /// An action while the VM runs.
    pub fn runtime(&mut self, action: Action, vm: &mut RunningVm<'_, '_>) -> Response {
        let state = if vm.is_paused() { "Paused" } else { "Running" };
        if let Some(response) = self.get(&action, state) {
            return response;
        }
        match action {
            Action::SendCtrlAltDel => match vm.ctrl_alt_del() {
                Ok(CtrlAltDel::Typed) => {
                    log::info!("API: SendCtrlAltDel: typed on the guest's keyboard");
                    Response::no_content()
                }
                Ok(CtrlAltDel::Reset) => {
                    log::info!(
                        "API: SendCtrlAltDel: the guest has no keyboard driver; resetting it, \
                         the VM ends"
                    );
                    Response::no_content()
                }
                Err(e) => Response::fault(&format!("Internal VMM error: {e}")),
            },
            Action::FlushMetrics if !crate::metrics::is_configured() => {
                Response::fault("Metrics error: metrics are not configured.")
            }
            Action::FlushMetrics => match crate::metrics::flush() {
                Ok(()) => Response::no_content(),
                Err(e) => Response::fault(&format!("Metrics error: {}", error_chain(&e))),
            },
            Action::Pause | Action::Resume => match vm.set_paused(action == Action::Pause) {
                Ok(()) => Response::no_content(),
                Err(why) => Response::fault(&why.to_string()),
            },
            Action::SwapDrive(patch, disk) => match self.swap_drive(&patch, &disk, vm) {
                Ok(()) => Response::no_content(),
                Err(why) => Response::fault(&format!("Drive config error: {why}")),
            },
            Action::PatchDrive(patch) => match self.patch_drive(&patch) {
                Ok(()) => Response::no_content(),
                Err(why) => Response::fault(&format!("Drive config error: {why}")),
            },
            Action::PatchNetworkInterface(patch) => match self.patch_interface(&patch) {
                Ok(()) => Response::no_content(),
                Err(why) => Response::fault(&format!("Network interface error: {why}")),
            },
            Action::PatchBalloon(_) | Action::PatchBalloonStats(_) => {
                self.patch_running_balloon(&action, vm)
            }
            Action::GetBalloonStats => self.balloon_stats(),
            Action::StartBalloonHinting(_)
            | Action::StopBalloonHinting
            | Action::GetBalloonHintingStatus => self.balloon_hinting(&action, vm),
            Action::CreateSnapshot(body) => self.create_snapshot(&body, vm),
            Action::LoadSnapshot(_) => Response::fault(LOAD_AFTER_START),
            _ => Response::fault(AFTER_START),
        }
    }

    /// PATCH /drives/{id} on the running VM: new rate limits (buckets left out stay).
    fn patch_drive(&mut self, patch: &PartialDrive) -> Result<(), PatchError> {
        let id = &patch.drive_id;
        if patch.path_on_host.is_some() {
            // The API thread opens a new file of each running image drive (SwapDrive); what
            // reaches here is no such drive.
            let drive = self.fc.drives.iter().find(|d| &d.drive_id == id);
            return Err(match drive {
                None => PatchError::NoDevice(id.clone()),
                Some(d) if d.socket.is_some() => PatchError::VhostUserFile(id.clone()),
                Some(_) => PatchError::NotRunning(id.clone()),
            });
        }
        let Some(limiter) = &patch.rate_limiter else {
            // Nothing to change (Firecracker refreshes a vhost-user disk's config here).
            return Ok(());
        };
        let drives = &self.fc.drives;
        let position = drives
            .iter()
            .position(|d| &d.drive_id == id)
            .ok_or_else(|| PatchError::NoDevice(id.clone()))?;
        let drive = &drives[position];
        let merged = drive
            .rate_limiter
            .clone()
            .unwrap_or_default()
            .patched(limiter);
        if drive.socket.is_some() {
            if merged.limits() {
                return Err(PatchError::VhostUser(id.clone()));
            }
            return Ok(());
        }
        let index = self.disk_index(position);
        let shared = self
            .limiters
            .disks
            .get(index)
            .ok_or_else(|| PatchError::NotRunning(id.clone()))?;
        shared.set(rate_limit(Some(&merged)));
        self.fc.drives[position].rate_limiter = Some(merged);
        Ok(())
    }

    /// The guest-order index of image drive `position` of the API's drives: the flags' disks
    /// come first, then the API's image drives in order.
    fn disk_index(&self, position: usize) -> usize {
        self.base.disks.len()
            + self.fc.drives[..position]
                .iter()
                .filter(|d| d.path_on_host.is_some())
                .count()
    }

    /// The running VM's image drives, (id, read-only, path): the API thread opens their new
    /// backing files.
    pub fn image_drives(&self) -> Vec<(String, bool, String)> {
        self.fc
            .drives
            .iter()
            .filter(|d| d.socket.is_none())
            .filter_map(|d| {
                let path = d.path_on_host.clone()?;
                Some((d.drive_id.clone(), d.is_read_only.unwrap_or(false), path))
            })
            .collect()
    }

    /// PATCH /drives/{id} with a new backing file the API thread opened: the device is paused
    /// (nothing in flight: its requests are served synchronously), takes the file as it
    /// resumes, and a configuration-change interrupt makes the guest read the new capacity.
    /// A rate limiter in the same PATCH is applied first.
    fn swap_drive(
        &mut self,
        patch: &PartialDrive,
        disk: &OpenedDisk,
        vm: &mut RunningVm<'_, '_>,
    ) -> Result<(), PatchError> {
        let id = &patch.drive_id;
        let Some(path) = &patch.path_on_host else {
            return self.patch_drive(patch);
        };
        let position = self
            .fc
            .drives
            .iter()
            .position(|d| &d.drive_id == id)
            .ok_or_else(|| PatchError::NoDevice(id.clone()))?;
        if vm.is_paused() {
            // Resuming just this device would let it serve while the vCPUs are parked.
            return Err(PatchError::SwapWhilePaused(id.clone()));
        }
        let index = self.disk_index(position);
        let not_running = || PatchError::NotRunning(id.clone());
        let swap = self
            .limiters
            .disk_swaps
            .get(index)
            .ok_or_else(not_running)?
            .clone();
        let device = vm
            .device(&format!("block{index}"))
            .ok_or_else(not_running)?;
        let disk = disk.take().ok_or_else(not_running)?;
        if patch.rate_limiter.is_some() {
            let limits_only = PartialDrive {
                path_on_host: None,
                ..patch.clone()
            };
            self.patch_drive(&limits_only)?;
        }
        let sectors = disk.disk.sectors();
        if disk.reopened {
            swap.stage_reopened(disk.disk);
        } else {
            swap.stage(disk.disk);
        }
        if let Err(e) = device.pause() {
            // Not taken: the drive stays on its old file.
            drop(swap.take());
            return Err(PatchError::SwapPause(id.clone(), e));
        }
        // The device takes the file before its worker restarts, so even a failed resume (the
        // device then asks the driver for a reset) leaves the drive on the new file.
        let resumed = device.resume();
        self.fc.drives[position].path_on_host = Some(path.clone());
        resumed.map_err(|e| PatchError::SwapPause(id.clone(), e))?;
        log::info!("API: drive {id} is now backed by {path} ({sectors} sectors)");
        device
            .notify_config_change()
            .map_err(|e| PatchError::SwapNotify(id.clone(), e))
    }

    /// PATCH /network-interfaces/{id} on the running VM: new rate limits (buckets left out
    /// stay).
    fn patch_interface(&mut self, patch: &PartialNetworkInterface) -> Result<(), PatchError> {
        let id = &patch.iface_id;
        let ifaces = &self.fc.network_interfaces;
        let position = ifaces
            .iter()
            .position(|i| &i.iface_id == id)
            .ok_or_else(|| PatchError::NoDevice(id.clone()))?;
        let iface = &ifaces[position];
        let merge = |old: &Option<RateLimiter>, new: &Option<RateLimiter>| match new {
            Some(new) => Some(old.clone().unwrap_or_default().patched(new)),
            None => old.clone(),
        };
        let rx = merge(&iface.rx_rate_limiter, &patch.rx_rate_limiter);
        let tx = merge(&iface.tx_rate_limiter, &patch.tx_rate_limiter);
        let limits = |l: &Option<RateLimiter>| l.as_ref().is_some_and(RateLimiter::limits);
        match self.limiters.taps.get(self.base.taps.len() + position) {
            Some(Some((rx_shared, tx_shared))) => {
                rx_shared.set(rate_limit(rx.as_ref()));
                tx_shared.set(rate_limit(tx.as_ref()));
            }
            Some(None) if limits(&rx) || limits(&tx) => {
                return Err(PatchError::VhostNet(id.clone()));
            }
            Some(None) => {}
            None => return Err(PatchError::NotRunning(id.clone())),
        }
        let iface = &mut self.fc.network_interfaces[position];
        iface.rx_rate_limiter = rx;
        iface.tx_rate_limiter = tx;
        Ok(())
    }

    /// Whether InstanceStart (or the config file) started the VM.
    pub fn started(&self) -> bool {
        self.started
    }
}

/// Serves the API before boot until InstanceStart builds the VM; None if the API thread ended.
pub fn serve_until_start(inbox: &ApiInbox, controller: &mut Controller) -> Option<Vm> {
    while let Ok(action) = inbox.requests.recv() {
        let (response, vm) = controller.preboot(action);
        if vm.is_some() {
            // Before the client hears of the start: from its next request on, the API thread
            // opens the new files of PATCH /drives.
            inbox.drive_modes.publish(controller.image_drives());
        }
        let _ = inbox.replies.send(response);
        if vm.is_some() {
            return vm;
        }
    }
    None
}

/// The API while the VM runs: the main loop wakes it on the inbox's eventfd.
pub struct Runtime {
    pub inbox: ApiInbox,
    pub controller: Controller,
}

impl ControlPlane for Runtime {
    fn event(&self) -> &vmm_sys_util::eventfd::EventFd {
        &self.inbox.event
    }

    fn serve(&mut self, vm: &mut RunningVm<'_, '_>) {
        // Non-blocking: the count only says that actions may be waiting.
        let _ = self.inbox.event.read();
        while let Ok(action) = self.inbox.requests.try_recv() {
            let response = self.controller.runtime(action, vm);
            let _ = self.inbox.replies.send(response);
        }
    }
}

#[path = "controller_balloon.rs"]
mod balloon;
#[path = "controller_snapshot.rs"]
mod snapshot;

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;

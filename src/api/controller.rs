//! The API's actions on the VMM's main thread. Before InstanceStart the controller holds what
//! the client configured and the [`VmConfig`] it maps to (each PUT is checked by mapping it);
//! InstanceStart builds the VM from that VmConfig. Once the VM runs, the main loop hands each
//! action to [`Controller::runtime`], and pre-boot calls get Firecracker's refusal.

use super::http::Response;
use super::models::{ConfigError, FcConfig};
use super::routes::Action;
use super::server::ApiInbox;
use crate::config::VmConfig;
use crate::exit::{Outcome, error_chain};
use crate::vm::{self, ControlPlane, RunningVm, Vm};

/// Firecracker's refusals by VM state; clients match these texts.
pub const AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";
pub const BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";

/// What the API knows of the VM.
pub struct Controller {
    id: String,
    /// What pvm's own flags describe; the API's configuration goes on top.
    base: VmConfig,
    fc: FcConfig,
    started: bool,
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
            base,
            fc,
            started: false,
        }
    }

    /// The VM `fc` describes on top of the flags.
    pub fn vm_config(&self) -> Result<VmConfig, ConfigError> {
        self.fc.to_vm_config(&self.base)
    }

    /// Marks the VM as started (booted from a config file, or by InstanceStart).
    pub fn set_started(&mut self) {
        self.started = true;
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
                self.started = true;
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
            Action::SendCtrlAltDel => {
                // pvm's i8042 has no keyboard to type into: the guest is reset through the
                // controller's reset line, which ends the VM as a guest reboot does.
                log::info!("API: SendCtrlAltDel: resetting the guest; the VM ends");
                vm.end.end(Outcome::Reboot);
                Response::no_content()
            }
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
            _ => Response::fault(AFTER_START),
        }
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

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;

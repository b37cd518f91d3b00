//! `PUT /snapshot/create` and `/snapshot/load` on the main thread (the bodies were checked by
//! `api::snapshot` on the API thread).

use super::Controller;
use crate::api::http::Response;
use crate::exit::error_chain;
use crate::vm::{self, RunningVm, Vm};

impl Controller {
    /// PUT /snapshot/create on the running VM: only while paused.
    pub(super) fn create_snapshot(
        &self,
        body: &crate::api::snapshot::SnapshotCreate,
        vm: &mut RunningVm<'_, '_>,
    ) -> Response {
        let ids: Vec<String> = self
            .fc
            .network_interfaces
            .iter()
            .map(|i| i.iface_id.clone())
            .collect();
        match vm.create_snapshot(&body.snapshot_path, &body.mem_file_path, &ids) {
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
            mem_file: request.mem_file,
            taps: Vec::new(),
            overrides: request
                .network_overrides
                .into_iter()
                .map(|o| (o.iface_id, o.host_dev_name))
                .collect(),
            resume: request.resume_vm,
        };
        match vm::restore(&self.base, &spec) {
            Ok(vm) => {
                self.started = true;
                self.limiters = vm.rate_limiters();
                log::info!("API: snapshot {} loaded", spec.snapshot.display());
                (Response::no_content(), Some(vm))
            }
            Err(e) => (
                Response::fault(&format!("Load snapshot error: {}", error_chain(&e))),
                None,
            ),
        }
    }
}

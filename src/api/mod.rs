//! Firecracker's control plane for pvm, so tools that drive Firecracker drive pvm: its JSON
//! models ([`models`]) mapped onto the one [`VmConfig`], the config file, and the HTTP API on a
//! Unix socket ([`http`] framing, [`routes`], the API thread in [`server`], the main thread's
//! side in [`controller`]).

pub mod controller;
pub mod http;
pub mod models;
pub mod routes;
pub mod server;
pub mod snapshot;
pub mod swap;

use std::path::PathBuf;

use self::controller::{Controller, Runtime};
use self::models::ConfigFileError;
use crate::cli::FirecrackerMode;
use crate::config::VmConfig;
use crate::exit::{Outcome, USAGE_ERROR};
use crate::vm;

/// Why a Firecracker-mode run could not start or went wrong.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Vm(#[from] vm::Error),
    #[error(transparent)]
    ConfigFile(#[from] ConfigFileError),
    #[error("--config-file {0}: boot-source is missing (or give --kernel)")]
    NoKernel(PathBuf),
    #[error(transparent)]
    Server(#[from] server::ServerError),
    #[error("the API thread ended before InstanceStart")]
    ApiEnded,
}

impl RunError {
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Vm(e) => e.exit_code(),
            RunError::ConfigFile(_) | RunError::NoKernel(_) => USAGE_ERROR,
            RunError::Server(server::ServerError::Bind { .. }) => USAGE_ERROR,
            RunError::Server(_) | RunError::ApiEnded => crate::exit::VMM_FAILURE,
        }
    }
}

/// Runs pvm in its own mode: the VM boots at once; unless `run_dir_api` is false, the API
/// serves the running VM on the run directory's `ID.sock` too (for `pvm list` and the other
/// subcommands). That socket is an extra: if it cannot be made, pvm warns and boots anyway.
pub fn run_native(config: VmConfig, id: &str, run_dir_api: bool) -> Result<Outcome, RunError> {
    let mut controller = Controller::new(id.to_string(), config.clone(), Default::default());
    let vm = vm::build(&config)?;
    // After the build: a socket in the run directory means a VM (and its console socket).
    let inbox = if run_dir_api {
        start_run_dir_api(id, config.seccomp)
    } else {
        None
    };
    crate::devices::boot_timer::phase("run-directory API ready");
    controller.set_limiters(vm.rate_limiters());
    controller.set_started();
    controller.set_running_config(&config);
    // The cleanup helper starts once the vCPUs run: its spawn (and on a one-CPU host the
    // shell's start) no longer delays the guest's first instruction. A pvm killed before
    // then leaves its sockets to the stale-socket cleaning.
    let helper = || remove_sockets_at_exit(&config, id, run_dir_api);
    match inbox {
        Some(inbox) => {
            let mut runtime = Runtime { inbox, controller };
            Ok(vm.run_started(Some(&mut runtime), helper)?)
        }
        None => Ok(vm.run_started(None, helper)?),
    }
}

/// Has the VM's sockets (the run directory's ID.sock, the console socket) removed when this
/// process ends; before the main thread's filter goes in (see manage::cleanup).
fn remove_sockets_at_exit(config: &VmConfig, id: &str, run_dir_api: bool) {
    use crate::manage::rundir;
    let api = run_dir_api
        .then(|| rundir::run_dir().ok())
        .flatten()
        .map(|dir| rundir::api_socket(&dir, id));
    let console = config.console_socket.as_ref().map(|s| s.path.clone());
    let paths: Vec<&std::path::Path> = api
        .iter()
        .chain(console.iter())
        .map(|p| p.as_path())
        .collect();
    crate::manage::cleanup::remove_at_exit(&paths);
}

/// The API on the run directory's ID.sock, or None (logged) when it cannot be made.
fn start_run_dir_api(id: &str, sandbox: bool) -> Option<server::ApiInbox> {
    use crate::manage::rundir;
    let claimed = rundir::run_dir().and_then(|dir| {
        rundir::ensure(&dir)?;
        let path = rundir::api_socket(&dir, id);
        rundir::claim(&path)?;
        Ok(path)
    });
    let path = match claimed {
        Ok(path) => path,
        Err(rundir::RunDirError::NoRunDir) => {
            log::info!("no run directory: this VM serves no API (pvm list will not see it)");
            return None;
        }
        Err(e) => {
            log::warn!("{e}; this VM serves no API (pvm list will not see it)");
            return None;
        }
    };
    match server::start(&path, crate::cli::DEFAULT_MAX_PAYLOAD, sandbox) {
        Ok(inbox) => Some(inbox),
        Err(e) => {
            log::warn!("{}; this VM serves no API", crate::exit::error_chain(&e));
            None
        }
    }
}

/// Runs pvm in Firecracker mode: a config file boots at once; otherwise the API configures the
/// VM and InstanceStart boots it. With `--api-sock` the API serves the running VM too.
pub fn run(
    base: VmConfig,
    mode: &FirecrackerMode,
    restore: Option<&vm::RestoreSpec>,
) -> Result<Outcome, RunError> {
    let file = match &mode.config_file {
        Some(path) => Some((path, models::read_config_file(path)?)),
        None => None,
    };
    let inbox = match &mode.api_sock {
        Some(path) => Some(server::start(path, mode.max_payload, base.seccomp)?),
        None if mode.run_dir_api => {
            remove_sockets_at_exit(&base, &mode.id, true);
            start_run_dir_api(&mode.id, base.seccomp)
        }
        None => None,
    };
    if inbox.is_some() {
        // The API is up: how long that took since the jailer started us.
        crate::metrics::record_startup(&mode.startup);
    }
    if let Some(limit) = mode.mmds_size_limit {
        log::info!("--mmds-size-limit {limit}: pvm has no MMDS, so there is nothing to limit");
    }
    let fc = file.as_ref().map(|(_, fc)| fc.clone()).unwrap_or_default();
    let mut controller = Controller::new(mode.id.clone(), base, fc.clone());
    controller.apply_file_sections(&fc)?;
    let vm = match (&file, &inbox) {
        // `--restore` with `--api-sock`: the API serves the restored VM.
        _ if restore.is_some() => {
            let spec = restore.ok_or(RunError::ApiEnded)?;
            let restored = vm::restore_described(&controller.base_config(), spec)?;
            controller.adopt_restored(&restored);
            if let Some(inbox) = &inbox {
                inbox.drive_modes.publish(controller.image_drives());
            }
            restored.vm
        }
        (Some((path, _)), _) => {
            let config = controller.vm_config().map_err(ConfigFileError::from)?;
            if config.kernel.is_none() {
                return Err(RunError::NoKernel(path.to_path_buf()));
            }
            controller.set_started();
            controller.set_running_config(&config);
            if let Some(inbox) = &inbox {
                // Requests wait until the VM runs; a PATCH /drives meanwhile has its new file
                // opened by the API thread already.
                inbox.drive_modes.publish(controller.image_drives());
            }
            let vm = vm::build(&config)?;
            controller.set_limiters(vm.rate_limiters());
            vm
        }
        (None, Some(inbox)) => {
            controller::serve_until_start(inbox, &mut controller).ok_or(RunError::ApiEnded)?
        }
        // The command line makes Firecracker mode out of one of the two.
        (None, None) => return Err(RunError::ApiEnded),
    };
    match inbox {
        Some(inbox) => {
            let mut runtime = Runtime { inbox, controller };
            Ok(vm.run_with(Some(&mut runtime))?)
        }
        None => Ok(vm.run()?),
    }
}

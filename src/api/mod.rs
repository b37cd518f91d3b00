//! Firecracker's control plane for pvm: its JSON models ([`models`]) mapped onto
//! [`crate::config::VmConfig`], for the config file and for the HTTP API on a Unix socket.

pub mod models;

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
    ConfigFile(#[from] models::ConfigFileError),
    #[error("--config-file {0}: boot-source is missing (or give --kernel)")]
    NoKernel(std::path::PathBuf),
    #[error("--api-sock {0}: the API is not served yet")]
    NoApiYet(std::path::PathBuf),
}

impl RunError {
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Vm(e) => e.exit_code(),
            RunError::ConfigFile(_) | RunError::NoKernel(_) | RunError::NoApiYet(_) => USAGE_ERROR,
        }
    }
}

/// Runs pvm in Firecracker mode: configured from `mode`'s config file (booting at once) or,
/// with `--api-sock`, through the API.
pub fn run(base: VmConfig, mode: &FirecrackerMode) -> Result<Outcome, RunError> {
    if let Some(sock) = &mode.api_sock {
        return Err(RunError::NoApiYet(sock.clone()));
    }
    let Some(path) = &mode.config_file else {
        return Err(RunError::NoKernel(std::path::PathBuf::new()));
    };
    let file = models::read_config_file(path)?;
    let config = file
        .to_vm_config(&base)
        .map_err(models::ConfigFileError::from)?;
    if config.kernel.is_none() {
        return Err(RunError::NoKernel(path.clone()));
    }
    Ok(vm::build(&config)?.run()?)
}

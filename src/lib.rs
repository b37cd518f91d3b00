//! pvm: a virtio-first KVM virtual machine monitor.
//!
//! Data flows one way: [`cli`] (clap, no KVM) produces a validated [`config::VmConfig`];
//! [`vm::Vm::build`] turns it into memory, irqchip, devices, boot state and vCPUs in an explicit
//! order; [`vm::Vm::run`] runs until the guest ends and reports how it ended as an [`exit::Outcome`].

pub mod api;
pub mod balloon;
pub mod boot;
pub mod bus;
pub mod cli;
pub mod cloud_init;
pub mod config;
pub mod cpuid;
pub mod devices;
pub mod exit;
pub mod irq_routing;
pub mod kvm_host;
pub mod layout;
pub mod logger;
pub mod manage;
pub mod memfd;
pub mod memory;
pub mod memory_map;
pub mod metrics;
pub mod pci;
pub mod sandbox;
pub mod seccomp;
pub mod snapshot;
pub mod terminal;
pub mod uffd;
pub mod vcpu;
pub mod virtio_devices;
pub mod vm;

use std::ffi::OsString;

/// Runs pvm with the given process arguments and returns the process exit code.
pub fn main_with_args<I: IntoIterator<Item = OsString>>(args: I) -> i32 {
    if sandbox::guest_init::is_guest_init() {
        sandbox::guest_init::run();
    }
    let _ = devices::boot_timer::PROCESS_START.set(std::time::Instant::now());
    let mut launch = match cli::parse_invocation(args) {
        Ok(cli::Invocation::Run(launch)) => *launch,
        Ok(cli::Invocation::Manage(command)) => {
            logger::init(log::LevelFilter::Warn);
            return manage::run(command);
        }
        Err(cli::CliExit::Message(code, text)) => {
            // --help and --version go to stdout with code 0; usage errors to stderr with 2.
            if code == 0 {
                // Not print!, which panics on a closed pipe (`pvm --help | true`).
                let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
            } else {
                logger::to_stderr(&text);
            }
            return code;
        }
    };
    logger::init(launch.config.log_level);
    devices::boot_timer::phase("command line parsed");
    if let Err(cli::CliExit::Message(code, text)) = cli::sandbox_refusal(&launch) {
        logger::to_stderr(&text);
        return code;
    }
    // Kept open until pvm ends: the config names the sandbox's initramfs by this descriptor.
    let _initramfs = match &launch.sandbox {
        Some(spec) => match sandbox::prepare(&mut launch.config, spec) {
            Ok(file) => Some(file),
            Err(err) => {
                logger::to_stderr(&format!("pvm: {}\n", exit::error_chain(&err)));
                return err.exit_code();
            }
        },
        None => None,
    };
    let in_sandbox = launch.sandbox.is_some();
    let config = &launch.config;
    // In Firecracker mode the log lines carry the instance's --id, as Firecracker's do.
    let instance_id = launch
        .firecracker
        .as_ref()
        .map_or(logger::DEFAULT_INSTANCE_ID, |mode| mode.id.as_str());
    if let Err(err) = logger::configure(&config.logger, instance_id) {
        logger::to_stderr(&format!(
            "pvm: --log-path: {}
",
            exit::error_chain(&err)
        ));
        return exit::USAGE_ERROR;
    }
    if let Some(path) = &config.metrics_path {
        if let Err(err) = metrics::init(path) {
            logger::to_stderr(&format!(
                "pvm: --metrics-path: {}
",
                exit::error_chain(&err)
            ));
            return exit::USAGE_ERROR;
        }
    }
    let result = match (launch.firecracker, launch.restore) {
        (Some(mode), restore) => api::run(launch.config, &mode, restore.as_ref()),
        (None, Some(restore)) => vm::restore(&launch.config, &restore)
            .and_then(vm::Vm::run)
            .map_err(api::RunError::Vm),
        (None, None) => api::run_native(launch.config, &launch.id, launch.run_dir_api),
    };
    match result {
        Ok(outcome) => {
            let outcome = if in_sandbox {
                sandbox::outcome(outcome)
            } else {
                outcome
            };
            if let Some(message) = outcome.message() {
                logger::to_stderr(&format!("pvm: {message}\n"));
            }
            outcome.exit_code()
        }
        Err(err) => {
            logger::to_stderr(&format!("pvm: {}\n", exit::error_chain(&err)));
            err.exit_code()
        }
    }
}

use super::*;
use crate::api::models::tests::base;
use crate::api::models::{BootSource, MachineConfigUpdate};
use crate::devices::IrqTrigger;
use crate::devices::i8042::I8042;
use crate::exit::{EndSignal, Outcome};
use crate::vm::{Pauser, RunControl};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

fn controller() -> Controller {
    Controller::new("vm1".to_string(), base(), FcConfig::default())
}

/// Runs `f` with a running VM's control handles (no vCPUs, no devices).
fn with_running_vm(f: impl FnOnce(&mut RunningVm<'_, '_>)) {
    let end = Arc::new(EndSignal::new().unwrap());
    let keyboard = keyboard(&end);
    let mut pauser = Pauser::new(Arc::new(RunControl::default()), &[], &[]);
    f(&mut RunningVm {
        end: &end,
        keyboard: &keyboard,
        pauser: &mut pauser,
    });
}

/// The VM's keyboard controller, its interrupt going nowhere.
fn keyboard(end: &Arc<EndSignal>) -> Mutex<I8042> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    Mutex::new(I8042::new(end.clone(), IrqTrigger(irq)))
}

fn fault_of(response: &Response) -> String {
    assert_eq!(response.status, 400, "{response:?}");
    response.body.clone().unwrap()
}

#[test]
fn preboot_configuration_and_refusals() {
    let mut c = controller();
    let (info, _) = c.preboot(Action::GetInstanceInfo);
    assert_eq!(
        info.body.unwrap(),
        r#"{"id":"vm1","state":"Not started","vmm_version":"0.1.0","app_name":"pvm"}"#
    );
    let (start, vm) = c.preboot(Action::InstanceStart);
    assert!(vm.is_none());
    assert!(fault_of(&start).contains("PUT /boot-source first"));
    // A refused PUT changes nothing.
    let (put, _) = c.preboot(Action::PutBootSource(BootSource {
        kernel_image_path: "/nonexistent".into(),
        initrd_path: None,
        boot_args: None,
    }));
    assert!(fault_of(&put).contains("/nonexistent"));
    assert!(c.fc.boot_source.is_none());
    let (patch, _) = c.preboot(Action::PatchMachineConfig(MachineConfigUpdate {
        mem_size_mib: Some(256),
        ..Default::default()
    }));
    assert_eq!(patch.status, 204);
    let (bad, _) = c.preboot(Action::PatchMachineConfig(MachineConfigUpdate {
        vcpu_count: Some(0),
        ..Default::default()
    }));
    assert!(fault_of(&bad).contains("vcpu_count"));
    let (machine, _) = c.preboot(Action::GetMachineConfig);
    assert!(machine.body.unwrap().contains(r#""mem_size_mib":256"#));
    for action in [
        Action::SendCtrlAltDel,
        Action::FlushMetrics,
        Action::Pause,
        Action::Resume,
    ] {
        let (response, _) = c.preboot(action);
        assert!(fault_of(&response).contains(BEFORE_START));
    }
    assert!(!c.started());
}

#[test]
fn runtime_refuses_preboot_calls_and_ends_on_ctrl_alt_del() {
    let mut c = controller();
    c.set_started();
    let end = Arc::new(EndSignal::new().unwrap());
    let keyboard = keyboard(&end);
    let mut pauser = Pauser::new(Arc::new(RunControl::default()), &[], &[]);
    let mut vm = RunningVm {
        end: &end,
        keyboard: &keyboard,
        pauser: &mut pauser,
    };
    let info = c.runtime(Action::GetInstanceInfo, &mut vm);
    assert!(info.body.unwrap().contains(r#""state":"Running""#));
    for action in [
        Action::InstanceStart,
        Action::PutEntropy(Default::default()),
        Action::PatchMachineConfig(MachineConfigUpdate {
            vcpu_count: Some(2),
            ..Default::default()
        }),
    ] {
        assert!(fault_of(&c.runtime(action, &mut vm)).contains(AFTER_START));
    }
    assert!(fault_of(&c.runtime(Action::FlushMetrics, &mut vm)).contains("not configured"));
    // PATCH /vm: paused, reported, idempotent, resumed.
    assert_eq!(c.runtime(Action::Pause, &mut vm).status, 204);
    assert_eq!(c.runtime(Action::Pause, &mut vm).status, 204);
    let info = c.runtime(Action::GetInstanceInfo, &mut vm);
    assert!(info.body.unwrap().contains(r#""state":"Paused""#));
    assert_eq!(c.runtime(Action::Resume, &mut vm).status, 204);
    assert!(!vm.is_paused());
    assert_eq!(end.outcome(), None);
    // No driver ever programmed the controller: the keys could not be read; reset instead.
    assert_eq!(c.runtime(Action::SendCtrlAltDel, &mut vm).status, 204);
    assert_eq!(end.outcome(), Some(Outcome::Reboot));
}

#[test]
fn ctrl_alt_del_is_typed_once_the_guest_has_a_keyboard_driver() {
    use crate::bus::BusDevice;
    let mut c = controller();
    c.set_started();
    let end = Arc::new(EndSignal::new().unwrap());
    let keyboard = keyboard(&end);
    // The driver writes the CTR (command 0x60 on port 0x64, the byte on 0x60).
    keyboard.lock().unwrap().write(4, &[0x60]);
    keyboard.lock().unwrap().write(0, &[0x01]);
    let mut pauser = Pauser::new(Arc::new(RunControl::default()), &[], &[]);
    let mut vm = RunningVm {
        end: &end,
        keyboard: &keyboard,
        pauser: &mut pauser,
    };
    assert_eq!(c.runtime(Action::SendCtrlAltDel, &mut vm).status, 204);
    assert_eq!(
        end.outcome(),
        None,
        "the guest decides what Ctrl-Alt-Del does"
    );
    let mut first = [0];
    keyboard.lock().unwrap().read(0, &mut first);
    assert_eq!(first, [0x14], "left Ctrl pressed");
    // A guest that never reads its keyboard: the queue fills and the call says so.
    let fault = loop {
        let response = c.runtime(Action::SendCtrlAltDel, &mut vm);
        if response.status != 204 {
            break fault_of(&response);
        }
    };
    assert!(fault.contains("keyboard queue is full"), "{fault}");
    assert_eq!(end.outcome(), None);
}

#[test]
fn patch_changes_the_running_devices_rate_limits() {
    use crate::api::models::{PartialDrive, PartialNetworkInterface, RateLimiter, TokenBucket};
    use pvm_virtio::{RateLimit, SharedLimiter};

    let config: FcConfig = serde_json::from_str(
        r#"{"drives": [{"drive_id": "sock", "socket": "/tmp/x.sock", "is_root_device": false},
                       {"drive_id": "d", "path_on_host": "/tmp/d.img", "is_root_device": false,
                        "rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}}],
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"},
                                   {"iface_id": "eth1", "host_dev_name": "tap1"}]}"#,
    )
    .unwrap();
    let mut c = Controller::new("vm1".to_string(), base(), config);
    // Before boot PATCH is refused, as in Firecracker.
    let patch_d = |rate_limiter| {
        Action::PatchDrive(PartialDrive {
            drive_id: "d".to_string(),
            path_on_host: None,
            rate_limiter,
        })
    };
    let (early, _) = c.preboot(patch_d(None));
    assert!(fault_of(&early).contains(BEFORE_START));
    c.set_started();
    let unlimited = || SharedLimiter::new(RateLimit::default());
    let disk = unlimited();
    let (rx, tx) = (unlimited(), unlimited());
    c.set_limiters(DeviceLimiters {
        disks: vec![disk.clone()],
        // eth0 in-process, eth1 on vhost-net.
        taps: vec![Some((rx.clone(), tx.clone())), None],
        ..Default::default()
    });
    let end = Arc::new(EndSignal::new().unwrap());
    let keyboard = keyboard(&end);
    let mut pauser = Pauser::new(Arc::new(RunControl::default()), &[], &[]);
    let mut vm = RunningVm {
        end: &end,
        keyboard: &keyboard,
        pauser: &mut pauser,
    };
    let bucket = |size| TokenBucket {
        size,
        one_time_burst: None,
        refill_time: 1000,
    };
    // A new bandwidth bucket; the ops bucket configured at PUT stays.
    let bandwidth = RateLimiter {
        bandwidth: Some(bucket(4096)),
        ops: None,
    };
    assert_eq!(c.runtime(patch_d(Some(bandwidth)), &mut vm).status, 204);
    let limit = disk.limit().unwrap();
    assert_eq!(limit.bandwidth.unwrap().size, 4096);
    assert_eq!(limit.ops.unwrap().size, 100);
    let config = c.runtime(Action::GetVmConfig, &mut vm).body.unwrap();
    assert!(
        config.contains(r#""refill_time":1000,"size":4096"#),
        "{config}"
    );

    let patch_i = |iface: &str, size| {
        Action::PatchNetworkInterface(PartialNetworkInterface {
            iface_id: iface.to_string(),
            rx_rate_limiter: None,
            tx_rate_limiter: Some(RateLimiter {
                bandwidth: None,
                ops: Some(bucket(size)),
            }),
        })
    };
    assert_eq!(c.runtime(patch_i("eth0", 10), &mut vm).status, 204);
    assert_eq!(tx.limit().unwrap().ops.unwrap().size, 10);
    assert_eq!(rx.limit(), None);
    // Size 0 lifts the limit again.
    assert_eq!(c.runtime(patch_i("eth0", 0), &mut vm).status, 204);
    assert_eq!(tx.limit(), None);

    let e = fault_of(&c.runtime(patch_i("eth1", 10), &mut vm));
    assert!(
        e.contains("Network interface error: eth1: the kernel's vhost-net"),
        "{e}"
    );
    assert!(fault_of(&c.runtime(patch_i("eth9", 10), &mut vm)).contains("no device with id eth9"));
    let mut sock = patch_d(Some(RateLimiter {
        bandwidth: Some(bucket(1)),
        ops: None,
    }));
    if let Action::PatchDrive(p) = &mut sock {
        p.drive_id = "sock".to_string();
    }
    assert!(fault_of(&c.runtime(sock, &mut vm)).contains("vhost-user"));
    // A file the API thread did not open: the drive has no device in this VM.
    let file = Action::PatchDrive(PartialDrive {
        drive_id: "d".to_string(),
        path_on_host: Some("/tmp/other.img".to_string()),
        rate_limiter: None,
    });
    let e = fault_of(&c.runtime(file, &mut vm));
    assert!(
        e.contains("Drive config error: d: the running VM has no such"),
        "{e}"
    );
}

fn file_id(tmp: &vmm_sys_util::tempfile::TempFile) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let meta = tmp.as_file().metadata().unwrap();
    (meta.dev(), meta.ino())
}

#[test]
fn patch_path_on_host_swaps_the_running_disk_and_tells_the_guest() {
    use crate::api::models::PartialDrive;
    use crate::api::swap::{self, OpenedDisk};
    use crate::virtio_devices::PausableDevice;
    use pvm_virtio::{Block, MmioTransport};
    use std::os::unix::fs::FileExt;
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;
    use vmm_sys_util::tempfile::TempFile;

    let image = |sectors: usize| {
        let tmp = TempFile::new().unwrap();
        tmp.as_file()
            .write_all_at(&vec![7; sectors * 512], 0)
            .unwrap();
        tmp
    };
    let (old, new) = (image(8), image(16));
    let config: FcConfig = serde_json::from_str(&format!(
        r#"{{"drives": [{{"drive_id": "sock", "socket": "/tmp/x.sock", "is_root_device": false}},
                        {{"drive_id": "d", "path_on_host": "{}", "is_root_device": false}}]}}"#,
        old.as_path().display()
    ))
    .unwrap();
    let mut c = Controller::new("vm1".to_string(), base(), config);
    c.set_started();
    let path = old.as_path().display().to_string();
    assert_eq!(c.image_drives(), vec![("d".to_string(), false, path)]);
    let block = Block::new(old.as_path(), false, None).unwrap();
    let disk_swap = block.disk_swap();
    c.set_limiters(DeviceLimiters {
        disks: vec![block.rate_limiter()],
        disk_swaps: vec![block.disk_swap()],
        ..Default::default()
    });
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let transport = MmioTransport::new(Box::new(block), memory, irq.try_clone().unwrap()).unwrap();
    let devices = [PausableDevice::mmio("block0", transport)];
    let end = Arc::new(EndSignal::new().unwrap());
    let keyboard = keyboard(&end);
    let mut pauser = Pauser::new(Arc::new(RunControl::default()), &[], &devices);
    let mut vm = RunningVm {
        end: &end,
        keyboard: &keyboard,
        pauser: &mut pauser,
    };
    let patch = |id: &str, path: &TempFile| PartialDrive {
        drive_id: id.to_string(),
        path_on_host: Some(path.as_path().display().to_string()),
        rate_limiter: None,
    };
    let writable = swap::DriveFile {
        read_only: false,
        file: None,
    };
    let opened = |drive| OpenedDisk::new(swap::open(new.as_path(), drive).unwrap());

    // Paused: refused, and the file stays with the action (dropped with it).
    assert_eq!(c.runtime(Action::Pause, &mut vm).status, 204);
    let e = fault_of(&c.runtime(
        Action::SwapDrive(patch("d", &new), opened(writable)),
        &mut vm,
    ));
    assert!(e.contains("d: path_on_host: resume the VM first"), "{e}");
    assert_eq!(c.runtime(Action::Resume, &mut vm).status, 204);
    assert_eq!(irq.read().ok(), None, "no config interrupt yet");

    let swap = Action::SwapDrive(patch("d", &new), opened(writable));
    assert_eq!(c.runtime(swap, &mut vm).status, 204);
    assert_eq!(irq.read().unwrap(), 1, "the guest is told");
    let config = c.runtime(Action::GetVmConfig, &mut vm).body.unwrap();
    assert!(
        config.contains(&*new.as_path().to_string_lossy()),
        "{config}"
    );
    // The new file is the drive's now. This driverless device takes it at activation (a
    // driven one as it resumes: virtio-blk's swap tests).
    assert!(swap::open(new.as_path(), writable).is_err());

    // The host grows the drive's file and PATCHes the same path: the drive's own file is
    // opened again, only to learn the size; its lock stays the drive's.
    let file = OpenedDisk::new(swap::open(new.as_path(), writable).map_or_else(
        |_| {
            let own = swap::DriveFile {
                read_only: false,
                file: Some(file_id(&new)),
            };
            new.as_file().set_len(24 * 512).unwrap();
            swap::open(new.as_path(), own).unwrap()
        },
        |_| panic!("the drive's file was not locked"),
    ));
    assert_eq!(
        c.runtime(Action::SwapDrive(patch("d", &new), file), &mut vm)
            .status,
        204
    );
    assert_eq!(irq.read().unwrap(), 1);
    assert!(swap::open(new.as_path(), writable).is_err());
    assert_eq!(disk_swap.take().unwrap().sectors(), 24);

    // What the API thread did not open: a vhost-user drive, an unknown one.
    let e = fault_of(&c.runtime(Action::PatchDrive(patch("sock", &new)), &mut vm));
    assert!(
        e.contains("Drive config error: sock: path_on_host: a vhost-user"),
        "{e}"
    );
    let e = fault_of(&c.runtime(Action::PatchDrive(patch("x", &new)), &mut vm));
    assert!(e.contains("no device with id x"), "{e}");
}

thread_local! {
    /// What the fake globals were given, per test thread.
    static LOGGERS: std::cell::RefCell<Vec<(LoggerConfig, String)>> = Default::default();
    static METRICS: std::cell::RefCell<Vec<PathBuf>> = Default::default();
}

fn fake_logger(config: &LoggerConfig, id: &str) -> Result<(), crate::logger::Error> {
    if config.log_path.as_deref() == Some(Path::new("/nonexistent/log")) {
        return Err(crate::logger::Error {
            path: PathBuf::from("/nonexistent/log"),
            source: std::io::ErrorKind::NotFound.into(),
        });
    }
    LOGGERS.with(|l| l.borrow_mut().push((config.clone(), id.to_string())));
    Ok(())
}

/// As the real one: once per process (here, per thread).
fn fake_metrics(path: &Path) -> Result<(), crate::metrics::Error> {
    METRICS.with(|m| match m.borrow().first() {
        Some(first) => Err(crate::metrics::Error::AlreadyConfigured {
            path: first.clone(),
        }),
        None => Ok(()),
    })?;
    METRICS.with(|m| m.borrow_mut().push(path.to_path_buf()));
    Ok(())
}

fn faked() -> Controller {
    let mut c = controller();
    c.globals = Globals {
        logger: fake_logger,
        metrics: fake_metrics,
    };
    c
}

#[test]
fn put_logger_applies_at_once_and_keeps_what_is_left_out() {
    use crate::api::models::Logger;
    let mut c = faked();
    let put = |c: &mut Controller, logger: Logger| c.preboot(Action::PutLogger(logger)).0;
    let first = Logger {
        log_path: Some("/tmp/first.log".into()),
        level: Some(log::LevelFilter::Debug),
        show_level: Some(true),
        show_log_origin: None,
        module: None,
    };
    assert_eq!(put(&mut c, first).status, 204);
    // Again before boot: the path and show_level stay, the level goes back to Info.
    let second = Logger {
        show_log_origin: Some(true),
        ..Default::default()
    };
    assert_eq!(put(&mut c, second).status, 204);
    let calls = LOGGERS.with(|l| l.borrow().clone());
    assert_eq!(calls.len(), 2);
    let (config, id) = &calls[1];
    assert_eq!(id, "vm1");
    assert_eq!(
        config.log_path.as_deref(),
        Some(Path::new("/tmp/first.log"))
    );
    assert_eq!(config.level, Some(log::LevelFilter::Info));
    assert!(config.show_level && config.show_log_origin);
    assert_eq!(calls[0].0.level, Some(log::LevelFilter::Debug));

    let module = Logger {
        module: Some("pvm::vm".into()),
        ..Default::default()
    };
    let e = fault_of(&put(&mut c, module));
    assert!(e.contains(r#"Logger error: module \"pvm::vm\""#), "{e}");
    let bad = Logger {
        log_path: Some("/nonexistent/log".into()),
        ..Default::default()
    };
    let e = fault_of(&put(&mut c, bad));
    assert!(
        e.contains("Logger error: ") && e.contains("/nonexistent/log"),
        "{e}"
    );
    // Refusals changed nothing: the next PUT still keeps the first path.
    assert_eq!(put(&mut c, Logger::default()).status, 204);
    let last = LOGGERS.with(|l| l.borrow().last().cloned()).unwrap();
    assert_eq!(
        last.0.log_path.as_deref(),
        Some(Path::new("/tmp/first.log"))
    );
    // GET /vm/config shows no logger or metrics, as Firecracker's.
    let (config, _) = c.preboot(Action::GetVmConfig);
    let config = config.body.unwrap();
    assert!(
        config.contains(r#""logger":null"#) && config.contains(r#""metrics":null"#),
        "{config}"
    );
}

#[test]
fn put_metrics_once_with_firecrackers_error_after() {
    use crate::api::models::Metrics;
    let mut c = faked();
    let metrics = |path: &str| Metrics {
        metrics_path: path.to_string(),
        emit_id: false,
        properties: None,
    };
    let with_id = Metrics {
        emit_id: true,
        ..metrics("/tmp/m")
    };
    assert!(fault_of(&c.preboot(Action::PutMetrics(with_id)).0).contains("emit_id"));
    let with_properties = Metrics {
        properties: Some([("a".to_string(), "b".to_string())].into()),
        ..metrics("/tmp/m")
    };
    assert!(fault_of(&c.preboot(Action::PutMetrics(with_properties)).0).contains("properties"));
    assert_eq!(
        c.preboot(Action::PutMetrics(metrics("/tmp/m"))).0.status,
        204
    );
    let again = c.preboot(Action::PutMetrics(metrics("/tmp/other"))).0;
    assert_eq!(
        fault_of(&again),
        format!(r#"{{"fault_message":"{METRICS_AGAIN}"}}"#)
    );
    assert_eq!(
        METRICS.with(|m| m.borrow().clone()),
        vec![PathBuf::from("/tmp/m")]
    );
}

#[test]
fn put_serial_maps_onto_the_vm_and_everything_is_refused_after_boot() {
    use crate::api::models::{Logger, Metrics, Serial, TokenBucket};
    let mut c = faked();
    let serial = Serial {
        serial_out_path: Some("/tmp/serial.out".into()),
        rate_limiter: None,
    };
    assert_eq!(c.preboot(Action::PutSerial(serial.clone())).0.status, 204);
    assert_eq!(
        c.vm_config().unwrap().serial_out,
        Some(PathBuf::from("/tmp/serial.out"))
    );
    let limited = Serial {
        rate_limiter: Some(TokenBucket {
            size: 10,
            one_time_burst: None,
            refill_time: 100,
        }),
        ..serial.clone()
    };
    let e = fault_of(&c.preboot(Action::PutSerial(limited)).0);
    assert!(e.contains("Serial config error: rate_limiter"), "{e}");
    // A bucket that limits nothing is honoured as it is.
    let unlimited = Serial {
        rate_limiter: Some(TokenBucket {
            size: 0,
            one_time_burst: None,
            refill_time: 100,
        }),
        ..Serial::default()
    };
    assert_eq!(c.preboot(Action::PutSerial(unlimited)).0.status, 204);
    assert_eq!(c.vm_config().unwrap().serial_out, None);

    c.set_started();
    with_running_vm(|vm| {
        for action in [
            Action::PutSerial(serial),
            Action::PutLogger(Logger::default()),
            Action::PutMetrics(Metrics {
                metrics_path: "/tmp/m".into(),
                emit_id: false,
                properties: None,
            }),
        ] {
            assert!(fault_of(&c.runtime(action, vm)).contains(AFTER_START));
        }
    });
    assert!(LOGGERS.with(|l| l.borrow().is_empty()));
    assert!(METRICS.with(|m| m.borrow().is_empty()));
}

#[test]
fn a_config_files_logger_and_metrics_sections_apply_as_their_puts_would() {
    let mut c = faked();
    let fc: FcConfig = serde_json::from_str(
        r#"{"logger": {"log_path": "/tmp/fc.log", "level": "Debug", "show_level": true},
            "metrics": {"metrics_path": "/tmp/fc.metrics"}}"#,
    )
    .unwrap();
    c.apply_file_sections(&fc).unwrap();
    let (logger, _) = LOGGERS.with(|l| l.borrow().last().cloned()).unwrap();
    assert_eq!(logger.log_path, Some(PathBuf::from("/tmp/fc.log")));
    assert_eq!(logger.level, Some(log::LevelFilter::Debug));
    assert!(logger.show_level);
    assert_eq!(
        METRICS.with(|m| m.borrow().clone()),
        vec![PathBuf::from("/tmp/fc.metrics")]
    );
    // What the API would refuse, the file refuses too, naming the section.
    let mut c = faked();
    let bad: FcConfig = serde_json::from_str(r#"{"logger": {"module": "pvm::vm"}}"#).unwrap();
    let err = c.apply_file_sections(&bad).unwrap_err().to_string();
    assert!(err.starts_with("--config-file: logger: "), "{err}");
    assert!(err.contains("module"), "{err}");
}

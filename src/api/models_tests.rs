use super::mapping::disk_name;
use super::*;
use crate::config::ConsoleKind;
use crate::config::{Transport, VmConfig};
use log::LevelFilter;
use std::path::Path;

/// What `pvm --api-sock` starts from: no devices, Firecracker's default machine, mmio.
pub(crate) fn base() -> VmConfig {
    VmConfig {
        kernel: None,
        initrd: None,
        cmdline: String::new(),
        mem_bytes: 128 << 20,
        cpus: 1,
        disks: Vec::new(),
        taps: Vec::new(),
        vhost_user_disks: Vec::new(),
        vhost_user_nets: Vec::new(),
        rng_limit: Default::default(),
        console: ConsoleKind::Serial,
        transport: Transport::Mmio,
        stats: false,
        boot_timer: false,
        seccomp: false,
        log_level: LevelFilter::Warn,
        logger: Default::default(),
        metrics_path: None,
        serial_out: None,
        balloon: None,
        console_socket: None,
        smt: false,
        huge_pages: Default::default(),
        vsock: None,
        exit_port: false,
        shares: Vec::new(),
        track_dirty_pages: false,
        cloud_init: None,
    }
}

/// A file that exists and opens read-write.
fn scratch(name: &str) -> String {
    let path = std::env::temp_dir().join(format!("pvm-api-{}-{name}", std::process::id()));
    std::fs::write(&path, [0u8; 4096]).unwrap();
    path.display().to_string()
}

fn config(json: &str) -> FcConfig {
    serde_json::from_str(json).unwrap()
}

fn error_of(fc: &FcConfig) -> String {
    fc.to_vm_config(&base()).unwrap_err().to_string()
}

#[test]
fn a_full_config_maps_onto_vm_config() {
    let kernel = scratch("kernel");
    let disk = scratch("disk");
    let fc = config(&format!(
        r#"{{"boot-source": {{"kernel_image_path": "{kernel}", "boot_args": "console=ttyS0 pci=off"}},
            "drives": [{{"drive_id": "rootfs", "path_on_host": "{disk}", "is_root_device": true,
                         "is_read_only": false, "cache_type": "Writeback"}}],
            "machine-config": {{"vcpu_count": 2, "mem_size_mib": 256}},
            "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "tap0",
                                     "guest_mac": "06:00:AC:10:00:02"}}],
            "entropy": {{}},
            "some-future-key": 1}}"#
    ));
    let vm = fc.to_vm_config(&base()).unwrap();
    assert_eq!(vm.cpus, 2);
    assert_eq!(vm.mem_bytes, 256 << 20);
    assert_eq!(vm.kernel.as_deref(), Some(Path::new(&kernel)));
    assert_eq!(vm.disks.len(), 1);
    assert!(vm.disks[0].flush && !vm.disks[0].read_only);
    assert_eq!(vm.disks[0].serial.as_deref(), Some("rootfs"));
    assert_eq!(vm.taps[0].name, "tap0");
    assert_eq!(vm.taps[0].mac, Some([6, 0, 0xac, 0x10, 0, 2]));
    // mmio: pci=off stays.
    assert_eq!(vm.cmdline, "console=ttyS0 pci=off root=/dev/vda rw");
    let mut on_pci = base();
    on_pci.transport = Transport::Pci;
    let vm = fc.to_vm_config(&on_pci).unwrap();
    assert_eq!(vm.cmdline, "console=ttyS0 root=/dev/vda rw");
}

#[test]
fn root_device_names_and_defaults() {
    let kernel = scratch("kernel2");
    let a = scratch("a");
    let b = scratch("b");
    let fc = config(&format!(
        r#"{{"boot-source": {{"kernel_image_path": "{kernel}"}},
            "drives": [{{"drive_id": "data", "path_on_host": "{a}", "is_root_device": false}},
                       {{"drive_id": "root", "path_on_host": "{b}", "is_root_device": true,
                         "is_read_only": true, "partuuid": "1234-01"}}]}}"#
    ));
    let vm = fc.to_vm_config(&base()).unwrap();
    assert_eq!(
        vm.cmdline,
        format!("{DEFAULT_BOOT_ARGS} root=PARTUUID=1234-01 ro")
    );
    // cache_type defaults to Unsafe: no flush offered.
    assert!(!vm.disks[0].flush);
    let mut fc = fc;
    fc.drives[1].partuuid = None;
    assert!(
        fc.to_vm_config(&base())
            .unwrap()
            .cmdline
            .ends_with("root=/dev/vdb ro")
    );
    assert_eq!(disk_name(0), "vda");
    assert_eq!(disk_name(27), "vdab");
}

#[test]
fn refused_fields_are_named() {
    let disk = scratch("refused");
    let drive = |extra: &str| {
        config(&format!(
            r#"{{"drives": [{{"drive_id": "d", "path_on_host": "{disk}", "is_root_device": false{extra}}}]}}"#
        ))
    };
    // io_engine Async is pvm's io_uring engine, and GET /vm/config says so; a vhost-user
    // backend has no engine of pvm's.
    let fc = drive(r#", "io_engine": "Async""#);
    assert_eq!(fc.to_json(&base())["drives"][0]["io_engine"], "Async");
    let vm = fc.to_vm_config(&base()).unwrap();
    assert_eq!(
        vm.disks[0].options.engine,
        pvm_virtio::block::IoEngine::IoUring
    );
    let vm = drive(r#", "io_engine": "Sync""#)
        .to_vm_config(&base())
        .unwrap();
    assert_eq!(
        vm.disks[0].options.engine,
        pvm_virtio::block::IoEngine::Sync
    );
    let e = error_of(&config(
        r#"{"drives": [{"drive_id": "d", "socket": "/tmp/x.sock", "is_root_device": false,
                        "io_engine": "Async"}]}"#,
    ));
    assert!(e.contains("d"), "{e}");
    // A vhost-user backend moves the data itself: pvm could not enforce a limit.
    let e = error_of(&config(
        r#"{"drives": [{"drive_id": "d", "socket": "/tmp/x.sock", "is_root_device": false,
                        "rate_limiter": {"ops": {"size": 10, "refill_time": 1000}}}]}"#,
    ));
    assert!(
        e.starts_with("Drive config error: rate_limiter") && e.contains("vhost-user"),
        "{e}"
    );
    let e = error_of(&drive(r#", "socket": "/tmp/x.sock""#));
    assert!(e.contains("path_on_host or socket"), "{e}");
    let machine = |body: &str| config(&format!(r#"{{"machine-config": {body}}}"#));
    for (body, field) in [
        (
            r#"{"vcpu_count": 3, "mem_size_mib": 128, "smt": true}"#,
            "1 or even with smt",
        ),
        (
            r#"{"vcpu_count": 1, "mem_size_mib": 129, "huge_pages": "2M"}"#,
            "2 MiB huge pages",
        ),
        (
            r#"{"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "Transparent"}"#,
            "huge_pages Transparent",
        ),
        (
            r#"{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2"}"#,
            "cpu_template",
        ),
        (r#"{"vcpu_count": 0, "mem_size_mib": 128}"#, "vcpu_count"),
        (r#"{"vcpu_count": 33, "mem_size_mib": 128}"#, "vcpu_count"),
        (r#"{"vcpu_count": 1, "mem_size_mib": 0}"#, "mem_size_mib"),
    ] {
        let e = error_of(&machine(body));
        assert!(
            e.starts_with("Machine config error: ") && e.contains(field),
            "{body}: {e}"
        );
    }
    let iface = |extra: &str| {
        config(&format!(
            r#"{{"network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "tap0"{extra}}}]}}"#
        ))
    };
    assert!(error_of(&iface(r#", "mtu": 1400"#)).contains("mtu"));
    assert!(error_of(&iface(r#", "guest_mac": "zz:00:00:00:00:00""#)).contains("guest_mac"));
}

#[test]
fn vsock_maps_onto_the_device_and_shows_in_the_config() {
    use crate::config::{VsockBackend, VsockSpec};
    let free = std::env::temp_dir().join(format!("pvm-api-vsock-{}.sock", std::process::id()));
    let body = |cid: u32, path: &str| {
        format!(r#"{{"vsock": {{"vsock_id": "v", "guest_cid": {cid}, "uds_path": "{path}"}}}}"#)
    };
    let fc = config(&body(3, free.to_str().unwrap()));
    let vm = fc.to_vm_config(&base()).unwrap();
    assert_eq!(
        vm.vsock,
        Some(VsockSpec {
            cid: 3,
            backend: VsockBackend::Unix(free.clone())
        })
    );
    let json = fc.to_json(&base());
    assert_eq!(json["vsock"]["guest_cid"], 3);
    assert_eq!(json["vsock"]["uds_path"], free.to_str().unwrap());
    assert_eq!(json["vsock"]["vsock_id"], "v");
    for (cid, path, why) in [
        (2, free.to_str().unwrap(), "guest_cid 2"),
        (u32::MAX, free.to_str().unwrap(), "guest_cid"),
        (3, "", "uds_path"),
        (3, "/", "exists already"),
    ] {
        let e = error_of(&config(&body(cid, path)));
        assert!(
            e.starts_with("Vsock config error: ") && e.contains(why),
            "{e}"
        );
    }
    // --vsock shows as the API would have set it; vhost=on has no API shape.
    let mut flagged = base();
    flagged.vsock = Some(VsockSpec {
        cid: 9,
        backend: VsockBackend::Unix("/run/v.sock".into()),
    });
    let json = config("{}").to_json(&flagged);
    assert_eq!(json["vsock"]["guest_cid"], 9);
    assert_eq!(json["vsock"]["uds_path"], "/run/v.sock");
    flagged.vsock.as_mut().unwrap().backend = VsockBackend::Vhost;
    assert!(config("{}").to_json(&flagged)["vsock"].is_null());
}

#[test]
fn smt_and_huge_pages_map_onto_vm_config() {
    let vm = config(
        r#"{"machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": true,
                               "huge_pages": "2M"}}"#,
    )
    .to_vm_config(&base())
    .unwrap();
    assert!(vm.smt);
    assert_eq!(vm.huge_pages, crate::config::GuestPages::Huge2M);
    // GET /machine-config shows them back.
    let machine = MachineConfig::from_vm_config(&vm);
    assert!(machine.smt);
    assert_eq!(machine.huge_pages, HugePages::Huge2M);
    // A lone vCPU may say smt (it has no sibling), as in Firecracker.
    let one = config(r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "smt": true}}"#);
    assert!(one.to_vm_config(&base()).is_ok());
    let plain = config(r#"{"machine-config": {"vcpu_count": 2, "mem_size_mib": 128}}"#)
        .to_vm_config(&base())
        .unwrap();
    assert!(!plain.smt);
    assert_eq!(plain.huge_pages, crate::config::GuestPages::Normal);
}

#[test]
fn rate_limiters_map_onto_the_devices() {
    use pvm_virtio::{BucketConfig, RateLimit};
    use std::time::Duration;

    let disk = scratch("limited");
    let fc = config(&format!(
        r#"{{"drives": [{{"drive_id": "d", "path_on_host": "{disk}", "is_root_device": false,
                          "rate_limiter": {{"bandwidth": {{"size": 1000, "one_time_burst": 50,
                                                          "refill_time": 100}},
                                            "ops": {{"size": 0, "refill_time": 100}}}}}}],
            "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "tap0",
                "tx_rate_limiter": {{"ops": {{"size": 10, "refill_time": 1000}}}}}}],
            "entropy": {{"rate_limiter": {{"bandwidth": {{"size": 1, "refill_time": 1}}}}}}}}"#
    ));
    let vm = fc.to_vm_config(&base()).unwrap();
    let bucket = |size, one_time_burst, ms| {
        Some(BucketConfig {
            size,
            one_time_burst,
            refill_time: Duration::from_millis(ms),
        })
    };
    // A bucket of size 0 limits nothing and is left out.
    assert_eq!(
        vm.disks[0].limit,
        RateLimit {
            bandwidth: bucket(1000, 50, 100),
            ops: None
        }
    );
    assert_eq!(vm.taps[0].tx_limit.ops, bucket(10, 0, 1000));
    assert!(!vm.taps[0].rx_limit.is_enabled());
    assert_eq!(vm.rng_limit.bandwidth, bucket(1, 0, 1));
    // GET /vm/config shows them as configured.
    let json = fc.to_json(&base());
    assert_eq!(
        json["drives"][0]["rate_limiter"]["bandwidth"]["one_time_burst"],
        50
    );
    assert_eq!(
        json["network-interfaces"][0]["tx_rate_limiter"]["ops"]["size"],
        10
    );
    assert_eq!(
        json["entropy"]["rate_limiter"]["bandwidth"]["refill_time"],
        1
    );
}

#[test]
fn conflicts_between_devices() {
    let a = scratch("ca");
    let b = scratch("cb");
    let two_roots = config(&format!(
        r#"{{"drives": [{{"drive_id": "a", "path_on_host": "{a}", "is_root_device": true}},
                        {{"drive_id": "b", "path_on_host": "{b}", "is_root_device": true}}]}}"#
    ));
    assert!(error_of(&two_roots).contains("root block device already exists"));
    let same_mac = config(
        r#"{"network-interfaces": [
            {"iface_id": "a", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01"},
            {"iface_id": "b", "host_dev_name": "tap1", "guest_mac": "06:00:00:00:00:01"}]}"#,
    );
    assert!(error_of(&same_mac).contains("already used"));
    let missing = config(r#"{"boot-source": {"kernel_image_path": "/nonexistent/vmlinux"}}"#);
    assert!(error_of(&missing).contains("/nonexistent/vmlinux"));
}

#[test]
fn bodies_refuse_unknown_fields_and_wrong_types() {
    for (json, what) in [
        (
            r#"{"kernel_image_path": "k", "bogus": 1}"#,
            "unknown field `bogus`",
        ),
        (r#"{"kernel_image_path": 5}"#, "invalid type"),
        (r#"{"boot_args": "x"}"#, "missing field `kernel_image_path`"),
    ] {
        let e = serde_json::from_str::<BootSource>(json)
            .unwrap_err()
            .to_string();
        assert!(e.contains(what), "{json}: {e}");
    }
    let e = serde_json::from_str::<MachineConfig>(r#"{"vcpu_count": 300, "mem_size_mib": 1}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("300"), "{e}");
    let e = serde_json::from_str::<Drive>(
        r#"{"drive_id": "a", "is_root_device": false, "cache_type": "Fast"}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("unknown variant `Fast`"), "{e}");
}

#[test]
fn machine_patch_and_put_replace() {
    let patch: MachineConfigUpdate = serde_json::from_str(r#"{"mem_size_mib": 512}"#).unwrap();
    let machine = patch.apply(&MachineConfig::from_vm_config(&base()));
    assert_eq!((machine.vcpu_count, machine.mem_size_mib), (1, 512));
    assert!(
        serde_json::from_str::<MachineConfigUpdate>("{}")
            .unwrap()
            .is_empty()
    );
    let mut fc = FcConfig::default();
    let drive = |path: &str| Drive {
        drive_id: "d".into(),
        is_root_device: false,
        partuuid: None,
        cache_type: CacheType::Unsafe,
        is_read_only: None,
        path_on_host: Some(path.into()),
        rate_limiter: None,
        io_engine: None,
        socket: None,
    };
    fc.put_drive(drive("/a"));
    fc.put_drive(drive("/b"));
    assert_eq!(fc.drives.len(), 1);
    assert_eq!(fc.drives[0].path_on_host.as_deref(), Some("/b"));
    let json = fc.to_json(&base());
    assert_eq!(json["machine-config"]["mem_size_mib"], 128);
    assert_eq!(json["drives"][0]["path_on_host"], "/b");
    assert!(json["vsock"].is_null());
}

#[test]
fn track_dirty_pages_reaches_the_vm_and_its_machine_config() {
    let fc = config(
        r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "track_dirty_pages": true}}"#,
    );
    let vm = fc.to_vm_config(&base()).unwrap();
    assert!(vm.track_dirty_pages);
    assert!(MachineConfig::from_vm_config(&vm).track_dirty_pages);
    let fc = config(r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}"#);
    assert!(!fc.to_vm_config(&base()).unwrap().track_dirty_pages);
}

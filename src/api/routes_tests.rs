use super::*;

fn request(method: Method, path: &str, body: &str) -> Request {
    Request {
        method,
        path: path.to_string(),
        body: body.as_bytes().to_vec(),
        close: false,
        expect_continue: false,
    }
}

fn fault(method: Method, path: &str, body: &str) -> String {
    route(&request(method, path, body)).unwrap_err().to_string()
}

#[test]
fn every_endpoint_routes() {
    use Method::*;
    for (method, path, body, want) in [
        (Get, "/", "", Action::GetInstanceInfo),
        (Get, "/version", "", Action::GetVersion),
        (Get, "/machine-config", "", Action::GetMachineConfig),
        (Get, "/vm/config", "", Action::GetVmConfig),
        (
            Put,
            "/actions",
            r#"{"action_type":"InstanceStart"}"#,
            Action::InstanceStart,
        ),
        (
            Put,
            "/actions",
            r#"{"action_type":"SendCtrlAltDel"}"#,
            Action::SendCtrlAltDel,
        ),
        (
            Put,
            "/actions",
            r#"{"action_type":"FlushMetrics"}"#,
            Action::FlushMetrics,
        ),
        (Patch, "/vm", r#"{"state":"Paused"}"#, Action::Pause),
        (Patch, "/vm", r#"{"state":"Resumed"}"#, Action::Resume),
        (
            Put,
            "/entropy",
            "{}",
            Action::PutEntropy(Default::default()),
        ),
    ] {
        assert_eq!(route(&request(method, path, body)).unwrap(), want, "{path}");
    }
    let drive = route(&request(
        Put,
        "/drives/root_1",
        r#"{"drive_id":"root_1","is_root_device":true,"path_on_host":"/x"}"#,
    ))
    .unwrap();
    assert!(matches!(drive, Action::PutDrive(d) if d.is_root_device));
    let iface = route(&request(
        Put,
        "/network-interfaces/eth0",
        r#"{"iface_id":"eth0","host_dev_name":"tap0"}"#,
    ))
    .unwrap();
    assert!(matches!(iface, Action::PutNetworkInterface(i) if i.host_dev_name == "tap0"));
    let patch = route(&request(Patch, "/machine-config", r#"{"vcpu_count":2}"#)).unwrap();
    assert!(matches!(patch, Action::PatchMachineConfig(p) if p.vcpu_count == Some(2)));
}

#[test]
fn bad_requests_get_firecrackers_messages() {
    use Method::*;
    assert_eq!(fault(Put, "/boot-source", ""), "Empty PUT request.");
    assert_eq!(fault(Patch, "/nowhere", ""), "Empty PATCH request.");
    assert_eq!(fault(Get, "/", "x"), "GET request cannot have a body.");
    assert_eq!(
        fault(Patch, "/machine-config", "{}"),
        "Empty PATCH request."
    );
    assert_eq!(
        fault(Get, "/nowhere/x", ""),
        "Invalid request method and/or path: GET nowhere."
    );
    assert_eq!(
        fault(Get, "/vm", ""),
        "Invalid request method and/or path: GET vm."
    );
    assert_eq!(fault(Put, "/drives", "{}"), "The ID cannot be empty.");
    assert_eq!(fault(Put, "/drives/", "{}"), "The ID cannot be empty.");
    assert!(fault(Put, "/drives/a-b", "{}").contains("alphanumeric"));
    let e = fault(
        Put,
        "/network-interfaces/eth0",
        r#"{"iface_id":"eth1","host_dev_name":"tap0"}"#,
    );
    assert_eq!(
        e,
        "The id from the path [eth0] does not match the id from the body [eth1]!"
    );
    for (body, want) in [
        ("{", "EOF while parsing"),
        ("[]", "invalid length 0"),
        ("\"x\"", "invalid type"),
        (r#"{"action_type":"Reboot"}"#, "unknown variant `Reboot`"),
        (
            r#"{"action_type":"InstanceStart","x":1}"#,
            "unknown field `x`",
        ),
        (r#"{"action_type":7}"#, "expected"),
        ("\u{0}", "expected value"),
    ] {
        let e = fault(Put, "/actions", body);
        assert!(
            e.starts_with("An error occurred when deserializing the json body of a request: ")
                && e.contains(want),
            "{body}: {e}"
        );
    }
    let e = fault(
        Put,
        "/machine-config",
        r#"{"vcpu_count":-1,"mem_size_mib":128}"#,
    );
    assert!(e.contains("invalid value"), "{e}");
}

#[test]
fn unsupported_endpoints_say_so() {
    use Method::*;
    for (method, path) in [
        (Put, "/mmds"),
        (Get, "/mmds"),
        (Put, "/mmds/config"),
        (Put, "/cpu-config"),
        (Put, "/hotplug/memory"),
        (Put, "/pmem/p"),
        (Delete, "/drives/d"),
    ] {
        let body = if method == Get || method == Delete {
            ""
        } else {
            "{}"
        };
        let e = fault(method, path, body);
        assert!(e.contains("pvm does not support"), "{path}: {e}");
    }
}

#[test]
fn snapshot_endpoints_route_to_actions_and_refuse_what_pvm_lacks() {
    use Method::Put;
    let create = route(&request(
        Put,
        "/snapshot/create",
        r#"{"snapshot_type":"Full","snapshot_path":"s","mem_file_path":"m"}"#,
    ))
    .unwrap();
    assert!(matches!(create, Action::CreateSnapshot(_)), "{create:?}");
    let load = route(&request(
        Put,
        "/snapshot/load",
        r#"{"snapshot_path":"s","mem_backend":{"backend_type":"File","backend_path":"m"}}"#,
    ))
    .unwrap();
    assert!(matches!(load, Action::LoadSnapshot(_)), "{load:?}");
    let diff = route(&request(
        Put,
        "/snapshot/create",
        r#"{"snapshot_type":"Diff","snapshot_path":"s","mem_file_path":"m"}"#,
    ))
    .unwrap();
    assert!(matches!(diff, Action::CreateSnapshot(_)), "{diff:?}");
    let e = fault(Put, "/snapshot/other", r#"{"snapshot_path":"s"}"#);
    assert!(e.contains("Invalid request method and/or path"), "{e}");
}

#[test]
fn logger_metrics_and_serial_bodies() {
    use Method::Put;
    let ok = |path: &str, body: &str| route(&request(Put, path, body)).unwrap();
    let logger = |body: &str| match ok("/logger", body) {
        Action::PutLogger(logger) => logger,
        other => panic!("{body}: {other:?}"),
    };
    let l = logger(
        r#"{"log_path":"/tmp/l","level":"Warning","show_level":true,"show_log_origin":false}"#,
    );
    assert_eq!(l.log_path.as_deref(), Some("/tmp/l"));
    assert_eq!(l.level, Some(log::LevelFilter::Warn));
    assert_eq!((l.show_level, l.show_log_origin), (Some(true), Some(false)));
    assert_eq!(l.module, None);
    // Firecracker's level names in any case; everything is optional.
    for (text, level) in [
        ("Error", log::LevelFilter::Error),
        ("warn", log::LevelFilter::Warn),
        ("INFO", log::LevelFilter::Info),
        ("Debug", log::LevelFilter::Debug),
        ("trace", log::LevelFilter::Trace),
        ("Off", log::LevelFilter::Off),
    ] {
        let body = format!(r#"{{"level":"{text}"}}"#);
        assert_eq!(logger(&body).level, Some(level), "{text}");
    }
    assert_eq!(logger("{}"), Logger::default());
    for (body, want) in [
        (r#"{"level":"Loud"}"#, "Loud"),
        (r#"{"level":3}"#, "invalid type"),
        (
            r#"{"log_path":"/l","colour":true}"#,
            "unknown field `colour`",
        ),
        (r#"{"show_level":"yes"}"#, "invalid type"),
    ] {
        let e = fault(Put, "/logger", body);
        assert!(
            e.starts_with("An error occurred when deserializing") && e.contains(want),
            "{body}: {e}"
        );
    }

    match ok("/metrics", r#"{"metrics_path":"/tmp/m","future":1}"#) {
        // Unknown fields pass, as in Firecracker.
        Action::PutMetrics(m) => {
            assert_eq!(m.metrics_path, "/tmp/m");
            assert!(!m.emit_id && m.properties.is_none());
        }
        other => panic!("{other:?}"),
    }
    assert!(fault(Put, "/metrics", "{}").contains("missing field `metrics_path`"));
    assert!(fault(Put, "/metrics", r#"{"metrics_path":1}"#).contains("invalid type"));

    match ok("/serial", r#"{"serial_out_path":"/tmp/s"}"#) {
        Action::PutSerial(s) => assert_eq!(s.serial_out_path.as_deref(), Some("/tmp/s")),
        other => panic!("{other:?}"),
    }
    assert_eq!(ok("/serial", "{}"), Action::PutSerial(Serial::default()));
    assert!(fault(Put, "/serial", r#"{"path":"/x"}"#).contains("unknown field `path`"));
    assert_eq!(fault(Put, "/serial", ""), "Empty PUT request.");
}

#[test]
fn balloon_endpoints_route() {
    use Method::*;
    let ok = |method, path: &str, body: &str| route(&request(method, path, body)).unwrap();
    assert_eq!(
        ok(
            Put,
            "/balloon",
            r#"{"amount_mib":64,"deflate_on_oom":true,"stats_polling_interval_s":1}"#
        ),
        Action::PutBalloon(Balloon {
            amount_mib: 64,
            deflate_on_oom: true,
            stats_polling_interval_s: 1,
            free_page_hinting: false,
            free_page_reporting: false,
        })
    );
    assert_eq!(
        ok(Patch, "/balloon", r#"{"amount_mib":8}"#),
        Action::PatchBalloon(BalloonUpdate { amount_mib: 8 })
    );
    assert_eq!(
        ok(
            Patch,
            "/balloon/statistics",
            r#"{"stats_polling_interval_s":3}"#
        ),
        Action::PatchBalloonStats(BalloonStatsUpdate {
            stats_polling_interval_s: 3
        })
    );
    assert_eq!(ok(Get, "/balloon", ""), Action::GetBalloon);
    assert_eq!(ok(Get, "/balloon/statistics", ""), Action::GetBalloonStats);
    // Free page hinting: acknowledge_on_stop defaults to true, as in Firecracker.
    let start = |acknowledge_on_stop| {
        Action::StartBalloonHinting(BalloonStartCmd {
            acknowledge_on_stop,
        })
    };
    assert_eq!(ok(Patch, "/balloon/hinting/start", "{}"), start(true));
    assert_eq!(
        ok(
            Patch,
            "/balloon/hinting/start",
            r#"{"acknowledge_on_stop":false}"#
        ),
        start(false)
    );
    assert_eq!(
        ok(Patch, "/balloon/hinting/stop", "{}"),
        Action::StopBalloonHinting
    );
    assert_eq!(
        ok(Get, "/balloon/hinting/status", ""),
        Action::GetBalloonHintingStatus
    );
    for (method, path, body) in [
        (
            Patch,
            "/balloon/hinting/start",
            r#"{"acknowledge_on_stop":1}"#,
        ),
        (Patch, "/balloon/hinting/start", r#"{"cmd_id":5}"#),
        (Patch, "/balloon/hinting/stop", r#"{"now":true}"#),
        (Put, "/balloon/hinting/start", "{}"),
        (Get, "/balloon/hinting/start", ""),
        (Patch, "/balloon/hinting/status", "{}"),
        (Get, "/balloon/hinting", ""),
        (Get, "/balloon/hinting/status/x", ""),
    ] {
        fault(method, path, body);
    }
    for (method, path, body) in [
        (Put, "/balloon/statistics", "{}"),
        (Get, "/balloon/other", ""),
        (Get, "/balloon/statistics/x", ""),
        (Delete, "/balloon", ""),
    ] {
        let e = fault(method, path, body);
        assert!(
            e.contains("Invalid request method and/or path"),
            "{path}: {e}"
        );
    }
    for body in [
        r#"{"amount_mib":-1,"deflate_on_oom":false}"#,
        r#"{"amount_mib":4294967296,"deflate_on_oom":false}"#,
        r#"{"amount_mib":1}"#,
        r#"{"amount_mib":1,"deflate_on_oom":false,"size":3}"#,
    ] {
        let e = fault(Put, "/balloon", body);
        assert!(e.contains("deserializing"), "{body}: {e}");
    }
    let e = fault(Patch, "/balloon/statistics", r#"{"amount_mib":1}"#);
    assert!(e.contains("deserializing"), "{e}");
}

#[test]
fn put_vsock_takes_firecracker_s_body() {
    let action = route(&request(
        Method::Put,
        "/vsock",
        r#"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#,
    ))
    .unwrap();
    assert_eq!(
        action,
        Action::PutVsock(Vsock {
            vsock_id: None,
            guest_cid: 3,
            uds_path: "/tmp/v.sock".into(),
        })
    );
    for bad in [
        r#"{"guest_cid": 3}"#,
        r#"{"guest_cid": -1, "uds_path": "/v"}"#,
        r#"{"guest_cid": 3, "uds_path": "/v", "vhost": true}"#,
    ] {
        assert!(fault(Method::Put, "/vsock", bad).contains("json"), "{bad}");
    }
}

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
        (Put, "/snapshot/create"),
        (Put, "/snapshot/load"),
        (Put, "/vsock"),
        (Put, "/balloon"),
        (Get, "/balloon/statistics"),
        (Put, "/mmds"),
        (Get, "/mmds"),
        (Put, "/mmds/config"),
        (Put, "/cpu-config"),
        (Put, "/hotplug/memory"),
        (Put, "/pmem/p"),
        (Put, "/logger"),
        (Put, "/metrics"),
        (Put, "/serial"),
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

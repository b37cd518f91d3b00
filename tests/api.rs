//! pvm in Firecracker mode on this host's /dev/kvm with micro guests (see tests/cli.rs): the
//! API over its Unix socket, driven by a small HTTP client written here, and the config file.

mod micro;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use micro::http::{call, connect, read_response};
use micro::{micro_kernel, power_off, print, require_kvm, spin, wait_exit};

const PVM: &str = env!("CARGO_BIN_EXE_pvm");

/// A scratch path unique to this test process and `name`.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("api-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// A call that must be refused: 400 with a fault_message containing `want`.
fn expect_fault(api: &mut UnixStream, method: &str, path: &str, body: Option<&str>, want: &str) {
    let (status, answer) = call(api, method, path, body);
    assert_eq!(status, 400, "{method} {path}: {answer}");
    assert!(
        answer.starts_with(r#"{"fault_message":"#) && answer.contains(want),
        "{method} {path}: {answer}"
    );
}

/// pvm in Firecracker mode on `socket` with `extra` flags, its output captured, and a client
/// connected to it.
fn start_api(socket: &Path, extra: &[&str]) -> (Child, UnixStream) {
    let mut child = Command::new(PVM)
        .args(["--api-sock", socket.to_str().unwrap()])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let api = connect(socket, &mut child);
    (child, api)
}

/// A micro guest that prints `banner` and spins, and the boot-source body that boots it.
fn spinning_guest(name: &str, banner: &str) -> String {
    let mut code = print(banner);
    code.extend(spin());
    let kernel = micro_kernel(name, &code);
    format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
        kernel.display()
    )
}

/// Ends the VM as a guest reboot does, which pvm reports as a clean exit.
fn ctrl_alt_del(api: &mut UnixStream, child: &mut Child) {
    let body = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(call(api, "PUT", "/actions", Some(body)).0, 204);
    assert_eq!(wait_exit(child), 0);
}

#[test]
fn configure_start_and_end_a_guest_through_the_api() {
    require_kvm();
    let boot = spinning_guest("api-spin", "api guest up\r\n");
    let socket = scratch("api.sock");
    let (mut child, mut api) = start_api(&socket, &["--id", "test-vm"]);

    let (status, body) = call(&mut api, "GET", "/", None);
    assert_eq!(status, 200);
    assert!(body.contains(r#""id":"test-vm""#), "{body}");
    assert!(body.contains(r#""state":"Not started""#), "{body}");
    // Errors before boot leave the VM configurable.
    expect_fault(
        &mut api,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        "boot-source",
    );
    expect_fault(
        &mut api,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64, "bogus": 1}"#),
        "unknown field `bogus`",
    );
    expect_fault(
        &mut api,
        "PUT",
        "/drives/a",
        Some(r#"{"drive_id": "b", "is_root_device": false}"#),
        "does not match",
    );
    expect_fault(
        &mut api,
        "PUT",
        "/vsock",
        Some(r#"{"guest_cid": 2, "uds_path": "/x"}"#),
        "guest_cid 2",
    );
    let (status, _) = call(
        &mut api,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
    );
    assert_eq!(status, 204);
    assert_eq!(call(&mut api, "PUT", "/boot-source", Some(&boot)).0, 204);
    let (status, body) = call(&mut api, "GET", "/machine-config", None);
    assert_eq!(status, 200);
    assert!(body.contains(r#""mem_size_mib":64"#), "{body}");

    // A second client may come and go while the first one waits.
    let mut other = connect(&socket, &mut child);
    other
        .write_all(b"PUT /boot-source HTTP/1.1\r\nContent-Le")
        .unwrap();

    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(call(&mut api, "PUT", "/actions", Some(start)).0, 204);
    let (status, body) = call(&mut api, "GET", "/", None);
    assert_eq!(status, 200);
    assert!(body.contains(r#""state":"Running""#), "{body}");
    expect_fault(
        &mut api,
        "PUT",
        "/actions",
        Some(start),
        "not supported after starting",
    );
    expect_fault(
        &mut api,
        "PUT",
        "/boot-source",
        Some(&boot),
        "not supported after starting",
    );
    let (status, body) = call(&mut api, "GET", "/vm/config", None);
    assert_eq!(status, 200);
    assert!(
        body.contains(r#""boot-source""#) && body.contains("api-spin"),
        "{body}"
    );
    drop(other);

    // Pause and resume: the state follows, and asking twice changes nothing.
    let paused = r#"{"state": "Paused"}"#;
    assert_eq!(call(&mut api, "PATCH", "/vm", Some(paused)).0, 204);
    assert_eq!(call(&mut api, "PATCH", "/vm", Some(paused)).0, 204);
    let (_, body) = call(&mut api, "GET", "/", None);
    assert!(body.contains(r#""state":"Paused""#), "{body}");
    expect_fault(
        &mut api,
        "PATCH",
        "/vm",
        Some(r#"{"state": "Stopped"}"#),
        "unknown variant `Stopped`",
    );
    assert_eq!(
        call(&mut api, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0,
        204
    );
    let (_, body) = call(&mut api, "GET", "/", None);
    assert!(body.contains(r#""state":"Running""#), "{body}");
    expect_fault(
        &mut api,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
        "metrics are not configured",
    );

    ctrl_alt_del(&mut api, &mut child);
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    assert!(stdout.contains("api guest up"), "{stdout}");
    let _ = std::fs::remove_file(&socket);
}

#[test]
fn patch_drive_path_on_host_swaps_the_file_under_the_sandbox() {
    require_kvm();
    let boot = spinning_guest("api-drive-swap", "drive guest up\r\n");
    let image = |name: &str, sectors: u64| {
        let path = scratch(name);
        std::fs::write(&path, vec![0u8; (sectors * 512) as usize]).unwrap();
        path
    };
    let (old, new) = (image("old.img", 8), image("new.img", 16));
    let socket = scratch("drive.sock");
    // The sandbox is on (the default): the api thread opens the new files.
    let (mut child, mut api) = start_api(&socket, &[]);
    assert_eq!(call(&mut api, "PUT", "/boot-source", Some(&boot)).0, 204);
    let drive = format!(
        r#"{{"drive_id": "d", "path_on_host": "{}", "is_root_device": false}}"#,
        old.display()
    );
    assert_eq!(call(&mut api, "PUT", "/drives/d", Some(&drive)).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(call(&mut api, "PUT", "/actions", Some(start)).0, 204);

    let patch = |path: &Path| {
        format!(
            r#"{{"drive_id": "d", "path_on_host": "{}"}}"#,
            path.display()
        )
    };
    let r = call(&mut api, "PATCH", "/drives/d", Some(&patch(&new)));
    assert_eq!(r.0, 204, "{}", r.1);
    let (_, config) = call(&mut api, "GET", "/vm/config", None);
    assert!(config.contains(&*new.to_string_lossy()), "{config}");
    // The drive's own file again, grown on the host: a resize.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&new)
        .unwrap()
        .set_len(32 * 512)
        .unwrap();
    assert_eq!(
        call(&mut api, "PATCH", "/drives/d", Some(&patch(&new))).0,
        204
    );
    let missing = scratch("missing.img");
    expect_fault(
        &mut api,
        "PATCH",
        "/drives/d",
        Some(&patch(&missing)),
        "Drive config error: d: disk",
    );
    expect_fault(
        &mut api,
        "PATCH",
        "/drives/x",
        Some(&format!(
            r#"{{"drive_id": "x", "path_on_host": "{}"}}"#,
            old.display()
        )),
        "no device with id x",
    );

    ctrl_alt_del(&mut api, &mut child);
    for path in [&old, &new, &socket] {
        let _ = std::fs::remove_file(path);
    }
}

#[test]
fn a_config_file_boots_at_once() {
    require_kvm();
    let mut code = print("config file guest\r\n");
    code.extend(power_off());
    let kernel = micro_kernel("api-config-file", &code);
    let config = scratch("vm.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}},
                "drives": [],
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64}}}}"#,
            kernel.display()
        ),
    )
    .unwrap();
    let out = Command::new(PVM)
        .args(["--no-api", "--config-file", config.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("config file guest"));

    // A refused field names itself, and nothing runs.
    std::fs::write(
        &config,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "drives": [],
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "Transparent"}}}}"#,
            kernel.display()
        ),
    )
    .unwrap();
    let out = Command::new(PVM)
        .args(["--config-file", config.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("huge_pages Transparent"), "{stderr}");
}

#[test]
fn logger_metrics_and_serial_configured_through_the_api() {
    require_kvm();
    let mut code = print("to the serial file\r\n");
    code.extend(spin());
    let kernel = micro_kernel("api-log-metrics-serial", &code);
    let socket = scratch("outputs.sock");
    let (log, metrics, serial) = (
        scratch("api.log"),
        scratch("api.metrics"),
        scratch("api.serial"),
    );
    // The serial file is appended to, never truncated.
    std::fs::write(&serial, "earlier\n").unwrap();
    let (mut child, mut api) = start_api(&socket, &["--id", "out-vm"]);
    let logger = format!(
        r#"{{"log_path": "{}", "level": "Info", "show_level": true, "show_log_origin": false}}"#,
        log.display()
    );
    assert_eq!(call(&mut api, "PUT", "/logger", Some(&logger)).0, 204);
    expect_fault(
        &mut api,
        "PUT",
        "/logger",
        Some(r#"{"level": "Info", "module": "pvm::vm"}"#),
        "Logger error: module",
    );
    expect_fault(
        &mut api,
        "PUT",
        "/logger",
        Some(r#"{"level": "Loud"}"#),
        "Loud",
    );
    let put_metrics = format!(r#"{{"metrics_path": "{}"}}"#, metrics.display());
    assert_eq!(call(&mut api, "PUT", "/metrics", Some(&put_metrics)).0, 204);
    expect_fault(
        &mut api,
        "PUT",
        "/metrics",
        Some(&put_metrics),
        "Metrics error: Cannot initialize the metrics system due to bad user input: \
         Reinitialization of metrics not allowed.",
    );
    let put_serial = format!(r#"{{"serial_out_path": "{}"}}"#, serial.display());
    assert_eq!(call(&mut api, "PUT", "/serial", Some(&put_serial)).0, 204);
    let (status, config) = call(&mut api, "GET", "/vm/config", None);
    assert_eq!(status, 200);
    assert!(
        config.contains(r#""logger":null"#) && config.contains(r#""metrics":null"#),
        "{config}"
    );
    let machine = r#"{"vcpu_count": 1, "mem_size_mib": 64}"#;
    assert_eq!(
        call(&mut api, "PUT", "/machine-config", Some(machine)).0,
        204
    );
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
        kernel.display()
    );
    assert_eq!(call(&mut api, "PUT", "/boot-source", Some(&boot)).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(call(&mut api, "PUT", "/actions", Some(start)).0, 204);
    // Pre-boot only, as in Firecracker.
    for (path, body) in [
        ("/logger", logger.as_str()),
        ("/metrics", put_metrics.as_str()),
        ("/serial", put_serial.as_str()),
    ] {
        expect_fault(
            &mut api,
            "PUT",
            path,
            Some(body),
            "not supported after starting",
        );
    }
    // Wait for the guest's line, then flush the metrics.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&serial)
        .unwrap()
        .contains("to the serial file")
    {
        assert!(
            Instant::now() < deadline,
            "no guest output in the serial file"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let flush = r#"{"action_type": "FlushMetrics"}"#;
    assert_eq!(call(&mut api, "PUT", "/actions", Some(flush)).0, 204);
    let ctrl_alt_del = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(call(&mut api, "PUT", "/actions", Some(ctrl_alt_del)).0, 204);
    assert_eq!(wait_exit(&mut child), 0);

    let mut stdout = String::new();
    let mut pipe = child.stdout.take().unwrap();
    pipe.read_to_string(&mut stdout).unwrap();
    assert!(!stdout.contains("to the serial file"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(&serial).unwrap(),
        "earlier\nto the serial file\r\n"
    );
    // Firecracker's line: "<time> [<id>:<thread>:<LEVEL>] <message>".
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("InstanceStart"))
        .unwrap_or_else(|| panic!("no InstanceStart line in {text:?}"));
    let (time, rest) = line.split_once(' ').unwrap();
    let shape: String = time
        .chars()
        .map(|c| if c.is_ascii_digit() { '9' } else { c })
        .collect();
    assert_eq!(shape, "9999-99-99T99:99:99.999999999", "{line}");
    assert!(rest.starts_with("[out-vm:main:INFO] "), "{line}");
    // One JSON object per line: at the start, on FlushMetrics, at the end.
    let text = std::fs::read_to_string(&metrics).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines.len() >= 3, "{text}");
    assert!(
        lines.iter().all(|l| l["utc_timestamp_ms"].is_u64()),
        "{text}"
    );
    assert!(lines[1]["vcpu"].is_object(), "{text}");
    for path in [&socket, &log, &metrics, &serial] {
        let _ = std::fs::remove_file(path);
    }
}

#[test]
fn hostile_clients_get_400_and_cannot_stall_others() {
    let socket = scratch("hostile.sock");
    let mut child = Command::new(PVM)
        .args([
            "--api-sock",
            socket.to_str().unwrap(),
            "--http-api-max-payload-size",
            "100",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // One client stalls halfway through a request head, another halfway through a body.
    let mut stalled_head = connect(&socket, &mut child);
    stalled_head
        .write_all(b"PUT /boot-source HTTP/1.1\r\nContent-Le")
        .unwrap();
    let mut stalled_body = connect(&socket, &mut child);
    stalled_body
        .write_all(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"kernel")
        .unwrap();
    let mut api = connect(&socket, &mut child);
    assert_eq!(call(&mut api, "GET", "/version", None).0, 200);
    // The api thread is confined from its start (mode 2: filter).
    let tasks = std::fs::read_dir(format!("/proc/{}/task", child.id())).unwrap();
    let api_status = tasks
        .flatten()
        .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "api"))
        .map(|t| std::fs::read_to_string(t.path().join("status")).unwrap())
        .expect("no api thread");
    assert!(api_status.contains("Seccomp:\t2"), "{api_status}");

    // Garbage and an oversized body: one 400 with an error body, then the connection closes.
    for (bytes, want) in [
        (&b"GARBAGE\r\n\r\n"[..], "malformed request"),
        (b"POST / HTTP/1.1\r\n\r\n", "unsupported HTTP method POST"),
        (
            b"PUT /boot-source HTTP/1.1\r\nContent-Length: 101\r\n\r\n",
            "larger than the limit of 100",
        ),
    ] {
        let mut bad = connect(&socket, &mut child);
        bad.write_all(bytes).unwrap();
        let (status, body) = read_response(&mut bad);
        assert_eq!(status, 400, "{body}");
        assert!(
            body.starts_with(r#"{"error":"#) && body.contains(want),
            "{body}"
        );
        let mut rest = Vec::new();
        assert_eq!(
            bad.read_to_end(&mut rest).unwrap(),
            0,
            "connection left open"
        );
    }
    // A huge head is cut off, not buffered.
    let mut huge = connect(&socket, &mut child);
    let mut head = b"GET / HTTP/1.1\r\nX: ".to_vec();
    head.resize(20_000, b'a');
    let _ = huge.write_all(&head);
    assert_eq!(read_response(&mut huge).0, 400);

    // Everyone else is still served, and the stalled clients can still finish.
    assert_eq!(call(&mut api, "GET", "/", None).0, 200);
    stalled_body
        .write_all(b"_image_path\": \"/nonexistent/kernel\"}        ")
        .unwrap();
    let (status, body) = read_response(&mut stalled_body);
    assert_eq!(status, 400);
    assert!(body.contains("/nonexistent/kernel"), "{body}");
    drop(stalled_head);
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_file(&socket);
}

#[test]
fn put_vsock_before_boot_binds_its_socket_at_instance_start() {
    require_kvm();
    let boot = spinning_guest("api-vsock", "vsock guest up\r\n");
    let socket = scratch("api-vsock.sock");
    let uds = scratch("api-vsock.v");
    let _ = std::fs::remove_file(&uds);
    let (mut child, mut api) = start_api(&socket, &[]);
    let body = format!(r#"{{"guest_cid": 3, "uds_path": "{}"}}"#, uds.display());
    assert_eq!(call(&mut api, "PUT", "/vsock", Some(&body)).0, 204);
    let (status, config) = call(&mut api, "GET", "/vm/config", None);
    assert_eq!(status, 200);
    assert!(config.contains(r#""guest_cid":3"#), "{config}");
    assert!(!uds.exists(), "bound before InstanceStart");
    assert_eq!(call(&mut api, "PUT", "/boot-source", Some(&boot)).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(call(&mut api, "PUT", "/actions", Some(start)).0, 204);
    // The host side listens: a process may connect (and wait for the guest's driver).
    assert!(UnixStream::connect(&uds).is_ok());
    expect_fault(&mut api, "PUT", "/vsock", Some(&body), "after starting");
    ctrl_alt_del(&mut api, &mut child);
    let _ = std::fs::remove_file(&uds);
}

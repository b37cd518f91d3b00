//! pvm in Firecracker mode on this host's /dev/kvm with micro guests (see tests/cli.rs): the
//! API over its Unix socket, driven by a small HTTP client written here, and the config file.

mod micro;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use micro::{micro_kernel, power_off, print, require_kvm, spin};

const PVM: &str = env!("CARGO_BIN_EXE_pvm");

/// A scratch path unique to this test process and `name`.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("api-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// One HTTP/1.1 exchange on `stream`: the status and the body.
fn call(stream: &mut UnixStream, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or(""));
    stream.write_all(request.as_bytes()).unwrap();
    read_response(stream)
}

/// Reads one response: head up to the blank line, then Content-Length bytes of body.
fn read_response(stream: &mut UnixStream) -> (u16, String) {
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "connection closed");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head:?}"));
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map_or(0, |n| n.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    (status, String::from_utf8(body).unwrap())
}

fn connect(socket: &Path, child: &mut Child) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(stream) = UnixStream::connect(socket) {
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            return stream;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("pvm ended before serving the API: {status}");
        }
        assert!(Instant::now() < deadline, "no API socket after 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(child: &mut Child) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("pvm did not end within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn configure_start_and_end_a_guest_through_the_api() {
    require_kvm();
    let mut code = print("api guest up\r\n");
    code.extend(spin());
    let kernel = micro_kernel("api-spin", &code);
    let socket = scratch("api.sock");
    let mut child = Command::new(PVM)
        .args(["--api-sock", socket.to_str().unwrap(), "--id", "test-vm"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut api = connect(&socket, &mut child);

    let (status, body) = call(&mut api, "GET", "/", None);
    assert_eq!(status, 200);
    assert!(body.contains(r#""id":"test-vm""#), "{body}");
    assert!(body.contains(r#""state":"Not started""#), "{body}");
    // Errors before boot leave the VM configurable.
    let (status, body) = call(
        &mut api,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(status, 400);
    assert!(
        body.contains("fault_message") && body.contains("boot-source"),
        "{body}"
    );
    let (status, body) = call(
        &mut api,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64, "bogus": 1}"#),
    );
    assert_eq!(status, 400);
    assert!(body.contains("unknown field `bogus`"), "{body}");
    let (status, body) = call(
        &mut api,
        "PUT",
        "/drives/a",
        Some(r#"{"drive_id": "b", "is_root_device": false}"#),
    );
    assert_eq!(status, 400);
    assert!(body.contains("does not match"), "{body}");
    let (status, body) = call(
        &mut api,
        "PUT",
        "/vsock",
        Some(r#"{"guest_cid": 3, "uds_path": "/x"}"#),
    );
    assert_eq!(status, 400);
    assert!(body.contains("vsock"), "{body}");
    let (status, _) = call(
        &mut api,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
    );
    assert_eq!(status, 204);
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
        kernel.display()
    );
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
    let (status, body) = call(&mut api, "PUT", "/actions", Some(start));
    assert_eq!(status, 400);
    assert!(body.contains("not supported after starting"), "{body}");
    let (status, body) = call(&mut api, "PUT", "/boot-source", Some(&boot));
    assert_eq!(status, 400);
    assert!(body.contains("not supported after starting"), "{body}");
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
    let (status, body) = call(&mut api, "PATCH", "/vm", Some(r#"{"state": "Stopped"}"#));
    assert_eq!(status, 400);
    assert!(body.contains("unknown variant `Stopped`"), "{body}");
    assert_eq!(
        call(&mut api, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0,
        204
    );
    let (_, body) = call(&mut api, "GET", "/", None);
    assert!(body.contains(r#""state":"Running""#), "{body}");
    let (status, body) = call(
        &mut api,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
    );
    assert_eq!(status, 400);
    assert!(body.contains("metrics are not configured"), "{body}");

    let ctrl_alt_del = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(call(&mut api, "PUT", "/actions", Some(ctrl_alt_del)).0, 204);
    assert_eq!(wait_exit(&mut child), 0);
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
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64, "track_dirty_pages": true}}}}"#,
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
    assert!(stderr.contains("track_dirty_pages"), "{stderr}");
}

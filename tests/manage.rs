//! Managing running VMs on this host's /dev/kvm with micro guests (see tests/cli.rs): the run
//! directory's API sockets, `pvm list/status/pause/resume/stop/console`, the console socket,
//! and what a stale, fake or lying socket in the run directory gets.

mod micro;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use micro::{micro_kernel, print, read_until, require_kvm, spin, wait_exit, wait_for_input};

const PVM: &str = env!("CARGO_BIN_EXE_pvm");

/// A fresh XDG_RUNTIME_DIR for one test: pvm's run directory is `<it>/pvm`.
fn runtime_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("manage-tests")
        .join(format!("{name}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `pvm ARGS` with XDG_RUNTIME_DIR=`xdg`, run to the end.
fn pvm(xdg: &Path, args: &[&str]) -> Output {
    Command::new(PVM)
        .env("XDG_RUNTIME_DIR", xdg)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A pvm this test started, killed if the test fails before it ends.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Vm {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Vm {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// Starts `pvm --id ID --kernel KERNEL EXTRA` and waits for its API socket.
fn start(xdg: &Path, id: &str, kernel: &Path, extra: &[&str]) -> Vm {
    let mut child = Command::new(PVM)
        .env("XDG_RUNTIME_DIR", xdg)
        .args([
            "--id",
            id,
            "--kernel",
            kernel.to_str().unwrap(),
            "--mem",
            "64M",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let socket = xdg.join("pvm").join(format!("{id}.sock"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&socket).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("pvm {id} ended before serving its API: {status}: {err}");
        }
        assert!(Instant::now() < deadline, "no API socket for {id}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Vm(child)
}

fn spinner(name: &str) -> PathBuf {
    let mut code = print("up\n");
    code.extend(spin());
    micro_kernel(name, &code)
}

/// Prints "ready\n", then echoes every byte of UART input back, forever.
fn echo_guest() -> PathBuf {
    let mut code = print("ready\n");
    code.extend(wait_for_input());
    code.extend([
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xec, // in al, dx (the byte)
        0xee, // out dx, al (echoed)
        0xeb, 0xef, // jmp back to wait_for_input (17 bytes back)
    ]);
    micro_kernel("manage-echo", &code)
}

fn state_of(xdg: &Path, id: &str) -> String {
    let out = pvm(xdg, &["status", id, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["id"], id);
    info["state"].as_str().unwrap().to_string()
}

#[test]
fn list_pause_resume_and_stop_two_vms() {
    require_kvm();
    let xdg = runtime_dir("two");
    let kernel = spinner("manage-spin");
    let mut a = start(&xdg, "vm-a", &kernel, &["--cpus", "2"]);
    let mut b = start(&xdg, "vm-b", &kernel, &[]);
    let out = pvm(&xdg, &["list"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("ID "), "{text}");
    let row_a = lines.iter().find(|l| l.starts_with("vm-a ")).expect(&text);
    let words: Vec<&str> = row_a.split_whitespace().collect();
    assert_eq!(words[1], a.id().to_string(), "{text}");
    assert_eq!(&words[2..5], ["Running", "2", "64M"], "{text}");
    assert!(lines.iter().any(|l| l.starts_with("vm-b ")), "{text}");

    assert_eq!(pvm(&xdg, &["pause", "vm-a"]).status.code(), Some(0));
    assert_eq!(state_of(&xdg, "vm-a"), "Paused");
    assert_eq!(state_of(&xdg, "vm-b"), "Running");
    assert_eq!(pvm(&xdg, &["resume", "vm-a"]).status.code(), Some(0));
    assert_eq!(state_of(&xdg, "vm-a"), "Running");
    let status = stdout(&pvm(&xdg, &["status", "vm-a"]));
    assert!(status.contains("state: Running\n"), "{status}");

    // Stopped through the API: pvm stop exits 0 once the VM has ended, which ended with 0.
    let out = pvm(&xdg, &["stop", "vm-a"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(wait_exit(&mut a), 0);
    // pvm's helper removes its socket once it has ended.
    wait_gone(&xdg.join("pvm/vm-a.sock"));
    let text = stdout(&pvm(&xdg, &["list"]));
    assert!(!text.contains("vm-a"), "{text}");
    assert!(text.contains("vm-b"), "{text}");
    assert_eq!(pvm(&xdg, &["status", "vm-a"]).status.code(), Some(3));
    assert_eq!(pvm(&xdg, &["stop", "vm-b"]).status.code(), Some(0));
    assert_eq!(wait_exit(&mut b), 0);
}

/// Serves `path` with a thread that answers every connection with `answer` and closes.
fn liar(path: &Path, answer: Vec<u8>) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut buf = [0u8; 1024];
            let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(&answer);
        }
    });
}

#[test]
fn stale_fake_and_lying_sockets() {
    let xdg = runtime_dir("stale");
    let dir = xdg.join("pvm");
    std::fs::create_dir_all(&dir).unwrap();
    drop(UnixListener::bind(dir.join("dead.sock")).unwrap());
    std::fs::write(dir.join("fake.sock"), "not a socket").unwrap();
    liar(
        &dir.join("garbage.sock"),
        b"\xff\xfe garbage\r\n\r\n".to_vec(),
    );
    // Claims to be pid 1: pvm stop must not believe it.
    let body = r#"{"id":"pid1","pid":1,"state":"Running","vcpus":1,"mem_mib":1,"uptime_s":0,"disks":[],"taps":[],"console_socket":null}"#;
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    liar(&dir.join("pid1.sock"), answer.into_bytes());
    let out = pvm(&xdg, &["list"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = stdout(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!dir.join("dead.sock").exists(), "the stale socket stays");
    assert!(dir.join("fake.sock").exists(), "a plain file was removed");
    assert!(
        dir.join("garbage.sock").exists(),
        "a live socket was removed"
    );
    assert!(err.contains("garbage.sock"), "{err}");
    assert!(err.contains("fake.sock"), "{err}");
    assert!(text.contains("pid1"), "{text}");
    let out = pvm(&xdg, &["stop", "pid1", "--timeout", "0"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not signalling"));
    assert_eq!(pvm(&xdg, &["status", "garbage"]).status.code(), Some(1));
    assert_eq!(pvm(&xdg, &["status", "nobody"]).status.code(), Some(3));
    // An id is letters, digits and '-'; with a '/' it is a socket path.
    assert_eq!(pvm(&xdg, &["status", "bad id"]).status.code(), Some(2));
    assert_eq!(pvm(&xdg, &["status", "../x"]).status.code(), Some(3));

    // A new pvm takes over the stale socket of its id.
    require_kvm();
    drop(UnixListener::bind(dir.join("again.sock")).unwrap());
    let mut vm = start(&xdg, "again", &spinner("manage-spin-again"), &[]);
    assert_eq!(state_of(&xdg, "again"), "Running");
    // Even after SIGKILL the helper removes the socket.
    // SAFETY: kill only sends a signal to our own child.
    unsafe { libc::kill(vm.id() as i32, libc::SIGKILL) };
    assert_eq!(wait_exit(&mut vm), -1);
    wait_gone(&dir.join("again.sock"));
}

fn wait_gone(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while path.exists() {
        assert!(Instant::now() < deadline, "{} stays", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ends a console client's connection whoever else holds a copy of its descriptor.
fn hang_up(client: UnixStream) {
    // NotConnected: pvm has closed its end already.
    let _ = client.shutdown(std::net::Shutdown::Both);
}

fn console_client(path: &Path) -> UnixStream {
    let stream = UnixStream::connect(path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

#[test]
fn console_socket_attach_detach_and_hostile_clients() {
    require_kvm();
    let xdg = runtime_dir("console");
    let mut vm = start(&xdg, "echo", &echo_guest(), &["--console", "socket"]);
    let path = xdg.join("pvm/echo.console");
    let mut first = console_client(&path);
    read_until(&mut first, "ready\n").unwrap();
    first.write_all(b"hello").unwrap();
    read_until(&mut first, "hello").unwrap();
    // A second client is refused while the first is attached.
    let mut second = console_client(&path);
    let mut refused = String::new();
    second.read_to_string(&mut refused).unwrap();
    assert!(refused.contains("console busy"), "{refused}");
    // The first detaches; the guest runs on and the next client is served at once, even
    // before pvm's console thread has woken for the first one's hang-up. (Each client hangs
    // up with shutdown, not only by closing its descriptor: another test thread's spawn can
    // hold a copy of the descriptor until its child execs, and the connection would stay up.)
    hang_up(first);
    let mut again = console_client(&path);
    again.write_all(b"still-here").unwrap();
    read_until(&mut again, "still-here").unwrap();
    hang_up(again);

    // A flood of garbage that the guest echoes back while the client never reads: pvm holds
    // it back and drops output instead of stalling the guest, and a later client is served.
    let mut flood = console_client(&path);
    flood.set_nonblocking(true).unwrap();
    let garbage: Vec<u8> = (0..=255u8).cycle().take(64 * 1024).collect();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        match flood.write(&garbage) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("{e}"),
        }
    }
    hang_up(flood);
    assert!(vm.try_wait().unwrap().is_none(), "the flood ended the VM");
    // Output nobody read is counted (how much depends on the socket buffers).
    let out = pvm(&xdg, &["status", "echo", "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(info["console_dropped_bytes"].is_u64(), "{info}");
    assert!(
        info["console_socket"]
            .as_str()
            .unwrap()
            .ends_with("echo.console")
    );

    // pvm console: piped stdin and stdout (no terminal), Ctrl-] detaches with 0.
    let mut attach = Command::new(PVM)
        .env("XDG_RUNTIME_DIR", &xdg)
        .args(["console", "echo"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = attach.stdin.take().unwrap();
    let mut output = attach.stdout.take().unwrap();
    // The echo of the flood may still drain first: wait for the marker.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    input.write_all(b"MARK-42").unwrap();
    while !String::from_utf8_lossy(&seen).contains("MARK-42") {
        assert!(Instant::now() < deadline, "no echo through pvm console");
        let n = output.read(&mut buf).unwrap();
        assert!(n > 0, "pvm console closed: {:?}", attach.wait());
        seen.extend_from_slice(&buf[..n]);
    }
    input.write_all(&[0x1d]).unwrap();
    assert_eq!(wait_exit(&mut attach), 0);

    // The guest's output never reached pvm's stdout.
    let out = pvm(&xdg, &["stop", "echo"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(wait_exit(&mut vm), 0);
    let mut printed = String::new();
    vm.stdout
        .take()
        .unwrap()
        .read_to_string(&mut printed)
        .unwrap();
    assert!(!printed.contains("ready"), "{printed}");
    wait_gone(&path);
    wait_gone(&xdg.join("pvm/echo.sock"));
}

#[test]
fn the_committed_manual_page_is_current() {
    let out = Command::new(PVM).arg("man").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.contains(".TH pvm 1"), "{page}");
    for word in [
        "list",
        "status",
        "pause",
        "resume",
        "stop",
        "console",
        "\\-\\-disk",
    ] {
        assert!(page.contains(word), "{word} missing from the manual page");
    }
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/pvm.1"))
        .unwrap_or_default();
    assert!(
        committed == page,
        "docs/pvm.1 is not what `pvm man` prints: run `cargo run -- man > docs/pvm.1`"
    );
}

#[test]
fn a_config_file_vm_is_listed_unless_no_api() {
    require_kvm();
    let xdg = runtime_dir("config-file");
    let kernel = spinner("manage-spin-config");
    let config = xdg.join("vm.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64}}}}"#,
            kernel.display()
        ),
    )
    .unwrap();
    let start_with = |extra: &[&str]| {
        Command::new(PVM)
            .env("XDG_RUNTIME_DIR", &xdg)
            .args(["--id", "fc", "--config-file", config.to_str().unwrap()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Vm)
            .unwrap()
    };
    let mut vm = start_with(&[]);
    let socket = xdg.join("pvm/fc.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "no run-directory socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(state_of(&xdg, "fc"), "Running");
    assert_eq!(pvm(&xdg, &["stop", "fc"]).status.code(), Some(0));
    assert_eq!(wait_exit(&mut vm), 0);
    wait_gone(&socket);
    // --no-api: no socket at all.
    let mut quiet = start_with(&["--no-api"]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(quiet.try_wait().unwrap().is_none());
    assert!(!socket.exists());

    // --api-sock: the subcommands take the socket's path; GET /pvm/info after InstanceStart
    // reports the API-configured VM (and must not make the sandboxed main thread open files).
    let api = xdg.join("fc-api.sock");
    let mut fc = Command::new(PVM)
        .args(["--api-sock", api.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map(Vm)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&api).is_err() {
        assert!(Instant::now() < deadline, "no --api-sock socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display());
    for (path, body) in [
        ("/boot-source", boot.as_str()),
        (
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 64}"#,
        ),
        ("/actions", r#"{"action_type": "InstanceStart"}"#),
    ] {
        let mut stream = UnixStream::connect(&api).unwrap();
        write!(
            stream,
            "PUT {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 204"), "{path}: {answer}");
    }
    let out = pvm(&xdg, &["status", api.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (info["state"].as_str(), info["vcpus"].as_u64()),
        (Some("Running"), Some(2))
    );
    assert_eq!(info["id"], "anonymous-instance");
    assert_eq!(info["pid"], fc.id());
    assert!(
        fc.try_wait().unwrap().is_none(),
        "GET /pvm/info ended the VM"
    );
}

/// A pseudo-terminal: (master, slave).
fn pty() -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two new descriptors into the locals; the name and settings
    // pointers may be null.
    let got = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(got, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty returned two new descriptors that nothing else owns.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    }
}

/// Whether the terminal at `fd` is in canonical mode with echo (not raw).
fn cooked(fd: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a live descriptor and a live termios.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut termios) }, 0);
    termios.c_lflag & libc::ICANON != 0 && termios.c_lflag & libc::ECHO != 0
}

#[test]
fn pvm_console_makes_the_terminal_raw_and_restores_it() {
    require_kvm();
    let xdg = runtime_dir("pty");
    let _vm = start(&xdg, "tty", &echo_guest(), &["--console", "socket"]);
    // Detaching with Ctrl-], then SIGTERM while attached: both restore the terminal.
    for detach in [true, false] {
        let (mut master, slave) = pty();
        assert!(cooked(&slave));
        let mut attach = Command::new(PVM)
            .env("XDG_RUNTIME_DIR", &xdg)
            .args(["console", "tty"])
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while cooked(&slave) {
            assert!(Instant::now() < deadline, "the terminal never went raw");
            std::thread::sleep(Duration::from_millis(20));
        }
        master.write_all(b"tty-echo").unwrap();
        read_until(&mut master, "tty-echo").unwrap();
        if detach {
            master.write_all(&[0x1d]).unwrap();
            assert_eq!(wait_exit(&mut attach), 0);
        } else {
            // SAFETY: kill only sends a signal to our own child.
            unsafe { libc::kill(attach.id() as i32, libc::SIGTERM) };
            assert_eq!(wait_exit(&mut attach), 128 + libc::SIGTERM);
        }
        assert!(cooked(&slave), "the terminal stayed raw (detach: {detach})");
    }
}

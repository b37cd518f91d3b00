//! The pvm binary end to end on this host's /dev/kvm, with hand-assembled micro guests: each is a
//! one-segment ELF whose 64-bit code pokes one platform device. They need no guest kernel, so
//! they run fast even where /dev/kvm is kvm_pvm (which emulates guest supervisor code), and they
//! pin down pvm's exit codes, error lines, signal handling and terminal restoration.

mod micro;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use micro::{cloud_init_memfds, micro_kernel, out_then_halt, print, read_until, require_kvm, spin};

const PVM: &str = env!("CARGO_BIN_EXE_pvm");

fn run(args: &[&str]) -> (Output, Duration) {
    let start = Instant::now();
    let out = Command::new(PVM)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out, start.elapsed())
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The stderr lines that are not the kvm_pvm notice.
fn error_lines(out: &Output) -> Vec<String> {
    stderr(out)
        .lines()
        .filter(|l| !l.contains("kvm_pvm"))
        .map(str::to_string)
        .collect()
}

#[test]
fn guest_power_off_exits_zero_and_prints() {
    require_kvm();
    let mut code = print("hello from the micro guest\r\n");
    code.extend(out_then_halt(0x3c0, (5 << 2) | (1 << 5))); // ACPI S5 + SLP_EN
    let kernel = micro_kernel("poweroff", &code);
    let (out, _) = run(&["--kernel", kernel.to_str().unwrap(), "--mem", "64M"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello from the micro guest"));
    assert!(error_lines(&out).is_empty(), "{:?}", error_lines(&out));
}

#[test]
fn serial_out_appends_the_guest_console_to_a_file() {
    require_kvm();
    let mut code = print("to the serial file\r\n");
    code.extend(out_then_halt(0x3c0, (5 << 2) | (1 << 5))); // ACPI S5 + SLP_EN
    let kernel = micro_kernel("serial-out", &code);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("serial-out");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("serial.{}", std::process::id()));
    // What is already there stays: the file is appended to, never truncated.
    std::fs::write(&file, "earlier\n").unwrap();
    let serial_arg = file.to_str().unwrap();
    let args = ["--kernel", kernel.to_str().unwrap(), "--mem", "64M"];
    let (out, _) = run(&[&args[..], &["--serial-out", serial_arg]].concat());
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("to the serial file"));
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text, "earlier\nto the serial file\r\n");
    let _ = std::fs::remove_file(&file);
    // A path that cannot be opened is a usage error naming it.
    let (out, _) = run(&[&args[..], &["--serial-out", "/nonexistent/dir/serial"]].concat());
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("/nonexistent/dir/serial"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_guest_does_not_run_past_its_own_power_off() {
    require_kvm();
    // Power off, then keep printing: nothing after the power-off write may reach the console.
    let mut code = print("before;");
    code.extend_from_slice(&[0x66, 0xba, 0xc0, 0x03, 0xb0, (5 << 2) | (1 << 5), 0xee]);
    for _ in 0..50 {
        code.extend(print("after;"));
    }
    code.extend(spin());
    let kernel = micro_kernel("run-past-power-off", &code);
    for _ in 0..5 {
        let (out, _) = run(&[
            "--kernel",
            kernel.to_str().unwrap(),
            "--mem",
            "64M",
            "--stats",
        ]);
        assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
        // The stopped vCPU thread lives on until the main thread has read every thread's CPU.
        assert!(stderr(&out).contains(" vcpu0="), "stderr: {}", stderr(&out));
        let console = String::from_utf8_lossy(&out.stdout);
        let tail = console.split_once("before;").map(|(_, tail)| tail);
        assert_eq!(tail, Some(""), "console: {console:?}");
    }
}

#[test]
fn guest_reboot_through_i8042_exits_zero() {
    require_kvm();
    let kernel = micro_kernel("reboot", &out_then_halt(0x64, 0xfe));
    let (out, _) = run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--mem",
        "64M",
        "--cpus",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
}

#[test]
fn huge_pages_the_host_lacks_are_refused_with_the_numbers() {
    require_kvm();
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .map_or(0, |t| t.trim().parse().unwrap());
    if free >= 32 {
        eprintln!("the host has {free} free huge pages: test skipped");
        return;
    }
    let mut code = print("never printed\r\n");
    code.extend(out_then_halt(0x3c0, (5 << 2) | (1 << 5)));
    let kernel = micro_kernel("huge-pages", &code);
    let args = [
        "--kernel",
        kernel.to_str().unwrap(),
        "--mem",
        "64M",
        "--huge-pages",
        "2M",
    ];
    let (out, took) = run(&args);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let lines = error_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let want = format!(
        "64 MiB of guest memory on 2 MiB huge pages needs 32 free huge pages and the host has {free}"
    );
    assert!(lines[0].contains(&want), "{lines:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("never printed"));
    assert!(took < Duration::from_secs(5));
}

#[test]
fn guest_panic_exits_with_the_panic_code() {
    require_kvm();
    let kernel = micro_kernel("panic", &out_then_halt(0x505, 1));
    let (out, _) = run(&["--kernel", kernel.to_str().unwrap(), "--mem", "64M"]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains("panicked"), "{}", stderr(&out));
}

#[test]
fn guest_triple_fault_exits_with_its_code() {
    require_kvm();
    // ud2 with an empty IDT: #UD cannot be delivered, nor #DF, so the CPU shuts down.
    let kernel = micro_kernel("triple-fault", &[0x0f, 0x0b]);
    let (out, _) = run(&["--kernel", kernel.to_str().unwrap(), "--mem", "64M"]);
    assert_eq!(out.status.code(), Some(4), "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains("triple-faulted"), "{}", stderr(&out));
}

#[test]
fn missing_and_garbage_kernels_are_usage_errors() {
    let (out, took) = run(&["--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        error_lines(&out),
        vec!["pvm: --kernel /nonexistent/vmlinux: No such file or directory (os error 2)"]
    );
    let garbage = micro_kernel("garbage", b"");
    std::fs::write(&garbage, b"MZ this is not a kernel").unwrap();
    let (out, _) = run(&["--kernel", garbage.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let lines = error_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("--kernel") && lines[0].contains("not an ELF vmlinux or a bzImage"));
    // Naming no kernel (nor a disk to boot one from) asks for the sandbox, which boots the
    // host's own kernel; where that is missing or unreadable, the error says so.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let host_kernel = format!("/boot/vmlinuz-{}", release.trim());
    if std::fs::File::open(&host_kernel).is_err() {
        let (out, _) = run(&[]);
        assert_eq!(out.status.code(), Some(2));
        let lines = error_lines(&out);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with(&format!("pvm: {host_kernel}: ")) && lines[0].contains("--kernel"),
            "{lines:?}"
        );
    }
    let (out, _) = run(&["--tap", "tap0"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        error_lines(&out),
        vec![
            "pvm: --tap does not fit the sandbox (pvm without --kernel, or pvm -- COMMAND): the \
             sandbox guest loads no driver for it"
        ]
    );
    assert!(took < Duration::from_secs(5));
}

#[test]
fn bad_flags_are_one_line_errors_naming_the_flag() {
    for (args, flag) in [
        (&["--mem", "0"][..], "--mem"),
        (&["--mem", "lots"], "--mem"),
        (&["--cpus", "300"], "--cpus"),
        (&["--console", "tty"], "--console"),
        (&["--tap", "bad/name"], "--tap"),
        (&["--tap", "tap0,vhost=on,tx_bw=1M"], "--tap"),
        (&["--disk", "/tmp/x.img,bw=0"], "--disk"),
        (&["--disk", "/nonexistent.img"], "--disk"),
        (&["--initrd", "/nonexistent.cpio"], "--initrd"),
        (&["--huge-pages", "1G"], "--huge-pages"),
        (&["--huge-pages", "2M", "--mem", "129M"], "--huge-pages"),
        (&["--smt", "--cpus", "3"], "--smt"),
    ] {
        let (out, _) = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let lines = error_lines(&out);
        assert_eq!(lines.len(), 1, "{args:?}: {lines:?}");
        assert!(
            lines[0].starts_with("pvm: ") && lines[0].contains(flag),
            "{args:?}: {lines:?}"
        );
    }
}

#[test]
fn help_lists_every_flag() {
    let (out, _) = run(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--mem",
        "--cpus",
        "--disk",
        "--tap",
        "--net",
        "vhost-user=SOCKET",
        "iops=N",
        "tx_pps=N",
        "--console",
        "--serial-out",
        "--cloud-init",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help");
    }
}

/// A pseudo-terminal pair; the child gets the replica as stdin.
fn openpty() -> (OwnedFd, OwnedFd) {
    let (mut primary, mut replica) = (0, 0);
    // SAFETY: openpty writes two descriptors into the provided ints; the other arguments may be null.
    let rc = unsafe {
        libc::openpty(
            &mut primary,
            &mut replica,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(primary), OwnedFd::from_raw_fd(replica)) }
}

fn termios_of(fd: &OwnedFd) -> Vec<u8> {
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and pointer.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    // Compare the flag words and control characters.
    format!(
        "{:x} {:x} {:x} {:x} {:?}",
        t.c_iflag, t.c_oflag, t.c_cflag, t.c_lflag, t.c_cc
    )
    .into_bytes()
}

/// pvm running `kernel` (64 MiB, plus `extra` flags) with the terminal `replica` as stdin, once
/// the guest has printed `first`; its stdout is returned for further reading.
fn pvm_on_terminal(
    replica: &OwnedFd,
    kernel: &std::path::Path,
    extra: &[&str],
    first: &str,
) -> (std::process::Child, std::process::ChildStdout) {
    let mut child = Command::new(PVM)
        .args(["--kernel", kernel.to_str().unwrap(), "--mem", "64M"])
        .args(extra)
        .stdin(Stdio::from(replica.try_clone().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    if let Err(seen) = read_until(&mut stdout, first) {
        panic!("pvm ended before the guest printed: {seen:?}");
    }
    (child, stdout)
}

#[test]
fn sigterm_stops_a_running_guest_and_restores_the_terminal() {
    require_kvm();
    // Print, then spin forever: only a signal ends this guest.
    let mut code = print("spinning\r\n");
    code.extend(spin());
    let kernel = micro_kernel("spin", &code);
    let (_primary, replica) = openpty();
    let before = termios_of(&replica);
    let (mut child, _stdout) = pvm_on_terminal(&replica, &kernel, &[], "spinning");
    assert_ne!(
        termios_of(&replica),
        before,
        "pvm should have put the terminal in raw mode"
    );
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "pvm did not stop within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    assert_eq!(
        termios_of(&replica),
        before,
        "terminal settings not restored"
    );
}

/// A scratch disk image path under the test's temporary directory.
fn scratch_image(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("disk-images");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn disk_without_a_filesystem_or_kernel_is_a_clear_error() {
    let blank = scratch_image("blank.img");
    std::fs::write(&blank, vec![0u8; 1 << 20]).unwrap();
    let (out, _) = run(&["--disk", blank.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let lines = error_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("no ext4 root filesystem"), "{lines:?}");

    // An ext4 image (mkfs.ext4 -d, no root needed) with nothing in /boot.
    let tree = scratch_image("empty-tree");
    std::fs::create_dir_all(tree.join("boot")).unwrap();
    let empty = scratch_image("empty-ext4.img");
    std::fs::write(&empty, vec![0u8; 8 << 20]).unwrap();
    let mkfs = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-d",
            tree.to_str().unwrap(),
            empty.to_str().unwrap(),
        ])
        .status()
        .expect("mkfs.ext4 (e2fsprogs, installed by scripts/host-packages)");
    assert!(mkfs.success());
    let (out, _) = run(&["--disk", empty.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let lines = error_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    for looked_for in [
        "no kernel found",
        "/boot/vmlinuz-*",
        "/boot/vmlinux-*",
        "/vmlinuz",
    ] {
        assert!(
            lines[0].contains(looked_for),
            "{looked_for} missing: {lines:?}"
        );
    }
}

#[test]
fn a_disk_in_use_by_another_pvm_is_refused() {
    require_kvm();
    let image = scratch_image("shared.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let mut code = print("holding the disk\r\n");
    code.extend(spin());
    let kernel = micro_kernel("spin-disk", &code);
    let args = [
        "--kernel",
        kernel.to_str().unwrap(),
        "--mem",
        "64M",
        "--disk",
        image.to_str().unwrap(),
    ];
    let mut first = Command::new(PVM)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Once the guest runs, its devices (and the image's lock) exist.
    let mut stdout = first.stdout.take().unwrap();
    if let Err(seen) = read_until(&mut stdout, "holding the disk") {
        panic!("the first pvm ended early: {seen:?}");
    }
    let (out, _) = run(&args);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    assert_eq!(first.wait().unwrap().code(), Some(128 + libc::SIGTERM));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let lines = error_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("--disk")
            && lines[0].contains("shared.img")
            && lines[0].contains("in use"),
        "{lines:?}"
    );
}

/// Starts pvm on a guest that prints "spinning" and spins, with a disk (so a block device
/// thread exists) and two vCPUs, and returns once the guest runs.
fn spinning_pvm(name: &str, extra: &[&str], env: &[(&str, &str)]) -> std::process::Child {
    let mut code = print("spinning\r\n");
    code.extend(spin());
    let kernel = micro_kernel(name, &code);
    let image = scratch_image(&format!("{name}.img"));
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let mut child = Command::new(PVM)
        .args(["--kernel", kernel.to_str().unwrap(), "--mem", "64M"])
        .args(["--cpus", "2", "--disk", image.to_str().unwrap()])
        .args(extra)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    if let Err(seen) = read_until(&mut stdout, "spinning") {
        panic!("pvm ended before the guest printed: {seen:?}");
    }
    child
}

/// Each of `pid`'s user threads (kernel helpers such as kvm-nx-lpage-recovery excluded) with
/// the seccomp mode /proc reports for it (0 none, 2 filter).
fn thread_seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or("")
                .trim()
                .to_string()
        };
        let name = field("Name:");
        if !name.starts_with("kvm-") {
            threads.push((name, field("Seccomp:")));
        }
    }
    threads.sort();
    threads
}

#[test]
fn every_thread_runs_under_a_seccomp_filter_unless_turned_off() {
    require_kvm();
    // "api": the run directory's API socket (root has /run/pvm, a user $XDG_RUNTIME_DIR).
    const EXPECTED: [&str; 6] = ["api", "pvm", "vcpu0", "vcpu1", "virtio-blk0", "virtio-rng0"];
    for (flag, mode) in [("on", "2"), ("off", "0")] {
        let mut child = spinning_pvm("spin-seccomp", &["--seccomp", flag], &[]);
        // vCPU 0 printing does not mean vCPU 1 has named itself and installed its filter yet.
        let start = Instant::now();
        let threads = loop {
            let threads = thread_seccomp_modes(child.id());
            let names: Vec<&str> = threads.iter().map(|(n, _)| n.as_str()).collect();
            let settled = names == EXPECTED && threads.iter().all(|(_, m)| m == mode);
            if settled || start.elapsed() > Duration::from_secs(5) {
                break threads;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert_eq!(child.wait().unwrap().code(), Some(128 + libc::SIGTERM));
        let names: Vec<&str> = threads.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, EXPECTED, "--seccomp {flag}");
        for (name, seen) in &threads {
            assert_eq!(seen, mode, "--seccomp {flag}: thread {name}");
        }
    }
}

#[test]
fn a_forbidden_system_call_ends_pvm_naming_thread_and_call() {
    require_kvm();
    let mut code = print("spinning\r\n");
    code.extend(spin());
    let kernel = micro_kernel("spin-probe", &code);
    let image = scratch_image("probe.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    for (kind, thread) in [
        ("main", "main (main)"),
        ("vcpu", "vcpu0 (vcpu)"),
        ("device", "(device)"),
    ] {
        let (_primary, replica) = openpty();
        let before = termios_of(&replica);
        let out = Command::new(PVM)
            .args(["--kernel", kernel.to_str().unwrap(), "--mem", "64M"])
            .args(["--disk", image.to_str().unwrap()])
            .env("PVM_SECCOMP_PROBE", kind)
            .stdin(Stdio::from(replica.try_clone().unwrap()))
            .output()
            .unwrap();
        let lines = error_lines(&out);
        assert_eq!(out.status.code(), Some(6), "{kind}: {lines:?}");
        assert_eq!(lines.len(), 1, "{kind}: {lines:?}");
        assert!(
            lines[0].starts_with("pvm: seccomp: thread ")
                && lines[0].contains(thread)
                && lines[0].contains("forbidden system call getppid (110)"),
            "{kind}: {lines:?}"
        );
        assert_eq!(
            termios_of(&replica),
            before,
            "{kind}: terminal not restored"
        );
    }
}

#[test]
fn boot_timer_reports_the_first_kvm_run_and_each_guest_signal() {
    require_kvm();
    // out 0x3f0, 123 twice (and once a wrong value), then ACPI power-off.
    let signal = |value: u8| vec![0x66, 0xba, 0xf0, 0x03, 0xb0, value, 0xee];
    let mut code = signal(123);
    code.extend(signal(7));
    code.extend(signal(123));
    code.extend(out_then_halt(0x3c0, (5 << 2) | (1 << 5)));
    let kernel = micro_kernel("boot-timer", &code);
    let args = ["--kernel", kernel.to_str().unwrap(), "--mem", "64M"];
    let (out, _) = run(&[&args[..], &["--boot-timer"]].concat());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines = error_lines(&out);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines[0].starts_with("pvm: boot-timer: first KVM_RUN ") && lines[0].ends_with(" CPU-ms"),
        "{lines:?}"
    );
    for (line, n) in lines[1..].iter().zip(1..) {
        assert!(
            line.starts_with(&format!("pvm: boot-timer: guest signal {n} at "))
                && line.ends_with(" ms after the first KVM_RUN"),
            "{lines:?}"
        );
    }
    // Without the flag the port is not there: the writes cost an exit and nothing is printed.
    let (out, _) = run(&args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(error_lines(&out).is_empty(), "{:?}", error_lines(&out));
}

/// A debug build of the workspace binary `name` of package `package`, next to pvm's.
fn workspace_binary(package: &str, name: &str) -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", package, "--bin", name])
        .status()
        .unwrap();
    assert!(status.success(), "cannot build {name}");
    PathBuf::from(PVM).with_file_name(name)
}

#[test]
fn vhost_user_backends_connect_before_the_sandbox_and_bad_sockets_are_usage_errors() {
    require_kvm();
    let blk = workspace_binary("pvm-vhost-user", "pvm-vhost-user-blk");
    let image = scratch_image("vhost-user.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let socket = scratch_image("vhost-user.sock");
    let mut code = print("spinning\r\n");
    code.extend(spin());
    let kernel = micro_kernel("spin-vhost-user", &code);
    // The relay thread (vhost-user-relay0, cut to 15 bytes) is spawned with the device.
    const EXPECTED: [&str; 5] = ["api", "pvm", "vcpu0", "vhost-user-rela", "virtio-rng0"];
    for transport in ["pci", "mmio"] {
        let _ = std::fs::remove_file(&socket);
        let mut backend = Command::new(&blk)
            .args(["--socket", socket.to_str().unwrap()])
            .args(["--disk", image.to_str().unwrap()])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut backend_err = backend.stderr.take().unwrap();
        read_until(&mut backend_err, "serving").expect("the backend listens");
        let disk = format!("vhost-user={}", socket.display());
        let mut pvm = Command::new(PVM)
            .args(["--kernel", kernel.to_str().unwrap(), "--mem", "64M"])
            .args(["--disk", &disk, "--transport", transport])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = pvm.stdout.take().unwrap();
        if let Err(seen) = read_until(&mut stdout, "spinning") {
            panic!("pvm ended before the guest printed: {seen:?}");
        }
        // Every thread is confined, the vhost-user relay thread included.
        let start = Instant::now();
        let threads = loop {
            let threads = thread_seccomp_modes(pvm.id());
            let settled = threads.len() == EXPECTED.len() && threads.iter().all(|(_, m)| m == "2");
            if settled || start.elapsed() > Duration::from_secs(5) {
                break threads;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let names: Vec<&str> = threads.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, EXPECTED, "{transport}: {threads:?}");
        assert!(threads.iter().all(|(_, m)| m == "2"), "{threads:?}");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pvm.id() as i32, libc::SIGTERM) };
        let out = pvm.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(128 + libc::SIGTERM));
        assert!(
            stderr(&out).contains(&format!("pvm: --disk {disk}: vhost-user data plane")),
            "{}",
            stderr(&out)
        );
        // The backend sees pvm go and ends by itself.
        assert_eq!(backend.wait().unwrap().code(), Some(0), "{transport}");
    }
    for (flag, value) in [
        ("--disk", "vhost-user=/nonexistent/blk.sock"),
        ("--net", "vhost-user=/nonexistent/net.sock"),
    ] {
        let (out, _) = run(&["--kernel", kernel.to_str().unwrap(), flag, value]);
        assert_eq!(out.status.code(), Some(2), "{flag}: {}", stderr(&out));
        let lines = error_lines(&out);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with(&format!("pvm: {flag} {value}: cannot connect")),
            "{lines:?}"
        );
    }
}

/// A guest that prints a dot to the UART, waits a little (a `loop` of 0x40000), and again,
/// forever: its progress is the length of its output.
fn ticking_guest() -> PathBuf {
    let mut code = print("ticking\r\n");
    code.extend_from_slice(&[
        0xb9, 0x00, 0x00, 0x04, 0x00, // top: mov ecx, 0x40000
        0xe2, 0xfe, // loop $
        0xb0, b'.', // mov al, '.'
        0xee, // out dx, al (dx is still the UART)
        0xeb, 0xf4, // jmp top
    ]);
    micro_kernel("ticking", &code)
}

/// How much output `count` has seen after `wait`.
fn output_after(count: &std::sync::atomic::AtomicUsize, wait: Duration) -> usize {
    std::thread::sleep(wait);
    count.load(std::sync::atomic::Ordering::SeqCst)
}

#[test]
fn sigusr1_pauses_the_guest_sigusr2_resumes_it_and_sigterm_still_ends_it_paused() {
    use std::io::Read;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    require_kvm();
    let kernel = ticking_guest();
    let (_primary, replica) = openpty();
    let before = termios_of(&replica);
    let (mut child, mut stdout) =
        pvm_on_terminal(&replica, &kernel, &["--cpus", "2", "--stats"], "ticking");
    let count = Arc::new(AtomicUsize::new(0));
    let reader = {
        let count = count.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                count.fetch_add(n, Ordering::SeqCst);
            }
        })
    };
    let signal = |signo| {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, signo) };
    };
    let grows = |what: &str| {
        let start = count.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while count.load(Ordering::SeqCst) == start {
            assert!(
                Instant::now() < deadline,
                "the guest made no progress {what}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    grows("before the pause");
    for round in 0..2 {
        signal(libc::SIGUSR1);
        // A second pause is a no-op; what was printed before the pause drains meanwhile.
        signal(libc::SIGUSR1);
        let paused_at = output_after(&count, Duration::from_millis(300));
        let later = output_after(&count, Duration::from_millis(1000));
        assert_eq!(
            paused_at, later,
            "round {round}: the paused guest kept printing"
        );
        signal(libc::SIGUSR2);
        grows("after the resume");
    }
    // Paused once more, SIGTERM ends the VM as usual.
    signal(libc::SIGUSR1);
    std::thread::sleep(Duration::from_millis(300));
    signal(libc::SIGTERM);
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert_eq!(termios_of(&replica), before, "terminal not restored");
    let ms: u64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("pvm: vm: pauses=3 paused_ms="))
        .and_then(|ms| ms.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pause count of 3 in --stats: {stderr}"));
    assert!(ms >= 2600, "{ms} ms paused: {stderr}");
}

/// "YYYY-MM-DDTHH:MM:SS.nnnnnnnnn" with digits where the digits go.
fn is_log_time(time: &str) -> bool {
    let shape: String = time
        .chars()
        .map(|c| if c.is_ascii_digit() { '9' } else { c })
        .collect();
    shape == "9999-99-99T99:99:99.999999999"
}

#[test]
fn log_path_and_metrics_path_get_firecracker_shaped_lines() {
    require_kvm();
    let mut code = print("hello\r\n");
    code.extend(out_then_halt(0x3c0, (5 << 2) | (1 << 5))); // ACPI S5 + SLP_EN
    let kernel = micro_kernel("log-metrics", &code);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("log-metrics");
    std::fs::create_dir_all(&dir).unwrap();
    let (log, metrics) = (dir.join("pvm.log"), dir.join("pvm.metrics"));
    // A line already there stays: the log is appended to, never truncated.
    std::fs::write(&log, "earlier line\n").unwrap();
    let _ = std::fs::remove_file(&metrics);
    let (out, _) = run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--mem",
        "64M",
        "--log-path",
        log.to_str().unwrap(),
        "--level",
        "Info",
        "--show-level",
        "--show-log-origin",
        "--metrics-path",
        metrics.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    // The log lines went to the file, not to stderr.
    assert!(!stderr(&out).contains("pvm: info:"), "{}", stderr(&out));
    let text = std::fs::read_to_string(&log).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("earlier line"), "{text}");
    let entered = lines
        .find(|l| l.contains("] kernel "))
        .unwrap_or_else(|| panic!("no kernel line in {text}"));
    let (time, rest) = entered.split_once(' ').unwrap();
    assert!(is_log_time(time), "{entered}");
    let tag = rest
        .strip_prefix("[anonymous-instance:main:INFO:src/vm/mod.rs:")
        .unwrap_or_else(|| panic!("{entered}"));
    let (line_number, message) = tag.split_once("] ").unwrap();
    assert!(line_number.parse::<u32>().is_ok(), "{entered}");
    assert!(message.starts_with("kernel "), "{entered}");

    let text = std::fs::read_to_string(&metrics).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    // One when the guest starts, one when it has ended.
    assert!(lines.len() >= 2, "{text}");
    let exits = |field: &str| -> u64 {
        lines
            .iter()
            .map(|l| {
                l["vcpu"][field]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{text}"))
            })
            .sum()
    };
    // The guest printed "hello\r\n" on the UART and wrote the power-off port.
    assert!(exits("exit_io_out") >= 8, "{text}");
    let last = lines.last().unwrap();
    assert!(last["utc_timestamp_ms"].as_u64().unwrap() > 1_700_000_000_000);
    assert_eq!(last["seccomp"]["num_faults"], 0, "{text}");
    assert_eq!(last["signals"]["sigterm"], 0, "{text}");
    assert!(last["logger"]["missed_log_count"].is_u64(), "{text}");
    // pvm has no UART counters: the group is left out rather than written as zeros.
    assert!(last.get("uart").is_none(), "{text}");
}

#[test]
fn unusable_log_and_metrics_paths_are_usage_errors() {
    let kernel = micro_kernel("never-run", &spin());
    for flag in ["--log-path", "--metrics-path"] {
        let (out, _) = run(&[
            "--kernel",
            kernel.to_str().unwrap(),
            flag,
            "/nonexistent/dir/file",
        ]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        let lines = error_lines(&out);
        assert!(
            lines.len() == 1
                && lines[0].starts_with(&format!("pvm: {flag}: "))
                && lines[0].contains("/nonexistent/dir/file"),
            "{lines:?}"
        );
    }
}

/// The JSON lines of the metrics file at `path`.
fn metrics_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn metrics_count_stop_signals_disks_and_seccomp_faults() {
    require_kvm();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("log-metrics");
    std::fs::create_dir_all(&dir).unwrap();
    let metrics = dir.join("signal.metrics");
    let _ = std::fs::remove_file(&metrics);
    let child = spinning_pvm(
        "spin-metrics",
        &["--metrics-path", metrics.to_str().unwrap()],
        &[],
    );
    // SAFETY: kill(2) on the child we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(128 + 15), "{}", stderr(&out));
    let lines = metrics_lines(&metrics);
    let last = lines.last().unwrap();
    assert_eq!(last["signals"]["sigterm"], 1, "{lines:?}");
    assert_eq!(last["block_disk0"]["execute_fails"], 0, "{lines:?}");
    assert_eq!(last["block"]["execute_fails"], 0, "{lines:?}");

    // A seccomp violation ends pvm at once; its handler still writes the count.
    let metrics = dir.join("seccomp.metrics");
    let _ = std::fs::remove_file(&metrics);
    let mut code = print("spinning\r\n");
    code.extend(spin());
    let kernel = micro_kernel("spin-probe-metrics", &code);
    let out = Command::new(PVM)
        .args(["--kernel", kernel.to_str().unwrap(), "--mem", "64M"])
        .args(["--metrics-path", metrics.to_str().unwrap()])
        .env("PVM_SECCOMP_PROBE", "vcpu")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let lines = metrics_lines(&metrics);
    assert_eq!(
        lines.last().unwrap()["seccomp"]["num_faults"],
        1,
        "{lines:?}"
    );
}

#[test]
fn vsock_listens_before_the_guest_runs_and_its_thread_is_sandboxed() {
    require_kvm();
    let socket = scratch_image("vsock-listen.sock");
    let _ = std::fs::remove_file(&socket);
    let spec = format!("cid=3,socket={}", socket.display());
    let mut child = spinning_pvm("spin-vsock", &["--vsock", &spec], &[]);
    // The micro guest has no vsock driver: the host process waits in the backlog.
    let connected = std::os::unix::net::UnixStream::connect(&socket);
    let start = Instant::now();
    let vsock_thread = loop {
        let threads = thread_seccomp_modes(child.id());
        let found = threads.into_iter().find(|(n, _)| n == "virtio-vsock0");
        if found.is_some() || start.elapsed() > Duration::from_secs(5) {
            break found;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(128 + libc::SIGTERM));
    assert!(connected.is_ok(), "{connected:?}");
    assert_eq!(vsock_thread, Some(("virtio-vsock0".into(), "2".into())));
    // A socket path in use is the user's error, named.
    let (out, _) = run(&[
        "--kernel",
        micro_kernel("vsock-busy", &spin()).to_str().unwrap(),
        "--vsock",
        &spec,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--vsock"), "{}", stderr(&out));
    let _ = std::fs::remove_file(&socket);
    for bad in ["cid=2,socket=/tmp/x", "cid=3", "cid=3,vhost=maybe"] {
        let (out, _) = run(&["--vsock", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(error_lines(&out)[0].contains("--vsock"), "{bad}");
    }
}

#[test]
fn a_share_is_attached_on_both_transports_and_its_thread_is_sandboxed() {
    require_kvm();
    let dir = scratch_image("share-dir");
    std::fs::create_dir_all(&dir).unwrap();
    for transport in ["pci", "mmio"] {
        let share = format!("{},tag=data", dir.display());
        let args = ["--share", &share, "--transport", transport];
        let mut child = spinning_pvm("spin-share", &args, &[]);
        let start = Instant::now();
        let fs_thread = loop {
            let threads = thread_seccomp_modes(child.id());
            let found = threads.into_iter().find(|(n, _)| n == "virtio-fs0");
            if found.as_ref().is_some_and(|(_, m)| m == "2") || start.elapsed().as_secs() > 5 {
                break found;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert_eq!(child.wait().unwrap().code(), Some(128 + libc::SIGTERM));
        assert_eq!(
            fs_thread,
            Some(("virtio-fs0".into(), "2".into())),
            "{transport}"
        );
    }
    let _ = std::fs::remove_dir(&dir);
    // A directory that is not there, or two shares with one tag, are the user's errors.
    let missing = scratch_image("share-missing");
    for args in [
        vec!["--share", missing.to_str().unwrap()],
        vec!["--share", "/tmp", "--share", "/tmp"],
        vec!["--share", "/tmp,tag="],
    ] {
        let (out, _) = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(error_lines(&out)[0].contains("--share"), "{args:?}");
    }
}

#[test]
fn cloud_init_adds_a_read_only_seed_disk_on_both_transports_and_bad_values_exit_2() {
    require_kvm();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cloud-init");
    let xdg = dir.join(format!("xdg-{}", std::process::id()));
    std::fs::create_dir_all(&xdg).unwrap();
    let user = dir.join("user-data");
    let user_data = "#cloud-config\nhostname: seeded\n";
    std::fs::write(&user, user_data).unwrap();
    let network = dir.join("network-config");
    std::fs::write(&network, "version: 2\n").unwrap();
    let flag = format!(
        "user-data={},network-config={}",
        user.display(),
        network.display()
    );
    for transport in ["pci", "mmio"] {
        let id = format!("seed-{transport}");
        let extra = ["--id", &id, "--transport", transport, "--cloud-init", &flag];
        let mut child = spinning_pvm(
            &format!("spin-seed-{transport}"),
            &extra,
            &[("XDG_RUNTIME_DIR", xdg.to_str().unwrap())],
        );
        // The seed is one more disk, read-only, after the user's.
        let start = Instant::now();
        let info = loop {
            let out = Command::new(PVM)
                .args(["status", &id, "--json"])
                .env("XDG_RUNTIME_DIR", &xdg)
                .output()
                .unwrap();
            if out.status.success() || start.elapsed() > Duration::from_secs(10) {
                break out;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let seeds = cloud_init_memfds(child.id());
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert_eq!(child.wait().unwrap().code(), Some(128 + libc::SIGTERM));
        assert!(info.status.success(), "{info:?}");
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        let disks = info["disks"].as_array().unwrap();
        assert_eq!(disks.len(), 2, "{transport}: {disks:?}");
        assert!(disks[0].as_str().unwrap().ends_with(".img"), "{disks:?}");
        assert_eq!(disks[1], "cloud-init(ro)", "{transport}");
        // In pvm's memory only: a FAT volume labelled CIDATA holding the files and the
        // meta-data pvm wrote from the id.
        assert_eq!(seeds.len(), 1, "{transport}");
        let seed = &seeds[0];
        assert_eq!(seed.len(), 1 << 20);
        assert_eq!(&seed[0x2b..0x36], b"CIDATA     ");
        assert_eq!(&seed[0x36..0x3e], b"FAT12   ");
        let contains = |needle: &[u8]| seed.windows(needle.len()).any(|w| w == needle);
        assert!(contains(user_data.as_bytes()), "{transport}");
        assert!(contains(b"version: 2\n"), "{transport}");
        let meta = format!("instance-id: {id}\nlocal-hostname: {id}\n");
        assert!(contains(meta.as_bytes()), "{transport}");
    }
    let empty = dir.join("empty");
    std::fs::write(&empty, "").unwrap();
    let kernel = micro_kernel("seed-refused", &spin());
    for (value, says) in [
        (
            "user-data=/nonexistent/u".to_string(),
            "user-data=/nonexistent/u: ",
        ),
        (format!("user-data={}", empty.display()), "is empty"),
        (format!("{flag},meta-data={}", dir.display()), "meta-data="),
        (format!("{flag},vendor-data=v"), "unknown key 'vendor-data'"),
        (format!("{flag},user-data=u"), "user-data= is given twice"),
        ("meta-data=m".to_string(), "user-data=FILE is missing"),
    ] {
        let (out, _) = run(&["--kernel", kernel.to_str().unwrap(), "--cloud-init", &value]);
        assert_eq!(out.status.code(), Some(2), "{value}: {}", stderr(&out));
        let lines = error_lines(&out);
        assert_eq!(lines.len(), 1, "{value}: {lines:?}");
        assert!(lines[0].starts_with("pvm: "), "{lines:?}");
        assert!(lines[0].contains("--cloud-init"), "{lines:?}");
        assert!(lines[0].contains(says), "{value}: {lines:?}");
    }
}

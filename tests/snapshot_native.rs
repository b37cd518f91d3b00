//! Snapshot and restore of the pvm binary on this host's /dev/kvm with a micro guest (see
//! tests/cli.rs): a guest that answers each byte of console input with the next letter of the
//! alphabet, its count in a register. After a snapshot, SIGKILL and a restore in a new process
//! the guest answers with the letter after the last one: it continues, it did not boot again.

mod micro;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use micro::http::{call, connect};
use micro::{cloud_init_memfds, micro_kernel, require_kvm};

const PVM: &str = env!("CARGO_BIN_EXE_pvm");

/// Answers each byte on the UART with 'a', 'b', 'c', ... (the count lives in BL).
fn counting_guest() -> PathBuf {
    let code = [
        0xb3, b'a', // mov bl, 'a'
        // loop:
        0x66, 0xba, 0xfd, 0x03, // mov dx, 0x3fd (line status)
        0xec, // in al, dx
        0xa8, 0x01, // test al, 1 (data ready)
        0x74, 0xfb, // jz back to the in
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xec, // in al, dx (take the byte)
        0x88, 0xd8, // mov al, bl
        0xee, // out dx, al
        0xfe, 0xc3, // inc bl
        0xeb, 0xeb, // jmp loop (-21)
    ];
    micro_kernel("snapshot-counter", &code)
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("snapshot-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// A pvm process with its console on pipes: bytes it prints arrive on `output`.
struct Pvm {
    child: Child,
    input: ChildStdin,
    output: Receiver<u8>,
}

impl Pvm {
    fn start(args: &[&str]) -> Pvm {
        let mut child = Command::new(PVM)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let input = child.stdin.take().unwrap();
        let output = pump(child.stdout.take().unwrap());
        Pvm {
            child,
            input,
            output,
        }
    }

    /// Sends one byte and returns the guest's answer, if it answers within `wait`.
    fn ask(&mut self, wait: Duration) -> Option<u8> {
        self.input.write_all(b"x").unwrap();
        self.input.flush().unwrap();
        self.output.recv_timeout(wait).ok()
    }

    fn kill(mut self) -> String {
        let _ = self.child.kill();
        let out = self.child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

fn pump(mut from: ChildStdout) -> Receiver<u8> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut byte = [0u8];
        while matches!(from.read(&mut byte), Ok(1)) {
            if tx.send(byte[0]).is_err() {
                break;
            }
        }
    });
    rx
}

const ANSWER: Duration = Duration::from_secs(10);

/// Boots the counting guest through the API, lets it count to `c`, pauses it and snapshots it.
/// `disk`, when given, is attached as a drive (the guest never touches it).
/// `extra` are more (path, body) PUTs before the start.
fn counted_snapshot(
    name: &str,
    disk: Option<&PathBuf>,
    extra: &[(&str, String)],
) -> (PathBuf, PathBuf) {
    counted_snapshot_with(name, disk, extra, &[])
}

/// [`counted_snapshot`] of a pvm started with `flags` too.
fn counted_snapshot_with(
    name: &str,
    disk: Option<&PathBuf>,
    extra: &[(&str, String)],
    flags: &[&str],
) -> (PathBuf, PathBuf) {
    let kernel = counting_guest();
    let socket = scratch(&format!("{name}.sock"));
    let mut args = vec!["--api-sock", socket.to_str().unwrap(), "--mem", "64M"];
    args.extend_from_slice(flags);
    let mut pvm = Pvm::start(&args);
    let mut api = connect(&socket, &mut pvm.child);
    let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display());
    assert_eq!(call(&mut api, "PUT", "/boot-source", Some(&boot)).0, 204);
    if let Some(disk) = disk {
        let drive = format!(
            r#"{{"drive_id": "d", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}"#,
            disk.display()
        );
        assert_eq!(call(&mut api, "PUT", "/drives/d", Some(&drive)).0, 204);
    }
    for (path, body) in extra {
        let (status, answer) = call(&mut api, "PUT", path, Some(body));
        assert_eq!(status, 204, "{path}: {answer}");
    }
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(call(&mut api, "PUT", "/actions", Some(start)).0, 204);
    for want in [b'a', b'b', b'c'] {
        assert_eq!(pvm.ask(ANSWER), Some(want));
    }
    let (snapshot, mem) = (
        scratch(&format!("{name}.snap")),
        scratch(&format!("{name}.mem")),
    );
    let body = format!(
        r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        snapshot.display(),
        mem.display()
    );
    let (status, answer) = call(&mut api, "PUT", "/snapshot/create", Some(&body));
    assert_eq!(status, 400, "a running VM is not snapshotted: {answer}");
    assert!(answer.contains("pause it first"), "{answer}");
    assert_eq!(
        call(&mut api, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0,
        204
    );
    let (status, answer) = call(&mut api, "PUT", "/snapshot/create", Some(&body));
    assert_eq!(status, 204, "{answer}");
    // SIGKILL: nothing of the first process is needed any more.
    pvm.kill();
    use std::os::unix::fs::PermissionsExt;
    for file in [&snapshot, &mem] {
        let mode = std::fs::metadata(file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", file.display());
    }
    (snapshot, mem)
}

#[test]
fn a_restored_guest_counts_on_from_where_it_stopped_twice_over() {
    require_kvm();
    let (snapshot, mem) = counted_snapshot("cli", None, &[]);
    let args = [
        "--restore",
        snapshot.to_str().unwrap(),
        "--mem-file",
        mem.to_str().unwrap(),
    ];
    // Two clones of one snapshot at once: both go on from 'd'.
    let mut first = Pvm::start(&args);
    let mut second = Pvm::start(&args);
    assert_eq!(first.ask(ANSWER), Some(b'd'), "{}", "first clone");
    assert_eq!(second.ask(ANSWER), Some(b'd'), "second clone");
    assert_eq!(first.ask(ANSWER), Some(b'e'));
    first.kill();
    second.kill();
}

#[test]
fn a_load_with_resume_vm_false_waits_for_patch_resumed() {
    require_kvm();
    let disk = scratch("api.disk");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let (snapshot, mem) = counted_snapshot("api", Some(&disk), &[]);
    let socket = scratch("load.sock");
    let mut pvm = Pvm::start(&["--api-sock", socket.to_str().unwrap()]);
    let mut api = connect(&socket, &mut pvm.child);
    let load = |mem: &str, snapshot: &str| {
        format!(
            r#"{{"snapshot_path": "{snapshot}", "mem_backend": {{"backend_type": "File", "backend_path": "{mem}"}}, "resume_vm": false}}"#
        )
    };
    let mem = mem.to_str().unwrap();
    // Damaged and foreign files are refused, and the process can still load a good one.
    let corrupt = scratch("corrupt.snap");
    let mut bytes = std::fs::read(&snapshot).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&corrupt, &bytes).unwrap();
    let foreign = scratch("foreign.snap");
    std::fs::write(&foreign, b"\x7fELF\x02\x01\x01\0 not a snapshot").unwrap();
    for (file, want) in [(&corrupt, "checksum"), (&foreign, "not a pvm snapshot")] {
        let body = load(mem, file.to_str().unwrap());
        let (status, answer) = call(&mut api, "PUT", "/snapshot/load", Some(&body));
        assert_eq!(status, 400, "{answer}");
        assert!(answer.contains(want), "{answer}");
    }
    let body = load(mem, snapshot.to_str().unwrap());
    // A disk gone since the snapshot fails the load once KVM's VM exists; it is torn down and
    // the same process loads again once the disk is back.
    std::fs::rename(&disk, disk.with_extension("away")).unwrap();
    let (status, answer) = call(&mut api, "PUT", "/snapshot/load", Some(&body));
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("api.disk"), "{answer}");
    std::fs::rename(disk.with_extension("away"), &disk).unwrap();
    let (status, answer) = call(&mut api, "PUT", "/snapshot/load", Some(&body));
    assert_eq!(status, 204, "{answer}");
    let (_, info) = call(&mut api, "GET", "/", None);
    assert!(info.contains(r#""state":"Paused""#), "{info}");
    assert_eq!(
        pvm.ask(Duration::from_millis(500)),
        None,
        "a paused guest answers nothing"
    );
    assert_eq!(
        call(&mut api, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0,
        204
    );
    assert_eq!(pvm.output.recv_timeout(ANSWER).ok(), Some(b'd'));
    let (status, answer) = call(&mut api, "PUT", "/snapshot/load", Some(&body));
    assert_eq!(status, 400, "{answer}");
    the_restored_drive_is_the_apis(&mut api, &disk);
    pvm.kill();
    // From the command line, a damaged file is one line and exit code 2.
    let out = Command::new(PVM)
        .args(["--restore", corrupt.to_str().unwrap(), "--mem-file", mem])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let lines = stderr.lines().filter(|l| !l.contains("kvm_pvm")).count();
    assert_eq!(lines, 1, "{stderr}");
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
}

/// After a load the API knows the restored VM as one it started: its configuration, and its
/// drive by the id the snapshot recorded, for new limits and a new backing file.
fn the_restored_drive_is_the_apis(
    api: &mut std::os::unix::net::UnixStream,
    disk: &std::path::Path,
) {
    let (status, config) = call(api, "GET", "/vm/config", None);
    assert_eq!(status, 200, "{config}");
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["machine-config"]["mem_size_mib"], 64, "{config}");
    assert_eq!(config["drives"][0]["drive_id"], "d", "{config}");
    assert_eq!(
        config["drives"][0]["path_on_host"],
        disk.to_str().unwrap(),
        "{config}"
    );
    let limit = r#"{"drive_id": "d", "rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}}"#;
    let (status, answer) = call(api, "PATCH", "/drives/d", Some(limit));
    assert_eq!(status, 204, "{answer}");
    let (_, config) = call(api, "GET", "/vm/config", None);
    assert!(config.contains(r#""size":100"#), "{config}");
    let other = scratch("api-other.disk");
    std::fs::write(&other, vec![0u8; 2 << 20]).unwrap();
    let swap = format!(
        r#"{{"drive_id": "d", "path_on_host": "{}"}}"#,
        other.display()
    );
    let (status, answer) = call(api, "PATCH", "/drives/d", Some(&swap));
    assert_eq!(status, 204, "{answer}");
    let missing = r#"{"drive_id": "e", "rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}"#;
    let (status, answer) = call(api, "PATCH", "/drives/e", Some(missing));
    assert_eq!(status, 400, "{answer}");
}

#[test]
fn a_restored_vm_rebuilds_its_balloon_and_vsock_and_binds_the_vsock_path_again() {
    require_kvm();
    let uds = scratch("bv.vsock");
    let extra = [
        (
            "/balloon",
            r#"{"amount_mib": 4, "deflate_on_oom": true, "stats_polling_interval_s": 0}"#
                .to_string(),
        ),
        (
            "/vsock",
            format!(r#"{{"guest_cid": 7, "uds_path": "{}"}}"#, uds.display()),
        ),
    ];
    let (snapshot, mem) = counted_snapshot("bv", None, &extra);
    let socket = scratch("bv-load.sock");
    let mut pvm = Pvm::start(&["--api-sock", socket.to_str().unwrap()]);
    let mut api = connect(&socket, &mut pvm.child);
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
        snapshot.display(),
        mem.display()
    );
    // The killed VM left its vsock socket behind: the path is taken, and the load says so.
    assert!(uds.exists());
    let (status, answer) = call(&mut api, "PUT", "/snapshot/load", Some(&body));
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("bv.vsock"), "{answer}");
    std::fs::remove_file(&uds).unwrap();
    let (status, answer) = call(&mut api, "PUT", "/snapshot/load", Some(&body));
    assert_eq!(status, 204, "{answer}");
    assert_eq!(pvm.ask(ANSWER), Some(b'd'));
    let (_, config) = call(&mut api, "GET", "/vm/config", None);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["balloon"]["amount_mib"], 4, "{config}");
    assert_eq!(config["balloon"]["deflate_on_oom"], true, "{config}");
    assert_eq!(config["vsock"]["guest_cid"], 7, "{config}");
    // The restored device listens at the path again.
    assert!(std::os::unix::net::UnixStream::connect(&uds).is_ok());
    pvm.kill();
}

#[test]
fn a_restored_vm_gets_the_snapshots_cloud_init_seed_not_one_built_again() {
    require_kvm();
    let user = scratch("seed.user-data");
    std::fs::write(&user, "#cloud-config\nhostname: before-snapshot\n").unwrap();
    let flag = format!("user-data={}", user.display());
    let flags = ["--id", "seeded-vm", "--cloud-init", &flag];
    let (snapshot, mem) = counted_snapshot_with("seed", None, &[], &flags);
    // The files change (or go) after the snapshot: the restore does not read them.
    std::fs::write(&user, "#cloud-config\nhostname: after-snapshot\n").unwrap();
    let args = [
        "--restore",
        snapshot.to_str().unwrap(),
        "--mem-file",
        mem.to_str().unwrap(),
    ];
    let mut clone = Pvm::start(&args);
    assert_eq!(clone.ask(ANSWER), Some(b'd'), "the clone goes on");
    let seeds = cloud_init_memfds(clone.child.id());
    let stderr = clone.kill();
    assert_eq!(seeds.len(), 1, "one seed in the clone: {stderr}");
    let seed = &seeds[0];
    assert_eq!(seed.len(), 1 << 20);
    assert_eq!(&seed[0x2b..0x36], b"CIDATA     ");
    let contains = |needle: &[u8]| seed.windows(needle.len()).any(|w| w == needle);
    assert!(contains(b"hostname: before-snapshot\n"));
    assert!(!contains(b"after-snapshot"));
    assert!(contains(b"local-hostname: seeded-vm\n"));
    // --cloud-init with --restore is refused: the seed comes from the snapshot.
    let out = Command::new(PVM)
        .args(args)
        .args(["--cloud-init", &flag])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the seed it booted with is in the snapshot"),
        "{stderr}"
    );
}

/// Answers each byte on the UART with 'a', 'b', 'c', ..., the count kept in guest RAM at
/// 2 MiB (not in a register): which memory file a restore gets shows in the answer.
fn memory_counting_guest() -> PathBuf {
    let code = [
        0xc6, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, b'a', // mov byte [0x200000], 'a'
        // loop:
        0x66, 0xba, 0xfd, 0x03, // mov dx, 0x3fd (line status)
        0xec, // in al, dx
        0xa8, 0x01, // test al, 1 (data ready)
        0x74, 0xfb, // jz back to the in
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xec, // in al, dx (take the byte)
        0x8a, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, // mov al, [0x200000]
        0xee, // out dx, al
        0xfe, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, // inc byte [0x200000]
        0xeb, 0xe1, // jmp loop (-31)
    ];
    micro_kernel("snapshot-memory-counter", &code)
}

/// PUT /snapshot/create of `kind` into `name`.snap and `name`.mem; returns the answer.
fn take(
    api: &mut std::os::unix::net::UnixStream,
    kind: &str,
    name: &str,
) -> (u16, String, PathBuf, PathBuf) {
    let (snapshot, mem) = (
        scratch(&format!("{name}.snap")),
        scratch(&format!("{name}.mem")),
    );
    let body = format!(
        r#"{{"snapshot_type": "{kind}", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        snapshot.display(),
        mem.display()
    );
    let (status, answer) = call(api, "PUT", "/snapshot/create", Some(&body));
    (status, answer, snapshot, mem)
}

fn set_paused(api: &mut std::os::unix::net::UnixStream, paused: bool) {
    let body = if paused {
        r#"{"state": "Paused"}"#
    } else {
        r#"{"state": "Resumed"}"#
    };
    assert_eq!(call(api, "PATCH", "/vm", Some(body)).0, 204);
}

/// A process that loads `snapshot` over `mem` through its API, resumed.
fn load(name: &str, snapshot: &Path, mem: &Path, track: bool) -> (Pvm, UnixStream) {
    let socket = scratch(&format!("{name}.sock"));
    let mut pvm = Pvm::start(&["--api-sock", socket.to_str().unwrap()]);
    let mut api = connect(&socket, &mut pvm.child);
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true, "track_dirty_pages": {track}}}"#,
        snapshot.display(),
        mem.display()
    );
    let (status, answer) = call(&mut api, "PUT", "/snapshot/load", Some(&body));
    assert_eq!(status, 204, "{answer}");
    (pvm, api)
}

/// `pvm snapshot-layer`: its exit code and stderr.
fn layer(diff: &Path, diff_mem: &Path, base: &Path, base_mem: &Path) -> (i32, String) {
    let out = Command::new(PVM)
        .arg("snapshot-layer")
        .args(["--diff-snapshot", diff.to_str().unwrap()])
        .args(["--diff-mem", diff_mem.to_str().unwrap()])
        .args(["--base-snapshot", base.to_str().unwrap()])
        .args(["--base-mem", base_mem.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

/// Full snapshot at 'c', Diff at 'f': the Diff's memory file is sparse, layering it onto the
/// Full's makes a guest that goes on at 'g' (the Full's file alone: at 'd'); a restored VM
/// tracking dirty pages takes a Diff of its own that layers on in turn; without tracking a
/// Diff is refused.
#[test]
fn diff_snapshots_layer_onto_their_full_snapshot() {
    require_kvm();
    let kernel = memory_counting_guest();
    let socket = scratch("diff.sock");
    let mut pvm = Pvm::start(&["--api-sock", socket.to_str().unwrap()]);
    let mut api = connect(&socket, &mut pvm.child);
    let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display());
    assert_eq!(call(&mut api, "PUT", "/boot-source", Some(&boot)).0, 204);
    let machine = r#"{"vcpu_count": 1, "mem_size_mib": 64, "track_dirty_pages": true}"#;
    assert_eq!(
        call(&mut api, "PUT", "/machine-config", Some(machine)).0,
        204
    );
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(call(&mut api, "PUT", "/actions", Some(start)).0, 204);
    let (_, config) = call(&mut api, "GET", "/machine-config", None);
    assert!(config.contains(r#""track_dirty_pages":true"#), "{config}");
    for want in *b"abc" {
        assert_eq!(pvm.ask(ANSWER), Some(want));
    }
    set_paused(&mut api, true);
    let (status, answer, full, full_mem) = take(&mut api, "Full", "diff-full");
    assert_eq!(status, 204, "{answer}");
    set_paused(&mut api, false);
    for want in *b"def" {
        assert_eq!(pvm.ask(ANSWER), Some(want));
    }
    set_paused(&mut api, true);
    let (status, answer, diff, diff_mem) = take(&mut api, "Diff", "diff-1");
    assert_eq!(status, 204, "{answer}");
    pvm.kill();
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&diff_mem).unwrap();
    assert_eq!(meta.len(), 64 << 20, "a Diff's file has the guest's size");
    assert!(
        meta.blocks() * 512 <= 256 << 10,
        "only the pages written since the Full: {} KiB",
        meta.blocks() / 2
    );

    // The Full's memory alone holds the count as it was then ('c', or 'd' if the vCPU had
    // gone past its increment when it paused for the Full); the Diff's vCPU state may in turn
    // stand just before its increment (paused right after answering 'f'), which it then does
    // first: 'd' or 'e'. Never the Diff's own count ('g' on): that is in the Diff's pages.
    let (mut stale, _) = load("diff-stale", &diff, &full_mem, false);
    let answer = stale.ask(ANSWER);
    assert!(matches!(answer, Some(b'c' | b'd' | b'e')), "{answer:?}");
    stale.kill();
    // Refused: layering onto a snapshot it does not follow, or a Full as a Diff.
    let (code, stderr) = layer(&diff, &diff_mem, &diff, &full_mem);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("was taken over snapshot"), "{stderr}");
    let (code, stderr) = layer(&full, &full_mem, &full, &full_mem);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("a Full snapshot"), "{stderr}");
    let (code, stderr) = layer(&diff, &diff_mem, &full, &full_mem);
    assert_eq!(code, 0, "{stderr}");

    // Without tracking a restored VM takes Full snapshots only.
    let (mut untracked, mut api) = load("diff-untracked", &diff, &full_mem, false);
    assert_eq!(untracked.ask(ANSWER), Some(b'g'));
    set_paused(&mut api, true);
    let (status, answer, ..) = take(&mut api, "Diff", "diff-refused");
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("needs dirty page tracking"), "{answer}");
    untracked.kill();

    // A restored VM tracking dirty pages: its Diff follows the Diff it was restored from.
    let (mut tracked, mut api) = load("diff-tracked", &diff, &full_mem, true);
    assert_eq!(tracked.ask(ANSWER), Some(b'g'));
    assert_eq!(tracked.ask(ANSWER), Some(b'h'));
    set_paused(&mut api, true);
    let (status, answer, diff2, diff2_mem) = take(&mut api, "Diff", "diff-2");
    assert_eq!(status, 204, "{answer}");
    tracked.kill();
    let (code, stderr) = layer(&diff2, &diff2_mem, &full, &full_mem);
    assert_eq!(code, 1, "it follows diff-1, not the Full: {stderr}");
    let (code, stderr) = layer(&diff2, &diff2_mem, &diff, &full_mem);
    assert_eq!(code, 0, "{stderr}");
    let (mut last, _) = load("diff-last", &diff2, &full_mem, false);
    assert_eq!(last.ask(ANSWER), Some(b'i'));
    last.kill();
}

/// `pvm uffd-handler` serving `mem` on `socket`, once the socket is there.
fn uffd_handler(mem: &Path, socket: &Path) -> Child {
    let mut child = Command::new(PVM)
        .arg("uffd-handler")
        .args(["--mem-file", mem.to_str().unwrap()])
        .args(["--socket", socket.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..500 {
        if socket.exists() {
            return child;
        }
        assert!(child.try_wait().unwrap().is_none(), "uffd-handler ended");
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("uffd-handler never listened on {}", socket.display());
}

/// mem_backend Uffd with pvm's own handler: the guest counts on from its RAM as the handler
/// serves it, Diff and Full snapshots of the restored VM read all of it through the handler,
/// and when the handler is killed pvm ends with an error naming it instead of hanging. A
/// handler socket nobody listens on fails the load naming backend_path.
#[test]
fn a_uffd_restore_is_served_by_the_handler_and_ends_when_it_goes() {
    require_kvm();
    let kernel = memory_counting_guest();
    let socket = scratch("uffd.sock");
    let mut pvm = Pvm::start(&["--api-sock", socket.to_str().unwrap(), "--mem", "64M"]);
    let mut api = connect(&socket, &mut pvm.child);
    let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display());
    assert_eq!(call(&mut api, "PUT", "/boot-source", Some(&boot)).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(call(&mut api, "PUT", "/actions", Some(start)).0, 204);
    for want in *b"abc" {
        assert_eq!(pvm.ask(ANSWER), Some(want));
    }
    set_paused(&mut api, true);
    let (status, answer, full, full_mem) = take(&mut api, "Full", "uffd-full");
    assert_eq!(status, 204, "{answer}");
    pvm.kill();

    let load_body = |uds: &Path| {
        format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "Uffd", "backend_path": "{}"}}, "resume_vm": true, "track_dirty_pages": true}}"#,
            full.display(),
            uds.display()
        )
    };
    // Nobody listens: the load fails, naming the socket.
    let nobody = scratch("uffd-nobody.uds");
    let socket = scratch("uffd-load.sock");
    let mut refused = Pvm::start(&["--api-sock", socket.to_str().unwrap()]);
    let mut api = connect(&socket, &mut refused.child);
    let (status, answer) = call(&mut api, "PUT", "/snapshot/load", Some(&load_body(&nobody)));
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains(nobody.to_str().unwrap()), "{answer}");
    refused.kill();
    let out = Command::new(PVM)
        .args(["--restore", full.to_str().unwrap()])
        .args(["--mem-uffd", nobody.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(nobody.to_str().unwrap()), "{stderr}");

    let uds = scratch("uffd-handler.uds");
    let mut handler = uffd_handler(&full_mem, &uds);
    let socket = scratch("uffd-served.sock");
    let mut served = Pvm::start(&["--api-sock", socket.to_str().unwrap()]);
    let mut api = connect(&socket, &mut served.child);
    let (status, answer) = call(&mut api, "PUT", "/snapshot/load", Some(&load_body(&uds)));
    assert_eq!(status, 204, "{answer}");
    // The count lives in guest RAM: only pages from the memory file make it go on at 'd'.
    for want in *b"de" {
        assert_eq!(served.ask(ANSWER), Some(want));
    }
    set_paused(&mut api, true);
    let (status, answer, diff, diff_mem) = take(&mut api, "Diff", "uffd-diff");
    assert_eq!(status, 204, "{answer}");
    let (status, answer, _, full2_mem) = take(&mut api, "Full", "uffd-full2");
    assert_eq!(status, 204, "{answer}");
    set_paused(&mut api, false);
    assert_eq!(served.ask(ANSWER), Some(b'f'));
    // The Full taken through the handler is the whole RAM: restored from it, the guest
    // goes on at 'f' too; so does the Diff layered onto a copy of the first Full.
    let (mut from_full, _) = load("uffd-from-full2", &diff, &full2_mem, false);
    assert_eq!(from_full.ask(ANSWER), Some(b'f'));
    from_full.kill();
    let base_mem = scratch("uffd-base.mem");
    std::fs::copy(&full_mem, &base_mem).unwrap();
    let (code, stderr) = layer(&diff, &diff_mem, &full, &base_mem);
    assert_eq!(code, 0, "{stderr}");
    let (mut from_diff, _) = load("uffd-from-diff", &diff, &base_mem, false);
    assert_eq!(from_diff.ask(ANSWER), Some(b'f'));
    from_diff.kill();

    // The handler goes: pvm ends the VM with the error, it does not hang.
    handler.kill().unwrap();
    let _ = handler.wait();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = served.child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "pvm still runs");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1), "VMM failure");
    let stderr = served.kill();
    assert!(
        stderr.contains("page-fault handler") && stderr.contains(uds.to_str().unwrap()),
        "{stderr}"
    );
}

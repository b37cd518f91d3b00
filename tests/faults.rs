//! Host-side faults while a guest runs, and how pvm lives through them:
//!
//! - the disk image's host filesystem fills up (a 4 MiB tmpfs under a sparse 16 MiB image);
//! - the disk turns unreadable and unwritable mid-run, then recovers (null_blk bad blocks);
//! - pvm is SIGKILLed right after the guest flushed, with and without a power cut behind it
//!   (null_blk's volatile write cache dropped): flushed data must be on the disk;
//! - the tap is deleted while the guest sends (in-process data plane and vhost-net);
//! - stdout and stderr are pipes whose reader left, and SIGPIPE, SIGINT, SIGHUP and the console's
//!   quit escape arrive (natively, with micro guests: no guest kernel needed).
//!
//! The guest scenarios run in one batch (one emulated KVM host boot, see tests/common). Device
//! mapper's error target would be the usual tool for the unreadable disk, but busybox has no
//! dmsetup and Debian's is dynamically linked (libdevmapper, libudev, libselinux, ...) while the
//! emulated host has no libc. null_blk, from the same Debian kernel package as the host
//! (scripts/guest-assets puts it in debian/fault-modules), is configured through configfs with
//! plain shell, injects EIO for chosen sectors at any time, and models a write-back cache that
//! a power cut loses.

mod common;
mod micro;

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{Batch, Kernel, Scenario};

const PVM: &str = env!("CARGO_BIN_EXE_pvm");

/// `lines` numbered 16-byte lines: 256 of them fill one 4 KiB block.
fn pattern(tag: char, lines: usize) -> Vec<u8> {
    (1..=lines)
        .flat_map(|i| format!("{tag}-PATTERN{i:06}\n").into_bytes())
        .collect()
}

/// Guest commands writing `pattern(tag, lines)` to /tmp/TAG.
fn make_pattern(tag: char, lines: usize) -> String {
    format!("for i in $(seq 1 {lines}); do printf '{tag}-PATTERN%06d\\n' $i; done > /tmp/{tag}\n")
}

/// Shell functions every scenario's host script uses: `wait_for TEXT SECONDS` polls pvm's
/// console (out.log) for TEXT; pvm must not take the script down with SIGPIPE.
const HOST_FUNCTIONS: &str = "trap '' PIPE\n\
    wait_for() {\n\
    \x20   i=0\n\
    \x20   while ! grep -q \"$1\" out.log; do\n\
    \x20       i=$((i + 1))\n\
    \x20       [ $i -gt $(($2 * 5)) ] && { echo \"host: no '$1' after $2 s\"; return 1; }\n\
    \x20       sleep 0.2\n\
    \x20   done\n\
    }\n";

/// A host script: runs `setup`, starts pvm in the background (stdin on a fifo the script holds
/// as fd 3, console in out.log, stderr in err.log, pid in $pid), runs `steps`, waits for pvm
/// (status in $rc), shows both logs and runs `after`; exits with $rc. pvm's stderr also lands
/// in out/pvm.stderr.
fn host_script(setup: &str, steps: &str, after: &str) -> String {
    format!(
        "{HOST_FUNCTIONS}{setup}\n\
         mkfifo in\n\
         {{pvm}} < in > out.log 2> err.log &\n\
         pid=$!\n\
         exec 3> in\n\
         {steps}\n\
         wait $pid\n\
         rc=$?\n\
         mkdir -p out\n\
         cp err.log out/pvm.stderr\n\
         cat out.log\n\
         echo '----- pvm stderr'\n\
         cat err.log\n\
         {after}\n\
         exit $rc"
    )
}

/// Host commands that load null_blk (unless the kernel has it already: a scenario before this
/// one, or a direct host) and power on /dev/NAME: 16 MiB, memory-backed, with `extra` configfs
/// settings (`echo VALUE > $nb/ATTRIBUTE`) before power-on; $nb is its configfs directory.
fn null_blk(name: &str, extra: &str) -> String {
    format!(
        "[ -d /sys/module/configfs ] || insmod ./configfs.ko || exit 90\n\
         [ -d /sys/module/null_blk ] || insmod ./null_blk.ko nr_devices=0 || exit 90\n\
         grep -q ' /sys/kernel/config ' /proc/mounts || \
         mount -t configfs configfs /sys/kernel/config\n\
         nb=/sys/kernel/config/nullb/{name}\n\
         mkdir $nb || exit 91\n\
         echo 16 > $nb/size\n\
         echo 1 > $nb/memory_backed\n\
         {extra}\n\
         echo 1 > $nb/power\n\
         [ -b /dev/{name} ] || {{ echo 'host: no /dev/{name}'; exit 91; }}"
    )
}

/// The null_blk modules for a scenario's working directory.
fn with_null_blk(scenario: Scenario) -> Scenario {
    let dir = common::assets().join("debian/fault-modules");
    ["configfs", "null_blk"].iter().fold(scenario, |s, m| {
        let path = dir.join(format!("{m}.ko"));
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/guest-assets)", path.display()));
        s.file(&format!("{m}.ko"), bytes)
    })
}

/// A guest that has the host write `go` on the console before it goes on.
const GUEST_WAIT: &str =
    "wait_host() { read -t 60 line || echo 'guest: no word from the host'; }\n";

/// The io_uring engine's `--disk` options, for the scenarios run again on it.
const IO_URING: &str = ",engine=io_uring";

fn disk_full(name: &str, engine: &str) -> Scenario {
    // 8 MiB of O_DIRECT writes into an image whose filesystem holds 4 MiB; then 20 more writes
    // into holes (each fails: one request each), an overwrite of blocks that exist (fits), and
    // reads. Every step's outcome is printed; pvm must serve them all and keep running.
    let init = "echo \"disk-sectors: $(cat /sys/block/vda/size)\"\n\
        if dd if=/dev/zero of=/dev/vda bs=65536 count=128 oflag=direct 2>/tmp/e; then\n\
        \x20   echo 'fill: no error'\n\
        else\n\
        \x20   echo \"fill: $(head -n 1 /tmp/e)\"\n\
        fi\n\
        n=0\n\
        for i in $(seq 1 20); do\n\
        \x20   dd if=/dev/zero of=/dev/vda bs=65536 count=1 seek=$((100 + i)) oflag=direct \
        2>/dev/null || n=$((n + 1))\n\
        done\n\
        echo \"failed-writes-into-holes: $n\"\n\
        dd if=/dev/urandom of=/dev/vda bs=4096 count=16 oflag=direct 2>/dev/null && \
        echo overwrite-ok\n\
        dd if=/dev/vda of=/dev/null bs=65536 count=64 iflag=direct 2>/dev/null && echo read-ok\n\
        echo DISK-FULL-SURVIVED\n";
    let setup = "mkdir small\n\
                 mount -t tmpfs -o size=4m tmpfs small || exit 90\n\
                 truncate -s 16M small/disk.img";
    Scenario::boot(name, Kernel::MinimalElf, 1, init)
        .args(["--disk", &format!("small/disk.img{engine}"), "--stats"])
        .script(&host_script(setup, "exec 3>&-", "umount small"))
        .timeout(60)
}

fn disk_unreadable(name: &str, engine: &str) -> Scenario {
    // Block 256 (sectors 2048-2055) turns bad after the guest wrote and flushed it, and good
    // again later. The host's page cache is dropped so pvm's reads reach the device. (One short
    // range: 6.1's bad-block table stores a range of more than 512 sectors out of order, and
    // then misses it.)
    let init = format!(
        "{GUEST_WAIT}{}\
         r() {{\n\
         \x20   if dd if=/dev/vda of=/tmp/r bs=4096 skip=$1 count=1 iflag=direct 2>/tmp/e; then\n\
         \x20       echo \"read $1: $(head -c 15 /tmp/r)\"\n\
         \x20   else\n\
         \x20       echo \"read $1: failed: $(head -n 1 /tmp/e)\"\n\
         \x20   fi\n\
         }}\n\
         f() {{\n\
         \x20   if sync /dev/vda 2>/tmp/e; then echo \"flush $1: ok\"; \
         else echo \"flush $1: failed: $(head -n 1 /tmp/e)\"; fi\n\
         }}\n\
         dd if=/tmp/A of=/dev/vda bs=4096 seek=256 oflag=direct 2>/dev/null && echo write-A-ok\n\
         f 1\n\
         echo PHASE-1-DONE\n\
         wait_host\n\
         r 256\n\
         r 0\n\
         dd if=/tmp/B of=/dev/vda bs=4096 seek=256 oflag=direct 2>/dev/null && echo write-B-ok\n\
         f 2\n\
         f 3\n\
         echo PHASE-2-DONE\n\
         wait_host\n\
         r 256\n\
         f 4\n\
         echo PHASE-3-DONE\n",
        make_pattern('A', 256) + &make_pattern('B', 256)
    );
    let steps = "wait_for PHASE-1-DONE 45 || exit 92\n\
                 echo +2048-2055 > $nb/badblocks\n\
                 echo \"host: bad blocks: $(cat $nb/badblocks)\"\n\
                 sync; echo 3 > /proc/sys/vm/drop_caches\n\
                 echo go >&3\n\
                 wait_for PHASE-2-DONE 45 || exit 92\n\
                 echo -0-100000 > $nb/badblocks\n\
                 echo \"host: bad blocks now: '$(cat $nb/badblocks)'\"\n\
                 echo go >&3";
    // After pvm: what the device really holds in block 256.
    let after = "echo 3 > /proc/sys/vm/drop_caches\n\
                 dd if=/dev/nullb-bad of=out/block256 bs=4096 skip=256 count=1 iflag=direct \
                 2>/dev/null\n\
                 echo 0 > $nb/power; rmdir $nb";
    with_null_blk(
        Scenario::boot(name, Kernel::MinimalElf, 1, &init)
            .args(["--disk", &format!("/dev/nullb-bad{engine}"), "--stats"])
            .script(&host_script(&null_blk("nullb-bad", ""), steps, after))
            .timeout(60),
    )
}

/// The guest writes pattern P (17 blocks) and flushes, writes U to block 256 without a flush,
/// says KILL-NOW and waits; the host SIGKILLs pvm right then.
fn kill_after_flush_guest() -> String {
    make_pattern('P', 4352)
        + &make_pattern('U', 256)
        + "dd if=/tmp/P of=/dev/vda bs=4096 conv=fsync 2>/tmp/e && echo P-written-and-flushed\n\
           dd if=/tmp/U of=/dev/vda bs=4096 seek=256 oflag=direct 2>/dev/null && \
           echo U-written-unflushed\n\
           echo KILL-NOW\n\
           sleep 600\n"
}

const KILL_WHEN_TOLD: &str = "wait_for KILL-NOW 45 || exit 92\nkill -KILL $pid";

/// Reports how pvm ended; the scenario itself succeeded (the test checks the status).
const KILLED: &str = "echo \"host: pvm killed, status $rc\"\nrc=0\n";

fn sigkill_file() -> Scenario {
    Scenario::boot(
        "sigkill-file",
        Kernel::MinimalElf,
        1,
        &kill_after_flush_guest(),
    )
    .args(["--disk", "k.img"])
    .file("k.img", vec![0; 4 << 20])
    .script(&host_script(
        "",
        KILL_WHEN_TOLD,
        &format!("{KILLED}cp k.img out/"),
    ))
    .timeout(60)
}

fn sigkill_power_cut(name: &str, engine: &str) -> Scenario {
    // null_blk with a 64 MiB write-back cache: a FLUSH moves the cache to the "media"; powering
    // the device off drops whatever is still cached, like a power cut. So does it with dirty
    // host page cache of the device: it is written into null_blk's cache on the way down.
    let cut = format!(
        "{KILLED}echo 0 > $nb/power\n\
         echo 1 > $nb/power\n\
         echo host: power cut\n\
         dd if=/dev/nullb-cut of=out/disk.img bs=4096 count=512 iflag=direct 2>/dev/null\n\
         echo 0 > $nb/power; rmdir $nb"
    );
    with_null_blk(
        Scenario::boot(name, Kernel::MinimalElf, 1, &kill_after_flush_guest())
            .args(["--disk", &format!("/dev/nullb-cut{engine}")])
            .script(&host_script(
                &null_blk("nullb-cut", "echo 64 > $nb/cache_size"),
                KILL_WHEN_TOLD,
                &cut,
            ))
            .timeout(60),
    )
}

/// The tap disappears while the guest pings: `vhost` is the tap's vhost= option.
fn tap_deleted(name: &str, vhost: &str) -> Scenario {
    let init = "ip link set eth0 up\n\
                ip addr add 10.0.2.2/24 dev eth0\n\
                ping -c 2 -W 5 10.0.2.1 >/dev/null && echo ping-before-ok\n\
                ping -c 8 -W 1 10.0.2.1 > /tmp/ping 2>&1 &\n\
                echo TAP-IN-USE\n\
                wait\n\
                echo \"ping-during: $(grep transmitted /tmp/ping)\"\n\
                echo STILL-RUNNING\n";
    // unshare runs the whole host script in a fresh network namespace holding tap0.
    let setup = "if [ -z \"$IN_NETNS\" ]; then IN_NETNS=1 exec unshare -n sh \"$0\"; fi\n\
                 ip link set lo up\n\
                 tunctl -t tap0 >/dev/null\n\
                 ip link set tap0 up\n\
                 ip addr add 10.0.2.1/24 dev tap0";
    let steps = "exec 3>&-\n\
                 wait_for TAP-IN-USE 45 || exit 92\n\
                 ip link del tap0 && echo 'host: tap0 deleted'";
    Scenario::boot(name, Kernel::MinimalElf, 1, init)
        .args([
            "--tap",
            &format!("tap0,mac=52:54:00:12:34:56,vhost={vhost}"),
            "--stats",
        ])
        .script(&host_script(setup, steps, ""))
        .timeout(60)
}

static BATCH: Batch = Batch::new(scenarios);

fn scenarios() -> Vec<Scenario> {
    vec![
        disk_full("disk-full", ""),
        disk_unreadable("disk-unreadable", ""),
        sigkill_file(),
        sigkill_power_cut("sigkill-power-cut", ""),
        // The same faults on the io_uring engine: errors, the once-failed-flush rule and a
        // flush that reaches the device (here through O_DIRECT too) must not depend on it.
        disk_full("disk-full-io-uring", IO_URING),
        disk_unreadable("disk-unreadable-io-uring", IO_URING),
        sigkill_power_cut(
            "sigkill-power-cut-io-uring",
            &format!("{IO_URING},direct=on"),
        ),
        tap_deleted("tap-deleted", "off"),
        tap_deleted("tap-deleted-vhost", "on"),
    ]
}

/// pvm's stderr in a scenario.
fn pvm_stderr(name: &str) -> String {
    let outcome = BATCH.outcome(name);
    std::fs::read_to_string(outcome.out.join("pvm.stderr")).unwrap_or_else(|e| {
        outcome.dump();
        panic!("{name}: no pvm.stderr: {e}")
    })
}

/// The `key=value` number on a --stats line starting with `prefix`.
fn stat(name: &str, prefix: &str, key: &str) -> u64 {
    let stderr = pvm_stderr(name);
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .find_map(|rest| {
            rest.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        })
        .unwrap_or_else(|| panic!("{name}: no {prefix}...{key}= in pvm's stderr:\n{stderr}"))
}

/// The `nth` (from 0) console line of scenario `name` starting with `prefix`.
fn line_starting(name: &str, prefix: &str, nth: usize) -> String {
    let outcome = BATCH.outcome(name);
    outcome
        .console
        .lines()
        .filter(|l| l.starts_with(prefix))
        .nth(nth)
        .map(str::to_string)
        .unwrap_or_else(|| {
            outcome.dump();
            panic!("{name}: no console line {nth} starting with {prefix:?}")
        })
}

/// How many lines of pvm's stderr contain `needle`.
fn stderr_lines_with(name: &str, needle: &str) -> usize {
    pvm_stderr(name)
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

#[test]
fn a_full_host_disk_fails_requests_but_not_the_vm() {
    check_disk_full("disk-full");
}

#[test]
fn a_full_host_disk_fails_requests_but_not_the_vm_on_io_uring() {
    check_disk_full("disk-full-io-uring");
}

fn check_disk_full(name: &str) {
    let outcome = BATCH.outcome(name);
    outcome.assert_rc(0);
    outcome.assert_contains("disk-sectors: 32768");
    // The guest saw the failure as an I/O error, for the first write past the space and for
    // every later one; what fits still works.
    outcome.assert_contains("fill: dd: error writing '/dev/vda': Input/output error");
    outcome.assert_contains("failed-writes-into-holes: 20");
    outcome.assert_contains("overwrite-ok");
    outcome.assert_contains("read-ok");
    outcome.assert_contains("DISK-FULL-SURVIVED");
    // Logged once for the operator; counted every time.
    let logged = stderr_lines_with(name, "No space left on device");
    assert_eq!(logged, 1, "{}", pvm_stderr(name));
    let count = stat(name, "pvm: disk small/disk.img: ", "io_errors");
    assert!(count >= 21, "io_errors={count}");
}

#[test]
fn a_disk_going_bad_mid_run_fails_requests_and_flushes_then_recovers() {
    check_disk_unreadable("disk-unreadable");
}

#[test]
fn a_disk_going_bad_mid_run_fails_requests_and_flushes_then_recovers_on_io_uring() {
    check_disk_unreadable("disk-unreadable-io-uring");
}

fn check_disk_unreadable(name: &str) {
    let outcome = BATCH.outcome(name);
    outcome.assert_rc(0);
    outcome.assert_contains("write-A-ok");
    outcome.assert_contains("flush 1: ok");
    // Bad blocks: reading them fails, the rest of the disk still reads.
    outcome.assert_contains("read 256: failed: dd: /dev/vda: Input/output error");
    let read0 = line_starting(name, "read 0: ", 0);
    assert!(!read0.contains("failed"), "{read0}");
    // A write lands in the host's page cache; the flush that should make it durable fails.
    outcome.assert_contains("write-B-ok");
    outcome.assert_contains("flush 2: failed: sync: /dev/vda: Input/output error");
    // Linux marked the page it could not write clean, so a second fdatasync would succeed:
    // pvm must keep failing flushes, even after the disk recovered.
    outcome.assert_contains("flush 3: failed: sync: /dev/vda: Input/output error");
    outcome.assert_contains("flush 4: failed: sync: /dev/vda: Input/output error");
    // Recovered: the block reads again.
    let recovered = line_starting(name, "read 256: ", 1);
    assert!(!recovered.contains("failed"), "{recovered}");
    outcome.assert_contains("PHASE-3-DONE");
    // B never reached the device (which is why no flush may succeed after the failed one).
    let block = std::fs::read(outcome.out.join("block256")).unwrap();
    assert_eq!(block, pattern('A', 256), "block 256 on the device");
    // The EIO (of the read and of the fdatasync) and the refused flushes: one line each.
    assert_eq!(
        stderr_lines_with(name, "Input/output error"),
        1,
        "{}",
        pvm_stderr(name)
    );
    assert_eq!(
        stderr_lines_with(name, "an earlier flush failed"),
        1,
        "{}",
        pvm_stderr(name)
    );
    let count = stat(name, "pvm: disk /dev/nullb-bad: ", "io_errors");
    assert!(count >= 4, "io_errors={count}");
}

/// The image after pvm was killed: the flushed pattern P byte for byte at the start, and
/// whether the unflushed U made it to block 256.
fn check_killed(name: &str) -> bool {
    let outcome = BATCH.outcome(name);
    outcome.assert_rc(0);
    outcome.assert_contains("P-written-and-flushed");
    outcome.assert_contains("U-written-unflushed");
    outcome.assert_contains("host: pvm killed, status 137");
    let image = std::fs::read(outcome.out.join(if name.starts_with("sigkill-file") {
        "k.img"
    } else {
        "disk.img"
    }))
    .unwrap();
    let p = pattern('P', 4352);
    assert!(image.len() >= 2 << 20, "{name}: image of {}", image.len());
    assert!(
        image[..p.len()] == p[..],
        "{name}: the flushed pattern is not on the disk"
    );
    assert!(
        image[p.len()..1 << 20].iter().all(|b| *b == 0),
        "{name}: written past the pattern"
    );
    let u = pattern('U', 256);
    image[1 << 20..(1 << 20) + u.len()] == u[..]
}

#[test]
fn data_flushed_before_sigkill_is_in_the_image() {
    // No power cut: pvm holds no write in userspace, so even the unflushed write is there.
    assert!(
        check_killed("sigkill-file"),
        "the unflushed write is missing"
    );
}

#[test]
fn data_flushed_before_sigkill_survives_a_power_cut() {
    check_power_cut("sigkill-power-cut");
}

#[test]
fn data_flushed_before_sigkill_survives_a_power_cut_on_io_uring_and_o_direct() {
    check_power_cut("sigkill-power-cut-io-uring");
}

fn check_power_cut(name: &str) {
    // The unflushed write was lost with the cache: the power cut was real, and the flushed
    // pattern survived it because pvm's FLUSH reached the device.
    assert!(
        !check_killed(name),
        "{name}: the unflushed write survived: the power cut did not drop the cache"
    );
    BATCH.outcome(name).assert_contains("host: power cut");
}

fn check_tap_deleted(name: &str) {
    let outcome = BATCH.outcome(name);
    outcome.assert_rc(0);
    outcome.assert_contains("ping-before-ok");
    outcome.assert_contains("host: tap0 deleted");
    outcome.assert_contains("ping-during: 8 packets transmitted");
    outcome.assert_contains("STILL-RUNNING");
}

#[test]
fn a_deleted_tap_drops_frames_and_the_vm_runs_on() {
    let name = "tap-deleted";
    check_tap_deleted(name);
    let prefix = "pvm: tap tap0: ";
    let tx_errors = stat(name, prefix, "tx_errors");
    assert!(tx_errors >= 3, "tx_errors={tx_errors}");
    // Logged once each, however many frames went nowhere.
    for what in ["cannot send a frame", "read failed"] {
        assert_eq!(
            stderr_lines_with(name, what),
            1,
            "{what}: {}",
            pvm_stderr(name)
        );
    }
}

#[test]
fn a_deleted_tap_under_vhost_net_leaves_the_vm_running() {
    check_tap_deleted("tap-deleted-vhost");
}

// Natively, with micro guests.

/// Waits up to `secs` for `child` to exit.
fn wait_timeout(child: &mut Child, secs: u64) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            panic!("pvm did not exit within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Fails the test for a pvm that ended before its guest printed: with how and why.
fn ended_early(child: &mut Child, output: &str) -> ! {
    let status = child.wait().unwrap();
    panic!("pvm ended ({status}) before its guest printed; its output: {output}");
}

fn signal(child: &Child, signo: i32) {
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signo) }, 0);
}

#[test]
fn a_closed_stdout_and_stderr_and_sigpipe_do_not_stop_pvm() {
    micro::require_kvm();
    // Prints, waits for a byte of input, then prints much more and powers off.
    let mut code = micro::print("first line\r\n");
    code.extend(micro::wait_for_input());
    for _ in 0..50 {
        code.extend(micro::print("written after the reader left\r\n"));
    }
    code.extend(micro::power_off());
    let kernel = micro::micro_kernel("closed-output", &code);
    // stdout and stderr share one pipe, like `pvm ... 2>&1 | head -c 10`.
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-int array it is given.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut child = Command::new(PVM)
        // --stats: pvm writes to stderr at exit too, after the reader left.
        .args([
            "--kernel",
            kernel.to_str().unwrap(),
            "--mem",
            "64M",
            "--stats",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::from(write_end.try_clone().unwrap()))
        .stderr(Stdio::from(write_end))
        .spawn()
        .unwrap();
    let mut reader = std::fs::File::from(read_end);
    if let Err(output) = micro::read_until(&mut reader, "first line") {
        ended_early(&mut child, &output);
    }
    // The reader leaves: from now on every write pvm makes fails with EPIPE.
    drop(reader);
    // A stray SIGPIPE does not end pvm either.
    signal(&child, libc::SIGPIPE);
    std::thread::sleep(Duration::from_millis(100));
    child.stdin.take().unwrap().write_all(b"g").unwrap();
    let status = wait_timeout(&mut child, 60);
    assert_eq!(status.code(), Some(0), "{status}");
}

/// Starts a guest that prints, then spins; returns pvm once the guest runs.
fn spinning_guest(stdin: Stdio) -> Child {
    micro::require_kvm();
    let mut code = micro::print("spinning\r\n");
    code.extend(micro::spin());
    let kernel = micro::micro_kernel("spin-faults", &code);
    let mut child = Command::new(PVM)
        .args(["--kernel", kernel.to_str().unwrap(), "--mem", "64M"])
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Err(stdout) = micro::read_until(child.stdout.as_mut().unwrap(), "spinning") {
        let stderr = stderr_of(&mut child);
        ended_early(&mut child, &format!("{stdout}{stderr}"));
    }
    child
}

fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    text
}

#[test]
fn sigint_and_sighup_stop_pvm_with_their_exit_codes() {
    // SIGTERM is tests/cli.rs's.
    for signo in [libc::SIGINT, libc::SIGHUP] {
        let mut child = spinning_guest(Stdio::null());
        signal(&child, signo);
        let status = wait_timeout(&mut child, 10);
        assert_eq!(status.code(), Some(128 + signo), "signal {signo}: {status}");
        let stderr = stderr_of(&mut child);
        assert!(
            stderr.contains(&format!("pvm: stopped by signal {signo}")),
            "{stderr}"
        );
    }
}

#[test]
fn the_console_quit_escape_exits_like_sigint() {
    let mut child = spinning_guest(Stdio::piped());
    // Ctrl-A x.
    child.stdin.as_mut().unwrap().write_all(b"\x01x").unwrap();
    let status = wait_timeout(&mut child, 10);
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "{status}");
    let stderr = stderr_of(&mut child);
    assert!(stderr.contains("stopped from the console"), "{stderr}");
}

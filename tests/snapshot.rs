//! Snapshot and restore with a real Linux guest in the emulated KVM host (README
//! "Snapshots"). The guest counts, pinging the host and writing its count to its disk each
//! time; it is booted through the API, paused, snapshotted and SIGKILLed, then restored in new
//! processes: the count must go on from where it stopped (the guest did not boot again), with
//! pings and disk writes working, and the disk must hold what was flushed before the snapshot.
//!
//! Two scenarios, varying what matters between them rather than a full matrix:
//! - pci, pvm's own net worker (a rate limiter keeps vhost-net off), 1 vCPU: two clones at once
//!   from the one snapshot, each on its own copy of the disk; one by `--restore`, the other
//!   by `PUT /snapshot/load` with `resume_vm: false` and `network_overrides` onto another tap
//!   (in a network namespace of its own), then `PATCH /vm Resumed`.
//! - mmio, kernel vhost-net, 2 vCPUs: `--restore --paused`, resumed with SIGUSR2.
//! - track_dirty_pages, kernel vhost-net: Full, counting on, data received over the tap into
//!   a socket the guest does not read yet, Diff, SIGKILL; the Diff layered onto the Full
//!   restores to the Diff's count, and the guest then reads the data whole. The same files
//!   restore again with the Uffd backend, served by `pvm uffd-handler`; killing the handler
//!   then ends that pvm with the error (no hang).
//! - Debian's kernel with a `--cloud-init` seed and a `vhost=on` vsock, in one boot: a restore
//!   while the original holds the CID is refused naming it; after SIGKILL and a change of the
//!   seed's file, the restored guest still reads the snapshot's seed (page cache dropped) and
//!   accepts a new vsock connection from the host.

mod common;

use common::{
    Batch, Kernel, Scenario, add_initramfs_files, extra_module, in_network_namespace,
    vsock_helper_binary,
};

const GUEST_MAC: &str = "06:00:ac:10:00:02";
const DISK_BYTES: usize = 1 << 20;

/// Each count: a ping, the count written to sector 8 with fsync, a line on the console.
const GUEST: &str = "ip link set eth0 up\n\
     ip addr add 10.0.2.2/24 dev eth0\n\
     echo \"guest-cpus $(grep -c ^processor /proc/cpuinfo)\"\n\
     echo SNAP-FLUSHED-BEFORE > /tmp/f\n\
     dd if=/tmp/f of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null && echo disk-flushed\n\
     echo guest-counting-from-boot\n\
     i=0\n\
     while :; do\n\
         i=$((i + 1))\n\
         if ping -c 1 -W 2 10.0.2.1 >/dev/null 2>&1; then p=ping-ok; else p=ping-fail; fi\n\
         if echo \"COUNT-$i-END\" | dd of=/dev/vda bs=512 seek=8 count=1 conv=fsync 2>/dev/null; \
         then d=disk-ok; else d=disk-fail; fi\n\
         echo \"count $i $p $d\"\n\
         usleep 200000\n\
     done\n";

/// For the Diff scenario: a TCP listener on port 5000 whose process is stopped before any data
/// comes, so what the host sends stays queued in the guest's socket, in the receive buffers
/// only vhost-net wrote (the guest kernel hands full frames' pages to the socket as they are);
/// a connection to port 5001 lets it go on, and it prints what it received.
const RECEIVER: &str = "( nc -l -p 5000 < /dev/null > /tmp/rx & echo $! > /tmp/rx.pid; wait $!; \
         echo \"rx-done bytes $(wc -c < /tmp/rx) md5 $(md5sum < /tmp/rx | cut -d' ' -f1)\" ) &\n\
     until netstat -ltn | grep -q ':5000 '; do usleep 100000; done\n\
     kill -STOP $(cat /tmp/rx.pid) && echo rx-held\n\
     ( nc -l -p 5001 < /dev/null > /dev/null; kill -CONT $(cat /tmp/rx.pid); echo rx-released ) &\n";

/// `api SOCK METHOD PATH [BODY]` prints `api METHOD PATH: EXIT ANSWER`; `wait_for FILE TEXT
/// SECS` polls a log; `progress LOG` prints the log's first and last count.
const HELPERS: &str = r#"api() {
    s=$1; shift
    r=$(pvm-api-client "$s" "$@"); c=$?
    echo "api $1 $2: $c $r"
    return $c
}
wait_for() {
    i=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        i=$((i + 1))
        if [ $i -gt $(($3 * 10)) ]; then echo "wait-timeout: no '$2' in $1"; return 1; fi
        usleep 100000
    done
}
first_count() { grep '^count ' "$1" | head -n 1 | cut -d' ' -f2; }
# wait_past LOG N SECS: until LOG has a count past N whose ping and disk write worked.
wait_past() {
    i=0
    while ! grep '^count .* ping-ok disk-ok' "$1" 2>/dev/null | awk -v n=$2 '$2 > n {f=1} END {exit !f}'; do
        i=$((i + 1))
        if [ $i -gt $(($3 * 10)) ]; then echo "wait-timeout: no count past $2 in $1"; return 1; fi
        usleep 100000
    done
}
"#;

/// Boots the guest through the API (`flags`, `cpus`, `iface` extra JSON), waits for three
/// counts, pauses, snapshots into vm.snap/vm.mem and SIGKILLs it; `$last` is its last count.
fn boot_and_snapshot(flags: &str, cpus: u32, iface_extra: &str) -> String {
    format!(
        r#"pvm --api-sock a.sock {flags} > boot.log 2>&1 &
pvm=$!
api a.sock PUT /machine-config '{{"vcpu_count": {cpus}, "mem_size_mib": 128}}'
api a.sock PUT /boot-source '{{"kernel_image_path": "{{kernel}}", "initrd_path": "initrd.cpio", "boot_args": "console=ttyS0 reboot=k quiet"}}'
api a.sock PUT /drives/rootfs '{{"drive_id": "rootfs", "path_on_host": "disk.img", "is_root_device": false, "is_read_only": false}}'
api a.sock PUT /network-interfaces/eth0 '{{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "{GUEST_MAC}"{iface_extra}}}'
api a.sock PUT /actions '{{"action_type": "InstanceStart"}}'
wait_for boot.log 'count 3 ping-ok disk-ok' 150
api a.sock PUT /snapshot/create '{{"snapshot_type": "Full", "snapshot_path": "vm.snap", "mem_file_path": "vm.mem"}}'
api a.sock PATCH /vm '{{"state": "Paused"}}'
t0=$(date +%s)
api a.sock PUT /snapshot/create '{{"snapshot_type": "Full", "snapshot_path": "vm.snap", "mem_file_path": "vm.mem"}}'
echo "snapshot-seconds $(($(date +%s) - t0)) state-bytes $(wc -c < vm.snap) mem-bytes $(du -k vm.mem | cut -f1)K"
usleep 300000
last=$(grep '^count ' boot.log | tail -n 1 | cut -d' ' -f2)
echo "snapshot-at $last"
kill -9 $pvm
wait $pvm
echo "boot-log-tail $(tail -n 1 boot.log)"
echo "booted $(grep -c guest-counting-from-boot boot.log)"
echo "boot-$(grep guest-cpus boot.log)"
echo "flushed-on-host $(head -c 19 disk.img)"
"#
    )
}

/// Waits for `log` to count three past the snapshot with pings and disk writes working, and
/// reports where its count started and whether the guest booted again.
fn check_clone(tag: &str, log: &str) -> String {
    format!(
        "wait_past {log} $((last + 2)) 150\n\
         echo \"{tag}-plane $(grep 'data plane' {log})\"\n\
         echo \"{tag}-first $(first_count {log})\"\n\
         echo \"{tag}-booted-again $(grep -c guest-counting-from-boot {log})\"\n"
    )
}

fn pci_clones() -> Scenario {
    // The second clone: in its own network namespace on tap9, loaded through the API paused.
    let clone_b = format!(
        "{HELPERS}ip link set lo up\n\
         tunctl -t tap9 >/dev/null\n\
         ip link set tap9 up\n\
         ip addr add 10.0.2.1/24 dev tap9\n\
         cd b\n\
         pvm --api-sock b.sock > ../b.log 2>&1 &\n\
         echo $! > ../b.pid\n\
         api b.sock PUT /snapshot/load '{{\"snapshot_path\": \"../vm.snap\", \"mem_backend\": {{\"backend_type\": \"File\", \"backend_path\": \"../vm.mem\"}}, \"resume_vm\": false, \"network_overrides\": [{{\"iface_id\": \"eth0\", \"host_dev_name\": \"tap9\"}}]}}'\n\
         api b.sock GET /\n\
         sleep 1\n\
         echo \"b-counts-while-paused $(grep -c '^count ' ../b.log)\"\n\
         api b.sock PATCH /vm '{{\"state\": \"Resumed\"}}'\n\
         wait\n"
    );
    let body = format!(
        "{HELPERS}{}\
         mkdir a b && cp disk.img a/ && cp disk.img b/\n\
         cat > clone-b.sh <<'CLONE'\n{clone_b}CLONE\n\
         (cd a && exec pvm --restore ../vm.snap --mem-file ../vm.mem) > a.log 2>&1 &\n\
         pa=$!\n\
         unshare -n sh ./clone-b.sh > clone-b.log 2>&1 &\n\
         {}{}\
         cat clone-b.log\n\
         kill $pa $(cat b.pid)\n\
         wait\n\
         echo \"a-disk $(dd if=a/disk.img bs=512 skip=8 count=1 2>/dev/null | head -c 12)\"\n\
         echo \"b-disk $(dd if=b/disk.img bs=512 skip=8 count=1 2>/dev/null | head -c 12)\"\n\
         tail -n 3 a.log b.log\n",
        boot_and_snapshot(
            "--enable-pci",
            1,
            r#", "rx_rate_limiter": {"bandwidth": {"size": 100000000, "refill_time": 100}}"#
        ),
        check_clone("a", "a.log"),
        check_clone("b", "b.log"),
    );
    scenario("snapshot-pci-clones", &body)
}

fn mmio_vhost_two_cpus() -> Scenario {
    let body = format!(
        "{HELPERS}{}\
         pvm --restore vm.snap --mem-file vm.mem --paused > c.log 2>&1 &\n\
         pc=$!\n\
         sleep 1\n\
         echo \"c-counts-while-paused $(grep -c '^count ' c.log)\"\n\
         kill -USR2 $pc\n\
         {}\
         kill $pc\n\
         wait $pc\n\
         tail -n 3 c.log\n",
        boot_and_snapshot("", 2, ""),
        check_clone("c", "c.log"),
    );
    scenario("snapshot-mmio-vhost-2cpus", &body)
}

/// track_dirty_pages: a Full snapshot, three counts on and 24 KiB sent to the guest's held
/// [`RECEIVER`], a Diff, SIGKILL; the Diff layered onto the Full (`pvm snapshot-layer`)
/// restores to the Diff's count, not the Full's, and the released receiver gets the bytes
/// sent. The tap has no rate limit: vhost=auto picks the kernel's vhost-net, whose writes
/// only its dirty log has, so without that log the data would come back as the Full's pages.
fn diff_over_full() -> Scenario {
    let full =
        r#"'{"snapshot_type": "Full", "snapshot_path": "full.snap", "mem_file_path": "full.mem"}'"#;
    let diff =
        r#"'{"snapshot_type": "Diff", "snapshot_path": "diff.snap", "mem_file_path": "diff.mem"}'"#;
    let body = format!(
        r#"{HELPERS}pvm --api-sock a.sock --log-level info > boot.log 2>&1 &
pvm=$!
api a.sock PUT /machine-config '{{"vcpu_count": 1, "mem_size_mib": 128, "track_dirty_pages": true}}'
api a.sock PUT /boot-source '{{"kernel_image_path": "{{kernel}}", "initrd_path": "initrd.cpio", "boot_args": "console=ttyS0 reboot=k quiet"}}'
api a.sock PUT /drives/rootfs '{{"drive_id": "rootfs", "path_on_host": "disk.img", "is_root_device": false, "is_read_only": false}}'
api a.sock PUT /network-interfaces/eth0 '{{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "{GUEST_MAC}"}}'
api a.sock PUT /actions '{{"action_type": "InstanceStart"}}'
wait_for boot.log 'count 3 ping-ok disk-ok' 150
api a.sock PATCH /vm '{{"state": "Paused"}}'
api a.sock PUT /snapshot/create {full}
usleep 300000
full=$(grep '^count ' boot.log | tail -n 1 | cut -d' ' -f2)
echo "full-at $full"
api a.sock PATCH /vm '{{"state": "Resumed"}}'
wait_past boot.log $((full + 2)) 150
head -c 24576 /dev/urandom > rx.bin
echo "rx-sent md5 $(md5sum < rx.bin | cut -d' ' -f1)"
timeout 3 nc 10.0.2.2 5000 < rx.bin
usleep 500000
api a.sock PATCH /vm '{{"state": "Paused"}}'
api a.sock PUT /snapshot/create {diff}
usleep 300000
last=$(grep '^count ' boot.log | tail -n 1 | cut -d' ' -f2)
echo "snapshot-at $last"
echo "a-plane $(grep 'data plane' boot.log)"
echo "a-rx-held $(grep -c rx-held boot.log)"
echo "a-$(grep 'vhost-net wrote' boot.log | tail -n 1 | sed 's/.*vhost-net/vhost-net/')"
echo "sizes full $(wc -c < full.mem) bytes $(du -k full.mem | cut -f1) KiB allocated, diff $(wc -c < diff.mem) bytes $(du -k diff.mem | cut -f1) KiB allocated"
kill -9 $pvm
wait $pvm
echo "booted $(grep -c guest-counting-from-boot boot.log)"
pvm snapshot-layer --diff-snapshot diff.snap --diff-mem diff.mem --base-snapshot full.snap --base-mem full.mem && echo layered-ok
pvm --restore diff.snap --mem-file full.mem > d.log 2>&1 &
pd=$!
{}echo go | timeout 5 nc 10.0.2.2 5001
wait_for d.log rx-done 60
echo "d-$(grep rx-done d.log)"
kill $pd
wait $pd
echo "d-disk $(dd if=disk.img bs=512 skip=8 count=1 2>/dev/null | head -c 12)"
tail -n 3 d.log
pvm uffd-handler --mem-file full.mem --socket mem.uds > h.log 2>&1 &
ph=$!
i=0
while [ ! -S mem.uds ] && [ $i -lt 100 ]; do i=$((i + 1)); usleep 100000; done
pvm --restore diff.snap --mem-uffd mem.uds > u.log 2>&1 &
pu=$!
{}kill -9 $ph
wait $ph
i=0
while kill -0 $pu 2>/dev/null && [ $i -lt 100 ]; do i=$((i + 1)); usleep 100000; done
if kill -0 $pu 2>/dev/null; then echo u-still-running; kill -9 $pu; fi
wait $pu
echo "u-exit $?"
echo "u-ended-by-handler $(grep -c '^pvm: the page-fault handler at mem.uds closed its socket' u.log)"
tail -n 3 u.log h.log
"#,
        check_clone("d", "d.log"),
        check_clone("u", "u.log"),
    );
    let guest = GUEST.replacen(
        "echo guest-counting-from-boot\n",
        &format!("{RECEIVER}echo guest-counting-from-boot\n"),
        1,
    );
    scenario_of("snapshot-diff", &body, &guest)
}

/// The seeded vhost-vsock guest: a vsock listener on port 52, then a tick a second with
/// how often the seed disk (found by its serial, read past the page cache) holds the user
/// data's token and how many connections the listener has had.
const SEEDED_GUEST: &str = "for m in vsock common transport; do insmod /$m.ko || echo \"insmod $m failed\"; done\n\
     /h serve-vsock 52 > /tmp/s52 2>&1 &\n\
     for d in /sys/block/vd*; do [ \"$(cat $d/serial 2>/dev/null)\" = cidata ] && seed=/dev/${d##*/}; done\n\
     echo \"guest-seed-disk $seed\"\n\
     echo guest-counting-from-boot\n\
     i=0\n\
     while :; do\n\
         i=$((i + 1))\n\
         echo 3 > /proc/sys/vm/drop_caches\n\
         echo \"tick $i seed $(dd if=$seed bs=65536 2>/dev/null | grep -c SNAPSEED42) recv $(grep -c '^recv' /tmp/s52)\"\n\
         sleep 1\n\
     done\n";

fn seeded_vhost_vsock() -> Scenario {
    let mut initrd = common::guest_initramfs(SEEDED_GUEST, Kernel::DebianBzImage);
    let helper = std::fs::read(vsock_helper_binary()).expect("the helper");
    add_initramfs_files(
        &mut initrd,
        &[
            ("h".to_string(), 0o755, helper),
            ("vsock.ko".to_string(), 0o644, extra_module("vsock")),
            (
                "common.ko".to_string(),
                0o644,
                extra_module("vmw_vsock_virtio_transport_common"),
            ),
            (
                "transport.ko".to_string(),
                0o644,
                extra_module("vmw_vsock_virtio_transport"),
            ),
        ],
    );
    let body = format!(
        r#"{HELPERS}for m in host-vsock host-common vhost_vsock; do insmod ./$m.ko || echo host-insmod-failed; done
for i in $(seq 1 20); do [ -e /dev/vhost-vsock ] && break; sleep 0.5; done
[ -e /dev/vhost-vsock ] || mknod /dev/vhost-vsock c 10 241
printf '#cloud-config\nhostname: SNAPSEED42\n' > user-data
pvm --api-sock a.sock --cloud-init user-data=user-data --vsock cid=3,vhost=on > boot.log 2>&1 &
pvm=$!
api a.sock PUT /machine-config '{{"vcpu_count": 1, "mem_size_mib": 128}}'
api a.sock PUT /boot-source '{{"kernel_image_path": "{{kernel}}", "initrd_path": "initrd.cpio", "boot_args": "console=ttyS0 reboot=k quiet"}}'
api a.sock PUT /actions '{{"action_type": "InstanceStart"}}'
wait_for boot.log 'tick 1 seed [1-9]' 150
pvm-vsock-helper send-vsock 3 52 100000 1 > pre.log 2>&1
wait_for boot.log 'recv 1' 60
api a.sock PATCH /vm '{{"state": "Paused"}}'
api a.sock PUT /snapshot/create '{{"snapshot_type": "Full", "snapshot_path": "vm.snap", "mem_file_path": "vm.mem"}}'
last=$(grep '^tick ' boot.log | tail -n 1 | cut -d' ' -f2)
echo "snapshot-at $last"
pvm --restore vm.snap --mem-file vm.mem > busy.log 2>&1
echo "busy-rc $? $(tail -n 1 busy.log)"
kill -9 $pvm
wait $pvm
echo "booted $(grep -c guest-counting-from-boot boot.log)"
printf '#cloud-config\nhostname: changed\n' > user-data
pvm --restore vm.snap --mem-file vm.mem > c.log 2>&1 &
pc=$!
wait_for c.log "tick $((last + 1)) " 150
pvm-vsock-helper send-vsock 3 52 100000 1 > post.log 2>&1
echo "post-rc $?"
wait_for c.log 'recv 2' 60
kill $pc
wait $pc
tail -n 3 c.log
echo "c-first $(grep '^tick ' c.log | head -n 1 | cut -d' ' -f2)"
echo "c-seed $(grep '^tick ' c.log | tail -n 1 | cut -d' ' -f4)"
echo "c-booted-again $(grep -c guest-counting-from-boot c.log)"
for f in pre post; do sed "s/^/$f: /" $f.log; done
"#
    );
    Scenario::new("snapshot-seed-vhost-vsock")
        .kernel(Kernel::DebianBzImage)
        .file("initrd.cpio", initrd)
        .file("host-vsock.ko", extra_module("vsock"))
        .file(
            "host-common.ko",
            extra_module("vmw_vsock_virtio_transport_common"),
        )
        .file("vhost_vsock.ko", extra_module("vhost_vsock"))
        .program("pvm-api-client")
        .program("pvm-vsock-helper")
        .script(&body)
        .timeout(300)
}

fn scenario(name: &str, body: &str) -> Scenario {
    scenario_of(name, body, GUEST)
}

/// A scenario whose guest runs `guest`.
fn scenario_of(name: &str, body: &str, guest: &str) -> Scenario {
    Scenario::new(name)
        .kernel(Kernel::MinimalElf)
        .file(
            "initrd.cpio",
            common::guest_initramfs(guest, Kernel::MinimalElf),
        )
        .file("disk.img", vec![0; DISK_BYTES])
        .program("pvm-api-client")
        .script(&in_network_namespace(body))
        .timeout(300)
}

fn scenarios() -> Vec<Scenario> {
    vec![
        pci_clones(),
        mmio_vhost_two_cpus(),
        diff_over_full(),
        seeded_vhost_vsock(),
    ]
}

static BATCH: Batch = Batch::new(scenarios);

/// The number after `prefix` on the console.
fn number_after(outcome: &common::Outcome, prefix: &str) -> u64 {
    outcome.word_after(prefix).parse().unwrap_or_else(|_| {
        outcome.dump();
        panic!("no number after {prefix:?}")
    })
}

/// The snapshot was refused while running and taken paused; `clones` went on from the next
/// count without booting again, pinging and writing their disk.
fn check(name: &str, clones: &[&str]) {
    let outcome = BATCH.outcome(name);
    if outcome.console.contains("wait-timeout") {
        outcome.dump();
        panic!("{name}: a wait timed out");
    }
    outcome.assert_contains("booted 1");
    outcome.assert_contains("pause it first");
    outcome.assert_contains("api PUT /snapshot/create: 0 204");
    outcome.assert_contains("flushed-on-host SNAP-FLUSHED-BEFORE");
    let last = number_after(outcome, "snapshot-at ");
    assert!(last >= 3, "{name}: snapshot at count {last}");
    for clone in clones {
        let first = number_after(outcome, &format!("{clone}-first "));
        if first != last + 1 {
            outcome.dump();
            panic!("{name}: clone {clone} started counting at {first}, the snapshot was at {last}");
        }
        assert_eq!(
            number_after(outcome, &format!("{clone}-booted-again ")),
            0,
            "{name}: clone {clone} booted again"
        );
    }
}

#[test]
fn two_clones_on_pci_go_on_counting_pinging_and_writing() {
    let name = "snapshot-pci-clones";
    check(name, &["a", "b"]);
    let outcome = BATCH.outcome(name);
    outcome.assert_contains("b-counts-while-paused 0");
    outcome.assert_contains("a-plane pvm: tap tap0: in-process data plane");
    outcome.assert_contains("b-plane pvm: tap tap9: in-process data plane");
    outcome.assert_contains(r#""state":"Paused""#);
    outcome.assert_contains("api PATCH /vm: 0 204");
    // Each clone wrote its own copy of the disk, past the snapshot's count.
    let last = number_after(outcome, "snapshot-at ");
    for clone in ["a", "b"] {
        let written = outcome.word_after(&format!("{clone}-disk "));
        let count: u64 = written
            .strip_prefix("COUNT-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(count > last, "{clone}: its disk holds {written:?}");
    }
}

#[test]
fn mmio_vhost_net_two_vcpus_restored_paused_then_resumed() {
    let name = "snapshot-mmio-vhost-2cpus";
    check(name, &["c"]);
    let outcome = BATCH.outcome(name);
    outcome.assert_contains("boot-guest-cpus 2");
    outcome.assert_contains("c-plane pvm: tap tap0: vhost-net data plane");
    outcome.assert_contains("c-counts-while-paused 0");
}

#[test]
fn a_diff_layered_onto_its_full_snapshot_restores_the_later_count() {
    let name = "snapshot-diff";
    let outcome = BATCH.outcome(name);
    if outcome.console.contains("wait-timeout") {
        outcome.dump();
        panic!("{name}: a wait timed out");
    }
    outcome.assert_contains("booted 1");
    outcome.assert_contains("layered-ok");
    outcome.assert_contains("a-plane pvm: tap tap0: vhost-net data plane");
    outcome.assert_contains("a-rx-held 1");
    let full = number_after(outcome, "full-at ");
    let last = number_after(outcome, "snapshot-at ");
    assert!(last >= full + 3, "{name}: Full at {full}, Diff at {last}");
    let first = number_after(outcome, "d-first ");
    if first != last + 1 {
        outcome.dump();
        panic!(
            "{name}: the layered restore counted from {first}; the Diff was at {last}, the Full at {full}"
        );
    }
    assert_eq!(number_after(outcome, "d-booted-again "), 0);
    let written = outcome.word_after("d-disk ");
    let count: u64 = written
        .strip_prefix("COUNT-")
        .and_then(|rest| rest.split('-').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(count > last, "its disk holds {written:?}");
    // The Diff merged the kernel's log: at least the 6 pages of data (the guest's handling of
    // them may write those pages as well, so the md5 below alone need not catch a lost log).
    let logged = number_after(outcome, "a-vhost-net wrote ");
    assert!(logged >= 6, "{name}: vhost-net logged {logged} pages");
    // What vhost-net wrote into the guest between the Full and the Diff came back whole.
    let sent = outcome.word_after("rx-sent md5 ");
    let received = outcome.word_after("d-rx-done bytes 24576 md5 ");
    if received != sent {
        outcome.dump();
        panic!("{name}: the restored guest received md5 {received:?}, the host sent {sent}");
    }
    // The Uffd restore of the same files counts on from the Diff too, and ends when its
    // handler is killed, as a VMM failure.
    let first = number_after(outcome, "u-first ");
    if first != last + 1 {
        outcome.dump();
        panic!("{name}: the Uffd restore counted from {first}; the Diff was at {last}");
    }
    assert_eq!(number_after(outcome, "u-booted-again "), 0);
    if outcome.console.contains("u-still-running") {
        outcome.dump();
        panic!("{name}: pvm ran on after its page-fault handler was killed");
    }
    outcome.assert_contains("u-exit 1");
    outcome.assert_contains("u-ended-by-handler 1");
}

#[test]
fn a_seeded_vhost_vsock_guest_keeps_its_seed_and_takes_new_connections_after_restore() {
    let name = "snapshot-seed-vhost-vsock";
    let outcome = BATCH.outcome(name);
    if outcome.console.contains("wait-timeout") {
        outcome.dump();
        panic!("{name}: a wait timed out");
    }
    outcome.assert_contains("booted 1");
    outcome.assert_contains("api PUT /snapshot/create: 0 204");
    outcome.assert_lacks("host-insmod-failed");
    // A second VM on the CID while the original holds it: refused, naming the CID.
    outcome.assert_contains("busy-rc 2 ");
    outcome.assert_contains("guest CID 3 is in use by another VM");
    let last = number_after(outcome, "snapshot-at ");
    let first = number_after(outcome, "c-first ");
    if first != last + 1 {
        outcome.dump();
        panic!("{name}: the clone ticked from {first}, the snapshot was at {last}");
    }
    assert_eq!(number_after(outcome, "c-booted-again "), 0);
    // The seed as it was at boot, though its file changed before the restore.
    assert!(
        number_after(outcome, "c-seed ") >= 1,
        "the restored seed lost its data"
    );
    outcome.assert_contains("post-rc 0");
    outcome.assert_contains("post: send-done ok=1");
}

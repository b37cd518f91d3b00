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
//! - track_dirty_pages: Full, counting on, Diff, SIGKILL; the Diff layered onto the Full
//!   restores to the Diff's count. The same files restore again with the Uffd backend, served
//!   by `pvm uffd-handler`; killing the handler then ends that pvm with the error (no hang).

mod common;

use common::{Batch, Kernel, Scenario, in_network_namespace};

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

/// track_dirty_pages: a Full snapshot, three counts on, a Diff, SIGKILL; the Diff layered
/// onto the Full (`pvm snapshot-layer`) restores to the Diff's count, not the Full's. The tap
/// has no rate limit: with tracking, vhost=auto must pick pvm's own worker.
fn diff_over_full() -> Scenario {
    let full =
        r#"'{"snapshot_type": "Full", "snapshot_path": "full.snap", "mem_file_path": "full.mem"}'"#;
    let diff =
        r#"'{"snapshot_type": "Diff", "snapshot_path": "diff.snap", "mem_file_path": "diff.mem"}'"#;
    let body = format!(
        r#"{HELPERS}pvm --api-sock a.sock > boot.log 2>&1 &
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
api a.sock PATCH /vm '{{"state": "Paused"}}'
api a.sock PUT /snapshot/create {diff}
usleep 300000
last=$(grep '^count ' boot.log | tail -n 1 | cut -d' ' -f2)
echo "snapshot-at $last"
echo "a-plane $(grep 'data plane' boot.log)"
echo "sizes full $(wc -c < full.mem) bytes $(du -k full.mem | cut -f1) KiB allocated, diff $(wc -c < diff.mem) bytes $(du -k diff.mem | cut -f1) KiB allocated"
kill -9 $pvm
wait $pvm
echo "booted $(grep -c guest-counting-from-boot boot.log)"
pvm snapshot-layer --diff-snapshot diff.snap --diff-mem diff.mem --base-snapshot full.snap --base-mem full.mem && echo layered-ok
pvm --restore diff.snap --mem-file full.mem > d.log 2>&1 &
pd=$!
{}kill $pd
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
    scenario("snapshot-diff", &body)
}

fn scenario(name: &str, body: &str) -> Scenario {
    Scenario::new(name)
        .kernel(Kernel::MinimalElf)
        .file(
            "initrd.cpio",
            common::guest_initramfs(GUEST, Kernel::MinimalElf),
        )
        .file("disk.img", vec![0; DISK_BYTES])
        .program("pvm-api-client")
        .script(&in_network_namespace(body))
        .timeout(300)
}

fn scenarios() -> Vec<Scenario> {
    vec![pci_clones(), mmio_vhost_two_cpus(), diff_over_full()]
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
    outcome.assert_contains("a-plane pvm: tap tap0: in-process data plane");
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

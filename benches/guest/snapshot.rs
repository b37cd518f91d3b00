//! Snapshot figures, pvm against Firecracker in the same emulated host run
//! (`PVM_BENCH_ONLY=snapshot`): for a 256 MiB and a 2 GiB guest, the time `PUT /snapshot/create`
//! takes on the paused VM, the state and memory files' sizes, and, over alternating restores in
//! fresh processes, the time from sending `PUT /snapshot/load` (`resume_vm: true`) until the
//! guest answers on its serial console, plus each VMM's own account of its load work.
//!
//! Both VMMs run the same guest (the minimal kernel and busybox initramfs of the boot
//! comparison), booted through the same API requests, with no devices besides the serial
//! console (and the virtio-rng pvm always adds). The guest blocks in `read` on its console and
//! answers every line with `answer N`; nothing in it runs on a timer, so the restored guest's
//! first answer comes as soon as it runs again. A VMM's stdin is a FIFO the script writes `x`
//! into right after the load request returns; its stdout (the guest's console alone) goes
//! through busybox `ts`, which stamps every line (to the microsecond) as it arrives, so the
//! figures do not depend on how often the script polls. pvm runs with its seccomp filters (its
//! default) and without (`pvm-nosec`, like the Firecracker build here, which has none).

use std::collections::BTreeMap;

use crate::common::{Kernel, Outcome, Scenario};
use crate::firecracker;

/// Guest sizes, MiB.
const SIZES_MIB: [u32; 2] = [256, 2048];
/// Restores per VMM and size, alternating between the VMMs, unless PVM_BENCH_SNAPSHOT_RUNS
/// says otherwise.
const RUNS: u32 = 7;

fn runs() -> u32 {
    std::env::var("PVM_BENCH_SNAPSHOT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(RUNS)
}

/// The guest: says it is ready, then answers each console line with its running count.
const GUEST: &str = "echo guest-ready\n\
    n=0\n\
    while read -r line; do n=$((n + 1)); echo \"answer $n\"; done\n";

/// Shell functions of the host side; see the module documentation. `start VMM NAME` starts
/// pvm or Firecracker (`fc`) on NAME.sock, stdin from the FIFO NAME.in, stdout (the guest's
/// console alone) copied unbuffered into NAME.raw by `tee` (polled by `wait_line`) and stamped
/// into NAME.log (`ts` writes a file only when the VMM ends: stdio buffering), its log in
/// NAME.err (Firecracker's in NAME.fclog), so no log line lands inside a guest line, and sets
/// `$pid`; `timed OUT SOCK METHOD PATH BODY` stamps `go` and `done RC` around one request into
/// OUT (after a pause that lets `ts` start first), then sends the guest a line on `$in`; `stop`
/// kills the VMM and reaps its pipeline.
const HELPERS: &str = r#"api() {
    r=$(pvm-api-client "$@") || { echo "api $2 $3 failed: $r"; return 1; }
}
start() {
    rm -f "$2.sock" "$2.in"
    mkfifo "$2.in"
    case $1 in
        pvm) cmd="pvm --api-sock $2.sock --log-level info" ;;
        pvm-nosec) cmd="pvm --api-sock $2.sock --log-level info --no-seccomp" ;;
        pvm-debug) cmd="pvm --api-sock $2.sock --log-level debug" ;;
        fc) : > "$2.metrics"; : > "$2.fclog"
            cmd="$FC --api-sock $2.sock --no-seccomp --metrics-path $2.metrics --log-path $2.fclog" ;;
    esac
    sh -c "echo \$\$ > $2.pid; exec $cmd 0<>$2.in 2>$2.err" | tee "$2.raw" | ts %.s > "$2.log" &
    i=0
    while [ ! -S "$2.sock" ] || [ ! -s "$2.pid" ]; do
        i=$((i + 1)); [ $i -gt 1000 ] && { echo "no API socket $2.sock"; cat "$2.raw" "$2.err"; return 1; }
        usleep 10000
    done
    pid=$(cat "$2.pid")
    in=$2.in
}
# Polled with shell builtins only: a grep per poll would take the CPU the guest needs.
seen() { while IFS= read -r l; do case $l in *"$2"*) return 0 ;; esac; done < "$1"; return 1; }
wait_line() {
    i=0
    while ! seen "$1" "$2"; do
        i=$((i + 1))
        [ $i -gt $(($3 * 100)) ] && { echo "wait-timeout: no '$2' in $1"; tail -n 20 "$1"; return 1; }
        usleep 10000
    done
}
timed() {
    out=$1; shift
    { usleep 50000; echo go; pvm-api-client "$@"; echo "done $?"; echo x > "$in"; } 2>&1 | ts %.s > "$out"
    grep -q 'done 0' "$out" || { echo "request $2 $3 failed:"; cat "$out"; return 1; }
}
stop() { kill -9 "$pid"; wait; }
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b - a) * 1000 }'; }
stamp() { awk -v w="$2" '$2 == w { print $1; exit }' "$1"; }
# The last value of a Firecracker metric (a latency in us) in metrics file $1.
metric() { grep -o "\"$2\":[0-9]*" "$1" | tail -n 1 | cut -d: -f2; }
"#;

/// Boots `$1` through the API, lets the guest answer once, pauses it and times the full
/// snapshot into files/$1.snap and files/$1.mem; prints `BENCH snapshot-create`.
fn boot_and_snapshot(mib: u32) -> String {
    format!(
        r#"snap() {{
    start $1 $1-boot || return 1
    api $1-boot.sock PUT /machine-config '{{"vcpu_count": 1, "mem_size_mib": {mib}}}' || return 1
    api $1-boot.sock PUT /boot-source '{{"kernel_image_path": "{{kernel}}", "initrd_path": "initrd.cpio", "boot_args": "{args}"}}' || return 1
    api $1-boot.sock PUT /actions '{{"action_type": "InstanceStart"}}' || return 1
    wait_line $1-boot.raw guest-ready 600 || return 1
    echo x > "$in"
    wait_line $1-boot.raw 'answer 1' 60 || return 1
    api $1-boot.sock PATCH /vm '{{"state": "Paused"}}' || return 1
    in=/dev/null
    timed $1.create $1-boot.sock PUT /snapshot/create '{{"snapshot_type": "Full", "snapshot_path": "files/'$1'.snap", "mem_file_path": "files/'$1'.mem"}}' || return 1
    own=
    case $1 in
        pvm) own=$(sed -n 's/.*snapshot .* taken: .* in \([0-9]*\) ms/\1/p' pvm-boot.err) ;;
        fc) api fc-boot.sock PUT /actions '{{"action_type": "FlushMetrics"}}'
            own=$(($(metric fc-boot.metrics full_create_snapshot) / 1000)) ;;
    esac
    stop
    echo "BENCH snapshot-create vmm=$1 create_ms=$(ms $(stamp $1.create go) $(stamp $1.create done)) own_ms=$own state_bytes=$(stat -c %s files/$1.snap) mem_bytes=$(stat -c %s files/$1.mem) mem_alloc_kib=$(($(stat -c %b files/$1.mem) / 2))"
}}
"#,
        args = firecracker::BOOT_ARGS
    )
}

/// Restore number `$2` of `$1`'s snapshot in a fresh process; prints `BENCH snapshot-restore`.
/// `pvm-nosec` (pvm without its seccomp filters, like the Firecracker build here, which has
/// none) and `pvm-debug` (pvm logging where its restore's time goes) restore pvm's snapshot.
const RESTORE: &str = r#"restore() {
    start $1 $1-r$2 || return 1
    files=files/${1%%-*}
    timed $1-r$2.load $1-r$2.sock PUT /snapshot/load '{"snapshot_path": "'$files'.snap", "mem_backend": {"backend_type": "File", "backend_path": "'$files'.mem"}, "resume_vm": true}' || { stop; return 1; }
    wait_line $1-r$2.raw answer 60 || { stop; return 1; }
    own=
    case $1 in
        pvm*) own=$(sed -n 's/.*snapshot .* restored in \([0-9]*\) us.*/\1/p' $1-r$2.err) ;;
        fc) api $1-r$2.sock PUT /actions '{"action_type": "FlushMetrics"}'
            own=$(metric $1-r$2.metrics load_snapshot) ;;
    esac
    stop
    go=$(stamp $1-r$2.load go)
    # The guest's lines end in \r\n (its tty's onlcr).
    answer=$(tr -d '\r' < $1-r$2.log | awk '$2 == "answer" { print $1, $3; exit }')
    echo "BENCH snapshot-restore vmm=$1 run=$2 request_ms=$(ms $go $(stamp $1-r$2.load done)) running_ms=$(ms $go ${answer% *}) answer=${answer#* } own_us=$own"
}
"#;

/// One scenario per guest size: both VMMs boot and snapshot once, then restore alternately.
/// The memory files go on a tmpfs of their own: Firecracker writes all of guest memory, which
/// for 2 GiB would not fit the host's root file system (half of its 3 GiB).
fn scenario(mib: u32, vmms: &str) -> Scenario {
    let script = format!(
        "{HELPERS}{}{RESTORE}\
         FC={{shared}}/firecracker/firecracker\n\
         mkdir files && mount -t tmpfs -o size=2600m snapshot-files files || exit 1\n\
         rc=0\n\
         for vmm in {vmms}; do snap $vmm || rc=1; done\n\
         for run in $(seq 1 {runs}); do\n\
             for vmm in {vmms}; do restore $vmm $run || rc=1; done\n\
         done\n\
         restore pvm-debug diag && grep 'restore: \\|snapshot\\|resumed' pvm-debug-rdiag.err\n\
         tail -n 5 pvm-boot.err pvm-r1.err fc-r1.err fc-r1.fclog 2>/dev/null\n\
         free -m\n\
         umount files\n\
         exit $rc\n",
        boot_and_snapshot(mib),
        runs = runs()
    );
    Scenario::new(&format!("snapshot-{mib}mib"))
        .kernel(Kernel::MinimalElf)
        .file(
            "initrd.cpio",
            crate::common::guest_initramfs(GUEST, Kernel::MinimalElf),
        )
        .program("pvm-api-client")
        .script(&script)
        .timeout(900)
}

/// The scenarios of the group; without a Firecracker binary, pvm's figures alone, once said.
pub fn scenarios() -> Vec<Scenario> {
    SIZES_MIB
        .iter()
        .map(
            |&mib| match firecracker::with_binary(scenario(mib, "pvm pvm-nosec fc")) {
                Ok(scenario) => scenario,
                Err(e) => {
                    if mib == SIZES_MIB[0] {
                        println!("snapshot: Firecracker comparison left out: {e}");
                    }
                    scenario(mib, "pvm pvm-nosec")
                }
            },
        )
        .collect()
}

/// One `BENCH <tag> k=v ...` console line: its text values (`vmm`) and numbers.
#[derive(Debug, Default, PartialEq)]
struct Record {
    vmm: String,
    values: BTreeMap<String, f64>,
}

/// Every `BENCH <tag> ` line of `console`, in order; values that are not numbers (other than
/// `vmm`) and malformed pairs are left out.
fn records(console: &str, tag: &str) -> Vec<Record> {
    let marker = format!("BENCH {tag} ");
    console
        .lines()
        .filter_map(|l| l.find(&marker).map(|at| &l[at + marker.len()..]))
        .map(|rest| {
            let mut record = Record::default();
            for (key, value) in rest.split_whitespace().filter_map(|kv| kv.split_once('=')) {
                if key == "vmm" {
                    record.vmm = value.to_string();
                } else if let Ok(number) = value.parse() {
                    record.values.insert(key.to_string(), number);
                }
            }
            record
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// The median and minimum of `key` over `vmm`'s records, and how many there were.
fn stats(records: &[Record], vmm: &str, key: &str) -> Option<(f64, f64, usize)> {
    let values: Vec<f64> = records
        .iter()
        .filter(|r| r.vmm == vmm)
        .filter_map(|r| r.values.get(key).copied())
        .collect();
    let min = values.iter().copied().reduce(f64::min)?;
    let n = values.len();
    Some((median(values)?, min, n))
}

/// "a (min b)" for pvm (the records of `vmm`) and Firecracker, with pvm/Firecracker of the
/// medians.
fn side_by_side(
    records: &[Record],
    vmm: &str,
    key: &str,
    unit: &str,
    scale: f64,
) -> Option<String> {
    let (pvm, pvm_min, n) = stats(records, vmm, key)?;
    let mut text = format!(
        "pvm {:.1} {unit} (min {:.1}, n={n})",
        pvm * scale,
        pvm_min * scale
    );
    if let Some((fc, fc_min, n)) = stats(records, "fc", key) {
        text.push_str(&format!(
            "; Firecracker {:.1} {unit} (min {:.1}, n={n}); pvm/Firecracker = {:.2}",
            fc * scale,
            fc_min * scale,
            pvm / fc
        ));
    }
    Some(text)
}

/// Prints the group's rows of the table (scenarios that did not run print nothing; a failed
/// one is reported, and what it measured before failing still counts).
pub fn report(outcomes: &std::collections::HashMap<String, Outcome>) {
    for mib in SIZES_MIB {
        let Some(outcome) = outcomes.get(&format!("snapshot-{mib}mib")) else {
            continue;
        };
        if outcome.rc != 0 {
            println!(
                "snapshot-{mib}mib: failed (rc {}), figures may be partial",
                outcome.rc
            );
            outcome.dump();
        }
        let size = if mib >= 1024 {
            format!("{} GiB", mib / 1024)
        } else {
            format!("{mib} MiB")
        };
        let how = "same guest and emulated host, fresh process per restore, alternating, medians";
        let restores = records(&outcome.console, "snapshot-restore");
        // A restored guest that answered with anything but the count after the snapshot's
        // was not the snapshot's guest going on.
        let broken = restores
            .iter()
            .filter(|r| r.values.get("answer") != Some(&2.0))
            .count();
        if broken > 0 {
            println!("snapshot-{mib}mib: {broken} restore(s) did not answer `answer 2`");
        }
        for (key, label, unit, scale) in [
            (
                "running_ms",
                "load request to the guest answering",
                "ms",
                1.0,
            ),
            ("request_ms", "load request round trip", "ms", 1.0),
            (
                "own_us",
                "VMM's own load time (pvm: its log; Firecracker: load_snapshot metric)",
                "ms",
                0.001,
            ),
        ] {
            for (vmm, variant) in [("pvm", ""), ("pvm-nosec", ", pvm --no-seccomp")] {
                if let Some(text) = side_by_side(&restores, vmm, key, unit, scale) {
                    println!("| snapshot restore, {size}{variant}: {label} | {text} | {how} |");
                }
            }
        }
        let creates = records(&outcome.console, "snapshot-create");
        for vmm in ["pvm", "fc"] {
            let Some(c) = creates.iter().find(|r| r.vmm == vmm) else {
                continue;
            };
            let value = |k: &str| c.values.get(k).copied().unwrap_or(f64::NAN);
            println!(
                "| snapshot create, {size}: {} | {:.0} ms (VMM's own {:.0} ms); state file {:.1} KiB; memory file {:.0} MiB, {:.1} MiB allocated | PUT /snapshot/create on the paused VM, one run |",
                if vmm == "fc" { "Firecracker" } else { "pvm" },
                value("create_ms"),
                value("own_ms"),
                value("state_bytes") / 1024.0,
                value("mem_bytes") / 1048576.0,
                value("mem_alloc_kib") / 1024.0,
            );
        }
    }
}

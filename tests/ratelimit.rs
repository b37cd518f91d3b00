//! Rate limiters measured with a real guest in the emulated KVM host (issue 12): one VM,
//! configured through the API like Firecracker, with three drives and a tap:
//! - `bw`: `rate_limiter.bandwidth` 4 MiB/s, read with 1 MiB O_DIRECT requests, then PATCHed
//!   at run time to 8 MiB/s and measured again;
//! - `ops`: `rate_limiter.ops` 100/s, read with 4 KiB O_DIRECT requests (one request each);
//! - `free`: no limit, read the same two ways, to show that the machine is much faster than
//!   the limits, so the limiter and not TCG sets the pace;
//! - eth0: `tx_rate_limiter.bandwidth` 64 KiB/s (guest -> host), measured on the host side.
//!   The emulated host has /dev/vhost-net, so without a limit pvm would hand the tap to the
//!   kernel; with one it must serve it in-process and say so.
//!
//! Honest figures: a bucket starts full (its `size` is one second's worth here, and
//! `one_time_burst` is 0), so the first second's worth passes at once. Every measurement first
//! reads (or sends) the bucket's size plus one more second's worth unmeasured: once a request
//! has had to wait for tokens the bucket is empty, and the timed part that follows runs at the
//! refill rate alone. The disk rates are timed in the guest (/proc/uptime, 10 ms ticks, over
//! 4-5 s); the tap's on the host from the tap's own receive byte counter (/proc/net/dev: the
//! namespace's sysfs is not remounted), which counts what the limiter counts (frames without
//! the virtio-net header), sampled about every 0.1 s (TCG).

mod common;

use common::{Batch, Kernel, Outcome, Scenario, in_network_namespace};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
const DISK_BW: u64 = 4 * MIB;
const PATCHED_BW: u64 = 8 * MIB;
const DISK_OPS: u64 = 100;
/// Far below what the tap does unlimited here: BENCHMARKS.md measured about 1 MiB/s guest ->
/// host in the emulated host on a quiet machine. On a loaded one the guest's own pace fell to
/// ~140 KiB/s: at a 128 KiB/s limit its bucket then drained too slowly for the limiter ever to
/// bind, and the test measured the guest (ratio 1.11), so the limit is well under that.
const TAP_TX_BW: u64 = 64 * KIB;
/// What the guest sends through the tap: 4 KiB blocks (bucket + 2 s + about 13 s measured).
const NET_BLOCKS: u64 = 256;
const GUEST_MAC: &str = "06:00:ac:10:00:02";

/// `cs` prints /proc/uptime in centiseconds. Not by gluing the digits together: under 1 s
/// that gives "095", which shell arithmetic reads as (invalid) octal, and the guest's /init
/// died on it whenever its first measurement started in its first second.
///
/// The guest: measures the drives, sends through the tap, asks for the PATCH (waiting until
/// the host shows it is done by answering pings on 10.0.2.3), measures `bw` again. A result
/// line is `rl TAG BYTES OPS CENTISECONDS`.
fn guest_init() -> String {
    let mib = MIB;
    let bw_mib = DISK_BW / MIB;
    let patched_mib = PATCHED_BW / MIB;
    format!(
        r#"cs() {{ read u _ < /proc/uptime; echo $(( ${{u%.*}} * 100 + 1${{u#*.}} - 100 )); }}
measure() {{
    [ "$4" -gt 0 ] && dd if=$2 of=/dev/null bs=$3 count=$4 iflag=direct 2>/dev/null
    t0=$(cs)
    dd if=$2 of=/dev/null bs=$3 skip=$4 count=$5 iflag=direct 2>/dev/null || echo "rl-dd-failed $1"
    t1=$(cs)
    echo "rl $1 $(($3 * $5)) $5 $((t1 - t0))"
}}
echo "guest-disks $(cat /sys/block/vda/size /sys/block/vdb/size /sys/block/vdc/size)"
measure free-bw /dev/vdc {mib} 0 32
measure free-ops /dev/vdc 4096 0 500
measure bw /dev/vda {mib} {bw_warm} {bw_count}
measure ops /dev/vdb 4096 {ops_warm} {ops_count}
ip link set eth0 up
ip addr add 10.0.2.2/24 dev eth0
ping -c 3 -W 5 10.0.2.1 >/dev/null && echo guest-ping-ok
dd if=/dev/zero bs=4096 count={NET_BLOCKS} 2>/dev/null | timeout 120 nc -w 5 10.0.2.1 5000 && echo sent-ok
echo patch-please
i=0
until ping -c 1 -W 1 10.0.2.3 >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -gt 60 ] && echo patch-wait-timeout && break
done
measure bw8 /dev/vda {mib} {p_warm} {p_count}
"#,
        bw_warm = 2 * bw_mib,
        bw_count = 5 * bw_mib,
        ops_warm = 2 * DISK_OPS,
        ops_count = 5 * DISK_OPS,
        p_warm = 2 * patched_mib,
        p_count = 4 * patched_mib,
    )
}

fn bucket(size: u64) -> String {
    format!(r#"{{"size": {size}, "refill_time": 1000, "one_time_burst": 0}}"#)
}

/// The host side: pvm through the API, a receiver for the tap, a sampler of what arrives, the
/// PATCH once the guest asks for it.
fn host_script() -> String {
    let drive = |id: &str, limiter: &str| {
        format!(
            r#"api PUT /drives/{id} '{{"drive_id": "{id}", "path_on_host": "{id}.img", "is_root_device": false, "is_read_only": true{limiter}}}'"#
        )
    };
    let total = NET_BLOCKS * 4096;
    format!(
        r#"api() {{ r=$(pvm-api-client api.sock "$@"); c=$?; echo "api $1 $2: $c $r"; [ $c = 0 ] || echo api-unexpected; }}
wait_for() {{
    i=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        i=$((i + 1)); [ $i -gt $(($3 * 10)) ] && echo "wait-timeout: $2" && return 1
        usleep 100000
    done
}}
cs() {{ read u _ < /proc/uptime; echo $(( ${{u%.*}} * 100 + 1${{u#*.}} - 100 )); }}
for d in bw ops free; do dd if=/dev/zero of=$d.img bs=1M count=0 seek=64 2>/dev/null; done
[ -e /dev/vhost-net ] && echo host-has-vhost-net
cat > receiver <<'EOF'
#!/bin/sh
exec cat > received
EOF
chmod +x receiver
nc -l -p 5000 -e ./receiver &
(
    for i in $(seq 1 2400); do [ -s received ] && break; usleep 50000; done
    for i in $(seq 1 2400); do
        n=$(wc -c < received)
        echo "sample $(cs) $(sed -n 's/^ *tap0: *\([0-9]*\).*/\1/p' /proc/net/dev) $n"
        [ "$n" -ge {total} ] && break
        usleep 20000
    done
) > samples &
rm -f api.sock
pvm --api-sock api.sock --id vm0 > pvm.log 2>&1 &
pvm=$!
api PUT /machine-config '{{"vcpu_count": 1, "mem_size_mib": 128}}'
api PUT /boot-source '{{"kernel_image_path": "{{kernel}}", "initrd_path": "initrd.cpio", "boot_args": "console=ttyS0 reboot=k pci=off quiet"}}'
{bw}
{ops}
{free}
api PUT /network-interfaces/eth0 '{{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "{GUEST_MAC}", "tx_rate_limiter": {{"bandwidth": {tx}}}}}'
api PUT /actions '{{"action_type": "InstanceStart"}}'
# Well inside the scenario's timeout: a guest that never gets here is stopped, so its console
# (in pvm.log) still comes back and shows where it stood.
if wait_for pvm.log patch-please 150; then
    api PATCH /drives/bw '{{"drive_id": "bw", "rate_limiter": {{"bandwidth": {patched}}}}}'
    ip addr add 10.0.2.3/24 dev tap0
else
    echo "no patch-please: stopping pvm"
    kill $pvm
fi
wait $pvm
rc=$?
cat pvm.log samples
echo "pvm-exit $rc"
exit $rc
"#,
        bw = drive(
            "bw",
            &format!(r#", "rate_limiter": {{"bandwidth": {}}}"#, bucket(DISK_BW))
        ),
        ops = drive(
            "ops",
            &format!(r#", "rate_limiter": {{"ops": {}}}"#, bucket(DISK_OPS))
        ),
        free = drive("free", ""),
        tx = bucket(TAP_TX_BW),
        patched = bucket(PATCHED_BW),
    )
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new("ratelimit")
            .kernel(Kernel::MinimalElf)
            .file(
                "initrd.cpio",
                common::guest_initramfs(&guest_init(), Kernel::MinimalElf),
            )
            .program("pvm-api-client")
            .script(&in_network_namespace(&host_script()))
            .timeout(240),
    ]
}

static BATCH: Batch = Batch::new(scenarios);

/// The scenario, checked to have run through.
fn outcome() -> &'static Outcome {
    let outcome = BATCH.outcome("ratelimit");
    outcome.assert_rc(0);
    outcome.assert_lacks("api-unexpected");
    outcome.assert_lacks("rl-dd-failed");
    outcome
}

/// A guest result line `rl TAG BYTES OPS CENTISECONDS`: (bytes, ops, seconds).
fn guest_result(outcome: &Outcome, tag: &str) -> (f64, f64, f64) {
    let prefix = format!("rl {tag} ");
    let fields: Vec<f64> = outcome
        .console
        .lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    match fields[..] {
        [bytes, ops, cs] if cs > 0.0 => (bytes, ops, cs / 100.0),
        _ => {
            outcome.dump();
            panic!("no usable 'rl {tag}' line");
        }
    }
}

/// Fails unless `rate` is within 5% of `limit` either way; prints the ratio.
fn assert_near(outcome: &Outcome, what: &str, rate: f64, limit: f64) {
    let ratio = rate / limit;
    println!("ratelimit: {what}: {rate:.1} against a limit of {limit:.0}: ratio {ratio:.3}");
    if !(0.95..=1.05).contains(&ratio) {
        outcome.dump();
        panic!("{what}: measured {rate:.1}, limit {limit:.0} (ratio {ratio:.3})");
    }
}

/// The unlimited drive must go at least `times` as fast as `limit`, or the limit measured
/// would be the machine's pace rather than the limiter's.
fn assert_much_faster(outcome: &Outcome, what: &str, rate: f64, limit: f64, times: f64) {
    println!(
        "ratelimit: {what} unlimited: {rate:.1} ({:.1} x the limit)",
        rate / limit
    );
    if rate < times * limit {
        outcome.dump();
        panic!("{what}: unlimited only {rate:.1}, under {times} x the limit {limit:.0}");
    }
}

/// A limited drive's measurement `tag` against `limit`, after the unlimited drive's `free_tag`
/// against it; `per` picks bytes (0) or requests (1) of a result.
fn check_drive(what: &str, free_tag: &str, tag: &str, per: usize, limit: u64) {
    let outcome = outcome();
    let rate = |tag| {
        let (bytes, ops, secs) = guest_result(outcome, tag);
        [bytes, ops][per] / secs
    };
    assert_much_faster(outcome, what, rate(free_tag), limit as f64, 3.0);
    assert_near(outcome, what, rate(tag), limit as f64);
}

#[test]
fn drive_bandwidth_limit_holds_within_5_percent() {
    check_drive("drive bytes/s", "free-bw", "bw", 0, DISK_BW);
}

#[test]
fn drive_ops_limit_holds_within_5_percent() {
    check_drive("drive ops/s", "free-ops", "ops", 1, DISK_OPS);
}

#[test]
fn patched_drive_limit_takes_effect() {
    let outcome = outcome();
    outcome.assert_contains("api PATCH /drives/bw: 0 204");
    let (bytes, _, secs) = guest_result(outcome, "bw8");
    assert_near(
        outcome,
        "patched drive bytes/s",
        bytes / secs,
        PATCHED_BW as f64,
    );
}

/// Host-side samples `sample CENTISECONDS TAP_RX_BYTES FILE_BYTES`.
fn samples(outcome: &Outcome) -> Vec<[f64; 3]> {
    outcome
        .console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("sample "))
        .filter_map(|rest| {
            let v: Vec<f64> = rest
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            <[f64; 3]>::try_from(v).ok()
        })
        .collect()
}

/// The two samples to measure the tap between. The guest's TCP sends ~32 KiB TSO frames, each
/// about a quarter of a second's tokens, so the counters rise in steps; a rate between two
/// arbitrary samples would be off by up to a frame. Measured from an arrival to an arrival
/// instead (a sample where the tap counter moved): while the guest has frames waiting, each
/// leaves once the tokens for it have refilled since the one before, so the bytes after the
/// first arrival over the time between the two are the refill rate (both ends are late by up
/// to one sampling period alike). The first arrival past the bucket and two more seconds'
/// worth starts it (by then a guest sending at least twice the limit has emptied the bucket); the last arrival before the final one ends it: the final frame is the
/// remainder of the guest's data, sent whenever nc gets to it rather than waiting for tokens.
fn tap_window(samples: &[[f64; 3]]) -> Option<([f64; 3], [f64; 3])> {
    let last_wire = samples.last()?[1];
    let arrivals: Vec<[f64; 3]> = samples
        .windows(2)
        .filter(|w| w[1][1] > w[0][1])
        .map(|w| w[1])
        .collect();
    let start = arrivals
        .iter()
        .find(|s| s[2] >= 3.0 * TAP_TX_BW as f64 && s[1] < last_wire)?;
    let end = arrivals.iter().rev().find(|s| s[1] < last_wire)?;
    Some((*start, *end))
}

#[test]
fn tap_tx_bandwidth_limit_holds_within_5_percent() {
    let outcome = outcome();
    outcome.assert_contains("host-has-vhost-net");
    outcome.assert_contains(
        "pvm: tap tap0: in-process data plane (rate-limited; vhost-net cannot enforce a limit)",
    );
    outcome.assert_contains("sent-ok");
    let samples = samples(outcome);
    let Some((start, end)) = tap_window(&samples) else {
        outcome.dump();
        panic!("tap: no samples to measure between");
    };
    let secs = (end[0] - start[0]) / 100.0;
    if secs < 3.0 {
        outcome.dump();
        panic!("tap: only {secs} s of samples to measure over");
    }
    println!(
        "ratelimit: tap measured over {secs:.2} s, {} samples",
        samples.len()
    );
    let wire = (end[1] - start[1]) / secs;
    let payload = (end[2] - start[2]) / secs;
    // What the limiter counts: frames with their Ethernet/IP/TCP headers.
    assert_near(outcome, "tap tx bytes/s (frames)", wire, TAP_TX_BW as f64);
    println!(
        "ratelimit: tap tx payload {payload:.1} bytes/s ({:.3} of the limit; the rest is headers)",
        payload / TAP_TX_BW as f64
    );
}

//! Pausing and resuming a VM with a real guest (SIGUSR1/SIGUSR2, see README "Pausing a VM"):
//! the guest sends 2.5 MiB through a tap, paced so that it lasts several seconds, while the
//! host side pauses pvm three times for a second each. Every byte must arrive intact (md5 on
//! both sides), pvm must count three pauses, and the guest must report no RCU stall or soft
//! lockup afterwards. On pci and mmio, with pvm's net worker and with kernel vhost-net, and on
//! pci with pvm-vhost-user-net (GET_VRING_BASE and ring restarts from the sandboxed main
//! thread).

mod common;

use common::{Batch, Kernel, Scenario, in_network_namespace};

/// Blocks of 64 KiB the guest sends, one every 0.2 s.
const BLOCKS: usize = 40;

/// What serves the guest's net device.
#[derive(Clone, Copy)]
enum DataPlane {
    /// `--tap tap0,vhost=off|on`: pvm's worker or kernel vhost-net.
    Tap(&'static str),
    /// `--net vhost-user=`, served by pvm-vhost-user-net on tap0.
    VhostUser,
}

fn pause_scenario(name: &str, transport: &str, plane: DataPlane) -> Scenario {
    let init = format!(
        "ip link set eth0 up\n\
         ip addr add 10.0.2.2/24 dev eth0\n\
         ping -c 3 -W 5 10.0.2.1 >/dev/null && echo ping-ok\n\
         dd if=/dev/urandom of=/tmp/blob bs=65536 count={BLOCKS} 2>/dev/null\n\
         echo \"guest-md5 $(md5sum < /tmp/blob)\"\n\
         (for i in $(seq 0 {last}); do\n\
             dd if=/tmp/blob bs=65536 skip=$i count=1 2>/dev/null; sleep 0.2\n\
         done) | timeout 200 nc -w 5 10.0.2.1 5000 && echo sent-ok\n\
         ping -c 3 -W 5 10.0.2.1 >/dev/null && echo after-ping-ok\n\
         dmesg | grep -iE 'soft lockup|detected stall|blocked for more than' | sed 's/^/guest-dmesg: /'\n",
        last = BLOCKS - 1
    );
    // pvm runs in the background; once the first bytes have arrived, the host pauses it three
    // times for a second, a second apart, noting how much has arrived half a second into each
    // pause and at its end.
    let mut body = "cat > receiver <<'EOF'\n#!/bin/sh\nexec cat > received\nEOF\n\
                    chmod +x receiver\n\
                    nc -l -p 5000 -e ./receiver &\n"
        .to_string();
    let mut scenario = Scenario::boot(name, Kernel::MinimalElf, 1, &init)
        .args(["--transport", transport, "--stats"])
        .timeout(300);
    match plane {
        DataPlane::Tap(vhost) => {
            scenario = scenario.args([
                "--tap".to_string(),
                format!("tap0,mac=52:54:00:12:34:56,vhost={vhost}"),
            ]);
        }
        DataPlane::VhostUser => {
            body.push_str(
                "pvm-vhost-user-net --tap tap0 --mac 52:54:00:12:34:56 --socket net.sock \
                 2> backend.log &\n\
                 for i in $(seq 1 30); do [ -S net.sock ] && break; sleep 1; done\n",
            );
            scenario = scenario
                .args(["--net", "vhost-user=net.sock"])
                .program("pvm-vhost-user-net");
        }
    }
    body.push_str(
        "{pvm} > pvm.log 2>&1 &\n\
         pvm=$!\n\
         for i in $(seq 1 1000); do [ -s received ] && break; sleep 0.2; done\n\
         size() { wc -c < received 2>/dev/null || echo 0; }\n\
         for round in 1 2 3; do\n\
             sleep 1; kill -USR1 $pvm; sleep 0.5; a=$(size)\n\
             sleep 0.5; echo host-paused-$round $a $(size); kill -USR2 $pvm\n\
         done\n\
         wait $pvm\n\
         rc=$?\n\
         cat pvm.log\n\
         echo \"host-md5 $(md5sum < received)\"\n\
         exit $rc",
    );
    scenario.script(&in_network_namespace(&body))
}

fn scenarios() -> Vec<Scenario> {
    vec![
        pause_scenario("pause-net-pci", "pci", DataPlane::Tap("off")),
        pause_scenario("pause-net-mmio", "mmio", DataPlane::Tap("off")),
        pause_scenario("pause-vhost-pci", "pci", DataPlane::Tap("on")),
        pause_scenario("pause-vhost-mmio", "mmio", DataPlane::Tap("on")),
        pause_scenario("pause-vhost-user-pci", "pci", DataPlane::VhostUser),
    ]
}

static BATCH: Batch = Batch::new(scenarios);

fn check_pauses(name: &str) {
    let outcome = BATCH.outcome(name);
    outcome.assert_rc(0);
    outcome.assert_contains("ping-ok");
    outcome.assert_contains("sent-ok");
    outcome.assert_contains("after-ping-ok");
    outcome.assert_contains("pvm: vm: pauses=3 ");
    let (guest, host) = (
        outcome.word_after("guest-md5 "),
        outcome.word_after("host-md5 "),
    );
    assert_eq!(guest.len(), 32, "{name}: bad guest checksum line");
    if guest != host {
        outcome.dump();
        panic!("{name}: the data arrived damaged or incomplete across the pauses");
    }
    // Each pause came mid-transfer, and nothing arrived while the VM was paused (the first
    // half second lets what the tap already took reach the receiver).
    let total = BLOCKS * 65536;
    for round in 1..=3 {
        let sizes: Vec<usize> = outcome
            .console
            .lines()
            .find_map(|l| l.strip_prefix(&format!("host-paused-{round} ")))
            .map(|rest| {
                rest.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let mid = matches!(sizes[..], [a, b] if a == b && a > 0 && a < total);
        if !mid {
            outcome.dump();
            panic!("{name}: pause {round}: received {sizes:?} of {total} bytes");
        }
    }
    let console = outcome.console.to_lowercase();
    for bad in [
        "guest-dmesg:",
        "soft lockup",
        "detected stall",
        "blocked for more than",
    ] {
        if console.contains(bad) {
            outcome.dump();
            panic!("{name}: the guest complained after the pauses ({bad:?})");
        }
    }
}

#[test]
fn pause_resume_during_a_transfer_net_pci() {
    check_pauses("pause-net-pci");
}

#[test]
fn pause_resume_during_a_transfer_net_mmio() {
    check_pauses("pause-net-mmio");
}

#[test]
fn pause_resume_during_a_transfer_vhost_pci() {
    check_pauses("pause-vhost-pci");
}

#[test]
fn pause_resume_during_a_transfer_vhost_mmio() {
    check_pauses("pause-vhost-mmio");
}

#[test]
fn pause_resume_during_a_transfer_vhost_user_pci() {
    check_pauses("pause-vhost-user-pci");
}

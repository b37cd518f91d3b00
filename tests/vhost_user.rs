//! vhost-user devices in real guests, served by pvm's own backends: block through
//! pvm-vhost-user-blk (the guest writes a pattern and flushes, the host checks the image byte
//! for byte; the guest reads back data the host put in the image; a read-only backend refuses
//! writes; a driver reload stops and restarts the rings) and net through pvm-vhost-user-net
//! (ping and TCP transfers of a few MiB in both directions with matching checksums, then a
//! driver reload), on virtio-pci (MSI-X irqfds as call fds) and virtio-mmio (relayed calls),
//! with the seccomp sandbox on. The backends exit 0 once pvm is gone.

mod common;

use common::{Batch, Kernel, Scenario, in_network_namespace, pattern, write_pattern};

const DISK_BYTES: usize = 4 << 20;
/// Where the host's pattern lies in a.img (sector 4096), for the guest to read.
const HOST_DATA_AT: usize = 2 << 20;

/// Starts a backend in the background, waits for its socket and records its pid in `$var`.
fn start_backend(var: &str, socket: &str, command: &str) -> String {
    format!(
        "{command} --socket {socket} 2> {var}.log &\n\
         {var}=$!\n\
         for i in $(seq 1 30); do [ -S {socket} ] && break; sleep 1; done\n\
         [ -S {socket} ] || {{ echo {var}-did-not-start; cat {var}.log; }}\n"
    )
}

/// After pvm: the backend must end by itself (its frontend left) with status 0.
fn wait_backend(var: &str) -> String {
    format!("wait ${var}\necho \"{var}-rc=$?\"\ncat {var}.log\n")
}

fn block_scenario(name: &str, transport: &str) -> Scenario {
    let host = pattern("H", 4096);
    // 4096 lines of 15 bytes: whole 4 KiB blocks.
    let blocks = host.len() / 4096;
    let init = format!(
        "echo \"blocks: $(ls /sys/block | grep vd | tr '\\n' ' ')\"\n\
         echo \"sectors: $(cat /sys/block/vda/size) $(cat /sys/block/vdb/size)\"\n\
         echo \"vdb-ro: $(cat /sys/block/vdb/ro)\"\n\
         {}{}\
         for i in $(seq 1 4096); do printf 'H-PATTERN%05d\\n' $i; done > /tmp/h\n\
         dd if=/dev/vda of=/tmp/got bs=4096 skip={skip} count={blocks} 2>/dev/null\n\
         cmp /tmp/h /tmp/got && echo host-data-ok\n\
         dev=$(basename $(readlink /sys/block/vda/device))\n\
         echo $dev > /sys/bus/virtio/drivers/virtio_blk/unbind\n\
         echo $dev > /sys/bus/virtio/drivers/virtio_blk/bind\n\
         for i in 1 2 3 4 5; do [ -b /dev/vda ] && break; sleep 1; done\n\
         echo \"reloaded: $(head -c 15 /dev/vda)\"\n\
         dd if=/dev/vda of=/tmp/got bs=4096 skip={skip} count={blocks} 2>/dev/null\n\
         cmp /tmp/h /tmp/got && echo reload-host-data-ok\n",
        write_pattern("A", "/dev/vda"),
        write_pattern("R", "/dev/vdb"),
        skip = HOST_DATA_AT / 4096,
    );
    let mut a = vec![0u8; DISK_BYTES];
    a[HOST_DATA_AT..HOST_DATA_AT + host.len()].copy_from_slice(&host);
    let script = start_backend("blka", "a.sock", "pvm-vhost-user-blk --disk a.img")
        + &start_backend("blkb", "b.sock", "pvm-vhost-user-blk --disk b.img,ro")
        + "{pvm}\nrc=$?\n"
        + &wait_backend("blka")
        + &wait_backend("blkb")
        + "mkdir -p out\ncp a.img b.img out/\nexit $rc";
    Scenario::boot(name, Kernel::MinimalElf, 1, &init)
        .args([
            "--transport",
            transport,
            "--disk",
            "vhost-user=a.sock",
            "--disk",
            "vhost-user=b.sock",
        ])
        .file("a.img", a)
        .file("b.img", vec![0; 1 << 20])
        .program("pvm-vhost-user-blk")
        .script(&script)
        .timeout(150)
}

fn net_scenario(name: &str, transport: &str) -> Scenario {
    // Guest to host: 3 MiB into the host's receiver; host to guest: 2 MiB from its sender.
    let init = "ip link set eth0 up\n\
                ip addr add 10.0.2.2/24 dev eth0\n\
                echo \"mac: $(cat /sys/class/net/eth0/address)\"\n\
                ping -c 3 -W 5 10.0.2.1 >/dev/null && echo ping-ok\n\
                dd if=/dev/urandom of=/tmp/blob bs=65536 count=48 2>/dev/null\n\
                echo \"guest-md5 $(md5sum < /tmp/blob)\"\n\
                timeout 120 nc -w 5 10.0.2.1 5000 < /tmp/blob && echo sent-ok\n\
                timeout 120 nc 10.0.2.1 5001 < /dev/null > /tmp/got\n\
                echo \"guest-got-md5 $(md5sum < /tmp/got)\"\n\
                dev=$(basename $(readlink /sys/class/net/eth0/device))\n\
                echo $dev > /sys/bus/virtio/drivers/virtio_net/unbind\n\
                echo $dev > /sys/bus/virtio/drivers/virtio_net/bind\n\
                ip link set eth0 up\n\
                ip addr add 10.0.2.2/24 dev eth0\n\
                ping -c 3 -W 5 10.0.2.1 >/dev/null && echo reload-ping-ok\n";
    let body = "printf '#!/bin/sh\\nexec cat > received\\n' > receiver\n\
                printf '#!/bin/sh\\nexec cat to-guest\\n' > sender\n\
                chmod +x receiver sender\n\
                dd if=/dev/urandom of=to-guest bs=65536 count=32 2>/dev/null\n\
                echo \"host-sent-md5 $(md5sum < to-guest)\"\n\
                nc -l -p 5000 -e ./receiver &\n\
                nc -l -p 5001 -e ./sender &\n"
        .to_string()
        + &start_backend(
            "netbe",
            "net.sock",
            "pvm-vhost-user-net --tap tap0 --mac 52:54:00:12:34:56",
        )
        + "{pvm}\nrc=$?\n"
        + &wait_backend("netbe")
        + "echo \"host-md5 $(md5sum < received)\"\nexit $rc";
    Scenario::boot(name, Kernel::MinimalElf, 1, init)
        .args(["--transport", transport, "--net", "vhost-user=net.sock"])
        .program("pvm-vhost-user-net")
        .script(&in_network_namespace(&body))
        .timeout(300)
}

static BATCH: Batch = Batch::new(scenarios);

fn scenarios() -> Vec<Scenario> {
    vec![
        block_scenario("vu-blk-pci", "pci"),
        block_scenario("vu-blk-mmio", "mmio"),
        net_scenario("vu-net-pci", "pci"),
        net_scenario("vu-net-mmio", "mmio"),
    ]
}

fn check_block(name: &str) {
    let outcome = BATCH.outcome(name);
    outcome.assert_rc(0);
    outcome.assert_contains("pvm: --disk vhost-user=a.sock: vhost-user data plane");
    outcome.assert_contains("blocks: vda vdb");
    outcome.assert_contains(&format!("sectors: {} {}", DISK_BYTES / 512, 2048));
    outcome.assert_contains("vdb-ro: 1");
    outcome.assert_contains("A-write-ok");
    outcome.assert_contains("R-write-refused");
    outcome.assert_contains("host-data-ok");
    outcome.assert_contains("reloaded: A-PATTERN00001");
    outcome.assert_contains("reload-host-data-ok");
    outcome.assert_contains("blka-rc=0");
    outcome.assert_contains("blkb-rc=0");
    outcome.assert_contains("pvm-vhost-user-blk: disk a.img: io_errors=0");
    let a = std::fs::read(outcome.out.join("a.img")).unwrap();
    let written = pattern("A", 4096);
    let host = pattern("H", 4096);
    assert_eq!(a.len(), DISK_BYTES, "{name}: a.img changed size");
    assert!(
        a[..written.len()] == written[..],
        "{name}: a.img lacks the guest's pattern"
    );
    assert!(
        a[written.len()..HOST_DATA_AT].iter().all(|b| *b == 0),
        "{name}: a.img written past the pattern"
    );
    assert!(
        a[HOST_DATA_AT..HOST_DATA_AT + host.len()] == host[..],
        "{name}: the host's data in a.img changed"
    );
    let b = std::fs::read(outcome.out.join("b.img")).unwrap();
    assert!(
        b.iter().all(|b| *b == 0),
        "{name}: the read-only image changed"
    );
}

#[test]
fn vhost_user_block_on_pci() {
    check_block("vu-blk-pci");
}

#[test]
fn vhost_user_block_on_mmio() {
    check_block("vu-blk-mmio");
}

fn check_net(name: &str) {
    let outcome = BATCH.outcome(name);
    outcome.assert_rc(0);
    outcome.assert_contains("pvm: --net vhost-user=net.sock: vhost-user data plane");
    outcome.assert_contains("mac: 52:54:00:12:34:56");
    outcome.assert_contains("ping-ok");
    outcome.assert_contains("sent-ok");
    outcome.assert_contains("reload-ping-ok");
    outcome.assert_contains("netbe-rc=0");
    // The backend's own counters: frames both ways, none refused or malformed.
    let counters = outcome
        .console
        .lines()
        .find_map(|l| l.strip_prefix("pvm-vhost-user-net: tap tap0: "))
        .unwrap_or_else(|| {
            outcome.dump();
            panic!("{name}: no backend counters")
        });
    let value = |key: &str| -> u64 {
        counters
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
            .unwrap_or_else(|| panic!("{name}: no {key} in {counters}"))
    };
    assert!(value("tx_bytes") >= 3 << 20, "{name}: {counters}");
    assert!(value("rx_bytes") >= 2 << 20, "{name}: {counters}");
    assert_eq!(
        value("tx_errors") + value("tx_malformed"),
        0,
        "{name}: {counters}"
    );
    let md5 = |prefix: &str| {
        let value = outcome
            .console
            .lines()
            .find_map(|l| {
                l.find(prefix).map(|at| {
                    l[at + prefix.len()..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                })
            })
            .unwrap_or_else(|| {
                outcome.dump();
                panic!("{name}: no '{prefix}' line")
            });
        assert_eq!(value.len(), 32, "{name}: bad '{prefix}' line");
        value.to_string()
    };
    assert_eq!(
        md5("guest-md5 "),
        md5("host-md5 "),
        "{name}: guest to host: the 3 MiB arrived damaged or incomplete"
    );
    assert_eq!(
        md5("host-sent-md5 "),
        md5("guest-got-md5 "),
        "{name}: host to guest: the 2 MiB arrived damaged or incomplete"
    );
}

#[test]
fn vhost_user_net_on_pci() {
    check_net("vu-net-pci");
}

#[test]
fn vhost_user_net_on_mmio() {
    check_net("vu-net-mmio");
}

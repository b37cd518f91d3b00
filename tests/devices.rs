//! virtio devices in real guests: block (pattern written, flushed and verified byte for byte on
//! the host; read-only refusal; two disks with serials), rng (/dev/hwrng), console (hvc0 in and
//! out), net (ping and a TCP transfer through a tap in a network namespace the scenario
//! creates), on both transports with the minimal kernel and on pci with Debian's cloud kernel,
//! multiqueue net (two queue pairs on two vCPUs, in-process and vhost-net), plus the exit counts
//! that show the data plane stays off the vCPU exit path.

mod common;

use common::{Batch, Kernel, Scenario, in_network_namespace, pattern, write_pattern};

const DISK_BYTES: usize = 4 << 20;

/// A driver reload: unbinding resets the device (status 0, workers stopped), binding brings it
/// up again; the disk must still read back what was written.
const RELOAD_DRIVER: &str = "dev=$(basename $(readlink /sys/block/vda/device))\n\
     echo $dev > /sys/bus/virtio/drivers/virtio_blk/unbind\n\
     echo $dev > /sys/bus/virtio/drivers/virtio_blk/bind\n\
     for i in 1 2 3 4 5; do [ -b /dev/vda ] && break; sleep 1; done\n\
     echo \"reloaded: $(head -c 15 /dev/vda)\"\n";

/// Runs pvm, then hands the disk images back to the test.
const KEEP_DISKS: &str = "{pvm}\nrc=$?\nmkdir -p out\ncp *.img out/\nexit $rc";

fn disk_scenario(name: &str, kernel: Kernel, transport: &str) -> Scenario {
    let init = format!(
        "echo \"blocks: $(ls /sys/block | grep vd | tr '\\n' ' ')\"\n\
         echo \"serial: $(cat /sys/block/vda/serial)\"\n\
         {}{}",
        write_pattern("A", "/dev/vda"),
        write_pattern("B", "/dev/vdb"),
    ) + RELOAD_DRIVER;
    Scenario::boot(name, kernel, 1, &init)
        .args([
            "--transport",
            transport,
            "--disk",
            "a.img,serial=disk-a",
            "--disk",
            "b.img",
        ])
        .file("a.img", vec![0; DISK_BYTES])
        .file("b.img", vec![0; DISK_BYTES])
        .script(KEEP_DISKS)
        .timeout(90)
}

/// Exit counting: the guest reads `reads` 4 KiB blocks with O_DIRECT (one request each).
fn exits_scenario(name: &str, transport: &str, reads: u32) -> Scenario {
    let init = format!(
        "dd if=/dev/vda of=/dev/null bs=4096 count={reads} iflag=direct 2>/dev/null; echo reads-done"
    );
    Scenario::boot(name, Kernel::MinimalElf, 1, &init)
        .args(["--transport", transport, "--stats", "--disk", "a.img"])
        .file("a.img", vec![7; DISK_BYTES])
        .timeout(90)
}

/// Runs pvm with stdin on a fifo; once the guest prints `ready`, types `input` into it.
fn answer_when(ready: &str, input: &str) -> String {
    format!(
        "mkfifo in\n\
         ({{pvm}} < in > out.log 2>&1; echo $? > rc.txt) &\n\
         exec 3> in\n\
         for i in $(seq 1 120); do grep -q {ready} out.log && break; sleep 1; done\n\
         printf '{input}' >&3\n\
         wait\n\
         cat out.log\n\
         exit $(cat rc.txt)"
    )
}

/// `vhost` is the tap's vhost= option: "on" (kernel vhost-net) or "off" (pvm's worker).
fn net_scenario(name: &str, kernel: Kernel, transport: &str, vhost: &str) -> Scenario {
    // The guest sends 3 MiB of random bytes; the host side of the tap keeps everything it gets.
    // Then a driver reload (unbind/bind: device reset, data plane stopped and restarted) must
    // leave a working link.
    let init = "ip link set eth0 up\n\
                ip addr add 10.0.2.2/24 dev eth0\n\
                ping -c 3 -W 5 10.0.2.1 >/dev/null && echo ping-ok\n\
                dd if=/dev/urandom of=/tmp/blob bs=65536 count=48 2>/dev/null\n\
                echo \"guest-md5 $(md5sum < /tmp/blob)\"\n\
                timeout 120 nc -w 5 10.0.2.1 5000 < /tmp/blob && echo sent-ok\n\
                dev=$(basename $(readlink /sys/class/net/eth0/device))\n\
                echo $dev > /sys/bus/virtio/drivers/virtio_net/unbind\n\
                echo $dev > /sys/bus/virtio/drivers/virtio_net/bind\n\
                ip link set eth0 up\n\
                ip addr add 10.0.2.2/24 dev eth0\n\
                ping -c 3 -W 5 10.0.2.1 >/dev/null && echo reload-ping-ok\n";
    let script = in_network_namespace(
        "cat > receiver <<'EOF'\n#!/bin/sh\nexec cat > received\nEOF\n\
         chmod +x receiver\n\
         nc -l -p 5000 -e ./receiver &\n\
         {pvm}\n\
         rc=$?\n\
         echo \"host-md5 $(md5sum < received)\"\n\
         exit $rc",
    );
    Scenario::boot(name, kernel, 1, init)
        .args([
            "--transport",
            transport,
            "--tap",
            &format!("tap0,mac=52:54:00:12:34:56,vhost={vhost}"),
            "--stats",
        ])
        .script(&script)
        .timeout(240)
}

/// Multiqueue: `--tap tap0,queues=2` on 2 vCPUs. pvm creates the multi-queue tap itself (busybox
/// has no `ip tuntap ... multi_queue`, and a tap made by tunctl is single-queue), so the
/// namespace's side configures tap0 once it appears. The guest reports its queues, the MQ
/// feature bit (22) and its per-queue interrupt counts around two transfers pinned to CPU 0
/// and CPU 1 (XPS sends each on its own queue pair; tun steers the replies back to it); then a
/// driver reload and a third transfer from CPU 1.
/// Guest commands for a two-queue disk on two vCPUs (`--disk mq.img,...,queues=2`): each CPU
/// writes its own pattern with O_DIRECT (so through its own queue), the other reads it back;
/// then the per-queue interrupt counts.
const BLOCK_MQ_GUEST: &str = "echo \"blk-mq: $(ls /sys/block/vda/mq | tr '\\n' ' ')\"\n\
     for t in 0 1; do for i in $(seq 1 512); do printf \"Q$t-PATTERN%05d\\n\" $i; done > /tmp/q$t; done\n\
     taskset 0x1 sh -c 'dd if=/tmp/q0 of=/dev/vda bs=4096 oflag=direct 2>/dev/null && echo q0-write-ok' &\n\
     taskset 0x2 sh -c 'dd if=/tmp/q1 of=/dev/vda bs=4096 seek=64 oflag=direct 2>/dev/null && echo q1-write-ok' &\n\
     wait\n\
     sync\n\
     taskset 0x2 dd if=/dev/vda of=/tmp/r0 bs=4096 count=2 iflag=direct 2>/dev/null\n\
     taskset 0x1 dd if=/dev/vda of=/tmp/r1 bs=4096 skip=64 count=2 iflag=direct 2>/dev/null\n\
     for t in 0 1; do [ \"$(md5sum < /tmp/r$t)\" = \"$(md5sum < /tmp/q$t)\" ] && echo q$t-readback-ok; done\n\
     awk '/virtio[0-9]+-req\\.[0-9]+$/ { print \"blk-irq\", $NF, $2 + $3 }' /proc/interrupts\n";

/// `first` is guest commands run before the network ones (the same boot checking more).
fn net_mq_scenario(name: &str, vhost: &str, first: &str) -> Scenario {
    let irqs = |tag: &str| {
        format!(
            "awk '/virtio[0-9]+-(input|output)\\.[0-9]+$/ {{ print \"{tag}\", $NF, $2 + $3 }}' /proc/interrupts\n"
        )
    };
    let link_up = "ip link set eth0 up\n\
                   ip addr add 10.0.2.2/24 dev eth0\n\
                   for i in $(seq 1 30); do ping -c 1 -W 1 10.0.2.1 >/dev/null && break; done\n";
    let init = format!(
        "{first}{link_up}\
         echo \"mq-queues: $(ls /sys/class/net/eth0/queues | tr '\\n' ' ')\"\n\
         echo \"mq-feature: $(cut -c23 /sys/class/net/eth0/device/features)\"\n\
         ping -c 3 -W 5 10.0.2.1 >/dev/null && echo ping-ok\n\
         for n in 0 1 2; do dd if=/dev/urandom of=/tmp/blob$n bs=65536 count=16 2>/dev/null; \
         echo \"guest-md5-$n $(md5sum < /tmp/blob$n)\"; done\n\
         {before}\
         taskset 0x1 sh -c 'timeout 120 nc -w 5 10.0.2.1 5000 < /tmp/blob0 && echo sent0-ok' &\n\
         taskset 0x2 sh -c 'timeout 120 nc -w 5 10.0.2.1 5001 < /tmp/blob1 && echo sent1-ok' &\n\
         wait\n\
         {after}\
         dev=$(basename $(readlink /sys/class/net/eth0/device))\n\
         echo $dev > /sys/bus/virtio/drivers/virtio_net/unbind\n\
         echo $dev > /sys/bus/virtio/drivers/virtio_net/bind\n\
         {link_up}\
         echo \"reload-queues: $(ls /sys/class/net/eth0/queues | tr '\\n' ' ')\"\n\
         ping -c 3 -W 5 10.0.2.1 >/dev/null && echo reload-ping-ok\n\
         taskset 0x2 sh -c 'timeout 120 nc -w 5 10.0.2.1 5002 < /tmp/blob2 && echo sent2-ok'\n\
         {reload}",
        before = irqs("irq-before"),
        after = irqs("irq-after"),
        reload = irqs("irq-reload"),
    );
    let script = "cat > in-netns.sh <<'NETNS'\n\
                  ip link set lo up\n\
                  for n in 0 1 2; do\n\
                  printf '#!/bin/sh\\nexec cat > received%s\\n' $n > receiver$n\n\
                  chmod +x receiver$n\n\
                  nc -l -p 500$n -e ./receiver$n &\n\
                  done\n\
                  (for i in $(seq 1 400); do ip link show tap0 >/dev/null 2>&1 && break; usleep 50000; done\n\
                  ip link set tap0 up\n\
                  ip addr add 10.0.2.1/24 dev tap0) &\n\
                  {pvm}\n\
                  rc=$?\n\
                  for n in 0 1 2; do echo \"host-md5-$n $(md5sum < received$n)\"; done\n\
                  exit $rc\n\
                  NETNS\n\
                  unshare -n sh ./in-netns.sh";
    Scenario::boot(name, Kernel::MinimalElf, 2, &init)
        .args([
            "--tap",
            &format!("tap0,mac=52:54:00:12:34:57,vhost={vhost},queues=2"),
            "--stats",
        ])
        .script(script)
        .timeout(300)
}

static BATCH: Batch = Batch::new(scenarios);

fn scenarios() -> Vec<Scenario> {
    // A modular virtio_console (Debian) registers hvc0 after the kernel opened init's console,
    // so /init moves its stdio there itself. Input is sent once the guest asks for it: the
    // guest's tty layer drops what arrives before the console is open.
    let rng_and_console = "[ -c /dev/hvc0 ] && exec </dev/hvc0 >/dev/hvc0 2>&1\n\
                           echo \"rng: $(cat /sys/class/misc/hw_random/rng_current)\"\n\
                           echo \"hwrng-bytes: $(head -c 4096 /dev/hwrng | wc -c)\"\n\
                           echo \"console: $(cat /sys/class/tty/console/active)\"\n\
                           echo ready-for-input\n\
                           read -t 60 line\n\
                           echo \"got: $line\"\n";
    let answer_when_asked = answer_when("ready-for-input", "hello-from-the-host\\n");
    vec![
        disk_scenario("disk-minimal-pci", Kernel::MinimalElf, "pci"),
        disk_scenario("disk-minimal-mmio", Kernel::MinimalElf, "mmio"),
        disk_scenario("disk-debian-pci", Kernel::DebianBzImage, "pci"),
        Scenario::boot(
            "disk-readonly",
            Kernel::MinimalElf,
            1,
            &write_pattern("R", "/dev/vda"),
        )
        .args(["--disk", "r.img,ro"])
        .file("r.img", vec![0; DISK_BYTES])
        .script(KEEP_DISKS)
        .timeout(90),
        Scenario::boot(
            "console-minimal-mmio",
            Kernel::MinimalElf,
            1,
            rng_and_console,
        )
        .args(["--transport", "mmio", "--console", "virtio"])
        .script(&answer_when_asked)
        .timeout(90),
        Scenario::boot(
            "console-debian-pci",
            Kernel::DebianBzImage,
            1,
            rng_and_console,
        )
        .args(["--console", "virtio"])
        .script(&answer_when_asked)
        .timeout(90),
        exits_scenario("exits-pci-100", "pci", 100),
        exits_scenario("exits-pci-1000", "pci", 1000),
        exits_scenario("exits-mmio-100", "mmio", 100),
        exits_scenario("exits-mmio-1000", "mmio", 1000),
        net_scenario("net-minimal-pci", Kernel::MinimalElf, "pci", "off"),
        net_scenario("net-minimal-mmio", Kernel::MinimalElf, "mmio", "off"),
        net_scenario("net-debian-pci", Kernel::DebianBzImage, "pci", "off"),
        net_scenario("net-vhost-minimal-pci", Kernel::MinimalElf, "pci", "on"),
        net_scenario("net-vhost-minimal-mmio", Kernel::MinimalElf, "mmio", "on"),
        net_scenario("net-vhost-debian-pci", Kernel::DebianBzImage, "pci", "on"),
        // The same boot serves a two-queue io_uring disk: one more check, no more boots.
        net_mq_scenario("net-mq-minimal-pci", "off", BLOCK_MQ_GUEST)
            .args(["--disk", "mq.img,engine=io_uring,queues=2"])
            .file("mq.img", vec![0; DISK_BYTES]),
        net_mq_scenario("net-mq-vhost-minimal-pci", "on", ""),
        // No --kernel: pvm boots the kernel in the image's /boot, with a tap attached.
        Scenario::new("rootfs-boot")
            .file(
                "rootfs.img",
                std::fs::read(common::assets().join("rootfs.img")).unwrap(),
            )
            .args([
                "--disk",
                "rootfs.img",
                "--tap",
                "tap0",
                "--mem",
                "256M",
                "--cmdline",
                "quiet",
            ])
            .script(&in_network_namespace(&answer_when(
                "PVM-ROOTFS-SHELL-READY",
                "echo SHELL-$((6*7)) $(cat /sys/class/net/eth0/address)\\npoweroff -f\\n",
            )))
            .timeout(120),
    ]
}

fn check_disks(name: &str) {
    let outcome = BATCH.outcome(name);
    outcome.assert_rc(0);
    outcome.assert_contains("blocks: vda vdb");
    outcome.assert_contains("serial: disk-a");
    outcome.assert_contains("A-write-ok");
    outcome.assert_contains("B-write-ok");
    outcome.assert_contains("reloaded: A-PATTERN00001");
    for (image, tag) in [("a.img", "A"), ("b.img", "B")] {
        let bytes = std::fs::read(outcome.out.join(image)).unwrap();
        let expected = pattern(tag, 4096);
        assert_eq!(bytes.len(), DISK_BYTES, "{name}: {image} changed size");
        assert!(
            bytes[..expected.len()] == expected[..],
            "{name}: {image} does not hold the pattern"
        );
        assert!(
            bytes[expected.len()..].iter().all(|b| *b == 0),
            "{name}: {image} written past the pattern"
        );
    }
}

#[test]
fn disks_on_pci_with_the_minimal_kernel() {
    check_disks("disk-minimal-pci");
}

#[test]
fn disks_on_mmio_with_the_minimal_kernel() {
    check_disks("disk-minimal-mmio");
}

#[test]
fn disks_on_pci_with_the_debian_kernel() {
    check_disks("disk-debian-pci");
}

#[test]
fn read_only_disk_refuses_writes() {
    let outcome = BATCH.outcome("disk-readonly");
    outcome.assert_rc(0);
    outcome.assert_contains("R-write-refused");
    let bytes = std::fs::read(outcome.out.join("r.img")).unwrap();
    assert!(
        bytes.iter().all(|b| *b == 0),
        "the read-only image was modified"
    );
}

fn check_console_and_rng(name: &str) {
    let outcome = BATCH.outcome(name);
    outcome.assert_rc(0);
    outcome.assert_contains("rng: virtio_rng.0");
    outcome.assert_contains("hwrng-bytes: 4096");
    outcome.assert_contains("console: hvc0");
    outcome.assert_contains("got: hello-from-the-host");
}

#[test]
fn virtio_console_and_rng_minimal_mmio() {
    check_console_and_rng("console-minimal-mmio");
}

#[test]
fn virtio_console_and_rng_debian_pci() {
    check_console_and_rng("console-debian-pci");
}

/// Total userspace exits pvm reported with --stats.
fn total_exits(name: &str) -> u64 {
    let outcome = BATCH.outcome(name);
    outcome.assert_rc(0);
    outcome.assert_contains("reads-done");
    let line = outcome
        .console
        .lines()
        // The guest's last console bytes may share the line (no newline before power-off).
        .find_map(|l| l.find("pvm: exits: ").map(|at| &l[at..]))
        .unwrap_or_else(|| {
            outcome.dump();
            panic!("{name}: no exit statistics")
        });
    line.trim_start_matches("pvm: exits: ")
        .split_whitespace()
        .map(|kv| kv.split_once('=').unwrap().1.parse::<u64>().unwrap())
        .sum()
}

/// Exits per block request in steady state: the difference between 1000 and 100 requests.
fn exits_per_request(transport: &str) -> f64 {
    let small = total_exits(&format!("exits-{transport}-100"));
    let large = total_exits(&format!("exits-{transport}-1000"));
    large.saturating_sub(small) as f64 / 900.0
}

#[test]
fn block_requests_on_pci_cost_no_userspace_exits() {
    let per_request = exits_per_request("pci");
    // Kicks are ioeventfds and interrupts MSI-X irqfds: nothing reaches userspace.
    assert!(
        per_request < 0.2,
        "{per_request:.2} exits per request on pci"
    );
}

#[test]
fn block_requests_on_mmio_cost_only_the_interrupt_acknowledgement() {
    let per_request = exits_per_request("mmio");
    // Kicks are ioeventfds; each interrupt costs the guest a status read and an acknowledge.
    assert!(
        per_request <= 2.5,
        "{per_request:.2} exits per request on mmio"
    );
}

fn check_net(name: &str, vhost: bool) {
    let outcome = BATCH.outcome(name);
    outcome.assert_rc(0);
    outcome.assert_contains(if vhost {
        "pvm: tap tap0: vhost-net data plane"
    } else {
        "pvm: tap tap0: in-process data plane"
    });
    outcome.assert_contains("ping-ok");
    outcome.assert_contains("sent-ok");
    outcome.assert_contains("reload-ping-ok");
    let md5 = |prefix: &str| {
        outcome
            .console
            .lines()
            .find_map(|l| {
                l.strip_prefix(prefix)
                    .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
            })
            .unwrap_or_else(|| {
                outcome.dump();
                panic!("{name}: no '{prefix}' line")
            })
    };
    let (guest, host) = (md5("guest-md5 "), md5("host-md5 "));
    assert_eq!(guest.len(), 32, "{name}: bad guest checksum line");
    assert_eq!(
        guest, host,
        "{name}: the 3 MiB arrived damaged or incomplete"
    );
    // The device's own counters agree: frames went out, none failed or was malformed.
    let counters = outcome
        .console
        .lines()
        .find_map(|l| l.strip_prefix("pvm: tap tap0: tx_frames="))
        .map(|rest| format!("tx_frames={rest}"))
        .unwrap_or_else(|| panic!("{name}: no tap counters"));
    let value = |key: &str| -> u64 {
        counters
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
            .unwrap()
    };
    // With vhost-net the kernel moved every frame and the counts are the tap's own.
    assert!(value("tx_bytes") >= 3 << 20, "{name}: {counters}");
    assert!(value("rx_frames") > 0, "{name}: {counters}");
    if vhost {
        assert!(counters.contains("kernel counters"), "{name}: {counters}");
    } else {
        assert_eq!(
            value("tx_errors") + value("tx_malformed"),
            0,
            "{name}: {counters}"
        );
    }
    // For the record (README): exits and CPU by thread during this run.
    for line in outcome
        .console
        .lines()
        .filter(|l| l.contains("pvm: exits") || l.contains("pvm: cpu"))
    {
        eprintln!("{name}: {line}");
    }
}

#[test]
fn net_minimal_pci() {
    check_net("net-minimal-pci", false);
}

#[test]
fn net_minimal_mmio() {
    check_net("net-minimal-mmio", false);
}

#[test]
fn net_debian_pci() {
    check_net("net-debian-pci", false);
}

#[test]
fn net_vhost_minimal_pci() {
    check_net("net-vhost-minimal-pci", true);
}

#[test]
fn net_vhost_minimal_mmio() {
    check_net("net-vhost-minimal-mmio", true);
}

#[test]
fn net_vhost_debian_pci() {
    check_net("net-vhost-debian-pci", true);
}

/// Per-queue interrupt counts from the guest's `tag` lines: (queue name suffix, count), e.g.
/// ("input.1", 42).
fn guest_irqs(outcome: &common::Outcome, tag: &str) -> Vec<(String, u64)> {
    outcome
        .console
        .lines()
        .filter_map(|l| l.strip_prefix(tag)?.strip_prefix(' '))
        .filter_map(|rest| {
            let (name, count) = rest.split_once(' ')?;
            let (_, queue) = name.split_once('-')?;
            Some((queue.to_string(), count.trim().parse().ok()?))
        })
        .collect()
}

fn check_net_mq(name: &str, vhost: bool) {
    let outcome = BATCH.outcome(name);
    outcome.assert_rc(0);
    outcome.assert_contains(if vhost {
        "pvm: tap tap0: vhost-net data plane, 2 queue pairs"
    } else {
        "pvm: tap tap0: in-process data plane, 2 queue pairs"
    });
    // The driver negotiated MQ and uses both pairs, before and after a reload.
    outcome.assert_contains("mq-feature: 1");
    outcome.assert_contains("mq-queues: rx-0 rx-1 tx-0 tx-1");
    outcome.assert_contains("reload-queues: rx-0 rx-1 tx-0 tx-1");
    for line in [
        "ping-ok",
        "sent0-ok",
        "sent1-ok",
        "reload-ping-ok",
        "sent2-ok",
    ] {
        outcome.assert_contains(line);
    }
    let md5 = |prefix: &str| {
        outcome
            .console
            .lines()
            .find_map(|l| {
                l.strip_prefix(prefix)
                    .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
            })
            .unwrap_or_else(|| {
                outcome.dump();
                panic!("{name}: no '{prefix}' line")
            })
    };
    for n in 0..3 {
        let guest = md5(&format!("guest-md5-{n} "));
        assert_eq!(guest.len(), 32, "{name}: bad guest checksum line");
        assert_eq!(
            guest,
            md5(&format!("host-md5-{n} ")),
            "{name}: transfer {n} arrived damaged or incomplete"
        );
    }
    // Both queue pairs carried traffic, both ways: every queue's interrupt count rose during
    // the pinned transfers, and pair 1's again after the reload.
    let before = guest_irqs(outcome, "irq-before");
    let after = guest_irqs(outcome, "irq-after");
    let reload = guest_irqs(outcome, "irq-reload");
    let count = |list: &[(String, u64)], queue: &str| {
        list.iter()
            .find(|(q, _)| q == queue)
            .map(|(_, c)| *c)
            .unwrap_or_else(|| {
                outcome.dump();
                panic!("{name}: no interrupt count for {queue}")
            })
    };
    for queue in ["input.0", "input.1", "output.0", "output.1"] {
        assert!(
            count(&after, queue) > count(&before, queue),
            "{name}: {queue} had no interrupts during the transfers: before {before:?}, after {after:?}"
        );
    }
    for queue in ["input.1", "output.1"] {
        assert!(
            count(&reload, queue) > 0,
            "{name}: {queue} had no interrupts after the reload: {reload:?}"
        );
    }
    let counters = |pair: &str| -> Vec<(String, u64)> {
        let prefix = format!("pvm: tap tap0{pair}: tx_frames=");
        let line = outcome
            .console
            .lines()
            .find_map(|l| {
                l.find(&prefix)
                    .map(|at| l[at + prefix.len() - 10..].to_string())
            })
            .unwrap_or_else(|| {
                outcome.dump();
                panic!("{name}: no '{prefix}' counters")
            });
        line.split_whitespace()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    };
    let value = |list: &[(String, u64)], key: &str| {
        list.iter().find(|(k, _)| k == key).map_or(0, |(_, v)| *v)
    };
    let total = counters("");
    if vhost {
        // The kernel moved every frame of both pairs: the tap's own counts, not per pair.
        assert!(
            value(&total, "tx_frames") > 0 && value(&total, "rx_frames") > 0,
            "{name}: {total:?}"
        );
    } else {
        // pvm's own per-pair counters agree: each pair's worker moved frames both ways.
        for pair in [" pair 0", " pair 1"] {
            let c = counters(pair);
            assert!(
                value(&c, "tx_frames") > 0 && value(&c, "rx_frames") > 0,
                "{name}:{pair}: {c:?}"
            );
            assert_eq!(
                value(&c, "tx_errors") + value(&c, "tx_malformed") + value(&c, "rx_errors"),
                0,
                "{name}:{pair}: {c:?}"
            );
        }
        assert!(value(&total, "tx_bytes") >= 3 << 20, "{name}: {total:?}");
    }
}

#[test]
fn net_multiqueue_minimal_pci() {
    check_net_mq("net-mq-minimal-pci", false);
}

#[test]
fn net_multiqueue_vhost_minimal_pci() {
    check_net_mq("net-mq-vhost-minimal-pci", true);
}

#[test]
fn boots_the_kernel_found_on_the_disk_image_to_a_shell() {
    let outcome = BATCH.outcome("rootfs-boot");
    outcome.assert_rc(0);
    outcome.assert_contains("pvm: booting rootfs.img:/boot/vmlinuz-");
    outcome.assert_contains("root=/dev/vda");
    outcome.assert_contains("pvm rootfs: Linux");
    outcome.assert_contains("SHELL-42 ");
}

/// The two-queue io_uring disk of the multiqueue boot (see [`BLOCK_MQ_GUEST`]).
#[test]
fn block_multiqueue_on_io_uring_minimal_pci() {
    let outcome = BATCH.outcome("net-mq-minimal-pci");
    outcome.assert_contains("blk-mq: 0 1");
    for line in [
        "q0-write-ok",
        "q1-write-ok",
        "q0-readback-ok",
        "q1-readback-ok",
    ] {
        outcome.assert_contains(line);
    }
    // Each queue has its own MSI-X vector, and each was used.
    let irqs = guest_irqs(outcome, "blk-irq");
    for queue in ["req.0", "req.1"] {
        let count = irqs.iter().find(|(q, _)| q == queue).map(|&(_, n)| n);
        assert!(count.is_some_and(|n| n > 0), "{queue}: {irqs:?}");
    }
}

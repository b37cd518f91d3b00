//! `PVM_BENCH_ONLY=netmq`: multiqueue virtio-net scaling with a 2-vCPU guest, in an emulated
//! host of its own with 2 vCPUs (`PVM_KVM_HOST_CPUS=2`, see [`HOST_CPUS`]): pvm's in-process
//! worker and vhost-net with 1 and with 2 queue pairs, QEMU q35 virtio-net-pci vhost=on with 1
//! and with 2 (`mq=on,vectors=6`), and Firecracker (one pair) as the reference.
//!
//! The guest is io.rs's: the minimal kernel and busybox initramfs with the tools disk (iperf3),
//! but 2 vCPUs. iperf3 3.12 runs all its streams in one thread, and the guest's virtio-net
//! driver picks a transmit queue by the sending CPU (it sets XPS CPU n -> queue n when it has as
//! many pairs as CPUs), so "4 streams" are two clients of 2 streams each, pinned to CPU 0 and
//! CPU 1 (`taskset`), against two servers on the host. The tap (tun) sends a flow's replies
//! back on the queue the flow last came from. The same layout runs on every VMM, so with one
//! pair both clients share it. The guest prints its queues, XPS/RPS masks and per-queue
//! interrupt counts after each run (`mq-` lines), which show whether the pairs were both used.
//!
//! Every VMM creates tap0 itself (multi-queue when it asks for 2 pairs: busybox cannot make a
//! multi-queue tap), and the host side configures it once it appears.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::{Kernel, Outcome, Scenario};
use crate::io::{
    Figures, MOUNT_TOOLS, firecracker_config, job_cpu_s, job_json, medians, per_gib, runs,
    sample_jobs, secs, stage_tools, with_host_iperf, with_vmm,
};
use crate::{QEMU, firecracker};

/// The emulated host's vCPUs for this group's batch: one each for the guest's two vCPUs' worth
/// of work to spread over (TCG runs one thread per vCPU, so this takes both of the machine's
/// cores for the batch).
pub const HOST_CPUS: u32 = 2;

/// The guest's vCPUs.
const GUEST_CPUS: u32 = 2;

/// Configurations: scenario tag, label, queue pairs.
const MQ_VMMS: [(&str, &str, u32); 7] = [
    ("fc", "Firecracker virtio-net (one pair)", 1),
    ("pvm1", "pvm in-process, 1 pair", 1),
    ("pvm2", "pvm in-process, 2 pairs", 2),
    ("qemu1", "QEMU q35 vhost=on, 1 pair", 1),
    ("qemu2", "QEMU q35 vhost=on, mq=on, 2 pairs", 2),
    ("vhost1", "pvm vhost-net, 1 pair", 1),
    ("vhost2", "pvm vhost-net, 2 pairs", 2),
];

/// iperf3 runs, each as two clients (2 streams or one UDP flow each) pinned to CPU 0 and 1:
/// name, arguments. UDP is capped per client (see BENCHMARKS.md: the same cap on every VMM).
const MQ_RUNS: [(&str, &str); 3] = [
    ("tcp4", "-P 2"),
    ("tcp4-rev", "-P 2 -R"),
    ("udp", "-u -l 1400 -b 100M"),
];

/// The first iperf3 server port; the second client uses the next.
const PORT: u16 = 5201;

/// True for the scenarios of this group (they need their own batch, on [`HOST_CPUS`]).
pub fn is_mq(name: &str) -> bool {
    name.starts_with("netmq-")
}

/// The guest's shell function `pair NAME ARGS...`: two iperf3 clients, one pinned to each
/// CPU, between `io-begin`/`io-end` markers (2 s of quiet either side, as io.rs's `job`),
/// then their JSON between `OUT-BEGIN NAME.K`/`OUT-END NAME.K` and the per-queue interrupts.
fn pair_fn() -> String {
    let secs = secs();
    format!(
        "pair() {{\n\
             name=$1; shift\n\
             echo \"io-begin $name\"; sleep 2\n\
             taskset 0x1 $T /tools/iperf3 -c 10.0.2.1 -p {PORT} -t {secs} -i 0 -J \"$@\" > /tmp/o0 2> /tmp/e0 &\n\
             taskset 0x2 $T /tools/iperf3 -c 10.0.2.1 -p {} -t {secs} -i 0 -J \"$@\" > /tmp/o1 2> /tmp/e1\n\
             wait\n\
             echo \"io-end $name\"; sleep 2\n\
             for k in 0 1; do echo \"OUT-BEGIN $name.$k\"; cat /tmp/o$k; echo; echo \"OUT-END $name.$k\"; cat /tmp/e$k; done\n\
             irqs $name\n\
         }}\n\
         irqs() {{\n\
             awk -v tag=\"$1\" '/virtio[0-9]+-(input|output)\\.[0-9]+$/ {{ print \"mq-irq\", tag, $NF, \"cpu0=\" $2, \"cpu1=\" $3 }}' /proc/interrupts\n\
         }}\n",
        PORT + 1
    )
}

/// One configuration's scenario (see [`MQ_VMMS`]).
fn scenario(vmm: &str, pairs: u32, run: u32, stage: &Path) -> Result<Scenario, String> {
    let secs = secs();
    let mut init = format!(
        "{MOUNT_TOOLS}{}\
         ip link set eth0 up\n\
         ip addr add 10.0.2.2/24 dev eth0\n\
         for i in $(seq 1 30); do ping -c 1 -W 1 10.0.2.1 >/dev/null && break; done\n\
         echo \"mq-queues $(ls /sys/class/net/eth0/queues | tr '\\n' ' ')\"\n\
         for q in /sys/class/net/eth0/queues/tx-*; do echo \"mq-xps ${{q##*/}} $(cat $q/xps_cpus)\"; done\n\
         for q in /sys/class/net/eth0/queues/rx-*; do echo \"mq-rps ${{q##*/}} $(cat $q/rps_cpus)\"; done\n\
         irqs boot\n",
        pair_fn()
    );
    for (name, args) in MQ_RUNS {
        init.push_str(&format!("pair {name} {args}\n"));
    }
    let mac = "52:54:00:12:34:56";
    let (setup, command) = match vmm {
        "qemu1" | "qemu2" => {
            let qemu = QEMU.replace("-smp 1 ", &format!("-smp {GUEST_CPUS} "));
            if qemu == QEMU {
                return Err("QEMU's command line has no '-smp 1' to change".to_string());
            }
            let (netdev, device) = if pairs > 1 {
                // 2 vectors per pair, one for the control queue, one for config changes.
                (
                    format!(",queues={pairs}"),
                    format!(",mq=on,vectors={}", 2 * pairs + 2),
                )
            } else {
                (String::new(), String::new())
            };
            (
                String::new(),
                format!(
                    "{qemu} -M q35 -kernel {{kernel}} -initrd initrd.cpio -append 'console=ttyS0 quiet' \
                     -netdev tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=on{netdev} \
                     -device virtio-net-pci,netdev=n0,mac={mac},romfile={device} {}",
                    crate::io::QEMU_TOOLS
                ),
            )
        }
        "fc" => (
            firecracker_config(None, true, GUEST_CPUS),
            firecracker::COMMAND.to_string(),
        ),
        _ => (String::new(), "{pvm}".to_string()),
    };
    let names: Vec<&str> = MQ_RUNS.iter().map(|r| r.0).collect();
    // Not io.rs's in_network_namespace: that makes tap0 with tunctl, single-queue.
    let script = format!(
        "cat > in-netns.sh <<'NETNS'\n\
         ip link set lo up\n\
         {setup}\
         (for i in $(seq 1 1200); do ip link show tap0 >/dev/null 2>&1 && break; usleep 50000; done\n\
          ip link set tap0 up\n\
          ip addr add 10.0.2.1/24 dev tap0) &\n\
         servers=\n\
         for p in {PORT} {}; do\n\
             {{shared}}/io/host/lib/ld-linux-x86-64.so.2 --library-path {{shared}}/io/host/lib \
         {{shared}}/io/host/iperf3 -s -p $p > server$p.log 2>&1 &\n\
             servers=\"$servers $!\"\n\
         done\n\
         {command} > out.log 2>&1 &\n\
         vmmpid=$!\n\
         {}kill $servers\n\
         exit $rc\n\
         NETNS\n\
         unshare -n sh ./in-netns.sh",
        PORT + 1,
        sample_jobs(&names)
    );
    let mut scenario = Scenario::boot(
        &format!("netmq-{run}-{vmm}"),
        Kernel::MinimalElf,
        GUEST_CPUS,
        &init,
    )
    .script(&script)
    .timeout(300 + 10 * secs);
    scenario = with_host_iperf(scenario, stage)?;
    let vhost = if vmm.starts_with("vhost") {
        "on"
    } else {
        "off"
    };
    if vmm.starts_with("pvm") || vmm.starts_with("vhost") {
        scenario = scenario.args([
            "--tap",
            &format!("tap0,mac={mac},vhost={vhost},queues={pairs}"),
        ]);
    }
    let tag = if vmm.starts_with("qemu") { "qemu" } else { vmm };
    with_vmm(scenario, tag, stage)
}

/// Whether PVM_BENCH_ONLY selects this group (only by name: its 2-CPU batch takes both of the
/// machine's cores, and staging the tools takes a while).
fn selected() -> bool {
    let only = std::env::var("PVM_BENCH_ONLY").unwrap_or_default();
    only.starts_with("netmq") || (only.len() >= 4 && "netmq".starts_with(&only))
}

/// This group's scenarios when PVM_BENCH_ONLY selects them.
pub fn scenarios() -> Vec<Scenario> {
    if !selected() {
        return Vec::new();
    }
    let stage = match stage_tools() {
        Ok(stage) => stage,
        Err(e) => {
            println!("netmq: left out: {e}");
            return Vec::new();
        }
    };
    let mut all = Vec::new();
    for run in 1..=runs() {
        for (vmm, _, pairs) in MQ_VMMS {
            match scenario(vmm, pairs, run, &stage) {
                Ok(s) => all.push(s),
                Err(e) => println!("netmq-{run}-{vmm}: left out: {e}"),
            }
        }
    }
    all
}

/// One run's figures: both clients' sums (TCP: what the receivers counted; UDP: the loss over
/// both), with the CPU the job took.
fn pair_figures(outcome: &Outcome, name: &str) -> Option<Figures> {
    let (mut bits, mut bytes, mut lost, mut packets) = (0.0, 0.0, 0.0, 0.0);
    for k in 0..2 {
        let json = job_json(outcome, &format!("{name}.{k}"))?;
        let end = &json["end"];
        let sum = if name == "udp" {
            &end["sum"]
        } else {
            &end["sum_received"]
        };
        bits += sum["bits_per_second"].as_f64()?;
        bytes += sum["bytes"].as_f64()?;
        lost += sum["lost_packets"].as_f64().unwrap_or(0.0);
        packets += sum["packets"].as_f64().unwrap_or(0.0);
    }
    let (cpu_s, vhost_s) = job_cpu_s(outcome, name)?;
    Some(Figures {
        rate: bits / 1e6,
        bytes,
        p50: 100.0 * lost / packets.max(1.0),
        cpu_s,
        vhost_s,
        ..Figures::default()
    })
}

/// Prints this group's tables from the outcomes that succeeded (`ok`).
pub fn report<'a>(ok: &dyn Fn(&str) -> Option<&'a Outcome>) {
    if !selected() {
        return;
    }
    let runs = runs();
    let secs = secs();
    println!(
        "\n### Multiqueue: iperf3, 2-vCPU guest, {HOST_CPUS}-vCPU emulated host, two pinned clients ({secs} s per run, medians of up to {runs} run(s))\n"
    );
    println!(
        "| run | VMM | Mbit/s | each run's Mbit/s | UDP loss % | VMM CPU s/GiB | vhost workers s/GiB |\n| --- | --- | --- | --- | --- | --- | --- |"
    );
    let mut figures: BTreeMap<(&str, &str), Figures> = BTreeMap::new();
    for (name, _) in MQ_RUNS {
        for (vmm, label, _) in MQ_VMMS {
            let all: Vec<Figures> = (1..=runs)
                .filter_map(|r| pair_figures(ok(&format!("netmq-{r}-{vmm}"))?, name))
                .collect();
            let Some(f) = medians(&all) else { continue };
            figures.insert((name, vmm), f);
            // With few runs the spread says more than the median (of 2: the higher).
            let each: Vec<String> = all.iter().map(|f| format!("{:.1}", f.rate)).collect();
            println!(
                "| {name} | {label} | {:.1} | {} | {:.1} | {:.2} | {:.2} |",
                f.rate,
                each.join(" / "),
                f.p50,
                per_gib(&f, f.cpu_s),
                per_gib(&f, f.vhost_s),
            );
        }
    }
    let pairs = [
        ("pvm2", "pvm1"),
        ("vhost2", "vhost1"),
        ("qemu2", "qemu1"),
        ("vhost2", "qemu2"),
        ("vhost1", "qemu1"),
        ("pvm2", "qemu2"),
        ("vhost2", "fc"),
        ("pvm2", "fc"),
    ];
    let header: Vec<String> = pairs.iter().map(|(a, b)| format!("{a} / {b}")).collect();
    println!(
        "\n| run (Mbit/s) | {} |\n| --- |{}",
        header.join(" | "),
        " --- |".repeat(pairs.len())
    );
    for (name, _) in MQ_RUNS {
        let cells: Vec<String> = pairs
            .iter()
            .map(
                |(a, b)| match (figures.get(&(name, *a)), figures.get(&(name, *b))) {
                    (Some(a), Some(b)) => format!("{:.2}", a.rate / b.rate.max(1e-9)),
                    _ => "n/a".to_string(),
                },
            )
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    // What the guest did with its queues, from run 1 of each configuration.
    println!();
    for (vmm, label, _) in MQ_VMMS {
        let Some(outcome) = ok(&format!("netmq-1-{vmm}")) else {
            continue;
        };
        for line in outcome.console.lines() {
            if let Some(at) = line.find("mq-") {
                println!("{label}: {}", line[at..].trim_end());
            }
        }
    }
}

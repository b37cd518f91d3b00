//! Guest-level figures, measured in one run of the KVM host the tests use (the emulated host on
//! machines whose /dev/kvm cannot boot Linux): boot time to /init (--boot-timer), the VMM's
//! memory overhead with a booted guest, block throughput (dd in the guest), TCP throughput
//! through a tap with pvm's in-process data plane and with vhost-net, userspace exits per 1000
//! requests / packets, and the VMM's CPU time per GiB moved (its own threads, not the vCPUs).
//!
//! `cargo bench --bench guest` prints a table. It measures; it asserts nothing beyond the
//! scenarios having run (a scenario that fails is reported and its figures left out). Absolute
//! numbers under nested emulation (QEMU TCG) are far below bare metal; compare within a run.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::collections::BTreeMap;

use common::{Kernel, Outcome, Scenario, run_batch};

const BOOT_RUNS: u32 = 5;
/// Block transfer: MiB written then read back with O_DIRECT, 1 MiB per request.
const BLOCK_MIB: u32 = 256;
/// TCP transfer per direction, MiB.
const NET_MIB: u32 = 64;

/// The guest's /init writes 123 to the boot-timer port first thing (tests/common puts the
/// program in every guest initramfs).
const SIGNAL_BOOT: &str = "/bin/pvm-boot-signal 2>/dev/null || \
    printf '\\173' | dd of=/dev/port bs=1 seek=1008 count=1 2>/dev/null\n";

/// Seconds since the guest booted, to 10 ms, as shell arithmetic in centiseconds.
const NOW_CS: &str = "$(cut -d' ' -f1 /proc/uptime | tr -d .)";

fn boot_scenario(name: &str, kernel: Kernel) -> Scenario {
    Scenario::boot(name, kernel, 1, SIGNAL_BOOT)
        .args(["--boot-timer"])
        .timeout(90)
}

/// Boots Debian's kernel, waits until /init runs, then reads pvm's smaps from the host side:
/// total RSS, and the RSS of guest memory (the anonymous mappings of at least 64 MiB).
fn memory_scenario() -> Scenario {
    let init = format!("{SIGNAL_BOOT}echo guest-up\nsleep 4\n");
    let script = "({pvm} > out.log 2>&1; echo $? > rc.txt) &\n\
         for i in $(seq 1 120); do grep -q guest-up out.log && break; sleep 1; done\n\
         pid=$(pidof pvm)\n\
         awk '/^[0-9a-f]+-[0-9a-f]+ /{anon = NF < 6}\n\
              /^Size:/{big = anon && $2 >= 65536}\n\
              /^Rss:/{total += $2; if (big) guest += $2}\n\
              /^Private_Dirty:/{if (!big) dirty += $2}\n\
              END {printf \"BENCH mem total_kib=%d guest_kib=%d vmm_private_dirty_kib=%d\\n\", total, guest, dirty}' /proc/$pid/smaps\n\
         wait\n\
         cat out.log\n\
         exit $(cat rc.txt)";
    Scenario::boot("mem-debian", Kernel::DebianBzImage, 1, &init)
        .args(["--boot-timer"])
        .script(script)
        .timeout(120)
}

/// `mib` MiB written then read back with dd (1 MiB O_DIRECT requests); 0 is the baseline that
/// only boots, so the difference is what the transfer cost.
fn block_scenario(mib: u32) -> Scenario {
    let init = format!(
        "t0={NOW_CS}\n\
         [ {mib} -gt 0 ] && dd if=/dev/zero of=/dev/vda bs=1M count={mib} oflag=direct 2>/dev/null\n\
         t1={NOW_CS}\n\
         [ {mib} -gt 0 ] && dd if=/dev/vda of=/dev/null bs=1M count={mib} iflag=direct 2>/dev/null\n\
         t2={NOW_CS}\n\
         echo \"BENCH blk write_cs=$((t1 - t0)) read_cs=$((t2 - t1))\"\n"
    );
    Scenario::boot(&format!("blk-{mib}"), Kernel::MinimalElf, 1, &init)
        .args(["--disk", "disk.img", "--stats"])
        // The image is made by the script (on the host's tmpfs), not carried in the batch.
        .script(&format!(
            "dd if=/dev/zero of=disk.img bs=1M count=0 seek={BLOCK_MIB} 2>/dev/null\n{{pvm}}"
        ))
        .timeout(600)
}

/// TCP both ways between the guest and the host side of tap0, in a network namespace: `mib`
/// MiB each way (0: the baseline, which only pings). Receivers run `cat > /dev/null` through
/// `nc -e`, since a backgrounded nc reads EOF from stdin and would close at once.
fn net_scenario(vhost: &str, mib: u32) -> Scenario {
    let count = mib * 16; // 64 KiB blocks
    let init = format!(
        "ip link set eth0 up\n\
         ip addr add 10.0.2.2/24 dev eth0\n\
         ping -c 1 -W 5 10.0.2.1 >/dev/null\n\
         printf '#!/bin/sh\\nexec cat > /dev/null\\n' > /tmp/sink; chmod +x /tmp/sink\n\
         t0={NOW_CS}\n\
         [ {mib} -gt 0 ] && dd if=/dev/zero bs=65536 count={count} 2>/dev/null | nc -w 5 10.0.2.1 5000\n\
         t1={NOW_CS}\n\
         [ {mib} -gt 0 ] && nc -l -p 5001 -e /tmp/sink &\n\
         echo rx-ready\n\
         wait\n\
         t2={NOW_CS}\n\
         echo \"BENCH net tx_cs=$((t1 - t0)) rx_cs=$((t2 - t1))\"\n"
    );
    let script = format!(
        "cat > in-netns.sh <<'NETNS'\n\
         ip link set lo up\n\
         tunctl -t tap0 >/dev/null\n\
         ip link set tap0 up\n\
         ip addr add 10.0.2.1/24 dev tap0\n\
         printf '#!/bin/sh\\nexec cat > /dev/null\\n' > sink; chmod +x sink\n\
         nc -l -p 5000 -e ./sink &\n\
         listener=$!\n\
         ({{pvm}} > out.log 2>&1; echo $? > rc.txt) &\n\
         for i in $(seq 1 300); do grep -q rx-ready out.log && break; sleep 1; done\n\
         [ {mib} -gt 0 ] && dd if=/dev/zero bs=65536 count={count} 2>/dev/null | nc -w 5 10.0.2.2 5001\n\
         wait $!\n\
         cat out.log\n\
         echo \"BENCH tap packets=$(sed 's/:/ /' /proc/net/dev | awk '$1 == \"tap0\" {{print $3 + $11}}')\"\n\
         kill $listener 2>/dev/null\n\
         exit $(cat rc.txt)\n\
         NETNS\n\
         unshare -n sh ./in-netns.sh"
    );
    Scenario::boot(&format!("net-{vhost}-{mib}"), Kernel::MinimalElf, 1, &init)
        .args([
            "--tap",
            &format!("tap0,mac=52:54:00:12:34:56,vhost={vhost}"),
            "--stats",
        ])
        .script(&script)
        .timeout(600)
}

/// QEMU (this machine's qemu-system-x86_64, its shared libraries and firmware) as scenario
/// files under qemu/, run inside the KVM host through its own dynamic loader.
fn with_qemu(mut scenario: Scenario) -> Result<Scenario, String> {
    let binary = std::path::Path::new("/usr/bin/qemu-system-x86_64");
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
    };
    scenario = scenario.file("qemu/qemu-system-x86_64", read(binary)?);
    let ldd = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| format!("ldd: {e}"))?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let Some(path) = line.split_whitespace().find(|w| w.starts_with('/')) else {
            continue;
        };
        let path = std::path::Path::new(path);
        let name = path.file_name().unwrap().to_string_lossy();
        scenario = scenario.file(&format!("qemu/lib/{name}"), read(path)?);
    }
    for dir in ["/usr/share/qemu", "/usr/share/seabios"] {
        for entry in std::fs::read_dir(dir).map_err(|e| format!("{dir}: {e}"))? {
            let path = entry.map_err(|e| e.to_string())?.path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let wanted = name.ends_with(".bin") || name.ends_with(".rom");
            if wanted
                && path
                    .metadata()
                    .is_ok_and(|m| m.is_file() && m.len() < (1 << 20))
            {
                scenario = scenario.file(&format!("qemu/share/{name}"), read(&path)?);
            }
        }
    }
    Ok(scenario)
}

/// The same guest (kernel, initramfs whose /init signals the boot timer and powers off, 1 vCPU,
/// 256 MiB) under pvm and under QEMU (-M microvm and -M q35, KVM, no default devices), each
/// timed from launch to exit, alternating, `BOOT_RUNS` times. QEMU runs get 15 s: a guest it
/// cannot power off (microvm without ACPI power-off) would otherwise hold the batch.
fn comparison_scenario(kernel: Kernel, machines: &[&str]) -> Result<Scenario, String> {
    let name = match kernel {
        Kernel::MinimalElf => "cmp-minimal",
        _ => "cmp-debian",
    };
    let mut runs = String::new();
    for machine in machines {
        let command = if *machine == "pvm" {
            "{pvm} --boot-timer > run.log 2>&1".to_string()
        } else {
            format!(
                "timeout 15 ./qemu/lib/ld-linux-x86-64.so.2 --library-path ./qemu/lib ./qemu/qemu-system-x86_64 \
                 -L ./qemu/share -M {machine} -enable-kvm -cpu host -m 256 -smp 1 -nodefaults \
                 -no-user-config -nographic -serial stdio -no-reboot \
                 -kernel {{kernel}} -initrd initrd.cpio -append 'console=ttyS0 quiet' > run.log 2>&1"
            )
        };
        runs.push_str(&format!(
            "t0=$(cut -d' ' -f1 /proc/uptime | tr -d .)\n\
             {command}\n\
             rc=$?\n\
             t1=$(cut -d' ' -f1 /proc/uptime | tr -d .)\n\
             grep -q guest-init-reached run.log || {{ echo \"{machine}: no /init (rc $rc)\"; tail -5 run.log; }}\n\
             grep 'boot-timer: guest signal' run.log\n\
             echo \"BENCH wall vmm={machine} cs=$((t1 - t0)) rc=$rc\"\n"
        ));
    }
    let init = format!(
        "{SIGNAL_BOOT}echo guest-init-reached
"
    );
    let scenario = Scenario::boot(name, kernel, 1, &init)
        .script(&format!(
            "chmod +x qemu/lib/ld-linux-x86-64.so.2 qemu/qemu-system-x86_64\n\
             for i in $(seq 1 {BOOT_RUNS}); do\n{runs}done"
        ))
        .timeout(240);
    with_qemu(scenario)
}

fn scenarios() -> Vec<Scenario> {
    let mut all = Vec::new();
    for (kernel, machines) in [
        (Kernel::MinimalElf, &["pvm", "microvm", "q35"][..]),
        (Kernel::DebianBzImage, &["pvm", "q35"][..]),
    ] {
        match comparison_scenario(kernel, machines) {
            Ok(scenario) => all.push(scenario),
            Err(e) => println!("QEMU comparison left out: {e}"),
        }
    }
    for i in 1..=BOOT_RUNS {
        all.push(boot_scenario(
            &format!("boot-minimal-{i}"),
            Kernel::MinimalElf,
        ));
        all.push(boot_scenario(
            &format!("boot-debian-{i}"),
            Kernel::DebianBzImage,
        ));
    }
    all.push(memory_scenario());
    all.push(block_scenario(0));
    all.push(block_scenario(BLOCK_MIB));
    for vhost in ["off", "on"] {
        all.push(net_scenario(vhost, 0));
        all.push(net_scenario(vhost, NET_MIB));
    }
    all
}

/// The `key=value` pairs of the console line starting with `BENCH <tag> ` (anywhere in it).
fn bench_values(outcome: &Outcome, tag: &str) -> Option<BTreeMap<String, f64>> {
    let marker = format!("BENCH {tag} ");
    let line = outcome
        .console
        .lines()
        .find_map(|l| l.find(&marker).map(|at| &l[at + marker.len()..]))?;
    Some(
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect(),
    )
}

/// "pvm: boot-timer: guest signal 1 at 123.456 ms after pvm started, ..." -> 123.456
fn boot_ms(outcome: &Outcome) -> Option<f64> {
    let line = outcome
        .console
        .lines()
        .find(|l| l.contains("boot-timer: guest signal 1 at "))?;
    let rest = &line[line.find("signal 1 at ")? + "signal 1 at ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// Total userspace exits from `--stats`.
fn exits(outcome: &Outcome) -> Option<u64> {
    let line = outcome
        .console
        .lines()
        .find_map(|l| l.find("pvm: exits: ").map(|at| &l[at + 12..]))?;
    Some(
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('=')?.1.parse::<u64>().ok())
            .sum(),
    )
}

/// CPU ms of pvm's own threads (everything but the vCPUs) from `--stats`.
fn vmm_cpu_ms(outcome: &Outcome) -> Option<u64> {
    let line = outcome
        .console
        .lines()
        .find_map(|l| l.find("cpu ms by thread: ").map(|at| &l[at + 18..]))?;
    Some(
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter(|(name, _)| !name.starts_with("vcpu") && !name.starts_with("kvm-"))
            .filter_map(|(_, ms)| ms.parse::<u64>().ok())
            .sum(),
    )
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn mib_per_s(mib: u32, centiseconds: f64) -> String {
    if centiseconds <= 0.0 {
        return "n/a".to_string();
    }
    format!("{:.1} MiB/s", f64::from(mib) / (centiseconds / 100.0))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // PVM_BENCH_ONLY=PREFIX runs only the scenarios whose names start with it (e.g. cmp).
    let only = std::env::var("PVM_BENCH_ONLY").unwrap_or_default();
    let chosen: Vec<Scenario> = scenarios()
        .into_iter()
        .filter(|s| s.name.starts_with(&only))
        .collect();
    let outcomes = run_batch(&chosen);
    let ok = |name: &str| {
        let outcome = outcomes.get(name)?;
        if outcome.rc != 0 {
            println!("{name}: failed (rc {}), figures left out", outcome.rc);
            outcome.dump();
            return None;
        }
        Some(outcome)
    };
    println!("\n| figure | pvm | how |\n| --- | --- | --- |");
    for (kernel, label) in [
        ("minimal", "minimal 6.1 ELF"),
        ("debian", "Debian 6.1 bzImage"),
    ] {
        let times: Vec<f64> = (1..=BOOT_RUNS)
            .filter_map(|i| ok(&format!("boot-{kernel}-{i}")).and_then(boot_ms))
            .collect();
        if let Some(ms) = median(times.clone()) {
            println!(
                "| boot to /init, {label}, 1 vCPU, 256 MiB | {ms:.0} ms (median of {}) | --boot-timer, port 0x3f0 written by /init |",
                times.len()
            );
        }
    }
    for (name, label) in [
        ("cmp-minimal", "minimal 6.1 ELF"),
        ("cmp-debian", "Debian 6.1 bzImage"),
    ] {
        let Some(outcome) = outcomes.get(name) else {
            continue;
        };
        let mut walls: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for line in outcome.console.lines() {
            let Some(at) = line.find("BENCH wall ") else {
                continue;
            };
            let fields: BTreeMap<&str, &str> = line[at + 11..]
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .collect();
            if fields.get("rc") == Some(&"0") {
                if let (Some(vmm), Some(cs)) = (fields.get("vmm"), fields.get("cs")) {
                    walls
                        .entry(vmm.to_string())
                        .or_default()
                        .push(cs.parse::<f64>().unwrap_or(0.0) * 10.0);
                }
            }
        }
        let Some(pvm) = walls.get("pvm").cloned().and_then(median) else {
            println!("{name}: no pvm runs");
            outcome.dump();
            continue;
        };
        for (vmm, times) in &walls {
            let runs = times.len();
            if let Some(ms) = median(times.clone()) {
                println!(
                    "| launch to exit, /init powers off at once, {label}: {vmm} | {ms:.0} ms (median of {runs}); pvm/{vmm} = {:.2} | same guest, 1 vCPU, 256 MiB, same emulated host, alternating runs |",
                    pvm / ms
                );
            }
        }
    }
    if let Some(mem) = ok("mem-debian").and_then(|o| bench_values(o, "mem")) {
        let (total, guest) = (mem["total_kib"], mem["guest_kib"]);
        println!(
            "| VMM memory overhead, Debian guest at /init | {:.2} MiB (RSS {:.1} MiB - guest memory touched {:.1} MiB); private dirty outside guest memory {:.2} MiB | /proc/PID/smaps |",
            (total - guest) / 1024.0,
            total / 1024.0,
            guest / 1024.0,
            mem["vmm_private_dirty_kib"] / 1024.0
        );
    }
    let blk_name = format!("blk-{BLOCK_MIB}");
    if let Some(outcome) = ok(&blk_name) {
        if let Some(blk) = bench_values(outcome, "blk") {
            println!(
                "| block, dd 1 MiB O_DIRECT, {BLOCK_MIB} MiB | write {}, read {} | minimal guest, virtio-pci, in-process worker |",
                mib_per_s(BLOCK_MIB, blk["write_cs"]),
                mib_per_s(BLOCK_MIB, blk["read_cs"])
            );
        }
        let requests = 2.0 * f64::from(BLOCK_MIB);
        if let Some(base) = ok("blk-0") {
            print_costs(
                "block",
                outcome,
                base,
                requests,
                "requests",
                2.0 * f64::from(BLOCK_MIB),
            );
        }
    }
    for (vhost, label) in [("off", "in-process"), ("on", "vhost-net")] {
        let Some(outcome) = ok(&format!("net-{vhost}-{NET_MIB}")) else {
            continue;
        };
        if let Some(net) = bench_values(outcome, "net") {
            println!(
                "| TCP through tap, {label} | guest->host {}, host->guest {} | nc, {NET_MIB} MiB each way |",
                mib_per_s(NET_MIB, net["tx_cs"]),
                mib_per_s(NET_MIB, net["rx_cs"])
            );
        }
        let Some(base) = ok(&format!("net-{vhost}-0")) else {
            continue;
        };
        let packets = |o: &Outcome| bench_values(o, "tap").and_then(|t| t.get("packets").copied());
        if let (Some(moved), Some(idle)) = (packets(outcome), packets(base)) {
            print_costs(
                label,
                outcome,
                base,
                moved - idle,
                "packets",
                2.0 * f64::from(NET_MIB),
            );
        }
    }
}

/// Exits per 1000 `unit`s and VMM CPU (pvm's own threads) per GiB: the run minus its baseline
/// (the same boot without the transfer).
fn print_costs(label: &str, run: &Outcome, base: &Outcome, units: f64, unit: &str, mib: f64) {
    let (Some(exits_run), Some(exits_base)) = (exits(run), exits(base)) else {
        return;
    };
    let (Some(cpu_run), Some(cpu_base)) = (vmm_cpu_ms(run), vmm_cpu_ms(base)) else {
        return;
    };
    let exits = exits_run as f64 - exits_base as f64;
    let cpu = cpu_run as f64 - cpu_base as f64;
    println!(
        "| {label}: userspace exits per 1000 {unit}; VMM CPU per GiB | {:.2} ({exits:.0} exits over {units:.0} {unit}); {:.0} ms | --stats, minus a baseline boot without the transfer |",
        exits * 1000.0 / units.max(1.0),
        cpu / (mib / 1024.0)
    );
}

//! The Debian boot comparison (`PVM_BENCH_ONLY=cmp-debian-boot`, never part of another run):
//! the Debian image's own cloud kernel (the ELF vmlinux extracted from its vmlinuz, which every
//! VMM here can enter by PVH) and initramfs, booting the image's systemd with its root on a
//! virtio disk and a virtio-net on a tap, 1 vCPU, 512 MiB, under pvm (pci and mmio),
//! Firecracker, and QEMU microvm and q35. One boot gives three milestones, each a console line
//! the image prints only when asked on the command line (scripts/debian-image): its initramfs
//! starting (`init-top`), the initramfs handing over to systemd (`init-bottom`), and
//! network-online.target reached with the link configured (`network-online`). The host times
//! them from the VMM's launch by polling its output; the guest's own uptime at each is in the
//! line too. The guest then reboots, which ends every VMM, so the next boot of the same disk
//! finds a cleanly unmounted file system.
//!
//! Round 0 boots each VMM once with `pvm.diag` (systemd-analyze time, critical-chain and blame
//! after the last milestone) and, for pvm, `--boot-timer --stats --log-level debug`; a pvm
//! warm-up boot before it takes the image's first-boot work. `PVM_BENCH_DEBIAN_ROUNDS` timed
//! rounds follow (default 5), alternating the VMMs; `PVM_BENCH_DEBIAN_DIAG=off` leaves round 0
//! out, `PVM_BENCH_ONLY=cmp-debian-boot-0` runs only it (with the warm-up), and
//! `PVM_BENCH_DEBIAN_VMMS=q35,...` only those VMMs' boots.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::{self, Outcome, Scenario};
use crate::{NOW_CS, QEMU, firecracker, median, with_qemu};

/// The prefix of these scenarios' names, and the PVM_BENCH_ONLY that runs them.
pub const PREFIX: &str = "cmp-debian-boot";
const DEFAULT_ROUNDS: u32 = 5;
const MEM_MIB: u32 = 512;
const VMMS: [&str; 5] = ["pvm", "pvm-mmio", "firecracker", "microvm", "q35"];
/// The milestones, in boot order, as the image's marker lines name them.
const MILESTONES: [&str; 3] = ["init-top", "init-bottom", "network-online"];

/// What pvm puts before the user's part of the command line (src/vm/mod.rs); the other VMMs
/// get it spelled out, so every guest sees the same line.
const VMM_ARGS: &str = "console=ttyS0 reboot=k i8042.noaux i8042.nomux i8042.dumbkbd";
/// The rest of the command line, the same for every VMM: the image's root, its markers, the
/// unit that marks network-online, and the three module-loading units tests/debian.rs masks
/// (they load modules nothing here uses and cost a third of the boot in the emulated host).
const GUEST_ARGS: &str = "root=LABEL=pvm-debian ro quiet pvm.marker pvm.reboot \
    systemd.wants=pvm-online-marker.service systemd.mask=modprobe@dm_mod.service \
    systemd.mask=modprobe@fuse.service systemd.mask=modprobe@loop.service";

fn rounds() -> u32 {
    std::env::var("PVM_BENCH_DEBIAN_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=9).contains(n))
        .unwrap_or(DEFAULT_ROUNDS)
}

/// Only when PVM_BENCH_ONLY asks for them: 20-odd boots of a full Debian are too long for any
/// other run.
fn wanted() -> bool {
    std::env::var("PVM_BENCH_ONLY").is_ok_and(|only| only.starts_with(PREFIX))
}

fn name(round: u32, vmm: &str) -> String {
    format!("{PREFIX}-{round}-{vmm}")
}

/// The VMM's command line. `{shared}/debian-image` holds the image's kernel and initramfs.
fn command(vmm: &str, args: &str) -> String {
    let kernel = "{shared}/debian-image/vmlinux";
    let initrd = "{shared}/debian-image/initrd.img";
    let qemu = QEMU.replace("-m 256", &format!("-m {MEM_MIB}"));
    let net = "-netdev tap,id=n0,ifname=tap0,script=no,downscript=no";
    match vmm {
        // pvm prepends VMM_ARGS itself.
        "pvm" | "pvm-mmio" => "{pvm}".to_string(),
        "firecracker" => firecracker::COMMAND.to_string(),
        "microvm" => format!(
            "{qemu} -M microvm -kernel {kernel} -initrd {initrd} -append '{VMM_ARGS} {args}' \\\n    \
             -drive file={{disk}},format=raw,if=none,id=d0 -device virtio-blk-device,drive=d0 \\\n    \
             {net} -device virtio-net-device,netdev=n0,mac=52:54:00:12:34:56 \\\n    \
             -device virtio-rng-device"
        ),
        _ => format!(
            "{qemu} -M q35 -kernel {kernel} -initrd {initrd} -append '{VMM_ARGS} {args}' \\\n    \
             -drive file={{disk}},format=raw,if=none,id=d0 -device virtio-blk-pci,drive=d0 \\\n    \
             {net} -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,romfile= \\\n    \
             -device virtio-rng-pci"
        ),
    }
}

/// The run script: launch, the time of each milestone's line (polled every 50 ms with shell
/// builtins, which take less of the host's one CPU than a grep per poll), then up to 120 s for
/// the guest's diagnostics when asked for and 60 s for its reboot to end the VMM.
fn script(vmm: &str, args: &str, diag: bool) -> String {
    let setup = if vmm == "firecracker" {
        firecracker::write_disk_config(&format!("{VMM_ARGS} {args}"), MEM_MIB)
    } else {
        String::new()
    };
    let command = command(vmm, args);
    let mut waits = String::new();
    for (i, milestone) in MILESTONES.iter().enumerate() {
        waits.push_str(&format!(
            "wait_line 'pvm-marker {milestone} ' 300; m{i}=$(($(since) * 10))\n"
        ));
    }
    let diag_wait = if diag {
        "wait_line 'pvm-marker diag-done' 240\n"
    } else {
        ""
    };
    let body = format!(
        "ip addr add 172.16.0.1/24 dev tap0\n\
         {setup}: > run.log\n\
         t0={NOW_CS}\n\
         since() {{ echo $(({NOW_CS} - t0)); }}\n\
         {command} > run.log 2>&1 &\n\
         pid=$!\n\
         seen() {{ while IFS= read -r l; do case $l in *\"$1\"*) return 0 ;; esac; done < run.log; return 1; }}\n\
         # Waits up to $2 s for a console line holding $1, while the VMM runs.\n\
         wait_line() {{ i=0; while ! seen \"$1\" && kill -0 $pid 2>/dev/null && [ $i -lt $(($2 * 20)) ]; do usleep 50000; i=$((i + 1)); done; }}\n\
         {waits}{diag_wait}\
         for i in $(seq 1 600); do kill -0 $pid 2>/dev/null || break; usleep 100000; done\n\
         ended=self; kill -0 $pid 2>/dev/null && {{ ended=stopped; kill $pid; }}\n\
         wait $pid; rc=$?\n\
         m3=$(($(since) * 10))\n\
         {print}\n\
         echo \"BENCH debian vmm={vmm} top_ms=$m0 bottom_ms=$m1 online_ms=$m2 exit_ms=$m3 rc=$rc\"\n\
         echo \"ended=$ended\"\n\
         grep -q 'pvm-marker network-online ' run.log\n",
        print = if diag {
            "cat run.log"
        } else {
            "grep -q 'pvm-marker network-online ' run.log && grep -E 'pvm-marker |FAILED|DEPEND| TIME ' run.log || tail -n 40 run.log"
        },
    );
    // A milestone never seen leaves its time as the moment the wait gave up; the table
    // leaves such runs out by their missing marker line.
    common::in_network_namespace(&body)
}

fn scenario(round: u32, vmm: &str, assets: &Path) -> Result<Scenario, String> {
    let diag = round == 0;
    let args = if diag {
        format!("{GUEST_ARGS} pvm.diag")
    } else {
        GUEST_ARGS.to_string()
    };
    let files = assets.join("debian-image");
    let mut s = Scenario::new(&name(round, vmm))
        .script(&script(vmm, &args, diag))
        .disk_image(&assets.join("debian.img"))
        .shared_file("debian-image/vmlinux", &files.join("vmlinux"))
        .shared_file("debian-image/initrd.img", &files.join("initrd.img"))
        .timeout(if diag { 720 } else { 480 });
    match vmm {
        "pvm" | "pvm-mmio" => {
            s = s.args([
                "--kernel",
                "{shared}/debian-image/vmlinux",
                "--initrd",
                "{shared}/debian-image/initrd.img",
                "--disk",
                "{disk}",
                "--tap",
                "tap0,mac=52:54:00:12:34:56",
                "--cpus",
                "1",
                "--mem",
                &format!("{MEM_MIB}M"),
                "--cmdline",
                &args,
            ]);
            if vmm == "pvm-mmio" {
                s = s.args(["--transport", "mmio"]);
            }
            if diag {
                s = s.args(["--boot-timer", "--stats", "--log-level", "debug"]);
            }
            Ok(s)
        }
        "firecracker" => firecracker::with_binary(s),
        _ => with_qemu(s),
    }
}

/// The warm-up: pvm boots the image once, untimed, so the image's first boot (machine id and
/// the like) falls on no VMM's figures.
fn warmup(assets: &Path) -> Result<Scenario, String> {
    let s = scenario(1, "pvm", assets)?;
    Ok(Scenario {
        // Sorts before round 0's scenarios, and runs with them under PVM_BENCH_ONLY=...-0.
        name: format!("{PREFIX}-0-0warmup"),
        ..s
    })
}

pub fn scenarios() -> Vec<Scenario> {
    if !wanted() {
        return Vec::new();
    }
    let assets = common::assets();
    let mut all = Vec::new();
    let mut add = |made: Result<Scenario, String>, what: &str| match made {
        Ok(s) => all.push(s),
        Err(e) => println!("{PREFIX}: {what} left out: {e}"),
    };
    add(warmup(&assets), "the warm-up");
    // PVM_BENCH_DEBIAN_DIAG=off leaves the diagnostic round out (a timing-only run).
    let first = match std::env::var("PVM_BENCH_DEBIAN_DIAG").as_deref() {
        Ok("off") => 1,
        _ => 0,
    };
    // PVM_BENCH_DEBIAN_VMMS=a,b runs only those VMMs' boots (and the warm-up), e.g. to redo
    // one VMM's rounds; PVM_BENCH_RESULTS can then print them with another batch's results.
    let only: Option<Vec<String>> = std::env::var("PVM_BENCH_DEBIAN_VMMS")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    if let Some(unknown) = only.iter().flatten().find(|v| !VMMS.contains(&v.as_str())) {
        println!("{PREFIX}: PVM_BENCH_DEBIAN_VMMS: no VMM '{unknown}' (one of {VMMS:?})");
        return Vec::new();
    }
    for round in first..=rounds() {
        for vmm in VMMS {
            if only.as_ref().is_none_or(|o| o.iter().any(|v| v == vmm)) {
                add(scenario(round, vmm, &assets), vmm);
            }
        }
    }
    all
}

/// "min-max" of `v`, in seconds.
fn spread(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(0.0, f64::max);
    format!("{:.1}-{:.1}", min / 1000.0, max / 1000.0)
}

/// The guest's uptime at `milestone`'s marker line, in ms.
fn guest_ms(outcome: &Outcome, milestone: &str) -> Option<f64> {
    let marker = format!("pvm-marker {milestone} ");
    let line = outcome.console.lines().find(|l| l.contains(&marker))?;
    let rest = &line[line.find(&marker)? + marker.len()..];
    rest.split_whitespace()
        .next()?
        .parse::<f64>()
        .ok()
        .map(|s| s * 1000.0)
}

/// Whether systemd reported a unit it failed or gave up waiting for (its coloured status
/// lines, which `quiet` leaves on the console): a network-online reached with networkd failed
/// is no network-online.
fn degraded(outcome: &Outcome) -> bool {
    ["FAILED", "DEPEND", " TIME "]
        .iter()
        .any(|word| outcome.console.contains(word))
}

/// Prints the diagnostic boots' consoles, every boot's milestones, and the medians of the timed
/// rounds (round 0's boots carry the diagnostics' extra options, so they are listed, not
/// counted).
pub fn report(outcomes: &std::collections::HashMap<String, Outcome>) {
    if !wanted() {
        return;
    }
    for vmm in VMMS {
        if let Some(o) = outcomes.get(&name(0, vmm)).filter(|o| o.rc != -1) {
            println!("--- {} (rc {}) ---\n{}", name(0, vmm), o.rc, o.console);
        }
    }
    // Per VMM and milestone: host-side ms since launch, and the guest's uptime.
    let mut host: BTreeMap<(&str, usize), Vec<f64>> = BTreeMap::new();
    let mut guest: BTreeMap<(&str, usize), Vec<f64>> = BTreeMap::new();
    let mut failed: BTreeMap<&str, u32> = BTreeMap::new();
    println!(
        "\n| round | VMM | initramfs starts | hands over to systemd | network-online | guest uptime then | units failed |\n\
         | --- | --- | --- | --- | --- | --- | --- |"
    );
    for round in 0..=rounds() {
        for vmm in VMMS {
            // rc -1: a batch read back before it ended (PVM_BENCH_RESULTS) has no result yet.
            let Some(o) = outcomes.get(&name(round, vmm)).filter(|o| o.rc != -1) else {
                continue;
            };
            let values = crate::bench_values(o, "debian");
            let Some(values) = values.filter(|_| o.rc == 0) else {
                *failed.entry(vmm).or_default() += 1;
                println!(
                    "{}: no network-online marker (rc {}), left out",
                    name(round, vmm),
                    o.rc
                );
                o.dump();
                continue;
            };
            let mut cells = Vec::new();
            for (i, (key, milestone)) in ["top_ms", "bottom_ms", "online_ms"]
                .iter()
                .zip(MILESTONES)
                .enumerate()
            {
                let ms = values.get(*key).copied();
                cells.push(ms.map_or("n/a".to_string(), |ms| format!("{:.1} s", ms / 1000.0)));
                if round == 0 {
                    continue;
                }
                if let Some(ms) = ms {
                    host.entry((vmm, i)).or_default().push(ms);
                }
                if let Some(ms) = guest_ms(o, milestone) {
                    guest.entry((vmm, i)).or_default().push(ms);
                }
            }
            let uptime = guest_ms(o, "network-online")
                .map_or("n/a".to_string(), |ms| format!("{:.1} s", ms / 1000.0));
            let bad = if degraded(o) { "yes" } else { "no" };
            println!(
                "| {round} | {vmm} | {} | {uptime} | {bad} |",
                cells.join(" | ")
            );
        }
    }
    println!(
        "\n| VMM | initramfs starts | hands over to systemd | network-online | guest uptime at network-online | runs |\n\
         | --- | --- | --- | --- | --- | --- |"
    );
    let med = |map: &BTreeMap<(&str, usize), Vec<f64>>, vmm: &str, i: usize| {
        map.get(&(vmm, i)).cloned().and_then(median)
    };
    for vmm in VMMS {
        let mut cells = Vec::new();
        for i in 0..MILESTONES.len() {
            cells.push(match (med(&host, vmm, i), host.get(&(vmm, i))) {
                (Some(ms), Some(v)) => format!("{:.1} s ({})", ms / 1000.0, spread(v)),
                _ => "n/a".to_string(),
            });
        }
        let uptime =
            med(&guest, vmm, 2).map_or("n/a".to_string(), |ms| format!("{:.1} s", ms / 1000.0));
        let runs = host.get(&(vmm, 2)).map_or(0, Vec::len);
        let lost = failed
            .get(vmm)
            .map(|n| format!(", {n} failed"))
            .unwrap_or_default();
        println!(
            "| {vmm} | {} | {uptime} | {runs}{lost} |",
            cells.join(" | ")
        );
    }
    println!(
        "\nmedians of the timed rounds from the VMM's launch (min-max); ratios of the medians:"
    );
    for (i, milestone) in MILESTONES.iter().enumerate() {
        let mut line = format!("{milestone}:");
        for pvm in ["pvm", "pvm-mmio"] {
            for other in ["firecracker", "microvm", "q35"] {
                if let (Some(a), Some(b)) = (med(&host, pvm, i), med(&host, other, i)) {
                    line.push_str(&format!(" {pvm}/{other} {:.2}", a / b));
                }
            }
        }
        println!("{line}");
    }
}

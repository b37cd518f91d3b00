//! Guest-level figures, measured in one run of the KVM host the tests use (the emulated host on
//! machines whose /dev/kvm cannot boot Linux): boot time to /init (--boot-timer), the VMM's
//! memory overhead with a booted guest, block throughput (dd in the guest), TCP throughput
//! through a tap with pvm's in-process data plane and with vhost-net, userspace exits per 1000
//! requests / packets, and the VMM's CPU time per GiB moved (its own threads, not the vCPUs);
//! snapshot creation and restore against Firecracker (benches/guest/snapshot.rs).
//!
//! `cargo bench --bench guest` prints a table. It measures; it asserts nothing beyond the
//! scenarios having run (a scenario that fails is reported and its figures left out). Absolute
//! numbers under nested emulation (QEMU TCG) are far below bare metal; compare within a run.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;
#[path = "guest/debian_cmp.rs"]
mod debian_cmp;
#[path = "guest/firecracker.rs"]
mod firecracker;
#[path = "guest/io.rs"]
mod io;
#[path = "guest/net_mq.rs"]
mod net_mq;
#[path = "guest/snapshot.rs"]
mod snapshot;

use std::collections::BTreeMap;

use common::{Kernel, Outcome, Scenario, run_batch};

const BOOT_RUNS: u32 = 5;
/// Block transfer: MiB written then read back with O_DIRECT, 1 MiB per request.
const BLOCK_MIB: u32 = 256;
/// TCP transfer per direction, MiB.
const NET_MIB: u32 = 16;

/// NET_MIB unless PVM_BENCH_NET_MIB says otherwise (a quick run while tuning).
fn net_mib() -> u32 {
    std::env::var("PVM_BENCH_NET_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(NET_MIB)
}

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
         # Where the VMM's own memory is: mappings outside guest RAM with 128 KiB or more dirty.\n\
         awk '/^[0-9a-f]+-[0-9a-f]+ /{map = $0; anon = NF < 6}\n\
              /^Size:/{size = $2}\n\
              /^Private_Dirty:/{if (!(anon && size >= 65536) && $2 >= 128) print \"mem-map\", $2, \"KiB dirty:\", map}' /proc/$pid/smaps\n\
         grep -h THP /proc/$pid/status; cat /sys/kernel/mm/transparent_hugepage/enabled\n\
         wait\n\
         cat out.log\n\
         exit $(cat rc.txt)";
    Scenario::boot("mem-debian", Kernel::DebianBzImage, 1, &init)
        .args(["--boot-timer"])
        .script(script)
        .timeout(120)
}

/// `mib` MiB written then read back with dd (1 MiB O_DIRECT requests); 0 is the baseline that
/// only boots, so the difference is what the transfer cost. Under `vmm`: "pvm" (in-process
/// worker, `blk-MIB`) or "qemu" (q35 with virtio-blk-pci on the same kind of image, QEMU's
/// default writeback cache like pvm's buffered I/O, `blk-qemu-MIB`) or "io_uring" (pvm with
/// `--disk ...,engine=io_uring`, `blk-uring-MIB`). No O_DIRECT variant: the image lies on the
/// emulated host's tmpfs, which takes O_DIRECT only from Linux 6.6 on.
fn block_scenario(vmm: &str, mib: u32) -> Result<Scenario, String> {
    let init = format!(
        "echo blk-ready\n\
         sleep 3\n\
         t0={NOW_CS}\n\
         [ {mib} -gt 0 ] && dd if=/dev/zero of=/dev/vda bs=1M count={mib} oflag=direct 2>/dev/null\n\
         t1={NOW_CS}\n\
         [ {mib} -gt 0 ] && dd if=/dev/vda of=/dev/null bs=1M count={mib} iflag=direct 2>/dev/null\n\
         t2={NOW_CS}\n\
         echo \"BENCH blk write_cs=$((t1 - t0)) read_cs=$((t2 - t1))\"\n\
         sleep 3\n"
    );
    let command = match vmm {
        "qemu" => format!(
            "{QEMU} -M q35 -kernel {{kernel}} -initrd initrd.cpio -append 'console=ttyS0 quiet' \\\n    \
             -drive file=disk.img,format=raw,if=none,id=d0 -device virtio-blk-pci,drive=d0"
        ),
        _ => "{pvm}".to_string(),
    };
    // The image is made by the script (on the host's tmpfs), not carried in the batch. The
    // VMM's CPU is sampled around the transfers, as for TCP.
    let script = format!(
        "{CPU_MS}\
         dd if=/dev/zero of=disk.img bs=1M count=0 seek={BLOCK_MIB} 2>/dev/null\n\
         {command} > out.log 2>&1 &\n\
         vmmpid=$!\n\
         for i in $(seq 1 300); do grep -q blk-ready out.log && break; sleep 1; done\n\
         before=$(cpu_ms $vmmpid)\n\
         for i in $(seq 1 600); do grep -q 'BENCH blk' out.log && break; sleep 1; done\n\
         after=$(cpu_ms $vmmpid)\n\
         wait $vmmpid\n\
         rc=$?\n\
         cat out.log\n\
         echo \"BENCH cpu0 $before\"\n\
         echo \"BENCH cpu1 $after\"\n\
         exit $rc"
    );
    match vmm {
        "qemu" => with_qemu(
            Scenario::boot(&format!("blk-qemu-{mib}"), Kernel::MinimalElf, 1, &init)
                .script(&script)
                .timeout(600),
        ),
        "io_uring" => Ok(
            Scenario::boot(&format!("blk-uring-{mib}"), Kernel::MinimalElf, 1, &init)
                .args(["--disk", "disk.img,engine=io_uring", "--stats"])
                .script(&script)
                .timeout(600),
        ),
        _ => Ok(
            Scenario::boot(&format!("blk-{mib}"), Kernel::MinimalElf, 1, &init)
                .args(["--disk", "disk.img", "--stats"])
                .script(&script)
                .timeout(600),
        ),
    }
}

/// The data planes the TCP benchmark compares: pvm's in-process worker, pvm with vhost-net,
/// pvm with vhost-user and pvm-vhost-user-net, and QEMU q35 with virtio-net-pci on vhost-net.
const NET_PLANES: [(&str, &str); 4] = [
    ("off", "pvm, in-process"),
    ("on", "pvm, vhost-net"),
    ("vu", "pvm, vhost-user (pvm-vhost-user-net)"),
    ("qemu", "QEMU q35, vhost=on"),
];

/// Shell function for the host side: `cpu_ms PID [BACKEND]` prints the CPU time (user +
/// system, ms) of the VMM's threads other than its vCPUs (pvm's `vcpuN`, QEMU's `CPU N/KVM`,
/// Firecracker's `fc_vcpu N`), and of the data plane outside it: the vhost kernel workers
/// serving it (`vhost-PID`) and the vhost-user backend process BACKEND.
const CPU_MS: &str = r#"cpu_ms() {
    vmm=0
    threads=""
    for t in /proc/$1/task/*; do
        case "$(cat $t/comm)" in vcpu*|"CPU "*|"fc_vcpu "*) continue ;; esac
        ticks=$(sed 's/.*) //' $t/stat 2>/dev/null | awk '{print $12 + $13}')
        # A thread that ended since the glob: its time is gone from the sum (it would
        # otherwise end the whole function on an empty operand).
        [ -n "$ticks" ] || continue
        vmm=$((vmm + ticks))
        threads="$threads $(tr ' ' _ < $t/comm):$((ticks * 10))"
    done
    vhost=0
    for t in ${2:+/proc/$2/task/*}; do
        vhost=$((vhost + $(sed 's/.*) //' $t/stat | awk '{print $12 + $13}')))
    done
    # A vhost worker is named after the thread that made it owner (pvm: a vCPU thread, whose
    # write of DRIVER_OK activates the device).
    workers=""
    for t in /proc/$1/task/*; do workers="$workers vhost-${t##*/} "; done
    for p in /proc/[0-9]*; do
        case "$workers" in *" $(cat $p/comm 2>/dev/null) "*) ;; *) continue ;; esac
        vhost=$((vhost + $(sed 's/.*) //' $p/stat 2>/dev/null | awk '{print $12 + $13}') + 0))
    done
    echo "vmm_ms=$((vmm * 10)) vhost_ms=$((vhost * 10)) threads_ms=$threads"
}
"#;

/// TCP both ways between the guest and the host side of tap0, in a network namespace: `mib`
/// MiB each way (0: the baseline, which only pings) under `plane` (see [`NET_PLANES`]).
/// Receivers run `cat > /dev/null` through `nc -e`, since a backgrounded nc reads EOF from stdin
/// and would close at once. The host samples the VMM's CPU (and its vhost workers') when the
/// guest is ready and again when both transfers are done, so the figure covers the transfers
/// only.
fn net_scenario(plane: &str, mib: u32) -> Result<Scenario, String> {
    let count = mib * 16; // 64 KiB blocks
    let init = format!(
        "ip link set eth0 up\n\
         ip addr add 10.0.2.2/24 dev eth0\n\
         ping -c 1 -W 5 10.0.2.1 >/dev/null\n\
         for d in /sys/bus/virtio/devices/*; do [ \"$(cat $d/device)\" = 0x0001 ] && echo \"netfeatures $(cat $d/features)\"; done\n\
         printf '#!/bin/sh\\nexec cat > /dev/null\\n' > /tmp/sink; chmod +x /tmp/sink\n\
         echo net-ready\n\
         sleep 3\n\
         t0={NOW_CS}\n\
         [ {mib} -gt 0 ] && dd if=/dev/zero bs=65536 count={count} 2>/dev/null | nc -w 5 10.0.2.1 5000\n\
         t1={NOW_CS}\n\
         [ {mib} -gt 0 ] && nc -l -p 5001 -e /tmp/sink &\n\
         echo rx-ready\n\
         wait\n\
         t2={NOW_CS}\n\
         echo \"BENCH net tx_cs=$((t1 - t0)) rx_cs=$((t2 - t1))\"\n\
         sleep 3\n"
    );
    // The vhost-user backend starts first and serves the tap; pvm connects to its socket.
    let backend = match plane {
        "vu" => "pvm-vhost-user-net --socket net.sock --tap tap0 --mac 52:54:00:12:34:56 2> backend.log &\n\
                 backend=$!\n\
                 for i in $(seq 1 30); do [ -S net.sock ] && break; sleep 1; done\n"
            .to_string(),
        _ => "backend=\n".to_string(),
    };
    let vmm = match plane {
        "qemu" => format!(
            "{QEMU} -M q35 -kernel {{kernel}} -initrd initrd.cpio -append 'console=ttyS0 quiet' \\\n    \
             -netdev tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=on \\\n    \
             -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,romfile="
        ),
        _ => "{pvm}".to_string(),
    };
    let script = format!(
        "cat > in-netns.sh <<'NETNS'\n\
         {CPU_MS}\
         wait_for() {{\n\
             for i in $(seq 1 300); do\n\
                 grep -q \"$1\" out.log && return\n\
                 kill -0 $vmmpid 2>/dev/null || {{ cat out.log; echo \"VMM exited before $1\"; exit 1; }}\n\
                 sleep 1\n\
             done\n\
         }}\n\
         ip link set lo up\n\
         tunctl -t tap0 >/dev/null\n\
         ip link set tap0 up\n\
         ip addr add 10.0.2.1/24 dev tap0\n\
         printf '#!/bin/sh\\nexec cat > /dev/null\\n' > sink; chmod +x sink\n\
         nc -l -p 5000 -e ./sink &\n\
         listener=$!\n\
         {backend}\
         {vmm} > out.log 2>&1 &\n\
         vmmpid=$!\n\
         wait_for net-ready\n\
         before=$(cpu_ms $vmmpid $backend)\n\
         wait_for rx-ready\n\
         # The guest says rx-ready as its listener starts; retry until it listens.\n\
         r0={NOW_CS}\n\
         for i in $(seq 1 30); do\n\
             r0={NOW_CS}\n\
             [ {mib} -gt 0 ] || break\n\
             dd if=/dev/zero bs=65536 count={count} 2>/dev/null | nc -w 5 10.0.2.2 5001 2>/dev/null && break\n\
             sleep 1\n\
         done\n\
         r1={NOW_CS}\n\
         wait_for 'BENCH net'\n\
         after=$(cpu_ms $vmmpid $backend)\n\
         wait $vmmpid\n\
         rc=$?\n\
         cat out.log\n\
         [ -n \"$backend\" ] && {{ sleep 1; kill $backend 2>/dev/null; cat backend.log; }}\n\
         echo \"BENCH hostrx rx_cs=$((r1 - r0))\"\n\
         echo \"BENCH cpu0 $before\"\n\
         echo \"BENCH cpu1 $after\"\n\
         echo \"BENCH tap packets=$(sed 's/:/ /' /proc/net/dev | awk '$1 == \"tap0\" {{print $3 + $11}}')\"\n\
         kill $listener 2>/dev/null\n\
         exit $rc\n\
         NETNS\n\
         unshare -n sh ./in-netns.sh"
    );
    let scenario = Scenario::boot(&format!("net-{plane}-{mib}"), Kernel::MinimalElf, 1, &init)
        .script(&script)
        .timeout(600);
    match plane {
        "qemu" => with_qemu(scenario),
        "vu" => Ok(scenario
            .args(["--net", "vhost-user=net.sock", "--stats"])
            .program("pvm-vhost-user-net")),
        vhost => Ok(scenario.args([
            "--tap",
            &format!("tap0,mac=52:54:00:12:34:56,vhost={vhost}"),
            "--stats",
        ])),
    }
}

/// QEMU (this machine's qemu-system-x86_64, its shared libraries and firmware) as shared batch
/// files under `{shared}/qemu`, run inside the KVM host through its own dynamic loader.
fn with_qemu(mut scenario: Scenario) -> Result<Scenario, String> {
    use std::path::Path;
    let binary = Path::new("/usr/bin/qemu-system-x86_64");
    if !binary.exists() {
        return Err(format!("{} is not installed", binary.display()));
    }
    scenario = scenario.shared_file("qemu/qemu-system-x86_64", binary);
    let ldd = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| format!("ldd: {e}"))?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let Some(path) = line.split_whitespace().find(|w| w.starts_with('/')) else {
            continue;
        };
        let path = Path::new(path);
        let name = path.file_name().unwrap().to_string_lossy();
        scenario = scenario.shared_file(&format!("qemu/lib/{name}"), path);
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
                scenario = scenario.shared_file(&format!("qemu/share/{name}"), &path);
            }
        }
    }
    Ok(scenario)
}

/// QEMU's command line up to the machine-specific options.
/// `debug-threads=on` names QEMU's threads (`CPU 0/KVM`), so its vCPUs can be told apart.
const QEMU: &str = "{shared}/qemu/lib/ld-linux-x86-64.so.2 --library-path {shared}/qemu/lib \
    {shared}/qemu/qemu-system-x86_64 -L {shared}/qemu/share -enable-kvm -cpu host -m 256 -smp 1 \
    -nodefaults -no-user-config -nographic -serial stdio -no-reboot -name bench,debug-threads=on";

/// The VMMs the boot comparison runs: pvm, Firecracker and QEMU's microvm (minimal kernel:
/// neither loads a bzImage here; Firecracker takes an ELF vmlinux, microvm has no firmware path
/// for a bzImage) and q35.
fn comparison_vmms(kernel: Kernel) -> &'static [&'static str] {
    match kernel {
        Kernel::MinimalElf => &[
            "pvm",
            "pvm-mmio",
            "pvm-noapi",
            "firecracker",
            "microvm",
            "q35",
        ],
        _ => &["pvm", "q35"],
    }
}

/// The virtio-rng QEMU's `machine` gets in the boot comparison: microvm has only virtio-mmio.
fn qemu_rng_device(machine: &str) -> &'static str {
    if machine == "microvm" {
        "virtio-rng-device"
    } else {
        "virtio-rng-pci"
    }
}

/// One boot of the same guest (kernel, initramfs whose /init prints a marker, 1 vCPU, 256 MiB)
/// under `vmm`: the time from launch until the marker shows on the serial console, polled every
/// 10 ms, measured the same way for pvm and QEMU; then the VMM gets 10 s to exit by the guest's
/// power-off (QEMU microvm cannot power this guest off) before it is stopped. One scenario per
/// boot, so that a freeze of the emulated host costs one boot rather than the comparison.
fn comparison_scenario(kernel: Kernel, run: u32, vmm: &str) -> Result<Scenario, String> {
    let label = match kernel {
        Kernel::MinimalElf => "minimal",
        _ => "debian",
    };
    // Firecracker reads its configuration from a file, written before the clock starts.
    let mut setup = String::new();
    let command = match vmm {
        "pvm" | "pvm-mmio" | "pvm-noapi" => "{pvm}".to_string(),
        "firecracker" => {
            setup = firecracker::write_config("");
            firecracker::COMMAND.to_string()
        }
        // A virtio-rng on the machine's own transport, as pvm and Firecracker have one.
        machine => format!(
            "{QEMU} -M {machine} -kernel {{kernel}} -initrd initrd.cpio \\
    -append 'console=ttyS0 quiet' -device {}",
            qemu_rng_device(machine)
        ),
    };
    let script = format!(
        "{setup}t0={NOW_CS}\n\
         {command} > run.log 2>&1 &\n\
         pid=$!\n\
         # Polled with shell builtins only: a grep per poll would take the CPU the guest needs.\n\
         seen() {{ while IFS= read -r l; do case $l in *guest-init-reached*) return 0 ;; esac; done < run.log; return 1; }}\n\
         while ! seen && kill -0 $pid 2>/dev/null; do usleep 10000; done\n\
         t1={NOW_CS}\n\
         init=no; grep -q guest-init-reached run.log && init=yes\n\
         for i in $(seq 1 100); do kill -0 $pid 2>/dev/null || break; usleep 100000; done\n\
         ended=self; kill -0 $pid 2>/dev/null && {{ ended=stopped; kill $pid; }}\n\
         wait $pid; rc=$?\n\
         t2={NOW_CS}\n\
         [ $init = yes ] || tail -n 20 run.log\n\
         echo \"BENCH wall vmm={vmm} init_cs=$((t1 - t0)) exit_cs=$((t2 - t0)) init=$init ended=$ended rc=$rc\"\n\
         [ $init = yes ]\n"
    );
    let scenario = Scenario::boot(
        &format!("cmp-{label}-{run}-{vmm}"),
        kernel,
        1,
        &format!("{SIGNAL_BOOT}echo guest-init-reached\n"),
    )
    .script(&script)
    .timeout(60);
    match vmm {
        "pvm" => Ok(scenario),
        // Like-for-like with microvm: virtio-mmio and no PCI bus for the kernel to probe.
        "pvm-mmio" => Ok(scenario.args(["--transport", "mmio"])),
        // Like Firecracker's run: no API socket, so no API thread and no socket-cleanup
        // helper started before the VM (what pvm's own mode does by default).
        "pvm-noapi" => Ok(scenario.args(["--no-api"])),
        "firecracker" => firecracker::with_binary(scenario),
        _ => with_qemu(scenario),
    }
}

/// With PVM_BENCH_BOOT_DIAG set: one boot each of pvm (pci and mmio) and Firecracker with
/// `initcall_debug`, whose /init prints the kernel log (timestamps of every initcall) after
/// the marker; pvm adds `--boot-timer --stats` (time before the first KVM_RUN, exits by port
/// and address). Their consoles are printed, to compare where each VMM's boot time goes.
fn diag_scenario(vmm: &str) -> Result<Scenario, String> {
    let kernel = Kernel::MinimalElf;
    let init = format!("{SIGNAL_BOOT}echo guest-init-reached\ndmesg\necho guest-diag-done\n");
    let cmdline = "quiet initcall_debug";
    let mut setup = String::new();
    let command = if vmm == "firecracker" {
        setup = firecracker::write_config(" initcall_debug");
        firecracker::COMMAND
    } else {
        "{pvm}"
    };
    let script = format!(
        "{setup}{command} > run.log 2>&1 &\n\
         pid=$!\n\
         for i in $(seq 1 300); do kill -0 $pid 2>/dev/null || break; grep -q guest-diag-done run.log && break; usleep 100000; done\n\
         usleep 500000; kill $pid 2>/dev/null; wait $pid\n\
         cat run.log\n"
    );
    let scenario = Scenario::new(&format!("cmp-minimal-diag-{vmm}"))
        .kernel(kernel)
        .file("initrd.cpio", common::guest_initramfs(&init, kernel))
        .args([
            "--kernel",
            "{kernel}",
            "--initrd",
            "initrd.cpio",
            "--cpus",
            "1",
        ])
        .args([
            "--mem",
            "256M",
            "--cmdline",
            cmdline,
            "--boot-timer",
            "--stats",
        ])
        .script(&script)
        .timeout(60);
    match vmm {
        "pvm-mmio" => Ok(scenario.args(["--transport", "mmio"])),
        "firecracker" => firecracker::with_binary(scenario),
        _ => Ok(scenario),
    }
}

fn scenarios() -> Vec<Scenario> {
    let mut all = Vec::new();
    'comparison: for kernel in [Kernel::MinimalElf, Kernel::DebianBzImage] {
        for run in 1..=BOOT_RUNS {
            for vmm in comparison_vmms(kernel) {
                match comparison_scenario(kernel, run, vmm) {
                    Ok(scenario) => all.push(scenario),
                    // Without Firecracker the comparison still runs, once said.
                    Err(e) if *vmm == "firecracker" => {
                        if run == 1 {
                            println!("Firecracker comparison left out: {e}");
                        }
                    }
                    Err(e) => {
                        println!("QEMU comparison left out: {e}");
                        break 'comparison;
                    }
                }
            }
        }
    }
    if std::env::var_os("PVM_BENCH_BOOT_DIAG").is_some() {
        for vmm in ["pvm", "pvm-mmio", "firecracker"] {
            match diag_scenario(vmm) {
                Ok(scenario) => all.push(scenario),
                Err(e) => println!("cmp-minimal-diag-{vmm}: left out: {e}"),
            }
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
    for (vmm, mib) in [
        ("pvm", 0),
        ("pvm", BLOCK_MIB),
        ("io_uring", BLOCK_MIB),
        ("qemu", BLOCK_MIB),
    ] {
        match block_scenario(vmm, mib) {
            Ok(scenario) => all.push(scenario),
            Err(e) => println!("blk-{vmm}-{mib}: left out: {e}"),
        }
    }
    for (plane, _) in NET_PLANES {
        for mib in [0, net_mib()] {
            match net_scenario(plane, mib) {
                Ok(scenario) => all.push(scenario),
                Err(e) => println!("net-{plane}: left out: {e}"),
            }
        }
    }
    all.extend(snapshot::scenarios());
    all.extend(io::scenarios());
    all.extend(net_mq::scenarios());
    all.extend(debian_cmp::scenarios());
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
    // PVM_BENCH_RESULTS=DIR prints the table of a batch that already ran (its results/ dir,
    // e.g. target/kvm-host/guest-PID/results) instead of running one; missing scenarios are
    // reported as failed.
    let outcomes = match std::env::var_os("PVM_BENCH_RESULTS") {
        Some(dir) => {
            let refs: Vec<&Scenario> = chosen.iter().collect();
            common::read_results(
                std::path::Path::new(&dir),
                &refs,
                Some("no result in PVM_BENCH_RESULTS"),
            )
            .unwrap_or_else(|e| panic!("{e}"))
        }
        None => {
            // The multiqueue group runs in a batch of its own, on a 2-vCPU emulated host (the
            // second batch reuses this process's batch directory: the first one's files go).
            let (mq, rest): (Vec<Scenario>, Vec<Scenario>) =
                chosen.into_iter().partition(|s| net_mq::is_mq(&s.name));
            let mut outcomes = if rest.is_empty() {
                Default::default()
            } else {
                run_batch(&rest)
            };
            if !mq.is_empty() {
                outcomes.extend(common::run_batch_on_cpus(&mq, net_mq::HOST_CPUS));
            }
            outcomes
        }
    };
    let ok = |name: &str| {
        let outcome = outcomes.get(name)?;
        if outcome.rc != 0 {
            println!("{name}: failed (rc {}), figures left out", outcome.rc);
            outcome.dump();
            return None;
        }
        Some(outcome)
    };
    debian_cmp::report(&outcomes);
    for vmm in ["pvm", "pvm-mmio", "firecracker"] {
        if let Some(outcome) = outcomes.get(&format!("cmp-minimal-diag-{vmm}")) {
            println!(
                "--- cmp-minimal-diag-{vmm} (rc {}) ---\n{}",
                outcome.rc, outcome.console
            );
        }
    }
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
    for (kernel, label, text) in [
        (Kernel::MinimalElf, "minimal", "minimal 6.1 ELF"),
        (Kernel::DebianBzImage, "debian", "Debian 6.1 bzImage"),
    ] {
        // Per VMM: launch to /init and launch to exit (only runs whose guest powered the VMM
        // off by itself), in ms.
        let mut to_init: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut to_exit: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut failed: BTreeMap<&str, u32> = BTreeMap::new();
        for run in 1..=BOOT_RUNS {
            for vmm in comparison_vmms(kernel) {
                let name = format!("cmp-{label}-{run}-{vmm}");
                let Some(outcome) = outcomes.get(&name) else {
                    continue;
                };
                let wall = bench_values(outcome, "wall");
                match wall {
                    Some(w) if outcome.rc == 0 => {
                        to_init.entry(vmm).or_default().push(w["init_cs"] * 10.0);
                        if outcome.console.contains("ended=self") && w["rc"] == 0.0 {
                            to_exit.entry(vmm).or_default().push(w["exit_cs"] * 10.0);
                        }
                    }
                    _ => {
                        *failed.entry(vmm).or_default() += 1;
                        println!("{name}: no /init marker (rc {}), left out", outcome.rc);
                        outcome.dump();
                    }
                }
            }
        }
        let Some(pvm_init) = to_init.get("pvm").cloned().and_then(median) else {
            continue;
        };
        let pvm_exit = to_exit.get("pvm").cloned().and_then(median);
        for (vmm, times) in &to_init {
            let Some(init_ms) = median(times.clone()) else {
                continue;
            };
            let exit = match (to_exit.get(vmm).cloned().and_then(median), pvm_exit) {
                (Some(ms), _) if *vmm == "pvm" => {
                    format!("; to exit {ms:.0} ms (median of {})", to_exit[vmm].len())
                }
                (Some(ms), Some(pvm)) => format!(
                    "; to exit {ms:.0} ms (median of {}), pvm/{vmm} = {:.2}",
                    to_exit[vmm].len(),
                    pvm / ms
                ),
                _ => "; does not exit by the guest's power-off".to_string(),
            };
            let lost = failed
                .get(vmm)
                .map(|n| format!(", {n} run(s) failed"))
                .unwrap_or_default();
            let ratio = if *vmm == "pvm" {
                String::new()
            } else {
                format!(", pvm/{vmm} = {:.2}", pvm_init / init_ms)
            };
            println!(
                "| launch to /init, {text}: {vmm} | {init_ms:.0} ms (median of {}{lost}){ratio}{exit} | same guest, 1 vCPU, 256 MiB, same emulated host, alternating runs, serial marker polled every 10 ms |",
                times.len(),
            );
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
        let qemu = ok(&format!("blk-qemu-{BLOCK_MIB}")).and_then(|q| bench_values(q, "blk"));
        if let Some(blk) = bench_values(outcome, "blk") {
            // Throughput ratio = inverse time ratio.
            let ratio = qemu
                .as_ref()
                .map(|q| {
                    format!(
                        "; pvm/QEMU = {:.2} write, {:.2} read",
                        q["write_cs"] / blk["write_cs"].max(1.0),
                        q["read_cs"] / blk["read_cs"].max(1.0)
                    )
                })
                .unwrap_or_default();
            println!(
                "| block, dd 1 MiB O_DIRECT, {BLOCK_MIB} MiB, pvm | write {}, read {}{ratio} | minimal guest, virtio-pci, in-process worker |",
                mib_per_s(BLOCK_MIB, blk["write_cs"]),
                mib_per_s(BLOCK_MIB, blk["read_cs"])
            );
        }
        let uring = ok(&format!("blk-uring-{BLOCK_MIB}")).and_then(|o| bench_values(o, "blk"));
        if let (Some(uring), Some(blk)) = (uring, bench_values(outcome, "blk")) {
            println!(
                "| block, same, pvm engine=io_uring | write {}, read {}; io_uring/sync = {:.2} write, {:.2} read | same guest, one ring |",
                mib_per_s(BLOCK_MIB, uring["write_cs"]),
                mib_per_s(BLOCK_MIB, uring["read_cs"]),
                blk["write_cs"] / uring["write_cs"].max(1.0),
                blk["read_cs"] / uring["read_cs"].max(1.0)
            );
        }
        if let Some(q) = &qemu {
            println!(
                "| block, same, QEMU q35 virtio-blk-pci | write {}, read {} | same guest and image size, QEMU's default cache |",
                mib_per_s(BLOCK_MIB, q["write_cs"]),
                mib_per_s(BLOCK_MIB, q["read_cs"])
            );
        }
        let requests = 2.0 * f64::from(BLOCK_MIB);
        if let Some(base) = ok("blk-0") {
            print_exits("block", outcome, base, requests, "requests");
        }
    }
    for (name, label) in [
        (format!("blk-{BLOCK_MIB}"), "pvm"),
        (format!("blk-uring-{BLOCK_MIB}"), "pvm engine=io_uring"),
        (format!("blk-qemu-{BLOCK_MIB}"), "QEMU q35"),
    ] {
        let Some(outcome) = ok(&name) else {
            continue;
        };
        let cpu = |tag: &str| bench_values(outcome, tag);
        if let (Some(before), Some(after)) = (cpu("cpu0"), cpu("cpu1")) {
            let gib = 2.0 * f64::from(BLOCK_MIB) / 1024.0;
            println!(
                "| block, {label}: VMM CPU (threads except vCPUs) per GiB | {:.1} s/GiB | /proc/PID/task/*/stat, sampled before and after the transfers |",
                (after["vmm_ms"] - before["vmm_ms"]) / gib / 1000.0
            );
        }
    }
    let net_mib = net_mib();
    let throughput = |plane: &str| {
        let outcome = ok(&format!("net-{plane}-{net_mib}"))?;
        // guest->host timed in the guest, host->guest on the host (from the attempt that
        // connected to the end of the sender).
        let tx = bench_values(outcome, "net")?["tx_cs"];
        let rx = bench_values(outcome, "hostrx")?["rx_cs"];
        Some((tx, rx))
    };
    let reference = throughput("qemu");
    for (plane, label) in NET_PLANES {
        let Some(outcome) = ok(&format!("net-{plane}-{net_mib}")) else {
            continue;
        };
        if let Some((tx, rx)) = throughput(plane) {
            let ratio = match reference {
                // Throughput ratio = inverse time ratio.
                Some((qtx, qrx)) if plane != "qemu" => format!(
                    "; pvm/QEMU = {:.2} guest->host, {:.2} host->guest",
                    qtx / tx.max(1.0),
                    qrx / rx.max(1.0)
                ),
                _ => String::new(),
            };
            println!(
                "| TCP through tap, {label} | guest->host {}, host->guest {}{ratio} | nc, {net_mib} MiB each way, minimal guest, q35/pci |",
                mib_per_s(net_mib, tx),
                mib_per_s(net_mib, rx)
            );
        }
        let cpu = |tag: &str| bench_values(outcome, tag);
        if let (Some(before), Some(after)) = (cpu("cpu0"), cpu("cpu1")) {
            let gib = 2.0 * f64::from(net_mib) / 1024.0;
            let per_gib = |key: &str| (after[key] - before[key]) / gib / 1000.0;
            println!(
                "| host CPU per GiB moved, {label} | VMM threads except vCPUs {:.1} s/GiB, data plane outside the VMM {:.1} s/GiB | /proc/PID/task/*/stat of the VMM, the vhost-PID kernel workers and the vhost-user backend, sampled before and after the transfers |",
                per_gib("vmm_ms"),
                per_gib("vhost_ms")
            );
        }
        if plane == "qemu" {
            continue;
        }
        let Some(base) = ok(&format!("net-{plane}-0")) else {
            continue;
        };
        let packets = |o: &Outcome| bench_values(o, "tap").and_then(|t| t.get("packets").copied());
        if let (Some(moved), Some(idle)) = (packets(outcome), packets(base)) {
            print_exits(label, outcome, base, moved - idle, "packets");
        }
    }
    snapshot::report(&outcomes);
    io::report(&ok);
    net_mq::report(&ok);
}

/// Userspace exits per 1000 `unit`s: the run's total minus its baseline's (the same boot
/// without the transfer). Boots differ by some tens of exits (device probing), so a
/// difference at or below zero means the transfer caused none that can be told apart.
fn print_exits(label: &str, run: &Outcome, base: &Outcome, units: f64, unit: &str) {
    let (Some(exits_run), Some(exits_base)) = (exits(run), exits(base)) else {
        return;
    };
    let diff = exits_run as f64 - exits_base as f64;
    println!(
        "| {label}: userspace exits per 1000 {unit} | {:.2} ({exits_run} exits in the run, {exits_base} in the baseline boot; {units:.0} {unit}) | --stats, minus a baseline boot without the transfer |",
        diff.max(0.0) * 1000.0 / units.max(1.0),
    );
}

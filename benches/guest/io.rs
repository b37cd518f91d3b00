//! `PVM_BENCH_ONLY=io`: fio and iperf3 in the same guest under pvm, QEMU (q35) and Firecracker,
//! in one run of the emulated host, printed as figures and pvm/other ratios.
//!
//! The guest is the minimal kernel (virtio built in; Firecracker's virtio-mmio devices come on
//! its command line) with the busybox initramfs, 1 vCPU, 256 MiB: the same for every VMM.
//! fio 3.33 and iperf3 3.12 come out of the Debian 12 image (`$PVM_CACHE/assets/debian.img`,
//! read with debugfs, no mount) with the shared libraries their loader lists, on a read-only
//! ext4 "tools" disk every VMM attaches (fio needs 80 MiB of libraries, too much for an
//! initramfs copied into each scenario). The host side runs the same iperf3 through the
//! image's loader.
//!
//! fio runs on a second disk, a 256 MiB raw file on ext4 on a disk of the emulated host (see
//! fio.rs, which holds the block half), with O_DIRECT in the guest and libaio (the minimal
//! kernel has no io_uring). The host samples the VMM's CPU (threads other than vCPUs, plus
//! vhost workers) around each job from markers the guest prints, so CPU per GiB covers that
//! job.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::{Kernel, Outcome, Scenario, in_network_namespace};
use crate::{CPU_MS, QEMU, firecracker, median, with_qemu};

mod fio;

/// iperf3 runs, guest as client of the host's server: name, arguments.
const IPERF_RUNS: [(&str, &str); 5] = [
    ("tcp1", ""),
    ("tcp1-rev", "-R"),
    ("tcp4", "-P 4"),
    ("tcp4-rev", "-P 4 -R"),
    ("udp", "-u -l 1400 -b 0"),
];

/// Network configurations: scenario tag, label.
const NET_VMMS: [(&str, &str); 4] = [
    ("pvm", "pvm in-process"),
    ("vhost", "pvm vhost-net"),
    ("qemu", "QEMU q35 virtio-net-pci vhost=on"),
    ("fc", "Firecracker virtio-net (mmio)"),
];

/// Ratio columns of the iperf3 table: (pvm's tag, the other's tag, header).
const NET_RATIOS: [(&str, &str, &str); 4] = [
    ("pvm", "qemu", "pvm in-process / QEMU"),
    ("vhost", "qemu", "pvm vhost-net / QEMU"),
    ("pvm", "fc", "pvm in-process / Firecracker"),
    ("vhost", "fc", "pvm vhost-net / Firecracker"),
];

/// The test disk's size in the emulated host, MiB.
const DISK_MIB: u32 = 256;

/// Seconds per fio job and iperf3 run: PVM_BENCH_IO_SECS, default 10.
pub(crate) fn secs() -> u32 {
    env_u32("PVM_BENCH_IO_SECS", 10)
}

/// Alternating runs per configuration: PVM_BENCH_IO_RUNS, default 1.
pub(crate) fn runs() -> u32 {
    env_u32("PVM_BENCH_IO_RUNS", 1)
}

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where the tools disk and the host's iperf3 are staged (kept between runs).
fn stage_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/io-bench")
}

fn run(cmd: &mut Command) -> Result<Vec<u8>, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out.stdout)
}

/// The libraries the image's loader resolves for `binary`: (soname, path).
fn libraries(libdir: &Path, binary: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let loader = libdir.join("ld-linux-x86-64.so.2");
    let search = format!("{0}:{0}/ceph", libdir.display());
    let list = run(Command::new(&loader)
        .args(["--library-path", &search, "--list"])
        .arg(binary))?;
    let mut libs = vec![("ld-linux-x86-64.so.2".to_string(), loader.clone())];
    for line in String::from_utf8_lossy(&list).lines() {
        // "\tlibc.so.6 => /path/libc.so.6 (0x...)"
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [name, "=>", path, ..] = words[..] {
            if !path.starts_with('/') && !path.contains('/') {
                return Err(format!("{}: {name} not found", binary.display()));
            }
            libs.push((name.to_string(), PathBuf::from(path)));
        }
    }
    Ok(libs)
}

/// Builds (once) `tools.img` (fio, iperf3, their libraries in lib/) and `host/` (iperf3 and its
/// libraries for the emulated host) from the Debian image.
pub(crate) fn stage_tools() -> Result<PathBuf, String> {
    let stage = stage_dir();
    let image = stage.join("tools.img");
    if image.exists() && stage.join("host/iperf3").exists() {
        return Ok(stage);
    }
    let debian = crate::common::assets().join("debian.img");
    let debian = std::fs::canonicalize(&debian)
        .map_err(|e| format!("{}: {e} (run scripts/guest-assets)", debian.display()))?;
    // Partition 1 starts at 1 MiB (scripts/debian-image's GPT layout).
    let device = format!("{}?offset=1048576", debian.display());
    let scratch = stage.join("scratch");
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let debugfs = |request: String| run(Command::new("debugfs").args(["-R", &request, &device]));
    debugfs(format!(
        "rdump /usr/lib/x86_64-linux-gnu {}",
        scratch.display()
    ))?;
    let libdir = scratch.join("x86_64-linux-gnu");
    let root = stage.join("root");
    let lib = root.join("lib");
    let host = stage.join("host");
    for dir in [&lib, &host.join("lib")] {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    for tool in ["fio", "iperf3"] {
        let to = root.join(tool);
        debugfs(format!("dump -p /usr/bin/{tool} {}", to.display()))?;
        for (name, path) in libraries(&libdir, &to)? {
            copy(&path, &lib.join(&name))?;
            if tool == "iperf3" {
                copy(&path, &host.join("lib").join(&name))?;
            }
        }
        if tool == "iperf3" {
            copy(&to, &host.join(tool))?;
        }
    }
    // fio keeps its job table in SysV shared memory, which the minimal kernel lacks
    // (CONFIG_SYSVIPC off): a preloaded shim serves shmget/shmat from anonymous mappings.
    let shim = stage.join("noshm.c");
    std::fs::write(&shim, NOSHM_SHIM).map_err(|e| format!("{}: {e}", shim.display()))?;
    run(Command::new("gcc")
        .args(["-O2", "-shared", "-fPIC", "-o"])
        .arg(lib.join("libnoshm.so"))
        .arg(&shim))?;
    // The image's size: what the files take, plus room for ext4's own blocks.
    let used = run(Command::new("du").args(["-sm"]).arg(&root))?;
    let mib: u64 = String::from_utf8_lossy(&used)
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or("du printed no size")?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "pvm-io-tools", "-d"])
        .arg(&root)
        .arg(&image)
        .arg(format!("{}M", mib + mib / 4 + 16)))?;
    let _ = std::fs::remove_dir_all(&scratch);
    let _ = std::fs::remove_dir_all(&root);
    Ok(stage)
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("{} -> {}: {e}", from.display(), to.display()))
}

/// shmget/shmat/shmdt/shmctl over MAP_SHARED anonymous mappings (fio with `--thread` only
/// shares them within its own process).
const NOSHM_SHIM: &str = r#"#include <stddef.h>
#include <sys/mman.h>
static void *segs[64];
static int used;
int shmget(int key, size_t size, int flags) {
    (void)key; (void)flags;
    if (used == 64) return -1;
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return -1;
    segs[used] = p;
    return used++;
}
void *shmat(int id, const void *addr, int flags) {
    (void)addr; (void)flags;
    return id >= 0 && id < used ? segs[id] : (void *)-1;
}
int shmdt(const void *addr) { (void)addr; return 0; }
int shmctl(int id, int cmd, void *buf) { (void)id; (void)cmd; (void)buf; return 0; }
"#;

/// The guest's /init lines that mount the tools disk on /tools (whichever vdX is ext4) and
/// set `$test` to the other disk (if any) and `$T` to the tools' loader command prefix.
pub(crate) const MOUNT_TOOLS: &str = "mkdir -p /tools /tmp\n\
    for d in /dev/vd?; do mount -t ext4 -o ro $d /tools 2>/dev/null && break; done\n\
    test=\n\
    for d in /dev/vd?; do grep -q \"^$d \" /proc/mounts || test=$d; done\n\
    T=\"/tools/lib/ld-linux-x86-64.so.2 --library-path /tools/lib\"\n";

/// The host lines that sample the VMM's CPU around each guest job: `io-begin NAME` and
/// `io-end NAME` on the console (out.log), `$vmmpid` the VMM; lines go to cpu.log.
pub(crate) fn sample_jobs(names: &[&str]) -> String {
    format!(
        "{CPU_MS}\
         wait_for() {{\n\
             for i in $(seq 1 900); do\n\
                 grep -q \"$1\" out.log && return 0\n\
                 kill -0 $vmmpid 2>/dev/null || return 1\n\
                 sleep 1\n\
             done\n\
             return 1\n\
         }}\n\
         for j in {0}; do\n\
             wait_for \"io-begin $j\" || break\n\
             echo \"BENCH cpu0-$j $(cpu_ms $vmmpid)\" >> cpu.log\n\
             wait_for \"io-end $j\" || break\n\
             echo \"BENCH cpu1-$j $(cpu_ms $vmmpid)\" >> cpu.log\n\
         done\n\
         # Not every VMM ends on the guest's power-off (Firecracker wants a reset): 30 s,\n\
         # then it is stopped; the run counts if the guest finished its jobs.\n\
         for i in $(seq 1 30); do kill -0 $vmmpid 2>/dev/null || break; sleep 1; done\n\
         kill $vmmpid 2>/dev/null && echo 'BENCH ended stopped=1'\n\
         wait $vmmpid\n\
         rc=$?\n\
         grep -q 'io-end {1}' out.log && rc=0\n\
         cat out.log cpu.log\n",
        names.join(" "),
        names.last().copied().unwrap_or("none")
    )
}

/// The guest's shell function `job NAME COMMAND...`: markers around COMMAND, with its stdout
/// between `OUT-BEGIN NAME` and `OUT-END NAME`, and 2 s of quiet on each side so the host's
/// once-a-second samples fall outside it.
const JOB_FN: &str = "job() {\n\
        name=$1; shift\n\
        echo \"io-begin $name\"; sleep 2\n\
        echo \"OUT-BEGIN $name\"; \"$@\" 2>/tmp/err; echo; echo \"OUT-END $name\"; cat /tmp/err\n\
        echo \"io-end $name\"; sleep 2\n\
    }\n";

/// A Firecracker config: the scenario's kernel and initramfs, `vcpus` vCPUs, 256 MiB, the tools
/// disk read-only, and the test disk (at the path given) and/or tap0.
pub(crate) fn firecracker_config(test_disk: Option<&str>, tap: bool, vcpus: u32) -> String {
    let mut drives = String::new();
    if let Some(path) = test_disk {
        drives.push_str(&format!(
            "{{\"drive_id\": \"test\", \"path_on_host\": \"{path}\", \"is_root_device\": false, \
             \"is_read_only\": false, \"io_engine\": \"Async\"}}, "
        ));
    }
    drives.push_str(
        "{\"drive_id\": \"tools\", \"path_on_host\": \"{shared}/io/tools.img\", \
         \"is_root_device\": false, \"is_read_only\": true}",
    );
    let net = if tap {
        "[{\"iface_id\": \"eth0\", \"host_dev_name\": \"tap0\", \"guest_mac\": \"52:54:00:12:34:56\"}]"
    } else {
        "[]"
    };
    format!(
        "cat > fc.json <<'EOF'\n\
         {{\"boot-source\": {{\"kernel_image_path\": \"{{kernel}}\", \"initrd_path\": \"initrd.cpio\", \
         \"boot_args\": \"{}\"}}, \"drives\": [{drives}], \"network-interfaces\": {net}, \
         \"machine-config\": {{\"vcpu_count\": {vcpus}, \"mem_size_mib\": 256}}}}\nEOF\n",
        firecracker::BOOT_ARGS
    )
}

/// QEMU's arguments attaching the tools disk read-only.
pub(crate) const QEMU_TOOLS: &str = "-drive file={shared}/io/tools.img,format=raw,if=none,id=tools,readonly=on \
    -device virtio-blk-pci,drive=tools";

/// The VMM command for `vmm` (pvm's arguments come from the scenario), after `setup` lines.
fn vmm_command(vmm: &str, qemu_devices: &str, fc_config: String) -> (String, String) {
    match vmm {
        "qemu" => (
            String::new(),
            format!(
                "{QEMU} -M q35 -kernel {{kernel}} -initrd initrd.cpio -append 'console=ttyS0 quiet' \
                 {qemu_devices} {QEMU_TOOLS}"
            ),
        ),
        "fc" => (fc_config, firecracker::COMMAND.to_string()),
        _ => (String::new(), "{pvm}".to_string()),
    }
}

pub(crate) fn with_vmm(scenario: Scenario, vmm: &str, stage: &Path) -> Result<Scenario, String> {
    let scenario = scenario.shared_file("io/tools.img", &stage.join("tools.img"));
    match vmm {
        "qemu" => with_qemu(scenario),
        "fc" => firecracker::with_binary(scenario),
        _ => Ok(scenario.args(["--disk", "{shared}/io/tools.img,ro", "--stats"])),
    }
}

/// iperf3's runs between the guest (client) and the host side of tap0 under `vmm` (see
/// [`NET_VMMS`]).
fn net_scenario(vmm: &str, run: u32, stage: &Path) -> Result<Scenario, String> {
    let secs = secs();
    let mut init = format!(
        "{MOUNT_TOOLS}{JOB_FN}\
         ip link set eth0 up\n\
         ip addr add 10.0.2.2/24 dev eth0\n\
         ping -c 1 -W 5 10.0.2.1 >/dev/null || echo 'no answer from the host'\n"
    );
    for (name, args) in IPERF_RUNS {
        init.push_str(&format!(
            "job {name} $T /tools/iperf3 -c 10.0.2.1 -t {secs} -i 0 -J {args}\n"
        ));
    }
    let qemu_devices = "-netdev tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=on \
         -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,romfile=";
    let (setup, command) = vmm_command(vmm, qemu_devices, firecracker_config(None, true, 1));
    let names: Vec<&str> = IPERF_RUNS.iter().map(|r| r.0).collect();
    let body = format!(
        "{setup}{{shared}}/io/host/lib/ld-linux-x86-64.so.2 --library-path {{shared}}/io/host/lib \
         {{shared}}/io/host/iperf3 -s > server.log 2>&1 &\n\
         server=$!\n\
         {command} > out.log 2>&1 &\n\
         vmmpid=$!\n\
         {}kill $server\n\
         exit $rc",
        sample_jobs(&names)
    );
    let scenario = Scenario::boot(&format!("io-net-{run}-{vmm}"), Kernel::MinimalElf, 1, &init)
        .script(&in_network_namespace(&body))
        .timeout(300 + 15 * secs);
    let mut scenario = with_host_iperf(scenario, stage)?;
    scenario = match vmm {
        "pvm" => scenario.args(["--tap", "tap0,mac=52:54:00:12:34:56,vhost=off"]),
        "vhost" => scenario.args(["--tap", "tap0,mac=52:54:00:12:34:56,vhost=on"]),
        _ => scenario,
    };
    with_vmm(scenario, vmm, stage)
}

/// `scenario` with the host's iperf3 and its libraries at `{shared}/io/host/`.
pub(crate) fn with_host_iperf(mut scenario: Scenario, stage: &Path) -> Result<Scenario, String> {
    scenario = scenario.shared_file("io/host/iperf3", &stage.join("host/iperf3"));
    let libs = stage.join("host/lib");
    for entry in std::fs::read_dir(&libs).map_err(|e| format!("{}: {e}", libs.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        scenario = scenario.shared_file(&format!("io/host/lib/{name}"), &path);
    }
    Ok(scenario)
}

/// The io group's scenarios when PVM_BENCH_ONLY selects them (staging the tools takes a while,
/// so the other groups do not pay for it).
pub fn scenarios() -> Vec<Scenario> {
    let only = std::env::var("PVM_BENCH_ONLY").unwrap_or_default();
    if !(only.starts_with("io") || "io".starts_with(&only)) {
        return Vec::new();
    }
    let stage = match stage_tools() {
        Ok(stage) => stage,
        Err(e) => {
            println!("io: left out: {e}");
            return Vec::new();
        }
    };
    let mut all = Vec::new();
    let mut push = |name: String, s: Result<Scenario, String>| match s {
        Ok(s) => all.push(s),
        Err(e) => println!("{name}: left out: {e}"),
    };
    for (name, scenario) in fio::scenarios(&stage) {
        push(name, scenario);
    }
    for run in 1..=runs() {
        for (vmm, _) in NET_VMMS {
            push(
                format!("io-net-{run}-{vmm}"),
                net_scenario(vmm, run, &stage),
            );
        }
    }
    all
}

/// What a job printed between `OUT-BEGIN name` and `OUT-END name`.
pub(crate) fn job_text<'a>(outcome: &'a Outcome, name: &str) -> Option<&'a str> {
    let console = &outcome.console;
    // The exact name: "tcp1" must not match "tcp1-rev" (lines end in \r\n on a serial tty).
    let marker = |m: &str| {
        let m = format!("{m} {name}");
        console
            .match_indices(&m)
            .map(|(at, _)| at)
            .find(|&at| matches!(console.as_bytes().get(at + m.len()), Some(b'\r' | b'\n')))
    };
    let start = marker("OUT-BEGIN")? + "OUT-BEGIN ".len() + name.len();
    console.get(start..marker("OUT-END")?)
}

/// The JSON a job printed (see [`job_text`]).
pub(crate) fn job_json(outcome: &Outcome, name: &str) -> Option<Value> {
    let text = job_text(outcome, name)?;
    serde_json::from_str(&text[text.find('{')?..]).ok()
}

/// The CPU during job `name`, seconds: the VMM's threads except its vCPUs, and the vhost
/// kernel workers serving it.
pub(crate) fn job_cpu_s(outcome: &Outcome, name: &str) -> Option<(f64, f64)> {
    let before = crate::bench_values(outcome, &format!("cpu0-{name}"))?;
    let after = crate::bench_values(outcome, &format!("cpu1-{name}"))?;
    let delta = |key: &str| Some((after.get(key)? - before.get(key)?) / 1000.0);
    Some((delta("vmm_ms")?, delta("vhost_ms")?))
}

/// Per-job figures of one run.
#[derive(Default, Clone, Copy)]
pub(crate) struct Figures {
    /// IOPS (fio) or Mbit/s (iperf3).
    pub(crate) rate: f64,
    /// Bytes moved.
    pub(crate) bytes: f64,
    /// fio: completion latency p50 / p99, µs; iperf3 UDP: loss percent in p50.
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    /// Requests (fio).
    pub(crate) ios: f64,
    /// CPU seconds of the VMM's threads except vCPUs, and of its vhost workers.
    pub(crate) cpu_s: f64,
    pub(crate) vhost_s: f64,
}

fn iperf_figures(outcome: &Outcome, name: &str) -> Option<Figures> {
    let json = job_json(outcome, name)?;
    let end = &json["end"];
    // TCP: what the receiving side counted; UDP: the sum with the receiver's loss.
    let (sum, loss) = if name == "udp" {
        (
            &end["sum"],
            end["sum"]["lost_percent"].as_f64().unwrap_or(0.0),
        )
    } else {
        (&end["sum_received"], 0.0)
    };
    let (cpu_s, vhost_s) = job_cpu_s(outcome, name)?;
    Some(Figures {
        rate: sum["bits_per_second"].as_f64()? / 1e6,
        bytes: sum["bytes"].as_f64()?,
        p50: loss,
        cpu_s,
        vhost_s,
        ..Figures::default()
    })
}

/// Median of each field over the runs that have figures.
pub(crate) fn medians(runs: &[Figures]) -> Option<Figures> {
    let m = |f: fn(&Figures) -> f64| median(runs.iter().map(f).collect());
    Some(Figures {
        rate: m(|f| f.rate)?,
        bytes: m(|f| f.bytes)?,
        p50: m(|f| f.p50)?,
        p99: m(|f| f.p99)?,
        ios: m(|f| f.ios)?,
        cpu_s: m(|f| f.cpu_s)?,
        vhost_s: m(|f| f.vhost_s)?,
    })
}

/// CPU seconds per GiB the job moved.
pub(crate) fn per_gib(f: &Figures, cpu_s: f64) -> f64 {
    cpu_s / (f.bytes / f64::from(1u32 << 30)).max(1e-9)
}

/// Prints the io group's tables from the outcomes that succeeded (`ok`).
pub fn report<'a>(ok: &dyn Fn(&str) -> Option<&'a Outcome>) {
    let runs = runs();
    let secs = secs();
    fio::report(ok);
    println!(
        "\n### iperf3 between the guest and the host side of tap0 ({secs} s per run, medians of up to {runs} run(s))\n"
    );
    println!(
        "| run | VMM | Mbit/s | UDP loss % | VMM CPU s/GiB | vhost workers s/GiB | runs |\n| --- | --- | --- | --- | --- | --- | --- |"
    );
    let mut net: BTreeMap<(&str, &str), Figures> = BTreeMap::new();
    for (name, _) in IPERF_RUNS {
        for (vmm, label) in NET_VMMS {
            let all: Vec<Figures> = (1..=runs)
                .filter_map(|r| iperf_figures(ok(&format!("io-net-{r}-{vmm}"))?, name))
                .collect();
            let Some(f) = medians(&all) else { continue };
            net.insert((name, vmm), f);
            println!(
                "| {name} | {label} | {:.1} | {:.1} | {:.2} | {:.2} | {} |",
                f.rate,
                f.p50,
                per_gib(&f, f.cpu_s),
                per_gib(&f, f.vhost_s),
                all.len()
            );
        }
    }
    println!();
    let names: Vec<&str> = IPERF_RUNS.iter().map(|r| r.0).collect();
    print_ratios(&net, &names, "Mbit/s", &NET_RATIOS);
}

/// A ratio table: a row per `rows` entry, a column per `columns` entry (pvm's tag, the other
/// VMM's tag, header) with pvm's rate over the other's.
fn print_ratios(
    figures: &BTreeMap<(&str, &str), Figures>,
    rows: &[&str],
    unit: &str,
    columns: &[(&str, &str, &str)],
) {
    let headers: Vec<&str> = columns.iter().map(|c| c.2).collect();
    println!(
        "| | {} |\n|{}",
        headers.join(" | "),
        " --- |".repeat(columns.len() + 1)
    );
    for row in rows {
        let cells: Vec<String> = columns
            .iter()
            .map(|(ours, theirs, _)| {
                match (figures.get(&(*row, *ours)), figures.get(&(*row, *theirs))) {
                    (Some(a), Some(b)) => format!("{:.2}", a.rate / b.rate.max(1e-9)),
                    _ => "n/a".to_string(),
                }
            })
            .collect();
        println!("| {row} ({unit}) | {} |", cells.join(" | "));
    }
}

//! The block half of the io group (`PVM_BENCH_ONLY=io-blk`): fio's jobs in the guest on a test
//! disk under each block configuration, the tables, and pvm's exits per request.
//!
//! The test disk is a 256 MiB file on ext4 on a disk of the emulated host, not on its tmpfs:
//! tmpfs refuses O_DIRECT before Linux 6.6 and the emulated host runs 6.1, so `direct=on` and
//! QEMU's `cache=none` could not be measured there. Every configuration uses the same file
//! system and path, so the ratios stay like for like. The ext4 image is made on the build
//! machine by mkfs.ext4 (nothing mounted there) and attached by scripts/kvm-host with
//! `snapshot=on`; each scenario mounts it, writes the test file in full (so no job allocates
//! blocks), drops the host's page cache, and removes the file and unmounts at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{Kernel, Outcome, Scenario};
use crate::exits;

use super::{
    DISK_MIB, Figures, JOB_FN, MOUNT_TOOLS, firecracker_config, job_cpu_s, job_json, job_text,
    medians, per_gib, print_ratios, run, runs, sample_jobs, secs, vmm_command, with_vmm,
};

/// fio jobs in the order they run (writes first, so the reads find written blocks): name,
/// fio arguments, the direction fio reports them under.
const FIO_JOBS: [(&str, &str, &str); 6] = [
    ("seqwrite", "--rw=write --bs=1M --iodepth=8", "write"),
    ("randwrite1", "--rw=randwrite --bs=4k --iodepth=1", "write"),
    (
        "randwrite32",
        "--rw=randwrite --bs=4k --iodepth=32",
        "write",
    ),
    ("randread1", "--rw=randread --bs=4k --iodepth=1", "read"),
    ("randread32", "--rw=randread --bs=4k --iodepth=32", "read"),
    ("seqread", "--rw=read --bs=1M --iodepth=8", "read"),
];

/// Block configurations: scenario tag, label.
const BLK_VMMS: [(&str, &str); 6] = [
    ("pvm", "pvm engine=sync"),
    ("uring", "pvm engine=io_uring"),
    ("direct", "pvm engine=io_uring,direct=on"),
    ("qemu", "QEMU q35 virtio-blk-pci, iothread, aio=io_uring"),
    ("qemunc", "QEMU the same, cache=none"),
    ("fc", "Firecracker io_engine=Async"),
];

/// pvm's configurations (tag, `--disk` options after the path).
const PVM_DISKS: [(&str, &str); 3] = [
    ("pvm", ""),
    ("uring", ",engine=io_uring"),
    ("direct", ",engine=io_uring,direct=on"),
];

/// Ratio columns: (pvm's tag, the other's tag, header).
const RATIOS: [(&str, &str, &str); 5] = [
    ("pvm", "qemu", "pvm sync / QEMU"),
    ("uring", "qemu", "pvm io_uring / QEMU"),
    ("direct", "qemunc", "pvm direct=on / QEMU cache=none"),
    ("pvm", "fc", "pvm sync / Firecracker"),
    ("uring", "fc", "pvm io_uring / Firecracker"),
];

/// Where each scenario mounts the ext4 disk, and the test file on it.
const FIO_MNT: &str = "/mnt/fio";
const TEST_FILE: &str = "/mnt/fio/disk.img";

/// The ext4 image's size, MiB: the test file, the journal and room to spare.
const FS_MIB: u32 = DISK_MIB + 128;

/// Makes (once) `fio-fs.img`, an empty ext4 file system, in `stage`. Its inode tables and
/// journal are written now (`lazy_*_init=0`), so the emulated host's kernel does not zero them
/// in the background while fio runs.
pub(super) fn stage_fs(stage: &Path) -> Result<PathBuf, String> {
    let image = stage.join("fio-fs.img");
    if image.exists() {
        return Ok(image);
    }
    let partial = stage.join("fio-fs.img.partial");
    run(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            "pvm-io-fio",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
        ])
        .arg(&partial)
        .arg(format!("{FS_MIB}M")))?;
    std::fs::rename(&partial, &image)
        .map_err(|e| format!("{} -> {}: {e}", partial.display(), image.display()))?;
    Ok(image)
}

/// fio's jobs on the test file under `vmm` (see [`BLK_VMMS`]); `base` only boots and mounts
/// the tools (pvm's exits baseline).
pub(super) fn scenario(
    vmm: &str,
    run: u32,
    stage: &Path,
    fs: &Path,
    base: bool,
) -> Result<Scenario, String> {
    let secs = secs();
    let mut init = format!("{MOUNT_TOOLS}{JOB_FN}echo \"test disk $test\"\n");
    if !base {
        for (name, args, _) in FIO_JOBS {
            init.push_str(&format!(
                "job {name} $T --preload /tools/lib/libnoshm.so /tools/fio --thread --name={name} --filename=$test --direct=1 \
                 --ioengine=libaio --runtime={secs} --time_based --output-format=json {args}\n"
            ));
        }
    }
    let cache = if vmm == "qemunc" { ",cache=none" } else { "" };
    let qemu_devices = format!(
        "-object iothread,id=io0 \
         -drive file={TEST_FILE},format=raw,if=none,id=d0,aio=io_uring{cache} \
         -device virtio-blk-pci,drive=d0,iothread=io0"
    );
    let qemu = if vmm == "qemunc" { "qemu" } else { vmm };
    let (setup, command) = vmm_command(
        qemu,
        &qemu_devices,
        firecracker_config(Some(TEST_FILE), false, 1),
    );
    let names: Vec<&str> = FIO_JOBS.iter().map(|j| j.0).collect();
    // The test file is written in full and synced, then the page cache is dropped: every
    // configuration starts from the same allocated file and a cold cache.
    let script = format!(
        "mkdir -p {FIO_MNT}\n\
         mount -t ext4 {{disk}} {FIO_MNT} || exit 1\n\
         dd if=/dev/zero of={TEST_FILE} bs=1M count={DISK_MIB} conv=fsync 2>/dev/null || exit 1\n\
         sync; echo 3 > /proc/sys/vm/drop_caches\n\
         {setup}{command} > out.log 2>&1 &\n\
         vmmpid=$!\n\
         {}rm -f {TEST_FILE}\n\
         umount {FIO_MNT}\n\
         exit $rc\n",
        sample_jobs(if base { &[] } else { &names })
    );
    let name = if base {
        "io-blk-0-base".to_string()
    } else {
        format!("io-blk-{run}-{vmm}")
    };
    let mut scenario = Scenario::boot(&name, Kernel::MinimalElf, 1, &init)
        .script(&script)
        .disk_image(fs)
        .timeout(300 + 20 * secs);
    if let Some((_, options)) = PVM_DISKS.iter().find(|(tag, _)| *tag == vmm) {
        scenario = scenario.args(["--disk".to_string(), format!("{TEST_FILE}{options}")]);
    }
    with_vmm(scenario, qemu, stage)
}

/// The scenarios' names and builders, in the order they run: the baseline, then the
/// configurations alternating run by run.
pub(super) fn scenarios(stage: &Path) -> Vec<(String, Result<Scenario, String>)> {
    let fs = match stage_fs(stage) {
        Ok(fs) => fs,
        Err(e) => return vec![("io-blk".to_string(), Err(e))],
    };
    let mut all = vec![(
        "io-blk-0-base".to_string(),
        scenario("pvm", 0, stage, &fs, true),
    )];
    for run in 1..=runs() {
        for (vmm, _) in BLK_VMMS {
            all.push((
                format!("io-blk-{run}-{vmm}"),
                scenario(vmm, run, stage, &fs, false),
            ));
        }
    }
    all
}

fn figures(outcome: &Outcome, name: &str, dir: &str) -> Option<Figures> {
    let json = job_json(outcome, name)?;
    let side = &json["jobs"][0][dir];
    let pct = |p: &str| {
        side["clat_ns"]["percentile"][p]
            .as_f64()
            .map(|ns| ns / 1000.0)
    };
    Some(Figures {
        rate: side["iops"].as_f64()?,
        bytes: side["io_bytes"].as_f64()?,
        p50: pct("50.000000")?,
        p99: pct("99.000000")?,
        ios: side["total_ios"].as_f64()?,
        cpu_s: job_cpu_s(outcome, name)?.0,
        vhost_s: 0.0,
    })
}

/// Prints the fio tables from the outcomes that succeeded (`ok`).
pub(super) fn report<'a>(ok: &dyn Fn(&str) -> Option<&'a Outcome>) {
    let runs = runs();
    let secs = secs();
    println!(
        "\n### fio in the guest ({DISK_MIB} MiB file on ext4 on a virtio-blk disk of the emulated host, O_DIRECT and libaio in the guest, {secs} s per job, medians of up to {runs} run(s))\n"
    );
    println!(
        "| job | VMM | IOPS | MiB/s | p50 / p99 µs | VMM CPU s/GiB | runs |\n| --- | --- | --- | --- | --- | --- | --- |"
    );
    let mut blk: BTreeMap<(&str, &str), Figures> = BTreeMap::new();
    for (job, _, dir) in FIO_JOBS {
        for (vmm, label) in BLK_VMMS {
            let all: Vec<Figures> = (1..=runs)
                .filter_map(|r| figures(ok(&format!("io-blk-{r}-{vmm}"))?, job, dir))
                .collect();
            let Some(f) = medians(&all) else { continue };
            blk.insert((job, vmm), f);
            println!(
                "| {job} | {label} | {:.0} | {:.1} | {:.0} / {:.0} | {:.2} | {} |",
                f.rate,
                f.bytes / f64::from(1u32 << 20) / f64::from(secs),
                f.p50,
                f.p99,
                per_gib(&f, f.cpu_s),
                all.len()
            );
        }
    }
    println!();
    let jobs: Vec<&str> = FIO_JOBS.iter().map(|j| j.0).collect();
    print_ratios(&blk, &jobs, "IOPS", &RATIOS);
    print_exits(ok);
}

/// pvm's userspace exits per 1000 requests in each configuration's first run: the run's
/// total minus a boot that mounted the tools and ran nothing, then the places (port or MMIO
/// address) that differ most from that boot, next to the bytes fio printed on the console.
fn print_exits<'a>(ok: &dyn Fn(&str) -> Option<&'a Outcome>) {
    let Some(base) = ok("io-blk-0-base") else {
        return;
    };
    let (Some(base_total), Some(base_places)) = (exits(base), places(base)) else {
        return;
    };
    for (vmm, label) in BLK_VMMS
        .iter()
        .filter(|(t, _)| PVM_DISKS.iter().any(|p| p.0 == *t))
    {
        let Some(outcome) = ok(&format!("io-blk-1-{vmm}")) else {
            continue;
        };
        let ios: f64 = FIO_JOBS
            .iter()
            .filter_map(|(job, _, dir)| figures(outcome, job, dir))
            .map(|f| f.ios)
            .sum();
        let printed: usize = FIO_JOBS
            .iter()
            .filter_map(|(job, _, _)| job_output_len(outcome, job))
            .sum();
        let (Some(total), Some(run_places)) = (exits(outcome), places(outcome)) else {
            continue;
        };
        println!(
            "\n{label}: userspace exits per 1000 requests: {:.2} ({total} exits in run 1, {base_total} in the baseline boot, {ios:.0} requests; fio printed {printed} bytes on the console)",
            (total as f64 - base_total as f64).max(0.0) * 1000.0 / ios.max(1.0)
        );
        println!(
            "  exits above the baseline by place: {}",
            place_deltas(&run_places, &base_places)
        );
    }
}

/// "pvm: exits by place, most first: io_out@0x3f8=12 ..." as place -> count.
fn places(outcome: &Outcome) -> Option<BTreeMap<String, i64>> {
    const MARKER: &str = "pvm: exits by place, most first: ";
    let line = outcome
        .console
        .lines()
        .find_map(|l| l.find(MARKER).map(|at| &l[at + MARKER.len()..]))?;
    Some(
        line.split_whitespace()
            .filter_map(|kv| {
                let (place, count) = kv.split_once('=')?;
                Some((place.to_string(), count.parse().ok()?))
            })
            .collect(),
    )
}

/// The places whose count differs from the baseline's, largest difference first (a place the
/// summary left out of one side counts as 0 there).
fn place_deltas(run: &BTreeMap<String, i64>, base: &BTreeMap<String, i64>) -> String {
    let mut deltas: Vec<(i64, &str)> = run
        .keys()
        .chain(base.keys())
        .map(|place| {
            let count = |m: &BTreeMap<String, i64>| m.get(place).copied().unwrap_or(0);
            (count(run) - count(base), place.as_str())
        })
        .filter(|(delta, _)| *delta != 0)
        .collect();
    deltas.sort_by(|a, b| b.0.abs().cmp(&a.0.abs()).then(a.1.cmp(b.1)));
    deltas.dedup_by(|a, b| a.1 == b.1);
    let parts: Vec<String> = deltas
        .iter()
        .map(|(delta, place)| format!("{place}={delta:+}"))
        .collect();
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(" ")
    }
}

/// Bytes of a job's console output (its JSON).
fn job_output_len(outcome: &Outcome, name: &str) -> Option<usize> {
    job_text(outcome, name).map(str::len)
}

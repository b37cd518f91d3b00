//! Real guest kernels boot to /init: the minimal kernel (ELF via PVH, and bzImage) and Debian's
//! cloud kernel (bzImage, and the ELF vmlinux extracted from it), with one and two vCPUs. /init
//! prints a marker and `nproc`, read back from the serial console; power-off ends pvm with 0,
//! a reboot too, and a guest panic with the panic code. All scenarios share one boot of the
//! emulated KVM host (tests/common) where this machine's /dev/kvm cannot boot stock kernels.

mod common;

use common::{Batch, Kernel, Scenario};

const MARKER: &str = "PVM-BOOT-OK";

/// What every boot scenario's /init runs: the marker with the CPU count the guest sees.
fn report() -> String {
    format!("echo \"{MARKER} nproc=$(nproc)\"")
}

static BATCH: Batch = Batch::new(scenarios);

fn scenarios() -> Vec<Scenario> {
    let mut all = Vec::new();
    for (kernel, label) in [
        (Kernel::MinimalElf, "minimal-elf"),
        (Kernel::MinimalBzImage, "minimal-bzimage"),
        (Kernel::DebianBzImage, "debian-bzimage"),
        (Kernel::DebianElf, "debian-elf"),
    ] {
        for cpus in [1, 2] {
            all.push(
                Scenario::boot(&format!("{label}-{cpus}cpu"), kernel, cpus, &report()).timeout(60),
            );
        }
    }
    // /init exits: the kernel panics ("Attempted to kill init") and reports it through pvpanic.
    all.push(
        Scenario::boot(
            "minimal-panic",
            Kernel::MinimalElf,
            1,
            "echo about-to-panic; exit 1",
        )
        .timeout(60),
    );
    all.push(
        Scenario::boot(
            "minimal-reboot",
            Kernel::MinimalElf,
            1,
            "echo rebooting; reboot -f",
        )
        .timeout(60),
    );
    all
}

fn assert_booted(name: &str, cpus: u32) {
    let outcome = BATCH.outcome(name);
    outcome.assert_rc(0);
    outcome.assert_contains(&format!("{MARKER} nproc={cpus}"));
    // The vCPU that wrote the power-off register never runs the guest again, so the kernel
    // does not get to panic once its power-off call returns ("Attempted to kill init").
    outcome.assert_contains("reboot: Power down");
    outcome.assert_lacks("Kernel panic");
    // The i8042 driver learns from ACPI that there is no PS/2 controller instead of probing
    // one that answers nothing (a 500 ms busy-wait and 10,000 exits per boot).
    outcome.assert_lacks("i8042: Can't read CTR");
}

#[test]
fn minimal_elf_one_cpu() {
    assert_booted("minimal-elf-1cpu", 1);
}

#[test]
fn minimal_elf_two_cpus() {
    assert_booted("minimal-elf-2cpu", 2);
}

#[test]
fn minimal_bzimage_one_cpu() {
    assert_booted("minimal-bzimage-1cpu", 1);
}

#[test]
fn minimal_bzimage_two_cpus() {
    assert_booted("minimal-bzimage-2cpu", 2);
}

#[test]
fn debian_bzimage_one_cpu() {
    assert_booted("debian-bzimage-1cpu", 1);
}

#[test]
fn debian_bzimage_two_cpus() {
    assert_booted("debian-bzimage-2cpu", 2);
}

#[test]
fn debian_elf_one_cpu() {
    assert_booted("debian-elf-1cpu", 1);
}

#[test]
fn debian_elf_two_cpus() {
    assert_booted("debian-elf-2cpu", 2);
}

#[test]
fn guest_panic_ends_pvm_with_the_panic_code() {
    let outcome = BATCH.outcome("minimal-panic");
    outcome.assert_contains("about-to-panic");
    outcome.assert_rc(3);
    outcome.assert_contains("the guest kernel panicked");
}

#[test]
fn guest_reboot_ends_pvm_with_zero() {
    let outcome = BATCH.outcome("minimal-reboot");
    outcome.assert_contains("rebooting");
    outcome.assert_rc(0);
}

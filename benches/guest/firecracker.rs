//! Firecracker in the boot comparison: its binary, carried into the emulated host, and the
//! configuration file it boots the comparison's guest from.

use std::path::PathBuf;

use crate::common::Scenario;

/// Firecracker's boot arguments when the config gives none (its `DEFAULT_KERNEL_CMDLINE`)
/// without `8250.nr_uarts=0`, which would take away the serial console the marker is read
/// from; plus the console and `quiet` the other VMMs get. Firecracker itself appends `pci=off`.
pub const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 nomodule i8042.noaux i8042.nomux \
    i8042.dumbkbd swiotlb=noforce quiet";

/// The binary: `PVM_FIRECRACKER`, else `~/.cache/pvm/firecracker`, where
/// ../shared/tools/build-firecracker puts it.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PVM_FIRECRACKER") {
        return PathBuf::from(path);
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    PathBuf::from(home).join(".cache/pvm/firecracker")
}

/// Firecracker booting from `fc.json` (see [`write_config`]), without its API and without the
/// seccomp filters (the glibc build has none).
pub const COMMAND: &str =
    "{shared}/firecracker/firecracker --no-api --no-seccomp --config-file fc.json";

/// Shell lines writing `fc.json`, the config file [`COMMAND`] reads: the scenario's kernel (the
/// ELF vmlinux, which Firecracker enters by PVH when the kernel has the note) and initramfs,
/// 1 vCPU, 256 MiB, no drives (the initramfs is the root), like the other VMMs' runs; `extra`
/// is appended to [`BOOT_ARGS`]. `entropy` gives it a virtio-rng: pvm always has one, so
/// the comparison has one on every VMM (its driver's probe is part of the boot).
pub fn write_config(extra: &str) -> String {
    format!(
        "cat > fc.json <<'EOF'\n\
         {{\"boot-source\": {{\"kernel_image_path\": \"{{kernel}}\", \"initrd_path\": \"initrd.cpio\", \
         \"boot_args\": \"{BOOT_ARGS}{extra}\"}}, \"drives\": [], \"entropy\": {{}}, \
         \"machine-config\": {{\"vcpu_count\": 1, \"mem_size_mib\": 256}}}}\nEOF\n"
    )
}

/// `scenario` with the Firecracker binary at `{shared}/firecracker/firecracker` (a static
/// build, so nothing else needs to come along), or why it cannot run.
pub fn with_binary(scenario: Scenario) -> Result<Scenario, String> {
    let path = binary();
    if !path.is_file() {
        return Err(format!(
            "{} does not exist (build it with ../shared/tools/build-firecracker, see \
             ../shared/docs/firecracker.md, or set PVM_FIRECRACKER to its path)",
            path.display()
        ));
    }
    Ok(scenario.shared_file("firecracker/firecracker", &path))
}

/// Shell lines writing `fc.json` for the Debian boot comparison (benches/guest/debian_cmp.rs):
/// the Debian image's kernel (its ELF vmlinux) and initramfs from `{shared}/debian-image`, the
/// image `{disk}` as a writable drive the command line names as root (so not Firecracker's root
/// device, which would append `root=/dev/vda`), tap0 as its network, a virtio-rng, 1 vCPU and
/// `mem_mib` MiB; `boot_args` whole (Firecracker appends its virtio-mmio devices and `pci=off`).
pub fn write_disk_config(boot_args: &str, mem_mib: u32) -> String {
    format!(
        "cat > fc.json <<'EOF'\n\
         {{\"boot-source\": {{\"kernel_image_path\": \"{{shared}}/debian-image/vmlinux\", \
         \"initrd_path\": \"{{shared}}/debian-image/initrd.img\", \"boot_args\": \"{boot_args}\"}}, \
         \"drives\": [{{\"drive_id\": \"root\", \"path_on_host\": \"{{disk}}\", \
         \"is_root_device\": false, \"is_read_only\": false}}], \
         \"network-interfaces\": [{{\"iface_id\": \"eth0\", \"host_dev_name\": \"tap0\", \
         \"guest_mac\": \"52:54:00:12:34:56\"}}], \"entropy\": {{}}, \
         \"machine-config\": {{\"vcpu_count\": 1, \"mem_size_mib\": {mem_mib}}}}}\nEOF\n"
    )
}

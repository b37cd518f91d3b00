//! pvm's fuzz harnesses. Each `fuzz_targets/<name>.rs` is one line calling the function of the
//! same name through [`run`]; the decoding and the invariants live here so they are shared,
//! unit-tested and documented in one place. See scripts/fuzz for how to run them.

pub mod api;
pub mod boot;
pub mod devices;
pub mod input;
pub mod queue;
pub mod seeds;
pub mod snapshot;
pub mod transports;
pub mod uffd;
pub mod virtio_fs;
pub mod vsock;

/// A fuzz target: any bytes in, a panic on a bug.
pub type Target = fn(&[u8]);

/// Every fuzz target, by the name of its `fuzz_targets/` file and corpus directory.
pub const TARGETS: [(&str, Target); 15] = [
    ("block", devices::block),
    ("net_tx", devices::net_tx),
    ("net_rx", devices::net_rx),
    ("console", devices::console),
    ("rng", devices::rng),
    ("mmio", transports::mmio),
    ("pci", transports::pci),
    ("boot_load", boot::load),
    ("disk_kernel", boot::disk),
    ("api_request", api::request),
    ("balloon", devices::balloon),
    ("vsock", vsock::vsock),
    ("snapshot_file", snapshot::file),
    ("virtio_fs", virtio_fs::virtio_fs),
    ("uffd_message", uffd::message),
];

/// Runs the target called `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    let (_, target) = TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no fuzz target {name}"));
    target(data);
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn corpus() -> &'static Path {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/corpus"))
    }

    /// Every seed (as built now, and as committed) runs through its target without a panic, and
    /// the committed corpus matches the generator. PVM_FUZZ_WRITE_SEEDS=1 rewrites it.
    #[test]
    fn seeds() {
        if std::env::var_os("PVM_FUZZ_WRITE_SEEDS").is_some() {
            seeds::write(corpus()).unwrap();
        }
        for (target, list) in seeds::all() {
            assert!(!list.is_empty(), "{target} has no seeds");
            for (name, bytes) in list {
                if devices::trace() {
                    eprintln!("== {target}/{name}");
                }
                run(target, &bytes);
                let committed = std::fs::read(corpus().join(target).join(name))
                    .unwrap_or_else(|e| panic!("corpus/{target}/{name}: {e}"));
                // mkfs.ext4's output differs between e2fsprogs versions: those seeds are only
                // rewritten on request.
                if !name.starts_with("ext4-") {
                    assert!(committed == bytes, "corpus/{target}/{name} is stale");
                }
            }
            // And whatever else the corpus holds (inputs added by hand or from a fuzz run).
            for entry in std::fs::read_dir(corpus().join(target)).unwrap() {
                run(target, &std::fs::read(entry.unwrap().path()).unwrap());
            }
        }
    }

    #[test]
    fn empty_and_tiny_inputs() {
        for (name, target) in TARGETS {
            for data in [&[][..], &[0xff], &[0; 7], &[0xff; 64]] {
                eprintln!("{name} {data:?}");
                target(data);
            }
        }
    }

    #[test]
    fn disk_seeds_hold_a_kernel() {
        for (name, bytes) in seeds::disk() {
            if name.starts_with("ext4") {
                // Decode the sparse image and look for the kernel the way pvm does.
                let mut input = input::Input::new(&bytes);
                let size = input.u32() as usize;
                let mut img = vec![0u8; size];
                while !input.is_empty() {
                    let at = input.u32() as usize;
                    let len = usize::from(input.u16());
                    let chunk = input.bytes(len);
                    img[at..at + chunk.len()].copy_from_slice(chunk);
                }
                let (file, _f) = queue::ScratchFile::new(name, &img);
                let found = pvm::boot::disk::find_kernel(&file.path)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!(found.kernel_name.contains("vmlinuz"), "{name}");
                assert!(found.initrd.is_some(), "{name}");
            }
        }
    }
}

//! virtio-fs (`--share`) in a real guest: Debian's cloud kernel with its fuse and virtiofs
//! modules (insmod-ed from the initramfs) mounts a host directory, in the emulated KVM host.
//! One boot per transport (`share-pci`, `share-mmio`), each checking:
//!
//! - a file's content, a directory listing, a file in a subdirectory, a symlink, and a 300 KB
//!   file read through many READs (its md5sum against the host's);
//! - that writing, creating and removing fail with a read-only error in the guest;
//! - that the host directory is unchanged afterwards (pvm runs with its seccomp filters, so
//!   the share's thread also proves its filter is enough).

mod common;

use common::{Batch, Kernel, Scenario, add_initramfs_files, assets, guest_initramfs, pattern};

const GUEST: &str = r#"insmod /fuse.ko || echo insmod-fuse-failed
insmod /virtiofs.ko || echo insmod-virtiofs-failed
mount -t virtiofs hostfs /mnt && echo share-mounted
echo "content: $(cat /mnt/hello.txt)"
echo "listing: $(ls /mnt | tr '\n' ' ')"
echo "inner: $(cat /mnt/sub/inner.txt)"
echo "link: $(readlink /mnt/link) $(cat /mnt/link)"
echo "guest-md5: $(md5sum /mnt/big.bin | cut -d' ' -f1)"
if echo x > /mnt/hello.txt; then echo write-succeeded; fi
if mkdir /mnt/newdir; then echo mkdir-succeeded; fi
if rm /mnt/hello.txt; then echo rm-succeeded; fi
if touch /mnt/sub/new; then echo create-succeeded; fi
umount /mnt && echo share-unmounted
"#;

/// The host side: the share's symlink (scenario files are regular files), then pvm, then a
/// look at the share.
const HOST: &str = r#"ln -s hello.txt share/link
echo "host-md5: $(md5sum share/big.bin | cut -d' ' -f1)"
{pvm}
rc=$?
echo "host-after: $(cat share/hello.txt)"
echo "host-listing: $(ls share | tr '\n' ' ')"
echo "host-sub: $(ls share/sub | tr '\n' ' ')"
exit $rc
"#;

fn module(name: &str) -> (String, u32, Vec<u8>) {
    let path = assets().join(format!("debian/extra-modules/{name}.ko"));
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (format!("{name}.ko"), 0o644, data)
}

fn share(name: &str, transport: &str) -> Scenario {
    let kernel = Kernel::DebianBzImage;
    let mut initrd = guest_initramfs(GUEST, kernel);
    add_initramfs_files(&mut initrd, &[module("fuse"), module("virtiofs")]);
    Scenario::new(name)
        .kernel(kernel)
        .file("initrd.cpio", initrd)
        .file("share/hello.txt", b"hello from the host\n".to_vec())
        .file("share/sub/inner.txt", b"inner file\n".to_vec())
        .file("share/big.bin", pattern("big", 18000))
        .args(["--kernel", "{kernel}", "--initrd", "initrd.cpio"])
        .args([
            "--mem",
            "256M",
            "--cmdline",
            "quiet",
            "--transport",
            transport,
        ])
        .args(["--share", "share"])
        .script(HOST)
}

fn scenarios() -> Vec<Scenario> {
    vec![share("share-pci", "pci"), share("share-mmio", "mmio")]
}

static BATCH: Batch = Batch::new(scenarios);

fn check_reads(name: &str) {
    let o = BATCH.outcome(name);
    o.assert_rc(0);
    o.assert_lacks("insmod-");
    o.assert_contains("share-mounted");
    o.assert_contains("content: hello from the host");
    o.assert_contains("listing: big.bin hello.txt link sub");
    o.assert_contains("inner: inner file");
    o.assert_contains("link: hello.txt hello from the host");
    let host = o.word_after("host-md5: ");
    assert_eq!(o.word_after("guest-md5: "), host, "{}", o.console);
    o.assert_contains("share-unmounted");
}

fn check_read_only(name: &str) {
    let o = BATCH.outcome(name);
    o.assert_contains("Read-only file system");
    for done in [
        "write-succeeded",
        "mkdir-succeeded",
        "rm-succeeded",
        "create-succeeded",
    ] {
        o.assert_lacks(done);
    }
    o.assert_contains("host-after: hello from the host");
    o.assert_contains("host-listing: big.bin hello.txt link sub");
    o.assert_contains("host-sub: inner.txt");
}

#[test]
fn a_guest_reads_a_shared_directory_over_virtio_pci() {
    check_reads("share-pci");
}

#[test]
fn a_guest_reads_a_shared_directory_over_virtio_mmio() {
    check_reads("share-mmio");
}

#[test]
fn the_share_is_read_only_and_the_host_directory_unchanged() {
    check_read_only("share-pci");
    check_read_only("share-mmio");
}

//! Finding the root filesystem, the kernel and the initrd, on images made here, by mkfs.ext4
//! and by the fuzzer.

use super::*;
use std::io::Write;

fn image(name: &str, bytes: &[u8]) -> File {
    let path = std::env::temp_dir().join(format!("pvm-disk-{}-{name}", std::process::id()));
    let mut f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.write_all(bytes).unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}

fn with_ext4_magic(bytes: &mut [u8], at: usize) {
    bytes[at + 1024 + 56..at + 1024 + 58].copy_from_slice(&EXT4_MAGIC.to_le_bytes());
}

#[test]
fn whole_disk_filesystem() {
    let mut bytes = vec![0u8; 8192];
    with_ext4_magic(&mut bytes, 0);
    let root = locate_root(&mut image("whole", &bytes)).unwrap().unwrap();
    assert_eq!(
        root,
        RootLocation {
            offset: 0,
            partition: None
        }
    );
}

#[test]
fn first_linux_mbr_partition() {
    let mut bytes = vec![0u8; 8 * 4096];
    bytes[510] = 0x55;
    bytes[511] = 0xaa;
    // Partition 1: FAT (0x0c) at sector 8; partition 2: Linux at sector 32.
    bytes[446 + 4] = 0x0c;
    bytes[446 + 8..446 + 12].copy_from_slice(&8u32.to_le_bytes());
    bytes[462 + 4] = MBR_LINUX;
    bytes[462 + 8..462 + 12].copy_from_slice(&32u32.to_le_bytes());
    with_ext4_magic(&mut bytes, 32 * 512);
    let root = locate_root(&mut image("mbr", &bytes)).unwrap().unwrap();
    assert_eq!(
        root,
        RootLocation {
            offset: 32 * 512,
            partition: Some(2)
        }
    );
}

#[test]
fn first_linux_gpt_partition() {
    let mut bytes = vec![0u8; 64 * 1024];
    bytes[510] = 0x55;
    bytes[511] = 0xaa;
    bytes[446 + 4] = MBR_GPT_PROTECTIVE;
    bytes[512..520].copy_from_slice(b"EFI PART");
    bytes[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
    bytes[512 + 80..512 + 84].copy_from_slice(&4u32.to_le_bytes());
    bytes[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
    // Entry 1: some other type; entry 2: Linux filesystem at LBA 64.
    bytes[1024..1040].copy_from_slice(&[1; 16]);
    let e2 = 1024 + 128;
    bytes[e2..e2 + 16].copy_from_slice(&GPT_LINUX_FS);
    bytes[e2 + 32..e2 + 40].copy_from_slice(&64u64.to_le_bytes());
    with_ext4_magic(&mut bytes, 64 * 512);
    let root = locate_root(&mut image("gpt", &bytes)).unwrap().unwrap();
    assert_eq!(
        root,
        RootLocation {
            offset: 64 * 512,
            partition: Some(2)
        }
    );
    let disk = DiskKernel {
        kernel_name: String::new(),
        kernel: vec![],
        initrd: None,
        root,
    };
    assert_eq!(disk.root_device(), "/dev/vda2");
}

#[test]
fn no_filesystem_and_hostile_tables() {
    assert_eq!(
        locate_root(&mut image("empty", &[0u8; 4096])).unwrap(),
        None
    );
    assert_eq!(locate_root(&mut image("tiny", &[1, 2, 3])).unwrap(), None);
    let mut bytes = vec![0u8; 4096];
    bytes[510] = 0x55;
    bytes[511] = 0xaa;
    bytes[446 + 4] = MBR_GPT_PROTECTIVE;
    bytes[512..520].copy_from_slice(b"EFI PART");
    bytes[512 + 72..512 + 80].copy_from_slice(&u64::MAX.to_le_bytes());
    bytes[512 + 80..512 + 84].copy_from_slice(&u32::MAX.to_le_bytes());
    bytes[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
    assert_eq!(locate_root(&mut image("hostile", &bytes)).unwrap(), None);
}

#[test]
fn partition_at_the_end_of_the_address_space_is_not_a_crash() {
    // Found by the disk_kernel fuzz target: a GPT Linux entry at LBA 2^55 - 1.
    let mut bytes = vec![0u8; 64 * 1024];
    bytes[510] = 0x55;
    bytes[511] = 0xaa;
    bytes[446 + 4] = MBR_GPT_PROTECTIVE;
    bytes[512..520].copy_from_slice(b"EFI PART");
    bytes[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
    bytes[512 + 80..512 + 84].copy_from_slice(&1u32.to_le_bytes());
    bytes[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
    bytes[1024..1040].copy_from_slice(&GPT_LINUX_FS);
    bytes[1024 + 32..1024 + 40].copy_from_slice(&((1u64 << 55) - 1).to_le_bytes());
    assert_eq!(locate_root(&mut image("gpt-end", &bytes)).unwrap(), None);
}

/// A whole-disk image with a superblock carrying the given size fields.
fn superblock_image(name: &str, blocks: u32, log_block_size: u32, per_group: u32) -> File {
    let mut bytes = vec![0u8; 1 << 20];
    with_ext4_magic(&mut bytes, 0);
    bytes[1024 + 4..1024 + 8].copy_from_slice(&blocks.to_le_bytes());
    bytes[1024 + 24..1024 + 28].copy_from_slice(&log_block_size.to_le_bytes());
    bytes[1024 + 32..1024 + 36].copy_from_slice(&per_group.to_le_bytes());
    image(name, &bytes)
}

#[test]
fn superblocks_that_would_make_pvm_allocate_gigabytes_are_refused() {
    // 1 MiB image: 1024 blocks of 1 KiB fit, in groups of 8192.
    assert_eq!(
        check_superblock(&mut superblock_image("ok", 1024, 0, 8192), 0).unwrap(),
        Ok(())
    );
    // Found by the fuzzer: 3 billion blocks in 1-block groups, and 1 GiB blocks.
    let huge = check_superblock(&mut superblock_image("groups", 0xb000_0000, 0, 1), 0).unwrap();
    assert_eq!(huge, Err(SuperblockError::BlocksPerGroup(1)));
    assert!(huge.unwrap_err().to_string().contains("blocks per group"));
    let big = check_superblock(&mut superblock_image("blocks", 1, 20, 8192), 0).unwrap();
    assert!(big.unwrap_err().to_string().contains("block size"));
    let claims =
        check_superblock(&mut superblock_image("claims", 0xb000_0000, 0, 8192), 0).unwrap();
    assert!(claims.unwrap_err().to_string().contains("more than the"));
}

/// The image a fuzz/crashes/disk_kernel input describes (see `disk` in fuzz/src/boot.rs):
/// u32 size, then u32 offset / u16 length / bytes chunks, all little-endian.
fn fuzz_image(name: &str, input: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("pvm-fuzz-{}-{name}", std::process::id()));
    let file = File::create(&path).unwrap();
    let mut rest = input;
    let take = |rest: &mut &[u8], n: usize| {
        let (head, tail) = rest.split_at(n.min(rest.len()));
        *rest = tail;
        head.to_vec()
    };
    let size = u64::from(u32::from_le_bytes(take(&mut rest, 4).try_into().unwrap()));
    file.set_len(size).unwrap();
    while !rest.is_empty() {
        let mut word = take(&mut rest, 4);
        word.resize(4, 0);
        let offset = u64::from(u32::from_le_bytes(word.try_into().unwrap()));
        let mut half = take(&mut rest, 2);
        half.resize(2, 0);
        let len = usize::from(u16::from_le_bytes(half.try_into().unwrap()));
        let bytes = take(&mut rest, len);
        if offset < size {
            let keep = bytes.len().min((size - offset) as usize);
            std::os::unix::fs::FileExt::write_all_at(&file, &bytes[..keep], offset).unwrap();
        }
    }
    path
}

#[test]
fn fuzzer_found_images_are_errors_not_huge_allocations() {
    // s_blocks_count_hi set without INCOMPAT_64BIT: ext4-view counts it anyway.
    let path = fuzz_image(
        "hi",
        include_bytes!("../../../fuzz/crashes/disk_kernel/ext4-blocks-count-hi-without-64bit"),
    );
    let err = find_kernel(&path).unwrap_err().to_string();
    std::fs::remove_file(&path).unwrap();
    assert!(err.contains("more than the"), "{err}");
    // /vmlinuz's inode claims 172 GiB.
    let path = fuzz_image(
        "inode",
        include_bytes!("../../../fuzz/crashes/disk_kernel/ext4-kernel-inode-claims-172-gib"),
    );
    let err = find_kernel(&path).unwrap_err().to_string();
    std::fs::remove_file(&path).unwrap();
    assert!(err.contains("/vmlinuz claims 184683593728 bytes"), "{err}");
}

#[test]
fn symlinks_that_claim_huge_targets_are_refused_before_reading() {
    // /vmlinuz is a symlink whose inode claims a 32 GiB target (fuzzer found, CI run of
    // 2026-12-05): ext4-view would allocate that much while resolving the path.
    let path = fuzz_image(
        "symlink",
        include_bytes!("../../../fuzz/crashes/disk_kernel/ext4-symlink-claims-32-gib"),
    );
    let err = find_kernel(&path).unwrap_err().to_string();
    std::fs::remove_file(&path).unwrap();
    assert!(err.contains("no kernel found"), "{err}");
}

/// An ext4 image made by mkfs.ext4 -d from a tree `build` fills (e2fsprogs, installed by
/// scripts/host-packages).
fn ext4_image(name: &str, build: impl FnOnce(&Path)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pvm-ext4-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    build(&tree);
    let image = dir.join("root.img");
    std::fs::write(&image, vec![0u8; 8 << 20]).unwrap();
    let ok = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&image)
        .status()
        .expect("mkfs.ext4 (e2fsprogs)")
        .success();
    assert!(ok);
    image
}

#[test]
fn symlinks_are_followed_like_linux_follows_them() {
    use std::os::unix::fs::symlink;
    let long = "a-file-name-long-enough-that-its-link-is-not-stored-inline-in-the-inode";
    let image = ext4_image("links", |t| {
        std::fs::create_dir_all(t.join("images/boot")).unwrap();
        std::fs::create_dir_all(t.join("images/deep")).unwrap();
        std::fs::create_dir_all(t.join("real")).unwrap();
        std::fs::write(t.join("images").join(long), b"kernel bytes").unwrap();
        std::fs::write(t.join("images/initrd"), b"initrd bytes").unwrap();
        // /boot -> real/x/../boot with /real/x -> /images/deep: `..` is taken after the
        // link, as Linux takes it, so /boot is /images/boot (not /real/boot).
        symlink("/images/deep", t.join("real/x")).unwrap();
        symlink("real/x/../boot", t.join("boot")).unwrap();
        symlink(format!("../{long}"), t.join("images/boot/vmlinuz-6.1.0")).unwrap();
        symlink("/images/initrd", t.join("images/boot/initrd.img-6.1.0")).unwrap();
    });
    let found = find_kernel(&image).unwrap();
    assert_eq!(found.kernel_name, "/boot/vmlinuz-6.1.0");
    assert_eq!(found.kernel, b"kernel bytes");
    let (initrd_name, initrd) = found.initrd.unwrap();
    assert_eq!(initrd_name, "/boot/initrd.img-6.1.0");
    assert_eq!(initrd, b"initrd bytes");
    std::fs::remove_dir_all(image.parent().unwrap()).unwrap();

    // A loop is "not found", not a hang; a dangling link the same.
    let image = ext4_image("loop", |t| {
        std::fs::create_dir_all(t.join("boot")).unwrap();
        symlink("/vmlinuz.old", t.join("vmlinuz")).unwrap();
        symlink("vmlinuz", t.join("vmlinuz.old")).unwrap();
        symlink("/nowhere", t.join("boot/vmlinuz")).unwrap();
    });
    let err = find_kernel(&image).unwrap_err().to_string();
    assert!(err.contains("no kernel found"), "{err}");
    std::fs::remove_dir_all(image.parent().unwrap()).unwrap();
}

#[test]
fn versions_sort_numerically() {
    assert_eq!(
        compare_versions("6.10.0-1-amd64", "6.9.0-1-amd64"),
        Ordering::Greater
    );
    assert_eq!(
        compare_versions("6.1.0-57-cloud-amd64", "6.1.0-9-cloud-amd64"),
        Ordering::Greater
    );
    assert_eq!(compare_versions("6.1", "6.1"), Ordering::Equal);
}

#[test]
fn missing_kernel_lists_what_was_looked_for() {
    let err = Error::NoKernel {
        path: "root.img".into(),
        location: "the whole disk".into(),
    };
    let text = err.to_string();
    assert!(
        text.contains("--disk root.img")
            && text.contains("/boot/vmlinuz-*")
            && text.contains("/vmlinuz"),
        "{text}"
    );
}

/// `--disk /dev/loopN`: a block device's metadata length is 0, so its size must come from
/// seeking to its end, or the superblock check refuses every filesystem on it. Needs root and
/// losetup (util-linux) to attach the image; elsewhere it says so and checks only the file.
#[test]
fn kernels_are_found_on_block_devices() {
    let image = ext4_image("blockdev", |t| {
        std::fs::create_dir_all(t.join("boot")).unwrap();
        std::fs::write(t.join("boot/vmlinuz-6.1.0"), b"kernel bytes").unwrap();
    });
    assert_eq!(image_len(&File::open(&image).unwrap()).unwrap(), 8 << 20);
    let attached = std::process::Command::new("losetup")
        .args(["--find", "--show", "--read-only"])
        .arg(&image)
        .output();
    let device = match attached {
        Ok(out) if out.status.success() => String::from_utf8(out.stdout).unwrap(),
        other => {
            eprintln!("skipping the loop-device half (needs root and losetup): {other:?}");
            std::fs::remove_dir_all(image.parent().unwrap()).unwrap();
            return;
        }
    };
    let device = Path::new(device.trim());
    let found = find_kernel(device);
    let len = image_len(&File::open(device).unwrap());
    let _ = std::process::Command::new("losetup")
        .arg("-d")
        .arg(device)
        .status();
    std::fs::remove_dir_all(image.parent().unwrap()).unwrap();
    assert_eq!(len.unwrap(), 8 << 20);
    let found = found.unwrap();
    assert_eq!(found.kernel_name, "/boot/vmlinuz-6.1.0");
    assert_eq!(found.kernel, b"kernel bytes");
}

//! Booting the guest's own kernel from its disk image when no --kernel is given: find the root
//! filesystem (ext4 on the whole disk, or the first Linux partition of an MBR or GPT disk), pick
//! the newest kernel in /boot and its matching initrd, and say which device is root.

use std::cmp::Ordering;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use ext4_view::{Ext4, Ext4Read};

const SECTOR: u64 = 512;
const EXT4_MAGIC_OFFSET: u64 = 1024 + 56;
const EXT4_MAGIC: u16 = 0xef53;
const MBR_LINUX: u8 = 0x83;
/// The largest kernel or initrd pvm reads from a disk image. Distribution initrds are tens of
/// MiB; an inode claiming more is refused before anything is allocated for it.
const MAX_BOOT_FILE: u64 = 1 << 30;
/// The longest symlink target followed (Linux's PATH_MAX), and the most links followed while
/// resolving one path (Linux's MAXSYMLINKS).
const MAX_SYMLINK_TARGET: u64 = 4096;
const MAX_SYMLINK_HOPS: usize = 40;
const MBR_GPT_PROTECTIVE: u8 = 0xee;
/// GPT "Linux filesystem data" type GUID 0FC63DAF-8483-4772-8E79-3D69D8477DE4, as stored.
const GPT_LINUX_FS: [u8; 16] = [
    0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4,
];
/// Where kernels are looked for, in order; `*` is a version suffix.
const KERNEL_PATTERNS: [&str; 5] = [
    "/boot/vmlinuz-*",
    "/boot/vmlinux-*",
    "/boot/vmlinuz",
    "/vmlinuz",
    "/boot/bzImage",
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--disk {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "--disk {path}: no ext4 root filesystem (looked at the whole disk and the first Linux partition of an MBR or GPT table)"
    )]
    NoFilesystem { path: PathBuf },
    #[error("--disk {path}: cannot read its ext4 filesystem: {detail}")]
    Ext4 { path: PathBuf, detail: String },
    #[error("--disk {path}: no kernel found on {location} (looked for {})", KERNEL_PATTERNS.join(", "))]
    NoKernel { path: PathBuf, location: String },
}

/// Where the root filesystem sits on the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootLocation {
    /// Byte offset of the filesystem.
    pub offset: u64,
    /// 1-based partition number, or None for a whole-disk filesystem.
    pub partition: Option<u32>,
}

/// What was found: the kernel and initrd contents with their names for messages.
#[derive(Debug)]
pub struct DiskKernel {
    pub kernel_name: String,
    pub kernel: Vec<u8>,
    pub initrd: Option<(String, Vec<u8>)>,
    pub root: RootLocation,
}

impl DiskKernel {
    /// The root= value for the first virtio disk (vda).
    pub fn root_device(&self) -> String {
        match self.root.partition {
            Some(n) => format!("/dev/vda{n}"),
            None => "/dev/vda".to_string(),
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

/// Reads `len` bytes at `offset`; short images read as zeros past their end.
fn read_at(file: &mut File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    // Offsets from a hostile partition table may lie far past the end (or past i64::MAX).
    if offset >= file.metadata()?.len() {
        return Ok(buf);
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut filled = 0;
    while filled < len {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(buf)
}

fn has_ext4_at(file: &mut File, offset: u64) -> std::io::Result<bool> {
    // A hostile partition table can put a partition at the very end of the address space.
    let Some(at) = offset.checked_add(EXT4_MAGIC_OFFSET) else {
        return Ok(false);
    };
    let magic = read_at(file, at, 2)?;
    Ok(u16_at(&magic, 0) == EXT4_MAGIC)
}

/// Checks the superblock's size fields against the space the filesystem can occupy, before
/// ext4-view sizes its tables and caches from them: a hostile image could otherwise make pvm
/// allocate gigabytes (billions of block groups, or 1 GiB blocks). Returns why it is refused.
pub fn check_superblock(file: &mut File, offset: u64) -> std::io::Result<Result<(), String>> {
    let sb = read_at(file, offset.saturating_add(1024), 1024)?;
    let log_block_size = u32_at(&sb, 24);
    // ext4 blocks are 1 KiB to 64 KiB.
    if log_block_size > 6 {
        return Ok(Err(format!(
            "block size 2^{} KiB is out of range",
            log_block_size
        )));
    }
    let block_size = 1024u64 << log_block_size;
    let blocks_per_group = u64::from(u32_at(&sb, 32));
    // mkfs.ext4 never makes groups smaller than 256 blocks; a group bitmap is one block.
    if blocks_per_group < 256 || blocks_per_group > block_size * 8 {
        return Ok(Err(format!(
            "{blocks_per_group} blocks per group is out of range"
        )));
    }
    // The high half counts even without INCOMPAT_64BIT: ext4-view adds it regardless, so a
    // stray value there would otherwise size its group-descriptor table.
    let blocks = u64::from(u32_at(&sb, 4)) | u64::from(u32_at(&sb, 0x150)) << 32;
    let room = file.metadata()?.len().saturating_sub(offset);
    if blocks.saturating_mul(block_size) > room {
        return Ok(Err(format!(
            "it claims {blocks} blocks of {block_size} bytes, more than the {room} bytes it has"
        )));
    }
    Ok(Ok(()))
}

/// Finds the root filesystem: the whole disk, else the first Linux partition (MBR or GPT).
pub fn locate_root(file: &mut File) -> std::io::Result<Option<RootLocation>> {
    if has_ext4_at(file, 0)? {
        return Ok(Some(RootLocation {
            offset: 0,
            partition: None,
        }));
    }
    let mbr = read_at(file, 0, SECTOR as usize)?;
    if mbr[510..512] != [0x55, 0xaa] {
        return Ok(None);
    }
    let entries: Vec<(u8, u64)> = (0..4)
        .map(|i| {
            let e = &mbr[446 + 16 * i..446 + 16 * (i + 1)];
            (e[4], u64::from(u32_at(e, 8)))
        })
        .collect();
    if entries.iter().any(|(kind, _)| *kind == MBR_GPT_PROTECTIVE) {
        return locate_gpt(file);
    }
    for (i, (kind, start)) in entries.iter().enumerate() {
        if *kind == MBR_LINUX && *start > 0 && has_ext4_at(file, start * SECTOR)? {
            return Ok(Some(RootLocation {
                offset: start * SECTOR,
                partition: Some(i as u32 + 1),
            }));
        }
    }
    Ok(None)
}

fn locate_gpt(file: &mut File) -> std::io::Result<Option<RootLocation>> {
    let header = read_at(file, SECTOR, SECTOR as usize)?;
    if &header[0..8] != b"EFI PART" {
        return Ok(None);
    }
    let entries_lba = u64_at(&header, 72);
    // Bounded: a hostile table cannot make pvm read gigabytes.
    let count = u32_at(&header, 80).min(256) as usize;
    let size = u32_at(&header, 84) as usize;
    if !(128..=4096).contains(&size) {
        return Ok(None);
    }
    let table = read_at(file, entries_lba.saturating_mul(SECTOR), count * size)?;
    for i in 0..count {
        let entry = &table[i * size..(i + 1) * size];
        if entry[0..16] == GPT_LINUX_FS {
            let start = u64_at(entry, 32).saturating_mul(SECTOR);
            if has_ext4_at(file, start)? {
                return Ok(Some(RootLocation {
                    offset: start,
                    partition: Some(i as u32 + 1),
                }));
            }
        }
    }
    Ok(None)
}

/// Orders version strings so that "6.10" sorts after "6.9".
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let parts = |s: &str| -> Vec<(u64, String)> {
        s.split(['.', '-', '_'])
            .map(|p| {
                let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
                (digits.parse().unwrap_or(0), p[digits.len()..].to_string())
            })
            .collect()
    };
    parts(a).cmp(&parts(b))
}

/// The ext4 filesystem at an offset of the image.
struct Partition {
    file: File,
    offset: u64,
}

impl Ext4Read for Partition {
    fn read(
        &mut self,
        start: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.file.seek(SeekFrom::Start(self.offset + start))?;
        self.file.read_exact(dst)?;
        Ok(())
    }
}

/// Resolves `path` (absolute) to a path with no symlink in it, reading each link only after
/// checking the length its inode claims. ext4-view's own resolution allocates whatever length a
/// link claims, so nothing else in this file hands it a path that still holds a symlink.
fn resolve(fs: &Ext4, path: &str) -> Result<String, String> {
    let mut resolved: Vec<String> = Vec::new();
    let mut pending: Vec<String> = path.rsplit('/').map(str::to_string).collect();
    let mut hops = 0;
    let joined = |parts: &[String]| format!("/{}", parts.join("/"));
    while let Some(part) = pending.pop() {
        match part.as_str() {
            "" | "." => continue,
            ".." => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        resolved.push(part);
        let here = joined(&resolved);
        let meta = fs
            .symlink_metadata(here.as_str())
            .map_err(|e| format!("{here}: {e}"))?;
        if !meta.is_symlink() {
            continue;
        }
        hops += 1;
        if hops > MAX_SYMLINK_HOPS {
            return Err(format!(
                "{path}: more than {MAX_SYMLINK_HOPS} symlinks to follow"
            ));
        }
        if meta.len() > MAX_SYMLINK_TARGET {
            return Err(format!(
                "{here}: symlink claims a {} byte target, more than {MAX_SYMLINK_TARGET}",
                meta.len()
            ));
        }
        let target = fs
            .read_link(here.as_str())
            .map_err(|e| format!("{here}: {e}"))?;
        let target = target
            .to_str()
            .map_err(|_| format!("{here}: symlink target is not UTF-8"))?
            .to_string();
        resolved.pop();
        if target.starts_with('/') {
            resolved.clear();
        }
        pending.extend(target.rsplit('/').map(str::to_string));
    }
    Ok(joined(&resolved))
}

/// Whether `path` names something, following symlinks with [`resolve`].
fn exists(fs: &Ext4, path: &str) -> bool {
    resolve(fs, path).is_ok()
}

/// Looks in `image` for a kernel (and its initrd) to boot.
pub fn find_kernel(image: &Path) -> Result<DiskKernel, Error> {
    let io = |source| Error::Io {
        path: image.to_path_buf(),
        source,
    };
    let mut file = File::open(image).map_err(io)?;
    let root = locate_root(&mut file)
        .map_err(io)?
        .ok_or_else(|| Error::NoFilesystem {
            path: image.to_path_buf(),
        })?;
    let ext4_err = |e: ext4_view::Ext4Error| Error::Ext4 {
        path: image.to_path_buf(),
        detail: e.to_string(),
    };
    if let Err(detail) = check_superblock(&mut file, root.offset).map_err(io)? {
        return Err(Error::Ext4 {
            path: image.to_path_buf(),
            detail,
        });
    }
    let fs_room = file
        .metadata()
        .map_err(io)?
        .len()
        .saturating_sub(root.offset);
    let fs = Ext4::load(Box::new(Partition {
        file,
        offset: root.offset,
    }))
    .map_err(ext4_err)?;
    let location = match root.partition {
        Some(n) => format!("partition {n}"),
        None => "the whole disk".to_string(),
    };
    let boot_dir = resolve(&fs, "/boot");
    let boot_names: Vec<String> = match boot_dir.as_deref().map(|dir| fs.read_dir(dir)) {
        Ok(Ok(dir)) => dir
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().as_str().ok().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    let mut versioned: Vec<(&str, &str)> = boot_names
        .iter()
        .filter_map(|n| {
            n.strip_prefix("vmlinuz-")
                .or_else(|| n.strip_prefix("vmlinux-"))
                .map(|v| (n.as_str(), v))
        })
        .collect();
    versioned.sort_by(|a, b| compare_versions(a.1, b.1));
    let (kernel_path, version) = match versioned.last() {
        Some((name, version)) => (format!("/boot/{name}"), Some(version.to_string())),
        None => {
            let found = KERNEL_PATTERNS[2..].iter().find(|p| exists(&fs, p));
            match found {
                Some(path) => (path.to_string(), None),
                None => {
                    return Err(Error::NoKernel {
                        path: image.to_path_buf(),
                        location,
                    });
                }
            }
        }
    };
    // ext4-view allocates the size an inode claims before reading a byte of it, so the claim
    // is checked first: no larger than the filesystem's room in the image, nor MAX_BOOT_FILE.
    let room = fs_room;
    let read_bounded = |path: &str| -> Result<Vec<u8>, Error> {
        let real = resolve(&fs, path).map_err(|detail| Error::Ext4 {
            path: image.to_path_buf(),
            detail,
        })?;
        let len = fs.symlink_metadata(real.as_str()).map_err(ext4_err)?.len();
        let limit = room.min(MAX_BOOT_FILE);
        if len > limit {
            return Err(Error::Ext4 {
                path: image.to_path_buf(),
                detail: format!("{path} claims {len} bytes, more than the {limit} pvm reads"),
            });
        }
        fs.read(real.as_str()).map_err(ext4_err)
    };
    let kernel = read_bounded(kernel_path.as_str())?;
    let initrd_candidates: Vec<String> = match &version {
        Some(v) => vec![
            format!("/boot/initrd.img-{v}"),
            format!("/boot/initramfs-{v}.img"),
            format!("/boot/initrd-{v}"),
        ],
        None => vec!["/boot/initrd.img".to_string(), "/initrd.img".to_string()],
    };
    let mut initrd = None;
    for candidate in initrd_candidates {
        if exists(&fs, &candidate) {
            initrd = Some((candidate.clone(), read_bounded(candidate.as_str())?));
            break;
        }
    }
    Ok(DiskKernel {
        kernel_name: kernel_path,
        kernel,
        initrd,
        root,
    })
}

#[cfg(test)]
mod tests {
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
        assert!(huge.unwrap_err().contains("blocks per group"));
        let big = check_superblock(&mut superblock_image("blocks", 1, 20, 8192), 0).unwrap();
        assert!(big.unwrap_err().contains("block size"));
        let claims =
            check_superblock(&mut superblock_image("claims", 0xb000_0000, 0, 8192), 0).unwrap();
        assert!(claims.unwrap_err().contains("more than the"));
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
            include_bytes!("../../fuzz/crashes/disk_kernel/ext4-blocks-count-hi-without-64bit"),
        );
        let err = find_kernel(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains("more than the"), "{err}");
        // /vmlinuz's inode claims 172 GiB.
        let path = fuzz_image(
            "inode",
            include_bytes!("../../fuzz/crashes/disk_kernel/ext4-kernel-inode-claims-172-gib"),
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
            include_bytes!("../../fuzz/crashes/disk_kernel/ext4-symlink-claims-32-gib"),
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
}

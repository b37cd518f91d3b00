//! Booting the guest's own kernel from its disk image when no --kernel is given: find the root
//! filesystem (ext4 on the whole disk, or the first Linux partition of an MBR or GPT disk), pick
//! the newest kernel in /boot and its matching initrd, and say which device is root.

use std::cmp::Ordering;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
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
    #[error("--disk {path}: cannot read its ext4 filesystem: {source}")]
    Ext4 {
        path: PathBuf,
        source: ext4_view::Ext4Error,
    },
    #[error("--disk {path}: cannot read its ext4 filesystem: {source}")]
    Superblock {
        path: PathBuf,
        source: SuperblockError,
    },
    #[error("--disk {path}: cannot read its ext4 filesystem: {source}")]
    Resolve { path: PathBuf, source: ResolveError },
    #[error(
        "--disk {path}: cannot read its ext4 filesystem: {file} claims {len} bytes, more than the {limit} pvm reads"
    )]
    TooLarge {
        path: PathBuf,
        file: String,
        len: u64,
        limit: u64,
    },
    #[error("--disk {path}: no kernel found on {location} (looked for {})", KERNEL_PATTERNS.join(", "))]
    NoKernel { path: PathBuf, location: String },
}

/// Why a superblock's size fields are refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    #[error("block size 2^{0} KiB is out of range")]
    BlockSize(u32),
    #[error("{0} blocks per group is out of range")]
    BlocksPerGroup(u64),
    #[error("it claims {blocks} blocks of {block_size} bytes, more than the {room} bytes it has")]
    TooManyBlocks {
        blocks: u64,
        block_size: u64,
        room: u64,
    },
}

/// Why a path in the filesystem could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{path}: {source}")]
    Lookup {
        path: String,
        source: ext4_view::Ext4Error,
    },
    #[error("{0}: more than {MAX_SYMLINK_HOPS} symlinks to follow")]
    TooManyLinks(String),
    #[error("{path}: symlink claims a {len} byte target, more than {MAX_SYMLINK_TARGET}")]
    TargetTooLong { path: String, len: u64 },
    #[error("{0}: symlink target is not UTF-8")]
    NotUtf8(String),
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

/// The image's size in bytes. A block device (`--disk /dev/vdb`) reports a metadata length of 0;
/// seeking to its end gives its size, as the kernel's BLKGETSIZE64 would.
fn image_len(file: &File) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut file = file;
        file.seek(SeekFrom::End(0))
    } else {
        Ok(meta.len())
    }
}

/// Reads `len` bytes at `offset`; short images read as zeros past their end.
fn read_at(file: &mut File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    // Offsets from a hostile partition table may lie far past the end (or past i64::MAX).
    if offset >= image_len(file)? {
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
pub fn check_superblock(
    file: &mut File,
    offset: u64,
) -> std::io::Result<Result<(), SuperblockError>> {
    let sb = read_at(file, offset.saturating_add(1024), 1024)?;
    let log_block_size = u32_at(&sb, 24);
    // ext4 blocks are 1 KiB to 64 KiB.
    if log_block_size > 6 {
        return Ok(Err(SuperblockError::BlockSize(log_block_size)));
    }
    let block_size = 1024u64 << log_block_size;
    let blocks_per_group = u64::from(u32_at(&sb, 32));
    // mkfs.ext4 never makes groups smaller than 256 blocks; a group bitmap is one block.
    if blocks_per_group < 256 || blocks_per_group > block_size * 8 {
        return Ok(Err(SuperblockError::BlocksPerGroup(blocks_per_group)));
    }
    // The high half counts even without INCOMPAT_64BIT: ext4-view adds it regardless, so a
    // stray value there would otherwise size its group-descriptor table.
    let blocks = u64::from(u32_at(&sb, 4)) | u64::from(u32_at(&sb, 0x150)) << 32;
    let room = image_len(file)?.saturating_sub(offset);
    if blocks.saturating_mul(block_size) > room {
        return Ok(Err(SuperblockError::TooManyBlocks {
            blocks,
            block_size,
            room,
        }));
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
fn resolve(fs: &Ext4, path: &str) -> Result<String, ResolveError> {
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
        let lookup = |source| ResolveError::Lookup {
            path: here.clone(),
            source,
        };
        let meta = fs.symlink_metadata(here.as_str()).map_err(lookup)?;
        if !meta.is_symlink() {
            continue;
        }
        hops += 1;
        if hops > MAX_SYMLINK_HOPS {
            return Err(ResolveError::TooManyLinks(path.to_string()));
        }
        if meta.len() > MAX_SYMLINK_TARGET {
            return Err(ResolveError::TargetTooLong {
                path: here,
                len: meta.len(),
            });
        }
        let target = fs.read_link(here.as_str()).map_err(lookup)?;
        let target = target
            .to_str()
            .map_err(|_| ResolveError::NotUtf8(here.clone()))?
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
    let (file, root) = open_root(image)?;
    let fs = BootFs::load(image, file, root)?;
    let (kernel_name, version) = fs.kernel_path(root)?;
    let kernel = fs.read(&kernel_name)?;
    let initrd = match fs.initrd_path(version.as_deref()) {
        Some(name) => {
            let bytes = fs.read(&name)?;
            Some((name, bytes))
        }
        None => None,
    };
    Ok(DiskKernel {
        kernel_name,
        kernel,
        initrd,
        root,
    })
}

fn io_error(image: &Path) -> impl Fn(std::io::Error) -> Error {
    move |source| Error::Io {
        path: image.to_path_buf(),
        source,
    }
}

/// Opens `image` and finds its root filesystem.
fn open_root(image: &Path) -> Result<(File, RootLocation), Error> {
    let io = io_error(image);
    let mut file = File::open(image).map_err(&io)?;
    let root = locate_root(&mut file)
        .map_err(&io)?
        .ok_or_else(|| Error::NoFilesystem {
            path: image.to_path_buf(),
        })?;
    Ok((file, root))
}

/// The root filesystem of a disk image, read with bounds a hostile image cannot move.
struct BootFs<'a> {
    image: &'a Path,
    fs: Ext4,
    /// The bytes from the filesystem's start to the end of the image: no file in it is larger.
    room: u64,
}

impl<'a> BootFs<'a> {
    /// Checks the superblock's size fields, then lets ext4-view load the filesystem.
    fn load(image: &'a Path, mut file: File, root: RootLocation) -> Result<Self, Error> {
        let io = io_error(image);
        if let Err(source) = check_superblock(&mut file, root.offset).map_err(&io)? {
            return Err(Error::Superblock {
                path: image.to_path_buf(),
                source,
            });
        }
        let room = image_len(&file).map_err(&io)?.saturating_sub(root.offset);
        let fs = Ext4::load(Box::new(Partition {
            file,
            offset: root.offset,
        }))
        .map_err(|e| ext4_error(image, e))?;
        Ok(BootFs { image, fs, room })
    }

    /// The kernel to boot and its version: the newest versioned kernel in /boot, else the
    /// first unversioned one of [`KERNEL_PATTERNS`].
    fn kernel_path(&self, root: RootLocation) -> Result<(String, Option<String>), Error> {
        if let Some((name, version)) = self.newest_versioned_kernel() {
            return Ok((format!("/boot/{name}"), Some(version)));
        }
        match KERNEL_PATTERNS[2..].iter().find(|p| exists(&self.fs, p)) {
            Some(path) => Ok((path.to_string(), None)),
            None => Err(Error::NoKernel {
                path: self.image.to_path_buf(),
                location: match root.partition {
                    Some(n) => format!("partition {n}"),
                    None => "the whole disk".to_string(),
                },
            }),
        }
    }

    /// The `vmlinuz-VERSION` or `vmlinux-VERSION` in /boot with the highest version.
    fn newest_versioned_kernel(&self) -> Option<(String, String)> {
        let boot_dir = resolve(&self.fs, "/boot").ok()?;
        let names: Vec<String> = self
            .fs
            .read_dir(boot_dir.as_str())
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().as_str().ok().map(str::to_string))
            .collect();
        names
            .iter()
            .filter_map(|n| {
                n.strip_prefix("vmlinuz-")
                    .or_else(|| n.strip_prefix("vmlinux-"))
                    .map(|v| (n.clone(), v.to_string()))
            })
            .max_by(|a, b| compare_versions(&a.1, &b.1))
    }

    /// The initrd that goes with the kernel of `version` (or with an unversioned kernel).
    fn initrd_path(&self, version: Option<&str>) -> Option<String> {
        let candidates: Vec<String> = match version {
            Some(v) => vec![
                format!("/boot/initrd.img-{v}"),
                format!("/boot/initramfs-{v}.img"),
                format!("/boot/initrd-{v}"),
            ],
            None => vec!["/boot/initrd.img".to_string(), "/initrd.img".to_string()],
        };
        candidates.into_iter().find(|c| exists(&self.fs, c))
    }

    /// Reads the file at `path`. ext4-view allocates the size an inode claims before reading a
    /// byte of it, so the claim is checked first: no larger than the filesystem's room in the
    /// image, nor [`MAX_BOOT_FILE`].
    fn read(&self, path: &str) -> Result<Vec<u8>, Error> {
        let real = resolve(&self.fs, path).map_err(|source| Error::Resolve {
            path: self.image.to_path_buf(),
            source,
        })?;
        let ext4 = |e| ext4_error(self.image, e);
        let len = self.fs.symlink_metadata(real.as_str()).map_err(ext4)?.len();
        let limit = self.room.min(MAX_BOOT_FILE);
        if len > limit {
            return Err(Error::TooLarge {
                path: self.image.to_path_buf(),
                file: path.to_string(),
                len,
                limit,
            });
        }
        self.fs.read(real.as_str()).map_err(ext4)
    }
}

fn ext4_error(image: &Path, source: ext4_view::Ext4Error) -> Error {
    Error::Ext4 {
        path: image.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests;

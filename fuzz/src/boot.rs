//! pvm's boot path on hostile files: the kernel/initrd loader (`pvm::boot::load`) and the
//! disk-image kernel finder (`pvm::boot::disk`). Both read files a user (or, for disk boot, the
//! guest's own disk) supplies, so any bytes must end in a value or an error, never a panic.

use std::os::unix::fs::FileExt;

use pvm::boot::{self, EntryMode};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::input::{Input, Output};
use crate::queue::ScratchFile;

/// Guest sizes the loader target picks from: small, medium, large and one above the MMIO gap
/// (RAM split around 3-4 GiB). Mappings are lazy, so only touched pages cost anything.
pub const MEM_SIZES: [u64; 4] = [16 << 20, 64 << 20, 1 << 30, (3 << 30) + (64 << 20)];

/// Input flag bits of the loader target.
pub const BOOT_INITRD: u8 = 1 << 2;
pub const BOOT_CMDLINE: u8 = 1 << 3;

/// ```text
/// u8  flags: bits 0-1 guest memory size (MEM_SIZES), bit 2 an initrd follows, bit 3 a user
///     command line follows
/// [u16 initrd length, the initrd bytes]   if bit 2
/// [u8 length, command line bytes]         if bit 3
/// ...  the kernel file (ELF vmlinux, bzImage or anything else)
/// ```
pub fn load(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let mem_bytes = MEM_SIZES[usize::from(flags & 3)];
    let initrd = (flags & BOOT_INITRD != 0).then(|| {
        let len = usize::from(input.u16());
        input.bytes(len)
    });
    let user = if flags & BOOT_CMDLINE != 0 {
        let len = usize::from(input.u8());
        String::from_utf8_lossy(input.bytes(len)).into_owned()
    } else {
        String::new()
    };
    let kernel = input.rest();

    let cmdline = match boot::build_cmdline("console=ttyS0 reboot=k panic=-1", &user) {
        Ok(cmdline) => cmdline,
        // Refused (e.g. a NUL byte or too long): load with pvm's part alone.
        Err(_) => boot::build_cmdline("console=ttyS0 reboot=k panic=-1", "").unwrap(),
    };
    let (kernel_file, mut kfile) = ScratchFile::new("kernel", kernel);
    let probed = boot::probe_kernel(&kernel_file.path);
    let mut initrd_files = initrd.map(|bytes| ScratchFile::new("initrd", bytes));
    let ranges: Vec<(GuestAddress, usize)> = pvm::layout::ram_ranges(mem_bytes)
        .into_iter()
        .map(|(start, len)| (start, len as usize))
        .collect();
    let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).expect("guest memory");
    let loaded = boot::load(
        &mem,
        (&mut kfile, &kernel_file.path),
        initrd_files
            .as_mut()
            .map(|(f, file)| (file, f.path.as_path())),
        &cmdline,
        mem_bytes,
        GuestAddress(pvm::layout::ACPI_START),
    );
    if crate::devices::trace() {
        eprintln!("probe: {probed:?}; load: {loaded:?}");
    }
    match loaded {
        Ok(entry) => {
            assert!(
                probed.is_ok(),
                "load accepted a kernel probe_kernel refused"
            );
            match entry.mode {
                // The loaders refuse a 64-bit entry (ELF e_entry, bzImage code32_start) below
                // high memory.
                EntryMode::Linux64 => assert!(
                    entry.entry.0 >= pvm::layout::HIMEM_START,
                    "64-bit entry {:#x} below high memory",
                    entry.entry.0
                ),
                // The PVH note holds a 32-bit physical address the kernel vouches for.
                EntryMode::Pvh => assert!(entry.entry.0 <= u64::from(u32::MAX)),
            }
        }
        Err(e) => {
            // What the user would see.
            assert!(!e.to_string().is_empty());
        }
    }
    // The e820 map of any size is ordered and non-overlapping.
    let e820 = boot::e820_map(mem_bytes);
    for pair in e820.windows(2) {
        assert!(
            pair[0].0 + pair[0].1 <= pair[1].0,
            "e820 overlap: {e820:x?}"
        );
    }
}

/// The disk image size limit of the finder target.
pub const MAX_DISK_BYTES: u64 = 64 << 20;

/// The image is sparse: the input says where its nonzero bytes are, so a fuzz input of a few
/// KiB describes a partition table and an ext4 filesystem megabytes apart.
///
/// ```text
/// u32 image size (at most MAX_DISK_BYTES)
/// repeated: u32 offset, u16 length, the bytes (written at offset, clipped to the image)
/// ```
pub fn disk(data: &[u8]) {
    let mut input = Input::new(data);
    let size = u64::from(input.u32()).min(MAX_DISK_BYTES);
    let (image, file) = ScratchFile::new("image", &[]);
    file.set_len(size).expect("sparse image");
    while !input.is_empty() {
        let offset = u64::from(input.u32());
        let len = usize::from(input.u16());
        let bytes = input.bytes(len);
        if offset >= size {
            continue;
        }
        let keep = bytes.len().min((size - offset) as usize);
        file.write_all_at(&bytes[..keep], offset)
            .expect("image write");
    }
    let mut reader = std::fs::File::open(&image.path).expect("image");
    let root = boot::disk::locate_root(&mut reader).expect("reading a local file");
    if let Some(root) = root {
        assert!(
            root.offset < size,
            "root at {:#x} past the image end",
            root.offset
        );
        assert!(root.partition.is_none_or(|n| (1..=256).contains(&n)));
    }
    let found = boot::disk::find_kernel(&image.path);
    if crate::devices::trace() {
        match &found {
            Ok(k) => eprintln!(
                "root {root:?}: kernel {} ({} bytes), initrd {:?}",
                k.kernel_name,
                k.kernel.len(),
                k.initrd.as_ref().map(|(name, bytes)| (name, bytes.len()))
            ),
            Err(e) => eprintln!("root {root:?}: {e}"),
        }
    }
    match found {
        Ok(found) => {
            assert_eq!(
                Some(found.root),
                root,
                "find_kernel and locate_root disagree"
            );
            assert!(found.kernel_name.starts_with('/'));
            let device = found.root_device();
            assert!(device.starts_with("/dev/vda"), "{device}");
        }
        Err(e) => {
            if root.is_some() {
                assert!(
                    !matches!(e, boot::disk::Error::NoFilesystem { .. }),
                    "locate_root found a filesystem, find_kernel did not"
                );
            }
        }
    }
}

/// Encodes a sparse disk image for [`disk`] from its full contents: every 512-byte block that
/// is not all zeros becomes one chunk (adjacent ones merged).
pub fn encode_sparse(image: &[u8]) -> Vec<u8> {
    let mut out = Output::default();
    out.u32(image.len() as u32);
    let mut block = 0;
    let blocks = image.len().div_ceil(512);
    let nonzero = |b: usize| {
        image[b * 512..((b + 1) * 512).min(image.len())]
            .iter()
            .any(|&x| x != 0)
    };
    while block < blocks {
        if !nonzero(block) {
            block += 1;
            continue;
        }
        let first = block;
        // At most 127 blocks per chunk, so its length fits the u16.
        while block < blocks && nonzero(block) && block - first < 127 {
            block += 1;
        }
        let start = first * 512;
        let end = (block * 512).min(image.len());
        out.u32(start as u32)
            .u16((end - start) as u16)
            .bytes(&image[start..end]);
    }
    out.data
}

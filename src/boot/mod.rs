//! Loading the guest kernel (linux-loader): ELF vmlinux entered through its PVH note when it has
//! one, else at its 64-bit entry; bzImage through the 64-bit boot protocol. Then the initrd, the
//! command line, the e820 map and either `boot_params` (zero page) or PVH `hvm_start_info`.

pub mod acpi;
pub mod disk;
pub mod regs;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;
pub use regs::EntryMode;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// bzImage: the 64-bit entry point sits 0x200 bytes into the protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Highest initrd end when the kernel does not say (ELF vmlinux has no setup header).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--kernel {0}: not an ELF vmlinux or a bzImage (no ELF magic, no HdrS boot header)")]
    UnknownKernelFormat(PathBuf),
    #[error("--kernel {path}: cannot load it: {source}")]
    LoadKernel {
        path: PathBuf,
        source: loader::Error,
    },
    #[error("--initrd {path}: {source}")]
    OpenInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--initrd {path}: {size} bytes do not fit in guest memory after the kernel")]
    InitrdTooLarge { path: PathBuf, size: u64 },
    #[error("--initrd {path}: cannot copy it into guest memory: {source}")]
    LoadInitrd {
        path: PathBuf,
        source: vm_memory::GuestMemoryError,
    },
    #[error("the kernel command line is invalid or longer than {max} bytes: {source}")]
    Cmdline {
        max: usize,
        source: linux_loader::cmdline::Error,
    },
    #[error("cannot write the kernel command line: {0}")]
    WriteCmdline(loader::Error),
    #[error("cannot write the boot parameters: {0}")]
    BootParams(linux_loader::configurator::Error),
    #[error(transparent)]
    Regs(#[from] regs::Error),
}

impl Error {
    /// True when a file the user named (--kernel, --initrd) or the user's --cmdline is at fault;
    /// false when writing the guest's boot state failed.
    pub fn is_usage(&self) -> bool {
        match self {
            Error::OpenKernel { .. }
            | Error::UnknownKernelFormat(_)
            | Error::LoadKernel { .. }
            | Error::OpenInitrd { .. }
            | Error::InitrdTooLarge { .. }
            | Error::Cmdline { .. } => true,
            Error::LoadInitrd { .. }
            | Error::WriteCmdline(_)
            | Error::BootParams(_)
            | Error::Regs(_) => false,
        }
    }
}

/// What the boot vCPU needs to start the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    pub mode: EntryMode,
    pub entry: GuestAddress,
}

/// The kernel formats pvm recognises by their magic bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KernelFormat {
    Elf,
    BzImage,
}

fn kernel_format(file: &mut File) -> std::io::Result<Option<KernelFormat>> {
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0))?;
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    file.seek(SeekFrom::Start(0))?;
    if filled >= 4 && head[..4] == *b"\x7fELF" {
        Ok(Some(KernelFormat::Elf))
    } else if filled == head.len() && head[0x202..0x206] == *b"HdrS" {
        Ok(Some(KernelFormat::BzImage))
    } else {
        Ok(None)
    }
}

/// The e820 map for `mem_bytes` of RAM: low RAM up to the EBDA, the BIOS area reserved (ACPI
/// tables live there), RAM from 1 MiB, and RAM above 4 GiB when there is more than 3 GiB.
pub fn e820_map(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, layout::EBDA_START, E820_RAM),
        (
            layout::EBDA_START,
            layout::HIMEM_START - layout::EBDA_START,
            E820_RESERVED,
        ),
    ];
    for (start, size) in layout::ram_ranges(mem_bytes) {
        let end = start.0 + size;
        let start = start.0.max(layout::HIMEM_START);
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// pvm's part of the kernel command line, then the user's.
pub fn build_cmdline(pvm_part: &str, user_part: &str) -> Result<Cmdline, Error> {
    let max = layout::CMDLINE_MAX_SIZE;
    let mut cmdline = Cmdline::new(max).map_err(|source| Error::Cmdline { max, source })?;
    for part in [pvm_part, user_part] {
        if !part.trim().is_empty() {
            cmdline
                .insert_str(part.trim())
                .map_err(|source| Error::Cmdline { max, source })?;
        }
    }
    Ok(cmdline)
}

/// Checks that `path` opens and looks like a kernel pvm can load, before any VM work starts.
pub fn probe_kernel(path: &Path) -> Result<(), Error> {
    let open_err = |source| Error::OpenKernel {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    kernel_format(&mut file)
        .map_err(open_err)?
        .map(|_| ())
        .ok_or_else(|| Error::UnknownKernelFormat(path.to_path_buf()))
}

/// Loads kernel, initrd and command line, and writes boot parameters and boot tables.
/// `kernel_path` and the initrd's path only name the files in messages.
pub fn load(
    mem: &GuestMemoryMmap,
    kernel: (&mut File, &Path),
    initrd: Option<(&mut File, &Path)>,
    cmdline: &Cmdline,
    mem_bytes: u64,
    rsdp: GuestAddress,
) -> Result<BootEntry, Error> {
    let (file, kernel_path) = kernel;
    let open_err = |source| Error::OpenKernel {
        path: kernel_path.to_path_buf(),
        source,
    };
    let format = kernel_format(file)
        .map_err(open_err)?
        .ok_or_else(|| Error::UnknownKernelFormat(kernel_path.to_path_buf()))?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let load_err = |source| Error::LoadKernel {
        path: kernel_path.to_path_buf(),
        source,
    };
    let (result, entry) = match format {
        KernelFormat::Elf => {
            let result = Elf::load(mem, None, file, himem).map_err(load_err)?;
            let entry = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => BootEntry {
                    mode: EntryMode::Pvh,
                    entry: addr,
                },
                _ => BootEntry {
                    mode: EntryMode::Linux64,
                    entry: result.kernel_load,
                },
            };
            (result, entry)
        }
        KernelFormat::BzImage => {
            let result = BzImage::load(mem, None, file, himem).map_err(load_err)?;
            let entry = GuestAddress(result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET);
            (
                result,
                BootEntry {
                    mode: EntryMode::Linux64,
                    entry,
                },
            )
        }
    };
    // A bzImage decompresses in place and needs init_size bytes from where it was loaded.
    let kernel_end = match result.setup_header {
        Some(h) => result
            .kernel_end
            .max(result.kernel_load.0 + u64::from(h.init_size)),
        None => result.kernel_end,
    };
    let initrd_max = result
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let initrd = match initrd {
        Some((file, path)) => Some(load_initrd(
            mem, file, path, mem_bytes, initrd_max, kernel_end,
        )?),
        None => None,
    };
    loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), cmdline)
        .map_err(Error::WriteCmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0) as u32;
    let e820 = e820_map(mem_bytes);
    match entry.mode {
        EntryMode::Pvh => write_pvh_info(mem, &e820, initrd, rsdp)?,
        EntryMode::Linux64 => {
            write_zero_page(mem, result.setup_header, &e820, initrd, cmdline_len, rsdp)?
        }
    }
    regs::write_boot_tables(mem, entry.mode)?;
    Ok(entry)
}

/// Copies the initrd to the highest page-aligned address below both the end of low RAM and the
/// kernel's limit; returns (address, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    file: &mut File,
    path: &Path,
    mem_bytes: u64,
    initrd_max: u64,
    kernel_end: u64,
) -> Result<(GuestAddress, u64), Error> {
    let open_err = |source| Error::OpenInitrd {
        path: path.to_path_buf(),
        source,
    };
    let size = file.metadata().map_err(open_err)?.len();
    // Load from the start, whoever read the file before.
    file.seek(SeekFrom::Start(0)).map_err(open_err)?;
    let low_ram_end = mem_bytes.min(layout::MMIO_GAP_START);
    let top = low_ram_end.min(initrd_max.saturating_add(1));
    let addr = top.checked_sub(size).map(|a| a & !0xfff);
    let addr = match addr {
        Some(addr) if addr >= kernel_end => addr,
        _ => {
            return Err(Error::InitrdTooLarge {
                path: path.to_path_buf(),
                size,
            });
        }
    };
    mem.read_exact_volatile_from(GuestAddress(addr), file, size as usize)
        .map_err(|source| Error::LoadInitrd {
            path: path.to_path_buf(),
            source,
        })?;
    Ok((GuestAddress(addr), size))
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    e820: &[(u64, u64, u32)],
    initrd: Option<(GuestAddress, u64)>,
    cmdline_len: u32,
    rsdp: GuestAddress,
) -> Result<(), Error> {
    let mut params = boot_params::default();
    match header {
        Some(h) => params.hdr = h,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr.0 as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp.0;
    for (i, (addr, size, type_)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = e820.len() as u8;
    let boot = BootParams::new::<boot_params>(&params, GuestAddress(layout::ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&boot, mem)
        .map_err(Error::BootParams)
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    e820: &[(u64, u64, u32)],
    initrd: Option<(GuestAddress, u64)>,
    rsdp: GuestAddress,
) -> Result<(), Error> {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        rsdp_paddr: rsdp.0,
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut boot = BootParams::new::<hvm_start_info>(&info, GuestAddress(layout::PVH_INFO_START));
    if let Some((addr, size)) = initrd {
        // The module list goes after the memory map.
        let modlist = layout::PVH_MEMMAP_START
            + (memmap.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        info.nr_modules = 1;
        info.modlist_paddr = modlist;
        boot = BootParams::new::<hvm_start_info>(&info, GuestAddress(layout::PVH_INFO_START));
        let module = hvm_modlist_entry {
            paddr: addr.0,
            size,
            ..Default::default()
        };
        boot.set_modules(&[module], GuestAddress(modlist));
    }
    boot.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&boot, mem).map_err(Error::BootParams)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_small_guest() {
        let map = e820_map(512 << 20);
        assert_eq!(
            map,
            vec![
                (0, layout::EBDA_START, E820_RAM),
                (
                    layout::EBDA_START,
                    layout::HIMEM_START - layout::EBDA_START,
                    E820_RESERVED
                ),
                (
                    layout::HIMEM_START,
                    (512 << 20) - layout::HIMEM_START,
                    E820_RAM
                ),
            ]
        );
    }

    #[test]
    fn e820_large_guest_skips_the_mmio_gap() {
        let map = e820_map(5 << 30);
        assert_eq!(
            map[2],
            (
                layout::HIMEM_START,
                layout::MMIO_GAP_START - layout::HIMEM_START,
                E820_RAM
            )
        );
        assert_eq!(
            map[3],
            (1 << 32, (5 << 30) - layout::MMIO_GAP_START, E820_RAM)
        );
        assert_eq!(map.len(), 4);
    }

    #[test]
    fn cmdline_puts_pvm_first_and_rejects_overlong() {
        let c = build_cmdline("console=ttyS0 reboot=k", "quiet").unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 reboot=k quiet"
        );
        let long = "x".repeat(layout::CMDLINE_MAX_SIZE);
        assert!(build_cmdline("console=ttyS0", &long).is_err());
    }

    #[test]
    fn garbage_kernel_is_rejected_by_format() {
        let dir = std::env::temp_dir().join(format!("pvm-boot-test-{}", std::process::id()));
        std::fs::write(&dir, b"this is not a kernel at all").unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let cmdline = build_cmdline("console=ttyS0", "").unwrap();
        let mut file = File::open(&dir).unwrap();
        let err = load(
            &mem,
            (&mut file, &dir),
            None,
            &cmdline,
            64 << 20,
            GuestAddress(0),
        )
        .unwrap_err();
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(err, Error::UnknownKernelFormat(_)), "{err}");
        assert!(err.to_string().starts_with("--kernel "));
    }
}

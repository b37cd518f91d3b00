//! The initramfs's programs: pvm's own binary as /init, with exactly the shared objects it has
//! mapped (from /proc/self/maps) and its ELF interpreter at the path its PT_INTERP names. pvm
//! is dynamically linked and the guest boots the host's kernel, so the host's own loader and
//! libraries are the ones that fit; no second, static build of an init is needed.

use std::path::{Path, PathBuf};

const PT_INTERP: u32 = 3;

/// The shared objects mapped in a process, from its /proc/PID/maps text: every file-backed
/// mapping whose name has ".so" in it, except `exe`, each once, in the order seen.
pub fn mapped_libraries(maps: &str, exe: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path (the path may hold spaces)
        let path = line
            .splitn(6, ' ')
            .nth(5)
            .map(str::trim_start)
            .unwrap_or("");
        if !path.starts_with('/') || path.ends_with(" (deleted)") {
            continue;
        }
        let path = PathBuf::from(path);
        let is_library = path
            .file_name()
            .is_some_and(|name| name.to_string_lossy().contains(".so"));
        if is_library && path != exe && !out.contains(&path) {
            out.push(path);
        }
    }
    out
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        bytes.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<usize> {
    let value = u64::from_le_bytes(bytes.get(at..at.checked_add(8)?)?.try_into().ok()?);
    usize::try_from(value).ok()
}

/// The PT_INTERP path of a little-endian ELF64 executable; None for a static one (or not ELF64).
pub fn interpreter(elf: &[u8]) -> Option<String> {
    if elf.get(..4)? != b"\x7fELF" || *elf.get(4)? != 2 || *elf.get(5)? != 1 {
        return None;
    }
    let phoff = u64_at(elf, 0x20)?;
    let phentsize = usize::from(u16_at(elf, 0x36)?);
    let phnum = usize::from(u16_at(elf, 0x38)?);
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(elf, ph)? != PT_INTERP {
            continue;
        }
        let offset = u64_at(elf, ph.checked_add(8)?)?;
        let size = u64_at(elf, ph.checked_add(32)?)?;
        let raw = elf.get(offset..offset.checked_add(size)?)?;
        let path = raw.split(|&b| b == 0).next()?;
        return String::from_utf8(path.to_vec()).ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libraries_come_from_file_mappings_once_without_the_executable() {
        let maps = "\
55d0c0000000-55d0c0100000 r--p 00000000 08:01 100 /usr/bin/pvm
55d0c0100000-55d0c0200000 r-xp 00100000 08:01 100 /usr/bin/pvm
7f0000000000-7f0000100000 r--p 00000000 08:01 200 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000100000-7f0000200000 r-xp 00100000 08:01 200 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000300000-7f0000301000 rw-p 00000000 00:00 0 
7f0000400000-7f0000401000 r--p 00000000 08:01 300 /usr/lib/x86_64-linux-gnu/libgcc_s.so.1
7f0000500000-7f0000501000 r--p 00000000 08:01 400 /tmp/my lib.so (deleted)
7f0000600000-7f0000601000 r--p 00000000 08:01 500 /opt/with space/libx.so
7f0000700000-7f0000701000 r--p 00000000 08:01 600 /usr/lib/locale/locale-archive
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
7ffd00100000-7ffd00102000 r-xp 00000000 00:00 0 [vdso]
7f0000800000-7f0000801000 r--p 00000000 08:01 700 /usr/lib64/ld-linux-x86-64.so.2
short line
";
        let libs = mapped_libraries(maps, Path::new("/usr/bin/pvm"));
        let libs: Vec<&str> = libs.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(
            libs,
            [
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
                "/usr/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/opt/with space/libx.so",
                "/usr/lib64/ld-linux-x86-64.so.2",
            ]
        );
    }

    /// An ELF64 header with one PT_LOAD and one PT_INTERP program header.
    fn elf_with_interp(path: &[u8]) -> Vec<u8> {
        let mut elf = vec![0u8; 0x40 + 2 * 56];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        let ph = 0x40 + 56;
        elf[ph..ph + 4].copy_from_slice(&PT_INTERP.to_le_bytes());
        let offset = elf.len() as u64;
        elf[ph + 8..ph + 16].copy_from_slice(&offset.to_le_bytes());
        elf[ph + 32..ph + 40].copy_from_slice(&(path.len() as u64 + 1).to_le_bytes());
        elf.extend_from_slice(path);
        elf.push(0);
        elf
    }

    #[test]
    fn the_interpreter_is_read_from_pt_interp() {
        let elf = elf_with_interp(b"/lib64/ld-linux-x86-64.so.2");
        assert_eq!(
            interpreter(&elf).as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        let own = std::fs::read("/proc/self/exe").unwrap();
        assert!(interpreter(&own).is_some_and(|p| p.starts_with('/')));
    }

    #[test]
    fn hostile_elf_headers_give_none() {
        let good = elf_with_interp(b"/ld.so");
        assert_eq!(interpreter(b""), None);
        assert_eq!(interpreter(b"\x7fELF\x01\x01"), None);
        for cut in [0x10, 0x3a, 0x40 + 60, good.len() - 3] {
            assert_eq!(interpreter(&good[..cut]), None, "cut at {cut}");
        }
        let mut huge = good.clone();
        huge[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(interpreter(&huge), None);
        let mut long = good;
        let ph = 0x40 + 56;
        long[ph + 32..ph + 40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(interpreter(&long), None);
    }
}

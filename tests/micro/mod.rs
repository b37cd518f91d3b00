//! Hand-assembled micro guests for running the pvm binary on this host's /dev/kvm: each is a
//! one-segment ELF whose 64-bit code pokes platform devices. They need no guest kernel, so they
//! run fast even where /dev/kvm is kvm_pvm (which emulates guest supervisor code).

// Each test binary uses only part of this module.
#![allow(dead_code)]

pub mod http;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

const LOAD_ADDR: u64 = 0x10_0000;

/// Fails clearly (instead of skipping) where the host has no KVM at all.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm (any flavour, kvm_pvm included); this host has none"
    );
}

/// An ELF64 executable with one PT_LOAD segment holding `code` at 1 MiB, entered there.
pub fn micro_kernel(name: &str, code: &[u8]) -> PathBuf {
    let mut elf = vec![0u8; 0x1000];
    elf[..16].copy_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    let put = |elf: &mut Vec<u8>, at: usize, bytes: &[u8]| {
        elf[at..at + bytes.len()].copy_from_slice(bytes)
    };
    put(&mut elf, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut elf, 18, &0x3eu16.to_le_bytes()); // x86-64
    put(&mut elf, 20, &1u32.to_le_bytes());
    put(&mut elf, 24, &LOAD_ADDR.to_le_bytes()); // entry
    put(&mut elf, 32, &64u64.to_le_bytes()); // program headers right after the header
    put(&mut elf, 52, &64u16.to_le_bytes());
    put(&mut elf, 54, &56u16.to_le_bytes());
    put(&mut elf, 56, &1u16.to_le_bytes());
    let ph = 64;
    put(&mut elf, ph, &1u32.to_le_bytes()); // PT_LOAD
    put(&mut elf, ph + 4, &5u32.to_le_bytes()); // R+X
    put(&mut elf, ph + 8, &0x1000u64.to_le_bytes()); // file offset
    put(&mut elf, ph + 16, &LOAD_ADDR.to_le_bytes());
    put(&mut elf, ph + 24, &LOAD_ADDR.to_le_bytes());
    put(&mut elf, ph + 32, &(code.len() as u64).to_le_bytes());
    put(&mut elf, ph + 40, &(code.len() as u64).to_le_bytes());
    put(&mut elf, ph + 48, &0x1000u64.to_le_bytes());
    elf.extend_from_slice(code);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("micro-kernels");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    // Written aside and renamed: tests running in parallel may make the same guest, and pvm
    // must never read a half-written file.
    let thread = std::thread::current().id();
    let partial = dir.join(format!("{name}.{}.{thread:?}", std::process::id()));
    std::fs::write(&partial, elf).unwrap();
    std::fs::rename(&partial, &path).unwrap();
    path
}

/// `out dx, al` of each byte of `text` to the UART.
pub fn print(text: &str) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for byte in text.bytes() {
        code.extend_from_slice(&[0xb0, byte, 0xee]); // mov al, byte; out dx, al
    }
    code
}

/// Polls the UART's line status until a byte of host input has arrived (not consuming it).
pub fn wait_for_input() -> Vec<u8> {
    vec![
        0x66, 0xba, 0xfd, 0x03, // mov dx, 0x3fd (line status register)
        0xec, // in al, dx
        0xa8, 0x01, // test al, 1 (data ready)
        0x74, 0xfb, // jz back to the in
    ]
}

/// Writes `value` to I/O port `port`, then halts forever.
pub fn out_then_halt(port: u16, value: u8) -> Vec<u8> {
    let [lo, hi] = port.to_le_bytes();
    vec![0x66, 0xba, lo, hi, 0xb0, value, 0xee, 0xf4, 0xeb, 0xfd]
}

/// ACPI power-off (S5 with SLP_EN): pvm exits 0.
pub fn power_off() -> Vec<u8> {
    out_then_halt(0x3c0, (5 << 2) | (1 << 5))
}

/// Jumps to itself forever: only a signal ends such a guest.
pub fn spin() -> Vec<u8> {
    vec![0xeb, 0xfe]
}

/// Reads `from` until `text` has appeared; if the output ends first, what it was.
pub fn read_until(from: &mut impl Read, text: &str) -> Result<(), String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains(text) {
        let n = from.read(&mut buf).unwrap();
        if n == 0 {
            return Err(String::from_utf8_lossy(&seen).into_owned());
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

/// The exit code of pvm `child` (-1 for a signal), which must end within 20 s; killed if not.
pub fn wait_exit(child: &mut Child) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("pvm did not end within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// pvm's memory files named `pvm-cloud-init` (its seeds), read through /proc: one entry per
/// file, however many descriptors pvm holds of it.
pub fn cloud_init_memfds(pid: u32) -> Vec<Vec<u8>> {
    use std::os::unix::fs::MetadataExt;
    let mut seeds = std::collections::BTreeMap::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let path = fd.unwrap().path();
        let target = std::fs::read_link(&path).unwrap_or_default();
        if target
            .to_string_lossy()
            .starts_with("/memfd:pvm-cloud-init")
        {
            let inode = std::fs::metadata(&path).unwrap().ino();
            seeds.insert(inode, std::fs::read(&path).unwrap());
        }
    }
    seeds.into_values().collect()
}

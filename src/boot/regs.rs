//! Initial CPU state for the two entry protocols pvm uses:
//! - Linux 64-bit boot protocol (bzImage, or ELF without a PVH note): long mode with an identity
//!   map of the first GiB, RSI = zero page;
//! - PVH (ELF with the Xen PVH note): 32-bit protected mode, paging off, RBX = start_info.
//!
//! Pure functions compute the register values; `write_*` put the GDT and page tables into memory.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT slots: null, code, data, TSS.
const GDT_CODE: usize = 1;
const GDT_DATA: usize = 2;
const GDT_TSS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write the boot page tables/GDT into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit Linux boot protocol: long mode, RSI = zero page.
    Linux64,
    /// PVH: 32-bit protected mode, RBX = hvm_start_info.
    Pvh,
}

/// Encodes a GDT descriptor from access/flags (`0xa09b` style), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// Decodes a GDT descriptor into the segment KVM wants, with selector `index * 8`.
pub fn segment_from_gdt(entry: u64, index: usize) -> kvm_segment {
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granularity = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        // With 4 KiB granularity the limit covers whole pages.
        limit: if granularity == 1 {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector: (index * 8) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if (entry >> 47) & 1 == 0 { 1 } else { 0 },
    }
}

/// The GDT for `mode`: flat code/data segments and a TSS placeholder KVM requires for VMX.
pub fn gdt(mode: EntryMode) -> [u64; 4] {
    let code = match mode {
        EntryMode::Linux64 => gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code (L=1)
        EntryMode::Pvh => gdt_entry(0xc09b, 0, 0xfffff),     // 32-bit code (D=1)
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Writes the GDT, an empty IDT and (for long mode) the identity-mapping page tables.
pub fn write_boot_tables<M: GuestMemoryBackend>(mem: &M, mode: EntryMode) -> Result<(), Error> {
    for (i, entry) in gdt(mode).iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::GDT_START + (i * 8) as u64))
            .map_err(Error::Write)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_START))
        .map_err(Error::Write)?;
    if mode == EntryMode::Linux64 {
        // PML4[0] -> PDPT[0] -> PD with 512 2 MiB pages: the first GiB, identity mapped. The
        // kernel builds its own tables right away; this only has to cover it and boot_params.
        mem.write_obj(layout::PDPTE_START | 0x03, GuestAddress(layout::PML4_START))
            .map_err(Error::Write)?;
        mem.write_obj(layout::PDE_START | 0x03, GuestAddress(layout::PDPTE_START))
            .map_err(Error::Write)?;
        for i in 0..512u64 {
            mem.write_obj((i << 21) | 0x83, GuestAddress(layout::PDE_START + i * 8))
                .map_err(Error::Write)?;
        }
    }
    Ok(())
}

/// Adjusts the special registers KVM reported (`sregs`) for `mode`.
pub fn setup_sregs(sregs: &mut kvm_sregs, mode: EntryMode) {
    let table = gdt(mode);
    let code = segment_from_gdt(table[GDT_CODE], GDT_CODE);
    let data = segment_from_gdt(table[GDT_DATA], GDT_DATA);
    let tss = segment_from_gdt(table[GDT_TSS], GDT_TSS);
    sregs.gdt.base = layout::GDT_START;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = layout::IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Linux64 => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
}

/// General registers at the kernel entry point.
pub fn entry_regs(mode: EntryMode, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Linux64 => {
            regs.rsp = layout::BOOT_STACK_POINTER;
            regs.rbp = layout::BOOT_STACK_POINTER;
            regs.rsi = layout::ZERO_PAGE_START;
        }
        EntryMode::Pvh => regs.rbx = layout::PVH_INFO_START,
    }
    regs
}

/// FPU state as after FNINIT, with SSE exceptions masked.
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn gdt_entries_round_trip() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code.selector, code.type_, code.l, code.db, code.g),
            (8, 0xb, 1, 0, 1)
        );
        assert_eq!((code.present, code.s, code.dpl, code.base), (1, 1, 0, 0));
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment_from_gdt(gdt_entry(0xc093, 0x1234_5678, 0xfffff), 2);
        assert_eq!(
            (data.type_, data.db, data.l, data.base),
            (3, 1, 0, 0x1234_5678)
        );
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn long_mode_state() {
        let mut sregs = kvm_sregs::default();
        setup_sregs(&mut sregs, EntryMode::Linux64);
        assert_eq!(sregs.cs.l, 1);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_eq!(sregs.efer, EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr3, layout::PML4_START);
        let regs = entry_regs(EntryMode::Linux64, 0x100_0000);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rflags),
            (0x100_0000, layout::ZERO_PAGE_START, 2)
        );
    }

    #[test]
    fn pvh_state() {
        let mut sregs = kvm_sregs::default();
        setup_sregs(&mut sregs, EntryMode::Pvh);
        assert_eq!((sregs.cs.l, sregs.cs.db), (0, 1));
        assert_eq!(sregs.cr0 & X86_CR0_PG, 0);
        assert_eq!(sregs.efer, 0);
        assert_eq!(
            entry_regs(EntryMode::Pvh, 0x1000).rbx,
            layout::PVH_INFO_START
        );
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem, EntryMode::Linux64).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_START)).unwrap();
        assert_eq!(pml4, layout::PDPTE_START | 3);
        let last: u64 = mem
            .read_obj(GuestAddress(layout::PDE_START + 511 * 8))
            .unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
        let code: u64 = mem.read_obj(GuestAddress(layout::GDT_START + 8)).unwrap();
        assert_eq!(code, gdt_entry(0xa09b, 0, 0xfffff));
    }
}

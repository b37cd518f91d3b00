//! The KVM state of each vCPU and of the VM (in-kernel PIC, IOAPIC, PIT and clock): read
//! from a paused VM, written into a freshly built one. kvm-bindings' own serde support
//! encodes the ioctl structures as their bytes; KVM checks them again when they are set.

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, Msrs, kvm_clock_data, kvm_cpuid_entry2,
    kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::{RestoreError, SnapshotError};

/// More MSRs than KVM's save list has on any host: a larger count is hostile.
const MAX_MSRS: usize = 2048;

/// Everything of one vCPU that KVM keeps.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// The guest's TSC frequency; None when KVM could not say.
    pub tsc_khz: Option<u32>,
    /// (index, value) of every MSR in KVM's save list that could be read, kvmclock and TSC
    /// included.
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// The VM-wide state of KVM's in-kernel devices and clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

impl VcpuState {
    /// Reads vCPU `index`'s state; the vCPU must not be in KVM_RUN. `msr_list` is KVM's MSR
    /// save list (KVM_GET_MSR_INDEX_LIST).
    pub fn save(fd: &VcpuFd, index: u8, msr_list: &[u32]) -> Result<Self, SnapshotError> {
        let fail = |what| {
            move |source| SnapshotError::Vcpu {
                index,
                what,
                source,
            }
        };
        // MP state and events first, as KVM may complete pending work when they are read.
        let mp_state = fd.get_mp_state().map_err(fail("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(fail("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(fail("KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(fail("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(fail("KVM_GET_XCRS"))?;
        let debug_regs = fd.get_debug_regs().map_err(fail("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(fail("KVM_GET_LAPIC"))?;
        let tsc_khz = fd.get_tsc_khz().ok();
        let msrs = read_msrs(fd, msr_list).map_err(fail("KVM_GET_MSRS"))?;
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(fail("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let events = fd.get_vcpu_events().map_err(fail("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            tsc_khz,
            msrs,
            events,
        })
    }

    /// Refuses counts KVM could not take.
    pub fn validate(&self, index: usize) -> Result<(), RestoreError> {
        if self.cpuid.is_empty() || self.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(RestoreError::invalid(format!(
                "vCPU {index}: {} CPUID entries (1 to {KVM_MAX_CPUID_ENTRIES})",
                self.cpuid.len()
            )));
        }
        if self.msrs.len() > MAX_MSRS {
            return Err(RestoreError::invalid(format!(
                "vCPU {index}: {} MSRs (at most {MAX_MSRS})",
                self.msrs.len()
            )));
        }
        Ok(())
    }

    /// Writes the state into vCPU `index`, freshly created and not yet run.
    pub fn restore(&self, fd: &VcpuFd, index: u8) -> Result<(), RestoreError> {
        let fail = |what| {
            move |source| RestoreError::Vcpu {
                index,
                what,
                source,
            }
        };
        let bad = |what: &str| RestoreError::invalid(format!("vCPU {index}: {what}"));
        if let Some(khz) = self.tsc_khz {
            if fd.get_tsc_khz().ok() != Some(khz) {
                // Without TSC scaling the guest's clock runs at the host's rate: kvmclock
                // still keeps its time right, so it is worth a warning, not a refusal.
                if let Err(e) = fd.set_tsc_khz(khz) {
                    log::warn!("vCPU {index}: cannot set the snapshot's TSC rate {khz} kHz: {e}");
                }
            }
        }
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| bad("CPUID entries"))?;
        fd.set_cpuid2(&cpuid).map_err(fail("KVM_SET_CPUID2"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(fail("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(fail("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(fail("KVM_SET_SREGS"))?;
        // SAFETY: a `kvm_xsave` is the 4 KiB legacy buffer KVM_SET_XSAVE reads, whole.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(fail("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(fail("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(fail("KVM_SET_DEBUGREGS"))?;
        // The LAPIC before the MSRs: the TSC deadline MSR needs its timer mode.
        fd.set_lapic(&self.lapic).map_err(fail("KVM_SET_LAPIC"))?;
        for chunk in self.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries).map_err(|_| bad("MSR list"))?;
            let set = fd.set_msrs(&msrs).map_err(fail("KVM_SET_MSRS"))?;
            if set != entries.len() {
                return Err(RestoreError::Msrs {
                    index,
                    set,
                    wanted: entries.len(),
                });
            }
        }
        fd.set_vcpu_events(&self.events)
            .map_err(fail("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// Reads every MSR of `list` KVM can read: KVM_GET_MSRS stops at the first it cannot, which is
/// left out, and the rest are read again after it.
fn read_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<(u32, u64)>, kvm_ioctls::Error> {
    let mut values = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        let read = fd.get_msrs(&mut msrs)?.min(chunk.len());
        values.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
        // The MSR at `read` (if any) could not be read: skip it.
        rest = &rest[(read + 1).min(rest.len())..];
    }
    Ok(values)
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, SnapshotError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(|source| SnapshotError::Kvm {
            what: "KVM_GET_IRQCHIP",
            source,
        })?;
    Ok(chip)
}

impl VmState {
    /// Reads the VM's in-kernel devices and clock; every vCPU must be out of KVM_RUN.
    pub fn save(vm: &VmFd) -> Result<Self, SnapshotError> {
        let kvm = |what| move |source| SnapshotError::Kvm { what, source };
        Ok(VmState {
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
        })
    }

    /// Writes the state into a VM whose irqchip and PIT exist, before its vCPUs run.
    pub fn restore(&self, vm: &VmFd) -> Result<(), RestoreError> {
        let kvm = |what| move |source| RestoreError::Kvm { what, source };
        // The chip ids come from the file: each chip goes where it belongs, whatever it says.
        for (chip, id) in [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            let mut chip = *chip;
            chip.chip_id = id;
            vm.set_irqchip(&chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(kvm("KVM_SET_PIT2"))?;
        // The clock goes on from where it stopped (no jump over the time the VM was saved);
        // KVM_SET_CLOCK takes none of the flags KVM_GET_CLOCK reports as facts.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        Ok(())
    }
}

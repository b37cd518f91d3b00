//! CPUID normalisation: KVM_GET_SUPPORTED_CPUID describes what the host can virtualise; each vCPU
//! needs that plus what firmware or a hypervisor would add: the hypervisor bit (without it a guest
//! finds no kvm-clock and hangs calibrating its TSC), its own APIC ID, and a topology that
//! matches the number of vCPUs. A pure function over the entries, so it is unit-tested.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: TSC deadline timer (KVM emulates it; reported only with the in-kernel LAPIC).
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 EDX: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;
/// Leaf 0x8000_0001 ECX (AMD): CmpLegacy and TopologyExtensions.
const AMD_ECX_CMP_LEGACY: u32 = 1 << 1;
/// Leaf 0xB / 0x1F level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Smallest shift so that `1 << shift >= count`.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Rewrites the supported-CPUID entries for vCPU `index` of `count` (one thread per core, all
/// cores in one package; APIC ID = index).
pub fn normalize(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8) {
    let apic_id = u32::from(index);
    let count = u32::from(count.max(1));
    let core_bits = id_bits(count);
    for entry in entries.iter_mut() {
        match entry.function {
            1 => {
                entry.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE;
                // EBX: [31:24] initial APIC ID, [23:16] logical processors per package,
                // [15:8] CLFLUSH line size in quadwords (keep), [7:0] brand index (keep).
                entry.ebx = (apic_id << 24) | ((count.min(255)) << 16) | (entry.ebx & 0xffff);
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            // Deterministic cache parameters: EAX[31:26] = cores per package - 1,
            // EAX[25:14] = logical processors sharing this cache - 1 (one: no SMT).
            4 => {
                entry.eax &= 0x3fff;
                if entry.eax & 0x1f != 0 {
                    entry.eax |= (count - 1) << 26;
                }
            }
            // Extended topology: level 0 = SMT (1 thread), level 1 = core (count vCPUs).
            0xb | 0x1f => {
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = LEVEL_TYPE_SMT << 8;
                    }
                    1 => {
                        entry.eax = core_bits;
                        entry.ebx = count;
                        entry.ecx = (LEVEL_TYPE_CORE << 8) | 1;
                    }
                    level => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = level;
                    }
                }
            }
            // AMD: CmpLegacy says "cores, not threads" for the HTT count.
            0x8000_0001 => {
                if count > 1 {
                    entry.ecx |= AMD_ECX_CMP_LEGACY;
                } else {
                    entry.ecx &= !AMD_ECX_CMP_LEGACY;
                }
            }
            // AMD: ECX[15:12] APIC ID size, [7:0] number of cores - 1.
            0x8000_0008 => {
                entry.ecx = (core_bits << 12) | (count - 1);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0800,
            eax: 0x1c00_4121,
            ..Default::default()
        }
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 255].map(id_bits), [0, 1, 2, 2, 3, 8]);
    }

    #[test]
    fn hypervisor_bit_and_apic_id() {
        let mut e = vec![leaf(1, 0)];
        normalize(&mut e, 3, 4);
        let l1 = find(&e, 1, 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.edx & EDX_HTT, 0);
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut e = vec![leaf(1, 0)];
        e[0].edx = EDX_HTT;
        normalize(&mut e, 0, 1);
        assert_eq!(find(&e, 1, 0).edx & EDX_HTT, 0);
    }

    #[test]
    fn extended_topology() {
        let mut e = vec![leaf(0xb, 0), leaf(0xb, 1), leaf(0xb, 2)];
        normalize(&mut e, 2, 3);
        let (smt, core, end) = (find(&e, 0xb, 0), find(&e, 0xb, 1), find(&e, 0xb, 2));
        assert_eq!(
            (smt.eax, smt.ebx, smt.ecx >> 8 & 0xff, smt.edx),
            (0, 1, LEVEL_TYPE_SMT, 2)
        );
        assert_eq!(
            (core.eax, core.ebx, core.ecx >> 8 & 0xff, core.edx),
            (2, 3, LEVEL_TYPE_CORE, 2)
        );
        assert_eq!(end.ebx, 0, "levels past core are invalid");
    }

    #[test]
    fn cache_leaf_and_amd_core_count() {
        let mut e = vec![leaf(4, 0), leaf(0x8000_0008, 0), leaf(0x8000_0001, 0)];
        normalize(&mut e, 0, 2);
        assert_eq!(find(&e, 4, 0).eax >> 26, 1);
        assert_eq!(find(&e, 4, 0).eax & 0x3fff, 0x0121, "cache type/level kept");
        assert_eq!(find(&e, 0x8000_0008, 0).ecx & 0xff, 1);
        assert_ne!(find(&e, 0x8000_0001, 0).ecx & AMD_ECX_CMP_LEGACY, 0);
    }
}

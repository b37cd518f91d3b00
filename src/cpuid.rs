//! CPUID normalisation: KVM_GET_SUPPORTED_CPUID describes what the host can virtualise; each vCPU
//! needs that plus what firmware or a hypervisor would add: the hypervisor bit (without it a guest
//! finds no kvm-clock and hangs calibrating its TSC), its own APIC ID, and a topology that
//! matches the number of vCPUs (one thread per core, or two with SMT: Firecracker's `smt`). A pure
//! function over the entries, so it is unit-tested.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: TSC deadline timer (KVM emulates it; reported only with the in-kernel LAPIC).
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 EDX: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;
/// Leaf 0x8000_0001 ECX (AMD): CmpLegacy and TopologyExtensions.
const AMD_ECX_CMP_LEGACY: u32 = 1 << 1;
const AMD_ECX_TOPOEXT: u32 = 1 << 22;
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

/// Threads per core: two with SMT (Firecracker's `smt`: vCPUs 2n and 2n+1 are siblings), one
/// without, and one for a lone vCPU whatever `smt` says (it has no sibling to share a core with).
pub fn threads_per_core(count: u8, smt: bool) -> u32 {
    if smt && count > 1 { 2 } else { 1 }
}

/// Rewrites the supported-CPUID entries for vCPU `index` of `count` (`threads` per core, all
/// cores in one package; APIC ID = index, so its low bits are the thread within the core).
pub fn normalize(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8, threads: u32) {
    let apic_id = u32::from(index);
    let count = u32::from(count.max(1));
    let threads = threads.clamp(1, count);
    let cores = count.div_ceil(threads);
    let thread_bits = id_bits(threads);
    // The package-level shift: the thread bits, then enough bits for the core number.
    let core_bits = thread_bits + id_bits(cores);
    // Linux on AMD reads SMT siblings only through TopologyExtensions (leaf 0x8000_001e, which
    // pvm fills in below); a host without them (an emulated EPYC) would hide the pairs. Only
    // with SMT: without it, vCPUs stay apart as before whatever the host offers.
    let amd_smt = threads > 1 && entries.iter().any(|e| e.function == 0x8000_001e);
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
            // EAX[25:14] = logical processors sharing this cache - 1 (a core's threads share its
            // L1 and L2; without SMT that is one).
            4 => {
                entry.eax &= 0x3fff;
                if entry.eax & 0x1f != 0 {
                    entry.eax |= (cores - 1) << 26;
                    if threads > 1 {
                        entry.eax |= (sharing(entry.eax, threads, count) - 1) << 14;
                    }
                }
            }
            // Extended topology: level 0 = SMT (`threads` per core), level 1 = core (all vCPUs).
            0xb | 0x1f => {
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        entry.eax = thread_bits;
                        entry.ebx = threads;
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
                if amd_smt {
                    entry.ecx |= AMD_ECX_TOPOEXT;
                }
            }
            // AMD: ECX[15:12] APIC ID size, [7:0] number of threads in the package - 1.
            0x8000_0008 => {
                entry.ecx = (core_bits << 12) | (count - 1);
            }
            // AMD cache topology, as leaf 4: Linux counts two vCPUs as siblings only when they
            // also share the last-level cache, so with SMT the host's sharing is replaced.
            0x8000_001d if threads > 1 && entry.eax & 0x1f != 0 => {
                let sharing = sharing(entry.eax, threads, count);
                entry.eax = (entry.eax & !(0xfff << 14)) | ((sharing - 1) << 14);
            }
            // AMD extended APIC ID: EBX[15:8] threads per core - 1, [7:0] the core's number.
            0x8000_001e if threads > 1 => {
                entry.eax = apic_id;
                entry.ebx = ((threads - 1) << 8) | (apic_id / threads);
                entry.ecx = 0;
            }
            _ => {}
        }
    }
}

/// The processor brand string leaves (48 bytes of ASCII, 16 per leaf).
const BRAND_LEAVES: std::ops::RangeInclusive<u32> = 0x8000_0002..=0x8000_0004;

/// Fills the brand string leaves KVM leaves empty (KVM_GET_SUPPORTED_CPUID zeroes them) with
/// `host`'s (EAX, EBX, ECX, EDX) for the leaf, so the guest's /proc/cpuinfo and lscpu name the
/// processor ("model name") instead of printing its family and model numbers, as on the host.
/// Leaves that already hold a string are left alone.
pub fn fill_brand_string(entries: &mut [kvm_cpuid_entry2], host: impl Fn(u32) -> [u32; 4]) {
    for entry in entries
        .iter_mut()
        .filter(|e| BRAND_LEAVES.contains(&e.function))
    {
        if [entry.eax, entry.ebx, entry.ecx, entry.edx] == [0; 4] {
            [entry.eax, entry.ebx, entry.ecx, entry.edx] = host(entry.function);
        }
    }
}

/// The host processor's CPUID leaf `function` (subleaf 0) as (EAX, EBX, ECX, EDX).
pub fn host_leaf(function: u32) -> [u32; 4] {
    // CPUID exists on every x86_64 processor and only reads identification registers; a leaf
    // above the maximum returns data of the highest basic leaf, never faults.
    let r = std::arch::x86_64::__cpuid_count(function, 0);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// How many vCPUs share the cache a leaf 4 / 0x8000_001d entry describes (level in EAX[7:5]):
/// a core's threads share its L1 and L2, all vCPUs the L3.
fn sharing(eax: u32, threads: u32, count: u32) -> u32 {
    if (eax >> 5) & 0x7 <= 2 {
        threads
    } else {
        count
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
    fn brand_string_comes_from_the_host_where_kvm_left_it_empty() {
        let empty = |function| kvm_cpuid_entry2 {
            function,
            ..Default::default()
        };
        let mut named = empty(0x8000_0004);
        named.eax = 0x2020_2020;
        let mut e = vec![empty(0x8000_0002), empty(0x8000_0003), named, empty(1)];
        fill_brand_string(&mut e, |f| [f, f + 1, f + 2, f + 3]);
        let regs = |x: kvm_cpuid_entry2| [x.eax, x.ebx, x.ecx, x.edx];
        assert_eq!(
            regs(e[0]),
            [0x8000_0002, 0x8000_0003, 0x8000_0004, 0x8000_0005]
        );
        assert_eq!(regs(e[1])[0], 0x8000_0003);
        assert_eq!(
            regs(e[2]),
            [0x2020_2020, 0, 0, 0],
            "a string already there stays"
        );
        assert_eq!(regs(e[3]), [0; 4], "other leaves are not touched");
        // The host's own leaves read as ASCII (or are empty on a processor without them).
        let host = host_leaf(0x8000_0002);
        let bytes: Vec<u8> = host.iter().flat_map(|r| r.to_le_bytes()).collect();
        assert!(bytes.iter().all(|b| *b == 0 || b.is_ascii()), "{bytes:?}");
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 255].map(id_bits), [0, 1, 2, 2, 3, 8]);
    }

    #[test]
    fn hypervisor_bit_and_apic_id() {
        let mut e = vec![leaf(1, 0)];
        normalize(&mut e, 3, 4, 1);
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
        normalize(&mut e, 0, 1, 1);
        assert_eq!(find(&e, 1, 0).edx & EDX_HTT, 0);
    }

    #[test]
    fn extended_topology() {
        let mut e = vec![leaf(0xb, 0), leaf(0xb, 1), leaf(0xb, 2)];
        normalize(&mut e, 2, 3, 1);
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
        normalize(&mut e, 0, 2, 1);
        assert_eq!(find(&e, 4, 0).eax >> 26, 1);
        assert_eq!(find(&e, 4, 0).eax & 0x3fff, 0x0121, "cache type/level kept");
        assert_eq!(find(&e, 0x8000_0008, 0).ecx & 0xff, 1);
        assert_ne!(find(&e, 0x8000_0001, 0).ecx & AMD_ECX_CMP_LEGACY, 0);
    }

    #[test]
    fn smt_pairs_vcpus_into_cores() {
        assert_eq!(threads_per_core(4, true), 2);
        assert_eq!(threads_per_core(1, true), 1, "a lone vCPU has no sibling");
        assert_eq!(threads_per_core(4, false), 1);
        let mut l1 = leaf(4, 0);
        l1.eax = 0x0000_0121; // data cache, level 1
        let mut l3 = leaf(4, 3);
        l3.eax = 0x0000_0163; // unified cache, level 3
        let mut amd_l2 = leaf(0x8000_001d, 2);
        amd_l2.eax = 0x0000_0143 | (7 << 14);
        let mut e = vec![
            leaf(0xb, 0),
            leaf(0xb, 1),
            l1,
            l3,
            amd_l2,
            leaf(0x8000_001e, 0),
            leaf(0x8000_0008, 0),
            leaf(0x8000_0001, 0),
        ];
        normalize(&mut e, 3, 4, threads_per_core(4, true));
        let (smt, core) = (find(&e, 0xb, 0), find(&e, 0xb, 1));
        assert_eq!((smt.eax, smt.ebx, smt.edx), (1, 2, 3), "2 threads, 1 bit");
        assert_eq!(
            (core.eax, core.ebx),
            (2, 4),
            "4 vCPUs, 2 bits to the package"
        );
        assert_eq!(find(&e, 4, 0).eax >> 26, 1, "2 cores");
        assert_eq!(
            find(&e, 4, 0).eax >> 14 & 0xfff,
            1,
            "L1 shared by 2 threads"
        );
        assert_eq!(find(&e, 4, 3).eax >> 14 & 0xfff, 3, "L3 shared by all 4");
        assert_eq!(find(&e, 0x8000_001d, 2).eax >> 14 & 0xfff, 1);
        assert_eq!(
            find(&e, 0x8000_001d, 2).eax & 0x3fff,
            0x0143,
            "type/level kept"
        );
        let ext = find(&e, 0x8000_001e, 0);
        assert_eq!((ext.eax, ext.ebx >> 8 & 0xff, ext.ebx & 0xff), (3, 1, 1));
        assert_eq!(find(&e, 0x8000_0008, 0).ecx, (2 << 12) | 3);
        assert_ne!(find(&e, 0x8000_0001, 0).ecx & AMD_ECX_TOPOEXT, 0);
    }

    #[test]
    fn no_smt_leaves_amd_topology_leaves_as_they_were() {
        let mut e = vec![leaf(0x8000_001d, 0), leaf(0x8000_001e, 0)];
        let before = e.clone();
        normalize(&mut e, 1, 2, 1);
        assert_eq!(e, before);
        let mut e = vec![leaf(0x8000_0001, 0), leaf(0x8000_001e, 0)];
        normalize(&mut e, 1, 2, 1);
        assert_eq!(find(&e, 0x8000_0001, 0).ecx & AMD_ECX_TOPOEXT, 0);
        // Intel lists no leaf 0x8000_001e: SMT does not set the AMD bit there.
        let mut e = vec![leaf(0x8000_0001, 0)];
        normalize(&mut e, 1, 2, 2);
        assert_eq!(find(&e, 0x8000_0001, 0).ecx & AMD_ECX_TOPOEXT, 0);
    }
}

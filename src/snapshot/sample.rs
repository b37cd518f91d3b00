//! One snapshot for tests and the fuzz harness: a vCPU with registers and MSRs set, a disk, a
//! tap, a vhost-vsock, a (one-sector) cloud-init seed and a Diff lineage, so every part of the
//! state format carries data. KVM state is
//! default and never given to KVM. Built with the `testing` feature (the fuzz crate) or tests.

use super::description::{
    Description, DiskDescription, LimitDescription, TapDescription, VhostDescription,
    VsockBackendDescription, VsockDescription,
};
use super::seed::SeedImage;
use super::{MemoryLineage, SerialState, Snapshot, SnapshotKind, VcpuState, VmState};

/// The sample snapshot.
pub fn sample() -> Snapshot {
    let mut vcpu = VcpuState {
        cpuid: vec![Default::default(); 3],
        mp_state: Default::default(),
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debug_regs: Default::default(),
        lapic: Default::default(),
        tsc_khz: Some(2_000_000),
        msrs: vec![(0x10, 1234), (0x4b56_4d01, 0x1001)],
        events: Default::default(),
    };
    vcpu.regs.rip = 0xffff_ffff_8100_0000;
    Snapshot {
        description: Description {
            mem_bytes: 128 << 20,
            cpus: 1,
            pci: true,
            virtio_console: false,
            cmdline: "quiet".to_string(),
            disks: vec![DiskDescription {
                drive_id: Some("rootfs".into()),
                path: "/images/root.img".into(),
                read_only: false,
                serial: None,
                flush: true,
                limit: LimitDescription::default(),
                io_uring: false,
                direct: false,
                queues: 1,
                queue_size: 256,
            }],
            taps: vec![TapDescription {
                iface_id: Some("eth0".into()),
                name: "tap0".into(),
                mac: None,
                vhost: VhostDescription::Auto,
                queues: 1,
                rx_limit: LimitDescription::default(),
                tx_limit: LimitDescription::default(),
            }],
            rng_limit: LimitDescription::default(),
            balloon: None,
            vsock: Some(VsockDescription {
                cid: 3,
                backend: VsockBackendDescription::Vhost,
            }),
            cloud_init: Some(SeedImage {
                bytes: b"CIDATA".repeat(86)[..512].to_vec(),
            }),
        },
        vcpus: vec![vcpu],
        vm: VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        serial: SerialState::default(),
        pci_config_address: 0x8000_0800,
        devices: Vec::new(),
        memory: MemoryLineage {
            kind: SnapshotKind::Diff,
            id: 7,
            parent: Some(3),
        },
    }
}

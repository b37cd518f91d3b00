//! The snapshot file decoder (`pvm::snapshot::file`), which reads untrusted files: any bytes
//! are refused or decoded, never a panic or an allocation past the input's size. The first
//! byte chooses how the rest is used: odd, as a payload framed with a valid header and
//! checksum (so the fuzzer reaches the state decoder and the validation behind it); even, as
//! the whole file.

use pvm::snapshot::description::{Description, LimitDescription, TapDescription, VhostDescription};
use pvm::snapshot::file::{decode, encode, frame};
use pvm::snapshot::{MemoryLineage, SerialState, Snapshot, SnapshotKind, VcpuState, VmState};

pub fn file(data: &[u8]) {
    let (mode, rest) = data.split_first().unwrap_or((&0, &[]));
    let bytes = if mode & 1 == 1 {
        frame(rest)
    } else {
        rest.to_vec()
    };
    let Ok(snapshot) = decode("fuzz", &bytes) else {
        return;
    };
    // Whatever decodes encodes again, to the same state.
    let again = encode(&snapshot).expect("a decoded state encodes");
    let twice = decode("fuzz", &again).expect("an encoded state decodes");
    assert_eq!(
        encode(&twice).expect("encodes"),
        again,
        "encoding is stable"
    );
    if snapshot.validate().is_ok() {
        let base = pvm::cli::parse(["pvm".into()]).expect("no flags parse");
        let _ = snapshot
            .description
            .to_config(&base, &[], &[("net0".into(), "t".into())]);
    }
}

/// A snapshot of one vCPU with a tap and a disk (KVM state all defaults).
pub fn sample() -> Snapshot {
    let vcpu = VcpuState {
        cpuid: vec![Default::default(); 2],
        mp_state: Default::default(),
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debug_regs: Default::default(),
        lapic: Default::default(),
        tsc_khz: Some(2_000_000),
        msrs: vec![(0x10, 1), (0x4b56_4d01, 0x1001)],
        events: Default::default(),
    };
    Snapshot {
        description: Description {
            mem_bytes: 128 << 20,
            cpus: 1,
            pci: true,
            virtio_console: false,
            cmdline: String::new(),
            disks: vec![pvm::snapshot::description::DiskDescription {
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
            vsock: None,
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
        pci_config_address: 0,
        devices: Vec::new(),
        memory: MemoryLineage {
            kind: SnapshotKind::Diff,
            id: 2,
            parent: Some(1),
        },
    }
}

/// Seeds: a whole file, its payload alone (framed by the harness), and a truncated file.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let file = encode(&sample()).expect("the sample encodes");
    let payload = file[24..file.len() - 4].to_vec();
    let with = |mode: u8, bytes: &[u8]| {
        let mut seed = vec![mode];
        seed.extend_from_slice(bytes);
        seed
    };
    vec![
        ("whole-file", with(0, &file)),
        ("payload", with(1, &payload)),
        ("truncated", with(0, &file[..file.len() / 2])),
    ]
}

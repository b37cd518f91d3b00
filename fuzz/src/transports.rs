//! The transports' guest-facing register interface: any sequence of virtio-mmio window accesses,
//! or PCI configuration space and BAR0 accesses, decoded from the fuzz input, against a real
//! device. Raw accesses (any offset, any length) are mixed with structured ones (a known
//! register with its own width, a whole driver initialisation) so the fuzzer reaches activation,
//! queue notifications, MSI-X and reset, with the device's worker running concurrently.
//!
//! After every access the device status must be one the state machine allows; at the end the
//! identification registers must still read as they did.
//!
//! ```text
//! u8  device: bits 0-1 rng/block/console/net; pci: bit 7 makes the MSI sink fail
//! pci only: u8 MSI-X vectors (1 + n % 8)
//! ops until the input ends: u8 opcode (bits 0-2 the kind, 3-5 an access length, 6-7 flags),
//!     then the kind's operands (see MmioOp / PciOp below)
//! ```

use std::io;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use pvm_virtio::{
    Block, Console, MmioTransport, MsiMessage, MsiSink, Net, PciTransport, Rng, VirtioDevice,
};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::input::{Input, Output};
use crate::queue::{ScratchFile, guest_memory};

const ACK: u8 = VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
const DRIVER: u8 = VIRTIO_CONFIG_S_DRIVER as u8;
const FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
const DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;

/// Access lengths, chosen by opcode bits 3-5: mostly valid ones, some never valid.
const LENGTHS: [usize; 8] = [4, 1, 2, 8, 4, 0, 3, 16];

/// What must stay alive as long as the device: its disk image or its backend's peer.
#[allow(dead_code)]
pub enum Keep {
    Nothing,
    Disk(ScratchFile),
    Peer(UnixDatagram),
}

/// One of pvm's devices, chosen by the low two bits of `kind`.
pub fn make_device(kind: u8) -> (Box<dyn VirtioDevice>, Keep) {
    match kind & 3 {
        0 => (Box::new(Rng::new()), Keep::Nothing),
        1 => {
            let (image, _file) = ScratchFile::new("transport-disk", &[0u8; 8192]);
            let block = Block::new(&image.path, false, Some("fuzz")).expect("block device");
            (Box::new(block), Keep::Disk(image))
        }
        2 => {
            let console = Console::new(Box::new(io::sink())).expect("console");
            (Box::new(console), Keep::Nothing)
        }
        _ => {
            let (ours, peer) = UnixDatagram::pair().expect("socketpair");
            ours.set_nonblocking(true).unwrap();
            peer.set_nonblocking(true).unwrap();
            let backend = Arc::new(crate::devices::test_backend(ours));
            let net = Net::new(backend, Some([0x02, 0, 0, 0, 0, 2])).expect("net device");
            (Box::new(net), Keep::Peer(peer))
        }
    }
}

/// The status bits a driver can only have set in order: DRIVER_OK needs FEATURES_OK needs
/// DRIVER needs ACKNOWLEDGE.
fn check_status(status: u8) {
    let implies = |bit: u8, needs: u8| status & bit == 0 || status & needs != 0;
    assert!(
        implies(DRIVER_OK, FEATURES_OK) && implies(FEATURES_OK, DRIVER) && implies(DRIVER, ACK),
        "impossible device status {status:#x}"
    );
}

/// Writes `n` (u8) bytes at a guest address (u32) so queues the driver configures have
/// contents; accesses outside guest RAM are ignored like a DMA error.
fn guest_write(mem: &GuestMemoryMmap, input: &mut Input<'_>) {
    let addr = u64::from(input.u32());
    let n = usize::from(input.u8());
    let _ = mem.write_slice(input.bytes(n), GuestAddress(addr));
}

/// The offset operand: u16, or counted down from u64::MAX with opcode bit 7 (overflow checks).
fn offset(input: &mut Input<'_>, op: u8) -> u64 {
    let raw = u64::from(input.u16());
    if op & 0x80 != 0 { u64::MAX - raw } else { raw }
}

fn length(op: u8) -> usize {
    LENGTHS[usize::from((op >> 3) & 7)]
}

/// The virtio-mmio registers, for structured accesses.
const MMIO_REGISTERS: [u32; 25] = [
    VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_VERSION,
    VIRTIO_MMIO_DEVICE_ID,
    VIRTIO_MMIO_VENDOR_ID,
    VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_SHM_SEL,
    VIRTIO_MMIO_CONFIG_GENERATION,
    VIRTIO_MMIO_CONFIG,
];

/// Opcode kinds of the mmio target.
pub mod mmio_op {
    /// u16 offset (bit 7: from u64::MAX); reads `length` bytes.
    pub const READ: u8 = 0;
    /// u16 offset, `length` value bytes.
    pub const WRITE: u8 = 1;
    /// u8 register index (MMIO_REGISTERS), u32 value: an aligned 32-bit write.
    pub const REG_WRITE: u8 = 2;
    /// u8 register index: an aligned 32-bit read.
    pub const REG_READ: u8 = 3;
    /// u32 guest address, u8 n, n bytes into guest memory.
    pub const MEM: u8 = 4;
    /// The VMM signals a config change.
    pub const CONFIG_CHANGE: u8 = 5;
    /// A whole driver start: u64 feature mask (anded with the offer, VERSION_1 always), then per
    /// queue u8 size and u32 desc/avail/used addresses, then DRIVER_OK.
    pub const INIT: u8 = 6;
    /// u8 queue index written to QueueNotify.
    pub const KICK: u8 = 7;
}

pub fn mmio(data: &[u8]) {
    let mut input = Input::new(data);
    let (device, _keep) = make_device(input.u8());
    let device_type = device.device_type();
    let num_queues = device.queue_max_sizes().len();
    let mem = guest_memory();
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let mut t = MmioTransport::new(device, mem.clone(), irq).expect("mmio transport");
    assert_eq!(t.queue_kicks().len(), num_queues);
    let mut buf = [0u8; 16];
    let reg_read = |t: &mut MmioTransport, offset: u32| {
        let mut word = [0u8; 4];
        t.read(u64::from(offset), &mut word);
        u32::from_le_bytes(word)
    };
    while !input.is_empty() {
        let op = input.u8();
        match op & 7 {
            mmio_op::READ => {
                let at = offset(&mut input, op);
                t.read(at, &mut buf[..length(op)]);
            }
            mmio_op::WRITE => {
                let at = offset(&mut input, op);
                let value = input.bytes(length(op));
                t.write(at, value);
            }
            mmio_op::REG_WRITE => {
                let reg = MMIO_REGISTERS[usize::from(input.u8()) % MMIO_REGISTERS.len()];
                t.write(u64::from(reg), &input.u32().to_le_bytes());
            }
            mmio_op::REG_READ => {
                let reg = MMIO_REGISTERS[usize::from(input.u8()) % MMIO_REGISTERS.len()];
                reg_read(&mut t, reg);
            }
            mmio_op::MEM => guest_write(&mem, &mut input),
            mmio_op::CONFIG_CHANGE => {
                t.notify_config_change().expect("irq eventfd");
                assert_ne!(t.interrupt_status() & 2, 0, "config interrupt pending");
            }
            mmio_op::INIT => {
                let w = |t: &mut MmioTransport, reg: u32, v: u32| {
                    t.write(u64::from(reg), &v.to_le_bytes())
                };
                let mask = input.u64() | (1 << VIRTIO_F_VERSION_1);
                w(&mut t, VIRTIO_MMIO_STATUS, 0);
                w(&mut t, VIRTIO_MMIO_STATUS, u32::from(ACK));
                w(&mut t, VIRTIO_MMIO_STATUS, u32::from(ACK | DRIVER));
                let mut offered = 0u64;
                for half in 0..2u32 {
                    w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, half);
                    offered |=
                        u64::from(reg_read(&mut t, VIRTIO_MMIO_DEVICE_FEATURES)) << (32 * half);
                }
                let accepted = offered & mask;
                for half in 0..2u32 {
                    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, half);
                    w(
                        &mut t,
                        VIRTIO_MMIO_DRIVER_FEATURES,
                        (accepted >> (32 * half)) as u32,
                    );
                }
                w(
                    &mut t,
                    VIRTIO_MMIO_STATUS,
                    u32::from(ACK | DRIVER | FEATURES_OK),
                );
                for q in 0..num_queues as u32 {
                    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, q);
                    w(&mut t, VIRTIO_MMIO_QUEUE_NUM, u32::from(input.u8()));
                    w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, input.u32());
                    w(&mut t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
                    w(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, input.u32());
                    w(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
                    w(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, input.u32());
                    w(&mut t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
                    w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
                }
                let status = ACK | DRIVER | FEATURES_OK | DRIVER_OK;
                w(&mut t, VIRTIO_MMIO_STATUS, u32::from(status));
                if accepted & (1 << VIRTIO_F_VERSION_1) != 0 && t.device_status() & FEATURES_OK != 0
                {
                    assert_ne!(
                        t.device_status() & DRIVER_OK,
                        0,
                        "DRIVER_OK after FEATURES_OK"
                    );
                }
            }
            _ => {
                let queue = input.u8();
                t.write(
                    u64::from(VIRTIO_MMIO_QUEUE_NOTIFY),
                    &u32::from(queue).to_le_bytes(),
                );
            }
        }
        check_status(t.device_status());
        assert_eq!(
            u32::from(t.device_status()),
            reg_read(&mut t, VIRTIO_MMIO_STATUS),
            "the status register reads what the transport holds"
        );
    }
    if crate::devices::trace() {
        eprintln!(
            "status {:#x}, interrupt status {:#x}",
            t.device_status(),
            t.interrupt_status()
        );
    }
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_DEVICE_ID), device_type);
    // Reset stops the worker; the transport must be reusable.
    t.write(u64::from(VIRTIO_MMIO_STATUS), &0u32.to_le_bytes());
    assert_eq!(t.device_status(), 0);
    assert_eq!(t.interrupt_status(), 0, "reset clears the interrupt status");
}

/// MSI routes the transport asks for; fails on demand so the pending path runs too.
#[derive(Debug, Default)]
struct CountingSink {
    fail: bool,
    updates: AtomicU32,
}

impl MsiSink for CountingSink {
    fn update_vector(&self, _vector: u16, _message: Option<MsiMessage>) -> io::Result<()> {
        self.updates.fetch_add(1, Ordering::SeqCst);
        if self.fail {
            Err(io::Error::other("no route"))
        } else {
            Ok(())
        }
    }
}

/// BAR0's address: aligned to its size, below 4 GiB.
pub const BAR_ADDR: u64 = 0xc000_0000;

/// virtio_pci_common_cfg fields as (offset, width): the structured accesses.
const COMMON_FIELDS: [(u64, usize); 25] = [
    (0x00, 4),
    (0x04, 4),
    (0x08, 4),
    (0x0c, 4),
    (0x10, 2),
    (0x12, 2),
    (0x14, 1),
    (0x15, 1),
    (0x16, 2),
    (0x18, 2),
    (0x1a, 2),
    (0x1c, 2),
    (0x1e, 2),
    (0x20, 4),
    (0x24, 4),
    (0x28, 4),
    (0x2c, 4),
    (0x30, 4),
    (0x34, 4),
    (0x20, 8),
    (0x28, 8),
    (0x30, 8),
    (0x38, 2),
    (0x3a, 2),
    (0x14, 1),
];

const COMMON_STATUS: u64 = 0x14;
const PCI_NOTIFY_OFFSET: u64 = 0x3000;
const PCI_MSIX_TABLE: u64 = 0x4000;
/// The MSI-X capability's message control register in config space.
const PCI_MSIX_CONTROL: u64 = 0x98 + 2;

/// Opcode kinds of the pci target.
pub mod pci_op {
    /// u16 config space offset (bit 7: from u64::MAX); reads `length` bytes.
    pub const CONFIG_READ: u8 = 0;
    /// u16 offset, `length` value bytes.
    pub const CONFIG_WRITE: u8 = 1;
    /// u16 BAR0 offset (bit 6: plus 64 KiB, past the BAR; bit 7: from u64::MAX).
    pub const BAR_READ: u8 = 2;
    /// Same offset, `length` value bytes.
    pub const BAR_WRITE: u8 = 3;
    /// u8 common config field (COMMON_FIELDS), then the value in that field's width.
    pub const COMMON_WRITE: u8 = 4;
    /// u32 guest address, u8 n, n bytes into guest memory.
    pub const MEM: u8 = 5;
    /// A whole driver start as in mmio's INIT, plus MSI-X: enable, one vector per queue
    /// (u32 address low, u32 data each) and config vector 0.
    pub const INIT: u8 = 6;
    /// u8 queue written to its notify address (bit 6: the VMM signals a config change).
    pub const KICK: u8 = 7;
}

pub fn pci(data: &[u8]) {
    let mut input = Input::new(data);
    let kind = input.u8();
    let vectors = 1 + u16::from(input.u8() % 8);
    let (device, _keep) = make_device(kind);
    let device_type = device.device_type();
    let num_queues = device.queue_max_sizes().len();
    let mem = guest_memory();
    let sink = Arc::new(CountingSink {
        fail: kind & 0x80 != 0,
        updates: AtomicU32::new(0),
    });
    let mut t = PciTransport::new(device, mem.clone(), BAR_ADDR, vectors, sink.clone())
        .expect("pci transport");
    assert_eq!(t.vector_irqfds().len(), usize::from(vectors));
    assert_eq!(t.queue_kicks().len(), num_queues);
    let mut buf = [0u8; 16];
    let common_read = |t: &mut PciTransport, at: u64, width: usize| {
        let mut bytes = [0u8; 8];
        t.bar_read(at, &mut bytes[..width]);
        u64::from_le_bytes(bytes)
    };
    let common_write = |t: &mut PciTransport, at: u64, width: usize, value: u64| {
        t.bar_write(at, &value.to_le_bytes()[..width]);
    };
    while !input.is_empty() {
        let op = input.u8();
        match op & 7 {
            pci_op::CONFIG_READ => {
                let at = offset(&mut input, op);
                t.config_read(at, &mut buf[..length(op)]);
            }
            pci_op::CONFIG_WRITE => {
                let at = offset(&mut input, op);
                let value = input.bytes(length(op));
                t.config_write(at, value);
            }
            pci_op::BAR_READ | pci_op::BAR_WRITE => {
                let mut at = offset(&mut input, op);
                if op & 0x40 != 0 {
                    at = at.wrapping_add(0x1_0000);
                }
                if op & 7 == pci_op::BAR_READ {
                    t.bar_read(at, &mut buf[..length(op)]);
                } else {
                    let value = input.bytes(length(op));
                    t.bar_write(at, value);
                }
            }
            pci_op::COMMON_WRITE => {
                let (at, width) = COMMON_FIELDS[usize::from(input.u8()) % COMMON_FIELDS.len()];
                let value = input.bytes(width);
                t.bar_write(at, value);
            }
            pci_op::MEM => guest_write(&mem, &mut input),
            pci_op::INIT => {
                let mask = input.u64() | (1 << VIRTIO_F_VERSION_1);
                common_write(&mut t, COMMON_STATUS, 1, 0);
                common_write(&mut t, COMMON_STATUS, 1, u64::from(ACK));
                common_write(&mut t, COMMON_STATUS, 1, u64::from(ACK | DRIVER));
                let mut offered = 0u64;
                for half in 0..2u64 {
                    common_write(&mut t, 0x00, 4, half);
                    offered |= common_read(&mut t, 0x04, 4) << (32 * half);
                }
                let accepted = offered & mask;
                for half in 0..2u64 {
                    common_write(&mut t, 0x08, 4, half);
                    common_write(&mut t, 0x0c, 4, (accepted >> (32 * half)) & 0xffff_ffff);
                }
                common_write(
                    &mut t,
                    COMMON_STATUS,
                    1,
                    u64::from(ACK | DRIVER | FEATURES_OK),
                );
                // MSI-X on: enable in the capability, a vector per queue, config on vector 0.
                t.config_write(PCI_MSIX_CONTROL, &(1u16 << 15).to_le_bytes());
                common_write(&mut t, 0x10, 2, 0);
                for q in 0..num_queues as u64 {
                    let vector = (q + 1) % u64::from(vectors);
                    let entry = PCI_MSIX_TABLE + 16 * vector;
                    common_write(
                        &mut t,
                        entry,
                        4,
                        0xfee0_0000 | u64::from(input.u32() & 0xff000),
                    );
                    common_write(&mut t, entry + 4, 4, 0);
                    common_write(&mut t, entry + 8, 4, u64::from(input.u32()));
                    common_write(&mut t, entry + 12, 4, 0);
                    common_write(&mut t, 0x16, 2, q);
                    common_write(&mut t, 0x18, 2, u64::from(input.u8()));
                    common_write(&mut t, 0x1a, 2, vector);
                    common_write(&mut t, 0x20, 8, u64::from(input.u32()));
                    common_write(&mut t, 0x28, 8, u64::from(input.u32()));
                    common_write(&mut t, 0x30, 8, u64::from(input.u32()));
                    common_write(&mut t, 0x1c, 2, 1);
                }
                let status = ACK | DRIVER | FEATURES_OK | DRIVER_OK;
                common_write(&mut t, COMMON_STATUS, 1, u64::from(status));
            }
            _ => {
                let queue = input.u8();
                if op & 0x40 != 0 {
                    t.notify_config_change().expect("config change");
                } else {
                    let at = PCI_NOTIFY_OFFSET + 4 * u64::from(queue);
                    t.bar_write(at, &u16::from(queue).to_le_bytes());
                }
            }
        }
        check_status(t.device_status());
        assert_eq!(
            u64::from(t.device_status()),
            common_read(&mut t, COMMON_STATUS, 1),
            "device_status reads what the transport holds"
        );
    }
    if crate::devices::trace() {
        eprintln!(
            "status {:#x}, {} MSI route updates",
            t.device_status(),
            sink.updates.load(Ordering::SeqCst)
        );
    }
    let mut id = [0u8; 4];
    t.config_read(0, &mut id);
    assert_eq!(u16::from_le_bytes([id[0], id[1]]), 0x1af4, "vendor id");
    assert_eq!(
        u32::from(u16::from_le_bytes([id[2], id[3]])),
        0x1040 + device_type,
        "device id"
    );
    assert_eq!(
        common_read(&mut t, 0x12, 2),
        num_queues as u64,
        "num_queues"
    );
    common_write(&mut t, COMMON_STATUS, 1, 0);
    assert_eq!(t.device_status(), 0);
}

/// Seed encoders for the two targets.
pub mod seed {
    use super::*;

    /// A driver start through the INIT op with every feature the device offers, queues of
    /// `size` at the given (desc, avail, used) addresses.
    pub fn mmio_init(out: &mut Output, queues: &[(u8, u32, u32, u32)]) {
        out.u8(mmio_op::INIT).u64(u64::MAX);
        for &(size, d, a, u) in queues {
            out.u8(size).u32(d).u32(a).u32(u);
        }
    }

    pub fn pci_init(out: &mut Output, queues: &[(u8, u32, u32, u32)]) {
        out.u8(pci_op::INIT).u64(u64::MAX);
        for (i, &(size, d, a, u)) in queues.iter().enumerate() {
            out.u32(0x1000 * i as u32).u32(0x40 + i as u32);
            out.u8(size).u32(d).u32(a).u32(u);
        }
    }
}

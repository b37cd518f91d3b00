//! The hand-made seed corpus (fuzz/corpus/<target>/): a few valid-ish inputs per target, built
//! here so their layout follows the decoders. Regenerate with
//! `PVM_FUZZ_WRITE_SEEDS=1 cargo test --manifest-path fuzz/Cargo.toml --lib seeds`
//! (the disk seeds with real ext4 filesystems need mkfs.ext4).

use std::path::Path;

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

use crate::boot::{BOOT_CMDLINE, BOOT_INITRD, encode_sparse};
use crate::devices::{F_DEVICE_A, F_DEVICE_B, F_EVENT_IDX, F_INDIRECT};
use crate::input::Output;
use crate::queue::{DATA_BASE, HIGH_RAM, SeedQueue};
use crate::transports::{mmio_op, pci_op, seed as tseed};

/// Guest memory contents from [`DATA_BASE`] up, as the payload of a device seed.
#[derive(Default)]
struct Payload {
    bytes: Vec<u8>,
}

impl Payload {
    fn put(&mut self, addr: u64, data: &[u8]) -> &mut Self {
        let at = (addr - DATA_BASE) as usize;
        if self.bytes.len() < at + data.len() {
            self.bytes.resize(at + data.len(), 0);
        }
        self.bytes[at..at + data.len()].copy_from_slice(data);
        self
    }
}

/// Queue size selector 4: 16 entries on every device.
const SIZE16: u8 = 4;

fn device_seed(
    features: u8,
    start: u16,
    prefix: &[u8],
    queues: &[SeedQueue],
    payload: &Payload,
) -> Vec<u8> {
    let mut out = Output::default();
    out.u8(features).u8(SIZE16).u16(start).bytes(prefix);
    for q in queues {
        q.encode(&mut out);
    }
    out.bytes(&payload.bytes);
    out.data
}

const R: bool = false;
const W: bool = true;

fn blk_header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn blk_range(sector: u64, count: u32, flags: u32) -> Vec<u8> {
    let mut r = sector.to_le_bytes().to_vec();
    r.extend_from_slice(&count.to_le_bytes());
    r.extend_from_slice(&flags.to_le_bytes());
    r
}

fn serial(s: &str) -> Vec<u8> {
    let mut v = vec![s.len() as u8];
    v.extend_from_slice(s.as_bytes());
    v
}

pub fn block() -> Seeds {
    let mut seeds = Vec::new();
    // Read, write, flush and get-id, one chain each.
    let mut p = Payload::default();
    p.put(0x8000, &blk_header(0, 1))
        .put(0x8010, &blk_header(1, 2))
        .put(0x8020, &blk_header(4, 0))
        .put(0x8030, &blk_header(8, 0))
        .put(0x9200, &[0x5a; 1024]);
    let q = SeedQueue::chains(&[
        &[(0x8000, 16, R), (0x9000, 512, W), (0x8100, 1, W)],
        &[(0x8010, 16, R), (0x9200, 1024, R), (0x8101, 1, W)],
        &[(0x8020, 16, R), (0x8102, 1, W)],
        &[(0x8030, 16, R), (0x9800, 20, W), (0x8103, 1, W)],
    ]);
    seeds.push((
        "read-write-flush-id",
        device_seed(0, 0, &serial("fuzz-disk"), &[q.clone()], &p),
    ));
    // The same on the io_uring engine.
    seeds.push((
        "read-write-flush-id-io-uring",
        device_seed(F_DEVICE_B, 0, &serial("fuzz-disk"), &[q], &p),
    ));

    // Discard and write-zeroes (with and without unmap) of one range each.
    let mut p = Payload::default();
    p.put(0x8000, &blk_header(11, 0))
        .put(0x8010, &blk_range(0, 8, 0))
        .put(0x8020, &blk_header(13, 0))
        .put(0x8030, &blk_range(8, 16, 1))
        .put(0x8040, &blk_header(13, 0))
        .put(0x8050, &blk_range(64, 8, 0));
    let q = SeedQueue::chains(&[
        &[(0x8000, 32, R), (0x8100, 1, W)],
        &[(0x8020, 32, R), (0x8101, 1, W)],
        &[(0x8040, 16, R), (0x8050, 16, R), (0x8102, 1, W)],
    ]);
    seeds.push((
        "discard-write-zeroes",
        device_seed(0, 0, &serial(""), &[q], &p),
    ));

    // EVENT_IDX, ring indices about to wrap, header and data in one descriptor.
    let mut p = Payload::default();
    p.put(0x8000, &blk_header(0, 0))
        .put(0x8200, &blk_header(1, 127));
    let q = SeedQueue::chains(&[
        &[(0x8000, 16, R), (0x9000, 4096, W), (0x8100, 1, W)],
        &[(0x8200, 16 + 512, R), (0x8101, 1, W)],
        &[(0x8000, 16, R), (0x3_ff00, 512, W), (0x8102, 1, W)],
    ]);
    seeds.push((
        "event-idx-wrap",
        device_seed(F_EVENT_IDX, 0xfffe, &serial("x"), &[q], &p),
    ));

    // An indirect table holding a whole read request.
    let mut p = Payload::default();
    p.put(0x8000, &blk_header(0, 3));
    let mut table = Vec::new();
    for (addr, len, flags, next) in [
        (0x8000u64, 16u32, VRING_DESC_F_NEXT, 1u16),
        (0x9000, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2),
        (0x8100, 1, VRING_DESC_F_WRITE, 0),
    ] {
        table.extend_from_slice(&addr.to_le_bytes());
        table.extend_from_slice(&len.to_le_bytes());
        table.extend_from_slice(&(flags as u16).to_le_bytes());
        table.extend_from_slice(&next.to_le_bytes());
    }
    p.put(0x8800, &table);
    let q = SeedQueue {
        descs: vec![(0x8800, 48, VRING_DESC_F_INDIRECT as u16, 0)],
        heads: vec![0],
        ..Default::default()
    };
    seeds.push((
        "indirect",
        device_seed(F_INDIRECT, 7, &serial(""), &[q], &p),
    ));

    // A read-only disk refusing a write; a driver claiming far more chains than the ring holds.
    let mut p = Payload::default();
    p.put(0x8000, &blk_header(1, 0));
    let q = SeedQueue::chains(&[&[(0x8000, 16, R), (0x9000, 512, R), (0x8100, 1, W)]]);
    seeds.push((
        "read-only-write",
        device_seed(
            F_DEVICE_A,
            0,
            &serial("01234567890123456789"),
            std::slice::from_ref(&q),
            &p,
        ),
    ));
    let lying = SeedQueue {
        avail_delta: Some(1000),
        ..q
    };
    seeds.push((
        "avail-far-ahead",
        device_seed(0, 0, &serial(""), &[lying], &p),
    ));
    seeds
}

/// A vnet header (flags NEEDS_CSUM) and an Ethernet frame of `len` payload bytes.
fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![1u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 9]);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend((0..len).map(|i| i as u8));
    f
}

pub fn net_tx() -> Seeds {
    let mut seeds = Vec::new();
    let f = frame(46);
    let mut p = Payload::default();
    p.put(0x8000, &f[..12])
        .put(0x8100, &f[12..])
        .put(0x8200, &f);
    let tx = SeedQueue::chains(&[
        &[(0x8000, 12, R), (0x8100, 60, R)],
        &[(0x8200, 72, R)],
        &[(0x8300, 64, W)],
        &[(0x8000, 4, R)],
    ]);
    seeds.push((
        "frames-and-malformed",
        device_seed(0, 0, &[], &[SeedQueue::default(), tx.clone()], &p),
    ));
    let features = F_EVENT_IDX | F_DEVICE_A | F_DEVICE_B;
    seeds.push((
        "offloads-event-idx",
        device_seed(features, 0xfff0, &[], &[SeedQueue::default(), tx], &p),
    ));
    // A frame gathered from both memory regions.
    // A frame gathered from both memory regions (zeros there), one running into the hole.
    let tx = SeedQueue::chains(&[
        &[(0x3_fff4, 12, R), (HIGH_RAM.0, 1500, R)],
        &[(0x3_fff4, 100, R)],
    ]);
    seeds.push((
        "two-regions",
        device_seed(0, 0, &[], &[SeedQueue::default(), tx], &Payload::default()),
    ));
    seeds
}

fn frames(list: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Output::default();
    out.u8(list.len() as u8);
    for f in list {
        out.u16(f.len() as u16).bytes(f);
    }
    out.data
}

pub fn net_rx() -> Seeds {
    let mut seeds = Vec::new();
    let rx = SeedQueue::chains(&[&[(0x9000, 1526, W)], &[(0xa000, 12, W), (0xa100, 1514, W)]]);
    seeds.push((
        "two-frames",
        device_seed(
            0,
            0,
            &frames(&[frame(46), frame(100)]),
            &[rx, SeedQueue::default()],
            &Payload::default(),
        ),
    ));
    // Mergeable buffers: one frame over three small chains.
    let rx = SeedQueue::chains(&[
        &[(0x9000, 32, W)],
        &[(0x9100, 32, W)],
        &[(0x9200, 32, W)],
        &[(0x9300, 32, W)],
    ]);
    seeds.push((
        "mergeable",
        device_seed(
            F_DEVICE_A | F_EVENT_IDX,
            0xfffe,
            &frames(&[frame(60), frame(2)]),
            &[rx.clone(), SeedQueue::default()],
            &Payload::default(),
        ),
    ));
    // Without mergeable buffers the same frame does not fit and is dropped; a runt is an error.
    seeds.push((
        "too-small-and-runt",
        device_seed(
            0,
            0,
            &frames(&[frame(60), vec![0; 4]]),
            &[rx, SeedQueue::default()],
            &Payload::default(),
        ),
    ));
    seeds
}

pub fn console() -> Seeds {
    let mut seeds = Vec::new();
    let mut p = Payload::default();
    p.put(0x8000, b"hello, world\n")
        .put(0x8100, b"split ")
        .put(0x8200, b"output\n");
    let rx = SeedQueue::chains(&[&[(0x9000, 4, W)], &[(0x9100, 16, W), (0x9200, 16, W)]]);
    let tx = SeedQueue::chains(&[&[(0x8000, 13, R)], &[(0x8100, 6, R), (0x8200, 7, R)]]);
    let mut input = Output::default();
    input.u16(9).bytes(b"ls -l /\r\n");
    seeds.push((
        "echo",
        device_seed(0, 0, &input.data, &[rx.clone(), tx.clone()], &p),
    ));
    seeds.push((
        "output-fails",
        device_seed(F_DEVICE_A | F_EVENT_IDX, 0xffff, &input.data, &[rx, tx], &p),
    ));
    seeds
}

pub fn rng() -> Seeds {
    let q = SeedQueue::chains(&[
        &[(0x8000, 64, W)],
        &[(0x8100, 16, R), (0x8200, 32, W)],
        &[(0x9000, 4096, W), (HIGH_RAM.0, 100, W)],
        &[(0x3_fff0, 64, W)],
    ]);
    vec![
        (
            "requests",
            device_seed(0, 0, &[], std::slice::from_ref(&q), &Payload::default()),
        ),
        (
            "event-idx-wrap",
            device_seed(F_EVENT_IDX, 0xfffd, &[], &[q], &Payload::default()),
        ),
    ]
}

pub fn balloon() -> Seeds {
    let pfns = |list: &[u32]| -> Vec<u8> { list.iter().flat_map(|p| p.to_le_bytes()).collect() };
    let mut p = Payload::default();
    // In range (pages 0x20, 0x21 and a repeat), past RAM, in the hole, and a partial number.
    p.put(0x8000, &pfns(&[0x20, 0x21, 0x20, 0x3_0000, 0x50]))
        .put(0x8100, &pfns(&[0x100, 0x101]))
        .put(0x8200, &[1, 2, 3])
        .put(0x8300, &pfns(&[0x21, 0x22]));
    let inflate = SeedQueue::chains(&[&[(0x8000, 20, R)], &[(0x8100, 8, R), (0x8200, 3, R)]]);
    let deflate = SeedQueue::chains(&[&[(0x8300, 8, R)], &[(HIGH_RAM.0 - 4, 8, R)]]);
    vec![
        (
            "inflate-deflate",
            device_seed(0, 0, &[], &[inflate.clone(), deflate.clone()], &p),
        ),
        (
            "deflate-on-oom-wrap",
            device_seed(
                F_DEVICE_A | F_EVENT_IDX,
                0xfffe,
                &[],
                &[inflate, deflate],
                &p,
            ),
        ),
    ]
}

/// A vsock packet header from the fuzz guest (CID 3) to the host.
fn vsock_header(src_port: u32, dst_port: u32, op: u16, len: u32) -> Vec<u8> {
    use pvm_virtio::vsock::packet::{HOST_CID, Header, TYPE_STREAM};
    Header {
        src_cid: crate::vsock::GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        kind: TYPE_STREAM,
        op,
        buf_alloc: 4096,
        ..Header::default()
    }
    .to_bytes()
    .to_vec()
}

pub fn vsock() -> Seeds {
    use pvm_virtio::vsock::packet::*;
    let port = crate::vsock::HOST_PORT;
    let mut p = Payload::default();
    p.put(0x8000, &vsock_header(5000, port, OP_REQUEST, 0))
        .put(0x8040, &vsock_header(5000, port, OP_RW, 5))
        .put(0x8080, b"hello")
        .put(0x80c0, &vsock_header(5000, port, OP_CREDIT_REQUEST, 0))
        .put(0x8100, &vsock_header(5000, port, OP_SHUTDOWN, 0));
    p.put(0x8120, &3u32.to_le_bytes());
    let rx = SeedQueue::chains(&[
        &[(0x9000, 64, W)],
        &[(0x9100, 44, W), (0x9200, 100, W)],
        &[(0x9300, 8, W)],
        &[(0x9400, 4096, W)],
    ]);
    let tx = SeedQueue::chains(&[
        &[(0x8000, 44, R)],
        &[(0x8040, 44, R), (0x8080, 5, R)],
        &[(0x80c0, 44, R)],
        &[(0x8100, 44, R)],
    ]);
    let mut seeds = vec![(
        "connect-send-shutdown",
        device_seed(0, 0, &[], &[rx.clone(), tx], &p),
    )];
    // A short header, a length past the payload, an unknown op, data for no connection, a
    // request to a port nobody listens on.
    let mut p = Payload::default();
    p.put(0x8000, &vsock_header(1, port, OP_REQUEST, 0)[..20])
        .put(0x8040, &vsock_header(1, port, OP_RW, 1000))
        .put(0x8080, &vsock_header(1, port, 99, 0))
        .put(0x80c0, &vsock_header(7, port, OP_RW, 3))
        .put(0x8100, &vsock_header(8, 4321, OP_REQUEST, 0));
    let tx = SeedQueue::chains(&[
        &[(0x8000, 20, R)],
        &[(0x8040, 44, R), (0x8080, 10, R)],
        &[(0x8080, 44, R)],
        &[(0x80c0, 47, R)],
        &[(0x8100, 44, R)],
    ]);
    seeds.push((
        "malformed-event-idx",
        device_seed(F_EVENT_IDX, 0xfffe, &[], &[rx, tx], &p),
    ));
    seeds
}

/// Guest memory writes laying out one queue at desc/avail/used with one chain of (addr, len,
/// writable) descriptors published.
fn queue_in_memory(
    out: &mut Output,
    mem_op: u8,
    (desc, avail): (u32, u32),
    chain: &[(u64, u32, bool)],
) {
    let mut table = Vec::new();
    for (i, &(addr, len, writable)) in chain.iter().enumerate() {
        let mut flags = if writable {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        if i + 1 < chain.len() {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        table.extend_from_slice(&addr.to_le_bytes());
        table.extend_from_slice(&len.to_le_bytes());
        table.extend_from_slice(&flags.to_le_bytes());
        table.extend_from_slice(&(i as u16 + 1).to_le_bytes());
    }
    out.u8(mem_op).u32(desc).u8(table.len() as u8).bytes(&table);
    out.u8(mem_op).u32(avail).u8(6).bytes(&[0, 0, 1, 0, 0, 0]);
}

pub fn mmio() -> Seeds {
    let mut seeds = Vec::new();
    // Probe the identification registers and config space of each device.
    for (name, kind) in [
        ("probe-rng", 0u8),
        ("probe-block", 1),
        ("probe-console", 2),
        ("probe-net", 3),
    ] {
        let mut out = Output::default();
        out.u8(kind);
        for reg in 0..25u8 {
            out.u8(mmio_op::REG_READ).u8(reg);
        }
        // 8-, 4- and 1-byte config reads; an unaligned register read.
        out.u8(mmio_op::READ | (3 << 3)).u16(0x100);
        out.u8(mmio_op::READ).u16(0x108);
        out.u8(mmio_op::READ | (1 << 3)).u16(0x114);
        out.u8(mmio_op::READ | (1 << 3)).u16(0x71);
        seeds.push((name, out.data));
    }
    // rng: a request in memory, the driver starts, kicks, acknowledges the interrupt, resets.
    let mut out = Output::default();
    out.u8(0);
    queue_in_memory(&mut out, mmio_op::MEM, (0x1000, 0x2000), &[(0x8000, 64, W)]);
    tseed::mmio_init(&mut out, &[(16, 0x1000, 0x2000, 0x3000)]);
    out.u8(mmio_op::KICK).u8(0);
    out.u8(mmio_op::REG_READ).u8(13);
    out.u8(mmio_op::REG_WRITE).u8(14).u32(3);
    out.u8(mmio_op::CONFIG_CHANGE);
    out.u8(mmio_op::REG_WRITE).u8(15).u32(0);
    seeds.push(("rng-request", out.data));
    // block: a read request, then a driver restart with a bad queue size.
    let mut out = Output::default();
    out.u8(1);
    out.u8(mmio_op::MEM)
        .u32(0x8000)
        .u8(16)
        .bytes(&blk_header(0, 0));
    queue_in_memory(
        &mut out,
        mmio_op::MEM,
        (0x1000, 0x2000),
        &[(0x8000, 16, R), (0x9000, 512, W), (0x8100, 1, W)],
    );
    tseed::mmio_init(&mut out, &[(16, 0x1000, 0x2000, 0x3000)]);
    tseed::mmio_init(&mut out, &[(3, 0x1000, 0x2000, 0x3000)]);
    seeds.push(("block-request", out.data));
    // net and console: two queues each.
    for (name, kind) in [("net-start", 3u8), ("console-start", 2)] {
        let mut out = Output::default();
        out.u8(kind);
        queue_in_memory(&mut out, mmio_op::MEM, (0x4000, 0x5000), &[(0x8000, 64, R)]);
        tseed::mmio_init(
            &mut out,
            &[(16, 0x1000, 0x2000, 0x3000), (16, 0x4000, 0x5000, 0x6000)],
        );
        out.u8(mmio_op::KICK).u8(1);
        out.u8(mmio_op::KICK).u8(0);
        seeds.push((name, out.data));
    }
    seeds
}

pub fn pci() -> Seeds {
    let mut seeds = Vec::new();
    // Walk the configuration space: header, capabilities, BAR sizing, the pci_cfg window.
    for (name, kind) in [
        ("probe-rng", 0u8),
        ("probe-block", 1),
        ("probe-console", 2),
        ("probe-net", 3),
    ] {
        let mut out = Output::default();
        out.u8(kind).u8(2);
        for offset in (0..0xa0u16).step_by(4) {
            out.u8(pci_op::CONFIG_READ).u16(offset);
        }
        out.u8(pci_op::CONFIG_WRITE).u16(0x10).u32(u32::MAX);
        out.u8(pci_op::CONFIG_READ).u16(0x10);
        out.u8(pci_op::CONFIG_WRITE).u16(0x10).u32(0xc000_0000);
        out.u8(pci_op::CONFIG_WRITE | (2 << 3))
            .u16(0x04)
            .u16(0x0006);
        // pci_cfg window: BAR0 offset 0x2000 (device config), 4 bytes.
        out.u8(pci_op::CONFIG_WRITE | (1 << 3)).u16(0x84 + 4).u8(0);
        out.u8(pci_op::CONFIG_WRITE).u16(0x84 + 8).u32(0x2000);
        out.u8(pci_op::CONFIG_WRITE).u16(0x84 + 12).u32(4);
        out.u8(pci_op::CONFIG_READ).u16(0x84 + 16);
        // Device config, ISR, MSI-X table and PBA through BAR0.
        out.u8(pci_op::BAR_READ | (3 << 3)).u16(0x2000);
        out.u8(pci_op::BAR_READ | (1 << 3)).u16(0x1000);
        out.u8(pci_op::BAR_READ).u16(0x4000);
        out.u8(pci_op::BAR_READ | (3 << 3)).u16(0x8000);
        for field in 0..25u8 {
            out.u8(pci_op::COMMON_WRITE).u8(field).u64(0);
        }
        seeds.push((name, out.data));
    }
    // rng: request in memory, driver start with MSI-X, kick, masked vector, reset.
    let mut out = Output::default();
    out.u8(0).u8(2);
    queue_in_memory(&mut out, pci_op::MEM, (0x1000, 0x2000), &[(0x8000, 64, W)]);
    tseed::pci_init(&mut out, &[(16, 0x1000, 0x2000, 0x3000)]);
    out.u8(pci_op::KICK).u8(0);
    out.u8(pci_op::BAR_WRITE).u16(0x4000 + 16 + 12).u32(1);
    out.u8(pci_op::KICK | 0x40).u8(0);
    out.u8(pci_op::BAR_READ | (3 << 3)).u16(0x8000);
    out.u8(pci_op::COMMON_WRITE).u8(6).u8(0);
    seeds.push(("rng-msix", out.data));
    // block and net, the MSI sink failing for net.
    for (name, kind, queues) in [
        (
            "block-start",
            1u8,
            &[(16u8, 0x1000u32, 0x2000u32, 0x3000u32)][..],
        ),
        (
            "net-start-sink-fails",
            3 | 0x80,
            &[(16, 0x1000, 0x2000, 0x3000), (16, 0x4000, 0x5000, 0x6000)][..],
        ),
    ] {
        let mut out = Output::default();
        out.u8(kind).u8(3);
        queue_in_memory(&mut out, pci_op::MEM, (0x4000, 0x5000), &[(0x8000, 64, R)]);
        tseed::pci_init(&mut out, queues);
        out.u8(pci_op::KICK).u8(1);
        out.u8(pci_op::KICK).u8(0);
        seeds.push((name, out.data));
    }
    seeds
}

/// An ELF64 x86-64 executable with one PT_LOAD of `code` at 1 MiB and, if `pvh_entry`, a Xen
/// PVH note.
fn elf(code: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
    let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
    let phoff = 64u64;
    let data_off = phoff + 56 * u64::from(phnum);
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\0");
    e.extend_from_slice(&[0; 8]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&0x10_0000u64.to_le_bytes()); // e_entry
    e.extend_from_slice(&phoff.to_le_bytes());
    e.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    e.extend_from_slice(&0u32.to_le_bytes());
    e.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    e.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    e.extend_from_slice(&phnum.to_le_bytes());
    e.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    e.extend_from_slice(&0u16.to_le_bytes());
    e.extend_from_slice(&0u16.to_le_bytes());
    let note = pvh_entry.map(|entry| {
        let mut n = Vec::new();
        n.extend_from_slice(&4u32.to_le_bytes()); // namesz
        n.extend_from_slice(&4u32.to_le_bytes()); // descsz
        n.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        n.extend_from_slice(b"Xen\0");
        n.extend_from_slice(&entry.to_le_bytes());
        n
    });
    let phdr = |e: &mut Vec<u8>, kind: u32, flags: u32, off: u64, addr: u64, size: u64| {
        e.extend_from_slice(&kind.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
        e.extend_from_slice(&off.to_le_bytes());
        e.extend_from_slice(&addr.to_le_bytes()); // vaddr
        e.extend_from_slice(&addr.to_le_bytes()); // paddr
        e.extend_from_slice(&size.to_le_bytes()); // filesz
        e.extend_from_slice(&(size + 0x1000).to_le_bytes()); // memsz
        e.extend_from_slice(&0x1000u64.to_le_bytes());
    };
    phdr(&mut e, 1, 5, data_off, 0x10_0000, code.len() as u64);
    if let Some(n) = &note {
        phdr(
            &mut e,
            4,
            4,
            data_off + code.len() as u64,
            0,
            n.len() as u64,
        );
    }
    e.extend_from_slice(code);
    if let Some(n) = note {
        e.extend_from_slice(&n);
    }
    e
}

/// A bzImage: one setup sector after the boot sector, HdrS header, `payload` as the kernel.
fn bzimage(payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 1024];
    b[0x1f1] = 1; // setup_sects
    b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    b[0x200..0x202].copy_from_slice(&[0xeb, 0x66]); // jump
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // version
    b[0x211] = 0x01; // loadflags: LOADED_HIGH
    b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    b[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    b[0x234] = 1; // relocatable
    b[0x236..0x238].copy_from_slice(&0x0003u16.to_le_bytes()); // xloadflags
    b[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
    b[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes()); // init_size
    b.extend_from_slice(payload);
    b
}

pub fn boot_load() -> Seeds {
    let code = [0xf4u8; 64]; // hlt
    let with = |flags: u8, initrd: Option<&[u8]>, cmdline: Option<&str>, kernel: &[u8]| {
        let mut out = Output::default();
        out.u8(flags);
        if let Some(i) = initrd {
            out.u16(i.len() as u16).bytes(i);
        }
        if let Some(c) = cmdline {
            out.u8(c.len() as u8).bytes(c.as_bytes());
        }
        out.bytes(kernel).data.clone()
    };
    vec![
        ("elf-linux64", with(0, None, None, &elf(&code, None))),
        (
            "elf-pvh-initrd",
            with(
                1 | BOOT_INITRD,
                Some(&[0x07; 600]),
                None,
                &elf(&code, Some(0x10_0010)),
            ),
        ),
        (
            "bzimage-initrd-cmdline",
            with(
                2 | BOOT_INITRD | BOOT_CMDLINE,
                Some(b"070701initrd"),
                Some("root=/dev/vda1 quiet"),
                &bzimage(&code),
            ),
        ),
        (
            "bzimage-above-4g",
            with(3, None, None, &bzimage(&[0x90; 700])),
        ),
        (
            "not-a-kernel",
            with(0, None, None, b"this is not a kernel at all"),
        ),
    ]
}

fn mbr(partitions: &[(u8, u32, u32)]) -> Vec<u8> {
    let mut m = vec![0u8; 512];
    for (i, &(kind, start, sectors)) in partitions.iter().enumerate() {
        let e = 446 + 16 * i;
        m[e + 4] = kind;
        m[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
        m[e + 12..e + 16].copy_from_slice(&sectors.to_le_bytes());
    }
    m[510] = 0x55;
    m[511] = 0xaa;
    m
}

const GPT_LINUX_FS: [u8; 16] = [
    0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4,
];

/// A disk image of `size` bytes with `parts` written at their offsets.
fn image(size: usize, parts: &[(usize, &[u8])]) -> Vec<u8> {
    let mut img = vec![0u8; size];
    for &(at, bytes) in parts {
        img[at..at + bytes.len()].copy_from_slice(bytes);
    }
    img
}

/// An ext4 filesystem image of `size` bytes made by mkfs.ext4 from a directory holding `files`,
/// with fixed UUIDs and time so that it is the same every time.
fn mkfs_ext4(size: u64, options: &str, files: &[(&str, &[u8])]) -> Option<Vec<u8>> {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("pvm-fuzz-seed-{}-{call}", std::process::id()));
    let root = dir.join("root");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&root).ok()?;
    let fixed = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    for (path, contents) in files {
        let p = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).ok()?;
        std::fs::write(&p, contents).ok()?;
        let times = std::fs::FileTimes::new()
            .set_accessed(fixed)
            .set_modified(fixed);
        std::fs::File::options()
            .write(true)
            .open(&p)
            .ok()?
            .set_times(times)
            .ok()?;
    }
    let img = dir.join("img");
    std::fs::File::create(&img).ok()?.set_len(size).ok()?;
    let uuid = "0f0e0d0c-0b0a-4908-8706-050403020100";
    let status = std::process::Command::new("mkfs.ext4")
        .env("E2FSPROGS_FAKE_TIME", "1700000000")
        .args(["-q", "-F", "-b", "1024", "-N", "16", "-m", "0", "-U", uuid])
        .arg(format!("-Eroot_owner=0:0,hash_seed={uuid}"))
        .args(["-O", options, "-d"])
        .arg(&root)
        .arg(&img)
        .status()
        .ok()?;
    let bytes = status.success().then(|| std::fs::read(&img).ok()).flatten();
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

pub fn disk() -> Seeds {
    let mut seeds = Vec::new();
    let mut ext4_magic = vec![0u8; 1082];
    ext4_magic[1080..1082].copy_from_slice(&0xef53u16.to_le_bytes());

    let m = mbr(&[(0x0c, 8, 8), (0x83, 32, 96)]);
    seeds.push((
        "mbr-linux-magic-only",
        image(64 * 1024, &[(0, &m), (32 * 512, &ext4_magic)]),
    ));

    let mut gpt = vec![0u8; 92];
    gpt[0..8].copy_from_slice(b"EFI PART");
    gpt[72..80].copy_from_slice(&2u64.to_le_bytes());
    gpt[80..84].copy_from_slice(&4u32.to_le_bytes());
    gpt[84..88].copy_from_slice(&128u32.to_le_bytes());
    let mut entries = vec![0u8; 256];
    entries[0..16].copy_from_slice(&[1; 16]);
    entries[128..144].copy_from_slice(&GPT_LINUX_FS);
    entries[128 + 32..128 + 40].copy_from_slice(&64u64.to_le_bytes());
    let pmbr = mbr(&[(0xee, 1, 200)]);
    seeds.push((
        "gpt-linux-magic-only",
        image(
            64 * 1024,
            &[
                (0, &pmbr),
                (512, &gpt),
                (1024, &entries),
                (64 * 512, &ext4_magic),
            ],
        ),
    ));

    let kernel = bzimage(&[0xf4; 256]);
    let files: &[(&str, &[u8])] = &[
        ("/boot/vmlinuz-6.1.0-9-amd64", &kernel),
        ("/boot/vmlinuz-6.10.0-1-amd64", &kernel),
        ("/boot/initrd.img-6.10.0-1-amd64", b"070701 initrd"),
        ("/boot/config-6.10.0-1-amd64", b"CONFIG_VIRTIO_BLK=y\n"),
    ];
    // Whole-disk ext4 with checksums (mkfs's defaults), and an MBR partition without them.
    if let Some(fs) = mkfs_ext4(64 * 1024, "^has_journal,^resize_inode", files) {
        seeds.push(("ext4-whole-disk", fs));
    }
    let plain = [("/vmlinuz", &kernel[..]), ("/initrd.img", b"initrd")];
    if let Some(fs) = mkfs_ext4(
        64 * 1024,
        "^has_journal,^resize_inode,^metadata_csum,^64bit",
        &plain,
    ) {
        let m = mbr(&[(0x83, 2, 128)]);
        seeds.push((
            "ext4-mbr-partition",
            image(1024 + fs.len(), &[(0, &m), (1024, &fs)]),
        ));
    }
    seeds
        .into_iter()
        .map(|(name, img)| (name, encode_sparse(&img)))
        .collect()
}

/// Named seed inputs of one target.
/// Raw client bytes: requests a client sends, and a config file (tried as every body).
pub fn api_request() -> Seeds {
    vec![
        (
            "configure-and-start",
            b"PUT /machine-config HTTP/1.1\r\nContent-Length: 38\r\n\r\n{\"vcpu_count\": 2, \"mem_size_mib\": 256}PUT /drives/rootfs HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 99\r\n\r\n{\"drive_id\": \"rootfs\", \"path_on_host\": \"/x\", \"is_root_device\": true, \"cache_type\": \"Writeback\"}    PUT /actions HTTP/1.1\r\nContent-Length: 33\r\n\r\n{\"action_type\": \"InstanceStart\"}\n".to_vec(),
        ),
        (
            "gets-and-close",
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\nGET /vm/config HTTP/1.1\r\n\r\nGET /machine-config HTTP/1.0\r\nConnection: close\r\n\r\n".to_vec(),
        ),
        (
            "config-file",
            b"{\"boot-source\": {\"kernel_image_path\": \"/k\", \"boot_args\": \"console=ttyS0 pci=off\"}, \"drives\": [], \"machine-config\": {\"vcpu_count\": 1, \"mem_size_mib\": 128, \"smt\": false}, \"network-interfaces\": [{\"iface_id\": \"eth0\", \"host_dev_name\": \"tap0\", \"guest_mac\": \"06:00:00:00:00:01\"}], \"vsock\": null}".to_vec(),
        ),
        (
            "expect-continue-patch",
            b"PATCH /vm HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 19\r\n\r\n{\"state\": \"Paused\"}PUT /network-interfaces/eth0 HTTP/1.1\r\nContent-Length: 42\r\n\r\n{\"iface_id\": \"eth1\", \"host_dev_name\": \"t\"}".to_vec(),
        ),
    ]
}

pub type Seeds = Vec<(&'static str, Vec<u8>)>;

/// Every target's seeds, by target name.
pub fn all() -> Vec<(&'static str, Seeds)> {
    vec![
        ("block", block()),
        ("net_tx", net_tx()),
        ("net_rx", net_rx()),
        ("console", console()),
        ("rng", rng()),
        ("mmio", mmio()),
        ("pci", pci()),
        ("boot_load", boot_load()),
        ("disk_kernel", disk()),
        ("api_request", api_request()),
        ("balloon", balloon()),
        ("vsock", vsock()),
        ("snapshot_file", crate::snapshot::seeds()),
        ("virtio_fs", crate::virtio_fs::seeds()),
        ("uffd_message", crate::uffd::seeds()),
    ]
}

/// Writes the seeds into `corpus/<target>/<name>`.
pub fn write(corpus: &Path) -> std::io::Result<()> {
    for (target, seeds) in all() {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes)?;
        }
    }
    Ok(())
}

//! The vsock device's packet paths: transmitted packets from the fuzz input (connection
//! requests, data, credit, shutdowns, resets, garbage) and the receive queue the answers go
//! into. A host process listens on port [`HOST_PORT`], so requests to it connect. Input: the
//! device targets' common header (no device-specific bits), then the receive queue and the
//! transmit queue (see crate::queue), then the payload. The event queue has empty rings.
//!
//! Checked: no panic, used entries only for published chains, and every packet delivered into a
//! receive buffer at least a whole header long (or nothing written).

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::OnceLock;

use pvm_virtio::Vsock;
use pvm_virtio::vsock::packet::HEADER_LEN;

use crate::devices::{common, negotiate, rings_intact, run};
use crate::queue::guest_memory;

/// The host port whose Unix socket listens.
pub const HOST_PORT: u32 = 1234;
/// The guest's CID: seeds send packets from it.
pub const GUEST_CID: u64 = 3;

/// This process's socket directory and the listener at `<uds>_<HOST_PORT>`.
struct Host {
    uds: PathBuf,
    listener: UnixListener,
}

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pvm-fuzz-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("socket directory");
        let uds = dir.join("v");
        let port = dir.join(format!("v_{HOST_PORT}"));
        let _ = std::fs::remove_file(&port);
        let listener = UnixListener::bind(&port).expect("host listener");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        Host { uds, listener }
    })
}

pub fn vsock(data: &[u8]) {
    let mut c = common(data);
    let host = host();
    // One device per run, its listener bound afresh where the last one was.
    let _ = std::fs::remove_file(&host.uds);
    let mut device = Vsock::new(GUEST_CID, &host.uds).expect("vsock device");
    c.acked = negotiate(&device, c.features, 0);
    let mem = guest_memory();
    let (queues, interrupt) = run(&mut device, &mem, &mut c);
    // Close what the device connected (the reset closed its side), and make the next run's
    // connections fail when nobody should listen.
    while host.listener.accept().is_ok() {}
    if rings_intact(&queues) {
        let received = queues[0].check(&mem, interrupt.count(0));
        let transmitted = queues[1].check(&mem, interrupt.count(1));
        for &(_, len) in &received {
            assert!(
                len == 0 || len as usize >= HEADER_LEN,
                "a {len}-byte packet"
            );
        }
        assert!(transmitted.iter().all(|&(_, len)| len == 0));
    }
    drop(device);
    let _ = std::fs::remove_file(&host.uds);
}

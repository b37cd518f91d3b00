//! virtio-vsock in real guests (Debian's cloud kernel with its vsock drivers), in one batch:
//!
//! - `hybrid` (pvm's own device, virtio-pci): 4 MB guest to host into the Unix socket at
//!   `v.sock_5000` and 4 MB host to guest through `CONNECT 52`, checksummed at both ends; 32
//!   host connections at once; a host sender killed mid-stream (the guest sees its connection
//!   end, later connections still work); a driver reload, after which the guest connects
//!   again;
//! - `vhost` (`vhost=on`, the emulated host's vhost_vsock, which needs vsock and
//!   vmw_vsock_virtio_transport_common loaded first; virtio-mmio so calls are relayed):
//!   4 MB each way over AF_VSOCK, checksummed.
//!
//! Busybox has no vsock tools: `pvm-vsock-helper` (tests/vsock-helper) is both ends. The guest
//! gets it and the vsock modules from a read-only disk (4 KiB-aligned pieces it copies out with
//! dd), so the shared initramfs code stays as it is.

mod common;

use common::{
    Batch, Kernel, Scenario, extra_module as module, vsock_helper_binary as helper_binary,
};

const MB4: usize = 4_000_000;

/// A disk image of `files` at 4 KiB boundaries and the guest lines that copy them out.
fn files_disk(files: &[(&str, Vec<u8>)]) -> (Vec<u8>, String) {
    let mut image = Vec::new();
    let mut script = String::new();
    for (name, data) in files {
        let skip = image.len() / 4096;
        let count = data.len().div_ceil(4096);
        image.extend_from_slice(data);
        image.resize((skip + count) * 4096, 0);
        script.push_str(&format!(
            "dd if=/dev/vda of={name} bs=4096 skip={skip} count={count} 2>/dev/null\n"
        ));
    }
    (image, script)
}

/// Waits (up to 120 s) until the guest's receiver on `port` has seen `count` connections.
fn wait_received(port: u32, count: usize) -> String {
    format!(
        "i=0; while [ $(grep -c '^recv' /tmp/s{port}) -lt {count} ] && [ $i -lt 120 ]; do \
         sleep 1; i=$((i+1)); done\n\
         echo \"guest-s{port}: $(grep -c '^recv' /tmp/s{port})\"\n"
    )
}

/// A guest with the helper at /h and the vsock drivers loaded, then `body`.
fn vsock_guest(name: &str, body: &str) -> Scenario {
    let (disk, extract) = files_disk(&[
        ("/h", std::fs::read(helper_binary()).expect("the helper")),
        ("/vsock.ko", module("vsock")),
        ("/common.ko", module("vmw_vsock_virtio_transport_common")),
        ("/transport.ko", module("vmw_vsock_virtio_transport")),
    ]);
    let init = format!(
        "{extract}chmod +x /h\n\
         for m in vsock common transport; do insmod /$m.ko || echo \"insmod $m failed\"; done\n\
         {body}"
    );
    Scenario::boot(name, Kernel::DebianBzImage, 2, &init)
        .file("files.img", disk)
        .args(["--disk", "files.img,ro"])
        .program("pvm-vsock-helper")
        .timeout(240)
}

fn hybrid() -> Scenario {
    let guest = format!(
        "/h serve-vsock 52 > /tmp/s52 2>&1 &\n\
         /h serve-vsock 53 > /tmp/s53 2>&1 &\n\
         /h send-vsock 2 5000 {MB4} 1\n\
         {}sed 's/^/s53: /' /tmp/s53\n\
         drv=/sys/bus/virtio/drivers/vmw_vsock_virtio_transport\n\
         for d in $drv/virtio*; do dev=$(basename $d); done\n\
         echo $dev > $drv/unbind && echo $dev > $drv/bind && echo \"reloaded $dev\"\n\
         /h send-vsock 2 5000 200000 1\n",
        wait_received(52, 34)
    );
    let host = format!(
        "pvm-vsock-helper serve-unix v.sock_5000 > serve.log 2>&1 &\n\
         S=$!\n\
         (\n\
         pvm-vsock-helper send-unix v.sock 52 {MB4} 1 > h2g.log 2>&1\n\
         pvm-vsock-helper send-unix v.sock 52 65536 32 > many.log 2>&1\n\
         pvm-vsock-helper send-unix v.sock 53 1000000000 1 > killed.log 2>&1 &\n\
         K=$!; sleep 3; kill -9 $K\n\
         pvm-vsock-helper send-unix v.sock 52 100000 1 > after.log 2>&1\n\
         ) &\n\
         {{pvm}}\n\
         rc=$?\n\
         kill $S\n\
         for f in serve h2g many killed after; do sed \"s/^/$f: /\" $f.log; done\n\
         exit $rc\n"
    );
    vsock_guest("hybrid", &guest)
        .args(["--vsock", "cid=3,socket=v.sock"])
        .script(&host)
}

fn vhost() -> Scenario {
    let guest = format!(
        "/h serve-vsock 52 > /tmp/s52 2>&1 &\n\
         /h send-vsock 2 5000 {MB4} 1\n\
         {}",
        wait_received(52, 1)
    );
    let host = format!(
        "for m in host-vsock host-common vhost_vsock; do \
         insmod ./$m.ko || echo host-insmod-failed; done\n\
         for i in $(seq 1 20); do [ -e /dev/vhost-vsock ] && break; sleep 0.5; done\n\
         [ -e /dev/vhost-vsock ] || mknod /dev/vhost-vsock c 10 241\n\
         pvm-vsock-helper serve-vsock 5000 > serve.log 2>&1 &\n\
         S=$!\n\
         pvm-vsock-helper send-vsock 3 52 {MB4} 1 > h2g.log 2>&1 &\n\
         {{pvm}}\n\
         rc=$?\n\
         kill $S\n\
         for f in serve h2g; do sed \"s/^/$f: /\" $f.log; done\n\
         exit $rc\n"
    );
    vsock_guest("vhost", &guest)
        .file("host-vsock.ko", module("vsock"))
        .file(
            "host-common.ko",
            module("vmw_vsock_virtio_transport_common"),
        )
        .file("vhost_vsock.ko", module("vhost_vsock"))
        .args(["--transport", "mmio", "--vsock", "cid=3,vhost=on"])
        .script(&host)
}

fn scenarios() -> Vec<Scenario> {
    vec![hybrid(), vhost()]
}

static BATCH: Batch = Batch::new(scenarios);

#[test]
fn hybrid_vsock_moves_megabytes_both_ways_with_matching_checksums() {
    let o = BATCH.outcome("hybrid");
    o.assert_rc(0);
    // The guest's sender (its own line) and the host's (prefixed "h2g: ").
    let sent = format!("sent OK {MB4}");
    assert!(o.console.matches(&sent).count() >= 2, "{}", o.console);
    o.assert_contains(&format!("h2g: {sent}"));
    o.assert_contains(&format!("serve: recv {MB4}"));
    o.assert_contains("h2g: send-done ok=1");
}

#[test]
fn hybrid_vsock_serves_32_connections_at_once() {
    let o = BATCH.outcome("hybrid");
    o.assert_contains("many: send-done ok=32");
    o.assert_contains("guest-s52: 34");
}

#[test]
fn a_host_peer_killed_mid_stream_ends_only_its_connection() {
    let o = BATCH.outcome("hybrid");
    o.assert_contains("s53: recv");
    o.assert_lacks("s53: recv 1000000000");
    o.assert_contains("after: send-done ok=1");
}

#[test]
fn the_guest_connects_again_after_a_driver_reload() {
    let o = BATCH.outcome("hybrid");
    o.assert_contains("reloaded virtio");
    o.assert_contains("serve: recv 200000");
    o.assert_contains("sent OK 200000");
}

#[test]
fn vhost_vsock_moves_megabytes_both_ways_over_af_vsock() {
    let o = BATCH.outcome("vhost");
    o.assert_rc(0);
    o.assert_lacks("host-insmod-failed");
    o.assert_contains(&format!("serve: recv {MB4}"));
    o.assert_contains(&format!("sent OK {MB4}"));
    o.assert_contains("h2g: send-done ok=1");
    o.assert_contains("guest-s52: 1");
}

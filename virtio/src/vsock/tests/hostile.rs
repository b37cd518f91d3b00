//! Hostile and broken packets from the guest: each is dropped or answered with RST, never
//! trusted, and the device keeps serving.

use std::io::Write;

use super::*;

/// Checks the device still answers: a request to a port nobody listens on gets an RST.
fn still_serves(guest: &Guest) {
    guest.send(guest.header(1, 1, OP_REQUEST), &[]);
    let (reply, _) = guest.next();
    assert_eq!((reply.op, reply.src_port, reply.dst_port), (OP_RST, 1, 1));
}

#[test]
fn short_headers_and_bad_chains_are_dropped() {
    let guest = Guest::start();
    guest.send_descs(&[readable(0x90_0000, 20)]);
    guest.send_descs(&[writable(0x90_0000, 64)]);
    guest.send_descs(&[readable(0x40_0000_0000, 44)]);
    guest.send_descs(&[readable(0xff_fff0, 44)]);
    guest.send_descs(&[]);
    guest.quiet();
    still_serves(&guest);
}

#[test]
fn packets_not_from_this_guest_or_not_for_the_host_are_dropped() {
    let guest = Guest::start();
    let mut other = guest.header(5000, 9, OP_REQUEST);
    other.src_cid = CID + 1;
    guest.send(other, &[]);
    let mut elsewhere = guest.header(5000, 9, OP_REQUEST);
    elsewhere.dst_cid = 7;
    guest.send(elsewhere, &[]);
    guest.quiet();
    still_serves(&guest);
}

#[test]
fn bad_lengths_unknown_ops_and_types_are_reset() {
    let guest = Guest::start();
    let listener = guest.listen(9);
    let _host = guest.connect(&listener, 5000, 9);
    // A length beyond the payload, on a live connection: reset.
    let mut long = guest.header(5000, 9, OP_RW);
    long.len = 100;
    guest.send(long, b"0123456789");
    assert_eq!(guest.next().0.op, OP_RST);
    // A length beyond any packet, a payload on a control packet, an unknown op, a datagram.
    for (op, len, kind) in [(OP_RW, u32::MAX, TYPE_STREAM), (OP_REQUEST, 4, TYPE_STREAM)]
        .into_iter()
        .chain([
            (99, 0, TYPE_STREAM),
            (0, 0, TYPE_STREAM),
            (OP_REQUEST, 0, 3),
        ])
    {
        let mut header = guest.header(5001, 9, op);
        header.len = len;
        header.kind = kind;
        guest.send(header, b"data");
        let (reply, _) = guest.next();
        assert_eq!(
            (reply.op, reply.dst_port),
            (OP_RST, 5001),
            "op {op} len {len}"
        );
    }
    guest.quiet();
}

#[test]
fn packets_for_unknown_connections_are_reset_but_an_rst_is_not_answered() {
    let guest = Guest::start();
    for op in [
        OP_RW,
        OP_RESPONSE,
        OP_SHUTDOWN,
        OP_CREDIT_UPDATE,
        OP_CREDIT_REQUEST,
    ] {
        guest.send(
            guest.header(5000, 9, op),
            if op == OP_RW { b"x" } else { b"" },
        );
        assert_eq!(guest.next().0.op, OP_RST, "op {op}");
    }
    guest.send(guest.header(5000, 9, OP_RST), &[]);
    guest.quiet();
    // A RESPONSE to a connection the guest started itself is a protocol error too.
    let listener = guest.listen(9);
    let _host = guest.connect(&listener, 5000, 9);
    guest.send(guest.header(5000, 9, OP_RESPONSE), &[]);
    assert_eq!(guest.next().0.op, OP_RST);
    // As is a second request for a live connection.
    let _host = guest.connect(&listener, 5001, 9);
    guest.send(guest.header(5001, 9, OP_REQUEST), &[]);
    assert_eq!(guest.next().0.op, OP_RST);
}

#[test]
fn a_guest_sending_beyond_its_credit_is_reset() {
    let guest = Guest::start();
    let listener = guest.listen(9);
    // The host never reads: its socket buffer fills, then pvm's up to BUF_ALLOC, then reset.
    let _host = guest.connect(&listener, 5000, 9);
    let chunk = vec![1u8; MAX_PAYLOAD];
    let mut reset = false;
    for _ in 0..64 {
        guest.send(guest.header(5000, 9, OP_RW), &chunk);
        std::thread::sleep(Duration::from_millis(2));
        let got = guest.received();
        if got.iter().any(|(h, _)| h.op == OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "4 MiB sent against a 256 KiB credit without a reset");
}

#[test]
fn control_packets_without_receive_buffers_stall_only_the_guest() {
    let guest = Guest::start();
    // Requests for ports nobody listens on, each answered with an RST, while the guest posts
    // no more receive buffers than its first 8: the device stops reading the transmit queue
    // once MAX_CONTROL answers wait.
    let mut sent = 0;
    loop {
        let room = eventually(|| guest.tx_room());
        if !room {
            break;
        }
        guest.tx_chain_request(sent);
        sent += 1;
        assert!(sent <= 2 * MAX_CONTROL as u32, "the device never stopped");
    }
    assert!(sent as usize >= MAX_CONTROL, "stalled after {sent}");
    // Every answer arrives once the guest posts buffers, and the queue moves again.
    let mut resets = 0;
    assert!(eventually(|| {
        resets += guest.received().len();
        resets == sent as usize
    }));
    still_serves(&guest);
    let _ = std::io::stderr().flush();
}

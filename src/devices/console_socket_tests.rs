use super::*;
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pvm-console-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("console")
}

/// A served console socket with its own ring (not the process-wide one), whose input sink
/// takes at most `room` bytes in all and reports what it took.
fn serve(path: &Path, room: usize) -> (Arc<OutputRing>, Receiver<Vec<u8>>) {
    let ring = Arc::new(OutputRing::new().unwrap());
    let listener = UnixListener::bind(path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let socket = ConsoleSocket {
        listener,
        ring: ring.clone(),
        path: path.to_path_buf(),
    };
    let (tx, rx) = channel();
    let mut left = room;
    let sink: InputSink = Box::new(move |bytes: &[u8]| {
        let n = bytes.len().min(left);
        left -= n;
        if n > 0 {
            let _ = tx.send(bytes[..n].to_vec());
        }
        n
    });
    socket.spawn(sink, false).unwrap();
    (ring, rx)
}

fn client(path: &Path) -> UnixStream {
    let stream = UnixStream::connect(path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
}

fn read_until(stream: &mut UnixStream, want: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&seen).contains(want) {
        assert!(Instant::now() < deadline, "no {want:?} in {seen:?}");
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed before {want:?}: {seen:?}");
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[test]
fn the_ring_drops_the_oldest_and_counts() {
    let ring = OutputRing::new().unwrap();
    ring.push(&vec![b'a'; OUTPUT_RING - 2]);
    ring.push(b"bcde");
    assert_eq!(ring.dropped_total(), 2);
    let bytes: Vec<u8> = ring.lock().bytes.iter().copied().collect();
    assert_eq!(bytes.len(), OUTPUT_RING);
    assert!(bytes.ends_with(b"aabcde"));
    // One write larger than the ring keeps its tail.
    let mut big = vec![b'x'; OUTPUT_RING];
    big.extend_from_slice(b"tail");
    ring.push(&big);
    assert!(
        ring.lock()
            .bytes
            .iter()
            .copied()
            .eq(big[4..].iter().copied())
    );
    assert_eq!(ring.dropped_total(), 2 + OUTPUT_RING as u64 + 4);
}

#[test]
fn output_and_input_go_through_and_a_second_client_is_refused() {
    let path = scratch("io");
    let (ring, input) = serve(&path, usize::MAX);
    // Printed before anyone attached: kept for the first client.
    RingWriter(ring.clone()).write_all(b"early boot\n").unwrap();
    let mut first = client(&path);
    read_until(&mut first, "early boot");
    RingWriter(ring.clone()).write_all(b"login: ").unwrap();
    read_until(&mut first, "login: ");
    first.write_all(b"root\r").unwrap();
    assert_eq!(
        input.recv_timeout(Duration::from_secs(5)).unwrap(),
        b"root\r"
    );
    let mut second = client(&path);
    let mut refused = Vec::new();
    second.read_to_end(&mut refused).unwrap();
    assert_eq!(refused, BUSY);
    // The first client detaches; output meanwhile is kept; the next client gets it.
    drop(first);
    RingWriter(ring.clone()).write_all(b"while away").unwrap();
    let mut third = client(&path);
    read_until(&mut third, "while away");
    third.write_all(b"x").unwrap();
    assert_eq!(input.recv_timeout(Duration::from_secs(5)).unwrap(), b"x");
}

#[test]
fn a_flooding_client_is_held_back_and_output_never_blocks() {
    let path = scratch("flood");
    // The guest takes 10 bytes and nothing more.
    let (ring, input) = serve(&path, 10);
    let mut flood = client(&path);
    flood.set_nonblocking(true).unwrap();
    let garbage: Vec<u8> = (0..=255u8).cycle().take(1 << 16).collect();
    let mut sent = 0usize;
    let deadline = Instant::now() + Duration::from_secs(5);
    // Writes until the socket stops taking: pvm does not read what the guest cannot take.
    while Instant::now() < deadline {
        match flood.write(&garbage) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                if flood.write(&garbage).is_err() {
                    break;
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(Instant::now() < deadline, "the flood was never held back");
    assert!(
        sent < 16 << 20,
        "pvm took {sent} bytes from a flooding client"
    );
    let taken: usize = input.try_iter().map(|b| b.len()).sum();
    assert_eq!(taken, 10);
    // A client that never reads: the guest's output still returns at once, dropping the
    // oldest.
    let start = Instant::now();
    for _ in 0..64 {
        RingWriter(ring.clone()).write_all(&[b'o'; 8192]).unwrap();
    }
    assert!(start.elapsed() < Duration::from_secs(2));
    let deadline = Instant::now() + Duration::from_secs(5);
    while ring.dropped_total() == 0 {
        assert!(Instant::now() < deadline, "nothing dropped");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The next client first hears how much was dropped, then the most recent output.
    drop(flood);
    RingWriter(ring.clone())
        .write_all(&vec![b'n'; OUTPUT_RING + 10])
        .unwrap();
    RingWriter(ring.clone()).write_all(b"newest").unwrap();
    let mut next = client(&path);
    let seen = read_until(&mut next, "newest");
    assert!(
        seen.contains("bytes of console output were dropped while nobody read them"),
        "{seen:.200}"
    );
}

#[test]
fn bind_routes_the_uart_and_virtio_console_to_the_socket_and_tees_serial_out() {
    // The process-wide ring: the only test here that binds through `bind`.
    let path = scratch("bound");
    let socket = bind(&path, false).unwrap();
    let (tx, _rx) = channel::<Vec<u8>>();
    socket
        .spawn(
            Box::new(move |bytes: &[u8]| {
                let _ = tx.send(bytes.to_vec());
                bytes.len()
            }),
            false,
        )
        .unwrap();
    let file = path.with_file_name("serial.out");
    let mut uart = serial_output(Some(&file)).unwrap();
    let mut hvc = virtio_output();
    let mut client = client(&path);
    uart.write_all(b"early-uart ").unwrap();
    hvc.write_all(b"then-hvc0").unwrap();
    read_until(&mut client, "early-uart then-hvc0");
    // --serial-out still gets the UART's output, and only that.
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "early-uart ");
    // A second bind of the same path is refused: the socket is live.
    assert!(matches!(bind(&path, false), Err(Error::RunDir(_))));
}

#[test]
fn a_client_that_left_input_unread_is_seen_gone() {
    let path = scratch("gone");
    let listener = UnixListener::bind(&path).unwrap();
    let peer = UnixStream::connect(&path).unwrap();
    let (attached, _) = listener.accept().unwrap();
    let mut server = Server {
        socket: ConsoleSocket {
            listener,
            ring: Arc::new(OutputRing::new().unwrap()),
            path: path.clone(),
        },
        epoll: Epoll::new().unwrap(),
        input: Box::new(|bytes: &[u8]| bytes.len()),
        client: Some(attached),
        pending: Vec::new(),
    };
    assert!(!server.client_closed(), "a live client is not gone");
    // Input pvm has not read yet, then the client leaves: a new client must not be refused
    // because that input is still queued.
    (&peer).write_all(&[b'x'; 3 * INPUT_CHUNK]).unwrap();
    assert!(
        !server.client_closed(),
        "unread input alone is not a hang-up"
    );
    drop(peer);
    assert!(server.client_closed());
    server.client = None;
    assert!(!server.client_closed());
}

//! `--console socket[=PATH]`: the guest console on a Unix socket instead of the terminal.
//!
//! Output (the UART's, and virtio-console's once the guest uses hvc0) goes into a bounded ring
//! ([`OUTPUT_RING`] bytes): writing never blocks the vCPU or device thread that prints; when
//! the ring is full the oldest bytes are dropped and counted. The console thread sends the ring
//! to the attached client as fast as the client reads; a client attaching gets what the ring
//! still holds (recent output), preceded by a note of how much was dropped since the last one.
//!
//! Input from the client goes to the guest as the terminal's does: the UART, or virtio-console
//! when the VM has one. Input the guest does not take yet stays with the client: its socket is
//! not read until the guest has taken what came before, so a flooding client fills its own
//! socket buffer and nothing of pvm's.
//!
//! One client at a time: a second one is told the console is busy and closed. A client that
//! disconnects just detaches; the guest runs on. The thread is sandboxed with the API thread's
//! filter, which allows exactly what it does (epoll, accept4, reading and writing its sockets,
//! a zero-timeout poll asking whether the attached client has gone, an eventfd, futexes).

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Console output kept for a client that is slow or absent.
pub const OUTPUT_RING: usize = 64 * 1024;
/// What a second client reads before it is closed.
pub const BUSY: &[u8] = b"pvm: console busy: another client is attached\r\n";

const TOKEN_LISTENER: u64 = 0;
const TOKEN_CLIENT: u64 = 1;
const TOKEN_OUTPUT: u64 = 2;

/// Why the console socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--console socket: {0}")]
    RunDir(#[from] crate::manage::rundir::RunDirError),
    #[error("--console socket {}: {source}", .path.display())]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("console socket: {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

impl Error {
    /// The user's path is at fault (taken, not a socket, no such directory), not pvm.
    pub fn is_usage(&self) -> bool {
        !matches!(self, Error::Io { .. })
    }
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// Console output waiting for a client, and the eventfd that wakes the console thread.
pub struct OutputRing {
    ring: Mutex<Ring>,
    ready: EventFd,
}

#[derive(Default)]
struct Ring {
    bytes: VecDeque<u8>,
    /// Dropped since the last client attached (reported to the next one).
    dropped: u64,
    /// Dropped in all.
    dropped_total: u64,
}

impl OutputRing {
    fn new() -> Result<Self, Error> {
        Ok(OutputRing {
            ring: Mutex::new(Ring::default()),
            ready: EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `bytes`, dropping the oldest to stay within [`OUTPUT_RING`].
    fn push(&self, bytes: &[u8]) {
        {
            let mut ring = self.lock();
            let keep = &bytes[bytes.len().saturating_sub(OUTPUT_RING)..];
            let over = (ring.bytes.len() + keep.len()).saturating_sub(OUTPUT_RING);
            let lost = over + (bytes.len() - keep.len());
            if lost > 0 && ring.dropped_total == 0 {
                log::warn!(
                    "console socket: nobody reads the console; dropping its oldest output \
                     (warned once)"
                );
            }
            ring.bytes.drain(..over);
            ring.bytes.extend(keep);
            ring.dropped = ring.dropped.saturating_add(lost as u64);
            ring.dropped_total = ring.dropped_total.saturating_add(lost as u64);
        }
        // EAGAIN only means the counter is saturated: the thread is woken anyway.
        let _ = self.ready.write(1);
    }

    /// Bytes dropped so far.
    pub fn dropped_total(&self) -> u64 {
        self.lock().dropped_total
    }
}

/// A writer into the ring, for the UART and virtio-console.
pub struct RingWriter(Arc<OutputRing>);

impl Write for RingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes to both (the UART's output to --serial-out and to the console socket).
pub struct Tee(pub Box<dyn Write + Send>, pub RingWriter);

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The file drops what it cannot take itself; the ring always takes everything.
        let _ = self.0.write_all(buf);
        self.1.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// The ring of the console socket this process serves (one VM per process); set by [`bind`].
static RING: OnceLock<Arc<OutputRing>> = OnceLock::new();

/// Console output dropped so far because nobody read it (None: no console socket).
pub fn dropped_total() -> Option<u64> {
    RING.get().map(|ring| ring.dropped_total())
}

/// Where virtio-console writes: the console socket's ring if there is one, else stdout.
pub fn virtio_output() -> Box<dyn Write + Send> {
    match RING.get() {
        Some(ring) => Box::new(RingWriter(ring.clone())),
        None => Box::new(std::io::stdout()),
    }
}

/// The UART's output: the --serial-out file, the console socket's ring, both, or stdout.
pub fn serial_output(
    serial_out: Option<&Path>,
) -> Result<Box<dyn Write + Send>, super::serial_out::OpenError> {
    match (serial_out, RING.get()) {
        (None, Some(ring)) => Ok(Box::new(RingWriter(ring.clone()))),
        (Some(path), Some(ring)) => Ok(Box::new(Tee(
            super::serial_out::open(Some(path))?,
            RingWriter(ring.clone()),
        ))),
        (path, None) => super::serial_out::open(path),
    }
}

/// A bound console socket, not yet served.
pub struct ConsoleSocket {
    listener: UnixListener,
    ring: Arc<OutputRing>,
    path: PathBuf,
}

/// Binds the console socket at `path` (its directory made if it is the run directory; a stale
/// socket there removed) and makes the VM's console output go to it.
pub fn bind(path: &Path, in_run_dir: bool) -> Result<ConsoleSocket, Error> {
    use crate::manage::rundir;
    if in_run_dir {
        if let Some(dir) = path.parent() {
            rundir::ensure(dir)?;
        }
    }
    rundir::claim(path)?;
    let listener = UnixListener::bind(path).map_err(|source| Error::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(io_err("non-blocking listener"))?;
    let ring = Arc::new(OutputRing::new()?);
    let ring = RING.get_or_init(|| ring).clone();
    Ok(ConsoleSocket {
        listener,
        ring,
        path: path.to_path_buf(),
    })
}

/// Gives guest input to the UART or virtio-console; returns how many bytes it took.
pub type InputSink = Box<dyn FnMut(&[u8]) -> usize + Send>;

impl ConsoleSocket {
    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves the socket on its own thread, which installs the API thread's seccomp filter
    /// first when `sandbox` is set.
    pub fn spawn(self, input: InputSink, sandbox: bool) -> Result<(), Error> {
        let epoll = Epoll::new().map_err(io_err("epoll"))?;
        for (fd, token) in [
            (self.listener.as_raw_fd(), TOKEN_LISTENER),
            (self.ring.ready.as_raw_fd(), TOKEN_OUTPUT),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(io_err("epoll_ctl"))?;
        }
        let (ready, started) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("console".to_string())
            .spawn(move || {
                if sandbox {
                    let installed = crate::seccomp::install(crate::seccomp::ThreadKind::Api, false);
                    let failed = installed.is_err();
                    let _ = ready.send(installed);
                    if failed {
                        return;
                    }
                } else {
                    let _ = ready.send(Ok(()));
                }
                let mut server = Server {
                    socket: self,
                    epoll,
                    input,
                    client: None,
                    pending: Vec::new(),
                };
                server.run();
            })
            .map_err(io_err("spawning the console thread"))?;
        match started.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Io {
                what: "sandboxing the console thread",
                source: std::io::Error::other(e.to_string()),
            }),
            Err(_) => Err(Error::Io {
                what: "starting the console thread",
                source: ErrorKind::BrokenPipe.into(),
            }),
        }
    }
}

/// Client input read at once (and held until the guest took it).
const INPUT_CHUNK: usize = 4096;

struct Server {
    socket: ConsoleSocket,
    epoll: Epoll,
    input: InputSink,
    client: Option<UnixStream>,
    /// Client input the guest has not taken yet; the client is not read meanwhile.
    pending: Vec<u8>,
}

impl Server {
    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 4];
        loop {
            // Input the guest could not take yet is retried on a short timer.
            let timeout = if self.pending.is_empty() { -1 } else { 10 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("console thread: epoll_wait: {e}; the console socket stops");
                    return;
                }
            };
            // The client's hang-up before new connections: a client that detaches and
            // reattaches at once must not find itself refused.
            events[..n].sort_by_key(|e| e.data() != TOKEN_CLIENT);
            for event in &events[..n] {
                match event.data() {
                    TOKEN_LISTENER => self.accept(),
                    TOKEN_OUTPUT => {
                        let _ = self.socket.ring.ready.read();
                    }
                    TOKEN_CLIENT => {
                        let set = event.event_set();
                        if set.contains(EventSet::IN) && self.pending.is_empty() {
                            self.read_client();
                        } else if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                            self.detach("hung up");
                        }
                    }
                    _ => {}
                }
            }
            self.offer_input();
            self.send_output();
            self.update_interest();
        }
    }

    /// Takes every waiting connection: the first becomes the client, the others are refused.
    fn accept(&mut self) {
        loop {
            let mut stream = match crate::api::server::accept_client(&self.socket.listener) {
                Ok(Some(stream)) => stream,
                Ok(None) => return,
                Err(e) => {
                    log::warn!("console socket: accept: {e}");
                    return;
                }
            };
            if self.client_closed() {
                self.detach("closed");
            }
            if self.client.is_some() {
                // Best effort: the busy note fits any socket buffer; then it is closed.
                let _ = stream.write(BUSY);
                log::info!("console socket: a second client was refused");
                continue;
            }
            let added = self.epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_CLIENT),
            );
            if added.is_err() {
                continue;
            }
            let dropped = std::mem::take(&mut self.socket.ring.lock().dropped);
            if dropped > 0 {
                let note = format!(
                    "\r\n[pvm: {dropped} bytes of console output were dropped while nobody \
                     read them]\r\n"
                );
                let _ = stream.write(note.as_bytes());
            }
            log::info!("console socket: a client attached");
            self.client = Some(stream);
        }
    }

    /// Whether the client has gone: it closed (or shut down its sending side), or its socket
    /// failed. Asked of the kernel with a zero-timeout poll rather than by reading, so a client
    /// that left input unread behind it is seen as gone too.
    fn client_closed(&self) -> bool {
        let Some(client) = &self.client else {
            return false;
        };
        let mut fd = libc::pollfd {
            fd: client.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: poll reads and writes one pollfd that lives on this stack for the call, and
        // does not wait.
        let ready = unsafe { libc::poll(&mut fd, 1, 0) };
        ready > 0 && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    fn detach(&mut self, why: &str) {
        if let Some(client) = self.client.take() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                client.as_raw_fd(),
                EpollEvent::default(),
            );
            log::info!("console socket: the client detached ({why})");
        }
        // Input the client sent before leaving still reaches the guest.
    }

    fn read_client(&mut self) {
        let Some(client) = &mut self.client else {
            return;
        };
        let mut buf = [0u8; INPUT_CHUNK];
        match client.read(&mut buf) {
            Ok(0) => self.detach("closed"),
            Ok(n) => self.pending.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(_) => self.detach("read failed"),
        }
    }

    fn offer_input(&mut self) {
        if !self.pending.is_empty() {
            let taken = (self.input)(&self.pending).min(self.pending.len());
            self.pending.drain(..taken);
        }
    }

    /// Sends what the ring holds until the client's socket is full.
    fn send_output(&mut self) {
        let Some(client) = &mut self.client else {
            return;
        };
        let mut ring = self.socket.ring.lock();
        while !ring.bytes.is_empty() {
            let (front, _) = ring.bytes.as_slices();
            match client.write(front) {
                Ok(0) => break,
                Ok(n) => {
                    ring.bytes.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => {
                    drop(ring);
                    self.detach("write failed");
                    return;
                }
            }
        }
    }

    /// Reads the client only when its earlier input is taken; waits for room when output
    /// waits.
    fn update_interest(&mut self) {
        let Some(client) = &self.client else {
            return;
        };
        let mut wanted = EventSet::empty();
        if self.pending.is_empty() {
            wanted |= EventSet::IN;
        }
        if !self.socket.ring.lock().bytes.is_empty() {
            wanted |= EventSet::OUT;
        }
        let modified = self.epoll.ctl(
            ControlOperation::Modify,
            client.as_raw_fd(),
            EpollEvent::new(wanted, TOKEN_CLIENT),
        );
        if modified.is_err() {
            self.detach("epoll_ctl failed");
        }
    }
}

#[cfg(test)]
#[path = "console_socket_tests.rs"]
mod tests;

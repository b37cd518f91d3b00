//! The API thread: one thread, one epoll, non-blocking sockets. It accepts clients on the Unix
//! socket, frames their requests ([`super::http`]), routes and decodes them
//! ([`super::routes`]), and hands each action to the VMM's main thread over a channel, poking an
//! eventfd; then it waits for the main thread's reply. Requests are thus served one at a time,
//! in arrival order, as in Firecracker. A client that stalls or sends garbage holds nothing but
//! its own bounded buffers: every read and write is non-blocking, and a connection with
//! unsent answers is not read until its client takes them.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::http::{self, HttpError, Response};
use super::routes::{self, Action};
use super::swap::{self, DriveModes, OpenedDisk};
use crate::exit::error_chain;
use crate::seccomp::{self, ThreadKind};

/// Clients served at once; more are closed as they connect.
const MAX_CONNECTIONS: usize = 64;
/// Unsent answers a connection may hold before it is no longer read.
const MAX_PENDING_OUTPUT: usize = 64 * 1024;
const TOKEN_LISTENER: u64 = u64::MAX;

/// The main thread's end of the API: actions to run, where to send each reply, and the
/// eventfd poked with each action.
pub struct ApiInbox {
    pub requests: Receiver<Action>,
    pub replies: Sender<Response>,
    pub event: EventFd,
    /// The running VM's image drives, which the main thread publishes at start.
    pub drive_modes: DriveModes,
}

/// The API thread's end.
struct VmmLink {
    actions: Sender<Action>,
    replies: Receiver<Response>,
    wake: EventFd,
    drive_modes: DriveModes,
}

impl VmmLink {
    /// Runs `action` on the main thread and waits for its reply. A drive's new backing file
    /// is opened here first, since the main thread may not open files.
    fn dispatch(&self, action: Action) -> Response {
        let Action::PatchDrive(patch) = &action else {
            return self.call(action);
        };
        let (Some(path), Some(drive)) =
            (&patch.path_on_host, self.drive_modes.get(&patch.drive_id))
        else {
            // Not an image drive of the running VM: the main thread explains.
            return self.call(action);
        };
        let image = match swap::open(Path::new(path), drive) {
            Ok(image) => image,
            Err(e) => {
                return Response::fault(&format!(
                    "Drive config error: {}: {}",
                    patch.drive_id,
                    error_chain(&e)
                ));
            }
        };
        let file = image.file;
        let response = self.call(Action::SwapDrive(patch.clone(), OpenedDisk::new(image)));
        if response.status == 204 {
            self.drive_modes.set_file(&patch.drive_id, file);
        }
        response
    }

    /// Runs `action` on the main thread and waits for its reply.
    fn call(&self, action: Action) -> Response {
        if self.actions.send(action).is_err() || self.wake.write(1).is_err() {
            return Response::fault("The microVM has stopped.");
        }
        self.replies
            .recv()
            .unwrap_or_else(|_| Response::fault("The microVM has stopped."))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "--api-sock {path}: cannot bind the API socket (is it in use, or left over?): {source}"
    )]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("API thread: {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("API thread sandbox: {0}")]
    Seccomp(#[from] seccomp::Error),
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> ServerError {
    move |source| ServerError::Io { what, source }
}

/// Binds the socket at `path` and starts the API thread, sandboxed with `sandbox`.
pub fn start(path: &Path, max_payload: usize, sandbox: bool) -> Result<ApiInbox, ServerError> {
    let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(io_err("non-blocking listener"))?;
    let epoll = Epoll::new().map_err(io_err("epoll"))?;
    epoll
        .ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )
        .map_err(io_err("epoll_ctl"))?;
    let (actions, requests) = channel();
    let (replies, replies_rx) = channel();
    let event = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
    let drive_modes = DriveModes::default();
    let link = VmmLink {
        drive_modes: drive_modes.clone(),
        actions,
        replies: replies_rx,
        wake: event.try_clone().map_err(io_err("eventfd"))?,
    };
    if sandbox {
        seccomp::prepare_allocator();
    }
    let (ready, started) = sync_channel(1);
    std::thread::Builder::new()
        .name("api".to_string())
        .spawn(move || serve(listener, epoll, link, max_payload, sandbox, ready))
        .map_err(io_err("spawning the API thread"))?;
    match started.recv() {
        Ok(Ok(())) => Ok(ApiInbox {
            drive_modes,
            requests,
            replies,
            event,
        }),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(ServerError::Io {
            what: "starting the API thread",
            source: std::io::Error::from(ErrorKind::BrokenPipe),
        }),
    }
}

/// One client.
struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// `100 Continue` already sent for the request being received.
    continued: bool,
    /// Close once the output is sent.
    closing: bool,
}

/// The API thread's body.
fn serve(
    listener: UnixListener,
    epoll: Epoll,
    link: VmmLink,
    max_payload: usize,
    sandbox: bool,
    ready: SyncSender<Result<(), seccomp::Error>>,
) {
    if sandbox {
        if let Err(e) = seccomp::install(ThreadKind::Api, false) {
            let _ = ready.send(Err(e));
            return;
        }
    }
    let _ = ready.send(Ok(()));
    let mut connections: HashMap<u64, Connection> = HashMap::new();
    let mut next_token = 0u64;
    let mut events = vec![EpollEvent::default(); 16];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("API thread: epoll_wait: {e}; the API stops");
                return;
            }
        };
        for event in &events[..n] {
            let token = event.data();
            if token == TOKEN_LISTENER {
                accept_all(&listener, &epoll, &mut connections, &mut next_token);
                continue;
            }
            let Some(conn) = connections.get_mut(&token) else {
                continue;
            };
            let hangup = event
                .event_set()
                .intersects(EventSet::ERROR | EventSet::HANG_UP);
            let keep = !hangup && service(conn, &link, max_payload);
            if keep {
                let mut wanted = EventSet::empty();
                if conn.output.len() < MAX_PENDING_OUTPUT && !conn.closing {
                    wanted |= EventSet::IN;
                }
                if !conn.output.is_empty() {
                    wanted |= EventSet::OUT;
                }
                let modified = epoll.ctl(
                    ControlOperation::Modify,
                    conn.stream.as_raw_fd(),
                    EpollEvent::new(wanted, token),
                );
                if modified.is_ok() {
                    continue;
                }
            }
            if let Some(conn) = connections.remove(&token) {
                let _ = epoll.ctl(
                    ControlOperation::Delete,
                    conn.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
    }
}

/// Accepts one waiting client on a non-blocking listener, itself non-blocking and
/// close-on-exec in the same call: the API thread's filter (shared by the console socket's
/// thread) allows accept4 with no fcntl or ioctl after it. `None` when nobody waits.
pub(crate) fn accept_client(listener: &UnixListener) -> std::io::Result<Option<UnixStream>> {
    loop {
        // SAFETY: accept4 on the listener's live descriptor; null address pointers are allowed.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            return Ok(Some(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) })));
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            ErrorKind::Interrupted => continue,
            ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(e),
        }
    }
}

/// Accepts every waiting client (non-blocking, close-on-exec), up to [`MAX_CONNECTIONS`].
fn accept_all(
    listener: &UnixListener,
    epoll: &Epoll,
    connections: &mut HashMap<u64, Connection>,
    next_token: &mut u64,
) {
    loop {
        let stream = match accept_client(listener) {
            Ok(Some(stream)) => stream,
            Ok(None) => return,
            Err(e) => {
                log::warn!("API: accept: {e}");
                return;
            }
        };
        if connections.len() >= MAX_CONNECTIONS {
            log::warn!("API: more than {MAX_CONNECTIONS} clients; closing the newest");
            continue;
        }
        let token = *next_token;
        *next_token += 1;
        let added = epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        );
        if added.is_ok() {
            connections.insert(
                token,
                Connection {
                    stream,
                    input: Vec::new(),
                    output: Vec::new(),
                    continued: false,
                    closing: false,
                },
            );
        }
    }
}

/// Reads, answers and writes what the connection allows now; false when it is done with.
fn service(conn: &mut Connection, link: &VmmLink, max_payload: usize) -> bool {
    let limit = http::MAX_HEAD + max_payload;
    if !conn.closing && conn.output.len() < MAX_PENDING_OUTPUT {
        let mut chunk = [0u8; 4096];
        while conn.input.len() < limit {
            let room = (limit - conn.input.len()).min(chunk.len());
            match conn.stream.read(&mut chunk[..room]) {
                Ok(0) => {
                    // The client has finished sending; answer what is complete, then close.
                    conn.closing = true;
                    break;
                }
                Ok(n) => conn.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return false,
            }
        }
        answer(conn, link, max_payload);
    }
    loop {
        if conn.output.is_empty() {
            return !conn.closing;
        }
        match conn.stream.write(&conn.output) {
            Ok(0) => return false,
            Ok(n) => {
                conn.output.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

/// Answers every complete request in the connection's input.
fn answer(conn: &mut Connection, link: &VmmLink, max_payload: usize) {
    while conn.output.len() < MAX_PENDING_OUTPUT {
        match http::parse(&conn.input, max_payload) {
            Ok(Some((request, used))) => {
                conn.input.drain(..used);
                conn.continued = false;
                let response = match routes::route(&request) {
                    Ok(action) => link.dispatch(action),
                    Err(e) => Response::fault(&e.to_string()),
                };
                log::info!(
                    "API: {} {} -> {}",
                    request.method.name(),
                    request.path,
                    response.status
                );
                if request.close {
                    conn.closing = true;
                }
                conn.output.extend(response.encode(request.close));
                if request.close {
                    return;
                }
            }
            Ok(None) => {
                expect_continue(conn, max_payload);
                return;
            }
            Err(e) => {
                framing_failed(conn, &e);
                return;
            }
        }
    }
}

/// Sends `100 Continue` once for a head that asks for it while its body is still missing.
fn expect_continue(conn: &mut Connection, max_payload: usize) {
    if let Ok(Some(head)) = http::parse_head(&conn.input, max_payload) {
        if head.request.expect_continue && !conn.continued {
            conn.output.extend_from_slice(http::CONTINUE);
            conn.continued = true;
        }
    }
}

/// The client's bytes cannot be framed: one error answer, then the connection closes.
fn framing_failed(conn: &mut Connection, error: &HttpError) {
    log::info!("API: {error}; closing the connection");
    conn.input.clear();
    conn.output
        .extend(Response::framing_error(error).encode(true));
    conn.closing = true;
}

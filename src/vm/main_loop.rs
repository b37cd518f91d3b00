//! The main thread while the guest runs: host keyboard input to the guest console (with the
//! Ctrl-A escape), the stop signals (SIGINT, SIGTERM, SIGHUP), the pause and resume requests
//! (SIGUSR1, SIGUSR2) and the end of the VM.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;
use vmm_sys_util::timerfd::TimerFd;

use super::control::{ControlPlane, RunningVm};
use super::pause::{Pauser, VmRequest};
use super::{Error, io_err};
use crate::devices::i8042::I8042;
use crate::devices::legacy::SerialDevice;
use crate::exit::{EndSignal, Outcome};
use pvm_virtio::ConsoleInput;

/// Ctrl-A starts a console escape; Ctrl-A x quits, Ctrl-A Ctrl-A sends one Ctrl-A.
const ESCAPE: u8 = 0x01;

/// The signal that ended the run (SIGINT/SIGTERM/SIGHUP), and the eventfd its handler pokes.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);
static STOP_EVENT_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_stop_signal(signo: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP_SIGNAL.store(signo, Ordering::SeqCst);
    crate::metrics::count_signal(signo);
    poke(&STOP_EVENT_FD);
}

/// The last pause/resume signal (SIGUSR1/SIGUSR2), and the eventfd its handler pokes. Only the
/// last one counts: a pause and a resume that arrive before the main loop looks cancel out.
static REQUEST_SIGNAL: AtomicI32 = AtomicI32::new(0);
static REQUEST_EVENT_FD: AtomicI32 = AtomicI32::new(-1);

/// Writes 1 to the eventfd in `fd`, if any; async-signal-safe.
fn poke(fd: &AtomicI32) {
    let fd = fd.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) on an eventfd is async-signal-safe; the buffer is a live u64.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

extern "C" fn on_request_signal(signo: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    REQUEST_SIGNAL.store(signo, Ordering::SeqCst);
    poke(&REQUEST_EVENT_FD);
}

/// Kicks a vCPU out of KVM_RUN, or keeps it from entering (see `vcpu::on_kick_signal`).
extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    crate::vcpu::on_kick_signal();
}

/// The operator's signal for a request: SIGUSR1 pauses, SIGUSR2 resumes.
fn request_of(signo: i32) -> Option<VmRequest> {
    match signo {
        libc::SIGUSR1 => Some(VmRequest::Pause),
        libc::SIGUSR2 => Some(VmRequest::Resume),
        _ => None,
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub(super) fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

/// Where the stop and request signals are reported while the VM runs; dropping it stops
/// reporting.
pub(super) struct StopSignals {
    event: EventFd,
    requests: EventFd,
}

impl StopSignals {
    /// Installs the handlers of the stop signals, the pause/resume signals and the vCPU kick.
    pub(super) fn install() -> Result<Self, Error> {
        let event = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        let requests = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        STOP_EVENT_FD.store(event.as_raw_fd(), Ordering::SeqCst);
        REQUEST_EVENT_FD.store(requests.as_raw_fd(), Ordering::SeqCst);
        let signals = StopSignals { event, requests };
        for signo in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            register_signal_handler(signo, on_stop_signal).map_err(|e| Error::Io {
                what: "installing signal handlers",
                source: std::io::Error::from_raw_os_error(e.errno()),
            })?;
        }
        for signo in [libc::SIGUSR1, libc::SIGUSR2] {
            register_signal_handler(signo, on_request_signal).map_err(|e| Error::Io {
                what: "installing the pause/resume signal handlers",
                source: std::io::Error::from_raw_os_error(e.errno()),
            })?;
        }
        register_signal_handler(kick_signal(), on_kick).map_err(|e| Error::Io {
            what: "installing the vCPU kick handler",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        Ok(signals)
    }

    /// The stop signal that arrived, if any (0 when none).
    pub(super) fn received(&self) -> i32 {
        STOP_SIGNAL.load(Ordering::SeqCst)
    }

    /// The request the last pause/resume signal made, consuming the eventfd's count.
    fn take_request(&self) -> Option<VmRequest> {
        // Non-blocking: EAGAIN only means another wake-up already consumed it.
        let _ = self.requests.read();
        request_of(REQUEST_SIGNAL.load(Ordering::SeqCst))
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        STOP_EVENT_FD.store(-1, Ordering::SeqCst);
        REQUEST_EVENT_FD.store(-1, Ordering::SeqCst);
    }
}

/// Where host keyboard input goes: the UART, or virtio-console.
#[derive(Clone)]
pub(super) enum InputSink {
    Serial(Arc<Mutex<SerialDevice>>),
    Virtio(ConsoleInput),
}

impl InputSink {
    /// Offers `bytes` to the guest; returns how many it took (the rest waits).
    pub(super) fn offer(&self, bytes: &[u8]) -> usize {
        match self {
            InputSink::Serial(serial) => serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enqueue_input(bytes),
            InputSink::Virtio(input) => input.push(bytes),
        }
    }
}

/// Tokens for the main loop's epoll.
const TOKEN_STDIN: u64 = 0;
const TOKEN_END: u64 = 1;
const TOKEN_STOP: u64 = 2;
const TOKEN_REQUEST: u64 = 3;
const TOKEN_METRICS: u64 = 4;
const TOKEN_CONTROL: u64 = 5;
const TOKEN_PAGE_SERVER: u64 = 6;

/// The periodic metrics line's timer, armed when metrics are configured. Created before the
/// main thread's sandbox, which has no timerfd_create.
pub(super) fn metrics_timer() -> Result<Option<TimerFd>, Error> {
    if !crate::metrics::is_configured() {
        return Ok(None);
    }
    // vmm-sys-util reports these as its errno type.
    let os_err = |what| move |e: vmm_sys_util::errno::Error| io_err(what)(e.into());
    let mut timer = TimerFd::new().map_err(os_err("timerfd_create"))?;
    let every = crate::metrics::FLUSH_INTERVAL;
    timer
        .reset(every, Some(every))
        .map_err(os_err("timerfd_settime"))?;
    Ok(Some(timer))
}

/// Waits for the end of the VM or a stop signal, passing host input to `sink` (None: stdin is
/// not read, the console being elsewhere) and pause/resume requests to `pauser` meanwhile, and
/// writing a metrics line on each tick of `metrics_timer`, and ending the VM when the
/// `page_server` serving its RAM goes away.
// Each argument is a separate source of events the loop waits on.
#[allow(clippy::too_many_arguments)]
pub(super) fn main_loop(
    sink: Option<&InputSink>,
    end: &EndSignal,
    keyboard: &Mutex<I8042>,
    stop: &StopSignals,
    pauser: &mut Pauser<'_>,
    mut metrics_timer: Option<TimerFd>,
    mut control: Option<&mut dyn ControlPlane>,
    page_server: Option<&crate::uffd::backend::PageServer>,
) -> Result<(), Error> {
    let stop_event = &stop.event;
    let epoll = Epoll::new().map_err(io_err("epoll"))?;
    let add = |fd: i32, token: u64| {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(io_err("epoll_ctl"))
    };
    add(end.event().as_raw_fd(), TOKEN_END)?;
    add(stop_event.as_raw_fd(), TOKEN_STOP)?;
    add(stop.requests.as_raw_fd(), TOKEN_REQUEST)?;
    if let Some(timer) = &metrics_timer {
        add(timer.as_raw_fd(), TOKEN_METRICS)?;
    }
    if let Some(control) = &control {
        add(control.event().as_raw_fd(), TOKEN_CONTROL)?;
    }
    if let Some(server) = page_server {
        // Only the hang-up matters (EPOLLHUP is always reported): a handler that is gone
        // leaves every fault on a page not yet served pending for good.
        epoll
            .ctl(
                ControlOperation::Add,
                server.socket().as_raw_fd(),
                EpollEvent::new(EventSet::READ_HANG_UP, TOKEN_PAGE_SERVER),
            )
            .map_err(io_err("epoll_ctl"))?;
    }
    // stdin may be /dev/null or a regular file, which epoll refuses; then there is no input.
    let mut stdin_open = sink.is_some() && add(libc::STDIN_FILENO, TOKEN_STDIN).is_ok();
    let mut input = KeyboardInput::default();
    let mut events = vec![EpollEvent::default(); 4];
    loop {
        // Input the UART could not take yet is retried on a short timer.
        let timeout = if input.pending.is_empty() { -1 } else { 10 };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Error::Io {
                    what: "epoll_wait",
                    source: e,
                });
            }
        };
        for event in &events[..n] {
            match event.data() {
                TOKEN_END => return Ok(()),
                TOKEN_PAGE_SERVER => {
                    // pvm prints the outcome's message as it exits.
                    if let Some(server) = page_server {
                        end.end(Outcome::VmmFailure(server.gone_message()));
                    }
                    return Ok(());
                }
                TOKEN_STOP => {
                    end.end(Outcome::Signal(stop.received()));
                    return Ok(());
                }
                TOKEN_REQUEST => {
                    if let Some(request) = stop.take_request() {
                        pauser.handle(request);
                    }
                }
                TOKEN_METRICS => {
                    if let Some(timer) = &mut metrics_timer {
                        // Readable: the read returns the expirations at once.
                        let _ = timer.wait();
                    }
                    crate::metrics::flush_or_log();
                }
                TOKEN_CONTROL => {
                    if let Some(control) = control.as_deref_mut() {
                        control.serve(&mut RunningVm {
                            end,
                            keyboard,
                            pauser,
                        });
                    }
                }
                TOKEN_STDIN if input.pending.is_empty() => {
                    let mut buf = [0u8; 64];
                    // SAFETY: reading into a live stack buffer of the given length.
                    let got = unsafe {
                        libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len())
                    };
                    if got <= 0 {
                        // EOF or error: no more input, but the guest runs on.
                        let _ = epoll.ctl(
                            ControlOperation::Delete,
                            libc::STDIN_FILENO,
                            EpollEvent::default(),
                        );
                        stdin_open = false;
                    } else if input.feed(&buf[..got as usize]) {
                        end.end(Outcome::ConsoleQuit);
                        return Ok(());
                    }
                }
                _ => {}
            }
        }
        if let Some(sink) = sink.filter(|_| !input.pending.is_empty()) {
            let taken = sink.offer(&input.pending);
            input.pending.drain(..taken);
            // While input waits, stdin is not read (events stay level-triggered).
            if stdin_open && input.pending.is_empty() {
                continue;
            }
        }
    }
}

/// Host keyboard input on its way to the guest, with the Ctrl-A escape handled.
#[derive(Debug, Default)]
struct KeyboardInput {
    pending: Vec<u8>,
    escaped: bool,
}

impl KeyboardInput {
    /// Queues `bytes`; returns true when the user asked to quit (Ctrl-A x).
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for &byte in bytes {
            if self.escaped {
                self.escaped = false;
                match byte {
                    b'x' | b'X' => return true,
                    ESCAPE => self.pending.push(ESCAPE),
                    _ => {}
                }
            } else if byte == ESCAPE {
                self.escaped = true;
            } else {
                self.pending.push(byte);
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigusr1_pauses_and_sigusr2_resumes() {
        assert_eq!(request_of(libc::SIGUSR1), Some(VmRequest::Pause));
        assert_eq!(request_of(libc::SIGUSR2), Some(VmRequest::Resume));
        assert_eq!(request_of(0), None);
    }

    #[test]
    fn console_escape() {
        let mut input = KeyboardInput::default();
        assert!(!input.feed(b"ls\r"));
        assert!(!input.feed(&[ESCAPE, ESCAPE, b'a']));
        assert_eq!(input.pending, b"ls\r\x01a");
        assert!(!input.feed(&[ESCAPE]));
        assert!(input.feed(b"x"));
    }
}

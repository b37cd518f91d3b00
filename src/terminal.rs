//! The host terminal: raw mode while the guest owns it, and the exact previous settings back on
//! every way out (normal return, error, panic, SIGINT/SIGTERM/SIGHUP).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// The settings to put back; shared with the panic hook, which runs on any thread.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);
/// The same settings for signal handlers, which must not take a lock; `RAW` says whether they
/// still need putting back.
static SAVED_FOR_SIGNALS: OnceLock<libc::termios> = OnceLock::new();
static RAW: AtomicBool = AtomicBool::new(false);

/// Puts the terminal back from a signal handler (async-signal-safe: an atomic, a load and
/// tcsetattr).
pub fn restore_from_signal_handler() {
    if RAW.swap(false, Ordering::SeqCst) {
        if let Some(termios) = SAVED_FOR_SIGNALS.get() {
            // SAFETY: tcsetattr reads the termios struct we pass; fd 0 is stdin.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, termios) };
        }
    }
}

fn restore_saved() {
    let saved = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take();
    RAW.store(false, Ordering::SeqCst);
    if let Some(termios) = saved {
        // SAFETY: tcsetattr reads the termios struct we pass; fd 0 is stdin.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &termios) };
    }
}

/// Raw mode on stdin for as long as this lives (a no-op when stdin is not a terminal).
#[derive(Debug)]
pub struct RawMode {
    active: bool,
}

impl RawMode {
    pub fn enter() -> std::io::Result<RawMode> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return Ok(RawMode { active: false });
        }
        // SAFETY: termios is plain data; tcgetattr fills it or fails without touching it.
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to a termios we own.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut termios) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(termios);
        let _ = SAVED_FOR_SIGNALS.set(termios);
        let previous_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_saved();
            previous_hook(info);
        }));
        let mut raw = termios;
        // SAFETY: cfmakeraw edits the struct we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: valid pointer to a termios we own.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            let err = std::io::Error::last_os_error();
            restore_saved();
            return Err(err);
        }
        RAW.store(true, Ordering::SeqCst);
        Ok(RawMode { active: true })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if self.active {
            restore_saved();
        }
    }
}

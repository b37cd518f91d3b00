//! The boot timer: an opt-in debug device (`--boot-timer`) for measuring boot time. The guest
//! writes the byte 123 to I/O port 0x3f0 (the port and value Firecracker uses, so guest images
//! made for its boot timer work unchanged) when it reaches a milestone, typically first thing in
//! /init; pvm prints how long after its own start and after the first KVM_RUN that was. From a
//! busybox shell: `printf '\173' | dd of=/dev/port bs=1 seek=1008 count=1`.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::bus::BusDevice;

pub const BOOT_TIMER_PORT: u16 = 0x3f0;
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// When pvm's `main` started (set by `crate::main_with_args`).
pub static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// When a vCPU first entered KVM_RUN, and pvm's CPU time (all threads) by then.
#[derive(Debug, Clone, Copy)]
pub struct FirstRun {
    pub at: Instant,
    pub cpu: Duration,
}

pub static FIRST_KVM_RUN: OnceLock<FirstRun> = OnceLock::new();

/// Records the first KVM_RUN (the first vCPU to get there wins); returns it if this call set it.
pub fn record_first_run() -> Option<FirstRun> {
    let mut set = None;
    FIRST_KVM_RUN.get_or_init(|| {
        let run = FirstRun {
            at: Instant::now(),
            cpu: process_cpu_time(),
        };
        set = Some(run);
        run
    });
    set
}

/// CPU time (user + system) of the whole process so far.
pub fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Logs (at debug level) that a step of pvm's start is done, with the wall and CPU time since
/// pvm started: where the time before the guest's first instruction goes.
pub fn phase(done: &str) {
    if !log::log_enabled!(log::Level::Debug) {
        return;
    }
    let wall = PROCESS_START.get().map_or(0.0, |start| ms(start.elapsed()));
    log::debug!(
        "start: {done} at {wall:.3} ms, {:.3} CPU-ms",
        ms(process_cpu_time())
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Prints a boot-timer line on stderr. These run on vCPU threads: through the logger's writer,
/// not `eprintln!`, which panics when stderr is a pipe whose reader has gone.
pub fn print(line: &str) {
    crate::logger::to_stderr(&format!("{line}\n"));
}

/// The line pvm prints when the first vCPU enters the guest.
pub fn first_run_line(run: &FirstRun) -> String {
    let since_start = PROCESS_START
        .get()
        .map_or(0.0, |start| ms(run.at.duration_since(*start)));
    format!(
        "pvm: boot-timer: first KVM_RUN {since_start:.3} ms after pvm started, {:.3} CPU-ms",
        ms(run.cpu)
    )
}

/// The port device: each magic write prints one line with the milestone's number.
#[derive(Debug, Default)]
pub struct BootTimer {
    signals: u32,
}

impl BootTimer {
    /// The line for the `n`th signal at `now`.
    fn line(n: u32, now: Instant) -> String {
        let since_start = PROCESS_START
            .get()
            .map_or(0.0, |start| ms(now.duration_since(*start)));
        let since_run = FIRST_KVM_RUN
            .get()
            .map_or(0.0, |run| ms(now.duration_since(run.at)));
        format!(
            "pvm: boot-timer: guest signal {n} at {since_start:.3} ms after pvm started, \
             {since_run:.3} ms after the first KVM_RUN"
        )
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data == [BOOT_TIMER_MAGIC] {
            self.signals += 1;
            print(&Self::line(self.signals, Instant::now()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_count_from_the_recorded_instants() {
        let _ = PROCESS_START.set(Instant::now());
        record_first_run();
        let run = *FIRST_KVM_RUN.get().unwrap();
        let line = BootTimer::line(1, run.at + Duration::from_millis(250));
        assert!(
            line.starts_with("pvm: boot-timer: guest signal 1 at "),
            "{line}"
        );
        assert!(
            line.ends_with(" 250.000 ms after the first KVM_RUN"),
            "{line}"
        );
        assert!(first_run_line(&run).contains("ms after pvm started"));
        // A second record does not move the first.
        assert!(record_first_run().is_none());
        assert_eq!(FIRST_KVM_RUN.get().unwrap().at, run.at);
    }
}

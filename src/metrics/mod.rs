//! Metrics as microVM tooling reads them (`--metrics-path`): one JSON object per line, written
//! every 60 s by the main loop, when the VM starts and ends, and on [`flush`] (the API's
//! FlushMetrics). Groups and field names follow Firecracker's where pvm counts the same thing;
//! what pvm does not count is left out rather than written as a zero that looks measured.
//! Counters are deltas since the previous line; the `signals` group holds totals. Every field
//! is listed in docs/metrics.md.

mod sources;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pvm_common::seccomp::format_decimal;
use serde_json::{Map, Value};

pub use self::sources::{Field, Group, NetSource, Sources, TapStats, net_fields};

/// How often the main loop writes a line.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the metrics file {}: {source}", .path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// As Firecracker: the metrics file is set once per process.
    #[error("metrics are already configured (to {})", .path.display())]
    AlreadyConfigured { path: PathBuf },
    #[error("cannot write to the metrics file {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The metrics file and what the previous line said.
struct Writer {
    path: PathBuf,
    out: File,
    sources: Option<Arc<Sources>>,
    previous: HashMap<(String, &'static str), u64>,
}

static METRICS: Mutex<Option<Writer>> = Mutex::new(None);
/// The metrics file's descriptor, for the one line the SIGSYS handler writes (-1: none).
static METRICS_FD: AtomicI32 = AtomicI32::new(-1);
/// Lines that could not be written.
static METRICS_FAILS: AtomicU64 = AtomicU64::new(0);
/// Stop signals received, counted from their handler.
static SIGHUP: AtomicU64 = AtomicU64::new(0);
static SIGINT: AtomicU64 = AtomicU64::new(0);
static SIGTERM: AtomicU64 = AtomicU64::new(0);

fn lock() -> std::sync::MutexGuard<'static, Option<Writer>> {
    METRICS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sends metrics to `path` (a file or FIFO: created if missing, appended to, non-blocking so
/// that a FIFO nobody reads costs a line, never a stalled VM). Only once per process.
pub fn init(path: &Path) -> Result<(), Error> {
    let mut metrics = lock();
    if let Some(writer) = &*metrics {
        return Err(Error::AlreadyConfigured {
            path: writer.path.clone(),
        });
    }
    let out = OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
    METRICS_FD.store(out.as_raw_fd(), Ordering::SeqCst);
    *metrics = Some(Writer {
        path: path.to_path_buf(),
        out,
        sources: None,
        previous: HashMap::new(),
    });
    Ok(())
}

/// Whether [`init`] has run: the main loop then arms its flush timer.
pub fn is_configured() -> bool {
    lock().is_some()
}

/// Makes the lines carry the counters of a VM (replacing any earlier VM's); the next line
/// counts from now. Does nothing when metrics are not configured.
pub fn register(sources: Arc<Sources>) {
    if let Some(writer) = &mut *lock() {
        let counters = sources.groups();
        writer.sources = Some(sources);
        render(0, &counters, &[], &mut writer.previous);
    }
}

/// Writes one line now (FlushMetrics, the timer, the end of the run). Without a metrics file
/// there is nothing to do. A failed write is counted in `logger.metrics_fails`.
pub fn flush() -> Result<(), Error> {
    let mut metrics = lock();
    let Some(writer) = &mut *metrics else {
        return Ok(());
    };
    let mut counters = writer
        .sources
        .as_ref()
        .map(|sources| sources.groups())
        .unwrap_or_default();
    counters.push(Group {
        name: "logger".to_string(),
        fields: vec![
            ("missed_log_count", crate::logger::missed_log_count()),
            ("metrics_fails", METRICS_FAILS.load(Ordering::Relaxed)),
        ],
    });
    let mut totals = vec![signals_group()];
    totals.extend(startup_group());
    let line = render(utc_ms(), &counters, &totals, &mut writer.previous);
    // One write, so a FIFO reader never sees half a line followed by another.
    (&writer.out).write_all(line.as_bytes()).map_err(|source| {
        METRICS_FAILS.fetch_add(1, Ordering::Relaxed);
        Error::Write {
            path: writer.path.clone(),
            source,
        }
    })
}

/// [`flush`], logging a failure instead of returning it (timers and teardown).
pub fn flush_or_log() {
    if let Err(e) = flush() {
        log::warn!("{e}");
    }
}

/// Counts a stop signal; async-signal-safe (called from the signal handler).
pub fn count_signal(signo: i32) {
    let counter = match signo {
        libc::SIGHUP => &SIGHUP,
        libc::SIGINT => &SIGINT,
        libc::SIGTERM => &SIGTERM,
        _ => return,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The jailer's `--start-time-us`, `--start-time-cpu-us` and `--parent-cpu-time-us`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartupTimes {
    pub start_us: Option<u64>,
    pub start_cpu_us: Option<u64>,
    pub parent_cpu_us: Option<u64>,
}

/// How long the process took to serve its API, set once by [`record_startup`].
static STARTUP: Mutex<Option<(u64, Option<u64>)>> = Mutex::new(None);

/// A clock's reading in microseconds.
fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which outlives the call.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000).saturating_add(nanos / 1000)
}

/// Records, from the jailer's `times`, the wall time (CLOCK_MONOTONIC) since it started this
/// process and the CPU time spent since (plus its parent's), as Firecracker's api_server group
/// reports them; every later metrics line carries them. Nothing without `--start-time-us`.
pub fn record_startup(times: &StartupTimes) {
    let Some(start) = times.start_us else {
        return;
    };
    let wall = clock_us(libc::CLOCK_MONOTONIC).saturating_sub(start);
    let cpu = times.start_cpu_us.map(|start_cpu| {
        clock_us(libc::CLOCK_PROCESS_CPUTIME_ID)
            .saturating_sub(start_cpu)
            .saturating_add(times.parent_cpu_us.unwrap_or(0))
    });
    log::info!("the API is up {wall} us after the jailer's start");
    *STARTUP.lock().unwrap_or_else(PoisonError::into_inner) = Some((wall, cpu));
}

fn startup_group() -> Option<Group> {
    let (wall, cpu) = (*STARTUP.lock().unwrap_or_else(PoisonError::into_inner))?;
    let mut fields = vec![("process_startup_time_us", wall)];
    if let Some(cpu) = cpu {
        fields.push(("process_startup_time_cpu_us", cpu));
    }
    Some(Group {
        name: "api_server".to_string(),
        fields,
    })
}

fn signals_group() -> Group {
    Group {
        name: "signals".to_string(),
        fields: vec![
            ("sighup", SIGHUP.load(Ordering::Relaxed)),
            ("sigint", SIGINT.load(Ordering::Relaxed)),
            ("sigterm", SIGTERM.load(Ordering::Relaxed)),
        ],
    }
}

fn utc_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The JSON line for `counters` (totals, written as the change since `previous`, which is
/// updated) and `totals` (written as they are), stamped `timestamp_ms`.
fn render(
    timestamp_ms: u64,
    counters: &[Group],
    totals: &[Group],
    previous: &mut HashMap<(String, &'static str), u64>,
) -> String {
    let mut line = Map::new();
    line.insert("utc_timestamp_ms".to_string(), Value::from(timestamp_ms));
    for group in counters {
        let mut fields = Map::new();
        for &(name, value) in &group.fields {
            let before = previous.insert((group.name.clone(), name), value);
            // A kernel counter can go back (the tap was recreated): count from the new value.
            let delta = value.saturating_sub(before.unwrap_or(0));
            fields.insert(name.to_string(), Value::from(delta));
        }
        line.insert(group.name.clone(), Value::Object(fields));
    }
    for group in totals {
        let fields = group
            .fields
            .iter()
            .map(|&(name, value)| (name.to_string(), Value::from(value)))
            .collect();
        line.insert(group.name.clone(), Value::Object(fields));
    }
    let mut text = Value::Object(line).to_string();
    text.push('\n');
    text
}

/// From the SIGSYS handler, before pvm exits: the one line that counts the violation.
/// Async-signal-safe: no allocation, no lock, only clock_gettime and write.
pub fn write_seccomp_fault_from_signal_handler() {
    let fd = METRICS_FD.load(Ordering::SeqCst);
    if fd < 0 {
        return;
    }
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the live local.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
    let ms = u64::try_from(now.tv_sec).unwrap_or(0) * 1000
        + u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000_000;
    let mut buf = [0u8; 96];
    let len = seccomp_fault_line(&mut buf, ms);
    // SAFETY: write(2) reads `len` initialised bytes of the live buffer.
    unsafe { libc::write(fd, buf.as_ptr().cast(), len) };
}

/// `{"utc_timestamp_ms":MS,"seccomp":{"num_faults":1}}\n` into `buf`; returns its length.
fn seccomp_fault_line(buf: &mut [u8; 96], ms: u64) -> usize {
    let mut digits = [0u8; 24];
    let digits = format_decimal(&mut digits, i64::try_from(ms).unwrap_or(i64::MAX));
    let parts: [&[u8]; 3] = [
        b"{\"utc_timestamp_ms\":",
        digits,
        b",\"seccomp\":{\"num_faults\":1}}\n",
    ];
    let mut len = 0;
    for part in parts {
        buf[len..len + part.len()].copy_from_slice(part);
        len += part.len();
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jailers_start_time_becomes_the_api_server_group() {
        assert!(startup_group().is_none(), "nothing before the API is up");
        // Started at monotonic 0 (long ago), with CPU times that are in the past too.
        record_startup(&StartupTimes {
            start_us: Some(0),
            start_cpu_us: Some(0),
            parent_cpu_us: Some(5),
        });
        let group = startup_group().unwrap();
        assert_eq!(group.name, "api_server");
        let [(wall_name, wall), (cpu_name, cpu)] = group.fields[..] else {
            panic!("{:?}", group.fields);
        };
        assert_eq!(
            (wall_name, cpu_name),
            ("process_startup_time_us", "process_startup_time_cpu_us")
        );
        assert!(wall > 0 && cpu >= 5, "{wall} {cpu}");
    }

    fn group(name: &str, fields: &[Field]) -> Group {
        Group {
            name: name.to_string(),
            fields: fields.to_vec(),
        }
    }

    #[test]
    fn lines_are_one_json_object_with_deltas_and_totals() {
        let mut previous = HashMap::new();
        let vcpu = |io_in| group("vcpu", &[("exit_io_in", io_in), ("exit_io_out", 2)]);
        let signals = group("signals", &[("sigterm", 1)]);
        let first = render(
            1000,
            &[vcpu(5)],
            std::slice::from_ref(&signals),
            &mut previous,
        );
        assert!(first.ends_with('\n') && first.matches('\n').count() == 1);
        let json: Value = serde_json::from_str(&first).unwrap();
        assert_eq!(json["utc_timestamp_ms"], 1000);
        assert_eq!(json["vcpu"]["exit_io_in"], 5);
        assert_eq!(json["vcpu"]["exit_io_out"], 2);
        assert_eq!(json["signals"]["sigterm"], 1);
        // The next line counts what happened since; totals stay totals.
        let second = render(2000, &[vcpu(12)], &[signals], &mut previous);
        let json: Value = serde_json::from_str(&second).unwrap();
        assert_eq!(json["vcpu"]["exit_io_in"], 7);
        assert_eq!(json["vcpu"]["exit_io_out"], 0);
        assert_eq!(json["signals"]["sigterm"], 1);
        assert_eq!(json.as_object().unwrap().len(), 3, "{second}");
    }

    #[test]
    fn device_ids_are_escaped() {
        let line = render(
            1,
            &[group("net_a\"b", &[("rx_bytes_count", 1)])],
            &[],
            &mut { HashMap::new() },
        );
        let json: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(json["net_a\"b"]["rx_bytes_count"], 1);
    }

    #[test]
    fn the_signal_handler_line_is_valid_json() {
        let mut buf = [0u8; 96];
        let len = seccomp_fault_line(&mut buf, 1_733_500_000_123);
        let text = std::str::from_utf8(&buf[..len]).unwrap();
        assert!(text.ends_with("}\n"), "{text}");
        let json: Value = serde_json::from_str(text).unwrap();
        assert_eq!(json["utc_timestamp_ms"], 1_733_500_000_123u64);
        assert_eq!(json["seccomp"]["num_faults"], 1);
        let len = seccomp_fault_line(&mut buf, u64::MAX);
        let json: Value = serde_json::from_slice(&buf[..len]).unwrap();
        assert_eq!(json["utc_timestamp_ms"], i64::MAX);
    }
}

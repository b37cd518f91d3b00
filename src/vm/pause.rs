//! Pausing and resuming the whole VM on the main thread. A pause stops every vCPU first (each
//! leaves KVM_RUN and parks, telling KVM its guest is stopped), then every virtio device's data
//! plane; a resume restarts the devices first, then the vCPUs, so no vCPU finds a device still
//! stopped. Requests come as [`VmRequest`]s: from the operator's signals today, from an API
//! later.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::Killable;

use super::main_loop::kick_signal;
use super::snapshot::SnapshotSource;
use crate::snapshot::{SnapshotError, VcpuState};
use crate::virtio_devices::PausableDevice;

/// How long a pause waits for every vCPU to leave KVM_RUN. A vCPU takes microseconds; one
/// that takes this long is stuck in a device access, and the pause is given up.
const PARK_LIMIT: Duration = Duration::from_secs(5);

/// What the main loop can be asked to do with the running VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmRequest {
    Pause,
    Resume,
}

/// Pausing the vCPUs: the main thread asks ([`RunControl::request_pause`]), kicks every vCPU
/// thread, and waits until each is parked (or has left its run loop for good); resuming wakes
/// them. The vCPU threads look at the request after every return from KVM_RUN.
#[derive(Debug, Default)]
pub struct RunControl {
    /// Read on every exit without the lock.
    requested: AtomicBool,
    state: Mutex<Parking>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Parking {
    paused: bool,
    /// vCPU threads waiting in [`RunControl::park`].
    parked: usize,
    /// vCPU threads whose guest will not run again (the VM ended, or the thread never ran).
    gone: usize,
    /// Bumped to ask every parked vCPU for its state once (a snapshot).
    save_round: u64,
    /// The states handed over in this round, by vCPU index.
    saved: Vec<(u8, Result<VcpuState, SnapshotError>)>,
}

/// What a parked vCPU thread does when asked for its state: returns its index and state.
pub(crate) type SaveVcpu<'a> = &'a mut dyn FnMut() -> (u8, Result<VcpuState, SnapshotError>);

impl RunControl {
    fn lock(&self) -> MutexGuard<'_, Parking> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a pause is asked for: looked at by every vCPU after every exit.
    pub(crate) fn pause_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Asks every vCPU to park at its next exit; the caller kicks them.
    pub fn request_pause(&self) {
        self.lock().paused = true;
        self.requested.store(true, Ordering::SeqCst);
    }

    /// Waits until `vcpus` threads are parked or gone; false if that took longer than `limit`.
    pub fn wait_parked(&self, vcpus: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut state = self.lock();
        while state.parked + state.gone < vcpus {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = match self.changed.wait_timeout(state, left) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }

    /// Lets every parked vCPU run again.
    pub fn resume(&self) {
        let mut state = self.lock();
        state.paused = false;
        self.requested.store(false, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Wakes parked vCPUs so they see the stop flag (set before this call).
    pub fn release(&self) {
        let _state = self.lock();
        self.changed.notify_all();
    }

    /// Counts a vCPU thread whose guest will not run again as parked for good.
    pub fn leave(&self) {
        self.lock().gone += 1;
        self.changed.notify_all();
    }

    /// On a vCPU thread: waits while a pause is asked for and `stop` is not set, handing
    /// over its state (`save`) whenever the main thread asks for it.
    pub(crate) fn park(&self, stop: &AtomicBool, save: SaveVcpu<'_>) {
        let mut state = self.lock();
        if !state.paused {
            return;
        }
        state.parked += 1;
        let mut round = state.save_round;
        self.changed.notify_all();
        while state.paused && !stop.load(Ordering::Acquire) {
            if state.save_round != round {
                round = state.save_round;
                // The vCPU is out of KVM_RUN: its state can be read. Under the lock, so the
                // main thread sees every state of the round at once.
                let saved = save();
                state.saved.push(saved);
                self.changed.notify_all();
                continue;
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.parked -= 1;
    }

    /// On the main thread of a paused VM: asks each of the `vcpus` parked vCPUs for its state
    /// and waits (at most `limit`) until all handed it over. States come back in index order.
    pub fn collect_states(
        &self,
        vcpus: usize,
        limit: Duration,
    ) -> Result<Vec<VcpuState>, SnapshotError> {
        let deadline = Instant::now() + limit;
        let mut state = self.lock();
        if !state.paused || state.parked < vcpus {
            return Err(SnapshotError::VcpuGone(
                u8::try_from(state.parked).unwrap_or(u8::MAX),
            ));
        }
        state.saved.clear();
        state.save_round += 1;
        self.changed.notify_all();
        while state.saved.len() < vcpus {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let missing = (0..vcpus)
                    .find(|i| {
                        !state
                            .saved
                            .iter()
                            .any(|(index, _)| usize::from(*index) == *i)
                    })
                    .unwrap_or(0);
                return Err(SnapshotError::VcpuGone(
                    u8::try_from(missing).unwrap_or(u8::MAX),
                ));
            }
            state = match self.changed.wait_timeout(state, left) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        let mut saved = std::mem::take(&mut state.saved);
        saved.sort_by_key(|(index, _)| *index);
        saved.into_iter().map(|(_, result)| result).collect()
    }
}

/// The VM's run state as the main thread drives it, and how often and how long it was paused.
pub struct Pauser<'a> {
    control: Arc<RunControl>,
    vcpus: &'a [JoinHandle<()>],
    devices: &'a [PausableDevice],
    paused_since: Option<Instant>,
    pauses: u64,
    paused_total: Duration,
    /// The running VM's parts a snapshot reads.
    source: Option<SnapshotSource<'a>>,
}

impl<'a> Pauser<'a> {
    pub fn new(
        control: Arc<RunControl>,
        vcpus: &'a [JoinHandle<()>],
        devices: &'a [PausableDevice],
    ) -> Self {
        Pauser {
            control,
            vcpus,
            devices,
            paused_since: None,
            pauses: 0,
            paused_total: Duration::ZERO,
            source: None,
        }
    }

    /// Lets [`Self::create_snapshot`] read the VM's parts.
    pub fn set_snapshot_source(&mut self, source: SnapshotSource<'a>) {
        self.source = Some(source);
    }

    /// Takes the VM as paused already: a restored VM, whose devices were left paused and
    /// whose vCPUs were asked to park before they started.
    pub fn mark_paused(&mut self) {
        self.paused_since = Some(Instant::now());
    }

    /// Snapshots the paused VM into `snapshot` and `mem_file`.
    pub fn create_snapshot(
        &self,
        kind: crate::snapshot::SnapshotKind,
        snapshot: &Path,
        mem_file: &Path,
        ids: &crate::snapshot::description::DeviceIds,
    ) -> Result<(), SnapshotError> {
        let Some(source) = self.source.as_ref().filter(|_| self.is_paused()) else {
            return Err(SnapshotError::NotPaused);
        };
        let target = super::snapshot::SnapshotTarget {
            kind,
            snapshot,
            mem_file,
        };
        source.create(target, &self.control, self.vcpus.len(), self.devices, ids)
    }

    pub fn handle(&mut self, request: VmRequest) {
        match (request, self.paused_since) {
            (VmRequest::Pause, None) => self.pause(),
            (VmRequest::Resume, Some(since)) => self.resume(since),
            (VmRequest::Pause, Some(_)) => log::debug!("pause asked for, but the VM is paused"),
            (VmRequest::Resume, None) => log::debug!("resume asked for, but the VM runs"),
        }
    }

    fn pause(&mut self) {
        let start = Instant::now();
        self.control.request_pause();
        for vcpu in self.vcpus {
            // A thread that already ended cannot be signalled; it counts as parked.
            let _ = vcpu.kill(kick_signal());
        }
        if !self.control.wait_parked(self.vcpus.len(), PARK_LIMIT) {
            log::error!(
                "pause failed: a vCPU did not stop within {} s; the VM keeps running",
                PARK_LIMIT.as_secs()
            );
            self.control.resume();
            return;
        }
        for (index, device) in self.devices.iter().enumerate() {
            if let Err(e) = device.pause() {
                log::error!(
                    "pause failed: virtio device {} cannot pause: {e}; the VM keeps running",
                    device.name()
                );
                resume_devices(&self.devices[..index]);
                self.control.resume();
                return;
            }
        }
        self.pauses += 1;
        self.paused_since = Some(Instant::now());
        log::info!("VM paused in {} us", start.elapsed().as_micros());
    }

    fn resume(&mut self, since: Instant) {
        resume_devices(self.devices);
        self.control.resume();
        let paused = since.elapsed();
        self.paused_total += paused;
        self.paused_since = None;
        log::info!("VM resumed after {} ms paused", paused.as_millis());
    }

    /// The device pvm's messages call `name`.
    pub fn device(&self, name: &str) -> Option<&PausableDevice> {
        self.devices.iter().find(|d| d.name() == name)
    }

    /// Whether the VM is paused now.
    pub fn is_paused(&self) -> bool {
        self.paused_since.is_some()
    }

    /// "pauses=N paused_ms=M" for `--stats`, a pause still going counted up to now.
    pub fn summary(&self) -> String {
        let total = self.paused_total + self.paused_since.map_or(Duration::ZERO, |s| s.elapsed());
        format!("pauses={} paused_ms={}", self.pauses, total.as_millis())
    }
}

/// Resumes each device, logging (and going past) any that fails: the transport has marked it
/// as needing a reset, and the others must run again regardless.
fn resume_devices(devices: &[PausableDevice]) {
    for device in devices {
        if let Err(e) = device.resume() {
            log::error!("virtio device {} cannot resume: {e}", device.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_save() -> (u8, Result<VcpuState, SnapshotError>) {
        (0, Err(SnapshotError::NotPaused))
    }

    #[test]
    fn parked_vcpus_hand_over_their_state_in_index_order() {
        let control = Arc::new(RunControl::default());
        let stop = Arc::new(AtomicBool::new(false));
        control.request_pause();
        let threads: Vec<_> = [1u8, 0]
            .into_iter()
            .map(|index| {
                let (control, stop) = (control.clone(), stop.clone());
                std::thread::spawn(move || {
                    control.park(&stop, &mut || (index, Err(SnapshotError::VcpuGone(index))))
                })
            })
            .collect();
        assert!(control.wait_parked(2, Duration::from_secs(5)));
        let e = control
            .collect_states(2, Duration::from_secs(5))
            .unwrap_err();
        // Both answered; the first in index order is the one reported.
        assert!(matches!(e, SnapshotError::VcpuGone(0)), "{e}");
        assert!(matches!(
            control.collect_states(3, Duration::from_millis(50)),
            Err(SnapshotError::VcpuGone(_))
        ));
        control.resume();
        for t in threads {
            t.join().unwrap();
        }
        assert!(
            control
                .collect_states(2, Duration::from_millis(50))
                .is_err(),
            "a running VM has no parked vCPUs"
        );
    }

    #[test]
    fn paused_vcpus_park_until_resumed_or_stopped() {
        let control = Arc::new(RunControl::default());
        let stop = Arc::new(AtomicBool::new(false));
        // Without a pause asked for, parking returns at once.
        control.park(&stop, &mut no_save);
        control.request_pause();
        let spawn = || {
            let (control, stop) = (control.clone(), stop.clone());
            std::thread::spawn(move || control.park(&stop, &mut no_save))
        };
        let first = spawn();
        assert!(control.wait_parked(1, Duration::from_secs(5)));
        assert!(!control.wait_parked(2, Duration::from_millis(50)));
        control.leave();
        assert!(
            control.wait_parked(2, Duration::from_secs(5)),
            "a gone vCPU counts"
        );
        std::thread::sleep(Duration::from_millis(20));
        assert!(!first.is_finished(), "a parked vCPU waits for the resume");
        control.resume();
        first.join().unwrap();
        // Stopping wakes a vCPU parked in a paused VM.
        control.request_pause();
        let second = spawn();
        assert!(control.wait_parked(2, Duration::from_secs(5)));
        stop.store(true, Ordering::Release);
        control.release();
        second.join().unwrap();
    }

    #[test]
    fn repeated_requests_are_no_ops_and_time_is_counted() {
        let control = Arc::new(RunControl::default());
        let mut pauser = Pauser::new(control, &[], &[]);
        pauser.handle(VmRequest::Resume);
        assert_eq!(pauser.summary(), "pauses=0 paused_ms=0");
        pauser.handle(VmRequest::Pause);
        pauser.handle(VmRequest::Pause);
        std::thread::sleep(Duration::from_millis(20));
        pauser.handle(VmRequest::Resume);
        pauser.handle(VmRequest::Resume);
        let summary = pauser.summary();
        let ms: u64 = summary
            .strip_prefix("pauses=1 paused_ms=")
            .and_then(|ms| ms.parse().ok())
            .unwrap_or_else(|| panic!("{summary}"));
        assert!(ms >= 20, "{summary}");
    }
}

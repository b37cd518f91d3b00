//! Device threads made before the guest runs.
//!
//! A device's worker thread is spawned when the device is built, not when the driver sets
//! DRIVER_OK, and lives as long as the device: each activation hands it a job (the data plane's
//! event loop) and each reset waits for that job to end. So no guest-triggered path creates a
//! thread, and the VMM can confine every device thread once, at its start, before any guest code
//! runs: [`set_thread_init`] registers what each new thread runs first (pvm installs its
//! seccomp filter for device threads there).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

/// What a new device thread runs before anything else; an error keeps the thread from taking
/// any job.
pub type ThreadInit = fn(name: &str) -> Result<(), String>;

static THREAD_INIT: OnceLock<ThreadInit> = OnceLock::new();

/// Registers the function every device thread spawned from now on runs first. Only the first
/// registration counts; it returns false if another was already registered.
pub fn set_thread_init(init: ThreadInit) -> bool {
    THREAD_INIT.set(init).is_ok()
}

type Job = Box<dyn FnOnce() + Send>;

/// Why a device thread cannot run a job.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ThreadError {
    #[error("cannot spawn thread {name}: {reason}")]
    Spawn { name: String, reason: String },
    #[error("thread {name} could not be set up: {reason}")]
    Init { name: String, reason: String },
    #[error("thread {name} has ended")]
    Gone { name: String },
}

/// A named thread that runs one job at a time for its owner, until dropped.
#[derive(Debug)]
pub struct DeviceThread {
    name: String,
    jobs: Option<Sender<Job>>,
    done: Receiver<()>,
    /// Whether a job was handed over and has not been waited for.
    busy: bool,
    ready: Result<(), ThreadError>,
    thread: Option<JoinHandle<()>>,
}

impl DeviceThread {
    /// Spawns the thread and waits until it ran the registered [`ThreadInit`]. Failures are
    /// kept and reported by [`Self::run`], so constructors that cannot fail need not change.
    pub fn spawn(name: String) -> Self {
        let (jobs, job_rx) = channel::<Job>();
        let (done_tx, done) = channel();
        let (ready_tx, ready_rx) = channel();
        let thread_name = name.clone();
        let spawned = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let init = THREAD_INIT.get().map_or(Ok(()), |init| init(&thread_name));
                let ok = init.is_ok();
                let _ = ready_tx.send(init);
                if !ok {
                    return;
                }
                for job in job_rx {
                    if catch_unwind(AssertUnwindSafe(job)).is_err() {
                        log::error!("{thread_name}: the device's data plane panicked");
                    }
                    if done_tx.send(()).is_err() {
                        return;
                    }
                }
            });
        let (ready, thread) = match spawned {
            Ok(thread) => {
                let ready = match ready_rx.recv() {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(reason)) => Err(ThreadError::Init {
                        name: name.clone(),
                        reason,
                    }),
                    Err(_) => Err(ThreadError::Gone { name: name.clone() }),
                };
                (ready, Some(thread))
            }
            Err(e) => (
                Err(ThreadError::Spawn {
                    name: name.clone(),
                    reason: e.to_string(),
                }),
                None,
            ),
        };
        DeviceThread {
            name,
            jobs: Some(jobs),
            done,
            busy: false,
            ready,
            thread,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Hands `job` to the thread. The caller must make the job end (and [`Self::wait`] for it)
    /// before handing over the next one.
    pub fn run(&mut self, job: impl FnOnce() + Send + 'static) -> Result<(), ThreadError> {
        self.ready.clone()?;
        debug_assert!(!self.busy, "{}: a job is still running", self.name);
        self.jobs
            .as_ref()
            .and_then(|jobs| jobs.send(Box::new(job)).ok())
            .ok_or_else(|| ThreadError::Gone {
                name: self.name.clone(),
            })?;
        self.busy = true;
        Ok(())
    }

    /// Waits until the job handed over last has returned; at once if there is none.
    pub fn wait(&mut self) {
        if std::mem::take(&mut self.busy) && self.done.recv().is_err() {
            log::error!("{}: the thread ended during a job", self.name);
        }
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        // The owner ended any job first; closing the channel ends the thread.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_jobs_one_after_the_other_on_one_named_thread() {
        let mut thread = DeviceThread::spawn("pvm-test-dev".to_string());
        let runs = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let seen = runs.clone();
            thread
                .run(move || {
                    assert_eq!(std::thread::current().name(), Some("pvm-test-dev"));
                    seen.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap();
            thread.wait();
        }
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        // Waiting without a job returns at once.
        thread.wait();
    }

    #[test]
    fn a_panicking_job_leaves_the_thread_usable() {
        let mut thread = DeviceThread::spawn("pvm-test-panic".to_string());
        thread.run(|| panic!("data plane bug")).unwrap();
        thread.wait();
        let ran = Arc::new(AtomicUsize::new(0));
        let seen = ran.clone();
        thread
            .run(move || {
                seen.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        thread.wait();
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}

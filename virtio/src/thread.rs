//! Device threads made before the guest runs.
//!
//! A device's worker thread is spawned when the device is built, not when the driver sets
//! DRIVER_OK, and lives as long as the device: each activation hands it a job (the data plane's
//! event loop) and each reset waits for that job to end. So no guest-triggered path creates a
//! thread, and the VMM can confine every device thread once, at its start, before any guest code
//! runs: [`set_thread_init`] registers what each new thread runs first (pvm installs its
//! seccomp filter for device threads there).
//!
//! A thread whose set-up failed takes no job. [`DeviceThread::ready`] tells, and
//! [`spawned_ready`] tells for every device thread the calling thread has spawned, so the VMM
//! can refuse to start a VM whose devices could not all be set up instead of learning it when
//! the guest activates one of them.
//!
//! A job that panics is not caught. pvm's release builds abort on a panic (`panic = "abort"`),
//! ending the whole process there and then. Where panics unwind (debug builds, tests) the panic
//! ends the device thread: [`DeviceThread::wait`] returns (and logs it), and every later
//! [`DeviceThread::run`] fails with [`ThreadError::Gone`].

use std::cell::RefCell;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

/// Why a [`ThreadInit`] failed: the VMM's own error (pvm's seccomp error), kept as the cause.
pub type InitError = Box<dyn std::error::Error + Send + Sync>;

/// What a new device thread runs before anything else; an error keeps the thread from taking
/// any job.
pub type ThreadInit = fn(name: &str) -> Result<(), InitError>;

static THREAD_INIT: OnceLock<ThreadInit> = OnceLock::new();

/// Registers the function every device thread spawned from now on runs first. Only the first
/// registration counts; it returns false if another was already registered.
pub fn set_thread_init(init: ThreadInit) -> bool {
    THREAD_INIT.set(init).is_ok()
}

thread_local! {
    /// The set-up failures of the device threads spawned from this thread, for
    /// [`spawned_ready`]. Per spawning thread: devices are built on one thread (pvm's main
    /// thread), and tests building devices in parallel do not see each other's failures.
    static SPAWN_FAILURES: RefCell<Vec<ThreadError>> = const { RefCell::new(Vec::new()) };
}

/// Whether every device thread spawned so far from the calling thread was set up: spawned and
/// through the registered [`ThreadInit`]. The first failure otherwise. Device threads are
/// spawned inside device constructors, in this crate and others (vhost relays), so this is
/// how the VMM checks them all once its devices exist.
pub fn spawned_ready() -> Result<(), ThreadError> {
    SPAWN_FAILURES.with(|failures| match failures.borrow().first() {
        Some(failure) => Err(failure.clone()),
        None => Ok(()),
    })
}

type Job = Box<dyn FnOnce() + Send>;

/// Why a device thread cannot run a job.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ThreadError {
    #[error("cannot spawn thread {name}: {source}")]
    Spawn {
        name: String,
        source: Arc<std::io::Error>,
    },
    #[error("thread {name} could not be set up: {source}")]
    Init {
        name: String,
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
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
    /// Spawns the thread and waits until it ran the registered [`ThreadInit`]. A failure is
    /// kept: [`Self::ready`] and [`spawned_ready`] report it, [`Self::run`] refuses jobs.
    pub fn spawn(name: String) -> Self {
        Self::spawn_with(name, THREAD_INIT.get().copied())
    }

    fn spawn_with(name: String, init: Option<ThreadInit>) -> Self {
        let (jobs, job_rx) = channel::<Job>();
        let (done_tx, done) = channel();
        if cfg!(fuzzing) {
            // Fuzzing builds run every data plane on the calling thread (see
            // worker/slot.rs): a thread starting beside the harness would make runs differ.
            return DeviceThread {
                name,
                jobs: None,
                done,
                busy: false,
                ready: Ok(()),
                thread: None,
            };
        }
        let (ready_tx, ready_rx) = channel();
        let thread_name = name.clone();
        let spawned = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let init = init.map_or(Ok(()), |init| init(&thread_name));
                let ok = init.is_ok();
                let _ = ready_tx.send(init);
                if !ok {
                    return;
                }
                for job in job_rx {
                    job();
                    if done_tx.send(()).is_err() {
                        return;
                    }
                }
            });
        let (ready, thread) = match spawned {
            Ok(thread) => {
                let ready = match ready_rx.recv() {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(source)) => Err(ThreadError::Init {
                        name: name.clone(),
                        source: Arc::from(source),
                    }),
                    Err(_) => Err(ThreadError::Gone { name: name.clone() }),
                };
                (ready, Some(thread))
            }
            Err(source) => (
                Err(ThreadError::Spawn {
                    name: name.clone(),
                    source: Arc::new(source),
                }),
                None,
            ),
        };
        if let Err(failure) = &ready {
            SPAWN_FAILURES.with(|failures| failures.borrow_mut().push(failure.clone()));
        }
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

    /// Whether the thread was spawned and set up, so that it takes jobs.
    pub fn ready(&self) -> Result<(), &ThreadError> {
        self.ready.as_ref().map(|_| ())
    }

    /// Hands `job` to the thread. The caller must make the job end (and [`Self::wait`] for it)
    /// before handing over the next one.
    pub fn run(&mut self, job: impl FnOnce() + Send + 'static) -> Result<(), ThreadError> {
        self.ready().map_err(ThreadError::clone)?;
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
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_jobs_one_after_the_other_on_one_named_thread() {
        let mut thread = DeviceThread::spawn("pvm-test-dev".to_string());
        assert!(thread.ready().is_ok());
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
        assert!(spawned_ready().is_ok());
    }

    /// What a sandbox set-up that fails returns: an error of the VMM's own type.
    #[derive(Debug, thiserror::Error)]
    #[error("no filter for {0}")]
    struct NoFilter(String);

    fn failing_init(name: &str) -> Result<(), InitError> {
        Err(Box::new(NoFilter(name.to_string())))
    }

    #[test]
    fn a_failed_set_up_is_reported_before_any_job_with_its_cause() {
        // A thread that sets up fine first: only the failure is reported.
        let good = DeviceThread::spawn_with("pvm-test-good".to_string(), None);
        assert!(good.ready().is_ok());
        assert!(spawned_ready().is_ok());

        let mut thread =
            DeviceThread::spawn_with("pvm-test-nofilter".to_string(), Some(failing_init));
        let err = thread.ready().unwrap_err().clone();
        assert_eq!(
            err.to_string(),
            "thread pvm-test-nofilter could not be set up: no filter for pvm-test-nofilter"
        );
        // The init's own error is kept, typed, as the cause.
        assert!(std::error::Error::source(&err).is_some());
        let ThreadError::Init { source, .. } = &err else {
            panic!("{err:?}");
        };
        assert!(source.downcast_ref::<NoFilter>().is_some(), "{source:?}");
        // The spawning thread's check reports it, without any job having been handed over.
        let checked = spawned_ready().unwrap_err();
        assert!(
            matches!(checked, ThreadError::Init { ref name, .. } if name == "pvm-test-nofilter")
        );
        // The thread takes no job.
        assert!(matches!(thread.run(|| {}), Err(ThreadError::Init { .. })));
        // Another spawning thread has its own record.
        let elsewhere = std::thread::spawn(|| {
            let _ok = DeviceThread::spawn_with("pvm-test-other".to_string(), None);
            spawned_ready().is_ok()
        });
        assert!(elsewhere.join().unwrap());
    }
}

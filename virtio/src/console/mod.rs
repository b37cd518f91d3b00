//! virtio-console with a single port (the guest's hvc0): no multiport, no resize.
//!
//! Guest output (transmitq) goes to a host writer, stdout in the VMM. Host input is pushed by the
//! VMM's main loop through a [`ConsoleInput`] handle into a bounded buffer and delivered into
//! receiveq buffers as the guest posts them; bytes wait (they are not dropped) while the guest has
//! no buffers, up to [`INPUT_BUFFER_LIMIT`].

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use log::{debug, warn};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use vm_memory::{Address, Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::chain::{Chain, split_chain};
use crate::device::{ActivateError, Activation, Interrupt, PauseError, VirtioDevice};
use crate::snapshot::{
    ConsoleState, DeviceState, QueuePosition, RestoreError, SavedDevice, SnapshotError,
};
use crate::worker::{
    DeviceQueue, EventHandler, EventLoop, FillEnd, FillSource, FillStep, QueuePositions,
    WorkerSlot, device_queues, feature, read_config_bytes,
};

pub const QUEUE_SIZE: u16 = 64;
/// Host input kept while the guest is not reading; beyond this `push` refuses bytes.
pub const INPUT_BUFFER_LIMIT: usize = 64 * 1024;
const RECEIVE_QUEUE: usize = 0;
const TRANSMIT_QUEUE: usize = 1;
const RX_KICK: u64 = 0;
const TX_KICK: u64 = 1;
const INPUT_READY: u64 = 2;
/// Guest output is copied to the writer in pieces of this size.
const TX_CHUNK: usize = 4096;
static NEXT_CONSOLE_INDEX: AtomicUsize = AtomicUsize::new(0);

const OFFERED_FEATURES: u64 = feature(VIRTIO_F_VERSION_1)
    | feature(VIRTIO_RING_F_EVENT_IDX)
    | feature(VIRTIO_RING_F_INDIRECT_DESC);

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot create the console input eventfd: {0}")]
    InputEvent(io::Error),
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves plain bytes behind, still usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug)]
struct InputBuffer {
    pending: Mutex<VecDeque<u8>>,
    /// Wakes the worker when bytes arrive.
    ready: EventFd,
}

/// The VMM's handle for feeding host keyboard input to the guest; cheap to clone.
#[derive(Debug, Clone)]
pub struct ConsoleInput {
    buffer: Arc<InputBuffer>,
}

impl ConsoleInput {
    /// Queues `bytes` for the guest and returns how many were accepted: all of them unless the
    /// guest has stopped reading and [`INPUT_BUFFER_LIMIT`] bytes are already waiting.
    pub fn push(&self, bytes: &[u8]) -> usize {
        let accepted = {
            let mut pending = lock(&self.buffer.pending);
            let room = INPUT_BUFFER_LIMIT.saturating_sub(pending.len());
            let accepted = room.min(bytes.len());
            pending.extend(&bytes[..accepted]);
            accepted
        };
        if accepted > 0 {
            if let Err(e) = self.buffer.ready.write(1) {
                warn!("virtio-console: cannot wake the worker: {e}");
            }
        }
        accepted
    }

    /// Bytes waiting for the guest.
    pub fn pending(&self) -> usize {
        lock(&self.buffer.pending).len()
    }
}

type SharedOutput = Arc<Mutex<Box<dyn Write + Send>>>;

/// A virtio-console device.
pub struct Console {
    output: SharedOutput,
    input: ConsoleInput,
    worker: WorkerSlot<ConsoleWorker>,
}

impl fmt::Debug for Console {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Console")
            .field("input", &self.input)
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

impl Console {
    /// A console whose guest output goes to `output`. Feed input through [`Console::input`].
    pub fn new(output: Box<dyn Write + Send>) -> Result<Self, ConsoleError> {
        let ready = EventFd::new(EFD_NONBLOCK).map_err(ConsoleError::InputEvent)?;
        let index = NEXT_CONSOLE_INDEX.fetch_add(1, Ordering::Relaxed);
        Ok(Console {
            output: Arc::new(Mutex::new(output)),
            input: ConsoleInput {
                buffer: Arc::new(InputBuffer {
                    pending: Mutex::new(VecDeque::new()),
                    ready,
                }),
            },
            worker: WorkerSlot::new(format!("virtio-con{index}")),
        })
    }

    /// The handle the VMM's main loop pushes host input through.
    pub fn input(&self) -> ConsoleInput {
        self.input.clone()
    }
}

/// `struct virtio_console_config`: cols and rows (0: unknown, no F_SIZE), max_nr_ports 1 (only
/// read with F_MULTIPORT), emerg_wr 0.
fn config_space() -> [u8; 12] {
    let mut config = [0u8; 12];
    config[4..8].copy_from_slice(&1u32.to_le_bytes());
    config
}

/// Copies the device-readable bytes of a transmitq chain to `output`. Buffers outside guest
/// memory are skipped; an output error is returned (the rest of the chain is dropped) so the
/// caller can report it, but it never stops the device.
pub(crate) fn transmit(
    output: &mut dyn Write,
    mem: &GuestMemoryMmap,
    chain: Chain<'_>,
) -> io::Result<()> {
    let mut chunk = [0u8; TX_CHUNK];
    for desc in chain.filter(|d| !d.is_write_only()) {
        let len = u64::from(desc.len());
        let mut offset = 0u64;
        while offset < len {
            let n = (len - offset).min(TX_CHUNK as u64) as usize;
            let Some(addr) = desc.addr().checked_add(offset) else {
                break;
            };
            if let Err(e) = mem.read_slice(&mut chunk[..n], addr) {
                debug!("virtio-console: transmit buffer outside guest memory: {e}");
                break;
            }
            output.write_all(&chunk[..n])?;
            offset += n as u64;
        }
    }
    output.flush()
}

/// Host input waiting for the guest, as a source for the receive queue's fill loop: each
/// receive chain takes as many pending bytes as fit.
struct PendingInput<'a>(MutexGuard<'a, VecDeque<u8>>);

impl FillSource for PendingInput<'_> {
    fn fill_one(&mut self, rx: &mut DeviceQueue, mem: &GuestMemoryMmap) -> FillStep {
        if self.0.is_empty() {
            return FillStep::SourceEmpty;
        }
        let Some(chain) = rx.pop(mem) else {
            return FillStep::NoBuffers;
        };
        let head = chain.head_index();
        // Console input is rare and small: a list per chain is cheap enough here.
        let mut segments = Vec::new();
        let written = match split_chain(chain, &mut segments) {
            Ok(buffers) => match buffers.writable.write_from(mem, self.0.make_contiguous()) {
                Ok(n) => n,
                Err(e) => {
                    debug!("virtio-console: receive buffer unusable: {e}");
                    0
                }
            },
            Err(e) => {
                debug!("virtio-console: malformed receive chain: {e}");
                0
            }
        };
        self.0.drain(..written);
        // At most the chain's length, which virtio-queue bounds to u32.
        rx.add_used(mem, head, u32::try_from(written).unwrap_or(u32::MAX));
        FillStep::Moved
    }
}

/// Moves pending host input into receiveq buffers until either runs out (see
/// [`DeviceQueue::fill`]). Bytes that do not fit stay pending; when the guest has no buffers,
/// notifications are enabled so its next buffer brings a kick.
pub(crate) fn deliver_input(
    rx: &mut DeviceQueue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn Interrupt,
    pending: &Mutex<VecDeque<u8>>,
) -> FillEnd {
    rx.fill(mem, interrupt, &mut PendingInput(lock(pending)))
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        OFFERED_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&config_space(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // emerg_wr is only writable with F_EMERG_WRITE, which is not offered.
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.worker
            .start(|| ConsoleWorker::new(activation, self.output.clone(), &self.input))
    }

    fn reset(&mut self) {
        self.worker.stop();
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        Ok(self.worker.pause()?)
    }

    fn resume(&mut self) -> Result<(), PauseError> {
        Ok(self.worker.resume()?)
    }

    fn save_state(&self) -> Result<SavedDevice, SnapshotError> {
        let queues = self.worker.saved_positions(VIRTIO_ID_CONSOLE)?;
        let pending_input = lock(&self.input.buffer.pending).iter().copied().collect();
        Ok(SavedDevice {
            state: DeviceState::Console(ConsoleState { pending_input }),
            queues,
        })
    }

    fn restore(
        &mut self,
        activation: Option<Activation>,
        state: &DeviceState,
    ) -> Result<(), RestoreError> {
        let DeviceState::Console(saved) = state else {
            return Err(RestoreError::DeviceKind {
                saved: state.kind(),
                here: "console",
            });
        };
        if saved.pending_input.len() > INPUT_BUFFER_LIMIT {
            return Err(RestoreError::ConsoleInput {
                len: saved.pending_input.len(),
                max: INPUT_BUFFER_LIMIT,
            });
        }
        if let Some(activation) = activation {
            self.worker.start_paused(|| {
                ConsoleWorker::new(activation, self.output.clone(), &self.input)
            })?;
        }
        // The resumed worker delivers it first thing (its start serves the receive queue).
        *lock(&self.input.buffer.pending) = saved.pending_input.iter().copied().collect();
        Ok(())
    }
}

struct ConsoleWorker {
    memory: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    rx: DeviceQueue,
    tx: DeviceQueue,
    output: SharedOutput,
    input: Arc<InputBuffer>,
    /// Whether the last write to `output` failed, to log an outage once.
    output_failed: bool,
}

impl ConsoleWorker {
    fn new(
        activation: Activation,
        output: SharedOutput,
        input: &ConsoleInput,
    ) -> Result<Self, ActivateError> {
        let Activation {
            memory,
            interrupt,
            queues,
            features,
        } = activation;
        let [rx, tx] = device_queues(queues, features)?;
        if (usize::from(rx.index), usize::from(tx.index)) != (RECEIVE_QUEUE, TRANSMIT_QUEUE) {
            warn!(
                "virtio-console: unexpected queue indices {} and {}",
                rx.index, tx.index
            );
        }
        Ok(ConsoleWorker {
            memory,
            interrupt,
            rx,
            tx,
            output,
            input: Arc::clone(&input.buffer),
            output_failed: false,
        })
    }

    fn transmit_all(&mut self) {
        let (memory, output, output_failed) = (&self.memory, &self.output, &mut self.output_failed);
        self.tx.process(memory, self.interrupt.as_ref(), |chain| {
            match transmit(&mut **lock(output), memory, chain) {
                Ok(()) => *output_failed = false,
                Err(e) => {
                    // Once per outage, not once per chain: a closed stdout would flood the log.
                    if !*output_failed {
                        warn!("virtio-console: output failed, dropping guest output: {e}");
                    }
                    *output_failed = true;
                }
            }
            // The device writes nothing into transmit buffers.
            0
        });
    }

    fn receive_all(&mut self) {
        // Whatever the end, the next kick or input event brings the worker back.
        let _ = deliver_input(
            &mut self.rx,
            &self.memory,
            self.interrupt.as_ref(),
            &self.input.pending,
        );
    }
}

impl QueuePositions for ConsoleWorker {
    fn positions(&self) -> Vec<QueuePosition> {
        vec![self.rx.position(), self.tx.position()]
    }
}

impl EventHandler for ConsoleWorker {
    fn register(&mut self, events: &EventLoop) -> io::Result<()> {
        events.watch(&self.rx.kick, RX_KICK)?;
        events.watch(&self.tx.kick, TX_KICK)?;
        events.watch(&self.input.ready, INPUT_READY)
    }

    fn start(&mut self, _events: &EventLoop) {
        self.transmit_all();
        self.receive_all();
    }

    fn handle_event(&mut self, _events: &EventLoop, token: u64) {
        match token {
            RX_KICK => {
                self.rx.clear_kick();
                self.receive_all();
            }
            TX_KICK => {
                self.tx.clear_kick();
                self.transmit_all();
            }
            INPUT_READY => {
                // The count is irrelevant: everything pending is delivered below.
                let _ = self.input.ready.read();
                self.receive_all();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;

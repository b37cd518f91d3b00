//! MSI-X for the virtio-pci transport: the vector table and pending bit array in BAR0, the
//! virtio source -> vector mapping (config_msix_vector, queue_msix_vector), and delivery.
//!
//! Delivery is a write to the vector's irqfd. The VMM owns the GSI routes: the transport tells
//! it through [`MsiSink::update_vector`] what each vector should deliver (or that it is masked),
//! and only writes a vector's irqfd while the VMM has a route for it. A vector that cannot fire
//! (entry masked, function masked, MSI-X disabled) records the interrupt in the PBA instead and
//! fires as soon as it can, so no interrupt is lost.

use std::io;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use log::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

use super::layout::MSIX_TABLE_ENTRY_SIZE;
use crate::device::Interrupt;
use crate::snapshot::{MsixEntryState, MsixState, RestoreError};

/// "No interrupt for this source", as read and written in config_msix_vector and
/// queue_msix_vector (spec 4.1.5.1.2).
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// ISR status bits (spec 4.1.4.5).
pub const ISR_QUEUE: u8 = 1;
pub const ISR_CONFIG: u8 = 2;

/// Vector Control bit 0; the other bits are reserved.
const VECTOR_MASKED: u32 = 1;

/// What a vector delivers: an MSI write of `data` to `address`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// The VMM's side of MSI-X: turns vectors into interrupt routes. Implemented by the VMM (GSI
/// routing table + irqfds), by tests with a recorder.
pub trait MsiSink: Send + Sync {
    /// From now on, a write to the irqfd of `vector` must deliver `message` (`Some`), or the
    /// vector is masked / MSI-X is off (`None`): the transport then writes the irqfd no more
    /// until a later `Some`, but a data plane outside the VMM holding it ([`queue_irqfd`]) may,
    /// and the VMM must keep such writes for the next `Some` rather than drop them (pvm's
    /// KVM stops listening to the irqfd, so they wait in the eventfd).
    ///
    /// [`queue_irqfd`]: crate::device::Interrupt::queue_irqfd
    ///
    /// Called on the vCPU thread that wrote the MSI-X table or control register, with the
    /// transport's interrupt lock held: install the route before returning, and do not call
    /// back into the transport. An error keeps the vector's interrupts pending.
    fn update_vector(&self, vector: u16, message: Option<MsiMessage>) -> io::Result<()>;
}

#[derive(Debug, Clone, Copy, Default)]
struct TableEntry {
    address_low: u32,
    address_high: u32,
    data: u32,
    vector_control: u32,
}

impl TableEntry {
    /// The state after reset: masked (PCI local bus spec 6.8.2.9).
    const RESET: TableEntry = TableEntry {
        address_low: 0,
        address_high: 0,
        data: 0,
        vector_control: VECTOR_MASKED,
    };

    fn dword(&self, index: u64) -> u32 {
        match index {
            0 => self.address_low,
            1 => self.address_high,
            2 => self.data,
            _ => self.vector_control,
        }
    }

    fn set_dword(&mut self, index: u64, value: u32) {
        match index {
            0 => self.address_low = value,
            1 => self.address_high = value,
            2 => self.data = value,
            _ => self.vector_control = value & VECTOR_MASKED,
        }
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.address_high) << 32 | u64::from(self.address_low),
            data: self.data,
        }
    }
}

/// The MSI-X state of one function plus the virtio vector mapping.
pub struct Msix {
    table: Vec<TableEntry>,
    /// The pending bit array, 64 vectors per element.
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    /// What the sink was last told for each vector; `Some` means the irqfd may be written.
    installed: Vec<Option<MsiMessage>>,
    irqfds: Arc<[EventFd]>,
    sink: Arc<dyn MsiSink>,
    config_vector: u16,
    queue_vectors: Vec<u16>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("vectors", &self.table.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .field("pending", &self.pending)
            .field("config_vector", &self.config_vector)
            .field("queue_vectors", &self.queue_vectors)
            .finish_non_exhaustive()
    }
}

impl Msix {
    /// `irqfds` has one eventfd per vector.
    pub fn new(irqfds: Arc<[EventFd]>, num_queues: usize, sink: Arc<dyn MsiSink>) -> Self {
        let vectors = irqfds.len();
        Msix {
            table: vec![TableEntry::RESET; vectors],
            pending: vec![0; vectors.div_ceil(64)],
            enabled: false,
            function_masked: false,
            installed: vec![None; vectors],
            irqfds,
            sink,
            config_vector: VIRTIO_MSI_NO_VECTOR,
            queue_vectors: vec![VIRTIO_MSI_NO_VECTOR; num_queues],
        }
    }

    /// The table and PBA take aligned dword or qword accesses (PCI local bus spec 6.8.2).
    fn access_ok(offset: u64, len: usize) -> bool {
        matches!(len, 4 | 8) && offset % len as u64 == 0
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !Self::access_ok(offset, data.len()) {
            debug!(
                "virtio-pci: {}-byte MSI-X table read at {offset:#x} ignored",
                data.len()
            );
            return;
        }
        let Some(entry) = self.entry_index(offset).map(|index| self.table[index]) else {
            return;
        };
        let first = offset % MSIX_TABLE_ENTRY_SIZE / 4;
        for (chunk, dword) in data.chunks_exact_mut(4).zip(first..) {
            chunk.copy_from_slice(&entry.dword(dword).to_le_bytes());
        }
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        if !Self::access_ok(offset, data.len()) {
            debug!(
                "virtio-pci: {}-byte MSI-X table write at {offset:#x} ignored",
                data.len()
            );
            return;
        }
        let Some(index) = self.entry_index(offset) else {
            return;
        };
        let first = offset % MSIX_TABLE_ENTRY_SIZE / 4;
        for (chunk, dword) in data.chunks_exact(4).zip(first..) {
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            self.table[index].set_dword(dword, value);
        }
        self.refresh(index);
    }

    fn entry_index(&self, offset: u64) -> Option<usize> {
        let index = usize::try_from(offset / MSIX_TABLE_ENTRY_SIZE).ok()?;
        (index < self.table.len()).then_some(index)
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !Self::access_ok(offset, data.len()) {
            debug!(
                "virtio-pci: {}-byte MSI-X PBA read at {offset:#x} ignored",
                data.len()
            );
            return;
        }
        let word = usize::try_from(offset / 8)
            .ok()
            .and_then(|i| self.pending.get(i))
            .copied()
            .unwrap_or(0);
        let bytes = word.to_le_bytes();
        let start = (offset % 8) as usize;
        data.copy_from_slice(&bytes[start..start + data.len()]);
    }

    /// The Message Control bits the driver controls changed.
    pub fn set_control(&mut self, enabled: bool, function_masked: bool) {
        if (enabled, function_masked) == (self.enabled, self.function_masked) {
            return;
        }
        self.enabled = enabled;
        self.function_masked = function_masked;
        for index in 0..self.table.len() {
            self.refresh(index);
        }
    }

    /// Brings the sink in line with what `index` should deliver now, then fires it if it was
    /// pending and can fire.
    fn refresh(&mut self, index: usize) {
        self.route(index, false);
    }

    /// [`Self::refresh`]; with `force` the sink is told even what it was told before (a fresh
    /// VMM after a restore knows no route).
    fn route(&mut self, index: usize, force: bool) {
        let entry = self.table[index];
        let deliverable =
            self.enabled && !self.function_masked && entry.vector_control & VECTOR_MASKED == 0;
        let wanted = deliverable.then(|| entry.message());
        if force || wanted != self.installed[index] {
            // `index` < table size <= 2048, so it fits a u16.
            match self.sink.update_vector(index as u16, wanted) {
                Ok(()) => self.installed[index] = wanted,
                Err(error) => {
                    warn!("virtio-pci: cannot update MSI-X vector {index}: {error}");
                    self.installed[index] = None;
                }
            }
        }
        if self.installed[index].is_some() && self.take_pending(index) {
            self.fire(index);
        }
    }

    fn take_pending(&mut self, index: usize) -> bool {
        let bit = 1u64 << (index % 64);
        let word = &mut self.pending[index / 64];
        let was_pending = *word & bit != 0;
        *word &= !bit;
        was_pending
    }

    fn set_pending(&mut self, index: usize) {
        self.pending[index / 64] |= 1 << (index % 64);
    }

    fn fire(&mut self, index: usize) {
        if let Err(error) = self.irqfds[index].write(1) {
            warn!("virtio-pci: cannot signal MSI-X vector {index}: {error}");
            self.set_pending(index);
        }
    }

    /// Raises `vector`: fires it, or marks it pending if it cannot fire now.
    pub fn signal(&mut self, vector: u16) {
        let index = usize::from(vector);
        if vector == VIRTIO_MSI_NO_VECTOR || index >= self.table.len() {
            return;
        }
        if self.installed[index].is_some() {
            self.fire(index);
        } else {
            self.set_pending(index);
        }
    }

    /// A vector as the driver may program it: out-of-range vectors mean "no vector", which the
    /// driver reads back to learn the mapping failed (spec 4.1.5.1.2).
    fn checked_vector(&self, vector: u16) -> u16 {
        if usize::from(vector) < self.table.len() {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    pub fn config_vector(&self) -> u16 {
        self.config_vector
    }

    pub fn set_config_vector(&mut self, vector: u16) {
        self.config_vector = self.checked_vector(vector);
    }

    pub fn queue_vector(&self, queue: u16) -> u16 {
        self.queue_vectors
            .get(usize::from(queue))
            .copied()
            .unwrap_or(VIRTIO_MSI_NO_VECTOR)
    }

    pub fn set_queue_vector(&mut self, queue: u16, vector: u16) {
        let vector = self.checked_vector(vector);
        if let Some(slot) = self.queue_vectors.get_mut(usize::from(queue)) {
            *slot = vector;
        }
    }

    /// Device reset: the virtio sources lose their vectors and interrupts meant for the old
    /// driver are dropped. The table and the MSI-X enable belong to PCI and stay.
    pub fn reset_virtio_state(&mut self) {
        self.config_vector = VIRTIO_MSI_NO_VECTOR;
        self.queue_vectors.fill(VIRTIO_MSI_NO_VECTOR);
        self.pending.fill(0);
    }
}

impl Msix {
    /// The table, PBA and vector mapping, for a snapshot.
    pub fn save_state(&self) -> MsixState {
        MsixState {
            table: self
                .table
                .iter()
                .map(|e| MsixEntryState {
                    address_low: e.address_low,
                    address_high: e.address_high,
                    data: e.data,
                    vector_control: e.vector_control,
                })
                .collect(),
            pending: self.pending.clone(),
            config_vector: self.config_vector,
            queue_vectors: self.queue_vectors.clone(),
        }
    }

    /// Checks a saved state against this function's table size and queue count.
    pub fn check_state(&self, state: &MsixState) -> Result<(), RestoreError> {
        let size = self.table.len();
        if state.table.len() != size {
            return Err(RestoreError::MsixTableSize {
                saved: state.table.len(),
                here: size,
            });
        }
        if state.pending.len() != self.pending.len() {
            return Err(RestoreError::MsixPendingSize {
                saved: state.pending.len(),
                here: self.pending.len(),
            });
        }
        if let Some(vector) =
            (0..size).find(|&v| state.table[v].vector_control & !VECTOR_MASKED != 0)
        {
            return Err(RestoreError::MsixBits { vector });
        }
        let pending_bit = |v: usize| state.pending[v / 64] & (1 << (v % 64)) != 0;
        if let Some(vector) = (size..state.pending.len() * 64).find(|&v| pending_bit(v)) {
            return Err(RestoreError::MsixBits { vector });
        }
        let valid = |vector: u16| vector == VIRTIO_MSI_NO_VECTOR || usize::from(vector) < size;
        if !valid(state.config_vector) {
            return Err(RestoreError::MsixConfigVector {
                vector: state.config_vector,
                size,
            });
        }
        if state.queue_vectors.len() != self.queue_vectors.len() {
            return Err(RestoreError::MsixQueueVectors {
                saved: state.queue_vectors.len(),
                here: self.queue_vectors.len(),
            });
        }
        match (0u16..)
            .zip(&state.queue_vectors)
            .find(|(_, v)| !valid(**v))
        {
            Some((queue, &vector)) => Err(RestoreError::MsixQueueVector {
                queue,
                vector,
                size,
            }),
            None => Ok(()),
        }
    }

    /// Takes a state [`Self::check_state`] accepted, with the capability's enable and function
    /// mask, and tells the sink every vector's route (or that it has none); a pending vector
    /// that can fire fires.
    pub fn restore_state(&mut self, state: &MsixState, enabled: bool, function_masked: bool) {
        for (entry, saved) in self.table.iter_mut().zip(&state.table) {
            *entry = TableEntry {
                address_low: saved.address_low,
                address_high: saved.address_high,
                data: saved.data,
                vector_control: saved.vector_control,
            };
        }
        self.pending.copy_from_slice(&state.pending);
        self.config_vector = state.config_vector;
        self.queue_vectors.copy_from_slice(&state.queue_vectors);
        self.enabled = enabled;
        self.function_masked = function_masked;
        for index in 0..self.table.len() {
            self.installed[index] = None;
            self.route(index, true);
        }
    }

    /// Back to the state after construction (a restore that failed half-way); the sink is told
    /// that no vector has a route.
    pub fn reset_all(&mut self) {
        self.table.fill(TableEntry::RESET);
        self.reset_virtio_state();
        self.enabled = false;
        self.function_masked = false;
        for index in 0..self.table.len() {
            self.route(index, true);
        }
    }
}

/// The interrupt the device signals through the pci transport.
#[derive(Debug)]
pub struct PciInterrupt {
    isr: AtomicU8,
    config_generation: AtomicU32,
    msix: Mutex<Msix>,
}

impl PciInterrupt {
    pub fn new(msix: Msix) -> Self {
        PciInterrupt {
            isr: AtomicU8::new(0),
            config_generation: AtomicU32::new(0),
            msix: Mutex::new(msix),
        }
    }

    /// The MSI-X state. A panic elsewhere while holding the lock leaves consistent data (every
    /// update is a plain store), so a poisoned lock is still used.
    pub fn msix(&self) -> MutexGuard<'_, Msix> {
        self.msix.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads and clears the ISR status (reading it acknowledges, spec 4.1.4.5).
    pub fn take_isr(&self) -> u8 {
        self.isr.swap(0, Ordering::SeqCst)
    }

    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// The ISR status without acknowledging it, for a snapshot.
    pub fn isr(&self) -> u8 {
        self.isr.load(Ordering::SeqCst)
    }

    /// Sets the ISR status and config generation of a restored function.
    pub fn restore(&self, isr: u8, config_generation: u32) {
        self.isr.store(isr, Ordering::SeqCst);
        self.config_generation
            .store(config_generation, Ordering::SeqCst);
    }

    pub fn reset(&self) {
        self.isr.store(0, Ordering::SeqCst);
        self.msix().reset_virtio_state();
    }
}

impl Msix {
    /// The irqfd of `queue`'s vector, if the queue has one.
    pub fn queue_irqfd(&self, queue: u16) -> Option<EventFd> {
        let vector = usize::from(self.queue_vector(queue));
        self.irqfds.get(vector).and_then(|fd| fd.try_clone().ok())
    }
}

impl Interrupt for PciInterrupt {
    fn queue_irqfd(&self, queue: u16) -> Option<EventFd> {
        // While the vector is masked the sink keeps a data plane's writes for the unmask (see
        // MsiSink::update_vector); they do not show in the PBA meanwhile.
        self.msix().queue_irqfd(queue)
    }

    fn notify_queue(&self, queue: u16) -> io::Result<()> {
        self.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
        let mut msix = self.msix();
        let vector = msix.queue_vector(queue);
        msix.signal(vector);
        Ok(())
    }

    fn notify_config(&self) -> io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        let mut msix = self.msix();
        let vector = msix.config_vector();
        msix.signal(vector);
        Ok(())
    }
}

//! The half of a virtio transport that does not depend on the register layout: feature
//! negotiation, the device status state machine, queue registers and activation (virtio 1.2,
//! sections 2.1, 2.2, 3.1). virtio-mmio and virtio-pci only decode their own layouts and call in
//! here, so both follow the spec in exactly the same way and a fix lands in both.

use std::io;
use std::sync::Arc;

use log::{debug, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::device::{ActivateError, Activation, ActiveQueue, Interrupt, PauseError, VirtioDevice};

mod core_snapshot;
pub mod mmio;
#[cfg(test)]
pub(crate) mod pause_scenarios;
pub mod pci;
#[cfg(test)]
pub(crate) mod snapshot_scenarios;
#[cfg(test)]
mod snapshot_tests;

/// Device status bits (virtio 1.2, 2.1) as the 8-bit register holds them.
pub(crate) const STATUS_ACKNOWLEDGE: u8 = VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
pub(crate) const STATUS_DRIVER: u8 = VIRTIO_CONFIG_S_DRIVER as u8;
pub(crate) const STATUS_FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
pub(crate) const STATUS_DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
pub(crate) const STATUS_NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;
pub(crate) const STATUS_FAILED: u8 = VIRTIO_CONFIG_S_FAILED as u8;

/// Why the queues the driver configured cannot be handed to the device.
#[derive(Debug, thiserror::Error)]
pub enum QueueConfigError {
    #[error("queue {index}: size {size} is not a power of two no larger than {max}")]
    Size { index: u16, size: u16, max: u16 },
    #[error("queue {index}: the {area} address {address:#x} is misaligned")]
    Alignment {
        index: u16,
        area: &'static str,
        address: u64,
    },
    #[error("queue {index}: the rings are not inside guest memory")]
    OutsideMemory { index: u16 },
    #[error(
        "queue {index}: its used ring at {used:#x} overlaps the {area} of queue {other} at {address:#x}"
    )]
    Overlap {
        index: u16,
        used: u64,
        other: u16,
        area: &'static str,
        address: u64,
    },
}

/// Why DRIVER_OK did not start the device.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ActivationError {
    #[error(transparent)]
    Queue(#[from] QueueConfigError),
    #[error("cannot duplicate the kick eventfd of queue {index}: {source}")]
    Kick { index: u16, source: io::Error },
    #[error(transparent)]
    Device(#[from] ActivateError),
}

/// What the driver programmed for one queue. Kept as raw register values rather than in a
/// [`Queue`], because `Queue`'s setters silently keep the old value on bad input: the device
/// would then run with addresses the driver never gave. The values are checked (and turned into
/// a `Queue`) once, at activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueRegisters {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    /// The available ring ("driver area").
    pub avail_ring: u64,
    /// The used ring ("device area").
    pub used_ring: u64,
}

impl QueueRegisters {
    fn new(max_size: u16) -> Self {
        QueueRegisters {
            max_size,
            size: max_size,
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
        }
    }

    /// The guest-physical areas of the three parts of the queue, as `(name, start, end)` with
    /// `end` exclusive, sized for the event-index fields whether or not they were negotiated.
    fn areas(&self) -> [(&'static str, u64, u64); 3] {
        let size = u64::from(self.size);
        let area = |name, start: u64, len: u64| (name, start, start.saturating_add(len));
        [
            area("descriptor table", self.desc_table, 16 * size),
            area("available ring", self.avail_ring, 6 + 2 * size),
            area("used ring", self.used_ring, 6 + 8 * size),
        ]
    }

    /// The queue the device gets, or why these registers do not describe a usable queue.
    fn to_queue(
        self,
        index: u16,
        event_idx: bool,
        memory: &GuestMemoryMmap,
    ) -> Result<Queue, QueueConfigError> {
        let bad_size = |_| QueueConfigError::Size {
            index,
            size: self.size,
            max: self.max_size,
        };
        // The maximum was validated at construction, so only the driver's size can fail here.
        let mut queue = Queue::new(self.max_size).map_err(bad_size)?;
        queue.try_set_size(self.size).map_err(bad_size)?;
        let misaligned = |area, address| QueueConfigError::Alignment {
            index,
            area,
            address,
        };
        queue
            .try_set_desc_table_address(GuestAddress(self.desc_table))
            .map_err(|_| misaligned("descriptor table", self.desc_table))?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail_ring))
            .map_err(|_| misaligned("available ring", self.avail_ring))?;
        queue
            .try_set_used_ring_address(GuestAddress(self.used_ring))
            .map_err(|_| misaligned("used ring", self.used_ring))?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(memory) {
            return Err(QueueConfigError::OutsideMemory { index });
        }
        Ok(queue)
    }
}

/// Refuses a configuration in which the used ring of a ready queue, the only area the device
/// writes, overlaps any area of a ready queue (its own descriptor table and available ring
/// included). The device would otherwise rewrite what it reads next: a driver whose avail.idx
/// sits under used.flags makes every notification toggle make a chain appear and vanish.
fn check_no_overlap(queues: &[QueueRegisters]) -> Result<(), QueueConfigError> {
    let ready = || (0u16..).zip(queues).filter(|(_, q)| q.ready);
    for (index, queue) in ready() {
        let [_, _, (_, used_start, used_end)] = queue.areas();
        for (other, other_queue) in ready() {
            for (area, start, end) in other_queue.areas() {
                let same = other == index && area == "used ring";
                if !same && start < used_end && used_start < end {
                    return Err(QueueConfigError::Overlap {
                        index,
                        used: used_start,
                        other,
                        area,
                        address: start,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Replaces the low 32 bits of a 64-bit register (the driver writes them in two halves).
pub(crate) fn set_low_half(register: &mut u64, value: u32) {
    *register = (*register & !0xffff_ffff) | u64::from(value);
}

/// Replaces the high 32 bits of a 64-bit register.
pub(crate) fn set_high_half(register: &mut u64, value: u32) {
    *register = (*register & 0xffff_ffff) | (u64::from(value) << 32);
}

/// One 32-bit half of a 64-bit feature word; selectors past 1 read as zero (spec 4.1.4.3, 4.2.2).
fn feature_half(features: u64, select: u32) -> u32 {
    match select {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}

/// The device and its transport-independent register state.
#[derive(Debug)]
pub(crate) struct VirtioCore {
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
    /// The transport's interrupt, handed to the device at every activation.
    interrupt: Arc<dyn Interrupt>,
    queues: Vec<QueueRegisters>,
    /// One per queue, created once: the VMM registers them as ioeventfds for the transport's
    /// whole life, and the device gets duplicates at each activation.
    kicks: Vec<EventFd>,
    device_features_select: u32,
    driver_features_select: u32,
    /// As written by the driver, possibly with bits the device never offered.
    driver_features: u64,
    status: u8,
    queue_select: u16,
    /// Whether the live device's data plane is paused (a snapshot may be taken).
    paused: bool,
}

impl VirtioCore {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
    ) -> io::Result<Self> {
        let max_sizes = device.queue_max_sizes();
        if max_sizes.len() > usize::from(u16::MAX) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many virtio queues",
            ));
        }
        // A bad maximum is a bug in the device, not the guest: refuse it up front so every queue
        // the driver can see is one it can configure.
        if let Some(bad) = max_sizes.iter().find(|&&max| Queue::new(max).is_err()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("virtio queue maximum size {bad} is not a power of two in 1..=32768"),
            ));
        }
        let queues: Vec<_> = max_sizes
            .iter()
            .map(|&max| QueueRegisters::new(max))
            .collect();
        let kicks = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<_>>()?;
        Ok(VirtioCore {
            device,
            memory,
            interrupt,
            queues,
            kicks,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            paused: false,
        })
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    pub fn kicks(&self) -> &[EventFd] {
        &self.kicks
    }

    pub fn set_device_features_select(&mut self, select: u32) {
        self.device_features_select = select;
    }

    pub fn device_features_select(&self) -> u32 {
        self.device_features_select
    }

    /// The half of the offered features that DeviceFeaturesSel selects.
    pub fn device_features_half(&self) -> u32 {
        feature_half(self.device.features(), self.device_features_select)
    }

    pub fn set_driver_features_select(&mut self, select: u32) {
        self.driver_features_select = select;
    }

    pub fn driver_features_select(&self) -> u32 {
        self.driver_features_select
    }

    pub fn driver_features_half(&self) -> u32 {
        feature_half(self.driver_features, self.driver_features_select)
    }

    /// Sets the half of the driver features that DriverFeaturesSel selects. Once FEATURES_OK is
    /// set the negotiated features are fixed (spec 3.1.1), so later writes are ignored.
    pub fn write_driver_features_half(&mut self, value: u32) {
        if self.status & STATUS_FEATURES_OK != 0 {
            debug!("virtio: driver features written after FEATURES_OK, ignored");
            return;
        }
        match self.driver_features_select {
            0 => set_low_half(&mut self.driver_features, value),
            1 => set_high_half(&mut self.driver_features, value),
            select => debug!("virtio: driver features select {select} out of range, ignored"),
        }
    }

    pub fn queue_select(&self) -> u16 {
        self.queue_select
    }

    /// Selects a queue; out-of-range values are kept (they read back) but select nothing.
    pub fn set_queue_select(&mut self, select: u16) {
        self.queue_select = select;
    }

    /// The selected queue's registers, if QueueSel names a queue.
    pub fn selected_queue(&self) -> Option<&QueueRegisters> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The selected queue's registers if the driver may still change them: queue layout is fixed
    /// once DRIVER_OK is set (a hostile guest must not move rings under a running device).
    pub fn selected_queue_mut(&mut self) -> Option<&mut QueueRegisters> {
        if self.status & STATUS_DRIVER_OK != 0 {
            debug!("virtio: queue register written after DRIVER_OK, ignored");
            return None;
        }
        self.queues.get_mut(usize::from(self.queue_select))
    }

    /// Signals the kick eventfd of `index`, for a notification that reached userspace (no
    /// ioeventfd matched). Unknown queues are ignored.
    pub fn kick(&self, index: u32) {
        let Some(kick) = usize::try_from(index).ok().and_then(|i| self.kicks.get(i)) else {
            debug!("virtio: notification for nonexistent queue {index}, ignored");
            return;
        };
        if let Err(error) = kick.write(1) {
            warn!("virtio: cannot signal the kick eventfd of queue {index}: {error}");
        }
    }

    /// Handles a driver write of the device status. Returns true if it was a reset, so the
    /// transport can clear its own state (interrupt status, MSI-X vectors) too.
    pub fn write_status(&mut self, value: u8) -> bool {
        if value == 0 {
            self.reset();
            return true;
        }
        // DEVICE_NEEDS_RESET belongs to the device; drivers write back what they read.
        let requested = value & !STATUS_NEEDS_RESET;
        let current = self.status & !STATUS_NEEDS_RESET;
        if requested & current != current {
            debug!("virtio: status write {value:#x} clears bits of {current:#x}, ignored");
            return false;
        }
        if current & STATUS_FAILED != 0 {
            debug!("virtio: status write {value:#x} after FAILED, ignored until reset");
            return false;
        }
        let newly_set = requested & !current;
        let mut status = current;
        if newly_set & STATUS_ACKNOWLEDGE != 0 {
            status |= STATUS_ACKNOWLEDGE;
        }
        if newly_set & STATUS_DRIVER != 0 && status & STATUS_ACKNOWLEDGE != 0 {
            status |= STATUS_DRIVER;
        }
        if newly_set & STATUS_FEATURES_OK != 0 && status & STATUS_DRIVER != 0 {
            // Leaving FEATURES_OK clear is how the device refuses (spec 3.1.1 step 6).
            if self.accept_driver_features() {
                status |= STATUS_FEATURES_OK;
            }
        }
        let activate = newly_set & STATUS_DRIVER_OK != 0 && status & STATUS_FEATURES_OK != 0;
        if activate {
            status |= STATUS_DRIVER_OK;
        }
        if newly_set & STATUS_FAILED != 0 {
            status |= STATUS_FAILED;
        }
        self.status = status | (self.status & STATUS_NEEDS_RESET);
        if activate {
            self.activate();
        }
        false
    }

    /// Checks the driver's feature choice and tells the device if it is acceptable.
    fn accept_driver_features(&mut self) -> bool {
        let offered = self.device.features();
        let unoffered = self.driver_features & !offered;
        if unoffered != 0 {
            warn!("virtio: driver accepted features {unoffered:#x} that were never offered");
            return false;
        }
        if self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            warn!("virtio: driver did not accept VIRTIO_F_VERSION_1 (legacy drivers unsupported)");
            return false;
        }
        true
    }

    /// DRIVER_OK: hands every ready queue to the device. Any failure marks the device as needing
    /// a reset (and tells the driver via a config interrupt) instead of starting it.
    fn activate(&mut self) {
        if let Err(error) = self.try_activate() {
            warn!(
                "virtio: cannot activate device type {}: {error}",
                self.device.device_type()
            );
            self.status |= STATUS_NEEDS_RESET;
            if let Err(error) = self.interrupt.notify_config() {
                warn!("virtio: cannot signal the config change interrupt: {error}");
            }
        }
    }

    fn try_activate(&mut self) -> Result<(), ActivationError> {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        check_no_overlap(&self.queues)?;
        let mut active = Vec::new();
        for ((index, registers), kick) in (0u16..).zip(&self.queues).zip(&self.kicks) {
            if !registers.ready {
                continue;
            }
            let queue = registers.to_queue(index, event_idx, &self.memory)?;
            let kick = kick
                .try_clone()
                .map_err(|source| ActivationError::Kick { index, source })?;
            active.push(ActiveQueue { index, queue, kick });
        }
        self.device.activate(Activation {
            memory: self.memory.clone(),
            interrupt: self.interrupt.clone(),
            queues: active,
            features: self.driver_features & self.device.features(),
        })?;
        Ok(())
    }

    /// Whether the device runs a data plane the driver started (DRIVER_OK, and no failed
    /// activation since).
    fn is_live(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_NEEDS_RESET == 0
    }

    /// Pauses the device's data plane, keeping its queues (see [`VirtioDevice::pause`]); the
    /// registers stay as the driver wrote them. Nothing to do before DRIVER_OK.
    pub fn pause(&mut self) -> Result<(), PauseError> {
        if !self.is_live() {
            return Ok(());
        }
        self.device.pause()?;
        self.paused = true;
        Ok(())
    }

    /// Resumes what [`Self::pause`] paused. A device that cannot resume is marked as needing a
    /// reset (the driver is told through a config interrupt), as a failed activation is.
    pub fn resume(&mut self) -> Result<(), PauseError> {
        if !self.is_live() {
            return Ok(());
        }
        self.paused = false;
        self.device.resume().inspect_err(|_| {
            self.status |= STATUS_NEEDS_RESET;
            if let Err(error) = self.interrupt.notify_config() {
                warn!("virtio: cannot signal the config change interrupt: {error}");
            }
        })
    }

    /// Status 0: back to the state after construction, ready for a new driver.
    fn reset(&mut self) {
        self.device.reset();
        for queue in &mut self.queues {
            *queue = QueueRegisters::new(queue.max_size);
        }
        // Drain kicks that arrived for the old driver so the next activation starts clean.
        for kick in &self.kicks {
            let _ = kick.read();
        }
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        self.paused = false;
    }
}

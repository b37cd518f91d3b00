//! The virtio-mmio transport, version 2 only (virtio 1.2, section 4.2.2; no legacy layout).
//!
//! One 4 KiB window per device: 32-bit control registers below 0x100, the device-specific
//! configuration space from 0x100. The VMM maps the window on its MMIO bus and forwards accesses
//! to [`MmioTransport::read`] / [`MmioTransport::write`], registers one ioeventfd per queue from
//! [`MmioTransport::queue_kicks`] (so notifications never exit to userspace) and registers the
//! `irq` eventfd given to [`MmioTransport::new`] as an irqfd on the device's GSI.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use log::debug;
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
    VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_SHM_BASE_HIGH,
    VIRTIO_MMIO_SHM_BASE_LOW, VIRTIO_MMIO_SHM_LEN_HIGH, VIRTIO_MMIO_SHM_LEN_LOW,
    VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::device::{Interrupt, PauseError, VirtioDevice};
use crate::snapshot::{MmioState, RestoreError, SnapshotError};
use crate::transport::{QueueRegisters, VirtioCore, set_high_half, set_low_half};

/// The size of one device's register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Where QueueNotify sits in the window: the address of every queue's ioeventfd.
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// InterruptStatus bit: a used ring has new entries.
pub const INTERRUPT_USED_BUFFER: u32 = VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: the device configuration changed.
pub const INTERRUPT_CONFIG_CHANGE: u32 = VIRTIO_MMIO_INT_CONFIG;

/// "virt" in little-endian, the MagicValue every virtio-mmio device shows.
const MAGIC_VALUE: u32 = 0x7472_6976;
const VERSION: u32 = 2;
/// "pvm" in little-endian; drivers do not interpret the vendor.
const VENDOR_ID: u32 = 0x006d_7670;
const CONFIG_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;

/// The interrupt the device signals: sets InterruptStatus bits, then writes the irqfd. Shared
/// (through an `Arc`) by the transport, which reads and acknowledges the bits for the driver.
#[derive(Debug)]
struct MmioInterrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    irq: EventFd,
}

impl MmioInterrupt {
    fn raise(&self, bit: u32) -> io::Result<()> {
        // The bit must be visible before the guest can take the interrupt and read it.
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irq.write(1)
    }
}

impl Interrupt for MmioInterrupt {
    fn notify_queue(&self, _queue: u16) -> io::Result<()> {
        self.raise(INTERRUPT_USED_BUFFER)
    }

    fn notify_config(&self) -> io::Result<()> {
        // The driver re-reads the config space if the generation moved under it (spec 2.5.1).
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.raise(INTERRUPT_CONFIG_CHANGE)
    }
}

/// A virtio device behind a virtio-mmio (version 2) register window.
#[derive(Debug)]
pub struct MmioTransport {
    core: VirtioCore,
    interrupt: Arc<MmioInterrupt>,
}

impl MmioTransport {
    /// Wraps `device`. `irq` is signalled for every interrupt; the VMM registers it (or a clone
    /// it made beforehand) as an irqfd. Fails if the device reports an invalid queue maximum or
    /// the kick eventfds cannot be created.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        irq: EventFd,
    ) -> io::Result<Self> {
        let interrupt = Arc::new(MmioInterrupt {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            irq,
        });
        let core = VirtioCore::new(device, memory, interrupt.clone())?;
        Ok(MmioTransport { core, interrupt })
    }

    /// The eventfd signalled for every interrupt (the irqfd of the device's GSI).
    pub fn irq(&self) -> &EventFd {
        &self.interrupt.irq
    }

    /// One `(offset of QueueNotify, datamatch = queue index, kick eventfd)` per queue. The VMM
    /// registers each as a 4-byte KVM ioeventfd at `window base + offset` with that datamatch.
    /// The eventfds live as long as the transport.
    pub fn queue_kicks(&self) -> Vec<(u64, u32, &EventFd)> {
        (0u32..)
            .zip(self.core.kicks())
            .map(|(index, kick)| (QUEUE_NOTIFY_OFFSET, index, kick))
            .collect()
    }

    /// Tells the driver the device configuration changed (bumps ConfigGeneration, raises the
    /// config interrupt), for changes that come from outside the device's own worker.
    pub fn notify_config_change(&self) -> io::Result<()> {
        self.interrupt.notify_config()
    }

    /// The InterruptStatus register (pending, not yet acknowledged interrupt causes).
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt.status.load(Ordering::SeqCst)
    }

    /// The device status register.
    pub fn device_status(&self) -> u8 {
        self.core.status()
    }

    /// Pauses the device's data plane, keeping its queues; see [`VirtioDevice::pause`].
    pub fn pause(&mut self) -> Result<(), PauseError> {
        self.core.pause()
    }

    /// Resumes what [`Self::pause`] paused.
    pub fn resume(&mut self) -> Result<(), PauseError> {
        self.core.resume()
    }

    /// The transport's and the device's state, for a snapshot: only while paused (or never
    /// started by the driver).
    pub fn save_state(&self) -> Result<MmioState, SnapshotError> {
        Ok(MmioState {
            core: self.core.save_state()?,
            interrupt_status: self.interrupt.status.load(Ordering::SeqCst),
            config_generation: self.interrupt.config_generation.load(Ordering::SeqCst),
        })
    }

    /// Restores `state` (untrusted: validated against this device and guest memory) into this
    /// freshly built transport. A device the driver had started is set up again and left
    /// paused; [`Self::resume`] runs it.
    pub fn restore_state(&mut self, state: &MmioState) -> Result<(), RestoreError> {
        let causes = INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE;
        if state.interrupt_status & !causes != 0 {
            return Err(RestoreError::Register {
                field: "InterruptStatus",
                value: state.interrupt_status.into(),
            });
        }
        self.core.check_state(&state.core)?;
        self.core.apply_state(&state.core)?;
        self.interrupt
            .status
            .store(state.interrupt_status, Ordering::SeqCst);
        if state.interrupt_status != 0 {
            // The guest may not have taken the interrupt before the snapshot: raise it again
            // (a spurious one only makes the driver read a status it already handled).
            if let Err(error) = self.interrupt.irq.write(1) {
                debug!("virtio-mmio: cannot raise the restored interrupt: {error}");
            }
        }
        self.interrupt
            .config_generation
            .store(state.config_generation, Ordering::SeqCst);
        Ok(())
    }

    /// A guest read at `offset` in the window. Control registers answer only aligned 32-bit
    /// reads (spec 4.2.2.2); anything else reads as zero.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            debug!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    /// A guest write at `offset` in the window. Control registers take only aligned 32-bit
    /// writes; anything else is ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if offset % 4 != 0 {
            debug!("virtio-mmio: unaligned write at {offset:#x} ignored");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }

    /// Whether a config space access is one a driver can make: at most 8 bytes (a 64-bit field
    /// read as one access) and inside the window.
    fn config_access_ok(offset: u64, len: usize) -> bool {
        (1..=8).contains(&len)
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= MMIO_WINDOW_SIZE - CONFIG_OFFSET)
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        if Self::config_access_ok(offset, data.len()) {
            self.core.device().read_config(offset, data);
        } else {
            debug!(
                "virtio-mmio: {}-byte config read at {offset:#x} ignored",
                data.len()
            );
            data.fill(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if Self::config_access_ok(offset, data.len()) {
            self.core.device_mut().write_config(offset, data);
        } else {
            debug!(
                "virtio-mmio: {}-byte config write at {offset:#x} ignored",
                data.len()
            );
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.core.selected_queue();
        // `offset` is below CONFIG_OFFSET here, so it fits the bindings' u32 constants.
        match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.core.device().device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => self.core.device_features_half(),
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| q.max_size.into()),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| q.ready.into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status(),
            VIRTIO_MMIO_STATUS => self.core.status().into(),
            // No shared memory regions: a nonexistent region has length (and base) -1.
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => {
                self.interrupt.config_generation.load(Ordering::SeqCst)
            }
            _ => {
                debug!("virtio-mmio: read of write-only or reserved register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let core = &mut self.core;
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => core.set_device_features_select(value),
            VIRTIO_MMIO_DRIVER_FEATURES => core.write_driver_features_half(value),
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => core.set_driver_features_select(value),
            // Values past u16 select no queue, like any other index past the last queue.
            VIRTIO_MMIO_QUEUE_SEL => {
                core.set_queue_select(u16::try_from(value).unwrap_or(u16::MAX))
            }
            VIRTIO_MMIO_QUEUE_NUM => {
                if let Some(queue) = core.selected_queue_mut() {
                    // Too big for a queue size at all: keep it invalid so activation refuses it.
                    queue.size = u16::try_from(value).unwrap_or(0);
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(queue) = core.selected_queue_mut() {
                    match value {
                        0 | 1 => queue.ready = value == 1,
                        _ => debug!("virtio-mmio: QueueReady {value:#x} ignored"),
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => core.kick(value),
            VIRTIO_MMIO_INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!value, Ordering::SeqCst);
            }
            VIRTIO_MMIO_STATUS => match u8::try_from(value) {
                Ok(status) => {
                    if core.write_status(status) {
                        self.interrupt.status.store(0, Ordering::SeqCst);
                    }
                }
                Err(_) => {
                    debug!("virtio-mmio: status {value:#x} has bits past the low byte, ignored")
                }
            },
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                Self::set_queue_address(core, |q| &mut q.desc_table, false, value)
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                Self::set_queue_address(core, |q| &mut q.desc_table, true, value)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                Self::set_queue_address(core, |q| &mut q.avail_ring, false, value)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                Self::set_queue_address(core, |q| &mut q.avail_ring, true, value)
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                Self::set_queue_address(core, |q| &mut q.used_ring, false, value)
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                Self::set_queue_address(core, |q| &mut q.used_ring, true, value)
            }
            _ => debug!("virtio-mmio: write of read-only or reserved register {offset:#x} ignored"),
        }
    }

    fn set_queue_address(
        core: &mut VirtioCore,
        field: impl FnOnce(&mut QueueRegisters) -> &mut u64,
        high: bool,
        value: u32,
    ) {
        if let Some(queue) = core.selected_queue_mut() {
            let register = field(queue);
            if high {
                set_high_half(register, value);
            } else {
                set_low_half(register, value);
            }
        }
    }
}

#[cfg(test)]
mod tests;

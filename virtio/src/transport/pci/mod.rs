//! The virtio-pci transport, modern (virtio 1.x) only: virtio 1.2 section 4.1.
//!
//! A PCI function with a type-0 header and one 32-bit memory BAR (BAR0, [`BAR_SIZE`] bytes)
//! holding the common config, ISR, device config, notify region and MSI-X table + PBA (see
//! [`layout`]). The VMM puts the function on its PCI bus ([`PciTransport::config_read`] /
//! [`PciTransport::config_write`]), maps BAR0 on its MMIO bus at the address it chose
//! ([`PciTransport::bar_read`] / [`PciTransport::bar_write`]), registers one ioeventfd per queue
//! ([`PciTransport::queue_kicks`]) and one irqfd per MSI-X vector
//! ([`PciTransport::vector_irqfds`]), and keeps each vector's GSI route in line with what
//! [`MsiSink::update_vector`] says. There is no INTx: drivers must use MSI-X.

mod common_cfg;
mod config;
pub mod layout;
mod msix;

use std::io;
use std::ops::Range;
use std::sync::Arc;

use log::debug;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use self::config::{
    EXTENDED_CONFIG_SPACE_SIZE, MSIX_CONTROL, MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK,
    PCI_CFG_DATA, PciConfigSpace,
};
pub use self::config::{VIRTIO_PCI_DEVICE_ID_BASE, VIRTIO_PCI_VENDOR_ID};
pub use self::layout::BAR_SIZE;
use self::layout::{
    DEVICE_CFG_LEN, DEVICE_CFG_OFFSET, ISR_LEN, ISR_OFFSET, MAX_MSIX_VECTORS, MAX_QUEUES,
    MSIX_PBA_OFFSET, MSIX_TABLE_ENTRY_SIZE, MSIX_TABLE_OFFSET, NOTIFY_OFF_MULTIPLIER,
    NOTIFY_OFFSET,
};
use self::msix::{ISR_CONFIG, ISR_QUEUE};
pub use self::msix::{MsiMessage, MsiSink, VIRTIO_MSI_NO_VECTOR};
use self::msix::{Msix, PciInterrupt};
use crate::device::{Interrupt, PauseError, VirtioDevice};
use crate::snapshot::{PciState, RestoreError, SnapshotError};
use crate::transport::VirtioCore;

/// The 4 KiB page each of common config, ISR and device config occupies in BAR0.
const REGION_PAGE: u64 = 0x1000;

fn invalid_input(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// `offset` relative to the region `[start, start + size)` if the whole access is inside it.
fn within(offset: u64, len: usize, start: u64, size: u64) -> Option<u64> {
    let relative = offset.checked_sub(start)?;
    let end = relative.checked_add(len as u64)?;
    (end <= size).then_some(relative)
}

fn overlaps(access: &Range<usize>, field: Range<usize>) -> bool {
    access.start < field.end && field.start < access.end
}

/// A virtio device behind a modern virtio-pci function.
#[derive(Debug)]
pub struct PciTransport {
    core: VirtioCore,
    config: PciConfigSpace,
    interrupt: Arc<PciInterrupt>,
    /// One per MSI-X vector, shared with the MSI-X state that writes them.
    irqfds: Arc<[EventFd]>,
}

impl PciTransport {
    /// Wraps `device`. `bar_addr` is BAR0's guest physical address: below 4 GiB and aligned to
    /// [`BAR_SIZE`]. `msix_vectors` (1..=2048) is the MSI-X table size; queues + 1 lets every
    /// queue and the config change have their own vector. `msi` is told about vector routes.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        bar_addr: u64,
        msix_vectors: u16,
        msi: Arc<dyn MsiSink>,
    ) -> io::Result<Self> {
        let device_type = device.device_type();
        // 0x1040 + type must stay inside the virtio range 0x1040..=0x107f.
        let pci_device_type = u16::try_from(device_type)
            .ok()
            .filter(|&t| t < 0x40)
            .ok_or_else(|| {
                invalid_input(format!(
                    "virtio device type {device_type} has no PCI device id"
                ))
            })?;
        let num_queues = device.queue_max_sizes().len();
        if num_queues > MAX_QUEUES {
            return Err(invalid_input(format!(
                "{num_queues} queues, virtio-pci supports {MAX_QUEUES}"
            )));
        }
        if !(1..=MAX_MSIX_VECTORS).contains(&msix_vectors) {
            return Err(invalid_input(format!(
                "{msix_vectors} MSI-X vectors, need 1..={MAX_MSIX_VECTORS}"
            )));
        }
        let bar_end = bar_addr.saturating_add(BAR_SIZE);
        if bar_addr % BAR_SIZE != 0 || bar_end > 1 << 32 {
            return Err(invalid_input(format!(
                "BAR address {bar_addr:#x} is not {BAR_SIZE:#x}-aligned below 4 GiB"
            )));
        }
        let irqfds: Arc<[EventFd]> = (0..msix_vectors)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?
            .into();
        let interrupt = Arc::new(PciInterrupt::new(Msix::new(
            irqfds.clone(),
            num_queues,
            msi,
        )));
        let core = VirtioCore::new(device, memory, interrupt.clone())?;
        // Both checked above: fits 16 and 32 bits.
        let config = PciConfigSpace::new(
            pci_device_type,
            bar_addr as u32,
            num_queues as u16,
            msix_vectors,
        );
        Ok(PciTransport {
            core,
            config,
            interrupt,
            irqfds,
        })
    }

    /// The size of BAR0 (the VMM maps this much at the BAR address).
    pub fn bar_size(&self) -> u64 {
        BAR_SIZE
    }

    /// BAR0 as the guest last programmed it. The VMM does not follow relocation; this lets it
    /// notice one.
    pub fn bar_address(&self) -> u64 {
        self.config.bar_address()
    }

    /// One `(offset within BAR0, kick eventfd)` per queue, in queue order. Each queue has its
    /// own notify address, so the VMM registers a KVM ioeventfd at `BAR0 + offset` without
    /// datamatch (any access length). The eventfds live as long as the transport.
    pub fn queue_kicks(&self) -> Vec<(u64, &EventFd)> {
        let stride = u64::from(NOTIFY_OFF_MULTIPLIER);
        (0u64..)
            .zip(self.core.kicks())
            .map(|(index, kick)| (NOTIFY_OFFSET + index * stride, kick))
            .collect()
    }

    /// The irqfd of each MSI-X vector (index = vector). The VMM registers each with its own GSI
    /// and routes that GSI as [`MsiSink::update_vector`] says.
    pub fn vector_irqfds(&self) -> Vec<&EventFd> {
        self.irqfds.iter().collect()
    }

    /// Tells the driver the device configuration changed (bumps config_generation, raises the
    /// config vector), for changes that come from outside the device's own worker.
    pub fn notify_config_change(&self) -> io::Result<()> {
        self.interrupt.notify_config()
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
    pub fn save_state(&self) -> Result<PciState, SnapshotError> {
        Ok(PciState {
            core: self.core.save_state()?,
            config_space: self.config.bytes().to_vec(),
            isr: self.interrupt.isr(),
            config_generation: self.interrupt.config_generation(),
            msix: self.interrupt.msix().save_state(),
        })
    }

    /// Restores `state` (untrusted: validated against this device and guest memory) into this
    /// freshly built transport: registers, config space (BAR0 included: [`Self::bar_address`]
    /// then returns the restored address), MSI-X table and vectors, every vector's route sent
    /// again through the [`MsiSink`]. A device the driver had started is set up again and left
    /// paused; [`Self::resume`] runs it.
    pub fn restore_state(&mut self, state: &PciState) -> Result<(), RestoreError> {
        if state.isr & !(ISR_QUEUE | ISR_CONFIG) != 0 {
            return Err(RestoreError::Register {
                field: "ISR status",
                value: state.isr.into(),
            });
        }
        self.config.check_saved(&state.config_space)?;
        self.interrupt.msix().check_state(&state.msix)?;
        self.core.check_state(&state.core)?;
        // MSI-X first: a restored data plane outside pvm (vhost) takes its queues' irqfds
        // from the vector mapping when the core sets it up.
        let fresh = self.config.clone();
        self.config.restore(&state.config_space);
        let control = self.config.msix_control();
        self.interrupt.msix().restore_state(
            &state.msix,
            control & MSIX_CONTROL_ENABLE != 0,
            control & MSIX_CONTROL_FUNCTION_MASK != 0,
        );
        self.interrupt.restore(state.isr, state.config_generation);
        self.core.apply_state(&state.core).inspect_err(|_| {
            // The core is fresh again; so is the rest.
            self.config = fresh;
            self.interrupt.msix().reset_all();
            self.interrupt.restore(0, 0);
        })
    }

    /// A configuration space read. `offset` is the register offset in the function's 4 KiB
    /// (ECAM) or 256-byte space; accesses must be 1, 2 or 4 bytes within one dword. Anything
    /// else, and everything past 256 bytes, reads as zero.
    pub fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(range) = PciConfigSpace::access_range(offset, data.len()) else {
            let in_extended = offset
                .checked_add(data.len() as u64)
                .is_some_and(|end| end <= EXTENDED_CONFIG_SPACE_SIZE);
            if !in_extended {
                debug!(
                    "virtio-pci: {}-byte config space read at {offset:#x} ignored",
                    data.len()
                );
            }
            data.fill(0);
            return;
        };
        if overlaps(&range, PCI_CFG_DATA..PCI_CFG_DATA + 4) {
            // The driver reads BAR0 through the pci_cfg window (spec 4.1.4.9.2).
            if let Some(window) = self.config.pci_cfg_window() {
                let mut bytes = [0u8; 4];
                self.bar_read(window.offset, &mut bytes[..window.len]);
                self.config.set_pci_cfg_data(bytes);
            }
        }
        self.config.read(range, data);
    }

    /// A configuration space write; same access rules as [`Self::config_read`]. Read-only
    /// fields keep their value.
    pub fn config_write(&mut self, offset: u64, data: &[u8]) {
        let Some(range) = PciConfigSpace::access_range(offset, data.len()) else {
            debug!(
                "virtio-pci: {}-byte config space write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        self.config.write(range.clone(), data);
        if overlaps(&range, MSIX_CONTROL..MSIX_CONTROL + 2) {
            let control = self.config.msix_control();
            self.interrupt.msix().set_control(
                control & MSIX_CONTROL_ENABLE != 0,
                control & MSIX_CONTROL_FUNCTION_MASK != 0,
            );
        }
        if overlaps(&range, PCI_CFG_DATA..PCI_CFG_DATA + 4) {
            if let Some(window) = self.config.pci_cfg_window() {
                let bytes = self.config.pci_cfg_data();
                self.bar_write(window.offset, &bytes[..window.len]);
            }
        }
    }

    /// A read at `offset` in BAR0. Unmapped or malformed accesses read as zero.
    pub fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len();
        if let Some(relative) = within(offset, len, 0, REGION_PAGE) {
            common_cfg::read(&self.core, &self.interrupt, relative, data);
        } else if let Some(relative) = within(offset, len, ISR_OFFSET, ISR_LEN.into()) {
            data.fill(0);
            if relative == 0 && len > 0 {
                data[0] = self.interrupt.take_isr();
            }
        } else if let Some(relative) = within(offset, len, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN.into())
            .filter(|_| (1..=8).contains(&len))
        {
            self.core.device().read_config(relative, data);
        } else if let Some(relative) = within(offset, len, MSIX_TABLE_OFFSET, self.msix_table_len())
        {
            self.interrupt.msix().read_table(relative, data);
        } else if let Some(relative) = within(offset, len, MSIX_PBA_OFFSET, self.msix_pba_len()) {
            self.interrupt.msix().read_pba(relative, data);
        } else {
            debug!("virtio-pci: {len}-byte BAR read at {offset:#x} reads zero");
            data.fill(0);
        }
    }

    /// A write at `offset` in BAR0. Unmapped, read-only or malformed accesses are ignored.
    pub fn bar_write(&mut self, offset: u64, data: &[u8]) {
        let len = data.len();
        if let Some(relative) = within(offset, len, 0, REGION_PAGE) {
            common_cfg::write(&mut self.core, &self.interrupt, relative, data);
        } else if let Some(relative) = within(offset, len, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN.into())
            .filter(|_| (1..=8).contains(&len))
        {
            self.core.device_mut().write_config(relative, data);
        } else if let Some(relative) =
            within(offset, len, NOTIFY_OFFSET, REGION_PAGE).filter(|_| len > 0)
        {
            // Reaches userspace only where no ioeventfd matched (tests, or before the VMM
            // registered them). Queue n's slot starts at n * multiplier.
            let stride = u64::from(NOTIFY_OFF_MULTIPLIER);
            if relative % stride == 0 {
                // Below 0x1000 / 4, so it fits.
                self.core.kick((relative / stride) as u32);
            }
        } else if let Some(relative) = within(offset, len, MSIX_TABLE_OFFSET, self.msix_table_len())
        {
            self.interrupt.msix().write_table(relative, data);
        } else {
            debug!("virtio-pci: {len}-byte BAR write at {offset:#x} ignored");
        }
    }

    fn msix_table_len(&self) -> u64 {
        self.irqfds.len() as u64 * MSIX_TABLE_ENTRY_SIZE
    }

    fn msix_pba_len(&self) -> u64 {
        self.irqfds.len().div_ceil(64) as u64 * 8
    }
}

#[cfg(test)]
mod tests;

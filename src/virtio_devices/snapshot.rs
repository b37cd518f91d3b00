//! Saving and restoring each attached transport for a VM snapshot (the state itself is
//! pvm-virtio's; see `crate::snapshot`).

use super::{PausableDevice, TransportHandle, lock};

impl PausableDevice {
    /// The transport's and device's state for a snapshot; the device must be paused.
    pub fn save_state(
        &self,
    ) -> Result<crate::snapshot::DeviceState, pvm_virtio::snapshot::SnapshotError> {
        use crate::snapshot::DeviceState;
        Ok(match &self.transport {
            TransportHandle::Mmio(device) => DeviceState::Mmio(lock(device).0.save_state()?),
            TransportHandle::Pci(transport) => DeviceState::Pci(lock(transport).save_state()?),
        })
    }

    /// Restores a snapshot's `state` into this freshly attached transport, which it leaves
    /// paused. A state of the other transport, or a BAR the guest had moved (pvm's BARs and
    /// their ioeventfds stay where pvm put them), is refused.
    pub fn restore_state(
        &self,
        state: &crate::snapshot::DeviceState,
    ) -> Result<(), crate::snapshot::RestoreError> {
        use crate::snapshot::{DeviceState, RestoreError};
        let device = |source| RestoreError::Device {
            name: self.name.clone(),
            source,
        };
        match (&self.transport, state) {
            (TransportHandle::Mmio(device_lock), DeviceState::Mmio(state)) => {
                lock(device_lock).0.restore_state(state).map_err(device)
            }
            (TransportHandle::Pci(transport), DeviceState::Pci(state)) => {
                let mut transport = lock(transport);
                let placed = transport.bar_address();
                transport.restore_state(state).map_err(device)?;
                let restored = transport.bar_address();
                if restored != placed {
                    return Err(RestoreError::invalid(format!(
                        "virtio device {}: BAR0 at {restored:#x}, pvm places it at {placed:#x}",
                        self.name
                    )));
                }
                Ok(())
            }
            (TransportHandle::Mmio(_), DeviceState::Pci(_)) => Err(RestoreError::invalid(format!(
                "virtio device {}: a virtio-pci state for a virtio-mmio device",
                self.name
            ))),
            (TransportHandle::Pci(_), DeviceState::Mmio(_)) => Err(RestoreError::invalid(format!(
                "virtio device {}: a virtio-mmio state for a virtio-pci device",
                self.name
            ))),
        }
    }
}

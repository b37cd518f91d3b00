//! Snapshots of [`VirtioCore`]: the transport-independent registers, the queues with the
//! positions the device reached, and the device's own state. Restoring is split into a check
//! that looks at everything and changes nothing, and an apply that cannot fail on anything the
//! check covered, so a transport can check its own registers too before anything changes.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::{
    ActiveQueue, QueueRegisters, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FAILED, STATUS_FEATURES_OK, STATUS_NEEDS_RESET, VirtioCore, check_no_overlap,
};
use crate::device::Activation;
use crate::snapshot::{CoreState, QueueState, RestoreError, SnapshotError};

/// Whether the status state machine of [`VirtioCore::write_status`] can reach `status`: known
/// bits only, each step only after the one before it.
fn status_reachable(status: u8) -> bool {
    const KNOWN: u8 = STATUS_ACKNOWLEDGE
        | STATUS_DRIVER
        | STATUS_FEATURES_OK
        | STATUS_DRIVER_OK
        | STATUS_NEEDS_RESET
        | STATUS_FAILED;
    let steps = [
        (STATUS_DRIVER, STATUS_ACKNOWLEDGE),
        (STATUS_FEATURES_OK, STATUS_DRIVER),
        (STATUS_DRIVER_OK, STATUS_FEATURES_OK),
    ];
    status & !KNOWN == 0
        && steps
            .iter()
            .all(|&(bit, before)| status & bit == 0 || status & before != 0)
}

/// Whether a device with `status` runs a data plane (as [`VirtioCore::is_live`] says).
fn live(status: u8) -> bool {
    status & STATUS_DRIVER_OK != 0 && status & STATUS_NEEDS_RESET == 0
}

impl VirtioCore {
    fn event_idx(&self) -> bool {
        self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0
    }

    /// The registers, the queues' positions and the device's state. Only while the device is
    /// paused or runs nothing.
    pub(crate) fn save_state(&self) -> Result<CoreState, SnapshotError> {
        let device_type = self.device.device_type();
        if self.is_live() && !self.paused {
            return Err(SnapshotError::NotPaused { device_type });
        }
        let saved = self.device.save_state()?;
        let event_idx = self.event_idx();
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, registers) in (0u16..).zip(&self.queues) {
            let position = saved.queues.iter().find(|p| p.index == index);
            let (next_avail, next_used) = match position {
                None => (0, 0),
                Some(p) => match p.next_used {
                    Some(next_used) => (p.next_avail, next_used),
                    None => (p.next_avail, self.used_index(index, registers)?),
                },
            };
            queues.push(QueueState {
                max_size: registers.max_size,
                size: registers.size,
                ready: registers.ready,
                desc_table: registers.desc_table,
                avail_ring: registers.avail_ring,
                used_ring: registers.used_ring,
                next_avail,
                next_used,
                event_idx,
            });
        }
        Ok(CoreState {
            device_type,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            status: self.status,
            queue_select: self.queue_select,
            queues,
            device: saved.state,
        })
    }

    /// used.idx in guest memory: where a backend outside pvm (vhost) left the used ring.
    fn used_index(&self, index: u16, registers: &QueueRegisters) -> Result<u16, SnapshotError> {
        let mut idx = [0u8; 2];
        self.memory
            .read_slice(&mut idx, GuestAddress(registers.used_ring.wrapping_add(2)))
            .map_err(|source| SnapshotError::UsedIndex {
                device_type: self.device.device_type(),
                index,
                source,
            })?;
        Ok(u16::from_le_bytes(idx))
    }

    /// Checks `state` against this fresh core, its device and guest memory; changes nothing.
    pub(crate) fn check_state(&self, state: &CoreState) -> Result<(), RestoreError> {
        if self.status != 0 || self.paused {
            return Err(RestoreError::NotFresh);
        }
        let here = self.device.device_type();
        if state.device_type != here {
            return Err(RestoreError::DeviceType {
                saved: state.device_type,
                here,
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount {
                saved: state.queues.len(),
                here: self.queues.len(),
            });
        }
        if !status_reachable(state.status) {
            return Err(RestoreError::Status {
                status: state.status,
            });
        }
        if state.status & STATUS_FEATURES_OK != 0 {
            let unoffered = state.driver_features & !self.device.features();
            if unoffered != 0 {
                return Err(RestoreError::Features {
                    features: state.driver_features,
                    unoffered,
                });
            }
            if state.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                return Err(RestoreError::NoVersion1 {
                    features: state.driver_features,
                });
            }
        }
        let acked = state.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let served = live(state.status);
        for ((index, saved), fresh) in (0u16..).zip(&state.queues).zip(&self.queues) {
            check_queue(index, saved, fresh.max_size, acked, served)?;
            if served && saved.ready {
                registers(saved).to_queue(index, acked, &self.memory)?;
            }
        }
        if served {
            let all: Vec<_> = state.queues.iter().map(registers).collect();
            check_no_overlap(&all)?;
        }
        Ok(())
    }

    /// Takes a state [`Self::check_state`] accepted. A device the driver had started is set up
    /// with its queues at the saved positions, paused. If the device refuses its part, the core
    /// is reset (fresh again) and the error returned.
    pub(crate) fn apply_state(&mut self, state: &CoreState) -> Result<(), RestoreError> {
        self.device_features_select = state.device_features_select;
        self.driver_features_select = state.driver_features_select;
        self.driver_features = state.driver_features;
        self.status = state.status;
        self.queue_select = state.queue_select;
        for (registers, saved) in self.queues.iter_mut().zip(&state.queues) {
            *registers = QueueRegisters {
                max_size: registers.max_size,
                ..self::registers(saved)
            };
        }
        let result = if self.is_live() {
            self.activation(state)
                .and_then(|activation| self.device.restore(Some(activation), &state.device))
        } else {
            self.device.restore(None, &state.device)
        };
        match result {
            Ok(()) => {
                self.paused = self.is_live();
                Ok(())
            }
            Err(error) => {
                self.reset();
                Err(error)
            }
        }
    }

    /// The activation of a restored device: the ready queues at their saved positions.
    fn activation(&self, state: &CoreState) -> Result<Activation, RestoreError> {
        let event_idx = self.event_idx();
        let mut queues = Vec::new();
        for (((index, registers), kick), saved) in (0u16..)
            .zip(&self.queues)
            .zip(&self.kicks)
            .zip(&state.queues)
        {
            if !registers.ready {
                continue;
            }
            let mut queue = registers.to_queue(index, event_idx, &self.memory)?;
            queue.set_next_avail(saved.next_avail);
            queue.set_next_used(saved.next_used);
            let kick = kick
                .try_clone()
                .map_err(|source| RestoreError::Kick { index, source })?;
            queues.push(ActiveQueue { index, queue, kick });
        }
        Ok(Activation {
            memory: self.memory.clone(),
            interrupt: self.interrupt.clone(),
            queues,
            features: self.driver_features & self.device.features(),
        })
    }
}

/// The registers of a saved queue (its maximum is checked separately).
fn registers(saved: &QueueState) -> QueueRegisters {
    QueueRegisters {
        max_size: saved.max_size,
        size: saved.size,
        ready: saved.ready,
        desc_table: saved.desc_table,
        avail_ring: saved.avail_ring,
        used_ring: saved.used_ring,
    }
}

/// The checks of one queue that need no guest memory.
fn check_queue(
    index: u16,
    saved: &QueueState,
    max: u16,
    acked: bool,
    served: bool,
) -> Result<(), RestoreError> {
    if saved.max_size != max {
        return Err(RestoreError::QueueMaxSize {
            index,
            saved: saved.max_size,
            here: max,
        });
    }
    if saved.size > max {
        return Err(RestoreError::QueueSizeTooBig {
            index,
            size: saved.size,
            max,
        });
    }
    if saved.event_idx != acked {
        return Err(RestoreError::QueueEventIdx {
            index,
            saved: saved.event_idx,
            acked,
        });
    }
    if served && saved.ready {
        // The device cannot have used more than it popped, nor hold more than the ring.
        if saved.next_avail.wrapping_sub(saved.next_used) > saved.size {
            return Err(RestoreError::QueuePosition {
                index,
                next_avail: saved.next_avail,
                next_used: saved.next_used,
                size: saved.size,
            });
        }
    } else if (saved.next_avail, saved.next_used) != (0, 0) {
        return Err(RestoreError::QueueNotReady {
            index,
            what: "ring positions",
        });
    }
    Ok(())
}

//! Snapshots of a virtio-net device: the active queue-pair count and where every queue stands,
//! whoever serves it (pvm's pair and control workers, or a data plane such as vhost-net).
//!
//! A frame the tap delivered while the guest had no receive buffer (a pair worker's pending
//! frame) is not saved: the snapshot drops it, as a network may drop any frame. Nothing else is
//! in flight in a paused pair: a frame is either in a used buffer or still in the tap.

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;

use super::Net;
use crate::device::Activation;
use crate::snapshot::{DeviceState, NetState, RestoreError, SavedDevice, SnapshotError};

impl Net {
    pub(super) fn save_snapshot(&self) -> Result<SavedDevice, SnapshotError> {
        let mut queues = Vec::new();
        if let Some((ctrl, _)) = &self.ctrl {
            queues.extend(ctrl.saved_positions(VIRTIO_ID_NET)?);
        }
        for worker in &self.workers {
            queues.extend(worker.saved_positions(VIRTIO_ID_NET)?);
        }
        self.pairs.with_planes(|planes| {
            planes.iter().try_for_each(|plane| {
                queues.extend(plane.positions()?);
                Ok::<_, SnapshotError>(())
            })
        })?;
        queues.sort_by_key(|position| position.index);
        // At most u16::MAX / 2 pairs, checked at construction.
        let active_pairs = self.pairs.active() as u16;
        Ok(SavedDevice {
            state: DeviceState::Net(NetState { active_pairs }),
            queues,
        })
    }

    pub(super) fn restore_snapshot(
        &mut self,
        activation: Option<Activation>,
        state: &DeviceState,
    ) -> Result<(), RestoreError> {
        let DeviceState::Net(saved) = state else {
            return Err(RestoreError::DeviceKind {
                saved: state.kind(),
                here: "net",
            });
        };
        let active = usize::from(saved.active_pairs);
        // A device the driver has not started uses one pair, as after a reset.
        let most = if activation.is_some() {
            self.pairs.count()
        } else {
            1
        };
        if !(1..=most).contains(&active) {
            return Err(RestoreError::NetPairs {
                saved: saved.active_pairs,
                pairs: most,
            });
        }
        let Some(activation) = activation else {
            return Ok(());
        };
        let result =
            self.start_pairs(activation, true)
                .map_err(RestoreError::from)
                .and_then(|()| match active {
                    1 => Ok(()),
                    _ => self.pairs.set_active(active).map_err(|source| {
                        RestoreError::NetPairSwitch {
                            pairs: saved.active_pairs,
                            source,
                        }
                    }),
                });
        if result.is_err() {
            // Nothing of a half-restored device stays: the transport resets to fresh.
            self.stop_pairs();
        }
        result
    }
}

//! Snapshots of a balloon: the host's target, the driver's `actual`, the statistics interval,
//! the features offered, the statistics buffer the device holds until the next interval and
//! the pages in the balloon (so a restored guest can deflate them, and not inflate them twice).
//! The pages themselves were given back to the host; the memory file has them as holes.

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;

use super::pages::PageTracker;
use super::worker::BalloonHandler;
use super::{Balloon, VIRTIO_BALLOON_F_REPORTING, VIRTIO_BALLOON_F_STATS_VQ};
use crate::device::{Activation, VirtioDevice};
use crate::snapshot::{BalloonState, DeviceState, RestoreError, SavedDevice, SnapshotError};

const DEVICE: &str = "balloon";

impl Balloon {
    pub(super) fn save_snapshot(&self) -> Result<SavedDevice, SnapshotError> {
        let queues = self.worker.saved_positions(VIRTIO_ID_BALLOON)?;
        let (stats_head, inflated) = self
            .worker
            .paused()
            .map(BalloonHandler::saved)
            .unwrap_or_default();
        Ok(SavedDevice {
            state: DeviceState::Balloon(BalloonState {
                features: self.features(),
                target_pages: self.handle.target_pages(),
                actual_pages: self.handle.actual_pages(),
                stats_interval_s: self.handle.stats_interval_s(),
                stats_head,
                inflated,
            }),
            queues,
        })
    }

    pub(super) fn restore_snapshot(
        &mut self,
        activation: Option<Activation>,
        state: &DeviceState,
    ) -> Result<(), RestoreError> {
        let DeviceState::Balloon(saved) = state else {
            return Err(RestoreError::DeviceKind {
                saved: state.kind(),
                here: DEVICE,
            });
        };
        self.check(saved, activation.is_some())?;
        if let Some(activation) = activation {
            let pages =
                PageTracker::from_words(&activation.memory, &saved.inflated).map_err(|bad| {
                    match bad {
                        Some(pfn) => RestoreError::Value {
                            device: DEVICE,
                            what: "inflated page",
                            value: pfn,
                        },
                        None => RestoreError::Value {
                            device: DEVICE,
                            what: "page bitmap length (64-bit words)",
                            value: saved.inflated.len() as u64,
                        },
                    }
                })?;
            // No hinting run survives a restore (the fresh device's command id is STOP, as
            // Firecracker's is after a load): a run is started again through the API.
            let queues = super::worker::QueueSet {
                stats: activation.has_feature(VIRTIO_BALLOON_F_STATS_VQ),
                hinting: activation.has_feature(super::VIRTIO_BALLOON_F_FREE_PAGE_HINT),
                reporting: activation.has_feature(VIRTIO_BALLOON_F_REPORTING),
            };
            let shared = self.handle.0.clone();
            let mut handler = BalloonHandler::new(activation, shared, queues)?;
            if let Some(head) = saved.stats_head {
                // A held buffer names a descriptor of the statistics queue.
                match handler.stats_queue_size() {
                    Some(size) if head < size => {}
                    _ => {
                        return Err(RestoreError::Value {
                            device: DEVICE,
                            what: "held statistics buffer",
                            value: u64::from(head),
                        });
                    }
                }
            }
            handler.take_saved(saved.stats_head, pages);
            self.worker.start_paused(|| Ok(handler))?;
        }
        let shared = &self.handle.0;
        shared
            .target_pages
            .store(saved.target_pages, Ordering::Release);
        shared
            .actual_pages
            .store(saved.actual_pages, Ordering::Release);
        shared
            .stats_interval_s
            .store(saved.stats_interval_s, Ordering::Release);
        Ok(())
    }

    /// What must agree with this device's configuration before anything is taken.
    fn check(&self, saved: &BalloonState, active: bool) -> Result<(), RestoreError> {
        if saved.features != self.features() {
            return Err(RestoreError::Mismatch {
                device: DEVICE,
                what: "features",
                saved: saved.features,
                here: self.features(),
            });
        }
        // Statistics are on or off for the device's life (the queue was offered or not).
        if (saved.stats_interval_s == 0) != (self.config.stats_interval_s == 0) {
            return Err(RestoreError::Mismatch {
                device: DEVICE,
                what: "statistics interval (s)",
                saved: u64::from(saved.stats_interval_s),
                here: u64::from(self.config.stats_interval_s),
            });
        }
        if !active && (saved.stats_head.is_some() || saved.inflated.iter().any(|&w| w != 0)) {
            return Err(RestoreError::Value {
                device: DEVICE,
                what: "pages or a statistics buffer held by a device the driver never started: \
                       page bitmap words",
                value: saved.inflated.len() as u64,
            });
        }
        Ok(())
    }
}

//! Dirty page tracking for Diff snapshots (`track_dirty_pages`): KVM's dirty log holds the
//! pages the vCPUs wrote, pvm-virtio's [`DirtyLog`] the pages pvm's devices wrote, and the
//! kernel vhost log ([`VhostLog`], with a tap on vhost-net) the pages the kernel's vhost-net
//! wrote. A Diff snapshot writes the union; every snapshot, Full or Diff, clears all three, so
//! the next Diff holds only what was written after it. A snapshot is taken paused, when every
//! vhost-net ring has been detached from its tap (which waits for the kernel's worker): the
//! vhost log then holds all the kernel wrote.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use kvm_ioctls::VmFd;
use pvm_vhost::dirty::{LOG_PAGE_BYTES, VhostLog};
use pvm_virtio::dirty::DirtyLog;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::{DeviceState, SnapshotError};

/// One VM's dirty page logs and the id of the snapshot its RAM last matched.
#[derive(Debug)]
pub struct DirtyTracking {
    log: DirtyLog,
    /// The kernel vhost-net's log, once a tap on vhost-net has one.
    vhost: OnceLock<Arc<VhostLog>>,
    /// The last snapshot taken of (or restored into) this VM: what a Diff layers onto.
    last: Mutex<Option<u64>>,
}

impl DirtyTracking {
    pub fn new(log: DirtyLog, restored_from: Option<u64>) -> Self {
        DirtyTracking {
            log,
            vhost: OnceLock::new(),
            last: Mutex::new(restored_from),
        }
    }

    /// Merges `vhost`, the log the VM's vhost-net instances write into, into every Diff from
    /// now on; called when the devices are made, before the guest runs. A VM has one such log.
    pub fn follow_vhost(&self, vhost: Arc<VhostLog>) {
        if self.vhost.set(vhost).is_err() {
            log::warn!("dirty page tracking: a second vhost log was ignored");
        }
    }

    /// The snapshot a Diff taken now layers onto (None: the VM booted and took none, so every
    /// page is dirty).
    pub fn parent(&self) -> Option<u64> {
        *self.last.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes and clears the pages written since the last call: per RAM region (KVM slot, in
    /// the memory's order) a bitmap of 64 pages a word, KVM's, the devices' and vhost-net's
    /// ORed.
    pub fn take(
        &self,
        vm: &VmFd,
        memory: &GuestMemoryMmap,
    ) -> Result<Vec<Vec<u64>>, SnapshotError> {
        let mut maps = Vec::new();
        let mut vhost_pages = 0;
        for (slot, region) in memory.iter().enumerate() {
            let mut kvm = vm
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|source| SnapshotError::Kvm {
                    what: "KVM_GET_DIRTY_LOG",
                    source,
                })?;
            if let Some(devices) = self.log.region(slot) {
                merge(&mut kvm, devices.take());
            }
            if let Some(vhost) = self.vhost.get() {
                // The vhost log counts guest-physical pages from 0; the slot's start from here.
                let first = region.start_addr().0 / LOG_PAGE_BYTES;
                let pages = vhost.take(first, region.len().div_ceil(LOG_PAGE_BYTES));
                vhost_pages += pages.iter().map(|w| w.count_ones()).sum::<u32>();
                merge(&mut kvm, pages);
            }
            maps.push(kvm);
        }
        if self.vhost.get().is_some() {
            // How much a Diff owes the kernel's log (tests/snapshot.rs reads it).
            log::info!("vhost-net wrote {vhost_pages} guest pages since the last snapshot");
        }
        Ok(maps)
    }

    /// After a snapshot: the next Diff layers onto `id`.
    pub fn taken(&self, id: u64) {
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(id);
    }

    /// After a failed snapshot whose dirty pages were taken: they are lost, so the next Diff
    /// writes every page rather than miss some.
    pub fn lost(&self) {
        self.log.mark_all();
    }
}

/// Has `tracking` (the VM's, when it tracks dirty pages) merge the vhost log the devices
/// `attached` write into, if a tap is on vhost-net.
pub fn follow_vhost(tracking: Option<&DirtyTracking>, attached: &crate::virtio_devices::Attached) {
    if let (Some(tracking), Some(log)) = (tracking, &attached.vhost_log) {
        tracking.follow_vhost(log.clone());
    }
}

/// ORs `other` into `map`, word by word (both bitmaps of one region).
fn merge(map: &mut [u64], other: Vec<u64>) {
    for (word, bits) in map.iter_mut().zip(other) {
        *word |= bits;
    }
}

/// Marks the used rings of every queue of `devices` in the device log: the rings are written
/// by whichever data plane served the queue (pvm's workers through virtio-queue, which has no
/// dirty log), and they are small, so each snapshot counts them dirty.
pub fn mark_used_rings(memory: &GuestMemoryMmap, devices: &[DeviceState]) {
    for device in devices {
        let core = match device {
            DeviceState::Mmio(state) => &state.core,
            DeviceState::Pci(state) => &state.core,
        };
        for queue in core.queues.iter().filter(|q| q.ready) {
            // flags, idx, `size` used elements of 8 bytes, avail_event.
            let len = 6 + 8 * usize::from(queue.size);
            pvm_virtio::dirty::mark_guest(memory, GuestAddress(queue.used_ring), len);
        }
    }
}

/// A fresh snapshot id: random, so a diff is never layered onto another VM's file by chance.
pub fn new_id() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer it is given.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // No entropy (never on Linux >= 3.17 once booted): time and pid still differ per VM.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return nanos ^ (u64::from(std::process::id()) << 32);
    }
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GuestPages;
    use crate::memory::VmMemory;
    use pvm_virtio::snapshot::{CoreState, MmioState, QueueState};
    use std::sync::Arc;

    fn pages(maps: &[Vec<u64>]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (region, bits) in maps.iter().enumerate() {
            for page in 0..bits.len() * 64 {
                if bits[page / 64] & (1 << (page % 64)) != 0 {
                    out.push((region, page));
                }
            }
        }
        out
    }

    #[test]
    fn a_tracked_vm_gives_kvm_and_device_pages_and_clears_them() {
        let Some(kvm) = crate::kvm_host::kvm_for_tests() else {
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        let mut ram = VmMemory::new(vm.clone(), 64 << 20, false, GuestPages::Normal).unwrap();
        ram.track_dirty_pages(None).unwrap();
        let tracking = ram.dirty_tracking().unwrap();
        assert_eq!(tracking.parent(), None);
        let memory = ram.guest_memory();
        // A booted VM starts all dirty: what pvm loaded is in no log.
        let all = tracking.take(&vm, memory).unwrap();
        assert_eq!(pages(&all).len(), (64 << 20) / 4096);
        assert!(pages(&tracking.take(&vm, memory).unwrap()).is_empty());
        pvm_virtio::dirty::mark_guest(memory, GuestAddress(0x10_0800), 1);
        assert_eq!(pages(&tracking.take(&vm, memory).unwrap()), [(0, 0x100)]);
        // vhost-net's log is merged in from when a tap on vhost-net brings one, and cleared.
        let vhost = Arc::new(VhostLog::for_memory(memory));
        vhost.mark(0x180);
        tracking.follow_vhost(vhost.clone());
        vhost.mark(0x3fff);
        pvm_virtio::dirty::mark_guest(memory, GuestAddress(0x180_000), 1);
        assert_eq!(
            pages(&tracking.take(&vm, memory).unwrap()),
            [(0, 0x180), (0, 0x3fff)]
        );
        assert!(pages(&tracking.take(&vm, memory).unwrap()).is_empty());
        // A used ring of 4 entries at 0x20_0ffc spans two pages; a queue not ready is skipped.
        let queue = |used_ring, ready| QueueState {
            max_size: 256,
            size: 4,
            ready,
            desc_table: 0,
            avail_ring: 0,
            used_ring,
            next_avail: 0,
            next_used: 0,
            event_idx: false,
        };
        let device = DeviceState::Mmio(MmioState {
            core: CoreState {
                device_type: 4,
                device_features_select: 0,
                driver_features_select: 0,
                driver_features: 0,
                status: 0,
                queue_select: 0,
                queues: vec![queue(0x20_0ffc, true), queue(0x30_0000, false)],
                device: pvm_virtio::snapshot::DeviceState::Rng,
            },
            interrupt_status: 0,
            config_generation: 0,
        });
        mark_used_rings(memory, &[device]);
        assert_eq!(
            pages(&tracking.take(&vm, memory).unwrap()),
            [(0, 0x200), (0, 0x201)]
        );
        tracking.taken(42);
        assert_eq!(tracking.parent(), Some(42));
        vhost.mark(7);
        tracking.lost();
        assert_eq!(
            pages(&tracking.take(&vm, memory).unwrap()).len(),
            (64 << 20) / 4096
        );
        // Restored RAM starts clean, following the snapshot it came from.
        let vm = Arc::new(kvm.create_vm().unwrap());
        let mut ram = VmMemory::new(vm.clone(), 64 << 20, false, GuestPages::Normal).unwrap();
        ram.track_dirty_pages(Some(7)).unwrap();
        let tracking = ram.dirty_tracking().unwrap();
        assert_eq!(tracking.parent(), Some(7));
        assert!(pages(&tracking.take(&vm, ram.guest_memory()).unwrap()).is_empty());
    }
}

//! Handing a device's virtqueues to a vhost backend, shared by both frontends (the kernel's
//! vhost-net, a vhost-user backend process): the rings are programmed the same way through the
//! vhost crate's [`VhostBackend`], each ring's call is the queue's MSI-X irqfd or a relayed
//! eventfd, and a pause takes every ring's position back (GET_VRING_BASE) so the resume, or a
//! snapshot, starts from where the backend stopped.

use std::sync::Arc;

use pvm_virtio::data_plane::DataPlaneError;
use pvm_virtio::snapshot::{QueuePosition, SnapshotError};
use pvm_virtio::thread::DeviceThread;
use pvm_virtio::{ActiveQueue, Interrupt};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::relay::Relay;

/// One ring as a backend serves it.
struct Ring {
    /// The backend's index of the ring (vhost-net numbers every pair's rings 0 and 1).
    vring: usize,
    /// The device's index of the queue.
    queue: u16,
    config: VringConfigData,
    /// Where the backend starts: the driver's position at activation, then what the last
    /// pause took back.
    base: u16,
    kick: EventFd,
    call: EventFd,
}

/// The rings of one activation, with the relay of their calls on virtio-mmio.
pub(crate) struct Rings {
    plane: &'static str,
    rings: Vec<Ring>,
    relay: Option<Relay>,
}

/// The rings of a started device, and whether a pause took them back (or, for a device restored
/// from a snapshot, whether the backend has yet to learn them at the resume).
pub(crate) struct Served {
    pub(crate) rings: Rings,
    pub(crate) paused: bool,
}

impl Served {
    /// Each ring's position as the pause took it back (GET_VRING_BASE), for a snapshot. The
    /// used index is the backend's to keep: it is in the used ring, where the transport reads
    /// it. A backend still serving the rings is not asked.
    pub(crate) fn positions(&self, device_type: u32) -> Result<Vec<QueuePosition>, SnapshotError> {
        if !self.paused {
            return Err(SnapshotError::NotPaused { device_type });
        }
        Ok(self
            .rings
            .bases()
            .into_iter()
            .map(|(index, next_avail)| QueuePosition {
                index,
                next_avail,
                next_used: None,
            })
            .collect())
    }
}

/// How a frontend names ring addresses: vhost-net takes guest addresses (the kernel
/// translates them through the memory table), vhost-user takes the frontend's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RingAddresses {
    Guest,
    Host,
}

impl Rings {
    /// Takes over `queues` (each with the backend's ring index): their addresses, kicks and
    /// positions, and for each a call eventfd, the queue's irqfd where the interrupt has one
    /// (virtio-pci) or else one that a relay on `relay_thread` turns into an interrupt.
    pub(crate) fn new(
        plane: &'static str,
        memory: &GuestMemoryMmap,
        queues: Vec<(usize, ActiveQueue)>,
        addresses: RingAddresses,
        interrupt: Arc<dyn Interrupt>,
        relay_thread: &mut DeviceThread,
    ) -> Result<Self, DataPlaneError> {
        let host = |what| {
            move |source| DataPlaneError::Host {
                plane,
                what,
                source,
            }
        };
        let mut rings = Vec::with_capacity(queues.len());
        let mut relayed = Vec::new();
        for (vring, active) in queues {
            let config = ring_config(plane, memory, &active.queue, addresses)?;
            let call = match interrupt.queue_irqfd(active.index) {
                Some(irqfd) => irqfd,
                None => {
                    let call = EventFd::new(libc::EFD_NONBLOCK).map_err(host("call eventfd"))?;
                    relayed.push((
                        active.index,
                        call.try_clone().map_err(host("call eventfd"))?,
                    ));
                    call
                }
            };
            rings.push(Ring {
                vring,
                queue: active.index,
                config,
                base: active.queue.next_avail(),
                kick: active.kick,
                call,
            });
        }
        let relay = if relayed.is_empty() {
            None
        } else {
            Some(Relay::start(relay_thread, plane, relayed, interrupt)?)
        };
        Ok(Rings {
            plane,
            rings,
            relay,
        })
    }

    /// Has the backend log its writes to every used ring (VHOST_VRING_F_LOG, the used ring's
    /// guest address as `log_guest_addr`), from the next [`Self::program`] on. For rings named
    /// by guest address ([`RingAddresses::Guest`]): the log counts guest pages.
    pub(crate) fn log_used_rings(&mut self) {
        for ring in &mut self.rings {
            ring.config.flags |= 1 << vhost::vhost_kern::vhost_binding::VHOST_VRING_F_LOG;
            ring.config.log_addr = Some(ring.config.used_ring_addr);
        }
    }

    /// The backend's indices of the rings.
    pub(crate) fn vrings(&self) -> impl Iterator<Item = usize> + '_ {
        self.rings.iter().map(|ring| ring.vring)
    }

    /// How many calls the relay turns into interrupts (0 on virtio-pci).
    pub(crate) fn relayed(&self) -> usize {
        self.relay.as_ref().map_or(0, Relay::queues)
    }

    /// Programs every ring into `backend` from its base: size, addresses, position, call, then
    /// kick (once it has a kick a vhost-user backend may use the ring, and a call made before
    /// the call fd arrived would be lost). `started` gets each ring's index once the backend
    /// knows it, so a failure can stop exactly those.
    pub(crate) fn program(
        &self,
        backend: &impl VhostBackend,
        started: &mut Vec<usize>,
    ) -> Result<(), DataPlaneError> {
        let refused = |request| move |e| DataPlaneError::request(self.plane, request, e);
        for ring in &self.rings {
            backend
                .set_vring_num(ring.vring, ring.config.queue_size)
                .map_err(refused("SET_VRING_NUM"))?;
            backend
                .set_vring_addr(ring.vring, &ring.config)
                .map_err(refused("SET_VRING_ADDR"))?;
            backend
                .set_vring_base(ring.vring, ring.base)
                .map_err(refused("SET_VRING_BASE"))?;
            started.push(ring.vring);
            backend
                .set_vring_call(ring.vring, &ring.call)
                .map_err(refused("SET_VRING_CALL"))?;
            backend
                .set_vring_kick(ring.vring, &ring.kick)
                .map_err(refused("SET_VRING_KICK"))?;
        }
        Ok(())
    }

    /// Takes every ring's position back from a backend that stopped serving it (GET_VRING_BASE),
    /// as the base the next [`Self::program`] starts from.
    pub(crate) fn take_bases(&mut self, backend: &impl VhostBackend) -> Result<(), DataPlaneError> {
        for ring in &mut self.rings {
            let base = backend
                .get_vring_base(ring.vring)
                .map_err(|e| DataPlaneError::request(self.plane, "GET_VRING_BASE", e))?;
            // The ring size is at most 32768; a larger answer is a broken backend.
            ring.base = u16::try_from(base).map_err(|_| DataPlaneError::BadRingBase {
                plane: self.plane,
                queue: ring.queue,
                base,
            })?;
        }
        Ok(())
    }

    /// Each ring's device queue index and base, in order.
    pub(crate) fn bases(&self) -> Vec<(u16, u16)> {
        self.rings
            .iter()
            .map(|ring| (ring.queue, ring.base))
            .collect()
    }

    /// Ends the call relay, if one runs; the rings themselves are the caller's to stop.
    pub(crate) fn stop_relay(&mut self, relay_thread: &mut DeviceThread) {
        if let Some(relay) = self.relay.take() {
            relay.stop(relay_thread);
        }
    }
}

/// The addresses of `queue`'s rings as the backend wants them.
fn ring_config(
    plane: &'static str,
    memory: &GuestMemoryMmap,
    queue: &Queue,
    addresses: RingAddresses,
) -> Result<VringConfigData, DataPlaneError> {
    let size = queue.size();
    let address = |guest: u64, len: u64| match addresses {
        RingAddresses::Guest => Ok(guest),
        RingAddresses::Host => host_address(plane, memory, guest, len),
    };
    Ok(VringConfigData {
        queue_max_size: queue.max_size(),
        queue_size: size,
        flags: 0,
        desc_table_addr: address(queue.desc_table(), 16 * u64::from(size))?,
        used_ring_addr: address(queue.used_ring(), 6 + 8 * u64::from(size))?,
        avail_ring_addr: address(queue.avail_ring(), 6 + 2 * u64::from(size))?,
        log_addr: None,
    })
}

/// pvm's address of the `len` guest bytes at `addr`, which must lie in one region.
fn host_address(
    plane: &'static str,
    memory: &GuestMemoryMmap,
    addr: u64,
    len: u64,
) -> Result<u64, DataPlaneError> {
    let bad = || DataPlaneError::RingOutsideRegion {
        plane,
        address: addr,
        len,
    };
    let len = usize::try_from(len).map_err(|_| bad())?;
    let slice = GuestMemoryBackend::get_slice(memory, vm_memory::GuestAddress(addr), len)
        .map_err(|_| bad())?;
    Ok(slice.ptr_guard().as_ptr() as u64)
}

/// The guest memory table for SET_MEM_TABLE. With `shared`, every region must be a file
/// mapping whose descriptor travels with the message (vhost-user); the kernel needs none.
pub(crate) fn memory_table(
    plane: &'static str,
    memory: &GuestMemoryMmap,
    shared: bool,
) -> Result<Vec<VhostUserMemoryRegionInfo>, DataPlaneError> {
    memory
        .iter()
        .map(|region| {
            let start = region.start_addr().raw_value();
            let (mmap_offset, mmap_handle) = match region.file_offset() {
                Some(file) if shared => {
                    (file.start(), std::os::fd::AsRawFd::as_raw_fd(file.file()))
                }
                None if shared => {
                    return Err(DataPlaneError::Unshareable {
                        plane,
                        address: start,
                    });
                }
                _ => (0, -1),
            };
            Ok(VhostUserMemoryRegionInfo {
                guest_phys_addr: start,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                mmap_offset,
                mmap_handle,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use vhost::VhostUserDirtyLogRegion;
    use vm_memory::GuestAddress;

    use super::*;

    /// A backend that records the ring addresses it is given.
    #[derive(Default)]
    struct Recorder {
        addresses: RefCell<Vec<(usize, VringConfigData)>>,
    }

    impl VhostBackend for Recorder {
        fn get_features(&self) -> vhost::Result<u64> {
            Ok(0)
        }
        fn set_features(&self, _: u64) -> vhost::Result<()> {
            Ok(())
        }
        fn set_owner(&self) -> vhost::Result<()> {
            Ok(())
        }
        fn reset_owner(&self) -> vhost::Result<()> {
            Ok(())
        }
        fn set_mem_table(
            &self,
            _: &[VhostUserMemoryRegionInfo],
        ) -> vhost::Result<Option<Vec<u64>>> {
            Ok(None)
        }
        fn set_log_base(&self, _: u64, _: Option<VhostUserDirtyLogRegion>) -> vhost::Result<()> {
            Ok(())
        }
        fn set_log_fd(&self, _: std::os::fd::RawFd) -> vhost::Result<()> {
            Ok(())
        }
        fn set_vring_num(&self, _: usize, _: u16) -> vhost::Result<()> {
            Ok(())
        }
        fn set_vring_addr(&self, index: usize, config: &VringConfigData) -> vhost::Result<()> {
            self.addresses.borrow_mut().push((index, *config));
            Ok(())
        }
        fn set_vring_base(&self, _: usize, _: u16) -> vhost::Result<()> {
            Ok(())
        }
        fn get_vring_base(&self, _: usize) -> vhost::Result<u32> {
            Ok(0)
        }
        fn set_vring_call(&self, _: usize, _: &EventFd) -> vhost::Result<()> {
            Ok(())
        }
        fn set_vring_kick(&self, _: usize, _: &EventFd) -> vhost::Result<()> {
            Ok(())
        }
        fn set_vring_err(&self, _: usize, _: &EventFd) -> vhost::Result<()> {
            Ok(())
        }
    }

    /// Interrupts with an irqfd per queue (virtio-pci), so no relay runs.
    #[derive(Debug)]
    struct Irqfds;

    impl Interrupt for Irqfds {
        fn notify_queue(&self, _: u16) -> std::io::Result<()> {
            Ok(())
        }
        fn notify_config(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn queue_irqfd(&self, _: u16) -> Option<EventFd> {
            EventFd::new(libc::EFD_NONBLOCK).ok()
        }
    }

    fn queue(index: u16, used: u64) -> (usize, ActiveQueue) {
        let mut queue = Queue::new(256).unwrap();
        queue.set_size(16);
        queue.set_desc_table_address(Some((used - 0x1000) as u32), Some(0));
        queue.set_avail_ring_address(Some((used - 0x800) as u32), Some(0));
        queue.set_used_ring_address(Some(used as u32), Some(0));
        queue.set_ready(true);
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (usize::from(index), ActiveQueue { index, queue, kick })
    }

    #[test]
    fn logged_rings_ask_for_their_used_ring_to_be_logged_at_every_programming() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut thread = DeviceThread::spawn("rings-test".to_string());
        let queues = vec![queue(0, 0x2000), queue(1, 0x6000)];
        let mut rings = Rings::new(
            "test",
            &memory,
            queues,
            RingAddresses::Guest,
            Arc::new(Irqfds),
            &mut thread,
        )
        .unwrap();
        let backend = Recorder::default();
        rings.program(&backend, &mut Vec::new()).unwrap();
        for (_, config) in backend.addresses.take() {
            assert_eq!(config.flags, 0, "not logged unless asked");
            assert_eq!(config.log_addr, None);
        }
        rings.log_used_rings();
        // The activation, then a resume: both carry the flag and the used ring's address.
        for _ in 0..2 {
            rings.program(&backend, &mut Vec::new()).unwrap();
            let programmed = backend.addresses.take();
            assert_eq!(programmed.len(), 2);
            for (index, config) in programmed {
                let used = [0x2000, 0x6000][index];
                assert_eq!(config.flags, 1 << 0, "VHOST_VRING_F_LOG");
                assert_eq!(config.log_addr, Some(used));
                assert_eq!(config.used_ring_addr, used);
                assert!(config.is_log_addr_valid());
            }
        }
        rings.stop_relay(&mut thread);
    }
}

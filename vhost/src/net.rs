//! Kernel vhost-net as the data plane of pvm's virtio-net device: the kernel moves frames
//! between the guest's rings and the tap; pvm only sets the rings up. Kicks are the queues'
//! ioeventfds; calls are the MSI-X irqfds on virtio-pci, or, on virtio-mmio (whose interrupt
//! status the kernel cannot set), eventfds that a relay thread turns into interrupts.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use pvm_virtio::data_plane::DataPlane;
use pvm_virtio::thread::DeviceThread;
use pvm_virtio::{ActivateError, ActiveQueue, Interrupt};

use crate::relay::Relay;
use vhost::net::VhostNet as _;
use vhost::vhost_kern::net::Net as KernelNet;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_ACCESS_PLATFORM;
use virtio_queue::QueueT;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Where the kernel's vhost-net device lives.
pub const VHOST_NET_PATH: &str = "/dev/vhost-net";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{VHOST_NET_PATH}: {0}")]
    Open(std::io::Error),
}

/// True when /dev/vhost-net can be opened read-write (the `auto` choice).
pub fn available() -> bool {
    File::options()
        .read(true)
        .write(true)
        .open(VHOST_NET_PATH)
        .is_ok()
}

/// The kernel vhost-net data plane for one tap.
///
/// Everything it needs is made when the VM is built, before the guest runs: the vhost-net
/// instance (kept for the VM's life: a driver reset hands it back with VHOST_RESET_OWNER rather
/// than closing it, so no guest-triggered path opens a file) and the relay's thread.
pub struct VhostNetPlane {
    tap: File,
    features: u64,
    net: KernelNet<Arc<GuestMemoryMmap>>,
    relay_thread: DeviceThread,
    running: Option<Running>,
    /// Whether the tap is attached to the rings (multiqueue pairs the guest has not enabled
    /// are set up without it; see `DataPlane::set_enabled`).
    enabled: bool,
}

/// One activation: how many queues vhost serves and the call relay, if any.
struct Running {
    queues: usize,
    relay: Option<Relay>,
}

impl std::fmt::Debug for VhostNetPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostNetPlane")
            .field("tap", &self.tap.as_raw_fd())
            .field("features", &format_args!("{:#x}", self.features))
            .field("running", &self.running.is_some())
            .field("enabled", &self.enabled)
            .finish()
    }
}

impl VhostNetPlane {
    /// Opens a vhost-net instance for `memory` and learns its features; `tap` is a descriptor
    /// of the tap to serve.
    pub fn new(tap: File, memory: &GuestMemoryMmap) -> Result<Self, Error> {
        let net = KernelNet::new(Arc::new(memory.clone())).map_err(|e| match e {
            vhost::Error::VhostOpen(e) => Error::Open(e),
            other => Error::Open(std::io::Error::other(other.to_string())),
        })?;
        // Owner-less instances answer VHOST_GET_FEATURES.
        let features = kernel_features(&net).map_err(Error::Open)?;
        Ok(VhostNetPlane {
            tap,
            features,
            net,
            relay_thread: DeviceThread::spawn("vhost-relay".to_string()),
            running: None,
            enabled: true,
        })
    }
}

/// VHOST_GET_FEATURES on an open vhost-net descriptor.
fn kernel_features(fd: &impl AsRawFd) -> std::io::Result<u64> {
    // _IOR(VHOST_VIRTIO, 0x00, __u64)
    const VHOST_GET_FEATURES: libc::c_ulong = 0x8008_af00;
    let mut features = 0u64;
    // SAFETY: the ioctl writes one u64 into `features`, which outlives the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), VHOST_GET_FEATURES, &mut features) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(features)
}

fn backend_err(what: &'static str) -> impl Fn(vhost::Error) -> ActivateError {
    move |e| ActivateError::Backend(format!("vhost-net {what}: {e}"))
}

impl DataPlane for VhostNetPlane {
    fn supported_features(&self) -> u64 {
        self.features & !(1 << VIRTIO_F_ACCESS_PLATFORM)
    }

    fn start(
        &mut self,
        memory: &GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Result<(), ActivateError> {
        if self.running.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        self.net.set_owner().map_err(backend_err("SET_OWNER"))?;
        let count = queues.len();
        match self.program(memory, interrupt, queues, features) {
            Ok(relay) => {
                self.running = Some(Running {
                    queues: count,
                    relay,
                });
                Ok(())
            }
            Err(e) => {
                // Whatever was set up goes: a queue already attached would keep using a ring
                // the driver is about to reset, and the owner would refuse the next SET_OWNER.
                // (The vhost crate refuses rings the transport accepted, e.g. one ending at the
                // top of a RAM region, so a guest can take this path.)
                self.release(count);
                Err(e)
            }
        }
    }

    fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            if let Some(relay) = running.relay {
                relay.stop(&mut self.relay_thread);
            }
            self.release(running.queues);
        }
    }

    fn name(&self) -> &'static str {
        "vhost-net"
    }

    fn set_enabled(&mut self, enabled: bool) -> Result<(), ActivateError> {
        if let Some(running) = &self.running {
            if enabled != self.enabled {
                // Detaching keeps the rings, kicks and calls programmed, and the kernel keeps
                // its ring position; attaching resumes from there.
                let tap = enabled.then_some(&self.tap);
                for index in 0..running.queues {
                    self.net
                        .set_backend(index, tap)
                        .map_err(backend_err("SET_BACKEND"))?;
                }
            }
        }
        self.enabled = enabled;
        Ok(())
    }
}

impl VhostNetPlane {
    /// Detaches the tap from the first `queues` queues and hands the instance back: it stops the
    /// kernel's worker and forgets the rings, memory table and owner, so the next activation
    /// starts from a clean instance.
    fn release(&mut self, queues: usize) {
        for index in 0..queues {
            if let Err(e) = self.net.set_backend(index, None) {
                log::debug!("vhost-net: detaching queue {index}: {e}");
            }
        }
        if let Err(e) = self.net.reset_owner() {
            log::warn!("vhost-net: RESET_OWNER: {e}");
        }
    }

    /// Programs an owned instance for `queues`; returns the call relay (virtio-mmio) if any.
    fn program(
        &mut self,
        memory: &GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Result<Option<Relay>, ActivateError> {
        let net = &self.net;
        // vhost takes the transport/ring features and the header-shaping MRG_RXBUF; the tap
        // handles the header and offloads. ACCESS_PLATFORM is never passed: it would make vhost
        // translate addresses through an IOTLB pvm does not run.
        let vhost_features = features & self.supported_features();
        log::debug!(
            "vhost-net: negotiated {features:#x}, vhost offers {:#x}, set {vhost_features:#x}",
            self.features
        );
        net.set_features(vhost_features)
            .map_err(backend_err("SET_FEATURES"))?;
        let regions: Vec<VhostUserMemoryRegionInfo> = memory
            .iter()
            .map(|region| VhostUserMemoryRegionInfo {
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                mmap_offset: 0,
                mmap_handle: -1,
            })
            .collect();
        net.set_mem_table(&regions)
            .map_err(backend_err("SET_MEM_TABLE"))?;
        let mut relayed = Vec::new();
        let count = queues.len();
        // vhost-net's vrings are 0 (receive) and 1 (transmit) whichever queue pair of the
        // device they serve: the queues come in index order, rx first.
        for (index, active) in queues.iter().enumerate() {
            let queue = &active.queue;
            net.set_vring_num(index, queue.size())
                .map_err(backend_err("SET_VRING_NUM"))?;
            let config = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: queue.desc_table(),
                used_ring_addr: queue.used_ring(),
                avail_ring_addr: queue.avail_ring(),
                log_addr: None,
            };
            net.set_vring_addr(index, &config)
                .map_err(backend_err("SET_VRING_ADDR"))?;
            net.set_vring_base(index, queue.next_avail())
                .map_err(backend_err("SET_VRING_BASE"))?;
            net.set_vring_kick(index, &active.kick)
                .map_err(backend_err("SET_VRING_KICK"))?;
            let call = match interrupt.queue_irqfd(active.index) {
                Some(irqfd) => irqfd,
                None => {
                    let call = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?;
                    relayed.push((
                        active.index,
                        call.try_clone().map_err(ActivateError::Worker)?,
                    ));
                    call
                }
            };
            net.set_vring_call(index, &call)
                .map_err(backend_err("SET_VRING_CALL"))?;
            if self.enabled {
                net.set_backend(index, Some(&self.tap))
                    .map_err(backend_err("SET_BACKEND"))?;
            }
        }
        let relay = if relayed.is_empty() {
            None
        } else {
            Some(Relay::start(
                &mut self.relay_thread,
                "vhost-net",
                relayed,
                interrupt,
            )?)
        };
        log::info!(
            "vhost-net serves {count} queues ({} relayed)",
            relay.as_ref().map_or(0, Relay::queues)
        );
        Ok(relay)
    }
}

impl Drop for VhostNetPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

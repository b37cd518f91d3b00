//! Kernel vhost-net as the data plane of pvm's virtio-net device: the kernel moves frames
//! between the guest's rings and the tap; pvm only sets the rings up. Kicks are the queues'
//! ioeventfds; calls are the MSI-X irqfds on virtio-pci, or, on virtio-mmio (whose interrupt
//! status the kernel cannot set), eventfds that a relay thread turns into interrupts. A pause
//! detaches the tap from every ring (the kernel's worker stops with it) and takes the rings'
//! positions back; the resume programs them from there and attaches the tap again.
//!
//! With a [`VhostLog`] (the VM tracks dirty pages) every activation acks VHOST_F_LOG_ALL,
//! gives the kernel the log's address and flags each ring's used ring for logging, so whatever
//! the kernel writes into guest RAM is in the log; a reset hands the instance back
//! (RESET_OWNER forgets the log) and the next activation programs it again.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use pvm_virtio::data_plane::{DataPlane, DataPlaneError};
use pvm_virtio::snapshot::{QueuePosition, SnapshotError};
use pvm_virtio::thread::DeviceThread;
use pvm_virtio::{ActiveQueue, Interrupt};
use vhost::VhostBackend;
use vhost::net::VhostNet as _;
use vhost::vhost_kern::net::Net as KernelNet;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_ACCESS_PLATFORM;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use vm_memory::GuestMemoryMmap;

use crate::dirty::VhostLog;
use crate::kernel;
use crate::rings::{RingAddresses, Rings, Served, memory_table};

/// Where the kernel's vhost-net device lives.
pub const VHOST_NET_PATH: &str = "/dev/vhost-net";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{VHOST_NET_PATH}: {0}")]
    Open(std::io::Error),
    #[error(
        "{VHOST_NET_PATH} does not offer dirty page logging (VHOST_F_LOG_ALL), which \
         track_dirty_pages needs of it"
    )]
    NoDirtyLog,
}

/// VHOST_F_LOG_ALL: the instance logs every write it makes into guest RAM.
const VHOST_F_LOG_ALL: u64 = 1 << vhost::vhost_kern::vhost_binding::VHOST_F_LOG_ALL;

/// True when /dev/vhost-net can be opened read-write (the `auto` choice).
pub fn available() -> bool {
    File::options()
        .read(true)
        .write(true)
        .open(VHOST_NET_PATH)
        .is_ok()
}

/// The kernel vhost-net data plane for one tap (one queue pair).
///
/// Everything it needs is made when the VM is built, before the guest runs: the vhost-net
/// instance (kept for the VM's life: a driver reset hands it back with VHOST_RESET_OWNER rather
/// than closing it, so no guest-triggered path opens a file) and the relay's thread.
pub struct VhostNetPlane {
    tap: File,
    features: u64,
    net: KernelNet<Arc<GuestMemoryMmap>>,
    relay_thread: DeviceThread,
    running: Option<Served>,
    /// Whether the tap is attached to the rings (multiqueue pairs the guest has not enabled
    /// are set up without it; see `DataPlane::set_enabled`).
    enabled: bool,
    /// Where the kernel logs its writes into guest RAM, when the VM tracks dirty pages.
    log: Option<Arc<VhostLog>>,
}

const PLANE: &str = "vhost-net";

impl std::fmt::Debug for VhostNetPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostNetPlane")
            .field("tap", &self.tap.as_raw_fd())
            .field("features", &format_args!("{:#x}", self.features))
            .field("running", &self.running.is_some())
            .field("paused", &self.running.as_ref().is_some_and(|r| r.paused))
            .field("enabled", &self.enabled)
            .field("logged", &self.log.is_some())
            .finish()
    }
}

impl VhostNetPlane {
    /// Opens a vhost-net instance for `memory` and learns its features; `tap` is a descriptor
    /// of the tap to serve.
    pub fn new(tap: File, memory: &GuestMemoryMmap) -> Result<Self, Error> {
        let net = kernel::opened(KernelNet::new(Arc::new(memory.clone()))).map_err(Error::Open)?;
        let features = kernel::features(&net).map_err(Error::Open)?;
        Ok(VhostNetPlane {
            tap,
            features,
            net,
            relay_thread: DeviceThread::spawn("vhost-relay".to_string()),
            running: None,
            enabled: true,
            log: None,
        })
    }

    /// Has the kernel log every write it makes into guest RAM into `log` (the VM tracks dirty
    /// pages); an instance that cannot log is refused, as a Diff snapshot would miss pages.
    pub fn with_dirty_log(mut self, log: Arc<VhostLog>) -> Result<Self, Error> {
        if self.features & VHOST_F_LOG_ALL == 0 {
            return Err(Error::NoDirtyLog);
        }
        self.log = Some(log);
        Ok(self)
    }
}

fn refused(request: &'static str) -> impl Fn(vhost::Error) -> DataPlaneError {
    move |e| DataPlaneError::request(PLANE, request, e)
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
    ) -> Result<(), DataPlaneError> {
        self.begin(memory, interrupt, queues, features, false)
    }

    fn stop(&mut self) {
        if let Some(mut running) = self.running.take() {
            running.rings.stop_relay(&mut self.relay_thread);
            let vrings: Vec<usize> = running.rings.vrings().collect();
            self.release(&vrings);
        }
    }

    fn pause(&mut self) -> Result<(), DataPlaneError> {
        let Some(running) = self.running.as_mut().filter(|r| !r.paused) else {
            return Ok(());
        };
        // Detaching the tap stops the kernel's work on the ring (and waits for it); only then
        // is the position final.
        for vring in running.rings.vrings() {
            self.net
                .set_backend(vring, None)
                .map_err(refused("SET_BACKEND"))?;
        }
        running.rings.take_bases(&self.net)?;
        running.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), DataPlaneError> {
        let Some(running) = self.running.as_mut().filter(|r| r.paused) else {
            return Ok(());
        };
        running.rings.program(&self.net, &mut Vec::new())?;
        if self.enabled {
            attach(&self.net, &running.rings, Some(&self.tap))?;
        }
        running.paused = false;
        Ok(())
    }

    fn name(&self) -> &'static str {
        PLANE
    }

    fn positions(&self) -> Result<Vec<QueuePosition>, SnapshotError> {
        self.running
            .as_ref()
            .map_or(Ok(Vec::new()), |running| running.positions(VIRTIO_ID_NET))
    }

    fn start_paused(
        &mut self,
        memory: &GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Result<(), DataPlaneError> {
        self.begin(memory, interrupt, queues, features, true)
    }

    fn set_enabled(&mut self, enabled: bool) -> Result<(), DataPlaneError> {
        if let Some(running) = self.running.as_ref().filter(|r| !r.paused) {
            if enabled != self.enabled {
                // Detaching keeps the rings, kicks and calls programmed, and the kernel keeps
                // its ring position; attaching resumes from there.
                attach(&self.net, &running.rings, enabled.then_some(&self.tap))?;
            }
        }
        // While paused, the resume attaches the tap as this says.
        self.enabled = enabled;
        Ok(())
    }
}

/// Attaches `tap` to every ring (None detaches it).
fn attach(
    net: &KernelNet<Arc<GuestMemoryMmap>>,
    rings: &Rings,
    tap: Option<&File>,
) -> Result<(), DataPlaneError> {
    for vring in rings.vrings() {
        net.set_backend(vring, tap)
            .map_err(refused("SET_BACKEND"))?;
    }
    Ok(())
}

impl VhostNetPlane {
    /// `start`, or with `paused` `start_paused`: claims the instance and sets the rings up.
    fn begin(
        &mut self,
        memory: &GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
        paused: bool,
    ) -> Result<(), DataPlaneError> {
        if self.running.is_some() {
            return Err(DataPlaneError::AlreadyStarted(PLANE));
        }
        self.net.set_owner().map_err(refused("SET_OWNER"))?;
        let mut started = Vec::new();
        match self.program(memory, interrupt, queues, features, &mut started, paused) {
            Ok(rings) => {
                log::info!(
                    "vhost-net serves {} queues ({} relayed){}",
                    rings.vrings().count(),
                    rings.relayed(),
                    if paused {
                        ", from a snapshot, paused"
                    } else {
                        ""
                    }
                );
                self.running = Some(Served { rings, paused });
                Ok(())
            }
            Err(e) => {
                // Whatever was set up goes: a queue already attached would keep using a ring
                // the driver is about to reset, and the owner would refuse the next SET_OWNER.
                // (The vhost crate refuses rings the transport accepted, e.g. one ending at the
                // top of a RAM region, so a guest can take this path.)
                self.release(&started);
                Err(e)
            }
        }
    }

    /// Detaches the tap from `vrings` and hands the instance back: it stops the kernel's
    /// worker and forgets the rings, memory table and owner, so the next activation starts
    /// from a clean instance.
    fn release(&mut self, vrings: &[usize]) {
        for &index in vrings {
            if let Err(e) = self.net.set_backend(index, None) {
                log::debug!("vhost-net: detaching queue {index}: {e}");
            }
        }
        if let Err(e) = self.net.reset_owner() {
            log::warn!("vhost-net: RESET_OWNER: {e}");
        }
    }

    /// Programs an owned instance for `queues` and attaches the tap if the pair is on. With
    /// `paused` (a restore) the rings are only prepared: the resume programs them, from the
    /// queues' positions, and attaches the tap.
    fn program(
        &mut self,
        memory: &GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
        started: &mut Vec<usize>,
        paused: bool,
    ) -> Result<Rings, DataPlaneError> {
        // vhost takes the transport/ring features and the header-shaping MRG_RXBUF; the tap
        // handles the header and offloads. ACCESS_PLATFORM is never passed: it would make vhost
        // translate addresses through an IOTLB pvm does not run.
        let mut vhost_features = features & self.supported_features();
        if self.log.is_some() {
            vhost_features |= VHOST_F_LOG_ALL;
        }
        log::debug!(
            "vhost-net: negotiated {features:#x}, vhost offers {:#x}, set {vhost_features:#x}",
            self.features
        );
        self.net
            .set_features(vhost_features)
            .map_err(refused("SET_FEATURES"))?;
        self.net
            .set_mem_table(&memory_table(PLANE, memory, false)?)
            .map_err(refused("SET_MEM_TABLE"))?;
        if let Some(log) = &self.log {
            // Before any ring has a backend: the kernel checks the log covers the memory
            // table when a ring is attached.
            self.net
                .set_log_base(log.base(), None)
                .map_err(refused("SET_LOG_BASE"))?;
        }
        // vhost-net's vrings are 0 (receive) and 1 (transmit) whichever queue pair of the
        // device they serve: the queues come in index order, rx first.
        let queues = queues.into_iter().enumerate().collect();
        let mut rings = Rings::new(
            PLANE,
            memory,
            queues,
            RingAddresses::Guest,
            interrupt,
            &mut self.relay_thread,
        )?;
        if self.log.is_some() {
            // Kept in the rings' configuration, so every SET_VRING_ADDR (resumes included)
            // asks for the used rings to be logged.
            rings.log_used_rings();
        }
        if paused {
            return Ok(rings);
        }
        let programmed = rings
            .program(&self.net, started)
            .and_then(|()| match self.enabled {
                true => attach(&self.net, &rings, Some(&self.tap)),
                false => Ok(()),
            });
        if let Err(e) = programmed {
            let mut rings = rings;
            rings.stop_relay(&mut self.relay_thread);
            return Err(e);
        }
        Ok(rings)
    }
}

impl Drop for VhostNetPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

//! Wiring virtio devices into the VM, in one place: each device gets its transport (virtio-mmio
//! or virtio-pci), every queue notification becomes a KVM ioeventfd and every interrupt an
//! irqfd, so the vCPU threads never do device I/O; the devices run on their own workers.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use pvm_virtio::thread::ThreadError;
use pvm_virtio::transport::pci::BAR_SIZE;
use pvm_virtio::{
    Block, BlockError, Console, ConsoleInput, DiskErrors, MmioTransport, Net, PauseError,
    PciTransport, Rng, Tap, TapError, VirtioDevice, Vsock,
};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::acpi;
use crate::bus::{self, Bus, BusDevice};
use crate::config::{
    ConsoleKind, TapSpec, Transport, VhostMode, VmConfig, VsockBackend, VsockSpec,
};
use crate::irq_routing::{DeviceMsi, GsiRouter};
use crate::layout;
use crate::metrics::{NetSource, TapStats};
use crate::pci::{self, PciAllocator, PciRoot};
use pvm_vhost::net::VhostNetPlane;
use pvm_vhost::user::{Kind, VhostUserDevice};

mod snapshot;

/// PCI I/O ports of configuration mechanism #1.
const PCI_CONFIG_PORT: u64 = 0xcf8;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Console(pvm_virtio::ConsoleError),
    #[error("--disk {0}")]
    Disk(#[source] BlockError),
    #[error("{flag} vhost-user={}: {source}", .socket.display())]
    VhostUser {
        flag: &'static str,
        socket: PathBuf,
        source: pvm_vhost::user::Error,
    },
    #[error("--tap {0}")]
    Tap(#[source] TapError),
    #[error("--tap {tap}: {source}")]
    Net {
        tap: String,
        source: pvm_virtio::NetError,
    },
    #[error("--tap {tap},vhost=on: {source}")]
    VhostNet {
        tap: String,
        source: pvm_vhost::net::Error,
    },
    #[error("--tap {tap},vhost=on: cannot duplicate the tap's descriptor: {source}")]
    TapClone { tap: String, source: std::io::Error },
    #[error("--tap {tap},vhost=on: {source}")]
    DataPlanes {
        tap: String,
        source: pvm_virtio::NetError,
    },
    #[error("--cloud-init: the seed disk: {0}")]
    CloudInit(#[source] BlockError),
    #[error("--vsock: {0}")]
    Vsock(#[source] pvm_virtio::VsockError),
    #[error("--share {path}: {source}")]
    Share {
        path: PathBuf,
        source: pvm_virtio::FsError,
    },
    #[error("--vsock vhost=on: {0}")]
    VhostVsock(#[source] pvm_vhost::vsock::Error),
    #[error(transparent)]
    DeviceThread(ThreadError),
    #[error("too many virtio devices for the {0} transport")]
    TooMany(&'static str),
    #[error("cannot set up the {what} of virtio device {name}: {source}")]
    Io {
        what: &'static str,
        name: String,
        source: std::io::Error,
    },
    #[error("KVM refused the {what} of virtio device {name}: {source}")]
    Kvm {
        what: &'static str,
        name: String,
        source: kvm_ioctls::Error,
    },
    #[error("cannot place virtio device {name} on PCI bus 0: {source}")]
    PciResources {
        name: String,
        source: pci::AllocError,
    },
    #[error(transparent)]
    Bus(#[from] bus::Error),
}

impl Error {
    /// True when the user's input is at fault: a disk image named on the command line that
    /// cannot be opened or is in use, a bad serial, a tap that does not exist (or cannot be
    /// attached as asked), a vhost-user socket nobody listens on. Everything else is the host
    /// or pvm failing (eventfds, ioctls, /dev/net/tun, /dev/vhost-net, a backend's replies).
    pub fn is_usage(&self) -> bool {
        use pvm_vhost::user::Error as VhostUser;
        match self {
            Error::Disk(e) => match e {
                BlockError::Open { .. }
                | BlockError::Locked { .. }
                | BlockError::SerialTooLong { .. } => true,
                // Options this host cannot serve (io_uring disabled, no O_DIRECT on its
                // filesystem): the user chose them and can choose others.
                BlockError::Options { .. }
                | BlockError::Ring { .. }
                | BlockError::Direct { .. }
                | BlockError::DirectSize { .. } => true,
                BlockError::Lock { .. } | BlockError::Size { .. } => false,
            },
            Error::Tap(e) => match e {
                TapError::InvalidName { .. }
                | TapError::Attach { .. }
                | TapError::AttachQueue { .. } => true,
                TapError::OpenTun { .. }
                | TapError::VnetHeaderSize { .. }
                | TapError::Offloads { .. } => false,
            },
            Error::VhostUser { source, .. } => match source {
                VhostUser::Connect(_) => true,
                VhostUser::Protocol { .. }
                | VhostUser::NoVersion1(_)
                | VhostUser::NoBlockConfig => false,
            },
            // A CID out of range, or a socket path that exists or cannot be made.
            Error::Vsock(_) => true,
            // A directory that cannot be opened, or a bad tag.
            Error::Share { .. } => true,
            // A CID another VM holds: the user's to change (or to stop that VM).
            Error::VhostVsock(pvm_vhost::vsock::Error::CidInUse { .. }) => true,
            Error::Console(_)
            // The seed is pvm's own memory file: opening it failing is the host's doing.
            | Error::CloudInit(_)
            | Error::VhostVsock(_)
            | Error::Net { .. }
            | Error::VhostNet { .. }
            | Error::TapClone { .. }
            | Error::DataPlanes { .. }
            | Error::DeviceThread(_)
            | Error::TooMany(_)
            | Error::Io { .. }
            | Error::Kvm { .. }
            | Error::PciResources { .. }
            | Error::Bus(_) => false,
        }
    }
}

/// What the rest of the VM needs to know about the attached devices.
#[derive(Debug, Default)]
pub struct Attached {
    /// AML for the DSDT (virtio-mmio nodes, the PCI host bridge).
    pub aml: Vec<u8>,
    /// Kernel command line entries (virtio-mmio devices for guests without ACPI).
    pub cmdline: Vec<String>,
    /// Where host keyboard input goes with `--console virtio`.
    pub console_input: Option<ConsoleInput>,
    /// Per-tap counters for metrics and --stats: pvm's own frame counters (errors and drops
    /// included), one per queue pair, or the tap's kernel statistics when vhost-net carries it.
    pub nets: Vec<(String, NetSource)>,
    /// Per-disk id ("disk0", ...), path and host I/O failure count, for metrics and --stats.
    pub disk_errors: Vec<(String, String, Arc<DiskErrors>)>,
    /// The connected sockets of vhost-user devices: the vCPU threads' seccomp filter allows
    /// messages on these only.
    pub vhost_user_sockets: Vec<std::os::fd::RawFd>,
    /// Every transport, for pausing and resuming the VM.
    pub pausable: Vec<PausableDevice>,
    /// The rate limiters the API may change while the VM runs.
    pub limiters: DeviceLimiters,
    /// With track_dirty_pages and a tap on vhost-net: the log the kernel's vhost-net marks
    /// the guest pages it writes in, for Diff snapshots.
    pub vhost_log: Option<Arc<pvm_vhost::dirty::VhostLog>>,
}

/// The rate limiters of the devices pvm serves itself, whose limits may change at run time
/// (the API's PATCH /drives and /network-interfaces).
#[derive(Debug, Clone, Default)]
pub struct DeviceLimiters {
    /// Each image disk's, in guest order.
    pub disks: Vec<pvm_virtio::SharedLimiter>,
    /// Each tap's receive and transmit limiters, in guest order; `None` when vhost-net serves
    /// the tap, which cannot enforce a limit.
    pub taps: Vec<Option<(pvm_virtio::SharedLimiter, pvm_virtio::SharedLimiter)>>,
    /// Where each image disk (in guest order, device `block{i}`) takes a new backing file
    /// (PATCH /drives with path_on_host).
    pub disk_swaps: Vec<pvm_virtio::DiskSwap>,
    /// The balloon's target, size and statistics (PATCH and GET /balloon), if it has one.
    pub balloon: Option<pvm_virtio::BalloonHandle>,
}

/// A transport the VM can pause and resume, with the name pvm's messages use for its device.
#[derive(Debug)]
pub struct PausableDevice {
    name: String,
    transport: TransportHandle,
}

#[derive(Debug)]
enum TransportHandle {
    Mmio(Arc<Mutex<MmioDevice>>),
    Pci(Arc<Mutex<PciTransport>>),
}

impl PausableDevice {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Pauses the device's data plane; see [`MmioTransport::pause`].
    pub fn pause(&self) -> Result<(), PauseError> {
        match &self.transport {
            TransportHandle::Mmio(device) => lock(device).0.pause(),
            TransportHandle::Pci(transport) => lock(transport).pause(),
        }
    }

    /// Raises the device's configuration-change interrupt, so the driver reads its config
    /// space again (a disk's new capacity).
    pub fn notify_config_change(&self) -> std::io::Result<()> {
        match &self.transport {
            TransportHandle::Mmio(device) => lock(device).0.notify_config_change(),
            TransportHandle::Pci(transport) => lock(transport).notify_config_change(),
        }
    }

    /// `transport` under `name`, for tests that drive a device as the VM does.
    #[cfg(test)]
    pub fn mmio(name: &str, transport: MmioTransport) -> Self {
        PausableDevice {
            name: name.to_string(),
            transport: TransportHandle::Mmio(Arc::new(Mutex::new(MmioDevice(transport)))),
        }
    }

    /// Resumes what [`Self::pause`] paused.
    pub fn resume(&self) -> Result<(), PauseError> {
        match &self.transport {
            TransportHandle::Mmio(device) => lock(device).0.resume(),
            TransportHandle::Pci(transport) => lock(transport).resume(),
        }
    }
}

/// A transport's lock; a poisoned one still holds a usable transport (its registers are plain
/// data), as the bus accesses assume too.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A device with the name pvm's messages use for it.
type NamedDevice = (String, Box<dyn VirtioDevice>);

/// The devices `config` asks for, in guest-visible order: console, disks, nets, rng, balloon. Handles
/// the rest of the VM needs (console input, net counters) go into `attached`.
fn create_devices(
    config: &VmConfig,
    memory: &GuestMemoryMmap,
    attached: &mut Attached,
) -> Result<Vec<NamedDevice>, Error> {
    let mut devices: Vec<NamedDevice> = Vec::new();
    if config.console == ConsoleKind::Virtio {
        let console = Console::new(crate::devices::console_socket::virtio_output())
            .map_err(Error::Console)?;
        attached.console_input = Some(console.input());
        devices.push(("console".to_string(), Box::new(console)));
    }
    for (i, disk) in config.disks.iter().enumerate() {
        let mut block = Block::with_options(
            &disk.path,
            disk.read_only,
            disk.serial.as_deref(),
            disk.options,
        )
        .map_err(Error::Disk)?;
        if !disk.flush {
            block = block.without_flush();
        }
        block = block.with_rate_limit(disk.limit);
        attached.limiters.disks.push(block.rate_limiter());
        attached.limiters.disk_swaps.push(block.disk_swap());
        attached.disk_errors.push((
            format!("disk{i}"),
            disk.path.display().to_string(),
            block.errors(),
        ));
        devices.push((format!("block{i}"), Box::new(block)));
    }
    let mut vhost_user_index = 0;
    for socket in &config.vhost_user_disks {
        let device = connect_vhost_user(Kind::Block, "--disk", socket, vhost_user_index, attached)?;
        devices.push((format!("block-vhost-user{vhost_user_index}"), device));
        vhost_user_index += 1;
    }
    if let Some(seed) = &config.cloud_init {
        devices.push(("cloud-init".to_string(), cloud_init_disk(seed)?));
    }
    for (i, spec) in config.taps.iter().enumerate() {
        // With tracking on, vhost-net logs its writes into guest RAM where a Diff finds them:
        // one log for all the VM's taps on vhost-net, kept once the first is.
        let log = config.track_dirty_pages.then(|| {
            attached
                .vhost_log
                .clone()
                .unwrap_or_else(|| Arc::new(pvm_vhost::dirty::VhostLog::for_memory(memory)))
        });
        let (net, vhost) = create_net(spec, memory, log.clone())?;
        if vhost && log.is_some() {
            attached.vhost_log = log;
        }
        // With vhost-net the kernel moves the frames and pvm's counters stay still: the
        // tap's own statistics count them (opened now, before the sandbox forbids open()).
        let source = if vhost {
            NetSource::Kernel(TapStats::open(&spec.name))
        } else {
            NetSource::InProcess(net.pair_counters())
        };
        attached.nets.push((spec.name.clone(), source));
        attached
            .limiters
            .taps
            .push((!vhost).then(|| net.rate_limiters()));
        devices.push((format!("net{i}"), Box::new(net)));
    }
    for socket in &config.vhost_user_nets {
        let device = connect_vhost_user(Kind::Net, "--net", socket, vhost_user_index, attached)?;
        devices.push((format!("net-vhost-user{vhost_user_index}"), device));
        vhost_user_index += 1;
    }
    devices.push((
        "rng".to_string(),
        Box::new(Rng::new().with_rate_limit(config.rng_limit)),
    ));
    if let Some(balloon) = config.balloon {
        let balloon = pvm_virtio::Balloon::new(balloon).map_err(io_error("eventfd", "balloon"))?;
        attached.limiters.balloon = Some(balloon.handle());
        devices.push(("balloon".to_string(), Box::new(balloon)));
    }
    if let Some(spec) = &config.vsock {
        devices.push(("vsock".to_string(), create_vsock(spec, memory)?));
    }
    for (i, share) in config.shares.iter().enumerate() {
        devices.push((format!("fs{i}"), create_share(share)?));
    }
    Ok(devices)
}

/// The read-only virtio-fs device `--share` asks for, its directory opened now (before the
/// sandbox).
fn create_share(share: &crate::config::ShareSpec) -> Result<Box<dyn VirtioDevice>, Error> {
    let config = pvm_virtio::FsConfig::new(&share.path, &share.tag);
    let fs = pvm_virtio::Fs::new(config).map_err(|source| Error::Share {
        path: share.path.clone(),
        source,
    })?;
    let (inodes, handles) = fs.limits();
    log::info!(
        "share {} as '{}': at most {inodes} inodes and {handles} open files",
        share.path.display(),
        share.tag
    );
    Ok(Box::new(fs))
}

/// The `--cloud-init` seed as a read-only disk, after every disk the user named.
fn cloud_init_disk(seed: &crate::cloud_init::Seed) -> Result<Box<dyn VirtioDevice>, Error> {
    let block = Block::new(&seed.path(), true, Some(crate::cloud_init::SERIAL))
        .map_err(Error::CloudInit)?;
    log::info!(
        "--cloud-init: a {} KiB NoCloud seed (label {}) as a read-only disk",
        seed.bytes() >> 10,
        crate::cloud_init::LABEL
    );
    Ok(Box::new(block))
}

/// A device served by the vhost-user backend on `socket`, connected and negotiated now (before
/// the sandbox), its socket recorded for the vCPU filter.
fn connect_vhost_user(
    kind: Kind,
    flag: &'static str,
    socket: &Path,
    index: usize,
    attached: &mut Attached,
) -> Result<Box<dyn VirtioDevice>, Error> {
    let device =
        VhostUserDevice::connect(kind, socket, index).map_err(|source| Error::VhostUser {
            flag,
            socket: socket.to_path_buf(),
            source,
        })?;
    attached.vhost_user_sockets.push(device.socket_fd());
    if let Some(sectors) = device.capacity_sectors() {
        log::info!("vhost-user disk {}: {sectors} sectors", socket.display());
    }
    crate::logger::to_stderr(&format!(
        "pvm: {flag} vhost-user={}: vhost-user data plane\n",
        socket.display()
    ));
    Ok(Box::new(device))
}

/// A net device on the tap `spec` names, its queues served by vhost-net or by pvm's worker;
/// with `queues=N`, N queues of a multi-queue tap and, with vhost-net, one instance per pair.
/// Everything is opened here, before the sandbox forbids open(). Says whether vhost-net
/// serves it. With `log` (the VM tracks dirty pages) vhost-net must log its writes there:
/// vhost=on refuses an instance that cannot, vhost=auto then uses pvm's worker.
fn create_net(
    spec: &TapSpec,
    memory: &GuestMemoryMmap,
    log: Option<Arc<pvm_vhost::dirty::VhostLog>>,
) -> Result<(Net, bool), Error> {
    let taps = Tap::open_queues(&spec.name, spec.queues).map_err(Error::Tap)?;
    let taps: Vec<Arc<Tap>> = taps.into_iter().map(Arc::new).collect();
    let backends = taps
        .iter()
        .map(|tap| Arc::clone(tap) as Arc<dyn pvm_virtio::NetBackend>)
        .collect();
    let mut net = Net::with_pairs(backends, spec.mac)
        .map_err(|source| Error::Net {
            tap: spec.name.clone(),
            source,
        })?
        .with_rate_limits(spec.rx_limit, spec.tx_limit);
    // vhost-net cannot enforce a rate limit: a limited tap is served in-process (vhost=on with
    // a limit is refused when the flag is parsed).
    let mut vhost = match spec.vhost {
        VhostMode::On => true,
        VhostMode::Off => false,
        VhostMode::Auto => !spec.is_limited() && pvm_vhost::net::available(),
    };
    if vhost {
        let tap = || spec.name.clone();
        let planes = taps
            .iter()
            .map(|queue| {
                let file = queue
                    .try_clone_file()
                    .map_err(|source| Error::TapClone { tap: tap(), source })?;
                let plane = VhostNetPlane::new(file, memory)
                    .map_err(|source| Error::VhostNet { tap: tap(), source })?;
                let plane = match &log {
                    Some(log) => plane.with_dirty_log(log.clone()),
                    None => Ok(plane),
                };
                plane.map_err(|source| Error::VhostNet { tap: tap(), source })
            })
            .collect::<Result<Vec<_>, Error>>();
        match planes {
            Ok(planes) => {
                let planes = planes
                    .into_iter()
                    .map(|p| Box::new(p) as Box<dyn pvm_virtio::data_plane::DataPlane>)
                    .collect();
                net.set_data_planes(planes)
                    .map_err(|source| Error::DataPlanes { tap: tap(), source })?;
            }
            // vhost=auto takes pvm's worker rather than a vhost-net a Diff could not see.
            Err(Error::VhostNet {
                source: pvm_vhost::net::Error::NoDirtyLog,
                ..
            }) if spec.vhost == VhostMode::Auto => {
                log::info!("tap {}: vhost-net cannot log dirty pages", spec.name);
                vhost = false;
            }
            Err(e) => return Err(e),
        }
    }
    // Which one serves the queues matters for what to expect of throughput and CPU.
    let pairs = match net.pair_count() {
        1 => String::new(),
        n => format!(", {n} queue pairs"),
    };
    let limited = if spec.is_limited() {
        " (rate-limited; vhost-net cannot enforce a limit)"
    } else {
        ""
    };
    crate::logger::to_stderr(&format!(
        "pvm: tap {}: {} data plane{pairs}{limited}\n",
        spec.name,
        net.data_plane_name()
    ));
    Ok((net, vhost))
}

/// The vsock device `spec` asks for: served by pvm (its listener bound now, before the
/// sandbox) or by the kernel's vhost-vsock (opened now).
fn create_vsock(
    spec: &VsockSpec,
    memory: &GuestMemoryMmap,
) -> Result<Box<dyn VirtioDevice>, Error> {
    let device: Box<dyn VirtioDevice> = match &spec.backend {
        VsockBackend::Unix(path) => {
            let device = Vsock::new(spec.cid, path).map_err(Error::Vsock)?;
            crate::logger::to_stderr(&format!(
                "pvm: vsock cid {}: host sockets at {}\n",
                spec.cid,
                path.display()
            ));
            Box::new(device)
        }
        VsockBackend::Vhost => {
            let device =
                pvm_vhost::vsock::VhostVsock::new(spec.cid, memory).map_err(Error::VhostVsock)?;
            crate::logger::to_stderr(&format!(
                "pvm: vsock cid {}: vhost-vsock data plane\n",
                spec.cid
            ));
            Box::new(device)
        }
    };
    Ok(device)
}

#[derive(Debug)]
struct MmioDevice(MmioTransport);

impl BusDevice for MmioDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.write(offset, data);
    }
}

struct PciBar(Arc<Mutex<PciTransport>>);

impl BusDevice for PciBar {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.0).bar_read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.0).bar_write(offset, data);
    }
}

/// Creates the virtio devices and attaches them to the buses with their ioeventfds and irqfds.
pub fn attach(
    config: &VmConfig,
    vm: &Arc<VmFd>,
    memory: &GuestMemoryMmap,
    pio: &mut Bus,
    mmio: &mut Bus,
) -> Result<Attached, Error> {
    let mut attached = Attached::default();
    let devices = create_devices(config, memory, &mut attached)?;
    // Each device spawned its threads (workers, relays) and each ran pvm's ThreadInit (the
    // device seccomp filter) before the constructor returned. One that failed would take no
    // job: the VM is not built rather than the guest finding the device dead at DRIVER_OK.
    pvm_virtio::thread::spawned_ready().map_err(Error::DeviceThread)?;
    match config.transport {
        Transport::Mmio => {
            for (index, (name, device)) in devices.into_iter().enumerate() {
                attach_mmio(index, name, device, vm, memory, mmio, &mut attached)?;
            }
        }
        Transport::Pci => {
            let mut pci = PciAttacher::new(vm, memory);
            for (name, device) in devices {
                let transport = pci.attach(&name, device, mmio)?;
                attached.pausable.push(PausableDevice {
                    name,
                    transport: TransportHandle::Pci(transport),
                });
            }
            pci.finish(pio)?;
            attached.aml.extend(acpi::pci_host_bridge_aml());
        }
    }
    Ok(attached)
}

fn io_error(what: &'static str, name: &str) -> impl FnOnce(std::io::Error) -> Error {
    let name = name.to_string();
    move |source| Error::Io { what, name, source }
}

fn kvm_error(what: &'static str, name: &str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    let name = name.to_string();
    move |source| Error::Kvm { what, name, source }
}

fn attach_mmio(
    index: usize,
    name: String,
    device: Box<dyn VirtioDevice>,
    vm: &VmFd,
    memory: &GuestMemoryMmap,
    bus: &mut Bus,
    attached: &mut Attached,
) -> Result<(), Error> {
    let gsi = layout::VIRTIO_GSI_START + index as u32;
    if gsi >= layout::IOAPIC_PINS {
        return Err(Error::TooMany("mmio"));
    }
    let base = layout::VIRTIO_MMIO_START + index as u64 * layout::VIRTIO_MMIO_SIZE;
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_error("interrupt eventfd", &name))?;
    vm.register_irqfd(&irq, gsi)
        .map_err(kvm_error("irqfd", &name))?;
    let transport =
        MmioTransport::new(device, memory.clone(), irq).map_err(io_error("transport", &name))?;
    for (offset, queue, kick) in transport.queue_kicks() {
        vm.register_ioevent(kick, &IoEventAddress::Mmio(base + offset), queue)
            .map_err(kvm_error("ioeventfd", &name))?;
    }
    let device = Arc::new(Mutex::new(MmioDevice(transport)));
    bus.insert(base, layout::VIRTIO_MMIO_SIZE, device.clone())?;
    attached.aml.extend(acpi::virtio_mmio_aml(
        index,
        base,
        layout::VIRTIO_MMIO_SIZE,
        gsi,
    ));
    attached
        .cmdline
        .push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
    log::info!("virtio-mmio {name} at {base:#x}, GSI {gsi}");
    attached.pausable.push(PausableDevice {
        name,
        transport: TransportHandle::Mmio(device),
    });
    Ok(())
}

/// Bus 0 while the virtio-pci functions are attached: the resources handed out so far, the
/// root they plug into and the MSI routes they share.
struct PciAttacher<'a> {
    vm: &'a Arc<VmFd>,
    memory: &'a GuestMemoryMmap,
    router: Arc<GsiRouter>,
    resources: PciAllocator,
    root: PciRoot,
}

impl<'a> PciAttacher<'a> {
    fn new(vm: &'a Arc<VmFd>, memory: &'a GuestMemoryMmap) -> Self {
        PciAttacher {
            vm,
            memory,
            router: Arc::new(GsiRouter::new(vm.clone())),
            resources: PciAllocator::new(),
            root: PciRoot::new(),
        }
    }

    /// Gives `device` a device number, a BAR on `mmio` and a GSI per MSI-X vector, wires its
    /// vectors to irqfds and its queue notifications to ioeventfds, and plugs it in. Returns
    /// the transport, shared with the bus and the root.
    fn attach(
        &mut self,
        name: &str,
        device: Box<dyn VirtioDevice>,
        mmio: &mut Bus,
    ) -> Result<Arc<Mutex<PciTransport>>, Error> {
        // One vector per queue plus one for configuration changes. A count past u16 is
        // refused by the transport, which takes at most MAX_MSIX_VECTORS.
        let vectors = u16::try_from(device.queue_max_sizes().len() + 1).unwrap_or(u16::MAX);
        let resources = self
            .resources
            .allocate(vectors)
            .map_err(|source| Error::PciResources {
                name: name.to_string(),
                source,
            })?;
        let msi = Arc::new(DeviceMsi::new(self.router.clone(), resources.first_gsi));
        let transport = PciTransport::new(
            device,
            self.memory.clone(),
            resources.bar,
            vectors,
            msi.clone(),
        )
        .map_err(io_error("transport", name))?;
        // Vector `v` raises GSI `first_gsi + v` through its irqfd, which KVM is given once the
        // driver unmasks the vector (see DeviceMsi).
        msi.connect(&transport.vector_irqfds())
            .map_err(io_error("MSI-X irqfds", name))?;
        self.connect_kicks(name, &transport, resources.bar)?;
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(
            resources.bar,
            BAR_SIZE,
            Arc::new(Mutex::new(PciBar(transport.clone()))),
        )?;
        log::info!(
            "virtio-pci {name} at 00:{:02x}.0, BAR0 at {:#x}, {vectors} MSI-X vectors from GSI {}",
            resources.slot.number(),
            resources.bar,
            resources.first_gsi
        );
        self.root.plug(resources.slot, transport.clone());
        Ok(transport)
    }

    /// A write to a queue's notify address in the BAR signals its kick eventfd in KVM.
    fn connect_kicks(&self, name: &str, transport: &PciTransport, bar: u64) -> Result<(), Error> {
        for (offset, kick) in transport.queue_kicks() {
            self.vm
                .register_ioevent(kick, &IoEventAddress::Mmio(bar + offset), NoDatamatch)
                .map_err(kvm_error("ioeventfd", name))?;
        }
        Ok(())
    }

    /// Puts the root, with every function plugged in, on the configuration ports.
    fn finish(self, pio: &mut Bus) -> Result<(), Error> {
        pio.insert(PCI_CONFIG_PORT, 8, Arc::new(Mutex::new(self.root)))?;
        Ok(())
    }
}

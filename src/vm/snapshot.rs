//! Taking a snapshot of the paused VM ([`SnapshotSource::create`], on the main thread) and
//! building a VM from one ([`restore`]): the same recipe as [`Vm::build`], with the guest's
//! RAM mapped from the memory file and the saved state written in where the boot loader and
//! the vCPUs' boot registers would go.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use vm_memory::GuestMemoryMmap;

use super::pause::RunControl;
use super::{
    Consoles, Error, LegacyDevices, VcpuShared, Vm, create_irqchip, create_vm, legacy_devices,
    prepare_sandbox,
};
use crate::config::VmConfig;
use crate::devices::legacy::SerialDevice;
use crate::kvm_host;
use crate::memory::VmMemory;
use crate::snapshot::description::DeviceIds;
use crate::snapshot::dirty::{self, DirtyTracking};
use crate::snapshot::{
    Description, MemoryLineage, RestoreError, SerialState, Snapshot, SnapshotError, SnapshotKind,
    VmState, file, memory_file,
};
use crate::vcpu::Buses;
use crate::virtio_devices::{self, PausableDevice};

/// How long the vCPUs get to hand over their state; each takes well under a millisecond.
const SAVE_LIMIT: Duration = Duration::from_secs(5);
/// The PCI configuration address port.
const PCI_CONFIG_ADDRESS: u64 = 0xcf8;

/// `--restore`, or `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreSpec {
    pub snapshot: PathBuf,
    /// Where the guest's RAM comes from.
    pub mem: MemSource,
    /// Replaces the snapshot's tap names, in order (empty: keep them).
    pub taps: Vec<String>,
    /// (interface, tap): puts one interface on another tap (the API's network_overrides).
    pub overrides: Vec<(String, String)>,
    /// Run the guest at once; otherwise it stays paused until resumed.
    pub resume: bool,
}

/// Where a restored VM's RAM comes from (Firecracker's `mem_backend`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemSource {
    /// The memory file, mapped privately (`File`, `--mem-file`).
    File(PathBuf),
    /// A page-fault handler listening on this Unix socket (`Uffd`, `--mem-uffd`).
    Uffd(PathBuf),
}

/// What a snapshot is taken from: borrowed from the running [`Vm`] by the main loop.
pub struct SnapshotSource<'a> {
    pub(super) vm: &'a VmFd,
    pub(super) memory: &'a GuestMemoryMmap,
    pub(super) serial: &'a Arc<Mutex<SerialDevice>>,
    pub(super) buses: &'a Buses,
    pub(super) config: &'a VmConfig,
    /// With track_dirty_pages: the pages written since the last snapshot.
    pub(super) dirty: Option<&'a DirtyTracking>,
}

/// What a snapshot is taken into: the state file, the memory file, and how much of RAM goes
/// into the memory file.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotTarget<'p> {
    pub kind: SnapshotKind,
    pub snapshot: &'p Path,
    pub mem_file: &'p Path,
}

impl SnapshotSource<'_> {
    /// Saves the paused VM: the state to `target.snapshot`, the RAM to `target.mem_file`
    /// (both 0600), all of it (`Full`) or the pages written since the last snapshot (`Diff`).
    /// `ids` are the API's drive and interface ids, in attach order, where it has them.
    pub fn create(
        &self,
        target: SnapshotTarget<'_>,
        control: &RunControl,
        vcpus: usize,
        devices: &[PausableDevice],
        ids: &DeviceIds,
    ) -> Result<(), SnapshotError> {
        let SnapshotTarget {
            kind,
            snapshot,
            mem_file,
        } = target;
        let start = Instant::now();
        if kind == SnapshotKind::Diff {
            // vhost-net writes into the vhost log and a vhost-user backend is refused for any
            // snapshot: what can be missing is tracking, or a log of the kernel's vhost-vsock.
            check_diff(self.dirty.is_some(), self.config)?;
        }
        let mut description = Description::of(self.config)?;
        description.name_devices(ids);
        let vcpu_states = control.collect_states(vcpus, SAVE_LIMIT)?;
        let vm = VmState::save(self.vm)?;
        let serial = SerialState::from_superio(&super::lock(self.serial).serial.state());
        let mut address = [0u8; 4];
        let pci_config_address = if self.buses.pio.read(PCI_CONFIG_ADDRESS, &mut address) {
            u32::from_le_bytes(address)
        } else {
            0
        };
        let mut device_states = Vec::with_capacity(devices.len());
        for device in devices {
            device_states.push(
                device
                    .save_state()
                    .map_err(|source| SnapshotError::Device {
                        name: device.name().to_string(),
                        source,
                    })?,
            );
        }
        let memory = MemoryLineage {
            kind,
            id: dirty::new_id(),
            parent: self.dirty.and_then(DirtyTracking::parent),
        };
        let state = Snapshot {
            description,
            vcpus: vcpu_states,
            vm,
            serial,
            pci_config_address,
            devices: device_states,
            memory,
        };
        // Taken (and so cleared) before anything is written: on a failure below they are
        // given back as "everything dirty", never silently dropped.
        let dirty_pages = match self.dirty {
            Some(tracking) => {
                dirty::mark_used_rings(self.memory, &state.devices);
                Some(tracking.take(self.vm, self.memory)?)
            }
            None => None,
        };
        let written = self.write_files(snapshot, mem_file, &state, dirty_pages.as_deref());
        match (written, self.dirty) {
            (Ok(bytes), tracking) => {
                if let Some(tracking) = tracking {
                    tracking.taken(memory.id);
                }
                log::info!(
                    "{kind:?} snapshot {} taken: memory file {} ({bytes} bytes written) in {} ms",
                    snapshot.display(),
                    mem_file.display(),
                    start.elapsed().as_millis()
                );
                Ok(())
            }
            (Err(e), Some(tracking)) => {
                tracking.lost();
                Err(e)
            }
            (Err(e), None) => Err(e),
        }
    }

    /// Writes the state and the memory file: a Diff's when `state` is one (its pages in
    /// `dirty`), else all of RAM. Returns the memory file's bytes of data.
    fn write_files(
        &self,
        snapshot: &Path,
        mem_file: &Path,
        state: &Snapshot,
        dirty: Option<&[Vec<u64>]>,
    ) -> Result<u64, SnapshotError> {
        file::write(snapshot, state)?;
        match (state.memory.kind, dirty) {
            (SnapshotKind::Diff, Some(dirty)) => {
                memory_file::write_diff(mem_file, self.memory, dirty)
            }
            (SnapshotKind::Diff, None) => Err(SnapshotError::DiffUntracked),
            (SnapshotKind::Full, _) => {
                memory_file::write(mem_file, self.memory)?;
                Ok(memory_file::file_bytes(self.config.mem_bytes))
            }
        }
    }
}

/// Refuses a Diff of a VM that does not track dirty pages, or whose vsock the kernel's
/// vhost-vsock serves (it writes guest RAM past pvm's logs; vhost-net taps log into the vhost
/// dirty log, see `pvm_vhost::dirty`).
fn check_diff(tracked: bool, config: &VmConfig) -> Result<(), SnapshotError> {
    if !tracked {
        return Err(SnapshotError::DiffUntracked);
    }
    if config
        .vsock
        .as_ref()
        .is_some_and(|v| v.backend == crate::config::VsockBackend::Vhost)
    {
        return Err(SnapshotError::DiffVhostVsock);
    }
    Ok(())
}

/// Reads and checks the snapshot `spec` names and builds its VM, paused (or about to resume,
/// with `spec.resume`). `base` gives the process's own settings (sandbox, logging, metrics).
pub fn restore(base: &VmConfig, spec: &RestoreSpec) -> Result<Vm, Error> {
    restore_described(base, spec).map(|restored| restored.vm)
}

/// A VM [`restore_described`] built, with what the API needs to serve it as it would a VM
/// it started: the snapshot's description (the API's device ids) and the VM's configuration.
pub struct Restored {
    pub vm: Vm,
    pub description: Description,
    pub config: VmConfig,
}

/// [`restore`], keeping the snapshot's description and the configuration built from it.
pub fn restore_described(base: &VmConfig, spec: &RestoreSpec) -> Result<Restored, Error> {
    let start = Instant::now();
    // CPU time as well as wall time: on a busy host the wall time is mostly waiting to run.
    let cpu_start = crate::devices::boot_timer::process_cpu_time();
    let snapshot = file::read(&spec.snapshot).map_err(RestoreError::from)?;
    snapshot.validate()?;
    log::debug!(
        "restore: state file read and checked in {} us",
        start.elapsed().as_micros()
    );
    let config = snapshot
        .description
        .to_config(base, &spec.taps, &spec.overrides)?;
    let mem = match &spec.mem {
        MemSource::File(path) => {
            RamFrom::File(memory_file::open(path, config.mem_bytes).map_err(RestoreError::from)?)
        }
        MemSource::Uffd(socket) => RamFrom::Uffd(socket),
    };
    let (kvm, _flavour) = kvm_host::open()?;
    let vm = Vm::restore(&kvm, &config, &snapshot, &mem, spec.resume)?;
    log::info!(
        "snapshot {} restored in {} us, {} us of CPU",
        spec.snapshot.display(),
        start.elapsed().as_micros(),
        crate::devices::boot_timer::process_cpu_time()
            .saturating_sub(cpu_start)
            .as_micros()
    );
    Ok(Restored {
        vm,
        description: snapshot.description,
        config,
    })
}

/// The restored RAM's source, opened.
enum RamFrom<'a> {
    File(std::fs::File),
    Uffd(&'a Path),
}

impl RamFrom<'_> {
    /// Maps a `mem_bytes` guest's RAM (and, with a handler, hands it over) for `vm`.
    fn map(&self, vm: VmFd, mem_bytes: u64) -> Result<VmMemory, crate::memory::Error> {
        match self {
            RamFrom::File(file) => VmMemory::from_file(Arc::new(vm), mem_bytes, file),
            RamFrom::Uffd(socket) => VmMemory::from_uffd(Arc::new(vm), mem_bytes, socket),
        }
    }
}

impl Vm {
    /// [`Vm::build`] for a snapshot: RAM from `mem`, devices rebuilt from `config` (the
    /// snapshot's description) and given their saved state, vCPUs given theirs.
    fn restore(
        kvm: &Kvm,
        config: &VmConfig,
        snapshot: &Snapshot,
        mem: &RamFrom<'_>,
        resume: bool,
    ) -> Result<Vm, Error> {
        // Where a restore's time goes, at debug level (BENCHMARKS.md "Snapshots").
        let start = Instant::now();
        let phase =
            |done: &str| log::debug!("restore: {done} at {} us", start.elapsed().as_micros());
        prepare_sandbox(config);
        let console_socket = super::bind_console_socket(config)?;
        let mut memory = mem.map(create_vm(kvm)?, config.mem_bytes)?;
        if config.track_dirty_pages {
            // The RAM is the snapshot's memory file: a Diff taken next layers onto it.
            memory.track_dirty_pages(Some(snapshot.memory.id))?;
        }
        phase("VM created, memory mapped and registered");
        let (vm_fd, guest_memory) = (memory.vm_fd(), memory.guest_memory());
        create_irqchip(vm_fd)?;
        let end = Arc::new(crate::exit::EndSignal::new().map_err(super::io_err("eventfd"))?);
        let serial_state = snapshot.serial.to_superio();
        let LegacyDevices {
            mut pio,
            serial,
            i8042,
        } = legacy_devices(vm_fd, config, &end, Some(&serial_state))?;
        phase("irqchip, PIT and legacy devices made");
        let mut mmio = crate::bus::Bus::new();
        let attached = virtio_devices::attach(config, vm_fd, guest_memory, &mut pio, &mut mmio)?;
        dirty::follow_vhost(memory.dirty_tracking(), &attached);
        if attached.pausable.len() != snapshot.devices.len() {
            return Err(RestoreError::invalid(format!(
                "{} device states for a VM of {} virtio devices",
                snapshot.devices.len(),
                attached.pausable.len()
            ))
            .into());
        }
        for (device, state) in attached.pausable.iter().zip(&snapshot.devices) {
            device.restore_state(state)?;
        }
        if config.transport == crate::config::Transport::Pci {
            pio.write(
                PCI_CONFIG_ADDRESS,
                &snapshot.pci_config_address.to_le_bytes(),
            );
        }
        snapshot.vm.restore(vm_fd)?;
        phase("virtio devices and VM state restored");
        let shared = VcpuShared {
            buses: Arc::new(Buses { pio, mmio }),
            end,
            stop: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            control: Arc::new(RunControl::default()),
            stats: Arc::new(crate::vcpu::ExitStats::new(config.stats)),
        };
        let msr_list = super::msr_list(kvm)?;
        let mut vcpus = Vec::with_capacity(snapshot.vcpus.len());
        for (index, state) in (0u8..).zip(&snapshot.vcpus) {
            let fd = vm_fd
                .create_vcpu(u64::from(index))
                .map_err(super::kvm_err("KVM_CREATE_VCPU"))?;
            state.restore(&fd, index)?;
            vcpus.push(shared.vcpu(index, fd, guest_memory, config, &msr_list));
        }
        phase("vCPUs created and restored");
        Ok(Vm::assemble(
            config,
            vcpus,
            Consoles {
                serial,
                i8042,
                socket: console_socket,
            },
            attached,
            shared,
            memory,
            Some(resume),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{TapSpec, VhostMode};

    #[test]
    fn a_diff_is_refused_untracked_or_with_a_vhost_vsock() {
        let mut config = crate::api::models::tests::base();
        let e = check_diff(false, &config).unwrap_err().to_string();
        assert!(e.contains("needs dirty page tracking"), "{e}");
        assert!(check_diff(true, &config).is_ok());
        let tap = |name: &str, vhost| TapSpec {
            name: name.to_string(),
            mac: None,
            vhost,
            queues: 1,
            rx_limit: Default::default(),
            tx_limit: Default::default(),
        };
        config.taps = vec![tap("tap0", VhostMode::Off), tap("tap1", VhostMode::Auto)];
        assert!(check_diff(true, &config).is_ok());
        // vhost-net taps log into the vhost dirty log: a Diff is fine.
        config.taps.push(tap("tap2", VhostMode::On));
        assert!(check_diff(true, &config).is_ok());
        config.taps.clear();
        config.vsock = Some(crate::config::VsockSpec {
            cid: 3,
            backend: crate::config::VsockBackend::Vhost,
        });
        let e = check_diff(true, &config).unwrap_err().to_string();
        assert!(e.contains("vhost-vsock") && e.contains("Full"), "{e}");
    }
}

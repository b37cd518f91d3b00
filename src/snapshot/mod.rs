//! Snapshots of a paused VM: what is saved ([`Snapshot`]), pvm's file format for it
//! ([`file`]), the KVM state of the vCPUs and the VM ([`kvm_state`]), the description a VM is
//! rebuilt from ([`description`]) and the guest RAM's file ([`memory_file`]).
//!
//! A snapshot file is untrusted input: everything in it is checked before any of it reaches
//! KVM or a device, and a VM is only started once all of it was restored.

pub mod description;
pub mod dirty;
pub mod file;
pub mod kvm_state;
pub mod layer;
pub mod memory_file;
#[cfg(any(test, feature = "testing"))]
pub mod sample;
pub mod seed;

use serde::{Deserialize, Serialize};

pub use self::description::Description;
pub use self::kvm_state::{VcpuState, VmState};

/// Everything pvm saves of a paused VM besides its RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// The VM's shape: what is rebuilt before the state goes in.
    pub description: Description,
    /// One per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The in-kernel irqchip, PIT and clock.
    pub vm: VmState,
    /// The 8250 UART's registers and unread input.
    pub serial: SerialState,
    /// The PCI configuration address latch (port 0xcf8).
    pub pci_config_address: u32,
    /// Each virtio transport's state, in the order pvm attaches them.
    pub devices: Vec<DeviceState>,
    /// What the memory file holds, and for a Diff what it layers onto.
    pub memory: MemoryLineage,
}

/// Full or Diff (Firecracker's `snapshot_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    /// The memory file holds all of RAM.
    Full,
    /// The memory file holds the pages written since the parent snapshot; holes elsewhere.
    Diff,
}

/// Which snapshots a memory file belongs with: checked when a Diff is layered onto a base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLineage {
    pub kind: SnapshotKind,
    /// This snapshot's id (random).
    pub id: u64,
    /// A Diff's parent: the snapshot of the same VM taken or restored before it, whose memory
    /// file (as layered so far) the Diff's pages go onto. None for a Diff of a VM that booted
    /// and had no snapshot since: then every page was dirty and the Diff's file is complete.
    pub parent: Option<u64>,
}

/// vm-superio's `SerialState`, as plain data pvm can serialize.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// The UART's receive FIFO holds at most this many bytes (vm-superio's FIFO_SIZE).
pub const SERIAL_FIFO_BYTES: usize = 64;

impl SerialState {
    pub fn from_superio(state: &vm_superio::serial::SerialState) -> Self {
        SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        }
    }

    pub fn to_superio(&self) -> vm_superio::serial::SerialState {
        vm_superio::serial::SerialState {
            baud_divisor_low: self.baud_divisor_low,
            baud_divisor_high: self.baud_divisor_high,
            interrupt_enable: self.interrupt_enable,
            interrupt_identification: self.interrupt_identification,
            line_control: self.line_control,
            line_status: self.line_status,
            modem_control: self.modem_control,
            modem_status: self.modem_status,
            scratch: self.scratch,
            in_buffer: self.in_buffer.clone(),
        }
    }
}

/// A virtio transport's saved state (pvm-virtio's types).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DeviceState {
    Mmio(pvm_virtio::snapshot::MmioState),
    Pci(pvm_virtio::snapshot::PciState),
}

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the VM is running: pause it first (PATCH /vm Paused, or SIGUSR1)")]
    NotPaused,
    #[error(
        "snapshot_type Diff needs dirty page tracking: start the VM with track_dirty_pages \
         (machine-config, --track-dirty-pages, or track_dirty_pages in the load request)"
    )]
    DiffUntracked,
    #[error(
        "a vhost-user device ({0}) holds guest RAM in another process; pvm cannot snapshot \
         such a VM"
    )]
    VhostUser(String),
    #[error(
        "snapshot_type Diff: the vsock is served by the kernel's vhost-vsock (vhost=on), whose \
         writes to guest RAM pvm's dirty page log cannot see; take a Full snapshot"
    )]
    DiffVhostVsock,
    #[error("cannot read the --cloud-init seed back from its memory file: {0}")]
    CloudInitSeed(#[source] std::io::Error),
    #[error("vCPU {index}: {what}: {source}")]
    Vcpu {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {0} did not hand over its state (it is not parked)")]
    VcpuGone(u8),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("virtio device {name}: {source}")]
    Device {
        name: String,
        source: pvm_virtio::snapshot::SnapshotError,
    },
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode the VM state: {0}")]
    Encode(postcard::Error),
}

/// Why a snapshot could not be restored: one line naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    File(#[from] file::FileError),
    #[error(transparent)]
    Memory(#[from] memory_file::MemoryFileError),
    #[error("snapshot: {0}")]
    Invalid(String),
    #[error("vCPU {index}: {what}: {source}")]
    Vcpu {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM refused the snapshot's {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM took only {set} of the snapshot's {wanted} MSRs")]
    Msrs {
        index: u8,
        set: usize,
        wanted: usize,
    },
    #[error("virtio device {name}: {source}")]
    Device {
        name: String,
        source: pvm_virtio::snapshot::RestoreError,
    },
    #[error("snapshot: the serial port's state: {0}")]
    Serial(String),
    #[error("cannot put the snapshot's cloud-init seed in a memory file (memfd): {0}")]
    CloudInitSeed(#[source] std::io::Error),
}

impl RestoreError {
    /// True when the files named are at fault (damaged, foreign, not fitting the host's
    /// devices); false when KVM or the host failed.
    pub fn is_usage(&self) -> bool {
        match self {
            RestoreError::File(_)
            | RestoreError::Memory(_)
            | RestoreError::Invalid(_)
            | RestoreError::Device { .. }
            | RestoreError::Serial(_) => true,
            RestoreError::Vcpu { .. }
            | RestoreError::Kvm { .. }
            | RestoreError::Msrs { .. }
            | RestoreError::CloudInitSeed(_) => false,
        }
    }

    /// A snapshot that contradicts itself or this host; `what` names the value.
    pub fn invalid(what: impl Into<String>) -> Self {
        RestoreError::Invalid(what.into())
    }
}

impl Snapshot {
    /// Checks that the parts agree with each other, before anything is built from them.
    pub fn validate(&self) -> Result<(), RestoreError> {
        self.description.validate()?;
        let cpus = usize::from(self.description.cpus);
        if self.vcpus.len() != cpus {
            return Err(RestoreError::invalid(format!(
                "{} vCPU states for a VM of {cpus} vCPUs",
                self.vcpus.len()
            )));
        }
        if self.serial.in_buffer.len() > SERIAL_FIFO_BYTES {
            return Err(RestoreError::invalid(format!(
                "the serial port holds {} input bytes, its FIFO {SERIAL_FIFO_BYTES}",
                self.serial.in_buffer.len()
            )));
        }
        for (index, vcpu) in self.vcpus.iter().enumerate() {
            vcpu.validate(index)?;
        }
        Ok(())
    }
}

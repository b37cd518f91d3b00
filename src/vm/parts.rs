//! Putting a VM together from its built (or restored) parts: the `Vm` itself, each vCPU with
//! its share of the VM, KVM's MSR save list.

use std::sync::{Arc, Mutex};

use kvm_ioctls::Kvm;
use vm_memory::GuestMemoryMmap;

use super::{Error, VcpuShared, Vm, kvm_err};
use crate::config::VmConfig;
use crate::devices::console_socket::ConsoleSocket;
use crate::devices::i8042::I8042;
use crate::devices::legacy::SerialDevice;
use crate::memory::VmMemory;
use crate::metrics::Sources;
use crate::vcpu::Vcpu;
use crate::virtio_devices::Attached;

/// What the VM talks to the host through: the UART, the keyboard controller and, with
/// `--console socket`, the console's socket.
pub(super) struct Consoles {
    pub(super) serial: Arc<Mutex<SerialDevice>>,
    pub(super) i8042: Arc<Mutex<I8042>>,
    pub(super) socket: Option<ConsoleSocket>,
}

impl Vm {
    /// The VM of built (or restored) parts.
    pub(super) fn assemble(
        config: &VmConfig,
        vcpus: Vec<Vcpu>,
        consoles: Consoles,
        attached: Attached,
        shared: VcpuShared,
        memory: VmMemory,
        restored: Option<bool>,
    ) -> Vm {
        let Consoles {
            serial,
            i8042,
            socket: console_socket,
        } = consoles;
        Vm {
            vcpus,
            serial,
            i8042,
            console_socket,
            console_input: attached.console_input,
            counters: Arc::new(Sources {
                exits: shared.stats,
                disks: attached.disk_errors,
                nets: attached.nets,
                seccomp: config.seccomp,
                balloon: attached.limiters.balloon.clone(),
            }),
            print_stats: config.stats,
            seccomp: config.seccomp,
            vhost_user_sockets: attached.vhost_user_sockets,
            pausable: attached.pausable,
            limiters: attached.limiters,
            end: shared.end,
            stop: shared.stop,
            control: shared.control,
            config: config.clone(),
            buses: shared.buses,
            restored,
            memory,
        }
    }
}

impl VcpuShared {
    /// vCPU `index` on `fd`, holding its share of the VM.
    pub(super) fn vcpu(
        &self,
        index: u8,
        fd: kvm_ioctls::VcpuFd,
        memory: &GuestMemoryMmap,
        config: &VmConfig,
        msr_list: &Arc<Vec<u32>>,
    ) -> Vcpu {
        Vcpu {
            index,
            fd,
            buses: self.buses.clone(),
            memory: memory.clone(),
            end: self.end.clone(),
            stop: self.stop.clone(),
            control: self.control.clone(),
            stats: self.stats.clone(),
            boot_timer: config.boot_timer,
            msr_list: msr_list.clone(),
        }
    }
}

/// KVM's list of the MSRs a VMM saves and restores (kvmclock and the TSC among them).
pub(super) fn msr_list(kvm: &Kvm) -> Result<Arc<Vec<u32>>, Error> {
    let list = kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(Arc::new(list.as_slice().to_vec()))
}

/// A device's lock; a poisoned one still holds usable registers.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

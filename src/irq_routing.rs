//! The VM's GSI routing table. KVM_SET_GSI_ROUTING replaces the whole table, so pvm keeps it:
//! the in-kernel PIC/IOAPIC routes KVM would install by default (the UART and virtio-mmio
//! irqfds rely on them) plus one MSI route per virtio-pci MSI-X vector.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry,
};
use kvm_ioctls::VmFd;
use pvm_virtio::{MsiMessage, MsiSink};
use vmm_sys_util::eventfd::EventFd;

use crate::layout;

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    entry.u.irqchip.irqchip = chip;
    entry.u.irqchip.pin = pin;
    entry
}

fn msi_entry(gsi: u32, message: MsiMessage) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    entry.u.msi.address_lo = message.address as u32;
    entry.u.msi.address_hi = (message.address >> 32) as u32;
    entry.u.msi.data = message.data;
    entry
}

/// How many entries [`default_routes`] has: one per IOAPIC pin plus one per PIC pin.
pub const DEFAULT_ROUTE_COUNT: u32 = layout::IOAPIC_PINS + 16;

/// KVM's default table: GSIs 0-15 to both PICs and the IOAPIC, 16-23 to the IOAPIC.
pub fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::new();
    for gsi in 0..layout::IOAPIC_PINS {
        if gsi < 8 {
            routes.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            routes.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        routes.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    routes
}

/// The MSI routes, shared by all virtio-pci devices; changes are pushed to KVM at once.
#[derive(Debug)]
pub struct GsiRouter {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, kvm_irq_routing_entry>>,
}

impl GsiRouter {
    pub fn new(vm: Arc<VmFd>) -> Self {
        GsiRouter {
            vm,
            msi: Mutex::new(BTreeMap::new()),
        }
    }

    /// Routes `gsi` to `message`, or removes its route (`None`).
    pub fn set_msi(&self, gsi: u32, message: Option<MsiMessage>) -> std::io::Result<()> {
        let mut msi = self.msi.lock().unwrap_or_else(|e| e.into_inner());
        match message {
            Some(message) => msi.insert(gsi, msi_entry(gsi, message)),
            None => msi.remove(&gsi),
        };
        let mut entries = default_routes();
        entries.extend(msi.values().copied());
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| std::io::Error::other(format!("GSI routing table: {e:?}")))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// One virtio-pci device's MSI-X vectors: vector `v` is GSI `first_gsi + v`, raised by a
/// write to the vector's irqfd.
///
/// KVM listens to a vector's irqfd only while the vector has a route (unmasked, MSI-X on): a
/// masked vector's irqfd is deassigned, so what a data plane outside pvm (vhost-net,
/// vhost-user, vhost-vsock) signals meanwhile stays counted in the eventfd, and KVM delivers it
/// when the unmask assigns the irqfd again (KVM_IRQFD injects at once for an eventfd that is
/// already signalled). An irqfd left assigned without a route would have KVM consume those
/// writes and deliver nothing: the interrupt would be lost, and a queue could stall for good.
#[derive(Debug)]
pub struct DeviceMsi {
    router: Arc<GsiRouter>,
    first_gsi: u32,
    /// The transport's irqfds, index = vector, once [`Self::connect`] gave them.
    irqfds: OnceLock<Vec<EventFd>>,
    /// Whether KVM listens to each vector's irqfd now.
    assigned: Mutex<Vec<bool>>,
}

impl DeviceMsi {
    pub fn new(router: Arc<GsiRouter>, first_gsi: u32) -> Self {
        DeviceMsi {
            router,
            first_gsi,
            irqfds: OnceLock::new(),
            assigned: Mutex::new(Vec::new()),
        }
    }

    /// Takes (duplicates of) the transport's irqfds; KVM is given each when its vector first
    /// gets a route. Only the first call counts.
    pub fn connect(&self, irqfds: &[&EventFd]) -> std::io::Result<()> {
        let owned = irqfds
            .iter()
            .map(|fd| fd.try_clone())
            .collect::<std::io::Result<Vec<_>>>()?;
        let count = owned.len();
        if self.irqfds.set(owned).is_ok() {
            *self.assigned.lock().unwrap_or_else(PoisonError::into_inner) = vec![false; count];
        }
        Ok(())
    }
}

impl MsiSink for DeviceMsi {
    fn update_vector(&self, vector: u16, message: Option<MsiMessage>) -> std::io::Result<()> {
        let gsi = self.first_gsi + u32::from(vector);
        let index = usize::from(vector);
        let irqfd = self.irqfds.get().and_then(|fds| fds.get(index));
        let mut assigned = self.assigned.lock().unwrap_or_else(PoisonError::into_inner);
        let kvm = |e: kvm_ioctls::Error| std::io::Error::from_raw_os_error(e.errno());
        match message {
            Some(message) => {
                // The route first: KVM may deliver as soon as the irqfd is assigned.
                self.router.set_msi(gsi, Some(message))?;
                if let Some(irqfd) = irqfd.filter(|_| !assigned[index]) {
                    self.router.vm.register_irqfd(irqfd, gsi).map_err(kvm)?;
                    assigned[index] = true;
                }
                Ok(())
            }
            None => {
                // The irqfd first: from here on, writes wait in the eventfd.
                if let Some(irqfd) = irqfd.filter(|_| assigned[index]) {
                    self.router.vm.unregister_irqfd(irqfd, gsi).map_err(kvm)?;
                    assigned[index] = false;
                }
                self.router.set_msi(gsi, None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table_matches_kvm() {
        let routes = default_routes();
        // 16 PIC + 24 IOAPIC entries.
        assert_eq!(routes.len(), 40);
        assert_eq!(routes.len(), DEFAULT_ROUTE_COUNT as usize);
        let ioapic: Vec<_> = routes
            .iter()
            // SAFETY: every entry here is an irqchip route, so `irqchip` is the union's member.
            .filter(|e| unsafe { e.u.irqchip.irqchip } == KVM_IRQCHIP_IOAPIC)
            .collect();
        assert_eq!(ioapic.len(), 24);
        let gsi4: Vec<_> = routes.iter().filter(|e| e.gsi == 4).collect();
        assert_eq!(gsi4.len(), 2, "ISA IRQs reach both PIC and IOAPIC");
    }

    /// Whether `fd` has a count waiting, without reading it.
    fn signalled(fd: &EventFd) -> bool {
        use std::os::fd::AsRawFd;
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no timeout.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        assert!(ready >= 0, "poll: {}", std::io::Error::last_os_error());
        poll.revents & libc::POLLIN != 0
    }

    #[test]
    fn a_masked_vector_keeps_what_a_data_plane_signals() {
        let Some(kvm) = crate::kvm_host::kvm_for_tests() else {
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let msi = DeviceMsi::new(Arc::new(GsiRouter::new(vm)), 40);
        let fds = [
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ];
        msi.connect(&[&fds[0], &fds[1]]).unwrap();
        let message = MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        };
        // Before the driver unmasks it, KVM does not listen: a write waits.
        fds[0].write(1).unwrap();
        assert!(signalled(&fds[0]));
        fds[0].read().unwrap();
        // Unmasked: KVM takes each write at once (and delivers it through the route).
        msi.update_vector(0, Some(message)).unwrap();
        fds[0].write(1).unwrap();
        assert!(!signalled(&fds[0]), "KVM did not take the write");
        // Masked: the write a vhost worker makes now is kept, not consumed without a route.
        msi.update_vector(0, None).unwrap();
        fds[0].write(1).unwrap();
        assert!(signalled(&fds[0]), "a masked vector's interrupt was lost");
        // Unmasked again (twice: the second is a message change only), and vector 1 untouched.
        msi.update_vector(0, Some(message)).unwrap();
        msi.update_vector(
            0,
            Some(MsiMessage {
                data: 0x42,
                ..message
            }),
        )
        .unwrap();
        fds[0].write(1).unwrap();
        assert!(!signalled(&fds[0]));
        fds[1].write(1).unwrap();
        assert!(signalled(&fds[1]));
    }

    #[test]
    fn msi_entries_split_the_address() {
        let e = msi_entry(
            30,
            MsiMessage {
                address: 0x1_fee0_0000,
                data: 0x4041,
            },
        );
        assert_eq!((e.gsi, e.type_), (30, KVM_IRQ_ROUTING_MSI));
        // SAFETY: built as an MSI route just above.
        let msi = unsafe { e.u.msi };
        assert_eq!(
            (msi.address_lo, msi.address_hi, msi.data),
            (0xfee0_0000, 1, 0x4041)
        );
    }
}

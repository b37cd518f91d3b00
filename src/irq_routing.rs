//! The VM's GSI routing table. KVM_SET_GSI_ROUTING replaces the whole table, so pvm keeps it:
//! the in-kernel PIC/IOAPIC routes KVM would install by default (the UART and virtio-mmio
//! irqfds rely on them) plus one MSI route per virtio-pci MSI-X vector.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry,
};
use kvm_ioctls::VmFd;
use pvm_virtio::{MsiMessage, MsiSink};

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

/// One virtio-pci device's MSI-X vectors: vector `v` is GSI `first_gsi + v`.
#[derive(Debug)]
pub struct DeviceMsi {
    pub router: Arc<GsiRouter>,
    pub first_gsi: u32,
}

impl MsiSink for DeviceMsi {
    fn update_vector(&self, vector: u16, message: Option<MsiMessage>) -> std::io::Result<()> {
        self.router
            .set_msi(self.first_gsi + u32::from(vector), message)
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

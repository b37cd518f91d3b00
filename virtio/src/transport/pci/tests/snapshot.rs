//! Snapshots behind virtio-pci: the device scenarios, and what only pci has (config space, BAR,
//! MSI-X table, PBA, vectors and their routes).

use super::*;
use crate::transport::snapshot_scenarios;

#[test]
fn a_block_device_continues_after_a_restore_behind_pci() {
    snapshot_scenarios::block_continues_after_restore(pci_port);
}

#[test]
fn a_net_device_continues_after_a_restore_behind_pci() {
    snapshot_scenarios::net_continues_after_restore(pci_port);
}

#[test]
fn a_console_continues_after_a_restore_behind_pci() {
    snapshot_scenarios::console_continues_after_restore(pci_port);
}

#[test]
fn an_rng_continues_after_a_restore_behind_pci() {
    snapshot_scenarios::rng_continues_after_restore(pci_port);
}

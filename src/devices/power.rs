//! ACPI power-off (hardware-reduced sleep control register) and pvpanic.

use std::sync::Arc;

use crate::boot::acpi::S5_SLEEP_TYPE;
use crate::bus::BusDevice;
use crate::exit::{EndSignal, Outcome};

/// Sleep control register bits: SLP_TYP in [4:2], SLP_EN is bit 5.
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0x7;
const SLEEP_ENABLE: u8 = 1 << 5;
/// Sleep status register: WAK_STS (bit 7) reads as set, so a guest polling for wake-up stops.
const WAKE_STATUS: u8 = 1 << 7;

/// The FADT's sleep control (offset 0) and sleep status (offset 1) registers.
#[derive(Debug)]
pub struct AcpiPower(pub Arc<EndSignal>);

impl BusDevice for AcpiPower {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 1 && data.len() == 1 {
            data[0] = WAKE_STATUS;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 1 {
            let value = data[0];
            let sleep_type = (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK;
            if value & SLEEP_ENABLE != 0 && sleep_type == S5_SLEEP_TYPE {
                self.0.end(Outcome::PowerOff);
            }
        }
    }
}

/// pvpanic event bits (QEMU's docs/specs/pvpanic.rst).
const PVPANIC_PANICKED: u8 = 1 << 0;
const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// QEMU-compatible ISA pvpanic: reading tells which events are supported; writing PANICKED ends
/// the VM as a guest panic. CRASH_LOADED (a kdump kernel takes over) lets the guest go on.
#[derive(Debug)]
pub struct PvPanic(pub Arc<EndSignal>);

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|v| v & PVPANIC_PANICKED != 0) {
            self.0.end(Outcome::Panic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_other_states_do_not() {
        let end = Arc::new(EndSignal::new().unwrap());
        let mut dev = AcpiPower(end.clone());
        dev.write(0, &[(3 << 2) | SLEEP_ENABLE]); // S3 is not supported: ignored
        dev.write(0, &[5 << 2]); // no SLP_EN
        assert_eq!(end.outcome(), None);
        let mut status = [0u8];
        dev.read(1, &mut status);
        assert_eq!(status[0], WAKE_STATUS);
        dev.write(0, &[(5 << 2) | SLEEP_ENABLE]);
        assert_eq!(end.outcome(), Some(Outcome::PowerOff));
    }

    #[test]
    fn pvpanic_reports_features_and_panics() {
        let end = Arc::new(EndSignal::new().unwrap());
        let mut dev = PvPanic(end.clone());
        let mut features = [0u8];
        dev.read(0, &mut features);
        assert_eq!(features[0], 3);
        dev.write(0, &[PVPANIC_CRASH_LOADED]);
        assert_eq!(end.outcome(), None);
        dev.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(end.outcome(), Some(Outcome::Panic));
    }
}

//! The platform devices pvm keeps besides virtio: the 8250 UART for early boot (vm-superio), the
//! i8042 controller with its keyboard (reset line and Ctrl-Alt-Del), the ACPI power device and
//! pvpanic.

pub mod boot_timer;
pub mod console_socket;
pub mod exit_port;
pub mod i8042;
pub mod legacy;
pub mod power;
pub mod serial_out;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// An interrupt line as an eventfd that KVM turns into an interrupt (irqfd).
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

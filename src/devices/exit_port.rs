//! The sandbox's exit device (`pvm -- COMMAND`, crate::sandbox): pvm's guest init writes the
//! command's exit status, one byte, to I/O port 0xf4 and the VM ends at once with pvm exiting
//! with that status. The port is the one QEMU's isa-debug-exit uses by convention, but the byte
//! is the status itself. Only present in sandbox mode, so no other guest can end pvm this way
//! with a status of its choosing.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{EndSignal, Outcome};

pub const EXIT_PORT: u16 = 0xf4;

/// Ends the VM with the status written to it.
#[derive(Debug)]
pub struct ExitPort(pub Arc<EndSignal>);

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // A wider or misplaced access is not the init's protocol: ignored rather than guessed.
        if let ([status], 0) = (data, offset) {
            self.0.end(Outcome::GuestExit(*status));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_byte_ends_the_vm_with_that_status_other_writes_do_not() {
        let end = Arc::new(EndSignal::new().unwrap());
        let mut dev = ExitPort(end.clone());
        dev.write(0, &[7, 0]);
        dev.write(1, &[7]);
        assert_eq!(end.outcome(), None);
        dev.write(0, &[7]);
        dev.write(0, &[9]);
        assert_eq!(end.outcome(), Some(Outcome::GuestExit(7)));
        assert_eq!(end.outcome().unwrap().exit_code(), 7);
        let mut byte = [0xffu8];
        dev.read(0, &mut byte);
        assert_eq!(byte, [0]);
    }
}

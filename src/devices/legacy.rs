//! The bus adapter for vm-superio's 8250 UART.

use std::io::Write;

use vm_superio::{Serial, serial::NoEvents};

use super::IrqTrigger;
use crate::bus::BusDevice;

/// The 8250 UART at 0x3f8, interrupting on IRQ 4 through an irqfd.
pub struct SerialDevice {
    pub serial: Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    pub fn new(irq: IrqTrigger, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            serial: Serial::new(irq, out),
        }
    }

    /// The UART as a snapshot left it (registers and unread input).
    pub fn from_state(
        state: &vm_superio::serial::SerialState,
        irq: IrqTrigger,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, vm_superio::serial::Error<std::io::Error>> {
        Ok(SerialDevice {
            serial: Serial::from_state(state, irq, NoEvents, out)?,
        })
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.serial.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial: cannot queue input for the guest: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.serial.write(offset as u8, data[0]) {
                // Output to a closed stdout must not stop the guest.
                log::debug!("serial: write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_output_input_and_interrupt() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev =
            SerialDevice::new(IrqTrigger(irq.try_clone().unwrap()), Box::new(sink.clone()));
        // Enable the "received data available" interrupt (IER bit 0).
        dev.write(1, &[1]);
        dev.write(0, b"h");
        dev.write(0, b"i");
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        assert_eq!(dev.enqueue_input(b"ok"), 2);
        assert!(irq.read().unwrap() >= 1, "input raises the UART interrupt");
        let mut byte = [0u8];
        dev.read(0, &mut byte);
        assert_eq!(&byte, b"o");
        // A full FIFO takes no more.
        let big = vec![b'x'; 200];
        let taken = dev.enqueue_input(&big);
        assert!(taken < 200);
        assert_eq!(dev.enqueue_input(&big), 0);
    }
}

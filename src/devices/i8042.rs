//! The i8042 PS/2 controller at ports 0x60 (data) and 0x64 (status/command) with a keyboard on
//! its first port and nothing on the second, interrupting on IRQ 1.
//!
//! Just enough of both for a guest's driver to find them at once and for the host to type
//! Ctrl-Alt-Del (Firecracker's `SendCtrlAltDel`): the controller answers the commands Linux's
//! i8042 driver probes with (CTR read/write, self-test, interface tests, the output port), the
//! keyboard those of atkbd (reset, ID, LEDs, typematic rate, scan code set, enable/disable),
//! and the reset line (command 0xFE, or an output port write with bit 0 clear) ends the VM as a
//! reboot, which is how `reboot=k` works. An answer that never came would cost the guest a
//! 500 ms busy-wait per command; every command here is answered before the guest's next read.
//!
//! Bytes reach the guest one at a time through the output buffer: the controller's own answers
//! first, then the keyboard's, which raise IRQ 1 when the guest enabled the keyboard interrupt
//! and are held while it disabled the keyboard interface. Keys are set 2 scan codes, converted
//! to set 1 when the guest turned on the controller's translation (CTR bit 6; Linux leaves it
//! off here because pvm's CTR starts with it off).

use std::collections::VecDeque;
use std::sync::Arc;

use vm_superio::Trigger;

use super::IrqTrigger;
use crate::bus::BusDevice;
use crate::exit::{EndSignal, Outcome};

/// The IRQ (and GSI) of the keyboard port.
pub const KEYBOARD_IRQ: u32 = 1;

/// Port offsets from 0x60.
const DATA: u64 = 0;
const STATUS_COMMAND: u64 = 4;

/// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 1 << 0;
const STATUS_SYSTEM: u8 = 1 << 2;
/// The last byte written went to the command port.
const STATUS_COMMAND_LAST: u8 = 1 << 3;
/// The keyboard is not inhibited (no key lock).
const STATUS_UNLOCKED: u8 = 1 << 4;

/// Controller configuration byte (CTR) bits.
const CTR_KEYBOARD_INTERRUPT: u8 = 1 << 0;
const CTR_SYSTEM: u8 = 1 << 2;
const CTR_KEYBOARD_DISABLED: u8 = 1 << 4;
const CTR_AUX_DISABLED: u8 = 1 << 5;
const CTR_TRANSLATE: u8 = 1 << 6;

/// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KEYBOARD_TEST: u8 = 0xab;
const CMD_KEYBOARD_DISABLE: u8 = 0xad;
const CMD_KEYBOARD_ENABLE: u8 = 0xae;
const CMD_READ_INPUT_PORT: u8 = 0xc0;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KEYBOARD_OUTPUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUTPUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
/// 0xf0..=0xff pulse the output port lines whose bits are clear; bit 0 is the CPU reset.
const CMD_PULSE_FIRST: u8 = 0xf0;

/// Answers.
const SELF_TEST_PASSED: u8 = 0x55;
const INTERFACE_OK: u8 = 0x00;
/// The aux interface test's "clock line stuck low": there is no mouse port.
const AUX_ABSENT: u8 = 0x01;
/// The output port: bit 0 the CPU reset line (high: running), bit 1 A20.
const OUTPUT_PORT_DEFAULT: u8 = 0x03;
/// The input port: bit 7, the keyboard is not inhibited.
const INPUT_PORT: u8 = 0x80;

/// Keyboard commands (port 0x60) and answers.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCAN_CODE_SET: u8 = 0xf0;
const KBD_GET_ID: u8 = 0xf2;
const KBD_TYPEMATIC: u8 = 0xf3;
const KBD_ENABLE: u8 = 0xf4;
const KBD_DISABLE: u8 = 0xf5;
const KBD_DEFAULTS: u8 = 0xf6;
const KBD_RESEND: u8 = 0xfe;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
/// An MF2 keyboard's ID; the second byte as translation shows it.
const KBD_ID: [u8; 2] = [0xab, 0x83];
const KBD_ID_TRANSLATED: [u8; 2] = [0xab, 0x41];

/// Ctrl, Alt and Delete pressed, then released, as set 2 scan codes.
const CTRL_ALT_DEL_SET2: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];
/// The same keys as set 1 (what translation makes of them).
const CTRL_ALT_DEL_SET1: [u8; 6] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3];
/// Bytes the keyboard holds for the guest; a guest that reads nothing cannot make pvm grow.
const KEYBOARD_QUEUE: usize = 64;

/// The keyboard queue is full: the guest has not read what was typed before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the guest has not read the keys sent before (the i8042 keyboard queue is full)")]
pub struct KeyboardFull;

/// The controller and its keyboard.
pub struct I8042 {
    end: Arc<EndSignal>,
    irq: IrqTrigger,
    ctr: u8,
    output_port: u8,
    /// The byte the guest reads next from port 0x60, and whether the keyboard sent it.
    output: Option<(u8, bool)>,
    /// The last byte read, which port 0x60 keeps returning when nothing new came.
    last_read: u8,
    /// The controller's own answers, delivered before any keyboard byte.
    answers: VecDeque<u8>,
    /// Bytes from the keyboard: its answers and keys.
    keyboard: VecDeque<u8>,
    /// A controller command waiting for its data byte on port 0x60.
    command: Option<u8>,
    /// A keyboard command waiting for its parameter byte.
    keyboard_command: Option<u8>,
    command_last: bool,
    /// The guest's driver has written the CTR: something is there to receive keys.
    driver_seen: bool,
}

impl I8042 {
    /// A controller whose reset line ends the VM through `end` and whose keyboard interrupts
    /// through `irq` (an irqfd on [`KEYBOARD_IRQ`]).
    pub fn new(end: Arc<EndSignal>, irq: IrqTrigger) -> Self {
        I8042 {
            end,
            irq,
            // As firmware leaves it: interrupt on, POST passed, no mouse port, no translation.
            ctr: CTR_KEYBOARD_INTERRUPT | CTR_SYSTEM | CTR_AUX_DISABLED,
            output_port: OUTPUT_PORT_DEFAULT,
            output: None,
            last_read: 0,
            answers: VecDeque::new(),
            keyboard: VecDeque::new(),
            command: None,
            keyboard_command: None,
            command_last: false,
            driver_seen: false,
        }
    }

    /// Whether a driver in the guest has programmed the controller (written its CTR); without
    /// one, keys would never be read.
    pub fn driver_seen(&self) -> bool {
        self.driver_seen
    }

    /// Types Ctrl-Alt-Del: the three keys pressed and released.
    pub fn ctrl_alt_del(&mut self) -> Result<(), KeyboardFull> {
        let keys: &[u8] = if self.ctr & CTR_TRANSLATE != 0 {
            &CTRL_ALT_DEL_SET1
        } else {
            &CTRL_ALT_DEL_SET2
        };
        if self.keyboard.len() + keys.len() > KEYBOARD_QUEUE {
            return Err(KeyboardFull);
        }
        self.keyboard.extend(keys);
        self.refill();
        Ok(())
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_UNLOCKED;
        if self.output.is_some() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.ctr & CTR_SYSTEM != 0 {
            status |= STATUS_SYSTEM;
        }
        if self.command_last {
            status |= STATUS_COMMAND_LAST;
        }
        status
    }

    fn read_data(&mut self) -> u8 {
        if let Some((byte, _)) = self.output.take() {
            self.last_read = byte;
        }
        self.refill();
        self.last_read
    }

    /// Moves the next byte into the empty output buffer: an answer of the controller's, else a
    /// keyboard byte while the keyboard interface is enabled, which interrupts if the guest
    /// asked for it.
    fn refill(&mut self) {
        if self.output.is_some() {
            return;
        }
        if let Some(byte) = self.answers.pop_front() {
            self.output = Some((byte, false));
        } else if self.ctr & CTR_KEYBOARD_DISABLED == 0 {
            if let Some(byte) = self.keyboard.pop_front() {
                self.output = Some((byte, true));
                self.interrupt();
            }
        }
    }

    fn interrupt(&self) {
        if self.ctr & CTR_KEYBOARD_INTERRUPT != 0 {
            if let Err(e) = self.irq.trigger() {
                log::warn!("i8042: cannot raise IRQ {KEYBOARD_IRQ}: {e}");
            }
        }
    }

    /// Queues a controller answer. A new command's answer replaces whatever the guest left
    /// unread, so a stale byte is never taken for it.
    fn answer(&mut self, byte: u8) {
        self.answers.clear();
        if self.output.is_some_and(|(_, keyboard)| !keyboard) {
            self.output = None;
        }
        self.answers.push_back(byte);
        self.refill();
    }

    fn write_command(&mut self, command: u8) {
        self.command = None;
        match command {
            CMD_READ_CTR => self.answer(self.ctr),
            // Other bytes of the controller's RAM read as 0.
            0x21..=0x3f => self.answer(0),
            CMD_WRITE_CTR..=0x7f | CMD_WRITE_OUTPUT_PORT..=CMD_WRITE_AUX => {
                self.command = Some(command)
            }
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLED,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLED,
            CMD_AUX_TEST => self.answer(AUX_ABSENT),
            CMD_SELF_TEST => self.answer(SELF_TEST_PASSED),
            CMD_KEYBOARD_TEST => self.answer(INTERFACE_OK),
            CMD_KEYBOARD_DISABLE => self.ctr |= CTR_KEYBOARD_DISABLED,
            CMD_KEYBOARD_ENABLE => {
                self.ctr &= !CTR_KEYBOARD_DISABLED;
                self.refill();
            }
            CMD_READ_INPUT_PORT => self.answer(INPUT_PORT),
            CMD_READ_OUTPUT_PORT => self.answer(self.output_port),
            CMD_PULSE_FIRST..=0xff if command & 1 == 0 => self.reset(),
            other => log::debug!("i8042: command {other:#04x} ignored"),
        }
    }

    fn write_data(&mut self, byte: u8) {
        match self.command.take() {
            Some(CMD_WRITE_CTR) => {
                self.ctr = byte;
                self.driver_seen = true;
                // A byte held while the keyboard was off (or not interrupting) may go now.
                if let Some((_, true)) = self.output {
                    self.interrupt();
                }
                self.refill();
            }
            Some(CMD_WRITE_OUTPUT_PORT) => {
                self.output_port = byte;
                if byte & 1 == 0 {
                    self.reset();
                }
            }
            Some(CMD_WRITE_KEYBOARD_OUTPUT) => self.keyboard_bytes(&[byte]),
            // There is no mouse: the loopback comes back without the aux flag, which tells
            // the guest so at once.
            Some(CMD_WRITE_AUX_OUTPUT) => self.answer(byte),
            // Bytes for the absent mouse, or the controller's RAM, go nowhere.
            Some(_) => {}
            None => self.keyboard_receives(byte),
        }
    }

    /// A byte the guest sends the keyboard; the keyboard answers at once.
    fn keyboard_receives(&mut self, byte: u8) {
        // Sending to the keyboard enables its interface, as on real controllers.
        self.ctr &= !CTR_KEYBOARD_DISABLED;
        if self.keyboard_command.take().is_some() {
            // The parameter of LEDs, typematic rate or scan code set. Only set 2 exists; a
            // query (0) is answered with it.
            self.keyboard_bytes(&[KBD_ACK]);
            if byte == 0 {
                let set = if self.ctr & CTR_TRANSLATE != 0 {
                    0x41
                } else {
                    0x02
                };
                self.keyboard_bytes(&[set]);
            }
            return;
        }
        match byte {
            KBD_SET_LEDS | KBD_TYPEMATIC | KBD_SCAN_CODE_SET => {
                self.keyboard_command = Some(byte);
                self.keyboard_bytes(&[KBD_ACK]);
            }
            KBD_ECHO => self.keyboard_bytes(&[KBD_ECHO]),
            KBD_GET_ID => {
                let id = if self.ctr & CTR_TRANSLATE != 0 {
                    KBD_ID_TRANSLATED
                } else {
                    KBD_ID
                };
                self.keyboard_bytes(&[KBD_ACK, id[0], id[1]]);
            }
            KBD_RESET => {
                // Keys not yet read are lost, as a real keyboard's buffer is.
                self.keyboard.clear();
                self.keyboard_bytes(&[KBD_ACK, KBD_SELF_TEST_PASSED]);
            }
            KBD_ENABLE | KBD_DISABLE | KBD_DEFAULTS | 0xf7..=0xfd => {
                self.keyboard_bytes(&[KBD_ACK]);
            }
            // Unknown: ask for it again.
            _ => self.keyboard_bytes(&[KBD_RESEND]),
        }
    }

    /// Queues the keyboard's answer; answers are tiny and the guest waits for each, so they
    /// always fit.
    fn keyboard_bytes(&mut self, bytes: &[u8]) {
        let room = KEYBOARD_QUEUE.saturating_sub(self.keyboard.len());
        self.keyboard.extend(bytes.iter().take(room));
        self.refill();
    }

    fn reset(&self) {
        self.end.end(Outcome::Reboot);
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (DATA, 1) => data[0] = self.read_data(),
            (STATUS_COMMAND, 1) => data[0] = self.status(),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (DATA, [byte]) => {
                self.command_last = false;
                self.write_data(*byte);
            }
            (STATUS_COMMAND, [byte]) => {
                self.command_last = true;
                self.write_command(*byte);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
#[path = "i8042_tests.rs"]
mod tests;

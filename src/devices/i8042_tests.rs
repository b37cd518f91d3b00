use super::*;
use vmm_sys_util::eventfd::EventFd;

struct Rig {
    dev: I8042,
    end: Arc<EndSignal>,
    irq: EventFd,
}

fn rig() -> Rig {
    let end = Arc::new(EndSignal::new().unwrap());
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let dev = I8042::new(end.clone(), IrqTrigger(irq.try_clone().unwrap()));
    Rig { dev, end, irq }
}

impl Rig {
    fn status(&mut self) -> u8 {
        let mut b = [0];
        self.dev.read(STATUS_COMMAND, &mut b);
        b[0]
    }
    fn data(&mut self) -> u8 {
        let mut b = [0];
        self.dev.read(DATA, &mut b);
        b[0]
    }
    fn command(&mut self, c: u8) {
        self.dev.write(STATUS_COMMAND, &[c]);
    }
    fn send(&mut self, b: u8) {
        self.dev.write(DATA, &[b]);
    }
    /// Every byte waiting in the output buffer, read as a driver does (status, then data).
    fn drain(&mut self) -> Vec<u8> {
        let mut got = Vec::new();
        while self.status() & STATUS_OUTPUT_FULL != 0 {
            got.push(self.data());
            assert!(got.len() < 100, "the output never empties");
        }
        got
    }
    /// How many interrupts were raised since the last call.
    fn interrupts(&self) -> u64 {
        self.irq.read().unwrap_or(0)
    }
}

#[test]
fn linux_probe_is_answered_at_once() {
    let mut r = rig();
    assert_eq!(
        r.status() & STATUS_OUTPUT_FULL,
        0,
        "nothing to flush at boot"
    );
    r.command(CMD_READ_CTR);
    assert_ne!(r.status() & STATUS_COMMAND_LAST, 0);
    let ctr = r.drain();
    assert_eq!(ctr.len(), 1);
    assert_eq!(
        ctr[0] & CTR_TRANSLATE,
        0,
        "no translation: Linux runs it direct"
    );
    assert!(!r.dev.driver_seen());
    r.command(CMD_WRITE_CTR);
    r.send(ctr[0] | CTR_KEYBOARD_DISABLED);
    assert!(r.dev.driver_seen());
    r.command(CMD_READ_CTR);
    assert_eq!(r.drain(), [ctr[0] | CTR_KEYBOARD_DISABLED]);
    r.command(CMD_SELF_TEST);
    assert_eq!(r.drain(), [SELF_TEST_PASSED]);
    r.command(CMD_KEYBOARD_TEST);
    assert_eq!(r.drain(), [INTERFACE_OK]);
    r.command(CMD_READ_OUTPUT_PORT);
    assert_eq!(r.drain(), [OUTPUT_PORT_DEFAULT]);
    r.command(CMD_READ_INPUT_PORT);
    assert_eq!(r.drain(), [INPUT_PORT]);
    // The mouse port check: the loopback comes back without the aux flag, and the
    // interface test reports a fault, so the driver knows at once there is no mouse.
    r.command(CMD_WRITE_AUX_OUTPUT);
    r.send(0x5a);
    assert_eq!(r.status() & 0x20, 0);
    assert_eq!(r.drain(), [0x5a]);
    r.command(CMD_AUX_TEST);
    assert_eq!(r.drain(), [AUX_ABSENT]);
    // A20 on through the output port, and the null command, as Linux does on x86.
    r.command(CMD_WRITE_OUTPUT_PORT);
    r.send(0xdf);
    r.command(0xff);
    assert_eq!(r.end.outcome(), None);
    assert_eq!(r.interrupts(), 0, "controller answers do not interrupt");
}

#[test]
fn a_new_command_drops_an_unread_answer() {
    let mut r = rig();
    r.command(CMD_SELF_TEST);
    r.command(CMD_KEYBOARD_TEST);
    assert_eq!(r.drain(), [INTERFACE_OK]);
}

#[test]
fn keyboard_answers_atkbd_and_interrupts() {
    let mut r = rig();
    r.send(KBD_RESET);
    assert_eq!(r.interrupts(), 1);
    assert_eq!(r.data(), KBD_ACK);
    assert_eq!(r.interrupts(), 1, "the next byte interrupts again");
    assert_eq!(r.drain(), [KBD_SELF_TEST_PASSED]);
    r.send(KBD_GET_ID);
    assert_eq!(r.drain(), [KBD_ACK, 0xab, 0x83]);
    r.send(KBD_SET_LEDS);
    assert_eq!(r.drain(), [KBD_ACK]);
    r.send(0x07);
    assert_eq!(r.drain(), [KBD_ACK]);
    r.send(KBD_SCAN_CODE_SET);
    r.send(0);
    assert_eq!(r.drain(), [KBD_ACK, KBD_ACK, 0x02]);
    r.send(KBD_TYPEMATIC);
    r.send(0x20);
    assert_eq!(r.drain(), [KBD_ACK, KBD_ACK]);
    for command in [KBD_ENABLE, KBD_DISABLE, KBD_DEFAULTS] {
        r.send(command);
        assert_eq!(r.drain(), [KBD_ACK]);
    }
    r.send(KBD_ECHO);
    assert_eq!(r.drain(), [KBD_ECHO]);
    r.send(0x42);
    assert_eq!(r.drain(), [KBD_RESEND]);
    // The loopback of a keyboard byte comes as from the keyboard.
    r.interrupts();
    r.command(CMD_WRITE_KEYBOARD_OUTPUT);
    r.send(0x99);
    assert_eq!(r.interrupts(), 1);
    assert_eq!(r.drain(), [0x99]);
}

#[test]
fn reset_line_ends_the_vm_as_reboot() {
    let mut r = rig();
    r.command(0x12);
    r.command(0xff);
    assert_eq!(r.end.outcome(), None);
    r.command(0xfe);
    assert_eq!(r.end.outcome(), Some(Outcome::Reboot));
    let mut r = rig();
    r.command(CMD_WRITE_OUTPUT_PORT);
    r.send(0xde);
    assert_eq!(r.end.outcome(), Some(Outcome::Reboot));
}

#[test]
fn ctrl_alt_del_is_typed_one_byte_per_read() {
    let mut r = rig();
    r.dev.ctrl_alt_del().unwrap();
    assert_eq!(r.interrupts(), 1);
    let mut got = Vec::new();
    while r.status() & STATUS_OUTPUT_FULL != 0 {
        got.push(r.data());
        if r.status() & STATUS_OUTPUT_FULL != 0 {
            assert_eq!(r.interrupts(), 1, "each byte interrupts");
        }
    }
    assert_eq!(got, CTRL_ALT_DEL_SET2);
    // With translation on, set 1.
    r.command(CMD_WRITE_CTR);
    r.send(CTR_KEYBOARD_INTERRUPT | CTR_SYSTEM | CTR_TRANSLATE);
    r.dev.ctrl_alt_del().unwrap();
    assert_eq!(r.drain(), CTRL_ALT_DEL_SET1);
}

#[test]
fn keys_wait_while_the_keyboard_is_disabled_and_interrupts_follow_the_ctr() {
    let mut r = rig();
    r.command(CMD_KEYBOARD_DISABLE);
    r.dev.ctrl_alt_del().unwrap();
    assert_eq!(r.status() & STATUS_OUTPUT_FULL, 0);
    assert_eq!(r.interrupts(), 0);
    // The driver's CTR read goes first though keys wait.
    r.command(CMD_READ_CTR);
    let ctr = r.drain()[0];
    r.command(CMD_WRITE_CTR);
    r.send(ctr & !CTR_KEYBOARD_INTERRUPT);
    r.command(CMD_KEYBOARD_ENABLE);
    assert_eq!(r.interrupts(), 0, "interrupt off");
    assert_eq!(r.data(), CTRL_ALT_DEL_SET2[0]);
    r.command(CMD_WRITE_CTR);
    r.send((ctr | CTR_KEYBOARD_INTERRUPT) & !CTR_KEYBOARD_DISABLED);
    assert_eq!(
        r.interrupts(),
        1,
        "turning the interrupt on announces the waiting byte"
    );
    assert_eq!(r.drain(), CTRL_ALT_DEL_SET2[1..]);
}

#[test]
fn a_guest_that_reads_nothing_fills_the_queue_not_the_host() {
    let mut r = rig();
    let mut sent = 0;
    while r.dev.ctrl_alt_del().is_ok() {
        sent += 1;
        assert!(sent < 100);
    }
    assert_eq!(r.dev.ctrl_alt_del(), Err(KeyboardFull));
    assert!(r.dev.keyboard.len() <= KEYBOARD_QUEUE);
    // Keyboard answers beyond the queue are dropped, not kept.
    for _ in 0..1000 {
        r.send(KBD_GET_ID);
    }
    assert!(r.dev.keyboard.len() <= KEYBOARD_QUEUE);
}

#[test]
fn hostile_port_traffic_never_panics_or_grows() {
    let mut r = rig();
    let mut x: u32 = 0x1234_5678;
    for _ in 0..200_000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let byte = (x >> 8) as u8;
        match x % 5 {
            0 => r.command(byte),
            1 => r.send(byte),
            2 => {
                r.data();
            }
            3 => {
                r.status();
            }
            _ => {
                let mut wide = [0u8; 2];
                r.dev.read(u64::from(byte % 8), &mut wide);
                r.dev.write(u64::from(byte % 8), &wide);
                let _ = r.dev.ctrl_alt_del();
            }
        }
        assert!(r.dev.keyboard.len() <= KEYBOARD_QUEUE);
        assert!(r.dev.answers.len() <= 1);
    }
}

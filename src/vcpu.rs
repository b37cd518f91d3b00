//! vCPUs: per-vCPU setup (CPUID, MSRs, LAPIC, boot registers) and the run loop. The exit handler
//! is a plain function over the buses, unit-tested with synthetic exits; each vCPU thread holds
//! its own handles, and only the one device an exit touches is locked.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{CpuId, Msrs, kvm_msr_entry, kvm_run};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::{BootEntry, regs};
use crate::bus::Bus;
use crate::cpuid;
use crate::exit::{EndSignal, Outcome};
use crate::vm::RunControl;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
/// MISC_ENABLE: fast string operations, as firmware leaves them.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// LAPIC register offsets and delivery modes for the local interrupt pins.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// KVM_SYSTEM_EVENT_* types.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
const SYSTEM_EVENT_CRASH: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vCPU {index}: {what}: {source}")]
    Setup {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM took only {set} of {wanted} MSRs")]
    Msrs {
        index: u8,
        set: usize,
        wanted: usize,
    },
}

/// What the vCPU loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    Continue,
    End(Outcome),
}

/// Userspace exits (KVM_RUN returns) counted by reason, shared by all vCPUs.
#[derive(Debug, Default)]
pub struct ExitStats {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    pub interrupted: AtomicU64,
    pub other: AtomicU64,
    /// With `--stats` only: port and MMIO exits by kind and address, to see which device a
    /// guest exits for (a lock per exit is a cost only a diagnostic run pays).
    places: Option<Mutex<HashMap<(&'static str, u64), u64>>>,
}

impl ExitStats {
    /// Counters that also count port and MMIO exits by address (`--stats`).
    pub fn with_places() -> Self {
        ExitStats {
            places: Some(Mutex::new(HashMap::new())),
            ..ExitStats::default()
        }
    }

    /// [`ExitStats::with_places`] when `places`, else plain counters.
    pub fn new(places: bool) -> Self {
        if places {
            Self::with_places()
        } else {
            Self::default()
        }
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn place(&self, kind: &'static str, address: u64) {
        if let Some(places) = &self.places {
            let mut places = places.lock().unwrap_or_else(|e| e.into_inner());
            *places.entry((kind, address)).or_default() += 1;
        }
    }

    /// The `top` places with the most exits, most first, as "kind@address=count"; None
    /// without places.
    pub fn places_summary(&self, top: usize) -> Option<String> {
        let places = self.places.as_ref()?;
        let places = places.lock().unwrap_or_else(|e| e.into_inner());
        let mut counted: Vec<_> = places.iter().map(|(k, v)| (*v, *k)).collect();
        counted.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let parts: Vec<String> = counted
            .iter()
            .take(top)
            .map(|(count, (kind, address))| format!("{kind}@{address:#x}={count}"))
            .collect();
        Some(parts.join(" "))
    }

    /// "reason=count" pairs, for `--stats` and the benchmarks.
    pub fn summary(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "io_in={} io_out={} mmio_read={} mmio_write={} interrupted={} other={}",
            get(&self.io_in),
            get(&self.io_out),
            get(&self.mmio_read),
            get(&self.mmio_write),
            get(&self.interrupted),
            get(&self.other)
        )
    }
}

/// The buses a vCPU dispatches exits to.
#[derive(Debug)]
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

/// Handles one exit. Accesses that hit no device read as all-ones and are otherwise ignored,
/// as on real hardware, so probing guests keep going.
pub fn handle_exit(exit: VcpuExit<'_>, buses: &Buses, stats: &ExitStats) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            ExitStats::bump(&stats.io_in);
            stats.place("io_in", u64::from(port));
            if !buses.pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            ExitStats::bump(&stats.io_out);
            stats.place("io_out", u64::from(port));
            buses.pio.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            ExitStats::bump(&stats.mmio_read);
            stats.place("mmio_read", addr);
            if !buses.mmio.read(addr, data) {
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            ExitStats::bump(&stats.mmio_write);
            stats.place("mmio_write", addr);
            buses.mmio.write(addr, data);
        }
        VcpuExit::Shutdown => return ExitAction::End(Outcome::TripleFault),
        VcpuExit::SystemEvent(kind, _) => {
            return ExitAction::End(match kind {
                SYSTEM_EVENT_SHUTDOWN => Outcome::PowerOff,
                SYSTEM_EVENT_RESET => Outcome::Reboot,
                SYSTEM_EVENT_CRASH => Outcome::Panic,
                other => Outcome::KvmFailure(format!("unknown system event {other}")),
            });
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return ExitAction::End(Outcome::KvmFailure(format!(
                "VM entry failed on host CPU {cpu}, hardware reason {reason:#x}"
            )));
        }
        // InternalError needs the vCPU's registers; the run loop reports it.
        VcpuExit::InternalError => {
            return ExitAction::End(Outcome::KvmFailure("internal error".to_string()));
        }
        VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr | VcpuExit::IoapicEoi(_) => {
            ExitStats::bump(&stats.other);
        }
        other => {
            return ExitAction::End(Outcome::KvmFailure(format!("unhandled exit {other:?}")));
        }
    }
    ExitAction::Continue
}

fn read_u32(regs: &[std::os::raw::c_char], offset: usize) -> u32 {
    let b = |i: usize| regs[offset + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn write_u32(regs: &mut [std::os::raw::c_char], offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *byte as std::os::raw::c_char;
    }
}

/// Sets an LVT entry's delivery mode (bits 10:8), keeping its other bits.
pub fn set_lvt_delivery_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let value = read_u32(regs, offset);
    write_u32(regs, offset, (value & !0x700) | (mode << 8));
}

/// The MSRs firmware would have set before handing over to a kernel.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
}

/// Configures vCPU `index` of `count` (paired into cores with `smt`); the boot vCPU (0) also
/// gets the kernel entry state.
pub fn configure(
    vcpu: &VcpuFd,
    index: u8,
    count: u8,
    smt: bool,
    supported_cpuid: &CpuId,
    boot: Option<BootEntry>,
) -> Result<(), Error> {
    let setup = |what| {
        move |source| Error::Setup {
            index,
            what,
            source,
        }
    };
    let mut cpuid = supported_cpuid.clone();
    cpuid::normalize(
        cpuid.as_mut_slice(),
        index,
        count,
        cpuid::threads_per_core(count, smt),
    );
    cpuid::fill_brand_string(cpuid.as_mut_slice(), cpuid::host_leaf);
    vcpu.set_cpuid2(&cpuid).map_err(setup("KVM_SET_CPUID2"))?;

    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).expect("a handful of MSRs fits a FamStructWrapper");
    let set = vcpu.set_msrs(&msrs).map_err(setup("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(Error::Msrs {
            index,
            set,
            wanted: entries.len(),
        });
    }

    let mut lapic = vcpu.get_lapic().map_err(setup("KVM_GET_LAPIC"))?;
    set_lvt_delivery_mode(&mut lapic.regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
    set_lvt_delivery_mode(&mut lapic.regs, APIC_LVT_LINT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(setup("KVM_SET_LAPIC"))?;

    if let Some(boot) = boot {
        vcpu.set_fpu(&regs::initial_fpu())
            .map_err(setup("KVM_SET_FPU"))?;
        let mut sregs = vcpu.get_sregs().map_err(setup("KVM_GET_SREGS"))?;
        regs::setup_sregs(&mut sregs, boot.mode);
        vcpu.set_sregs(&sregs).map_err(setup("KVM_SET_SREGS"))?;
        vcpu.set_regs(&regs::entry_regs(boot.mode, boot.entry.0))
            .map_err(setup("KVM_SET_REGS"))?;
    }
    Ok(())
}

/// Describes where the vCPU stopped: RIP and the instruction bytes there, for failure reports.
fn describe_position(vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> String {
    let Ok(regs) = vcpu.get_regs() else {
        return "registers unavailable".to_string();
    };
    let mut text = format!("RIP {:#x}", regs.rip);
    if let Ok(t) = vcpu.translate_gva(regs.rip) {
        if t.valid != 0 {
            let mut bytes = [0u8; 16];
            if mem
                .read_slice(&mut bytes, GuestAddress(t.physical_address))
                .is_ok()
            {
                let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                text.push_str(&format!(", instruction bytes {}", hex.join(" ")));
            }
        }
    }
    text
}

thread_local! {
    /// This thread's kvm_run page while its vCPU runs, for the kick signal's handler; null on
    /// every other thread. A `const` initializer: the handler must not run lazy initialization.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// What the kick signal's handler does: on a vCPU thread, set `immediate_exit`, so that a kick
/// landing after the thread looked at its flags and before it entered KVM_RUN still makes
/// KVM_RUN return at once (EINTR) instead of running the guest until its next exit.
/// Async-signal-safe: one thread-local read and one volatile store.
pub fn on_kick_signal() {
    let _ = KVM_RUN.try_with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's kvm_run mapping, set by `Vcpu::run` while it
            // owns the VcpuFd and cleared before the fd can drop; only this thread writes it.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// Clears `immediate_exit` after KVM_RUN returned, through the same pointer the handler uses.
fn clear_immediate_exit() {
    let _ = KVM_RUN.try_with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: as in `on_kick_signal`.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(0) };
        }
    });
}

/// Tells KVM the guest was stopped (KVM_KVMCLOCK_CTRL), so that the guest's watchdogs do not
/// count the paused time as a lockup. A guest without kvmclock gets EINVAL: nothing to tell.
fn tell_guest_stopped(vcpu: &VcpuFd, index: u8) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    match vcpu.kvmclock_ctrl() {
        Ok(()) => {}
        Err(e) if e.errno() == libc::EINVAL => {}
        Err(e) => {
            if !WARNED.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "vCPU {index}: KVM_KVMCLOCK_CTRL failed: {e}; the guest may report soft lockups after a pause"
                );
            }
        }
    }
}

/// Everything a vCPU thread owns.
pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    pub buses: Arc<Buses>,
    pub memory: GuestMemoryMmap,
    pub end: Arc<EndSignal>,
    pub stop: Arc<AtomicBool>,
    pub control: Arc<RunControl>,
    pub stats: Arc<ExitStats>,
    /// Print when the first vCPU enters the guest (--boot-timer).
    pub boot_timer: bool,
    /// KVM's MSR save list, for snapshots.
    pub msr_list: Arc<Vec<u32>>,
}

impl Vcpu {
    /// Runs until the guest ends the VM or the main thread asks to stop (then kicks this thread
    /// with a signal so KVM_RUN returns EINTR); parks while the main thread pauses the VM.
    pub fn run(mut self) {
        use crate::devices::boot_timer;
        if let Some(first) = boot_timer::record_first_run() {
            if self.boot_timer {
                boot_timer::print(&boot_timer::first_run_line(&first));
            }
        }
        let run: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|cell| cell.set(run));
        self.run_guest();
        KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
        self.control.leave();
        // The guest does not run again, but the thread stays until the main thread stops every
        // vCPU: its devices (the buses hold them) and its CPU time in --stats must outlive the
        // main loop's last look. The main thread's kick ends the wait early.
        while !self.stop.load(Ordering::Acquire) {
            std::thread::park_timeout(std::time::Duration::from_millis(20));
        }
    }

    /// The KVM_RUN loop, until the VM ends or the main thread stops it.
    fn run_guest(&mut self) {
        while !self.stop.load(Ordering::Acquire) {
            // Looked at before every entry, not only after exits: a pause asked for before
            // this thread published its kvm_run page got a kick that could not stop it.
            if self.control.pause_requested() {
                tell_guest_stopped(&self.fd, self.index);
                let (fd, index, msrs) = (&self.fd, self.index, &self.msr_list);
                self.control.park(&self.stop, &mut || {
                    (index, crate::snapshot::VcpuState::save(fd, index, msrs))
                });
                continue;
            }
            let result = self.fd.run();
            clear_immediate_exit();
            let action = match result {
                Ok(VcpuExit::InternalError) => {
                    let suberror = {
                        let run = self.fd.get_kvm_run();
                        // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so `internal` is
                        // the active member of the union.
                        unsafe { run.__bindgen_anon_1.internal.suberror }
                    };
                    let kind = match suberror {
                        1 => "emulation failure",
                        2 => "simultaneous exception",
                        3 => "delivery event failure",
                        _ => "internal error",
                    };
                    ExitAction::End(Outcome::KvmFailure(format!(
                        "vCPU {}: KVM_EXIT_INTERNAL_ERROR ({kind}, suberror {suberror}) at {}",
                        self.index,
                        describe_position(&self.fd, &self.memory)
                    )))
                }
                Ok(exit) => handle_exit(exit, &self.buses, &self.stats),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    ExitStats::bump(&self.stats.interrupted);
                    ExitAction::Continue
                }
                Err(e) => ExitAction::End(Outcome::KvmFailure(format!(
                    "vCPU {}: KVM_RUN failed: {e}",
                    self.index
                ))),
            };
            if let ExitAction::End(outcome) = action {
                self.end.end(outcome);
                break;
            }
            // A device (the ACPI power-off register, the i8042 reset) or another vCPU ended the
            // VM: the guest must not run on past its own power-off.
            if self.end.has_ended() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use std::sync::Mutex;

    struct Port(u8, Vec<u8>);

    impl BusDevice for Port {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(self.0);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.1.extend_from_slice(data);
        }
    }

    fn buses() -> (Buses, Arc<Mutex<Port>>) {
        let port = Arc::new(Mutex::new(Port(0x42, Vec::new())));
        let mut pio = Bus::new();
        pio.insert(0x3f8, 8, port.clone()).unwrap();
        let mut mmio = Bus::new();
        mmio.insert(0xd000_0000, 0x1000, port.clone()).unwrap();
        (Buses { pio, mmio }, port)
    }

    #[test]
    fn io_and_mmio_exits_reach_devices() {
        let (buses, port) = buses();
        let stats = ExitStats::default();
        let mut data = [0u8; 1];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x3f8, &mut data), &buses, &stats),
            ExitAction::Continue
        );
        assert_eq!(data, [0x42]);
        let mut data = [0u8; 2];
        handle_exit(VcpuExit::IoIn(0x60, &mut data), &buses, &stats);
        assert_eq!(data, [0xff, 0xff], "unclaimed port reads as all-ones");
        handle_exit(VcpuExit::IoOut(0x3f9, b"a"), &buses, &stats);
        handle_exit(VcpuExit::MmioWrite(0xd000_0010, b"bc"), &buses, &stats);
        let mut data = [0u8; 4];
        handle_exit(VcpuExit::MmioRead(0xd000_0000, &mut data), &buses, &stats);
        assert_eq!(data, [0x42; 4]);
        handle_exit(VcpuExit::MmioWrite(0xe000_0000, b"zz"), &buses, &stats);
        assert_eq!(port.lock().unwrap().1, b"abc");
        assert_eq!(
            stats.summary(),
            "io_in=2 io_out=1 mmio_read=1 mmio_write=2 interrupted=0 other=0"
        );
    }

    #[test]
    fn places_count_exits_by_kind_and_address_most_first() {
        let (buses, _) = buses();
        assert_eq!(ExitStats::default().places_summary(5), None);
        let stats = ExitStats::with_places();
        for _ in 0..3 {
            handle_exit(VcpuExit::IoOut(0x3f8, b"a"), &buses, &stats);
        }
        let mut data = [0u8; 1];
        handle_exit(VcpuExit::IoIn(0x3f8, &mut data), &buses, &stats);
        handle_exit(VcpuExit::IoIn(0x3f8, &mut data), &buses, &stats);
        handle_exit(VcpuExit::MmioWrite(0xd000_0010, b"b"), &buses, &stats);
        assert_eq!(
            stats.places_summary(5).unwrap(),
            "io_out@0x3f8=3 io_in@0x3f8=2 mmio_write@0xd0000010=1"
        );
        assert_eq!(stats.places_summary(1).unwrap(), "io_out@0x3f8=3");
    }

    #[test]
    fn guest_endings() {
        let (buses, _) = buses();
        let stats = ExitStats::default();
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, &buses, &stats),
            ExitAction::End(Outcome::TripleFault)
        );
        assert_eq!(
            handle_exit(
                VcpuExit::SystemEvent(SYSTEM_EVENT_SHUTDOWN, &[]),
                &buses,
                &stats
            ),
            ExitAction::End(Outcome::PowerOff)
        );
        assert_eq!(
            handle_exit(
                VcpuExit::SystemEvent(SYSTEM_EVENT_CRASH, &[]),
                &buses,
                &stats
            ),
            ExitAction::End(Outcome::Panic)
        );
        assert!(matches!(
            handle_exit(VcpuExit::FailEntry(0x21, 1), &buses, &stats),
            ExitAction::End(Outcome::KvmFailure(m)) if m.contains("0x21")
        ));
        assert_eq!(
            handle_exit(VcpuExit::Hlt, &buses, &stats),
            ExitAction::Continue
        );
        assert!(matches!(
            handle_exit(VcpuExit::Unknown, &buses, &stats),
            ExitAction::End(_)
        ));
    }

    #[test]
    fn lvt_modes_keep_other_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        write_u32(&mut regs, APIC_LVT_LINT0, 0x0001_0000); // masked
        set_lvt_delivery_mode(&mut regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
        assert_eq!(read_u32(&regs, APIC_LVT_LINT0), 0x0001_0700);
        set_lvt_delivery_mode(&mut regs, APIC_LVT_LINT1, APIC_MODE_NMI);
        assert_eq!(read_u32(&regs, APIC_LVT_LINT1), 0x400);
    }

    #[test]
    fn boot_msrs_enable_mtrrs_and_fast_strings() {
        let msrs = boot_msrs();
        let get = |i| msrs.iter().find(|e| e.index == i).unwrap().data;
        assert_eq!(get(MSR_MTRR_DEF_TYPE), MTRR_ENABLE_WRITEBACK);
        assert_eq!(get(MSR_IA32_MISC_ENABLE) & 1, 1);
    }
}

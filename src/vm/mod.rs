//! Building and running a VM. [`Vm::build`] is the recipe, one step per line in the order the
//! architecture fixes: memory -> irqchip/PIT -> legacy devices -> virtio devices -> boot loader
//! -> vCPUs. [`Vm::run`] starts the vCPUs, runs the main loop until the guest ends and tears
//! everything down again.

mod boot_files;
mod control;
mod error;
mod main_loop;
mod parts;
mod pause;
mod snapshot;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use self::main_loop::{InputSink, StopSignals, kick_signal, main_loop, metrics_timer};
pub use self::pause::{Pauser, RunControl};
pub use self::snapshot::{
    MemSource, RestoreSpec, Restored, SnapshotSource, restore, restore_described,
};
use crate::boot::{self, BootEntry, acpi};
use crate::bus::Bus;
use crate::config::{ConsoleKind, Transport, VmConfig};
use crate::devices::IrqTrigger;
use crate::devices::boot_timer::{BOOT_TIMER_PORT, BootTimer, phase};
use crate::devices::console_socket::{self, ConsoleSocket};
use crate::devices::exit_port::{EXIT_PORT, ExitPort};
use crate::devices::i8042::{self, I8042};
use crate::devices::legacy::SerialDevice;
use crate::devices::power::{AcpiPower, PvPanic};
use crate::exit::{EndSignal, Outcome, error_chain};
use crate::memory::VmMemory;
use crate::metrics::{self, NetSource, Sources};
use crate::seccomp::{self, ThreadKind};
use crate::terminal::RawMode;
use crate::vcpu::{self, Buses, ExitStats, Vcpu};
use crate::virtio_devices::{self, Attached, DeviceLimiters, PausableDevice};
use crate::{kvm_host, layout, logger};
use pvm_virtio::{ConsoleInput, NetCounters};

pub use self::boot_files::{BootFiles, boot_files};
pub use self::control::{ControlError, ControlPlane, CtrlAltDel, RunningVm};
pub use self::error::Error;
use self::error::{io_err, kvm_err};
use self::parts::{Consoles, lock, msr_list};

/// KVM needs three pages for the TSS and one for the identity map (Intel); both in the MMIO gap.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// What pvm puts on the kernel command line before the user's part: reboot through the i8042
/// reset line (which ends the VM; the kernel's reboot code writes the port itself, no driver
/// needed), and i8042 probing kept short: no mouse port, no multiplexer, and no keyboard
/// commands at boot (`dumbkbd`: atkbd takes the keyboard as it is; keys still arrive, which is
/// what Ctrl-Alt-Del needs). The DSDT describes the controller (PNP0303 with IRQ 1) and the
/// FADT claims it, so the driver takes it from ACPI, and pvm's controller answers each command
/// at once. (A controller that answered nothing cost 500 ms of busy-waiting and 10,000 exits
/// per boot: "i8042: Can't read CTR while initializing i8042".)
const BASE_CMDLINE: &str = "reboot=k i8042.noaux i8042.nomux i8042.dumbkbd";
/// The UART is the console, or only the early console before hvc0 takes over.
const SERIAL_CONSOLE: &str = "console=ttyS0";
const VIRTIO_CONSOLE: &str = "earlycon=uart8250,io,0x3f8 console=hvc0";

/// Builds the VM described by `config` and runs it until the guest ends.
pub fn run(config: VmConfig) -> Result<Outcome, Error> {
    build(&config)?.run()
}

/// Opens the boot files and KVM, and builds the VM described by `config`.
pub fn build(config: &VmConfig) -> Result<Vm, Error> {
    phase("configuration read");
    let boot_files = boot_files(config)?;
    phase("boot files opened");
    let (kvm, _flavour) = kvm_host::open()?;
    phase("/dev/kvm opened");
    Vm::build(&kvm, config, boot_files)
}

/// A built VM, ready to run.
pub struct Vm {
    vcpus: Vec<Vcpu>,
    serial: Arc<Mutex<SerialDevice>>,
    /// The keyboard controller, which a control plane types Ctrl-Alt-Del into.
    i8042: Arc<Mutex<I8042>>,
    console_input: Option<ConsoleInput>,
    /// The counters metrics and --stats read (exits, disks, taps).
    counters: Arc<Sources>,
    print_stats: bool,
    seccomp: bool,
    /// vhost-user sockets the vCPU threads (activation, reset) and the main thread (pause,
    /// resume) may send and receive messages on.
    vhost_user_sockets: Vec<i32>,
    /// Every virtio transport, for pausing the VM.
    pausable: Vec<PausableDevice>,
    /// The devices' rate limiters, for a control plane that changes them.
    limiters: DeviceLimiters,
    end: Arc<EndSignal>,
    stop: Arc<AtomicBool>,
    control: Arc<RunControl>,
    /// `--console socket`: served from its own thread once the VM runs; the terminal is
    /// then left alone.
    console_socket: Option<ConsoleSocket>,
    /// What the VM was built from, for a snapshot's description.
    config: VmConfig,
    /// The buses (also the vCPUs'), for a snapshot's PCI address latch.
    buses: Arc<Buses>,
    /// Restored from a snapshot: the vCPUs and devices start paused; `Some(true)` resumes
    /// them at once.
    restored: Option<bool>,
    /// The VM fd and guest RAM, last so that it drops last; `run` drops it only after the
    /// vCPU threads are joined. Dropping it deletes the RAM's slots.
    memory: VmMemory,
}

/// The platform devices on the port I/O bus, and the UART, which also takes host input.
struct LegacyDevices {
    pio: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
}

/// What every vCPU shares with the rest of the VM.
struct VcpuShared {
    buses: Arc<Buses>,
    end: Arc<EndSignal>,
    stop: Arc<AtomicBool>,
    control: Arc<RunControl>,
    stats: Arc<ExitStats>,
}

impl Vm {
    pub fn build(kvm: &Kvm, config: &VmConfig, boot_files: BootFiles) -> Result<Vm, Error> {
        prepare_sandbox(config);
        // First: the UART and virtio-console made below write to its ring.
        let console_socket = bind_console_socket(config)?;
        let memory = create_memory(create_vm(kvm)?, config)?;
        phase("VM created, memory mapped and registered");
        let (vm_fd, guest_memory) = (memory.vm_fd(), memory.guest_memory());
        create_irqchip(vm_fd)?;
        let end = Arc::new(EndSignal::new().map_err(io_err("eventfd"))?);
        let LegacyDevices {
            mut pio,
            serial,
            i8042,
        } = legacy_devices(vm_fd, config, &end, None)?;
        phase("irqchip, PIT and legacy devices made");
        let mut mmio = Bus::new();
        let attached = virtio_devices::attach(config, vm_fd, guest_memory, &mut pio, &mut mmio)?;
        crate::snapshot::dirty::follow_vhost(memory.dirty_tracking(), &attached);
        phase("virtio devices attached");
        let entry = load_guest(guest_memory, config, &attached, boot_files)?;
        phase("kernel, initrd and boot data loaded");
        let shared = VcpuShared {
            buses: Arc::new(Buses { pio, mmio }),
            end,
            stop: Arc::new(AtomicBool::new(false)),
            control: Arc::new(RunControl::default()),
            stats: Arc::new(ExitStats::new(config.stats)),
        };
        let vcpus = create_vcpus(kvm, &memory, config, entry, &shared)?;
        phase("vCPUs created");
        Ok(Vm::assemble(
            config,
            vcpus,
            Consoles {
                serial,
                i8042,
                socket: console_socket,
            },
            attached,
            shared,
            memory,
            None,
        ))
    }

    /// The devices' rate limiters (shared with their workers), to change limits while the VM
    /// runs.
    pub fn rate_limiters(&self) -> DeviceLimiters {
        self.limiters.clone()
    }

    /// Runs the vCPUs and the main loop (stdin to the UART, stop signals) until the VM ends.
    pub fn run(self) -> Result<Outcome, Error> {
        self.run_with(None)
    }

    /// [`Vm::run`], serving `control` from the main loop as well.
    pub fn run_with(self, control: Option<&mut dyn ControlPlane>) -> Result<Outcome, Error> {
        self.run_started(control, || {})
    }

    /// [`Vm::run_with`], calling `started` on the main thread once the vCPU threads run and
    /// before its sandbox goes in: for unsandboxed work the guest's first instruction need not
    /// wait for (the socket-cleanup helper).
    pub fn run_started(
        self,
        control: Option<&mut dyn ControlPlane>,
        started: impl FnOnce(),
    ) -> Result<Outcome, Error> {
        let signals = StopSignals::install()?;
        metrics::register(self.counters.clone());
        let timer = metrics_timer()?;
        let sandbox = self.seccomp.then_some(self.vhost_user_sockets.as_slice());
        if self.restored.is_some() {
            // A restored VM's devices are paused: its vCPUs park before their first entry.
            self.control.request_pause();
        }
        let sink = match self.console_input {
            Some(input) => InputSink::Virtio(input),
            None => InputSink::Serial(self.serial.clone()),
        };
        // With the console on a socket the terminal is not touched: no raw mode, no stdin.
        let terminal = self.console_socket.is_none();
        if let Some(socket) = self.console_socket {
            let input = sink.clone();
            socket.spawn(Box::new(move |bytes| input.offer(bytes)), self.seccomp)?;
        }
        let raw = if terminal {
            Some(RawMode::enter().map_err(io_err("putting the terminal in raw mode"))?)
        } else {
            None
        };
        phase("main thread ready to start the vCPUs");
        let (threads, spawned) = spawn_vcpus(self.vcpus, sandbox);
        let mut pauser = Pauser::new(self.control.clone(), &threads, &self.pausable);
        let serial = self.serial.clone();
        pauser.set_snapshot_source(SnapshotSource {
            vm: self.memory.vm_fd(),
            memory: self.memory.guest_memory(),
            serial: &serial,
            buses: &self.buses,
            config: &self.config,
            dirty: self.memory.dirty_tracking(),
        });
        if self.restored.is_some() {
            pauser.mark_paused();
        }
        let loop_result = spawned
            .map(|()| started())
            .and_then(|()| sandbox_main_thread(sandbox, self.print_stats))
            .and_then(|()| {
                if self.restored == Some(true) {
                    pauser.handle(pause::VmRequest::Resume);
                }
                // The first line marks the start, as Firecracker's does.
                metrics::flush_or_log();
                let input = terminal.then_some(&sink);
                main_loop(
                    input,
                    &self.end,
                    &self.i8042,
                    &signals,
                    &mut pauser,
                    timer,
                    control,
                    self.memory.page_server(),
                )
            });
        let pauses = pauser.summary();
        // Read while every thread still lives: after the join the vCPUs' share is gone.
        let thread_cpu = if self.print_stats {
            thread_cpu_ms()
        } else {
            Vec::new()
        };
        // Whatever happened, stop and join every vCPU before the terminal is restored.
        stop_vcpus(&self.stop, &self.control, threads);
        // Every exit is counted now: the last line has the run's end.
        metrics::flush_or_log();
        // No vCPU runs any more: the RAM's slots can go (the devices keep their own mappings).
        drop(self.memory);
        let signo = signals.received();
        drop(signals);
        let _ = std::io::stdout().flush();
        drop(raw);
        if self.print_stats {
            // Not eprintln!, which panics when stderr is a pipe whose reader has gone.
            logger::to_stderr(&stats_report(&self.counters, &thread_cpu));
            logger::to_stderr(&format!("pvm: vm: {pauses}\n"));
        } else {
            log::info!("exits: {}", self.counters.exits.summary());
            log::info!("vm: {pauses}");
        }
        loop_result?;
        Ok(self.end.outcome().unwrap_or(Outcome::Signal(signo)))
    }
}

/// With the sandbox on, readies the allocator for it and makes every device thread spawned
/// from now on (with its device, below) install its filter before it takes any work.
fn prepare_sandbox(config: &VmConfig) {
    if config.seccomp {
        seccomp::prepare_allocator();
        pvm_virtio::thread::set_thread_init(seccomp::install_device_filter);
    }
}

/// The KVM VM with the TSS and identity-map pages KVM needs placed in the MMIO gap.
fn create_vm(kvm: &Kvm) -> Result<VmFd, Error> {
    let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm_fd
        .set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm_fd
        .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    Ok(vm_fd)
}

/// Guest RAM, registered with KVM, owned together with the VM fd.
fn create_memory(vm_fd: VmFd, config: &VmConfig) -> Result<VmMemory, Error> {
    // vhost-user backends map guest RAM themselves: it must be shareable.
    let shared = !config.vhost_user_disks.is_empty() || !config.vhost_user_nets.is_empty();
    let mut memory = VmMemory::new(Arc::new(vm_fd), config.mem_bytes, shared, config.huge_pages)?;
    if config.track_dirty_pages {
        memory.track_dirty_pages(None)?;
    }
    Ok(memory)
}

/// `--console socket`'s listener, bound before anything writes to the console's ring.
fn bind_console_socket(config: &VmConfig) -> Result<Option<ConsoleSocket>, Error> {
    Ok(match &config.console_socket {
        Some(socket) => Some(console_socket::bind(&socket.path, socket.in_run_dir)?),
        None => None,
    })
}

/// KVM's in-kernel PIC/IOAPIC/LAPICs and PIT (whose speaker port stays a dummy).
fn create_irqchip(vm_fd: &VmFd) -> Result<(), Error> {
    vm_fd
        .create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(())
}

/// The UART (on its IRQ's irqfd; as `serial_state` left it, for a restore), the i8042 whose
/// reset line ends the VM, ACPI power-off, pvpanic and, with --boot-timer, the boot timer port.
fn legacy_devices(
    vm_fd: &VmFd,
    config: &VmConfig,
    end: &Arc<EndSignal>,
    serial_state: Option<&vm_superio::serial::SerialState>,
) -> Result<LegacyDevices, Error> {
    let mut pio = Bus::new();
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
    vm_fd
        .register_irqfd(&serial_irq, layout::SERIAL_IRQ)
        .map_err(kvm_err("KVM_IRQFD (serial)"))?;
    let out = console_socket::serial_output(config.serial_out.as_deref())?;
    let serial = match serial_state {
        None => SerialDevice::new(IrqTrigger(serial_irq), out),
        Some(state) => SerialDevice::from_state(state, IrqTrigger(serial_irq), out)
            .map_err(|e| crate::snapshot::RestoreError::Serial(format!("{e:?}")))?,
    };
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(u64::from(layout::SERIAL_PORT), 8, serial.clone())?;
    let keyboard_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
    vm_fd
        .register_irqfd(&keyboard_irq, i8042::KEYBOARD_IRQ)
        .map_err(kvm_err("KVM_IRQFD (i8042)"))?;
    let i8042 = Arc::new(Mutex::new(I8042::new(
        end.clone(),
        IrqTrigger(keyboard_irq),
    )));
    pio.insert(u64::from(layout::I8042_PORT), 5, i8042.clone())?;
    pio.insert(
        u64::from(layout::ACPI_SLEEP_CONTROL_PORT),
        2,
        Arc::new(Mutex::new(AcpiPower(end.clone()))),
    )?;
    pio.insert(
        u64::from(layout::PVPANIC_PORT),
        1,
        Arc::new(Mutex::new(PvPanic(end.clone()))),
    )?;
    if config.exit_port {
        pio.insert(
            u64::from(EXIT_PORT),
            1,
            Arc::new(Mutex::new(ExitPort(end.clone()))),
        )?;
    }
    if config.boot_timer {
        pio.insert(
            u64::from(BOOT_TIMER_PORT),
            1,
            Arc::new(Mutex::new(BootTimer::default())),
        )?;
    }
    Ok(LegacyDevices { pio, serial, i8042 })
}

/// Writes the ACPI tables, the command line, the kernel and the initrd into guest memory;
/// returns where the boot vCPU starts.
fn load_guest(
    guest_memory: &GuestMemoryMmap,
    config: &VmConfig,
    attached: &Attached,
    mut boot_files: BootFiles,
) -> Result<BootEntry, Error> {
    let rsdp = acpi::write(guest_memory, config.cpus, &attached.aml)?;
    let cmdline = boot::build_cmdline(
        &pvm_cmdline(config, attached, boot_files.root.as_deref()),
        &config.cmdline,
    )?;
    let kernel = boot_files.kernel.1.clone();
    let entry = boot::load(
        guest_memory,
        (&mut boot_files.kernel.0, &kernel),
        boot_files
            .initrd
            .as_mut()
            .map(|(file, path)| (file, path.as_path())),
        &cmdline,
        config.mem_bytes,
        rsdp,
    )?;
    log::info!(
        "kernel {} entered via {:?} at {:#x}",
        kernel.display(),
        entry.mode,
        entry.entry.0
    );
    Ok(entry)
}

/// The vCPUs, configured (CPUID, MSRs, LAPIC); vCPU 0 starts at `entry`.
fn create_vcpus(
    kvm: &Kvm,
    memory: &VmMemory,
    config: &VmConfig,
    entry: BootEntry,
    shared: &VcpuShared,
) -> Result<Vec<Vcpu>, Error> {
    let supported: CpuId = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let msr_list = msr_list(kvm)?;
    let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
    for index in 0..config.cpus {
        let fd = memory
            .vm_fd()
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        vcpu::configure(
            &fd,
            index,
            config.cpus,
            config.smt,
            &supported,
            (index == 0).then_some(entry),
        )?;
        vcpus.push(shared.vcpu(index, fd, memory.guest_memory(), config, &msr_list));
    }
    Ok(vcpus)
}

/// Starts a thread per vCPU; with `sandbox` (the vhost-user sockets the vCPUs may use) each
/// installs its filter first. Returns the threads started, and the error that stopped the rest.
fn spawn_vcpus(
    vcpus: Vec<Vcpu>,
    sandbox: Option<&[i32]>,
) -> (Vec<JoinHandle<()>>, Result<(), Error>) {
    let mut threads = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        let index = vcpu.index;
        let sockets = sandbox.map(<[i32]>::to_vec);
        let spawned = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                if let Some(sockets) = sockets {
                    if let Err(e) = seccomp::install_with(ThreadKind::Vcpu, false, &sockets) {
                        vcpu.end.end(Outcome::VmmFailure(error_chain(&e)));
                        vcpu.control.leave();
                        return;
                    }
                }
                phase(&format!("vCPU {index} thread ready for KVM_RUN"));
                vcpu.run()
            });
        match spawned {
            Ok(handle) => threads.push(handle),
            Err(source) => return (threads, Err(Error::Spawn { index, source })),
        }
    }
    (threads, Ok(()))
}

/// Confines the main thread, once every other thread runs; `sandbox` holds the vhost-user
/// sockets it may message (pausing and resuming those devices).
fn sandbox_main_thread(sandbox: Option<&[i32]>, print_stats: bool) -> Result<(), Error> {
    if let Some(sockets) = sandbox {
        seccomp::install_with(ThreadKind::Main, print_stats, sockets)?;
    }
    Ok(())
}

/// Tells every vCPU to stop (waking the parked ones of a paused VM), kicks each out of KVM_RUN
/// until its thread ends, and joins it.
fn stop_vcpus(stop: &AtomicBool, control: &RunControl, threads: Vec<JoinHandle<()>>) {
    stop.store(true, Ordering::Release);
    control.release();
    for handle in threads {
        while !handle.is_finished() {
            let _ = handle.kill(kick_signal());
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = handle.join();
    }
}

/// The --stats report, from the counters metrics read too: exits by reason, each tap's
/// counters (and each pair's, with several; the kernel's for a vhost-net tap), each disk's
/// host I/O errors and the CPU time of each thread.
fn stats_report(counters: &Sources, thread_cpu: &[(String, u64)]) -> String {
    let mut stats = format!("pvm: exits: {}\n", counters.exits.summary());
    if let Some(places) = counters.exits.places_summary(12) {
        stats.push_str(&format!("pvm: exits by place, most first: {places}\n"));
    }
    for (tap, source) in &counters.nets {
        let pairs = match source {
            NetSource::InProcess(pairs) => pairs,
            NetSource::Kernel(kernel) => {
                stats.push_str(&format!(
                    "pvm: tap {tap}: {} (the tap's kernel counters: vhost-net moves its frames)\n",
                    kernel_summary(&kernel.fields())
                ));
                continue;
            }
        };
        let total = NetCounters::total(pairs);
        stats.push_str(&format!("pvm: tap {tap}: {}\n", total.summary()));
        if pairs.len() > 1 {
            for (pair, counters) in pairs.iter().enumerate() {
                stats.push_str(&format!(
                    "pvm: tap {tap} pair {pair}: {}\n",
                    counters.summary()
                ));
            }
        }
    }
    for (_, disk, errors) in &counters.disks {
        stats.push_str(&format!("pvm: disk {disk}: io_errors={}\n", errors.count()));
    }
    let cpu: Vec<String> = thread_cpu
        .iter()
        .map(|(name, ms)| format!("{name}={ms}"))
        .collect();
    stats.push_str(&format!("pvm: cpu ms by thread: {}\n", cpu.join(" ")));
    stats
}

/// A vhost-net tap's kernel counts under the names of the in-process summary; a count that
/// could not be read is left out.
fn kernel_summary(fields: &[metrics::Field]) -> String {
    const NAMES: [(&str, &str); 4] = [
        ("tx_packets_count", "tx_frames"),
        ("tx_bytes_count", "tx_bytes"),
        ("rx_packets_count", "rx_frames"),
        ("rx_bytes_count", "rx_bytes"),
    ];
    let parts: Vec<String> = NAMES
        .iter()
        .filter_map(|&(field, name)| {
            let value = fields.iter().find(|f| f.0 == field)?.1;
            Some(format!("{name}={value}"))
        })
        .collect();
    parts.join(" ")
}

/// CPU time (user + system, ms) of each of this process's threads, by thread name; threads
/// with the same name are summed. vCPU threads' time includes the guest's own execution.
fn thread_cpu_ms() -> Vec<(String, u64)> {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .unwrap_or(100)
        .max(1);
    let mut totals: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // "tid (comm) state ..." with utime and stime the 12th and 13th fields after comm.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let tick = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        *totals.entry(name).or_default() += (tick(11) + tick(12)) * 1000 / ticks;
    }
    totals.into_iter().collect()
}

/// pvm's part of the kernel command line for `config`.
fn pvm_cmdline(config: &VmConfig, attached: &Attached, root: Option<&str>) -> String {
    let console = match config.console {
        ConsoleKind::Serial => SERIAL_CONSOLE,
        ConsoleKind::Virtio => VIRTIO_CONSOLE,
    };
    let mut cmdline = format!("{console} {BASE_CMDLINE}");
    if let Some(root) = root {
        cmdline.push_str(&format!(" root={root} rw"));
    }
    // On mmio the VM has no PCI bus: without this the guest probes port 0xcf8 for one anyway,
    // about 230 exits of a boot's 550 (`--stats`), as Firecracker's guests are also told.
    if config.transport == Transport::Mmio {
        cmdline.push_str(" pci=off");
    }
    // virtio-mmio devices are described in ACPI; a guest told to ignore ACPI needs them here.
    // (Both at once would make a kernel with cmdline devices probe every device twice.)
    if config
        .cmdline
        .split_whitespace()
        .any(|word| word == "acpi=off")
    {
        for device in &attached.cmdline {
            cmdline.push(' ');
            cmdline.push_str(device);
        }
    }
    cmdline
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmio_guests_are_told_there_is_no_pci_bus() {
        // Any existing file: the command line is parsed, no kernel is read.
        let kernel = "/proc/self/exe";
        let args = |transport: &str| {
            ["pvm", "--kernel", kernel, "--transport", transport].map(std::ffi::OsString::from)
        };
        let mmio = crate::cli::parse(args("mmio")).expect("mmio config");
        let pci = crate::cli::parse(args("pci")).expect("pci config");
        let attached = Attached::default();
        let words = |config| {
            pvm_cmdline(config, &attached, None)
                .split_whitespace()
                .any(|w| w == "pci=off")
        };
        assert!(words(&mmio));
        assert!(!words(&pci));
    }

    #[test]
    fn stats_report_lists_pairs_only_for_multiqueue_taps() {
        let exits = ExitStats::default();
        exits.io_out.store(3, Ordering::Relaxed);
        let one = vec![Arc::new(NetCounters::default())];
        let two = vec![
            Arc::new(NetCounters::default()),
            Arc::new(NetCounters::default()),
        ];
        let counters = Sources {
            exits: Arc::new(exits),
            disks: Vec::new(),
            nets: vec![
                ("tap0".to_string(), NetSource::InProcess(one)),
                ("tap1".to_string(), NetSource::InProcess(two)),
            ],
            seccomp: true,
            balloon: None,
        };
        let report = stats_report(
            &counters,
            &[("vcpu0".to_string(), 12), ("pvm".to_string(), 3)],
        );
        let lines: Vec<&str> = report.lines().collect();
        assert_eq!(lines.len(), 6, "{report}");
        assert!(
            lines[0].starts_with("pvm: exits: io_in=0 io_out=3 "),
            "{report}"
        );
        assert!(lines[1].starts_with("pvm: tap tap0: "), "{report}");
        assert!(lines[2].starts_with("pvm: tap tap1: "), "{report}");
        assert!(lines[3].starts_with("pvm: tap tap1 pair 0: "), "{report}");
        assert!(lines[4].starts_with("pvm: tap tap1 pair 1: "), "{report}");
        assert_eq!(lines[5], "pvm: cpu ms by thread: vcpu0=12 pvm=3");
        assert_eq!(
            kernel_summary(&[("rx_bytes_count", 9), ("tx_packets_count", 2)]),
            "tx_frames=2 rx_bytes=9"
        );
    }
}

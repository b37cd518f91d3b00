//! Building and running a VM, in the order the architecture fixes: KVM VM -> irqchip/PIT ->
//! memory -> platform devices -> ACPI -> kernel -> vCPUs -> the main event loop.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VmFd};
use vm_superio::I8042Device;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{Killable, register_signal_handler};

use crate::boot::{self, acpi};
use crate::bus::{self, Bus};
use crate::config::{ConsoleKind, VmConfig};
use crate::devices::IrqTrigger;
use crate::devices::boot_timer::{BOOT_TIMER_PORT, BootTimer};
use crate::devices::legacy::{I8042, ResetLine, SerialDevice};
use crate::devices::power::{AcpiPower, PvPanic};
use crate::exit::{EndSignal, Outcome};
use crate::seccomp::{self, ThreadKind};
use crate::terminal::RawMode;
use crate::vcpu::{self, Buses, ExitStats, Vcpu};
use crate::virtio_devices::{self, Attached};
use crate::{kvm_host, layout, logger, memory};
use pvm_virtio::{ConsoleInput, DiskErrors, NetCounters};

/// KVM needs three pages for the TSS and one for the identity map (Intel); both in the MMIO gap.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// What pvm puts on the kernel command line before the user's part: reboot through the i8042
/// reset line (which ends the VM; the kernel's reboot code writes the port itself, no driver
/// needed), and i8042 probing kept short. The i8042 driver is left to ask ACPI (PNP) whether a
/// PS/2 controller exists: pvm's FADT does not claim one (IAPC_BOOT_ARCH bit 1 clear), so a
/// kernel with PNPACPI skips the driver at once. With `i8042.nopnp` it probed the ports
/// directly and, the controller answering no commands, busy-waited 500 ms for the CTR read:
/// 10,000 status-port exits on every boot ("i8042: Can't read CTR while initializing i8042").
const BASE_CMDLINE: &str = "reboot=k i8042.noaux i8042.nomux i8042.dumbkbd";
/// The UART is the console, or only the early console before hvc0 takes over.
const SERIAL_CONSOLE: &str = "console=ttyS0";
const VIRTIO_CONSOLE: &str = "earlycon=uart8250,io,0x3f8 console=hvc0";
/// Ctrl-A starts a console escape; Ctrl-A x quits, Ctrl-A Ctrl-A sends one Ctrl-A.
const ESCAPE: u8 = 0x01;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Host(#[from] kvm_host::Error),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Bus(#[from] bus::Error),
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    #[error("no --kernel given and no --disk to boot a kernel from")]
    NoKernel,
    #[error(transparent)]
    DiskBoot(#[from] boot::disk::Error),
    #[error(transparent)]
    Virtio(#[from] virtio_devices::Error),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("seccomp: {0}")]
    Sandbox(String),
    #[error("cannot start the thread for vCPU {index}: {source}")]
    Spawn { index: u8, source: std::io::Error },
}

impl Error {
    /// True when the user's input (a flag or a file it names) is at fault, not pvm or KVM.
    pub fn is_usage(&self) -> bool {
        use boot::Error as B;
        match self {
            Error::NoKernel
            | Error::DiskBoot(_)
            | Error::Virtio(virtio_devices::Error::Device(_)) => true,
            Error::Boot(e) => matches!(
                e,
                B::OpenKernel { .. }
                    | B::UnknownKernelFormat(_)
                    | B::LoadKernel { .. }
                    | B::OpenInitrd { .. }
                    | B::InitrdTooLarge { .. }
                    | B::Cmdline { .. }
            ),
            _ => false,
        }
    }
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// The signal that ended the run (SIGINT/SIGTERM/SIGHUP), and the eventfd its handler pokes.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);
static STOP_EVENT_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_stop_signal(signo: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP_SIGNAL.store(signo, Ordering::SeqCst);
    let fd = STOP_EVENT_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) on an eventfd is async-signal-safe; the buffer is a live u64.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Kicks a vCPU out of KVM_RUN; the handler itself has nothing to do.
extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

/// The kernel (and initrd) to boot, opened, with the names messages use for them.
#[derive(Debug)]
pub struct BootFiles {
    pub kernel: (File, PathBuf),
    pub initrd: Option<(File, PathBuf)>,
    /// root= for a kernel found on the first disk.
    pub root: Option<String>,
}

/// A file in memory (memfd) holding `bytes`.
fn memory_file(name: &str, bytes: &[u8]) -> std::io::Result<File> {
    let cname = std::ffi::CString::new(name).unwrap_or_default();
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(bytes)?;
    Ok(file)
}

/// Opens --kernel/--initrd, or finds the guest's own kernel on the first --disk.
pub fn boot_files(config: &VmConfig) -> Result<BootFiles, Error> {
    if let Some(kernel) = &config.kernel {
        boot::probe_kernel(kernel)?;
        let open = |path: &PathBuf, flag: bool| {
            File::open(path).map_err(|source| match flag {
                true => Error::Boot(boot::Error::OpenKernel {
                    path: path.clone(),
                    source,
                }),
                false => Error::Boot(boot::Error::OpenInitrd {
                    path: path.clone(),
                    source,
                }),
            })
        };
        let initrd = match &config.initrd {
            Some(path) => Some((open(path, false)?, path.clone())),
            None => None,
        };
        return Ok(BootFiles {
            kernel: (open(kernel, true)?, kernel.clone()),
            initrd,
            root: None,
        });
    }
    let disk = config.disks.first().ok_or(Error::NoKernel)?;
    let found = boot::disk::find_kernel(&disk.path)?;
    let name = |inner: &str| PathBuf::from(format!("{}:{inner}", disk.path.display()));
    let io = io_err("keeping the disk's kernel in memory");
    let kernel = (
        memory_file("kernel", &found.kernel).map_err(&io)?,
        name(&found.kernel_name),
    );
    let initrd = match (&config.initrd, &found.initrd) {
        (Some(path), _) => Some((
            File::open(path).map_err(|source| {
                Error::Boot(boot::Error::OpenInitrd {
                    path: path.clone(),
                    source,
                })
            })?,
            path.clone(),
        )),
        (None, Some((initrd_name, bytes))) => Some((
            memory_file("initrd", bytes).map_err(&io)?,
            name(initrd_name),
        )),
        (None, None) => None,
    };
    let root = found.root_device();
    logger::to_stderr(&format!(
        "pvm: booting {} (initrd: {}), root={root}\n",
        kernel.1.display(),
        initrd
            .as_ref()
            .map(|i| i.1.display().to_string())
            .unwrap_or_else(|| "none".to_string())
    ));
    Ok(BootFiles {
        kernel,
        initrd,
        root: Some(root),
    })
}

/// Builds the VM described by `config` and runs it until the guest ends.
pub fn run(config: VmConfig) -> Result<Outcome, Error> {
    let boot_files = boot_files(&config)?;
    let (kvm, _flavour) = kvm_host::open()?;
    let vm = Vm::build(&kvm, &config, boot_files)?;
    vm.run()
}

/// A built VM, ready to run.
pub struct Vm {
    _vm_fd: Arc<VmFd>,
    vcpus: Vec<Vcpu>,
    serial: Arc<Mutex<SerialDevice>>,
    console_input: Option<ConsoleInput>,
    net_counters: Vec<(String, Vec<Arc<NetCounters>>)>,
    disk_errors: Vec<(String, Arc<DiskErrors>)>,
    print_stats: bool,
    seccomp: bool,
    /// vhost-user sockets the vCPU threads may send and receive messages on.
    vhost_user_sockets: Vec<i32>,
    end: Arc<EndSignal>,
    stop: Arc<AtomicBool>,
    stats: Arc<ExitStats>,
}

impl Vm {
    pub fn build(kvm: &Kvm, config: &VmConfig, mut boot_files: BootFiles) -> Result<Vm, Error> {
        if config.seccomp {
            seccomp::prepare_allocator();
            // Device threads are spawned with their devices below; each confines itself first.
            pvm_virtio::thread::set_thread_init(seccomp::install_device_filter);
        }
        let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        // vhost-user backends map guest RAM themselves: it must be shareable.
        let shared = !config.vhost_user_disks.is_empty() || !config.vhost_user_nets.is_empty();
        let guest_memory = memory::create(config.mem_bytes, shared)?;
        memory::register(&vm_fd, &guest_memory)?;

        let end = Arc::new(EndSignal::new().map_err(io_err("eventfd"))?);
        let mut pio = Bus::new();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        vm_fd
            .register_irqfd(&serial_irq, layout::SERIAL_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            IrqTrigger(serial_irq),
            Box::new(std::io::stdout()),
        )));
        pio.insert(u64::from(layout::SERIAL_PORT), 8, serial.clone())?;
        let i8042 = I8042(I8042Device::new(ResetLine(end.clone())));
        pio.insert(
            u64::from(layout::I8042_PORT),
            5,
            Arc::new(Mutex::new(i8042)),
        )?;
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
        if config.boot_timer {
            pio.insert(
                u64::from(BOOT_TIMER_PORT),
                1,
                Arc::new(Mutex::new(BootTimer::default())),
            )?;
        }
        let mut mmio = Bus::new();
        let attached = virtio_devices::attach(config, &vm_fd, &guest_memory, &mut pio, &mut mmio)?;
        let buses = Arc::new(Buses { pio, mmio });

        let rsdp = acpi::write(&guest_memory, config.cpus, &attached.aml)?;
        let cmdline = boot::build_cmdline(
            &pvm_cmdline(config, &attached, boot_files.root.as_deref()),
            &config.cmdline,
        )?;
        let kernel = boot_files.kernel.1.clone();
        let entry = boot::load(
            &guest_memory,
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

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ExitStats::default());
        let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
        for index in 0..config.cpus {
            let fd = vm_fd
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vcpu::configure(
                &fd,
                index,
                config.cpus,
                &supported,
                (index == 0).then_some(entry),
            )?;
            vcpus.push(Vcpu {
                index,
                fd,
                buses: buses.clone(),
                memory: guest_memory.clone(),
                end: end.clone(),
                stop: stop.clone(),
                stats: stats.clone(),
                boot_timer: config.boot_timer,
            });
        }
        Ok(Vm {
            _vm_fd: vm_fd,
            vcpus,
            serial,
            console_input: attached.console_input,
            net_counters: attached.net_counters,
            disk_errors: attached.disk_errors,
            print_stats: config.stats,
            seccomp: config.seccomp,
            vhost_user_sockets: attached.vhost_user_sockets,
            end,
            stop,
            stats,
        })
    }

    /// Runs the vCPUs and the main loop (stdin to the UART, stop signals) until the VM ends.
    pub fn run(self) -> Result<Outcome, Error> {
        let stop_event = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        STOP_EVENT_FD.store(stop_event.as_raw_fd(), Ordering::SeqCst);
        for signo in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            register_signal_handler(signo, on_stop_signal).map_err(|e| Error::Io {
                what: "installing signal handlers",
                source: std::io::Error::from_raw_os_error(e.errno()),
            })?;
        }
        register_signal_handler(kick_signal(), on_kick).map_err(|e| Error::Io {
            what: "installing the vCPU kick handler",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;

        let raw = RawMode::enter().map_err(io_err("putting the terminal in raw mode"))?;
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut spawn_error = None;
        for vcpu in self.vcpus {
            let index = vcpu.index;
            let sandbox = self.seccomp;
            let sockets = self.vhost_user_sockets.clone();
            match std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    if sandbox {
                        if let Err(e) = seccomp::install_with(ThreadKind::Vcpu, false, &sockets) {
                            vcpu.end.end(Outcome::VmmFailure(e));
                            return;
                        }
                    }
                    vcpu.run()
                }) {
                Ok(handle) => threads.push(handle),
                Err(source) => {
                    spawn_error = Some(Error::Spawn { index, source });
                    break;
                }
            }
        }
        let sandboxed = match (&spawn_error, self.seccomp) {
            (None, true) => {
                seccomp::install(ThreadKind::Main, self.print_stats).map_err(Error::Sandbox)
            }
            _ => Ok(()),
        };
        let loop_result = match (spawn_error, sandboxed) {
            (Some(err), _) | (None, Err(err)) => Err(err),
            (None, Ok(())) => {
                let sink = match self.console_input {
                    Some(input) => InputSink::Virtio(input),
                    None => InputSink::Serial(self.serial),
                };
                main_loop(&sink, &self.end, &stop_event)
            }
        };
        // Read while every thread still lives: after the join the vCPUs' share is gone.
        let thread_cpu = if self.print_stats {
            thread_cpu_ms()
        } else {
            Vec::new()
        };
        // Whatever happened, stop and join every vCPU before the terminal is restored.
        self.stop.store(true, Ordering::Release);
        for handle in threads {
            while !handle.is_finished() {
                let _ = handle.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = handle.join();
        }
        STOP_EVENT_FD.store(-1, Ordering::SeqCst);
        let _ = std::io::stdout().flush();
        drop(raw);
        if self.print_stats {
            // Not eprintln!, which panics when stderr is a pipe whose reader has gone.
            let mut stats = format!("pvm: exits: {}\n", self.stats.summary());
            for (tap, pairs) in &self.net_counters {
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
            for (disk, errors) in &self.disk_errors {
                stats.push_str(&format!("pvm: disk {disk}: io_errors={}\n", errors.count()));
            }
            let cpu: Vec<String> = thread_cpu
                .iter()
                .map(|(name, ms)| format!("{name}={ms}"))
                .collect();
            stats.push_str(&format!("pvm: cpu ms by thread: {}\n", cpu.join(" ")));
            logger::to_stderr(&stats);
        } else {
            log::info!("exits: {}", self.stats.summary());
        }
        loop_result?;
        let signo = STOP_SIGNAL.load(Ordering::SeqCst);
        Ok(self.end.outcome().unwrap_or(Outcome::Signal(signo)))
    }
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

/// Where host keyboard input goes: the UART, or virtio-console.
enum InputSink {
    Serial(Arc<Mutex<SerialDevice>>),
    Virtio(ConsoleInput),
}

impl InputSink {
    /// Offers `bytes` to the guest; returns how many it took (the rest waits).
    fn offer(&self, bytes: &[u8]) -> usize {
        match self {
            InputSink::Serial(serial) => serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enqueue_input(bytes),
            InputSink::Virtio(input) => input.push(bytes),
        }
    }
}

/// Tokens for the main loop's epoll.
const TOKEN_STDIN: u64 = 0;
const TOKEN_END: u64 = 1;
const TOKEN_STOP: u64 = 2;

fn main_loop(sink: &InputSink, end: &EndSignal, stop_event: &EventFd) -> Result<(), Error> {
    let epoll = Epoll::new().map_err(io_err("epoll"))?;
    let add = |fd: i32, token: u64| {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(io_err("epoll_ctl"))
    };
    add(end.event().as_raw_fd(), TOKEN_END)?;
    add(stop_event.as_raw_fd(), TOKEN_STOP)?;
    // stdin may be /dev/null or a regular file, which epoll refuses; then there is no input.
    let mut stdin_open = add(libc::STDIN_FILENO, TOKEN_STDIN).is_ok();
    let mut input = KeyboardInput::default();
    let mut events = vec![EpollEvent::default(); 4];
    loop {
        // Input the UART could not take yet is retried on a short timer.
        let timeout = if input.pending.is_empty() { -1 } else { 10 };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Error::Io {
                    what: "epoll_wait",
                    source: e,
                });
            }
        };
        for event in &events[..n] {
            match event.data() {
                TOKEN_END => return Ok(()),
                TOKEN_STOP => {
                    let signo = STOP_SIGNAL.load(Ordering::SeqCst);
                    end.end(Outcome::Signal(signo));
                    return Ok(());
                }
                TOKEN_STDIN if input.pending.is_empty() => {
                    let mut buf = [0u8; 64];
                    // SAFETY: reading into a live stack buffer of the given length.
                    let got = unsafe {
                        libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len())
                    };
                    if got <= 0 {
                        // EOF or error: no more input, but the guest runs on.
                        let _ = epoll.ctl(
                            ControlOperation::Delete,
                            libc::STDIN_FILENO,
                            EpollEvent::default(),
                        );
                        stdin_open = false;
                    } else if input.feed(&buf[..got as usize]) {
                        end.end(Outcome::ConsoleQuit);
                        return Ok(());
                    }
                }
                _ => {}
            }
        }
        if !input.pending.is_empty() {
            let taken = sink.offer(&input.pending);
            input.pending.drain(..taken);
            // While input waits, stdin is not read (events stay level-triggered).
            if stdin_open && input.pending.is_empty() {
                continue;
            }
        }
    }
}

/// Host keyboard input on its way to the guest, with the Ctrl-A escape handled.
#[derive(Debug, Default)]
struct KeyboardInput {
    pending: Vec<u8>,
    escaped: bool,
}

impl KeyboardInput {
    /// Queues `bytes`; returns true when the user asked to quit (Ctrl-A x).
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for &byte in bytes {
            if self.escaped {
                self.escaped = false;
                match byte {
                    b'x' | b'X' => return true,
                    ESCAPE => self.pending.push(ESCAPE),
                    _ => {}
                }
            } else if byte == ESCAPE {
                self.escaped = true;
            } else {
                self.pending.push(byte);
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_escape() {
        let mut input = KeyboardInput::default();
        assert!(!input.feed(b"ls\r"));
        assert!(!input.feed(&[ESCAPE, ESCAPE, b'a']));
        assert_eq!(input.pending, b"ls\r\x01a");
        assert!(!input.feed(&[ESCAPE]));
        assert!(input.feed(b"x"));
    }
}

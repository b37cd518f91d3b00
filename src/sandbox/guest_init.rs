//! pvm as the sandbox guest's /init (pid 1): load the modules, mount the host's root (virtio-fs,
//! read-only) under a tmpfs overlay, switch to it, run the command or a shell on the console as
//! its controlling terminal, and hand its exit status to pvm through the exit port
//! (crate::devices::exit_port). Everything here runs inside the guest; a failure prints one
//! line on the console and ends the VM with [`SETUP_FAILED`], never a panic.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use super::spec::{GuestSpec, SPEC_PATH};
use crate::devices::exit_port::EXIT_PORT;

/// The status pvm exits with when the guest could not run the command at all (as `docker run`
/// does); 126 and 127 keep the shell's meanings (found but not runnable; not found).
pub const SETUP_FAILED: u8 = 125;
const CANNOT_EXECUTE: u8 = 126;
const NOT_FOUND: u8 = 127;
/// finit_module's flag for a compressed module file (Linux 6.4, CONFIG_MODULE_DECOMPRESS).
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const LOWER: &str = "/mnt/lower";
const RW: &str = "/mnt/rw";
const ROOT: &str = "/mnt/root";

#[derive(Debug, thiserror::Error)]
enum InitError {
    #[error("{what}")]
    Sys {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "loading {path}: the module is compressed and this kernel cannot decompress modules \
         (Linux 6.4+ with CONFIG_MODULE_DECOMPRESS)"
    )]
    Compressed { path: String },
    #[error("the host's files (virtio-fs tag '{tag}') cannot be mounted")]
    Share {
        tag: String,
        #[source]
        source: std::io::Error,
    },
}

fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> InitError {
    let what = what.into();
    move |source| InitError::Sys { what, source }
}

/// Whether this process is the sandbox guest's init: pid 1 with pvm's instructions beside it.
pub fn is_guest_init() -> bool {
    std::process::id() == 1 && Path::new("/").join(SPEC_PATH).is_file()
}

/// Runs the guest side to the end; never returns.
pub fn run() -> ! {
    let status = match setup_and_run() {
        Ok(status) => status,
        Err(err) => {
            let line = format!("pvm-init: {}\n", crate::exit::error_chain(&err));
            let _ = std::io::stderr().write_all(line.as_bytes());
            SETUP_FAILED
        }
    };
    report(status)
}

fn cstr(text: &str) -> Result<CString, InitError> {
    CString::new(text).map_err(|_| InitError::Sys {
        what: format!("'{text}' holds a NUL byte"),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })
}

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> std::io::Result<()> {
    let (source, target) = (CString::new(source)?, CString::new(target)?);
    let (fstype, data) = (CString::new(fstype)?, CString::new(data)?);
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// mkdir -p, then mount; the error names the target.
fn mount_at(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), InitError> {
    std::fs::create_dir_all(target).map_err(sys(format!("making {target}")))?;
    mount(source, target, fstype, flags, data)
        .map_err(sys(format!("mounting {fstype} on {target}")))
}

fn setup_and_run() -> Result<u8, InitError> {
    mount_at("devtmpfs", "/dev", "devtmpfs", 0, "")?;
    // The kernel found no /dev/console in the initramfs; from now on errors reach the console.
    if let Ok(console) = File::options().read(true).write(true).open("/dev/console") {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors of this single-threaded process.
            unsafe { libc::dup2(console.as_raw_fd(), fd) };
        }
    }
    mount_at("proc", "/proc", "proc", 0, "")?;
    mount_at("sysfs", "/sys", "sysfs", 0, "")?;
    let bytes =
        std::fs::read(Path::new("/").join(SPEC_PATH)).map_err(sys("reading pvm's instructions"))?;
    let spec = GuestSpec::decode(&bytes);
    for module in &spec.modules {
        load_module(module)?;
    }
    mount_share(&spec.tag)?;
    mount_at("tmpfs", RW, "tmpfs", 0, "mode=0755")?;
    for dir in ["upper", "work"] {
        std::fs::create_dir_all(format!("{RW}/{dir}"))
            .map_err(sys(format!("making {RW}/{dir}")))?;
    }
    opaque_mount_points()?;
    let layers = format!("lowerdir={LOWER},upperdir={RW}/upper,workdir={RW}/work");
    mount_at("overlay", ROOT, "overlay", 0, &layers)?;
    for dir in ["dev", "proc", "sys"] {
        let target = format!("{ROOT}/{dir}");
        std::fs::create_dir_all(&target).map_err(sys(format!("making {target}")))?;
        mount(&format!("/{dir}"), &target, "", libc::MS_MOVE, "")
            .map_err(sys(format!("moving /{dir} to {target}")))?;
    }
    mount_at(
        "devpts",
        &format!("{ROOT}/dev/pts"),
        "devpts",
        0,
        "ptmxmode=0666",
    )?;
    switch_root()?;
    run_command(&spec)
}

/// The guest's /dev, /proc and /sys as opaque directories of the upper layer, so the overlay
/// never looks them up in the share: pvm's share refuses the host's procfs (EACCES), which
/// would make even the mount point unreachable.
fn opaque_mount_points() -> Result<(), InitError> {
    for dir in ["dev", "proc", "sys"] {
        let path = format!("{RW}/upper/{dir}");
        std::fs::create_dir_all(&path).map_err(sys(format!("making {path}")))?;
        let cpath = cstr(&path)?;
        // SAFETY: the path and attribute name are NUL-terminated, the value is one byte long.
        let rc = unsafe {
            libc::setxattr(
                cpath.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                c"y".as_ptr().cast(),
                1,
                0,
            )
        };
        if rc != 0 {
            return Err(sys(format!("marking {path} opaque"))(
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

fn load_module(path: &str) -> Result<(), InitError> {
    let file = File::open(Path::new("/").join(path)).map_err(sys(format!("opening {path}")))?;
    let compressed = super::modules::is_compressed(path);
    let flags = if compressed {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    // SAFETY: finit_module reads the open module file and the empty parameter string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            c"".as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        // Loaded already (a dependency of an earlier one, or built in after all).
        Some(libc::EEXIST) => Ok(()),
        Some(libc::EINVAL) if compressed => Err(InitError::Compressed {
            path: path.to_string(),
        }),
        _ => Err(sys(format!("loading module {path}"))(err)),
    }
}

/// Mounts the share; its device may still be probing when the modules have just loaded.
fn mount_share(tag: &str) -> Result<(), InitError> {
    std::fs::create_dir_all(LOWER).map_err(sys(format!("making {LOWER}")))?;
    let mut tries = 0;
    loop {
        match mount(tag, LOWER, "virtiofs", libc::MS_RDONLY, "") {
            Ok(()) => return Ok(()),
            Err(e) if tries < 50 && e.raw_os_error() != Some(libc::ENODEV) => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(source) => {
                return Err(InitError::Share {
                    tag: tag.to_string(),
                    source,
                });
            }
        }
    }
}

/// Makes the overlay the root, as switch_root does (the initramfs stays in memory, unused).
fn switch_root() -> Result<(), InitError> {
    std::env::set_current_dir(ROOT).map_err(sys(format!("entering {ROOT}")))?;
    mount(".", "/", "", libc::MS_MOVE, "").map_err(sys(format!("moving {ROOT} to /")))?;
    let dot = cstr(".")?;
    // SAFETY: chroot reads the NUL-terminated path.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(sys("chroot into the overlay")(
            std::io::Error::last_os_error(),
        ));
    }
    std::env::set_current_dir("/").map_err(sys("entering /"))
}

/// The console's own device (e.g. /dev/ttyS0): /dev/console cannot be a controlling terminal.
fn console_device() -> String {
    console_name(&std::fs::read_to_string("/sys/class/tty/console/active").unwrap_or_default())
}

/// The device of the last console in sysfs's `active` list (the one /dev/console is).
fn console_name(active: &str) -> String {
    match active.split_whitespace().last() {
        Some(name) if !name.contains('/') && name != "." && name != ".." => format!("/dev/{name}"),
        _ => "/dev/console".to_string(),
    }
}

/// Terminal settings for the console: a host that is not a terminal gets the bytes the
/// command writes, unechoed and without "\n" turned into "\r\n".
fn set_terminal(tty: &File, spec: &GuestSpec) {
    let fd = tty.as_raw_fd();
    // SAFETY: termios is plain data; tcgetattr fills it or fails leaving it untouched.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a termios we own.
    if !spec.tty && unsafe { libc::tcgetattr(fd, &mut termios) } == 0 {
        termios.c_lflag &= !(libc::ECHO | libc::ECHONL);
        termios.c_oflag &= !libc::OPOST;
        // SAFETY: valid pointer to a termios we own.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &termios) };
    }
    if spec.rows > 0 && spec.cols > 0 {
        let size = libc::winsize {
            ws_row: spec.rows,
            ws_col: spec.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads the winsize we pass.
        unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &size) };
    }
}

fn run_command(spec: &GuestSpec) -> Result<u8, InitError> {
    let device = console_device();
    let tty = File::options()
        .read(true)
        .write(true)
        .open(&device)
        .map_err(sys(format!("opening {device}")))?;
    set_terminal(&tty, spec);
    let argv: Vec<String> = if spec.command.is_empty() {
        let shell = if Path::new("/bin/bash").exists() {
            "/bin/bash"
        } else {
            "/bin/sh"
        };
        vec![shell.to_string()]
    } else {
        spec.command.clone()
    };
    let stdio = |what: &str| {
        tty.try_clone()
            .map(Stdio::from)
            .map_err(sys(format!("console for {what}")))
    };
    let mut command = Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", "/root")
        .env("TERM", spec.term.as_deref().unwrap_or("linux"))
        .stdin(stdio("stdin")?)
        .stdout(stdio("stdout")?)
        .stderr(stdio("stderr")?);
    // SAFETY: the closure only makes async-signal-safe calls (setsid, ioctl) in the child.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            // Standard input is the console: make it this session's controlling terminal.
            if libc::ioctl(0, libc::TIOCSCTTY, 1) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let line = format!("pvm-init: cannot run '{}': {e}\n", argv[0]);
            let _ = (&tty).write_all(line.as_bytes());
            return Ok(match e.kind() {
                std::io::ErrorKind::NotFound => NOT_FOUND,
                std::io::ErrorKind::PermissionDenied => CANNOT_EXECUTE,
                _ => SETUP_FAILED,
            });
        }
    };
    let status = wait_for(child.id() as libc::pid_t);
    // What the command wrote may still be in the UART's queue: let it out before the VM ends.
    // SAFETY: tcdrain only waits on the descriptor.
    unsafe { libc::tcdrain(tty.as_raw_fd()) };
    Ok(status)
}

/// Reaps every child (pid 1 inherits orphans) until `pid` ends; its status as a shell gives it.
fn wait_for(pid: libc::pid_t) -> u8 {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into our integer.
        let got = unsafe { libc::waitpid(-1, &mut status, 0) };
        if got < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return SETUP_FAILED;
        }
        if got != pid {
            continue;
        }
        if let Some(code) = shell_status(status) {
            return code;
        }
    }
}

/// A wait status as a shell reports it: the exit code, or 128+N for a signal N; None while
/// the process has not ended.
fn shell_status(status: libc::c_int) -> Option<u8> {
    if libc::WIFEXITED(status) {
        return Some(libc::WEXITSTATUS(status) as u8);
    }
    if libc::WIFSIGNALED(status) {
        return Some(128u8.saturating_add(libc::WTERMSIG(status) as u8));
    }
    None
}

/// Writes `status` to the exit port (pvm ends the VM on it); powers off if that did not work.
fn report(status: u8) -> ! {
    // SAFETY: ioperm grants this process the one port; harmless if it fails (then the out
    // below faults, killing init, and the kernel's panic ends the VM).
    let allowed = unsafe { libc::ioperm(libc::c_ulong::from(EXIT_PORT), 1, 1) } == 0;
    if allowed {
        // SAFETY: an OUT to the port ioperm just opened for this process.
        unsafe {
            std::arch::asm!("out dx, al", in("dx") EXIT_PORT, in("al") status,
                options(nomem, nostack, preserves_flags));
        }
    }
    loop {
        // SAFETY: reboot with a valid command; only returns on failure.
        unsafe { libc::reboot(libc::RB_POWER_OFF) };
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn status_of(script: &str) -> Option<u8> {
        let status = Command::new("sh").args(["-c", script]).status().unwrap();
        shell_status(status.into_raw())
    }

    #[test]
    fn exit_codes_and_signals_read_as_a_shell_reports_them() {
        assert_eq!(status_of("exit 0"), Some(0));
        assert_eq!(status_of("exit 7"), Some(7));
        assert_eq!(status_of("exit 255"), Some(255));
        assert_eq!(status_of("kill -TERM $$"), Some(128 + 15));
        assert_eq!(status_of("kill -KILL $$"), Some(128 + 9));
        // A stopped child (WIFSTOPPED) has not ended.
        assert_eq!(shell_status(0x137f), None);
    }

    #[test]
    fn only_a_plain_console_name_becomes_a_device_path() {
        assert_eq!(console_name("tty0 ttyS0\n"), "/dev/ttyS0");
        assert_eq!(console_name("hvc0\n"), "/dev/hvc0");
        assert_eq!(console_name(""), "/dev/console");
        assert_eq!(console_name("../../etc/x\n"), "/dev/console");
        assert_eq!(console_name(".."), "/dev/console");
    }
}

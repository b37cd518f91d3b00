//! `pvm` with no boot files, or `pvm -- COMMAND [ARGS...]`: the host's own kernel boots with
//! the host's root shared read-only (virtio-fs) under a tmpfs overlay, and runs a shell or the
//! command on the terminal; pvm exits with the command's status (kvmtool's "sandbox").
//!
//! The host side here builds an initramfs in memory: pvm's own binary as /init (see
//! [`payload`] for why), the modules the guest needs from the host's /lib/modules ([`modules`])
//! and the instructions for the guest ([`spec`]). The guest side is [`guest_init`].

#[cfg(test)]
mod cli_tests;
pub mod cpio;
pub mod guest_init;
pub mod modules;
pub mod payload;
pub mod spec;

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::config::{ShareSpec, VmConfig};
use crate::exit::Outcome;
use spec::{GuestSpec, MODULE_DIR, SPEC_PATH};

/// The virtio-fs tag of the host's root in the guest.
pub const SHARE_TAG: &str = pvm_virtio::fs::DEFAULT_TAG;
/// What the sandbox adds to the kernel command line before the user's --cmdline: a quiet
/// kernel (its messages would mix with the command's output), and a panic that ends the VM at
/// once (pvm reports it) instead of hanging.
const SANDBOX_CMDLINE: &str = "quiet loglevel=1 panic=-1";

/// `pvm -- COMMAND [ARGS...]` (empty: the interactive shell).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxSpec {
    pub command: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{path}: {source}{hint}",
        hint = if source.kind() == std::io::ErrorKind::PermissionDenied {
            " (many distributions make /boot/vmlinuz-* readable by root only: run pvm as root, \
             make the file readable, or give --kernel)"
        } else if source.kind() == std::io::ErrorKind::NotFound {
            " (the host's kernel is not there: give --kernel)"
        } else {
            ""
        }
    )]
    Kernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {path} for the guest's initramfs")]
    Payload {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Modules(#[from] modules::Error),
    #[error("building the guest's initramfs")]
    Cpio(#[from] cpio::Error),
    #[error("keeping the guest's initramfs in memory")]
    Memory(#[source] std::io::Error),
}

impl Error {
    /// A kernel or module tree that does not fit is the user's to fix; the rest is pvm's.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Kernel { .. } | Error::Modules(_) => crate::exit::USAGE_ERROR,
            _ => crate::exit::VMM_FAILURE,
        }
    }
}

/// How a sandbox run's ending reads: the guest's init only ends the VM through the exit port,
/// so a power-off or reboot (a kernel panic, with panic=-1) means the command never finished.
pub fn outcome(outcome: Outcome) -> Outcome {
    match outcome {
        Outcome::PowerOff | Outcome::Reboot => {
            crate::logger::to_stderr(
                "pvm: the sandbox guest ended before its command did (see its console output)\n",
            );
            Outcome::GuestExit(guest_init::SETUP_FAILED)
        }
        other => other,
    }
}

/// The host kernel's release (`uname -r`).
fn host_release() -> String {
    // SAFETY: utsname is plain data; uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a utsname we own.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return String::new();
    }
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The release a bzImage names in its setup header (the first word of its version string).
pub fn bzimage_release(header: &[u8]) -> Option<String> {
    if header.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let offset = u16::from_le_bytes(header.get(0x20e..0x210)?.try_into().ok()?);
    let start = 0x200 + usize::from(offset);
    let text = header.get(start..)?;
    let end = text.iter().position(|&b| b == 0 || b == b' ')?;
    let release = std::str::from_utf8(&text[..end]).ok()?;
    (!release.is_empty()).then(|| release.to_string())
}

/// How much of a kernel file holds its setup code (at most 127 sectors), where the version
/// string is.
const SETUP_MAX: usize = 128 * 512;

/// The kernel to boot and its release: --kernel (release from its bzImage header, else the
/// host's), or /boot/vmlinuz-RELEASE of the running kernel; unreadable ones are refused here.
fn kernel(config: &VmConfig) -> Result<(PathBuf, String), Error> {
    let host = host_release();
    let path = config
        .kernel
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/boot/vmlinuz-{host}")));
    let kernel_err = |source| Error::Kernel {
        path: path.clone(),
        source,
    };
    let mut header = vec![0u8; SETUP_MAX];
    let mut file = File::open(&path).map_err(kernel_err)?;
    let mut n = 0;
    while n < header.len() {
        match file.read(&mut header[n..]).map_err(kernel_err)? {
            0 => break,
            got => n += got,
        }
    }
    header.truncate(n);
    let release = bzimage_release(&header).unwrap_or(host);
    Ok((path, release))
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Payload {
        path: path.to_path_buf(),
        source,
    })
}

/// An absolute host path as an archive path.
fn archive_path(path: &Path) -> String {
    path.to_string_lossy().trim_start_matches('/').to_string()
}

/// pvm's binary as /init and, when it is dynamically linked, its libraries where it mapped them
/// and its interpreter where its PT_INTERP says.
fn add_payload(archive: &mut cpio::Archive) -> Result<(), Error> {
    let exe = std::fs::read_link("/proc/self/exe").map_err(|source| Error::Payload {
        path: "/proc/self/exe".into(),
        source,
    })?;
    let binary = read(Path::new("/proc/self/exe"))?;
    let interp = payload::interpreter(&binary);
    archive.file("init", 0o755, &binary)?;
    drop(binary);
    // A static pvm (scripts/build-static) is all the init there is.
    let Some(interp) = interp else {
        return Ok(());
    };
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|source| Error::Payload {
        path: "/proc/self/maps".into(),
        source,
    })?;
    let mut files = payload::mapped_libraries(&maps, &exe);
    files.push(PathBuf::from(interp));
    for file in files {
        let name = archive_path(&file);
        if !archive.contains(&name) {
            archive.file(&name, 0o755, &read(&file)?)?;
        }
    }
    Ok(())
}

/// The modules in load order under MODULE_DIR; their archive paths.
fn add_modules(archive: &mut cpio::Archive, release: &str) -> Result<Vec<String>, Error> {
    let dir = PathBuf::from(format!("/lib/modules/{release}"));
    if !dir.is_dir() {
        log::warn!(
            "{} is missing: the guest kernel must have virtio-pci, virtio-fs and overlayfs \
             built in",
            dir.display()
        );
        return Ok(Vec::new());
    }
    let order = modules::Tree::read(&dir)?.load_order(modules::WANTED)?;
    let config_path = PathBuf::from(format!("/boot/config-{release}"));
    let config = std::fs::read_to_string(&config_path).ok();
    modules::check_decompress(
        &order,
        config.as_deref().map(|text| (config_path.as_path(), text)),
    )?;
    let mut paths = Vec::new();
    for (i, module) in order.iter().enumerate() {
        let file = module.rsplit('/').next().unwrap_or(module);
        let name = format!("{MODULE_DIR}/{i:02}-{file}");
        archive.file(&name, 0o644, &read(&dir.join(module))?)?;
        paths.push(name);
    }
    Ok(paths)
}

/// The host terminal's size (rows, columns), zero when stdin is no terminal.
fn terminal_size() -> (u16, u16) {
    // SAFETY: winsize is plain data.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize we own.
    if unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut size) } != 0 {
        return (0, 0);
    }
    (size.ws_row, size.ws_col)
}

/// Turns `config` into the sandbox VM for `sandbox`: the kernel, the initramfs (returned: the
/// caller keeps it open while the VM is built, as config.initrd names it by descriptor), the
/// command line, the exit port and the share of the host's root.
pub fn prepare(config: &mut VmConfig, sandbox: &SandboxSpec) -> Result<File, Error> {
    let (kernel, release) = kernel(config)?;
    let mut archive = cpio::Archive::new();
    // The kernel opens it as init's stdin, stdout and stderr; without them Rust's start-up
    // code would want /dev/null, which the initramfs does not have.
    archive.char_device("dev/console", 5, 1)?;
    add_payload(&mut archive)?;
    let modules = add_modules(&mut archive, &release)?;
    // SAFETY: isatty only inspects the descriptor.
    let is_tty = |fd| unsafe { libc::isatty(fd) } == 1;
    // Output to a file or pipe gets the command's bytes as they are, even from a terminal.
    let tty = is_tty(libc::STDIN_FILENO) && is_tty(libc::STDOUT_FILENO);
    let (rows, cols) = terminal_size();
    let guest = GuestSpec {
        modules,
        tag: SHARE_TAG.to_string(),
        command: sandbox.command.clone(),
        tty,
        rows,
        cols,
        term: std::env::var("TERM").ok(),
    };
    archive.file(SPEC_PATH, 0o644, &guest.encode())?;
    let initramfs = crate::memfd::with_bytes(c"pvm-sandbox-initramfs", &archive.finish())
        .map_err(Error::Memory)?;
    config.kernel = Some(kernel);
    config.initrd = Some(PathBuf::from(format!(
        "/proc/self/fd/{}",
        initramfs.as_raw_fd()
    )));
    config.cmdline = if config.cmdline.is_empty() {
        SANDBOX_CMDLINE.to_string()
    } else {
        format!("{SANDBOX_CMDLINE} {}", config.cmdline)
    };
    config.exit_port = true;
    config.shares.push(ShareSpec {
        path: PathBuf::from("/"),
        tag: SHARE_TAG.to_string(),
    });
    Ok(initramfs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bzimage(version: &[u8]) -> Vec<u8> {
        let mut image = vec![0u8; 0x800];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x20e..0x210].copy_from_slice(&0x400u16.to_le_bytes());
        image[0x600..0x600 + version.len()].copy_from_slice(version);
        image
    }

    #[test]
    fn the_release_comes_from_the_bzimage_header() {
        let image = bzimage(b"6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\0");
        assert_eq!(
            bzimage_release(&image).as_deref(),
            Some("6.1.0-57-cloud-amd64")
        );
        assert_eq!(bzimage_release(&bzimage(b"\0")), None);
        assert_eq!(bzimage_release(&image[..0x300]), None);
        let mut elf = image.clone();
        elf[0x202] = b'X';
        assert_eq!(bzimage_release(&elf), None);
        let mut far = image;
        far[0x20e..0x210].copy_from_slice(&0xffffu16.to_le_bytes());
        assert_eq!(bzimage_release(&far), None);
        // No terminator within the header read: none rather than a guess.
        assert_eq!(bzimage_release(&bzimage(b"6.1")[..0x603]), None);
    }

    #[test]
    fn a_guest_that_ends_without_reporting_is_a_setup_failure() {
        assert_eq!(outcome(Outcome::Reboot), Outcome::GuestExit(125));
        assert_eq!(outcome(Outcome::PowerOff), Outcome::GuestExit(125));
        assert_eq!(outcome(Outcome::GuestExit(7)), Outcome::GuestExit(7));
        assert_eq!(outcome(Outcome::Panic), Outcome::Panic);
    }

    #[test]
    fn a_missing_or_unreadable_kernel_says_what_to_do() {
        let err = Error::Kernel {
            path: "/boot/vmlinuz-x".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        assert!(err.to_string().contains("readable by root only"), "{err}");
        let mut config = crate::cli::parse(["pvm".into()]).unwrap();
        config.kernel = Some("/nonexistent/vmlinuz".into());
        let err = prepare(&mut config, &SandboxSpec::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/nonexistent/vmlinuz: ") && err.contains("--kernel"),
            "{err}"
        );
    }

    #[test]
    fn prepare_sets_kernel_initramfs_cmdline_exit_port_and_share() {
        let kernel =
            std::env::temp_dir().join(format!("pvm-sandbox-{}.bzImage", std::process::id()));
        std::fs::write(&kernel, bzimage(b"0.0-pvm-no-such-release #1\0")).unwrap();
        let mut config =
            crate::cli::parse(["pvm".into(), "--cmdline".into(), "x=1".into()]).unwrap();
        config.kernel = Some(kernel.clone());
        let spec = SandboxSpec {
            command: vec!["echo".into(), "hi".into()],
        };
        let initramfs = prepare(&mut config, &spec).unwrap();
        assert_eq!(config.kernel, Some(kernel.clone()));
        assert_eq!(config.cmdline, format!("{SANDBOX_CMDLINE} x=1"));
        assert!(config.exit_port);
        assert_eq!(
            config.shares,
            [ShareSpec {
                path: "/".into(),
                tag: "hostfs".into()
            }]
        );
        let bytes = std::fs::read(config.initrd.as_ref().unwrap()).unwrap();
        drop(initramfs);
        let entries = cpio::read(&bytes);
        assert!(entries.iter().any(|(name, ..)| name == "init"));
        let console = |(name, .., rdev): &&cpio::Entry| name == "dev/console" && *rdev == (5, 1);
        assert!(entries.iter().any(|e| console(&e)));
        let (_, _, guest, _) = entries.iter().find(|(name, ..)| name == SPEC_PATH).unwrap();
        let guest = GuestSpec::decode(guest);
        assert_eq!(guest.command, ["echo", "hi"]);
        assert_eq!(guest.tag, "hostfs");
        // No module tree for that release: no modules, the kernel must have them built in.
        assert!(guest.modules.is_empty());
        std::fs::remove_file(kernel).unwrap();
    }

    #[test]
    fn the_initramfs_holds_init_its_libraries_and_the_instructions() {
        let mut archive = cpio::Archive::new();
        add_payload(&mut archive).unwrap();
        assert!(archive.contains("init"));
        let own = std::fs::read("/proc/self/exe").unwrap();
        let interp = payload::interpreter(&own).unwrap();
        assert!(archive.contains(interp.trim_start_matches('/')), "{interp}");
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let libs = payload::mapped_libraries(&maps, &exe);
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
        for lib in libs {
            assert!(archive.contains(&archive_path(&lib)), "{}", lib.display());
        }
    }
}

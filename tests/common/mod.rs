//! Support for pvm's integration tests: guest assets, guest initramfs images, and running pvm
//! scenarios on a KVM host that can boot stock kernels.
//!
//! A test binary declares all its scenarios once in a `static` [`Batch`]; the first test to
//! ask for an outcome runs the whole batch, the others wait for it and pick their own result.
//! Where /dev/kvm comes from kvm_intel or kvm_amd the scenarios run directly on this machine;
//! anywhere else (the build machines have kvm_pvm, see ../shared/docs/kvm-hosts.md) they run
//! inside an emulated KVM host, `scripts/kvm-host`, which boots once per batch.
//! `PVM_KVM_HOST=direct|emulated` overrides the choice.
//!
//! A scenario is a POSIX `sh` script (busybox sh in the emulated host) run with the scenario's
//! files in its working directory and pvm on `PATH`. Placeholders expand in the script and in
//! pvm's arguments: `{pvm}` (script only) becomes the pvm command line built from the
//! scenario's arguments, `{kernel}` the path of the scenario's guest kernel, and `{shared}` the
//! batch's shared directory, where [`Scenario::shared_file`]s are put once for all scenarios.
//! Files left in the script's `out/` directory come back in [`Outcome::out`].
//! `{disk}` is the scenario's [`Scenario::disk_image`]: a block device of the emulated host
//! (the image attached to QEMU with snapshot=on), or a copy of the image in the scenario's
//! directory on this machine; either way the cached image is never written.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Exit code of a scenario that ran out of time (as with coreutils' `timeout`).
pub const TIMED_OUT: i32 = 124;

/// "Exit code" of a scenario that never ran to the end because the emulated host failed
/// (froze more often than scripts/kvm-host retries) before it.
pub const NO_RESULT: i32 = -1;

const DEFAULT_TIMEOUT_SECS: u32 = 120;

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs one of the repository's scripts and returns the last line it printed on stdout.
fn script_output(script: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(repo_root().join("scripts").join(script))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run scripts/{script}: {e}"))?;
    if !output.status.success() {
        return Err(format!("scripts/{script} failed ({})", output.status));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout.lines().last() {
        Some(line) if !line.is_empty() => Ok(line.to_string()),
        _ => Err(format!("scripts/{script} printed nothing on stdout")),
    }
}

// A failure is cached like a success: a test binary's other tests then fail at once instead of
// repeating a slow build.

fn try_assets() -> Result<PathBuf, String> {
    static ASSETS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ASSETS
        .get_or_init(|| match std::env::var_os("PVM_ASSETS") {
            Some(dir) => Ok(PathBuf::from(dir)),
            None => script_output("guest-assets", &[]).map(PathBuf::from),
        })
        .clone()
}

fn try_pvm_static() -> Result<PathBuf, String> {
    static PVM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PVM.get_or_init(|| script_output("build-static", &[]).map(PathBuf::from))
        .clone()
}

/// The guest assets directory (kernels, modules, busybox): `$PVM_ASSETS`, or whatever
/// `scripts/guest-assets` prepares, once per process.
pub fn assets() -> PathBuf {
    try_assets().unwrap_or_else(|e| panic!("cannot prepare the guest assets: {e}"))
}

/// Static release builds of the workspace binaries `programs` (besides pvm), by
/// `scripts/build-static`; returns their paths in order.
fn try_static_programs(programs: &[String]) -> Result<Vec<PathBuf>, String> {
    let args: Vec<&str> = programs.iter().map(String::as_str).collect();
    let output = Command::new(repo_root().join("scripts/build-static"))
        .args(&args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run scripts/build-static: {e}"))?;
    if !output.status.success() {
        return Err(format!("scripts/build-static failed ({})", output.status));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let paths: Vec<PathBuf> = stdout.lines().skip(1).map(PathBuf::from).collect();
    if paths.len() != programs.len() {
        return Err(format!("scripts/build-static printed {stdout:?}"));
    }
    Ok(paths)
}

/// The extra programs all of `scenarios` need, each once.
fn batch_programs(scenarios: &[&Scenario]) -> Vec<String> {
    let mut programs: Vec<String> = scenarios
        .iter()
        .flat_map(|s| s.programs.iter().cloned())
        .collect();
    programs.sort();
    programs.dedup();
    programs
}

/// A statically linked release pvm, built once per process by `scripts/build-static`.
pub fn pvm_static() -> PathBuf {
    try_pvm_static().unwrap_or_else(|e| panic!("cannot build a static pvm: {e}"))
}

/// The pvm the test harness built for this test run (not static; used on a direct host).
fn pvm_dynamic() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pvm"))
}

/// The guest kernels in the assets directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Minimal 6.1 kernel with virtio built in (guest/minimal-6.1.config), ELF vmlinux.
    MinimalElf,
    /// The same kernel as a bzImage.
    MinimalBzImage,
    /// Debian's cloud kernel as shipped (bzImage; virtio drivers are modules).
    DebianBzImage,
    /// Debian's cloud kernel as an ELF vmlinux extracted from the bzImage.
    DebianElf,
}

impl Kernel {
    /// Path relative to the assets directory.
    pub fn relative_path(self) -> &'static str {
        match self {
            Kernel::MinimalElf => "minimal/vmlinux",
            Kernel::MinimalBzImage => "minimal/bzImage",
            Kernel::DebianBzImage => "debian/vmlinuz",
            Kernel::DebianElf => "debian/vmlinux",
        }
    }

    pub fn path(self) -> PathBuf {
        assets().join(self.relative_path())
    }

    /// Debian's kernel needs its virtio modules loaded by the initramfs.
    pub fn needs_modules(self) -> bool {
        matches!(self, Kernel::DebianBzImage | Kernel::DebianElf)
    }
}

/// Appends one newc ("070701") cpio entry to `out`.
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
    let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
    let namesize = name.len() + 1;
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    let fields = [
        ino as usize,
        mode as usize,
        0,
        0,
        nlink,
        0,
        data.len(),
        0,
        0,
        rdev.0 as usize,
        rdev.1 as usize,
        namesize,
        0,
    ];
    out.extend_from_slice(b"070701");
    for field in fields {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(4), 0);
}

/// An uncompressed newc archive of `dirs` (mode 0755) and `files` (path, mode, contents).
fn cpio_archive(dirs: &[&str], files: &[(String, u32, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ino = 1;
    for dir in dirs {
        cpio_entry(&mut out, ino, dir, 0o040755, &[], (0, 0));
        ino += 1;
    }
    // The kernel opens /dev/console for init before anything mounts devtmpfs; without this node
    // /init runs with no stdin/stdout and nothing it prints reaches the console.
    cpio_entry(&mut out, ino, "dev/console", 0o020600, &[], (5, 1));
    ino += 1;
    for (path, mode, data) in files {
        cpio_entry(&mut out, ino, path, 0o100000 | mode, data, (0, 0));
        ino += 1;
    }
    cpio_entry(&mut out, 0, "TRAILER!!!", 0, &[], (0, 0));
    out
}

/// A guest initramfs: busybox.cpio.gz followed by an archive holding `/init`, which mounts
/// /proc, /sys and /dev, loads the virtio modules if `kernel` needs them, runs `init_script`
/// (busybox sh) and powers the guest off. The second archive is left uncompressed: the kernel
/// accepts that, and gunzip under nested emulation would only cost time.
pub fn guest_initramfs(init_script: &str, kernel: Kernel) -> Vec<u8> {
    let base = assets().join("busybox.cpio.gz");
    let mut image =
        fs::read(&base).unwrap_or_else(|e| panic!("cannot read {}: {e}", base.display()));
    // An uncompressed archive is only recognised at a 4-byte aligned offset; zeros are skipped.
    pad4(&mut image);

    let mut init = String::from(
        "#!/bin/sh\n\
         # /init written by tests/common\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n",
    );
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    if kernel.needs_modules() {
        init.push_str(
            "for m in $(cat /lib/modules/order); do\n    \
             insmod /lib/modules/$m.ko || echo \"init: insmod $m failed\"\n\
             done\n",
        );
        let modules = assets().join("debian/modules");
        let order = fs::read_to_string(modules.join("order"))
            .unwrap_or_else(|e| panic!("cannot read {}/order: {e}", modules.display()));
        for name in order.lines().filter(|l| !l.is_empty()) {
            let path = modules.join(format!("{name}.ko"));
            let data =
                fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            files.push((format!("lib/modules/{name}.ko"), 0o644, data));
        }
        files.push(("lib/modules/order".to_string(), 0o644, order.into_bytes()));
        dirs = vec!["lib", "lib/modules"];
    }
    files.push((
        "bin/pvm-boot-signal".to_string(),
        0o755,
        boot_signal_program(),
    ));
    init.push_str(init_script);
    // Without this, /init ending would panic the guest; a test expecting a panic causes one.
    init.push_str("\npoweroff -f\n");
    files.push(("init".to_string(), 0o755, init.into_bytes()));

    image.extend(cpio_archive(&dirs, &files));
    image
}

/// Appends `files` (path in the guest, mode, contents) to an initramfs from
/// [`guest_initramfs`]: e.g. a module only one scenario loads (the kernel unpacks concatenated
/// archives in order).
pub fn add_initramfs_files(image: &mut Vec<u8>, files: &[(String, u32, Vec<u8>)]) {
    pad4(image);
    image.extend(cpio_archive(&[], files));
}

/// The static `pvm-vsock-helper` (tests/vsock-helper), built by scripts/build-static, which
/// prints its path last: both ends of vsock connections in the vsock and snapshot tests.
pub fn vsock_helper_binary() -> PathBuf {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/build-static"))
        .arg("pvm-vsock-helper")
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/build-static");
    assert!(out.status.success(), "scripts/build-static failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(stdout.lines().last().expect("a path").trim())
}

/// A module of Debian's kernel that its initramfs does not load (e.g. the vsock drivers).
pub fn extra_module(name: &str) -> Vec<u8> {
    let path = assets().join(format!("debian/extra-modules/{name}.ko"));
    fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A static x86-64 Linux program that signals pvm's boot timer (writes 123 to port 0x3f0, see
/// `pvm --boot-timer`) and exits: ioperm(0x3f0, 1, 1); out 0x3f0, al; exit(0). Hand-assembled,
/// so it works on any guest kernel (Debian's cloud kernel has no /dev/port).
pub fn boot_signal_program() -> Vec<u8> {
    const LOAD: u64 = 0x40_0000;
    #[rustfmt::skip]
    let code: &[u8] = &[
        0xb8, 173, 0, 0, 0,          // mov eax, SYS_ioperm
        0xbf, 0xf0, 0x03, 0, 0,      // mov edi, 0x3f0
        0xbe, 1, 0, 0, 0,            // mov esi, 1
        0xba, 1, 0, 0, 0,            // mov edx, 1
        0x0f, 0x05,                  // syscall
        0x66, 0xba, 0xf0, 0x03,      // mov dx, 0x3f0
        0xb0, 123,                   // mov al, 123
        0xee,                        // out dx, al
        0xb8, 60, 0, 0, 0,           // mov eax, SYS_exit
        0x31, 0xff,                  // xor edi, edi
        0x0f, 0x05,                  // syscall
    ];
    let mut elf = vec![0u8; 0x1000];
    let mut put = |at: usize, bytes: &[u8]| elf[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, b"\x7fELF\x02\x01\x01");
    put(16, &2u16.to_le_bytes()); // ET_EXEC
    put(18, &0x3eu16.to_le_bytes()); // x86-64
    put(20, &1u32.to_le_bytes());
    put(24, &(LOAD + 0x1000).to_le_bytes()); // entry: the code, one page in
    put(32, &64u64.to_le_bytes()); // program headers right after the header
    put(52, &64u16.to_le_bytes());
    put(54, &56u16.to_le_bytes());
    put(56, &1u16.to_le_bytes());
    put(64, &1u32.to_le_bytes()); // PT_LOAD
    put(68, &5u32.to_le_bytes()); // R+X
    put(72, &0u64.to_le_bytes()); // from file offset 0
    put(80, &LOAD.to_le_bytes());
    put(88, &LOAD.to_le_bytes());
    let size = (0x1000 + code.len()) as u64;
    put(96, &size.to_le_bytes());
    put(104, &size.to_le_bytes());
    put(112, &0x1000u64.to_le_bytes());
    elf.extend_from_slice(code);
    elf
}

/// The bytes the guest writes: `lines` numbered 17-byte lines (whole 4 KiB blocks for 4096).
pub fn pattern(tag: &str, lines: usize) -> Vec<u8> {
    (1..=lines)
        .flat_map(|i| format!("{tag}-PATTERN{i:05}\n").into_bytes())
        .collect()
}

/// Guest commands writing `pattern(tag, 4096)` to `dev` with a flush, reporting the outcome.
pub fn write_pattern(tag: &str, dev: &str) -> String {
    format!(
        "for i in $(seq 1 4096); do printf '{tag}-PATTERN%05d\\n' $i; done > /tmp/p\n\
         if dd if=/tmp/p of={dev} bs=4096 conv=fsync 2>/tmp/dd.err; then echo {tag}-write-ok; \
         else echo {tag}-write-refused: $(cat /tmp/dd.err | head -n 1); fi\n"
    )
}

/// Wraps `body` so it runs in a new network namespace holding tap0 (10.0.2.1/24, up). The body
/// goes through a quoted heredoc, so `{pvm}`'s quoting survives untouched.
pub fn in_network_namespace(body: &str) -> String {
    format!(
        "cat > in-netns.sh <<'NETNS'\n\
         ip link set lo up\n\
         tunctl -t tap0 >/dev/null\n\
         ip link set tap0 up\n\
         ip addr add 10.0.2.1/24 dev tap0\n\
         {body}\n\
         NETNS\n\
         unshare -n sh ./in-netns.sh"
    )
}

/// Quotes `word` for sh.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// One pvm run (or any script) to execute on a KVM host.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Unique within a batch; letters, digits, `.`, `_` and `-`. Scenarios run in name order.
    pub name: String,
    /// The run script (busybox sh); see the module documentation for `{pvm}` and `{kernel}`.
    /// Its exit code is the outcome's `rc`.
    pub script: String,
    /// Arguments of `{pvm}`; may name the scenario's files by relative path and use `{kernel}`.
    pub pvm_args: Vec<String>,
    /// The kernel `{kernel}` stands for; only the kernels a batch uses are copied into the host.
    pub kernel: Option<Kernel>,
    /// Files put in the scenario's working directory: (relative path, contents).
    pub files: Vec<(String, Vec<u8>)>,
    /// Host files put once per batch in the shared directory (`{shared}`), whichever scenarios
    /// name them: (relative path there, host path).
    pub shared: Vec<(String, PathBuf)>,
    /// After this, the scenario's whole process group is killed and `rc` is [`TIMED_OUT`].
    pub timeout_secs: u32,
    /// Further workspace binaries the script runs (e.g. `pvm-vhost-user-blk`), put on its
    /// `PATH` (static builds, in /bin of the emulated host).
    pub programs: Vec<String>,
    /// A large disk image `{disk}` stands for, attached to the host instead of copied into it.
    pub disk: Option<PathBuf>,
}

impl Scenario {
    /// A scenario that runs pvm with no arguments yet; add them with [`Scenario::args`].
    pub fn new(name: &str) -> Self {
        Scenario {
            name: name.to_string(),
            script: "{pvm}".to_string(),
            pvm_args: Vec::new(),
            kernel: None,
            files: Vec::new(),
            shared: Vec::new(),
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            programs: Vec::new(),
            disk: None,
        }
    }

    /// The disk image `{disk}` stands for (e.g. the Debian image, too large for the emulated
    /// host's initramfs); the guest's writes never reach `path`.
    pub fn disk_image(mut self, path: &Path) -> Self {
        self.disk = Some(path.to_path_buf());
        self
    }

    /// This scenario with `{disk}` replaced by `with` in its script and pvm arguments.
    fn with_disk_path(&self, with: &str) -> Scenario {
        let mut s = self.clone();
        s.script = s.script.replace("{disk}", with);
        for arg in &mut s.pvm_args {
            *arg = arg.replace("{disk}", with);
        }
        s
    }

    /// The common case: boot `kernel` on `cpus` vCPUs and 256 MiB with an initramfs whose
    /// /init runs `init_script` (see [`guest_initramfs`]).
    pub fn boot(name: &str, kernel: Kernel, cpus: u32, init_script: &str) -> Self {
        Scenario::new(name)
            .kernel(kernel)
            .file("initrd.cpio", guest_initramfs(init_script, kernel))
            .args(["--kernel", "{kernel}", "--initrd", "initrd.cpio"])
            .args([
                "--cpus",
                &cpus.to_string(),
                "--mem",
                "256M",
                "--cmdline",
                "quiet",
            ])
    }

    /// Replaces the run script (by default just `{pvm}`).
    pub fn script(mut self, script: &str) -> Self {
        self.script = script.to_string();
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.pvm_args
            .extend(args.into_iter().map(|a| a.as_ref().to_string()));
        self
    }

    pub fn kernel(mut self, kernel: Kernel) -> Self {
        self.kernel = Some(kernel);
        self
    }

    pub fn file(mut self, path: &str, contents: Vec<u8>) -> Self {
        self.files.push((path.to_string(), contents));
        self
    }

    /// Puts host file `from` at `{shared}/path` for the batch; scenarios naming the same `path`
    /// share one copy (large files used by many scenarios, such as a QEMU binary).
    pub fn shared_file(mut self, path: &str, from: &Path) -> Self {
        // The file itself, not a symlink to it: a hard link to a relative symlink (a library's
        // soname link) would dangle in the batch.
        let from = from.canonicalize().unwrap_or_else(|_| from.to_path_buf());
        self.shared.push((path.to_string(), from));
        self
    }

    /// Carries the workspace binary `name` along, on the script's `PATH`.
    pub fn program(mut self, name: &str) -> Self {
        self.programs.push(name.to_string());
        self
    }

    pub fn timeout(mut self, secs: u32) -> Self {
        self.timeout_secs = secs;
        self
    }

    /// The run script with placeholders expanded; `kernels` is where the kernel files are,
    /// `shared` the batch's shared directory.
    fn render(&self, kernels: &Path, shared: &Path) -> String {
        let kernel = self
            .kernel
            .map(|k| kernels.join(k.relative_path()).display().to_string());
        let shared = shared.display().to_string();
        let expand = |text: &str| {
            let text = text.replace("{shared}", &shared);
            match &kernel {
                Some(path) => text.replace("{kernel}", path),
                None => text,
            }
        };
        let mut pvm = String::from("pvm");
        for arg in &self.pvm_args {
            pvm.push(' ');
            pvm.push_str(&shell_quote(&expand(arg)));
        }
        format!(
            "# scenario {}, written by tests/common\n{}\n",
            self.name,
            expand(&self.script).replace("{pvm}", &pvm)
        )
    }

    fn check(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && !self.name.starts_with('.')
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !name_ok {
            return Err(format!("bad scenario name {:?}", self.name));
        }
        let uses_kernel = self.script.contains("{kernel}")
            || self.pvm_args.iter().any(|a| a.contains("{kernel}"));
        if uses_kernel && self.kernel.is_none() {
            return Err(format!(
                "scenario {} uses {{kernel}} but sets no kernel",
                self.name
            ));
        }
        let files = self.files.iter().map(|(path, _)| path);
        for path in files.chain(self.shared.iter().map(|(path, _)| path)) {
            let relative = Path::new(path)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !relative || ["run", "timeout", "console", "out"].contains(&path.as_str()) {
                return Err(format!("scenario {}: bad file name {path:?}", self.name));
            }
        }
        Ok(())
    }

    /// Creates `dir` with the scenario's files, its run script and its timeout, and puts its
    /// shared files in `batch_shared` (seen as `shared` by the script) unless already there.
    fn write(
        &self,
        dir: &Path,
        kernels: &Path,
        batch_shared: &Path,
        shared: &Path,
    ) -> Result<(), String> {
        for (path, from) in &self.shared {
            let to = batch_shared.join(path);
            if !to.exists() {
                link_or_copy(from, &to)?;
            }
        }
        let io = |e: std::io::Error| {
            format!(
                "cannot write scenario {} in {}: {e}",
                self.name,
                dir.display()
            )
        };
        fs::create_dir_all(dir).map_err(io)?;
        for (path, contents) in &self.files {
            let path = dir.join(path);
            fs::create_dir_all(path.parent().unwrap()).map_err(io)?;
            fs::write(path, contents).map_err(io)?;
        }
        fs::write(dir.join("run"), self.render(kernels, shared)).map_err(io)?;
        fs::write(dir.join("timeout"), format!("{}\n", self.timeout_secs)).map_err(io)
    }
}

/// What a scenario did.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub name: String,
    /// The run script's stdout and stderr (the guest's serial console comes through pvm).
    pub console: String,
    /// The run script's exit code; [`TIMED_OUT`] if it ran out of time.
    pub rc: i32,
    /// Wall time of the run script.
    pub seconds: f64,
    /// The files the script left in its `out/` directory (may not exist).
    pub out: PathBuf,
}

impl Outcome {
    /// Prints the scenario's console to stderr (shown when a test fails).
    pub fn dump(&self) {
        eprintln!(
            "----- scenario {}: rc {} after {:.2} s, console:\n{}\n----- end of {}",
            self.name, self.rc, self.seconds, self.console, self.name
        );
    }

    pub fn assert_rc(&self, rc: i32) {
        if self.rc != rc {
            self.dump();
            panic!(
                "scenario {} exited with {}, expected {rc}",
                self.name, self.rc
            );
        }
    }

    pub fn assert_contains(&self, needle: &str) {
        if !self.console.contains(needle) {
            self.dump();
            panic!("scenario {}: console lacks {needle:?}", self.name);
        }
    }

    /// The first word after `prefix` on the first console line starting with it (a checksum,
    /// a count); fails the test, showing the console, when there is no such line.
    pub fn word_after(&self, prefix: &str) -> String {
        let word = self.console.lines().find_map(|l| {
            l.strip_prefix(prefix)
                .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
        });
        word.unwrap_or_else(|| {
            self.dump();
            panic!("scenario {}: no '{prefix}' line", self.name)
        })
    }

    pub fn assert_lacks(&self, needle: &str) {
        if self.console.contains(needle) {
            self.dump();
            panic!("scenario {}: console holds {needle:?}", self.name);
        }
    }
}

/// True when scenarios run inside the emulated KVM host rather than on this machine.
pub fn emulated_host() -> bool {
    match std::env::var("PVM_KVM_HOST").as_deref() {
        Ok("direct") => false,
        Ok("emulated") => true,
        Ok(other) => panic!("PVM_KVM_HOST={other}: expected direct or emulated"),
        Err(_) => {
            let vendor = ["kvm_intel", "kvm_amd"]
                .iter()
                .any(|m| Path::new("/sys/module").join(m).exists());
            !(vendor && Path::new("/dev/kvm").exists())
        }
    }
}

/// A fresh directory for this process's batch, target/kvm-host/<test binary>-<pid>. Earlier
/// batches of the same test binary are removed once their process is gone, so one stays
/// around for inspection.
fn batch_dir() -> Result<PathBuf, String> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let parent = target.join("kvm-host");
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the test binary: {e}"))?;
    let stem = exe.file_name().unwrap().to_string_lossy();
    // Cargo names test binaries <name>-<hash>.
    let test = stem
        .rsplit_once('-')
        .map_or(&*stem, |(name, _)| name)
        .to_string();
    if let Ok(entries) = fs::read_dir(&parent) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix(&format!("{test}-")) else {
                continue;
            };
            if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                // Best effort: a leftover only costs disk space.
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = parent.join(format!("{test}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Runs all `scenarios` and returns their outcomes by name; panics if the batch could not run
/// (a scenario failing is an outcome, not a panic).
pub fn run_batch(scenarios: &[Scenario]) -> HashMap<String, Outcome> {
    try_run_batch(scenarios, None).unwrap_or_else(|e| panic!("{e}"))
}

/// [`run_batch`] on an emulated host with `cpus` vCPUs (scripts/kvm-host's PVM_KVM_HOST_CPUS;
/// the default is 1) for scenarios that need the host to run things in parallel. Where the
/// scenarios run directly on this machine, its own CPUs serve.
pub fn run_batch_on_cpus(scenarios: &[Scenario], cpus: u32) -> HashMap<String, Outcome> {
    try_run_batch(scenarios, Some(cpus)).unwrap_or_else(|e| panic!("{e}"))
}

fn try_run_batch(
    scenarios: &[Scenario],
    host_cpus: Option<u32>,
) -> Result<HashMap<String, Outcome>, String> {
    let mut sorted: Vec<&Scenario> = scenarios.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for (i, s) in sorted.iter().enumerate() {
        s.check()?;
        if i > 0 && sorted[i - 1].name == s.name {
            return Err(format!("two scenarios are named {}", s.name));
        }
    }
    let dir = batch_dir()?;
    if emulated_host() {
        run_emulated(&sorted, &dir, host_cpus)
    } else {
        run_direct(&sorted, &dir)
    }
}

/// Hard-links `from` to `to` (same file system: no copy of a large kernel), else copies it.
fn link_or_copy(from: &Path, to: &Path) -> Result<(), String> {
    fs::create_dir_all(to.parent().unwrap()).map_err(|e| e.to_string())?;
    fs::hard_link(from, to)
        .or_else(|_| fs::copy(from, to).map(drop))
        .map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), to.display()))
}

fn run_emulated(
    scenarios: &[&Scenario],
    dir: &Path,
    host_cpus: Option<u32>,
) -> Result<HashMap<String, Outcome>, String> {
    let assets = try_assets()?;
    link_or_copy(&try_pvm_static()?, &dir.join("pvm"))?;
    let programs = batch_programs(scenarios);
    if !programs.is_empty() {
        for (name, path) in programs.iter().zip(try_static_programs(&programs)?) {
            link_or_copy(&path, &dir.join("bin").join(name))?;
        }
    }
    let disks = batch_disks(scenarios, dir)?;
    for s in scenarios {
        if let Some(kernel) = s.kernel {
            let shared = dir.join("shared").join(kernel.relative_path());
            if !shared.exists() {
                link_or_copy(&assets.join(kernel.relative_path()), &shared)?;
            }
        }
        let s = match &s.disk {
            Some(disk) => s.with_disk_path(&disks[disk]),
            None => (*s).clone(),
        };
        s.write(
            &dir.join("scenarios").join(&s.name),
            Path::new("/batch/shared"),
            &dir.join("shared"),
            Path::new("/batch/shared"),
        )?;
    }
    let mut kvm_host = Command::new(repo_root().join("scripts/kvm-host"));
    kvm_host.arg("run").arg(dir).env("PVM_ASSETS", &assets);
    if let Some(cpus) = host_cpus {
        kvm_host.env("PVM_KVM_HOST_CPUS", cpus.to_string());
    }
    let status = kvm_host
        .status()
        .map_err(|e| format!("cannot run scripts/kvm-host: {e}"))?;
    // The scenarios that finished before the emulated host gave up keep their results; the
    // others get NO_RESULT, so each test (or benchmark figure) reports its own loss.
    let host_failure = (!status.success()).then(|| {
        let message = format!(
            "no result: scripts/kvm-host failed ({status}); see {}",
            dir.join("host-console.log").display()
        );
        eprintln!("pvm-test: {message}");
        message
    });
    read_results(&dir.join("results"), scenarios, host_failure.as_deref())
}

/// Links the batch's disk images into `dir/disks`, where scripts/kvm-host attaches them in name
/// order after its results disk (/dev/vda), and returns each image's device in the host.
fn batch_disks(scenarios: &[&Scenario], dir: &Path) -> Result<HashMap<PathBuf, String>, String> {
    let mut images: Vec<&PathBuf> = scenarios.iter().filter_map(|s| s.disk.as_ref()).collect();
    images.sort();
    images.dedup();
    if images.len() > 24 {
        return Err(format!(
            "{} disk images in one batch; at most 24",
            images.len()
        ));
    }
    let mut devices = HashMap::new();
    for (i, image) in images.into_iter().enumerate() {
        let target = image
            .canonicalize()
            .map_err(|e| format!("disk image {}: {e}", image.display()))?;
        let link = dir.join("disks").join(format!("{i:02}.img"));
        fs::create_dir_all(link.parent().unwrap()).map_err(|e| e.to_string())?;
        std::os::unix::fs::symlink(&target, &link)
            .map_err(|e| format!("cannot link {}: {e}", link.display()))?;
        let letter = char::from(b'b' + i as u8);
        devices.insert(image.clone(), format!("/dev/vd{letter}"));
    }
    Ok(devices)
}

/// The outcomes of `scenarios` from a batch's results directory (`<batch>/results`). With
/// `missing` set, a scenario without a result gets [`NO_RESULT`] and `missing` as its console;
/// without it, a missing result is an error.
pub fn read_results(
    dir: &Path,
    scenarios: &[&Scenario],
    missing: Option<&str>,
) -> Result<HashMap<String, Outcome>, String> {
    let mut outcomes = HashMap::new();
    for s in scenarios {
        let results = dir.join(&s.name);
        if let Some(message) = missing {
            if !results.join("rc").exists() {
                let outcome = Outcome {
                    name: s.name.clone(),
                    console: message.to_string(),
                    rc: NO_RESULT,
                    seconds: 0.0,
                    out: results.join("out"),
                };
                outcomes.insert(s.name.clone(), outcome);
                continue;
            }
        }
        let read = |file: &str| {
            fs::read(results.join(file))
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .map_err(|e| {
                    format!(
                        "scenario {}: no {file} in {}: {e}",
                        s.name,
                        results.display()
                    )
                })
        };
        let number = |file: &str| -> Result<f64, String> {
            let text = read(file)?;
            text.trim()
                .parse()
                .map_err(|_| format!("scenario {}: {file} is {text:?}", s.name))
        };
        let outcome = Outcome {
            name: s.name.clone(),
            console: read("console")?,
            rc: number("rc")? as i32,
            seconds: number("seconds")?,
            out: results.join("out"),
        };
        outcomes.insert(s.name.clone(), outcome);
    }
    Ok(outcomes)
}

fn run_direct(scenarios: &[&Scenario], dir: &Path) -> Result<HashMap<String, Outcome>, String> {
    let pvm = pvm_dynamic();
    let mut path = format!(
        "{}:{}",
        pvm.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let programs = batch_programs(scenarios);
    if !programs.is_empty() {
        let bin = dir.join("bin");
        for (name, built) in programs.iter().zip(try_static_programs(&programs)?) {
            link_or_copy(&built, &bin.join(name))?;
        }
        path = format!("{}:{path}", bin.display());
    }
    let mut outcomes = HashMap::new();
    for s in scenarios {
        let cwd = dir.join("scenarios").join(&s.name);
        let shared = dir.join("shared");
        // A private copy (sparse, as the image is) that the guest may write.
        let s = match &s.disk {
            Some(disk) => {
                fs::create_dir_all(&cwd).map_err(|e| e.to_string())?;
                let ok = Command::new("cp")
                    .arg("--sparse=always")
                    .arg(disk)
                    .arg(cwd.join("disk.img"))
                    .status()
                    .is_ok_and(|st| st.success());
                if !ok {
                    return Err(format!("cannot copy disk image {}", disk.display()));
                }
                s.with_disk_path("disk.img")
            }
            None => (*s).clone(),
        };
        s.write(&cwd, &try_assets()?, &shared, &shared)?;
        let outcome =
            run_direct_one(&s, &cwd, &path).map_err(|e| format!("scenario {}: {e}", s.name))?;
        eprintln!(
            "pvm-test: scenario {} rc={} in {:.2}s",
            s.name, outcome.rc, outcome.seconds
        );
        outcomes.insert(s.name.clone(), outcome);
    }
    Ok(outcomes)
}

/// Runs one scenario's script on this machine, in a process group of its own so that a
/// timeout, or anything it left running in the background, can be killed as a whole.
fn run_direct_one(s: &Scenario, cwd: &Path, path: &str) -> Result<Outcome, String> {
    let console = fs::File::create(cwd.join("console")).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut child = Command::new("sh")
        .arg("./run")
        .current_dir(cwd)
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(console.try_clone().map_err(|e| e.to_string())?)
        .stderr(console)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run sh: {e}"))?;
    let group = format!("-{}", child.id());
    let kill = |signal: &str| {
        // The group may be gone already; nothing to do then.
        let _ = Command::new("kill")
            .args([signal, "--", &group])
            .stderr(Stdio::null())
            .status();
    };
    // On expiry: SIGTERM, so pvm can report how far the guest got, then SIGKILL after 2 s.
    let mut deadline = start + Duration::from_secs(s.timeout_secs.into());
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() >= deadline {
            kill(if timed_out { "-KILL" } else { "-TERM" });
            timed_out = true;
            deadline += Duration::from_secs(2);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let rc = match status.code() {
        _ if timed_out => TIMED_OUT,
        Some(code) => code,
        None => 128 + status.signal().unwrap_or(0),
    };
    let seconds = start.elapsed().as_secs_f64();
    kill("-KILL");
    let console = fs::read(cwd.join("console")).map_err(|e| e.to_string())?;
    Ok(Outcome {
        name: s.name.clone(),
        console: String::from_utf8_lossy(&console).into_owned(),
        rc,
        seconds,
        out: cwd.join("out"),
    })
}

/// All the scenarios of one test binary, run together the first time an outcome is asked for:
///
/// ```ignore
/// static BATCH: Batch = Batch::new(scenarios);
/// fn scenarios() -> Vec<Scenario> { vec![Scenario::boot("hello", Kernel::MinimalElf, 1, "echo hi")] }
/// #[test]
/// fn hello() { BATCH.outcome("hello").assert_contains("hi"); }
/// ```
#[derive(Debug)]
pub struct Batch {
    scenarios: fn() -> Vec<Scenario>,
    // A failed batch is remembered too, so that every test reports it instead of re-running it.
    outcomes: OnceLock<Result<HashMap<String, Outcome>, String>>,
}

impl Batch {
    pub const fn new(scenarios: fn() -> Vec<Scenario>) -> Self {
        Batch {
            scenarios,
            outcomes: OnceLock::new(),
        }
    }

    /// The outcome of scenario `name`, running the batch first if no test has yet.
    pub fn outcome(&self, name: &str) -> &Outcome {
        let outcomes = self
            .outcomes
            .get_or_init(|| try_run_batch(&(self.scenarios)(), None));
        match outcomes {
            Ok(outcomes) => outcomes
                .get(name)
                .unwrap_or_else(|| panic!("no scenario named {name} in this test's batch")),
            Err(e) => panic!("the batch did not run: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_archive_is_read_back_by_cpio() {
        let files = [("bin/odd name".to_string(), 0o755, b"abcde".to_vec())];
        let archive = cpio_archive(&["bin"], &files);
        let mut child = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cpio");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), &archive).unwrap();
        let listing = String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap();
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 3, "{listing}");
        assert!(
            lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" bin"),
            "{listing}"
        );
        assert!(
            lines[1].starts_with("crw-------")
                && lines[1].contains(" 5,")
                && lines[1].ends_with(" dev/console"),
            "{listing}"
        );
        assert!(
            lines[2].starts_with("-rwxr-xr-x") && lines[2].contains(" 5 "),
            "{listing}"
        );
        assert!(lines[2].ends_with(" bin/odd name"), "{listing}");
    }

    #[test]
    fn pvm_placeholder_expands_to_quoted_arguments() {
        let s = Scenario::new("x")
            .kernel(Kernel::DebianElf)
            .args(["--kernel", "{kernel}", "--cmdline", "it's"])
            .script("echo {kernel} {shared}/q\n{pvm}");
        let script = s.render(Path::new("/k"), Path::new("/s"));
        assert!(script.ends_with(
            "echo /k/debian/vmlinux /s/q\npvm '--kernel' '/k/debian/vmlinux' '--cmdline' 'it'\\''s'\n"
        ));
    }
}

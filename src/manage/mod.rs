//! Managing running VMs: `pvm list`, `status`, `pause`, `resume`, `stop` and `console`, all
//! over the API sockets in the run directory ([`rundir`]); each VM answers `GET /pvm/info`
//! (a pvm extension of the Firecracker API) with what `list` shows.

pub mod attach;
pub mod cleanup;
pub mod client;
pub mod info;
pub mod rundir;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use self::client::{Answer, ClientError, request};
use self::info::PvmInfo;
use self::rundir::RunDirError;

/// Exit codes of the subcommands (besides 0, success, and 2, a bad command line).
pub const FAILED: i32 = 1;
/// The VM does not exist (no socket, or only a stale one, now removed).
pub const NO_SUCH_VM: i32 = 3;
/// `pvm stop`: the VM ended only after SIGTERM.
pub const STOPPED_BY_SIGTERM: i32 = 4;
/// `pvm stop`: the VM ended only after SIGKILL.
pub const STOPPED_BY_SIGKILL: i32 = 5;

/// The subcommands' exit status paragraph.
pub const EXIT_STATUS: &str = "Exit status: 0 done, 1 the VM refused or could not be reached, \
     2 bad command line, 3 no such VM (a stale socket is removed); pvm stop: 0 the VM ended \
     after the API's request, 4 only after SIGTERM, 5 only after SIGKILL.";

/// A running VM, named by its id (its socket in the run directory) or by a socket path
/// (anything with a '/', e.g. a Firecracker-mode --api-sock).
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The VM's id (see pvm list), or the path of its API socket.
    #[arg(value_name = "ID")]
    pub id: String,
}

/// The subcommands.
#[derive(clap::Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// List the running VMs of the run directory: id, pid, state, vCPUs, memory, uptime,
    /// disks and taps. Sockets nobody serves any more are removed on the way.
    #[command(after_help = EXIT_STATUS)]
    List,
    /// Show one VM: id, pid, state, vCPUs, memory, uptime, disks, taps and its console socket.
    #[command(after_help = EXIT_STATUS)]
    Status {
        #[command(flatten)]
        target: Target,
        /// Print the VM's answer to GET /pvm/info as JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Pause the VM: every vCPU and virtio device stops until pvm resume.
    #[command(after_help = EXIT_STATUS)]
    Pause {
        #[command(flatten)]
        target: Target,
    },
    /// Resume a paused VM.
    #[command(after_help = EXIT_STATUS)]
    Resume {
        #[command(flatten)]
        target: Target,
    },
    /// Stop the VM: first through its API (SendCtrlAltDel, which pvm turns into a reset of
    /// the guest that ends the VM), then, if it has not ended within --timeout, SIGTERM, and
    /// SIGKILL 5 seconds after that.
    #[command(after_help = EXIT_STATUS)]
    Stop {
        #[command(flatten)]
        target: Target,
        /// Seconds to wait for the VM to end after the API's request.
        #[arg(long, value_name = "SECONDS", default_value_t = 10)]
        timeout: u64,
    },
    /// Attach this terminal to the VM's console socket (the VM must run with --console
    /// socket). The terminal is raw while attached; Ctrl-] detaches (the VM runs on). A
    /// second client is refused while one is attached.
    #[command(after_help = EXIT_STATUS)]
    Console {
        #[command(flatten)]
        target: Target,
    },
    /// Layer a Diff snapshot's memory file onto the memory file of the snapshot it was taken
    /// over (changed in place); that file then restores with the Diff's state file. Refused
    /// unless the two snapshots follow one another and their sizes match.
    #[command(name = "snapshot-layer")]
    SnapshotLayer {
        /// The Diff snapshot's state file.
        #[arg(long, value_name = "PATH")]
        diff_snapshot: PathBuf,
        /// The Diff snapshot's memory file.
        #[arg(long, value_name = "PATH")]
        diff_mem: PathBuf,
        /// The state file the base memory file goes with: the Full snapshot the Diff follows,
        /// or the Diff layered onto the base last.
        #[arg(long, value_name = "PATH")]
        base_snapshot: PathBuf,
        /// The base memory file, written in place.
        #[arg(long, value_name = "PATH")]
        base_mem: PathBuf,
    },
    /// Serve a restored VM's memory from a snapshot's memory file: the page-fault handler of
    /// `--mem-uffd` (Firecracker's Uffd backend; Firecracker's message is taken too). Listens
    /// on SOCKET for one VMM, fills each page the guest first touches from MEM (zeros where
    /// MEM has a hole, or where the balloon gave the page back) and exits 0 when the VMM
    /// closes its end; 1 on a bad message or a failed fill.
    #[command(name = "uffd-handler")]
    UffdHandler {
        /// The snapshot's memory file.
        #[arg(long, value_name = "MEM")]
        mem_file: PathBuf,
        /// The Unix socket to listen on (created; it must not exist).
        #[arg(long, value_name = "SOCKET")]
        socket: PathBuf,
    },
    /// Print pvm's manual page (roff) on stdout.
    #[command(hide = true)]
    Man,
    /// pvm's own helper (manage::cleanup): removes these sockets, if stale, once stdin ends.
    #[command(hide = true, name = cleanup::SUBCOMMAND)]
    CleanupSockets { paths: Vec<PathBuf> },
}

/// Why a subcommand failed.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{id}: {fault}")]
    Refused { id: String, fault: String },
    #[error("{id}: GET /pvm/info: {source}")]
    BadInfo {
        id: String,
        source: serde_json::Error,
    },
    #[error("'{0}' is not a VM id (1 to 64 letters, digits and '-') nor a socket path")]
    BadId(String),
    #[error(transparent)]
    Attach(#[from] attach::AttachError),
    #[error("writing the manual page: {0}")]
    Man(std::io::Error),
    #[error("snapshot-layer: {0}")]
    Layer(#[from] crate::snapshot::layer::LayerError),
    #[error("uffd-handler: {0}")]
    UffdHandler(#[from] crate::uffd::handler::HandlerError),
}

impl ManageError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ManageError::Client(ClientError::NoSocket(_) | ClientError::Stale(_)) => NO_SUCH_VM,
            ManageError::BadId(_) => crate::exit::USAGE_ERROR,
            _ => FAILED,
        }
    }
}

/// Runs `command`; returns the exit code.
pub fn run(command: Command) -> i32 {
    let result = match command {
        Command::List => list(),
        Command::Status { target, json } => status(&target, json),
        Command::Pause { target } => set_state(&target, "Paused"),
        Command::Resume { target } => set_state(&target, "Resumed"),
        Command::Stop { target, timeout } => stop(&target, Duration::from_secs(timeout)),
        Command::Console { target } => console(&target),
        Command::Man => man(),
        Command::SnapshotLayer {
            diff_snapshot,
            diff_mem,
            base_snapshot,
            base_mem,
        } => snapshot_layer(&crate::snapshot::layer::LayerSpec {
            diff_snapshot,
            diff_mem,
            base_snapshot,
            base_mem,
        }),
        Command::UffdHandler { mem_file, socket } => crate::uffd::handler::run(&mem_file, &socket)
            .map(|()| 0)
            .map_err(ManageError::from),
        Command::CleanupSockets { paths } => Ok(cleanup::run(&paths)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if let ManageError::Client(ClientError::Stale(path)) = &e {
                let _ = rundir::remove_if_stale(path);
            }
            crate::logger::to_stderr(&format!("pvm: {}\n", crate::exit::error_chain(&e)));
            e.exit_code()
        }
    }
}

/// `pvm snapshot-layer`: says how much was copied.
fn snapshot_layer(spec: &crate::snapshot::layer::LayerSpec) -> Result<i32, ManageError> {
    let copied = crate::snapshot::layer::layer(spec)?;
    println!(
        "{}: {copied} bytes of {} layered; restore it with {}",
        spec.base_mem.display(),
        spec.diff_mem.display(),
        spec.diff_snapshot.display()
    );
    Ok(0)
}

/// The API socket `target` names.
fn api_socket(target: &Target) -> Result<PathBuf, ManageError> {
    if target.id.contains('/') {
        return Ok(PathBuf::from(&target.id));
    }
    if !crate::cli::is_valid_id(&target.id) {
        return Err(ManageError::BadId(target.id.clone()));
    }
    Ok(rundir::api_socket(&rundir::run_dir()?, &target.id))
}

/// `GET /pvm/info` of the VM at `socket`.
fn info_at(socket: &std::path::Path, name: &str) -> Result<PvmInfo, ManageError> {
    let answer = request(socket, "GET", "/pvm/info", None)?;
    let answer = refused(name, answer)?;
    serde_json::from_str(&answer.body).map_err(|source| ManageError::BadInfo {
        id: name.to_string(),
        source,
    })
}

fn refused(id: &str, answer: Answer) -> Result<Answer, ManageError> {
    if answer.ok() {
        Ok(answer)
    } else {
        Err(ManageError::Refused {
            id: id.to_string(),
            fault: answer.fault(),
        })
    }
}

fn list() -> Result<i32, ManageError> {
    let dir = rundir::run_dir()?;
    let mut sockets: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "sock"))
            .collect(),
        // No run directory yet: no VM has run.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(RunDirError::Create { path: dir, source }.into());
        }
    };
    sockets.sort();
    let mut rows = vec![info::HEADER.map(str::to_string)];
    for socket in sockets {
        let name = socket
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        match info_at(&socket, &name) {
            Ok(info) => rows.push(info.row()),
            Err(ManageError::Client(ClientError::Stale(_))) => {
                // Its pvm has ended: the socket goes, and its console socket if stale too.
                // (Not a socket at all: said, and left alone.)
                if let Err(e) = rundir::remove_if_stale(&socket) {
                    crate::logger::to_stderr(&format!("pvm: list: {e}\n"));
                }
                let _ = rundir::remove_if_stale(&rundir::console_socket(&dir, &name));
            }
            Err(ManageError::Client(ClientError::NoSocket(_))) => {}
            Err(e) => {
                // Not ours to remove: say what is wrong with it and go on.
                crate::logger::to_stderr(&format!("pvm: list: {}\n", crate::exit::error_chain(&e)));
            }
        }
    }
    print_out(&info::table(&rows));
    Ok(0)
}

fn status(target: &Target, json: bool) -> Result<i32, ManageError> {
    let socket = api_socket(target)?;
    let info = info_at(&socket, &target.id)?;
    if json {
        let text = serde_json::to_string_pretty(&info).map_err(|source| ManageError::BadInfo {
            id: target.id.clone(),
            source,
        })?;
        print_out(&format!("{text}\n"));
    } else {
        print_out(&info.describe());
    }
    Ok(0)
}

fn set_state(target: &Target, state: &str) -> Result<i32, ManageError> {
    let socket = api_socket(target)?;
    let body = format!(r#"{{"state":"{state}"}}"#);
    refused(&target.id, request(&socket, "PATCH", "/vm", Some(&body))?)?;
    Ok(0)
}

fn stop(target: &Target, timeout: Duration) -> Result<i32, ManageError> {
    let socket = api_socket(target)?;
    let info = info_at(&socket, &target.id)?;
    let pid = client::server_pid(&socket)?;
    if pid != info.pid || pid <= 1 {
        return Err(ManageError::Refused {
            id: target.id.clone(),
            fault: format!(
                "the socket's server is pid {pid} but says it is pid {}; not signalling either",
                info.pid
            ),
        });
    }
    let body = r#"{"action_type":"SendCtrlAltDel"}"#;
    match request(&socket, "PUT", "/actions", Some(body)) {
        Ok(answer) if !answer.ok() => {
            crate::logger::to_stderr(&format!(
                "pvm: stop: {}: SendCtrlAltDel refused: {}\n",
                target.id,
                answer.fault()
            ));
        }
        // The VM may end before it answers.
        _ => {}
    }
    if wait_gone(pid, timeout) {
        return Ok(0);
    }
    for (signal, code, grace) in [
        (libc::SIGTERM, STOPPED_BY_SIGTERM, Duration::from_secs(5)),
        (libc::SIGKILL, STOPPED_BY_SIGKILL, Duration::from_secs(5)),
    ] {
        crate::logger::to_stderr(&format!(
            "pvm: stop: {} (pid {pid}) still runs; sending signal {signal}\n",
            target.id
        ));
        // SAFETY: kill only sends a signal; pid is the one the VM reported for itself.
        unsafe { libc::kill(pid, signal) };
        if wait_gone(pid, grace) {
            return Ok(code);
        }
    }
    Ok(FAILED)
}

/// Waits up to `timeout` for process `pid` to end (or become a zombie its parent has not
/// reaped yet); true if it did.
fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rfind(')')
            .and_then(|at| stat[at + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn console(target: &Target) -> Result<i32, ManageError> {
    let socket = api_socket(target)?;
    let info = info_at(&socket, &target.id)?;
    let Some(path) = info.console_socket else {
        return Err(ManageError::Refused {
            id: target.id.clone(),
            fault: "the VM has no console socket (start it with --console socket)".to_string(),
        });
    };
    attach::attach(std::path::Path::new(&path))?;
    Ok(0)
}

fn man() -> Result<i32, ManageError> {
    let mut page = Vec::new();
    clap_mangen::Man::new(crate::cli::command())
        .render(&mut page)
        .map_err(ManageError::Man)?;
    std::io::Write::write_all(&mut std::io::stdout(), &page).map_err(ManageError::Man)?;
    Ok(0)
}

/// Writes to stdout without panicking on a closed pipe (`pvm list | head -1`).
fn print_out(text: &str) {
    let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
}

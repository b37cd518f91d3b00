//! The per-user run directory where running pvms keep their sockets: `$XDG_RUNTIME_DIR/pvm/`
//! when that variable is set, else `/run/pvm/` for root; a user with neither has none. A VM
//! with id ID serves its API on `ID.sock` there, and `--console socket` puts its console on
//! `ID.console` beside it.
//!
//! A socket nobody serves any more (its pvm died, or ended under the sandbox, which may not
//! unlink) is stale: connecting to it is refused. Stale sockets are removed by whoever notices
//! them: `pvm list`, a subcommand naming that id, a new pvm claiming the path. Only sockets are
//! ever removed; any other file in the way is reported and left alone.

use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Why the run directory or a socket path in it cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("no run directory: $XDG_RUNTIME_DIR is not set and pvm does not run as root")]
    NoRunDir,
    #[error("run directory {}: {source}", .path.display())]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "run directory {}: not a directory of this user's that only it may write to; \
         refusing to use it", .0.display()
    )]
    Unsafe(PathBuf),
    #[error("{}: a running pvm already serves this socket (is the id in use?)", .0.display())]
    InUse(PathBuf),
    #[error("{}: exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    #[error("{}: {source}", .path.display())]
    Probe {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The run directory for this user, by the rules above (not created).
pub fn run_dir() -> Result<PathBuf, RunDirError> {
    run_dir_for(
        std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from),
        // SAFETY: geteuid has no failure mode and touches no memory.
        unsafe { libc::geteuid() } == 0,
    )
}

fn run_dir_for(xdg: Option<PathBuf>, root: bool) -> Result<PathBuf, RunDirError> {
    match xdg {
        // The XDG spec wants an absolute path; a relative one is ignored, as if unset.
        Some(dir) if dir.is_absolute() => Ok(dir.join("pvm")),
        _ if root => Ok(PathBuf::from("/run/pvm")),
        _ => Err(RunDirError::NoRunDir),
    }
}

/// The API socket of VM `id` in `dir`.
pub fn api_socket(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.sock"))
}

/// The console socket of VM `id` in `dir`.
pub fn console_socket(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.console"))
}

/// Creates `dir` (mode 0700) if missing and checks that it is this user's and writable by no
/// one else, so nobody else can plant or swap sockets in it.
pub fn ensure(dir: &Path) -> Result<(), RunDirError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| RunDirError::Create {
            path: dir.to_path_buf(),
            source,
        })?;
    let meta = std::fs::symlink_metadata(dir).map_err(|source| RunDirError::Create {
        path: dir.to_path_buf(),
        source,
    })?;
    // SAFETY: geteuid has no failure mode and touches no memory.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me || meta.permissions().mode() & 0o022 != 0 {
        return Err(RunDirError::Unsafe(dir.to_path_buf()));
    }
    Ok(())
}

/// What is at a socket path.
#[derive(Debug, PartialEq, Eq)]
pub enum Probe {
    /// Nothing.
    Absent,
    /// A socket someone accepts connections on.
    Live,
    /// A socket nobody serves: connecting is refused.
    Stale,
}

/// Looks at `path` without changing anything.
pub fn probe(path: &Path) -> Result<Probe, RunDirError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Probe::Absent),
        Err(source) => {
            return Err(RunDirError::Probe {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(RunDirError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Ok(Probe::Live),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Ok(Probe::Stale),
        // Removed between the stat and the connect: its pvm just ended.
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Probe::Absent),
        Err(source) => Err(RunDirError::Probe {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Removes the socket at `path` if it is stale; true if it did.
pub fn remove_if_stale(path: &Path) -> Result<bool, RunDirError> {
    if probe(path)? != Probe::Stale {
        return Ok(false);
    }
    match std::fs::remove_file(path) {
        Ok(()) => {
            log::info!("removed the stale socket {}", path.display());
            Ok(true)
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(true),
        Err(source) => Err(RunDirError::Probe {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Makes `path` free for a new socket: nothing there, or a stale socket (removed); a live
/// socket or another kind of file is an error.
pub fn claim(path: &Path) -> Result<(), RunDirError> {
    remove_if_stale(path)?;
    match probe(path)? {
        Probe::Absent => Ok(()),
        Probe::Live | Probe::Stale => Err(RunDirError::InUse(path.to_path_buf())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pvm-rundir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_run_dir_rules() {
        let xdg = Some(PathBuf::from("/run/user/1000"));
        assert_eq!(
            run_dir_for(xdg.clone(), false).unwrap(),
            Path::new("/run/user/1000/pvm")
        );
        assert_eq!(
            run_dir_for(xdg, true).unwrap(),
            Path::new("/run/user/1000/pvm")
        );
        assert_eq!(run_dir_for(None, true).unwrap(), Path::new("/run/pvm"));
        assert!(matches!(
            run_dir_for(None, false),
            Err(RunDirError::NoRunDir)
        ));
        assert!(matches!(
            run_dir_for(Some(PathBuf::from("relative")), false),
            Err(RunDirError::NoRunDir)
        ));
    }

    #[test]
    fn stale_sockets_are_removed_live_ones_and_other_files_kept() {
        let dir = scratch("stale");
        ensure(&dir).unwrap();
        let live = api_socket(&dir, "live");
        let _listener = UnixListener::bind(&live).unwrap();
        assert_eq!(probe(&live).unwrap(), Probe::Live);
        assert!(matches!(claim(&live), Err(RunDirError::InUse(_))));
        let stale = api_socket(&dir, "stale");
        drop(UnixListener::bind(&stale).unwrap());
        assert_eq!(probe(&stale).unwrap(), Probe::Stale);
        claim(&stale).unwrap();
        assert!(!stale.exists());
        // A fake "socket" that is a plain file is not touched.
        let fake = api_socket(&dir, "fake");
        std::fs::write(&fake, "not a socket").unwrap();
        assert!(matches!(
            remove_if_stale(&fake),
            Err(RunDirError::NotASocket(_))
        ));
        assert!(fake.exists());
        assert_eq!(probe(&dir.join("none.sock")).unwrap(), Probe::Absent);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_run_dir_others_may_write_is_refused() {
        let dir = scratch("unsafe");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(ensure(&dir), Err(RunDirError::Unsafe(_))));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        ensure(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! `PUT /snapshot/create` and `PUT /snapshot/load`: Firecracker's bodies, checked on the API
//! thread; what pvm does not do (a target format version) is refused naming
//! the field, never accepted and ignored.

use std::path::PathBuf;

use serde::Deserialize;

use super::routes::RouteError;
use crate::vm::MemSource;

/// `PUT /snapshot/create`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    #[serde(default)]
    pub snapshot_type: Option<SnapshotType>,
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
    /// Firecracker's old field for the target format version: pvm writes one version.
    #[serde(default)]
    pub version: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum SnapshotType {
    Full,
    Diff,
}

impl SnapshotCreate {
    /// Full unless the body asks for a Diff (Firecracker's default is Full).
    pub fn kind(&self) -> crate::snapshot::SnapshotKind {
        match self.snapshot_type {
            Some(SnapshotType::Diff) => crate::snapshot::SnapshotKind::Diff,
            Some(SnapshotType::Full) | None => crate::snapshot::SnapshotKind::Full,
        }
    }
}

/// `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    pub snapshot_path: PathBuf,
    /// The older way to name the memory file (Firecracker deprecated it for `mem_backend`).
    #[serde(default)]
    pub mem_file_path: Option<PathBuf>,
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: BackendType,
    pub backend_path: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum BackendType {
    File,
    Uffd,
}

/// A clone's interface on another tap.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// A load request as pvm will carry it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadRequest {
    pub snapshot_path: PathBuf,
    pub mem: crate::vm::MemSource,
    pub resume_vm: bool,
    pub network_overrides: Vec<NetworkOverride>,
    /// Keep logging dirty pages in the restored VM (for its Diff snapshots).
    pub track_dirty_pages: bool,
}

fn refuse(path: &str, why: &'static str) -> RouteError {
    RouteError::Unsupported {
        method: "PUT",
        path: path.to_string(),
        why,
    }
}

/// Checks a create body (whether a Diff can be taken is the VM's to say).
pub fn check_create(body: SnapshotCreate) -> Result<SnapshotCreate, RouteError> {
    const PATH: &str = "snapshot/create";
    if body.version.is_some() {
        return Err(refuse(
            PATH,
            "version: pvm writes its one snapshot format version; leave version out",
        ));
    }
    Ok(body)
}

/// Checks a load body and picks the memory file from `mem_backend` or `mem_file_path`.
pub fn check_load(body: SnapshotLoad) -> Result<LoadRequest, RouteError> {
    const PATH: &str = "snapshot/load";
    let mem = match (body.mem_backend, body.mem_file_path) {
        (Some(_), Some(_)) => {
            return Err(refuse(
                PATH,
                "give the memory file either as mem_backend or as mem_file_path, not both",
            ));
        }
        (None, None) => {
            return Err(refuse(
                PATH,
                "no memory file: give mem_backend (backend_type File) or mem_file_path",
            ));
        }
        (Some(backend), None) => match backend.backend_type {
            BackendType::File => MemSource::File(backend.backend_path),
            // backend_path is the page-fault handler's socket.
            BackendType::Uffd => MemSource::Uffd(backend.backend_path),
        },
        (None, Some(path)) => MemSource::File(path),
    };
    Ok(LoadRequest {
        snapshot_path: body.snapshot_path,
        mem,
        resume_vm: body.resume_vm,
        network_overrides: body.network_overrides,
        // enable_diff_snapshots is Firecracker's deprecated name for it.
        track_dirty_pages: body.track_dirty_pages || body.enable_diff_snapshots,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(json: &str) -> Result<LoadRequest, String> {
        let body: SnapshotLoad = serde_json::from_str(json).map_err(|e| e.to_string())?;
        check_load(body).map_err(|e| e.to_string())
    }

    fn create(json: &str) -> Result<SnapshotCreate, String> {
        let body: SnapshotCreate = serde_json::from_str(json).map_err(|e| e.to_string())?;
        check_create(body).map_err(|e| e.to_string())
    }

    #[test]
    fn firecracker_bodies_are_taken() {
        let r = load(
            r#"{"snapshot_path":"s","mem_backend":{"backend_type":"File","backend_path":"m"},
                "resume_vm":true,"network_overrides":[{"iface_id":"eth0","host_dev_name":"tap9"}]}"#,
        )
        .unwrap();
        assert_eq!(r.mem, MemSource::File(PathBuf::from("m")));
        assert!(r.resume_vm);
        assert_eq!(r.network_overrides[0].host_dev_name, "tap9");
        let r = load(r#"{"snapshot_path":"s","mem_file_path":"m2"}"#).unwrap();
        assert_eq!(r.mem, MemSource::File(PathBuf::from("m2")));
        let r = load(
            r#"{"snapshot_path":"s","mem_backend":{"backend_type":"Uffd","backend_path":"u.sock"}}"#,
        )
        .unwrap();
        assert_eq!(r.mem, MemSource::Uffd(PathBuf::from("u.sock")));
        assert!(!r.resume_vm);
        let c = create(r#"{"snapshot_type":"Full","snapshot_path":"s","mem_file_path":"m"}"#);
        assert_eq!(c.unwrap().kind(), crate::snapshot::SnapshotKind::Full);
        let c = create(r#"{"snapshot_type":"Diff","snapshot_path":"s","mem_file_path":"m"}"#);
        assert_eq!(c.unwrap().kind(), crate::snapshot::SnapshotKind::Diff);
        assert!(
            create(r#"{"snapshot_type":"diff","snapshot_path":"s","mem_file_path":"m"}"#).is_err()
        );
        assert!(!r.track_dirty_pages);
        for field in ["track_dirty_pages", "enable_diff_snapshots"] {
            let body = format!(r#"{{"snapshot_path":"s","mem_file_path":"m","{field}":true}}"#);
            assert!(load(&body).unwrap().track_dirty_pages, "{field}");
        }
        assert!(create(r#"{"snapshot_path":"s","mem_file_path":"m"}"#).is_ok());
    }

    #[test]
    fn what_pvm_does_not_do_is_refused_by_name() {
        let cases = [
            (
                load(
                    r#"{"snapshot_path":"s","mem_backend":{"backend_type":"Uffd","backend_path":"u","x":1}}"#,
                ),
                "unknown field",
            ),
            (
                load(r#"{"snapshot_path":"s","mem_backend":{"backend_type":"Uffd"}}"#),
                "backend_path",
            ),
            (
                load(
                    r#"{"snapshot_path":"s","mem_file_path":"m","mem_backend":{"backend_type":"File","backend_path":"m"}}"#,
                ),
                "not both",
            ),
            (load(r#"{"snapshot_path":"s"}"#), "no memory file"),
            (
                load(r#"{"snapshot_path":"s","mem_file_path":"m","extra":1}"#),
                "unknown field",
            ),
            (
                load(
                    r#"{"snapshot_path":"s","mem_backend":{"backend_type":"Disk","backend_path":"m"}}"#,
                ),
                "unknown variant",
            ),
        ];
        for (result, want) in cases {
            let e = result.unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        let e =
            create(r#"{"snapshot_path":"s","mem_file_path":"m","version":"1.0.0"}"#).unwrap_err();
        assert!(e.contains("version"), "{e}");
        assert!(
            create(r#"{"snapshot_path":"s"}"#)
                .unwrap_err()
                .contains("mem_file_path")
        );
    }
}

//! From a parsed HTTP request to an [`Action`] for the VMM, on the API thread: the path is
//! routed, ids are checked, the JSON body is decoded into its model. Everything that can be
//! refused without the VM's state is refused here.

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::http::{Method, Request};
use super::models::{
    Balloon, BalloonStartCmd, BalloonStatsUpdate, BalloonStopCmd, BalloonUpdate, BootSource, Drive,
    Entropy, Logger, MachineConfig, MachineConfigUpdate, Metrics, NetworkInterface, PartialDrive,
    PartialNetworkInterface, Serial, Vsock,
};

/// What the API asks the VMM (main) thread to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    GetInstanceInfo,
    GetVersion,
    GetMachineConfig,
    GetVmConfig,
    /// `GET /pvm/info`, a pvm extension: what `pvm list` and `pvm status` show.
    GetPvmInfo,
    PutBootSource(BootSource),
    PutDrive(Drive),
    PutNetworkInterface(NetworkInterface),
    PutMachineConfig(MachineConfig),
    PatchMachineConfig(MachineConfigUpdate),
    PutEntropy(Entropy),
    PutLogger(Logger),
    PutMetrics(Metrics),
    PutSerial(Serial),
    PutVsock(Vsock),
    PatchDrive(PartialDrive),
    /// A PATCH /drives with path_on_host whose file the API thread opened.
    SwapDrive(PartialDrive, super::swap::OpenedDisk),
    PatchNetworkInterface(PartialNetworkInterface),
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
    Pause,
    Resume,
    PutBalloon(Balloon),
    PatchBalloon(BalloonUpdate),
    PatchBalloonStats(BalloonStatsUpdate),
    GetBalloon,
    GetBalloonStats,
    /// `PATCH /balloon/hinting/start`.
    StartBalloonHinting(BalloonStartCmd),
    /// `PATCH /balloon/hinting/stop`.
    StopBalloonHinting,
    /// `GET /balloon/hinting/status`.
    GetBalloonHintingStatus,
    /// `PUT /snapshot/create` (full snapshots).
    CreateSnapshot(super::snapshot::SnapshotCreate),
    /// `PUT /snapshot/load`.
    LoadSnapshot(super::snapshot::LoadRequest),
}

/// Why a request was refused before reaching the VMM: the fault_message text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("Empty {0} request.")]
    EmptyBody(&'static str),
    #[error("GET request cannot have a body.")]
    GetBody,
    #[error("Invalid request method and/or path: {method} {path}.")]
    UnknownPath { method: &'static str, path: String },
    #[error("The ID cannot be empty.")]
    EmptyId,
    #[error("API Resource IDs can only contain alphanumeric characters and underscores.")]
    BadId,
    #[error("The id from the path [{path}] does not match the id from the body [{body}]!")]
    IdMismatch { path: String, body: String },
    #[error("An error occurred when deserializing the json body of a request: {0}.")]
    Json(String),
    #[error("{method} /{path}: {why}")]
    Unsupported {
        method: &'static str,
        path: String,
        why: &'static str,
    },
}

/// `PUT /actions`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: ActionType,
}

#[derive(Deserialize)]
enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// `PATCH /vm`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmStateBody {
    state: VmState,
}

#[derive(Deserialize)]
enum VmState {
    Paused,
    Resumed,
}

/// Endpoints Firecracker has and pvm does not (yet), and why.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("mmds", "pvm does not support MMDS"),
    ("cpu-config", "pvm does not support CPU templates"),
    ("hotplug", "pvm does not support memory hotplug"),
    ("pmem", "pvm does not support virtio-pmem"),
];

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, RouteError> {
    serde_json::from_slice(body).map_err(|e| RouteError::Json(e.to_string()))
}

/// Firecracker's id rule: non-empty, letters, digits and '_'.
fn checked_id(id: Option<&str>) -> Result<&str, RouteError> {
    match id {
        None | Some("") => Err(RouteError::EmptyId),
        Some(id) if id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => Ok(id),
        Some(_) => Err(RouteError::BadId),
    }
}

fn same_id(path: &str, body: &str) -> Result<(), RouteError> {
    if path == body {
        Ok(())
    } else {
        Err(RouteError::IdMismatch {
            path: path.to_string(),
            body: body.to_string(),
        })
    }
}

/// Routes `request` to an action.
pub fn route(request: &Request) -> Result<Action, RouteError> {
    let method = request.method;
    let body = request.body.as_slice();
    // Body presence is checked before the path, as Firecracker does.
    match method {
        Method::Get if !body.is_empty() => return Err(RouteError::GetBody),
        Method::Put | Method::Patch if body.is_empty() => {
            return Err(RouteError::EmptyBody(method.name()));
        }
        _ => {}
    }
    let path = request.path.strip_prefix('/').unwrap_or(&request.path);
    let mut segments = path.split('/');
    let first = segments.next().unwrap_or_default();
    let id = segments.next();
    let unknown = || RouteError::UnknownPath {
        method: method.name(),
        path: first.to_string(),
    };
    let action = match (method, first) {
        (Method::Get, "") => Action::GetInstanceInfo,
        (Method::Get, "version") => Action::GetVersion,
        (Method::Get, "machine-config") => Action::GetMachineConfig,
        (Method::Get, "vm") if id == Some("config") => Action::GetVmConfig,
        (Method::Get, "pvm") if id == Some("info") && segments.next().is_none() => {
            Action::GetPvmInfo
        }
        (Method::Put, "boot-source") => Action::PutBootSource(decode(body)?),
        (Method::Put, "machine-config") => Action::PutMachineConfig(decode(body)?),
        (Method::Patch, "machine-config") => {
            let update: MachineConfigUpdate = decode(body)?;
            if update.is_empty() {
                return Err(RouteError::EmptyBody("PATCH"));
            }
            Action::PatchMachineConfig(update)
        }
        (Method::Put, "entropy") => Action::PutEntropy(decode(body)?),
        (Method::Put, "logger") => Action::PutLogger(decode(body)?),
        (Method::Put, "metrics") => Action::PutMetrics(decode(body)?),
        (Method::Put, "serial") => Action::PutSerial(decode(body)?),
        (Method::Put, "vsock") => Action::PutVsock(decode(body)?),
        (Method::Put, "drives") => {
            let id = checked_id(id)?;
            let drive: Drive = decode(body)?;
            same_id(id, &drive.drive_id)?;
            Action::PutDrive(drive)
        }
        (Method::Put, "network-interfaces") => {
            let id = checked_id(id)?;
            let iface: NetworkInterface = decode(body)?;
            same_id(id, &iface.iface_id)?;
            Action::PutNetworkInterface(iface)
        }
        (Method::Put, "actions") => match decode::<ActionBody>(body)?.action_type {
            ActionType::InstanceStart => Action::InstanceStart,
            ActionType::SendCtrlAltDel => Action::SendCtrlAltDel,
            ActionType::FlushMetrics => Action::FlushMetrics,
        },
        (Method::Patch, "vm") => match decode::<VmStateBody>(body)?.state {
            VmState::Paused => Action::Pause,
            VmState::Resumed => Action::Resume,
        },
        (Method::Put, "snapshot") if id == Some("create") => {
            Action::CreateSnapshot(super::snapshot::check_create(decode(body)?)?)
        }
        (Method::Put, "snapshot") if id == Some("load") => {
            Action::LoadSnapshot(super::snapshot::check_load(decode(body)?)?)
        }
        (Method::Patch, "drives") => {
            let id = checked_id(id)?;
            let drive: PartialDrive = decode(body)?;
            same_id(id, &drive.drive_id)?;
            Action::PatchDrive(drive)
        }
        (Method::Patch, "network-interfaces") => {
            let id = checked_id(id)?;
            let iface: PartialNetworkInterface = decode(body)?;
            same_id(id, &iface.iface_id)?;
            Action::PatchNetworkInterface(iface)
        }
        (_, "balloon") => {
            let (rest, beyond) = (segments.next(), segments.next());
            balloon_route(method, id, rest, beyond.is_some(), body)?
        }
        (Method::Delete, "drives" | "network-interfaces") => {
            return Err(RouteError::Unsupported {
                method: method.name(),
                path: first.to_string(),
                why: "pvm does not support removing devices of a running VM yet",
            });
        }
        _ => {
            return Err(match UNSUPPORTED.iter().find(|(name, _)| *name == first) {
                Some((_, why)) => RouteError::Unsupported {
                    method: method.name(),
                    path: first.to_string(),
                    why,
                },
                None => unknown(),
            });
        }
    };
    Ok(action)
}

/// `/balloon`, `/balloon/statistics` and `/balloon/hinting/{start,stop,status}`.
fn balloon_route(
    method: Method,
    sub: Option<&str>,
    rest: Option<&str>,
    // A fourth path segment: no balloon path has one.
    beyond: bool,
    body: &[u8],
) -> Result<Action, RouteError> {
    let rest = if beyond { Some("") } else { rest };
    let path = match sub {
        Some(sub) => format!("balloon/{sub}"),
        None => "balloon".to_string(),
    };
    Ok(match (method, sub, rest) {
        (Method::Put, None, None) => Action::PutBalloon(decode(body)?),
        (Method::Patch, None, None) => Action::PatchBalloon(decode(body)?),
        (Method::Get, None, None) => Action::GetBalloon,
        (Method::Patch, Some("statistics"), None) => Action::PatchBalloonStats(decode(body)?),
        (Method::Get, Some("statistics"), None) => Action::GetBalloonStats,
        (Method::Patch, Some("hinting"), Some("start")) => {
            Action::StartBalloonHinting(decode(body)?)
        }
        (Method::Patch, Some("hinting"), Some("stop")) => {
            let _: BalloonStopCmd = decode(body)?;
            Action::StopBalloonHinting
        }
        (Method::Get, Some("hinting"), Some("status")) => Action::GetBalloonHintingStatus,
        _ => {
            return Err(RouteError::UnknownPath {
                method: method.name(),
                path,
            });
        }
    })
}

#[cfg(test)]
#[path = "routes_tests.rs"]
mod tests;

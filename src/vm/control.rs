//! The seam between the running VM's main loop and a control plane (the Firecracker API): the
//! main loop polls the plane's eventfd and lets it act on the VM through [`RunningVm`].

use vmm_sys_util::eventfd::EventFd;

use super::pause::{Pauser, VmRequest};
use crate::exit::EndSignal;

/// A control plane the main loop serves while the VM runs.
pub trait ControlPlane {
    /// Readable when the plane has work for the main thread.
    fn event(&self) -> &EventFd;
    /// Does that work, on the main thread.
    fn serve(&mut self, vm: &mut RunningVm<'_, '_>);
}

/// What a control plane may do to the running VM.
pub struct RunningVm<'a, 'p> {
    /// Ending the VM (the main loop sees it next).
    pub end: &'a EndSignal,
    /// Pausing and resuming it, as SIGUSR1/SIGUSR2 do.
    pub pauser: &'a mut Pauser<'p>,
}

/// Why a run-state change did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error(
        "Internal VMM error: the VM could not be paused (a vCPU or device did not stop; see the \
         log); it keeps running"
    )]
    PauseFailed,
}

impl RunningVm<'_, '_> {
    pub fn is_paused(&self) -> bool {
        self.pauser.is_paused()
    }

    /// The device pvm's messages call `name` (`block0`, ...), to act on it alone.
    pub fn device(&self, name: &str) -> Option<&crate::virtio_devices::PausableDevice> {
        self.pauser.device(name)
    }

    /// Snapshots the paused VM into `snapshot` and `mem_file`; `iface_ids` name its taps.
    pub fn create_snapshot(
        &self,
        snapshot: &std::path::Path,
        mem_file: &std::path::Path,
        iface_ids: &[String],
    ) -> Result<(), crate::snapshot::SnapshotError> {
        self.pauser.create_snapshot(snapshot, mem_file, iface_ids)
    }

    /// Pauses (true) or resumes (false) the VM; asking for the state it is in changes nothing.
    pub fn set_paused(&mut self, pause: bool) -> Result<(), ControlError> {
        let request = if pause {
            VmRequest::Pause
        } else {
            VmRequest::Resume
        };
        self.pauser.handle(request);
        if self.pauser.is_paused() == pause {
            Ok(())
        } else {
            Err(ControlError::PauseFailed)
        }
    }
}

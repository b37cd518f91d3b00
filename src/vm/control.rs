//! The seam between the running VM's main loop and a control plane (the Firecracker API): the
//! main loop polls the plane's eventfd and lets it act on the VM through [`RunningVm`].

use vmm_sys_util::eventfd::EventFd;

use std::sync::{Mutex, PoisonError};

use super::pause::{Pauser, VmRequest};
use crate::devices::i8042::{I8042, KeyboardFull};
use crate::exit::{EndSignal, Outcome};

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
    /// The keyboard controller, to type Ctrl-Alt-Del.
    pub keyboard: &'a Mutex<I8042>,
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

/// What Ctrl-Alt-Del did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtrlAltDel {
    /// The keys wait in the keyboard for the guest's driver.
    Typed,
    /// The guest has no keyboard driver (it never programmed the controller) and could never
    /// read the keys: it is reset instead, which ends the VM.
    Reset,
}

impl RunningVm<'_, '_> {
    /// Types Ctrl-Alt-Del on the guest's keyboard, or resets a guest without a keyboard driver.
    pub fn ctrl_alt_del(&self) -> Result<CtrlAltDel, KeyboardFull> {
        let mut keyboard = self.keyboard.lock().unwrap_or_else(PoisonError::into_inner);
        if !keyboard.driver_seen() {
            self.end.end(Outcome::Reboot);
            return Ok(CtrlAltDel::Reset);
        }
        keyboard.ctrl_alt_del()?;
        Ok(CtrlAltDel::Typed)
    }

    pub fn is_paused(&self) -> bool {
        self.pauser.is_paused()
    }

    /// The device pvm's messages call `name` (`block0`, ...), to act on it alone.
    pub fn device(&self, name: &str) -> Option<&crate::virtio_devices::PausableDevice> {
        self.pauser.device(name)
    }

    /// Snapshots the paused VM (`kind`: Full or Diff) into `snapshot` and `mem_file`; `ids` are the API's names of its drives and taps.
    pub fn create_snapshot(
        &self,
        kind: crate::snapshot::SnapshotKind,
        snapshot: &std::path::Path,
        mem_file: &std::path::Path,
        ids: &crate::snapshot::description::DeviceIds,
    ) -> Result<(), crate::snapshot::SnapshotError> {
        self.pauser.create_snapshot(kind, snapshot, mem_file, ids)
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

//! The seam between the running VM's main loop and a control plane (the Firecracker API): the
//! main loop polls the plane's eventfd and lets it act on the VM through [`RunningVm`].

use vmm_sys_util::eventfd::EventFd;

use crate::exit::EndSignal;

/// A control plane the main loop serves while the VM runs.
pub trait ControlPlane {
    /// Readable when the plane has work for the main thread.
    fn event(&self) -> &EventFd;
    /// Does that work, on the main thread.
    fn serve(&mut self, vm: &mut RunningVm<'_>);
}

/// What a control plane may do to the running VM.
pub struct RunningVm<'a> {
    /// Ending the VM (the main loop sees it next).
    pub end: &'a EndSignal,
}

/// Why a run-state change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("Internal VMM error: this pvm cannot pause or resume a VM yet")]
    NoPause,
}

impl RunningVm<'_> {
    pub fn is_paused(&self) -> bool {
        false
    }

    /// Pauses (true) or resumes (false) the VM.
    pub fn set_paused(&mut self, _pause: bool) -> Result<(), ControlError> {
        Err(ControlError::NoPause)
    }
}

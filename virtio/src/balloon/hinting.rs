//! The free page hinting queue (VIRTIO_BALLOON_F_FREE_PAGE_HINT). The host starts a run by
//! putting a fresh command id into the configuration space; the driver answers with a
//! device-readable buffer carrying that id, then device-writable buffers that are free pages it
//! holds for the run, and ends with a buffer carrying STOP. The pages hinted under the host's
//! current id go back to the host; the driver keeps them until the host sets DONE.
//!
//! Nothing the driver sends is trusted: a command buffer that is not exactly one le32, a page
//! range outside guest RAM, or pages hinted for an id the host is not running are refused and
//! counted, never acted on.

use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestMemoryMmap};

use super::pages::discard;
use super::shared::{HINT_CMD_ID_DONE, HINT_CMD_ID_STOP, Shared, lock};
use crate::chain::Chain;

/// What one hinting buffer asked of the device.
#[derive(Debug, Default)]
pub(crate) struct HintOutcome {
    /// The driver ended the run (sent STOP): answer with DONE if the host asked for that.
    pub(crate) ended: bool,
    /// Something in the buffer was refused (for the once-only warning).
    pub(crate) refused: Option<HintRefusal>,
    /// A range could not be given back (madvise or not RAM).
    pub(crate) discard_error: Option<super::DiscardError>,
}

/// Why part of a hinting buffer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HintRefusal {
    /// A device-readable buffer that is not one le32 command id, or not readable.
    BadCommand { len: u32 },
    /// Free pages sent while no run of the host's was under way, or for an older run.
    NotRunning,
}

/// Serves one buffer of the hinting queue.
pub(crate) fn handle_hint_chain(
    memory: &GuestMemoryMmap,
    chain: Chain<'_>,
    shared: &Shared,
) -> HintOutcome {
    let counters = &shared.counters;
    let mut outcome = HintOutcome::default();
    for desc in chain {
        if !desc.is_write_only() {
            let mut id = [0u8; 4];
            let read = memory.read_slice(&mut id, desc.addr());
            if desc.len() != 4 || read.is_err() {
                counters.refused_hints.fetch_add(1, Ordering::Relaxed);
                outcome.refused = Some(HintRefusal::BadCommand { len: desc.len() });
                continue;
            }
            let id = u32::from_le_bytes(id);
            lock(&shared.hint).status.guest_cmd = Some(id);
            // DONE is the host's to send; a driver sending it ends its run all the same.
            outcome.ended |= id == HINT_CMD_ID_STOP || id == HINT_CMD_ID_DONE;
            continue;
        }
        let status = lock(&shared.hint).status;
        let running =
            status.host_cmd > HINT_CMD_ID_DONE && status.guest_cmd == Some(status.host_cmd);
        if !running {
            // The pages may already be the guest's again: giving them away would lose data.
            counters.refused_hints.fetch_add(1, Ordering::Relaxed);
            outcome.refused = Some(HintRefusal::NotRunning);
            continue;
        }
        match discard(memory, desc.addr(), u64::from(desc.len())) {
            Ok(bytes) => {
                counters.hinted_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Err(e) => {
                counters.discard_failures.fetch_add(1, Ordering::Relaxed);
                outcome.discard_error = Some(e);
            }
        }
    }
    outcome
}

/// The driver ended a run: with acknowledge_on_stop the host's id becomes DONE, so the driver
/// takes its hinted pages back. Returns whether the configuration changed (the caller raises
/// the configuration-change interrupt).
pub(crate) fn acknowledge_end(shared: &Shared) -> bool {
    let mut hint = lock(&shared.hint);
    if !hint.ack_on_stop || hint.status.host_cmd <= HINT_CMD_ID_DONE {
        return false;
    }
    hint.status.host_cmd = HINT_CMD_ID_DONE;
    true
}

//! The raw-file block backend: pvm-virtio's virtio-blk request logic (chain validation, IN, OUT,
//! FLUSH as fdatasync, GET_ID, DISCARD, WRITE_ZEROES, read-only refusal) behind vhost-user.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use pvm_virtio::block::{self, DiskImage};
use pvm_virtio::{DeviceQueue, read_config_bytes};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackendMut;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::ring::{device_queue, with_ring};
use crate::{Memory, Vring, Watched};

/// Descriptors per queue (pvm-virtio's block queue size: seg_max depends on it).
const QUEUE_SIZE: u16 = block::QUEUE_SIZE;
/// The token of the wake-up eventfd a long pass signals (tokens 0 and 1 are the library's).
const WAKE: u16 = 2;

/// One disk served over vhost-user.
pub struct BlockBackend {
    disk: DiskImage,
    config: Vec<u8>,
    memory: Option<Memory>,
    queue: DeviceQueue,
}

impl BlockBackend {
    /// Opens and locks `path` as pvm's `--disk` does.
    pub fn open(
        path: &Path,
        read_only: bool,
        serial: Option<&str>,
    ) -> Result<Self, block::BlockError> {
        let disk = DiskImage::open(path, read_only, serial)?;
        let wake = EventFd::new(EFD_NONBLOCK).map_err(|source| block::BlockError::Open {
            path: path.to_owned(),
            source,
        })?;
        let queue =
            device_queue(0, QUEUE_SIZE, wake).map_err(|source| block::BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        Ok(BlockBackend {
            config: block::config_space(disk.sectors()),
            disk,
            memory: None,
            queue,
        })
    }

    pub fn disk(&self) -> &DiskImage {
        &self.disk
    }

    fn serve(&mut self, vring: &Vring) {
        let Some(memory) = self.memory.as_ref() else {
            return;
        };
        let memory = memory.memory();
        let disk = &self.disk;
        with_ring(vring, &mut self.queue, |queue, call| {
            queue.process(&memory, call, |chain| {
                block::serve_request(disk, &memory, chain)
            });
        });
    }
}

impl Watched for BlockBackend {
    fn watched(&self) -> Vec<(RawFd, EventSet, u64)> {
        vec![(self.queue.kick.as_raw_fd(), EventSet::IN, u64::from(WAKE))]
    }

    fn report(&self) -> Option<String> {
        Some(format!(
            "disk {}: io_errors={}",
            self.disk.name(),
            self.disk.errors().count()
        ))
    }
}

impl VhostUserBackendMut for BlockBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        block::offered_features(self.disk.is_read_only())
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIG: the frontend learns the capacity (and limits) with GET_CONFIG.
        VhostUserProtocolFeatures::CONFIG
    }

    fn exit_event(&self, _thread: usize) -> Option<(EventConsumer, EventNotifier)> {
        crate::exit_event()
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // The library sets it on the rings themselves.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The library bounds `size` (at most the config space message limit).
        let mut data = vec![0u8; size as usize];
        read_config_bytes(&self.config, u64::from(offset), &mut data);
        data
    }

    fn set_config(&mut self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Every field is read-only (no CONFIG_WCE); writes are ignored as virtio asks.
        Ok(())
    }

    fn update_memory(&mut self, memory: Memory) -> io::Result<()> {
        self.memory = Some(memory);
        Ok(())
    }

    fn stop_vring(&mut self, _index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the ring stops; its next start (driver reload) is a fresh ring.
        self.queue.restart();
        let _ = self.queue.kick.read();
        Ok(())
    }

    fn reset_device(&mut self) {
        self.queue.restart();
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _events: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Errors here would end the library's worker thread: a guest's bad request is answered
        // with a status, a broken ring is stopped, nothing is returned as an error.
        if device_event == WAKE {
            let _ = self.queue.kick.read();
        }
        if matches!(device_event, 0 | WAKE) {
            if let Some(vring) = vrings.first() {
                self.serve(vring);
            }
        }
        Ok(())
    }
}

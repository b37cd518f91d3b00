//! The tap net backend: pvm-virtio's tap (IFF_VNET_HDR, TUN offloads set from the features the
//! driver accepted) and its frame transmit and receive logic (mergeable receive buffers,
//! malformed chains dropped and counted) behind vhost-user.
//!
//! The tap is watched edge-triggered: the worker reads it until it is empty or the guest runs
//! out of receive buffers; in the latter case the frame read last waits for the next receive
//! kick. A pass that hits the frame budget signals a wake-up eventfd to come back after the
//! other events, as pvm's in-process device does.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use log::warn;
use pvm_virtio::net::{self, NetCounters, PendingFrame, TapSource, transmit, tun_offloads};
use pvm_virtio::{DeviceQueue, NetBackend as _, Tap, read_config_bytes};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackendMut;
use virtio_bindings::bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::ring::{device_queue, with_ring};
use crate::{Memory, Vring, Watched, feature};

const QUEUE_SIZE: u16 = net::QUEUE_SIZE;
const RX: u16 = 0;
const TX: u16 = 1;
// Token 2 is the library's (vring enabled / exit).
const TAP: u16 = 3;
const RX_WAKE: u16 = 4;
const TX_WAKE: u16 = 5;

/// Why the backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Tap(#[from] pvm_virtio::TapError),
    #[error("tap: cannot create an eventfd: {0}")]
    Eventfd(io::Error),
    #[error("tap: cannot set up a queue: {0}")]
    Queue(io::Error),
}

/// A tap served over vhost-user.
pub struct TapBackend {
    tap: Tap,
    mac: [u8; 6],
    config: [u8; 10],
    memory: Option<Memory>,
    rx: DeviceQueue,
    tx: DeviceQueue,
    mergeable: bool,
    /// The frame read last, while it waits for guest buffers; kept when a ring stops (a
    /// pause), delivered to whichever driver posts buffers next.
    pending: PendingFrame,
    counters: NetCounters,
}

impl TapBackend {
    /// Attaches to the tap `name` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, nonblocking); the guest
    /// gets `mac`, or a random locally administered one.
    pub fn open(name: &str, mac: Option<[u8; 6]>) -> Result<Self, OpenError> {
        let tap = Tap::open(name)?;
        let wake = || EventFd::new(EFD_NONBLOCK).map_err(OpenError::Eventfd);
        let rx = device_queue(RX, QUEUE_SIZE, wake()?).map_err(OpenError::Queue)?;
        let tx = device_queue(TX, QUEUE_SIZE, wake()?).map_err(OpenError::Queue)?;
        let mac = mac.unwrap_or_else(net::generated_mac);
        Ok(TapBackend {
            tap,
            mac,
            config: net::config_space(mac, 1),
            memory: None,
            rx,
            tx,
            mergeable: false,
            pending: PendingFrame::default(),
            counters: NetCounters::default(),
        })
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn counters(&self) -> &NetCounters {
        &self.counters
    }

    fn transmit_all(&mut self, vring: &Vring) {
        let Some(memory) = self.memory.as_ref() else {
            return;
        };
        let memory = memory.memory();
        let (tap, counters) = (&self.tap, &self.counters);
        with_ring(vring, &mut self.tx, |queue, call| {
            queue.process(&memory, call, |chain| {
                transmit(tap, &memory, chain, counters)
            });
        });
    }

    fn receive(&mut self, vring: &Vring) {
        let Some(memory) = self.memory.as_ref() else {
            return;
        };
        let memory = memory.memory();
        let Self {
            tap,
            rx,
            pending,
            counters,
            mergeable,
            ..
        } = self;
        with_ring(vring, rx, |rx, call| {
            // The tap is edge-triggered: whatever the end, the next tap event, receive kick or
            // (after a full pass) the queue's wake-up brings the worker back.
            let _ = rx.fill(
                &memory,
                call,
                &mut TapSource::new(tap, pending, *mergeable, counters),
            );
        });
    }
}

impl Watched for TapBackend {
    fn watched(&self) -> Vec<(RawFd, EventSet, u64)> {
        vec![
            (
                self.tap.as_raw_fd(),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                u64::from(TAP),
            ),
            (self.rx.kick.as_raw_fd(), EventSet::IN, u64::from(RX_WAKE)),
            (self.tx.kick.as_raw_fd(), EventSet::IN, u64::from(TX_WAKE)),
        ]
    }

    fn report(&self) -> Option<String> {
        Some(format!(
            "tap {}: {}",
            self.tap.name(),
            self.counters.summary()
        ))
    }
}

impl VhostUserBackendMut for TapBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        net::offered_features(self.tap.supported_offloads())
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&mut self, features: u64) {
        self.mergeable = features & feature(VIRTIO_NET_F_MRG_RXBUF) != 0;
        let offloads = tun_offloads(features);
        if let Err(e) = self.tap.set_offloads(offloads) {
            // The tap then sends only plain frames, which every guest handles.
            warn!(
                "tap {}: cannot enable offloads {offloads:#x}: {e}",
                self.tap.name()
            );
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIG: the frontend reads the MAC and link status with GET_CONFIG.
        VhostUserProtocolFeatures::CONFIG
    }

    fn exit_event(&self, _thread: usize) -> Option<(EventConsumer, EventNotifier)> {
        crate::exit_event()
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // The library sets it on the rings themselves.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut data = vec![0u8; size as usize];
        read_config_bytes(&self.config, u64::from(offset), &mut data);
        data
    }

    fn set_config(&mut self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // The MAC is read-only (no CTRL_MAC_ADDR); writes are ignored as virtio asks.
        Ok(())
    }

    fn update_memory(&mut self, memory: Memory) -> io::Result<()> {
        self.memory = Some(memory);
        Ok(())
    }

    fn stop_vring(&mut self, index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the ring stops (a pause, or a driver reset); when it starts again
        // it is served afresh from the position the frontend gives. A frame waiting for
        // receive buffers stays for whichever driver posts buffers next.
        let queue = match index {
            0 => &mut self.rx,
            1 => &mut self.tx,
            _ => return Ok(()),
        };
        queue.restart();
        let _ = queue.kick.read();
        Ok(())
    }

    fn reset_device(&mut self) {
        let _ = self.stop_vring(0);
        let _ = self.stop_vring(1);
        // The driver that comes next says again which offloads it takes.
        if let Err(e) = self.tap.set_offloads(0) {
            warn!("tap {}: cannot clear offloads: {e}", self.tap.name());
        }
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _events: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Errors here would end the library's worker thread: malformed chains are dropped and
        // counted, a broken ring is stopped, nothing is returned as an error.
        let (Some(rx), Some(tx)) = (vrings.first(), vrings.get(1)) else {
            return Ok(());
        };
        match device_event {
            RX | TAP => self.receive(rx),
            RX_WAKE => {
                let _ = self.rx.kick.read();
                self.receive(rx);
            }
            TX => self.transmit_all(tx),
            TX_WAKE => {
                let _ = self.tx.kick.read();
                self.transmit_all(tx);
            }
            _ => {}
        }
        Ok(())
    }
}

//! The call relay of out-of-process data planes on virtio-mmio: vhost (kernel or vhost-user)
//! signals an eventfd when it used buffers, but on virtio-mmio an interrupt must also set the
//! transport's interrupt status, which only pvm can do. The relay, on a device thread spawned
//! with the VM, turns each call into `Interrupt::notify_queue`. On virtio-pci the MSI-X irqfds
//! are handed to vhost directly and no relay runs.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use pvm_virtio::Interrupt;
use pvm_virtio::data_plane::DataPlaneError;
use pvm_virtio::thread::DeviceThread;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Turns vhost's call eventfds into `Interrupt::notify_queue` (virtio-mmio), on the plane's
/// relay thread.
pub(crate) struct Relay {
    kill: EventFd,
    queues: usize,
}

impl Relay {
    pub(crate) fn start(
        thread: &mut DeviceThread,
        label: &'static str,
        calls: Vec<(u16, EventFd)>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<Relay, DataPlaneError> {
        let host = |what| {
            move |source| DataPlaneError::Host {
                plane: label,
                what,
                source,
            }
        };
        let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(host("relay's kill eventfd"))?;
        let epoll = Epoll::new().map_err(host("relay's epoll"))?;
        let kill_token = calls.len() as u64;
        epoll
            .ctl(
                ControlOperation::Add,
                kill.as_raw_fd(),
                EpollEvent::new(EventSet::IN, kill_token),
            )
            .map_err(host("relay's epoll"))?;
        for (slot, (_, call)) in calls.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    call.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, slot as u64),
                )
                .map_err(host("relay's epoll"))?;
        }
        let queues = calls.len();
        let thread_kill = kill.try_clone().map_err(host("relay's kill eventfd"))?;
        thread
            .run(move || {
                let _keep_kill_open = thread_kill;
                let mut events = vec![EpollEvent::default(); calls.len() + 1];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            log::error!("{label} relay: epoll: {e}");
                            return;
                        }
                    };
                    for event in &events[..n] {
                        let token = event.data();
                        if token == kill_token {
                            return;
                        }
                        let (queue, call) = &calls[token as usize];
                        if call.read().is_ok() {
                            if let Err(e) = interrupt.notify_queue(*queue) {
                                log::warn!("{label} relay: interrupt for queue {queue}: {e}");
                            }
                        }
                    }
                }
            })
            .map_err(|source| DataPlaneError::Thread {
                plane: label,
                source,
            })?;
        Ok(Relay { kill, queues })
    }

    /// How many queues it relays.
    pub(crate) fn queues(&self) -> usize {
        self.queues
    }

    pub(crate) fn stop(self, thread: &mut DeviceThread) {
        if self.kill.write(1).is_ok() {
            thread.wait();
        }
    }
}

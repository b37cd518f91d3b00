//! Driving a backend binary through pvm's own vhost-user frontend (pvm_vhost::user) with memfd
//! guest memory and split rings laid out by virtio-queue's MockSplitQueue.

#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use pvm_virtio::{ActiveQueue, Interrupt};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// 16 MiB of memfd-backed guest RAM at 0 (rings at the bottom, buffers from 1 MiB).
pub fn shared_memory() -> GuestMemoryMmap {
    // SAFETY: a NUL-terminated name; no other memory is passed.
    let fd = unsafe { libc::memfd_create(c"vhost-user-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(16 << 20).unwrap();
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        16 << 20,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap()
}

/// A scratch directory under the target dir, unique per test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A backend process; waits until it listens. `wrapper` runs it (e.g. `ip netns exec NS`).
pub struct Backend {
    pub child: Child,
}

impl Backend {
    pub fn start(wrapper: &[&str], program: &str, args: &[&str]) -> Backend {
        let mut command = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        let mut child = command
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        assert!(line.contains(": serving "), "backend said {line:?}");
        // Keep draining so the backend never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                eprintln!("backend: {line}");
            }
        });
        Backend { child }
    }

    /// Waits for the backend to exit (it does once the frontend disconnected).
    pub fn wait(mut self) -> i32 {
        for _ in 0..100 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("the backend did not exit after the frontend disconnected");
    }
}

/// MSI-X-like interrupts: one irqfd per queue, handed to the backend as its call fd.
#[derive(Debug)]
pub struct Irqfds(pub Vec<EventFd>);

impl Irqfds {
    pub fn new(queues: usize) -> Arc<Irqfds> {
        Arc::new(Irqfds(
            (0..queues)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
        ))
    }

    /// Waits up to 10 s for an interrupt on `queue`.
    pub fn wait(&self, queue: usize) {
        let mut pfd = libc::pollfd {
            fd: self.0[queue].as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert_eq!(n, 1, "no interrupt on queue {queue} within 10 s");
        self.0[queue].read().unwrap();
    }
}

impl Interrupt for Irqfds {
    fn notify_queue(&self, queue: u16) -> std::io::Result<()> {
        self.0[usize::from(queue)].write(1)
    }
    fn notify_config(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn queue_irqfd(&self, queue: u16) -> Option<EventFd> {
        self.0.get(usize::from(queue))?.try_clone().ok()
    }
}

/// The driver's side of one split ring.
pub struct Ring<'m> {
    pub mock: MockSplitQueue<'m, GuestMemoryMmap>,
    mem: &'m GuestMemoryMmap,
    size: u16,
    next_desc: u16,
    seen_used: u16,
    pub kick: EventFd,
}

pub fn readable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, 0, 0))
}

pub fn writable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0))
}

impl<'m> Ring<'m> {
    /// A ring of `size` at `start`, zeroed first (a driver reload reuses memory).
    pub fn new(mem: &'m GuestMemoryMmap, start: u64, size: u16) -> Self {
        mem.write_slice(&vec![0u8; 0x8000], GuestAddress(start))
            .unwrap();
        Ring {
            mock: MockSplitQueue::create(mem, GuestAddress(start), size),
            mem,
            size,
            next_desc: 0,
            seen_used: 0,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }

    /// The queue as a transport hands it over at DRIVER_OK.
    pub fn active(&self, index: u16) -> ActiveQueue {
        ActiveQueue {
            index,
            queue: self.mock.create_queue::<Queue>().unwrap(),
            kick: self.kick.try_clone().unwrap(),
        }
    }

    /// Publishes a chain of `descs` and returns its head.
    pub fn add(&mut self, descs: &[RawDescriptor]) -> u16 {
        let first = self.next_desc;
        let linked: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, raw)| {
                let d = Descriptor::from(*raw);
                let last = i + 1 == descs.len();
                let index = (first + i as u16) % self.size;
                let (flags, next) = if last {
                    (d.flags() & !(VRING_DESC_F_NEXT as u16), 0)
                } else {
                    (
                        d.flags() | VRING_DESC_F_NEXT as u16,
                        (index + 1) % self.size,
                    )
                };
                RawDescriptor::from(Descriptor::new(d.addr().raw_value(), d.len(), flags, next))
            })
            .collect();
        self.mock.add_desc_chains(&linked, first).unwrap();
        self.next_desc = (first + descs.len() as u16) % self.size;
        first
    }

    /// Asks for an interrupt at the next used entry (used_event, with EVENT_IDX) and kicks.
    pub fn kick(&self) {
        self.want_interrupt();
        self.kick.write(1).unwrap();
    }

    /// Asks for an interrupt once the device adds the next used entry the driver has not seen
    /// (used_event = that index, as Linux's virtqueue_enable_cb does).
    pub fn want_interrupt(&self) {
        let used_event = self
            .mock
            .avail_addr()
            .unchecked_add(4 + 2 * u64::from(self.size));
        self.mem.write_obj(self.seen_used, used_event).unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the device added used entries the driver has not taken yet.
    pub fn has_used(&self) -> bool {
        let idx: u16 = self
            .mem
            .read_obj(self.mock.used_addr().unchecked_add(2))
            .unwrap();
        idx != self.seen_used
    }

    /// The used entries added since the last call, as (head, len).
    pub fn take_used(&mut self) -> Vec<(u16, u32)> {
        let used = self.mock.used_addr();
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.seen_used != idx {
            let slot = used.unchecked_add(4 + 8 * u64::from(self.seen_used % self.size));
            let id: u32 = self.mem.read_obj(slot).unwrap();
            let len: u32 = self.mem.read_obj(slot.unchecked_add(4)).unwrap();
            out.push((id as u16, len));
            self.seen_used = self.seen_used.wrapping_add(1);
        }
        out
    }
}

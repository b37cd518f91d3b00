//! The host side of virtio-net: a [`NetBackend`] is any nonblocking fd that carries one frame per
//! read/write, each prefixed with a 12-byte `virtio_net_hdr_v1`. [`Tap`] is the real one; tests
//! use a datagram socket pair.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::VNET_HDR_LEN;

/// The TUN_F_* guest offloads pvm may enable on a tap.
pub const GUEST_OFFLOADS: u32 =
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;

/// A frame transport for virtio-net.
pub trait NetBackend: AsRawFd + Send + Sync + fmt::Debug {
    /// Names the backend in logs ("tap0").
    fn name(&self) -> &str;

    /// The TUN_F_* offloads the backend can deliver to the guest (partially checksummed or
    /// GSO frames).
    fn supported_offloads(&self) -> u32;

    /// Enables exactly `offloads` (TUN_F_* flags): the ones the guest accepted.
    fn set_offloads(&self, offloads: u32) -> io::Result<()>;

    /// Multiqueue: attaches this queue of the interface (true) or detaches it (false), so the
    /// kernel steers no flow to a queue the guest does not serve. Backends without queues
    /// refuse.
    fn set_queue_attached(&self, _attached: bool) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap {name}: the name must be 1 to 15 bytes without NUL")]
    InvalidName { name: String },
    #[error("tap {name}: cannot open /dev/net/tun: {source}")]
    OpenTun { name: String, source: io::Error },
    #[error("tap {name}: cannot attach (TUNSETIFF): {source}")]
    Attach { name: String, source: io::Error },
    #[error(
        "tap {name}: cannot attach queue {queue} as a multi-queue tap (TUNSETIFF): {source} \
         (an existing tap must have been made multi-queue, e.g. `ip tuntap add {name} mode tap \
         multi_queue`, or let pvm create it)"
    )]
    AttachQueue {
        name: String,
        queue: u16,
        source: io::Error,
    },
    #[error("tap {name}: cannot set the vnet header size (TUNSETVNETHDRSZ): {source}")]
    VnetHeaderSize { name: String, source: io::Error },
    #[error("tap {name}: cannot reset offloads (TUNSETOFFLOAD): {source}")]
    Offloads { name: String, source: io::Error },
}

/// An open tap interface in IFF_TAP | IFF_NO_PI | IFF_VNET_HDR mode, nonblocking.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    supported_offloads: u32,
}

impl Tap {
    /// Another descriptor of the same tap queue, for a data plane outside pvm (vhost-net).
    pub fn try_clone_file(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Attaches to (or creates, given CAP_NET_ADMIN) the tap interface `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        Self::open_queue(name, None)
    }

    /// Opens `queues` queues of the tap interface `name`, one descriptor each: with more than
    /// one, the tap is opened IFF_MULTI_QUEUE (and created so if it does not exist). Every
    /// queue starts attached; the vnet header size and offloads are set on each.
    pub fn open_queues(name: &str, queues: u16) -> Result<Vec<Tap>, TapError> {
        if queues <= 1 {
            return Ok(vec![Self::open(name)?]);
        }
        (0..queues)
            .map(|queue| Self::open_queue(name, Some(queue)))
            .collect()
    }

    /// One descriptor of `name`; `queue` is Some for a queue of a multi-queue tap.
    fn open_queue(name: &str, queue: Option<u16>) -> Result<Tap, TapError> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(TapError::InvalidName {
                name: name.to_owned(),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun {
                name: name.to_owned(),
                source,
            })?;

        // SAFETY: ifreq is plain old data (a name array and a union of integers and pointers
        // that the kernel only interprets per request); all-zero is a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in request.ifr_name.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if queue.is_some() {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        request.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads (and may update the name in) the ifreq we own, for the
        // duration of the call; the fd is a valid /dev/net/tun fd.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
        if ret < 0 {
            let source = io::Error::last_os_error();
            let name = name.to_owned();
            return Err(match queue {
                Some(queue) => TapError::AttachQueue {
                    name,
                    queue,
                    source,
                },
                None => TapError::Attach { name, source },
            });
        }

        // Frames carry virtio_net_hdr_v1 (with num_buffers), the layout the guest uses with
        // VERSION_1, so headers pass through unchanged.
        let header_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid for the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &header_len) };
        if ret < 0 {
            return Err(TapError::VnetHeaderSize {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }

        let mut tap = Tap {
            file,
            name: name.to_owned(),
            supported_offloads: 0,
        };
        // A persistent tap keeps offloads from its previous user: find out what the kernel
        // accepts, then start from none until the guest says what it handles.
        tap.supported_offloads = [GUEST_OFFLOADS, libc::TUN_F_CSUM]
            .into_iter()
            .find(|&offloads| tap.set_offloads(offloads).is_ok())
            .unwrap_or(0);
        tap.set_offloads(0).map_err(|source| TapError::Offloads {
            name: name.to_owned(),
            source,
        })?;
        Ok(tap)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn name(&self) -> &str {
        &self.name
    }

    fn supported_offloads(&self) -> u32 {
        self.supported_offloads
    }

    fn set_offloads(&self, offloads: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is shared.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(offloads),
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn set_queue_attached(&self, attached: bool) -> io::Result<()> {
        // SAFETY: as for TUNSETIFF: an ifreq we own, valid for the call; only its flags are read.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        let flag = if attached {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        request.ifr_ifru.ifru_flags = flag as libc::c_short;
        // SAFETY: TUNSETQUEUE reads the ifreq we own for the duration of the call.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETQUEUE, &mut request) };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// Reads one frame (header included) from a nonblocking backend fd.
pub fn read_frame(fd: &(impl AsRawFd + ?Sized), buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: read writes at most `buf.len()` bytes into the valid, owned buffer.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_names_with_the_name_in_the_error() {
        for name in ["", "a-name-that-is-too-long", "ta\0p"] {
            let err = Tap::open(name).unwrap_err();
            assert!(matches!(err, TapError::InvalidName { .. }));
        }
        let err = Tap::open("way-too-long-tap-name").unwrap_err();
        assert!(
            err.to_string().starts_with("tap way-too-long-tap-name:"),
            "{err}"
        );
    }

    /// Needs CAP_NET_ADMIN and /dev/net/tun; skipped (passes) where they are missing.
    #[test]
    fn opens_a_real_tap_when_permitted() {
        match Tap::open("pvmtest0") {
            Ok(tap) => {
                assert_eq!(tap.name(), "pvmtest0");
                assert_eq!(tap.supported_offloads() & !GUEST_OFFLOADS, 0);
                tap.set_offloads(tap.supported_offloads()).unwrap();
                let mut buf = [0u8; 128];
                let err = read_frame(&tap, &mut buf).unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
            }
            Err(e) => {
                assert!(e.to_string().starts_with("tap pvmtest0:"), "{e}");
                eprintln!("skipping: {e}");
            }
        }
    }

    /// Needs CAP_NET_ADMIN and /dev/net/tun; skipped (passes) where they are missing.
    #[test]
    fn opens_a_multi_queue_tap_and_detaches_and_reattaches_queues_when_permitted() {
        match Tap::open_queues("pvmtestmq0", 3) {
            Ok(queues) => {
                assert_eq!(queues.len(), 3);
                queues[2].set_queue_attached(false).unwrap();
                // Detaching twice, or attaching an attached queue, is refused.
                assert!(queues[2].set_queue_attached(false).is_err());
                assert!(queues[1].set_queue_attached(true).is_err());
                queues[2].set_queue_attached(true).unwrap();
                let mut buf = [0u8; 128];
                let err = read_frame(&queues[2], &mut buf).unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
                // A single-queue tap of the same name cannot join.
                assert!(matches!(
                    Tap::open("pvmtestmq0"),
                    Err(TapError::Attach { .. })
                ));
            }
            Err(e) => {
                assert!(e.to_string().starts_with("tap pvmtestmq0:"), "{e}");
                eprintln!("skipping: {e}");
            }
        }
    }
}

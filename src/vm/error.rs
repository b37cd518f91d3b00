//! Why building or running a VM failed, and whose fault it is: the user's (exit 2) or the
//! host's, KVM's or pvm's own (exit 1).

use crate::boot::{self, acpi};
use crate::exit::{USAGE_ERROR, VMM_FAILURE};
use crate::{bus, kvm_host, memory, seccomp, vcpu, virtio_devices};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Host(#[from] kvm_host::Error),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Bus(#[from] bus::Error),
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    #[error("no --kernel given and no --disk to boot a kernel from")]
    NoKernel,
    #[error(transparent)]
    DiskBoot(#[from] boot::disk::Error),
    #[error(transparent)]
    Virtio(#[from] virtio_devices::Error),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("seccomp: {0}")]
    Sandbox(#[from] seccomp::Error),
    #[error(transparent)]
    SerialOut(#[from] crate::devices::serial_out::OpenError),
    #[error(transparent)]
    ConsoleSocket(#[from] crate::devices::console_socket::Error),
    #[error("cannot start the thread for vCPU {index}: {source}")]
    Spawn { index: u8, source: std::io::Error },
    #[error(transparent)]
    Restore(#[from] crate::snapshot::RestoreError),
}

impl Error {
    /// True when the user's input (a flag, a file it names, a tap) is at fault, not the host,
    /// KVM or pvm. Decided by variant, every one listed, so a new one must be placed.
    pub fn is_usage(&self) -> bool {
        match self {
            Error::NoKernel => true,
            // The disk named by --disk cannot be read, or holds no kernel pvm can boot.
            Error::DiskBoot(_) => true,
            // --serial-out (or PUT /serial) names a file pvm cannot open.
            Error::SerialOut(_) => true,
            // --console socket=PATH cannot be bound there, or is taken.
            Error::ConsoleSocket(e) => e.is_usage(),
            Error::Boot(e) => e.is_usage(),
            // The snapshot or memory file named is damaged, foreign or does not fit.
            Error::Restore(e) => e.is_usage(),
            Error::Virtio(e) => e.is_usage(),
            Error::Host(_)
            | Error::Kvm { .. }
            | Error::Memory(_)
            | Error::Bus(_)
            | Error::Acpi(_)
            | Error::Vcpu(_)
            | Error::Io { .. }
            | Error::Sandbox(_)
            | Error::Spawn { .. } => false,
        }
    }

    /// The process exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        if self.is_usage() {
            USAGE_ERROR
        } else {
            VMM_FAILURE
        }
    }
}

pub(super) fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

pub(super) fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::PathBuf;

    use pvm_virtio::thread::ThreadError;
    use pvm_virtio::{BlockError, ConsoleError, TapError};

    use super::*;
    use crate::pci::AllocError;

    fn io_error() -> io::Error {
        io::Error::from_raw_os_error(libc::EIO)
    }

    fn kvm_error() -> kvm_ioctls::Error {
        kvm_ioctls::Error::new(libc::EINVAL)
    }

    fn virtio(e: virtio_devices::Error) -> Error {
        Error::Virtio(e)
    }

    fn path() -> PathBuf {
        PathBuf::from("/images/a.img")
    }

    fn tap(make: impl FnOnce(String) -> TapError) -> Error {
        virtio(virtio_devices::Error::Tap(make("tap0".to_string())))
    }

    fn assert_usage(errors: Vec<Error>) {
        for e in errors {
            assert!(e.is_usage(), "{e:?}");
            assert_eq!(e.exit_code(), 2, "{e}");
        }
    }

    fn assert_failure(errors: Vec<Error>) {
        for e in errors {
            assert!(!e.is_usage(), "{e:?}");
            assert_eq!(e.exit_code(), 1, "{e}");
        }
    }

    #[test]
    fn bad_kernels_initrds_and_boot_disks_are_the_users() {
        assert_usage(vec![
            Error::NoKernel,
            Error::Boot(boot::Error::OpenKernel {
                path: path(),
                source: io_error(),
            }),
            Error::Boot(boot::Error::UnknownKernelFormat(path())),
            Error::Boot(boot::Error::InitrdTooLarge {
                path: path(),
                size: 1 << 40,
            }),
            Error::DiskBoot(boot::disk::Error::NoFilesystem { path: path() }),
            Error::DiskBoot(boot::disk::Error::Io {
                path: path(),
                source: io_error(),
            }),
        ]);
    }

    #[test]
    fn unusable_disks_taps_and_sockets_named_by_the_user_are_the_users() {
        assert_usage(vec![
            virtio(virtio_devices::Error::Disk(BlockError::Open {
                path: path(),
                source: io_error(),
            })),
            virtio(virtio_devices::Error::Disk(BlockError::Locked {
                path: path(),
            })),
            tap(|name| TapError::InvalidName { name }),
            // A tap that does not exist (and pvm may not create), or is not multi-queue.
            tap(|name| TapError::Attach {
                name,
                source: io::Error::from_raw_os_error(libc::EPERM),
            }),
            tap(|name| TapError::AttachQueue {
                name,
                queue: 1,
                source: io::Error::from_raw_os_error(libc::EINVAL),
            }),
        ]);
    }

    #[test]
    fn host_failures_while_building_devices_are_vmm_failures() {
        assert_failure(vec![
            // An eventfd that cannot be made.
            virtio(virtio_devices::Error::Console(ConsoleError::InputEvent(
                io_error(),
            ))),
            virtio(virtio_devices::Error::Io {
                what: "interrupt eventfd",
                name: "rng".to_string(),
                source: io::Error::from_raw_os_error(libc::EMFILE),
            }),
            // An ioctl KVM refuses.
            virtio(virtio_devices::Error::Kvm {
                what: "irqfd",
                name: "block0".to_string(),
                source: kvm_error(),
            }),
            // The host's tun and vhost-net, not the user's tap.
            tap(|name| TapError::OpenTun {
                name,
                source: io::Error::from_raw_os_error(libc::ENOENT),
            }),
            tap(|name| TapError::VnetHeaderSize {
                name,
                source: io_error(),
            }),
            virtio(virtio_devices::Error::VhostNet {
                tap: "tap0".to_string(),
                source: pvm_vhost::net::Error::Open(io::Error::from_raw_os_error(libc::ENOENT)),
            }),
            virtio(virtio_devices::Error::Net {
                tap: "tap0".to_string(),
                source: pvm_virtio::NetError::TooManyPairs(40_000),
            }),
            virtio(virtio_devices::Error::Disk(BlockError::Lock {
                path: path(),
                source: io::Error::from_raw_os_error(libc::ENOLCK),
            })),
            // A backend that answers, but not as pvm needs.
            virtio(virtio_devices::Error::VhostUser {
                flag: "--disk",
                socket: PathBuf::from("/run/blk.sock"),
                source: pvm_vhost::user::Error::NoBlockConfig,
            }),
            // A device thread whose sandbox could not be set up.
            virtio(virtio_devices::Error::DeviceThread(ThreadError::Init {
                name: "virtio-blk0".to_string(),
                source: std::sync::Arc::new(io_error()),
            })),
            virtio(virtio_devices::Error::PciResources {
                name: "rng".to_string(),
                source: AllocError::NoSlot,
            }),
        ]);
    }

    #[test]
    fn kvm_memory_and_thread_failures_are_vmm_failures() {
        assert_failure(vec![
            Error::Kvm {
                what: "KVM_CREATE_VM",
                source: kvm_error(),
            },
            Error::Io {
                what: "eventfd",
                source: io::Error::from_raw_os_error(libc::EMFILE),
            },
            Error::Memory(memory::Error::Memfd {
                size: 1 << 30,
                source: io_error(),
            }),
            Error::Spawn {
                index: 0,
                source: io::Error::from_raw_os_error(libc::EAGAIN),
            },
            Error::Host(kvm_host::Error::Missing),
            Error::Boot(boot::Error::WriteCmdline(
                linux_loader::loader::Error::CommandLineOverflow,
            )),
        ]);
    }
}

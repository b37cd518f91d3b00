//! What every kernel vhost device (/dev/vhost-net, /dev/vhost-vsock) needs before it is owned:
//! opening it with a clear error, and reading the features it offers.

use std::os::fd::AsRawFd;

/// The outcome of opening a kernel vhost device through the vhost crate, as an I/O error: the
/// open's own errno when opening failed (ENOENT: module not loaded, EACCES: permissions), any
/// other failure wrapped whole.
pub(crate) fn opened<T>(result: Result<T, vhost::Error>) -> std::io::Result<T> {
    result.map_err(|e| match e {
        vhost::Error::VhostOpen(e) => e,
        other => std::io::Error::other(other),
    })
}

/// VHOST_GET_FEATURES on an open kernel vhost descriptor; owner-less instances answer it.
pub(crate) fn features(fd: &impl AsRawFd) -> std::io::Result<u64> {
    // _IOR(VHOST_VIRTIO, 0x00, __u64)
    const VHOST_GET_FEATURES: libc::c_ulong = 0x8008_af00;
    let mut features = 0u64;
    // SAFETY: the ioctl writes one u64 into `features`, which outlives the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), VHOST_GET_FEATURES, &mut features) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(features)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_failure_keeps_its_errno() {
        let failed: Result<(), _> = Err(vhost::Error::VhostOpen(
            std::io::Error::from_raw_os_error(libc::ENOENT),
        ));
        assert_eq!(
            opened(failed).unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
    }

    #[test]
    fn other_failures_are_kept_whole() {
        let failed: Result<(), _> = Err(vhost::Error::IoctlError(
            std::io::Error::from_raw_os_error(libc::EINVAL),
        ));
        let e = opened(failed).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::Other);
        assert!(e.to_string().contains("Invalid argument"), "{e}");
    }

    #[test]
    fn features_of_a_non_vhost_descriptor_fail() {
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(features(&file).is_err());
    }
}

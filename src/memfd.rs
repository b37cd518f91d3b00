//! Files in memory (memfd): the kernel and initrd read from a disk image, the sandbox's
//! initramfs and the cloud-init seed are built in memory and handed on by descriptor, so
//! nothing is written to the host's disks and nothing is left behind.

use std::ffi::CStr;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};

/// A close-on-exec memory file named `name` (as /proc shows it) holding `bytes`.
pub fn with_bytes(name: &CStr, bytes: &[u8]) -> std::io::Result<File> {
    create(name, bytes, 0)
}

/// [`with_bytes`], then sealed: nobody, pvm included, can write, grow or shrink it any more.
pub fn sealed_with_bytes(name: &CStr, bytes: &[u8]) -> std::io::Result<File> {
    let file = create(name, bytes, libc::MFD_ALLOW_SEALING)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a descriptor this function owns, with an int argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

fn create(name: &CStr, bytes: &[u8], flags: libc::c_uint) -> std::io::Result<File> {
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(bytes)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek};

    #[test]
    fn a_memory_file_holds_its_bytes_and_a_sealed_one_refuses_writes() {
        let mut file = with_bytes(c"pvm-test", b"hello").unwrap();
        let mut back = String::new();
        file.rewind().unwrap();
        file.read_to_string(&mut back).unwrap();
        assert_eq!(back, "hello");
        file.write_all(b"!").unwrap();

        let mut sealed = sealed_with_bytes(c"pvm-test-sealed", b"seed").unwrap();
        assert!(sealed.write_all(b"x").is_err());
        assert_eq!(sealed.metadata().unwrap().len(), 4);
        assert!(sealed.set_len(0).is_err());
    }
}

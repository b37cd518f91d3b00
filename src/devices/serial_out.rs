//! Where the UART's output goes: stdout, or the file or FIFO of `--serial-out` (Firecracker's
//! `PUT /serial`). The file is opened while the VM is built, before the sandbox, appended to and
//! never truncated. It is non-blocking: the UART is written from a vCPU thread, and a FIFO nobody
//! reads must cost output, never a stalled guest.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why the serial output file could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the serial output file {}: {source}", .path.display())]
pub struct OpenError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// The UART's output for `path` (None: stdout).
pub fn open(path: Option<&Path>) -> Result<Box<dyn Write + Send>, OpenError> {
    let Some(path) = path else {
        return Ok(Box::new(std::io::stdout()));
    };
    let open = |read: bool| {
        OpenOptions::new()
            .read(read)
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
    };
    // A FIFO without a reader refuses a non-blocking writer (ENXIO); opened for reading too it
    // opens at once, and a reader that comes later gets what the guest printed since.
    let file = match open(false) {
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => open(true),
        other => other,
    }
    .map_err(|source| OpenError {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Box::new(SerialFile::new(file, path.to_path_buf())))
}

/// A non-blocking file that drops what it cannot take now, counting it and warning once.
pub struct SerialFile<W> {
    out: W,
    path: PathBuf,
    dropped: u64,
}

impl<W: Write> SerialFile<W> {
    pub fn new(out: W, path: PathBuf) -> Self {
        SerialFile {
            out,
            path,
            dropped: 0,
        }
    }

    /// Bytes the guest printed that the file could not take.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    fn drop_bytes(&mut self, count: usize, why: &std::io::Error) {
        if self.dropped == 0 {
            log::warn!(
                "serial output {}: {why}: dropping guest output until it can be written \
                 (warned once)",
                self.path.display()
            );
        }
        self.dropped = self.dropped.saturating_add(count as u64);
    }
}

impl<W: Write> Write for SerialFile<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.out.write(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => Err(e),
            // Full (EAGAIN) or broken (EPIPE, ENOSPC...): the guest must not see an error or
            // wait, so the bytes are taken and dropped.
            Err(e) => {
                self.drop_bytes(buf.len(), &e);
                Ok(buf.len())
            }
            ok => ok,
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // A file has no buffer of ours to flush; a full FIFO must not report an error either.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes `room` bytes, then says it would block.
    struct Full {
        taken: Vec<u8>,
        room: usize,
    }

    impl Write for Full {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.taken.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_output_drops_and_counts_instead_of_blocking() {
        let full = Full {
            taken: Vec::new(),
            room: 3,
        };
        let mut out = SerialFile::new(full, PathBuf::from("/fifo"));
        out.write_all(b"hello").unwrap();
        out.write_all(b"!!").unwrap();
        out.flush().unwrap();
        assert_eq!(out.out.taken, b"hel");
        assert_eq!(out.dropped(), 4);
    }

    #[test]
    fn a_file_is_appended_to_and_a_fifo_without_reader_opens() {
        let dir = std::env::temp_dir().join(format!("pvm-serial-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("out");
        std::fs::write(&file, "before\n").unwrap();
        open(Some(&file)).unwrap().write_all(b"after\n").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "before\nafter\n");

        let fifo = dir.join("fifo");
        let cpath = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path and creates a node; nothing else.
        assert_eq!(unsafe { libc::mkfifo(cpath.as_ptr(), 0o600) }, 0);
        let mut out = open(Some(&fifo)).unwrap();
        // Far more than a pipe holds, with no reader: must return, not block.
        for _ in 0..256 {
            out.write_all(&[b'x'; 1024]).unwrap();
        }
        assert!(open(Some(&dir.join("no/such/dir"))).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

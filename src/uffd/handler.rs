//! `pvm uffd-handler --mem-file MEM --socket PATH`: the reference page-fault handler. It
//! listens on PATH, takes one VMM's message (pvm's or Firecracker's: the same format) and its
//! userfaultfd, and serves every missing page from the memory file: UFFDIO_COPY where the file
//! has data, UFFDIO_ZEROPAGE where it has a hole (pvm's memory files are sparse) and for the
//! pages the balloon gave back (UFFD_EVENT_REMOVE), whose old contents must not come back.
//! It ends, with 0, when the VMM closes its end of the socket.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use userfaultfd::{Event, Uffd};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{MAX_MESSAGE, Mappings, MessageError, PAGE_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("memory file {}: {source}", .path.display())]
    MemFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("memory file {}: empty", .0.display())]
    EmptyFile(PathBuf),
    #[error("cannot listen on {}: {source}", .path.display())]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot receive the VMM's message: {0}")]
    Receive(std::io::Error),
    #[error("the VMM closed the socket without sending its memory mappings")]
    NoMessage,
    #[error("the VMM's message came without a file descriptor (the userfaultfd)")]
    NoFd,
    #[error("the descriptor the VMM sent is not a userfaultfd ({0})")]
    NotUffd(String),
    #[error(transparent)]
    Message(#[from] MessageError),
    #[error("waiting for page faults: {0}")]
    Poll(std::io::Error),
    #[error("reading the userfaultfd: {0}")]
    Read(userfaultfd::Error),
    #[error("a page fault at {0:#x}, outside every region of the mappings")]
    Outside(u64),
    #[error("an event the handler did not ask for: {0}")]
    Unexpected(String),
    #[error("cannot serve the page at {page:#x}: {source}")]
    Serve {
        page: u64,
        source: userfaultfd::Error,
    },
}

/// The memory file, mapped read-only, and where its data (not holes) is.
pub struct MemFile {
    map: *const u8,
    len: u64,
    /// Sorted, disjoint (start, end) byte ranges holding data (SEEK_DATA / SEEK_HOLE).
    data: Vec<(u64, u64)>,
}

impl MemFile {
    pub fn open(path: &Path) -> Result<Self, HandlerError> {
        let fail = |source| HandlerError::MemFile {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(fail)?;
        let len = file.metadata().map_err(fail)?.len();
        if len == 0 {
            return Err(HandlerError::EmptyFile(path.to_path_buf()));
        }
        let size =
            usize::try_from(len).map_err(|_| fail(std::io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: a new private read-only mapping of a descriptor this function owns; the
        // kernel picks the address. It is unmapped in Drop.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(fail(std::io::Error::last_os_error()));
        }
        let mut mem = MemFile {
            map: map.cast(),
            len,
            data: Vec::new(),
        };
        mem.data = data_ranges(&file, len).map_err(fail)?;
        Ok(mem)
    }

    /// Whether any byte of `offset..offset + len` is data rather than a hole.
    fn has_data(&self, offset: u64, len: u64) -> bool {
        let first = self.data.partition_point(|&(_, end)| end <= offset);
        self.data
            .get(first)
            .is_some_and(|&(start, _)| start < offset + len)
    }
}

impl Drop for MemFile {
    fn drop(&mut self) {
        // SAFETY: the mapping `open` made, of `len` bytes; nothing borrows it past `self`.
        unsafe { libc::munmap(self.map.cast_mut().cast(), self.len as usize) };
    }
}

/// The data ranges of `file`, up to `len`.
fn data_ranges(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use crate::snapshot::layer::seek;
    let (mut ranges, mut at) = (Vec::new(), 0);
    while at < len {
        let Some(start) = seek(file, at, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(file, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        if end <= start {
            break;
        }
        ranges.push((start, end));
        at = end;
    }
    Ok(ranges)
}

/// `pvm uffd-handler`: listens on `socket`, serves one VMM from `mem_file` until it goes.
pub fn run(mem_file: &Path, socket: &Path) -> Result<(), HandlerError> {
    let mem = MemFile::open(mem_file)?;
    let listen_err = |source| HandlerError::Listen {
        path: socket.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(socket).map_err(listen_err)?;
    log::info!("uffd-handler: listening on {}", socket.display());
    let (stream, _) = listener.accept().map_err(listen_err)?;
    // One VMM per handler: nobody else should find the socket.
    drop(listener);
    let _ = std::fs::remove_file(socket);
    serve(&stream, &mem)
}

/// Takes the VMM's message from `stream` and serves its faults until it closes the stream.
pub fn serve(stream: &UnixStream, mem: &MemFile) -> Result<(), HandlerError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let (got, file) = stream
        .recv_with_fd(&mut buf)
        .map_err(|e| HandlerError::Receive(std::io::Error::from_raw_os_error(e.errno())))?;
    let Some(file) = file else {
        return Err(if got == 0 {
            HandlerError::NoMessage
        } else {
            HandlerError::NoFd
        });
    };
    check_uffd(&file)?;
    let mappings = super::parse_message(&buf[..got], mem.len)?;
    // SAFETY: the descriptor was just received and checked to be a userfaultfd; `file` gives
    // up its ownership to the Uffd.
    let uffd = unsafe { Uffd::from_raw_fd(file.into_raw_fd()) };
    set_nonblocking(&uffd)?;
    log::info!(
        "uffd-handler: serving {} regions, page size {}",
        mappings.regions.len(),
        mappings.page_size
    );
    Server::new(&uffd, mem, mappings).run(stream)
}

/// Refuses a descriptor that is not a userfaultfd (by what /proc says it is).
fn check_uffd(file: &File) -> Result<(), HandlerError> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| e.to_string());
    if link.contains("userfaultfd") {
        Ok(())
    } else {
        Err(HandlerError::NotUffd(link))
    }
}

/// Events are read until none is left (a pending REMOVE blocks every copy with EAGAIN until
/// it is read), which needs a non-blocking descriptor whatever the VMM asked for.
fn set_nonblocking(uffd: &Uffd) -> Result<(), HandlerError> {
    let fd = uffd.as_raw_fd();
    // SAFETY: fcntl on a descriptor `uffd` owns; no memory is passed.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(HandlerError::Poll(std::io::Error::last_os_error()))
    }
}

/// What a fault is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// Bytes from this offset of the memory file.
    Copy(u64),
    /// Zeros: a hole in the file, or a page the balloon gave back.
    Zero,
}

struct Server<'a> {
    uffd: &'a Uffd,
    mem: &'a MemFile,
    mappings: Mappings,
    /// Per region, a bit per page: given back by the balloon (served as zeros from then on).
    removed: Vec<Vec<u64>>,
    /// A page of zeros, for page sizes UFFDIO_ZEROPAGE does not serve (hugetlbfs).
    zeros: Vec<u8>,
}

impl<'a> Server<'a> {
    fn new(uffd: &'a Uffd, mem: &'a MemFile, mappings: Mappings) -> Self {
        let removed = mappings
            .regions
            .iter()
            .map(|r| vec![0u64; (r.size / mappings.page_size).div_ceil(64) as usize])
            .collect();
        let zeros = if mappings.page_size == PAGE_SIZE {
            Vec::new()
        } else {
            vec![0u8; mappings.page_size as usize]
        };
        Server {
            uffd,
            mem,
            mappings,
            removed,
            zeros,
        }
    }

    fn run(mut self, stream: &UnixStream) -> Result<(), HandlerError> {
        let mut deferred = Vec::new();
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stream.as_raw_fd(),
                    events: libc::POLLIN | libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a live array of two pollfds, its length passed with it.
            if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(HandlerError::Poll(e));
            }
            if fds[1].revents != 0 && vmm_gone(stream) {
                log::info!("uffd-handler: the VMM closed the socket; done");
                return Ok(());
            }
            if fds[0].revents & libc::POLLIN != 0 || !deferred.is_empty() {
                deferred = self.handle_events(std::mem::take(&mut deferred))?;
            }
        }
    }

    /// Reads every pending event and serves it; returns the faults to retry (a REMOVE came in
    /// meanwhile, so the kernel refused the copy with EAGAIN until it is read).
    fn handle_events(&mut self, mut faults: Vec<u64>) -> Result<Vec<u64>, HandlerError> {
        loop {
            while let Some(event) = self.uffd.read_event().map_err(HandlerError::Read)? {
                match event {
                    Event::Pagefault { addr, .. } => faults.push(addr as u64),
                    Event::Remove { start, end } => self.removed(start as u64, end as u64),
                    other => return Err(HandlerError::Unexpected(format!("{other:?}"))),
                }
            }
            let mut retry = Vec::new();
            for addr in faults.drain(..) {
                if !self.serve_fault(addr)? {
                    retry.push(addr);
                }
            }
            if retry.is_empty() {
                return Ok(retry);
            }
            faults = retry;
        }
    }

    /// Marks the pages of `start..end` as given back.
    fn removed(&mut self, start: u64, end: u64) {
        let page_size = self.mappings.page_size;
        for (region, bits) in self.mappings.regions.iter().zip(&mut self.removed) {
            let from = start.max(region.host);
            let to = end.min(region.host + region.size);
            let mut page = from.saturating_sub(region.host) / page_size;
            while region.host + page * page_size < to {
                bits[(page / 64) as usize] |= 1 << (page % 64);
                page += 1;
            }
        }
    }

    /// Fills the page holding `addr`; false when the kernel asks to retry (EAGAIN).
    fn serve_fault(&self, addr: u64) -> Result<bool, HandlerError> {
        let page_size = self.mappings.page_size;
        let page = addr & !(page_size - 1);
        let fill = self.fill(page).ok_or(HandlerError::Outside(addr))?;
        let dst = page as *mut libc::c_void;
        let result = match fill {
            // SAFETY: `dst` is a page of a registered region of the VMM (the kernel checks
            // it); the source is inside the read-only mapping of the memory file (the message
            // was checked against its length).
            Fill::Copy(offset) => unsafe {
                self.uffd.copy(
                    self.mem.map.add(offset as usize).cast(),
                    dst,
                    page_size as usize,
                    true,
                )
            },
            // SAFETY: as above; zeros are copied from this process's own buffer.
            Fill::Zero if !self.zeros.is_empty() => unsafe {
                self.uffd
                    .copy(self.zeros.as_ptr().cast(), dst, page_size as usize, true)
            },
            // SAFETY: `dst` is a page of a registered region of the VMM.
            Fill::Zero => unsafe { self.uffd.zeropage(dst, page_size as usize, true) },
        };
        match result {
            Ok(_) => Ok(true),
            Err(userfaultfd::Error::PartiallyCopied(_)) => Ok(false),
            Err(
                userfaultfd::Error::CopyFailed(errno) | userfaultfd::Error::ZeropageFailed(errno),
            ) if errno as i32 == libc::EAGAIN => Ok(false),
            // Another fault on the same page was served first.
            Err(
                userfaultfd::Error::CopyFailed(errno) | userfaultfd::Error::ZeropageFailed(errno),
            ) if errno as i32 == libc::EEXIST => Ok(true),
            Err(source) => Err(HandlerError::Serve { page, source }),
        }
    }

    /// What the page at `page` (page-aligned) is filled with; None outside every region.
    fn fill(&self, page: u64) -> Option<Fill> {
        let index = self
            .mappings
            .regions
            .iter()
            .position(|r| r.contains(page))?;
        let region = &self.mappings.regions[index];
        let n = (page - region.host) / self.mappings.page_size;
        if self.removed[index][(n / 64) as usize] & (1 << (n % 64)) != 0 {
            return Some(Fill::Zero);
        }
        let offset = region.offset + (page - region.host);
        if self.mem.has_data(offset, self.mappings.page_size) {
            Some(Fill::Copy(offset))
        } else {
            Some(Fill::Zero)
        }
    }
}

/// Whether the VMM closed its end (or the socket failed); bytes it sent are dropped.
fn vmm_gone(mut stream: &UnixStream) -> bool {
    let mut buf = [0u8; 256];
    let _ = stream.set_nonblocking(true);
    let gone = match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = stream.set_nonblocking(false);
    gone
}

#[cfg(test)]
#[path = "handler_tests.rs"]
mod tests;

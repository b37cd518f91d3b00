use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use userfaultfd::{FeatureFlags, UffdBuilder};

use super::*;

const PAGE: usize = 4096;

/// A memory file of four pages: data, hole, data, hole.
fn mem_file(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("pvm-uffd-{}-{name}", std::process::id()));
    let file = File::create(&path).unwrap();
    file.set_len(4 * PAGE as u64).unwrap();
    file.write_all_at(&[b'A'; PAGE], 0).unwrap();
    file.write_all_at(&[b'C'; PAGE], 2 * PAGE as u64).unwrap();
    path
}

/// An anonymous mapping of `pages` pages, unmapped on drop.
struct Anon(*mut u8, usize);

impl Anon {
    fn new(pages: usize) -> Self {
        // SAFETY: a new anonymous private mapping; the kernel picks the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Anon(p.cast(), pages * PAGE)
    }

    fn page(&self, n: usize) -> Vec<u8> {
        // SAFETY: page `n` is inside the mapping; a missing page blocks until the handler
        // fills it, after which it is plain bytes.
        unsafe { std::slice::from_raw_parts(self.0.add(n * PAGE), PAGE).to_vec() }
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made.
        unsafe { libc::munmap(self.0.cast(), self.1) };
    }
}

/// Runs the handler on one end of a socket pair, on a thread; returns the other end.
fn handler(path: PathBuf) -> (UnixStream, std::thread::JoinHandle<Result<(), String>>) {
    let (vmm, ours) = UnixStream::pair().unwrap();
    let thread = std::thread::spawn(move || {
        let mem = MemFile::open(&path).map_err(|e| e.to_string())?;
        let result = serve(&ours, &mem).map_err(|e| e.to_string());
        let _ = std::fs::remove_file(&path);
        result
    });
    (vmm, thread)
}

#[test]
fn pages_come_from_the_file_holes_and_removed_pages_as_zeros() {
    let Ok(uffd) = UffdBuilder::new()
        .require_features(FeatureFlags::EVENT_REMOVE)
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(true)
        .create()
    else {
        eprintln!("no userfaultfd here: test skipped");
        return;
    };
    let ram = Anon::new(4);
    uffd.register(ram.0.cast(), ram.1).unwrap();
    let (vmm, thread) = handler(mem_file("serve"));
    let message = crate::uffd::build_message(&[(ram.0 as u64, ram.1 as u64)]);
    vmm.send_with_fd(message.as_bytes(), uffd.as_raw_fd())
        .unwrap();
    assert_eq!(ram.page(0), vec![b'A'; PAGE]);
    assert_eq!(ram.page(1), vec![0; PAGE]);
    assert_eq!(ram.page(2), vec![b'C'; PAGE]);
    // The balloon gives page 2 back: it comes back as zeros, not as the file's page.
    // SAFETY: page 2 of the mapping; its contents are not borrowed.
    let given_back =
        unsafe { libc::madvise(ram.0.add(2 * PAGE).cast(), PAGE, libc::MADV_DONTNEED) };
    assert_eq!(given_back, 0);
    assert_eq!(ram.page(2), vec![0; PAGE]);
    assert_eq!(ram.page(3), vec![0; PAGE]);
    drop(vmm);
    assert_eq!(thread.join().unwrap(), Ok(()));
}

#[test]
fn a_message_without_a_userfaultfd_or_at_all_is_refused() {
    let (mut vmm, thread) = handler(mem_file("nofd"));
    vmm.write_all(b"[]").unwrap();
    let e = thread.join().unwrap().unwrap_err();
    assert!(e.contains("without a file descriptor"), "{e}");

    let (vmm, thread) = handler(mem_file("notuffd"));
    let other = File::open("/dev/null").unwrap();
    vmm.send_with_fd(b"[]".as_slice(), other.as_raw_fd())
        .unwrap();
    let e = thread.join().unwrap().unwrap_err();
    assert!(e.contains("not a userfaultfd"), "{e}");

    let (vmm, thread) = handler(mem_file("closed"));
    drop(vmm);
    let e = thread.join().unwrap().unwrap_err();
    assert!(e.contains("without sending"), "{e}");
}

#[test]
fn a_bad_message_or_memory_file_is_refused() {
    let Ok(uffd) = UffdBuilder::new().user_mode_only(true).create() else {
        eprintln!("no userfaultfd here: test skipped");
        return;
    };
    let (vmm, thread) = handler(mem_file("outside"));
    // Two pages at offset 3 pages: past the 4-page file's end.
    let message = r#"[{"base_host_virt_addr":4096,"size":8192,"offset":12288,"page_size":4096}]"#;
    vmm.send_with_fd(message.as_bytes(), uffd.as_raw_fd())
        .unwrap();
    let e = thread.join().unwrap().unwrap_err();
    assert!(e.contains("past its end"), "{e}");

    let empty = std::env::temp_dir().join(format!("pvm-uffd-{}-empty", std::process::id()));
    File::create(&empty).unwrap();
    let e = MemFile::open(&empty).err().unwrap().to_string();
    assert!(e.contains("empty"), "{e}");
    let _ = std::fs::remove_file(&empty);
    let e = MemFile::open(Path::new("/nonexistent/mem"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("/nonexistent/mem"), "{e}");
}

#[test]
fn holes_are_found_by_page() {
    let path = mem_file("holes");
    let mem = MemFile::open(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let page = PAGE as u64;
    assert!(mem.has_data(0, page));
    assert!(!mem.has_data(page, page));
    assert!(mem.has_data(2 * page, page));
    assert!(!mem.has_data(3 * page, page));
    assert!(mem.has_data(page, 2 * page));
}

//! A newc ("070701") cpio archive in memory: the format the kernel unpacks an initramfs from.
//! Only what pvm's sandbox initramfs needs: directories, regular files and symlinks, owned by
//! root, with the parent directories of every path made on the way.

use std::collections::BTreeSet;

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Why an entry cannot go into the archive.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("archive path '{0}' must be relative, without '.', '..' or empty parts")]
    BadPath(String),
    #[error("archive entry '{0}' is larger than newc's 4 GiB limit")]
    TooLarge(String),
    #[error("archive path '{0}' is already taken")]
    Duplicate(String),
}

/// An archive being written; [`Archive::finish`] adds the trailer and returns the bytes.
#[derive(Debug, Default)]
pub struct Archive {
    bytes: Vec<u8>,
    names: BTreeSet<String>,
    next_ino: u32,
    /// The device number of the entry being written (a device node's; else 0:0).
    rdev: (u32, u32),
}

impl Archive {
    pub fn new() -> Self {
        Archive {
            next_ino: 1,
            ..Default::default()
        }
    }

    /// A regular file at `path` (parents made as needed).
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), Error> {
        self.parents(path)?;
        self.entry(path, S_IFREG | (mode & 0o7777), data)
    }

    /// A symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), Error> {
        self.parents(path)?;
        self.entry(path, S_IFLNK | 0o777, target.as_bytes())
    }

    /// A character device node `major`:`minor` (mode 0600).
    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) -> Result<(), Error> {
        self.parents(path)?;
        self.rdev = (major, minor);
        let added = self.entry(path, S_IFCHR | 0o600, &[]);
        self.rdev = (0, 0);
        added
    }

    /// A directory (and its parents); one that is already there is fine.
    pub fn dir(&mut self, path: &str) -> Result<(), Error> {
        self.parents(path)?;
        if self.names.contains(path) {
            return Ok(());
        }
        self.entry(path, S_IFDIR | 0o755, &[])
    }

    /// Whether `path` is in the archive already.
    pub fn contains(&self, path: &str) -> bool {
        self.names.contains(path)
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.header(TRAILER, 0, 0, 0);
        self.bytes
    }

    fn parents(&mut self, path: &str) -> Result<(), Error> {
        check_path(path)?;
        let mut end = 0;
        while let Some(slash) = path[end..].find('/') {
            end += slash;
            let parent = &path[..end];
            if !self.names.contains(parent) {
                self.entry(parent, S_IFDIR | 0o755, &[])?;
            }
            end += 1;
        }
        Ok(())
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), Error> {
        let size = u32::try_from(data.len()).map_err(|_| Error::TooLarge(path.to_string()))?;
        if !self.names.insert(path.to_string()) {
            return Err(Error::Duplicate(path.to_string()));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(path, ino, mode, size);
        self.bytes.extend_from_slice(data);
        self.pad();
        Ok(())
    }

    /// The 110-byte header in hex fields, then the NUL-terminated name, padded to 4 bytes.
    fn header(&mut self, name: &str, ino: u32, mode: u32, size: u32) {
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let name_size = name.len() + 1;
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize
        // check
        let (major, minor) = self.rdev;
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            major,
            minor,
            name_size as u32,
            0,
        ];
        self.bytes.extend_from_slice(MAGIC.as_bytes());
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while self.bytes.len() % 4 != 0 {
            self.bytes.push(0);
        }
    }
}

fn check_path(path: &str) -> Result<(), Error> {
    let bad = path.is_empty()
        || path.contains('\0')
        || path
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if bad || path == TRAILER {
        return Err(Error::BadPath(path.to_string()));
    }
    Ok(())
}

/// An entry as the tests read it back: name, mode, data, device number.
#[cfg(test)]
pub(crate) type Entry = (String, u32, Vec<u8>, (u32, u32));

/// A minimal newc reader for the tests.
#[cfg(test)]
pub(crate) fn read(bytes: &[u8]) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut at = 0;
    let field = |at: usize, i: usize| {
        let text = std::str::from_utf8(&bytes[at + 6 + i * 8..at + 14 + i * 8]).unwrap();
        u32::from_str_radix(text, 16).unwrap() as usize
    };
    loop {
        assert_eq!(&bytes[at..at + 6], MAGIC.as_bytes());
        let (mode, size, name_size) = (field(at, 1), field(at, 6), field(at, 11));
        let name_at = at + 110;
        let name = std::str::from_utf8(&bytes[name_at..name_at + name_size - 1]).unwrap();
        assert_eq!(bytes[name_at + name_size - 1], 0);
        let data_at = (name_at + name_size).next_multiple_of(4);
        if name == TRAILER {
            assert_eq!(data_at, bytes.len());
            return out;
        }
        let data = bytes[data_at..data_at + size].to_vec();
        let rdev = (field(at, 9) as u32, field(at, 10) as u32);
        out.push((name.to_string(), mode as u32, data, rdev));
        at = (data_at + size).next_multiple_of(4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_with_parents_first_and_padding() {
        let mut a = Archive::new();
        a.file("usr/lib/libc.so.6", 0o755, b"elf!x").unwrap();
        a.symlink("lib64", "usr/lib").unwrap();
        a.dir("usr/lib").unwrap();
        a.dir("proc").unwrap();
        a.file("init", 0o755, b"").unwrap();
        a.char_device("dev/console", 5, 1).unwrap();
        assert!(a.contains("usr") && !a.contains("nope"));
        let entries = read(&a.finish());
        let names: Vec<&str> = entries.iter().map(|(n, ..)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "usr",
                "usr/lib",
                "usr/lib/libc.so.6",
                "lib64",
                "proc",
                "init",
                "dev",
                "dev/console"
            ]
        );
        assert_eq!(entries[2].1, S_IFREG | 0o755);
        assert_eq!(entries[2].2, b"elf!x");
        assert_eq!(entries[3].1, S_IFLNK | 0o777);
        assert_eq!(entries[3].2, b"usr/lib");
        assert_eq!(entries[7].1, S_IFCHR | 0o600);
        assert_eq!((entries[7].3, entries[2].3), ((5, 1), (0, 0)));
        assert_eq!(entries[0].1, S_IFDIR | 0o755);
        assert_eq!(entries[7].1, S_IFCHR | 0o600);
        assert_eq!(entries[7].3, (5, 1));
        assert_eq!(entries[2].3, (0, 0));
    }

    #[test]
    fn the_system_cpio_reads_the_archive() {
        let mut a = Archive::new();
        a.file("bin/odd name", 0o755, b"abcde").unwrap();
        a.char_device("dev/console", 5, 1).unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("cpio (scripts/host-packages installs it)");
        let mut stdin = child.stdin.take().unwrap();
        std::io::Write::write_all(&mut stdin, &a.finish()).unwrap();
        drop(stdin);
        let listing = String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap();
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 4, "{listing}");
        assert!(lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" bin"));
        assert!(
            lines[1].starts_with("-rwxr-xr-x") && lines[1].contains(" 5 "),
            "{listing}"
        );
        assert!(lines[1].ends_with(" bin/odd name"), "{listing}");
        assert!(
            lines[3].starts_with("crw-------") && lines[3].contains(" 5,"),
            "{listing}"
        );
        assert!(lines[3].ends_with(" dev/console"), "{listing}");
    }

    #[test]
    fn hostile_paths_and_duplicates_are_refused() {
        let mut a = Archive::new();
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "a//b",
            "./a",
            "a/",
            "x\0y",
            TRAILER,
        ] {
            assert_eq!(
                a.file(bad, 0o644, b""),
                Err(Error::BadPath(bad.into())),
                "{bad:?}"
            );
        }
        a.file("a/b", 0o644, b"1").unwrap();
        assert_eq!(
            a.file("a/b", 0o644, b"2"),
            Err(Error::Duplicate("a/b".into()))
        );
        assert_eq!(a.file("a", 0o644, b""), Err(Error::Duplicate("a".into())));
        // Only the trailer is left after the failures: the archive still reads.
        assert_eq!(read(&a.finish()).len(), 2);
    }
}

//! `--cloud-init`: a NoCloud seed, so stock cloud images configure themselves without a
//! metadata server. pvm reads the user's files once at start, builds a FAT filesystem labelled
//! `CIDATA` holding them (cloud-init's NoCloud datasource looks for a vfat or iso9660 volume
//! labelled cidata or CIDATA), and keeps it in a sealed memfd that becomes one more read-only
//! virtio-blk disk after the user's. Nothing is written to the host's filesystems, and nothing
//! is left behind when pvm ends.
//!
//! Why FAT and not iso9660: the `fatfs` crate builds it (and reads it back in the tests), it
//! stores the names `user-data`, `meta-data` and `network-config` as they are (long names),
//! where plain iso9660 needs Rock Ridge or Joliet extensions for them; every distribution
//! kernel can mount vfat (the EFI system partition is one).

mod fat;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Largest file the seed takes, per file: cloud-init's user data is a configuration or a
/// script (cloud providers cap it at 16 to 64 KiB), so 4 MiB leaves room for files embedded
/// with `write_files` while keeping the seed, which pvm holds in memory, small.
pub const MAX_FILE_BYTES: u64 = 4 << 20;

/// The largest seed image [`Seed::build`] makes (every file at its limit; 13 MiB): a snapshot
/// claiming a larger one was not written by pvm.
pub const MAX_SEED_BYTES: u64 = fat::image_bytes(SeedFile::ALL.len() as u64 * MAX_FILE_BYTES);

/// The serial the guest reads from the seed disk (`/dev/disk/by-id/virtio-cidata`).
pub const SERIAL: &str = "cidata";

/// The volume label cloud-init looks for (it accepts `cidata` and `CIDATA`; FAT labels are
/// upper case by convention).
pub const LABEL: &str = "CIDATA";

/// One of the files the seed holds; its key in the flag is its name in the seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeedFile {
    UserData,
    MetaData,
    NetworkConfig,
}

impl SeedFile {
    const ALL: [SeedFile; 3] = [
        SeedFile::UserData,
        SeedFile::MetaData,
        SeedFile::NetworkConfig,
    ];

    /// The flag's key, and the file's name in the seed.
    pub fn name(self) -> &'static str {
        match self {
            SeedFile::UserData => "user-data",
            SeedFile::MetaData => "meta-data",
            SeedFile::NetworkConfig => "network-config",
        }
    }
}

/// `--cloud-init`, parsed: which host file becomes which seed file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudInitSpec {
    pub user_data: PathBuf,
    /// Without it pvm writes `instance-id` and `local-hostname` from the VM's id.
    pub meta_data: Option<PathBuf>,
    pub network_config: Option<PathBuf>,
}

/// Why `--cloud-init`'s value was refused; clap puts the flag in front of the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("'{0}' is not KEY=FILE (keys: user-data, meta-data, network-config)")]
    NotKeyFile(String),
    #[error("unknown key '{0}' (known: user-data, meta-data, network-config)")]
    UnknownKey(String),
    #[error("{0}= is given twice")]
    Duplicate(&'static str),
    #[error("{0}= needs a file")]
    NoFile(&'static str),
    #[error("user-data=FILE is missing: the seed needs the user data cloud-init acts on")]
    NoUserData,
}

/// Why the seed could not be built from the files the flag names.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("{key}={}: {source}", .path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "{key}={}: larger than the seed's limit of {} MiB per file",
        .path.display(), MAX_FILE_BYTES >> 20
    )]
    TooLarge { key: &'static str, path: PathBuf },
    #[error(
        "user-data={}: the file is empty, so cloud-init would have nothing to do (user data \
         is e.g. a #cloud-config document or a #! script)", .0.display()
    )]
    EmptyUserData(PathBuf),
    #[error("cannot build the seed's FAT filesystem: {0}")]
    Build(#[source] io::Error),
    #[error("cannot put the seed in a memory file (memfd): {0}")]
    Memfd(#[source] io::Error),
}

impl SeedError {
    /// True when the user's files are at fault; false when the host failed to build the seed.
    pub fn is_usage(&self) -> bool {
        match self {
            SeedError::Read { .. } | SeedError::TooLarge { .. } | SeedError::EmptyUserData(_) => {
                true
            }
            SeedError::Build(_) | SeedError::Memfd(_) => false,
        }
    }
}

/// Parses `user-data=FILE[,meta-data=FILE][,network-config=FILE]` (any order, each key once).
pub fn parse_spec(text: &str) -> Result<CloudInitSpec, SpecError> {
    let mut files: [Option<PathBuf>; 3] = Default::default();
    for part in text.split(',') {
        let (key, path) = part
            .split_once('=')
            .ok_or_else(|| SpecError::NotKeyFile(part.to_string()))?;
        let (index, file) = SeedFile::ALL
            .iter()
            .enumerate()
            .find(|(_, f)| f.name() == key)
            .ok_or_else(|| SpecError::UnknownKey(key.to_string()))?;
        if path.is_empty() {
            return Err(SpecError::NoFile(file.name()));
        }
        if files[index].replace(PathBuf::from(path)).is_some() {
            return Err(SpecError::Duplicate(file.name()));
        }
    }
    let [user_data, meta_data, network_config] = files;
    Ok(CloudInitSpec {
        user_data: user_data.ok_or(SpecError::NoUserData)?,
        meta_data,
        network_config,
    })
}

/// The meta-data pvm writes when the user gives none: the instance id cloud-init keys its
/// once-per-instance work on, and the hostname, both from the VM's id (letters, digits and
/// `-`, so valid YAML as it is; a hostname label is cut to 63 characters).
pub fn default_meta_data(vm_id: &str) -> String {
    let host: String = vm_id.chars().take(63).collect();
    let host = match host.trim_matches('-') {
        "" => "pvm",
        host => host,
    };
    format!("instance-id: {vm_id}\nlocal-hostname: {host}\n")
}

/// Reads one of the user's files, refusing it past [`MAX_FILE_BYTES`] without reading further
/// (a FIFO or a device may never end).
fn read_file(file: SeedFile, path: &Path) -> Result<Vec<u8>, SeedError> {
    let error = |source| SeedError::Read {
        key: file.name(),
        path: path.to_owned(),
        source,
    };
    let mut data = Vec::new();
    File::open(path)
        .map_err(error)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(error)?;
    if data.len() as u64 > MAX_FILE_BYTES {
        return Err(SeedError::TooLarge {
            key: file.name(),
            path: path.to_owned(),
        });
    }
    Ok(data)
}

/// The seed's files in the order they are written: name and contents.
pub fn seed_files(
    spec: &CloudInitSpec,
    vm_id: &str,
) -> Result<Vec<(SeedFile, Vec<u8>)>, SeedError> {
    let user_data = read_file(SeedFile::UserData, &spec.user_data)?;
    if user_data.iter().all(u8::is_ascii_whitespace) {
        return Err(SeedError::EmptyUserData(spec.user_data.clone()));
    }
    let meta_data = match &spec.meta_data {
        Some(path) => read_file(SeedFile::MetaData, path)?,
        None => default_meta_data(vm_id).into_bytes(),
    };
    let mut files = vec![
        (SeedFile::UserData, user_data),
        (SeedFile::MetaData, meta_data),
    ];
    if let Some(path) = &spec.network_config {
        files.push((
            SeedFile::NetworkConfig,
            read_file(SeedFile::NetworkConfig, path)?,
        ));
    }
    Ok(files)
}

/// The built seed: a sealed memfd (no size change, no writes) the seed disk is opened from.
#[derive(Debug)]
pub struct Seed {
    file: File,
    bytes: u64,
}

impl Seed {
    /// Reads the files `spec` names and builds the seed of the VM called `vm_id`.
    pub fn build(spec: &CloudInitSpec, vm_id: &str) -> Result<Self, SeedError> {
        let files = seed_files(spec, vm_id)?;
        let image = fat::image(&files).map_err(SeedError::Build)?;
        Self::from_image(&image).map_err(SeedError::Memfd)
    }

    /// A seed holding `image` as it is: a restored VM gets back the disk its snapshot saw,
    /// never one rebuilt from files that may have changed since.
    pub fn from_image(image: &[u8]) -> io::Result<Self> {
        let file = crate::memfd::sealed_with_bytes(c"pvm-cloud-init", image)?;
        Ok(Seed {
            file,
            bytes: image.len() as u64,
        })
    }

    /// The image's bytes, read back from the memory file (for a snapshot).
    pub fn image(&self) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let len = usize::try_from(self.bytes).map_err(io::Error::other)?;
        let mut image = vec![0u8; len];
        self.file.read_exact_at(&mut image, 0)?;
        Ok(image)
    }

    /// Where the disk opens the seed: the memfd through /proc, a read-only open of the same
    /// memory (the block device opens and locks its image by path).
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// The image's size in bytes (a whole number of MiB).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The seed's memory file, for reading it back.
    pub fn file(&self) -> &File {
        &self.file
    }
}

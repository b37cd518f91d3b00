//! pvm's snapshot file: a fixed header, the state as postcard, and a CRC-32 over everything
//! before it.
//!
//! ```text
//! 0   8  magic "PVMSNAP\0"
//! 8   4  format version (little-endian u32)
//! 12  4  reserved, 0
//! 16  8  payload length N (little-endian u64)
//! 24  N  the Snapshot, postcard-encoded
//! 24+N 4 CRC-32/ISO-HDLC of bytes 0..24+N (little-endian)
//! ```
//!
//! The decoder trusts nothing: the size is bounded before reading, the checksum is checked
//! before decoding, postcard bounds every length by the bytes that are there, and the decoded
//! state is validated ([`Snapshot::validate`]) before anything is built from it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::{Snapshot, SnapshotError};

pub const MAGIC: [u8; 8] = *b"PVMSNAP\0";
/// Bumped whenever the encoded state changes shape; a file of another version is refused.
/// 2: the description records each disk's API drive id. 3: and the balloon and vsock.
/// 4: the memory file's lineage (Full or Diff, ids). 5: the cloud-init seed's image and the
/// vsock's backend (vhost-vsock).
pub const VERSION: u32 = 5;
const HEADER_BYTES: usize = 24;
const CRC_BYTES: usize = 4;
/// Far above any real state (a vCPU is ~10 KiB): a larger file is not a pvm snapshot.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// Why a snapshot file was refused; each names the file's fault in one line.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("snapshot {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("snapshot {path}: {size} bytes is larger than any pvm snapshot ({MAX_FILE_BYTES})")]
    TooLarge { path: String, size: u64 },
    #[error("snapshot {path}: truncated: {size} bytes, {needed} expected")]
    Truncated {
        path: String,
        size: usize,
        needed: u64,
    },
    #[error("snapshot {path}: not a pvm snapshot (no PVMSNAP magic)")]
    Foreign { path: String },
    #[error("snapshot {path}: format version {found}; this pvm reads version {VERSION}")]
    Version { path: String, found: u32 },
    #[error("snapshot {path}: {extra} bytes after the checksum")]
    Trailing { path: String, extra: usize },
    #[error(
        "snapshot {path}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is corrupt"
    )]
    Checksum {
        path: String,
        stored: u32,
        computed: u32,
    },
    #[error("snapshot {path}: the state does not decode: {source}")]
    Decode {
        path: String,
        source: postcard::Error,
    },
}

/// The file's bytes for `snapshot`.
pub fn encode(snapshot: &Snapshot) -> Result<Vec<u8>, SnapshotError> {
    let payload = postcard::to_stdvec(snapshot).map_err(SnapshotError::Encode)?;
    Ok(frame(&payload))
}

/// `payload` with the header and checksum around it (the fuzz target frames arbitrary
/// payloads this way to reach the state decoder).
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_BYTES + payload.len() + CRC_BYTES);
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(payload);
    let crc = CRC.checksum(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// Decodes a snapshot file's bytes; `path` names it in the errors. The state is not yet
/// validated against itself (see [`Snapshot::validate`]).
pub fn decode(path: &str, bytes: &[u8]) -> Result<Snapshot, FileError> {
    let path = path.to_string();
    let truncated = |needed: u64| FileError::Truncated {
        path: path.clone(),
        size: bytes.len(),
        needed,
    };
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        // A short file that starts like a snapshot is truncated; anything else is foreign.
        if bytes.len() < MAGIC.len() && MAGIC.starts_with(bytes) && !bytes.is_empty() {
            return Err(truncated((HEADER_BYTES + CRC_BYTES) as u64));
        }
        return Err(FileError::Foreign { path });
    }
    let Some(header) = bytes.get(..HEADER_BYTES) else {
        return Err(truncated((HEADER_BYTES + CRC_BYTES) as u64));
    };
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let version = word(8);
    if version != VERSION {
        return Err(FileError::Version {
            path,
            found: version,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[16..24]);
    let len = u64::from_le_bytes(len);
    let needed = len.saturating_add((HEADER_BYTES + CRC_BYTES) as u64);
    if (bytes.len() as u64) < needed {
        return Err(truncated(needed));
    }
    // `needed` is at most bytes.len() now, so it fits a usize.
    let end = needed as usize;
    if bytes.len() > end {
        return Err(FileError::Trailing {
            path,
            extra: bytes.len() - end,
        });
    }
    let (covered, stored) = bytes.split_at(end - CRC_BYTES);
    let stored = u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]);
    let computed = CRC.checksum(covered);
    if stored != computed {
        return Err(FileError::Checksum {
            path,
            stored,
            computed,
        });
    }
    let payload = &covered[HEADER_BYTES..];
    match postcard::take_from_bytes::<Snapshot>(payload) {
        Ok((snapshot, [])) => Ok(snapshot),
        Ok((_, rest)) => Err(FileError::Trailing {
            path,
            extra: rest.len(),
        }),
        Err(source) => Err(FileError::Decode { path, source }),
    }
}

/// Reads and decodes the snapshot at `path`, its size bounded before it is read.
pub fn read(path: &Path) -> Result<Snapshot, FileError> {
    let name = path.display().to_string();
    let open_err = |source| FileError::Open {
        path: name.clone(),
        source,
    };
    let file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    if size > MAX_FILE_BYTES {
        return Err(FileError::TooLarge { path: name, size });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(open_err)?;
    decode(&name, &bytes)
}

/// Creates (or replaces) a file only its owner can read and write: snapshots hold the guest's
/// secrets.
pub fn create_private(path: &Path) -> Result<File, SnapshotError> {
    let fail = |source| SnapshotError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    // An existing file keeps its mode through open(2): narrow it.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(fail)?;
    Ok(file)
}

/// Writes `snapshot` to `path` (0600), synced to disk.
pub fn write(path: &Path, snapshot: &Snapshot) -> Result<(), SnapshotError> {
    let bytes = encode(snapshot)?;
    let mut file = create_private(path)?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| SnapshotError::Write {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
#[path = "file_tests.rs"]
pub(crate) mod tests;

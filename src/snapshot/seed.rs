//! The `--cloud-init` seed in a snapshot: the image's bytes exactly as the guest's disk holds
//! them. A restore seals those bytes into a new memfd rather than building the seed again
//! from the files named at boot: they may have changed or gone, and a disk that changes under
//! a running guest (which may have it mounted, or cached its blocks) is worse than none.

use serde::{Deserialize, Serialize};

use super::{RestoreError, SnapshotError};
use crate::cloud_init::{MAX_SEED_BYTES, Seed};

/// virtio-blk counts capacity in 512-byte sectors: an image of a partial sector has bytes
/// the guest could never read, and pvm never makes one.
const SECTOR_BYTES: usize = 512;

/// The seed disk's image, saved whole (at most [`MAX_SEED_BYTES`], 1 MiB for typical files).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedImage {
    pub bytes: Vec<u8>,
}

// Not derived: a debug print of a description would otherwise dump a MiB of FAT.
impl std::fmt::Debug for SeedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SeedImage({} bytes)", self.bytes.len())
    }
}

impl SeedImage {
    /// The running VM's seed, read back from its sealed memfd.
    pub fn of(seed: &Seed) -> Result<Self, SnapshotError> {
        let bytes = seed.image().map_err(SnapshotError::CloudInitSeed)?;
        Ok(SeedImage { bytes })
    }

    /// Refuses a size no pvm would have saved (the file is untrusted): none, past the largest
    /// seed pvm builds, or not whole sectors.
    pub fn validate(&self) -> Result<(), RestoreError> {
        let len = self.bytes.len();
        if len == 0 || len as u64 > MAX_SEED_BYTES || len % SECTOR_BYTES != 0 {
            return Err(RestoreError::invalid(format!(
                "cloud-init seed: {len} bytes; a seed is 1 to {MAX_SEED_BYTES} bytes in whole \
                 {SECTOR_BYTES}-byte sectors"
            )));
        }
        Ok(())
    }

    /// A new sealed seed holding these bytes, for the restored VM's seed disk.
    pub fn to_seed(&self) -> Result<Seed, RestoreError> {
        self.validate()?;
        Seed::from_image(&self.bytes).map_err(RestoreError::CloudInitSeed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn the_seed_bytes_round_trip_into_a_new_sealed_seed() {
        let bytes: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 31 % 251) as u8).collect();
        let original = Seed::from_image(&bytes).unwrap();
        let saved = SeedImage::of(&original).unwrap();
        assert_eq!(saved.bytes, bytes);
        assert_eq!(format!("{saved:?}"), "SeedImage(1048576 bytes)");
        // Through the state file's encoding, as a restore reads it.
        let decoded: SeedImage =
            postcard::from_bytes(&postcard::to_stdvec(&saved).unwrap()).expect("decodes");
        let restored = decoded.to_seed().unwrap();
        assert_eq!(restored.bytes(), 1 << 20);
        let mut back = vec![0u8; bytes.len()];
        restored.file().read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, bytes);
        assert!(restored.file().write_at(b"x", 0).is_err(), "sealed");
        assert_ne!(restored.path(), original.path(), "a memfd of its own");
    }

    #[test]
    fn hostile_seed_sizes_are_refused_naming_the_seed() {
        let largest = MAX_SEED_BYTES as usize;
        for len in [0, 1, 511, 513, largest + SECTOR_BYTES, largest * 4] {
            let image = SeedImage {
                bytes: vec![0; len],
            };
            let e = image.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("cloud-init seed: {len} bytes")), "{e}");
            assert!(image.to_seed().is_err(), "{len} bytes");
        }
        for len in [512, 1 << 20, largest] {
            let image = SeedImage {
                bytes: vec![0; len],
            };
            assert!(image.validate().is_ok(), "{len} bytes");
        }
    }
}

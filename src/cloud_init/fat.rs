//! The seed's FAT filesystem, built in memory with `fatfs`.

use std::io::{self, Cursor, Write};

use super::{LABEL, SeedFile};

const MIB: u64 = 1 << 20;
/// Room for the boot sector, the FATs, the root directory and each file's last partial
/// cluster, on top of the files' bytes: at the largest seed (13 MiB, FAT16 with 1 KiB
/// clusters) that is under 80 KiB.
const SLACK_BYTES: u64 = 256 << 10;
/// The volume serial number: fixed, so the same files always give the same image.
const VOLUME_ID: u32 = 0x7076_6d00;
/// A directory entry's attribute byte that makes it the volume label.
const ATTR_VOLUME_ID: u8 = 0x08;

/// The label as FAT stores it: 11 bytes, padded with spaces.
fn label_bytes() -> [u8; 11] {
    let mut label = [b' '; 11];
    label[..LABEL.len()].copy_from_slice(LABEL.as_bytes());
    label
}

/// A FAT12/16 image holding `files` in its root directory, labelled [`LABEL`] both in the
/// boot sector and in the root directory (blkid and cloud-init read either; mkfs.fat writes
/// both). Its size is the files' plus [`SLACK_BYTES`], rounded up to a MiB.
pub(super) fn image(files: &[(SeedFile, Vec<u8>)]) -> io::Result<Vec<u8>> {
    let payload: u64 = files.iter().map(|(_, data)| data.len() as u64).sum();
    let bytes = image_bytes(payload);
    let size = usize::try_from(bytes).map_err(|_| io::Error::other("the seed is too large"))?;
    let mut disk = Cursor::new(vec![0u8; size]);
    let options = fatfs::FormatVolumeOptions::new()
        .volume_label(label_bytes())
        .volume_id(VOLUME_ID);
    fatfs::format_volume(&mut disk, options)?;
    write_label_entry(disk.get_mut())?;
    disk.set_position(0);
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())?;
        {
            let root = fs.root_dir();
            for (file, data) in files {
                root.create_file(file.name())?.write_all(data)?;
            }
        }
        fs.unmount()?;
    }
    Ok(disk.into_inner())
}

/// The size of the image of files of `payload` bytes in all.
pub(super) const fn image_bytes(payload: u64) -> u64 {
    (payload + SLACK_BYTES).div_ceil(MIB) * MIB
}

fn le16(image: &[u8], offset: usize) -> u64 {
    u64::from(u16::from_le_bytes([image[offset], image[offset + 1]]))
}

/// Puts the volume label entry first in the root directory of the freshly formatted FAT12/16
/// `image` (fatfs 0.3 only writes the boot sector's copy); the files created after it take
/// the next entries.
fn write_label_entry(image: &mut [u8]) -> io::Result<()> {
    let bytes_per_sector = le16(image, 11);
    let reserved_sectors = le16(image, 14);
    let fats = u64::from(image[16]);
    let sectors_per_fat = le16(image, 22);
    if sectors_per_fat == 0 {
        // FAT32 keeps the root directory in clusters; seeds are far below its sizes.
        return Err(io::Error::other("the seed unexpectedly became FAT32"));
    }
    let root = (reserved_sectors + fats * sectors_per_fat) * bytes_per_sector;
    let entry = usize::try_from(root)
        .ok()
        .and_then(|root| image.get_mut(root..root + 32))
        .ok_or_else(|| io::Error::other("the seed's root directory is outside the image"))?;
    entry.fill(0);
    entry[..11].copy_from_slice(&label_bytes());
    entry[11] = ATTR_VOLUME_ID;
    Ok(())
}

//! Hostile and damaged snapshot files: each is refused with one line naming what is wrong.

use super::*;
use crate::snapshot::sample::sample;

fn refused(bytes: &[u8]) -> String {
    let e = decode("snap", bytes).expect_err("refused").to_string();
    assert_eq!(e.lines().count(), 1, "{e}");
    e
}

fn reseal(bytes: &mut [u8]) {
    let end = bytes.len() - CRC_BYTES;
    let crc = CRC.checksum(&bytes[..end]);
    bytes[end..].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn a_snapshot_round_trips() {
    let bytes = encode(&sample()).unwrap();
    let back = decode("snap", &bytes).unwrap();
    back.validate().unwrap();
    assert_eq!(back.vcpus[0].regs.rip, 0xffff_ffff_8100_0000);
    assert_eq!(
        back.vcpus[0].msrs,
        vec![(0x10, 1234), (0x4b56_4d01, 0x1001)]
    );
    assert_eq!(back.description, sample().description);
    assert_eq!(back.pci_config_address, 0x8000_0800);
}

#[test]
fn truncated_files_are_refused_at_every_length() {
    let bytes = encode(&sample()).unwrap();
    for len in 1..bytes.len() {
        let e = refused(&bytes[..len]);
        assert!(e.contains("truncated"), "{len}: {e}");
    }
    assert!(refused(&[]).contains("not a pvm snapshot"));
}

#[test]
fn foreign_files_are_refused() {
    assert!(refused(b"\x7fELF\x02\x01\x01\0 some binary").contains("not a pvm snapshot"));
    assert!(refused(&[0u8; 4096]).contains("not a pvm snapshot"));
    // Firecracker's snapshot files start with their own magic number.
    assert!(refused(&0x0710_1984_f00d_cafe_u64.to_le_bytes()).contains("not a pvm snapshot"));
}

#[test]
fn other_versions_are_refused_naming_both() {
    let mut bytes = encode(&sample()).unwrap();
    bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
    let e = refused(&bytes);
    assert!(
        e.contains("format version 7; this pvm reads version 5"),
        "{e}"
    );
}

#[test]
fn every_flipped_bit_is_caught() {
    let bytes = encode(&sample()).unwrap();
    // Past the version (whose change is named as such); a changed length reads as truncated
    // or trailing, anything else as a checksum mismatch.
    for at in 12..bytes.len() {
        let mut damaged = bytes.clone();
        damaged[at] ^= 0x10;
        let e = refused(&damaged);
        assert!(
            e.contains("checksum") || e.contains("truncated") || e.contains("after the checksum"),
            "{at}: {e}"
        );
    }
}

#[test]
fn trailing_bytes_and_huge_lengths_are_refused() {
    let mut bytes = encode(&sample()).unwrap();
    bytes.push(0);
    assert!(refused(&bytes).contains("1 bytes after the checksum"));
    let mut bytes = encode(&sample()).unwrap();
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(refused(&bytes).contains("truncated"));
}

#[test]
fn a_payload_that_does_not_decode_is_refused_even_with_a_good_checksum() {
    let mut bytes = encode(&sample()).unwrap();
    // Garbage in the payload, checksum recomputed: the decoder must stop, not crash.
    for b in &mut bytes[HEADER_BYTES..HEADER_BYTES + 16] {
        *b = 0xff;
    }
    reseal(&mut bytes);
    let e = refused(&bytes);
    assert!(e.contains("does not decode"), "{e}");
}

#[test]
fn decoded_but_inconsistent_states_are_refused_by_validate() {
    let mut s = sample();
    s.description.cpus = 2;
    assert!(
        s.validate()
            .unwrap_err()
            .to_string()
            .contains("1 vCPU states for a VM of 2")
    );
    let mut s = sample();
    s.serial.in_buffer = vec![0; 65];
    assert!(
        s.validate()
            .unwrap_err()
            .to_string()
            .contains("65 input bytes")
    );
    let mut s = sample();
    s.vcpus[0].cpuid.clear();
    assert!(
        s.validate()
            .unwrap_err()
            .to_string()
            .contains("0 CPUID entries")
    );
}

#[test]
fn files_are_created_private_and_too_large_files_are_not_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("pvm-snapfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("snap");
    std::fs::write(&path, b"old").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    write(&path, &sample()).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    read(&path).unwrap().validate().unwrap();
    let big = dir.join("big");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(MAX_FILE_BYTES + 1)
        .unwrap();
    assert!(
        read(&big)
            .unwrap_err()
            .to_string()
            .contains("larger than any pvm snapshot")
    );
    let missing = read(&dir.join("missing")).unwrap_err().to_string();
    assert!(missing.contains("missing"), "{missing}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_state_file_claiming_a_huge_cloud_init_seed_is_refused() {
    // A seed past the largest pvm builds, in an otherwise well-formed file: decoded, then
    // refused by name before any memfd is made.
    let mut huge = sample();
    let seed = crate::cloud_init::MAX_SEED_BYTES as usize + 512;
    huge.description.cloud_init = Some(crate::snapshot::seed::SeedImage {
        bytes: vec![0xa5; seed],
    });
    let back = decode("snap", &encode(&huge).unwrap()).unwrap();
    let e = back.validate().unwrap_err().to_string();
    assert!(e.contains(&format!("cloud-init seed: {seed} bytes")), "{e}");
    // A length prefix claiming far more than the file holds: refused while decoding, with
    // nothing allocated for it (postcard bounds every length by the bytes that are there).
    let mut small = sample();
    let marker = b"CIDATA".repeat(86)[..512].to_vec();
    small.description.cloud_init = Some(crate::snapshot::seed::SeedImage {
        bytes: marker.clone(),
    });
    let mut bytes = encode(&small).unwrap();
    let at = bytes
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("the seed's bytes");
    // 512 is the varint 0x80 0x04 just before the bytes; claim 2^34 bytes instead, and fix
    // the header's payload length and the checksum so only the claim is wrong.
    assert_eq!(&bytes[at - 2..at], &[0x80, 0x04]);
    bytes.splice(at - 2..at, [0x80, 0x80, 0x80, 0x80, 0x40]);
    let payload = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) + 3;
    bytes[16..24].copy_from_slice(&payload.to_le_bytes());
    reseal(&mut bytes);
    assert!(refused(&bytes).contains("does not decode"));
}

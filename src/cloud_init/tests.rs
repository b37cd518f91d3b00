use std::io::{Cursor, Read};
use std::os::unix::fs::FileExt;

use super::*;

fn scratch(name: &str, data: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pvm-cloud-init-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path
}

fn spec(user_data: &Path) -> CloudInitSpec {
    CloudInitSpec {
        user_data: user_data.to_owned(),
        meta_data: None,
        network_config: None,
    }
}

/// An image read back: each root directory file (name, contents), the boot sector's label and
/// the root directory's label.
type ReadBack = (Vec<(String, Vec<u8>)>, String, Option<String>);

/// Reads `image` back with fatfs.
fn read_back(image: Vec<u8>) -> ReadBack {
    let fs = fatfs::FileSystem::new(Cursor::new(image), fatfs::FsOptions::new()).unwrap();
    let mut files = Vec::new();
    for entry in fs.root_dir().iter() {
        let entry = entry.unwrap();
        assert!(entry.is_file(), "{}", entry.file_name());
        let mut data = Vec::new();
        entry.to_file().read_to_end(&mut data).unwrap();
        assert_eq!(data.len() as u64, entry.len());
        files.push((entry.file_name(), data));
    }
    let root_label = fs.read_volume_label_from_root_dir().unwrap();
    (files, fs.volume_label(), root_label)
}

#[test]
fn specs_parse_in_any_order() {
    assert_eq!(
        parse_spec("user-data=/a/u").unwrap(),
        CloudInitSpec {
            user_data: "/a/u".into(),
            meta_data: None,
            network_config: None
        }
    );
    assert_eq!(
        parse_spec("network-config=n,meta-data=m,user-data=u=x").unwrap(),
        CloudInitSpec {
            user_data: "u=x".into(),
            meta_data: Some("m".into()),
            network_config: Some("n".into())
        }
    );
}

#[test]
fn hostile_specs_are_refused_by_name() {
    for (text, error) in [
        ("", SpecError::NotKeyFile(String::new())),
        ("user-data", SpecError::NotKeyFile("user-data".into())),
        ("user-data=u,", SpecError::NotKeyFile(String::new())),
        ("/tmp/u", SpecError::NotKeyFile("/tmp/u".into())),
        ("user-data=", SpecError::NoFile("user-data")),
        ("user-data=u,meta-data=", SpecError::NoFile("meta-data")),
        (
            "vendor-data=v,user-data=u",
            SpecError::UnknownKey("vendor-data".into()),
        ),
        ("USER-DATA=u", SpecError::UnknownKey("USER-DATA".into())),
        ("=u", SpecError::UnknownKey(String::new())),
        ("user-data=a,user-data=b", SpecError::Duplicate("user-data")),
        (
            "user-data=a,meta-data=m,meta-data=m",
            SpecError::Duplicate("meta-data"),
        ),
        ("meta-data=m", SpecError::NoUserData),
        ("network-config=n,meta-data=m", SpecError::NoUserData),
    ] {
        assert_eq!(parse_spec(text), Err(error), "{text:?}");
    }
    assert_eq!(
        SpecError::UnknownKey("vendor-data".into()).to_string(),
        "unknown key 'vendor-data' (known: user-data, meta-data, network-config)"
    );
}

#[test]
fn the_default_meta_data_names_the_instance_and_host_after_the_vm() {
    assert_eq!(
        default_meta_data("web-1"),
        "instance-id: web-1\nlocal-hostname: web-1\n"
    );
    let long = format!("-{}", "a".repeat(63));
    assert_eq!(
        default_meta_data(&long),
        format!("instance-id: {long}\nlocal-hostname: {}\n", "a".repeat(62))
    );
    assert!(default_meta_data("---").ends_with("local-hostname: pvm\n"));
}

#[test]
fn the_image_holds_the_label_and_every_file_byte_for_byte() {
    let user = b"#cloud-config\nhostname: seeded\n".to_vec();
    let meta = b"instance-id: i-1\n".to_vec();
    // Every byte value, and more than a cluster, so no byte is translated or cut.
    let network: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    let files = vec![
        (SeedFile::UserData, user.clone()),
        (SeedFile::MetaData, meta.clone()),
        (SeedFile::NetworkConfig, network.clone()),
    ];
    let image = fat::image(&files).unwrap();
    assert_eq!(image.len(), 1 << 20, "the files and room, in whole MiB");
    assert_eq!(
        fat::image(&files).unwrap(),
        image,
        "the same files, the same image"
    );
    let (read, label, root_label) = read_back(image);
    assert_eq!(label, "CIDATA");
    assert_eq!(root_label.as_deref(), Some("CIDATA"));
    assert_eq!(
        read,
        vec![
            ("user-data".to_string(), user),
            ("meta-data".to_string(), meta),
            ("network-config".to_string(), network),
        ]
    );
}

#[test]
fn a_seed_of_the_largest_files_fits() {
    let big = vec![0xa5u8; MAX_FILE_BYTES as usize];
    let files = vec![
        (SeedFile::UserData, big.clone()),
        (SeedFile::MetaData, big.clone()),
        (SeedFile::NetworkConfig, big.clone()),
    ];
    let image = fat::image(&files).unwrap();
    assert_eq!(image.len(), 13 << 20);
    assert_eq!(
        image.len() as u64,
        MAX_SEED_BYTES,
        "the bound a restore checks"
    );
    let (read, _, _) = read_back(image);
    assert_eq!(read.len(), 3);
    assert!(read.iter().all(|(_, data)| *data == big));
}

#[test]
fn the_built_seed_is_a_sealed_memfd_with_the_default_meta_data() {
    let user = scratch("built-user", b"#cloud-config\n");
    let seed = Seed::build(&spec(&user), "vm-7").unwrap();
    let mut image = vec![0u8; seed.bytes() as usize];
    seed.file().read_exact_at(&mut image, 0).unwrap();
    assert_eq!(
        image,
        fat::image(&seed_files(&spec(&user), "vm-7").unwrap()).unwrap()
    );
    let (read, _, _) = read_back(image.clone());
    assert_eq!(read[1].0, "meta-data");
    assert_eq!(read[1].1, b"instance-id: vm-7\nlocal-hostname: vm-7\n");
    assert_eq!(read.len(), 2, "no network-config unless given");
    // Sealed: neither writes nor size changes reach the guest's seed.
    assert!(seed.file().write_at(b"x", 0).is_err());
    assert!(seed.file().set_len(1).is_err());
    // The disk opens it read-only by path.
    let reopened = std::fs::read(seed.path()).unwrap();
    assert_eq!(reopened.len() as u64, seed.bytes());
    // A snapshot takes the image's bytes; a restore seals the same bytes into a new memfd.
    assert_eq!(seed.image().unwrap(), image);
    let again = Seed::from_image(&image).unwrap();
    assert_eq!(again.bytes(), seed.bytes());
    assert_eq!(again.image().unwrap(), image);
    assert!(again.file().write_at(b"x", 0).is_err());
    assert!(again.file().set_len(1).is_err());
}

#[test]
fn unusable_files_are_refused_naming_the_key_and_the_file() {
    let user = scratch("user", b"#cloud-config\n");
    let missing = PathBuf::from("/nonexistent/meta");
    let mut with_missing = spec(&user);
    with_missing.meta_data = Some(missing);
    let e = Seed::build(&with_missing, "vm").unwrap_err().to_string();
    assert!(e.starts_with("meta-data=/nonexistent/meta: "), "{e}");

    let dir = user.parent().unwrap().to_owned();
    let mut with_dir = spec(&user);
    with_dir.network_config = Some(dir.clone());
    let e = Seed::build(&with_dir, "vm").unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("network-config={}: ", dir.display())),
        "{e}"
    );

    for empty in [&b""[..], b"\n  \n"] {
        let path = scratch("empty", empty);
        let e = Seed::build(&spec(&path), "vm").unwrap_err();
        assert!(matches!(e, SeedError::EmptyUserData(_)), "{e}");
        assert!(e.to_string().contains("is empty"), "{e}");
    }

    let too_large = scratch("large", &vec![b'#'; MAX_FILE_BYTES as usize + 1]);
    let e = Seed::build(&spec(&too_large), "vm")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("user-data="), "{e}");
    assert!(
        e.ends_with("larger than the seed's limit of 4 MiB per file"),
        "{e}"
    );
    let exact = scratch("exact", &vec![b'#'; MAX_FILE_BYTES as usize]);
    assert!(Seed::build(&spec(&exact), "vm").is_ok());

    // A device that never ends is cut at the limit, not read forever.
    let e = Seed::build(&spec(Path::new("/dev/zero")), "vm").unwrap_err();
    assert!(matches!(e, SeedError::TooLarge { .. }), "{e}");
}

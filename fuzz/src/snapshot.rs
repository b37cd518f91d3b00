//! The snapshot file decoder (`pvm::snapshot::file`), which reads untrusted files: any bytes
//! are refused or decoded, never a panic or an allocation past the input's size. The first
//! byte chooses how the rest is used: odd, as a payload framed with a valid header and
//! checksum (so the fuzzer reaches the state decoder and the validation behind it); even, as
//! the whole file.

use pvm::snapshot::file::{decode, encode, frame};
use pvm::snapshot::sample::sample;

pub fn file(data: &[u8]) {
    let (mode, rest) = data.split_first().unwrap_or((&0, &[]));
    let bytes = if mode & 1 == 1 {
        frame(rest)
    } else {
        rest.to_vec()
    };
    let Ok(snapshot) = decode("fuzz", &bytes) else {
        return;
    };
    // Whatever decodes encodes again, to the same state.
    let again = encode(&snapshot).expect("a decoded state encodes");
    let twice = decode("fuzz", &again).expect("an encoded state decodes");
    assert_eq!(
        encode(&twice).expect("encodes"),
        again,
        "encoding is stable"
    );
    if snapshot.validate().is_ok() {
        let base = pvm::cli::parse(["pvm".into()]).expect("no flags parse");
        let _ = snapshot
            .description
            .to_config(&base, &[], &[("net0".into(), "t".into())]);
    }
}

/// Seeds: a whole file, its payload alone (framed by the harness), and a truncated file.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let file = encode(&sample()).expect("the sample encodes");
    let payload = file[24..file.len() - 4].to_vec();
    let with = |mode: u8, bytes: &[u8]| {
        let mut seed = vec![mode];
        seed.extend_from_slice(bytes);
        seed
    };
    vec![
        ("whole-file", with(0, &file)),
        ("payload", with(1, &payload)),
        ("truncated", with(0, &file[..file.len() / 2])),
    ]
}

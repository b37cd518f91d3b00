//! The Uffd page-fault handler's message parser (`pvm::uffd::parse_message`), which reads what
//! a VMM sent over its socket: any bytes are refused or give mappings the handler can serve
//! without reaching outside the memory file. The first 8 bytes are the memory file's length
//! (little-endian), the rest the message.

use pvm::uffd::{build_message, parse_message};

pub fn message(data: &[u8]) {
    let (len, text) = data.split_at(data.len().min(8));
    let mut bytes = [0u8; 8];
    bytes[..len.len()].copy_from_slice(len);
    let file_len = u64::from_le_bytes(bytes);
    let Ok(mappings) = parse_message(text, file_len) else {
        return;
    };
    let page = mappings.page_size;
    assert!(page.is_power_of_two() && page >= 4096);
    for (i, r) in mappings.regions.iter().enumerate() {
        assert!(r.size > 0 && (r.host | r.size | r.offset) % page == 0);
        assert!(r.offset + r.size <= file_len, "region {i} inside the file");
        // Every page of a region is found in it, the one past its end is not in it.
        assert_eq!(mappings.find(r.host), Some(r));
        assert_eq!(mappings.find(r.host + r.size - 1), Some(r));
        for (j, other) in mappings.regions.iter().enumerate().skip(i + 1) {
            assert!(
                r.host + r.size <= other.host || other.host + other.size <= r.host,
                "{i} {j}"
            );
        }
    }
    // What pvm would send for these regions parses again, into the same host ranges.
    let regions: Vec<_> = mappings.regions.iter().map(|r| (r.host, r.size)).collect();
    let total: u64 = regions.iter().map(|r| r.1).sum();
    if page == 4096 {
        let again = parse_message(build_message(&regions).as_bytes(), total)
            .expect("pvm's own message parses");
        let hosts: Vec<_> = again.regions.iter().map(|r| (r.host, r.size)).collect();
        assert_eq!(hosts, regions);
    }
}

/// Seeds: pvm's message (two regions), Firecracker's current and older ones, a hostile one.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let with = |file_len: u64, text: &str| {
        let mut v = file_len.to_le_bytes().to_vec();
        v.extend_from_slice(text.as_bytes());
        v
    };
    let pvm = build_message(&[(0x7f00_0000_0000, 3 << 30), (0x7f10_0000_0000, 1 << 30)]);
    vec![
        ("pvm", with(4 << 30, &pvm)),
        (
            "firecracker",
            with(
                1 << 20,
                r#"[{"base_host_virt_addr":140737488289792,"size":1048576,"offset":0,"page_size":4096,"page_size_kib":4096}]"#,
            ),
        ),
        (
            "firecracker-old",
            with(
                4 << 20,
                r#"[{"base_host_virt_addr":2097152,"size":4194304,"offset":0,"page_size_kib":2097152}]"#,
            ),
        ),
        (
            "overlap",
            with(
                1 << 20,
                r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096},{"base_host_virt_addr":8192,"size":4096,"offset":8192,"page_size":4096}]"#,
            ),
        ),
    ]
}

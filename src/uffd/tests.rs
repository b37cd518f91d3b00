use super::*;

const MIB: u64 = 1 << 20;

#[test]
fn pvm_sends_firecrackers_fields_back_to_back_in_the_file() {
    let text = build_message(&[(0x7f00_0000_0000, 2 * MIB), (0x7f10_0000_0000, MIB)]);
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let list = value.as_array().unwrap();
    assert_eq!(list.len(), 2);
    for (entry, (host, size, offset)) in list.iter().zip([
        (0x7f00_0000_0000u64, 2 * MIB, 0),
        (0x7f10_0000_0000, MIB, 2 * MIB),
    ]) {
        let fields = entry.as_object().unwrap();
        let mut names: Vec<_> = fields.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "base_host_virt_addr",
                "offset",
                "page_size",
                "page_size_kib",
                "size"
            ]
        );
        assert_eq!(fields["base_host_virt_addr"], host);
        assert_eq!(fields["size"], size);
        assert_eq!(fields["offset"], offset);
        // Bytes in both, as Firecracker sends them.
        assert_eq!(fields["page_size"], 4096);
        assert_eq!(fields["page_size_kib"], 4096);
    }
    let parsed = parse_message(text.as_bytes(), 3 * MIB).unwrap();
    assert_eq!(parsed.page_size, 4096);
    assert_eq!(
        parsed.regions[1],
        Region {
            host: 0x7f10_0000_0000,
            size: MIB,
            offset: 2 * MIB
        }
    );
    assert_eq!(parsed.find(0x7f10_0000_0fff), Some(&parsed.regions[1]));
    assert_eq!(parsed.find(0x7f10_0010_0000), None);
}

#[test]
fn firecrackers_messages_old_and_new_are_taken() {
    let new = r#"[{"base_host_virt_addr":140737488289792,"size":1048576,"offset":0,
        "page_size":4096,"page_size_kib":4096}]"#;
    let old = r#"[{"base_host_virt_addr":140737488289792,"size":1048576,"offset":0,
        "page_size_kib":4096}]"#;
    let newest = r#"[{"base_host_virt_addr":140737488289792,"size":1048576,"offset":0,
        "page_size":4096,"some_later_field":true}]"#;
    for text in [new, old, newest] {
        let m = parse_message(text.as_bytes(), MIB).unwrap();
        assert_eq!(m.regions.len(), 1, "{text}");
        assert_eq!(m.page_size, 4096);
    }
    // 2 MiB pages (Firecracker's huge_pages) are served too.
    let huge = r#"[{"base_host_virt_addr":2097152,"size":4194304,"offset":0,"page_size":2097152}]"#;
    assert_eq!(
        parse_message(huge.as_bytes(), 4 * MIB).unwrap().page_size,
        2 * MIB
    );
}

#[test]
fn hostile_messages_are_refused_with_what_is_wrong() {
    let one = |host: u64, size: u64, offset: u64, pages: &str| {
        format!(r#"{{"base_host_virt_addr":{host},"size":{size},"offset":{offset},{pages}}}"#)
    };
    let ps = r#""page_size":4096"#;
    let list = |items: &[String]| format!("[{}]", items.join(","));
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "not a JSON list"),
        (r#"{"base_host_virt_addr":0}"#.into(), "not a JSON list"),
        (
            r#"[{"size":4096,"offset":0,"page_size":4096}]"#.into(),
            "base_host_virt_addr",
        ),
        (
            r#"[{"base_host_virt_addr":-1,"size":4096,"offset":0,"page_size":4096}]"#.into(),
            "not a JSON list",
        ),
        ("[]".into(), "no region"),
        (list(&[one(4096, 4096, 0, r#""x":1"#)]), "no page size"),
        (
            list(&[one(4096, 4096, 0, r#""page_size":4096,"page_size_kib":4"#)]),
            "disagree",
        ),
        (
            list(&[one(4096, 4096, 0, r#""page_size":3000"#)]),
            "power of two",
        ),
        (
            list(&[one(4096, 4096, 0, r#""page_size":1024"#)]),
            "power of two",
        ),
        (
            list(&[
                one(4096, 4096, 0, ps),
                one(1 << 30, 2 * MIB, 4096, r#""page_size":2097152"#),
            ]),
            "one size",
        ),
        (list(&[one(4097, 4096, 0, ps)]), "not a multiple"),
        (list(&[one(4096, 100, 0, ps)]), "not a multiple"),
        (list(&[one(4096, 0, 0, ps)]), "the size is 0"),
        (list(&[one(4096, 4096, 1, ps)]), "not a multiple"),
        (list(&[one(4096, 2 * MIB, 0, ps)]), "past its end"),
        (list(&[one(4096, 4096, MIB, ps)]), "past its end"),
        (
            list(&[one(4096, 4096, u64::MAX - 4095, ps)]),
            "past its end",
        ),
        (list(&[one(u64::MAX - 4095, 8192, 0, ps)]), "wraps around"),
        (
            list(&[one(0x10000, 8192, 0, ps), one(0x11000, 4096, 8192, ps)]),
            "regions 0 and 1 overlap",
        ),
        (
            list(&[one(0x10000, 8192, 0, ps), one(0x20000, 4096, 4096, ps)]),
            "regions 0 and 1 overlap",
        ),
    ];
    for (text, want) in cases {
        let e = parse_message(text.as_bytes(), MIB).unwrap_err().to_string();
        assert!(e.contains(want), "{text}: {e}");
        assert!(!e.contains('\n'), "{e}");
    }
    let many = list(&vec![one(0, 4096, 0, ps); MAX_REGIONS + 1]);
    let e = parse_message(many.as_bytes(), MIB).unwrap_err();
    assert_eq!(e, MessageError::TooMany(MAX_REGIONS + 1));
    assert!(parse_message(&[0xff, 0xfe], MIB).is_err());
}

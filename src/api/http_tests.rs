use super::*;

const LIMIT: usize = 1024;

fn one(bytes: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
    parse(bytes, LIMIT)
}

#[test]
fn complete_requests_with_and_without_bodies() {
    let raw = b"PUT /drives/a HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET / HTTP/1.1\r\n\r\n";
    let (first, used) = one(raw).unwrap().unwrap();
    assert_eq!(first.method, Method::Put);
    assert_eq!(first.path, "/drives/a");
    assert_eq!(first.body, b"{}");
    assert!(!first.close);
    let (second, rest) = one(&raw[used..]).unwrap().unwrap();
    assert_eq!((second.method, second.body.len()), (Method::Get, 0));
    assert_eq!(used + rest, raw.len());
    let (close, _) = one(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap()
        .unwrap();
    assert!(close.close);
    let (old, _) = one(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
    assert!(old.close, "HTTP/1.0 closes unless keep-alive is asked for");
    let (expect, _) = one(b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n")
        .unwrap()
        .unwrap();
    assert!(expect.expect_continue);
}

#[test]
fn partial_requests_wait_for_more() {
    let raw = b"PUT /boot-source HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"a\":";
    for end in 0..raw.len() {
        assert_eq!(one(&raw[..end]).unwrap(), None, "at {end}");
    }
}

#[test]
fn hostile_input_is_refused() {
    for (raw, want) in [
        (&b"GARBAGE\r\n\r\n"[..], "malformed"),
        (b"GET\r\n\r\n", "malformed"),
        (b"GET / HTTP/9.9\r\n\r\n", "malformed"),
        (b"POST / HTTP/1.1\r\n\r\n", "method POST"),
        (b"get / HTTP/1.1\r\n\r\n", "method get"),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            "Content-Length",
        ),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "Content-Length",
        ),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "Content-Length",
        ),
        (
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "Transfer-Encoding",
        ),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: 1025\r\n\r\n",
            "1025 bytes is larger than the limit of 1024",
        ),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "Content-Length",
        ),
    ] {
        let e = one(raw).unwrap_err().to_string();
        assert!(e.contains(want), "{:?}: {e}", String::from_utf8_lossy(raw));
    }
    let mut many = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..40 {
        many.extend(format!("X-{i}: y\r\n").bytes());
    }
    many.extend(b"\r\n");
    assert!(
        one(&many)
            .unwrap_err()
            .to_string()
            .contains("too many headers")
    );
    // A head that never ends is cut off at the limit, not buffered forever.
    let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
    long.resize(MAX_HEAD + 1, b'a');
    assert_eq!(one(&long).unwrap_err(), HttpError::HeadTooLarge);
    let mut long_line = b"GET /".to_vec();
    long_line.resize(MAX_HEAD + 1, b'a');
    assert_eq!(one(&long_line).unwrap_err(), HttpError::HeadTooLarge);
}

#[test]
fn responses_on_the_wire() {
    let text = String::from_utf8(Response::no_content().encode(false)).unwrap();
    assert_eq!(
        text,
        "HTTP/1.1 204 No Content\r\nServer: pvm\r\nConnection: keep-alive\r\n\r\n"
    );
    let text = String::from_utf8(Response::fault("bad \"x\"").encode(true)).unwrap();
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert!(text.contains("Connection: close\r\n"), "{text}");
    let body = r#"{"fault_message":"bad \"x\""}"#;
    assert!(
        text.contains(&format!("Content-Length: {}\r\n", body.len())),
        "{text}"
    );
    assert!(text.ends_with(body), "{text}");
    let framing = Response::framing_error(&HttpError::HeadTooLarge);
    assert!(
        framing
            .body
            .unwrap()
            .starts_with(r#"{"error":"request head"#)
    );
}

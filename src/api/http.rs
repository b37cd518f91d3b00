//! The HTTP/1.1 framing of the API: request heads are parsed by `httparse`; bodies are
//! `Content-Length` only, bounded by the payload limit; responses are written here. Nothing in
//! this file blocks or grows without bound: a connection buffers at most one request head
//! ([`MAX_HEAD`]) plus one body (the payload limit).

/// The largest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// The most headers one request may carry.
const MAX_HEADERS: usize = 32;

/// The methods Firecracker's API has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
    Patch,
    Delete,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }
}

/// One complete request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    pub path: String,
    pub body: Vec<u8>,
    /// The client sent `Connection: close` (or spoke HTTP/1.0 without keep-alive).
    pub close: bool,
    /// The client waits for `100 Continue` before sending the body.
    pub expect_continue: bool,
}

/// Why the bytes on a connection are not an acceptable request. After any of these the
/// connection's framing is lost: it gets one error response and is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("request head longer than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("unsupported HTTP method {0}")]
    Method(String),
    #[error("unsupported HTTP version 1.{0}")]
    Version(u8),
    #[error("invalid Content-Length")]
    ContentLength,
    #[error("Transfer-Encoding is not supported; send a Content-Length")]
    TransferEncoding,
    #[error("request payload of {size} bytes is larger than the limit of {limit} bytes")]
    PayloadTooLarge { size: usize, limit: usize },
}

/// A request head: everything [`parse`] needs to know to wait for the body.
#[derive(Debug)]
pub struct Head {
    pub request: Request,
    /// Bytes of the head itself.
    pub head_len: usize,
    pub content_length: usize,
}

/// Parses the head at the start of `buf`: None while it is incomplete.
pub fn parse_head(buf: &[u8], max_payload: usize) -> Result<Option<Head>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(HttpError::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::Malformed("too many headers"));
        }
        Err(_) => return Err(HttpError::Malformed("bad request line or header")),
    };
    if head_len > MAX_HEAD {
        return Err(HttpError::HeadTooLarge);
    }
    let method = match parsed.method {
        Some("GET") => Method::Get,
        Some("PUT") => Method::Put,
        Some("PATCH") => Method::Patch,
        Some("DELETE") => Method::Delete,
        other => return Err(HttpError::Method(other.unwrap_or_default().to_string())),
    };
    let version = parsed.version.unwrap_or(1);
    if version > 1 {
        return Err(HttpError::Version(version));
    }
    let path = parsed.path.unwrap_or_default().to_string();
    let mut content_length = None;
    let mut close = version == 0;
    let mut expect_continue = false;
    for header in parsed.headers.iter() {
        let value =
            std::str::from_utf8(header.value).map_err(|_| HttpError::Malformed("header value"))?;
        let value = value.trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            let n: usize = value.parse().map_err(|_| HttpError::ContentLength)?;
            // Two different lengths would let a proxy and pvm disagree on the framing.
            if content_length.is_some_and(|m| m != n) {
                return Err(HttpError::ContentLength);
            }
            content_length = Some(n);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::TransferEncoding);
        } else if header.name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                close = true;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                close = false;
            }
        } else if header.name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > max_payload {
        return Err(HttpError::PayloadTooLarge {
            size: content_length,
            limit: max_payload,
        });
    }
    Ok(Some(Head {
        request: Request {
            method,
            path,
            body: Vec::new(),
            close,
            expect_continue,
        },
        head_len,
        content_length,
    }))
}

/// Takes one complete request off the front of `buf`: Some((request, bytes used)), or None while
/// more bytes are needed.
pub fn parse(buf: &[u8], max_payload: usize) -> Result<Option<(Request, usize)>, HttpError> {
    let Some(head) = parse_head(buf, max_payload)? else {
        return Ok(None);
    };
    let end = head.head_len + head.content_length;
    if buf.len() < end {
        return Ok(None);
    }
    let mut request = head.request;
    request.body = buf[head.head_len..end].to_vec();
    Ok(Some((request, end)))
}

/// A response: a status and, for 200 and errors, a JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Option<String>,
}

impl Response {
    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
        }
    }

    pub fn json(body: String) -> Self {
        Response {
            status: 200,
            body: Some(body),
        }
    }

    /// Firecracker's error body: `{"fault_message": "..."}`, status 400.
    pub fn fault(message: &str) -> Self {
        Response {
            status: 400,
            body: Some(serde_json::json!({ "fault_message": message }).to_string()),
        }
    }

    /// What a connection whose bytes could not be framed gets before it is closed: not a
    /// fault_message, but an `error` body, as Firecracker's HTTP layer answers.
    pub fn framing_error(error: &HttpError) -> Self {
        Response {
            status: 400,
            body: Some(
                serde_json::json!({
                    "error": format!("{error}\nThe connection is closed; unanswered requests are dropped.")
                })
                .to_string(),
            ),
        }
    }

    /// The bytes on the wire.
    pub fn encode(&self, close: bool) -> Vec<u8> {
        let reason = match self.status {
            100 => "Continue",
            200 => "OK",
            204 => "No Content",
            _ => "Bad Request",
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nServer: pvm\r\nConnection: {}\r\n",
            self.status,
            if close { "close" } else { "keep-alive" }
        );
        if let Some(body) = &self.body {
            out.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ));
        } else {
            out.push_str("\r\n");
        }
        out.into_bytes()
    }
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;

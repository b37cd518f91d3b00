//! The Firecracker API's request path on hostile bytes: the input is what a client sends on the
//! socket. Every request the HTTP framing takes off it is routed and its JSON body decoded, as
//! the api thread does; then the whole input is also tried as the JSON body of every endpoint
//! and as a config file (mapping stops short of opening the files it names).

use pvm::api::http::{self, Method, Request, Response};
use pvm::api::models::{FcConfig, strip_pci_off};
use pvm::api::routes;

/// The payload limit the harness frames with: small, so inputs reach it.
const LIMIT: usize = 4096;

pub fn request(data: &[u8]) {
    let mut rest = data;
    while let Ok(Some((request, used))) = http::parse(rest, LIMIT) {
        assert!(
            used > 0 && used <= rest.len(),
            "framing used {used} of {}",
            rest.len()
        );
        assert!(request.body.len() <= LIMIT);
        // The request is complete: no shorter prefix may be taken for a whole request.
        if let Ok(Some((_, shorter))) = http::parse(&rest[..used - 1], LIMIT) {
            assert!(shorter < used, "a prefix framed past its end");
        }
        answer(&request);
        rest = &rest[used..];
    }
    for path in [
        "/boot-source",
        "/drives/d",
        "/network-interfaces/n",
        "/machine-config",
        "/entropy",
        "/actions",
        "/vm",
    ] {
        for method in [Method::Put, Method::Patch] {
            answer(&Request {
                method,
                path: path.to_string(),
                body: data.to_vec(),
                close: false,
                expect_continue: false,
            });
        }
    }
    if let Ok(config) = serde_json::from_slice::<FcConfig>(data) {
        let _ = config.check_sections();
        if let Some(machine) = &config.machine_config {
            let _ = machine.validate();
        }
        if let Some(boot) = &config.boot_source {
            let _ = boot.boot_args.as_deref().map(strip_pci_off);
        }
    }
}

/// Routes a request and encodes the fault it may get, as the api thread would.
fn answer(request: &Request) {
    if let Err(e) = routes::route(request) {
        let wire = Response::fault(&e.to_string()).encode(request.close);
        assert!(wire.starts_with(b"HTTP/1.1 400 "));
    }
}

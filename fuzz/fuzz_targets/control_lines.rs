//! The control channel: a mount daemon reads request lines from any local client allowed on its
//! socket, and the CLI reads the daemon's answer lines. Decode any line both ways; a message
//! that decodes re-encodes to a line that decodes to the same message, and every path in a
//! request can be checked (`WirePath::check`) and shown without panicking.

#![no_main]

use horcrux_proto::control::{Request, Response, WirePath, decode_line, encode_line};
use libfuzzer_sys::fuzz_target;

fn paths(r: &Request) -> Vec<&WirePath> {
    match r {
        Request::Diff { path: Some(p) } | Request::Discard { path: Some(p) } => vec![p],
        Request::Prefetch { paths, .. } => paths.iter().collect(),
        _ => Vec::new(),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = decode_line::<Request>(data) {
        for p in paths(&req) {
            let _ = p.check();
            let _ = p.to_string();
            let _ = p.starts_with(&WirePath::from("a"));
        }
        let line = encode_line(&req).expect("requests encode");
        let back: Request = decode_line(&line).expect("an encoded request decodes");
        assert_eq!(back, req);
    }
    if let Ok(resp) = decode_line::<Response>(data) {
        let line = encode_line(&resp).expect("responses encode");
        let back: Response = decode_line(&line).expect("an encoded response decodes");
        assert_eq!(back, resp);
    }
});

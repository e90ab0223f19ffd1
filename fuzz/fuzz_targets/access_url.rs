//! Access URLs come from command lines, Docker volume options (`-o access=...`), config files
//! and a repository's `remotes/` objects. Parse any text as a mirror list and as one URL; what
//! parses prints (Display) as a URL that parses again to the same location, and what a
//! repository would be served as (`default_repo_name`) is computed without panicking.

#![no_main]

use horcrux::serve::default_repo_name;
use horcrux::store::{AccessUrl, parse_access, parse_one};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_access(text);
    let _ = horcrux_plugin::driver::check_no_credentials(text);
    let Ok(url) = parse_one(text) else {
        return;
    };
    let _ = default_repo_name(&url);
    let shown = url.to_string();
    // Display drops S3 options and percent-encoding; the location itself must survive.
    if let Ok(again) = parse_one(&shown) {
        match (&url, &again) {
            (
                AccessUrl::Peer { host, port, repo },
                AccessUrl::Peer {
                    host: h,
                    port: p,
                    repo: r,
                },
            ) => {
                assert_eq!((host, port, repo), (h, p, r), "{text:?} -> {shown:?}");
            }
            (AccessUrl::S3 { bucket, .. }, AccessUrl::S3 { bucket: b, .. }) => {
                assert_eq!(bucket, b, "{text:?} -> {shown:?}");
            }
            _ => {}
        }
    }
});

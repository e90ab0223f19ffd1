//! The configuration file (`/etc/horcrux/config.toml`, `~/.config/horcrux/config.toml`):
//! parsed by the CLI (cli/src/config.rs, compiled in here as it is). Any text is a clear error
//! or a configuration whose sources all parse as access URLs.

#![no_main]

#[allow(dead_code, clippy::all)]
#[path = "../../cli/src/config.rs"]
mod config;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut c = config::Config::default();
    let path = std::path::Path::new("/etc/horcrux/config.toml");
    if c.merge(path, text, Some(std::path::Path::new("/home/u")))
        .is_ok()
    {
        for (name, url) in &c.sources {
            assert!(horcrux::store::parse_access(&url.value).is_ok(), "{name}");
            assert_eq!(c.resolve_access(name), url.value);
        }
        // Merging the same file twice is idempotent.
        let before = format!("{:?}", c.sources);
        c.merge(path, text, None)
            .expect("the same text merges again");
        assert_eq!(before, format!("{:?}", c.sources));
    }
});

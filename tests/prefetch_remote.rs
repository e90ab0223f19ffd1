//! `horcrux prefetch --all` over SSH (the loopback OpenSSH server of the other remote tests):
//! once hydrated, the SSH server is killed and every byte still reads, and a new mount with
//! the server gone falls back to the prefetched version.
//!
//! Build the binary first: `cargo build --workspace`. Needs sshd (tests/setup.sh).

mod common;
#[path = "support/remote.rs"]
mod remote;
#[path = "support/s3server.rs"]
mod s3server;
#[path = "support/sshd.rs"]
mod sshd;

use std::ffi::OsStr;

use common::*;
use remote::*;

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

#[test]
fn prefetch_over_ssh_then_the_server_dies() {
    let t = tempdir();
    let s = start_sshd();
    let access = Access::ssh(&s);
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    let files: Vec<(String, Vec<u8>)> = vec![
        ("big".into(), bytes(5, (6 * MIB + 123) as usize)),
        ("d/one".into(), bytes(6, MIB as usize)),
        ("d/small".into(), bytes(7, 999)),
    ];
    for (p, d) in &files {
        std::fs::write(src.join(p), d).unwrap();
    }
    let url = s.url(&s.dir().join("repo"));
    access.generate("v", &src, &url);
    let mnt = t.path().join("mnt");
    let cache = t.path().join("cache");
    let m = access.mount(&url, &mnt, &cache, &["--timeout", "3"]);
    let out = access.ok(&[os("prefetch"), m.mountpoint.as_os_str(), os("--all")]);
    assert!(out.contains("prefetch done"), "{out}");
    drop(s);
    for (p, d) in &files {
        assert!(std::fs::read(m.path(p)).unwrap() == *d, "{p}");
    }
    m.unmount();
    let m = access.mount(&url, &mnt, &cache, &["--timeout", "3"]);
    for (p, d) in &files {
        assert!(std::fs::read(m.path(p)).unwrap() == *d, "{p}");
    }
    assert!(m.log_text().contains("source is unreachable"));
    m.unmount();
}

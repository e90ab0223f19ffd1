//! `horcrux verify URL` through the CLI: a sound repository (file and S3) is OK with every
//! count right; a corrupted chunk and a missing one are found and named, and the exit status
//! says so; `--quick` finds what is missing without reading; lazily fetched data on a
//! registered remote is not damage, for `verify` nor for `gc`.
//!
//! Build the binary first: `cargo build --workspace`.

mod common;
#[path = "support/remote.rs"]
mod remote;
#[path = "support/s3server.rs"]
mod s3server;
#[path = "support/sshd.rs"]
mod sshd;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;

use common::*;
use remote::*;

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap()
}

fn chunk_files(repo: &Path) -> Vec<std::path::PathBuf> {
    files_under(&repo.join("chunks"))
        .into_iter()
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect()
}

/// Three 1 MiB chunks of data and a pack of small files.
fn repo(access: &Access, t: &Path) -> std::path::PathBuf {
    fs::create_dir_all(t.join("src")).unwrap();
    fs::write(t.join("src/big"), bytes(3, (3 * MIB) as usize)).unwrap();
    fs::write(t.join("src/small"), b"hello\n").unwrap();
    let r = t.join("repo");
    access.generate("vol", &t.join("src"), &url(&r));
    r
}

#[test]
fn verify_finds_corrupt_and_missing_chunks() {
    let t = tempdir();
    let access = Access::default();
    let r = repo(&access, t.path());
    let out = access.ok(&[os("verify"), os(&url(&r))]);
    eprintln!("{out}");
    assert!(out.contains(": OK"), "{out}");
    let v = json(&access.ok(&[os("verify"), os(&url(&r)), os("--json")]));
    assert_eq!(v["refs"], 1, "{v}");
    assert_eq!(v["commits"], 1, "{v}");
    assert_eq!(v["manifests"], 1, "{v}");
    assert_eq!(v["chunks"], chunk_files(&r).len() as u64, "{v}");
    assert_eq!(v["chunks_hashed"], v["chunks"], "{v}");

    // One byte flipped in one chunk, another chunk gone.
    let mut chunks = chunk_files(&r);
    chunks.sort_by_key(|p| fs::metadata(p).unwrap().len());
    let (bad, gone) = (
        chunks[chunks.len() - 1].clone(),
        chunks[chunks.len() - 2].clone(),
    );
    let mut data = fs::read(&bad).unwrap();
    data[1000] ^= 1;
    fs::write(&bad, data).unwrap();
    fs::remove_file(&gone).unwrap();
    let o = access.run(&[os("verify"), os(&url(&r))]);
    assert!(
        !o.status.success(),
        "verify of a damaged repository succeeded"
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        out.contains("corrupt  chunks/") && out.contains(&name(&bad)),
        "{out}"
    );
    assert!(
        out.contains("missing  chunks/") && out.contains(&name(&gone)),
        "{out}"
    );
    assert!(
        out.contains("DAMAGED") && err.contains("1 missing, 1 corrupt"),
        "{out}{err}"
    );
    // --quick reads nothing: it finds the missing chunk only.
    let o = access.run(&[os("verify"), os(&url(&r)), os("--quick"), os("--json")]);
    assert!(!o.status.success());
    let v = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(v["missing"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["corrupt"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(v["chunks_hashed"], 0, "{v}");
}

#[test]
fn verify_over_s3_and_lazily_fetched_data() {
    let t = tempdir();
    let t = t.path();
    let s3 = start_moto("verify");
    let access = Access::default().with_s3(&s3);
    let r = repo(&access, t);
    let remote = s3_url(&s3, "verify/r");
    access.ok(&[os("clone"), os(&url(&r)), os(&remote)]);
    let out = access.ok(&[os("verify"), os(&remote)]);
    assert!(out.contains(": OK"), "{out}");

    // A second version on S3, fetched lazily into another copy: its new chunks are on S3.
    let m = access.mount(&remote, &t.join("m"), &t.join("cm"), &[]);
    fs::write(m.path("new"), bytes(4, MIB as usize)).unwrap();
    access.ok(&[os("commit"), os("-m"), os("new"), m.mountpoint.as_os_str()]);
    m.unmount();
    let copy = t.join("copy");
    access.ok(&[os("clone"), os(&url(&r)), os(&url(&copy))]);
    access.ok(&[
        os("pull"),
        os(&remote),
        os("--access"),
        os(&url(&copy)),
        os("--name"),
        os("vol"),
    ]);
    let v = json(&access.ok(&[os("verify"), os(&url(&copy)), os("--json")]));
    assert!(v["on_remotes"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["missing"].as_array().unwrap().len(), 0, "{v}");
    let out = access.ok(&[os("gc"), os("--dry-run"), os("--access"), os(&url(&copy))]);
    assert!(!out.contains("missing"), "{out}");
}

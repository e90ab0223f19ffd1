//! `horcrux gc` through the CLI, with real FUSE mounts, on a file:// repository and on S3
//! (moto): commits that a `reset --hard` or a `branch -d` left unreachable are listed by
//! `--dry-run` (which removes and writes nothing), survive a first run with the default grace
//! period, and are removed — exactly them — by two runs with `--grace 0`; and gc keeps
//! everything reachable: every ref still mounts and reads the same bytes afterwards.
//!
//! Build the binary first: `cargo build --workspace`.

mod common;
#[path = "support/remote.rs"]
mod remote;
#[path = "support/s3server.rs"]
mod s3server;
#[path = "support/sshd.rs"]
mod sshd;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use remote::*;

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// `horcrux commit -m MSG MP`; the new commit's hex id.
fn commit(access: &Access, mp: &Path, msg: &str) -> String {
    access.ok(&[
        os("commit"),
        os("-m"),
        os(msg),
        mp.as_os_str(),
        os("--author"),
        os("Tester <t@example.com>"),
    ]);
    base(access, mp)
}

/// The commit a mount sits on (`status --json`'s base).
fn base(access: &Access, mp: &Path) -> String {
    let out = access.ok(&[os("status"), os("--json"), mp.as_os_str()]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v["base_commit"].as_str().unwrap().to_string()
}

/// `horcrux gc --json --access REPO EXTRA...`.
fn gc(access: &Access, repo: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![os("gc"), os("--json"), os("--access"), os(repo)];
    args.extend(extra.iter().map(|s| os(s)));
    let out = access.ok(&args);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("gc printed {out}: {e}"))
}

fn keys(v: &serde_json::Value, field: &str) -> BTreeSet<String> {
    v[field]
        .as_array()
        .unwrap_or_else(|| panic!("no `{field}` in {v}"))
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect()
}

fn n(v: &serde_json::Value, a: &str, b: &str) -> u64 {
    v[a][b]
        .as_u64()
        .unwrap_or_else(|| panic!("no {a}.{b} in {v}"))
}

/// Every object key of a file:// repository (chunks, manifests, commits).
fn objects(repo: &Path) -> BTreeSet<String> {
    ["chunks", "manifests", "commits"]
        .iter()
        .flat_map(|d| files_under(&repo.join(d)))
        .map(|p| p.strip_prefix(repo).unwrap().to_string_lossy().into_owned())
        .collect()
}

/// Write `fill` over 4 KiB at `off` of `big` in the mount.
fn patch(mp: &Path, off: u64, fill: u8) {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(mp.join("big"))
        .unwrap();
    f.write_all_at(&[fill; 4096], off).unwrap();
}

fn patched(mut big: Vec<u8>, off: u64, fill: u8) -> Vec<u8> {
    big[off as usize..off as usize + 4096].fill(fill);
    big
}

/// Mount `reference` read-only with a fresh cache and check `big` and the small files.
fn check_ref(access: &Access, repo: &str, t: &Path, reference: &str, big: &[u8], tag: &str) {
    let m = access.mount(
        repo,
        &t.join(format!("check-{tag}")),
        &t.join(format!("check-cache-{tag}")),
        &["--read-only", "--ref", reference],
    );
    assert!(
        fs::read(m.path("big")).unwrap() == big,
        "{reference}: big differs after gc"
    );
    assert_eq!(fs::read(m.path("d/a")).unwrap(), b"alpha\n");
    assert_eq!(fs::read(m.path("small")).unwrap(), b"small\n");
    m.unmount();
}

/// The whole story on one repository. `files`: the repository's directory when it is
/// file://, to check the objects on disk too.
fn story(access: &Access, repo: &str, t: &Path, files: Option<&Path>) {
    let src = t.join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    let big = bytes(7, (4 * MIB + 5) as usize);
    fs::write(src.join("big"), &big).unwrap();
    fs::write(src.join("d/a"), b"alpha\n").unwrap();
    fs::write(src.join("small"), b"small\n").unwrap();
    access.generate("vol", &src, repo);

    // Two commits on main, each changing one 1 MiB chunk of `big`.
    let a = access.mount(repo, &t.join("a"), &t.join("ca"), &[]);
    let c0 = base(access, &a.mountpoint);
    patch(&a.mountpoint, MIB + 10, 0x11);
    let c1 = commit(access, &a.mountpoint, "one");
    let big1 = patched(big.clone(), MIB + 10, 0x11);
    let all_reachable = gc(access, repo, &["--dry-run"]);
    assert!(keys(&all_reachable, "unreachable_keys").is_empty());
    let before_c2 = files.map(objects);
    patch(&a.mountpoint, 3 * MIB + 10, 0x22);
    let c2 = commit(access, &a.mountpoint, "two");
    let with_c2 = gc(access, repo, &["--dry-run"]);
    // c2 made a commit, a manifest and one chunk.
    assert_eq!(
        n(&with_c2, "reachable", "objects"),
        n(&all_reachable, "reachable", "objects") + 3,
        "{with_c2}"
    );

    // reset --hard HEAD~1: c2's commit, manifest and chunk are unreachable.
    access.ok(&[
        os("reset"),
        os("--hard"),
        os("HEAD~1"),
        a.mountpoint.as_os_str(),
    ]);
    let dry = gc(access, repo, &["--dry-run", "--grace", "0"]);
    let unreachable = keys(&dry, "unreachable_keys");
    assert_eq!(unreachable.len(), 3, "{dry}");
    assert!(unreachable.contains(&format!("commits/{c2}")), "{dry}");
    assert_eq!(
        unreachable
            .iter()
            .filter(|k| k.starts_with("chunks/"))
            .count(),
        1
    );
    assert_eq!(
        unreachable
            .iter()
            .filter(|k| k.starts_with("manifests/"))
            .count(),
        1
    );
    // No earlier run recorded anything: even with --grace 0, nothing would go yet.
    assert!(keys(&dry, "removed_keys").is_empty(), "{dry}");
    assert!(dry["record"].is_null());
    if let (Some(dir), Some(before)) = (files, &before_c2) {
        let now: BTreeSet<String> = objects(dir);
        let added: BTreeSet<String> = now.difference(before).cloned().collect();
        assert_eq!(
            added, unreachable,
            "the dry run names exactly what c2 added"
        );
        assert!(!dir.join("gc").exists(), "a dry run wrote a record");
    }

    // A run with the default grace period removes nothing and records the three.
    let first = gc(access, repo, &[]);
    assert_eq!(keys(&first, "unreachable_keys"), unreachable);
    assert!(keys(&first, "removed_keys").is_empty(), "{first}");
    assert_eq!(n(&first, "pending", "objects"), 3);
    assert!(first["record"].as_str().unwrap().starts_with("gc/pending-"));
    // Again with the default grace: still nothing (recorded less than an hour ago).
    let again = gc(access, repo, &[]);
    assert!(keys(&again, "removed_keys").is_empty(), "{again}");
    // A dry run with --grace 0 now names them, and still removes nothing.
    let dry = gc(access, repo, &["--dry-run", "--grace", "0"]);
    assert_eq!(keys(&dry, "removed_keys"), unreachable);
    let still = gc(access, repo, &["--dry-run"]);
    assert_eq!(keys(&still, "unreachable_keys"), unreachable);

    // --grace 0: exactly the unreachable ones go.
    let swept = gc(access, repo, &["--grace", "0"]);
    assert_eq!(keys(&swept, "removed_keys"), unreachable, "{swept}");
    assert_eq!(n(&swept, "removed", "objects"), 3);
    assert!(
        n(&swept, "removed", "bytes") >= MIB,
        "a whole chunk went: {swept}"
    );
    assert!(swept["record"].is_null(), "{swept}");
    assert!(keys(&swept, "missing").is_empty());
    if let (Some(dir), Some(before)) = (files, &before_c2) {
        assert_eq!(&objects(dir), before);
        assert!(
            files_under(&dir.join("gc")).is_empty(),
            "records left behind"
        );
    }
    let clean = gc(access, repo, &["--dry-run", "--grace", "0"]);
    assert!(keys(&clean, "unreachable_keys").is_empty(), "{clean}");
    assert_eq!(
        n(&clean, "reachable", "objects"),
        n(&all_reachable, "reachable", "objects")
    );

    // gc keeps everything reachable: main (c1), its parent, and the live mount.
    assert!(fs::read(a.path("big")).unwrap() == big1);
    check_ref(access, repo, t, "main", &big1, "main");
    check_ref(access, repo, t, &c0, &big, "base");
    check_ref(access, repo, t, &c1, &big1, "c1");

    // A branch with a commit of its own, then `branch -d`: its unique objects go.
    access.ok(&[os("branch"), os("exp"), a.mountpoint.as_os_str()]);
    access.ok(&[os("tag"), os("v1"), a.mountpoint.as_os_str()]);
    a.unmount();
    let e = access.mount(repo, &t.join("e2"), &t.join("ce2"), &["--ref", "exp"]);
    patch(&e.mountpoint, 10, 0x33);
    let c3 = commit(access, &e.mountpoint, "on exp");
    let big3 = patched(big1.clone(), 10, 0x33);
    e.unmount();
    let refs = gc(access, repo, &["--dry-run", "--grace", "0"]);
    assert!(keys(&refs, "unreachable_keys").is_empty(), "{refs}");
    assert_eq!(refs["refs"], 3, "{refs}");
    check_ref(access, repo, t, "exp", &big3, "exp");
    access.ok(&[os("branch"), os("-d"), os("exp"), os("--access"), os(repo)]);
    let branches = access.ok(&[os("branch"), os("--access"), os(repo)]);
    assert!(!branches.contains("exp"), "{branches}");
    let first = gc(access, repo, &["--grace", "0"]);
    let gone = keys(&first, "unreachable_keys");
    assert_eq!(gone.len(), 3, "{first}");
    assert!(gone.contains(&format!("commits/{c3}")));
    assert!(keys(&first, "removed_keys").is_empty());
    let second = gc(access, repo, &["--grace", "0"]);
    assert_eq!(keys(&second, "removed_keys"), gone, "{second}");
    // The tag at c1 keeps c1 (and main does too); deleting it removes nothing more.
    access.ok(&[os("tag"), os("-d"), os("v1"), os("--access"), os(repo)]);
    gc(access, repo, &["--grace", "0"]);
    let last = gc(access, repo, &["--grace", "0"]);
    assert!(keys(&last, "removed_keys").is_empty(), "{last}");
    assert_eq!(
        n(&last, "reachable", "objects"),
        n(&all_reachable, "reachable", "objects")
    );
    check_ref(access, repo, t, "main", &big1, "main-after");
    check_ref(access, repo, t, &c0, &big, "base-after");
}

#[test]
fn gc_on_a_file_repository_keeps_everything_reachable() {
    let t = tempdir();
    let repo = t.path().join("repo");
    story(&Access::default(), &url(&repo), t.path(), Some(&repo));
}

#[test]
fn gc_on_s3_keeps_everything_reachable() {
    let s3 = start_moto("gcbucket");
    let access = Access::default().with_s3(&s3);
    let t = tempdir();
    story(&access, &s3_url(&s3, "gcbucket/repo"), t.path(), None);
}

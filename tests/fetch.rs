//! `horcrux remote` and `horcrux fetch` through the CLI with real FUSE mounts: origins A and B
//! share history through a remote R; A commits and pushes; B fetches: R's branch becomes the
//! remote-tracking ref `backup/main` with its commits and manifests, and no data. Mounting,
//! diffing and logging that version work at once; its chunks are read from R on demand.
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
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use remote::*;

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn read_ref(repo: &Path, rel: &str) -> Option<String> {
    fs::read_to_string(repo.join("volumes/vol/refs").join(rel))
        .ok()
        .map(|s| s.trim().to_string())
}

#[test]
fn fetch_brings_refs_and_manifests_and_the_data_stays_lazy() {
    let t = tempdir();
    let t = t.path();
    let access = Access::default();
    fs::create_dir_all(t.join("src")).unwrap();
    let big = bytes(5, (4 * MIB) as usize);
    fs::write(t.join("src/big"), &big).unwrap();
    fs::write(t.join("src/small"), b"base\n").unwrap();
    let (origin_a, origin_b, r) = (t.join("origin-a"), t.join("origin-b"), t.join("r"));
    access.generate("vol", &t.join("src"), &url(&origin_a));
    access.ok(&[
        os("push"),
        os(&url(&r)),
        os("--access"),
        os(&url(&origin_a)),
    ]);
    access.ok(&[os("clone"), os(&url(&r)), os(&url(&origin_b))]);
    let base = read_ref(&origin_b, "heads/main").unwrap();
    let b = access.mount(&url(&origin_b), &t.join("b"), &t.join("cb"), &[]);
    let bmp = b.mountpoint.as_os_str();

    // A commits a change to both files and pushes it to R.
    let a = access.mount(&url(&origin_a), &t.join("a"), &t.join("ca"), &[]);
    fs::write(a.path("small"), b"from A\n").unwrap();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(a.path("big"))
        .unwrap();
    f.write_all_at(&bytes(6, MIB as usize), MIB).unwrap();
    drop(f);
    access.ok(&[
        os("commit"),
        os("-m"),
        os("from A"),
        a.mountpoint.as_os_str(),
    ]);
    access.ok(&[os("push"), os(&url(&r)), a.mountpoint.as_os_str()]);
    let c = read_ref(&origin_a, "heads/main").unwrap();
    let new_big = fs::read(a.path("big")).unwrap();
    a.unmount();

    // Register R as `backup`; with no other remote, `fetch` needs no name.
    let out = access.ok(&[os("remote"), os("add"), os("backup"), os(&url(&r)), bmp]);
    assert!(out.contains("remote `backup`"), "{out}");
    let out = access.ok(&[os("remote"), bmp]);
    assert!(out.contains("backup") && out.contains(&url(&r)), "{out}");
    let chunks_before = files_under(&origin_b.join("chunks")).len();
    let out = access.ok(&[os("fetch"), bmp]);
    eprintln!("fetch: {out}");
    assert!(out.contains("fetched vol from backup"), "{out}");
    assert!(
        out.contains(&format!("backup/main: (new) → {}", &c[..12])),
        "{out}"
    );
    assert!(out.contains("0 of 0 chunks"), "{out}");
    assert_eq!(
        read_ref(&origin_b, "remotes/backup/main").as_deref(),
        Some(c.as_str())
    );
    // Nothing else moved: B's branch, B's mount, B's data.
    assert_eq!(read_ref(&origin_b, "heads/main").unwrap(), base);
    assert_eq!(fs::read(b.path("small")).unwrap(), b"base\n");
    assert_eq!(files_under(&origin_b.join("chunks")).len(), chunks_before);
    assert!(origin_b.join(format!("commits/{c}")).exists());

    // The fetched version is known by name at once: branch list, log, diff.
    let out = access.ok(&[os("branch"), bmp]);
    assert!(out.contains("remotes/backup/main"), "{out}");
    let out = access.ok(&[os("log"), os("backup/main"), bmp]);
    assert!(
        out.contains("from A") && out.contains("backup/main"),
        "{out}"
    );
    let out = access.ok(&[os("diff"), os("main"), os("backup/main"), bmp]);
    assert!(out.contains("small") && out.contains("big"), "{out}");

    // Mounting it reads the data from R, verified, on demand; B's origin gets none of it.
    let m = access.mount(
        &url(&origin_b),
        &t.join("m"),
        &t.join("cm"),
        &["--ref", "backup/main", "--read-only"],
    );
    assert_eq!(fs::read(m.path("small")).unwrap(), b"from A\n");
    assert!(fs::read(m.path("big")).unwrap() == new_big);
    m.unmount();
    assert_eq!(files_under(&origin_b.join("chunks")).len(), chunks_before);

    // Again: up to date, nothing sent.
    let out = access.ok(&[os("fetch"), os("backup"), bmp]);
    assert!(out.contains("up to date"), "{out}");

    // An unknown remote name is a clear error; so is a second remote without a name.
    let err = access.fails(&[os("fetch"), os("nosuch"), bmp]);
    assert!(err.contains("not a registered remote (backup)"), "{err}");
    let err = access.fails(&[os("fetch"), os("./nosuch"), bmp]);
    assert!(err.contains("not a horcrux repository"), "{err}");
    access.ok(&[
        os("remote"),
        os("add"),
        os("other"),
        os(&url(&origin_a)),
        bmp,
    ]);
    let err = access.fails(&[os("fetch"), bmp]);
    assert!(
        err.contains("several remotes") && err.contains("backup, other"),
        "{err}"
    );

    // Removing the remote removes its tracking refs: the name no longer resolves.
    let out = access.ok(&[os("remote"), os("remove"), os("backup"), bmp]);
    assert!(out.contains("removed remote `backup`"), "{out}");
    assert!(read_ref(&origin_b, "remotes/backup/main").is_none());
    let err = access.fails(&[os("log"), os("backup/main"), bmp]);
    assert!(err.contains("backup/main"), "{err}");
}

/// A URL not registered yet is registered under a name of its own (here the S3 bucket) and
/// the data of a version pulled from it is read from S3 by a mount of the origin.
#[test]
fn fetch_and_pull_from_an_s3_url_register_it() {
    let t = tempdir();
    let t = t.path();
    let s3 = start_moto("backups");
    let access = Access::default().with_s3(&s3);
    let remote = s3_url(&s3, "backups/amcc");
    fs::create_dir_all(t.join("src")).unwrap();
    fs::write(t.join("src/f"), bytes(9, (2 * MIB) as usize)).unwrap();
    let (origin_a, origin_b) = (t.join("origin-a"), t.join("origin-b"));
    access.generate("vol", &t.join("src"), &url(&origin_a));
    access.ok(&[os("push"), os(&remote), os("--access"), os(&url(&origin_a))]);
    access.ok(&[os("clone"), os(&remote), os(&url(&origin_b))]);
    let a = access.mount(&url(&origin_a), &t.join("a"), &t.join("ca"), &[]);
    fs::write(a.path("g"), b"new file\n").unwrap();
    access.ok(&[os("commit"), os("-m"), os("g"), a.mountpoint.as_os_str()]);
    access.ok(&[os("push"), os(&remote), a.mountpoint.as_os_str()]);
    let c = read_ref(&origin_a, "heads/main").unwrap();

    let b = access.mount(&url(&origin_b), &t.join("b"), &t.join("cb"), &[]);
    let out = access.ok(&[os("fetch"), os(&remote), b.mountpoint.as_os_str()]);
    assert!(out.contains("backups/main"), "{out}");
    let out = access.ok(&[os("remote"), b.mountpoint.as_os_str()]);
    assert!(out.starts_with("backups\t"), "{out}");
    // pull by name: the branch moves onto the fetched commit; the live mount shows it.
    let out = access.ok(&[os("pull"), os("backups"), b.mountpoint.as_os_str()]);
    assert!(out.contains("now shows"), "{out}");
    assert_eq!(read_ref(&origin_b, "heads/main").unwrap(), c);
    assert_eq!(fs::read(b.path("g")).unwrap(), b"new file\n");
    assert!(fs::read(b.path("f")).unwrap() == fs::read(a.path("f")).unwrap());

    // B's origin lacks the new data, its remote has it: a push and a clone from B's origin
    // elsewhere read it from S3, verified, and the copies are complete on their own.
    let (third, fourth) = (t.join("third"), t.join("fourth"));
    access.ok(&[os("push"), os(&url(&third)), b.mountpoint.as_os_str()]);
    access.ok(&[os("clone"), os(&url(&origin_b)), os(&url(&fourth))]);
    drop(s3);
    for repo in [&third, &fourth] {
        let name = repo.file_name().unwrap().to_str().unwrap();
        let m = access.mount(
            &url(repo),
            &t.join(format!("m-{name}")),
            &t.join(format!("c-{name}")),
            &["--read-only"],
        );
        assert_eq!(fs::read(m.path("g")).unwrap(), b"new file\n");
        assert!(fs::read(m.path("f")).unwrap() == fs::read(a.path("f")).unwrap());
    }
}

//! `horcrux commit` on live mounts through the CLI: a new version with new chunks only for what
//! changed, readable by a fresh mount elsewhere; the mount left clean; a commit that lost the
//! race for the branch changes nothing.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;

fn chunks_in(repo: &Path) -> usize {
    fs::read_dir(repo.join("chunks"))
        .unwrap()
        .map(|d| fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum()
}

fn commit(mp: &Path, msg: &str) -> std::process::Output {
    horcrux(&[
        "commit".as_ref(),
        "-m".as_ref(),
        msg.as_ref(),
        mp.as_os_str(),
        "--author".as_ref(),
        "Tester <t@example.com>".as_ref(),
    ])
}

#[test]
fn commit_makes_a_version_other_mounts_read() {
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    let big = bytes(7, 6 * MIB as usize + 3);
    fs::write(src.join("big"), &big).unwrap();
    fs::write(src.join("d/a"), b"alpha\n").unwrap();
    let repo = t.path().join("repo");
    generate("vol", &src, &repo);
    let m = Mount::new(&repo, &t.path().join("mnt"), &t.path().join("c1"), &[]);

    let out = commit(&m.mountpoint, "nothing");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to commit"));

    let before = chunks_in(&repo);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(m.path("big"))
        .unwrap();
    f.write_all_at(&[0x5A; 4096], 3 * MIB + 17).unwrap();
    drop(f);
    fs::write(m.path("d/new"), b"fresh\n").unwrap();
    fs::rename(m.path("d/a"), m.path("a-moved")).unwrap();
    let out = commit(&m.mountpoint, "first change");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("2 new chunks"), "{said}");
    // One 1 MiB window of `big` and one pack for the small new file.
    assert_eq!(chunks_in(&repo), before + 2);
    let status = horcrux_ok(&["status".as_ref(), m.mountpoint.as_os_str()]);
    assert!(status.contains("nothing changed"), "{status}");

    // A fresh mount of `main` elsewhere (its own cache) reads the new version.
    let other = Mount::new(
        &repo,
        &t.path().join("mnt2"),
        &t.path().join("c2"),
        &["--read-only"],
    );
    let mut want = big.clone();
    want[3 * MIB as usize + 17..3 * MIB as usize + 17 + 4096].fill(0x5A);
    assert!(fs::read(other.path("big")).unwrap() == want, "big differs");
    assert_eq!(fs::read(other.path("d/new")).unwrap(), b"fresh\n");
    assert_eq!(fs::read(other.path("a-moved")).unwrap(), b"alpha\n");
    assert!(!other.path("d/a").exists());
    other.unmount();

    // The first mount keeps working on top of its commit, and a remount shows it clean.
    fs::write(m.path("d/new"), b"second\n").unwrap();
    let out = commit(&m.mountpoint, "second");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mp = m.mountpoint.clone();
    m.unmount();
    let m = Mount::new(&repo, &mp, &t.path().join("c1"), &[]);
    assert_eq!(fs::read(m.path("d/new")).unwrap(), b"second\n");
    assert!(horcrux_ok(&["status".as_ref(), m.mountpoint.as_os_str()]).contains("nothing changed"));
    m.unmount();
}

#[test]
fn a_commit_that_lost_the_race_changes_nothing() {
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"base\n").unwrap();
    let repo = t.path().join("repo");
    generate("vol", &src, &repo);
    let a = Mount::new(&repo, &t.path().join("a"), &t.path().join("ca"), &[]);
    let b = Mount::new(&repo, &t.path().join("b"), &t.path().join("cb"), &[]);
    fs::write(a.path("f"), b"from a\n").unwrap();
    fs::write(b.path("f"), b"from b\n").unwrap();
    assert!(commit(&a.mountpoint, "a wins").status.success());
    let out = commit(&b.mountpoint, "b loses");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("branch `main`") && err.contains("nothing was changed"),
        "{err}"
    );
    // B's change is still there, uncommitted.
    assert_eq!(fs::read(b.path("f")).unwrap(), b"from b\n");
    assert!(horcrux_ok(&["status".as_ref(), b.mountpoint.as_os_str()]).contains("M f"));
    a.unmount();
    b.unmount();
}

#[test]
fn a_mounted_commit_id_has_no_branch_to_commit_onto() {
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"base\n").unwrap();
    let repo = t.path().join("repo");
    generate("vol", &src, &repo);
    let head = fs::read_to_string(repo.join("volumes/vol/refs/heads/main")).unwrap();
    let m = Mount::new(
        &repo,
        &t.path().join("m"),
        &t.path().join("c"),
        &["--ref", head.trim()],
    );
    fs::write(m.path("f"), b"x\n").unwrap();
    let out = commit(&m.mountpoint, "detached");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a branch"));
    m.unmount();
}

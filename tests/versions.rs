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

#[test]
fn checkout_and_reset_switch_a_live_mount() {
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("f"), b"one\n").unwrap();
    fs::write(src.join("d/x"), b"x\n").unwrap();
    let repo = t.path().join("repo");
    generate("vol", &src, &repo);
    let m = Mount::new(&repo, &t.path().join("mnt"), &t.path().join("c"), &[]);
    let mp = m.mountpoint.as_os_str();
    let head = || {
        fs::read_to_string(repo.join("volumes/vol/refs/heads/main"))
            .unwrap()
            .trim()
            .to_string()
    };
    let base = head();
    fs::write(m.path("f"), b"two\n").unwrap();
    fs::remove_dir_all(m.path("d")).unwrap();
    assert!(commit(&m.mountpoint, "two").status.success());
    let two = head();
    fs::write(m.path("f"), b"three\n").unwrap();
    fs::write(m.path("new"), b"n\n").unwrap();
    assert!(commit(&m.mountpoint, "three").status.success());

    // A commit id: the content of that version, at once (the kernel's names are dropped).
    horcrux_ok(&["checkout".as_ref(), base.as_ref(), mp]);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"one\n");
    assert_eq!(fs::read(m.path("d/x")).unwrap(), b"x\n");
    assert!(!m.path("new").exists());
    // Detached: nothing to commit onto.
    fs::write(m.path("f"), b"detached\n").unwrap();
    let out = commit(&m.mountpoint, "detached");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a branch"));

    // Uncommitted changes are refused, then thrown away on request; open files are refused.
    let out = horcrux(&["checkout".as_ref(), "main".as_ref(), mp]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("uncommitted"));
    let held = fs::File::open(m.path("f")).unwrap();
    let out = horcrux(&[
        "checkout".as_ref(),
        "main".as_ref(),
        mp,
        "--discard".as_ref(),
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("open"),
        "{out:?}"
    );
    drop(held);
    horcrux_ok(&[
        "checkout".as_ref(),
        "main".as_ref(),
        mp,
        "--discard".as_ref(),
    ]);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"three\n");
    assert_eq!(fs::read(m.path("new")).unwrap(), b"n\n");
    assert!(!m.path("d").exists());

    // reset needs --hard; it moves the branch back and the mount with it.
    let out = horcrux(&["reset".as_ref(), "HEAD~1".as_ref(), mp]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--hard"));
    fs::write(m.path("f"), b"thrown away\n").unwrap();
    horcrux_ok(&["reset".as_ref(), "--hard".as_ref(), "HEAD~1".as_ref(), mp]);
    assert_eq!(head(), two);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"two\n");
    assert!(!m.path("new").exists());
    // Commits go on from there.
    fs::write(m.path("f"), b"four\n").unwrap();
    assert!(commit(&m.mountpoint, "four").status.success());
    let log = horcrux_ok(&["log".as_ref(), "--oneline".as_ref(), mp]);
    assert!(
        log.contains("four") && log.contains("two") && !log.contains("three"),
        "{log}"
    );
    m.unmount();
}

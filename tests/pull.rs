//! `horcrux pull` through the CLI with real FUSE mounts: two origins A and B share history
//! through a remote R (B is a clone of R); A commits and pushes, B pulls and its live mount
//! shows A's content. A pull into a mount with uncommitted changes is refused before anything
//! moves; with open files it updates the origin and leaves the mount where it was, saying so;
//! a diverged branch is refused and
//! nothing changes; an origin ahead of R has nothing to pull; `--access` updates only a
//! repository.
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
use std::path::{Path, PathBuf};

use common::*;
use remote::*;

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// `horcrux commit -m MSG MP`, which must succeed; returns the new commit's hex id (from the
/// origin's ref file).
fn commit(access: &Access, mp: &Path, origin: &Path, msg: &str) -> String {
    access.ok(&[
        os("commit"),
        os("-m"),
        os(msg),
        mp.as_os_str(),
        os("--author"),
        os("Tester <t@example.com>"),
    ]);
    head(origin, "vol", "main")
}

/// The commit `volumes/<vol>/refs/heads/<branch>` of a local repository names.
fn head(repo: &Path, vol: &str, branch: &str) -> String {
    fs::read_to_string(repo.join(format!("volumes/{vol}/refs/heads/{branch}")))
        .unwrap()
        .trim()
        .to_string()
}

/// The commit a mount sits on (`horcrux status --json`'s base).
fn mounted_commit(access: &Access, mp: &Path) -> String {
    let out = access.ok(&[os("status"), os("--json"), mp.as_os_str()]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v["base_commit"].as_str().unwrap().to_string()
}

/// A 4 MiB file (four 1 MiB chunks) and a small one.
fn source(root: &Path) -> Vec<u8> {
    fs::create_dir_all(root).unwrap();
    let big = bytes(41, (4 * MIB) as usize);
    fs::write(root.join("big"), &big).unwrap();
    fs::write(root.join("small"), b"base\n").unwrap();
    big
}

/// Origin A (generated, pushed to R) and origin B (cloned from R), both mounted writable.
struct Pair {
    access: Access,
    remote: String,
    origin_a: PathBuf,
    origin_b: PathBuf,
    a: Mount,
    b: Mount,
    big: Vec<u8>,
}

fn pair(access: Access, remote: String, t: &Path) -> Pair {
    let big = source(&t.join("src"));
    let origin_a = t.join("origin-a");
    let origin_b = t.join("origin-b");
    access.generate("vol", &t.join("src"), &url(&origin_a));
    access.ok(&[os("push"), os(&remote), os("--access"), os(&url(&origin_a))]);
    let out = access.ok(&[os("clone"), os(&remote), os(&url(&origin_b))]);
    assert!(out.contains("1 commit copied"), "{out}");
    let a = access.mount(&url(&origin_a), &t.join("a"), &t.join("ca"), &[]);
    let b = access.mount(&url(&origin_b), &t.join("b"), &t.join("cb"), &[]);
    Pair {
        access,
        remote,
        origin_a,
        origin_b,
        a,
        b,
        big,
    }
}

impl Pair {
    /// A writes `text` into `small` and 1 MiB at 2 MiB into `big`, commits and pushes to R.
    fn a_commits_and_pushes(&self, text: &str, seed: u64) -> String {
        fs::write(self.a.path("small"), text).unwrap();
        let f = fs::OpenOptions::new()
            .write(true)
            .open(self.a.path("big"))
            .unwrap();
        f.write_all_at(&bytes(seed, MIB as usize), 2 * MIB).unwrap();
        drop(f);
        let c = commit(&self.access, &self.a.mountpoint, &self.origin_a, text);
        self.access
            .ok(&[os("push"), os(&self.remote), self.a.mountpoint.as_os_str()]);
        c
    }

    fn pull_b(&self) -> std::process::Output {
        self.access
            .run(&[os("pull"), os(&self.remote), self.b.mountpoint.as_os_str()])
    }
}

fn stdout(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "pull failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A commits and pushes to R over SSH; B pulls: B's origin moves to A's commit (fast-forward,
/// chunks included) and B's live mount shows A's content; a second pull has nothing to do.
#[test]
fn pull_brings_a_pushed_commit_into_a_live_mount_over_ssh() {
    let t = tempdir();
    let s = start_sshd();
    let remote = s.url(&s.dir().join("remote"));
    let p = pair(Access::ssh(&s), remote, t.path());
    let before = head(&p.origin_b, "vol", "main");
    // B reads first so its kernel and cache hold the old version.
    assert_eq!(fs::read(p.b.path("small")).unwrap(), b"base\n");
    assert!(fs::read(p.b.path("big")).unwrap() == p.big);

    let c = p.a_commits_and_pushes("from A\n", 7);
    let out = stdout(&p.pull_b());
    eprintln!("pull: {out}");
    assert!(out.contains("pulled vol/main"), "{out}");
    assert!(
        out.contains(&format!("{} → {}", &before[..12], &c[..12])),
        "{out}"
    );
    // Lazy: the commit and its manifest, no chunk; R was registered as a remote.
    assert!(out.contains("0 of 0 chunks"), "{out}");
    assert!(out.contains("now shows"), "{out}");
    assert_eq!(head(&p.origin_b, "vol", "main"), c);
    assert_eq!(mounted_commit(&p.access, &p.b.mountpoint), c);
    let chunks_b = files_under(&p.origin_b.join("chunks")).len();
    // B's mount reads the new data from R, on demand.
    assert_eq!(fs::read(p.b.path("small")).unwrap(), b"from A\n");
    assert!(fs::read(p.b.path("big")).unwrap() == fs::read(p.a.path("big")).unwrap());
    assert_eq!(files_under(&p.origin_b.join("chunks")).len(), chunks_b);
    // --data copies what B's origin lacks — the touched 1 MiB window and the pack of small
    // files: 2 chunks, not the volume — so it no longer needs R.
    let out = stdout(&p.access.run(&[
        os("pull"),
        os("--data"),
        os(&p.remote),
        p.b.mountpoint.as_os_str(),
    ]));
    assert!(out.contains("copied the data it lacked: 2 of"), "{out}");
    // Every chunk B's origin holds, from the clone or from `pull --data`, came with its piece
    // outboard (FORMAT.md §3a), and it checks out against the chunk id.
    for chunk in files_under(&p.origin_b.join("chunks")) {
        let len = fs::metadata(&chunk).unwrap().len();
        let id: horcrux::ids::ChunkId = chunk
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        if horcrux::hashtree::has_piece_outboard(len) {
            let ob = fs::read(p.origin_b.join(horcrux::format::outboard_key(&id)))
                .unwrap_or_else(|e| panic!("no piece outboard for chunk {id}: {e}"));
            horcrux::hashtree::check_piece_outboard(id, len, &ob).unwrap();
        }
    }
    drop(s);
    let m = p.access.mount(
        &url(&p.origin_b),
        &t.path().join("fresh"),
        &t.path().join("cf"),
        &["--read-only"],
    );
    assert!(fs::read(m.path("big")).unwrap() == fs::read(p.a.path("big")).unwrap());
    m.unmount();
    // B can commit on top and push back to A's origin as a fast-forward.
    fs::write(p.b.path("small"), b"from B\n").unwrap();
    let cb = commit(&p.access, &p.b.mountpoint, &p.origin_b, "from B");
    let out = p.access.ok(&[
        os("pull"),
        os(&url(&p.origin_b)),
        p.a.mountpoint.as_os_str(),
    ]);
    assert!(out.contains("now shows"), "{out}");
    assert_eq!(head(&p.origin_a, "vol", "main"), cb);
    assert_eq!(fs::read(p.a.path("small")).unwrap(), b"from B\n");
}

/// Up to date, origin ahead, and `--json`.
#[test]
fn pull_with_nothing_new_and_with_the_origin_ahead() {
    let t = tempdir();
    let remote = url(&t.path().join("remote"));
    let p = pair(Access::default(), remote, t.path());
    let out = stdout(&p.pull_b());
    assert!(out.contains("is up to date"), "{out}");
    assert!(out.contains("already shows"), "{out}");

    fs::write(p.b.path("small"), b"B only\n").unwrap();
    let cb = commit(&p.access, &p.b.mountpoint, &p.origin_b, "B only");
    let out = stdout(&p.pull_b());
    assert!(
        out.contains("nothing to pull") && out.contains("ahead"),
        "{out}"
    );
    assert_eq!(head(&p.origin_b, "vol", "main"), cb);

    let c = p.a_commits_and_pushes("from A\n", 8);
    let _ = c;
    let out = p.access.ok(&[
        os("pull"),
        os(&p.remote),
        p.a.mountpoint.as_os_str(),
        os("--json"),
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["commits_copied"], 0, "{v}");
    assert_eq!(v["mount"]["state"], "at_head", "{v}");
}

/// B has uncommitted changes: the pull is refused before anything moves (B's origin, mount
/// and changes stay); once they are discarded the pull goes through. A clean mount with an open
/// file: the origin is updated, the mount stays, and `checkout main` switches it once closed.
#[test]
fn pull_into_a_dirty_or_busy_mount() {
    let t = tempdir();
    let remote = url(&t.path().join("remote"));
    let p = pair(Access::default(), remote, t.path());
    let before = head(&p.origin_b, "vol", "main");
    fs::write(p.b.path("mine"), b"uncommitted\n").unwrap();

    let c = p.a_commits_and_pushes("from A\n", 9);
    let out = p.pull_b();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("uncommitted") && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(head(&p.origin_b, "vol", "main"), before);
    assert_eq!(mounted_commit(&p.access, &p.b.mountpoint), before);
    assert_eq!(fs::read(p.b.path("mine")).unwrap(), b"uncommitted\n");

    p.access
        .ok(&[os("discard"), os("--force"), p.b.mountpoint.as_os_str()]);
    let out = stdout(&p.pull_b());
    assert!(out.contains("pulled vol/main"), "{out}");
    assert_eq!(head(&p.origin_b, "vol", "main"), c);
    assert_eq!(mounted_commit(&p.access, &p.b.mountpoint), c);
    assert_eq!(fs::read(p.b.path("small")).unwrap(), b"from A\n");
    assert!(!p.b.path("mine").exists());

    // A clean mount with an open file stays too; once closed, checkout switches it.
    let held = fs::File::open(p.b.path("small")).unwrap();
    let c2 = p.a_commits_and_pushes("again\n", 10);
    let out = stdout(&p.pull_b());
    eprintln!("busy pull: {out}");
    assert!(out.contains("the origin was updated"), "{out}");
    assert!(out.contains("open"), "{out}");
    assert_eq!(head(&p.origin_b, "vol", "main"), c2);
    assert_eq!(mounted_commit(&p.access, &p.b.mountpoint), c);
    drop(held);
    p.access
        .ok(&[os("checkout"), os("main"), p.b.mountpoint.as_os_str()]);
    assert_eq!(fs::read(p.b.path("small")).unwrap(), b"again\n");
}

/// A and B both commit on the shared base; A pushes; B's pull is refused as diverged and
/// nothing changes in B's origin or mount.
#[test]
fn pull_of_a_diverged_branch_is_refused() {
    let t = tempdir();
    let remote = url(&t.path().join("remote"));
    let p = pair(Access::default(), remote, t.path());
    fs::write(p.b.path("small"), b"B's own\n").unwrap();
    let cb = commit(&p.access, &p.b.mountpoint, &p.origin_b, "B's own");
    let ca = p.a_commits_and_pushes("from A\n", 11);
    let chunks_before = files_under(&p.origin_b.join("chunks")).len();

    let o = p.pull_b();
    assert!(!o.status.success(), "a diverged pull succeeded");
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("diverged pull: {err}");
    assert!(err.contains("diverged"), "{err}");
    assert!(err.contains(&cb[..12]) && err.contains(&ca[..12]), "{err}");
    assert!(err.contains("your branch was not changed"), "{err}");
    assert_eq!(head(&p.origin_b, "vol", "main"), cb);
    assert_eq!(mounted_commit(&p.access, &p.b.mountpoint), cb);
    assert_eq!(fs::read(p.b.path("small")).unwrap(), b"B's own\n");
    // Refused before any data moved.
    assert_eq!(files_under(&p.origin_b.join("chunks")).len(), chunks_before);
}

/// `--access URL --name VOL` without a mount updates only the repository (here from an S3
/// remote); a new branch is created there.
#[test]
fn pull_into_a_repository_without_a_mount() {
    let t = tempdir();
    let s3 = start_moto("pulls");
    let access = Access::default().with_s3(&s3);
    let remote = s3_url(&s3, "pulls/r");
    let p = pair(access.clone(), remote.clone(), t.path());
    let c = p.a_commits_and_pushes("from A\n", 12);
    let other = t.path().join("other");
    access.ok(&[os("clone"), os(&url(&p.origin_b)), os(&url(&other))]);
    let out = access.ok(&[
        os("pull"),
        os(&remote),
        os("--access"),
        os(&url(&other)),
        os("--name"),
        os("vol"),
    ]);
    assert!(out.contains("pulled vol/main"), "{out}");
    assert!(!out.contains("shows"), "{out}");
    assert_eq!(head(&other, "vol", "main"), c);
    // B's mount and origin were not involved.
    assert_ne!(head(&p.origin_b, "vol", "main"), c);

    // A branch the repository lacks is created.
    access.ok(&[
        os("branch"),
        os("exp"),
        os("--access"),
        os(&url(&p.origin_a)),
    ]);
    access.ok(&[
        os("push"),
        os(&remote),
        os("--access"),
        os(&url(&p.origin_a)),
        os("--branch"),
        os("exp"),
    ]);
    let out = access.ok(&[
        os("pull"),
        os(&remote),
        os("--access"),
        os(&url(&other)),
        os("--branch"),
        os("exp"),
    ]);
    assert!(out.contains("new branch"), "{out}");
    assert_eq!(head(&other, "vol", "exp"), c);
}

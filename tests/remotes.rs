//! `horcrux push` and `horcrux clone` through the CLI, with real FUSE mounts, a real OpenSSH
//! server and a real S3 server (moto): a full cycle through each store type (generate → mount A
//! → write → commit → push → mount B from the remote → same bytes), the bytes a push sends
//! after a 1 MiB change, two pushers racing for one branch, an interrupted push that resumes,
//! and clones between stores, whole and `--depth 1`.
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
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use remote::*;

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// `horcrux commit -m MSG MP`, which must succeed; returns the new commit's hex id.
fn commit(access: &Access, mp: &Path, msg: &str) -> String {
    let out = access.ok(&[
        os("commit"),
        os("-m"),
        os(msg),
        mp.as_os_str(),
        os("--author"),
        os("Tester <t@example.com>"),
    ]);
    // "committed 3f2a9c1e0b7d on vol/main (parent ...)"
    let short = out
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("commit said: {out}"));
    let d = Describe::of(access, mp);
    assert!(d.commit.starts_with(short), "{out} vs {}", d.commit);
    d.commit
}

/// What `horcrux push --json` reports.
#[derive(Debug)]
struct Pushed {
    json: serde_json::Value,
    stderr: String,
}

impl Pushed {
    fn n(&self, field: &str) -> u64 {
        self.json[field]
            .as_u64()
            .unwrap_or_else(|| panic!("no `{field}` in {}", self.json))
    }
}

fn push_json(access: &Access, remote: &str, from: &[&OsStr]) -> Pushed {
    let mut args = vec![os("push"), os(remote), os("--json")];
    args.extend_from_slice(from);
    let out = access.run(&args);
    assert!(
        out.status.success(),
        "push {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    Pushed {
        json: serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("push --json printed {stdout}: {e}")),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The commit a mount sits on (from `horcrux status --json`'s base).
struct Describe {
    commit: String,
}

impl Describe {
    fn of(access: &Access, mp: &Path) -> Describe {
        let out = access.ok(&[os("status"), os("--json"), mp.as_os_str()]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        Describe {
            commit: v["base_commit"].as_str().unwrap().to_string(),
        }
    }
}

/// The commit `volumes/<vol>/refs/heads/<branch>` of a local repository names.
fn head(repo: &Path, vol: &str, branch: &str) -> String {
    fs::read_to_string(repo.join(format!("volumes/{vol}/refs/heads/{branch}")))
        .unwrap()
        .trim()
        .to_string()
}

/// Files (not dot-files) under `dir` and their total size.
fn files_and_bytes(dir: &Path) -> (usize, u64) {
    let files = files_under(dir);
    let bytes = files.iter().map(|f| fs::metadata(f).unwrap().len()).sum();
    (files.len(), bytes)
}

fn chunk_files(repo: &Path) -> usize {
    files_under(&repo.join("chunks")).len()
}

/// A source tree: a 6 MiB file (six 1 MiB chunks), two small files.
fn source(root: &Path, seed: u64) -> Vec<u8> {
    fs::create_dir_all(root.join("d")).unwrap();
    let big = bytes(seed, (6 * MIB + 3) as usize);
    fs::write(root.join("big"), &big).unwrap();
    fs::write(root.join("d/a"), b"alpha\n").unwrap();
    fs::write(root.join("small"), b"small\n").unwrap();
    big
}

fn assert_same_file(a: &Path, b: &Path) {
    let (x, y) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    assert!(
        x == y,
        "{} and {} differ ({} vs {} bytes)",
        a.display(),
        b.display(),
        x.len(),
        y.len()
    );
}

/// Generate into a file:// origin → mount A (writable) → write → push (the uncommitted change
/// is not pushed, and push says so) → commit → push again (only the change travels) → mount B
/// from REMOTE (fresh cache, read-only, main) → the same bytes as A.
fn full_cycle(access: &Access, remote: &str, t: &Path) {
    let src = t.join("src");
    let big = source(&src, 11);
    let origin = t.join("origin");
    access.generate("vol", &src, &url(&origin));
    let a = access.mount(&url(&origin), &t.join("a"), &t.join("ca"), &[]);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(a.path("big"))
        .unwrap();
    f.write_all_at(&[0x5A; 4096], 3 * MIB + 17).unwrap();
    drop(f);
    fs::write(a.path("d/new"), b"fresh\n").unwrap();

    // The first push sends the whole volume, not the uncommitted change, and warns about it.
    let base = head(&origin, "vol", "main");
    let first = push_json(access, remote, &[a.mountpoint.as_os_str()]);
    assert!(
        first.stderr.contains("1 uncommitted change") || first.stderr.contains("uncommitted"),
        "no warning about uncommitted changes: {}",
        first.stderr
    );
    assert!(first.stderr.contains("horcrux commit"), "{}", first.stderr);
    assert_eq!(first.json["commit"], base.as_str());
    assert_eq!(first.n("commits_copied"), 1);
    assert!(first.n("chunks_copied") >= 7, "{}", first.json);
    assert!(first.json["moves"][0]["old"].is_null(), "{}", first.json);

    let c = commit(access, &a.mountpoint, "a change");
    let second = push_json(access, remote, &[os("-C"), a.mountpoint.as_os_str()]);
    eprintln!("push after a 4 KiB change and a new file: {}", second.json);
    assert!(second.stderr.is_empty() || !second.stderr.contains("uncommitted"));
    assert_eq!(second.json["commit"], c.as_str());
    assert_eq!(second.n("commits_copied"), 1);
    assert_eq!(second.n("manifests_copied"), 1);
    // The touched 1 MiB window of `big` and one pack of small files.
    assert_eq!(second.n("chunks_copied"), 2, "{}", second.json);
    assert!(second.n("bytes_copied") <= MIB + 4096, "{}", second.json);
    assert_eq!(second.json["moves"][0]["old"], base.as_str());
    assert_eq!(second.json["moves"][0]["new"], c.as_str());
    assert_eq!(second.json["moves"][0]["forced"], false);
    // Pushing again has nothing to do.
    let again = access.ok(&[os("push"), os(remote), a.mountpoint.as_os_str()]);
    assert!(again.contains("is up to date"), "{again}");
    assert!(again.contains("sent 0 of 0 chunks"), "{again}");

    let b = access.mount(remote, &t.join("b"), &t.join("cb"), &["--read-only"]);
    let mut want = big.clone();
    want[(3 * MIB + 17) as usize..(3 * MIB + 17 + 4096) as usize].fill(0x5A);
    assert!(fs::read(b.path("big")).unwrap() == want, "big differs on B");
    for p in ["big", "d/new", "d/a", "small"] {
        assert_same_file(&a.path(p), &b.path(p));
    }
    b.unmount();
    a.unmount();
}

#[test]
fn full_cycle_through_a_file_remote() {
    let t = tempdir();
    let remote = url(&t.path().join("remote"));
    full_cycle(&Access::default(), &remote, t.path());
    assert!(t.path().join("remote/horcrux.json").is_file());
}

#[test]
fn full_cycle_through_an_ssh_remote() {
    let t = tempdir();
    let s = start_sshd();
    let repo = s.dir().join("remote");
    full_cycle(&Access::ssh(&s), &s.url(&repo), t.path());
    assert!(repo.join("horcrux.json").is_file());
}

#[test]
fn full_cycle_through_an_s3_remote() {
    let t = tempdir();
    let s3 = start_moto("remotes");
    let remote = s3_url(&s3, "remotes/vol-backup");
    full_cycle(&Access::default().with_s3(&s3), &remote, t.path());
}

/// A 1 MiB change in a 16 MiB file: the push sends one chunk, the manifest and the commit —
/// by push's own account and by the remote's growth on disk.
#[test]
fn a_push_after_a_1_mib_change_sends_one_chunk_and_metadata() {
    let t = tempdir();
    let access = Access::default();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("data"), bytes(5, (16 * MIB) as usize)).unwrap();
    fs::write(src.join("other"), b"other\n").unwrap();
    let origin = t.path().join("origin");
    access.generate("db", &src, &url(&origin));
    let remote = t.path().join("remote");
    let a = access.mount(
        &url(&origin),
        &t.path().join("a"),
        &t.path().join("ca"),
        &[],
    );
    push_json(&access, &url(&remote), &[a.mountpoint.as_os_str()]);

    let f = fs::OpenOptions::new()
        .write(true)
        .open(a.path("data"))
        .unwrap();
    f.write_all_at(&bytes(99, MIB as usize), 5 * MIB).unwrap();
    drop(f);
    let c = commit(&access, &a.mountpoint, "1 MiB");
    let (_, before) = files_and_bytes(&remote);
    let p = push_json(&access, &url(&remote), &[a.mountpoint.as_os_str()]);
    let (_, after) = files_and_bytes(&remote);

    let commit_obj = fs::metadata(origin.join("commits").join(&c)).unwrap().len();
    let manifest_id = {
        let text = fs::read_to_string(origin.join("commits").join(&c)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["manifest"].as_str().unwrap().to_string()
    };
    let manifest = fs::metadata(origin.join("manifests").join(&manifest_id))
        .unwrap()
        .len();
    // The chunk's piece outboard (FORMAT.md §3a): an 8-byte header and 32 bytes per 16 KiB.
    let outboard = 8 + 32 * (MIB / (16 << 10));
    let bound = MIB + outboard + manifest + commit_obj;
    eprintln!(
        "1 MiB change: push sent {} chunk(s), {} B of chunk data + {} B of piece outboard + \
         {} B of metadata = {} B; the remote grew by {} B; bound {} B (1 MiB chunk + \
         {outboard} B outboard + {manifest} B manifest + {commit_obj} B commit)",
        p.n("chunks_copied"),
        p.n("bytes_copied"),
        p.n("outboard_bytes"),
        p.n("metadata_bytes"),
        p.n("bytes_sent"),
        after - before,
        bound
    );
    assert_eq!(p.n("chunks_copied"), 1, "{}", p.json);
    assert_eq!(p.n("bytes_copied"), MIB);
    assert_eq!(p.n("outboards_copied"), 1, "{}", p.json);
    assert_eq!(p.n("outboard_bytes"), outboard, "{}", p.json);
    assert!(p.n("bytes_sent") <= bound, "{}", p.json);
    assert_eq!(p.n("bytes_sent"), bound);
    // The ref's bytes changed in place (same length): growth is exactly what was sent.
    assert!(after - before <= bound, "remote grew by {}", after - before);
    assert_eq!(head(&remote, "db", "main"), c);
    a.unmount();
}

/// Two origins with the same history, each with its own new commit, push to one remote at the
/// same moment: exactly one moves the branch, the other is refused as a non-fast-forward and
/// loses nothing; `--force` then overwrites, and the first commit stays readable by id.
#[test]
fn two_pushers_race_for_one_branch() {
    let t = tempdir();
    let s3 = start_moto("race");
    let access = Access::default().with_s3(&s3);
    let src = t.path().join("src");
    source(&src, 3);
    let origin_a = t.path().join("origin-a");
    let origin_b = t.path().join("origin-b");
    access.generate("vol", &src, &url(&origin_a));
    let cloned = access.ok(&[os("clone"), os(&url(&origin_a)), os(&url(&origin_b))]);
    assert!(cloned.contains("1 commit copied"), "{cloned}");
    assert_eq!(
        head(&origin_a, "vol", "main"),
        head(&origin_b, "vol", "main")
    );

    // Both remotes start from the shared base.
    let remotes = [url(&t.path().join("remote")), s3_url(&s3, "race/remote")];
    for remote in &remotes {
        access.ok(&[os("push"), os(remote), os("--access"), os(&url(&origin_a))]);
    }

    let a = access.mount(
        &url(&origin_a),
        &t.path().join("a"),
        &t.path().join("ca"),
        &[],
    );
    let b = access.mount(
        &url(&origin_b),
        &t.path().join("b"),
        &t.path().join("cb"),
        &[],
    );
    fs::write(a.path("small"), b"written by A\n").unwrap();
    fs::write(b.path("small"), b"written by B\n").unwrap();
    let ca = commit(&access, &a.mountpoint, "from A");
    let cb = commit(&access, &b.mountpoint, "from B");

    for (i, remote) in remotes.iter().enumerate() {
        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<_> = [&a, &b]
            .iter()
            .map(|m| {
                let (access, remote, mp, barrier) = (
                    access.clone(),
                    remote.clone(),
                    m.mountpoint.clone(),
                    barrier.clone(),
                );
                std::thread::spawn(move || {
                    barrier.wait();
                    access.run(&[os("push"), os(&remote), mp.as_os_str()])
                })
            })
            .collect();
        let outs: Vec<_> = racers.into_iter().map(|h| h.join().unwrap()).collect();
        let won: Vec<bool> = outs.iter().map(|o| o.status.success()).collect();
        eprintln!(
            "race to {remote}: A {} / B {}",
            if won[0] { "won" } else { "lost" },
            if won[1] { "won" } else { "lost" }
        );
        assert_eq!(
            won.iter().filter(|w| **w).count(),
            1,
            "exactly one pusher must win: {outs:?}"
        );
        let (winner, loser, loser_commit, loser_mount, loser_origin, winner_text) = if won[0] {
            (&ca, 1, &cb, &b, &origin_b, "written by A\n")
        } else {
            (&cb, 0, &ca, &a, &origin_a, "written by B\n")
        };
        let err = String::from_utf8_lossy(&outs[loser].stderr);
        assert!(
            err.contains("not an ancestor")
                && err.contains("not a fast-forward")
                && err.contains("--force"),
            "{err}"
        );
        // Nothing lost: the loser's commit is still its origin's main, its mount unchanged.
        assert_eq!(&head(loser_origin, "vol", "main"), loser_commit);
        let loser_text = fs::read(loser_mount.path("small")).unwrap();
        assert_ne!(loser_text, winner_text.as_bytes());

        // The remote shows the winner's version.
        let m = access.mount(
            remote,
            &t.path().join(format!("check{i}")),
            &t.path().join(format!("cc{i}")),
            &["--read-only"],
        );
        assert_eq!(fs::read(m.path("small")).unwrap(), winner_text.as_bytes());
        m.unmount();

        // --force overwrites; the winner's commit stays in the remote, readable by id.
        let forced = access.ok(&[
            os("push"),
            os(remote),
            loser_mount.mountpoint.as_os_str(),
            os("--force"),
        ]);
        assert!(forced.contains("(forced)"), "{forced}");
        let m = access.mount(
            remote,
            &t.path().join(format!("old{i}")),
            &t.path().join(format!("co{i}")),
            &["--read-only", "--ref", winner],
        );
        assert_eq!(fs::read(m.path("small")).unwrap(), winner_text.as_bytes());
        m.unmount();
        let m = access.mount(
            remote,
            &t.path().join(format!("new{i}")),
            &t.path().join(format!("cn{i}")),
            &["--read-only"],
        );
        assert_eq!(fs::read(m.path("small")).unwrap(), loser_text);
        m.unmount();
    }
    a.unmount();
    b.unmount();
}

/// The first parent of commit `c` in a local repository.
fn parent_of(repo: &Path, c: &str) -> String {
    let text = fs::read_to_string(repo.join("commits").join(c)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["parents"][0].as_str().unwrap().to_string()
}

/// A push over SSH killed midway (the server frozen so nothing more lands, then the client
/// killed) resumes: the second run sends exactly the chunks that had not arrived.
#[test]
fn an_interrupted_push_resumes_without_resending() {
    let t = tempdir();
    let s = start_sshd();
    let access = Access::ssh(&s);
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let data = bytes(77, (96 * MIB) as usize);
    fs::write(src.join("big"), &data).unwrap();
    let origin = t.path().join("origin");
    access.generate("vol", &src, &url(&origin));
    let total = chunk_files(&origin);
    let repo = s.dir().join("remote");
    let remote = s.url(&repo);

    let mut child = Command::new(horcrux_bin())
        .args([
            os("push"),
            os(&remote),
            os("--access"),
            os(&url(&origin)),
            os("--jobs"),
            os("1"),
        ])
        .args(&access.flags)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !repo.join("chunks").is_dir() || chunk_files(&repo) < 5 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the push ended before it could be interrupted"
        );
        assert!(Instant::now() < deadline, "the push sent nothing in 60 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    s.freeze();
    let _ = child.kill();
    let _ = child.wait();
    s.thaw();
    // Let the server finish whatever the dead client had already asked.
    std::thread::sleep(Duration::from_secs(1));
    let arrived = chunk_files(&repo);
    eprintln!("interrupted push: {arrived} of {total} chunks had arrived");
    assert!(
        arrived > 0 && arrived < total,
        "{arrived} of {total} chunks arrived: not an interrupted push"
    );
    assert!(
        !repo.join("volumes/vol/refs/heads/main").exists(),
        "the branch moved before the data was complete"
    );

    let p = push_json(&access, &remote, &[os("--access"), os(&url(&origin))]);
    eprintln!("resumed push: {}", p.json);
    assert_eq!(
        p.n("chunks_copied") as usize,
        total - arrived,
        "the resumed push re-sent chunks that had arrived"
    );
    assert_eq!(chunk_files(&repo), total);
    assert_eq!(head(&repo, "vol", "main"), head(&origin, "vol", "main"));

    let m = access.mount(
        &remote,
        &t.path().join("m"),
        &t.path().join("c"),
        &["--read-only"],
    );
    assert!(fs::read(m.path("big")).unwrap() == data, "big differs");
    m.unmount();
}

/// clone file → S3 → file keeps every version; `--depth 1` keeps the newest only, mounts, takes
/// pushes, and can itself be cloned; a clone over other versions of a volume is refused.
#[test]
fn clone_between_stores_whole_and_shallow() {
    let t = tempdir();
    let s3 = start_moto("backups");
    let access = Access::default().with_s3(&s3);
    let src = t.path().join("src");
    let big = source(&src, 21);
    let origin = t.path().join("origin");
    access.generate("vol", &src, &url(&origin));
    let first = head(&origin, "vol", "main");
    let a = access.mount(
        &url(&origin),
        &t.path().join("a"),
        &t.path().join("ca"),
        &[],
    );
    fs::write(a.path("small"), b"second version\n").unwrap();
    let second = commit(&access, &a.mountpoint, "two");
    let f = fs::OpenOptions::new()
        .write(true)
        .open(a.path("big"))
        .unwrap();
    f.write_all_at(b"third", 2 * MIB).unwrap();
    drop(f);
    let third = commit(&access, &a.mountpoint, "three");

    // file → S3 → file, all history.
    let s3_repo = s3_url(&s3, "backups/vol");
    let out = access.ok(&[os("clone"), os(&url(&origin)), os(&s3_repo)]);
    assert!(out.contains("3 commits copied"), "{out}");
    let back = t.path().join("back");
    let out = access.ok(&[os("clone"), os(&s3_repo), os(&url(&back))]);
    assert!(out.contains("3 commits copied"), "{out}");
    assert_eq!(files_under(&back.join("commits")).len(), 3);
    assert_eq!(head(&back, "vol", "main"), third);
    let m = access.mount(
        &url(&back),
        &t.path().join("m1"),
        &t.path().join("c1"),
        &["--read-only"],
    );
    for p in ["big", "small", "d/a"] {
        assert_same_file(&a.path(p), &m.path(p));
    }
    m.unmount();
    let m = access.mount(
        &url(&back),
        &t.path().join("m2"),
        &t.path().join("c2"),
        &["--read-only", "--ref", &first],
    );
    assert!(fs::read(m.path("big")).unwrap() == big);
    assert_eq!(fs::read(m.path("small")).unwrap(), b"small\n");
    m.unmount();

    // Cloning again onto the same history has nothing to do; onto other versions is refused.
    let out = access.ok(&[os("clone"), os(&url(&origin)), os(&url(&back))]);
    assert!(out.contains("0 commits copied"), "{out}");
    fs::write(a.path("small"), b"fourth\n").unwrap();
    let fourth = commit(&access, &a.mountpoint, "four");
    let err = access.fails(&[os("clone"), os(&url(&origin)), os(&url(&back))]);
    assert!(
        err.contains("`vol` already exists") && err.contains("horcrux push"),
        "{err}"
    );
    assert_eq!(head(&back, "vol", "main"), third);

    // --depth 1 from S3: one commit, whose parent is not there.
    let shallow = t.path().join("shallow");
    let out = access.ok(&[
        os("clone"),
        os(&s3_repo),
        os(&url(&shallow)),
        os("--depth"),
        os("1"),
    ]);
    assert!(out.contains("1 commit copied"), "{out}");
    assert!(out.contains("depth 1"), "{out}");
    assert_eq!(files_under(&shallow.join("commits")).len(), 1);
    assert_eq!(parent_of(&shallow, &third), second);
    let m = access.mount(
        &url(&shallow),
        &t.path().join("m3"),
        &t.path().join("c3"),
        &["--read-only"],
    );
    let mut want = big.clone();
    want[(2 * MIB) as usize..(2 * MIB + 5) as usize].copy_from_slice(b"third");
    assert!(fs::read(m.path("big")).unwrap() == want, "big differs");
    assert_eq!(fs::read(m.path("small")).unwrap(), b"second version\n");
    assert_eq!(fs::read(m.path("d/a")).unwrap(), b"alpha\n");
    m.unmount();
    // `log` of a shallow copy lists what is there and says where the history goes on.
    let log = access.ok(&[os("log"), os("--access"), os(&url(&shallow))]);
    assert!(log.contains(&third) || log.contains(&third[..12]), "{log}");
    assert!(log.contains("shallow"), "{log}");
    let err = access.mount_fails(
        &url(&shallow),
        &t.path().join("m5"),
        &t.path().join("c5"),
        &["--read-only", "--ref", &second],
    );
    assert!(
        err.contains(&second[..12]) || err.contains("no branch, tag or commit"),
        "{err}"
    );

    // A shallow copy takes a fast-forward push (its history ends at `third`, an ancestor of
    // `fourth`), refuses a non-fast-forward, and can itself be cloned.
    let p = push_json(&access, &url(&shallow), &[a.mountpoint.as_os_str()]);
    assert_eq!(p.n("commits_copied"), 1, "{}", p.json);
    assert_eq!(head(&shallow, "vol", "main"), fourth);
    let again = t.path().join("again");
    let out = access.ok(&[os("clone"), os(&url(&shallow)), os(&url(&again))]);
    assert!(out.contains("2 commits copied"), "{out}");
    let m = access.mount(
        &url(&again),
        &t.path().join("m6"),
        &t.path().join("c6"),
        &["--read-only"],
    );
    assert_eq!(fs::read(m.path("small")).unwrap(), b"fourth\n");
    m.unmount();
    let err = access.fails(&[
        os("push"),
        os(&url(&shallow)),
        os("--access"),
        os(&url(&back)),
    ]);
    assert!(err.contains("not an ancestor"), "{err}");
    a.unmount();
}

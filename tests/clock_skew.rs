//! Clock skew between hosts: one side's horcrux runs under a clock a day behind or ahead
//! (Debian's `faketime`, libfaketime: it moves `CLOCK_REALTIME` for one process tree; time
//! namespaces cannot). The monotonic clock and file timestamps are left alone
//! (`FAKETIME_DONT_FAKE_MONOTONIC`, `NO_FAKE_STAT`), as on a host whose wall clock is wrong.
//!
//! - a commit made on the skewed host is pushed, pulled by a host with the right clock
//!   (fast-forward), shown by `log` in history order with its own date, and the right host's
//!   next commit goes back the other way;
//! - `gc`'s grace period is measured on the repository's clock: objects just uploaded (not yet
//!   reachable, as in the middle of a push) survive runs from hosts a day ahead and behind,
//!   and go only once the store's clock says they have been unreachable for the grace period;
//! - the ref lock of a `file://` repository is judged by the filesystem's clock: a writer a day
//!   ahead does not take a live lock for a stale one, a writer a day behind does break a stale
//!   one.
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
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use remote::{Access, files_under};

const DAY: i64 = 86_400;

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// libfaketime, preloaded directly: the `faketime` wrapper waits, on a semaphore its library
/// shares with every process it starts, for the detached mount daemon too, and never returns.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// horcrux with its wall clock moved by `offset` (libfaketime's spelling: `-1d`, `+1d`).
fn skewed(offset: &str) -> Access {
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} is missing: run tests/setup.sh (it installs Debian's faketime)"
    );
    Access {
        flags: Vec::new(),
        env: vec![
            ("LD_PRELOAD".into(), LIBFAKETIME.into()),
            ("FAKETIME".into(), offset.into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
            ("NO_FAKE_STAT".into(), "1".into()),
        ],
        wrap: Vec::new(),
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `horcrux log --json` of a repository (by the right clock).
fn log(repo: &Path) -> Vec<serde_json::Value> {
    let out = horcrux_ok(&[os("log"), os("--json"), os("--access"), os(&url(repo))]);
    serde_json::from_str::<Vec<serde_json::Value>>(out.trim()).unwrap()
}

fn base(access: &Access, mp: &Path) -> String {
    let out = access.ok(&[os("status"), os("--json"), mp.as_os_str()]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v["base_commit"].as_str().unwrap().to_string()
}

fn head(repo: &Path) -> String {
    fs::read_to_string(repo.join("volumes/vol/refs/heads/main"))
        .unwrap()
        .trim()
        .to_string()
}

/// A volume `vol` of two small files generated into `repo`.
fn repository(t: &Path, repo: &Path) {
    let src = t.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("big"), bytes(3, (2 * MIB) as usize)).unwrap();
    fs::write(src.join("small"), b"base\n").unwrap();
    generate("vol", &src, repo);
}

fn skewed_writer_and_right_reader(offset: &str, sign: i64) {
    let t = tempdir();
    let t = t.path();
    let right = Access::default();
    let a_clock = skewed(offset);
    let (origin_a, origin_b, r) = (t.join("origin-a"), t.join("origin-b"), t.join("r"));
    repository(t, &origin_a);
    right.ok(&[
        os("push"),
        os(&url(&r)),
        os("--access"),
        os(&url(&origin_a)),
    ]);
    right.ok(&[os("clone"), os(&url(&r)), os(&url(&origin_b))]);
    let first = head(&r);

    // A, a day off, commits and pushes.
    let a = a_clock.mount(&url(&origin_a), &t.join("a"), &t.join("ca"), &[]);
    fs::write(a.path("from-a"), b"written on a skewed host\n").unwrap();
    a_clock.ok(&[
        os("commit"),
        os("-m"),
        os("from A"),
        a.mountpoint.as_os_str(),
    ]);
    let ca = base(&a_clock, &a.mountpoint);
    a_clock.ok(&[os("push"), os(&url(&r)), a.mountpoint.as_os_str()]);
    assert_eq!(head(&r), ca, "A's push did not move the branch");

    // The log is in history order, whatever the dates say; A's commit carries A's date.
    let l = log(&r);
    assert_eq!(l[0]["id"], ca.as_str());
    assert_eq!(l[1]["id"], first.as_str());
    let dated = l[0]["time"].as_i64().unwrap();
    assert!(
        (dated - (now() + sign * DAY)).abs() < 600,
        "A's commit is dated {} ({}), not a day off",
        l[0]["date"],
        dated
    );
    eprintln!(
        "{offset}: A's commit is dated {}, its parent {}",
        l[0]["date"], l[1]["date"]
    );

    // B, with the right clock, pulls: a fast-forward to A's commit, shown on its live mount.
    let b = right.mount(&url(&origin_b), &t.join("b"), &t.join("cb"), &[]);
    right.ok(&[os("pull"), os(&url(&r)), b.mountpoint.as_os_str()]);
    assert_eq!(head(&origin_b), ca, "B's pull did not fast-forward");
    assert_eq!(
        fs::read(b.path("from-a")).unwrap(),
        b"written on a skewed host\n"
    );

    // B commits on top and pushes; A pulls it, under its skewed clock.
    fs::write(b.path("from-b"), b"right clock\n").unwrap();
    right.ok(&[
        os("commit"),
        os("-m"),
        os("from B"),
        b.mountpoint.as_os_str(),
    ]);
    let cb = base(&right, &b.mountpoint);
    right.ok(&[os("push"), os(&url(&r)), b.mountpoint.as_os_str()]);
    a_clock.ok(&[os("pull"), os(&url(&r)), a.mountpoint.as_os_str()]);
    assert_eq!(
        base(&a_clock, &a.mountpoint),
        cb,
        "A's pull did not fast-forward"
    );
    assert_eq!(fs::read(a.path("from-b")).unwrap(), b"right clock\n");
    let ids: Vec<String> = log(&r)
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec![cb, ca, first], "history order");
    horcrux_ok(&[os("verify"), os(&url(&r))]);
    a.unmount();
    b.unmount();
}

#[test]
fn a_commit_from_a_day_behind_is_pushed_pulled_and_logged() {
    skewed_writer_and_right_reader("-1d", -1);
}

#[test]
fn a_commit_from_a_day_ahead_is_pushed_pulled_and_logged() {
    skewed_writer_and_right_reader("+1d", 1);
}

/// Object keys of a file:// repository (chunks, manifests, commits).
fn objects(repo: &Path) -> BTreeSet<String> {
    ["chunks", "manifests", "commits"]
        .iter()
        .flat_map(|d| files_under(&repo.join(d)))
        .map(|p| p.strip_prefix(repo).unwrap().display().to_string())
        .collect()
}

/// `horcrux gc --json --access REPO --grace G` under `access`'s clock.
fn gc(access: &Access, repo: &Path, grace: &str) -> serde_json::Value {
    let out = access.ok(&[
        os("gc"),
        os("--json"),
        os("--access"),
        os(&url(repo)),
        os("--grace"),
        os(grace),
    ]);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("gc printed {out}: {e}"))
}

fn removed(v: &serde_json::Value) -> usize {
    v["removed_keys"].as_array().map_or(0, Vec::len)
}

#[test]
fn gc_measures_its_grace_on_the_repositorys_clock() {
    let t = tempdir();
    let t = t.path();
    let (origin, r) = (t.join("origin"), t.join("r"));
    repository(t, &origin);
    let right = Access::default();
    right.ok(&[os("push"), os(&url(&r)), os("--access"), os(&url(&origin))]);
    let reachable = objects(&r);

    // A writer a day behind commits new data; its objects reach the repository but its ref
    // does not move yet — the state of a push between sending data and moving the branch.
    let behind = skewed("-1d");
    let a = behind.mount(&url(&origin), &t.join("a"), &t.join("ca"), &[]);
    fs::write(a.path("new"), bytes(9, (3 * MIB) as usize)).unwrap();
    behind.ok(&[
        os("commit"),
        os("-m"),
        os("in flight"),
        a.mountpoint.as_os_str(),
    ]);
    a.unmount();
    let fresh: BTreeSet<String> = objects(&origin).difference(&reachable).cloned().collect();
    assert!(fresh.len() >= 4, "the commit made {fresh:?}");
    for k in &fresh {
        let dst = r.join(k);
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        fs::copy(origin.join(k), dst).unwrap();
    }

    // Collectors a day ahead and a day behind take turns, with the default grace of an hour.
    // Judged by their own clocks, the third run (a day ahead, after a record written "a day
    // ago" by the one behind) would remove the writer's objects at once.
    let ahead = skewed("+1d");
    let t0 = Instant::now();
    for (who, access) in [("ahead", &ahead), ("behind", &behind), ("ahead", &ahead)] {
        let v = gc(access, &r, "1h");
        assert_eq!(removed(&v), 0, "gc {who} removed {}", v["removed_keys"]);
        assert_eq!(
            v["unreachable_keys"].as_array().unwrap().len(),
            fresh.len(),
            "gc {who}: {v}"
        );
    }
    assert_eq!(objects(&r), &reachable | &fresh, "something went");

    // By the repository's clock they have now been unreachable for a few seconds: a grace of
    // two seconds lets a run (from the host a day behind) remove them, and only them.
    std::thread::sleep(Duration::from_secs(3).saturating_sub(t0.elapsed()));
    let v = gc(&behind, &r, "2s");
    let gone: BTreeSet<String> = v["removed_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    assert_eq!(gone, fresh, "gc removed the wrong objects: {v}");
    assert_eq!(objects(&r), reachable);
    horcrux_ok(&[os("verify"), os(&url(&r))]);
}

#[test]
fn a_file_repositorys_ref_lock_is_judged_by_the_filesystems_clock() {
    let t = tempdir();
    let t = t.path();
    let (origin, r) = (t.join("origin"), t.join("r"));
    repository(t, &origin);
    let heads = r.join("volumes/vol/refs/heads");
    fs::create_dir_all(&heads).unwrap();
    let lock = heads.join(".lock.d");

    // Another writer holds the lock right now: a writer a day ahead must wait, and give up
    // with the lock named, not break it as if it were a day old.
    fs::create_dir(&lock).unwrap();
    let push = |access: &Access| {
        access.run(&[os("push"), os(&url(&r)), os("--access"), os(&url(&origin))])
    };
    let out = push(&skewed("+1d"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the push broke a live lock");
    assert!(err.contains("held by another writer"), "{err}");
    assert!(lock.is_dir(), "the live lock was removed");
    assert!(
        !heads.join("main").exists(),
        "the ref moved under another writer's lock"
    );

    // A lock two minutes old is stale (its writer died): a writer a day behind breaks it,
    // though by its own clock the lock is from the future.
    let st = std::process::Command::new("touch")
        .args(["-d", "2 minutes ago"])
        .arg(&lock)
        .status()
        .unwrap();
    assert!(st.success());
    let out = push(&skewed("-1d"));
    assert!(
        out.status.success(),
        "push: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(heads.join("main").is_file());
    assert!(!lock.exists());
}

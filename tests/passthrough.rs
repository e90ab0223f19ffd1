//! FUSE passthrough of fully cached files, through the real kernel: a fully cached file is
//! assembled once into `<cache>/assembled/` and its reads are served by the kernel from it
//! (proved by reading it while the daemon is stopped); a partly cached file, a file changed
//! in the overlay and `--no-passthrough` mounts are served by the daemon; a checkout shows the
//! new version's content; assembled files are evicted under the cache bound, except open
//! ones. Needs root (backing files need CAP_SYS_ADMIN) and Linux ≥ 6.9; elsewhere the tests
//! that need passthrough fail, or are skipped with a message under HORCRUX_ALLOW_SKIP=1.

mod common;
#[path = "support/skip.rs"]
mod skip;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const BIG: usize = 5 * MIB as usize + 777;

/// Can this system pass through at all (root and a kernel that has it)?
fn supported() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid utsname to fill.
    unsafe { libc::uname(&mut u) };
    let release: String = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let ok = root && (major, minor) >= (6, 9);
    ok || !skip::skip_allowed(&format!(
        "FUSE passthrough needs root and Linux >= 6.9 (kernel {release})"
    ))
}

fn source(t: &Path) -> (PathBuf, Vec<u8>) {
    let src = t.join("src");
    fs::create_dir_all(&src).unwrap();
    let big = bytes(42, BIG);
    fs::write(src.join("big"), &big).unwrap();
    fs::write(src.join("other"), bytes(43, 4 * MIB as usize)).unwrap();
    fs::write(src.join("second"), bytes(44, 4 * MIB as usize)).unwrap();
    fs::write(src.join("small"), b"tiny").unwrap();
    let repo = t.join("repo");
    generate("pt", &src, &repo);
    (repo, big)
}

/// Files under `<cache>/assembled/` (complete ones: temporaries start with a dot).
fn assembled(cache: &Path) -> Vec<PathBuf> {
    let Ok(d) = fs::read_dir(cache.join("assembled")) else {
        return Vec::new();
    };
    d.flatten()
        .flat_map(|s| fs::read_dir(s.path()).into_iter().flatten().flatten())
        .map(|f| f.path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect()
}

/// Does the daemon hold an assembled file open (a file open with passthrough)?
fn daemon_holds_assembled(pid: u32) -> bool {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .any(|l| l.to_string_lossy().contains("/assembled/"))
}

/// Open `rel` read-only and expect it to pass through. A handle closed just before may not
/// have reached the daemon yet (the kernel sends its release asynchronously), and until it
/// has, a new open joins the daemon-served mode: retry for a while.
fn open_passing_through(m: &Mount, rel: &str) -> File {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let f = File::open(m.path(rel)).unwrap();
        if daemon_holds_assembled(m.pid) {
            return f;
        }
        drop(f);
        assert!(
            std::time::Instant::now() < deadline,
            "{rel} never passed through; log:\n{}",
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Read a whole file through the mount, so every block gets cached, and wait until the cache
/// index has them all (inserts finish in the background).
fn read_and_cache(m: &Mount, rel: &str, complete_chunks: u64) {
    fs::read(m.path(rel)).unwrap();
    let ok = wait_until(Duration::from_secs(20), || {
        complete(&m.cache_dir) >= complete_chunks
    });
    assert!(ok, "chunks never became complete in the cache");
}

/// Complete chunks in the cache, per `horcrux cache stats`.
fn complete(cache: &Path) -> u64 {
    let out = horcrux_ok(&[
        "cache".as_ref(),
        "stats".as_ref(),
        "--cache-dir".as_ref(),
        cache.as_os_str(),
    ]);
    // "chunks       N (M complete)"
    out.lines()
        .find(|l| l.starts_with("chunks"))
        .and_then(|l| l.split('(').nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Read all of `f` on another thread while the daemon is stopped: only the kernel can answer
/// then. Returns the bytes if the read finished within the timeout.
fn read_while_daemon_stopped(pid: u32, f: File, len: usize) -> Option<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    std::thread::spawn(move || {
        let mut buf = vec![0u8; len];
        let r = f.read_exact_at(&mut buf, 0).map(|()| buf);
        let _ = tx.send(r);
    });
    let got = rx.recv_timeout(Duration::from_secs(10));
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    match got {
        Ok(r) => Some(r.unwrap()),
        Err(_) => {
            // Let the blocked reader finish now that the daemon runs again.
            let _ = rx.recv_timeout(Duration::from_secs(10));
            None
        }
    }
}

#[test]
fn a_fully_cached_file_is_read_by_the_kernel() {
    if !supported() {
        return;
    }
    let t = tempdir();
    let (repo, big) = source(t.path());
    let cache = t.path().join("cache");
    let mnt = t.path().join("mnt");
    // First mount: a cold read fills the cache (5 MiB + 777 B in 1 MiB chunks: 6 chunks).
    let m = Mount::new(&repo, &mnt, &cache, &["--read-only"]);
    read_and_cache(&m, "big", 6);
    // Served by the daemon while it was not fully cached: nothing assembled.
    m.unmount();
    // A fresh mount (nothing in the kernel's page cache of this inode): the open passes through.
    let m = Mount::new(&repo, &mnt, &cache, &["--read-only"]);
    let f = open_passing_through(&m, "big");
    assert_eq!(assembled(&cache).len(), 1);
    let got = read_while_daemon_stopped(m.pid, f, BIG)
        .expect("the read needed the stopped daemon: the file was not passed through");
    assert!(got == big, "wrong bytes through passthrough");
    // A second open of the same file joins the same backing file; all bytes again.
    let g = File::open(m.path("big")).unwrap();
    let mut again = vec![0u8; BIG];
    g.read_exact_at(&mut again, 0).unwrap();
    assert!(again == big);
    drop(g);
    // Once closed, the daemon lets go of the backing file.
    assert!(wait_until(Duration::from_secs(5), || {
        !daemon_holds_assembled(m.pid)
    }));
    // Small files (under --passthrough-min-size, 1 MiB) never pass through.
    let s = File::open(m.path("small")).unwrap();
    assert!(!daemon_holds_assembled(m.pid));
    drop(s);
    assert_eq!(fs::read(m.path("small")).unwrap(), b"tiny");
    assert!(m.log_text().contains("FUSE passthrough enabled"));
    // `horcrux stats` tells the user so: on, with the passed-through opens counted.
    let stats: serde_json::Value = serde_json::from_str(&horcrux_ok(&[
        "stats".as_ref(),
        "--json".as_ref(),
        m.path("").as_os_str(),
    ]))
    .unwrap();
    let p = &stats["passthrough"];
    assert_eq!(p["active"], true, "{stats}");
    assert!(p["opens"].as_u64().unwrap() >= 2, "{stats}");
    assert!(p["registered"].as_u64().unwrap() >= 1, "{stats}");
    m.unmount();
}

#[test]
fn a_partly_cached_file_and_no_passthrough_go_through_the_daemon() {
    if !supported() {
        return;
    }
    let t = tempdir();
    let (repo, big) = source(t.path());
    let cache = t.path().join("cache");
    let mnt = t.path().join("mnt");
    // Only the first block read, and no background fill: the file is partly cached.
    let m = Mount::new(&repo, &mnt, &cache, &["--read-only", "--no-fill"]);
    let f = File::open(m.path("big")).unwrap();
    let mut first = vec![0u8; 4096];
    f.read_exact_at(&mut first, 0).unwrap();
    drop(f);
    let f = File::open(m.path("big")).unwrap();
    assert!(!daemon_holds_assembled(m.pid));
    let mut all = vec![0u8; BIG];
    f.read_exact_at(&mut all, 0).unwrap();
    assert!(all == big);
    drop(f);
    assert!(assembled(&cache).is_empty());
    m.unmount();
    assert!(wait_until(Duration::from_secs(20), || complete(&cache) >= 6));

    // Fully cached now, but --no-passthrough: served by the daemon, nothing assembled.
    let m = Mount::new(&repo, &mnt, &cache, &["--read-only", "--no-passthrough"]);
    let f = File::open(m.path("big")).unwrap();
    assert!(!daemon_holds_assembled(m.pid));
    f.read_exact_at(&mut all, 0).unwrap();
    assert!(all == big);
    drop(f);
    assert!(assembled(&cache).is_empty());
    m.unmount();
}

#[test]
fn overlay_changes_and_checkout_are_never_hidden_by_a_backing_file() {
    if !supported() {
        return;
    }
    let t = tempdir();
    let (repo, big) = source(t.path());
    let cache = t.path().join("cache");
    let m = Mount::new(&repo, &t.path().join("mnt"), &cache, &[]);
    read_and_cache(&m, "big", 6);

    // Untouched and fully cached: passes through, even on a writable mount.
    let r = open_passing_through(&m, "big");
    // No writer while the kernel serves it from a backing file (like a running program).
    let w = OpenOptions::new().write(true).open(m.path("big"));
    assert_eq!(errno_of(&w), libc::ETXTBSY, "{w:?}");
    let trunc = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.path("big"));
    assert_eq!(errno_of(&trunc), libc::ETXTBSY, "{trunc:?}");
    drop(r);
    assert!(wait_until(Duration::from_secs(5), || {
        !daemon_holds_assembled(m.pid)
    }));

    // Changed in the overlay: never passed through, and the change is what is read.
    let w = OpenOptions::new().write(true).open(m.path("big")).unwrap();
    w.write_all_at(b"CHANGED", 2 * MIB + 5).unwrap();
    drop(w);
    let mut changed = big.clone();
    changed[2 * MIB as usize + 5..][..7].copy_from_slice(b"CHANGED");
    let r = File::open(m.path("big")).unwrap();
    assert!(!daemon_holds_assembled(m.pid));
    let mut got = vec![0u8; BIG];
    r.read_exact_at(&mut got, 0).unwrap();
    assert!(got == changed, "the overlay's change is not visible");
    drop(r);

    // Commit the change, go back to the first version, then forward again: each open shows
    // the version mounted at that moment, passed through once cached.
    let head = || {
        fs::read_to_string(repo.join("volumes/pt/refs/heads/main"))
            .unwrap()
            .trim()
            .to_string()
    };
    let base = head();
    horcrux_ok(&[
        "commit".as_ref(),
        "-m".as_ref(),
        "changed".as_ref(),
        m.mountpoint.as_os_str(),
        "--author".as_ref(),
        "T <t@example.com>".as_ref(),
    ]);
    horcrux_ok(&["checkout".as_ref(), base.as_ref(), m.mountpoint.as_os_str()]);
    let r = open_passing_through(&m, "big");
    r.read_exact_at(&mut got, 0).unwrap();
    assert!(got == big, "checkout of the base shows other bytes");
    drop(r);
    assert!(wait_until(Duration::from_secs(5), || {
        !daemon_holds_assembled(m.pid)
    }));
    horcrux_ok(&[
        "checkout".as_ref(),
        "main".as_ref(),
        m.mountpoint.as_os_str(),
    ]);
    // The new version's chunk for the changed window was written by the commit, not cached
    // by reading: read the file once, then it passes through with the new bytes.
    read_and_cache(&m, "big", 7);
    let r = open_passing_through(&m, "big");
    r.read_exact_at(&mut got, 0).unwrap();
    assert!(got == changed, "checkout of main shows old bytes");
    drop(r);
    assert_eq!(assembled(&cache).len(), 2, "one assembled file per version");
    m.unmount();
}

#[test]
fn assembled_files_are_evicted_under_the_bound_but_not_while_open() {
    if !supported() {
        return;
    }
    let t = tempdir();
    let (repo, _) = source(t.path());
    let cache = t.path().join("cache");
    // 14 MiB: room for the chunks of `other` and `second` (8 MiB) and one assembled copy.
    let m = Mount::new(
        &repo,
        &t.path().join("mnt"),
        &cache,
        &["--read-only", "--cache-size", "14M"],
    );
    read_and_cache(&m, "other", 4);
    read_and_cache(&m, "second", 8);
    let a = open_passing_through(&m, "other");
    assert_eq!(assembled(&cache).len(), 1);
    drop(a);
    // Let the mtime order be clear, then assemble the second: the first goes.
    std::thread::sleep(Duration::from_millis(20));
    let b = open_passing_through(&m, "second");
    let left = assembled(&cache);
    assert_eq!(left.len(), 1, "{left:?}");
    // The open one stays, and still reads right.
    let mut buf = vec![0u8; 4 * MIB as usize];
    b.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == bytes(44, 4 * MIB as usize));
    let stats = horcrux_ok(&[
        "cache".as_ref(),
        "stats".as_ref(),
        "--cache-dir".as_ref(),
        cache.as_os_str(),
    ]);
    assert!(stats.contains("assembled    1"), "{stats}");
    drop(b);
    m.unmount();
}

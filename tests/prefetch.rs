//! `horcrux prefetch` end to end through the real kernel FUSE: `--all` hydrates the whole
//! volume once, after which the source can be moved away — reads and even a new mount keep
//! working from the pinned cache; `PATH...` hydrates only those files; a daemon killed with
//! SIGKILL mid-prefetch resumes on the next mount without fetching again what it had; the
//! bandwidth bound holds; a reader is served promptly while a prefetch runs; `--cancel`.
//!
//! Build the binary first: `cargo build --workspace`.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// Files of the test volume: (relative path, content). Multi-block files whose chunks are
/// their own (sizes of whole MiB or more), and small files packed together.
fn tree(root: &Path, mib: u64) -> Vec<(String, Vec<u8>)> {
    let mut files = vec![
        ("a/big".to_string(), bytes(1, (mib * MIB) as usize)),
        ("a/two".to_string(), bytes(2, (2 * MIB + 4097) as usize)),
        ("b/three".to_string(), bytes(3, (3 * MIB) as usize)),
        ("b/deep/four".to_string(), bytes(4, (MIB + 5) as usize)),
    ];
    for i in 0..20u64 {
        files.push((
            format!("small/s{i:02}"),
            bytes(10 + i, 1000 + 77 * i as usize),
        ));
    }
    for (p, data) in &files {
        let f = root.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, data).unwrap();
    }
    files
}

struct Fixture {
    _dir: tempfile::TempDir,
    repo: PathBuf,
    mnt: PathBuf,
    cache: PathBuf,
    files: Vec<(String, Vec<u8>)>,
}

/// A volume of about `mib` + 6 MiB cut in 4 MiB chunks of 1 MiB blocks.
fn fixture(mib: u64) -> Fixture {
    let dir = tempdir();
    let src = dir.path().join("src");
    let files = tree(&src, mib);
    let repo = dir.path().join("repo");
    horcrux_ok(&[
        os("generate"),
        os("vol"),
        src.as_os_str(),
        repo.as_os_str(),
        os("--chunk-size"),
        os("4M"),
    ]);
    Fixture {
        repo,
        mnt: dir.path().join("mnt"),
        cache: dir.path().join("cache"),
        files,
        _dir: dir,
    }
}

fn total(files: &[(String, Vec<u8>)]) -> u64 {
    files.iter().map(|(_, d)| d.len() as u64).sum()
}

/// `horcrux prefetch --status --json MNT`, parsed.
fn status(mnt: &Path) -> serde_json::Value {
    let out = horcrux_ok(&[
        os("prefetch"),
        os("--status"),
        os("--json"),
        mnt.as_os_str(),
    ]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn num(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

fn wait_done(mnt: &Path, timeout: Duration) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let ok = wait_until(timeout, || {
        last = status(mnt);
        last["state"] != "planning" && last["state"] != "running"
    });
    assert!(ok, "prefetch not finished in {timeout:?}: {last}");
    last
}

fn read_all(mnt: &Path, files: &[(String, Vec<u8>)]) {
    for (p, data) in files {
        let got = std::fs::read(mnt.join(p)).unwrap_or_else(|e| panic!("reading {p}: {e}"));
        assert!(got == *data, "{p}: wrong bytes through the mount");
    }
}

fn cache_text(cache: &Path, what: &str) -> String {
    horcrux_ok(&[os("cache"), os(what), os("--cache-dir"), cache.as_os_str()])
}

#[test]
fn all_hydrates_everything_once_and_the_source_can_go() {
    let f = fixture(8);
    let size = total(&f.files);
    let m = Mount::new(&f.repo, &f.mnt, &f.cache, &[]);
    // Foreground: returns when done, with the summary.
    let out = horcrux_ok(&[os("prefetch"), m.mountpoint.as_os_str(), os("--all")]);
    assert!(out.contains("prefetch done"), "{out}");
    let s = status(&m.mountpoint);
    assert_eq!(s["state"], "done", "{s}");
    assert_eq!(num(&s, "present_bytes"), num(&s, "total_bytes"));
    assert_eq!(num(&s, "total_bytes"), size, "the volume's bytes: {s}");
    assert_eq!(num(&s, "fetched_bytes"), size, "fetched exactly once: {s}");
    // The cache holds every block, pinned for the volume.
    let ls = cache_text(&f.cache, "ls");
    let mut chunks = 0;
    for l in ls.lines().skip(1) {
        // "CHUNK SIZE CACHED PRESENT/TOTAL USED"
        if let Some((p, t)) = l
            .split_whitespace()
            .find_map(|w| w.split_once('/'))
            .filter(|(p, t)| p.parse::<u32>().is_ok() && t.parse::<u32>().is_ok())
        {
            assert_eq!(p, t, "a chunk is not complete: {l}");
            chunks += 1;
        }
    }
    assert!(chunks >= 4, "{ls}");
    let pins = cache_text(&f.cache, "pins");
    assert!(pins.contains("vol@file://"), "{pins}");
    assert!(pins.contains("prefetch done"), "{pins}");
    // A second --all fetches nothing.
    horcrux_ok(&[os("prefetch"), m.mountpoint.as_os_str(), os("--all")]);
    let s = status(&m.mountpoint);
    assert_eq!(num(&s, "fetched_bytes"), 0, "{s}");

    // The source goes away: every byte still reads (nothing was read through the mount yet,
    // so none of it comes from the kernel's page cache).
    let gone = f.repo.with_extension("moved");
    std::fs::rename(&f.repo, &gone).unwrap();
    read_all(&m.mountpoint, &f.files);
    // Pins hold against a prune to nothing.
    let p = horcrux_ok(&[
        os("cache"),
        os("prune"),
        os("--max-size"),
        os("0"),
        os("--older-than"),
        os("0s"),
        os("--cache-dir"),
        f.cache.as_os_str(),
    ]);
    assert!(p.contains("removed 0 chunks"), "{p}");
    m.unmount();

    // A new mount with the source dead falls back to the prefetched version.
    let m = Mount::new(&f.repo, &f.mnt, &f.cache, &[]);
    read_all(&m.mountpoint, &f.files);
    assert!(
        m.log_text().contains("source is unreachable"),
        "{}",
        m.log_text()
    );
    // Writes still work on the offline mount (they are local).
    std::fs::write(m.path("new"), b"local").unwrap();
    m.unmount();

    // Unpinned, the data may go.
    let u = horcrux_ok(&[
        os("cache"),
        os("unpin"),
        os("--all"),
        os("--cache-dir"),
        f.cache.as_os_str(),
    ]);
    assert!(u.contains("released"), "{u}");
    let p = horcrux_ok(&[
        os("cache"),
        os("prune"),
        os("--max-size"),
        os("0"),
        os("--cache-dir"),
        f.cache.as_os_str(),
    ]);
    assert!(!p.contains("removed 0 chunks"), "{p}");
}

#[test]
fn paths_hydrate_only_those_files() {
    let f = fixture(8);
    let m = Mount::new(&f.repo, &f.mnt, &f.cache, &["--timeout", "2"]);
    let abs = m.path("b");
    horcrux_ok(&[
        os("prefetch"),
        m.mountpoint.as_os_str(),
        os("a/two"),
        abs.as_os_str(),
    ]);
    let s = status(&m.mountpoint);
    let want: u64 = f
        .files
        .iter()
        .filter(|(p, _)| p == "a/two" || p.starts_with("b/"))
        .map(|(_, d)| d.len() as u64)
        .sum();
    assert_eq!(s["state"], "done", "{s}");
    assert_eq!(num(&s, "total_bytes"), want, "{s}");
    assert_eq!(num(&s, "fetched_bytes"), want, "{s}");
    let stats = cache_text(&f.cache, "stats");
    assert!(
        stats.contains(&horcrux::util::human_size(want)),
        "the cache holds exactly those files: {stats}"
    );
    std::fs::rename(&f.repo, f.repo.with_extension("moved")).unwrap();
    let chosen: Vec<_> = f
        .files
        .iter()
        .filter(|(p, _)| p == "a/two" || p.starts_with("b/"))
        .cloned()
        .collect();
    read_all(&m.mountpoint, &chosen);
    // Anything else needed the source.
    assert!(std::fs::read(m.path("a/big")).is_err());
    m.unmount();
}

#[test]
fn a_killed_daemon_resumes_without_fetching_again() {
    let f = fixture(24);
    let size = total(&f.files);
    let mut m = Mount::new(&f.repo, &f.mnt, &f.cache, &[]);
    horcrux_ok(&[
        os("prefetch"),
        m.mountpoint.as_os_str(),
        os("--all"),
        os("--bandwidth"),
        os("8M"),
        os("--detach"),
    ]);
    let mut before = 0;
    assert!(wait_until(Duration::from_secs(20), || {
        before = num(&status(&m.mountpoint), "present_bytes");
        before >= size / 3
    }));
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(m.pid as i32, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(10), || !alive(m.pid)));
    force_unmount(&m.mountpoint);
    m.pid = 0;
    let m = Mount::new(&f.repo, &f.mnt, &f.cache, &[]);
    // The new daemon resumed the recorded request by itself, with its limits.
    let s = wait_done(&m.mountpoint, Duration::from_secs(60));
    assert_eq!(s["state"], "done", "{s}");
    assert_eq!(num(&s, "bandwidth"), 8 << 20, "{s}");
    assert_eq!(num(&s, "present_bytes"), size, "{s}");
    let fetched = num(&s, "fetched_bytes");
    // Only what was missing: at most the blocks in flight at the kill (4 workers) again.
    assert!(
        fetched <= size - before + 4 * MIB,
        "fetched {fetched} of {size} again although {before} were cached"
    );
    assert!(fetched < size, "{s}");
    assert!(
        m.log_text().contains("resuming the recorded prefetch"),
        "{}",
        m.log_text()
    );
    std::fs::rename(&f.repo, f.repo.with_extension("moved")).unwrap();
    read_all(&m.mountpoint, &f.files);
    m.unmount();
}

#[test]
fn the_bandwidth_bound_holds() {
    // About 20 MiB at 10 MiB/s: at least ~1.9 s (one block of burst).
    let f = fixture(14);
    let size = total(&f.files);
    let m = Mount::new(&f.repo, &f.mnt, &f.cache, &[]);
    let t = Instant::now();
    horcrux_ok(&[
        os("prefetch"),
        m.mountpoint.as_os_str(),
        os("--all"),
        os("--bandwidth"),
        os("10M"),
    ]);
    let e = t.elapsed();
    let s = status(&m.mountpoint);
    assert_eq!(num(&s, "fetched_bytes"), size);
    let floor = Duration::from_secs_f64((size - MIB) as f64 / (10 << 20) as f64 * 0.95);
    assert!(e >= floor, "{size} bytes at 10 MiB/s took {e:?}");
    assert!(e < Duration::from_secs(30), "{e:?}");
    m.unmount();
}

#[test]
fn a_reader_is_served_promptly_during_a_prefetch_and_cancel_stops_it() {
    let f = fixture(24);
    let m = Mount::new(&f.repo, &f.mnt, &f.cache, &[]);
    horcrux_ok(&[
        os("prefetch"),
        m.mountpoint.as_os_str(),
        os("--all"),
        os("--bandwidth"),
        os("2M"),
        os("--concurrency"),
        os("2"),
        os("--detach"),
    ]);
    assert!(wait_until(Duration::from_secs(10), || status(
        &m.mountpoint
    )["state"]
        == "running"));
    // The prefetch needs ~15 s; a reader of data it has not reached is served at once.
    for p in ["small/s19", "b/deep/four", "b/three"] {
        let want = &f.files.iter().find(|(q, _)| q == p).unwrap().1;
        let t = Instant::now();
        let got = std::fs::read(m.path(p)).unwrap();
        let e = t.elapsed();
        assert!(got == *want, "{p}");
        assert!(e < Duration::from_secs(2), "reading {p} took {e:?}");
    }
    let out = horcrux_ok(&[os("prefetch"), os("--cancel"), m.mountpoint.as_os_str()]);
    assert!(out.contains("prefetch cancelled"), "{out}");
    let s = status(&m.mountpoint);
    assert_eq!(s["state"], "cancelled");
    assert!(num(&s, "present_bytes") < num(&s, "total_bytes"), "{s}");
    m.unmount();
    // A cancelled request is not resumed. (Without the start-up profile's replay, which
    // `prefetch --status` would report as this mount's prefetch.)
    let m = Mount::new(&f.repo, &f.mnt, &f.cache, &["--no-replay"]);
    let out = horcrux(&[os("prefetch"), os("--status"), m.mountpoint.as_os_str()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no prefetch"),
        "{out:?}"
    );
    m.unmount();
}

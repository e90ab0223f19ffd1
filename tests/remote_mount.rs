//! End to end with remote repositories: `horcrux generate` straight to an OpenSSH server and to
//! an S3 server (moto), `horcrux copy` between them, `horcrux mount` of each through the real
//! kernel FUSE, mirrors that fall over and come back, a source that dies mid-read (EIO within
//! the bound, recovery on the same mount), a chunk corrupted on the server, and the CLI's error
//! messages for what users get wrong.
//!
//! Servers are started on loopback by the harness (`support/sshd.rs`, `support/s3server.rs`)
//! and killed on drop; a missing sshd or moto fails the test with a pointer to tests/setup.sh.
//! Build the binary first: `cargo build --workspace`.

mod common;
#[path = "support/remote.rs"]
mod remote;
#[path = "support/s3server.rs"]
mod s3server;
#[path = "support/sshd.rs"]
mod sshd;

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use remote::*;

/// A source tree of a few MiB: multi-chunk files, small files packed together, a subdirectory.
fn small_tree(root: &Path, seed: u64) {
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("big"), bytes(seed, (4 * MIB + 777) as usize)).unwrap();
    std::fs::write(root.join("one"), bytes(seed + 1, MIB as usize)).unwrap();
    for i in 0..40u64 {
        std::fs::write(
            root.join(format!("sub/s{i:02}")),
            bytes(seed + 10 + i, 100 + i as usize * 37),
        )
        .unwrap();
    }
    std::fs::write(root.join("sub/hello.txt"), b"hello over the wire\n").unwrap();
}

/// One file of `mib` MiB of pseudo-random bytes (one 1 MiB chunk per MiB).
fn big_file_tree(root: &Path, mib: u64, seed: u64) -> Vec<u8> {
    std::fs::create_dir_all(root).unwrap();
    let data = bytes(seed, (mib * MIB) as usize);
    std::fs::write(root.join("big"), &data).unwrap();
    std::fs::write(root.join("small"), b"small\n").unwrap();
    data
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// Generate → mount → compare → re-run refused → another volume uploads only what is missing,
/// against the remote `repo_url`.
fn generate_mount_compare(access: &Access, repo_url: &str, t: &Path) {
    let src = t.join("src");
    let rich = rich_tree(&src);
    let summary = access.generate("vol", &src, repo_url);
    let (written, chunks) = uploaded(&summary);
    assert!(chunks > 3, "{summary}");
    assert_eq!(
        written, chunks,
        "a first generate uploads every chunk:\n{summary}"
    );

    let cache = t.join("cache");
    let m = access.mount(repo_url, &t.join("mnt"), &cache, &[]);
    let n = compare_trees(&src, &m.mountpoint, rich.xattrs);
    assert!(n > 1500, "compared only {n} entries");
    m.unmount();
    cache_verify_clean(&cache);

    // The same name again is refused, and says why.
    let err = access.fails(&[
        os("generate"),
        os("vol"),
        src.as_os_str(),
        os(repo_url),
        os("--chunk-size"),
        os("1M"),
    ]);
    assert!(
        err.contains("`vol` already exists"),
        "generate of an existing volume: {err}"
    );

    // Another volume of mostly the same data: only the new file's chunks travel.
    let src2 = t.join("src2");
    small_tree(&src2, 1);
    let first = access.generate("first", &src2, repo_url);
    std::fs::write(src2.join("new"), bytes(4242, (2 * MIB) as usize)).unwrap();
    let again = access.generate("second", &src2, repo_url);
    let (w1, _) = uploaded(&first);
    let (w2, c2) = uploaded(&again);
    eprintln!("first volume: {w1} chunks uploaded; second: {w2} of {c2}");
    assert!(w1 > 0, "{first}");
    assert!(
        (2..=3).contains(&w2) && w2 < c2,
        "the second volume should upload the new file's 2 chunks (and at most one changed \
         pack), not {w2} of {c2}:\n{again}"
    );

    // With two volumes, each mounts by name; the first comparison still holds.
    let m = access.mount(
        repo_url,
        &t.join("mnt2"),
        &t.join("cache2"),
        &["--name", "second"],
    );
    compare_trees(&src2, &m.mountpoint, false);
    m.unmount();
}

#[test]
fn generate_to_ssh_then_mount_over_ssh() {
    let t = tempdir();
    let s = start_sshd();
    let repo = s.dir().join("repo");
    let url = s.url(&repo);
    generate_mount_compare(&Access::ssh(&s), &url, t.path());
    // The objects really are on the server's side.
    assert!(repo.join("horcrux.json").is_file());
    assert!(!files_under(&repo.join("chunks")).is_empty());
}

#[test]
fn generate_to_s3_then_mount_over_s3() {
    let t = tempdir();
    let s3 = start_moto("bucket");
    let url = s3_url(&s3, "bucket/some/prefix");
    generate_mount_compare(&Access::default().with_s3(&s3), &url, t.path());
}

#[test]
fn copy_from_ssh_to_file_and_s3_then_mount_the_copies() {
    let t = tempdir();
    let s = start_sshd();
    let s3 = start_moto("copies");
    let access = Access::ssh(&s).with_s3(&s3);
    let src = t.path().join("src");
    small_tree(&src, 7);
    let ssh_url = s.url(&s.dir().join("repo"));
    access.generate("data", &src, &ssh_url);

    let file_repo = t.path().join("copy");
    let file_url = url(&file_repo);
    let s3_dst = s3_url(&s3, "copies/repo");
    for (i, dst) in [file_url.as_str(), s3_dst.as_str()].into_iter().enumerate() {
        let out = access.ok(&[os("copy"), os(&ssh_url), os(dst)]);
        assert!(out.contains("copied"), "{out}");
        // A second copy has nothing left to do.
        let again = access.ok(&[os("copy"), os(&ssh_url), os(dst)]);
        assert!(
            again.contains("copied 0 of"),
            "a re-copy moved data again: {again}"
        );
        let m = access.mount(
            dst,
            &t.path().join(format!("mnt{i}")),
            &t.path().join(format!("cache{i}")),
            &[],
        );
        compare_trees(&src, &m.mountpoint, false);
        m.unmount();
    }
    assert!(file_repo.join("horcrux.json").is_file());
}

#[test]
fn a_dead_first_mirror_falls_over_to_the_next() {
    let t = tempdir();
    let src = t.path().join("src");
    small_tree(&src, 3);
    let repo = t.path().join("repo");
    generate("mirrored", &src, &repo);
    let dead = format!("ssh://root@127.0.0.1:{}/nowhere/repo", sshd::free_port());
    let access = Access::default().flag("--insecure-ignore-host-key");
    let started = Instant::now();
    let m = access.mount(
        &format!("{dead},{}", url(&repo)),
        &t.path().join("mnt"),
        &t.path().join("cache"),
        &["--timeout", "10"],
    );
    compare_trees(&src, &m.mountpoint, false);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "fall-over took {:?}",
        started.elapsed()
    );
    let log = m.log_text();
    assert!(
        log.contains("using the next mirror"),
        "the daemon did not log the fall-over:\n{log}"
    );
    m.unmount();
}

#[test]
fn a_frozen_first_mirror_is_left_after_the_attempt_timeout() {
    let t = tempdir();
    let s = start_sshd();
    let src = t.path().join("src");
    small_tree(&src, 4);
    let repo = s.dir().join("repo");
    generate("frozen", &src, &repo);
    let mirror = t.path().join("mirror");
    copy_dir(&repo, &mirror);
    // The server accepts connections (the kernel does) but never answers.
    s.freeze();
    let started = Instant::now();
    let m = Access::ssh(&s).mount(
        &format!("{},{}", s.url(&repo), url(&mirror)),
        &t.path().join("mnt"),
        &t.path().join("cache"),
        &["--timeout", "4"],
    );
    let mounted = started.elapsed();
    compare_trees(&src, &m.mountpoint, false);
    let took = started.elapsed();
    eprintln!("mounted in {mounted:?}, compared in {took:?} with a frozen first mirror");
    // Each attempt at the frozen server is cut at min(10 s, 4 s / 2), then it is skipped.
    assert!(mounted < Duration::from_secs(15), "mount took {mounted:?}");
    assert!(took < Duration::from_secs(40), "reads took {took:?}");
    let log = m.log_text();
    assert!(
        (log.contains("timed out") || log.contains("no answer from the SSH server in time"))
            && log.contains("using the next mirror"),
        "the daemon did not log a timed-out mirror:\n{log}"
    );
    s.thaw();
    m.unmount();
}

/// `--no-fill` fetches exactly the blocks read; by default the rest of the chunk follows.
#[test]
fn no_fill_fetches_only_the_blocks_read() {
    let t = tempdir();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let data = bytes(31, (8 * MIB) as usize);
    std::fs::write(src.join("big"), &data).unwrap();
    let repo = t.path().join("repo");
    horcrux_ok(&[
        os("generate"),
        os("fill"),
        src.as_os_str(),
        repo.as_os_str(),
        os("--chunk-size"),
        os("4M"),
    ]);
    let first = files_under(&repo.join("chunks"))
        .into_iter()
        .find(|p| std::fs::read(p).unwrap() == data[..(4 * MIB) as usize])
        .expect("a chunk object holding big[0..4M]");
    let chunk = first.file_name().unwrap().to_string_lossy().into_owned();
    // The block map of that chunk in `cache` ("" until the chunk has a row: a block is served
    // before it is cached).
    let blocks = |cache: &Path| -> String {
        let out = horcrux(&[
            os("cache"),
            os("inspect"),
            os(&chunk),
            os("--cache-dir"),
            cache.as_os_str(),
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix("blocks"))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    for (i, fill) in [false, true].into_iter().enumerate() {
        let cache = t.path().join(format!("cache{i}"));
        // No start-up profile: the first mount's would make the second replay the block
        // before it is read, and a block that is not missed starts no fill.
        let extra: &[&str] = if fill {
            &["--no-profile"]
        } else {
            &["--no-fill", "--no-profile"]
        };
        let m = Access::default().mount(
            &url(&repo),
            &t.path().join(format!("mnt{i}")),
            &cache,
            extra,
        );
        let file = m.path("big");
        read_ok(&file, &data, MIB + 4096, 4096, Duration::from_secs(20));
        if fill {
            // The other three blocks arrive in the background. Not watched with `cache inspect`
            // meanwhile: opening the cache index writes to it, which can make the daemon drop
            // a block insert ("database is locked").
            std::thread::sleep(Duration::from_secs(3));
            let log = m.log_text();
            m.unmount();
            assert_eq!(
                blocks(&cache),
                "####",
                "the chunk was not filled; daemon log:\n{log}"
            );
        } else {
            std::thread::sleep(Duration::from_secs(1));
            m.unmount();
            assert_eq!(
                blocks(&cache),
                ".#..",
                "--no-fill fetched other blocks than the one read (or did not cache it)"
            );
        }
    }
}

/// Read `[off, off+len)` of `file` through the mount and check it against `data`.
fn read_ok(file: &Path, data: &[u8], off: u64, len: usize, limit: Duration) {
    let (r, took) = read_direct_bounded(file, off, len, limit);
    let got = r.unwrap_or_else(|e| panic!("read of {len} at {off} failed after {took:?}: {e}"));
    assert!(
        got == data[off as usize..off as usize + len],
        "wrong bytes at {off}..{}",
        off as usize + len
    );
}

#[test]
fn sshd_killed_mid_read_falls_over_to_the_file_mirror_and_comes_back() {
    let t = tempdir();
    let mut s = start_sshd();
    let src = t.path().join("src");
    let data = Arc::new(big_file_tree(&src, 24, 77));
    let repo = s.dir().join("repo");
    generate("both", &src, &repo);
    let mirror = t.path().join("mirror");
    copy_dir(&repo, &mirror);

    let access = Access::ssh(&s);
    let m = access.mount(
        &format!("{},{}", s.url(&repo), url(&mirror)),
        &t.path().join("mnt"),
        &t.path().join("cache"),
        &["--timeout", "10", "--concurrency", "4"],
    );
    let file = m.path("big");
    let limit = Duration::from_secs(20);
    // A reader goes through the first half of the file while the server dies under it.
    let progress = Arc::new(AtomicU64::new(0));
    let reader = {
        let (file, data, progress) = (file.clone(), data.clone(), progress.clone());
        std::thread::spawn(move || {
            let step = 256 * 1024;
            let mut off = 0u64;
            while off < 12 * MIB {
                read_ok(&file, &data, off, step, limit);
                off += step as u64;
                progress.store(off, Ordering::SeqCst);
                // Paced, so the kill lands well inside this phase.
                std::thread::sleep(Duration::from_millis(15));
            }
        })
    };
    assert!(
        wait_until(Duration::from_secs(60), || progress.load(Ordering::SeqCst)
            >= 3 * MIB),
        "the reader made no progress over ssh"
    );
    let before_kill = s.log_text().matches("Accepted publickey").count();
    assert!(before_kill >= 1, "ssh was not used:\n{}", s.log_text());
    s.kill();
    let killed_at = Instant::now();
    let at_kill = progress.load(Ordering::SeqCst);
    if let Err(p) = reader.join() {
        std::panic::resume_unwind(p);
    }
    let mut off = 12 * MIB;
    eprintln!(
        "killed sshd at {} KiB; the reader finished on the mirror {:?} later",
        at_kill / 1024,
        killed_at.elapsed()
    );
    assert!(at_kill < 12 * MIB, "the reader was done before the kill");
    let log = m.log_text();
    assert!(
        log.contains("using the next mirror"),
        "no fall-over in the daemon's log:\n{log}"
    );
    assert!(
        killed_at.elapsed() < Duration::from_secs(30),
        "reads on the mirror were slow: {:?}",
        killed_at.elapsed()
    );

    // The server comes back: after its back-off, reads go to it again.
    s.restart();
    let back = Instant::now();
    while !m.log_text().contains("healthy again") {
        assert!(
            off < 24 * MIB && back.elapsed() < Duration::from_secs(120),
            "reads never went back to ssh after it returned ({:?}); daemon log:\n{}",
            back.elapsed(),
            m.log_text()
        );
        read_ok(&file, &data, off, MIB as usize, limit);
        off += MIB;
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!("back on ssh {:?} after its restart", back.elapsed());
    // And the server saw a new login for it.
    assert!(
        s.log_text().matches("Accepted publickey").count() > before_kill,
        "no new SSH login after the restart:\n{}",
        s.log_text()
    );
    // The rest of the file still reads right.
    while off < 24 * MIB {
        read_ok(&file, &data, off, MIB as usize, limit);
        off += MIB;
    }
    m.unmount();
}

/// A mount over ssh alone with `--timeout 5`; the server dies (or freezes) mid-read: reads of
/// uncached data fail with EIO within the bound, never hang, and the same read succeeds on the
/// same mount once the server is back.
fn dead_source_eio_then_recovery(freeze: bool) {
    let t = tempdir();
    let mut s = start_sshd();
    let src = t.path().join("src");
    let data = big_file_tree(&src, 6, 99);
    let repo = s.dir().join("repo");
    generate("lonely", &src, &repo);
    let cache = t.path().join("cache");
    let m = Access::ssh(&s).mount(
        &s.url(&repo),
        &t.path().join("mnt"),
        &cache,
        &["--timeout", "5"],
    );
    let file = m.path("big");
    let bound = Duration::from_secs(20);
    read_ok(&file, &data, 0, MIB as usize, bound);

    if freeze {
        s.freeze();
    } else {
        s.kill();
    }
    let (r, took) = read_direct_bounded(&file, 3 * MIB + 4096, 8192, bound);
    let e = r.expect_err("a read from a dead source must fail");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(took < bound, "EIO took {took:?}");
    eprintln!(
        "{}: EIO after {took:?}",
        if freeze { "frozen" } else { "killed" }
    );
    // Cached data still reads while the source is down.
    read_ok(&file, &data, 0, MIB as usize, bound);

    if freeze {
        s.thaw();
    } else {
        s.restart();
    }
    let recovered = Instant::now();
    read_ok(&file, &data, 3 * MIB + 4096, 8192, bound);
    eprintln!("recovered in {:?}", recovered.elapsed());
    compare_trees(&src, &m.mountpoint, false);
    m.unmount();
    cache_verify_clean(&cache);
}

#[test]
fn killed_source_without_mirror_gives_eio_in_bounded_time_then_recovers() {
    dead_source_eio_then_recovery(false);
}

#[test]
fn frozen_source_without_mirror_gives_eio_in_bounded_time_then_recovers() {
    dead_source_eio_then_recovery(true);
}

#[test]
fn a_chunk_corrupted_on_the_ssh_server_is_eio_and_never_cached() {
    let t = tempdir();
    let s = start_sshd();
    let src = t.path().join("src");
    let data = big_file_tree(&src, 4, 5);
    let repo = s.dir().join("repo");
    Access::ssh(&s).generate("bad", &src, &s.url(&repo));
    // Large files are cut at fixed offsets: one chunk object holds exactly big[1M..2M].
    let second = &data[MIB as usize..2 * MIB as usize];
    let victim = files_under(&repo.join("chunks"))
        .into_iter()
        .find(|p| std::fs::read(p).unwrap() == second)
        .expect("a chunk object holding big[1M..2M]");
    let chunk_hex = victim.file_name().unwrap().to_string_lossy().into_owned();
    let mut on_disk = std::fs::read(&victim).unwrap();
    on_disk[300_000] ^= 0x40;
    std::fs::write(&victim, &on_disk).unwrap();

    let cache = t.path().join("cache");
    let m = Access::ssh(&s).mount(&s.url(&repo), &t.path().join("mnt"), &cache, &[]);
    let file = m.path("big");
    let bound = Duration::from_secs(20);
    for k in 0..4u64 {
        let (r, _) = read_direct_bounded(&file, k * MIB, MIB as usize, bound);
        if k == 1 {
            let e = r.expect_err("the corrupted chunk must not read");
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
        } else {
            let got = r.unwrap_or_else(|e| panic!("intact chunk {k} failed: {e}"));
            assert!(got == data[(k * MIB) as usize..((k + 1) * MIB) as usize]);
        }
    }
    // Again: nothing bad was kept. (A small read is served from verified 16 KiB pieces, so it
    // must touch the corrupted piece to fail; an intact piece of the block reads fine.)
    let (r, _) = read_direct_bounded(&file, MIB + 300_000 - 50, 100, bound);
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(
        wait_until(Duration::from_secs(5), || m
            .log_text()
            .contains(&chunk_hex[..12])),
        "the daemon's log does not name chunk {chunk_hex}:\n{}",
        m.log_text()
    );
    m.unmount();
    cache_verify_clean(&cache);
    let out = horcrux(&[
        os("cache"),
        os("inspect"),
        os(&chunk_hex),
        os("--cache-dir"),
        cache.as_os_str(),
    ]);
    if out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout);
        let map = text
            .lines()
            .find(|l| l.starts_with("blocks"))
            .unwrap_or_default();
        assert!(!map.contains('#'), "a corrupted block was cached:\n{text}");
    }
}

/// Assert `text` contains every one of `needles`.
#[track_caller]
fn says(text: &str, needles: &[&str]) {
    eprintln!("--- {}", text.trim_end());
    for n in needles {
        assert!(text.contains(n), "expected {n:?} in:\n{text}");
    }
}

#[test]
fn clear_errors_for_ssh_sources() {
    let t = tempdir();
    let s = start_sshd();
    let src = t.path().join("src");
    small_tree(&src, 11);
    let repo = s.dir().join("repo");
    generate("v", &src, &repo);
    let good = Access::ssh(&s);
    let cache = t.path().join("cache");
    let mp = |n: &str| t.path().join(n);

    // A bad URL part: named, before anything is started.
    let e = good.mount_fails("ssh://u@h:99999/p", &mp("m1"), &cache, &[]);
    says(&e, &["99999", "port"]);
    let e = good.fails(&[
        os("generate"),
        os("x"),
        src.as_os_str(),
        os("ssh://u@h:99999/p"),
    ]);
    says(&e, &["99999", "port"]);
    let e = good.mount_fails("ssh://root@127.0.0.1:22", &mp("m1"), &cache, &[]);
    says(&e, &["path"]);

    // Nothing listens there.
    let closed = sshd::free_port();
    let e = good.mount_fails(
        &format!("ssh://root@127.0.0.1:{closed}/srv/repo"),
        &mp("m2"),
        &cache,
        &["--timeout", "5"],
    );
    says(&e, &[&format!("127.0.0.1:{closed}"), "refused"]);

    // A key the server does not accept.
    let stranger = sshd::keygen(&t.path().join("stranger"), "ed25519", "");
    let e = Access::default()
        .flag("--identity")
        .flag(&stranger)
        .flag("--known-hosts")
        .flag(&s.known_hosts)
        .mount_fails(&s.url(&repo), &mp("m3"), &cache, &[]);
    says(&e, &["authentication as", "refused"]);

    // A host whose key is not known: says how to accept it.
    let empty = t.path().join("known_hosts");
    std::fs::write(&empty, "").unwrap();
    let unknown = Access::default()
        .flag("--identity")
        .flag(&s.client_key)
        .flag("--known-hosts")
        .flag(&empty);
    let e = unknown.mount_fails(&s.url(&repo), &mp("m4"), &cache, &[]);
    says(&e, &["not known", "ssh-keyscan", &s.port.to_string()]);
    let e = unknown.fails(&[
        os("generate"),
        os("x"),
        src.as_os_str(),
        os(&s.url(&t.path().join("elsewhere"))),
    ]);
    // generate honours --known-hosts like every other command.
    says(
        &e,
        &["not known", "ssh-keyscan", &empty.display().to_string()],
    );
    // ... and a changed key is refused loudly.
    let other_host = sshd::keygen(&t.path().join("other_host"), "ed25519", "");
    let changed = t.path().join("known_hosts_changed");
    std::fs::write(
        &changed,
        format!("[127.0.0.1]:{} {}\n", s.port, sshd::public_key(&other_host)),
    )
    .unwrap();
    let e = Access::default()
        .flag("--identity")
        .flag(&s.client_key)
        .flag("--known-hosts")
        .flag(&changed)
        .mount_fails(&s.url(&repo), &mp("m5"), &cache, &[]);
    says(&e, &["HOST KEY", "CHANGED"]);

    // A path with no repository.
    let missing = s.dir().join("no/such/repo");
    let e = good.mount_fails(&s.url(&missing), &mp("m6"), &cache, &[]);
    says(&e, &[&missing.display().to_string()]);
    assert!(
        e.contains("not a horcrux repository") || e.contains("does not exist"),
        "{e}"
    );
    // A server that accepts connections but never answers: the mount gives up in time.
    s.freeze();
    let started = Instant::now();
    let e = good.mount_fails(&s.url(&repo), &mp("m7"), &cache, &["--timeout", "2"]);
    let took = started.elapsed();
    s.thaw();
    // Either the fetch's bound ("no answer within 2s") or, when the SSH handshake itself is
    // what hangs, the SSH call's bound (the mirror attempt time) speaks first.
    assert!(
        e.contains("no answer within") || e.contains("no answer from the SSH server in time"),
        "{e}"
    );
    assert!(
        took < Duration::from_secs(15),
        "a frozen server held mount for {took:?}"
    );
    // No mount daemon is left behind by any of these.
    for n in ["m1", "m2", "m3", "m4", "m5", "m6", "m7"] {
        assert!(!is_mounted(&mp(n)));
    }
}

#[test]
fn clear_errors_for_s3_and_repositories() {
    let t = tempdir();
    let s3 = start_moto("exists");
    let access = Access::default().with_s3(&s3);
    let cache = t.path().join("cache");
    let mp = |n: &str| t.path().join(n);

    let e = access.mount_fails(&s3_url(&s3, "nosuchbucket/repo"), &mp("m1"), &cache, &[]);
    says(&e, &["nosuchbucket", "does not exist"]);
    let e = access.mount_fails(&s3_url(&s3, "exists/empty"), &mp("m2"), &cache, &[]);
    says(&e, &["not a horcrux repository"]);

    // A repository of another format version.
    let src = t.path().join("src");
    small_tree(&src, 21);
    let repo = t.path().join("repo");
    generate("one", &src, &repo);
    let cfg_path = repo.join("horcrux.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["version"] = 99.into();
    std::fs::write(&cfg_path, serde_json::to_vec(&v).unwrap()).unwrap();
    let e = access.mount_fails(&url(&repo), &mp("m3"), &cache, &[]);
    says(&e, &["format version 99", "upgrade"]);
    std::fs::write(&cfg_path, cfg).unwrap();

    // Two volumes and no --name.
    generate("two", &src, &repo);
    let e = access.mount_fails(&url(&repo), &mp("m4"), &cache, &[]);
    says(&e, &["several volumes", "one", "two", "--name"]);
    let e = access.mount_fails(&url(&repo), &mp("m5"), &cache, &["--name", "three"]);
    says(&e, &["no volume named `three`", "one, two"]);
    let m = access.mount(&url(&repo), &mp("m6"), &cache, &["--name", "two"]);
    compare_trees(&src, &m.mountpoint, false);
    m.unmount();

    // Mount flags are checked before anything starts.
    let e = access.mount_fails(&url(&repo), &mp("m7"), &cache, &["--timeout", "0"]);
    says(&e, &["not a timeout"]);
    let e = access.mount_fails(&url(&repo), &mp("m7"), &cache, &["--concurrency", "0"]);
    says(&e, &["--concurrency"]);
}

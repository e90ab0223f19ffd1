//! The fault matrix, full disks (issue 9): a small loop-mounted ext4 filesystem as the cache
//! directory while a mount fetches, and as the overlay directory while it is written.
//!
//! - Cache full: reads are still served, with the right bytes, from the source (decided and
//!   documented in docs/RELIABILITY.md: a read never fails because the cache cannot store);
//!   the daemon's log says which directory is full and what to do; the cache stays
//!   consistent (`horcrux cache verify` is clean); once space is freed, the same mount caches
//!   again (no remount), and the cached bytes then serve with the source gone.
//! - Overlay full: the writer gets ENOSPC; the log names the overlay directory; everything
//!   fsync-acknowledged before reads back; once space is freed, the same mount takes writes
//!   again; after a remount every acknowledged byte is there.
//!
//! Run as root (loop devices, FUSE).

mod common;
#[path = "support/loopfs.rs"]
mod loopfs;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;
use loopfs::LoopFs;

#[test]
fn cache_disk_full_serves_from_the_source_and_recovers_without_remount() {
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let big = bytes(41, 40 * MIB as usize);
    fs::write(src.join("big"), &big).unwrap();
    fs::write(src.join("small"), b"small file\n").unwrap();
    let repo = t.path().join("repo");
    generate("full", &src, &repo);

    let lfs = LoopFs::new(t.path(), 64);
    let cache = lfs.root.join("cache");
    let m = Mount::new(&repo, &t.path().join("mnt"), &cache, &["--read-only"]);
    // Leave room for a few blocks only: most inserts fail with ENOSPC.
    lfs.fill_leaving(3 * MIB);
    let got = read_direct(&m.path("big"), 0, big.len()).expect("read with the cache disk full");
    assert!(
        got == big,
        "wrong bytes served while the cache disk was full"
    );
    assert_eq!(fs::read(m.path("small")).unwrap(), b"small file\n");
    let full_log = |m: &Mount| {
        let l = m.log_text();
        l.contains(&format!("cache directory {} is full", cache.display()))
            && l.contains("--cache-size")
    };
    assert!(
        wait_until(Duration::from_secs(10), || full_log(&m)),
        "no log line saying the cache directory is full:\n{}",
        m.log_text()
    );
    // Rate-limited: one line, not one per block.
    let lines = m.log_text().matches("is full").count();
    assert!(lines <= 3, "{lines} full-disk lines: not rate-limited");
    let cached_while_full = cached_blocks(&cache);
    assert!(
        cached_while_full < 40,
        "{cached_while_full} blocks cached on a nearly full disk?"
    );
    // Nothing half-written is indexed.
    cache_verify_clean(&cache);

    // Space comes back: the same mount caches again.
    lfs.unfill();
    let got = read_direct(&m.path("big"), 0, big.len()).expect("read after space was freed");
    assert!(got == big);
    assert!(
        wait_until(Duration::from_secs(30), || cached_blocks(&cache) >= 40),
        "blocks not cached after space was freed ({} cached); log:\n{}",
        cached_blocks(&cache),
        m.log_text()
    );
    assert!(
        m.log_text().contains("caching resumed"),
        "no log line saying caching resumed:\n{}",
        m.log_text()
    );
    // They are the right bytes: served with the source gone.
    fs::rename(repo.join("chunks"), repo.join("chunks.away")).unwrap();
    let got = read_direct(&m.path("big"), 0, big.len()).expect("read from the cache alone");
    assert!(got == big, "cached bytes differ");
    fs::rename(repo.join("chunks.away"), repo.join("chunks")).unwrap();
    m.unmount();
    cache_verify_clean(&cache);

    // Mounting another volume needs its manifest in the cache: with no space at all, the
    // mount fails naming the cache directory (not the repository) and what to do.
    let src2 = t.path().join("src2");
    fs::create_dir_all(&src2).unwrap();
    for i in 0..200 {
        fs::write(src2.join(format!("f{i}")), format!("file {i}\n")).unwrap();
    }
    let repo2 = t.path().join("repo2");
    generate("other", &src2, &repo2);
    lfs.fill_all();
    let mnt2 = t.path().join("mnt2");
    fs::create_dir_all(&mnt2).unwrap();
    let out = horcrux(&[
        "mount".as_ref(),
        url(&repo2).as_ref(),
        mnt2.as_os_str(),
        "--cache-dir".as_ref(),
        cache.as_os_str(),
        "--read-only".as_ref(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mounted with a full cache disk");
    assert!(
        err.contains(&format!("cache directory {} is full", cache.display()))
            && err.contains("horcrux cache prune"),
        "unclear error for a full cache disk at mount:\n{err}"
    );
    assert!(!is_mounted(&mnt2));
    lfs.unfill();
    let m2 = Mount::new(&repo2, &mnt2, &cache, &["--read-only"]);
    assert_eq!(fs::read_to_string(m2.path("f7")).unwrap(), "file 7\n");
    m2.unmount();
    cache_verify_clean(&cache);
}

#[test]
fn overlay_disk_full_refuses_with_enospc_keeps_acknowledged_data_and_recovers() {
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("base"), bytes(3, 2 * MIB as usize)).unwrap();
    let repo = t.path().join("repo");
    generate("ofull", &src, &repo);

    let lfs = LoopFs::new(t.path(), 64);
    let overlay = lfs.root.join("overlay");
    let cache = t.path().join("cache");
    let mnt = t.path().join("mnt");
    let ov = overlay.to_str().unwrap();
    let m = Mount::new(&repo, &mnt, &cache, &["--overlay-dir", ov]);
    lfs.fill_leaving(20 * MIB);

    // An acknowledged file first.
    let a = bytes(7, 4 * MIB as usize);
    {
        let mut f = File::create(m.path("a")).unwrap();
        f.write_all(&a).unwrap();
        f.sync_all().unwrap();
    }
    // Then write until the overlay's disk is full, fsync'ing every MiB.
    let piece = MIB as usize;
    let mut acked = 0usize;
    let mut written = Vec::new();
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("big"))
        .unwrap();
    let err = loop {
        let data = bytes(100 + (acked / piece) as u64, piece);
        let r = f
            .write_all_at(&data, acked as u64)
            .and_then(|()| f.sync_data());
        match r {
            Ok(()) => {
                written.extend_from_slice(&data);
                acked += piece;
                assert!(
                    acked <= 64 * MIB as usize,
                    "64 MiB written to a 20 MiB space"
                );
            }
            Err(e) => break e,
        }
    };
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOSPC),
        "a full overlay disk must answer ENOSPC, got {err}"
    );
    assert!(acked >= 4 * MIB as usize, "only {acked} bytes fitted");
    assert!(
        wait_until(Duration::from_secs(5), || m.log_text().contains(&format!(
            "overlay directory {} is full",
            overlay.display()
        ))),
        "no log line naming the full overlay directory:\n{}",
        m.log_text()
    );
    // Everything acknowledged reads back, on the same mount.
    assert!(fs::read(m.path("a")).unwrap() == a, "a changed");
    let got = fs::read(m.path("big")).unwrap();
    assert!(
        got.len() >= acked && got[..acked] == written[..],
        "acknowledged bytes of big differ after ENOSPC"
    );
    assert!(fs::read(m.path("base")).unwrap() == bytes(3, 2 * MIB as usize));

    // Space comes back: the same mount takes writes again, no remount.
    lfs.unfill();
    let more = bytes(999, 8 * MIB as usize);
    f.write_all_at(&more, acked as u64)
        .and_then(|()| f.sync_all())
        .expect("write after space was freed");
    written.truncate(acked);
    written.extend_from_slice(&more);
    fs::write(m.path("c"), b"after recovery\n").unwrap();
    File::open(m.path("c")).unwrap().sync_all().unwrap();
    drop(f);
    let log = m.log_text();
    m.unmount();

    // Remount: every acknowledged byte is there.
    let m = Mount::new(&repo, &mnt, &cache, &["--overlay-dir", ov]);
    assert!(fs::read(m.path("a")).unwrap() == a, "a lost after remount");
    let got = fs::read(m.path("big")).unwrap();
    assert!(
        got.len() >= written.len() && got[..written.len()] == written[..],
        "big: acknowledged bytes lost after remount ({} bytes read, {} acknowledged); log before:\n{log}",
        got.len(),
        written.len()
    );
    assert_eq!(fs::read(m.path("c")).unwrap(), b"after recovery\n");
    m.unmount();
}

//! Faults through the kernel: a corrupted chunk in the repository reads as EIO and is never
//! cached; `kill -9` of the mount daemon in the middle of reads leaves a cache that
//! `horcrux cache verify` finds clean.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;

fn open_direct(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn corrupted_chunk_reads_as_eio_and_is_never_cached() {
    let t = tempdir();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let big = bytes(5, 5 * MIB as usize);
    std::fs::write(src.join("big"), &big).unwrap();
    std::fs::write(src.join("other"), b"unrelated\n").unwrap();
    let repo = t.path().join("repo");
    generate("corrupt", &src, &repo);

    // Large files are cut at fixed offsets: the second chunk of `big` is a chunk object
    // holding exactly big[1M..2M]. Flip one byte in the middle of it.
    let second = &big[MIB as usize..2 * MIB as usize];
    let victim = files_under(&repo.join("chunks"))
        .into_iter()
        .find(|p| std::fs::metadata(p).unwrap().len() == MIB && std::fs::read(p).unwrap() == second)
        .expect("a chunk object holding big[1M..2M]");
    let chunk_hex = victim.file_name().unwrap().to_string_lossy().into_owned();
    let mut bytes_on_disk = std::fs::read(&victim).unwrap();
    bytes_on_disk[500_000] ^= 0x55;
    std::fs::write(&victim, &bytes_on_disk).unwrap();

    let cache = t.path().join("cache");
    let m = Mount::new(&repo, &t.path().join("mnt"), &cache, &[]);
    let f = open_direct(&m.path("big"));
    let mut buf = vec![0u8; MIB as usize];
    for k in 0..5u64 {
        let r = f.read_at(&mut buf, k * MIB);
        if k == 1 {
            let e = r.expect_err("reading the corrupted chunk must fail");
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
        } else {
            let n = r.unwrap_or_else(|e| panic!("chunk {k} is intact but failed: {e}"));
            assert_eq!(n, MIB as usize);
            assert!(
                buf == big[(k * MIB) as usize..((k + 1) * MIB) as usize],
                "chunk {k}"
            );
        }
    }
    // A small read of the corrupted 16 KiB piece fails too, again (nothing bad was kept); a
    // small read of an intact piece of that block is served from that piece, verified against
    // the block hash through the piece outboard (FORMAT.md §3a). A buffered read of the whole
    // file fails rather than returning wrong bytes.
    for off in [MIB + 500_000 - 5, MIB + 500_000] {
        let e = f.read_at(&mut buf[..10], off).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "at {off}: {e}");
    }
    // While a fetch of the whole (corrupted) block is in flight — the background fill of the
    // chunk asks for it again — a small read joins that flight and fails with it; once no fetch
    // of it is running, the read is served from its verified piece. Never wrong bytes.
    for off in [MIB, 2 * MIB - 10] {
        let served = wait_until(Duration::from_secs(10), || {
            match f.read_at(&mut buf[..10], off) {
                Ok(n) => {
                    assert_eq!(&buf[..n], &big[off as usize..off as usize + n], "at {off}");
                    true
                }
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EIO), "at {off}: {e}");
                    false
                }
            }
        });
        assert!(served, "an intact piece at {off} was never served");
    }
    let e = std::fs::read(m.path("big")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // Other data is unaffected.
    assert_eq!(std::fs::read(m.path("other")).unwrap(), b"unrelated\n");
    // The daemon's log names the chunk.
    assert!(
        wait_until(Duration::from_secs(5), || m
            .log_text()
            .contains(&chunk_hex[..12])),
        "the log does not name chunk {chunk_hex}:\n{}",
        m.log_text()
    );
    drop(f);
    m.unmount();

    cache_verify_clean(&cache);
    // The bad chunk has no block in the cache.
    let out = horcrux(&[
        "cache".as_ref(),
        "inspect".as_ref(),
        chunk_hex.as_ref(),
        "--cache-dir".as_ref(),
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

#[test]
fn kill_9_during_reads_leaves_a_clean_cache() {
    let t = tempdir();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..4u64)
        .map(|i| (format!("f{i}"), bytes(100 + i, 6 * MIB as usize + 1234)))
        .collect();
    for (n, d) in &files {
        std::fs::write(src.join(n), d).unwrap();
    }
    for i in 0..300u64 {
        std::fs::write(
            src.join(format!("s{i:03}")),
            bytes(i, 1000 + i as usize * 13),
        )
        .unwrap();
    }
    let repo = t.path().join("repo");
    generate("killme", &src, &repo);
    let cache = t.path().join("cache");
    let mnt = t.path().join("mnt");
    let files = Arc::new(files);

    for (round, delay_ms) in [30u64, 120, 300, 700].into_iter().enumerate() {
        let m = Mount::new(&repo, &mnt, &cache, &[]);
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..8usize)
            .map(|r| {
                let (files, stop, mp) = (files.clone(), stop.clone(), m.mountpoint.clone());
                std::thread::spawn(move || -> Option<i32> {
                    let (name, data) = &files[r % files.len()];
                    // On a loaded machine the kill may come before this open: it fails like
                    // a read would.
                    let f = match OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_DIRECT)
                        .open(mp.join(name))
                    {
                        Ok(f) => f,
                        Err(e) => return e.raw_os_error(),
                    };
                    let mut buf = vec![0u8; 256 << 10];
                    let mut off = (r as u64 * 777_777) % data.len() as u64;
                    while !stop.load(Ordering::Relaxed) {
                        match f.read_at(&mut buf, off) {
                            Ok(n) => {
                                // Whatever is served before the kill must be right.
                                assert!(
                                    buf[..n] == data[off as usize..off as usize + n],
                                    "round {round} reader {r}: wrong bytes at {off}"
                                );
                                off = (off + n as u64 + 4096) % data.len() as u64;
                            }
                            Err(e) => return e.raw_os_error(),
                        }
                        // Small files too: metadata and packed chunks.
                        let _ = std::fs::read(mp.join(format!("s{:03}", off % 300)));
                    }
                    None
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(delay_ms));
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(m.pid as i32, libc::SIGKILL) }, 0);
        assert!(
            wait_until(Duration::from_secs(10), || !alive(m.pid)),
            "daemon survived SIGKILL"
        );
        // Readers must not hang on the dead mount: they get an error and stop.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let errs: Vec<_> = readers.into_iter().map(|h| h.join()).collect();
            let _ = tx.send(errs);
        });
        let errs = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("readers hung on a dead mount");
        stop.store(true, Ordering::Relaxed);
        for (r, e) in errs.into_iter().enumerate() {
            let e = e.unwrap_or_else(|_| panic!("round {round} reader {r} panicked"));
            assert!(
                matches!(
                    e,
                    Some(libc::ENOTCONN) | Some(libc::EIO) | Some(libc::ECONNABORTED)
                ),
                "round {round} reader {r}: unexpected error {e:?}"
            );
        }
        // The dead mount is cleaned up as a user would.
        let st = std::process::Command::new("fusermount3")
            .arg("-uz")
            .arg(&m.mountpoint)
            .status()
            .unwrap();
        assert!(st.success(), "fusermount3 -uz failed");
        assert!(!is_mounted(&m.mountpoint));
        // Its daemon is dead and its mount gone: nothing left for the guard to clean.
        let mut m = m;
        m.pid = 0;
        let _ = std::fs::remove_file(&m.log);
        drop(m);
        cache_verify_clean(&cache);
    }

    // And the cache built across the kills serves the right bytes.
    let m = Mount::new(&repo, &mnt, &cache, &[]);
    for (n, d) in files.iter() {
        assert!(
            std::fs::read(m.path(n)).unwrap() == *d,
            "{n} differs after the kills"
        );
    }
    compare_trees(&src, &m.mountpoint, false);
    m.unmount();
    cache_verify_clean(&cache);
}

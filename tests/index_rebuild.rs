//! The fault matrix, the cache index lost (issue 9): `index.sqlite` deleted, overwritten with
//! garbage, or truncated. The next opener — a `horcrux cache` command or a mount — rebuilds it
//! from the cache directory (every block re-verified), says so in its log, and works; the
//! blocks that were cached serve again with the source's chunks gone, and a block corrupted
//! on disk meanwhile is dropped, not served.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// `horcrux cache ARGS --cache-dir DIR`: status, stdout, stderr (the log).
fn cache_cmd(cache: &Path, args: &[&str]) -> (bool, String, String) {
    let o = Command::new(horcrux_bin())
        .arg("cache")
        .args(args)
        .arg("--cache-dir")
        .arg(cache)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A way to damage the index file.
type Damage = &'static dyn Fn(&Path);

fn chunk_files(cache: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in fs::read_dir(cache.join("chunks")).unwrap().flatten() {
        for f in fs::read_dir(sub.path()).unwrap().flatten() {
            out.push(f.path());
        }
    }
    out.sort();
    out
}

#[test]
fn deleted_garbage_or_truncated_index_is_rebuilt_by_a_scan() {
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let big = bytes(77, 6 * MIB as usize);
    fs::write(src.join("big"), &big).unwrap();
    for i in 0..20 {
        fs::write(src.join(format!("s{i}")), bytes(i, 1000 + i as usize * 37)).unwrap();
    }
    let repo = t.path().join("repo");
    generate("idx", &src, &repo);
    let cache = t.path().join("cache");
    let mnt = t.path().join("mnt");

    // Cache everything.
    let m = Mount::new(&repo, &mnt, &cache, &["--read-only", "--no-profile"]);
    for i in 0..20 {
        assert_eq!(
            fs::read(m.path(&format!("s{i}"))).unwrap(),
            bytes(i, 1000 + i as usize * 37)
        );
    }
    assert!(read_direct(&m.path("big"), 0, big.len()).unwrap() == big);
    m.unmount();
    let first = cached_blocks(&cache);
    assert!(first >= 7, "only {first} blocks cached");

    let index = cache.join("index.sqlite");
    let damages: [(&str, Damage); 4] = [
        ("deleted", &|p| fs::remove_file(p).unwrap()),
        ("garbage", &|p| {
            let len = fs::metadata(p).unwrap().len() as usize;
            fs::write(p, bytes(5, len)).unwrap();
        }),
        ("truncated", &|p| {
            let len = fs::metadata(p).unwrap().len();
            OpenOptions::new()
                .write(true)
                .open(p)
                .unwrap()
                .set_len(len / 3)
                .unwrap();
        }),
        ("emptied", &|p| {
            OpenOptions::new()
                .write(true)
                .open(p)
                .unwrap()
                .set_len(0)
                .unwrap();
        }),
    ];
    for (i, (what, damage)) in damages.iter().enumerate() {
        let before = cached_blocks(&cache);
        damage(&index);
        // In the last round, also flip a byte of one cached chunk file: that block must go.
        let corrupted = if i == damages.len() - 1 {
            let victim = chunk_files(&cache)
                .into_iter()
                .max_by_key(|p| fs::metadata(p).unwrap().len())
                .unwrap();
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&victim)
                .unwrap();
            let mut b = [0u8; 1];
            f.read_at(&mut b, 1234).unwrap();
            f.write_all_at(&[!b[0]], 1234).unwrap();
            true
        } else {
            false
        };
        // The first opener rebuilds: a mount in one round, `horcrux cache stats` in the others.
        let early_mount = if *what == "truncated" {
            let m = Mount::new(&repo, &mnt, &cache, &["--read-only", "--no-profile"]);
            assert!(
                m.log_text()
                    .contains("rebuilt it by scanning the cache directory"),
                "no rebuild log line from the mount after the index was {what}:\n{}",
                m.log_text()
            );
            Some(m)
        } else {
            let (ok, out, log) = cache_cmd(&cache, &["stats"]);
            assert!(ok, "cache stats after the index was {what}:\n{out}\n{log}");
            assert!(
                log.contains("rebuilt it by scanning the cache directory"),
                "no rebuild log line after the index was {what}:\n{log}"
            );
            assert!(
                out.contains("manifests    1"),
                "{what}: manifest row lost:\n{out}"
            );
            None
        };
        let after = cached_blocks(&cache);
        let want = if corrupted { before - 1 } else { before };
        assert_eq!(after, want, "{what}: blocks kept by the rebuild");
        // The rebuilt index is consistent, and not rebuilt again.
        cache_verify_clean(&cache);
        let (ok, _, log) = cache_cmd(&cache, &["ls"]);
        assert!(
            ok && !log.contains("rebuilt"),
            "{what}: rebuilt twice:\n{log}"
        );

        // A mount works on it; cached blocks serve with the source's chunks gone.
        let m = early_mount
            .unwrap_or_else(|| Mount::new(&repo, &mnt, &cache, &["--read-only", "--no-profile"]));
        fs::rename(repo.join("chunks"), repo.join("chunks.away")).unwrap();
        let cached_part = read_direct(&m.path("big"), 0, big.len());
        let smalls: Vec<_> = (0..20)
            .map(|i| fs::read(m.path(&format!("s{i}"))))
            .collect();
        fs::rename(repo.join("chunks.away"), repo.join("chunks")).unwrap();
        if corrupted {
            // One of big's blocks was flipped: it was dropped, and with the source gone it
            // cannot be read; nothing wrong is served.
            assert!(
                cached_part
                    .as_ref()
                    .is_err_and(|e| e.raw_os_error() == Some(libc::EIO)),
                "{what}: corrupted block not dropped: {:?}",
                cached_part.as_ref().map(|b| b == &big)
            );
        } else {
            assert!(
                cached_part.unwrap() == big,
                "{what}: cached part of big after the rebuild"
            );
        }
        for (i, s) in smalls.into_iter().enumerate() {
            assert_eq!(
                s.unwrap_or_else(|e| panic!("{what}: s{i} from the cache: {e}")),
                bytes(i as u64, 1000 + i * 37)
            );
        }
        // With the source back, everything reads right (the dropped block is fetched again).
        assert!(read_direct(&m.path("big"), 0, big.len()).unwrap() == big);
        m.unmount();
        assert_eq!(
            cached_blocks(&cache),
            before,
            "{what}: not all cached again"
        );
    }
    let aside = fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".damaged-"))
        .count();
    assert_eq!(
        aside, 1,
        "the latest damaged index is kept aside, older ones removed"
    );
}

#[test]
fn concurrent_openers_of_a_damaged_index_rebuild_it_once() {
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("big"), bytes(8, 3 * MIB as usize)).unwrap();
    let repo = t.path().join("repo");
    generate("once", &src, &repo);
    let cache = t.path().join("cache");
    let m = Mount::new(
        &repo,
        &t.path().join("mnt"),
        &cache,
        &["--read-only", "--no-profile"],
    );
    assert_eq!(fs::read(m.path("big")).unwrap(), bytes(8, 3 * MIB as usize));
    m.unmount();
    let before = cached_blocks(&cache);
    let index = cache.join("index.sqlite");
    let len = fs::metadata(&index).unwrap().len() as usize;
    fs::write(&index, bytes(9, len)).unwrap();
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let cache = cache.clone();
            std::thread::spawn(move || cache_cmd(&cache, &["stats"]))
        })
        .collect();
    let results: Vec<_> = runs.into_iter().map(|r| r.join().unwrap()).collect();
    for (ok, out, log) in &results {
        assert!(ok, "{out}\n{log}");
    }
    let rebuilt = results
        .iter()
        .filter(|(_, _, log)| log.contains("rebuilt it by scanning"))
        .count();
    assert_eq!(rebuilt, 1, "{results:#?}");
    assert_eq!(cached_blocks(&cache), before);
    cache_verify_clean(&cache);
}

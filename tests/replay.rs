//! Record-and-replay prefetch (issue 8 part 4) over SSH (the loopback OpenSSH server of the
//! other remote tests) with the kernel's FUSE: a scripted start-up read pattern on mount 1
//! leaves a profile in the repository; mount 2, on a fresh cache (another host), prefetches
//! exactly those blocks in that order before anything reads them (the SSH server is then
//! stopped and the pattern still reads, while a block outside the profile does not); a later
//! version replays what it still shares; corrupt and foreign profiles are refused with a log
//! line and nothing breaks; `--no-profile`, `--record-profile 0` and `--no-replay` work; a
//! repository the SSH server can only read keeps the profile in the local cache.
//!
//! Build the binary first: `cargo build --workspace`. Needs sshd (tests/setup.sh).

mod common;
#[path = "support/remote.rs"]
mod remote;
#[path = "support/s3server.rs"]
mod s3server;
#[path = "support/sshd.rs"]
mod sshd;

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use horcrux::ids::{ChunkId, ProfileId};
use horcrux::profile::Profile;
use remote::*;
use sshd::Sshd;

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// The tree: files of whole MiBs, so with 1 MiB chunks (and blocks) every MiB of a file is
/// one chunk whose id is the blake3 of those bytes.
fn tree(root: &Path) -> Vec<(&'static str, Vec<u8>)> {
    let files = vec![
        ("bin/app", bytes(11, 3 * MIB as usize)),
        ("lib/libx.so", bytes(12, 2 * MIB as usize)),
        ("data/db", bytes(13, 8 * MIB as usize)),
        ("unused/big", bytes(14, 4 * MIB as usize)),
    ];
    for (p, d) in &files {
        let p = root.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, d).unwrap();
    }
    files
}

fn data<'a>(files: &'a [(&str, Vec<u8>)], name: &str) -> &'a [u8] {
    &files.iter().find(|(p, _)| *p == name).unwrap().1
}

fn chunk_of(files: &[(&str, Vec<u8>)], name: &str, mib: usize) -> ChunkId {
    let d = data(files, name);
    ChunkId::of(&d[mib * MIB as usize..(mib + 1) * MIB as usize])
}

/// The scripted start-up: the binary whole, three 4 KiB reads of the database at scattered
/// offsets, then the library whole. Returns the chunks it reads, step by step (the kernel may
/// send the requests of one whole-file read in any order; steps are sequential).
fn start_up(mnt: &Mount, files: &[(&str, Vec<u8>)]) -> Vec<Vec<ChunkId>> {
    let mut order = Vec::new();
    let got = std::fs::read(mnt.path("bin/app")).unwrap();
    assert!(got == data(files, "bin/app"));
    order.push((0..3).map(|i| chunk_of(files, "bin/app", i)).collect());
    let db = std::fs::File::open(mnt.path("data/db")).unwrap();
    for mib in [5usize, 1, 7] {
        let mut buf = vec![0u8; 4096];
        let off = mib as u64 * MIB + 12_345;
        db.read_exact_at(&mut buf, off).unwrap();
        assert!(buf == data(files, "data/db")[off as usize..off as usize + 4096]);
        order.push(vec![chunk_of(files, "data/db", mib)]);
    }
    let mut lib = Vec::new();
    std::fs::File::open(mnt.path("lib/libx.so"))
        .unwrap()
        .read_to_end(&mut lib)
        .unwrap();
    assert!(lib == data(files, "lib/libx.so"));
    order.push((0..2).map(|i| chunk_of(files, "lib/libx.so", i)).collect());
    order
}

/// The profile the repository holds for its only recorded version of `v`.
fn stored_profile(repo: &Path, volume: &str) -> Option<(String, Profile)> {
    let dir = repo.join("volumes").join(volume).join("profiles");
    let ptr = std::fs::read_dir(&dir).ok()?.next()?.unwrap().path();
    let id: ProfileId = std::fs::read_to_string(&ptr)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let bytes = std::fs::read(repo.join("profiles").join(id.to_hex())).unwrap();
    assert_eq!(ProfileId::of(&bytes), id, "a profile is named by its hash");
    let name = ptr.file_name().unwrap().to_string_lossy().into_owned();
    Some((name, Profile::decode("test", &bytes).unwrap()))
}

/// `replay: block seq=N chunk=ID block=B` lines of a daemon's debug log, in seq order.
fn replayed(log: &str) -> Vec<(ChunkId, u32)> {
    let mut v: Vec<(u64, ChunkId, u32)> = log
        .lines()
        .filter(|l| l.contains("replay: block seq="))
        .map(|l| {
            let field = |k: &str| l.split(k).nth(1).unwrap().split(' ').next().unwrap();
            (
                field("seq=").parse().unwrap(),
                field("chunk=").parse().unwrap(),
                field(" block=").parse().unwrap(),
            )
        })
        .collect();
    v.sort_by_key(|x| x.0);
    v.into_iter().map(|(_, c, b)| (c, b)).collect()
}

fn wait_for_log(m: &Mount, what: &str) -> String {
    assert!(
        wait_until(Duration::from_secs(30), || m.log_text().contains(what)),
        "no `{what}` in the daemon's log:\n{}",
        m.log_text()
    );
    m.log_text()
}

/// An SSH server holding a repository `repo` with volume `v` made from [`tree`]; the access
/// logs the profile module at debug (the replay order is read from the log).
struct Fixture {
    t: tempfile::TempDir,
    s: Sshd,
    access: Access,
    files: Vec<(&'static str, Vec<u8>)>,
    repo: PathBuf,
}

fn fixture() -> Fixture {
    let t = tempdir();
    let s = start_sshd();
    let mut access = Access::ssh(&s);
    access
        .env
        .push(("RUST_LOG".into(), "info,horcrux::profile=debug".into()));
    let src = t.path().join("src");
    let files = tree(&src);
    let repo = s.dir().join("repo");
    access.generate("v", &src, &s.url(&repo));
    Fixture {
        t,
        s,
        access,
        files,
        repo,
    }
}

#[test]
fn a_recorded_start_up_is_replayed_in_order_on_another_host() {
    let Fixture {
        t,
        s,
        access,
        files,
        repo,
    } = fixture();
    let url = s.url(&repo);

    // Mount 1 ("host A"): the start-up pattern, then unmount before the window ends: the
    // recording is stored at unmount.
    let m = access.mount(
        &url,
        &t.path().join("m1"),
        &t.path().join("cache1"),
        &["--timeout", "5"],
    );
    let expected = start_up(&m, &files);
    m.unmount();
    let (manifest, profile) = stored_profile(&repo, "v").expect("mount 1 stored a profile");
    assert_eq!(profile.header.volume, "v");
    assert_eq!(profile.header.manifest, manifest);
    let recorded: Vec<ChunkId> = profile.entries.iter().map(|e| e.chunk).collect();
    // Every chunk the pattern read is there, each step's first touches after the previous
    // step's (the kernel's readahead may add neighbours: they are kept, but not in our way).
    let pos: Vec<Vec<usize>> = expected
        .iter()
        .map(|step| {
            step.iter()
                .map(|c| {
                    recorded.iter().position(|r| r == c).unwrap_or_else(|| {
                        panic!("chunk {c} read at start-up is not in the profile")
                    })
                })
                .collect()
        })
        .collect();
    assert!(
        pos.windows(2)
            .all(|w| w[0].iter().max() < w[1].iter().min()),
        "steps out of order: {pos:?}"
    );
    assert!(
        !recorded.contains(&chunk_of(&files, "unused/big", 0)),
        "a file nobody read is in the profile"
    );

    // Mount 2 ("host B", fresh cache): the profile is replayed before anything is read.
    let m = access.mount(
        &url,
        &t.path().join("m2"),
        &t.path().join("cache2"),
        &["--timeout", "3"],
    );
    let log = wait_for_log(&m, "replay done");
    assert!(log.contains("not recording another"), "{log}");
    let order = replayed(&log);
    let want: Vec<(ChunkId, u32)> = profile.entries.iter().map(|e| (e.chunk, e.block)).collect();
    assert_eq!(
        order, want,
        "replayed blocks differ from the profile (or its order)"
    );
    assert!(
        log.contains(&format!("fetched={}", want.len())),
        "every block fetched by the replay: {log}"
    );
    // `prefetch --status` shows the replay (this mount has no other prefetch job).
    let out = access.ok(&[
        os("prefetch"),
        os("--status"),
        os("--json"),
        m.mountpoint.as_os_str(),
    ]);
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = &st["replay"];
    assert_eq!(r["replay"], "done", "{out}");
    assert_eq!(r["blocks"].as_u64(), Some(want.len() as u64), "{out}");
    assert_eq!(r["present"], r["blocks"], "{out}");
    assert_eq!(r["generations"], 0, "{out}");
    assert!(
        r["recording"].as_str().unwrap().contains("has a profile"),
        "{out}"
    );
    let out = access.ok(&[os("prefetch"), os("--status"), m.mountpoint.as_os_str()]);
    assert!(
        out.contains("start-up profile: recording") && out.contains("replay done"),
        "{out}"
    );
    // The source goes away: the start-up pattern reads from the cache alone...
    drop(s);
    start_up(&m, &files);
    // ...while a block the profile does not name cannot be fetched any more.
    let mut buf = [0u8; 10];
    let r = std::fs::File::open(m.path("unused/big"))
        .unwrap()
        .read_exact_at(&mut buf, 0);
    assert!(r.is_err(), "a block outside the profile was cached");
    m.unmount();
}

#[test]
fn a_later_version_replays_the_blocks_it_shares() {
    let Fixture {
        t,
        s,
        access,
        files,
        repo,
    } = fixture();
    let url = s.url(&repo);
    let m = access.mount(&url, &t.path().join("m1"), &t.path().join("cache1"), &[]);
    start_up(&m, &files);
    // Change the second MiB of the binary and commit: that chunk is new, the rest shared.
    std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("bin/app"))
        .unwrap()
        .write_all_at(b"changed", MIB + 10)
        .unwrap();
    access.ok(&[
        os("commit"),
        os("-m"),
        os("patch"),
        m.mountpoint.as_os_str(),
    ]);
    m.unmount();
    let (old_manifest, profile) = stored_profile(&repo, "v").unwrap();

    let m = access.mount(
        &url,
        &t.path().join("m2"),
        &t.path().join("cache2"),
        &["--read-only"],
    );
    let log = wait_for_log(&m, "replay done");
    assert!(log.contains("generations_back=1"), "{log}");
    assert!(log.contains(&old_manifest), "{log}");
    let order = replayed(&log);
    let changed = chunk_of(&files, "bin/app", 1);
    let want: Vec<(ChunkId, u32)> = profile
        .entries
        .iter()
        .filter(|e| e.chunk != changed)
        .map(|e| (e.chunk, e.block))
        .collect();
    assert_eq!(order, want, "the shared blocks, in the recorded order");
    assert!(profile.entries.iter().any(|e| e.chunk == changed));
    m.unmount();
    // Nothing was read on the newer version: it has no profile of its own yet.
    assert_eq!(
        std::fs::read_dir(repo.join("volumes/v/profiles"))
            .unwrap()
            .count(),
        1
    );
}

#[test]
fn disabled_corrupt_and_foreign_profiles() {
    let t = tempdir();
    let s = start_sshd();
    let access = Access::ssh(&s);
    let src = t.path().join("src");
    let files = tree(&src);
    let repo = s.dir().join("repo");
    let url = s.url(&repo);
    access.generate("v", &src, &url);
    let cache = |n: &str| t.path().join(format!("cache-{n}"));
    let ro = ["--read-only"];

    // Disabled recording: nothing is stored.
    for (i, flags) in [&["--no-profile"][..], &["--record-profile", "0"][..]]
        .into_iter()
        .enumerate()
    {
        let mut f = flags.to_vec();
        f.extend(ro);
        let m = access.mount(&url, &t.path().join("m"), &cache(&format!("off{i}")), &f);
        start_up(&m, &files);
        m.unmount();
        assert!(stored_profile(&repo, "v").is_none(), "{flags:?} recorded");
    }
    // A short window: stored when it ends, while the volume stays mounted.
    let m = access.mount(
        &url,
        &t.path().join("m"),
        &cache("rec"),
        &["--read-only", "--record-profile", "1.5"],
    );
    start_up(&m, &files);
    wait_for_log(&m, "start-up profile stored");
    assert!(stored_profile(&repo, "v").is_some());
    m.unmount();

    // --no-replay: nothing is prefetched.
    let m = access.mount(
        &url,
        &t.path().join("m"),
        &cache("noreplay"),
        &["--read-only", "--no-replay"],
    );
    std::thread::sleep(Duration::from_secs(1));
    let log = m.log_text();
    assert!(!log.contains("replaying"), "{log}");
    m.unmount();
    assert_eq!(cached_chunks(&access, &cache("noreplay")), "0 (0 complete)");

    // A corrupt profile object: refused, said so, and the volume reads.
    let (_, _) = stored_profile(&repo, "v").unwrap();
    let obj = std::fs::read_dir(repo.join("profiles"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let good = std::fs::read(&obj).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x55;
    std::fs::write(&obj, &bad).unwrap();
    let m = access.mount(&url, &t.path().join("m"), &cache("corrupt"), &ro);
    let log = wait_for_log(&m, "start-up profile refused");
    assert!(
        log.contains("is corrupt") && log.contains("does not match its id"),
        "{log}"
    );
    start_up(&m, &files);
    m.unmount();
    std::fs::write(&obj, &good).unwrap();

    // A foreign profile: another volume's, named by this version's pointer.
    let src2 = t.path().join("src2");
    std::fs::create_dir_all(&src2).unwrap();
    std::fs::write(src2.join("x"), bytes(99, MIB as usize)).unwrap();
    access.generate("w", &src2, &url);
    let m = access.mount(
        &url,
        &t.path().join("m"),
        &cache("w"),
        &["--read-only", "--name", "w"],
    );
    std::fs::read(m.path("x")).unwrap();
    m.unmount();
    let wdir = repo.join("volumes/w/profiles");
    let wptr = std::fs::read_dir(&wdir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let vdir = repo.join("volumes/v/profiles");
    let vptr = std::fs::read_dir(&vdir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::copy(&wptr, &vptr).unwrap();
    let m = access.mount(
        &url,
        &t.path().join("m"),
        &cache("foreign"),
        &["--read-only", "--name", "v"],
    );
    let log = wait_for_log(&m, "start-up profile refused");
    assert!(log.contains("does not belong to this volume"), "{log}");
    assert!(log.contains("recorded on volume `w`"), "{log}");
    start_up(&m, &files);
    m.unmount();
}

/// The `chunks` line of `horcrux cache stats` for the cache at `dir`.
fn cached_chunks(access: &Access, dir: &Path) -> String {
    let out = access.ok(&[os("cache"), os("stats"), os("--cache-dir"), dir.as_os_str()]);
    out.lines()
        .find_map(|l| l.strip_prefix("chunks"))
        .unwrap_or_else(|| panic!("no chunks line in {out}"))
        .trim()
        .to_string()
}

/// A read-only bind mount of a directory; unmounted on drop.
struct ReadOnlyBind(std::path::PathBuf);

impl ReadOnlyBind {
    fn new(src: &Path, dst: &Path) -> ReadOnlyBind {
        std::fs::create_dir_all(dst).unwrap();
        let run = |args: &[&OsStr]| {
            let st = std::process::Command::new("mount")
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "mount {args:?}");
        };
        run(&[os("--bind"), src.as_os_str(), dst.as_os_str()]);
        let b = ReadOnlyBind(dst.to_path_buf());
        run(&[os("-o"), os("remount,bind,ro"), dst.as_os_str()]);
        b
    }
}

impl Drop for ReadOnlyBind {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_read_only_repository_keeps_the_profile_in_the_local_cache() {
    let Fixture {
        t,
        s,
        access,
        files,
        repo,
    } = fixture();
    // The SSH server sees the repository through a read-only mount: writes fail with EROFS,
    // as with read-only credentials.
    let ro = ReadOnlyBind::new(&repo, &s.dir().join("repo-ro"));
    let url = s.url(&ro.0);
    let cache = t.path().join("cache");
    let m = access.mount(&url, &t.path().join("m1"), &cache, &["--read-only"]);
    start_up(&m, &files);
    m.unmount();
    assert!(
        stored_profile(&repo, "v").is_none(),
        "written through a read-only mount?"
    );
    let local = cache.join("profiles");
    let (_, p) = stored_profile(&local, "v").expect("kept in the local cache");
    assert!(!p.entries.is_empty());
    // The same host (same cache directory, emptied of chunks) replays it from there.
    access.ok(&[
        os("cache"),
        os("prune"),
        os("--max-size"),
        os("0"),
        os("--cache-dir"),
        cache.as_os_str(),
    ]);
    let m = access.mount(&url, &t.path().join("m2"), &cache, &["--read-only"]);
    let log = wait_for_log(&m, "replay done");
    assert!(log.contains("place=\"local cache\""), "{log}");
    assert_eq!(replayed(&log).len(), p.entries.len(), "{log}");
    m.unmount();
    drop(ro);
}

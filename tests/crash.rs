//! Durability of the writable overlay (issue 4) across `kill -9` of the daemon.
//!
//! While writers hammer a mount (new files and base files, random slots, some fsync'd, some
//! fdatasync'd, files created and renamed into place with the directory fsync'd), the daemon
//! is killed with SIGKILL. The dead mount is lazily unmounted, the volume mounted again with
//! the same `--overlay-dir`, and then every acknowledged byte and name must be there, every
//! listed entry readable in full, and untouched base bytes unchanged.
//!
//! A second test checks that completed metadata operations (create, mkdir, rename, unlink,
//! symlink, link, chmod, setxattr) survive a kill without any fsync: the daemon's death does not
//! drop the OS page cache, so whatever the daemon had done before replying is still there.
//! Run as root.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const THREADS: usize = 4;
const SLOT: u64 = 64 * 1024;
/// Base files: 40 slots = 2.5 MiB, several 1 MiB blocks.
const BASE_SLOTS: u64 = 40;
const NEW_SLOTS: u64 = 48;
/// Kill once this many fsync/fdatasync calls were acknowledged in total.
const ACKS_BEFORE_KILL: usize = 300;

fn base_name(t: usize) -> String {
    format!("base/b{t}")
}

fn base_data(t: usize) -> Vec<u8> {
    bytes(1000 + t as u64, (BASE_SLOTS * SLOT) as usize)
}

/// What one writer had acknowledged when the daemon died.
#[derive(Debug, Default)]
struct Acked {
    /// (file, slot) -> (offset in the slot, bytes) that an fsync/fdatasync acknowledged.
    slots: BTreeMap<(String, u64), (u64, Vec<u8>)>,
    /// Slots written at least once (acknowledged or not).
    touched: BTreeSet<(String, u64)>,
    /// Files created, written, fsync'd, and their directory fsync'd: name -> content.
    created: BTreeMap<String, Vec<u8>>,
    /// Names unlinked with the directory fsync'd afterwards.
    unlinked: BTreeSet<String>,
    /// Errors before the kill (must be none).
    errors: Vec<String>,
}

fn fsync_dir(p: &Path) -> std::io::Result<()> {
    File::open(p)?.sync_all()
}

/// One writer: runs until `stop`, recording into `acked` only what was acknowledged.
fn writer(
    t: usize,
    root: PathBuf,
    acked: Arc<Mutex<Acked>>,
    acks: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = Rng(0x9E37_79B9 + t as u64 * 7919);
    let files = [(base_name(t), BASE_SLOTS), (format!("new/n{t}"), NEW_SLOTS)];
    // Slots written since the last sync of each file: slot -> data.
    let mut pending: [BTreeMap<u64, (u64, Vec<u8>)>; 2] = Default::default();
    let mut used: [BTreeSet<u64>; 2] = Default::default();
    let mut round = 0u64;
    let fail = |what: String| {
        if !stop.load(Ordering::SeqCst) {
            acked.lock().unwrap().errors.push(what);
        }
    };
    let handles: Vec<File> = match files
        .iter()
        .map(|(f, _)| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(root.join(f))
        })
        .collect::<Result<_, _>>()
    {
        Ok(h) => h,
        Err(e) => return fail(format!("writer {t}: open: {e}")),
    };
    while !stop.load(Ordering::SeqCst) {
        round += 1;
        let which = rng.below(2) as usize;
        let (name, slots) = &files[which];
        if used[which].len() as u64 == *slots {
            used[which].clear(); // all slots used once: start over (overwrites are fine)
        }
        let mut slot = rng.below(*slots);
        while used[which].contains(&slot) {
            slot = (slot + 1) % slots;
        }
        used[which].insert(slot);
        // A random offset and length inside the slot.
        let off = rng.below(SLOT);
        let len = 1 + rng.below(SLOT - off) as usize;
        let data = bytes(rng.next(), len);
        {
            // An acknowledged slot being overwritten is no longer certain until the next sync.
            let mut a = acked.lock().unwrap();
            a.touched.insert((name.clone(), slot));
            a.slots.remove(&(name.clone(), slot));
        }
        if let Err(e) = handles[which].write_all_at(&data, slot * SLOT + off) {
            return fail(format!("writer {t}: pwrite {name} slot {slot}: {e}"));
        }
        pending[which].insert(slot, (off, data));
        if rng.below(3) == 0 {
            let r = if round % 2 == 0 {
                handles[which].sync_all()
            } else {
                handles[which].sync_data()
            };
            match r {
                Ok(()) => {
                    let mut a = acked.lock().unwrap();
                    for (s, d) in std::mem::take(&mut pending[which]) {
                        a.slots.insert((name.clone(), s), d);
                    }
                    drop(a);
                    acks.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => return fail(format!("writer {t}: fsync {name}: {e}")),
            }
        }
        if round % 7 == 0 {
            // Create a file the durable way: write a temporary, fsync it, rename it into
            // place, fsync the directory.
            let dir = root.join(format!("meta{t}"));
            let name = format!("meta{t}/f{round}");
            let tmp = root.join(format!("meta{t}/.tmp{round}"));
            let content = bytes(round * 31 + t as u64, 100 + (round as usize % 5000));
            let r = (|| {
                let mut f = File::create(&tmp)?;
                f.write_all(&content)?;
                f.sync_all()?;
                fs::rename(&tmp, root.join(&name))?;
                fsync_dir(&dir)
            })();
            match r {
                Ok(()) => {
                    acked.lock().unwrap().created.insert(name, content);
                    acks.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => return fail(format!("writer {t}: durable create {name}: {e}")),
            }
        }
        if round % 11 == 0 {
            // Unlink an acknowledged file, fsync the directory.
            let victim = acked
                .lock()
                .unwrap()
                .created
                .keys()
                .find(|k| k.starts_with(&format!("meta{t}/")))
                .cloned();
            if let Some(v) = victim {
                // From here until the directory's fsync returns, its existence is uncertain:
                // it is neither promised present nor promised gone.
                acked.lock().unwrap().created.remove(&v);
                let r = fs::remove_file(root.join(&v))
                    .and_then(|()| fsync_dir(&root.join(format!("meta{t}"))));
                match r {
                    Ok(()) => {
                        acked.lock().unwrap().unlinked.insert(v);
                    }
                    Err(e) => return fail(format!("writer {t}: unlink {v}: {e}")),
                }
            }
        }
    }
}

struct Setup {
    tmp: tempfile::TempDir,
    repo: PathBuf,
    mnt: PathBuf,
    cache: PathBuf,
    overlay: PathBuf,
}

impl Setup {
    fn new(src_tree: impl FnOnce(&Path)) -> Setup {
        let tmp = tempdir();
        let t = tmp.path().to_path_buf();
        let src = t.join("src");
        fs::create_dir_all(&src).unwrap();
        src_tree(&src);
        let repo = t.join("repo");
        generate("crash", &src, &repo);
        Setup {
            tmp,
            repo,
            mnt: t.join("mnt"),
            cache: t.join("cache"),
            overlay: t.join("overlay"),
        }
    }

    fn mount(&self) -> Foreground {
        Foreground::new(
            &self.repo,
            &self.mnt,
            &self.cache,
            &overlay_args(&self.overlay, &[]),
        )
    }

    /// SIGKILL the daemon, check the mount is dead, lazily unmount it.
    fn kill(&self, mut fg: Foreground) {
        let st = fg.stop(libc::SIGKILL);
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(libc::SIGKILL),
            "daemon exit status {st:?}"
        );
        let r = fs::metadata(&fg.mountpoint);
        assert_eq!(
            errno_of(&r),
            libc::ENOTCONN,
            "stat of the dead mount: expected ENOTCONN, got {}",
            errno_name(errno_of(&r))
        );
        lazy_unmount(&fg.mountpoint);
        drop(fg);
        let _ = &self.tmp;
    }
}

/// Every entry under `root` can be stat'ed and read in full (as long as stat says); returns
/// the problems found.
fn check_readable(root: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => {
                bad.push(format!("readdir {}: {e}", dir.display()));
                continue;
            }
        };
        for de in rd {
            let p = match de {
                Ok(de) => de.path(),
                Err(e) => {
                    bad.push(format!("readdir {}: {e}", dir.display()));
                    continue;
                }
            };
            match fs::symlink_metadata(&p) {
                Err(e) => bad.push(format!("lstat {}: {e}", p.display())),
                Ok(m) if m.is_dir() => stack.push(p),
                Ok(m) if m.is_file() => match fs::read(&p) {
                    Ok(d) if d.len() as u64 == m.len() => {}
                    Ok(d) => bad.push(format!(
                        "{}: stat size {}, read {} bytes",
                        p.display(),
                        m.len(),
                        d.len()
                    )),
                    Err(e) => bad.push(format!("read {}: {e}", p.display())),
                },
                Ok(m) if m.file_type().is_symlink() => {
                    if let Err(e) = fs::read_link(&p) {
                        bad.push(format!("readlink {}: {e}", p.display()));
                    }
                }
                Ok(_) => {}
            }
        }
    }
    bad
}

#[test]
fn kill_9_during_write_storm_keeps_acknowledged_data() {
    let s = Setup::new(|src| {
        fs::create_dir_all(src.join("base")).unwrap();
        fs::create_dir_all(src.join("new")).unwrap();
        for t in 0..THREADS {
            fs::write(src.join(base_name(t)), base_data(t)).unwrap();
            fs::create_dir_all(src.join(format!("meta{t}"))).unwrap();
        }
        fs::write(src.join("untouched"), bytes(5, 3 << 20)).unwrap();
    });
    let fg = s.mount();
    let root = fg.mountpoint.clone();

    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicUsize::new(0));
    let records: Vec<Arc<Mutex<Acked>>> = (0..THREADS).map(|_| Arc::default()).collect();
    let threads: Vec<_> = records
        .iter()
        .enumerate()
        .map(|(t, a)| {
            let (root, a, acks, stop) = (root.clone(), a.clone(), acks.clone(), stop.clone());
            std::thread::spawn(move || writer(t, root, a, acks, stop))
        })
        .collect();
    let enough = wait_until(Duration::from_secs(120), || {
        acks.load(Ordering::SeqCst) >= ACKS_BEFORE_KILL
            || records.iter().any(|r| !r.lock().unwrap().errors.is_empty())
    });
    let errors: Vec<String> = records
        .iter()
        .flat_map(|r| r.lock().unwrap().errors.clone())
        .collect();
    if !errors.is_empty() || !enough {
        stop.store(true, Ordering::SeqCst);
        let log = fg.log_text();
        drop(fg);
        for t in threads {
            let _ = t.join();
        }
        panic!(
            "the write storm failed before the kill ({} acks): {errors:#?}\ndaemon log:\n{log}",
            acks.load(Ordering::SeqCst)
        );
    }
    // Kill while the writers are running. Only then tell them to stop: their failing calls
    // after the kill are expected.
    let log_before = fg.log_text();
    let pid = fg.child.id();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    stop.store(true, Ordering::SeqCst);
    s.kill(fg);
    for t in threads {
        t.join().expect("writer thread panicked");
    }
    let total_acks = acks.load(Ordering::SeqCst);

    let fg = s.mount();
    let root = fg.mountpoint.clone();
    let mut bad = check_readable(&root);
    let mut slots_checked = 0;
    for (t, rec) in records.iter().enumerate() {
        let a = rec.lock().unwrap();
        let base = base_data(t);
        let files: BTreeSet<&String> = a.touched.iter().map(|(f, _)| f).collect();
        let contents: BTreeMap<&String, Vec<u8>> = files
            .iter()
            .map(|f| (*f, fs::read(root.join(f)).unwrap_or_default()))
            .collect();
        for ((f, slot), (off, want)) in &a.slots {
            let got = &contents[f];
            let at = (slot * SLOT + off) as usize;
            slots_checked += 1;
            match got.get(at..at + want.len()) {
                Some(g) if g == &want[..] => {}
                Some(g) => bad.push(format!(
                    "{f} slot {slot}: acknowledged {} bytes differ at {:?}",
                    want.len(),
                    g.iter().zip(want).position(|(x, y)| x != y)
                )),
                None => bad.push(format!(
                    "{f} slot {slot}: acknowledged {} bytes at {at}, file is {} bytes",
                    want.len(),
                    got.len()
                )),
            }
        }
        // Base slots never written keep the base bytes.
        let bn = base_name(t);
        let got = &contents
            .get(&bn)
            .cloned()
            .unwrap_or_else(|| fs::read(root.join(&bn)).unwrap());
        if got.len() != base.len() {
            bad.push(format!("{bn}: size {} (base {})", got.len(), base.len()));
        }
        for slot in 0..BASE_SLOTS {
            if a.touched.contains(&(bn.clone(), slot)) {
                continue;
            }
            let r = (slot * SLOT) as usize..((slot + 1) * SLOT) as usize;
            if got.get(r.clone()) != base.get(r) {
                bad.push(format!(
                    "{bn} slot {slot}: never written, but not the base bytes"
                ));
            }
        }
        for (name, content) in &a.created {
            match fs::read(root.join(name)) {
                Ok(d) if &d == content => {}
                Ok(d) => bad.push(format!(
                    "{name}: created+fsynced with {} bytes, reads {} different bytes",
                    content.len(),
                    d.len()
                )),
                Err(e) => bad.push(format!("{name}: created+fsynced (dir too), now {e}")),
            }
        }
        for name in &a.unlinked {
            if fs::symlink_metadata(root.join(name)).is_ok() {
                bad.push(format!(
                    "{name}: unlinked (dir fsynced) but back after the crash"
                ));
            }
        }
    }
    let untouched = fs::read(root.join("untouched")).unwrap_or_default();
    if untouched != bytes(5, 3 << 20) {
        bad.push("untouched: base file changed".into());
    }
    assert!(
        bad.is_empty(),
        "after kill -9 and remount ({total_acks} acks, {slots_checked} acknowledged slots):\n{}\n\
         daemon log before the kill (tail):\n{}\ndaemon log after:\n{}",
        bad.join("\n"),
        tail(&log_before, 40),
        fg.log_text()
    );
    let created: usize = records
        .iter()
        .map(|r| r.lock().unwrap().created.len())
        .sum();
    let unlinked: usize = records
        .iter()
        .map(|r| r.lock().unwrap().unlinked.len())
        .sum();
    eprintln!(
        "verified after kill -9: {total_acks} acks, {slots_checked} acknowledged slots, \
         {created} durable creates, {unlinked} durable unlinks"
    );
    assert!(
        slots_checked >= 20,
        "only {slots_checked} acknowledged slots to check"
    );
    drop(fg);
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn kill_9_keeps_completed_metadata_operations() {
    let s = Setup::new(|src| {
        fs::write(src.join("a"), b"base a").unwrap();
        fs::write(src.join("b"), b"base b").unwrap();
        fs::write(src.join("c"), b"base c").unwrap();
        fs::create_dir_all(src.join("d/e")).unwrap();
        fs::write(src.join("d/e/f"), b"base f").unwrap();
    });
    let fg = s.mount();
    let r = |p: &str| fg.mountpoint.join(p);
    // Completed operations, none fsync'd.
    fs::write(r("new"), b"new file").unwrap();
    fs::create_dir(r("newdir")).unwrap();
    fs::write(r("newdir/inner"), b"inner").unwrap();
    fs::rename(r("a"), r("newdir/a-moved")).unwrap();
    fs::rename(r("new"), r("b")).unwrap();
    fs::remove_file(r("c")).unwrap();
    fs::rename(r("d/e"), r("e")).unwrap();
    std::os::unix::fs::symlink("e/f", r("sym")).unwrap();
    fs::hard_link(r("e/f"), r("f-link")).unwrap();
    fs::set_permissions(r("e/f"), fs::Permissions::from_mode(0o600)).unwrap();
    xattr::set(r("newdir"), "user.k", b"v").unwrap();
    fs::remove_dir(r("d")).unwrap();
    s.kill(fg);

    let fg = s.mount();
    let r = |p: &str| fg.mountpoint.join(p);
    let mut bad = Vec::new();
    let mut want_file = |p: &str, want: &[u8]| match fs::read(r(p)) {
        Ok(d) if d == want => {}
        Ok(d) => bad.push(format!(
            "{p}: {:?}, want {:?}",
            String::from_utf8_lossy(&d),
            String::from_utf8_lossy(want)
        )),
        Err(e) => bad.push(format!("{p}: {e}")),
    };
    want_file("b", b"new file");
    want_file("newdir/inner", b"inner");
    want_file("newdir/a-moved", b"base a");
    want_file("e/f", b"base f");
    want_file("sym", b"base f");
    want_file("f-link", b"base f");
    for gone in ["a", "c", "new", "d"] {
        if fs::symlink_metadata(r(gone)).is_ok() {
            bad.push(format!(
                "{gone}: removed or renamed away before the kill, back after it"
            ));
        }
    }
    match fs::symlink_metadata(r("e/f")) {
        Ok(m) => {
            if m.mode() & 0o7777 != 0o600 {
                bad.push(format!("e/f: mode {:o}, want 600", m.mode() & 0o7777));
            }
            if m.nlink() != 2 {
                bad.push(format!("e/f: nlink {}, want 2", m.nlink()));
            }
        }
        Err(e) => bad.push(format!("e/f: {e}")),
    }
    if xattr::get(r("newdir"), "user.k").ok().flatten().as_deref() != Some(&b"v"[..]) {
        bad.push("newdir: xattr user.k lost".into());
    }
    bad.extend(check_readable(&fg.mountpoint));
    assert!(
        bad.is_empty(),
        "completed metadata operations after kill -9 and remount:\n{}\ndaemon log:\n{}",
        bad.join("\n"),
        fg.log_text()
    );
}

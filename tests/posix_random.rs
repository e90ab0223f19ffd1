//! Random operation sequences (proptest) applied to a plain directory and to a writable horcrux
//! mount that start from the same base tree: after every operation both must report the same
//! outcome (success or the same errno), and the whole trees must be the same at the end, before
//! and after a remount (umount, mount again with the same `--overlay-dir`) done in the middle.
//!
//! Compared: names, kinds, sizes and contents (blake3) of files, modes, owners, symlink targets,
//! user xattrs, hard-link groups and link counts of non-directories. Not compared: timestamps,
//! directory sizes and link counts.
//!
//! `PROPTEST_CASES` overrides the number of cases (default 48). Run as root.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;
use proptest::prelude::*;

/// The name space the operations work in (relative paths; some are below others).
const PATHS: &[&str] = &[
    "a", "b", "c", "d", "a/x", "a/y", "b/x", "c/z", "a/x/z", "d/y",
];
/// Symlink targets, relative to the link's directory and never going up, so no operation can
/// reach outside the root.
const TARGETS: &[&str] = &["x", "a", "a/x", "missing", "b", "c/z"];
const MODES: &[u32] = &[0o600, 0o644, 0o755, 0o700, 0o4755];
const XATTRS: &[&str] = &["user.0", "user.1", "user.2"];
const TRUNCATE_LENS: &[u64] = &[0, 1000, MIB + 17, 2 * MIB + 5];

/// The base tree, built identically for the plain root and the volume's source:
/// `a/` dir; `a/x` 1.5 MiB file with xattr user.0; `a/y -> x`; `b` file 0600 hard-linked with
/// `c/z`; `c/` dir.
fn base_tree(root: &Path) {
    fs::create_dir_all(root.join("a")).unwrap();
    fs::create_dir_all(root.join("c")).unwrap();
    fs::write(root.join("a/x"), bytes(1, (MIB + MIB / 2) as usize)).unwrap();
    xattr::set(root.join("a/x"), "user.0", b"base").unwrap();
    std::os::unix::fs::symlink("x", root.join("a/y")).unwrap();
    fs::write(root.join("b"), bytes(2, 3000)).unwrap();
    fs::set_permissions(root.join("b"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::hard_link(root.join("b"), root.join("c/z")).unwrap();
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).unwrap();
}

#[derive(Debug, Clone)]
enum Op {
    /// open(O_CREAT|O_WRONLY, 0644) + pwrite of `len` bytes (seeded) at `offset` + close.
    Write {
        path: usize,
        offset: u64,
        len: usize,
        seed: u64,
    },
    Truncate {
        path: usize,
        len: usize,
    },
    Mkdir {
        path: usize,
    },
    Rmdir {
        path: usize,
    },
    Unlink {
        path: usize,
    },
    /// flags: 0 plain, 1 RENAME_NOREPLACE, 2 RENAME_EXCHANGE.
    Rename {
        from: usize,
        to: usize,
        flags: u8,
    },
    Link {
        from: usize,
        to: usize,
    },
    Symlink {
        target: usize,
        path: usize,
    },
    Chmod {
        path: usize,
        mode: usize,
    },
    SetXattr {
        path: usize,
        name: usize,
        seed: u64,
        len: usize,
    },
    RemoveXattr {
        path: usize,
        name: usize,
    },
    /// fallocate(PUNCH_HOLE|KEEP_SIZE) on an O_WRONLY descriptor.
    Punch {
        path: usize,
        offset: u64,
        len: u64,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let p = || 0..PATHS.len();
    prop_oneof![
        4 => (p(), 0..(5 * MIB / 2), 1..70_000usize, any::<u64>())
            .prop_map(|(path, offset, len, seed)| Op::Write { path, offset, len, seed }),
        1 => (p(), 0..TRUNCATE_LENS.len()).prop_map(|(path, len)| Op::Truncate { path, len }),
        2 => p().prop_map(|path| Op::Mkdir { path }),
        1 => p().prop_map(|path| Op::Rmdir { path }),
        2 => p().prop_map(|path| Op::Unlink { path }),
        3 => (p(), p(), 0..3u8).prop_map(|(from, to, flags)| Op::Rename { from, to, flags }),
        1 => (p(), p()).prop_map(|(from, to)| Op::Link { from, to }),
        1 => (0..TARGETS.len(), p()).prop_map(|(target, path)| Op::Symlink { target, path }),
        1 => (p(), 0..MODES.len()).prop_map(|(path, mode)| Op::Chmod { path, mode }),
        1 => (p(), 0..XATTRS.len(), any::<u64>(), 0..300usize)
            .prop_map(|(path, name, seed, len)| Op::SetXattr { path, name, seed, len }),
        1 => (p(), 0..XATTRS.len()).prop_map(|(path, name)| Op::RemoveXattr { path, name }),
        1 => (p(), 0..(2 * MIB), 1..(MIB + MIB / 4))
            .prop_map(|(path, offset, len)| Op::Punch { path, offset, len }),
    ]
}

/// Apply `op` under `root`; the outcome is 0 or the errno of the first failing call.
fn apply(root: &Path, op: &Op) -> i32 {
    let p = |i: usize| root.join(PATHS[i]);
    let r: io::Result<()> = match *op {
        Op::Write {
            path,
            offset,
            len,
            seed,
        } => OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(p(path))
            .and_then(|f| f.write_all_at(&bytes(seed, len), offset)),
        Op::Truncate { path, len } => {
            let c = c_path(&p(path));
            // SAFETY: valid path.
            if unsafe { libc::truncate(c.as_ptr(), TRUNCATE_LENS[len] as i64) } == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        }
        Op::Mkdir { path } => fs::create_dir(p(path)),
        Op::Rmdir { path } => fs::remove_dir(p(path)),
        Op::Unlink { path } => fs::remove_file(p(path)),
        Op::Rename { from, to, flags } => {
            let f = [0, libc::RENAME_NOREPLACE, libc::RENAME_EXCHANGE][flags as usize];
            renameat2(&p(from), &p(to), f)
        }
        Op::Link { from, to } => fs::hard_link(p(from), p(to)),
        Op::Symlink { target, path } => std::os::unix::fs::symlink(TARGETS[target], p(path)),
        Op::Chmod { path, mode } => {
            fs::set_permissions(p(path), fs::Permissions::from_mode(MODES[mode]))
        }
        Op::SetXattr {
            path,
            name,
            seed,
            len,
        } => setxattr(&p(path), XATTRS[name], &bytes(seed, len), 0),
        Op::RemoveXattr { path, name } => removexattr(&p(path), XATTRS[name]),
        Op::Punch { path, offset, len } => {
            OpenOptions::new().write(true).open(p(path)).and_then(|f| {
                fallocate(
                    &f,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
            })
        }
    };
    errno_of(&r)
}

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    /// Files: size; others 0.
    size: u64,
    /// Non-directories: link count; directories 0.
    nlink: u64,
    /// Files: blake3 of the content; symlinks: the target.
    content: String,
    xattrs: BTreeMap<String, String>,
}

/// Everything compared about a tree, and its hard-link groups (paths sharing an inode).
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    entries: BTreeMap<String, Entry>,
    links: BTreeSet<Vec<String>>,
}

fn snapshot(root: &Path) -> Result<Snapshot, String> {
    let mut entries = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let rd = fs::read_dir(&dir).map_err(|e| format!("readdir {}: {e}", dir.display()))?;
        for de in rd {
            let de = de.map_err(|e| format!("readdir {}: {e}", dir.display()))?;
            let r = rel.join(de.file_name());
            let name = r.to_string_lossy().into_owned();
            let full = root.join(&r);
            let m = fs::symlink_metadata(&full).map_err(|e| format!("lstat {name}: {e}"))?;
            let ft = m.file_type();
            let (kind, content) = if ft.is_dir() {
                stack.push(r.clone());
                ("dir", String::new())
            } else if ft.is_symlink() {
                let t = fs::read_link(&full).map_err(|e| format!("readlink {name}: {e}"))?;
                ("symlink", t.to_string_lossy().into_owned())
            } else if ft.is_file() {
                let data = fs::read(&full).map_err(|e| format!("read {name}: {e}"))?;
                if data.len() as u64 != m.len() {
                    return Err(format!(
                        "{name}: read {} bytes, stat says {}",
                        data.len(),
                        m.len()
                    ));
                }
                ("file", blake3::hash(&data).to_hex().to_string())
            } else {
                ("other", String::new())
            };
            if !ft.is_dir() {
                inodes.entry(m.ino()).or_default().push(name.clone());
            }
            let mut xattrs = BTreeMap::new();
            if !ft.is_symlink() {
                let names = xattr::list(&full).map_err(|e| format!("listxattr {name}: {e}"))?;
                for n in names {
                    let n = n.to_string_lossy().into_owned();
                    if !n.starts_with("user.") {
                        continue;
                    }
                    let v = xattr::get(&full, &n)
                        .map_err(|e| format!("getxattr {name} {n}: {e}"))?
                        .unwrap_or_default();
                    xattrs.insert(n, blake3::hash(&v).to_hex()[..16].to_string());
                }
            }
            entries.insert(
                name,
                Entry {
                    kind,
                    mode: if ft.is_symlink() {
                        0
                    } else {
                        m.mode() & 0o7777
                    },
                    uid: m.uid(),
                    gid: m.gid(),
                    size: if ft.is_file() { m.len() } else { 0 },
                    nlink: if ft.is_dir() { 0 } else { m.nlink() },
                    content,
                    xattrs,
                },
            );
        }
    }
    let links = inodes
        .into_values()
        .filter(|v| v.len() > 1)
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    Ok(Snapshot { entries, links })
}

/// Differences between the reference (`want`) and `got`, one line each.
fn diff(want: &Snapshot, got: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (k, w) in &want.entries {
        match got.entries.get(k) {
            None => out.push(format!("{k}: missing ({w:?})")),
            Some(g) if g != w => out.push(format!("{k}: want {w:?}\n    got  {g:?}")),
            _ => {}
        }
    }
    for (k, g) in &got.entries {
        if !want.entries.contains_key(k) {
            out.push(format!("{k}: unexpected ({g:?})"));
        }
    }
    if want.links != got.links {
        out.push(format!(
            "hard-link groups: want {:?}, got {:?}",
            want.links, got.links
        ));
    }
    out
}

fn compare(stage: &str, reference: &Path, other: &Path, ops: &[Op]) -> Result<(), String> {
    let want = snapshot(reference).map_err(|e| format!("{stage}: reference tree: {e}"))?;
    let got = snapshot(other).map_err(|e| format!("{stage}: tree under test: {e}"))?;
    let d = diff(&want, &got);
    if d.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{stage}: trees differ after {} operations:\n{}\noperations: {ops:#?}",
            ops.len(),
            d.join("\n")
        ))
    }
}

/// Apply `ops` to both roots, comparing outcomes one by one.
fn run_ops(
    reference: &Path,
    other: &Path,
    ops: &[Op],
    done: &mut Vec<Op>,
) -> Result<usize, String> {
    let mut succeeded = 0;
    for op in ops {
        done.push(op.clone());
        let (want, got) = (apply(reference, op), apply(other, op));
        if want != got {
            return Err(format!(
                "operation #{} {op:?}: plain directory gave {}, the tree under test {}\n\
                 operations so far: {done:#?}",
                done.len(),
                errno_name(want),
                errno_name(got)
            ));
        }
        succeeded += usize::from(want == 0);
    }
    Ok(succeeded)
}

/// One case's directories and mount. Field order matters: the mount is dropped (unmounted)
/// before the temporary directory is removed.
struct Case {
    mount: Option<Mount>,
    plain: PathBuf,
    tmp: tempfile::TempDir,
}

impl Case {
    fn new() -> Case {
        // SAFETY: umask has no preconditions.
        unsafe { libc::umask(0o022) };
        let tmp = tempdir();
        let t = tmp.path();
        let plain = t.join("plain");
        base_tree(&plain);
        base_tree(&t.join("src"));
        generate("random", &t.join("src"), &t.join("repo"));
        let mut c = Case {
            tmp,
            plain,
            mount: None,
        };
        c.mount();
        c
    }

    fn mount(&mut self) {
        let t = self.tmp.path();
        let overlay = t.join("overlay");
        self.mount = Some(Mount::new(
            &t.join("repo"),
            &t.join("mnt"),
            &t.join("cache"),
            &overlay_args(&overlay, &[]),
        ));
    }

    fn remount(&mut self) {
        self.mount.take().unwrap().unmount();
        self.mount();
    }

    fn root(&self) -> PathBuf {
        self.mount.as_ref().unwrap().mountpoint.clone()
    }

    fn log(&self) -> String {
        self.mount.as_ref().map(Mount::log_text).unwrap_or_default()
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        if let Some(m) = self.mount.take() {
            if std::thread::panicking() {
                drop(m);
            } else {
                m.unmount(); // removes the daemon's log too
            }
        }
    }
}

fn mount_case(ops: &[Op]) -> Result<(), String> {
    let mut c = Case::new();
    let mut done = Vec::new();
    let half = ops.len() / 2;
    let r = (|| {
        compare("base", &c.plain, &c.root(), &done)?;
        run_ops(&c.plain, &c.root(), &ops[..half], &mut done)?;
        compare("first half", &c.plain, &c.root(), &done)?;
        c.remount();
        compare("after remount", &c.plain, &c.root(), &done)?;
        run_ops(&c.plain, &c.root(), &ops[half..], &mut done)?;
        compare("end", &c.plain, &c.root(), &done)
    })();
    r.map_err(|e| format!("{e}\ndaemon log:\n{}", c.log()))
}

fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    ProptestConfig {
        cases,
        max_shrink_iters: 40,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(48))]

    /// The writable mount behaves like the plain directory, op by op and tree by tree.
    #[test]
    fn random_ops_mount_matches_plain_dir(ops in proptest::collection::vec(op_strategy(), 30..60)) {
        let r = mount_case(&ops);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}

proptest! {
    #![proptest_config(config(8))]

    /// The harness itself: two plain directories agree (the operations are deterministic and
    /// the snapshot compares only what must be equal).
    #[test]
    fn random_ops_harness_plain_matches_plain(ops in proptest::collection::vec(op_strategy(), 30..60)) {
        let tmp = tempdir();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        base_tree(&a);
        base_tree(&b);
        let mut done = Vec::new();
        let r = run_ops(&a, &b, &ops, &mut done)
            .and_then(|n| compare("end", &a, &b, &done).map(|()| n));
        prop_assert!(r.is_ok(), "{}", r.clone().unwrap_err());
        // The operations did something (not everything failed).
        let succeeded = r.unwrap();
        prop_assert!(
            succeeded >= 3, "only {succeeded} of {} operations succeeded", ops.len());
    }
}

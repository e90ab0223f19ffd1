//! POSIX behaviour of a writable horcrux mount (issue 4), checked against a local filesystem.
//!
//! Every check is a function over a directory root holding the same base tree, and runs twice:
//! `plain::NAME` on a plain directory under /var/tmp (ext4 on CI: the reference) and
//! `mount::NAME` on a writable horcrux mount of a volume generated from that tree (the base
//! entries then come from the volume, new ones from the overlay). A check that passes on the
//! plain directory and fails on the mount is a deviation of the overlay (or belongs in
//! docs/SEMANTICS.md).
//!
//! The mount is made with `--overlay-dir` and `--allow-other` (the permission checks run as
//! uid 65534). Run as root.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{
    DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt,
};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;

// ---------------------------------------------------------------------------------------------
// The base tree and the two environments.

/// Length of `big.bin`: three 1 MiB blocks and a partial fourth.
const BIG_LEN: usize = (2 * MIB + MIB / 2 + 12345) as usize;
const SMALL: &[u8] = b"hello horcrux\n";
const RO: &[u8] = b"read only for others\n";

fn big_base() -> Vec<u8> {
    bytes(7, BIG_LEN)
}

/// The entries directly under the root of the base tree.
const ROOT_NAMES: &[&str] = &[
    "big.bin",
    "dir",
    "emptydir",
    "hard1",
    "link",
    "open.txt",
    "pubdir",
    "ro.txt",
    "rodir",
    "small.txt",
];

/// Build the base tree at `root`:
///
/// ```text
/// small.txt  0644 "hello horcrux\n", xattrs user.colour=green, user.empty=""
/// big.bin    0644 BIG_LEN pseudo-random bytes (several 1 MiB blocks)
/// ro.txt     0644 root-owned          open.txt  0666
/// hard1      0644, hard-linked with dir/hard2
/// link       -> small.txt
/// dir/       0755, xattr user.d=1: a.txt, hard2, sub/b.txt
/// emptydir/  0755      rodir/ 0755 with inner.txt      pubdir/ 0777
/// ```
fn base_tree(root: &Path) {
    fs::create_dir_all(root).unwrap();
    let w = |rel: &str, data: &[u8], mode: u32| {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    };
    w("small.txt", SMALL, 0o644);
    w("big.bin", &big_base(), 0o644);
    w("ro.txt", RO, 0o644);
    w("open.txt", b"anyone may write\n", 0o666);
    w("hard1", b"linked\n", 0o644);
    w("dir/a.txt", b"a\n", 0o644);
    w("dir/sub/b.txt", b"b\n", 0o644);
    w("rodir/inner.txt", b"inner\n", 0o644);
    fs::hard_link(root.join("hard1"), root.join("dir/hard2")).unwrap();
    std::os::unix::fs::symlink("small.txt", root.join("link")).unwrap();
    for (d, m) in [
        ("dir", 0o755),
        ("dir/sub", 0o755),
        ("emptydir", 0o755),
        ("rodir", 0o755),
        ("pubdir", 0o777),
        ("", 0o755),
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
        fs::set_permissions(root.join(d), fs::Permissions::from_mode(m)).unwrap();
    }
    xattr::set(root.join("small.txt"), "user.colour", b"green").unwrap();
    xattr::set(root.join("small.txt"), "user.empty", b"").unwrap();
    xattr::set(root.join("dir"), "user.d", b"1").unwrap();
}

/// A root holding the base tree: a plain directory, or a writable mount of it.
struct Env {
    root: PathBuf,
    /// Dropped (unmounted) before the temporary directory goes.
    mount: Option<Mount>,
    tmp: tempfile::TempDir,
}

impl Env {
    fn prepare() -> tempfile::TempDir {
        // SAFETY: umask has no preconditions; every test wants the same value.
        unsafe { libc::umask(0o022) };
        let tmp = tempdir();
        // Let uid 65534 through to the root (the permission checks).
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        tmp
    }

    fn plain() -> Env {
        let tmp = Self::prepare();
        let root = tmp.path().join("root");
        base_tree(&root);
        Env {
            root,
            mount: None,
            tmp,
        }
    }

    fn mount() -> Env {
        Self::mount_with(&["--allow-other"])
    }

    fn mount_with(extra: &[&str]) -> Env {
        let tmp = Self::prepare();
        let t = tmp.path();
        let src = t.join("src");
        base_tree(&src);
        generate("posix", &src, &t.join("repo"));
        let overlay = t.join("overlay");
        let m = Mount::new(
            &t.join("repo"),
            &t.join("mnt"),
            &t.join("cache"),
            &overlay_args(&overlay, extra),
        );
        Env {
            root: m.mountpoint.clone(),
            mount: Some(m),
            tmp,
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(m) = self.mount.take() {
            if std::thread::panicking() {
                eprintln!("daemon log ({}):\n{}", m.log.display(), m.log_text());
                drop(m);
            } else {
                // `horcrux umount` must work after every check; it also removes the log.
                m.unmount();
            }
        }
        let _ = &self.tmp;
    }
}

/// Declare each check once; get `plain::NAME` and `mount::NAME` tests.
macro_rules! posix_tests {
    ($($name:ident),* $(,)?) => {
        mod plain {
            $( #[test] fn $name() { super::$name(&super::Env::plain()); } )*
        }
        mod mount {
            $( #[test] fn $name() { super::$name(&super::Env::mount()); } )*
        }
    };
}

posix_tests!(
    create,
    create_excl,
    open_trunc,
    open_append,
    mknod_fifo_socket_regular,
    mkdir,
    unlink,
    rmdir,
    rename_file_over_file,
    rename_directories,
    rename_across_directories,
    rename_noreplace,
    rename_exchange,
    link_counts,
    symlink_readlink,
    chmod,
    chown,
    truncate,
    utimens,
    fallocate_modes,
    xattrs,
    statfs,
    fsync_fdatasync,
    posix_locks,
    flock_locks,
    unlinked_open_file,
    write_in_the_middle_of_a_big_base_file,
    readdir_after_changes,
    permissions_as_non_root,
    other_process_changes_are_seen,
);

// ---------------------------------------------------------------------------------------------
// Assertion helpers: every failure names the operation, the path and the errnos.

#[track_caller]
fn ok<T>(op: &str, p: &Path, r: io::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!(
            "{op} {}: expected success, got {} ({e})",
            p.display(),
            errno_name(e.raw_os_error().unwrap_or(-1))
        ),
    }
}

#[track_caller]
fn fails<T: std::fmt::Debug>(op: &str, p: &Path, r: io::Result<T>, want: i32) {
    let seen = errno_of(&r);
    assert_eq!(
        seen,
        want,
        "{op} {}: expected {}, got {} ({r:?})",
        p.display(),
        errno_name(want),
        errno_name(seen)
    );
}

#[track_caller]
fn read(p: &Path) -> Vec<u8> {
    ok("read", p, fs::read(p))
}

#[track_caller]
fn lstat(p: &Path) -> fs::Metadata {
    ok("lstat", p, fs::symlink_metadata(p))
}

#[track_caller]
fn gone(p: &Path) {
    fails("lstat", p, fs::symlink_metadata(p), libc::ENOENT);
}

#[track_caller]
fn same_bytes(what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: content differs: length {} (want {}), first difference at {at:?}",
            got.len(),
            want.len()
        );
    }
}

fn names(dir: &Path) -> BTreeSet<String> {
    ok("readdir", dir, fs::read_dir(dir))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

#[track_caller]
fn listing(dir: &Path, want: &[&str]) {
    let got = names(dir);
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        got,
        want,
        "readdir {}: extra {:?}, missing {:?}",
        dir.display(),
        got.difference(&want).collect::<Vec<_>>(),
        want.difference(&got).collect::<Vec<_>>()
    );
}

fn user_xattrs(p: &Path) -> BTreeSet<String> {
    ok("listxattr", p, xattr::list(p))
        .map(|n| n.into_string().unwrap())
        .filter(|n| n.starts_with("user."))
        .collect()
}

fn open_rw(p: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(p)
}

fn create_file(p: &Path, data: &[u8]) {
    ok("create", p, fs::write(p, data));
}

fn mode(p: &Path) -> u32 {
    lstat(p).mode() & 0o7777
}

// ---------------------------------------------------------------------------------------------
// The checks.

fn create(e: &Env) {
    let p = e.p("new.txt");
    let mut f = ok(
        "open(O_CREAT|O_WRONLY, 0640)",
        &p,
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o640)
            .open(&p),
    );
    ok("write", &p, f.write_all(b"fresh"));
    drop(f);
    assert_eq!(read(&p), b"fresh");
    let m = lstat(&p);
    assert!(m.file_type().is_file(), "new.txt is not a regular file");
    assert_eq!(m.mode() & 0o7777, 0o640, "mode of new.txt");
    assert_eq!((m.len(), m.uid(), m.gid(), m.nlink()), (5, 0, 0, 1));

    // In a base subdirectory, and in a new one.
    create_file(&e.p("dir/sub/c.txt"), b"c");
    assert_eq!(read(&e.p("dir/sub/c.txt")), b"c");
    ok("mkdir", &e.p("fresh"), fs::create_dir(e.p("fresh")));
    create_file(&e.p("fresh/f"), b"f");
    assert_eq!(read(&e.p("fresh/f")), b"f");
    // Creating through a symlink to a directory.
    ok(
        "symlink",
        &e.p("to-dir"),
        std::os::unix::fs::symlink("dir", e.p("to-dir")),
    );
    create_file(&e.p("to-dir/via-link"), b"v");
    assert_eq!(read(&e.p("dir/via-link")), b"v");

    // O_CREAT without O_EXCL on an existing base file opens it as is.
    let p = e.p("small.txt");
    drop(ok(
        "open(O_CREAT|O_WRONLY) existing",
        &p,
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p),
    ));
    assert_eq!(read(&p), SMALL);

    let p = e.p("missing/x");
    fails("create", &p, fs::write(&p, b""), libc::ENOENT);
    let p = e.p("small.txt/x");
    fails("create", &p, fs::write(&p, b""), libc::ENOTDIR);
    let p = e.p("dir");
    fails(
        "open(O_CREAT|O_WRONLY) on a directory",
        &p,
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p),
        libc::EISDIR,
    );
}

fn create_excl(e: &Env) {
    let excl = |p: &Path| OpenOptions::new().write(true).create_new(true).open(p);
    let p = e.p("x");
    drop(ok("open(O_CREAT|O_EXCL)", &p, excl(&p)));
    fails("open(O_CREAT|O_EXCL) again", &p, excl(&p), libc::EEXIST);
    for rel in [
        "small.txt",
        "big.bin",
        "dir",
        "emptydir",
        "link",
        "dir/a.txt",
    ] {
        let p = e.p(rel);
        fails(
            "open(O_CREAT|O_EXCL) base entry",
            &p,
            excl(&p),
            libc::EEXIST,
        );
    }
    // O_EXCL does not follow a dangling symlink: the link itself exists.
    let p = e.p("dangling");
    ok("symlink", &p, std::os::unix::fs::symlink("nowhere", &p));
    fails(
        "open(O_CREAT|O_EXCL) dangling symlink",
        &p,
        excl(&p),
        libc::EEXIST,
    );
    gone(&e.p("nowhere"));
    // An unlinked base name is free again.
    let p = e.p("small.txt");
    ok("unlink", &p, fs::remove_file(&p));
    let mut f = ok("open(O_CREAT|O_EXCL) after unlink", &p, excl(&p));
    ok("write", &p, f.write_all(b"again"));
    drop(f);
    assert_eq!(read(&p), b"again");
}

fn open_trunc(e: &Env) {
    let trunc = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .truncate(true)
            .open(p)
    };
    // A small base file.
    let p = e.p("small.txt");
    let mut f = ok("open(O_TRUNC)", &p, trunc(&p));
    assert_eq!(ok("fstat", &p, f.metadata()).len(), 0, "size after O_TRUNC");
    let mut buf = Vec::new();
    ok("read", &p, f.read_to_end(&mut buf));
    assert!(
        buf.is_empty(),
        "read after O_TRUNC returned {} bytes",
        buf.len()
    );
    ok("write", &p, f.write_all(b"x"));
    drop(f);
    assert_eq!(read(&p), b"x");
    assert_eq!(
        user_xattrs(&p),
        ["user.colour", "user.empty"].map(String::from).into(),
        "xattrs after O_TRUNC"
    );
    // A big base file: nothing of the base may show through afterwards, even past a hole.
    let p = e.p("big.bin");
    let f = ok("open(O_TRUNC)", &p, trunc(&p));
    ok("pwrite", &p, f.write_all_at(b"tail", MIB));
    drop(f);
    let got = read(&p);
    assert_eq!(got.len() as u64, MIB + 4, "size of big.bin");
    assert!(
        got[..MIB as usize].iter().all(|&b| b == 0),
        "big.bin: base bytes show through after O_TRUNC"
    );
    assert_eq!(&got[MIB as usize..], b"tail");
    // Through one name of a hard-link pair: the other sees it.
    let p = e.p("hard1");
    drop(ok("open(O_TRUNC)", &p, trunc(&p)));
    assert_eq!(
        read(&e.p("dir/hard2")),
        b"",
        "dir/hard2 after truncating hard1"
    );
    // A new file.
    let p = e.p("new");
    create_file(&p, b"0123456789");
    drop(ok("open(O_TRUNC)", &p, trunc(&p)));
    assert_eq!(read(&p), b"");
}

fn open_append(e: &Env) {
    let append = |p: &Path| OpenOptions::new().append(true).open(p);
    let p = e.p("small.txt");
    let mut a = ok("open(O_APPEND)", &p, append(&p));
    let mut b = ok("open(O_APPEND)", &p, append(&p));
    ok("write", &p, a.write_all(b"one\n"));
    ok("write", &p, b.write_all(b"two\n"));
    // A seek does not matter to O_APPEND.
    ok("seek", &p, a.seek(SeekFrom::Start(0)).map(drop));
    ok("write", &p, a.write_all(b"three\n"));
    drop((a, b));
    assert_eq!(read(&p), b"hello horcrux\none\ntwo\nthree\n");

    let p = e.p("big.bin");
    let mut f = ok("open(O_APPEND)", &p, append(&p));
    ok("write", &p, f.write_all(b"appended"));
    drop(f);
    let mut want = big_base();
    want.extend_from_slice(b"appended");
    same_bytes("big.bin after append", &read(&p), &want);

    let p = e.p("new");
    let mut f = ok(
        "open(O_CREAT|O_APPEND)",
        &p,
        OpenOptions::new().append(true).create(true).open(&p),
    );
    ok("write", &p, f.write_all(b"a"));
    ok("write", &p, f.write_all(b"b"));
    drop(f);
    assert_eq!(read(&p), b"ab");
}

fn mknod_fifo_socket_regular(e: &Env) {
    let p = e.p("fifo");
    ok("mknod S_IFIFO", &p, try_mknod(&p, libc::S_IFIFO | 0o640, 0));
    let m = lstat(&p);
    assert!(
        m.file_type().is_fifo(),
        "fifo: not a fifo: {:?}",
        m.file_type()
    );
    assert_eq!(m.mode() & 0o7777, 0o640, "mode of the fifo");
    fails(
        "mknod S_IFIFO again",
        &p,
        try_mknod(&p, libc::S_IFIFO | 0o640, 0),
        libc::EEXIST,
    );
    // It works as a pipe.
    let mut r = ok(
        "open fifo O_RDONLY|O_NONBLOCK",
        &p,
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&p),
    );
    let mut w = ok(
        "open fifo O_WRONLY|O_NONBLOCK",
        &p,
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&p),
    );
    ok("write fifo", &p, w.write_all(b"ping"));
    let mut buf = [0u8; 4];
    ok("read fifo", &p, r.read_exact(&mut buf));
    assert_eq!(&buf, b"ping");

    let p = e.p("dir/sock");
    ok(
        "mknod S_IFSOCK",
        &p,
        try_mknod(&p, libc::S_IFSOCK | 0o600, 0),
    );
    assert!(
        lstat(&p).file_type().is_socket(),
        "dir/sock is not a socket"
    );
    // bind(2) creates a socket node too; it must be connectable.
    let p = e.p("live.sock");
    let l = ok("bind", &p, std::os::unix::net::UnixListener::bind(&p));
    let mut c = ok("connect", &p, std::os::unix::net::UnixStream::connect(&p));
    ok("send", &p, c.write_all(b"!"));
    let (mut s, _) = ok("accept", &p, l.accept());
    let mut one = [0u8; 1];
    ok("recv", &p, s.read_exact(&mut one));
    assert_eq!(&one, b"!");

    // mknod S_IFREG makes an empty regular file.
    let p = e.p("regular");
    ok("mknod S_IFREG", &p, try_mknod(&p, libc::S_IFREG | 0o600, 0));
    let m = lstat(&p);
    assert!(m.file_type().is_file() && m.len() == 0, "mknod S_IFREG");
    fails(
        "mknod over a base file",
        &e.p("small.txt"),
        try_mknod(&e.p("small.txt"), libc::S_IFIFO | 0o600, 0),
        libc::EEXIST,
    );
    let want: Vec<&str> = ROOT_NAMES
        .iter()
        .copied()
        .chain(["fifo", "live.sock", "regular"])
        .collect();
    listing(&e.root, &want);
    listing(&e.p("dir"), &["a.txt", "hard2", "sock", "sub"]);
}

fn mkdir(e: &Env) {
    let p = e.p("newdir");
    ok("mkdir", &p, fs::create_dir(&p));
    let m = lstat(&p);
    assert!(m.is_dir(), "newdir is not a directory");
    assert_eq!(m.mode() & 0o7777, 0o755, "mode of newdir (umask 022)");
    listing(&p, &[]);
    let p = e.p("private");
    ok(
        "mkdir 0700",
        &p,
        fs::DirBuilder::new().mode(0o700).create(&p),
    );
    assert_eq!(mode(&p), 0o700);
    for rel in ["dir", "emptydir", "small.txt", "link", "newdir", "dir/sub"] {
        let p = e.p(rel);
        fails("mkdir existing", &p, fs::create_dir(&p), libc::EEXIST);
    }
    let p = e.p("missing/x");
    fails("mkdir", &p, fs::create_dir(&p), libc::ENOENT);
    let p = e.p("small.txt/x");
    fails("mkdir", &p, fs::create_dir(&p), libc::ENOTDIR);
    // Nested, in a base directory.
    let p = e.p("dir/sub/deeper/deepest");
    ok("mkdir -p", &p, fs::create_dir_all(&p));
    create_file(&p.join("f"), b"deep");
    assert_eq!(read(&p.join("f")), b"deep");
    listing(&e.p("dir/sub"), &["b.txt", "deeper"]);
}

fn unlink(e: &Env) {
    // The symlink, not its target.
    let p = e.p("link");
    ok("unlink symlink", &p, fs::remove_file(&p));
    gone(&p);
    assert_eq!(read(&e.p("small.txt")), SMALL);
    // A base file: gone for good; a new file by that name starts empty of base state.
    let p = e.p("small.txt");
    ok("unlink base file", &p, fs::remove_file(&p));
    gone(&p);
    fails("open after unlink", &p, File::open(&p), libc::ENOENT);
    create_file(&p, b"new small");
    assert_eq!(read(&p), b"new small");
    assert!(
        user_xattrs(&p).is_empty(),
        "a new file at an unlinked base name inherits xattrs {:?}",
        user_xattrs(&p)
    );
    // A base file in a subdirectory.
    ok(
        "unlink",
        &e.p("dir/a.txt"),
        fs::remove_file(e.p("dir/a.txt")),
    );
    gone(&e.p("dir/a.txt"));
    // One name of a hard-link pair.
    ok(
        "unlink",
        &e.p("dir/hard2"),
        fs::remove_file(e.p("dir/hard2")),
    );
    let m = lstat(&e.p("hard1"));
    assert_eq!(m.nlink(), 1, "nlink of hard1 after unlinking dir/hard2");
    assert_eq!(read(&e.p("hard1")), b"linked\n");
    // A new file.
    let p = e.p("new");
    create_file(&p, b"n");
    ok("unlink new file", &p, fs::remove_file(&p));
    gone(&p);

    let p = e.p("missing");
    fails("unlink", &p, fs::remove_file(&p), libc::ENOENT);
    let p = e.p("small.txt");
    ok("unlink", &p, fs::remove_file(&p));
    fails("unlink twice", &p, fs::remove_file(&p), libc::ENOENT);
    for rel in ["dir", "emptydir"] {
        let p = e.p(rel);
        fails("unlink a directory", &p, fs::remove_file(&p), libc::EISDIR);
    }
    let p = e.p("big.bin/x");
    fails("unlink", &p, fs::remove_file(&p), libc::ENOTDIR);
    listing(&e.p("dir"), &["sub"]);
    let want: Vec<&str> = ROOT_NAMES
        .iter()
        .copied()
        .filter(|n| !["link", "small.txt"].contains(n))
        .collect();
    listing(&e.root, &want);
}

fn rmdir(e: &Env) {
    // A base empty directory; its name made again is a new empty directory.
    let p = e.p("emptydir");
    ok("rmdir base empty dir", &p, fs::remove_dir(&p));
    gone(&p);
    ok("mkdir again", &p, fs::create_dir(&p));
    listing(&p, &[]);

    for rel in ["dir", "dir/sub", "rodir"] {
        let p = e.p(rel);
        fails("rmdir non-empty", &p, fs::remove_dir(&p), libc::ENOTEMPTY);
    }
    let p = e.p("small.txt");
    fails("rmdir a file", &p, fs::remove_dir(&p), libc::ENOTDIR);
    let p = e.p("link");
    fails("rmdir a symlink", &p, fs::remove_dir(&p), libc::ENOTDIR);
    let p = e.p("missing");
    fails("rmdir", &p, fs::remove_dir(&p), libc::ENOENT);

    // A new directory with a new file.
    let p = e.p("new");
    ok("mkdir", &p, fs::create_dir(&p));
    create_file(&p.join("f"), b"");
    fails(
        "rmdir non-empty new dir",
        &p,
        fs::remove_dir(&p),
        libc::ENOTEMPTY,
    );
    ok("unlink", &p, fs::remove_file(p.join("f")));
    ok("rmdir emptied new dir", &p, fs::remove_dir(&p));
    gone(&p);

    // A base directory emptied of its base entries can go, and does not come back with them.
    for rel in ["dir/sub/b.txt", "dir/a.txt", "dir/hard2"] {
        ok("unlink", &e.p(rel), fs::remove_file(e.p(rel)));
    }
    // A base directory that holds a new file is not empty.
    create_file(&e.p("dir/sub/n"), b"");
    let p = e.p("dir/sub");
    fails(
        "rmdir dir with a new file",
        &p,
        fs::remove_dir(&p),
        libc::ENOTEMPTY,
    );
    ok("unlink", &p, fs::remove_file(e.p("dir/sub/n")));
    ok("rmdir emptied base dir", &p, fs::remove_dir(&p));
    let p = e.p("dir");
    ok("rmdir emptied base dir", &p, fs::remove_dir(&p));
    gone(&p);
    ok("mkdir again", &p, fs::create_dir(&p));
    listing(&p, &[]);
    gone(&e.p("dir/a.txt"));
    assert_eq!(lstat(&e.p("hard1")).nlink(), 1, "nlink of hard1");
    assert!(
        user_xattrs(&p).is_empty(),
        "a new directory at a removed base name inherits xattrs"
    );
}

fn rename_file_over_file(e: &Env) {
    // Base file to a new name: content and xattrs move with it.
    let (a, b) = (e.p("small.txt"), e.p("renamed.txt"));
    ok("rename", &a, fs::rename(&a, &b));
    gone(&a);
    assert_eq!(read(&b), SMALL);
    assert_eq!(
        xattr::get(&b, "user.colour").unwrap().as_deref(),
        Some(&b"green"[..])
    );
    // A new file over a base file.
    let n = e.p("new");
    create_file(&n, b"new content");
    let big = e.p("big.bin");
    ok("rename new over base", &n, fs::rename(&n, &big));
    gone(&n);
    assert_eq!(read(&big), b"new content");
    assert_eq!(lstat(&big).len(), 11);
    // A base file over a new file.
    let n = e.p("new2");
    create_file(&n, b"doomed");
    ok("rename base over new", &b, fs::rename(&b, &n));
    assert_eq!(read(&n), SMALL);
    gone(&b);
    // A base file over a base file; the mode comes with the source.
    let (ro, open) = (e.p("ro.txt"), e.p("open.txt"));
    ok("rename base over base", &ro, fs::rename(&ro, &open));
    assert_eq!(read(&open), RO);
    assert_eq!(mode(&open), 0o644);
    gone(&ro);
    // Over one name of a hard-link pair: the other keeps the old content, nlink 1.
    let n = e.p("new3");
    create_file(&n, b"replacement");
    ok("rename over hard link", &n, fs::rename(&n, e.p("hard1")));
    assert_eq!(read(&e.p("hard1")), b"replacement");
    assert_eq!(read(&e.p("dir/hard2")), b"linked\n");
    assert_eq!(lstat(&e.p("dir/hard2")).nlink(), 1, "nlink of dir/hard2");
    // Onto another name of the same inode: nothing happens.
    ok(
        "link",
        &e.p("dir/hard2"),
        fs::hard_link(e.p("dir/hard2"), e.p("h3")),
    );
    ok(
        "rename onto same inode",
        &e.p("h3"),
        fs::rename(e.p("h3"), e.p("dir/hard2")),
    );
    assert_eq!(
        lstat(&e.p("h3")).nlink(),
        2,
        "rename between links of one inode"
    );
    assert_eq!(read(&e.p("h3")), b"linked\n");
    // Onto itself.
    ok("rename onto itself", &big, fs::rename(&big, &big));
    assert_eq!(read(&big), b"new content");
    // A symlink is renamed, not its target.
    ok(
        "rename symlink",
        &e.p("link"),
        fs::rename(e.p("link"), e.p("link2")),
    );
    assert_eq!(fs::read_link(e.p("link2")).unwrap(), Path::new("small.txt"));
    let p = e.p("missing");
    fails("rename", &p, fs::rename(&p, e.p("x")), libc::ENOENT);
    let want: Vec<&str> = vec![
        "big.bin", "dir", "emptydir", "h3", "hard1", "link2", "new2", "open.txt", "pubdir", "rodir",
    ];
    listing(&e.root, &want);
}

fn rename_directories(e: &Env) {
    // A base directory over a base empty directory: its whole subtree moves.
    let (d, ed) = (e.p("dir"), e.p("emptydir"));
    ok("rename dir over empty dir", &d, fs::rename(&d, &ed));
    gone(&d);
    assert_eq!(read(&e.p("emptydir/a.txt")), b"a\n");
    assert_eq!(read(&e.p("emptydir/sub/b.txt")), b"b\n");
    assert_eq!(read(&e.p("emptydir/hard2")), b"linked\n");
    listing(&ed, &["a.txt", "hard2", "sub"]);
    assert_eq!(
        xattr::get(&ed, "user.d").unwrap().as_deref(),
        Some(&b"1"[..]),
        "xattr of the moved directory"
    );
    // Onto a non-empty directory.
    let r = e.p("rodir");
    fails(
        "rename dir onto non-empty dir",
        &ed,
        fs::rename(&ed, &r),
        libc::ENOTEMPTY,
    );
    // Directory over file, file over directory.
    let s = e.p("small.txt");
    fails(
        "rename dir over file",
        &r,
        fs::rename(&r, &s),
        libc::ENOTDIR,
    );
    fails("rename file over dir", &s, fs::rename(&s, &r), libc::EISDIR);
    // Into its own subdirectory.
    fails(
        "rename dir into itself",
        &ed,
        fs::rename(&ed, e.p("emptydir/sub/x")),
        libc::EINVAL,
    );
    // A new directory over a base empty one (emptied first), and a base one over a new one.
    let n = e.p("newdir");
    ok("mkdir", &n, fs::create_dir(&n));
    create_file(&n.join("f"), b"f");
    ok("unlink", &r, fs::remove_file(r.join("inner.txt")));
    ok(
        "rename new dir over emptied base dir",
        &n,
        fs::rename(&n, &r),
    );
    listing(&r, &["f"]);
    let n2 = e.p("newdir2");
    ok("mkdir", &n2, fs::create_dir(&n2));
    ok(
        "rename base dir over new empty dir",
        &ed,
        fs::rename(&ed, &n2),
    );
    listing(&n2, &["a.txt", "hard2", "sub"]);
    assert_eq!(read(&n2.join("sub/b.txt")), b"b\n");
    // And a new directory holding new files moved around.
    ok(
        "rename new dir",
        &r,
        fs::rename(&r, e.p("newdir2/sub/moved")),
    );
    assert_eq!(read(&e.p("newdir2/sub/moved/f")), b"f");
    let want: Vec<&str> = vec![
        "big.bin",
        "hard1",
        "link",
        "newdir2",
        "open.txt",
        "pubdir",
        "ro.txt",
        "small.txt",
    ];
    listing(&e.root, &want);
}

fn rename_across_directories(e: &Env) {
    let (a, b) = (e.p("small.txt"), e.p("dir/sub/moved.txt"));
    ok("rename into subdir", &a, fs::rename(&a, &b));
    assert_eq!(read(&b), SMALL);
    gone(&a);
    // Back to its base name.
    ok("rename back", &b, fs::rename(&b, &a));
    assert_eq!(read(&a), SMALL);
    assert_eq!(
        xattr::get(&a, "user.colour").unwrap().as_deref(),
        Some(&b"green"[..])
    );
    ok(
        "rename",
        &e.p("dir/a.txt"),
        fs::rename(e.p("dir/a.txt"), e.p("rodir/a.txt")),
    );
    ok(
        "rename dir across",
        &e.p("dir/sub"),
        fs::rename(e.p("dir/sub"), e.p("rodir/sub2")),
    );
    assert_eq!(read(&e.p("rodir/sub2/b.txt")), b"b\n");
    create_file(&e.p("rodir/sub2/c.txt"), b"c");
    gone(&e.p("dir/sub"));
    listing(&e.p("dir"), &["hard2"]);
    listing(&e.p("rodir"), &["a.txt", "inner.txt", "sub2"]);
    listing(&e.p("rodir/sub2"), &["b.txt", "c.txt"]);
    // A new file across directories, a hard link across directories.
    create_file(&e.p("pubdir/n"), b"n");
    ok(
        "rename",
        &e.p("pubdir/n"),
        fs::rename(e.p("pubdir/n"), e.p("dir/n")),
    );
    assert_eq!(read(&e.p("dir/n")), b"n");
    ok(
        "rename",
        &e.p("dir/hard2"),
        fs::rename(e.p("dir/hard2"), e.p("pubdir/h")),
    );
    assert_eq!(lstat(&e.p("pubdir/h")).nlink(), 2);
    assert_eq!(
        lstat(&e.p("pubdir/h")).ino(),
        lstat(&e.p("hard1")).ino(),
        "hard link inode"
    );
    listing(&e.p("pubdir"), &["h"]);
    listing(&e.p("dir"), &["n"]);
}

fn rename_noreplace(e: &Env) {
    let nr = libc::RENAME_NOREPLACE;
    let (s, b) = (e.p("small.txt"), e.p("big.bin"));
    fails(
        "renameat2 NOREPLACE onto base file",
        &s,
        renameat2(&s, &b, nr),
        libc::EEXIST,
    );
    assert_eq!(read(&s), SMALL);
    same_bytes("big.bin", &read(&b), &big_base());
    let n = e.p("new");
    create_file(&n, b"n");
    fails(
        "renameat2 NOREPLACE onto new file",
        &s,
        renameat2(&s, &n, nr),
        libc::EEXIST,
    );
    fails(
        "renameat2 NOREPLACE new onto base",
        &n,
        renameat2(&n, &s, nr),
        libc::EEXIST,
    );
    fails(
        "renameat2 NOREPLACE onto empty dir",
        &e.p("dir"),
        renameat2(&e.p("dir"), &e.p("emptydir"), nr),
        libc::EEXIST,
    );
    fails(
        "renameat2 NOREPLACE onto symlink",
        &n,
        renameat2(&n, &e.p("link"), nr),
        libc::EEXIST,
    );
    let free = e.p("dir/free");
    ok(
        "renameat2 NOREPLACE to a free name",
        &s,
        renameat2(&s, &free, nr),
    );
    assert_eq!(read(&free), SMALL);
    gone(&s);
    // The freed base name can be taken with NOREPLACE.
    ok(
        "renameat2 NOREPLACE onto unlinked base name",
        &n,
        renameat2(&n, &s, nr),
    );
    assert_eq!(read(&s), b"n");
}

fn rename_exchange(e: &Env) {
    let x = libc::RENAME_EXCHANGE;
    // Base <-> base: contents and xattrs swap.
    let (s, b) = (e.p("small.txt"), e.p("big.bin"));
    ok("renameat2 EXCHANGE base files", &s, renameat2(&s, &b, x));
    assert_eq!(read(&b), SMALL);
    same_bytes("small.txt after exchange", &read(&s), &big_base());
    assert_eq!(
        xattr::get(&b, "user.colour").unwrap().as_deref(),
        Some(&b"green"[..])
    );
    assert!(
        user_xattrs(&s).is_empty(),
        "small.txt kept xattrs after exchange"
    );
    // New <-> base.
    let n = e.p("new");
    create_file(&n, b"new");
    ok("renameat2 EXCHANGE new<->base", &n, renameat2(&n, &b, x));
    assert_eq!(read(&b), b"new");
    assert_eq!(read(&n), SMALL);
    // File <-> directory.
    let (ro, d) = (e.p("ro.txt"), e.p("dir"));
    ok("renameat2 EXCHANGE file<->dir", &ro, renameat2(&ro, &d, x));
    assert!(
        lstat(&ro).is_dir(),
        "ro.txt is not a directory after exchange"
    );
    assert!(lstat(&d).is_file(), "dir is not a file after exchange");
    assert_eq!(read(&d), RO);
    assert_eq!(read(&e.p("ro.txt/sub/b.txt")), b"b\n");
    listing(&ro, &["a.txt", "hard2", "sub"]);
    // Across directories.
    let (a, c) = (e.p("ro.txt/sub/b.txt"), e.p("rodir/inner.txt"));
    ok("renameat2 EXCHANGE across dirs", &a, renameat2(&a, &c, x));
    assert_eq!(read(&a), b"inner\n");
    assert_eq!(read(&c), b"b\n");
    // Directory <-> directory.
    let (p1, p2) = (e.p("rodir"), e.p("emptydir"));
    ok("renameat2 EXCHANGE dirs", &p1, renameat2(&p1, &p2, x));
    listing(&p1, &[]);
    listing(&p2, &["inner.txt"]);
    // Missing target.
    let m = e.p("missing");
    fails(
        "renameat2 EXCHANGE with missing",
        &n,
        renameat2(&n, &m, x),
        libc::ENOENT,
    );
    assert_eq!(read(&n), SMALL);
}

fn link_counts(e: &Env) {
    let (h1, h2, h3) = (e.p("hard1"), e.p("dir/hard2"), e.p("h3"));
    assert_eq!(lstat(&h1).nlink(), 2, "base nlink of hard1");
    ok("link base pair", &h1, fs::hard_link(&h1, &h3));
    for p in [&h1, &h2, &h3] {
        assert_eq!(lstat(p).nlink(), 3, "nlink of {} after link", p.display());
    }
    assert_eq!(lstat(&h3).ino(), lstat(&h2).ino(), "inode of the new link");
    // A write through one name is seen through the others; so is chmod.
    let f = ok("open", &h3, open_rw(&h3));
    ok("pwrite", &h3, f.write_all_at(b"LINK", 0));
    drop(f);
    assert_eq!(read(&h2), b"LINKed\n");
    ok(
        "chmod",
        &h1,
        fs::set_permissions(&h1, fs::Permissions::from_mode(0o600)),
    );
    assert_eq!(mode(&h2), 0o600, "mode through the other link");
    ok("unlink", &h1, fs::remove_file(&h1));
    assert_eq!(lstat(&h2).nlink(), 2, "nlink after unlinking one of three");
    // A base file without links, and its xattrs through the new name.
    let (s, s2) = (e.p("small.txt"), e.p("dir/sub/small-link"));
    ok("link base file", &s, fs::hard_link(&s, &s2));
    assert_eq!((lstat(&s).nlink(), lstat(&s2).nlink()), (2, 2));
    assert_eq!(read(&s2), SMALL);
    assert_eq!(
        xattr::get(&s2, "user.colour").unwrap().as_deref(),
        Some(&b"green"[..])
    );
    // A new file.
    let (n, n2) = (e.p("new"), e.p("pubdir/new-link"));
    create_file(&n, b"new");
    ok("link new file", &n, fs::hard_link(&n, &n2));
    assert_eq!(lstat(&n).nlink(), 2);
    ok("unlink", &n, fs::remove_file(&n));
    assert_eq!(lstat(&n2).nlink(), 1);
    assert_eq!(read(&n2), b"new");
    // Errors.
    let d = e.p("dir");
    fails(
        "link a directory",
        &d,
        fs::hard_link(&d, e.p("dlink")),
        libc::EPERM,
    );
    fails(
        "link onto existing",
        &s,
        fs::hard_link(&s, e.p("big.bin")),
        libc::EEXIST,
    );
    let m = e.p("missing");
    fails(
        "link missing",
        &m,
        fs::hard_link(&m, e.p("x")),
        libc::ENOENT,
    );
    // link(2) does not follow a symlink: the new name is a symlink.
    ok(
        "link symlink",
        &e.p("link"),
        fs::hard_link(e.p("link"), e.p("link-hard")),
    );
    assert!(lstat(&e.p("link-hard")).file_type().is_symlink());
    assert_eq!(
        lstat(&e.p("link")).nlink(),
        2,
        "nlink of a hard-linked symlink"
    );
}

fn symlink_readlink(e: &Env) {
    use std::os::unix::fs::symlink;
    assert_eq!(
        ok("readlink base", &e.p("link"), fs::read_link(e.p("link"))),
        Path::new("small.txt")
    );
    assert_eq!(read(&e.p("link")), SMALL);
    let s = e.p("dir/s1");
    ok("symlink", &s, symlink("../big.bin", &s));
    let m = lstat(&s);
    assert!(m.file_type().is_symlink(), "dir/s1 is not a symlink");
    assert_eq!(m.len(), "../big.bin".len() as u64, "size of a symlink");
    assert_eq!(fs::read_link(&s).unwrap(), Path::new("../big.bin"));
    same_bytes("through dir/s1", &read(&s), &big_base());
    // To a directory, and traversed.
    let s = e.p("to-dir");
    ok("symlink", &s, symlink("dir/sub", &s));
    assert_eq!(read(&e.p("to-dir/b.txt")), b"b\n");
    // Dangling, long.
    let s = e.p("dangling");
    ok("symlink", &s, symlink("does/not/exist", &s));
    fails("read through dangling", &s, fs::read(&s), libc::ENOENT);
    let long = "x/".repeat(500) + "end";
    let s = e.p("long");
    ok("symlink", &s, symlink(&long, &s));
    assert_eq!(fs::read_link(&s).unwrap(), Path::new(&long));
    // Errors.
    let s = e.p("small.txt");
    fails("symlink onto existing", &s, symlink("x", &s), libc::EEXIST);
    let s = e.p("link");
    fails(
        "symlink onto base symlink",
        &s,
        symlink("x", &s),
        libc::EEXIST,
    );
    let f = e.p("big.bin");
    fails("readlink a file", &f, fs::read_link(&f), libc::EINVAL);
    let m = e.p("missing");
    fails("readlink missing", &m, fs::read_link(&m), libc::ENOENT);
    // A symlink replacing an unlinked base file.
    ok("unlink", &f, fs::remove_file(&f));
    ok(
        "symlink at unlinked base name",
        &f,
        symlink("small.txt", &f),
    );
    assert_eq!(read(&f), SMALL);
}

fn chmod(e: &Env) {
    let set = |rel: &str, m: u32| {
        let p = e.p(rel);
        ok(
            &format!("chmod {m:o}"),
            &p,
            fs::set_permissions(&p, fs::Permissions::from_mode(m)),
        );
        assert_eq!(mode(&p), m, "mode of {rel} after chmod");
    };
    set("small.txt", 0o600);
    set("big.bin", 0o755);
    set("dir", 0o700);
    set("dir/sub/b.txt", 0o4750);
    set("emptydir", 0o1777);
    create_file(&e.p("new"), b"");
    set("new", 0o604);
    ok("mkdir", &e.p("nd"), fs::create_dir(e.p("nd")));
    set("nd", 0o2711);
    // Follows a symlink; the link itself keeps 0777.
    let l = e.p("link");
    ok(
        "chmod via symlink",
        &l,
        fs::set_permissions(&l, fs::Permissions::from_mode(0o640)),
    );
    assert_eq!(mode(&e.p("small.txt")), 0o640);
    assert_eq!(mode(&l), 0o777, "mode of the symlink itself");
    // Kept across data changes.
    let p = e.p("big.bin");
    let f = ok("open", &p, open_rw(&p));
    ok("pwrite", &p, f.write_all_at(b"x", 5));
    drop(f);
    assert_eq!(mode(&p), 0o755, "mode after a write");
    let m = e.p("missing");
    fails(
        "chmod missing",
        &m,
        fs::set_permissions(&m, fs::Permissions::from_mode(0o600)),
        libc::ENOENT,
    );
}

fn chown(e: &Env) {
    use std::os::unix::fs::{chown, lchown};
    let owner = |rel: &str| {
        let m = lstat(&e.p(rel));
        (m.uid(), m.gid())
    };
    let s = e.p("small.txt");
    ok("chown", &s, chown(&s, Some(1000), Some(1000)));
    assert_eq!(owner("small.txt"), (1000, 1000));
    ok("chown gid only", &s, chown(&s, None, Some(2000)));
    assert_eq!(owner("small.txt"), (1000, 2000));
    create_file(&e.p("new"), b"");
    ok(
        "chown new",
        &e.p("new"),
        chown(e.p("new"), Some(1234), Some(5678)),
    );
    assert_eq!(owner("new"), (1234, 5678));
    ok(
        "chown dir",
        &e.p("dir"),
        chown(e.p("dir"), Some(42), Some(43)),
    );
    assert_eq!(owner("dir"), (42, 43));
    assert_eq!(owner("dir/a.txt"), (0, 0), "children keep their owner");
    // lchown changes the symlink, not its target.
    ok(
        "lchown",
        &e.p("link"),
        lchown(e.p("link"), Some(7), Some(8)),
    );
    assert_eq!(owner("link"), (7, 8));
    assert_eq!(owner("small.txt"), (1000, 2000));
    // Hard links share it.
    ok("chown", &e.p("hard1"), chown(e.p("hard1"), Some(9), None));
    assert_eq!(owner("dir/hard2"), (9, 0));
    let m = e.p("missing");
    fails(
        "chown missing",
        &m,
        chown(&m, Some(1), Some(1)),
        libc::ENOENT,
    );
}

fn truncate(e: &Env) {
    let set_len = |p: &Path, len: u64| {
        let f = ok("open", p, OpenOptions::new().write(true).open(p));
        ok(&format!("ftruncate {len}"), p, f.set_len(len));
    };
    // New file: shrink, then grow reads zeros.
    let n = e.p("new");
    create_file(&n, &bytes(1, 100));
    set_len(&n, 50);
    assert_eq!(read(&n), bytes(1, 50));
    set_len(&n, 200);
    let mut want = bytes(1, 50);
    want.resize(200, 0);
    assert_eq!(read(&n), want);
    // Small base file.
    let s = e.p("small.txt");
    set_len(&s, 5);
    assert_eq!(read(&s), b"hello");
    set_len(&s, 20);
    let mut want = b"hello".to_vec();
    want.resize(20, 0);
    assert_eq!(
        read(&s),
        want,
        "small.txt: shrink then grow must read zeros, not base bytes"
    );
    // Big base file: shrink into the middle of its second block, grow past its base length.
    let b = e.p("big.bin");
    let cut = (MIB + 1000) as usize;
    set_len(&b, cut as u64);
    assert_eq!(lstat(&b).len(), cut as u64);
    set_len(&b, 3 * MIB);
    let mut want = big_base();
    want.truncate(cut);
    want.resize(3 * MIB as usize, 0);
    same_bytes("big.bin after shrink+grow", &read(&b), &want);
    // truncate(2) by path; to zero then grow.
    let h = e.p("hard1");
    let c = c_path(&h);
    // SAFETY: valid path.
    assert_eq!(
        unsafe { libc::truncate(c.as_ptr(), 0) },
        0,
        "truncate hard1 to 0: {}",
        io::Error::last_os_error()
    );
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::truncate(c.as_ptr(), 3) },
        0,
        "truncate hard1 to 3: {}",
        io::Error::last_os_error()
    );
    assert_eq!(read(&e.p("dir/hard2")), [0, 0, 0], "through the other link");
    // Grow a small base file across blocks.
    let r = e.p("ro.txt");
    set_len(&r, 2 * MIB + 1);
    let mut want = RO.to_vec();
    want.resize((2 * MIB + 1) as usize, 0);
    same_bytes("ro.txt grown", &read(&r), &want);
    // Errors.
    let d = e.p("dir");
    let c = c_path(&d);
    // SAFETY: valid path.
    let rc = unsafe { libc::truncate(c.as_ptr(), 0) };
    let seen = if rc == 0 { 0 } else { last_errno() };
    assert_eq!(
        seen,
        libc::EISDIR,
        "truncate dir: expected EISDIR, got {}",
        errno_name(seen)
    );
    let m = e.p("missing");
    let c = c_path(&m);
    // SAFETY: valid path.
    let rc = unsafe { libc::truncate(c.as_ptr(), 0) };
    let seen = if rc == 0 { 0 } else { last_errno() };
    assert_eq!(
        seen,
        libc::ENOENT,
        "truncate missing: expected ENOENT, got {}",
        errno_name(seen)
    );
    let f = ok("open O_RDONLY", &s, File::open(&s));
    let r = f.set_len(0);
    assert!(
        matches!(errno_of(&r), libc::EINVAL | libc::EBADF),
        "ftruncate on an O_RDONLY fd: expected EINVAL or EBADF, got {}",
        errno_name(errno_of(&r))
    );
}

fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

fn utimens(e: &Env) {
    let times = |p: &Path| {
        let m = lstat(p);
        ((m.atime(), m.atime_nsec()), (m.mtime(), m.mtime_nsec()))
    };
    for rel in ["small.txt", "dir", "big.bin"] {
        let p = e.p(rel);
        ok(
            "utimensat",
            &p,
            utimensat(
                &p,
                [ts(1_000_000_000, 123), ts(1_600_000_000, 987_654_321)],
                0,
            ),
        );
        assert_eq!(
            times(&p),
            ((1_000_000_000, 123), (1_600_000_000, 987_654_321)),
            "times of {rel}"
        );
    }
    let n = e.p("new");
    create_file(&n, b"n");
    ok("utimensat", &n, utimensat(&n, [ts(5, 0), ts(6, 7)], 0));
    assert_eq!(times(&n), ((5, 0), (6, 7)), "times of new");
    // UTIME_OMIT keeps one, explicit sets the other.
    let s = e.p("small.txt");
    ok(
        "utimensat OMIT atime",
        &s,
        utimensat(&s, [ts(0, libc::UTIME_OMIT), ts(42, 42)], 0),
    );
    assert_eq!(
        times(&s),
        ((1_000_000_000, 123), (42, 42)),
        "after UTIME_OMIT atime"
    );
    ok(
        "utimensat OMIT mtime",
        &s,
        utimensat(&s, [ts(77, 7), ts(0, libc::UTIME_OMIT)], 0),
    );
    assert_eq!(times(&s), ((77, 7), (42, 42)), "after UTIME_OMIT mtime");
    // UTIME_NOW.
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    ok(
        "utimensat NOW mtime",
        &s,
        utimensat(&s, [ts(0, libc::UTIME_OMIT), ts(0, libc::UTIME_NOW)], 0),
    );
    let after = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let ((asec, _), (msec, _)) = times(&s);
    assert_eq!(asec, 77, "atime after UTIME_NOW on mtime only");
    assert!(
        (before - 1..=after + 1).contains(&msec),
        "mtime after UTIME_NOW: {msec}, expected within [{before}, {after}]"
    );
    ok(
        "utimensat NOW both",
        &n,
        utimensat(&n, [ts(0, libc::UTIME_NOW), ts(0, libc::UTIME_NOW)], 0),
    );
    let ((asec, _), (msec, _)) = times(&n);
    assert!(
        (before - 1..=after + 2).contains(&asec) && (before - 1..=after + 2).contains(&msec),
        "times after UTIME_NOW: atime {asec}, mtime {msec}, now ~{after}"
    );
    // A symlink itself (AT_SYMLINK_NOFOLLOW); the target keeps its times.
    let l = e.p("link");
    let target_before = times(&s);
    ok(
        "utimensat NOFOLLOW",
        &l,
        utimensat(&l, [ts(11, 1), ts(22, 2)], libc::AT_SYMLINK_NOFOLLOW),
    );
    assert_eq!(times(&l), ((11, 1), (22, 2)), "times of the symlink");
    assert_eq!(times(&s), target_before, "the target's times changed");
    // A write updates mtime (to now).
    let b = e.p("big.bin");
    let f = ok("open", &b, open_rw(&b));
    ok("pwrite", &b, f.write_all_at(b"x", 0));
    drop(f);
    let ((_, _), (msec, _)) = times(&b);
    assert!(
        msec >= before - 1,
        "mtime of big.bin after a write: {msec} < {before}"
    );
    // Before the epoch, with nanoseconds: -86400 s + 1 ns is (tv_sec -86400, tv_nsec 1).
    let n = e.p("new");
    ok(
        "utimensat before the epoch",
        &n,
        utimensat(&n, [ts(-1, 999_999_999), ts(-86_400, 1)], 0),
    );
    assert_eq!(
        times(&n),
        ((-1, 999_999_999), (-86_400, 1)),
        "times of new set before the epoch (as (sec, nsec))"
    );
    let m = e.p("missing");
    fails(
        "utimensat missing",
        &m,
        utimensat(&m, [ts(1, 0), ts(1, 0)], 0),
        libc::ENOENT,
    );
}

fn fallocate_modes(e: &Env) {
    use libc::{FALLOC_FL_KEEP_SIZE as KEEP, FALLOC_FL_PUNCH_HOLE as PUNCH};
    // Default mode grows a new file; the new range reads zeros.
    let n = e.p("new");
    create_file(&n, b"abc");
    let f = ok("open", &n, open_rw(&n));
    ok("fallocate 0", &n, fallocate(&f, 0, 0, 3 * MIB));
    assert_eq!(ok("fstat", &n, f.metadata()).len(), 3 * MIB);
    let mut want = b"abc".to_vec();
    want.resize(3 * MIB as usize, 0);
    same_bytes("new after fallocate", &read(&n), &want);
    // Within the size: nothing changes.
    ok("fallocate 0 inside", &n, fallocate(&f, 0, 1, 2));
    same_bytes("new after fallocate inside", &read(&n), &want);
    // Punch a hole in it.
    ok(
        "fallocate PUNCH|KEEP",
        &n,
        fallocate(&f, PUNCH | KEEP, 1, 1),
    );
    want[1] = 0;
    same_bytes("new after punch", &read(&n), &want);
    drop(f);

    // A base file: grow with mode 0.
    let s = e.p("small.txt");
    let f = ok("open", &s, open_rw(&s));
    ok("fallocate 0 base", &s, fallocate(&f, 0, MIB, MIB));
    let mut want = SMALL.to_vec();
    want.resize(2 * MIB as usize, 0);
    same_bytes("small.txt after fallocate", &read(&s), &want);
    drop(f);

    // KEEP_SIZE past the end: the size stays.
    let b = e.p("big.bin");
    let f = ok("open", &b, open_rw(&b));
    ok(
        "fallocate KEEP_SIZE",
        &b,
        fallocate(&f, KEEP, BIG_LEN as u64 - 10, MIB),
    );
    assert_eq!(lstat(&b).len(), BIG_LEN as u64, "size after KEEP_SIZE");
    same_bytes("big.bin after KEEP_SIZE", &read(&b), &big_base());
    // Punch across two block boundaries of a base file: zeros there, the base elsewhere.
    let (off, len) = (MIB - 100, MIB + 200);
    ok(
        "fallocate PUNCH|KEEP base",
        &b,
        fallocate(&f, PUNCH | KEEP, off, len),
    );
    let mut want = big_base();
    want[off as usize..(off + len) as usize].fill(0);
    assert_eq!(lstat(&b).len(), BIG_LEN as u64, "size after PUNCH_HOLE");
    same_bytes("big.bin after punch", &read(&b), &want);
    // Punching past the end does not grow the file.
    ok(
        "fallocate PUNCH|KEEP past end",
        &b,
        fallocate(&f, PUNCH | KEEP, BIG_LEN as u64 - 5, MIB),
    );
    want[BIG_LEN - 5..].fill(0);
    same_bytes("big.bin after punch at the end", &read(&b), &want);
    assert_eq!(lstat(&b).len(), BIG_LEN as u64);
    // PUNCH_HOLE needs KEEP_SIZE.
    fails(
        "fallocate PUNCH without KEEP",
        &b,
        fallocate(&f, PUNCH, 0, 10),
        libc::EOPNOTSUPP,
    );
    drop(f);
    let f = ok("open O_RDONLY", &b, File::open(&b));
    fails(
        "fallocate on O_RDONLY fd",
        &b,
        fallocate(&f, 0, 0, 10),
        libc::EBADF,
    );
}

fn xattrs(e: &Env) {
    use libc::{XATTR_CREATE, XATTR_REPLACE};
    let s = e.p("small.txt");
    let get = |p: &Path, n: &str| ok("getxattr", p, xattr::get(p, n));
    assert_eq!(get(&s, "user.colour").as_deref(), Some(&b"green"[..]));
    assert_eq!(get(&s, "user.empty").as_deref(), Some(&b""[..]));
    assert_eq!(get(&s, "user.missing"), None, "getxattr missing (ENODATA)");
    assert_eq!(
        user_xattrs(&s),
        ["user.colour", "user.empty"].map(String::from).into()
    );
    // XATTR_CREATE on an existing base attribute, XATTR_REPLACE on a missing one.
    fails(
        "setxattr CREATE existing",
        &s,
        setxattr(&s, "user.colour", b"red", XATTR_CREATE),
        libc::EEXIST,
    );
    fails(
        "setxattr REPLACE missing",
        &s,
        setxattr(&s, "user.nope", b"x", XATTR_REPLACE),
        libc::ENODATA,
    );
    fails(
        "removexattr missing",
        &s,
        removexattr(&s, "user.nope"),
        libc::ENODATA,
    );
    assert_eq!(get(&s, "user.colour").as_deref(), Some(&b"green"[..]));
    // Replace, create, remove on the base file.
    ok(
        "setxattr REPLACE",
        &s,
        setxattr(&s, "user.colour", b"blue", XATTR_REPLACE),
    );
    ok(
        "setxattr CREATE",
        &s,
        setxattr(&s, "user.new", b"n", XATTR_CREATE),
    );
    let big: Vec<u8> = bytes(3, 4000);
    ok(
        "setxattr large binary",
        &s,
        setxattr(&s, "user.big", &big, 0),
    );
    ok(
        "removexattr base attribute",
        &s,
        removexattr(&s, "user.empty"),
    );
    fails(
        "removexattr twice",
        &s,
        removexattr(&s, "user.empty"),
        libc::ENODATA,
    );
    assert_eq!(get(&s, "user.colour").as_deref(), Some(&b"blue"[..]));
    assert_eq!(get(&s, "user.big"), Some(big.clone()));
    assert_eq!(
        user_xattrs(&s),
        ["user.big", "user.colour", "user.new"]
            .map(String::from)
            .into()
    );
    // They survive a data write, a chmod and a rename.
    let f = ok("open", &s, open_rw(&s));
    ok("pwrite", &s, f.write_all_at(b"J", 0));
    drop(f);
    ok(
        "chmod",
        &s,
        fs::set_permissions(&s, fs::Permissions::from_mode(0o600)),
    );
    let r = e.p("dir/renamed");
    ok("rename", &s, fs::rename(&s, &r));
    assert_eq!(
        user_xattrs(&r),
        ["user.big", "user.colour", "user.new"]
            .map(String::from)
            .into()
    );
    assert_eq!(get(&r, "user.colour").as_deref(), Some(&b"blue"[..]));
    // Directories: base and new.
    let d = e.p("dir");
    assert_eq!(get(&d, "user.d").as_deref(), Some(&b"1"[..]));
    ok(
        "setxattr dir",
        &d,
        setxattr(&d, "user.d", b"2", XATTR_REPLACE),
    );
    assert_eq!(get(&d, "user.d").as_deref(), Some(&b"2"[..]));
    let nd = e.p("nd");
    ok("mkdir", &nd, fs::create_dir(&nd));
    ok(
        "setxattr new dir",
        &nd,
        setxattr(&nd, "user.x", b"y", XATTR_CREATE),
    );
    assert_eq!(user_xattrs(&nd), ["user.x"].map(String::from).into());
    // A new file; through a hard link.
    let n = e.p("new");
    create_file(&n, b"");
    assert!(user_xattrs(&n).is_empty());
    ok("setxattr new file", &n, setxattr(&n, "user.a", b"1", 0));
    ok(
        "setxattr hard1",
        &e.p("hard1"),
        setxattr(&e.p("hard1"), "user.h", b"h", 0),
    );
    assert_eq!(
        get(&e.p("dir/hard2"), "user.h").as_deref(),
        Some(&b"h"[..]),
        "xattr through the other link"
    );
    // User xattrs are not allowed on symlinks.
    let l = e.p("link");
    fails(
        "lsetxattr user.* on a symlink",
        &l,
        lsetxattr(&l, "user.x", b"1", 0),
        libc::EPERM,
    );
    // Missing entry.
    let m = e.p("missing");
    fails(
        "setxattr missing",
        &m,
        setxattr(&m, "user.x", b"1", 0),
        libc::ENOENT,
    );
}

fn statfs(e: &Env) {
    for rel in ["", "dir", "small.txt"] {
        let p = e.p(rel);
        let s = ok("statvfs", &p, statvfs(&p));
        assert!(
            s.f_bsize > 0 && s.f_frsize > 0,
            "statvfs {}: block size 0",
            p.display()
        );
        assert!(s.f_blocks > 0, "statvfs {}: f_blocks 0", p.display());
        assert!(
            s.f_bfree <= s.f_blocks && s.f_bavail <= s.f_blocks,
            "statvfs {}: free {} / avail {} > total {}",
            p.display(),
            s.f_bfree,
            s.f_bavail,
            s.f_blocks
        );
        assert!(
            s.f_ffree <= s.f_files,
            "statvfs {}: f_ffree > f_files",
            p.display()
        );
        assert!(
            s.f_namemax >= 255,
            "statvfs {}: f_namemax {}",
            p.display(),
            s.f_namemax
        );
        assert_eq!(
            s.f_flag & libc::ST_RDONLY,
            0,
            "statvfs {}: ST_RDONLY on a writable mount",
            p.display()
        );
        assert!(
            s.f_bavail > 0,
            "statvfs {}: no space available",
            p.display()
        );
    }
}

fn fsync_fdatasync(e: &Env) {
    let n = e.p("new");
    let mut f = ok("create", &n, File::create(&n));
    ok("write", &n, f.write_all(b"durable"));
    ok("fsync new", &n, f.sync_all());
    ok("write", &n, f.write_all(b"!"));
    ok("fdatasync new", &n, f.sync_data());
    drop(f);
    assert_eq!(read(&n), b"durable!");
    let b = e.p("big.bin");
    let f = ok("open", &b, open_rw(&b));
    ok("pwrite", &b, f.write_all_at(b"sync", 2 * MIB));
    ok("fdatasync base", &b, f.sync_data());
    ok("fsync base", &b, f.sync_all());
    drop(f);
    let mut want = big_base();
    want[2 * MIB as usize..2 * MIB as usize + 4].copy_from_slice(b"sync");
    same_bytes("big.bin after fsync", &read(&b), &want);
    // Directories and read-only descriptors can be synced too.
    for rel in ["", "dir", "emptydir"] {
        let p = e.p(rel);
        let d = ok("open dir", &p, File::open(&p));
        ok("fsync dir", &p, d.sync_all());
    }
    let s = e.p("small.txt");
    let f = ok("open O_RDONLY", &s, File::open(&s));
    ok("fsync O_RDONLY", &s, f.sync_all());
    ok("fdatasync O_RDONLY", &s, f.sync_data());
}

fn fcntl_lock(fd: i32, cmd: i32, ty: i32, start: i64, len: i64) -> Result<libc::flock, i32> {
    // SAFETY: a zeroed flock is valid; fcntl fills it for F_GETLK.
    unsafe {
        let mut fl: libc::flock = std::mem::zeroed();
        fl.l_type = ty as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = start;
        fl.l_len = len;
        if libc::fcntl(fd, cmd, &mut fl) == 0 {
            Ok(fl)
        } else {
            Err(last_errno())
        }
    }
}

fn posix_locks(e: &Env) {
    let n = e.p("new");
    create_file(&n, &[0u8; 1000]);
    for rel in ["small.txt", "new"] {
        let p = e.p(rel);
        let f = ok("open", &p, open_rw(&p));
        let me = std::process::id() as i32;
        if let Err(err) = fcntl_lock(f.as_raw_fd(), libc::F_SETLK, libc::F_WRLCK, 0, 100) {
            panic!("F_SETLK F_WRLCK {}: {}", p.display(), errno_name(err));
        }
        let c = c_path(&p);
        // Another process: a conflicting lock fails with EAGAIN.
        let child = |ty: i32, start: i64| {
            let c = c.as_ptr();
            in_child(move || {
                // SAFETY: plain system calls.
                let fd = unsafe { libc::open(c, libc::O_RDWR) };
                if fd < 0 {
                    return 200;
                }
                match fcntl_lock(fd, libc::F_SETLK, ty, start, 10) {
                    Ok(_) => 0,
                    Err(e) => e,
                }
            })
        };
        let seen = child(libc::F_WRLCK, 50);
        assert_eq!(
            seen,
            libc::EAGAIN,
            "F_SETLK F_WRLCK on a locked range of {} from another process: expected EAGAIN, got {}",
            p.display(),
            errno_name(seen)
        );
        let seen = child(libc::F_RDLCK, 0);
        assert_eq!(
            seen,
            libc::EAGAIN,
            "F_SETLK F_RDLCK on a write-locked range of {}: got {}",
            p.display(),
            errno_name(seen)
        );
        let seen = child(libc::F_WRLCK, 200);
        assert_eq!(
            seen,
            0,
            "F_SETLK on a free range of {}: got {}",
            p.display(),
            errno_name(seen)
        );
        // F_GETLK from another process reports us.
        let cp = c.as_ptr();
        let seen = in_child(move || {
            // SAFETY: plain system calls.
            let fd = unsafe { libc::open(cp, libc::O_RDWR) };
            if fd < 0 {
                return 200;
            }
            match fcntl_lock(fd, libc::F_GETLK, libc::F_WRLCK, 0, 10) {
                Ok(fl) if fl.l_type == libc::F_WRLCK as i16 && fl.l_pid == me => 0,
                Ok(_) => 201,
                Err(e) => e,
            }
        });
        assert_eq!(
            seen,
            0,
            "F_GETLK on {} did not report our write lock (code {seen})",
            p.display()
        );
        // Unlocked: the other process gets it.
        fcntl_lock(f.as_raw_fd(), libc::F_SETLK, libc::F_UNLCK, 0, 100).unwrap();
        let seen = child(libc::F_WRLCK, 50);
        assert_eq!(
            seen,
            0,
            "F_SETLK after unlock on {}: got {}",
            p.display(),
            errno_name(seen)
        );
    }
}

fn flock_locks(e: &Env) {
    let n = e.p("new");
    create_file(&n, b"");
    for rel in ["big.bin", "new"] {
        let p = e.p(rel);
        let a = ok("open", &p, File::open(&p));
        let b = ok("open", &p, File::open(&p));
        ok(
            "flock LOCK_EX|LOCK_NB",
            &p,
            flock(&a, libc::LOCK_EX | libc::LOCK_NB),
        );
        fails(
            "flock LOCK_EX|LOCK_NB conflicting",
            &p,
            flock(&b, libc::LOCK_EX | libc::LOCK_NB),
            libc::EWOULDBLOCK,
        );
        fails(
            "flock LOCK_SH|LOCK_NB conflicting",
            &p,
            flock(&b, libc::LOCK_SH | libc::LOCK_NB),
            libc::EWOULDBLOCK,
        );
        ok("flock LOCK_UN", &p, flock(&a, libc::LOCK_UN));
        ok(
            "flock LOCK_SH|LOCK_NB",
            &p,
            flock(&a, libc::LOCK_SH | libc::LOCK_NB),
        );
        ok(
            "flock LOCK_SH|LOCK_NB shared",
            &p,
            flock(&b, libc::LOCK_SH | libc::LOCK_NB),
        );
        fails(
            "flock LOCK_EX|LOCK_NB over shared",
            &p,
            flock(&a, libc::LOCK_EX | libc::LOCK_NB),
            libc::EWOULDBLOCK,
        );
        drop(b);
        ok(
            "flock LOCK_EX|LOCK_NB after close",
            &p,
            flock(&a, libc::LOCK_EX | libc::LOCK_NB),
        );
    }
}

fn unlinked_open_file(e: &Env) {
    // A new file.
    let n = e.p("new");
    create_file(&n, b"abc");
    let f = ok("open", &n, open_rw(&n));
    ok("unlink open file", &n, fs::remove_file(&n));
    gone(&n);
    assert!(
        !names(&e.root).contains("new"),
        "unlinked file still listed"
    );
    let mut buf = [0u8; 3];
    ok("pread unlinked", &n, f.read_exact_at(&mut buf, 0));
    assert_eq!(&buf, b"abc");
    ok("pwrite unlinked", &n, f.write_all_at(b"defg", 3));
    let mut buf = [0u8; 7];
    ok("pread unlinked", &n, f.read_exact_at(&mut buf, 0));
    assert_eq!(&buf, b"abcdefg");
    let m = ok("fstat unlinked", &n, f.metadata());
    assert_eq!(
        (m.len(), m.nlink()),
        (7, 0),
        "fstat (size, nlink) of an unlinked file"
    );
    ok("ftruncate unlinked", &n, f.set_len(2));
    ok("fsync unlinked", &n, f.sync_all());
    drop(f);
    gone(&n);

    // A big base file, opened before and after: readable, writable; a new file by the name is
    // another file.
    let b = e.p("big.bin");
    let f = ok("open", &b, open_rw(&b));
    ok("unlink open base file", &b, fs::remove_file(&b));
    gone(&b);
    create_file(&b, b"other");
    let base = big_base();
    let mut buf = vec![0u8; 4096];
    ok(
        "pread unlinked base",
        &b,
        f.read_exact_at(&mut buf, 2 * MIB),
    );
    same_bytes(
        "unlinked big.bin at 2 MiB",
        &buf,
        &base[2 * MIB as usize..2 * MIB as usize + 4096],
    );
    ok("pwrite unlinked base", &b, f.write_all_at(b"XYZ", MIB));
    let mut buf = vec![0u8; BIG_LEN];
    ok("pread unlinked base", &b, f.read_exact_at(&mut buf, 0));
    let mut want = base.clone();
    want[MIB as usize..MIB as usize + 3].copy_from_slice(b"XYZ");
    same_bytes("unlinked big.bin", &buf, &want);
    assert_eq!(read(&b), b"other", "the new big.bin");
    drop(f);
    assert_eq!(read(&b), b"other");

    // Replaced by rename while open read-only: the descriptor keeps the old content.
    let s = e.p("small.txt");
    let mut f = ok("open O_RDONLY", &s, File::open(&s));
    let r = e.p("ro.txt");
    ok("rename over open file", &r, fs::rename(&r, &s));
    let mut got = Vec::new();
    ok("read replaced", &s, f.read_to_end(&mut got));
    assert_eq!(
        got, SMALL,
        "open descriptor after its name was renamed over"
    );
    assert_eq!(read(&s), RO);
}

fn write_in_the_middle_of_a_big_base_file(e: &Env) {
    let b = e.p("big.bin");
    let mut want = big_base();
    // Read once first, so any cached pages must be invalidated by the write.
    let reader = ok("open", &b, File::open(&b));
    let mut before = vec![0u8; BIG_LEN];
    ok("pread", &b, reader.read_exact_at(&mut before, 0));
    let f = ok("open", &b, open_rw(&b));
    let writes: [(u64, Vec<u8>); 3] = [
        (MIB - 5, b"across-a-block-edge".to_vec()),
        (2 * MIB + 100, bytes(9, 4096)),
        (12345, vec![0xAB; 1]),
    ];
    for (off, data) in &writes {
        ok(&format!("pwrite at {off}"), &b, f.write_all_at(data, *off));
        want[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    assert_eq!(lstat(&b).len(), BIG_LEN as u64, "size after writes inside");
    let mut got = vec![0u8; BIG_LEN];
    ok(
        "pread through another descriptor",
        &b,
        reader.read_exact_at(&mut got, 0),
    );
    same_bytes("big.bin through a descriptor opened before", &got, &want);
    same_bytes("big.bin reopened", &read(&b), &want);
    // Past the end: the gap reads zeros.
    let off = BIG_LEN as u64 + MIB;
    ok("pwrite past end", &b, f.write_all_at(b"end", off));
    want.resize(off as usize, 0);
    want.extend_from_slice(b"end");
    same_bytes("big.bin after a write past the end", &read(&b), &want);
    drop(f);
    // Through one of a base hard-link pair.
    let h = e.p("dir/hard2");
    let f = ok("open", &h, open_rw(&h));
    ok("pwrite", &h, f.write_all_at(b"L", 0));
    drop(f);
    assert_eq!(read(&e.p("hard1")), b"Linked\n");
}

fn readdir_after_changes(e: &Env) {
    listing(&e.root, ROOT_NAMES);
    listing(&e.p("dir"), &["a.txt", "hard2", "sub"]);
    create_file(&e.p("a"), b"");
    create_file(&e.p("dir/b"), b"");
    ok("mkdir", &e.p("c"), fs::create_dir(e.p("c")));
    ok(
        "unlink",
        &e.p("small.txt"),
        fs::remove_file(e.p("small.txt")),
    );
    ok(
        "rename",
        &e.p("big.bin"),
        fs::rename(e.p("big.bin"), e.p("dir/big.bin")),
    );
    ok(
        "rename",
        &e.p("dir/a.txt"),
        fs::rename(e.p("dir/a.txt"), e.p("zz")),
    );
    ok("rmdir", &e.p("emptydir"), fs::remove_dir(e.p("emptydir")));
    ok(
        "symlink",
        &e.p("s"),
        std::os::unix::fs::symlink("zz", e.p("s")),
    );
    ok(
        "rename",
        &e.p("dir/sub"),
        fs::rename(e.p("dir/sub"), e.p("c/sub")),
    );
    ok("unlink", &e.p("a"), fs::remove_file(e.p("a")));
    create_file(&e.p("a"), b"again");
    listing(
        &e.root,
        &[
            "a", "c", "dir", "hard1", "link", "open.txt", "pubdir", "ro.txt", "rodir", "s", "zz",
        ],
    );
    listing(&e.p("dir"), &["b", "big.bin", "hard2"]);
    listing(&e.p("c"), &["sub"]);
    listing(&e.p("c/sub"), &["b.txt"]);
    // Many entries, in a new directory and in a base one (several readdir batches).
    ok("mkdir", &e.p("many"), fs::create_dir(e.p("many")));
    let mut many = Vec::new();
    for i in 0..300 {
        let name = format!("entry-with-a-longish-name-{i:04}");
        create_file(&e.p("many").join(&name), b"");
        create_file(&e.p("rodir").join(&name), b"");
        many.push(name);
    }
    for i in (0..300).step_by(3) {
        ok(
            "unlink",
            &e.p("rodir"),
            fs::remove_file(e.p("rodir").join(&many[i])),
        );
    }
    let many_refs: Vec<&str> = many.iter().map(String::as_str).collect();
    listing(&e.p("many"), &many_refs);
    let mut ro: Vec<&str> = many_refs
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 0)
        .map(|(_, n)| *n)
        .collect();
    ro.push("inner.txt");
    listing(&e.p("rodir"), &ro);
}

fn permissions_as_non_root(e: &Env) {
    // Root-made entries the unprivileged user meets.
    let secret = e.p("secret");
    create_file(&secret, b"s");
    ok(
        "chmod",
        &secret,
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)),
    );
    let ro = c_path(&e.p("ro.txt"));
    let open_txt = c_path(&e.p("open.txt"));
    let rodir_new = c_path(&e.p("rodir/new"));
    let rodir_dir = c_path(&e.p("rodir/d"));
    let inner = c_path(&e.p("rodir/inner.txt"));
    let pub_x = c_path(&e.p("pubdir/x"));
    let pub_mine = c_path(&e.p("pubdir/mine"));
    let secret_c = c_path(&secret);
    let attr = std::ffi::CString::new("user.x").unwrap();
    let errno = |rc: i64| if rc < 0 { last_errno() } else { 0 };
    // Each case: (what, expected errno, the call).
    type Case<'a> = (&'a str, i32, Box<dyn Fn() -> i32 + 'a>);
    // SAFETY (all closures): plain system calls on valid NUL-terminated strings.
    let cases: Vec<Case> = vec![
        (
            "open ro.txt O_RDONLY",
            0,
            Box::new(|| errno(unsafe { libc::open(ro.as_ptr(), libc::O_RDONLY) } as i64)),
        ),
        (
            "open ro.txt O_WRONLY",
            libc::EACCES,
            Box::new(|| errno(unsafe { libc::open(ro.as_ptr(), libc::O_WRONLY) } as i64)),
        ),
        (
            "truncate ro.txt",
            libc::EACCES,
            Box::new(|| errno(unsafe { libc::truncate(ro.as_ptr(), 0) } as i64)),
        ),
        (
            "chmod ro.txt",
            libc::EPERM,
            Box::new(|| errno(unsafe { libc::chmod(ro.as_ptr(), 0o666) } as i64)),
        ),
        (
            "setxattr ro.txt",
            libc::EACCES,
            Box::new(|| {
                errno(unsafe {
                    libc::setxattr(ro.as_ptr(), attr.as_ptr(), b"1".as_ptr().cast(), 1, 0)
                } as i64)
            }),
        ),
        (
            "open secret (0600 root) O_RDONLY",
            libc::EACCES,
            Box::new(|| errno(unsafe { libc::open(secret_c.as_ptr(), libc::O_RDONLY) } as i64)),
        ),
        (
            "create in rodir (0755 root)",
            libc::EACCES,
            Box::new(|| {
                errno(unsafe {
                    libc::open(rodir_new.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644)
                } as i64)
            }),
        ),
        (
            "mkdir in rodir",
            libc::EACCES,
            Box::new(|| errno(unsafe { libc::mkdir(rodir_dir.as_ptr(), 0o755) } as i64)),
        ),
        (
            "unlink in rodir",
            libc::EACCES,
            Box::new(|| errno(unsafe { libc::unlink(inner.as_ptr()) } as i64)),
        ),
        (
            "rename out of rodir",
            libc::EACCES,
            Box::new(|| errno(unsafe { libc::rename(inner.as_ptr(), pub_x.as_ptr()) } as i64)),
        ),
        (
            "open open.txt (0666) O_WRONLY",
            0,
            Box::new(|| errno(unsafe { libc::open(open_txt.as_ptr(), libc::O_WRONLY) } as i64)),
        ),
        (
            "create in pubdir (0777)",
            0,
            Box::new(|| {
                errno(unsafe {
                    libc::open(pub_mine.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o600)
                } as i64)
            }),
        ),
    ];
    let mut wrong = Vec::new();
    for (what, want, call) in &cases {
        let seen = as_nobody(call);
        if seen != *want {
            wrong.push(format!(
                "{what} as uid 65534: expected {}, got {}",
                errno_name(*want),
                errno_name(seen)
            ));
        }
    }
    assert!(wrong.is_empty(), "permission checks:\n{}", wrong.join("\n"));
    // What nobody created is nobody's; root can still read it.
    let m = lstat(&e.p("pubdir/mine"));
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777),
        (65534, 65534, 0o600),
        "owner/mode of pubdir/mine"
    );
    assert_eq!(read(&e.p("ro.txt")), RO);
}

/// Changes made by another process are seen at once, even where this one had read (and the
/// kernel cached) data, attributes, names and listings before.
fn other_process_changes_are_seen(e: &Env) {
    let b = e.p("big.bin");
    let f = ok("open", &b, File::open(&b));
    let mut before = vec![0u8; 4096];
    ok("pread", &b, f.read_exact_at(&mut before, MIB));
    assert_eq!(lstat(&b).len(), BIG_LEN as u64);
    listing(&e.p("dir"), &["a.txt", "hard2", "sub"]);
    gone(&e.p("dir/born"));
    assert_eq!(read(&e.p("dir/a.txt")), b"a\n");
    let (cb, born, a, nd) = (
        c_path(&b),
        c_path(&e.p("dir/born")),
        c_path(&e.p("dir/a.txt")),
        c_path(&e.p("dir/sub/new-dir")),
    );
    let seen = in_child(|| {
        // SAFETY: plain system calls on valid strings and buffers.
        unsafe {
            let fd = libc::open(cb.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::pwrite(fd, b"CHILD".as_ptr().cast(), 5, MIB as i64) != 5 {
                return 1;
            }
            if libc::pwrite(fd, b"END".as_ptr().cast(), 3, BIG_LEN as i64) != 3 {
                return 2;
            }
            libc::close(fd);
            let fd = libc::open(born.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644);
            if fd < 0 || libc::write(fd, b"born".as_ptr().cast(), 4) != 4 {
                return 3;
            }
            libc::close(fd);
            if libc::unlink(a.as_ptr()) != 0 || libc::mkdir(nd.as_ptr(), 0o755) != 0 {
                return 4;
            }
        }
        0
    });
    assert_eq!(seen, 0, "the other process's changes failed (step {seen})");
    let mut now = vec![0u8; 5];
    ok("pread", &b, f.read_exact_at(&mut now, MIB));
    assert_eq!(
        &now, b"CHILD",
        "a descriptor opened before sees another process's write"
    );
    assert_eq!(
        ok("fstat", &b, f.metadata()).len(),
        BIG_LEN as u64 + 3,
        "fstat size after another process extended the file"
    );
    assert_eq!(
        lstat(&b).len(),
        BIG_LEN as u64 + 3,
        "stat size after another process's write"
    );
    assert_eq!(read(&e.p("dir/born")), b"born");
    gone(&e.p("dir/a.txt"));
    listing(&e.p("dir"), &["born", "hard2", "sub"]);
    listing(&e.p("dir/sub"), &["b.txt", "new-dir"]);
}

// ---------------------------------------------------------------------------------------------
// Mount-only behaviour.

/// A rename out of the mount is EXDEV (the kernel's check; the overlay must not hide it).
#[test]
fn mount_rename_out_of_the_mount_is_exdev() {
    let e = Env::mount();
    let s = e.p("small.txt");
    let out = e.tmp.path().join("outside");
    fails(
        "rename out of the mount",
        &s,
        fs::rename(&s, &out),
        libc::EXDEV,
    );
    fails(
        "link out of the mount",
        &s,
        fs::hard_link(&s, &out),
        libc::EXDEV,
    );
}

/// `--read-only` refuses every change with EROFS, and statfs says so.
#[test]
fn mount_read_only_refuses_writes() {
    let e = Env::mount_with(&["--read-only"]);
    let s = e.p("small.txt");
    fails(
        "open O_WRONLY",
        &s,
        OpenOptions::new().write(true).open(&s),
        libc::EROFS,
    );
    fails(
        "create",
        &e.p("new"),
        fs::write(e.p("new"), b""),
        libc::EROFS,
    );
    fails("mkdir", &e.p("nd"), fs::create_dir(e.p("nd")), libc::EROFS);
    fails("unlink", &s, fs::remove_file(&s), libc::EROFS);
    fails("rename", &s, fs::rename(&s, e.p("x")), libc::EROFS);
    fails(
        "chmod",
        &s,
        fs::set_permissions(&s, fs::Permissions::from_mode(0o600)),
        libc::EROFS,
    );
    fails("setxattr", &s, setxattr(&s, "user.x", b"1", 0), libc::EROFS);
    let st = ok("statvfs", &e.root, statvfs(&e.root));
    assert_ne!(
        st.f_flag & libc::ST_RDONLY,
        0,
        "statvfs of a --read-only mount lacks ST_RDONLY"
    );
    assert_eq!(read(&s), SMALL);
}

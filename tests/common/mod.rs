//! Shared helpers of the FUSE integration tests (`tests/fuse_*.rs`): the `horcrux` binary,
//! temporary directories, `generate` and `mount` through the CLI, guards that always unmount,
//! and a builder of source trees with every kind of entry.
//!
//! These tests use the real kernel FUSE (`/dev/fuse`) and `fusermount3`, and run `horcrux`
//! as a separate process, exactly as a user does. Build it first: `cargo build --workspace`.

#![allow(dead_code)]

use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

/// The `horcrux` binary: `$HORCRUX_BIN`, else the one built beside this test executable
/// (`<target>/debug/horcrux`), else `<workspace>/target/debug/horcrux`.
pub fn horcrux_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HORCRUX_BIN") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "HORCRUX_BIN={} does not exist", p.display());
        return p;
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // <target>/debug/deps/<test> → <target>/debug/horcrux
        if let Some(dir) = exe.parent().and_then(Path::parent) {
            candidates.push(dir.join("horcrux"));
        }
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debug/horcrux"));
    for c in &candidates {
        if c.exists() {
            return c.clone();
        }
    }
    panic!(
        "the horcrux binary is not built (looked at {candidates:?}): run `cargo build --workspace` \
         before these tests, or set HORCRUX_BIN"
    );
}

/// A temporary directory under /var/tmp (tmpfs under /tmp may refuse user xattrs).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("horcrux-fuse-test")
        .tempdir_in("/var/tmp")
        .expect("create a temporary directory in /var/tmp")
}

/// A work directory for a test, and its guard: with HORCRUX_KEEP=1 it is kept (logs and all)
/// for a look afterwards, and its path printed; otherwise it goes when the guard drops.
pub fn work_dir() -> (PathBuf, Option<tempfile::TempDir>) {
    let t = tempdir();
    let root = t.path().to_path_buf();
    if std::env::var_os("HORCRUX_KEEP").is_some() {
        eprintln!("keeping {}", t.keep().display());
        (root, None)
    } else {
        (root, Some(t))
    }
}

/// `horcrux ARGS...` to completion.
pub fn horcrux(args: &[&OsStr]) -> Output {
    Command::new(horcrux_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run horcrux")
}

/// Like [`horcrux`] but the command must succeed; returns its stdout.
pub fn horcrux_ok(args: &[&OsStr]) -> String {
    let out = horcrux(args);
    assert!(
        out.status.success(),
        "horcrux {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `horcrux generate NAME IN OUT --chunk-size 1M`.
pub fn generate(name: &str, input: &Path, repo: &Path) {
    horcrux_ok(&[
        "generate".as_ref(),
        name.as_ref(),
        input.as_os_str(),
        repo.as_os_str(),
        "--chunk-size".as_ref(),
        "1M".as_ref(),
    ]);
}

/// `file://` URL of a local repository directory.
pub fn url(repo: &Path) -> String {
    format!("file://{}", repo.display())
}

/// Is `path` currently a mount point (per this process's mount table)?
pub fn is_mounted(path: &Path) -> bool {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = path.as_os_str().as_bytes();
    text.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|mp| unescape(mp) == want))
}

fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Is process `pid` running (and not a zombie)?
pub fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X")
    })
}

/// Last resort cleanup: lazy unmount through fusermount3 (works on dead mounts too).
pub fn force_unmount(mp: &Path) {
    if is_mounted(mp) {
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(mp)
            .stderr(Stdio::null())
            .status();
    }
}

/// A writable mount's overlay beside its mountpoint (`<mountpoint>.overlay`), unless the
/// test chose one or mounts read-only: tests never leave changes in the state directory.
pub fn default_overlay(mountpoint: &Path, extra: &[&str]) -> Option<PathBuf> {
    if extra
        .iter()
        .any(|a| *a == "--read-only" || *a == "--overlay-dir")
    {
        return None;
    }
    Some(mountpoint.with_extension("overlay"))
}

/// A detached mount made with `horcrux mount`; unmounted (and its daemon stopped) on drop.
#[derive(Debug)]
pub struct Mount {
    pub mountpoint: PathBuf,
    pub cache_dir: PathBuf,
    /// The daemon, as `horcrux mount` reports it.
    pub pid: u32,
    /// Its log file.
    pub log: PathBuf,
    /// What `horcrux mount` printed.
    pub stdout: String,
}

impl Mount {
    /// `horcrux mount <file://repo> <mountpoint> --cache-dir <cache_dir> EXTRA...`, which
    /// must succeed. The mountpoint is created if missing.
    pub fn new(repo: &Path, mountpoint: &Path, cache_dir: &Path, extra: &[&str]) -> Mount {
        fs::create_dir_all(mountpoint).unwrap();
        let u = url(repo);
        let mut args: Vec<&OsStr> = vec![
            "mount".as_ref(),
            u.as_ref(),
            mountpoint.as_os_str(),
            "--cache-dir".as_ref(),
            cache_dir.as_os_str(),
        ];
        args.extend(extra.iter().map(OsStr::new));
        let overlay = default_overlay(mountpoint, extra);
        if let Some(o) = &overlay {
            args.extend(["--overlay-dir".as_ref(), o.as_os_str()]);
        }
        Mount::live(horcrux_ok(&args), mountpoint, cache_dir)
    }

    /// The guard of a mount that `horcrux mount` reported live with `stdout`.
    pub fn live(stdout: String, mountpoint: &Path, cache_dir: &Path) -> Mount {
        // "mounted VOL@COMMIT on MP (pid N, log: FILE)"
        let pid = stdout
            .split("(pid ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in mount's output: {stdout}"));
        let log = stdout
            .split("log: ")
            .nth(1)
            .map(|r| PathBuf::from(r.trim().trim_end_matches(')')))
            .unwrap_or_default();
        Mount {
            mountpoint: mountpoint.canonicalize().unwrap(),
            cache_dir: cache_dir.to_path_buf(),
            pid,
            log,
            stdout,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// `horcrux umount`, which must succeed; afterwards the daemon is gone.
    pub fn unmount(mut self) {
        horcrux_ok(&["umount".as_ref(), self.mountpoint.as_os_str()]);
        assert!(!is_mounted(&self.mountpoint));
        wait_until(Duration::from_secs(10), || !alive(self.pid));
        assert!(!alive(self.pid), "the daemon outlived its unmount");
        self.pid = 0;
        // Logs land in the system's log directory: keep them only when something failed.
        let _ = fs::remove_file(&self.log);
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.pid == 0 {
            return;
        }
        if is_mounted(&self.mountpoint) {
            let _ = horcrux(&["umount".as_ref(), self.mountpoint.as_os_str()]);
        }
        force_unmount(&self.mountpoint);
        if alive(self.pid) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        }
    }
}

/// `horcrux mount --foreground` as a child process of the test; stopped on drop.
#[derive(Debug)]
pub struct Foreground {
    pub mountpoint: PathBuf,
    pub child: Child,
    /// The line it printed once live.
    pub banner: String,
}

impl Foreground {
    /// Start it and wait for its "mounted ..." line (the mount is live then).
    pub fn new(repo: &Path, mountpoint: &Path, cache_dir: &Path, extra: &[&str]) -> Foreground {
        fs::create_dir_all(mountpoint).unwrap();
        let mut child = Command::new(horcrux_bin())
            .arg("mount")
            .arg(url(repo))
            .arg(mountpoint)
            .arg("--foreground")
            .arg("--cache-dir")
            .arg(cache_dir)
            .args(extra)
            .args(
                default_overlay(mountpoint, extra)
                    .map(|o| vec!["--overlay-dir".into(), o.into_os_string()])
                    .unwrap_or_default(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(Self::log_path(mountpoint)).unwrap())
            .spawn()
            .expect("start horcrux mount --foreground");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let banner = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let mut fg = Foreground {
            mountpoint: mountpoint.canonicalize().unwrap(),
            child,
            banner,
        };
        if !fg.banner.starts_with("mounted ") {
            let status = fg.child.try_wait().ok().flatten();
            panic!(
                "horcrux mount --foreground did not report a live mount (status {status:?}, \
                 printed {:?}); its stderr:\n{}",
                fg.banner,
                fg.log_text()
            );
        }
        fg
    }

    /// Where its stderr (the log, in the foreground) goes: beside the mountpoint.
    fn log_path(mountpoint: &Path) -> PathBuf {
        mountpoint.with_extension("stderr.log")
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(Self::log_path(&self.mountpoint)).unwrap_or_default()
    }

    /// Send `sig` and wait for the process to exit (within 20 s).
    pub fn stop(&mut self, sig: i32) -> std::process::ExitStatus {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "horcrux mount did not exit after signal {sig}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: as above.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        force_unmount(&self.mountpoint);
    }
}

/// Poll `cond` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deterministic pseudo-random bytes (xorshift), distinct per seed.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// Set atime and mtime of `p` (not following symlinks), in ns since the epoch.
pub fn set_times(p: &Path, atime_ns: i64, mtime_ns: i64) {
    let ts = |ns: i64| libc::timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000),
    };
    let times = [ts(atime_ns), ts(mtime_ns)];
    let c = cpath(p);
    // SAFETY: valid path and a two-element timespec array.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(
        rc,
        0,
        "utimensat {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

/// `mknod` (fifos, devices).
pub fn mknod(p: &Path, mode: u32, dev: u64) {
    let c = cpath(p);
    // SAFETY: valid path.
    let rc = unsafe { libc::mknod(c.as_ptr(), mode, dev as libc::dev_t) };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

/// `lchown`.
pub fn lchown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

/// Whether `dir`'s filesystem accepts user xattrs.
pub fn xattrs_supported(dir: &Path) -> bool {
    let p = dir.join(".xattr-probe");
    fs::write(&p, b"").unwrap();
    let ok = xattr::set(&p, "user.probe", b"1").is_ok();
    fs::remove_file(&p).unwrap();
    ok
}

/// What [`rich_tree`] made, for tests that need to know.
#[derive(Debug)]
pub struct RichTree {
    pub xattrs: bool,
    /// A live socket in the tree (bound while this lives).
    pub _socket: std::os::unix::net::UnixListener,
}

/// A source tree with every file type and the edge cases the format must keep: empty files,
/// files of exactly the chunk size (1 MiB) and ±1 byte, multi-chunk and sparse files, hard
/// links, symlinks (relative, absolute, dangling), fifo, socket, character and block devices,
/// setuid/setgid/sticky modes, other owners, times before the epoch and with nanoseconds,
/// xattrs (empty, binary, large), unicode names, a deep path and a directory large enough to
/// be listed in several batches.
pub fn rich_tree(root: &Path) -> RichTree {
    fs::create_dir_all(root).unwrap();
    let w = |rel: &str, data: &[u8]| {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
    };
    w("empty", b"");
    w("small.txt", b"hello horcrux\n");
    for (name, len) in [
        ("chunk-1", MIB - 1),
        ("chunk", MIB),
        ("chunk+1", MIB + 1),
        ("two-chunks", 2 * MIB),
    ] {
        w(name, &bytes(len, len as usize));
    }
    w("big.bin", &bytes(7, (3 * MIB + 12345) as usize));
    for i in 0..1500u64 {
        w(
            &format!("many/f{i:04}"),
            &bytes(i, (i * 97 % 5000) as usize),
        );
    }
    w("dir/ünïcødé 文件 🚀.txt", "unicode name\n".as_bytes());
    w("dir/with space & 'quotes'", b"odd name\n");
    w("dir/\u{200b}zero-width", b"zw\n");
    let deep: String = (0..40).map(|i| format!("d{i}/")).collect();
    w(&format!("{deep}leaf"), b"deep\n");

    // Sparse files: data, a hole across a chunk boundary, data; and one that is all hole.
    let f = fs::File::create(root.join("sparse")).unwrap();
    f.write_all_at(&bytes(11, 5000), 0).unwrap();
    f.write_all_at(&bytes(12, 7000), 3 * MIB + 100).unwrap();
    f.set_len(5 * MIB).unwrap();
    fs::File::create(root.join("all-hole"))
        .unwrap()
        .set_len(2 * MIB + 3)
        .unwrap();

    std::os::unix::fs::symlink("small.txt", root.join("link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", root.join("dangling")).unwrap();
    std::os::unix::fs::symlink("../small.txt", root.join("dir/up-link")).unwrap();
    fs::hard_link(root.join("small.txt"), root.join("dir/hard")).unwrap();
    fs::hard_link(root.join("big.bin"), root.join("many/big-hard")).unwrap();
    fs::hard_link(root.join("big.bin"), root.join("big-hard-2")).unwrap();

    mknod(&root.join("fifo"), libc::S_IFIFO | 0o640, 0);
    mknod(
        &root.join("null-dev"),
        libc::S_IFCHR | 0o600,
        libc::makedev(1, 3),
    );
    mknod(
        &root.join("block-dev"),
        libc::S_IFBLK | 0o660,
        libc::makedev(7, 200),
    );
    let socket = std::os::unix::net::UnixListener::bind(root.join("live.sock")).unwrap();

    let mode = |rel: &str, m: u32| {
        fs::set_permissions(root.join(rel), fs::Permissions::from_mode(m)).unwrap()
    };
    mode("small.txt", 0o4755);
    w("setgid", b"g\n");
    mode("setgid", 0o2750);
    w("private", b"secret\n");
    mode("private", 0o400);
    fs::create_dir_all(root.join("sticky")).unwrap();
    mode("sticky", 0o1777);
    fs::create_dir_all(root.join("emptydir")).unwrap();
    mode("emptydir", 0o700);
    w("owned", b"by someone else\n");
    lchown(&root.join("owned"), 1234, 5678);
    lchown(&root.join("dangling"), 4321, 8765);
    lchown(&root.join("sticky"), 99, 99);

    let xattrs = xattrs_supported(root);
    if xattrs {
        xattr::set(root.join("small.txt"), "user.colour", b"green").unwrap();
        xattr::set(root.join("small.txt"), "user.binary", &[0, 1, 2, 255, 0]).unwrap();
        xattr::set(root.join("dir"), "user.empty", b"").unwrap();
        xattr::set(root.join("big.bin"), "user.large", &bytes(99, 3000)).unwrap();
    }

    // Times last: creating entries changes their directory's times.
    set_times(
        &root.join("small.txt"),
        1_000_000_000_123,
        1_600_000_000_987_654_321,
    );
    set_times(&root.join("empty"), -1_000_000_000, -86_400_000_000_123);
    set_times(&root.join("link"), 5, 1_234_567_890_000_000_001);
    set_times(&root.join("many"), 0, 42_000_000_007);
    set_times(&root.join("emptydir"), 0, -1);
    RichTree {
        xattrs,
        _socket: socket,
    }
}

/// Compare the tree under `mnt` with the source `src` entry by entry: names, type and mode,
/// owner, mtime and ctime (to the nanosecond), link count, size, device numbers, symlink
/// targets, xattrs, contents byte for byte, and hard links (names sharing a source inode share
/// a mounted inode, and only those). Panics listing every difference; returns the number of
/// entries compared.
pub fn compare_trees(src: &Path, mnt: &Path, with_xattrs: bool) -> u64 {
    use std::collections::HashMap;
    use std::os::unix::fs::MetadataExt;
    let mut diffs = Vec::new();
    let mut links: HashMap<u64, u64> = HashMap::new();
    let mut seen_mnt: HashMap<u64, u64> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    let mut count = 0u64;
    while let Some(rel) = stack.pop() {
        let (s, m) = (src.join(&rel), mnt.join(&rel));
        let sm = fs::symlink_metadata(&s).unwrap();
        let mm = match fs::symlink_metadata(&m) {
            Ok(x) => x,
            Err(e) => {
                diffs.push(format!("{}: missing in the mount: {e}", rel.display()));
                continue;
            }
        };
        count += 1;
        let r = rel.display();
        let mut check = |what: &str, a: i128, b: i128| {
            if a != b {
                diffs.push(format!("{r}: {what}: source {a:#o}/{a}, mount {b:#o}/{b}"));
            }
        };
        check("mode", sm.mode().into(), mm.mode().into());
        check("uid", sm.uid().into(), mm.uid().into());
        check("gid", sm.gid().into(), mm.gid().into());
        check("mtime", sm.mtime().into(), mm.mtime().into());
        check("mtime_nsec", sm.mtime_nsec().into(), mm.mtime_nsec().into());
        check("ctime", sm.ctime().into(), mm.ctime().into());
        check("ctime_nsec", sm.ctime_nsec().into(), mm.ctime_nsec().into());
        check("nlink", sm.nlink().into(), mm.nlink().into());
        let ft = sm.file_type();
        if !ft.is_dir() {
            check("size", sm.size().into(), mm.size().into());
        }
        {
            use std::os::unix::fs::FileTypeExt;
            if ft.is_char_device() || ft.is_block_device() {
                check("rdev", sm.rdev().into(), mm.rdev().into());
            }
        }
        // Hard links: the same source inode must appear as the same mounted inode.
        match links.insert(sm.ino(), mm.ino()) {
            Some(prev) if prev != mm.ino() => diffs.push(format!(
                "{r}: hard link to source inode {} shows as inode {} and {prev}",
                sm.ino(),
                mm.ino()
            )),
            _ => {}
        }
        if let Some(prev_src) = seen_mnt.insert(mm.ino(), sm.ino()) {
            if prev_src != sm.ino() {
                diffs.push(format!(
                    "{r}: mounted inode {} is shared by unrelated files",
                    mm.ino()
                ));
            }
        }
        if with_xattrs && !ft.is_symlink() {
            let names = |p: &Path| {
                let mut v: Vec<_> = xattr::list(p).unwrap().collect();
                v.sort();
                v
            };
            let (sn, mn) = (names(&s), names(&m));
            if sn != mn {
                diffs.push(format!("{r}: xattr names: source {sn:?}, mount {mn:?}"));
            }
            for n in &sn {
                let (a, b) = (xattr::get(&s, n).unwrap(), xattr::get(&m, n).ok().flatten());
                if a != b {
                    diffs.push(format!("{r}: xattr {n:?} differs"));
                }
            }
        }
        if ft.is_symlink() {
            let (a, b) = (fs::read_link(&s).unwrap(), fs::read_link(&m).ok());
            if Some(&a) != b.as_ref() {
                diffs.push(format!("{r}: symlink target: source {a:?}, mount {b:?}"));
            }
        } else if ft.is_file() {
            let a = fs::read(&s).unwrap();
            match fs::read(&m) {
                Ok(b) if a == b => {}
                Ok(b) => {
                    let at = a.iter().zip(&b).position(|(x, y)| x != y);
                    diffs.push(format!(
                        "{r}: content differs (lengths {} and {}, first difference at {at:?})",
                        a.len(),
                        b.len()
                    ));
                }
                Err(e) => diffs.push(format!("{r}: read failed: {e}")),
            }
        } else if ft.is_dir() {
            let names = |p: &Path| {
                let mut v: Vec<_> = fs::read_dir(p)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                v.sort();
                v
            };
            let (sn, mn) = (names(&s), names(&m));
            if sn != mn {
                diffs.push(format!(
                    "{r}: listing differs: {} source entries, {} mounted",
                    sn.len(),
                    mn.len()
                ));
            }
            stack.extend(sn.into_iter().map(|n| rel.join(n)));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} differences over {count} entries:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    count
}

// ---------------------------------------------------------------------------------------------
// Writable mounts (issue 4) and thin libc wrappers for the POSIX suites (tests/posix*.rs,
// tests/crash.rs, tests/database.rs).

/// Arguments that make a mount keep its local changes in `overlay`: `--overlay-dir OVERLAY`
/// followed by `extra`. For [`Mount::new`] and [`Foreground::new`].
pub fn overlay_args<'a>(overlay: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--overlay-dir",
        overlay.to_str().expect("overlay dir is UTF-8"),
    ];
    v.extend_from_slice(extra);
    v
}

/// A NUL-terminated copy of a path for libc calls.
pub fn c_path(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

/// The errno of a result: 0 for `Ok`, the OS error number (or -1 if it has none) for `Err`.
pub fn errno_of<T>(r: &std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

/// Symbolic name of an errno for messages ("EEXIST (17)"), 0 as "success".
pub fn errno_name(e: i32) -> String {
    let n = match e {
        0 => return "success".into(),
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN/EWOULDBLOCK",
        libc::EACCES => "EACCES",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTCONN => "ENOTCONN",
        libc::ERANGE => "ERANGE",
        libc::ETXTBSY => "ETXTBSY",
        _ => "?",
    };
    format!("{n} ({e})")
}

fn rc_result(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `renameat2(AT_FDCWD, from, AT_FDCWD, to, flags)` (RENAME_NOREPLACE, RENAME_EXCHANGE).
pub fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let (a, b) = (c_path(from), c_path(to));
    // SAFETY: valid NUL-terminated paths.
    rc_result(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    })
}

/// `mknod(path, mode, dev)` returning the error instead of panicking.
pub fn try_mknod(p: &Path, mode: u32, dev: u64) -> std::io::Result<()> {
    let c = c_path(p);
    // SAFETY: valid path.
    rc_result(unsafe { libc::mknod(c.as_ptr(), mode, dev as libc::dev_t) })
}

/// `fallocate(fd, mode, offset, len)`.
pub fn fallocate(f: &fs::File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor.
    rc_result(unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as i64, len as i64) })
}

/// `flock(fd, op)`.
pub fn flock(f: &fs::File, op: i32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor.
    rc_result(unsafe { libc::flock(f.as_raw_fd(), op) })
}

/// `lsetxattr(path, name, value, flags)` (XATTR_CREATE / XATTR_REPLACE; does not follow).
pub fn lsetxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> std::io::Result<()> {
    let (c, n) = (c_path(p), CString::new(name).unwrap());
    // SAFETY: valid strings and a buffer of the given length.
    rc_result(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

/// `setxattr(path, name, value, flags)` (follows symlinks).
pub fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> std::io::Result<()> {
    let (c, n) = (c_path(p), CString::new(name).unwrap());
    // SAFETY: valid strings and a buffer of the given length.
    rc_result(unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

/// `removexattr(path, name)` (follows symlinks).
pub fn removexattr(p: &Path, name: &str) -> std::io::Result<()> {
    let (c, n) = (c_path(p), CString::new(name).unwrap());
    // SAFETY: valid strings.
    rc_result(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) })
}

/// `utimensat(AT_FDCWD, path, times, flags)` with raw timespecs (UTIME_NOW / UTIME_OMIT allowed).
pub fn utimensat(p: &Path, times: [libc::timespec; 2], flags: i32) -> std::io::Result<()> {
    let c = c_path(p);
    // SAFETY: valid path and a two-element timespec array.
    rc_result(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) })
}

/// `statvfs(path)`.
pub fn statvfs(p: &Path) -> std::io::Result<libc::statvfs> {
    let c = c_path(p);
    // SAFETY: valid path; statvfs fills the zeroed struct.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        rc_result(libc::statvfs(c.as_ptr(), &mut s)).map(|()| s)
    }
}

/// Run `f` in a forked child with uid/gid 65534 (nobody/nogroup, no supplementary groups) and
/// return what it returns (an errno, 0 for success; 255 if dropping privileges failed).
/// `f` must only make plain system calls (no allocation, no locks): the parent is
/// multi-threaded. Build every CString before calling.
pub fn as_nobody(f: impl FnOnce() -> i32) -> i32 {
    as_user(65534, 65534, f)
}

/// [`as_nobody`] with a chosen uid and gid.
pub fn as_user(uid: u32, gid: u32, f: impl FnOnce() -> i32) -> i32 {
    in_child(|| {
        // SAFETY: plain system calls in the child.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return 255;
            }
        }
        f()
    })
}

/// Run `f` in a forked child (same credentials) and return its result as the exit status
/// (0..=255). Same restrictions on `f` as [`as_nobody`].
pub fn in_child(f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: fork; the child only runs `f` (plain system calls) and _exit.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let r = f();
            libc::_exit(r.clamp(0, 255));
        }
        let mut status = 0;
        while libc::waitpid(pid, &mut status, 0) < 0 {
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EINTR),
                "waitpid"
            );
        }
        assert!(
            libc::WIFEXITED(status),
            "forked child died abnormally (status {status:#x})"
        );
        libc::WEXITSTATUS(status)
    }
}

/// The errno of the last failed libc call, for use inside [`in_child`] closures.
pub fn last_errno() -> i32 {
    // SAFETY: __errno_location always returns this thread's errno.
    unsafe { *libc::__errno_location() }
}

/// `len` bytes at `off` of `p` read with O_DIRECT: no kernel page cache or readahead in the
/// way, so each `read_at` is one FUSE read of exactly that range. Short only at the end.
pub fn read_direct(p: &Path, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(p)?;
    // O_DIRECT wants an aligned buffer: over-allocate and read into an aligned slice.
    let mut buf = vec![0u8; len + 4096];
    let start = buf.as_ptr().align_offset(4096);
    let slice = &mut buf[start..start + len];
    let mut done = 0;
    while done < len {
        let n = f.read_at(&mut slice[done..], off + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(slice[..done].to_vec())
}

/// `horcrux cache verify --cache-dir DIR`, which must find nothing bad; its output.
pub fn cache_verify_clean(cache: &Path) -> String {
    let out = horcrux_ok(&[
        "cache".as_ref(),
        "verify".as_ref(),
        "--cache-dir".as_ref(),
        cache.as_os_str(),
    ]);
    assert!(
        out.contains("0 bad blocks dropped, 0 missing files, 0 bad manifests")
            && out.contains("cache is clean"),
        "cache verify found damage:\n{out}"
    );
    out
}

/// Blocks present in the cache at `cache`, summed over `horcrux cache ls`.
pub fn cached_blocks(cache: &Path) -> u64 {
    let out = horcrux_ok(&[
        "cache".as_ref(),
        "ls".as_ref(),
        "--cache-dir".as_ref(),
        cache.as_os_str(),
    ]);
    out.lines()
        .skip(1)
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.split_once('/').and_then(|(p, _)| p.parse::<u64>().ok()))
        })
        .sum()
}

/// A tiny deterministic generator (xorshift); seed it with a nonzero value.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Detach a dead (or live) FUSE mount: `umount -l`, else `fusermount3 -uz`.
pub fn lazy_unmount(mp: &Path) {
    let st = Command::new("umount").arg("-l").arg(mp).status();
    if !matches!(st, Ok(s) if s.success()) {
        force_unmount(mp);
    }
    assert!(
        !is_mounted(mp),
        "{} still mounted after umount -l",
        mp.display()
    );
}

//! `horcrux mount` / `horcrux umount` as a user runs them: mount returns only once the mount
//! is live (detached and in the foreground), signals unmount cleanly, and mistakes get clear
//! errors that leave nothing mounted.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// A small generated volume `vol`: (tempdir, repo).
fn small_repo() -> (tempfile::TempDir, PathBuf) {
    let t = tempdir();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("a.txt"), b"hello\n").unwrap();
    std::fs::write(src.join("sub/b.bin"), bytes(1, 3 * MIB as usize + 5)).unwrap();
    let repo = t.path().join("repo");
    generate("vol", &src, &repo);
    (t, repo)
}

/// `horcrux ARGS` must fail; returns its stderr.
fn fails(args: &[&OsStr]) -> String {
    let out = horcrux(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "horcrux {args:?} succeeded:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A daemon that failed names its log ("(log: FILE)"); the error is all it holds.
    if let Some(log) = stderr
        .split("(log: ")
        .nth(1)
        .and_then(|r| r.split(')').next())
    {
        let _ = std::fs::remove_file(log);
    }
    stderr
}

fn mount_args<'a>(access: &'a str, mp: &'a Path, cache: &'a Path) -> Vec<&'a OsStr> {
    vec![
        "mount".as_ref(),
        access.as_ref(),
        mp.as_os_str(),
        "--cache-dir".as_ref(),
        cache.as_os_str(),
        "--read-only".as_ref(),
    ]
}

#[test]
fn detached_mount_is_live_when_it_returns() {
    let (t, repo) = small_repo();
    let mnt = t.path().join("mnt");
    let cache = t.path().join("cache");
    for round in 0..5 {
        let m = Mount::new(&repo, &mnt, &cache, &[]);
        // No waiting: the very next stat and read must work.
        let md = std::fs::metadata(m.path("a.txt"))
            .unwrap_or_else(|e| panic!("round {round}: stat right after mount: {e}"));
        assert_eq!(md.len(), 6);
        assert_eq!(std::fs::read(m.path("a.txt")).unwrap(), b"hello\n");
        // "mounted vol@<commit> on <mp> (pid N, log: <dir>/vol-N.log)"
        assert!(
            m.stdout.starts_with("mounted vol@") && m.stdout.contains(" on "),
            "{}",
            m.stdout
        );
        assert!(alive(m.pid), "the daemon pid {} is not running", m.pid);
        assert!(m.log.exists(), "no log file {}", m.log.display());
        assert!(
            m.log
                .file_name()
                .unwrap()
                .to_string_lossy()
                .ends_with(&format!("-{}.log", m.pid)),
            "{}",
            m.log.display()
        );
        m.unmount();
    }
    // `--name` and `--ref` by commit prefix select the same thing.
    let m = Mount::new(&repo, &mnt, &cache, &["--name", "vol", "--ref", "main"]);
    let commit = m
        .stdout
        .split('@')
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap()
        .to_string();
    assert!(
        m.log
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("vol-")
    );
    m.unmount();
    let m = Mount::new(&repo, &mnt, &cache, &["--ref", &commit[..8]]);
    assert!(m.stdout.contains(&format!("vol@{commit}")), "{}", m.stdout);
    m.unmount();
}

#[test]
fn foreground_mount_unmounts_on_sigterm_and_sigint() {
    let (t, repo) = small_repo();
    let mnt = t.path().join("mnt");
    let cache = t.path().join("cache");
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut fg = Foreground::new(&repo, &mnt, &cache, &[]);
        assert!(fg.banner.contains("vol@"), "{}", fg.banner);
        assert_eq!(std::fs::read(mnt.join("a.txt")).unwrap(), b"hello\n");
        let st = fg.stop(sig);
        assert!(
            st.success(),
            "exit status after signal {sig}: {st}; its stderr:\n{}",
            fg.log_text()
        );
        assert!(
            !is_mounted(&fg.mountpoint),
            "still mounted after signal {sig}"
        );
    }
    // A busy mount is detached on the signal and served until its last file closes. (No
    // start-up profile: this checks signals; once in CI this case exited 1 with the profile's
    // store at unmount in the picture — see the session note.)
    let mut fg = Foreground::new(&repo, &mnt, &cache, &["--no-profile"]);
    let f = std::fs::File::open(mnt.join("sub/b.bin")).unwrap();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(fg.child.id() as i32, libc::SIGTERM) };
    assert!(wait_until(Duration::from_secs(10), || !is_mounted(
        &fg.mountpoint
    )));
    let mut buf = vec![0u8; 100];
    use std::os::unix::fs::FileExt;
    assert_eq!(f.read_at(&mut buf, MIB).unwrap(), 100);
    assert_eq!(buf, bytes(1, 3 * MIB as usize + 5)[MIB as usize..][..100]);
    assert!(
        fg.child.try_wait().unwrap().is_none(),
        "exited with a file open"
    );
    drop(f);
    let st = fg.stop(0);
    assert!(st.success(), "{st}; its stderr:\n{}", fg.log_text());
}

#[test]
fn mount_errors_are_clear_and_leave_nothing_mounted() {
    let (t, repo) = small_repo();
    let cache = t.path().join("cache");
    let u = url(&repo);
    let mnt = t.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();

    // A non-empty mountpoint.
    let full = t.path().join("src");
    let e = fails(&mount_args(&u, &full, &cache));
    assert!(e.contains("not empty"), "{e}");
    // Missing, and not a directory.
    let e = fails(&mount_args(&u, &t.path().join("nope"), &cache));
    assert!(e.contains("does not exist"), "{e}");
    let e = fails(&mount_args(&u, &full.join("a.txt"), &cache));
    assert!(e.contains("not a directory"), "{e}");

    // An unknown volume name lists the known ones.
    let mut a = mount_args(&u, &mnt, &cache);
    a.extend(["--name", "nope"].map(OsStr::new));
    let e = fails(&a);
    assert!(
        e.contains("no volume named `nope`") && e.contains("vol"),
        "{e}"
    );
    assert!(!is_mounted(&mnt));
    // An unknown ref.
    let mut a = mount_args(&u, &mnt, &cache);
    a.extend(["--ref", "no-such-branch"].map(OsStr::new));
    let e = fails(&a);
    assert!(e.contains("no-such-branch"), "{e}");
    // Not a repository, and a malformed URL.
    let not_repo = format!("file://{}", t.path().join("src").display());
    let e = fails(&mount_args(&not_repo, &mnt, &cache));
    assert!(e.contains("not a horcrux repository"), "{e}");
    let e = fails(&mount_args("file://relative/path", &mnt, &cache));
    assert!(e.contains("absolute"), "{e}");
    let e = fails(&mount_args("gopher://x/y", &mnt, &cache));
    assert!(e.contains("unknown scheme"), "{e}");
    assert!(!is_mounted(&mnt));

    // The same errors in the foreground.
    let mut a = mount_args(&u, &mnt, &cache);
    a.extend(["--name", "nope", "--foreground"].map(OsStr::new));
    let e = fails(&a);
    assert!(e.contains("no volume named `nope`"), "{e}");

    // Already mounted.
    let m = Mount::new(&repo, &mnt, &cache, &[]);
    let e = fails(&mount_args(&u, &mnt, &cache));
    assert!(e.contains("already a horcrux mount"), "{e}");
    m.unmount();
}

#[test]
fn umount_refuses_what_is_not_a_horcrux_mount() {
    let (t, repo) = small_repo();
    let e = fails(&["umount".as_ref(), t.path().as_os_str()]);
    assert!(e.contains("not a mount point"), "{e}");
    let e = fails(&["umount".as_ref(), "/proc".as_ref()]);
    assert!(e.contains("not a horcrux mount"), "{e}");

    // Busy: refused with advice; --lazy detaches and the daemon exits once files close.
    let m = Mount::new(&repo, &t.path().join("mnt"), &t.path().join("cache"), &[]);
    let f = std::fs::File::open(m.path("a.txt")).unwrap();
    let e = fails(&["umount".as_ref(), m.mountpoint.as_os_str()]);
    assert!(e.contains("busy") && e.contains("--lazy"), "{e}");
    assert!(is_mounted(&m.mountpoint));
    horcrux_ok(&[
        "umount".as_ref(),
        "--lazy".as_ref(),
        m.mountpoint.as_os_str(),
    ]);
    assert!(!is_mounted(&m.mountpoint));
    let mut s = String::new();
    use std::io::Read;
    (&f).read_to_string(&mut s).unwrap();
    assert_eq!(s, "hello\n");
    assert!(alive(m.pid));
    drop(f);
    assert!(
        wait_until(Duration::from_secs(10), || !alive(m.pid)),
        "the daemon did not exit after its last file closed"
    );
    let _ = std::fs::remove_file(&m.log);
}

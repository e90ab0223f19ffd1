//! Security properties of docs/SECURITY.md that need a real mount and real processes:
//! other users cannot reach a mount unless `--allow-other` is asked for (and then
//! `default_permissions` applies the files' modes); the cache, overlay and runtime directories
//! are private; S3 credentials given in the environment appear in no log, no process title and
//! no file horcrux writes.
//!
//! Build the binary first: `cargo build --workspace`.

mod common;
#[path = "support/remote.rs"]
mod remote;
#[path = "support/s3server.rs"]
mod s3server;
#[path = "support/sshd.rs"]
mod sshd;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;
use remote::*;

/// `cat PATH` as user `nobody` (uid 65534): its exit status and stderr.
fn cat_as_nobody(path: &Path) -> (bool, String) {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(path)
        .output()
        .expect("setpriv (util-linux)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn other_users_need_allow_other_and_then_the_files_modes_apply() {
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("public"), b"for everyone\n").unwrap();
    fs::write(src.join("secret"), b"root only\n").unwrap();
    fs::set_permissions(src.join("public"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    // The test directory itself must be traversable by nobody.
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let repo = t.path().join("repo");
    let a = Access::default();
    a.generate("vol", &src, &url(&repo));

    let m = a.mount(&url(&repo), &t.path().join("m"), &t.path().join("c"), &[]);
    let (ok, err) = cat_as_nobody(&m.path("public"));
    assert!(
        !ok,
        "another user read through a mount without --allow-other"
    );
    assert!(err.contains("Permission denied"), "{err}");
    // The private directories: cache, overlay, and the daemon's runtime directory.
    assert_eq!(mode(&m.cache_dir), 0o700, "cache directory");
    assert_eq!(
        mode(&t.path().join("m.overlay")),
        0o700,
        "overlay directory"
    );
    m.unmount();

    let m = a.mount(
        &url(&repo),
        &t.path().join("m2"),
        &t.path().join("c2"),
        &["--allow-other"],
    );
    let (ok, err) = cat_as_nobody(&m.path("public"));
    assert!(
        ok,
        "nobody cannot read a 0644 file with --allow-other: {err}"
    );
    let (ok, err) = cat_as_nobody(&m.path("secret"));
    assert!(
        !ok,
        "nobody read a 0600 file of root: default_permissions is off"
    );
    assert!(err.contains("Permission denied"), "{err}");
}

#[test]
fn credentials_are_in_no_log_title_or_file() {
    let t = tempdir();
    let s3 = start_moto("sec");
    // moto takes any secret: a distinctive one, to be searched for.
    let secret = "hx-SeCrEt-7f3a9c0e5b1d2468".to_string();
    let mut access = Access::default().with_s3(&s3);
    access
        .env
        .push(("AWS_SECRET_ACCESS_KEY".into(), secret.clone()));
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"data\n").unwrap();
    let remote = s3_url(&s3, "sec/r");
    access.generate("vol", &src, &remote);
    let access = access.clone();
    let mut with_debug = access.clone();
    with_debug.env.push(("RUST_LOG".into(), "trace".into()));
    let m = with_debug.mount(&remote, &t.path().join("m"), &t.path().join("c"), &[]);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"data\n");
    fs::write(m.path("g"), b"new\n").unwrap();
    with_debug.ok(&[
        "commit".as_ref(),
        "-m".as_ref(),
        "x".as_ref(),
        m.mountpoint.as_os_str(),
    ]);
    // The process title of the daemon.
    let cmdline = fs::read(format!("/proc/{}/cmdline", m.pid)).unwrap();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains(&secret),
        "the secret is in the daemon's command line"
    );
    let log = m.log_text();
    assert!(log.len() > 1000, "a trace-level log was expected: {log}");
    assert!(!log.contains(&secret), "the secret is in the daemon's log");
    // Every file horcrux wrote: cache, overlay, logs and runtime files.
    let mut dirs = vec![m.cache_dir.clone(), t.path().join("m.overlay")];
    if let Some(d) = m.log.parent() {
        dirs.push(d.to_path_buf());
    }
    for d in dirs {
        for f in files_under(&d) {
            let bytes = fs::read(&f).unwrap_or_default();
            let hay = String::from_utf8_lossy(&bytes);
            assert!(!hay.contains(&secret), "the secret is in {}", f.display());
        }
    }
    // The key id is not secret, but the secret key must not show in errors either.
    let bad = access.clone().flag("--s3-region").flag("nowhere-1");
    let out = bad.run(&[
        "mount".as_ref(),
        "s3://nosuchbucket/x".as_ref(),
        t.path().join("m3").as_os_str(),
    ]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains(&secret));
}

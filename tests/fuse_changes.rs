//! `horcrux status`, `diff` and `discard` against a live writable mount, through the CLI and the
//! daemon's control socket, as a user runs them; and the kernel's caches after a discard.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;

fn repo_with_tree() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("db")).unwrap();
    fs::write(src.join("db/table.ibd"), bytes(1, 3 * MIB as usize)).unwrap();
    fs::write(src.join("db/old name"), b"renamed later\n").unwrap();
    fs::write(src.join("config"), b"port=1\n").unwrap();
    fs::write(src.join("gone"), b"deleted later\n").unwrap();
    let repo = t.path().join("repo");
    generate("vol", &src, &repo);
    (t, src, repo)
}

fn run(args: &[&str], cwd: &Path) -> std::process::Output {
    std::process::Command::new(horcrux_bin())
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn ok(args: &[&str], cwd: &Path) -> String {
    let out = run(args, cwd);
    assert!(
        out.status.success(),
        "horcrux {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn status_diff_and_discard_on_a_live_mount() {
    let (t, src, repo) = repo_with_tree();
    let m = Mount::new(&repo, &t.path().join("mnt"), &t.path().join("cache"), &[]);
    let mp = m.mountpoint.clone();
    assert!(ok(&["status"], &mp).contains("nothing changed"));

    // A database-like workload: a page rewritten in place, a rename, a delete, a new file,
    // a chmod.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(m.path("db/table.ibd"))
        .unwrap();
    f.write_all_at(&[0xAB; 16384], 1 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    fs::rename(m.path("db/old name"), m.path("db/new name")).unwrap();
    fs::remove_file(m.path("gone")).unwrap();
    fs::write(m.path("db/added"), b"fresh\n").unwrap();
    fs::set_permissions(m.path("config"), fs::Permissions::from_mode(0o600)).unwrap();

    // From inside the mount, with no argument (the current directory).
    let status = ok(&["status"], &mp.join("db"));
    for line in [
        "M config (metadata)",
        "A db/added (6 B)",
        "R db/old name -> db/new name",
        "M db/table.ibd (16.0 KiB)",
        "D gone",
    ] {
        assert!(status.contains(line), "no `{line}` in:\n{status}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["status", "--json", mp.to_str().unwrap()], &mp)).unwrap();
    assert_eq!(json["changes"].as_array().unwrap().len(), 5, "{json}");
    assert_eq!(json["bytes_changed"], 16384 + 6 + 14, "{json}");

    // diff: exact byte ranges and metadata.
    let diff = ok(&["diff", mp.to_str().unwrap(), "db/table.ibd"], &mp);
    assert!(diff.contains("0x100000..0x104000"), "{diff}");
    let diff = ok(
        &["diff", "--json", mp.join("config").to_str().unwrap()],
        &mp,
    );
    let d: serde_json::Value = serde_json::from_str(&diff).unwrap();
    assert_eq!(d[0]["meta"][0]["field"], "mode", "{d}");
    assert_eq!(d[0]["meta"][0]["old"], "0644");
    assert_eq!(d[0]["meta"][0]["new"], "0600");

    // discard needs --force; it is refused while a changed file is open.
    let out = run(&["discard", mp.to_str().unwrap()], &mp);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    let held = fs::File::open(m.path("db/table.ibd")).unwrap();
    let out = run(&["discard", "--force", mp.to_str().unwrap()], &mp);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("open"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The page cache holds the written bytes now; after the discard it must not serve them.
    let mut page = [0u8; 16];
    held.read_exact_at(&mut page, 1 << 20).unwrap();
    assert_eq!(page, [0xAB; 16]);
    drop(held);

    // One path (the rename goes back), then everything.
    ok(
        &[
            "discard",
            "--force",
            m.path("db/new name").to_str().unwrap(),
        ],
        &mp,
    );
    assert!(m.path("db/old name").exists() && !m.path("db/new name").exists());
    ok(&["discard", "--force", mp.to_str().unwrap()], &mp);
    assert!(ok(&["status"], &mp).contains("nothing changed"));
    let table = fs::read(m.path("db/table.ibd")).unwrap();
    assert!(
        table == fs::read(src.join("db/table.ibd")).unwrap(),
        "stale data after discard"
    );
    assert_eq!(fs::read(m.path("gone")).unwrap(), b"deleted later\n");
    assert!(!m.path("db/added").exists());
    let mode = fs::metadata(m.path("config")).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o644);
    m.unmount();
}

#[test]
fn commands_outside_a_mount_say_so() {
    let t = tempdir();
    let out = horcrux(&[OsStr::new("status"), t.path().as_os_str()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not inside a horcrux mount") || err.contains("not a horcrux mount"),
        "{err}"
    );
}

#[test]
fn a_read_only_mount_has_no_changes_and_refuses_writes() {
    let (t, _src, repo) = repo_with_tree();
    let m = Mount::new(
        &repo,
        &t.path().join("mnt"),
        &t.path().join("cache"),
        &["--read-only"],
    );
    let e = fs::write(m.path("config"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    assert!(ok(&["status"], &m.mountpoint).contains("nothing changed"));
    m.unmount();
}

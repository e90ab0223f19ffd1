//! `horcrux diff A B`: two committed versions compared through the CLI, on a live mount and
//! without one (`--access`), as text and as JSON.

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

fn commit(mp: &Path, msg: &str) {
    horcrux_ok(&[
        "commit".as_ref(),
        "-m".as_ref(),
        msg.as_ref(),
        mp.as_os_str(),
        "--author".as_ref(),
        "Tester <t@example.com>".as_ref(),
    ]);
}

fn json(s: &str) -> Vec<Value> {
    serde_json::from_str::<Value>(s)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// `(kind, path)` of each change of a JSON diff, e.g. `("renamed d/a", "a-moved")`.
fn kinds(diffs: &[Value]) -> Vec<(String, String)> {
    diffs
        .iter()
        .map(|d| {
            let c = &d["change"];
            let kind = match &c["kind"] {
                Value::String(s) => s.clone(),
                k => format!("renamed {}", k["renamed"]["from"].as_str().unwrap()),
            };
            (kind, c["path"].as_str().unwrap().to_string())
        })
        .collect()
}

#[test]
fn diff_between_two_commits() {
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    let big = bytes(7, 6 * MIB as usize + 3);
    fs::write(src.join("big"), &big).unwrap();
    fs::write(src.join("d/a"), b"alpha\n").unwrap();
    fs::write(src.join("gone.txt"), b"bye\n").unwrap();
    fs::write(src.join("keep.txt"), b"keep\n").unwrap();
    fs::write(src.join("conf"), b"x=1\n").unwrap();
    for f in ["big", "d/a", "gone.txt", "keep.txt", "conf"] {
        fs::set_permissions(src.join(f), fs::Permissions::from_mode(0o644)).unwrap();
    }
    let repo = t.path().join("repo");
    generate("vol", &src, &repo);
    let m = Mount::new(&repo, &t.path().join("mnt"), &t.path().join("c1"), &[]);
    let mp = m.mountpoint.clone();

    // Version 2 (HEAD~1 below): an unrelated first change.
    fs::write(m.path("first"), b"first\n").unwrap();
    commit(&mp, "first");

    // Version 3 (HEAD): one change of each sort.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(m.path("big"))
        .unwrap();
    f.write_all_at(&[0x5A; 4096], 3 * MIB + 17).unwrap();
    drop(f);
    fs::write(m.path("d/new"), b"fresh\n").unwrap();
    fs::remove_file(m.path("gone.txt")).unwrap();
    fs::rename(m.path("d/a"), m.path("a-moved")).unwrap();
    fs::set_permissions(m.path("conf"), fs::Permissions::from_mode(0o600)).unwrap();
    xattr::set(m.path("keep.txt"), "user.tag", b"x").unwrap();
    commit(&mp, "second");

    // Text, on the mount.
    let out = horcrux_ok(&[
        "diff".as_ref(),
        "HEAD~1".as_ref(),
        "HEAD".as_ref(),
        mp.as_os_str(),
    ]);
    let heads: Vec<&str> = out
        .lines()
        .filter(|l| !l.starts_with(' '))
        .collect::<Vec<_>>();
    assert_eq!(
        heads[1..],
        [
            "R d/a -> a-moved",
            "M big (1.0 MiB)",
            "M conf (metadata)",
            "A d/new (6 B)",
            "D gone.txt",
            "M keep.txt (metadata)",
            "6 paths; 1048582 bytes changed in 2 byte ranges",
        ],
        "{out}"
    );
    assert!(
        heads[0].starts_with("diff ") && heads[0].contains("(HEAD~1) .. "),
        "{out}"
    );
    // The 4 KiB write shows as the 1 MiB chunk window it touched: `commit` rewrites whole
    // windows, and ranges come from the catalogs (chunk ids), never from reading data.
    assert!(
        out.contains("M big (1.0 MiB)\n    size 6291459 (unchanged)\n    @@ 0x300000..0x400000 (1 MiB)\n    mtime "),
        "{out}"
    );
    assert!(out.contains("    mode 0644 -> 0600\n"), "{out}");
    assert!(out.contains("    xattr:user.tag (none) -> x\n"), "{out}");
    assert!(
        out.contains("A d/new (6 B)\n    size 6\n    @@ 0x0..0x6 (6 bytes)\n"),
        "{out}"
    );
    assert!(out.contains("D gone.txt\n    size 4 (deleted)\n"), "{out}");

    // JSON, asked from inside the mount without naming it.
    let inside = Command::new(horcrux_bin())
        .args(["diff", "--json", "HEAD~1", "HEAD"])
        .current_dir(m.path("d"))
        .output()
        .unwrap();
    assert!(
        inside.status.success(),
        "{}",
        String::from_utf8_lossy(&inside.stderr)
    );
    let on_mount = json(&String::from_utf8_lossy(&inside.stdout));
    let want: Vec<(String, String)> = [
        ("renamed d/a", "a-moved"),
        ("modified", "big"),
        ("modified", "conf"),
        ("added", "d/new"),
        ("deleted", "gone.txt"),
        ("modified", "keep.txt"),
    ]
    .iter()
    .map(|(k, p)| (k.to_string(), p.to_string()))
    .collect();
    assert_eq!(kinds(&on_mount), want);
    let big_diff = &on_mount[1];
    assert_eq!(big_diff["ranges"], serde_json::json!([[3 * MIB, 4 * MIB]]));
    assert_eq!(big_diff["change"]["data"], true);
    assert_eq!(big_diff["change"]["meta"], false);
    assert_eq!(on_mount[0]["ranges"], serde_json::json!([]));
    assert_eq!(on_mount[2]["meta"][0]["field"], "mode");

    // Without a mount: the repository directly (HEAD is `main`), its own cache.
    let u = url(&repo);
    let c2 = t.path().join("c2");
    let access = |extra: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "diff".as_ref(),
            "--json".as_ref(),
            "--access".as_ref(),
            u.as_ref(),
            "--name".as_ref(),
            "vol".as_ref(),
            "--cache-dir".as_ref(),
            c2.as_os_str(),
        ];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        json(&horcrux_ok(&args))
    };
    assert_eq!(access(&["main~1", "main"]), on_mount);
    assert_eq!(access(&["HEAD~1", "HEAD"]), on_mount);
    // Under a path: what is there, and renames out of it.
    assert_eq!(
        kinds(&access(&["main~1", "main", "d"])),
        [
            ("renamed d/a".to_string(), "a-moved".to_string()),
            ("added".to_string(), "d/new".to_string())
        ]
    );
    // Backwards: the reverse changes.
    assert_eq!(
        kinds(&access(&["main", "main~1", "d"])),
        [
            ("renamed a-moved".to_string(), "d/a".to_string()),
            ("deleted".to_string(), "d/new".to_string())
        ]
    );
    // The first version against the third: the first commit's file is added too.
    assert_eq!(access(&["main~2", "main"]).len(), 7);

    // Nothing between a version and itself.
    let same = horcrux_ok(&[
        "diff".as_ref(),
        "HEAD".as_ref(),
        "HEAD".as_ref(),
        mp.as_os_str(),
    ]);
    assert!(same.starts_with("no changes in "), "{same}");
    assert!(access(&["HEAD", "main"]).is_empty());

    // The local form still works: nothing uncommitted.
    let local = horcrux_ok(&["diff".as_ref(), mp.as_os_str()]);
    assert_eq!(local, format!("no changes in {}\n", mp.display()));
    fs::write(m.path("keep.txt"), b"changed\n").unwrap();
    let local = horcrux_ok(&["diff".as_ref(), mp.as_os_str(), "keep.txt".as_ref()]);
    assert!(local.starts_with("M keep.txt"), "{local}");
    // Local changes are not part of HEAD.
    let v = horcrux_ok(&[
        "diff".as_ref(),
        "HEAD".as_ref(),
        "HEAD".as_ref(),
        mp.as_os_str(),
    ]);
    assert!(v.starts_with("no changes in "), "{v}");

    // Errors name the problem.
    let out = horcrux(&[
        "diff".as_ref(),
        "HEAD~9".as_ref(),
        "HEAD".as_ref(),
        mp.as_os_str(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only 2 commits before"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    m.unmount();
}

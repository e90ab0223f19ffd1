//! `horcrux import`: an original Horcrux repository (written here by a small test-side
//! generator that follows the original `reducto` layout: `<name>.meta` + `v1/<root>/<path>.<i>`
//! chunk files) is imported from `file://` and from an SSH server, the result is mounted through
//! the real kernel FUSE and compared byte for byte and by metadata with the sample tree; and the
//! errors users get for a wrong name, a malformed `.meta`, missing or truncated chunk files.
//!
//! Build the binary first: `cargo build --workspace`.

mod common;
#[path = "support/remote.rs"]
mod remote;
#[path = "support/s3server.rs"]
mod s3server;
#[path = "support/sshd.rs"]
mod sshd;

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

// Go `os.FileMode` bits, as the original wrote them.
const GO_DIR: u32 = 1 << 31;
const GO_SETUID: u32 = 1 << 23;
const GO_SETGID: u32 = 1 << 22;

fn go_mode(m: &fs::Metadata) -> u32 {
    let mut mode = m.mode() & 0o777;
    if m.is_dir() {
        mode |= GO_DIR;
    }
    if m.mode() & 0o4000 != 0 {
        mode |= GO_SETUID;
    }
    if m.mode() & 0o2000 != 0 {
        mode |= GO_SETGID;
    }
    mode
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// Write `input` in the original Horcrux format under `out`, as `reducto` did: entries
/// breadth-first, the root first, `stat` (so symlinks are followed), every file cut into
/// `chunk_size` pieces `out/v1/<base>/<path>.<i>`, and `out/<name>.meta`.
fn write_original(name: &str, input: &Path, out: &Path, chunk_size: u64) {
    let base = input.file_name().unwrap().to_str().unwrap().to_string();
    let v1 = out.join("v1");
    fs::create_dir_all(v1.join(&base)).unwrap();
    let entry = |name: &str, prefix: &str, m: &fs::Metadata, chunks: i64| {
        format!(
            "        {{\n            \"Name\": {},\n            \"Prefix\": {},\n            \"IsDir\": {},\n            \"Stat\": {{\n                \"Mode\": {},\n                \"Size\": {},\n                \"Uid\": {},\n                \"Gid\": {}\n            }},\n            \"Number of Chunks\": {chunks}\n        }}",
            json_str(name),
            json_str(prefix),
            m.is_dir(),
            go_mode(m),
            m.size(),
            m.uid(),
            m.gid()
        )
    };
    let mut entries = vec![entry(&base, "", &fs::metadata(input).unwrap(), 1)];
    let parent = input.parent().unwrap();
    let mut queue = VecDeque::from([base.clone()]);
    while let Some(dir) = queue.pop_front() {
        let mut names: Vec<String> = fs::read_dir(parent.join(&dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        for n in names {
            let rel = format!("{dir}/{n}");
            let m = fs::metadata(parent.join(&rel)).unwrap(); // follows symlinks
            let chunks = if m.is_dir() {
                fs::create_dir(v1.join(&rel)).unwrap();
                queue.push_back(rel.clone());
                1
            } else {
                let data = fs::read(parent.join(&rel)).unwrap();
                let mut i = 0;
                for piece in data.chunks(chunk_size as usize) {
                    fs::write(v1.join(format!("{rel}.{i}")), piece).unwrap();
                    i += 1;
                }
                i
            };
            entries.push(entry(&n, &dir, &m, chunks));
        }
    }
    let meta = format!(
        "{{\n    \"Config\": {{\n        \"Version\": \"00.03-rc2\",\n        \"Chunk Type\": 1,\n        \"Chunk Size\": {chunk_size}\n    }},\n    \"Current Version\": \"v1\",\n    \"Num Files\": {},\n    \"Entry List\": [\n{}\n    ]\n}}",
        entries.len(),
        entries.join(",\n")
    );
    fs::write(out.join(format!("{name}.meta")), meta).unwrap();
}

/// A sample tree: files spanning several chunks (and exactly two), empty files, small files,
/// nested and empty directories, symlinks to a file and to a directory, a sparse file, a hidden
/// file, special permission bits and (as root) other owners.
fn sample_tree(root: &Path) {
    fs::create_dir_all(root.join("d1/d2/d3")).unwrap();
    fs::create_dir_all(root.join("emptydir")).unwrap();
    fs::write(root.join("big"), bytes(1, (3 * MIB + MIB / 2 + 3) as usize)).unwrap();
    fs::write(root.join("exact"), bytes(2, (2 * MIB) as usize)).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("d1/d2/empty too"), b"").unwrap();
    fs::write(root.join(".hidden"), b"hidden\n").unwrap();
    fs::write(root.join("d1/d2/d3/deep.txt"), b"deep down\n").unwrap();
    for i in 0..20u64 {
        fs::write(
            root.join(format!("d1/s{i:02}")),
            bytes(10 + i, 100 + 997 * i as usize),
        )
        .unwrap();
    }
    // 3 MiB with a 1 MiB hole in the middle: the original stored the zeros as data.
    let f = fs::File::create(root.join("sparse")).unwrap();
    f.set_len(3 * MIB).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&bytes(3, MIB as usize), 0).unwrap();
    f.write_all_at(b"tail", 3 * MIB - 4).unwrap();
    drop(f);
    std::os::unix::fs::symlink("big", root.join("link-to-big")).unwrap();
    std::os::unix::fs::symlink("d1/d2", root.join("link-to-dir")).unwrap();
    fs::write(root.join("setuid"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(root.join("setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(root.join("d1/s00"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(root.join("emptydir"), fs::Permissions::from_mode(0o700)).unwrap();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        lchown(&root.join("d1/s01"), 1234, 5678);
        lchown(&root.join("d1/d2"), 42, 43);
    }
}

/// Every path of `src` (symlinks followed, as the original generator did) is in `mnt` with the
/// same kind, permission bits, owner, size and bytes; and `mnt` has nothing else. Returns the
/// number of paths compared.
fn compare_followed(src: &Path, mnt: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let (s, m) = (src.join(&rel), mnt.join(&rel));
        let sm = fs::metadata(&s).unwrap();
        let mm = fs::symlink_metadata(&m).unwrap_or_else(|e| panic!("{}: {e}", m.display()));
        assert_eq!(sm.is_dir(), mm.is_dir(), "{}: kind", rel.display());
        assert!(!mm.file_type().is_symlink(), "{}: a symlink", rel.display());
        assert_eq!(
            sm.mode() & 0o7777,
            mm.mode() & 0o7777,
            "{}: mode",
            rel.display()
        );
        assert_eq!(
            (sm.uid(), sm.gid()),
            (mm.uid(), mm.gid()),
            "{}: owner",
            rel.display()
        );
        n += 1;
        if sm.is_dir() {
            let names = |p: &Path| {
                let mut v: Vec<_> = fs::read_dir(p)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                v.sort();
                v
            };
            let (sn, mn) = (names(&s), names(&m));
            assert_eq!(sn, mn, "{}: entries", rel.display());
            stack.extend(sn.into_iter().map(|name| rel.join(name)));
        } else {
            assert_eq!(sm.size(), mm.size(), "{}: size", rel.display());
            assert!(
                fs::read(&s).unwrap() == fs::read(&m).unwrap(),
                "{}: content differs",
                rel.display()
            );
        }
    }
    n
}

struct Fixture {
    _tmp: tempfile::TempDir,
    src: PathBuf,
    old: PathBuf,
    work: PathBuf,
}

fn fixture(old_chunk: u64) -> Fixture {
    let tmp = tempdir();
    let src = tmp.path().join("sample");
    sample_tree(&src);
    let old = tmp.path().join("old");
    fs::create_dir_all(&old).unwrap();
    write_original("AMCC", &src, &old, old_chunk);
    let work = tmp.path().to_path_buf();
    Fixture {
        _tmp: tmp,
        src,
        old,
        work,
    }
}

fn import_ok(args: &[&OsStr]) -> String {
    let mut a: Vec<&OsStr> = vec![os("import")];
    a.extend_from_slice(args);
    horcrux_ok(&a)
}

fn import_err(args: &[&OsStr]) -> String {
    let mut a: Vec<&OsStr> = vec![os("import")];
    a.extend_from_slice(args);
    let out = horcrux(&a);
    assert!(
        !out.status.success(),
        "import {args:?} should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn mount_and_compare(f: &Fixture, repo: &Path, mp_name: &str) {
    let mp = f.work.join(mp_name);
    let cache = f.work.join(format!("{mp_name}.cache"));
    let m = Mount::new(repo, &mp, &cache, &["--name", "AMCC", "--read-only"]);
    let n = compare_followed(&f.src, &m.mountpoint);
    assert!(n > 30, "only {n} paths compared");
    m.unmount();
}

#[test]
fn import_from_file_url_mounts_identical_tree() {
    let f = fixture(MIB);
    let repo = f.work.join("new");
    let old_url = format!("file://{}", f.old.display());
    let out = import_ok(&[
        old_url.as_ref(),
        repo.as_os_str(),
        os("--chunk-size"),
        os("2M"),
    ]);
    assert!(out.contains("imported `AMCC` as volume `AMCC`"), "{out}");
    // The commit says where it came from.
    let log = horcrux_ok(&[
        os("log"),
        os("--access"),
        url(&repo).as_ref(),
        os("--name"),
        os("AMCC"),
    ]);
    assert!(log.contains(&format!("imported from {old_url}")), "{log}");
    mount_and_compare(&f, &repo, "mnt");
    // The repository verifies end to end.
    horcrux_ok(&[os("verify"), url(&repo).as_ref()]);
    // A second import of the same name is refused; --as picks another name.
    let err = import_err(&[old_url.as_ref(), repo.as_os_str()]);
    assert!(err.contains("already exists"), "{err}");
    import_ok(&[
        old_url.as_ref(),
        repo.as_os_str(),
        os("--as"),
        os("AMCC2"),
        os("--quiet"),
    ]);
}

#[test]
fn import_over_ssh_with_unaligned_chunks() {
    // Old chunks of 1.5 MiB, new windows of 1 MiB: windows straddle old chunk files.
    let f = fixture(3 * MIB / 2);
    let sshd = remote::start_sshd();
    let access = remote::Access::ssh(&sshd);
    let repo = f.work.join("new");
    let src = sshd.url(&f.old);
    let out = access.ok(&[
        os("import"),
        src.as_ref(),
        repo.as_os_str(),
        os("--name"),
        os("AMCC"),
        os("--chunk-size"),
        os("1M"),
    ]);
    assert!(out.contains("imported"), "{out}");
    mount_and_compare(&f, &repo, "mnt-ssh");
}

#[test]
fn import_errors_are_clear() {
    let f = fixture(MIB);
    let old = &f.old;
    let repo = f.work.join("new");
    let old_url = format!("file://{}", old.display());

    // A name that does not exist names the ones that do.
    let err = import_err(&[old_url.as_ref(), repo.as_os_str(), os("--name"), os("nope")]);
    assert!(
        err.contains("no original Horcrux volume `nope`") && err.contains("volumes there: AMCC"),
        "{err}"
    );

    // A missing chunk file: named, and nothing is written.
    let chunk = old.join("v1/sample/big.2");
    let saved = fs::read(&chunk).unwrap();
    fs::remove_file(&chunk).unwrap();
    let err = import_err(&[old_url.as_ref(), repo.as_os_str()]);
    assert!(
        err.contains("missing") && err.contains("v1/sample/big.2"),
        "{err}"
    );
    assert!(!repo.join("volumes/AMCC").exists());
    // A missing chunk of a hidden file (listings skip dot names: asked for directly).
    let hidden = old.join("v1/sample/.hidden.0");
    let saved_hidden = fs::read(&hidden).unwrap();
    fs::remove_file(&hidden).unwrap();
    fs::write(&chunk, &saved).unwrap();
    let err = import_err(&[old_url.as_ref(), repo.as_os_str()]);
    assert!(err.contains("v1/sample/.hidden.0"), "{err}");
    fs::write(&hidden, &saved_hidden).unwrap();

    // A truncated chunk file: its size and the expected one.
    fs::write(&chunk, &saved[..1000]).unwrap();
    let err = import_err(&[old_url.as_ref(), repo.as_os_str()]);
    assert!(
        err.contains("v1/sample/big.2")
            && err.contains("is 1000 bytes")
            && err.contains(&MIB.to_string()),
        "{err}"
    );
    fs::write(&chunk, &saved).unwrap();

    // Malformed .meta: JSON syntax (line and column), and a chunk count that does not fit.
    let meta = old.join("AMCC.meta");
    let text = fs::read_to_string(&meta).unwrap();
    fs::write(
        &meta,
        text.replacen("\"IsDir\": false,", "\"IsDir\": false", 1),
    )
    .unwrap();
    let err = import_err(&[old_url.as_ref(), repo.as_os_str()]);
    assert!(err.contains("AMCC.meta") && err.contains("line"), "{err}");
    fs::write(
        &meta,
        text.replacen("\"Number of Chunks\": 4", "\"Number of Chunks\": 3", 1),
    )
    .unwrap();
    let err = import_err(&[old_url.as_ref(), repo.as_os_str()]);
    assert!(
        err.contains("malformed") && err.contains("3 chunks listed"),
        "{err}"
    );
    fs::write(&meta, "{\"Config\": {\"Chunk Size\": 1048576}}").unwrap();
    let err = import_err(&[old_url.as_ref(), repo.as_os_str()]);
    assert!(err.contains("Entry List"), "{err}");
    fs::write(&meta, &text).unwrap();

    // Several volumes and no --name: asks for one.
    fs::write(old.join("OTHER.meta"), &text).unwrap();
    let err = import_err(&[old_url.as_ref(), repo.as_os_str()]);
    assert!(err.contains("--name") && err.contains("OTHER"), "{err}");

    // After all that, the import works and nothing half-done was left.
    import_ok(&[old_url.as_ref(), repo.as_os_str(), os("--name"), os("AMCC")]);
}

#[test]
fn import_from_ssh_into_s3_streams_remote_to_remote() {
    let f = fixture(MIB);
    let sshd = remote::start_sshd();
    let s3 = remote::start_moto("imported");
    let access = remote::Access::ssh(&sshd).with_s3(&s3);
    let src = sshd.url(&f.old);
    let dst = remote::s3_url(&s3, "imported/amcc");
    access.ok(&[
        os("import"),
        src.as_ref(),
        dst.as_ref(),
        os("--chunk-size"),
        os("2M"),
    ]);
    let mp = f.work.join("mnt-s3");
    let m = access.mount(
        &dst,
        &mp,
        &f.work.join("mnt-s3.cache"),
        &["--name", "AMCC", "--read-only"],
    );
    let n = compare_followed(&f.src, &m.mountpoint);
    assert!(n > 30, "only {n} paths compared");
    m.unmount();
}

//! Piece outboards (FORMAT.md §3a) for every chunk, whoever wrote it, with the real
//! components: a chunk made by `commit` through a mount over SSH (a real OpenSSH server that
//! logs every SFTP read) has one, and a small cold read of it through a read-only mount over
//! SSH fetches one 16 KiB piece and the piece hashes, not the block; `clone` and `push` to
//! file:// and S3 (moto) carry them — made from verified bytes, never copied bad — and give
//! one to a chunk the destination held without; `gc` removes a removed chunk's outboard and
//! orphans; `verify` warns about missing ones, fails on wrong ones, and `--repair` writes both.
//!
//! Build the binary first: `cargo build --workspace`.

mod common;
#[path = "support/remote.rs"]
mod remote;
#[path = "support/s3server.rs"]
mod s3server;
#[path = "support/sshd.rs"]
mod sshd;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use horcrux::hashtree::{PIECE_SIZE, check_piece_outboard, has_piece_outboard};
use horcrux::ids::ChunkId;
use remote::*;
use sshd::{Sshd, SshdOptions};

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Chunk ids of a file:// repository.
fn chunks(repo: &Path) -> BTreeSet<ChunkId> {
    ids_under(&repo.join("chunks"))
}

/// Ids of the chunks a file:// repository holds outboards for.
fn outboards(repo: &Path) -> BTreeSet<ChunkId> {
    ids_under(&repo.join("outboards"))
}

fn ids_under(dir: &Path) -> BTreeSet<ChunkId> {
    files_under(dir)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().parse().unwrap())
        .collect()
}

fn chunk_path(repo: &Path, id: &ChunkId) -> PathBuf {
    repo.join(horcrux::format::chunk_key(id))
}

fn outboard_path(repo: &Path, id: &ChunkId) -> PathBuf {
    repo.join(horcrux::format::outboard_key(id))
}

/// Every chunk of more than one piece has an outboard that checks out against its id, and
/// there is no other outboard.
fn assert_complete(repo: &Path) {
    let mut want = BTreeSet::new();
    for id in chunks(repo) {
        let len = fs::metadata(chunk_path(repo, &id)).unwrap().len();
        if has_piece_outboard(len) {
            want.insert(id);
            let ob = fs::read(outboard_path(repo, &id))
                .unwrap_or_else(|e| panic!("{}: no outboard for chunk {id}: {e}", repo.display()));
            check_piece_outboard(id, len, &ob).unwrap();
        }
    }
    assert!(!want.is_empty());
    assert_eq!(outboards(repo), want, "{}", repo.display());
}

/// `big` (4 MiB: four 1 MiB chunks) and a pack of two small files, generated into `repo`.
fn source(access: &Access, t: &Path, repo: &str) -> Vec<u8> {
    let src = t.join("src");
    fs::create_dir_all(&src).unwrap();
    let big = bytes(11, 4 * MIB as usize);
    fs::write(src.join("big"), &big).unwrap();
    fs::write(src.join("a"), b"alpha\n").unwrap();
    fs::write(src.join("b"), bytes(12, 40_000)).unwrap();
    access.generate("vol", &src, repo);
    big
}

/// Overwrite 4 KiB of `big` at `off` in a writable mount and commit it.
fn patch_and_commit(access: &Access, mp: &Path, off: u64, fill: u8) {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(mp.join("big"))
        .unwrap();
    f.write_all_at(&[fill; 4096], off).unwrap();
    drop(f);
    access.ok(&[os("commit"), os("-m"), os("patch"), mp.as_os_str()]);
}

#[test]
fn a_committed_chunk_has_an_outboard_and_a_cold_small_read_over_ssh_reads_a_piece() {
    let t = tempdir();
    let t = t.path();
    let s = Sshd::start_with(SshdOptions {
        sftp_log: true,
        ..Default::default()
    });
    let access = Access::ssh(&s);
    let repo = s.dir().join("repo");
    let mut big = source(&access, t, &url(&repo));
    let before = chunks(&repo);

    // A change of 4 KiB in the third 1 MiB window, committed through a mount over SSH.
    let off = 2 * MIB + 40 * 1024;
    let w = access.mount(
        &s.url(&repo),
        &t.join("w"),
        &t.join("cw"),
        &["--no-profile"],
    );
    patch_and_commit(&access, &w.mountpoint, off, 0x5a);
    w.unmount();
    big[off as usize..off as usize + 4096].fill(0x5a);
    let new: Vec<ChunkId> = chunks(&repo).difference(&before).copied().collect();
    assert_eq!(new.len(), 1, "one new chunk: {new:?}");
    let id = new[0];
    assert_complete(&repo);

    // A read-only mount of that commit with a cold cache; 4 KiB inside the change.
    let r = access.mount(
        &s.url(&repo),
        &t.join("r"),
        &t.join("cr"),
        &["--read-only", "--no-profile", "--no-fill"],
    );
    let at = off + 100;
    let seen = s.sftp_reads().len();
    let (got, _) = read_direct_bounded(&r.path("big"), at, 4096, Duration::from_secs(30));
    assert!(
        got.unwrap() == big[at as usize..at as usize + 4096],
        "wrong bytes"
    );
    r.unmount();
    let reads: Vec<_> = s.sftp_reads().split_off(seen);
    let chunk = chunk_path(&repo, &id).display().to_string();
    let outboard = outboard_path(&repo, &id).display().to_string();
    let of = |p: &str| -> Vec<(u64, u64)> {
        reads
            .iter()
            .filter(|r| r.path == p)
            .map(|r| (r.offset, r.len))
            .collect()
    };
    // The chunk is one 1 MiB block: its 64 piece hashes (2 KiB after the 8-byte header), and
    // first the one 16 KiB piece the read falls in — not the block, which follows after.
    let piece = (at - 2 * MIB) / PIECE_SIZE as u64 * PIECE_SIZE as u64;
    assert_eq!(of(&outboard), vec![(8, 64 * 32)], "{reads:?}");
    eprintln!(
        "cold 4 KiB read of a committed chunk over SSH: outboard reads {:?}, chunk reads {:?}",
        of(&outboard),
        of(&chunk)
    );
    let p = PIECE_SIZE as u64;
    let asked_first: u64 = of(&chunk)
        .iter()
        .take_while(|(o, _)| (piece..piece + p).contains(o))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        of(&chunk).first().map(|r| r.0),
        Some(piece),
        "the first read of the committed chunk is at its piece: {reads:?}"
    );
    assert_eq!(asked_first, p, "{reads:?}");
}

#[test]
fn clone_and_push_carry_outboards_to_file_and_s3() {
    let t = tempdir();
    let t = t.path();
    let s3 = start_moto("outboards");
    let access = Access::default().with_s3(&s3);
    let origin = t.join("origin");
    source(&access, t, &url(&origin));
    let ids = outboards(&origin);
    assert_complete(&origin);
    // The origin as an older horcrux left it: one chunk without an outboard, another with a
    // damaged one. Copies make theirs from the verified chunk bytes.
    let mut it = ids.iter();
    let (gone, bad) = (*it.next().unwrap(), *it.next().unwrap());
    let good = fs::read(outboard_path(&origin, &gone)).unwrap();
    fs::remove_file(outboard_path(&origin, &gone)).unwrap();
    let mut b = fs::read(outboard_path(&origin, &bad)).unwrap();
    b[100] ^= 1;
    fs::write(outboard_path(&origin, &bad), &b).unwrap();

    let copy = t.join("copy");
    let out = json(&access.ok(&[
        os("clone"),
        os(&url(&origin)),
        os(&url(&copy)),
        os("--json"),
    ]));
    assert_eq!(out["outboards_copied"], ids.len() as u64, "{out}");
    assert_complete(&copy);
    assert_eq!(fs::read(outboard_path(&copy, &gone)).unwrap(), good);
    let s3url = s3_url(&s3, "outboards/r");
    access.ok(&[os("clone"), os(&url(&origin)), os(&s3url)]);
    let v = json(&access.ok(&[os("verify"), os(&s3url), os("--json")]));
    assert_eq!(v["outboards"], ids.len() as u64, "{v}");
    assert_eq!(v["outboards_missing"], serde_json::json!([]), "{v}");
    assert_eq!(v["outboards_bad"], serde_json::json!([]), "{v}");

    // A commit in the origin, pushed to both. The file copy already holds the new chunk
    // (put there by hand, without outboard), and the origin's outboard of it is damaged:
    // the push sends no chunk, and an outboard made from the origin's chunk.
    let m = access.mount(
        &url(&origin),
        &t.join("m"),
        &t.join("cm"),
        &["--no-profile"],
    );
    let before = chunks(&origin);
    patch_and_commit(&access, &m.mountpoint, MIB + 7, 0x33);
    let new = *chunks(&origin).difference(&before).next().unwrap();
    let made = fs::read(outboard_path(&origin, &new)).unwrap();
    let mut b = made.clone();
    b[8] ^= 0x80;
    fs::write(outboard_path(&origin, &new), &b).unwrap();
    let held = chunk_path(&copy, &new);
    fs::create_dir_all(held.parent().unwrap()).unwrap();
    fs::copy(chunk_path(&origin, &new), &held).unwrap();
    let p = json(&access.ok(&[
        os("push"),
        os(&url(&copy)),
        os("--json"),
        m.mountpoint.as_os_str(),
    ]));
    assert_eq!(p["chunks_copied"], 0, "{p}");
    assert_eq!(p["outboards_copied"], 1, "{p}");
    assert_eq!(fs::read(outboard_path(&copy, &new)).unwrap(), made);
    assert_complete(&copy);
    let p = json(&access.ok(&[
        os("push"),
        os(&s3url),
        os("--json"),
        m.mountpoint.as_os_str(),
    ]));
    assert_eq!(p["chunks_copied"], 1, "{p}");
    assert_eq!(p["outboards_copied"], 1, "{p}");
    m.unmount();
    let v = json(&access.ok(&[os("verify"), os(&s3url), os("--json")]));
    assert_eq!(v["outboards"], ids.len() as u64 + 1, "{v}");
    assert_eq!(v["outboards_bad"], serde_json::json!([]), "{v}");
}

#[test]
fn gc_removes_outboards_with_their_chunks_and_orphans() {
    let t = tempdir();
    let t = t.path();
    let access = Access::default();
    let repo = t.join("repo");
    source(&access, t, &url(&repo));
    let m = access.mount(&url(&repo), &t.join("m"), &t.join("cm"), &["--no-profile"]);
    let before = chunks(&repo);
    patch_and_commit(&access, &m.mountpoint, 3 * MIB + 5, 0x44);
    let new = *chunks(&repo).difference(&before).next().unwrap();
    assert!(outboard_path(&repo, &new).exists());
    access.ok(&[
        os("reset"),
        os("--hard"),
        os("HEAD~1"),
        m.mountpoint.as_os_str(),
    ]);
    m.unmount();
    // An orphan: an outboard whose chunk is not in the repository.
    let ghost: ChunkId = format!("ab{}", "0".repeat(62)).parse().unwrap();
    let orphan = outboard_path(&repo, &ghost);
    fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    fs::copy(outboard_path(&repo, &new), &orphan).unwrap();
    let orphan_key = format!("outboards/ab/{ghost}");

    let repo_url = url(&repo);
    let gc = |extra: &[&str]| {
        let mut args = vec![os("gc"), os("--json"), os("--access"), os(&repo_url)];
        args.extend(extra.iter().map(|s| os(s)));
        json(&access.ok(&args))
    };
    let dry = gc(&["--dry-run"]);
    assert_eq!(
        dry["orphan_outboards"],
        serde_json::json!([orphan_key]),
        "{dry}"
    );
    assert!(orphan.exists(), "a dry run removed an orphan");
    // The first run records the unreachable chunk and removes the orphan at once.
    let first = gc(&["--grace", "0"]);
    assert_eq!(first["outboards_removed"]["objects"], 1, "{first}");
    assert!(!orphan.exists());
    assert!(outboard_path(&repo, &new).exists());
    let second = gc(&["--grace", "0"]);
    let removed = format!("chunks/{}/{new}", &new.to_hex()[..2]);
    assert!(
        second["removed_keys"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!(removed)),
        "{second}"
    );
    assert_eq!(second["outboards_removed"]["objects"], 1, "{second}");
    assert!(!outboard_path(&repo, &new).exists());
    assert!(!chunk_path(&repo, &new).exists());
    assert_complete(&repo);
}

#[test]
fn verify_warns_about_missing_outboards_fails_on_wrong_ones_and_repairs_both() {
    let t = tempdir();
    let t = t.path();
    let access = Access::default();
    let repo = t.join("repo");
    source(&access, t, &url(&repo));
    let r = url(&repo);
    let ids: Vec<ChunkId> = outboards(&repo).into_iter().collect();
    let v = json(&access.ok(&[os("verify"), os(&r), os("--json")]));
    assert_eq!(v["outboards"], ids.len() as u64, "{v}");

    // Missing: a warning naming the command that fixes it; the exit status stays 0.
    let (gone, bad) = (ids[0], ids[1]);
    let good_gone = fs::read(outboard_path(&repo, &gone)).unwrap();
    let good_bad = fs::read(outboard_path(&repo, &bad)).unwrap();
    fs::remove_file(outboard_path(&repo, &gone)).unwrap();
    let out = access.ok(&[os("verify"), os(&r)]);
    assert!(out.contains(": OK"), "{out}");
    assert!(
        out.contains("1 chunk(s) have no piece outboard")
            && out.contains("`horcrux verify --repair file://"),
        "{out}"
    );
    let v = json(&access.ok(&[os("verify"), os(&r), os("--quick"), os("--json")]));
    let gone_key = format!("outboards/{}/{gone}", &gone.to_hex()[..2]);
    assert_eq!(v["outboards_missing"], serde_json::json!([gone_key]), "{v}");

    // Wrong: damage, named, exit status 1 (a flipped hash by reading, a short one by size).
    let mut b = good_bad.clone();
    b[good_bad.len() - 1] ^= 1;
    fs::write(outboard_path(&repo, &bad), &b).unwrap();
    let bad_key = format!("outboards/{}/{bad}", &bad.to_hex()[..2]);
    let o = access.run(&[os("verify"), os(&r)]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(!o.status.success(), "{stdout}");
    assert!(stdout.contains(&format!("corrupt  {bad_key}")), "{stdout}");
    assert!(
        stderr.contains("1 wrong piece outboard(s)") && stderr.contains("--repair"),
        "{stderr}"
    );
    fs::write(outboard_path(&repo, &bad), &good_bad[..good_bad.len() - 32]).unwrap();
    let o = access.run(&[os("verify"), os(&r), os("--quick"), os("--json")]);
    assert!(!o.status.success());
    let v = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(v["outboards_bad"], serde_json::json!([bad_key]), "{v}");
    assert_eq!(v["chunks_hashed"], 0, "{v}");

    // --repair (here with --quick: only those two chunks are read) writes both anew.
    let v = json(&access.ok(&[
        os("verify"),
        os(&r),
        os("--quick"),
        os("--repair"),
        os("--json"),
    ]));
    assert_eq!(
        v["outboards_repaired"],
        serde_json::json!(
            [gone_key.clone(), bad_key.clone()]
                .into_iter()
                .collect::<BTreeSet<_>>()
        ),
        "{v}"
    );
    assert_eq!(v["chunks_hashed"], 2, "{v}");
    assert_eq!(fs::read(outboard_path(&repo, &gone)).unwrap(), good_gone);
    assert_eq!(fs::read(outboard_path(&repo, &bad)).unwrap(), good_bad);
    let v = json(&access.ok(&[os("verify"), os(&r), os("--json")]));
    assert_eq!(v["outboards"], ids.len() as u64, "{v}");
    assert_eq!(v["outboards_missing"], serde_json::json!([]), "{v}");
    assert_eq!(v["outboards_repaired"], serde_json::json!([]), "{v}");
    assert_complete(&repo);
}

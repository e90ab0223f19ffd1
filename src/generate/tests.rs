//! Tests of generate: the produced manifest is read back and compared with the source tree,
//! stat for stat and byte for byte (files reassembled from their extents and the chunk files).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::format::{DEFAULT_BLOCK_SIZE, chunk_key};
use crate::hashtree::{hash_chunk, verify_outboard};
use crate::ids::ChunkId;
use crate::manifest::{Manifest, NodeKind, ROOT_INO};
use crate::store::{FileStore, StoreError};

const MIB: u64 = 1 << 20;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn options(name: &str, input: &Path, chunk_size: u64) -> GenerateOptions {
    GenerateOptions {
        name: name.into(),
        input: input.to_path_buf(),
        chunk_size,
        block_size: DEFAULT_BLOCK_SIZE,
        message: "test".into(),
        author: "Tester <t@example.org>".into(),
        workers: 2,
    }
}

fn repo_at(rt: &tokio::runtime::Runtime, out: &Path) -> Repository {
    rt.block_on(Repository::open_or_init(Arc::new(FileStore::new(
        out.to_path_buf(),
    ))))
    .unwrap()
}

/// Generate `input` into the file store at `out`; open the manifest it wrote.
fn run_with(
    opts: &GenerateOptions,
    out: &Path,
    progress: &dyn Progress,
) -> Result<(GenerateReport, Manifest), GenerateError> {
    let rt = runtime();
    let repo = repo_at(&rt, out);
    let report = generate(opts, &repo, rt.handle(), progress)?;
    let m = Manifest::open(&out.join(manifest_key(&report.manifest))).unwrap();
    Ok((report, m))
}

fn run(input: &Path, out: &Path, chunk_size: u64) -> (GenerateReport, Manifest) {
    run_with(&options("vol", input, chunk_size), out, &NoProgress).unwrap()
}

/// Deterministic pseudo-random bytes (differ per seed).
fn bytes(n: u64, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write(path: &Path, data: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A scratch directory on a disk filesystem (xattrs work there; tmpfs may refuse `user.*`).
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").unwrap_or_else(|_| tempfile::tempdir().unwrap())
}

/// Build a tree with every file type. Returns the live socket's listener (keep it alive) and
/// whether xattrs could be set.
fn build_tree(root: &Path) -> (std::os::unix::net::UnixListener, bool) {
    write(&root.join("small.txt"), &bytes(100, 1));
    write(&root.join("empty"), b"");
    write(&root.join("exact"), &bytes(MIB, 2));
    write(&root.join("exact-1"), &bytes(MIB - 1, 3));
    write(&root.join("exact+1"), &bytes(MIB + 1, 4));
    write(&root.join("big"), &bytes(3 * MIB + MIB / 2, 5));
    write(&root.join("ünïcødé-文件.txt"), "héllo wörld".as_bytes());
    write(&root.join("emoji-🦀"), b"crab");
    // A name that is not UTF-8 at all.
    write(&root.join(OsStr::from_bytes(b"latin1-\xe9t\xe9")), b"bytes");
    // Same content twice: identical chunks are fine.
    write(&root.join("dup-a"), &bytes(2 * MIB, 9));
    write(&root.join("sub/dup-b"), &bytes(2 * MIB, 9));

    // Deep path.
    let mut deep = root.join("deep");
    for i in 0..40 {
        deep = deep.join(format!("level-{i:02}-with-a-longish-name"));
    }
    write(&deep.join("bottom.txt"), b"deep down");

    // Symlinks: relative, absolute and dangling; never followed.
    std::os::unix::fs::symlink("small.txt", root.join("link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
    std::os::unix::fs::symlink("sub", root.join("dirlink")).unwrap();

    // Hard links, one of them across directories and to a large file.
    fs::hard_link(root.join("small.txt"), root.join("hard")).unwrap();
    fs::hard_link(root.join("big"), root.join("sub/big-link")).unwrap();
    fs::hard_link(root.join("big"), root.join("sub/big-link2")).unwrap();

    // Sparse: 5 MiB with data only in the middle (and a data tail).
    let f = fs::File::create(root.join("sparse")).unwrap();
    f.set_len(5 * MIB).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_at(b"in the middle", 2 * MIB + 100).unwrap();
    drop(f);
    let f = fs::File::create(root.join("sparse-tail")).unwrap();
    f.set_len(3 * MIB).unwrap();
    f.write_at(&bytes(1000, 6), 3 * MIB - 1000).unwrap();
    drop(f);
    fs::File::create(root.join("all-hole"))
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();

    // Special modes.
    write(&root.join("setuid"), b"#!/bin/sh\n");
    fs::set_permissions(root.join("setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::create_dir(root.join("sticky")).unwrap();
    fs::set_permissions(root.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::create_dir(root.join("empty-dir")).unwrap();

    // Fifo, live socket, char device: recorded, never opened.
    let c = std::ffi::CString::new(root.join("fifo").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o640) }, 0);
    let listener = std::os::unix::net::UnixListener::bind(root.join("mysql.sock")).unwrap();
    if is_root() {
        let c = std::ffi::CString::new(root.join("null-dev").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid NUL-terminated path.
        let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o644, libc::makedev(1, 3)) };
        if r != 0 {
            println!(
                "SKIP char device: mknod refused: {}",
                std::io::Error::last_os_error()
            );
        }
    } else {
        println!("SKIP char device: not root");
    }

    // Xattrs.
    let xattrs_ok = xattr::set(root.join("small.txt"), "user.horcrux.test", b"value-1").is_ok()
        && xattr::set(root.join("sub"), "user.dir-attr", b"").is_ok()
        && xattr::set(root.join("big"), "user.big", &bytes(300, 7)).is_ok();
    if !xattrs_ok {
        println!("SKIP xattr assertions: the filesystem refuses user.* xattrs");
    }
    (listener, xattrs_ok)
}

/// Reassemble file `ino` from its extents and the chunk files of the store at `out`.
fn reassemble(m: &Manifest, out: &Path, ino: u64, size: u64) -> Vec<u8> {
    let mut buf = vec![0u8; size as usize];
    let mut end = 0;
    for e in m.extents(ino, 0..size).unwrap() {
        assert!(e.file_off >= end, "extents overlap or are unordered");
        end = e.file_off + e.len;
        let c = m.chunk(e.chunk).unwrap().expect("chunk row");
        let data = fs::read(out.join(chunk_key(&c.id))).unwrap();
        assert_eq!(data.len() as u64, c.len);
        buf[e.file_off as usize..end as usize]
            .copy_from_slice(&data[e.chunk_off as usize..(e.chunk_off + e.len) as usize]);
    }
    assert!(end <= size);
    buf
}

/// Every chunk of the manifest is in the store, named by its hash, with a valid outboard.
fn check_chunks(m: &Manifest, out: &Path) {
    let chunks = m.chunks().unwrap();
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.idx, i as u64, "chunk indexes are dense");
        assert!(c.len <= m.header().chunk_size && c.len > 0);
        let data = fs::read(out.join(chunk_key(&c.id))).unwrap();
        assert_eq!(ChunkId::of(&data), c.id);
        verify_outboard(c.id, c.len, m.header().block_size, &c.blocks).unwrap();
        // A chunk of more than one piece has a piece outboard (whatever the block size) whose
        // hashes verify against every block hash (FORMAT.md §3a); a smaller one has none.
        let bs = m.header().block_size;
        let ob = fs::read(out.join(crate::format::outboard_key(&c.id)));
        if c.len <= crate::hashtree::PIECE_SIZE as u64 {
            assert!(ob.is_err(), "chunk {i} of {} bytes has an outboard", c.len);
            continue;
        }
        let ob = ob.expect("piece outboard of a chunk");
        crate::hashtree::check_piece_outboard(c.id, c.len, &ob).unwrap();
        if bs < crate::hashtree::PIECE_SIZE {
            continue;
        }
        for b in 0..crate::hashtree::block_count(c.len, bs) {
            let r = crate::hashtree::block_range(c.len, bs, b);
            if r.end - r.start <= crate::hashtree::PIECE_SIZE as u64 {
                continue;
            }
            let o = crate::hashtree::outboard_range(c.len, bs, b);
            crate::hashtree::verify_piece_hashes(
                c.id,
                c.len,
                bs,
                b,
                &c.blocks[b as usize],
                &ob[o.start as usize..o.end as usize],
            )
            .unwrap();
        }
    }
}

/// Compare the tree under `src` with the manifest, stat for stat and byte for byte.
/// Returns the number of entries compared.
fn compare(src: &Path, m: &Manifest, out: &Path, xattrs_ok: bool) -> usize {
    let root = m.node(ROOT_INO).unwrap().unwrap();
    compare_node(src, &root, m, out, xattrs_ok);
    let mut count = 0;
    let mut stack = vec![(src.to_path_buf(), ROOT_INO)];
    let mut links: HashMap<(u64, u64), u64> = HashMap::new();
    while let Some((dir, ino)) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let listed = m.readdir(ino, 0, 1_000_000).unwrap();
        assert_eq!(
            listed.iter().map(|e| e.name.clone()).collect::<Vec<_>>(),
            names
                .iter()
                .map(|n| n.as_bytes().to_vec())
                .collect::<Vec<_>>(),
            "entries of {}",
            dir.display()
        );
        for (seq, e) in listed.iter().enumerate() {
            assert_eq!(e.seq, seq as u64);
            let path = dir.join(OsStr::from_bytes(&e.name));
            let st = fs::symlink_metadata(&path).unwrap();
            // A hard link points at the first inode recorded for it, whose parent is the first
            // directory it was found in.
            match links.get(&(st.dev(), st.ino())) {
                Some(&first) => assert_eq!(e.node.ino, first, "{}", path.display()),
                None => {
                    assert_eq!(e.node.parent, ino, "{}: parent", path.display());
                    links.insert((st.dev(), st.ino()), e.node.ino);
                }
            }
            compare_node(&path, &e.node, m, out, xattrs_ok);
            if e.node.kind == NodeKind::Dir {
                stack.push((path, e.node.ino));
            }
            count += 1;
        }
    }
    count
}

fn compare_node(path: &Path, n: &crate::manifest::Node, m: &Manifest, out: &Path, xattrs_ok: bool) {
    let p = path.display();
    let st = fs::symlink_metadata(path).unwrap();
    assert_eq!(n.kind.type_bits(), st.mode() & libc::S_IFMT, "{p}: kind");
    assert_eq!(n.mode, st.mode() & 0o7777, "{p}: mode");
    assert_eq!((n.uid, n.gid), (st.uid(), st.gid()), "{p}: owner");
    assert_eq!(n.size, st.size(), "{p}: size");
    assert_eq!(n.nlink as u64, st.nlink(), "{p}: nlink");
    assert_eq!(n.rdev, st.rdev(), "{p}: rdev");
    assert_eq!(
        n.mtime,
        st.mtime() * 1_000_000_000 + st.mtime_nsec(),
        "{p}: mtime"
    );
    assert_eq!(
        n.ctime,
        st.ctime() * 1_000_000_000 + st.ctime_nsec(),
        "{p}: ctime"
    );
    assert_eq!(
        n.atime,
        st.atime() * 1_000_000_000 + st.atime_nsec(),
        "{p}: atime"
    );
    if n.kind == NodeKind::Symlink {
        let t = fs::read_link(path).unwrap();
        assert_eq!(
            n.target.as_deref(),
            Some(t.as_os_str().as_bytes()),
            "{p}: target"
        );
    } else {
        assert!(n.target.is_none());
    }
    if xattrs_ok {
        let mut names: Vec<Vec<u8>> = xattr::list(path)
            .map(|l| l.map(|n| n.as_bytes().to_vec()).collect())
            .unwrap_or_default();
        names.sort();
        assert_eq!(m.xattr_names(n.ino).unwrap(), names, "{p}: xattr names");
        for name in names {
            let v = xattr::get(path, OsStr::from_bytes(&name)).unwrap();
            assert_eq!(m.xattr(n.ino, &name).unwrap(), v, "{p}: xattr value");
        }
    }
    if n.kind == NodeKind::File {
        // O_NOATIME: reading must not move the atime of a hard link compared later.
        let mut data = Vec::new();
        std::io::Read::read_to_end(
            &mut fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOATIME)
                .open(path)
                .unwrap(),
            &mut data,
        )
        .unwrap();
        assert!(reassemble(m, out, n.ino, n.size) == data, "{p}: content");
    }
}

#[test]
fn every_file_type_round_trips() {
    let src = scratch();
    let out = tempfile::tempdir().unwrap();
    let (_sock, xattrs_ok) = build_tree(src.path());
    let (report, m) = run(src.path(), out.path(), MIB);
    check_chunks(&m, out.path());
    let n = compare(src.path(), &m, out.path(), xattrs_ok);
    assert!(n > 60, "compared {n} entries");

    let lookup = |name: &str| m.lookup(ROOT_INO, name.as_bytes()).unwrap().unwrap();
    assert_eq!(lookup("fifo").kind, NodeKind::Fifo);
    assert_eq!(lookup("mysql.sock").kind, NodeKind::Socket);
    assert_eq!(lookup("link").kind, NodeKind::Symlink);
    assert_eq!(lookup("setuid").mode, 0o4755);
    assert_eq!(lookup("sticky").mode, 0o1777);
    if let Some(dev) = m.lookup(ROOT_INO, b"null-dev").unwrap() {
        assert_eq!(dev.kind, NodeKind::CharDev);
        assert_eq!(dev.rdev, libc::makedev(1, 3));
    }
    // Hard links: one inode, nlink = links in the tree, content stored once.
    assert_eq!(lookup("hard").ino, lookup("small.txt").ino);
    assert_eq!(lookup("small.txt").nlink, 2);
    let big = lookup("big");
    assert_eq!(big.nlink, 3);
    let sub = lookup("sub");
    assert_eq!(
        m.lookup(sub.ino, b"big-link").unwrap().unwrap().ino,
        big.ino
    );
    assert_eq!(sub.nlink, 2, "no subdirectories in sub");
    assert_eq!(m.node(ROOT_INO).unwrap().unwrap().nlink, 2 + 4); // sub deep sticky empty-dir

    // Layout: exact chunk size → one window; +1 → two; -1 → packed.
    let ext = |name: &str| {
        let n = lookup(name);
        m.extents(n.ino, 0..n.size.max(1)).unwrap()
    };
    let exact = ext("exact");
    assert_eq!(exact.len(), 1);
    assert_eq!(
        (exact[0].file_off, exact[0].len, exact[0].chunk_off),
        (0, MIB, 0)
    );
    assert_eq!(m.chunk(exact[0].chunk).unwrap().unwrap().len, MIB);
    let plus = ext("exact+1");
    assert_eq!(plus.len(), 2);
    assert_eq!((plus[1].file_off, plus[1].len), (MIB, 1));
    assert_eq!(m.chunk(plus[1].chunk).unwrap().unwrap().len, 1);
    let minus = ext("exact-1");
    assert_eq!(minus.len(), 1);
    assert_eq!(minus[0].len, MIB - 1);
    assert!(ext("empty").is_empty());
    // Every extent of a large file starts its chunk at a window boundary.
    for e in ext("big") {
        assert_eq!(e.file_off % MIB, 0);
        assert_eq!(e.chunk_off, 0);
    }

    // Holes are not stored.
    let sparse = ext("sparse");
    let stored: u64 = sparse.iter().map(|e| e.len).sum();
    assert!(stored <= 64 * 1024, "sparse file stored {stored} bytes");
    assert!(
        sparse
            .iter()
            .all(|e| e.file_off >= 2 * MIB && e.file_off < 3 * MIB)
    );
    assert!(ext("all-hole").is_empty());
    let tail = ext("sparse-tail");
    assert_eq!(tail.last().map(|e| e.file_off + e.len), Some(3 * MIB));

    // Report.
    let st = m.stats().unwrap();
    assert_eq!(report.files, st.files);
    assert_eq!(report.bytes, st.bytes);
    assert_eq!(report.chunks, m.chunks().unwrap().len() as u64);
    assert!(report.chunks_written <= report.chunks);
    assert!(
        report.chunks_written < report.chunks,
        "dup-a/dup-b share a chunk"
    );
    let rt = runtime();
    let repo = repo_at(&rt, out.path());
    assert_eq!(
        rt.block_on(repo.branch("vol", "main")).unwrap(),
        Some(report.commit)
    );
    let c = rt.block_on(repo.commit(report.commit)).unwrap();
    assert_eq!(c.manifest, report.manifest.to_hex());
    assert!(c.parents.is_empty());
    assert_eq!(c.stats.files, report.files);
}

#[test]
fn same_input_gives_the_same_manifest() {
    let src = scratch();
    let (_sock, _) = build_tree(src.path());
    let (o1, o2, o3) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (r1, _) = run(src.path(), o1.path(), MIB);
    let mut opts = options("vol", src.path(), MIB);
    opts.workers = 1;
    let (r2, _) = run_with(&opts, o2.path(), &NoProgress).unwrap();
    opts.workers = 5;
    let (r3, _) = run_with(&opts, o3.path(), &NoProgress).unwrap();
    assert_eq!(r1.manifest, r2.manifest);
    assert_eq!(r1.manifest, r3.manifest);
    let f1 = fs::read(o1.path().join(manifest_key(&r1.manifest))).unwrap();
    let f2 = fs::read(o2.path().join(manifest_key(&r2.manifest))).unwrap();
    assert!(f1 == f2, "byte-identical catalogs");
    assert_eq!((r1.chunks, r1.bytes), (r2.chunks, r2.bytes));
}

#[test]
fn rerun_uploads_only_what_is_missing_and_refuses_an_existing_volume() {
    let src = scratch();
    write(&src.path().join("a"), &bytes(3 * MIB, 1));
    write(&src.path().join("b/c"), &bytes(5000, 2));
    let out = tempfile::tempdir().unwrap();
    let (r1, _) = run(src.path(), out.path(), MIB);
    assert_eq!(r1.chunks, 4);
    assert_eq!(r1.chunks_written, 4);
    assert_eq!(r1.bytes_written, 3 * MIB + 5000);

    let err = run_with(&options("vol", src.path(), MIB), out.path(), &NoProgress).unwrap_err();
    assert!(matches!(err, GenerateError::VolumeExists { .. }), "{err}");
    assert!(err.to_string().contains("refuses to overwrite"), "{err}");

    // Lose one chunk: another volume from the same input uploads just that one.
    let m = Manifest::open(&out.path().join(manifest_key(&r1.manifest))).unwrap();
    let lost = m.chunk(1).unwrap().unwrap();
    fs::remove_file(out.path().join(chunk_key(&lost.id))).unwrap();
    let (r2, _) = run_with(&options("vol2", src.path(), MIB), out.path(), &NoProgress).unwrap();
    assert_eq!(r2.chunks_written, 1);
    assert_eq!(r2.bytes_written, lost.len);
    let rt = runtime();
    let repo = repo_at(&rt, out.path());
    assert_eq!(rt.block_on(repo.volumes()).unwrap(), vec!["vol", "vol2"]);
}

#[test]
fn small_files_are_packed_into_few_chunks() {
    let src = scratch();
    let out = tempfile::tempdir().unwrap();
    // 1000 files of 3000 bytes: 349 fit in a 1 MiB pack, so 3 packs.
    for i in 0..1000u64 {
        write(
            &src.path().join(format!("d{}/f{i:04}", i % 7)),
            &bytes(3000, i),
        );
    }
    let (report, m) = run(src.path(), out.path(), MIB);
    assert_eq!(report.files, 1000);
    assert_eq!(report.dirs, 8);
    assert_eq!(report.chunks, 3);
    let lens: Vec<u64> = m.chunks().unwrap().iter().map(|c| c.len).collect();
    assert_eq!(lens, vec![349 * 3000, 349 * 3000, 302 * 3000]);
    check_chunks(&m, out.path());
    compare(src.path(), &m, out.path(), false);
}

#[test]
fn a_pack_gets_its_index_when_it_closes() {
    let src = scratch();
    let out = tempfile::tempdir().unwrap();
    // a (small) opens a pack, b (large) is cut while it is open, c (small) joins the pack.
    write(&src.path().join("a"), &bytes(10, 1));
    write(&src.path().join("b"), &bytes(2 * MIB, 2));
    write(&src.path().join("c"), &bytes(20, 3));
    let (_, m) = run(src.path(), out.path(), MIB);
    let ext = |n: &str| {
        let node = m.lookup(ROOT_INO, n.as_bytes()).unwrap().unwrap();
        m.extents(node.ino, 0..node.size).unwrap()
    };
    assert_eq!(
        ext("b").iter().map(|e| e.chunk).collect::<Vec<_>>(),
        vec![0, 1]
    );
    assert_eq!((ext("a")[0].chunk, ext("a")[0].chunk_off), (2, 0));
    assert_eq!((ext("c")[0].chunk, ext("c")[0].chunk_off), (2, 10));
    // Inodes: root 1, then a b c in name order.
    let inos: Vec<u64> = ["a", "b", "c"]
        .iter()
        .map(|n| m.lookup(ROOT_INO, n.as_bytes()).unwrap().unwrap().ino)
        .collect();
    assert_eq!(inos, vec![2, 3, 4]);
}

#[test]
fn inode_numbers_follow_the_walk() {
    let src = scratch();
    let out = tempfile::tempdir().unwrap();
    // Children of a directory are numbered together; subdirectories are listed depth-first.
    for p in ["a/x", "a/y/z", "b", "c/w"] {
        write(&src.path().join(p), b"1");
    }
    let (_, m) = run(src.path(), out.path(), MIB);
    let ino = |path: &str| {
        let mut n = ROOT_INO;
        for c in path.split('/') {
            n = m.lookup(n, c.as_bytes()).unwrap().unwrap().ino;
        }
        n
    };
    let got: Vec<u64> = ["a", "b", "c", "a/x", "a/y", "a/y/z", "c/w"]
        .iter()
        .map(|p| ino(p))
        .collect();
    assert_eq!(got, vec![2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(m.node(ROOT_INO).unwrap().unwrap().parent, ROOT_INO);
}

#[test]
fn progress_sees_every_byte() {
    #[derive(Default)]
    struct Count {
        total: AtomicU64,
        files: AtomicU64,
        done: AtomicU64,
        finished: AtomicU64,
    }
    impl Progress for Count {
        fn start(&self, total_bytes: u64, total_files: u64) {
            self.total.store(total_bytes, Ordering::SeqCst);
            self.files.store(total_files, Ordering::SeqCst);
        }
        fn advance(&self, bytes: u64) {
            self.done.fetch_add(bytes, Ordering::SeqCst);
        }
        fn finish(&self) {
            self.finished.fetch_add(1, Ordering::SeqCst);
        }
    }
    let src = scratch();
    let out = tempfile::tempdir().unwrap();
    let (_sock, _) = build_tree(src.path());
    let p = Count::default();
    let (report, _) = run_with(&options("vol", src.path(), MIB), out.path(), &p).unwrap();
    assert_eq!(p.total.load(Ordering::SeqCst), report.bytes);
    assert_eq!(p.files.load(Ordering::SeqCst), report.files);
    assert_eq!(p.done.load(Ordering::SeqCst), report.bytes);
    assert_eq!(p.finished.load(Ordering::SeqCst), 1);
}

#[test]
fn input_errors_are_clear() {
    let out = tempfile::tempdir().unwrap();
    let missing = out.path().join("no-such-dir");
    let err = run_with(&options("vol", &missing, MIB), out.path(), &NoProgress).unwrap_err();
    assert!(matches!(err, GenerateError::Input { .. }), "{err}");
    assert!(err.to_string().contains("no-such-dir"), "{err}");

    let file = out.path().join("a-file");
    fs::write(&file, b"x").unwrap();
    let err = run_with(&options("vol", &file, MIB), out.path(), &NoProgress).unwrap_err();
    assert!(matches!(err, GenerateError::NotADirectory { .. }), "{err}");

    let src = tempfile::tempdir().unwrap();
    let err = run_with(
        &options("bad/name", src.path(), MIB),
        out.path(),
        &NoProgress,
    )
    .unwrap_err();
    assert!(err.to_string().contains("invalid volume name"), "{err}");
    let err = run_with(
        &options("vol", src.path(), 3 * MIB),
        out.path(),
        &NoProgress,
    )
    .unwrap_err();
    assert!(err.to_string().contains("invalid chunk size"), "{err}");
    let mut o = options("vol", src.path(), MIB);
    o.block_size = 2 << 20;
    let err = run_with(&o, out.path(), &NoProgress).unwrap_err();
    assert!(matches!(err, GenerateError::BadBlockSize(_)), "{err}");
    // Nothing was recorded by the failed runs.
    let rt = runtime();
    assert!(
        rt.block_on(repo_at(&rt, out.path()).volumes())
            .unwrap()
            .is_empty()
    );
}

/// Run `f` on a thread whose filesystem uid is `nobody`, so permission bits apply even when the
/// tests run as root (threads it spawns inherit that identity).
fn as_nobody<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            if is_root() {
                // SAFETY: setfsuid changes only this thread's filesystem identity.
                unsafe { libc::setfsuid(65534) };
            }
            f()
        })
        .join()
        .unwrap()
    })
}

#[test]
fn an_unreadable_file_is_named() {
    for (name, size) in [("secret-small", 100u64), ("secret-large", 2 * MIB)] {
        let src = scratch();
        let out = tempfile::tempdir().unwrap();
        fs::set_permissions(src.path(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(out.path(), fs::Permissions::from_mode(0o777)).unwrap();
        write(&src.path().join("ok"), b"fine");
        let secret = src.path().join("dir").join(name);
        write(&secret, &bytes(size, 1));
        fs::set_permissions(src.path().join("dir"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o000)).unwrap();
        let rt = runtime();
        let repo = repo_at(&rt, out.path());
        let opts = options("vol", src.path(), MIB);
        let err = as_nobody(|| generate(&opts, &repo, rt.handle(), &NoProgress)).unwrap_err();
        assert!(matches!(err, GenerateError::Unreadable { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&secret.display().to_string()), "{msg}");
        assert!(rt.block_on(repo.volumes()).unwrap().is_empty());
    }
}

#[test]
fn a_file_that_changed_is_an_error() {
    let dir = scratch();
    let path = dir.path().join("f");
    write(&path, &bytes(500, 1));
    let task = |size| pipeline::ChunkTask {
        idx: 0,
        len: size,
        logical: size,
        pieces: vec![pipeline::Piece::Whole {
            dir: Arc::new(dir.path().to_path_buf()),
            name: "f".into(),
            size,
        }],
    };
    let mut buf = Vec::new();
    pipeline::read_task(&task(500), &mut buf).unwrap();
    assert_eq!(buf, bytes(500, 1));
    for planned in [400, 600] {
        buf.clear();
        let err = pipeline::read_task(&task(planned), &mut buf).unwrap_err();
        assert!(matches!(err, GenerateError::Changed { .. }), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()));
    }
    fs::remove_file(&path).unwrap();
    let err = pipeline::read_task(&task(500), &mut buf).unwrap_err();
    assert!(err.to_string().contains("removed"), "{err}");

    // A large file that grew after planning.
    write(&path, &bytes(2 * MIB, 2));
    let file = Arc::new(pipeline::OpenFile {
        path: path.clone(),
        file: fs::File::open(&path).unwrap(),
        size: 2 * MIB,
    });
    fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"more")
        .unwrap();
    let t = pipeline::ChunkTask {
        idx: 0,
        len: MIB,
        logical: MIB,
        pieces: vec![pipeline::Piece::Range {
            file,
            off: 0,
            len: MIB,
        }],
    };
    buf.clear();
    let err = pipeline::read_task(&t, &mut buf).unwrap_err();
    assert!(matches!(err, GenerateError::Changed { .. }), "{err}");
}

#[test]
fn one_pass_hash_matches_hashtree() {
    let bs = 4096u32;
    for n in [
        0usize,
        1,
        4095,
        4096,
        4097,
        3 * 4096,
        5 * 4096 + 7,
        64 * 4096 + 1,
    ] {
        let d = bytes(n as u64, n as u64);
        assert_eq!(pipeline::hash_blocks(&d, bs), hash_chunk(&d, bs), "len {n}");
    }
}

#[test]
fn many_files_in_bounded_rows() {
    // A wide and a deep-ish tree of empty and tiny files: no chunk for empty ones.
    let src = scratch();
    let out = tempfile::tempdir().unwrap();
    for i in 0..3000u32 {
        let p = src.path().join(format!("w/{:02}/{i}", i % 50));
        write(&p, if i % 2 == 0 { b"" } else { b"x" });
    }
    let (report, m) = run(src.path(), out.path(), MIB);
    assert_eq!(report.files, 3000);
    assert_eq!(report.chunks, 1);
    assert_eq!(m.chunks().unwrap()[0].len, 1500);
}

#[test]
fn works_with_a_current_thread_runtime() {
    let src = scratch();
    let out = tempfile::tempdir().unwrap();
    write(&src.path().join("a"), &bytes(3 * MIB, 1));
    write(&src.path().join("b"), &bytes(10, 2));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let repo = repo_at(&rt, out.path());
    let r = generate(
        &options("vol", src.path(), MIB),
        &repo,
        rt.handle(),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(r.chunks, 4);
    assert_eq!(r.chunks_written, 4);
}

/// A file store whose chunk uploads always fail.
#[derive(Debug)]
struct FailingPuts {
    inner: FileStore,
    puts: AtomicU64,
}

#[async_trait::async_trait]
impl crate::store::Store for FailingPuts {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<bytes::Bytes, StoreError> {
        self.inner.get_range(key, range).await
    }
    async fn get(&self, key: &str) -> Result<bytes::Bytes, StoreError> {
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, data: bytes::Bytes) -> Result<(), StoreError> {
        if key.starts_with("chunks/") {
            self.puts.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Other {
                store: self.describe(),
                message: format!("`{key}`: disk on fire"),
            });
        }
        self.inner.put(key, data).await
    }
    async fn exists(&self, keys: &[String]) -> Result<Vec<bool>, StoreError> {
        self.inner.exists(keys).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.inner.list(prefix).await
    }
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: bytes::Bytes,
    ) -> Result<(), StoreError> {
        self.inner.compare_and_swap(key, expected, new).await
    }
}

#[test]
fn a_failing_store_is_retried_then_reported() {
    let src = scratch();
    let out = tempfile::tempdir().unwrap();
    write(&src.path().join("a"), &bytes(5000, 1));
    let store = Arc::new(FailingPuts {
        inner: FileStore::new(out.path().to_path_buf()),
        puts: AtomicU64::new(0),
    });
    let rt = runtime();
    let repo = rt
        .block_on(Repository::open_or_init(store.clone()))
        .unwrap();
    let err = generate(
        &options("vol", src.path(), MIB),
        &repo,
        rt.handle(),
        &NoProgress,
    )
    .unwrap_err();
    assert!(matches!(err, GenerateError::Store(_)), "{err}");
    assert!(err.to_string().contains("disk on fire"), "{err}");
    assert_eq!(store.puts.load(Ordering::SeqCst), 3, "3 attempts");
    assert!(rt.block_on(repo.volumes()).unwrap().is_empty());
}

#[test]
fn a_pack_holds_at_most_max_pack_files() {
    let src = scratch();
    let out = tempfile::tempdir().unwrap();
    let n = plan::MAX_PACK_FILES + 10;
    for i in 0..n {
        write(&src.path().join(format!("d{}/{i}", i % 64)), b"z");
    }
    let (report, m) = run(src.path(), out.path(), MIB);
    assert_eq!(report.chunks, 2);
    let lens: Vec<u64> = m.chunks().unwrap().iter().map(|c| c.len).collect();
    assert_eq!(lens, vec![plan::MAX_PACK_FILES as u64, 10]);
}

/// A local directory given as a [`TreeInput`] (no hard links, holes or xattrs), to check that
/// the stream planner lays a tree out exactly like the directory planner.
#[derive(Debug)]
struct DirInput {
    paths: std::sync::Mutex<Vec<std::path::PathBuf>>,
    totals: (u64, u64),
}

impl DirInput {
    fn node(&self, path: &Path) -> (InputNode, u64) {
        let m = fs::symlink_metadata(path).unwrap();
        let kind = NodeKind::from_mode(m.mode()).unwrap();
        let target = (kind == NodeKind::Symlink).then(|| {
            fs::read_link(path)
                .unwrap()
                .into_os_string()
                .into_encoded_bytes()
        });
        // readlink may move the symlink's atime: stat again, as the directory walk does.
        let m = fs::symlink_metadata(path).unwrap();
        let ns = |s: i64, n: i64| s * 1_000_000_000 + n;
        let mut paths = self.paths.lock().unwrap();
        paths.push(path.to_path_buf());
        let node = InputNode {
            kind,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            size: m.size(),
            atime: ns(m.atime(), m.atime_nsec()),
            mtime: ns(m.mtime(), m.mtime_nsec()),
            ctime: ns(m.ctime(), m.ctime_nsec()),
            rdev: m.rdev(),
            target,
            xattrs: Vec::new(),
        };
        (node, paths.len() as u64 - 1)
    }
}

impl TreeInput for DirInput {
    fn root(&self) -> Result<(InputNode, u64), GenerateError> {
        let root = self.paths.lock().unwrap()[0].clone();
        self.paths.lock().unwrap().clear();
        Ok(self.node(&root))
    }

    fn list(&self, dir: u64) -> Result<Vec<InputEntry>, GenerateError> {
        let dir = self.paths.lock().unwrap()[dir as usize].clone();
        // Every entry's attributes are taken before any of them is read or listed.
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.reverse(); // any order: the planner sorts
        Ok(names
            .into_iter()
            .map(|name| {
                let (node, id) = self.node(&dir.join(&name));
                InputEntry {
                    name: name.as_bytes().to_vec(),
                    node,
                    id,
                }
            })
            .collect())
    }

    fn read(&self, file: u64, off: u64, len: u64, buf: &mut Vec<u8>) -> Result<(), GenerateError> {
        use std::os::unix::fs::FileExt;
        let path = self.paths.lock().unwrap()[file as usize].clone();
        let mut b = vec![0u8; len as usize];
        fs::File::open(path)
            .unwrap()
            .read_exact_at(&mut b, off)
            .unwrap();
        buf.extend_from_slice(&b);
        Ok(())
    }

    fn totals(&self) -> (u64, u64) {
        self.totals
    }
}

#[test]
fn a_stream_input_gives_the_same_manifest_as_the_directory() {
    let tmp = tempfile::Builder::new().tempdir_in("/var/tmp").unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("a/b/c")).unwrap();
    fs::create_dir_all(src.join("empty-dir")).unwrap();
    write(&src.join("big"), &bytes(5 * MIB / 2 + 17, 1));
    write(&src.join("exact"), &bytes(2 * MIB, 2));
    write(&src.join("empty"), b"");
    for i in 0..30u64 {
        write(
            &src.join(format!("a/s{i:02}")),
            &bytes(10 + 3001 * i, 10 + i),
        );
    }
    write(&src.join("a/b/c/deep"), b"deep");
    std::os::unix::fs::symlink("../big", src.join("a/link")).unwrap();
    fs::set_permissions(src.join("exact"), fs::Permissions::from_mode(0o4750)).unwrap();
    // The directory first: it reads with O_NOATIME, so the times the stream sees are the same.
    let (from_dir, _) = run(&src, &tmp.path().join("out1"), MIB);
    let input = Arc::new(DirInput {
        paths: std::sync::Mutex::new(vec![src.clone()]),
        totals: (0, 0),
    });
    let rt = runtime();
    let repo = repo_at(&rt, &tmp.path().join("out2"));
    let from_stream = generate_from(
        &options("vol", Path::new("/nonexistent"), MIB),
        input,
        &repo,
        rt.handle(),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(from_stream.manifest, from_dir.manifest);
    assert_eq!(
        (
            from_stream.files,
            from_stream.dirs,
            from_stream.bytes,
            from_stream.chunks
        ),
        (
            from_dir.files,
            from_dir.dirs,
            from_dir.bytes,
            from_dir.chunks
        )
    );
}

//! The writable overlay in the core, without a kernel: copy-on-write by byte range (a write
//! fetches nothing), every namespace change, status/diff/discard, and recovery after the
//! process dies without a clean shutdown.

#[path = "support/tree.rs"]
mod tree;

use std::fs;
use std::path::Path;

use horcrux::manifest::ROOT_INO;
use horcrux::volume::{ChangeKind, Ctx, DirSink, SetAttr, Volume};
use tree::{Fixture, MIB, bytes};

const ROOT: Ctx = Ctx { uid: 0, gid: 0 };

fn base_tree(root: &Path) {
    fs::create_dir_all(root.join("d/sub")).unwrap();
    fs::write(root.join("big"), bytes(1, 3 * MIB as usize)).unwrap();
    fs::write(root.join("d/a"), b"alpha\n").unwrap();
    fs::write(root.join("d/sub/b"), b"beta\n").unwrap();
    fs::write(root.join("keep"), b"keep\n").unwrap();
}

fn ino(v: &Volume, path: &str) -> u64 {
    let mut i = ROOT_INO;
    for n in path.split('/') {
        i = v.lookup(i, n.as_bytes()).unwrap().ino;
    }
    i
}

fn read(v: &Volume, path: &str) -> Vec<u8> {
    let i = ino(v, path);
    let size = v.getattr(i).unwrap().size;
    let fh = v.open(i, false, false).unwrap();
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let b = v.read(i, fh, out.len() as u64, 256 << 10).unwrap();
        assert!(!b.is_empty());
        out.extend_from_slice(&b);
    }
    v.release(fh).unwrap();
    out
}

fn write(v: &Volume, path: &str, off: u64, data: &[u8]) {
    let i = ino(v, path);
    let fh = v.open(i, true, false).unwrap();
    assert_eq!(v.write(i, fh, off, data).unwrap() as usize, data.len());
    v.release(fh).unwrap();
}

fn names(v: &Volume, path: &str) -> Vec<String> {
    struct C(Vec<String>);
    impl DirSink for C {
        fn add(&mut self, name: &[u8], _: u64, _: &horcrux::volume::Attr) -> bool {
            if name != b"." && name != b".." {
                self.0.push(String::from_utf8_lossy(name).into());
            }
            false
        }
    }
    let i = if path.is_empty() {
        ROOT_INO
    } else {
        ino(v, path)
    };
    let mut c = C(Vec::new());
    v.readdir(i, 0, &mut c).unwrap();
    c.0.sort();
    c.0
}

fn summary(v: &Volume) -> Vec<String> {
    v.status()
        .unwrap()
        .changes
        .iter()
        .map(|c| {
            let p = String::from_utf8_lossy(&c.path);
            match &c.kind {
                ChangeKind::Added => format!("A {p}"),
                ChangeKind::Modified => format!("M {p}"),
                ChangeKind::Deleted => format!("D {p}"),
                ChangeKind::Renamed { from } => {
                    format!("R {} -> {p}", String::from_utf8_lossy(from))
                }
            }
        })
        .collect()
}

#[test]
fn a_small_write_into_a_cold_file_fetches_nothing() {
    let fx = Fixture::new(base_tree);
    let cache = fx.cache("cache", None);
    let v = fx.writable(cache.clone(), &fx.dir.path().join("ov"));
    write(&v, "big", 1_500_000, &[7u8; 4096]);
    assert_eq!(
        cache.stats().unwrap().inserted_bytes,
        0,
        "a write fetched base data"
    );
    let mut want = bytes(1, 3 * MIB as usize);
    want[1_500_000..1_504_096].fill(7);
    assert_eq!(read(&v, "big"), want);
    let d = v.diff(Some(b"big")).unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].ranges, vec![1_500_000..1_504_096]);
    assert_eq!(d[0].old_size, Some(3 * MIB));
    assert_eq!(d[0].new_size, Some(3 * MIB));
}

#[test]
fn truncate_then_grow_reads_zeros_not_base_bytes() {
    let fx = Fixture::new(base_tree);
    let v = fx.writable(fx.cache("cache", None), &fx.dir.path().join("ov"));
    let i = ino(&v, "big");
    v.setattr(
        i,
        &SetAttr {
            size: Some(1000),
            ..Default::default()
        },
    )
    .unwrap();
    v.setattr(
        i,
        &SetAttr {
            size: Some(5000),
            ..Default::default()
        },
    )
    .unwrap();
    let got = read(&v, "big");
    assert_eq!(&got[..1000], &bytes(1, 1000)[..]);
    assert!(got[1000..].iter().all(|b| *b == 0));
    // Punching a hole in base bytes reads zeros there and base bytes around it.
    let k = ino(&v, "d/a");
    v.fallocate(
        k,
        1,
        2,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    )
    .unwrap();
    assert_eq!(read(&v, "d/a"), b"a\0\0ha\n");
}

#[test]
fn namespace_changes_show_in_status_and_survive_reopen() {
    let fx = Fixture::new(base_tree);
    let ovdir = fx.dir.path().join("ov");
    let cache = fx.cache("cache", None);
    {
        let v = fx.writable(cache.clone(), &ovdir);
        let d = ino(&v, "d");
        let (_, fh) = v.create(ROOT, d, b"new", 0o644, false).unwrap();
        let n = ino(&v, "d/new");
        v.write(n, fh, 0, b"fresh").unwrap();
        v.release(fh).unwrap();
        v.rename(d, b"a", ROOT_INO, b"a-moved", 0).unwrap();
        v.unlink(ino(&v, "d/sub"), b"b").unwrap();
        v.rmdir(d, b"sub").unwrap();
        v.rename(ROOT_INO, b"big", ROOT_INO, b"big2", 0).unwrap();
        write(&v, "keep", 0, b"KEEP");
        v.setxattr(ino(&v, "keep"), b"user.x", b"1", 0).unwrap();
        assert_eq!(
            v.rename(
                ROOT_INO,
                b"keep",
                ROOT_INO,
                b"a-moved",
                libc::RENAME_NOREPLACE
            )
            .unwrap_err()
            .errno(),
            libc::EEXIST
        );
        assert_eq!(
            v.rmdir(ROOT_INO, b"d").unwrap_err().errno(),
            libc::ENOTEMPTY
        );
        // The volume is dropped without unmounting: like a killed daemon (the journal has
        // every completed operation).
    }
    let v = fx.writable(cache, &ovdir);
    assert_eq!(names(&v, ""), ["a-moved", "big2", "d", "keep"]);
    assert_eq!(names(&v, "d"), ["new"]);
    assert_eq!(read(&v, "d/new"), b"fresh");
    assert_eq!(read(&v, "a-moved"), b"alpha\n");
    assert_eq!(read(&v, "keep"), b"KEEP\n");
    // A removed directory is one change (what it held went with it).
    assert_eq!(
        summary(&v),
        [
            "R d/a -> a-moved",
            "R big -> big2",
            "A d/new",
            "D d/sub",
            "M keep"
        ]
    );
    let st = v.status().unwrap();
    let keep = st.changes.iter().find(|c| c.path == b"keep").unwrap();
    assert!(keep.data && keep.meta, "{keep:?}");
    assert_eq!(keep.bytes, 4);
    let diff = v.diff(Some(b"keep")).unwrap();
    assert!(
        diff[0]
            .meta
            .iter()
            .any(|m| m.field == "xattr:user.x" && m.new == "1"),
        "{:?}",
        diff[0].meta
    );

    // Discarding a path restores it (and a rename out of it), then everything.
    v.discard(Some(b"d/a")).unwrap();
    assert_eq!(names(&v, ""), ["big2", "d", "keep"]);
    assert_eq!(names(&v, "d"), ["a", "new"]);
    assert_eq!(read(&v, "d/a"), b"alpha\n");
    v.discard(None).unwrap();
    assert!(summary(&v).is_empty());
    assert_eq!(names(&v, "d"), ["a", "sub"]);
    assert_eq!(read(&v, "keep"), b"keep\n");
    assert_eq!(v.listxattr(ino(&v, "keep")).unwrap(), Vec::<Vec<u8>>::new());
}

#[test]
fn unlinked_open_files_stay_readable_and_go_with_the_last_handle() {
    let fx = Fixture::new(base_tree);
    let ovdir = fx.dir.path().join("ov");
    let v = fx.writable(fx.cache("cache", None), &ovdir);
    let (a, fh) = v.create(ROOT, ROOT_INO, b"tmp", 0o600, false).unwrap();
    v.write(a.ino, fh, 0, b"scratch").unwrap();
    v.unlink(ROOT_INO, b"tmp").unwrap();
    assert_eq!(v.getattr(a.ino).unwrap().nlink, 0);
    assert_eq!(&v.read(a.ino, fh, 0, 100).unwrap()[..], b"scratch");
    assert!(ovdir.join("data").join(a.ino.to_string()).exists());
    v.release(fh).unwrap();
    assert!(!ovdir.join("data").join(a.ino.to_string()).exists());
    assert_eq!(v.getattr(a.ino).unwrap_err().errno(), libc::ENOENT);
    assert!(summary(&v).is_empty(), "{:?}", summary(&v));
}

#[test]
fn a_second_writer_of_one_overlay_is_refused() {
    let fx = Fixture::new(base_tree);
    let ovdir = fx.dir.path().join("ov");
    let _v = fx.writable(fx.cache("cache", None), &ovdir);
    let e = horcrux::overlay::Overlay::open(&ovdir).unwrap_err();
    assert!(e.to_string().contains("in use by another mount"), "{e}");
}

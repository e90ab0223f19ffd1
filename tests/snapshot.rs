//! Freezing a writable volume and writing its tree as a new catalog: the new version reads
//! exactly as the live volume did, unchanged content keeps its chunks (a small write makes one
//! new chunk), and a rebase leaves a clean overlay over the new version with the same inodes.

#[path = "support/tree.rs"]
mod tree;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use horcrux::fetch::{FetchConfig, Fetcher};
use horcrux::ids::ChunkId;
use horcrux::manifest::{Manifest, NodeKind, ROOT_INO};
use horcrux::overlay::BaseInfo;
use horcrux::store::Store;
use horcrux::volume::{ChunkSink, Ctx, DirSink, Volume, VolumeError};
use parking_lot::Mutex;
use tree::{Fixture, MIB, bytes};

const ROOT: Ctx = Ctx { uid: 0, gid: 0 };

fn base_tree(root: &Path) {
    fs::create_dir_all(root.join("d/sub")).unwrap();
    fs::write(root.join("big"), bytes(1, 5 * MIB as usize + 100)).unwrap();
    fs::write(root.join("d/a"), b"alpha\n").unwrap();
    fs::write(root.join("d/sub/b"), b"beta\n").unwrap();
    fs::write(root.join("keep"), b"keep\n").unwrap();
}

/// Puts chunks into the fixture's store and remembers which.
struct Upload<'a> {
    fx: &'a Fixture,
    store: Arc<dyn Store>,
    ids: Mutex<Vec<ChunkId>>,
}

impl ChunkSink for Upload<'_> {
    fn put(
        &self,
        id: &ChunkId,
        data: Vec<u8>,
        outboard: Option<Vec<u8>>,
    ) -> Result<(), VolumeError> {
        // A chunk of more than one piece comes with its piece outboard, which checks out.
        assert_eq!(
            outboard.is_some(),
            horcrux::hashtree::has_piece_outboard(data.len() as u64)
        );
        if let Some(ob) = &outboard {
            horcrux::hashtree::check_piece_outboard(*id, data.len() as u64, ob).unwrap();
        }
        self.fx
            .runtime
            .block_on(
                self.store
                    .put(&horcrux::format::chunk_key(id), Bytes::from(data)),
            )
            .unwrap();
        self.ids.lock().push(*id);
        Ok(())
    }
}

/// Everything a reader can see: path -> (kind, mode, size, content or target, xattrs).
type Tree = BTreeMap<String, (NodeKind, u32, u64, Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>, u64)>;

fn snapshot_tree(v: &Volume) -> Tree {
    struct C(Vec<(Vec<u8>, u64)>);
    impl DirSink for C {
        fn add(&mut self, name: &[u8], _: u64, a: &horcrux::volume::Attr) -> bool {
            if name != b"." && name != b".." {
                self.0.push((name.to_vec(), a.ino));
            }
            false
        }
    }
    let mut out = Tree::new();
    let mut stack = vec![(String::new(), ROOT_INO)];
    while let Some((path, dir)) = stack.pop() {
        let mut c = C(Vec::new());
        v.readdir(dir, 0, &mut c).unwrap();
        for (name, ino) in c.0 {
            let p = format!("{path}/{}", String::from_utf8_lossy(&name));
            let a = v.getattr(ino).unwrap();
            let content = match a.kind {
                NodeKind::File => {
                    let fh = v.open(ino, false, false).unwrap();
                    let mut buf = Vec::new();
                    while (buf.len() as u64) < a.size {
                        let b = v.read(ino, fh, buf.len() as u64, 1 << 20).unwrap();
                        assert!(!b.is_empty());
                        buf.extend_from_slice(&b);
                    }
                    v.release(fh).unwrap();
                    buf
                }
                NodeKind::Symlink => v.readlink(ino).unwrap(),
                NodeKind::Dir => {
                    stack.push((p.clone(), ino));
                    Vec::new()
                }
                _ => Vec::new(),
            };
            let mut x: Vec<_> = v
                .listxattr(ino)
                .unwrap()
                .into_iter()
                .map(|n| {
                    let val = v.getxattr(ino, &n).unwrap();
                    (n, val)
                })
                .collect();
            x.sort();
            out.insert(p, (a.kind, a.perm, a.size, content, x, ino));
        }
    }
    out
}

#[test]
fn a_snapshot_reads_like_the_live_volume_and_reuses_unchanged_chunks() {
    let fx = Fixture::new(base_tree);
    let cache = fx.cache("cache", None);
    let v = fx.writable(cache.clone(), &fx.dir.path().join("ov"));
    let lookup = |p: &str| {
        let mut i = ROOT_INO;
        for n in p.split('/') {
            i = v.lookup(i, n.as_bytes()).unwrap().ino;
        }
        i
    };
    // 4 KiB into the middle of the 6-chunk file, a new file, a rename, a delete, an xattr, a
    // symlink, a hard link, a chmod.
    let big = lookup("big");
    let fh = v.open(big, true, false).unwrap();
    v.write(big, fh, 2 * MIB + 10, &[9u8; 4096]).unwrap();
    v.release(fh).unwrap();
    let d = lookup("d");
    let (n, fh) = v.create(ROOT, d, b"new", 0o640, false).unwrap();
    v.write(n.ino, fh, 0, b"fresh").unwrap();
    v.release(fh).unwrap();
    v.rename(d, b"a", ROOT_INO, b"a2", 0).unwrap();
    v.unlink(lookup("d/sub"), b"b").unwrap();
    v.setxattr(lookup("keep"), b"user.k", b"v", 0).unwrap();
    v.symlink(ROOT, ROOT_INO, b"ln", b"d/new").unwrap();
    v.link(lookup("keep"), d, b"keep-link").unwrap();
    let before = snapshot_tree(&v);

    let out = fx.dir.path().join("snap.sqlite");
    let up = Upload {
        fx: &fx,
        store: fx.store(),
        ids: Mutex::new(Vec::new()),
    };
    let frozen = v.freeze().unwrap();
    assert!(!frozen.is_clean());
    let (mid, stats) = frozen.write_catalog(&out, &up).unwrap();
    // One chunk for the touched 1 MiB window of `big`, one pack for the small new file.
    assert_eq!(stats.new_chunks, 2, "{stats:?}");
    assert!(stats.new_bytes <= MIB + 100, "{stats:?}");

    // A fresh reader of the new catalog sees exactly what the live volume showed.
    let m = Arc::new(Manifest::open(&out).unwrap());
    let fresh_cache = fx.cache("fresh", None);
    let fetcher = Arc::new(Fetcher::new(
        fx.store(),
        fresh_cache,
        m.header().block_size,
        FetchConfig::default(),
    ));
    let reader = Volume::new(m.clone(), fetcher, fx.runtime.handle().clone());
    assert_eq!(snapshot_tree(&reader), before);

    // Rebase: clean, same bytes and inode numbers, and writable again.
    frozen
        .rebase(
            m.clone(),
            &BaseInfo {
                volume: "vol".into(),
                commit: "0".repeat(64),
                manifest: mid.to_hex(),
                max_ino: m.max_ino().unwrap(),
            },
        )
        .unwrap();
    assert!(v.status().unwrap().changes.is_empty());
    assert_eq!(snapshot_tree(&v), before);
    let fh = v.open(big, true, false).unwrap();
    v.write(big, fh, 0, b"again").unwrap();
    v.release(fh).unwrap();
    let st = v.status().unwrap();
    assert_eq!(st.changes.len(), 1, "{:?}", st.changes);
    assert_eq!(st.changes[0].path, b"big");
}

#[test]
fn a_commit_that_landed_before_a_crash_is_recognised_on_restart() {
    let fx = Fixture::new(base_tree);
    let ovdir = fx.dir.path().join("ov");
    let repo = fx
        .runtime
        .block_on(horcrux::repo::Repository::open(fx.store()))
        .unwrap();
    let head = fx.report.commit;
    for (record, landed) in [
        // The branch does not point at the recorded commit: the changes stay.
        (format!("main {}", "ab".repeat(32)), false),
        // It does: the changes are that commit, the overlay comes back clean.
        (format!("main {}", head.to_hex()), true),
    ] {
        {
            let v = fx.writable(fx.cache("cache", None), &ovdir);
            v.create(ROOT, ROOT_INO, b"pending", 0o644, false)
                .map(|(_, fh)| v.release(fh).unwrap())
                .unwrap();
            v.overlay()
                .unwrap()
                .set_pending_commit(Some(&record))
                .unwrap();
        }
        let ov = horcrux::overlay::Overlay::open(&ovdir).unwrap();
        let got = fx
            .runtime
            .block_on(horcrux::versions::settle_pending_commit(&ov, &repo))
            .unwrap();
        assert_eq!(got.is_some(), landed, "{record}");
        assert_eq!(ov.state.read().is_clean(), landed);
        assert_eq!(ov.pending_commit().unwrap(), None);
        ov.clear().unwrap();
    }
}

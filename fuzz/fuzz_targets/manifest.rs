//! A catalog (manifest) is a SQLite database downloaded from a repository: its bytes are
//! checked against the manifest id, but whoever wrote the repository chose them. Open any
//! byte string as a catalog, run the reader's validation, then do what a mount does: a
//! `Volume` over the fixture repository's chunks walks the tree (readdir, lookup, getattr,
//! readlink, xattrs), reads files (holes, extents, chunk block lists, the fetcher), and plans
//! a prefetch, and compares it with the fixture's catalog and itself (`horcrux diff A B`).
//! Nothing may panic, hang or read past a buffer; errors are fine.

#![no_main]

mod common;

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use horcrux::compare::diff_versions;
use horcrux::fetch::{FetchConfig, Fetcher};
use horcrux::manifest::{Manifest, NodeKind, ROOT_INO};
use horcrux::store::{FileStore, Store};
use horcrux::volume::{Attr, DirSink, Volume};
use libfuzzer_sys::fuzz_target;

/// Bounds per input, so a catalog of many entries is not a timeout.
const MAX_NODES: usize = 64;
const MAX_DEPTH: usize = 8;

struct Collect(Vec<(Vec<u8>, Attr)>);

impl DirSink for Collect {
    fn add(&mut self, name: &[u8], _offset: u64, attr: &Attr) -> bool {
        self.0.push((name.to_vec(), attr.clone()));
        self.0.len() >= MAX_NODES
    }
}

fn walk(v: &Volume, ino: u64, depth: usize, budget: &mut usize, seen: &mut HashSet<u64>) {
    if depth > MAX_DEPTH || !seen.insert(ino) {
        return;
    }
    let mut c = Collect(Vec::new());
    if v.readdir(ino, 0, &mut c).is_err() {
        return;
    }
    // Resume in the middle, as the kernel does with a cookie.
    let _ = v.readdir(ino, 3, &mut Collect(Vec::new()));
    for (name, attr) in c.0 {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        if name == b"." || name == b".." {
            continue;
        }
        let _ = v.lookup(ino, &name);
        let _ = v.getattr(attr.ino);
        if let Ok(names) = v.listxattr(attr.ino) {
            for n in names.iter().take(4) {
                let _ = v.getxattr(attr.ino, n);
            }
        }
        match attr.kind {
            NodeKind::Dir => walk(v, attr.ino, depth + 1, budget, seen),
            NodeKind::Symlink => {
                let _ = v.readlink(attr.ino);
            }
            NodeKind::File => read_file(v, attr.ino, attr.size),
            _ => {}
        }
    }
}

fn read_file(v: &Volume, ino: u64, size: u64) {
    let Ok(fh) = v.open(ino, false, false) else {
        return;
    };
    // Start, a sequential second read (ramps the prefetch window), the middle, the end, and
    // past the end.
    let _ = v.read(ino, fh, 0, 4096);
    let _ = v.read(ino, fh, 4096, 4096);
    let _ = v.read(ino, fh, size / 2, 8192);
    let _ = v.read(ino, fh, size.saturating_sub(100), 4096);
    let _ = v.read(ino, fh, size.saturating_add(1), 10);
    let _ = v.release(fh);
}

/// The fixture repository's own catalog, to compare hostile ones with.
fn fixture_manifest() -> &'static Manifest {
    static M: OnceLock<Manifest> = OnceLock::new();
    M.get_or_init(|| {
        let dir = common::fixture_repo().join("manifests");
        let first = std::fs::read_dir(&dir)
            .expect("fixture manifests")
            .next()
            .expect("one manifest")
            .expect("entry");
        Manifest::open(&first.path()).expect("fixture catalog opens")
    })
}

fuzz_target!(|data: &[u8]| {
    let env = common::env();
    let dir = common::fresh_dir("manifest");
    let path = dir.join("catalog");
    std::fs::write(&path, data).expect("write catalog");
    let Ok(m) = Manifest::open(&path) else {
        return;
    };
    // The reader's own queries, with odd arguments too.
    let _ = m.stats();
    let _ = m.chunks();
    let _ = m.max_ino();
    let _ = m.node(0);
    let _ = m.node(u64::MAX);
    let _ = m.lookup(ROOT_INO, b"..");
    let _ = m.name_of(ROOT_INO, 2);
    let _ = m.extents(2, 0..u64::MAX / 2);
    let _ = m.chunk(0);
    let _ = m.chunk(u64::MAX);

    let block_size = m.header().block_size;
    let store: Arc<dyn Store> = Arc::new(FileStore::new(common::fixture_repo()));
    let config = FetchConfig {
        fill_chunks: false,
        ..FetchConfig::default()
    };
    let fetcher = Arc::new(Fetcher::new(store, env.cache.clone(), block_size, config));
    let m = Arc::new(m);
    let v = Volume::new(m.clone(), fetcher, env.rt.handle().clone());
    let _ = v.getattr(ROOT_INO);
    let _ = v.statfs();
    let mut budget = MAX_NODES;
    walk(&v, ROOT_INO, 0, &mut budget, &mut HashSet::new());
    let _ = v.plan_all().map(|p| p.blocks());
    let mut plan = Default::default();
    let _ = v.plan_path(b"", &mut plan);
    drop(v);
    let _ = diff_versions(fixture_manifest(), &m, None);
    let _ = diff_versions(&m, &m, Some(b"dir"));
});

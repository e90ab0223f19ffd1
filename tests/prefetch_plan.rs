//! Prefetch in the core, without a kernel: what a plan covers (overlay-written ranges and new
//! files need nothing), and a whole job — pins, the recorded request, pruning that cannot
//! touch the pinned data, and reads with the source gone.

#[path = "support/tree.rs"]
mod tree;

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use horcrux::manifest::ROOT_INO;
use horcrux::prefetch::{JobState, PrefetchConfig, Prefetcher, Scope};
use horcrux::volume::{BlockPlan, Ctx, Volume};
use tree::{Fixture, MIB, bytes};

const ROOT: Ctx = Ctx { uid: 0, gid: 0 };
const BS: u64 = 256 << 10;

fn base_tree(root: &Path) {
    fs::create_dir_all(root.join("d")).unwrap();
    fs::write(root.join("big"), bytes(1, 3 * MIB as usize)).unwrap();
    fs::write(root.join("d/a"), bytes(2, MIB as usize)).unwrap();
    fs::write(root.join("d/b"), b"beta\n").unwrap();
}

fn ino(v: &Volume, path: &str) -> u64 {
    let mut i = ROOT_INO;
    for n in path.split('/') {
        i = v.lookup(i, n.as_bytes()).unwrap().ino;
    }
    i
}

fn plan(v: &Volume, paths: &[&str]) -> BlockPlan {
    let mut p = BlockPlan::default();
    for path in paths {
        v.plan_path(path.as_bytes(), &mut p).unwrap();
    }
    p
}

#[test]
fn a_plan_skips_what_the_overlay_wrote() {
    let fx = Fixture::new(base_tree);
    let v = fx.writable(fx.cache("cache", None), &fx.dir.path().join("ov"));
    // 3 MiB in 256 KiB blocks: 12 blocks.
    assert_eq!(plan(&v, &["big"]).blocks(), 12);
    // Overwrite two whole blocks and part of a third: only the whole ones drop out.
    let i = ino(&v, "big");
    let fh = v.open(i, true, false).unwrap();
    v.write(i, fh, BS, &vec![9u8; 2 * BS as usize + 10])
        .unwrap();
    v.release(fh).unwrap();
    assert_eq!(plan(&v, &["big"]).blocks(), 10);
    // A new file needs nothing; a directory is planned recursively; a chunk counts once.
    let (_, fh) = v.create(ROOT, ROOT_INO, b"new", 0o644, false).unwrap();
    v.write(ino(&v, "new"), fh, 0, b"local").unwrap();
    v.release(fh).unwrap();
    assert_eq!(plan(&v, &["new"]).blocks(), 0);
    let d = plan(&v, &["d"]).blocks();
    assert_eq!(d, plan(&v, &["d", "d/a"]).blocks());
    assert_eq!(plan(&v, &[""]).blocks(), 10 + d);
    assert!(v.plan_path(b"missing", &mut BlockPlan::default()).is_err());
}

#[test]
fn a_job_hydrates_pins_and_survives_a_prune_and_a_dead_source() {
    let fx = Fixture::new(base_tree);
    let cache = fx.cache("cache", None);
    let v = Arc::new(fx.volume(cache.clone()));
    let p = Prefetcher::new(
        v.clone(),
        cache.clone(),
        fx.runtime.handle().clone(),
        "vol",
        "file:///x",
    );
    p.start(
        Scope::All,
        PrefetchConfig::default(),
        &fx.report.commit.to_hex(),
    )
    .unwrap();
    let t = Instant::now();
    while !p.status().unwrap().state.finished() {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = p.status().unwrap();
    assert_eq!(s.state, JobState::Done);
    assert_eq!(s.present_bytes, s.total_bytes);
    assert_eq!(s.fetched_bytes, s.total_bytes);
    let rec = cache.prefetch_record(p.owner()).unwrap().unwrap();
    assert_eq!(rec.state, "done");
    assert_eq!(rec.commit, fx.report.commit.to_hex());
    assert_eq!(rec.manifest, fx.report.manifest);
    let r = cache.prune(Some(0), Some(Duration::ZERO)).unwrap();
    assert_eq!((r.chunks, r.manifests), (0, 0), "{r:?}");
    assert!(r.skipped_pinned > 0);
    // The source goes away: everything reads from the cache.
    fs::rename(&fx.repo_dir, fx.repo_dir.with_extension("gone")).unwrap();
    let i = ino(&v, "big");
    let fh = v.open(i, false, false).unwrap();
    let mut got = Vec::new();
    while got.len() < 3 * MIB as usize {
        got.extend_from_slice(&v.read(i, fh, got.len() as u64, 1 << 20).unwrap());
    }
    assert!(got == bytes(1, 3 * MIB as usize));
    v.release(fh).unwrap();
    // Unpinned, a prune may take it all.
    assert!(cache.unpin_owner(p.owner()).unwrap() > 0);
    let r = cache.prune(Some(0), None).unwrap();
    assert!(r.chunks > 0);
}

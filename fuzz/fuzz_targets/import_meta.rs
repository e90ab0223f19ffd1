//! `horcrux import` reads an original Horcrux repository's `<name>.meta` (JSON written by the
//! Go tool, or by anyone with write access to that repository). Open any bytes as the `.meta`
//! of a volume in a file store: parse, check and link the entries into a tree; what opens has
//! consistent counts, and its chunk files are checked against the (empty) store.

#![no_main]

mod common;

use std::sync::Arc;

use horcrux::import::Original;
use horcrux::store::FileStore;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let env = common::env();
    let dir = common::fresh_dir("import");
    std::fs::write(dir.join("V.meta"), data).expect("write meta");
    let store = Arc::new(FileStore::new(dir));
    let Ok(o) = Original::open(store, "V", 0, env.rt.handle()) else {
        return;
    };
    let (nodes, files, _) = o.counts();
    assert!(nodes >= 1 && files < nodes as u64);
    let _ = o.root_name();
    assert!(o.chunk_size() > 0);
    // No chunk files exist here: a volume with data is refused, never a panic. (Checking is
    // linear in the chunk files named, up to the import's bound: keep inputs fast.)
    let (_, _, bytes) = o.counts();
    if bytes / o.chunk_size() < 10_000 {
        let _ = o.check_chunks();
    }
});

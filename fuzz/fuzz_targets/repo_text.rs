//! The small text objects of a repository, as a store hands them over: `horcrux.json`, refs
//! (`volumes/V/refs/heads/B`), remotes (`remotes/NAME`), the names a listing returns under
//! `commits/`, and the revisions and names users type (`main~2`, sizes, volume names).
//! Input: one selector byte, then the text. Each input runs against a fresh copy of the
//! fixture repository in a file store, with the text planted where the selector says.

#![no_main]

mod common;

use std::sync::Arc;

use horcrux::format::{check_ref_name, check_volume_name, parse_chunk_size, parse_size};
use horcrux::history::{is_remote_rev, parse_rev, resolve_rev};
use horcrux::ids::{ChunkId, CommitId};
use horcrux::repo::{Repository, split_remote_ref};
use horcrux::store::{FileStore, Store};
use libfuzzer_sys::fuzz_target;

const VOLUME: &str = "fixture";

fn copy_fixture(to: &std::path::Path) {
    let from = common::fixture_repo();
    for rel in ["horcrux.json", "volumes/fixture/refs/heads/main"] {
        let dest = to.join(rel);
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        std::fs::copy(from.join(rel), dest).expect("copy");
    }
    std::fs::create_dir_all(to.join("commits")).expect("mkdir");
    for e in std::fs::read_dir(from.join("commits")).expect("commits") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join("commits").join(e.file_name())).expect("copy");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, text)) = data.split_first() else {
        return;
    };
    let env = common::env();
    let dir = common::fresh_dir("repo");
    copy_fixture(&dir);
    let s = String::from_utf8_lossy(text);
    let rt = &env.rt;
    let store: Arc<dyn Store> = Arc::new(FileStore::new(dir.clone()));
    match selector % 5 {
        0 => {
            std::fs::write(dir.join("horcrux.json"), text).expect("write");
            let _ = rt.block_on(Repository::open(store));
        }
        1 => {
            std::fs::write(dir.join("volumes/fixture/refs/heads/main"), text).expect("write");
            std::fs::create_dir_all(dir.join("volumes/fixture/refs/tags")).expect("mkdir");
            std::fs::write(dir.join("volumes/fixture/refs/tags/t"), text).expect("write");
            let repo = rt.block_on(Repository::open(store)).expect("fixture opens");
            let _ = rt.block_on(repo.branch(VOLUME, "main"));
            let _ = rt.block_on(repo.resolve(VOLUME, "main"));
            let _ = rt.block_on(repo.branches(VOLUME));
            let _ = rt.block_on(repo.tags(VOLUME));
            let _ = rt.block_on(resolve_rev(&repo, VOLUME, "t~1", None));
        }
        2 => {
            let _ = parse_rev(&s);
            let _ = is_remote_rev(&s);
            let _ = parse_size(&s);
            let _ = parse_chunk_size(&s);
            let _ = check_volume_name(&s);
            let _ = check_ref_name(&s);
            let _ = split_remote_ref(&s);
            let _ = s.parse::<CommitId>();
            let _ = s.parse::<ChunkId>();
            let repo = rt.block_on(Repository::open(store)).expect("fixture opens");
            let head = rt.block_on(repo.branch(VOLUME, "main")).ok().flatten();
            let _ = rt.block_on(resolve_rev(&repo, VOLUME, &s, head));
            let _ = rt.block_on(repo.resolve(VOLUME, &s));
        }
        3 => {
            std::fs::create_dir_all(dir.join("remotes")).expect("mkdir");
            std::fs::write(dir.join("remotes/origin"), text).expect("write");
            if let Ok(all) = rt.block_on(horcrux::remotes::list(&*store)) {
                for r in &all {
                    let _ = horcrux::store::parse_one(&r.url);
                }
            }
            let _ = rt.block_on(horcrux::remotes::get(&*store, "origin"));
        }
        _ => {
            // A name a listing returns under `commits/`, and a prefix of it to resolve.
            let name = s.trim();
            if !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0']) {
                let _ = std::fs::write(dir.join("commits").join(name), b"x");
            }
            let repo = rt.block_on(Repository::open(store)).expect("fixture opens");
            let prefix: String = name.chars().take(6).collect();
            let _ = rt.block_on(repo.resolve(VOLUME, &prefix));
        }
    }
});

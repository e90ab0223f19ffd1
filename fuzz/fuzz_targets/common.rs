//! What several targets share: one tokio runtime, a scratch directory, the fixture repository
//! (`fuzz/fixtures/repo`, made by `fuzz/make-corpus.sh`) and a cache. Made once per process;
//! each input gets its own files and objects on top, so inputs do not leak state into each
//! other except through the cache (which only ever holds verified blocks).

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use horcrux::cache::{Cache, CacheConfig};

pub struct Env {
    pub rt: tokio::runtime::Runtime,
    pub scratch: tempfile::TempDir,
    pub cache: Arc<Cache>,
}

pub fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let scratch = tempfile::Builder::new()
            .prefix("horcrux-fuzz-")
            .tempdir()
            .expect("scratch directory");
        let cache = Cache::open(CacheConfig {
            dir: scratch.path().join("cache"),
            max_size: Some(64 << 20),
        })
        .expect("cache");
        Env { rt, scratch, cache }
    })
}

/// The fixture repository: a generated volume `fixture` (every node kind, two chunks).
pub fn fixture_repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/repo")
}

/// A fresh, empty directory for one input (the previous input's is removed).
pub fn fresh_dir(name: &str) -> PathBuf {
    let d = env().scratch.path().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// Split `data` at the first occurrences of `sep` into at most `n` parts.
pub fn split_parts<'a>(data: &'a [u8], sep: &[u8], n: usize) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while out.len() + 1 < n {
        match rest.windows(sep.len()).position(|w| w == sep) {
            Some(i) => {
                out.push(&rest[..i]);
                rest = &rest[i + sep.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out
}

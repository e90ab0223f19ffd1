//! `verify`: checking a repository end to end — every ref reaches commits and manifests that
//! are present and match their ids, and every chunk those manifests list is present and
//! matches its id (read whole and hashed).
//!
//! Nothing is changed. Damage is collected and reported, not repaired: a copy from a good
//! repository (`horcrux push`/`clone`, which only send what is missing) repairs missing
//! objects; a corrupt object must be removed first. A commit or manifest that does not match
//! its id stops the run (what it reaches is unknown). Chunks absent here but present on a
//! registered remote are the data of versions fetched lazily (`crate::remotes`): counted, not
//! damage.

use std::sync::Arc;

use futures_util::StreamExt;
use serde::Serialize;

use crate::gc::{GcError, GcProgress};
use crate::hashtree;
use crate::ids::ChunkId;
use crate::repo::Repository;
use crate::store::{Store, StoreError};

/// How to verify.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Parallel downloads.
    pub concurrency: usize,
    /// Only check that chunks are present (listing sizes), without reading them.
    pub quick: bool,
    /// Stores of the registered remotes, where lazily fetched chunks are.
    pub remotes: Vec<Arc<dyn Store>>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            concurrency: 8,
            quick: false,
            remotes: Vec::new(),
        }
    }
}

/// What a run found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub refs: u64,
    pub commits: u64,
    pub manifests: u64,
    /// Reachable chunks present here, and their bytes.
    pub chunks: u64,
    pub chunk_bytes: u64,
    /// Chunks read and hashed (0 with `quick`).
    pub chunks_hashed: u64,
    /// Reachable chunks that are not here but on a registered remote (lazy data).
    pub on_remotes: u64,
    /// Keys a ref reaches that are nowhere.
    pub missing: Vec<String>,
    /// Chunks whose content does not match their id.
    pub corrupt: Vec<String>,
    /// Parents not in the repository (the edge of a shallow copy: not damage).
    pub shallow_edges: u64,
    /// Objects no ref reaches (what `gc` would collect).
    pub unreachable: u64,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.missing.is_empty() && self.corrupt.is_empty()
    }
}

/// Verify the repository `repo`.
pub async fn verify(
    repo: &Repository,
    options: &VerifyOptions,
    progress: &dyn GcProgress,
) -> Result<VerifyReport, GcError> {
    let store = repo.store().clone();
    let marked = crate::gc::reachable(repo, options.concurrency, progress).await?;
    let mut report = VerifyReport {
        refs: marked.refs,
        commits: marked.commits,
        manifests: marked
            .keys
            .iter()
            .filter(|k| k.starts_with("manifests/"))
            .count() as u64,
        shallow_edges: marked.absent_parents,
        missing: marked.missing.iter().cloned().collect(),
        ..Default::default()
    };

    progress.phase("listing objects", 0);
    let mut sizes = std::collections::HashMap::new();
    for prefix in ["chunks/", "manifests/", "commits/"] {
        for (k, size) in store.list_sizes(prefix).await? {
            if !k.rsplit('/').next().is_some_and(|n| n.starts_with('.')) {
                sizes.insert(k, size);
            }
        }
    }
    report.unreachable = sizes.keys().filter(|k| !marked.keys.contains(*k)).count() as u64;

    let mut wanted: Vec<(ChunkId, String)> = marked
        .keys
        .iter()
        .filter_map(|k| {
            let id = k.strip_prefix("chunks/")?.split_once('/')?.1.parse().ok()?;
            Some((id, k.clone()))
        })
        .collect();
    wanted.sort_by(|a, b| a.1.cmp(&b.1));
    let (present, absent): (Vec<_>, Vec<_>) =
        wanted.into_iter().partition(|(_, k)| sizes.contains_key(k));
    report.chunks = present.len() as u64;
    report.chunk_bytes = present.iter().map(|(_, k)| sizes[k]).sum();

    // Absent here: on a remote (lazy data), or missing.
    let absent_keys: Vec<String> = absent.into_iter().map(|(_, k)| k).collect();
    let held = crate::remotes::held_by(&options.remotes, &absent_keys).await;
    report.on_remotes = held.len() as u64;
    let absent_keys: Vec<String> = absent_keys
        .into_iter()
        .filter(|k| !held.contains(k))
        .collect();
    report.missing.extend(absent_keys);
    report.missing.sort();

    if !options.quick {
        progress.phase("reading chunks", report.chunk_bytes);
        let mut results = futures_util::stream::iter(present)
            .map(|(id, key)| {
                let store = store.clone();
                async move {
                    let data = match store.get(&key).await {
                        Ok(d) => d,
                        Err(e) if e.is_not_found() => return Ok::<_, StoreError>((key, 0, false)),
                        Err(e) => return Err(e),
                    };
                    let n = data.len() as u64;
                    let ok = tokio::task::spawn_blocking(move || {
                        hashtree::verify_chunk(id, data).is_ok()
                    })
                    .await
                    .expect("hash task");
                    Ok((key, n, ok))
                }
            })
            .buffer_unordered(options.concurrency.max(1));
        while let Some(r) = results.next().await {
            let (key, n, ok) = r?;
            progress.advance(n);
            if n == 0 && !ok {
                report.missing.push(key); // removed while we ran
                continue;
            }
            report.chunks_hashed += 1;
            if !ok {
                tracing::error!(%key, "chunk does not match its id");
                report.corrupt.push(key);
            }
        }
        report.corrupt.sort();
    }
    Ok(report)
}

//! `verify`: checking a repository end to end — every ref reaches commits and manifests that
//! are present and match their ids, and every chunk those manifests list is present and
//! matches its id (read whole and hashed), with its piece outboard (FORMAT.md §3a).
//!
//! Damage is collected and reported, not repaired: a copy from a good repository (`horcrux
//! push`/`clone`, which only send what is missing) repairs missing objects; a corrupt object
//! must be removed first. A commit or manifest that does not match its id stops the run (what
//! it reaches is unknown). Chunks absent here but present on a registered remote are the data
//! of versions fetched lazily (`crate::remotes`): counted, not damage.
//!
//! Piece outboards are derived from their chunk, so they are the one thing `verify` can repair
//! itself (`repair`): a chunk of more than one piece without an outboard (made by an older
//! horcrux) is a warning — small cold reads of it fetch whole blocks — and a wrong outboard is
//! damage (readers refuse it, so it costs the same); with `repair` both are written anew from
//! the chunk's bytes, once these match the chunk id. Nothing else is ever changed.

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
    /// Write the piece outboards that are missing or wrong (from chunks that verify).
    pub repair: bool,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            concurrency: 8,
            quick: false,
            remotes: Vec::new(),
            repair: false,
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
    /// Present chunks of more than one piece whose piece outboard is present and right (read
    /// and checked against the chunk id; with `quick`, of the right size).
    pub outboards: u64,
    /// Outboard keys of present chunks that have none: a warning (small cold reads of those
    /// chunks fetch whole blocks), fixed by `repair`.
    pub outboards_missing: Vec<String>,
    /// Outboards that are wrong (damage, unless `repair` replaced them).
    pub outboards_bad: Vec<String>,
    /// Outboards `repair` wrote (missing or bad before).
    pub outboards_repaired: Vec<String>,
    /// Outboards whose chunk is not here (`gc` removes them).
    pub orphan_outboards: u64,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.missing.is_empty() && self.corrupt.is_empty() && self.unrepaired_bad().is_empty()
    }

    /// Wrong outboards still in place.
    pub fn unrepaired_bad(&self) -> Vec<&String> {
        self.outboards_bad
            .iter()
            .filter(|k| !self.outboards_repaired.contains(k))
            .collect()
    }

    /// Missing outboards still missing.
    pub fn unrepaired_missing(&self) -> Vec<&String> {
        self.outboards_missing
            .iter()
            .filter(|k| !self.outboards_repaired.contains(k))
            .collect()
    }
}

/// The state of a chunk's piece outboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outboard {
    /// A chunk of at most one piece has none.
    NotNeeded,
    Good,
    Missing,
    Bad,
}

/// What checking one present chunk found.
#[derive(Debug)]
struct Checked {
    key: String,
    /// Bytes read (0: the chunk was not read).
    read: u64,
    /// The chunk disappeared while the run went on.
    vanished: bool,
    /// Read, and its content does not match its id.
    corrupt: bool,
    hashed: bool,
    outboard: Outboard,
    repaired: bool,
}

/// Check chunk `id` (`key`, `size` bytes by the listing; its outboard listed with `ob_size`).
async fn check_chunk(
    store: Arc<dyn Store>,
    id: ChunkId,
    key: String,
    size: u64,
    ob_size: Option<u64>,
    quick: bool,
    repair: bool,
) -> Result<Checked, StoreError> {
    let ob_key = crate::format::outboard_key(&id);
    let outboard = if !hashtree::has_piece_outboard(size) {
        Outboard::NotNeeded
    } else {
        match ob_size {
            None => Outboard::Missing,
            Some(n) if n != hashtree::piece_outboard_len(size) => Outboard::Bad,
            Some(_) if quick => Outboard::Good,
            Some(_) => match store.get(&ob_key).await {
                Ok(raw) => match hashtree::check_piece_outboard(id, size, &raw) {
                    Ok(()) => Outboard::Good,
                    Err(e) => {
                        tracing::error!(key = %ob_key, error = %e, "bad piece outboard");
                        Outboard::Bad
                    }
                },
                Err(e) if e.is_not_found() => Outboard::Missing,
                Err(e) => return Err(e),
            },
        }
    };
    let mut c = Checked {
        key,
        read: 0,
        vanished: false,
        corrupt: false,
        hashed: false,
        outboard,
        repaired: false,
    };
    let fix = repair && matches!(outboard, Outboard::Missing | Outboard::Bad);
    if quick && !fix {
        return Ok(c);
    }
    let data = match store.get(&c.key).await {
        Ok(d) => d,
        Err(e) if e.is_not_found() => {
            c.vanished = true; // removed while we ran
            return Ok(c);
        }
        Err(e) => return Err(e),
    };
    c.read = data.len() as u64;
    c.hashed = true;
    let made = tokio::task::spawn_blocking(move || {
        hashtree::verify_chunk_with_outboard(id, data).map(|(_, ob)| ob)
    })
    .await
    .expect("hash task");
    match made {
        Err(_) => c.corrupt = true,
        // Written only from bytes that match the chunk id, after the chunk (which is there).
        Ok(Some(ob)) if fix => {
            store.put(&ob_key, bytes::Bytes::from(ob)).await?;
            c.repaired = true;
        }
        Ok(_) => {}
    }
    Ok(c)
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
    // Outboards before chunks (writers put a chunk first): an outboard listed without its
    // chunk is an orphan, not one being written.
    let outboards: std::collections::HashMap<String, u64> = store
        .list_sizes("outboards/")
        .await?
        .into_iter()
        .filter(|(k, _)| !k.rsplit('/').next().is_some_and(|n| n.starts_with('.')))
        .collect();
    let mut sizes = std::collections::HashMap::new();
    for prefix in ["chunks/", "manifests/", "commits/"] {
        for (k, size) in store.list_sizes(prefix).await? {
            if !k.rsplit('/').next().is_some_and(|n| n.starts_with('.')) {
                sizes.insert(k, size);
            }
        }
    }
    report.unreachable = sizes.keys().filter(|k| !marked.keys.contains(*k)).count() as u64;
    report.orphan_outboards = outboards
        .keys()
        .filter(|o| {
            let chunk = o.strip_prefix("outboards/").map(|r| format!("chunks/{r}"));
            chunk.is_none_or(|c| !sizes.contains_key(&c))
        })
        .count() as u64;

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

    progress.phase(
        if options.quick {
            "checking outboards"
        } else {
            "reading chunks"
        },
        if options.quick { 0 } else { report.chunk_bytes },
    );
    let mut results = futures_util::stream::iter(present)
        .map(|(id, key)| {
            let size = sizes[&key];
            let ob_size = outboards.get(&crate::format::outboard_key(&id)).copied();
            check_chunk(
                store.clone(),
                id,
                key,
                size,
                ob_size,
                options.quick,
                options.repair,
            )
        })
        .buffer_unordered(options.concurrency.max(1));
    while let Some(r) = results.next().await {
        let c = r?;
        progress.advance(c.read);
        if c.vanished {
            report.missing.push(c.key);
            continue;
        }
        if c.hashed {
            report.chunks_hashed += 1;
        }
        if c.corrupt {
            tracing::error!(key = %c.key, "chunk does not match its id");
            report.corrupt.push(c.key.clone());
        }
        let ob_key = c.key.replacen("chunks/", "outboards/", 1);
        match c.outboard {
            Outboard::NotNeeded => {}
            Outboard::Good => report.outboards += 1,
            Outboard::Missing => report.outboards_missing.push(ob_key.clone()),
            Outboard::Bad => report.outboards_bad.push(ob_key.clone()),
        }
        if c.repaired {
            report.outboards_repaired.push(ob_key);
        }
    }
    report.missing.sort();
    report.corrupt.sort();
    report.outboards_missing.sort();
    report.outboards_bad.sort();
    report.outboards_repaired.sort();
    Ok(report)
}

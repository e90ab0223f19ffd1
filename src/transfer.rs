//! Copying a repository (or some of its volumes) from one store to another: the one mechanism
//! behind `horcrux copy` and, later, `push`/`clone`.
//!
//! Order matters for readers of the destination: chunks, then manifests, then commits, then
//! refs, so a ref never points at something missing. Only objects the destination lacks are
//! copied (a re-run after an interruption resumes), every object is verified against its id
//! on the way, and refs move by compare-and-swap: a destination branch that has diverged is
//! refused unless `force` is set.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::format::{chunk_key, commit_key, manifest_key};
use crate::hashtree;
use crate::ids::{ChunkId, CommitId, ManifestId};
use crate::manifest::Manifest;
use crate::repo::{RepoError, Repository};
use crate::store::{Store, StoreError};

/// What to copy.
#[derive(Debug, Clone, Default)]
pub struct CopyOptions {
    /// Volumes to copy (all when empty).
    pub volumes: Vec<String>,
    /// Move destination refs even if they are not ancestors of the source refs.
    pub force: bool,
    /// Parallel object transfers.
    pub concurrency: usize,
}

/// Progress callbacks (bytes of chunk data).
pub trait CopyProgress: Send + Sync {
    fn start(&self, total_bytes: u64);
    fn advance(&self, bytes: u64);
}

/// No progress output.
#[derive(Debug)]
pub struct NoCopyProgress;

impl CopyProgress for NoCopyProgress {
    fn start(&self, _: u64) {}
    fn advance(&self, _: u64) {}
}

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    pub commits: u64,
    pub chunks: u64,
    pub chunks_copied: u64,
    pub bytes_copied: u64,
    pub refs_updated: Vec<String>,
    pub refs_unchanged: Vec<String>,
}

/// Errors of a copy.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "{what} {id} read from {store} does not match its id: source is corrupted; nothing was written for it"
    )]
    Corrupt {
        what: &'static str,
        id: String,
        store: String,
    },
    #[error(
        "volume `{volume}`: branch `{branch}` at the destination ({dst}) is not an ancestor of the source's ({src}); fetch and merge first, or pass --force to overwrite it"
    )]
    Diverged {
        volume: String,
        branch: String,
        src: String,
        dst: String,
    },
    #[error("temporary file: {0}")]
    Io(#[from] std::io::Error),
}

/// Copy `volumes` (all if empty) with their full history from `src` to the repository in `dst`.
pub async fn copy(
    src: &Repository,
    dst_store: Arc<dyn Store>,
    options: &CopyOptions,
    progress: &dyn CopyProgress,
) -> Result<CopyReport, CopyError> {
    let dst = Repository::open_or_init(dst_store.clone()).await?;
    let volumes = if options.volumes.is_empty() {
        src.volumes().await?
    } else {
        for v in &options.volumes {
            src.pick_volume(Some(v)).await?;
        }
        options.volumes.clone()
    };
    let mut report = CopyReport::default();

    // 1. Refs and the commits they reach.
    let mut refs: Vec<(String, String, CommitId)> = Vec::new(); // (volume, ref key, commit)
    for v in &volumes {
        let prefix = format!("volumes/{v}/refs/");
        for key in src.store().list(&prefix).await? {
            let bytes = src.store().get(&key).await?;
            let id: CommitId = String::from_utf8_lossy(&bytes)
                .trim()
                .parse()
                .map_err(|_| RepoError::BadRef {
                    store: src.store().describe(),
                    key: key.clone(),
                    content: String::from_utf8_lossy(&bytes).chars().take(80).collect(),
                })?;
            refs.push((v.clone(), key, id));
        }
    }
    let mut commits: Vec<CommitId> = Vec::new();
    let mut seen: HashSet<CommitId> = HashSet::new();
    let mut stack: Vec<CommitId> = refs.iter().map(|r| r.2).collect();
    let mut manifests: BTreeSet<ManifestId> = BTreeSet::new();
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        let c = src.commit(id).await?;
        manifests.insert(c.manifest_id().expect("decode checked the manifest id"));
        for p in &c.parents {
            if let Ok(p) = p.parse() {
                stack.push(p);
            }
        }
        commits.push(id);
    }
    report.commits = commits.len() as u64;

    // 2. Chunks of every manifest.
    let tmp = tempfile_dir()?;
    let mut chunks: BTreeSet<(ChunkId, u64)> = BTreeSet::new();
    for m in &manifests {
        let path = tmp.join(m.to_hex());
        src.store().get_to_file(&manifest_key(m), &path).await?;
        let p2 = path.clone();
        let got = tokio::task::spawn_blocking(move || crate::manifest::hash_file(&p2))
            .await
            .expect("hash task")
            .map_err(RepoError::from)?;
        if got != *m {
            return Err(CopyError::Corrupt {
                what: "manifest",
                id: m.to_hex(),
                store: src.store().describe(),
            });
        }
        let p3 = path.clone();
        let list = tokio::task::spawn_blocking(move || Manifest::open(&p3)?.chunks())
            .await
            .expect("manifest task")
            .map_err(RepoError::from)?;
        chunks.extend(list.into_iter().map(|c| (c.id, c.len)));
    }
    report.chunks = chunks.len() as u64;
    let chunk_list: Vec<(ChunkId, u64)> = chunks.into_iter().collect();
    let keys: Vec<String> = chunk_list.iter().map(|(id, _)| chunk_key(id)).collect();
    let mut present = Vec::with_capacity(keys.len());
    for batch in keys.chunks(1000) {
        present.extend(dst_store.exists(batch).await?);
    }
    let missing: Vec<(ChunkId, u64)> = chunk_list
        .iter()
        .zip(&present)
        .filter(|(_, p)| !**p)
        .map(|(c, _)| *c)
        .collect();
    progress.start(missing.iter().map(|c| c.1).sum());

    // 3. Copy missing chunks, verified, with bounded parallelism.
    let copied = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(options.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (id, _len) in missing {
        let permit = sem.clone().acquire_owned().await.expect("open");
        let (s, d) = (src.store().clone(), dst_store.clone());
        let (copied, bytes) = (copied.clone(), bytes.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let key = chunk_key(&id);
            let data = s.get(&key).await?;
            let data2 = data.clone();
            let ok = tokio::task::spawn_blocking(move || hashtree::verify_chunk(id, data2).is_ok())
                .await
                .expect("hash task");
            if !ok {
                return Err(CopyError::Corrupt {
                    what: "chunk",
                    id: id.to_hex(),
                    store: s.describe(),
                });
            }
            let n = data.len() as u64;
            d.put(&key, data).await?;
            copied.fetch_add(1, Ordering::Relaxed);
            bytes.fetch_add(n, Ordering::Relaxed);
            Ok::<u64, CopyError>(n)
        });
        while tasks.len() >= options.concurrency.max(1) * 2 {
            if let Some(r) = tasks.join_next().await {
                progress.advance(r.expect("copy task")?);
            }
        }
    }
    while let Some(r) = tasks.join_next().await {
        progress.advance(r.expect("copy task")?);
    }
    report.chunks_copied = copied.load(Ordering::Relaxed);
    report.bytes_copied = bytes.load(Ordering::Relaxed);

    // 4. Manifests, then commits (already verified on read).
    // One existence query per kind, not one per object (each is a round trip on SSH or S3).
    let keys: Vec<String> = manifests.iter().map(manifest_key).collect();
    let present = dst_store.exists(&keys).await?;
    for ((m, key), present) in manifests.iter().zip(&keys).zip(present) {
        if !present {
            dst_store.put_file(key, &tmp.join(m.to_hex())).await?;
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let keys: Vec<String> = commits.iter().map(commit_key).collect();
    let present = dst_store.exists(&keys).await?;
    for ((c, key), present) in commits.iter().zip(&keys).zip(present) {
        let key = key.as_str();
        if !present {
            let data = src.store().get(key).await?;
            if CommitId::of(&data) != *c {
                return Err(CopyError::Corrupt {
                    what: "commit",
                    id: c.to_hex(),
                    store: src.store().describe(),
                });
            }
            dst_store.put(key, data).await?;
        }
    }

    // 5. Refs, last, by compare-and-swap.
    for (volume, key, id) in refs {
        let new = Bytes::from(format!("{id}\n"));
        let current = match dst_store.get(&key).await {
            Ok(b) => Some(b),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e.into()),
        };
        match &current {
            Some(b) if String::from_utf8_lossy(b).trim() == id.to_hex() => {
                report.refs_unchanged.push(key);
                continue;
            }
            Some(b) if !options.force && key.contains("/refs/heads/") => {
                let dst_id: Option<CommitId> = String::from_utf8_lossy(b).trim().parse().ok();
                let fast_forward = match dst_id {
                    Some(d) => is_ancestor(&dst, d, id).await?,
                    None => false,
                };
                if !fast_forward {
                    return Err(CopyError::Diverged {
                        volume,
                        branch: key.rsplit('/').next().unwrap_or_default().to_string(),
                        src: id.short(),
                        dst: dst_id
                            .map(|d| d.short())
                            .unwrap_or_else(|| "unreadable".into()),
                    });
                }
            }
            _ => {}
        }
        dst_store
            .compare_and_swap(&key, current.as_deref(), new)
            .await?;
        report.refs_updated.push(key);
    }
    Ok(report)
}

/// Whether `ancestor` is reachable from `head` through parents (in `repo`).
async fn is_ancestor(
    repo: &Repository,
    ancestor: CommitId,
    head: CommitId,
) -> Result<bool, RepoError> {
    let mut stack = vec![head];
    let mut seen = HashSet::new();
    while let Some(c) = stack.pop() {
        if c == ancestor {
            return Ok(true);
        }
        if !seen.insert(c) {
            continue;
        }
        let commit = repo.commit(c).await?;
        stack.extend(
            commit
                .parents
                .iter()
                .filter_map(|p| p.parse::<CommitId>().ok()),
        );
    }
    Ok(false)
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "horcrux-copy-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

//! Copying a repository (or some of its volumes and refs) from one store to another: the one
//! mechanism behind `horcrux copy`, `push` and `clone`.
//!
//! Order matters for readers of the destination: chunks, then manifests, then commits (parents
//! before children), then refs, so a ref never points at something missing. That order gives
//! every repository an invariant the copy relies on: **a commit present in a store implies its
//! manifest and chunks are present, and so are its ancestors** (except those a shallow clone
//! left out on purpose, see below). So the walk of the source's history stops at the first
//! commits the destination already has, and their chunks are known to be there: a push after a
//! small commit reads one or two manifests, not the whole history, and sends only what changed.
//!
//! Each chunk copied is followed by its piece outboard (FORMAT.md §3a), made from the chunk's
//! bytes in the pass that verifies them; a chunk the destination already holds without one
//! gets it too (the source's, checked against the chunk id, or one made from the source's
//! chunk). Chunks below the commits the walk stops at are not looked at: `verify --repair`
//! completes a repository whose older chunks lack outboards.
//!
//! Only objects the destination lacks are copied (a re-run after an interruption resumes and
//! re-sends nothing that arrived), every object is verified against its id on the way, and
//! refs move by compare-and-swap: a destination branch that is not an ancestor of the source's
//! is refused unless `force` is set, and so is a tag that points elsewhere. Divergence is
//! checked before any data moves (against the source's history) and again at the swap
//! (against the destination's), so of two racing pushers exactly one moves the branch.
//!
//! **Shallow copies** (`depth`): only the newest `depth` generations of commits of each ref are
//! copied; the oldest kept commits name parents the destination does not hold. Walks of
//! history (here, and `log`) treat a parent that is not in the repository as the end of the
//! history there.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::commit::Commit;
use crate::format::{chunk_key, commit_key, manifest_key, outboard_key};
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
    /// Refs to copy, relative to a volume's `refs/` (`heads/main`, `tags/v1`); all when `None`.
    /// Each must exist in the source.
    pub refs: Option<Vec<String>>,
    /// Move destination refs even if they are not ancestors of the source refs.
    pub force: bool,
    /// Parallel object transfers.
    pub concurrency: usize,
    /// Copy only the newest `depth` commits (generations) of each ref; all when `None`.
    pub depth: Option<u32>,
    /// A new copy (`clone`): refuse a volume whose refs at the destination differ from the
    /// source's (equal refs are an interrupted or finished clone of the same history).
    pub new_only: bool,
    /// `fetch`: copy commits and manifests but no chunks; the destination reads those from the
    /// source, registered there as a remote (see [`crate::remotes`]).
    pub lazy: bool,
    /// `fetch`: write the source's branches as remote-tracking refs of this remote
    /// (`refs/remotes/<name>/<branch>`) instead of as branches; tags are left out. A tracking
    /// ref follows the source wherever it went (no fast-forward check): it records where the
    /// remote is, it is nobody's work.
    pub tracking: Option<String>,
    /// Copy the chunks of the whole history that the destination lacks, also below commits it
    /// already has (which a lazy fetch may have left without their data): the walk does not
    /// stop at present commits, and every manifest is read. `pull --data`.
    pub hydrate: bool,
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

/// A ref moved (or created) at the destination.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RefMove {
    /// Store key, `volumes/<volume>/refs/heads/<branch>`.
    pub key: String,
    /// Hex id it was at; `None` if it did not exist.
    pub old: Option<String>,
    pub new: String,
    /// Moved although the old commit is not an ancestor of the new one (`force`).
    pub forced: bool,
}

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CopyReport {
    /// Commits the destination lacked (the part of the history that was copied).
    pub commits: u64,
    pub commits_copied: u64,
    /// Chunks of the new commits' manifests the destination was not known to hold.
    pub chunks: u64,
    pub chunks_copied: u64,
    /// Chunk data sent.
    pub bytes_copied: u64,
    pub manifests_copied: u64,
    /// Manifest and commit bytes sent.
    pub metadata_bytes: u64,
    /// Piece outboards written (FORMAT.md §3a): of the chunks copied, and of chunks the
    /// destination held without one; and their bytes.
    pub outboards_copied: u64,
    pub outboard_bytes: u64,
    /// Hex ids of copied commits whose parents were left out (`depth`) or are missing in the
    /// source (itself a shallow copy).
    pub shallow: Vec<String>,
    pub refs_updated: Vec<String>,
    pub refs_unchanged: Vec<String>,
    pub moves: Vec<RefMove>,
}

impl CopyReport {
    /// Everything sent: chunk data, piece outboards, manifests and commits (refs are a few
    /// bytes each).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_copied + self.outboard_bytes + self.metadata_bytes
    }
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
        "volume `{volume}`: {store}'s `{branch}` is at {dst}, which is not an ancestor of {src} \
         (not a fast-forward): fetch and merge is not supported yet; --force overwrites it \
         (its commits stay in the repository, unreferenced)"
    )]
    Diverged {
        volume: String,
        branch: String,
        store: String,
        src: String,
        dst: String,
    },
    #[error(
        "volume `{volume}`: {store}'s tag `{tag}` is at {dst}, not {src}: a tag is not moved \
         unless --force"
    )]
    TagMoved {
        volume: String,
        tag: String,
        store: String,
        src: String,
        dst: String,
    },
    #[error(
        "volume `{volume}` already exists in {store} with other versions ({detail}): a clone \
         makes a new copy; update an existing one with `horcrux push`, or remove it first"
    )]
    Exists {
        volume: String,
        store: String,
        detail: String,
    },
    #[error("volume `{volume}`: the source has no ref `{reference}` (refs there: {known})")]
    NoSuchRef {
        volume: String,
        reference: String,
        known: String,
    },
    #[error(
        "volume `{volume}`: `{key}` of {store} kept changing while it was being moved (another \
         writer?); nothing was overwritten: try again"
    )]
    Contended {
        volume: String,
        key: String,
        store: String,
    },
    #[error("temporary file: {0}")]
    Io(#[from] std::io::Error),
}

/// One ref to copy.
#[derive(Debug, Clone)]
struct RefToCopy {
    volume: String,
    /// Destination key (the source's, or a remote-tracking one).
    key: String,
    id: CommitId,
}

impl RefToCopy {
    fn is_branch(&self) -> bool {
        self.key.contains("/refs/heads/")
    }
    fn is_tracking(&self) -> bool {
        self.key.contains("/refs/remotes/")
    }
    fn name(&self) -> &str {
        let marker = if self.is_branch() {
            "/refs/heads/"
        } else {
            "/refs/tags/"
        };
        self.key
            .split_once(marker)
            .map_or_else(|| self.key.rsplit('/').next().unwrap_or_default(), |x| x.1)
    }
}

/// Copy `volumes` (all if empty) with their history from `src` to the repository in `dst`.
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
    if let Some(remote) = &options.tracking {
        crate::format::check_ref_name(remote).map_err(RepoError::from)?;
    }

    // 1. Refs, and what the destination has for them; refuse early what would be refused at
    //    the end (before any data moves).
    let mut refs: Vec<RefToCopy> = Vec::new();
    for v in &volumes {
        let all = read_refs(src.store().as_ref(), v).await?;
        match &options.refs {
            None => refs.extend(all.into_iter().map(|(key, id)| RefToCopy {
                volume: v.clone(),
                key,
                id,
            })),
            Some(wanted) => {
                let prefix = format!("volumes/{v}/refs/");
                for w in wanted {
                    let key = format!("{prefix}{w}");
                    let Some(id) = all.get(&key) else {
                        let known: Vec<&str> =
                            all.keys().filter_map(|k| k.strip_prefix(&prefix)).collect();
                        return Err(CopyError::NoSuchRef {
                            volume: v.clone(),
                            reference: w.clone(),
                            known: if known.is_empty() {
                                "none".into()
                            } else {
                                known.join(", ")
                            },
                        });
                    };
                    refs.push(RefToCopy {
                        volume: v.clone(),
                        key,
                        id: *id,
                    });
                }
            }
        }
        if options.new_only {
            let there = read_refs(dst_store.as_ref(), v).await?;
            let mine: HashMap<&str, CommitId> = refs
                .iter()
                .filter(|r| &r.volume == v)
                .map(|r| (r.key.as_str(), r.id))
                .collect();
            let differ: Vec<String> = there
                .iter()
                .filter(|(k, id)| mine.get(k.as_str()) != Some(id))
                .map(|(k, id)| {
                    format!(
                        "{} at {}",
                        k.rsplit_once("/refs/").map_or(k.as_str(), |x| x.1),
                        id.short()
                    )
                })
                .collect();
            if !differ.is_empty() {
                return Err(CopyError::Exists {
                    volume: v.clone(),
                    store: dst_store.describe(),
                    detail: differ.join(", "),
                });
            }
        }
    }
    if let Some(remote) = &options.tracking {
        refs = refs
            .into_iter()
            .filter_map(|r| {
                let (head, branch) = r.key.split_once("/refs/heads/")?;
                let key = format!("{head}/refs/remotes/{remote}/{branch}");
                Some(RefToCopy { key, ..r })
            })
            .collect();
    }
    for r in &refs {
        if let Some(current) = read_ref(dst_store.as_ref(), &r.key).await? {
            check_move(src, &dst, dst_store.as_ref(), r, current, options.force).await?;
        }
    }

    // 2. The commits the destination lacks: walk from the refs, generation by generation,
    //    stopping at commits it has (their history and data are there already).
    let mut new: HashMap<CommitId, (Commit, Bytes)> = HashMap::new();
    let mut order: Vec<CommitId> = Vec::new();
    let mut boundary: BTreeSet<CommitId> = BTreeSet::new();
    let mut seen: HashSet<CommitId> = HashSet::new();
    // With `hydrate`: commits the walk went through although the destination has them.
    let mut already: HashSet<CommitId> = HashSet::new();
    let mut frontier: Vec<CommitId> = refs.iter().map(|r| r.id).collect();
    let mut generation: u32 = 0;
    while !frontier.is_empty() {
        frontier.retain(|c| seen.insert(*c));
        let keys: Vec<String> = frontier.iter().map(commit_key).collect();
        let mut present = Vec::with_capacity(keys.len());
        for batch in keys.chunks(1000) {
            present.extend(dst_store.exists(batch).await?);
        }
        let mut next = Vec::new();
        for (id, present) in frontier.iter().zip(present) {
            if present && !options.hydrate {
                boundary.insert(*id);
                continue;
            }
            if present {
                already.insert(*id);
            }
            let bytes = match src.store().get(&commit_key(id)).await {
                Ok(b) => b,
                // A parent the source does not hold: the source is itself shallow.
                Err(e) if e.is_not_found() && generation > 0 => {
                    tracing::debug!(commit = %id, "parent missing in the source (shallow)");
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let c = Commit::decode(*id, &bytes).map_err(RepoError::from)?;
            let keep_parents = options.depth.is_none_or(|d| generation + 1 < d);
            if keep_parents {
                next.extend(c.parents.iter().filter_map(|p| p.parse::<CommitId>().ok()));
            } else if !c.parents.is_empty() {
                report.shallow.push(id.to_hex());
            }
            order.push(*id);
            new.insert(*id, (c, bytes));
        }
        // Parents the source lacks make copied commits shallow too.
        frontier = next;
        generation += 1;
    }
    for id in &order {
        let (c, _) = &new[id];
        let missing = c.parents.iter().any(|p| {
            p.parse::<CommitId>()
                .is_ok_and(|p| !new.contains_key(&p) && !boundary.contains(&p))
        });
        if missing && !report.shallow.contains(&id.to_hex()) {
            report.shallow.push(id.to_hex());
        }
    }
    report.commits = (order.len() - already.len()) as u64;
    let manifests: BTreeSet<ManifestId> = new
        .values()
        .map(|(c, _)| c.manifest_id().expect("decode checked the manifest id"))
        .collect();
    // Manifests of the commits the walk stopped at: their chunks are at the destination.
    let mut have_manifests: BTreeSet<ManifestId> = BTreeSet::new();
    for id in &boundary {
        let c = match src.commit(*id).await {
            Ok(c) => c,
            Err(_) => dst.commit(*id).await?,
        };
        have_manifests.insert(c.manifest_id().expect("decode checked the manifest id"));
    }

    // 3. Chunks of the new manifests, less those of the boundary's.
    let tmp = TempDir::new()?;
    let mut chunks: BTreeSet<(ChunkId, u64)> = BTreeSet::new();
    for m in &manifests {
        chunks.extend(manifest_chunks(src, m, &tmp.0).await?);
    }
    let mut have: HashSet<ChunkId> = HashSet::new();
    if options.lazy {
        // The data stays where it is: the destination reads it from the source, its remote.
        chunks.clear();
        have_manifests.clear();
    }
    for m in have_manifests.difference(&manifests) {
        have.extend(manifest_chunks(src, m, &tmp.0).await?.map(|c| c.0));
    }
    let chunk_list: Vec<(ChunkId, u64)> = chunks
        .into_iter()
        .filter(|c| !have.contains(&c.0))
        .collect();
    report.chunks = chunk_list.len() as u64;
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
    // Chunks the destination holds without their piece outboard (written by an older horcrux,
    // or a copy interrupted between the two): the outboard is sent alone.
    let held: Vec<(ChunkId, u64)> = chunk_list
        .iter()
        .zip(&present)
        .filter(|((_, len), p)| **p && hashtree::has_piece_outboard(*len))
        .map(|(c, _)| *c)
        .collect();
    let keys: Vec<String> = held.iter().map(|(id, _)| outboard_key(id)).collect();
    let mut has_outboard = Vec::with_capacity(keys.len());
    for batch in keys.chunks(1000) {
        has_outboard.extend(dst_store.exists(batch).await?);
    }
    let work: Vec<(ChunkId, u64, bool)> = missing
        .iter()
        .map(|(id, len)| (*id, *len, true))
        .chain(
            held.iter()
                .zip(&has_outboard)
                .filter(|(_, p)| !**p)
                .map(|((id, len), _)| (*id, *len, false)),
        )
        .collect();
    progress.start(missing.iter().map(|c| c.1).sum());

    // 4. Copy missing chunks (and outboards), verified, with bounded parallelism.
    let copied = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let outboards = Arc::new(AtomicU64::new(0));
    let outboard_bytes = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(options.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (id, len, chunk_too) in work {
        let permit = sem.clone().acquire_owned().await.expect("open");
        let (s, d) = (src.store().clone(), dst_store.clone());
        let (copied, bytes) = (copied.clone(), bytes.clone());
        let (outboards, outboard_bytes) = (outboards.clone(), outboard_bytes.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let sent = copy_chunk(s, d, id, len, chunk_too).await?;
            if chunk_too {
                copied.fetch_add(1, Ordering::Relaxed);
                bytes.fetch_add(sent.chunk, Ordering::Relaxed);
            }
            if sent.outboard > 0 {
                outboards.fetch_add(1, Ordering::Relaxed);
                outboard_bytes.fetch_add(sent.outboard, Ordering::Relaxed);
            }
            Ok::<u64, CopyError>(sent.chunk)
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
    report.outboards_copied = outboards.load(Ordering::Relaxed);
    report.outboard_bytes = outboard_bytes.load(Ordering::Relaxed);
    report.chunks_copied = copied.load(Ordering::Relaxed);
    report.bytes_copied = bytes.load(Ordering::Relaxed);

    // 5. Manifests, then commits, parents first (all verified on read).
    // One existence query per kind, not one per object (each is a round trip on SSH or S3).
    let keys: Vec<String> = manifests.iter().map(manifest_key).collect();
    let present = dst_store.exists(&keys).await?;
    for ((m, key), present) in manifests.iter().zip(&keys).zip(present) {
        if !present {
            let path = tmp.0.join(m.to_hex());
            dst_store.put_file(key, &path).await?;
            report.manifests_copied += 1;
            report.metadata_bytes += std::fs::metadata(&path).map_or(0, |m| m.len());
        }
    }
    for id in parents_first(&order, &new) {
        if already.contains(&id) {
            continue;
        }
        let (_, data) = &new[&id];
        dst_store.put(&commit_key(&id), data.clone()).await?;
        report.commits_copied += 1;
        report.metadata_bytes += data.len() as u64;
    }

    // 6. Refs, last, by compare-and-swap; a lost race is judged again against the new value.
    for r in refs {
        let new_bytes = Bytes::from(format!("{}\n", r.id));
        let mut attempts = 0;
        loop {
            let current = read_ref(dst_store.as_ref(), &r.key).await?;
            if current == Some(r.id) {
                report.refs_unchanged.push(r.key.clone());
                break;
            }
            let forced = match current {
                Some(c) => check_move(src, &dst, dst_store.as_ref(), &r, c, options.force).await?,
                None => false,
            };
            let expected = current.map(|c| format!("{c}\n").into_bytes());
            match dst_store
                .compare_and_swap(&r.key, expected.as_deref(), new_bytes.clone())
                .await
            {
                Ok(()) => {
                    report.refs_updated.push(r.key.clone());
                    report.moves.push(RefMove {
                        key: r.key.clone(),
                        old: current.map(|c| c.to_hex()),
                        new: r.id.to_hex(),
                        forced,
                    });
                    break;
                }
                Err(StoreError::CasConflict { .. }) if attempts < 5 => attempts += 1,
                Err(StoreError::CasConflict { .. }) => {
                    return Err(CopyError::Contended {
                        volume: r.volume.clone(),
                        key: r.key.clone(),
                        store: dst_store.describe(),
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(report)
}

/// Bytes one [`copy_chunk`] sent.
#[derive(Debug, Default)]
struct Sent {
    chunk: u64,
    outboard: u64,
}

/// Copy chunk `id` (of `len` bytes, as the verified manifest says) from `s` to `d`, verified,
/// then its piece outboard; with `chunk_too` false, `d` holds the chunk and only lacks the
/// outboard. An outboard is derived data: made from the chunk's bytes in the pass that
/// verifies them (so copying a chunk costs no extra read), or, for a chunk not copied, taken
/// from the source after a check of the whole object against the chunk id — a bad one is
/// never copied, it is made from the source's chunk instead.
async fn copy_chunk(
    s: Arc<dyn Store>,
    d: Arc<dyn Store>,
    id: ChunkId,
    len: u64,
    chunk_too: bool,
) -> Result<Sent, CopyError> {
    let mut sent = Sent::default();
    let corrupt = |s: &Arc<dyn Store>| CopyError::Corrupt {
        what: "chunk",
        id: id.to_hex(),
        store: s.describe(),
    };
    let ob_key = outboard_key(&id);
    if !chunk_too {
        match s.get(&ob_key).await {
            Ok(raw) => match hashtree::check_piece_outboard(id, len, &raw) {
                Ok(()) => {
                    sent.outboard = raw.len() as u64;
                    d.put(&ob_key, raw).await?;
                    return Ok(sent);
                }
                Err(e) => {
                    tracing::warn!(chunk = %id, store = %s.describe(), error = %e,
                        "not copying a bad piece outboard: making it from the chunk");
                }
            },
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    let data = s.get(&chunk_key(&id)).await?;
    let data2 = data.clone();
    let made = tokio::task::spawn_blocking(move || {
        hashtree::verify_chunk_with_outboard(id, data2).map(|(_, ob)| ob)
    })
    .await
    .expect("hash task");
    let Ok(outboard) = made else {
        return Err(corrupt(&s));
    };
    if chunk_too {
        sent.chunk = data.len() as u64;
        d.put(&chunk_key(&id), data).await?;
    }
    // After the chunk: an outboard never names a chunk the store does not have.
    if let Some(ob) = outboard {
        sent.outboard = ob.len() as u64;
        d.put(&ob_key, Bytes::from(ob)).await?;
    }
    Ok(sent)
}

/// Whether the destination's ref at `current` may move to `r.id`: a fast-forward for a branch
/// (judged in the source's history, then the destination's), never for a tag; `Ok(true)` when
/// it may only because of `force`.
async fn check_move(
    src: &Repository,
    dst: &Repository,
    dst_store: &dyn Store,
    r: &RefToCopy,
    current: CommitId,
    force: bool,
) -> Result<bool, CopyError> {
    if current == r.id {
        return Ok(false);
    }
    if r.is_tracking() {
        return Ok(!is_ancestor(src, current, r.id).await?);
    }
    if r.is_branch() {
        if is_ancestor(src, current, r.id).await? || is_ancestor(dst, current, r.id).await? {
            return Ok(false);
        }
        if force {
            return Ok(true);
        }
        return Err(CopyError::Diverged {
            volume: r.volume.clone(),
            branch: r.name().to_string(),
            store: dst_store.describe(),
            src: r.id.short(),
            dst: current.short(),
        });
    }
    if force {
        return Ok(true);
    }
    Err(CopyError::TagMoved {
        volume: r.volume.clone(),
        tag: r.name().to_string(),
        store: dst_store.describe(),
        src: r.id.short(),
        dst: current.short(),
    })
}

/// The refs of `volume` in `store`: key → commit.
async fn read_refs(
    store: &dyn Store,
    volume: &str,
) -> Result<BTreeMap<String, CommitId>, CopyError> {
    let mut out = BTreeMap::new();
    for key in store.list(&format!("volumes/{volume}/refs/")).await? {
        if let Some(id) = read_ref(store, &key).await? {
            out.insert(key, id);
        }
    }
    Ok(out)
}

/// The commit a ref names; `None` if it does not exist.
async fn read_ref(store: &dyn Store, key: &str) -> Result<Option<CommitId>, CopyError> {
    let bytes = match store.get(key).await {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let text = String::from_utf8_lossy(&bytes);
    text.trim().parse().map(Some).map_err(|_| {
        RepoError::BadRef {
            store: store.describe(),
            key: key.to_string(),
            content: text.chars().take(80).collect(),
        }
        .into()
    })
}

/// Download manifest `m` of `src` into `dir` (if not there yet), check it against its id, and
/// list its chunks.
async fn manifest_chunks(
    src: &Repository,
    m: &ManifestId,
    dir: &std::path::Path,
) -> Result<impl Iterator<Item = (ChunkId, u64)>, CopyError> {
    let path = dir.join(m.to_hex());
    if !path.exists() {
        src.store().get_to_file(&manifest_key(m), &path).await?;
        let p2 = path.clone();
        let got = tokio::task::spawn_blocking(move || crate::manifest::hash_file(&p2))
            .await
            .expect("hash task")
            .map_err(RepoError::from)?;
        if got != *m {
            let _ = std::fs::remove_file(&path);
            return Err(CopyError::Corrupt {
                what: "manifest",
                id: m.to_hex(),
                store: src.store().describe(),
            });
        }
    }
    let list = tokio::task::spawn_blocking(move || Manifest::open(&path)?.chunks())
        .await
        .expect("manifest task")
        .map_err(RepoError::from)?;
    Ok(list.into_iter().map(|c| (c.id, c.len)))
}

/// `order`'s commits with every parent before its children (a depth-first post-order).
fn parents_first(order: &[CommitId], new: &HashMap<CommitId, (Commit, Bytes)>) -> Vec<CommitId> {
    let mut out = Vec::with_capacity(order.len());
    let mut done: HashSet<CommitId> = HashSet::new();
    for root in order {
        // (commit, parents pushed yet)
        let mut stack = vec![(*root, false)];
        while let Some((id, expanded)) = stack.pop() {
            if done.contains(&id) {
                continue;
            }
            if expanded {
                done.insert(id);
                out.push(id);
                continue;
            }
            stack.push((id, true));
            for p in &new[&id].0.parents {
                if let Ok(p) = p.parse::<CommitId>() {
                    if new.contains_key(&p) && !done.contains(&p) {
                        stack.push((p, false));
                    }
                }
            }
        }
    }
    out
}

/// Whether `ancestor` is reachable from `head` through parents (in `repo`). A commit the
/// repository does not hold (the edge of a shallow copy, or `head` not copied yet) ends that
/// path.
pub async fn is_ancestor(
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
        let commit = match repo.commit(c).await {
            Ok(c) => c,
            Err(RepoError::Store(e)) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        stack.extend(
            commit
                .parents
                .iter()
                .filter_map(|p| p.parse::<CommitId>().ok()),
        );
    }
    Ok(false)
}

/// A scratch directory for downloaded manifests, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> std::io::Result<Self> {
        tempfile_dir().map(Self)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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

//! `gc`: removing the objects of a repository that no ref reaches.
//!
//! **Mark.** Every ref of every volume (`volumes/*/refs/heads|tags/*`, and the
//! remote-tracking `refs/remotes/*/*`) is a root. From each, the
//! walk follows commits along their parents; a reachable commit's manifest is reachable, and
//! so is every chunk that manifest lists (manifests are downloaded to a temporary directory and
//! checked against their ids). A parent the repository does not hold ends the walk there (a
//! shallow copy, `docs/FORMAT.md` §2); a reachable manifest or commit that is missing is
//! reported (the repository is damaged there) and the run goes on: nothing it reaches is
//! removed anyway. A commit, manifest or ref that cannot be read or does not match its id stops
//! the run before anything is removed: what it reaches is unknown.
//!
//! **Sweep, in two phases with a grace period.** The unreachable objects are the listed
//! objects (`chunks/`, `manifests/`, `commits/`; any other key is left alone) that the mark did
//! not reach. A run does not remove an object the moment it finds it unreachable. It records
//! its unreachable objects in `gc/pending-<unix time>-<pid>` (JSON: key → the time since which
//! it has been unreachable in consecutive runs), and removes only objects that an *earlier*
//! record already listed as unreachable since at least `grace` ago (default one hour) and that
//! are still unreachable now. So the first run only records (`--grace 0` included), and an
//! object is removed at the earliest by a run that starts `grace` after the first run that saw
//! it unreachable. Each run rewrites the record (an object that became reachable again drops
//! out, and starts over if it is ever unreachable again) and removes the records it read.
//!
//! **Why this is safe against a concurrent writer** (`commit`, `push`, `clone`, `copy`,
//! `generate` into an existing repository). Every writer puts chunks, then the manifest, then
//! the commit, and moves the ref last, by compare-and-swap. Until the ref moves, what it wrote
//! is unreachable, so a run may see it as unreachable and record it. It is removed only by a
//! later run that starts at least `grace` after that and *still* finds it unreachable: for the
//! writer's objects to be lost, the writer must have put them before the first run and still
//! not have moved its ref when the later run marks — a writer that ran for longer than the
//! grace period. The default hour is far longer than a commit or a push of a change; for a
//! push or clone of hundreds of GiB over a slow link, use a longer `--grace` (an interrupted
//! push that resumes after the grace period re-sends what a run removed: it checks what the
//! destination holds before sending).
//!
//! **The remaining window.** A writer may also *reuse* an object it finds present instead of
//! writing it: a push stops its history walk at a commit the destination holds and skips that
//! commit's chunks, and a commit or push skips a chunk that exists. If that object is
//! unreachable (e.g. the commits of a deleted branch, pushed again on top) and has been for
//! longer than the grace period, a run that removes it between the writer's existence check and
//! its ref move leaves the new ref reaching a missing object. To keep that window small, the
//! sweep re-reads every ref just before removing commits, again before removing manifests, and
//! again before removing chunks; any ref that moved is marked again, and whatever it reaches is kept. What is
//! left is a writer whose existence check came before the run's last ref check and whose ref
//! move comes after the removal: the two must overlap within seconds, on an object that has
//! been garbage for at least the grace period. `gc` reports any reachable object that is
//! missing, so the damage is never silent; pushing the branch again with the source repository
//! re-sends what is missing of a commit that is missing (not of a present commit whose chunks
//! were removed: for that, `horcrux copy` from a complete copy, which verifies every chunk). A
//! live mount of a commit no ref reaches (a commit id, or a branch deleted since) can lose
//! chunks it has not cached yet.
//!
//! **Order of removal.** Commits first, then manifests, then chunks: a run that stops half-way
//! never leaves a commit without its manifest or chunks, so the invariant that a present commit
//! is complete (`docs/FORMAT.md` §2) holds at every moment.
//!
//! **Piece outboards** (`outboards/`, `docs/FORMAT.md` §3a) are derived data, not objects of
//! their own: a chunk's outboard is removed right after the chunk, and an outboard whose chunk
//! is not in the repository (an orphan: a run stopped between the two, a chunk deleted by
//! hand) is removed by any run that is not a dry run, without a grace period. That is safe
//! because every writer puts a chunk before its outboard and the listing takes outboards
//! before chunks: an outboard whose chunk the listing lacks is not one being written.
//!
//! **Clocks.** The record times are the *store's* clock, read at the start of each run
//! (`Store::now`: the mtime a new file gets on a `file://` or SSH repository, the
//! `Last-Modified` of a probe object on S3), so several hosts collecting one repository agree
//! on how long an object has been unreachable even when their own clocks are hours apart; only
//! a store without a readable clock (a peer) falls back to the local one. A record time ahead
//! of the current run's is taken as now. Writers' clocks are never consulted: no object's own
//! time is read, so a writer whose clock is a day behind or ahead loses nothing it uploads.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::commit::Commit;
use crate::format::{chunk_key, commit_key, manifest_key};
use crate::ids::{ChunkId, CommitId, ManifestId};
use crate::manifest::Manifest;
use crate::repo::{RepoError, Repository};
use crate::store::{Store, StoreError};

/// Where pending records live.
pub const GC_PREFIX: &str = "gc/";

/// The default grace period.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);

/// What to do.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Report what would be removed; write and remove nothing.
    pub dry_run: bool,
    /// How long an object must have been unreachable (in earlier runs) before it is removed.
    pub grace: Duration,
    /// Parallel removals and manifest downloads.
    pub concurrency: usize,
    /// "Now" in seconds since the epoch (`None`: the system clock). For tests.
    pub now: Option<u64>,
    /// Commits to keep as if a ref named them (e.g. the commit a mount sits on).
    pub keep: Vec<CommitId>,
    /// Stores of the registered remotes: reachable chunks found there are lazily fetched
    /// data (`crate::remotes`), not damage.
    pub remotes: Vec<Arc<dyn Store>>,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            dry_run: false,
            grace: DEFAULT_GRACE,
            concurrency: 16,
            now: None,
            keep: Vec::new(),
            remotes: Vec::new(),
        }
    }
}

/// Progress callbacks: a phase with a number of steps, then steps done.
pub trait GcProgress: Send + Sync {
    fn phase(&self, what: &str, total: u64);
    fn advance(&self, n: u64);
}

/// No progress output.
#[derive(Debug)]
pub struct NoGcProgress;

impl GcProgress for NoGcProgress {
    fn phase(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
}

/// Objects of one kind and their total size.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub objects: u64,
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, bytes: u64) {
        self.objects += 1;
        self.bytes += bytes;
    }
}

/// What a run found and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// Refs (branches and tags of every volume) the mark started from.
    pub refs: u64,
    /// Reachable commits present in the repository.
    pub commits: u64,
    /// Objects kept because a ref reaches them.
    pub reachable: Tally,
    /// Objects no ref reaches (removed or not).
    pub unreachable: Tally,
    /// Their keys, sorted.
    pub unreachable_keys: Vec<String>,
    /// Objects removed by this run (with `dry_run`: that a run now would remove).
    pub removed: Tally,
    pub removed_keys: Vec<String>,
    /// Unreachable objects left for a later run (not unreachable for the grace period yet).
    pub pending: Tally,
    /// Unreachable objects that a ref moved by a concurrent writer reached again during the
    /// sweep, and were kept.
    pub rescued: u64,
    /// Keys a ref reaches that the repository does not hold (damage, reported, not repaired).
    pub missing: Vec<String>,
    /// Reachable chunks held by a registered remote, not here (lazily fetched data).
    pub on_remotes: u64,
    /// The record this run wrote (`None` when there was nothing to record, or `dry_run`).
    pub record: Option<String>,
    /// Piece outboards removed (with `dry_run`: that a run now would remove): those of the
    /// chunks removed, and orphans.
    pub outboards_removed: Tally,
    /// Piece outboards whose chunk is not in the repository (left by an interrupted removal,
    /// or by a chunk deleted by hand), sorted; removed unless `dry_run`.
    pub orphan_outboards: Vec<String>,
}

/// Errors of a run.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "{what} {id} in {store} does not match its id: it cannot be trusted to say what it \
         reaches, so nothing was removed; repair it (e.g. `horcrux copy` from a good copy)"
    )]
    Corrupt {
        what: &'static str,
        id: String,
        store: String,
    },
    #[error("temporary directory: {0}")]
    Io(#[from] std::io::Error),
}

/// A pending record: when each unreachable object was first seen so, in consecutive runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    version: u32,
    time: u64,
    /// key → unix time since which it has been unreachable.
    candidates: BTreeMap<String, u64>,
}

/// The objects of the repository by kind: key → size.
#[derive(Debug, Default)]
struct Listing {
    commits: BTreeMap<String, u64>,
    manifests: BTreeMap<String, u64>,
    chunks: BTreeMap<String, u64>,
    /// Piece outboards (FORMAT.md §3a): not objects of their own, they go with their chunk.
    outboards: BTreeMap<String, u64>,
}

impl Listing {
    fn size(&self, key: &str) -> Option<u64> {
        self.commits
            .get(key)
            .or_else(|| self.manifests.get(key))
            .or_else(|| self.chunks.get(key))
            .copied()
    }

    fn all(&self) -> impl Iterator<Item = (&String, &u64)> {
        self.commits
            .iter()
            .chain(&self.manifests)
            .chain(&self.chunks)
    }
}

/// The chunk a well-formed `chunks/` key names.
fn chunk_of_key(key: &str) -> Option<ChunkId> {
    let (_, id) = key.strip_prefix("chunks/")?.split_once('/')?;
    id.parse().ok()
}

/// The chunk a well-formed `outboards/` key is the piece outboard of.
fn outboard_of_key(key: &str) -> Option<ChunkId> {
    let (fan, id) = key.strip_prefix("outboards/")?.split_once('/')?;
    let chunk: ChunkId = id.parse().ok()?;
    (fan.len() == 2 && id.starts_with(fan)).then_some(chunk)
}

/// Whether `key` is a well-formed object key (`chunks/ab/ab…`, `manifests/…`, `commits/…`).
fn is_object_key(key: &str) -> bool {
    if let Some(rest) = key.strip_prefix("chunks/") {
        return rest.split_once('/').is_some_and(|(fan, id)| {
            id.parse::<ChunkId>().is_ok() && id.starts_with(fan) && fan.len() == 2
        });
    }
    if let Some(id) = key.strip_prefix("manifests/") {
        return id.parse::<ManifestId>().is_ok();
    }
    if let Some(id) = key.strip_prefix("commits/") {
        return id.parse::<CommitId>().is_ok();
    }
    false
}

/// Everything reachable, as store keys.
struct Mark<'a> {
    repo: &'a Repository,
    tmp: PathBuf,
    concurrency: usize,
    reachable: HashSet<String>,
    commits_seen: HashSet<CommitId>,
    manifests_done: HashSet<ManifestId>,
    commits: u64,
    missing: BTreeSet<String>,
    /// Parents that are not in the repository (the edges of shallow copies, normally).
    absent_parents: BTreeSet<String>,
}

impl<'a> Mark<'a> {
    /// Nothing marked yet; manifests are downloaded into `tmp`.
    fn new(repo: &'a Repository, tmp: PathBuf, concurrency: usize) -> Self {
        Self {
            repo,
            tmp,
            concurrency,
            reachable: HashSet::new(),
            commits_seen: HashSet::new(),
            manifests_done: HashSet::new(),
            commits: 0,
            missing: BTreeSet::new(),
            absent_parents: BTreeSet::new(),
        }
    }

    /// Mark everything `tips` reach (skipping what is marked already).
    async fn from(
        &mut self,
        tips: impl IntoIterator<Item = CommitId>,
        progress: &dyn GcProgress,
    ) -> Result<(), GcError> {
        let store = self.repo.store().clone();
        let mut stack: Vec<(CommitId, bool)> = tips.into_iter().map(|t| (t, true)).collect();
        let mut manifests: Vec<ManifestId> = Vec::new();
        while let Some((id, is_tip)) = stack.pop() {
            if !self.commits_seen.insert(id) {
                continue;
            }
            let key = commit_key(&id);
            let bytes = match store.get(&key).await {
                Ok(b) => b,
                Err(e) if e.is_not_found() => {
                    // A tip that is missing is damage; a parent that is missing is the edge of
                    // a shallow copy.
                    if is_tip {
                        self.missing.insert(key);
                    } else {
                        self.absent_parents.insert(key);
                    }
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let c = Commit::decode(id, &bytes).map_err(|_| GcError::Corrupt {
                what: "commit",
                id: id.to_hex(),
                store: store.describe(),
            })?;
            self.reachable.insert(key);
            self.commits += 1;
            let m = c.manifest_id().ok_or_else(|| GcError::Corrupt {
                what: "commit",
                id: id.to_hex(),
                store: store.describe(),
            })?;
            if self.manifests_done.insert(m) {
                manifests.push(m);
            }
            for p in &c.parents {
                let p: CommitId = p.parse().map_err(|_| GcError::Corrupt {
                    what: "commit",
                    id: id.to_hex(),
                    store: store.describe(),
                })?;
                stack.push((p, false));
            }
        }
        progress.phase("reading manifests", manifests.len() as u64);
        let tmp = self.tmp.clone();
        let mut results = futures_util::stream::iter(manifests)
            .map(|m| {
                let store = store.clone();
                let tmp = tmp.clone();
                async move { (m, manifest_chunks(store, m, &tmp).await) }
            })
            .buffer_unordered(self.concurrency.max(1));
        while let Some((m, r)) = results.next().await {
            progress.advance(1);
            match r? {
                Some(chunks) => {
                    self.reachable.insert(manifest_key(&m));
                    self.reachable
                        .extend(chunks.into_iter().map(|c| chunk_key(&c)));
                }
                None => {
                    self.missing.insert(manifest_key(&m));
                }
            }
        }
        Ok(())
    }
}

/// What every ref of a repository reaches (for `verify`).
#[derive(Debug, Default)]
pub(crate) struct Reachable {
    pub refs: u64,
    /// Store keys of reachable objects the walk read (commits, manifests) or that a read
    /// manifest lists (chunks, not checked for presence).
    pub keys: HashSet<String>,
    pub commits: u64,
    /// Reachable commits and manifests the repository does not hold.
    pub missing: BTreeSet<String>,
    /// Parents not in the repository (the edges of shallow copies).
    pub absent_parents: u64,
}

/// Mark everything the refs reach (commits and manifests are checked against their ids).
pub(crate) async fn reachable(
    repo: &Repository,
    concurrency: usize,
    progress: &dyn GcProgress,
) -> Result<Reachable, GcError> {
    let tmp = ScratchDir::new()?;
    progress.phase("reading refs", 0);
    let refs = read_refs(repo).await?;
    let mut mark = Mark::new(repo, tmp.0.clone(), concurrency);
    mark.from(refs.values().copied(), progress).await?;
    Ok(Reachable {
        refs: refs.len() as u64,
        keys: mark.reachable,
        commits: mark.commits,
        missing: mark.missing,
        absent_parents: mark.absent_parents.len() as u64,
    })
}

/// The chunks manifest `m` lists (downloaded to `dir` and checked); `None` if it is missing.
async fn manifest_chunks(
    store: Arc<dyn Store>,
    m: ManifestId,
    dir: &Path,
) -> Result<Option<Vec<ChunkId>>, GcError> {
    let path = dir.join(m.to_hex());
    match store.get_to_file(&manifest_key(&m), &path).await {
        Ok(()) => {}
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let r = tokio::task::spawn_blocking(move || {
        let got = crate::manifest::hash_file(&path)?;
        if got != m {
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        let chunks = Manifest::open(&path)?.chunks();
        let _ = std::fs::remove_file(&path);
        chunks.map(|v| Some(v.into_iter().map(|c| c.id).collect::<Vec<_>>()))
    })
    .await
    .expect("manifest task")
    .map_err(RepoError::from)?;
    r.map(Some).ok_or_else(|| GcError::Corrupt {
        what: "manifest",
        id: m.to_hex(),
        store: store.describe(),
    })
}

/// Every ref of every volume: key → commit.
async fn read_refs(repo: &Repository) -> Result<BTreeMap<String, CommitId>, GcError> {
    let mut out = BTreeMap::new();
    for v in repo.volumes().await? {
        for (name, id) in repo.branches(&v).await? {
            out.insert(crate::format::branch_key(&v, &name), id);
        }
        for (name, id) in repo.tags(&v).await? {
            out.insert(crate::format::tag_key(&v, &name), id);
        }
        for (remote, branch, id) in repo.remote_branches(&v).await? {
            out.insert(crate::format::remote_ref_key(&v, &remote, &branch), id);
        }
    }
    // Keys under refs/ that are not valid ref names are skipped by `branches`/`tags`; a ref
    // that does not parse fails there, and stops the run.
    Ok(out)
}

async fn list(store: &dyn Store) -> Result<Listing, GcError> {
    let mut l = Listing::default();
    // Outboards before chunks: every writer puts a chunk before its outboard, so an outboard
    // listed here whose chunk the next listing lacks is an orphan, not a chunk being written.
    l.outboards.extend(
        store
            .list_sizes("outboards/")
            .await?
            .into_iter()
            .filter(|(k, _)| outboard_of_key(k).is_some()),
    );
    for (prefix, into) in [
        ("commits/", &mut l.commits),
        ("manifests/", &mut l.manifests),
        ("chunks/", &mut l.chunks),
    ] {
        into.extend(
            store
                .list_sizes(prefix)
                .await?
                .into_iter()
                .filter(|(k, _)| is_object_key(k)),
        );
    }
    Ok(l)
}

/// The pending records in the store: (key, record). A record that does not parse is ignored
/// (and removed with the others by a run that is not a dry run).
async fn read_records(store: &dyn Store) -> Result<Vec<(String, Option<Record>)>, GcError> {
    let mut out = Vec::new();
    for key in store.list(GC_PREFIX).await? {
        if !key
            .strip_prefix(GC_PREFIX)
            .is_some_and(|n| n.starts_with("pending-"))
        {
            continue;
        }
        let rec = match store.get(&key).await {
            Ok(b) => serde_json::from_slice::<Record>(&b).ok(),
            Err(e) if e.is_not_found() => continue, // removed by a concurrent run
            Err(e) => return Err(e.into()),
        };
        if rec.is_none() {
            tracing::warn!(%key, "ignoring a gc record that does not parse");
        }
        out.push((key, rec));
    }
    Ok(out)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Run a collection of `repo`'s store.
pub async fn gc(
    repo: &Repository,
    options: &GcOptions,
    progress: &dyn GcProgress,
) -> Result<GcReport, GcError> {
    let store = repo.store().clone();
    // The grace period is measured by the store's clock where it has one (file mtimes, the
    // SSH server's, S3's Last-Modified): every host collecting the repository then uses the
    // same clock, whatever its own says. Writers' clocks never matter (no object's time is
    // read), so a writer with a wrong clock loses nothing.
    let now = match options.now {
        Some(n) => n,
        None => match store.now().await? {
            Some(t) => t
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            None => unix_now(),
        },
    };
    let mut report = GcReport {
        dry_run: options.dry_run,
        ..Default::default()
    };
    let tmp = ScratchDir::new()?;

    // Records first: what they list was unreachable when they were written, before this
    // run's mark.
    let records = read_records(store.as_ref()).await?;
    let mut since: BTreeMap<String, u64> = BTreeMap::new();
    for (_, r) in &records {
        for (k, t) in r.iter().flat_map(|r| &r.candidates) {
            let e = since.entry(k.clone()).or_insert(*t);
            *e = (*e).min(*t);
        }
    }

    // Mark.
    progress.phase("reading refs", 0);
    let mut refs = read_refs(repo).await?;
    report.refs = refs.len() as u64;
    let mut mark = Mark::new(repo, tmp.0.clone(), options.concurrency);
    mark.from(
        refs.values().copied().chain(options.keep.iter().copied()),
        progress,
    )
    .await?;

    // What is there, listed after the mark: an object a writer put after the mark is listed
    // here unreachable, recorded, and removed at the earliest after the grace period.
    progress.phase("listing objects", 0);
    let listing = list(store.as_ref()).await?;
    let mut unreachable: BTreeMap<String, u64> = BTreeMap::new();
    for (k, size) in listing.all() {
        if mark.reachable.contains(k) {
            report.reachable.add(*size);
        } else {
            unreachable.insert(k.clone(), *size);
        }
    }
    // Reachable objects the repository does not hold (chunks of a present manifest, say),
    // unless a registered remote holds them (lazily fetched data).
    let absent: Vec<String> = mark
        .reachable
        .iter()
        .filter(|k| listing.size(k).is_none())
        .cloned()
        .collect();
    let held = crate::remotes::held_by(&options.remotes, &absent).await;
    report.on_remotes = held.len() as u64;
    mark.missing
        .extend(absent.into_iter().filter(|k| !held.contains(k)));
    // Eligible: listed unreachable by an earlier run at least `grace` ago, and still so.
    let grace = options.grace.as_secs();
    let mut eligible: BTreeSet<String> = unreachable
        .keys()
        .filter(|k| {
            since
                .get(*k)
                .is_some_and(|t| t.saturating_add(grace) <= now)
        })
        .cloned()
        .collect();

    if !options.dry_run && !eligible.is_empty() {
        // Commits, then manifests, then chunks; refs re-read before each step.
        for kind in ["commits/", "manifests/", "chunks/"] {
            let now_refs = read_refs(repo).await?;
            let moved: Vec<CommitId> = now_refs
                .iter()
                .filter(|(k, id)| refs.get(*k) != Some(id))
                .map(|(_, id)| *id)
                .collect();
            if !moved.is_empty() {
                tracing::info!(
                    refs = moved.len(),
                    "refs moved during gc: marking what they reach"
                );
                mark.from(moved, progress).await?;
                let before = eligible.len();
                eligible.retain(|k| !mark.reachable.contains(k));
                report.rescued += (before - eligible.len()) as u64;
            }
            refs = now_refs;
            let batch: Vec<String> = eligible
                .iter()
                .filter(|k| k.starts_with(kind))
                .cloned()
                .collect();
            progress.phase(
                &format!("removing {}", kind.trim_end_matches('/')),
                batch.len() as u64,
            );
            let mut results = futures_util::stream::iter(batch)
                .map(|k| {
                    let store = store.clone();
                    let outboard = chunk_of_key(&k)
                        .map(|id| crate::format::outboard_key(&id))
                        .filter(|o| listing.outboards.contains_key(o));
                    async move {
                        let mut r = store.delete(&k).await;
                        // A chunk's piece outboard (FORMAT.md §3a) goes with it, after it (one
                        // put after the listing is an orphan for the next run).
                        if let (Ok(()), Some(o)) = (&r, &outboard) {
                            r = store.delete(o).await;
                        }
                        (k, outboard, r)
                    }
                })
                .buffer_unordered(options.concurrency.max(1));
            while let Some((k, outboard, r)) = results.next().await {
                r?;
                progress.advance(1);
                report.removed.add(listing.size(&k).unwrap_or(0));
                report.removed_keys.push(k);
                if let Some(o) = outboard {
                    report.outboards_removed.add(listing.outboards[&o]);
                }
            }
        }
    } else if options.dry_run {
        for k in &eligible {
            report.removed.add(listing.size(k).unwrap_or(0));
            report.removed_keys.push(k.clone());
            if let Some(size) = chunk_of_key(k)
                .and_then(|id| listing.outboards.get(&crate::format::outboard_key(&id)))
            {
                report.outboards_removed.add(*size);
            }
        }
    }
    report.removed_keys.sort();

    // Orphan outboards: derived data of a chunk that is gone, useless to any reader (one is
    // only used after a check against its chunk's hashes). Removed at once: no writer puts an
    // outboard before its chunk, so none of them is a chunk in the making.
    report.orphan_outboards = listing
        .outboards
        .keys()
        .filter(|o| {
            outboard_of_key(o).is_some_and(|id| !listing.chunks.contains_key(&chunk_key(&id)))
        })
        .cloned()
        .collect();
    if !report.orphan_outboards.is_empty() {
        progress.phase(
            "removing orphan outboards",
            report.orphan_outboards.len() as u64,
        );
    }
    for o in &report.orphan_outboards {
        if !options.dry_run {
            match store.delete(o).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
            progress.advance(1);
        }
        report.outboards_removed.add(listing.outboards[o]);
    }

    // Rescued objects are reachable now; the rest is unreachable, removed or pending.
    let removed: HashSet<&String> = report.removed_keys.iter().collect();
    let mut pending: BTreeMap<String, u64> = BTreeMap::new();
    for (k, size) in &unreachable {
        if mark.reachable.contains(k) {
            report.reachable.add(*size);
            continue;
        }
        report.unreachable.add(*size);
        report.unreachable_keys.push(k.clone());
        if !removed.contains(k) {
            report.pending.add(*size);
            pending.insert(k.clone(), since.get(k).copied().unwrap_or(now).min(now));
        }
    }
    // Something removed that a ref moved during the sweep reaches after all (the window
    // described in the module documentation): reported, loudly.
    for k in &report.removed_keys {
        if mark.reachable.contains(k) || mark.absent_parents.contains(k) {
            tracing::error!(key = %k, "gc removed an object that a concurrent writer made reachable");
            mark.missing.insert(k.clone());
        }
    }
    report.commits = mark.commits;
    report.missing = mark.missing.into_iter().collect();

    if !options.dry_run {
        // The new record, then the old ones go: a run interrupted in between leaves both,
        // and the next run takes the earliest time of each object.
        if !pending.is_empty() {
            let key = format!("{GC_PREFIX}pending-{now}-{}", std::process::id());
            let rec = Record {
                version: 1,
                time: now,
                candidates: pending,
            };
            let bytes = serde_json::to_vec_pretty(&rec).expect("serializes");
            store.put(&key, Bytes::from(bytes)).await?;
            report.record = Some(key);
        }
        for (k, _) in &records {
            if Some(k) != report.record.as_ref() {
                store.delete(k).await?;
            }
        }
    }
    Ok(report)
}

/// A scratch directory for downloaded manifests, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> std::io::Result<Self> {
        let d = std::env::temp_dir().join(format!(
            "horcrux-gc-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&d)?;
        Ok(Self(d))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

//! Record-and-replay prefetch: which blocks a workload read in the first seconds after a mount
//! (a container's start, a database's recovery), stored with the volume, and fetched first, in
//! that order, by the next mount of the volume on any host.
//!
//! - **Record** ([`Recorder`]): [`Volume::read`] tells the recorder the (chunk, block) pairs of
//!   every base read that reaches the daemon during the window. Reads the kernel serves from
//!   its page cache, or from a passthrough backing file, never reach the daemon and are not
//!   recorded; overlay-written bytes need no fetch and are not recorded either. The hot path
//!   takes no lock: an atomic flag, a lock-free "seen" filter and a lock-free channel; the
//!   window and the entry bound ([`MAX_ENTRIES`]) switch it off.
//! - **Store** ([`ProfileStore`]): the profile is a content-addressed object
//!   `profiles/<blake3>` of the repository, pointed to by `volumes/<v>/profiles/<manifest id>`
//!   (FORMAT.md §2a). The first profile recorded for a version is kept (the pointer is created
//!   by compare-and-swap from "absent"); replacing it is explicit. A repository that refuses
//!   the write (read-only credentials) gets the same keys in a local store under the cache
//!   directory, and the failure is logged once.
//! - **Replay** ([`Replayer`]): the profile of the mounted version, else of its nearest
//!   ancestor (first parents, [`ANCESTORS`] generations), is mapped through chunk ids — a
//!   commit keeps the ids of unchanged chunks, so a later version replays the blocks it still
//!   shares — and fetched in recorded order by a few workers through [`Fetcher::hydrate`],
//!   which shares single flight and verification with readers but none of their permits;
//!   while a reader waits on the source all workers but one pause.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::fetch::{Fetcher, Hydrated};
use crate::format::{profile_key, profile_ref_key};
use crate::hashtree::block_count;
use crate::ids::{ChunkId, CommitId, ManifestId, ProfileId};
use crate::manifest::ChunkInfo;
use crate::repo::Repository;
use crate::store::{Store, StoreError};
use crate::volume::Volume;

/// First bytes of a profile object: name and format version 1.
pub const MAGIC: &[u8; 8] = b"HXPROF\0\x01";
/// Most (chunk, block) entries one profile holds (40 bytes each: 2.5 MiB).
pub const MAX_ENTRIES: usize = 65_536;
/// Largest JSON header accepted.
const MAX_HEADER: usize = 64 << 10;
/// Bytes of one entry: chunk id, block index, milliseconds since the mount.
const ENTRY_LEN: usize = 40;
/// Generations of first parents searched for a profile when the version has none.
pub const ANCESTORS: usize = 8;

/// Errors of reading, checking and storing profiles. None of them stops a mount: the daemon
/// logs it and goes on without a replay (or without storing the recording).
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(
        "profile {key} is corrupt ({what}); it is ignored — delete it (and its pointer under volumes/<v>/profiles/) so the next mount records a new one"
    )]
    Corrupt { key: String, what: String },
    #[error(
        "profile {key} does not belong to this volume ({what}); it is ignored — remove the pointer volumes/{volume}/profiles/{manifest} so the next mount records its own"
    )]
    Foreign {
        key: String,
        what: String,
        volume: String,
        manifest: String,
    },
    #[error("profile: {0}")]
    Store(#[from] StoreError),
    #[error("profile: {0}")]
    Repo(Box<crate::repo::RepoError>),
    #[error("profile: {0}")]
    Manifest(#[from] crate::manifest::ManifestError),
}

impl From<crate::repo::RepoError> for ProfileError {
    fn from(e: crate::repo::RepoError) -> Self {
        ProfileError::Repo(Box::new(e))
    }
}

/// What a profile says about itself (JSON after the magic; FORMAT.md §2a).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileHeader {
    /// Always `"horcrux-profile"`.
    pub format: String,
    pub version: u32,
    /// Volume the profile was recorded on.
    pub volume: String,
    /// Hex ids of the version it was recorded on.
    pub commit: String,
    pub manifest: String,
    /// Block size of the entries (the manifest's).
    pub block_size: u32,
    /// Length of the recording window in milliseconds.
    pub window_ms: u64,
    /// Unix time the recording ended.
    pub recorded: i64,
    /// Host name of the recording mount (for people).
    pub host: String,
    /// Number of entries that follow.
    pub entries: u32,
}

/// One first touch: block `block` of chunk `chunk`, `at_ms` after the mount went live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub chunk: ChunkId,
    pub block: u32,
    pub at_ms: u32,
}

/// A recorded start-up read pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub header: ProfileHeader,
    /// First touches in the order they happened, each (chunk, block) once.
    pub entries: Vec<Entry>,
}

impl Profile {
    /// The object's bytes and id: magic, u32 LE header length, header JSON, then the entries
    /// (32-byte chunk id, u32 LE block, u32 LE milliseconds).
    pub fn encode(&self) -> (ProfileId, Vec<u8>) {
        let mut h = self.header.clone();
        h.entries = self.entries.len() as u32;
        let json = serde_json::to_vec(&h).expect("a header serializes");
        let mut out = Vec::with_capacity(12 + json.len() + self.entries.len() * ENTRY_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        for e in &self.entries {
            out.extend_from_slice(&e.chunk.0);
            out.extend_from_slice(&e.block.to_le_bytes());
            out.extend_from_slice(&e.at_ms.to_le_bytes());
        }
        (ProfileId::of(&out), out)
    }

    /// Parse a profile object stored under `key`. Never panics on hostile input.
    pub fn decode(key: &str, b: &[u8]) -> Result<Profile, ProfileError> {
        let bad = |what: &str| ProfileError::Corrupt {
            key: key.to_string(),
            what: what.to_string(),
        };
        if b.len() < 12 || &b[..6] != b"HXPROF" {
            return Err(bad("not a horcrux profile"));
        }
        if &b[..8] != MAGIC {
            return Err(bad(&format!(
                "profile format version {} is not supported by this horcrux (supports 1)",
                b[7]
            )));
        }
        let hlen = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")) as usize;
        if hlen > MAX_HEADER || 12 + hlen > b.len() {
            return Err(bad("header length out of bounds"));
        }
        let header: ProfileHeader =
            serde_json::from_slice(&b[12..12 + hlen]).map_err(|e| bad(&format!("header: {e}")))?;
        if header.format != "horcrux-profile" || header.version != 1 {
            return Err(bad(&format!(
                "header names format `{}` version {}",
                header.format, header.version
            )));
        }
        let rest = &b[12 + hlen..];
        if rest.len() % ENTRY_LEN != 0
            || rest.len() / ENTRY_LEN != header.entries as usize
            || header.entries as usize > MAX_ENTRIES
        {
            return Err(bad(&format!(
                "{} bytes of entries for {} entries (at most {MAX_ENTRIES})",
                rest.len(),
                header.entries
            )));
        }
        let entries = rest
            .chunks_exact(ENTRY_LEN)
            .map(|e| Entry {
                chunk: ChunkId(e[..32].try_into().expect("32 bytes")),
                block: u32::from_le_bytes(e[32..36].try_into().expect("4 bytes")),
                at_ms: u32::from_le_bytes(e[36..40].try_into().expect("4 bytes")),
            })
            .collect();
        Ok(Profile { header, entries })
    }
}

// ---------------------------------------------------------------------------------------------
// Recording.

/// Bits of the recorder's "seen" filter (128 KiB). A (chunk, block) pair that collides with an
/// earlier one is not recorded: a missed prefetch, never a wrong read. At 4,096 distinct blocks
/// (4 GiB read at start-up) about 0.4 % collide.
const SEEN_BITS: usize = 1 << 20;

/// Records the first touches of base blocks during a window after the mount.
#[derive(Debug)]
pub struct Recorder {
    started: Instant,
    window: Duration,
    max_entries: usize,
    active: AtomicBool,
    count: AtomicUsize,
    seen: Box<[AtomicU64]>,
    tx: mpsc::Sender<Entry>,
    rx: Mutex<Option<mpsc::Receiver<Entry>>>,
}

impl Recorder {
    /// A recorder whose window starts now.
    pub fn new(window: Duration, max_entries: usize) -> Self {
        let (tx, rx) = mpsc::channel();
        Self {
            started: Instant::now(),
            window,
            max_entries: max_entries.min(MAX_ENTRIES),
            active: AtomicBool::new(!window.is_zero()),
            count: AtomicUsize::new(0),
            seen: (0..SEEN_BITS / 64).map(|_| AtomicU64::new(0)).collect(),
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Time since the window started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Is it still recording?
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// A read of `blocks` of chunk `chunk` reached the daemon. Called on the read path: no lock,
    /// one atomic load once the window is over.
    #[inline]
    pub fn touch(&self, chunk: &ChunkId, blocks: Range<u32>) {
        if !self.active.load(Ordering::Relaxed) {
            return;
        }
        let at = self.started.elapsed();
        if at > self.window {
            self.active.store(false, Ordering::Relaxed);
            return;
        }
        let seed = u64::from_le_bytes(chunk.0[..8].try_into().expect("8 bytes"));
        for block in blocks {
            // The chunk id is a uniform hash already: mix in the block and take the top bits.
            let h = (seed ^ (block as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
                .wrapping_mul(0xff51_afd7_ed55_8ccd);
            let bit = (h >> 44) as usize % SEEN_BITS;
            let mask = 1u64 << (bit % 64);
            if self.seen[bit / 64].fetch_or(mask, Ordering::Relaxed) & mask != 0 {
                continue;
            }
            if self.count.fetch_add(1, Ordering::Relaxed) >= self.max_entries {
                self.active.store(false, Ordering::Relaxed);
                return;
            }
            let _ = self.tx.send(Entry {
                chunk: *chunk,
                block,
                at_ms: at.as_millis().min(u32::MAX as u128) as u32,
            });
        }
    }

    /// Stop recording and take what was recorded, in order, each pair once. Returns `None`
    /// if it was taken before (the window's end and the unmount both ask).
    pub fn finish(&self) -> Option<Vec<Entry>> {
        self.active.store(false, Ordering::Relaxed);
        let rx = self.rx.lock().take()?;
        let mut seen = HashSet::new();
        Some(
            rx.try_iter()
                .filter(|e| seen.insert((e.chunk, e.block)))
                .collect(),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Storing and finding.

/// Where a profile went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Into the repository (every host sees it).
    Repository,
    /// Into the local store of the cache directory: the repository refused the write.
    Local,
    /// Nowhere: the version has a profile already (the first recorded is kept).
    KeptExisting,
}

/// Where profiles are read and written: the repository, and a local fallback store (a
/// directory under the cache) with the same keys.
#[derive(Debug, Clone)]
pub struct ProfileStore {
    pub repo: Arc<dyn Store>,
    pub local: Arc<dyn Store>,
}

/// A profile found for a mount, and where.
#[derive(Debug, Clone)]
pub struct Found {
    pub profile: Profile,
    pub id: ProfileId,
    /// The manifest (hex) it was found under: the mounted one, or an ancestor's.
    pub manifest: String,
    /// Generations between the mounted version and the recorded one (0 = the same).
    pub generations: usize,
    /// `repository` or `local cache`.
    pub place: &'static str,
}

impl ProfileStore {
    /// Store `profile` for its volume and manifest. The profile object is written first, then
    /// the pointer: created if absent; if present, replaced only with `replace`. A repository
    /// that cannot be written makes it go to the local store instead (logged once: each mount
    /// saves once).
    pub async fn save(&self, profile: &Profile, replace: bool) -> Result<Stored, ProfileError> {
        match save_to(&*self.repo, profile, replace).await {
            Ok(true) => Ok(Stored::Repository),
            Ok(false) => Ok(Stored::KeptExisting),
            Err(e) => {
                tracing::warn!(store = %self.repo.describe(), error = %e, "the repository refused the start-up profile: keeping it in the local cache instead (other hosts will not replay it)");
                match save_to(&*self.local, profile, replace).await? {
                    true => Ok(Stored::Local),
                    false => Ok(Stored::KeptExisting),
                }
            }
        }
    }

    /// Does the version with manifest `manifest` have a profile (repository or local)?
    pub async fn has(&self, volume: &str, manifest: &ManifestId) -> bool {
        let key = profile_ref_key(volume, manifest);
        for s in [&self.repo, &self.local] {
            if let Ok(v) = s.exists(std::slice::from_ref(&key)).await
                && v.first() == Some(&true)
            {
                return true;
            }
        }
        false
    }

    /// The profile to replay for `commit` of `volume` (whose manifest is `manifest`): its own,
    /// else the nearest first-parent ancestor's within [`ANCESTORS`] generations. A corrupt
    /// or foreign profile is an error (the caller logs it and replays nothing): it is not
    /// skipped for an older one, so the problem is seen.
    pub async fn find(
        &self,
        repo: &Repository,
        volume: &str,
        commit: CommitId,
        manifest: ManifestId,
        block_size: u32,
    ) -> Result<Option<Found>, ProfileError> {
        let mut commit = commit;
        let mut manifest = Some(manifest);
        // The object of `commit`, once read.
        let mut current: Option<crate::commit::Commit> = None;
        for generations in 0..=ANCESTORS {
            if let Some(m) = manifest {
                for (store, place) in [(&self.repo, "repository"), (&self.local, "local cache")] {
                    if let Some((id, profile)) = load(&**store, volume, &m, block_size).await? {
                        return Ok(Some(Found {
                            profile,
                            id,
                            manifest: m.to_hex(),
                            generations,
                            place,
                        }));
                    }
                }
            }
            // One generation up, by the first parent (a shallow history just ends).
            let obj = match current.take() {
                Some(o) => o,
                None => match repo.commit(commit).await {
                    Ok(o) => o,
                    Err(_) => break,
                },
            };
            let Some(p) = obj.parents.first().and_then(|p| p.parse::<CommitId>().ok()) else {
                break;
            };
            let Ok(parent) = repo.commit(p).await else {
                break;
            };
            commit = p;
            manifest = parent.manifest_id();
            current = Some(parent);
        }
        Ok(None)
    }
}

/// Put `profile` into `store`: `Ok(false)` if the version's pointer exists and is kept.
async fn save_to(store: &dyn Store, profile: &Profile, replace: bool) -> Result<bool, StoreError> {
    let (id, bytes) = profile.encode();
    let manifest: ManifestId = profile
        .header
        .manifest
        .parse()
        .map_err(|_| StoreError::Other {
            store: store.describe(),
            message: "the profile names no manifest".into(),
        })?;
    let ptr = profile_ref_key(&profile.header.volume, &manifest);
    let old = match store.get(&ptr).await {
        Ok(b) => Some(b),
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(e),
    };
    if old.is_some() && !replace {
        return Ok(false);
    }
    store.put(&profile_key(&id), Bytes::from(bytes)).await?;
    let new = Bytes::from(format!("{}\n", id.to_hex()));
    match store.compare_and_swap(&ptr, old.as_deref(), new).await {
        Ok(()) => Ok(true),
        // Another host recorded this version at the same moment: theirs stays.
        Err(StoreError::CasConflict { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The profile of `manifest` in `store`, checked: its id, its format, its volume and block
/// size.
async fn load(
    store: &dyn Store,
    volume: &str,
    manifest: &ManifestId,
    block_size: u32,
) -> Result<Option<(ProfileId, Profile)>, ProfileError> {
    let ptr = profile_ref_key(volume, manifest);
    let text = match store.get(&ptr).await {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let id: ProfileId = std::str::from_utf8(&text)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| ProfileError::Corrupt {
            key: format!("{} {ptr}", store.describe()),
            what: "the pointer does not hold a profile id".into(),
        })?;
    let key = profile_key(&id);
    let where_ = format!("{} {key}", store.describe());
    let bytes = store.get(&key).await?;
    if ProfileId::of(&bytes) != id {
        return Err(ProfileError::Corrupt {
            key: where_,
            what: "its content does not match its id".into(),
        });
    }
    let p = Profile::decode(&where_, &bytes)?;
    let foreign = |what: String| ProfileError::Foreign {
        key: where_.clone(),
        what,
        volume: volume.to_string(),
        manifest: manifest.to_hex(),
    };
    if p.header.volume != volume {
        return Err(foreign(format!(
            "it was recorded on volume `{}`",
            p.header.volume
        )));
    }
    if p.header.manifest != manifest.to_hex() {
        return Err(foreign(format!(
            "it was recorded on manifest {}",
            p.header.manifest
        )));
    }
    if p.header.block_size != block_size {
        return Err(foreign(format!(
            "its block size is {} (this version's is {block_size})",
            p.header.block_size
        )));
    }
    Ok(Some((id, p)))
}

// ---------------------------------------------------------------------------------------------
// Replay.

/// Limits of a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayConfig {
    /// Blocks fetched at once.
    pub concurrency: usize,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self { concurrency: 4 }
    }
}

/// Counters of a replay (for logs and status).
#[derive(Debug, Default)]
pub struct ReplayProgress {
    /// Entries of the profile, and those that map to a chunk of the mounted version.
    pub entries: AtomicU64,
    pub mapped: AtomicU64,
    /// Blocks done: already cached, fetched by the replay, or fetched by a reader meanwhile.
    pub present: AtomicU64,
    pub fetched: AtomicU64,
    pub fetched_bytes: AtomicU64,
    pub shared: AtomicU64,
    pub failed: AtomicU64,
    pub done: AtomicBool,
}

/// Replays one profile on one mounted volume.
#[derive(Debug)]
pub struct Replayer {
    pub progress: Arc<ReplayProgress>,
    cancel: Arc<AtomicBool>,
}

impl Replayer {
    /// Start fetching `profile`'s blocks that the mounted version shares, in recorded order,
    /// on the volume's runtime (call from a runtime thread or with it entered).
    pub fn start(volume: Arc<Volume>, profile: Profile, config: ReplayConfig) -> Replayer {
        let progress = Arc::new(ReplayProgress::default());
        let cancel = Arc::new(AtomicBool::new(false));
        let (p, c) = (progress.clone(), cancel.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let v = volume.clone();
            let entries = profile.entries;
            p.entries.store(entries.len() as u64, Ordering::Relaxed);
            let mapped = tokio::task::spawn_blocking(move || map_entries(&v, &entries)).await;
            let queue = match mapped {
                Ok(Ok(q)) => q,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "replay: the profile could not be mapped onto this version; nothing replayed");
                    p.done.store(true, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "replay: mapping task failed");
                    p.done.store(true, Ordering::Relaxed);
                    return;
                }
            };
            p.mapped.store(queue.len() as u64, Ordering::Relaxed);
            let total = p.entries.load(Ordering::Relaxed);
            if queue.is_empty() {
                tracing::warn!(
                    entries = total,
                    "replay: no block of the profile belongs to this version; nothing replayed"
                );
                p.done.store(true, Ordering::Relaxed);
                return;
            }
            tracing::info!(
                entries = total,
                blocks = queue.len(),
                concurrency = config.concurrency,
                "replay: prefetching the start-up profile"
            );
            run_queue(volume.fetcher().clone(), queue, config, p.clone(), c).await;
            p.done.store(true, Ordering::Relaxed);
            tracing::info!(
                blocks = p.mapped.load(Ordering::Relaxed),
                fetched = p.fetched.load(Ordering::Relaxed),
                bytes = p.fetched_bytes.load(Ordering::Relaxed),
                already_present = p.present.load(Ordering::Relaxed)
                    - p.fetched.load(Ordering::Relaxed)
                    - p.shared.load(Ordering::Relaxed),
                shared_with_readers = p.shared.load(Ordering::Relaxed),
                failed = p.failed.load(Ordering::Relaxed),
                secs = started.elapsed().as_secs_f64(),
                "replay done"
            );
        });
        Replayer { progress, cancel }
    }

    /// Stop fetching (blocks in flight finish).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Drop for Replayer {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// The profile's entries as blocks of the mounted version's chunks, in order; entries whose
/// chunk the version does not hold (changed data, or a foreign chunk) are dropped.
fn map_entries(
    volume: &Volume,
    entries: &[Entry],
) -> Result<Vec<(Arc<ChunkInfo>, u32)>, crate::volume::VolumeError> {
    let m = volume.manifest();
    let bs = m.header().block_size;
    let wanted: HashSet<ChunkId> = entries.iter().map(|e| e.chunk).collect();
    let idx: HashMap<ChunkId, u64> = m
        .chunk_ids()?
        .into_iter()
        .filter(|(_, id)| wanted.contains(id))
        .map(|(i, id)| (id, i))
        .collect();
    let mut infos: HashMap<ChunkId, Arc<ChunkInfo>> = HashMap::new();
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let Some(&i) = idx.get(&e.chunk) else {
            continue;
        };
        let info = match infos.get(&e.chunk) {
            Some(c) => c.clone(),
            None => {
                // Verified against its id, as every read's chunk is.
                let c = volume.chunk_info_by_idx(i)?;
                infos.insert(e.chunk, c.clone());
                c
            }
        };
        if e.block < block_count(info.len, bs) {
            out.push((info, e.block));
        }
    }
    Ok(out)
}

async fn run_queue(
    fetcher: Arc<Fetcher>,
    queue: Vec<(Arc<ChunkInfo>, u32)>,
    config: ReplayConfig,
    p: Arc<ReplayProgress>,
    cancel: Arc<AtomicBool>,
) {
    let queue = Arc::new(Mutex::new(queue.into_iter().enumerate()));
    let mut workers = Vec::new();
    for w in 0..config.concurrency.max(1) {
        let (queue, fetcher, p, cancel) =
            (queue.clone(), fetcher.clone(), p.clone(), cancel.clone());
        workers.push(tokio::spawn(async move {
            loop {
                if cancel.load(Ordering::Relaxed) {
                    return;
                }
                // Readers first: while one waits on the source, only worker 0 goes on.
                if w > 0 && fetcher.foreground_busy() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                // Taken in recorded order (workers overlap only within `concurrency`).
                let Some((seq, (info, b))) = queue.lock().next() else {
                    return;
                };
                tracing::debug!(seq, chunk = %info.id, block = b, "replay: block");
                match fetcher.hydrate(&info, b).await {
                    Ok(h) => {
                        match h {
                            Hydrated::Fetched(n) => {
                                p.fetched.fetch_add(1, Ordering::Relaxed);
                                p.fetched_bytes.fetch_add(n, Ordering::Relaxed);
                            }
                            Hydrated::Shared => {
                                p.shared.fetch_add(1, Ordering::Relaxed);
                            }
                            Hydrated::Present => {}
                        }
                        p.present.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        p.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(chunk = %info.id, block = b, error = %e, "replay: block not fetched");
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Profile {
        Profile {
            header: ProfileHeader {
                format: "horcrux-profile".into(),
                version: 1,
                volume: "v".into(),
                commit: "00".repeat(32),
                manifest: "11".repeat(32),
                block_size: 1 << 20,
                window_ms: 30_000,
                recorded: 1,
                host: "h".into(),
                entries: 0,
            },
            entries: vec![
                Entry {
                    chunk: ChunkId([7; 32]),
                    block: 3,
                    at_ms: 10,
                },
                Entry {
                    chunk: ChunkId([8; 32]),
                    block: 0,
                    at_ms: 12,
                },
            ],
        }
    }

    #[test]
    fn profiles_round_trip_and_refuse_damage() {
        let p = sample();
        let (id, b) = p.encode();
        assert_eq!(id, ProfileId::of(&b));
        let q = Profile::decode("k", &b).unwrap();
        assert_eq!(q.entries, p.entries);
        assert_eq!(q.header.entries, 2);
        // Truncated, extended, wrong magic, wrong version: refused, never a panic.
        for bad in [
            b[..b.len() - 1].to_vec(),
            [&b[..], &[0u8; 40]].concat(),
            b"HXPROF\0\x02rest".to_vec(),
            b"nonsense".to_vec(),
            Vec::new(),
        ] {
            assert!(matches!(
                Profile::decode("k", &bad),
                Err(ProfileError::Corrupt { .. })
            ));
        }
        for cut in 0..b.len() {
            let _ = Profile::decode("k", &b[..cut]);
        }
    }

    #[test]
    fn the_recorder_keeps_first_touches_in_order_within_its_bounds() {
        let r = Recorder::new(Duration::from_secs(60), 3);
        let (a, b) = (ChunkId([1; 32]), ChunkId([2; 32]));
        r.touch(&a, 0..2);
        r.touch(&a, 1..2);
        r.touch(&b, 5..6);
        r.touch(&a, 0..1);
        r.touch(&b, 6..7); // the fourth distinct block: over the bound
        let e = r.finish().unwrap();
        let got: Vec<_> = e.iter().map(|e| (e.chunk, e.block)).collect();
        assert_eq!(got, vec![(a, 0), (a, 1), (b, 5)]);
        assert!(!r.active());
        assert!(r.finish().is_none(), "taken once");
        let off = Recorder::new(Duration::ZERO, 10);
        off.touch(&a, 0..1);
        assert!(off.finish().unwrap().is_empty());
    }

    /// A store that refuses writes (read-only credentials) makes the profile go local.
    #[derive(Debug)]
    struct ReadOnly(crate::store::FileStore);

    #[async_trait::async_trait]
    impl Store for ReadOnly {
        fn describe(&self) -> String {
            "read-only".into()
        }
        async fn get_range(&self, key: &str, r: Range<u64>) -> Result<Bytes, StoreError> {
            self.0.get_range(key, r).await
        }
        async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
            self.0.get(key).await
        }
        async fn put(&self, key: &str, _: Bytes) -> Result<(), StoreError> {
            Err(StoreError::Other {
                store: self.describe(),
                message: format!("AccessDenied writing {key}"),
            })
        }
        async fn exists(&self, keys: &[String]) -> Result<Vec<bool>, StoreError> {
            self.0.exists(keys).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
            self.0.list(prefix).await
        }
        async fn compare_and_swap(
            &self,
            key: &str,
            _: Option<&[u8]>,
            _: Bytes,
        ) -> Result<(), StoreError> {
            Err(StoreError::Other {
                store: self.describe(),
                message: format!("AccessDenied writing {key}"),
            })
        }
    }

    #[tokio::test]
    async fn first_profile_kept_replace_explicit_and_read_only_goes_local() {
        let d = tempfile::tempdir().unwrap();
        let repo = Arc::new(crate::store::FileStore::new(d.path().join("repo")));
        let local = Arc::new(crate::store::FileStore::new(d.path().join("local")));
        let ps = ProfileStore {
            repo: repo.clone(),
            local: local.clone(),
        };
        let p = sample();
        let m: ManifestId = p.header.manifest.parse().unwrap();
        assert_eq!(ps.save(&p, false).await.unwrap(), Stored::Repository);
        let mut p2 = p.clone();
        p2.entries.truncate(1);
        assert_eq!(ps.save(&p2, false).await.unwrap(), Stored::KeptExisting);
        let (_, got) = load(&*repo, "v", &m, 1 << 20).await.unwrap().unwrap();
        assert_eq!(got.entries.len(), 2, "the first profile is kept");
        assert_eq!(ps.save(&p2, true).await.unwrap(), Stored::Repository);
        let (_, got) = load(&*repo, "v", &m, 1 << 20).await.unwrap().unwrap();
        assert_eq!(got.entries.len(), 1, "replaced on request");
        // Another volume's pointer naming it, or another block size: foreign.
        assert!(matches!(
            load(&*repo, "v", &m, 4096).await,
            Err(ProfileError::Foreign { .. })
        ));
        let ro = ProfileStore {
            repo: Arc::new(ReadOnly(crate::store::FileStore::new(d.path().join("ro")))),
            local: local.clone(),
        };
        assert_eq!(ro.save(&p, false).await.unwrap(), Stored::Local);
        assert!(ro.has("v", &m).await);
        assert!(load(&*local, "v", &m, 1 << 20).await.unwrap().is_some());
    }
}

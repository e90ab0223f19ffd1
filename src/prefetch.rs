//! Prefetch: hydrating a mounted volume (or chosen paths of it) in the background, so that it
//! needs no source afterwards — a lazy migration while the volume is in use.
//!
//! One [`Prefetcher`] per mounted volume runs at most one job at a time on the volume's
//! runtime:
//!
//! 1. **Plan** (blocking pool): the blocks of base chunks the scope reads — every block of the
//!    base version for [`Scope::All`], the base ranges of the files at or under each path for
//!    [`Scope::Paths`] (overlay-written ranges need nothing). The plan's chunks and the base
//!    manifest are then **pinned for the volume** in the cache index before anything is
//!    fetched, so eviction can never drop what the job (or an earlier run) hydrated.
//! 2. **Fetch**: blocks not already in the cache go through [`Fetcher::hydrate`] (verified,
//!    single flight with readers, durable before it returns) from `concurrency` workers, paced
//!    by a token bucket of `bandwidth` bytes per second. Readers come first: while a reader
//!    waits on the source, all workers but one pause, and the fetcher's foreground budget is
//!    never used by a job.
//!
//! The request is recorded in the cache index (`prefetch_jobs`, state `active`) before the job
//! starts and marked `done` at the end, so a mount daemon that restarts resumes it
//! ([`Prefetcher::resume`]); blocks already cached are never fetched again. The record also
//! names the commit and manifest, which lets a mount fall back to them when the source is gone.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use crate::cache::{Cache, CacheError, PrefetchRecord};
use crate::fetch::{FetchError, Hydrated};
use crate::hashtree::block_range;
use crate::ids::ManifestId;
use crate::manifest::ChunkInfo;
use crate::volume::{BlockPlan, Volume, VolumeError};

/// Errors of starting a prefetch (failures of single blocks are in [`Progress`]).
#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    #[error("prefetch: {0}")]
    Volume(#[from] VolumeError),
    #[error("prefetch: {0}")]
    Cache(#[from] CacheError),
    #[error("prefetch: the recorded request of {owner} cannot be read ({what}); start a new one")]
    BadRecord { owner: String, what: String },
    #[error("prefetch: the base manifest {0} is not a file of the cache")]
    NoManifestId(String),
}

/// What to hydrate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// The whole base version.
    All,
    /// These paths (relative to the volume root, `/`-separated bytes), recursively.
    Paths(Vec<Vec<u8>>),
}

impl Scope {
    /// Both scopes: what either asks for.
    pub fn union(self, other: Scope) -> Scope {
        match (self, other) {
            (Scope::All, _) | (_, Scope::All) => Scope::All,
            (Scope::Paths(mut a), Scope::Paths(b)) => {
                for p in b {
                    if !a.contains(&p) {
                        a.push(p);
                    }
                }
                Scope::Paths(a)
            }
        }
    }

    /// For people: `everything` or the paths.
    pub fn describe(&self) -> String {
        match self {
            Scope::All => "everything".into(),
            Scope::Paths(p) => p
                .iter()
                .map(|p| {
                    if p.is_empty() {
                        "/".to_string()
                    } else {
                        String::from_utf8_lossy(p).into_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    fn encode(&self) -> String {
        serde_json::to_string(self).expect("a scope serializes")
    }
}

/// Limits of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefetchConfig {
    /// Bytes per second fetched by the job; `None` = unbounded.
    pub bandwidth: Option<u64>,
    /// Blocks fetched at once.
    pub concurrency: usize,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        Self {
            bandwidth: None,
            concurrency: 4,
        }
    }
}

/// Where a job is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Working out which blocks the scope needs.
    Planning,
    Running,
    /// Every planned block is in the cache (and pinned).
    Done,
    Cancelled,
    /// The job ended with blocks it could not fetch (the message says how many and why). The
    /// request stays recorded: the next mount of the volume tries again.
    Failed(String),
}

impl JobState {
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Planning => "planning",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Cancelled => "cancelled",
            JobState::Failed(_) => "failed",
        }
    }

    pub fn finished(&self) -> bool {
        !matches!(self, JobState::Planning | JobState::Running)
    }
}

/// A snapshot of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub state: JobState,
    pub scope: Scope,
    pub config: PrefetchConfig,
    /// Bytes of the planned blocks, and of those in the cache now.
    pub total_bytes: u64,
    pub present_bytes: u64,
    pub total_blocks: u64,
    pub present_blocks: u64,
    /// Bytes this job fetched from the source (the rest were cached already or were fetched
    /// by readers meanwhile).
    pub fetched_bytes: u64,
    pub failed_blocks: u64,
    pub elapsed: Duration,
    /// Hex id of the commit the job hydrates.
    pub commit: String,
}

/// Counters and state of a running job, shared with its workers.
#[derive(Debug)]
struct Shared {
    scope: Scope,
    config: PrefetchConfig,
    commit: String,
    state: Mutex<JobState>,
    cancel: AtomicBool,
    total_bytes: AtomicU64,
    present_bytes: AtomicU64,
    total_blocks: AtomicU64,
    present_blocks: AtomicU64,
    fetched_bytes: AtomicU64,
    failed_blocks: AtomicU64,
    first_error: Mutex<Option<FetchError>>,
    started: Instant,
    ended: Mutex<Option<Instant>>,
}

impl Shared {
    fn progress(&self) -> Progress {
        let end = self.ended.lock().unwrap_or_else(Instant::now);
        Progress {
            state: self.state.lock().clone(),
            scope: self.scope.clone(),
            config: self.config,
            total_bytes: self.total_bytes.load(Ordering::Relaxed),
            present_bytes: self.present_bytes.load(Ordering::Relaxed),
            total_blocks: self.total_blocks.load(Ordering::Relaxed),
            present_blocks: self.present_blocks.load(Ordering::Relaxed),
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
            failed_blocks: self.failed_blocks.load(Ordering::Relaxed),
            elapsed: end.duration_since(self.started),
            commit: self.commit.clone(),
        }
    }

    fn finish(&self, state: JobState) {
        *self.ended.lock() = Some(Instant::now());
        *self.state.lock() = state;
    }
}

/// Runs the prefetch jobs of one mounted volume.
#[derive(Debug)]
pub struct Prefetcher {
    volume: Arc<Volume>,
    cache: Arc<Cache>,
    runtime: Handle,
    /// Pin and record owner (`cache::volume_owner`).
    owner: String,
    volume_name: String,
    access: String,
    job: Mutex<Option<Arc<Shared>>>,
}

impl Prefetcher {
    pub fn new(
        volume: Arc<Volume>,
        cache: Arc<Cache>,
        runtime: Handle,
        volume_name: &str,
        access: &str,
    ) -> Self {
        Self {
            owner: crate::cache::volume_owner(volume_name, access),
            volume,
            cache,
            runtime,
            volume_name: volume_name.to_string(),
            access: access.to_string(),
            job: Mutex::new(None),
        }
    }

    /// The owner name of this volume's pins.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Start hydrating `scope` of the volume at `commit` (hex). A job already running is
    /// replaced; the recorded request becomes the union of the earlier one (unless it was
    /// cancelled) and this one, so what was promised before — an unfinished request, or a
    /// finished one re-checked at each mount — is kept.
    pub fn start(
        &self,
        scope: Scope,
        config: PrefetchConfig,
        commit: &str,
    ) -> Result<Progress, PrefetchError> {
        let mut scope = scope;
        if let Some(old) = self.cache.prefetch_record(&self.owner)?
            && old.state != "cancelled"
            && let Ok(s) = serde_json::from_str::<Scope>(&old.scope)
        {
            scope = s.union(scope);
        }
        if let Some(old) = self.job.lock().take() {
            old.cancel.store(true, Ordering::Relaxed);
        }
        self.record(&scope, config, commit, "active")?;
        Ok(self.spawn(scope, config, commit))
    }

    /// Resume this volume's recorded request, if there is one and it was not cancelled (a
    /// finished one is run again too: it fetches only what is missing, e.g. the new base's
    /// blocks after a commit, and reports `done` at once otherwise).
    pub fn resume(&self, commit: &str) -> Result<Option<Progress>, PrefetchError> {
        let Some(rec) = self.cache.prefetch_record(&self.owner)? else {
            return Ok(None);
        };
        if rec.state == "cancelled" {
            return Ok(None);
        }
        let scope: Scope =
            serde_json::from_str(&rec.scope).map_err(|e| PrefetchError::BadRecord {
                owner: self.owner.clone(),
                what: e.to_string(),
            })?;
        let config = PrefetchConfig {
            bandwidth: rec.bandwidth,
            concurrency: (rec.concurrency as usize).max(1),
        };
        tracing::info!(owner = %self.owner, scope = %scope.describe(), state = %rec.state, "resuming the recorded prefetch");
        self.record(&scope, config, commit, "active")?;
        Ok(Some(self.spawn(scope, config, commit)))
    }

    /// The current (or last) job of this daemon.
    pub fn status(&self) -> Option<Progress> {
        self.job.lock().as_ref().map(|j| j.progress())
    }

    /// Stop the job and mark the request cancelled (it is not resumed). Pins stay until
    /// `horcrux cache unpin`.
    pub fn cancel(&self) -> Result<Option<Progress>, PrefetchError> {
        let job = self.job.lock().clone();
        if let Some(j) = &job {
            j.cancel.store(true, Ordering::Relaxed);
            if !j.state.lock().finished() {
                j.finish(JobState::Cancelled);
            }
        }
        if self.cache.prefetch_record(&self.owner)?.is_some() {
            self.cache.set_prefetch_state(&self.owner, "cancelled")?;
        }
        Ok(job.map(|j| j.progress()))
    }

    fn record(
        &self,
        scope: &Scope,
        config: PrefetchConfig,
        commit: &str,
        state: &str,
    ) -> Result<(), PrefetchError> {
        let manifest = self.manifest_id()?;
        self.cache.save_prefetch(&PrefetchRecord {
            owner: self.owner.clone(),
            volume: self.volume_name.clone(),
            access: self.access.clone(),
            commit: commit.to_string(),
            manifest,
            scope: scope.encode(),
            bandwidth: config.bandwidth,
            concurrency: config.concurrency as u32,
            state: state.to_string(),
            updated: 0,
        })?;
        Ok(())
    }

    /// The id of the base manifest: its file in the cache is named by it.
    fn manifest_id(&self) -> Result<ManifestId, PrefetchError> {
        let m = self.volume.manifest();
        let p = m.path();
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .filter(|id| self.cache.manifest_path(id) == p)
            .ok_or_else(|| PrefetchError::NoManifestId(p.display().to_string()))
    }

    fn spawn(&self, scope: Scope, config: PrefetchConfig, commit: &str) -> Progress {
        let shared = Arc::new(Shared {
            scope,
            config,
            commit: commit.to_string(),
            state: Mutex::new(JobState::Planning),
            cancel: AtomicBool::new(false),
            total_bytes: AtomicU64::new(0),
            present_bytes: AtomicU64::new(0),
            total_blocks: AtomicU64::new(0),
            present_blocks: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
            failed_blocks: AtomicU64::new(0),
            first_error: Mutex::new(None),
            started: Instant::now(),
            ended: Mutex::new(None),
        });
        *self.job.lock() = Some(shared.clone());
        let job = Job {
            volume: self.volume.clone(),
            cache: self.cache.clone(),
            owner: self.owner.clone(),
            manifest: self.manifest_id().ok(),
            shared: shared.clone(),
        };
        self.runtime.spawn(job.run());
        shared.progress()
    }
}

/// One run of a request.
struct Job {
    volume: Arc<Volume>,
    cache: Arc<Cache>,
    owner: String,
    manifest: Option<ManifestId>,
    shared: Arc<Shared>,
}

type Queue = Mutex<VecDeque<(Arc<ChunkInfo>, u32)>>;

impl Job {
    async fn run(self) {
        let sh = self.shared.clone();
        let result = self.run_inner().await;
        if sh.state.lock().finished() {
            // Cancelled meanwhile (and already marked so).
            return;
        }
        let state = match result {
            Err(e) => {
                tracing::error!(error = %e, "prefetch failed");
                JobState::Failed(e.to_string())
            }
            Ok(()) if sh.cancel.load(Ordering::Relaxed) => JobState::Cancelled,
            Ok(()) => match sh.failed_blocks.load(Ordering::Relaxed) {
                0 => JobState::Done,
                n => JobState::Failed(format!(
                    "{n} blocks could not be fetched (first: {}); the next mount tries again",
                    sh.first_error
                        .lock()
                        .as_ref()
                        .map(|e| e.to_string())
                        .unwrap_or_default()
                )),
            },
        };
        let p = sh.progress();
        if state == JobState::Done {
            tracing::info!(owner = %self.owner, bytes = p.total_bytes, fetched = p.fetched_bytes, secs = p.elapsed.as_secs_f64(), "prefetch done");
            if let Err(e) = self.cache.set_prefetch_state(&self.owner, "done") {
                tracing::warn!(error = %e, "could not record the prefetch as done");
            }
        }
        sh.finish(state);
    }

    async fn run_inner(&self) -> Result<(), PrefetchError> {
        let sh = self.shared.clone();
        // Plan, pin and find what is missing: SQLite work, on the blocking pool.
        let volume = self.volume.clone();
        let cache = self.cache.clone();
        let owner = self.owner.clone();
        let manifest = self.manifest;
        let sh2 = sh.clone();
        let queue: Queue = tokio::task::spawn_blocking(move || -> Result<_, PrefetchError> {
            let plan = match &sh2.scope {
                Scope::All => volume.plan_all()?,
                Scope::Paths(paths) => {
                    let mut plan = BlockPlan::default();
                    for p in paths {
                        volume.plan_path(p, &mut plan)?;
                    }
                    plan
                }
            };
            let ids: Vec<_> = plan.chunks.iter().map(|(c, _)| c.id).collect();
            cache.pin_for_owner(&owner, &ids, manifest.as_ref())?;
            let bs = volume.fetcher().block_size();
            let mut queue = VecDeque::new();
            for (info, wanted) in plan.chunks {
                let present = cache.present(&info, bs);
                for b in 0..wanted.len() {
                    if !wanted.get(b) {
                        continue;
                    }
                    let r = block_range(info.len, bs, b);
                    sh2.total_blocks.fetch_add(1, Ordering::Relaxed);
                    sh2.total_bytes
                        .fetch_add(r.end - r.start, Ordering::Relaxed);
                    if present.get(b) {
                        sh2.present_blocks.fetch_add(1, Ordering::Relaxed);
                        sh2.present_bytes
                            .fetch_add(r.end - r.start, Ordering::Relaxed);
                    } else {
                        queue.push_back((info.clone(), b));
                    }
                }
            }
            Ok(Mutex::new(queue))
        })
        .await
        .expect("planning task panicked")?;
        {
            let mut st = sh.state.lock();
            if st.finished() {
                return Ok(());
            }
            *st = JobState::Running;
        }
        tracing::info!(
            owner = %self.owner,
            scope = %sh.scope.describe(),
            blocks = sh.total_blocks.load(Ordering::Relaxed),
            missing = queue.lock().len(),
            bandwidth = ?sh.config.bandwidth,
            concurrency = sh.config.concurrency,
            "prefetch running"
        );
        let queue = Arc::new(queue);
        let bucket = Arc::new(
            sh.config
                .bandwidth
                .map(|r| TokenBucket::new(r, self.volume.fetcher().block_size() as u64)),
        );
        let mut workers = Vec::new();
        for w in 0..sh.config.concurrency.max(1) {
            let queue = queue.clone();
            let bucket = bucket.clone();
            let sh = sh.clone();
            let fetcher = self.volume.fetcher().clone();
            workers.push(tokio::spawn(async move {
                loop {
                    if sh.cancel.load(Ordering::Relaxed) {
                        return;
                    }
                    // Readers first: while one waits on the source, only worker 0 goes on
                    // (so the job still moves under constant foreground load).
                    if w > 0 && fetcher.foreground_busy() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    let Some((info, b)) = queue.lock().pop_front() else {
                        return;
                    };
                    let r = block_range(info.len, fetcher.block_size(), b);
                    let len = r.end - r.start;
                    if let Some(bucket) = bucket.as_ref() {
                        bucket.take(len).await;
                    }
                    match fetcher.hydrate(&info, b).await {
                        Ok(h) => {
                            if let Hydrated::Fetched(n) = h {
                                sh.fetched_bytes.fetch_add(n, Ordering::Relaxed);
                            }
                            sh.present_blocks.fetch_add(1, Ordering::Relaxed);
                            sh.present_bytes.fetch_add(len, Ordering::Relaxed);
                        }
                        Err(e) => {
                            tracing::warn!(chunk = %info.id, block = b, error = %e, "prefetch: block not fetched");
                            sh.failed_blocks.fetch_add(1, Ordering::Relaxed);
                            sh.first_error.lock().get_or_insert(e);
                        }
                    }
                }
            }));
        }
        for w in workers {
            let _ = w.await;
        }
        Ok(())
    }
}

/// Paces bytes to `rate` per second with bursts of at most `burst` bytes. Tokens may go
/// negative: a taker of more than is available waits (holding the bucket, so takers are
/// served in turn) until the debt is paid.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    state: tokio::sync::Mutex<(f64, Instant)>,
}

impl TokenBucket {
    fn new(rate: u64, burst: u64) -> Self {
        let rate = rate.max(1) as f64;
        let burst = (burst as f64).min(rate).max(1.0);
        Self {
            rate,
            burst,
            state: tokio::sync::Mutex::new((burst, Instant::now())),
        }
    }

    async fn take(&self, n: u64) {
        let mut st = self.state.lock().await;
        let now = Instant::now();
        st.0 = (st.0 + now.duration_since(st.1).as_secs_f64() * self.rate).min(self.burst);
        st.1 = now;
        st.0 -= n as f64;
        if st.0 < 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(-st.0 / self.rate)).await;
            // Credit the time actually slept (timers overshoot by a millisecond or so, which
            // at a few ms per block would otherwise cost a good part of the rate).
            let now = Instant::now();
            st.0 = (st.0 + now.duration_since(st.1).as_secs_f64() * self.rate).min(self.burst);
            st.1 = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_bucket_paces_to_its_rate() {
        let b = TokenBucket::new(1 << 20, 64 << 10);
        let t = Instant::now();
        for _ in 0..8 {
            b.take(64 << 10).await;
        }
        // 512 KiB at 1 MiB/s, less the first burst of 64 KiB: ~0.44 s.
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(400), "{e:?}");
        assert!(e < Duration::from_millis(1500), "{e:?}");
    }

    #[test]
    fn scopes_merge() {
        let a = Scope::Paths(vec![b"a".to_vec()]);
        let b = Scope::Paths(vec![b"b".to_vec(), b"a".to_vec()]);
        assert_eq!(
            a.clone().union(b),
            Scope::Paths(vec![b"a".to_vec(), b"b".to_vec()])
        );
        assert_eq!(a.union(Scope::All), Scope::All);
        let s = Scope::Paths(vec![vec![0xff, b'x']]);
        assert_eq!(serde_json::from_str::<Scope>(&s.encode()).unwrap(), s);
    }
}

//! Mirrors: one logical source made of several stores, in order of preference.
//!
//! Reads go to the first healthy store; an error, a timeout or (for chunk reads) data that
//! fails its hash check marks that store unhealthy for a back-off period and the read moves on
//! to the next one. When the back-off expires the preferred store is tried again, so reads go
//! back to it once it recovers. If every store is unhealthy they are all tried anyway, in order.
//! Writes go to the first store only: mirrors are read replicas. So do removals (`delete`,
//! `compare_and_delete`): a mirror is kept in step by whoever copies to it, and `gc` collects
//! each repository of a mirror set on its own (by its own refs), never one through another.
//!
//! Peers (`horcrux://`) listed through a peers file form a *rendezvous group*: for a chunk key
//! the group's stores are tried in the order of a hash of (key, store), not in listed order.
//! When every node of a fleet lists every node, each chunk then has one owner node that all
//! others ask first; the owner reads it once from the origin (read-through) and serves it.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use super::{Store, StoreError};
use crate::manifest::ChunkInfo;
use crate::metrics::{ErrorKind, SourceMetrics, SourceSnapshot};

/// How many bytes an answer carries, for the per-source byte counters.
trait Payload {
    fn payload_len(&self) -> u64 {
        0
    }
}

impl Payload for Bytes {
    fn payload_len(&self) -> u64 {
        self.len() as u64
    }
}
impl Payload for Vec<bool> {}
impl Payload for Vec<String> {}
impl Payload for Vec<(String, u64)> {}

/// Rendezvous (highest random weight) score of `store` for `key`: every node computes the same
/// order from the same names, without talking to each other.
fn rendezvous_score(key: &str, store: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(key.as_bytes());
    h.update(&[0]);
    h.update(store.as_bytes());
    let d = h.finalize();
    u64::from_le_bytes(d.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Health of one mirror.
#[derive(Debug, Clone, Default)]
struct Health {
    /// Skip this store until then.
    down_until: Option<Instant>,
    /// Consecutive failures (drives the back-off).
    failures: u32,
}

/// Fall-over tuning.
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    /// Bound on one attempt at one store before moving to the next.
    pub attempt_timeout: Duration,
    /// First back-off after a failure; doubles per consecutive failure up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        Self {
            attempt_timeout: Duration::from_secs(10),
            backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// Several stores holding the same repository.
#[derive(Debug)]
pub struct MirrorStore {
    stores: Vec<Arc<dyn Store>>,
    health: Mutex<Vec<Health>>,
    config: MirrorConfig,
    /// Indexes of the stores ordered per chunk key by rendezvous hashing (see the module doc).
    rendezvous: Vec<usize>,
    /// Per store, in the order of `stores`: requests, bytes, errors by kind, latency.
    metrics: Vec<SourceMetrics>,
}

/// Outcome of a check on data read from a mirror.
pub type Check<'a> = &'a (dyn Fn(&Bytes) -> bool + Sync);

impl MirrorStore {
    /// `stores` must not be empty.
    pub fn new(stores: Vec<Arc<dyn Store>>, config: MirrorConfig) -> Self {
        assert!(!stores.is_empty(), "a mirror set needs at least one store");
        let health = vec![Health::default(); stores.len()];
        let metrics = stores.iter().map(|_| SourceMetrics::default()).collect();
        Self {
            stores,
            health: Mutex::new(health),
            config,
            rendezvous: Vec::new(),
            metrics,
        }
    }

    /// Order the stores at `group` (indexes into `stores`) per chunk key by rendezvous hashing.
    /// They keep the places they hold in the list (peers first, then the origin): only who
    /// goes first among them changes from chunk to chunk.
    pub fn with_rendezvous(mut self, group: Vec<usize>) -> Self {
        let mut group: Vec<usize> = group
            .into_iter()
            .filter(|&i| i < self.stores.len())
            .collect();
        group.sort_unstable();
        group.dedup();
        self.rendezvous = group;
        self
    }

    /// Preference order for `key` before health is considered.
    fn preference(&self, key: &str) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.stores.len()).collect();
        if self.rendezvous.len() > 1 && key.starts_with("chunks/") {
            let mut ranked = self.rendezvous.clone();
            ranked.sort_by_cached_key(|&i| {
                std::cmp::Reverse(rendezvous_score(key, &self.stores[i].describe()))
            });
            for (slot, store) in self.rendezvous.iter().zip(ranked) {
                order[*slot] = store;
            }
        }
        order
    }

    pub fn stores(&self) -> &[Arc<dyn Store>] {
        &self.stores
    }

    /// Reads asked of each store (one per attempt), in the order of [`Self::stores`], named by
    /// their `describe()` (which holds no credentials).
    pub fn source_metrics(&self) -> Vec<SourceSnapshot> {
        self.stores
            .iter()
            .zip(&self.metrics)
            .map(|(s, m)| m.snapshot(s.describe()))
            .collect()
    }

    /// Count one attempt at store `i`.
    fn record(&self, i: usize, start: Instant, outcome: Result<u64, ErrorKind>) {
        let m = &self.metrics[i];
        m.requests.fetch_add(1, Ordering::Relaxed);
        m.latency.observe(start.elapsed());
        match outcome {
            Ok(n) => {
                m.bytes.fetch_add(n, Ordering::Relaxed);
            }
            Err(kind) => m.errors.add(kind),
        }
    }

    /// Indexes to try for `key`, healthy ones first (in preference order), then the rest.
    fn order(&self, key: &str) -> Vec<usize> {
        let pref = self.preference(key);
        let now = Instant::now();
        let h = self.health.lock();
        let (up, down): (Vec<usize>, Vec<usize>) = pref
            .into_iter()
            .partition(|&i| h[i].down_until.is_none_or(|t| t <= now));
        up.into_iter().chain(down).collect()
    }

    fn ok(&self, i: usize) {
        let mut h = self.health.lock();
        if h[i].failures > 0 {
            tracing::info!(store = %self.stores[i].describe(), "source is healthy again");
        }
        h[i] = Health::default();
    }

    fn failed(&self, i: usize, why: &str) {
        let mut h = self.health.lock();
        // Requests that were in flight when the store died fail together: count them as one
        // failure, or the back-off would grow with the concurrency, not with the outage.
        if h[i].down_until.is_some_and(|t| t > Instant::now()) {
            return;
        }
        let f = h[i].failures.saturating_add(1);
        let backoff = self
            .config
            .backoff
            .saturating_mul(1 << (f - 1).min(16))
            .min(self.config.max_backoff);
        h[i] = Health {
            down_until: Some(Instant::now() + backoff),
            failures: f,
        };
        if self.stores.len() > 1 {
            tracing::warn!(store = %self.stores[i].describe(), why, ?backoff, "source marked unhealthy; using the next mirror");
        }
    }

    /// Which store answered last successfully is not tracked: each call picks afresh.
    async fn each<T, F, Fut>(&self, key: &str, op: F) -> Result<T, StoreError>
    where
        T: Payload,
        F: Fn(Arc<dyn Store>) -> Fut,
        Fut: std::future::Future<Output = Result<(T, bool), StoreError>>,
    {
        let mut last: Option<StoreError> = None;
        let mut not_found = 0;
        for i in self.order(key) {
            let store = self.stores[i].clone();
            let start = Instant::now();
            let r = tokio::time::timeout(self.config.attempt_timeout, op(store)).await;
            self.record(
                i,
                start,
                match &r {
                    Ok(Ok((v, true))) => Ok(v.payload_len()),
                    Ok(Ok((_, false))) => Err(ErrorKind::Verify),
                    Ok(Err(e)) => Err(e.kind()),
                    Err(_) => Err(ErrorKind::Timeout),
                },
            );
            match r {
                Ok(Ok((v, true))) => {
                    self.ok(i);
                    return Ok(v);
                }
                Ok(Ok((_, false))) => {
                    self.stores[i].refused(key);
                    // A lone store is not "marked unhealthy" in the log (`failed`): name it
                    // here, so the source of bad bytes is always in the log, once.
                    if self.stores.len() == 1 {
                        tracing::warn!(store = %self.stores[i].describe(), key, "data failed verification (hash mismatch): refused, never cached");
                    }
                    self.failed(
                        i,
                        "data failed verification (hash mismatch): refused, never cached",
                    );
                    last = Some(StoreError::Other {
                        store: self.stores[i].describe(),
                        message: format!("`{key}`: data failed verification"),
                    });
                }
                Ok(Err(e)) if e.is_not_found() => {
                    // A mirror may lag behind: not a health problem, but try the others.
                    // A real failure elsewhere says more than "not found" (a dead origin
                    // followed by the chunks-only remotes mirror, say): it is kept.
                    not_found += 1;
                    if last.is_none() {
                        last = Some(e);
                    }
                }
                Ok(Err(e)) => {
                    self.failed(i, &e.to_string());
                    last = Some(e);
                }
                Err(_) => {
                    let store = self.stores[i].describe();
                    self.failed(i, "timed out");
                    last = Some(StoreError::Other {
                        store,
                        message: format!(
                            "`{key}`: no answer within {:?}",
                            self.config.attempt_timeout
                        ),
                    });
                }
            }
        }
        if not_found == self.stores.len() {
            return Err(StoreError::NotFound {
                store: self.describe(),
                key: key.to_string(),
            });
        }
        Err(last.expect("at least one store was tried"))
    }

    /// Bytes `range` of chunk `info`, which must pass `check` (a block hash); stores receive
    /// the chunk's block hashes (see [`Store::get_chunk_range`]).
    pub async fn get_chunk_range_checked(
        &self,
        info: &ChunkInfo,
        block_size: u32,
        range: Range<u64>,
        check: Check<'_>,
    ) -> Result<Bytes, StoreError> {
        let key = crate::format::chunk_key(&info.id);
        self.each(&key, |s| {
            let r = range.clone();
            async move {
                let b = s.get_chunk_range(info, block_size, r).await?;
                let ok = check(&b);
                Ok((b, ok))
            }
        })
        .await
    }

    /// A range whose bytes must pass `check` (e.g. a block hash); a store returning bad data
    /// is marked unhealthy and the next one is asked.
    pub async fn get_range_checked(
        &self,
        key: &str,
        range: Range<u64>,
        check: Check<'_>,
    ) -> Result<Bytes, StoreError> {
        self.each(key, |s| {
            let r = range.clone();
            async move {
                let b = s.get_range(key, r).await?;
                let ok = check(&b);
                Ok((b, ok))
            }
        })
        .await
    }
}

#[async_trait::async_trait]
impl Store for MirrorStore {
    fn describe(&self) -> String {
        self.stores
            .iter()
            .map(|s| s.describe())
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        self.get_range_checked(key, range, &|_| true).await
    }

    async fn get_chunk_range(
        &self,
        info: &ChunkInfo,
        block_size: u32,
        range: Range<u64>,
    ) -> Result<Bytes, StoreError> {
        self.get_chunk_range_checked(info, block_size, range, &|_| true)
            .await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.each(key, |s| async move { s.get(key).await.map(|b| (b, true)) })
            .await
    }

    fn refused(&self, key: &str) {
        for s in &self.stores {
            s.refused(key);
        }
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.stores[0].put(key, data).await
    }

    async fn put_file(&self, key: &str, src: &Path) -> Result<(), StoreError> {
        self.stores[0].put_file(key, src).await
    }

    async fn exists(&self, keys: &[String]) -> Result<Vec<bool>, StoreError> {
        self.each(
            "",
            |s| async move { s.exists(keys).await.map(|v| (v, true)) },
        )
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.each(prefix, |s| async move {
            s.list(prefix).await.map(|v| (v, true))
        })
        .await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Bytes,
    ) -> Result<(), StoreError> {
        self.stores[0].compare_and_swap(key, expected, new).await
    }

    /// The clock of the store writes go to (the first).
    async fn now(&self) -> Result<Option<std::time::SystemTime>, StoreError> {
        self.stores[0].now().await
    }

    async fn list_sizes(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        self.each(prefix, |s| async move {
            s.list_sizes(prefix).await.map(|v| (v, true))
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.stores[0].delete(key).await
    }

    async fn compare_and_delete(&self, key: &str, expected: &[u8]) -> Result<(), StoreError> {
        self.stores[0].compare_and_delete(key, expected).await
    }

    async fn get_to_file(&self, key: &str, dest: &Path) -> Result<(), StoreError> {
        // Large objects: no per-attempt timeout (progress is made), only fall-over on error.
        let mut last = None;
        for i in self.order(key) {
            match self.stores[i].get_to_file(key, dest).await {
                Ok(()) => {
                    self.ok(i);
                    return Ok(());
                }
                Err(e) if e.is_not_found() => last = Some(e),
                Err(e) => {
                    self.failed(i, &e.to_string());
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one store"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileStore;

    fn stores(n: usize) -> (tempfile::TempDir, Vec<Arc<dyn Store>>) {
        let d = tempfile::tempdir().unwrap();
        let v = (0..n)
            .map(|i| Arc::new(FileStore::new(d.path().join(format!("m{i}")))) as Arc<dyn Store>)
            .collect();
        (d, v)
    }

    #[tokio::test]
    async fn falls_over_on_error_and_bad_data_and_goes_back() {
        let (d, s) = stores(2);
        s[1].put("k", Bytes::from_static(b"good")).await.unwrap();
        // m0 is not a directory at all: every read fails with an I/O error.
        std::fs::write(d.path().join("m0"), b"not a dir").unwrap();
        let m = MirrorStore::new(
            s.clone(),
            MirrorConfig {
                backoff: Duration::from_millis(100),
                ..Default::default()
            },
        );
        assert_eq!(m.get("k").await.unwrap(), "good");
        assert!(m.health.lock()[0].down_until.is_some());
        // m0 comes back with corrupt data: the check rejects it and m1 answers.
        std::fs::remove_file(d.path().join("m0")).unwrap();
        s[0].put("k", Bytes::from_static(b"evil")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        let got = m
            .get_range_checked("k", 0..4, &|b| &b[..] == b"good")
            .await
            .unwrap();
        assert_eq!(got, "good");
        // Repaired: after the back-off the preferred store answers again.
        s[0].put("k", Bytes::from_static(b"good")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(450)).await;
        m.get_range("k", 0..4).await.unwrap();
        assert_eq!(m.health.lock()[0].failures, 0);
    }

    #[test]
    fn rendezvous_spreads_chunks_and_keeps_the_origin_last() {
        let (_d, s) = stores(4);
        let m = MirrorStore::new(s, MirrorConfig::default()).with_rendezvous(vec![0, 1, 2]);
        let mut first = [0usize; 3];
        for n in 0..300 {
            let key = format!("chunks/ab/{n:064}");
            let o = m.order(&key);
            assert_eq!(o[3], 3, "the origin stays last");
            assert_eq!(o, m.order(&key), "stable per key");
            first[o[0]] += 1;
        }
        // Each peer owns about a third of the chunks.
        assert!(first.iter().all(|&n| n > 60), "{first:?}");
        // Metadata keeps the listed order.
        assert_eq!(m.order("horcrux.json"), vec![0, 1, 2, 3]);
    }

    #[tokio::test]
    async fn not_found_everywhere_is_not_found() {
        let (_d, s) = stores(2);
        let m = MirrorStore::new(s, MirrorConfig::default());
        assert!(m.get("missing").await.unwrap_err().is_not_found());
    }
}

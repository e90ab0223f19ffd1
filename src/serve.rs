//! What `horcrux serve` serves to peers: the [`PeerBackend`] of a node.
//!
//! - **Repositories** given by name (`--repo NAME=URL`): every key of each. A repository in a
//!   local directory (`file://`) is read directly. A remote one (s3://, scp://) is served
//!   *read-through*: chunk reads go through this node's cache and [`Fetcher`] (single flight,
//!   every block verified), so the origin is asked once per block however many peers ask.
//! - **The local cache**: any chunk whose requested blocks are cached and verified here, for
//!   any repository name (chunks are content-addressed).
//!
//! Chunk reads carry the client's block hashes ([`ChunkHint`]); they are trusted only after
//! they hash up to the chunk id, so a client cannot poison this node's cache. A key nobody
//! here has is `NotFound`: the client moves on to its next mirror without blaming this node.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use horcrux_proto::peer::{BackendError, ChunkHint, ChunkPresence, PeerBackend};
use parking_lot::Mutex;

use crate::cache::Cache;
use crate::fetch::{FetchConfig, FetchError, Fetcher};
use crate::format::chunk_key;
use crate::hashtree::{root_of, valid_block_size};
use crate::ids::ChunkId;
use crate::manifest::ChunkInfo;
use crate::metrics::ServeMetrics;
use crate::store::{Store, StoreError};

/// One repository a node serves.
#[derive(Debug, Clone)]
pub struct ServedRepo {
    pub name: String,
    pub store: Arc<dyn Store>,
    /// Serve chunk reads through the cache and a fetcher (remote origins); otherwise read the
    /// store directly (local directories, where a cache would only copy the disk).
    pub read_through: bool,
}

/// The backend of `horcrux serve`.
#[derive(Debug)]
pub struct NodeBackend {
    repos: HashMap<String, ServedRepo>,
    cache: Option<Arc<Cache>>,
    fetch_config: FetchConfig,
    /// One fetcher per (repository, block size), made on first use; sharing it is what makes
    /// concurrent peers of one cold block cause one origin read.
    fetchers: Mutex<HashMap<(String, u32), Arc<Fetcher>>>,
    metrics: ServeMetrics,
}

/// Why a served repository list is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("two repositories are served as `{0}`; name them apart with NAME=URL")]
    DuplicateName(String),
    #[error("a read-through repository (`{0}`) needs a cache")]
    NeedsCache(String),
}

impl NodeBackend {
    pub fn new(
        repos: Vec<ServedRepo>,
        cache: Option<Arc<Cache>>,
        fetch_config: FetchConfig,
    ) -> Result<Self, ServeError> {
        let mut map = HashMap::new();
        for r in repos {
            if r.read_through && cache.is_none() {
                return Err(ServeError::NeedsCache(r.name));
            }
            if map.contains_key(&r.name) {
                return Err(ServeError::DuplicateName(r.name));
            }
            map.insert(r.name.clone(), r);
        }
        Ok(Self {
            repos: map,
            cache,
            fetch_config,
            fetchers: Mutex::new(HashMap::new()),
            metrics: ServeMetrics::default(),
        })
    }

    /// Names of the served repositories, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.repos.keys().cloned().collect();
        v.sort();
        v
    }

    /// Read-through fetchers made so far (their metrics count origin reads).
    pub fn fetchers(&self) -> Vec<((String, u32), Arc<Fetcher>)> {
        self.fetchers
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn repo(&self, name: &str) -> Result<&ServedRepo, BackendError> {
        self.repos.get(name).ok_or_else(|| {
            BackendError::NotFound(format!(
                "no repository `{name}` is served here (served: {})",
                self.names().join(", ")
            ))
        })
    }

    fn fetcher(&self, repo: &ServedRepo, block_size: u32) -> Option<Arc<Fetcher>> {
        let cache = self.cache.clone()?;
        let mut f = self.fetchers.lock();
        Some(
            f.entry((repo.name.clone(), block_size))
                .or_insert_with(|| {
                    Arc::new(Fetcher::new(
                        repo.store.clone(),
                        cache,
                        block_size,
                        self.fetch_config.clone(),
                    ))
                })
                .clone(),
        )
    }

    /// Trust a client's chunk description only if it is the chunk `key` names and its block
    /// hashes hash up to the chunk id.
    fn check_hint(key: &str, hint: &ChunkHint) -> Result<ChunkInfo, BackendError> {
        let id = ChunkId(hint.chunk_id);
        if chunk_key(&id) != key {
            return Err(BackendError::Invalid(format!(
                "the chunk hint is for {}, not `{key}`",
                id.short()
            )));
        }
        // The block size decides how the hashes merge and how blocks are hashed: one that is
        // not a power of two of at least 1 KiB would make BLAKE3's tree code assert.
        if !valid_block_size(hint.block_size) {
            return Err(BackendError::Invalid(format!(
                "the chunk hint's block size {} is not a power of two of at least 1 KiB",
                hint.block_size
            )));
        }
        if root_of(&hint.block_hashes, hint.len, hint.block_size) != Some(id) {
            return Err(BackendError::Invalid(format!(
                "the block hashes of the hint do not hash up to chunk {}",
                id.short()
            )));
        }
        Ok(ChunkInfo {
            idx: 0,
            id,
            len: hint.len,
            blocks: hint.block_hashes.clone(),
        })
    }
}

fn store_err(e: StoreError) -> BackendError {
    match e {
        e if e.is_not_found() => BackendError::NotFound(e.to_string()),
        // A key that is not a repository key is the client's mistake (or an attack), not a
        // failure of this node: the client must not set this peer aside for it.
        e @ StoreError::BadKey { .. } => BackendError::Invalid(e.to_string()),
        e => BackendError::Failed(e.to_string()),
    }
}

fn fetch_err(e: FetchError) -> BackendError {
    match &e {
        FetchError::Source { error, .. } if error.is_not_found() => {
            BackendError::NotFound(e.to_string())
        }
        _ => BackendError::Failed(e.to_string()),
    }
}

impl NodeBackend {
    async fn serve_range(
        &self,
        repo: &str,
        key: &str,
        range: Range<u64>,
        hint: Option<&ChunkHint>,
    ) -> Result<Bytes, BackendError> {
        let Some(hint) = hint else {
            return self
                .repo(repo)?
                .store
                .get_range(key, range)
                .await
                .map_err(store_err);
        };
        let info = Self::check_hint(key, hint)?;
        if range.end > info.len || range.start > range.end {
            return Err(BackendError::Invalid(format!(
                "range {range:?} is outside chunk {} ({} bytes)",
                info.id.short(),
                info.len
            )));
        }
        let bs = hint.block_size;
        if let Some(cache) = self.cache.clone() {
            let info = info.clone();
            let r = range.clone();
            let hit = tokio::task::spawn_blocking(move || cache.read_range(&info, bs, r))
                .await
                .map_err(|e| BackendError::Failed(format!("cache read task: {e}")))?;
            if let Some(b) = hit {
                self.metrics
                    .cache_hits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(b);
            }
        }
        let served = self.repo(repo)?;
        if served.read_through {
            if let Some(f) = self.fetcher(served, bs) {
                return f.read(&Arc::new(info), range).await.map_err(fetch_err);
            }
        }
        served.store.get_range(key, range).await.map_err(store_err)
    }

    async fn serve_get(&self, repo: &str, key: &str) -> Result<Bytes, BackendError> {
        self.repo(repo)?.store.get(key).await.map_err(store_err)
    }

    async fn serve_exists(&self, repo: &str, keys: &[String]) -> Result<Vec<bool>, BackendError> {
        match self.repos.get(repo) {
            Some(r) => r.store.exists(keys).await.map_err(store_err),
            None => Ok(vec![false; keys.len()]),
        }
    }

    async fn serve_list(
        &self,
        repo: &str,
        prefix: &str,
    ) -> Result<Vec<(String, u64)>, BackendError> {
        self.repo(repo)?
            .store
            .list_sizes(prefix)
            .await
            .map_err(store_err)
    }

    async fn serve_chunks_present(&self, ids: &[[u8; 32]]) -> Vec<ChunkPresence> {
        let Some(cache) = self.cache.clone() else {
            return ids
                .iter()
                .map(|id| ChunkPresence {
                    chunk_id: *id,
                    ..Default::default()
                })
                .collect();
        };
        let ids = ids.to_vec();
        tokio::task::spawn_blocking(move || {
            ids.iter()
                .map(|id| match cache.presence(&ChunkId(*id)) {
                    Ok(Some((len, block_size, bitmap))) => ChunkPresence {
                        chunk_id: *id,
                        block_size,
                        len,
                        bitmap: bitmap.as_bytes().to_vec(),
                    },
                    _ => ChunkPresence {
                        chunk_id: *id,
                        ..Default::default()
                    },
                })
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// Count a request of kind `op` (timed by `timer`), and its bytes if it succeeded.
    fn count<T>(
        &self,
        op: &'static str,
        timer: crate::metrics::OpTimer<'_>,
        r: &Result<T, BackendError>,
        len: impl Fn(&T) -> u64,
    ) {
        match r {
            Ok(v) => {
                self.metrics
                    .bytes_served
                    .fetch_add(len(v), std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                self.metrics.requests.0.error(op);
                // The peer server is the boundary: a failure to answer is logged here, once.
                // Keys nobody here has and bad requests are the client's business.
                match e {
                    BackendError::Failed(_) => {
                        tracing::warn!(op, error = %e, "peer request failed")
                    }
                    _ => tracing::debug!(op, error = %e, "peer request refused"),
                }
            }
        }
        drop(timer);
    }

    /// Requests served, bytes, cache hits (`--metrics`).
    pub fn metrics(&self) -> &ServeMetrics {
        &self.metrics
    }
}

/// Every request is counted by kind, with its latency and bytes; the work is in the
/// `serve_*` methods above.
#[async_trait::async_trait]
impl PeerBackend for NodeBackend {
    async fn get_range(
        &self,
        repo: &str,
        key: &str,
        range: Range<u64>,
        hint: Option<&ChunkHint>,
    ) -> Result<Bytes, BackendError> {
        let t = self.metrics.requests.0.start("get_range");
        let r = self.serve_range(repo, key, range, hint).await;
        self.count("get_range", t, &r, |b| b.len() as u64);
        r
    }

    async fn get(&self, repo: &str, key: &str) -> Result<Bytes, BackendError> {
        let t = self.metrics.requests.0.start("get");
        let r = self.serve_get(repo, key).await;
        self.count("get", t, &r, |b| b.len() as u64);
        r
    }

    async fn exists(&self, repo: &str, keys: &[String]) -> Result<Vec<bool>, BackendError> {
        let t = self.metrics.requests.0.start("exists");
        let r = self.serve_exists(repo, keys).await;
        self.count("exists", t, &r, |_| 0);
        r
    }

    async fn list(&self, repo: &str, prefix: &str) -> Result<Vec<(String, u64)>, BackendError> {
        let t = self.metrics.requests.0.start("list");
        let r = self.serve_list(repo, prefix).await;
        self.count("list", t, &r, |_| 0);
        r
    }

    async fn chunks_present(&self, ids: &[[u8; 32]]) -> Vec<ChunkPresence> {
        let t = self.metrics.requests.0.start("chunks_present");
        let r = self.serve_chunks_present(ids).await;
        drop(t);
        r
    }
}

/// The name a repository is served under by default: the last component of its path
/// (`file:///opt/horcrux-amcc` → `horcrux-amcc`, `s3://bucket/fleet/amcc` → `amcc`, a bucket
/// root → the bucket). `None` when the URL has no usable component (`file:///`).
pub fn default_repo_name(url: &crate::store::AccessUrl) -> Option<String> {
    use crate::store::AccessUrl;
    let last = |p: &str| {
        p.trim_end_matches('/')
            .rsplit('/')
            .next()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    match url {
        AccessUrl::File { path } => last(&path.to_string_lossy()),
        AccessUrl::Ssh { path, .. } => last(path),
        AccessUrl::S3 { bucket, prefix, .. } => last(prefix).or_else(|| Some(bucket.clone())),
        AccessUrl::Peer { repo, .. } => Some(repo.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hashtree::hash_chunk;
    use crate::store::FileStore;

    fn hint(data: &[u8], bs: u32) -> ChunkHint {
        let (id, blocks) = hash_chunk(data, bs);
        ChunkHint {
            chunk_id: *id.as_bytes(),
            len: data.len() as u64,
            block_size: bs,
            block_hashes: blocks,
        }
    }

    /// Regression (found while writing the fuzz targets `hashtree` and `peer_messages`): a hint with a block size that
    /// is not a power of two of at least 1 KiB, or a length whose block count does not fit in
    /// 32 bits, made the server's hash merging panic (BLAKE3 asserts, a slice split out of
    /// range). Such hints are refused as invalid requests.
    #[test]
    fn hostile_hint_shapes_are_invalid() {
        let data = vec![7u8; 5000];
        let (id, _) = hash_chunk(&data, 1024);
        let key = chunk_key(&id);
        for (len, block_size, hashes) in [
            (5000u64, 1000u32, 5usize),
            (3, 1, 3),
            (2048, 512, 4),
            (1 << 42, 1024, 0),
            ((1u64 << 32) + 2, 1, 2),
        ] {
            let h = ChunkHint {
                chunk_id: *id.as_bytes(),
                len,
                block_size,
                block_hashes: vec![[0; 32]; hashes],
            };
            assert!(
                matches!(
                    NodeBackend::check_hint(&key, &h),
                    Err(BackendError::Invalid(_))
                ),
                "{len} {block_size}"
            );
        }
    }

    /// Regression (found while writing the fuzz target `peer_messages`): a peer's key is joined to the served
    /// directory, and the file store only checked keys with a `debug_assert`: in a release
    /// build `../x` or `/etc/passwd` read files outside the repository and served them.
    #[tokio::test]
    async fn keys_outside_the_repository_are_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("repo")).unwrap();
        std::fs::write(d.path().join("secret"), b"not yours").unwrap();
        let store: Arc<dyn Store> = Arc::new(FileStore::new(d.path().join("repo")));
        let b = NodeBackend::new(
            vec![ServedRepo {
                name: "r".into(),
                store,
                read_through: false,
            }],
            None,
            FetchConfig::default(),
        )
        .unwrap();
        let abs = d.path().join("secret").display().to_string();
        for key in ["../secret", abs.as_str(), "a/../../secret", "", "chunks//x"] {
            assert!(
                matches!(b.get("r", key).await, Err(BackendError::Invalid(_))),
                "{key}"
            );
            assert!(
                matches!(
                    b.get_range("r", key, 0..3, None).await,
                    Err(BackendError::Invalid(_))
                ),
                "{key}"
            );
            assert!(b.exists("r", &[key.to_string()]).await.is_err(), "{key}");
        }
    }

    /// Regression (found by `cargo fuzz run peer_messages`, a timeout): a one-block hint
    /// cannot prove its length, and a read-through of a length longer than the chunk was
    /// retried as a transient error for half the request timeout (15 s), holding a stream.
    /// A range past the end of the object fails at once.
    #[tokio::test]
    async fn a_hint_longer_than_the_chunk_fails_at_once() {
        let d = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(FileStore::new(d.path().join("repo")));
        let data = b"tail".to_vec();
        let mut h = hint(&data, 1 << 20);
        h.len = 7;
        let key = chunk_key(&ChunkId(h.chunk_id));
        store.put(&key, Bytes::from(data)).await.unwrap();
        let cache = Cache::open(crate::cache::CacheConfig {
            dir: d.path().join("cache"),
            max_size: None,
        })
        .unwrap();
        let b = NodeBackend::new(
            vec![ServedRepo {
                name: "r".into(),
                store,
                read_through: true,
            }],
            Some(cache),
            FetchConfig::default(),
        )
        .unwrap();
        let t = std::time::Instant::now();
        assert!(b.get_range("r", &key, 1..3, Some(&h)).await.is_err());
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn hints_must_hash_up_to_the_chunk_and_unknown_things_are_not_found() {
        let d = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(FileStore::new(d.path().join("repo")));
        let data: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i % 251) as u8).collect();
        let h = hint(&data, 4096);
        let key = chunk_key(&ChunkId(h.chunk_id));
        store.put(&key, Bytes::from(data.clone())).await.unwrap();
        let cache = Cache::open(crate::cache::CacheConfig {
            dir: d.path().join("cache"),
            max_size: None,
        })
        .unwrap();
        let b = NodeBackend::new(
            vec![ServedRepo {
                name: "r".into(),
                store,
                read_through: true,
            }],
            Some(cache),
            FetchConfig::default(),
        )
        .unwrap();
        // Read through the cache: right bytes, and then they are cached for anyone.
        let got = b.get_range("r", &key, 100..5000, Some(&h)).await.unwrap();
        assert_eq!(&got[..], &data[100..5000]);
        // (Blocks reach the cache on the blocking pool just after they are served.)
        let mut cached = None;
        for _ in 0..100 {
            if let Ok(b) = b.get_range("another-name", &key, 100..5000, Some(&h)).await {
                cached = Some(b);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let got = cached.expect("cached chunks serve any repository name");
        assert_eq!(&got[..], &data[100..5000]);
        // A hint whose hashes were altered is refused, so is one for another key.
        let mut bad = h.clone();
        bad.block_hashes[1][0] ^= 1;
        assert!(matches!(
            b.get_range("r", &key, 0..10, Some(&bad)).await,
            Err(BackendError::Invalid(_))
        ));
        assert!(matches!(
            b.get_range("r", "chunks/00/00", 0..10, Some(&h)).await,
            Err(BackendError::Invalid(_))
        ));
        // Unknown repositories and keys: NotFound, so clients move on without blame.
        assert!(matches!(
            b.get("nope", "horcrux.json").await,
            Err(BackendError::NotFound(_))
        ));
        assert!(matches!(
            b.get("r", "horcrux.json").await,
            Err(BackendError::NotFound(_))
        ));
        let p = b.chunks_present(&[h.chunk_id, [9; 32]]).await;
        assert_eq!(p[0].len, data.len() as u64);
        assert_eq!(p[1].block_size, 0);
        assert_eq!(
            default_repo_name(&crate::store::parse_one("s3://b/x/amcc?region=r").unwrap()),
            Some("amcc".into())
        );
    }
}

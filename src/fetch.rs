//! Fetching chunk bytes: cache first, then the source, block by block, every block verified.
//!
//! - The unit of fetching is a block (`block_size`, 1 MiB by default) so a 4 KiB read never waits
//!   for a whole chunk. After a foreground miss, the rest of that chunk is filled in the
//!   background at lower priority (its own, smaller concurrency budget).
//! - Single flight: concurrent readers of one missing block share one fetch, whether it was
//!   started by a reader or by a background fill or prefetch.
//! - Verified blocks are served at once; writing them into the cache happens on the blocking
//!   pool and the in-flight entry stays until it is durable, so nobody fetches it twice.
//! - The source is a [`MirrorStore`]: a mirror that fails, times out or returns data that does
//!   not match its hash is skipped for a while and the next one is asked.
//! - A hash mismatch from every mirror is an error for the reader (EIO) and is never cached.
//! - Piece reads: a small read of a cold block fetches only the 16 KiB pieces it touches plus
//!   the block's piece hashes from the chunk's piece outboard (two small requests at once),
//!   verifies both against the block hash, and serves; the whole block follows behind it into
//!   the cache. A chunk without an outboard (older repositories) reads whole blocks.
//! - Runs: prefetches and fills ask the source for up to [`FetchConfig::run_blocks`] adjacent
//!   blocks in one request, verify each block alone, and cache them with one `fdatasync`.
//!   Every block of a run is still its own flight: a reader that needs one waits for the run
//!   instead of asking again, and falls back to fetching its block alone if the run fails.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::{OnceCell, Semaphore, watch};

use crate::cache::Cache;
use crate::hashtree::{
    self, PIECE_SIZE, Verified, VerifyError, block_count, block_range, outboard_range,
};
use crate::ids::ChunkId;
use crate::manifest::ChunkInfo;
use crate::store::{MirrorConfig, MirrorStore, Store, StoreError};

/// Why a fetch failed. Cloneable so every waiter of a shared fetch gets the error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("fetching chunk {chunk} from {source_name}: {error}")]
    Source {
        chunk: ChunkId,
        source_name: String,
        error: Arc<StoreError>,
    },
    #[error("{0}")]
    Corrupt(Arc<VerifyError>),
    #[error("fetching chunk {chunk} from {source_name}: no answer within {timeout:?}")]
    Timeout {
        chunk: ChunkId,
        source_name: String,
        timeout: Duration,
    },
}

/// Fetch tuning.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Concurrent foreground requests to the source.
    pub max_concurrency: usize,
    /// Concurrent background requests (chunk fill, prefetch).
    pub background_concurrency: usize,
    /// Bound on one block fetch across all mirrors; a dead source fails reads within it.
    pub request_timeout: Duration,
    /// After a miss, fetch the rest of the chunk in the background.
    pub fill_chunks: bool,
    /// Serve small reads of cold blocks from verified 16 KiB pieces (needs piece outboards in
    /// the repository; chunks without one read whole blocks).
    pub piece_reads: bool,
    /// Most adjacent blocks one prefetch or fill request asks for (at least 1; see
    /// [`RUN_BLOCKS`], the default).
    pub run_blocks: u32,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            max_concurrency: 32,
            background_concurrency: 1,
            request_timeout: Duration::from_secs(30),
            fill_chunks: true,
            piece_reads: true,
            run_blocks: RUN_BLOCKS,
        }
    }
}

/// Counters a user can read (`horcrux stats`, metrics).
///
/// Hits and misses are counted per block a *reader* touched (foreground reads only: fills
/// and prefetches are not reads): a hit was served from the cache, a miss waited for the
/// source (its own fetch, or one already in flight). Their bytes are the bytes of the read
/// that fell in those blocks, so hit + miss bytes add up to what was read through the fetcher.
#[derive(Debug, Default)]
pub struct FetchMetrics {
    /// Blocks fetched from the source and verified (by any priority).
    pub blocks_fetched: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub background_blocks: AtomicU64,
    pub verify_failures: AtomicU64,
    pub source_errors: AtomicU64,
    pub shared_waits: AtomicU64,
    pub hit_blocks: AtomicU64,
    pub hit_bytes: AtomicU64,
    pub miss_blocks: AtomicU64,
    pub miss_bytes: AtomicU64,
    /// Time to get one block from the source(s), fall-overs and retries included (failures too).
    pub fetch_latency: crate::metrics::Histogram,
    /// Block fetches that failed, by kind (what a reader gets as EIO).
    pub errors: crate::metrics::ErrorCounts,
    /// Small reads served from verified pieces, and the bytes (pieces and piece hashes) that
    /// they fetched.
    pub piece_reads: AtomicU64,
    pub piece_bytes: AtomicU64,
}

/// A block as a flight delivers it: found in the cache, or fetched and verified (to be cached).
#[derive(Debug, Clone)]
enum BlockData {
    Cached(Bytes),
    Fetched(Verified<Bytes>),
}

impl BlockData {
    fn bytes(&self) -> &Bytes {
        match self {
            BlockData::Cached(b) => b,
            BlockData::Fetched(v) => v.get(),
        }
    }
}

type Flight = Arc<OnceCell<Result<BlockData, FetchError>>>;

/// Largest number of adjacent blocks one prefetch or fill request asks the source for (8 MiB
/// with 1 MiB blocks). Every request costs a round trip, a signature, a cache `fdatasync` and
/// SQLite transaction here, and a metadata lookup on an S3 server; with the daemon and the
/// server sharing the CPUs (bench/remote), that per-request work bounded cold sequential reads.
/// Bounded so one request is not a large part of a chunk a reader may seek away from, and so a
/// run still lands in the cache a few MiB at a time.
pub const RUN_BLOCKS: u32 = 8;

/// What a run delivers to the readers that wait for one of its blocks: the verified blocks in
/// order (from the run's first block), or `None` if the run failed (each reader then fetches
/// its block alone and gets its own error).
type RunOutcome = Option<Arc<Vec<Verified<Bytes>>>>;
/// Where a run announces its outcome to the readers waiting on its blocks.
type RunSender = watch::Sender<Option<RunOutcome>>;

/// A run in flight, as a reader of one of its blocks finds it.
#[derive(Debug, Clone)]
struct RunWait {
    first: u32,
    done: watch::Receiver<Option<RunOutcome>>,
}

/// Priority of a block fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Priority {
    /// A reader is waiting for it.
    Foreground,
    /// A sequential reader will need it soon: shares the foreground budget.
    Prefetch,
    /// Filling the rest of a touched chunk: its own small budget, so it never holds the
    /// connections a waiting reader needs.
    Background,
}

/// Reads chunk ranges through the cache from a source (one store or several mirrors).
#[derive(Debug)]
pub struct Fetcher {
    source: Arc<MirrorStore>,
    cache: Arc<Cache>,
    block_size: u32,
    config: FetchConfig,
    foreground: Semaphore,
    background: Semaphore,
    inflight: Mutex<HashMap<(ChunkId, u32), Flight>>,
    /// Blocks claimed by a run in flight (a subset of `inflight`'s keys).
    runs: Mutex<HashMap<(ChunkId, u32), RunWait>>,
    metrics: FetchMetrics,
    /// Foreground block fetches waiting on the source now; a prefetch job backs off while
    /// there are any (see [`Fetcher::foreground_busy`]).
    foreground_active: AtomicUsize,
    /// Chunks no mirror has a piece outboard for: their small reads fetch whole blocks.
    /// Bounded: forgotten all at once when it grows past `NO_OUTBOARD_MAX`.
    no_outboard: Mutex<HashSet<ChunkId>>,
}

/// Bound of [`Fetcher::no_outboard`].
const NO_OUTBOARD_MAX: usize = 4096;

/// What [`Fetcher::hydrate`] did for one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hydrated {
    /// It was in the cache already: nothing was fetched.
    Present,
    /// This call fetched it (this many bytes, verified) and it is durable in the cache.
    Fetched(u64),
    /// Another fetch of it (a reader's, or a fill's) was under way; this call waited for it.
    Shared,
}

impl Fetcher {
    /// A fetcher over one store.
    pub fn new(
        source: Arc<dyn Store>,
        cache: Arc<Cache>,
        block_size: u32,
        config: FetchConfig,
    ) -> Self {
        let mirrors = Arc::new(MirrorStore::new(vec![source], MirrorConfig::default()));
        Self::with_mirrors(mirrors, cache, block_size, config)
    }

    /// A fetcher over mirrors, in order of preference.
    pub fn with_mirrors(
        source: Arc<MirrorStore>,
        cache: Arc<Cache>,
        block_size: u32,
        config: FetchConfig,
    ) -> Self {
        Self {
            source,
            cache,
            block_size,
            foreground: Semaphore::new(config.max_concurrency.max(1)),
            background: Semaphore::new(config.background_concurrency.max(1)),
            config,
            inflight: Mutex::new(HashMap::new()),
            runs: Mutex::new(HashMap::new()),
            metrics: FetchMetrics::default(),
            foreground_active: AtomicUsize::new(0),
            no_outboard: Mutex::new(HashSet::new()),
        }
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    pub fn metrics(&self) -> &FetchMetrics {
        &self.metrics
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Most adjacent blocks one prefetch or fill request asks for.
    pub fn run_blocks(&self) -> u32 {
        self.config.run_blocks.max(1)
    }

    /// The mirror set this fetcher reads from (per-source metrics).
    pub fn source(&self) -> &Arc<MirrorStore> {
        &self.source
    }

    /// Block fetches in flight now (each counted once however many readers wait on it).
    pub fn inflight(&self) -> usize {
        self.inflight.lock().len()
    }

    /// Is a reader waiting for a block from the source right now?
    pub fn foreground_busy(&self) -> bool {
        self.foreground_active.load(Ordering::Relaxed) > 0
    }

    /// Make block `idx` of chunk `info` present in the cache: nothing if it is, else fetch it
    /// (verified, single flight with readers) and return once it is durable in the cache. The
    /// caller bounds concurrency and bandwidth: this takes no permit of the fetcher's own, so
    /// a hydrating job never holds the foreground budget a reader needs.
    pub async fn hydrate(
        self: &Arc<Self>,
        info: &Arc<ChunkInfo>,
        idx: u32,
    ) -> Result<Hydrated, FetchError> {
        let cache = self.cache.clone();
        let info_c = info.clone();
        let bs = self.block_size;
        let present = tokio::task::spawn_blocking(move || cache.present(&info_c, bs).get(idx))
            .await
            .unwrap_or(false);
        if present {
            return Ok(Hydrated::Present);
        }
        let (bytes, fetched, _) = self
            .block_with(info, idx, Priority::Background, true)
            .await?;
        Ok(if fetched {
            Hydrated::Fetched(bytes.len() as u64)
        } else {
            Hydrated::Shared
        })
    }

    /// Bytes `range` of chunk `info` if every block is cached. Blocking read of a local file:
    /// call it from a FUSE worker or the blocking pool, not from an async task.
    pub fn read_cached(&self, info: &ChunkInfo, range: Range<u64>) -> Option<Bytes> {
        let b = self
            .cache
            .read_range(info, self.block_size, range.clone())?;
        if !range.is_empty() {
            let bs = self.block_size as u64;
            let blocks = (range.end - 1) / bs - range.start / bs + 1;
            let m = &self.metrics;
            m.hit_blocks.fetch_add(blocks, Ordering::Relaxed);
            m.hit_bytes
                .fetch_add(range.end - range.start, Ordering::Relaxed);
        }
        Some(b)
    }

    /// Bytes `range` of chunk `info`, fetching missing blocks from the source.
    pub async fn read(
        self: &Arc<Self>,
        info: &Arc<ChunkInfo>,
        range: Range<u64>,
    ) -> Result<Bytes, FetchError> {
        self.read_checked(info, range, false).await
    }

    /// [`Self::read`] for a caller that has just found `range` not cached
    /// ([`Self::read_cached`] returned `None`): a small read goes to the source without a
    /// second look at the cache, which would cost a hop to the blocking pool and an index
    /// lookup on the way of every cold small read. Whole blocks are still looked up by their
    /// flight (another process may have cached one).
    pub async fn read_after_miss(
        self: &Arc<Self>,
        info: &Arc<ChunkInfo>,
        range: Range<u64>,
    ) -> Result<Bytes, FetchError> {
        self.read_checked(info, range, true).await
    }

    async fn read_checked(
        self: &Arc<Self>,
        info: &Arc<ChunkInfo>,
        range: Range<u64>,
        missed: bool,
    ) -> Result<Bytes, FetchError> {
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        let bs = self.block_size as u64;
        let first = (range.start / bs) as u32;
        let last = ((range.end - 1) / bs) as u32;
        if first == last && self.config.piece_reads {
            if let Some(b) = self.read_pieces(info, first, range.clone(), missed).await? {
                // The whole block follows into the cache (readers of it wait for that flight),
                // then the rest of the chunk as usual. Neither delays this reader: the block is
                // known to be missing (no index lookup), and the fill is planned off its way.
                if !self.cache.is_full() {
                    self.spawn_block(info, first);
                }
                self.fill_later(info);
                return Ok(b);
            }
        }
        let mut tasks = Vec::new();
        for b in first..=last {
            let this = self.clone();
            let info = info.clone();
            tasks.push(tokio::spawn(async move {
                this.block_with(&info, b, Priority::Foreground, false).await
            }));
        }
        let mut blocks = Vec::with_capacity(tasks.len());
        for (i, t) in tasks.into_iter().enumerate() {
            let (bytes, _, cached) = t.await.expect("block task panicked")?;
            // The part of the read that fell in this block.
            let bstart = (first as u64 + i as u64) * bs;
            let part = range.end.min(bstart + bs) - range.start.max(bstart);
            let m = &self.metrics;
            let (nb, nbytes) = if cached {
                (&m.hit_blocks, &m.hit_bytes)
            } else {
                (&m.miss_blocks, &m.miss_bytes)
            };
            nb.fetch_add(1, Ordering::Relaxed);
            nbytes.fetch_add(part, Ordering::Relaxed);
            blocks.push(bytes);
        }
        self.fill_later(info);
        if blocks.len() == 1 {
            let s = (range.start - first as u64 * bs) as usize;
            let e = (range.end - first as u64 * bs) as usize;
            return Ok(blocks.remove(0).slice(s..e));
        }
        let mut out = BytesMut::with_capacity((range.end - range.start) as usize);
        for (i, b) in blocks.iter().enumerate() {
            let bstart = (first as u64 + i as u64) * bs;
            let s = range.start.max(bstart) - bstart;
            let e = range.end.min(bstart + b.len() as u64) - bstart;
            out.extend_from_slice(&b[s as usize..e as usize]);
        }
        Ok(out.freeze())
    }

    /// Bytes `range` (inside block `idx`) from verified pieces, if that is worth it and works:
    /// the block is neither cached nor in flight, the range is small against the block, and
    /// the chunk has a piece outboard whose hashes match the block hash. `None`: read the whole
    /// block instead (which also reports errors and corruption to the reader). Sources that do
    /// not answer within the bound are the reader's error at once: every mirror was asked
    /// already, and asking again for the whole block would double the time a reader of a dead
    /// source waits for its EIO.
    async fn read_pieces(
        self: &Arc<Self>,
        info: &Arc<ChunkInfo>,
        idx: u32,
        range: Range<u64>,
        missed: bool,
    ) -> Result<Option<Bytes>, FetchError> {
        match self.try_pieces(info, idx, range, missed).await {
            Pieces::Served(b) => Ok(Some(b)),
            Pieces::WholeBlock => Ok(None),
            Pieces::Failed(e) => Err(e),
        }
    }

    async fn try_pieces(
        self: &Arc<Self>,
        info: &Arc<ChunkInfo>,
        idx: u32,
        range: Range<u64>,
        missed: bool,
    ) -> Pieces {
        use Pieces::WholeBlock;
        let block = block_range(info.len, self.block_size, idx);
        let block_len = block.end - block.start;
        if block_len < 4 * PIECE_SIZE as u64 || self.no_outboard.lock().contains(&info.id) {
            return WholeBlock;
        }
        let p = PIECE_SIZE as u64;
        let cover = range.start / p * p..(range.end.div_ceil(p) * p).min(block.end);
        if (cover.end - cover.start) * 4 > block_len
            || self.inflight.lock().contains_key(&(info.id, idx))
        {
            return WholeBlock;
        }
        let t0 = std::time::Instant::now();
        let cache = self.cache.clone();
        let info_c = info.clone();
        let bs = self.block_size;
        let r = range.clone();
        if !missed
            && let Ok(Some(b)) =
                tokio::task::spawn_blocking(move || cache.read_range(&info_c, bs, r)).await
        {
            return Pieces::Served(b);
        }
        let t_cache = t0.elapsed();
        let _busy = BusyGuard::new(&self.foreground_active);
        let _permit = self.foreground.acquire().await.expect("semaphore open");
        let t_permit = t0.elapsed();
        let ob_key = crate::format::outboard_key(&info.id);
        let ob_range = outboard_range(info.len, bs, idx);
        let ok = |_: &Bytes| true; // checked below, against the block hash
        let both = async {
            tokio::join!(
                timed(self.source.get_range_checked(&ob_key, ob_range, &ok), t0),
                timed(
                    self.source
                        .get_chunk_range_checked(info, bs, cover.clone(), &ok),
                    t0
                )
            )
        };
        let ((hashes, t_hashes), (data, t_data)) =
            match tokio::time::timeout(self.config.request_timeout, both).await {
                Ok(v) => v,
                Err(_) => {
                    self.metrics.source_errors.fetch_add(1, Ordering::Relaxed);
                    self.metrics.errors.add(crate::metrics::ErrorKind::Timeout);
                    return Pieces::Failed(FetchError::Timeout {
                        chunk: info.id,
                        source_name: self.source.describe(),
                        timeout: self.config.request_timeout,
                    });
                }
            };
        // A source error is the reader's error too, as a silence is: every mirror was asked,
        // and the whole block's fetch would ask them again with its own full time bound, so a
        // reader of a cut source (whose small-read sessions fail to connect) waited for its
        // EIO up to twice as long. A range past the end is left to the block's fetch to report.
        let data = match data {
            Ok(d) => d,
            Err(e) if e.is_past_end() || e.is_not_found() => return WholeBlock,
            Err(e) => {
                self.metrics.source_errors.fetch_add(1, Ordering::Relaxed);
                self.metrics.errors.add(e.kind());
                return Pieces::Failed(FetchError::Source {
                    chunk: info.id,
                    source_name: self.source.describe(),
                    error: Arc::new(e),
                });
            }
        };
        let hashes = match hashes {
            Ok(h) => h,
            Err(e) => {
                if e.is_not_found() {
                    let mut set = self.no_outboard.lock();
                    if set.len() >= NO_OUTBOARD_MAX {
                        set.clear();
                    }
                    set.insert(info.id);
                } else {
                    tracing::debug!(chunk = %info.id, block = idx, error = %e, "piece hashes unavailable; reading the whole block");
                }
                return WholeBlock;
            }
        };
        let fetched = (hashes.len() + data.len()) as u64;
        let ph = match hashtree::verify_piece_hashes(
            info.id,
            info.len,
            bs,
            idx,
            &info.blocks[idx as usize],
            &hashes,
        ) {
            Ok(ph) => ph,
            Err(e) => {
                self.metrics.verify_failures.fetch_add(1, Ordering::Relaxed);
                self.source.refused(&ob_key);
                tracing::warn!(chunk = %info.id, block = idx, error = %e, "bad piece outboard refused");
                return WholeBlock;
            }
        };
        let v = match hashtree::verify_pieces(&ph, cover.start, data) {
            Ok(v) => v,
            Err(e) => {
                self.metrics.verify_failures.fetch_add(1, Ordering::Relaxed);
                self.source.refused(&crate::format::chunk_key(&info.id));
                // Not logged louder: the whole block is read next, and its failure (or the
                // source's, with the mirror set-aside) is what the reader's one log line says.
                tracing::debug!(chunk = %info.id, block = idx, error = %e, "hash mismatch in a piece: refused; reading the whole block");
                return WholeBlock;
            }
        };
        tracing::trace!(
            target: "horcrux::timing",
            cache_us = t_cache.as_micros() as u64,
            permit_us = (t_permit - t_cache).as_micros() as u64,
            hashes_us = (t_hashes - t_permit).as_micros() as u64,
            piece_us = (t_data - t_permit).as_micros() as u64,
            verify_us = (t0.elapsed() - t_hashes.max(t_data)).as_micros() as u64,
            "piece read"
        );
        self.metrics.piece_reads.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .piece_bytes
            .fetch_add(fetched, Ordering::Relaxed);
        let s = (range.start - cover.start) as usize;
        let e = (range.end - cover.start) as usize;
        Pieces::Served(v.get().slice(s..e))
    }

    /// Fetch `blocks` of chunk `info` ahead of a sequential reader (skipping cached and
    /// in-flight ones). Must be called from within the runtime or with its handle entered.
    pub fn prefetch(self: &Arc<Self>, info: &Arc<ChunkInfo>, blocks: Range<u32>) {
        self.spawn_fetches(info, blocks, Priority::Prefetch);
    }

    /// After a reader's miss, fill the rest of the chunk in the background (if configured).
    /// Planning the fill needs the chunk's presence bitmap, an index lookup that may wait on
    /// the cache's writers: it runs on the blocking pool, so the reader that missed gets its
    /// bytes without waiting for it.
    fn fill_later(self: &Arc<Self>, info: &Arc<ChunkInfo>) {
        if !self.config.fill_chunks {
            return;
        }
        let this = self.clone();
        let info = info.clone();
        tokio::task::spawn_blocking(move || {
            this.spawn_fetches(
                &info,
                0..block_count(info.len, this.block_size),
                Priority::Background,
            )
        });
    }

    fn spawn_fetches(self: &Arc<Self>, info: &Arc<ChunkInfo>, blocks: Range<u32>, prio: Priority) {
        // Fills and prefetches exist to land blocks in the cache: while its disk is full they
        // would only spend the source's bandwidth. Readers' own fetches go on (and their
        // inserts notice when space is back).
        if self.cache.is_full() {
            return;
        }
        let present = self.cache.present(info, self.block_size);
        let n = block_count(info.len, self.block_size);
        let end = blocks.end.min(n);
        let mut start = blocks.start;
        while start < end {
            let run = start..(start + self.run_blocks()).min(end);
            start = run.end;
            let wanted = {
                let m = self.inflight.lock();
                run.clone()
                    .any(|b| !present.get(b) && !m.contains_key(&(info.id, b)))
            };
            if !wanted {
                continue;
            }
            let this = self.clone();
            let info = info.clone();
            tokio::spawn(async move {
                // A background fill takes its permit before its blocks become flights: queued
                // fills are invisible to readers, so a reader never waits behind the fill queue.
                let _permit = match prio {
                    Priority::Background => Some(this.background.acquire().await.expect("open")),
                    _ => None,
                };
                this.fetch_run(&info, run, prio).await;
            });
        }
    }

    /// Fetch the blocks of `run` that are neither cached nor in flight, each stretch of
    /// adjacent ones with one request: claim them as flights, fetch, verify every block, hand
    /// them to their flights (and to readers already waiting), cache them with one insert,
    /// then retire the flights.
    async fn fetch_run(self: &Arc<Self>, info: &Arc<ChunkInfo>, run: Range<u32>, prio: Priority) {
        let present = self.cache.present(info, self.block_size);
        // Claim, under the locks, maximal stretches of blocks nobody has or fetches, and
        // register each stretch as a run in the same step: a reader that joins one of these
        // flights must find the run to wait for (else it would ask the source itself), also
        // for stretches fetched after the first. Lock order: runs, then inflight.
        let mut stretches: Vec<(Vec<(u32, Flight)>, RunSender)> = Vec::new();
        {
            let mut runs = self.runs.lock();
            let mut m = self.inflight.lock();
            let mut cur: Vec<(u32, Flight)> = Vec::new();
            let mut close = |cur: &mut Vec<(u32, Flight)>| {
                if cur.is_empty() {
                    return;
                }
                let (tx, rx) = watch::channel(None);
                let first = cur[0].0;
                for (b, _) in cur.iter() {
                    let done = rx.clone();
                    runs.insert((info.id, *b), RunWait { first, done });
                }
                stretches.push((std::mem::take(cur), tx));
            };
            for b in run {
                let key = (info.id, b);
                if present.get(b) || m.contains_key(&key) {
                    close(&mut cur);
                    continue;
                }
                let f: Flight = Arc::new(OnceCell::new());
                m.insert(key, f.clone());
                cur.push((b, f));
            }
            close(&mut cur);
        }
        // At once: a reader may be waiting on any of them.
        futures_util::future::join_all(
            stretches
                .into_iter()
                .map(|(claimed, tx)| self.fetch_stretch(info, claimed, tx, prio)),
        )
        .await;
    }

    /// Fetch block `b` of chunk `info` at prefetch priority, in a task of its own, unless it is
    /// in flight already. No index lookup: the caller knows the block is missing. Must be
    /// called from within the runtime or with its handle entered.
    fn spawn_block(self: &Arc<Self>, info: &Arc<ChunkInfo>, b: u32) {
        if self.inflight.lock().contains_key(&(info.id, b)) {
            return;
        }
        let this = self.clone();
        let info = info.clone();
        tokio::spawn(async move {
            if this
                .block_with(&info, b, Priority::Prefetch, false)
                .await
                .is_ok()
            {
                this.metrics
                    .background_blocks
                    .fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    async fn fetch_stretch(
        self: &Arc<Self>,
        info: &Arc<ChunkInfo>,
        claimed: Vec<(u32, Flight)>,
        tx: RunSender,
        prio: Priority,
    ) {
        let first = claimed[0].0;
        let last = claimed[claimed.len() - 1].0;
        let blocks = self.fetch_blocks(info, first..last + 1, prio).await;
        let keys: Vec<(ChunkId, u32)> = claimed.iter().map(|(b, _)| (info.id, *b)).collect();
        let Some(blocks) = blocks else {
            // Readers waiting for these blocks fetch them alone; flights nobody waits for are
            // dropped, so the next reader starts a fetch of its own.
            let _ = tx.send(Some(None));
            let mut runs = self.runs.lock();
            let mut m = self.inflight.lock();
            for k in &keys {
                runs.remove(k);
                m.remove(k);
            }
            return;
        };
        let blocks = Arc::new(blocks);
        let _ = tx.send(Some(Some(blocks.clone())));
        for (i, (_, flight)) in claimed.iter().enumerate() {
            // Fails only for a flight a reader is initialising: that reader takes its block
            // from the run's outcome instead.
            let _ = flight.set(Ok(BlockData::Fetched(blocks[i].clone())));
        }
        self.metrics
            .background_blocks
            .fetch_add(claimed.len() as u64, Ordering::Relaxed);
        // Persist, then retire the flights so later readers find the blocks in the cache.
        let this = self.clone();
        let info = info.clone();
        let persist = tokio::task::spawn_blocking(move || {
            let items: Vec<(u32, Verified<Bytes>)> = blocks
                .iter()
                .enumerate()
                .map(|(i, v)| (first + i as u32, v.clone()))
                .collect();
            if let Err(e) = this.cache.insert_blocks(&info, this.block_size, &items)
                // A full disk is logged by the cache, rate-limited.
                && !e.is_disk_full()
            {
                tracing::warn!(chunk = %info.id, blocks = ?(first..last + 1), error = %e, "could not cache blocks (served anyway)");
            }
            let mut runs = this.runs.lock();
            let mut m = this.inflight.lock();
            for k in &keys {
                runs.remove(k);
                m.remove(k);
            }
        });
        let _ = persist.await;
    }

    /// Blocks `blocks` of `info` from the source with one request, each verified; `None` if
    /// the request failed, timed out or returned bad data (readers then fetch their own
    /// blocks one by one, with retries and their own errors).
    async fn fetch_blocks(
        &self,
        info: &ChunkInfo,
        blocks: Range<u32>,
        prio: Priority,
    ) -> Option<Vec<Verified<Bytes>>> {
        let bs = self.block_size;
        let range = block_range(info.len, bs, blocks.start).start
            ..block_range(info.len, bs, blocks.end - 1).end;
        let _permit = match prio {
            Priority::Foreground | Priority::Prefetch => {
                Some(self.foreground.acquire().await.expect("semaphore open"))
            }
            Priority::Background => None,
        };
        let verified: Mutex<Option<Vec<Verified<Bytes>>>> = Mutex::new(None);
        let check = |data: &Bytes| {
            let mut out = Vec::with_capacity((blocks.end - blocks.start) as usize);
            for idx in blocks.clone() {
                let r = block_range(info.len, bs, idx);
                let (s, e) = (
                    (r.start - range.start) as usize,
                    (r.end - range.start) as usize,
                );
                if e > data.len() {
                    return false;
                }
                match hashtree::verify_block(
                    info.id,
                    info.len,
                    bs,
                    idx,
                    &info.blocks[idx as usize],
                    data.slice(s..e),
                ) {
                    Ok(v) => out.push(v),
                    Err(e) => {
                        self.metrics.verify_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(block = idx, error = %e, "corrupted data refused");
                        return false;
                    }
                }
            }
            *verified.lock() = Some(out);
            true
        };
        let started = std::time::Instant::now();
        let fetch = self
            .source
            .get_chunk_range_checked(info, bs, range.clone(), &check);
        let outcome = tokio::time::timeout(self.config.request_timeout, fetch).await;
        self.metrics.fetch_latency.observe(started.elapsed());
        match outcome {
            Ok(Ok(_)) => {
                let v = verified.lock().take()?;
                self.metrics
                    .blocks_fetched
                    .fetch_add(v.len() as u64, Ordering::Relaxed);
                self.metrics
                    .bytes_fetched
                    .fetch_add(range.end - range.start, Ordering::Relaxed);
                Some(v)
            }
            Ok(Err(e)) => {
                self.metrics.source_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(chunk = %info.id, ?blocks, error = %e, "run fetch failed; blocks are fetched alone");
                None
            }
            Err(_) => {
                self.metrics.source_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(chunk = %info.id, ?blocks, "run fetch timed out; blocks are fetched alone");
                None
            }
        }
    }

    /// One whole verified block, via cache or source, single-flight; also saying whether this
    /// call fetched it from the source and whether it came from the cache. With
    /// `wait_persist`, a block this call fetched is durable in the cache when it returns.
    async fn block_with(
        self: &Arc<Self>,
        info: &Arc<ChunkInfo>,
        idx: u32,
        prio: Priority,
        wait_persist: bool,
    ) -> Result<(Bytes, bool, bool), FetchError> {
        let key = (info.id, idx);
        let (flight, leader) = {
            let mut m = self.inflight.lock();
            match m.get(&key) {
                Some(f) => (f.clone(), false),
                None => {
                    let f: Flight = Arc::new(OnceCell::new());
                    m.insert(key, f.clone());
                    (f, true)
                }
            }
        };
        if !leader {
            self.metrics.shared_waits.fetch_add(1, Ordering::Relaxed);
        }
        let this = self.clone();
        let info2 = info.clone();
        let result = flight
            .get_or_init(|| async move { this.fetch_block(&info2, idx, prio).await })
            .await
            .clone();
        let mut fetched = false;
        if leader {
            match &result {
                Ok(BlockData::Fetched(v)) => {
                    fetched = true;
                    // Persist, then retire the flight so later readers find it in the cache.
                    let this = self.clone();
                    let info = info.clone();
                    let v = v.clone();
                    let persist = tokio::task::spawn_blocking(move || {
                        if let Err(e) =
                            this.cache
                                .insert_blocks(&info, this.block_size, &[(idx, v)])
                            // A full disk is logged by the cache, rate-limited.
                            && !e.is_disk_full()
                        {
                            tracing::warn!(chunk = %info.id, block = idx, error = %e, "could not cache block (served anyway)");
                        }
                        this.inflight.lock().remove(&key);
                    });
                    if wait_persist {
                        let _ = persist.await;
                    }
                }
                _ => {
                    self.inflight.lock().remove(&key);
                }
            }
        }
        result.map(|b| {
            let cached = matches!(b, BlockData::Cached(_));
            (b.bytes().clone(), fetched, cached)
        })
    }

    async fn fetch_block(
        &self,
        info: &ChunkInfo,
        idx: u32,
        prio: Priority,
    ) -> Result<BlockData, FetchError> {
        // Part of a run in flight: wait for it rather than ask the source again. The time
        // spent waiting counts against this block's bound: a reader whose run timed out on a
        // dead source gets its error then, instead of waiting a whole bound again alone (with
        // the kernel's retry of the page, a cut source's EIO came after three bounds).
        let mut bound = self.config.request_timeout;
        let run = self.runs.lock().get(&(info.id, idx)).cloned();
        if let Some(mut run) = run {
            let _busy =
                (prio == Priority::Foreground).then(|| BusyGuard::new(&self.foreground_active));
            let waiting = std::time::Instant::now();
            if let Ok(outcome) = run.done.wait_for(Option::is_some).await
                && let Some(Some(blocks)) = &*outcome
                && let Some(v) = blocks.get((idx - run.first) as usize)
            {
                return Ok(BlockData::Fetched(v.clone()));
            }
            bound = bound.saturating_sub(waiting.elapsed());
        }
        let r = block_range(info.len, self.block_size, idx);
        // Another process (or an earlier flight) may have cached it meanwhile.
        let cache = self.cache.clone();
        let info_c = info.clone();
        let bs = self.block_size;
        let r2 = r.clone();
        if let Ok(Some(b)) =
            tokio::task::spawn_blocking(move || cache.read_range(&info_c, bs, r2)).await
        {
            return Ok(BlockData::Cached(b));
        }
        // A reader waiting on the source: prefetch jobs back off until it is served.
        let _busy = (prio == Priority::Foreground).then(|| BusyGuard::new(&self.foreground_active));
        // Background fills already hold their permit (see `spawn_fetches`).
        let _permit = match prio {
            Priority::Foreground | Priority::Prefetch => {
                Some(self.foreground.acquire().await.expect("semaphore open"))
            }
            Priority::Background => None,
        };
        let expected = info.blocks[idx as usize];
        let verified: Mutex<Option<Verified<Bytes>>> = Mutex::new(None);
        let bad: Mutex<Option<VerifyError>> = Mutex::new(None);
        let check = |b: &Bytes| match hashtree::verify_block(
            info.id,
            info.len,
            bs,
            idx,
            &expected,
            b.clone(),
        ) {
            Ok(v) => {
                *verified.lock() = Some(v);
                true
            }
            Err(e) => {
                self.metrics.verify_failures.fetch_add(1, Ordering::Relaxed);
                // The mirror set names the store that sent it (warn); the reader's failure is
                // logged where it becomes an errno or a peer's error.
                tracing::debug!(block = idx, error = %e, "corrupted data refused");
                *bad.lock() = Some(e);
                false
            }
        };
        // Transient source errors are retried with backoff, all within `request_timeout`;
        // bad data is not (the mirror set has already asked every mirror for good bytes), nor
        // a range past the end of the object (a chunk length that lies, e.g. in a peer's
        // hint: retrying held a server stream for half the timeout).
        let fut = async {
            let mut backoff = Duration::from_millis(100);
            let start = tokio::time::Instant::now();
            loop {
                let r = self
                    .source
                    .get_chunk_range_checked(info, bs, r.clone(), &check)
                    .await;
                match r {
                    Err(e) if bad.lock().is_none() && !e.is_not_found() && !e.is_past_end() => {
                        // Give up at half the bound, so the reader gets the source's own error.
                        if start.elapsed() + backoff > bound / 2 {
                            return Err(e);
                        }
                        tracing::debug!(chunk = %info.id, block = idx, error = %e, ?backoff, "fetch failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    other => return other,
                }
            }
        };
        let outcome = if bound.is_zero() {
            None // the run used up the bound: no request that could only be abandoned
        } else {
            let started = std::time::Instant::now();
            let r = tokio::time::timeout(bound, fut).await.ok();
            self.metrics.fetch_latency.observe(started.elapsed());
            r
        };
        match outcome {
            Some(Ok(_)) => {
                let v = verified.lock().take().expect("checked data was kept");
                self.metrics.blocks_fetched.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .bytes_fetched
                    .fetch_add(v.get().len() as u64, Ordering::Relaxed);
                Ok(BlockData::Fetched(v))
            }
            Some(Err(e)) => {
                self.metrics.source_errors.fetch_add(1, Ordering::Relaxed);
                if let Some(v) = bad.lock().take() {
                    self.metrics.errors.add(crate::metrics::ErrorKind::Verify);
                    return Err(FetchError::Corrupt(Arc::new(v)));
                }
                self.metrics.errors.add(e.kind());
                let err = FetchError::Source {
                    chunk: info.id,
                    source_name: self.source.describe(),
                    error: Arc::new(e),
                };
                // Logged once, at the boundary that answers the reader (FUSE errno, prefetch,
                // peer server), with this error as its cause.
                tracing::debug!(error = %err, block = idx, "fetch failed");
                Err(err)
            }
            None => {
                self.metrics.source_errors.fetch_add(1, Ordering::Relaxed);
                self.metrics.errors.add(crate::metrics::ErrorKind::Timeout);
                let err = FetchError::Timeout {
                    chunk: info.id,
                    source_name: self.source.describe(),
                    timeout: self.config.request_timeout,
                };
                tracing::debug!(error = %err, block = idx, "fetch timed out");
                Err(err)
            }
        }
    }
}

/// `f`'s output and when it was ready, counted from `t0`.
async fn timed<F: std::future::Future>(f: F, t0: std::time::Instant) -> (F::Output, Duration) {
    let r = f.await;
    (r, t0.elapsed())
}

/// What a small read of a cold block got from the pieces path.
enum Pieces {
    Served(Bytes),
    /// Not worth it, no (good) outboard, or a bad piece: read the whole block.
    WholeBlock,
    Failed(FetchError),
}

/// Counts one waiting foreground fetch for as long as it lives.
struct BusyGuard<'a>(&'a AtomicUsize);

impl<'a> BusyGuard<'a> {
    fn new(c: &'a AtomicUsize) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        Self(c)
    }
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, AtomicUsize};

    use super::*;
    use crate::cache::CacheConfig;
    use crate::format::chunk_key;
    use crate::hashtree::hash_chunk;
    use crate::store::FileStore;

    const BS: u32 = 4096;

    /// Counts range requests and delays them, so concurrent readers overlap; the first
    /// `fail_first` requests fail as a dropped connection would.
    #[derive(Debug)]
    struct Counting {
        inner: FileStore,
        gets: AtomicUsize,
        delay: Duration,
        fail_first: usize,
    }

    #[async_trait::async_trait]
    impl Store for Counting {
        fn describe(&self) -> String {
            self.inner.describe()
        }
        async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
            let n = self.gets.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            if n < self.fail_first {
                return Err(StoreError::Other {
                    store: self.describe(),
                    message: "connection reset".into(),
                });
            }
            self.inner.get_range(key, range).await
        }
        async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
            self.inner.get(key).await
        }
        async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
            self.inner.put(key, data).await
        }
        async fn exists(&self, keys: &[String]) -> Result<Vec<bool>, StoreError> {
            self.inner.exists(keys).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
            self.inner.list(prefix).await
        }
        async fn compare_and_swap(
            &self,
            key: &str,
            expected: Option<&[u8]>,
            new: Bytes,
        ) -> Result<(), StoreError> {
            self.inner.compare_and_swap(key, expected, new).await
        }
    }

    async fn setup(
        delay: Duration,
        len: usize,
    ) -> (
        tempfile::TempDir,
        Arc<Counting>,
        Arc<Fetcher>,
        Arc<ChunkInfo>,
        Vec<u8>,
    ) {
        let d = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
        let (id, blocks) = hash_chunk(&data, BS);
        let store = FileStore::new(d.path().join("repo"));
        store
            .put(&chunk_key(&id), Bytes::from(data.clone()))
            .await
            .unwrap();
        let counting = Arc::new(Counting {
            inner: store,
            gets: AtomicUsize::new(0),
            delay,
            fail_first: 0,
        });
        let cache = Cache::open(CacheConfig {
            dir: d.path().join("cache"),
            max_size: None,
        })
        .unwrap();
        let f = Arc::new(Fetcher::new(
            counting.clone(),
            cache,
            BS,
            FetchConfig {
                max_concurrency: 8,
                request_timeout: Duration::from_secs(5),
                fill_chunks: false,
                ..Default::default()
            },
        ));
        let info = Arc::new(ChunkInfo {
            idx: 0,
            id,
            len: len as u64,
            blocks,
        });
        (d, counting, f, info, data)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_readers_of_a_cold_block_share_one_fetch() {
        let (_d, store, f, info, data) = setup(Duration::from_millis(200), 4 * 4096).await;
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let f = f.clone();
            let info = info.clone();
            tasks.push(tokio::spawn(async move {
                f.read(&info, 4096 + i..4096 + i + 100).await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let b = t.await.unwrap().unwrap();
            assert_eq!(&b[..], &data[4096 + i..4096 + i + 100]);
        }
        assert_eq!(
            store.gets.load(Ordering::SeqCst),
            1,
            "64 readers caused more than one fetch"
        );
        // Once persisted, the block is served from the cache.
        for _ in 0..500 {
            if f.read_cached(&info, 4096..8192).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(f.read_cached(&info, 4096..8192).unwrap(), &data[4096..8192]);
        // A read across blocks fetches only the missing ones, exactly.
        let b = f.read(&info, 4000..3 * 4096 + 5).await.unwrap();
        assert_eq!(&b[..], &data[4000..3 * 4096 + 5]);
        assert_eq!(
            store.gets.load(Ordering::SeqCst),
            4,
            "blocks 0, 2 and 3 only"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupted_source_data_is_refused_and_never_cached() {
        let (d, _store, f, info, _data) = setup(Duration::ZERO, 2 * 4096).await;
        let path = d.path().join("repo").join(chunk_key(&info.id));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[5000] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let err = f.read(&info, 4096..4200).await.unwrap_err();
        assert!(matches!(err, FetchError::Corrupt(_)), "{err}");
        assert_eq!(f.metrics().verify_failures.load(Ordering::Relaxed), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(f.read_cached(&info, 4096..4200).is_none());
        assert_eq!(f.cache().stats().unwrap().bytes, 0);
        // The intact block still reads.
        assert!(f.read(&info, 0..100).await.is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_source_fails_within_the_timeout() {
        let (_d, _store, f, info, _data) = setup(Duration::from_secs(3600), 4096).await;
        let f = Arc::new(Fetcher::new(
            f.source.stores()[0].clone(),
            f.cache.clone(),
            BS,
            FetchConfig {
                max_concurrency: 1,
                request_timeout: Duration::from_millis(300),
                ..Default::default()
            },
        ));
        let t = std::time::Instant::now();
        let err = f.read(&info, 0..10).await.unwrap_err();
        assert!(matches!(err, FetchError::Timeout { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_miss_fills_the_rest_of_the_chunk_in_the_background() {
        let (_d, store, f, info, data) = setup(Duration::ZERO, 8 * 4096 + 3).await;
        let f = Arc::new(Fetcher::new(
            f.source.stores()[0].clone(),
            f.cache.clone(),
            BS,
            FetchConfig::default(),
        ));
        let b = f.read(&info, 5 * 4096..5 * 4096 + 10).await.unwrap();
        assert_eq!(&b[..], &data[5 * 4096..5 * 4096 + 10]);
        let mut full = false;
        for _ in 0..500 {
            if f.read_cached(&info, 0..info.len).is_some() {
                full = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(full, "chunk was not filled in the background");
        // Block 5 by the reader, then the fill in runs around it: 0-4, 6-7, 8.
        assert_eq!(store.gets.load(Ordering::SeqCst), 4);
        assert_eq!(
            f.metrics().bytes_fetched.load(Ordering::Relaxed),
            info.len,
            "each block fetched exactly once"
        );
        assert_eq!(f.read_cached(&info, 0..info.len).unwrap(), &data[..]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_mirror_is_skipped_and_the_next_one_serves() {
        let (d, _store, f, info, data) = setup(Duration::ZERO, 2 * 4096).await;
        // Mirror 0 holds a corrupted copy, mirror 1 the good one.
        let bad = FileStore::new(d.path().join("bad"));
        let mut corrupted = data.clone();
        corrupted[100] ^= 1;
        bad.put(&chunk_key(&info.id), Bytes::from(corrupted))
            .await
            .unwrap();
        let mirrors = Arc::new(MirrorStore::new(
            vec![Arc::new(bad), f.source.stores()[0].clone()],
            MirrorConfig::default(),
        ));
        let cfg = FetchConfig {
            fill_chunks: false,
            ..Default::default()
        };
        let f = Arc::new(Fetcher::with_mirrors(mirrors, f.cache.clone(), BS, cfg));
        assert_eq!(&f.read(&info, 0..200).await.unwrap()[..], &data[..200]);
        assert_eq!(f.metrics().verify_failures.load(Ordering::Relaxed), 1);
        // Per source: the bad mirror's attempt is a verify error, the good one's bytes count.
        let src = f.source().source_metrics();
        let errs = |i: usize, k: crate::metrics::ErrorKind| {
            src[i].errors.iter().find(|(kind, _)| *kind == k).unwrap().1
        };
        assert_eq!((src[0].requests, src[0].bytes), (1, 0));
        assert_eq!(errs(0, crate::metrics::ErrorKind::Verify), 1);
        assert_eq!((src[1].requests, src[1].bytes), (1, BS as u64));
        assert_eq!(src[1].latency.count, 1);
        // The reader got its block: no fetch error, one fetch timed.
        assert!(f.metrics().errors.snapshot().iter().all(|(_, n)| *n == 0));
        assert_eq!(f.metrics().fetch_latency.snapshot().count, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hits_and_misses_count_blocks_and_the_bytes_read() {
        let (_d, _store, f, info, data) = setup(Duration::ZERO, 3 * 4096).await;
        let m = f.metrics();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        // Cold: a read over blocks 0 and 1 misses both, for the bytes it asked.
        assert!(f.read_cached(&info, 100..5000).is_none());
        assert_eq!(
            &f.read(&info, 100..5000).await.unwrap()[..],
            &data[100..5000]
        );
        assert_eq!((load(&m.miss_blocks), load(&m.miss_bytes)), (2, 4900));
        assert_eq!((load(&m.hit_blocks), load(&m.hit_bytes)), (0, 0));
        assert_eq!(load(&m.bytes_fetched), 2 * 4096);
        // Warm once persisted: the same range hits both blocks.
        for _ in 0..500 {
            if f.read_cached(&info, 0..8192).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (hb, hbytes) = (load(&m.hit_blocks), load(&m.hit_bytes));
        assert_eq!(
            &f.read_cached(&info, 100..5000).unwrap()[..],
            &data[100..5000]
        );
        assert_eq!(load(&m.hit_blocks) - hb, 2);
        assert_eq!(load(&m.hit_bytes) - hbytes, 4900);
        assert_eq!(load(&m.miss_blocks), 2, "no new miss");
        assert_eq!(f.inflight(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prefetch_asks_in_runs_and_readers_of_a_run_wait_for_it() {
        let n = 2 * RUN_BLOCKS as usize;
        let (_d, store, f, info, data) = setup(Duration::from_millis(300), n * 4096).await;
        f.prefetch(&info, 0..n as u32);
        // Readers of blocks inside both runs, while the runs are in flight.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut readers = Vec::new();
        for b in [1u64, 3, RUN_BLOCKS as u64 + 2] {
            let (f, info) = (f.clone(), info.clone());
            readers.push((
                b,
                tokio::spawn(async move { f.read(&info, b * 4096 + 7..b * 4096 + 99).await }),
            ));
        }
        for (b, r) in readers {
            let got = r.await.unwrap().unwrap();
            let at = b as usize * 4096;
            assert_eq!(&got[..], &data[at + 7..at + 99]);
        }
        assert_eq!(
            store.gets.load(Ordering::SeqCst),
            2,
            "one request per run, none for the readers"
        );
        let mut whole = None;
        for _ in 0..500 {
            whole = f.read_cached(&info, 0..info.len);
            if whole.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(&whole.expect("runs cached")[..], &data[..]);
        assert_eq!(f.inflight(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_with_a_corrupt_block_caches_nothing_and_readers_fetch_alone() {
        let (d, store, f, info, data) = setup(Duration::from_millis(100), 4 * 4096).await;
        let path = d.path().join("repo").join(chunk_key(&info.id));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[2 * 4096 + 10] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        f.prefetch(&info, 0..4);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (f1, i1) = (f.clone(), info.clone());
        let good = tokio::spawn(async move { f1.read(&i1, 4096..4196).await });
        let bad = f.read(&info, 2 * 4096..2 * 4096 + 100).await.unwrap_err();
        assert!(matches!(bad, FetchError::Corrupt(_)), "{bad}");
        assert_eq!(&good.await.unwrap().unwrap()[..], &data[4096..4196]);
        // The run, then each reader's own block.
        assert_eq!(store.gets.load(Ordering::SeqCst), 3);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(f.read_cached(&info, 2 * 4096..2 * 4096 + 1).is_none());
        assert!(
            f.read_cached(&info, 0..1).is_none(),
            "nothing of the bad run cached"
        );
        assert_eq!(f.inflight(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_of_a_run_that_times_out_gets_its_error_within_its_own_bound() {
        // A source that answers after 2 s, and a bound of 600 ms: the run times out.
        let (_d, store, f, info, _) = setup(Duration::ZERO, 4 * 4096).await;
        let slow = Arc::new(Counting {
            inner: store.inner.clone(),
            gets: AtomicUsize::new(0),
            delay: Duration::from_secs(2),
            fail_first: 0,
        });
        let bound = Duration::from_millis(600);
        let cfg = FetchConfig {
            request_timeout: bound,
            fill_chunks: false,
            ..Default::default()
        };
        let f = Arc::new(Fetcher::new(slow.clone(), f.cache.clone(), BS, cfg));
        f.prefetch(&info, 0..4);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = std::time::Instant::now();
        let e = f.read(&info, 2 * 4096..2 * 4096 + 100).await.unwrap_err();
        let waited = t.elapsed();
        assert!(matches!(e, FetchError::Timeout { .. }), "{e}");
        // It joined the run 50 ms in: after the run's timeout, ~50 ms of its own bound were
        // left for a request of its own, not a whole second bound (~1.15 s in all).
        assert!(waited < bound + Duration::from_millis(300), "{waited:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transient_source_errors_are_retried() {
        let (_d, store, f, info, data) = setup(Duration::ZERO, 4096).await;
        let flaky = Arc::new(Counting {
            inner: store.inner.clone(),
            gets: AtomicUsize::new(0),
            delay: Duration::ZERO,
            fail_first: 2,
        });
        let cfg = FetchConfig {
            fill_chunks: false,
            ..Default::default()
        };
        let f = Arc::new(Fetcher::new(flaky.clone(), f.cache.clone(), BS, cfg));
        assert_eq!(&f.read(&info, 0..100).await.unwrap()[..], &data[..100]);
        assert_eq!(flaky.gets.load(Ordering::SeqCst), 3);
    }
}

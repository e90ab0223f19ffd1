//! The local cache: verified chunk blocks shared by every mount and version, indexed by SQLite.
//!
//! Layout under the cache directory (mode 0700):
//! - `index.sqlite`: schema version, one row per cached chunk (generation, length, block hashes,
//!   presence bitmap, bytes held, last access) and one per cached manifest.
//! - `chunks/ab/<chunk-id>.<generation>`: a sparse file of the chunk's length; present blocks are at
//!   their own offsets.
//! - `manifests/<manifest-id>`: catalog files, verified when inserted.
//! - `index.lock`: held (`flock`) while a process opens the index; a lost or damaged index is
//!   rebuilt from the files above by a verifying scan then (`rebuild.rs`).
//!
//! Invariants:
//! - A block is marked present only after its verified bytes are durable in the file
//!   (write, `fdatasync`, then the index row), so a crash never exposes a partial block.
//! - The row names the file by generation: a chunk evicted and fetched again gets a new file
//!   name, so a process holding an old bitmap never reads blocks it has not seen written.
//!   (A process that still has the old file open keeps reading it: its bytes stay valid.)
//! - Eviction deletes the row first, then the file; chunks pinned by open files (in memory) or
//!   by a volume (the `pins` table, see `pins.rs`) are skipped, and so are pinned manifests.
//! - The cache only holds clean, content-addressed data; it never holds local changes.

mod assembled;
mod bitmap;
mod direct;
mod index;
mod pins;
mod rebuild;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use rusqlite::{Connection, OptionalExtension, params};

pub use assembled::{AssembledCounters, AssembledFile, Piece};
pub use bitmap::Bitmap;
pub use pins::{PinSummary, PrefetchRecord, volume_owner};

use crate::hashtree::{self, BlockHash, Verified, block_count, block_range};
use crate::ids::{ChunkId, ManifestId};
use crate::manifest::ChunkInfo;

/// Errors of the cache. Messages name the cache directory and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache {dir}: {source}")]
    Io { dir: String, source: io::Error },
    #[error("cache index {dir}/index.sqlite: {source}")]
    Sqlite {
        dir: String,
        source: rusqlite::Error,
    },
    #[error(
        "cache index {dir}/index.sqlite has schema version {found}, newer than this horcrux supports ({supported}); upgrade horcrux or use another --cache-dir"
    )]
    Schema {
        dir: String,
        found: i64,
        supported: i64,
    },
    #[error(
        "cache index {dir}/index.sqlite is damaged ({what}); it is rebuilt by a scan when the cache is next opened"
    )]
    Damaged { dir: String, what: String },
    #[error(
        "cache directory {dir} is full ({source}) while storing {what}: free space on its filesystem, prune the cache (`horcrux cache prune --max-size SIZE`), or use another --cache-dir"
    )]
    Full {
        dir: String,
        what: String,
        source: io::Error,
    },
    #[error("no cached chunk matches `{0}`")]
    NoMatch(String),
    #[error("`{0}` matches several cached chunks: give more digits")]
    Ambiguous(String),
    #[error("manifest {0}: content does not match its id (corrupted download)")]
    BadManifest(ManifestId),
}

impl CacheError {
    /// Whether the failure is the cache's filesystem being full (`ENOSPC`, `EDQUOT`, or
    /// SQLite's `SQLITE_FULL`): the cache cannot store, but nothing it holds is damaged.
    pub fn is_disk_full(&self) -> bool {
        match self {
            CacheError::Io { source, .. } => {
                matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
            }
            CacheError::Sqlite {
                source: rusqlite::Error::SqliteFailure(e, _),
                ..
            } => e.code == rusqlite::ErrorCode::DiskFull,
            CacheError::Full { .. } => true,
            _ => false,
        }
    }
}

/// How often a full cache disk is logged again while it stays full.
const FULL_LOG_EVERY: Duration = Duration::from_secs(30);

/// Where the cache lives and how big it may grow.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub dir: PathBuf,
    /// Bound on cached chunk bytes; `None` = unbounded.
    pub max_size: Option<u64>,
}

/// A cached chunk's open data file and presence bitmap (the in-memory view of its row).
#[derive(Debug)]
struct Entry {
    generation: i64,
    len: u64,
    block_size: u32,
    file: File,
    /// The same file opened `O_DIRECT`, on the first insert (`None`: not available).
    direct: std::sync::OnceLock<Option<File>>,
    present: RwLock<Bitmap>,
}

/// One row of `cache ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSummary {
    pub id: ChunkId,
    pub len: u64,
    pub bytes: u64,
    pub blocks_present: u32,
    pub blocks_total: u32,
    pub block_size: u32,
    pub last_access: i64,
    pub path: PathBuf,
}

/// Totals for `cache stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub chunks: u64,
    pub complete_chunks: u64,
    pub bytes: u64,
    pub manifests: u64,
    pub manifest_bytes: u64,
    pub max_size: Option<u64>,
    /// Counters of this process.
    pub hits: u64,
    pub misses: u64,
    pub inserted_bytes: u64,
    pub evicted_chunks: u64,
    /// Bytes of the chunks this process evicted to keep the bound.
    pub evicted_bytes: u64,
    /// Files assembled for FUSE passthrough, on disk, and their allocated bytes.
    pub assembled_files: u64,
    pub assembled_bytes: u64,
}

/// What `prune` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub chunks: u64,
    pub bytes: u64,
    pub manifests: u64,
    pub skipped_pinned: u64,
}

/// What `verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub chunks: u64,
    pub blocks: u64,
    pub bad_blocks: u64,
    pub missing_files: u64,
    pub bad_manifests: u64,
    /// Chunk files no index row names (left by a crash between file and row); removed.
    pub orphan_files: u64,
}

/// The cache. Cheap to share (`Arc`); safe to use from many threads and processes at once.
#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    max_size: Option<u64>,
    db: Mutex<Connection>,
    entries: Mutex<lru::LruCache<ChunkId, Arc<Entry>>>,
    pins: Mutex<HashMap<ChunkId, u32>>,
    touched: Mutex<(HashSet<ChunkId>, Instant)>,
    total: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    inserted: AtomicU64,
    evicted: AtomicU64,
    evicted_bytes: AtomicU64,
    /// Files assembled for passthrough (`assembled.rs`).
    assembled: assembled::Assembled,
    /// Set while inserts fail because the cache's disk is full, with when that was last
    /// logged: the condition is logged once per [`FULL_LOG_EVERY`], and its end once.
    full: Mutex<Option<Instant>>,
    insert_failures: AtomicU64,
    /// Inserts bypass the page cache where the filesystem allows (`direct.rs`).
    direct: direct::Direct,
}

/// A chunk row as `verify` reads it: id, generation, length, block size, hashes, bitmap.
type VerifyRow = (ChunkId, i64, u64, u32, Vec<u8>, Vec<u8>);

const OPEN_ENTRIES: usize = 1024;
const TOUCH_FLUSH: Duration = Duration::from_secs(5);

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Whether the filesystem holding `dir` has (almost) no space left for this process.
fn fs_full(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statvfs is a valid out-parameter; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    // `f_bavail`, not `f_bfree`: ext4 counts blocks it keeps for its own metadata as free.
    // (Root may have a reserve beyond it; this only words an error that already happened.)
    (st.f_bavail as u64).saturating_mul(st.f_frsize as u64) < 1 << 20
}

/// Bytes held by the present blocks of a chunk.
fn present_bytes(b: &Bitmap, len: u64, block_size: u32) -> u64 {
    (0..b.len())
        .filter(|&i| b.get(i))
        .map(|i| {
            let r = block_range(len, block_size, i);
            r.end - r.start
        })
        .sum()
}

impl Cache {
    /// Open (creating if needed) the cache at `config.dir`.
    pub fn open(config: CacheConfig) -> Result<Arc<Self>, CacheError> {
        let dir = config.dir.clone();
        let io_err = |source| CacheError::Io {
            dir: dir.display().to_string(),
            source,
        };
        for sub in ["", "chunks", "manifests"] {
            let p = dir.join(sub);
            if !p.exists() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&p)
                    .map_err(io_err)?;
            }
        }
        // The cache may hold data its users may not read elsewhere: keep it private.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_err)?;
        // Rebuilt by a scan first if it is lost or damaged (rebuild.rs).
        let conn = rebuild::open_index(&dir).map_err(|e| {
            // SQLite reports a full disk while it sets up its shared memory as a plain I/O
            // error: say what it is and what to do.
            let storage = matches!(e, CacheError::Sqlite { .. } | CacheError::Io { .. });
            if storage && (e.is_disk_full() || fs_full(&dir)) {
                CacheError::Full {
                    dir: dir.display().to_string(),
                    what: format!("its index ({e})"),
                    source: io::Error::from_raw_os_error(libc::ENOSPC),
                }
            } else {
                e
            }
        })?;
        let total: i64 = conn
            .query_row("SELECT COALESCE(SUM(bytes), 0) FROM chunks", [], |r| {
                r.get(0)
            })
            .map_err(|source| CacheError::Sqlite {
                dir: dir.display().to_string(),
                source,
            })?;
        let cache = Arc::new(Self {
            dir,
            max_size: config.max_size,
            db: Mutex::new(conn),
            entries: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(OPEN_ENTRIES).expect("nonzero"),
            )),
            pins: Mutex::new(HashMap::new()),
            touched: Mutex::new((HashSet::new(), Instant::now())),
            total: AtomicU64::new(total as u64),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            inserted: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            assembled: Default::default(),
            direct: Default::default(),
            full: Mutex::new(None),
            insert_failures: AtomicU64::new(0),
        });
        // Assembled files count toward the bound from the start.
        cache.assembled_usage();
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn sql(&self, source: rusqlite::Error) -> CacheError {
        CacheError::Sqlite {
            dir: self.dir.display().to_string(),
            source,
        }
    }

    fn io(&self, source: io::Error) -> CacheError {
        CacheError::Io {
            dir: self.dir.display().to_string(),
            source,
        }
    }

    fn chunk_path(&self, id: &ChunkId, generation: i64) -> PathBuf {
        let h = id.to_hex();
        self.dir
            .join("chunks")
            .join(&h[..2])
            .join(format!("{h}.{generation}"))
    }

    /// Path of a cached manifest (it may not exist yet).
    pub fn manifest_path(&self, id: &ManifestId) -> PathBuf {
        self.dir.join("manifests").join(id.to_hex())
    }

    /// Keep `id` from being evicted until the matching [`Cache::unpin`].
    pub fn pin(&self, id: &ChunkId) {
        *self.pins.lock().entry(*id).or_insert(0) += 1;
    }

    pub fn unpin(&self, id: &ChunkId) {
        let mut p = self.pins.lock();
        if let Some(n) = p.get_mut(id) {
            *n -= 1;
            if *n == 0 {
                p.remove(id);
            }
        }
    }

    /// The entry for `id` if the index has it (and its file exists).
    fn entry(&self, id: &ChunkId) -> Result<Option<Arc<Entry>>, CacheError> {
        if let Some(e) = self.entries.lock().get(id) {
            return Ok(Some(e.clone()));
        }
        let row = self
            .db
            .lock()
            .query_row(
                "SELECT generation, len, block_size, present FROM chunks WHERE id = ?1",
                [&id.0[..]],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, u32>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        let Some((generation, len, block_size, present)) = row else {
            return Ok(None);
        };
        let len = len as u64;
        let Some(present) = Bitmap::from_bytes(present, block_count(len, block_size)) else {
            tracing::warn!(chunk = %id, "cache row with a malformed bitmap dropped");
            self.forget(id, generation)?;
            return Ok(None);
        };
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.chunk_path(id, generation))
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(chunk = %id, "cache file missing; dropping its index row");
                self.forget(id, generation)?;
                return Ok(None);
            }
            Err(e) => return Err(self.io(e)),
        };
        let e = Arc::new(Entry {
            generation,
            len,
            block_size,
            file,
            direct: Default::default(),
            present: RwLock::new(present),
        });
        self.entries.lock().put(*id, e.clone());
        Ok(Some(e))
    }

    /// Drop the row of `id` (generation `generation`) and its file.
    fn forget(&self, id: &ChunkId, generation: i64) -> Result<u64, CacheError> {
        let bytes: Option<i64> = {
            let db = self.db.lock();
            let b = db
                .query_row(
                    "SELECT bytes FROM chunks WHERE id = ?1 AND generation = ?2",
                    params![&id.0[..], generation],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| self.sql(e))?;
            db.execute(
                "DELETE FROM chunks WHERE id = ?1 AND generation = ?2",
                params![&id.0[..], generation],
            )
            .map_err(|e| self.sql(e))?;
            b
        };
        self.entries.lock().pop(id);
        match fs::remove_file(self.chunk_path(id, generation)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.io(e)),
        }
        let b = bytes.unwrap_or(0).max(0) as u64;
        let _ = self
            .total
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(b))
            });
        Ok(b)
    }

    /// Read `range` of chunk `info` if every block it touches is cached.
    /// Errors are logged and reported as a miss: the caller fetches from the source instead.
    pub fn read_range(
        &self,
        info: &ChunkInfo,
        block_size: u32,
        range: Range<u64>,
    ) -> Option<Bytes> {
        let e = match self.entry(&info.id) {
            Ok(Some(e)) => e,
            Ok(None) => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Err(err) => {
                tracing::warn!(chunk = %info.id, error = %err, "cache lookup failed");
                return None;
            }
        };
        if e.block_size != block_size || e.len != info.len || range.end > e.len || range.is_empty()
        {
            return None;
        }
        let first = (range.start / block_size as u64) as u32;
        let last = ((range.end - 1) / block_size as u64) as u32;
        if !e.present.read().all(first..last + 1) {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let len = (range.end - range.start) as usize;
        let buf = match crate::util::read_at_uninit(&e.file, range.start, len) {
            Ok(b) if b.len() == len => b,
            Ok(b) => {
                tracing::warn!(chunk = %info.id, got = b.len(), wanted = len, "cached chunk file is short");
                return None;
            }
            Err(err) => {
                tracing::warn!(chunk = %info.id, error = %err, "reading cached chunk failed");
                return None;
            }
        };
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.touch(&info.id);
        Some(Bytes::from(buf))
    }

    /// Which blocks of `id` are cached (empty bitmap if none).
    pub fn present(&self, info: &ChunkInfo, block_size: u32) -> Bitmap {
        match self.entry(&info.id) {
            Ok(Some(e)) if e.block_size == block_size => e.present.read().clone(),
            _ => Bitmap::new(block_count(info.len, block_size)),
        }
    }

    /// Store verified blocks of chunk `info`: data first (fsync), then the index row.
    ///
    /// A failure leaves the cache consistent: a block whose write or `fdatasync` failed
    /// (e.g. `ENOSPC`) never gets its bit, so it is never served from here. A full disk is
    /// logged here (rate-limited, naming the directory and what to do); the caller serves
    /// the verified bytes it has anyway.
    pub fn insert_blocks(
        &self,
        info: &ChunkInfo,
        block_size: u32,
        blocks: &[(u32, Verified<Bytes>)],
    ) -> Result<(), CacheError> {
        let r = self.insert_blocks_inner(info, block_size, blocks);
        match &r {
            Err(e) if e.is_disk_full() => {
                self.insert_failures.fetch_add(1, Ordering::Relaxed);
                let mut full = self.full.lock();
                if full.is_none_or(|t| t.elapsed() >= FULL_LOG_EVERY) {
                    *full = Some(Instant::now());
                    tracing::warn!(
                        dir = %self.dir.display(),
                        error = %e,
                        failures = self.insert_failures.load(Ordering::Relaxed),
                        "cache directory {} is full: blocks are served from the source without \
                         being cached until space is freed; free space on its filesystem, bound \
                         the cache (--cache-size, `horcrux cache prune --max-size`), or use \
                         another --cache-dir",
                        self.dir.display()
                    );
                }
            }
            Ok(()) if self.full.lock().take().is_some() => {
                tracing::info!(dir = %self.dir.display(), "cache directory has space again: caching resumed");
            }
            _ => {}
        }
        r
    }

    /// Bytes this process wrote into cache files bypassing the page cache (`O_DIRECT`).
    pub fn direct_write_bytes(&self) -> u64 {
        self.direct.bytes()
    }

    /// Whether the last insert failed because the cache's disk is full (until one succeeds).
    pub fn is_full(&self) -> bool {
        self.full.lock().is_some()
    }

    fn insert_blocks_inner(
        &self,
        info: &ChunkInfo,
        block_size: u32,
        blocks: &[(u32, Verified<Bytes>)],
    ) -> Result<(), CacheError> {
        if blocks.is_empty() {
            return Ok(());
        }
        let e = self.get_or_create(info, block_size)?;
        let path = self.chunk_path(&info.id, e.generation);
        let direct = e.direct.get_or_init(|| self.direct.open(&path));
        let mut added = Bitmap::new(block_count(info.len, block_size));
        for (idx, data) in blocks {
            let r = block_range(info.len, block_size, *idx);
            debug_assert_eq!(r.end - r.start, data.get().len() as u64);
            let written = match &direct {
                Some(f) => self
                    .direct
                    .write_at(f, &path, data.get(), r.start)
                    .map_err(|err| self.io(err))?,
                None => false,
            };
            if !written {
                e.file
                    .write_all_at(data.get(), r.start)
                    .map_err(|err| self.io(err))?;
            }
            added.set(*idx);
        }
        // Also makes the direct writes' block allocations durable (any descriptor will do).
        e.file.sync_data().map_err(|err| self.io(err))?;
        let new_bytes = {
            let mut db = self.db.lock();
            let tx = db
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(|err| self.sql(err))?;
            let row: Option<(Vec<u8>, i64)> = tx
                .query_row(
                    "SELECT present, bytes FROM chunks WHERE id = ?1 AND generation = ?2",
                    params![&info.id.0[..], e.generation],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(|err| self.sql(err))?;
            // Evicted by another process meanwhile: the data is simply not cached.
            let Some((present, old_bytes)) = row else {
                return Ok(());
            };
            let mut present = Bitmap::from_bytes(present, added.len())
                .unwrap_or_else(|| Bitmap::new(added.len()));
            present.merge(&added);
            let bytes = present_bytes(&present, info.len, block_size);
            tx.execute(
                "UPDATE chunks SET present = ?3, bytes = ?4, last_access = ?5 WHERE id = ?1 AND generation = ?2",
                params![&info.id.0[..], e.generation, present.as_bytes(), bytes as i64, now_secs()],
            )
            .map_err(|err| self.sql(err))?;
            tx.commit().map_err(|err| self.sql(err))?;
            e.present.write().merge(&present);
            // Another thread may have replaced the open entry of this generation meanwhile
            // (see `get_or_create`): its bitmap must learn these blocks too, or this process
            // would take them for missing until the entry leaves the LRU.
            if let Some(cur) = self.entries.lock().peek(&info.id)
                && cur.generation == e.generation
                && !Arc::ptr_eq(cur, &e)
            {
                cur.present.write().merge(&present);
            }
            bytes.saturating_sub(old_bytes.max(0) as u64)
        };
        self.total.fetch_add(new_bytes, Ordering::Relaxed);
        self.inserted.fetch_add(new_bytes, Ordering::Relaxed);
        if let Some(max) = self.max_size {
            if self.total.load(Ordering::Relaxed) + self.assembled.bytes() > max {
                self.evict_to(max)?;
            }
        }
        Ok(())
    }

    fn get_or_create(&self, info: &ChunkInfo, block_size: u32) -> Result<Arc<Entry>, CacheError> {
        if let Some(e) = self.entry(&info.id)? {
            if e.block_size == block_size && e.len == info.len {
                return Ok(e);
            }
            // Same bytes cut in different block sizes: start over with the new layout.
            self.forget(&info.id, e.generation)?;
        }
        // File first, then the row: a row always names an existing file. A crash in between
        // leaves an orphan file that `verify` removes.
        let mine = (rand_u32() >> 1) as i64;
        let path = self.chunk_path(&info.id, mine);
        fs::create_dir_all(path.parent().expect("parent")).map_err(|e| self.io(e))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode_private()
            .open(&path)
            .map_err(|e| self.io(e))?;
        file.set_len(info.len).map_err(|e| self.io(e))?;
        file.sync_all().map_err(|e| self.io(e))?;
        let winner: i64 = {
            let db = self.db.lock();
            let n = block_count(info.len, block_size);
            let blocks: Vec<u8> = info.blocks.concat();
            db.execute(
                "INSERT OR IGNORE INTO chunks (id, generation, len, block_size, blocks, present, bytes, last_access)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7)",
                params![&info.id.0[..], mine, info.len as i64, block_size, blocks, Bitmap::new(n).as_bytes(), now_secs()],
            )
            .map_err(|e| self.sql(e))?;
            db.query_row(
                "SELECT generation FROM chunks WHERE id = ?1",
                [&info.id.0[..]],
                |r| r.get(0),
            )
            .map_err(|e| self.sql(e))?
        };
        if winner == mine {
            // Ours: the file is already open and the bitmap empty; no need to read them back.
            let e = Arc::new(Entry {
                generation: mine,
                len: info.len,
                block_size,
                file,
                direct: Default::default(),
                present: RwLock::new(Bitmap::new(block_count(info.len, block_size))),
            });
            self.entries.lock().put(info.id, e.clone());
            return Ok(e);
        }
        // Another thread or process created it first: use theirs — the open entry if this
        // process has it (its bitmap is the live one), else a fresh one from the row.
        drop(file);
        let _ = fs::remove_file(&path);
        {
            let mut entries = self.entries.lock();
            match entries.get(&info.id) {
                Some(cur) if cur.generation == winner => return Ok(cur.clone()),
                _ => {
                    entries.pop(&info.id);
                }
            }
        }
        self.entry(&info.id)?
            .ok_or_else(|| self.io(io::Error::other("chunk evicted while being created")))
    }

    fn touch(&self, id: &ChunkId) {
        let flush = {
            let mut t = self.touched.lock();
            t.0.insert(*id);
            t.1.elapsed() > TOUCH_FLUSH
        };
        if flush {
            if let Err(e) = self.flush_touches() {
                tracing::warn!(error = %e, "updating cache access times failed");
            }
        }
    }

    /// Write batched access times to the index.
    pub fn flush_touches(&self) -> Result<(), CacheError> {
        let ids: Vec<ChunkId> = {
            let mut t = self.touched.lock();
            t.1 = Instant::now();
            t.0.drain().collect()
        };
        if ids.is_empty() {
            return Ok(());
        }
        let now = now_secs();
        let mut db = self.db.lock();
        let tx = db
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| self.sql(e))?;
        for id in ids {
            tx.execute(
                "UPDATE chunks SET last_access = ?2 WHERE id = ?1",
                params![&id.0[..], now],
            )
            .map_err(|e| self.sql(e))?;
        }
        tx.commit().map_err(|e| self.sql(e))
    }

    /// Evict least recently used chunks until at most `target` bytes remain, skipping pinned
    /// chunks. Returns the number of chunks and bytes removed and how many pinned were skipped.
    pub fn evict_to(&self, target: u64) -> Result<PruneReport, CacheError> {
        self.flush_touches()?;
        let mut report = PruneReport::default();
        let total: i64 = self
            .db
            .lock()
            .query_row("SELECT COALESCE(SUM(bytes), 0) FROM chunks", [], |r| {
                r.get(0)
            })
            .map_err(|e| self.sql(e))?;
        self.total.store(total as u64, Ordering::Relaxed);
        // Assembled files (derived copies of cached chunks) go first; what pinned ones still
        // hold is taken from the chunks' share of the bound.
        let assembled = self.evict_assembled_to(target.saturating_sub(total as u64));
        let target = target.saturating_sub(assembled);
        let candidates: Vec<(ChunkId, i64, bool)> = {
            let db = self.db.lock();
            let mut st = db
                .prepare(
                    "SELECT id, generation, EXISTS(SELECT 1 FROM pins p WHERE p.kind = 0 AND p.id = chunks.id)
                     FROM chunks ORDER BY last_access, id",
                )
                .map_err(|e| self.sql(e))?;
            let rows = st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, bool>(2)?,
                    ))
                })
                .map_err(|e| self.sql(e))?;
            rows.filter_map(|r| r.ok())
                .filter_map(|(id, g, p)| ChunkId::from_slice(&id).map(|id| (id, g, p)))
                .collect()
        };
        for (id, generation, pinned) in candidates {
            if self.total.load(Ordering::Relaxed) <= target {
                break;
            }
            if pinned || self.pins.lock().contains_key(&id) {
                report.skipped_pinned += 1;
                continue;
            }
            let b = self.forget(&id, generation)?;
            report.chunks += 1;
            report.bytes += b;
            self.evicted.fetch_add(1, Ordering::Relaxed);
            self.evicted_bytes.fetch_add(b, Ordering::Relaxed);
        }
        if report.chunks > 0 {
            tracing::debug!(
                chunks = report.chunks,
                bytes = report.bytes,
                "evicted from cache"
            );
        }
        if self.total.load(Ordering::Relaxed) > target && report.skipped_pinned > 0 {
            tracing::warn!(
                target,
                held = self.total.load(Ordering::Relaxed),
                "cache is over its size bound: the rest is in use by open files or pinned by a volume (`horcrux cache pins`)"
            );
        }
        Ok(report)
    }

    /// Remove chunks not accessed for `older_than`, then evict down to `max_size`.
    /// Manifests not used for `older_than` are removed too.
    pub fn prune(
        &self,
        max_size: Option<u64>,
        older_than: Option<Duration>,
    ) -> Result<PruneReport, CacheError> {
        self.flush_touches()?;
        let mut report = PruneReport::default();
        if let Some(age) = older_than {
            self.prune_assembled(SystemTime::now().checked_sub(age).unwrap_or(UNIX_EPOCH));
            let cutoff = now_secs() - age.as_secs() as i64;
            let old: Vec<(ChunkId, i64, bool)> = {
                let db = self.db.lock();
                let mut st = db
                    .prepare(
                        "SELECT id, generation, EXISTS(SELECT 1 FROM pins p WHERE p.kind = 0 AND p.id = chunks.id)
                         FROM chunks WHERE last_access < ?1",
                    )
                    .map_err(|e| self.sql(e))?;
                let rows = st
                    .query_map([cutoff], |r| {
                        Ok((
                            r.get::<_, Vec<u8>>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, bool>(2)?,
                        ))
                    })
                    .map_err(|e| self.sql(e))?;
                rows.filter_map(|r| r.ok())
                    .filter_map(|(id, g, p)| ChunkId::from_slice(&id).map(|id| (id, g, p)))
                    .collect()
            };
            for (id, generation, pinned) in old {
                if pinned || self.pins.lock().contains_key(&id) {
                    report.skipped_pinned += 1;
                    continue;
                }
                report.bytes += self.forget(&id, generation)?;
                report.chunks += 1;
            }
            let old_manifests: Vec<Vec<u8>> = {
                let db = self.db.lock();
                let mut st = db
                    .prepare("SELECT id FROM manifests WHERE last_access < ?1")
                    .map_err(|e| self.sql(e))?;
                let rows = st
                    .query_map([cutoff], |r| r.get(0))
                    .map_err(|e| self.sql(e))?;
                rows.filter_map(|r| r.ok()).collect()
            };
            for id in old_manifests
                .iter()
                .filter_map(|b| ManifestId::from_slice(b))
            {
                // A volume that must work without its source needs its manifest.
                if self.manifest_pinned(&id)? {
                    continue;
                }
                self.db
                    .lock()
                    .execute("DELETE FROM manifests WHERE id = ?1", [&id.0[..]])
                    .map_err(|e| self.sql(e))?;
                let _ = fs::remove_file(self.manifest_path(&id));
                report.manifests += 1;
            }
        }
        if let Some(max) = max_size {
            let r = self.evict_to(max)?;
            report.chunks += r.chunks;
            report.bytes += r.bytes;
            report.skipped_pinned += r.skipped_pinned;
        }
        Ok(report)
    }

    /// Record a manifest file already written (and verified) at [`Cache::manifest_path`].
    pub fn add_manifest(&self, id: &ManifestId) -> Result<(), CacheError> {
        let size = fs::metadata(self.manifest_path(id))
            .map_err(|e| self.io(e))?
            .len();
        self.db
            .lock()
            .execute(
                "INSERT INTO manifests (id, size, last_access) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET last_access = excluded.last_access",
                params![&id.0[..], size as i64, now_secs()],
            )
            .map(drop)
            .map_err(|e| self.sql(e))
    }

    /// Whether a manifest is cached (and mark it used).
    pub fn has_manifest(&self, id: &ManifestId) -> bool {
        let known = self
            .db
            .lock()
            .execute(
                "UPDATE manifests SET last_access = ?2 WHERE id = ?1",
                params![&id.0[..], now_secs()],
            )
            .map(|n| n > 0)
            .unwrap_or(false);
        known && self.manifest_path(id).exists()
    }

    /// All cached chunks, most recently used first.
    pub fn list(&self) -> Result<Vec<ChunkSummary>, CacheError> {
        self.flush_touches()?;
        let db = self.db.lock();
        let mut st = db
            .prepare("SELECT id, generation, len, block_size, present, bytes, last_access FROM chunks ORDER BY last_access DESC, id")
            .map_err(|e| self.sql(e))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, u32>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                ))
            })
            .map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, generation, len, bs, present, bytes, last) = row.map_err(|e| self.sql(e))?;
            let Some(id) = ChunkId::from_slice(&id) else {
                continue;
            };
            let total = block_count(len as u64, bs);
            let present = Bitmap::from_bytes(present, total)
                .map(|b| b.count())
                .unwrap_or(0);
            out.push(ChunkSummary {
                id,
                len: len as u64,
                bytes: bytes as u64,
                blocks_present: present,
                blocks_total: total,
                block_size: bs,
                last_access: last,
                path: self.chunk_path(&id, generation),
            });
        }
        Ok(out)
    }

    /// The cached chunk whose id starts with `prefix` (hex).
    pub fn find(&self, prefix: &str) -> Result<ChunkSummary, CacheError> {
        let p = prefix.trim().to_ascii_lowercase();
        let mut m: Vec<ChunkSummary> = self
            .list()?
            .into_iter()
            .filter(|c| !p.is_empty() && c.id.to_hex().starts_with(&p))
            .collect();
        match m.len() {
            0 => Err(CacheError::NoMatch(prefix.to_string())),
            1 => Ok(m.remove(0)),
            _ => Err(CacheError::Ambiguous(prefix.to_string())),
        }
    }

    /// Length, block size and presence bitmap of a cached chunk (`None` if not cached): what
    /// a peer server reports to `Have`.
    pub fn presence(&self, id: &ChunkId) -> Result<Option<(u64, u32, Bitmap)>, CacheError> {
        Ok(self
            .entry(id)?
            .map(|e| (e.len, e.block_size, e.present.read().clone())))
    }

    /// Presence bitmap of a cached chunk, for `cache inspect`.
    pub fn bitmap_of(&self, id: &ChunkId) -> Result<Option<Bitmap>, CacheError> {
        Ok(self.entry(id)?.map(|e| e.present.read().clone()))
    }

    pub fn stats(&self) -> Result<CacheStats, CacheError> {
        self.flush_touches()?;
        let (assembled_files, assembled_bytes) = self.assembled_usage();
        let db = self.db.lock();
        let (chunks, bytes) = db
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM chunks",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
            .map_err(|e| self.sql(e))?;
        let complete: i64 = db
            .query_row("SELECT COUNT(*) FROM chunks WHERE bytes = len", [], |r| {
                r.get(0)
            })
            .map_err(|e| self.sql(e))?;
        let (manifests, mbytes) = db
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM manifests",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
            .map_err(|e| self.sql(e))?;
        Ok(CacheStats {
            chunks: chunks as u64,
            complete_chunks: complete as u64,
            bytes: bytes as u64,
            manifests: manifests as u64,
            manifest_bytes: mbytes as u64,
            max_size: self.max_size,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            inserted_bytes: self.inserted.load(Ordering::Relaxed),
            evicted_chunks: self.evicted.load(Ordering::Relaxed),
            evicted_bytes: self.evicted_bytes.load(Ordering::Relaxed),
            assembled_files,
            assembled_bytes,
        })
    }

    /// Re-hash every cached block (and manifest); drop blocks that fail. `progress(done, total)`
    /// is called after each chunk.
    pub fn verify(&self, progress: &dyn Fn(u64, u64)) -> Result<VerifyReport, CacheError> {
        let rows: Vec<VerifyRow> = {
            let db = self.db.lock();
            let mut st = db
                .prepare("SELECT id, generation, len, block_size, blocks, present FROM chunks ORDER BY id")
                .map_err(|e| self.sql(e))?;
            let rows = st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, u32>(3)?,
                        r.get::<_, Vec<u8>>(4)?,
                        r.get::<_, Vec<u8>>(5)?,
                    ))
                })
                .map_err(|e| self.sql(e))?;
            rows.filter_map(|r| r.ok())
                .filter_map(|(id, g, l, bs, b, p)| {
                    ChunkId::from_slice(&id).map(|id| (id, g, l as u64, bs, b, p))
                })
                .collect()
        };
        let mut rep = VerifyReport::default();
        let total = rows.len() as u64;
        for (i, (id, generation, len, bs, blocks, present)) in rows.into_iter().enumerate() {
            rep.chunks += 1;
            let n = block_count(len, bs);
            let hashes: Vec<BlockHash> = blocks
                .chunks_exact(32)
                .map(|b| b.try_into().expect("32"))
                .collect();
            let present = Bitmap::from_bytes(present, n);
            let outboard_ok = hashtree::verify_outboard(id, len, bs, &hashes).is_ok();
            let (Some(present), true) = (present, outboard_ok) else {
                tracing::warn!(chunk = %id, "cache row damaged; dropped");
                rep.bad_blocks += 1;
                self.forget(&id, generation)?;
                continue;
            };
            let file = match File::open(self.chunk_path(&id, generation)) {
                Ok(f) => f,
                Err(_) => {
                    rep.missing_files += 1;
                    self.forget(&id, generation)?;
                    continue;
                }
            };
            let mut bad = Vec::new();
            for b in 0..n {
                if !present.get(b) {
                    continue;
                }
                rep.blocks += 1;
                let r = block_range(len, bs, b);
                let mut buf = vec![0u8; (r.end - r.start) as usize];
                let ok = file.read_exact_at(&mut buf, r.start).is_ok()
                    && hashtree::verify_block(id, len, bs, b, &hashes[b as usize], &buf[..])
                        .is_ok();
                if !ok {
                    bad.push(b);
                }
            }
            if !bad.is_empty() {
                tracing::warn!(chunk = %id, blocks = ?bad, "cached blocks failed verification; dropped");
                rep.bad_blocks += bad.len() as u64;
                self.drop_blocks(&id, generation, len, bs, &bad)?;
            }
            progress(i as u64 + 1, total);
        }
        rep.orphan_files = self.remove_orphans()?;
        if rep.bad_blocks > 0 {
            // Assembled files may hold copies of the bad blocks: drop them (derived data).
            self.remove_assembled();
        }
        let manifests: Vec<Vec<u8>> = {
            let db = self.db.lock();
            let mut st = db
                .prepare("SELECT id FROM manifests")
                .map_err(|e| self.sql(e))?;
            let rows = st.query_map([], |r| r.get(0)).map_err(|e| self.sql(e))?;
            rows.filter_map(|r| r.ok()).collect()
        };
        for id in manifests.iter().filter_map(|b| ManifestId::from_slice(b)) {
            let p = self.manifest_path(&id);
            let ok = crate::manifest::hash_file(&p)
                .map(|h| h == id)
                .unwrap_or(false);
            if !ok {
                rep.bad_manifests += 1;
                tracing::warn!(manifest = %id, "cached manifest failed verification; dropped");
                let _ = fs::remove_file(&p);
                self.db
                    .lock()
                    .execute("DELETE FROM manifests WHERE id = ?1", [&id.0[..]])
                    .map_err(|e| self.sql(e))?;
            }
        }
        Ok(rep)
    }

    /// Remove chunk files that no row names. Files younger than a minute are left alone: a
    /// concurrent creator may be between writing its file and its row.
    fn remove_orphans(&self) -> Result<u64, CacheError> {
        let mut removed = 0;
        let root = self.dir.join("chunks");
        let subdirs = match fs::read_dir(&root) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(self.io(e)),
        };
        for sub in subdirs.flatten() {
            let Ok(files) = fs::read_dir(sub.path()) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                let Some((hex, generation)) = name.split_once('.') else {
                    continue;
                };
                let (Ok(id), Ok(generation)) = (hex.parse::<ChunkId>(), generation.parse::<i64>())
                else {
                    continue;
                };
                let known: bool = self
                    .db
                    .lock()
                    .query_row(
                        "SELECT COUNT(*) FROM chunks WHERE id = ?1 AND generation = ?2",
                        params![&id.0[..], generation],
                        |r| r.get::<_, i64>(0),
                    )
                    .map_err(|e| self.sql(e))?
                    > 0;
                let young = f
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_none_or(|a| a < Duration::from_secs(60));
                if !known && !young {
                    tracing::info!(file = %f.path().display(), "removing orphan cache file");
                    fs::remove_file(f.path()).map_err(|e| self.io(e))?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    fn drop_blocks(
        &self,
        id: &ChunkId,
        generation: i64,
        len: u64,
        bs: u32,
        bad: &[u32],
    ) -> Result<(), CacheError> {
        let mut db = self.db.lock();
        let tx = db
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| self.sql(e))?;
        let present: Option<Vec<u8>> = tx
            .query_row(
                "SELECT present FROM chunks WHERE id = ?1 AND generation = ?2",
                params![&id.0[..], generation],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        if let Some(p) = present.and_then(|p| Bitmap::from_bytes(p, block_count(len, bs))) {
            let mut p = p;
            for &b in bad {
                p.clear(b);
            }
            let bytes = present_bytes(&p, len, bs);
            tx.execute(
                "UPDATE chunks SET present = ?3, bytes = ?4 WHERE id = ?1 AND generation = ?2",
                params![&id.0[..], generation, p.as_bytes(), bytes as i64],
            )
            .map_err(|e| self.sql(e))?;
        }
        tx.commit().map_err(|e| self.sql(e))?;
        drop(db);
        self.entries.lock().pop(id);
        Ok(())
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        let _ = self.flush_touches();
    }
}

trait PrivateMode {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateMode for OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    // getrandom(2) never fails for 4 bytes on Linux ≥ 3.17 once the pool is initialised.
    // SAFETY: the buffer is valid for 4 bytes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 4, 0) };
    if n != 4 {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        return t.subsec_nanos() ^ std::process::id();
    }
    u32::from_le_bytes(b)
}

#[cfg(test)]
mod tests;

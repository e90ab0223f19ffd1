//! Opening the cache index, and rebuilding it from the cache directory when it is lost.
//!
//! The index (`index.sqlite`) is the only record of which blocks of a chunk file are verified;
//! the chunk files and cached manifests are the data. When the index is missing while data
//! is there (deleted, or truncated to nothing), or damaged (garbage bytes: `SQLITE_NOTADB`;
//! torn or truncated pages: `SQLITE_CORRUPT` or a failing `PRAGMA quick_check`), opening the
//! cache rebuilds it by a scan instead of failing or silently forgetting the data:
//!
//! 1. The damaged file is moved aside (`index.sqlite.damaged-<unix time>`) for diagnosis; its
//!    `-wal`/`-shm` files are removed (a WAL never applies to another database file). An
//!    older damaged file is deleted: the latest is enough to diagnose.
//! 2. Every cached manifest is re-hashed against its name; good ones get their row back and
//!    lend their chunks' block hashes and block size to step 3; others are deleted.
//! 3. Every chunk file is checked block by block against those hashes: only blocks that
//!    verify are marked present (holes read as zeros and fail, as they should). A chunk no
//!    cached manifest describes is kept only if the whole file hashes to its id (it is then
//!    complete; its blocks are cut at the default block size). Files with nothing verifiable
//!    are deleted; so is a second generation of one chunk.
//! 4. Assembled files (passthrough copies) are derived data and cannot be checked without
//!    the index: they are deleted and re-made on demand.
//! 5. The new index is written under a temporary name and renamed into place (atomic: a
//!    crash during the rebuild leaves the old state, and the next open rebuilds again).
//!
//! Pins and prefetch records lived only in the index: they are lost, and said so in the log.
//!
//! The check and the rebuild run under an exclusive `flock` of `index.lock`, so processes
//! opening one cache at once neither rebuild twice nor see a half-made index. A process that
//! already had the damaged index open keeps its own view until it reopens the cache; the bytes
//! it serves were verified when it cached them, so it serves nothing wrong.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, params};

use super::bitmap::Bitmap;
use super::index::{self, INDEX_FILE};
use super::{CacheError, present_bytes};
use crate::format::DEFAULT_BLOCK_SIZE;
use crate::hashtree::{self, BlockHash, block_count, block_range};
use crate::ids::{ChunkId, ManifestId};
use crate::manifest::Manifest;

/// The largest chunk file whole-hashed when no cached manifest describes it (bigger ones,
/// unknown, are dropped rather than read into memory).
const MAX_WHOLE_HASH: u64 = 256 << 20;
/// Temporary files younger than this may belong to a concurrent writer: left alone.
const YOUNG: Duration = Duration::from_secs(60);

/// What a rebuild kept and dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct RebuildReport {
    /// Chunk files kept, and their blocks that verified.
    pub chunks: u64,
    pub blocks: u64,
    /// Chunk files deleted: nothing in them verified, or no hashes to verify them against.
    pub dropped_chunks: u64,
    /// Blocks of kept files that did not verify (not marked present).
    pub dropped_blocks: u64,
    pub manifests: u64,
    pub dropped_manifests: u64,
    pub assembled_removed: u64,
}

/// Open the index of the cache at `dir`, rebuilding it first if it is lost or damaged.
pub(super) fn open_index(dir: &Path) -> Result<Connection, CacheError> {
    let io_err = |source| CacheError::Io {
        dir: dir.display().to_string(),
        source,
    };
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join("index.lock"))
        .map_err(io_err)?;
    // SAFETY: flock on a descriptor we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io_err(io::Error::last_os_error()));
    }
    let path = dir.join(INDEX_FILE);
    let len = match fs::metadata(&path) {
        Ok(m) => Some(m.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(e)),
    };
    let reason = if len.unwrap_or(0) == 0 {
        // No index (or an empty file, which SQLite would take for a new database): whatever
        // WAL is left belongs to a database that is gone.
        remove_wal(&path);
        if !has_data(dir) {
            return index::open(dir);
        }
        if len.is_none() {
            "missing".to_string()
        } else {
            "empty (truncated)".to_string()
        }
    } else {
        match index::open(dir).and_then(|c| quick_check(dir, &c).map(|()| c)) {
            Ok(c) => return Ok(c),
            Err(e) => match damage(&e) {
                Some(why) => why,
                None => return Err(e),
            },
        }
    };
    let report = rebuild(dir, &reason)?;
    let conn = index::open(dir)?;
    drop(lock);
    tracing::warn!(
        dir = %dir.display(),
        chunks = report.chunks,
        blocks = report.blocks,
        dropped_chunks = report.dropped_chunks,
        dropped_blocks = report.dropped_blocks,
        manifests = report.manifests,
        dropped_manifests = report.dropped_manifests,
        "cache index {} was {reason}: rebuilt it by scanning the cache directory (every block \
         re-verified; unverifiable data dropped). Pins and prefetch records were lost: run \
         `horcrux prefetch` again for volumes that must work without their source",
        path.display()
    );
    Ok(conn)
}

/// Why `e` means the index file is damaged (rebuild it), or `None` for other failures
/// (permissions, a newer schema, a busy database...), which are reported as they are.
fn damage(e: &CacheError) -> Option<String> {
    match e {
        CacheError::Sqlite {
            source: rusqlite::Error::SqliteFailure(f, msg),
            ..
        } if matches!(f.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => Some(
            format!("damaged ({})", msg.clone().unwrap_or_else(|| f.to_string())),
        ),
        CacheError::Damaged { what, .. } => Some(format!("damaged ({what})")),
        _ => None,
    }
}

/// `PRAGMA quick_check` plus a read of every table the cache uses: catches torn pages that
/// opening alone does not touch.
fn quick_check(dir: &Path, c: &Connection) -> Result<(), CacheError> {
    let sql = |source| CacheError::Sqlite {
        dir: dir.display().to_string(),
        source,
    };
    let mut st = c.prepare("PRAGMA quick_check").map_err(sql)?;
    let rows: Vec<String> = st
        .query_map([], |r| r.get(0))
        .map_err(sql)?
        .collect::<Result<_, _>>()
        .map_err(sql)?;
    if rows != ["ok"] {
        return Err(CacheError::Damaged {
            dir: dir.display().to_string(),
            what: rows.join("; "),
        });
    }
    for t in ["chunks", "manifests", "pins", "prefetch_jobs"] {
        c.query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(sql)?;
    }
    Ok(())
}

fn remove_wal(index: &Path) {
    for ext in ["-wal", "-shm", "-journal"] {
        let mut p = index.as_os_str().to_owned();
        p.push(ext);
        let _ = fs::remove_file(PathBuf::from(p));
    }
}

/// Whether the cache directory holds any chunk or manifest file.
fn has_data(dir: &Path) -> bool {
    let any = |p: PathBuf| fs::read_dir(p).is_ok_and(|mut d| d.next().is_some());
    let chunks = fs::read_dir(dir.join("chunks"))
        .map(|d| d.flatten().any(|s| any(s.path())))
        .unwrap_or(false);
    chunks || any(dir.join("manifests"))
}

fn mtime_secs(m: &fs::Metadata) -> i64 {
    m.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn young(m: &fs::Metadata) -> bool {
    m.modified()
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_none_or(|a| a < YOUNG)
}

/// How a chunk file's blocks are checked: its length, block size and block hashes.
type Layout = (u64, u32, Vec<BlockHash>);

/// Rebuild `index.sqlite` of the cache at `dir` from its files (see the module comment).
/// The caller holds the index lock.
pub(super) fn rebuild(dir: &Path, reason: &str) -> Result<RebuildReport, CacheError> {
    let d = dir.display().to_string();
    let io_err = |source| CacheError::Io {
        dir: d.clone(),
        source,
    };
    let sql = |source| CacheError::Sqlite {
        dir: d.clone(),
        source,
    };
    let path = dir.join(INDEX_FILE);
    if path.exists() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        // Keep only the latest damaged index: one is enough to diagnose.
        for e in read_dir(dir).map_err(io_err)? {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{INDEX_FILE}.damaged-")) {
                let _ = fs::remove_file(e.path());
            }
        }
        let aside = dir.join(format!("{INDEX_FILE}.damaged-{now}"));
        fs::rename(&path, &aside).map_err(io_err)?;
        tracing::warn!(index = %path.display(), moved_to = %aside.display(), "cache index {reason}; moved aside");
    }
    remove_wal(&path);
    let tmp = dir.join(format!("{INDEX_FILE}.rebuild"));
    let _ = fs::remove_file(&tmp);
    remove_wal(&tmp);
    let mut rep = RebuildReport::default();
    let mut conn = index::open_at(dir, &tmp)?;
    let tx = conn.transaction().map_err(sql)?;

    // Manifests: verified by their names, they give the block hashes of their chunks.
    let mut layouts: HashMap<ChunkId, Layout> = HashMap::new();
    for e in read_dir(&dir.join("manifests")).map_err(io_err)? {
        let p = e.path();
        let Ok(meta) = e.metadata() else { continue };
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(id) = name.parse::<ManifestId>() else {
            if !young(&meta) {
                let _ = fs::remove_file(&p); // a download's leftover temporary file
            }
            continue;
        };
        let good = crate::manifest::hash_file(&p).is_ok_and(|h| h == id);
        let opened = good.then(|| Manifest::open(&p).ok()).flatten();
        let Some(m) = opened else {
            tracing::warn!(manifest = %id, "cached manifest does not match its id; dropped");
            fs::remove_file(&p).map_err(io_err)?;
            rep.dropped_manifests += 1;
            continue;
        };
        let bs = m.header().block_size;
        if let Ok(chunks) = m.chunks() {
            for c in chunks {
                layouts.entry(c.id).or_insert((c.len, bs, c.blocks));
            }
        }
        tx.execute(
            "INSERT OR REPLACE INTO manifests (id, size, last_access) VALUES (?1, ?2, ?3)",
            params![&id.0[..], meta.len() as i64, mtime_secs(&meta)],
        )
        .map_err(sql)?;
        rep.manifests += 1;
    }

    // Chunk files.
    let mut seen: HashSet<ChunkId> = HashSet::new();
    for sub in read_dir(&dir.join("chunks")).map_err(io_err)? {
        for e in read_dir(&sub.path()).map_err(io_err)? {
            let p = e.path();
            let Ok(meta) = e.metadata() else { continue };
            let name = e.file_name().to_string_lossy().into_owned();
            let parsed = name
                .split_once('.')
                .and_then(|(h, g)| Some((h.parse::<ChunkId>().ok()?, g.parse::<i64>().ok()?)));
            let Some((id, generation)) = parsed else {
                if !young(&meta) {
                    let _ = fs::remove_file(&p);
                }
                continue;
            };
            let kept = if seen.contains(&id) {
                None
            } else {
                check_chunk(&p, id, meta.len(), layouts.get(&id), &mut rep)
            };
            let Some((bs, blocks, present)) = kept else {
                tracing::info!(file = %p.display(), "cache file could not be verified; dropped");
                fs::remove_file(&p).map_err(io_err)?;
                rep.dropped_chunks += 1;
                continue;
            };
            seen.insert(id);
            let len = meta.len();
            tx.execute(
                "INSERT INTO chunks (id, generation, len, block_size, blocks, present, bytes, last_access)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    &id.0[..],
                    generation,
                    len as i64,
                    bs,
                    blocks.concat(),
                    present.as_bytes(),
                    present_bytes(&present, len, bs) as i64,
                    mtime_secs(&meta)
                ],
            )
            .map_err(sql)?;
            rep.chunks += 1;
            rep.blocks += present.count() as u64;
        }
    }
    tx.commit().map_err(sql)?;
    // Closing the last connection checkpoints the WAL into the file and removes it, so the
    // file alone is the whole index when it is renamed into place.
    conn.close().map_err(|(_, e)| sql(e))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err)?;
    fs::rename(&tmp, &path).map_err(io_err)?;
    crate::util::sync_dir(dir).map_err(io_err)?;

    let assembled = dir.join("assembled");
    if assembled.exists() {
        rep.assembled_removed = count_files(&assembled);
        fs::remove_dir_all(&assembled).map_err(io_err)?;
    }
    Ok(rep)
}

/// Entries of a directory (none if it does not exist).
fn read_dir(p: &Path) -> io::Result<Vec<fs::DirEntry>> {
    match fs::read_dir(p) {
        Ok(d) => Ok(d.flatten().collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn count_files(p: &Path) -> u64 {
    read_dir(p)
        .unwrap_or_default()
        .iter()
        .map(|e| {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// Which blocks of the chunk file at `p` verify: its block size, block hashes and presence
/// bitmap, or `None` if nothing in it can be trusted.
fn check_chunk(
    p: &Path,
    id: ChunkId,
    len: u64,
    layout: Option<&Layout>,
    rep: &mut RebuildReport,
) -> Option<(u32, Vec<BlockHash>, Bitmap)> {
    let mut file = File::open(p).ok()?;
    match layout {
        Some((want_len, bs, hashes)) if *want_len == len => {
            let n = block_count(len, *bs);
            let mut present = Bitmap::new(n);
            let mut buf = Vec::new();
            for b in 0..n {
                let r = block_range(len, *bs, b);
                buf.resize((r.end - r.start) as usize, 0);
                let ok = file.read_exact_at(&mut buf, r.start).is_ok()
                    && hashtree::verify_block(id, len, *bs, b, &hashes[b as usize], &buf[..])
                        .is_ok();
                if ok {
                    present.set(b);
                } else {
                    rep.dropped_blocks += 1;
                }
            }
            // A chunk whose blocks are all missing (holes) is normal for a file that was
            // being created; it is simply not cached.
            (present.count() > 0).then(|| (*bs, hashes.clone(), present))
        }
        Some(_) => None,
        None if len <= MAX_WHOLE_HASH => {
            let mut data = Vec::with_capacity(len as usize);
            file.read_to_end(&mut data).ok()?;
            let (got, blocks) = hashtree::hash_chunk(&data, DEFAULT_BLOCK_SIZE);
            if got != id {
                return None;
            }
            let mut present = Bitmap::new(block_count(len, DEFAULT_BLOCK_SIZE));
            for b in 0..present.len() {
                present.set(b);
            }
            Some((DEFAULT_BLOCK_SIZE, blocks, present))
        }
        None => None,
    }
}

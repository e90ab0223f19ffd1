//! Reading a catalog. The file is immutable (content-addressed), so it is opened read-only with
//! `immutable=1` (no locking) and shared by a small pool of connections, one per concurrent caller.

use std::ops::Range;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};

use super::{
    CATALOG_VERSION, CatalogHeader, ChunkInfo, Extent, MAX_DIRENT_SEQ, ManifestError, Node,
    NodeKind, valid_name,
};
use crate::hashtree::{BlockHash, checked_block_count, valid_block_size};
use crate::ids::ChunkId;

/// An open, read-only catalog.
#[derive(Debug)]
pub struct Manifest {
    path: PathBuf,
    header: CatalogHeader,
    pool: Mutex<Vec<Connection>>,
}

/// A directory entry as listed.
#[derive(Debug, Clone)]
pub struct DirEntry {
    /// Position in the directory (0-based); the next listing starts at `seq + 1`.
    pub seq: u64,
    pub name: Vec<u8>,
    pub node: Node,
}

/// Totals of a catalog.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManifestStats {
    pub nodes: u64,
    pub files: u64,
    pub bytes: u64,
    pub chunks: u64,
    pub chunk_bytes: u64,
}

const NODE_COLS: &str = "n.ino, n.parent, n.kind, n.mode, n.uid, n.gid, n.size, n.atime, n.mtime, n.ctime, n.nlink, n.rdev, n.target";

fn node_from_row(r: &Row<'_>, base: usize) -> rusqlite::Result<Node> {
    let kind: i64 = r.get(base + 2)?;
    let kind = NodeKind::from_code(kind).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            base + 2,
            rusqlite::types::Type::Integer,
            format!("unknown node kind {kind}").into(),
        )
    })?;
    Ok(Node {
        ino: r.get::<_, i64>(base)? as u64,
        parent: r.get::<_, i64>(base + 1)? as u64,
        kind,
        mode: r.get::<_, u32>(base + 3)? & 0o7777,
        uid: r.get(base + 4)?,
        gid: r.get(base + 5)?,
        size: r.get::<_, i64>(base + 6)?.max(0) as u64,
        atime: r.get(base + 7)?,
        mtime: r.get(base + 8)?,
        ctime: r.get(base + 9)?,
        nlink: r.get(base + 10)?,
        rdev: r.get::<_, i64>(base + 11)? as u64,
        target: r.get(base + 12)?,
    })
}

impl Manifest {
    /// Open a catalog file and check its header.
    pub fn open(path: &Path) -> Result<Self, ManifestError> {
        let conn = open_conn(path)?;
        readahead(path);
        let p = path.display().to_string();
        let get = |k: &str| -> Result<String, ManifestError> {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [k], |r| {
                r.get::<_, String>(0)
            })
            .optional()
            .map_err(|source| ManifestError::Sqlite {
                path: p.clone(),
                source,
            })?
            .ok_or_else(|| ManifestError::Invalid {
                path: p.clone(),
                what: format!("no `{k}`"),
            })
        };
        if get("format")? != "horcrux-catalog" {
            return Err(ManifestError::Invalid {
                path: p,
                what: "wrong format marker".into(),
            });
        }
        let version: u32 = get("version")?.parse().unwrap_or(0);
        if version != CATALOG_VERSION {
            return Err(ManifestError::Version { path: p, version });
        }
        let bad = |what: &str| ManifestError::Invalid {
            path: p.clone(),
            what: what.into(),
        };
        let chunk_size: u64 = get("chunk_size")?
            .parse()
            .map_err(|_| bad("bad chunk_size"))?;
        let block_size: u32 = get("block_size")?
            .parse()
            .map_err(|_| bad("bad block_size"))?;
        if !valid_block_size(block_size) || !chunk_size.is_power_of_two() {
            return Err(bad("chunk or block size is not a power of two"));
        }
        let header = CatalogHeader {
            volume: get("volume")?,
            chunk_size,
            block_size,
        };
        Ok(Self {
            path: path.to_path_buf(),
            header,
            pool: Mutex::new(vec![conn]),
        })
    }

    pub fn header(&self) -> &CatalogHeader {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, ManifestError> {
        let conn = match self.pool.lock().pop() {
            Some(c) => c,
            None => open_conn(&self.path)?,
        };
        let r = f(&conn);
        let mut pool = self.pool.lock();
        if pool.len() < 64 {
            pool.push(conn);
        }
        r.map_err(|source| ManifestError::Sqlite {
            path: self.path.display().to_string(),
            source,
        })
    }

    /// The node with inode number `ino`.
    pub fn node(&self, ino: u64) -> Result<Option<Node>, ManifestError> {
        self.with(|c| {
            c.prepare_cached(&format!("SELECT {NODE_COLS} FROM nodes n WHERE n.ino = ?1"))?
                .query_row([ino as i64], |r| node_from_row(r, 0))
                .optional()
        })
    }

    /// The child `name` of directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Node>, ManifestError> {
        if !valid_name(name) {
            return Ok(None);
        }
        self.with(|c| {
            c.prepare_cached(&format!(
                "SELECT {NODE_COLS} FROM dirents d JOIN nodes n ON n.ino = d.ino
                 WHERE d.parent = ?1 AND d.name = ?2"
            ))?
            .query_row(params![parent as i64, name], |r| node_from_row(r, 0))
            .optional()
        })
    }

    /// The largest inode number (new nodes of an overlay are numbered above it).
    pub fn max_ino(&self) -> Result<u64, ManifestError> {
        self.with(|c| {
            c.query_row("SELECT COALESCE(MAX(ino), 1) FROM nodes", [], |r| {
                r.get::<_, i64>(0)
            })
        })
        .map(|n| n as u64)
    }

    /// A name under which `ino` is listed in directory `parent` (a scan of that directory).
    pub fn name_of(&self, parent: u64, ino: u64) -> Result<Option<Vec<u8>>, ManifestError> {
        self.with(|c| {
            c.prepare_cached(
                "SELECT name FROM dirents WHERE parent = ?1 AND ino = ?2 ORDER BY seq LIMIT 1",
            )?
            .query_row(params![parent as i64, ino as i64], |r| r.get(0))
            .optional()
        })
    }

    /// Up to `limit` entries of directory `parent` starting at position `start`.
    /// Entries with names that could escape the tree are skipped (and logged).
    pub fn readdir(
        &self,
        parent: u64,
        start: u64,
        limit: usize,
    ) -> Result<Vec<DirEntry>, ManifestError> {
        let rows = self.with(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT d.seq, d.name, {NODE_COLS} FROM dirents d JOIN nodes n ON n.ino = d.ino
                 WHERE d.parent = ?1 AND d.seq >= ?2 ORDER BY d.seq LIMIT ?3"
            ))?;
            let it = st.query_map(params![parent as i64, start as i64, limit as i64], |r| {
                Ok(DirEntry {
                    seq: r.get::<_, i64>(0)? as u64,
                    name: r.get(1)?,
                    node: node_from_row(r, 2)?,
                })
            })?;
            it.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        // Positions become readdir cookies (`seq + 3` for the kernel; the overlay's entries
        // take cookies from 2^62 on): a negative or huge one is a broken catalog.
        if let Some(e) = rows.iter().find(|e| e.seq > MAX_DIRENT_SEQ) {
            return Err(self.invalid(format!(
                "directory {parent}: entry position {} is out of range",
                e.seq as i64
            )));
        }
        Ok(rows
            .into_iter()
            .filter(|e| {
                let ok = valid_name(&e.name);
                if !ok {
                    tracing::warn!(parent, name = ?String::from_utf8_lossy(&e.name), "manifest entry with an invalid name skipped");
                }
                ok
            })
            .collect())
    }

    /// Extents of `ino` overlapping `range`, in file order.
    pub fn extents(&self, ino: u64, range: Range<u64>) -> Result<Vec<Extent>, ManifestError> {
        let rows = self.with(|c| {
            // The extent containing range.start begins at or before it: take the last such one
            // plus every extent starting inside the range.
            let mut st = c.prepare_cached(
                "SELECT off, len, chunk, chunk_off FROM extents WHERE ino = ?1 AND off >= COALESCE(
                   (SELECT off FROM extents WHERE ino = ?1 AND off <= ?2 ORDER BY off DESC LIMIT 1), ?2)
                 AND off < ?3 ORDER BY off",
            )?;
            let it = st.query_map(params![ino as i64, range.start as i64, range.end as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?;
            it.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        let mut out = Vec::with_capacity(rows.len());
        for (off, len, chunk, chunk_off) in rows {
            let e = self.checked_extent(ino, off, len, chunk, chunk_off)?;
            if e.file_off + e.len > range.start {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// An extent row as read: no negative field, and neither its file range nor its chunk
    /// range wraps around, so readers may add offsets and lengths without overflow.
    fn checked_extent(
        &self,
        ino: u64,
        off: i64,
        len: i64,
        chunk: i64,
        chunk_off: i64,
    ) -> Result<Extent, ManifestError> {
        let fields = (
            u64::try_from(off),
            u64::try_from(len),
            u64::try_from(chunk),
            u64::try_from(chunk_off),
        );
        let (Ok(file_off), Ok(len), Ok(chunk), Ok(chunk_off)) = fields else {
            return Err(self.invalid(format!("inode {ino}: an extent has a negative field")));
        };
        if file_off.checked_add(len).is_none() || chunk_off.checked_add(len).is_none() {
            return Err(self.invalid(format!(
                "inode {ino}: the extent at {file_off} ({len} bytes) runs past 2^64"
            )));
        }
        Ok(Extent {
            ino,
            file_off,
            len,
            chunk,
            chunk_off,
        })
    }

    fn invalid(&self, what: String) -> ManifestError {
        ManifestError::Invalid {
            path: self.path.display().to_string(),
            what,
        }
    }

    /// Chunk `idx` with its block hashes; checks the hash list has the right shape.
    pub fn chunk(&self, idx: u64) -> Result<Option<ChunkInfo>, ManifestError> {
        let row = self.with(|c| {
            c.prepare_cached("SELECT id, len, blocks FROM chunks WHERE idx = ?1")?
                .query_row([idx as i64], |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                    ))
                })
                .optional()
        })?;
        let Some((id, len, blocks)) = row else {
            return Ok(None);
        };
        self.decode_chunk(idx, &id, len, &blocks).map(Some)
    }

    fn decode_chunk(
        &self,
        idx: u64,
        id: &[u8],
        len: i64,
        blocks: &[u8],
    ) -> Result<ChunkInfo, ManifestError> {
        let bad = |what: String| ManifestError::Invalid {
            path: self.path.display().to_string(),
            what,
        };
        let id = ChunkId::from_slice(id).ok_or_else(|| bad(format!("chunk {idx}: bad id")))?;
        let len = u64::try_from(len).map_err(|_| bad(format!("chunk {idx}: negative length")))?;
        let n = checked_block_count(len, self.header.block_size).unwrap_or(0) as usize;
        if n == 0 || blocks.len() != n * 32 || len > self.header.chunk_size.max(1) {
            return Err(bad(format!(
                "chunk {idx}: block list does not fit its length"
            )));
        }
        let blocks: Vec<BlockHash> = blocks
            .chunks_exact(32)
            .map(|b| b.try_into().expect("32 bytes"))
            .collect();
        Ok(ChunkInfo {
            idx,
            id,
            len,
            blocks,
        })
    }

    /// Index and id of every chunk (without block hashes: small enough to hold for a map of
    /// ids to indexes, where the chunk table has no index on ids).
    pub fn chunk_ids(&self) -> Result<Vec<(u64, ChunkId)>, ManifestError> {
        let rows = self.with(|c| {
            let mut st = c.prepare("SELECT idx, id FROM chunks ORDER BY idx")?;
            let it = st.query_map([], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?))
            })?;
            it.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        rows.into_iter()
            .map(|(i, id)| {
                ChunkId::from_slice(&id)
                    .map(|id| (i, id))
                    .ok_or_else(|| ManifestError::Invalid {
                        path: self.path.display().to_string(),
                        what: format!("chunk {i}: bad id"),
                    })
            })
            .collect()
    }

    /// Every chunk of the catalog, in index order.
    pub fn chunks(&self) -> Result<Vec<ChunkInfo>, ManifestError> {
        let rows = self.with(|c| {
            let mut st = c.prepare("SELECT idx, id, len, blocks FROM chunks ORDER BY idx")?;
            let it = st.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                ))
            })?;
            it.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        rows.iter()
            .map(|(i, id, len, b)| self.decode_chunk(*i, id, *len, b))
            .collect()
    }

    /// Value of extended attribute `name` of `ino`.
    pub fn xattr(&self, ino: u64, name: &[u8]) -> Result<Option<Vec<u8>>, ManifestError> {
        self.with(|c| {
            c.prepare_cached("SELECT value FROM xattrs WHERE ino = ?1 AND name = ?2")?
                .query_row(params![ino as i64, name], |r| r.get(0))
                .optional()
        })
    }

    /// Names of the extended attributes of `ino`.
    pub fn xattr_names(&self, ino: u64) -> Result<Vec<Vec<u8>>, ManifestError> {
        self.with(|c| {
            let mut st =
                c.prepare_cached("SELECT name FROM xattrs WHERE ino = ?1 ORDER BY name")?;
            let it = st.query_map([ino as i64], |r| r.get(0))?;
            it.collect()
        })
    }

    /// Totals (a full scan; for `log`, `status` and tests, not the hot path).
    pub fn stats(&self) -> Result<ManifestStats, ManifestError> {
        self.with(|c| {
            let (nodes, files, bytes) = c.query_row(
                "SELECT COUNT(*), COALESCE(SUM(kind = 1), 0), COALESCE(SUM(CASE WHEN kind = 1 THEN size ELSE 0 END), 0) FROM nodes",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)),
            )?;
            let (chunks, chunk_bytes) = c.query_row(
                "SELECT COUNT(*), COALESCE(SUM(len), 0) FROM (SELECT DISTINCT id, len FROM chunks)",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )?;
            Ok(ManifestStats {
                nodes: nodes as u64,
                files: files as u64,
                bytes: bytes as u64,
                chunks: chunks as u64,
                chunk_bytes: chunk_bytes as u64,
            })
        })
    }
}

fn open_conn(path: &Path) -> Result<Connection, ManifestError> {
    let err = |source| ManifestError::Sqlite {
        path: path.display().to_string(),
        source,
    };
    // SQLite URI: escape the characters that would end or corrupt the path part.
    let escaped = path
        .display()
        .to_string()
        .replace('%', "%25")
        .replace('?', "%3f")
        .replace('#', "%23");
    let uri = format!("file:{escaped}?immutable=1");
    let conn = Connection::open_with_flags(
        uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    // No mmap: mapped catalog pages count in the daemon's RSS once per connection that touched
    // them (a stat walk of a 1,000,000-file volume peaked at 100 MiB with 256 MiB windows, 26 MiB
    // without), while reads through SQLite's own bounded page cache, from a catalog the kernel
    // has read ahead, are as fast.
    conn.execute_batch("PRAGMA query_only = 1; PRAGMA cache_size = -8192; PRAGMA mmap_size = 0;")
        .map_err(err)?;
    Ok(conn)
}

/// Ask the kernel to read the whole catalog into the page cache in the background. A walk of a
/// freshly mounted tree otherwise faults its B-tree pages in one 4 KiB disk read at a time, in
/// the random order of the tree's pages; this turns that into a few large sequential reads
/// started at open. Best effort and asynchronous: it neither fails nor delays the open.
/// The advice is given on a thread of its own: for a large catalog the kernel may block while
/// it queues the reads.
fn readahead(path: &Path) {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(path) else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("catalog-readahead".into())
        .spawn(move || {
            // SAFETY: an advisory call on a descriptor owned by this closure.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ManifestWriter, Node, NodeKind};

    fn node(ino: u64, kind: NodeKind) -> Node {
        Node {
            ino,
            parent: 1,
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            atime: 0,
            mtime: 0,
            ctime: 0,
            nlink: 1,
            rdev: 0,
            target: (kind == NodeKind::Symlink).then(|| b"/etc/passwd".to_vec()),
        }
    }

    /// A writer of a catalog of volume `v` with 1 MiB chunks and blocks.
    fn test_writer(path: &Path) -> ManifestWriter {
        ManifestWriter::create(
            path,
            &CatalogHeader {
                volume: "v".into(),
                chunk_size: 1 << 20,
                block_size: 1 << 20,
            },
        )
        .unwrap()
    }

    /// A hostile catalog cannot make horcrux show an entry that escapes its directory: names
    /// with `/`, NUL, `.`, `..` or nothing are skipped by readdir and never found by lookup.
    /// Symlink targets are data (an absolute target is shown, never followed here).
    #[test]
    fn names_that_could_escape_the_tree_are_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let mut w = test_writer(&path);
        w.add_node(&node(1, NodeKind::Dir)).unwrap();
        w.add_node(&node(2, NodeKind::File)).unwrap();
        w.add_node(&node(3, NodeKind::Symlink)).unwrap();
        let names: [&[u8]; 7] = [b"ok", b"..", b".", b"a/b", b"", b"x\0y", b"link"];
        for (seq, name) in names.iter().enumerate() {
            let ino = if *name == b"link" { 3 } else { 2 };
            w.add_dirent(1, seq as u64, name, ino).unwrap();
        }
        w.finish().unwrap();
        let m = Manifest::open(&path).unwrap();
        let listed: Vec<Vec<u8>> = m
            .readdir(1, 0, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(listed, vec![b"ok".to_vec(), b"link".to_vec()]);
        for bad in &names[1..6] {
            assert!(m.lookup(1, bad).unwrap().is_none(), "{bad:?}");
        }
        let link = m.lookup(1, b"link").unwrap().unwrap();
        assert_eq!(link.target.as_deref(), Some(&b"/etc/passwd"[..]));
    }

    /// Regression (found by `cargo fuzz run manifest`): an entry position of 2^64 - 1 (-1 in
    /// the table) overflowed when the volume made it a readdir cookie (`seq + 3`). Positions
    /// past [`MAX_DIRENT_SEQ`] make the listing fail as a damaged catalog.
    #[test]
    fn out_of_range_positions_are_invalid() {
        for seq in [MAX_DIRENT_SEQ + 1, i64::MAX as u64, u64::MAX] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("m");
            let mut w = test_writer(&path);
            w.add_node(&node(1, NodeKind::Dir)).unwrap();
            w.add_node(&node(2, NodeKind::File)).unwrap();
            w.add_dirent(1, 0, b"a", 2).unwrap();
            w.add_dirent(1, seq, b"b", 2).unwrap();
            w.finish().unwrap();
            let m = Manifest::open(&path).unwrap();
            // (-1 in the table sorts first: a listing from cookie 2^64 - 1 reaches it.)
            let from = if seq == u64::MAX { u64::MAX } else { 0 };
            assert!(
                matches!(m.readdir(1, from, 100), Err(ManifestError::Invalid { .. })),
                "{seq}"
            );
        }
    }
}

//! Building a catalog. Rows must be added in a deterministic order (the caller walks the tree in
//! name order) so the same input yields the same bytes and therefore the same manifest id.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, params};

use super::{CATALOG_VERSION, CatalogHeader, ChunkInfo, Extent, ManifestError, Node};
use crate::ids::ManifestId;

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE nodes (
    ino INTEGER PRIMARY KEY, parent INTEGER NOT NULL, kind INTEGER NOT NULL, mode INTEGER NOT NULL,
    uid INTEGER NOT NULL, gid INTEGER NOT NULL, size INTEGER NOT NULL,
    atime INTEGER NOT NULL, mtime INTEGER NOT NULL, ctime INTEGER NOT NULL,
    nlink INTEGER NOT NULL, rdev INTEGER NOT NULL, target BLOB);
CREATE TABLE dirents (parent INTEGER NOT NULL, seq INTEGER NOT NULL, name BLOB NOT NULL,
    ino INTEGER NOT NULL, PRIMARY KEY (parent, seq)) WITHOUT ROWID;
CREATE TABLE chunks (idx INTEGER PRIMARY KEY, id BLOB NOT NULL, len INTEGER NOT NULL,
    blocks BLOB NOT NULL);
CREATE TABLE extents (ino INTEGER NOT NULL, off INTEGER NOT NULL, len INTEGER NOT NULL,
    chunk INTEGER NOT NULL, chunk_off INTEGER NOT NULL, PRIMARY KEY (ino, off)) WITHOUT ROWID;
CREATE TABLE xattrs (ino INTEGER NOT NULL, name BLOB NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (ino, name)) WITHOUT ROWID;
";

/// Writes a new catalog file.
#[derive(Debug)]
pub struct ManifestWriter {
    conn: Connection,
    path: PathBuf,
}

impl ManifestWriter {
    /// Create a catalog at `path` (which must not exist).
    pub fn create(path: &Path, header: &CatalogHeader) -> Result<Self, ManifestError> {
        let err = |source| ManifestError::Sqlite {
            path: path.display().to_string(),
            source,
        };
        if path.exists() {
            return Err(ManifestError::Invalid {
                path: path.display().to_string(),
                what: "file already exists".into(),
            });
        }
        let conn = Connection::open(path).map_err(err)?;
        // A scratch file: durability comes from hashing and storing it afterwards.
        conn.execute_batch(
            "PRAGMA page_size = 4096; PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;
             PRAGMA locking_mode = EXCLUSIVE; PRAGMA cache_size = -65536;",
        )
        .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        conn.execute_batch("BEGIN").map_err(err)?;
        {
            let mut st = conn
                .prepare("INSERT INTO meta (key, value) VALUES (?1, ?2)")
                .map_err(err)?;
            for (k, v) in [
                ("format", "horcrux-catalog".to_string()),
                ("version", CATALOG_VERSION.to_string()),
                ("volume", header.volume.clone()),
                ("chunk_size", header.chunk_size.to_string()),
                ("block_size", header.block_size.to_string()),
            ] {
                st.execute(params![k, v]).map_err(err)?;
            }
        }
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, source: rusqlite::Error) -> ManifestError {
        ManifestError::Sqlite {
            path: self.path.display().to_string(),
            source,
        }
    }

    pub fn add_node(&mut self, n: &Node) -> Result<(), ManifestError> {
        self.conn
            .prepare_cached(
                "INSERT INTO nodes (ino, parent, kind, mode, uid, gid, size, atime, mtime, ctime,
                 nlink, rdev, target) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    n.ino as i64,
                    n.parent as i64,
                    n.kind as i64,
                    n.mode,
                    n.uid,
                    n.gid,
                    n.size as i64,
                    n.atime,
                    n.mtime,
                    n.ctime,
                    n.nlink,
                    n.rdev as i64,
                    n.target
                ])
            })
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Update the link count of a node (hard links are discovered during the walk).
    pub fn set_nlink(&mut self, ino: u64, nlink: u32) -> Result<(), ManifestError> {
        self.conn
            .prepare_cached("UPDATE nodes SET nlink = ?2 WHERE ino = ?1")
            .and_then(|mut st| st.execute(params![ino as i64, nlink]))
            .map(drop)
            .map_err(|e| self.err(e))
    }

    pub fn add_dirent(
        &mut self,
        parent: u64,
        seq: u64,
        name: &[u8],
        ino: u64,
    ) -> Result<(), ManifestError> {
        self.conn
            .prepare_cached("INSERT INTO dirents (parent, seq, name, ino) VALUES (?1, ?2, ?3, ?4)")
            .and_then(|mut st| st.execute(params![parent as i64, seq as i64, name, ino as i64]))
            .map(drop)
            .map_err(|e| self.err(e))
    }

    pub fn add_xattr(&mut self, ino: u64, name: &[u8], value: &[u8]) -> Result<(), ManifestError> {
        self.conn
            .prepare_cached("INSERT INTO xattrs (ino, name, value) VALUES (?1, ?2, ?3)")
            .and_then(|mut st| st.execute(params![ino as i64, name, value]))
            .map(drop)
            .map_err(|e| self.err(e))
    }

    pub fn add_chunk(&mut self, c: &ChunkInfo) -> Result<(), ManifestError> {
        let blocks: Vec<u8> = c.blocks.concat();
        self.conn
            .prepare_cached("INSERT INTO chunks (idx, id, len, blocks) VALUES (?1, ?2, ?3, ?4)")
            .and_then(|mut st| st.execute(params![c.idx as i64, &c.id.0[..], c.len as i64, blocks]))
            .map(drop)
            .map_err(|e| self.err(e))
    }

    pub fn add_extent(&mut self, e: &Extent) -> Result<(), ManifestError> {
        self.conn
            .prepare_cached(
                "INSERT INTO extents (ino, off, len, chunk, chunk_off) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    e.ino as i64,
                    e.file_off as i64,
                    e.len as i64,
                    e.chunk as i64,
                    e.chunk_off as i64
                ])
            })
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Build indexes, close the file and return its id (blake3 of the file's bytes).
    pub fn finish(self) -> Result<ManifestId, ManifestError> {
        let path = self.path.clone();
        self.conn
            .execute_batch(
                "CREATE UNIQUE INDEX dirents_by_name ON dirents (parent, name);
                 COMMIT;",
            )
            .map_err(|e| self.err(e))?;
        self.conn
            .close()
            .map_err(|(_, source)| ManifestError::Sqlite {
                path: path.display().to_string(),
                source,
            })?;
        hash_file(&path)
    }
}

/// blake3 of a file's bytes.
pub fn hash_file(path: &Path) -> Result<ManifestId, ManifestError> {
    let mut h = blake3::Hasher::new();
    h.update_mmap_rayon(path)
        .map_err(|source| ManifestError::Io {
            path: path.display().to_string(),
            source,
        })?;
    Ok(ManifestId(*h.finalize().as_bytes()))
}

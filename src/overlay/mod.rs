//! The overlay: one volume's local changes on top of an immutable base version.
//!
//! It lives in its own directory, apart from the cache (eviction never touches it):
//! - `overlay.db`: a SQLite journal (WAL) of every node, directory entry and xattr the overlay
//!   changed, and which byte ranges of base files were overwritten. Each metadata operation is
//!   one transaction, so a crash shows an operation wholly or not at all.
//! - `data/<ino>`: a sparse file per file whose content changed, as long as the file. Bytes
//!   below the node's `base_limit` come from this file where [`RangeSet`] `written` covers
//!   them and from the base otherwise; bytes at or beyond `base_limit` always come from here
//!   (holes read as zeros). So a write never fetches anything from the base.
//!
//! Invariants: `base_limit <= size` of the node; a node without a base has `base_limit` 0;
//! a data file's length is the node's size (so after a crash, the size of a file whose last
//! writes were not yet journaled is recovered from its data file).
//!
//! The in-memory [`State`] mirrors the journal and answers every lookup; mutations are lists of
//! [`Op`]s, journaled in one transaction and applied to the state only when that succeeded.
//! Data writes update the state at once and reach the journal at the next flush (`fsync`,
//! close, or the periodic flusher), like a local filesystem's commit interval.

pub mod ranges;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use rusqlite::{Connection, OptionalExtension, params};

pub use ranges::RangeSet;

use crate::manifest::{Node, NodeKind};

/// Overlay journal format version.
pub const OVERLAY_VERSION: u32 = 1;

/// Errors of the overlay's storage.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("overlay {dir}: {source}")]
    Sqlite {
        dir: String,
        source: rusqlite::Error,
    },
    #[error("overlay {dir}: {source}")]
    Io { dir: String, source: io::Error },
    #[error(
        "overlay {dir} is in use by another mount; unmount it first, or give this mount its own --overlay-dir"
    )]
    Locked { dir: String },
    #[error("overlay {dir}: {what}")]
    Invalid { dir: String, what: String },
}

impl OverlayError {
    /// The errno a filesystem operation failing with this error reports.
    pub fn errno(&self) -> i32 {
        match self {
            OverlayError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            OverlayError::Sqlite {
                source: rusqlite::Error::SqliteFailure(e, _),
                ..
            } if e.code == rusqlite::ErrorCode::DiskFull => libc::ENOSPC,
            _ => libc::EIO,
        }
    }

    /// Whether the overlay's filesystem is full (`ENOSPC`, `EDQUOT`, `SQLITE_FULL`): the
    /// operation was refused whole or in part and nothing acknowledged before is touched.
    pub fn is_disk_full(&self) -> bool {
        matches!(self.errno(), libc::ENOSPC | libc::EDQUOT)
    }

    /// The overlay directory concerned.
    pub fn dir(&self) -> &str {
        match self {
            OverlayError::Sqlite { dir, .. }
            | OverlayError::Io { dir, .. }
            | OverlayError::Locked { dir }
            | OverlayError::Invalid { dir, .. } => dir,
        }
    }
}

/// The version an overlay's changes apply to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseInfo {
    pub volume: String,
    /// Commit id (hex).
    pub commit: String,
    /// Manifest id (hex).
    pub manifest: String,
    /// Largest inode number of the base; new nodes are numbered above it.
    pub max_ino: u64,
}

/// Which bytes of a changed file live in the overlay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataState {
    /// Bytes below this come from the base unless `written` covers them.
    pub base_limit: u64,
    /// Ranges below `base_limit` the overlay owns.
    pub written: RangeSet,
}

/// A node the overlay changed or created: its full current attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ONode {
    /// `parent` is maintained for directories (their `..`).
    pub node: Node,
    /// `Some` once the content changed.
    pub data: Option<DataState>,
    /// The xattrs are the overlay's (`State::xattrs`), not the base's.
    pub own_xattrs: bool,
}

/// A directory entry of the overlay: `ino` 0 hides the base's entry of that name (whiteout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dirent {
    pub ino: u64,
    /// Stable readdir position among the overlay's entries of the directory.
    pub cookie: u64,
}

/// How an [`Op::Node`] treats the journaled `written` rows of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WrittenRows {
    Keep,
    Append(Vec<Range<u64>>),
    Replace,
}

/// One journaled change.
#[derive(Debug, Clone)]
pub enum Op {
    Node(Box<ONode>, WrittenRows),
    /// Forget the node (and its data file and xattrs).
    DropNode(u64),
    Dirent {
        parent: u64,
        name: Vec<u8>,
        entry: Option<Dirent>,
    },
    Xattrs(u64, BTreeMap<Vec<u8>, Vec<u8>>),
}

/// Everything the overlay holds, in memory.
#[derive(Debug, Default)]
pub struct State {
    pub nodes: HashMap<u64, ONode>,
    pub dirents: HashMap<u64, BTreeMap<Vec<u8>, Dirent>>,
    pub xattrs: HashMap<u64, BTreeMap<Vec<u8>, Vec<u8>>>,
    next_ino: u64,
    next_cookie: u64,
    /// Nodes whose attributes or written ranges changed since they were journaled, with the
    /// ranges not yet journaled.
    dirty: HashMap<u64, Vec<Range<u64>>>,
    /// Open handles per node: an unlinked node lives until its last handle closes.
    pub open: HashMap<u64, u32>,
}

impl State {
    pub fn alloc_ino(&mut self) -> u64 {
        let i = self.next_ino;
        self.next_ino += 1;
        i
    }

    pub fn alloc_cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie += 1;
        c
    }

    /// Record a data write's effect in memory; it is journaled at the next flush.
    pub fn note_written(&mut self, ino: u64, r: Range<u64>) {
        let pending = self.dirty.entry(ino).or_default();
        if !r.is_empty() {
            pending.push(r);
        }
    }

    pub fn is_dirty(&self, ino: u64) -> bool {
        self.dirty.contains_key(&ino)
    }

    /// Is anything changed at all?
    pub fn is_clean(&self) -> bool {
        self.nodes.is_empty() && self.dirents.is_empty() && self.xattrs.is_empty()
    }
}

/// An open overlay directory (exclusively locked while open).
#[derive(Debug)]
pub struct Overlay {
    dir: PathBuf,
    data_dir: PathBuf,
    _lock: File,
    journal: Mutex<Connection>,
    base: RwLock<Option<BaseInfo>>,
    pub state: RwLock<State>,
    files: Mutex<lru::LruCache<u64, Arc<File>>>,
    /// Data files created since the data directory was last synced.
    unsynced_dir: Mutex<HashSet<u64>>,
    /// Transactions journaled, and how many of them a synchronous commit made durable.
    journaled: std::sync::atomic::AtomicU64,
    synced: std::sync::atomic::AtomicU64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    ino INTEGER PRIMARY KEY, parent INTEGER NOT NULL, kind INTEGER NOT NULL, mode INTEGER NOT NULL,
    uid INTEGER NOT NULL, gid INTEGER NOT NULL, size INTEGER NOT NULL,
    atime INTEGER NOT NULL, mtime INTEGER NOT NULL, ctime INTEGER NOT NULL,
    nlink INTEGER NOT NULL, rdev INTEGER NOT NULL, target BLOB,
    has_data INTEGER NOT NULL, base_limit INTEGER NOT NULL, own_xattrs INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dirents (parent INTEGER NOT NULL, name BLOB NOT NULL,
    ino INTEGER NOT NULL, cookie INTEGER NOT NULL, PRIMARY KEY (parent, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS xattrs (ino INTEGER NOT NULL, name BLOB NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (ino, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS written (ino INTEGER NOT NULL, start INTEGER NOT NULL, end INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS written_by_ino ON written (ino);
";

/// Open files kept for data reads and writes.
const OPEN_FILES: usize = 256;

impl Overlay {
    /// Open (creating if needed) the overlay in `dir` and lock it for this process.
    pub fn open(dir: &Path) -> Result<Self, OverlayError> {
        let d = dir.display().to_string();
        let io_err = |source| OverlayError::Io {
            dir: d.clone(),
            source,
        };
        let data_dir = dir.join("data");
        std::fs::create_dir_all(&data_dir).map_err(io_err)?;
        // Local changes are private (they may hold anything the volume holds).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(io_err)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(OverlayError::Locked { dir: d });
        }
        let sq = |source| OverlayError::Sqlite {
            dir: d.clone(),
            source,
        };
        let conn = Connection::open(dir.join("overlay.db")).map_err(sq)?;
        // Only this process uses the journal (the flock above): exclusive locking spares the
        // file locks SQLite takes around every transaction and keeps the WAL index in memory.
        conn.execute_batch(
            "PRAGMA locking_mode = EXCLUSIVE; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;",
        )
        .map_err(sq)?;
        conn.execute_batch(SCHEMA).map_err(sq)?;
        let version: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'version'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sq)?;
        match version {
            None => {
                conn.execute(
                    "INSERT INTO meta VALUES ('format', 'horcrux-overlay'), ('version', ?1), ('syncs', '0')",
                    [OVERLAY_VERSION.to_string()],
                )
                .map_err(sq)?;
            }
            Some(v) if v == OVERLAY_VERSION.to_string() => {}
            Some(v) => {
                return Err(OverlayError::Invalid {
                    dir: d,
                    what: format!(
                        "journal version {v} is not supported (this horcrux reads {OVERLAY_VERSION})"
                    ),
                });
            }
        }
        let ov = Self {
            dir: dir.to_path_buf(),
            data_dir,
            _lock: lock,
            journal: Mutex::new(conn),
            base: RwLock::new(None),
            state: RwLock::new(State::default()),
            files: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(OPEN_FILES).expect("non-zero"),
            )),
            unsynced_dir: Mutex::new(HashSet::new()),
            journaled: Default::default(),
            synced: Default::default(),
        };
        ov.load()?;
        Ok(ov)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn sqlite_err(&self, source: rusqlite::Error) -> OverlayError {
        OverlayError::Sqlite {
            dir: self.dir.display().to_string(),
            source,
        }
    }

    fn io_err(&self, source: io::Error) -> OverlayError {
        OverlayError::Io {
            dir: self.dir.display().to_string(),
            source,
        }
    }

    /// The version these changes apply to (`None` for a new overlay).
    pub fn base(&self) -> Option<BaseInfo> {
        self.base.read().clone()
    }

    /// A commit of these changes whose branch update may or may not have happened (the daemon
    /// died in between): recorded durably before the branch moves, cleared by the rebase.
    pub fn pending_commit(&self) -> Result<Option<String>, OverlayError> {
        self.journal
            .lock()
            .query_row(
                "SELECT value FROM meta WHERE key = 'pending_commit'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.sqlite_err(e))
    }

    pub fn set_pending_commit(&self, commit: Option<&str>) -> Result<(), OverlayError> {
        let conn = self.journal.lock();
        let r = match commit {
            Some(c) => conn.execute(
                "INSERT OR REPLACE INTO meta VALUES ('pending_commit', ?1)",
                [c],
            ),
            None => conn.execute("DELETE FROM meta WHERE key = 'pending_commit'", []),
        };
        r.map_err(|e| self.sqlite_err(e))?;
        self.journaled
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        drop(conn);
        self.sync_journal()
    }

    /// Set the base version. Only a clean overlay may change base (its changes would otherwise
    /// be applied to a version they were not made on).
    pub fn set_base(&self, base: &BaseInfo) -> Result<(), OverlayError> {
        let mut cur = self.base.write();
        if cur.as_ref() == Some(base) {
            return Ok(());
        }
        if cur.is_some() && !self.state.read().is_clean() {
            return Err(OverlayError::Invalid {
                dir: self.dir.display().to_string(),
                what: "has uncommitted changes on another version".into(),
            });
        }
        let conn = self.journal.lock();
        let r = (|| {
            let tx = conn.unchecked_transaction()?;
            journal_base(&tx, base)?;
            tx.commit()
        })();
        r.map_err(|e| self.sqlite_err(e))?;
        self.journaled
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        drop(conn);
        let mut st = self.state.write();
        st.next_ino = st.next_ino.max(base.max_ino + 1);
        *cur = Some(base.clone());
        Ok(())
    }

    fn load(&self) -> Result<(), OverlayError> {
        let conn = self.journal.lock();
        let mut st = self.state.write();
        let r: rusqlite::Result<()> = (|| {
            let meta: HashMap<String, String> = conn
                .prepare("SELECT key, value FROM meta")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            if let (Some(v), Some(c), Some(m), Some(x)) = (
                meta.get("volume"),
                meta.get("base_commit"),
                meta.get("base_manifest"),
                meta.get("base_max_ino"),
            ) {
                *self.base.write() = Some(BaseInfo {
                    volume: v.clone(),
                    commit: c.clone(),
                    manifest: m.clone(),
                    max_ino: x.parse().unwrap_or(0),
                });
            }
            let mut q = conn.prepare(
                "SELECT ino, parent, kind, mode, uid, gid, size, atime, mtime, ctime, nlink, rdev,
                        target, has_data, base_limit, own_xattrs FROM nodes",
            )?;
            let rows = q.query_map([], |r| {
                let kind: i64 = r.get(2)?;
                Ok(ONode {
                    node: Node {
                        ino: r.get::<_, i64>(0)? as u64,
                        parent: r.get::<_, i64>(1)? as u64,
                        kind: NodeKind::from_code(kind).unwrap_or(NodeKind::File),
                        mode: r.get(3)?,
                        uid: r.get(4)?,
                        gid: r.get(5)?,
                        size: r.get::<_, i64>(6)? as u64,
                        atime: r.get(7)?,
                        mtime: r.get(8)?,
                        ctime: r.get(9)?,
                        nlink: r.get(10)?,
                        rdev: r.get::<_, i64>(11)? as u64,
                        target: r.get(12)?,
                    },
                    data: r.get::<_, bool>(13)?.then(|| DataState {
                        base_limit: r.get::<_, i64>(14).unwrap_or(0) as u64,
                        written: RangeSet::new(),
                    }),
                    own_xattrs: r.get(15)?,
                })
            })?;
            for n in rows {
                let n = n?;
                st.nodes.insert(n.node.ino, n);
            }
            let mut q = conn.prepare("SELECT ino, start, end FROM written")?;
            let rows = q.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                ))
            })?;
            for row in rows {
                let (ino, s, e) = row?;
                if let Some(d) = st.nodes.get_mut(&ino).and_then(|n| n.data.as_mut()) {
                    d.written.insert(s..e);
                }
            }
            let mut q = conn.prepare("SELECT parent, name, ino, cookie FROM dirents")?;
            let rows = q.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, Vec<u8>>(1)?,
                    Dirent {
                        ino: r.get::<_, i64>(2)? as u64,
                        cookie: r.get::<_, i64>(3)? as u64,
                    },
                ))
            })?;
            for row in rows {
                let (p, name, e) = row?;
                st.next_cookie = st.next_cookie.max(e.cookie + 1);
                st.dirents.entry(p).or_default().insert(name, e);
            }
            let mut q = conn.prepare("SELECT ino, name, value FROM xattrs")?;
            let rows = q.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })?;
            for row in rows {
                let (ino, n, v) = row?;
                st.xattrs.entry(ino).or_default().insert(n, v);
            }
            Ok(())
        })();
        r.map_err(|e| self.sqlite_err(e))?;
        let max_ino = self.base.read().as_ref().map_or(0, |b| b.max_ino);
        let top = st.nodes.keys().copied().max().unwrap_or(0);
        st.next_ino = (max_ino + 1).max(top + 1);
        drop(conn);
        // Crash recovery: a file's size is its data file's length (writes extend the data
        // file before the journal hears of them), and unlinked nodes whose last user died
        // with the daemon are dropped.
        let mut drops = Vec::new();
        for n in st.nodes.values_mut() {
            if n.node.nlink == 0 {
                drops.push(n.node.ino);
                continue;
            }
            if n.data.is_some() {
                match std::fs::metadata(self.data_path(n.node.ino)) {
                    Ok(m) => n.node.size = m.len(),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        // Created but never written before a crash: empty.
                        n.node.size = n.data.as_ref().map_or(0, |d| d.base_limit);
                    }
                    Err(e) => return Err(self.io_err(e)),
                }
            }
        }
        for ino in drops {
            let is_base = ino <= max_ino;
            let mut n = st.nodes[&ino].clone();
            if is_base {
                // Keep a base node's tombstone; its content no longer matters.
                n.data = None;
                self.apply(&mut st, vec![Op::Node(Box::new(n), WrittenRows::Replace)])?;
            } else {
                self.apply(&mut st, vec![Op::DropNode(ino)])?;
            }
        }
        Ok(())
    }

    /// Journal `ops` in one transaction, then apply them to `state`.
    pub fn apply(&self, state: &mut State, ops: Vec<Op>) -> Result<(), OverlayError> {
        if ops.is_empty() {
            return Ok(());
        }
        {
            let conn = self.journal.lock();
            let r = (|| {
                let tx = conn.unchecked_transaction()?;
                for op in &ops {
                    journal_op(&tx, op)?;
                }
                tx.commit()
            })();
            r.map_err(|e| self.sqlite_err(e))?;
            self.journaled
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        for op in ops {
            match op {
                Op::Node(n, rows) => {
                    // The node's attributes are journaled now; ranges only if the op said so.
                    let ino = n.node.ino;
                    let keep = rows == WrittenRows::Keep
                        && state.dirty.get(&ino).is_some_and(|p| !p.is_empty());
                    if !keep {
                        state.dirty.remove(&ino);
                    }
                    // Content given back to the base (a tombstone): its data file goes.
                    if n.data.is_none() && state.nodes.get(&ino).is_some_and(|o| o.data.is_some()) {
                        self.remove_data(ino);
                    }
                    state.nodes.insert(ino, *n);
                }
                Op::DropNode(ino) => {
                    state.nodes.remove(&ino);
                    state.xattrs.remove(&ino);
                    state.dirty.remove(&ino);
                    self.remove_data(ino);
                }
                Op::Dirent {
                    parent,
                    name,
                    entry,
                } => match entry {
                    Some(e) => {
                        state.dirents.entry(parent).or_default().insert(name, e);
                    }
                    None => {
                        if let Some(m) = state.dirents.get_mut(&parent) {
                            m.remove(&name);
                            if m.is_empty() {
                                state.dirents.remove(&parent);
                            }
                        }
                    }
                },
                Op::Xattrs(ino, x) => {
                    if x.is_empty() {
                        state.xattrs.remove(&ino);
                    } else {
                        state.xattrs.insert(ino, x);
                    }
                }
            }
        }
        Ok(())
    }

    /// Journal the in-memory changes of `ino` made by data writes (size, times, ranges).
    pub fn flush(&self, ino: u64) -> Result<(), OverlayError> {
        let mut st = self.state.write();
        self.flush_locked(&mut st, ino)
    }

    fn flush_locked(&self, st: &mut State, ino: u64) -> Result<(), OverlayError> {
        let Some(pending) = st.dirty.get(&ino).cloned() else {
            return Ok(());
        };
        let Some(n) = st.nodes.get(&ino).cloned() else {
            st.dirty.remove(&ino);
            return Ok(());
        };
        self.apply(
            st,
            vec![Op::Node(Box::new(n), WrittenRows::Append(pending))],
        )
    }

    /// Journal every node's pending changes.
    pub fn flush_all(&self) -> Result<(), OverlayError> {
        let mut st = self.state.write();
        let inos: Vec<u64> = st.dirty.keys().copied().collect();
        for ino in inos {
            self.flush_locked(&mut st, ino)?;
        }
        Ok(())
    }

    /// Make everything journaled so far durable (survives power loss, not only a crash):
    /// one transaction with a synchronous commit writes the WAL out to disk.
    /// Nothing journaled since the last durable commit: no disk sync is needed.
    pub fn sync_journal(&self) -> Result<(), OverlayError> {
        use std::sync::atomic::Ordering::SeqCst;
        let dirs: Vec<u64> = self.unsynced_dir.lock().drain().collect();
        if !dirs.is_empty() {
            crate::util::sync_dir(&self.data_dir).map_err(|e| self.io_err(e))?;
        }
        // Both counters change only under the journal lock.
        let conn = self.journal.lock();
        if self.synced.load(SeqCst) == self.journaled.load(SeqCst) {
            return Ok(());
        }
        conn.execute_batch(
            "PRAGMA synchronous = FULL;
             UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'syncs';
             PRAGMA synchronous = NORMAL;",
        )
        .map_err(|e| self.sqlite_err(e))?;
        let n = self.journaled.fetch_add(1, SeqCst) + 1;
        self.synced.store(n, SeqCst);
        Ok(())
    }

    pub fn data_path(&self, ino: u64) -> PathBuf {
        self.data_dir.join(ino.to_string())
    }

    /// The data file of `ino`, created with length `size` if missing.
    pub fn data_file(&self, ino: u64, size: u64) -> Result<Arc<File>, OverlayError> {
        if let Some(f) = self.files.lock().get(&ino) {
            return Ok(f.clone());
        }
        let path = self.data_path(ino);
        let f = match File::options().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let f = File::options()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(|e| self.io_err(e))?;
                f.set_len(size).map_err(|e| self.io_err(e))?;
                self.unsynced_dir.lock().insert(ino);
                f
            }
            Err(e) => return Err(self.io_err(e)),
        };
        let f = Arc::new(f);
        self.files.lock().put(ino, f.clone());
        Ok(f)
    }

    fn remove_data(&self, ino: u64) {
        self.files.lock().pop(&ino);
        match std::fs::remove_file(self.data_path(ino)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(ino, error = %e, "could not remove an overlay data file"),
        }
    }

    /// Bytes the overlay occupies on disk (data files as allocated, plus the journal).
    pub fn disk_usage(&self) -> u64 {
        self.usage().0
    }

    /// Bytes on disk (as [`Self::disk_usage`]) and the number of data files (changed or new
    /// files with content of their own). One directory listing and a `stat` per file.
    pub fn usage(&self) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let (mut total, mut files) = (0, 0);
        for dir in [&self.dir, &self.data_dir] {
            if let Ok(rd) = std::fs::read_dir(dir) {
                for e in rd.flatten() {
                    if let Ok(m) = e.metadata() {
                        if m.is_file() {
                            total += m.blocks() * 512;
                            if *dir == self.data_dir {
                                files += 1;
                            }
                        }
                    }
                }
            }
        }
        (total, files)
    }

    /// Drop every node, entry and data file from memory and disk, once the journal has.
    fn forget_all(&self, st: &mut State) {
        let inos: Vec<u64> = st.nodes.keys().copied().collect();
        for ino in inos {
            self.remove_data(ino);
        }
        st.nodes.clear();
        st.dirents.clear();
        st.xattrs.clear();
        st.dirty.clear();
    }

    /// Throw away every change (the caller made sure nothing uses the overlay's nodes).
    pub fn clear(&self) -> Result<(), OverlayError> {
        let mut st = self.state.write();
        let conn = self.journal.lock();
        conn.execute_batch(
            "BEGIN; DELETE FROM nodes; DELETE FROM dirents; DELETE FROM xattrs; DELETE FROM written; COMMIT;",
        )
        .map_err(|e| self.sqlite_err(e))?;
        self.journaled
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        drop(conn);
        self.forget_all(&mut st);
        Ok(())
    }

    /// The changes were committed as `base`: it becomes the base of a clean overlay, in one
    /// transaction (a crash leaves either the old base with the changes or the new one without).
    pub fn rebase_locked(&self, st: &mut State, base: &BaseInfo) -> Result<(), OverlayError> {
        let conn = self.journal.lock();
        let r = (|| {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(
                "DELETE FROM nodes; DELETE FROM dirents; DELETE FROM xattrs; DELETE FROM written;
                 DELETE FROM meta WHERE key = 'pending_commit';",
            )?;
            journal_base(&tx, base)?;
            tx.commit()
        })();
        r.map_err(|e| self.sqlite_err(e))?;
        self.journaled
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        drop(conn);
        self.forget_all(st);
        st.next_ino = st.next_ino.max(base.max_ino + 1);
        *self.base.write() = Some(base.clone());
        Ok(())
    }

    /// Filesystem totals of the overlay's disk: `(total, free, avail)` bytes and
    /// `(files, ffree)`.
    pub fn disk_space(&self) -> Result<(u64, u64, u64, u64, u64), OverlayError> {
        let c = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes())
            .map_err(|_| self.io_err(io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: statvfs writes into the zeroed struct we pass; the path is NUL-terminated.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
            return Err(self.io_err(io::Error::last_os_error()));
        }
        let f = s.f_frsize as u64;
        Ok((
            s.f_blocks as u64 * f,
            s.f_bfree as u64 * f,
            s.f_bavail as u64 * f,
            s.f_files as u64,
            s.f_ffree as u64,
        ))
    }
}

fn journal_base(tx: &rusqlite::Transaction<'_>, base: &BaseInfo) -> rusqlite::Result<()> {
    for (k, v) in [
        ("volume", base.volume.clone()),
        ("base_commit", base.commit.clone()),
        ("base_manifest", base.manifest.clone()),
        ("base_max_ino", base.max_ino.to_string()),
    ] {
        tx.execute("INSERT OR REPLACE INTO meta VALUES (?1, ?2)", params![k, v])?;
    }
    Ok(())
}

fn journal_op(tx: &rusqlite::Transaction<'_>, op: &Op) -> rusqlite::Result<()> {
    match op {
        Op::Node(n, rows) => {
            let o = &n.node;
            tx.prepare_cached(
                "INSERT OR REPLACE INTO nodes VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )?
            .execute(params![
                o.ino as i64,
                o.parent as i64,
                o.kind as i64,
                o.mode,
                o.uid,
                o.gid,
                o.size as i64,
                o.atime,
                o.mtime,
                o.ctime,
                o.nlink,
                o.rdev as i64,
                o.target,
                n.data.is_some(),
                n.data.as_ref().map_or(0, |d| d.base_limit as i64),
                n.own_xattrs,
            ])?;
            let mut ins =
                tx.prepare_cached("INSERT INTO written (ino, start, end) VALUES (?1, ?2, ?3)")?;
            match rows {
                WrittenRows::Keep => {}
                WrittenRows::Append(rs) => {
                    for r in rs {
                        ins.execute(params![o.ino as i64, r.start as i64, r.end as i64])?;
                    }
                }
                WrittenRows::Replace => {
                    tx.prepare_cached("DELETE FROM written WHERE ino = ?1")?
                        .execute([o.ino as i64])?;
                    if let Some(d) = &n.data {
                        for r in d.written.iter() {
                            ins.execute(params![o.ino as i64, r.start as i64, r.end as i64])?;
                        }
                    }
                }
            }
        }
        Op::DropNode(ino) => {
            for sql in [
                "DELETE FROM nodes WHERE ino = ?1",
                "DELETE FROM written WHERE ino = ?1",
                "DELETE FROM xattrs WHERE ino = ?1",
            ] {
                tx.prepare_cached(sql)?.execute([*ino as i64])?;
            }
        }
        Op::Dirent {
            parent,
            name,
            entry,
        } => match entry {
            Some(e) => {
                tx.prepare_cached("INSERT OR REPLACE INTO dirents VALUES (?1, ?2, ?3, ?4)")?
                    .execute(params![*parent as i64, name, e.ino as i64, e.cookie as i64])?;
            }
            None => {
                tx.prepare_cached("DELETE FROM dirents WHERE parent = ?1 AND name = ?2")?
                    .execute(params![*parent as i64, name])?;
            }
        },
        Op::Xattrs(ino, x) => {
            tx.prepare_cached("DELETE FROM xattrs WHERE ino = ?1")?
                .execute([*ino as i64])?;
            let mut ins = tx.prepare_cached("INSERT INTO xattrs VALUES (?1, ?2, ?3)")?;
            for (k, v) in x {
                ins.execute(params![*ino as i64, k, v])?;
            }
        }
    }
    Ok(())
}

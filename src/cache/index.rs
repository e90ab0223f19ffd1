//! The cache index database: schema version table, migrations, WAL, busy timeout.

use std::path::Path;

use rusqlite::Connection;

use super::CacheError;

/// Current schema version of `index.sqlite`.
pub const SCHEMA_VERSION: i64 = 2;

const MIGRATIONS: &[&str] = &[
    // 0 -> 1
    "CREATE TABLE chunks (
        id BLOB PRIMARY KEY, generation INTEGER NOT NULL, len INTEGER NOT NULL,
        block_size INTEGER NOT NULL, blocks BLOB NOT NULL, present BLOB NOT NULL,
        bytes INTEGER NOT NULL, last_access INTEGER NOT NULL);
     CREATE INDEX chunks_by_access ON chunks (last_access);
     CREATE TABLE manifests (id BLOB PRIMARY KEY, size INTEGER NOT NULL, last_access INTEGER NOT NULL);",
    // 1 -> 2: persistent per-volume pins (a chunk or manifest id an owner — a volume, as
    // `<volume>@<access>` — must keep: eviction and prune skip it) and the prefetch request of
    // each owner, so a restarted mount daemon resumes it.
    "CREATE TABLE pins (owner TEXT NOT NULL, kind INTEGER NOT NULL, id BLOB NOT NULL,
        PRIMARY KEY (owner, kind, id));
     CREATE INDEX pins_by_id ON pins (id);
     CREATE TABLE prefetch_jobs (owner TEXT PRIMARY KEY, volume TEXT NOT NULL,
        access TEXT NOT NULL, commit_id TEXT NOT NULL, manifest BLOB NOT NULL,
        scope TEXT NOT NULL, bandwidth INTEGER, concurrency INTEGER NOT NULL,
        state TEXT NOT NULL, updated INTEGER NOT NULL);",
];

/// File name of the index inside the cache directory.
pub const INDEX_FILE: &str = "index.sqlite";

/// Open (creating and migrating if needed) the index of the cache at `dir`.
pub fn open(dir: &Path) -> Result<Connection, CacheError> {
    open_at(dir, &dir.join(INDEX_FILE))
}

/// Open the index database at `path`, belonging to the cache at `dir` (for error messages).
pub fn open_at(dir: &Path, path: &Path) -> Result<Connection, CacheError> {
    let d = dir.display().to_string();
    let err = |source| CacheError::Sqlite {
        dir: d.clone(),
        source,
    };
    let conn = Connection::open(path).map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))
        .map_err(err)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;
         CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);",
    )
    .map_err(err)?;
    let version = |conn: &Connection| -> Result<i64, CacheError> {
        conn.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_version",
            [],
            |r| r.get(0),
        )
        .map_err(|source| CacheError::Sqlite {
            dir: d.clone(),
            source,
        })
    };
    let current = version(&conn)?;
    if current > SCHEMA_VERSION {
        return Err(CacheError::Schema {
            dir: d,
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    if current == SCHEMA_VERSION {
        // Opening an up-to-date cache writes nothing: concurrent users are not disturbed.
        return Ok(conn);
    }
    // Migrate under a write lock, re-reading the version inside it: several processes may
    // open a fresh cache at the same moment.
    conn.execute_batch("BEGIN IMMEDIATE").map_err(err)?;
    let result = (|| {
        let current = version(&conn)?;
        for m in MIGRATIONS.iter().skip(current as usize) {
            conn.execute_batch(m).map_err(err)?;
        }
        conn.execute("DELETE FROM schema_version", [])
            .map_err(err)?;
        conn.execute("INSERT INTO schema_version VALUES (?1)", [SCHEMA_VERSION])
            .map_err(err)?;
        Ok(())
    })();
    match result {
        Ok(()) => conn.execute_batch("COMMIT").map_err(err)?,
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e);
        }
    }
    Ok(conn)
}

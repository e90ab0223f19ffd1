//! The persisted volume registry of the driver: `<state>/plugin.db` (SQLite, WAL).
//!
//! It holds what Docker must never forget across a restart of the plugin or of the machine:
//! every volume created through the driver (its name, its `-o` options, its creation time) and
//! who has it mounted (`mounts`: one row per Docker mount ID with a count, because the engine
//! mounts the same ID more than once, e.g. for `docker cp`).
//!
//! No credentials are stored: options are a fixed set (`access`, `name`, `ref`, `read-only`,
//! `cache-size`) and `Create` refuses an access URL that carries a password or a secret
//! (credentials come from ssh keys and agents, or the AWS credential chain, at mount time).

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

/// Version of the registry's schema (the `meta` table's `version`).
pub const REGISTRY_VERSION: u32 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS volumes (
    name TEXT PRIMARY KEY,
    options TEXT NOT NULL,
    created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS mounts (
    volume TEXT NOT NULL REFERENCES volumes(name),
    id TEXT NOT NULL,
    count INTEGER NOT NULL CHECK (count > 0),
    PRIMARY KEY (volume, id)) WITHOUT ROWID;
";

/// A registry error, as a message for the user.
#[derive(Debug, thiserror::Error)]
#[error("volume registry {path}: {source}")]
pub struct RegistryError {
    path: String,
    #[source]
    source: rusqlite::Error,
}

/// One volume as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    /// The Docker volume name.
    pub name: String,
    /// The `-o` options as given at creation (re-parsed on each use).
    pub options: BTreeMap<String, String>,
    /// Seconds since the epoch.
    pub created_at: i64,
    /// Mount ID → count.
    pub mounts: BTreeMap<String, u64>,
}

impl VolumeRecord {
    /// How many users have it mounted (the sum over mount IDs).
    pub fn mount_count(&self) -> u64 {
        self.mounts.values().sum()
    }
}

/// The open registry. Not `Sync`: the driver keeps it behind a mutex.
#[derive(Debug)]
pub struct Registry {
    conn: Connection,
    path: String,
}

impl Registry {
    /// Open (creating if needed) `<state_dir>/plugin.db` for reading and writing.
    pub fn open(state_dir: &Path) -> Result<Self, RegistryError> {
        let file = state_dir.join("plugin.db");
        let path = file.display().to_string();
        let err = |source| RegistryError {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&file).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        let version: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'version'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(err)?;
        match version {
            None => {
                conn.execute(
                    "INSERT INTO meta VALUES ('version', ?1)",
                    [REGISTRY_VERSION.to_string()],
                )
                .map_err(err)?;
            }
            Some(v) if v == REGISTRY_VERSION.to_string() => {}
            Some(v) => {
                return Err(RegistryError {
                    path,
                    source: rusqlite::Error::InvalidParameterName(format!(
                        "schema version {v} is not supported (this horcrux reads {REGISTRY_VERSION})"
                    )),
                });
            }
        }
        Ok(Self { conn, path })
    }

    /// Open an existing registry for lookups only (the CLI finding a volume by name); `None`
    /// when there is no registry there.
    pub fn open_read_only(state_dir: &Path) -> Result<Option<Self>, RegistryError> {
        let file = state_dir.join("plugin.db");
        if !file.exists() {
            return Ok(None);
        }
        let path = file.display().to_string();
        let conn = Connection::open_with_flags(&file, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| {
                c.busy_timeout(std::time::Duration::from_secs(10))?;
                Ok(c)
            })
            .map_err(|source| RegistryError {
                path: path.clone(),
                source,
            })?;
        Ok(Some(Self { conn, path }))
    }

    fn err(&self, source: rusqlite::Error) -> RegistryError {
        RegistryError {
            path: self.path.clone(),
            source,
        }
    }

    /// Record a new volume.
    pub fn insert(
        &self,
        name: &str,
        options: &BTreeMap<String, String>,
        created_at: i64,
    ) -> Result<(), RegistryError> {
        let json = serde_json::to_string(options).expect("a map of strings serializes");
        self.conn
            .execute(
                "INSERT INTO volumes (name, options, created_at) VALUES (?1, ?2, ?3)",
                params![name, json, created_at],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Set option `key` of a volume (any `-`/`--` spelling of it is replaced): how
    /// `horcrux checkout VOLUME` makes the next mount show the version it switched to.
    /// False when the volume is not known.
    pub fn set_option(&self, name: &str, key: &str, value: &str) -> Result<bool, RegistryError> {
        let Some(rec) = self.get(name)? else {
            return Ok(false);
        };
        let mut options = rec.options;
        options.retain(|k, _| k.trim_start_matches('-') != key);
        options.insert(key.to_string(), value.to_string());
        let json = serde_json::to_string(&options).expect("a map of strings serializes");
        let n = self
            .conn
            .execute(
                "UPDATE volumes SET options = ?2 WHERE name = ?1",
                params![name, json],
            )
            .map_err(|e| self.err(e))?;
        Ok(n == 1)
    }

    /// Forget a volume (and any mount rows it still has).
    pub fn delete(&mut self, name: &str) -> Result<(), RegistryError> {
        let tx = self.conn.transaction().map_err(|e| RegistryError {
            path: self.path.clone(),
            source: e,
        })?;
        let r = tx
            .execute("DELETE FROM mounts WHERE volume = ?1", [name])
            .and_then(|_| tx.execute("DELETE FROM volumes WHERE name = ?1", [name]))
            .and_then(|_| tx.commit());
        r.map_err(|e| self.err(e))
    }

    /// One volume, with its mounts.
    pub fn get(&self, name: &str) -> Result<Option<VolumeRecord>, RegistryError> {
        let row: Option<(String, i64)> = self
            .conn
            .query_row(
                "SELECT options, created_at FROM volumes WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some((options, created_at)) = row else {
            return Ok(None);
        };
        Ok(Some(VolumeRecord {
            name: name.to_string(),
            options: serde_json::from_str(&options).unwrap_or_default(),
            created_at,
            mounts: self.mounts_of(name)?,
        }))
    }

    fn mounts_of(&self, name: &str) -> Result<BTreeMap<String, u64>, RegistryError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT id, count FROM mounts WHERE volume = ?1")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([name], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })
            .map_err(|e| self.err(e))?;
        let mut out = BTreeMap::new();
        for r in rows {
            let (id, n) = r.map_err(|e| self.err(e))?;
            out.insert(id, n.max(0) as u64);
        }
        Ok(out)
    }

    /// Every volume, by name.
    pub fn list(&self) -> Result<Vec<VolumeRecord>, RegistryError> {
        let names: Vec<String> = {
            let mut st = self
                .conn
                .prepare("SELECT name FROM volumes ORDER BY name")
                .map_err(|e| self.err(e))?;
            let rows = st.query_map([], |r| r.get(0)).map_err(|e| self.err(e))?;
            rows.collect::<Result<_, _>>().map_err(|e| self.err(e))?
        };
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            if let Some(v) = self.get(&n)? {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// Add one to the count of mount `id` of `volume`.
    pub fn add_mount(&self, volume: &str, id: &str) -> Result<(), RegistryError> {
        self.conn
            .execute(
                "INSERT INTO mounts (volume, id, count) VALUES (?1, ?2, 1)
                 ON CONFLICT (volume, id) DO UPDATE SET count = count + 1",
                params![volume, id],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Take one from the count of mount `id` of `volume` (the row goes at zero). Returns
    /// whether there was such a mount.
    pub fn drop_mount(&mut self, volume: &str, id: &str) -> Result<bool, RegistryError> {
        let tx = self.conn.transaction().map_err(|e| RegistryError {
            path: self.path.clone(),
            source: e,
        })?;
        let r = (|| {
            let n = tx.execute(
                "UPDATE mounts SET count = count - 1 WHERE volume = ?1 AND id = ?2 AND count > 1",
                params![volume, id],
            )?;
            let n = if n == 0 {
                tx.execute(
                    "DELETE FROM mounts WHERE volume = ?1 AND id = ?2",
                    params![volume, id],
                )?
            } else {
                n
            };
            tx.commit()?;
            Ok(n > 0)
        })();
        r.map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_and_counts_persist() {
        let d = tempfile::tempdir().unwrap();
        let mut opts = BTreeMap::new();
        opts.insert("access".to_string(), "file:///r".to_string());
        {
            let mut r = Registry::open(d.path()).unwrap();
            r.insert("v1", &opts, 1_700_000_000).unwrap();
            assert!(r.insert("v1", &opts, 1).is_err());
            r.add_mount("v1", "a").unwrap();
            r.add_mount("v1", "a").unwrap();
            r.add_mount("v1", "b").unwrap();
            assert!(r.drop_mount("v1", "b").unwrap());
            assert!(!r.drop_mount("v1", "b").unwrap());
            r.insert("v2", &BTreeMap::new(), 5).unwrap();
            r.delete("v2").unwrap();
        }
        let mut r = Registry::open(d.path()).unwrap();
        let v = r.get("v1").unwrap().unwrap();
        assert_eq!(v.options, opts);
        assert_eq!(v.created_at, 1_700_000_000);
        assert_eq!(v.mount_count(), 2);
        assert_eq!(r.list().unwrap().len(), 1);
        assert!(r.get("v2").unwrap().is_none());
        assert!(r.drop_mount("v1", "a").unwrap());
        assert!(r.drop_mount("v1", "a").unwrap());
        assert_eq!(r.get("v1").unwrap().unwrap().mount_count(), 0);
        let mut spelled = opts.clone();
        spelled.insert("--ref".into(), "main".into());
        r.insert("v3", &spelled, 1).unwrap();
        assert!(r.set_option("v3", "ref", "abc").unwrap());
        let o = r.get("v3").unwrap().unwrap().options;
        assert_eq!(
            (o.get("ref"), o.get("--ref")),
            (Some(&"abc".to_string()), None)
        );
        assert!(!r.set_option("nope", "ref", "x").unwrap());
        r.delete("v3").unwrap();
        let ro = Registry::open_read_only(d.path()).unwrap().unwrap();
        assert!(ro.get("v1").unwrap().is_some());
        assert!(
            Registry::open_read_only(&d.path().join("none"))
                .unwrap()
                .is_none()
        );
    }
}

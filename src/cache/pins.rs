//! Persistent pins and prefetch records (`pins` and `prefetch_jobs` of the index).
//!
//! A pin names an owner — a volume as `<volume>@<access>`, see [`volume_owner`] — and a chunk
//! or manifest id that eviction and `prune` must keep. Pins outlive processes: a volume whose
//! data was prefetched keeps working with its source gone, however full the cache gets, until
//! `horcrux cache unpin` drops them. Unlike the in-memory pins of open files, a persistent pin
//! says nothing about which blocks are present; the prefetch that made it fetches them.

use rusqlite::{OptionalExtension, params};

use super::{Bitmap, Cache, CacheError, now_secs, present_bytes};
use crate::hashtree::block_count;
use crate::ids::{ChunkId, ManifestId};

const KIND_CHUNK: i64 = 0;
const KIND_MANIFEST: i64 = 1;

/// The owner name of a volume's pins and prefetch record: the volume and the access URL(s) it
/// is mounted from, as given (relative `file://` paths made absolute by the caller).
pub fn volume_owner(volume: &str, access: &str) -> String {
    format!("{volume}@{access}")
}

/// What one owner holds pinned (`horcrux cache pins`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PinSummary {
    pub owner: String,
    pub chunks: u64,
    pub manifests: u64,
    /// Bytes of the pinned chunks the cache holds, and their full length.
    pub bytes_present: u64,
    pub bytes_total: u64,
}

/// A persisted prefetch request: enough to resume it after a restart, and to mount the
/// volume it hydrated without its source (the commit and manifest it was made on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefetchRecord {
    pub owner: String,
    pub volume: String,
    pub access: String,
    /// Hex id of the commit the volume sat on when the request was made (or last resumed).
    pub commit: String,
    pub manifest: ManifestId,
    /// What to hydrate, encoded by the caller (see `prefetch::Scope`).
    pub scope: String,
    /// Bytes per second; `None` = unbounded.
    pub bandwidth: Option<u64>,
    pub concurrency: u32,
    /// `active` (to be resumed), `done`, or `cancelled`.
    pub state: String,
    pub updated: i64,
}

impl Cache {
    /// Pin `chunks` and `manifest` for `owner`, durably (one transaction).
    pub fn pin_for_owner(
        &self,
        owner: &str,
        chunks: &[ChunkId],
        manifest: Option<&ManifestId>,
    ) -> Result<(), CacheError> {
        let mut db = self.db.lock();
        let tx = db
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| self.sql(e))?;
        {
            let mut st = tx
                .prepare_cached("INSERT OR IGNORE INTO pins (owner, kind, id) VALUES (?1, ?2, ?3)")
                .map_err(|e| self.sql(e))?;
            for c in chunks {
                st.execute(params![owner, KIND_CHUNK, &c.0[..]])
                    .map_err(|e| self.sql(e))?;
            }
            if let Some(m) = manifest {
                st.execute(params![owner, KIND_MANIFEST, &m.0[..]])
                    .map_err(|e| self.sql(e))?;
            }
        }
        tx.commit().map_err(|e| self.sql(e))
    }

    /// Drop every pin of `owner` (and its prefetch record). Returns the pins removed.
    pub fn unpin_owner(&self, owner: &str) -> Result<u64, CacheError> {
        let db = self.db.lock();
        let n = db
            .execute("DELETE FROM pins WHERE owner = ?1", [owner])
            .map_err(|e| self.sql(e))?;
        db.execute("DELETE FROM prefetch_jobs WHERE owner = ?1", [owner])
            .map_err(|e| self.sql(e))?;
        Ok(n as u64)
    }

    /// Is chunk `id` pinned by some owner?
    pub fn pinned_persistently(&self, id: &ChunkId) -> Result<bool, CacheError> {
        self.db
            .lock()
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM pins WHERE kind = ?1 AND id = ?2)",
                params![KIND_CHUNK, &id.0[..]],
                |r| r.get(0),
            )
            .map_err(|e| self.sql(e))
    }

    /// Every owner with pins, by name.
    pub fn pin_summaries(&self) -> Result<Vec<PinSummary>, CacheError> {
        let db = self.db.lock();
        let mut st = db
            .prepare(
                "SELECT p.owner, p.kind, c.len, c.block_size, c.present
                 FROM pins p LEFT JOIN chunks c ON p.kind = 0 AND c.id = p.id
                 ORDER BY p.owner",
            )
            .map_err(|e| self.sql(e))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, Option<u32>>(3)?,
                    r.get::<_, Option<Vec<u8>>>(4)?,
                ))
            })
            .map_err(|e| self.sql(e))?;
        let mut out: Vec<PinSummary> = Vec::new();
        for row in rows {
            let (owner, kind, len, bs, present) = row.map_err(|e| self.sql(e))?;
            if out.last().is_none_or(|s| s.owner != owner) {
                out.push(PinSummary {
                    owner: owner.clone(),
                    ..Default::default()
                });
            }
            let s = out.last_mut().expect("pushed");
            if kind == KIND_MANIFEST {
                s.manifests += 1;
                continue;
            }
            s.chunks += 1;
            // A pinned chunk not (yet) in the cache has no row: its length is unknown here.
            if let (Some(len), Some(bs), Some(p)) = (len, bs, present) {
                let len = len as u64;
                s.bytes_total += len;
                if let Some(b) = Bitmap::from_bytes(p, block_count(len, bs)) {
                    s.bytes_present += present_bytes(&b, len, bs);
                }
            }
        }
        Ok(out)
    }

    /// Record (or replace) the prefetch request of `r.owner`.
    pub fn save_prefetch(&self, r: &PrefetchRecord) -> Result<(), CacheError> {
        self.db
            .lock()
            .execute(
                "INSERT OR REPLACE INTO prefetch_jobs (owner, volume, access, commit_id, manifest,
                   scope, bandwidth, concurrency, state, updated)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    r.owner,
                    r.volume,
                    r.access,
                    r.commit,
                    &r.manifest.0[..],
                    r.scope,
                    r.bandwidth.map(|b| b as i64),
                    r.concurrency,
                    r.state,
                    now_secs()
                ],
            )
            .map(drop)
            .map_err(|e| self.sql(e))
    }

    /// Set the state of `owner`'s prefetch request (`done`, `cancelled`, `active`).
    pub fn set_prefetch_state(&self, owner: &str, state: &str) -> Result<(), CacheError> {
        self.db
            .lock()
            .execute(
                "UPDATE prefetch_jobs SET state = ?2, updated = ?3 WHERE owner = ?1",
                params![owner, state, now_secs()],
            )
            .map(drop)
            .map_err(|e| self.sql(e))
    }

    /// The prefetch request of `owner`, if any.
    pub fn prefetch_record(&self, owner: &str) -> Result<Option<PrefetchRecord>, CacheError> {
        Ok(self
            .prefetch_records("WHERE owner = ?1", owner)?
            .into_iter()
            .next())
    }

    /// Prefetch requests made for volumes mounted from `access`.
    pub fn prefetch_records_for(&self, access: &str) -> Result<Vec<PrefetchRecord>, CacheError> {
        self.prefetch_records("WHERE access = ?1", access)
    }

    fn prefetch_records(&self, cond: &str, arg: &str) -> Result<Vec<PrefetchRecord>, CacheError> {
        let db = self.db.lock();
        let mut st = db
            .prepare(&format!(
                "SELECT owner, volume, access, commit_id, manifest, scope, bandwidth, concurrency,
                   state, updated FROM prefetch_jobs {cond} ORDER BY owner"
            ))
            .map_err(|e| self.sql(e))?;
        let rows = st
            .query_map([arg], |r| {
                Ok((
                    PrefetchRecord {
                        owner: r.get(0)?,
                        volume: r.get(1)?,
                        access: r.get(2)?,
                        commit: r.get(3)?,
                        manifest: ManifestId([0; 32]),
                        scope: r.get(5)?,
                        bandwidth: r.get::<_, Option<i64>>(6)?.map(|b| b.max(0) as u64),
                        concurrency: r.get(7)?,
                        state: r.get(8)?,
                        updated: r.get(9)?,
                    },
                    r.get::<_, Vec<u8>>(4)?,
                ))
            })
            .map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (mut rec, m) = row.map_err(|e| self.sql(e))?;
            let Some(m) = ManifestId::from_slice(&m) else {
                continue;
            };
            rec.manifest = m;
            out.push(rec);
        }
        Ok(out)
    }

    /// Is manifest `id` pinned by some owner?
    pub(super) fn manifest_pinned(&self, id: &ManifestId) -> Result<bool, CacheError> {
        self.db
            .lock()
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM pins WHERE kind = ?1 AND id = ?2)",
                params![KIND_MANIFEST, &id.0[..]],
                |r| r.get(0),
            )
            .optional()
            .map(|o| o.unwrap_or(false))
            .map_err(|e| self.sql(e))
    }
}

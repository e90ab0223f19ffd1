//! Versions of a writable volume: `commit` turns the overlay's changes into a new version of
//! its repository (new chunks only for what changed), moves the branch by compare-and-swap, and
//! rebases the live volume on it; `checkout` switches a live volume to another version;
//! `reset --hard` moves its branch back (or anywhere) and switches.

use std::sync::Arc;

use bytes::Bytes;
use tokio::runtime::Handle;

use crate::cache::Cache;
use crate::commit::{Commit, CommitStats};
use crate::format::{FORMAT_VERSION, chunk_key, manifest_key, outboard_key};
use crate::ids::{ChunkId, CommitId, ManifestId};
use crate::overlay::BaseInfo;
use crate::repo::{RepoError, Repository};
use crate::store::{Store, StoreError};
use crate::volume::{ChunkSink, SnapshotStats, Volume, VolumeError};

/// After a restart: did a commit of the overlay's changes land before the daemon stopped?
/// If its branch points at it, the changes are committed: the overlay is cleared (the caller
/// then bases it on that commit); otherwise the record is dropped and the changes stay.
pub async fn settle_pending_commit(
    ov: &crate::overlay::Overlay,
    repo: &Repository,
) -> Result<Option<CommitId>, VersionError> {
    let Some(rec) = ov.pending_commit().map_err(VolumeError::from)? else {
        return Ok(None);
    };
    let mut landed = None;
    if let (Some((branch, id)), Some(base)) = (rec.split_once(' '), ov.base())
        && let Ok(id) = id.parse::<CommitId>()
        && repo.branch(&base.volume, branch).await? == Some(id)
    {
        landed = Some(id);
        ov.clear().map_err(VolumeError::from)?;
    }
    ov.set_pending_commit(None).map_err(VolumeError::from)?;
    Ok(landed)
}

/// Errors of version operations.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("nothing to commit: the volume has no changes")]
    NothingToCommit,
    #[error("the volume is read-only (mounted with --read-only): there is nothing to commit")]
    ReadOnly,
    #[error(
        "branch `{branch}` of volume `{volume}` is at {now}, not at {base} where these changes \
         were made (someone else committed or pushed): nothing was changed here"
    )]
    BranchMoved {
        volume: String,
        branch: String,
        base: String,
        now: String,
    },
    #[error(
        "the volume has {changes} uncommitted change(s): commit them (`horcrux commit`), or throw \
         them away with --discard"
    )]
    Dirty { changes: usize },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// What to commit as.
#[derive(Debug, Clone)]
pub struct CommitRequest {
    pub branch: String,
    pub message: String,
    pub author: String,
}

/// A commit made.
#[derive(Debug, Clone)]
pub struct CommitReport {
    pub commit: CommitId,
    pub parent: CommitId,
    pub manifest: ManifestId,
    pub stats: SnapshotStats,
}

/// Uploads a chunk, then its piece outboard, each unless the store has it already (a chunk
/// that is there without its outboard, from an older writer, gets it now).
struct Upload<'a> {
    store: &'a Arc<dyn Store>,
    runtime: &'a Handle,
}

impl ChunkSink for Upload<'_> {
    fn put(
        &self,
        id: &ChunkId,
        data: Vec<u8>,
        outboard: Option<Vec<u8>>,
    ) -> Result<(), VolumeError> {
        let keys = [chunk_key(id), outboard_key(id)];
        self.runtime
            .block_on(async {
                let present = self.store.exists(&keys).await?;
                if !present[0] {
                    self.store.put(&keys[0], Bytes::from(data)).await?;
                }
                // After the chunk: an outboard never names a chunk the store does not have.
                if let (Some(ob), false) = (outboard, present[1]) {
                    self.store.put(&keys[1], Bytes::from(ob)).await?;
                }
                Ok(())
            })
            .map_err(|e| VolumeError::Store(Arc::new(e)))
    }
}

/// Commit the changes of `volume` to branch `req.branch` of `repo`. Blocking (call it off the
/// runtime). Mutations of the volume wait while it runs; reads go on. On any failure before
/// the branch moved, the volume and its changes are as they were.
pub fn commit_volume(
    volume: &Volume,
    repo: &Repository,
    cache: &Cache,
    runtime: &Handle,
    req: &CommitRequest,
) -> Result<CommitReport, VersionError> {
    let ov = volume.overlay().ok_or(VersionError::ReadOnly)?;
    ov.flush_all().map_err(VolumeError::from)?;
    let frozen = volume.freeze()?;
    if frozen.is_clean() {
        return Err(VersionError::NothingToCommit);
    }
    let base = ov.base().ok_or(VersionError::ReadOnly)?;
    let parent: CommitId = base.commit.parse().map_err(|_| VersionError::Io {
        what: format!("overlay {}", ov.dir().display()),
        source: std::io::Error::other(format!("bad base commit `{}`", base.commit)),
    })?;
    // Refuse early when the branch is elsewhere already (the compare-and-swap decides).
    let now = runtime.block_on(repo.branch(&base.volume, &req.branch))?;
    if now != Some(parent) {
        return Err(VersionError::BranchMoved {
            volume: base.volume.clone(),
            branch: req.branch.clone(),
            base: parent.short(),
            now: now.map_or("nothing (no such branch)".into(), |c| c.short()),
        });
    }
    let tmp_dir = cache.dir().join("tmp");
    std::fs::create_dir_all(&tmp_dir).map_err(|source| VersionError::Io {
        what: format!("creating {}", tmp_dir.display()),
        source,
    })?;
    let tmp = tmp_dir.join(format!("commit-{}.sqlite", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let store = repo.store().clone();
    let (mid, stats) = frozen.write_catalog(
        &tmp,
        &Upload {
            store: &store,
            runtime,
        },
    )?;
    let commit = Commit {
        version: FORMAT_VERSION,
        volume: base.volume.clone(),
        manifest: mid.to_hex(),
        parents: vec![parent.to_hex()],
        author: req.author.clone(),
        time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
        message: req.message.clone(),
        stats: CommitStats {
            files: stats.files,
            bytes: stats.bytes,
            chunks: stats.chunks,
        },
    };
    // Data first, then the manifest and the commit, and the branch last: a reader never
    // finds a ref to something missing.
    let id = runtime.block_on(async {
        store.put_file(&manifest_key(&mid), &tmp).await?;
        let id = repo.put_commit(&commit).await?;
        // If the daemon dies once the branch moved, the next mount finds this and knows the
        // changes are committed (instead of showing them again on the old version).
        ov.set_pending_commit(Some(&format!("{} {}", req.branch, id.to_hex())))
            .map_err(VolumeError::from)?;
        let moved = repo
            .set_branch(&base.volume, &req.branch, Some(parent), id)
            .await;
        if moved.is_err() {
            ov.set_pending_commit(None).map_err(VolumeError::from)?;
        }
        match moved {
            Ok(()) => Ok(id),
            Err(RepoError::Store(StoreError::CasConflict { .. })) => {
                let now = repo.branch(&base.volume, &req.branch).await?;
                Err(VersionError::BranchMoved {
                    volume: base.volume.clone(),
                    branch: req.branch.clone(),
                    base: parent.short(),
                    now: now.map_or("nothing".into(), |c| c.short()),
                })
            }
            Err(e) => Err(e.into()),
        }
    })?;
    // The new manifest joins the cache (it is verified by construction: we hashed it).
    let path = cache.manifest_path(&mid);
    std::fs::rename(&tmp, &path).map_err(|source| VersionError::Io {
        what: format!("moving the new manifest into {}", cache.dir().display()),
        source,
    })?;
    cache.add_manifest(&mid).map_err(RepoError::from)?;
    let manifest = Arc::new(crate::manifest::Manifest::open(&path).map_err(RepoError::from)?);
    let max_ino = manifest.max_ino().map_err(RepoError::from)?;
    frozen.rebase(
        manifest,
        &BaseInfo {
            volume: base.volume.clone(),
            commit: id.to_hex(),
            manifest: mid.to_hex(),
            max_ino,
        },
    )?;
    tracing::info!(commit = %id, parent = %parent, new_chunks = stats.new_chunks, new_bytes = stats.new_bytes, "committed");
    Ok(CommitReport {
        commit: id,
        parent,
        manifest: mid,
        stats,
    })
}

/// Where a checkout or reset left the volume.
#[derive(Debug, Clone)]
pub struct CheckoutReport {
    pub commit: CommitId,
    /// Changes thrown away (0 unless asked for).
    pub discarded: usize,
}

/// Switch the writable `volume` to commit `target` of its volume. Uncommitted changes are
/// refused unless `discard`; open files are always refused (their inode numbers would name
/// other files). Blocking.
pub fn checkout_volume(
    volume: &Volume,
    repo: &Repository,
    cache: &Cache,
    runtime: &Handle,
    target: CommitId,
    discard: bool,
) -> Result<CheckoutReport, VersionError> {
    let ov = volume.overlay().ok_or(VersionError::ReadOnly)?;
    let base = ov.base().ok_or(VersionError::ReadOnly)?;
    let commit = runtime.block_on(repo.commit(target))?;
    let mid = commit.manifest_id().ok_or_else(|| VersionError::Io {
        what: format!("commit {target}"),
        source: std::io::Error::other("names no manifest"),
    })?;
    // Download before freezing: the mount stays usable meanwhile.
    let manifest = runtime.block_on(repo.manifest(mid, cache))?;
    ov.flush_all().map_err(VolumeError::from)?;
    let frozen = volume.freeze()?;
    let changes = frozen.change_count()?;
    if changes > 0 && !discard {
        return Err(VersionError::Dirty { changes });
    }
    let max_ino = manifest.max_ino().map_err(RepoError::from)?;
    frozen.switch_to(
        manifest,
        &BaseInfo {
            volume: base.volume.clone(),
            commit: target.to_hex(),
            manifest: mid.to_hex(),
            max_ino,
        },
    )?;
    tracing::info!(commit = %target, discarded = changes, "checked out");
    Ok(CheckoutReport {
        commit: target,
        discarded: changes,
    })
}

/// `reset --hard`: move `branch` (where the volume sits now) to `target` by compare-and-swap,
/// throw the volume's changes away and switch it there.
pub fn reset_hard(
    volume: &Volume,
    repo: &Repository,
    cache: &Cache,
    runtime: &Handle,
    branch: &str,
    target: CommitId,
) -> Result<CheckoutReport, VersionError> {
    let ov = volume.overlay().ok_or(VersionError::ReadOnly)?;
    let base = ov.base().ok_or(VersionError::ReadOnly)?;
    let here: CommitId = base.commit.parse().map_err(|_| VersionError::Io {
        what: format!("overlay {}", ov.dir().display()),
        source: std::io::Error::other(format!("bad base commit `{}`", base.commit)),
    })?;
    // The target must exist before anything moves.
    runtime.block_on(repo.commit(target))?;
    if volume.open_handles() > 0 {
        return Err(VolumeError::Busy(
            "files are open in the volume; stop the applications using it and retry".into(),
        )
        .into());
    }
    runtime.block_on(async {
        match repo
            .set_branch(&base.volume, branch, Some(here), target)
            .await
        {
            Ok(()) => Ok(()),
            Err(RepoError::Store(StoreError::CasConflict { .. })) => {
                let now = repo.branch(&base.volume, branch).await?;
                Err(VersionError::BranchMoved {
                    volume: base.volume.clone(),
                    branch: branch.to_string(),
                    base: here.short(),
                    now: now.map_or("nothing".into(), |c| c.short()),
                })
            }
            Err(e) => Err(e.into()),
        }
    })?;
    checkout_volume(volume, repo, cache, runtime, target, true)
}

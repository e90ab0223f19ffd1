//! A repository in a store: its config, volumes, refs and commits.

use std::sync::Arc;

use bytes::Bytes;

use crate::cache::{Cache, CacheError};
use crate::commit::{Commit, CommitError};
use crate::format::{
    self, CONFIG_KEY, FORMAT_VERSION, FormatError, RepoConfig, branch_key, commit_key,
    manifest_key, remote_ref_key, tag_key,
};
use crate::ids::{CommitId, ManifestId};
use crate::manifest::{Manifest, ManifestError};
use crate::store::{Store, StoreError};

/// Errors about a repository as a whole.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(
        "{0} is not a horcrux repository (no {CONFIG_KEY}: the location does not exist, is empty, or holds something else); check the path, or create one with `horcrux generate`"
    )]
    NotARepo(String),
    #[error("{store}: {CONFIG_KEY} is not valid: {what}")]
    BadConfig { store: String, what: String },
    #[error(
        "{store}: repository format version {found} is not supported by this horcrux (supports {FORMAT_VERSION}); upgrade horcrux"
    )]
    Version { store: String, found: u32 },
    #[error("{store}: no volume named `{name}`; volumes here: {known}")]
    NoSuchVolume {
        store: String,
        name: String,
        known: String,
    },
    #[error("{store}: holds several volumes ({known}); choose one with --name")]
    NameNeeded { store: String, known: String },
    #[error("{store}: the repository holds no volume")]
    Empty { store: String },
    #[error("{store}: volume `{name}` already exists; choose another name or remove it first")]
    VolumeExists { store: String, name: String },
    #[error("volume `{volume}`: no branch, tag or commit named `{reference}`")]
    NoSuchRef { volume: String, reference: String },
    #[error("volume `{volume}`: `{reference}` matches several commits; give more digits")]
    AmbiguousRef { volume: String, reference: String },
    #[error("{store}: ref `{key}` holds `{content}`, not a commit id")]
    BadRef {
        store: String,
        key: String,
        content: String,
    },
    #[error("manifest {0}: downloaded content does not match its id")]
    CorruptManifest(ManifestId),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// A repository: one store holding chunks, manifests, commits and refs of one or more volumes.
#[derive(Debug, Clone)]
pub struct Repository {
    store: Arc<dyn Store>,
}

impl Repository {
    /// Open an existing repository, checking its format version.
    pub async fn open(store: Arc<dyn Store>) -> Result<Self, RepoError> {
        let bytes = match store.get(CONFIG_KEY).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Err(RepoError::NotARepo(store.describe())),
            Err(e) => return Err(e.into()),
        };
        let cfg: RepoConfig = serde_json::from_slice(&bytes).map_err(|e| RepoError::BadConfig {
            store: store.describe(),
            what: e.to_string(),
        })?;
        if cfg.format != "horcrux" {
            return Err(RepoError::BadConfig {
                store: store.describe(),
                what: format!("format is `{}`, expected `horcrux`", cfg.format),
            });
        }
        if cfg.version != FORMAT_VERSION {
            return Err(RepoError::Version {
                store: store.describe(),
                found: cfg.version,
            });
        }
        Ok(Self { store })
    }

    /// A repository at `store` without reading its config: for a mount that falls back to a
    /// cached version because the source is unreachable (see `horcrux mount`). Every operation
    /// that needs the store fails with the store's error.
    pub fn unchecked(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// Open the repository, creating its config if the store is empty.
    pub async fn open_or_init(store: Arc<dyn Store>) -> Result<Self, RepoError> {
        match Self::open(store.clone()).await {
            Err(RepoError::NotARepo(_)) => {
                let cfg = serde_json::to_vec_pretty(&RepoConfig::current()).expect("serializes");
                match store
                    .compare_and_swap(CONFIG_KEY, None, Bytes::from(cfg))
                    .await
                {
                    Ok(()) | Err(StoreError::CasConflict { .. }) => Self::open(store).await,
                    Err(e) => Err(e.into()),
                }
            }
            other => other,
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Names of the volumes in the repository.
    pub async fn volumes(&self) -> Result<Vec<String>, RepoError> {
        let keys = self.store.list("volumes/").await?;
        let mut names: Vec<String> = keys
            .iter()
            .filter_map(|k| {
                k.strip_prefix("volumes/")?
                    .split('/')
                    .next()
                    .map(str::to_string)
            })
            .collect();
        names.dedup();
        Ok(names)
    }

    /// The volume to use: `name` if given (must exist), else the only one.
    pub async fn pick_volume(&self, name: Option<&str>) -> Result<String, RepoError> {
        let vols = self.volumes().await?;
        let known = if vols.is_empty() {
            "none".to_string()
        } else {
            vols.join(", ")
        };
        match name {
            Some(n) if vols.iter().any(|v| v == n) => Ok(n.to_string()),
            Some(n) => Err(RepoError::NoSuchVolume {
                store: self.store.describe(),
                name: n.to_string(),
                known,
            }),
            None => match vols.len() {
                0 => Err(RepoError::Empty {
                    store: self.store.describe(),
                }),
                1 => Ok(vols[0].clone()),
                _ => Err(RepoError::NameNeeded {
                    store: self.store.describe(),
                    known,
                }),
            },
        }
    }

    /// Resolve a branch, tag, remote-tracking branch (`REMOTE/BRANCH` or
    /// `remotes/REMOTE/BRANCH`), full commit id or unique commit id prefix.
    pub async fn resolve(&self, volume: &str, reference: &str) -> Result<CommitId, RepoError> {
        format::check_volume_name(volume)?;
        let mut keys = Vec::new();
        if format::check_ref_name(reference).is_ok() {
            keys.push(branch_key(volume, reference));
            keys.push(tag_key(volume, reference));
        }
        if let Some((remote, branch)) = split_remote_ref(reference) {
            keys.push(remote_ref_key(volume, remote, branch));
        }
        for key in keys {
            match self.store.get(&key).await {
                Ok(b) => return self.parse_ref(&key, &b),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        if reference.len() >= 4 && reference.chars().all(|c| c.is_ascii_hexdigit()) {
            let r = reference.to_ascii_lowercase();
            // Keys listed by the store are untrusted: anything under `commits/` that is not a
            // full id (a temporary file, a planted name) is not a candidate.
            let matches: Vec<CommitId> = self
                .store
                .list(&format!("commits/{}", &r[..2]))
                .await?
                .into_iter()
                .filter_map(|k| k.strip_prefix("commits/").map(str::to_string))
                .filter(|h| h.starts_with(&r))
                .filter_map(|h| h.parse().ok())
                .collect();
            match matches.len() {
                1 => return Ok(matches[0]),
                0 => {}
                _ => {
                    return Err(RepoError::AmbiguousRef {
                        volume: volume.into(),
                        reference: reference.into(),
                    });
                }
            }
        }
        Err(RepoError::NoSuchRef {
            volume: volume.into(),
            reference: reference.into(),
        })
    }

    fn parse_ref(&self, key: &str, bytes: &[u8]) -> Result<CommitId, RepoError> {
        let s = String::from_utf8_lossy(bytes);
        s.trim().parse().map_err(|_| RepoError::BadRef {
            store: self.store.describe(),
            key: key.to_string(),
            content: s.chars().take(80).collect(),
        })
    }

    /// Current commit of a branch, if the branch exists.
    pub async fn branch(&self, volume: &str, branch: &str) -> Result<Option<CommitId>, RepoError> {
        let key = branch_key(volume, branch);
        match self.store.get(&key).await {
            Ok(b) => Ok(Some(self.parse_ref(&key, &b)?)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Move a branch from `old` to `new` atomically (compare-and-swap).
    pub async fn set_branch(
        &self,
        volume: &str,
        branch: &str,
        old: Option<CommitId>,
        new: CommitId,
    ) -> Result<(), RepoError> {
        format::check_volume_name(volume)?;
        format::check_ref_name(branch)?;
        let old_bytes = old.map(|c| format!("{c}\n").into_bytes());
        self.store
            .compare_and_swap(
                &branch_key(volume, branch),
                old_bytes.as_deref(),
                Bytes::from(format!("{new}\n")),
            )
            .await?;
        Ok(())
    }

    /// Branches of a volume and the commits they point at, sorted by name.
    pub async fn branches(&self, volume: &str) -> Result<Vec<(String, CommitId)>, RepoError> {
        self.refs_under(volume, "heads").await
    }

    /// Remote-tracking branches of a volume (`(remote, branch, commit)`), sorted.
    pub async fn remote_branches(
        &self,
        volume: &str,
    ) -> Result<Vec<(String, String, CommitId)>, RepoError> {
        let prefix = format!("{}refs/remotes/", format::volume_prefix(volume));
        let mut out = Vec::new();
        for key in self.store.list(&prefix).await? {
            let Some((remote, branch)) = key.strip_prefix(&prefix).and_then(|r| r.split_once('/'))
            else {
                continue;
            };
            if format::check_ref_name(remote).is_err() || format::check_ref_name(branch).is_err() {
                continue; // temporary files, locks
            }
            match self.store.get(&key).await {
                Ok(b) => out.push((
                    remote.to_string(),
                    branch.to_string(),
                    self.parse_ref(&key, &b)?,
                )),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// Tags of a volume and the commits they point at, sorted by name.
    pub async fn tags(&self, volume: &str) -> Result<Vec<(String, CommitId)>, RepoError> {
        self.refs_under(volume, "tags").await
    }

    /// The refs of `volume` under `refs/<kind>/`.
    async fn refs_under(
        &self,
        volume: &str,
        kind: &str,
    ) -> Result<Vec<(String, CommitId)>, RepoError> {
        format::check_volume_name(volume)?;
        let prefix = format!("{}refs/{kind}/", format::volume_prefix(volume));
        let mut out = Vec::new();
        for key in self.store.list(&prefix).await? {
            let Some(name) = key.strip_prefix(&prefix) else {
                continue;
            };
            if format::check_ref_name(name).is_err() {
                continue; // temporary files, locks, anything not a ref
            }
            match self.store.get(&key).await {
                Ok(b) => out.push((name.to_string(), self.parse_ref(&key, &b)?)),
                Err(e) if e.is_not_found() => {} // deleted meanwhile
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// Current commit of a tag, if the tag exists.
    pub async fn tag(&self, volume: &str, tag: &str) -> Result<Option<CommitId>, RepoError> {
        let key = tag_key(volume, tag);
        match self.store.get(&key).await {
            Ok(b) => Ok(Some(self.parse_ref(&key, &b)?)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Create tag `tag` at `id`, by compare-and-swap from absent: an existing tag (even at the
    /// same commit) fails with a [`StoreError::CasConflict`]. Tags never move.
    pub async fn create_tag(&self, volume: &str, tag: &str, id: CommitId) -> Result<(), RepoError> {
        format::check_volume_name(volume)?;
        format::check_ref_name(tag)?;
        self.store
            .compare_and_swap(&tag_key(volume, tag), None, Bytes::from(format!("{id}\n")))
            .await?;
        Ok(())
    }

    /// Delete branch `branch` if it is still at `at` (compare-and-delete: a branch someone
    /// moved meanwhile fails with a [`StoreError::CasConflict`] and stays). Its commits stay in
    /// the repository until `gc` finds that no other ref reaches them.
    pub async fn delete_branch(
        &self,
        volume: &str,
        branch: &str,
        at: CommitId,
    ) -> Result<(), RepoError> {
        format::check_volume_name(volume)?;
        format::check_ref_name(branch)?;
        self.delete_ref(&branch_key(volume, branch), at).await
    }

    /// Remove ref `key` if it names `at`: compared with the exact bytes read, so a ref written
    /// without the trailing newline is removed too.
    async fn delete_ref(&self, key: &str, at: CommitId) -> Result<(), RepoError> {
        let bytes = self.store.get(key).await?;
        if self.parse_ref(key, &bytes)? != at {
            return Err(StoreError::CasConflict {
                store: self.store.describe(),
                key: key.to_string(),
            }
            .into());
        }
        self.store.compare_and_delete(key, &bytes).await?;
        Ok(())
    }

    /// Delete tag `tag` if it is at `at` (as [`Self::delete_branch`]).
    pub async fn delete_tag(&self, volume: &str, tag: &str, at: CommitId) -> Result<(), RepoError> {
        format::check_volume_name(volume)?;
        format::check_ref_name(tag)?;
        self.delete_ref(&tag_key(volume, tag), at).await
    }

    pub async fn commit(&self, id: CommitId) -> Result<Commit, RepoError> {
        let bytes = self.store.get(&commit_key(&id)).await?;
        Ok(Commit::decode(id, &bytes)?)
    }

    pub async fn put_commit(&self, c: &Commit) -> Result<CommitId, RepoError> {
        let (id, bytes) = c.encode();
        self.store.put(&commit_key(&id), Bytes::from(bytes)).await?;
        Ok(id)
    }

    /// Open manifest `id`, downloading it into the cache (and verifying it) if needed.
    pub async fn manifest(
        &self,
        id: ManifestId,
        cache: &Cache,
    ) -> Result<Arc<Manifest>, RepoError> {
        let path = cache.manifest_path(&id);
        if !cache.has_manifest(&id) {
            let tmp = crate::util::temp_name(&path);
            if let Err(e) = self.store.get_to_file(&manifest_key(&id), &tmp).await {
                let _ = std::fs::remove_file(&tmp);
                // The destination is the cache: a full disk is the cache's, not the store's.
                return Err(match e {
                    StoreError::Io { source, .. }
                        if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) =>
                    {
                        CacheError::Full {
                            dir: cache.dir().display().to_string(),
                            what: format!("manifest {id}"),
                            source,
                        }
                        .into()
                    }
                    e => e.into(),
                });
            }
            let t2 = tmp.clone();
            let got = tokio::task::spawn_blocking(move || crate::manifest::hash_file(&t2))
                .await
                .expect("hash task")?;
            if got != id {
                let _ = std::fs::remove_file(&tmp);
                tracing::error!(manifest = %id, source = %self.store.describe(), "manifest hash mismatch");
                return Err(RepoError::CorruptManifest(id));
            }
            std::fs::rename(&tmp, &path).map_err(|source| CacheError::Io {
                dir: cache.dir().display().to_string(),
                source,
            })?;
            cache.add_manifest(&id)?;
        }
        let p = path.clone();
        let m = tokio::task::spawn_blocking(move || Manifest::open(&p))
            .await
            .expect("open task")?;
        Ok(Arc::new(m))
    }
}

/// `REMOTE/BRANCH` or `remotes/REMOTE/BRANCH` as (remote, branch), when both are valid names.
pub fn split_remote_ref(reference: &str) -> Option<(&str, &str)> {
    let r = reference.strip_prefix("remotes/").unwrap_or(reference);
    let (remote, branch) = r.split_once('/')?;
    (format::check_ref_name(remote).is_ok() && format::check_ref_name(branch).is_ok())
        .then_some((remote, branch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileStore;

    /// Regression (found while writing the fuzz target `repo_text`): resolving a commit-id prefix parsed every name the
    /// store listed under `commits/` with an `expect`; a stray name (a temporary file, a planted
    /// object) matching the prefix panicked. Such names are not candidates.
    #[tokio::test]
    async fn listed_names_that_are_not_ids_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(FileStore::new(d.path().to_path_buf()));
        let repo = Repository::open_or_init(store.clone()).await.unwrap();
        store
            .put("commits/abcd-not-an-id", Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert!(matches!(
            repo.resolve("v", "abcd").await,
            Err(RepoError::NoSuchRef { .. })
        ));
        let id = CommitId::of(b"c");
        let key = format!("commits/{id}");
        store.put(&key, Bytes::from_static(b"c")).await.unwrap();
        assert_eq!(repo.resolve("v", &id.to_hex()[..8]).await.unwrap(), id);
    }
}

//! [`LazyRemotes`]: the registered remotes of a repository, as a last mirror that serves only
//! the chunks (and piece outboards) a lazy `fetch`/`pull` left there.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Mutex;

use super::{AccessUrl, Store, StoreError};

/// Opens the store of an access URL (the CLI's, with its credentials and options).
pub type OpenStore = Arc<dyn Fn(&AccessUrl) -> Result<Arc<dyn Store>, StoreError> + Send + Sync>;

/// How long a list of remotes is trusted before a miss reads the registrations again (a
/// `pull` into a mounted volume registers a remote the mount daemon did not know).
const RELOAD_AFTER: Duration = Duration::from_secs(1);

/// When the remotes were read, and the store of each that could be opened.
type Loaded = (Instant, Vec<Arc<dyn Store>>);

/// The chunks (and their piece outboards) of a repository's registered remotes
/// ([`crate::remotes`]): a commit fetched lazily names chunks that stayed on the remote it
/// came from. Everything else — refs,
/// commits, manifests, listings — is answered "not found", so that as a mirror after the
/// repository's own stores it never stands in for the repository's refs or metadata; writes
/// are refused. Registrations are read from `registry` on first use and again when a chunk is
/// found on none of the known remotes. Chunk data is verified by whoever reads it (the
/// fetcher by block hash, `transfer` by chunk id), as from any store.
pub struct LazyRemotes {
    registry: Arc<dyn Store>,
    open: OpenStore,
    loaded: Mutex<Option<Loaded>>,
}

impl std::fmt::Debug for LazyRemotes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyRemotes")
            .field("registry", &self.registry.describe())
            .finish_non_exhaustive()
    }
}

impl LazyRemotes {
    pub fn new(registry: Arc<dyn Store>, open: OpenStore) -> Self {
        Self {
            registry,
            open,
            loaded: Mutex::new(None),
        }
    }

    fn not_here(&self, key: &str) -> StoreError {
        StoreError::NotFound {
            store: self.describe(),
            key: key.to_string(),
        }
    }

    fn read_only(&self, key: &str) -> StoreError {
        StoreError::Unsupported(format!(
            "{}: `{key}`: a remote's lazily fetched data is read-only here",
            self.describe()
        ))
    }

    /// The remotes' stores; read again if `stale` and older than [`RELOAD_AFTER`].
    async fn remotes(&self, stale: bool) -> Result<Vec<Arc<dyn Store>>, StoreError> {
        let mut loaded = self.loaded.lock().await;
        let fresh = loaded
            .as_ref()
            .is_some_and(|(t, _)| !stale || t.elapsed() < RELOAD_AFTER);
        if !fresh {
            let list = crate::remotes::open_all(self.registry.as_ref(), &*self.open)
                .await
                .map_err(|e| StoreError::Other {
                    store: self.registry.describe(),
                    message: format!("reading the registered remotes: {e}"),
                })?;
            *loaded = Some((Instant::now(), list.into_iter().map(|(_, s)| s).collect()));
        }
        Ok(loaded.as_ref().map(|(_, l)| l.clone()).unwrap_or_default())
    }

    /// `op` on each remote in turn until one has `key`; with a fresh list of remotes when
    /// none had it.
    async fn each<T, F, Fut>(&self, key: &str, op: F) -> Result<T, StoreError>
    where
        F: Fn(Arc<dyn Store>) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        // Chunks and their piece outboards (FORMAT.md §3a): the only data a lazily fetched
        // version leaves on a remote, and both are checked by their readers against hashes
        // from the repository's own manifests.
        if !key.starts_with("chunks/") && !key.starts_with("outboards/") {
            return Err(self.not_here(key));
        }
        let mut tried: Vec<String> = Vec::new();
        let mut last = None;
        for stale in [false, true] {
            for s in self.remotes(stale).await? {
                if tried.contains(&s.describe()) {
                    continue;
                }
                tried.push(s.describe());
                match op(s).await {
                    Ok(v) => return Ok(v),
                    Err(e) if e.is_not_found() => {}
                    Err(e) => last = Some(e),
                }
            }
        }
        Err(last.unwrap_or_else(|| self.not_here(key)))
    }
}

#[async_trait::async_trait]
impl Store for LazyRemotes {
    fn describe(&self) -> String {
        "the registered remotes (lazily fetched chunks)".into()
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        self.each(key, |s| {
            let r = range.clone();
            async move { s.get_range(key, r).await }
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.each(key, |s| async move { s.get(key).await }).await
    }

    fn refused(&self, key: &str) {
        // Best effort: a list being loaded right now is made of fresh stores anyway.
        if let Ok(loaded) = self.loaded.try_lock()
            && let Some((_, stores)) = loaded.as_ref()
        {
            for s in stores {
                s.refused(key);
            }
        }
    }

    async fn get_to_file(&self, key: &str, dest: &Path) -> Result<(), StoreError> {
        self.each(key, |s| async move { s.get_to_file(key, dest).await })
            .await
    }

    async fn put(&self, key: &str, _: Bytes) -> Result<(), StoreError> {
        Err(self.read_only(key))
    }

    async fn put_file(&self, key: &str, _: &Path) -> Result<(), StoreError> {
        Err(self.read_only(key))
    }

    async fn exists(&self, _: &[String]) -> Result<Vec<bool>, StoreError> {
        Err(self.not_here("(existence query)"))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Err(self.not_here(prefix))
    }

    async fn list_sizes(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        Err(self.not_here(prefix))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        Err(self.read_only(key))
    }

    async fn compare_and_delete(&self, key: &str, _: &[u8]) -> Result<(), StoreError> {
        Err(self.read_only(key))
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        _: Option<&[u8]>,
        _: Bytes,
    ) -> Result<(), StoreError> {
        Err(self.read_only(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{FileStore, MirrorConfig, MirrorStore};

    #[tokio::test]
    async fn only_chunks_and_outboards_fall_through() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let local: Arc<dyn Store> = Arc::new(FileStore::new(a.path().to_path_buf()));
        let remote: Arc<dyn Store> = Arc::new(FileStore::new(b.path().to_path_buf()));
        remote
            .put("chunks/ab/abc", Bytes::from_static(b"data"))
            .await
            .unwrap();
        remote
            .put("outboards/ab/abc", Bytes::from_static(b"pieces"))
            .await
            .unwrap();
        remote
            .put("volumes/v/refs/heads/x", Bytes::from_static(b"theirs\n"))
            .await
            .unwrap();
        local
            .put("volumes/v/refs/heads/main", Bytes::from_static(b"ours\n"))
            .await
            .unwrap();
        let open: OpenStore = Arc::new(|u: &AccessUrl| match u {
            AccessUrl::File { path } => {
                Ok(Arc::new(FileStore::new(path.clone())) as Arc<dyn Store>)
            }
            _ => unreachable!(),
        });
        let lazy = Arc::new(LazyRemotes::new(local.clone(), open));
        let m = MirrorStore::new(vec![local.clone(), lazy], MirrorConfig::default());
        // Not registered yet: not found. The registration is seen at the next miss.
        assert!(m.get("chunks/ab/abc").await.unwrap_err().is_not_found());
        crate::remotes::add(local.as_ref(), "r", &b.path().display().to_string())
            .await
            .unwrap();
        // A miss reads the registrations again once the list is RELOAD_AFTER old.
        tokio::time::sleep(RELOAD_AFTER + Duration::from_millis(100)).await;
        assert_eq!(&m.get("chunks/ab/abc").await.unwrap()[..], b"data");
        assert_eq!(
            &m.get_range("chunks/ab/abc", 1..3).await.unwrap()[..],
            b"at"
        );
        // And the chunk's piece outboard (its readers check it against the manifest).
        assert_eq!(
            &m.get_range("outboards/ab/abc", 2..6).await.unwrap()[..],
            b"eces"
        );
        // The remote's refs never show through.
        assert!(
            m.get("volumes/v/refs/heads/x")
                .await
                .unwrap_err()
                .is_not_found()
        );
        assert_eq!(
            m.list("volumes/").await.unwrap(),
            ["volumes/v/refs/heads/main"]
        );
        // Writes go to the repository itself.
        m.put("chunks/cd/cde", Bytes::from_static(b"new"))
            .await
            .unwrap();
        assert!(local.get("chunks/cd/cde").await.is_ok());
        assert!(
            remote
                .get("chunks/cd/cde")
                .await
                .unwrap_err()
                .is_not_found()
        );
    }
}

//! Where repositories live. A [`Store`] is a minimal key → bytes interface (range get, put,
//! exists-batch, list, compare-and-swap); backends are thin, and caching, mirrors, limits and
//! metrics are decorators around it.

mod file;
mod lazy;
mod mirror;
mod peer;
mod s3;
mod ssh;
mod url;

use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

pub use file::FileStore;
pub use lazy::{LazyRemotes, OpenStore};
pub use mirror::{MirrorConfig, MirrorStore};
pub use peer::{PeerOptions, PeerStore};
pub use s3::{S3Config, S3Credentials, S3Env, S3Options, S3Store};
pub use ssh::{SshEnv, SshStore};
pub use url::{AccessUrl, UrlError, parse_access, parse_one};

/// Errors from stores. Messages name the store and key so a user knows what failed where.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{store}: `{key}` not found")]
    NotFound { store: String, key: String },
    #[error("{store}: `{key}`: {source}")]
    Io {
        store: String,
        key: String,
        source: std::io::Error,
    },
    #[error("{store}: `{key}` was changed by someone else (expected a different current value)")]
    CasConflict { store: String, key: String },
    #[error("{store}: {message}")]
    Other { store: String, message: String },
    #[error("{0}")]
    Unsupported(String),
    #[error(
        "{store}: `{key}` is not a repository key (names separated by `/`, none empty, `.` or `..`); refused"
    )]
    BadKey { store: String, key: String },
}

impl StoreError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }

    /// The kind of failure, for error counters. Backends report refusals and time-outs in
    /// their own words (`Other`), so those are recognised by the words they use.
    pub fn kind(&self) -> crate::metrics::ErrorKind {
        use crate::metrics::ErrorKind;
        match self {
            StoreError::NotFound { .. } => ErrorKind::NotFound,
            StoreError::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::PermissionDenied => ErrorKind::Permission,
                std::io::ErrorKind::TimedOut => ErrorKind::Timeout,
                std::io::ErrorKind::NotFound => ErrorKind::NotFound,
                _ => ErrorKind::Io,
            },
            StoreError::CasConflict { .. }
            | StoreError::Unsupported(_)
            | StoreError::BadKey { .. } => ErrorKind::Other,
            StoreError::Other { message, .. } => {
                let m = message.to_ascii_lowercase();
                if [
                    "permission denied",
                    "access denied",
                    "accessdenied",
                    "forbidden",
                    "403",
                    "unauthorized",
                    "authentication",
                    "certificate",
                ]
                .iter()
                .any(|w| m.contains(w))
                {
                    ErrorKind::Permission
                } else if m.contains("timed out")
                    || m.contains("timeout")
                    || m.contains("no answer within")
                {
                    ErrorKind::Timeout
                } else if m.contains("verification") || m.contains("hash mismatch") {
                    ErrorKind::Verify
                } else {
                    ErrorKind::Io
                }
            }
        }
    }

    /// A range past the end of the object (every store reports it as `UnexpectedEof`): the
    /// object is shorter than the reader believes, which asking again does not change.
    pub fn is_past_end(&self) -> bool {
        matches!(self, StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::UnexpectedEof)
    }
}

/// Whether `key` can name an object of a repository: names separated by single `/`, none
/// empty, `.` or `..`, and no NUL. Keys reach stores from peers (`horcrux serve`) and from
/// listings, so the stores that map keys to paths (file, SSH) check them: an absolute key or a
/// `..` would reach outside the repository.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && !key.contains('\0')
        && key
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// [`valid_key`] as a store error naming `store`.
pub fn check_key(store: &dyn Store, key: &str) -> Result<(), StoreError> {
    if valid_key(key) {
        Ok(())
    } else {
        Err(StoreError::BadKey {
            store: store.describe(),
            key: key.to_string(),
        })
    }
}

/// A place holding repository objects.
#[async_trait::async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// Human-readable location, free of credentials.
    fn describe(&self) -> String;

    /// Bytes `range` of `key`. A range past the end is an error, not a short read.
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError>;

    /// Whole object.
    async fn get(&self, key: &str) -> Result<Bytes, StoreError>;

    /// The bytes this store gave for `key` failed verification. A store that keeps state per
    /// key (an SSH store's open file handles) drops it, so the next read sees the object as it
    /// is now on the server (repaired, say) rather than through a handle of the old file.
    fn refused(&self, key: &str) {
        let _ = key;
    }

    /// Bytes `range` of chunk `info` (cut in blocks of `block_size`). Peers override this to
    /// send the chunk's block hashes along, so a peer that reads through to its own origin can
    /// verify and cache what it fetches. The caller verifies the bytes either way.
    async fn get_chunk_range(
        &self,
        info: &crate::manifest::ChunkInfo,
        block_size: u32,
        range: Range<u64>,
    ) -> Result<Bytes, StoreError> {
        let _ = block_size;
        self.get_range(&crate::format::chunk_key(&info.id), range)
            .await
    }

    /// Write an object atomically (readers see the old or the new bytes, never a mix).
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError>;

    /// For each key, whether it exists.
    async fn exists(&self, keys: &[String]) -> Result<Vec<bool>, StoreError>;

    /// Keys starting with `prefix`, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;

    /// Keys starting with `prefix` with their sizes in bytes, sorted by key. Backends that
    /// know sizes from their listing override this; the default reports every size as 0.
    async fn list_sizes(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(self
            .list(prefix)
            .await?
            .into_iter()
            .map(|k| (k, 0))
            .collect())
    }

    /// Remove an object. Removing a key that does not exist is not an error (a retry, or two
    /// collectors at once). Only `gc` removes objects, and refs go only through
    /// [`Store::compare_and_delete`]; see `gc` for when removing an object is safe.
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        Err(StoreError::Unsupported(format!(
            "{}: this store cannot remove `{key}`",
            self.describe()
        )))
    }

    /// The store's own clock: the time it stamps on an object written now, or `None` if a
    /// client cannot read one. `gc` measures its grace period by it, so hosts whose clocks
    /// disagree (or are simply wrong) agree on how long an object has been unreachable.
    async fn now(&self) -> Result<Option<std::time::SystemTime>, StoreError> {
        Ok(None)
    }

    /// Remove `key` only if its current content is `expected` (a ref that nobody moved
    /// meanwhile): [`StoreError::CasConflict`] otherwise, [`StoreError::NotFound`] if it is
    /// gone. Stores with a ref lock (file, ssh) do it under that lock, atomically with respect
    /// to [`Store::compare_and_swap`]; the default reads, compares, then deletes, which leaves
    /// a short window in which a concurrent swap can be undone by the delete.
    async fn compare_and_delete(&self, key: &str, expected: &[u8]) -> Result<(), StoreError> {
        let current = self.get(key).await?;
        if current.as_ref() != expected {
            return Err(StoreError::CasConflict {
                store: self.describe(),
                key: key.to_string(),
            });
        }
        self.delete(key).await
    }

    /// Replace `key` only if its current content is `expected` (`None` = must not exist).
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Bytes,
    ) -> Result<(), StoreError>;

    /// Upload a local file as an object (atomically, like [`Store::put`]). Backends that can
    /// stream override this so large objects (manifests) are not held in memory whole.
    async fn put_file(&self, key: &str, src: &Path) -> Result<(), StoreError> {
        let data = tokio::fs::read(src)
            .await
            .map_err(|source| StoreError::Io {
                store: "local file".into(),
                key: src.display().to_string(),
                source,
            })?;
        self.put(key, Bytes::from(data)).await
    }

    /// Copy an object into a local file (written to a temp name then renamed).
    /// Large objects (manifests) should not be held in memory whole: backends override this.
    async fn get_to_file(&self, key: &str, dest: &Path) -> Result<(), StoreError> {
        let data = self.get(key).await?;
        let dest = dest.to_path_buf();
        let store = self.describe();
        let key = key.to_string();
        tokio::task::spawn_blocking(move || crate::util::write_atomic(&dest, &data))
            .await
            .expect("write task")
            .map_err(|source| StoreError::Io { store, key, source })
    }
}

/// Options of remote stores (SSH identity and host-key policy, S3 settings), filled by the CLI.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// Private key to use for SSH instead of the agent and default keys.
    pub ssh_identity: Option<std::path::PathBuf>,
    /// `known_hosts` file [default: ~/.ssh/known_hosts].
    pub ssh_known_hosts: Option<std::path::PathBuf>,
    /// Accept any SSH host key (explicit opt-out of host-key checking).
    pub ssh_insecure_ignore_host_key: bool,
    /// Parallel SSH sessions per host.
    pub ssh_sessions: Option<usize>,
    /// Bound on each blocking SSH call [default: `ssh::DEFAULT_IO_TIMEOUT`], and on the TCP
    /// connect when shorter than `ssh::DEFAULT_CONNECT_TIMEOUT`. A mount sets it to its
    /// mirror attempt timeout: a call the fetcher has given up on then also ends, so the
    /// session it holds is dropped and its slot freed for a fresh connection, instead of
    /// staying stuck on a dead link for the default bound.
    pub ssh_io_timeout: Option<std::time::Duration>,
    /// Open the other SSH sessions of the pool in the background once the first one works
    /// (for mounts: a first small read then never waits for a second handshake).
    pub ssh_warm_pool: bool,
    /// Local user, home directory and agent for SSH (`None` = read from the process).
    pub ssh_env: Option<SshEnv>,
    /// S3: environment to take credentials, region and endpoint from (`None` = the process's)
    /// and timeouts.
    pub s3: S3Options,
    /// Peers (`horcrux://`): TLS files and timeouts.
    pub peer: PeerOptions,
}

/// Open the store an access URL names, with default options.
pub fn open_store(url: &AccessUrl) -> Result<Arc<dyn Store>, StoreError> {
    open_store_with(url, &StoreOptions::default())
}

/// Open the store an access URL names.
pub fn open_store_with(
    url: &AccessUrl,
    options: &StoreOptions,
) -> Result<Arc<dyn Store>, StoreError> {
    match url {
        AccessUrl::File { path } => Ok(Arc::new(FileStore::new(path.clone()))),
        AccessUrl::Ssh { .. } => Ok(Arc::new(SshStore::from_url(url, options)?)),
        AccessUrl::S3 {
            bucket,
            prefix,
            options: query,
        } => Ok(Arc::new(S3Store::from_url(
            bucket,
            prefix,
            query,
            &options.s3,
        )?)),
        AccessUrl::Peer { host, port, repo } => {
            Ok(Arc::new(PeerStore::new(host, *port, repo, &options.peer)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ErrorKind;

    #[test]
    fn errors_have_kinds() {
        let other = |m: &str| StoreError::Other {
            store: "s".into(),
            message: m.into(),
        };
        let io = |k| StoreError::Io {
            store: "s".into(),
            key: "k".into(),
            source: std::io::Error::from(k),
        };
        assert_eq!(
            StoreError::NotFound {
                store: "s".into(),
                key: "k".into()
            }
            .kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            io(std::io::ErrorKind::PermissionDenied).kind(),
            ErrorKind::Permission
        );
        assert_eq!(io(std::io::ErrorKind::TimedOut).kind(), ErrorKind::Timeout);
        assert_eq!(
            io(std::io::ErrorKind::ConnectionReset).kind(),
            ErrorKind::Io
        );
        assert_eq!(other("HTTP 403 Forbidden").kind(), ErrorKind::Permission);
        assert_eq!(other("`k`: no answer within 2s").kind(), ErrorKind::Timeout);
        assert_eq!(
            other("`k`: data failed verification").kind(),
            ErrorKind::Verify
        );
        assert_eq!(other("connection reset").kind(), ErrorKind::Io);
        assert_eq!(StoreError::Unsupported("x".into()).kind(), ErrorKind::Other);
    }
}

//! Named remotes of a repository, and the lazy data they leave behind.
//!
//! A remote is a name for another repository's access URL, kept in the repository itself
//! (`remotes/<name>` holds the URL as text; URLs never hold secrets: credentials come from the
//! environment). `fetch` and `pull` copy a remote's commits and manifests but **not its
//! chunks**: the remote-tracking refs (`refs/remotes/<name>/<branch>`) and whatever a pull
//! moved onto them may name chunks this repository does not hold. Those chunks are read from
//! the registered remotes when needed, through [`FallbackStore`](crate::store::FallbackStore).
//! So the invariant of `transfer` becomes: a commit present in a repository has its chunks in
//! that repository **or in one of its remotes** (the one it was fetched from).

use std::sync::Arc;

use bytes::Bytes;

use crate::format::{check_ref_name, remote_key};
use crate::store::{
    AccessUrl, LazyRemotes, MirrorConfig, MirrorStore, OpenStore, Store, StoreError, parse_one,
};

/// Prefix of remote registrations.
pub const REMOTES_PREFIX: &str = "remotes/";

/// A registered remote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Remote {
    pub name: String,
    /// Access URL, as the user gave it (one URL, no mirrors).
    pub url: String,
}

/// Errors about remotes.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(
        "invalid remote name `{0}`: use letters, digits, `.`, `_` and `-` (1-128 characters, not starting with `.`)"
    )]
    BadName(String),
    #[error(
        "remote `{name}` already exists for {url}; remove it first (`horcrux remote remove {name}`)"
    )]
    Exists { name: String, url: String },
    #[error("no remote named `{name}` (remotes: {known})")]
    NoSuch { name: String, known: String },
    #[error("remote `{name}`: `{url}` is not a valid access URL: {reason}")]
    BadUrl {
        name: String,
        url: String,
        reason: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Every remote registered in `store`, sorted by name.
pub async fn list(store: &dyn Store) -> Result<Vec<Remote>, RemoteError> {
    let mut out = Vec::new();
    for key in store.list(REMOTES_PREFIX).await? {
        let Some(name) = key.strip_prefix(REMOTES_PREFIX) else {
            continue;
        };
        if check_ref_name(name).is_err() {
            continue; // temporary files, locks
        }
        match store.get(&key).await {
            Ok(b) => out.push(Remote {
                name: name.to_string(),
                url: String::from_utf8_lossy(&b).trim().to_string(),
            }),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// The remote named `name`.
pub async fn get(store: &dyn Store, name: &str) -> Result<Remote, RemoteError> {
    let all = list(store).await?;
    if let Some(r) = all.iter().find(|r| r.name == name) {
        return Ok(r.clone());
    }
    Err(RemoteError::NoSuch {
        name: name.to_string(),
        known: known(&all),
    })
}

/// Register `url` as `name`. Registering the same URL again under the same name is a no-op.
pub async fn add(store: &dyn Store, name: &str, url: &str) -> Result<Remote, RemoteError> {
    check_ref_name(name).map_err(|_| RemoteError::BadName(name.to_string()))?;
    parse_one(url).map_err(|e| RemoteError::BadUrl {
        name: name.to_string(),
        url: url.to_string(),
        reason: e.to_string(),
    })?;
    let remote = Remote {
        name: name.to_string(),
        url: url.trim().to_string(),
    };
    match store
        .compare_and_swap(
            &remote_key(name),
            None,
            Bytes::from(format!("{}\n", remote.url)),
        )
        .await
    {
        Ok(()) => Ok(remote),
        Err(StoreError::CasConflict { .. }) => {
            let existing = get(store, name).await?;
            if existing.url == remote.url {
                Ok(remote)
            } else {
                Err(RemoteError::Exists {
                    name: name.to_string(),
                    url: existing.url,
                })
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Unregister `name` and delete its remote-tracking refs in every volume. Commits that only
/// those refs reached become garbage for `gc`.
pub async fn remove(store: &dyn Store, name: &str) -> Result<Remote, RemoteError> {
    let remote = get(store, name).await?;
    for key in store.list("volumes/").await? {
        let tracking = key
            .split_once("/refs/remotes/")
            .and_then(|(_, r)| r.split_once('/'))
            .is_some_and(|(r, _)| r == name);
        if tracking {
            let current = store.get(&key).await?;
            match store.compare_and_delete(&key, &current).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let key = remote_key(name);
    store
        .compare_and_delete(&key, format!("{}\n", remote.url).as_bytes())
        .await?;
    Ok(remote)
}

/// The registered remote with this URL, if any (URLs compared as parsed).
pub fn find_by_url<'a>(remotes: &'a [Remote], url: &AccessUrl) -> Option<&'a Remote> {
    remotes
        .iter()
        .find(|r| parse_one(&r.url).is_ok_and(|u| &u == url))
}

/// A name for a remote at `url` that is free in `remotes`: the SSH host, the S3 bucket or the
/// directory's name, made a valid name, with `-2`, `-3`... when taken.
pub fn default_name(remotes: &[Remote], url: &AccessUrl) -> String {
    let raw = match url {
        AccessUrl::File { path } => path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        AccessUrl::Ssh { host, .. } => host.clone(),
        AccessUrl::S3 { bucket, .. } => bucket.clone(),
        AccessUrl::Peer { host, .. } => host.clone(),
    };
    let mut base: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .chars()
        .take(100)
        .collect();
    if base.is_empty() {
        base = "remote".into();
    }
    let taken = |n: &str| remotes.iter().any(|r| r.name == n);
    if !taken(&base) {
        return base;
    }
    (2..)
        .map(|i| format!("{base}-{i}"))
        .find(|n| !taken(n))
        .expect("some suffix is free")
}

fn known(all: &[Remote]) -> String {
    if all.is_empty() {
        "none; add one with `horcrux remote add NAME URL`".into()
    } else {
        all.iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What opens a store: [`OpenStore`] without the `Arc`.
pub type OpenStoreFn = dyn Fn(&AccessUrl) -> Result<Arc<dyn Store>, StoreError> + Send + Sync;

/// Open the stores of every registered remote with `open`. A remote that cannot be opened is
/// skipped with a warning: only data fetched lazily from it is affected, and reading that
/// data says what is missing.
pub async fn open_all(
    store: &dyn Store,
    open: &OpenStoreFn,
) -> Result<Vec<(Remote, Arc<dyn Store>)>, RemoteError> {
    let mut out = Vec::new();
    for r in list(store).await? {
        let opened = parse_one(&r.url)
            .map_err(|e| e.to_string())
            .and_then(|u| open(&u).map_err(|e| e.to_string()));
        match opened {
            Ok(s) => out.push((r, s)),
            Err(e) => tracing::warn!(remote = %r.name, url = %r.url, error = %e,
                "cannot open this remote: data fetched lazily from it cannot be read"),
        }
    }
    Ok(out)
}

/// A repository's own stores (mirrors of one repository, in order of preference) followed by
/// its registered remotes as one [`LazyRemotes`] mirror: chunks that a lazy `fetch`/`pull`
/// left on a remote are read from there when the repository lacks them; nothing else ever is.
pub fn with_lazy_remotes(own: Vec<Arc<dyn Store>>, open: OpenStore) -> Vec<Arc<dyn Store>> {
    let registry: Arc<dyn Store> = if own.len() == 1 {
        own[0].clone()
    } else {
        Arc::new(MirrorStore::new(own.clone(), MirrorConfig::default()))
    };
    let mut stores = own;
    stores.push(Arc::new(LazyRemotes::new(registry, open)));
    stores
}

/// Which of `keys` (chunk keys a repository lacks) one of `remotes` holds: the data of
/// versions fetched lazily. A remote that cannot be asked counts as not holding them.
pub async fn held_by(
    remotes: &[Arc<dyn Store>],
    keys: &[String],
) -> std::collections::HashSet<String> {
    let mut found = std::collections::HashSet::new();
    let mut left: Vec<String> = keys.to_vec();
    for remote in remotes {
        if left.is_empty() {
            break;
        }
        let mut still = Vec::new();
        for batch in left.chunks(1000) {
            let there = match remote.exists(batch).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(remote = %remote.describe(), error = %e, "cannot ask this remote");
                    vec![false; batch.len()]
                }
            };
            for (k, t) in batch.iter().zip(there) {
                if t {
                    found.insert(k.clone());
                } else {
                    still.push(k.clone());
                }
            }
        }
        left = still;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileStore;

    #[tokio::test]
    async fn add_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::new(dir.path().to_path_buf());
        assert!(list(&s).await.unwrap().is_empty());
        add(&s, "backup", "s3://bk/amcc").await.unwrap();
        add(&s, "backup", "s3://bk/amcc").await.unwrap(); // idempotent
        let e = add(&s, "backup", "file:///x").await.unwrap_err();
        assert!(matches!(e, RemoteError::Exists { .. }), "{e}");
        assert!(matches!(
            add(&s, "a/b", "file:///x").await,
            Err(RemoteError::BadName(_))
        ));
        assert!(matches!(
            add(&s, "x", "ftp://h/p").await,
            Err(RemoteError::BadUrl { .. })
        ));
        add(&s, "dbhost", "scp://dev@dbhost:/opt/r").await.unwrap();
        let all = list(&s).await.unwrap();
        assert_eq!(
            all.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["backup", "dbhost"]
        );
        // Tracking refs of the removed remote go; others stay.
        s.put(
            "volumes/v/refs/remotes/backup/main",
            Bytes::from_static(b"x\n"),
        )
        .await
        .unwrap();
        s.put(
            "volumes/v/refs/remotes/dbhost/main",
            Bytes::from_static(b"y\n"),
        )
        .await
        .unwrap();
        remove(&s, "backup").await.unwrap();
        assert_eq!(list(&s).await.unwrap().len(), 1);
        assert!(
            s.get("volumes/v/refs/remotes/backup/main")
                .await
                .unwrap_err()
                .is_not_found()
        );
        s.get("volumes/v/refs/remotes/dbhost/main").await.unwrap();
        assert!(matches!(
            remove(&s, "backup").await,
            Err(RemoteError::NoSuch { .. })
        ));
    }

    #[test]
    fn default_names() {
        let taken = vec![Remote {
            name: "dbhost".into(),
            url: "scp://dbhost:/a".into(),
        }];
        let u = parse_one("scp://dev@dbhost:/opt/x").unwrap();
        assert_eq!(default_name(&taken, &u), "dbhost-2");
        assert_eq!(
            find_by_url(&taken, &parse_one("scp://dbhost:/a").unwrap())
                .unwrap()
                .name,
            "dbhost"
        );
        assert_eq!(
            default_name(&[], &parse_one("s3://backups/amcc").unwrap()),
            "backups"
        );
        assert_eq!(
            default_name(&[], &parse_one("file:///srv/repos/amcc copy").unwrap()),
            "amcc-copy"
        );
    }
}

//! `file://` store: a directory on a local or network filesystem. Blocking file I/O runs on
//! tokio's blocking pool, never on async workers.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{Store, StoreError};
use crate::util::write_atomic;

/// A repository in a local directory.
#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file of `key`. Keys may come from peers (`horcrux serve` of this directory), so an
    /// absolute key or one with `..` is refused rather than joined (it would name a file
    /// outside the repository).
    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        super::check_key(self, key)?;
        Ok(self.root.join(key))
    }

    fn err(&self, key: &str, source: io::Error) -> StoreError {
        if source.kind() == io::ErrorKind::NotFound {
            StoreError::NotFound {
                store: self.describe(),
                key: key.to_string(),
            }
        } else {
            StoreError::Io {
                store: self.describe(),
                key: key.to_string(),
                source,
            }
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        key: &str,
        f: impl FnOnce(&FileStore) -> io::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let this = self.clone();
        let key_owned = key.to_string();
        let r = tokio::task::spawn_blocking(move || f(&this))
            .await
            .expect("file store task");
        r.map_err(|e| self.err(&key_owned, e))
    }
}

fn read_range(path: &Path, range: Range<u64>) -> io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let len = (range.end - range.start) as usize;
    f.seek(SeekFrom::Start(range.start))?;
    // Read into uninitialised capacity: zeroing a 1 MiB buffer first was 8 % of a peer
    // server's CPU (bench/peer profile), for bytes overwritten at once.
    let mut buf = Vec::with_capacity(len);
    f.take(len as u64).read_to_end(&mut buf)?;
    if buf.len() < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "range {}..{} is past the end of the object",
                range.start, range.end
            ),
        ));
    }
    Ok(buf)
}

#[async_trait::async_trait]
impl Store for FileStore {
    /// The mtime the filesystem gives a new file (an NFS server's clock, for one).
    async fn now(&self) -> Result<Option<std::time::SystemTime>, StoreError> {
        self.blocking("horcrux.json", |s| {
            let c = FsClock::read(&s.root.join(".clock"))?;
            Ok(Some(c.now()))
        })
        .await
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let p = self.path(key)?;
        self.blocking(key, move |_| read_range(&p, range).map(Bytes::from))
            .await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let p = self.path(key)?;
        self.blocking(key, move |_| {
            let mut v = Vec::new();
            File::open(&p)?.read_to_end(&mut v)?;
            Ok(Bytes::from(v))
        })
        .await
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let p = self.path(key)?;
        self.blocking(key, move |_| write_atomic(&p, &data)).await
    }

    async fn exists(&self, keys: &[String]) -> Result<Vec<bool>, StoreError> {
        let paths = keys
            .iter()
            .map(|k| self.path(k))
            .collect::<Result<Vec<PathBuf>, _>>()?;
        self.blocking("", move |_| Ok(paths.iter().map(|p| p.exists()).collect()))
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .list_sizes(prefix)
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    async fn list_sizes(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        self.blocking("", move |_| {
            let mut out = Vec::new();
            walk(&root, &root, &prefix, &mut out)?;
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let p = self.path(key)?;
        self.blocking(key, move |_| match fs::remove_file(&p) {
            Ok(()) => crate::util::sync_dir(p.parent().expect("keys have a directory")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        })
        .await
    }

    async fn compare_and_delete(&self, key: &str, expected: &[u8]) -> Result<(), StoreError> {
        let p = self.path(key)?;
        let expected = expected.to_vec();
        let store = self.describe();
        let key_s = key.to_string();
        let same = self
            .blocking(key, move |_| {
                // Under the same lock as `compare_and_swap`: a swap and a delete of one ref
                // never interleave.
                let dir = p.parent().expect("ref has a parent");
                let _lock = DirLock::acquire(&dir.join(".lock.d"))?;
                if fs::read(&p)? != expected {
                    return Ok(false);
                }
                fs::remove_file(&p)?;
                crate::util::sync_dir(dir)?;
                Ok(true)
            })
            .await?;
        if same {
            Ok(())
        } else {
            Err(StoreError::CasConflict { store, key: key_s })
        }
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Bytes,
    ) -> Result<(), StoreError> {
        let p = self.path(key)?;
        let expected = expected.map(<[u8]>::to_vec);
        let store = self.describe();
        let key_s = key.to_string();
        let r = self
            .blocking(key, move |_| {
                // Writers are serialised by an atomic `mkdir` of `.lock.d` next to the ref: the
                // same protocol the SSH store uses, so local and remote writers of one
                // repository exclude each other.
                let dir = p.parent().expect("ref has a parent");
                fs::create_dir_all(dir)?;
                let _lock = DirLock::acquire(&dir.join(".lock.d"))?;
                let current = match fs::read(&p) {
                    Ok(v) => Some(v),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                    Err(e) => return Err(e),
                };
                if current.as_deref() != expected.as_deref() {
                    return Ok(false);
                }
                write_atomic(&p, &new)?;
                Ok(true)
            })
            .await?;
        if r {
            Ok(())
        } else {
            Err(StoreError::CasConflict { store, key: key_s })
        }
    }

    async fn put_file(&self, key: &str, src: &Path) -> Result<(), StoreError> {
        let dest = self.path(key)?;
        let src = src.to_path_buf();
        self.blocking(key, move |_| {
            let dir = dest.parent().expect("keys have a directory");
            fs::create_dir_all(dir)?;
            let tmp = crate::util::temp_name(&dest);
            let r = fs::copy(&src, &tmp)
                .and_then(|_| File::open(&tmp)?.sync_all())
                .and_then(|_| fs::rename(&tmp, &dest))
                .and_then(|_| crate::util::sync_dir(dir));
            if r.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            r
        })
        .await
    }

    async fn get_to_file(&self, key: &str, dest: &Path) -> Result<(), StoreError> {
        let src = self.path(key)?;
        let dest = dest.to_path_buf();
        self.blocking(key, move |_| {
            let tmp = crate::util::temp_name(&dest);
            if let Some(d) = dest.parent() {
                fs::create_dir_all(d)?;
            }
            let r = fs::copy(&src, &tmp)
                .and_then(|_| File::open(&tmp)?.sync_all())
                .and_then(|_| fs::rename(&tmp, &dest));
            if r.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            r
        })
        .await
    }
}

/// A lock held by the existence of a directory (atomic `mkdir`), released on drop.
/// A lock older than [`STALE_LOCK`] is considered abandoned by a crashed writer and broken.
struct DirLock(PathBuf);

const STALE_LOCK: std::time::Duration = std::time::Duration::from_secs(60);

impl DirLock {
    fn acquire(path: &Path) -> io::Result<Self> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut wait = std::time::Duration::from_millis(5);
        let mut clock: Option<FsClock> = None;
        loop {
            match fs::create_dir(path) {
                Ok(()) => return Ok(Self(path.to_path_buf())),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let clock = match &clock {
                        Some(c) => c,
                        None => clock.insert(FsClock::read(path)?),
                    };
                    let age = fs::metadata(path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| clock.now().duration_since(t).ok());
                    if age.is_some_and(|a| a > STALE_LOCK) {
                        tracing::warn!(lock = %path.display(), "breaking a stale ref lock");
                        let _ = fs::remove_dir(path);
                        continue;
                    }
                    if std::time::Instant::now() > deadline {
                        return Err(io::Error::new(
                            io::ErrorKind::WouldBlock,
                            format!(
                                "ref lock {} is held by another writer; retry, or remove it if no horcrux is writing",
                                path.display()
                            ),
                        ));
                    }
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(std::time::Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The time of the filesystem a lock lives on, by which the lock's age is judged: its mtime
/// was set by that filesystem (by the NFS server, for one), and this host's clock may be
/// skewed from it — by hours, on a host whose clock is wrong. Judged by the local clock, a
/// host ahead would break every live lock as stale, and two writers would both move a ref.
#[derive(Debug)]
struct FsClock {
    /// The mtime the filesystem gave a file made just now...
    stamped: std::time::SystemTime,
    /// ...at this moment of the local monotonic clock.
    at: std::time::Instant,
}

impl FsClock {
    /// Create (and remove) an empty probe file beside `lock` and read its mtime.
    fn read(lock: &Path) -> io::Result<Self> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let probe = lock.with_extension(format!("clock.{}.{n}", std::process::id()));
        let at = std::time::Instant::now();
        let f = fs::File::create(&probe)?;
        let stamped = f.metadata().and_then(|m| m.modified());
        drop(f);
        let _ = fs::remove_file(&probe);
        Ok(Self {
            stamped: stamped?,
            at,
        })
    }

    fn now(&self) -> std::time::SystemTime {
        self.stamped + self.at.elapsed()
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

fn walk(root: &Path, dir: &Path, prefix: &str, out: &mut Vec<(String, u64)>) -> io::Result<()> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in rd {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue; // temp files and locks
        }
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .into_owned();
        let ft = entry.file_type()?;
        if ft.is_dir() {
            let rel_dir = format!("{rel}/");
            if rel_dir.starts_with(prefix) || prefix.starts_with(&rel_dir) {
                walk(root, &path, prefix, out)?;
            }
        } else if rel.starts_with(prefix) {
            let len = match entry.metadata() {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // removed meanwhile
                Err(e) => return Err(e),
            };
            out.push((rel, len));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn basic_operations() {
        let d = tempfile::tempdir().unwrap();
        let s = FileStore::new(d.path().to_path_buf());
        s.put("chunks/ab/x", Bytes::from_static(b"hello world"))
            .await
            .unwrap();
        assert_eq!(s.get_range("chunks/ab/x", 6..11).await.unwrap(), "world");
        assert!(s.get_range("chunks/ab/x", 6..12).await.is_err());
        assert!(s.get("nope").await.unwrap_err().is_not_found());
        assert_eq!(
            s.exists(&["chunks/ab/x".into(), "y".into()]).await.unwrap(),
            vec![true, false]
        );
        assert_eq!(
            s.list("chunks/").await.unwrap(),
            vec!["chunks/ab/x".to_string()]
        );
        s.compare_and_swap("refs/main", None, Bytes::from_static(b"1"))
            .await
            .unwrap();
        assert!(matches!(
            s.compare_and_swap("refs/main", None, Bytes::from_static(b"2"))
                .await,
            Err(StoreError::CasConflict { .. })
        ));
        s.compare_and_swap("refs/main", Some(b"1"), Bytes::from_static(b"2"))
            .await
            .unwrap();
        assert_eq!(s.get("refs/main").await.unwrap(), "2");
        assert_eq!(
            s.list_sizes("chunks/").await.unwrap(),
            vec![("chunks/ab/x".to_string(), 11)]
        );
        s.delete("chunks/ab/x").await.unwrap();
        s.delete("chunks/ab/x").await.unwrap(); // absent: not an error
        assert!(s.list("chunks/").await.unwrap().is_empty());
        assert!(matches!(
            s.compare_and_delete("refs/main", b"1").await,
            Err(StoreError::CasConflict { .. })
        ));
        s.compare_and_delete("refs/main", b"2").await.unwrap();
        assert!(s.get("refs/main").await.unwrap_err().is_not_found());
        assert!(
            s.compare_and_delete("refs/main", b"2")
                .await
                .unwrap_err()
                .is_not_found()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_compare_and_swap_loses_no_update() {
        let d = tempfile::tempdir().unwrap();
        let s = Arc::new(FileStore::new(d.path().to_path_buf()));
        s.put("refs/n", Bytes::from_static(b"0")).await.unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move {
                    for _ in 0..10 {
                        loop {
                            let cur = s.get("refs/n").await.unwrap();
                            let n: u32 = std::str::from_utf8(&cur).unwrap().parse().unwrap();
                            let next = Bytes::from((n + 1).to_string());
                            match s.compare_and_swap("refs/n", Some(&cur), next).await {
                                Ok(()) => break,
                                Err(StoreError::CasConflict { .. }) => continue,
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(s.get("refs/n").await.unwrap(), "80");
        assert!(!d.path().join("refs/.lock.d").exists());
    }
}

//! `Volume`: the filesystem semantics of one mounted version, free of any protocol. The FUSE
//! adapter (crate `horcrux-fuse`) maps each kernel request to one call here; tests call it
//! directly without a kernel.
//!
//! Threading: methods are synchronous and called from FUSE worker threads. Data reads block on
//! futures run by the injected tokio runtime (`Handle::block_on`); they never run on a runtime
//! worker themselves.

mod attr;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::runtime::Handle;

pub use attr::{Attr, StatFs};

use crate::fetch::{FetchError, Fetcher};
use crate::manifest::{ChunkInfo, Manifest, ManifestError, NodeKind, ROOT_INO};

/// Errors of filesystem operations; [`VolumeError::errno`] is the one errno mapping.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("invalid argument")]
    Invalid,
    #[error("no such attribute")]
    NoXattr,
    #[error("read-only file system")]
    ReadOnly,
    #[error("bad file handle")]
    BadHandle,
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
}

impl VolumeError {
    pub fn errno(&self) -> i32 {
        match self {
            VolumeError::NotFound => libc::ENOENT,
            VolumeError::NotDir => libc::ENOTDIR,
            VolumeError::IsDir => libc::EISDIR,
            VolumeError::Invalid => libc::EINVAL,
            VolumeError::NoXattr => libc::ENODATA,
            VolumeError::ReadOnly => libc::EROFS,
            VolumeError::BadHandle => libc::EBADF,
            VolumeError::Manifest(_) | VolumeError::Fetch(_) => libc::EIO,
        }
    }
}

/// Receives directory entries; returns `true` when full (stop listing).
pub trait DirSink {
    /// `offset` is the cookie to resume after this entry.
    fn add(&mut self, name: &[u8], offset: u64, attr: &Attr) -> bool;
}

/// State of one open file.
#[derive(Debug)]
struct OpenFile {
    /// Sequential-read detection: where the next read starts if the reader streams.
    next: u64,
    /// Current prefetch window in bytes (0 = not sequential).
    window: u64,
    /// Prefetch has been issued up to this file offset.
    prefetched_to: u64,
    /// Chunks this handle pins in the cache (never evicted while open).
    pinned: std::collections::HashSet<crate::ids::ChunkId>,
}

/// One mounted version of a volume.
#[derive(Debug)]
pub struct Volume {
    manifest: Arc<Manifest>,
    fetcher: Arc<Fetcher>,
    runtime: Handle,
    chunk_infos: Mutex<lru::LruCache<u64, Arc<ChunkInfo>>>,
    handles: Mutex<HashMap<u64, OpenFile>>,
    next_fh: AtomicU64,
    statfs: std::sync::OnceLock<StatFs>,
}

/// Largest sequential prefetch window.
const MAX_PREFETCH: u64 = 64 << 20;

/// Entries returned per readdir query.
const READDIR_BATCH: usize = 512;

impl Volume {
    pub fn new(manifest: Arc<Manifest>, fetcher: Arc<Fetcher>, runtime: Handle) -> Self {
        Self {
            manifest,
            fetcher,
            runtime,
            chunk_infos: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(4096).unwrap(),
            )),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            statfs: std::sync::OnceLock::new(),
        }
    }

    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    fn node(&self, ino: u64) -> Result<crate::manifest::Node, VolumeError> {
        self.manifest.node(ino)?.ok_or(VolumeError::NotFound)
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr, VolumeError> {
        let p = self.node(parent)?;
        if p.kind != NodeKind::Dir {
            return Err(VolumeError::NotDir);
        }
        let n = self
            .manifest
            .lookup(parent, name)?
            .ok_or(VolumeError::NotFound)?;
        Ok(Attr::from_node(&n, self.manifest.header().block_size))
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr, VolumeError> {
        Ok(Attr::from_node(
            &self.node(ino)?,
            self.manifest.header().block_size,
        ))
    }

    /// List directory `ino` from cookie `offset` (0 = start). Cookies 1 and 2 are `.` and `..`;
    /// entry `seq` of the catalog has cookie `seq + 3`.
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        sink: &mut dyn DirSink,
    ) -> Result<(), VolumeError> {
        let dir = self.node(ino)?;
        if dir.kind != NodeKind::Dir {
            return Err(VolumeError::NotDir);
        }
        let bs = self.manifest.header().block_size;
        if offset == 0 && sink.add(b".", 1, &Attr::from_node(&dir, bs)) {
            return Ok(());
        }
        if offset <= 1 {
            let parent = if dir.ino == ROOT_INO {
                dir.clone()
            } else {
                self.node(dir.parent)?
            };
            if sink.add(b"..", 2, &Attr::from_node(&parent, bs)) {
                return Ok(());
            }
        }
        let mut start = offset.saturating_sub(2);
        loop {
            let batch = self.manifest.readdir(ino, start, READDIR_BATCH)?;
            let Some(last) = batch.last() else {
                return Ok(());
            };
            start = last.seq + 1;
            let n = batch.len();
            for e in batch {
                if sink.add(&e.name, e.seq + 3, &Attr::from_node(&e.node, bs)) {
                    return Ok(());
                }
            }
            if n < READDIR_BATCH {
                return Ok(());
            }
        }
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, VolumeError> {
        let n = self.node(ino)?;
        match (n.kind, n.target) {
            (NodeKind::Symlink, Some(t)) => Ok(t),
            _ => Err(VolumeError::Invalid),
        }
    }

    /// Open a file for reading; writes are refused (this version is read-only).
    pub fn open(&self, ino: u64, write: bool) -> Result<u64, VolumeError> {
        let n = self.node(ino)?;
        match n.kind {
            NodeKind::Dir => return Err(VolumeError::IsDir),
            NodeKind::File => {}
            _ => return Err(VolumeError::Invalid),
        }
        if write {
            return Err(VolumeError::ReadOnly);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(
            fh,
            OpenFile {
                next: 0,
                window: 0,
                prefetched_to: 0,
                pinned: Default::default(),
            },
        );
        Ok(fh)
    }

    pub fn release(&self, fh: u64) {
        if let Some(of) = self.handles.lock().remove(&fh) {
            for id in of.pinned {
                self.fetcher.cache().unpin(&id);
            }
        }
    }

    fn chunk_info(&self, idx: u64) -> Result<Arc<ChunkInfo>, VolumeError> {
        if let Some(c) = self.chunk_infos.lock().get(&idx) {
            return Ok(c.clone());
        }
        let info = self.manifest.chunk(idx)?.ok_or_else(|| {
            VolumeError::Manifest(ManifestError::Invalid {
                path: self.manifest.path().display().to_string(),
                what: format!("extent refers to missing chunk {idx}"),
            })
        })?;
        // The manifest is verified as a whole, but check the block list against the chunk id
        // too: it is cheap and keeps a block from being accepted under the wrong chunk.
        crate::hashtree::verify_outboard(
            info.id,
            info.len,
            self.manifest.header().block_size,
            &info.blocks,
        )
        .map_err(|e| VolumeError::Fetch(FetchError::Corrupt(Arc::new(e))))?;
        let info = Arc::new(info);
        self.chunk_infos.lock().put(idx, info.clone());
        Ok(info)
    }

    /// Read up to `size` bytes at `offset`. Short only at end of file. Holes read as zeros.
    pub fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Bytes, VolumeError> {
        let node = self.node(ino)?;
        if node.kind != NodeKind::File {
            return Err(VolumeError::IsDir);
        }
        if offset >= node.size || size == 0 {
            return Ok(Bytes::new());
        }
        let end = (offset + size as u64).min(node.size);
        let extents = self.manifest.extents(ino, offset..end)?;
        let mut parts = Vec::with_capacity(extents.len());
        for e in &extents {
            let info = self.chunk_info(e.chunk)?;
            self.pin_for(fh, &info);
            let s = offset.max(e.file_off);
            let t = end.min(e.file_off + e.len);
            let coff = e.chunk_off + (s - e.file_off);
            let cend = coff + (t - s);
            if cend > info.len {
                return Err(VolumeError::Manifest(ManifestError::Invalid {
                    path: self.manifest.path().display().to_string(),
                    what: format!(
                        "extent of inode {ino} runs past the end of chunk {}",
                        info.id
                    ),
                }));
            }
            parts.push((s, t, info, coff..cend));
        }
        // Warm path: every piece in the cache, read on this (FUSE worker) thread.
        let mut pieces = Vec::with_capacity(parts.len());
        let mut missing = Vec::new();
        for (s, t, info, r) in parts {
            match self.fetcher.read_cached(&info, r.clone()) {
                Some(b) => pieces.push((s, t, b)),
                None => missing.push((s, t, info, r)),
            }
        }
        if !missing.is_empty() {
            let fetcher = self.fetcher.clone();
            let fetched = self.runtime.block_on(async move {
                let futs = missing.into_iter().map(|(s, t, info, r)| {
                    let f = fetcher.clone();
                    async move { f.read(&info, r).await.map(|b| (s, t, b)) }
                });
                futures_join_all(futs).await
            })?;
            pieces.extend(fetched);
        }
        self.readahead(ino, fh, offset, end, node.size);
        // Assemble, zero-filling holes between extents.
        if pieces.len() == 1 && pieces[0].0 == offset && pieces[0].1 == end {
            return Ok(pieces.into_iter().next().expect("one").2);
        }
        let mut out = BytesMut::zeroed((end - offset) as usize);
        for (s, t, b) in pieces {
            out[(s - offset) as usize..(t - offset) as usize].copy_from_slice(&b);
        }
        Ok(out.freeze())
    }

    /// Ramp a prefetch window for sequential readers (mountpoint-s3 style): it starts at two
    /// blocks on the second consecutive read and doubles up to `MAX_PREFETCH`; a seek resets it.
    /// Random readers never prefetch.
    fn readahead(&self, ino: u64, fh: u64, offset: u64, end: u64, size: u64) {
        let bs = self.manifest.header().block_size as u64;
        let (from, to) = {
            let mut h = self.handles.lock();
            let Some(of) = h.get_mut(&fh) else { return };
            if offset == of.next && offset != 0 {
                of.window = (of.window * 2).clamp(2 * bs, MAX_PREFETCH);
            } else if offset != of.next {
                of.window = 0;
                of.prefetched_to = 0;
            }
            of.next = end;
            if of.window == 0 {
                return;
            }
            let from = end.max(of.prefetched_to);
            let to = (end + of.window).min(size);
            if from >= to {
                return;
            }
            of.prefetched_to = to;
            (from, to)
        };
        let extents = match self.manifest.extents(ino, from..to) {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(error = %e, "prefetch: extent lookup failed");
                return;
            }
        };
        let _guard = self.runtime.enter();
        for e in extents {
            let Ok(info) = self.chunk_info(e.chunk) else {
                continue;
            };
            let s = e.chunk_off + from.max(e.file_off) - e.file_off;
            let t = e.chunk_off + to.min(e.file_off + e.len) - e.file_off;
            if s >= t {
                continue;
            }
            let blocks = (s / bs) as u32..((t - 1) / bs) as u32 + 1;
            self.fetcher.prefetch(&info, blocks);
        }
    }

    fn pin_for(&self, fh: u64, info: &ChunkInfo) {
        let mut h = self.handles.lock();
        if let Some(of) = h.get_mut(&fh) {
            if of.pinned.insert(info.id) {
                self.fetcher.cache().pin(&info.id);
            }
        }
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>, VolumeError> {
        self.node(ino)?;
        self.manifest.xattr(ino, name)?.ok_or(VolumeError::NoXattr)
    }

    pub fn listxattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, VolumeError> {
        self.node(ino)?;
        Ok(self.manifest.xattr_names(ino)?)
    }

    pub fn statfs(&self) -> Result<StatFs, VolumeError> {
        // Totals need a scan of the catalog: compute once per mount.
        if let Some(s) = self.statfs.get() {
            return Ok(s.clone());
        }
        let s = self.manifest.stats()?;
        let s = StatFs::read_only(s.bytes, s.nodes);
        Ok(self.statfs.get_or_init(|| s).clone())
    }
}

/// Await all futures concurrently, failing on the first error (keeps dependencies small).
async fn futures_join_all<T, E>(
    futs: impl IntoIterator<Item = impl std::future::Future<Output = Result<T, E>> + Send + 'static>,
) -> Result<Vec<T>, E>
where
    T: Send + 'static,
    E: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("read task panicked")?);
    }
    Ok(out)
}

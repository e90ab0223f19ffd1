//! `Volume`: the filesystem semantics of one mounted version, free of any protocol. The FUSE
//! adapter (crate `horcrux-fuse`) maps each kernel request to one call here; tests call it
//! directly without a kernel.
//!
//! A volume is a base version (an immutable manifest, read through the fetcher) plus, when
//! mounted writable, an [`Overlay`] of local changes: every query asks the overlay first and
//! falls back to the base (`write.rs` holds the mutations, `changes.rs` status/diff/discard).
//! Base inode numbers are kept; new nodes are numbered above the base's largest.
//!
//! Threading: methods are synchronous and called from FUSE worker threads. Data reads block on
//! futures run by the injected tokio runtime (`Handle::block_on`); they never run on a runtime
//! worker themselves. Lock order: overlay state, then the overlay's journal/file locks, then
//! the handle table.

mod attr;
mod changes;
mod hydrate;
mod passthrough;
mod snapshot;
mod write;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::runtime::Handle;

pub use attr::{Attr, StatFs};
pub use changes::{Change, ChangeKind, FileDiff, MetaChange, Status};
pub use hydrate::BlockPlan;
pub use passthrough::{
    BackingToken, DEFAULT_MIN_SIZE, Opened, PassthroughConfig, PassthroughStats, Register,
};
pub use snapshot::{ChunkSink, Frozen, SnapshotStats};
pub use write::{Ctx, SetAttr, TimeSet};

use crate::fetch::{FetchError, Fetcher};
use crate::manifest::{ChunkInfo, Manifest, ManifestError, Node, NodeKind, ROOT_INO};
use crate::overlay::{Overlay, OverlayError, State};

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
    #[error("file exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("file name too long")]
    NameTooLong,
    #[error("operation not supported")]
    NotSupported,
    #[error("device or resource busy: {0}")]
    Busy(String),
    /// The file is open with passthrough (served by the kernel from a backing file): it
    /// cannot be opened for writing or truncated until those handles are closed.
    #[error("text file busy (open with passthrough)")]
    TextBusy,
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    #[error(transparent)]
    Store(Arc<crate::store::StoreError>),
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
            VolumeError::Exists => libc::EEXIST,
            VolumeError::NotEmpty => libc::ENOTEMPTY,
            VolumeError::NotPermitted => libc::EPERM,
            VolumeError::NameTooLong => libc::ENAMETOOLONG,
            VolumeError::NotSupported => libc::EOPNOTSUPP,
            VolumeError::Busy(_) => libc::EBUSY,
            VolumeError::TextBusy => libc::ETXTBSY,
            VolumeError::Overlay(e) => e.errno(),
            VolumeError::Manifest(_) | VolumeError::Fetch(_) | VolumeError::Store(_) => libc::EIO,
        }
    }
}

/// Receives directory entries; returns `true` when full (stop listing).
pub trait DirSink {
    /// `offset` is the cookie to resume after this entry.
    fn add(&mut self, name: &[u8], offset: u64, attr: &Attr) -> bool;
}

/// Where the kernel caches what a volume reports; told when the volume changes behind the
/// kernel's back (a discard), so readers never see stale data or names.
pub trait KernelCache: Send + Sync + std::fmt::Debug {
    fn inval_inode(&self, ino: u64);
    fn inval_entry(&self, parent: u64, name: &[u8]);
}

/// State of one open file.
#[derive(Debug)]
struct OpenFile {
    ino: u64,
    /// Opened with `O_APPEND`: every write goes to the end.
    append: bool,
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
    /// The base version; replaced (never mutated) when a commit rebases the overlay on it.
    manifest: parking_lot::RwLock<Arc<Manifest>>,
    fetcher: Arc<Fetcher>,
    runtime: Handle,
    chunk_infos: Mutex<lru::LruCache<u64, Arc<ChunkInfo>>>,
    handles: Mutex<HashMap<u64, OpenFile>>,
    next_fh: AtomicU64,
    statfs: Mutex<Option<StatFs>>,
    /// Local changes; `None` for a read-only view of the base.
    overlay: Option<Overlay>,
    /// Largest base inode number: inodes above it exist only in the overlay.
    base_max: AtomicU64,
    kernel: parking_lot::RwLock<Option<Arc<dyn KernelCache>>>,
    /// Held shared by a data write for its whole length, exclusively by a freeze.
    gate: parking_lot::RwLock<()>,
    /// Inode generation: bumped by each checkout (see [`Attr::generation`]).
    generation: AtomicU64,
    /// Passthrough opens of fully cached files (`passthrough.rs`).
    passthrough: passthrough::Passthrough,
    /// Start-up profile recording (`profile.rs`), set once at mount.
    recorder: std::sync::OnceLock<Arc<crate::profile::Recorder>>,
}

/// Largest sequential prefetch window.
const MAX_PREFETCH: u64 = 64 << 20;

/// Entries returned per readdir query.
const READDIR_BATCH: usize = 512;

/// Readdir cookies at or above this belong to the overlay's entries of a directory.
const OVERLAY_COOKIES: u64 = 1 << 62;

impl Volume {
    /// A read-only view of `manifest`.
    pub fn new(manifest: Arc<Manifest>, fetcher: Arc<Fetcher>, runtime: Handle) -> Self {
        Self::build(manifest, fetcher, runtime, None, 0)
    }

    /// A writable volume: `manifest` with the changes in `overlay` on top. The overlay's base
    /// must have been set to this manifest ([`Overlay::set_base`]).
    pub fn with_overlay(
        manifest: Arc<Manifest>,
        fetcher: Arc<Fetcher>,
        runtime: Handle,
        overlay: Overlay,
    ) -> Result<Self, VolumeError> {
        let base_max = manifest.max_ino()?;
        Ok(Self::build(
            manifest,
            fetcher,
            runtime,
            Some(overlay),
            base_max,
        ))
    }

    fn build(
        manifest: Arc<Manifest>,
        fetcher: Arc<Fetcher>,
        runtime: Handle,
        overlay: Option<Overlay>,
        base_max: u64,
    ) -> Self {
        Self {
            overlay,
            base_max: AtomicU64::new(base_max),
            kernel: parking_lot::RwLock::new(None),
            gate: parking_lot::RwLock::new(()),
            generation: AtomicU64::new(0),
            manifest: parking_lot::RwLock::new(manifest),
            fetcher,
            runtime,
            chunk_infos: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(4096).unwrap(),
            )),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            statfs: Mutex::new(None),
            passthrough: passthrough::Passthrough::new(PassthroughConfig::default()),
            recorder: std::sync::OnceLock::new(),
        }
    }

    /// The base version now.
    pub fn manifest(&self) -> Arc<Manifest> {
        self.manifest.read().clone()
    }

    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }

    /// Open file handles (a switch to another version needs none).
    pub fn open_handles(&self) -> usize {
        self.handles.lock().len()
    }

    pub fn overlay(&self) -> Option<&Overlay> {
        self.overlay.as_ref()
    }

    /// Is this volume writable (has an overlay)?
    pub fn writable(&self) -> bool {
        self.overlay.is_some()
    }

    /// Record the base blocks reads touch into `r` (a start-up profile). Set once, before the
    /// mount serves reads; a second call is ignored.
    pub fn set_recorder(&self, r: Arc<crate::profile::Recorder>) {
        let _ = self.recorder.set(r);
    }

    /// Chunk `idx` of the base manifest, its block list checked against its id.
    pub fn chunk_info_by_idx(&self, idx: u64) -> Result<Arc<ChunkInfo>, VolumeError> {
        self.chunk_info(idx)
    }

    /// Register where the kernel caches this volume (the FUSE adapter does at mount).
    pub fn set_kernel_cache(&self, k: Arc<dyn KernelCache>) {
        *self.kernel.write() = Some(k);
    }

    /// Does `ino` exist in the base version?
    fn is_base(&self, ino: u64) -> bool {
        self.overlay.is_none() || ino <= self.base_max.load(Ordering::Relaxed)
    }

    fn attr(&self, n: &Node) -> Attr {
        let mut a = Attr::from_node(n, self.manifest().header().block_size);
        a.generation = self.generation.load(Ordering::Relaxed);
        if self.overlay.is_some() {
            // Unlinked-but-open files report 0 links.
            a.nlink = n.nlink;
        }
        a
    }

    /// The current node `ino` (overlay first).
    fn node(&self, ino: u64) -> Result<Node, VolumeError> {
        match &self.overlay {
            Some(ov) => self.node_in(&ov.state.read(), ino),
            None => self.manifest().node(ino)?.ok_or(VolumeError::NotFound),
        }
    }

    fn node_in(&self, st: &State, ino: u64) -> Result<Node, VolumeError> {
        if let Some(n) = st.nodes.get(&ino) {
            return Ok(n.node.clone());
        }
        if !self.is_base(ino) {
            return Err(VolumeError::NotFound);
        }
        self.manifest().node(ino)?.ok_or(VolumeError::NotFound)
    }

    /// The inode named `name` in directory `parent`, as the overlay and base together say.
    fn lookup_in(&self, st: &State, parent: u64, name: &[u8]) -> Result<Option<u64>, VolumeError> {
        if let Some(e) = st.dirents.get(&parent).and_then(|m| m.get(name)) {
            return Ok((e.ino != 0).then_some(e.ino));
        }
        if !self.is_base(parent) {
            return Ok(None);
        }
        Ok(self.manifest().lookup(parent, name)?.map(|n| n.ino))
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr, VolumeError> {
        if name.len() > NAME_MAX {
            return Err(VolumeError::NameTooLong);
        }
        let Some(ov) = &self.overlay else {
            let p = self.node(parent)?;
            if p.kind != NodeKind::Dir {
                return Err(VolumeError::NotDir);
            }
            let n = self
                .manifest()
                .lookup(parent, name)?
                .ok_or(VolumeError::NotFound)?;
            return Ok(self.attr(&n));
        };
        let st = ov.state.read();
        let p = self.node_in(&st, parent)?;
        if p.kind != NodeKind::Dir {
            return Err(VolumeError::NotDir);
        }
        let ino = self
            .lookup_in(&st, parent, name)?
            .ok_or(VolumeError::NotFound)?;
        Ok(self.attr(&self.node_in(&st, ino)?))
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr, VolumeError> {
        Ok(self.attr(&self.node(ino)?))
    }

    /// List directory `ino` from cookie `offset` (0 = start). Cookies 1 and 2 are `.` and `..`;
    /// entry `seq` of the base has cookie `seq + 3`; the overlay's entries follow the base's,
    /// with cookies from [`OVERLAY_COOKIES`] on (base entries the overlay hides or replaces
    /// are skipped in the first part).
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        sink: &mut dyn DirSink,
    ) -> Result<(), VolumeError> {
        match &self.overlay {
            Some(ov) => self.readdir_from(&ov.state.read(), ino, offset, sink),
            None => self.readdir_from(&State::default(), ino, offset, sink),
        }
    }

    fn readdir_from(
        &self,
        st: &State,
        ino: u64,
        offset: u64,
        sink: &mut dyn DirSink,
    ) -> Result<(), VolumeError> {
        let dir = self.node_in(st, ino)?;
        if dir.kind != NodeKind::Dir {
            return Err(VolumeError::NotDir);
        }
        if offset == 0 && sink.add(b".", 1, &self.attr(&dir)) {
            return Ok(());
        }
        if offset <= 1 {
            let parent = if dir.ino == ROOT_INO {
                dir.clone()
            } else {
                self.node_in(st, dir.parent)?
            };
            if sink.add(b"..", 2, &self.attr(&parent)) {
                return Ok(());
            }
        }
        let overlay_entries = st.dirents.get(&ino);
        if offset < OVERLAY_COOKIES && self.is_base(ino) {
            let mut start = offset.saturating_sub(2);
            loop {
                let batch = self.manifest().readdir(ino, start, READDIR_BATCH)?;
                let Some(last) = batch.last() else {
                    break;
                };
                start = last.seq + 1;
                let n = batch.len();
                for e in batch {
                    if overlay_entries.is_some_and(|m| m.contains_key(&e.name)) {
                        continue;
                    }
                    let node = match st.nodes.get(&e.node.ino) {
                        Some(o) => &o.node,
                        None => &e.node,
                    };
                    if sink.add(&e.name, e.seq + 3, &self.attr(node)) {
                        return Ok(());
                    }
                }
                if n < READDIR_BATCH {
                    break;
                }
            }
        }
        let Some(entries) = overlay_entries else {
            return Ok(());
        };
        let mut live: Vec<_> = entries
            .iter()
            .filter(|(_, e)| e.ino != 0 && OVERLAY_COOKIES + e.cookie >= offset)
            .collect();
        live.sort_by_key(|(_, e)| e.cookie);
        for (name, e) in live {
            let node = self.node_in(st, e.ino)?;
            if sink.add(name, OVERLAY_COOKIES + e.cookie + 1, &self.attr(&node)) {
                return Ok(());
            }
        }
        Ok(())
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, VolumeError> {
        let n = self.node(ino)?;
        match (n.kind, n.target) {
            (NodeKind::Symlink, Some(t)) => Ok(t),
            _ => Err(VolumeError::Invalid),
        }
    }

    /// Open a file. Writing needs an overlay (else `EROFS`); `append` makes every write go to
    /// the end of the file.
    /// The handle is served by this volume's `read`; [`Volume::open_with`] may pass it through.
    pub fn open(&self, ino: u64, write: bool, append: bool) -> Result<u64, VolumeError> {
        Ok(self.open_with(ino, write, append, None)?.fh)
    }

    fn new_handle(&self, ino: u64, append: bool) -> u64 {
        if let Some(ov) = &self.overlay {
            *ov.state.write().open.entry(ino).or_default() += 1;
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(
            fh,
            OpenFile {
                ino,
                append,
                next: 0,
                window: 0,
                prefetched_to: 0,
                pinned: Default::default(),
            },
        );
        fh
    }

    /// Close a handle: journal the file's pending changes, and drop an unlinked file with its
    /// last handle.
    pub fn release(&self, fh: u64) -> Result<(), VolumeError> {
        let Some(of) = self.handles.lock().remove(&fh) else {
            return Ok(());
        };
        self.passthrough_release(of.ino);
        for id in of.pinned {
            self.fetcher.cache().unpin(&id);
        }
        let Some(ov) = &self.overlay else {
            return Ok(());
        };
        let mut st = ov.state.write();
        let last = match st.open.get_mut(&of.ino) {
            Some(c) if *c > 1 => {
                *c -= 1;
                false
            }
            Some(_) => {
                st.open.remove(&of.ino);
                true
            }
            None => true,
        };
        if last && st.nodes.get(&of.ino).is_some_and(|n| n.node.nlink == 0) {
            let ops = self.forget_unlinked(&st, of.ino);
            ov.apply(&mut st, ops)?;
            return Ok(());
        }
        drop(st);
        ov.flush(of.ino)?;
        Ok(())
    }

    fn chunk_info(&self, idx: u64) -> Result<Arc<ChunkInfo>, VolumeError> {
        if let Some(c) = self.chunk_infos.lock().get(&idx) {
            return Ok(c.clone());
        }
        let info = self.manifest().chunk(idx)?.ok_or_else(|| {
            VolumeError::Manifest(ManifestError::Invalid {
                path: self.manifest().path().display().to_string(),
                what: format!("extent refers to missing chunk {idx}"),
            })
        })?;
        // The manifest is verified as a whole, but check the block list against the chunk id
        // too: it is cheap and keeps a block from being accepted under the wrong chunk.
        crate::hashtree::verify_outboard(
            info.id,
            info.len,
            self.manifest().header().block_size,
            &info.blocks,
        )
        .map_err(|e| VolumeError::Fetch(FetchError::Corrupt(Arc::new(e))))?;
        let info = Arc::new(info);
        self.chunk_infos.lock().put(idx, info.clone());
        Ok(info)
    }

    /// Read up to `size` bytes at `offset`. Short only at end of file. Holes read as zeros.
    pub fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Bytes, VolumeError> {
        // The state is only consulted to plan the read: fetches run without holding it.
        let plan = match &self.overlay {
            Some(ov) => self.plan_read(&ov.state.read(), ino, offset, size)?,
            None => self.plan_read(&State::default(), ino, offset, size)?,
        };
        self.read_planned(ino, fh, offset, plan)
    }

    /// [`Self::read`] with the overlay state already held.
    fn read_in(
        &self,
        st: &State,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<Bytes, VolumeError> {
        let plan = self.plan_read(st, ino, offset, size)?;
        self.read_planned(ino, fh, offset, plan)
    }

    /// Where the bytes of `[offset, offset + size)` of file `ino` come from. Only the pieces of
    /// this range are taken from the overlay's written ranges, never the whole set.
    fn plan_read(
        &self,
        st: &State,
        ino: u64,
        offset: u64,
        size: u32,
    ) -> Result<ReadPlan, VolumeError> {
        let (kind, file_size, data) = match st.nodes.get(&ino) {
            Some(o) => (o.node.kind, o.node.size, o.data.as_ref()),
            None => {
                let n = self.node_in(st, ino)?;
                (n.kind, n.size, None)
            }
        };
        if kind != NodeKind::File {
            return Err(VolumeError::IsDir);
        }
        let end = (offset + size as u64).min(file_size);
        if offset >= end {
            return Ok(ReadPlan::Eof);
        }
        Ok(match data {
            None => ReadPlan::Base { end, file_size },
            Some(d) => {
                let below = offset..end.min(d.base_limit).max(offset);
                let mut pieces = d.written.split(below.clone());
                if end > below.end {
                    pieces.push((below.end..end, true));
                }
                ReadPlan::Changed {
                    end,
                    file_size,
                    base_limit: d.base_limit,
                    pieces,
                }
            }
        })
    }

    fn read_planned(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        plan: ReadPlan,
    ) -> Result<Bytes, VolumeError> {
        let (end, file_size, base_limit, pieces) = match plan {
            ReadPlan::Eof => return Ok(Bytes::new()),
            ReadPlan::Base { end, file_size } => {
                return self.read_base(ino, fh, offset, end, file_size);
            }
            ReadPlan::Changed {
                end,
                file_size,
                base_limit,
                pieces,
            } => (end, file_size, base_limit, pieces),
        };
        // Changed file: base bytes where the overlay does not own them, the data file
        // elsewhere.
        let ov = self
            .overlay
            .as_ref()
            .expect("data state implies an overlay");
        let file = ov.data_file(ino, file_size)?;
        let mut out = BytesMut::zeroed((end - offset) as usize);
        for (r, own) in pieces {
            let dst = &mut out[(r.start - offset) as usize..(r.end - offset) as usize];
            if own {
                read_full_at(&file, dst, r.start).map_err(|e| {
                    VolumeError::Overlay(OverlayError::Io {
                        dir: ov.dir().display().to_string(),
                        source: e,
                    })
                })?;
            } else {
                let b = self.read_base(ino, fh, r.start, r.end, base_limit)?;
                dst[..b.len()].copy_from_slice(&b);
            }
        }
        Ok(out.freeze())
    }

    /// Read `[offset, end)` of the base content of `ino` (`size` bytes long).
    fn read_base(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        end: u64,
        size: u64,
    ) -> Result<Bytes, VolumeError> {
        let node_size = size;
        let t0 = std::time::Instant::now();
        let extents = self.manifest().extents(ino, offset..end)?;
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
                    path: self.manifest().path().display().to_string(),
                    what: format!(
                        "extent of inode {ino} runs past the end of chunk {}",
                        info.id
                    ),
                }));
            }
            parts.push((s, t, info, coff..cend));
        }
        if let Some(rec) = self.recorder.get()
            && rec.active()
        {
            let bs = self.manifest().header().block_size as u64;
            for (_, _, info, r) in &parts {
                if !r.is_empty() {
                    rec.touch(
                        &info.id,
                        (r.start / bs) as u32..((r.end - 1) / bs) as u32 + 1,
                    );
                }
            }
        }
        let t_catalog = t0.elapsed();
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
            let t_cached = t0.elapsed();
            let fetcher = self.fetcher.clone();
            let fetched = self.runtime.block_on(async move {
                let futs = missing.into_iter().map(|(s, t, info, r)| {
                    let f = fetcher.clone();
                    async move { f.read_after_miss(&info, r).await.map(|b| (s, t, b)) }
                });
                futures_join_all(futs).await
            })?;
            pieces.extend(fetched);
            tracing::trace!(
                target: "horcrux::timing",
                catalog_us = t_catalog.as_micros() as u64,
                cache_check_us = (t_cached - t_catalog).as_micros() as u64,
                fetch_us = (t0.elapsed() - t_cached).as_micros() as u64,
                "cold base read"
            );
        }
        self.readahead(ino, fh, offset, end, node_size);
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
        let bs = self.manifest().header().block_size as u64;
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
            // Ask in runs (the fetcher's request unit) rather than a read's worth at a time:
            // once the window is at its largest, every read moves its end by just the read's
            // size, and one request per 1 MiB block cost the source more CPU than the bytes.
            let run = (self.fetcher.run_blocks() as u64 * bs).min(of.window);
            if from >= to || (to - from < run && to < size) {
                return;
            }
            of.prefetched_to = to;
            (from, to)
        };
        let extents = match self.manifest().extents(ino, from..to) {
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
        if let Some(ov) = &self.overlay {
            let st = ov.state.read();
            if st.nodes.get(&ino).is_some_and(|n| n.own_xattrs) {
                return st
                    .xattrs
                    .get(&ino)
                    .and_then(|x| x.get(name).cloned())
                    .ok_or(VolumeError::NoXattr);
            }
            self.node_in(&st, ino)?;
        } else {
            self.node(ino)?;
        }
        self.manifest()
            .xattr(ino, name)?
            .ok_or(VolumeError::NoXattr)
    }

    pub fn listxattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, VolumeError> {
        if let Some(ov) = &self.overlay {
            let st = ov.state.read();
            if st.nodes.get(&ino).is_some_and(|n| n.own_xattrs) {
                return Ok(st
                    .xattrs
                    .get(&ino)
                    .map(|x| x.keys().cloned().collect())
                    .unwrap_or_default());
            }
            self.node_in(&st, ino)?;
        } else {
            self.node(ino)?;
        }
        Ok(self.manifest().xattr_names(ino)?)
    }

    pub fn statfs(&self) -> Result<StatFs, VolumeError> {
        // Base totals need a scan of the catalog: compute once per mount.
        let cached = self.statfs.lock().clone();
        let base = match cached {
            Some(s) => s,
            None => {
                let s = self.manifest().stats()?;
                let s = StatFs::read_only(s.bytes, s.nodes);
                *self.statfs.lock() = Some(s.clone());
                s
            }
        };
        let Some(ov) = &self.overlay else {
            return Ok(base);
        };
        // Writable: room for changes is the overlay disk's.
        let (total, free, avail, files, ffree) = ov.disk_space()?;
        let bs = base.bsize as u64;
        Ok(StatFs {
            blocks: base.blocks + total / bs,
            bfree: free / bs,
            bavail: avail / bs,
            files: base.files + files,
            ffree,
            ..base
        })
    }
}

/// How a read is served, decided under the overlay state.
enum ReadPlan {
    /// At or past the end of the file.
    Eof,
    /// Content unchanged: all from the base.
    Base { end: u64, file_size: u64 },
    /// Changed content: `pieces` of `[offset, end)` tagged `true` come from the data file.
    Changed {
        end: u64,
        file_size: u64,
        base_limit: u64,
        pieces: Vec<(std::ops::Range<u64>, bool)>,
    },
}

/// Longest file name.
pub const NAME_MAX: usize = 255;

/// `pread` until `buf` is full; bytes past the end of the file read as zeros.
fn read_full_at(f: &std::fs::File, buf: &mut [u8], mut off: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => {
                done += n;
                off += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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

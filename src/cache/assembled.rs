//! Assembled files: one regular file holding exactly the bytes of one file of a version, built
//! from cached chunks, so the kernel can serve reads of that file itself (FUSE passthrough)
//! instead of asking the mount daemon.
//!
//! The cache stores chunks, not files: a large file spans several chunk windows, and small
//! files share a packed chunk (FORMAT.md §4). A passthrough open needs one backing file whose
//! bytes are the file's, so a fully cached file is copied once (reflinked where the
//! filesystem can share extents, `copy_file_range` otherwise) into
//! `<cache>/assembled/<2 hex>/<64 hex>`.
//!
//! Invariants:
//! - The name is the blake3 hash of the file's layout (size, block size, and every extent:
//!   file offset, length, chunk id, offset in the chunk). Chunks are content-addressed, so
//!   equal names mean equal bytes, whatever version or volume the file belongs to; a file
//!   of another version (after a checkout) has another name, and an assembled file is never
//!   modified after it got its name.
//! - Only verified cached blocks are copied, every block of every extent must be present, and
//!   holes stay holes (zeros). The copy is written to a temporary name, `fdatasync`ed, then
//!   renamed: a file under its final name is always complete.
//! - Assembled files are derived data: deleting one loses nothing. They count toward the
//!   cache's size bound and are evicted first (least recently used by mtime, touched on
//!   each use), except those pinned by an open [`AssembledFile`] of this process. A file
//!   deleted by another process while open here stays readable through the open descriptor.
//! - Local changes never reach an assembled file: it is opened read-only, and the volume
//!   only passes through files the overlay does not touch.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use parking_lot::Mutex;

use super::{Cache, CacheError};
use crate::hashtree::block_range;
use crate::manifest::ChunkInfo;

/// One extent of a file: `len` bytes at `file_off` are bytes `[chunk_off, chunk_off + len)` of
/// `chunk`.
#[derive(Debug, Clone)]
pub struct Piece {
    pub file_off: u64,
    pub len: u64,
    pub chunk: Arc<ChunkInfo>,
    pub chunk_off: u64,
}

/// Counters of this process (for `cache stats` and the bench).
#[derive(Debug, Default)]
pub struct AssembledCounters {
    /// Files assembled (copied) by this process.
    pub assembled: AtomicU64,
    /// Bytes copied into them.
    pub assembled_bytes: AtomicU64,
    /// Uses of a file already assembled (by this or another process).
    pub reused: AtomicU64,
    /// Assembled files evicted by this process.
    pub evicted: AtomicU64,
}

/// The assembled-files state of a [`Cache`]: pins of open files and single flight of
/// assembly within this process.
#[derive(Debug, Default)]
pub(super) struct Assembled {
    pins: Arc<Mutex<HashMap<String, u32>>>,
    inflight: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Bytes of assembled files as of the last scan or change by this process (an
    /// estimate: other processes add and remove files too; eviction rescans).
    bytes: AtomicU64,
    pub(super) counters: AssembledCounters,
}

impl Assembled {
    pub(super) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// An assembled file, open read-only, pinned against eviction while this value lives.
#[derive(Debug)]
pub struct AssembledFile {
    file: File,
    path: PathBuf,
    key: String,
    len: u64,
    pins: Arc<Mutex<HashMap<String, u32>>>,
}

impl AssembledFile {
    /// The open file (read-only): what a passthrough open registers with the kernel.
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AssembledFile {
    fn drop(&mut self) {
        let mut p = self.pins.lock();
        if let Some(n) = p.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                p.remove(&self.key);
            }
        }
    }
}

/// `struct file_clone_range` of `<linux/fs.h>`.
#[repr(C)]
struct FileCloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}

/// `FICLONERANGE` = `_IOW(0x94, 13, struct file_clone_range)`.
const FICLONERANGE: libc::c_ulong = 0x4020_940d;

/// Sharing granularity asked of FICLONERANGE: offsets and lengths must be multiples of the
/// filesystem block; 4 KiB divides every usual one up to 4 KiB blocks, and chunk windows and
/// 1 MiB blocks are multiples of it.
const CLONE_ALIGN: u64 = 4096;

/// The layout hash naming an assembled file (see the module invariants).
pub fn layout_key(size: u64, block_size: u32, pieces: &[Piece]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"horcrux assembled file v1\0");
    h.update(&size.to_le_bytes());
    h.update(&block_size.to_le_bytes());
    for p in pieces {
        h.update(&p.file_off.to_le_bytes());
        h.update(&p.len.to_le_bytes());
        h.update(&p.chunk.id.0);
        h.update(&p.chunk_off.to_le_bytes());
    }
    h.finalize().to_hex().to_string()
}

impl Cache {
    fn assembled_dir(&self) -> PathBuf {
        self.dir.join("assembled")
    }

    fn assembled_path(&self, key: &str) -> PathBuf {
        self.assembled_dir().join(&key[..2]).join(key)
    }

    /// The assembled file of a file `size` bytes long made of `pieces` (in file order, not
    /// overlapping; gaps are holes), assembling it from cached chunks if needed. `Ok(None)`
    /// when some block of some piece is not cached: the file is not fully cached yet.
    pub fn assembled_file(
        &self,
        size: u64,
        block_size: u32,
        pieces: &[Piece],
    ) -> Result<Option<AssembledFile>, CacheError> {
        let key = layout_key(size, block_size, pieces);
        let path = self.assembled_path(&key);
        if let Some(f) = self.open_assembled(&key, &path, size)? {
            self.assembled
                .counters
                .reused
                .fetch_add(1, Ordering::Relaxed);
            return Ok(Some(f));
        }
        // Single flight within this process: two openers of one file copy it once. (Two
        // processes may both copy it; the renames are atomic and the bytes equal.)
        let cell = self
            .assembled
            .inflight
            .lock()
            .entry(key.clone())
            .or_default()
            .clone();
        let _flight = cell.lock();
        let result = (|| {
            if let Some(f) = self.open_assembled(&key, &path, size)? {
                self.assembled
                    .counters
                    .reused
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(Some(f));
            }
            if !self.assemble(&path, size, block_size, pieces)? {
                return Ok(None);
            }
            self.open_assembled(&key, &path, size)
        })();
        self.assembled.inflight.lock().remove(&key);
        let out = result?;
        if out.is_some()
            && let Some(max) = self.max_size
            && self.total.load(Ordering::Relaxed) + self.assembled.bytes() > max
        {
            self.evict_to(max)?;
        }
        Ok(out)
    }

    /// The assembled file of this layout if it exists already (no copy).
    pub fn existing_assembled(
        &self,
        size: u64,
        block_size: u32,
        pieces: &[Piece],
    ) -> Result<Option<AssembledFile>, CacheError> {
        let key = layout_key(size, block_size, pieces);
        let f = self.open_assembled(&key, &self.assembled_path(&key), size)?;
        if f.is_some() {
            self.assembled
                .counters
                .reused
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(f)
    }

    /// Is every block of every piece cached, and is no copy of this layout running in this
    /// process? (Then [`Cache::assembled_file`] would copy it now.)
    pub fn assembly_ready(&self, size: u64, block_size: u32, pieces: &[Piece]) -> bool {
        let key = layout_key(size, block_size, pieces);
        if self.assembled.inflight.lock().contains_key(&key) {
            return false;
        }
        pieces.iter().all(|p| {
            let Ok(Some(e)) = self.entry(&p.chunk.id) else {
                return false;
            };
            if e.block_size != block_size || e.len != p.chunk.len || p.len == 0 {
                return false;
            }
            let first = (p.chunk_off / block_size as u64) as u32;
            let last = ((p.chunk_off + p.len - 1) / block_size as u64) as u32;
            e.present.read().all(first..last + 1)
        })
    }

    /// Open (and pin, and mark used) the assembled file at `path` if it exists.
    fn open_assembled(
        &self,
        key: &str,
        path: &Path,
        size: u64,
    ) -> Result<Option<AssembledFile>, CacheError> {
        let file = match OpenOptions::new().read(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        let len = file.metadata().map_err(|e| self.io(e))?.len();
        if len != size {
            // Cannot happen with the rename protocol; never serve it.
            tracing::warn!(file = %path.display(), len, size, "assembled file of the wrong size; removed");
            let _ = fs::remove_file(path);
            return Ok(None);
        }
        // Eviction is least recently used by mtime: mark it used. Best effort (read-only fd:
        // use the path).
        let _ = filetime_now(path);
        *self
            .assembled
            .pins
            .lock()
            .entry(key.to_string())
            .or_insert(0) += 1;
        Ok(Some(AssembledFile {
            file,
            path: path.to_path_buf(),
            key: key.to_string(),
            len,
            pins: self.assembled.pins.clone(),
        }))
    }

    /// Copy the pieces into a new file at `path`. `Ok(false)` if a block is not cached.
    fn assemble(
        &self,
        path: &Path,
        size: u64,
        block_size: u32,
        pieces: &[Piece],
    ) -> Result<bool, CacheError> {
        // Every block of every piece present, and the chunk files open, before any copy.
        let mut sources = Vec::with_capacity(pieces.len());
        for p in pieces {
            let Some(e) = self.entry(&p.chunk.id)? else {
                return Ok(false);
            };
            if e.block_size != block_size
                || e.len != p.chunk.len
                || p.chunk_off + p.len > e.len
                || p.len == 0
            {
                return Ok(false);
            }
            let first = (p.chunk_off / block_size as u64) as u32;
            let last = ((p.chunk_off + p.len - 1) / block_size as u64) as u32;
            if !e.present.read().all(first..last + 1) {
                return Ok(false);
            }
            debug_assert!(block_range(e.len, block_size, last).end >= p.chunk_off + p.len);
            sources.push(e);
        }
        let started = Instant::now();
        let dir = path
            .parent()
            .expect("assembled files are in a subdirectory");
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| self.io(e))?;
        }
        let tmp = dir.join(format!(
            ".tmp.{}.{}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("x"),
            super::rand_u32()
        ));
        let out = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| self.io(e))?;
        let copy = || -> io::Result<u64> {
            out.set_len(size)?;
            let mut cloned = 0u64;
            for (p, e) in pieces.iter().zip(&sources) {
                cloned += copy_range(&e.file, p.chunk_off, &out, p.file_off, p.len)?;
            }
            out.sync_data()?;
            Ok(cloned)
        };
        let cloned = match copy() {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(self.io(e));
            }
        };
        drop(out);
        if let Err(e) = fs::rename(&tmp, path) {
            let _ = fs::remove_file(&tmp);
            return Err(self.io(e));
        }
        let bytes: u64 = pieces.iter().map(|p| p.len).sum();
        self.assembled.bytes.fetch_add(bytes, Ordering::Relaxed);
        let c = &self.assembled.counters;
        c.assembled.fetch_add(1, Ordering::Relaxed);
        c.assembled_bytes.fetch_add(bytes, Ordering::Relaxed);
        tracing::debug!(
            file = %path.display(),
            bytes,
            reflinked = cloned,
            ms = started.elapsed().as_millis() as u64,
            "assembled a cached file for passthrough"
        );
        Ok(true)
    }

    /// Assembled files on disk now: (key, path, allocated bytes, mtime).
    fn scan_assembled(&self) -> Vec<(String, PathBuf, u64, SystemTime)> {
        let mut out = Vec::new();
        let Ok(subs) = fs::read_dir(self.assembled_dir()) else {
            return out;
        };
        for sub in subs.flatten() {
            let Ok(files) = fs::read_dir(sub.path()) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    // A copy in progress (or left by a crash: removed once it is old).
                    let old = f
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|a| a.as_secs() > 3600);
                    if old {
                        let _ = fs::remove_file(f.path());
                    }
                    continue;
                }
                let Ok(m) = f.metadata() else { continue };
                use std::os::unix::fs::MetadataExt;
                out.push((
                    name,
                    f.path(),
                    m.blocks() * 512,
                    m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                ));
            }
        }
        out
    }

    /// Evict unpinned assembled files, least recently used first, until they hold at most
    /// `target` bytes. Returns the bytes they still hold.
    pub(super) fn evict_assembled_to(&self, target: u64) -> u64 {
        let mut files = self.scan_assembled();
        let mut held: u64 = files.iter().map(|f| f.2).sum();
        files.sort_by_key(|f| f.3);
        for (key, path, bytes, _) in files {
            if held <= target {
                break;
            }
            if self.assembled.pins.lock().contains_key(&key) {
                continue;
            }
            if fs::remove_file(&path).is_ok() {
                held = held.saturating_sub(bytes);
                self.assembled
                    .counters
                    .evicted
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        self.assembled.bytes.store(held, Ordering::Relaxed);
        held
    }

    /// Remove unpinned assembled files not used since `cutoff` (`cache prune --older-than`).
    pub(super) fn prune_assembled(&self, cutoff: SystemTime) -> u64 {
        let mut removed = 0;
        for (key, path, _, used) in self.scan_assembled() {
            if used < cutoff
                && !self.assembled.pins.lock().contains_key(&key)
                && fs::remove_file(&path).is_ok()
            {
                removed += 1;
            }
        }
        removed
    }

    /// Number and bytes of assembled files on disk (for `cache stats`).
    pub fn assembled_usage(&self) -> (u64, u64) {
        let files = self.scan_assembled();
        let bytes = files.iter().map(|f| f.2).sum();
        self.assembled.bytes.store(bytes, Ordering::Relaxed);
        (files.len() as u64, bytes)
    }

    /// Counters of assembled files in this process.
    pub fn assembled_counters(&self) -> &AssembledCounters {
        &self.assembled.counters
    }

    /// Remove every unpinned assembled file (derived data; `cache clear`/`verify` use it).
    pub fn remove_assembled(&self) -> u64 {
        let before = self.scan_assembled().len() as u64;
        self.evict_assembled_to(0);
        before - self.scan_assembled().len() as u64
    }
}

/// Set a file's mtime to now (marks an assembled file used).
fn filetime_now(path: &Path) -> io::Result<()> {
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
    ];
    // SAFETY: `c` is a valid NUL-terminated path and `times` two valid timespecs.
    if unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Copy `len` bytes at `src_off` of `src` to `dst_off` of `dst`: share the extents
/// (FICLONERANGE) when everything is block-aligned and the filesystem can, else
/// `copy_file_range` (an in-kernel copy), else read and write. Returns the bytes shared.
fn copy_range(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64) -> io::Result<u64> {
    if src_off % CLONE_ALIGN == 0 && dst_off % CLONE_ALIGN == 0 && len % CLONE_ALIGN == 0 {
        let arg = FileCloneRange {
            src_fd: src.as_raw_fd() as i64,
            src_offset: src_off,
            src_length: len,
            dest_offset: dst_off,
        };
        // SAFETY: both descriptors are open and `arg` is a valid file_clone_range.
        if unsafe { libc::ioctl(dst.as_raw_fd(), FICLONERANGE, &arg) } == 0 {
            return Ok(len);
        }
        // EOPNOTSUPP/EXDEV/EINVAL/ENOTTY: not a reflink filesystem (ext4), or not here.
    }
    let (mut s, mut d, mut left) = (src_off as i64, dst_off as i64, len);
    while left > 0 {
        // SAFETY: valid descriptors and offset pointers for the duration of the call.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut s,
                dst.as_raw_fd(),
                &mut d,
                left.min(1 << 30) as usize,
                0,
            )
        };
        if n > 0 {
            left -= n as u64;
            continue;
        }
        let err = io::Error::last_os_error();
        if n == 0
            || matches!(
                err.raw_os_error(),
                Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
            )
        {
            break;
        }
        if err.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return Err(err);
    }
    // Fallback for what copy_file_range left (other filesystems, old kernels).
    let mut buf = vec![0u8; (left.min(1 << 20)) as usize];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], s as u64)?;
        dst.write_all_at(&buf[..n], d as u64)?;
        s += n as i64;
        d += n as i64;
        left -= n as u64;
    }
    Ok(0)
}

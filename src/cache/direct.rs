//! Writes of verified blocks that bypass the page cache (`O_DIRECT`).
//!
//! A block fetched for a reader reaches the kernel's page cache anyway, as the FUSE file's
//! pages; writing it into the cache file through the page cache as well kept a second copy in
//! memory and cost the daemon a copy into freshly allocated pages: 28% of its CPU during a
//! cold sequential read over SSH (BENCHMARKS.md, "Quiet machine, 2026-12-02"). A write goes
//! direct when its offset and length are multiples of [`ALIGN`] (every whole block but a
//! chunk's short last one); the bytes are copied into an aligned buffer first unless they
//! already are aligned. The first filesystem that refuses `O_DIRECT` (`EINVAL`: tmpfs before
//! Linux 6.6, some FUSE and network filesystems) turns it off for the cache, once, with a log
//! line; writes then go through the page cache as before.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

/// Alignment of offsets, lengths and memory for a direct write: the largest logical block
/// size of common devices.
const ALIGN: usize = 4096;
/// Size of one aligned bounce buffer: a larger write is copied and written in pieces of this.
const BOUNCE: usize = 256 << 10;
/// Bounce buffers kept for reuse (one per concurrent insert; more are freed after use).
const KEEP: usize = 8;

#[derive(Debug, Default)]
pub(super) struct Direct {
    off: AtomicBool,
    bytes: AtomicU64,
    spare: Mutex<Vec<Bounce>>,
}

impl Direct {
    /// An `O_DIRECT` handle on the cache file `path`, unless direct writes are off.
    pub(super) fn open(&self, path: &Path) -> Option<File> {
        if self.off.load(Ordering::Relaxed) {
            return None;
        }
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => Some(f),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.turn_off(path, &e);
                None
            }
            // Anything else (the file vanished, no descriptors left): the buffered write that
            // follows reports it, or succeeds.
            Err(_) => None,
        }
    }

    /// Write `data` at `offset` through the direct handle `f` if both are aligned (and direct
    /// writes are still on: a handle opened before they were turned off is kept by its entry).
    /// `Ok(false)`: not written, write it through the page cache.
    pub(super) fn write_at(
        &self,
        f: &File,
        path: &Path,
        data: &[u8],
        offset: u64,
    ) -> io::Result<bool> {
        if self.off.load(Ordering::Relaxed)
            || data.is_empty()
            || data.len() % ALIGN != 0
            || offset % ALIGN as u64 != 0
        {
            return Ok(false);
        }
        let r = if data.as_ptr() as usize % ALIGN == 0 {
            f.write_all_at(data, offset)
        } else {
            let mut bounce = self.spare.lock().pop().unwrap_or_else(Bounce::new);
            let r = data.chunks(BOUNCE).enumerate().try_for_each(|(i, piece)| {
                let buf = &mut bounce.as_mut()[..piece.len()];
                buf.copy_from_slice(piece);
                f.write_all_at(buf, offset + (i * BOUNCE) as u64)
            });
            let mut spare = self.spare.lock();
            if spare.len() < KEEP {
                spare.push(bounce);
            }
            r
        };
        match r {
            Ok(()) => {
                self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                Ok(true)
            }
            // Refused for this filesystem (or this alignment): the caller rewrites the whole
            // range through the page cache, which also covers a part written before the refusal.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.turn_off(path, &e);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Bytes written direct by this process.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn turn_off(&self, path: &Path, e: &io::Error) {
        if !self.off.swap(true, Ordering::Relaxed) {
            tracing::info!(
                file = %path.display(),
                error = %e,
                "the cache's filesystem refuses O_DIRECT: cache writes go through the page cache"
            );
        }
    }
}

/// A heap buffer of [`BOUNCE`] bytes aligned to [`ALIGN`].
#[derive(Debug)]
struct Bounce(*mut u8);

// SAFETY: the buffer is plain memory owned by this value alone.
unsafe impl Send for Bounce {}

impl Bounce {
    fn layout() -> Layout {
        Layout::from_size_align(BOUNCE, ALIGN).expect("valid layout")
    }

    fn new() -> Self {
        // SAFETY: the layout has a non-zero size. Zeroed, so the slice below is initialised.
        let p = unsafe { alloc_zeroed(Self::layout()) };
        if p.is_null() {
            std::alloc::handle_alloc_error(Self::layout());
        }
        Bounce(p)
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `self.0` points to BOUNCE initialised bytes owned by `self`.
        unsafe { std::slice::from_raw_parts_mut(self.0, BOUNCE) }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.0, Self::layout()) }
    }
}

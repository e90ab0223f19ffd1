//! Filesystem primitives of the walk: sorted directory listings, `lstat`, symlink targets,
//! xattrs, `O_NOATIME` opens and data-region (`SEEK_DATA`/`SEEK_HOLE`) discovery.
//!
//! Everything here reads without disturbing the source: directories and files are opened with
//! `O_NOATIME` where the kernel allows it, so a first run does not change the atimes a second run
//! records (which would break "same input, same manifest id"). Nothing but regular files and
//! directories is ever opened: fifos, sockets and devices are only `lstat`ed.

use std::ffi::{CStr, OsString};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::manifest::NodeKind;

/// The `lstat` fields the manifest records, plus `dev`/`ino`/`nlink` for hard-link detection.
#[derive(Debug, Clone)]
pub(super) struct Stat {
    pub dev: u64,
    pub ino: u64,
    pub kind: NodeKind,
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
    pub rdev: u64,
}

fn ns(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

impl Stat {
    fn from_metadata(m: &std::fs::Metadata) -> io::Result<Self> {
        let kind = NodeKind::from_mode(m.mode()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                format!("unknown file type (mode {:o})", m.mode()),
            )
        })?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            kind,
            mode: m.mode() & 0o7777,
            nlink: m.nlink(),
            uid: m.uid(),
            gid: m.gid(),
            size: m.size(),
            atime: ns(m.atime(), m.atime_nsec()),
            mtime: ns(m.mtime(), m.mtime_nsec()),
            ctime: ns(m.ctime(), m.ctime_nsec()),
            rdev: m.rdev(),
        })
    }

    /// Whether this entry may have other names in the tree (a hard-linked non-directory).
    pub fn is_hard_linked(&self) -> bool {
        self.kind != NodeKind::Dir && self.nlink > 1
    }
}

/// `lstat`: never follows a symlink.
pub(super) fn lstat(path: &Path) -> io::Result<Stat> {
    Stat::from_metadata(&std::fs::symlink_metadata(path)?)
}

/// `stat` of an open file.
pub(super) fn fstat(file: &File) -> io::Result<Stat> {
    Stat::from_metadata(&file.metadata()?)
}

/// Target of a symlink, as bytes (never resolved).
pub(super) fn readlink(path: &Path) -> io::Result<Vec<u8>> {
    Ok(std::fs::read_link(path)?.into_os_string().into_vec())
}

/// Open with `O_NOATIME`, falling back to a plain open where the kernel refuses it
/// (`EPERM`: we neither own the file nor hold `CAP_FOWNER`).
fn open_noatime(path: &Path, flags: i32) -> io::Result<File> {
    let open = |extra: i32| {
        OpenOptions::new()
            .read(true)
            .custom_flags(flags | extra | libc::O_CLOEXEC)
            .open(path)
    };
    match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0),
        r => r,
    }
}

/// Open a regular file for reading, refusing to follow a symlink swapped in since the `lstat`.
pub(super) fn open_file(path: &Path) -> io::Result<File> {
    open_noatime(path, libc::O_NOFOLLOW)
}

/// Names in directory `path` (without `.` and `..`), sorted by their bytes.
/// `follow` allows `path` itself to be a symlink (only for the input root).
pub(super) fn list_dir(path: &Path, follow: bool) -> io::Result<Vec<OsString>> {
    let nofollow = if follow { 0 } else { libc::O_NOFOLLOW };
    let dir = open_noatime(path, libc::O_DIRECTORY | nofollow)?;
    let fd = dir.into_raw_fd();
    // SAFETY: `fd` is an open directory descriptor we own; on success `fdopendir` takes it over
    // (closed by `closedir` in `DirGuard::drop`), on failure we close it ourselves.
    let dirp = unsafe { libc::fdopendir(fd) };
    if dirp.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: `fdopendir` failed, so `fd` is still ours to close.
        unsafe { libc::close(fd) };
        return Err(e);
    }
    struct DirGuard(*mut libc::DIR);
    impl Drop for DirGuard {
        fn drop(&mut self) {
            // SAFETY: the pointer came from a successful `fdopendir` and is closed once.
            unsafe { libc::closedir(self.0) };
        }
    }
    let guard = DirGuard(dirp);
    let mut names = Vec::new();
    loop {
        // SAFETY: errno is thread-local; clearing it distinguishes end-of-directory from error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `guard.0` is a valid open DIR stream used by this thread only.
        let ent = unsafe { libc::readdir64(guard.0) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            if e.raw_os_error().unwrap_or(0) != 0 {
                return Err(e);
            }
            break;
        }
        // SAFETY: `d_name` of a returned entry is a NUL-terminated string valid until the next
        // `readdir` call; we copy it out at once.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name.to_vec()));
        }
    }
    drop(guard);
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// Extended attributes of `path` (not following symlinks), sorted by name. A filesystem without
/// xattr support has none; an attribute removed between list and get is skipped.
pub(super) fn xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let unsupported = |e: &io::Error| {
        matches!(e.raw_os_error(), Some(libc::ENOTSUP)) || e.kind() == io::ErrorKind::Unsupported
    };
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if unsupported(&e) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names {
        match xattr::get(path, &name) {
            Ok(Some(v)) => out.push((name.into_vec(), v)),
            Ok(None) => {}
            Err(e) if unsupported(&e) || e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Lazily yields the data regions `[start, end)` of an open file within `[0, size)`, using
/// `SEEK_DATA`/`SEEK_HOLE`. Where the filesystem cannot tell, the whole file is one region.
#[derive(Debug)]
pub(super) struct DataRegions<'a> {
    file: &'a File,
    size: u64,
    pos: u64,
}

impl<'a> DataRegions<'a> {
    pub fn new(file: &'a File, size: u64) -> Self {
        Self { file, size, pos: 0 }
    }

    fn seek(&self, off: u64, whence: i32) -> io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor borrowed for the lifetime of `self.file`.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // SEEK_DATA past the last data region.
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    }
}

impl Iterator for DataRegions<'_> {
    type Item = io::Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.size {
            return None;
        }
        let start = match self.seek(self.pos, libc::SEEK_DATA) {
            Ok(Some(s)) => s,
            Ok(None) => {
                self.pos = self.size;
                return None;
            }
            // No SEEK_DATA support here: treat the rest as data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.pos,
            Err(e) => return Some(Err(e)),
        };
        if start >= self.size {
            self.pos = self.size;
            return None;
        }
        let end = match self.seek(start, libc::SEEK_HOLE) {
            Ok(Some(h)) => h.min(self.size),
            Ok(None) => self.size,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.size,
            Err(e) => return Some(Err(e)),
        };
        if end <= start {
            // Defensive: a filesystem answering nonsense must not make us loop forever.
            self.pos = self.size;
            return Some(Ok((start, self.size)));
        }
        self.pos = end;
        Some(Ok((start, end)))
    }
}

/// Read `len` bytes at `off` into the spare capacity of `buf`, appending them. Returns the number
/// of bytes read, short only at end of file. The buffer is not zeroed first: the kernel writes
/// straight into it, which saves a pass over every chunk.
pub(super) fn pread_append(
    file: &File,
    buf: &mut Vec<u8>,
    off: u64,
    len: usize,
) -> io::Result<usize> {
    buf.reserve(len);
    let mut done = 0usize;
    while done < len {
        let spare = buf.spare_capacity_mut();
        debug_assert!(spare.len() >= len - done);
        // SAFETY: `spare` has room for `len - done` bytes (reserved above); pread writes at most
        // that many into it, and we only extend the length by what it reports as written.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                len - done,
                (off + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        // SAFETY: the kernel initialised `n` more bytes right after the current length.
        unsafe { buf.set_len(buf.len() + n as usize) };
        done += n as usize;
    }
    Ok(done)
}

/// Whether `file` has any byte at or after `off` (it grew since it was measured).
pub(super) fn has_byte_at(file: &File, off: u64) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 1];
    loop {
        match file.read_at(&mut b, off) {
            Ok(n) => return Ok(n > 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Tell the kernel `file` will be read sequentially (a larger readahead window).
pub(super) fn sequential(file: &File) {
    // SAFETY: an advisory call on a descriptor borrowed for its duration; errors are ignored.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
    }
}

/// Threads that run latency-bound metadata and small-file reads at once. A cold `lstat` or a
/// small file's first read waits on one disk request and costs almost no CPU, so more requests in
/// flight than cores is what makes a cold tree fast (a device's queue is deep; one thread keeps
/// one request in it).
pub(super) const IO_THREADS: usize = 16;

/// `f` applied to every item, on up to [`IO_THREADS`] threads, results in item order. Small
/// inputs run on the calling thread: a thread start costs more than a few warm calls.
pub(super) fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    const MIN_PER_THREAD: usize = 16;
    let threads = (items.len() / MIN_PER_THREAD).clamp(1, IO_THREADS);
    if threads == 1 {
        return items.iter().map(f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut out: Vec<Option<R>> = Vec::with_capacity(items.len());
    out.resize_with(items.len(), || None);
    let slots = std::sync::Mutex::new(&mut out);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                // Items are handed out in small runs so a slow one does not hold up a thread's
                // whole share; results are put in place a run at a time.
                const RUN: usize = 8;
                let mut done = Vec::with_capacity(RUN);
                loop {
                    let start = next.fetch_add(RUN, std::sync::atomic::Ordering::Relaxed);
                    if start >= items.len() {
                        break;
                    }
                    let end = (start + RUN).min(items.len());
                    done.extend(items[start..end].iter().map(&f));
                    let mut slots = slots.lock().expect("par_map slots");
                    for (i, r) in (start..end).zip(done.drain(..)) {
                        slots[i] = Some(r);
                    }
                }
            });
        }
    });
    out.into_iter()
        .map(|r| r.expect("par_map: every item is done"))
        .collect()
}

/// Read exactly `out.len()` bytes at `off`; returns how many were there (short only at end of
/// file).
pub(super) fn pread_into(file: &File, out: &mut [u8], off: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < out.len() {
        match file.read_at(&mut out[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

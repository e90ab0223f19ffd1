//! The planner: walks the tree, writes the metadata rows of the catalog and cuts file contents
//! into chunk tasks. It runs on one thread and everything it writes depends only on the tree, so
//! the same input always gives the same rows in the same order (and the same manifest id).
//!
//! Walk order (format v1, see `docs/FORMAT.md`):
//! - Directories are listed depth-first; the entries of a directory are taken in the order of
//!   their name bytes. When a directory is listed, each of its entries gets the next inode number
//!   (the root is 1), so the children of a directory have consecutive numbers; a hard link to an
//!   inode already seen gets no number, only a dirent. Then its subdirectories are listed in
//!   name order, each one completely before the next.
//! - Content is planned in the same order (inode order of the files):
//!   files smaller than the block size are packed, one after another, into pack chunks of at
//!   most `chunk_size` bytes and [`MAX_PACK_FILES`] files (a new pack starts when the next file
//!   does not fit); larger files
//!   are cut into windows `[i*chunk_size, (i+1)*chunk_size)` whose data regions (holes left out)
//!   make one chunk each; a window without data has no chunk.
//! - Chunk indexes are given when a chunk is complete: a window at once, a pack when it is
//!   closed. So a pack may get a higher index than the windows of large files met while it was
//!   filling.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::SyncSender;

use super::pipeline::{ChunkTask, Failure, OpenFile, Piece};
use super::walk::{self, DataRegions, Stat};
use super::{GenerateError, Progress};
use crate::manifest::{Extent, ManifestWriter, Node, NodeKind, ROOT_INO};

/// Most files in one pack. Bounds the memory a pack's file list takes (tiny files would
/// otherwise put millions in one 64 MiB pack) and the work of one task; with files of 1 KiB or
/// more a pack fills up by size first.
pub(super) const MAX_PACK_FILES: usize = 65536;

/// Counts gathered while planning.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct PlanStats {
    /// Regular files (inodes, not names).
    pub files: u64,
    /// Directories, the root included.
    pub dirs: u64,
    /// Other nodes: symlinks, fifos, sockets, devices.
    pub others: u64,
    /// Sum of the sizes of regular files.
    pub bytes: u64,
    /// Chunks planned (rows of the `chunks` table).
    pub chunks: u64,
}

/// The small files of the pack being filled.
#[derive(Debug, Default)]
struct Pack {
    pieces: Vec<Piece>,
    /// (ino, size, offset in the pack) of each member.
    members: Vec<(u64, u64, u64)>,
    len: u64,
}

/// A directory whose entries are written; its subdirectories remain to be listed.
#[derive(Debug)]
struct Frame {
    path: Arc<PathBuf>,
    subdirs: std::vec::IntoIter<(OsString, u64)>,
}

pub(super) struct Planner<'a> {
    out: &'a mut ManifestWriter,
    chunk_size: u64,
    block_size: u64,
    tasks: SyncSender<ChunkTask>,
    failure: &'a Failure,
    progress: &'a dyn Progress,
    next_ino: u64,
    pack: Pack,
    /// (st_dev, st_ino) of hard-linked files → (our inode, links found in the tree).
    links: HashMap<(u64, u64), (u64, u32)>,
    stats: PlanStats,
}

fn unreadable(path: &Path, source: std::io::Error) -> GenerateError {
    GenerateError::Unreadable {
        path: path.to_path_buf(),
        source,
    }
}

impl<'a> Planner<'a> {
    pub fn new(
        out: &'a mut ManifestWriter,
        chunk_size: u64,
        block_size: u32,
        tasks: SyncSender<ChunkTask>,
        failure: &'a Failure,
        progress: &'a dyn Progress,
    ) -> Self {
        Self {
            out,
            chunk_size,
            block_size: block_size as u64,
            tasks,
            failure,
            progress,
            next_ino: ROOT_INO + 1,
            pack: Pack::default(),
            links: HashMap::new(),
            stats: PlanStats::default(),
        }
    }

    /// Walk the tree under `root` (a directory; a symlink to one is followed, nothing below is).
    /// Consumes the planner: the task queue closes when it returns.
    pub fn run(mut self, root: &Path) -> Result<PlanStats, GenerateError> {
        let input = |source| GenerateError::Input {
            path: root.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(root).map_err(input)?;
        let st = walk::lstat(root).map_err(input)?;
        // Record the directory itself even when `root` is a symlink to it.
        let (root_path, st) = if st.kind == NodeKind::Symlink {
            let real = std::fs::canonicalize(root).map_err(input)?;
            let st = walk::lstat(&real).map_err(input)?;
            (real, st)
        } else {
            (root.to_path_buf(), st)
        };
        if !meta.is_dir() || st.kind != NodeKind::Dir {
            return Err(GenerateError::NotADirectory {
                path: root.to_path_buf(),
            });
        }
        self.stats.dirs = 1;
        let xattrs = walk::xattrs(&root_path).map_err(|e| unreadable(&root_path, e))?;
        self.write_node(ROOT_INO, ROOT_INO, &st, None, xattrs)?;
        let mut stack = vec![self.list(Arc::new(root_path), ROOT_INO)?];
        while let Some(top) = stack.last_mut() {
            match top.subdirs.next() {
                Some((name, ino)) => {
                    let path = Arc::new(top.path.join(&name));
                    let frame = self.list(path, ino)?;
                    stack.push(frame);
                }
                None => {
                    stack.pop();
                }
            }
        }
        self.close_pack()?;
        // Link counts are known only now; update in inode order (deterministic).
        let mut linked: Vec<(u64, u32)> = self.links.values().copied().collect();
        linked.sort_unstable();
        for (ino, count) in linked {
            if count != 1 {
                self.out.set_nlink(ino, count)?;
            }
        }
        Ok(self.stats)
    }

    fn check_failed(&self) -> Result<(), GenerateError> {
        if self.failure.is_set() {
            Err(GenerateError::Aborted)
        } else {
            Ok(())
        }
    }

    /// Write a node row and its xattrs; directories get `nlink` 2 for now.
    fn write_node(
        &mut self,
        ino: u64,
        parent: u64,
        st: &Stat,
        target: Option<Vec<u8>>,
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<(), GenerateError> {
        self.out.add_node(&Node {
            ino,
            parent,
            kind: st.kind,
            mode: st.mode,
            uid: st.uid,
            gid: st.gid,
            size: st.size,
            atime: st.atime,
            mtime: st.mtime,
            ctime: st.ctime,
            nlink: if st.kind == NodeKind::Dir { 2 } else { 1 },
            rdev: st.rdev,
            target,
        })?;
        for (name, value) in xattrs {
            self.out.add_xattr(ino, &name, &value)?;
        }
        Ok(())
    }

    /// List directory `dir` (inode `dir_ino`, whose node row exists): number and write its
    /// entries, plan the content of its files, and return its subdirectories.
    fn list(&mut self, dir: Arc<PathBuf>, dir_ino: u64) -> Result<Frame, GenerateError> {
        self.check_failed()?;
        let names = walk::list_dir(&dir, dir_ino == ROOT_INO).map_err(|e| unreadable(&dir, e))?;
        // The entries' lstat and xattrs are asked for on several threads at once (cold, each
        // waits on the disk); everything recorded is still decided here, in name order.
        let probes = walk::par_map(&names, |name| {
            let path = dir.join(name);
            let st = walk::lstat(&path);
            let xattrs = match st {
                Ok(_) => walk::xattrs(&path),
                Err(_) => Ok(Vec::new()),
            };
            (st, xattrs)
        });
        let mut seq = 0u64;
        let mut subdirs = Vec::new();
        for (name, (st, xattrs)) in names.into_iter().zip(probes) {
            let path = dir.join(&name);
            let st = match st {
                Ok(st) => st,
                // Removed between readdir and lstat: it is not part of the tree we record.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::warn!(path = %path.display(), "entry vanished during generate; skipped");
                    continue;
                }
                Err(e) => return Err(unreadable(&path, e)),
            };
            let (st, target) = if st.kind == NodeKind::Symlink {
                // readlink moves a symlink's atime (there is no O_NOATIME for it): stat again
                // after reading the target, so a second run records the same atime (relatime
                // moves it at most once a day).
                let target = walk::readlink(&path).map_err(|e| unreadable(&path, e))?;
                let st = walk::lstat(&path).map_err(|e| unreadable(&path, e))?;
                (st, Some(target))
            } else {
                (st, None)
            };
            if st.is_hard_linked() {
                if let Some((ino, count)) = self.links.get_mut(&(st.dev, st.ino)) {
                    *count += 1;
                    let ino = *ino;
                    self.out.add_dirent(dir_ino, seq, name.as_bytes(), ino)?;
                    seq += 1;
                    continue;
                }
            }
            let ino = self.next_ino;
            self.next_ino += 1;
            let xattrs = xattrs.map_err(|e| unreadable(&path, e))?;
            self.write_node(ino, dir_ino, &st, target, xattrs)?;
            self.out.add_dirent(dir_ino, seq, name.as_bytes(), ino)?;
            seq += 1;
            if st.is_hard_linked() {
                self.links.insert((st.dev, st.ino), (ino, 1));
            }
            match st.kind {
                NodeKind::Dir => {
                    self.stats.dirs += 1;
                    subdirs.push((name, ino));
                }
                NodeKind::File => {
                    self.stats.files += 1;
                    self.stats.bytes += st.size;
                    self.plan_file(&dir, name, &path, ino, &st)?;
                }
                _ => self.stats.others += 1,
            }
        }
        if !subdirs.is_empty() {
            let nlink = u32::try_from(2 + subdirs.len()).unwrap_or(u32::MAX);
            self.out.set_nlink(dir_ino, nlink)?;
        }
        Ok(Frame {
            path: dir,
            subdirs: subdirs.into_iter(),
        })
    }

    fn send(&mut self, task: ChunkTask) -> Result<(), GenerateError> {
        self.check_failed()?;
        self.stats.chunks += 1;
        self.tasks.send(task).map_err(|_| GenerateError::Aborted)
    }

    fn plan_file(
        &mut self,
        dir: &Arc<PathBuf>,
        name: OsString,
        path: &Path,
        ino: u64,
        st: &Stat,
    ) -> Result<(), GenerateError> {
        let size = st.size;
        if size == 0 {
            return Ok(());
        }
        if size < self.block_size {
            if self.pack.len + size > self.chunk_size || self.pack.members.len() == MAX_PACK_FILES {
                self.close_pack()?;
            }
            let off = self.pack.len;
            self.pack.members.push((ino, size, off));
            self.pack.pieces.push(Piece::Whole {
                dir: dir.clone(),
                name,
                size,
            });
            self.pack.len += size;
            return Ok(());
        }
        self.plan_large(path, ino, size)
    }

    /// Cut a file of at least one block into fixed windows, leaving holes out.
    fn plan_large(&mut self, path: &Path, ino: u64, size: u64) -> Result<(), GenerateError> {
        let file = walk::open_file(path).map_err(|e| unreadable(path, e))?;
        let st = walk::fstat(&file).map_err(|e| unreadable(path, e))?;
        if st.kind != NodeKind::File || st.size != size {
            return Err(GenerateError::Changed {
                path: path.to_path_buf(),
                what: format!("its size went from {size} to {} bytes", st.size),
            });
        }
        walk::sequential(&file);
        let file = Arc::new(OpenFile {
            path: path.to_path_buf(),
            file,
            size,
        });
        let mut regions = DataRegions::new(&file.file, size);
        // The data region being consumed; it may span several windows.
        let mut cur: Option<(u64, u64)> = None;
        let cs = self.chunk_size;
        for w in 0..size.div_ceil(cs) {
            let (ws, we) = (w * cs, ((w + 1) * cs).min(size));
            let mut pieces = Vec::new();
            let mut extents = Vec::new();
            let mut clen = 0u64;
            loop {
                let (s, e) = match cur {
                    Some(r) => r,
                    None => match regions.next() {
                        Some(r) => {
                            let r = r.map_err(|e| unreadable(path, e))?;
                            cur = Some(r);
                            r
                        }
                        None => break,
                    },
                };
                if s >= we {
                    break; // starts in a later window
                }
                let (a, b) = (s.max(ws), e.min(we));
                if b > a {
                    extents.push((a, b - a, clen));
                    pieces.push(Piece::Range {
                        file: file.clone(),
                        off: a,
                        len: b - a,
                    });
                    clen += b - a;
                }
                if e <= we {
                    cur = None;
                } else {
                    break; // continues in the next window
                }
            }
            if pieces.is_empty() {
                self.progress.advance(we - ws);
                continue;
            }
            let idx = self.stats.chunks;
            for (file_off, len, chunk_off) in extents {
                self.out.add_extent(&Extent {
                    ino,
                    file_off,
                    len,
                    chunk: idx,
                    chunk_off,
                })?;
            }
            self.send(ChunkTask {
                idx,
                len: clen,
                logical: we - ws,
                pieces,
            })?;
        }
        Ok(())
    }

    /// Give the pack being filled its index, write its extents and send it.
    fn close_pack(&mut self) -> Result<(), GenerateError> {
        if self.pack.members.is_empty() {
            return Ok(());
        }
        let pack = std::mem::take(&mut self.pack);
        let idx = self.stats.chunks;
        for (ino, len, chunk_off) in pack.members {
            self.out.add_extent(&Extent {
                ino,
                file_off: 0,
                len,
                chunk: idx,
                chunk_off,
            })?;
        }
        self.send(ChunkTask {
            idx,
            len: pack.len,
            logical: pack.len,
            pieces: pack.pieces,
        })
    }
}

/// Totals for the progress display: regular-file bytes and count (hard links once). A quick
/// pre-pass over the metadata; unreadable parts are skipped here and reported by the real walk.
pub(super) fn scan_totals(root: &Path) -> (u64, u64) {
    let mut seen = std::collections::HashSet::new();
    let (mut bytes, mut files) = (0u64, 0u64);
    let mut dirs = vec![(root.to_path_buf(), true)];
    while let Some((dir, is_root)) = dirs.pop() {
        let Ok(names) = walk::list_dir(&dir, is_root) else {
            continue;
        };
        let stats = walk::par_map(&names, |name| walk::lstat(&dir.join(name)));
        for (name, st) in names.into_iter().zip(stats) {
            let Ok(st) = st else {
                continue;
            };
            let path = dir.join(&name);
            match st.kind {
                NodeKind::Dir => dirs.push((path, false)),
                NodeKind::File => {
                    if st.is_hard_linked() && !seen.insert((st.dev, st.ino)) {
                        continue;
                    }
                    files += 1;
                    bytes += st.size;
                }
                _ => {}
            }
        }
    }
    (bytes, files)
}

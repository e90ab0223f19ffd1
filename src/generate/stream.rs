//! Generating from a tree that is not a local directory: a [`TreeInput`] lists directories and
//! reads file bytes (e.g. `import` of an original Horcrux repository, read from any store), and
//! [`StreamPlanner`] lays it out exactly like the directory planner ([`super::plan`]): the same
//! walk order, numbering, packing of small files and fixed windows, so the catalog follows
//! FORMAT.md §4 whatever the input. Nothing of the tree is materialized on local disk; content
//! is read by the pipeline's workers, window by window, as for a directory.
//!
//! What a stream input cannot express: hard links (every name is its own inode) and holes (all
//! content is data).

use std::sync::Arc;
use std::sync::mpsc::SyncSender;

use super::pipeline::{ChunkTask, Failure, Piece};
use super::plan::{MAX_PACK_FILES, PlanStats};
use super::{GenerateError, Progress};
use crate::manifest::{Extent, ManifestWriter, Node, NodeKind, ROOT_INO, TimeNs};

/// Attributes of one node of a [`TreeInput`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputNode {
    pub kind: NodeKind,
    /// Permission and special bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Content length of a file (all of it is read through [`TreeInput::read`]); recorded as
    /// is for other nodes, except a symlink's, which is its target's length.
    pub size: u64,
    pub atime: TimeNs,
    pub mtime: TimeNs,
    pub ctime: TimeNs,
    pub rdev: u64,
    pub target: Option<Vec<u8>>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// One entry of a directory of a [`TreeInput`].
#[derive(Debug, Clone)]
pub struct InputEntry {
    /// A single path component: not empty, not `.` or `..`, no `/` or NUL.
    pub name: Vec<u8>,
    pub node: InputNode,
    /// The input's handle of the entry: what [`TreeInput::list`] takes for a directory and
    /// [`TreeInput::read`] for a file.
    pub id: u64,
}

/// A tree given by listing and reading, for [`super::generate_from`]. Called from the planner
/// thread (`root`, `list`) and from worker threads (`read`), never from a tokio worker thread,
/// so implementations may block (e.g. on `Handle::block_on`).
pub trait TreeInput: Send + Sync + std::fmt::Debug {
    /// The root directory's attributes and handle.
    fn root(&self) -> Result<(InputNode, u64), GenerateError>;
    /// Entries of directory `dir`, in any order (the planner sorts them by name bytes).
    fn list(&self, dir: u64) -> Result<Vec<InputEntry>, GenerateError>;
    /// Append bytes `[off, off + len)` of file `file` to `buf`: exactly `len` bytes, or an error.
    fn read(&self, file: u64, off: u64, len: u64, buf: &mut Vec<u8>) -> Result<(), GenerateError>;
    /// Regular-file bytes and count, for the progress display.
    fn totals(&self) -> (u64, u64);
}

fn bad_name(name: &[u8]) -> bool {
    name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
}

/// Plans a [`TreeInput`]'s tree (see the module documentation).
pub(super) struct StreamPlanner<'a> {
    out: &'a mut ManifestWriter,
    input: Arc<dyn TreeInput>,
    chunk_size: u64,
    block_size: u64,
    tasks: SyncSender<ChunkTask>,
    failure: &'a Failure,
    next_ino: u64,
    /// The pack being filled: pieces and (ino, size, offset) of its members.
    pack_pieces: Vec<Piece>,
    pack_members: Vec<(u64, u64, u64)>,
    pack_len: u64,
    stats: PlanStats,
}

impl<'a> StreamPlanner<'a> {
    pub fn new(
        out: &'a mut ManifestWriter,
        input: Arc<dyn TreeInput>,
        chunk_size: u64,
        block_size: u32,
        tasks: SyncSender<ChunkTask>,
        failure: &'a Failure,
        _progress: &'a dyn Progress,
    ) -> Self {
        Self {
            out,
            input,
            chunk_size,
            block_size: block_size as u64,
            tasks,
            failure,
            next_ino: ROOT_INO + 1,
            pack_pieces: Vec::new(),
            pack_members: Vec::new(),
            pack_len: 0,
            stats: PlanStats::default(),
        }
    }

    pub fn run(mut self) -> Result<PlanStats, GenerateError> {
        let (root, root_id) = self.input.root()?;
        if root.kind != NodeKind::Dir {
            return Err(GenerateError::Internal(
                "the root of the input is not a directory".into(),
            ));
        }
        self.stats.dirs = 1;
        self.write_node(ROOT_INO, ROOT_INO, &root)?;
        // Depth-first, each directory's subdirectories in name order (FORMAT.md §4).
        let mut stack = vec![self.list(root_id, ROOT_INO)?.into_iter()];
        while let Some(top) = stack.last_mut() {
            match top.next() {
                Some((id, ino)) => {
                    let subdirs = self.list(id, ino)?;
                    stack.push(subdirs.into_iter());
                }
                None => {
                    stack.pop();
                }
            }
        }
        self.close_pack()?;
        Ok(self.stats)
    }

    fn write_node(&mut self, ino: u64, parent: u64, n: &InputNode) -> Result<(), GenerateError> {
        let size = match n.kind {
            NodeKind::Symlink => n.target.as_ref().map_or(0, |t| t.len() as u64),
            _ => n.size,
        };
        self.out.add_node(&Node {
            ino,
            parent,
            kind: n.kind,
            mode: n.mode & 0o7777,
            uid: n.uid,
            gid: n.gid,
            size,
            atime: n.atime,
            mtime: n.mtime,
            ctime: n.ctime,
            nlink: if n.kind == NodeKind::Dir { 2 } else { 1 },
            rdev: n.rdev,
            target: n.target.clone(),
        })?;
        for (name, value) in &n.xattrs {
            self.out.add_xattr(ino, name, value)?;
        }
        Ok(())
    }

    /// Number and write the entries of directory `id` (inode `dir_ino`), plan its files, and
    /// return its subdirectories (input handle, inode) in name order.
    fn list(&mut self, id: u64, dir_ino: u64) -> Result<Vec<(u64, u64)>, GenerateError> {
        if self.failure.is_set() {
            return Err(GenerateError::Aborted);
        }
        let mut entries = self.input.list(id)?;
        entries.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        let mut subdirs = Vec::new();
        for (seq, e) in entries.iter().enumerate() {
            if bad_name(&e.name) {
                return Err(GenerateError::Internal(format!(
                    "the input gave an invalid name {:?}",
                    String::from_utf8_lossy(&e.name)
                )));
            }
            if seq > 0 && entries[seq - 1].name == e.name {
                return Err(GenerateError::Internal(format!(
                    "the input gave the name {:?} twice in one directory",
                    String::from_utf8_lossy(&e.name)
                )));
            }
            let ino = self.next_ino;
            self.next_ino += 1;
            self.write_node(ino, dir_ino, &e.node)?;
            self.out.add_dirent(dir_ino, seq as u64, &e.name, ino)?;
            match e.node.kind {
                NodeKind::Dir => {
                    self.stats.dirs += 1;
                    subdirs.push((e.id, ino));
                }
                NodeKind::File => {
                    self.stats.files += 1;
                    self.stats.bytes += e.node.size;
                    self.plan_file(e.id, ino, e.node.size)?;
                }
                _ => self.stats.others += 1,
            }
        }
        if !subdirs.is_empty() {
            let nlink = u32::try_from(2 + subdirs.len()).unwrap_or(u32::MAX);
            self.out.set_nlink(dir_ino, nlink)?;
        }
        Ok(subdirs)
    }

    fn send(&mut self, task: ChunkTask) -> Result<(), GenerateError> {
        if self.failure.is_set() {
            return Err(GenerateError::Aborted);
        }
        self.stats.chunks += 1;
        self.tasks.send(task).map_err(|_| GenerateError::Aborted)
    }

    fn piece(&self, file: u64, off: u64, len: u64) -> Piece {
        Piece::Input {
            input: self.input.clone(),
            file,
            off,
            len,
        }
    }

    /// Small files are packed, larger ones cut into fixed windows (all data: no holes).
    fn plan_file(&mut self, file: u64, ino: u64, size: u64) -> Result<(), GenerateError> {
        if size == 0 {
            return Ok(());
        }
        if size < self.block_size {
            if self.pack_len + size > self.chunk_size || self.pack_members.len() == MAX_PACK_FILES {
                self.close_pack()?;
            }
            self.pack_members.push((ino, size, self.pack_len));
            let piece = self.piece(file, 0, size);
            self.pack_pieces.push(piece);
            self.pack_len += size;
            return Ok(());
        }
        let cs = self.chunk_size;
        for w in 0..size.div_ceil(cs) {
            let (ws, we) = (w * cs, ((w + 1) * cs).min(size));
            let idx = self.stats.chunks;
            self.out.add_extent(&Extent {
                ino,
                file_off: ws,
                len: we - ws,
                chunk: idx,
                chunk_off: 0,
            })?;
            let piece = self.piece(file, ws, we - ws);
            self.send(ChunkTask {
                idx,
                len: we - ws,
                logical: we - ws,
                pieces: vec![piece],
            })?;
        }
        Ok(())
    }

    fn close_pack(&mut self) -> Result<(), GenerateError> {
        if self.pack_members.is_empty() {
            return Ok(());
        }
        let idx = self.stats.chunks;
        for (ino, len, chunk_off) in std::mem::take(&mut self.pack_members) {
            self.out.add_extent(&Extent {
                ino,
                file_off: 0,
                len,
                chunk: idx,
                chunk_off,
            })?;
        }
        let len = std::mem::take(&mut self.pack_len);
        let pieces = std::mem::take(&mut self.pack_pieces);
        self.send(ChunkTask {
            idx,
            len,
            logical: len,
            pieces,
        })
    }
}

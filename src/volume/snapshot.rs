//! Freezing a writable volume and writing its current tree as a new catalog (the data side of
//! a commit): unchanged content keeps its chunks, only what changed becomes new chunks.
//!
//! While a [`Frozen`] lives, no mutation can start and none is half done (data writes hold the
//! volume's write gate for their whole length; every other mutation needs the overlay state's
//! write lock, which the frozen volume's upgradable read lock keeps out). Reads go on.
//! [`Frozen::rebase`] then makes the new version the base of a clean overlay in one step.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::{RwLockUpgradableReadGuard, RwLockWriteGuard};

use super::{Attr, DirSink, Volume, VolumeError};
use crate::hashtree::hash_chunk_with_outboard;
use crate::ids::{ChunkId, ManifestId};
use crate::manifest::{ChunkInfo, Extent, Manifest, ManifestWriter, Node, NodeKind, ROOT_INO};
use crate::overlay::{BaseInfo, State};

/// Where new chunks go (a store upload, typically); called once per new chunk, with the
/// chunk's piece outboard (FORMAT.md §3a; `None` for a chunk of at most one piece), which the
/// sink stores after the chunk.
pub trait ChunkSink {
    fn put(
        &self,
        id: &ChunkId,
        data: Vec<u8>,
        outboard: Option<Vec<u8>>,
    ) -> Result<(), VolumeError>;
}

/// What a snapshot wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    pub files: u64,
    pub bytes: u64,
    /// Rows of the new catalog's chunk table.
    pub chunks: u64,
    /// Chunks made from changed content (handed to the sink).
    pub new_chunks: u64,
    pub new_bytes: u64,
}

/// A volume no mutation can change until this is dropped or rebased.
#[derive(Debug)]
pub struct Frozen<'a> {
    vol: &'a Volume,
    _gate: RwLockWriteGuard<'a, ()>,
    st: RwLockUpgradableReadGuard<'a, State>,
}

struct Names(Vec<(Vec<u8>, u64)>);

impl DirSink for Names {
    fn add(&mut self, name: &[u8], _: u64, attr: &Attr) -> bool {
        if name != b"." && name != b".." {
            self.0.push((name.to_vec(), attr.ino));
        }
        false
    }
}

/// The catalog being written, with the chunk rows it has so far.
struct Catalog<'s> {
    w: ManifestWriter,
    sink: &'s dyn ChunkSink,
    block_size: u32,
    chunk_size: u64,
    next_idx: u64,
    /// Base chunk index -> index in the new catalog.
    reused: HashMap<u64, u64>,
    /// Small changed files waiting in the pack being filled: (ino, bytes).
    pack: Vec<(u64, Vec<u8>)>,
    pack_len: u64,
    stats: SnapshotStats,
}

impl Catalog<'_> {
    fn new_chunk(&mut self, data: Vec<u8>) -> Result<u64, VolumeError> {
        let (id, blocks, outboard) = hash_chunk_with_outboard(&data, self.block_size);
        let len = data.len() as u64;
        self.sink.put(&id, data, outboard)?;
        let idx = self.next_idx;
        self.next_idx += 1;
        self.w.add_chunk(&ChunkInfo {
            idx,
            id,
            len,
            blocks,
        })?;
        self.stats.chunks += 1;
        self.stats.new_chunks += 1;
        self.stats.new_bytes += len;
        Ok(idx)
    }

    /// Copy the base's extents of `ino` overlapping `range`, clipped to it.
    fn reuse(&mut self, base: &Manifest, ino: u64, range: Range<u64>) -> Result<(), VolumeError> {
        for e in base.extents(ino, range.clone())? {
            let s = e.file_off.max(range.start);
            let t = (e.file_off + e.len).min(range.end);
            if s >= t {
                continue;
            }
            let idx = match self.reused.get(&e.chunk) {
                Some(i) => *i,
                None => {
                    let info = base.chunk(e.chunk)?.ok_or_else(|| {
                        VolumeError::Manifest(crate::manifest::ManifestError::Invalid {
                            path: base.path().display().to_string(),
                            what: format!("extent refers to missing chunk {}", e.chunk),
                        })
                    })?;
                    let idx = self.next_idx;
                    self.next_idx += 1;
                    self.w.add_chunk(&ChunkInfo { idx, ..info })?;
                    self.stats.chunks += 1;
                    self.reused.insert(e.chunk, idx);
                    idx
                }
            };
            self.w.add_extent(&Extent {
                ino,
                file_off: s,
                len: t - s,
                chunk: idx,
                chunk_off: e.chunk_off + (s - e.file_off),
            })?;
        }
        Ok(())
    }

    fn add_small(&mut self, ino: u64, data: Vec<u8>) -> Result<(), VolumeError> {
        if self.pack_len + data.len() as u64 > self.chunk_size {
            self.close_pack()?;
        }
        self.pack_len += data.len() as u64;
        self.pack.push((ino, data));
        Ok(())
    }

    fn close_pack(&mut self) -> Result<(), VolumeError> {
        if self.pack.is_empty() {
            return Ok(());
        }
        let files = std::mem::take(&mut self.pack);
        self.pack_len = 0;
        let mut buf = Vec::with_capacity(files.iter().map(|(_, d)| d.len()).sum());
        let mut extents = Vec::with_capacity(files.len());
        for (ino, d) in files {
            extents.push((ino, buf.len() as u64, d.len() as u64));
            buf.extend_from_slice(&d);
        }
        let idx = self.new_chunk(buf)?;
        for (ino, off, len) in extents {
            self.w.add_extent(&Extent {
                ino,
                file_off: 0,
                len,
                chunk: idx,
                chunk_off: off,
            })?;
        }
        Ok(())
    }
}

impl Volume {
    /// Stop every mutation (waiting for those under way) until the result is dropped.
    pub fn freeze(&self) -> Result<Frozen<'_>, VolumeError> {
        let ov = self.overlay_or_ro()?;
        let gate = self.gate.write();
        let st = ov.state.upgradable_read();
        Ok(Frozen {
            vol: self,
            _gate: gate,
            st,
        })
    }
}

impl Frozen<'_> {
    /// Is anything changed?
    pub fn is_clean(&self) -> bool {
        self.st.is_clean()
    }

    /// How many paths changed (as `status` lists them; at least 1 when anything did).
    pub fn change_count(&self) -> Result<usize, VolumeError> {
        if self.st.is_clean() {
            return Ok(0);
        }
        Ok(self.vol.changes(&self.st)?.len().max(1))
    }

    /// Write the volume's tree as it is now into a new catalog at `out` (inode numbers kept,
    /// so a live mount can switch to it), handing new chunk contents to `sink`.
    pub fn write_catalog(
        &self,
        out: &Path,
        sink: &dyn ChunkSink,
    ) -> Result<(ManifestId, SnapshotStats), VolumeError> {
        let vol = self.vol;
        let st: &State = &self.st;
        let base = vol.manifest();
        if let Some(n) = st.nodes.values().find(|o| {
            o.node.nlink == 0 && o.node.kind != NodeKind::Dir && st.open.contains_key(&o.node.ino)
        }) {
            return Err(VolumeError::Busy(format!(
                "inode {} was deleted but is still open; close it and commit again",
                n.node.ino
            )));
        }
        let header = base.header().clone();
        let mut cat = Catalog {
            w: ManifestWriter::create(out, &header)?,
            sink,
            block_size: header.block_size,
            chunk_size: header.chunk_size,
            next_idx: 0,
            reused: HashMap::new(),
            pack: Vec::new(),
            pack_len: 0,
            stats: SnapshotStats::default(),
        };
        let root = vol.node_in(st, ROOT_INO)?;
        self.add_node(&mut cat, &base, root)?;
        let mut seen: HashSet<u64> = HashSet::from([ROOT_INO]);
        let mut queue = VecDeque::from([ROOT_INO]);
        while let Some(dir) = queue.pop_front() {
            let mut names = Names(Vec::new());
            vol.readdir_from(st, dir, 0, &mut names)?;
            names.0.sort();
            for (seq, (name, ino)) in names.0.into_iter().enumerate() {
                cat.w.add_dirent(dir, seq as u64, &name, ino)?;
                if !seen.insert(ino) {
                    continue;
                }
                let mut node = vol.node_in(st, ino)?;
                node.parent = dir;
                if node.kind == NodeKind::Dir {
                    queue.push_back(ino);
                }
                self.add_node(&mut cat, &base, node)?;
            }
        }
        cat.close_pack()?;
        let stats = cat.stats.clone();
        Ok((cat.w.finish()?, stats))
    }

    fn add_node(
        &self,
        cat: &mut Catalog<'_>,
        base: &Manifest,
        node: Node,
    ) -> Result<(), VolumeError> {
        let vol = self.vol;
        let st: &State = &self.st;
        let ino = node.ino;
        cat.w.add_node(&node)?;
        match st.nodes.get(&ino).filter(|o| o.own_xattrs) {
            Some(_) => {
                for (k, v) in st.xattrs.get(&ino).into_iter().flatten() {
                    cat.w.add_xattr(ino, k, v)?;
                }
            }
            None if vol.is_base(ino) => {
                for k in base.xattr_names(ino)? {
                    if let Some(v) = base.xattr(ino, &k)? {
                        cat.w.add_xattr(ino, &k, &v)?;
                    }
                }
            }
            None => {}
        }
        if node.kind != NodeKind::File {
            return Ok(());
        }
        cat.stats.files += 1;
        cat.stats.bytes += node.size;
        if node.size == 0 {
            return Ok(());
        }
        let Some(data) = st.nodes.get(&ino).and_then(|o| o.data.clone()) else {
            return cat.reuse(base, ino, 0..node.size);
        };
        if node.size < cat.block_size as u64 {
            let bytes = self.content(ino, 0..node.size)?;
            return cat.add_small(ino, bytes);
        }
        // Large: fixed windows of the chunk size, as generate cuts them; a window nothing
        // touched keeps the base's extents.
        let c = cat.chunk_size;
        let mut ws = 0;
        while ws < node.size {
            let we = (ws + c).min(node.size);
            let touched =
                we > data.base_limit || data.written.split(ws..we).iter().any(|(_, own)| *own);
            if touched {
                let bytes = self.content(ino, ws..we)?;
                let idx = cat.new_chunk(bytes)?;
                cat.w.add_extent(&Extent {
                    ino,
                    file_off: ws,
                    len: we - ws,
                    chunk: idx,
                    chunk_off: 0,
                })?;
            } else {
                cat.reuse(base, ino, ws..we)?;
            }
            ws = we;
        }
        Ok(())
    }

    /// Bytes `range` of file `ino` as readers see them now.
    fn content(&self, ino: u64, range: Range<u64>) -> Result<Vec<u8>, VolumeError> {
        let st: &State = &self.st;
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        let mut off = range.start;
        while off < range.end {
            let n = (range.end - off).min(1 << 20) as u32;
            let b = self.vol.read_in(st, ino, 0, off, n)?;
            if b.is_empty() {
                break;
            }
            off += b.len() as u64;
            out.extend_from_slice(&b);
        }
        out.resize((range.end - range.start) as usize, 0);
        Ok(out)
    }

    /// Make `manifest` (the catalog written by [`Self::write_catalog`], now committed as
    /// `base`) the volume's base, with a clean overlay. Journaled in one transaction. Nothing a
    /// reader sees changes (same content, same inode numbers).
    pub fn rebase(self, manifest: Arc<Manifest>, base: &BaseInfo) -> Result<(), VolumeError> {
        let vol = self.vol;
        let ov = vol.overlay_or_ro()?;
        let mut st = RwLockUpgradableReadGuard::upgrade(self.st);
        ov.rebase_locked(&mut st, base)?;
        *vol.manifest.write() = manifest;
        vol.base_max.store(base.max_ino, Ordering::SeqCst);
        vol.chunk_infos.lock().clear();
        *vol.statfs.lock() = None;
        Ok(())
    }

    /// Switch the volume to another version, `manifest` committed as `base`, throwing away
    /// any changes (the caller checked the user asked for that). Refused while files are open.
    /// Inode numbers then name other files: the generation is bumped and the kernel is told to
    /// drop every name it cached under the root (which drops the subtrees below them).
    pub fn switch_to(self, manifest: Arc<Manifest>, base: &BaseInfo) -> Result<(), VolumeError> {
        let open = self.vol.open_handles();
        if open > 0 {
            return Err(VolumeError::Busy(format!(
                "{open} file(s) are open in the volume; stop the applications using it and retry"
            )));
        }
        let vol = self.vol;
        let mut names = Names(Vec::new());
        vol.readdir_from(&self.st, ROOT_INO, 0, &mut names)?;
        vol.generation.fetch_add(1, Ordering::SeqCst);
        self.rebase(manifest, base)?;
        vol.readdir(ROOT_INO, 0, &mut names)?;
        if let Some(k) = vol.kernel.read().clone() {
            names.0.sort();
            names.0.dedup();
            for (name, _) in &names.0 {
                k.inval_entry(ROOT_INO, name);
            }
            k.inval_inode(ROOT_INO);
        }
        Ok(())
    }
}

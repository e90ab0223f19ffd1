//! Which base blocks a part of the volume reads: the plan of a prefetch (`crate::prefetch`).
//!
//! Only base (repository) data ever needs fetching: bytes the overlay wrote, and files the
//! overlay created, are local. A changed file reads its base only where `written` does not
//! cover it below `base_limit` (the same rule as [`Volume::read`]), so only those ranges count.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use super::{Attr, DirSink, Volume, VolumeError};
use crate::cache::Bitmap;
use crate::hashtree::block_count;
use crate::ids::ChunkId;
use crate::manifest::{ChunkInfo, NodeKind, ROOT_INO};

/// Blocks of base chunks, each chunk once (by id, however many files or indexes share it).
#[derive(Debug, Default)]
pub struct BlockPlan {
    pub chunks: Vec<(Arc<ChunkInfo>, Bitmap)>,
    by_id: HashMap<ChunkId, usize>,
}

impl BlockPlan {
    /// Add `blocks` of chunk `info`.
    pub fn add(&mut self, info: &Arc<ChunkInfo>, block_size: u32, blocks: Range<u32>) {
        let n = block_count(info.len, block_size);
        let i = *self.by_id.entry(info.id).or_insert_with(|| {
            self.chunks.push((info.clone(), Bitmap::new(n)));
            self.chunks.len() - 1
        });
        let map = &mut self.chunks[i].1;
        for b in blocks.start..blocks.end.min(n) {
            map.set(b);
        }
    }

    /// Blocks planned.
    pub fn blocks(&self) -> u64 {
        self.chunks.iter().map(|(_, m)| m.count() as u64).sum()
    }
}

/// Collects a whole directory listing (never full).
struct Listing(Vec<(Vec<u8>, u64, NodeKind)>);

impl DirSink for Listing {
    fn add(&mut self, name: &[u8], _offset: u64, attr: &Attr) -> bool {
        if name != b"." && name != b".." {
            self.0.push((name.to_vec(), attr.ino, attr.kind));
        }
        false
    }
}

impl Volume {
    /// Every block of every chunk of the base version.
    pub fn plan_all(&self) -> Result<BlockPlan, VolumeError> {
        let m = self.manifest();
        let bs = m.header().block_size;
        let mut plan = BlockPlan::default();
        for c in m.chunks()? {
            crate::hashtree::verify_outboard(c.id, c.len, bs, &c.blocks)
                .map_err(|e| VolumeError::Fetch(crate::fetch::FetchError::Corrupt(Arc::new(e))))?;
            let n = block_count(c.len, bs);
            plan.add(&Arc::new(c), bs, 0..n);
        }
        Ok(plan)
    }

    /// Add to `plan` the base blocks the file or directory at `path` (relative to the root,
    /// `/`-separated, empty for the root) reads, recursively. Symlinks are not followed.
    pub fn plan_path(&self, path: &[u8], plan: &mut BlockPlan) -> Result<(), VolumeError> {
        let mut ino = ROOT_INO;
        let mut kind = NodeKind::Dir;
        for name in path.split(|b| *b == b'/').filter(|n| !n.is_empty()) {
            let a = self.lookup(ino, name)?;
            ino = a.ino;
            kind = a.kind;
        }
        // An explicit stack, not recursion: trees can be deep. Each directory is listed once:
        // a hostile manifest can list a directory inside itself, which would loop for ever.
        let mut stack = vec![(ino, kind)];
        let mut listed = std::collections::HashSet::new();
        while let Some((ino, kind)) = stack.pop() {
            match kind {
                NodeKind::File => self.plan_file(ino, plan)?,
                NodeKind::Dir if !listed.insert(ino) => {}
                NodeKind::Dir => {
                    let mut l = Listing(Vec::new());
                    self.readdir(ino, 0, &mut l)?;
                    stack.extend(l.0.into_iter().map(|(_, i, k)| (i, k)));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The base blocks file `ino` reads now.
    fn plan_file(&self, ino: u64, plan: &mut BlockPlan) -> Result<(), VolumeError> {
        let ranges: Vec<Range<u64>> = match &self.overlay {
            Some(ov) => {
                let st = ov.state.read();
                match st.nodes.get(&ino) {
                    Some(o) => match &o.data {
                        Some(d) => d
                            .written
                            .split(0..o.node.size.min(d.base_limit))
                            .into_iter()
                            .filter(|(_, own)| !own)
                            .map(|(r, _)| r)
                            .collect(),
                        None => std::iter::once(0..o.node.size).collect(),
                    },
                    None if self.is_base(ino) => {
                        std::iter::once(0..self.node_in(&st, ino)?.size).collect()
                    }
                    None => Vec::new(),
                }
            }
            None => std::iter::once(0..self.node(ino)?.size).collect(),
        };
        let m = self.manifest();
        let bs = m.header().block_size as u64;
        for r in ranges.into_iter().filter(|r| !r.is_empty()) {
            for e in m.extents(ino, r.clone())? {
                let info = self.chunk_info(e.chunk)?;
                let s = r.start.max(e.file_off);
                let t = r.end.min(e.file_off + e.len);
                if s >= t {
                    continue;
                }
                let cs = e.chunk_off + (s - e.file_off);
                let ct = (e.chunk_off + (t - e.file_off)).min(info.len);
                if cs >= ct {
                    continue;
                }
                plan.add(
                    &info,
                    bs as u32,
                    (cs / bs) as u32..((ct - 1) / bs) as u32 + 1,
                );
            }
        }
        Ok(())
    }
}

//! Mutations of a writable volume: every change is computed against the overlay's state under
//! its write lock, as a list of journal ops applied in one transaction (all or nothing).

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;

use super::{Attr, NAME_MAX, Volume, VolumeError};
use crate::manifest::{Node, NodeKind, TimeNs, valid_name};
use crate::overlay::{DataState, Dirent, ONode, Op, Overlay, RangeSet, State, WrittenRows};

/// Who asks: the credentials new nodes are owned by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ctx {
    pub uid: u32,
    pub gid: u32,
}

/// A time to set: a given one, or now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSet {
    Now,
    At(TimeNs),
}

/// The attribute changes of a `setattr` (`None` = unchanged).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
}

pub fn now_ns() -> TimeNs {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    d.as_nanos() as TimeNs
}

/// Nodes changed by one operation, folded before they are journaled.
struct Batch<'a> {
    vol: &'a Volume,
    st: &'a State,
    nodes: BTreeMap<u64, ONode>,
    rows: BTreeMap<u64, WrittenRows>,
    ops: Vec<Op>,
}

impl<'a> Batch<'a> {
    fn new(vol: &'a Volume, st: &'a State) -> Self {
        Self {
            vol,
            st,
            nodes: BTreeMap::new(),
            rows: BTreeMap::new(),
            ops: Vec::new(),
        }
    }

    /// The node as this batch will leave it (copied up from the base on first use).
    fn node(&mut self, ino: u64) -> Result<&mut ONode, VolumeError> {
        if !self.nodes.contains_key(&ino) {
            let o = match self.st.nodes.get(&ino) {
                Some(o) => o.clone(),
                None => ONode {
                    node: self.vol.node_in(self.st, ino)?,
                    data: None,
                    own_xattrs: false,
                },
            };
            self.nodes.insert(ino, o);
        }
        Ok(self.nodes.get_mut(&ino).expect("inserted"))
    }

    fn touch_dir(&mut self, ino: u64, now: TimeNs) -> Result<(), VolumeError> {
        let n = self.node(ino)?;
        n.node.mtime = now;
        n.node.ctime = now;
        Ok(())
    }

    /// Make `name` in `parent` refer to `ino` (dropping the overlay's entry if that is what
    /// the base says anyway).
    fn set_entry(&mut self, parent: u64, name: &[u8], ino: u64) -> Result<(), VolumeError> {
        let base = self.base_entry(parent, name)?;
        let entry = (base != Some(ino)).then_some(Dirent { ino, cookie: 0 });
        self.ops.push(Op::Dirent {
            parent,
            name: name.to_vec(),
            entry,
        });
        Ok(())
    }

    /// Remove `name` from `parent` (a whiteout if the base has that name).
    fn remove_entry(&mut self, parent: u64, name: &[u8]) -> Result<(), VolumeError> {
        let entry = self
            .base_entry(parent, name)?
            .map(|_| Dirent { ino: 0, cookie: 0 });
        self.ops.push(Op::Dirent {
            parent,
            name: name.to_vec(),
            entry,
        });
        Ok(())
    }

    fn base_entry(&self, parent: u64, name: &[u8]) -> Result<Option<u64>, VolumeError> {
        if !self.vol.is_base(parent) {
            return Ok(None);
        }
        Ok(self.vol.manifest().lookup(parent, name)?.map(|n| n.ino))
    }

    /// One link of `ino` is gone: drop the node when nothing refers to it any more.
    fn unlink_node(&mut self, ino: u64, now: TimeNs) -> Result<(), VolumeError> {
        let open = self.st.open.contains_key(&ino);
        let n = self.node(ino)?;
        n.node.ctime = now;
        if n.node.kind == NodeKind::Dir {
            n.node.nlink = 0;
        } else {
            n.node.nlink = n.node.nlink.saturating_sub(1);
        }
        if n.node.nlink == 0 && !open {
            self.nodes.remove(&ino);
            self.forget(ino);
        }
        Ok(())
    }

    /// Ops that forget an unlinked node: a new one entirely, a base one kept as a tombstone
    /// (its inode number must not come back from the base).
    fn forget(&mut self, ino: u64) {
        if self.vol.is_base(ino) {
            let mut node = self
                .st
                .nodes
                .get(&ino)
                .map(|o| o.node.clone())
                .or_else(|| self.vol.manifest().node(ino).ok().flatten());
            if let Some(n) = node.as_mut() {
                n.nlink = 0;
                self.ops.push(Op::Node(
                    Box::new(ONode {
                        node: n.clone(),
                        data: None,
                        own_xattrs: true,
                    }),
                    WrittenRows::Replace,
                ));
                self.ops.push(Op::Xattrs(ino, BTreeMap::new()));
            }
        } else {
            self.ops.push(Op::DropNode(ino));
        }
        // Entries a removed directory still held (whiteouts of its base children).
        if let Some(m) = self.st.dirents.get(&ino) {
            for name in m.keys() {
                self.ops.push(Op::Dirent {
                    parent: ino,
                    name: name.clone(),
                    entry: None,
                });
            }
        }
    }

    /// The ops: changed nodes first, then entries and xattrs.
    fn finish(mut self) -> Vec<Op> {
        let mut ops = Vec::with_capacity(self.nodes.len() + self.ops.len());
        for (ino, n) in std::mem::take(&mut self.nodes) {
            let rows = self.rows.remove(&ino).unwrap_or(WrittenRows::Keep);
            ops.push(Op::Node(Box::new(n), rows));
        }
        ops.append(&mut self.ops);
        ops
    }
}

impl Volume {
    pub(super) fn overlay_or_ro(&self) -> Result<&Overlay, VolumeError> {
        self.overlay.as_ref().ok_or(VolumeError::ReadOnly)
    }

    fn check_name(name: &[u8]) -> Result<(), VolumeError> {
        if name.len() > NAME_MAX {
            return Err(VolumeError::NameTooLong);
        }
        if !valid_name(name) {
            return Err(VolumeError::Invalid);
        }
        Ok(())
    }

    /// Create a node of `kind` named `name` in `parent`.
    #[allow(clippy::too_many_arguments)]
    fn make(
        &self,
        ctx: Ctx,
        parent: u64,
        name: &[u8],
        kind: NodeKind,
        perm: u32,
        rdev: u64,
        target: Option<Vec<u8>>,
    ) -> Result<Attr, VolumeError> {
        let ov = self.overlay_or_ro()?;
        Self::check_name(name)?;
        let mut st = ov.state.write();
        let p = self.node_in(&st, parent)?;
        if p.kind != NodeKind::Dir {
            return Err(VolumeError::NotDir);
        }
        if p.nlink == 0 {
            return Err(VolumeError::NotFound);
        }
        if self.lookup_in(&st, parent, name)?.is_some() {
            return Err(VolumeError::Exists);
        }
        let now = now_ns();
        let ino = st.alloc_ino();
        // A set-group-id directory hands its group (and, to directories, the bit) down.
        let sgid = p.mode & libc::S_ISGID != 0;
        let mut mode = perm & 0o7777;
        if sgid && kind == NodeKind::Dir {
            mode |= libc::S_ISGID;
        }
        let node = Node {
            ino,
            parent,
            kind,
            mode,
            uid: ctx.uid,
            gid: if sgid { p.gid } else { ctx.gid },
            size: target.as_ref().map_or(0, |t| t.len() as u64),
            atime: now,
            mtime: now,
            ctime: now,
            nlink: if kind == NodeKind::Dir { 2 } else { 1 },
            rdev,
            target,
        };
        let onode = ONode {
            node: node.clone(),
            data: (kind == NodeKind::File).then(DataState::default),
            own_xattrs: true,
        };
        let ops = {
            let mut b = Batch::new(self, &st);
            b.touch_dir(parent, now)?;
            if kind == NodeKind::Dir {
                b.node(parent)?.node.nlink += 1;
            }
            b.nodes.insert(ino, onode);
            b.rows.insert(ino, WrittenRows::Replace);
            b.ops.push(Op::Dirent {
                parent,
                name: name.to_vec(),
                entry: Some(Dirent { ino, cookie: 0 }),
            });
            b.finish()
        };
        self.apply(ov, &mut st, ops)?;
        Ok(self.attr(&node))
    }

    pub fn mknod(
        &self,
        ctx: Ctx,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u64,
    ) -> Result<Attr, VolumeError> {
        let kind = NodeKind::from_mode(mode).ok_or(VolumeError::Invalid)?;
        if kind == NodeKind::Dir || kind == NodeKind::Symlink {
            return Err(VolumeError::Invalid);
        }
        self.make(ctx, parent, name, kind, mode, rdev, None)
    }

    pub fn mkdir(
        &self,
        ctx: Ctx,
        parent: u64,
        name: &[u8],
        mode: u32,
    ) -> Result<Attr, VolumeError> {
        self.make(ctx, parent, name, NodeKind::Dir, mode, 0, None)
    }

    pub fn symlink(
        &self,
        ctx: Ctx,
        parent: u64,
        name: &[u8],
        target: &[u8],
    ) -> Result<Attr, VolumeError> {
        if target.is_empty() {
            return Err(VolumeError::NotFound);
        }
        self.make(
            ctx,
            parent,
            name,
            NodeKind::Symlink,
            0o777,
            0,
            Some(target.to_vec()),
        )
    }

    /// Create and open a regular file (`O_EXCL` semantics: an existing name is `EEXIST`; the
    /// kernel only asks when its lookup found nothing).
    pub fn create(
        &self,
        ctx: Ctx,
        parent: u64,
        name: &[u8],
        mode: u32,
        append: bool,
    ) -> Result<(Attr, u64), VolumeError> {
        let a = self.make(ctx, parent, name, NodeKind::File, mode, 0, None)?;
        self.count_daemon_handle(a.ino)?;
        let fh = self.new_handle(a.ino, append);
        Ok((a, fh))
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> Result<(), VolumeError> {
        self.remove(parent, name, false)
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> Result<(), VolumeError> {
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: u64, name: &[u8], dir: bool) -> Result<(), VolumeError> {
        let ov = self.overlay_or_ro()?;
        let mut st = ov.state.write();
        let ino = self
            .lookup_in(&st, parent, name)?
            .ok_or(VolumeError::NotFound)?;
        let n = self.node_in(&st, ino)?;
        match (dir, n.kind == NodeKind::Dir) {
            (false, true) => return Err(VolumeError::IsDir),
            (true, false) => return Err(VolumeError::NotDir),
            (true, true) if !self.dir_is_empty(&st, ino)? => return Err(VolumeError::NotEmpty),
            _ => {}
        }
        let now = now_ns();
        let ops = {
            let mut b = Batch::new(self, &st);
            b.remove_entry(parent, name)?;
            b.touch_dir(parent, now)?;
            if dir {
                let p = b.node(parent)?;
                p.node.nlink = p.node.nlink.saturating_sub(1);
            }
            b.unlink_node(ino, now)?;
            b.finish()
        };
        self.apply(ov, &mut st, ops)?;
        Ok(())
    }

    /// Apply `ops`, giving new directory entries their readdir cookies first (a batch is
    /// built while the state is borrowed, so it leaves them 0).
    fn apply(&self, ov: &Overlay, st: &mut State, mut ops: Vec<Op>) -> Result<(), VolumeError> {
        for op in &mut ops {
            if let Op::Dirent { entry: Some(e), .. } = op {
                e.cookie = st.alloc_cookie();
            }
        }
        ov.apply(st, ops)?;
        Ok(())
    }

    /// Is directory `ino` empty in the merged view?
    fn dir_is_empty(&self, st: &State, ino: u64) -> Result<bool, VolumeError> {
        let over = st.dirents.get(&ino);
        if over.is_some_and(|m| m.values().any(|e| e.ino != 0)) {
            return Ok(false);
        }
        if !self.is_base(ino) {
            return Ok(true);
        }
        let mut start = 0;
        loop {
            let batch = self.manifest().readdir(ino, start, super::READDIR_BATCH)?;
            let Some(last) = batch.last() else {
                return Ok(true);
            };
            start = last.seq + 1;
            if batch
                .iter()
                .any(|e| !over.is_some_and(|m| m.contains_key(&e.name)))
            {
                return Ok(false);
            }
        }
    }

    /// `rename(2)`/`renameat2(2)`; `flags` takes `RENAME_NOREPLACE` and `RENAME_EXCHANGE`.
    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> Result<(), VolumeError> {
        let ov = self.overlay_or_ro()?;
        Self::check_name(newname)?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        if flags & !(libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE) != 0 || (exchange && noreplace)
        {
            return Err(VolumeError::Invalid);
        }
        let mut st = ov.state.write();
        let np = self.node_in(&st, newparent)?;
        if np.kind != NodeKind::Dir {
            return Err(VolumeError::NotDir);
        }
        let src = self
            .lookup_in(&st, parent, name)?
            .ok_or(VolumeError::NotFound)?;
        let dst = self.lookup_in(&st, newparent, newname)?;
        let src_node = self.node_in(&st, src)?;
        let src_dir = src_node.kind == NodeKind::Dir;
        let now = now_ns();
        if dst == Some(src) {
            return Ok(());
        }
        if src_dir && newparent != parent && self.is_ancestor(&st, src, newparent)? {
            return Err(VolumeError::Invalid);
        }
        let ops = if exchange {
            let dst = dst.ok_or(VolumeError::NotFound)?;
            let dst_dir = self.node_in(&st, dst)?.kind == NodeKind::Dir;
            if dst_dir && parent != newparent && self.is_ancestor(&st, dst, parent)? {
                return Err(VolumeError::Invalid);
            }
            let mut b = Batch::new(self, &st);
            b.set_entry(newparent, newname, src)?;
            b.set_entry(parent, name, dst)?;
            for (ino, is_dir, from, to) in [
                (src, src_dir, parent, newparent),
                (dst, dst_dir, newparent, parent),
            ] {
                b.node(ino)?.node.ctime = now;
                if is_dir && from != to {
                    b.node(ino)?.node.parent = to;
                    b.node(from)?.node.nlink -= 1;
                    b.node(to)?.node.nlink += 1;
                }
            }
            b.touch_dir(parent, now)?;
            b.touch_dir(newparent, now)?;
            b.finish()
        } else {
            if noreplace && dst.is_some() {
                return Err(VolumeError::Exists);
            }
            let dst_node = dst.map(|d| self.node_in(&st, d)).transpose()?;
            if let Some(d) = &dst_node {
                let dst_dir = d.kind == NodeKind::Dir;
                if src_dir && !dst_dir {
                    return Err(VolumeError::NotDir);
                }
                if !src_dir && dst_dir {
                    return Err(VolumeError::IsDir);
                }
                if dst_dir && !self.dir_is_empty(&st, d.ino)? {
                    return Err(VolumeError::NotEmpty);
                }
            }
            let mut b = Batch::new(self, &st);
            b.set_entry(newparent, newname, src)?;
            b.remove_entry(parent, name)?;
            b.node(src)?.node.ctime = now;
            if src_dir && parent != newparent {
                b.node(src)?.node.parent = newparent;
                b.node(parent)?.node.nlink -= 1;
                b.node(newparent)?.node.nlink += 1;
            }
            if let Some(d) = dst_node {
                if d.kind == NodeKind::Dir {
                    let p = b.node(newparent)?;
                    p.node.nlink = p.node.nlink.saturating_sub(1);
                }
                b.unlink_node(d.ino, now)?;
            }
            b.touch_dir(parent, now)?;
            b.touch_dir(newparent, now)?;
            b.finish()
        };
        self.apply(ov, &mut st, ops)?;
        Ok(())
    }

    /// Is `ancestor` on the path from `ino` up to the root?
    fn is_ancestor(&self, st: &State, ancestor: u64, mut ino: u64) -> Result<bool, VolumeError> {
        for _ in 0..4096 {
            if ino == ancestor {
                return Ok(true);
            }
            if ino == crate::manifest::ROOT_INO {
                return Ok(false);
            }
            ino = self.node_in(st, ino)?.parent;
        }
        Ok(false)
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> Result<Attr, VolumeError> {
        let ov = self.overlay_or_ro()?;
        Self::check_name(newname)?;
        let mut st = ov.state.write();
        let n = self.node_in(&st, ino)?;
        if n.kind == NodeKind::Dir {
            return Err(VolumeError::NotPermitted);
        }
        if n.nlink == 0 {
            return Err(VolumeError::NotFound);
        }
        let np = self.node_in(&st, newparent)?;
        if np.kind != NodeKind::Dir {
            return Err(VolumeError::NotDir);
        }
        if self.lookup_in(&st, newparent, newname)?.is_some() {
            return Err(VolumeError::Exists);
        }
        let now = now_ns();
        let (ops, node) = {
            let mut b = Batch::new(self, &st);
            b.set_entry(newparent, newname, ino)?;
            let o = b.node(ino)?;
            o.node.nlink += 1;
            o.node.ctime = now;
            let node = o.node.clone();
            b.touch_dir(newparent, now)?;
            (b.finish(), node)
        };
        self.apply(ov, &mut st, ops)?;
        Ok(self.attr(&node))
    }

    /// Make sure `ino`'s content is the overlay's to change: a data state (owning nothing of
    /// the base yet) and a fresh data file of the file's length. Journaled at once, so a data
    /// file is never mistaken for another's after a crash.
    fn copy_up_data(&self, ov: &Overlay, st: &mut State, ino: u64) -> Result<ONode, VolumeError> {
        let mut o = match st.nodes.get(&ino) {
            Some(o) => o.clone(),
            None => ONode {
                node: self.node_in(st, ino)?,
                data: None,
                own_xattrs: false,
            },
        };
        if o.node.kind != NodeKind::File {
            return Err(if o.node.kind == NodeKind::Dir {
                VolumeError::IsDir
            } else {
                VolumeError::Invalid
            });
        }
        if o.data.is_none() {
            o.data = Some(DataState {
                base_limit: o.node.size,
                written: RangeSet::new(),
            });
            let _ = std::fs::remove_file(ov.data_path(ino));
            ov.apply(
                st,
                vec![Op::Node(Box::new(o.clone()), WrittenRows::Replace)],
            )?;
        }
        Ok(o)
    }

    /// Write `data` at `offset` (or at the end for an `O_APPEND` handle); returns the bytes
    /// written. Nothing is fetched: the written range simply becomes the overlay's.
    pub fn write(&self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, VolumeError> {
        let ov = self.overlay_or_ro()?;
        // A freeze waits for the whole write (data and ranges), never sees half of it.
        let _gate = self.gate.read();
        let append = self.handles.lock().get(&fh).is_some_and(|h| h.append);
        let (file, offset) = {
            let mut st = ov.state.write();
            let o = self.copy_up_data(ov, &mut st, ino)?;
            let offset = if append { o.node.size } else { offset };
            (ov.data_file(ino, o.node.size)?, offset)
        };
        file.write_all_at(data, offset).map_err(|e| io_err(ov, e))?;
        let end = offset + data.len() as u64;
        let mut st = ov.state.write();
        let now = now_ns();
        if let Some(o) = st.nodes.get_mut(&ino) {
            o.node.size = o.node.size.max(end);
            o.node.mtime = now;
            o.node.ctime = now;
            let owned = match o.data.as_mut() {
                Some(d) if offset < d.base_limit => {
                    let r = offset..end.min(d.base_limit);
                    d.written.insert(r.clone());
                    r
                }
                _ => 0..0,
            };
            st.note_written(ino, owned);
        }
        Ok(data.len() as u32)
    }

    pub fn setattr(&self, ino: u64, set: &SetAttr) -> Result<Attr, VolumeError> {
        // A truncation changes the content: not while the kernel serves the file from a
        // backing file, and no passthrough open may start meanwhile (lock order: the
        // passthrough table, then the overlay state).
        let _no_passthrough = match set.size {
            Some(_) => Some(self.content_change_guard(ino)?),
            None => None,
        };
        let ov = self.overlay_or_ro()?;
        let mut st = ov.state.write();
        let now = now_ns();
        if let Some(size) = set.size {
            let o = self.copy_up_data(ov, &mut st, ino)?;
            let file = ov.data_file(ino, o.node.size)?;
            file.set_len(size).map_err(|e| io_err(ov, e))?;
            let mut o = st.nodes.get(&ino).cloned().unwrap_or(o);
            if let Some(d) = o.data.as_mut() {
                if size < d.base_limit {
                    d.base_limit = size;
                    d.written.truncate(size);
                }
            }
            o.node.size = size;
            o.node.mtime = now;
            o.node.ctime = now;
            ov.apply(&mut st, vec![Op::Node(Box::new(o), WrittenRows::Replace)])?;
        }
        let ops = {
            let mut b = Batch::new(self, &st);
            let o = b.node(ino)?;
            let n = &mut o.node;
            let before = n.clone();
            if let Some(m) = set.mode {
                n.mode = m & 0o7777;
            }
            if let Some(u) = set.uid {
                n.uid = u;
            }
            if let Some(g) = set.gid {
                n.gid = g;
            }
            let t = |s: TimeSet| match s {
                TimeSet::Now => now,
                TimeSet::At(t) => t,
            };
            if let Some(a) = set.atime {
                n.atime = t(a);
            }
            if let Some(m) = set.mtime {
                n.mtime = t(m);
            }
            if *n != before {
                n.ctime = now;
                b.finish()
            } else {
                Vec::new()
            }
        };
        ov.apply(&mut st, ops)?;
        Ok(self.attr(&self.node_in(&st, ino)?))
    }

    /// `fallocate(2)`: allocate (mode 0, `FALLOC_FL_KEEP_SIZE`), punch a hole or zero a range.
    pub fn fallocate(
        &self,
        ino: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<(), VolumeError> {
        let ov = self.overlay_or_ro()?;
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 {
            return Err(VolumeError::NotSupported);
        }
        let end = offset.checked_add(length).ok_or(VolumeError::Invalid)?;
        let mut st = ov.state.write();
        let o = self.copy_up_data(ov, &mut st, ino)?;
        let file = ov.data_file(ino, o.node.size)?;
        let off = i64::try_from(offset).map_err(|_| VolumeError::Invalid)?;
        let len = i64::try_from(length).map_err(|_| VolumeError::Invalid)?;
        // SAFETY: fallocate on a descriptor we own.
        let rc =
            unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&*file), mode, off, len) };
        if rc != 0 {
            return Err(io_err(ov, std::io::Error::last_os_error()));
        }
        let mut o = st.nodes.get(&ino).cloned().unwrap_or(o);
        let zeroing = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
        let mut rows = WrittenRows::Keep;
        if let Some(d) = o.data.as_mut() {
            if zeroing && offset < d.base_limit {
                let r = offset..end.min(d.base_limit);
                d.written.insert(r.clone());
                rows = WrittenRows::Append(vec![r]);
            }
        }
        if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && end > o.node.size {
            o.node.size = end;
        }
        let now = now_ns();
        o.node.mtime = now;
        o.node.ctime = now;
        // Pending ranges of earlier writes go with it.
        if st.is_dirty(ino) {
            rows = WrittenRows::Replace;
        }
        ov.apply(&mut st, vec![Op::Node(Box::new(o), rows)])?;
        Ok(())
    }

    /// Journal `ino`'s pending changes (close(2) of a handle).
    pub fn flush(&self, ino: u64) -> Result<(), VolumeError> {
        if let Some(ov) = &self.overlay {
            ov.flush(ino)?;
        }
        Ok(())
    }

    /// `fsync(2)`: the file's data and everything journaled so far reach the disk.
    pub fn fsync(&self, ino: u64, datasync: bool) -> Result<(), VolumeError> {
        let Some(ov) = &self.overlay else {
            return Ok(());
        };
        let has_data = ov
            .state
            .read()
            .nodes
            .get(&ino)
            .is_some_and(|o| o.data.is_some());
        if has_data {
            let size = self.node(ino)?.size;
            let f = ov.data_file(ino, size)?;
            let r = if datasync {
                f.sync_data()
            } else {
                f.sync_all()
            };
            r.map_err(|e| io_err(ov, e))?;
        }
        ov.flush(ino)?;
        ov.sync_journal()?;
        Ok(())
    }

    /// `fsync(2)` of a directory, `syncfs(2)`: everything journaled reaches the disk.
    pub fn sync_all(&self) -> Result<(), VolumeError> {
        if let Some(ov) = &self.overlay {
            ov.flush_all()?;
            ov.sync_journal()?;
        }
        Ok(())
    }

    fn own_xattrs(&self, st: &State, ino: u64) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, VolumeError> {
        if st.nodes.get(&ino).is_some_and(|n| n.own_xattrs) {
            return Ok(st.xattrs.get(&ino).cloned().unwrap_or_default());
        }
        let mut m = BTreeMap::new();
        if self.is_base(ino) {
            for name in self.manifest().xattr_names(ino)? {
                if let Some(v) = self.manifest().xattr(ino, &name)? {
                    m.insert(name, v);
                }
            }
        }
        Ok(m)
    }

    /// `setxattr(2)`: `flags` takes `XATTR_CREATE` and `XATTR_REPLACE`.
    pub fn setxattr(
        &self,
        ino: u64,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> Result<(), VolumeError> {
        self.change_xattrs(ino, |x| {
            let exists = x.contains_key(name);
            if flags & libc::XATTR_CREATE != 0 && exists {
                return Err(VolumeError::Exists);
            }
            if flags & libc::XATTR_REPLACE != 0 && !exists {
                return Err(VolumeError::NoXattr);
            }
            x.insert(name.to_vec(), value.to_vec());
            Ok(())
        })
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<(), VolumeError> {
        self.change_xattrs(ino, |x| {
            x.remove(name).map(|_| ()).ok_or(VolumeError::NoXattr)
        })
    }

    fn change_xattrs(
        &self,
        ino: u64,
        f: impl FnOnce(&mut BTreeMap<Vec<u8>, Vec<u8>>) -> Result<(), VolumeError>,
    ) -> Result<(), VolumeError> {
        let ov = self.overlay_or_ro()?;
        let mut st = ov.state.write();
        let mut x = self.own_xattrs(&st, ino)?;
        f(&mut x)?;
        let ops = {
            let mut b = Batch::new(self, &st);
            let o = b.node(ino)?;
            o.own_xattrs = true;
            o.node.ctime = now_ns();
            let mut ops = b.finish();
            ops.push(Op::Xattrs(ino, x));
            ops
        };
        ov.apply(&mut st, ops)?;
        Ok(())
    }

    /// Ops forgetting unlinked node `ino` whose last handle closed.
    pub(super) fn forget_unlinked(&self, st: &State, ino: u64) -> Vec<Op> {
        let mut b = Batch::new(self, st);
        b.forget(ino);
        b.finish()
    }
}

fn io_err(ov: &Overlay, e: std::io::Error) -> VolumeError {
    VolumeError::Overlay(crate::overlay::OverlayError::Io {
        dir: ov.dir().display().to_string(),
        source: e,
    })
}

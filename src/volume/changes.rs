//! What a writable volume changed against its base: `status` (one line per path), `diff`
//! (byte ranges and metadata per file) and `discard` (throw changes away, all or under a path).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use super::{Volume, VolumeError};
use crate::manifest::{Node, NodeKind, ROOT_INO};
use crate::overlay::{Op, RangeSet, State};

/// How a path differs from the base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
    /// Moved here from `from` (and possibly modified too: see [`Change::data`]).
    Renamed {
        from: Vec<u8>,
    },
}

/// One changed path (relative to the volume root, no leading `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: Vec<u8>,
    pub kind: ChangeKind,
    pub node_kind: NodeKind,
    /// The content changed.
    pub data: bool,
    /// Metadata changed (mode, owner, times set explicitly, xattrs, link target).
    pub meta: bool,
    /// Bytes in the changed ranges.
    pub bytes: u64,
}

/// Every change of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub changes: Vec<Change>,
    pub bytes_changed: u64,
    /// Disk space the overlay takes.
    pub overlay_bytes: u64,
}

/// A metadata field that differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaChange {
    pub field: String,
    pub old: String,
    pub new: String,
}

/// One changed path in detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDiff {
    pub change: Change,
    pub old_size: Option<u64>,
    pub new_size: Option<u64>,
    /// Changed byte ranges of the content, in order.
    pub ranges: Vec<Range<u64>>,
    pub meta: Vec<MetaChange>,
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        return name.to_vec();
    }
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    p.extend_from_slice(dir);
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

/// Is `path` equal to `prefix` or below it?
fn under(path: &[u8], prefix: &[u8]) -> bool {
    prefix.is_empty()
        || path == prefix
        || (path.starts_with(prefix) && path.get(prefix.len()) == Some(&b'/'))
}

/// Paths of directories, memoised for one computation.
struct Paths<'a> {
    vol: &'a Volume,
    st: &'a State,
    merged: HashMap<u64, Option<Vec<u8>>>,
    base: HashMap<u64, Option<Vec<u8>>>,
}

impl<'a> Paths<'a> {
    fn new(vol: &'a Volume, st: &'a State) -> Self {
        Self {
            vol,
            st,
            merged: HashMap::new(),
            base: HashMap::new(),
        }
    }

    /// The current path of directory `ino` (`None` when it is no longer reachable).
    fn dir(&mut self, ino: u64) -> Result<Option<Vec<u8>>, VolumeError> {
        if ino == ROOT_INO {
            return Ok(Some(Vec::new()));
        }
        if let Some(p) = self.merged.get(&ino) {
            return Ok(p.clone());
        }
        let mut result = None;
        if let Ok(n) = self.vol.node_in(self.st, ino) {
            if n.nlink > 0 && n.parent != ino {
                if let Some(name) = self.name_in(n.parent, ino)? {
                    if let Some(pp) = self.dir(n.parent)? {
                        result = Some(join(&pp, &name));
                    }
                }
            }
        }
        self.merged.insert(ino, result.clone());
        Ok(result)
    }

    /// The name `ino` has in directory `parent` now.
    fn name_in(&self, parent: u64, ino: u64) -> Result<Option<Vec<u8>>, VolumeError> {
        let over = self.st.dirents.get(&parent);
        if let Some((name, _)) = over.and_then(|m| m.iter().find(|(_, e)| e.ino == ino)) {
            return Ok(Some(name.clone()));
        }
        if !self.vol.is_base(parent) {
            return Ok(None);
        }
        Ok(self
            .vol
            .manifest()
            .name_of(parent, ino)?
            .filter(|name| !over.is_some_and(|m| m.contains_key(name))))
    }

    /// The path `ino` had in the base.
    fn base(&mut self, ino: u64) -> Result<Option<Vec<u8>>, VolumeError> {
        if ino == ROOT_INO {
            return Ok(Some(Vec::new()));
        }
        if let Some(p) = self.base.get(&ino) {
            return Ok(p.clone());
        }
        let mut result = None;
        if let Some(n) = self.vol.manifest().node(ino)? {
            if n.parent != ino {
                if let Some(name) = self.vol.manifest().name_of(n.parent, ino)? {
                    if let Some(pp) = self.base(n.parent)? {
                        result = Some(join(&pp, &name));
                    }
                }
            }
        }
        self.base.insert(ino, result.clone());
        Ok(result)
    }
}

impl Volume {
    /// Every change of the overlay against the base, sorted by path.
    pub fn status(&self) -> Result<Status, VolumeError> {
        let Some(ov) = &self.overlay else {
            return Ok(Status {
                changes: Vec::new(),
                bytes_changed: 0,
                overlay_bytes: 0,
            });
        };
        ov.flush_all()?;
        let st = ov.state.read();
        let changes = self.changes(&st)?;
        Ok(Status {
            bytes_changed: changes.iter().map(|c| c.bytes).sum(),
            changes,
            overlay_bytes: ov.disk_usage(),
        })
    }

    pub(super) fn changes(&self, st: &State) -> Result<Vec<Change>, VolumeError> {
        let mut paths = Paths::new(self, st);
        // Base nodes that have an entry of the overlay somewhere: moved or linked.
        let placed: HashSet<u64> = st
            .dirents
            .values()
            .flat_map(|m| m.values())
            .filter(|e| e.ino != 0 && self.is_base(e.ino))
            .map(|e| e.ino)
            .collect();
        let mut out = Vec::new();
        let mut reported = HashSet::new();
        for (&parent, entries) in &st.dirents {
            let Some(dir) = paths.dir(parent)? else {
                continue;
            };
            for (name, e) in entries {
                let path = join(&dir, name);
                let base = if self.is_base(parent) {
                    self.manifest().lookup(parent, name)?
                } else {
                    None
                };
                if e.ino == 0 {
                    let Some(b) = base else { continue };
                    let moved = placed.contains(&b.ino)
                        && st.nodes.get(&b.ino).is_none_or(|o| o.node.nlink > 0);
                    if !moved {
                        out.push(Change {
                            path,
                            kind: ChangeKind::Deleted,
                            node_kind: b.kind,
                            data: b.kind == NodeKind::File,
                            meta: false,
                            bytes: if b.kind == NodeKind::File { b.size } else { 0 },
                        });
                    }
                    continue;
                }
                let node = self.node_in(st, e.ino)?;
                if !self.is_base(e.ino) {
                    // New here; replacing what the base had at this path is a modification.
                    let kind = if base.is_some() {
                        ChangeKind::Modified
                    } else {
                        ChangeKind::Added
                    };
                    out.push(Change {
                        path,
                        kind,
                        node_kind: node.kind,
                        data: node.kind == NodeKind::File,
                        meta: true,
                        bytes: if node.kind == NodeKind::File {
                            node.size
                        } else {
                            0
                        },
                    });
                    continue;
                }
                // A base node under a new name: moved, or linked if its old entry stays.
                reported.insert(e.ino);
                let from = paths.base(e.ino)?;
                // Its base entry (parent and name as the base had them) still names it?
                let old_entry_stays = match self.manifest().node(e.ino)? {
                    Some(b) if from.is_some() => match self.manifest().name_of(b.parent, e.ino)? {
                        Some(n) => self.lookup_in(st, b.parent, &n)? == Some(e.ino),
                        None => false,
                    },
                    _ => false,
                };
                let (data, meta, bytes) = self.node_changes(st, e.ino)?;
                out.push(Change {
                    path,
                    kind: match from {
                        Some(from) if !old_entry_stays => ChangeKind::Renamed { from },
                        _ => ChangeKind::Added,
                    },
                    node_kind: node.kind,
                    data,
                    meta,
                    bytes,
                });
            }
        }
        // Base nodes changed in place.
        for (&ino, o) in &st.nodes {
            if !self.is_base(ino) || o.node.nlink == 0 || reported.contains(&ino) {
                continue;
            }
            let (data, meta, bytes) = self.node_changes(st, ino)?;
            if !data && !meta {
                continue;
            }
            let path = if o.node.kind == NodeKind::Dir {
                paths.dir(ino)?
            } else {
                match self.manifest().node(ino)? {
                    Some(b) => match (paths.dir(b.parent)?, paths.name_in(b.parent, ino)?) {
                        (Some(d), Some(n)) => Some(join(&d, &n)),
                        _ => None,
                    },
                    None => None,
                }
            };
            let Some(path) = path else { continue };
            out.push(Change {
                path,
                kind: ChangeKind::Modified,
                node_kind: o.node.kind,
                data,
                meta,
                bytes,
            });
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// `(data changed, metadata changed, bytes in changed ranges)` of base node `ino`.
    fn node_changes(&self, st: &State, ino: u64) -> Result<(bool, bool, u64), VolumeError> {
        let Some(o) = st.nodes.get(&ino) else {
            return Ok((false, false, 0));
        };
        let base = self.manifest().node(ino)?;
        let (data, bytes) = match (&o.data, &base) {
            (Some(_), Some(b)) => {
                let r = changed_ranges(st, ino, b.size);
                (true, r.iter().map(|r| r.end - r.start).sum())
            }
            _ => (false, 0),
        };
        // A content change moves mtime by itself: only other fields count as metadata then.
        let meta = self
            .meta_changes(st, ino, base.as_ref(), &o.node)?
            .iter()
            .any(|m| !(data && m.field == "mtime"));
        Ok((data, meta, bytes))
    }

    /// Metadata that differs between `base` and `now` (directories' times and link counts
    /// change with their entries and are not reported).
    fn meta_changes(
        &self,
        st: &State,
        ino: u64,
        base: Option<&Node>,
        now: &Node,
    ) -> Result<Vec<MetaChange>, VolumeError> {
        let mut out = Vec::new();
        let Some(b) = base else {
            return Ok(out);
        };
        let mut field = |f: &str, old: String, new: String| {
            if old != new {
                out.push(MetaChange {
                    field: f.into(),
                    old,
                    new,
                });
            }
        };
        field(
            "mode",
            format!("{:04o}", b.mode),
            format!("{:04o}", now.mode),
        );
        field("uid", b.uid.to_string(), now.uid.to_string());
        field("gid", b.gid.to_string(), now.gid.to_string());
        if now.kind != NodeKind::Dir {
            field(
                "mtime",
                crate::util::rfc3339_ns(b.mtime),
                crate::util::rfc3339_ns(now.mtime),
            );
        }
        if b.target != now.target {
            field(
                "target",
                String::from_utf8_lossy(b.target.as_deref().unwrap_or_default()).into(),
                String::from_utf8_lossy(now.target.as_deref().unwrap_or_default()).into(),
            );
        }
        if st.nodes.get(&ino).is_some_and(|o| o.own_xattrs) {
            let mut old = BTreeMap::new();
            for n in self.manifest().xattr_names(ino)? {
                if let Some(v) = self.manifest().xattr(ino, &n)? {
                    old.insert(n, v);
                }
            }
            let empty = BTreeMap::new();
            let new = st.xattrs.get(&ino).unwrap_or(&empty);
            let names: std::collections::BTreeSet<_> = old.keys().chain(new.keys()).collect();
            for n in names {
                let (a, b) = (old.get(n), new.get(n));
                if a != b {
                    let show = |v: Option<&Vec<u8>>| {
                        v.map_or("(none)".to_string(), |v| String::from_utf8_lossy(v).into())
                    };
                    out.push(MetaChange {
                        field: format!("xattr:{}", String::from_utf8_lossy(n)),
                        old: show(a),
                        new: show(b),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Changes in detail, for every changed path at or below `path` (`None`: all).
    pub fn diff(&self, path: Option<&[u8]>) -> Result<Vec<FileDiff>, VolumeError> {
        let Some(ov) = &self.overlay else {
            return Ok(Vec::new());
        };
        ov.flush_all()?;
        let st = ov.state.read();
        let prefix = path.unwrap_or_default();
        let mut out = Vec::new();
        for c in self.changes(&st)? {
            let from_matches =
                matches!(&c.kind, ChangeKind::Renamed { from } if under(from, prefix));
            if !under(&c.path, prefix) && !from_matches {
                continue;
            }
            out.push(self.file_diff(&st, c)?);
        }
        Ok(out)
    }

    fn file_diff(&self, st: &State, change: Change) -> Result<FileDiff, VolumeError> {
        let lookup = |path: &[u8]| -> Result<Option<u64>, VolumeError> {
            let mut ino = ROOT_INO;
            for name in path.split(|b| *b == b'/').filter(|n| !n.is_empty()) {
                match self.lookup_in(st, ino, name)? {
                    Some(i) => ino = i,
                    None => return Ok(None),
                }
            }
            Ok(Some(ino))
        };
        let base_lookup = |path: &[u8]| -> Result<Option<Node>, VolumeError> {
            let mut node = self.manifest().node(ROOT_INO)?;
            for name in path.split(|b| *b == b'/').filter(|n| !n.is_empty()) {
                let Some(n) = node else { return Ok(None) };
                node = self.manifest().lookup(n.ino, name)?;
            }
            Ok(node)
        };
        let is_file = change.node_kind == NodeKind::File;
        let mut d = FileDiff {
            change: change.clone(),
            old_size: None,
            new_size: None,
            ranges: Vec::new(),
            meta: Vec::new(),
        };
        match &change.kind {
            ChangeKind::Deleted => {
                let b = base_lookup(&change.path)?;
                d.old_size = b.as_ref().map(|b| b.size).filter(|_| is_file);
                if let Some(s) = d.old_size.filter(|s| *s > 0) {
                    d.ranges.push(0..s);
                }
            }
            ChangeKind::Added | ChangeKind::Modified | ChangeKind::Renamed { .. } => {
                let Some(ino) = lookup(&change.path)? else {
                    return Ok(d);
                };
                let now = self.node_in(st, ino)?;
                if is_file {
                    d.new_size = Some(now.size);
                }
                let base = if self.is_base(ino) {
                    self.manifest().node(ino)?
                } else if change.kind == ChangeKind::Modified {
                    // A new node replaced the base's at this path.
                    base_lookup(&change.path)?
                } else {
                    None
                };
                match &base {
                    Some(b) if self.is_base(ino) => {
                        if b.kind == NodeKind::File {
                            d.old_size = Some(b.size);
                        }
                        if st.nodes.get(&ino).is_some_and(|o| o.data.is_some()) {
                            d.ranges = changed_ranges(st, ino, b.size);
                        }
                        d.meta = self.meta_changes(st, ino, Some(b), &now)?;
                    }
                    Some(b) => {
                        if b.kind == NodeKind::File {
                            d.old_size = Some(b.size);
                        }
                        let end = now.size.max(b.size);
                        if is_file && end > 0 {
                            d.ranges.push(0..end);
                        }
                    }
                    None => {
                        if is_file && now.size > 0 {
                            d.ranges.push(0..now.size);
                        }
                    }
                }
            }
        }
        Ok(d)
    }

    /// Throw away the changes at or below `path` (`None`: all of them); returns how many
    /// overlay records were dropped. Refused while a changed file is open. The kernel's
    /// caches of everything touched are invalidated afterwards.
    pub fn discard(&self, path: Option<&[u8]>) -> Result<u64, VolumeError> {
        let Some(ov) = &self.overlay else {
            return Ok(0);
        };
        ov.flush_all()?;
        let mut st = ov.state.write();
        let open: Vec<u64> = st
            .open
            .keys()
            .copied()
            .filter(|i| st.nodes.contains_key(i))
            .collect();
        let prefix = path.unwrap_or_default();
        let mut inval_inodes: Vec<u64> = Vec::new();
        let mut inval_entries: Vec<(u64, Vec<u8>)> = Vec::new();
        let count;
        if prefix.is_empty() {
            if !open.is_empty() {
                return Err(VolumeError::Busy(format!(
                    "{} changed file(s) are open; close them (stop the application) and retry",
                    open.len()
                )));
            }
            count = (st.nodes.len() + st.dirents.values().map(|m| m.len()).sum::<usize>()) as u64;
            inval_inodes.extend(st.nodes.keys().copied());
            for (p, m) in &st.dirents {
                inval_entries.extend(m.keys().map(|n| (*p, n.clone())));
            }
            drop(st);
            ov.clear()?;
        } else {
            let ops = self.discard_ops(&st, prefix, &open)?;
            count = ops.len() as u64;
            for op in &ops {
                match op {
                    Op::Node(n, _) => inval_inodes.push(n.node.ino),
                    Op::DropNode(i) | Op::Xattrs(i, _) => inval_inodes.push(*i),
                    Op::Dirent { parent, name, .. } => {
                        inval_inodes.push(*parent);
                        inval_entries.push((*parent, name.clone()));
                    }
                }
            }
            ov.apply(&mut st, ops)?;
            // Directories' link counts follow their subdirectories.
            let fix = self.fix_dir_links(&st)?;
            ov.apply(&mut st, fix)?;
            drop(st);
        }
        if let Some(k) = self.kernel.read().clone() {
            for (p, n) in &inval_entries {
                k.inval_entry(*p, n);
            }
            inval_inodes.sort_unstable();
            inval_inodes.dedup();
            for i in inval_inodes {
                k.inval_inode(i);
            }
        }
        Ok(count)
    }

    fn discard_ops(&self, st: &State, prefix: &[u8], open: &[u64]) -> Result<Vec<Op>, VolumeError> {
        let mut paths = Paths::new(self, st);
        let mut ops = Vec::new();
        let mut restored: HashSet<u64> = HashSet::new();
        // Base nodes whose base path is under the prefix go back to the base.
        for &ino in st.nodes.keys() {
            if self.is_base(ino) && paths.base(ino)?.is_some_and(|p| under(&p, prefix)) {
                restored.insert(ino);
            }
        }
        for &ino in &restored {
            if open.contains(&ino) {
                return Err(VolumeError::Busy(format!(
                    "a changed file under {} is open; close it and retry",
                    String::from_utf8_lossy(prefix)
                )));
            }
            ops.push(Op::DropNode(ino));
        }
        // Entries under the prefix, and entries elsewhere naming a restored node, go.
        let mut removed: HashSet<(u64, Vec<u8>)> = HashSet::new();
        for (&parent, entries) in &st.dirents {
            let dir = paths.dir(parent)?;
            for (name, e) in entries {
                let here = dir.as_ref().is_some_and(|d| under(&join(d, name), prefix));
                if here || (e.ino != 0 && restored.contains(&e.ino)) {
                    removed.insert((parent, name.clone()));
                }
            }
        }
        // A base node whose entry here goes returns to its base place (its whiteout there goes),
        // with its base content and attributes.
        let moved_back: Vec<u64> = removed
            .iter()
            .filter_map(|(p, n)| st.dirents.get(p).and_then(|m| m.get(n)))
            .map(|e| e.ino)
            .filter(|&i| i != 0 && self.is_base(i))
            .collect();
        for ino in moved_back {
            if let Some(b) = self.manifest().node(ino)?
                && let Some(name) = self.manifest().name_of(b.parent, ino)?
                && st
                    .dirents
                    .get(&b.parent)
                    .and_then(|m| m.get(&name))
                    .is_some_and(|e| e.ino == 0)
            {
                removed.insert((b.parent, name));
            }
            if st.nodes.contains_key(&ino) && restored.insert(ino) {
                if open.contains(&ino) {
                    return Err(VolumeError::Busy(format!(
                        "a changed file under {} is open; close it and retry",
                        String::from_utf8_lossy(prefix)
                    )));
                }
                ops.push(Op::DropNode(ino));
            }
        }
        // New nodes nothing names any more go too, with what they held.
        let mut referenced: HashSet<u64> = HashSet::new();
        for (&parent, entries) in &st.dirents {
            for (name, e) in entries {
                if e.ino != 0 && !removed.contains(&(parent, name.clone())) {
                    referenced.insert(e.ino);
                }
            }
        }
        loop {
            let orphans: Vec<u64> = st
                .nodes
                .keys()
                .copied()
                .filter(|&i| !self.is_base(i) && !referenced.contains(&i))
                .filter(|i| !ops.iter().any(|op| matches!(op, Op::DropNode(d) if d == i)))
                .collect();
            if orphans.is_empty() {
                break;
            }
            for i in orphans {
                if open.contains(&i) {
                    return Err(VolumeError::Busy(format!(
                        "a new file under {} is open; close it and retry",
                        String::from_utf8_lossy(prefix)
                    )));
                }
                ops.push(Op::DropNode(i));
                if let Some(m) = st.dirents.get(&i) {
                    for (name, e) in m {
                        removed.insert((i, name.clone()));
                        if e.ino != 0 {
                            referenced.remove(&e.ino);
                        }
                    }
                }
            }
        }
        for (parent, name) in removed {
            ops.push(Op::Dirent {
                parent,
                name,
                entry: None,
            });
        }
        Ok(ops)
    }

    /// Ops setting each changed directory's link count to 2 + its subdirectories.
    fn fix_dir_links(&self, st: &State) -> Result<Vec<Op>, VolumeError> {
        struct Count(u32);
        impl super::DirSink for Count {
            fn add(&mut self, name: &[u8], _: u64, attr: &super::Attr) -> bool {
                if attr.kind == NodeKind::Dir && name != b"." && name != b".." {
                    self.0 += 1;
                }
                false
            }
        }
        let mut ops = Vec::new();
        let dirs: Vec<_> = st
            .nodes
            .values()
            .filter(|o| o.node.kind == NodeKind::Dir && o.node.nlink > 0)
            .cloned()
            .collect();
        for mut o in dirs {
            let mut c = Count(0);
            self.readdir_from(st, o.node.ino, 0, &mut c)?;
            if o.node.nlink != 2 + c.0 {
                o.node.nlink = 2 + c.0;
                ops.push(Op::Node(Box::new(o), crate::overlay::WrittenRows::Keep));
            }
        }
        Ok(ops)
    }
}

/// Changed byte ranges of file `ino` whose base is `base_size` long: what the overlay wrote
/// below its base limit, and everything from the limit to the longer of the two ends.
fn changed_ranges(st: &State, ino: u64, base_size: u64) -> Vec<Range<u64>> {
    let Some(o) = st.nodes.get(&ino) else {
        return Vec::new();
    };
    let Some(d) = &o.data else {
        return Vec::new();
    };
    let mut set: RangeSet = d.written.clone();
    set.insert(d.base_limit..o.node.size.max(base_size));
    set.iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_matches_whole_components() {
        assert!(under(b"a/b", b"a"));
        assert!(under(b"a", b"a"));
        assert!(!under(b"ab", b"a"));
        assert!(under(b"x", b""));
    }
}

//! Comparing two versions of a volume: what `horcrux diff A B` prints. Both catalogs are walked
//! by path, breadth-first from the root (or from a path prefix), one directory listing of each
//! side at a time, so memory is bounded by the largest directory plus the changes found; never
//! by the size of the catalogs.
//!
//! Per path, a change is one of:
//! - **Added** / **Deleted**: the path exists on one side only. An added or deleted directory is
//!   *one* change for its whole subtree (as `horcrux status` reports local changes): its
//!   entries are not listed. Files moved into a new directory are still found as renames (see
//!   below), and the new directory is reported as added.
//! - **Modified**: the path names a node of the same kind on both sides whose content or
//!   metadata differs. A path whose kind changed (a file replaced by a directory) is reported
//!   as deleted, then added.
//! - **Renamed { from }**: a node deleted at `from` and added at `path`, recognised as the same
//!   node by
//!   1. the same inode number and kind (catalogs made by `commit` keep inode numbers across
//!      versions) *and* evidence that it is the same node, because `generate` renumbers: a file
//!      sharing at least one piece of content (same chunk id at the same offsets), or empty on
//!      both sides with the same mode and owner; a symlink with the same target; a directory
//!      sharing an entry (same name and inode) or empty on both sides with the same mode and
//!      owner; a special file with the same `rdev`, mode and owner; or
//!   2. identical content: a regular file of the same non-zero size whose extents map to the
//!      same chunk ids at the same offsets, whatever its inode number.
//!
//!   A renamed node is compared like a modified one (its content and metadata may have changed
//!   too); a renamed directory's entries are compared under its new path.
//!
//! **Changed byte ranges** of a file compare the two extent lists, never the bytes: a byte is
//! unchanged when both sides map it to the same chunk *id* (the `chunks` table maps each
//! catalog's `idx` to the id) at the same chunk offset, or both sides have a hole there;
//! otherwise it changed. Writing identical bytes therefore shows as a change only if the
//! writer stored them in another chunk (for `commit`, the rewritten chunk windows; for packed
//! small files, the whole file). When the size changed, the bytes between the two sizes count
//! as changed too (added by growth, removed by truncation). An added file's range is the whole
//! file; a deleted file has none.
//!
//! **Metadata** compared: mode, uid, gid, mtime (not for directories, whose times follow their
//! entries), symlink target, `rdev` of devices, and extended attributes. As for local changes,
//! a content change moves mtime by itself, so an mtime change alone does not make a file whose
//! content changed count as "metadata changed" (it is still listed).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Range;

use crate::ids::ChunkId;
use crate::manifest::{DirEntry, Manifest, ManifestError, Node, NodeKind, ROOT_INO};
use crate::volume::{Change, ChangeKind, FileDiff, MetaChange};

/// Everything that differs between catalogs `a` and `b` at or below `prefix` (a path relative
/// to the volume root, `/`-separated; `None` or empty: the whole volume), sorted by path.
///
/// A rename is reported when either of its paths is in scope (its `from` may be outside).
pub fn diff_versions(
    a: &Manifest,
    b: &Manifest,
    prefix: Option<&[u8]>,
) -> Result<Vec<FileDiff>, ManifestError> {
    let mut w = Walker {
        a: Side::new(a),
        b: Side::new(b),
        out: Vec::new(),
        deleted: Vec::new(),
        added: Vec::new(),
        queue: VecDeque::new(),
        queued: HashSet::new(),
    };
    let prefix: Vec<u8> = prefix.unwrap_or_default().to_vec();
    let names: Vec<&[u8]> = prefix
        .split(|c| *c == b'/')
        .filter(|n| !n.is_empty())
        .collect();
    let path = names.join(&b'/');
    let na = w.a.lookup_path(&names)?;
    let nb = w.b.lookup_path(&names)?;
    w.entry(path, na, nb)?;
    w.finish()?;
    let mut out = w.out;
    out.sort_by(|x, y| {
        (x.change.path.cmp(&y.change.path))
            .then(kind_order(&x.change.kind).cmp(&kind_order(&y.change.kind)))
    });
    Ok(out)
}

fn kind_order(k: &ChangeKind) -> u8 {
    match k {
        ChangeKind::Deleted => 0,
        _ => 1,
    }
}

/// One catalog with a memo of chunk ids.
struct Side<'a> {
    m: &'a Manifest,
    ids: HashMap<u64, ChunkId>,
}

/// A file's content as `(file_off, len, chunk id, chunk_off)` runs, in file order.
type Content = Vec<(u64, u64, ChunkId, u64)>;

impl<'a> Side<'a> {
    fn new(m: &'a Manifest) -> Self {
        Self {
            m,
            ids: HashMap::new(),
        }
    }

    fn chunk_id(&mut self, idx: u64) -> Result<ChunkId, ManifestError> {
        if let Some(id) = self.ids.get(&idx) {
            return Ok(*id);
        }
        let c = self.m.chunk(idx)?.ok_or_else(|| ManifestError::Invalid {
            path: self.m.path().display().to_string(),
            what: format!("an extent refers to chunk {idx}, which is not in the catalog"),
        })?;
        if self.ids.len() >= 1 << 20 {
            self.ids.clear();
        }
        self.ids.insert(idx, c.id);
        Ok(c.id)
    }

    /// The content runs of file `ino` (empty runs dropped).
    fn content(&mut self, ino: u64) -> Result<Content, ManifestError> {
        // SQLite integers are signed: the whole file is `0..i64::MAX`.
        let ext = self.m.extents(ino, 0..i64::MAX as u64)?;
        let mut out = Vec::with_capacity(ext.len());
        for e in ext {
            if e.len == 0 {
                continue;
            }
            let id = self.chunk_id(e.chunk)?;
            out.push((e.file_off, e.len, id, e.chunk_off));
        }
        Ok(out)
    }

    fn listing(&self, dir: u64) -> Result<BTreeMap<Vec<u8>, Node>, ManifestError> {
        let mut out = BTreeMap::new();
        let mut start = 0;
        loop {
            let page: Vec<DirEntry> = self.m.readdir(dir, start, 4096)?;
            let Some(last) = page.last() else { break };
            start = last.seq + 1;
            for e in page {
                // A hard-linked name listed twice keeps its first entry.
                out.entry(e.name).or_insert(e.node);
            }
        }
        Ok(out)
    }

    fn lookup_path(&self, names: &[&[u8]]) -> Result<Option<Node>, ManifestError> {
        let Some(mut node) = self.m.node(ROOT_INO)? else {
            return Ok(None);
        };
        for n in names {
            if node.kind != NodeKind::Dir {
                return Ok(None);
            }
            match self.m.lookup(node.ino, n)? {
                Some(c) => node = c,
                None => return Ok(None),
            }
        }
        Ok(Some(node))
    }

    /// A path of `ino` found by following parents up to the root, checked by looking it up
    /// again (`None` when there is no consistent one).
    fn path_of(&self, ino: u64) -> Result<Option<Vec<u8>>, ManifestError> {
        let mut names: Vec<Vec<u8>> = Vec::new();
        let mut cur = ino;
        while cur != ROOT_INO {
            if names.len() > 4096 {
                return Ok(None);
            }
            let Some(n) = self.m.node(cur)? else {
                return Ok(None);
            };
            if n.parent == cur {
                return Ok(None);
            }
            let Some(name) = self.m.name_of(n.parent, cur)? else {
                return Ok(None);
            };
            names.push(name);
            cur = n.parent;
        }
        names.reverse();
        let refs: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
        Ok(match self.lookup_path(&refs)? {
            Some(n) if n.ino == ino => Some(refs.join(&b'/')),
            _ => None,
        })
    }

    fn xattrs(&self, ino: u64) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, ManifestError> {
        let mut out = BTreeMap::new();
        for n in self.m.xattr_names(ino)? {
            if let Some(v) = self.m.xattr(ino, &n)? {
                out.insert(n, v);
            }
        }
        Ok(out)
    }
}

/// A path present on one side only, waiting to be paired as a rename.
struct Lone {
    path: Vec<u8>,
    node: Node,
}

struct Walker<'a> {
    a: Side<'a>,
    b: Side<'a>,
    out: Vec<FileDiff>,
    deleted: Vec<Lone>,
    added: Vec<Lone>,
    /// Directory pairs `(path in B, ino in A, ino in B)` whose entries are still to compare.
    queue: VecDeque<(Vec<u8>, u64, u64)>,
    /// Every pair ever queued: a catalog is untrusted and may list a directory inside itself,
    /// so a pair is compared once, or the walk would never end.
    queued: HashSet<(u64, u64)>,
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

impl Walker<'_> {
    /// Queue directories `ia` of A and `ib` of B (at `path`) for comparison, unless that pair
    /// was queued before; true if queued.
    fn queue_dirs(&mut self, path: Vec<u8>, ia: u64, ib: u64) -> bool {
        let new = self.queued.insert((ia, ib));
        if new {
            self.queue.push_back((path, ia, ib));
        }
        new
    }

    /// Compare what both sides have at `path`.
    fn entry(
        &mut self,
        path: Vec<u8>,
        a: Option<Node>,
        b: Option<Node>,
    ) -> Result<(), ManifestError> {
        match (a, b) {
            (None, None) => {}
            (Some(a), None) => self.deleted.push(Lone { path, node: a }),
            (None, Some(b)) => self.added.push(Lone { path, node: b }),
            (Some(a), Some(b)) if a.kind != b.kind => {
                self.deleted.push(Lone {
                    path: path.clone(),
                    node: a,
                });
                self.added.push(Lone { path, node: b });
            }
            (Some(a), Some(b)) => {
                if let Some(d) = self.compare(&path, ChangeKind::Modified, &a, &b)? {
                    self.out.push(d);
                }
                if a.kind == NodeKind::Dir {
                    self.queue_dirs(path, a.ino, b.ino);
                }
            }
        }
        Ok(())
    }

    /// Walk the queued directory pairs, pair renames, repeat until nothing is left.
    fn finish(&mut self) -> Result<(), ManifestError> {
        loop {
            while let Some((path, ia, ib)) = self.queue.pop_front() {
                let la = self.a.listing(ia)?;
                let mut lb = self.b.listing(ib)?;
                for (name, na) in la {
                    let nb = lb.remove(&name);
                    self.entry(join(&path, &name), Some(na), nb)?;
                }
                for (name, nb) in lb {
                    self.entry(join(&path, &name), None, Some(nb))?;
                }
            }
            if !self.pair_renames()? {
                break;
            }
        }
        self.global_renames()?;
        for l in std::mem::take(&mut self.deleted) {
            self.out.push(lone(l, ChangeKind::Deleted));
        }
        for l in std::mem::take(&mut self.added) {
            self.out.push(lone(l, ChangeKind::Added));
        }
        Ok(())
    }

    /// Pair deleted and added paths found so far; true if a renamed directory was queued.
    fn pair_renames(&mut self) -> Result<bool, ManifestError> {
        if self.deleted.is_empty() || self.added.is_empty() {
            return Ok(false);
        }
        let mut queued = false;
        let mut pairs: Vec<(usize, usize)> = Vec::new();
        let mut used_a = HashSet::new();
        let mut used_b = HashSet::new();
        // 1. Same inode number, same node.
        let by_ino: HashMap<u64, usize> = self
            .added
            .iter()
            .enumerate()
            .map(|(i, l)| (l.node.ino, i))
            .collect();
        for i in 0..self.deleted.len() {
            let d = self.deleted[i].node.clone();
            if let Some(&j) = by_ino.get(&d.ino) {
                let n = self.added[j].node.clone();
                if !used_b.contains(&j) && self.same_node(&d, &n)? {
                    pairs.push((i, j));
                    used_a.insert(i);
                    used_b.insert(j);
                }
            }
        }
        // 2. Identical content.
        let mut by_size: HashMap<u64, Vec<usize>> = HashMap::new();
        for (j, l) in self.added.iter().enumerate() {
            if !used_b.contains(&j) && l.node.kind == NodeKind::File && l.node.size > 0 {
                by_size.entry(l.node.size).or_default().push(j);
            }
        }
        let mut content_b: HashMap<usize, Content> = HashMap::new();
        for i in 0..self.deleted.len() {
            let d = &self.deleted[i].node;
            if used_a.contains(&i) || d.kind != NodeKind::File || d.size == 0 {
                continue;
            }
            let Some(cands) = by_size.get(&d.size) else {
                continue;
            };
            let ca = self.a.content(d.ino)?;
            for &j in cands {
                if used_b.contains(&j) {
                    continue;
                }
                let cb = match content_b.entry(j) {
                    std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(self.b.content(self.added[j].node.ino)?)
                    }
                };
                if *cb == ca {
                    pairs.push((i, j));
                    used_a.insert(i);
                    used_b.insert(j);
                    break;
                }
            }
        }
        for &(i, j) in &pairs {
            let (d, n) = (&self.deleted[i], &self.added[j]);
            let kind = ChangeKind::Renamed {
                from: d.path.clone(),
            };
            let (path, na, nb) = (n.path.clone(), d.node.clone(), n.node.clone());
            let diff = self.compare(&path, kind, &na, &nb)?;
            self.out.push(diff.expect("a rename is always a change"));
            if na.kind == NodeKind::Dir && self.queue_dirs(path, na.ino, nb.ino) {
                queued = true;
            }
        }
        let mut i = 0;
        self.deleted.retain(|_| {
            i += 1;
            !used_a.contains(&(i - 1))
        });
        let mut j = 0;
        self.added.retain(|_| {
            j += 1;
            !used_b.contains(&(j - 1))
        });
        Ok(queued)
    }

    /// Renames with one end outside what was walked (outside the prefix, or inside an added or
    /// deleted directory): found by inode number. Renamed directories found this way are
    /// compared too, and may find more.
    fn global_renames(&mut self) -> Result<(), ManifestError> {
        let mut seen_b: HashSet<u64> = HashSet::new();
        let mut seen_a: HashSet<u64> = HashSet::new();
        loop {
            let mut found = false;
            let deleted = std::mem::take(&mut self.deleted);
            for d in deleted {
                let hit = match self.b.m.node(d.node.ino)? {
                    Some(nb)
                        if !seen_b.contains(&nb.ino)
                            && nb.kind == d.node.kind
                            && self.same_node(&d.node, &nb)? =>
                    {
                        match self.b.path_of(nb.ino)? {
                            // Not a name the node already had in A (a hard link).
                            Some(p) if !self.a_has(&p, nb.ino)? => Some((p, nb)),
                            _ => None,
                        }
                    }
                    _ => None,
                };
                match hit {
                    Some((p, nb)) => {
                        seen_b.insert(nb.ino);
                        seen_a.insert(d.node.ino);
                        let kind = ChangeKind::Renamed { from: d.path };
                        let diff = self.compare(&p, kind, &d.node, &nb)?;
                        self.out.push(diff.expect("a rename is always a change"));
                        if nb.kind == NodeKind::Dir && self.queue_dirs(p, d.node.ino, nb.ino) {
                            found = true;
                        }
                    }
                    None => self.deleted.push(d),
                }
            }
            let added = std::mem::take(&mut self.added);
            for n in added {
                let hit = match self.a.m.node(n.node.ino)? {
                    Some(na)
                        if !seen_a.contains(&na.ino)
                            && !seen_b.contains(&n.node.ino)
                            && na.kind == n.node.kind
                            && self.same_node(&na, &n.node)? =>
                    {
                        match self.a.path_of(na.ino)? {
                            Some(p) if !self.b_has(&p, na.ino)? => Some((p, na)),
                            _ => None,
                        }
                    }
                    _ => None,
                };
                match hit {
                    Some((from, na)) => {
                        seen_a.insert(na.ino);
                        seen_b.insert(n.node.ino);
                        let kind = ChangeKind::Renamed { from };
                        let diff = self.compare(&n.path, kind, &na, &n.node)?;
                        self.out.push(diff.expect("a rename is always a change"));
                        if na.kind == NodeKind::Dir && self.queue_dirs(n.path, na.ino, n.node.ino) {
                            found = true;
                        }
                    }
                    None => self.added.push(n),
                }
            }
            if !found {
                return Ok(());
            }
            // Entries of renamed directories: walk, pair, and look again.
            while let Some((path, ia, ib)) = self.queue.pop_front() {
                let la = self.a.listing(ia)?;
                let mut lb = self.b.listing(ib)?;
                for (name, na) in la {
                    let nb = lb.remove(&name);
                    self.entry(join(&path, &name), Some(na), nb)?;
                }
                for (name, nb) in lb {
                    self.entry(join(&path, &name), None, Some(nb))?;
                }
                if self.queue.is_empty() {
                    self.pair_renames()?;
                }
            }
        }
    }

    fn a_has(&self, path: &[u8], ino: u64) -> Result<bool, ManifestError> {
        let names: Vec<&[u8]> = path.split(|c| *c == b'/').collect();
        Ok(self.a.lookup_path(&names)?.is_some_and(|n| n.ino == ino))
    }

    fn b_has(&self, path: &[u8], ino: u64) -> Result<bool, ManifestError> {
        let names: Vec<&[u8]> = path.split(|c| *c == b'/').collect();
        Ok(self.b.lookup_path(&names)?.is_some_and(|n| n.ino == ino))
    }

    /// Is `b` (same inode number as `a`) plausibly the same node? (See the module docs.)
    fn same_node(&mut self, a: &Node, b: &Node) -> Result<bool, ManifestError> {
        if a.ino != b.ino || a.kind != b.kind {
            return Ok(false);
        }
        let owner = a.mode == b.mode && a.uid == b.uid && a.gid == b.gid;
        Ok(match a.kind {
            NodeKind::File => {
                if a.size == 0 && b.size == 0 {
                    owner
                } else {
                    let ca = self.a.content(a.ino)?;
                    let cb = self.b.content(b.ino)?;
                    shares_content(&ca, &cb)
                }
            }
            NodeKind::Symlink => a.target == b.target,
            NodeKind::Dir => {
                let la = self.a.m.readdir(a.ino, 0, 256)?;
                let lb = self.b.m.readdir(b.ino, 0, 256)?;
                if la.is_empty() && lb.is_empty() {
                    owner
                } else {
                    let names: HashSet<(&[u8], u64)> =
                        la.iter().map(|e| (e.name.as_slice(), e.node.ino)).collect();
                    lb.iter()
                        .any(|e| names.contains(&(e.name.as_slice(), e.node.ino)))
                }
            }
            _ => owner && a.rdev == b.rdev,
        })
    }

    /// The change between `a` (in A) and `b` (in B) of the same kind, reported at `path`;
    /// `None` for a `Modified` pair that did not change.
    fn compare(
        &mut self,
        path: &[u8],
        kind: ChangeKind,
        a: &Node,
        b: &Node,
    ) -> Result<Option<FileDiff>, ManifestError> {
        let ranges = if a.kind == NodeKind::File {
            let ca = self.a.content(a.ino)?;
            let cb = self.b.content(b.ino)?;
            changed_ranges(&ca, a.size, &cb, b.size)
        } else {
            Vec::new()
        };
        let data = !ranges.is_empty();
        let meta_changes = self.meta_changes(a, b)?;
        let meta = meta_changes.iter().any(|m| !(data && m.field == "mtime"));
        if matches!(kind, ChangeKind::Modified) && !data && meta_changes.is_empty() {
            return Ok(None);
        }
        let sized = |n: &Node| (n.kind == NodeKind::File).then_some(n.size);
        Ok(Some(FileDiff {
            change: Change {
                path: path.to_vec(),
                kind,
                node_kind: b.kind,
                data,
                meta,
                bytes: ranges.iter().map(|r| r.end - r.start).sum(),
            },
            old_size: sized(a),
            new_size: sized(b),
            ranges,
            meta: meta_changes,
        }))
    }

    fn meta_changes(&self, a: &Node, b: &Node) -> Result<Vec<MetaChange>, ManifestError> {
        let mut out = Vec::new();
        let mut field = |f: &str, old: String, new: String| {
            if old != new {
                out.push(MetaChange {
                    field: f.into(),
                    old,
                    new,
                });
            }
        };
        field("mode", format!("{:04o}", a.mode), format!("{:04o}", b.mode));
        field("uid", a.uid.to_string(), b.uid.to_string());
        field("gid", a.gid.to_string(), b.gid.to_string());
        if b.kind != NodeKind::Dir {
            field(
                "mtime",
                crate::util::rfc3339_ns(a.mtime),
                crate::util::rfc3339_ns(b.mtime),
            );
        }
        if a.target != b.target {
            let t = |n: &Node| {
                String::from_utf8_lossy(n.target.as_deref().unwrap_or_default()).into_owned()
            };
            field("target", t(a), t(b));
        }
        if matches!(b.kind, NodeKind::CharDev | NodeKind::BlockDev) {
            field("rdev", format!("{:#x}", a.rdev), format!("{:#x}", b.rdev));
        }
        let (xa, xb) = (self.a.xattrs(a.ino)?, self.b.xattrs(b.ino)?);
        if xa != xb {
            let names: std::collections::BTreeSet<&Vec<u8>> = xa.keys().chain(xb.keys()).collect();
            let show = |v: Option<&Vec<u8>>| {
                v.map_or("(none)".to_string(), |v| {
                    String::from_utf8_lossy(v).into_owned()
                })
            };
            for n in names {
                let (va, vb) = (xa.get(n), xb.get(n));
                if va != vb {
                    out.push(MetaChange {
                        field: format!("xattr:{}", String::from_utf8_lossy(n)),
                        old: show(va),
                        new: show(vb),
                    });
                }
            }
        }
        Ok(out)
    }
}

/// The change for a path present on one side only.
fn lone(l: Lone, kind: ChangeKind) -> FileDiff {
    let n = l.node;
    let file = n.kind == NodeKind::File;
    let size = file.then_some(n.size);
    let added = matches!(kind, ChangeKind::Added);
    let ranges = if added && file && n.size > 0 {
        std::iter::once(0..n.size).collect()
    } else {
        Vec::new()
    };
    FileDiff {
        change: Change {
            path: l.path,
            node_kind: n.kind,
            data: file,
            meta: added,
            bytes: if file { n.size } else { 0 },
            kind,
        },
        old_size: if added { None } else { size },
        new_size: if added { size } else { None },
        ranges,
        meta: Vec::new(),
    }
}

/// Do two files share a piece of content: an overlapping file range mapped to the same chunk
/// at the same offset?
fn shares_content(a: &Content, b: &Content) -> bool {
    !common_runs(a, b).is_empty()
}

/// File ranges where `a` and `b` map to the same chunk id at the same chunk offset.
fn common_runs(a: &Content, b: &Content) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (ao, al, aid, ac) = a[i];
        let (bo, bl, bid, bc) = b[j];
        let start = ao.max(bo);
        let end = (ao + al).min(bo + bl);
        // Same chunk, and the same chunk offset for the same file offset.
        if start < end && aid == bid && ac.wrapping_sub(ao) == bc.wrapping_sub(bo) {
            match out.last_mut() {
                Some(l) if l.end == start => l.end = end,
                _ => out.push(start..end),
            }
        }
        if ao + al <= bo + bl {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// File ranges covered by data extents.
fn data_runs(c: &Content) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for &(o, l, _, _) in c {
        match out.last_mut() {
            Some(r) if r.end == o => r.end = o + l,
            _ => out.push(o..o + l),
        }
    }
    out
}

/// Subtract sorted disjoint `b` from sorted disjoint `a`.
fn subtract(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut j = 0;
    for r in a {
        let mut start = r.start;
        while j < b.len() && b[j].end <= start {
            j += 1;
        }
        let mut k = j;
        while start < r.end {
            match b.get(k) {
                Some(s) if s.start < r.end => {
                    if s.start > start {
                        out.push(start..s.start);
                    }
                    start = start.max(s.end);
                    k += 1;
                }
                _ => {
                    out.push(start..r.end);
                    start = r.end;
                }
            }
        }
    }
    out
}

/// Sorted union of sorted disjoint range lists, adjacent ranges merged.
fn union(a: Vec<Range<u64>>, b: Vec<Range<u64>>) -> Vec<Range<u64>> {
    let mut all = a;
    all.extend(b);
    all.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in all.into_iter().filter(|r| r.start < r.end) {
        match out.last_mut() {
            Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The byte ranges whose content differs between file `a` of size `sa` and file `b` of size
/// `sb` (see the module documentation).
fn changed_ranges(a: &Content, sa: u64, b: &Content, sb: u64) -> Vec<Range<u64>> {
    let lo = sa.min(sb);
    let clip = |v: Vec<Range<u64>>| -> Vec<Range<u64>> {
        v.into_iter()
            .filter_map(|r| (r.start < lo).then(|| r.start..r.end.min(lo)))
            .collect()
    };
    // Data on either side, minus where both hold the same chunk bytes: what differs (holes on
    // both sides are in neither list, so they never count).
    let data = union(clip(data_runs(a)), clip(data_runs(b)));
    let same = common_runs(a, b);
    let mut changed = subtract(&data, &same);
    if sa != sb {
        changed = union(changed, std::iter::once(lo..sa.max(sb)).collect());
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{CatalogHeader, ChunkInfo, Extent, ManifestWriter};

    const MIB: u64 = 1 << 20;

    /// One entry of a hand-written catalog.
    #[derive(Clone)]
    struct E {
        path: &'static str,
        ino: u64,
        kind: NodeKind,
        size: u64,
        mode: u32,
        mtime: i64,
        target: Option<&'static str>,
        /// `(file_off, len, chunk id byte, chunk_off)`.
        ext: Vec<(u64, u64, u8, u64)>,
        xattrs: Vec<(&'static str, &'static str)>,
    }

    fn dir(path: &'static str, ino: u64) -> E {
        E {
            path,
            ino,
            kind: NodeKind::Dir,
            size: 0,
            mode: 0o755,
            mtime: 0,
            target: None,
            ext: vec![],
            xattrs: vec![],
        }
    }

    fn file(path: &'static str, ino: u64, size: u64, ext: &[(u64, u64, u8, u64)]) -> E {
        E {
            kind: NodeKind::File,
            size,
            mode: 0o644,
            ext: ext.to_vec(),
            ..dir(path, ino)
        }
    }

    fn link(path: &'static str, ino: u64, target: &'static str) -> E {
        E {
            kind: NodeKind::Symlink,
            size: target.len() as u64,
            mode: 0o777,
            target: Some(target),
            ..dir(path, ino)
        }
    }

    /// A catalog of `entries` (the root is added); chunk indexes are given in the order of
    /// `chunk_order` (ids by byte), so two catalogs can number the same chunks differently.
    fn catalog(dir: &std::path::Path, name: &str, chunk_order: &[u8], entries: &[E]) -> Manifest {
        let path = dir.join(name);
        let mut w = ManifestWriter::create(
            &path,
            &CatalogHeader {
                volume: "v".into(),
                chunk_size: 4 * MIB,
                block_size: 1 << 16,
            },
        )
        .unwrap();
        let mut all = vec![self::dir("", ROOT_INO)];
        all.extend(entries.iter().cloned());
        let ino_of = |p: &str| all.iter().find(|e| e.path == p).unwrap().ino;
        let mut seqs: HashMap<u64, u64> = HashMap::new();
        let mut made = HashSet::new();
        for e in &all {
            let parent = match e.path.rsplit_once('/') {
                _ if e.path.is_empty() => ROOT_INO,
                Some((d, _)) => ino_of(d),
                None => ROOT_INO,
            };
            let new = made.insert(e.ino);
            if new {
                w.add_node(&Node {
                    ino: e.ino,
                    parent,
                    kind: e.kind,
                    mode: e.mode,
                    uid: 0,
                    gid: 0,
                    size: e.size,
                    atime: 0,
                    mtime: e.mtime,
                    ctime: 0,
                    nlink: 1,
                    rdev: 0,
                    target: e.target.map(|t| t.as_bytes().to_vec()),
                })
                .unwrap();
            }
            if !e.path.is_empty() {
                let name = e.path.rsplit('/').next().unwrap();
                let seq = seqs.entry(parent).or_default();
                w.add_dirent(parent, *seq, name.as_bytes(), e.ino).unwrap();
                *seq += 1;
            }
            for &(off, len, id, coff) in e.ext.iter().filter(|_| new) {
                let idx = chunk_order.iter().position(|c| *c == id).unwrap() as u64;
                w.add_extent(&Extent {
                    ino: e.ino,
                    file_off: off,
                    len,
                    chunk: idx,
                    chunk_off: coff,
                })
                .unwrap();
            }
            for (n, v) in e.xattrs.iter().filter(|_| new) {
                w.add_xattr(e.ino, n.as_bytes(), v.as_bytes()).unwrap();
            }
        }
        for (idx, id) in chunk_order.iter().enumerate() {
            w.add_chunk(&ChunkInfo {
                idx: idx as u64,
                id: ChunkId([*id; 32]),
                len: 4 * MIB,
                blocks: vec![[0; 32]; 64],
            })
            .unwrap();
        }
        w.finish().unwrap();
        Manifest::open(&path).unwrap()
    }

    fn diff(a: &[E], b: &[E]) -> Vec<FileDiff> {
        diff_in(a, b, None)
    }

    fn diff_in(a: &[E], b: &[E], prefix: Option<&str>) -> Vec<FileDiff> {
        let t = tempfile::tempdir().unwrap();
        let ids: Vec<u8> = (1..=20).collect();
        let rev: Vec<u8> = ids.iter().rev().copied().collect();
        let ma = catalog(t.path(), "a", &ids, a);
        // B numbers the same chunks the other way round: only ids may matter.
        let mb = catalog(t.path(), "b", &rev, b);
        diff_versions(&ma, &mb, prefix.map(str::as_bytes)).unwrap()
    }

    fn summary(d: &[FileDiff]) -> Vec<String> {
        d.iter()
            .map(|d| {
                let p = String::from_utf8_lossy(&d.change.path);
                let k = match &d.change.kind {
                    ChangeKind::Added => "A".to_string(),
                    ChangeKind::Modified => "M".to_string(),
                    ChangeKind::Deleted => "D".to_string(),
                    ChangeKind::Renamed { from } => {
                        format!("R {} ->", String::from_utf8_lossy(from))
                    }
                };
                let r: Vec<String> = d
                    .ranges
                    .iter()
                    .map(|r| format!("{}..{}", r.start, r.end))
                    .collect();
                format!("{k} {p} [{}]", r.join(","))
            })
            .collect()
    }

    fn ranges(
        a: &[(u64, u64, u8, u64)],
        sa: u64,
        b: &[(u64, u64, u8, u64)],
        sb: u64,
    ) -> Vec<Range<u64>> {
        let c = |v: &[(u64, u64, u8, u64)]| -> Content {
            v.iter()
                .map(|&(o, l, id, c)| (o, l, ChunkId([id; 32]), c))
                .collect()
        };
        changed_ranges(&c(a), sa, &c(b), sb)
    }

    /// Regression (found while writing the fuzz target `manifest`): a hostile catalog may list a directory inside
    /// itself; the walk compared the pair again at every depth and never ended. Each pair of
    /// directories is compared once.
    #[test]
    fn a_directory_inside_itself_is_walked_once() {
        let d = tempfile::tempdir().unwrap();
        let cyclic = |name, size| {
            catalog(
                d.path(),
                name,
                &[1],
                &[
                    dir("d", 2),
                    dir("d/loop", 2),
                    file("d/f", 3, size, &[(0, size, 1, 0)]),
                ],
            )
        };
        let (a, b) = (cyclic("a", 10), cyclic("b", 20));
        assert!(diff_versions(&a, &a, None).unwrap().is_empty());
        let changed: Vec<_> = diff_versions(&a, &b, None)
            .unwrap()
            .into_iter()
            .map(|f| f.change.path)
            .collect();
        assert_eq!(changed, vec![b"d/f".to_vec()]);
    }

    #[test]
    fn extent_comparison_edge_cases() {
        // Identical mappings, however the extents are cut.
        assert!(
            ranges(
                &[(0, 2 * MIB, 1, 0)],
                2 * MIB,
                &[(0, MIB, 1, 0), (MIB, MIB, 1, MIB)],
                2 * MIB
            )
            .is_empty()
        );
        // One window replaced.
        let w = [(0, MIB, 1, 0), (MIB, MIB, 2, 0), (2 * MIB, MIB, 3, 0)];
        let mut w2 = w;
        w2[1].2 = 9;
        assert_eq!(ranges(&w, 3 * MIB, &w2, 3 * MIB), vec![MIB..2 * MIB]);
        // Same chunk at another offset (bytes shifted inside a pack): changed.
        assert_eq!(
            ranges(&[(0, 100, 1, 0)], 100, &[(0, 100, 1, 50)], 100),
            vec![0..100]
        );
        // Same chunk, offsets shifted with the file offset: unchanged where they overlap.
        assert_eq!(
            ranges(
                &[(0, 100, 1, 0)],
                100,
                &[(0, 50, 2, 0), (50, 50, 1, 50)],
                100
            ),
            vec![0..50]
        );
        // Holes on both sides are unchanged; a hole against data is a change.
        assert!(ranges(&[(MIB, 10, 1, 0)], 2 * MIB, &[(MIB, 10, 1, 0)], 2 * MIB).is_empty());
        assert_eq!(
            ranges(&[], 2 * MIB, &[(MIB, 10, 1, 0)], 2 * MIB),
            vec![MIB..MIB + 10]
        );
        assert_eq!(ranges(&[(0, 10, 1, 0)], 2 * MIB, &[], 2 * MIB), vec![0..10]);
        // Growth and truncation add the bytes between the sizes; adjacent ranges merge.
        assert_eq!(
            ranges(
                &[(0, 100, 1, 0)],
                100,
                &[(0, 100, 1, 0), (100, 100, 2, 0)],
                200
            ),
            vec![100..200]
        );
        assert_eq!(
            ranges(&[(0, 100, 1, 0)], 100, &[(0, 50, 1, 0)], 50),
            vec![50..100]
        );
        assert_eq!(
            ranges(&[(0, 100, 1, 0)], 100, &[(0, 100, 2, 0)], 300),
            vec![0..300]
        );
        // Growth by a hole.
        assert_eq!(
            ranges(&[(0, 100, 1, 0)], 100, &[(0, 100, 1, 0)], 4096),
            vec![100..4096]
        );
        // Several separate changes.
        assert_eq!(
            ranges(
                &[(0, 300, 1, 0)],
                300,
                &[
                    (0, 10, 1, 0),
                    (10, 10, 2, 0),
                    (20, 200, 1, 20),
                    (220, 80, 3, 0)
                ],
                300
            ),
            vec![10..20, 220..300]
        );
    }

    #[test]
    fn chunk_ids_not_indexes_decide() {
        let a = [
            dir("d", 2),
            file(
                "d/big",
                3,
                3 * MIB,
                &[(0, MIB, 1, 0), (MIB, MIB, 2, 0), (2 * MIB, MIB, 3, 0)],
            ),
        ];
        // Same catalog, chunks numbered differently: nothing changed.
        assert!(diff(&a, &a).is_empty());
        let mut b = a.clone();
        b[1].ext[1] = (MIB, MIB, 7, 0);
        let d = diff(&a, &b);
        assert_eq!(summary(&d), vec![format!("M d/big [{}..{}]", MIB, 2 * MIB)]);
        assert!(d[0].change.data && !d[0].change.meta);
        assert_eq!(
            (d[0].old_size, d[0].new_size, d[0].change.bytes),
            (Some(3 * MIB), Some(3 * MIB), MIB)
        );
    }

    #[test]
    fn added_deleted_modified_and_metadata() {
        let a = [
            file("f", 2, 10, &[(0, 10, 1, 0)]),
            file("gone", 3, 20, &[(0, 20, 1, 10)]),
            link("l", 4, "x"),
            dir("olddir", 5),
            file("olddir/a", 6, 5, &[(0, 5, 1, 40)]),
            file("k", 7, 5, &[(0, 5, 1, 50)]),
        ];
        let mut f = file("f", 2, 10, &[(0, 10, 1, 0)]);
        f.mode = 0o600;
        f.xattrs = vec![("user.tag", "x")];
        let mut l = link("l", 4, "y");
        l.mtime = 5;
        let b = [
            f,
            l,
            file("new", 8, 30, &[(0, 30, 2, 0)]),
            dir("newdir", 9),
            file("newdir/n", 10, 7, &[(0, 7, 2, 30)]),
            dir("k", 7),
        ];
        let d = diff(&a, &b);
        assert_eq!(
            summary(&d),
            vec![
                "M f []",
                "D gone []",
                "D k []",
                "A k []",
                "M l []",
                "A new [0..30]",
                "A newdir []",
                "D olddir []",
            ]
        );
        let f = &d[0];
        assert!(!f.change.data && f.change.meta);
        let fields: Vec<(&str, &str, &str)> = f
            .meta
            .iter()
            .map(|m| (m.field.as_str(), m.old.as_str(), m.new.as_str()))
            .collect();
        assert_eq!(
            fields,
            vec![("mode", "0644", "0600"), ("xattr:user.tag", "(none)", "x")]
        );
        let l = &d[4];
        let fields: Vec<&str> = l.meta.iter().map(|m| m.field.as_str()).collect();
        assert_eq!(fields, vec!["mtime", "target"]);
        assert_eq!(l.meta[1].new, "y");
        assert_eq!(
            (d[1].old_size, d[1].new_size, d[1].change.bytes),
            (Some(20), None, 20)
        );
    }

    #[test]
    fn renames_by_inode_and_by_content() {
        let big = [(0, MIB, 1, 0), (MIB, MIB, 2, 0)];
        let a = [
            dir("d", 2),
            file("d/t1", 3, 2 * MIB, &big),
            file("same", 4, 100, &[(0, 100, 3, 0)]),
            file("small", 5, 10, &[(0, 10, 3, 100)]),
            dir("sub", 6),
            file("sub/x", 7, 10, &[(0, 10, 3, 200)]),
            file("sub/y", 8, 10, &[(0, 10, 3, 300)]),
        ];
        let b = [
            dir("d", 2),
            // Same inode, renamed and one window rewritten.
            file("d/t2", 3, 2 * MIB, &[(0, MIB, 1, 0), (MIB, MIB, 9, 0)]),
            // New inode number, identical content.
            file("moved", 40, 100, &[(0, 100, 3, 0)]),
            // Same inode, but nothing in common (generate renumbers): not a rename.
            file("other", 5, 10, &[(0, 10, 4, 0)]),
            // A renamed directory with a changed entry.
            dir("sub2", 6),
            file("sub2/x", 7, 10, &[(0, 10, 3, 200)]),
            file("sub2/y", 8, 11, &[(0, 11, 4, 20)]),
        ];
        let d = diff(&a, &b);
        assert_eq!(
            summary(&d),
            vec![
                format!("R d/t1 -> d/t2 [{}..{}]", MIB, 2 * MIB),
                "R same -> moved []".to_string(),
                "A other [0..10]".to_string(),
                "D small []".to_string(),
                "R sub -> sub2 []".to_string(),
                "M sub2/y [0..11]".to_string(),
            ]
        );
        assert!(d[0].change.data && !d[1].change.data);
    }

    #[test]
    fn renames_across_new_directories_and_prefixes() {
        let a = [
            dir("db", 2),
            file("db/t", 3, 10, &[(0, 10, 1, 0)]),
            file("top", 4, 5, &[(0, 5, 1, 10)]),
        ];
        let b = [
            dir("db", 2),
            dir("archive", 5),
            dir("archive/2024", 6),
            // Moved into a new directory and modified: found by inode number.
            file("archive/2024/t", 3, 12, &[(0, 10, 1, 0), (10, 2, 2, 0)]),
            file("db/top", 4, 5, &[(0, 5, 1, 10)]),
        ];
        let d = diff(&a, &b);
        assert_eq!(
            summary(&d),
            vec![
                "A archive []",
                "R db/t -> archive/2024/t [10..12]",
                "R top -> db/top []"
            ]
        );
        // Under db/: renames in and out of it are reported, from outside too.
        let d = diff_in(&a, &b, Some("db"));
        assert_eq!(
            summary(&d),
            vec!["R db/t -> archive/2024/t [10..12]", "R top -> db/top []"]
        );
        let d = diff_in(&a, &b, Some("db/t"));
        assert_eq!(summary(&d), vec!["R db/t -> archive/2024/t [10..12]"]);
        assert!(diff_in(&a, &b, Some("nothing/here")).is_empty());
        // A prefix naming a file.
        let d = diff_in(&a, &a, Some("top"));
        assert!(d.is_empty());
    }

    #[test]
    fn hard_links_are_not_renames() {
        let a = [
            file("x", 2, 10, &[(0, 10, 1, 0)]),
            file("y", 2, 10, &[(0, 10, 1, 0)]),
        ];
        // One of the two names removed.
        let b = [file("y", 2, 10, &[(0, 10, 1, 0)])];
        assert_eq!(summary(&diff(&a, &b)), vec!["D x []"]);
    }

    #[test]
    fn times_format() {
        assert_eq!(crate::util::rfc3339_ns(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            crate::util::rfc3339_ns(-1),
            "1969-12-31T23:59:59.999999999Z"
        );
        assert_eq!(
            crate::util::rfc3339_ns(1_700_000_000_123_456_789),
            "2023-11-14T22:13:20.123456789Z"
        );
    }
}

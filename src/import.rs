//! `import`: read a volume of an **original Horcrux** repository (the Go tool's `reducto`
//! output) from any store and write it as a new volume of a horcrux repository.
//!
//! The original format (docs/FORMAT.md §9): `<name>.meta` is a JSON document listing every
//! entry of the tree breadth-first (the root first, `Prefix` = the path of its directory,
//! starting with the root's name), with a Go `os.FileMode`, size, uid and gid, and a chunk count;
//! a file's bytes are cut into `<Current Version>/<Prefix>/<Name>.<i>` objects of `Chunk Size`
//! bytes each (the last one shorter), with no hashes, no times and no symlinks (the generator
//! followed them).
//!
//! The tree is given to [`crate::generate::generate_from`] as a [`TreeInput`], so content is
//! streamed window by window from the source into the usual pipeline: nothing of the volume is
//! materialized on local disk.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;

use crate::generate::{
    GenerateError, GenerateOptions, GenerateReport, InputEntry, InputNode, Progress, TreeInput,
    generate_from,
};
use crate::manifest::{NodeKind, TimeNs};
use crate::repo::Repository;
use crate::store::{Store, StoreError};

/// Why an import failed. Messages name the store, key or entry involved.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{store}: there is no original Horcrux volume `{name}` (no `{name}.meta`); {}", available_list(.available))]
    NoSuchVolume {
        store: String,
        name: String,
        available: Vec<String>,
    },
    #[error(
        "invalid original volume name `{0}`: it names a `<name>.meta` object at the top of the repository"
    )]
    BadName(String),
    #[error("{store}: `{key}` is not an original Horcrux .meta file: {message}")]
    MetaSyntax {
        store: String,
        key: String,
        message: String,
    },
    #[error("{store}: `{key}` is malformed: {what}")]
    Malformed {
        store: String,
        key: String,
        what: String,
    },
    #[error("{store}: {count} chunk file(s) of the volume are missing, e.g. {}", .examples.join(", "))]
    MissingChunks {
        store: String,
        count: usize,
        examples: Vec<String>,
    },
    #[error("{store}: chunk file `{key}` is {found} bytes, the .meta implies {expected}")]
    ChunkSize {
        store: String,
        key: String,
        found: u64,
        expected: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Generate(GenerateError),
}

impl From<GenerateError> for ImportError {
    fn from(e: GenerateError) -> Self {
        // A failure of our own TreeInput comes back boxed: unwrap it to keep its type.
        match e {
            GenerateError::Source(b) => match b.downcast::<ImportError>() {
                Ok(ie) => *ie,
                Err(b) => ImportError::Generate(GenerateError::Source(b)),
            },
            e => ImportError::Generate(e),
        }
    }
}

fn available_list(names: &[String]) -> String {
    if names.is_empty() {
        "the store holds no .meta file at its top".into()
    } else {
        format!("volumes there: {}", names.join(", "))
    }
}

/// `Config` of a `.meta` file.
#[derive(Debug, Clone, Deserialize)]
struct MetaConfig {
    #[serde(rename = "Version", default)]
    version: String,
    #[serde(rename = "Chunk Type", default)]
    chunk_type: i64,
    #[serde(rename = "Chunk Size")]
    chunk_size: i64,
}

#[derive(Debug, Clone, Deserialize)]
struct MetaStat {
    #[serde(rename = "Mode")]
    mode: u32,
    #[serde(rename = "Size")]
    size: i64,
    #[serde(rename = "Uid", default)]
    uid: u32,
    #[serde(rename = "Gid", default)]
    gid: u32,
}

#[derive(Debug, Clone, Deserialize)]
struct MetaEntry {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Prefix")]
    prefix: String,
    #[serde(rename = "IsDir")]
    is_dir: bool,
    #[serde(rename = "Stat")]
    stat: MetaStat,
    #[serde(rename = "Number of Chunks")]
    chunks: i64,
}

#[derive(Debug, Clone, Deserialize)]
struct Meta {
    #[serde(rename = "Config")]
    config: MetaConfig,
    #[serde(rename = "Current Version", default)]
    current: String,
    #[serde(rename = "Num Files", default)]
    num_files: Option<i64>,
    #[serde(rename = "Entry List")]
    entries: Vec<MetaEntry>,
}

/// Most chunk files a `.meta` may name (64 PB at the original's default 64 MB chunks): every
/// one is checked and read in turn, so a hostile size with a tiny `Chunk Size` must not make
/// an import loop for ever.
const MAX_CHUNK_FILES: u64 = 100_000_000;

// Bits of Go's `os.FileMode` (the `.meta` stores it as a number).
const GO_DIR: u32 = 1 << 31;
const GO_SYMLINK: u32 = 1 << 27;
const GO_DEVICE: u32 = 1 << 26;
const GO_NAMED_PIPE: u32 = 1 << 25;
const GO_SOCKET: u32 = 1 << 24;
const GO_SETUID: u32 = 1 << 23;
const GO_SETGID: u32 = 1 << 22;
const GO_CHAR_DEVICE: u32 = 1 << 21;
const GO_STICKY: u32 = 1 << 20;

/// Kind and POSIX permission bits of a Go `os.FileMode`.
fn go_mode(mode: u32, is_dir: bool) -> (NodeKind, u32) {
    let kind = if is_dir || mode & GO_DIR != 0 {
        NodeKind::Dir
    } else if mode & GO_SYMLINK != 0 {
        NodeKind::Symlink
    } else if mode & GO_NAMED_PIPE != 0 {
        NodeKind::Fifo
    } else if mode & GO_SOCKET != 0 {
        NodeKind::Socket
    } else if mode & GO_CHAR_DEVICE != 0 {
        NodeKind::CharDev
    } else if mode & GO_DEVICE != 0 {
        NodeKind::BlockDev
    } else {
        NodeKind::File
    };
    let mut perm = mode & 0o777;
    if mode & GO_SETUID != 0 {
        perm |= 0o4000;
    }
    if mode & GO_SETGID != 0 {
        perm |= 0o2000;
    }
    if mode & GO_STICKY != 0 {
        perm |= 0o1000;
    }
    (kind, perm)
}

/// One entry of the original tree, checked.
#[derive(Debug, Clone)]
struct OldNode {
    name: String,
    kind: NodeKind,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    /// `<Current Version>/<Prefix>/<Name>`: chunk `i` is this plus `.<i>`.
    key: String,
    chunks: u64,
    children: Vec<usize>,
}

/// An original Horcrux volume, read and checked, ready to import (a [`TreeInput`]).
#[derive(Debug)]
pub struct Original {
    store: Arc<dyn Store>,
    runtime: tokio::runtime::Handle,
    meta_key: String,
    nodes: Vec<OldNode>,
    chunk_size: u64,
    /// Times of every node (the format records none).
    time: TimeNs,
    files: u64,
    bytes: u64,
    /// Chunk files the entries name (bounded by [`MAX_CHUNK_FILES`]).
    chunk_files: u64,
    /// The `.meta`'s `Config.Version`, e.g. `00.03-rc2`.
    pub version: String,
}

impl Original {
    /// Read and check `<name>.meta` from `store`. Blocking (uses `runtime`); `time` is given to
    /// every node as atime, mtime and ctime.
    pub fn open(
        store: Arc<dyn Store>,
        name: &str,
        time: TimeNs,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Original, ImportError> {
        if name.is_empty() || name.starts_with('.') || name.contains('/') || name.contains('\0') {
            return Err(ImportError::BadName(name.to_string()));
        }
        let key = format!("{name}.meta");
        let bytes = match runtime.block_on(store.get(&key)) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => {
                let mut available: Vec<String> = runtime
                    .block_on(store.list(""))
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|k| !k.contains('/'))
                    .filter_map(|k| k.strip_suffix(".meta").map(str::to_string))
                    .collect();
                available.sort();
                return Err(ImportError::NoSuchVolume {
                    store: store.describe(),
                    name: name.to_string(),
                    available,
                });
            }
            Err(e) => return Err(e.into()),
        };
        // serde_json's message carries the line and column of a syntax error.
        let meta: Meta = serde_json::from_slice(&bytes).map_err(|e| ImportError::MetaSyntax {
            store: store.describe(),
            key: key.clone(),
            message: e.to_string(),
        })?;
        let mut o = Original {
            store,
            runtime: runtime.clone(),
            meta_key: key,
            nodes: Vec::new(),
            chunk_size: 0,
            time,
            files: 0,
            bytes: 0,
            chunk_files: 0,
            version: meta.config.version.clone(),
        };
        o.build(meta)?;
        Ok(o)
    }

    fn malformed(&self, what: String) -> ImportError {
        ImportError::Malformed {
            store: self.store.describe(),
            key: self.meta_key.clone(),
            what,
        }
    }

    /// Check the entries and link them into a tree.
    fn build(&mut self, meta: Meta) -> Result<(), ImportError> {
        if meta.config.chunk_size <= 0 {
            return Err(self.malformed(format!(
                "`Chunk Size` is {}, not a positive number",
                meta.config.chunk_size
            )));
        }
        if meta.config.chunk_type > 1 {
            // Type 2 (rolling checksums) was declared by the original but never implemented.
            return Err(self.malformed(format!(
                "`Chunk Type` {} is not supported (only 1, fixed-size chunks)",
                meta.config.chunk_type
            )));
        }
        self.chunk_size = meta.config.chunk_size as u64;
        let current = if meta.current.is_empty() {
            "v1".to_string()
        } else {
            meta.current.clone()
        };
        if current.contains('/') || current.starts_with('.') {
            return Err(self.malformed(format!("`Current Version` `{current}` is not a name")));
        }
        if let Some(n) = meta.num_files {
            if n != meta.entries.len() as i64 {
                return Err(self.malformed(format!(
                    "`Num Files` is {n} but the entry list has {} entries (truncated?)",
                    meta.entries.len()
                )));
            }
        }
        let Some(root) = meta.entries.first() else {
            return Err(self.malformed("the entry list is empty".into()));
        };
        if !root.is_dir || !root.prefix.is_empty() || bad_name(&root.name) {
            return Err(self.malformed(format!(
                "the first entry (`{}`, prefix `{}`) is not the root directory",
                root.name, root.prefix
            )));
        }
        // Directory path (`root/a/b`) → node index.
        let mut dirs: HashMap<String, usize> = HashMap::new();
        for (i, e) in meta.entries.iter().enumerate() {
            let what = |w: &str| format!("entry {i} (`{}/{}`): {w}", e.prefix, e.name);
            if bad_name(&e.name) {
                return Err(self.malformed(what("the name is not a single path component")));
            }
            let (kind, mode) = go_mode(e.stat.mode, e.is_dir);
            if e.is_dir != (kind == NodeKind::Dir) {
                return Err(self.malformed(what("`IsDir` contradicts its mode")));
            }
            if kind == NodeKind::Symlink {
                // The original generator followed symlinks (stat, not lstat), so it never
                // wrote one; a symlink's target is not recorded anywhere.
                return Err(
                    self.malformed(what("a symlink, whose target the format does not record"))
                );
            }
            if e.stat.size < 0 {
                return Err(self.malformed(what(&format!("negative size {}", e.stat.size))));
            }
            let size = e.stat.size as u64;
            let chunks = match kind {
                NodeKind::File => {
                    let expect = size.div_ceil(self.chunk_size);
                    if e.chunks != expect as i64 {
                        return Err(self.malformed(what(&format!(
                            "{} chunks listed, but {size} bytes make {expect} of {} bytes",
                            e.chunks, self.chunk_size
                        ))));
                    }
                    expect
                }
                // Directories say 1, other nodes 0 (or -1 when the generator failed to open a
                // socket): none has chunk files.
                _ => 0,
            };
            let path = if i == 0 {
                e.name.clone()
            } else {
                format!("{}/{}", e.prefix, e.name)
            };
            let idx = self.nodes.len();
            if i > 0 {
                let Some(&parent) = dirs.get(&e.prefix) else {
                    return Err(self.malformed(what(&format!(
                        "its directory `{}` is not listed before it",
                        e.prefix
                    ))));
                };
                if self.nodes[parent]
                    .children
                    .iter()
                    .any(|&c| self.nodes[c].name == e.name)
                {
                    return Err(self.malformed(what("listed twice")));
                }
                self.nodes[parent].children.push(idx);
            }
            if kind == NodeKind::Dir {
                dirs.insert(path.clone(), idx);
            }
            if kind == NodeKind::File {
                self.files += 1;
                self.chunk_files += chunks;
                // Sizes are untrusted: a total past 2^64 bytes, or more chunk files than any
                // real volume has (each is checked and read one by one), is a broken .meta.
                self.bytes = match self.bytes.checked_add(size) {
                    Some(b) => b,
                    None => return Err(self.malformed(what("the sizes add up past 2^64 bytes"))),
                };
                if self.chunk_files > MAX_CHUNK_FILES {
                    return Err(self.malformed(what(&format!(
                        "the entries so far list more than {MAX_CHUNK_FILES} chunk files; \
                         the `Chunk Size` ({}) or the sizes are wrong",
                        self.chunk_size
                    ))));
                }
            }
            self.nodes.push(OldNode {
                name: e.name.clone(),
                kind,
                mode,
                uid: e.stat.uid,
                gid: e.stat.gid,
                size,
                key: format!("{current}/{path}"),
                chunks,
                children: Vec::new(),
            });
        }
        Ok(())
    }

    /// Name of the original root directory (the generator's input directory's name).
    pub fn root_name(&self) -> &str {
        &self.nodes[0].name
    }

    /// The original's chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Entries (the root included), regular files, and their bytes.
    pub fn counts(&self) -> (usize, u64, u64) {
        (self.nodes.len(), self.files, self.bytes)
    }

    fn chunk_len(&self, n: &OldNode, i: u64) -> u64 {
        (n.size - i * self.chunk_size).min(self.chunk_size)
    }

    /// Check that every chunk file exists and, where the store's listing gives sizes, has the
    /// size the `.meta` implies — before anything is written.
    pub fn check_chunks(&self) -> Result<(), ImportError> {
        let store = &self.store;
        let describe = store.describe();
        let root_prefix = format!("{}/", self.nodes[0].key);
        let sizes: HashMap<String, u64> = self
            .runtime
            .block_on(store.list_sizes(&root_prefix))?
            .into_iter()
            .collect();
        let mut unlisted = Vec::new();
        for n in &self.nodes {
            for i in 0..n.chunks {
                let key = format!("{}.{i}", n.key);
                let expected = self.chunk_len(n, i);
                match sizes.get(&key) {
                    Some(&found) if found != expected => {
                        return Err(ImportError::ChunkSize {
                            store: describe,
                            key,
                            found,
                            expected,
                        });
                    }
                    Some(_) => {}
                    // Listings skip names starting with `.`: ask for those directly.
                    None => unlisted.push(key),
                }
            }
        }
        // Count the missing ones but keep only a few names: a broken .meta may name millions.
        let mut count = 0;
        let mut examples = Vec::new();
        for batch in unlisted.chunks(1000) {
            let present = self.runtime.block_on(store.exists(batch))?;
            for (k, _) in batch.iter().zip(present).filter(|(_, p)| !p) {
                count += 1;
                if examples.len() < 5 {
                    examples.push(k.clone());
                }
            }
        }
        if count > 0 {
            return Err(ImportError::MissingChunks {
                store: describe,
                count,
                examples,
            });
        }
        Ok(())
    }

    fn input_node(&self, n: &OldNode) -> InputNode {
        InputNode {
            kind: n.kind,
            mode: n.mode,
            uid: n.uid,
            gid: n.gid,
            size: n.size,
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            rdev: 0,
            target: None,
            xattrs: Vec::new(),
        }
    }
}

fn bad_name(name: &str) -> bool {
    name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0')
}

impl TreeInput for Original {
    fn root(&self) -> Result<(InputNode, u64), GenerateError> {
        Ok((self.input_node(&self.nodes[0]), 0))
    }

    fn list(&self, dir: u64) -> Result<Vec<InputEntry>, GenerateError> {
        let d = &self.nodes[dir as usize];
        Ok(d.children
            .iter()
            .map(|&c| {
                let n = &self.nodes[c];
                InputEntry {
                    name: n.name.as_bytes().to_vec(),
                    node: self.input_node(n),
                    id: c as u64,
                }
            })
            .collect())
    }

    fn read(&self, file: u64, off: u64, len: u64, buf: &mut Vec<u8>) -> Result<(), GenerateError> {
        let n = &self.nodes[file as usize];
        let cs = self.chunk_size;
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let i = pos / cs;
            let (a, b) = (pos - i * cs, (end - i * cs).min(self.chunk_len(n, i)));
            let key = format!("{}.{i}", n.key);
            let bytes = read_retrying(&self.runtime, &*self.store, &key, a..b)
                .map_err(|e| GenerateError::Source(Box::new(ImportError::Store(e))))?;
            if bytes.len() as u64 != b - a {
                return Err(GenerateError::Source(Box::new(ImportError::ChunkSize {
                    store: self.store.describe(),
                    key,
                    found: a + bytes.len() as u64,
                    expected: self.chunk_len(n, i),
                })));
            }
            buf.extend_from_slice(&bytes);
            pos = i * cs + b;
        }
        Ok(())
    }

    fn totals(&self) -> (u64, u64) {
        (self.bytes, self.files)
    }
}

/// A range read with 3 attempts (transient network errors); "not found" is not retried.
fn read_retrying(
    runtime: &tokio::runtime::Handle,
    store: &dyn Store,
    key: &str,
    range: std::ops::Range<u64>,
) -> Result<bytes::Bytes, StoreError> {
    let mut attempt = 1;
    loop {
        match runtime.block_on(store.get_range(key, range.clone())) {
            Ok(b) => return Ok(b),
            Err(e) if attempt < 3 && !e.is_not_found() => {
                tracing::warn!(key, attempt, error = %e, "reading a chunk file failed; retrying");
                std::thread::sleep(std::time::Duration::from_millis(300 * attempt));
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Write `original` as volume `opts.name` of `repo` (first commit on `main`; `opts.input` is
/// ignored). Blocking; call it from a thread that is not a tokio worker.
pub fn import(
    original: Arc<Original>,
    opts: &GenerateOptions,
    repo: &Repository,
    runtime: &tokio::runtime::Handle,
    progress: &dyn Progress,
) -> Result<GenerateReport, ImportError> {
    original.check_chunks()?;
    Ok(generate_from(opts, original, repo, runtime, progress)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, prefix: &str, mode: u32, size: i64, chunks: i64) -> String {
        format!(
            r#"{{"Name": "{name}", "Prefix": "{prefix}", "IsDir": {}, "Stat": {{"Mode": {mode}, "Size": {size}, "Uid": 1, "Gid": 2}}, "Number of Chunks": {chunks}}}"#,
            mode & GO_DIR != 0
        )
    }

    /// Open a `.meta` made of `entries` (chunk size 4) in a file store.
    fn open(entries: &[String], num_files: Option<usize>) -> Result<Original, ImportError> {
        open_sized(4, entries, num_files)
    }

    fn open_sized(
        chunk_size: i64,
        entries: &[String],
        num_files: Option<usize>,
    ) -> Result<Original, ImportError> {
        let tmp = tempfile::tempdir().unwrap();
        let n = num_files.unwrap_or(entries.len());
        let meta = format!(
            r#"{{"Config": {{"Version": "00.03-rc2", "Chunk Type": 1, "Chunk Size": {chunk_size}}}, "Current Version": "v1", "Num Files": {n}, "Entry List": [{}]}}"#,
            entries.join(",")
        );
        std::fs::write(tmp.path().join("V.meta"), meta).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = Arc::new(crate::store::FileStore::new(tmp.path().to_path_buf()));
        Original::open(store, "V", 7, rt.handle())
    }

    fn malformed(r: Result<Original, ImportError>) -> String {
        match r {
            Err(e @ ImportError::Malformed { .. }) => e.to_string(),
            other => panic!("expected a malformed .meta, got {other:?}"),
        }
    }

    #[test]
    fn meta_checks() {
        let root = entry("r", "", GO_DIR | 0o755, 4096, 1);
        let o = open(
            &[
                root.clone(),
                entry("d", "r", GO_DIR | 0o700, 4096, 1),
                entry("f", "r/d", 0o644, 9, 3),
                entry("e", "r", 0o600, 0, 0),
            ],
            None,
        )
        .unwrap();
        assert_eq!(o.counts(), (4, 2, 9));
        assert_eq!(o.nodes[2].key, "v1/r/d/f");
        assert_eq!(o.nodes[0].children, vec![1, 3]);

        let e = malformed(open(&[root.clone(), entry("f", "r/x", 0o644, 1, 1)], None));
        assert!(e.contains("`r/x` is not listed before it"), "{e}");
        let e = malformed(open(
            &[
                root.clone(),
                entry("f", "r", 0o644, 1, 1),
                entry("f", "r", 0o644, 1, 1),
            ],
            None,
        ));
        assert!(e.contains("listed twice"), "{e}");
        let e = malformed(open(&[root.clone(), entry("f", "r", 0o644, 9, 2)], None));
        assert!(e.contains("2 chunks listed"), "{e}");
        let e = malformed(open(std::slice::from_ref(&root), Some(5)));
        assert!(e.contains("`Num Files` is 5"), "{e}");
        let e = malformed(open(
            &[root.clone(), entry("l", "r", GO_SYMLINK | 0o777, 3, 1)],
            None,
        ));
        assert!(e.contains("symlink"), "{e}");
        let e = malformed(open(&[root.clone(), entry("..", "r", 0o644, 0, 0)], None));
        assert!(e.contains("not a single path component"), "{e}");
        let e = malformed(open(&[entry("f", "", 0o644, 0, 0)], None));
        assert!(e.contains("not the root directory"), "{e}");
        assert!(matches!(
            open(&["{\"Name\": 1}".to_string()], None),
            Err(ImportError::MetaSyntax { .. })
        ));
    }

    /// Regression (found while writing the fuzz target `import_meta`): sizes are untrusted. Totals past 2^64 bytes
    /// overflowed (a panic in debug builds), and a huge size with a tiny chunk size named
    /// billions of chunk files that `check_chunks` would list one by one.
    #[test]
    fn hostile_sizes_are_malformed() {
        let root = entry("r", "", GO_DIR | 0o755, 4096, 1);
        let huge = |name: &str| entry(name, "r", 0o644, i64::MAX, 1);
        let e = malformed(open_sized(
            i64::MAX,
            &[root.clone(), huge("a"), huge("b"), huge("c")],
            None,
        ));
        assert!(e.contains("past 2^64 bytes"), "{e}");
        let chunks = (i64::MAX as u64).div_ceil(4) as i64;
        let e = malformed(open(
            &[root, entry("f", "r", 0o644, i64::MAX, chunks)],
            None,
        ));
        assert!(e.contains("chunk files"), "{e}");
    }

    #[test]
    fn go_modes() {
        assert_eq!(go_mode(0o755 | GO_DIR, true), (NodeKind::Dir, 0o755));
        assert_eq!(go_mode(0o644, false), (NodeKind::File, 0o644));
        assert_eq!(
            go_mode(0o755 | GO_SETUID | GO_SETGID | GO_STICKY, false),
            (NodeKind::File, 0o7755)
        );
        assert_eq!(
            go_mode(0o600 | GO_DEVICE | GO_CHAR_DEVICE, false),
            (NodeKind::CharDev, 0o600)
        );
        assert_eq!(go_mode(0o600 | GO_DEVICE, false).0, NodeKind::BlockDev);
        assert_eq!(go_mode(0o600 | GO_NAMED_PIPE, false).0, NodeKind::Fifo);
        assert_eq!(go_mode(0o600 | GO_SOCKET, false).0, NodeKind::Socket);
    }
}

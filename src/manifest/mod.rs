//! The manifest: an indexed catalog of a whole tree (a SQLite database file, content-addressed
//! by the blake3 of its bytes). Lookups, listings and extent queries go through SQLite indexes,
//! so opening a 1,000,000-file manifest costs nothing and memory stays bounded by the page cache.
//!
//! Schema v1 (see `docs/FORMAT.md`):
//! - `meta(key, value)`: `format`, `version`, `volume`, `chunk_size`, `block_size`.
//! - `nodes(ino, parent, kind, mode, uid, gid, size, atime, mtime, ctime, nlink, rdev, target)`.
//! - `dirents(parent, seq, name, ino)`: children of a directory in name order; `seq` is the
//!   readdir cookie. Hard links are several dirents for one `ino`.
//! - `chunks(idx, id, len, blocks)`: every chunk the tree uses with its block hashes.
//! - `extents(ino, off, len, chunk, chunk_off)`: file bytes `[off, off+len)` are bytes
//!   `[chunk_off, chunk_off+len)` of chunk `idx`. Gaps between extents are holes.
//! - `xattrs(ino, name, value)`.

mod reader;
mod writer;

pub use reader::{DirEntry, Manifest, ManifestStats};
pub use writer::ManifestWriter;
pub use writer::hash_file;

use crate::hashtree::BlockHash;
use crate::ids::ChunkId;

/// Catalog format version.
pub const CATALOG_VERSION: u32 = 1;
/// Inode number of the root directory.
pub const ROOT_INO: u64 = 1;
/// Largest position (`dirents.seq`) of an entry in a directory: readers add small offsets to
/// it for readdir cookies, which must stay below the overlay's (2^62).
pub const MAX_DIRENT_SEQ: u64 = (1 << 62) - 8;

/// Errors reading or writing a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest {path}: {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    #[error("manifest {path}: not a horcrux catalog or damaged: {what}")]
    Invalid { path: String, what: String },
    #[error(
        "manifest {path}: catalog version {version} is not supported (this horcrux reads {CATALOG_VERSION})"
    )]
    Version { path: String, version: u32 },
    #[error("manifest {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Kind of a node, as stored (stable numbers: part of the format).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeKind {
    File = 1,
    Dir = 2,
    Symlink = 3,
    Fifo = 4,
    Socket = 5,
    CharDev = 6,
    BlockDev = 7,
}

impl NodeKind {
    pub fn from_code(c: i64) -> Option<Self> {
        Some(match c {
            1 => Self::File,
            2 => Self::Dir,
            3 => Self::Symlink,
            4 => Self::Fifo,
            5 => Self::Socket,
            6 => Self::CharDev,
            7 => Self::BlockDev,
            _ => return None,
        })
    }

    /// Its name on the wire and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Dir => "dir",
            Self::Symlink => "symlink",
            Self::Fifo => "fifo",
            Self::Socket => "socket",
            Self::CharDev => "chardev",
            Self::BlockDev => "blockdev",
        }
    }

    /// The `S_IFMT` bits of this kind.
    pub fn type_bits(self) -> u32 {
        match self {
            Self::File => libc::S_IFREG,
            Self::Dir => libc::S_IFDIR,
            Self::Symlink => libc::S_IFLNK,
            Self::Fifo => libc::S_IFIFO,
            Self::Socket => libc::S_IFSOCK,
            Self::CharDev => libc::S_IFCHR,
            Self::BlockDev => libc::S_IFBLK,
        }
    }

    /// From `st_mode`.
    pub fn from_mode(mode: u32) -> Option<Self> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => Self::File,
            libc::S_IFDIR => Self::Dir,
            libc::S_IFLNK => Self::Symlink,
            libc::S_IFIFO => Self::Fifo,
            libc::S_IFSOCK => Self::Socket,
            libc::S_IFCHR => Self::CharDev,
            libc::S_IFBLK => Self::BlockDev,
            _ => return None,
        })
    }
}

/// A timestamp in nanoseconds since the Unix epoch (may be negative).
pub type TimeNs = i64;

/// One inode of the tree with its POSIX metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub ino: u64,
    /// Parent directory (for a hard-linked file: the first one found).
    pub parent: u64,
    pub kind: NodeKind,
    /// Permission and special bits (`0o7777`), without the type bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: TimeNs,
    pub mtime: TimeNs,
    pub ctime: TimeNs,
    pub nlink: u32,
    pub rdev: u64,
    /// Symlink target bytes (data, never followed by horcrux).
    pub target: Option<Vec<u8>>,
}

/// A run of file bytes stored in a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub ino: u64,
    pub file_off: u64,
    pub len: u64,
    /// Index into the `chunks` table.
    pub chunk: u64,
    pub chunk_off: u64,
}

/// A chunk as the manifest knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkInfo {
    pub idx: u64,
    pub id: ChunkId,
    pub len: u64,
    pub blocks: Vec<BlockHash>,
}

/// Fixed parameters of a catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogHeader {
    pub volume: String,
    pub chunk_size: u64,
    pub block_size: u32,
}

/// Whether `name` may appear as a directory entry (no `/`, NUL, `.`, `..` or empty).
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/') && !name.contains(&0)
}

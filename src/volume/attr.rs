//! Attributes as the core reports them; adapters convert to their protocol's types.

use crate::manifest::{Node, NodeKind, TimeNs};

/// Attributes of an inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: NodeKind,
    /// Permission and special bits (`0o7777`).
    pub perm: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// 512-byte blocks allocated (holes excluded where known).
    pub blocks: u64,
    pub atime: TimeNs,
    pub mtime: TimeNs,
    pub ctime: TimeNs,
    pub rdev: u64,
    pub blksize: u32,
    /// Bumped when a checkout switches the volume to another version: inode numbers then name
    /// other files, and the kernel must not take a cached inode for the new one.
    pub generation: u64,
}

impl Attr {
    pub fn from_node(n: &Node, block_size: u32) -> Self {
        Self {
            ino: n.ino,
            kind: n.kind,
            perm: n.mode & 0o7777,
            nlink: n.nlink.max(1),
            uid: n.uid,
            gid: n.gid,
            size: n.size,
            blocks: n.size.div_ceil(512),
            atime: n.atime,
            mtime: n.mtime,
            ctime: n.ctime,
            rdev: n.rdev,
            blksize: block_size.min(1 << 20),
            generation: 0,
        }
    }
}

/// Filesystem totals for `statfs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

impl StatFs {
    pub fn read_only(bytes: u64, nodes: u64) -> Self {
        let bsize = 4096u32;
        Self {
            blocks: bytes.div_ceil(bsize as u64),
            bfree: 0,
            bavail: 0,
            files: nodes,
            ffree: 0,
            bsize,
            namelen: 255,
            frsize: bsize,
        }
    }
}

//! Core attributes → fuser's types.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};
use horcrux::manifest::{NodeKind, TimeNs};
use horcrux::volume::Attr;

/// fuser's file type for a node kind.
pub fn file_type(kind: NodeKind) -> FileType {
    match kind {
        NodeKind::File => FileType::RegularFile,
        NodeKind::Dir => FileType::Directory,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Fifo => FileType::NamedPipe,
        NodeKind::Socket => FileType::Socket,
        NodeKind::CharDev => FileType::CharDevice,
        NodeKind::BlockDev => FileType::BlockDevice,
    }
}

/// Nanoseconds since the epoch (negative = before it) as a `SystemTime`.
pub fn system_time(ns: TimeNs) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        // `unsigned_abs` keeps i64::MIN representable.
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// A userspace `dev_t` (glibc encoding, 64 bits) in the kernel's 32-bit "new" encoding, which
/// is what FUSE carries in `fuse_attr.rdev` (the kernel decodes it with `new_decode_dev`).
/// Majors above 12 bits or minors above 20 bits cannot be represented and are truncated.
pub fn kernel_rdev(dev: u64) -> u32 {
    let major = libc::major(dev as libc::dev_t);
    let minor = libc::minor(dev as libc::dev_t);
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// Core attributes as a fuser `FileAttr`.
pub fn file_attr(a: &Attr) -> FileAttr {
    let mtime = system_time(a.mtime);
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: system_time(a.atime),
        mtime,
        ctime: system_time(a.ctime),
        crtime: mtime,
        kind: file_type(a.kind),
        perm: (a.perm & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: kernel_rdev(a.rdev),
        blksize: a.blksize,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_around_the_epoch() {
        assert_eq!(system_time(0), UNIX_EPOCH);
        assert_eq!(
            system_time(1_500_000_000),
            UNIX_EPOCH + Duration::new(1, 500_000_000)
        );
        assert_eq!(
            system_time(-1_500_000_000),
            UNIX_EPOCH - Duration::new(1, 500_000_000)
        );
        // Extremes do not panic.
        let _ = system_time(i64::MIN);
        let _ = system_time(i64::MAX);
    }

    #[test]
    fn rdev_round_trips_through_the_kernel_encoding() {
        for (maj, min) in [(0u32, 0u32), (1, 3), (8, 17), (259, 65536), (4095, 0xfffff)] {
            let dev = libc::makedev(maj, min);
            let k = kernel_rdev(dev);
            // The kernel's new_decode_dev.
            let kmaj = (k & 0xfff00) >> 8;
            let kmin = (k & 0xff) | ((k >> 12) & 0xfff00);
            assert_eq!((kmaj, kmin), (maj, min), "dev {maj}:{min}");
        }
    }

    #[test]
    fn attr_fields() {
        let a = Attr {
            ino: 7,
            kind: NodeKind::CharDev,
            perm: 0o4755,
            nlink: 2,
            uid: 1000,
            gid: 100,
            size: 3,
            blocks: 1,
            atime: -5,
            mtime: 10,
            ctime: 20,
            rdev: libc::makedev(1, 3),
            blksize: 4096,
            generation: 0,
        };
        let f = file_attr(&a);
        assert_eq!(f.ino, INodeNo(7));
        assert_eq!(f.kind, FileType::CharDevice);
        assert_eq!(f.perm, 0o4755);
        assert_eq!(f.rdev, (1 << 8) | 3);
        assert_eq!(f.atime, UNIX_EPOCH - Duration::from_nanos(5));
    }
}

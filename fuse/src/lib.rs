//! FUSE adapter for horcrux volumes: a thin layer over [`horcrux::volume::Volume`].
//!
//! Each kernel request becomes one call into the core, inside a tracing span; the result is
//! mapped to a reply ([`attr`] for attributes, [`errno`] for failures, logged once there).
//! No filesystem semantics live here.
//!
//! Threading: fuser runs `n_threads` worker threads that call these methods concurrently; the
//! core methods are synchronous and block the calling worker while a fetch runs on the
//! volume's tokio runtime. Workers are never runtime threads, so blocking there is safe.

pub mod attr;
pub mod errno;
pub mod mountinfo;

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    AccessFlags, BackingId, BsdFileFlags, Config, Errno, FileHandle, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, Notifier, OpenAccMode,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, Session,
    SessionACL, TimeOrNow, WriteFlags,
};
use horcrux::manifest::NodeKind;
use horcrux::metrics::OpMetrics;
use horcrux::volume::{
    Attr, BackingToken, Ctx, DirSink, KernelCache, Opened, SetAttr, TimeSet, Volume, VolumeError,
};

pub use fuser::Session as FuseSession;

use crate::attr::{file_attr, file_type};
use crate::errno::fail;

/// How long the kernel may cache entries, attributes and negative lookups. A mounted version
/// is immutable, and every change of a writable mount goes through the kernel (which updates
/// its caches) except a discard, which invalidates what it touched: nothing goes stale.
pub const TTL: Duration = Duration::from_secs(24 * 3600);

/// Largest write request asked of the kernel (it needs `FUSE_MAX_PAGES`): fuser's largest
/// buffer. The kernel caps every request at `fs.fuse.max_pages_limit` pages (256 = 1 MiB by
/// default, up to 65535 since Linux 6.13), so asking for more costs nothing and lets an
/// administrator who raises that limit get larger requests.
const MAX_WRITE: u32 = 16 << 20;

/// Readahead asked of the kernel at `init` (it may offer less; see [`tune_readahead`]).
const MAX_READAHEAD: u32 = 1 << 20;

/// Outstanding background (readahead, async) requests the kernel may queue before it
/// throttles readers (the congestion threshold is 3/4 of it). The kernel default is 12;
/// readahead of several sequential readers and a daemon with many workers use more.
pub const MAX_BACKGROUND: u16 = 256;

/// Capabilities requested when the kernel offers them. `FUSE_MAX_PAGES` lets a single
/// request carry up to `fs.fuse.max_pages_limit` pages (256 = 1 MiB by default) instead of 32.
const WANTED: InitFlags = InitFlags::FUSE_DO_READDIRPLUS
    .union(InitFlags::FUSE_READDIRPLUS_AUTO)
    .union(InitFlags::FUSE_PARALLEL_DIROPS)
    .union(InitFlags::FUSE_CACHE_SYMLINKS)
    .union(InitFlags::FUSE_MAX_PAGES);

/// Overrides of the FUSE session parameters asked at `init` (the bench measures each).
#[derive(Debug, Clone, Default)]
pub struct Tuning {
    /// [`MAX_BACKGROUND`] by default.
    pub max_background: Option<u16>,
    /// [`MAX_WRITE`] by default (also bounds read requests through `max_pages`).
    pub max_write: Option<u32>,
    /// When the kernel lists directories with attributes: `auto` by default.
    pub readdirplus: Option<ReaddirPlus>,
}

/// When the kernel asks for a directory listing with every entry's attributes (`READDIRPLUS`)
/// instead of names only. With attributes, a listing followed by a `stat` of each entry (`ls -l`,
/// `find -printf`) needs no `LOOKUP` per entry; without, a walk that only needs names (`find`)
/// does not make the kernel build an inode for every entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReaddirPlus {
    /// The kernel decides: with attributes for a directory's first listing and for one whose
    /// entries were looked up (`FUSE_READDIRPLUS_AUTO`).
    Auto,
    /// Always with attributes.
    Always,
    /// Names only.
    Never,
}

/// A mounted volume as a fuser filesystem.
#[derive(Debug)]
pub struct HorcruxFs {
    volume: Arc<Volume>,
    tuning: Tuning,
    /// Calls, failures and latency per operation (`horcrux stats`, `--metrics`).
    ops: Arc<OpMetrics>,
}

/// The operations [`HorcruxFs`] counts, by the names of their callbacks.
pub const OPS: &[&str] = &[
    "mknod",
    "mkdir",
    "symlink",
    "create",
    "lookup",
    "getattr",
    "readlink",
    "open",
    "read",
    "release",
    "flush",
    "fsync",
    "fsyncdir",
    "write",
    "setattr",
    "link",
    "unlink",
    "rmdir",
    "rename",
    "fallocate",
    "setxattr",
    "removexattr",
    "opendir",
    "readdir",
    "readdirplus",
    "releasedir",
    "statfs",
    "getxattr",
    "listxattr",
    "access",
];

/// Counters for the operations of one mount.
pub fn op_metrics() -> Arc<OpMetrics> {
    Arc::new(OpMetrics::new(OPS))
}

impl HorcruxFs {
    pub fn new(volume: Arc<Volume>) -> Self {
        Self {
            volume,
            tuning: Tuning::default(),
            ops: op_metrics(),
        }
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }
}

/// Adds entries to a `readdir` reply.
struct PlainSink<'a>(&'a mut ReplyDirectory);

impl DirSink for PlainSink<'_> {
    fn add(&mut self, name: &[u8], offset: u64, attr: &Attr) -> bool {
        self.0.add(
            INodeNo(attr.ino),
            offset,
            file_type(attr.kind),
            OsStr::from_bytes(name),
        )
    }
}

/// Adds entries with attributes to a `readdirplus` reply.
struct PlusSink<'a>(&'a mut ReplyDirectoryPlus);

impl DirSink for PlusSink<'_> {
    fn add(&mut self, name: &[u8], offset: u64, attr: &Attr) -> bool {
        self.0.add(
            INodeNo(attr.ino),
            offset,
            OsStr::from_bytes(name),
            &TTL,
            &file_attr(attr),
            Generation(attr.generation),
        )
    }
}

/// Answer an xattr request with the size-probe protocol: `size == 0` asks for the length,
/// a non-zero `size` smaller than the value is `ERANGE`.
fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        match u32::try_from(value.len()) {
            Ok(n) => reply.size(n),
            Err(_) => reply.error(Errno::E2BIG),
        }
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

/// An entry reply for "no such name" that the kernel caches for [`TTL`] (a node id of 0 is a
/// negative entry): repeated probes for missing files (`$PATH` searches, `.git` lookups...)
/// then never reach us. Valid because the tree cannot change under the mount.
fn reply_negative(reply: ReplyEntry) {
    let none = Attr {
        ino: 0,
        kind: NodeKind::File,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        size: 0,
        blocks: 0,
        atime: 0,
        mtime: 0,
        ctime: 0,
        rdev: 0,
        blksize: 0,
        generation: 0,
    };
    reply.entry(&TTL, &file_attr(&none), Generation(0));
}

/// The caller's credentials.
fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::At(match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i64,
            // fuser 0.18 (`time::system_time_from_time`) turns the kernel's `(secs < 0, nsecs)`
            // into `EPOCH - (|secs| + nsecs)` instead of `EPOCH - |secs| + nsecs`: undo that,
            // so a pre-1970 time with nanoseconds is stored as it was set.
            Err(e) => {
                let d = e.duration();
                -(d.as_secs() as i64) * 1_000_000_000 + i64::from(d.subsec_nanos())
            }
        }),
    }
}

impl HorcruxFs {
    /// Log the failure of `op` (once, see [`errno`]), count it, and return the errno.
    /// Routine answers (no such name, no such attribute) are not counted as errors.
    fn fail(&self, op: &'static str, ino: u64, e: &VolumeError) -> Errno {
        if !matches!(e, VolumeError::NotFound | VolumeError::NoXattr) {
            self.ops.error(op);
        }
        fail(op, ino, e)
    }

    fn reply_empty(
        &self,
        op: &'static str,
        ino: u64,
        r: Result<(), VolumeError>,
        reply: ReplyEmpty,
    ) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(op, ino, &e)),
        }
    }

    fn reply_entry(
        &self,
        op: &'static str,
        ino: u64,
        r: Result<Attr, VolumeError>,
        reply: ReplyEntry,
    ) {
        match r {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(a.generation)),
            Err(e) => reply.error(self.fail(op, ino, &e)),
        }
    }
}

/// Tells the kernel to drop what it cached of nodes and names a discard changed.
#[derive(Debug)]
struct FuseKernelCache(Notifier);

impl KernelCache for FuseKernelCache {
    fn inval_inode(&self, ino: u64) {
        // ENOENT: the kernel holds nothing of it.
        if let Err(e) = self.0.inval_inode(INodeNo(ino), 0, 0)
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            tracing::debug!(ino, error = %e, "inode invalidation refused");
        }
    }

    fn inval_entry(&self, parent: u64, name: &[u8]) {
        if let Err(e) = self.0.inval_entry(INodeNo(parent), OsStr::from_bytes(name))
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            tracing::debug!(parent, error = %e, "entry invalidation refused");
        }
    }
}

impl Filesystem for HorcruxFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(nearest) = config.set_max_readahead(MAX_READAHEAD) {
            let _ = config.set_max_readahead(nearest);
        }
        let _ = config.set_max_background(self.tuning.max_background.unwrap_or(MAX_BACKGROUND));
        let offered = config.capabilities();
        // Only what is offered, so this cannot fail; missing ones are logged.
        let wanted = match self.tuning.readdirplus.unwrap_or(ReaddirPlus::Auto) {
            ReaddirPlus::Auto => WANTED,
            ReaddirPlus::Always => WANTED - InitFlags::FUSE_READDIRPLUS_AUTO,
            ReaddirPlus::Never => {
                WANTED - InitFlags::FUSE_READDIRPLUS_AUTO - InitFlags::FUSE_DO_READDIRPLUS
            }
        };
        let _ = config.add_capabilities(wanted & offered);
        if let Err(nearest) = config.set_max_write(self.tuning.max_write.unwrap_or(MAX_WRITE)) {
            let _ = config.set_max_write(nearest);
        }
        // Timestamps are kept to the nanosecond.
        let _ = config.set_time_granularity(Duration::from_nanos(1));
        // Passthrough of fully cached files: the backing files sit on a plain filesystem
        // (stack depth 0), so depth 1 suffices and leaves room to stack an overlayfs on us.
        if self.volume.passthrough_active() {
            if offered.contains(InitFlags::FUSE_PASSTHROUGH) {
                let _ = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH);
                let _ = config.set_max_stack_depth(1);
                tracing::info!("FUSE passthrough enabled for fully cached files");
            } else {
                self.volume
                    .passthrough_unavailable("the kernel does not offer it; it needs Linux 6.9");
            }
        }
        tracing::debug!(
            abi = %config.kernel_abi(),
            missing = ?(WANTED - offered),
            "FUSE session initialised"
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _m = self.ops.start("lookup");
        let _s = tracing::debug_span!("lookup", parent = parent.0, ?name).entered();
        match self.volume.lookup(parent.0, name.as_bytes()) {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(a.generation)),
            Err(VolumeError::NotFound) => reply_negative(reply),
            Err(e) => reply.error(self.fail("lookup", parent.0, &e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _m = self.ops.start("getattr");
        let _s = tracing::debug_span!("getattr", ino = ino.0).entered();
        match self.volume.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(self.fail("getattr", ino.0, &e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _m = self.ops.start("readlink");
        let _s = tracing::debug_span!("readlink", ino = ino.0).entered();
        match self.volume.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(self.fail("readlink", ino.0, &e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _m = self.ops.start("open");
        let _s = tracing::debug_span!("open", ino = ino.0, flags = flags.0).entered();
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        let append = flags.0 & libc::O_APPEND != 0;
        // A fully cached file may be served by the kernel from a backing file: the volume
        // decides, and calls this to register the file with the kernel.
        let mut register = |f: &std::fs::File| -> io::Result<BackingToken> {
            Ok(Arc::new(reply.open_backing(f)?))
        };
        // O_DIRECT through a backing file would inherit its filesystem's alignment rules
        // (EINVAL on unaligned buffers or offsets, which FUSE accepts): such an open starts
        // no passthrough. It still joins one already running for the inode, because the
        // kernel allows no other mode then (documented in SEMANTICS.md).
        let direct = flags.0 & libc::O_DIRECT != 0;
        let opened = self.volume.open_with(
            ino.0,
            write,
            append,
            (!direct).then_some(&mut register as _),
        );
        match opened {
            Ok(Opened {
                fh,
                backing: Some(token),
            }) => match token.downcast_ref::<BackingId>() {
                // The kernel refuses (EIO) any flag outside FOPEN_PASSTHROUGH_MASK here, so no
                // FOPEN_KEEP_CACHE: the page cache used is the backing file's anyway.
                Some(id) => {
                    tracing::debug!(?id, "open: passthrough");
                    reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), id)
                }
                None => unreachable!("backing tokens are made by `register` above"),
            },
            // Content changes only through this mount (the kernel sees it) or by a discard
            // (which invalidates): keep the page cache across opens.
            Ok(Opened { fh, backing: None }) => {
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Err(e) => reply.error(self.fail("open", ino.0, &e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _m = self.ops.start("read");
        let _s = tracing::debug_span!("read", ino = ino.0, fh = fh.0, offset, size).entered();
        let t0 = std::time::Instant::now();
        let r = self.volume.read(ino.0, fh.0, offset, size);
        let t_volume = t0.elapsed();
        match r {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(self.fail("read", ino.0, &e)),
        }
        // Where a read's time goes (`RUST_LOG=horcrux::timing=trace`; BENCHMARKS.md, "Cold path").
        tracing::trace!(
            target: "horcrux::timing",
            offset,
            size,
            volume_us = t_volume.as_micros() as u64,
            reply_us = (t0.elapsed() - t_volume).as_micros() as u64,
            "fuse read"
        );
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _m = self.ops.start("release");
        let _s = tracing::debug_span!("release", ino = ino.0, fh = fh.0).entered();
        self.reply_empty("release", ino.0, self.volume.release(fh.0), reply);
    }

    /// Sent on every close(2): the file's pending changes are journaled (not yet synced).
    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _m = self.ops.start("flush");
        let _s = tracing::debug_span!("flush", ino = ino.0).entered();
        self.reply_empty("flush", ino.0, self.volume.flush(ino.0), reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _m = self.ops.start("fsync");
        let _s = tracing::debug_span!("fsync", ino = ino.0, datasync).entered();
        self.reply_empty("fsync", ino.0, self.volume.fsync(ino.0, datasync), reply);
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _m = self.ops.start("fsyncdir");
        let _s = tracing::debug_span!("fsyncdir", ino = ino.0).entered();
        self.reply_empty("fsyncdir", ino.0, self.volume.sync_all(), reply);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _m = self.ops.start("write");
        let _s = tracing::debug_span!("write", ino = ino.0, offset, len = data.len()).entered();
        match self.volume.write(ino.0, fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(self.fail("write", ino.0, &e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _m = self.ops.start("setattr");
        let _s = tracing::debug_span!("setattr", ino = ino.0, ?mode, ?uid, ?gid, ?size).entered();
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
        };
        match self.volume.setattr(ino.0, &set) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(self.fail("setattr", ino.0, &e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _m = self.ops.start("mknod");
        let _s = tracing::debug_span!("mknod", parent = parent.0, ?name, mode).entered();
        let r = if mode & libc::S_IFMT == libc::S_IFREG {
            self.volume
                .create(ctx(req), parent.0, name.as_bytes(), mode, false)
                .and_then(|(a, fh)| self.volume.release(fh).map(|()| a))
        } else {
            self.volume
                .mknod(ctx(req), parent.0, name.as_bytes(), mode, rdev as u64)
        };
        self.reply_entry("mknod", parent.0, r, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let _m = self.ops.start("mkdir");
        let _s = tracing::debug_span!("mkdir", parent = parent.0, ?name, mode).entered();
        let r = self.volume.mkdir(ctx(req), parent.0, name.as_bytes(), mode);
        self.reply_entry("mkdir", parent.0, r, reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _m = self.ops.start("symlink");
        let _s = tracing::debug_span!("symlink", parent = parent.0, ?link_name).entered();
        let r = self.volume.symlink(
            ctx(req),
            parent.0,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
        );
        self.reply_entry("symlink", parent.0, r, reply);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _m = self.ops.start("link");
        let _s =
            tracing::debug_span!("link", ino = ino.0, newparent = newparent.0, ?newname).entered();
        let r = self.volume.link(ino.0, newparent.0, newname.as_bytes());
        self.reply_entry("link", ino.0, r, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _m = self.ops.start("unlink");
        let _s = tracing::debug_span!("unlink", parent = parent.0, ?name).entered();
        self.reply_empty(
            "unlink",
            parent.0,
            self.volume.unlink(parent.0, name.as_bytes()),
            reply,
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _m = self.ops.start("rmdir");
        let _s = tracing::debug_span!("rmdir", parent = parent.0, ?name).entered();
        self.reply_empty(
            "rmdir",
            parent.0,
            self.volume.rmdir(parent.0, name.as_bytes()),
            reply,
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _m = self.ops.start("rename");
        let _s = tracing::debug_span!(
            "rename",
            parent = parent.0,
            ?name,
            newparent = newparent.0,
            ?newname
        )
        .entered();
        self.reply_empty(
            "rename",
            parent.0,
            self.volume.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                flags.bits(),
            ),
            reply,
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _m = self.ops.start("create");
        let _s = tracing::debug_span!("create", parent = parent.0, ?name, mode, flags).entered();
        let append = flags & libc::O_APPEND != 0;
        match self
            .volume
            .create(ctx(req), parent.0, name.as_bytes(), mode, append)
        {
            Ok((a, fh)) => reply.created(
                &TTL,
                &file_attr(&a),
                Generation(a.generation),
                FileHandle(fh),
                FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(self.fail("create", parent.0, &e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _m = self.ops.start("fallocate");
        let _s = tracing::debug_span!("fallocate", ino = ino.0, offset, length, mode).entered();
        self.reply_empty(
            "fallocate",
            ino.0,
            self.volume.fallocate(ino.0, offset, length, mode),
            reply,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _m = self.ops.start("setxattr");
        let _s = tracing::debug_span!("setxattr", ino = ino.0, ?name).entered();
        self.reply_empty(
            "setxattr",
            ino.0,
            self.volume.setxattr(ino.0, name.as_bytes(), value, flags),
            reply,
        );
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _m = self.ops.start("removexattr");
        let _s = tracing::debug_span!("removexattr", ino = ino.0, ?name).entered();
        self.reply_empty(
            "removexattr",
            ino.0,
            self.volume.removexattr(ino.0, name.as_bytes()),
            reply,
        );
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _m = self.ops.start("opendir");
        let _s = tracing::debug_span!("opendir", ino = ino.0).entered();
        // The kernel may keep listings across opens. A version's never change; a writable
        // mount's change only through the kernel, which drops a directory's cached listing
        // whenever it creates, removes or renames in it (`fuse_dir_changed` bumps the
        // directory's i_version), and through checkout/discard, which invalidate the
        // directories they touch (`inval_inode` drops the cached pages).
        let flags = FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE;
        match self.volume.getattr(ino.0) {
            Ok(a) if a.kind == NodeKind::Dir => reply.opened(FileHandle(0), flags),
            Ok(_) => reply.error(self.fail("opendir", ino.0, &VolumeError::NotDir)),
            Err(e) => reply.error(self.fail("opendir", ino.0, &e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _m = self.ops.start("readdir");
        let _s = tracing::debug_span!("readdir", ino = ino.0, offset).entered();
        match self
            .volume
            .readdir(ino.0, offset, &mut PlainSink(&mut reply))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail("readdir", ino.0, &e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _m = self.ops.start("readdirplus");
        let _s = tracing::debug_span!("readdirplus", ino = ino.0, offset).entered();
        match self
            .volume
            .readdir(ino.0, offset, &mut PlusSink(&mut reply))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail("readdirplus", ino.0, &e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _m = self.ops.start("releasedir");
        reply.ok();
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let _m = self.ops.start("statfs");
        let _s = tracing::debug_span!("statfs").entered();
        match self.volume.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(self.fail("statfs", ino.0, &e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _m = self.ops.start("getxattr");
        let _s = tracing::debug_span!("getxattr", ino = ino.0, ?name, size).entered();
        match self.volume.getxattr(ino.0, name.as_bytes()) {
            Ok(v) => reply_xattr(reply, size, &v),
            Err(e) => reply.error(self.fail("getxattr", ino.0, &e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _m = self.ops.start("listxattr");
        let _s = tracing::debug_span!("listxattr", ino = ino.0, size).entered();
        match self.volume.listxattr(ino.0) {
            Ok(names) => {
                // The kernel's format: each name followed by a NUL.
                let mut list = Vec::with_capacity(names.iter().map(|n| n.len() + 1).sum());
                for n in &names {
                    list.extend_from_slice(n);
                    list.push(0);
                }
                reply_xattr(reply, size, &list);
            }
            Err(e) => reply.error(self.fail("listxattr", ino.0, &e)),
        }
    }

    /// Only reached without `default_permissions` (the kernel checks modes itself with it):
    /// the node must exist, and a read-only volume has nothing writable.
    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let _m = self.ops.start("access");
        let _s = tracing::debug_span!("access", ino = ino.0, mask = mask.bits()).entered();
        match self.volume.getattr(ino.0) {
            Ok(_) if mask.contains(AccessFlags::W_OK) && !self.volume.writable() => {
                reply.error(self.fail("access", ino.0, &VolumeError::ReadOnly))
            }
            Ok(_) => reply.ok(),
            Err(e) => reply.error(self.fail("access", ino.0, &e)),
        }
    }
}

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Mount read-only (`ro`): the kernel refuses every write with `EROFS` before asking us.
    pub read_only: bool,
    /// Let users other than the mounter in (`allow_other`).
    pub allow_other: bool,
    /// Mount source shown by `mount`/`df`; [`fsname`] builds the conventional one.
    pub fsname: String,
    /// FUSE worker threads [default: twice the CPUs, at least 4].
    pub threads: Option<usize>,
    /// Session parameter overrides (defaults are right; the bench compares).
    pub tuning: Tuning,
    /// Where to count operations ([`op_metrics`]); `None`: counted where nobody reads them.
    pub ops: Option<Arc<OpMetrics>>,
}

/// The mount source of a volume's mount: `horcrux:<volume>` (how `umount` recognises ours).
pub fn fsname(volume: &str) -> String {
    format!("{}{volume}", mountinfo::FSNAME_PREFIX)
}

/// Worker threads by default: reads block a worker while a fetch runs, so more threads than
/// CPUs keep cold readers from stalling warm ones.
pub fn default_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus * 2).max(4)
}

/// Mount `volume` on `mountpoint`. When this returns the kernel has completed the FUSE
/// handshake: the mount is live, and requests queue until the session runs
/// ([`Session::run`] or [`Session::spawn`]).
///
/// As root the mount is made here with mount(2) (type `fuse.horcrux`) and the session never
/// unmounts by itself: unmount with [`unmount`]; the session ends once the kernel lets go.
/// (fuser's own unmount-on-drop would also fire after an external unmount and could hit a
/// new mount made on the same directory meanwhile.) Other users go through fusermount3,
/// via fuser, and dropping that session unmounts.
pub fn mount(
    volume: Arc<Volume>,
    mountpoint: &Path,
    options: &MountOptions,
) -> io::Result<Session<HorcruxFs>> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(options.fsname.clone()),
        MountOption::Subtype("horcrux".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    if options.read_only {
        config.mount_options.push(MountOption::RO);
    }
    if options.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(options.threads.unwrap_or_else(default_threads).max(1));
    // One /dev/fuse descriptor per worker: no contention on a single fd's queue.
    config.clone_fd = true;
    let fs = HorcruxFs {
        volume: volume.clone(),
        tuning: options.tuning.clone(),
        ops: options.ops.clone().unwrap_or_else(op_metrics),
    };
    // SAFETY: geteuid has no preconditions.
    let session = if unsafe { libc::geteuid() } == 0 {
        mount_as_root(fs, mountpoint, options, config)
    } else {
        Session::new(fs, mountpoint, &config).map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => io::Error::new(
                e.kind(),
                format!(
                    "{e}: mounting as a non-root user needs fusermount3 installed setuid root \
                     (Debian package fuse3) and a mountpoint you own"
                ),
            ),
            _ => e,
        })
    }?;
    volume.set_kernel_cache(Arc::new(FuseKernelCache(session.notifier())));
    Ok(session)
}

fn cstring(b: &[u8]) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(b).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "path or name contains a NUL byte",
        )
    })
}

fn mount_as_root(
    fs: HorcruxFs,
    mountpoint: &Path,
    options: &MountOptions,
    config: Config,
) -> io::Result<Session<HorcruxFs>> {
    use std::os::fd::{AsRawFd, OwnedFd};
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| io::Error::new(e.kind(), format!("opening /dev/fuse: {e}")))?;
    let mut data = format!(
        "fd={},rootmode={:o},user_id=0,group_id=0,default_permissions",
        dev.as_raw_fd(),
        libc::S_IFDIR
    );
    if options.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if options.read_only {
        flags |= libc::MS_RDONLY;
    }
    let source = cstring(options.fsname.as_bytes())?;
    let target = cstring(mountpoint.as_os_str().as_bytes())?;
    let fstype = cstring(b"fuse.horcrux")?;
    let data = cstring(data.as_bytes())?;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("mount(2): {e}")));
    }
    let acl = config.acl;
    // The kernel queued INIT at mount time; from_fd answers it.
    Session::from_fd(fs, OwnedFd::from(dev), acl, config).inspect_err(|_| {
        let _ = unmount(mountpoint, true);
    })
}

/// Raise the kernel readahead of a live mount to `kb` KiB (its bdi's `read_ahead_kb`), so
/// sequential readers get requests of up to `max_pages` instead of the 128 KiB default.
/// Needs root; best effort.
pub fn tune_readahead(mountpoint: &Path, kb: u32) -> io::Result<()> {
    let m = mountinfo::find(mountpoint)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "not mounted"))?;
    std::fs::write(
        format!("/sys/class/bdi/{}:{}/read_ahead_kb", m.major, m.minor),
        kb.to_string(),
    )
}

/// Unmount `mountpoint` (absolute). `lazy` detaches it even while files are open
/// (`MNT_DETACH`, `fusermount3 -uz`). Root uses umount2(2); others go through fusermount3.
pub fn unmount(mountpoint: &Path, lazy: bool) -> io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let c = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let flags = if lazy { libc::MNT_DETACH } else { 0 };
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
            return Err(io::Error::last_os_error());
        }
        return Ok(());
    }
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg(if lazy { "-uz" } else { "-u" })
        .arg("--")
        .arg(mountpoint);
    let out = cmd.output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("running fusermount3 (install fuse3): {e}"),
        )
    })?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        // fusermount3 reports busy mounts in words; keep the errno for callers.
        let kind = if msg.contains("busy") {
            io::ErrorKind::ResourceBusy
        } else {
            io::ErrorKind::Other
        };
        return Err(io::Error::new(kind, msg));
    }
    Ok(())
}

/// Wait until `mountpoint` no longer appears in the mount table, up to `timeout`.
pub fn wait_unmounted(mountpoint: &Path, timeout: Duration) -> io::Result<bool> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match mountinfo::find(mountpoint)? {
            Some(m) if m.is_horcrux() => {}
            _ => return Ok(true),
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_default() {
        assert!(default_threads() >= 4);
    }

    #[test]
    fn fsname_is_recognised() {
        let m = mountinfo::MountEntry {
            major: 0,
            minor: 1,
            mount_point: "/m".into(),
            fstype: "fuse".into(),
            source: fsname("v"),
        };
        assert!(m.is_horcrux());
    }
}

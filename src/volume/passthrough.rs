//! Passthrough opens: a read-only open of a file whose content is entirely in the cache and
//! untouched by the overlay is served by the kernel from an assembled backing file
//! ([`crate::cache::AssembledFile`]) instead of by `read` calls into this volume.
//!
//! The kernel (fs/fuse/iomode.c) puts constraints on how opens of one inode may mix, and
//! breaking them fails the open with `EIO`:
//! - while an inode has passthrough opens, every new open of it must pass through too, to
//!   the **same** registered backing file;
//! - while it has opens served by the daemon (page-cached), no open may pass through.
//!
//! So each inode with open handles is in one mode ([`Mode`]); a new open joins the current
//! mode, and only the first open of an idle inode chooses. Our view lags the kernel's (it
//! drops an open at close, we at `release`), which is the safe direction: when we believe no
//! handle is open, the kernel has none either.
//!
//! Writes never reach a backing file: an open for writing is never passed through, and while
//! an inode is open in passthrough mode an open for writing, or a truncation, is refused with
//! `ETXTBSY` (the kernel would refuse to mix the modes; like writing a running program). The
//! backing file is opened read-only.
//!
//! The registration with the kernel is protocol-specific and done by the adapter through a
//! callback; the volume keeps what it returns (an opaque token whose drop unregisters) for as
//! long as the inode is open in passthrough mode.

use std::any::Any;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

use super::{Volume, VolumeError};
use crate::cache::{AssembledFile, Piece};
use crate::manifest::NodeKind;

/// The adapter's registration of a backing file with the kernel; dropping it unregisters.
pub type BackingToken = Arc<dyn Any + Send + Sync>;

/// Registers an open backing file with the kernel (FUSE: `FUSE_DEV_IOC_BACKING_OPEN`).
pub type Register<'a> = &'a mut dyn FnMut(&File) -> io::Result<BackingToken>;

/// Passthrough settings of a volume.
#[derive(Debug, Clone)]
pub struct PassthroughConfig {
    /// Pass fully cached files through at all (`--no-passthrough` turns it off).
    pub enabled: bool,
    /// Smaller files are always served by the daemon: assembling many small files costs more
    /// than it saves (their reads are few, and answered by the page cache once read).
    pub min_size: u64,
}

impl Default for PassthroughConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            min_size: DEFAULT_MIN_SIZE,
        }
    }
}

/// Default [`PassthroughConfig::min_size`]: one block (1 MiB). Smaller files are packed
/// into shared chunks (FORMAT.md §4) and read in one request.
pub const DEFAULT_MIN_SIZE: u64 = 1 << 20;

/// Files up to this size are assembled during the open that finds them fully cached (a
/// copy of at most 64 MiB, tens of milliseconds); bigger ones in the background, so no open
/// waits seconds for a copy (1 GiB took 0.5-3 s here, mostly `fdatasync`).
pub const SYNC_ASSEMBLY_MAX: u64 = 64 << 20;

/// How the open handles of one inode are served.
pub(super) enum Mode {
    /// By this volume's `read` (page-cached by the kernel).
    Daemon { handles: u32 },
    /// By the kernel from `file`, registered as `token`.
    Passthrough {
        handles: u32,
        _file: Arc<AssembledFile>,
        token: BackingToken,
    },
}

impl std::fmt::Debug for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Daemon { handles } => write!(f, "Daemon({handles})"),
            Mode::Passthrough { handles, _file, .. } => {
                write!(f, "Passthrough({handles}, {})", _file.path().display())
            }
        }
    }
}

/// Counters of passthrough (for the log and tests).
#[derive(Debug, Default)]
pub struct PassthroughStats {
    /// Opens answered with a backing file.
    pub opens: AtomicU64,
    /// Backing files registered with the kernel.
    pub registered: AtomicU64,
    /// Read-only opens of eligible size served by the daemon because the file was not
    /// entirely cached.
    pub not_cached: AtomicU64,
}

/// Per-volume passthrough state.
#[derive(Debug)]
pub(super) struct Passthrough {
    config: PassthroughConfig,
    /// Set when the kernel or the system cannot do it (logged once).
    unavailable: AtomicBool,
    modes: Mutex<HashMap<u64, Mode>>,
    pub(super) stats: PassthroughStats,
}

impl Passthrough {
    pub(super) fn new(config: PassthroughConfig) -> Self {
        Self {
            config,
            unavailable: AtomicBool::new(false),
            modes: Mutex::new(HashMap::new()),
            stats: PassthroughStats::default(),
        }
    }
}

/// A new handle and, when it passes through, the registration to answer the open with.
#[derive(Debug)]
pub struct Opened {
    pub fh: u64,
    pub backing: Option<BackingToken>,
}

impl Volume {
    /// Passthrough settings (before the first open).
    pub fn set_passthrough(&mut self, config: PassthroughConfig) {
        self.passthrough = Passthrough::new(config);
    }

    /// Turn passthrough off for this mount because `why` (logged once); opens go on through
    /// the daemon.
    pub fn passthrough_unavailable(&self, why: &str) {
        if self.passthrough.config.enabled
            && !self.passthrough.unavailable.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                "FUSE passthrough unavailable ({why}): reads of cached files go through the daemon"
            );
        }
    }

    /// Is passthrough on (enabled and not found unavailable)?
    pub fn passthrough_active(&self) -> bool {
        self.passthrough.config.enabled && !self.passthrough.unavailable.load(Ordering::Relaxed)
    }

    pub fn passthrough_stats(&self) -> &PassthroughStats {
        &self.passthrough.stats
    }

    /// Open a file, passing it through when it can (see the module doc): a read-only open
    /// of a fully cached file the overlay does not touch, with `register` given. Without
    /// `register` the open is served by the daemon.
    pub fn open_with(
        &self,
        ino: u64,
        write: bool,
        append: bool,
        register: Option<Register<'_>>,
    ) -> Result<Opened, VolumeError> {
        let n = self.node(ino)?;
        match n.kind {
            NodeKind::Dir => return Err(VolumeError::IsDir),
            NodeKind::File => {}
            _ => return Err(VolumeError::Invalid),
        }
        if write && self.overlay.is_none() {
            return Err(VolumeError::ReadOnly);
        }
        let daemon = |modes: &mut HashMap<u64, Mode>| -> Result<Opened, VolumeError> {
            Self::join_daemon(modes, ino)?;
            Ok(Opened {
                fh: self.new_handle(ino, append),
                backing: None,
            })
        };
        // Join the inode's current mode if it has open handles (a writer cannot join
        // passthrough: `join_daemon` refuses it).
        if !write {
            let mut modes = self.passthrough.modes.lock();
            match modes.get_mut(&ino) {
                Some(Mode::Passthrough { handles, token, .. }) => {
                    *handles += 1;
                    let token = token.clone();
                    drop(modes);
                    return Ok(self.passthrough_handle(ino, append, token));
                }
                Some(Mode::Daemon { handles }) if *handles > 0 => return daemon(&mut modes),
                _ => {}
            }
        }
        let Some(register) = register else {
            return daemon(&mut self.passthrough.modes.lock());
        };
        if write || !self.passthrough_active() || n.size < self.passthrough.config.min_size.max(1) {
            return daemon(&mut self.passthrough.modes.lock());
        }
        // Idle: assemble (or find) the backing file without holding the table; this may copy
        // the whole file once.
        let Some(file) = self.assemble(ino, n.size)? else {
            self.passthrough
                .stats
                .not_cached
                .fetch_add(1, Ordering::Relaxed);
            return daemon(&mut self.passthrough.modes.lock());
        };
        let mut modes = self.passthrough.modes.lock();
        // Decide again under the table: another open may have chosen meanwhile, or a writer
        // opened, wrote and closed the file (it is then the overlay's).
        match modes.get_mut(&ino) {
            Some(Mode::Passthrough { handles, token, .. }) => {
                *handles += 1;
                let token = token.clone();
                drop(modes);
                return Ok(self.passthrough_handle(ino, append, token));
            }
            Some(Mode::Daemon { handles }) if *handles > 0 => return daemon(&mut modes),
            _ => {}
        }
        if !self.content_untouched(ino) {
            return daemon(&mut modes);
        }
        match register(file.file()) {
            Ok(token) => {
                modes.insert(
                    ino,
                    Mode::Passthrough {
                        handles: 1,
                        _file: Arc::new(file),
                        token: token.clone(),
                    },
                );
                drop(modes);
                self.passthrough
                    .stats
                    .registered
                    .fetch_add(1, Ordering::Relaxed);
                Ok(self.passthrough_handle(ino, append, token))
            }
            Err(e) => {
                match e.raw_os_error() {
                    // Not root, kernel without passthrough, or refused by configuration:
                    // nothing will work on this mount.
                    Some(
                        libc::EPERM | libc::ENOTTY | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL,
                    ) => self.passthrough_unavailable(&format!("registering a backing file: {e}")),
                    // Something about this file (e.g. a stacked filesystem): this open only.
                    _ => tracing::warn!(ino, error = %e, file = %file.path().display(),
                        "passthrough refused for this file; served by the daemon"),
                }
                daemon(&mut modes)
            }
        }
    }

    /// Count a new handle of `ino` served by the daemon; `ETXTBSY` while it passes through.
    pub(super) fn join_daemon(modes: &mut HashMap<u64, Mode>, ino: u64) -> Result<(), VolumeError> {
        match modes.entry(ino).or_insert(Mode::Daemon { handles: 0 }) {
            Mode::Daemon { handles } => *handles += 1,
            Mode::Passthrough { .. } => return Err(VolumeError::TextBusy),
        }
        Ok(())
    }

    /// Count a handle of a file just created (served by the daemon).
    pub(super) fn count_daemon_handle(&self, ino: u64) -> Result<(), VolumeError> {
        Self::join_daemon(&mut self.passthrough.modes.lock(), ino)
    }

    fn passthrough_handle(&self, ino: u64, append: bool, token: BackingToken) -> Opened {
        self.passthrough.stats.opens.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(ino, "passthrough open");
        Opened {
            fh: self.new_handle(ino, append),
            backing: Some(token),
        }
    }

    /// Does the overlay leave the content of `ino` as the base has it?
    fn content_untouched(&self, ino: u64) -> bool {
        match &self.overlay {
            None => true,
            Some(ov) => {
                self.is_base(ino)
                    && ov
                        .state
                        .read()
                        .nodes
                        .get(&ino)
                        .is_none_or(|o| o.data.is_none())
            }
        }
    }

    /// The assembled backing file of base file `ino` (`size` bytes), if its content is
    /// entirely cached and the overlay does not touch it.
    fn assemble(&self, ino: u64, size: u64) -> Result<Option<AssembledFile>, VolumeError> {
        if !self.content_untouched(ino) {
            return Ok(None);
        }
        let manifest = self.manifest();
        let extents = manifest.extents(ino, 0..size)?;
        let mut pieces = Vec::with_capacity(extents.len());
        for e in &extents {
            pieces.push(Piece {
                file_off: e.file_off,
                len: e.len,
                chunk: self.chunk_info(e.chunk)?,
                chunk_off: e.chunk_off,
            });
        }
        let block_size = manifest.header().block_size;
        let cache = self.fetcher.cache().clone();
        if size > SYNC_ASSEMBLY_MAX {
            // A big file is copied in the background: this open is served by the daemon at
            // once, and opens after the copy pass through.
            match cache.existing_assembled(size, block_size, &pieces) {
                Ok(Some(f)) => return Ok(Some(f)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(ino, error = %e, "opening an assembled file failed; served by the daemon");
                    return Ok(None);
                }
            }
            if cache.assembly_ready(size, block_size, &pieces) {
                tracing::debug!(ino, size, "assembling in the background for passthrough");
                self.runtime.spawn_blocking(move || {
                    if let Err(e) = cache.assembled_file(size, block_size, &pieces) {
                        tracing::warn!(ino, error = %e, "assembling a cached file for passthrough failed");
                    }
                });
            }
            return Ok(None);
        }
        match cache.assembled_file(size, block_size, &pieces) {
            Ok(f) => Ok(f),
            // The daemon can still serve the file: never fail an open for this.
            Err(e) => {
                tracing::warn!(ino, error = %e, "assembling a cached file for passthrough failed; served by the daemon");
                Ok(None)
            }
        }
    }

    /// Account a closed handle of `ino`; the last passthrough handle drops the registration.
    pub(super) fn passthrough_release(&self, ino: u64) {
        let mut modes = self.passthrough.modes.lock();
        let last = match modes.get_mut(&ino) {
            Some(Mode::Daemon { handles } | Mode::Passthrough { handles, .. }) => {
                *handles = handles.saturating_sub(1);
                *handles == 0
            }
            None => false,
        };
        if last {
            // Dropping the token unregisters the backing file (an ioctl, quick).
            modes.remove(&ino);
        }
    }

    /// Hold off passthrough opens of `ino` while its content changes (a truncation):
    /// refused with `ETXTBSY` while it is open in passthrough mode.
    pub(super) fn content_change_guard(
        &self,
        ino: u64,
    ) -> Result<parking_lot::MutexGuard<'_, HashMap<u64, Mode>>, VolumeError> {
        let modes = self.passthrough.modes.lock();
        if matches!(modes.get(&ino), Some(Mode::Passthrough { .. })) {
            return Err(VolumeError::TextBusy);
        }
        Ok(modes)
    }
}

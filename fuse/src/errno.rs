//! Core errors → kernel errnos, logged once here at the boundary.
//!
//! The errno table itself is [`VolumeError::errno`] in the core; this module only decides how
//! loudly a failure is reported: routine answers (no such name, no such attribute) at trace,
//! refusals at debug, and I/O errors (source unreachable, hash mismatch, damaged manifest),
//! which a user must be able to find in the log, at warn with the core's message.

use fuser::Errno;
use horcrux::volume::VolumeError;

/// The errno to answer for `e`.
pub fn errno(e: &VolumeError) -> Errno {
    Errno::from_i32(e.errno())
}

/// Log the failure of `op` on inode `ino` and return the errno to answer.
pub fn fail(op: &'static str, ino: u64, e: &VolumeError) -> Errno {
    match e {
        VolumeError::NotFound | VolumeError::NoXattr => {
            tracing::trace!(op, ino, error = %e, "answered");
        }
        VolumeError::Overlay(o) if o.is_disk_full() => overlay_full(op, ino, o),
        _ if e.errno() == libc::EIO || matches!(e, VolumeError::Overlay(_)) => {
            tracing::warn!(op, ino, error = %e, "I/O error answered");
        }
        _ => {
            tracing::debug!(op, ino, error = %e, "refused");
        }
    }
    errno(e)
}

/// A full overlay disk: said once per 30 s (a writer retrying would flood the log), with the
/// directory and what to do; every refusal in between at debug.
fn overlay_full(op: &'static str, ino: u64, e: &horcrux::overlay::OverlayError) {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
        *last = Some(Instant::now());
        tracing::warn!(
            op,
            ino,
            error = %e,
            "overlay directory {} is full: writes are refused with ENOSPC (what was acknowledged \
             before is intact); free space on its filesystem, commit and push the changes, or \
             discard some, then retry — no remount needed",
            e.dir()
        );
    } else {
        tracing::debug!(op, ino, error = %e, "refused: overlay disk full");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_follows_the_core_table() {
        assert_eq!(errno(&VolumeError::NotFound), Errno::ENOENT);
        assert_eq!(errno(&VolumeError::ReadOnly), Errno::EROFS);
        assert_eq!(errno(&VolumeError::NoXattr).code(), libc::ENODATA);
        assert_eq!(fail("t", 1, &VolumeError::IsDir), Errno::EISDIR);
    }
}

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
        _ if e.errno() == libc::EIO || matches!(e, VolumeError::Overlay(_)) => {
            tracing::warn!(op, ino, error = %e, "I/O error answered");
        }
        _ => {
            tracing::debug!(op, ino, error = %e, "refused");
        }
    }
    errno(e)
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

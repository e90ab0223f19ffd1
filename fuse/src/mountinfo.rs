//! The kernel's table of mounts (`/proc/self/mountinfo`), to tell whether a path is a mount
//! and whose, without touching the mounted filesystem itself (a dead FUSE mount answers
//! `ENOTCONN` to everything, a live one of ours would be asked to serve our own request).

use std::io;
use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Device numbers of the mount (for a FUSE mount: its connection, also its bdi name).
    pub major: u32,
    pub minor: u32,
    pub mount_point: PathBuf,
    /// `fuse`, `fuse.horcrux`, `ext4`...
    pub fstype: String,
    /// For our mounts `horcrux:<volume>`.
    pub source: String,
}

/// Prefix of the `fsname` (mount source) of every horcrux mount.
pub const FSNAME_PREFIX: &str = "horcrux:";

impl MountEntry {
    /// Is this a mount made by horcrux? (`fuse` when root mounted it with mount(2),
    /// `fuse.horcrux` when fusermount3 did.)
    pub fn is_horcrux(&self) -> bool {
        (self.fstype == "fuse" || self.fstype.starts_with("fuse."))
            && self.source.starts_with(FSNAME_PREFIX)
    }
}

/// Undo the octal escapes (`\040` for a space...) the kernel writes in mountinfo fields.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn parse_line(line: &str) -> Option<MountEntry> {
    use std::os::unix::ffi::OsStringExt;
    let mut fields = line.split(' ');
    let _id = fields.next()?;
    let _parent = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let _root = fields.next()?;
    let mount_point = PathBuf::from(std::ffi::OsString::from_vec(unescape(fields.next()?)));
    // Optional fields end at a lone "-".
    for f in fields.by_ref() {
        if f == "-" {
            break;
        }
    }
    let fstype = String::from_utf8_lossy(&unescape(fields.next()?)).into_owned();
    let source = String::from_utf8_lossy(&unescape(fields.next()?)).into_owned();
    Some(MountEntry {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        mount_point,
        fstype,
        source,
    })
}

/// Parse a whole mountinfo text; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

/// All mounts this process sees.
pub fn mounts() -> io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The mount on `path` (an absolute path), the topmost if several are stacked there.
pub fn find(path: &Path) -> io::Result<Option<MountEntry>> {
    Ok(mounts()?.into_iter().rev().find(|m| m.mount_point == path))
}

/// `path` made absolute without resolving its last component, which may be a dead FUSE mount
/// that cannot be stat'ed. The parent directory is resolved (symlinks, `..`).
pub fn absolute(path: &Path) -> io::Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => Ok(parent.canonicalize()?.join(name)),
        // `/`, or a path ending in `..`: resolve it whole.
        _ => abs.canonicalize(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_with_escapes_and_optional_fields() {
        let text = "\
22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw
80 22 0:55 / /tmp/a\\040b rw,nosuid,nodev,relatime shared:40 master:2 - fuse horcrux:vol rw,user_id=0,group_id=0
81 22 0:56 / /mnt/x rw - fuse.horcrux horcrux:other rw
bad line
";
        let m = parse(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].mount_point, PathBuf::from("/tmp/a b"));
        assert_eq!((m[1].major, m[1].minor), (0, 55));
        assert_eq!(m[1].fstype, "fuse");
        assert_eq!(m[1].source, "horcrux:vol");
        assert!(m[1].is_horcrux());
        assert!(m[2].is_horcrux());
        assert!(!m[0].is_horcrux());
    }

    #[test]
    fn unescape_keeps_plain_backslashes() {
        assert_eq!(unescape("a\\134b"), b"a\\b");
        assert_eq!(unescape("a\\x"), b"a\\x");
        assert_eq!(unescape("end\\04"), b"end\\04");
    }
}

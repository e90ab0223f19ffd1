//! Which horcrux mount a path is on, and how to reach the daemon serving it.
//!
//! A user names a volume by its mountpoint or any path inside it. The kernel's mount table
//! (`/proc/self/mountinfo`, never the mounted filesystem itself) says which mount that path is
//! on; the daemon of a mount listens on `<state>/run/<hash of the mountpoint>.sock`.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use horcrux_fuse::mountinfo::{self, FSNAME_PREFIX, MountEntry};
use horcrux_proto::control::{self, ControlError, Request, Response, WirePath};

/// `<state>/run/<h>.<ext>`, where `h` is the FNV-1a 64-bit hash of the mountpoint's bytes in 16
/// lower-case hex digits: the daemon's files for that mount (`pid`, `sock`, ...). `mountpoint`
/// must be the canonical path the daemon mounted on (as listed in mountinfo).
pub fn runtime_file(mountpoint: &Path, ext: &str) -> PathBuf {
    runtime_file_in(&crate::paths::state_dir(), mountpoint, ext)
}

fn runtime_file_in(state_dir: &Path, mountpoint: &Path, ext: &str) -> PathBuf {
    state_dir.join("run").join(format!(
        "{:016x}.{ext}",
        fnv1a(mountpoint.as_os_str().as_bytes())
    ))
}

/// FNV-1a: a stable, dependency-free name for a path of any length.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// What the user named as the volume to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A mountpoint or any path inside a mount (relative to the current directory); or a
    /// Docker volume name of the plugin's registry, when no such path exists (see [`locate`]).
    Path(PathBuf),
}

impl Target {
    /// The volume at `path`, or the one the current directory is in.
    pub fn from_arg(path: Option<&Path>) -> Self {
        Self::Path(path.map_or_else(|| PathBuf::from("."), Path::to_path_buf))
    }
}

/// A path on a live horcrux mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// Where the volume is mounted (canonical, as in mountinfo).
    pub mountpoint: PathBuf,
    /// The volume's name (from the mount source `horcrux:<name>`).
    pub volume: String,
    /// The path inside the volume; the root when the mountpoint itself was named.
    pub inner: WirePath,
    /// The daemon's control socket ([`runtime_file`] of the mountpoint, `sock`).
    pub socket: PathBuf,
}

impl Located {
    /// The path inside the volume, `None` for the whole volume.
    pub fn inner_or_none(&self) -> Option<WirePath> {
        (!self.inner.is_root()).then(|| self.inner.clone())
    }

    /// For people: `/mnt/amcc` or `/mnt/amcc/db/ibdata1`.
    pub fn display(&self) -> String {
        if self.inner.is_root() {
            self.mountpoint.display().to_string()
        } else {
            format!("{}/{}", self.mountpoint.display(), self.inner)
        }
    }
}

/// Find the mount `target` names, and the path inside it.
pub fn locate(target: &Target) -> anyhow::Result<Located> {
    match target {
        Target::Path(p) => {
            // A bare name that is not a path here: a Docker volume of the plugin, perhaps.
            if let Some(name) = docker_volume_name(p)
                && let Some(mp) = crate::cmd::plugin::volume_mountpoint(name)?
            {
                let table = mountinfo::mounts().context("reading /proc/self/mountinfo")?;
                return locate_in(&mp, &table);
            }
            let abs = resolve_path(p).with_context(|| format!("resolving {}", p.display()))?;
            let table = mountinfo::mounts().context("reading /proc/self/mountinfo")?;
            locate_in(&abs, &table)
        }
    }
}

/// Docker volume `name` of the plugin's registry: its live mount, or one made for this
/// command (see [`crate::cmd::plugin::volume_mountpoint`]).
pub fn locate_volume(name: &str) -> anyhow::Result<Located> {
    let mp = crate::cmd::plugin::volume_mountpoint(name)?
        .ok_or_else(|| anyhow!("no Docker volume `{name}` in the plugin's registry"))?;
    let table = mountinfo::mounts().context("reading /proc/self/mountinfo")?;
    locate_in(&mp, &table)
}

/// `p` as a Docker volume name: one plain component that does not exist as a path.
pub fn docker_volume_name(p: &Path) -> Option<&str> {
    let mut c = p.components();
    let (Some(Component::Normal(n)), None) = (c.next(), c.next()) else {
        return None;
    };
    let n = n.to_str()?;
    let absent =
        matches!(std::fs::symlink_metadata(p), Err(e) if e.kind() == io::ErrorKind::NotFound);
    (absent && horcrux_plugin::driver::check_docker_name(n).is_ok()).then_some(n)
}

/// `path` made absolute with symlinks and `..` resolved as far as it exists; the rest (a path
/// deleted in the volume, or anything below a dead mount) is appended lexically.
pub fn resolve_path(path: &Path) -> io::Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let mut out = PathBuf::from("/");
    let mut real = true;
    for c in abs.components() {
        match c {
            Component::RootDir | Component::Prefix(_) | Component::CurDir => {}
            Component::ParentDir | Component::Normal(_) if real => {
                match out.join(c.as_os_str()).canonicalize() {
                    Ok(p) => out = p,
                    Err(_) => {
                        real = false;
                        lexical_push(&mut out, c);
                    }
                }
            }
            c => lexical_push(&mut out, c),
        }
    }
    Ok(out)
}

fn lexical_push(out: &mut PathBuf, c: Component<'_>) {
    match c {
        Component::ParentDir => {
            out.pop();
        }
        Component::Normal(n) => out.push(n),
        _ => {}
    }
}

/// The horcrux mount `abs` (absolute, resolved) is on, given the mount table.
pub fn locate_in(abs: &Path, table: &[MountEntry]) -> anyhow::Result<Located> {
    // The longest mount point above the path; among mounts stacked on one point, the topmost
    // (the last listed) is the one the path reaches.
    let on = table
        .iter()
        .filter(|m| abs.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len());
    match on {
        Some(m) if m.is_horcrux() => {
            let rest = abs.strip_prefix(&m.mount_point).expect("a prefix");
            Ok(Located {
                mountpoint: m.mount_point.clone(),
                volume: m.source[FSNAME_PREFIX.len()..].to_string(),
                inner: WirePath::from_path(rest),
                socket: runtime_file(&m.mount_point, "sock"),
            })
        }
        on => {
            let here = match on {
                Some(m) => format!(
                    " (it is on the {} mount of {} at {})",
                    m.fstype,
                    m.source,
                    m.mount_point.display()
                ),
                None => String::new(),
            };
            let nearest = nearest_horcrux_mount(abs, table);
            let hint = match nearest {
                Some(n) => format!(
                    "; the nearest horcrux mount is {} (volume {})",
                    n.mount_point.display(),
                    &n.source[FSNAME_PREFIX.len()..]
                ),
                None => "; no horcrux volume is mounted (see `horcrux mount --help`)".into(),
            };
            bail!(
                "{} is not inside a horcrux mount{here}{hint}",
                abs.display()
            )
        }
    }
}

/// The horcrux mount sharing the most leading path components with `abs`, then the most
/// leading bytes (`/mnt/amccx` is nearest to `/mnt/amcc`).
fn nearest_horcrux_mount<'a>(abs: &Path, table: &'a [MountEntry]) -> Option<&'a MountEntry> {
    table.iter().filter(|m| m.is_horcrux()).max_by_key(|m| {
        let components = abs
            .components()
            .zip(m.mount_point.components())
            .take_while(|(a, b)| a == b)
            .count();
        let bytes = abs
            .as_os_str()
            .as_bytes()
            .iter()
            .zip(m.mount_point.as_os_str().as_bytes())
            .take_while(|(a, b)| a == b)
            .count();
        (components, bytes)
    })
}

/// A path relative to the volume root (`db/ibdata1`, `./x/../y`) as a path inside the volume.
pub fn volume_relative(path: &Path) -> anyhow::Result<WirePath> {
    if path.is_absolute() {
        bail!(
            "{} is absolute; expected a path relative to the volume root",
            path.display()
        );
    }
    let mut names: Vec<&[u8]> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => names.push(n.as_bytes()),
            Component::CurDir => {}
            Component::ParentDir => {
                if names.pop().is_none() {
                    bail!("{} leads out of the volume", path.display());
                }
            }
            Component::RootDir | Component::Prefix(_) => unreachable!("relative path"),
        }
    }
    Ok(WirePath::new(names.join(&b'/')))
}

/// Ask the daemon of `loc` one thing. A daemon that is not there, or answers with an error,
/// becomes a message naming the mount and what to do.
/// How the volume at `loc` is mounted (its repository, branch, commit...), from its daemon.
pub fn describe(loc: &Located, timeout: Duration) -> anyhow::Result<control::MountInfo> {
    match request(loc, &Request::Describe, timeout)? {
        Response::Described(i) => Ok(i),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}

pub fn request(loc: &Located, req: &Request, timeout: Duration) -> anyhow::Result<Response> {
    let socket = &loc.socket;
    let mp = loc.mountpoint.display();
    match control::call(socket, req, timeout) {
        Ok(Response::Error { message }) => Err(anyhow!("the daemon of {mp}: {message}")),
        Ok(r) => Ok(r),
        Err(ControlError::NotListening { .. }) => Err(anyhow!(
            "the daemon of {mp} does not answer on {} (it may have crashed: `horcrux umount \
             {mp}` and mount again){}",
            socket.display(),
            other_user_hint(&loc.mountpoint)
        )),
        Err(e) => Err(e.into()),
    }
}

/// When the socket is missing from our state directory: a daemon of root's, perhaps.
fn other_user_hint(mountpoint: &Path) -> String {
    if crate::paths::is_root() {
        return String::new();
    }
    // Root's state directory, as `paths::state_dir` gives it for root.
    let roots = runtime_file_in(Path::new("/var/lib/horcrux"), mountpoint, "sock");
    match std::fs::symlink_metadata(&roots) {
        Ok(_) => format!(
            "; root's daemon has a socket for it at {}: run this command as root",
            roots.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            "; if root mounted it, run this command as root".into()
        }
        Err(_) => "; if another user mounted it, run this command as that user".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    const TABLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /proc rw,nosuid shared:12 - proc proc rw
80 22 0:55 / /mnt/amcc rw,nosuid,nodev shared:40 - fuse horcrux:AMCC rw,user_id=0,group_id=0
81 22 0:56 / /mnt/a\\040b rw - fuse.horcrux horcrux:spaced rw
82 80 0:57 / /mnt/amcc/bind rw - ext4 /dev/sdb1 rw
83 22 0:58 / /mnt/stack rw - ext4 /dev/sdc1 rw
84 83 0:59 / /mnt/stack rw - fuse horcrux:top rw
";

    fn table() -> Vec<MountEntry> {
        mountinfo::parse(TABLE)
    }

    #[test]
    fn runtime_files_match_the_pid_file_hash() {
        // The hash `pidfile_path` of cmd/mount.rs uses (FNV-1a 64 of the path bytes).
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
        let p = runtime_file_in(Path::new("/s"), Path::new("/mnt/amcc"), "sock");
        assert_eq!(
            p,
            PathBuf::from(format!("/s/run/{:016x}.sock", fnv1a(b"/mnt/amcc")))
        );
        assert_ne!(
            runtime_file(Path::new("/a/b"), "pid"),
            runtime_file(Path::new("/a_b"), "pid")
        );
        assert_eq!(
            runtime_file(Path::new("/m"), "pid").with_extension("sock"),
            runtime_file(Path::new("/m"), "sock")
        );
    }

    #[test]
    fn locates_paths_inside_mounts() {
        let t = table();
        let l = locate_in(Path::new("/mnt/amcc"), &t).unwrap();
        assert_eq!(l.mountpoint, PathBuf::from("/mnt/amcc"));
        assert_eq!(l.volume, "AMCC");
        assert!(l.inner.is_root());
        assert_eq!(l.inner_or_none(), None);
        assert_eq!(l.display(), "/mnt/amcc");
        assert_eq!(l.socket, runtime_file(Path::new("/mnt/amcc"), "sock"));

        let l = locate_in(Path::new("/mnt/amcc/db/ibdata1"), &t).unwrap();
        assert_eq!(l.inner, WirePath::from("db/ibdata1"));
        assert_eq!(l.display(), "/mnt/amcc/db/ibdata1");

        let l = locate_in(Path::new("/mnt/a b/x"), &t).unwrap();
        assert_eq!(
            (l.volume.as_str(), l.inner.as_bytes()),
            ("spaced", &b"x"[..])
        );

        // Stacked: the topmost mount wins.
        let l = locate_in(Path::new("/mnt/stack/f"), &t).unwrap();
        assert_eq!(l.volume, "top");

        // Not byte prefixes: whole components.
        let e = locate_in(Path::new("/mnt/amccx"), &t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not inside a horcrux mount"), "{e}");
        assert!(e.contains("ext4 mount of /dev/sda1 at /"), "{e}");
        assert!(
            e.contains("nearest horcrux mount is /mnt/amcc (volume AMCC)"),
            "{e}"
        );

        // A foreign mount inside a horcrux mount is not the volume.
        let e = locate_in(Path::new("/mnt/amcc/bind/x"), &t)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ext4 mount of /dev/sdb1 at /mnt/amcc/bind"),
            "{e}"
        );
        assert!(e.contains("nearest horcrux mount is /mnt/amcc "), "{e}");

        let bytes = PathBuf::from(OsString::from_vec(b"/mnt/amcc/\xff".to_vec()));
        let l = locate_in(&bytes, &t).unwrap();
        assert_eq!(l.inner.as_bytes(), b"\xff");
        assert_eq!(l.inner.to_path_buf().as_os_str().as_bytes(), b"\xff");

        let none = mountinfo::parse("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n");
        let e = locate_in(Path::new("/home"), &none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no horcrux volume is mounted"), "{e}");
    }

    #[test]
    fn resolves_paths_that_do_not_exist() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().canonicalize().unwrap();
        std::fs::create_dir(real.join("a")).unwrap();
        std::os::unix::fs::symlink(real.join("a"), real.join("link")).unwrap();
        assert_eq!(resolve_path(&real.join("link")).unwrap(), real.join("a"));
        assert_eq!(
            resolve_path(&real.join("link/gone/../x")).unwrap(),
            real.join("a/x")
        );
        assert_eq!(
            resolve_path(&real.join("a/./../a/deleted")).unwrap(),
            real.join("a/deleted")
        );
        assert_eq!(resolve_path(Path::new("/")).unwrap(), PathBuf::from("/"));
        let cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
        assert_eq!(resolve_path(Path::new(".")).unwrap(), cwd);
    }

    #[test]
    fn volume_relative_paths() {
        let ok = |s: &str| volume_relative(Path::new(s)).unwrap();
        assert_eq!(ok("db/ibdata1"), WirePath::from("db/ibdata1"));
        assert_eq!(ok("./db//x/../y/"), WirePath::from("db/y"));
        assert_eq!(ok("."), WirePath::root());
        assert_eq!(ok("a/.."), WirePath::root());
        assert!(volume_relative(Path::new("..")).is_err());
        assert!(volume_relative(Path::new("a/../../b")).is_err());
        assert!(volume_relative(Path::new("/abs")).is_err());
    }

    #[test]
    fn a_missing_daemon_says_what_to_do() {
        let mountpoint = PathBuf::from("/nonexistent/horcrux-test-mount");
        let loc = Located {
            socket: runtime_file(&mountpoint, "sock"),
            mountpoint,
            volume: "V".into(),
            inner: WirePath::root(),
        };
        let e = request(&loc, &Request::Ping, Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the daemon of /nonexistent/horcrux-test-mount does not answer"),
            "{e}"
        );
        assert!(
            e.contains("`horcrux umount /nonexistent/horcrux-test-mount` and mount again"),
            "{e}"
        );
    }
}

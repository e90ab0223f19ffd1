//! Default locations.

use std::path::PathBuf;

/// Is the effective user root?
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Base state directory: `/var/lib/horcrux` for root, else `$XDG_CACHE_HOME/horcrux`
/// (or `~/.cache/horcrux`).
pub fn state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/horcrux");
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("horcrux");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache").join("horcrux")
}

/// The cache directory to use given an optional override (flag or `HORCRUX_CACHE_DIR`), else
/// the configuration file's `cache.dir`, else the default.
pub fn cache_dir(explicit: Option<&PathBuf>) -> PathBuf {
    explicit
        .cloned()
        .or_else(|| {
            crate::config::get()
                .cache_dir
                .as_ref()
                .map(|s| s.value.clone())
        })
        .unwrap_or_else(|| state_dir().join("cache"))
}

/// Directory for logs of detached mounts.
pub fn log_dir() -> PathBuf {
    state_dir().join("logs")
}

/// Where local changes live: `/var/lib/horcrux/overlays` for root, else
/// `$XDG_DATA_HOME/horcrux/overlays` (`~/.local/share/...`) — data, never under a cache
/// directory that cleaners may wipe.
pub fn overlays_dir() -> PathBuf {
    if is_root() {
        return state_dir().join("overlays");
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|x| !x.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/tmp"))
                .join(".local/share")
        });
    base.join("horcrux").join("overlays")
}

/// Default overlay of volume `volume` reached through `access`: one per repository and volume.
pub fn overlay_dir(access: &str, volume: &str) -> PathBuf {
    let key = blake3::hash(format!("{access}\n{volume}").as_bytes()).to_hex();
    let safe: String = volume
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    overlays_dir().join(format!("{safe}-{}", &key[..12]))
}

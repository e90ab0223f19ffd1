//! Repository format v1: where objects live in a store and the repository's config file.
//! Documented in `docs/FORMAT.md`; any change here bumps [`FORMAT_VERSION`].

use serde::{Deserialize, Serialize};

use crate::ids::{ChunkId, CommitId, ManifestId, ProfileId};

/// The repository format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Marker file at the root of every repository.
pub const CONFIG_KEY: &str = "horcrux.json";
/// Default chunk size: 64 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 20;
/// Smallest allowed chunk size: 1 MiB.
pub const MIN_CHUNK_SIZE: u64 = 1 << 20;
/// Largest allowed chunk size: 1 GiB.
pub const MAX_CHUNK_SIZE: u64 = 1 << 30;
/// Block size used for verified range fetches inside a chunk.
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;

/// Contents of `horcrux.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RepoConfig {
    /// Always `"horcrux"`; lets us recognise a repository and reject other files.
    pub format: String,
    pub version: u32,
}

impl RepoConfig {
    pub fn current() -> Self {
        Self {
            format: "horcrux".into(),
            version: FORMAT_VERSION,
        }
    }
}

/// Errors about format-level values.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(
        "invalid chunk size `{0}`: use a power of two between 1M and 1G, e.g. 64M (suffixes K, M, G)"
    )]
    BadChunkSize(String),
    #[error(
        "invalid volume name `{0}`: use letters, digits, `.`, `_` and `-` (1-128 characters, not starting with `.`)"
    )]
    BadVolumeName(String),
    #[error("invalid ref name `{0}`")]
    BadRefName(String),
}

/// Parse a size such as `64M`, `1G`, `1048576`, `64MiB`.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Parse and validate a chunk size.
pub fn parse_chunk_size(s: &str) -> Result<u64, FormatError> {
    match parse_size(s) {
        Some(n) if n.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&n) => Ok(n),
        _ => Err(FormatError::BadChunkSize(s.to_string())),
    }
}

/// Validate a volume name (used as a path component in every store).
pub fn check_volume_name(name: &str) -> Result<(), FormatError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(FormatError::BadVolumeName(name.to_string()))
    }
}

/// Validate a branch or tag name (a path component under `refs/heads` or `refs/tags`).
pub fn check_ref_name(name: &str) -> Result<(), FormatError> {
    check_volume_name(name).map_err(|_| FormatError::BadRefName(name.to_string()))
}

/// Store key of a chunk: `chunks/ab/abcdef...`.
pub fn chunk_key(id: &ChunkId) -> String {
    let h = id.to_hex();
    format!("chunks/{}/{}", &h[..2], h)
}

/// Store key of a chunk's piece outboard (FORMAT.md §3a): the CVs of its 16 KiB pieces.
pub fn outboard_key(id: &ChunkId) -> String {
    let h = id.to_hex();
    format!("outboards/{}/{}", &h[..2], h)
}

/// Store key of a manifest (tree catalog).
pub fn manifest_key(id: &ManifestId) -> String {
    format!("manifests/{}", id.to_hex())
}

/// Store key of a commit object.
pub fn commit_key(id: &CommitId) -> String {
    format!("commits/{}", id.to_hex())
}

/// Prefix under which a volume's refs live.
pub fn volume_prefix(volume: &str) -> String {
    format!("volumes/{volume}/")
}

/// Store key of a branch of a volume.
pub fn branch_key(volume: &str, branch: &str) -> String {
    format!("volumes/{volume}/refs/heads/{branch}")
}

/// Store key of a tag of a volume.
pub fn tag_key(volume: &str, tag: &str) -> String {
    format!("volumes/{volume}/refs/tags/{tag}")
}

/// Store key of a remote-tracking ref: where branch `branch` of remote `remote` was at the
/// last `fetch` or `pull`.
pub fn remote_ref_key(volume: &str, remote: &str, branch: &str) -> String {
    format!("volumes/{volume}/refs/remotes/{remote}/{branch}")
}

/// Store key of a start-up read profile (content-addressed, see `profile`).
pub fn profile_key(id: &ProfileId) -> String {
    format!("profiles/{}", id.to_hex())
}

/// Store key of the pointer to the profile recorded for a volume's version (by manifest id):
/// its content is `"<profile id>\n"`.
pub fn profile_ref_key(volume: &str, manifest: &ManifestId) -> String {
    format!("volumes/{volume}/profiles/{}", manifest.to_hex())
}

/// Store key of a registered remote (its access URL, as text).
pub fn remote_key(name: &str) -> String {
    format!("remotes/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_chunk_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_chunk_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_chunk_size("2MiB").unwrap(), 2 << 20);
        for bad in ["", "3M", "512K", "2G", "abc", "64X", "-1"] {
            assert!(parse_chunk_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        check_volume_name("AMCC").unwrap();
        check_volume_name("my-vol_1.2").unwrap();
        for bad in ["", ".", "..", "a/b", ".hidden", "a b"] {
            assert!(check_volume_name(bad).is_err(), "{bad}");
        }
    }
}

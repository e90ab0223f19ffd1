//! Commit objects: what a version of a volume is. Stored as canonical JSON under
//! `commits/<id>`, where the id is the blake3 of exactly those bytes.

use serde::{Deserialize, Serialize};

use crate::format::FORMAT_VERSION;
use crate::ids::{CommitId, ManifestId};

/// One version of a volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Commit {
    pub version: u32,
    /// Volume name the commit belongs to.
    pub volume: String,
    /// Hex id of the tree catalog.
    pub manifest: String,
    /// Hex ids of parent commits (none for the first).
    pub parents: Vec<String>,
    pub author: String,
    /// Seconds since the Unix epoch (UTC).
    pub time: i64,
    pub message: String,
    /// Summary figures, for `log` without opening the manifest.
    pub stats: CommitStats,
}

/// Sizes recorded in a commit.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommitStats {
    pub files: u64,
    pub bytes: u64,
    pub chunks: u64,
}

/// Errors decoding a commit object.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("commit {0}: content does not match its id")]
    Corrupt(CommitId),
    #[error("commit {id}: not a valid commit object: {source}")]
    Malformed {
        id: CommitId,
        source: serde_json::Error,
    },
    #[error(
        "commit {id}: format version {version} is not supported by this horcrux (supports {FORMAT_VERSION})"
    )]
    Version { id: CommitId, version: u32 },
    #[error("commit {id}: bad manifest id")]
    BadManifest { id: CommitId },
}

impl Commit {
    /// Canonical encoding and id.
    pub fn encode(&self) -> (CommitId, Vec<u8>) {
        let bytes = serde_json::to_vec_pretty(self).expect("commit serializes");
        (CommitId::of(&bytes), bytes)
    }

    /// Decode and verify bytes fetched for `id`.
    pub fn decode(id: CommitId, bytes: &[u8]) -> Result<Self, CommitError> {
        if CommitId::of(bytes) != id {
            return Err(CommitError::Corrupt(id));
        }
        let c: Commit = serde_json::from_slice(bytes)
            .map_err(|source| CommitError::Malformed { id, source })?;
        if c.version != FORMAT_VERSION {
            return Err(CommitError::Version {
                id,
                version: c.version,
            });
        }
        c.manifest_id().ok_or(CommitError::BadManifest { id })?;
        Ok(c)
    }

    pub fn manifest_id(&self) -> Option<ManifestId> {
        self.manifest.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let c = Commit {
            version: 1,
            volume: "AMCC".into(),
            manifest: ManifestId::of(b"m").to_hex(),
            parents: vec![],
            author: "a <a@b>".into(),
            time: 1,
            message: "first".into(),
            stats: CommitStats::default(),
        };
        let (id, bytes) = c.encode();
        assert_eq!(Commit::decode(id, &bytes).unwrap(), c);
        let mut bad = bytes.clone();
        bad[3] ^= 1;
        assert!(matches!(
            Commit::decode(id, &bad),
            Err(CommitError::Corrupt(_))
        ));
        assert!(Commit::decode(CommitId::of(b"{}"), b"{}").is_err());
    }
}

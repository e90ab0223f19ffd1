//! Typed content ids. Every object in a repository is named by the blake3 hash of its bytes;
//! the newtypes keep a chunk id from being used where a commit id is expected.

use std::fmt;
use std::str::FromStr;

/// Error parsing a hex id.
#[derive(Debug, thiserror::Error)]
#[error("`{input}` is not a valid id: expected 64 hex digits")]
pub struct ParseIdError {
    input: String,
}

macro_rules! hash_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The id of `bytes` (blake3 of the whole content).
            pub fn of(bytes: &[u8]) -> Self {
                Self(*blake3::hash(bytes).as_bytes())
            }
            /// Lower-case hex, 64 digits.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
            /// The first `n` hex digits, for display.
            pub fn short(&self) -> String {
                let mut s = self.to_hex();
                s.truncate(12);
                s
            }
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
            /// From a 32-byte slice (e.g. a BLOB column); `None` if the length is wrong.
            pub fn from_slice(b: &[u8]) -> Option<Self> {
                <[u8; 32]>::try_from(b).ok().map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s.trim(), &mut out)
                    .map_err(|_| ParseIdError { input: s.to_string() })?;
                Ok(Self(out))
            }
        }
    };
}

hash_id!(
    /// A chunk: the blake3 hash of its bytes (so `b3sum` of a chunk file prints its name).
    ChunkId
);
hash_id!(
    /// A manifest (tree catalog): the blake3 hash of the catalog file.
    ManifestId
);
hash_id!(
    /// A commit object: the blake3 hash of its canonical JSON.
    CommitId
);
hash_id!(
    /// A start-up read profile (record-and-replay prefetch): the blake3 hash of its bytes.
    ProfileId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = ChunkId::of(b"hello");
        assert_eq!(id.to_hex(), blake3::hash(b"hello").to_hex().as_str());
        let back: ChunkId = id.to_hex().parse().unwrap();
        assert_eq!(back, id);
        assert!("xyz".parse::<ChunkId>().is_err());
        assert!(ChunkId::from_slice(&[0u8; 31]).is_none());
    }
}

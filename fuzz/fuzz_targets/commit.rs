//! Commit objects are fetched from repositories by id: the id check passes for any bytes whose
//! blake3 is asked for, so the JSON decoder sees whatever a repository's writer chose. Decode
//! any bytes under their own id; a commit that decodes re-encodes to an object that decodes to
//! the same commit, and the same bytes under another id are refused as corrupt.

#![no_main]

use horcrux::commit::{Commit, CommitError};
use horcrux::ids::CommitId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let id = CommitId::of(data);
    let Ok(c) = Commit::decode(id, data) else {
        return;
    };
    let _ = c.manifest_id().expect("decode checked the manifest id");
    // What `log`, `gc` and `transfer` do with parents: parse them, skipping bad ones.
    let _parents: Vec<CommitId> = c.parents.iter().filter_map(|p| p.parse().ok()).collect();
    let (id2, bytes) = c.encode();
    let back = Commit::decode(id2, &bytes).expect("a re-encoded commit decodes");
    assert_eq!(back, c);
    let other = CommitId::of(b"another object");
    assert!(matches!(
        Commit::decode(other, data),
        Err(CommitError::Corrupt(_))
    ));
});

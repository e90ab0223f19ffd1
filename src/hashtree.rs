//! Block-level verification inside a chunk.
//!
//! A chunk id is the ordinary blake3 hash of the chunk's bytes. BLAKE3 is itself a Merkle tree,
//! so the chaining values (CVs) of aligned power-of-two subtrees can be kept as an "outboard":
//! with `BLOCK` = 1 MiB (or any power of two ≥ 1 KiB), block `i` covers bytes
//! `[i*BLOCK, (i+1)*BLOCK)` and its CV can be recomputed from those bytes alone. The list of block
//! CVs is checked once against the chunk id by merging them up the tree ([`root_of`]); after that
//! every block fetched by range is verified on its own ([`verify_block`]).
//!
//! A chunk of a single block has no non-root CV: its "block hash" is the chunk id itself.

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root,
};

use crate::ids::ChunkId;

/// A 32-byte block hash (a BLAKE3 chaining value, or the root hash for one-block chunks).
pub type BlockHash = [u8; 32];

/// Errors from block verification.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("block {index} of chunk {chunk}: hash mismatch (corrupted or truncated data)")]
    BlockMismatch { chunk: ChunkId, index: u32 },
    #[error("chunk {chunk}: block hash list does not match the chunk id")]
    OutboardMismatch { chunk: ChunkId },
    #[error("chunk {chunk}: block {index} has length {got}, expected {expected}")]
    BadLength {
        chunk: ChunkId,
        index: u32,
        got: usize,
        expected: usize,
    },
    #[error(
        "chunk {chunk}: block size {block_size} or length {len} is not valid (block sizes are powers of two of at least 1 KiB, at most 2^32 blocks per chunk)"
    )]
    BadShape {
        chunk: ChunkId,
        len: u64,
        block_size: u32,
    },
    #[error("chunk {chunk}: there is no block {index} in a chunk of {len} bytes")]
    NoSuchBlock {
        chunk: ChunkId,
        index: u32,
        len: u64,
    },
}

/// Smallest block size: one BLAKE3 chunk (1 KiB), so every block starts on a BLAKE3 chunk
/// boundary and its chaining value can be computed on its own.
pub const MIN_BLOCK_SIZE: u32 = 1024;

/// Whether `block_size` can split a chunk into independently verifiable blocks: a power of
/// two of at least [`MIN_BLOCK_SIZE`] (so blocks are aligned subtrees of the BLAKE3 tree).
/// Block sizes read from manifests, cache rows or peers' hints must pass this before any
/// other function here is given them.
pub fn valid_block_size(block_size: u32) -> bool {
    block_size.is_power_of_two() && block_size >= MIN_BLOCK_SIZE
}

/// Number of blocks of a chunk of `len` bytes (an empty chunk has one empty block), or `None`
/// when the block size is not valid or the count does not fit in a `u32` (hostile lengths).
pub fn checked_block_count(len: u64, block_size: u32) -> Option<u32> {
    if !valid_block_size(block_size) {
        return None;
    }
    u32::try_from(len.div_ceil(u64::from(block_size)).max(1)).ok()
}

/// Number of blocks of a chunk of `len` bytes (an empty chunk has one empty block). For
/// values already checked with [`checked_block_count`]; saturates (never panics) otherwise.
pub fn block_count(len: u64, block_size: u32) -> u32 {
    let n = len.div_ceil(u64::from(block_size.max(1))).max(1);
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Byte range of block `index` in a chunk of `len` bytes.
pub fn block_range(len: u64, block_size: u32, index: u32) -> std::ops::Range<u64> {
    let start = index as u64 * block_size as u64;
    start..(start + block_size as u64).min(len)
}

/// Hash of one block at `offset` in a chunk of `chunk_len` bytes.
fn block_hash_at(data: &[u8], offset: u64, chunk_len: u64) -> BlockHash {
    if chunk_len <= data.len() as u64 && offset == 0 {
        // The block is the whole chunk: its hash is the root.
        return *blake3::hash(data).as_bytes();
    }
    let mut h = blake3::Hasher::new();
    h.set_input_offset(offset);
    h.update(data);
    h.finalize_non_root()
}

/// Chunk id and block hashes of a whole chunk (used by `generate` and commit).
pub fn hash_chunk(data: &[u8], block_size: u32) -> (ChunkId, Vec<BlockHash>) {
    let len = data.len() as u64;
    let blocks: Vec<BlockHash> = data
        .chunks(block_size as usize)
        .enumerate()
        .map(|(i, b)| block_hash_at(b, i as u64 * block_size as u64, len))
        .collect();
    let blocks = if blocks.is_empty() {
        vec![*blake3::hash(&[]).as_bytes()]
    } else {
        blocks
    };
    let id = ChunkId::of(data);
    debug_assert_eq!(root_of(&blocks, len, block_size), Some(id));
    (id, blocks)
}

/// Merge block hashes up the BLAKE3 tree; `None` if the count does not fit the length or the
/// block size is not valid (all three may come from untrusted bytes).
pub fn root_of(blocks: &[BlockHash], len: u64, block_size: u32) -> Option<ChunkId> {
    // With a valid block size and exactly one hash per block, every split below lands inside
    // the slice: BLAKE3's left subtree is a power-of-two number of 1 KiB chunks, hence a whole
    // number of (power-of-two) blocks, and fewer than the total.
    if blocks.len() != checked_block_count(len, block_size)? as usize {
        return None;
    }
    if blocks.len() == 1 {
        return Some(ChunkId(blocks[0]));
    }
    let (l, r) = split(blocks, len, block_size);
    let left = merge(l, block_size);
    let right_len = len - l.len() as u64 * block_size as u64;
    let right = merge_partial(r, right_len, block_size);
    Some(ChunkId(
        *merge_subtrees_root(&left, &right, Mode::Hash).as_bytes(),
    ))
}

/// Split `blocks` (covering `len` bytes, > 1 block) the way BLAKE3 splits its tree.
fn split(blocks: &[BlockHash], len: u64, block_size: u32) -> (&[BlockHash], &[BlockHash]) {
    let left_len = blake3::hazmat::left_subtree_len(len);
    let n = (left_len / block_size as u64) as usize;
    blocks.split_at(n)
}

/// CV of a full power-of-two run of blocks.
fn merge(blocks: &[BlockHash], block_size: u32) -> ChainingValue {
    merge_partial(blocks, blocks.len() as u64 * block_size as u64, block_size)
}

/// CV of a non-root subtree of `len` bytes made of `blocks`.
fn merge_partial(blocks: &[BlockHash], len: u64, block_size: u32) -> ChainingValue {
    if blocks.len() == 1 {
        return blocks[0];
    }
    let (l, r) = split(blocks, len, block_size);
    let left = merge(l, block_size);
    let right = merge_partial(r, len - l.len() as u64 * block_size as u64, block_size);
    merge_subtrees_non_root(&left, &right, Mode::Hash)
}

/// Bytes whose hash was checked. Only the verification functions construct it, so code that
/// takes a `Verified` cannot be handed unchecked data.
#[derive(Debug, Clone)]
pub struct Verified<T>(T);

impl<T> Verified<T> {
    pub fn get(&self) -> &T {
        &self.0
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Verified<T> {
    fn as_ref(&self) -> &[u8] {
        self.0.as_ref()
    }
}

/// Check block `index` of chunk `chunk` (of `len` bytes) against its expected hash.
pub fn verify_block<T: AsRef<[u8]>>(
    chunk: ChunkId,
    len: u64,
    block_size: u32,
    index: u32,
    expected: &BlockHash,
    data: T,
) -> Result<Verified<T>, VerifyError> {
    let Some(n) = checked_block_count(len, block_size) else {
        return Err(VerifyError::BadShape {
            chunk,
            len,
            block_size,
        });
    };
    if index >= n {
        return Err(VerifyError::NoSuchBlock { chunk, index, len });
    }
    let range = block_range(len, block_size, index);
    let want = (range.end - range.start) as usize;
    let got = data.as_ref().len();
    if got != want {
        return Err(VerifyError::BadLength {
            chunk,
            index,
            got,
            expected: want,
        });
    }
    if &block_hash_at(data.as_ref(), range.start, len) != expected {
        return Err(VerifyError::BlockMismatch { chunk, index });
    }
    Ok(Verified(data))
}

/// Check a whole chunk against its id.
pub fn verify_chunk<T: AsRef<[u8]>>(chunk: ChunkId, data: T) -> Result<Verified<T>, VerifyError> {
    if ChunkId::of(data.as_ref()) != chunk {
        return Err(VerifyError::BlockMismatch { chunk, index: 0 });
    }
    Ok(Verified(data))
}

/// Check an outboard (block hash list) against the chunk id.
pub fn verify_outboard(
    chunk: ChunkId,
    len: u64,
    block_size: u32,
    blocks: &[BlockHash],
) -> Result<(), VerifyError> {
    match root_of(blocks, len, block_size) {
        Some(id) if id == chunk => Ok(()),
        _ => Err(VerifyError::OutboardMismatch { chunk }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn outboard_matches_blake3_for_many_lengths() {
        let bs = 4096u32;
        for n in [
            0,
            1,
            4095,
            4096,
            4097,
            8192,
            12288,
            12289,
            5 * 4096 + 7,
            16 * 4096,
            33 * 4096 - 1,
        ] {
            let d = data(n);
            let (id, blocks) = hash_chunk(&d, bs);
            assert_eq!(id, ChunkId::of(&d), "len {n}");
            assert_eq!(root_of(&blocks, n as u64, bs), Some(id), "len {n}");
            for (i, b) in blocks.iter().enumerate() {
                let r = block_range(n as u64, bs, i as u32);
                let slice = &d[r.start as usize..r.end as usize];
                verify_block(id, n as u64, bs, i as u32, b, slice).unwrap();
            }
        }
    }

    /// Regression (found while writing the fuzz target `hashtree`): shapes from untrusted bytes (a peer's hint, a
    /// manifest row) with an invalid block size, too many blocks for 32 bits, or a block index
    /// past the end made BLAKE3's tree code assert or a slice split panic. Now: `None` or an
    /// error.
    #[test]
    fn hostile_shapes_never_panic() {
        let h = [0u8; 32];
        assert_eq!(root_of(&[h; 2], 2, 1), None);
        assert_eq!(root_of(&[h; 5], 5000, 1000), None);
        assert_eq!(root_of(&[], 1 << 42, 1024), None);
        assert_eq!(root_of(&[h; 2], (1 << 32) + 2, 1), None);
        assert_eq!(block_count(u64::MAX, 0), u32::MAX);
        let id = ChunkId::of(b"x");
        assert!(matches!(
            verify_block(id, 3000, 1024, 9, &h, &[][..]),
            Err(VerifyError::NoSuchBlock { .. })
        ));
        assert!(matches!(
            verify_block(id, 3000, 1000, 1, &h, &[0u8; 1000][..]),
            Err(VerifyError::BadShape { .. })
        ));
        assert!(verify_outboard(id, 3, 3, &[h]).is_err());
    }

    #[test]
    fn corrupted_block_is_rejected() {
        let bs = 4096u32;
        let mut d = data(3 * 4096 + 10);
        let (id, blocks) = hash_chunk(&d, bs);
        d[4096 + 5] ^= 1;
        let err = verify_block(id, d.len() as u64, bs, 1, &blocks[1], &d[4096..8192]).unwrap_err();
        assert!(matches!(err, VerifyError::BlockMismatch { index: 1, .. }));
        let mut bad = blocks.clone();
        bad[2][0] ^= 1;
        assert!(verify_outboard(id, d.len() as u64, bs, &bad).is_err());
        assert!(verify_block(id, d.len() as u64, bs, 0, &blocks[0], &d[..100]).is_err());
    }
}

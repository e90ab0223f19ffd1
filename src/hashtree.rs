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
    #[error(
        "chunk {chunk}: the piece hashes of block {index} do not match its block hash \
         (a damaged or foreign piece outboard; the whole block is fetched instead)"
    )]
    PieceHashMismatch { chunk: ChunkId, index: u32 },
    #[error("chunk {chunk}: block hash list does not match the chunk id")]
    OutboardMismatch { chunk: ChunkId },
    #[error(
        "chunk {chunk}: its piece outboard {what} (damaged, truncated or another chunk's; \
         `horcrux verify --repair` rewrites it from the chunk)"
    )]
    BadPieceOutboard { chunk: ChunkId, what: String },
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

// ---------------------------------------------------------------------------------------------
// Pieces: verified reads smaller than a block.
//
// A cold 4 KiB read should not wait for a whole 1 MiB block to arrive and be hashed. A block is
// itself a BLAKE3 subtree, so it splits into aligned **pieces** of `PIECE_SIZE` (16 KiB), each a
// complete subtree too. Given the CVs of *all* pieces of a block, a reader merges them up and
// compares the result with the block hash it already trusts (from the manifest); if they match,
// every piece CV is as trustworthy as the block hash, and any single piece fetched by range can
// be verified alone against its CV. The piece CVs come from an untrusted per-chunk "piece
// outboard" object (`outboards/..`, FORMAT.md §3a): it is never believed before that check.

/// Piece size of piece outboards, format v1 (a power of two ≥ 1 KiB, dividing the block size).
pub const PIECE_SIZE: u32 = 16 << 10;

/// Magic and version at the start of a piece outboard object (FORMAT.md §3a).
pub const OUTBOARD_MAGIC: &[u8; 4] = b"HXPO";
/// Version byte of the piece outboard format.
pub const OUTBOARD_VERSION: u8 = 1;
/// Length of the outboard header: magic, version, log2(piece size), two zero bytes.
pub const OUTBOARD_HEADER: u64 = 8;

/// Number of pieces of a chunk of `len` bytes (an empty chunk has none).
pub fn piece_count(len: u64) -> u64 {
    len.div_ceil(PIECE_SIZE as u64)
}

/// The piece outboard object of a chunk: header, then the CV of every piece in order.
/// `pieces` must be the piece CVs of the chunk ([`hash_pieces`]).
pub fn encode_piece_outboard(pieces: &[BlockHash]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OUTBOARD_HEADER as usize + pieces.len() * 32);
    out.extend_from_slice(OUTBOARD_MAGIC);
    out.push(OUTBOARD_VERSION);
    out.push(PIECE_SIZE.trailing_zeros() as u8);
    out.extend_from_slice(&[0, 0]);
    for p in pieces {
        out.extend_from_slice(p);
    }
    out
}

/// Byte range, in the piece outboard of a chunk of `len` bytes, of the CVs of the pieces of
/// block `index`.
pub fn outboard_range(len: u64, block_size: u32, index: u32) -> std::ops::Range<u64> {
    let r = block_range(len, block_size, index);
    let first = r.start / PIECE_SIZE as u64;
    let end = r.end.div_ceil(PIECE_SIZE as u64);
    OUTBOARD_HEADER + first * 32..OUTBOARD_HEADER + end * 32
}

/// Whether a chunk of `len` bytes has a piece outboard: every chunk of more than one piece
/// does (a repository where one is missing is repaired by `verify --repair`).
pub fn has_piece_outboard(len: u64) -> bool {
    len > PIECE_SIZE as u64
}

/// Exact length of the piece outboard of a chunk of `len` bytes.
pub fn piece_outboard_len(len: u64) -> u64 {
    OUTBOARD_HEADER + 32 * piece_count(len)
}

/// The CV of every piece of a chunk, in order (none for an empty chunk).
fn piece_cvs(data: &[u8]) -> Vec<BlockHash> {
    data.chunks(PIECE_SIZE as usize)
        .enumerate()
        .map(|(i, p)| {
            let mut h = blake3::Hasher::new();
            h.set_input_offset(i as u64 * PIECE_SIZE as u64);
            h.update(p);
            h.finalize_non_root()
        })
        .collect()
}

/// Chunk id, block hashes and, for a chunk of more than one piece, its piece outboard object
/// (`generate` and `commit` write both). One pass over the data when blocks are at least a
/// piece (the usual 1 MiB); two for smaller blocks, whose hashes are not made of pieces.
pub fn hash_chunk_with_outboard(
    data: &[u8],
    block_size: u32,
) -> (ChunkId, Vec<BlockHash>, Option<Vec<u8>>) {
    if !has_piece_outboard(data.len() as u64) {
        let (id, blocks) = hash_chunk(data, block_size);
        return (id, blocks, None);
    }
    if block_size >= PIECE_SIZE {
        let (id, blocks, pieces) = hash_pieces(data, block_size);
        return (id, blocks, Some(encode_piece_outboard(&pieces)));
    }
    let (id, blocks) = hash_chunk(data, block_size);
    (id, blocks, Some(encode_piece_outboard(&piece_cvs(data))))
}

/// Check a whole chunk against its id and, in the same pass, make its piece outboard (`None`
/// for a chunk of at most one piece). For copies: the outboard is derived from bytes just
/// verified, so it is right by construction and costs no extra read.
pub fn verify_chunk_with_outboard<T: AsRef<[u8]>>(
    chunk: ChunkId,
    data: T,
) -> Result<(Verified<T>, Option<Vec<u8>>), VerifyError> {
    let len = data.as_ref().len() as u64;
    if !has_piece_outboard(len) {
        return verify_chunk(chunk, data).map(|v| (v, None));
    }
    let pieces = piece_cvs(data.as_ref());
    if root_of(&pieces, len, PIECE_SIZE) != Some(chunk) {
        return Err(VerifyError::BlockMismatch { chunk, index: 0 });
    }
    Ok((Verified(data), Some(encode_piece_outboard(&pieces))))
}

/// Check a whole piece outboard object (as read from a store: untrusted) for a chunk of `len`
/// bytes: header, exact length, and that its piece CVs merge up to the chunk id — so every CV
/// in it is right, without reading the chunk. (Readers check only the part they use, against
/// a block hash: `verify_piece_hashes`.)
pub fn check_piece_outboard(chunk: ChunkId, len: u64, raw: &[u8]) -> Result<(), VerifyError> {
    let bad = |what: String| Err(VerifyError::BadPieceOutboard { chunk, what });
    if !has_piece_outboard(len) {
        return bad(format!(
            "exists, but a chunk of {len} bytes (one piece) has none"
        ));
    }
    let want = piece_outboard_len(len);
    if raw.len() as u64 != want {
        return bad(format!(
            "is {} bytes long, not {want} (for a chunk of {len} bytes)",
            raw.len()
        ));
    }
    let h = OUTBOARD_HEADER as usize;
    let header = encode_piece_outboard(&[]);
    if raw[..h] != header[..] {
        return bad(format!(
            "has an unknown header {:02x?} (expected {:02x?})",
            &raw[..h],
            &header[..]
        ));
    }
    let pieces: Vec<BlockHash> = raw[h..]
        .chunks_exact(32)
        .map(|c| c.try_into().expect("32 bytes"))
        .collect();
    if root_of(&pieces, len, PIECE_SIZE) != Some(chunk) {
        return bad("holds piece hashes that do not hash up to the chunk id".into());
    }
    Ok(())
}

/// Piece CVs of a whole chunk, the chunk id and the block hashes, in one pass over the data:
/// every byte is hashed once (into its piece's CV) and blocks and root are merged from pieces.
/// Only for chunks longer than one piece; a chunk of one piece has no outboard.
pub fn hash_pieces(data: &[u8], block_size: u32) -> (ChunkId, Vec<BlockHash>, Vec<BlockHash>) {
    let len = data.len() as u64;
    assert!(
        len > PIECE_SIZE as u64,
        "a chunk of one piece has no outboard"
    );
    assert!(block_size >= PIECE_SIZE && block_size.is_power_of_two());
    let pieces = piece_cvs(data);
    let per_block = (block_size / PIECE_SIZE) as usize;
    let nblocks = block_count(len, block_size) as usize;
    let blocks: Vec<BlockHash> = if nblocks == 1 {
        vec![
            root_of(&pieces, len, PIECE_SIZE)
                .expect("one CV per piece")
                .0,
        ]
    } else {
        pieces
            .chunks(per_block)
            .enumerate()
            .map(|(i, ps)| {
                let r = block_range(len, block_size, i as u32);
                merge_partial(ps, r.end - r.start, PIECE_SIZE)
            })
            .collect()
    };
    let id = root_of(&blocks, len, block_size).expect("one hash per block");
    (id, blocks, pieces)
}

/// Piece CVs of one block, checked against the block's trusted hash. Only
/// [`verify_piece_hashes`] makes one.
#[derive(Debug, Clone)]
pub struct PieceHashes {
    chunk: ChunkId,
    chunk_len: u64,
    block_size: u32,
    block: u32,
    cvs: Vec<BlockHash>,
}

impl PieceHashes {
    /// Byte range in the chunk of the pieces covering `range` (which must lie in this block).
    pub fn covering(&self, range: std::ops::Range<u64>) -> std::ops::Range<u64> {
        let b = block_range(self.chunk_len, self.block_size, self.block);
        debug_assert!(b.start <= range.start && range.end <= b.end && range.start < range.end);
        let p = PIECE_SIZE as u64;
        let start = range.start / p * p;
        let end = (range.end.div_ceil(p) * p).min(b.end);
        start..end
    }
}

/// Check the CVs of the pieces of block `index` (as read from an untrusted piece outboard,
/// [`outboard_range`]) against the block's trusted hash `expected`.
pub fn verify_piece_hashes(
    chunk: ChunkId,
    len: u64,
    block_size: u32,
    index: u32,
    expected: &BlockHash,
    raw: &[u8],
) -> Result<PieceHashes, VerifyError> {
    let r = block_range(len, block_size, index);
    let block_len = r.end - r.start;
    let n = block_len.div_ceil(PIECE_SIZE as u64) as usize;
    let bad = || VerifyError::PieceHashMismatch { chunk, index };
    if raw.len() != n * 32 || n < 2 {
        return Err(bad());
    }
    let cvs: Vec<BlockHash> = raw
        .chunks_exact(32)
        .map(|c| c.try_into().expect("32 bytes"))
        .collect();
    let merged = if block_count(len, block_size) == 1 {
        // The block is the whole chunk: its hash is the root.
        root_of(&cvs, len, PIECE_SIZE).map(|id| id.0)
    } else {
        Some(merge_partial(&cvs, block_len, PIECE_SIZE))
    };
    if merged.as_ref() != Some(expected) {
        return Err(bad());
    }
    Ok(PieceHashes {
        chunk,
        chunk_len: len,
        block_size,
        block: index,
        cvs,
    })
}

/// Check consecutive pieces starting at chunk offset `start` (piece-aligned, inside the block
/// of `hashes`) against their verified CVs. `data` must end at a piece boundary or at the end
/// of the block.
pub fn verify_pieces<T: AsRef<[u8]>>(
    hashes: &PieceHashes,
    start: u64,
    data: T,
) -> Result<Verified<T>, VerifyError> {
    let b = block_range(hashes.chunk_len, hashes.block_size, hashes.block);
    let p = PIECE_SIZE as u64;
    let bytes = data.as_ref();
    let end = start + bytes.len() as u64;
    let aligned_end = end % p == 0 || end == b.end;
    if start % p != 0 || start < b.start || end > b.end || bytes.is_empty() || !aligned_end {
        return Err(VerifyError::BadLength {
            chunk: hashes.chunk,
            index: hashes.block,
            got: bytes.len(),
            expected: (b.end - start.min(b.end)) as usize,
        });
    }
    for (i, piece) in bytes.chunks(PIECE_SIZE as usize).enumerate() {
        let off = start + i as u64 * p;
        let k = ((off - b.start) / p) as usize;
        let mut h = blake3::Hasher::new();
        h.set_input_offset(off);
        h.update(piece);
        if h.finalize_non_root() != hashes.cvs[k] {
            return Err(VerifyError::BlockMismatch {
                chunk: hashes.chunk,
                index: hashes.block,
            });
        }
    }
    Ok(Verified(data))
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

    /// Piece CVs of block `b`, as a reader gets them from the outboard object.
    fn outboard_slice(ob: &[u8], len: u64, bs: u32, b: u32) -> Vec<u8> {
        let r = outboard_range(len, bs, b);
        ob[r.start as usize..r.end as usize].to_vec()
    }

    #[test]
    fn pieces_merge_to_the_same_blocks_and_id() {
        let p = PIECE_SIZE as usize;
        for (n, bs) in [
            (p + 1, 1 << 20),
            (3 * p, 1 << 20),
            ((1 << 20) + 5, 1 << 20),
            (5 * (1 << 20) + 3 * p + 17, 1 << 20),
            (9 * 64 * 1024 + 1, 64 * 1024),
            (2 * p, p as u32),
        ] {
            let d = data(n);
            let (id, blocks, pieces) = hash_pieces(&d, bs);
            assert_eq!((id, blocks.clone()), hash_chunk(&d, bs), "len {n} bs {bs}");
            assert_eq!(pieces.len() as u64, piece_count(n as u64));
            let ob = encode_piece_outboard(&pieces);
            for b in 0..block_count(n as u64, bs) {
                let raw = outboard_slice(&ob, n as u64, bs, b);
                let r = block_range(n as u64, bs, b);
                if r.end - r.start <= PIECE_SIZE as u64 {
                    // A block of one piece is fetched whole: no piece hashes for it.
                    assert!(
                        verify_piece_hashes(id, n as u64, bs, b, &blocks[b as usize], &raw)
                            .is_err()
                    );
                    continue;
                }
                let ph = verify_piece_hashes(id, n as u64, bs, b, &blocks[b as usize], &raw)
                    .unwrap_or_else(|e| panic!("len {n} block {b}: {e}"));
                // Every piece of the block, alone and as runs, verifies.
                let mut off = r.start;
                while off < r.end {
                    let e = (off + PIECE_SIZE as u64).min(r.end);
                    verify_pieces(&ph, off, &d[off as usize..e as usize]).unwrap();
                    off = e;
                }
                let cov = ph.covering(r.start + 3..r.start + 5);
                assert_eq!(cov.start, r.start);
                verify_pieces(&ph, cov.start, &d[cov.start as usize..cov.end as usize]).unwrap();
                verify_pieces(&ph, r.start, &d[r.start as usize..r.end as usize]).unwrap();
            }
        }
    }

    /// The outboard made from verified bytes (copies), the one made while hashing (`generate`,
    /// `commit`, any block size) and the whole-object check agree; any damage is refused.
    #[test]
    fn whole_outboards_are_made_once_and_checked_whole() {
        let p = PIECE_SIZE as usize;
        for (n, bs) in [
            (0, 1 << 20),
            (p, 1 << 20),
            (p + 1, 1 << 20),
            (3 * (1 << 20) + 5, 1 << 20),
            (7 * p + 3, 4096),
        ] {
            let d = data(n);
            let (id, blocks, ob) = hash_chunk_with_outboard(&d, bs);
            assert_eq!((id, blocks), hash_chunk(&d, bs), "len {n}");
            let (_, made) = verify_chunk_with_outboard(id, &d[..]).unwrap();
            assert_eq!(made, ob, "len {n}");
            assert_eq!(ob.is_some(), has_piece_outboard(n as u64), "len {n}");
            let Some(ob) = ob else {
                // A chunk of one piece has no outboard: one claiming to be its is refused.
                let other = encode_piece_outboard(&[[0; 32]]);
                assert!(check_piece_outboard(id, n as u64, &other).is_err());
                continue;
            };
            assert_eq!(ob.len() as u64, piece_outboard_len(n as u64));
            check_piece_outboard(id, n as u64, &ob).unwrap();
            for at in [0, 5, 8, ob.len() / 2, ob.len() - 1] {
                let mut bad = ob.clone();
                bad[at] ^= 0x10;
                let e = check_piece_outboard(id, n as u64, &bad).unwrap_err();
                assert!(matches!(e, VerifyError::BadPieceOutboard { .. }), "{e}");
            }
            assert!(check_piece_outboard(id, n as u64, &ob[..ob.len() - 32]).is_err());
            assert!(
                check_piece_outboard(id, n as u64, &[ob.clone(), vec![0; 32]].concat()).is_err()
            );
            // Another chunk of the same length: its outboard is not this one's.
            let mut d2 = d.clone();
            d2[n - 1] ^= 1;
            let (_, ob2) = verify_chunk_with_outboard(ChunkId::of(&d2), &d2[..]).unwrap();
            assert!(check_piece_outboard(id, n as u64, &ob2.unwrap()).is_err());
            // Corrupted chunk bytes never yield an outboard.
            assert!(verify_chunk_with_outboard(id, &d2[..]).is_err());
        }
    }

    #[test]
    fn tampered_piece_hashes_and_pieces_are_rejected() {
        let bs = 1u32 << 20;
        let n = 3 * (1 << 20) + 100;
        let mut d = data(n);
        let (id, blocks, pieces) = hash_pieces(&d, bs);
        let ob = encode_piece_outboard(&pieces);
        let good = outboard_slice(&ob, n as u64, bs, 1);
        let ok = |raw: &[u8]| verify_piece_hashes(id, n as u64, bs, 1, &blocks[1], raw);
        assert!(ok(&good).is_ok());
        // Any flipped bit of any sibling CV breaks the merge up to the block hash.
        for byte in [0, 31, 32 * 7 + 5, good.len() - 1] {
            let mut bad = good.clone();
            bad[byte] ^= 0x40;
            let e = ok(&bad).unwrap_err();
            assert!(
                matches!(e, VerifyError::PieceHashMismatch { index: 1, .. }),
                "{e}"
            );
        }
        // Truncated, extended, swapped, or another block's CVs.
        assert!(ok(&good[..good.len() - 32]).is_err());
        assert!(ok(&[good.clone(), vec![0; 32]].concat()).is_err());
        let mut swapped = good.clone();
        swapped[..64].rotate_left(32);
        assert!(ok(&swapped).is_err());
        assert!(ok(&outboard_slice(&ob, n as u64, bs, 0)).is_err());
        // The right CVs against the wrong block hash.
        assert!(verify_piece_hashes(id, n as u64, bs, 1, &blocks[2], &good).is_err());

        let ph = ok(&good).unwrap();
        let p = PIECE_SIZE as usize;
        let start = (1 << 20) + 5 * p;
        // A corrupted piece, a piece at the wrong offset, a short or misaligned piece.
        d[start + 10] ^= 1;
        let e = verify_pieces(&ph, start as u64, &d[start..start + p]).unwrap_err();
        assert!(
            matches!(e, VerifyError::BlockMismatch { index: 1, .. }),
            "{e}"
        );
        d[start + 10] ^= 1;
        verify_pieces(&ph, start as u64, &d[start..start + p]).unwrap();
        assert!(verify_pieces(&ph, (start + p) as u64, &d[start..start + p]).is_err());
        assert!(verify_pieces(&ph, start as u64, &d[start..start + p - 1]).is_err());
        assert!(verify_pieces(&ph, start as u64 + 1, &d[start + 1..start + p + 1]).is_err());
        // Pieces of another block are outside this block's hashes.
        assert!(verify_pieces(&ph, 0, &d[..p]).is_err());
        // In a one-block chunk the piece CVs merge to the root, which is the chunk id.
        let small = data(5 * p + 3);
        let (sid, sblocks, spieces) = hash_pieces(&small, bs);
        assert_eq!(sblocks, vec![sid.0]);
        let sob = encode_piece_outboard(&spieces);
        let raw = outboard_slice(&sob, small.len() as u64, bs, 0);
        let sph = verify_piece_hashes(sid, small.len() as u64, bs, 0, &sblocks[0], &raw).unwrap();
        verify_pieces(&sph, 5 * p as u64, &small[5 * p..]).unwrap();
        let mut raw2 = raw.clone();
        raw2[40] ^= 1;
        assert!(verify_piece_hashes(sid, small.len() as u64, bs, 0, &sblocks[0], &raw2).is_err());
    }
}

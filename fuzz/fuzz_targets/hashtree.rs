//! Block verification inside a chunk: the shape (length, block size, block hash list) comes
//! from a manifest row or from a peer's chunk hint, so every function of `hashtree` must take
//! any shape without panicking. Two halves:
//! - hostile shapes: arbitrary length, block size, hashes, block index and data;
//! - honest data: any bytes hashed at a valid block size verify block by block, the hash list
//!   merges up to the chunk id, and one flipped bit is caught.

#![no_main]

use horcrux::hashtree::{
    block_count, block_range, check_piece_outboard, checked_block_count, hash_chunk, root_of,
    verify_block, verify_chunk, verify_chunk_with_outboard, verify_outboard,
};
use horcrux::ids::ChunkId;
use libfuzzer_sys::fuzz_target;

fn u64_at(d: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    for (k, x) in b.iter_mut().enumerate() {
        *x = d.get(i + k).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // Hostile shape: len (8 bytes), block size (4), index (4), then hashes and data.
        let len = u64_at(rest, 0);
        // Small block sizes are the interesting ones; keep a path to any u32 too.
        let bs = match mode >> 1 {
            0..=63 => 1u32 << (mode >> 3),
            _ => u64_at(rest, 8) as u32,
        };
        let index = u64_at(rest, 12) as u32;
        let tail = rest.get(16..).unwrap_or(&[]);
        let hashes: Vec<[u8; 32]> = tail
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32"))
            .collect();
        let id = ChunkId(hashes.first().copied().unwrap_or([0; 32]));
        let _ = checked_block_count(len, bs);
        let _ = block_count(len, bs);
        let _ = root_of(&hashes, len, bs);
        let _ = verify_outboard(id, len, bs, &hashes);
        let expected = hashes.last().copied().unwrap_or([0; 32]);
        let _ = verify_block(id, len, bs, index, &expected, tail);
        let _ = verify_chunk(id, tail);
        // A piece outboard object read from a store: any bytes, any claimed chunk length.
        let _ = check_piece_outboard(id, len, tail);
    } else {
        // Honest data at a valid block size (1, 2 or 4 KiB: several blocks from small inputs).
        let bs = 1024u32 << ((mode >> 1) % 3);
        let (id, blocks) = hash_chunk(rest, bs);
        let len = rest.len() as u64;
        assert_eq!(id, ChunkId::of(rest));
        assert_eq!(root_of(&blocks, len, bs), Some(id));
        verify_outboard(id, len, bs, &blocks).expect("honest outboard");
        for (i, h) in blocks.iter().enumerate() {
            let r = block_range(len, bs, i as u32);
            let block = &rest[r.start as usize..r.end as usize];
            verify_block(id, len, bs, i as u32, h, block).expect("honest block");
            if !block.is_empty() {
                let mut bad = block.to_vec();
                bad[block.len() / 2] ^= 1;
                assert!(verify_block(id, len, bs, i as u32, h, &bad[..]).is_err());
            }
        }
        // The piece outboard made while verifying the whole chunk checks out whole.
        let (_, ob) = verify_chunk_with_outboard(id, rest).expect("honest chunk");
        if let Some(ob) = ob {
            check_piece_outboard(id, len, &ob).expect("honest piece outboard");
        }
        if blocks.len() > 1 {
            let mut bad = blocks.clone();
            bad[0][0] ^= 1;
            assert!(verify_outboard(id, len, bs, &bad).is_err());
            assert!(verify_outboard(id, len, bs, &blocks[1..]).is_err());
        }
    }
});

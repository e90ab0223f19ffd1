use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::hashtree::{block_range, hash_chunk, verify_block};
use crate::manifest::ChunkInfo;

const BS: u32 = 4096;

fn chunk(seed: u8, len: usize) -> (ChunkInfo, Vec<u8>) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed))
        .collect();
    let (id, blocks) = hash_chunk(&data, BS);
    (
        ChunkInfo {
            idx: 0,
            id,
            len: len as u64,
            blocks,
        },
        data,
    )
}

fn verified(info: &ChunkInfo, data: &[u8], idx: u32) -> (u32, Verified<Bytes>) {
    let r = block_range(info.len, BS, idx);
    let b = Bytes::copy_from_slice(&data[r.start as usize..r.end as usize]);
    (
        idx,
        verify_block(info.id, info.len, BS, idx, &info.blocks[idx as usize], b).unwrap(),
    )
}

fn open(dir: &std::path::Path, max: Option<u64>) -> Arc<Cache> {
    Cache::open(CacheConfig {
        dir: dir.to_path_buf(),
        max_size: max,
    })
    .unwrap()
}

#[test]
fn blocks_are_served_only_when_present_and_survive_reopen() {
    let d = tempfile::tempdir().unwrap();
    let (info, data) = chunk(3, 3 * 4096 + 100);
    {
        let c = open(d.path(), None);
        assert!(c.read_range(&info, BS, 0..10).is_none());
        c.insert_blocks(
            &info,
            BS,
            &[verified(&info, &data, 1), verified(&info, &data, 3)],
        )
        .unwrap();
        assert_eq!(
            c.read_range(&info, BS, 4096..4200).unwrap(),
            &data[4096..4200]
        );
        // Crossing into a missing block is a miss, never zeros.
        assert!(c.read_range(&info, BS, 4000..4200).is_none());
        assert_eq!(
            c.read_range(&info, BS, 3 * 4096..info.len).unwrap(),
            &data[3 * 4096..]
        );
        let s = c.stats().unwrap();
        assert_eq!(s.chunks, 1);
        assert_eq!(s.bytes, 4096 + 100);
    }
    let c = open(d.path(), None);
    assert_eq!(
        c.read_range(&info, BS, 4096..8192).unwrap(),
        &data[4096..8192]
    );
    assert!(c.read_range(&info, BS, 0..1).is_none());
    assert_eq!(
        std::fs::metadata(d.path()).unwrap().permissions().mode() & 0o777,
        0o700
    );
}

#[test]
fn eviction_keeps_the_bound_lru_order_and_pins() {
    let d = tempfile::tempdir().unwrap();
    let c = open(d.path(), Some(2 * 8192));
    let chunks: Vec<_> = (1..=4u8).map(|s| chunk(s, 8192)).collect();
    // Pin chunk 0: it must survive although it is the least recently used.
    c.pin(&chunks[0].0.id);
    for (info, data) in &chunks {
        c.insert_blocks(
            info,
            BS,
            &[verified(info, data, 0), verified(info, data, 1)],
        )
        .unwrap();
    }
    let s = c.stats().unwrap();
    assert!(
        s.bytes <= 2 * 8192 + 8192,
        "bound exceeded beyond the pinned chunk: {}",
        s.bytes
    );
    assert!(
        c.read_range(&chunks[0].0, BS, 0..8192).is_some(),
        "pinned chunk evicted"
    );
    assert!(
        c.read_range(&chunks[3].0, BS, 0..8192).is_some(),
        "newest chunk evicted"
    );
    c.unpin(&chunks[0].0.id);
    let r = c.prune(Some(0), None).unwrap();
    assert!(r.chunks >= 2);
    assert_eq!(c.stats().unwrap().bytes, 0);
    assert!(c.read_range(&chunks[3].0, BS, 0..8192).is_none());
    // Files are gone too.
    let left: Vec<_> = walk_files(&d.path().join("chunks"));
    assert!(left.is_empty(), "{left:?}");
}

fn walk_files(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk_files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn verify_drops_corrupted_blocks_and_missing_files() {
    let d = tempfile::tempdir().unwrap();
    let c = open(d.path(), None);
    let (a, da) = chunk(5, 3 * 4096);
    let (b, db) = chunk(7, 4096);
    c.insert_blocks(
        &a,
        BS,
        &[
            verified(&a, &da, 0),
            verified(&a, &da, 1),
            verified(&a, &da, 2),
        ],
    )
    .unwrap();
    c.insert_blocks(&b, BS, &[verified(&b, &db, 0)]).unwrap();
    let list = c.list().unwrap();
    let pa = list.iter().find(|s| s.id == a.id).unwrap().path.clone();
    let pb = list.iter().find(|s| s.id == b.id).unwrap().path.clone();
    // Flip one byte in block 1 of `a`; delete `b`'s file.
    let f = std::fs::OpenOptions::new().write(true).open(&pa).unwrap();
    f.write_all_at(&[!da[5000]], 5000).unwrap();
    std::fs::remove_file(&pb).unwrap();
    drop(c);
    let c = open(d.path(), None);
    let r = c.verify(&|_, _| {}).unwrap();
    assert_eq!(r.bad_blocks, 1);
    assert_eq!(r.missing_files, 1);
    assert!(
        c.read_range(&a, BS, 4096..8192).is_none(),
        "corrupted block still served"
    );
    assert_eq!(c.read_range(&a, BS, 0..4096).unwrap(), &da[..4096]);
    let again = c.verify(&|_, _| {}).unwrap();
    assert_eq!((again.bad_blocks, again.missing_files), (0, 0));
}

#[test]
fn a_reinserted_chunk_gets_a_new_file_and_old_readers_stay_correct() {
    let d = tempfile::tempdir().unwrap();
    let a = open(d.path(), None);
    let b = open(d.path(), None);
    let (info, data) = chunk(9, 2 * 4096);
    a.insert_blocks(&info, BS, &[verified(&info, &data, 0)])
        .unwrap();
    assert!(a.read_range(&info, BS, 0..4096).is_some());
    // Another process evicts the chunk and caches only block 1 anew.
    b.prune(Some(0), None).unwrap();
    b.insert_blocks(&info, BS, &[verified(&info, &data, 1)])
        .unwrap();
    // `a` still holds the old (unlinked) file: its block 0 is still the right bytes.
    assert_eq!(a.read_range(&info, BS, 0..4096).unwrap(), &data[..4096]);
    // A fresh view sees only block 1.
    let c = open(d.path(), None);
    assert!(c.read_range(&info, BS, 0..4096).is_none());
    assert_eq!(c.read_range(&info, BS, 4096..8192).unwrap(), &data[4096..]);
}

#[test]
fn newer_schema_is_refused() {
    let d = tempfile::tempdir().unwrap();
    drop(open(d.path(), None));
    let conn = rusqlite::Connection::open(d.path().join("index.sqlite")).unwrap();
    conn.execute("UPDATE schema_version SET version = 99", [])
        .unwrap();
    drop(conn);
    let err = Cache::open(CacheConfig {
        dir: d.path().to_path_buf(),
        max_size: None,
    })
    .unwrap_err();
    assert!(err.to_string().contains("schema version 99"), "{err}");
}

#[test]
fn verify_removes_orphan_files_left_by_a_crash() {
    let d = tempfile::tempdir().unwrap();
    let c = open(d.path(), None);
    let (info, data) = chunk(4, 4096);
    c.insert_blocks(&info, BS, &[verified(&info, &data, 0)])
        .unwrap();
    // A crash between writing a chunk file and its row leaves a file no row names.
    let orphan = d
        .path()
        .join("chunks")
        .join(&info.id.to_hex()[..2])
        .join(format!("{}.7", info.id));
    std::fs::write(&orphan, b"partial").unwrap();
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&orphan)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let r = c.verify(&|_, _| {}).unwrap();
    assert_eq!(r.orphan_files, 1);
    assert!(!orphan.exists());
    assert_eq!(c.read_range(&info, BS, 0..4096).unwrap(), &data[..]);
}

/// A file of two extents (the second chunk only partly) with a hole between them.
fn layout(a: &ChunkInfo, b: &ChunkInfo) -> Vec<Piece> {
    vec![
        Piece {
            file_off: 0,
            len: a.len,
            chunk: Arc::new(a.clone()),
            chunk_off: 0,
        },
        Piece {
            file_off: a.len + 5000,
            len: 4096 + 10,
            chunk: Arc::new(b.clone()),
            chunk_off: 4096,
        },
    ]
}

#[test]
fn assembled_files_hold_exactly_the_file_once_fully_cached() {
    let d = tempfile::tempdir().unwrap();
    let c = open(d.path(), None);
    let (a, da) = chunk(5, 2 * 4096 + 300);
    let (b, db) = chunk(7, 3 * 4096 + 17);
    let pieces = layout(&a, &b);
    let size = a.len + 5000 + 4096 + 10 + 123;
    // Nothing cached, then part of it: no assembled file.
    assert!(c.assembled_file(size, BS, &pieces).unwrap().is_none());
    let all_a: Vec<_> = (0..3).map(|i| verified(&a, &da, i)).collect();
    c.insert_blocks(&a, BS, &all_a).unwrap();
    c.insert_blocks(&b, BS, &[verified(&b, &db, 1)]).unwrap();
    assert!(c.assembled_file(size, BS, &pieces).unwrap().is_none());
    // Block 2 of `b` holds the piece's last 10 bytes.
    c.insert_blocks(&b, BS, &[verified(&b, &db, 2)]).unwrap();
    let f = c.assembled_file(size, BS, &pieces).unwrap().unwrap();
    let mut want = vec![0u8; size as usize];
    want[..da.len()].copy_from_slice(&da);
    let off = a.len as usize + 5000;
    want[off..off + 4106].copy_from_slice(&db[4096..4096 + 4106]);
    assert_eq!(std::fs::read(f.path()).unwrap(), want);
    assert_eq!(f.len(), size);
    // The same layout finds the same file; another layout (another version) another one.
    let again = c.assembled_file(size, BS, &pieces).unwrap().unwrap();
    assert_eq!(again.path(), f.path());
    let mut other = pieces.clone();
    other[1].file_off += 1;
    let g = c.assembled_file(size, BS, &other).unwrap().unwrap();
    assert_ne!(g.path(), f.path());
    assert_eq!(c.assembled_usage().0, 2);
    assert_eq!(c.assembled_counters().assembled.load(Ordering::Relaxed), 2);
    // Open (pinned) files are not evicted; closed ones go first.
    drop(g);
    assert!(c.remove_assembled() == 1);
    assert!(f.path().exists());
    drop((f, again));
    assert_eq!(c.remove_assembled(), 1);
    assert_eq!(c.assembled_usage(), (0, 0));
}

/// Ways the index file gets lost or damaged.
#[derive(Debug, Clone, Copy)]
enum Damage {
    Delete,
    Garbage,
    TruncateHalf,
    TruncateEmpty,
}

fn damage(dir: &std::path::Path, how: Damage) {
    let p = dir.join("index.sqlite");
    let len = std::fs::metadata(&p).unwrap().len();
    match how {
        Damage::Delete => std::fs::remove_file(&p).unwrap(),
        Damage::Garbage => {
            let g: Vec<u8> = (0..len).map(|i| (i * 131 % 251) as u8).collect();
            std::fs::write(&p, g).unwrap();
        }
        Damage::TruncateHalf => std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len / 2)
            .unwrap(),
        Damage::TruncateEmpty => std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(0)
            .unwrap(),
    }
}

/// A catalog describing `chunks` (block size [`BS`]), stored in the cache as a manifest.
fn cache_manifest(c: &Cache, chunks: &[&ChunkInfo]) -> ManifestId {
    let tmp = c.dir().join("manifests").join("building");
    let mut w = crate::manifest::ManifestWriter::create(
        &tmp,
        &crate::manifest::CatalogHeader {
            volume: "v".into(),
            chunk_size: 1 << 20,
            block_size: BS,
        },
    )
    .unwrap();
    for (i, ch) in chunks.iter().enumerate() {
        let mut ch = (*ch).clone();
        ch.idx = i as u64;
        w.add_chunk(&ch).unwrap();
    }
    let id = w.finish().unwrap();
    std::fs::rename(&tmp, c.manifest_path(&id)).unwrap();
    c.add_manifest(&id).unwrap();
    id
}

#[test]
fn a_lost_or_damaged_index_is_rebuilt_from_verified_files() {
    for how in [
        Damage::Delete,
        Damage::Garbage,
        Damage::TruncateHalf,
        Damage::TruncateEmpty,
    ] {
        let d = tempfile::tempdir().unwrap();
        let c = open(d.path(), None);
        // `a`: blocks 0 and 2 of 4 cached, described by a cached manifest.
        let (a, da) = chunk(11, 4 * 4096);
        // `b`: complete, block 1 then corrupted on disk.
        let (b, db) = chunk(13, 3 * 4096 + 5);
        // `whole`: complete, no manifest describes it (kept: it hashes to its id).
        let (whole, dw) = chunk(17, 2 * 4096);
        // `partial`: one block of two, no manifest: nothing to verify it against.
        let (partial, dp) = chunk(19, 2 * 4096);
        // Many more rows, so the index has pages to tear.
        let filler: Vec<_> = (30..90u8).map(|s| chunk(s, 4096)).collect();
        c.insert_blocks(&a, BS, &[verified(&a, &da, 0), verified(&a, &da, 2)])
            .unwrap();
        let all_b: Vec<_> = (0..4).map(|i| verified(&b, &db, i)).collect();
        c.insert_blocks(&b, BS, &all_b).unwrap();
        c.insert_blocks(
            &whole,
            BS,
            &[verified(&whole, &dw, 0), verified(&whole, &dw, 1)],
        )
        .unwrap();
        c.insert_blocks(&partial, BS, &[verified(&partial, &dp, 1)])
            .unwrap();
        for (f, fd) in &filler {
            c.insert_blocks(f, BS, &[verified(f, fd, 0)]).unwrap();
        }
        let fillers: Vec<&ChunkInfo> = filler.iter().map(|(f, _)| f).collect();
        let mut described = vec![&a, &b];
        described.extend(fillers);
        let m = cache_manifest(&c, &described);
        let pb = c.find(&b.id.to_hex()).unwrap().path;
        let pp = c.find(&partial.id.to_hex()).unwrap().path;
        std::fs::File::options()
            .write(true)
            .open(&pb)
            .unwrap()
            .write_all_at(&[!db[4100]], 4100)
            .unwrap();
        drop(c);
        damage(d.path(), how);

        let c = open(d.path(), None);
        // What verified is served, exactly; the corrupted block and the unverifiable file not.
        assert_eq!(
            c.read_range(&a, BS, 0..4096).unwrap(),
            &da[..4096],
            "{how:?}"
        );
        assert_eq!(
            c.read_range(&a, BS, 8192..12288).unwrap(),
            &da[8192..12288],
            "{how:?}"
        );
        assert!(c.read_range(&a, BS, 4096..8192).is_none(), "{how:?}");
        assert!(
            c.read_range(&b, BS, 4096..8192).is_none(),
            "{how:?}: bad block served"
        );
        assert_eq!(
            c.read_range(&b, BS, 8192..12293).unwrap(),
            &db[8192..],
            "{how:?}"
        );
        assert!(!pp.exists(), "{how:?}: unverifiable partial chunk kept");
        assert!(c.find(&partial.id.to_hex()).is_err(), "{how:?}");
        // A complete chunk nobody describes is kept at the default block size.
        let wi = ChunkInfo {
            blocks: hash_chunk(&dw, crate::format::DEFAULT_BLOCK_SIZE).1,
            ..whole.clone()
        };
        assert_eq!(
            c.read_range(&wi, crate::format::DEFAULT_BLOCK_SIZE, 0..8192)
                .unwrap(),
            &dw[..],
            "{how:?}"
        );
        for (f, fd) in &filler {
            assert_eq!(c.read_range(f, BS, 0..4096).unwrap(), &fd[..], "{how:?}");
        }
        assert!(c.has_manifest(&m), "{how:?}");
        let s = c.stats().unwrap();
        assert_eq!(s.chunks, 3 + filler.len() as u64, "{how:?}");
        assert_eq!(s.manifests, 1, "{how:?}");
        // The rebuilt index is consistent: verify finds nothing more to drop.
        let r = c.verify(&|_, _| {}).unwrap();
        assert_eq!((r.bad_blocks, r.missing_files), (0, 0), "{how:?}: {r:?}");
        // And it is used from now on: reopening does not rebuild again.
        drop(c);
        let aside = |d: &std::path::Path| {
            std::fs::read_dir(d)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().contains("damaged"))
                .count()
        };
        let before = aside(d.path());
        let c = open(d.path(), None);
        assert_eq!(c.stats().unwrap().chunks, 3 + filler.len() as u64);
        assert_eq!(aside(d.path()), before, "{how:?}: rebuilt twice");
    }
}

#[test]
fn an_empty_cache_without_index_is_simply_created() {
    let d = tempfile::tempdir().unwrap();
    drop(open(d.path(), None));
    std::fs::remove_file(d.path().join("index.sqlite")).unwrap();
    let c = open(d.path(), None);
    assert_eq!(c.stats().unwrap().chunks, 0);
}

#[test]
fn full_disk_errors_are_recognised() {
    let io = |code| CacheError::Io {
        dir: "/c".into(),
        source: std::io::Error::from_raw_os_error(code),
    };
    assert!(io(libc::ENOSPC).is_disk_full());
    assert!(io(libc::EDQUOT).is_disk_full());
    assert!(!io(libc::EIO).is_disk_full());
    let full = CacheError::Sqlite {
        dir: "/c".into(),
        source: rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        ),
    };
    assert!(full.is_disk_full());
    assert!(!CacheError::NoMatch("x".into()).is_disk_full());
}

#[test]
fn direct_writes_land_the_same_bytes_aligned_or_not_and_the_short_tail_goes_buffered() {
    const BIG: u32 = 1 << 20;
    let d = tempfile::tempdir().unwrap();
    let c = open(d.path(), None);
    let data: Vec<u8> = (0..2 * BIG as usize + 5000)
        .map(|i| (i % 253) as u8)
        .collect();
    let (id, blocks) = hash_chunk(&data, BIG);
    let info = ChunkInfo {
        idx: 0,
        id,
        len: data.len() as u64,
        blocks,
    };
    // Block 0 from an aligned buffer, block 1 from one that is not (bounced), block 2 is
    // the 5000-byte tail (not a multiple of 4096: always through the page cache).
    let aligned = {
        let mut v = vec![0u8; 2 * BIG as usize];
        let off = v.as_ptr().align_offset(4096);
        v[off..off + BIG as usize].copy_from_slice(&data[..BIG as usize]);
        Bytes::from(v).slice(off..off + BIG as usize)
    };
    assert_eq!(aligned.as_ptr() as usize % 4096, 0);
    let unaligned = {
        let mut v = vec![0u8; BIG as usize + 1];
        v[1..].copy_from_slice(&data[BIG as usize..2 * BIG as usize]);
        Bytes::from(v).slice(1..)
    };
    let v = |idx: u32, b: Bytes| {
        (
            idx,
            verify_block(info.id, info.len, BIG, idx, &info.blocks[idx as usize], b).unwrap(),
        )
    };
    let tail = Bytes::copy_from_slice(&data[2 * BIG as usize..]);
    c.insert_blocks(&info, BIG, &[v(0, aligned), v(1, unaligned), v(2, tail)])
        .unwrap();
    // The tempdir is on the machine's disk (ext4 here and in CI), which takes O_DIRECT: both
    // whole blocks went direct, the tail did not.
    assert_eq!(c.direct_write_bytes(), 2 * BIG as u64);
    assert_eq!(c.read_range(&info, BIG, 0..info.len).unwrap(), &data[..]);
    drop(c);
    // And they are on disk, not only in some cache: a fresh open verifies every block.
    let c = open(d.path(), None);
    let report = c.verify(&|_, _| {}).unwrap();
    assert_eq!((report.blocks, report.bad_blocks), (3, 0));
    assert_eq!(c.read_range(&info, BIG, 0..info.len).unwrap(), &data[..]);
}

//! The core `Volume` against generated repositories, without a kernel: metadata exactly the
//! source's, content byte for byte at every boundary, concurrency, eviction, corruption.

#[path = "support/tree.rs"]
mod tree;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use horcrux::manifest::NodeKind;
use horcrux::volume::{Attr, DirSink, Volume};
use tree::{Fixture, MIB, rich_tree};

struct Collect(Vec<(Vec<u8>, u64, Attr)>);

impl DirSink for Collect {
    fn add(&mut self, name: &[u8], offset: u64, attr: &Attr) -> bool {
        self.0.push((name.to_vec(), offset, attr.clone()));
        false
    }
}

fn list(v: &Volume, ino: u64) -> Vec<(Vec<u8>, u64, Attr)> {
    let mut c = Collect(Vec::new());
    v.readdir(ino, 0, &mut c).unwrap();
    c.0
}

fn read_all(v: &Volume, ino: u64, size: u64) -> Vec<u8> {
    let fh = v.open(ino, false, false).unwrap();
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let b = v.read(ino, fh, out.len() as u64, 128 << 10).unwrap();
        assert!(!b.is_empty(), "short read at {}", out.len());
        out.extend_from_slice(&b);
    }
    assert!(
        v.read(ino, fh, size, 4096).unwrap().is_empty(),
        "read past EOF returned data"
    );
    v.release(fh).unwrap();
    out
}

fn kind_of(m: &fs::Metadata) -> NodeKind {
    NodeKind::from_mode(m.mode()).unwrap()
}

/// Walk the source and the volume together, comparing everything.
fn compare(v: &Volume, src: &Path, ino: u64, inos: &mut HashMap<u64, u64>) -> usize {
    let mut n = 0;
    let entries = list(v, ino);
    assert_eq!(&entries[0].0, b".");
    assert_eq!(&entries[1].0, b"..");
    let mut names: Vec<Vec<u8>> = fs::read_dir(src)
        .unwrap()
        .map(|e| {
            use std::os::unix::ffi::OsStrExt;
            e.unwrap().file_name().as_bytes().to_vec()
        })
        .collect();
    names.sort();
    let got: Vec<Vec<u8>> = entries[2..].iter().map(|e| e.0.clone()).collect();
    assert_eq!(got, names, "listing of {}", src.display());
    for (name, _, attr) in &entries[2..] {
        use std::os::unix::ffi::OsStrExt;
        let path = src.join(std::ffi::OsStr::from_bytes(name));
        let m = fs::symlink_metadata(&path).unwrap();
        let looked = v.lookup(ino, name).unwrap();
        assert_eq!(&looked, attr, "{}", path.display());
        assert_eq!(attr.kind, kind_of(&m), "{}", path.display());
        assert_eq!(attr.perm, m.mode() & 0o7777, "{}", path.display());
        assert_eq!((attr.uid, attr.gid), (m.uid(), m.gid()));
        assert_eq!(
            attr.mtime,
            m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            "{}",
            path.display()
        );
        assert_eq!(
            attr.ctime,
            m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            "{}",
            path.display()
        );
        if attr.kind != NodeKind::Dir {
            assert_eq!(attr.nlink as u64, m.nlink(), "{}", path.display());
        }
        // Hard links share one inode in the volume iff they do in the source.
        let prev = inos.insert(m.ino(), attr.ino);
        if let Some(p) = prev {
            assert_eq!(
                p,
                attr.ino,
                "hard link {} has another inode",
                path.display()
            );
        }
        let names: Vec<Vec<u8>> = xattr::list(&path)
            .unwrap()
            .map(|n| n.as_bytes().to_vec())
            .collect();
        let mut vnames = v.listxattr(attr.ino).unwrap();
        vnames.sort();
        let mut snames = names.clone();
        snames.sort();
        assert_eq!(vnames, snames, "xattrs of {}", path.display());
        for xn in &names {
            let want = xattr::get(&path, std::ffi::OsStr::from_bytes(xn))
                .unwrap()
                .unwrap();
            assert_eq!(v.getxattr(attr.ino, xn).unwrap(), want);
        }
        match attr.kind {
            NodeKind::File => {
                assert_eq!(attr.size, m.size(), "{}", path.display());
                assert_eq!(
                    read_all(v, attr.ino, attr.size),
                    fs::read(&path).unwrap(),
                    "{}",
                    path.display()
                );
            }
            NodeKind::Symlink => {
                assert_eq!(
                    v.readlink(attr.ino).unwrap(),
                    fs::read_link(&path).unwrap().as_os_str().as_bytes()
                );
            }
            NodeKind::Dir => n += compare(v, &path, attr.ino, inos),
            NodeKind::CharDev | NodeKind::BlockDev => assert_eq!(attr.rdev, m.rdev()),
            NodeKind::Fifo | NodeKind::Socket => {}
        }
        n += 1;
    }
    n
}

#[test]
fn a_mounted_version_is_the_source_exactly() {
    let fx = Fixture::new(rich_tree);
    let v = fx.volume(fx.cache("cache", None));
    let root = v.getattr(1).unwrap();
    let m = fs::metadata(&fx.src).unwrap();
    assert_eq!(root.perm, m.permissions().mode() & 0o7777);
    let n = compare(&v, &fx.src, 1, &mut HashMap::new());
    assert!(n > 250, "walked only {n} entries");
    assert!(v.lookup(1, b"nope").is_err());
    assert_eq!(v.lookup(1, b"nope").unwrap_err().errno(), libc::ENOENT);
    assert_eq!(v.lookup(1, b"..").unwrap_err().errno(), libc::ENOENT);
    let small = v.lookup(1, b"small.txt").unwrap();
    assert_eq!(
        v.lookup(small.ino, b"x").unwrap_err().errno(),
        libc::ENOTDIR
    );
    assert_eq!(
        v.open(small.ino, true, false).unwrap_err().errno(),
        libc::EROFS
    );
    assert!(v.statfs().unwrap().files > 250);
}

#[test]
fn reads_across_chunk_and_block_boundaries_are_exact() {
    let fx = Fixture::new(rich_tree);
    let v = fx.volume(fx.cache("cache", None));
    for name in ["big.bin", "chunk+1", "sparse"] {
        let a = v.lookup(1, name.as_bytes()).unwrap();
        let want = fs::read(fx.src.join(name)).unwrap();
        let fh = v.open(a.ino, false, false).unwrap();
        let bs = 256 << 10;
        let mut offsets = vec![
            0u64,
            1,
            4095,
            bs - 1,
            bs,
            bs + 1,
            MIB - 1,
            MIB,
            MIB + 1,
            2 * MIB - 3,
            3 * MIB,
        ];
        offsets.extend((0..40).map(|i| (i * 104_729) % a.size));
        for off in offsets.into_iter().filter(|o| *o < a.size) {
            for size in [1u32, 17, 4096, 131_072, (MIB + 5) as u32] {
                let got = v.read(a.ino, fh, off, size).unwrap();
                let end = (off + size as u64).min(a.size) as usize;
                assert_eq!(&got[..], &want[off as usize..end], "{name} at {off}+{size}");
            }
        }
        v.release(fh).unwrap();
    }
}

#[test]
fn concurrent_readers_see_correct_bytes() {
    let fx = Fixture::new(rich_tree);
    let v = Arc::new(fx.volume(fx.cache("cache", None)));
    let a = v.lookup(1, b"big.bin").unwrap();
    let want = Arc::new(fs::read(fx.src.join("big.bin")).unwrap());
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let (v, want) = (v.clone(), want.clone());
            std::thread::spawn(move || {
                let fh = v.open(a.ino, false, false).unwrap();
                for i in 0..30u64 {
                    let off = (t * 7919 + i * 65_537) % a.size;
                    let got = v.read(a.ino, fh, off, 200_000).unwrap();
                    let end = (off + 200_000).min(a.size) as usize;
                    assert_eq!(&got[..], &want[off as usize..end]);
                }
                v.release(fh).unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn a_small_cache_bound_evicts_but_reads_stay_correct() {
    let fx = Fixture::new(rich_tree);
    let cache = fx.cache("cache", Some(2 * MIB));
    let v = fx.volume(cache.clone());
    for name in ["big.bin", "chunk", "chunk+1", "chunk-1"] {
        let a = v.lookup(1, name.as_bytes()).unwrap();
        assert_eq!(
            read_all(&v, a.ino, a.size),
            fs::read(fx.src.join(name)).unwrap()
        );
    }
    // Background fills may still be landing: wait for them, then check the bound.
    std::thread::sleep(std::time::Duration::from_millis(500));
    cache.evict_to(2 * MIB).unwrap();
    let s = cache.stats().unwrap();
    assert!(
        s.bytes <= 2 * MIB,
        "cache holds {} bytes over a 2 MiB bound",
        s.bytes
    );
    assert!(s.evicted_chunks > 0, "nothing was evicted");
}

#[test]
fn a_corrupted_chunk_gives_eio_and_is_never_cached() {
    let fx = Fixture::new(rich_tree);
    // Flip a byte in every chunk file of the repository that holds big.bin's first chunk.
    let cache = fx.cache("cache", None);
    let v = fx.volume(cache.clone());
    let a = v.lookup(1, b"big.bin").unwrap();
    let want = fs::read(fx.src.join("big.bin")).unwrap();
    let m = v.manifest().clone();
    let ext = m.extents(a.ino, 0..1).unwrap();
    let info = m.chunk(ext[0].chunk).unwrap().unwrap();
    let path = fx.repo_dir.join(horcrux::format::chunk_key(&info.id));
    let mut data = fs::read(&path).unwrap();
    data[300_000] ^= 0x55; // in the second 256 KiB block
    fs::write(&path, &data).unwrap();
    let fh = v.open(a.ino, false, false).unwrap();
    let err = v.read(a.ino, fh, 300_000, 10).unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    // Other blocks of the same chunk still read.
    assert_eq!(&v.read(a.ino, fh, 0, 100).unwrap()[..], &want[..100]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let r = cache.verify(&|_, _| {}).unwrap();
    assert_eq!(r.bad_blocks, 0, "a corrupted block reached the cache");
    assert!(
        v.read(a.ino, fh, 300_000, 10).is_err(),
        "corrupted data served from the cache"
    );
}

#[test]
fn copy_to_another_store_is_complete_and_resumable() {
    let fx = Fixture::new(rich_tree);
    let dst_dir = fx.dir.path().join("copy");
    let dst: Arc<dyn horcrux::store::Store> =
        Arc::new(horcrux::store::FileStore::new(dst_dir.clone()));
    let src = fx
        .runtime
        .block_on(horcrux::repo::Repository::open(fx.store()))
        .unwrap();
    let opts = horcrux::transfer::CopyOptions {
        concurrency: 4,
        ..Default::default()
    };
    let r = fx
        .runtime
        .block_on(horcrux::transfer::copy(
            &src,
            dst.clone(),
            &opts,
            &horcrux::transfer::NoCopyProgress,
        ))
        .unwrap();
    assert!(r.chunks_copied > 0 && r.chunks_copied == r.chunks);
    assert_eq!(r.refs_updated.len(), 1);
    let again = fx
        .runtime
        .block_on(horcrux::transfer::copy(
            &src,
            dst.clone(),
            &opts,
            &horcrux::transfer::NoCopyProgress,
        ))
        .unwrap();
    assert_eq!(again.chunks_copied, 0, "a re-run copied chunks again");
    assert_eq!(again.refs_unchanged.len(), 1);
    let v = fx.volume_from(dst, fx.cache("cache2", None), Default::default());
    compare(&v, &fx.src, 1, &mut HashMap::new());
}

//! Reads through the kernel: exact across chunk and block boundaries (1 MiB chunks), and
//! correct under many concurrent readers.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Barrier};

use common::*;

const BIG_LEN: usize = 5 * MIB as usize + 777;

/// Read up to `len` bytes at `off`, looping over short reads; stops at end of file.
fn pread(f: &File, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut out = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = f.read_at(&mut out[done..], off + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    out.truncate(done);
    Ok(out)
}

/// Open for reading; `direct` bypasses the page cache so every read reaches the daemon at
/// the offset and size asked.
fn open(p: &Path, direct: bool) -> File {
    let mut o = OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(p)
        .unwrap_or_else(|e| panic!("open {} (direct {direct}): {e}", p.display()))
}

fn expected(off: u64, len: usize, data: &[u8]) -> &[u8] {
    let s = (off as usize).min(data.len());
    &data[s..(s + len).min(data.len())]
}

fn fixture(t: &Path) -> (std::path::PathBuf, Vec<u8>, Vec<u8>) {
    let src = t.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let big = bytes(42, BIG_LEN);
    std::fs::write(src.join("big"), &big).unwrap();
    // Sparse: holes around data that straddles a chunk boundary.
    let f = File::create(src.join("sparse")).unwrap();
    let piece = bytes(43, 300_000);
    f.write_all_at(&piece, 2 * MIB - 150_000).unwrap();
    f.set_len(4 * MIB + 1).unwrap();
    let mut sparse = vec![0u8; 4 * MIB as usize + 1];
    sparse[2 * MIB as usize - 150_000..][..piece.len()].copy_from_slice(&piece);
    std::fs::write(src.join("small"), b"tiny").unwrap();
    let repo = t.join("repo");
    generate("reads", &src, &repo);
    (repo, big, sparse)
}

#[test]
fn reads_across_chunk_boundaries_are_exact() {
    let t = tempdir();
    let (repo, big, sparse) = fixture(t.path());
    let m = Mount::new(&repo, &t.path().join("mnt"), &t.path().join("cache"), &[]);
    let sizes = [
        1usize,
        7,
        4096,
        65_539,
        MIB as usize - 1,
        MIB as usize,
        MIB as usize + 1,
        2 * MIB as usize + 5,
    ];
    let deltas = [-4097i64, -1, 0, 1, 4095];
    let mut checked = 0;
    // Cold direct reads first (every one reaches the daemon, most fetch), then buffered.
    for direct in [true, false] {
        for (name, data) in [("big", &big), ("sparse", &sparse)] {
            let f = open(&m.path(name), direct);
            for k in 0..=6u64 {
                for d in deltas {
                    let off = (k * MIB) as i64 + d;
                    if off < 0 {
                        continue;
                    }
                    for len in sizes {
                        let got = pread(&f, off as u64, len).unwrap_or_else(|e| {
                            panic!("{name}: pread({off}, {len}) direct={direct}: {e}")
                        });
                        let want = expected(off as u64, len, data);
                        assert!(
                            got == want,
                            "{name}: pread({off}, {len}) direct={direct}: got {} bytes, want {}; first difference at {:?}",
                            got.len(),
                            want.len(),
                            got.iter().zip(want).position(|(a, b)| a != b)
                        );
                        checked += 1;
                    }
                }
            }
            // At and past the end: nothing.
            assert!(pread(&f, data.len() as u64, 10).unwrap().is_empty());
            assert!(pread(&f, data.len() as u64 + MIB, 10).unwrap().is_empty());
        }
    }
    assert!(checked > 500);
    // Whole files, sequentially.
    assert!(std::fs::read(m.path("big")).unwrap() == big);
    assert!(std::fs::read(m.path("sparse")).unwrap() == sparse);
    assert_eq!(std::fs::read(m.path("small")).unwrap(), b"tiny");
    m.unmount();
}

#[test]
fn sixteen_concurrent_readers_get_correct_bytes() {
    let t = tempdir();
    let (repo, big, _) = fixture(t.path());
    // A cold cache: the readers race for the same missing blocks.
    let m = Mount::new(&repo, &t.path().join("mnt"), &t.path().join("cache"), &[]);
    let big = Arc::new(big);
    let start = Arc::new(Barrier::new(16));
    let path = m.path("big");
    let threads: Vec<_> = (0..16u64)
        .map(|i| {
            let (big, start, path) = (big.clone(), start.clone(), path.clone());
            std::thread::spawn(move || {
                let f = open(&path, i % 2 == 0);
                start.wait();
                // Everyone first reads the same spot, then its own random ones.
                let got = pread(&f, MIB - 10, 20).unwrap();
                assert_eq!(got, expected(MIB - 10, 20, &big), "reader {i}: shared read");
                let mut x = i.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
                for n in 0..120 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = x % (BIG_LEN as u64 + 1000);
                    let len = ((x >> 40) % (2 * MIB + 100)) as usize + 1;
                    let got = pread(&f, off, len)
                        .unwrap_or_else(|e| panic!("reader {i} read {n} ({off}, {len}): {e}"));
                    assert!(
                        got == expected(off, len, &big),
                        "reader {i} read {n}: wrong bytes at {off}+{len}"
                    );
                }
                let all = pread(&f, 0, BIG_LEN).unwrap();
                assert!(all == *big, "reader {i}: whole file differs");
            })
        })
        .collect();
    for th in threads {
        th.join().expect("a reader failed");
    }
    m.unmount();
}

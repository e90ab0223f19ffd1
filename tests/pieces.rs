//! Small cold reads from verified pieces, over a real OpenSSH server on loopback
//! (`support/sshd.rs`): a 4 KiB read of a cold 1 MiB block fetches its 16 KiB piece and the
//! block's piece hashes, far less than the block, and returns the right bytes; a tampered
//! piece outboard is refused (the whole block is fetched and served instead), a tampered
//! piece is never served, and a chunk without an outboard reads whole blocks.

#[path = "support/sshd.rs"]
mod sshd;

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use horcrux::cache::{Cache, CacheConfig};
use horcrux::fetch::{FetchConfig, FetchError, Fetcher};
use horcrux::format::{chunk_key, outboard_key};
use horcrux::hashtree::{PIECE_SIZE, encode_piece_outboard, hash_pieces};
use horcrux::manifest::ChunkInfo;
use horcrux::store::{SshStore, Store, StoreError, StoreOptions, parse_one};
use sshd::Sshd;

const MIB: usize = 1 << 20;
const BS: u32 = 1 << 20;

/// Counts the bytes a store hands out: what crossed the wire from the server.
#[derive(Debug)]
struct Counted {
    inner: SshStore,
    bytes: AtomicU64,
    requests: AtomicU64,
}

#[async_trait::async_trait]
impl Store for Counted {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let b = self.inner.get_range(key, range).await?;
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.bytes.fetch_add(b.len() as u64, Ordering::SeqCst);
        Ok(b)
    }
    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.inner.get(key).await
    }
    fn refused(&self, key: &str) {
        self.inner.refused(key)
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.inner.put(key, data).await
    }
    async fn exists(&self, keys: &[String]) -> Result<Vec<bool>, StoreError> {
        self.inner.exists(keys).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.inner.list(prefix).await
    }
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Bytes,
    ) -> Result<(), StoreError> {
        self.inner.compare_and_swap(key, expected, new).await
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write(root: &Path, key: &str, data: &[u8]) {
    let p = root.join(key);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

struct Setup {
    _tmp: tempfile::TempDir,
    repo: std::path::PathBuf,
    store: Arc<Counted>,
    fetcher: Arc<Fetcher>,
    info: Arc<ChunkInfo>,
    data: Vec<u8>,
}

/// A 5.5 MiB chunk (and, if `outboard`, its piece outboard) in a repository directory that the
/// sshd serves; a fresh cache and a fetcher over the counted SSH store.
fn setup(s: &Sshd, seed: u64, outboard: bool) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let data = pattern(5 * MIB + MIB / 2, seed);
    let (id, blocks, pieces) = hash_pieces(&data, BS);
    write(&repo, &chunk_key(&id), &data);
    if outboard {
        write(&repo, &outboard_key(&id), &encode_piece_outboard(&pieces));
    }
    let opts = StoreOptions {
        ssh_identity: Some(s.client_key.clone()),
        ssh_known_hosts: Some(s.known_hosts.clone()),
        ..StoreOptions::default()
    };
    let url = parse_one(&s.url(&repo)).unwrap();
    let store = Arc::new(Counted {
        inner: SshStore::from_url(&url, &opts).unwrap(),
        bytes: AtomicU64::new(0),
        requests: AtomicU64::new(0),
    });
    let cache = Cache::open(CacheConfig {
        dir: tmp.path().join("cache"),
        max_size: None,
    })
    .unwrap();
    let fetcher = Arc::new(Fetcher::new(
        store.clone(),
        cache,
        BS,
        FetchConfig {
            fill_chunks: false,
            request_timeout: Duration::from_secs(20),
            ..FetchConfig::default()
        },
    ));
    let info = Arc::new(ChunkInfo {
        idx: 0,
        id,
        len: data.len() as u64,
        blocks,
    });
    Setup {
        _tmp: tmp,
        repo,
        store,
        fetcher,
        info,
        data,
    }
}

/// Wait until block `b` of the chunk is cached (it follows a piece read in the background).
async fn wait_cached(t: &Setup, b: u64) {
    let r = b * MIB as u64..(b + 1) * MIB as u64;
    for _ in 0..500 {
        if t.fetcher.read_cached(&t.info, r.clone()).is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("block {b} was not cached after the piece read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_4k_read_fetches_a_piece_not_a_block() {
    let s = Sshd::start();
    let t = setup(&s, 1, true);
    // 4 KiB in the middle of block 3, not piece-aligned.
    let at = 3 * MIB as u64 + 5 * PIECE_SIZE as u64 + 1000;
    let got = t.fetcher.read(&t.info, at..at + 4096).await.unwrap();
    assert_eq!(&got[..], &t.data[at as usize..at as usize + 4096]);
    let fetched = t.store.bytes.load(Ordering::SeqCst);
    // One 16 KiB piece and the 64 piece hashes of the block (2 KiB); the whole block is
    // fetched right behind the read, and may just have landed too.
    let piece = PIECE_SIZE as u64 + 64 * 32;
    assert!(
        fetched == piece || fetched == piece + MIB as u64,
        "bytes fetched for a cold 4 KiB read: {fetched}"
    );
    assert_eq!(
        t.fetcher.metrics().piece_bytes.load(Ordering::SeqCst),
        piece
    );
    assert_eq!(t.fetcher.metrics().piece_reads.load(Ordering::SeqCst), 1);
    // The whole block follows into the cache, verified; the piece itself is never cached alone.
    wait_cached(&t, 3).await;
    assert_eq!(
        t.fetcher.read_cached(&t.info, at..at + 4096).unwrap(),
        &t.data[at as usize..at as usize + 4096]
    );
    // A read straddling two pieces of another block, and one in the short last block.
    let at = 4 * MIB as u64 + PIECE_SIZE as u64 - 100;
    let got = t.fetcher.read(&t.info, at..at + 300).await.unwrap();
    assert_eq!(&got[..], &t.data[at as usize..at as usize + 300]);
    let at = t.info.len - 10;
    let got = t.fetcher.read(&t.info, at..t.info.len).await.unwrap();
    assert_eq!(&got[..], &t.data[at as usize..]);
    assert_eq!(t.fetcher.metrics().piece_reads.load(Ordering::SeqCst), 3);
    assert_eq!(
        t.fetcher.metrics().verify_failures.load(Ordering::SeqCst),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_outboard_or_piece_is_never_trusted() {
    let s = Sshd::start();
    let t = setup(&s, 2, true);
    // One sibling hash of block 1 changed on the server.
    let ob_path = t.repo.join(outboard_key(&t.info.id));
    let mut ob = std::fs::read(&ob_path).unwrap();
    let k = 8 + (64 + 7) * 32 + 3; // piece 7 of block 1
    ob[k] ^= 1;
    std::fs::write(&ob_path, &ob).unwrap();
    let at = MIB as u64 + 100;
    let got = t.fetcher.read(&t.info, at..at + 4096).await.unwrap();
    assert_eq!(&got[..], &t.data[at as usize..at as usize + 4096]);
    assert_eq!(t.fetcher.metrics().piece_reads.load(Ordering::SeqCst), 0);
    assert_eq!(
        t.fetcher.metrics().verify_failures.load(Ordering::SeqCst),
        1
    );
    assert!(
        t.store.bytes.load(Ordering::SeqCst) >= MIB as u64,
        "the whole block was read instead"
    );

    // A piece of block 2 changed on the server: refused as a piece, and as a block.
    let chunk_path = t.repo.join(chunk_key(&t.info.id));
    let mut bytes = std::fs::read(&chunk_path).unwrap();
    let at = 2 * MIB + 3 * PIECE_SIZE as usize;
    bytes[at + 20] ^= 0x80;
    std::fs::write(&chunk_path, &bytes).unwrap();
    let e = t
        .fetcher
        .read(&t.info, at as u64..at as u64 + 4096)
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::Corrupt(_)), "{e}");
    assert!(
        t.fetcher
            .read_cached(&t.info, at as u64..at as u64 + 4096)
            .is_none()
    );
    assert_eq!(t.fetcher.metrics().piece_reads.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_without_outboard_reads_whole_blocks() {
    let s = Sshd::start();
    let t = setup(&s, 3, false);
    let at = 2 * MIB as u64 + 7;
    let got = t.fetcher.read(&t.info, at..at + 4096).await.unwrap();
    assert_eq!(&got[..], &t.data[at as usize..at as usize + 4096]);
    // The block, and the piece that was asked for together with the (missing) outboard.
    assert_eq!(
        t.store.bytes.load(Ordering::SeqCst),
        (MIB + PIECE_SIZE as usize) as u64
    );
    // Remembered: the next small read asks for no outboard (one request, the block).
    let before = t.store.requests.load(Ordering::SeqCst);
    let at = 4 * MIB as u64 + 7;
    t.fetcher.read(&t.info, at..at + 10).await.unwrap();
    assert_eq!(t.store.requests.load(Ordering::SeqCst), before + 1);
    assert_eq!(t.fetcher.metrics().piece_reads.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_repaired_on_the_server_is_read_anew_after_a_refusal() {
    let s = Sshd::start();
    let t = setup(&s, 5, true);
    let chunk_path = t.repo.join(chunk_key(&t.info.id));
    // Objects change on a server only by replacement (rename), which is what a repair does.
    let replace = |bytes: &[u8]| {
        let tmp = chunk_path.with_extension("new");
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, &chunk_path).unwrap();
    };
    let mut bad = t.data.clone();
    let at = 2 * MIB + 3 * PIECE_SIZE as usize;
    bad[at + 20] ^= 0x80;
    replace(&bad);
    // The damaged block is refused, as a piece and as a block; the sessions that read it
    // keep the damaged file open...
    let e = t
        .fetcher
        .read(&t.info, at as u64..at as u64 + 4096)
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::Corrupt(_)), "{e}");
    // ...until the refusal closes those handles: once the chunk is repaired, the next read
    // opens the file as it is now and gets good bytes, instead of failing through the old
    // handle for as long as the session lives.
    replace(&t.data);
    let got = t
        .fetcher
        .read(&t.info, at as u64..at as u64 + 4096)
        .await
        .unwrap();
    assert_eq!(&got[..], &t.data[at..at + 4096]);
}

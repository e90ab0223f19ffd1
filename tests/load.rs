//! Load: many readers of one cold chunk, many writers under a stream of commits.
//!
//! - 64 threads read one cold 4 MiB chunk (four 1 MiB blocks) through one mount over SSH at
//!   the same moment, each with O_DIRECT (every `read` reaches the daemon: the kernel's page
//!   cache cannot merge them). The OpenSSH server logs every SFTP read request it answers
//!   (`support/sshd.rs`): each byte of the chunk must have been asked for exactly once.
//! - 16 writers write self-checking 4 KiB records into their own files of one writable
//!   volume — appending, and overwriting earlier records with newer versions — each record
//!   `fsync`ed before it counts as acknowledged, while `horcrux commit` runs every second for
//!   `HX_LOAD_SECS` seconds (default 10; 60 by hand). Then every commit is mounted
//!   (`mount --ref`) and checked record by record: no torn record, every record acknowledged
//!   before the commit started is there in that version or a newer one, nothing that was not
//!   yet written; and `horcrux verify` checks the whole repository.
//!
//! Build the binary first: `cargo build --workspace`.

mod common;
#[path = "support/remote.rs"]
mod remote;
#[path = "support/s3server.rs"]
mod s3server;
#[path = "support/sshd.rs"]
mod sshd;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use common::*;
use remote::{Access, read_direct_bounded};
use sshd::{Sshd, SshdOptions};

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

#[test]
fn sixty_four_readers_of_one_cold_chunk_cause_one_fetch_of_each_block() {
    let t = tempdir();
    let t = t.path();
    let s = Sshd::start_with(SshdOptions {
        sftp_log: true,
        ..Default::default()
    });
    let src = t.join("src");
    fs::create_dir_all(&src).unwrap();
    let len = 4 * MIB as usize;
    let data = Arc::new(bytes(64, len));
    fs::write(src.join("one"), &*data).unwrap();
    let repo = s.dir().join("repo");
    horcrux_ok(&[
        os("generate"),
        os("load"),
        src.as_os_str(),
        repo.as_os_str(),
        os("--chunk-size"),
        os("4M"),
    ]);
    let chunks = remote::files_under(&repo.join("chunks"));
    assert_eq!(chunks.len(), 1, "one chunk expected: {chunks:?}");
    let chunk = chunks[0].display().to_string();

    let m = Access::ssh(&s).mount(
        &s.url(&repo),
        &t.join("mnt"),
        &t.join("cache"),
        &["--read-only"],
    );
    let file = m.path("one");
    let start = Arc::new(Barrier::new(64));
    let readers: Vec<_> = (0..64)
        .map(|i| {
            let (file, data, start) = (file.clone(), data.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                // Each reader starts at another block, so every block has readers arriving
                // while its fetch is in flight.
                for k in 0..4 {
                    let b = (i + k) % 4;
                    let off = b * MIB as usize;
                    let (r, _) = read_direct_bounded(
                        &file,
                        off as u64,
                        MIB as usize,
                        Duration::from_secs(60),
                    );
                    let got = r.unwrap_or_else(|e| panic!("reader {i}, block {b}: {e}"));
                    assert!(
                        got == data[off..off + MIB as usize],
                        "reader {i}: block {b} differs"
                    );
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }

    let reads: Vec<_> = s
        .sftp_reads()
        .into_iter()
        .filter(|r| r.path == chunk)
        .collect();
    // One fetch per block: every byte of each block asked for exactly once, except the first
    // 30000 bytes of a block, where the SFTP client's last request of the fetch before it
    // may reach (a fetch is one block, or a run of adjacent blocks, so block starts are not
    // always request starts). The bytes asked for add up to the chunk, give or take those
    // overhangs. Before the SSH store bounded libssh2's read-ahead, each 1 MiB block fetch
    // asked for 4 MiB.
    const OVERHANG: u64 = 30_000;
    for b in 0..4u64 {
        let (lo, hi) = (b * MIB + OVERHANG, (b + 1) * MIB);
        let asked: u64 = reads
            .iter()
            .map(|r| (r.offset + r.len).min(hi).saturating_sub(r.offset.max(lo)))
            .sum();
        assert_eq!(
            asked,
            hi - lo,
            "block {b}: {asked} of its {} bytes past the overhang asked for (each once expected): {reads:?}",
            hi - lo
        );
    }
    let asked: u64 = reads.iter().map(|r| r.len).sum();
    eprintln!(
        "64 readers x 4 MiB: {} SFTP read requests of the chunk, {} KiB asked for (chunk: {} KiB)",
        reads.len(),
        asked >> 10,
        len >> 10
    );
    let covered: u64 = {
        let mut v: Vec<(u64, u64)> = reads.iter().map(|r| (r.offset, r.offset + r.len)).collect();
        v.sort();
        let (mut total, mut end) = (0, 0);
        for (a, b) in v {
            let a = a.max(end);
            if b > a {
                total += b - a;
                end = b;
            }
        }
        total
    };
    assert!(
        covered >= len as u64,
        "only {covered} bytes of the chunk were asked for"
    );
    assert!(
        asked <= len as u64 + 4 * 30_000,
        "{asked} bytes asked for a {len}-byte chunk: more than one fetch per block"
    );
    m.unmount();
}

/// Size of a record: one page, so the kernel never splits one `pwrite` of it.
const REC: usize = 4096;

/// A record: `writer, position, version`, a payload derived from them, and its blake3.
fn record(writer: u64, pos: u64, version: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(REC);
    for v in [writer, pos, version] {
        r.extend_from_slice(&v.to_le_bytes());
    }
    let fill = bytes((writer << 40) ^ (pos << 20) ^ version, REC - 24 - 32);
    r.extend_from_slice(&fill);
    let h = blake3::hash(&r);
    r.extend_from_slice(h.as_bytes());
    r
}

/// `Some((writer, position, version))` of a valid record, `None` for a hole (all zeros);
/// panics on anything else (a torn or foreign record).
fn parse(rec: &[u8], what: &str) -> Option<(u64, u64, u64)> {
    if rec.iter().all(|b| *b == 0) {
        return None;
    }
    let (body, h) = rec.split_at(REC - 32);
    assert!(
        blake3::hash(body).as_bytes() == h,
        "{what}: a torn or foreign record"
    );
    let n = |i: usize| u64::from_le_bytes(body[i * 8..i * 8 + 8].try_into().unwrap());
    Some((n(0), n(1), n(2)))
}

/// One write of a writer: record `pos` in `version`, started and acknowledged (fsync returned).
#[derive(Debug, Clone, Copy)]
struct Write {
    pos: u64,
    version: u64,
    started: Instant,
    acked: Instant,
}

/// A commit: its id and when the `horcrux commit` command started and returned.
#[derive(Debug, Clone)]
struct Made {
    id: String,
    started: Instant,
    ended: Instant,
}

#[test]
fn sixteen_writers_and_a_commit_every_second_lose_and_tear_nothing() {
    let secs: u64 = std::env::var("HX_LOAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let t = tempdir();
    let t = t.path();
    let src = t.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("readme"), b"load\n").unwrap();
    let repo = t.join("repo");
    generate("load", &src, &repo);
    let m = Mount::new(&repo, &t.join("mnt"), &t.join("cache"), &[]);

    let stop = Arc::new(AtomicBool::new(false));
    let logs: Vec<Arc<Mutex<Vec<Write>>>> = (0..16).map(|_| Arc::default()).collect();
    let writers: Vec<_> = (0..16u64)
        .map(|w| {
            let (stop, log) = (stop.clone(), logs[w as usize].clone());
            let path = m.path(&format!("w{w:02}"));
            std::thread::spawn(move || {
                let f = fs::OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .read(true)
                    .write(true)
                    .open(&path)
                    .unwrap();
                let (mut n, mut appended) = (0u64, 0u64);
                while !stop.load(Ordering::SeqCst) {
                    // Mostly appends; every third write replaces one of the last 64 records
                    // with a newer version (positions cross the 1 MiB chunk windows as files
                    // grow). Near the end, so each commit rewrites a window or two per file,
                    // not every window: a minute of this stays within a few GiB of chunks.
                    let pos = if n % 3 == 2 {
                        appended - 1 - (n * 7919) % appended.min(64)
                    } else {
                        appended += 1;
                        appended - 1
                    };
                    let started = Instant::now();
                    f.write_all_at(&record(w, pos, n), pos * REC as u64)
                        .unwrap();
                    f.sync_data().unwrap();
                    log.lock().unwrap().push(Write {
                        pos,
                        version: n,
                        started,
                        acked: Instant::now(),
                    });
                    n += 1;
                }
            })
        })
        .collect();

    // Commits start once every writer has a record acknowledged (a commit of no change is
    // refused with "nothing to commit").
    assert!(
        wait_until(Duration::from_secs(30), || logs
            .iter()
            .all(|l| !l.lock().unwrap().is_empty())),
        "the writers wrote nothing in 30 s"
    );
    let mut made: Vec<Made> = Vec::new();
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        let tick = Instant::now();
        let started = Instant::now();
        let out = horcrux(&[os("commit"), os("-m"), os("tick"), m.mountpoint.as_os_str()]);
        let ended = Instant::now();
        assert!(
            out.status.success(),
            "commit failed under load: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status = horcrux_ok(&[os("status"), os("--json"), m.mountpoint.as_os_str()]);
        let v: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
        made.push(Made {
            id: v["base_commit"].as_str().unwrap().to_string(),
            started,
            ended,
        });
        if let Some(rest) = Duration::from_secs(1).checked_sub(tick.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    let logs: Vec<Vec<Write>> = logs.iter().map(|l| l.lock().unwrap().clone()).collect();
    let total: usize = logs.iter().map(Vec::len).sum();
    let commit_ms: Vec<u128> = made
        .iter()
        .map(|c| (c.ended - c.started).as_millis())
        .collect();
    eprintln!(
        "{secs} s: 16 writers acknowledged {total} records ({} MiB); {} commits, each {:?} ms",
        (total * REC) >> 20,
        made.len(),
        commit_ms
    );
    assert!(
        made.len() as u64 >= secs / 2,
        "only {} commits in {secs} s",
        made.len()
    );
    assert!(
        total >= 16 * made.len(),
        "the writers hardly wrote: {total} records"
    );

    // The whole repository checks out: every commit, manifest and chunk by its hash.
    horcrux_ok(&[os("verify"), os(&url(&repo))]);
    let repo_bytes: u64 = remote::files_under(&repo)
        .iter()
        .map(|f| fs::metadata(f).map_or(0, |m| m.len()))
        .sum();
    eprintln!("repository: {} MiB", repo_bytes >> 20);

    for (i, c) in made.iter().enumerate() {
        let mp = t.join(format!("c{i}"));
        let cm = Mount::new(
            &repo,
            &mp,
            &t.join("cache"),
            &["--read-only", "--ref", &c.id],
        );
        for (w, log) in logs.iter().enumerate() {
            check_file(&cm.path(&format!("w{w:02}")), w as u64, log, c, i);
        }
        cm.unmount();
    }
    m.unmount();
}

/// Check writer `w`'s file in commit `c` against its log of writes.
fn check_file(path: &Path, w: u64, log: &[Write], c: &Made, i: usize) {
    // Per position: the newest version acknowledged before the commit started (must be there,
    // or a newer one), and the versions started before it ended (the only ones allowed).
    let mut floor: BTreeMap<u64, u64> = BTreeMap::new();
    let mut allowed: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for x in log {
        if x.acked < c.started {
            let f = floor.entry(x.pos).or_insert(x.version);
            *f = (*f).max(x.version);
        }
        if x.started < c.ended {
            allowed.entry(x.pos).or_default().push(x.version);
        }
    }
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                floor.is_empty(),
                "commit {i}: w{w:02} is missing but had acknowledged writes"
            );
            return;
        }
        Err(e) => panic!("commit {i}: reading w{w:02}: {e}"),
    };
    assert_eq!(
        data.len() % REC,
        0,
        "commit {i}: w{w:02} has a partial record"
    );
    for (pos, rec) in data.chunks(REC).enumerate() {
        let pos = pos as u64;
        let what = format!("commit {i}, w{w:02}, record {pos}");
        match parse(rec, &what) {
            None => assert!(
                !floor.contains_key(&pos),
                "{what}: acknowledged before the commit but a hole in it"
            ),
            Some((rw, rp, rv)) => {
                assert_eq!((rw, rp), (w, pos), "{what}: a record of another place");
                if let Some(f) = floor.get(&pos) {
                    assert!(
                        rv >= *f,
                        "{what}: version {rv}, but {f} was acknowledged before"
                    );
                }
                assert!(
                    allowed.get(&pos).is_some_and(|v| v.contains(&rv)),
                    "{what}: version {rv} was not written before the commit ended"
                );
            }
        }
    }
    for pos in floor.keys() {
        assert!(
            (*pos as usize) < data.len() / REC,
            "commit {i}: w{w:02} record {pos} was acknowledged before the commit but is past its end"
        );
    }
}

//! Peers end to end on loopback: `horcrux tls` files, `horcrux serve` over mTLS as a real
//! process, `horcrux mount horcrux://...` through the real kernel FUSE, and what goes wrong:
//! a client of another CA, a server certificate for another address, a peer serving corrupted
//! chunks, a peer killed mid-read, a fleet whose peers read through one node (the origin asked
//! once per block), and a peers file ordered by rendezvous hashing.
//!
//! Build the binary first: `cargo build --workspace`.

mod common;
#[path = "support/peer.rs"]
mod peer;
#[path = "support/prom.rs"]
mod prom;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use peer::*;

/// A repository named `name` under `t` holding one file `big` of `mib` MiB (chunks of
/// `chunk`), and the file's bytes.
fn repo_with(t: &Path, name: &str, mib: u64, chunk: &str, seed: u64) -> (PathBuf, Vec<u8>) {
    let src = t.join(format!("{name}-src"));
    fs::create_dir_all(&src).unwrap();
    let data = bytes(seed, (mib * MIB) as usize);
    fs::write(src.join("big"), &data).unwrap();
    fs::write(src.join("small"), b"small\n").unwrap();
    let repo = t.join(name);
    horcrux_ok(&[
        os("generate"),
        os("vol"),
        src.as_os_str(),
        repo.as_os_str(),
        os("--chunk-size"),
        os(chunk),
    ]);
    (repo, data)
}

fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn tls_init_issue_files_modes_and_errors() {
    let t = tempdir();
    let dir = t.path().join("tls");
    // No CA yet: issuing says how to make one.
    let out = horcrux(&[
        os("tls"),
        os("issue"),
        os("n"),
        os("--dir"),
        dir.as_os_str(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("tls init"), "{err}");
    pki(&dir);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&dir.join("node.key")), 0o600);
    assert_eq!(mode(&dir), 0o700);
    let ca_before = fs::read(dir.join("ca.crt")).unwrap();
    // An existing CA is not replaced without --force.
    let out = horcrux(&[os("tls"), os("init"), os("--dir"), dir.as_os_str()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--force"), "{err}");
    assert_eq!(fs::read(dir.join("ca.crt")).unwrap(), ca_before);
    // Re-issuing rotates the key.
    let key_before = fs::read(dir.join("node.key")).unwrap();
    pki_issue(&dir, "node");
    assert_ne!(fs::read(dir.join("node.key")).unwrap(), key_before);
    // A second node certificate: commands that need one ask which.
    pki_issue(&dir, "other");
    let out = horcrux(&[
        os("--tls-dir"),
        dir.as_os_str(),
        os("peer"),
        os("get"),
        os("horcrux://127.0.0.1:1/r"),
        os("k"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-cert"), "{err}");
    // A key that is not the certificate's.
    fs::copy(dir.join("other.key"), dir.join("node.key")).unwrap();
    let out = horcrux(&[
        os("--tls-dir"),
        dir.as_os_str(),
        os("--tls-cert"),
        os("node"),
        os("serve"),
        os("--listen"),
        os("127.0.0.1:0"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not belong to the certificate"), "{err}");
    // --force replaces the CA.
    horcrux_ok(&[
        os("tls"),
        os("init"),
        os("--dir"),
        dir.as_os_str(),
        os("--force"),
    ]);
    assert_ne!(fs::read(dir.join("ca.crt")).unwrap(), ca_before);
}

fn pki_issue(dir: &Path, name: &str) {
    horcrux_ok(&[
        os("tls"),
        os("issue"),
        os(name),
        os("--dir"),
        dir.as_os_str(),
        os("--san"),
        os("127.0.0.1"),
    ]);
}

#[test]
fn foreign_ca_client_and_misnamed_server_are_refused() {
    let t = tempdir();
    let (repo, _) = repo_with(t.path(), "amcc", 1, "1M", 1);
    let ours = t.path().join("tls");
    pki(&ours);
    let theirs = t.path().join("other-ca");
    pki(&theirs);
    let serve = Serve::start(
        &ours,
        &t.path().join("cache"),
        &t.path().join("serve.log"),
        &["--repo", &url(&repo)],
    );
    let get = |tls: &Path, host: &str| {
        horcrux(&[
            os("--tls-dir"),
            tls.as_os_str(),
            os("peer"),
            os("get"),
            os(&format!("horcrux://{host}:{}/amcc", serve.port)),
            os("horcrux.json"),
        ])
    };
    let ok = get(&ours, "127.0.0.1");
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("horcrux"));
    // A client with a certificate of another CA: refused at the handshake.
    let out = get(&theirs, "127.0.0.1");
    assert!(!out.status.success());
    assert!(
        wait_until(Duration::from_secs(5), || serve
            .log_text()
            .contains("refused a peer connection")),
        "{}",
        serve.log_text()
    );
    // The server's certificate is valid for 127.0.0.1, not for `localhost`: the client refuses.
    let out = get(&ours, "localhost");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("certificate"),
        "{err}"
    );
}

/// `horcrux serve --metrics`: after a mount read a file through the peer, the scrape (valid
/// Prometheus text) counts the range requests and at least the file's bytes served.
#[test]
fn serve_metrics_count_peer_reads() {
    let t = tempdir();
    let (origin, data) = repo_with(t.path(), "amcc", 3, "1M", 4);
    let tls = t.path().join("tls");
    pki(&tls);
    // A free port: bound, read and released (serve binds it a moment later).
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let serve = Serve::start(
        &tls,
        &t.path().join("serve-cache"),
        &t.path().join("serve.log"),
        &["--repo", &url(&origin), "--metrics", &addr],
    );
    let before = prom::scrape(&addr);
    assert_eq!(before.value("horcrux_peer_served_bytes_total", &[]), 0.0);
    let m = PeerMount::new(
        &tls,
        &serve.url("amcc"),
        &t.path().join("mnt"),
        &t.path().join("cache"),
        &[],
    );
    assert_eq!(fs::read(m.path("big")).unwrap(), data);
    let s = prom::scrape(&addr);
    let ranges = s.value("horcrux_peer_requests_total", &[("kind", "get_range")]);
    assert!(ranges >= 3.0, "three chunks of `big`\n{}", s.text);
    assert_eq!(
        s.value(
            "horcrux_peer_request_duration_seconds_count",
            &[("kind", "get_range")]
        ),
        ranges
    );
    assert!(
        s.value("horcrux_peer_served_bytes_total", &[]) >= data.len() as f64,
        "{}",
        s.text
    );
    assert_eq!(
        s.value("horcrux_peer_errors_total", &[("kind", "get_range")]),
        0.0
    );
    assert!(s.value("horcrux_peer_requests_total", &[("kind", "get")]) >= 1.0);
    drop(m);
    drop(serve);
}

#[test]
fn mount_through_a_peer_and_its_origin() {
    let t = tempdir();
    let (origin, data) = repo_with(t.path(), "amcc", 3, "1M", 2);
    let tls = t.path().join("tls");
    pki(&tls);
    let served = t.path().join("served");
    fs::create_dir_all(&served).unwrap();
    copy_dir(&origin, &served.join("amcc"));
    let serve = Serve::start(
        &tls,
        &t.path().join("serve-cache"),
        &t.path().join("serve.log"),
        &["--repo", &url(&served.join("amcc"))],
    );
    // The peer alone.
    let m = PeerMount::new(
        &tls,
        &serve.url("amcc"),
        &t.path().join("mnt1"),
        &t.path().join("cache1"),
        &[],
    );
    assert_eq!(fs::read(m.path("big")).unwrap(), data);
    assert_eq!(fs::read(m.path("small")).unwrap(), b"small\n");
    // Three chunks of `big`, one packed chunk holding `small`.
    assert_eq!(serve.chunk_reads(), 4, "{}", serve.log_text());
    drop(m);
    // Peer first, origin as mirror: the peer serves.
    let access = format!("{},{}", serve.url("amcc"), url(&origin));
    let m = PeerMount::new(
        &tls,
        &access,
        &t.path().join("mnt2"),
        &t.path().join("cache2"),
        &[],
    );
    assert_eq!(fs::read(m.path("big")).unwrap(), data);
    assert_eq!(serve.chunk_reads(), 7);
    // Without --tls-dir a peer URL is refused with a pointer to the flag.
    fs::create_dir_all(t.path().join("mnt3")).unwrap();
    let out = horcrux(&[
        os("mount"),
        os(&serve.url("amcc")),
        t.path().join("mnt3").as_os_str(),
        os("--foreground"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--tls-dir"), "{err}");
}

#[test]
fn a_peer_serving_corrupted_chunks_is_caught_and_the_origin_serves() {
    let t = tempdir();
    let (origin, data) = repo_with(t.path(), "amcc", 4, "1M", 3);
    let tls = t.path().join("tls");
    pki(&tls);
    let served = t.path().join("served");
    fs::create_dir_all(&served).unwrap();
    copy_dir(&origin, &served.join("amcc"));
    // Flip bytes in the middle of every chunk the peer holds (same length: only hashes tell).
    let mut altered = 0;
    for d in fs::read_dir(served.join("amcc/chunks")).unwrap() {
        for f in fs::read_dir(d.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            let mut b = fs::read(&p).unwrap();
            if b.len() > 1000 {
                b[500] ^= 0xff;
                fs::write(&p, b).unwrap();
                altered += 1;
            }
        }
    }
    assert!(altered >= 4);
    let serve = Serve::start(
        &tls,
        &t.path().join("serve-cache"),
        &t.path().join("serve.log"),
        &["--repo", &url(&served.join("amcc"))],
    );
    let access = format!("{},{}", serve.url("amcc"), url(&origin));
    let m = PeerMount::new(
        &tls,
        &access,
        &t.path().join("mnt"),
        &t.path().join("cache"),
        &[],
    );
    assert_eq!(fs::read(m.path("big")).unwrap(), data);
    let log = m.log_text();
    assert!(log.contains("hash mismatch"), "{log}");
    assert!(log.contains("marked unhealthy"), "{log}");
    assert!(serve.chunk_reads() >= 1);
}

#[test]
fn a_peer_killed_mid_read_falls_over_to_the_origin() {
    let t = tempdir();
    let (origin, data) = repo_with(t.path(), "amcc", 12, "1M", 4);
    let tls = t.path().join("tls");
    pki(&tls);
    // The peer serves slowly (2 MiB/s), so the read is still going when it dies.
    let mut serve = Serve::start(
        &tls,
        &t.path().join("serve-cache"),
        &t.path().join("serve.log"),
        &[
            "--repo",
            &format!("amcc={}", url(&origin)),
            "--bandwidth",
            "2M",
        ],
    );
    let access = format!("{},{}", serve.url("amcc"), url(&origin));
    let m = PeerMount::new(
        &tls,
        &access,
        &t.path().join("mnt"),
        &t.path().join("cache"),
        &["--timeout", "10", "--no-fill"],
    );
    let path = m.path("big");
    let reader = std::thread::spawn(move || {
        let t = Instant::now();
        (fs::read(path), t.elapsed())
    });
    assert!(
        wait_until(Duration::from_secs(10), || serve.chunk_reads() >= 2),
        "{}",
        serve.log_text()
    );
    serve.kill();
    let (got, took) = reader.join().unwrap();
    assert_eq!(got.unwrap(), data, "the origin must supply the right bytes");
    assert!(took < Duration::from_secs(30), "{took:?}");
    let log = m.log_text();
    assert!(log.contains("marked unhealthy"), "{log}");
}

#[test]
fn read_through_a_peer_asks_the_origin_once_per_block() {
    let t = tempdir();
    // 6 MiB in 4 MiB chunks: 2 chunks, 6 blocks of 1 MiB.
    let (origin, data) = repo_with(t.path(), "amcc", 6, "4M", 5);
    let tls = t.path().join("tls");
    pki(&tls);
    // The origin is itself a peer (so its reads can be counted), served by node A; node B
    // serves it read-through (a horcrux:// repository is remote, like s3:// or scp://).
    let a = Serve::start(
        &tls,
        &t.path().join("a-cache"),
        &t.path().join("a.log"),
        &["--repo", &url(&origin)],
    );
    let b = Serve::start(
        &tls,
        &t.path().join("b-cache"),
        &t.path().join("b.log"),
        &["--repo", &format!("fleet={}", a.url("amcc"))],
    );
    let m1 = PeerMount::new(
        &tls,
        &b.url("fleet"),
        &t.path().join("mnt1"),
        &t.path().join("cache1"),
        &[],
    );
    let m2 = PeerMount::new(
        &tls,
        &b.url("fleet"),
        &t.path().join("mnt2"),
        &t.path().join("cache2"),
        &[],
    );
    // Both clients read the same chunks at the same time.
    let (p1, p2) = (m1.path("big"), m2.path("big"));
    let r1 = std::thread::spawn(move || fs::read(p1).unwrap());
    let r2 = std::thread::spawn(move || fs::read(p2).unwrap());
    assert_eq!(r1.join().unwrap(), data);
    assert_eq!(r2.join().unwrap(), data);
    // Fills ask for runs of adjacent blocks, so count bytes: every block exactly once.
    let asked: u64 = a
        .log_text()
        .lines()
        .filter(|l| l.contains("range read") && l.contains("chunks/"))
        .filter_map(|l| {
            // Fields may be wrapped in colour codes (ESC [ ... m): drop them, then `len=N`.
            let mut plain = String::new();
            let mut in_code = false;
            for c in l.chars() {
                match (in_code, c) {
                    (false, '\x1b') => in_code = true,
                    (true, 'm') => in_code = false,
                    (false, c) => plain.push(c),
                    _ => {}
                }
            }
            let rest = &plain[plain.rfind("len=")? + 4..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u64>().ok()
        })
        .sum();
    assert_eq!(
        asked,
        6 << 20,
        "the origin must be asked once per block; its log:\n{}",
        a.log_text()
    );
    assert!((2..=6).contains(&a.chunk_reads()));
    assert!(b.chunk_reads() >= 6);
}

#[test]
fn a_peers_file_spreads_chunks_over_peers_and_skips_self() {
    let t = tempdir();
    let (origin, data) = repo_with(t.path(), "amcc", 16, "1M", 6);
    let tls = t.path().join("tls");
    pki(&tls);
    let s1 = Serve::start(
        &tls,
        &t.path().join("c1"),
        &t.path().join("s1.log"),
        &["--repo", &url(&origin)],
    );
    let s2 = Serve::start(
        &tls,
        &t.path().join("c2"),
        &t.path().join("s2.log"),
        &["--repo", &url(&origin)],
    );
    let peers = t.path().join("peers");
    // This node (port 1: nothing listens there) is listed too, as in a fleet-wide file.
    fs::write(
        &peers,
        format!(
            "# fleet\n127.0.0.1:{}\n127.0.0.1:1\n127.0.0.1:{}  # second\n",
            s1.port, s2.port
        ),
    )
    .unwrap();
    let m = PeerMount::new(
        &tls,
        &url(&origin),
        &t.path().join("mnt"),
        &t.path().join("cache"),
        &[
            "--peers-file",
            peers.to_str().unwrap(),
            "--self",
            "127.0.0.1:1",
        ],
    );
    assert_eq!(fs::read(m.path("big")).unwrap(), data);
    let (n1, n2) = (s1.chunk_reads(), s2.chunk_reads());
    // Every chunk went to a peer, each peer got some (16 chunks: both get one but for 2^-15).
    assert_eq!(n1 + n2, 16, "s1 {n1}, s2 {n2}");
    assert!(n1 > 0 && n2 > 0, "s1 {n1}, s2 {n2}");
    assert!(!m.log_text().contains("127.0.0.1:1/"), "{}", m.log_text());
}

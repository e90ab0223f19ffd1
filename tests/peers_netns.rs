//! Peers across several hosts: each host is a network namespace with its own address on a
//! private Ethernet segment (`support/netns.rs`), made by the test on this machine. An origin
//! serves the repository (`horcrux serve --repo NAME=file://...`); nodes serve what they read
//! through their own cache (`--repo NAME=horcrux://origin/...`, read-through) and mount through
//! each other over mutual TLS, with the real kernel FUSE. The test reads each host's transmit
//! counter to see who sent what.
//!
//! - node 2 reads through node 1: the origin sends the data once, node 1 passes it on;
//! - node 1 is cut off (its link goes down, no reset) in the middle of node 3's read: node 3
//!   falls over to the origin and finishes with the right bytes;
//! - a client with a certificate of another CA is refused; a peer serving corrupted data is
//!   caught by the block hashes, and the bytes come from the origin;
//! - the fleet: eight nodes read the same working set at once, with and without peers; the
//!   origin's egress is reported, and with peers must stay ≤ 1.5× the working set.
//!   `HX_FLEET_MIB` sets the working set (default 64 MiB; `bench/fleet` runs 1 GiB).
//!
//! Needs root, iproute2 and nsenter. Build the binary first: `cargo build --workspace`.

mod common;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/remote.rs"]
mod remote;
#[path = "support/s3server.rs"]
mod s3server;
#[path = "support/sshd.rs"]
mod sshd;

use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use netns::{Host, Net};
use remote::{Access, files_under};

const PORT: u16 = 7443;

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// One CA for the whole network and a certificate per host (for its address), in `dir`.
fn pki(dir: &Path, hosts: &[Host]) {
    let a = Access::default();
    a.ok(&[os("tls"), os("init"), os("--dir"), dir.as_os_str()]);
    for h in hosts {
        a.ok(&[
            os("tls"),
            os("issue"),
            os(&h.name),
            os("--dir"),
            dir.as_os_str(),
            os("--san"),
            os(&h.addr),
        ]);
    }
}

/// horcrux on `host` with its certificate from `tls`.
fn on(host: &Host, tls: &Path) -> Access {
    Access::default()
        .wrapped(host.wrap())
        .flag("--tls-dir")
        .flag(tls)
        .flag("--tls-cert")
        .flag(&host.name)
}

fn url(host: &Host, repo: &str) -> String {
    format!("horcrux://{}:{PORT}/{repo}", host.addr)
}

/// `horcrux serve` on a host, killed on drop.
struct Serve {
    child: Child,
    log: PathBuf,
}

impl Serve {
    fn start(access: &Access, host: &Host, cache: &Path, log: &Path, args: &[&str]) -> Serve {
        let mut c = access.command();
        c.args(["serve", "--listen", &format!("{}:{PORT}", host.addr)])
            .arg("--cache-dir")
            .arg(cache)
            .args(args)
            .args(&access.flags)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(log).unwrap());
        let mut child = c.spawn().expect("start horcrux serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("listening on "),
            "serve on {} printed {line:?}; its log:\n{}",
            host.name,
            fs::read_to_string(log).unwrap_or_default()
        );
        Serve {
            child,
            log: log.to_path_buf(),
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A source tree of `files` random files of `mib` MiB each, generated as volume `amcc` with
/// 1 MiB chunks into `<t>/repo`.
fn repository(t: &Path, files: usize, mib: usize) -> (PathBuf, Vec<Vec<u8>>) {
    let src = t.join("src");
    fs::create_dir_all(&src).unwrap();
    let mut data = Vec::new();
    for i in 0..files {
        let d = bytes(100 + i as u64, mib << 20);
        fs::write(src.join(format!("f{i}")), &d).unwrap();
        data.push(d);
    }
    let repo = t.join("repo");
    Access::default().generate("amcc", &src, &format!("file://{}", repo.display()));
    (repo, data)
}

/// Node 2 reads through node 1 (the origin sends each byte once); node 1 is cut off in the
/// middle of node 3's read, which falls over to the origin and finishes with the right bytes.
#[test]
fn a_node_reads_through_another_and_falls_over_to_the_origin() {
    let t = tempdir();
    let t = t.path();
    let net = Net::new(&["origin", "node1", "node2", "node3"]);
    let tls = t.join("tls");
    pki(&tls, &net.hosts);
    let (repo, data) = repository(t, 2, 24);
    let (origin, n1, n2, n3) = (
        net.host("origin"),
        net.host("node1"),
        net.host("node2"),
        net.host("node3"),
    );
    let _origin = Serve::start(
        &on(origin, &tls),
        origin,
        &t.join("c-origin"),
        &t.join("origin.log"),
        &["--repo", &format!("amcc=file://{}", repo.display())],
    );
    // Node 1 passes on what it reads from the origin; slowly, so node 3 can be cut off from
    // it in the middle of a file.
    let _n1 = Serve::start(
        &on(n1, &tls),
        n1,
        &t.join("c-node1"),
        &t.join("node1.log"),
        &[
            "--repo",
            &format!("amcc={}", url(origin, "amcc")),
            "--bandwidth",
            "8M",
        ],
    );
    let sources = format!("{},{}", url(n1, "amcc"), url(origin, "amcc"));

    let origin_before = origin.tx_bytes();
    let m2 = on(n2, &tls).mount(
        &sources,
        &t.join("m2"),
        &t.join("c-node2"),
        &["--read-only"],
    );
    let t0 = Instant::now();
    assert!(
        fs::read(m2.path("f0")).unwrap() == data[0],
        "node 2 read wrong bytes"
    );
    let took = t0.elapsed();
    let from_origin = origin.tx_bytes() - origin_before;
    let size = data[0].len() as u64;
    eprintln!(
        "node 2 read {} MiB through node 1 in {took:?}; the origin sent {from_origin} B",
        size >> 20
    );
    // Everything came through node 1 (metadata and the manifest came too): the origin sent
    // the data about once, not twice.
    assert!(
        from_origin >= size && from_origin < size + size / 2,
        "origin sent {from_origin} B for a {size} B file"
    );
    assert!(
        m2.log_text().contains(&n1.addr) || !m2.log_text().contains("unhealthy"),
        "{}",
        m2.log_text()
    );

    // Node 3 reads f1 through node 1 (8 MiB/s: ~3 s); node 1 is cut off after 1 s.
    let m3 = on(n3, &tls).mount(
        &sources,
        &t.join("m3"),
        &t.join("c-node3"),
        &["--read-only"],
    );
    let path = m3.path("f1");
    let reader = std::thread::spawn(move || {
        let t0 = Instant::now();
        (fs::read(path), t0.elapsed())
    });
    std::thread::sleep(Duration::from_secs(1));
    n1.cut();
    let (got, took) = reader.join().unwrap();
    let got = got.expect("node 3's read failed after node 1 was cut off");
    assert!(
        got == data[1],
        "node 3 read wrong bytes after the fall-over"
    );
    eprintln!("node 3 read f1 in {took:?}, node 1 cut off after 1 s");
    assert!(
        took < Duration::from_secs(60),
        "the fall-over took {took:?}"
    );
    let log = m3.log_text();
    assert!(log.contains("unhealthy"), "node 3's log:\n{log}");
    n1.reconnect();
}

/// A client whose certificate comes from another CA is refused at the handshake; a peer that
/// serves corrupted chunks is caught by the block hashes and the bytes come from the origin.
#[test]
fn a_foreign_certificate_is_refused_and_a_lying_peer_is_caught() {
    let t = tempdir();
    let t = t.path();
    let net = Net::new(&["origin", "liar", "client"]);
    let tls = t.join("tls");
    pki(&tls, &net.hosts);
    let (repo, data) = repository(t, 1, 4);
    let (origin, liar, client) = (net.host("origin"), net.host("liar"), net.host("client"));
    let _origin = Serve::start(
        &on(origin, &tls),
        origin,
        &t.join("c-origin"),
        &t.join("origin.log"),
        &["--repo", &format!("amcc=file://{}", repo.display())],
    );

    // Another CA, and a certificate of it for the client's own address.
    let evil = t.join("evil");
    let a = Access::default();
    a.ok(&[os("tls"), os("init"), os("--dir"), evil.as_os_str()]);
    a.ok(&[
        os("tls"),
        os("issue"),
        os("client"),
        os("--dir"),
        evil.as_os_str(),
        os("--san"),
        os(&client.addr),
    ]);
    let err = on(client, &evil).fails(&[os("peer"), os("ls"), os(&url(origin, "amcc"))]);
    eprintln!("foreign CA: {err}");
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("handshake"),
        "{err}"
    );

    // The liar serves a copy of the repository with one byte of every chunk flipped.
    let bad = t.join("bad");
    copy_tree(&repo, &bad);
    for f in files_under(&bad.join("chunks")) {
        let mut d = fs::read(&f).unwrap();
        let mid = d.len() / 2;
        d[mid] ^= 0xff;
        fs::write(&f, d).unwrap();
    }
    let liar_serve = Serve::start(
        &on(liar, &tls),
        liar,
        &t.join("c-liar"),
        &t.join("liar.log"),
        &["--repo", &format!("amcc=file://{}", bad.display())],
    );
    let m = on(client, &tls).mount(
        &format!("{},{}", url(liar, "amcc"), url(origin, "amcc")),
        &t.join("m"),
        &t.join("c-client"),
        &["--read-only"],
    );
    assert!(
        fs::read(m.path("f0")).unwrap() == data[0],
        "corrupted bytes were served"
    );
    let log = m.log_text();
    assert!(
        log.contains("verification") && log.contains("unhealthy"),
        "the client's log does not show the liar caught:\n{log}"
    );
    assert!(liar_serve.log_text().len() < 1 << 20);
}

/// Eight nodes read the same working set at once, first each straight from the origin, then
/// through each other (each node serves what it reads; a peers file lists all eight, and
/// rendezvous hashing gives each chunk one node that fetches it from the origin). The origin's
/// egress is printed for both; with peers it must stay ≤ 1.5× the working set.
#[test]
fn a_fleet_of_eight_reads_the_working_set_from_the_origin_about_once() {
    let mib: usize = std::env::var("HX_FLEET_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let t = tempdir();
    let t = t.path();
    let names: Vec<String> = std::iter::once("origin".to_string())
        .chain((1..=8).map(|i| format!("node{i}")))
        .collect();
    let net = Net::new(&names.iter().map(String::as_str).collect::<Vec<_>>());
    let tls = t.join("tls");
    pki(&tls, &net.hosts);
    let (repo, data) = repository(t, 1, mib);
    let set = data[0].len() as u64;
    let origin = net.host("origin");
    let nodes: Vec<&Host> = net.hosts.iter().filter(|h| h.name != "origin").collect();
    let _origin = Serve::start(
        &on(origin, &tls),
        origin,
        &t.join("c-origin"),
        &t.join("origin.log"),
        &["--repo", &format!("amcc=file://{}", repo.display())],
    );

    // Every node mounts and reads the whole file at the same time; returns the origin's egress
    // and the slowest node's time.
    let round = |label: &str,
                 access: &dyn Fn(&Host) -> String,
                 extra: &dyn Fn(&Host) -> Vec<String>| {
        let before = origin.tx_bytes();
        let mounts: Vec<Mount> = nodes
            .iter()
            .map(|n| {
                let extra = extra(n);
                let mut args: Vec<&str> = extra.iter().map(String::as_str).collect();
                args.push("--read-only");
                on(n, &tls).mount(
                    &access(n),
                    &t.join(format!("m-{label}-{}", n.name)),
                    &t.join(format!("c-{label}-{}", n.name)),
                    &args,
                )
            })
            .collect();
        let t0 = Instant::now();
        let readers: Vec<_> = mounts
            .iter()
            .map(|m| {
                let p = m.path("f0");
                std::thread::spawn(move || blake3::hash(&fs::read(p).unwrap()))
            })
            .collect();
        let want = blake3::hash(&data[0]);
        for r in readers {
            assert_eq!(r.join().unwrap(), want, "{label}: a node read wrong bytes");
        }
        let took = t0.elapsed();
        let egress = origin.tx_bytes() - before;
        drop(mounts);
        eprintln!(
            "fleet {label}: 8 nodes read {mib} MiB each in {:.1}s; origin egress {:.1} MiB = {:.2}x the working set",
            took.as_secs_f64(),
            egress as f64 / (1 << 20) as f64,
            egress as f64 / set as f64
        );
        egress
    };

    let direct = round("without-peers", &|_| url(origin, "amcc"), &|_| Vec::new());

    // Each node serves what it reads, read-through its cache (the one its mount uses).
    let peers_file = t.join("peers");
    fs::write(
        &peers_file,
        nodes
            .iter()
            .map(|n| format!("{}:{PORT}\n", n.addr))
            .collect::<String>(),
    )
    .unwrap();
    let _serves: Vec<Serve> = nodes
        .iter()
        .map(|n| {
            Serve::start(
                &on(n, &tls),
                n,
                &t.join(format!("c-with-peers-{}", n.name)),
                &t.join(format!("{}.log", n.name)),
                &["--repo", &format!("amcc={}", url(origin, "amcc"))],
            )
        })
        .collect();
    let with_peers = round("with-peers", &|_| url(origin, "amcc"), &|_| {
        vec!["--peers-file".into(), peers_file.display().to_string()]
    });
    assert!(
        direct >= 7 * set,
        "without peers every node should read from the origin: {direct} B"
    );
    assert!(
        with_peers as f64 <= 1.5 * set as f64,
        "with peers the origin sent {with_peers} B = {:.2}x the working set (target <= 1.5x)",
        with_peers as f64 / set as f64
    );
}

fn copy_tree(src: &Path, dst: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(dst)
        .status()
        .unwrap();
    assert!(st.success());
}

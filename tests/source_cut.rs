//! A source cut off in the middle of a transfer, across hosts: an OpenSSH server runs on one
//! network namespace ("host"), horcrux on another, and the test pulls the cable
//! (`netns::Host::cut`: the switch port goes down, packets are lost, no connection is reset),
//! then puts it back. The sending host's link is slowed with a token bucket so the transfer is
//! surely in flight when the cut comes.
//!
//! - a large cold read through a mount whose only source is cut: the reader gets EIO within
//!   the mount's `--timeout` bound (asserted), and once the link is back the same read
//!   succeeds on the same mount, with the right bytes;
//! - the same with a second SSH server as a mirror: the reader falls over to it and never
//!   sees an error; both servers' SFTP logs show who served what;
//! - a `horcrux push` cut in the middle: a clear error in bounded time, the remote's branch
//!   not moved and the new commit not there (nothing half-visible), and the next push sends
//!   only the chunks that had not arrived (counted at the remote) and moves the branch.
//!
//! Needs root, iproute2 (ip, tc) and nsenter. Build the binary first: `cargo build --workspace`.

mod common;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/remote.rs"]
mod remote;
#[path = "support/s3server.rs"]
mod s3server;
#[path = "support/sshd.rs"]
mod sshd;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use netns::{Host, Net};
use remote::{Access, files_under, within};
use sshd::{Sshd, SshdOptions};

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// An sshd on `host` that logs every SFTP request.
fn sshd_on(host: &Host) -> Sshd {
    Sshd::start_with(SshdOptions {
        addr: Some(host.addr.clone()),
        wrap: host.wrap(),
        sftp_log: true,
    })
}

/// horcrux on `host`, logging in to `s`.
fn on(host: &Host, s: &Sshd) -> Access {
    Access::ssh(s).wrapped(host.wrap())
}

/// A volume `vol` with one file `big` of `mib` MiB (1 MiB chunks) generated into `repo`.
fn repository(t: &Path, repo: &Path, mib: u64) -> Vec<u8> {
    let src = t.join("src");
    fs::create_dir_all(&src).unwrap();
    let data = bytes(31, (mib * MIB) as usize);
    fs::write(src.join("big"), &data).unwrap();
    fs::write(src.join("small"), b"small\n").unwrap();
    generate("vol", &src, repo);
    data
}

/// Read `path` as `cat` does (1 MiB `read`s through the page cache), counting the bytes read
/// in `progress`.
fn read_all(path: &Path, progress: &AtomicU64) -> std::io::Result<Vec<u8>> {
    let mut f = fs::File::open(path)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
        progress.fetch_add(n as u64, Ordering::SeqCst);
    }
}

/// Bytes of `file` the server was asked for.
fn asked(s: &Sshd, file: &str) -> u64 {
    s.sftp_reads()
        .iter()
        .filter(|r| r.path.contains(file))
        .map(|r| r.len)
        .sum()
}

/// Start `read_all` of `path` on a thread; cut `host` off once `at` bytes were read. Returns
/// the reader's result, when it ended relative to the cut, and the bytes read at the cut.
fn read_and_cut(
    path: PathBuf,
    host: &Host,
    at: u64,
    limit: Duration,
) -> (std::io::Result<Vec<u8>>, Duration, u64) {
    let progress = Arc::new(AtomicU64::new(0));
    let p = progress.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = read_all(&path, &p);
        let _ = tx.send((r, Instant::now()));
    });
    assert!(
        wait_until(Duration::from_secs(60), || progress.load(Ordering::SeqCst)
            >= at),
        "the reader did not get {at} bytes in 60 s"
    );
    host.cut();
    let cut_at = Instant::now();
    let read_at_cut = progress.load(Ordering::SeqCst);
    let (r, ended) = rx
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("the reader hung for {limit:?} after the cut"));
    (r, ended.saturating_duration_since(cut_at), read_at_cut)
}

/// The only source is cut off in the middle of a large cold read: EIO within the bound, and
/// the same read succeeds on the same mount once the link is back.
#[test]
fn a_cut_source_gives_eio_within_the_timeout_and_the_same_read_succeeds_after_reconnect() {
    let t = tempdir();
    let t = t.path();
    let net = Net::new(&["origin", "client"]);
    let (origin, client) = (net.host("origin"), net.host("client"));
    let s = sshd_on(origin);
    let repo = s.dir().join("repo");
    let data = repository(t, &repo, 48);
    // ~5 MB/s out of the origin: the 48 MiB read takes about 10 s.
    origin.limit_rate("40mbit");
    // The mirror attempt timeout (timeout / 2) must cover a block's wait for one of the four
    // SSH sessions behind the reads in flight (16 × 1 MiB at 5 MB/s: ~3 s), or reads on this
    // slow link time out while queued.
    let timeout = 10u64;
    let m = on(client, &s).mount(
        &s.url(&repo),
        &t.join("mnt"),
        &t.join("cache"),
        &["--read-only", "--timeout", &timeout.to_string()],
    );
    let file = m.path("big");

    let (r, after_cut, at_cut) = read_and_cut(
        file.clone(),
        origin,
        4 * MIB,
        Duration::from_secs(10 * timeout),
    );
    let e = r.expect_err("a read from a source cut off must fail");
    eprintln!(
        "cut after {} MiB read: {e} {after_cut:?} after the cut ({timeout} s timeout)",
        at_cut >> 20
    );
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        at_cut < data.len() as u64,
        "the read was over before the cut"
    );
    // A block already asked for waits at most `timeout`; the kernel retries the failed page
    // once synchronously, which waits at most `timeout` again. Some slack for a loaded machine.
    let bound = Duration::from_secs(2 * timeout + 5);
    assert!(
        after_cut <= bound,
        "EIO came {after_cut:?} after the cut (bound {bound:?})"
    );
    // Nothing is served from the cut source meanwhile, but what is cached still reads.
    let head = read_direct_ok(&file, 0, MIB as usize);
    assert!(head == data[..MIB as usize], "cached bytes changed");

    origin.reconnect();
    let back = Instant::now();
    let again = within(Duration::from_secs(120), move || {
        read_all(&file, &AtomicU64::new(0))
    })
    .expect("the read after the reconnect hung")
    .0
    .expect("the same read fails after the link came back");
    eprintln!(
        "the same read succeeded {:?} after the reconnect",
        back.elapsed()
    );
    assert!(again == data, "wrong bytes after the reconnect");
    let log = m.log_text();
    assert!(
        log.contains(&origin.addr),
        "the daemon's log does not name the source that failed:\n{log}"
    );
    m.unmount();
}

/// A `read_at` with O_DIRECT (one FUSE read) of `len` bytes at `off`, bounded by 20 s.
fn read_direct_ok(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let (r, _) = remote::read_direct_bounded(path, off, len, Duration::from_secs(20));
    r.unwrap_or_else(|e| panic!("read of {len} at {off} failed: {e}"))
}

/// The first of two sources is cut off in the middle of a large cold read: the reader falls
/// over to the mirror and finishes with the right bytes, never seeing an error.
#[test]
fn a_cut_source_falls_over_to_the_mirror_mid_read() {
    let t = tempdir();
    let t = t.path();
    let net = Net::new(&["origin", "mirror", "client"]);
    let (origin, mirror, client) = (net.host("origin"), net.host("mirror"), net.host("client"));
    let s1 = sshd_on(origin);
    let s2 = sshd_on(mirror);
    let repo = t.join("repo");
    let data = repository(t, &repo, 48);
    origin.limit_rate("40mbit");
    // Both servers serve the same directory; the client trusts both host keys and logs in
    // with the first server's key, which the second authorizes too.
    s2.authorize(&s1.client_key);
    let known = t.join("known_hosts");
    fs::write(
        &known,
        fs::read_to_string(&s1.known_hosts).unwrap()
            + &fs::read_to_string(&s2.known_hosts).unwrap(),
    )
    .unwrap();
    let access = Access::default()
        .wrapped(client.wrap())
        .flag("--identity")
        .flag(&s1.client_key)
        .flag("--known-hosts")
        .flag(&known);
    let m = access.mount(
        &format!("{},{}", s1.url(&repo), s2.url(&repo)),
        &t.join("mnt"),
        &t.join("cache"),
        &["--read-only", "--timeout", "10"],
    );
    let (r, after_cut, at_cut) =
        read_and_cut(m.path("big"), origin, 4 * MIB, Duration::from_secs(120));
    let got = r.expect("the read failed although a mirror was there");
    eprintln!(
        "cut after {} MiB; the read finished on the mirror {after_cut:?} later",
        at_cut >> 20
    );
    assert!(got == data, "wrong bytes after the fall-over");
    assert!(
        at_cut < data.len() as u64,
        "the read was over before the cut"
    );
    let (from_origin, from_mirror) = (asked(&s1, "/chunks/"), asked(&s2, "/chunks/"));
    eprintln!(
        "chunk bytes asked of the origin: {} MiB, of the mirror: {} MiB",
        from_origin >> 20,
        from_mirror >> 20
    );
    assert!(from_origin > 0, "the origin served nothing before the cut");
    assert!(from_mirror > 0, "the mirror served nothing after the cut");
    let log = m.log_text();
    assert!(
        log.contains("using the next mirror"),
        "no fall-over in the daemon's log:\n{log}"
    );
    origin.reconnect();
    m.unmount();
}

/// `horcrux commit -m MSG MP`; returns the new commit's hex id (from `status --json`).
fn commit(mp: &Path, msg: &str) -> String {
    horcrux_ok(&[os("commit"), os("-m"), os(msg), mp.as_os_str()]);
    let out = horcrux_ok(&[os("status"), os("--json"), mp.as_os_str()]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v["base_commit"].as_str().unwrap().to_string()
}

/// The commit a branch of a repository directory names.
fn head(repo: &Path, branch: &str) -> String {
    fs::read_to_string(repo.join(format!("volumes/vol/refs/heads/{branch}")))
        .unwrap()
        .trim()
        .to_string()
}

fn chunk_names(repo: &Path) -> BTreeSet<String> {
    files_under(&repo.join("chunks"))
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// A push whose link is cut in the middle fails clearly and leaves the remote's branch where
/// it was; the next push resumes, sending only what had not arrived.
#[test]
fn a_push_cut_mid_way_fails_clearly_moves_nothing_and_resumes() {
    let t = tempdir();
    let t = t.path();
    let net = Net::new(&["remote", "client"]);
    let (remote_host, client) = (net.host("remote"), net.host("client"));
    let s = sshd_on(remote_host);
    let origin = t.join("origin");
    repository(t, &origin, 2);
    // The mount and its origin are local; only the push goes over the network.
    let a = Mount::new(&origin, &t.join("a"), &t.join("ca"), &[]);
    let remote_dir = s.dir().join("remote");
    let remote_url = s.url(&remote_dir);
    let push = |expect_ok: bool| {
        let out = on(client, &s).run(&[
            os("push"),
            os(&remote_url),
            os("--json"),
            a.mountpoint.as_os_str(),
        ]);
        assert_eq!(
            out.status.success(),
            expect_ok,
            "push: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    push(true);
    let base = head(&remote_dir, "main");
    let before = chunk_names(&remote_dir);

    // 32 MiB of new data: 32 new chunks; at 40 Mbit/s the push takes about 7 s.
    let new = bytes(77, (32 * MIB) as usize);
    let f = fs::File::create(a.path("new")).unwrap();
    f.write_all_at(&new, 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let c = commit(&a.mountpoint, "32 MiB");
    let new_chunks: BTreeSet<String> = chunk_names(&origin).difference(&before).cloned().collect();
    assert_eq!(
        new_chunks.len(),
        32,
        "the commit should have made 32 new chunks"
    );
    client.limit_rate("40mbit");

    let remote_for_thread = remote_dir.clone();
    let progress = move || chunk_names(&remote_for_thread).len();
    let pushing = {
        let (client, s, remote_url, mp) = (
            client.clone(),
            Access::ssh(&s),
            remote_url.clone(),
            a.mountpoint.clone(),
        );
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let out = s.wrapped(client.wrap()).run(&[
                os("push"),
                os(&remote_url),
                os("--json"),
                mp.as_os_str(),
            ]);
            (out, t0.elapsed())
        })
    };
    assert!(
        wait_until(Duration::from_secs(60), || progress() >= before.len() + 4),
        "the push sent nothing in 60 s"
    );
    client.cut();
    let cut_at = Instant::now();
    let (out, _) = pushing.join().unwrap();
    let failed_after = cut_at.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("push after the cut ({failed_after:?}): {stderr}");
    assert!(
        !out.status.success(),
        "the push succeeded although its link was cut"
    );
    assert!(
        failed_after < Duration::from_secs(180),
        "the push took {failed_after:?} to give up after the cut"
    );
    assert!(
        stderr.contains(&remote_host.addr) && stderr.contains("push again"),
        "the error does not name the remote or say what to do: {stderr}"
    );
    // Nothing half-visible: the branch has not moved and the commit is not there.
    assert_eq!(head(&remote_dir, "main"), base, "the branch moved");
    assert!(
        !remote_dir.join("commits").join(&c).exists(),
        "the commit reached the remote without its data"
    );
    let arrived: BTreeSet<String> = chunk_names(&remote_dir)
        .intersection(&new_chunks)
        .cloned()
        .collect();
    eprintln!("{} of 32 new chunks arrived before the cut", arrived.len());
    assert!(
        !arrived.is_empty() && arrived.len() < 32,
        "{} chunks arrived",
        arrived.len()
    );

    client.reconnect();
    // What the cut connection had sent into the link's queue lands once the link is back (the
    // server's end of it is still open): CI saw a fifth chunk renamed into place after the
    // count above. Count again once the remote has been still for a second.
    let arrived_count = || chunk_names(&remote_dir).intersection(&new_chunks).count();
    let mut arrived_now = arrived_count();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(1));
        let n = arrived_count();
        if n == arrived_now {
            break;
        }
        arrived_now = n;
    }
    if arrived_now != arrived.len() {
        eprintln!("{arrived_now} of 32 new chunks there once the link was back");
    }
    let out = push(true);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("resumed push: {v}");
    let copied = v["chunks_copied"].as_u64().unwrap();
    assert_eq!(
        copied,
        (32 - arrived_now) as u64,
        "the resumed push should send exactly the chunks that had not arrived"
    );
    assert_eq!(head(&remote_dir, "main"), c, "the branch did not move");
    assert!(chunk_names(&remote_dir).is_superset(&new_chunks));

    // The remote is whole: it verifies, and a mount of it reads the new file.
    horcrux_ok(&[os("verify"), os(&url(&remote_dir))]);
    let b = Mount::new(&remote_dir, &t.join("b"), &t.join("cb"), &["--read-only"]);
    assert!(
        fs::read(b.path("new")).unwrap() == new,
        "the pushed file differs"
    );
    b.unmount();
    a.unmount();
}

//! The fault matrix, `kill -9` (issue 9): the mount daemon, the Docker plugin and the peer
//! server, each killed at a random moment of a workload, over and over. After each kill the
//! process is restarted (or the volume remounted) and the test asserts that nothing
//! acknowledged is lost and nothing unverified is served:
//!
//! - mount daemon, during reads, writes + fsync, or commits: every fsync-acknowledged byte
//!   and every acknowledged commit is there after the remount, the cache index is consistent
//!   (`horcrux cache verify`: no bad block, no missing file), every read ever answered returned
//!   the right bytes, and the repository verifies (`horcrux verify`);
//! - plugin, during Create/Mount/Unmount requests and writes in the volumes: every
//!   acknowledged volume is listed, every acknowledged mount is live again, every fsync'd file
//!   reads back, once every ID is unmounted nothing stays mounted, and the volumes' cache is
//!   consistent;
//! - peer server (`horcrux serve`, reading through its cache from an origin), during reads of
//!   a mount that has only that peer: reads answer right bytes or an error within a bound,
//!   never wrong bytes, never hang; the server's cache is consistent after the kill; the same
//!   mount reads again once the server is restarted on its port.
//!
//! Trials per test: `HX_KILL_TRIALS` (default 3, enough for CI; `HX_KILL_TRIALS=100` by hand).
//! Kill times come from a seeded generator; the seed is printed and `HX_KILL_SEED=N` replays
//! it. Run as root (FUSE); build first (`cargo build --workspace`).

mod common;
#[path = "support/peer.rs"]
mod peer;
mod plugin_support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use peer::*;
use plugin_support::*;
use serde_json::json;

fn trials() -> usize {
    std::env::var("HX_KILL_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// The seed of this run (printed, so a failure can be replayed with `HX_KILL_SEED`).
fn seeded(what: &str) -> Rng {
    let seed = std::env::var("HX_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!(
        "kill matrix ({what}): {} trials, seed {seed} (replay: HX_KILL_SEED={seed})",
        trials()
    );
    Rng(seed | 1)
}

/// `horcrux cache verify`: the index must be consistent after a kill — no block that fails
/// its hash, no row without its file, no bad manifest. (Orphan files, a file whose row a
/// kill prevented, are expected and removed.)
fn assert_cache_consistent(cache: &Path, when: &str) {
    let out = horcrux_ok(&[
        "cache".as_ref(),
        "verify".as_ref(),
        "--cache-dir".as_ref(),
        cache.as_os_str(),
    ]);
    assert!(
        out.contains("0 bad blocks dropped, 0 missing files, 0 bad manifests"),
        "{when}: cache verify found damage:\n{out}"
    );
}

/// What the workload threads saw.
#[derive(Debug, Default)]
struct Seen {
    /// Wrong bytes served: always a failure.
    wrong: Vec<String>,
    /// Errors before the kill: a failure.
    errors: Vec<String>,
    reads: u64,
}

/// Readers of files whose bytes are known: random ranges, O_DIRECT (so each read reaches the
/// daemon), until `stop`. An error is allowed once `killed` is set.
fn spawn_readers(
    n: usize,
    files: Vec<(PathBuf, Arc<Vec<u8>>)>,
    seed: u64,
    seen: Arc<Mutex<Seen>>,
    killed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..n)
        .map(|t| {
            let (files, seen, killed, stop) =
                (files.clone(), seen.clone(), killed.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = Rng((seed ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1);
                while !stop.load(Ordering::SeqCst) {
                    let (p, want) = &files[rng.below(files.len() as u64) as usize];
                    let off = rng.below(want.len() as u64) & !4095;
                    let len = (4096 + rng.below(MIB)) as usize;
                    let end = (off as usize + len).min(want.len());
                    let t0 = Instant::now();
                    match read_direct(p, off, len) {
                        Ok(got) => {
                            let mut s = seen.lock().unwrap();
                            s.reads += 1;
                            if got != want[off as usize..end] {
                                s.wrong.push(format!(
                                    "{}: {len} bytes at {off}: wrong bytes",
                                    p.display()
                                ));
                            }
                        }
                        Err(e) if !killed.load(Ordering::SeqCst) => {
                            seen.lock().unwrap().errors.push(format!(
                                "{}: read at {off}: {e} (after {:?})",
                                p.display(),
                                t0.elapsed()
                            ));
                            return;
                        }
                        Err(_) => {
                            // The process is gone: a reader must not hang on it.
                            if t0.elapsed() > Duration::from_secs(60) {
                                seen.lock().unwrap().errors.push(format!(
                                    "{}: a read hung {:?} after the kill",
                                    p.display(),
                                    t0.elapsed()
                                ));
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })
        })
        .collect()
}

const SLOT: usize = 64 * 1024;

fn slot_data(trial: usize, slot: usize) -> Vec<u8> {
    bytes((trial as u64) << 32 | slot as u64, SLOT)
}

#[test]
fn kill_9_mount_daemon_at_random_points() {
    let mut rng = seeded("mount daemon");
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("ro")).unwrap();
    fs::create_dir_all(src.join("w")).unwrap();
    let ro: Vec<Arc<Vec<u8>>> = (0..3)
        .map(|i| Arc::new(bytes(10 + i, 3 * MIB as usize + 1000 * i as usize)))
        .collect();
    for (i, d) in ro.iter().enumerate() {
        fs::write(src.join(format!("ro/r{i}")), &d[..]).unwrap();
    }
    let repo = t.path().join("repo");
    generate("kill", &src, &repo);
    let cache = t.path().join("cache");
    let overlay = t.path().join("overlay");
    let mnt = t.path().join("mnt");
    let mount = || Foreground::new(&repo, &mnt, &cache, &overlay_args(&overlay, &[]));

    // Acknowledged so far, over all trials: (trial, slot) written and fsync'd; commits.
    let acked: Arc<Mutex<BTreeSet<(usize, usize)>>> = Arc::default();
    let commits: Arc<Mutex<Vec<String>>> = Arc::default();
    let phases = ["reads", "writes+fsync", "commits"];
    let mut fg = mount();
    for trial in 0..trials() {
        let phase = phases[if trials() <= 3 {
            trial % 3
        } else {
            rng.below(3) as usize
        }];
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let killed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let files: Vec<_> = ro
            .iter()
            .enumerate()
            .map(|(i, d)| (fg.mountpoint.join(format!("ro/r{i}")), d.clone()))
            .collect();
        let mut threads = spawn_readers(
            2,
            files,
            rng.next(),
            seen.clone(),
            killed.clone(),
            stop.clone(),
        );
        if phase != "reads" {
            let (root, acked, killed, seen) = (
                fg.mountpoint.clone(),
                acked.clone(),
                killed.clone(),
                seen.clone(),
            );
            let every = 1 + rng.below(4) as usize;
            threads.push(std::thread::spawn(move || {
                let r = (|| -> std::io::Result<()> {
                    let f = OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(root.join(format!("w/t{trial}")))?;
                    let mut pending = Vec::new();
                    // At most 8 MiB per trial: a run of 100 trials stays small.
                    for slot in 0..128 {
                        f.write_all_at(&slot_data(trial, slot), (slot * SLOT) as u64)?;
                        pending.push(slot);
                        if pending.len() >= every {
                            f.sync_data()?;
                            let mut a = acked.lock().unwrap();
                            a.extend(pending.drain(..).map(|s| (trial, s)));
                        }
                    }
                    f.sync_data()?;
                    acked
                        .lock()
                        .unwrap()
                        .extend(pending.drain(..).map(|s| (trial, s)));
                    Ok(())
                })();
                if let Err(e) = r {
                    if !killed.load(Ordering::SeqCst) {
                        seen.lock().unwrap().errors.push(format!("writer: {e}"));
                    }
                }
            }));
        }
        if phase == "commits" {
            let (root, commits, killed, seen) = (
                fg.mountpoint.clone(),
                commits.clone(),
                killed.clone(),
                seen.clone(),
            );
            threads.push(std::thread::spawn(move || {
                for k in 0.. {
                    let o = horcrux(&[
                        "commit".as_ref(),
                        "-m".as_ref(),
                        format!("trial {trial} commit {k}").as_ref(),
                        root.as_os_str(),
                    ]);
                    let out = String::from_utf8_lossy(&o.stdout);
                    if o.status.success() {
                        if let Some(id) = out.split_whitespace().nth(1) {
                            commits.lock().unwrap().push(id.to_string());
                        }
                    } else if String::from_utf8_lossy(&o.stderr).contains("nothing to commit") {
                        // The writer is done or between writes.
                    } else {
                        if !killed.load(Ordering::SeqCst) {
                            seen.lock().unwrap().errors.push(format!(
                                "commit: {out}{}",
                                String::from_utf8_lossy(&o.stderr)
                            ));
                        }
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }));
        }
        let delay = 200 + rng.below(2500);
        std::thread::sleep(Duration::from_millis(delay));
        let log_before = fg.log_text();
        killed.store(true, Ordering::SeqCst);
        let st = fg.stop(libc::SIGKILL);
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(libc::SIGKILL),
            "daemon exit status {st:?}"
        );
        stop.store(true, Ordering::SeqCst);
        lazy_unmount(&fg.mountpoint);
        for th in threads {
            th.join().expect("workload thread panicked");
        }
        drop(fg);
        let s = seen.lock().unwrap();
        assert!(
            s.wrong.is_empty() && s.errors.is_empty(),
            "trial {trial} ({phase}, kill after {delay} ms): wrong bytes {:?}, errors {:?}\nlog:\n{log_before}",
            s.wrong,
            s.errors
        );
        eprintln!(
            "trial {trial}: {phase}, killed after {delay} ms, {} reads, {} acknowledged slots, {} commits",
            s.reads,
            acked.lock().unwrap().len(),
            commits.lock().unwrap().len()
        );
        drop(s);
        assert_cache_consistent(&cache, &format!("trial {trial} ({phase})"));
        // Empty the cache sometimes, so later trials fetch and insert again.
        if rng.below(2) == 0 {
            horcrux_ok(&[
                "cache".as_ref(),
                "prune".as_ref(),
                "--max-size".as_ref(),
                "0".as_ref(),
                "--cache-dir".as_ref(),
                cache.as_os_str(),
            ]);
        }

        // Remount: every acknowledged slot and commit is there, every base byte right.
        fg = mount();
        let root = fg.mountpoint.clone();
        let mut bad = Vec::new();
        let mut contents: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
        // This trial's file and one earlier trial's; all of them after the last trial (reading
        // everything every time would make 100 trials quadratic).
        let earlier = rng.below(trial as u64 + 1) as usize;
        let last = trial + 1 == trials();
        let checked = |tr: usize| last || tr == trial || tr == earlier;
        for &(tr, slot) in acked.lock().unwrap().iter().filter(|(tr, _)| checked(*tr)) {
            let c = contents
                .entry(tr)
                .or_insert_with(|| fs::read(root.join(format!("w/t{tr}"))).unwrap_or_default());
            if c.get(slot * SLOT..(slot + 1) * SLOT) != Some(&slot_data(tr, slot)[..]) {
                bad.push(format!("w/t{tr} slot {slot}: acknowledged, lost"));
            }
        }
        for (i, d) in ro.iter().enumerate() {
            match read_direct(&root.join(format!("ro/r{i}")), 0, d.len()) {
                Ok(got) if got == **d => {}
                Ok(_) => bad.push(format!("ro/r{i}: wrong bytes after remount")),
                Err(e) => bad.push(format!("ro/r{i}: {e}")),
            }
        }
        let log = horcrux(&["log".as_ref(), root.as_os_str()]);
        let log = String::from_utf8_lossy(&log.stdout).into_owned();
        for c in commits.lock().unwrap().iter() {
            if !log.contains(&c[..12.min(c.len())]) {
                bad.push(format!("commit {c}: acknowledged, not in the log"));
            }
        }
        assert!(
            bad.is_empty(),
            "after kill -9 in trial {trial} ({phase}) and remount:\n{}\nlog before the kill:\n{log_before}\nlog after:\n{}",
            bad.join("\n"),
            fg.log_text()
        );
    }
    drop(fg);
    // Every commit the kills left behind is whole.
    horcrux_ok(&["verify".as_ref(), url(&repo).as_ref()]);
}

#[test]
fn kill_9_plugin_at_random_points() {
    let mut rng = seeded("plugin");
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"base file\n").unwrap();
    let repo = t.path().join("repo");
    generate("vol", &src, &repo);
    let access = url(&repo);
    let mut p = Plugin::start(&t.path().join("p.sock"), &t.path().join("state"));

    #[derive(Debug, Default)]
    struct Model {
        created: BTreeSet<String>,
        /// Acknowledged Mount IDs not unmounted since, per volume.
        mounted: BTreeMap<String, BTreeSet<String>>,
        /// Every ID a Mount was sent with (acknowledged or not), per volume.
        ids: BTreeMap<String, BTreeSet<String>>,
        /// Files written and fsync'd in a volume: (volume, name) -> content.
        files: BTreeMap<(String, String), Vec<u8>>,
        steps: u64,
    }
    let model: Arc<Mutex<Model>> = Arc::default();
    for trial in 0..trials() {
        let stop = Arc::new(AtomicBool::new(false));
        let client = {
            let (model, stop, access) = (model.clone(), stop.clone(), access.clone());
            let socket = p.socket.clone();
            std::thread::spawn(move || {
                // A client of its own (the Plugin guard stays with the test).
                let call = |ep: &str, body: String| -> Option<serde_json::Value> {
                    let mut s = std::os::unix::net::UnixStream::connect(&socket).ok()?;
                    s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
                    let head = format!(
                        "POST {ep} HTTP/1.1\r\nHost: plugin\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    s.write_all(head.as_bytes()).ok()?;
                    s.write_all(body.as_bytes()).ok()?;
                    let mut out = Vec::new();
                    std::io::Read::read_to_end(&mut s, &mut out).ok()?;
                    // Cut off by the kill: no (whole) answer.
                    let (st, b) = try_parse_response(&out)?;
                    let v: serde_json::Value = serde_json::from_slice(&b).ok()?;
                    assert_eq!(
                        (st, v["Err"].as_str().unwrap_or("")),
                        (200, ""),
                        "{ep} {body}: {v}"
                    );
                    Some(v)
                };
                for k in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let vol = format!("v{trial}-{k}");
                    let create = json!({"Name": vol, "Opts": {"access": access}}).to_string();
                    if call("/VolumeDriver.Create", create).is_none() {
                        return;
                    }
                    model.lock().unwrap().created.insert(vol.clone());
                    for id in ["a", "b"] {
                        model
                            .lock()
                            .unwrap()
                            .ids
                            .entry(vol.clone())
                            .or_default()
                            .insert(id.to_string());
                        let Some(v) = call(
                            "/VolumeDriver.Mount",
                            json!({"Name": vol, "ID": id}).to_string(),
                        ) else {
                            return;
                        };
                        let mut m = model.lock().unwrap();
                        m.mounted
                            .entry(vol.clone())
                            .or_default()
                            .insert(id.to_string());
                        m.steps += 1;
                        drop(m);
                        let mp = PathBuf::from(v["Mountpoint"].as_str().unwrap());
                        let content = format!("{vol} {id}\n").into_bytes();
                        let name = format!("file-{id}");
                        let mut f = File::create(mp.join(&name)).unwrap();
                        f.write_all(&content).unwrap();
                        f.sync_all().unwrap();
                        model
                            .lock()
                            .unwrap()
                            .files
                            .insert((vol.clone(), name), content);
                    }
                    if call(
                        "/VolumeDriver.Unmount",
                        json!({"Name": vol, "ID": "a"}).to_string(),
                    )
                    .is_none()
                    {
                        return;
                    }
                    model
                        .lock()
                        .unwrap()
                        .mounted
                        .entry(vol.clone())
                        .or_default()
                        .remove("a");
                    if call("/VolumeDriver.List", String::new()).is_none() {
                        return;
                    }
                }
            })
        };
        let delay = 50 + rng.below(1500);
        std::thread::sleep(Duration::from_millis(delay));
        p.kill9();
        stop.store(true, Ordering::SeqCst);
        client.join().expect("plugin client panicked");
        p.restart();

        let m = model.lock().unwrap();
        eprintln!(
            "trial {trial}: plugin killed after {delay} ms; {} volumes, {} mounts acknowledged so far",
            m.created.len(),
            m.steps
        );
        let listed = p.ok("/VolumeDriver.List", "");
        let names: BTreeSet<String> = listed["Volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["Name"].as_str().unwrap().to_string())
            .collect();
        for v in &m.created {
            assert!(
                names.contains(v),
                "trial {trial}: volume {v} was acknowledged, not listed after restart; log:\n{}",
                p.log_text()
            );
        }
        for (vol, ids) in &m.mounted {
            if ids.is_empty() {
                continue;
            }
            let mp = p.ok("/VolumeDriver.Path", &json!({"Name": vol}).to_string());
            let mp = PathBuf::from(mp["Mountpoint"].as_str().unwrap_or(""));
            assert!(
                eventually(30, || is_mounted(&mp)),
                "trial {trial}: {vol} mounted for {ids:?} before the kill, not after the restart; log:\n{}",
                p.log_text()
            );
        }
        // Volumes of this trial, and of one earlier trial (older ones were checked in their
        // own trial; checking them all would make 100 trials quadratic).
        let mine = format!("v{trial}-");
        let earlier = format!("v{}-", rng.below(trial as u64 + 1));
        let checked = |v: &str| v.starts_with(&mine) || v.starts_with(&earlier);
        for ((vol, name), content) in m.files.iter().filter(|((v, _), _)| checked(v)) {
            let v = p.ok(
                "/VolumeDriver.Mount",
                &json!({"Name": vol, "ID": "check"}).to_string(),
            );
            let mp = PathBuf::from(v["Mountpoint"].as_str().unwrap());
            assert_eq!(
                fs::read(mp.join(name)).ok().as_ref(),
                Some(content),
                "trial {trial}: {vol}/{name} fsync'd, lost after the kill"
            );
            p.ok(
                "/VolumeDriver.Unmount",
                &json!({"Name": vol, "ID": "check"}).to_string(),
            );
        }
        // Every ID this trial sent unmounted (unknown ones are tolerated): nothing stays
        // mounted, so no mount was leaked by a request the kill interrupted. Volumes of
        // earlier trials were unmounted then: the restart must not have mounted them again.
        for (vol, ids) in &m.ids {
            if !vol.starts_with(&mine) {
                let mp = p.state.join("volumes").join(vol).join("mnt");
                assert!(
                    !is_mounted(&mp),
                    "trial {trial}: {vol}, unmounted in an earlier trial, mounted again by the restart"
                );
                continue;
            }
            for id in ids {
                p.ok(
                    "/VolumeDriver.Unmount",
                    &json!({"Name": vol, "ID": id}).to_string(),
                );
            }
            let mp = p.state.join("volumes").join(vol).join("mnt");
            assert!(
                eventually(10, || !is_mounted(&mp)),
                "trial {trial}: {vol} still mounted with every ID unmounted (leaked); log:\n{}",
                p.log_text()
            );
        }
        drop(m);
        model.lock().unwrap().mounted.clear();
        // The volumes' shared cache (`<state>/cache`) is consistent.
        assert_cache_consistent(
            &p.state.join("cache"),
            &format!("plugin cache, trial {trial}"),
        );
    }
}

#[test]
fn kill_9_peer_server_at_random_points() {
    let mut rng = seeded("peer server");
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let big = Arc::new(bytes(91, 16 * MIB as usize));
    fs::write(src.join("big"), &big[..]).unwrap();
    let origin = t.path().join("origin");
    generate("vol", &src, &origin);
    let tls = t.path().join("tls");
    pki(&tls);
    let serve_cache = t.path().join("serve-cache");
    // Read-through: the server fetches from the origin into its cache while it serves.
    let mut serve = Serve::start(
        &tls,
        &serve_cache,
        &t.path().join("serve.log"),
        &[
            "--repo",
            &format!("amcc={}", url(&origin)),
            "--bandwidth",
            "16M",
        ],
    );
    for trial in 0..trials() {
        // A fresh client cache each trial, so reads reach the server.
        let ccache = t.path().join(format!("cache-{trial}"));
        let m = PeerMount::new(
            &tls,
            &serve.url("amcc"),
            &t.path().join(format!("mnt-{trial}")),
            &ccache,
            &["--timeout", "5"],
        );
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let killed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let readers = spawn_readers(
            3,
            vec![(m.path("big"), big.clone())],
            rng.next(),
            seen.clone(),
            killed.clone(),
            stop.clone(),
        );
        let delay = 100 + rng.below(2000);
        std::thread::sleep(Duration::from_millis(delay));
        killed.store(true, Ordering::SeqCst);
        serve.kill();
        // Its cache is consistent after the kill, whatever it was inserting.
        assert_cache_consistent(&serve_cache, &format!("serve cache, trial {trial}"));
        // Empty it sometimes, so later trials make the server fetch and insert again.
        if rng.below(2) == 0 {
            horcrux_ok(&[
                "cache".as_ref(),
                "prune".as_ref(),
                "--max-size".as_ref(),
                "0".as_ref(),
                "--cache-dir".as_ref(),
                serve_cache.as_os_str(),
            ]);
        }
        std::thread::sleep(Duration::from_millis(rng.below(1000)));
        serve.restart();
        // The same mount reads again (its only mirror was set aside for a while).
        let back = wait_until(Duration::from_secs(60), || {
            read_direct(&m.path("big"), 0, big.len()).is_ok_and(|b| b == *big)
        });
        stop.store(true, Ordering::SeqCst);
        for r in readers {
            r.join().expect("reader panicked");
        }
        let s = seen.lock().unwrap();
        eprintln!(
            "trial {trial}: serve killed after {delay} ms, {} reads answered",
            s.reads
        );
        assert!(
            s.wrong.is_empty() && s.errors.is_empty(),
            "trial {trial}: wrong bytes {:?}, errors {:?}\nmount log:\n{}",
            s.wrong,
            s.errors,
            m.log_text()
        );
        assert!(
            back,
            "trial {trial}: the mount did not read again after the server restarted\nmount log:\n{}\nserve log:\n{}",
            m.log_text(),
            serve.log_text()
        );
        drop(s);
        drop(m);
        assert_cache_consistent(&ccache, &format!("client cache, trial {trial}"));
        let _ = fs::remove_dir_all(&ccache);
    }
    serve.kill();
    assert_cache_consistent(&serve_cache, "serve cache at the end");
}

//! The scp/ssh store against a real OpenSSH server on loopback (Debian's `openssh-server`,
//! started by `support/sshd.rs` with generated host and client keys).

#[path = "support/skip.rs"]
mod skip;
#[path = "support/sshd.rs"]
mod sshd;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use horcrux::store::{AccessUrl, FileStore, SshStore, Store, StoreError, StoreOptions, parse_one};
use sshd::Sshd;

fn options(s: &Sshd) -> StoreOptions {
    StoreOptions {
        ssh_identity: Some(s.client_key.clone()),
        ssh_known_hosts: Some(s.known_hosts.clone()),
        ..StoreOptions::default()
    }
}

fn store(url: &str, opts: &StoreOptions) -> SshStore {
    let url = parse_one(url).expect("valid URL");
    SshStore::from_url(&url, opts).expect("store")
}

/// Deterministic bytes that differ at every offset (so a misplaced range is caught).
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

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            out.push(name);
            if e.file_type().unwrap().is_dir() {
                out.extend(files_under(&e.path()));
            }
        }
    }
    out
}

/// The behaviour every store shares (see `src/store/file.rs`). `root` is where the store keeps
/// its objects on this machine, to check that nothing half-written is left behind.
async fn conformance(s: &dyn Store, root: &Path) {
    // The store's own clock (gc's grace period is measured by it): this machine's, the
    // server being here; its probe leaves nothing behind.
    let clock = s.now().await.unwrap().expect("the store tells its time");
    let off = clock
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_else(|e| e.duration());
    assert!(
        off < Duration::from_secs(60),
        "the store's clock is {off:?} off"
    );
    assert!(s.list("tmp/").await.unwrap().is_empty());
    s.put("chunks/ab/x", Bytes::from_static(b"hello world"))
        .await
        .unwrap();
    assert_eq!(s.get_range("chunks/ab/x", 6..11).await.unwrap(), "world");
    assert_eq!(
        s.get_range("chunks/ab/x", 0..11).await.unwrap(),
        "hello world"
    );
    assert_eq!(s.get_range("chunks/ab/x", 3..3).await.unwrap(), "");
    let e = s.get_range("chunks/ab/x", 6..12).await.unwrap_err();
    assert!(
        !e.is_not_found(),
        "a range past the end is an error, not NotFound: {e}"
    );
    assert!(e.to_string().contains("past the end"), "{e}");
    assert!(s.get_range("chunks/ab/x", 20..30).await.is_err());
    assert_eq!(s.get("chunks/ab/x").await.unwrap(), "hello world");
    assert_eq!(
        std::fs::read(root.join("chunks/ab/x")).unwrap(),
        b"hello world"
    );

    assert!(s.get("nope").await.unwrap_err().is_not_found());
    assert!(s.get("chunks/zz/nope").await.unwrap_err().is_not_found());
    assert!(s.get_range("nope", 0..1).await.unwrap_err().is_not_found());
    let tmp = tempfile::tempdir().unwrap();
    assert!(
        s.get_to_file("nope", &tmp.path().join("f"))
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert!(!tmp.path().join("f").exists());

    assert_eq!(
        s.exists(&["chunks/ab/x".into(), "y".into(), "chunks/zz/y".into()])
            .await
            .unwrap(),
        vec![true, false, false]
    );

    // Overwrite is atomic and replaces.
    s.put("chunks/ab/x", Bytes::from_static(b"replaced"))
        .await
        .unwrap();
    assert_eq!(s.get("chunks/ab/x").await.unwrap(), "replaced");

    s.put("chunks/cd/y", Bytes::from_static(b"y"))
        .await
        .unwrap();
    s.put("manifests/m1", Bytes::from_static(b"m"))
        .await
        .unwrap();
    std::fs::write(root.join("chunks/ab/.junk"), b"dot-files are not keys").unwrap();
    assert_eq!(
        s.list("chunks/").await.unwrap(),
        vec!["chunks/ab/x".to_string(), "chunks/cd/y".to_string()]
    );
    assert_eq!(
        s.list("chunks/a").await.unwrap(),
        vec!["chunks/ab/x".to_string()]
    );
    assert_eq!(
        s.list("").await.unwrap(),
        vec![
            "chunks/ab/x".to_string(),
            "chunks/cd/y".to_string(),
            "manifests/m1".to_string()
        ]
    );
    assert!(s.list("nothing/").await.unwrap().is_empty());
    std::fs::remove_file(root.join("chunks/ab/.junk")).unwrap();

    s.compare_and_swap("refs/main", None, Bytes::from_static(b"1"))
        .await
        .unwrap();
    assert!(matches!(
        s.compare_and_swap("refs/main", None, Bytes::from_static(b"2"))
            .await,
        Err(StoreError::CasConflict { .. })
    ));
    assert!(matches!(
        s.compare_and_swap("refs/main", Some(b"0"), Bytes::from_static(b"2"))
            .await,
        Err(StoreError::CasConflict { .. })
    ));
    s.compare_and_swap("refs/main", Some(b"1"), Bytes::from_static(b"2"))
        .await
        .unwrap();
    assert_eq!(s.get("refs/main").await.unwrap(), "2");
    s.compare_and_swap("refs/heads/deep/feature", None, Bytes::from_static(b"f"))
        .await
        .unwrap();
    assert_eq!(s.get("refs/heads/deep/feature").await.unwrap(), "f");

    // Large objects: ranges across piece boundaries, and streaming to a file.
    let big = pattern((9 << 20) + 123, 7);
    s.put("manifests/big", Bytes::from(big.clone()))
        .await
        .unwrap();
    let r = (4 << 20) - 10..(4 << 20) + 5000;
    assert_eq!(
        s.get_range("manifests/big", r.start as u64..r.end as u64)
            .await
            .unwrap(),
        &big[r]
    );
    assert_eq!(s.get("manifests/big").await.unwrap(), &big[..]);
    let dest = tmp.path().join("sub/dir/big");
    s.get_to_file("manifests/big", &dest).await.unwrap();
    assert!(std::fs::read(&dest).unwrap() == big);
    assert_eq!(
        files_under(tmp.path()).len(),
        3,
        "no temp file left locally"
    );

    let names = files_under(root);
    assert!(
        !names.iter().any(|n| n.contains(".tmp.") || n == ".lock.d"),
        "temp files or locks left behind: {names:?}"
    );
}

#[tokio::test]
async fn conformance_over_ssh_url() {
    let sshd = Sshd::start();
    let root = sshd.dir().join("repo");
    let url = sshd.url(&root);
    let s = store(&url, &options(&sshd));
    assert_eq!(
        s.describe(),
        format!(
            "ssh://{}@127.0.0.1:{}{}",
            sshd.user,
            sshd.port,
            root.display()
        )
    );
    conformance(&s, &root).await;
    // The default 4 sessions for transfers, and 2 that only small reads may take.
    assert!(s.open_sessions() >= 1 && s.open_sessions() <= 6);

    // The same repository through the generic entry point.
    let generic = horcrux::store::open_store_with(&parse_one(&url).unwrap(), &options(&sshd))
        .expect("open_store_with handles ssh://");
    assert_eq!(generic.get("refs/main").await.unwrap(), "2");
}

/// `scp://user@host:/path` always means port 22: run a second server there if the port is free.
#[tokio::test]
async fn conformance_over_scp_url_on_port_22() {
    let sshd = match Sshd::try_start_on(22) {
        Ok(s) => s,
        Err(e) => {
            skip::skip_allowed(&format!(
                "the scp:// form needs a test sshd on port 22, which is taken or refused: {e}"
            ));
            return;
        }
    };
    let root = sshd.dir().join("repo");
    let url = format!("scp://{}@127.0.0.1:{}", sshd.user, root.display());
    assert!(matches!(
        parse_one(&url).unwrap(),
        AccessUrl::Ssh { port: 22, .. }
    ));
    let s = store(&url, &options(&sshd));
    conformance(&s, &root).await;
}

#[tokio::test]
async fn file_store_passes_the_same_conformance() {
    let d = tempfile::tempdir().unwrap();
    let s = FileStore::new(d.path().to_path_buf());
    conformance(&s, d.path()).await;
}

async fn expect_connect_error(url: &str, opts: &StoreOptions) -> String {
    let s = store(url, opts);
    let e = s.get("refs/main").await.unwrap_err();
    assert!(!e.is_not_found(), "{e}");
    assert_eq!(s.open_sessions(), 0, "no session may stay open after {e}");
    println!("expected error: {e}");
    e.to_string()
}

#[tokio::test]
async fn host_keys_are_checked() {
    let sshd = Sshd::start();
    let root = sshd.dir().join("repo");
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs/main"), b"ok").unwrap();
    let url = sshd.url(&root);
    let kh = sshd.dir().join("kh-test");
    let with_kh = |content: &str| {
        std::fs::write(&kh, content).unwrap();
        StoreOptions {
            ssh_known_hosts: Some(kh.clone()),
            ..options(&sshd)
        }
    };
    let port = sshd.port;

    // Accepted: the right key, also in a hashed known_hosts (Debian hashes by default).
    let good = format!("[127.0.0.1]:{port} {}\n", sshd.host_pub);
    let s = store(&url, &with_kh(&good));
    assert_eq!(s.get("refs/main").await.unwrap(), "ok");
    let st = std::process::Command::new("ssh-keygen")
        .arg("-H")
        .arg("-f")
        .arg(&kh)
        .output()
        .unwrap();
    assert!(st.status.success());
    let hashed = std::fs::read_to_string(&kh).unwrap();
    assert!(hashed.starts_with("|1|"), "{hashed}");
    let s = store(
        &url,
        &StoreOptions {
            ssh_known_hosts: Some(kh.clone()),
            ..options(&sshd)
        },
    );
    assert_eq!(s.get("refs/main").await.unwrap(), "ok");

    // Unknown: an empty file, a missing file, or an entry for port 22 only.
    for content in [
        String::new(),
        format!("127.0.0.1 {}\n", sshd.host_pub),
        format!("[127.0.0.1]:{} {}\n", port.wrapping_add(1), sshd.host_pub),
    ] {
        let e = expect_connect_error(&url, &with_kh(&content)).await;
        assert!(
            e.contains(&format!("host key of 127.0.0.1:{port} is not known")),
            "{e}"
        );
        assert!(
            e.contains(&format!(
                "ssh-keyscan -p {port} 127.0.0.1 >> {}",
                kh.display()
            )),
            "{e}"
        );
        assert!(e.contains("--insecure-ignore-host-key"), "{e}");
        assert!(
            e.contains("SHA256:"),
            "the error shows the fingerprint: {e}"
        );
    }
    let missing = StoreOptions {
        ssh_known_hosts: Some(sshd.dir().join("no-such-known-hosts")),
        ..options(&sshd)
    };
    let e = expect_connect_error(&url, &missing).await;
    assert!(e.contains("is not known"), "{e}");

    // Changed: another key of the same type recorded for this host and port.
    let other = sshd::keygen(&sshd.dir().join("other_host"), "ed25519", "");
    let changed = format!("[127.0.0.1]:{port} {}\n", sshd::public_key(&other));
    let e = expect_connect_error(&url, &with_kh(&changed)).await;
    assert!(e.contains("HAS CHANGED"), "{e}");
    assert!(e.contains("man-in-the-middle"), "{e}");
    assert!(e.contains("Not connecting"), "{e}");

    // Known only with another key type: not a "changed" alarm, but not accepted either.
    let ecdsa = sshd::keygen(&sshd.dir().join("other_ecdsa"), "ecdsa", "");
    let other_type = format!("[127.0.0.1]:{port} {}\n", sshd::public_key(&ecdsa));
    let e = expect_connect_error(&url, &with_kh(&other_type)).await;
    assert!(
        e.contains("is not known") && e.contains("another type"),
        "{e}"
    );

    // The explicit opt-out connects whatever known_hosts says.
    let insecure = StoreOptions {
        ssh_insecure_ignore_host_key: true,
        ..with_kh(&changed)
    };
    let s = store(&url, &insecure);
    assert_eq!(s.get("refs/main").await.unwrap(), "ok");
}

#[tokio::test]
async fn refused_authentication_is_a_clear_error() {
    let sshd = Sshd::start();
    let url = sshd.url(&sshd.dir().join("repo"));
    let stranger = sshd::keygen(&sshd.dir().join("stranger"), "ed25519", "");
    let opts = StoreOptions {
        ssh_identity: Some(stranger.clone()),
        ..options(&sshd)
    };
    let e = expect_connect_error(&url, &opts).await;
    assert!(e.contains("refused"), "{e}");
    assert!(
        e.contains(&format!("{}@127.0.0.1:{}", sshd.user, sshd.port)),
        "{e}"
    );
    assert!(
        e.contains(&stranger.display().to_string()),
        "names the key tried: {e}"
    );

    // An unknown user is refused the same way.
    let url = format!(
        "ssh://nobody-here@127.0.0.1:{}{}",
        sshd.port,
        sshd.dir().join("repo").display()
    );
    let e = expect_connect_error(&url, &options(&sshd)).await;
    assert!(e.contains("nobody-here@127.0.0.1"), "{e}");

    // An encrypted key with no terminal to ask on: say so instead of prompting.
    let locked = sshd::keygen(&sshd.dir().join("locked"), "ed25519", "secret passphrase");
    if std::fs::File::open("/dev/tty").is_ok() {
        skip::skip_allowed(
            "the encrypted-key check needs a process without a terminal (run it under `setsid`)",
        );
    } else {
        let opts = StoreOptions {
            ssh_identity: Some(locked),
            ..options(&sshd)
        };
        let e = expect_connect_error(&url, &opts).await;
        assert!(e.contains("encrypted") && e.contains("no terminal"), "{e}");
        assert!(!e.contains("secret passphrase"));
    }

    // Nothing listening: a clear connect error, quickly.
    let port = sshd::free_port();
    let t = Instant::now();
    let e = expect_connect_error(
        &format!("ssh://{}@127.0.0.1:{port}/x", sshd.user),
        &options(&sshd),
    )
    .await;
    assert!(
        e.contains(&format!("cannot connect to 127.0.0.1:{port}")),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_range_reads_share_a_bounded_pool() {
    let sshd = Sshd::start();
    let root = sshd.dir().join("repo");
    let opts = StoreOptions {
        ssh_sessions: Some(4),
        ..options(&sshd)
    };
    let s = Arc::new(store(&sshd.url(&root), &opts));
    let data = pattern(3 << 20, 3);
    s.put("chunks/aa/big", Bytes::from(data.clone()))
        .await
        .unwrap();
    let data = Arc::new(data);
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let s = s.clone();
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            let mut x = t * 7919 + 1;
            for _ in 0..25 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let start = (x >> 20) as usize % (data.len() - 1);
                let len = 1 + (x >> 8) as usize % (256 << 10).min(data.len() - start);
                let got = s
                    .get_range("chunks/aa/big", start as u64..(start + len) as u64)
                    .await
                    .unwrap();
                assert!(got == data[start..start + len], "range {start}+{len}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Reads of up to 256 KiB may also take the 2 sessions kept for small reads.
    let n = s.open_sessions();
    assert!(
        (1..=6).contains(&n),
        "{n} sessions for a pool of 4 (+2 for small reads)"
    );

    // A large exists batch is spread over the sessions and keeps its order.
    for i in 0..50 {
        s.put(&format!("chunks/bb/{i:03}"), Bytes::from_static(b"x"))
            .await
            .unwrap();
    }
    let keys: Vec<String> = (0..200).map(|i| format!("chunks/bb/{i:03}")).collect();
    let found = s.exists(&keys).await.unwrap();
    assert_eq!(found, (0..200).map(|i| i < 50).collect::<Vec<_>>());
    assert!(s.open_sessions() <= 6);

    // Concurrent writers of one ref: compare-and-swap lets exactly one win each round.
    s.compare_and_swap("refs/main", None, Bytes::from_static(b"0"))
        .await
        .unwrap();
    let mut writers = Vec::new();
    for w in 0..6 {
        let s = s.clone();
        writers.push(tokio::spawn(async move {
            let mut wins = 0;
            for _ in 0..5 {
                let cur = s.get("refs/main").await.unwrap();
                let n: u32 = std::str::from_utf8(&cur).unwrap().parse().unwrap();
                match s
                    .compare_and_swap("refs/main", Some(&cur), Bytes::from((n + 1).to_string()))
                    .await
                {
                    Ok(()) => wins += 1,
                    Err(StoreError::CasConflict { .. }) => {}
                    Err(e) => panic!("writer {w}: {e}"),
                }
            }
            wins
        }));
    }
    let mut wins = 0;
    for w in writers {
        wins += w.await.unwrap();
    }
    let end: u32 = std::str::from_utf8(&s.get("refs/main").await.unwrap())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(end, wins, "every successful swap counted exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_server_fails_fast_and_the_store_recovers() {
    const IO_TIMEOUT: Duration = Duration::from_secs(3);
    // A call may pay the connect timeout and one SSH timeout; allow scheduling slack.
    const BOUND: Duration = Duration::from_secs(10);
    let mut sshd = Sshd::start();
    let root = sshd.dir().join("repo");
    let s = Arc::new(
        store(&sshd.url(&root), &options(&sshd)).with_timeouts(Duration::from_secs(3), IO_TIMEOUT),
    );
    let data = Arc::new(pattern(6 << 20, 5));
    s.put("chunks/cc/big", Bytes::from(data.to_vec()))
        .await
        .unwrap();

    // Readers are busy when the server dies.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (s, data, stop) = (s.clone(), data.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let r = tokio::time::timeout(BOUND * 3, s.get("chunks/cc/big"))
                    .await
                    .expect("a call hung past the bound");
                assert!(t.elapsed() < BOUND, "a call took {:?}", t.elapsed());
                match r {
                    Ok(b) => {
                        assert!(b == data[..]);
                        ok += 1;
                    }
                    Err(e) => {
                        assert!(!e.is_not_found(), "{e}");
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    sshd.kill();
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Down: every call fails, quickly, with a message that says why.
    let t = Instant::now();
    let e = s.get_range("chunks/cc/big", 0..10).await.unwrap_err();
    assert!(t.elapsed() < BOUND, "{:?}", t.elapsed());
    assert!(e.to_string().contains("cannot connect"), "{e}");

    sshd.restart();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, 0);
    for r in readers {
        let (o, f) = r.await.unwrap();
        ok += o;
        failed += f;
    }
    assert!(ok > 0 && failed > 0, "ok {ok}, failed {failed}");
    println!("readers across the crash: {ok} calls ok, {failed} failed");

    // Back: the same store works again, without a failed call first.
    assert_eq!(
        s.get_range("chunks/cc/big", 100..200).await.unwrap(),
        &data[100..200]
    );

    // A server that stops answering (TCP up, no replies) is a timeout, not a hang.
    sshd.freeze();
    let t = Instant::now();
    let r = tokio::time::timeout(BOUND * 3, s.get_range("chunks/cc/big", 0..10))
        .await
        .expect("hung on a frozen server");
    let took = t.elapsed();
    assert!(r.is_err(), "a frozen server cannot answer");
    println!("frozen server: failed after {took:?}");
    assert!(took >= IO_TIMEOUT / 2 && took < BOUND, "{took:?}");
    let e = r.unwrap_err().to_string();
    assert!(e.contains("no answer") || e.contains("timed out"), "{e}");
    sshd.thaw();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        s.get_range("chunks/cc/big", 0..10).await.unwrap(),
        &data[..10]
    );
}

#[tokio::test]
async fn cas_lock_waits_for_a_writer_and_breaks_a_stale_lock() {
    let sshd = Sshd::start();
    let root = sshd.dir().join("repo");
    let s = Arc::new(store(&sshd.url(&root), &options(&sshd)));
    s.compare_and_swap("refs/main", None, Bytes::from_static(b"1"))
        .await
        .unwrap();
    let lock = root.join("refs/.lock.d");

    // Another writer holds the lock and releases it soon: we wait for it.
    std::fs::create_dir(&lock).unwrap();
    let release = {
        let lock = lock.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            std::fs::remove_dir(&lock).unwrap();
        })
    };
    s.compare_and_swap("refs/main", Some(b"1"), Bytes::from_static(b"2"))
        .await
        .unwrap();
    release.await.unwrap();

    // A live writer that keeps it: give up after about 10 s, changing nothing.
    std::fs::create_dir(&lock).unwrap();
    let t = Instant::now();
    let e = s
        .compare_and_swap("refs/main", Some(b"2"), Bytes::from_static(b"3"))
        .await
        .unwrap_err();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(20),
        "{took:?}"
    );
    assert!(e.to_string().contains("held by another writer"), "{e}");
    assert_eq!(s.get("refs/main").await.unwrap(), "2");

    // The holder died long ago (lock older than 60 s): the lock is broken.
    let st = std::process::Command::new("touch")
        .args(["-d", "2 minutes ago"])
        .arg(&lock)
        .status()
        .unwrap();
    assert!(st.success());
    let t = Instant::now();
    s.compare_and_swap("refs/main", Some(b"2"), Bytes::from_static(b"3"))
        .await
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(s.get("refs/main").await.unwrap(), "3");
    let left: Vec<String> = files_under(&root.join("refs"));
    assert_eq!(
        left,
        vec!["main".to_string()],
        "lock and temp files cleaned up"
    );
}

/// Authentication without `--identity` (ssh-agent, default keys in `~/.ssh`) and passphrase
/// prompts depend on the process environment (HOME, SSH_AUTH_SOCK, a terminal), so each case
/// runs this test binary again in a child process: see `auth_child`.
#[test]
fn auth_by_agent_default_keys_and_passphrase_prompt() {
    let sshd = Sshd::start();
    let root = sshd.dir().join("repo");
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs/main"), b"ok").unwrap();
    let url = sshd.url(&root);
    let encrypted = sshd::keygen(&sshd.dir().join("encrypted"), "ed25519", "open sesame");
    sshd.authorize(&encrypted);

    let home = |name: &str, key: Option<&Path>| {
        let h = sshd.dir().join(name);
        std::fs::create_dir_all(h.join(".ssh")).unwrap();
        // The default known_hosts location is used when none is given.
        std::fs::copy(&sshd.known_hosts, h.join(".ssh/known_hosts")).unwrap();
        if let Some(k) = key {
            std::fs::copy(k, h.join(".ssh/id_ed25519")).unwrap();
        }
        h
    };
    let child = |home: &Path, agent: Option<&Path>, identity: Option<&Path>, expect: &str| {
        let mut c = std::process::Command::new(std::env::current_exe().unwrap());
        c.args(["--exact", "auth_child", "--ignored", "--nocapture"])
            .env("HOME", home)
            .env("HORCRUX_SSH_TEST_URL", &url)
            .env("HORCRUX_SSH_TEST_EXPECT", expect)
            .env_remove("SSH_AUTH_SOCK")
            .stdin(std::process::Stdio::null());
        if let Some(a) = agent {
            c.env("SSH_AUTH_SOCK", a);
        }
        if let Some(i) = identity {
            c.env("HORCRUX_SSH_TEST_IDENTITY", i);
        }
        c
    };
    let check = |mut c: std::process::Command, what: &str| {
        let out = c.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{what}:\n{text}");
        assert!(
            text.contains("auth_child ... ok"),
            "{what}: child did not run:\n{text}"
        );
        assert!(
            !text.contains("open sesame"),
            "{what}: passphrase leaked:\n{text}"
        );
        println!("{what}: ok");
    };

    // Default key ~/.ssh/id_ed25519, no agent.
    let h = home("home-key", Some(&sshd.client_key));
    check(child(&h, None, None, "ok"), "default key");

    // No key on disk, but an agent holding one.
    let agent_sock = sshd.dir().join("agent.sock");
    let mut agent = std::process::Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&agent_sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ssh-agent (openssh-client)");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent_sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let added = std::process::Command::new("ssh-add")
        .arg(&sshd.client_key)
        .env("SSH_AUTH_SOCK", &agent_sock)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(added.status.success(), "{added:?}");
    let empty = home("home-empty", None);
    check(child(&empty, Some(&agent_sock), None, "ok"), "ssh-agent");
    let _ = agent.kill();
    let _ = agent.wait();

    // Nothing to offer: the error says what was tried.
    check(
        child(&empty, None, None, "refused|no ssh-agent|no default key"),
        "nothing to offer",
    );

    // An encrypted default key is skipped, with a hint.
    let h = home("home-encrypted", Some(&encrypted));
    check(
        child(&h, None, None, "refused|skipped (encrypted"),
        "encrypted default key",
    );

    // An encrypted --identity asks for its passphrase on the terminal.
    let script = |expect: &str| {
        let inner = format!(
            "'{}' --exact auth_child --ignored --nocapture",
            std::env::current_exe().unwrap().display()
        );
        let mut c = child(&empty, None, Some(&encrypted), expect);
        let mut s = std::process::Command::new("script");
        s.args(["-q", "-e", "-c", &inner, "/dev/null"]);
        for (k, v) in c.get_envs() {
            match v {
                Some(v) => s.env(k, v),
                None => s.env_remove(k),
            };
        }
        c = s;
        c
    };
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        skip::skip_allowed(
            "the passphrase prompt check needs `script` (util-linux) for a terminal",
        );
        return;
    }
    for (passphrase, expect, what) in [
        ("open sesame", "ok", "passphrase asked on the terminal"),
        ("wrong", "wrong passphrase", "wrong passphrase"),
    ] {
        let mut c = script(expect);
        c.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut p = c.spawn().unwrap();
        let mut stdin = p.stdin.take().unwrap();
        std::io::Write::write_all(&mut stdin, format!("{passphrase}\n").as_bytes()).unwrap();
        // Keep the terminal open until the child is done.
        let out = p.wait_with_output().unwrap();
        drop(stdin);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{what}:\n{text}");
        assert!(
            text.contains("Enter passphrase for SSH key"),
            "{what}:\n{text}"
        );
        assert!(text.contains("auth_child ... ok"), "{what}:\n{text}");
        println!("{what}: ok");
    }
}

/// One authentication case, in a child process whose HOME, SSH_AUTH_SOCK and terminal the
/// parent test chose. Does nothing when run directly.
#[tokio::test]
#[ignore = "run by auth_by_agent_default_keys_and_passphrase_prompt in a child process"]
async fn auth_child() {
    let Ok(url) = std::env::var("HORCRUX_SSH_TEST_URL") else {
        return;
    };
    let expect = std::env::var("HORCRUX_SSH_TEST_EXPECT").unwrap();
    let opts = StoreOptions {
        ssh_identity: std::env::var_os("HORCRUX_SSH_TEST_IDENTITY").map(Into::into),
        ..StoreOptions::default()
    };
    let s = store(&url, &opts);
    match s.get("refs/main").await {
        Ok(v) => {
            assert_eq!(expect, "ok", "expected an error");
            assert_eq!(v, "ok");
        }
        Err(e) => {
            let e = e.to_string();
            println!("child error: {e}");
            assert_ne!(expect, "ok", "{e}");
            for part in expect.split('|') {
                assert!(e.contains(part), "expected `{part}` in: {e}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_session_that_holds_the_file_open() {
    let sshd = Sshd::start();
    let root = sshd.dir().join("repo");
    let opts = StoreOptions {
        ssh_sessions: Some(4),
        ..options(&sshd)
    };
    let s = Arc::new(store(&sshd.url(&root), &opts));
    let keys: Vec<String> = (0..4).map(|i| format!("chunks/c{i}/data")).collect();
    let data: Vec<Vec<u8>> = (0..4).map(|i| pattern(256 << 10, 10 + i)).collect();
    for (k, d) in keys.iter().zip(&data) {
        s.put(k, Bytes::from(d.clone())).await.unwrap();
    }
    // Four files read at once: each is opened on some session (which, the pool decides).
    let mut tasks = Vec::new();
    for k in keys.clone() {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.get_range(&k, 0..4096).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let held = s.open_read_handles();
    assert_eq!(held, 4, "each file opened once");
    // Reads one after another, in turn over the four files: each goes to a session that has
    // its file open, so no file is opened again (a read is one round trip).
    for round in 0..5u64 {
        for (k, d) in keys.iter().zip(&data) {
            let at = (round * 40_000 + 123) as usize;
            let got = s.get_range(k, at as u64..at as u64 + 4096).await.unwrap();
            assert!(got == d[at..at + 4096], "{k} at {at}");
        }
    }
    assert_eq!(s.open_read_handles(), held, "a file was opened again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_file_is_read_anew_not_through_its_old_handle() {
    let sshd = Sshd::start();
    let root = sshd.dir().join("repo");
    let opts = StoreOptions {
        ssh_sessions: Some(2),
        ..options(&sshd)
    };
    let s = store(&sshd.url(&root), &opts);
    let key = "chunks/ab/obj";
    let bad = pattern(64 << 10, 21);
    let good = pattern(64 << 10, 22);
    s.put(key, Bytes::from(bad.clone())).await.unwrap();
    assert!(s.get_range(key, 0..4096).await.unwrap() == bad[..4096]);
    assert_eq!(s.open_read_handles(), 1);
    // The object is replaced on the server by rename (as every store writes), so the kept
    // handle still names the old file: objects are immutable, so that is normally the same
    // bytes...
    let path = root.join(key);
    let tmp = root.join("chunks/ab/.obj.new");
    std::fs::write(&tmp, &good).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    assert!(
        s.get_range(key, 4096..8192).await.unwrap() == bad[4096..8192],
        "the open handle reads the file it opened"
    );
    // ...but once a reader refuses its bytes (hash mismatch), the handle is closed and the
    // file opened again: a repaired object is read as it is now.
    s.refused(key);
    assert!(s.get_range(key, 4096..8192).await.unwrap() == good[4096..8192]);
    assert!(s.get_range(key, 0..100).await.unwrap() == good[..100]);
    // Refusing a key no session holds open, or a bad key, changes nothing else.
    s.refused("chunks/zz/none");
    s.refused("../outside");
    assert!(s.get_range(key, 100..200).await.unwrap() == good[100..200]);
}

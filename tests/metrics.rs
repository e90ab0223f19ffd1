//! Observability end to end: a real mount with `--metrics` scraped over HTTP (valid Prometheus
//! text, checked by a strict parser), cold reads counted as misses and fetches, warm reads of
//! a second mount of the same cache as hits, `horcrux stats` showing the same figures, the
//! Docker plugin's endpoint, and the systemd units checked by `systemd-analyze verify`.
//! (Peer serving metrics: `tests/peers.rs`, `serve_metrics_count_peer_reads`.)
//!
//! Build the binary first: `cargo build --workspace`.

mod common;
mod plugin_support;
#[path = "support/prom.rs"]
mod prom;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use plugin_support::Plugin;

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// `horcrux stats --json MOUNT` as JSON.
fn stats_json(mp: &Path) -> serde_json::Value {
    let out = horcrux_ok(&[os("stats"), os("--json"), mp.as_os_str()]);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn u(v: &serde_json::Value, path: &[&str]) -> u64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_u64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v}"))
}

/// The metrics address the daemon of `mp` listens on (it was given port 0).
fn metrics_addr(mp: &Path) -> String {
    stats_json(mp)["metrics_addr"]
        .as_str()
        .expect("the daemon reports its metrics address")
        .to_string()
}

#[test]
fn exposition_parser_self_check() {
    prom::self_test();
}

#[test]
fn cold_then_warm_reads_are_counted_and_stats_agrees() {
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let size = 3 * MIB as usize + 5;
    let data = bytes(7, size);
    fs::write(src.join("big.bin"), &data).unwrap();
    let repo = t.path().join("repo");
    generate("vol", &src, &repo);
    let cache = t.path().join("cache");

    // Cold: every byte read is fetched once, from the one source.
    let m = Mount::new(
        &repo,
        &t.path().join("mnt"),
        &cache,
        &["--metrics", "127.0.0.1:0", "--no-passthrough"],
    );
    let addr = metrics_addr(&m.mountpoint);
    let before = prom::scrape(&addr);
    assert_eq!(before.value("horcrux_fetch_bytes_total", &[]), 0.0);
    assert_eq!(before.value("horcrux_cache_miss_blocks_total", &[]), 0.0);
    assert_eq!(fs::read(m.path("big.bin")).unwrap(), data);
    // Fills and prefetches may still be landing: wait until nothing is in flight.
    assert!(wait_until(Duration::from_secs(20), || {
        prom::scrape(&addr).value("horcrux_fetch_inflight", &[("volume", "vol")]) == 0.0
    }));
    let cold = prom::scrape(&addr);
    let v = |name: &str| cold.value(name, &[("volume", "vol")]);
    assert_eq!(
        v("horcrux_fetch_bytes_total"),
        size as f64,
        "bytes fetched = bytes read\n{}",
        cold.text
    );
    assert_eq!(v("horcrux_fetch_blocks_total"), 4.0, "{}", cold.text);
    assert_eq!(v("horcrux_fetch_duration_seconds_count"), 4.0);
    assert!(v("horcrux_cache_miss_blocks_total") >= 1.0, "{}", cold.text);
    // Blocks a prefetch landed before the reader came are hits; together they are the read.
    assert_eq!(
        v("horcrux_cache_miss_bytes_total") + v("horcrux_cache_hit_bytes_total"),
        size as f64,
        "{}",
        cold.text
    );
    assert_eq!(v("horcrux_verify_failures_total"), 0.0);
    assert_eq!(
        cold.sum("horcrux_fetch_errors_total", &[("volume", "vol")]),
        0.0
    );
    // Per source: the repository's URL (no credentials to strip in a file:// URL), chunks
    // plus the metadata read at mount, one latency observation per request.
    let src_label = format!("file://{}", repo.display());
    let sl = [("volume", "vol"), ("source", src_label.as_str())];
    assert!(cold.value("horcrux_source_bytes_total", &sl) >= size as f64);
    assert_eq!(
        cold.value("horcrux_source_request_duration_seconds_count", &sl),
        cold.value("horcrux_source_requests_total", &sl)
    );
    assert!(cold.value("horcrux_cache_size_bytes", &[("volume", "vol")]) >= size as f64);
    assert!(
        cold.value("horcrux_fuse_operations_total", &[("op", "read")]) >= 1.0,
        "{}",
        cold.text
    );
    assert_eq!(
        cold.value("horcrux_mount_info", &[("volume", "vol")]),
        1.0,
        "{}",
        cold.text
    );
    assert_eq!(
        cold.value("horcrux_overlay_files", &[("volume", "vol")]),
        0.0
    );

    // `horcrux stats` reads the same counters (nothing reads meanwhile).
    let s = stats_json(&m.mountpoint);
    assert_eq!(u(&s, &["fetch", "bytes"]), size as u64);
    assert_eq!(
        u(&s, &["reads", "miss_bytes"]) as f64,
        v("horcrux_cache_miss_bytes_total")
    );
    assert_eq!(
        u(&s, &["reads", "hit_blocks"]) as f64,
        v("horcrux_cache_hit_blocks_total")
    );
    assert_eq!(u(&s, &["fetch", "latency", "count"]), 4);
    let human = horcrux_ok(&[os("stats"), m.mountpoint.as_os_str()]);
    assert!(human.contains("volume    vol @"), "{human}");
    assert!(human.contains("fetched   4 blocks (3.0 MiB)"), "{human}");
    assert!(
        human.contains(&format!("source    {src_label}:")),
        "{human}"
    );
    // A write shows in the overlay figures.
    fs::write(m.path("new.txt"), b"local change\n").unwrap();
    let s = prom::scrape(&addr);
    assert_eq!(s.value("horcrux_overlay_files", &[("volume", "vol")]), 1.0);
    assert!(s.value("horcrux_overlay_bytes", &[("volume", "vol")]) > 0.0);
    // An operation is counted when its callback returns, just after the kernel has its reply
    // (and the writer may go on): wait for the count rather than race it.
    assert!(wait_until(Duration::from_secs(5), || {
        prom::scrape(&addr).sum("horcrux_fuse_operations_total", &[("op", "create")]) >= 1.0
    }));
    m.unmount();

    // Warm: a new daemon on the same cache serves every byte from it.
    let m = Mount::new(
        &repo,
        &t.path().join("mnt2"),
        &cache,
        &[
            "--metrics",
            "127.0.0.1:0",
            "--no-passthrough",
            "--read-only",
        ],
    );
    let addr = metrics_addr(&m.mountpoint);
    assert_eq!(fs::read(m.path("big.bin")).unwrap(), data);
    let warm = prom::scrape(&addr);
    let v = |name: &str| warm.value(name, &[("volume", "vol")]);
    assert_eq!(
        v("horcrux_cache_hit_bytes_total"),
        size as f64,
        "{}",
        warm.text
    );
    assert_eq!(v("horcrux_cache_hit_blocks_total"), 4.0, "{}", warm.text);
    assert_eq!(v("horcrux_cache_miss_blocks_total"), 0.0);
    assert_eq!(v("horcrux_fetch_bytes_total"), 0.0);
    assert_eq!(v("horcrux_fetch_duration_seconds_count"), 0.0);
    assert!(
        warm.matching("horcrux_overlay_bytes", &[]).is_empty(),
        "read-only"
    );
    let s = stats_json(&m.mountpoint);
    assert_eq!(u(&s, &["reads", "hit_bytes"]), size as u64);
    assert!(s["overlay"].is_null());
    m.unmount();
}

#[test]
fn a_metrics_address_that_cannot_be_bound_fails_the_mount() {
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a"), b"a").unwrap();
    let repo = t.path().join("repo");
    generate("vol", &src, &repo);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mp = t.path().join("mnt");
    fs::create_dir_all(&mp).unwrap();
    let out = horcrux(&[
        os("mount"),
        os(&url(&repo)),
        mp.as_os_str(),
        os("--cache-dir"),
        t.path().join("cache").as_os_str(),
        os("--metrics"),
        os(&addr),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mounted anyway");
    assert!(
        err.contains("--metrics") && err.contains("cannot listen"),
        "{err}"
    );
    assert!(!is_mounted(&mp));
}

/// `horcrux plugin --metrics`: the volumes it mounts are scraped through their daemons'
/// control sockets, labelled by Docker volume name. Driven over the plugin socket with the
/// Docker VolumeDriver protocol, as the engine would.
#[test]
fn plugin_metrics_aggregate_its_volumes() {
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let data = bytes(3, 2 * MIB as usize);
    fs::write(src.join("f"), &data).unwrap();
    let repo = t.path().join("repo");
    generate("vol", &src, &repo);
    // A free port: bound, read and released (the plugin binds it a moment later).
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let plugin = Plugin::start_with(
        &t.path().join("p.sock"),
        &t.path().join("state"),
        &["--metrics", &addr],
    );
    let empty = prom::scrape(&addr);
    assert_eq!(empty.value("horcrux_plugin_mounted_volumes", &[]), 0.0);
    plugin.ok(
        "/VolumeDriver.Create",
        &format!(
            r#"{{"Name":"v1","Opts":{{"access":"{}","name":"vol"}}}}"#,
            url(&repo)
        ),
    );
    let mounted = plugin.ok("/VolumeDriver.Mount", r#"{"Name":"v1","ID":"c1"}"#);
    let mp = mounted["Mountpoint"].as_str().unwrap().to_string();
    assert_eq!(fs::read(Path::new(&mp).join("f")).unwrap(), data);
    assert!(wait_until(Duration::from_secs(20), || {
        prom::scrape(&addr).value("horcrux_fetch_bytes_total", &[("volume", "v1")])
            == data.len() as f64
    }));
    let s = prom::scrape(&addr);
    assert_eq!(
        s.value("horcrux_plugin_mounted_volumes", &[]),
        1.0,
        "{}",
        s.text
    );
    assert_eq!(s.value("horcrux_volume_up", &[("volume", "v1")]), 1.0);
    assert!(
        s.value(
            "horcrux_fuse_operations_total",
            &[("volume", "v1"), ("op", "read")]
        ) >= 1.0
    );
    plugin.ok("/VolumeDriver.Unmount", r#"{"Name":"v1","ID":"c1"}"#);
    let s = prom::scrape(&addr);
    assert_eq!(
        s.value("horcrux_plugin_mounted_volumes", &[]),
        0.0,
        "{}",
        s.text
    );
}

/// Both units pass `systemd-analyze verify` (systemd is installed by tests/setup.sh). The
/// units name /usr/local/bin/horcrux, which verify requires to exist: they are checked on
/// copies pointing at the built binary.
#[test]
fn systemd_units_verify() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        panic!("systemd-analyze is needed (tests/setup.sh installs systemd)");
    };
    assert!(out.status.success());
    let t = tempdir();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = horcrux_bin();
    for unit in [
        "plugin/horcrux-plugin.service",
        "plugin/horcrux-serve.service",
    ] {
        let text = fs::read_to_string(root.join(unit)).unwrap();
        assert!(text.contains("/usr/local/bin/horcrux"), "{unit}");
        let name = Path::new(unit).file_name().unwrap();
        let copy = t.path().join(name);
        fs::write(
            &copy,
            text.replace("/usr/local/bin/horcrux", bin.to_str().unwrap()),
        )
        .unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&copy)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // Lines about other units of the host (docker.service absent here) are not ours.
        let ours: Vec<&str> = err
            .lines()
            .filter(|l| l.contains(name.to_str().unwrap()))
            .collect();
        assert!(
            out.status.success() && ours.is_empty(),
            "{unit}: systemd-analyze verify failed ({}):\n{err}",
            out.status
        );
    }
}

/// A corrupted chunk: the failed reads are counted by kind (verify) at every level, each
/// failed read is one log line with its cause, and nothing is logged as an ERROR twice over.
/// `horcrux stats --watch` keeps printing.
#[test]
fn verify_failures_are_counted_and_logged_once_per_failed_read() {
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let data = bytes(9, 2 * MIB as usize);
    fs::write(src.join("f"), &data).unwrap();
    let repo = t.path().join("repo");
    generate("vol", &src, &repo);
    // The chunk holding f[1M..2M]: flip a byte.
    let second = &data[MIB as usize..];
    let mut stack = vec![repo.join("chunks")];
    let mut victim = None;
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if fs::read(&p).unwrap() == second {
                victim = Some(p);
            }
        }
    }
    let victim = victim.expect("the chunk of f[1M..2M]");
    let chunk_hex = victim.file_name().unwrap().to_string_lossy().into_owned();
    let mut b = fs::read(&victim).unwrap();
    b[1000] ^= 0x01;
    fs::write(&victim, &b).unwrap();

    let m = Mount::new(
        &repo,
        &t.path().join("mnt"),
        &t.path().join("cache"),
        &["--metrics", "127.0.0.1:0", "--read-only"],
    );
    let addr = metrics_addr(&m.mountpoint);
    let e = fs::read(m.path("f")).expect_err("a corrupted block is never served");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let s = prom::scrape(&addr);
    let vl = [("volume", "vol")];
    assert!(
        s.value("horcrux_verify_failures_total", &vl) >= 1.0,
        "{}",
        s.text
    );
    assert!(
        s.value(
            "horcrux_fetch_errors_total",
            &[("volume", "vol"), ("kind", "verify")]
        ) >= 1.0,
        "{}",
        s.text
    );
    let src_label = format!("file://{}", repo.display());
    assert!(
        s.value(
            "horcrux_source_errors_total",
            &[("source", src_label.as_str()), ("kind", "verify")]
        ) >= 1.0,
        "{}",
        s.text
    );
    assert_eq!(
        s.value(
            "horcrux_fetch_errors_total",
            &[("volume", "vol"), ("kind", "timeout")]
        ),
        0.0
    );
    let failed_reads = s.value("horcrux_fuse_errors_total", &[("op", "read")]);
    assert!(failed_reads >= 1.0, "{}", s.text);
    // The log: one WARN line per failed read, naming the chunk and the cause.
    let log = m.log_text();
    let answered: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("I/O error answered"))
        .collect();
    assert_eq!(answered.len() as f64, failed_reads, "{log}");
    for l in &answered {
        assert!(
            l.contains(&chunk_hex) && l.contains("hash mismatch"),
            "the cause is on the line: {l}"
        );
    }
    assert!(!log.contains(" ERROR "), "{log}");

    // --watch prints report after report.
    let mut child = Command::new(horcrux_bin())
        .args(["stats", "--watch", "0.2"])
        .arg(&m.mountpoint)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.matches("volume    vol @").count() >= 2, "{text}");
    assert!(text.contains("verify failures"), "{text}");
    m.unmount();
}

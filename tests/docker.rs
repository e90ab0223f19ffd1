//! End to end with the real Docker engine: a tiny image built offline (`docker import` of a
//! busybox-static rootfs), `horcrux plugin` started by the test under a unique driver name
//! (`horcrux-test-<pid>`, socket `/run/docker/plugins/horcrux-test-<pid>.sock`), then
//! create → `docker run` reads and writes → `docker cp` → `horcrux commit VOLUME` → a second
//! container sees the committed state → plugin `kill -9` and restart with a container running
//! → `docker volume rm` refused with uncommitted changes → `horcrux discard --force` → rm.
//! Also implicit creation through `docker run --mount ...,volume-driver=...,volume-opt=...`.
//!
//! Where no engine answers `docker info`, the test fails with the reason, unless
//! HORCRUX_ALLOW_NO_DOCKER=1 asks to skip it (it then prints `SKIP ...` and passes).

mod common;
#[path = "support/docker.rs"]
mod docker_support;
mod plugin_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use common::*;
use docker_support::*;
use plugin_support::*;

/// Serialize runs of this test on the machine (they share the driver name).
fn lock_driver_name() -> std::fs::File {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::create("/run/docker/plugins/.horcrux-test.lock")
        .or_else(|_| std::fs::File::create("/tmp/.horcrux-docker-test.lock"))
        .unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    f
}

/// Removes what the test made in Docker, whatever happens, before the plugin goes.
struct DockerCleanup {
    label: String,
    volumes: Vec<String>,
    state: PathBuf,
}

impl Drop for DockerCleanup {
    fn drop(&mut self) {
        let ids = docker(&["ps", "-aq", "--filter", &format!("label={}", self.label)]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = docker(&["rm", "-f", id]);
        }
        // Only what the plugin still has: a lookup of an unknown name asks every driver the
        // engine knows, and a dead one costs ~15 s.
        for v in self
            .volumes
            .iter()
            .filter(|v| self.state.join("volumes").join(v).exists())
        {
            // Changes left by a failed run are thrown away so the volume can go.
            let _ = Command::new(horcrux_bin())
                .args(["discard", "--force", v])
                .env("HORCRUX_PLUGIN_STATE_DIR", &self.state)
                .current_dir("/")
                .output();
            let _ = docker(&["volume", "rm", "-f", v]);
        }
    }
}

fn horcrux_cli(state: &Path, args: &[&str]) -> Output {
    Command::new(horcrux_bin())
        .args(args)
        .env("HORCRUX_PLUGIN_STATE_DIR", state)
        .current_dir("/")
        .output()
        .unwrap()
}

#[test]
fn docker_volume_end_to_end() {
    if skip_without_docker() {
        return;
    }
    let t0 = Instant::now();
    // HORCRUX_KEEP=1 keeps the work directory (the plugin's log) for a look afterwards.
    let (root, _t) = work_dir();
    ensure_image(&root);

    let src = root.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"hello from horcrux\n").unwrap();
    std::fs::write(src.join("big"), bytes(3, 2 * MIB as usize)).unwrap();
    let repo = root.join("repo");
    generate("vol", &src, &repo);

    let pid = std::process::id();
    // One fixed driver name, runs serialized by a lock: the engine remembers every legacy
    // plugin it has talked to until it restarts, and each one that no longer answers adds
    // ~15 s to `docker volume ls` and to lookups of unknown volume names.
    let driver = "horcrux-test".to_string();
    let _lock = lock_driver_name();
    let socket = PathBuf::from(format!("/run/docker/plugins/{driver}.sock"));
    let state = root.join("state");
    let v1 = format!("hxt{pid}-v1");
    let v2 = format!("hxt{pid}-v2");
    let label = format!("horcrux-test={pid}");
    // Declared first, dropped last: the plugin outlives the Docker cleanup.
    let mut plugin = Plugin::start(&socket, &state);
    eprintln!("plugin log: {}", plugin.log.display());
    let _cleanup = DockerCleanup {
        label: label.clone(),
        volumes: vec![v1.clone(), v2.clone()],
        state: state.clone(),
    };
    let access = format!("access={}", url(&repo));
    let mut timings = Vec::new();
    let mut lap =
        |what: &str, since: Instant| timings.push(format!("{what}: {:?}", since.elapsed()));

    let s = Instant::now();
    docker_ok(&[
        "volume", "create", "-d", &driver, "-o", &access, "-o", "name=vol", &v1,
    ]);
    lap("volume create", s);
    let bad = docker(&[
        "volume", "create", "-d", &driver, "-o", &access, "-o", "size=1G", "hxt-bad",
    ]);
    assert!(!bad.status.success());
    assert!(
        text(&bad).contains("known options are access, name"),
        "{}",
        text(&bad)
    );

    // Read and write in a container.
    let data = format!("{v1}:/data");
    let s = Instant::now();
    let out = docker_ok(&[
        "run",
        "--rm",
        "--label",
        &label,
        "-v",
        &data,
        IMAGE,
        "sh",
        "-c",
        "cat /data/f; echo new > /data/g; wc -c < /data/big",
    ]);
    lap("docker run (read f, write g)", s);
    assert!(out.contains("hello from horcrux"), "{out}");
    assert!(out.contains(&(2 * MIB).to_string()), "{out}");

    // docker cp from a created container (the engine mounts the volume for it).
    let c = format!("hxt{pid}-cp");
    docker_ok(&[
        "create", "--name", &c, "--label", &label, "-v", &data, IMAGE, "true",
    ]);
    let copied = root.join("g.copy");
    docker_ok(&["cp", &format!("{c}:/data/g"), copied.to_str().unwrap()]);
    assert_eq!(std::fs::read(&copied).unwrap(), b"new\n");
    docker_ok(&["rm", &c]);
    let mp = state
        .canonicalize()
        .unwrap()
        .join(format!("volumes/{v1}/mnt"));
    assert!(
        eventually(10, || !is_mounted(&mp)),
        "still mounted with no user"
    );

    // Commit by Docker volume name; a second container sees the committed state.
    let st = horcrux_cli(&state, &["status", &v1]);
    assert!(text(&st).contains("A g"), "{}", text(&st));
    let s = Instant::now();
    let cm = horcrux_cli(&state, &["commit", "-m", "from docker", &v1]);
    lap("horcrux commit VOLUME", s);
    assert!(cm.status.success(), "{}", text(&cm));
    let out = docker_ok(&[
        "run", "--rm", "--label", &label, "-v", &data, IMAGE, "cat", "/data/g",
    ]);
    assert_eq!(out, "new\n");
    let log = horcrux_cli(&state, &["log", &v1]);
    assert!(log.status.success(), "{}", text(&log));
    assert!(text(&log).contains("from docker"), "{}", text(&log));
    // Clean after the commit: removal would be allowed now.
    let st = horcrux_cli(&state, &["status", &v1]);
    assert!(st.status.success(), "{}", text(&st));
    assert!(text(&st).contains("nothing changed"), "{}", text(&st));

    // A running container across a plugin kill -9 and restart.
    let run = format!("hxt{pid}-run");
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &run,
        "--label",
        &label,
        "-v",
        &data,
        IMAGE,
        "sh",
        "-c",
        "echo running > /data/h; sleep 600",
    ]);
    assert!(eventually(20, || docker(&["exec", &run, "cat", "/data/h"])
        .status
        .success()));
    let s = Instant::now();
    plugin.restart();
    lap("plugin kill -9 + restart", s);
    let inspect = docker_ok(&["volume", "inspect", &v1]);
    assert!(inspect.contains(mp.to_str().unwrap()), "{inspect}");
    assert_eq!(
        plugin.ok("/VolumeDriver.List", "")["Volumes"][0]["Name"],
        v1.as_str()
    );
    assert_eq!(
        docker_ok(&["exec", &run, "cat", "/data/f"]),
        "hello from horcrux\n"
    );
    docker_ok(&["exec", &run, "sh", "-c", "echo after > /data/h2"]);
    let s = Instant::now();
    docker_ok(&["rm", "-f", &run]);
    lap("docker rm -f (unmount through the restarted plugin)", s);
    assert!(
        eventually(10, || !is_mounted(&mp)),
        "still mounted after the last container went; log:\n{}",
        plugin.log_text()
    );

    // Uncommitted changes: removal refused, then discarded, then removed.
    let rm = docker(&["volume", "rm", &v1]);
    assert!(
        !rm.status.success(),
        "rm with uncommitted changes succeeded"
    );
    assert!(
        text(&rm).contains("uncommitted changes") && text(&rm).contains("discard --force"),
        "{}",
        text(&rm)
    );
    let d = horcrux_cli(&state, &["discard", "--force", &v1]);
    assert!(d.status.success(), "{}", text(&d));
    docker_ok(&["volume", "rm", &v1]);
    plugin.err("/VolumeDriver.Get", &format!(r#"{{"Name":"{v1}"}}"#));

    // Implicit creation through --mount.
    let s = Instant::now();
    let out = docker_ok(&[
        "run",
        "--rm",
        "--label",
        &label,
        "--mount",
        &format!(
            "type=volume,src={v2},dst=/data,volume-driver={driver},volume-opt=access={},volume-opt=name=vol",
            url(&repo)
        ),
        IMAGE,
        "cat",
        "/data/f",
    ]);
    lap("docker run --mount (implicit create)", s);
    assert_eq!(out, "hello from horcrux\n");
    docker_ok(&["volume", "rm", &v2]);

    println!("timings ({:?} in all):", t0.elapsed());
    for l in &timings {
        println!("  {l}");
    }
}

/// The commit id (12 digits) of `horcrux commit`'s report.
fn committed_id(o: &Output) -> String {
    assert!(o.status.success(), "{}", text(o));
    let out = String::from_utf8_lossy(&o.stdout);
    let id = out
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no commit id in {out:?}"));
    id.to_string()
}

fn started_at(container: &str) -> String {
    docker_ok(&["inspect", "-f", "{{.State.StartedAt}}", container])
}

/// `horcrux checkout REV VOLUME` and `reset --hard` on a volume a running container uses: the
/// container is stopped, the volume switched, the container started again and sees the
/// version switched to; a failed switch starts it again too.
#[test]
fn docker_checkout_restarts_containers() {
    if skip_without_docker() {
        return;
    }
    let t0 = Instant::now();
    let t = tempdir();
    let root = t.path().to_path_buf();
    ensure_image(&root);
    let src = root.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"generated\n").unwrap();
    let repo = root.join("repo");
    generate("vol", &src, &repo);

    let pid = std::process::id();
    let driver = "horcrux-test";
    let _lock = lock_driver_name();
    let socket = PathBuf::from(format!("/run/docker/plugins/{driver}.sock"));
    let state = root.join("state");
    let v = format!("hxt{pid}-co");
    let label = format!("horcrux-test={pid}");
    let plugin = Plugin::start(&socket, &state);
    eprintln!("plugin log: {}", plugin.log.display());
    let _cleanup = DockerCleanup {
        label: label.clone(),
        volumes: vec![v.clone()],
        state: state.clone(),
    };
    let access = format!("access={}", url(&repo));
    docker_ok(&[
        "volume", "create", "-d", driver, "-o", &access, "-o", "name=vol", &v,
    ]);
    let c = format!("hxt{pid}-sleeper");
    // sh as PID 1 ignores SIGTERM unless trapped: stop would wait the whole grace period.
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &c,
        "--label",
        &label,
        "-v",
        &format!("{v}:/data"),
        IMAGE,
        "sh",
        "-c",
        "trap 'exit 0' TERM; while :; do sleep 1; done",
    ]);
    let cat = || docker_ok(&["exec", &c, "cat", "/data/f"]);
    assert_eq!(cat(), "generated\n");

    // Two versions, committed by volume name while the container runs.
    docker_ok(&["exec", &c, "sh", "-c", "echo one > /data/f"]);
    let first = committed_id(&horcrux_cli(&state, &["commit", "-m", "one", &v]));
    docker_ok(&["exec", &c, "sh", "-c", "echo two > /data/f"]);
    let second = committed_id(&horcrux_cli(&state, &["commit", "-m", "two", &v]));
    assert_ne!(first, second);

    let before = started_at(&c);
    let s = Instant::now();
    let co = horcrux_cli(&state, &["checkout", &first, &v]);
    let checkout_time = s.elapsed();
    assert!(co.status.success(), "{}", text(&co));
    assert!(
        text(&co).contains(&format!("stopping container {c}")),
        "{}",
        text(&co)
    );
    assert!(
        text(&co).contains(&format!("switched; started again: {c}")),
        "{}",
        text(&co)
    );
    assert_ne!(started_at(&c), before, "the container was not restarted");
    assert_eq!(
        docker_ok(&["inspect", "-f", "{{.State.Running}}", &c]).trim(),
        "true"
    );
    assert_eq!(
        cat(),
        "one\n",
        "the restarted container sees the first version"
    );
    let mp = state
        .canonicalize()
        .unwrap()
        .join(format!("volumes/{v}/mnt"));
    assert!(
        is_mounted(&mp),
        "the plugin mounts it again for the container"
    );
    // Not a branch: the registry remembers the commit (`docker volume inspect` shows it).
    let inspect = docker_ok(&["volume", "inspect", &v]);
    assert!(inspect.contains(&first), "{inspect}");

    // A switch that fails starts the container again and says so.
    let before = started_at(&c);
    let bad = horcrux_cli(&state, &["checkout", "no-such-rev", &v]);
    assert!(!bad.status.success(), "{}", text(&bad));
    assert!(
        text(&bad).contains("the switch FAILED") && text(&bad).contains(&c),
        "{}",
        text(&bad)
    );
    assert_ne!(started_at(&c), before);
    assert_eq!(cat(), "one\n");

    // Back to the branch, then reset it to the first version; by the plugin's mountpoint.
    let co = horcrux_cli(&state, &["checkout", "main", &v]);
    assert!(co.status.success(), "{}", text(&co));
    assert_eq!(cat(), "two\n");
    let s = Instant::now();
    let reset = horcrux_cli(&state, &["reset", "--hard", &first, mp.to_str().unwrap()]);
    let reset_time = s.elapsed();
    assert!(reset.status.success(), "{}", text(&reset));
    assert!(text(&reset).contains("started again"), "{}", text(&reset));
    assert_eq!(cat(), "one\n");
    let log = horcrux_cli(&state, &["log", &v]);
    assert!(!text(&log).contains(&second), "{}", text(&log));

    docker_ok(&["rm", "-f", &c]);
    assert!(eventually(10, || !is_mounted(&mp)));
    docker_ok(&["volume", "rm", &v]);
    println!(
        "checkout with a container restart: {checkout_time:?}; reset --hard: {reset_time:?}; \
         {:?} in all",
        t0.elapsed()
    );
}

//! The managed Docker plugin package (plugin/managed/) with the real engine: build.sh makes the
//! rootfs offline and runs `docker plugin create` under a unique name
//! (`horcrux-managed-test:<pid>`), the test points the plugin's `repos` mount at a generated
//! file:// repository (and its credential mounts at empty directories), enables it, creates a
//! volume, reads a file from it in a busybox container (the image of tests/docker.rs, built
//! offline), writes to it, sees the change from inside the plugin (`runc exec ... horcrux
//! status`), discards it, then `docker volume rm`, `docker plugin disable -f`, `docker plugin
//! rm -f`. Everything made in Docker is removed on drop, whatever happens.
//!
//! Where no engine answers `docker info`, the test fails with the reason, unless
//! HORCRUX_ALLOW_NO_DOCKER=1 asks to skip it (it then prints `SKIP ...` and passes).
//! Only names this test created are looked up (an unknown volume name makes Docker 20.10 ask
//! every legacy plugin it knows, ~15 s for each dead one).

mod common;
#[path = "support/docker.rs"]
mod docker_support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use common::*;
use docker_support::*;

/// Removes what the test made in Docker, whatever happens: containers (by label), the volume
/// (only once created: no lookups of unknown names), the plugin, and any mount left on the
/// host under the plugin's propagated mount.
struct Cleanup {
    plugin: String,
    plugin_id: Option<String>,
    label: String,
    volume: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ids = docker(&["ps", "-aq", "--filter", &format!("label={}", self.label)]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = docker(&["rm", "-f", id]);
        }
        if let (Some(v), Some(id)) = (&self.volume, &self.plugin_id) {
            // Changes left by a failed run are thrown away so the volume can go.
            let _ = runc_exec(id, &["discard", "--force", v]);
            let _ = docker(&["volume", "rm", "-f", v]);
        }
        let _ = docker(&["plugin", "disable", "-f", &self.plugin]);
        let _ = docker(&["plugin", "rm", "-f", &self.plugin]);
        if let Some(id) = &self.plugin_id {
            let prop = format!("/var/lib/docker/plugins/{id}/propagated-mount");
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            for l in mounts.lines() {
                if let Some(mp) = l.split(' ').nth(4).filter(|mp| mp.starts_with(&prop)) {
                    force_unmount(Path::new(mp));
                }
            }
        }
    }
}

/// `horcrux ARGS` inside the running plugin (its mount namespace, its state directory).
fn runc_exec(plugin_id: &str, args: &[&str]) -> Output {
    Command::new("runc")
        .args(["--root", "/run/docker/runtime-runc/plugins.moby", "exec"])
        .arg(plugin_id)
        .arg("/usr/bin/horcrux")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run runc")
}

#[test]
fn managed_plugin_end_to_end() {
    if skip_without_docker() {
        return;
    }
    let t0 = Instant::now();
    // HORCRUX_KEEP=1 keeps the work directory (the plugin's log) for a look afterwards.
    let (root, _t) = work_dir();
    ensure_image(&root);
    let mut timings = Vec::new();
    let mut lap =
        |what: &str, since: Instant| timings.push(format!("{what}: {:?}", since.elapsed()));

    // A repository the plugin reads through its `repos` mount: file:///srv/horcrux/repo.
    let src = root.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"hello from the managed plugin\n").unwrap();
    std::fs::write(src.join("big"), bytes(7, 2 * MIB as usize)).unwrap();
    let repos = root.join("repos");
    generate("vol", &src, &repos.join("repo"));
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();

    let pid = std::process::id();
    let plugin = format!("horcrux-managed-test:{pid}");
    let volume = format!("hxm{pid}-v1");
    let label = format!("horcrux-managed-test={pid}");
    let mut cleanup = Cleanup {
        plugin: plugin.clone(),
        plugin_id: None,
        label: label.clone(),
        volume: None,
    };

    let s = Instant::now();
    let build = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("plugin/managed/build.sh"))
        .arg("--binary")
        .arg(horcrux_bin())
        .args(["--name", &plugin, "--build-dir"])
        .arg(root.join("package"))
        .stdin(Stdio::null())
        .output()
        .expect("run plugin/managed/build.sh");
    lap("build.sh (rootfs + docker plugin create)", s);
    let id = docker(&["plugin", "inspect", "-f", "{{.Id}}", &plugin]);
    if id.status.success() {
        cleanup.plugin_id = Some(String::from_utf8_lossy(&id.stdout).trim().to_string());
    }
    assert!(build.status.success(), "build.sh failed:\n{}", text(&build));
    let id = cleanup
        .plugin_id
        .clone()
        .expect("the plugin exists after build.sh");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("package/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["interface"]["types"][0], "docker.volumedriver/1.0");

    let set = |k: &str, v: &Path| format!("{k}={}", v.display());
    docker_ok(&[
        "plugin",
        "set",
        &plugin,
        &set("repos.source", &repos),
        &set("ssh.source", &empty),
        &set("aws.source", &empty),
        "RUST_LOG=debug",
    ]);
    let s = Instant::now();
    docker_ok(&["plugin", "enable", &plugin]);
    lap("docker plugin enable", s);

    let s = Instant::now();
    cleanup.volume = Some(volume.clone());
    docker_ok(&[
        "volume",
        "create",
        "-d",
        &plugin,
        "-o",
        "access=file:///srv/horcrux/repo",
        "-o",
        "name=vol",
        &volume,
    ]);
    lap("docker volume create", s);

    let data = format!("{volume}:/data");
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
    lap("docker run (read f and big, write g)", s);
    assert!(out.contains("hello from the managed plugin"), "{out}");
    assert!(out.contains(&(2 * MIB).to_string()), "{out}");

    // The change is seen by the CLI inside the plugin; discarded so the volume can go.
    let st = runc_exec(&id, &["status", &volume]);
    assert!(text(&st).contains("A g"), "{}", text(&st));
    let rm = docker(&["volume", "rm", &volume]);
    assert!(
        !rm.status.success(),
        "rm with uncommitted changes succeeded"
    );
    assert!(text(&rm).contains("uncommitted changes"), "{}", text(&rm));
    let d = runc_exec(&id, &["discard", "--force", &volume]);
    assert!(d.status.success(), "{}", text(&d));

    let s = Instant::now();
    docker_ok(&["volume", "rm", &volume]);
    cleanup.volume = None;
    lap("docker volume rm", s);
    let s = Instant::now();
    docker_ok(&["plugin", "disable", "-f", &plugin]);
    lap("docker plugin disable -f", s);
    docker_ok(&["plugin", "rm", "-f", &plugin]);
    drop(cleanup);

    println!("timings ({:?} in all):", t0.elapsed());
    for l in &timings {
        println!("  {l}");
    }
}

//! Docker helpers shared by the tests that use the real engine (`tests/docker.rs`,
//! `tests/managed_plugin.rs`): running `docker`, telling why it cannot be used, and the busybox
//! image built offline.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

pub const IMAGE: &str = "horcrux-test-busybox";

pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run docker")
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn docker_ok(args: &[&str]) -> String {
    let o = docker(args);
    assert!(o.status.success(), "docker {args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Why Docker cannot be used here, if it cannot.
pub fn docker_unavailable() -> Option<String> {
    match Command::new("docker")
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Err(e) => Some(format!("no docker command ({e})")),
        Ok(o) if !o.status.success() => Some(format!(
            "`docker info` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => None,
    }
}

/// Whether a Docker test must stop here because the engine cannot be used. A skip is allowed
/// only when asked for (`HORCRUX_ALLOW_NO_DOCKER=1`, said on stdout); otherwise a missing or
/// broken engine fails the test with the reason, so CI never passes a Docker test it did not run.
pub fn skip_without_docker() -> bool {
    let Some(why) = docker_unavailable() else {
        return false;
    };
    if std::env::var_os("HORCRUX_ALLOW_NO_DOCKER").is_some_and(|v| v == "1") {
        println!("SKIP (HORCRUX_ALLOW_NO_DOCKER=1): {why}");
        return true;
    }
    panic!(
        "the Docker engine is needed by this test: {why}. Start it (tests/setup.d/docker.sh), \
         or set HORCRUX_ALLOW_NO_DOCKER=1 to skip the Docker tests"
    );
}

/// The busybox image, built offline from Debian's busybox-static (kept between runs).
pub fn ensure_image(work: &Path) {
    if docker(&["image", "inspect", IMAGE]).status.success() {
        return;
    }
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is missing: run tests/setup.d/docker.sh (installs busybox-static)"
    );
    let root = work.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    for d in ["tmp", "data", "proc", "sys", "dev", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    let list = Command::new(busybox).arg("--list").output().unwrap();
    for name in String::from_utf8_lossy(&list.stdout).lines() {
        if name != "busybox" && !name.is_empty() {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(name));
        }
    }
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let import = Command::new("docker")
        .args(["import", "-", IMAGE])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(tar.wait().unwrap().success(), "tar of the rootfs failed");
    assert!(import.status.success(), "docker import: {}", text(&import));
}

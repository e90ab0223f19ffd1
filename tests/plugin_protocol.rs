//! The Docker volume driver over its Unix socket, as the engine speaks to it: `horcrux plugin`
//! on a temporary socket and state directory, real `horcrux mount` daemons behind it, every
//! endpoint and every error; mount counts per ID; `kill -9` and restart with a volume in use
//! (the mount survives, or is made again when it is gone); removal refused while mounted or
//! with uncommitted changes; `horcrux status|discard VOLUME` by Docker volume name.

mod common;
mod plugin_support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use plugin_support::*;
use serde_json::json;

/// `horcrux ARGS` with the plugin's state directory, for commands naming a Docker volume.
fn cli(state: &Path, args: &[&str]) -> std::process::Output {
    Command::new(horcrux_bin())
        .args(args)
        .env("HORCRUX_PLUGIN_STATE_DIR", state)
        .current_dir("/")
        .output()
        .unwrap()
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct Setup {
    _t: tempfile::TempDir,
    repo: PathBuf,
    plugin: Plugin,
}

fn setup() -> Setup {
    let t = tempdir();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("f"), b"hello from horcrux\n").unwrap();
    std::fs::write(src.join("sub/big"), bytes(7, 3 * MIB as usize)).unwrap();
    let repo = t.path().join("repo");
    generate("vol", &src, &repo);
    let plugin = Plugin::start(&t.path().join("p.sock"), &t.path().join("state"));
    Setup {
        repo,
        plugin,
        _t: t,
    }
}

#[test]
fn protocol_without_mounts() {
    let s = setup();
    let p = &s.plugin;
    // No body, no Content-Type.
    let (st, body) = p.raw("/Plugin.Activate", b"").unwrap();
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
        json!({"Implements": ["VolumeDriver"]})
    );
    assert_eq!(
        p.ok("/VolumeDriver.Capabilities", ""),
        json!({"Capabilities": {"Scope": "local"}, "Err": ""})
    );
    // Opts null: access is missing.
    let e = p.err("/VolumeDriver.Create", r#"{"Name":"v1","Opts":null}"#);
    assert!(e.contains("missing volume option `access`"), "{e}");
    let e = p.err(
        "/VolumeDriver.Create",
        r#"{"Name":"v1","Opts":{"access":"file:///x","size":"1G"}}"#,
    );
    assert!(e.contains("unknown volume option `size`"), "{e}");
    for k in ["access", "name", "ref", "read-only", "cache-size"] {
        assert!(e.contains(k), "{e}");
    }
    let e = p.err(
        "/VolumeDriver.Create",
        r#"{"Name":"v1","Opts":{"access":"scp://dev:hunter2@h:/r"}}"#,
    );
    assert!(e.contains("credential") && !e.contains("hunter2"), "{e}");
    let e = p.err(
        "/VolumeDriver.Create",
        r#"{"Name":"../x","Opts":{"access":"file:///x"}}"#,
    );
    assert!(e.contains("not a valid volume name"), "{e}");
    // The original's spelling, and the plain one.
    let repo = url(&s.repo);
    p.ok(
        "/VolumeDriver.Create",
        &json!({"Name": "v1", "Opts": {"--access": repo, "--name": "vol"}}).to_string(),
    );
    p.ok(
        "/VolumeDriver.Create",
        &json!({"Name": "v2", "Opts": {"access": repo, "ref": "main", "read-only": ""}})
            .to_string(),
    );
    // Creating again with the same options is fine (implicit creation); other options are not.
    p.ok(
        "/VolumeDriver.Create",
        &json!({"Name": "v1", "Opts": {"access": repo, "name": "vol"}}).to_string(),
    );
    let e = p.err(
        "/VolumeDriver.Create",
        &json!({"Name": "v1", "Opts": {"access": repo, "ref": "other"}}).to_string(),
    );
    assert!(e.contains("already exists"), "{e}");

    let e = p.err("/VolumeDriver.Get", r#"{"Name":"nope"}"#);
    assert!(e.contains("no such volume"), "{e}");
    for ep in ["/VolumeDriver.Path", "/VolumeDriver.Remove"] {
        p.err(ep, r#"{"Name":"nope"}"#);
    }
    p.err("/VolumeDriver.Mount", r#"{"Name":"nope","ID":"a"}"#);
    let v = p.ok("/VolumeDriver.Get", r#"{"Name":"v1"}"#);
    assert_eq!(v["Volume"]["Name"], "v1");
    assert!(v["Volume"].get("Mountpoint").is_none(), "{v}");
    let created = v["Volume"]["CreatedAt"].as_str().unwrap();
    assert!(created.ends_with('Z') && created.contains('T'), "{created}");
    assert_eq!(v["Volume"]["Status"]["access"], repo);
    let v = p.ok("/VolumeDriver.List", "");
    let names: Vec<_> = v["Volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["Name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["v1", "v2"]);
    assert_eq!(
        p.ok("/VolumeDriver.Path", r#"{"Name":"v1"}"#)["Mountpoint"],
        ""
    );
    // Credentials never reach the registry.
    let db = std::fs::read(p.state.join("plugin.db")).unwrap();
    assert!(!String::from_utf8_lossy(&db).contains("hunter2"));

    // Transport errors.
    let (st, _) = p.call("/VolumeDriver.Create", "{not json");
    assert_eq!(st, 400);
    let (st, v) = p.call("/VolumeDriver.Frobnicate", "{}");
    assert_eq!(st, 404, "{v}");
    let mut c = UnixStream::connect(&p.socket).unwrap();
    c.write_all(b"GET /VolumeDriver.List HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).unwrap();
    assert_eq!(parse_response(&out).0, 405);
    // Keep-alive: two requests on one connection.
    let mut c = UnixStream::connect(&p.socket).unwrap();
    c.write_all(b"POST /VolumeDriver.Capabilities HTTP/1.1\r\nContent-Length: 0\r\n\r\nPOST /VolumeDriver.Get HTTP/1.1\r\nContent-Length: 13\r\nConnection: close\r\n\r\n{\"Name\":\"v2\"}").unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).unwrap();
    let s = String::from_utf8_lossy(&out);
    assert_eq!(s.matches("HTTP/1.1 200 OK").count(), 2, "{s}");

    p.ok("/VolumeDriver.Remove", r#"{"Name":"v2"}"#);
    p.err("/VolumeDriver.Get", r#"{"Name":"v2"}"#);
}

#[test]
fn mounts_counts_restarts_and_removal() {
    let mut s = setup();
    let repo = url(&s.repo);
    let p = &mut s.plugin;
    p.ok(
        "/VolumeDriver.Create",
        &json!({"Name": "v1", "Opts": {"access": repo, "name": "vol"}}).to_string(),
    );
    let t0 = std::time::Instant::now();
    let v = p.ok("/VolumeDriver.Mount", r#"{"Name":"v1","ID":"c1"}"#);
    eprintln!("Mount answered in {:?}", t0.elapsed());
    let mp = PathBuf::from(v["Mountpoint"].as_str().unwrap());
    assert_eq!(mp, p.state.canonicalize().unwrap().join("volumes/v1/mnt"));
    // Live when Mount answers.
    assert!(is_mounted(&mp));
    assert_eq!(
        std::fs::read(mp.join("f")).unwrap(),
        b"hello from horcrux\n"
    );
    // Twice the same ID (docker cp does this), one unmount: still mounted.
    p.ok("/VolumeDriver.Mount", r#"{"Name":"v1","ID":"c1"}"#);
    p.ok("/VolumeDriver.Unmount", r#"{"Name":"v1","ID":"c1"}"#);
    assert!(is_mounted(&mp));
    assert_eq!(
        p.ok("/VolumeDriver.Path", r#"{"Name":"v1"}"#)["Mountpoint"],
        mp.to_str().unwrap()
    );
    let e = p.err("/VolumeDriver.Remove", r#"{"Name":"v1"}"#);
    assert!(e.contains("in use"), "{e}");
    std::fs::write(mp.join("new"), b"written in the volume\n").unwrap();

    // kill -9 with the volume mounted: the daemon lives on, and the restarted plugin knows.
    let daemon_log_before = p.log_text().len();
    p.restart();
    let v = p.ok("/VolumeDriver.Get", r#"{"Name":"v1"}"#);
    assert_eq!(v["Volume"]["Mountpoint"], mp.to_str().unwrap());
    assert_eq!(v["Volume"]["Status"]["mounts"], 1);
    assert_eq!(p.ok("/VolumeDriver.List", "")["Volumes"][0]["Name"], "v1");
    assert!(is_mounted(&mp));
    assert_eq!(
        std::fs::read(mp.join("new")).unwrap(),
        b"written in the volume\n"
    );
    // Logged once the restarted plugin has checked its mounts, which may be just after its
    // socket answers.
    assert!(
        eventually(10, || p.log_text()[daemon_log_before..]
            .contains("mounts in use are all live")),
        "{}",
        p.log_text()
    );

    // The mount gone behind its back (a reboot): the restarted plugin mounts it again.
    horcrux_ok(&["umount".as_ref(), mp.as_os_str()]);
    p.restart();
    assert!(
        eventually(30, || is_mounted(&mp)),
        "not mounted again; log:\n{}",
        p.log_text()
    );
    assert_eq!(
        std::fs::read(mp.join("new")).unwrap(),
        b"written in the volume\n"
    );

    // The last user goes: unmounted; the changes stay (in the overlay).
    p.ok("/VolumeDriver.Unmount", r#"{"Name":"v1","ID":"c1"}"#);
    assert!(!is_mounted(&mp));
    assert_eq!(
        p.ok("/VolumeDriver.Path", r#"{"Name":"v1"}"#)["Mountpoint"],
        ""
    );
    // An unknown ID is tolerated (the engine may repeat an unmount).
    p.ok("/VolumeDriver.Unmount", r#"{"Name":"v1","ID":"c1"}"#);

    let e = p.err("/VolumeDriver.Remove", r#"{"Name":"v1"}"#);
    assert!(e.contains("uncommitted changes"), "{e}");
    assert!(e.contains("horcrux discard --force v1"), "{e}");
    assert!(e.contains("horcrux commit"), "{e}");

    // The CLI by Docker volume name (mounted for the command, unmounted after).
    let st = cli(&p.state, &["status", "v1"]);
    assert!(st.status.success(), "{}", text(&st));
    assert!(text(&st).contains("A new"), "{}", text(&st));
    let d = cli(&p.state, &["discard", "--force", "v1"]);
    assert!(d.status.success(), "{}", text(&d));
    assert!(
        p.mountpoints().iter().all(|m| !is_mounted(m)),
        "a temporary mount was left"
    );
    let bad = cli(&p.state, &["status", "no-such-volume"]);
    assert!(!bad.status.success());

    p.ok("/VolumeDriver.Remove", r#"{"Name":"v1"}"#);
    p.err("/VolumeDriver.Get", r#"{"Name":"v1"}"#);
    assert!(!p.state.join("volumes/v1").exists());
}

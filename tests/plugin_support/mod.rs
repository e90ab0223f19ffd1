//! Shared by tests/plugin_protocol.rs and tests/docker.rs: a `horcrux plugin` process on a
//! chosen socket and state directory (restartable, `kill -9`-able), a plain HTTP/1.1 client
//! over its Unix socket, and a cleanup that unmounts whatever the plugin mounted.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{force_unmount, horcrux_bin, is_mounted};

/// A running `horcrux plugin`; killed, and every mount it made undone, on drop.
#[derive(Debug)]
pub struct Plugin {
    pub socket: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    /// More arguments of `horcrux plugin` (e.g. `--metrics ADDR`).
    pub extra: Vec<String>,
    child: Option<Child>,
}

impl Plugin {
    pub fn start(socket: &Path, state: &Path) -> Self {
        Self::start_with(socket, state, &[])
    }

    /// [`Plugin::start`] with more arguments.
    pub fn start_with(socket: &Path, state: &Path, extra: &[&str]) -> Self {
        let mut p = Self {
            socket: socket.to_path_buf(),
            state: state.to_path_buf(),
            log: state.with_extension("plugin.log"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(horcrux_bin())
            .arg("plugin")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start horcrux plugin");
        self.child = Some(child);
        let t0 = Instant::now();
        // The socket is bound first: it answers as soon as it exists.
        while self.raw("/Plugin.Activate", b"").is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the plugin did not answer on {} within 20 s; log:\n{}",
                self.socket.display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `kill -9` the plugin (its mount daemons are separate processes and live on).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same socket and state directory.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One request on a fresh connection, with no Content-Type (as the engine may send it).
    pub fn raw(&self, endpoint: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        let mut s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        let head = format!(
            "POST {endpoint} HTTP/1.1\r\nHost: plugin\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(parse_response(&out))
    }

    /// POST a JSON body to an endpoint; the status and the parsed JSON answer.
    pub fn call(&self, endpoint: &str, body: &str) -> (u16, serde_json::Value) {
        let (status, body) = self
            .raw(endpoint, body.as_bytes())
            .unwrap_or_else(|e| panic!("{endpoint}: {e}; log:\n{}", self.log_text()));
        let v = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "{endpoint}: answer is not JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        });
        (status, v)
    }

    /// A call that must succeed (200, empty Err).
    pub fn ok(&self, endpoint: &str, body: &str) -> serde_json::Value {
        let (status, v) = self.call(endpoint, body);
        assert_eq!(
            (status, v["Err"].as_str().unwrap_or("")),
            (200, ""),
            "{endpoint} {body}: {v}"
        );
        v
    }

    /// A call that must fail with 500 and an Err; returns the message.
    pub fn err(&self, endpoint: &str, body: &str) -> String {
        let (status, v) = self.call(endpoint, body);
        assert_eq!(status, 500, "{endpoint} {body}: {v}");
        let e = v["Err"].as_str().unwrap_or("").to_string();
        assert!(!e.is_empty(), "{endpoint} {body}: {v}");
        e
    }

    /// Every mountpoint the plugin (or a CLI command on its volumes) may have made.
    pub fn mountpoints(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.state.join("volumes")) {
            for v in rd.flatten() {
                if let Ok(inner) = std::fs::read_dir(v.path()) {
                    for e in inner.flatten() {
                        let n = e.file_name();
                        let n = n.to_string_lossy();
                        if n == "mnt" || n.starts_with("cli-") {
                            out.push(e.path());
                        }
                    }
                }
            }
        }
        out
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.kill9();
        for mp in self.mountpoints() {
            if is_mounted(&mp) {
                let _ = Command::new(horcrux_bin())
                    .arg("umount")
                    .arg(&mp)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                force_unmount(&mp);
            }
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Status code and body of an HTTP/1.1 response with a Content-Length.
pub fn parse_response(raw: &[u8]) -> (u16, Vec<u8>) {
    try_parse_response(raw)
        .unwrap_or_else(|| panic!("incomplete response {:?}", String::from_utf8_lossy(raw)))
}

/// [`parse_response`], or `None` if `raw` is not a whole response (cut off by a dying server).
pub fn try_parse_response(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(raw.len() - split - 4);
    let body = raw.get(split + 4..split + 4 + len)?;
    Some((status, body.to_vec()))
}

/// Wait up to `secs` for `cond`.
pub fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

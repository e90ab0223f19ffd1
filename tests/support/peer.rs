//! Peers in tests: a CA and node certificate (`horcrux tls`), `horcrux serve` as a child
//! process (restartable on its port, `kill -9`-able), and a read-only detached mount of an
//! access URL list. Shared by tests/peers.rs and tests/kill_matrix.rs.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::common::*;

pub fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// A CA and one node certificate valid for 127.0.0.1, in `dir`.
pub fn pki(dir: &Path) {
    horcrux_ok(&[os("tls"), os("init"), os("--dir"), dir.as_os_str()]);
    horcrux_ok(&[
        os("tls"),
        os("issue"),
        os("node"),
        os("--dir"),
        dir.as_os_str(),
        os("--san"),
        os("127.0.0.1"),
    ]);
}

/// `horcrux serve` as a child process, killed on drop.
pub struct Serve {
    child: Child,
    pub port: u16,
    log: PathBuf,
    /// How it was started, for [`Serve::restart`].
    tls: PathBuf,
    cache: PathBuf,
    args: Vec<String>,
}

impl Serve {
    /// Start on a free loopback port; `args` after `serve` (e.g. `--repo ...`).
    pub fn start(tls: &Path, cache: &Path, log: &Path, args: &[&str]) -> Serve {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (child, port) = Self::spawn(tls, cache, log, &args, 0, false);
        Serve {
            child,
            port,
            log: log.to_path_buf(),
            tls: tls.to_path_buf(),
            cache: cache.to_path_buf(),
            args,
        }
    }

    fn spawn(
        tls: &Path,
        cache: &Path,
        log: &Path,
        args: &[String],
        port: u16,
        append: bool,
    ) -> (Child, u16) {
        let logf = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(log)
            .unwrap();
        let mut child = Command::new(horcrux_bin())
            .arg("--tls-dir")
            .arg(tls)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--cache-dir",
            ])
            .arg(cache)
            .args(args)
            // Each range read is logged at debug level: the tests count them.
            .env("RUST_LOG", "info,horcrux_proto::peer=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(logf)
            .spawn()
            .expect("start horcrux serve");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let port = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok());
        match port {
            Some(p) => (child, p),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "serve printed {line:?}; its log:\n{}",
                    fs::read_to_string(log).unwrap_or_default()
                )
            }
        }
    }

    /// Start it again (after [`Serve::kill`]) on the same port, with the same arguments,
    /// appending to its log.
    pub fn restart(&mut self) {
        self.kill();
        let (child, _) = Self::spawn(
            &self.tls,
            &self.cache,
            &self.log,
            &self.args,
            self.port,
            true,
        );
        self.child = child;
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, repo: &str) -> String {
        format!("horcrux://127.0.0.1:{}/{repo}", self.port)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Range reads of chunks this server answered.
    pub fn chunk_reads(&self) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains("range read") && l.contains("chunks/"))
            .count()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A read-only detached mount of an access URL list; unmounted on drop.
pub struct PeerMount {
    pub mountpoint: PathBuf,
    pub pid: u32,
    pub log: PathBuf,
}

impl PeerMount {
    pub fn new(tls: &Path, access: &str, mountpoint: &Path, cache: &Path, extra: &[&str]) -> Self {
        fs::create_dir_all(mountpoint).unwrap();
        let mut args: Vec<&OsStr> = vec![
            os("--tls-dir"),
            tls.as_os_str(),
            os("mount"),
            os(access),
            mountpoint.as_os_str(),
            os("--cache-dir"),
            cache.as_os_str(),
            os("--read-only"),
        ];
        args.extend(extra.iter().map(OsStr::new));
        let out = horcrux_ok(&args);
        let pid = out
            .split("(pid ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in mount's output: {out}"));
        let log = out
            .split("log: ")
            .nth(1)
            .map(|r| PathBuf::from(r.trim().trim_end_matches(')')))
            .unwrap_or_default();
        PeerMount {
            mountpoint: mountpoint.canonicalize().unwrap(),
            pid,
            log,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PeerMount {
    fn drop(&mut self) {
        if is_mounted(&self.mountpoint) {
            let _ = horcrux(&[os("umount"), self.mountpoint.as_os_str()]);
        }
        force_unmount(&self.mountpoint);
        if alive(self.pid) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        }
        let _ = fs::remove_file(&self.log);
    }
}

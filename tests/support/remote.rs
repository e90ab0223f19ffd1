//! Test helper: the `horcrux` CLI against remote stores — an OpenSSH server ([`super::sshd`])
//! and an S3 server ([`super::s3server`]) on loopback — with the real kernel FUSE.
//!
//! Include it after `mod common;`, `mod sshd;` and `mod s3server;` (each by `#[path]`).

#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::common::{Mount, horcrux_bin};
use super::s3server::S3Server;
use super::sshd::{self, Sshd};

/// Start an sshd, or fail (never skip) saying how to install it.
pub fn start_sshd() -> Sshd {
    assert!(
        sshd::available(),
        "/usr/sbin/sshd is missing: run tests/setup.sh (it installs Debian's openssh-server)"
    );
    Sshd::start()
}

/// Start moto with one bucket, or fail (never skip) saying how to install it.
pub fn start_moto(bucket: &str) -> S3Server {
    let s = S3Server::moto();
    s.create_bucket(bucket);
    s
}

/// How the `horcrux` child reaches the servers: global store flags and environment.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub flags: Vec<OsString>,
    pub env: Vec<(String, String)>,
    /// A command that runs horcrux (e.g. `nsenter --net=/run/netns/X`); none = directly.
    pub wrap: Vec<OsString>,
}

impl Access {
    /// `--identity <client key> --known-hosts <file naming the server>`.
    pub fn ssh(s: &Sshd) -> Access {
        Access::default().with_ssh(s)
    }

    pub fn with_ssh(mut self, s: &Sshd) -> Access {
        self.flags.extend([
            "--identity".into(),
            s.client_key.clone().into(),
            "--known-hosts".into(),
            s.known_hosts.clone().into(),
        ]);
        self
    }

    /// The server's keys in `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`.
    pub fn with_s3(mut self, s: &S3Server) -> Access {
        self.env.extend([
            ("AWS_ACCESS_KEY_ID".into(), s.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), s.secret_access_key.clone()),
        ]);
        self
    }

    pub fn flag(mut self, f: impl Into<OsString>) -> Access {
        self.flags.push(f.into());
        self
    }

    /// Run horcrux through `wrap` (a network namespace: `netns::Host::wrap`).
    pub fn wrapped(mut self, wrap: Vec<OsString>) -> Access {
        self.wrap = wrap;
        self
    }

    /// The command `run` runs, without its arguments.
    pub fn command(&self) -> Command {
        let mut c = match self.wrap.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(horcrux_bin());
                c
            }
            None => Command::new(horcrux_bin()),
        };
        // Nothing from the developer's own AWS setup may leak into the test.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("AWS_") {
                c.env_remove(k);
            }
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// `horcrux ARGS... <flags>` to completion (stdin closed).
    pub fn run(&self, args: &[&OsStr]) -> Output {
        let mut c = self.command();
        c.args(args).args(&self.flags).stdin(Stdio::null());
        c.output().expect("run horcrux")
    }

    /// [`Self::run`], which must succeed; returns stdout.
    pub fn ok(&self, args: &[&OsStr]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "horcrux {args:?} {:?} failed ({}):\nstdout: {}\nstderr: {}",
            self.flags,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// [`Self::run`], which must fail; returns stderr.
    pub fn fails(&self, args: &[&OsStr]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "horcrux {args:?} succeeded but should have failed:\nstdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `horcrux generate NAME IN OUT --chunk-size 1M`; returns its summary.
    pub fn generate(&self, name: &str, input: &Path, out: &str) -> String {
        self.ok(&[
            "generate".as_ref(),
            name.as_ref(),
            input.as_os_str(),
            out.as_ref(),
            "--chunk-size".as_ref(),
            "1M".as_ref(),
        ])
    }

    /// `horcrux mount ACCESS MP --cache-dir CACHE EXTRA...`, which must succeed. The mount is
    /// live on return and unmounted when the returned guard drops.
    pub fn mount(&self, access: &str, mp: &Path, cache: &Path, extra: &[&str]) -> Mount {
        let args = mount_args(access, mp, cache, extra);
        Mount::live(self.ok(&as_os_strs(&args)), mp, cache)
    }

    /// `horcrux mount ...` that must fail; returns its stderr (the mountpoint is created).
    pub fn mount_fails(&self, access: &str, mp: &Path, cache: &Path, extra: &[&str]) -> String {
        let args = mount_args(access, mp, cache, extra);
        let err = self.fails(&as_os_strs(&args));
        // The daemon's log of a failed mount is named in the message: do not leave it behind.
        if let Some(log) = err
            .rsplit_once("(log: ")
            .map(|(_, l)| l.trim_end().trim_end_matches(')'))
        {
            let _ = std::fs::remove_file(log);
        }
        assert!(
            !super::common::is_mounted(&mp.canonicalize().unwrap()),
            "a failed mount left {} mounted",
            mp.display()
        );
        err
    }
}

/// `s3://BUCKET/PREFIX?endpoint=...&region=...` on `s`.
pub fn s3_url(s: &S3Server, bucket_and_prefix: &str) -> String {
    format!(
        "s3://{bucket_and_prefix}?endpoint={}&region={}",
        s.endpoint(),
        s.region
    )
}

/// Run `f` on a thread and wait at most `limit` for it; `None` if it did not finish (the
/// thread is left behind, blocked: the caller's guards unmount, which ends the read).
pub fn within<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<(T, Duration)> {
    let (tx, rx) = mpsc::channel();
    let t = Instant::now();
    std::thread::spawn(move || {
        let v = f();
        let _ = tx.send((v, t.elapsed()));
    });
    rx.recv_timeout(limit).ok()
}

/// `read_at` of `len` bytes at `off` with O_DIRECT (no kernel cache or readahead in the way:
/// each call is one FUSE read), on a thread bounded by `limit`. Panics if it hangs.
pub fn read_direct_bounded(
    path: &Path,
    off: u64,
    len: usize,
    limit: Duration,
) -> (std::io::Result<Vec<u8>>, Duration) {
    let p = path.to_path_buf();
    within(limit, move || super::common::read_direct(&p, off, len)).unwrap_or_else(|| {
        panic!(
            "reading {len} bytes at {off} of {} hung for more than {limit:?}",
            path.display()
        )
    })
}

/// The `(W uploaded, ...)` count of `generate`'s summary, and its `in C chunks` total.
pub fn uploaded(summary: &str) -> (u64, u64) {
    let line = summary
        .lines()
        .find(|l| l.contains(" uploaded"))
        .unwrap_or_else(|| panic!("no upload count in generate's summary:\n{summary}"));
    let num_before = |marker: &str| -> u64 {
        let head = &line[..line
            .find(marker)
            .unwrap_or_else(|| panic!("no `{marker}` in {line}"))];
        head.rsplit(['(', ' '])
            .find(|w| !w.is_empty())
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("no number before `{marker}` in {line}"))
    };
    (num_before(" uploaded"), num_before(" chunks"))
}

/// Every regular file under `dir` (recursively), skipping dot-files.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// `cp -a SRC DST`.
pub fn copy_dir(src: &Path, dst: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(dst)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a {} {}", src.display(), dst.display());
}

/// `mount ACCESS MP --cache-dir CACHE EXTRA...` (creating MP); a writable mount keeps its
/// changes beside the mountpoint (`MP.overlay`), not in the state directory.
fn mount_args(access: &str, mp: &Path, cache: &Path, extra: &[&str]) -> Vec<OsString> {
    std::fs::create_dir_all(mp).unwrap();
    let mut args: Vec<OsString> = vec![
        "mount".into(),
        access.into(),
        mp.into(),
        "--cache-dir".into(),
        cache.into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    if !extra.contains(&"--read-only") {
        args.extend(["--overlay-dir".into(), mp.with_extension("overlay").into()]);
    }
    args
}

fn as_os_strs(args: &[OsString]) -> Vec<&OsStr> {
    args.iter().map(OsString::as_os_str).collect()
}

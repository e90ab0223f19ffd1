//! Test helper: a real OpenSSH server (Debian's `openssh-server`) on a 127.0.0.1 port, with a
//! generated host key, a generated client key in its `authorized_keys`, and a `known_hosts` file
//! that names it. Killed (with every process it forked) on drop.
//!
//! [`Sshd::start_with`] starts one on another address — a host of `support/netns.rs`, through
//! its `wrap()` command — and can log every SFTP request the server answers
//! ([`Sshd::sftp_reads`]), so a test can count what a client fetched at the source.
//!
//! Include it with `#[path = "support/sshd.rs"] mod sshd;`.

#![allow(dead_code)]

use std::ffi::OsString;
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";

/// A running `sshd -D -e -f <config>`.
#[derive(Debug)]
pub struct Sshd {
    dir: tempfile::TempDir,
    pub port: u16,
    /// The local user, who logs in with `client_key`.
    pub user: String,
    pub client_key: PathBuf,
    /// `known_hosts` with this server's host key (`[127.0.0.1]:PORT`, or `127.0.0.1` on 22).
    pub known_hosts: PathBuf,
    /// The host public key, `ssh-ed25519 AAAA...`.
    pub host_pub: String,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// The address it listens on.
    pub addr: String,
    /// Command prefix it runs under (a network namespace), empty on the test's own network.
    wrap: Vec<OsString>,
    /// The SFTP server's request log, when asked for.
    sftp_log: Option<PathBuf>,
}

/// Where and how [`Sshd::start_with`] runs the server.
#[derive(Debug, Clone, Default)]
pub struct SshdOptions {
    /// Listen address (default 127.0.0.1).
    pub addr: Option<String>,
    /// Run under this command prefix, e.g. `netns::Host::wrap()`.
    pub wrap: Vec<OsString>,
    /// Log each SFTP request (`sftp-server -l DEBUG1`), for [`Sshd::sftp_reads`].
    pub sftp_log: bool,
}

/// One SFTP read request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftpRead {
    pub path: String,
    pub offset: u64,
    pub len: u64,
}

/// Whether the OpenSSH server is installed.
pub fn available() -> bool {
    Path::new(SSHD).exists()
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .unwrap()
        .port()
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("run id -un");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Generate a key pair with `ssh-keygen`; returns the private key path.
pub fn keygen(path: &Path, kind: &str, passphrase: &str) -> PathBuf {
    let st = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            kind,
            "-N",
            passphrase,
            "-C",
            "horcrux-test",
            "-f",
        ])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .expect("run ssh-keygen (package openssh-client)");
    assert!(st.success(), "ssh-keygen -t {kind} failed");
    path.to_path_buf()
}

/// The public half of a key made by [`keygen`]: `type base64` (comment dropped).
pub fn public_key(private: &Path) -> String {
    let text = fs::read_to_string(private.with_extension("pub"))
        .or_else(|_| fs::read_to_string(format!("{}.pub", private.display())))
        .expect("read public key");
    let mut f = text.split_whitespace();
    format!("{} {}", f.next().unwrap(), f.next().unwrap())
}

impl Sshd {
    /// Start on a free port. Panics with a clear message if `sshd` is not installed.
    pub fn start() -> Sshd {
        // A free port can be taken between the probe and sshd's bind: try a few.
        let mut last = String::new();
        for _ in 0..5 {
            match Self::try_start_on(free_port()) {
                Ok(s) => return s,
                Err(e) => last = e,
            }
        }
        panic!("could not start sshd: {last}");
    }

    /// Start with `opts` (another address or network namespace, an SFTP request log). In a
    /// namespace of its own every port is free, so it listens on 2222.
    pub fn start_with(opts: SshdOptions) -> Sshd {
        if opts.wrap.is_empty() {
            let mut last = String::new();
            for _ in 0..5 {
                match Self::try_start_with(free_port(), &opts) {
                    Ok(s) => return s,
                    Err(e) => last = e,
                }
            }
            panic!("could not start sshd: {last}");
        }
        Self::try_start_with(2222, &opts).unwrap_or_else(|e| panic!("could not start sshd: {e}"))
    }

    /// Start on `port`; an error if sshd is missing or cannot listen there.
    pub fn try_start_on(port: u16) -> Result<Sshd, String> {
        Self::try_start_with(port, &SshdOptions::default())
    }

    fn try_start_with(port: u16, opts: &SshdOptions) -> Result<Sshd, String> {
        let addr = opts.addr.clone().unwrap_or_else(|| "127.0.0.1".into());
        if !available() {
            return Err(format!(
                "{SSHD} not found: install Debian's openssh-server (apt-get install -y openssh-server)"
            ));
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let d = dir.path();
        let host_key = keygen(&d.join("host_ed25519"), "ed25519", "");
        let client_key = keygen(&d.join("client_ed25519"), "ed25519", "");
        let authorized = d.join("authorized_keys");
        fs::write(&authorized, format!("{}\n", public_key(&client_key))).unwrap();
        let host_pub = public_key(&host_key);
        let known_hosts = d.join("known_hosts");
        let name = if port == 22 {
            addr.clone()
        } else {
            format!("[{addr}]:{port}")
        };
        fs::write(&known_hosts, format!("{name} {host_pub}\n")).unwrap();
        let config = d.join("sshd_config");
        let sftp_log = opts.sftp_log.then(|| d.join("sftp.log"));
        // sshd runs a subsystem's command through the user's shell, so the external
        // sftp-server's stderr (its log) can be sent to a file.
        let subsystem = match &sftp_log {
            Some(l) => format!(
                "/usr/lib/openssh/sftp-server -e -l DEBUG1 2>>{}",
                l.display()
            ),
            None => "internal-sftp".into(),
        };
        fs::write(
            &config,
            format!(
                "Port {port}\n\
                 ListenAddress {addr}\n\
                 HostKey {hk}\n\
                 PidFile {pid}\n\
                 AuthorizedKeysFile {auth}\n\
                 StrictModes no\n\
                 UsePAM no\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\n\
                 UseDNS no\n\
                 MaxStartups 100\n\
                 MaxSessions 50\n\
                 Subsystem sftp {subsystem}\n",
                hk = host_key.display(),
                pid = d.join("sshd.pid").display(),
                auth = authorized.display(),
            ),
        )
        .unwrap();
        // sshd refuses to start as root without its privilege separation directory.
        let _ = fs::create_dir_all("/run/sshd");
        let mut s = Sshd {
            port,
            user: current_user(),
            client_key,
            known_hosts,
            host_pub,
            log: d.join("sshd.log"),
            config,
            dir,
            child: None,
            addr,
            wrap: opts.wrap.clone(),
            sftp_log,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let listening_before = self.log_text().matches("Server listening on").count();
        let mut cmd = match self.wrap.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(SSHD);
                c
            }
            None => Command::new(SSHD),
        };
        let mut child = cmd
            .args(["-D", "-e", "-f"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {SSHD}: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return Err(format!("sshd exited ({st}): {}", self.log_text()));
            }
            // In another network namespace the test cannot connect: sshd says when it listens.
            let ready = if self.wrap.is_empty() {
                TcpStream::connect((self.addr.as_str(), self.port)).is_ok()
            } else {
                self.log_text().matches("Server listening on").count() > listening_before
            };
            if ready {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "sshd did not listen on {} in 10 s: {}",
                    self.port,
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
        Ok(())
    }

    /// Let `private`'s public half log in too.
    pub fn authorize(&self, private: &Path) {
        use std::io::Write;
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("authorized_keys"))
            .unwrap();
        writeln!(f, "{}", public_key(private)).unwrap();
    }

    /// The server's log so far (for assertion messages).
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A scratch directory private to this server (for repositories, other keys...).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `ssh://user@ADDR:PORT/<path>`.
    pub fn url(&self, path: &Path) -> String {
        format!(
            "ssh://{}@{}:{}{}",
            self.user,
            self.addr,
            self.port,
            path.display()
        )
    }

    /// Every SFTP read request answered so far (needs `SshdOptions::sftp_log`). A request
    /// asks for `len` bytes; fewer come back only at the end of a file.
    pub fn sftp_reads(&self) -> Vec<SftpRead> {
        let log = self
            .sftp_log
            .as_ref()
            .expect("sftp_reads needs SshdOptions::sftp_log");
        // debug1: request 7: read "/path" (handle 0) off 261120 len 261120
        fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let rest = l.split_once(": read \"")?.1;
                let (path, rest) = rest.split_once('"')?;
                let off = rest.split(" off ").nth(1)?.split_whitespace().next()?;
                let len = rest.split(" len ").nth(1)?.split_whitespace().next()?;
                Some(SftpRead {
                    path: path.to_string(),
                    offset: off.parse().ok()?,
                    len: len.parse().ok()?,
                })
            })
            .collect()
    }

    /// The listener's pid and every process it forked (per-connection servers call setsid(),
    /// so a process group would miss them).
    fn tree(&self) -> Vec<i32> {
        let Some(child) = &self.child else {
            return Vec::new();
        };
        let mut pids = vec![child.id() as i32];
        let mut parents: Vec<(i32, i32)> = Vec::new();
        for e in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may contain spaces, so split after ')'.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
                parents.push((pid, ppid));
            }
        }
        let mut i = 0;
        while i < pids.len() {
            let parent = pids[i];
            for (pid, ppid) in &parents {
                if *ppid == parent && !pids.contains(pid) {
                    pids.push(*pid);
                }
            }
            i += 1;
        }
        pids
    }

    fn signal(&self, sig: libc::c_int) {
        for pid in self.tree() {
            // SAFETY: kill(2) on processes this helper started (the sshd and its children).
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    /// Kill the server and every connection it serves, as a crash would.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// Start again on the same port with the same keys.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart after kill");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("sshd restart: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Freeze the server and its connections (SIGSTOP): TCP stays up, nothing answers.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.kill();
    }
}

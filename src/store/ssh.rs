//! `scp://` / `ssh://` store: a repository directory on an SSH host, read and written over SFTP.
//!
//! Threading: libssh2 is blocking, so every ssh2 call (connect, handshake, auth, SFTP, and the
//! teardown of a session) runs on tokio's blocking pool, never on an async worker.
//!
//! Sessions: a pool of at most N (default 4) SSH sessions for bulk transfers plus
//! `SMALL_READ_SESSIONS` (2) that only small reads may take, each with its own SFTP channel,
//! created lazily. Semaphores bound how many operations run at once, so reads run in parallel
//! and a small read (a piece) never queues behind N block transfers. Each session keeps the
//! files it read last open, and a read goes to a session holding its file when one is idle.
//! A session whose transport failed (timeout, reset, disconnect) is dropped
//! and a new one is made on the next use, so the store recovers when the server comes back.
//! Every blocking libssh2 call is bounded by the session timeout: a dead or frozen server makes a
//! call fail, never hang.
//!
//! Semantics mirror the `file://` store: keys are paths relative to the repository root; `put`
//! writes `.<name>.tmp.<pid>.<n>` and renames it over the key with OpenSSH's
//! `posix-rename@openssh.com` (plain SFTP v3 rename refuses to overwrite); `list` skips dot-files;
//! `compare_and_swap` is serialised per directory by an atomic `mkdir <dir>/.lock.d`.
//!
//! Host keys are checked against `known_hosts` (OpenSSH format, hashed entries included, and
//! `[host]:port` entries for ports other than 22) unless the caller explicitly opts out.

use std::ffi::{c_char, c_int};
use std::fmt;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use ssh2::{ErrorCode, FileStat, HashType, HostKeyType, MethodType, OpenFlags, OpenType, Session};
use tokio::sync::Semaphore;
use tracing::Instrument;

use super::{AccessUrl, Store, StoreError, StoreOptions};

/// Default number of parallel SSH sessions per store for bulk transfers.
pub const DEFAULT_SESSIONS: usize = 4;
/// Sessions a store may open beyond its bulk ones, used only by small reads (at most
/// `SMALL_READ` bytes: a cold small read's pieces and piece hashes, two at once). Without them
/// a small read waited for a session behind 1 MiB block transfers (the whole blocks that follow
/// piece reads, chunk fills, a sequential reader's prefetch): 6 ms of a cold 4 KiB read's
/// median on a loaded machine (BENCHMARKS.md, "Cold path").
pub const SMALL_READ_SESSIONS: usize = 2;
/// How much lower than a small read's the CPU priority (nice value) of a bulk transfer is.
const BULK_NICE: libc::c_int = 10;
/// Largest read that may use the sessions kept for small reads: a quarter of a 1 MiB block,
/// the most a piece read asks for.
const SMALL_READ: u64 = 256 << 10;
/// Default TCP connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on any one blocking SSH call (handshake, auth, one SFTP request).
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `compare_and_swap` waits for another writer's lock before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(10);
/// A CAS lock older than this is left over by a writer that died; it is broken.
const LOCK_STALE_SECS: u64 = 60;
/// `get_to_file` streams in pieces of this size, never holding a whole object in memory.
const STREAM_PIECE: usize = 4 << 20;

/// Ciphers in order of preference. libssh2 decrypts a packet 16 bytes per call into OpenSSL
/// (`transport.c`, `ssh2_cipher_crypt`): for AES-CTR that still runs at ~1 GB/s with AES-NI,
/// but AES-GCM falls to ~55 MB/s (per-call GHASH setup; `openssl speed -evp aes-128-gcm`, 16-byte
/// column), and chacha20-poly1305 is libssh2's own portable C code. So AES-CTR (with an
/// encrypt-then-MAC SHA-2 HMAC, SHA-NI in OpenSSL) comes first; the rest keep the defaults'
/// order for servers without it.
const CIPHER_PREFERENCE: &[&str] = &[
    "aes128-ctr",
    "aes256-ctr",
    "aes192-ctr",
    "chacha20-poly1305@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
];
const MAC_PREFERENCE: &[&str] = &[
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512-etm@openssh.com",
    "hmac-sha2-512",
];

/// Put the fast ciphers and MACs first; every other algorithm libssh2 supports stays
/// acceptable after them, so no server that worked before is refused.
fn prefer_fast_transport(sess: &Session) {
    for (kinds, wanted) in [
        (
            [MethodType::CryptCs, MethodType::CryptSc],
            CIPHER_PREFERENCE,
        ),
        ([MethodType::MacCs, MethodType::MacSc], MAC_PREFERENCE),
    ] {
        for kind in kinds {
            let supported = sess.supported_algs(kind).unwrap_or_default();
            let mut prefs: Vec<&str> = wanted
                .iter()
                .copied()
                .filter(|a| supported.contains(a))
                .collect();
            let rest: Vec<&str> = supported
                .iter()
                .copied()
                .filter(|a| !prefs.contains(a))
                .collect();
            prefs.extend(rest);
            if !prefs.is_empty() {
                let _ = sess.method_pref(kind, &prefs.join(","));
            }
        }
    }
}

/// Files each session keeps open for reading (chunks and piece outboards). An operation on a
/// key goes to an idle session that has its file open when there is one, so with a few
/// sessions this covers the chunks (and their outboards) a reader is busy with: a read of a
/// recently touched chunk is one SFTP round trip, not three (open, read, close). 32 handles
/// are 32 file descriptors of the session's sftp-server.
const OPEN_READS: usize = 32;

/// Keys refused (their bytes failed verification) that [`Inner::refused`] remembers; past
/// that it forgets them and every handle opened before then is reopened instead.
const REFUSED_MAX: usize = 256;

/// `exists` spreads key batches over sessions only when each gets at least this many keys.
const EXISTS_BATCH_MIN: usize = 32;

const LOCK_NAME: &str = ".lock.d";

const HOST_KEY_PREFERENCE: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "rsa-sha2-512",
    "rsa-sha2-256",
    "ssh-rsa",
    "ssh-dss",
];

// libssh2 has this function, but neither libssh2-sys nor ssh2 bind it. It lives in the
// libssh2 library that libssh2-sys builds and links.
unsafe extern "C" {
    fn libssh2_sftp_posix_rename_ex(
        sftp: *mut libssh2_sys::LIBSSH2_SFTP,
        source_filename: *const c_char,
        source_filename_len: libc::size_t,
        dest_filename: *const c_char,
        dest_filename_len: libc::size_t,
    ) -> c_int;
}

/// A repository on an SSH host, accessed over SFTP.
pub struct SshStore {
    inner: Arc<Inner>,
}

struct Inner {
    user: String,
    host: String,
    port: u16,
    /// Repository root on the server, without a trailing slash ("" for `/`).
    root: String,
    describe: String,
    auth: AuthPlan,
    /// `None` = host-key checking explicitly turned off.
    known_hosts: Option<PathBuf>,
    warned_insecure: AtomicBool,
    connect_timeout: Duration,
    io_timeout: Duration,
    /// One per session: every operation holds one while it uses a session.
    permits: Arc<Semaphore>,
    /// Held, besides a session permit, by every operation but a small read: bulk transfers
    /// never take the last `SMALL_READ_SESSIONS` sessions.
    bulk: Arc<Semaphore>,
    /// Sessions for bulk transfers (`--ssh-sessions`); the pool holds up to
    /// `SMALL_READ_SESSIONS` more.
    sessions: usize,
    /// Pre-open the pool's other sessions after the first success (`StoreOptions::ssh_warm_pool`);
    /// cleared once that was started.
    warm_pool: AtomicBool,
    idle: Mutex<Vec<Conn>>,
    /// Files whose bytes failed verification: a handle opened before the refusal is closed and
    /// the file opened again, so a file replaced on the server (repaired, by rename) is read
    /// anew instead of through the old file's handle.
    refused: Mutex<Refused>,
    live: Arc<AtomicUsize>,
    tmp_seq: AtomicU64,
    tmp_tag: u64,
    /// Passphrase of an encrypted `--identity`, asked once and kept in memory only, so that new
    /// pool sessions do not ask again. Also serialises the prompt.
    passphrase: Mutex<Option<String>>,
}

#[derive(Debug, Clone)]
struct AuthPlan {
    identity: Option<PathBuf>,
    agent: bool,
    default_keys: Vec<PathBuf>,
    home: Option<PathBuf>,
}

impl fmt::Debug for SshStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshStore")
            .field("location", &self.inner.describe)
            .field("sessions", &self.inner.permits.available_permits())
            .finish_non_exhaustive()
    }
}

/// What SSH takes from the local user's environment: the default user name, the home
/// directory (for `~/.ssh`), and whether an ssh-agent is reachable. The CLI reads it once with
/// [`SshEnv::from_process`]; the library only falls back to that when given none.
#[derive(Debug, Clone, Default)]
pub struct SshEnv {
    pub user: Option<String>,
    pub home: Option<PathBuf>,
    pub agent: bool,
}

impl SshEnv {
    /// `$USER` (else the passwd entry), `$HOME` (else the passwd entry), `$SSH_AUTH_SOCK`.
    pub fn from_process() -> Self {
        let (pw_name, pw_home) = passwd_entry().unzip();
        Self {
            user: std::env::var("USER")
                .ok()
                .filter(|u| !u.is_empty())
                .or(pw_name),
            home: std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(PathBuf::from)
                .or(pw_home),
            agent: std::env::var_os("SSH_AUTH_SOCK").is_some_and(|s| !s.is_empty()),
        }
    }
}

impl SshStore {
    /// A store for `path` on `host:port`, logging in as `user` (default: the local user).
    /// Does not connect: sessions are made on first use.
    pub fn new(
        user: Option<&str>,
        host: &str,
        port: u16,
        path: &str,
        options: &StoreOptions,
    ) -> Result<Self, StoreError> {
        let env = options.ssh_env.clone().unwrap_or_else(SshEnv::from_process);
        let user = match user {
            Some(u) => u.to_string(),
            None => env.user.clone().ok_or_else(|| StoreError::Other {
                store: format!("ssh://{host}:{port}{path}"),
                message: "no user name in the URL and the local user is unknown: \
                              write ssh://user@host:port/path"
                    .into(),
            })?,
        };
        let home = env.home.clone();
        let root = path.trim_end_matches('/').to_string();
        let host_disp = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let describe = format!(
            "ssh://{user}@{host_disp}:{port}/{}",
            root.trim_start_matches('/')
        );
        let known_hosts = if options.ssh_insecure_ignore_host_key {
            None
        } else {
            Some(match &options.ssh_known_hosts {
                Some(p) => p.clone(),
                None => home
                    .as_ref()
                    .map(|h| h.join(".ssh/known_hosts"))
                    .ok_or_else(|| StoreError::Other {
                        store: describe.clone(),
                        message: "cannot find ~/.ssh/known_hosts: the home directory is unknown; \
                                  pass --known-hosts FILE"
                            .into(),
                    })?,
            })
        };
        let default_keys = home
            .as_ref()
            .map(|h| {
                ["id_ed25519", "id_ecdsa", "id_rsa"]
                    .iter()
                    .map(|n| h.join(".ssh").join(n))
                    .collect()
            })
            .unwrap_or_default();
        let auth = AuthPlan {
            identity: options.ssh_identity.clone(),
            agent: env.agent,
            default_keys,
            home,
        };
        let sessions = options.ssh_sessions.unwrap_or(DEFAULT_SESSIONS).max(1);
        let tmp_tag = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64 ^ d.as_secs())
            .unwrap_or(0);
        Ok(Self {
            inner: Arc::new(Inner {
                user,
                host: host.to_string(),
                port,
                root,
                describe,
                auth,
                known_hosts,
                warned_insecure: AtomicBool::new(false),
                connect_timeout: options
                    .ssh_io_timeout
                    .map_or(DEFAULT_CONNECT_TIMEOUT, |t| t.min(DEFAULT_CONNECT_TIMEOUT)),
                io_timeout: options.ssh_io_timeout.unwrap_or(DEFAULT_IO_TIMEOUT),
                permits: Arc::new(Semaphore::new(sessions + SMALL_READ_SESSIONS)),
                bulk: Arc::new(Semaphore::new(sessions)),
                sessions,
                warm_pool: AtomicBool::new(options.ssh_warm_pool && sessions > 1),
                idle: Mutex::new(Vec::new()),
                refused: Mutex::new(Refused::default()),
                live: Arc::new(AtomicUsize::new(0)),
                tmp_seq: AtomicU64::new(0),
                tmp_tag,
                passphrase: Mutex::new(None),
            }),
        })
    }

    /// A store for an `AccessUrl::Ssh`.
    pub fn from_url(url: &AccessUrl, options: &StoreOptions) -> Result<Self, StoreError> {
        match url {
            AccessUrl::Ssh {
                user,
                host,
                port,
                path,
            } => Self::new(user.as_deref(), host, *port, path, options),
            other => Err(StoreError::Unsupported(format!(
                "{other}: not an scp:// or ssh:// URL"
            ))),
        }
    }

    /// Change the TCP connect timeout and the bound on each blocking SSH call.
    /// Must be called before the store is used.
    pub fn with_timeouts(mut self, connect: Duration, io: Duration) -> Self {
        let inner = Arc::get_mut(&mut self.inner).expect("with_timeouts before first use");
        inner.connect_timeout = connect;
        inner.io_timeout = io;
        self
    }

    /// Number of SSH sessions currently open (idle or busy).
    pub fn open_sessions(&self) -> usize {
        self.inner.live.load(Ordering::Relaxed)
    }

    fn map_err(&self, key: &str, e: OpError) -> StoreError {
        self.inner.map_err(key, e)
    }

    async fn run<T, F>(&self, key: &str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Inner, &mut Conn) -> Result<T, OpError> + Send + 'static,
    {
        run(self.inner.clone(), key, None, false, f).await
    }

    /// Number of files the idle sessions hold open for reading (tests, diagnostics).
    pub fn open_read_handles(&self) -> usize {
        self.inner
            .idle
            .lock()
            .iter()
            .map(|c| c.open_reads.borrow().len())
            .sum()
    }
}

/// What [`Inner::refused`] keeps: when each refused file was refused, and a time before which
/// every handle is suspect (set when the map overflowed and was forgotten).
#[derive(Default)]
struct Refused {
    keys: std::collections::HashMap<String, Instant>,
    all_before: Option<Instant>,
}

impl Refused {
    /// Must a handle of `path` opened at `opened` be reopened?
    fn stale(&self, path: &str, opened: Instant) -> bool {
        self.all_before.is_some_and(|t| opened <= t)
            || self.keys.get(path).is_some_and(|&t| opened <= t)
    }
}

/// Run `f` with a pooled connection on the blocking pool, preferring an idle one that holds
/// `prefer` (a remote path) open; a `small` read may use the sessions bulk transfers leave
/// free. If a connection taken from the pool turns out to be dead (the server restarted since
/// it was last used) and the operation is safe to repeat, it is retried once on a fresh
/// connection.
async fn run<T, F>(
    inner: Arc<Inner>,
    key: &str,
    prefer: Option<String>,
    small: bool,
    f: F,
) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: Fn(&Inner, &mut Conn) -> Result<T, OpError> + Send + 'static,
{
    let t0 = Instant::now();
    let bulk = if small {
        None
    } else {
        Some(
            inner
                .bulk
                .clone()
                .acquire_owned()
                .await
                .expect("ssh bulk semaphore is never closed"),
        )
    };
    let permit = inner
        .permits
        .clone()
        .acquire_owned()
        .await
        .expect("ssh session semaphore is never closed");
    let t_permit = t0.elapsed();
    let task_inner = inner.clone();
    let (r, t_started, t_done) = tokio::task::spawn_blocking(move || {
        // The permits move here so that a cancelled caller cannot let more than N sessions
        // run at once: they are released when the blocking work is done.
        let _permits = (permit, bulk);
        // A bulk transfer gives way on the CPU to small reads: on a busy machine the
        // decryption of a 1 MiB block (or a fill's run of them) delayed each wake-up of a
        // small read queued behind it by milliseconds.
        let _lower = (!small).then(|| crate::util::LowerPriority::new(BULK_NICE));
        let t_started = t0.elapsed();
        let r = task_inner.with_conn(prefer.as_deref(), f);
        (r, t_started, t0.elapsed())
    })
    .await
    .expect("ssh store task panicked");
    tracing::trace!(
        target: "horcrux::timing",
        key,
        permit_us = t_permit.as_micros() as u64,
        hop_in_us = (t_started - t_permit).as_micros() as u64,
        work_us = (t_done - t_started).as_micros() as u64,
        hop_out_us = t0.elapsed().saturating_sub(t_done).as_micros() as u64,
        "ssh op"
    );
    if r.is_ok() && inner.warm_pool.swap(false, Ordering::Relaxed) {
        warm_pool(&inner);
    }
    r.map_err(|e| inner.map_err(key, e))
}

/// Open the pool's remaining sessions in the background (each under a permit, so the pool
/// never exceeds its size): a handshake costs 10-200 ms, and a cold small read asks for its
/// piece and the piece hashes on two sessions at once.
fn warm_pool(inner: &Arc<Inner>) {
    let pool = inner.sessions + SMALL_READ_SESSIONS;
    let missing = pool.saturating_sub(inner.live.load(Ordering::Relaxed));
    for _ in 0..missing {
        let Ok(permit) = inner.permits.clone().try_acquire_owned() else {
            return; // in use: those operations open their own sessions
        };
        let inner = inner.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            if inner.live.load(Ordering::Relaxed) >= pool {
                return;
            }
            match inner.connect() {
                Ok(c) => inner.idle.lock().push(c),
                Err(e) => {
                    tracing::debug!(store = %inner.describe, "could not pre-open an SSH session: {e:?}")
                }
            }
        });
    }
}

/// Errors inside one operation, before they become a [`StoreError`].
#[derive(Debug)]
enum OpError {
    /// An ssh2 call failed: an SFTP status (the session is fine) or a transport error.
    Ssh(ssh2::Error),
    /// Reading or writing a remote file failed; treated as a transport error.
    Remote(io::Error),
    /// Local file I/O (`get_to_file`).
    Local(io::Error),
    /// The object is shorter than the requested range.
    PastEnd(String),
    /// Connecting, host-key check or authentication failed.
    Connect(String),
    /// CAS lock could not be taken.
    Lock(String),
    Conflict,
    /// An error after a non-repeatable step (e.g. while holding the CAS lock): never retried.
    Committed(Box<OpError>),
}

impl From<ssh2::Error> for OpError {
    fn from(e: ssh2::Error) -> Self {
        OpError::Ssh(e)
    }
}

impl OpError {
    fn inner(&self) -> &OpError {
        match self {
            OpError::Committed(e) => e.inner(),
            e => e,
        }
    }

    /// Whether the connection this happened on can no longer be trusted.
    fn breaks_session(&self) -> bool {
        match self.inner() {
            OpError::Ssh(e) => matches!(e.code(), ErrorCode::Session(_)),
            OpError::Remote(_) | OpError::Connect(_) => true,
            _ => false,
        }
    }

    /// Worth one more try on a fresh session: the old one was found dead (e.g. the server
    /// restarted). Not after a timeout, which would double the time a caller waits.
    fn retryable(&self) -> bool {
        let timed_out = match self {
            OpError::Ssh(e) => e.code() == ErrorCode::Session(libssh2_sys::LIBSSH2_ERROR_TIMEOUT),
            OpError::Remote(e) => e.kind() == io::ErrorKind::TimedOut,
            _ => false,
        };
        !matches!(self, OpError::Committed(_)) && !timed_out && self.breaks_session()
    }

    fn is_not_found(&self) -> bool {
        match self.inner() {
            OpError::Ssh(e) => is_no_such_file(e),
            OpError::Remote(e) => e.kind() == io::ErrorKind::NotFound,
            _ => false,
        }
    }
}

fn is_no_such_file(e: &ssh2::Error) -> bool {
    matches!(
        e.code(),
        ErrorCode::SFTP(libssh2_sys::LIBSSH2_FX_NO_SUCH_FILE)
            | ErrorCode::SFTP(libssh2_sys::LIBSSH2_FX_NO_SUCH_PATH)
    )
}

fn sftp_code(e: &OpError) -> Option<c_int> {
    match e.inner() {
        OpError::Ssh(e) => match e.code() {
            ErrorCode::SFTP(c) => Some(c),
            ErrorCode::Session(_) => None,
        },
        _ => None,
    }
}

fn ssh_to_io(e: &ssh2::Error) -> io::Error {
    let kind = match e.code() {
        ErrorCode::Session(libssh2_sys::LIBSSH2_ERROR_TIMEOUT) => io::ErrorKind::TimedOut,
        ErrorCode::Session(_) => io::ErrorKind::ConnectionAborted,
        ErrorCode::SFTP(libssh2_sys::LIBSSH2_FX_NO_SUCH_FILE)
        | ErrorCode::SFTP(libssh2_sys::LIBSSH2_FX_NO_SUCH_PATH) => io::ErrorKind::NotFound,
        ErrorCode::SFTP(libssh2_sys::LIBSSH2_FX_PERMISSION_DENIED) => {
            io::ErrorKind::PermissionDenied
        }
        ErrorCode::SFTP(libssh2_sys::LIBSSH2_FX_FILE_ALREADY_EXISTS) => {
            io::ErrorKind::AlreadyExists
        }
        ErrorCode::SFTP(_) => io::ErrorKind::Other,
    };
    let what = match e.code() {
        ErrorCode::Session(libssh2_sys::LIBSSH2_ERROR_TIMEOUT) => {
            "no answer from the SSH server in time".to_string()
        }
        ErrorCode::Session(_) => format!("SSH connection failed: {}", e.message()),
        ErrorCode::SFTP(_) => format!("SFTP: {}", e.message()),
    };
    io::Error::new(kind, what)
}

impl Inner {
    fn map_err(&self, key: &str, e: OpError) -> StoreError {
        let store = self.describe.clone();
        let key = key.to_string();
        if e.is_not_found() {
            return StoreError::NotFound { store, key };
        }
        let e = match e {
            OpError::Committed(e) => *e,
            e => e,
        };
        match e {
            OpError::Ssh(e) => StoreError::Io {
                store,
                key,
                source: ssh_to_io(&e),
            },
            OpError::Remote(source) => {
                let what = if source.kind() == io::ErrorKind::TimedOut {
                    "no answer from the SSH server in time".to_string()
                } else {
                    format!("SSH transfer failed: {source}")
                };
                StoreError::Io {
                    store,
                    key,
                    source: io::Error::new(source.kind(), what),
                }
            }
            OpError::Local(source) => StoreError::Io { store, key, source },
            OpError::PastEnd(m) => StoreError::Io {
                store,
                key,
                source: io::Error::new(io::ErrorKind::UnexpectedEof, m),
            },
            OpError::Connect(message) | OpError::Lock(message) => {
                StoreError::Other { store, message }
            }
            OpError::Conflict => StoreError::CasConflict { store, key },
            OpError::Committed(_) => unreachable!("unwrapped above"),
        }
    }

    /// The remote path of `key`. Keys may come from peers (a read-through `horcrux serve`), so
    /// an absolute key or one with `..` is refused rather than joined (it would name a file
    /// outside the repository on the SSH host).
    fn path(&self, key: &str) -> Result<String, StoreError> {
        if !super::valid_key(key) {
            return Err(StoreError::BadKey {
                store: self.describe.clone(),
                key: key.to_string(),
            });
        }
        Ok(format!("{}/{}", self.root, key))
    }

    fn temp_path(&self, path: &str) -> String {
        let (dir, name) = split_path(path);
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        format!(
            "{dir}/.{name}.tmp.{}.{:08x}{n}",
            std::process::id(),
            self.tmp_tag & 0xffff_ffff
        )
    }

    fn with_conn<T>(
        &self,
        prefer: Option<&str>,
        f: impl Fn(&Inner, &mut Conn) -> Result<T, OpError>,
    ) -> Result<T, OpError> {
        let mut retried = false;
        loop {
            // A retry always uses a fresh session: the other pooled ones may be stale too.
            let pooled = if retried {
                None
            } else {
                let mut idle = self.idle.lock();
                let holder = prefer.and_then(|path| {
                    idle.iter()
                        .rposition(|c| c.open_reads.borrow().iter().any(|h| h.path == path))
                });
                match holder {
                    Some(i) => Some(idle.remove(i)),
                    None => idle.pop(),
                }
            };
            let reused = pooled.is_some();
            let mut conn = match pooled {
                Some(c) => c,
                None => self.connect()?,
            };
            match f(self, &mut conn) {
                Ok(v) => {
                    self.idle.lock().push(conn);
                    return Ok(v);
                }
                Err(e) if e.breaks_session() => {
                    tracing::debug!(store = %self.describe, "dropping SSH session: {e:?}");
                    self.discard(conn);
                    if reused && !retried && e.retryable() {
                        retried = true;
                        continue;
                    }
                    return Err(e);
                }
                Err(e) => {
                    self.idle.lock().push(conn);
                    return Err(e);
                }
            }
        }
    }

    fn discard(&self, conn: Conn) {
        // Shut the socket first so libssh2's teardown (closing handles, SFTP shutdown) fails at
        // once instead of waiting for a server that is gone.
        let _ = conn.socket.shutdown(Shutdown::Both);
        drop(conn);
    }

    /// TCP connect, handshake, host-key check, authentication, SFTP channel.
    fn connect(&self) -> Result<Conn, OpError> {
        let target = format!("{}:{}", self.host, self.port);
        let fail = |m: String| OpError::Connect(m);
        let addrs: Vec<_> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| fail(format!("cannot resolve host `{}`: {e}", self.host)))?
            .collect();
        let mut last = None;
        let mut tcp = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, self.connect_timeout) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = tcp.ok_or_else(|| {
            let why = match last {
                Some(e) if e.kind() == io::ErrorKind::TimedOut => {
                    format!("no answer within {} s", self.connect_timeout.as_secs_f32())
                }
                Some(e) => e.to_string(),
                None => "the name has no address".to_string(),
            };
            fail(format!("cannot connect to {target}: {why}"))
        })?;
        let _ = tcp.set_nodelay(true);
        let socket = tcp
            .try_clone()
            .map_err(|e| fail(format!("cannot connect to {target}: {e}")))?;

        let mut sess = Session::new().map_err(|e| fail(format!("cannot start SSH: {e}")))?;
        sess.set_timeout(self.io_timeout.as_millis().min(u32::MAX as u128) as u32);
        sess.set_tcp_stream(tcp);

        prefer_fast_transport(&sess);
        let host_check = self.prepare_host_check(&sess)?;
        sess.handshake().map_err(|e| {
            let _ = socket.shutdown(Shutdown::Both);
            fail(format!(
                "SSH handshake with {target} failed: {}",
                ssh_to_io(&e)
            ))
        })?;
        if let Err(e) = self.check_host_key(&sess, host_check) {
            let _ = socket.shutdown(Shutdown::Both);
            return Err(e);
        }
        if let Err(e) = self.authenticate(&sess) {
            let _ = socket.shutdown(Shutdown::Both);
            return Err(e);
        }
        let sftp = sess.sftp().map_err(|e| {
            let _ = socket.shutdown(Shutdown::Both);
            fail(format!(
                "{target}: cannot start SFTP (is the sftp subsystem enabled in sshd_config?): {}",
                ssh_to_io(&e)
            ))
        })?;
        self.live.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(store = %self.describe, "SSH session opened");
        Ok(Conn {
            open_reads: std::cell::RefCell::new(Vec::new()),
            renamer: None,
            sftp,
            session: sess,
            socket,
            _live: LiveGuard(self.live.clone()),
        })
    }

    /// Known-hosts lines that name this host, and a host-key algorithm preference so the server
    /// offers a key of a type we know for it (as OpenSSH does). `None` = checking is off.
    fn prepare_host_check(&self, sess: &Session) -> Result<Option<HostCheck>, OpError> {
        let Some(file) = &self.known_hosts else {
            if !self.warned_insecure.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    store = %self.describe,
                    "SSH host key checking is turned off (--insecure-ignore-host-key): \
                     the server's identity is not verified"
                );
            }
            return Ok(None);
        };
        let text = match fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(OpError::Connect(format!(
                    "cannot read known_hosts file {}: {e}",
                    file.display()
                )));
            }
        };
        let spec = self.known_hosts_name();
        let mut entries = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            // Markers (@cert-authority, @revoked) are not supported by libssh2's parser.
            if line.is_empty() || line.starts_with('#') || line.starts_with('@') {
                continue;
            }
            let Some(key_type) = line.split_whitespace().nth(1) else {
                continue;
            };
            let Ok(mut kh) = sess.known_hosts() else {
                continue;
            };
            if kh.read_str(line, ssh2::KnownHostFileKind::OpenSSH).is_err() {
                continue;
            }
            // Any key: a match or a mismatch both mean the line names this host.
            match kh.check(&spec, b"not a key") {
                ssh2::CheckResult::Match | ssh2::CheckResult::Mismatch => {
                    entries.push((key_type.to_string(), line.to_string()));
                }
                _ => {}
            }
        }
        if !entries.is_empty() {
            let supported = sess.supported_algs(MethodType::HostKey).unwrap_or_default();
            let mut prefs: Vec<&str> = Vec::new();
            for (t, _) in &entries {
                let algs: Vec<&str> = match t.as_str() {
                    "ssh-rsa" => vec!["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"],
                    other => vec![other],
                };
                for a in algs {
                    if supported.contains(&a) && !prefs.contains(&a) {
                        prefs.push(a);
                    }
                }
            }
            // Strongest first, as OpenSSH orders them; unknown types last.
            prefs.sort_by_key(|a| {
                HOST_KEY_PREFERENCE
                    .iter()
                    .position(|p| p == a)
                    .unwrap_or(usize::MAX)
            });
            if !prefs.is_empty() {
                // Then the rest, so a server without any known type still connects and gets a
                // precise "known with another type" error instead of a failed key exchange.
                for a in &supported {
                    if !prefs.contains(a) {
                        prefs.push(a);
                    }
                }
                let _ = sess.method_pref(MethodType::HostKey, &prefs.join(","));
            }
        }
        Ok(Some(HostCheck {
            file: file.clone(),
            entries,
        }))
    }

    /// The name under which known_hosts records this host: `host`, or `[host]:port`.
    fn known_hosts_name(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("[{}]:{}", self.host, self.port)
        }
    }

    fn check_host_key(&self, sess: &Session, check: Option<HostCheck>) -> Result<(), OpError> {
        let Some(check) = check else {
            return Ok(());
        };
        let target = format!("{}:{}", self.host, self.port);
        let Some((key, key_type)) = sess.host_key() else {
            return Err(OpError::Connect(format!(
                "{target} sent no host key; not connecting"
            )));
        };
        let type_name = host_key_type_name(key_type);
        let fingerprint = sess
            .host_key_hash(HashType::Sha256)
            .map(|h| format!("SHA256:{}", base64_encode(h)))
            .unwrap_or_else(|| "(fingerprint unavailable)".into());
        let spec = self.known_hosts_name();
        for (_, line) in &check.entries {
            let Ok(mut kh) = sess.known_hosts() else {
                continue;
            };
            if kh.read_str(line, ssh2::KnownHostFileKind::OpenSSH).is_ok()
                && matches!(kh.check(&spec, key), ssh2::CheckResult::Match)
            {
                return Ok(());
            }
        }
        let file = check.file.display();
        let same_type = check.entries.iter().any(|(t, _)| t == type_name);
        if same_type {
            return Err(OpError::Connect(format!(
                "WARNING: THE HOST KEY OF {target} HAS CHANGED! The server now presents \
                 {type_name} {fingerprint}, which differs from the key recorded for it in {file}. \
                 Someone could be eavesdropping on you right now (a man-in-the-middle attack), \
                 or the host's key was replaced. Not connecting. If you know the change is \
                 legitimate, remove the old key with `ssh-keygen -R '{spec}' -f {file}` and add \
                 the new one (`ssh-keyscan -p {port} {host} >> {file}`, after checking the \
                 fingerprint).",
                port = self.port,
                host = self.host,
            )));
        }
        let other = if check.entries.is_empty() {
            String::new()
        } else {
            let types: Vec<&str> = check.entries.iter().map(|(t, _)| t.as_str()).collect();
            format!(
                " ({file} only has a key of another type for it: {})",
                types.join(", ")
            )
        };
        Err(OpError::Connect(format!(
            "the host key of {target} is not known{other}: the server presents {type_name} \
             {fingerprint}. If this is the right host, accept its key with \
             `ssh-keyscan -p {port} {host} >> {file}` (compare the fingerprint first), \
             or pass --insecure-ignore-host-key to skip host key checking",
            port = self.port,
            host = self.host,
        )))
    }

    fn authenticate(&self, sess: &Session) -> Result<(), OpError> {
        let user = self.user.as_str();
        let who = format!("{user}@{}:{}", self.host, self.port);
        let mut tried: Vec<String> = Vec::new();
        let offered = match sess.auth_methods(user) {
            Ok(m) => m.to_string(),
            Err(_) if sess.authenticated() => return Ok(()),
            Err(e) => {
                return Err(OpError::Connect(format!(
                    "{who}: authentication failed: {}",
                    ssh_to_io(&e)
                )));
            }
        };
        if sess.authenticated() {
            return Ok(());
        }
        if let Some(identity) = &self.auth.identity {
            let shown = identity.display().to_string();
            match key_encryption(identity) {
                Err(e) => {
                    return Err(OpError::Connect(format!(
                        "cannot read SSH identity {shown}: {e}"
                    )));
                }
                Ok(false) => {
                    if sess
                        .userauth_pubkey_file(user, None, identity, None)
                        .is_ok()
                        && sess.authenticated()
                    {
                        return Ok(());
                    }
                    tried.push(format!("identity {shown}"));
                }
                Ok(true) => {
                    // Hold the lock across the prompt so parallel sessions ask only once.
                    let mut cached = self.passphrase.lock();
                    if cached.is_none() {
                        *cached = Some(ask_passphrase(identity)?);
                    }
                    let pass = cached.as_deref().unwrap_or_default();
                    match sess.userauth_pubkey_file(user, None, identity, Some(pass)) {
                        Ok(()) if sess.authenticated() => return Ok(()),
                        Err(e)
                            if matches!(
                                e.code(),
                                ErrorCode::Session(libssh2_sys::LIBSSH2_ERROR_FILE)
                            ) =>
                        {
                            *cached = None;
                            return Err(OpError::Connect(format!(
                                "cannot decrypt SSH identity {shown}: wrong passphrase?"
                            )));
                        }
                        _ => tried.push(format!("identity {shown} (encrypted)")),
                    }
                }
            }
        } else {
            if self.auth.agent {
                match try_agent(sess, user) {
                    Ok(true) => return Ok(()),
                    Ok(false) => tried.push("ssh-agent (no key accepted)".into()),
                    Err(e) => tried.push(format!("ssh-agent (unusable: {})", e.message())),
                }
            } else {
                tried.push("no ssh-agent (SSH_AUTH_SOCK is not set)".into());
            }
            let mut any_key = false;
            for key in &self.auth.default_keys {
                if !key.exists() {
                    continue;
                }
                any_key = true;
                let shown = self.tilde(key);
                match key_encryption(key) {
                    Ok(false) => {
                        if sess.userauth_pubkey_file(user, None, key, None).is_ok()
                            && sess.authenticated()
                        {
                            return Ok(());
                        }
                        tried.push(shown);
                    }
                    Ok(true) => tried.push(format!(
                        "{shown} skipped (encrypted: pass it with --identity to be asked \
                         for its passphrase, or load it into ssh-agent)"
                    )),
                    Err(e) => tried.push(format!("{shown} skipped (unreadable: {e})")),
                }
            }
            if !any_key {
                tried.push("no default key (~/.ssh/id_ed25519, id_ecdsa, id_rsa)".into());
            }
        }
        Err(OpError::Connect(format!(
            "authentication as {who} was refused (the server accepts: {offered}); tried: {}. \
             Check that the public key is in ~{user}/.ssh/authorized_keys on the server, \
             or pass --identity FILE",
            tried.join("; ")
        )))
    }

    fn tilde(&self, p: &Path) -> String {
        match self.auth.home.as_ref().and_then(|h| p.strip_prefix(h).ok()) {
            Some(rest) => format!("~/{}", rest.display()),
            None => p.display().to_string(),
        }
    }
}

struct HostCheck {
    file: PathBuf,
    /// (key type, known_hosts line) of every line naming this host.
    entries: Vec<(String, String)>,
}

fn try_agent(sess: &Session, user: &str) -> Result<bool, ssh2::Error> {
    let mut agent = sess.agent()?;
    agent.connect()?;
    agent.list_identities()?;
    for id in agent.identities()? {
        if agent.userauth(user, &id).is_ok() && sess.authenticated() {
            return Ok(true);
        }
    }
    let _ = agent.disconnect();
    Ok(false)
}

fn ask_passphrase(identity: &Path) -> Result<String, OpError> {
    let shown = identity.display();
    // Only ask when a terminal is there to answer; a daemon must not block on a prompt.
    let tty = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty");
    if tty.is_err() {
        return Err(OpError::Connect(format!(
            "SSH identity {shown} is encrypted and there is no terminal to ask for its \
             passphrase: load it into ssh-agent (ssh-add {shown}) or use an unencrypted key"
        )));
    }
    rpassword::prompt_password(format!("Enter passphrase for SSH key {shown}: ")).map_err(|e| {
        OpError::Connect(format!(
            "could not read the passphrase for SSH identity {shown}: {e}"
        ))
    })
}

/// Whether a private key file is encrypted (OpenSSH `openssh-key-v1` or PEM format).
fn key_encryption(path: &Path) -> io::Result<bool> {
    let text = fs::read_to_string(path)?;
    if text.contains("-----BEGIN OPENSSH PRIVATE KEY-----") {
        let body: String = text
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .flat_map(|l| l.trim().chars())
            .collect();
        let raw = base64_decode(&body).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "not a valid OpenSSH private key",
            )
        })?;
        let magic = b"openssh-key-v1\0";
        if !raw.starts_with(magic) || raw.len() < magic.len() + 4 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a valid OpenSSH private key",
            ));
        }
        let n = &raw[magic.len()..];
        let len = u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize;
        let cipher = n.get(4..4 + len).unwrap_or_default();
        return Ok(cipher != b"none");
    }
    if text.contains("-----BEGIN") {
        return Ok(text.contains("ENCRYPTED"));
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "not a private key file (expected a PEM or OpenSSH private key)",
    ))
}

fn host_key_type_name(t: HostKeyType) -> &'static str {
    match t {
        HostKeyType::Rsa => "ssh-rsa",
        HostKeyType::Dss => "ssh-dss",
        HostKeyType::Ecdsa256 => "ecdsa-sha2-nistp256",
        HostKeyType::Ecdsa384 => "ecdsa-sha2-nistp384",
        HostKeyType::Ecdsa521 => "ecdsa-sha2-nistp521",
        HostKeyType::Ed25519 => "ssh-ed25519",
        HostKeyType::Unknown => "unknown key type",
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Base64 without padding, as OpenSSH prints fingerprints.
fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..=c.len() {
            out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for &b in s.as_bytes() {
        if b == b'=' {
            break;
        }
        let v = B64.iter().position(|&c| c == b)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// The local user's name and home directory from the password database.
fn passwd_entry() -> Option<(String, PathBuf)> {
    use std::ffi::CStr;
    use std::os::unix::ffi::OsStrExt;
    let mut buf = vec![0 as c_char; 16 * 1024];
    // SAFETY: `pwd` and `buf` outlive the call; getpwuid_r writes only within them, and the
    // strings it returns point into `buf`, which is read before it is dropped.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            libc::getuid(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() || pwd.pw_dir.is_null() {
            return None;
        }
        let name = CStr::from_ptr(pwd.pw_name).to_string_lossy().into_owned();
        let dir = PathBuf::from(std::ffi::OsStr::from_bytes(
            CStr::from_ptr(pwd.pw_dir).to_bytes(),
        ));
        Some((name, dir))
    }
}

/// One SSH session with its SFTP channel.
struct Conn {
    // Field order = drop order: SFTP channels close before the session goes away.
    /// The last files read (most recent last, at most `OPEN_READS`), kept open: objects are
    /// immutable (replaced only by rename), so a handle stays valid, and block reads of a
    /// recently read chunk (or its piece outboard) skip an open and a close round trip each.
    open_reads: std::cell::RefCell<Vec<OpenRead>>,
    renamer: Option<PosixRenamer>,
    sftp: ssh2::Sftp,
    session: Session,
    socket: TcpStream,
    _live: LiveGuard,
}

/// A file a session holds open for reading.
struct OpenRead {
    path: String,
    opened: Instant,
    file: ssh2::File,
}

/// Counts a connection in its store's number of open sessions while it lives.
struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let conns = std::mem::take(&mut *self.idle.lock());
        if conns.is_empty() {
            return;
        }
        // Closing sessions is libssh2 I/O: keep it off async workers. With the sockets shut
        // first it cannot wait on the server either.
        for c in &conns {
            let _ = c.socket.shutdown(Shutdown::Both);
        }
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(move || drop(conns));
            }
            Err(_) => drop(conns),
        }
    }
}

/// A second SFTP channel on the same session, driven through libssh2 directly, for
/// `posix-rename@openssh.com` (which ssh2 does not expose). Made on first use.
struct PosixRenamer {
    session: Session,
    raw: *mut libssh2_sys::LIBSSH2_SFTP,
}

// SAFETY: the raw SFTP handle is only used while holding the session's lock (`Session::raw`),
// exactly as ssh2 does for its own handles, and a `Conn` is used by one thread at a time.
unsafe impl Send for PosixRenamer {}

impl PosixRenamer {
    fn new(session: &Session) -> Result<Self, OpError> {
        let mut guard = session.raw();
        let sess: *mut libssh2_sys::LIBSSH2_SESSION = &mut *guard;
        // SAFETY: `sess` is a valid session, locked for the duration of the call.
        let raw = unsafe { libssh2_sys::libssh2_sftp_init(sess) };
        if raw.is_null() {
            // SAFETY: as above.
            let rc = unsafe { libssh2_sys::libssh2_session_last_errno(sess) };
            return Err(OpError::Ssh(ssh2::Error::from_errno(ErrorCode::Session(
                rc,
            ))));
        }
        drop(guard);
        Ok(Self {
            session: session.clone(),
            raw,
        })
    }

    fn rename(&self, src: &str, dst: &str) -> Result<(), OpError> {
        let _guard = self.session.raw();
        // SAFETY: `self.raw` is a live SFTP channel of this session, which is locked; the
        // strings outlive the call and their lengths are passed explicitly.
        let rc = unsafe {
            libssh2_sftp_posix_rename_ex(
                self.raw,
                src.as_ptr().cast(),
                src.len(),
                dst.as_ptr().cast(),
                dst.len(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let code = if rc == libssh2_sys::LIBSSH2_ERROR_SFTP_PROTOCOL {
            // SAFETY: as above.
            let status = unsafe { libssh2_sys::libssh2_sftp_last_error(self.raw) };
            ErrorCode::SFTP(status as c_int)
        } else {
            ErrorCode::Session(rc)
        };
        Err(OpError::Ssh(ssh2::Error::from_errno(code)))
    }
}

impl Drop for PosixRenamer {
    fn drop(&mut self) {
        let _guard = self.session.raw();
        // SAFETY: the channel is live and owned by us; the session is locked.
        unsafe {
            libssh2_sys::libssh2_sftp_shutdown(self.raw);
        }
    }
}

fn split_path(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

fn p(s: &str) -> &Path {
    Path::new(s)
}

impl Conn {
    /// Atomically replace `dst` with `src` (same directory).
    fn rename_over(&mut self, src: &str, dst: &str) -> Result<(), OpError> {
        if self.renamer.is_none() {
            self.renamer = Some(PosixRenamer::new(&self.session)?);
        }
        let renamer = self.renamer.as_ref().expect("just made");
        match renamer.rename(src, dst) {
            Err(e) if matches!(sftp_code(&e), Some(libssh2_sys::LIBSSH2_FX_OP_UNSUPPORTED)) => {
                // Not OpenSSH: standard rename, asking the server to overwrite.
                self.sftp.rename(
                    p(src),
                    p(dst),
                    Some(
                        ssh2::RenameFlags::OVERWRITE
                            | ssh2::RenameFlags::ATOMIC
                            | ssh2::RenameFlags::NATIVE,
                    ),
                )?;
                Ok(())
            }
            r => r,
        }
    }

    /// `mkdir -p dir`.
    fn mkdirs(&self, dir: &str) -> Result<(), OpError> {
        if dir.is_empty() {
            return Ok(());
        }
        match self.sftp.mkdir(p(dir), 0o755) {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.code(), ErrorCode::Session(_)) => Err(e.into()),
            Err(e) => match self.sftp.stat(p(dir)) {
                Ok(st) if st.is_dir() => Ok(()),
                Ok(_) => Err(e.into()),
                Err(se) if is_no_such_file(&se) => {
                    let (parent, _) = split_path(dir);
                    self.mkdirs(parent)?;
                    match self.sftp.mkdir(p(dir), 0o755) {
                        Ok(()) => Ok(()),
                        // Someone else made it meanwhile.
                        Err(e2) if self.sftp.stat(p(dir)).is_ok_and(|s| s.is_dir()) => {
                            drop(e2);
                            Ok(())
                        }
                        Err(e2) => Err(e2.into()),
                    }
                }
                Err(se) => Err(se.into()),
            },
        }
    }

    /// Write `data` to a new temp file next to `path`; returns the temp path.
    fn write_temp(&self, inner: &Inner, path: &str, data: &[u8]) -> Result<String, OpError> {
        let tmp = inner.temp_path(path);
        let open = || {
            self.sftp.open_mode(
                p(&tmp),
                OpenFlags::WRITE | OpenFlags::EXCLUSIVE | OpenFlags::TRUNCATE,
                0o644,
                OpenType::File,
            )
        };
        let mut f = match open() {
            Ok(f) => f,
            Err(e) if is_no_such_file(&e) => {
                self.mkdirs(split_path(path).0)?;
                open()?
            }
            Err(e) => return Err(e.into()),
        };
        let r = (|| -> Result<(), OpError> {
            f.write_all(data).map_err(OpError::Remote)?;
            match f.fsync() {
                Ok(()) => {}
                Err(e) if matches!(e.code(), ErrorCode::SFTP(_)) => {} // not supported
                Err(e) => return Err(e.into()),
            }
            f.close()?;
            Ok(())
        })();
        if let Err(e) = r {
            drop(f);
            if !e.breaks_session() {
                let _ = self.sftp.unlink(p(&tmp));
            }
            return Err(e);
        }
        Ok(tmp)
    }

    fn put(&mut self, inner: &Inner, path: &str, data: &[u8]) -> Result<(), OpError> {
        let tmp = self.write_temp(inner, path, data)?;
        let r = self.rename_over(&tmp, path);
        if let Err(e) = &r {
            if !e.breaks_session() {
                let _ = self.sftp.unlink(p(&tmp));
            }
        }
        r
    }

    fn read_exact_at(
        &self,
        inner: &Inner,
        path: &str,
        range: Range<u64>,
    ) -> Result<Vec<u8>, OpError> {
        let len = (range.end - range.start) as usize;
        let t0 = Instant::now();
        let mut open = self.open_reads.borrow_mut();
        let mut opened = false;
        let held = open.iter().position(|h| h.path == path);
        if let Some(i) = held {
            let h = open.remove(i);
            if inner.refused.lock().stale(path, h.opened) {
                drop(h); // closes it: the file may have been replaced since
            } else {
                open.push(h);
            }
        }
        if open.last().is_none_or(|h| h.path != path) {
            if open.len() >= OPEN_READS {
                open.remove(0); // closes the least recently used handle
            }
            let opened_at = Instant::now();
            open.push(OpenRead {
                path: path.to_string(),
                opened: opened_at,
                file: self.sftp.open(p(path))?,
            });
            opened = true;
        }
        let t_open = t0.elapsed();
        let f = &mut open.last_mut().expect("just pushed").file;
        let mut buf = vec![0u8; len];
        if len == 0 {
            return Ok(buf);
        }
        f.seek(SeekFrom::Start(range.start))
            .map_err(OpError::Remote)?;
        // libssh2 pipelines a read: one call with an n-byte buffer sends READ requests for
        // 4·n bytes ahead of the position at once (30000 bytes each). Left alone, a 1 MiB block
        // read asks for 4 MiB, and the next seek throws away 3 MiB that still cross the wire and
        // are decrypted. So the first call asks for exactly the range (a quarter of it, times
        // four) and later calls for at most what is already on its way (a quarter of the rest).
        let mut done = 0;
        let mut first = true;
        while done < len {
            let rest = len - done;
            let ask = if first {
                rest.div_ceil(4)
            } else if rest >= 4 {
                rest / 4
            } else {
                rest
            };
            first = false;
            let n = f
                .read(&mut buf[done..done + ask])
                .map_err(OpError::Remote)?;
            if n == 0 {
                return Err(OpError::PastEnd(format!(
                    "range {}..{} is past the end of the object",
                    range.start, range.end
                )));
            }
            done += n;
        }
        tracing::trace!(
            target: "horcrux::timing",
            path,
            len,
            opened,
            open_us = t_open.as_micros() as u64,
            read_us = (t0.elapsed() - t_open).as_micros() as u64,
            "sftp read"
        );
        Ok(buf)
    }

    fn read_all(&self, path: &str) -> Result<Vec<u8>, OpError> {
        let mut f = self.sftp.open(p(path))?;
        let size = f.stat()?.size.unwrap_or(0) as usize;
        // Objects are replaced by rename, never changed in place, so the size is stable; one
        // large read lets libssh2 pipeline its requests.
        let mut buf = vec![0u8; size];
        let mut done = 0;
        while done < size {
            let n = f.read(&mut buf[done..]).map_err(OpError::Remote)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }

    fn read_opt(&self, path: &str) -> Result<Option<Vec<u8>>, OpError> {
        match self.read_all(path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn exists(&self, path: &str) -> Result<bool, OpError> {
        match self.sftp.stat(p(path)) {
            Ok(_) => Ok(true),
            Err(e) if is_no_such_file(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn walk(
        &self,
        root: &str,
        dir: &str,
        prefix: &str,
        out: &mut Vec<(String, u64)>,
    ) -> Result<(), OpError> {
        let entries = match self.sftp.readdir(p(dir)) {
            Ok(v) => v,
            Err(e) if is_no_such_file(&e) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        for (path, stat) in entries {
            let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            if name.starts_with('.') {
                continue; // temp files and locks
            }
            let full = format!("{dir}/{name}");
            let rel = full[root.len() + 1..].to_string();
            if is_dir(&stat) {
                let rel_dir = format!("{rel}/");
                if rel_dir.starts_with(prefix) || prefix.starts_with(&rel_dir) {
                    self.walk(root, &full, prefix, out)?;
                }
            } else if rel.starts_with(prefix) {
                out.push((rel, stat.size.unwrap_or(0)));
            }
        }
        Ok(())
    }

    /// Remove a file; one that does not exist is not an error.
    fn delete(&self, path: &str) -> Result<(), OpError> {
        match self.sftp.unlink(p(path)) {
            Ok(()) => Ok(()),
            Err(e) if is_no_such_file(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Remove `path` if it holds `expected`, under the ref lock of its directory (the lock
    /// `compare_and_swap` takes). `Ok(None)`: it does not exist; `Ok(Some(false))`: it holds
    /// something else.
    fn compare_and_delete(
        &mut self,
        inner: &Inner,
        path: &str,
        expected: &[u8],
    ) -> Result<Option<bool>, OpError> {
        let (dir, _) = split_path(path);
        // An empty temp file tells the server's time, by which the lock's age is judged.
        let tmp = self.write_temp(inner, path, b"")?;
        let written_at = Instant::now();
        let stat = self.sftp.stat(p(&tmp));
        let _ = self.sftp.unlink(p(&tmp));
        let server_time = match stat {
            Ok(FileStat { mtime: Some(t), .. }) => t,
            Ok(_) => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            Err(e) => return Err(e.into()),
        };
        let lock = format!("{dir}/{LOCK_NAME}");
        self.lock(&lock, || server_time + written_at.elapsed().as_secs())?;
        let r = (|| -> Result<Option<bool>, OpError> {
            match self.read_opt(path)? {
                None => Ok(None),
                Some(current) if current != expected => Ok(Some(false)),
                Some(_) => {
                    self.sftp.unlink(p(path))?;
                    Ok(Some(true))
                }
            }
        })();
        let broken = r.as_ref().is_err_and(OpError::breaks_session);
        if !broken {
            let _ = self.sftp.rmdir(p(&lock));
        }
        r.map_err(|e| OpError::Committed(Box::new(e)))
    }

    /// Take the per-directory CAS lock. `server_now` estimates the server's clock, so that the
    /// age of a lock is judged by the clock that stamped it.
    fn lock(&self, lock: &str, server_now: impl Fn() -> u64) -> Result<(), OpError> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(10);
        loop {
            match self.sftp.mkdir(p(lock), 0o700) {
                Ok(()) => return Ok(()),
                Err(e) if matches!(e.code(), ErrorCode::Session(_)) => return Err(e.into()),
                Err(_) => {}
            }
            match self.sftp.stat(p(lock)) {
                Ok(st) => {
                    let age = server_now().saturating_sub(st.mtime.unwrap_or(u64::MAX));
                    if age > LOCK_STALE_SECS {
                        // Move it aside first: of several writers breaking the same stale lock,
                        // only one rename succeeds.
                        let (dir, _) = split_path(lock);
                        let aside = format!("{dir}/.lock.d.stale.{}.{age}", std::process::id());
                        if self.sftp.rename(p(lock), p(&aside), None).is_ok() {
                            tracing::warn!(lock, age, "broke a stale repository lock");
                            let _ = self.sftp.rmdir(p(&aside));
                        }
                        continue;
                    }
                }
                Err(e) if is_no_such_file(&e) => continue, // released meanwhile
                Err(e) => return Err(e.into()),
            }
            if start.elapsed() >= LOCK_WAIT {
                return Err(OpError::Lock(format!(
                    "{lock} is held by another writer (waited {} s); if no other horcrux is \
                     writing, it is removed automatically once older than {LOCK_STALE_SECS} s",
                    LOCK_WAIT.as_secs()
                )));
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    fn compare_and_swap(
        &mut self,
        inner: &Inner,
        path: &str,
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<(), OpError> {
        let (dir, _) = split_path(path);
        // The new content goes to a temp file first, outside the lock; its mtime also tells
        // the server's time.
        let tmp = self.write_temp(inner, path, new)?;
        let written_at = Instant::now();
        let server_time = match self.sftp.stat(p(&tmp)) {
            Ok(FileStat { mtime: Some(t), .. }) => t,
            Ok(_) => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            Err(e) => return Err(e.into()),
        };
        let lock = format!("{dir}/{LOCK_NAME}");
        if let Err(e) = self.lock(&lock, || server_time + written_at.elapsed().as_secs()) {
            if !e.breaks_session() {
                let _ = self.sftp.unlink(p(&tmp));
            }
            return Err(e);
        }
        // From here on the lock is ours: never repeat these steps blindly.
        let r = (|| -> Result<bool, OpError> {
            let current = self.read_opt(path)?;
            if current.as_deref() != expected {
                return Ok(false);
            }
            self.rename_over(&tmp, path)?;
            Ok(true)
        })();
        let broken = r.as_ref().is_err_and(OpError::breaks_session);
        if !broken {
            let _ = self.sftp.rmdir(p(&lock));
        }
        match r {
            Ok(true) => Ok(()),
            Ok(false) => {
                let _ = self.sftp.unlink(p(&tmp));
                Err(OpError::Conflict)
            }
            Err(e) => {
                if !broken {
                    let _ = self.sftp.unlink(p(&tmp));
                }
                Err(OpError::Committed(Box::new(e)))
            }
        }
    }

    fn get_to_file(&self, path: &str, dest: &Path) -> Result<(), OpError> {
        let mut f = self.sftp.open(p(path))?;
        if let Some(d) = dest.parent() {
            fs::create_dir_all(d).map_err(OpError::Local)?;
        }
        let tmp = crate::util::temp_name(dest);
        let r = (|| -> Result<(), OpError> {
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(OpError::Local)?;
            let mut buf = vec![0u8; STREAM_PIECE];
            loop {
                let mut filled = 0;
                while filled < buf.len() {
                    let n = f.read(&mut buf[filled..]).map_err(OpError::Remote)?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                out.write_all(&buf[..filled]).map_err(OpError::Local)?;
                if filled < buf.len() {
                    break;
                }
            }
            out.sync_all().map_err(OpError::Local)?;
            fs::rename(&tmp, dest).map_err(OpError::Local)
        })();
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        r
    }
}

fn is_dir(st: &FileStat) -> bool {
    st.perm.is_some_and(|m| m & libc::S_IFMT == libc::S_IFDIR)
}

#[async_trait::async_trait]
impl Store for SshStore {
    /// The mtime the server gives a new (empty, removed at once) file.
    async fn now(&self) -> Result<Option<SystemTime>, StoreError> {
        let path = self.inner.path("horcrux.json")?;
        self.run("horcrux.json", move |inner, c| {
            let tmp = c.write_temp(inner, &path, b"")?;
            let stat = c.sftp.stat(p(&tmp));
            let _ = c.sftp.unlink(p(&tmp));
            Ok(stat?.mtime.map(|t| UNIX_EPOCH + Duration::from_secs(t)))
        })
        .await
    }

    fn describe(&self) -> String {
        self.inner.describe.clone()
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        if range.end < range.start {
            return Err(self.map_err(
                key,
                OpError::PastEnd(format!("empty range {}..{}", range.start, range.end)),
            ));
        }
        let path = self.inner.path(key)?;
        let span = tracing::trace_span!(target: "horcrux::timing", "get_range", len = range.end - range.start);
        let small = range.end - range.start <= SMALL_READ;
        run(
            self.inner.clone(),
            key,
            Some(path.clone()),
            small,
            move |inner, c| {
                c.read_exact_at(inner, &path, range.clone())
                    .map(Bytes::from)
            },
        )
        .instrument(span)
        .await
    }

    fn refused(&self, key: &str) {
        let Ok(path) = self.inner.path(key) else {
            return;
        };
        // Only marked here (this may run on an async worker, and closing a handle is a round
        // trip): the session holding it closes it at its next read of the file.
        let mut r = self.inner.refused.lock();
        if r.keys.len() >= REFUSED_MAX {
            r.keys.clear();
            r.all_before = Some(Instant::now());
        }
        r.keys.insert(path, Instant::now());
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = self.inner.path(key)?;
        self.run(key, move |_, c| c.read_all(&path).map(Bytes::from))
            .await
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let path = self.inner.path(key)?;
        self.run(key, move |inner, c| c.put(inner, &path, &data))
            .await
    }

    async fn exists(&self, keys: &[String]) -> Result<Vec<bool>, StoreError> {
        // One stat per key is one round trip each: spread large batches over the sessions.
        let sessions = self.inner.sessions;
        let per_task = keys.len().div_ceil(sessions).max(EXISTS_BATCH_MIN);
        let mut tasks = tokio::task::JoinSet::new();
        for (i, group) in keys.chunks(per_task.max(1)).enumerate() {
            let paths = group
                .iter()
                .map(|k| self.inner.path(k))
                .collect::<Result<Vec<String>, _>>()?;
            let inner = self.inner.clone();
            tasks.spawn(async move {
                let r = run(inner, "", None, false, move |_, c| {
                    paths
                        .iter()
                        .map(|p| c.exists(p))
                        .collect::<Result<Vec<_>, _>>()
                })
                .await;
                (i, r)
            });
        }
        let mut parts = Vec::new();
        while let Some(done) = tasks.join_next().await {
            let (i, r) = done.expect("exists task panicked");
            parts.push((i, r?));
        }
        parts.sort_by_key(|(i, _)| *i);
        Ok(parts.into_iter().flat_map(|(_, v)| v).collect())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .list_sizes(prefix)
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.inner.path(key)?;
        self.run(key, move |_, c| c.delete(&path)).await
    }

    async fn compare_and_delete(&self, key: &str, expected: &[u8]) -> Result<(), StoreError> {
        let path = self.inner.path(key)?;
        let expected = expected.to_vec();
        match self
            .run(key, move |inner, c| {
                c.compare_and_delete(inner, &path, &expected)
            })
            .await?
        {
            Some(true) => Ok(()),
            Some(false) => Err(StoreError::CasConflict {
                store: self.describe(),
                key: key.to_string(),
            }),
            None => Err(StoreError::NotFound {
                store: self.describe(),
                key: key.to_string(),
            }),
        }
    }

    async fn list_sizes(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let prefix = prefix.to_string();
        self.run("", move |inner, c| {
            // Start at the deepest directory the prefix names, not at the root.
            let start = match prefix.rfind('/') {
                Some(i) => format!("{}/{}", inner.root, &prefix[..i]),
                None => inner.root.clone(),
            };
            let mut out = Vec::new();
            c.walk(&inner.root, &start, &prefix, &mut out)?;
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Bytes,
    ) -> Result<(), StoreError> {
        let path = self.inner.path(key)?;
        let expected = expected.map(<[u8]>::to_vec);
        self.run(key, move |inner, c| {
            c.compare_and_swap(inner, &path, expected.as_deref(), &new)
        })
        .await
    }

    async fn get_to_file(&self, key: &str, dest: &Path) -> Result<(), StoreError> {
        let path = self.inner.path(key)?;
        let dest = dest.to_path_buf();
        self.run(key, move |_, c| c.get_to_file(&path, &dest)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip() {
        for data in [&b""[..], b"f", b"fo", b"foo", b"foob", b"fooba", b"foobar"] {
            assert_eq!(base64_decode(&base64_encode(data)).unwrap(), data);
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fooba"), "Zm9vYmE");
        assert_eq!(base64_decode("Zm9vYg==").unwrap(), b"foob");
        assert!(base64_decode("Zm9v!").is_none());
    }

    #[test]
    fn describe_has_no_secrets_and_names_port() {
        let s =
            SshStore::new(Some("dev"), "db", 2222, "/opt/h/", &StoreOptions::default()).unwrap();
        assert_eq!(s.describe(), "ssh://dev@db:2222/opt/h");
        assert_eq!(s.inner.path("refs/main").unwrap(), "/opt/h/refs/main");
        assert_eq!(s.inner.known_hosts_name(), "[db]:2222");
        let s = SshStore::new(Some("dev"), "db", 22, "/", &StoreOptions::default()).unwrap();
        assert_eq!(s.inner.path("x").unwrap(), "/x");
        for bad in ["/etc/passwd", "../x", "a/../../b", "a//b", "", "a/./b"] {
            assert!(s.inner.path(bad).is_err(), "{bad}");
        }
        assert_eq!(s.inner.known_hosts_name(), "db");
    }

    #[test]
    fn temp_names_are_dot_files_next_to_the_key() {
        let s = SshStore::new(Some("u"), "h", 22, "/r", &StoreOptions::default()).unwrap();
        let t = s.inner.temp_path("/r/chunks/ab/cd");
        assert!(t.starts_with("/r/chunks/ab/.cd.tmp."), "{t}");
        assert_ne!(t, s.inner.temp_path("/r/chunks/ab/cd"));
    }
}

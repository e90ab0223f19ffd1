//! `horcrux mount` and `horcrux umount`.
//!
//! Detaching: `mount` without `--foreground` checks what it can cheaply (mountpoint, URL), then
//! re-executes itself with `--foreground --ready-fd N` in a new session, stdio on /dev/null.
//! No thread exists yet in the parent, and the child is a fresh exec, so nothing is forked
//! with threads. The child (the daemon) logs to a file, opens the repository, mounts, and
//! reports on the inherited pipe, one line each:
//!   `log <path>`                       as soon as its log file is open,
//!   `ok <volume>@<commit>`             once the FUSE handshake is done (the mount is live),
//!   `error <message...>`               instead, if anything failed.
//! The parent returns only after `ok` (exit 0) or an error / EOF (exit 1), so a caller can
//! use the mount as soon as `horcrux mount` returns.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Args;
use horcrux::cache::{Cache, CacheConfig};
use horcrux::fetch::{FetchConfig, Fetcher};
use horcrux::overlay::{BaseInfo, Overlay};
use horcrux::repo::Repository;
use horcrux::store::{MirrorConfig, MirrorStore, Store};
use horcrux::volume::Volume;
use horcrux_fuse::mountinfo;

use crate::CacheArgs;

#[derive(Debug, Args)]
pub struct MountArgs {
    /// Access URL(s), comma-separated mirrors in order of preference: file:///path,
    /// scp://user@host:/path, ssh://user@host:port/path, s3://bucket/prefix?region=R&endpoint=URL,
    /// horcrux://host:7443/REPO (a peer running `horcrux serve`; needs --tls-dir)
    pub access: String,
    /// Empty directory to mount on
    pub mountpoint: PathBuf,
    /// Volume name in the repository (needed when it holds several)
    #[arg(long)]
    pub name: Option<String>,
    /// Branch, tag or commit to mount
    #[arg(long = "ref", default_value = "main")]
    pub reference: String,
    /// Refuse writes, and show the version as it is (without local changes)
    #[arg(long)]
    pub read_only: bool,
    /// Where local changes live [default: one directory per repository and volume under
    /// /var/lib/horcrux/overlays for root, ~/.local/share/horcrux/overlays otherwise]; two
    /// writable mounts cannot share one
    #[arg(long, value_name = "DIR")]
    pub overlay_dir: Option<PathBuf>,
    /// Stay in the foreground (logs to stderr) instead of detaching once the mount is live
    #[arg(long, short = 'f')]
    pub foreground: bool,
    /// Let other users access the mount (needs user_allow_other in /etc/fuse.conf for non-root)
    #[arg(long)]
    pub allow_other: bool,
    /// FUSE worker threads [default: twice the CPUs, at least 4]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seconds a read may wait for the source(s) before it fails with EIO; a mirror that does
    /// not answer within min(10, SECS/2) seconds is skipped for the next one
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// Concurrent block requests to the source for reads
    #[arg(long, value_name = "N", default_value_t = FetchConfig::default().max_concurrency,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    pub concurrency: usize,
    /// Fetch only the blocks that are read (no background fill of the rest of their chunk)
    #[arg(long)]
    pub no_fill: bool,
    /// Serve small reads of cold blocks only from whole 1 MiB blocks, not from verified 16 KiB
    /// pieces (pieces need the chunk's piece outboard, which every writer stores; S3 sources
    /// always read whole blocks: a small GET is no faster there)
    #[arg(long)]
    pub no_piece_reads: bool,
    /// Most adjacent blocks one read-ahead or fill request asks the source for [default: 8].
    /// Over SSH, 1 reads large files faster and with less memory, at the cost of a slower
    /// first byte of small reads while a fill runs
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub run_blocks: Option<u32>,
    /// Peers to read chunks from before the origin: one host:port (or host:port/REPO) a line,
    /// `#` comments. Each chunk is asked first of the peer that rendezvous hashing makes its
    /// owner, so a fleet reads each chunk from the origin about once. Needs --tls-dir
    #[arg(long, value_name = "FILE")]
    pub peers_file: Option<PathBuf>,
    /// This node's own peer address (host:port, as in the peers file), skipped among the peers
    #[arg(long = "self", value_name = "HOST:PORT")]
    pub self_addr: Option<String>,
    /// Serve every read through the daemon: no FUSE passthrough of fully cached files
    #[arg(long)]
    pub no_passthrough: bool,
    /// Smallest file passed through once fully cached (smaller ones are read through the
    /// daemon; each passed-through file is copied once into the cache's assembled/ files)
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = crate::parse_size)]
    pub passthrough_min_size: u64,
    /// Record which blocks reads reach the daemon for during the first SECS seconds after the
    /// mount (a container's start) and store that start-up profile with the volume, for the
    /// next mount of this version (on any host) to prefetch first; 0 = do not record. A
    /// version that has a profile keeps it (see --replace-profile)
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_window)]
    pub record_profile: Duration,
    /// Record even if this version has a start-up profile, and replace it
    #[arg(long)]
    pub replace_profile: bool,
    /// Do not prefetch the start-up profile of this version (or of its nearest ancestor)
    #[arg(long)]
    pub no_replay: bool,
    /// Neither record nor replay a start-up profile
    #[arg(long)]
    pub no_profile: bool,
    /// Blocks the start-up profile's replay fetches at once (below the readers' priority)
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub replay_concurrency: usize,
    /// Bench: FUSE max_background asked at init [default: 256]
    #[arg(long, hide = true, value_name = "N")]
    pub fuse_max_background: Option<u16>,
    /// Bench: FUSE max_write asked at init, which also bounds read requests [default: 16M,
    /// capped by the kernel's fs.fuse.max_pages_limit]
    #[arg(long, hide = true, value_name = "SIZE", value_parser = crate::parse_size)]
    pub fuse_max_write: Option<u64>,
    /// Bench: when the kernel lists directories with attributes: auto, always or never
    /// [default: auto]
    #[arg(long, hide = true, value_name = "WHEN", value_parser = parse_readdirplus)]
    pub fuse_readdirplus: Option<horcrux_fuse::ReaddirPlus>,
    /// Bench: kernel readahead of the mount in KiB [default: 1024]
    #[arg(long, hide = true, value_name = "KIB")]
    pub readahead_kb: Option<u32>,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9184; port 0 picks a
    /// free one, shown by `horcrux stats`). No authentication: keep it on loopback or a private
    /// network
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Internal: report readiness on this inherited pipe (set by `mount` when it detaches)
    #[arg(long, hide = true)]
    pub ready_fd: Option<RawFd>,
    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(Debug, Args)]
pub struct UmountArgs {
    /// The mountpoint to unmount
    pub mountpoint: PathBuf,
    /// Detach now even if files are open in it; the daemon exits once they are closed
    #[arg(long, short = 'l')]
    pub lazy: bool,
}

/// A positive number of seconds (fractions allowed), e.g. `30` or `2.5`.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!(
            "`{s}` is not a timeout: give a number of seconds greater than 0 (at most 86400)"
        )),
    }
}

/// A recording window in seconds: `0` (off) up to a day, fractions allowed.
fn parse_window(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=86_400.0).contains(&v) => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!(
            "`{s}` is not a recording window: give a number of seconds from 0 (off) to 86400"
        )),
    }
}

/// Bound on one attempt at one mirror: short enough that a dead first mirror is left for the
/// next one well before the whole read's `timeout` runs out.
fn mirror_attempt_timeout(timeout: Duration) -> Duration {
    (timeout / 2).min(Duration::from_secs(10))
}

/// The peers of `--peers-file` as access URLs (without this node itself), for the
/// repository the last URL of the access list names.
fn peer_urls(
    a: &MountArgs,
    urls: &[horcrux::store::AccessUrl],
) -> anyhow::Result<Vec<horcrux::store::AccessUrl>> {
    let Some(path) = &a.peers_file else {
        return Ok(Vec::new());
    };
    let origin = urls.last().expect("parse_access returns at least one URL");
    let default_repo = horcrux::serve::default_repo_name(origin);
    let mut out = Vec::new();
    for p in crate::cmd::peers::parse_peers_file(path)? {
        if a.self_addr
            .as_deref()
            .is_some_and(|me| crate::cmd::peers::is_self(&p, me))
        {
            continue;
        }
        let repo = p
            .repo
            .clone()
            .or_else(|| default_repo.clone())
            .ok_or_else(|| {
                anyhow!(
                    "{}: name the repository on the peers ({}:{}/REPO): {origin} has no name",
                    path.display(),
                    p.host,
                    p.port
                )
            })?;
        out.push(horcrux::store::AccessUrl::Peer {
            host: p.host,
            port: p.port,
            repo,
        });
    }
    tracing::info!(peers = out.len(), file = %path.display(), "peers from the peers file");
    Ok(out)
}

/// Fetch and fall-over settings from the command line.
fn fetch_configs(a: &MountArgs) -> (FetchConfig, MirrorConfig) {
    let fetch = FetchConfig {
        max_concurrency: a.concurrency,
        request_timeout: a.timeout,
        fill_chunks: !a.no_fill,
        // Over S3 a 16 KiB ranged GET is no faster than a 1 MiB one: servers answer small
        // responses on a kept-alive connection a delayed ACK late (Garage: 44 ms against 8 ms
        // for a whole block, bench/remote). Pieces pay off over SSH.
        piece_reads: !a.no_piece_reads && !a.access.trim_start().starts_with("s3://"),
        // 8 for every source. Over SSH, 1 made a cold sequential read ~10 % faster and the
        // daemon's peak RSS 233 -> 62 MiB, but fills of one block per request made a cold
        // 4 KiB read beside them ~1.5x slower (BENCHMARKS.md, "Quiet machine, 2026-12-02").
        run_blocks: a.run_blocks.unwrap_or(horcrux::fetch::RUN_BLOCKS),
        ..FetchConfig::default()
    };
    let mirror = MirrorConfig {
        attempt_timeout: mirror_attempt_timeout(a.timeout),
        ..MirrorConfig::default()
    };
    (fetch, mirror)
}

/// Readahead given to the kernel for a mount, in KiB (one FUSE request carries at most 1 MiB).
const READAHEAD_KB: u32 = 1024;

/// How long `umount` waits for the daemon to exit after the kernel let go of the mount.
const DAEMON_EXIT_WAIT: Duration = Duration::from_secs(10);

pub fn run(a: MountArgs) -> anyhow::Result<()> {
    if a.foreground || a.ready_fd.is_some() {
        daemon(a)
    } else {
        detach(a)
    }
}

// ---------------------------------------------------------------------------------------------
// Checks shared by the parent and the daemon.

/// Validate the mountpoint and return its canonical absolute path.
fn check_mountpoint(p: &Path) -> anyhow::Result<PathBuf> {
    let abs = mountinfo::absolute(p).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow!(
            "mountpoint {}: its parent directory does not exist",
            p.display()
        ),
        _ => anyhow!("mountpoint {}: {e}", p.display()),
    })?;
    // Before stat: a dead FUSE mount answers ENOTCONN to it.
    already_mounted(&abs)?;
    let md = std::fs::metadata(&abs).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow!(
            "mountpoint {} does not exist; create it with `mkdir -p {}`",
            abs.display(),
            abs.display()
        ),
        _ => anyhow!("mountpoint {}: {e}", abs.display()),
    })?;
    if !md.is_dir() {
        bail!("mountpoint {} is not a directory", abs.display());
    }
    let canon = abs
        .canonicalize()
        .with_context(|| format!("mountpoint {}", abs.display()))?;
    if canon != abs {
        already_mounted(&canon)?;
    }
    let mut entries = std::fs::read_dir(&canon)
        .with_context(|| format!("mountpoint {}: cannot list it", canon.display()))?;
    if entries.next().is_some() {
        bail!(
            "mountpoint {} is not empty; horcrux mounts only on an empty directory",
            canon.display()
        );
    }
    Ok(canon)
}

fn already_mounted(abs: &Path) -> anyhow::Result<()> {
    if let Some(m) = mountinfo::find(abs).context("reading /proc/self/mountinfo")? {
        if m.is_horcrux() {
            bail!(
                "{} is already a horcrux mount ({}); unmount it first with `horcrux umount {}`",
                abs.display(),
                m.source,
                abs.display()
            );
        }
        bail!(
            "{} is already a mount point ({} mount of {})",
            abs.display(),
            m.fstype,
            m.source
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Parent side of a detached mount.

fn detach(a: MountArgs) -> anyhow::Result<()> {
    // Fail fast, in the user's terminal, on what needs no repository.
    let mountpoint = check_mountpoint(&a.mountpoint)?;
    horcrux::store::parse_access(&a.access)?;

    let (read_end, write_end) = pipe()?;
    let exe = std::env::current_exe().context("locating the horcrux executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(child_args(write_end.as_raw_fd()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let wfd = write_end.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls (setsid, fcntl).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Let the pipe's write end survive exec (it was created close-on-exec).
            let flags = libc::fcntl(wfd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(wfd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the mount daemon")?;
    // Only the child may hold the write end, or EOF never comes.
    drop(write_end);

    let mut report = String::new();
    File::from(read_end)
        .read_to_string(&mut report)
        .context("reading the mount daemon's report")?;
    let mut log = None;
    for line in report.lines() {
        if let Some(l) = line.strip_prefix("log ") {
            log = Some(l.to_string());
        }
    }
    let log_note = log
        .as_deref()
        .map(|l| format!(" (log: {l})"))
        .unwrap_or_default();
    if let Some(what) = report.lines().find_map(|l| l.strip_prefix("ok ")) {
        println!(
            "mounted {what} on {} (pid {}, log: {})",
            mountpoint.display(),
            child.id(),
            log.as_deref().unwrap_or("none")
        );
        return Ok(());
    }
    // The message may span lines (anyhow's chain): it runs from its tag to the end.
    if let Some((pos, _)) = report
        .match_indices("error ")
        .find(|&(i, _)| i == 0 || report.as_bytes()[i - 1] == b'\n')
    {
        bail!("{}{log_note}", report[pos + 6..].trim_end());
    }
    let status = child.wait().context("waiting for the mount daemon")?;
    bail!("the mount daemon exited ({status}) before the mount was live{log_note}")
}

/// This process's arguments with `--foreground --ready-fd N` inserted right after the `mount`
/// subcommand (before any `--` the user may have written).
fn child_args(fd: RawFd) -> Vec<std::ffi::OsString> {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let at = args.iter().position(|s| s == "mount").map_or(0, |p| p + 1);
    let mut out = args[..at].to_vec();
    out.extend([
        "--foreground".into(),
        "--ready-fd".into(),
        fd.to_string().into(),
    ]);
    out.extend_from_slice(&args[at..]);
    out
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating a pipe");
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

// ---------------------------------------------------------------------------------------------
// The daemon (foreground, or the detached child).

/// The daemon's report channel to a waiting parent; absent in plain foreground mode.
struct Ready(Option<File>);

impl Ready {
    fn send(&mut self, line: &str) {
        if let Some(f) = &mut self.0 {
            // The parent may be gone (killed while waiting): the mount goes on regardless.
            let _ = f
                .write_all(line.as_bytes())
                .and_then(|_| f.write_all(b"\n"));
        }
    }

    /// Final message; closing the pipe releases the parent.
    fn finish(&mut self, line: &str) {
        self.send(line);
        self.0 = None;
    }
}

fn daemon(a: MountArgs) -> anyhow::Result<()> {
    // An SSH call the fetcher gave up on must not hold its session (and one of the store's
    // few slots) for the store's default 30 s: after a cut link, reads would still fail for
    // that long once the link is back.
    crate::set_ssh_io_timeout(mirror_attempt_timeout(a.timeout));
    let mut ready = Ready(None);
    if let Some(fd) = a.ready_fd {
        // SAFETY: F_GETFD only inspects the descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            bail!("--ready-fd {fd} is not an open file descriptor (it is for internal use)");
        }
        // SAFETY: the descriptor is open and this process is its only user from now on.
        let f = unsafe { File::from_raw_fd(fd) };
        // Keep it out of anything we spawn (fusermount3), or the parent's EOF would wait.
        // SAFETY: plain fcntl on an open descriptor.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        ready = Ready(Some(f));
        match detached_logging(&a) {
            Ok(log) => ready.send(&format!("log {}", log.display())),
            Err(e) => {
                ready.finish(&format!("error {e:#}"));
                return Err(e);
            }
        }
    } else {
        crate::init_logging(None)?;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("horcrux-io")
        .build()
        .context("starting the I/O runtime")
    {
        Ok(r) => r,
        Err(e) => {
            ready.finish(&format!("error {e:#}"));
            return Err(e);
        }
    };
    match serve(&a, &mut ready, &runtime) {
        Ok(()) => {
            // Background fills may still run; do not let them hold the exit.
            runtime.shutdown_timeout(Duration::from_secs(2));
            Ok(())
        }
        Err(e) => {
            // Report first: dropping the runtime would wait for its blocking tasks, and one may
            // be stuck on a server that does not answer (until the store's own I/O timeout).
            // main prints it to stderr (the log file, when detached).
            ready.finish(&format!("error {e:#}"));
            runtime.shutdown_background();
            Err(e)
        }
    }
}

/// Point stdout/stderr (panics, stray prints) and tracing at
/// `<log_dir>/<volume-or-mountpoint>-<pid>.log`.
fn detached_logging(a: &MountArgs) -> anyhow::Result<PathBuf> {
    let dir = crate::paths::log_dir();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating the log directory {}", dir.display()))?;
    let base = a
        .name
        .clone()
        .or_else(|| {
            a.mountpoint
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "mount".into());
    let base: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let path = dir.join(format!("{base}-{}.log", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("creating the log file {}", path.display()))?;
    // SAFETY: dup2 onto the standard descriptors of this (single-threaded so far) process.
    unsafe {
        libc::dup2(f.as_raw_fd(), 1);
        libc::dup2(f.as_raw_fd(), 2);
    }
    crate::init_logging(Some(&path))?;
    Ok(path)
}

/// Open the volume, mount it, report readiness, and serve until unmounted or signalled.
fn serve(
    a: &MountArgs,
    ready: &mut Ready,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<()> {
    let mountpoint = check_mountpoint(&a.mountpoint)?;
    let urls = horcrux::store::parse_access(&a.access)?;
    // A metrics address that cannot be bound fails the mount: the user asked for it.
    let metrics_listener = a.metrics.as_deref().map(crate::metrics::bind).transpose()?;
    let cache_dir = crate::paths::cache_dir(a.cache.cache_dir.as_ref());
    let cache = Cache::open(CacheConfig {
        dir: cache_dir.clone(),
        max_size: a.cache.cache_size,
    })
    .with_context(|| format!("opening the cache at {}", cache_dir.display()))?;

    let (fetch_config, mirror_config) = fetch_configs(a);
    let access = absolute_access(&a.access);
    let mc = mirror_config.clone();
    let opened = runtime.block_on(async {
        let mirror_config = mc;
        // Peers of the peers file first (each chunk asked first of its rendezvous owner), then
        // the listed sources.
        let peers = peer_urls(a, &urls)?;
        let group: Vec<usize> = (0..peers.len()).collect();
        let stores = peers
            .iter()
            .chain(urls.iter())
            .map(crate::open_store)
            .collect::<Result<Vec<_>, _>>()?;
        // Chunks of versions pulled lazily are read from the remote they were pulled from.
        let stores = horcrux::remotes::with_lazy_remotes(stores, crate::store_opener());
        // Metadata reads fall over between mirrors just as chunk reads do.
        let source = Arc::new(MirrorStore::new(stores, mirror_config).with_rendezvous(group));
        let repo = Repository::open(source.clone() as Arc<dyn Store>).await?;
        let name = repo.pick_volume(a.name.as_deref()).await?;
        // Any revision: a branch, a tag, a commit id or prefix, with `~N` to go back.
        let mut id = horcrux::history::resolve_rev(&repo, &name, &a.reference, None)
            .await?
            .id;
        let overlay = if a.read_only {
            None
        } else {
            let dir = a
                .overlay_dir
                .clone()
                .unwrap_or_else(|| crate::paths::overlay_dir(&urls[0].to_string(), &name));
            let ov = Overlay::open(&dir)?;
            // The daemon may have died between moving a branch and rebasing on the commit.
            let landed = horcrux::versions::settle_pending_commit(&ov, &repo).await?;
            if let Some(c) = landed {
                tracing::info!(commit = %c, "the last commit of this overlay's changes had landed: they are that commit now");
            }
            if let Some(b) = ov.base() {
                let dirty = !ov.state.read().is_clean();
                if dirty && b.commit != id.to_hex() {
                    // Never apply changes to a version they were not made on.
                    tracing::warn!(
                        reference = %a.reference, now = %id.short(), changes_on = %b.commit,
                        overlay = %dir.display(),
                        "the overlay holds uncommitted changes made on another version: mounting that version"
                    );
                    id = repo.resolve(&name, &b.commit).await?;
                }
            }
            Some((ov, dir))
        };
        let commit = repo.commit(id).await?;
        let mid = commit
            .manifest_id()
            .ok_or_else(|| anyhow!("commit {id} of volume `{name}` names no manifest"))?;
        let manifest = repo.manifest(mid, &cache).await?;
        let (overlay, overlay_dir) = match overlay {
            Some((ov, dir)) => {
                ov.set_base(&BaseInfo {
                    volume: name.clone(),
                    commit: id.to_hex(),
                    manifest: mid.to_hex(),
                    max_ino: manifest.max_ino()?,
                })
                .with_context(|| format!("using the overlay {}", dir.display()))?;
                (Some(ov), Some(dir))
            }
            None => (None, None),
        };
        // Commits go onto the mounted branch (a tag or commit id has none).
        let branch = match repo.branch(&name, &a.reference).await {
            Ok(Some(_)) => Some(a.reference.clone()),
            _ => None,
        };
        anyhow::Ok((name, id, manifest, source, overlay, branch, overlay_dir))
    });
    let (opened, offline) = match opened {
        Ok(o) => (o, false),
        Err(e) => match offline_version(a, &cache, &access, &urls, mirror_config.clone(), runtime)?
        {
            Some(o) => {
                tracing::warn!(error = %format!("{e:#}"), volume = %o.0, commit = %o.1, "the source is unreachable: mounting the cached version this volume was prefetched at (its ref may have moved since; commits are refused until the source is back)");
                (o, true)
            }
            None => return Err(e),
        },
    };
    let (name, commit, manifest, source, overlay, branch, overlay_dir) = opened;

    let block_size = manifest.header().block_size;
    let repo = if offline {
        Repository::unchecked(source.clone() as Arc<dyn Store>)
    } else {
        runtime.block_on(Repository::open(source.clone() as Arc<dyn Store>))?
    };
    let profile_store = repo.store().clone();
    let fetcher = Arc::new(Fetcher::with_mirrors(
        source,
        cache.clone(),
        block_size,
        fetch_config,
    ));
    let writable = overlay.is_some();
    let mut volume = match overlay {
        Some(ov) => Volume::with_overlay(manifest, fetcher, runtime.handle().clone(), ov)?,
        None => Volume::new(manifest, fetcher, runtime.handle().clone()),
    };
    volume.set_passthrough(horcrux::volume::PassthroughConfig {
        enabled: !a.no_passthrough,
        min_size: a.passthrough_min_size,
    });
    let volume = Arc::new(volume);
    let ops = horcrux_fuse::op_metrics();
    // Record from the first read on; the recording is dropped later if this version turns out
    // to have a profile already (that check needs the store: not before the mount is live).
    let record = !offline && !a.no_profile && !a.record_profile.is_zero();
    let recorder = record.then(|| {
        let r = Arc::new(horcrux::profile::Recorder::new(
            a.record_profile,
            horcrux::profile::MAX_ENTRIES,
        ));
        volume.set_recorder(r.clone());
        r
    });
    let options = horcrux_fuse::MountOptions {
        read_only: !writable,
        allow_other: a.allow_other,
        fsname: horcrux_fuse::fsname(&name),
        threads: a.threads,
        tuning: horcrux_fuse::Tuning {
            max_background: a.fuse_max_background,
            max_write: a.fuse_max_write.map(|w| w.min(u32::MAX as u64) as u32),
            readdirplus: a.fuse_readdirplus,
        },
        ops: Some(ops.clone()),
    };
    let session = horcrux_fuse::mount(volume.clone(), &mountpoint, &options)
        .with_context(|| format!("mounting on {}", mountpoint.display()))?;
    // Until the session runs, a failure here must not leave a mount nobody serves.
    let guard = DetachOnDrop(Some(mountpoint.clone()));
    let prefetcher = Arc::new(horcrux::prefetch::Prefetcher::new(
        volume.clone(),
        cache.clone(),
        runtime.handle().clone(),
        &name,
        &access,
    ));
    if let Err(e) =
        horcrux_fuse::tune_readahead(&mountpoint, a.readahead_kb.unwrap_or(READAHEAD_KB))
    {
        tracing::debug!(error = %e, "could not raise the kernel readahead");
    }

    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let worker = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            let r = match session.run() {
                // Once an unmounted (or detached) filesystem's last user is gone the kernel
                // answers DESTROY and aborts the connection: a worker thread caught between two
                // requests then reads ECONNABORTED rather than ENODEV. Either way the session
                // ended because the mount did, not because serving failed.
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
                    tracing::info!("the kernel closed the FUSE connection (aborted at unmount)");
                    Ok(())
                }
                r => r,
            };
            let _ = done_tx.send(());
            r
        })
        .context("starting the FUSE session")?;
    guard.disarm();
    let pidfile = PidFile::create(&mountpoint);
    let startup_state = Arc::new(crate::cmd::control_handler::StartupState::default());
    // The control socket answers before `horcrux mount` returns.
    let handler = Arc::new(crate::cmd::control_handler::ControlHandler {
        volume: volume.clone(),
        name: name.clone(),
        commit: parking_lot::Mutex::new(commit.to_hex()),
        info: horcrux_proto::control::MountInfo {
            volume: name.clone(),
            access: access.clone(),
            branch: branch.clone(),
            reference: a.reference.clone(),
            commit: commit.to_hex(),
            mountpoint: mountpoint.display().to_string(),
            cache_dir: cache_dir.display().to_string(),
            overlay_dir: overlay_dir.as_ref().map(|d| d.display().to_string()),
            read_only: !writable,
        },
        branch: parking_lot::Mutex::new(branch),
        repo: repo.clone(),
        cache: cache.clone(),
        runtime: runtime.handle().clone(),
        prefetcher: prefetcher.clone(),
        startup: startup_state.clone(),
        ops,
        started: std::time::Instant::now(),
        metrics_addr: parking_lot::Mutex::new(None),
    });
    if let Some(listener) = metrics_listener {
        let h = handler.clone();
        let bound = crate::metrics::start(
            listener,
            runtime.handle(),
            Arc::new(move || {
                let mut e = crate::metrics::Exposition::default();
                let r = h.stats();
                crate::metrics::render_mount(&mut e, &r, &r.volume);
                e.finish()
            }),
        );
        match bound {
            Ok(b) => *handler.metrics_addr.lock() = Some(b.to_string()),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "no metrics endpoint"),
        }
    }
    let control = horcrux_proto::control::serve(
        &crate::mounts::runtime_file(&mountpoint, "sock"),
        handler,
    )
    .map_err(|e| tracing::warn!(error = %e, "no control socket: status/diff/discard will not work"))
    .ok();
    // Handle signals before anyone is told the mount is live: a SIGTERM sent right after the
    // banner must unmount cleanly, not kill the daemon and leave a dead mount behind.
    let signals = Signals::install(runtime)?;
    let what = format!("{name}@{}", commit.short());
    tracing::info!(volume = %name, commit = %commit, mountpoint = %mountpoint.display(), "mounted");
    if ready.0.is_some() {
        ready.finish(&format!("ok {what}"));
    } else {
        println!(
            "mounted {what} on {} (Ctrl-C to unmount)",
            mountpoint.display()
        );
        let _ = std::io::stdout().flush();
    }

    // A prefetch requested before a restart goes on (blocks already cached are skipped).
    match prefetcher.resume(&commit.to_hex()) {
        Ok(Some(_)) => tracing::info!("resumed the recorded prefetch of this volume"),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "the recorded prefetch was not resumed"),
    }
    let startup = StartupProfile::start(
        a,
        runtime,
        &volume,
        recorder,
        &cache_dir,
        profile_store,
        &name,
        commit,
        offline,
        startup_state,
    );
    let flusher = writable.then(|| Flusher::start(volume.clone()));
    wait_for_end(runtime, signals, &mountpoint, done_rx)?;
    // A recording still open is stored now (the window had not ended).
    startup.finish(runtime);
    let result = worker
        .join()
        .map_err(|_| anyhow!("the FUSE session thread panicked"))?;
    drop(flusher);
    drop(control);
    // Unmounted: make every change durable before the process ends.
    volume
        .sync_all()
        .context("saving the overlay's last changes")?;
    drop(pidfile);
    result.with_context(|| format!("serving {}", mountpoint.display()))?;
    tracing::info!(mountpoint = %mountpoint.display(), "unmounted");
    drop(cache);
    Ok(())
}

/// The start-up profile of a mount (see `horcrux::profile`): after the mount is live, find the
/// profile of this version (or its nearest ancestor) and replay it; store the recording when
/// its window ends, or at unmount if that comes first.
struct StartupProfile {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    replayer: Arc<parking_lot::Mutex<Option<horcrux::profile::Replayer>>>,
}

impl StartupProfile {
    #[allow(clippy::too_many_arguments)]
    fn start(
        a: &MountArgs,
        runtime: &tokio::runtime::Runtime,
        volume: &Arc<Volume>,
        recorder: Option<Arc<horcrux::profile::Recorder>>,
        cache_dir: &Path,
        repo_store: Arc<dyn Store>,
        name: &str,
        commit: horcrux::ids::CommitId,
        offline: bool,
        state: Arc<crate::cmd::control_handler::StartupState>,
    ) -> Self {
        let replayer = Arc::new(parking_lot::Mutex::new(None));
        let replay = !offline && !a.no_profile && !a.no_replay;
        let why_off = if offline {
            "off (the source is unreachable)"
        } else {
            "off"
        };
        state.set_recording(if recorder.is_some() {
            "recording"
        } else {
            why_off
        });
        state.set_replay(if replay {
            "looking for a profile"
        } else {
            why_off
        });
        if recorder.is_none() && !replay {
            return Self {
                stop: None,
                task: None,
                replayer,
            };
        }
        let manifest = volume.manifest();
        let mid: Option<horcrux::ids::ManifestId> = manifest
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok());
        let Some(mid) = mid else {
            tracing::warn!(
                "start-up profile: the base manifest is not a cache file named by its id; no profile recorded or replayed"
            );
            return Self {
                stop: None,
                task: None,
                replayer,
            };
        };
        let store = horcrux::profile::ProfileStore {
            repo: repo_store.clone(),
            // Same keys as the repository, for profiles it refused (read-only credentials).
            local: Arc::new(horcrux::store::FileStore::new(cache_dir.join("profiles"))),
        };
        let block_size = manifest.header().block_size;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let replace = a.replace_profile;
        let config = horcrux::profile::ReplayConfig {
            concurrency: a.replay_concurrency,
        };
        let (volume, name, rp) = (volume.clone(), name.to_string(), replayer.clone());
        let task = runtime.spawn(async move {
            let repo = horcrux::repo::Repository::unchecked(repo_store);
            let mut recorder = recorder;
            match store.find(&repo, &name, commit, mid, block_size).await {
                Ok(Some(f)) => {
                    if f.generations == 0 && !replace && let Some(r) = recorder.take() {
                        r.finish();
                        state.set_recording("not recording (this version has a profile)");
                        tracing::info!("this version has a start-up profile: not recording another (--replace-profile to)");
                    }
                    if replay {
                        tracing::info!(profile = %f.id.short(), place = f.place, recorded_on = %f.manifest, generations_back = f.generations, entries = f.profile.entries.len(), "replaying the start-up profile");
                        let r = horcrux::profile::Replayer::start(volume.clone(), f.profile, config);
                        *state.progress.lock() =
                            Some((f.id.short(), f.generations as u32, r.progress.clone()));
                        state.set_replay("running");
                        *rp.lock() = Some(r);
                    }
                }
                Ok(None) => {
                    tracing::info!("no start-up profile for this version or its recent ancestors");
                    if replay {
                        state.set_replay("no profile for this version or its recent ancestors");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "start-up profile refused; nothing replayed");
                    if replay {
                        state.set_replay(format!("refused: {e}"));
                    }
                }
            }
            let Some(rec) = recorder else { return };
            // Until the window ends or the volume is unmounted.
            let window = rec.window().saturating_sub(rec.elapsed());
            tokio::select! {
                _ = tokio::time::sleep(window) => {}
                _ = stop_rx => {}
            }
            let Some(entries) = rec.finish() else { return };
            if entries.is_empty() {
                tracing::info!("start-up profile: no read reached the daemon during the window; nothing stored");
                state.set_recording("ended: no read reached the daemon, nothing stored");
                return;
            }
            let profile = horcrux::profile::Profile {
                header: horcrux::profile::ProfileHeader {
                    format: "horcrux-profile".into(),
                    version: 1,
                    volume: name.clone(),
                    commit: commit.to_hex(),
                    manifest: mid.to_hex(),
                    block_size,
                    window_ms: rec.window().as_millis() as u64,
                    recorded: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs() as i64)
                        .unwrap_or(0),
                    host: crate::cmd::generate::hostname(),
                    entries: entries.len() as u32,
                },
                entries,
            };
            let n = profile.entries.len();
            match store.save(&profile, replace).await {
                Ok(horcrux::profile::Stored::KeptExisting) => {
                    tracing::info!(blocks = n, "start-up profile recorded, but this version has one already: kept that one");
                    state.set_recording(format!("ended: {n} blocks recorded, the version's existing profile kept"));
                }
                Ok(w) => {
                    tracing::info!(blocks = n, place = ?w, key = %horcrux::format::profile_ref_key(&name, &mid), "start-up profile stored");
                    let place = match w {
                        horcrux::profile::Stored::Local => "the local cache",
                        _ => "the repository",
                    };
                    state.set_recording(format!("stored in {place}: {n} blocks"));
                }
                Err(e) => {
                    tracing::warn!(error = %e, blocks = n, "start-up profile not stored");
                    state.set_recording(format!("not stored: {e}"));
                }
            }
        });
        Self {
            stop: Some(stop_tx),
            task: Some(task),
            replayer,
        }
    }

    /// Stop the replay and store a recording that is still open (bounded wait).
    fn finish(mut self, runtime: &tokio::runtime::Runtime) {
        if let Some(r) = self.replayer.lock().take() {
            r.cancel();
        }
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let r =
                runtime.block_on(async { tokio::time::timeout(Duration::from_secs(5), t).await });
            if r.is_err() {
                tracing::warn!("start-up profile: storing it took over 5 s; given up");
            }
        }
    }
}

/// What a mount opens: volume name, commit, base manifest, source, overlay, branch and overlay
/// directory.
type Opened = (
    String,
    horcrux::ids::CommitId,
    Arc<horcrux::manifest::Manifest>,
    Arc<MirrorStore>,
    Option<Overlay>,
    Option<String>,
    Option<PathBuf>,
);

/// When the source cannot be opened: the version a prefetch recorded for this volume and
/// access (see `horcrux prefetch`), if its manifest is in the cache — or, for a writable
/// mount, the overlay's base when it was prefetched and its manifest is cached. Mounted so,
/// the volume reads what the prefetch pinned; it shows that version even if the ref moved, and
/// has no branch (nothing can be committed without the source).
fn offline_version(
    a: &MountArgs,
    cache: &Arc<Cache>,
    access: &str,
    urls: &[horcrux::store::AccessUrl],
    mirror_config: MirrorConfig,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<Option<Opened>> {
    let records = cache.prefetch_records_for(access)?;
    let rec = match &a.name {
        Some(n) => records.into_iter().find(|r| &r.volume == n),
        None if records.len() == 1 => records.into_iter().next(),
        None => None,
    };
    let Some(rec) = rec else {
        return Ok(None);
    };
    let mut commit: horcrux::ids::CommitId = rec.commit.parse()?;
    let mut mid = rec.manifest;
    let overlay = if a.read_only {
        None
    } else {
        let dir = a
            .overlay_dir
            .clone()
            .unwrap_or_else(|| crate::paths::overlay_dir(&urls[0].to_string(), &rec.volume));
        let ov = Overlay::open(&dir)?;
        if let Some(b) = ov.base() {
            let (c, m) = (b.commit.parse()?, b.manifest.parse()?);
            if (c, m) != (commit, mid) {
                if !cache.has_manifest(&m) {
                    // The changes were made on a version that is not here: never show them on
                    // another one.
                    bail!(
                        "the source is unreachable and the overlay {} holds a version ({}) whose manifest is not cached",
                        dir.display(),
                        b.commit
                    );
                }
                (commit, mid) = (c, m);
            }
        }
        Some((ov, dir))
    };
    if !cache.has_manifest(&mid) {
        return Ok(None);
    }
    let manifest = Arc::new(horcrux::manifest::Manifest::open(
        &cache.manifest_path(&mid),
    )?);
    let stores = runtime.block_on(async {
        urls.iter()
            .map(crate::open_store)
            .collect::<Result<Vec<_>, _>>()
    })?;
    // As for a mount with its source: a remote may still serve what was pulled lazily.
    let stores = horcrux::remotes::with_lazy_remotes(stores, crate::store_opener());
    let source = Arc::new(MirrorStore::new(stores, mirror_config));
    let (overlay, overlay_dir) = match overlay {
        Some((ov, dir)) => {
            ov.set_base(&BaseInfo {
                volume: rec.volume.clone(),
                commit: commit.to_hex(),
                manifest: mid.to_hex(),
                max_ino: manifest.max_ino()?,
            })?;
            (Some(ov), Some(dir))
        }
        None => (None, None),
    };
    Ok(Some((
        rec.volume,
        commit,
        manifest,
        source,
        overlay,
        None,
        overlay_dir,
    )))
}

/// The access string with relative file paths made absolute, so commands run from elsewhere
/// (`log`, `push` via the control socket) reach the same repository. Other URLs stay as given
/// (their query options matter).
fn absolute_access(access: &str) -> String {
    access
        .split(',')
        .map(|part| match horcrux::store::parse_one(part) {
            Ok(horcrux::store::AccessUrl::File { path }) if !path.is_absolute() => {
                match std::path::absolute(&path) {
                    Ok(p) => format!("file://{}", p.display()),
                    Err(_) => part.to_string(),
                }
            }
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Journals pending data-write metadata (sizes, written ranges) every second, the way a local
/// filesystem commits its journal periodically: a crash loses at most that much of what was
/// not fsync'd.
struct Flusher {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    fn start(volume: Arc<Volume>) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("overlay-flush".into())
            .spawn(move || {
                // A full overlay disk fails every pass until space is freed: say so every
                // 30 s, not every second (the writers get ENOSPC themselves).
                let mut full_logged: Option<std::time::Instant> = None;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    rx.recv_timeout(Duration::from_secs(1))
                {
                    if let Some(ov) = volume.overlay()
                        && let Err(e) = ov.flush_all()
                    {
                        if !e.is_disk_full() {
                            tracing::warn!(error = %e, "journaling pending changes failed");
                        } else if full_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(30))
                        {
                            full_logged = Some(std::time::Instant::now());
                            tracing::warn!(
                                error = %e,
                                "journaling pending changes failed: overlay directory {} is full; \
                                 free space there (writes get ENOSPC meanwhile)",
                                e.dir()
                            );
                        }
                    }
                }
            })
            .ok();
        Self {
            stop: Some(tx),
            thread,
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Lazily unmounts a mount on drop unless disarmed.
struct DetachOnDrop(Option<PathBuf>);

impl DetachOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        if let Some(mp) = self.0.take() {
            let _ = horcrux_fuse::unmount(&mp, true);
        }
    }
}

/// Serve until the session ends (someone unmounted) or SIGINT/SIGTERM asks us to unmount.
/// A busy mount is detached lazily and served until its last file closes; a second signal
/// then exits at once.
/// SIGINT and SIGTERM streams, installed early (see `serve`).
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn install(runtime: &tokio::runtime::Runtime) -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let _guard = runtime.enter();
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
        })
    }
}

fn wait_for_end(
    runtime: &tokio::runtime::Runtime,
    signals: Signals,
    mountpoint: &Path,
    mut done: tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    let Signals { mut int, mut term } = signals;
    runtime.block_on(async {
        let sig = tokio::select! {
            _ = &mut done => return anyhow::Ok(()),
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        };
        tracing::info!("{sig}: unmounting {}", mountpoint.display());
        let mp = mountpoint.to_path_buf();
        let r = tokio::task::spawn_blocking(move || horcrux_fuse::unmount(&mp, false))
            .await
            .expect("unmount task");
        match r {
            Ok(()) => {}
            Err(e) if is_busy(&e) => {
                tracing::warn!(
                    "{} is busy: detaching it; open files stay readable until closed \
                     (signal again to exit now)",
                    mountpoint.display()
                );
                let mp = mountpoint.to_path_buf();
                tokio::task::spawn_blocking(move || horcrux_fuse::unmount(&mp, true))
                    .await
                    .expect("unmount task")
                    .with_context(|| format!("detaching {}", mountpoint.display()))?;
                tokio::select! {
                    _ = &mut done => return Ok(()),
                    _ = int.recv() => bail!("interrupted while files were still open"),
                    _ = term.recv() => bail!("terminated while files were still open"),
                }
            }
            Err(e) => {
                return Err(e).with_context(|| format!("unmounting {}", mountpoint.display()));
            }
        }
        // After a successful unmount the kernel closes the connection and the session ends.
        let _ = done.await;
        Ok(())
    })
}

fn is_busy(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EBUSY) || e.kind() == std::io::ErrorKind::ResourceBusy
}

// ---------------------------------------------------------------------------------------------
// Daemon pid files, so `umount` can wait for the daemon to finish (cache index flushed).

/// `<state>/run/<hash of mountpoint>.pid` holding "<pid>\n<mountpoint>\n"; removed on drop.
struct PidFile(Option<PathBuf>);

fn pidfile_path(mountpoint: &Path) -> PathBuf {
    crate::mounts::runtime_file(mountpoint, "pid")
}

impl PidFile {
    fn create(mountpoint: &Path) -> Self {
        let path = pidfile_path(mountpoint);
        let r = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|_| {
                horcrux::util::write_atomic(
                    &path,
                    format!("{}\n{}\n", std::process::id(), mountpoint.display()).as_bytes(),
                )
            });
        match r {
            Ok(()) => Self(Some(path)),
            Err(e) => {
                tracing::debug!(error = %e, path = %path.display(), "no pid file");
                Self(None)
            }
        }
    }

    /// The daemon serving `mountpoint`, if its pid file names a live process.
    fn read(mountpoint: &Path) -> Option<u32> {
        let text = std::fs::read_to_string(pidfile_path(mountpoint)).ok()?;
        let mut lines = text.lines();
        let pid: u32 = lines.next()?.parse().ok()?;
        (lines.next()? == mountpoint.display().to_string() && alive(pid)).then_some(pid)
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Is `pid` a running (not zombie) process?
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------------
// umount

pub fn run_umount(a: UmountArgs) -> anyhow::Result<()> {
    let mp = mountinfo::absolute(&a.mountpoint)
        .with_context(|| format!("{}: no such directory", a.mountpoint.display()))?;
    let entry = mountinfo::find(&mp)
        .context("reading /proc/self/mountinfo")?
        .ok_or_else(|| anyhow!("{} is not a mount point", mp.display()))?;
    if !entry.is_horcrux() {
        bail!(
            "{} is not a horcrux mount (it is a {} mount of {}); use umount(8) for it",
            mp.display(),
            entry.fstype,
            entry.source
        );
    }
    let daemon = PidFile::read(&mp);
    if let Err(e) = horcrux_fuse::unmount(&mp, a.lazy) {
        if is_busy(&e) {
            bail!(
                "{} is busy: files or directories in it are in use; close them, or detach it \
                 now with `horcrux umount --lazy {}`",
                mp.display(),
                mp.display()
            );
        }
        return Err(e).with_context(|| format!("unmounting {}", mp.display()));
    }
    if !horcrux_fuse::wait_unmounted(&mp, DAEMON_EXIT_WAIT)? {
        bail!(
            "{} is still mounted after unmounting it; see `grep {} /proc/self/mountinfo`",
            mp.display(),
            mp.display()
        );
    }
    // A lazily detached mount is served until its files close: do not wait for that.
    if let (Some(pid), false) = (daemon, a.lazy) {
        let deadline = std::time::Instant::now() + DAEMON_EXIT_WAIT;
        while alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(pid) {
            eprintln!(
                "horcrux: warning: unmounted {}, but its daemon (pid {pid}) is still running",
                mp.display()
            );
        }
    }
    println!("unmounted {}", mp.display());
    Ok(())
}

fn parse_readdirplus(s: &str) -> Result<horcrux_fuse::ReaddirPlus, String> {
    match s {
        "auto" => Ok(horcrux_fuse::ReaddirPlus::Auto),
        "always" => Ok(horcrux_fuse::ReaddirPlus::Always),
        "never" => Ok(horcrux_fuse::ReaddirPlus::Never),
        _ => Err(format!("`{s}`: expected auto, always or never")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfile_names_differ_per_mountpoint() {
        assert_ne!(
            pidfile_path(Path::new("/a/b")),
            pidfile_path(Path::new("/a_b"))
        );
        assert_eq!(pidfile_path(Path::new("/m")), pidfile_path(Path::new("/m")));
    }

    #[test]
    fn timeouts_and_fetch_flags() {
        assert_eq!(parse_timeout("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_timeout("2.5").unwrap(), Duration::from_millis(2500));
        for bad in ["0", "-1", "x", "", "inf", "NaN", "1e9"] {
            let e = parse_timeout(bad).unwrap_err();
            assert!(e.contains("not a timeout"), "{bad}: {e}");
        }
        assert_eq!(
            mirror_attempt_timeout(Duration::from_secs(30)),
            Duration::from_secs(10)
        );
        assert_eq!(
            mirror_attempt_timeout(Duration::from_secs(5)),
            Duration::from_millis(2500)
        );

        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            m: MountArgs,
        }
        let parse = |extra: &[&str]| {
            let mut v = vec!["t", "file:///r", "/mnt"];
            v.extend_from_slice(extra);
            T::try_parse_from(v).map(|t| t.m)
        };
        let d = parse(&[]).unwrap();
        assert_eq!(d.timeout, Duration::from_secs(30));
        let (f, m) = fetch_configs(&d);
        assert_eq!(f.request_timeout, Duration::from_secs(30));
        assert_eq!(f.max_concurrency, FetchConfig::default().max_concurrency);
        assert!(f.fill_chunks);
        assert!(f.piece_reads);
        assert_eq!(m.attempt_timeout, Duration::from_secs(10));
        let s3 = T::try_parse_from(["t", "s3://bucket/repo", "/mnt"])
            .unwrap()
            .m;
        assert!(!fetch_configs(&s3).0.piece_reads);
        let a = parse(&["--timeout", "5", "--concurrency", "3", "--no-fill"]).unwrap();
        let (f, m) = fetch_configs(&a);
        assert_eq!(f.request_timeout, Duration::from_secs(5));
        assert_eq!(f.max_concurrency, 3);
        assert!(!f.fill_chunks);
        assert_eq!(m.attempt_timeout, Duration::from_millis(2500));
        assert!(parse(&["--concurrency", "0"]).is_err());
        assert!(parse(&["--timeout", "0"]).is_err());
    }

    #[test]
    fn this_process_is_alive() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX));
    }

    #[test]
    fn mountpoint_errors_are_clear() {
        let t = std::env::temp_dir().join(format!("horcrux-mp-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        std::fs::create_dir_all(&t).unwrap();
        let missing = t.join("nope");
        let e = check_mountpoint(&missing).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        let file = t.join("f");
        std::fs::write(&file, b"x").unwrap();
        let e = check_mountpoint(&file).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        let e = check_mountpoint(&t).unwrap_err().to_string();
        assert!(e.contains("not empty"), "{e}");
        let empty = t.join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert_eq!(
            check_mountpoint(&empty).unwrap(),
            empty.canonicalize().unwrap()
        );
        let e = check_mountpoint(Path::new("/proc"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("already a mount point"), "{e}");
        std::fs::remove_dir_all(&t).unwrap();
    }
}

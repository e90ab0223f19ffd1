//! The `horcrux` command: argument parsing, logging, and wiring of stores, cache and mounts.
//! This is the only crate that assembles everything; errors become `anyhow` here.

mod cmd;
mod config;
mod docker_api;
mod metrics;
mod mounts;
mod paths;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Content-addressed, lazily fetched, writable copies of large directories.
#[derive(Debug, Parser)]
#[command(name = "horcrux", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    store: StoreArgs,
    /// Configuration file to use instead of /etc/horcrux/config.toml and
    /// ~/.config/horcrux/config.toml
    #[arg(long, global = true, env = "HORCRUX_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

/// How to reach remote stores (any command that opens a repository).
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// SSH private key to use (instead of ssh-agent and ~/.ssh/id_*)
    #[arg(long, global = true, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// known_hosts file for SSH host-key checks [default: ~/.ssh/known_hosts]
    #[arg(long, global = true, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// Do not check SSH host keys (exposes you to man-in-the-middle attacks)
    #[arg(long, global = true)]
    pub insecure_ignore_host_key: bool,
    /// Parallel SSH sessions per host for transfers (2 more serve only small reads) [default: 4]
    #[arg(long, global = true, value_name = "N")]
    pub ssh_sessions: Option<usize>,
    /// S3 endpoint of any S3-compatible server, e.g. http://10.0.0.9:3900 (URL `endpoint=` wins)
    #[arg(long, global = true, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// S3 region (URL `region=` wins) [default: AWS_REGION, the profile's, else us-east-1]
    #[arg(long, global = true, value_name = "REGION")]
    pub s3_region: Option<String>,
    /// AWS profile of ~/.aws/credentials and ~/.aws/config (URL `profile=` wins)
    #[arg(long, global = true, value_name = "NAME")]
    pub s3_profile: Option<String>,
    /// Path-style S3 requests (default: on when an endpoint is given)
    #[arg(long, global = true, value_name = "BOOL")]
    pub s3_path_style: Option<bool>,
    /// Allow plain http to the S3 endpoint (default: when the endpoint is http://)
    #[arg(long, global = true, value_name = "BOOL")]
    pub s3_allow_http: Option<bool>,
    /// Directory of this node's TLS files for peers (horcrux://, `serve`): ca.crt and one node
    /// certificate NAME.crt with its NAME.key (see `horcrux tls`)
    #[arg(long, global = true, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Node certificate to use when the TLS directory holds several (a name or a path)
    #[arg(long, global = true, value_name = "NAME|FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Key of the node certificate [default: the certificate's path with .key]
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
}

impl StoreArgs {
    /// These flags as a command line (what child `horcrux` processes, such as the mounts the
    /// Docker plugin runs, must be given to reach stores the same way).
    pub fn to_flags(&self) -> Vec<std::ffi::OsString> {
        let mut out: Vec<std::ffi::OsString> = Vec::new();
        let mut flag = |name: &str, value: Option<std::ffi::OsString>| {
            if let Some(v) = value {
                out.push(format!("--{name}").into());
                out.push(v);
            }
        };
        flag("identity", self.identity.clone().map(Into::into));
        flag("known-hosts", self.known_hosts.clone().map(Into::into));
        flag(
            "ssh-sessions",
            self.ssh_sessions.map(|n| n.to_string().into()),
        );
        flag("s3-endpoint", self.s3_endpoint.clone().map(Into::into));
        flag("s3-region", self.s3_region.clone().map(Into::into));
        flag("s3-profile", self.s3_profile.clone().map(Into::into));
        flag(
            "s3-path-style",
            self.s3_path_style.map(|b| b.to_string().into()),
        );
        flag(
            "s3-allow-http",
            self.s3_allow_http.map(|b| b.to_string().into()),
        );
        flag("tls-dir", self.tls_dir.clone().map(Into::into));
        flag("tls-cert", self.tls_cert.clone().map(Into::into));
        flag("tls-key", self.tls_key.clone().map(Into::into));
        if self.insecure_ignore_host_key {
            out.push("--insecure-ignore-host-key".into());
        }
        out
    }
}

static STORE_FLAGS: std::sync::OnceLock<Vec<std::ffi::OsString>> = std::sync::OnceLock::new();

/// The store flags this process was given, as a command line (see [`StoreArgs::to_flags`]).
pub fn store_flags() -> Vec<std::ffi::OsString> {
    STORE_FLAGS.get().cloned().unwrap_or_default()
}

static S3_DEFAULTS: std::sync::OnceLock<Vec<(&'static str, String)>> = std::sync::OnceLock::new();

static TLS_ARGS: std::sync::OnceLock<(Option<PathBuf>, Option<PathBuf>, Option<PathBuf>)> =
    std::sync::OnceLock::new();

/// This node's TLS files from `--tls-dir` (and `--tls-cert`/`--tls-key`); `None` without
/// `--tls-dir`.
pub fn tls_files() -> anyhow::Result<Option<horcrux_proto::tls::TlsFiles>> {
    let Some((Some(dir), cert, key)) = TLS_ARGS.get() else {
        return Ok(None);
    };
    Ok(Some(horcrux_proto::tls::TlsFiles::find(
        dir,
        cert.as_deref(),
        key.as_deref(),
    )?))
}

static STORE_OPTIONS: std::sync::OnceLock<horcrux::store::StoreOptions> =
    std::sync::OnceLock::new();

/// The bound a mount daemon puts on each blocking SSH call (its mirror attempt timeout).
static SSH_IO_TIMEOUT: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();

/// Bound every blocking SSH call of the stores this process opens from now on by `t` (see
/// `StoreOptions::ssh_io_timeout`). Called once by the mount daemon, before it opens stores.
pub fn set_ssh_io_timeout(t: std::time::Duration) {
    let _ = SSH_IO_TIMEOUT.set(t);
}

/// Store options from the command line, for every command that opens a store.
pub fn store_options() -> horcrux::store::StoreOptions {
    let mut o = STORE_OPTIONS.get().cloned().unwrap_or_default();
    if let Some(t) = SSH_IO_TIMEOUT.get() {
        o.ssh_io_timeout = Some(*t);
    }
    o
}

/// Open the store an access URL names, with the command line's store options.
/// S3 options given as flags fill what the URL's query does not say.
/// The store behind an access URL list: the first URL, or all of them as mirrors in order.
/// After them, the repository's registered remotes, for the chunks a lazy `fetch` or `pull`
/// left there (`horcrux::remotes`).
pub fn open_access(access: &str) -> anyhow::Result<std::sync::Arc<dyn horcrux::store::Store>> {
    let urls = horcrux::store::parse_access(access)?;
    let stores = urls.iter().map(open_store).collect::<Result<Vec<_>, _>>()?;
    Ok(std::sync::Arc::new(horcrux::store::MirrorStore::new(
        horcrux::remotes::with_lazy_remotes(stores, store_opener()),
        horcrux::store::MirrorConfig::default(),
    )))
}

/// [`open_store`] as the core's store opener.
pub fn store_opener() -> horcrux::store::OpenStore {
    std::sync::Arc::new(|u: &horcrux::store::AccessUrl| open_store(u))
}

/// The repository behind an access URL list (see [`open_access`]).
pub async fn open_repo(access: &str) -> anyhow::Result<horcrux::repo::Repository> {
    Ok(horcrux::repo::Repository::open(open_access(access)?).await?)
}

pub fn open_store(
    url: &horcrux::store::AccessUrl,
) -> Result<std::sync::Arc<dyn horcrux::store::Store>, horcrux::store::StoreError> {
    let mut url = url.clone();
    if let horcrux::store::AccessUrl::S3 { options, .. } = &mut url {
        for (k, v) in S3_DEFAULTS.get().into_iter().flatten() {
            options.entry((*k).to_string()).or_insert_with(|| v.clone());
        }
    }
    horcrux::store::open_store_with(&url, &store_options())
}

/// Options shared by every command that uses the local cache.
#[derive(Debug, Clone, Args)]
pub struct CacheArgs {
    /// Cache directory [default: /var/lib/horcrux/cache for root, else $XDG_CACHE_HOME/horcrux]
    #[arg(long, global = true, env = "HORCRUX_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Bound on cached chunk data, e.g. 10G (least recently used chunks are evicted)
    #[arg(long, global = true, value_parser = parse_size)]
    pub cache_size: Option<u64>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Cut a directory into content-addressed chunks and a manifest: the first commit of a volume
    Generate(cmd::generate::GenerateArgs),
    /// Import a volume of an original Horcrux repository (`<name>.meta` + `v1/` chunks) as a new volume
    Import(cmd::import::ImportArgs),
    /// Show a repository's volume as a local filesystem, fetching only what is read
    Mount(cmd::mount::MountArgs),
    /// Unmount a horcrux mount
    Umount(cmd::mount::UmountArgs),
    /// List the local changes of a mounted volume (added, modified, deleted, renamed paths)
    Status(cmd::changes::StatusArgs),
    /// Show what changed, per file (byte ranges, sizes, metadata): in a mount, or between two versions
    Diff(cmd::changes::DiffArgs),
    /// Throw away local changes of a mounted volume (lists them unless --force)
    Discard(cmd::changes::DiscardArgs),
    /// Make a mounted volume's changes a new version on its branch
    Commit(cmd::versions::CommitArgs),
    /// Switch a mounted volume to another branch, tag or commit
    Checkout(cmd::versions::CheckoutArgs),
    /// Move the mounted branch to another commit, throwing changes away (--hard)
    Reset(cmd::versions::ResetArgs),
    /// List the versions of a volume, newest first (id, author, date, message, parents)
    Log(cmd::history::LogArgs),
    /// Show one version of a volume in detail
    Show(cmd::history::ShowArgs),
    /// List the branches of a volume, or create one at a revision
    Branch(cmd::history::BranchArgs),
    /// List the tags of a volume, or create one (an immutable name for a version)
    Tag(cmd::history::TagArgs),
    /// Send a mounted volume's branch to another repository (only what it lacks)
    Push(cmd::remotes::PushArgs),
    /// Bring a remote's branches as remote-tracking refs: commits and manifests, data stays lazy
    Fetch(cmd::fetch::FetchArgs),
    /// List, add or remove the named remotes of a volume's repository
    Remote(cmd::fetch::RemoteArgs),
    /// Bring a branch's new commits from another repository (data read on demand); switch the mount
    Pull(cmd::pull::PullArgs),
    /// Make a new copy of a repository's volumes elsewhere (backup/restore); --depth N
    Clone(cmd::remotes::CloneArgs),
    /// Remove what no branch or tag reaches (two runs apart by a grace period); --dry-run
    Gc(cmd::gc::GcArgs),
    /// Check a repository end to end: every reachable commit, manifest and chunk by its hash
    Verify(cmd::verify::VerifyArgs),
    /// Hydrate a mounted volume (or some paths) in the background and pin it: it then needs no source
    Prefetch(cmd::prefetch::PrefetchArgs),
    /// A mount's counters: cache hits and misses, fetches per source, latencies, errors, ops
    Stats(cmd::stats::StatsArgs),
    /// Inspect and bound the local cache
    Cache {
        #[command(subcommand)]
        command: cmd::cache::CacheCommand,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Copy a repository (all or some volumes, with history) to another store; resumable
    Copy(cmd::copy::CopyArgs),
    /// Run the main job end to end on a built-in sample: generate, mount, read, write, commit
    Demo(cmd::demo::DemoArgs),
    /// Serve Docker as a volume driver (`docker volume create -d horcrux ...`)
    Plugin(cmd::plugin::PluginArgs),
    /// Serve repositories and cached chunks to peers over mutually authenticated TLS
    Serve(cmd::peers::ServeArgs),
    /// Certificates for peers: a private CA and node certificates
    Tls {
        #[command(subcommand)]
        command: cmd::peers::TlsCommand,
    },
    /// Read from one peer directly (checks, scripts, benchmarks)
    Peer {
        #[command(subcommand)]
        command: cmd::peers::PeerCommand,
    },
    /// Show the effective configuration (files, flags, environment) and where each value comes from
    Config(cmd::config::ConfigArgs),
    /// Print shell completions (bash, zsh, fish, elvish, powershell)
    Completions(cmd::docs::CompletionsArgs),
    /// Print or write the manual pages
    Man(cmd::docs::ManArgs),
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    horcrux::format::parse_size(s).ok_or_else(|| {
        format!("`{s}` is not a size: use a number with an optional K, M, G or T suffix")
    })
}

/// `RUST_LOG`-style logging to stderr (or to a file for detached mounts).
pub fn init_logging(log_file: Option<&std::path::Path>) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    // RUST_LOG, else the configuration file's log_level, else info.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        let level = config::get().log_level.as_ref().map(|l| l.value.as_str());
        EnvFilter::try_new(level.unwrap_or("info")).unwrap_or_else(|_| EnvFilter::new("info"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match log_file {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(f))
                .init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}

/// Load the configuration files and let them fill what flags and environment left unset
/// (see `config.rs`); source names in access URL arguments are resolved here too.
fn apply_config(cli: &mut Cli) -> anyhow::Result<config::Config> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let files = config::files_to_read(
        cli.config.as_deref(),
        std::env::var_os("XDG_CONFIG_HOME"),
        home.clone().map(Into::into),
    );
    let mut cfg = config::Config::load(&files, home.as_deref())?;
    let mut applied = std::collections::BTreeMap::new();
    let env_set = |names: &[&str]| names.iter().any(|n| std::env::var_os(n).is_some());
    let st = &mut cli.store;
    let mut note = |key: &'static str, o: Option<config::Origin>| {
        if let Some(o) = o {
            applied.insert(key, o);
        }
    };
    note(
        "ssh.identity",
        config::fill(
            &mut st.identity,
            cfg.ssh_identity.as_ref(),
            "--identity",
            None,
            false,
        ),
    );
    note(
        "ssh.known_hosts",
        config::fill(
            &mut st.known_hosts,
            cfg.ssh_known_hosts.as_ref(),
            "--known-hosts",
            None,
            false,
        ),
    );
    // The AWS variables rank above the file: a flag (which ranks above them) is filled from
    // the file only when they are unset.
    let file = cfg
        .s3_endpoint
        .as_ref()
        .filter(|_| !env_set(&["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]));
    note(
        "s3.endpoint",
        config::fill(&mut st.s3_endpoint, file, "--s3-endpoint", None, false),
    );
    let file = cfg
        .s3_region
        .as_ref()
        .filter(|_| !env_set(&["AWS_REGION", "AWS_DEFAULT_REGION"]));
    note(
        "s3.region",
        config::fill(&mut st.s3_region, file, "--s3-region", None, false),
    );
    let file = cfg
        .s3_profile
        .as_ref()
        .filter(|_| !env_set(&["AWS_PROFILE"]));
    note(
        "s3.profile",
        config::fill(&mut st.s3_profile, file, "--s3-profile", None, false),
    );
    let cache_size = cfg.cache_size.clone();
    let mut fill_cache = |c: &mut CacheArgs| {
        note(
            "cache.size",
            config::fill(
                &mut c.cache_size,
                cache_size.as_ref(),
                "--cache-size",
                None,
                false,
            ),
        );
        // cache_dir: `paths::cache_dir` falls back on the file, for every command.
    };
    let r = |s: &mut String| *s = cfg.resolve_access(s);
    match &mut cli.command {
        Command::Mount(a) => {
            fill_cache(&mut a.cache);
            r(&mut a.access);
        }
        Command::Cache { cache, .. } => fill_cache(cache),
        Command::Generate(a) => r(&mut a.output),
        Command::Import(a) => {
            r(&mut a.source);
            r(&mut a.dest);
        }
        Command::Copy(a) => {
            r(&mut a.source);
            r(&mut a.destination);
        }
        Command::Clone(a) => {
            r(&mut a.source);
            r(&mut a.destination);
        }
        Command::Verify(a) => r(&mut a.url),
        Command::Gc(a) => {
            if let Some(x) = &mut a.access {
                r(x)
            }
        }
        _ => {}
    }
    cfg.applied = applied;
    Ok(cfg)
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    match apply_config(&mut cli) {
        Ok(cfg) => config::set(cfg),
        Err(e) => {
            eprintln!("horcrux: error: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let _ = STORE_FLAGS.set(cli.store.to_flags());
    let st = &cli.store;
    let s3_flags = [
        ("endpoint", st.s3_endpoint.clone()),
        ("region", st.s3_region.clone()),
        ("profile", st.s3_profile.clone()),
        ("path_style", st.s3_path_style.map(|b| b.to_string())),
        ("allow_http", st.s3_allow_http.map(|b| b.to_string())),
    ];
    let _ = S3_DEFAULTS.set(
        s3_flags
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?)))
            .collect(),
    );
    let _ = TLS_ARGS.set((st.tls_dir.clone(), st.tls_cert.clone(), st.tls_key.clone()));
    // A bad --tls-dir is reported when a peer is first used (by `PeerStore::new`), so
    // commands that never reach a peer are not stopped by it.
    let (peer_tls, tls_error) = match tls_files() {
        Ok(f) => (f, None),
        Err(e) => (None, Some(e.to_string())),
    };
    let _ = STORE_OPTIONS.set(horcrux::store::StoreOptions {
        ssh_identity: cli.store.identity.clone(),
        ssh_known_hosts: cli.store.known_hosts.clone(),
        ssh_insecure_ignore_host_key: cli.store.insecure_ignore_host_key,
        ssh_sessions: cli.store.ssh_sessions,
        ssh_io_timeout: None,
        ssh_warm_pool: matches!(&cli.command, Command::Mount(_)),
        ssh_env: Some(horcrux::store::SshEnv::from_process()),
        s3: horcrux::store::S3Options {
            env: Some(horcrux::store::S3Env::from_process()),
            ..Default::default()
        },
        peer: horcrux::store::PeerOptions {
            tls: peer_tls,
            tls_error,
            ..Default::default()
        },
    });
    let result = match cli.command {
        Command::Generate(a) => cmd::generate::run(a),
        Command::Import(a) => cmd::import::run(a),
        Command::Mount(a) => cmd::mount::run(a),
        Command::Umount(a) => cmd::mount::run_umount(a),
        Command::Status(a) => cmd::changes::run_status(a),
        Command::Diff(a) => cmd::changes::run_diff(a),
        Command::Discard(a) => cmd::changes::run_discard(a),
        Command::Commit(a) => cmd::versions::run_commit(a),
        Command::Checkout(a) => cmd::versions::run_checkout(a),
        Command::Reset(a) => cmd::versions::run_reset(a),
        Command::Log(a) => cmd::history::run_log(a),
        Command::Show(a) => cmd::history::run_show(a),
        Command::Branch(a) => cmd::history::run_branch(a),
        Command::Tag(a) => cmd::history::run_tag(a),
        Command::Push(a) => cmd::remotes::run_push(a),
        Command::Fetch(a) => cmd::fetch::run_fetch(a),
        Command::Verify(a) => cmd::verify::run_verify(a),
        Command::Config(a) => cmd::config::run(a, &cli.store),
        Command::Completions(a) => cmd::docs::run_completions::<Cli>(a),
        Command::Man(a) => cmd::docs::run_man::<Cli>(a),
        Command::Remote(a) => cmd::fetch::run_remote(a),
        Command::Pull(a) => cmd::pull::run_pull(a),
        Command::Clone(a) => cmd::remotes::run_clone(a),
        Command::Gc(a) => cmd::gc::run(a),
        Command::Prefetch(a) => cmd::prefetch::run(a),
        Command::Stats(a) => cmd::stats::run(a),
        Command::Cache { command, cache } => cmd::cache::run(command, cache),
        Command::Copy(a) => cmd::copy::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Plugin(a) => cmd::plugin::run(a),
        Command::Serve(a) => cmd::peers::run_serve(a),
        Command::Tls { command } => cmd::peers::run_tls(command),
        Command::Peer { command } => cmd::peers::run_peer(command),
    };
    cmd::plugin::release_temporary_mounts();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("horcrux: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_flags_round_trip() {
        let cli = Cli::parse_from([
            "horcrux",
            "--identity",
            "/k/id",
            "--known-hosts",
            "/k/kh",
            "--insecure-ignore-host-key",
            "--ssh-sessions",
            "3",
            "--s3-endpoint",
            "http://127.0.0.1:9000",
            "--s3-path-style",
            "true",
            "cache",
            "stats",
        ]);
        let flags = cli.store.to_flags();
        let mut argv: Vec<std::ffi::OsString> = vec!["horcrux".into()];
        argv.extend(flags.clone());
        argv.extend(["cache".into(), "stats".into()]);
        let again = Cli::parse_from(argv);
        assert_eq!(again.store.to_flags(), flags);
        assert_eq!(again.store.ssh_sessions, Some(3));
        assert!(again.store.insecure_ignore_host_key);
        assert_eq!(again.store.s3_path_style, Some(true));
        let none = Cli::parse_from(["horcrux", "cache", "stats"]);
        assert!(none.store.to_flags().is_empty());
    }
}

//! Peers: `horcrux tls init|issue` (certificates), `horcrux serve` (the peer server) and
//! `horcrux peer get|ls` (read from one peer: scripts, checks, benchmarks).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use horcrux::cache::{Cache, CacheConfig};
use horcrux::fetch::FetchConfig;
use horcrux::serve::{NodeBackend, ServedRepo};
use horcrux::store::AccessUrl;
use horcrux_proto::peer::{self, ClientOptions, Limits, PeerClient};
use horcrux_proto::tls;

use crate::CacheArgs;

#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Create a private CA (ca.crt, and ca.key readable only by you) in DIR
    Init(TlsInitArgs),
    /// Issue (or re-issue, to rotate) a node certificate NAME.crt + NAME.key signed by the CA
    /// in DIR, valid as server and client for NAME and every --san
    Issue(TlsIssueArgs),
}

#[derive(Debug, Args)]
pub struct TlsInitArgs {
    /// Directory for the CA (created, mode 0700)
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Replace an existing CA (every certificate it signed stops being trusted)
    #[arg(long)]
    pub force: bool,
    /// Common name of the CA certificate
    #[arg(long, default_value = "horcrux CA")]
    pub common_name: String,
}

#[derive(Debug, Args)]
pub struct TlsIssueArgs {
    /// Node name: file names NAME.crt/NAME.key, and a DNS name the certificate is valid for
    pub name: String,
    /// Directory holding the CA (ca.crt, ca.key); the certificate is written there
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Another address (IP) or DNS name peers dial this node by (repeatable)
    #[arg(long = "san", value_name = "ADDR|NAME")]
    pub sans: Vec<String>,
}

pub fn run_tls(c: TlsCommand) -> anyhow::Result<()> {
    match c {
        TlsCommand::Init(a) => {
            let w = tls::init_ca(&a.dir, &a.common_name, a.force)?;
            println!("created CA {} (key {})", w.cert.display(), w.key.display());
            println!(
                "next: horcrux tls issue NODE --dir {} --san ADDRESS; copy ca.crt and the node's \
                 .crt/.key to each node (never ca.key)",
                a.dir.display()
            );
        }
        TlsCommand::Issue(a) => {
            let w = tls::issue(&a.dir, &a.name, &a.sans)?;
            let mut names = vec![a.name.clone()];
            names.extend(a.sans.iter().cloned());
            println!(
                "issued {} (key {}) for {}",
                w.cert.display(),
                w.key.display(),
                names.join(", ")
            );
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on, e.g. 0.0.0.0:7443 (port 0: any free port; the chosen address is
    /// printed as `listening on ADDR`)
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7443")]
    pub listen: String,
    /// A repository to serve, as URL or NAME=URL (repeatable). Its name (default: the last
    /// path component of the URL) is what peers put in horcrux://host:port/NAME. Remote
    /// repositories (s3://, scp://) are served read-through this node's cache, so their origin
    /// is asked once per block however many peers ask
    #[arg(long = "repo", value_name = "[NAME=]URL")]
    pub repos: Vec<String>,
    /// Concurrent data streams; more wait briefly, then are refused (the peer falls over)
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_streams: usize,
    /// Bandwidth limit over all streams, bytes per second (e.g. 200M); default: none
    #[arg(long, value_name = "RATE", value_parser = crate::parse_size)]
    pub bandwidth: Option<u64>,
    /// Serve plain HTTP/2 without TLS (only to measure what TLS costs; never on a network)
    #[arg(long, hide = true)]
    pub insecure_no_tls: bool,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9185; the address is
    /// logged). No authentication: keep it on loopback or a private network
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    #[command(flatten)]
    pub cache: CacheArgs,
}

/// `[NAME=]URL` → (name, url).
fn parse_repo_arg(s: &str) -> anyhow::Result<(String, AccessUrl)> {
    let (name, url) = match s.split_once('=') {
        // `NAME=URL` only when what precedes `=` is a plain name (URLs may hold `=` in their
        // query string, after a `://`).
        Some((n, u)) if !n.contains("://") && !n.is_empty() => (Some(n.to_string()), u),
        _ => (None, s),
    };
    let url = horcrux::store::parse_one(url)?;
    let name = match name {
        Some(n) => n,
        None => horcrux::serve::default_repo_name(&url).ok_or_else(|| {
            anyhow!("{url}: cannot name this repository from its URL; use NAME={url}")
        })?,
    };
    horcrux::format::check_volume_name(&name)
        .map_err(|_| anyhow!("`{name}` is not a valid repository name for --repo NAME=URL"))?;
    Ok((name, url))
}

pub fn run_serve(a: ServeArgs) -> anyhow::Result<()> {
    crate::init_logging(None)?;
    let tls = if a.insecure_no_tls {
        tracing::warn!("serving WITHOUT TLS: anyone who can reach this port can read everything");
        None
    } else {
        let files = crate::tls_files()?.ok_or_else(|| {
            anyhow!(
                "horcrux serve needs TLS files: pass --tls-dir DIR (ca.crt and this node's \
                 certificate and key; see `horcrux tls init` and `horcrux tls issue`)"
            )
        })?;
        Some(tls::server_config(&files)?)
    };
    let metrics_listener = a.metrics.as_deref().map(crate::metrics::bind).transpose()?;
    let cache_dir = crate::paths::cache_dir(a.cache.cache_dir.as_ref());
    let cache = Cache::open(CacheConfig {
        dir: cache_dir.clone(),
        max_size: a.cache.cache_size,
    })
    .with_context(|| format!("opening the cache at {}", cache_dir.display()))?;
    let rt = tokio::runtime::Runtime::new()?;
    let metrics_cache = cache.clone();
    rt.block_on(async {
        let mut repos = Vec::new();
        for r in &a.repos {
            let (name, url) = parse_repo_arg(r)?;
            let read_through = !matches!(url, AccessUrl::File { .. });
            let store = crate::open_store(&url)?;
            tracing::info!(%name, %url, read_through, "serving repository");
            repos.push(ServedRepo {
                name,
                store,
                read_through,
            });
        }
        let backend = Arc::new(NodeBackend::new(
            repos,
            Some(cache),
            FetchConfig::default(),
        )?);
        if let Some(l) = metrics_listener {
            let b = backend.clone();
            let addr = crate::metrics::start(
                l,
                &tokio::runtime::Handle::current(),
                Arc::new(move || {
                    let mut e = crate::metrics::Exposition::default();
                    crate::metrics::render_serve(&mut e, &b, &metrics_cache);
                    e.finish()
                }),
            )?;
            tracing::debug!(%addr, "metrics endpoint started");
        }
        let listener = tokio::net::TcpListener::bind(&a.listen)
            .await
            .with_context(|| format!("listening on {}", a.listen))?;
        let addr = listener.local_addr()?;
        println!("listening on {addr}");
        std::io::stdout().flush()?;
        tracing::info!(%addr, repos = ?backend.names(), tls = tls.is_some(), "serving peers");
        let limits = Limits {
            max_streams: a.max_streams.max(1),
            bandwidth: a.bandwidth,
            ..Limits::default()
        };
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("stopping");
        };
        peer::serve(listener, tls, backend, limits, shutdown).await?;
        anyhow::Ok(())
    })
}

#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Read one object (or a byte range of it) from a peer: to stdout, a file, or nowhere
    /// (with --stats, to measure a transfer)
    Get(PeerGetArgs),
    /// List a repository's keys on a peer, with sizes
    Ls(PeerLsArgs),
}

#[derive(Debug, Args)]
pub struct PeerGetArgs {
    /// horcrux://host:port/REPO
    pub url: String,
    /// Key in the repository, e.g. horcrux.json or chunks/ab/ab12...
    pub key: String,
    /// Byte range START-END (end exclusive), e.g. 0-1048576
    #[arg(long, value_name = "START-END")]
    pub range: Option<String>,
    /// Write to this file ("-" = stdout, the default; "/dev/null" to only measure)
    #[arg(long, short = 'o', value_name = "FILE", default_value = "-")]
    pub output: PathBuf,
    /// Print bytes, time to first byte and throughput on stderr
    #[arg(long)]
    pub stats: bool,
    /// Connect without TLS (only to a `serve --insecure-no-tls`, for benchmarks)
    #[arg(long, hide = true)]
    pub insecure_no_tls: bool,
}

#[derive(Debug, Args)]
pub struct PeerLsArgs {
    /// horcrux://host:port/REPO
    pub url: String,
    /// Only keys starting with this
    #[arg(default_value = "")]
    pub prefix: String,
}

fn peer_client(url: &str, no_tls: bool) -> anyhow::Result<(PeerClient, String)> {
    let AccessUrl::Peer { host, port, repo } = horcrux::store::parse_one(url)? else {
        bail!("`{url}` is not a peer URL (horcrux://host:port/REPO)");
    };
    let tls = if no_tls {
        None
    } else {
        let files = crate::tls_files()?
            .ok_or_else(|| anyhow!("reading from a peer needs --tls-dir DIR"))?;
        Some(tls::client_config(&files)?)
    };
    let client = PeerClient::new(
        &host,
        port,
        ClientOptions {
            tls,
            connect_timeout: Duration::from_secs(5),
        },
    )?;
    Ok((client, repo))
}

fn parse_range(s: &str) -> anyhow::Result<std::ops::Range<u64>> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| anyhow!("`{s}`: give a range as START-END"))?;
    let parse = |x: &str| crate::parse_size(x).map_err(|e| anyhow!("`{s}`: {e}"));
    let (a, b) = (parse(a)?, parse(b)?);
    if b < a {
        bail!("`{s}`: END is before START");
    }
    Ok(a..b)
}

pub fn run_peer(c: PeerCommand) -> anyhow::Result<()> {
    crate::init_logging(None)?;
    let rt = tokio::runtime::Runtime::new()?;
    match c {
        PeerCommand::Get(a) => rt.block_on(async {
            let (client, repo) = peer_client(&a.url, a.insecure_no_tls)?;
            let mut out: Box<dyn Write> = if a.output == Path::new("-") {
                Box::new(std::io::stdout().lock())
            } else {
                Box::new(std::io::BufWriter::with_capacity(
                    1 << 20,
                    std::fs::File::create(&a.output)
                        .with_context(|| format!("creating {}", a.output.display()))?,
                ))
            };
            let start = Instant::now();
            type Frames = std::pin::Pin<
                Box<dyn futures_util::Stream<Item = Result<bytes::Bytes, peer::PeerError>> + Send>,
            >;
            let (want, mut frames): (u64, Frames) = match &a.range {
                Some(r) => {
                    let r = parse_range(r)?;
                    let want = r.end - r.start;
                    let s = client.read_range_stream(&repo, &a.key, r, None).await?;
                    (want, Box::pin(s))
                }
                None => {
                    let (size, s) = client.get_stream(&repo, &a.key).await?;
                    (size, Box::pin(s))
                }
            };
            let mut first: Option<Duration> = None;
            let mut total = 0u64;
            while let Some(f) = frames.next().await {
                let f = f?;
                first.get_or_insert_with(|| start.elapsed());
                total += f.len() as u64;
                out.write_all(&f)?;
            }
            if total != want {
                bail!("the peer sent {total} of {want} bytes");
            }
            let elapsed = start.elapsed();
            out.flush()?;
            if a.stats {
                let secs = elapsed.as_secs_f64().max(1e-9);
                eprintln!(
                    "bytes={total} seconds={secs:.6} ttfb_ms={:.3} MiB_per_s={:.1}",
                    first.unwrap_or(elapsed).as_secs_f64() * 1e3,
                    total as f64 / secs / (1 << 20) as f64
                );
            }
            anyhow::Ok(())
        }),
        PeerCommand::Ls(a) => rt.block_on(async {
            let (client, repo) = peer_client(&a.url, false)?;
            for (k, size) in client.list(&repo, &a.prefix).await? {
                println!("{size}\t{k}");
            }
            anyhow::Ok(())
        }),
    }
}

/// One peer of a peers file: `host:port` or `host:port/REPO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLine {
    pub host: String,
    pub port: u16,
    pub repo: Option<String>,
}

/// Parse a peers file: one `host:port[/REPO]` a line; blank lines and `#` comments skipped.
pub fn parse_peers_file(path: &Path) -> anyhow::Result<Vec<PeerLine>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the peers file {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let line = line.strip_prefix("horcrux://").unwrap_or(line);
        let (hp, repo) = match line.split_once('/') {
            Some((hp, r)) if !r.is_empty() => (hp, Some(r.to_string())),
            Some((hp, _)) => (hp, None),
            None => (line, None),
        };
        let (host, port) = peer::parse_host_port(hp).ok_or_else(|| {
            anyhow!(
                "{}:{}: `{line}` is not host:port (e.g. 10.0.0.5:7443)",
                path.display(),
                n + 1
            )
        })?;
        out.push(PeerLine { host, port, repo });
    }
    Ok(out)
}

/// Whether a peer is this node (`--self host:port`), compared as written or resolved.
pub fn is_self(p: &PeerLine, me: &str) -> bool {
    match peer::parse_host_port(me) {
        Some((h, port)) => h == p.host && port == p.port,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_files() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("peers");
        std::fs::write(
            &f,
            "# fleet\n10.0.0.5:7443\n  node-b.example:7443/amcc  # b\n\n[::1]:7443\n",
        )
        .unwrap();
        let p = parse_peers_file(&f).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].host, "10.0.0.5");
        assert_eq!(p[1].repo.as_deref(), Some("amcc"));
        assert_eq!(p[2].host, "::1");
        assert!(is_self(&p[0], "10.0.0.5:7443"));
        assert!(!is_self(&p[0], "10.0.0.6:7443"));
        std::fs::write(&f, "nonsense\n").unwrap();
        assert!(parse_peers_file(&f).is_err());
    }

    #[test]
    fn repo_args() {
        let (n, _) = parse_repo_arg("file:///opt/horcrux-amcc").unwrap();
        assert_eq!(n, "horcrux-amcc");
        let (n, u) = parse_repo_arg("amcc=s3://bucket/x?region=r&endpoint=http://h:1").unwrap();
        assert_eq!(n, "amcc");
        assert!(matches!(u, AccessUrl::S3 { .. }));
        let (n, _) = parse_repo_arg("s3://bucket/prefix/amcc?region=x").unwrap();
        assert_eq!(n, "amcc");
    }
}

//! `horcrux push` and `horcrux clone`: a volume's history to another repository (issue 5,
//! remotes). Both are `transfer::copy` with a choice of refs: push sends one branch of a
//! mounted volume's repository (its "origin", where `commit` writes) to a remote; clone makes a
//! new copy of whole volumes, all history or the newest `--depth` commits.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::Args;
use horcrux::repo::Repository;
use horcrux::transfer::{CopyOptions, CopyProgress, CopyReport, copy};
use horcrux::util::human_size;
use horcrux_proto::control::{MountInfo, Request, Response};

use crate::mounts::{self, Target};

const PUSH_HELP: &str = "\
Copies a branch of the volume — its commits, manifests and the chunks they use — from the
repository the volume is mounted from (its origin, where `horcrux commit` writes) to REMOTE,
then moves REMOTE's branch by compare-and-swap. Only what REMOTE lacks is sent; a push that was
interrupted resumes without sending again what arrived. REMOTE is any repository URL
(file:///path, scp://user@host:/path, ssh://user@host:port/path, s3://bucket/prefix?...); an
empty location becomes a new repository.

A push is refused when REMOTE's branch is not an ancestor of the pushed commit (someone else
pushed other commits): fetch and merge is not supported yet; --force overwrites the branch
(the commits it pointed at stay in REMOTE, unreferenced). Uncommitted changes of the mount are
not pushed: `horcrux commit` first.

Without a mount: --access URL [--name VOL] pushes from that repository.";

#[derive(Debug, Args)]
#[command(after_long_help = PUSH_HELP)]
pub struct PushArgs {
    /// A registered remote's name or a repository URL (file:///path, scp://, ssh://, s3://);
    /// created if empty [default: the only registered remote]
    pub remote: Option<String>,
    /// The mountpoint of the volume, or any path inside it [default: the current directory]
    pub path: Option<PathBuf>,
    /// Same as PATH
    #[arg(short = 'C', value_name = "PATH", conflicts_with = "path")]
    pub dir: Option<PathBuf>,
    /// Branch to push [default: the mounted branch; `main` with --access]
    #[arg(long)]
    pub branch: Option<String>,
    /// Also push every tag of the volume
    #[arg(long)]
    pub tags: bool,
    /// Overwrite REMOTE's branch (or tags) even if it is not an ancestor of what is pushed
    #[arg(long)]
    pub force: bool,
    /// Push from this repository (access URL, mirrors comma-separated) instead of a mount
    #[arg(long, value_name = "URL", conflicts_with_all = ["path", "dir"])]
    pub access: Option<String>,
    /// With --access: the volume (needed when the repository holds several)
    #[arg(long = "name", value_name = "VOL", requires = "access")]
    pub name: Option<String>,
    /// Parallel transfers
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
    /// Print what was sent as JSON
    #[arg(long)]
    pub json: bool,
}

const CLONE_HELP: &str = "\
Makes a new copy of a repository's volumes (all, or --name) in DST — a directory or any
repository URL — with their branches, tags, commits, manifests and chunks: a backup, or a
restore from one. DST may hold other volumes; a volume it already holds with other versions is
refused (use `horcrux push` to update a copy). An interrupted clone resumes: run it again.

--depth N copies only the newest N commits of each branch and tag: the oldest ones copied then
name parents that DST does not hold (a shallow copy). Mounting any copied version works, `log`
ends where the copy does, and pushing to or from a shallow copy works for the versions it has.";

#[derive(Debug, Args)]
#[command(after_long_help = CLONE_HELP)]
pub struct CloneArgs {
    /// Source repository (file:///path, scp://, ssh://, s3://)
    pub source: String,
    /// Destination repository; created if empty
    pub destination: String,
    /// Clone only this volume (repeatable; default: all)
    #[arg(long = "name", value_name = "VOL")]
    pub names: Vec<String>,
    /// Only the newest N commits of each branch and tag
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub depth: Option<u32>,
    /// Parallel transfers
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
    /// Print what was sent as JSON
    #[arg(long)]
    pub json: bool,
}

pub(super) struct Bar(pub(super) indicatif::ProgressBar);

impl CopyProgress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

pub(super) fn short(hex: &str) -> &str {
    &hex[..12.min(hex.len())]
}

/// "2 of 5 chunks (1.0 MiB), 1 manifest, 1 commit: 1.1 MiB in 0.3s".
pub(super) fn sent(r: &CopyReport, t: Instant) -> String {
    format!(
        "{} of {} chunks ({}), {} manifest{}, {} commit{}{}: {} in {:.1}s",
        r.chunks_copied,
        r.chunks,
        human_size(r.bytes_copied),
        r.manifests_copied,
        if r.manifests_copied == 1 { "" } else { "s" },
        r.commits_copied,
        if r.commits_copied == 1 { "" } else { "s" },
        if r.outboards_copied > 0 {
            format!(
                ", {} piece outboard{}",
                r.outboards_copied,
                if r.outboards_copied == 1 { "" } else { "s" }
            )
        } else {
            String::new()
        },
        human_size(r.bytes_sent()),
        t.elapsed().as_secs_f64()
    )
}

pub(super) fn json_report(r: &CopyReport, extra: serde_json::Value, t: Instant) -> String {
    let mut v = serde_json::to_value(r).expect("report serializes");
    if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
        o.insert("bytes_sent".into(), r.bytes_sent().into());
        o.insert("seconds".into(), t.elapsed().as_secs_f64().into());
    }
    v.to_string()
}

/// The branch to `verb`: the one asked for, else the mounted one.
pub(super) fn branch_of(
    asked: Option<&String>,
    loc: &mounts::Located,
    info: &horcrux_proto::control::MountInfo,
    verb: &str,
) -> anyhow::Result<String> {
    match (asked, &info.branch) {
        (Some(b), _) | (None, Some(b)) => Ok(b.clone()),
        (None, None) => bail!(
            "{} shows `{}` (a tag or commit, not a branch): say which branch to {verb} with \
             --branch",
            loc.mountpoint.display(),
            info.reference
        ),
    }
}

pub fn run_push(a: PushArgs) -> anyhow::Result<()> {
    crate::init_logging(None)?;
    let (remote_arg, path) = super::fetch::split_remote_path(a.remote.clone(), a.path.clone());
    // Where from: a mount (ask its daemon) or a repository named on the command line.
    let (access, volume, branch, mounted) = match &a.access {
        Some(access) => (access.clone(), a.name.clone(), a.branch.clone(), None),
        None => {
            let path = a.dir.as_deref().or(path.as_deref());
            let loc = mounts::locate(&Target::from_arg(path))?;
            let info = mounts::describe(&loc, Duration::from_secs(30))?;
            warn_uncommitted(&loc, &info);
            let branch = branch_of(a.branch.as_ref(), &loc, &info, "push")?;
            (
                info.access.clone(),
                Some(info.volume.clone()),
                Some(branch),
                Some(info),
            )
        }
    };
    let branch = branch.unwrap_or_else(|| "main".into());
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let origin = crate::open_access(&access)?;
        let src = Repository::open(origin)
            .await
            .with_context(|| format!("opening the volume's repository {access}"))?;
        let volume = src.pick_volume(volume.as_deref()).await?;
        let head = src
            .branch(&volume, &branch)
            .await?
            .ok_or_else(|| anyhow!("volume `{volume}` has no branch `{branch}` in {access}"))?;
        if let Some(info) = mounted
            .as_ref()
            .filter(|i| i.commit != head.to_hex() && i.branch.as_deref() == Some(branch.as_str()))
        {
            eprintln!(
                "note: {branch} is at {} in {access}; the mount shows {}",
                head.short(),
                short(&info.commit)
            );
        }
        let mut refs = vec![format!("heads/{branch}")];
        if a.tags {
            let prefix = format!("volumes/{volume}/refs/");
            for k in src.store().list(&format!("{prefix}tags/")).await? {
                refs.push(k[prefix.len()..].to_string());
            }
        }
        let first = crate::open_store(&horcrux::store::parse_access(&access)?[0])?;
        let named = super::fetch::pick_remote(first.as_ref(), remote_arg.as_deref(), false).await?;
        let remote_url = horcrux::store::parse_one(&named.url)?;
        let remote = crate::open_store(&remote_url)?;
        let opts = CopyOptions {
            volumes: vec![volume.clone()],
            refs: Some(refs),
            force: a.force,
            concurrency: a.jobs,
            ..Default::default()
        };
        let bar = crate::progress::bar("pushing");
        let t = Instant::now();
        let r = match copy(&src, remote, &opts, &Bar(bar.clone())).await {
            Ok(r) => r,
            // An interrupted push moved no ref, and a second one skips what arrived.
            Err(e @ horcrux::transfer::CopyError::Store(_)) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "pushing {volume}/{branch} to {remote_url} (the branch there has not \
                     moved; run the same push again once the remote answers: it sends only \
                     what did not arrive)"
                )));
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("pushing {volume}/{branch} to {remote_url}")));
            }
        };
        bar.finish_and_clear();
        // A registered remote's tracking ref now knows where its branch is.
        let registered = horcrux::remotes::list(first.as_ref()).await?;
        if registered.iter().any(|r| r.name == named.name) {
            let key = horcrux::format::remote_ref_key(&volume, &named.name, &branch);
            let old = match first.get(&key).await {
                Ok(b) => Some(b.to_vec()),
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(e.into()),
            };
            if let Err(e) = first
                .compare_and_swap(&key, old.as_deref(), format!("{head}\n").into())
                .await
            {
                tracing::warn!(error = %e, %key, "could not update the remote-tracking ref");
            }
        }
        if a.json {
            println!(
                "{}",
                json_report(
                    &r,
                    serde_json::json!({
                        "volume": volume, "branch": branch, "commit": head.to_hex(),
                        "remote": remote_url.to_string(),
                    }),
                    t
                )
            );
            return Ok(());
        }
        let main_key = format!("volumes/{volume}/refs/heads/{branch}");
        match r.moves.iter().find(|m| m.key == main_key) {
            Some(m) => println!(
                "pushed {volume}/{branch} to {remote_url}: {} → {}{}; sent {}",
                m.old.as_deref().map_or("(new branch)", short),
                short(&m.new),
                if m.forced { " (forced)" } else { "" },
                sent(&r, t)
            ),
            None => println!(
                "{remote_url} is up to date: {volume}/{branch} at {}; sent {}",
                head.short(),
                sent(&r, t)
            ),
        }
        for m in r.moves.iter().filter(|m| m.key != main_key) {
            println!(
                "  {} → {}",
                m.key.rsplit_once("/refs/").map_or(m.key.as_str(), |x| x.1),
                short(&m.new)
            );
        }
        Ok(())
    })
}

/// Uncommitted changes are not pushed: say so.
fn warn_uncommitted(loc: &mounts::Located, info: &MountInfo) {
    if info.read_only {
        return;
    }
    if let Ok(Response::Status(s)) = mounts::request(loc, &Request::Status, Duration::from_secs(30))
        && !s.changes.is_empty()
    {
        eprintln!(
            "warning: {} has {} uncommitted change{} ({}): they are not pushed; `horcrux \
             commit` first to include them",
            loc.mountpoint.display(),
            s.changes.len(),
            if s.changes.len() == 1 { "" } else { "s" },
            human_size(s.bytes_changed)
        );
    }
}

pub fn run_clone(a: CloneArgs) -> anyhow::Result<()> {
    crate::init_logging(None)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let src_url = horcrux::store::parse_one(&a.source)?;
        let dst_url = horcrux::store::parse_one(&a.destination)?;
        // With its remotes: versions pulled lazily there have their data on them.
        let src = Repository::open(crate::open_access(&a.source)?)
            .await
            .with_context(|| format!("opening the source {src_url}"))?;
        let dst = crate::open_store(&dst_url)?;
        let opts = CopyOptions {
            volumes: a.names.clone(),
            refs: None,
            force: false,
            concurrency: a.jobs,
            depth: a.depth,
            new_only: true,
            ..Default::default()
        };
        let bar = crate::progress::bar("cloning");
        let t = Instant::now();
        let r = copy(&src, dst, &opts, &Bar(bar.clone()))
            .await
            .with_context(|| format!("cloning {src_url} to {dst_url}"))?;
        bar.finish_and_clear();
        if a.json {
            println!(
                "{}",
                json_report(
                    &r,
                    serde_json::json!({
                        "source": src_url.to_string(), "destination": dst_url.to_string(),
                        "depth": a.depth,
                    }),
                    t
                )
            );
            return Ok(());
        }
        let refs = r.refs_updated.len() + r.refs_unchanged.len();
        println!(
            "cloned {src_url} to {dst_url}: {} ref{} ({} already there), {} commit{} copied{}; \
             sent {}",
            refs,
            if refs == 1 { "" } else { "s" },
            r.refs_unchanged.len(),
            r.commits_copied,
            if r.commits_copied == 1 { "" } else { "s" },
            match a.depth {
                Some(d) if !r.shallow.is_empty() => format!(
                    " (depth {d}: the parents of {} commit{} are not copied)",
                    r.shallow.len(),
                    if r.shallow.len() == 1 { "" } else { "s" }
                ),
                _ => String::new(),
            },
            sent(&r, t)
        );
        Ok(())
    })
}

//! `horcrux remote` (named remotes of a repository) and `horcrux fetch` (a remote's branches as
//! remote-tracking refs, commits and manifests only: the data stays lazy). See
//! `horcrux::remotes` for the model.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use horcrux::remotes::{self, Remote};
use horcrux::repo::Repository;
use horcrux::store::Store;
use horcrux::transfer::{CopyOptions, copy};

use super::remotes::{Bar, json_report, sent, short};
use horcrux_proto::control::MountInfo;

use crate::mounts::{self, Target};

/// Where a command acts: a mount (through its daemon) or a repository named with --access.
#[derive(Debug, Clone, Args)]
pub struct RepoTarget {
    /// The mountpoint of the volume, or any path inside it, or a Docker volume name
    /// [default: the current directory]
    #[arg(short = 'C', value_name = "PATH", global = true)]
    pub dir: Option<PathBuf>,
    /// Act on this repository (access URL, mirrors comma-separated) instead of a mount's
    #[arg(long, value_name = "URL", global = true, conflicts_with = "dir")]
    pub access: Option<String>,
}

impl RepoTarget {
    /// The repository's access URL list and, from a mount, the volume and its branch.
    fn resolve(
        &self,
        path: Option<&Path>,
    ) -> anyhow::Result<(String, Option<(mounts::Located, MountInfo)>)> {
        if let Some(a) = &self.access {
            return Ok((a.clone(), None));
        }
        let loc = mounts::locate(&Target::from_arg(self.dir.as_deref().or(path)))?;
        let info = mounts::describe(&loc, Duration::from_secs(30))?;
        Ok((info.access.clone(), Some((loc, info))))
    }
}

const REMOTE_HELP: &str = "\
A remote is a name for another repository's access URL (file://, scp://, ssh://, s3://),
recorded in the repository itself, so every mount of it knows it. `horcrux fetch NAME` and
`horcrux pull NAME` bring that repository's commits and manifests but leave its data where it
is: mounting a fetched version reads the chunks this repository lacks from the remote, on
demand. Removing a remote deletes its remote-tracking refs; versions pulled lazily from it
then cannot read the data they did not copy (pull with --data to copy it).

Examples:
  horcrux remote add backup s3://backups/amcc /var/lib/mysql
  horcrux remote /var/lib/mysql
  horcrux remote remove backup --access file:///opt/horcrux-amcc";

#[derive(Debug, Args)]
#[command(after_long_help = REMOTE_HELP, args_conflicts_with_subcommands = true)]
pub struct RemoteArgs {
    #[command(subcommand)]
    pub command: Option<RemoteCommand>,
    /// (list) the mountpoint, a path inside it, or a Docker volume name
    pub path: Option<PathBuf>,
    #[command(flatten)]
    pub target: RepoTarget,
    /// Print as JSON
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum RemoteCommand {
    /// Register URL under NAME
    Add {
        name: String,
        url: String,
        /// The mountpoint, a path inside it, or a Docker volume name
        path: Option<PathBuf>,
    },
    /// Unregister NAME and delete its remote-tracking refs
    #[command(alias = "rm")]
    Remove {
        name: String,
        /// The mountpoint, a path inside it, or a Docker volume name
        path: Option<PathBuf>,
    },
    /// List the remotes (the default)
    #[command(alias = "ls")]
    List {
        /// The mountpoint, a path inside it, or a Docker volume name
        path: Option<PathBuf>,
    },
}

pub fn run_remote(a: RemoteArgs) -> anyhow::Result<()> {
    crate::init_logging(None)?;
    let path = match &a.command {
        Some(RemoteCommand::Add { path, .. })
        | Some(RemoteCommand::Remove { path, .. })
        | Some(RemoteCommand::List { path }) => path.clone(),
        None => a.path.clone(),
    };
    let (access, _) = a.target.resolve(path.as_deref())?;
    let store = origin_store(&access)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        match &a.command {
            Some(RemoteCommand::Add { name, url, .. }) => {
                let r = remotes::add(store.as_ref(), name, url).await?;
                println!("remote `{}` = {}", r.name, r.url);
            }
            Some(RemoteCommand::Remove { name, .. }) => {
                let r = remotes::remove(store.as_ref(), name).await?;
                println!(
                    "removed remote `{}` ({}) and its remote-tracking refs",
                    r.name, r.url
                );
            }
            Some(RemoteCommand::List { .. }) | None => {
                let all = remotes::list(store.as_ref()).await?;
                if a.json {
                    println!("{}", serde_json::to_string(&all)?);
                } else if all.is_empty() {
                    eprintln!("no remotes (add one with `horcrux remote add NAME URL`)");
                } else {
                    for r in all {
                        println!("{}\t{}", r.name, r.url);
                    }
                }
            }
        }
        Ok(())
    })
}

/// The repository's first store, where registrations are written (remotes are never read
/// through mirrors of mirrors).
fn origin_store(access: &str) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    let urls = horcrux::store::parse_access(access)?;
    Ok(crate::open_store(&urls[0])?)
}

/// `[REMOTE] [PATH]` of push, pull and fetch: with one argument, it is the PATH when it names
/// a horcrux mount (or a path in one, or a plugin volume) and is not a URL, else the REMOTE.
pub fn split_remote_path(
    remote: Option<String>,
    path: Option<PathBuf>,
) -> (Option<String>, Option<PathBuf>) {
    match (remote, path) {
        (Some(r), None)
            if !r.contains("://")
                && mounts::locate(&Target::from_arg(Some(Path::new(&r)))).is_ok() =>
        {
            (None, Some(PathBuf::from(r)))
        }
        other => other,
    }
}

/// The remote `arg` names in the repository behind `store`: a registered name, or a URL
/// (registered under a new name when `register`, to be found again and to serve the data a
/// lazy fetch leaves there); without `arg`, the only registered remote.
pub async fn pick_remote(
    store: &dyn Store,
    arg: Option<&str>,
    register: bool,
) -> anyhow::Result<Remote> {
    let all = remotes::list(store).await?;
    let Some(arg) = arg else {
        return match all.as_slice() {
            [one] => Ok(one.clone()),
            [] => bail!(
                "{} has no remote: name a repository URL, or register one with \
                 `horcrux remote add NAME URL`",
                store.describe()
            ),
            many => bail!(
                "{} has several remotes ({}): say which one",
                store.describe(),
                many.iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
    };
    if let Some(r) = all.iter().find(|r| r.name == arg) {
        return Ok(r.clone());
    }
    let registered = || {
        if all.is_empty() {
            "there are none".to_string()
        } else {
            all.iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    if !arg.contains('/') {
        bail!(
            "`{arg}` is not a registered remote ({}); a repository URL has a `/` \
             (file:///path, ./dir, scp://, ssh://, s3://)",
            registered()
        );
    }
    let url = horcrux::store::parse_one(arg).with_context(|| {
        format!(
            "`{arg}` is neither a registered remote ({}) nor an access URL",
            registered()
        )
    })?;
    if let Some(r) = remotes::find_by_url(&all, &url) {
        return Ok(r.clone());
    }
    let name = remotes::default_name(&all, &url);
    if !register {
        return Ok(Remote {
            name,
            url: arg.to_string(),
        });
    }
    // Only a repository is worth a name.
    Repository::open(crate::open_store(&url)?)
        .await
        .with_context(|| format!("opening {arg}"))?;
    let r = remotes::add(store, &name, arg).await?;
    eprintln!(
        "registered remote `{}` for {} (`horcrux remote` lists remotes)",
        r.name, r.url
    );
    Ok(r)
}

const FETCH_HELP: &str = "\
Brings REMOTE's branches of the volume as remote-tracking refs (`REMOTE/BRANCH`), with the
commits and manifests they need — not the data: a version fetched this way is mounted, diffed
and logged at once (`horcrux mount ... --ref backup/main`, `horcrux diff HEAD backup/main`,
`horcrux log backup/main`), and its chunks are read from REMOTE when something reads them.
REMOTE is a registered remote's name or a repository URL (registered under a new name the
first time); without it, the only registered remote. The mount itself does not change:
`horcrux pull` also moves the branch and switches the mount.

A remote-tracking ref follows REMOTE wherever its branch went (also after a forced push
there). Only what this repository lacks is sent; an interrupted fetch resumes.

Examples:
  horcrux fetch s3://backups/amcc /var/lib/mysql
  horcrux fetch backup --access file:///opt/horcrux-amcc --name amcc";

#[derive(Debug, Args)]
#[command(after_long_help = FETCH_HELP)]
pub struct FetchArgs {
    /// A registered remote's name or a repository URL [default: the only registered remote]
    pub remote: Option<String>,
    /// The mountpoint of the volume, or any path inside it, or a Docker volume name
    /// [default: the current directory]
    pub path: Option<PathBuf>,
    #[command(flatten)]
    pub target: RepoTarget,
    /// With --access: the volume (needed when the repository holds several)
    #[arg(long = "name", value_name = "VOL", requires = "access")]
    pub name: Option<String>,
    /// Fetch only this branch [default: all branches]
    #[arg(long)]
    pub branch: Option<String>,
    /// Parallel transfers
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
    /// Print what was fetched as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn run_fetch(a: FetchArgs) -> anyhow::Result<()> {
    crate::init_logging(None)?;
    let (remote_arg, path) = split_remote_path(a.remote.clone(), a.path.clone());
    let (access, mounted) = a.target.resolve(path.as_deref())?;
    let volume = mounted
        .as_ref()
        .map(|(_, i)| i.volume.clone())
        .or(a.name.clone());
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let origin = crate::open_access(&access)?;
        let origin_repo = Repository::open(origin.clone())
            .await
            .with_context(|| format!("opening the volume's repository {access}"))?;
        let volume = origin_repo.pick_volume(volume.as_deref()).await?;
        let remote =
            pick_remote(origin_store(&access)?.as_ref(), remote_arg.as_deref(), true).await?;
        let t = Instant::now();
        let r = fetch(&origin, &volume, &remote, a.branch.as_deref(), a.jobs)
            .await
            .with_context(|| format!("fetching {volume} from {} ({})", remote.name, remote.url))?;
        if a.json {
            println!(
                "{}",
                json_report(
                    &r,
                    serde_json::json!({"volume": volume, "remote": remote.name, "url": remote.url}),
                    t
                )
            );
            return Ok(());
        }
        if r.moves.is_empty() {
            println!(
                "{volume}: up to date with {} ({}); sent {}",
                remote.name,
                remote.url,
                sent(&r, t)
            );
        } else {
            println!(
                "fetched {volume} from {} ({}); the data stays there until read; sent {}",
                remote.name,
                remote.url,
                sent(&r, t)
            );
        }
        for m in &r.moves {
            let name = m
                .key
                .rsplit_once("/refs/remotes/")
                .map_or(m.key.as_str(), |x| x.1);
            println!(
                "  {name}: {} → {}{}",
                m.old.as_deref().map_or("(new)", short),
                short(&m.new),
                if m.forced { " (forced there)" } else { "" }
            );
        }
        Ok(())
    })
}

/// Fetch `volume` (branch `branch`, or all) from `remote` into the repository in `origin`.
pub async fn fetch(
    origin: &std::sync::Arc<dyn Store>,
    volume: &str,
    remote: &Remote,
    branch: Option<&str>,
    jobs: usize,
) -> anyhow::Result<horcrux::transfer::CopyReport> {
    let url = horcrux::store::parse_one(&remote.url)?;
    let src = Repository::open(crate::open_store(&url)?)
        .await
        .with_context(|| format!("opening {}", remote.url))?;
    src.pick_volume(Some(volume)).await?;
    if let Some(b) = branch
        && src.branch(volume, b).await?.is_none()
    {
        let known: Vec<String> = src
            .branches(volume)
            .await?
            .into_iter()
            .map(|b| b.0)
            .collect();
        return Err(anyhow!(
            "{} has no branch `{b}` of volume `{volume}` (branches there: {})",
            remote.url,
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        ));
    }
    let opts = CopyOptions {
        volumes: vec![volume.to_string()],
        refs: branch.map(|b| vec![format!("heads/{b}")]),
        concurrency: jobs,
        lazy: true,
        tracking: Some(remote.name.clone()),
        ..Default::default()
    };
    let bar = crate::progress::bar("fetching");
    let r = copy(&src, origin.clone(), &opts, &Bar(bar.clone())).await;
    bar.finish_and_clear();
    Ok(r?)
}

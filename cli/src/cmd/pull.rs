//! `horcrux pull`: bring a branch's new commits from another repository into a mounted volume's
//! origin (fast-forward only), then switch the live mount to the new head (issue 5, remotes).
//!
//! It is `fetch` of one branch (the remote-tracking ref `REMOTE/BRANCH`, commits and manifests;
//! the data stays on REMOTE, read when needed through `horcrux::remotes`), a compare-and-swap
//! of the origin's branch onto it when that is a fast-forward, then
//! `Request::Checkout { rev: <branch>, discard: false }` on the mount's daemon. `--data` copies
//! the chunks too, so the origin no longer needs REMOTE for that version.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::Args;
use horcrux::repo::Repository;
use horcrux::store::StoreError;
use horcrux::transfer::{CopyOptions, copy, is_ancestor};
use horcrux_proto::control::{MountInfo, Request, Response};

use super::fetch::{fetch, pick_remote};
use super::remotes::{Bar, json_report, sent, short};
use crate::mounts::{self, Target};

const PULL_HELP: &str = "\
Brings the new commits of a branch (default: the mounted one) from REMOTE into the repository
the volume is mounted from (its origin, where `horcrux commit` writes) — commits and
manifests, not the data: chunks stay on REMOTE and are read from there when something reads
them (--data copies them too, so the origin no longer needs REMOTE) — moves the origin's
branch by compare-and-swap, then switches the live mount to the new version (like
`horcrux checkout BRANCH`). REMOTE is a registered remote's name or a repository URL
(registered under a new name the first time: `horcrux remote` lists them); without it, the
only registered remote. `REMOTE/BRANCH` then names REMOTE's branch as last pulled.

Only a fast-forward is done: when the origin's branch has commits REMOTE's lacks (both sides
committed), the pull is refused and the branch does not move (merge is not supported; the
remote-tracking ref shows REMOTE's version). Only what the
origin lacks is sent; an interrupted pull resumes without copying again what arrived.

A mount with uncommitted changes on the pulled branch is refused before anything moves
(the branch would move under the changes, which could then be committed nowhere): commit or
discard them first. While files are open the mount is not switched: the origin is updated all
the same, the mount stays where it was and says so, and `horcrux checkout BRANCH` switches it
later. A read-only mount shows the version it was mounted at: mount it again.

Without a mount: --access URL [--name VOL] updates only that repository.

Examples:
  horcrux pull s3://backups/amcc /var/lib/mysql
  horcrux pull scp://dev@dbhost:/opt/horcrux-amcc --access file:///opt/amcc-copy --name AMCC";

#[derive(Debug, Args)]
#[command(after_long_help = PULL_HELP)]
pub struct PullArgs {
    /// A registered remote's name or a repository URL (file:///path, scp://, ssh://, s3://)
    /// [default: the only registered remote]
    pub remote: Option<String>,
    /// The mountpoint of the volume, or any path inside it [default: the current directory]
    pub path: Option<PathBuf>,
    /// Same as PATH
    #[arg(short = 'C', value_name = "PATH", conflicts_with = "path")]
    pub dir: Option<PathBuf>,
    /// Branch to pull [default: the mounted branch; `main` with --access]
    #[arg(long)]
    pub branch: Option<String>,
    /// Update this repository (access URL, mirrors comma-separated) instead of a mount's origin
    #[arg(long, value_name = "URL", conflicts_with_all = ["path", "dir"])]
    pub access: Option<String>,
    /// With --access: the volume (needed when the repository holds several)
    #[arg(long = "name", value_name = "VOL", requires = "access")]
    pub name: Option<String>,
    /// Copy the chunks too, so the origin no longer needs REMOTE for the pulled versions
    #[arg(long)]
    pub data: bool,
    /// Parallel transfers
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
    /// Print what was copied, and where the mount is, as JSON
    #[arg(long)]
    pub json: bool,
}

/// What happened to the mount after the origin was updated.
enum MountOutcome {
    /// No mount (--access), or it shows another branch / a tag / a commit.
    NotMounted,
    Other(String),
    /// Already at the head.
    AtHead,
    Switched,
    /// Refused (or failed): the daemon's reason.
    Stayed(String),
}

pub fn run_pull(a: PullArgs) -> anyhow::Result<()> {
    crate::init_logging(None)?;
    let (remote_arg, path) = super::fetch::split_remote_path(a.remote.clone(), a.path.clone());
    let (access, volume, branch, mounted) = match &a.access {
        Some(access) => (access.clone(), a.name.clone(), a.branch.clone(), None),
        None => {
            let path = a.dir.as_deref().or(path.as_deref());
            let loc = mounts::locate(&Target::from_arg(path))?;
            let info = mounts::describe(&loc, Duration::from_secs(30))?;
            let branch = super::remotes::branch_of(a.branch.as_ref(), &loc, &info, "pull")?;
            (
                info.access.clone(),
                Some(info.volume.clone()),
                Some(branch),
                Some((loc, info)),
            )
        }
    };
    let branch = branch.unwrap_or_else(|| "main".into());
    // A pull moves the branch under the mount's changes, which could then be committed nowhere:
    // refuse before anything moves.
    if let Some((loc, info)) = &mounted
        && info.branch.as_deref() == Some(branch.as_str())
        && let Response::Status(st) =
            mounts::request(loc, &Request::Status, Duration::from_secs(60))?
        && !st.changes.is_empty()
    {
        bail!(
            "{} has {} uncommitted change(s) on `{branch}`: commit them (`horcrux commit -m ...`) \
             or throw them away (`horcrux discard --force`) before pulling; nothing was changed",
            loc.mountpoint.display(),
            st.changes.len()
        );
    }
    let rt = tokio::runtime::Runtime::new()?;
    let t = Instant::now();
    let (report, old, theirs, new, remote) = rt.block_on(async {
        let origin_store = crate::open_access(&access)?;
        let origin = Repository::open(origin_store.clone())
            .await
            .with_context(|| format!("opening the volume's repository {access}"))?;
        let volume = origin.pick_volume(volume.as_deref()).await?;
        let first = crate::open_store(&horcrux::store::parse_access(&access)?[0])?;
        let remote = pick_remote(first.as_ref(), remote_arg.as_deref(), true).await?;
        let remote_url = remote.url.clone();
        // 1. REMOTE's branch as the remote-tracking ref `REMOTE/BRANCH`: commits and
        //    manifests, the data left there — or copied too with --data (before anything
        //    else: a copy stops at the commits the destination has).
        let r = if a.data {
            let src = Repository::open(crate::open_store(&horcrux::store::parse_one(&remote_url)?)?)
                .await
                .with_context(|| format!("opening {remote_url}"))?;
            let opts = CopyOptions {
                volumes: vec![volume.clone()],
                refs: Some(vec![format!("heads/{branch}")]),
                concurrency: a.jobs,
                tracking: Some(remote.name.clone()),
                // Versions fetched lazily before are here without their data.
                hydrate: true,
                ..Default::default()
            };
            let bar = crate::progress::bar("pulling");
            let d = copy(&src, first.clone(), &opts, &Bar(bar.clone())).await;
            bar.finish_and_clear();
            d.with_context(|| format!("pulling {volume}/{branch} from {remote_url}"))?
        } else {
            fetch(&origin_store, &volume, &remote, Some(&branch), a.jobs).await?
        };
        let theirs = origin
            .resolve(&volume, &format!("remotes/{}/{branch}", remote.name))
            .await?;
        // 2. Fast-forward the branch onto it, by compare-and-swap.
        let ours = origin.branch(&volume, &branch).await?;
        match ours {
            Some(o) if o == theirs => return Ok((r, ours, theirs, o, remote)),
            // REMOTE is behind: nothing to bring.
            Some(o) if is_ancestor(&origin, theirs, o).await? => {
                return Ok((r, ours, theirs, o, remote));
            }
            Some(o) if !is_ancestor(&origin, o, theirs).await? => {
                return Err(anyhow!(
                    "cannot pull {volume}/{branch} from {remote_url}: the branches have diverged \
                     — {access}'s `{branch}` is at {}, which is not an ancestor of \
                     {}/{branch} at {} (both sides have commits the other lacks). pull only \
                     fast-forwards (merge is not supported); your branch was not changed. To \
                     look at REMOTE's version: `horcrux mount {access} MOUNTPOINT --ref {}/{branch}`; \
                     to replace REMOTE's branch with yours: `horcrux push {} --force`",
                    o.short(),
                    remote.name,
                    theirs.short(),
                    remote.name,
                    remote.name
                ));
            }
            _ => {}
        }
        origin
            .set_branch(&volume, &branch, ours, theirs)
            .await
            .map_err(|e| match e {
                horcrux::repo::RepoError::Store(StoreError::CasConflict { .. }) => anyhow!(
                    "{volume}/{branch} moved in {access} while pulling (a commit or another \
                     pull): nothing was changed; pull again"
                ),
                e => anyhow::Error::new(e),
            })?;
        Ok::<_, anyhow::Error>((r, ours, theirs, theirs, remote))
    })?;
    let remote_url = remote.name.clone();
    let report = (old != Some(new) || report.bytes_sent() > 0).then_some(report);
    let volume_name = mounted
        .as_ref()
        .map(|(_, i)| i.volume.clone())
        .or(volume)
        .unwrap_or_default();
    // REMOTE's head is an ancestor of the origin's: nothing was copied.
    let ahead = old == Some(new) && theirs != new;

    // Switch the mount when it shows the pulled branch.
    let outcome = match &mounted {
        None => MountOutcome::NotMounted,
        Some((_, info)) if info.branch.as_deref() != Some(branch.as_str()) => {
            MountOutcome::Other(format!(
                "{} shows `{}`, not branch `{branch}`: it was left as it is",
                info.mountpoint, info.reference
            ))
        }
        Some((_, info)) if info.commit == new.to_hex() => MountOutcome::AtHead,
        Some((_, info)) if info.read_only => MountOutcome::Stayed(format!(
            "it is read-only and shows {} as mounted: unmount and mount it again to see {}",
            short(&info.commit),
            new.short()
        )),
        Some((_, info)) if ahead => MountOutcome::Other(format!(
            "{} shows {}; `horcrux checkout {branch}` switches it to the origin's head",
            info.mountpoint,
            short(&info.commit)
        )),
        Some((loc, _)) => {
            let req = Request::Checkout {
                rev: branch.clone(),
                discard: false,
            };
            match mounts::request(loc, &req, Duration::from_secs(600)) {
                Ok(Response::CheckedOut { commit, .. }) if commit == new.to_hex() => {
                    MountOutcome::Switched
                }
                Ok(Response::CheckedOut { commit, .. }) => MountOutcome::Stayed(format!(
                    "it now shows {} (the branch moved again meanwhile)",
                    short(&commit)
                )),
                Ok(other) => MountOutcome::Stayed(format!("unexpected answer: {other:?}")),
                Err(e) => MountOutcome::Stayed(format!("{e:#}")),
            }
        }
    };

    if a.json {
        let mut extra = serde_json::json!({
            "volume": volume_name, "branch": branch, "remote": remote.name, "url": remote.url, "data": a.data,
            "old": old.map(|c| c.to_hex()), "commit": new.to_hex(), "origin_ahead": ahead,
        });
        if let Some((_, info)) = &mounted {
            let (state, detail) = match &outcome {
                MountOutcome::NotMounted => ("none", None),
                MountOutcome::Other(s) => ("other", Some(s.clone())),
                MountOutcome::AtHead => ("at_head", None),
                MountOutcome::Switched => ("switched", None),
                MountOutcome::Stayed(s) => ("stayed", Some(s.clone())),
            };
            extra["mount"] = serde_json::json!({
                "mountpoint": info.mountpoint, "was": info.commit, "state": state,
                "detail": detail,
            });
        }
        let r = report.clone().unwrap_or_default();
        println!("{}", json_report(&r, extra, t));
    } else {
        match (&report, old) {
            (None, Some(o)) if ahead => println!(
                "nothing to pull: {access}'s {volume_name}/{branch} at {} is ahead of \
                 {remote_url}'s {} (`horcrux push {remote_url}` sends the difference)",
                o.short(),
                theirs.short()
            ),
            (Some(r), Some(o)) if o != new => println!(
                "pulled {volume_name}/{branch} from {remote_url} into {access}: {} → {}; sent {}",
                o.short(),
                new.short(),
                sent(r, t)
            ),
            (Some(r), None) => println!(
                "pulled {volume_name}/{branch} from {remote_url} into {access}: new branch at \
                 {}; sent {}",
                new.short(),
                sent(r, t)
            ),
            (Some(r), _) => println!(
                "{access} is up to date with {remote_url}: {volume_name}/{branch} at {}; \
                 copied the data it lacked: {}",
                new.short(),
                sent(r, t)
            ),
            _ => println!(
                "{access} is up to date with {remote_url}: {volume_name}/{branch} at {}",
                new.short()
            ),
        }
        print_outcome(&outcome, mounted.as_ref().map(|(_, i)| i), &branch, new);
    }
    Ok(())
}

fn print_outcome(
    outcome: &MountOutcome,
    info: Option<&MountInfo>,
    branch: &str,
    new: horcrux::ids::CommitId,
) {
    let Some(info) = info else {
        return;
    };
    let mp = &info.mountpoint;
    match outcome {
        MountOutcome::NotMounted => {}
        MountOutcome::Other(s) => println!("{s}"),
        MountOutcome::AtHead => println!("{mp} already shows {}", new.short()),
        MountOutcome::Switched => println!(
            "{mp} now shows {} (was {})",
            new.short(),
            short(&info.commit)
        ),
        MountOutcome::Stayed(why) => {
            // The daemon's refusal comes as "the daemon of MP: reason".
            let why = why
                .strip_prefix(&format!("the daemon of {mp}: "))
                .unwrap_or(why);
            println!(
                "the origin was updated, but {mp} stays at {}: {why}\n\
                 switch it later with `horcrux checkout {branch} {mp}`{}",
                short(&info.commit),
                if why.contains("uncommitted") {
                    " (commits from it are refused until then: the branch moved; `--discard` \
                     throws the uncommitted changes away)"
                } else {
                    ""
                }
            )
        }
    }
}

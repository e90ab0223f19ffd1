//! `horcrux commit`: make a mounted volume's changes a new version (issue 5; more to come:
//! log, checkout, push, pull).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::Args;
use horcrux_proto::control::{Request, Response};

use crate::mounts::{self, Target};

const COMMIT_HELP: &str = "\
Freezes the mounted volume (writes wait, reads go on), turns what changed into new chunks —
unchanged data keeps its chunks, so a small change in a large file uploads about one chunk —,
writes the manifest and the commit object to the repository, moves the mounted branch to it by
compare-and-swap, and leaves the mount clean on top of the new version. If someone else moved
the branch meanwhile, nothing is changed and the changes stay in the mount.

The author is --author, else $HORCRUX_AUTHOR, else git's user.name and user.email, else
USER@HOST.";

#[derive(Debug, Args)]
#[command(after_long_help = COMMIT_HELP)]
pub struct CommitArgs {
    /// What the version is about
    #[arg(short, long)]
    pub message: String,
    /// The mountpoint of the volume, or any path inside it [default: the current directory]
    pub path: Option<PathBuf>,
    /// Who commits ("Name <email>")
    #[arg(long)]
    pub author: Option<String>,
    /// Seconds to wait for the commit (it uploads what changed)
    #[arg(long, value_name = "SECS", default_value = "3600")]
    pub timeout: u64,
}

pub fn run_commit(a: CommitArgs) -> anyhow::Result<()> {
    let loc = mounts::locate(&Target::from_arg(a.path.as_deref()))?;
    let req = Request::Commit {
        message: a.message,
        author: a.author.unwrap_or_else(super::generate::author),
    };
    match mounts::request(&loc, &req, Duration::from_secs(a.timeout.max(1)))? {
        Response::Committed(r) => {
            println!(
                "committed {} on {}/{} (parent {}): {} files, {}; {} new chunks ({}) uploaded",
                &r.commit[..12],
                r.volume,
                r.branch,
                &r.parent[..12.min(r.parent.len())],
                r.files,
                horcrux::util::human_size(r.bytes),
                r.new_chunks,
                horcrux::util::human_size(r.new_bytes)
            );
            Ok(())
        }
        other => Err(anyhow!("unexpected answer from the daemon: {other:?}")),
    }
}

const CHECKOUT_HELP: &str = "\
Switches a live writable mount to another version: a branch (later commits go there), a tag or
a commit id (`HEAD` is the current one). Refused while the volume has uncommitted changes
(commit them, or add --discard to throw them away) and while files are open in it (stop the
applications using it first): the same inode numbers name other files afterwards.

On a Docker volume of `horcrux plugin` (its name, or its mountpoint), the running containers
that use it are stopped first (10 s grace) through the Docker Engine API, and started again
afterwards, also when the switch failed; the volume's next mounts show the version switched to.

Examples:
  horcrux checkout experiment /var/lib/mysql
  horcrux checkout 3f2a9c1 --discard
  horcrux checkout 3f2a9c1 v1           # Docker volume v1: restarts its containers";

#[derive(Debug, Args)]
#[command(after_long_help = CHECKOUT_HELP)]
pub struct CheckoutArgs {
    /// Branch, tag or commit id to show
    pub rev: String,
    /// The mountpoint of the volume, or any path inside it [default: the current directory]
    pub path: Option<PathBuf>,
    /// Throw away uncommitted changes
    #[arg(long)]
    pub discard: bool,
}

const RESET_HELP: &str = "\
Moves the mounted branch to REV (by compare-and-swap: refused if someone moved the branch
meanwhile), throws away every uncommitted change, and switches the mount there. --hard is
required: it is the only kind of reset, and it throws work away. Refused while files are open
in the volume; on a Docker volume, the containers using it are stopped and started again
around the reset (as for `checkout`).

Example:
  horcrux reset --hard 3f2a9c1 /var/lib/mysql";

#[derive(Debug, Args)]
#[command(after_long_help = RESET_HELP)]
pub struct ResetArgs {
    /// Throw away uncommitted changes and move the branch (required)
    #[arg(long)]
    pub hard: bool,
    /// Branch, tag or commit id to move the branch to
    pub rev: String,
    /// The mountpoint of the volume, or any path inside it [default: the current directory]
    pub path: Option<PathBuf>,
}

fn switch(path: Option<&std::path::Path>, req: Request) -> anyhow::Result<()> {
    if let Some(p) = path
        && let Some(name) = super::plugin::docker_volume_of(p)?
    {
        return switch_docker_volume(&name, &req);
    }
    let loc = mounts::locate(&Target::from_arg(path))?;
    switch_at(&loc, &req).map(|_| ())
}

/// Send the switch to the daemon of `loc` and say what it shows now: the commit, and the
/// branch if it is one.
fn switch_at(loc: &mounts::Located, req: &Request) -> anyhow::Result<(String, Option<String>)> {
    match mounts::request(loc, req, Duration::from_secs(600))? {
        Response::CheckedOut {
            commit,
            branch,
            discarded,
        } => {
            println!(
                "{} now shows {}{}{}",
                loc.mountpoint.display(),
                &commit[..12.min(commit.len())],
                match &branch {
                    Some(b) => format!(" (branch {b})"),
                    None => " (no branch: commits are refused until a branch is checked out)"
                        .to_string(),
                },
                if discarded > 0 {
                    format!("; {discarded} change(s) thrown away")
                } else {
                    String::new()
                }
            );
            Ok((commit, branch))
        }
        other => Err(anyhow!("unexpected answer from the daemon: {other:?}")),
    }
}

/// Grace period of `docker stop` for the containers using a volume being switched.
const STOP_GRACE_SECS: u32 = 10;

/// The switch of a Docker volume of the plugin: the running containers that use it are
/// stopped (through the engine's API), the volume is switched (on a mount made for the
/// command once the last container is gone and the plugin unmounted it), the registry
/// records the new version so the plugin's next mount shows it, and the containers are
/// started again, whether the switch worked or not.
fn switch_docker_volume(name: &str, req: &Request) -> anyhow::Result<()> {
    use crate::docker_api::Engine;
    let engine = Engine::new();
    let running = if engine.socket.exists() {
        engine
            .containers_using(name)
            .with_context(|| format!("finding the containers that use Docker volume `{name}`"))?
    } else {
        Vec::new()
    };
    let mut stopped = Vec::new();
    let mut outcome = Ok(());
    for c in &running {
        eprintln!(
            "horcrux: stopping container {} (it uses Docker volume `{name}`)",
            c.display()
        );
        match engine.stop(&c.id, STOP_GRACE_SECS) {
            Ok(()) => stopped.push(c.clone()),
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    let outcome = outcome.and_then(|()| {
        if !stopped.is_empty() {
            wait_for_plugin_unmount(name);
        }
        let loc = mounts::locate_volume(name)?;
        let (commit, branch) = switch_at(&loc, req)?;
        super::plugin::set_volume_ref(name, branch.as_deref().unwrap_or(&commit))
            .context("recording the new version in the plugin's registry")
    });
    // The mount made for the switch holds the volume's local changes: it goes before any
    // container needs the plugin to mount the volume again.
    super::plugin::release_temporary_mounts();
    let mut restarted = Vec::new();
    let mut not_restarted = Vec::new();
    for c in &stopped {
        match engine.start(&c.id) {
            Ok(()) => restarted.push(c.display()),
            Err(e) => not_restarted.push(format!("{}: {e:#}", c.display())),
        }
    }
    if !stopped.is_empty() {
        let how = if outcome.is_ok() {
            "switched"
        } else {
            "the switch FAILED (see below); nothing changed"
        };
        if !restarted.is_empty() {
            println!(
                "Docker volume `{name}`: {how}; started again: {}",
                restarted.join(", ")
            );
        }
        if !not_restarted.is_empty() {
            eprintln!(
                "horcrux: Docker volume `{name}`: {how}; could NOT start again: {}",
                not_restarted.join("; ")
            );
        }
    }
    outcome?;
    if !not_restarted.is_empty() {
        anyhow::bail!(
            "{} container(s) using Docker volume `{name}` could not be started again",
            not_restarted.len()
        );
    }
    Ok(())
}

/// After its last container stopped, the engine asks the plugin to unmount the volume; wait
/// for that (up to 30 s: something else may keep it, then the switch goes to its daemon).
fn wait_for_plugin_unmount(name: &str) {
    let mp = super::plugin::plugin_mountpoint(name);
    let t0 = std::time::Instant::now();
    while super::plugin::mount_state(&mp) == horcrux_plugin::driver::MountState::Live
        && t0.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run_checkout(a: CheckoutArgs) -> anyhow::Result<()> {
    switch(
        a.path.as_deref(),
        Request::Checkout {
            rev: a.rev,
            discard: a.discard,
        },
    )
}

pub fn run_reset(a: ResetArgs) -> anyhow::Result<()> {
    if !a.hard {
        anyhow::bail!(
            "reset throws uncommitted work away and moves the branch: say so with --hard \
             (`horcrux reset --hard {}`)",
            a.rev
        );
    }
    switch(a.path.as_deref(), Request::ResetHard { rev: a.rev })
}

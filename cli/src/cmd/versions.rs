//! `horcrux commit`: make a mounted volume's changes a new version (issue 5; more to come:
//! log, checkout, push, pull).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::anyhow;
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

Examples:
  horcrux checkout experiment /var/lib/mysql
  horcrux checkout 3f2a9c1 --discard";

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
in the volume.

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
    let loc = mounts::locate(&Target::from_arg(path))?;
    match mounts::request(&loc, &req, Duration::from_secs(600))? {
        Response::CheckedOut {
            commit,
            branch,
            discarded,
        } => {
            println!(
                "{} now shows {}{}{}",
                loc.mountpoint.display(),
                &commit[..12.min(commit.len())],
                match branch {
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
            Ok(())
        }
        other => Err(anyhow!("unexpected answer from the daemon: {other:?}")),
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

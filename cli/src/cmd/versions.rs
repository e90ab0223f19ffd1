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

//! `horcrux mount` and `horcrux umount`.

use std::path::PathBuf;

use clap::Args;

use crate::CacheArgs;

#[derive(Debug, Args)]
pub struct MountArgs {
    /// Access URL(s), comma-separated mirrors in order of preference: file:///path, cp:///path
    pub access: String,
    /// Empty directory to mount on
    pub mountpoint: PathBuf,
    /// Volume name in the repository (needed when it holds several)
    #[arg(long)]
    pub name: Option<String>,
    /// Branch, tag or commit to mount
    #[arg(long = "ref", default_value = "main")]
    pub reference: String,
    /// Refuse writes
    #[arg(long)]
    pub read_only: bool,
    /// Stay in the foreground (logs to stderr) instead of detaching once the mount is live
    #[arg(long, short = 'f')]
    pub foreground: bool,
    /// Let other users access the mount (needs user_allow_other in /etc/fuse.conf for non-root)
    #[arg(long)]
    pub allow_other: bool,
    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(Debug, Args)]
pub struct UmountArgs {
    /// The mountpoint to unmount
    pub mountpoint: PathBuf,
}

pub fn run(_a: MountArgs) -> anyhow::Result<()> {
    anyhow::bail!("mount: being implemented")
}

pub fn run_umount(_a: UmountArgs) -> anyhow::Result<()> {
    anyhow::bail!("umount: being implemented")
}

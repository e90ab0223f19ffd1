//! `horcrux demo`: the main job end to end on a built-in sample.

use clap::Args;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Work directory for the sample tree, repository, cache and mountpoint
    #[arg(long, default_value = "/tmp/horcrux-demo")]
    pub dir: std::path::PathBuf,
}

pub fn run(_a: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("demo: being implemented")
}

//! `horcrux copy SRC DST`: copy a repository (all or some volumes, with history) between stores.

use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use horcrux::repo::Repository;
use horcrux::transfer::{CopyOptions, CopyProgress, copy};
use horcrux::util::human_size;

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// Source repository URL (file:///path, ...)
    pub source: String,
    /// Destination repository URL; created if empty
    pub destination: String,
    /// Copy only this volume (repeatable; default: all)
    #[arg(long = "name")]
    pub names: Vec<String>,
    /// Overwrite destination branches that have diverged
    #[arg(long)]
    pub force: bool,
    /// Parallel transfers
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
}

struct Bar(indicatif::ProgressBar);

impl CopyProgress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

pub fn run(a: CopyArgs) -> anyhow::Result<()> {
    crate::init_logging(None)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let src_url = horcrux::store::parse_one(&a.source)?;
        let dst_url = horcrux::store::parse_one(&a.destination)?;
        let src = Repository::open(crate::open_store(&src_url)?)
            .await
            .with_context(|| format!("opening the source {src_url}"))?;
        let dst: Arc<dyn horcrux::store::Store> = crate::open_store(&dst_url)?;
        let bar = crate::progress::bar("copying");
        let opts = CopyOptions {
            volumes: a.names.clone(),
            force: a.force,
            concurrency: a.jobs,
            ..Default::default()
        };
        let t = std::time::Instant::now();
        let r = copy(&src, dst, &opts, &Bar(bar.clone())).await?;
        bar.finish_and_clear();
        println!(
            "copied {} of {} chunks ({}) and {} commits in {:.1}s; refs updated: {}{}",
            r.chunks_copied,
            r.chunks,
            human_size(r.bytes_copied),
            r.commits_copied,
            t.elapsed().as_secs_f64(),
            if r.refs_updated.is_empty() {
                "none".to_string()
            } else {
                r.refs_updated.join(", ")
            },
            if r.refs_unchanged.is_empty() {
                String::new()
            } else {
                format!("; already up to date: {}", r.refs_unchanged.len())
            }
        );
        Ok(())
    })
}

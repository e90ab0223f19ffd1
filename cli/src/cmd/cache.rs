//! `horcrux cache ...`.

use clap::Subcommand;

use crate::CacheArgs;

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List cached chunks, most recently used first
    Ls,
    /// Show one cached chunk (by id or unique id prefix)
    Inspect { chunk: String },
    /// Totals: chunks, bytes, manifests, bound
    Stats,
    /// Remove least recently used data
    Prune {
        /// Evict until the cache holds at most this much, e.g. 1G
        #[arg(long, value_parser = crate::parse_size)]
        max_size: Option<u64>,
        /// Remove what was not used for this long, e.g. 7d, 12h, 30m
        #[arg(long)]
        older_than: Option<String>,
    },
    /// Re-hash every cached block; drop what fails
    Verify,
}

pub fn run(_c: CacheCommand, _a: CacheArgs) -> anyhow::Result<()> {
    anyhow::bail!("cache: being implemented")
}

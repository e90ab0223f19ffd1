//! `horcrux import SRC DST [--name VOL]`: an original Horcrux volume (`<name>.meta` + `v1/...`
//! chunk files, from any store) as a new volume of a horcrux repository.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use horcrux::format::{DEFAULT_BLOCK_SIZE, check_volume_name, parse_chunk_size};
use horcrux::generate::GenerateOptions;
use horcrux::import::{Original, import};
use horcrux::repo::Repository;
use horcrux::store::{AccessUrl, parse_one};
use horcrux::util::human_size;

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The original Horcrux repository: a directory, file://, cp://, scp://, ssh:// or s3:// URL
    pub source: String,
    /// The horcrux repository to write into (created if empty)
    pub dest: String,
    /// The original volume (`<NAME>.meta`); needed when SRC holds several
    #[arg(long)]
    pub name: Option<String>,
    /// Name of the new volume [default: the original's name]
    #[arg(long = "as", value_name = "VOLUME")]
    pub as_name: Option<String>,
    /// Largest chunk of the new volume: a power of two from 1M to 1G
    #[arg(long, default_value = "64M")]
    pub chunk_size: String,
    /// Commit message [default: "imported from SRC"]
    #[arg(short = 'm', long)]
    pub message: Option<String>,
    /// Threads reading and hashing chunks [default: number of CPUs]
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Print nothing but errors (no progress bar, no summary)
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn run(a: ImportArgs) -> anyhow::Result<()> {
    crate::init_logging(None)?;
    let chunk_size = parse_chunk_size(&a.chunk_size)?;
    let src_url = parse_one(&a.source)?;
    let dst_url = parse_one(&a.dest)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let src = crate::open_store(&src_url)?;
    let name = match a.name.clone() {
        Some(n) => n,
        None => only_volume(&runtime, &*src)?,
    };
    let new_name = a.as_name.clone().unwrap_or_else(|| name.clone());
    check_volume_name(&new_name).with_context(|| {
        format!("`{new_name}` cannot name a horcrux volume: choose one with --as")
    })?;
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    let original = Arc::new(Original::open(src, &name, time, runtime.handle())?);
    let (entries, files, bytes) = original.counts();
    if !a.quiet {
        eprintln!(
            "original volume `{name}` (Horcrux {}): root `{}`, {entries} entries, {files} files, {} in chunks of {}",
            if original.version.is_empty() {
                "?"
            } else {
                &original.version
            },
            original.root_name(),
            human_size(bytes),
            human_size(original.chunk_size()),
        );
    }
    if let AccessUrl::File { path } = &dst_url {
        std::fs::create_dir_all(path)
            .with_context(|| format!("creating the repository directory {}", path.display()))?;
    }
    let dst = crate::open_store(&dst_url)?;
    let repo = runtime.block_on(Repository::open_or_init(dst))?;
    let opts = GenerateOptions {
        name: new_name.clone(),
        input: Default::default(),
        chunk_size,
        block_size: DEFAULT_BLOCK_SIZE,
        message: a
            .message
            .clone()
            .unwrap_or_else(|| format!("imported from {}", a.source)),
        author: crate::cmd::generate::author(),
        workers: a.workers,
    };
    let progress = crate::progress::tree_progress("importing", a.quiet);
    let started = Instant::now();
    let r = import(original, &opts, &repo, runtime.handle(), progress.as_ref())?;
    let secs = started.elapsed().as_secs_f64();
    if !a.quiet {
        println!(
            "imported `{name}` as volume `{new_name}` in {}",
            repo.store().describe()
        );
        println!(
            "  {} files, {} directories, {} in {} chunks ({} uploaded, {})",
            r.files,
            r.dirs,
            human_size(r.bytes),
            r.chunks,
            r.chunks_written,
            human_size(r.bytes_written)
        );
        println!("  manifest {}", r.manifest);
        println!("  commit   {} (branch main)", r.commit);
        println!(
            "  {:.1} s, {:.1} MB/s",
            secs,
            r.bytes as f64 / secs.max(1e-9) / 1e6
        );
    }
    Ok(())
}

/// The one `<name>.meta` at the top of the source, when `--name` is not given.
fn only_volume(
    runtime: &tokio::runtime::Runtime,
    src: &dyn horcrux::store::Store,
) -> anyhow::Result<String> {
    let keys = runtime
        .block_on(src.list(""))
        .with_context(|| format!("listing {}", src.describe()))?;
    let names: Vec<&str> = keys
        .iter()
        .filter(|k| !k.contains('/'))
        .filter_map(|k| k.strip_suffix(".meta"))
        .collect();
    match names.as_slice() {
        [one] => Ok((*one).to_string()),
        [] => bail!(
            "{}: no original Horcrux volume (no <name>.meta at its top)",
            src.describe()
        ),
        many => bail!(
            "{} holds several original volumes ({}): choose one with --name",
            src.describe(),
            many.join(", ")
        ),
    }
}

//! `horcrux verify URL`: check a repository end to end (`horcrux::verify`).

use anyhow::{Context, bail};
use clap::Args;
use horcrux::repo::Repository;
use horcrux::util::human_size;
use horcrux::verify::{VerifyOptions, VerifyReport, verify};

use super::gc::{Bar, remote_stores};

const VERIFY_HELP: &str = "\
Checks a repository end to end: every branch, tag and remote-tracking ref of every volume
reaches commits and manifests that are present and match their ids, and every chunk those
manifests list is present and matches its id (each chunk is read whole and hashed; --quick
only checks that it is there). Chunks held not here but by a registered remote (versions
fetched lazily) are counted apart. Nothing is changed. The exit status is 1 when something is
missing or corrupt, with the keys listed; repair by pushing or copying the affected branches
again from a good copy (a corrupt object must be deleted first).

Examples:
  horcrux verify file:///opt/horcrux-amcc
  horcrux verify s3://backups/amcc?region=eu-west-1 --jobs 32
  horcrux verify scp://dev@dbhost:/opt/horcrux-amcc --quick --json";

#[derive(Debug, Args)]
#[command(after_long_help = VERIFY_HELP)]
pub struct VerifyArgs {
    /// The repository (file:///path, scp://, ssh://, s3://, horcrux://)
    pub url: String,
    /// Only check that every chunk is present (by listing), without reading it
    #[arg(long)]
    pub quick: bool,
    /// Parallel downloads
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn run_verify(a: VerifyArgs) -> anyhow::Result<()> {
    crate::init_logging(None)?;
    let url = horcrux::store::parse_one(&a.url)?;
    let store = crate::open_store(&url)?;
    let rt = tokio::runtime::Runtime::new()?;
    let bar = Bar(crate::progress::bar("verify"));
    let t = std::time::Instant::now();
    let report = rt.block_on(async {
        let repo = Repository::open(store.clone()).await?;
        let options = VerifyOptions {
            concurrency: a.jobs.max(1),
            quick: a.quick,
            remotes: remote_stores(store.as_ref()).await?,
        };
        anyhow::Ok(verify(&repo, &options, &bar).await?)
    });
    bar.0.finish_and_clear();
    let report = report.with_context(|| format!("verifying {url}"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, &url.to_string(), a.quick, t.elapsed());
    }
    if !report.ok() {
        bail!(
            "{url} is damaged: {} missing, {} corrupt (listed above)",
            report.missing.len(),
            report.corrupt.len()
        );
    }
    Ok(())
}

fn print_report(r: &VerifyReport, url: &str, quick: bool, took: std::time::Duration) {
    for k in &r.missing {
        println!("missing  {k}");
    }
    for k in &r.corrupt {
        println!("corrupt  {k}");
    }
    println!(
        "{url}: {} refs, {} commits, {} manifests, {} chunks ({}) {}{} in {:.1}s: {}",
        r.refs,
        r.commits,
        r.manifests,
        r.chunks,
        human_size(r.chunk_bytes),
        if quick { "present" } else { "hashed" },
        if r.on_remotes > 0 {
            format!(
                ", {} more on registered remotes (lazily fetched)",
                r.on_remotes
            )
        } else {
            String::new()
        },
        took.as_secs_f64(),
        if r.ok() { "OK" } else { "DAMAGED" }
    );
    if r.shallow_edges > 0 {
        println!(
            "  shallow copy: {} parent commit(s) not held (the history ends there)",
            r.shallow_edges
        );
    }
    if r.unreachable > 0 {
        println!(
            "  {} object(s) no ref reaches (`horcrux gc` collects them)",
            r.unreachable
        );
    }
}

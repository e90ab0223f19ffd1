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
fetched lazily) are counted apart. The exit status is 1 when something is missing or corrupt,
with the keys listed; repair by pushing or copying the affected branches again from a good
copy (a corrupt object must be deleted first).

Every chunk of more than 16 KiB also has a piece outboard (outboards/..., the hashes that let
a small cold read fetch 16 KiB instead of a whole block). One that is missing (repositories
made before horcrux wrote them for every chunk) is a warning; one that is wrong is damage
(--quick checks their sizes only). --repair writes the missing and wrong ones from their
chunks' bytes, once these match the chunk id (with --quick it reads only those chunks); it
changes nothing else.

Examples:
  horcrux verify file:///opt/horcrux-amcc
  horcrux verify s3://backups/amcc?region=eu-west-1 --jobs 32
  horcrux verify scp://dev@dbhost:/opt/horcrux-amcc --quick --json
  horcrux verify file:///opt/horcrux-amcc --quick --repair    # add missing piece outboards";

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
    /// Write missing or wrong piece outboards from their chunks (nothing else is changed)
    #[arg(long)]
    pub repair: bool,
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
            repair: a.repair,
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
        let bad = report.unrepaired_bad().len();
        bail!(
            "{url} is damaged: {} missing, {} corrupt{} (listed above)",
            report.missing.len(),
            report.corrupt.len(),
            if bad > 0 {
                format!(
                    ", {bad} wrong piece outboard(s) (`horcrux verify --repair {url}` \
                     rewrites them)"
                )
            } else {
                String::new()
            }
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
    for k in &r.outboards_bad {
        if r.outboards_repaired.contains(k) {
            println!("repaired {k} (it was wrong)");
        } else {
            println!("corrupt  {k}");
        }
    }
    println!(
        "{url}: {} refs, {} commits, {} manifests, {} chunks ({}) {}, {} piece outboards {}{} \
         in {:.1}s: {}",
        r.refs,
        r.commits,
        r.manifests,
        r.chunks,
        human_size(r.chunk_bytes),
        if quick { "present" } else { "hashed" },
        r.outboards,
        if quick {
            "of the right size"
        } else {
            "checked"
        },
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
    let no_outboard = r.unrepaired_missing().len();
    let added = r.outboards_repaired.len() - (r.outboards_bad.len() - r.unrepaired_bad().len());
    if added > 0 {
        println!("  {added} missing piece outboard(s) written");
    }
    if no_outboard > 0 {
        println!(
            "  warning: {no_outboard} chunk(s) have no piece outboard, so small cold reads of \
             them fetch whole blocks: `horcrux verify --repair {url}` adds them (with --quick \
             it reads only those chunks)"
        );
    }
    if r.orphan_outboards > 0 {
        println!(
            "  {} piece outboard(s) of chunks that are not here (`horcrux gc` removes them)",
            r.orphan_outboards
        );
    }
    if r.unreachable > 0 {
        println!(
            "  {} object(s) no ref reaches (`horcrux gc` collects them)",
            r.unreachable
        );
    }
}

//! `horcrux gc`: remove the objects of a repository that no ref reaches (`horcrux::gc`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use horcrux::gc::{GcOptions, GcProgress, GcReport, Tally};
use horcrux::repo::Repository;
use horcrux::util::human_size;

use crate::mounts::{self, Target};

const GC_HELP: &str = "\
Removes the chunks, manifests and commits of a repository that no branch or tag of any of
its volumes reaches: the commits a `reset --hard`, a `push --force` or a `branch -d` left
behind, and what an interrupted writer put but never referenced. A chunk's piece outboard
(outboards/...) goes with it; outboards whose chunk is not there (orphans) are removed by
any run. The repository is the one
the mount at PATH (default: the current directory) is mounted from, or --access URL; it may be
local or remote (file://, scp://, ssh://, s3://). With mirrors (URLs separated by commas) only
the first is collected: run gc on each mirror by itself.

Safe against writers running at the same time (commit, push, clone) by a grace period: a run
removes an object only if an earlier run already found it unreachable at least --grace ago
(default 1h) and it is still unreachable. A first run therefore only records what it found
(in gc/ in the repository); run gc again later (or with --grace 0, once no writer is running,
right away) to remove it. Commits go first, then manifests, then chunks.

--dry-run reports what is unreachable and what a run now would remove, and writes nothing.

Examples:
  horcrux gc --dry-run /var/lib/mysql
  horcrux gc --access s3://backups/amcc?region=eu-west-1
  horcrux gc --grace 0 --access file:///opt/horcrux-amcc    # twice, with no writer running";

#[derive(Debug, Args)]
#[command(after_long_help = GC_HELP)]
pub struct GcArgs {
    /// A mount of a volume of the repository, or any path inside it [default: the current
    /// directory]
    pub path: Option<PathBuf>,
    /// Collect this repository instead of a mount's (file:///path, scp://, ssh://, s3://)
    #[arg(long, value_name = "URL", conflicts_with = "path")]
    pub access: Option<String>,
    /// Report what would be removed; remove and write nothing
    #[arg(long)]
    pub dry_run: bool,
    /// How long an object must have been found unreachable before it is removed (e.g. 0, 90s,
    /// 30m, 1h, 2d)
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub grace: Duration,
    /// Parallel removals and manifest downloads
    #[arg(long, default_value_t = 16)]
    pub jobs: usize,
    /// Print the report as JSON (with the keys unreachable and removed)
    #[arg(long)]
    pub json: bool,
}

/// `0`, `90`, `90s`, `30m`, `1h`, `2d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration: use e.g. 0, 90s, 30m, 1h or 2d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use s, m, h or d)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

/// The stores of the repository's registered remotes (where lazily fetched data is).
pub(super) async fn remote_stores(
    store: &dyn horcrux::store::Store,
) -> anyhow::Result<Vec<std::sync::Arc<dyn horcrux::store::Store>>> {
    let opener = crate::store_opener();
    Ok(horcrux::remotes::open_all(store, &*opener)
        .await?
        .into_iter()
        .map(|(_, s)| s)
        .collect())
}

pub(super) struct Bar(pub(super) indicatif::ProgressBar);

impl GcProgress for Bar {
    fn phase(&self, what: &str, total: u64) {
        self.0.set_prefix(what.to_string());
        self.0.set_position(0);
        self.0.set_length(total);
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
}

fn tally(t: &Tally) -> String {
    format!(
        "{} object{} ({})",
        t.objects,
        if t.objects == 1 { "" } else { "s" },
        human_size(t.bytes)
    )
}

fn grace_text(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => "0s".into(),
        s if s % 86400 == 0 => format!("{}d", s / 86400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

pub fn run(a: GcArgs) -> anyhow::Result<()> {
    crate::init_logging(None)?;
    let mut keep = Vec::new();
    let access = match &a.access {
        Some(u) => u.clone(),
        None => {
            let loc = mounts::locate(&Target::from_arg(a.path.as_deref()))?;
            let info = mounts::describe(&loc, Duration::from_secs(30))?;
            // What the mount sits on stays, even if no ref reaches it.
            if let Ok(id) = info.commit.parse() {
                keep.push(id);
            }
            info.access
        }
    };
    let urls = horcrux::store::parse_access(&access)?;
    let Some(first) = urls.first() else {
        bail!("no repository URL in `{access}`");
    };
    if urls.len() > 1 {
        eprintln!(
            "horcrux: gc collects only the first of the {} mirrors ({first}); run it on each \
             mirror by itself",
            urls.len()
        );
    }
    let store = crate::open_store(first)?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut options = GcOptions {
        dry_run: a.dry_run,
        grace: a.grace,
        concurrency: a.jobs.max(1),
        now: None,
        keep,
        remotes: Vec::new(),
    };
    let bar = Bar(crate::progress::bar("gc"));
    let report = rt.block_on(async {
        let repo = Repository::open(store.clone()).await?;
        options.remotes = remote_stores(store.as_ref()).await?;
        anyhow::Ok(horcrux::gc::gc(&repo, &options, &bar).await?)
    });
    bar.0.finish_and_clear();
    let report = report.with_context(|| format!("gc of {}", store.describe()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, &store.describe(), a.grace);
    }
    if !report.missing.is_empty() {
        bail!(
            "{} object{} that a ref reaches {} missing (listed above): the repository is \
             damaged there; push or copy the affected branches again from a complete copy",
            report.missing.len(),
            if report.missing.len() == 1 { "" } else { "s" },
            if report.missing.len() == 1 {
                "is"
            } else {
                "are"
            },
        );
    }
    Ok(())
}

fn print_report(r: &GcReport, store: &str, grace: Duration) {
    let removed: std::collections::HashSet<&String> = r.removed_keys.iter().collect();
    if r.dry_run {
        for k in &r.unreachable_keys {
            let what = if removed.contains(k) {
                "would remove"
            } else {
                "pending     "
            };
            println!("{what}  {k}");
        }
        for k in &r.orphan_outboards {
            println!("would remove  {k} (orphan: its chunk is not here)");
        }
    }
    println!(
        "gc of {store}{}: {} ref{}, {} commit{} reachable",
        if r.dry_run {
            " (dry run: nothing written)"
        } else {
            ""
        },
        r.refs,
        if r.refs == 1 { "" } else { "s" },
        r.commits,
        if r.commits == 1 { "" } else { "s" },
    );
    println!("  kept:        {} reachable", tally(&r.reachable));
    if r.on_remotes > 0 {
        println!(
            "  on remotes:  {} reachable chunk(s) held by registered remotes (lazily fetched)",
            r.on_remotes
        );
    }
    println!(
        "  {}  {}",
        if r.dry_run {
            "would remove:"
        } else {
            "removed:    "
        },
        tally(&r.removed)
    );
    if r.outboards_removed.objects > 0 {
        println!(
            "  outboards:   {} piece outboard(s) {} ({}), of those chunks{}",
            r.outboards_removed.objects,
            if r.dry_run { "would go" } else { "removed" },
            human_size(r.outboards_removed.bytes),
            if r.orphan_outboards.is_empty() {
                String::new()
            } else {
                format!(" and {} orphan(s)", r.orphan_outboards.len())
            }
        );
    }
    if r.pending.objects > 0 {
        println!(
            "  pending:     {}: unreachable, but not yet found so for {} by an earlier run; a \
             later gc removes them",
            tally(&r.pending),
            grace_text(grace)
        );
    }
    if r.rescued > 0 {
        println!(
            "  rescued:     {} object(s) a concurrent writer made reachable during the run",
            r.rescued
        );
    }
    for k in &r.missing {
        println!("  MISSING:     {k}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172800));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
        assert_eq!(grace_text(Duration::from_secs(3600)), "1h");
    }
}

//! `horcrux cache ...`: inspect and bound the local cache.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Subcommand;
use horcrux::cache::{Cache, CacheConfig};
use horcrux::util::human_size;

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
        /// Remove what was not used for this long, e.g. 7d, 12h, 30m, 90s
        #[arg(long, value_parser = parse_duration)]
        older_than: Option<Duration>,
    },
    /// Re-hash every cached block and manifest; drop what fails
    Verify,
    /// List the volumes that pin data in the cache (made by `horcrux prefetch`)
    Pins,
    /// Release a volume's pinned data (eviction and prune may then remove it) and forget its
    /// prefetch request
    Unpin {
        /// The owner as `horcrux cache pins` lists it (`<volume>@<access>`)
        #[arg(required_unless_present = "all")]
        owner: Option<String>,
        /// Every owner
        #[arg(long, conflicts_with = "owner")]
        all: bool,
    },
}

/// `7d`, `12h`, `30m`, `90s` or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration: use e.g. 7d, 12h, 30m, 90s"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => {
            return Err(format!(
                "`{s}` has an unknown unit `{unit}`: use s, m, h, d or w"
            ));
        }
    };
    Ok(Duration::from_secs(n * mult))
}

fn ago(secs: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let d = (now - secs).max(0);
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

pub fn run(command: CacheCommand, args: CacheArgs) -> anyhow::Result<()> {
    crate::init_logging(None)?;
    let dir = crate::paths::cache_dir(args.cache_dir.as_ref());
    if !dir.exists() && !matches!(command, CacheCommand::Stats) {
        bail!(
            "no cache at {} (nothing has been mounted with it yet; --cache-dir to choose another)",
            dir.display()
        );
    }
    let cache = Cache::open(CacheConfig {
        dir: dir.clone(),
        max_size: args.cache_size,
    })
    .with_context(|| format!("opening the cache at {}", dir.display()))?;
    match command {
        CacheCommand::Ls => {
            let list = cache.list()?;
            println!(
                "{:<16} {:>10} {:>10} {:>9}  USED",
                "CHUNK", "SIZE", "CACHED", "BLOCKS"
            );
            for c in &list {
                println!(
                    "{:<16} {:>10} {:>10} {:>4}/{:<4}  {}",
                    c.id.short(),
                    human_size(c.len),
                    human_size(c.bytes),
                    c.blocks_present,
                    c.blocks_total,
                    ago(c.last_access)
                );
            }
            let total: u64 = list.iter().map(|c| c.bytes).sum();
            println!("{} chunks, {} cached", list.len(), human_size(total));
        }
        CacheCommand::Inspect { chunk } => {
            let c = cache.find(&chunk)?;
            println!("chunk        {}", c.id);
            println!("length       {} ({} bytes)", human_size(c.len), c.len);
            println!(
                "cached       {} in {} of {} blocks of {}",
                human_size(c.bytes),
                c.blocks_present,
                c.blocks_total,
                human_size(c.block_size as u64)
            );
            println!("last used    {}", ago(c.last_access));
            println!("file         {}", c.path.display());
            if let Some(b) = cache.bitmap_of(&c.id)? {
                let map: String = (0..b.len())
                    .map(|i| if b.get(i) { '#' } else { '.' })
                    .collect();
                println!("blocks       {map}");
            }
        }
        CacheCommand::Stats => {
            let s = cache.stats()?;
            println!("cache        {}", dir.display());
            println!("chunks       {} ({} complete)", s.chunks, s.complete_chunks);
            println!("data         {}", human_size(s.bytes));
            println!(
                "manifests    {} ({})",
                s.manifests,
                human_size(s.manifest_bytes)
            );
            println!(
                "assembled    {} ({}; files copied whole for FUSE passthrough)",
                s.assembled_files,
                human_size(s.assembled_bytes)
            );
            let pins = cache.pin_summaries()?;
            if !pins.is_empty() {
                println!(
                    "pinned       {} of {} by {} volume(s) (`horcrux cache pins`)",
                    human_size(pins.iter().map(|p| p.bytes_present).sum()),
                    human_size(pins.iter().map(|p| p.bytes_total).sum()),
                    pins.len()
                );
            }
            match s.max_size {
                Some(m) => println!(
                    "bound        {} ({:.0}% used)",
                    human_size(m),
                    s.bytes as f64 * 100.0 / m.max(1) as f64
                ),
                None => println!(
                    "bound        none (set one with --cache-size or prune with `horcrux cache prune --max-size`)"
                ),
            }
        }
        CacheCommand::Prune {
            max_size,
            older_than,
        } => {
            let max_size = max_size.or(args.cache_size);
            if max_size.is_none() && older_than.is_none() {
                bail!(
                    "say what to prune: --max-size SIZE and/or --older-than AGE (e.g. --max-size 1G)"
                );
            }
            let r = cache.prune(max_size, older_than)?;
            println!(
                "removed {} chunks ({}) and {} manifests{}",
                r.chunks,
                human_size(r.bytes),
                r.manifests,
                if r.skipped_pinned > 0 {
                    format!("; {} chunks in use were kept", r.skipped_pinned)
                } else {
                    String::new()
                }
            );
        }
        CacheCommand::Pins => {
            let pins = cache.pin_summaries()?;
            if pins.is_empty() {
                println!("no volume pins data in this cache");
            }
            for p in &pins {
                let state = cache
                    .prefetch_record(&p.owner)?
                    .map(|r| {
                        format!(
                            "prefetch {}, commit {}",
                            r.state,
                            &r.commit[..12.min(r.commit.len())]
                        )
                    })
                    .unwrap_or_else(|| "no prefetch record".into());
                println!(
                    "{}\n    {} chunks ({} of {} cached), {} manifests; {}",
                    p.owner,
                    p.chunks,
                    human_size(p.bytes_present),
                    human_size(p.bytes_total),
                    p.manifests,
                    state
                );
            }
        }
        CacheCommand::Unpin { owner, all } => {
            let owners: Vec<String> = if all {
                cache
                    .pin_summaries()?
                    .into_iter()
                    .map(|p| p.owner)
                    .collect()
            } else {
                owner.into_iter().collect()
            };
            let mut n = 0;
            for o in &owners {
                let k = cache.unpin_owner(o)?;
                if k == 0 && !all {
                    bail!("no pins of `{o}` in this cache (see `horcrux cache pins`)");
                }
                n += k;
            }
            println!(
                "released {n} pins of {} volume(s); eviction and `horcrux cache prune` may now remove that data",
                owners.len()
            );
        }
        CacheCommand::Verify => {
            let bar = crate::progress::bar("verifying");
            let r = cache.verify(&|done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })?;
            bar.finish_and_clear();
            println!(
                "checked {} chunks, {} blocks: {} bad blocks dropped, {} missing files, {} bad manifests, {} orphan files removed",
                r.chunks, r.blocks, r.bad_blocks, r.missing_files, r.bad_manifests, r.orphan_files
            );
            if r.bad_blocks + r.missing_files + r.bad_manifests + r.orphan_files > 0 {
                println!("the cache is consistent again: dropped data is fetched anew when read");
            } else {
                println!("cache is clean");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("7y").is_err());
        assert!(parse_duration("x").is_err());
    }
}

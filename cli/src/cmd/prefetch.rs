//! `horcrux prefetch`: hydrate a mounted volume (or some of its paths) in its mount daemon, in
//! the background, and watch it; `--status` and `--cancel` talk to a job already running.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail};
use clap::Args;
use horcrux::util::human_size;
use horcrux_proto::control::{PrefetchReport, ReplayReport, Request, Response, WirePath};

use crate::cmd::changes::DaemonArgs;
use crate::mounts::{self, Located, Target};

const HELP: &str = "\
Fetches a mounted volume's data into the local cache in the background, inside the mount
daemon, while the volume stays in use (reads keep priority), and pins it in the cache for
this volume: eviction never drops it, and the volume keeps working with its source gone — a
lazy migration. Every block is verified by hash; blocks already cached are not fetched again.

  --all        the whole version the volume shows
  PATH...      these files or directories, recursively: relative to the volume root, or
               absolute paths inside the mount (local changes need nothing)

The request is recorded in the cache: a mount daemon that restarts resumes it. Without
--detach the command shows the progress until the job is done; Ctrl-C only stops watching —
the job goes on in the daemon (`horcrux prefetch --cancel MNT` stops it). If the source
becomes unreachable later, `horcrux mount` falls back to the version the prefetch recorded
(see `horcrux cache pins`; `horcrux cache unpin` releases the data).

Examples:
  horcrux prefetch /mnt/amcc --all --bandwidth 100M
  horcrux prefetch /mnt/amcc db/ibdata1 /mnt/amcc/logs --detach
  horcrux prefetch --status /mnt/amcc
  horcrux prefetch --cancel /mnt/amcc";

#[derive(Debug, Args)]
#[command(after_long_help = HELP)]
pub struct PrefetchArgs {
    /// The mountpoint of the volume, a path inside it, or a Docker volume name
    pub mount: PathBuf,
    /// Files or directories to hydrate (recursively): relative to the volume root, or absolute
    /// paths inside the mount
    pub paths: Vec<PathBuf>,
    /// Hydrate the whole volume
    #[arg(long, conflicts_with_all = ["paths", "status", "cancel"])]
    pub all: bool,
    /// Bytes per second the job may fetch, e.g. 100M [default: unbounded]
    #[arg(long, value_name = "BYTES", value_parser = crate::parse_size)]
    pub bandwidth: Option<u64>,
    /// Blocks the job fetches at once [default: 4]
    #[arg(long, value_name = "N",
          value_parser = clap::builder::RangedU64ValueParser::<u32>::new().range(1..=256))]
    pub concurrency: Option<u32>,
    /// Start the job and return at once
    #[arg(long)]
    pub detach: bool,
    /// Show how the volume's prefetch is going, and return
    #[arg(long, conflicts_with_all = ["paths", "cancel", "detach"])]
    pub status: bool,
    /// Stop the volume's prefetch (a later mount does not resume it)
    #[arg(long, conflicts_with_all = ["paths", "detach"])]
    pub cancel: bool,
    /// With --status or --detach: print the daemon's report as JSON
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

pub fn run(a: PrefetchArgs) -> anyhow::Result<()> {
    let loc = mounts::locate(&Target::Path(a.mount.clone()))?;
    let timeout = a.daemon.timeout;
    if a.status || a.cancel {
        let req = if a.cancel {
            Request::PrefetchCancel
        } else {
            Request::PrefetchStatus
        };
        let answer = mounts::request(&loc, &req, timeout)?;
        // The start-up profile's replay is a prefetch too: shown with --status (a daemon that
        // does not know the request answers an error, and nothing is shown).
        let replay = match (
            a.cancel,
            mounts::request(&loc, &Request::ReplayStatus, timeout),
        ) {
            (false, Ok(Response::Replay(r))) => Some(r),
            _ => None,
        };
        return match answer {
            Response::Prefetch(r) => {
                print_report(&r, replay.as_ref(), a.json)?;
                Ok(())
            }
            Response::NoPrefetch if a.cancel => {
                println!("no prefetch is running on {}", loc.mountpoint.display());
                Ok(())
            }
            Response::NoPrefetch => match replay {
                // A replayed profile is this mount's prefetch.
                Some(r) if r.profile.is_some() => {
                    let mut out = std::io::stdout().lock();
                    if a.json {
                        writeln!(out, "{}", serde_json::json!({ "replay": r }))?;
                    } else {
                        writeln!(out, "{}", format_replay(&r))?;
                    }
                    Ok(())
                }
                r => bail!(
                    "no prefetch has run on {} since it was mounted; start one with `horcrux \
                     prefetch {} --all`{}",
                    loc.mountpoint.display(),
                    loc.mountpoint.display(),
                    r.map(|r| format!("\n{}", format_replay(&r)))
                        .unwrap_or_default()
                ),
            },
            other => bail!("unexpected answer from the daemon: {other:?}"),
        };
    }
    let paths = wanted_paths(&loc, &a.paths)?;
    if !a.all && paths.is_empty() {
        bail!(
            "say what to prefetch: --all, or paths inside {} (relative to the volume root or absolute)",
            loc.mountpoint.display()
        );
    }
    let req = Request::Prefetch {
        all: a.all,
        paths,
        bandwidth: a.bandwidth,
        concurrency: a.concurrency,
    };
    let started = match mounts::request(&loc, &req, timeout)? {
        Response::Prefetch(r) => r,
        other => bail!("unexpected answer from the daemon: {other:?}"),
    };
    if a.detach {
        if a.json {
            print_report(&started, None, true)?;
        } else {
            println!(
                "prefetching {} of {} in the background; `horcrux prefetch --status {}` shows how it goes",
                started.scope,
                loc.mountpoint.display(),
                loc.mountpoint.display()
            );
        }
        return Ok(());
    }
    watch(&loc, timeout)
}

/// The paths inside the volume the arguments name: the mount argument itself when it is a
/// path inside the volume, then each PATH.
fn wanted_paths(loc: &Located, args: &[PathBuf]) -> anyhow::Result<Vec<WirePath>> {
    let mut out = Vec::new();
    if !loc.inner.is_root() {
        out.push(loc.inner.clone());
    }
    for p in args {
        if p.is_absolute() {
            let other = mounts::locate(&Target::Path(p.clone()))?;
            if other.mountpoint != loc.mountpoint {
                bail!(
                    "{} is not inside the mount {} (it is on {})",
                    p.display(),
                    loc.mountpoint.display(),
                    other.mountpoint.display()
                );
            }
            out.push(other.inner);
        } else {
            out.push(mounts::volume_relative(p)?);
        }
    }
    Ok(out)
}

/// Show the job's progress until it ends. Ctrl-C ends only this process.
fn watch(loc: &Located, timeout: Duration) -> anyhow::Result<()> {
    eprintln!(
        "prefetching in the mount daemon of {} (Ctrl-C stops watching, not the prefetch: \
         `horcrux prefetch --cancel {}` stops it)",
        loc.mountpoint.display(),
        loc.mountpoint.display()
    );
    let bar = crate::progress::bytes_bar("prefetch");
    loop {
        let r = match mounts::request(loc, &Request::PrefetchStatus, timeout)? {
            Response::Prefetch(r) => r,
            Response::NoPrefetch => bail!("the daemon no longer has a prefetch job"),
            other => bail!("unexpected answer from the daemon: {other:?}"),
        };
        bar.set_length(r.total_bytes);
        bar.set_position(r.present_bytes);
        match r.state.as_str() {
            "planning" | "running" => std::thread::sleep(Duration::from_millis(200)),
            _ => {
                bar.finish_and_clear();
                print_report(&r, None, false)?;
                return match r.state.as_str() {
                    "done" => Ok(()),
                    "cancelled" => Err(anyhow!("the prefetch was cancelled")),
                    _ => Err(anyhow!(
                        "the prefetch failed: {}",
                        r.error.as_deref().unwrap_or("no reason given")
                    )),
                };
            }
        }
    }
}

fn print_report(
    r: &PrefetchReport,
    replay: Option<&ReplayReport>,
    json: bool,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let mut v = serde_json::to_value(r)?;
        if let (Some(o), Some(rp)) = (v.as_object_mut(), replay) {
            o.insert("replay".into(), serde_json::to_value(rp)?);
        }
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "{}", format_report(r))?;
    if let Some(rp) = replay {
        writeln!(out, "{}", format_replay(rp))?;
    }
    Ok(())
}

/// The start-up profile of a mount, for people.
pub fn format_replay(r: &ReplayReport) -> String {
    let mut s = format!(
        "start-up profile: recording {}; replay {}",
        r.recording, r.replay
    );
    if let Some(id) = &r.profile {
        s.push_str(&format!(
            " (profile {id}, recorded {}): {} of {} blocks present, {} fetched ({}), {} shared with readers, {} failed",
            match r.generations {
                0 => "on this version".to_string(),
                1 => "1 version back".to_string(),
                n => format!("{n} versions back"),
            },
            r.present,
            r.blocks,
            r.fetched,
            human_size(r.fetched_bytes),
            r.shared,
            r.failed
        ));
    }
    s
}

/// One paragraph for people.
pub fn format_report(r: &PrefetchReport) -> String {
    let secs = r.elapsed_ms as f64 / 1000.0;
    let pct = if r.total_bytes == 0 {
        100.0
    } else {
        r.present_bytes as f64 * 100.0 / r.total_bytes as f64
    };
    let rate = if secs > 0.0 {
        format!(", {}/s", human_size((r.fetched_bytes as f64 / secs) as u64))
    } else {
        String::new()
    };
    let mut s = format!(
        "prefetch {} ({}): {} of {} present ({pct:.1}%, {} of {} blocks); fetched {} in {secs:.1}s{rate}",
        r.state,
        r.scope,
        human_size(r.present_bytes),
        human_size(r.total_bytes),
        r.present_blocks,
        r.total_blocks,
        human_size(r.fetched_bytes),
    );
    s.push_str(&format!(
        "\nlimits: {} concurrent, bandwidth {}",
        r.concurrency,
        r.bandwidth
            .map(|b| format!("{}/s", human_size(b)))
            .unwrap_or_else(|| "unbounded".into())
    ));
    if r.failed_blocks > 0 {
        s.push_str(&format!(
            "\n{} blocks could not be fetched",
            r.failed_blocks
        ));
    }
    if let Some(e) = &r.error {
        s.push_str(&format!("\nerror: {e}"));
    }
    s.push_str(&format!(
        "\npinned in the cache as `{}` (`horcrux cache pins`)",
        r.owner
    ));
    s
}

//! `horcrux stats [MOUNT|VOLUME]`: a mount daemon's counters on a terminal (the figures its
//! `--metrics` endpoint serves), asked over the control socket.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use horcrux::util::human_size;
use horcrux_proto::control::{HistogramFigures, Request, Response, StatsReport};

use crate::cmd::changes::DaemonArgs;
use crate::mounts::{self, Target};

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The mountpoint of the volume, any path inside it, or a Docker volume name [default: the
    /// current directory]
    pub path: Option<PathBuf>,
    /// Print the daemon's report as JSON (counters since it started; latencies as histograms
    /// in microseconds)
    #[arg(long)]
    pub json: bool,
    /// Print again every SECS seconds (with rates since the previous report) until interrupted
    #[arg(long, value_name = "SECS", value_parser = parse_watch)]
    pub watch: Option<f64>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

fn parse_watch(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (0.1..=86_400.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "`{s}` is not an interval: give seconds between 0.1 and 86400"
        )),
    }
}

pub fn run(a: StatsArgs) -> anyhow::Result<()> {
    let loc = mounts::locate(&Target::from_arg(a.path.as_deref()))?;
    let mut prev: Option<StatsReport> = None;
    loop {
        let r = match mounts::request(&loc, &Request::Stats, a.daemon.timeout)? {
            Response::Stats(r) => *r,
            other => bail!(
                "the daemon of {} answered with something else than its figures ({other:?}); \
                 it may run an older horcrux: unmount and mount again with this one",
                loc.mountpoint.display()
            ),
        };
        let mut out = std::io::stdout().lock();
        if a.json {
            serde_json::to_writer(&mut out, &r)?;
            writeln!(out)?;
        } else {
            if a.watch.is_some() {
                writeln!(out)?;
            }
            write!(out, "{}", render(&r, prev.as_ref()))?;
        }
        out.flush()?;
        let Some(secs) = a.watch else {
            return Ok(());
        };
        prev = Some(r);
        std::thread::sleep(Duration::from_secs_f64(secs));
    }
}

/// An upper bound for quantile `q` of a histogram: the bound of the bucket it falls in.
fn quantile(h: &HistogramFigures, q: f64) -> Option<String> {
    if h.count == 0 {
        return None;
    }
    let want = (h.count as f64 * q).ceil().max(1.0) as u64;
    let mut cum = 0;
    for (i, n) in h.buckets.iter().enumerate() {
        cum += n;
        if cum >= want {
            return Some(match h.bounds_us.get(i) {
                Some(b) => format!("≤ {}", micros(*b)),
                None => format!("> {}", micros(*h.bounds_us.last()?)),
            });
        }
    }
    None
}

fn micros(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.3} s", us as f64 / 1e6)
    } else if us >= 1_000 {
        format!("{:.1} ms", us as f64 / 1e3)
    } else {
        format!("{us} µs")
    }
}

fn latency(h: &HistogramFigures) -> String {
    match (quantile(h, 0.5), quantile(h, 0.99)) {
        (Some(p50), Some(p99)) => format!(
            "p50 {p50}, p99 {p99}, mean {} over {}",
            micros(h.sum_us / h.count.max(1)),
            h.count
        ),
        _ => "none yet".into(),
    }
}

fn errors(e: &std::collections::BTreeMap<String, u64>) -> String {
    let v: Vec<String> = e
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, s % 3600 / 60),
    }
}

/// The report for people; with `prev`, rates since it.
pub fn render(r: &StatsReport, prev: Option<&StatsReport>) -> String {
    let mut o = String::new();
    let mut line = |s: String| {
        o.push_str(&s);
        o.push('\n');
    };
    let short = &r.commit[..r.commit.len().min(12)];
    line(format!(
        "volume    {} @ {short} on {} (pid {}, up {}){}",
        r.volume,
        r.mountpoint,
        r.pid,
        duration(r.uptime_ms),
        r.metrics_addr
            .as_ref()
            .map(|a| format!(", metrics http://{a}/metrics"))
            .unwrap_or_default()
    ));
    let rd = &r.reads;
    let total = rd.hit_bytes + rd.miss_bytes;
    let ratio = if total > 0 {
        format!(
            ", {:.1}% of bytes from the cache",
            rd.hit_bytes as f64 * 100.0 / total as f64
        )
    } else {
        String::new()
    };
    line(format!(
        "reads     hits {} blocks ({}), misses {} blocks ({}){ratio}",
        rd.hit_blocks,
        human_size(rd.hit_bytes),
        rd.miss_blocks,
        human_size(rd.miss_bytes)
    ));
    let f = &r.fetch;
    let rate = prev
        .filter(|p| r.uptime_ms > p.uptime_ms)
        .map(|p| {
            let secs = (r.uptime_ms - p.uptime_ms) as f64 / 1e3;
            format!(
                ", {}/s now",
                human_size((f.bytes.saturating_sub(p.fetch.bytes) as f64 / secs) as u64)
            )
        })
        .unwrap_or_default();
    line(format!(
        "fetched   {} blocks ({}){rate}; {} ahead of readers, {} in flight, {} shared waits",
        f.blocks,
        human_size(f.bytes),
        f.background_blocks,
        f.inflight,
        f.shared_waits
    ));
    line(format!("          latency {}", latency(&f.latency)));
    line(format!(
        "          errors: {}; verify failures {}",
        errors(&f.errors),
        f.verify_failures
    ));
    for s in &r.sources {
        line(format!(
            "source    {}: {} requests, {}, latency {}; errors: {}",
            s.source,
            s.requests,
            human_size(s.bytes),
            latency(&s.latency),
            errors(&s.errors)
        ));
    }
    let c = &r.cache;
    line(format!(
        "cache     {} of {}, {} chunks; pinned {}; evicted {} chunks ({}) by this mount",
        human_size(c.bytes),
        c.limit.map_or("no bound".into(), human_size),
        c.chunks,
        human_size(c.pinned_bytes),
        c.evicted_chunks,
        human_size(c.evicted_bytes)
    ));
    if c.direct_bytes > 0 {
        line(format!(
            "          {} written by this mount, {} of it bypassing the page cache",
            human_size(c.inserted_bytes),
            human_size(c.direct_bytes)
        ));
    }
    if let Some(p) = &r.passthrough {
        line(if p.active {
            format!(
                "passthru  on: {} opens served by the kernel from {} backing file(s); {} opens \
                 through the daemon (file not yet entirely cached)",
                p.opens, p.registered, p.not_cached
            )
        } else {
            "passthru  off: every read goes through the daemon (see the log for why)".into()
        });
    }
    match &r.overlay {
        Some(ov) => line(format!(
            "overlay   {} in {} file(s) of their own",
            human_size(ov.bytes),
            ov.files
        )),
        None => line("overlay   none (read-only)".into()),
    }
    if let Some(p) = &r.prefetch {
        line(format!(
            "prefetch  {}: {} of {} present, {} fetched, {} blocks failed",
            p.state,
            human_size(p.present_bytes),
            human_size(p.total_bytes),
            human_size(p.fetched_bytes),
            p.failed_blocks
        ));
    }
    let mut ops: Vec<_> = r.ops.iter().collect();
    ops.sort_by(|a, b| b.calls.cmp(&a.calls).then(a.op.cmp(&b.op)));
    for op in ops {
        line(format!(
            "op        {:<12} {:>10} calls {:>6} errors  latency {}",
            op.op,
            op.calls,
            op.errors,
            latency(&op.latency)
        ));
    }
    o
}

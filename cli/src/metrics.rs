//! `--metrics ADDR`: the Prometheus endpoint of `mount`, `serve` and `plugin`, and the
//! conversions from the core's counters to the control protocol's [`StatsReport`] (which is
//! also what `horcrux stats` prints).
//!
//! The endpoint is a minimal HTTP/1.1 responder on the process's tokio runtime: `GET /metrics`
//! answers the text exposition format (version 0.0.4), anything else 404/405, one request per
//! connection. Figures are gathered on the blocking pool at each scrape (they read the cache
//! index, and the plugin asks its mount daemons over their control sockets); nothing is kept
//! between scrapes. The endpoint has no authentication: bind it to loopback or a private
//! network (it names volumes and source URLs, never credentials).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use horcrux::metrics::{ErrorKind, HistogramSnapshot, OpSnapshot, SourceSnapshot};
use horcrux_proto::control::{
    CacheFigures, FetchFigures, HistogramFigures, OpFigures, ReadFigures, SourceFigures,
    StatsReport,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// Core counters → wire figures

pub fn histogram(h: &HistogramSnapshot) -> HistogramFigures {
    HistogramFigures {
        bounds_us: h.bounds_us.clone(),
        buckets: h.buckets.clone(),
        sum_us: h.sum_us,
        count: h.count,
    }
}

pub fn errors(e: &[(ErrorKind, u64)]) -> BTreeMap<String, u64> {
    e.iter().map(|(k, n)| (k.name().to_string(), *n)).collect()
}

pub fn source(s: &SourceSnapshot) -> SourceFigures {
    SourceFigures {
        source: s.source.clone(),
        requests: s.requests,
        bytes: s.bytes,
        errors: errors(&s.errors),
        latency: histogram(&s.latency),
    }
}

pub fn op(o: &OpSnapshot) -> OpFigures {
    OpFigures {
        op: o.op.clone(),
        calls: o.calls,
        errors: o.errors,
        latency: histogram(&o.latency),
    }
}

/// Read, fetch and per-source figures of a fetcher.
pub fn fetcher_figures(
    f: &horcrux::fetch::Fetcher,
) -> (ReadFigures, FetchFigures, Vec<SourceFigures>) {
    use std::sync::atomic::Ordering::Relaxed;
    let m = f.metrics();
    let reads = ReadFigures {
        hit_blocks: m.hit_blocks.load(Relaxed),
        hit_bytes: m.hit_bytes.load(Relaxed),
        miss_blocks: m.miss_blocks.load(Relaxed),
        miss_bytes: m.miss_bytes.load(Relaxed),
    };
    let fetch = FetchFigures {
        blocks: m.blocks_fetched.load(Relaxed),
        bytes: m.bytes_fetched.load(Relaxed),
        background_blocks: m.background_blocks.load(Relaxed),
        shared_waits: m.shared_waits.load(Relaxed),
        inflight: f.inflight() as u64,
        verify_failures: m.verify_failures.load(Relaxed),
        errors: errors(&m.errors.snapshot()),
        latency: histogram(&m.fetch_latency.snapshot()),
    };
    let sources = f.source().source_metrics().iter().map(source).collect();
    (reads, fetch, sources)
}

/// Sizes and eviction counters of a cache.
pub fn cache_figures(cache: &horcrux::cache::Cache) -> CacheFigures {
    let mut c = CacheFigures::default();
    match cache.stats() {
        Ok(s) => {
            c.bytes = s.bytes + s.assembled_bytes;
            c.limit = s.max_size;
            c.chunks = s.chunks;
            c.evicted_chunks = s.evicted_chunks;
            c.evicted_bytes = s.evicted_bytes;
            c.inserted_bytes = s.inserted_bytes;
            c.direct_bytes = cache.direct_write_bytes();
        }
        Err(e) => tracing::warn!(error = %e, "metrics: reading the cache index failed"),
    }
    match cache.pin_summaries() {
        Ok(p) => c.pinned_bytes = p.iter().map(|s| s.bytes_present).sum(),
        Err(e) => tracing::warn!(error = %e, "metrics: reading the cache pins failed"),
    }
    c
}

// ---------------------------------------------------------------------------------------------
// Text exposition

/// Samples grouped by metric family, families in the order first seen: the text format wants
/// all samples of a family together, and the plugin adds one volume after another.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<Family>,
}

#[derive(Debug)]
struct Family {
    name: String,
    help: &'static str,
    kind: &'static str,
    samples: String,
}

/// Label pairs of a sample.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn label_text(labels: Labels<'_>, extra: Option<(&str, &str)>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{}\"", escape(v)));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

impl Exposition {
    fn family(&mut self, name: &str, help: &'static str, kind: &'static str) -> &mut String {
        let i = match self.families.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                self.families.push(Family {
                    name: name.to_string(),
                    help,
                    kind,
                    samples: String::new(),
                });
                self.families.len() - 1
            }
        };
        &mut self.families[i].samples
    }

    pub fn counter(&mut self, name: &str, help: &'static str, labels: Labels<'_>, v: u64) {
        let l = label_text(labels, None);
        let _ = writeln!(self.family(name, help, "counter"), "{name}{l} {v}");
    }

    pub fn gauge(&mut self, name: &str, help: &'static str, labels: Labels<'_>, v: f64) {
        let l = label_text(labels, None);
        let _ = writeln!(self.family(name, help, "gauge"), "{name}{l} {v}");
    }

    /// A histogram in seconds from one in microseconds.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &'static str,
        labels: Labels<'_>,
        h: &HistogramFigures,
    ) {
        let out = self.family(name, help, "histogram");
        let mut cum = 0;
        for (i, n) in h.buckets.iter().enumerate() {
            cum += n;
            let le = match h.bounds_us.get(i) {
                Some(b) => format!("{}", *b as f64 / 1e6),
                None => "+Inf".to_string(),
            };
            let l = label_text(labels, Some(("le", &le)));
            let _ = writeln!(out, "{name}_bucket{l} {cum}");
        }
        let l = label_text(labels, None);
        let _ = writeln!(out, "{name}_sum{l} {}", h.sum_us as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{l} {}", h.count);
    }

    pub fn finish(self) -> String {
        let mut s = String::new();
        for f in self.families {
            let _ = writeln!(s, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(s, "# TYPE {} {}", f.name, f.kind);
            s.push_str(&f.samples);
        }
        s
    }
}

/// Read, fetch and source figures (shared by mount and serve).
pub fn render_fetch(
    e: &mut Exposition,
    l: Labels<'_>,
    reads: &ReadFigures,
    fetch: &FetchFigures,
    sources: &[SourceFigures],
) {
    e.counter(
        "horcrux_cache_hit_blocks_total",
        "Blocks readers got from the local cache",
        l,
        reads.hit_blocks,
    );
    e.counter(
        "horcrux_cache_hit_bytes_total",
        "Bytes readers got from the local cache",
        l,
        reads.hit_bytes,
    );
    e.counter(
        "horcrux_cache_miss_blocks_total",
        "Blocks readers waited for from a source",
        l,
        reads.miss_blocks,
    );
    e.counter(
        "horcrux_cache_miss_bytes_total",
        "Bytes of reads that waited for a source",
        l,
        reads.miss_bytes,
    );
    e.counter(
        "horcrux_fetch_blocks_total",
        "Blocks fetched from sources and verified",
        l,
        fetch.blocks,
    );
    e.counter(
        "horcrux_fetch_bytes_total",
        "Bytes fetched from sources and verified",
        l,
        fetch.bytes,
    );
    e.counter(
        "horcrux_fetch_background_blocks_total",
        "Blocks fetched ahead of readers (chunk fill, prefetch window)",
        l,
        fetch.background_blocks,
    );
    e.counter(
        "horcrux_fetch_shared_waits_total",
        "Block requests that joined a fetch already in flight",
        l,
        fetch.shared_waits,
    );
    e.gauge(
        "horcrux_fetch_inflight",
        "Block fetches in flight now",
        l,
        fetch.inflight as f64,
    );
    e.counter(
        "horcrux_verify_failures_total",
        "Blocks whose bytes did not match their hash (refused, never cached)",
        l,
        fetch.verify_failures,
    );
    for (kind, n) in &fetch.errors {
        let mut ll = l.to_vec();
        ll.push(("kind", kind));
        e.counter(
            "horcrux_fetch_errors_total",
            "Block fetches that failed after every mirror and retry, by kind",
            &ll,
            *n,
        );
    }
    e.histogram(
        "horcrux_fetch_duration_seconds",
        "Time to fetch one block, fall-overs and retries included",
        l,
        &fetch.latency,
    );
    for s in sources {
        let mut ll = l.to_vec();
        ll.push(("source", &s.source));
        e.counter(
            "horcrux_source_requests_total",
            "Requests to a source (one per attempt)",
            &ll,
            s.requests,
        );
        e.counter(
            "horcrux_source_bytes_total",
            "Bytes received from a source",
            &ll,
            s.bytes,
        );
        e.histogram(
            "horcrux_source_request_duration_seconds",
            "Duration of one request to a source",
            &ll,
            &s.latency,
        );
        for (kind, n) in &s.errors {
            let mut lk = ll.clone();
            lk.push(("kind", kind));
            e.counter(
                "horcrux_source_errors_total",
                "Failed requests to a source, by kind",
                &lk,
                *n,
            );
        }
    }
}

pub fn render_cache(e: &mut Exposition, l: Labels<'_>, c: &CacheFigures) {
    e.gauge(
        "horcrux_cache_size_bytes",
        "Bytes held by the cache directory",
        l,
        c.bytes as f64,
    );
    if let Some(limit) = c.limit {
        e.gauge(
            "horcrux_cache_limit_bytes",
            "Bound on the cache (--cache-size)",
            l,
            limit as f64,
        );
    }
    e.gauge(
        "horcrux_cache_chunks",
        "Chunks with blocks in the cache",
        l,
        c.chunks as f64,
    );
    e.gauge(
        "horcrux_cache_pinned_bytes",
        "Cached bytes pinned by volumes (horcrux prefetch)",
        l,
        c.pinned_bytes as f64,
    );
    e.counter(
        "horcrux_cache_evictions_total",
        "Chunks this process evicted to keep the bound",
        l,
        c.evicted_chunks,
    );
    e.counter(
        "horcrux_cache_evicted_bytes_total",
        "Bytes this process evicted to keep the bound",
        l,
        c.evicted_bytes,
    );
    e.counter(
        "horcrux_cache_inserted_bytes_total",
        "Bytes this process wrote into the cache",
        l,
        c.inserted_bytes,
    );
    e.counter(
        "horcrux_cache_direct_bytes_total",
        "Of the bytes written into the cache, those that bypassed the page cache (O_DIRECT)",
        l,
        c.direct_bytes,
    );
}

/// A mount daemon's report, every sample labelled with its volume.
pub fn render_mount(e: &mut Exposition, r: &StatsReport, volume_label: &str) {
    let l: &[(&str, &str)] = &[("volume", volume_label)];
    e.gauge(
        "horcrux_mount_info",
        "A mounted volume (always 1; the labels say which commit)",
        &[("volume", volume_label), ("commit", &r.commit)],
        1.0,
    );
    e.gauge(
        "horcrux_uptime_seconds",
        "Seconds since the daemon started",
        l,
        r.uptime_ms as f64 / 1e3,
    );
    render_fetch(e, l, &r.reads, &r.fetch, &r.sources);
    render_cache(e, l, &r.cache);
    if let Some(o) = &r.overlay {
        e.gauge(
            "horcrux_overlay_bytes",
            "Disk used by the volume's local changes",
            l,
            o.bytes as f64,
        );
        e.gauge(
            "horcrux_overlay_files",
            "Files with content of their own in the overlay",
            l,
            o.files as f64,
        );
    }
    if let Some(p) = &r.passthrough {
        e.gauge(
            "horcrux_passthrough_active",
            "1 if fully cached files are opened with FUSE passthrough, 0 if every read goes through the daemon",
            l,
            if p.active { 1.0 } else { 0.0 },
        );
        e.counter(
            "horcrux_passthrough_opens_total",
            "Opens the kernel serves from a backing file without the daemon",
            l,
            p.opens,
        );
        e.counter(
            "horcrux_passthrough_backing_files_total",
            "Backing files registered with the kernel",
            l,
            p.registered,
        );
        e.counter(
            "horcrux_passthrough_not_cached_total",
            "Read-only opens served by the daemon because the file was not entirely cached yet",
            l,
            p.not_cached,
        );
    }
    for o in &r.ops {
        let ll: &[(&str, &str)] = &[("volume", volume_label), ("op", &o.op)];
        e.counter(
            "horcrux_fuse_operations_total",
            "Filesystem operations the kernel asked, by kind",
            ll,
            o.calls,
        );
        e.counter(
            "horcrux_fuse_errors_total",
            "Filesystem operations answered with an error, by kind",
            ll,
            o.errors,
        );
        e.histogram(
            "horcrux_fuse_operation_duration_seconds",
            "Time to answer one filesystem operation",
            ll,
            &o.latency,
        );
    }
    if let Some(p) = &r.prefetch {
        let ls: &[(&str, &str)] = &[("volume", volume_label), ("state", &p.state)];
        e.gauge(
            "horcrux_prefetch_state",
            "The volume's prefetch job (1 for its current state)",
            ls,
            1.0,
        );
        e.gauge(
            "horcrux_prefetch_total_bytes",
            "Bytes the prefetch job hydrates",
            l,
            p.total_bytes as f64,
        );
        e.gauge(
            "horcrux_prefetch_present_bytes",
            "Bytes of the prefetch job present in the cache",
            l,
            p.present_bytes as f64,
        );
        e.counter(
            "horcrux_prefetch_fetched_bytes_total",
            "Bytes the prefetch job fetched",
            l,
            p.fetched_bytes,
        );
        e.gauge(
            "horcrux_prefetch_failed_blocks",
            "Blocks the prefetch job could not fetch",
            l,
            p.failed_blocks as f64,
        );
    }
}

/// `horcrux serve`: peer requests by kind, bytes served, and the read-through fetchers'
/// figures (labelled by repository and block size) and cache.
pub fn render_serve(
    e: &mut Exposition,
    backend: &horcrux::serve::NodeBackend,
    cache: &horcrux::cache::Cache,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let m = backend.metrics();
    for o in m.requests.0.snapshot() {
        let l: &[(&str, &str)] = &[("kind", &o.op)];
        e.counter(
            "horcrux_peer_requests_total",
            "Peer requests served, by kind",
            l,
            o.calls,
        );
        e.counter(
            "horcrux_peer_errors_total",
            "Peer requests answered with an error, by kind",
            l,
            o.errors,
        );
        e.histogram(
            "horcrux_peer_request_duration_seconds",
            "Time to answer one peer request (a range: until its bytes are ready)",
            l,
            &histogram(&o.latency),
        );
    }
    e.counter(
        "horcrux_peer_served_bytes_total",
        "Bytes of objects served to peers",
        &[],
        m.bytes_served.load(Relaxed),
    );
    e.counter(
        "horcrux_peer_cache_hits_total",
        "Chunk ranges served from this node's cache",
        &[],
        m.cache_hits.load(Relaxed),
    );
    for ((repo, bs), f) in backend.fetchers() {
        let (reads, fetch, sources) = fetcher_figures(&f);
        let bs = bs.to_string();
        render_fetch(
            e,
            &[("repo", &repo), ("block_size", &bs)],
            &reads,
            &fetch,
            &sources,
        );
    }
    render_cache(e, &[], &cache_figures(cache));
}

/// `horcrux plugin`: the figures of every volume mount daemon it runs, asked over their
/// control sockets at each scrape and labelled with the Docker volume name.
pub fn render_plugin(e: &mut Exposition, volumes: &[(String, std::path::PathBuf)]) {
    for (name, socket) in volumes {
        let r = horcrux_proto::control::call(
            socket,
            &horcrux_proto::control::Request::Stats,
            Duration::from_secs(5),
        );
        let ok = match r {
            Ok(horcrux_proto::control::Response::Stats(report)) => {
                render_mount(e, &report, name);
                true
            }
            Ok(other) => {
                tracing::warn!(volume = %name, answer = ?other, "metrics: the mount daemon did not answer with its figures (an older horcrux?)");
                false
            }
            Err(err) => {
                tracing::warn!(volume = %name, error = %err, "metrics: the mount daemon did not answer");
                false
            }
        };
        e.gauge(
            "horcrux_volume_up",
            "1 if the volume's mount daemon answered this scrape",
            &[("volume", name)],
            if ok { 1.0 } else { 0.0 },
        );
    }
    e.gauge(
        "horcrux_plugin_mounted_volumes",
        "Volumes the plugin has mounted now",
        &[],
        volumes.len() as f64,
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// Gathers the figures of one scrape, on the blocking pool.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Longest request head read; scrapers send a few hundred bytes.
const MAX_HEAD: usize = 16 << 10;

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Bind `addr` for [`start`]: done first, so a bad address fails a command before it
/// mounts or serves anything.
pub fn bind(addr: &str) -> anyhow::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr).with_context(|| {
        format!("--metrics {addr}: cannot listen there (give HOST:PORT, e.g. 127.0.0.1:9184)")
    })?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// [`bind`] and [`start`].
#[cfg(test)]
pub fn serve(
    addr: &str,
    runtime: &tokio::runtime::Handle,
    render: Render,
) -> anyhow::Result<SocketAddr> {
    start(bind(addr)?, runtime, render)
}

/// Answer `GET /metrics` on `listener` with `render()`, on `runtime`, until the process ends.
pub fn start(
    std_listener: std::net::TcpListener,
    runtime: &tokio::runtime::Handle,
    render: Render,
) -> anyhow::Result<SocketAddr> {
    let bound = std_listener.local_addr()?;
    let listener = {
        let _g = runtime.enter();
        tokio::net::TcpListener::from_std(std_listener)?
    };
    runtime.spawn(async move {
        loop {
            let (conn, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "metrics: accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let render = render.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(conn, render).await {
                    tracing::debug!(%peer, error = %e, "metrics: connection ended badly");
                }
            });
        }
    });
    tracing::info!(addr = %bound, "metrics on http://{bound}/metrics");
    Ok(bound)
}

async fn answer(mut conn: tokio::net::TcpStream, render: Render) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = tokio::time::timeout(READ_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(head.windows(4).any(|w| w == b"\r\n\r\n"))
    })
    .await
    .unwrap_or(Ok(false))?;
    let line = head
        .split(|b| *b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).trim_end().to_string())
        .unwrap_or_default();
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = if !complete {
        ("400 Bad Request", "text/plain", "bad request\n".to_string())
    } else if method != "GET" && method != "HEAD" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "only GET /metrics\n".to_string(),
        )
    } else if path != "/metrics" {
        ("404 Not Found", "text/plain", "try /metrics\n".to_string())
    } else {
        let text = tokio::task::spawn_blocking(move || render())
            .await
            .map_err(std::io::Error::other)?;
        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", text)
    };
    let mut resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        resp.extend_from_slice(body.as_bytes());
    }
    conn.write_all(&resp).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_grouped_and_histograms_cumulative() {
        let mut e = Exposition::default();
        let h = HistogramFigures {
            bounds_us: vec![1000, 10_000],
            buckets: vec![1, 2, 3],
            sum_us: 1_500_000,
            count: 6,
        };
        e.counter("a_total", "A", &[("volume", "x")], 1);
        e.histogram("h_seconds", "H", &[("volume", "x")], &h);
        e.counter("a_total", "A", &[("volume", "y\"z")], 2);
        let t = e.finish();
        let expect = "# HELP a_total A\n# TYPE a_total counter\na_total{volume=\"x\"} 1\n\
            a_total{volume=\"y\\\"z\"} 2\n# HELP h_seconds H\n# TYPE h_seconds histogram\n\
            h_seconds_bucket{volume=\"x\",le=\"0.001\"} 1\n\
            h_seconds_bucket{volume=\"x\",le=\"0.01\"} 3\n\
            h_seconds_bucket{volume=\"x\",le=\"+Inf\"} 6\n\
            h_seconds_sum{volume=\"x\"} 1.5\nh_seconds_count{volume=\"x\"} 6\n";
        assert_eq!(t, expect);
    }

    #[test]
    fn http_answers_metrics_and_refuses_the_rest() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let addr = serve("127.0.0.1:0", rt.handle(), Arc::new(|| "x 1\n".to_string())).unwrap();
        let get = |req: &str| {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        let ok = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("version=0.0.4"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nx 1\n"), "{ok}");
        assert!(get("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get("POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(serve("nonsense", rt.handle(), Arc::new(String::new)).is_err());
    }
}

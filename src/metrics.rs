//! Counters and latency histograms the core keeps for `horcrux stats` and the Prometheus
//! endpoint (`--metrics`). Only numbers live here: formatting them for people or for Prometheus
//! is the CLI's job, so the core stays free of any HTTP or exposition format.
//!
//! Everything is updated on the data path, so everything is lock-free: relaxed atomic adds.
//! A snapshot is a set of loads taken one after another, not one atomic picture; a scrape may
//! see a request counted in `count` but not yet in its bucket. Scrapers tolerate that.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Upper bounds of the latency buckets, in microseconds: from 100 µs (a cached block on a
/// local disk) to 30 s (the default request timeout). The last bucket (`+Inf`) is implicit.
pub const LATENCY_BOUNDS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 10_000_000, 30_000_000,
];

/// A latency histogram with the fixed bounds [`LATENCY_BOUNDS_US`].
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last one counts what is above every bound.
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

/// A histogram as read at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Upper bounds in microseconds, as [`LATENCY_BOUNDS_US`].
    pub bounds_us: Vec<u64>,
    /// Observations per bucket (not cumulative), one more than `bounds_us` (the `+Inf` one).
    pub buckets: Vec<u64>,
    pub sum_us: u64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = LATENCY_BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds_us: LATENCY_BOUNDS_US.to_vec(),
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

impl HistogramSnapshot {
    /// Add another snapshot with the same bounds (several fetchers of one `serve`).
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        if self.buckets.is_empty() {
            *self = other.clone();
            return;
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.sum_us += other.sum_us;
        self.count += other.count;
    }
}

/// What kind of failure an error was, for `errors_total{kind=...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No answer within the bound.
    Timeout,
    /// The key is not there.
    NotFound,
    /// An I/O or network error.
    Io,
    /// Bytes that did not match their hash.
    Verify,
    /// Refused: permission, credentials, certificate.
    Permission,
    /// Anything else (a protocol error, an unsupported operation).
    Other,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 6] = [
        ErrorKind::Timeout,
        ErrorKind::NotFound,
        ErrorKind::Io,
        ErrorKind::Verify,
        ErrorKind::Permission,
        ErrorKind::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Io => "io",
            ErrorKind::Verify => "verify",
            ErrorKind::Permission => "permission",
            ErrorKind::Other => "other",
        }
    }

    fn index(self) -> usize {
        ErrorKind::ALL
            .iter()
            .position(|k| *k == self)
            .expect("listed")
    }
}

/// Failures counted by [`ErrorKind`].
#[derive(Debug, Default)]
pub struct ErrorCounts([AtomicU64; 6]);

impl ErrorCounts {
    pub fn add(&self, kind: ErrorKind) {
        self.0[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// `(kind, count)` for every kind, zeros included (so series exist from the start).
    pub fn snapshot(&self) -> Vec<(ErrorKind, u64)> {
        ErrorKind::ALL
            .iter()
            .map(|k| (*k, self.0[k.index()].load(Ordering::Relaxed)))
            .collect()
    }
}

/// Requests to one store of a mirror set (one attempt each; a fall-over to the next mirror is
/// a request to that one).
#[derive(Debug, Default)]
pub struct SourceMetrics {
    pub requests: AtomicU64,
    /// Bytes received by successful reads.
    pub bytes: AtomicU64,
    pub errors: ErrorCounts,
    /// Duration of every attempt, failed ones included.
    pub latency: Histogram,
}

/// [`SourceMetrics`] of one store as read at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceSnapshot {
    /// The store's `describe()`: never holds credentials.
    pub source: String,
    pub requests: u64,
    pub bytes: u64,
    pub errors: Vec<(ErrorKind, u64)>,
    pub latency: HistogramSnapshot,
}

impl SourceMetrics {
    pub fn snapshot(&self, source: String) -> SourceSnapshot {
        SourceSnapshot {
            source,
            requests: self.requests.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            errors: self.errors.snapshot(),
            latency: self.latency.snapshot(),
        }
    }
}

/// Calls of named operations (the filesystem operations of a mount: `lookup`, `read`...):
/// count, failures and latency per name. The names are fixed at construction, so recording
/// is a short scan and atomic adds.
#[derive(Debug)]
pub struct OpMetrics {
    names: &'static [&'static str],
    calls: Vec<AtomicU64>,
    errors: Vec<AtomicU64>,
    latency: Vec<Histogram>,
}

/// One operation's figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpSnapshot {
    pub op: String,
    pub calls: u64,
    pub errors: u64,
    pub latency: HistogramSnapshot,
}

/// Times one call of an operation; recorded when dropped.
#[derive(Debug)]
pub struct OpTimer<'a> {
    ops: &'a OpMetrics,
    i: Option<usize>,
    start: Instant,
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.i {
            self.ops.calls[i].fetch_add(1, Ordering::Relaxed);
            self.ops.latency[i].observe(self.start.elapsed());
        }
    }
}

impl OpMetrics {
    /// Operations called `names`; others are not counted.
    pub fn new(names: &'static [&'static str]) -> Self {
        Self {
            names,
            calls: names.iter().map(|_| AtomicU64::new(0)).collect(),
            errors: names.iter().map(|_| AtomicU64::new(0)).collect(),
            latency: names.iter().map(|_| Histogram::default()).collect(),
        }
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| *n == name)
    }

    /// Start timing a call of `name`.
    pub fn start(&self, name: &'static str) -> OpTimer<'_> {
        OpTimer {
            ops: self,
            i: self.index(name),
            start: Instant::now(),
        }
    }

    /// A call of `name` failed.
    pub fn error(&self, name: &str) {
        if let Some(i) = self.index(name) {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Operations called at least once.
    pub fn snapshot(&self) -> Vec<OpSnapshot> {
        self.names
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                let calls = self.calls[i].load(Ordering::Relaxed);
                (calls > 0).then(|| OpSnapshot {
                    op: n.to_string(),
                    calls,
                    errors: self.errors[i].load(Ordering::Relaxed),
                    latency: self.latency[i].snapshot(),
                })
            })
            .collect()
    }
}

/// Peer requests served by `horcrux serve` (counted by [`crate::serve::NodeBackend`]).
#[derive(Debug, Default)]
pub struct ServeMetrics {
    /// Per request kind: `get_range`, `get`, `exists`, `list`, `chunks_present`.
    pub requests: ServeRequests,
    /// Bytes of object data answered.
    pub bytes_served: AtomicU64,
    /// Chunk ranges answered from this node's cache.
    pub cache_hits: AtomicU64,
}

/// The request kinds a peer server counts.
pub const SERVE_OPS: &[&str] = &["get_range", "get", "exists", "list", "chunks_present"];

/// [`OpMetrics`] over [`SERVE_OPS`] (a newtype so [`ServeMetrics`] can derive `Default`).
#[derive(Debug)]
pub struct ServeRequests(pub OpMetrics);

impl Default for ServeRequests {
    fn default() -> Self {
        Self(OpMetrics::new(SERVE_OPS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_by_upper_bound() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_micros(101));
        h.observe(Duration::from_secs(3600));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], 1, "100 µs is in the le=100µs bucket");
        assert_eq!(s.buckets[1], 1);
        assert_eq!(*s.buckets.last().unwrap(), 1, "above every bound: +Inf");
        assert_eq!(s.buckets.iter().sum::<u64>(), s.count);
        assert_eq!(s.sum_us, 100 + 101 + 3_600_000_000);
        let mut m = s.clone();
        m.merge(&s);
        assert_eq!(m.count, 6);
        let mut e = HistogramSnapshot::default();
        e.merge(&s);
        assert_eq!(e, s);
    }

    #[test]
    fn ops_count_calls_errors_and_time() {
        let ops = OpMetrics::new(&["lookup", "read"]);
        {
            let _t = ops.start("read");
        }
        {
            let _t = ops.start("read");
            ops.error("read");
        }
        drop(ops.start("unknown"));
        let s = ops.snapshot();
        assert_eq!(s.len(), 1, "only ops that were called: {s:?}");
        assert_eq!((s[0].op.as_str(), s[0].calls, s[0].errors), ("read", 2, 1));
        assert_eq!(s[0].latency.count, 2);
    }

    #[test]
    fn error_counts_list_every_kind() {
        let e = ErrorCounts::default();
        e.add(ErrorKind::Verify);
        e.add(ErrorKind::Verify);
        let s = e.snapshot();
        assert_eq!(s.len(), ErrorKind::ALL.len());
        assert!(s.contains(&(ErrorKind::Verify, 2)));
        assert!(s.contains(&(ErrorKind::Timeout, 0)));
    }
}

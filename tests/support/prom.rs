//! Scraping a `--metrics` endpoint and checking that what it serves is valid Prometheus text
//! exposition (version 0.0.4): a small strict parser, so a test fails on any line a
//! Prometheus server would refuse.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::time::Duration;

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape.
#[derive(Debug, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    /// Family name → type (`counter`, `gauge`, `histogram`...).
    pub types: HashMap<String, String>,
    pub text: String,
}

/// `GET /metrics` from `addr` (HOST:PORT): the body of a 200 answer.
pub fn get(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_string()
}

/// Scrape and parse, panicking on anything that is not valid exposition text.
pub fn scrape(addr: &str) -> Scrape {
    parse(&get(addr))
}

fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => v.parse().ok(),
    }
}

/// Labels inside `{...}` (without the braces), with the format's escapes.
fn parse_labels(s: &str, line: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let eq = s[i..]
            .find('=')
            .unwrap_or_else(|| panic!("label without `=`: {line}"))
            + i;
        let name = &s[i..eq];
        assert!(
            is_name(name) && !name.contains(':'),
            "bad label name {name:?}: {line}"
        );
        assert_eq!(b.get(eq + 1), Some(&b'"'), "label value not quoted: {line}");
        let mut j = eq + 2;
        let mut v = String::new();
        loop {
            match b.get(j) {
                Some(b'\\') => {
                    match b.get(j + 1) {
                        Some(b'\\') => v.push('\\'),
                        Some(b'"') => v.push('"'),
                        Some(b'n') => v.push('\n'),
                        other => panic!("bad escape {other:?}: {line}"),
                    }
                    j += 2;
                }
                Some(b'"') => break,
                Some(_) => {
                    let ch = s[j..].chars().next().unwrap();
                    v.push(ch);
                    j += ch.len_utf8();
                }
                None => panic!("unterminated label value: {line}"),
            }
        }
        assert!(
            out.insert(name.to_string(), v).is_none(),
            "label {name} twice: {line}"
        );
        i = j + 1;
        if b.get(i) == Some(&b',') {
            i += 1;
        } else {
            assert_eq!(i, b.len(), "junk after a label: {line}");
        }
    }
    out
}

/// The family a sample belongs to (histogram samples carry a suffix).
fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.get(base).is_some_and(|t| t == "histogram")
        {
            return base;
        }
    }
    name
}

/// Parse exposition text strictly: every sample's family declared by `# TYPE` before it, a
/// family's samples together, no duplicate series, histograms cumulative with `+Inf` equal to
/// `_count`.
pub fn parse(text: &str) -> Scrape {
    let mut sc = Scrape {
        text: text.to_string(),
        ..Default::default()
    };
    assert!(text.is_empty() || text.ends_with('\n'), "no final newline");
    let mut done_families: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    let mut seen = std::collections::HashSet::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut p = rest.splitn(3, ' ');
            let (kw, name) = (p.next().unwrap(), p.next().unwrap_or(""));
            assert!(is_name(name), "bad metric name in {line:?}");
            match kw {
                "HELP" => {}
                "TYPE" => {
                    let t = p.next().unwrap_or("");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                        "bad type: {line}"
                    );
                    assert!(
                        sc.types.insert(name.to_string(), t.to_string()).is_none(),
                        "TYPE of {name} twice"
                    );
                }
                _ => {}
            }
            continue;
        }
        assert!(!line.starts_with('#'), "comment without a space: {line}");
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value = parse_value(value).unwrap_or_else(|| panic!("bad value: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line}"));
                (n, parse_labels(inner, line))
            }
            None => (series, BTreeMap::new()),
        };
        assert!(is_name(name), "bad metric name: {line}");
        let fam = family_of(name, &sc.types).to_string();
        assert!(
            sc.types.contains_key(&fam),
            "sample before (or without) its # TYPE: {line}"
        );
        if current.as_deref() != Some(fam.as_str()) {
            assert!(
                !done_families.contains(&fam),
                "samples of {fam} are not together"
            );
            if let Some(c) = current.take() {
                done_families.push(c);
            }
            current = Some(fam.clone());
        }
        if sc.types[&fam] == "counter" {
            assert!(value >= 0.0, "negative counter: {line}");
        }
        assert!(
            seen.insert(format!("{name}{labels:?}")),
            "series twice: {line}"
        );
        sc.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    check_histograms(&sc);
    sc
}

fn check_histograms(sc: &Scrape) {
    // Group bucket samples by (family, labels without le).
    let mut groups: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for s in &sc.samples {
        if let Some(base) = s.name.strip_suffix("_bucket")
            && sc.types.get(base).is_some_and(|t| t == "histogram")
        {
            let mut l = s.labels.clone();
            let le = l.remove("le").expect("a bucket has `le`");
            let key = format!("{base}{l:?}");
            groups
                .entry(key)
                .or_default()
                .push((parse_value(&le).expect("le is a number"), s.value));
        }
    }
    for (key, buckets) in groups {
        for w in buckets.windows(2) {
            assert!(w[0].0 < w[1].0, "{key}: buckets not in increasing `le`");
            assert!(w[0].1 <= w[1].1, "{key}: buckets not cumulative");
        }
        let last = buckets.last().unwrap();
        assert!(last.0.is_infinite(), "{key}: no +Inf bucket");
        let base = key.split('{').next().unwrap();
        let labels = &key[base.len()..];
        let count = sc
            .samples
            .iter()
            .find(|s| s.name == format!("{base}_count") && format!("{:?}", s.labels) == labels)
            .unwrap_or_else(|| panic!("{key}: no _count"));
        assert_eq!(count.value, last.1, "{key}: +Inf bucket is not _count");
    }
}

impl Scrape {
    /// The value of the one series `name` whose labels include `labels`; panics if there is
    /// none or several.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let m: Vec<&Sample> = self.matching(name, labels);
        assert_eq!(
            m.len(),
            1,
            "{name} {labels:?}: {} series match in\n{}",
            m.len(),
            self.text
        );
        m[0].value
    }

    /// Sum over every series `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).iter().map(|s| s.value).sum()
    }

    pub fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }
}

/// The parser's own check (called by one test): it accepts valid text and refuses the
/// mistakes a Prometheus server refuses.
pub fn self_test() {
    let good = "# HELP a_total A\n# TYPE a_total counter\na_total{x=\"1\"} 2\n\
        # TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.3\nh_count 2\n";
    let sc = parse(good);
    assert_eq!(sc.value("a_total", &[("x", "1")]), 2.0);
    for bad in [
        "a 1\n",                                                   // no TYPE
        "# TYPE a gauge\na{x=1} 1\n",                              // unquoted
        "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\na{y=\"\"} 2\n", // not together
        "# TYPE a gauge\na 1\na 2\n",                              // duplicate
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
        "# TYPE a gauge\na one\n",
    ] {
        assert!(
            std::panic::catch_unwind(|| parse(bad)).is_err(),
            "accepted: {bad:?}"
        );
    }
}

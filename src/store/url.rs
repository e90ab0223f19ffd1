//! Access URLs: `file:///p` (alias `cp:///p`, or a bare path), `scp://user@host:/p`,
//! `ssh://user@host:port/p`, `s3://bucket/prefix?k=v`, `horcrux://host:port/repo`.
//! Several URLs separated by commas are mirrors, in order of preference.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// One parsed access URL. Never holds secrets: credentials come from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessUrl {
    File {
        path: PathBuf,
    },
    Ssh {
        user: Option<String>,
        host: String,
        port: u16,
        path: String,
    },
    S3 {
        bucket: String,
        prefix: String,
        options: BTreeMap<String, String>,
    },
    Peer {
        host: String,
        port: u16,
        repo: String,
    },
}

/// What is wrong with an access URL, precisely enough to fix it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("empty access URL")]
    Empty,
    #[error(
        "`{url}`: unknown scheme `{scheme}`: use file://, cp://, scp://, ssh://, s3:// or horcrux://"
    )]
    Scheme { url: String, scheme: String },
    #[error("`{url}`: {what}")]
    Bad { url: String, what: String },
}

fn bad(url: &str, what: impl Into<String>) -> UrlError {
    UrlError::Bad {
        url: url.to_string(),
        what: what.into(),
    }
}

/// Parse a comma-separated list of mirrors.
pub fn parse_access(s: &str) -> Result<Vec<AccessUrl>, UrlError> {
    let parts: Vec<&str> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if parts.is_empty() {
        return Err(UrlError::Empty);
    }
    parts.into_iter().map(parse_one).collect()
}

/// Parse one URL.
pub fn parse_one(s: &str) -> Result<AccessUrl, UrlError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(UrlError::Empty);
    }
    let Some((scheme, rest)) = s.split_once("://") else {
        if s.contains(':') && !s.starts_with('/') && !s.starts_with('.') {
            return Err(bad(
                s,
                "not a URL or a path: write file:///path, scp://user@host:/path, ...",
            ));
        }
        return Ok(AccessUrl::File {
            path: PathBuf::from(s),
        });
    };
    match scheme.to_ascii_lowercase().as_str() {
        "file" | "cp" => {
            if !rest.starts_with('/') {
                return Err(bad(
                    s,
                    "the path must be absolute: file:///opt/repo (three slashes), not file://opt/repo",
                ));
            }
            Ok(AccessUrl::File {
                path: PathBuf::from(percent_decode(rest)),
            })
        }
        "scp" | "ssh" => parse_ssh(s, scheme, rest),
        "s3" => parse_s3(s, rest),
        "horcrux" => parse_peer(s, rest),
        other => Err(UrlError::Scheme {
            url: s.to_string(),
            scheme: other.to_string(),
        }),
    }
}

fn parse_ssh(url: &str, scheme: &str, rest: &str) -> Result<AccessUrl, UrlError> {
    let (user, hostpart) = match rest.split_once('@') {
        Some((u, h)) if !u.is_empty() => (Some(u.to_string()), h),
        Some(_) => return Err(bad(url, "empty user name before `@`")),
        None => (None, rest),
    };
    // scp://host:/path (the original's form) or ssh://host[:port]/path
    let (host, port, path) = if let Some((h, p)) = hostpart.split_once(":/") {
        (h, 22, format!("/{p}"))
    } else if let Some(idx) = hostpart.find('/') {
        let (hp, path) = hostpart.split_at(idx);
        let (h, port) = match hp.rsplit_once(':') {
            Some((h, port)) => (h, parse_port(url, port)?),
            None => (hp, 22),
        };
        (h, port, path.to_string())
    } else {
        return Err(bad(
            url,
            format!("missing path: write {scheme}://user@host:/path or ssh://user@host:port/path"),
        ));
    };
    if host.is_empty() {
        return Err(bad(url, "missing host name"));
    }
    if path.len() <= 1 {
        return Err(bad(url, "missing path after the host"));
    }
    Ok(AccessUrl::Ssh {
        user,
        host: host.to_string(),
        port,
        path: percent_decode(&path),
    })
}

fn parse_s3(url: &str, rest: &str) -> Result<AccessUrl, UrlError> {
    let (loc, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (bucket, prefix) = loc.split_once('/').unwrap_or((loc, ""));
    if bucket.is_empty() {
        return Err(bad(url, "missing bucket name: s3://bucket/prefix"));
    }
    let mut options = BTreeMap::new();
    for kv in query.split('&').filter(|q| !q.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, "true"));
        match k {
            "region" | "endpoint" | "path_style" | "allow_http" | "profile" => {}
            _ => {
                return Err(bad(
                    url,
                    format!(
                        "unknown option `{k}`: known are region, endpoint, path_style, allow_http, profile"
                    ),
                ));
            }
        }
        options.insert(k.to_string(), percent_decode(v));
    }
    Ok(AccessUrl::S3 {
        bucket: bucket.to_string(),
        prefix: prefix.trim_matches('/').to_string(),
        options,
    })
}

fn parse_peer(url: &str, rest: &str) -> Result<AccessUrl, UrlError> {
    let (hp, repo) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = match hp.rsplit_once(':') {
        Some((h, p)) => (h, parse_port(url, p)?),
        None => (hp, 7443),
    };
    if host.is_empty() {
        return Err(bad(url, "missing host: horcrux://host:7443/repo"));
    }
    if repo.is_empty() {
        return Err(bad(
            url,
            "missing repository name: horcrux://host:7443/repo",
        ));
    }
    Ok(AccessUrl::Peer {
        host: host.to_string(),
        port,
        repo: repo.to_string(),
    })
}

/// A TCP port a connection can go to: 1-65535 (0 would mean "any" to a listener, nothing here).
fn parse_port(url: &str, p: &str) -> Result<u16, UrlError> {
    match p.parse::<u16>() {
        Ok(0) => Err(bad(url, "port 0 is not valid: give a port from 1 to 65535")),
        Ok(port) => Ok(port),
        Err(_) => Err(bad(url, format!("port `{p}` is not a number 1-65535"))),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        // Work on bytes: a `%` followed by a multi-byte character must not be sliced as text
        // (a slice inside a UTF-8 sequence panics).
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl fmt::Display for AccessUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccessUrl::File { path } => write!(f, "file://{}", path.display()),
            AccessUrl::Ssh {
                user,
                host,
                port,
                path,
            } => {
                let u = user.as_ref().map(|u| format!("{u}@")).unwrap_or_default();
                write!(f, "ssh://{u}{host}:{port}{path}")
            }
            AccessUrl::S3 { bucket, prefix, .. } => write!(f, "s3://{bucket}/{prefix}"),
            AccessUrl::Peer { host, port, repo } => write!(f, "horcrux://{host}:{port}/{repo}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(
            parse_one("file:///opt/x").unwrap(),
            AccessUrl::File {
                path: "/opt/x".into()
            }
        );
        assert_eq!(
            parse_one("cp:///opt/x").unwrap(),
            AccessUrl::File {
                path: "/opt/x".into()
            }
        );
        assert_eq!(
            parse_one("/opt/x").unwrap(),
            AccessUrl::File {
                path: "/opt/x".into()
            }
        );
        assert_eq!(
            parse_one("scp://dev@db:/opt/h").unwrap(),
            AccessUrl::Ssh {
                user: Some("dev".into()),
                host: "db".into(),
                port: 22,
                path: "/opt/h".into()
            }
        );
        assert_eq!(
            parse_one("ssh://dev@db:2222/opt/h").unwrap(),
            AccessUrl::Ssh {
                user: Some("dev".into()),
                host: "db".into(),
                port: 2222,
                path: "/opt/h".into()
            }
        );
        match parse_one("s3://b/amcc?region=garage&endpoint=http://127.0.0.1:3900").unwrap() {
            AccessUrl::S3 {
                bucket,
                prefix,
                options,
            } => {
                assert_eq!(bucket, "b");
                assert_eq!(prefix, "amcc");
                assert_eq!(options["endpoint"], "http://127.0.0.1:3900");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_one("horcrux://10.0.0.5:7443/amcc").unwrap(),
            AccessUrl::Peer {
                host: "10.0.0.5".into(),
                port: 7443,
                repo: "amcc".into()
            }
        );
        assert_eq!(parse_access("/a, file:///b").unwrap().len(), 2);
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = parse_one("ftp://x/y").unwrap_err().to_string();
        assert!(e.contains("unknown scheme `ftp`"), "{e}");
        let e = parse_one("file://opt/x").unwrap_err().to_string();
        assert!(e.contains("absolute"), "{e}");
        let e = parse_one("ssh://u@h:99999/p").unwrap_err().to_string();
        assert!(e.contains("port"), "{e}");
        for zero in ["ssh://u@h:0/p", "horcrux://h:0/repo"] {
            let e = parse_one(zero).unwrap_err().to_string();
            assert!(e.contains("port 0 is not valid"), "{zero}: {e}");
        }
        let e = parse_one("s3://b/p?colour=red").unwrap_err().to_string();
        assert!(e.contains("unknown option `colour`"), "{e}");
        assert!(parse_access(" , ").is_err());
        assert!(parse_one("scp://host").is_err());
        assert!(parse_one("s3:///p").is_err());
    }

    /// Regression (found while writing the fuzz target `access_url`): a `%` before a multi-byte character sliced the
    /// text inside that character and panicked.
    #[test]
    fn percent_before_a_multibyte_character_is_kept() {
        assert_eq!(
            parse_one("file:///a%\u{e9}b").unwrap(),
            AccessUrl::File {
                path: "/a%\u{e9}b".into()
            }
        );
        assert_eq!(
            parse_one("file:///a%4\u{e9}").unwrap(),
            AccessUrl::File {
                path: "/a%4\u{e9}".into()
            }
        );
        assert_eq!(
            parse_one("file:///a%41%2fb").unwrap(),
            AccessUrl::File {
                path: "/aA/b".into()
            }
        );
    }
}

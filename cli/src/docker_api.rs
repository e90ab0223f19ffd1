//! A tiny client of the Docker Engine API: HTTP/1.1 over the engine's Unix socket
//! (`/var/run/docker.sock`, or `DOCKER_HOST=unix:///...`), one request per connection.
//!
//! Just what `horcrux checkout VOLUME` needs: the running containers that use a volume, stop
//! and start one. Called from the CLI only, never from a plugin request handler (the engine
//! waits for the plugin's answer while it would be waiting for the engine).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};

/// The engine's socket: `DOCKER_HOST` when it is a `unix://` URL, else the usual one.
pub fn socket_path() -> PathBuf {
    std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/run/docker.sock"))
}

/// A container as `GET /containers/json` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    /// The first name, without the leading `/`.
    pub name: String,
}

impl Container {
    /// `name (id12)` for people.
    pub fn display(&self) -> String {
        format!("{} ({})", self.name, &self.id[..12.min(self.id.len())])
    }
}

/// The engine at one socket.
#[derive(Debug, Clone)]
pub struct Engine {
    pub socket: PathBuf,
}

impl Engine {
    pub fn new() -> Self {
        Self {
            socket: socket_path(),
        }
    }

    /// One request; the status and the (de-chunked) body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        timeout: Duration,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let mut s = UnixStream::connect(&self.socket).with_context(|| {
            format!(
                "connecting to the Docker engine at {}",
                self.socket.display()
            )
        })?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: docker\r\nUser-Agent: horcrux\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(head.as_bytes())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .with_context(|| format!("reading the engine's answer to {method} {path}"))?;
        parse_response(&raw).map_err(|e| anyhow!("the engine's answer to {method} {path}: {e}"))
    }

    /// The running containers that mount Docker volume `name`.
    pub fn containers_using(&self, volume: &str) -> anyhow::Result<Vec<Container>> {
        let filters = serde_json::json!({ "volume": [volume] }).to_string();
        let path = format!("/containers/json?filters={}", percent_encode(&filters));
        let (status, body) = self.request("GET", &path, Duration::from_secs(60))?;
        if status != 200 {
            bail!("listing containers: {}", error_message(status, &body));
        }
        parse_containers(&body)
    }

    /// Stop a container, `grace` seconds before it is killed. Already stopped is fine.
    pub fn stop(&self, id: &str, grace: u32) -> anyhow::Result<()> {
        let path = format!("/containers/{id}/stop?t={grace}");
        let timeout = Duration::from_secs(u64::from(grace) + 60);
        match self.request("POST", &path, timeout)? {
            (204 | 304, _) => Ok(()),
            (s, body) => bail!("stopping container {id}: {}", error_message(s, &body)),
        }
    }

    /// Start a container. Already running is fine.
    pub fn start(&self, id: &str) -> anyhow::Result<()> {
        let path = format!("/containers/{id}/start");
        match self.request("POST", &path, Duration::from_secs(120))? {
            (204 | 304, _) => Ok(()),
            (s, body) => bail!("starting container {id}: {}", error_message(s, &body)),
        }
    }
}

impl Default for Engine {
    fn default() -> Self {
        Self::new()
    }
}

/// `{"message": "..."}` of an error answer, or the body as text.
fn error_message(status: u16, body: &[u8]) -> String {
    let msg = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    format!("HTTP {status}: {msg}")
}

fn parse_containers(body: &[u8]) -> anyhow::Result<Vec<Container>> {
    let v: serde_json::Value =
        serde_json::from_slice(body).context("the container list is not JSON")?;
    let list = v
        .as_array()
        .ok_or_else(|| anyhow!("the container list is not a JSON array"))?;
    Ok(list
        .iter()
        .filter_map(|c| {
            let id = c["Id"].as_str()?.to_string();
            let name = c["Names"]
                .as_array()
                .and_then(|n| n.first())
                .and_then(|n| n.as_str())
                .map(|n| n.trim_start_matches('/').to_string())
                .unwrap_or_else(|| id[..12.min(id.len())].to_string());
            Some(Container { id, name })
        })
        .collect())
}

/// Query-string encoding of everything but unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Status and body of an HTTP/1.x answer: a Content-Length body, a chunked one, or one that
/// ends with the connection.
fn parse_response(raw: &[u8]) -> io::Result<(u16, Vec<u8>)> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of the header"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let rest = &raw[split + 4..];
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        return Ok((
            status,
            dechunk(rest).ok_or_else(|| bad("bad chunked body"))?,
        ));
    }
    let body = match header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        Some(n) if n <= rest.len() => rest[..n].to_vec(),
        Some(_) => return Err(bad("body shorter than its Content-Length")),
        None => rest.to_vec(),
    };
    Ok((status, body))
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_answers() {
        let r = b"HTTP/1.1 204 No Content\r\nDate: x\r\n\r\n";
        assert_eq!(parse_response(r).unwrap(), (204, vec![]));
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]";
        assert_eq!(parse_response(r).unwrap(), (200, b"[]".to_vec()));
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[{}\r\n1;x=y\r\n]\r\n0\r\n\r\n";
        assert_eq!(parse_response(r).unwrap(), (200, b"[{}]".to_vec()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\nab";
        assert!(parse_response(r).is_err());
    }

    #[test]
    fn parses_the_container_list() {
        let body = br#"[{"Id":"0123456789abcdef","Names":["/web"],"State":"running"},
                        {"Id":"fedcba9876543210","Names":[]}]"#;
        let l = parse_containers(body).unwrap();
        assert_eq!(l[0].name, "web");
        assert_eq!(l[0].display(), "web (0123456789ab)");
        assert_eq!(l[1].name, "fedcba987654");
        assert!(parse_containers(b"{}").is_err());
    }

    #[test]
    fn errors_and_encoding() {
        assert_eq!(
            error_message(404, br#"{"message":"No such container: x"}"#),
            "HTTP 404: No such container: x"
        );
        assert_eq!(error_message(500, b"boom\n"), "HTTP 500: boom");
        assert_eq!(
            percent_encode(r#"{"volume":["v1"]}"#),
            "%7B%22volume%22%3A%5B%22v1%22%5D%7D"
        );
    }
}

//! HTTP/1.1 over a Unix socket, just enough for the Docker engine's plugin client: `POST`
//! requests with a `Content-Length` (or chunked) JSON body, kept-alive connections, and JSON
//! answers. Requests need no `Content-Type` (the engine sends none, or its own media type).
//! One thread per connection: the engine opens a handful, and a slow `Mount` must not hold
//! up `Get`/`List` on another connection.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use crate::protocol::{DispatchReply, VolumeDriver, dispatch};

/// Largest request body accepted (requests are a few hundred bytes).
const MAX_BODY: usize = 1 << 20;
/// Largest request head (request line and headers).
const MAX_HEAD: usize = 64 << 10;

/// Bind the plugin socket at `path`, replacing a stale socket file that nobody answers on.
/// Refuses when another process is listening there.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match UnixListener::bind(path) {
        Ok(l) => return finish_bind(path, l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
        Err(e) => return Err(e),
    }
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is in use: another plugin answers there (stop it first)",
                path.display()
            ),
        ));
    }
    std::fs::remove_file(path)?;
    finish_bind(path, UnixListener::bind(path)?)
}

fn finish_bind(path: &Path, l: UnixListener) -> io::Result<UnixListener> {
    // Only root (the engine) may drive volumes.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serve connections forever (or until accepting fails).
pub fn serve<D: VolumeDriver + Send + Sync + 'static>(
    listener: UnixListener,
    driver: Arc<D>,
) -> io::Result<()> {
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let driver = driver.clone();
        std::thread::Builder::new()
            .name("plugin-conn".into())
            .spawn(move || {
                if let Err(e) = handle(conn, &*driver) {
                    tracing::debug!(error = %e, "plugin connection ended");
                }
            })?;
    }
    Ok(())
}

/// One parsed request.
#[derive(Debug)]
struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
    keep_alive: bool,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Read one line ending in LF (CR stripped), bounded by what is left of `budget`.
fn read_line<R: BufRead>(r: &mut R, budget: &mut usize) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r.take(*budget as u64 + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if n > *budget || buf.last() != Some(&b'\n') {
        return Err(bad("request head too long or truncated"));
    }
    *budget -= n;
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| bad("request head is not UTF-8"))
}

/// Read a request; `None` at a clean end of the connection.
fn read_request<R: BufRead>(r: &mut R) -> io::Result<Option<Request>> {
    let mut budget = MAX_HEAD;
    let line = loop {
        match read_line(r, &mut budget)? {
            None => return Ok(None),
            // Tolerate stray empty lines between requests (RFC 9112 §2.2).
            Some(l) if l.is_empty() => continue,
            Some(l) => break l,
        }
    };
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(format!("malformed request line `{line}`")));
    };
    let mut keep_alive = version != "HTTP/1.0";
    let mut length: Option<usize> = None;
    let mut chunked = false;
    loop {
        let h = read_line(r, &mut budget)?.ok_or_else(|| bad("connection closed in headers"))?;
        if h.is_empty() {
            break;
        }
        let Some((name, value)) = h.split_once(':') else {
            return Err(bad(format!("malformed header `{h}`")));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                length = Some(
                    value
                        .parse()
                        .map_err(|_| bad(format!("bad Content-Length `{value}`")))?,
                )
            }
            "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
            "connection" => {
                let v = value.to_ascii_lowercase();
                if v.contains("close") {
                    keep_alive = false;
                } else if v.contains("keep-alive") {
                    keep_alive = true;
                }
            }
            _ => {}
        }
    }
    let body = if chunked {
        let mut body = Vec::new();
        loop {
            let size_line =
                read_line(r, &mut budget)?.ok_or_else(|| bad("connection closed in a chunk"))?;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad(format!("bad chunk size `{size_line}`")))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while read_line(r, &mut budget)?.is_some_and(|l| !l.is_empty()) {}
                break;
            }
            if body.len() + size > MAX_BODY {
                return Err(bad("request body too large"));
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            read_line(r, &mut budget)?;
        }
        body
    } else {
        let n = length.unwrap_or(0);
        if n > MAX_BODY {
            return Err(bad("request body too large"));
        }
        let mut body = vec![0; n];
        r.read_exact(&mut body)?;
        body
    };
    // Docker sends `/VolumeDriver.Mount`; tolerate a query string or an absolute URI.
    let path = target.split('?').next().unwrap_or(target);
    let path = match path.find("://") {
        Some(i) => path[i + 3..]
            .find('/')
            .map_or("/", |j| &path[i + 3 + j..])
            .to_string(),
        None => path.to_string(),
    };
    Ok(Some(Request {
        method: method.to_string(),
        path,
        body,
        keep_alive,
    }))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Internal Server Error",
    }
}

fn write_reply<W: Write>(w: &mut W, reply: &DispatchReply, keep_alive: bool) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/vnd.docker.plugins.v1+json\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        reply.status,
        reason(reply.status),
        reply.body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    w.write_all(head.as_bytes())?;
    w.write_all(&reply.body)?;
    w.flush()
}

fn handle(conn: UnixStream, driver: &dyn VolumeDriver) -> io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut writer = conn;
    loop {
        let req = match read_request(&mut reader) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let reply = DispatchReply {
                    status: 400,
                    body: serde_json::to_vec(&serde_json::json!({ "Err": e.to_string() }))
                        .expect("json"),
                };
                return write_reply(&mut writer, &reply, false);
            }
            Err(e) => return Err(e),
        };
        let reply = if req.method.eq_ignore_ascii_case("POST") {
            let start = std::time::Instant::now();
            let reply = dispatch(driver, &req.path, &req.body);
            let ms = start.elapsed().as_millis() as u64;
            if reply.status == 200 {
                tracing::info!(endpoint = %req.path, ms, "answered");
            } else {
                tracing::warn!(
                    endpoint = %req.path,
                    status = reply.status,
                    ms,
                    answer = %String::from_utf8_lossy(&reply.body),
                    "refused"
                );
            }
            reply
        } else {
            DispatchReply {
                status: 405,
                body: serde_json::to_vec(&serde_json::json!({
                    "Err": format!("method {} not allowed: plugin endpoints take POST", req.method)
                }))
                .expect("json"),
            }
        };
        write_reply(&mut writer, &reply, req.keep_alive)?;
        if !req.keep_alive {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Request {
        read_request(&mut BufReader::new(s.as_bytes()))
            .unwrap()
            .unwrap()
    }

    #[test]
    fn parses_what_the_engine_sends() {
        let r = parse(
            "POST /VolumeDriver.Get HTTP/1.1\r\nHost: plugin\r\nContent-Length: 13\r\n\r\n{\"Name\":\"v\"}\n",
        );
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/VolumeDriver.Get");
        assert_eq!(r.body, b"{\"Name\":\"v\"}\n");
        assert!(r.keep_alive);
        let r = parse("POST /Plugin.Activate HTTP/1.0\r\n\r\n");
        assert!(r.body.is_empty());
        assert!(!r.keep_alive);
        let r = parse(
            "POST http://plugin/VolumeDriver.List?x=1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        );
        assert_eq!(r.path, "/VolumeDriver.List");
        assert_eq!(r.body, b"{}");
        assert!(
            read_request(&mut BufReader::new(&b""[..]))
                .unwrap()
                .is_none()
        );
        assert!(read_request(&mut BufReader::new(&b"GARBAGE\r\n\r\n"[..])).is_err());
        assert!(
            read_request(&mut BufReader::new(
                &b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"[..]
            ))
            .is_err()
        );
    }
}

//! Real S3-speaking servers on loopback for tests: `moto` (PyPI `moto[server]`, installed by
//! `tests/setup.sh`) always, Garage when a binary is found at `$HORCRUX_GARAGE` or in `PATH`.
//! Each server is a child process on a free port, killed when the handle is dropped.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which implementation is behind the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Moto,
    Garage,
}

/// A running S3 server.
#[derive(Debug)]
pub struct S3Server {
    pub kind: Kind,
    pub port: u16,
    pub region: String,
    /// Keys the server accepts (moto accepts any until [`S3Server::enforce_auth`]).
    pub access_key_id: String,
    pub secret_access_key: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
    garage: Option<PathBuf>,
}

fn python() -> String {
    std::env::var("HORCRUX_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().unwrap().port()
}

/// One HTTP/1.1 request to 127.0.0.1:`port`; returns the status and the body.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {text:.200}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn xml_element(text: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = text.find(&open)? + open.len();
    let len = text[start..].find(&format!("</{name}>"))?;
    Some(text[start..start + len].to_string())
}

/// Whether `moto[server]` can be imported; the reason otherwise.
fn moto_available() -> Result<(), String> {
    let out = Command::new(python())
        .args(["-c", "import moto.server, flask, flask_cors"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// The Garage binary, if one is installed.
pub fn garage_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("HORCRUX_GARAGE") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("garage"))
        .find(|p| p.is_file())
}

impl S3Server {
    /// Start moto. Panics — does not skip — when it is not installed.
    pub fn moto() -> S3Server {
        if let Err(why) = moto_available() {
            panic!(
                "moto[server] is not installed ({why}): run tests/setup.sh \
                 (python3 -m pip install 'moto[server]')"
            );
        }
        let mut s = S3Server {
            kind: Kind::Moto,
            port: free_port(),
            region: "us-east-1".into(),
            access_key_id: "test".into(),
            secret_access_key: "test".into(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
            garage: None,
        };
        s.start();
        s
    }

    /// Start a single-node Garage, if a binary is installed.
    pub fn garage() -> Option<S3Server> {
        let bin = garage_binary()?;
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let rpc = free_port();
        let secret: String = (0..32)
            .map(|i| format!("{:02x}", (i * 37 + 11) % 256))
            .collect();
        std::fs::write(
            dir.path().join("garage.toml"),
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{port}\"\n\
                 root_domain = \".s3.garage.localhost\"\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let mut s = S3Server {
            kind: Kind::Garage,
            port,
            region: "garage".into(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            child: None,
            dir,
            garage: Some(bin),
        };
        s.start();
        let node = s.garage_cli(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().unwrap().to_string();
        s.garage_cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        s.garage_cli(&["layout", "apply", "--version", "1"]);
        let key = s.garage_cli(&["key", "create", "horcrux-test"]);
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
                .unwrap_or_else(|| panic!("no `{name}` in `garage key create` output:\n{key}"))
        };
        s.access_key_id = field("Key ID:");
        s.secret_access_key = field("Secret key:");
        Some(s)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Start (or restart, on the same port) the server and wait until it answers.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::create(self.dir.path().join("server.log")).unwrap();
        let mut cmd = match self.kind {
            Kind::Moto => {
                let mut c = Command::new(python());
                c.args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
                    .arg(self.port.to_string());
                c
            }
            Kind::Garage => {
                let mut c = Command::new(self.garage.as_ref().unwrap());
                c.arg("-c")
                    .arg(self.dir.path().join("garage.toml"))
                    .arg("server");
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", self.kind));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((status, _)) = http(self.port, "GET", "/", &[], b"") {
                if status < 500 || self.kind == Kind::Garage {
                    break;
                }
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{:?} exited ({st}) at start:\n{}", self.kind, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{:?} did not answer on port {} within 60 s:\n{}",
                self.kind,
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kill the server (SIGKILL) and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freeze (SIGSTOP) or thaw (SIGCONT) the server: it keeps its port but stops answering.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let mut start = text.len().saturating_sub(4000);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text[start..].to_string()
    }

    /// Create a bucket the server's keys may use.
    pub fn create_bucket(&self, name: &str) {
        match self.kind {
            Kind::Moto => {
                // moto accepts unsigned requests until authentication is enforced.
                let (status, body) =
                    http(self.port, "PUT", &format!("/{name}"), &[], b"").expect("create bucket");
                assert_eq!(status, 200, "create bucket {name}: {body}");
            }
            Kind::Garage => {
                self.garage_cli(&["bucket", "create", name]);
                self.garage_cli(&[
                    "bucket",
                    "allow",
                    "--read",
                    "--write",
                    "--owner",
                    name,
                    "--key",
                    "horcrux-test",
                ]);
            }
        }
    }

    /// moto only: create an IAM user with full S3 access, then make moto check signatures.
    /// From then on only the returned keys (also stored in `self`) are accepted.
    pub fn enforce_auth(&mut self) -> (String, String) {
        assert_eq!(self.kind, Kind::Moto);
        // While authentication is off, moto routes a request by the service named in the
        // credential scope and does not check the signature.
        let auth = "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20240101/us-east-1/iam/\
                    aws4_request, SignedHeaders=host, Signature=00";
        let form = [
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Authorization", auth),
        ];
        let iam = |body: &str| {
            let (status, text) = http(self.port, "POST", "/", &form, body.as_bytes()).unwrap();
            assert_eq!(status, 200, "IAM {body}: {text}");
            text
        };
        iam("Action=CreateUser&UserName=horcrux&Version=2010-05-08");
        let key = iam("Action=CreateAccessKey&UserName=horcrux&Version=2010-05-08");
        let policy = "%7B%22Version%22%3A%222012-10-17%22%2C%22Statement%22%3A%5B%7B%22Effect%22%3A\
                      %22Allow%22%2C%22Action%22%3A%22s3%3A*%22%2C%22Resource%22%3A%22*%22%7D%5D%7D";
        iam(&format!(
            "Action=PutUserPolicy&UserName=horcrux&PolicyName=s3&PolicyDocument={policy}&Version=2010-05-08"
        ));
        let (status, text) = http(
            self.port,
            "POST",
            "/moto-api/reset-auth",
            &[("Content-Type", "text/plain")],
            b"0",
        )
        .unwrap();
        assert_eq!(status, 200, "reset-auth: {text}");
        self.access_key_id = xml_element(&key, "AccessKeyId").expect("AccessKeyId");
        self.secret_access_key = xml_element(&key, "SecretAccessKey").expect("SecretAccessKey");
        (self.access_key_id.clone(), self.secret_access_key.clone())
    }

    fn garage_cli(&self, args: &[&str]) -> String {
        let out = Command::new(self.garage.as_ref().unwrap())
            .arg("-c")
            .arg(self.dir.path().join("garage.toml"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "garage {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        // SIGKILL also ends a server frozen by SIGSTOP.
        self.kill();
    }
}

//! `s3://bucket/prefix` store: a repository under a prefix of an S3 bucket — AWS or any
//! S3-compatible server (MinIO, Garage, Ceph...) — through `object_store`'s `AmazonS3`.
//!
//! Every key lives under `<prefix>/`. Refs are updated with conditional writes
//! (`If-None-Match: *` to create, `If-Match: <etag>` to replace); a server that ignores those
//! headers is detected by a one-time probe before the first compare-and-swap and refused, so two
//! pushers can never silently clobber each other.
//!
//! Configuration is resolved once, from the URL options and a snapshot of the environment
//! ([`S3Env`], taken by the caller; the process's only if none is given), into a plain
//! [`S3Config`]. Secrets are never put in `Debug` output, `describe()` or error messages.
//!
//! Every request is bounded (`request_timeout` plus 1 s per MiB, retries included), so a dead or
//! frozen server is an error within a known time, never a hang.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::path::{Path as FsPath, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::{
    AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, AwsCredentialProvider, S3ConditionalPut,
};
use object_store::client::{HttpError, HttpErrorKind};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, Error as OsError, GetOptions, GetRange, ObjectStore,
    ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig, UpdateVersion,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::OnceCell;

use super::{Store, StoreError};

/// Object written and overwritten by the conditional-write probe. Starts with `.` so `list`
/// hides it, like the file store's temp and lock files.
const CAS_PROBE_KEY: &str = ".horcrux-cas-probe";

/// Environment variables that select one of `object_store`'s ambient credential providers (web
/// identity, ECS/EKS container credentials, EC2 instance metadata). Passed through only when no
/// static credentials were found.
const AMBIENT_VARS: &[&str] = &[
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_ENDPOINT_URL_STS",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_METADATA_ENDPOINT",
    "AWS_IMDSV1_FALLBACK",
];

/// A snapshot of the parts of the environment S3 configuration depends on: `AWS_*` variables
/// and the home directory (for `~/.aws/credentials` and `~/.aws/config`). Taken by the caller
/// (the CLI) so the library never reads the process environment behind its back.
#[derive(Clone, Default)]
pub struct S3Env {
    vars: BTreeMap<String, String>,
    home: Option<PathBuf>,
}

impl S3Env {
    /// The current process's `AWS_*` variables and `$HOME`.
    pub fn from_process() -> Self {
        let vars = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.starts_with("AWS_"))
            .collect();
        Self {
            vars,
            home: std::env::var_os("HOME").map(PathBuf::from),
        }
    }

    /// An empty environment (no variables, no home directory).
    pub fn empty() -> Self {
        Self::default()
    }

    pub fn with_var(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.vars.insert(name.into(), value.into());
        self
    }

    pub fn with_home(mut self, home: impl Into<PathBuf>) -> Self {
        self.home = Some(home.into());
        self
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

impl fmt::Debug for S3Env {
    // Names only: values include secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Env")
            .field("vars", &self.vars.keys().collect::<Vec<_>>())
            .field("home", &self.home)
            .finish()
    }
}

/// S3 settings of [`super::StoreOptions`], filled by the CLI. `None` means the default.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// Environment to resolve credentials, region and endpoint from [default: the process's].
    pub env: Option<S3Env>,
    /// Bound on establishing a connection [default: 5 s].
    pub connect_timeout: Option<Duration>,
    /// Bound on one request including its retries (plus 1 s per MiB transferred), and on one
    /// silence of a streaming download [default: 30 s].
    pub request_timeout: Option<Duration>,
}

/// Where credentials come from.
#[derive(Clone)]
pub enum S3Credentials {
    /// Keys from the environment or a profile.
    Static {
        access_key_id: String,
        secret_access_key: String,
        session_token: Option<String>,
        /// Where they were found, for error messages ("environment variables", "profile ...").
        source: String,
    },
    /// `object_store`'s ambient chain: web identity token, container credentials or instance
    /// metadata, selected by these variables (names from [`AMBIENT_VARS`]).
    Ambient { vars: Vec<(String, String)> },
}

impl S3Credentials {
    /// Keys given directly (tests, embedding).
    pub fn keys(access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Self {
        S3Credentials::Static {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token: None,
            source: "explicit keys".into(),
        }
    }

    /// Where the credentials come from, without any secret.
    pub fn source(&self) -> String {
        match self {
            S3Credentials::Static { source, .. } => source.clone(),
            S3Credentials::Ambient { .. } => {
                "the web-identity/container/instance metadata chain, as no keys were found in \
                 the environment or the ~/.aws files"
                    .into()
            }
        }
    }
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            S3Credentials::Static { source, .. } => f
                .debug_struct("Static")
                .field("source", source)
                .finish_non_exhaustive(),
            S3Credentials::Ambient { vars } => f
                .debug_struct("Ambient")
                .field("vars", &vars.iter().map(|(k, _)| k).collect::<Vec<_>>())
                .finish(),
        }
    }
}

/// Everything needed to talk to one bucket.
#[derive(Debug, Clone)]
pub struct S3Config {
    pub region: String,
    /// `http[s]://host[:port]` of an S3-compatible server; `None` = AWS.
    pub endpoint: Option<String>,
    /// `http://host/bucket/key` rather than `http://bucket.host/key`.
    pub path_style: bool,
    pub allow_http: bool,
    pub credentials: S3Credentials,
    pub connect_timeout: Duration,
    /// Bound on one request including its retries, plus 1 s per MiB transferred (so a dead or
    /// stalled server is an error, never a hang); for streaming downloads (`get_to_file`), the
    /// longest silence tolerated.
    pub request_timeout: Duration,
    /// Retries of a failed request (with exponential back-off) ...
    pub max_retries: usize,
    /// ... started no later than this after the first attempt. Shorter than `request_timeout`
    /// so the real cause (refused connection, 503...) is reported rather than a time-out.
    pub retry_timeout: Duration,
    /// Requests in flight for one `exists` batch.
    pub concurrency: usize,
}

impl S3Config {
    /// Defaults for a server at `endpoint` (`None` = AWS) with the given credentials.
    pub fn new(
        region: impl Into<String>,
        endpoint: Option<String>,
        credentials: S3Credentials,
    ) -> Self {
        let endpoint = endpoint.map(|e| e.trim_end_matches('/').to_string());
        let local = endpoint.is_some();
        let http = endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        Self {
            region: region.into(),
            endpoint,
            path_style: local,
            allow_http: http,
            credentials,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_retries: 5,
            retry_timeout: Duration::from_secs(15),
            concurrency: 16,
        }
    }

    /// Set `request_timeout`, and `retry_timeout` to half of it.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self.retry_timeout = timeout / 2;
        self
    }

    /// Resolve the options of an `s3://` URL (`region`, `endpoint`, `path_style`, `allow_http`,
    /// `profile`) against an environment.
    ///
    /// Credentials, first match wins: the URL's `profile=` (an error if it has no keys);
    /// `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`); the profile
    /// `$AWS_PROFILE` or `default` in `$AWS_SHARED_CREDENTIALS_FILE` (else
    /// `~/.aws/credentials`) or `$AWS_CONFIG_FILE` (else `~/.aws/config`); otherwise
    /// `object_store`'s ambient chain (web identity, container, instance metadata).
    ///
    /// Region: URL, `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region` in the config
    /// file, `us-east-1`. Endpoint: URL, `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, the profile's
    /// `endpoint_url`; none = AWS. `path_style` defaults to true with an endpoint;
    /// `allow_http` to whether the endpoint is `http://`.
    pub fn resolve(options: &BTreeMap<String, String>, env: &S3Env) -> Result<Self, String> {
        let opt = |k: &str| options.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let url_profile = opt("profile");
        let env_profile = env.var("AWS_PROFILE");
        let profile = url_profile.or(env_profile).unwrap_or("default");

        let creds_path = env
            .var("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .or_else(|| env.home.as_ref().map(|h| h.join(".aws/credentials")));
        let config_path = env
            .var("AWS_CONFIG_FILE")
            .map(PathBuf::from)
            .or_else(|| env.home.as_ref().map(|h| h.join(".aws/config")));
        let creds_file = IniFile::load(creds_path)?;
        let config_file = IniFile::load(config_path)?;
        let config_section = config_file.section(&config_section_name(profile));

        let from_profile = || profile_credentials(profile, &creds_file, &config_file);
        let credentials = if url_profile.is_some() {
            from_profile()?.ok_or_else(|| {
                format!(
                    "profile `{profile}` (from the URL) not found in {} or {}",
                    creds_file.describe(),
                    config_file.describe()
                )
            })?
        } else if let Some(c) = env_credentials(env)? {
            c
        } else if let Some(c) = from_profile()? {
            c
        } else if env_profile.is_some() {
            return Err(format!(
                "profile `{profile}` (from AWS_PROFILE) not found in {} or {}",
                creds_file.describe(),
                config_file.describe()
            ));
        } else {
            S3Credentials::Ambient {
                vars: AMBIENT_VARS
                    .iter()
                    .filter_map(|k| Some((k.to_string(), env.var(k)?.to_string())))
                    .collect(),
            }
        };

        let region = opt("region")
            .or_else(|| env.var("AWS_REGION"))
            .or_else(|| env.var("AWS_DEFAULT_REGION"))
            .or_else(|| {
                config_section
                    .and_then(|s| s.get("region"))
                    .map(String::as_str)
            })
            .unwrap_or("us-east-1")
            .to_string();
        let endpoint = opt("endpoint")
            .or_else(|| env.var("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env.var("AWS_ENDPOINT_URL"))
            .or_else(|| {
                config_section
                    .and_then(|s| s.get("endpoint_url"))
                    .map(String::as_str)
            })
            .map(str::to_string);
        if let Some(e) = &endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(format!(
                    "endpoint `{e}` must start with http:// or https:// (e.g. endpoint=http://127.0.0.1:9000)"
                ));
            }
        }
        let mut config = S3Config::new(region, endpoint, credentials);
        if let Some(v) = opt("path_style") {
            config.path_style = parse_bool("path_style", v)?;
        }
        if let Some(v) = opt("allow_http") {
            config.allow_http = parse_bool("allow_http", v)?;
        }
        if let Some(e) = &config.endpoint {
            if e.starts_with("http://") && !config.allow_http {
                return Err(format!(
                    "endpoint `{e}` is plain http but allow_http=false: use https or allow_http=true"
                ));
            }
        }
        Ok(config)
    }

    /// The base URL requests go to, for messages.
    fn endpoint_display(&self) -> String {
        match &self.endpoint {
            Some(e) => e.clone(),
            None => format!("https://s3.{}.amazonaws.com", self.region),
        }
    }
}

fn parse_bool(name: &str, v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("{name}=`{v}`: expected true or false")),
    }
}

fn env_credentials(env: &S3Env) -> Result<Option<S3Credentials>, String> {
    match (
        env.var("AWS_ACCESS_KEY_ID"),
        env.var("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Some(id), Some(secret)) => Ok(Some(S3Credentials::Static {
            access_key_id: id.to_string(),
            secret_access_key: secret.to_string(),
            session_token: env.var("AWS_SESSION_TOKEN").map(str::to_string),
            source: "environment variables AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY".into(),
        })),
        (Some(_), None) => {
            Err("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not: set both".into())
        }
        (None, Some(_)) => {
            Err("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not: set both".into())
        }
        (None, None) => Ok(None),
    }
}

/// The section of `~/.aws/config` that holds profile `name`.
fn config_section_name(name: &str) -> String {
    if name == "default" {
        "default".into()
    } else {
        format!("profile {name}")
    }
}

/// Keys of profile `name`: `~/.aws/credentials` first, then `~/.aws/config`. `Ok(None)` if
/// neither file has the profile; an error if it exists without usable keys.
fn profile_credentials(
    name: &str,
    creds: &IniFile,
    config: &IniFile,
) -> Result<Option<S3Credentials>, String> {
    let candidates = [
        (creds, creds.section(name)),
        (config, config.section(&config_section_name(name))),
    ];
    for (file, section) in candidates {
        let Some(s) = section else { continue };
        let id = s.get("aws_access_key_id").filter(|v| !v.is_empty());
        let secret = s.get("aws_secret_access_key").filter(|v| !v.is_empty());
        match (id, secret) {
            (Some(id), Some(secret)) => {
                return Ok(Some(S3Credentials::Static {
                    access_key_id: id.clone(),
                    secret_access_key: secret.clone(),
                    session_token: s.get("aws_session_token").cloned(),
                    source: format!("profile `{name}` in {}", file.describe()),
                }));
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(format!(
                    "profile `{name}` in {} needs both aws_access_key_id and aws_secret_access_key",
                    file.describe()
                ));
            }
            (None, None) => {}
        }
    }
    // Profiles that only hold settings (region...) are fine; ones that delegate to a mechanism
    // we do not implement must not silently fall through to other credentials.
    let unsupported = [
        "role_arn",
        "source_profile",
        "credential_process",
        "sso_session",
        "sso_start_url",
    ];
    for (file, s) in candidates.iter().filter_map(|(f, s)| Some((*f, (*s)?))) {
        if let Some(k) = unsupported.iter().find(|k| s.contains_key(**k)) {
            return Err(format!(
                "profile `{name}` in {} uses `{k}`, which horcrux does not support: export \
                 AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN (e.g. from \
                 `aws configure export-credentials --profile {name} --format env`) or add keys \
                 to the profile",
                file.describe()
            ));
        }
    }
    // A profile with settings only (a `[default]` with a region is common): keys come from
    // elsewhere in the chain.
    Ok(None)
}

/// A parsed AWS-style INI file (`~/.aws/credentials`, `~/.aws/config`).
#[derive(Debug, Default)]
struct IniFile {
    path: Option<PathBuf>,
    sections: BTreeMap<String, BTreeMap<String, String>>,
}

impl IniFile {
    /// A missing file is empty; an unreadable one is an error naming it.
    fn load(path: Option<PathBuf>) -> Result<Self, String> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Self {
                sections: parse_ini(&text),
                path: Some(path),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self {
                path: Some(path),
                sections: BTreeMap::new(),
            }),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    fn section(&self, name: &str) -> Option<&BTreeMap<String, String>> {
        self.sections.get(name)
    }

    fn describe(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => "(no file: HOME is not set)".into(),
        }
    }
}

/// Sections of an AWS-style INI file: `[name]` → key → value. Section names have their inner
/// whitespace normalised (`[profile  x]` = `[profile x]`); keys are lower-cased; `#` and `;`
/// start comment lines; nested blocks (indented lines after a `key =` with no value, as in
/// `s3 =\n  addressing_style = path`) are skipped.
fn parse_ini(text: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut section: Option<String> = None;
    let mut nested = false;
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if nested && raw.starts_with([' ', '\t']) {
            continue;
        }
        nested = false;
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            out.entry(name.clone()).or_default();
            section = Some(name);
            continue;
        }
        let (Some(sec), Some((k, v))) = (&section, line.split_once('=')) else {
            continue;
        };
        let v = v.trim();
        if v.is_empty() {
            nested = true;
            continue;
        }
        out.entry(sec.clone())
            .or_default()
            .insert(k.trim().to_ascii_lowercase(), v.to_string());
    }
    out
}

/// Transfers are given `request_timeout` plus one second per this many bytes.
const MIN_RATE: u64 = 1 << 20;

/// A repository under `s3://bucket/prefix`.
pub struct S3Store {
    /// Small requests (HEAD, LIST, refs): each bounded by `request_timeout` in the HTTP client.
    client: AmazonS3,
    /// Data transfers of any size: no whole-request bound in the HTTP client (the caller bounds
    /// them by size), but `request_timeout` of silence fails them.
    bulk: AmazonS3,
    bucket: String,
    prefix: String,
    endpoint: String,
    credentials_source: String,
    /// Credentials come from the ambient chain (metadata services), so fetching them can fail
    /// on its own and must be reported as such, not as a failure of the S3 endpoint.
    ambient: bool,
    request_timeout: Duration,
    concurrency: usize,
    /// Set once the bucket was seen to exist (a HEAD 404 has no body, so it cannot tell a
    /// missing key from a missing bucket).
    bucket_ok: OnceCell<()>,
    /// Outcome of the conditional-write probe: `Err(why)` if the server ignores preconditions.
    conditional: OnceCell<Result<(), String>>,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// Open `s3://bucket/prefix` with explicit settings. Makes no request.
    pub fn new(
        bucket: impl Into<String>,
        prefix: impl Into<String>,
        config: S3Config,
    ) -> Result<Self, StoreError> {
        let bucket = bucket.into();
        let prefix = prefix.into().trim_matches('/').to_string();
        let describe = format!("s3://{bucket}/{prefix}");
        let other = |message: String| StoreError::Other {
            store: describe.clone(),
            message,
        };
        if bucket.is_empty() {
            return Err(other("missing bucket name".into()));
        }
        if !prefix.is_empty() {
            Path::parse(&prefix).map_err(|e| other(format!("invalid prefix `{prefix}`: {e}")))?;
        }
        let endpoint = config.endpoint_display();
        let client = build(&bucket, &config, false, None).map_err(|e| other(e.to_string()))?;
        // One credential provider for both clients, so ambient credentials are fetched once.
        let shared = Some(client.credentials().clone());
        let bulk = build(&bucket, &config, true, shared).map_err(|e| other(e.to_string()))?;
        Ok(Self {
            client,
            bulk,
            bucket,
            prefix,
            endpoint,
            credentials_source: config.credentials.source(),
            ambient: matches!(config.credentials, S3Credentials::Ambient { .. }),
            request_timeout: config.request_timeout,
            concurrency: config.concurrency.max(1),
            bucket_ok: OnceCell::new(),
            conditional: OnceCell::new(),
        })
    }

    /// Open an `s3://` access URL's bucket, prefix and options.
    pub fn from_url(
        bucket: &str,
        prefix: &str,
        url_options: &BTreeMap<String, String>,
        options: &S3Options,
    ) -> Result<Self, StoreError> {
        let process_env;
        let env = match &options.env {
            Some(e) => e,
            None => {
                process_env = S3Env::from_process();
                &process_env
            }
        };
        let mut config =
            S3Config::resolve(url_options, env).map_err(|message| StoreError::Other {
                store: format!("s3://{bucket}/{}", prefix.trim_matches('/')),
                message,
            })?;
        if let Some(t) = options.connect_timeout {
            config.connect_timeout = t;
        }
        if let Some(t) = options.request_timeout {
            config = config.with_request_timeout(t);
        }
        Self::new(bucket, prefix, config)
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn full_key(&self, key: &str) -> String {
        match (self.prefix.is_empty(), key.is_empty()) {
            (true, _) => key.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}/{key}", self.prefix),
        }
    }

    fn path(&self, key: &str) -> Result<Path, StoreError> {
        Path::parse(self.full_key(key)).map_err(|e| self.other(format!("invalid key `{key}`: {e}")))
    }

    fn other(&self, message: String) -> StoreError {
        StoreError::Other {
            store: self.describe(),
            message,
        }
    }

    fn io(&self, key: &str, kind: io::ErrorKind, message: String) -> StoreError {
        StoreError::Io {
            store: self.describe(),
            key: key.to_string(),
            source: io::Error::new(kind, message),
        }
    }

    /// Run one request (with its retries), bounded by `request_timeout` plus 1 s per MiB.
    /// The outer error is a time-out or missing credentials; the inner one the request's.
    async fn attempt<T>(
        &self,
        key: &str,
        bytes: u64,
        request: impl Future<Output = Result<T, OsError>>,
    ) -> Result<Result<T, OsError>, StoreError> {
        let limit = self.request_timeout + Duration::from_secs(bytes / MIN_RATE);
        let work = async {
            if self.ambient {
                // Cached by the provider after the first success.
                if let Err(e) = self.client.credentials().get_credential().await {
                    return Err(self.other(format!(
                        "no usable AWS credentials ({}): set AWS_ACCESS_KEY_ID/\
                         AWS_SECRET_ACCESS_KEY, a profile in ~/.aws/credentials or profile= in \
                         the URL ({})",
                        self.credentials_source,
                        error_text(&e)
                    )));
                }
            }
            Ok(request.await)
        };
        match tokio::time::timeout(limit, work).await {
            Ok(r) => r,
            Err(_) => Err(self.io(
                key,
                io::ErrorKind::TimedOut,
                format!("no answer from {} within {limit:?}", self.endpoint),
            )),
        }
    }

    /// [`Self::attempt`] with the request's error mapped.
    async fn bounded<T>(
        &self,
        key: &str,
        bytes: u64,
        request: impl Future<Output = Result<T, OsError>>,
    ) -> Result<T, StoreError> {
        self.attempt(key, bytes, request)
            .await?
            .map_err(|e| self.map_err(key, e))
    }

    /// Turn an `object_store` error into one that says what to do about it.
    fn map_err(&self, key: &str, e: OsError) -> StoreError {
        let text = error_text(&e);
        let code = s3_code(&text);
        if code.as_deref() == Some("NoSuchBucket") {
            return self.other(format!(
                "bucket `{}` does not exist at {} (create it, or check the bucket name and \
                 endpoint)",
                self.bucket, self.endpoint
            ));
        }
        match &e {
            OsError::NotFound { .. } => {
                return StoreError::NotFound {
                    store: self.describe(),
                    key: key.to_string(),
                };
            }
            OsError::PermissionDenied { .. } | OsError::Unauthenticated { .. } => {
                return self.access_denied(key, code.as_deref(), &text);
            }
            _ => {}
        }
        match code.as_deref() {
            Some(
                "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "AccessDenied"
                | "InvalidToken"
                | "ExpiredToken"
                | "InvalidSecurity"
                | "AllAccessDisabled",
            ) => return self.access_denied(key, code.as_deref(), &text),
            Some(
                c @ ("AuthorizationHeaderMalformed"
                | "PermanentRedirect"
                | "IllegalLocationConstraintException"),
            ) => {
                return self.other(format!(
                    "bucket `{}` is not in the region requests were signed for ({c}): set \
                     region=<the bucket's region> in the URL",
                    self.bucket
                ));
            }
            Some("NoSuchKey") => {
                return StoreError::NotFound {
                    store: self.describe(),
                    key: key.to_string(),
                };
            }
            _ => {}
        }
        if matches!(http_status(&text), Some(401 | 403)) {
            return self.access_denied(key, code.as_deref(), &text);
        }
        if let Some(kind) = http_error_kind(&e) {
            let (io_kind, what) = match kind {
                HttpErrorKind::Connect => (
                    io::ErrorKind::ConnectionRefused,
                    format!(
                        "cannot connect to {} (is the server running and reachable?)",
                        self.endpoint
                    ),
                ),
                HttpErrorKind::Timeout => (
                    io::ErrorKind::TimedOut,
                    format!(
                        "{} did not answer within {:?}",
                        self.endpoint, self.request_timeout
                    ),
                ),
                _ => (
                    io::ErrorKind::ConnectionAborted,
                    format!("connection to {} failed", self.endpoint),
                ),
            };
            return self.io(key, io_kind, format!("{what}: {text}"));
        }
        self.io(key, io::ErrorKind::Other, text)
    }

    fn access_denied(&self, key: &str, code: Option<&str>, text: &str) -> StoreError {
        // Only the code and message of the server's answer: its body can quote the string to
        // sign and the access key id, which have no place in logs.
        let said = match (code, s3_element(text, "Message")) {
            (Some(c), Some(m)) => format!(" ({c}: {m})"),
            (Some(c), None) => format!(" ({c})"),
            _ => String::new(),
        };
        let what = if key.is_empty() {
            "the bucket listing".to_string()
        } else {
            format!("`{key}`")
        };
        self.other(format!(
            "access denied{said} to {what} at {}: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/\
             AWS_SESSION_TOKEN or the profile, and the bucket's permissions (credentials from {})",
            self.endpoint, self.credentials_source
        ))
    }

    /// Fail with a clear message if the bucket does not exist; succeeds at most once.
    async fn check_bucket(&self) -> Result<(), StoreError> {
        self.bucket_ok
            .get_or_try_init(|| async {
                let p = if self.prefix.is_empty() {
                    None
                } else {
                    Some(self.path("")?)
                };
                self.bounded("", 0, self.client.list_with_delimiter(p.as_ref()))
                    .await
                    .map(|_| ())
            })
            .await
            .copied()
    }

    /// Make sure the server honours `If-None-Match` and `If-Match` on PUT: some S3-compatible
    /// servers ignore them, which would turn compare-and-swap into a plain overwrite.
    async fn check_conditional_writes(&self) -> Result<(), StoreError> {
        let outcome = self
            .conditional
            .get_or_try_init(|| async {
                let p = self.path(CAS_PROBE_KEY)?;
                let put = |mode: PutMode| {
                    let request = self.client.put_opts(
                        &p,
                        PutPayload::from_static(b"horcrux conditional-write probe"),
                        PutOptions::from(mode),
                    );
                    self.attempt(CAS_PROBE_KEY, 0, request)
                };
                put(PutMode::Overwrite)
                    .await?
                    .map_err(|e| self.map_err(CAS_PROBE_KEY, e))?;
                match put(PutMode::Create).await? {
                    Err(OsError::AlreadyExists { .. } | OsError::Precondition { .. }) => {}
                    Ok(_) => {
                        return Ok(Err(
                            "a PUT with If-None-Match: * replaced an existing object".to_string(),
                        ));
                    }
                    Err(e) => return unsupported_or(self, e),
                }
                let stale = UpdateVersion {
                    e_tag: Some("\"00000000000000000000000000000000\"".into()),
                    version: None,
                };
                match put(PutMode::Update(stale)).await? {
                    Err(OsError::Precondition { .. } | OsError::AlreadyExists { .. }) => Ok(Ok(())),
                    Ok(_) => Ok(Err(
                        "a PUT with a non-matching If-Match replaced the object".to_string(),
                    )),
                    Err(e) => unsupported_or(self, e),
                }
            })
            .await?;
        outcome.clone().map_err(|why| {
            StoreError::Unsupported(format!(
                "{}: the S3 server at {} does not support conditional writes ({why}); horcrux \
                 needs PUT with If-None-Match/If-Match to update refs safely (AWS S3 and MinIO \
                 support them)",
                self.describe(),
                self.endpoint
            ))
        })
    }
}

/// `Ok(Err(reason))` if the error says the server does not implement conditional writes (a
/// 501, `NotImplemented`), else the error.
fn unsupported_or(store: &S3Store, e: OsError) -> Result<Result<(), String>, StoreError> {
    let text = error_text(&e);
    if matches!(e, OsError::NotImplemented { .. })
        || http_status(&text) == Some(501)
        || s3_code(&text).as_deref() == Some("NotImplemented")
    {
        Ok(Err(format!("the server answered: {text}")))
    } else {
        Err(store.map_err(CAS_PROBE_KEY, e))
    }
}

/// An error and its sources, joined, skipping a source already quoted verbatim.
fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cur = s.source();
    }
    text
}

fn http_error_kind(e: &(dyn std::error::Error + 'static)) -> Option<HttpErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = cur {
        if let Some(h) = s.downcast_ref::<HttpError>() {
            return Some(h.kind());
        }
        cur = s.source();
    }
    None
}

/// The `<Code>` of an S3 XML error body quoted in an error message.
fn s3_code(text: &str) -> Option<String> {
    s3_element(text, "Code")
}

/// The first `<name>...</name>` of an S3 XML error body quoted in an error message.
fn s3_element(text: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = text.find(&open)? + open.len();
    let len = text[start..].find(&format!("</{name}>"))?;
    Some(text[start..start + len].to_string())
}

/// The HTTP status quoted by `object_store` ("... status code: 403 Forbidden ...").
fn http_status(text: &str) -> Option<u16> {
    let i = text.find("status code: ")? + "status code: ".len();
    text[i..].get(..3)?.parse().ok()
}

fn build(
    bucket: &str,
    config: &S3Config,
    bulk: bool,
    credentials: Option<AwsCredentialProvider>,
) -> object_store::Result<AmazonS3> {
    let mut client = ClientOptions::new()
        .with_connect_timeout(config.connect_timeout)
        .with_allow_http(config.allow_http);
    client = if bulk {
        client
            .with_timeout_disabled()
            .with_read_timeout(config.request_timeout)
    } else {
        client.with_timeout(config.request_timeout)
    };
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(3),
            base: 2.0,
        },
        max_retries: config.max_retries,
        retry_timeout: config.retry_timeout,
    };
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(&config.region)
        .with_client_options(client)
        .with_retry(retry)
        .with_conditional_put(S3ConditionalPut::ETagMatch)
        .with_virtual_hosted_style_request(!config.path_style);
    if let Some(endpoint) = &config.endpoint {
        // object_store wants a virtual-hosted endpoint with the bucket already in the host.
        let e = match endpoint.split_once("://") {
            Some((scheme, host)) if !config.path_style => format!("{scheme}://{bucket}.{host}"),
            _ => endpoint.clone(),
        };
        b = b.with_endpoint(e);
    }
    if let Some(provider) = credentials {
        return b.with_credentials(provider).build();
    }
    match &config.credentials {
        S3Credentials::Static {
            access_key_id,
            secret_access_key,
            session_token,
            ..
        } => {
            b = b
                .with_access_key_id(access_key_id)
                .with_secret_access_key(secret_access_key);
            if let Some(t) = session_token {
                b = b.with_token(t);
            }
        }
        S3Credentials::Ambient { vars } => {
            for (k, v) in vars {
                if let Ok(key) = k.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                    b = b.with_config(key, v);
                }
            }
        }
    }
    b.build()
}

#[async_trait::async_trait]
impl Store for S3Store {
    fn describe(&self) -> String {
        let s = format!("s3://{}/{}", self.bucket, self.prefix);
        if self.endpoint.starts_with("https://s3.") && self.endpoint.ends_with(".amazonaws.com") {
            s
        } else {
            format!("{s} at {}", self.endpoint)
        }
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let past_end = |size: Option<u64>| {
            let size = size.map(|s| format!(" (size {s})")).unwrap_or_default();
            self.io(
                key,
                io::ErrorKind::UnexpectedEof,
                format!(
                    "range {}..{} is past the end of the object{size}",
                    range.start, range.end
                ),
            )
        };
        if range.start > range.end {
            return Err(self.other(format!(
                "`{key}`: invalid range {}..{}",
                range.start, range.end
            )));
        }
        let p = self.path(key)?;
        if range.is_empty() {
            // A zero-length range cannot be requested; still check the object and the offset.
            let meta = self.bounded(key, 0, self.client.head(&p)).await?;
            if range.start > meta.size {
                return Err(past_end(Some(meta.size)));
            }
            return Ok(Bytes::new());
        }
        let options = GetOptions {
            range: Some(GetRange::Bounded(range.clone())),
            ..Default::default()
        };
        let request = async {
            let result = self.bulk.get_opts(&p, options).await?;
            let size = result.meta.size;
            Ok((size, result.bytes().await?))
        };
        let (size, data) = match self.bounded(key, range.end - range.start, request).await {
            Ok(r) => r,
            // Requested start at or past the end: 416 Range Not Satisfiable.
            Err(StoreError::Io { source, .. })
                if source.to_string().contains("status code: 416")
                    || source.to_string().contains("InvalidRange") =>
            {
                return Err(past_end(None));
            }
            Err(e) => return Err(e),
        };
        // A range ending past the end comes back short rather than failing.
        if data.len() as u64 != range.end - range.start {
            return Err(past_end(Some(size)));
        }
        Ok(data)
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let p = self.path(key)?;
        let result = self.bounded(key, 0, self.bulk.get(&p)).await?;
        let size = result.meta.size;
        self.bounded(key, size, result.bytes()).await
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let p = self.path(key)?;
        let len = data.len() as u64;
        let request = self.bulk.put_opts(
            &p,
            PutPayload::from(data),
            PutOptions::from(PutMode::Overwrite),
        );
        self.bounded(key, len, request).await.map(|_| ())
    }

    async fn exists(&self, keys: &[String]) -> Result<Vec<bool>, StoreError> {
        let found: Vec<Result<bool, StoreError>> = futures_util::stream::iter(keys.to_vec())
            .map(|key: String| async move {
                let p = self.path(&key)?;
                let head = async {
                    match self.client.head(&p).await {
                        Ok(_) => Ok(true),
                        Err(OsError::NotFound { .. }) => Ok(false),
                        Err(e) => Err(e),
                    }
                };
                self.bounded(&key, 0, head).await
            })
            .buffered(self.concurrency)
            .collect()
            .await;
        let found = found.into_iter().collect::<Result<Vec<bool>, _>>()?;
        if found.iter().any(|f| !f) {
            self.check_bucket().await?;
        }
        Ok(found)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .list_sizes(prefix)
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    /// The `Last-Modified` the server gives a probe object (removed at once), to the second.
    async fn now(&self) -> Result<Option<std::time::SystemTime>, StoreError> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = format!("tmp/clock-{}-{n}", std::process::id());
        self.put(&key, Bytes::new()).await?;
        let p = self.path(&key)?;
        let head = self.bounded(&key, 0, self.client.head(&p)).await;
        let _ = self.delete(&key).await;
        Ok(Some(head?.last_modified.into()))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let p = self.path(key)?;
        let request = async {
            match self.client.delete(&p).await {
                Ok(()) | Err(OsError::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        };
        self.bounded(key, 0, request).await
    }

    async fn list_sizes(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        // object_store lists whole "directories": list the one holding `prefix`, then filter.
        let dir = prefix.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        let full_dir = self.full_key(dir);
        let dir_path = if full_dir.is_empty() {
            None
        } else {
            Some(
                Path::parse(&full_dir)
                    .map_err(|e| self.other(format!("invalid prefix `{prefix}`: {e}")))?,
            )
        };
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut stream = self.client.list(dir_path.as_ref());
        let mut out = Vec::new();
        // Each page is one request: bound each, not the whole (possibly long) listing.
        while let Some(meta) = self
            .bounded(prefix, 0, async { stream.next().await.transpose() })
            .await?
        {
            let Some(rel) = meta.location.as_ref().strip_prefix(&strip) else {
                continue;
            };
            if rel.starts_with(prefix) && !rel.split('/').any(|c| c.starts_with('.')) {
                out.push((rel.to_string(), meta.size));
            }
        }
        out.sort();
        Ok(out)
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Bytes,
    ) -> Result<(), StoreError> {
        self.check_conditional_writes().await?;
        let conflict = || StoreError::CasConflict {
            store: self.describe(),
            key: key.to_string(),
        };
        let p = self.path(key)?;
        let mode = match expected {
            None => PutMode::Create,
            Some(expected) => {
                let read = async {
                    match self.client.get(&p).await {
                        Ok(r) => {
                            let (e_tag, version) = (r.meta.e_tag.clone(), r.meta.version.clone());
                            Ok(Some((e_tag, version, r.bytes().await?)))
                        }
                        Err(OsError::NotFound { .. }) => Ok(None),
                        Err(e) => Err(e),
                    }
                };
                let Some((e_tag, version, current)) =
                    self.bounded(key, expected.len() as u64, read).await?
                else {
                    return Err(conflict());
                };
                if current.as_ref() != expected {
                    return Err(conflict());
                }
                if e_tag.is_none() {
                    return Err(self.other(format!(
                        "`{key}`: the server returned no ETag, so it cannot be replaced \
                         conditionally"
                    )));
                }
                PutMode::Update(UpdateVersion { e_tag, version })
            }
        };
        let len = new.len() as u64;
        let write = async {
            match self
                .client
                .put_opts(&p, PutPayload::from(new), PutOptions::from(mode))
                .await
            {
                Ok(_) => Ok(true),
                Err(OsError::AlreadyExists { .. } | OsError::Precondition { .. }) => Ok(false),
                Err(e) => Err(e),
            }
        };
        if self.bounded(key, len, write).await? {
            Ok(())
        } else {
            Err(conflict())
        }
    }

    async fn get_to_file(&self, key: &str, dest: &FsPath) -> Result<(), StoreError> {
        let p = self.path(key)?;
        let result = self.bounded(key, 0, self.bulk.get(&p)).await?;
        let size = result.meta.size;
        let mut stream = result.into_stream();
        let io_err = |source: io::Error| StoreError::Io {
            store: self.describe(),
            key: key.to_string(),
            source,
        };
        let dir = dest.parent().unwrap_or(FsPath::new(".")).to_path_buf();
        tokio::fs::create_dir_all(&dir).await.map_err(io_err)?;
        let tmp = crate::util::temp_name(dest);
        let r = async {
            let mut f = tokio::fs::File::create(&tmp).await.map_err(io_err)?;
            let mut written = 0u64;
            // No bound on the whole download (it can be large), but on each silence.
            while let Some(chunk) = self
                .bounded(key, 0, async { stream.next().await.transpose() })
                .await?
            {
                written += chunk.len() as u64;
                f.write_all(&chunk).await.map_err(io_err)?;
            }
            if written != size {
                return Err(self.io(
                    key,
                    io::ErrorKind::UnexpectedEof,
                    format!("download ended after {written} of {size} bytes"),
                ));
            }
            f.flush().await.map_err(io_err)?;
            f.sync_all().await.map_err(io_err)?;
            drop(f);
            tokio::fs::rename(&tmp, dest).await.map_err(io_err)?;
            tokio::task::spawn_blocking(move || crate::util::sync_dir(&dir))
                .await
                .expect("sync task")
                .map_err(io_err)
        }
        .await;
        if r.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn ini_parsing() {
        let text = "# comment\n[default]\naws_access_key_id = AK\n; other\nAWS_Secret_Access_Key=SK\n\
                    s3 =\n  addressing_style = path\n  region = nested\nregion = eu-west-1\n\
                    [profile   dev ]\nregion=us-west-2\n";
        let ini = parse_ini(text);
        assert_eq!(ini["default"]["aws_access_key_id"], "AK");
        assert_eq!(ini["default"]["aws_secret_access_key"], "SK");
        assert_eq!(ini["default"]["region"], "eu-west-1");
        assert!(!ini["default"].contains_key("addressing_style"));
        assert_eq!(ini["profile dev"]["region"], "us-west-2");
    }

    #[test]
    fn defaults_follow_the_endpoint() {
        let env = S3Env::empty()
            .with_var("AWS_ACCESS_KEY_ID", "a")
            .with_var("AWS_SECRET_ACCESS_KEY", "s");
        let c = S3Config::resolve(&opts(&[("endpoint", "http://127.0.0.1:9000/")]), &env).unwrap();
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(c.path_style && c.allow_http);
        assert_eq!(c.region, "us-east-1");
        let c = S3Config::resolve(
            &opts(&[]),
            &env.clone().with_var("AWS_DEFAULT_REGION", "eu-north-1"),
        )
        .unwrap();
        assert!(c.endpoint.is_none() && !c.path_style && !c.allow_http);
        assert_eq!(c.region, "eu-north-1");
        let e = S3Config::resolve(&opts(&[("endpoint", "127.0.0.1:9000")]), &env).unwrap_err();
        assert!(e.contains("http://"), "{e}");
        let e = S3Config::resolve(
            &opts(&[("endpoint", "http://h"), ("allow_http", "false")]),
            &env,
        )
        .unwrap_err();
        assert!(e.contains("allow_http"), "{e}");
        let e = S3Config::resolve(&opts(&[("path_style", "maybe")]), &env).unwrap_err();
        assert!(e.contains("path_style"), "{e}");
    }

    #[test]
    fn debug_output_has_no_secrets() {
        let env = S3Env::empty()
            .with_var("AWS_ACCESS_KEY_ID", "AKIDVISIBLE")
            .with_var("AWS_SECRET_ACCESS_KEY", "very-secret");
        let c = S3Config::resolve(&opts(&[]), &env).unwrap();
        let s = S3Store::new("b", "p", c.clone()).unwrap();
        for text in [
            format!("{env:?}"),
            format!("{c:?}"),
            format!("{s:?}"),
            s.describe(),
        ] {
            assert!(!text.contains("very-secret"), "{text}");
            assert!(!text.contains("AKIDVISIBLE"), "{text}");
        }
    }

    #[test]
    fn s3_error_codes() {
        let t = "Server returned non-2xx status code: 404 Not Found: <?xml?><Error><Code>NoSuchBucket</Code></Error>";
        assert_eq!(s3_code(t).as_deref(), Some("NoSuchBucket"));
        assert_eq!(http_status(t), Some(404));
        assert_eq!(http_status("nothing"), None);
    }
}

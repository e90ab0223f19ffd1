//! The local control channel between the `horcrux` command and a live mount daemon
//! (`horcrux status`, `diff`, `discard`).
//!
//! # Transport
//!
//! A Unix stream socket, mode 0600, owned by the daemon (the CLI finds it at
//! `<state dir>/run/<hash of the mountpoint>.sock`). The client writes one request as one line of
//! JSON; the daemon answers with one line of JSON. A connection may carry several requests in
//! turn. Request lines are at most [`MAX_REQUEST_LINE`] bytes; answers at most
//! [`MAX_RESPONSE_LINE`].
//!
//! # Lines (version 1)
//!
//! Every line is a JSON object with the protocol version `"v": 1` and a `"type"`:
//!
//! ```text
//! → {"v":1,"type":"ping"}
//! ← {"v":1,"type":"pong","data":{"volume":"AMCC","commit":"3f2a…","pid":4242}}
//! → {"v":1,"type":"status"}
//! ← {"v":1,"type":"status","data":{"volume":"AMCC","base_commit":"3f2a…","changes":[…],…}}
//! → {"v":1,"type":"diff","path":"db/ibdata1"}         ("path" absent or null: everything)
//! ← {"v":1,"type":"diff","data":[{"change":{…},"old_size":…,"ranges":[[0,4096]],"meta":[…]}]}
//! → {"v":1,"type":"discard","path":null}
//! ← {"v":1,"type":"discarded","data":{"entries":7}}
//! → {"v":1,"type":"prefetch","all":true,"bandwidth":104857600}
//! ← {"v":1,"type":"prefetch","data":{"state":"planning","total_bytes":0,…}}
//! → {"v":1,"type":"prefetch_status"}                  (also "prefetch_cancel")
//! ← {"v":1,"type":"prefetch","data":{"state":"running","present_bytes":…,…}}
//! ← {"v":1,"type":"no_prefetch"}                      (no job in this daemon)
//! → {"v":1,"type":"stats"}
//! ← {"v":1,"type":"stats","data":{"volume":"AMCC","cache":{…},"reads":{…},"fetch":{…},…}}
//! → {"v":1,"type":"replay_status"}
//! ← {"v":1,"type":"replay","data":{"recording":"recording","replay":"running","blocks":96,…}}
//! ← {"v":1,"type":"error","data":{"message":"…"}}     (any request can be answered so)
//! ```
//!
//! A change's `kind` is `"added"`, `"modified"`, `"deleted"` or `{"renamed":{"from":PATH}}`.
//!
//! Paths inside a volume ([`WirePath`]) are raw bytes relative to the volume root, without a
//! leading `/` (the root is `""`): a JSON string when they are valid UTF-8, else
//! `{"hex":"<lowercase hex of the bytes>"}`.
//!
//! # Serving, in a mount daemon
//!
//! ```no_run
//! use std::sync::Arc;
//! use horcrux_proto::control::{self, Handler, Request, Response};
//!
//! struct Daemon;
//!
//! impl Handler for Daemon {
//!     fn handle(&self, req: Request) -> Response {
//!         match req {
//!             Request::Ping => Response::Pong {
//!                 volume: "AMCC".into(),
//!                 commit: "3f2a".into(),
//!                 pid: std::process::id(),
//!             },
//!             _ => Response::error("not yet"),
//!         }
//!     }
//! }
//!
//! let sock = std::path::Path::new("/var/lib/horcrux/run/0123456789abcdef.sock");
//! let server = control::serve(sock, Arc::new(Daemon))?;
//! // ... serve the mount; dropping `server` stops it and removes the socket.
//! # drop(server);
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! A daemon answers a line it cannot read — not JSON, an unknown type, a missing or
//! unsupported `"v"` — with an `error` line (in version 1 form, so old clients can show it) and
//! keeps the connection open. Unknown fields are ignored, so a later version may add fields
//! without a new version number; anything else needs `"v": 2`, which a version 1 daemon refuses
//! clearly.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks.
pub const VERSION: u32 = 1;

/// Longest request line a daemon reads (the newline included); longer ones are refused and the
/// connection is closed.
pub const MAX_REQUEST_LINE: usize = 1 << 20;

/// Longest answer line a client reads (a diff of a volume with very many changed ranges).
pub const MAX_RESPONSE_LINE: usize = 256 << 20;

/// Connections a daemon serves at once; further ones get an `error` line and are closed.
pub const MAX_CONNECTIONS: usize = 32;

/// A connection with no request for this long is closed by the daemon.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// How long the daemon waits for a client to take an answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Paths

/// A path inside a volume: raw bytes, relative to the volume root, no leading `/`; the root is
/// the empty path. Carried losslessly on the wire (see the module documentation).
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WirePath(Vec<u8>);

impl WirePath {
    /// A path from its raw bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    /// The volume root (the empty path).
    pub fn root() -> Self {
        Self(Vec::new())
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// The raw bytes of a (relative) filesystem path.
    pub fn from_path(path: &Path) -> Self {
        Self(path.as_os_str().as_bytes().to_vec())
    }

    /// The same bytes as a (relative) filesystem path.
    pub fn to_path_buf(&self) -> PathBuf {
        PathBuf::from(std::ffi::OsString::from_vec(self.0.clone()))
    }

    /// Is this a well-formed path inside a volume: empty (the root), or names separated by
    /// single `/`, none empty, `.` or `..`, and no NUL byte? A daemon should refuse others.
    pub fn check(&self) -> Result<(), String> {
        if self.0.is_empty() {
            return Ok(());
        }
        if self.0.contains(&0) {
            return Err(format!("path `{self}` contains a NUL byte"));
        }
        for name in self.0.split(|b| *b == b'/') {
            match name {
                b"" => {
                    return Err(format!(
                        "path `{self}` is not relative to the volume root or has an empty name \
                         (no leading, trailing or double `/`)"
                    ));
                }
                b"." | b".." => {
                    return Err(format!("path `{self}` contains `.` or `..`"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Does this path name `prefix` itself or something under it? (The root is above all.)
    pub fn starts_with(&self, prefix: &WirePath) -> bool {
        prefix.is_root()
            || (self.0.starts_with(&prefix.0)
                && (self.0.len() == prefix.0.len() || self.0[prefix.0.len()] == b'/'))
    }
}

impl From<Vec<u8>> for WirePath {
    fn from(v: Vec<u8>) -> Self {
        Self(v)
    }
}

impl From<&[u8]> for WirePath {
    fn from(v: &[u8]) -> Self {
        Self(v.to_vec())
    }
}

impl From<&str> for WirePath {
    fn from(v: &str) -> Self {
        Self(v.as_bytes().to_vec())
    }
}

impl From<WirePath> for Vec<u8> {
    fn from(p: WirePath) -> Self {
        p.0
    }
}

/// For people: valid UTF-8 as is; invalid bytes, control characters and `\` escaped as
/// `\xNN` / `\\`, so distinct paths always print differently.
impl fmt::Display for WirePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                match c {
                    '\\' => f.write_str("\\\\")?,
                    c if c.is_control() && (c as u32) < 0x100 => write!(f, "\\x{:02x}", c as u32)?,
                    c => fmt::Write::write_char(f, c)?,
                }
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for WirePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WirePath(\"{self}\")")
    }
}

const HEX_KEY: &str = "hex";

impl Serialize for WirePath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => {
                let mut hex = String::with_capacity(self.0.len() * 2);
                for b in &self.0 {
                    hex.push_str(&format!("{b:02x}"));
                }
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry(HEX_KEY, &hex)?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for WirePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = WirePath;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a path: a string, or {\"hex\": \"<hex of the bytes>\"}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<WirePath, E> {
                Ok(WirePath::from(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WirePath, A::Error> {
                let mut bytes = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != HEX_KEY || bytes.is_some() {
                        return Err(de::Error::custom(format!(
                            "unexpected key `{key}` in a path (only one `{HEX_KEY}`)"
                        )));
                    }
                    let hex: String = map.next_value()?;
                    bytes = Some(decode_hex(&hex).map_err(de::Error::custom)?);
                }
                bytes
                    .map(WirePath)
                    .ok_or_else(|| de::Error::missing_field(HEX_KEY))
            }
        }
        d.deserialize_any(V)
    }
}

fn decode_hex(s: &str) -> Result<Vec<u8>, String> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let b = s.as_bytes();
    if b.len() % 2 != 0 {
        return Err(format!("hex path `{s}` has an odd number of digits"));
    }
    b.chunks(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(|| format!("hex path `{s}` contains a character that is not a hex digit"))
}

// ---------------------------------------------------------------------------------------------
// Messages

/// What the CLI asks a daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Every local change of the volume.
    Status,
    /// Per-file detail of the changes at or under `path` (everything when `None`).
    Diff {
        #[serde(default)]
        path: Option<WirePath>,
    },
    /// Throw away the changes at or under `path` (everything when `None`).
    Discard {
        #[serde(default)]
        path: Option<WirePath>,
    },
    /// Is anyone there? Answered with [`Response::Pong`].
    Ping,
    /// Make the changes a new version on the mounted branch; answered with
    /// [`Response::Committed`].
    Commit { message: String, author: String },
    /// How the volume is mounted; answered with [`Response::Described`].
    Describe,
    /// Switch the volume to revision `rev` (a branch makes later commits go there); refused
    /// with uncommitted changes unless `discard`. Answered with [`Response::CheckedOut`].
    Checkout { rev: String, discard: bool },
    /// Move the mounted branch to `rev`, throwing the changes away, and switch there.
    ResetHard { rev: String },
    /// Hydrate the whole base version (`all`) or `paths` (recursively) in the background,
    /// pinning it in the cache for this volume; answered with [`Response::Prefetch`] at once.
    /// `bandwidth` in bytes per second (absent: unbounded); `concurrency` in blocks (absent:
    /// the daemon's default).
    Prefetch {
        #[serde(default)]
        all: bool,
        #[serde(default)]
        paths: Vec<WirePath>,
        #[serde(default)]
        bandwidth: Option<u64>,
        #[serde(default)]
        concurrency: Option<u32>,
    },
    /// How the prefetch is going: [`Response::Prefetch`], or [`Response::NoPrefetch`].
    PrefetchStatus,
    /// Stop the prefetch; it is not resumed by a later mount. Answered like `PrefetchStatus`.
    PrefetchCancel,
    /// The daemon's counters (`horcrux stats`, the plugin's `/metrics`); answered with
    /// [`Response::Stats`].
    Stats,
    /// The start-up profile of the mount (recording and replay): [`Response::Replay`].
    ReplayStatus,
}

/// What a daemon answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum Response {
    Status(StatusReport),
    Diff(Vec<FileDiff>),
    /// How many overlay entries were thrown away.
    Discarded {
        entries: u64,
    },
    Pong {
        volume: String,
        commit: String,
        pid: u32,
    },
    /// A new version was made and the branch moved to it; the mount is clean on top of it.
    Committed(CommitReport),
    Described(MountInfo),
    /// The volume now shows `commit`; commits go to `branch` (none for a tag or commit id).
    CheckedOut {
        commit: String,
        branch: Option<String>,
        discarded: u64,
    },
    /// The volume's prefetch job, as it is now.
    Prefetch(PrefetchReport),
    /// This daemon has run no prefetch job.
    NoPrefetch,
    Stats(Box<StatsReport>),
    /// The mount's start-up profile: what it records and what it replays.
    Replay(ReplayReport),
    /// The request failed; `message` is for the user.
    Error {
        message: String,
    },
}

/// How a volume is mounted: what `log`, `push`, `branch`... need to act on its repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountInfo {
    pub volume: String,
    /// The access URL(s) as given to `mount` (comma-separated mirrors).
    pub access: String,
    /// The mounted branch, if a branch (not a tag or commit id) was mounted.
    pub branch: Option<String>,
    /// The reference given to `mount --ref`.
    pub reference: String,
    /// Hex id of the commit the volume sits on now.
    pub commit: String,
    pub mountpoint: String,
    pub cache_dir: String,
    pub overlay_dir: Option<String>,
    pub read_only: bool,
}

/// A prefetch job of a mount daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchReport {
    /// `planning`, `running`, `done`, `cancelled` or `failed`.
    pub state: String,
    /// Why it failed (with `failed`).
    #[serde(default)]
    pub error: Option<String>,
    /// `everything`, or the paths asked for.
    pub scope: String,
    /// Bytes of the blocks the scope needs, and of those in the cache now.
    pub total_bytes: u64,
    pub present_bytes: u64,
    pub total_blocks: u64,
    pub present_blocks: u64,
    /// Bytes this job fetched from the source.
    pub fetched_bytes: u64,
    pub failed_blocks: u64,
    pub elapsed_ms: u64,
    pub bandwidth: Option<u64>,
    pub concurrency: u32,
    /// Hex id of the commit being hydrated.
    pub commit: String,
    /// The owner name of the volume's pins in the cache (`horcrux cache pins`).
    pub owner: String,
}

/// A mount daemon's counters since it started (gauges: as they are now). Counters only grow,
/// so a client can compute rates from two reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReport {
    pub volume: String,
    pub commit: String,
    pub mountpoint: String,
    pub pid: u32,
    pub uptime_ms: u64,
    /// Where the daemon serves Prometheus metrics (`--metrics`), if it does.
    #[serde(default)]
    pub metrics_addr: Option<String>,
    pub cache: CacheFigures,
    pub reads: ReadFigures,
    pub fetch: FetchFigures,
    /// Per store of the mirror set, in order of preference.
    pub sources: Vec<SourceFigures>,
    /// Absent for a read-only mount.
    pub overlay: Option<OverlayFigures>,
    /// Filesystem operations the kernel asked, by kind (only kinds asked at least once).
    pub ops: Vec<OpFigures>,
    pub prefetch: Option<PrefetchReport>,
    /// FUSE passthrough of fully cached files (absent from daemons before it was reported).
    #[serde(default)]
    pub passthrough: Option<PassthroughFigures>,
}

/// FUSE passthrough: opens the kernel serves from a backing file without the daemon.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassthroughFigures {
    /// Configured on and offered by the kernel (else every read goes through the daemon).
    pub active: bool,
    /// Opens answered with a backing file.
    pub opens: u64,
    /// Backing files registered with the kernel.
    pub registered: u64,
    /// Read-only opens served by the daemon because the file was not entirely cached yet.
    pub not_cached: u64,
}

/// The cache directory (shared by every mount of it: sizes are the directory's, eviction
/// counters this daemon's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheFigures {
    pub bytes: u64,
    /// The bound (`--cache-size`), if any.
    pub limit: Option<u64>,
    pub chunks: u64,
    /// Bytes present of chunks pinned by volumes (`horcrux prefetch`), all owners.
    pub pinned_bytes: u64,
    pub evicted_chunks: u64,
    pub evicted_bytes: u64,
    pub inserted_bytes: u64,
    /// Of `inserted_bytes`, those written bypassing the page cache (`O_DIRECT`).
    #[serde(default)]
    pub direct_bytes: u64,
}

/// Reads through the fetcher, per block touched: from the cache (hit) or the source (miss).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadFigures {
    pub hit_blocks: u64,
    pub hit_bytes: u64,
    pub miss_blocks: u64,
    pub miss_bytes: u64,
}

/// Block fetches from the source(s).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchFigures {
    pub blocks: u64,
    pub bytes: u64,
    pub background_blocks: u64,
    /// Readers that waited on a fetch already in flight (single flight).
    pub shared_waits: u64,
    pub inflight: u64,
    pub verify_failures: u64,
    /// Failed block fetches by kind (`timeout`, `not_found`, `io`, `verify`, `permission`,
    /// `other`).
    pub errors: BTreeMap<String, u64>,
    pub latency: HistogramFigures,
}

/// Requests to one store (one per attempt).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFigures {
    /// The store's location, without credentials.
    pub source: String,
    pub requests: u64,
    pub bytes: u64,
    pub errors: BTreeMap<String, u64>,
    pub latency: HistogramFigures,
}

/// Local changes on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayFigures {
    pub bytes: u64,
    pub files: u64,
}

/// One kind of filesystem operation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpFigures {
    pub op: String,
    pub calls: u64,
    pub errors: u64,
    pub latency: HistogramFigures,
}

/// A latency histogram: `buckets[i]` observations at most `bounds_us[i]` microseconds (and
/// above the previous bound); the last bucket, one more than the bounds, is everything above.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramFigures {
    pub bounds_us: Vec<u64>,
    pub buckets: Vec<u64>,
    pub sum_us: u64,
    pub count: u64,
}

/// A mount's start-up profile (record-and-replay prefetch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayReport {
    /// The recording: `recording`, `off`, `not recording (...)`, `stored in ...`...
    pub recording: String,
    /// The replay: `off`, `looking for a profile`, `no profile`, `refused: ...`, `running`,
    /// `done`.
    pub replay: String,
    /// Short id of the profile replayed, and how many generations before the mounted version
    /// it was recorded (0 = this version).
    #[serde(default)]
    pub profile: Option<String>,
    #[serde(default)]
    pub generations: u32,
    /// Entries of the profile; blocks of them this version holds; blocks done (present),
    /// fetched by the replay (and their bytes), shared with a reader, failed.
    #[serde(default)]
    pub entries: u64,
    #[serde(default)]
    pub blocks: u64,
    #[serde(default)]
    pub present: u64,
    #[serde(default)]
    pub fetched: u64,
    #[serde(default)]
    pub fetched_bytes: u64,
    #[serde(default)]
    pub shared: u64,
    #[serde(default)]
    pub failed: u64,
}

/// What a commit made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitReport {
    pub volume: String,
    pub branch: String,
    /// Hex ids.
    pub commit: String,
    pub parent: String,
    pub files: u64,
    pub bytes: u64,
    /// Chunks made from changed content, and their bytes (uploaded unless present).
    pub new_chunks: u64,
    pub new_bytes: u64,
}

impl Response {
    pub fn error(message: impl Into<String>) -> Self {
        Self::Error {
            message: message.into(),
        }
    }
}

/// The local changes of a mounted volume relative to the commit it was mounted from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub volume: String,
    /// Hex id of the commit the overlay sits on.
    pub base_commit: String,
    pub changes: Vec<Change>,
    /// Sum of `bytes` over the changes.
    pub bytes_changed: u64,
    /// Local disk used by the overlay.
    pub overlay_bytes: u64,
}

/// One changed path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The path now (for a deletion: the path that was deleted).
    pub path: WirePath,
    pub kind: ChangeKind,
    /// `file`, `dir`, `symlink`, `fifo`, `socket`, `chardev` or `blockdev`.
    pub node_kind: String,
    /// The content changed (always true for an added file with data).
    pub data: bool,
    /// Metadata changed (mode, owner, times, xattrs, symlink target...).
    pub meta: bool,
    /// Bytes of content written (0 when only metadata changed).
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
    Renamed { from: WirePath },
}

/// The detail of one change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDiff {
    pub change: Change,
    /// Size in the base commit (`None` when the path was added).
    pub old_size: Option<u64>,
    /// Size now (`None` when the path was deleted).
    pub new_size: Option<u64>,
    /// Changed byte ranges `[start, end)`, sorted and disjoint.
    pub ranges: Vec<[u64; 2]>,
    pub meta: Vec<MetaChange>,
}

/// One metadata field that changed, both values formatted for people (`mode`: `0644`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaChange {
    /// `mode`, `uid`, `gid`, `mtime`, `xattr:NAME`, `target`...
    pub field: String,
    /// Empty when the field did not exist (an added xattr).
    pub old: String,
    /// Empty when the field no longer exists (a removed xattr).
    pub new: String,
}

// ---------------------------------------------------------------------------------------------
// Framing

/// Why a line could not be read as a message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a JSON object with a protocol version \"v\": {0}")]
    NotVersioned(serde_json::Error),
    #[error("the line has no protocol version \"v\" (this is control protocol version {VERSION})")]
    MissingVersion,
    #[error(
        "control protocol version {0} is not supported: this side speaks version {VERSION}; use \
         the horcrux binary the volume was mounted with, or unmount and mount it again with this one"
    )]
    Version(u32),
    #[error("malformed message: {0}")]
    Malformed(serde_json::Error),
}

#[derive(Deserialize)]
struct Versioned {
    v: Option<u32>,
}

/// One message as a line: `{"v":1,` followed by the message's own fields, and `\n`.
pub fn encode_line<T: Serialize>(msg: &T) -> serde_json::Result<Vec<u8>> {
    let body = serde_json::to_vec(msg)?;
    if body.first() != Some(&b'{') {
        return Err(serde::ser::Error::custom("a message must be a JSON object"));
    }
    let mut out = Vec::with_capacity(body.len() + 16);
    out.extend_from_slice(format!("{{\"v\":{VERSION}").as_bytes());
    if body != b"{}" {
        out.push(b',');
    }
    out.extend_from_slice(&body[1..]);
    out.push(b'\n');
    Ok(out)
}

/// A message from one line (without or with its `\n`), checking its version first.
pub fn decode_line<T: DeserializeOwned>(line: &[u8]) -> Result<T, DecodeError> {
    let v: Versioned = serde_json::from_slice(line).map_err(DecodeError::NotVersioned)?;
    match v.v {
        None => return Err(DecodeError::MissingVersion),
        Some(VERSION) => {}
        Some(other) => return Err(DecodeError::Version(other)),
    }
    serde_json::from_slice(line).map_err(DecodeError::Malformed)
}

// ---------------------------------------------------------------------------------------------
// Server

/// What a daemon does with a request. Called on a connection's thread; may block.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request) -> Response;
}

/// A listening control socket. Dropping it (or [`Server::shutdown`]) stops accepting, closes
/// open connections and removes the socket file (if it is still the one it bound).
#[derive(Debug)]
pub struct Server {
    socket: PathBuf,
    /// Device and inode of the socket file this server bound.
    id: (u64, u64),
    shared: Arc<Shared>,
    /// Shared with the accept thread, so its fd stays open until both are done with it.
    listener: Arc<UnixListener>,
    accept: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    next_conn: AtomicU64,
    conns: Mutex<HashMap<u64, UnixStream>>,
}

/// Listen on `socket` and answer requests with `handler`, on a thread of its own (one more per
/// connection). A socket file left by a dead daemon is replaced; one a live process answers on
/// is refused (`AddrInUse`), and so is any other file at that path. The socket's directory is
/// created (mode 0700) if missing; the socket is mode 0600 from the moment it is reachable.
pub fn serve(socket: &Path, handler: Arc<dyn Handler>) -> io::Result<Server> {
    let dir = socket
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = socket.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a socket path", socket.display()),
        )
    })?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    match std::fs::symlink_metadata(socket) {
        Ok(md) if !md.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; move it away to start the control socket",
                    socket.display()
                ),
            ));
        }
        Ok(_) => match UnixStream::connect(socket) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "another process (a horcrux daemon?) already listens on {}",
                        socket.display()
                    ),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                // Left by a daemon that died: nothing answers on it.
                std::fs::remove_file(socket).or_else(ignore_not_found)?;
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("checking the existing socket {}: {e}", socket.display()),
                ));
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Bind under a temporary name, restrict it, then rename it into place: no client can reach
    // the socket before it is 0600, and no umask games in a multi-threaded process.
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    std::fs::remove_file(&tmp).or_else(ignore_not_found)?;
    let listener = UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|_| std::fs::rename(&tmp, socket));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let md = std::fs::symlink_metadata(socket)?;
    let shared = Arc::new(Shared::default());
    let listener = Arc::new(listener);
    let accept = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("horcrux-control".into())
            .spawn({
                let listener = listener.clone();
                move || accept_loop(&listener, handler, shared)
            })?
    };
    Ok(Server {
        socket: socket.to_path_buf(),
        id: (md.dev(), md.ino()),
        shared,
        listener,
        accept: Some(accept),
    })
}

fn ignore_not_found(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

impl Server {
    /// The socket path this server listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stop: as dropping, but explicit.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept thread: shutdown(2) of a listening socket makes a blocked accept(2)
        // return (EINVAL) on Linux.
        // SAFETY: the fd is the listener's, open as long as `self.listener` is.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        let _ = accept.join();
        for (_, c) in self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        // Remove the socket only if it is still ours (not a successor's).
        if let Ok(md) = std::fs::symlink_metadata(&self.socket) {
            if (md.dev(), md.ino()) == self.id {
                let _ = std::fs::remove_file(&self.socket);
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: &UnixListener, handler: Arc<dyn Handler>, shared: Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and the like: do not spin.
                tracing::warn!(error = %e, "control socket: accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        {
            let mut conns = shared.conns.lock().unwrap_or_else(|p| p.into_inner());
            if conns.len() >= MAX_CONNECTIONS {
                drop(conns);
                let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = write_response(
                    &mut &stream,
                    &Response::error(format!(
                        "the daemon is busy: {MAX_CONNECTIONS} control connections are open; \
                         try again"
                    )),
                );
                continue;
            }
            match stream.try_clone() {
                Ok(c) => {
                    conns.insert(id, c);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control socket: cannot clone a connection");
                    continue;
                }
            }
        }
        let (handler, shared2) = (handler.clone(), shared.clone());
        let spawned = std::thread::Builder::new()
            .name("horcrux-control-conn".into())
            .spawn(move || {
                connection(stream, &*handler);
                shared2
                    .conns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "control socket: cannot start a connection thread");
            shared
                .conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        }
    }
}

fn write_response(w: &mut impl Write, resp: &Response) -> io::Result<()> {
    let line = encode_line(resp).unwrap_or_else(|e| {
        encode_line(&Response::error(format!(
            "the daemon could not encode its answer: {e}"
        )))
        .expect("an error response always encodes")
    });
    w.write_all(&line)?;
    w.flush()
}

/// Serve one connection until the client closes it, idles too long or sends too long a line.
fn connection(stream: UnixStream, handler: &dyn Handler) {
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let mut reader = BufReader::new(&stream);
    let mut writer = &stream;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match (&mut reader)
            .take(MAX_REQUEST_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(n) => n,
            Err(_) => return, // timeout or reset: nothing to answer
        };
        if n == 0 {
            return;
        }
        let complete = line.last() == Some(&b'\n');
        if !complete && line.len() >= MAX_REQUEST_LINE {
            let _ = write_response(
                &mut writer,
                &Response::error(format!(
                    "request line longer than {} KiB; closing the connection",
                    MAX_REQUEST_LINE >> 10
                )),
            );
            return;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            if complete {
                continue;
            }
            return;
        }
        let resp = match decode_line::<Request>(&line) {
            Ok(req) => {
                let what = format!("{req:?}");
                tracing::debug!(request = %what, "control request");
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.handle(req)))
                    .unwrap_or_else(|_| {
                        tracing::error!(request = %what, "control request handler panicked");
                        Response::error(
                            "internal error in the daemon while answering (see its log)",
                        )
                    })
            }
            Err(e) => Response::error(format!("bad request: {e}")),
        };
        if write_response(&mut writer, &resp).is_err() || !complete {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// Why talking to a daemon failed. The messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "no horcrux daemon is listening on {} — is the volume mounted? (`horcrux mount ACCESS \
         MOUNTPOINT`)",
        socket.display()
    )]
    NotListening {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "not allowed to use the daemon's socket {}: the volume was mounted by another user; run \
         this command as that user (e.g. with sudo)",
        socket.display()
    )]
    PermissionDenied {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the daemon on {} did not answer within {:.1} s; it may be busy or stuck (see its log), \
         or try again with a longer --timeout",
        socket.display(),
        timeout.as_secs_f64()
    )]
    Timeout { socket: PathBuf, timeout: Duration },
    #[error(
        "the daemon on {} closed the connection without answering; it may have crashed (see its \
         log)",
        socket.display()
    )]
    Closed { socket: PathBuf },
    #[error(
        "the daemon on {} speaks control protocol version {theirs}, this horcrux speaks version \
         {VERSION}: use the horcrux binary the volume was mounted with, or unmount and mount it \
         again with this one",
        socket.display()
    )]
    Version { socket: PathBuf, theirs: u32 },
    #[error(
        "the daemon on {} sent an answer this horcrux cannot read ({message}); are the daemon \
         and this command the same horcrux version?",
        socket.display()
    )]
    Protocol { socket: PathBuf, message: String },
    #[error(
        "the daemon's answer on {} is larger than {} MiB; ask about a narrower path",
        socket.display(),
        limit >> 20
    )]
    TooLarge { socket: PathBuf, limit: usize },
    #[error("talking to the daemon on {}: {source}", socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A connection to a daemon, for one request or several in turn.
#[derive(Debug)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connect to the daemon on `socket`. `timeout` bounds each wait for the daemon (to take a
    /// request, and for each part of an answer).
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, ControlError> {
        let sock = socket.to_path_buf();
        let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ControlError::NotListening {
                    socket: sock.clone(),
                    source: e,
                }
            }
            io::ErrorKind::PermissionDenied => ControlError::PermissionDenied {
                socket: sock.clone(),
                source: e,
            },
            _ => ControlError::Io {
                socket: sock.clone(),
                source: e,
            },
        })?;
        let io_err = |e| ControlError::Io {
            socket: sock.clone(),
            source: e,
        };
        let timeout = timeout.max(Duration::from_millis(1));
        stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
        stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
        let writer = stream.try_clone().map_err(io_err)?;
        Ok(Self {
            socket: sock,
            timeout,
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Send one request and wait for its answer. A [`Response::Error`] is an `Ok`: the daemon
    /// answered, and its message is for the user.
    pub fn call(&mut self, req: &Request) -> Result<Response, ControlError> {
        let line = encode_line(req).map_err(|e| ControlError::Protocol {
            socket: self.socket.clone(),
            message: format!("cannot encode the request: {e}"),
        })?;
        self.writer
            .write_all(&line)
            .and_then(|_| self.writer.flush())
            .map_err(|e| self.io_error(e))?;
        let mut buf = Vec::new();
        (&mut self.reader)
            .take(MAX_RESPONSE_LINE as u64)
            .read_until(b'\n', &mut buf)
            .map_err(|e| self.io_error(e))?;
        if buf.last() != Some(&b'\n') {
            return Err(if buf.is_empty() {
                ControlError::Closed {
                    socket: self.socket.clone(),
                }
            } else if buf.len() >= MAX_RESPONSE_LINE {
                ControlError::TooLarge {
                    socket: self.socket.clone(),
                    limit: MAX_RESPONSE_LINE,
                }
            } else {
                ControlError::Protocol {
                    socket: self.socket.clone(),
                    message: "the answer was cut off".into(),
                }
            });
        }
        decode_line(&buf).map_err(|e| match e {
            DecodeError::Version(theirs) => ControlError::Version {
                socket: self.socket.clone(),
                theirs,
            },
            other => ControlError::Protocol {
                socket: self.socket.clone(),
                message: other.to_string(),
            },
        })
    }

    fn io_error(&self, e: io::Error) -> ControlError {
        let socket = self.socket.clone();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ControlError::Timeout {
                socket,
                timeout: self.timeout,
            },
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::UnexpectedEof => ControlError::Closed { socket },
            _ => ControlError::Io { socket, source: e },
        }
    }
}

/// Connect to the daemon on `socket`, send `req`, and return its answer.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    Client::connect(socket, timeout)?.call(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(path: &str, kind: ChangeKind) -> Change {
        Change {
            path: path.into(),
            kind,
            node_kind: "file".into(),
            data: true,
            meta: false,
            bytes: 4096,
        }
    }

    /// Answers from fixed data; echoes the path it was given in a diff.
    struct Fake {
        ranges: usize,
    }

    impl Handler for Fake {
        fn handle(&self, req: Request) -> Response {
            match req {
                Request::Ping => Response::Pong {
                    volume: "AMCC".into(),
                    commit: "abc".into(),
                    pid: std::process::id(),
                },
                Request::Status => Response::Status(StatusReport {
                    volume: "AMCC".into(),
                    base_commit: "abc".into(),
                    changes: vec![
                        change("a", ChangeKind::Added),
                        change(
                            "d/n",
                            ChangeKind::Renamed {
                                from: WirePath::new(b"d/\xff".to_vec()),
                            },
                        ),
                    ],
                    bytes_changed: 8192,
                    overlay_bytes: 12288,
                }),
                Request::Diff { path } => {
                    let path = path.unwrap_or_default();
                    if path.as_bytes() == b"panic" {
                        panic!("test panic");
                    }
                    Response::Diff(vec![FileDiff {
                        change: change(&path.to_string(), ChangeKind::Modified),
                        old_size: Some(1 << 30),
                        new_size: Some(1 << 30),
                        ranges: (0..self.ranges as u64)
                            .map(|i| [i * 8192, i * 8192 + 4096])
                            .collect(),
                        meta: vec![MetaChange {
                            field: "mode".into(),
                            old: "0644".into(),
                            new: "0600".into(),
                        }],
                    }])
                }
                Request::Discard { .. } => Response::Discarded { entries: 3 },
                Request::Describe
                | Request::Checkout { .. }
                | Request::ResetHard { .. }
                | Request::Prefetch { .. }
                | Request::PrefetchStatus
                | Request::PrefetchCancel
                | Request::Stats => Response::error("unused"),
                Request::ReplayStatus => Response::error("unused"),
                Request::Commit { message, .. } => Response::Committed(CommitReport {
                    volume: "AMCC".into(),
                    branch: "main".into(),
                    commit: "c".repeat(64),
                    parent: "abc".into(),
                    files: 1,
                    bytes: message.len() as u64,
                    new_chunks: 1,
                    new_bytes: 7,
                }),
            }
        }
    }

    #[test]
    fn prefetch_messages_on_the_wire() {
        let r: Request = decode_line(br#"{"v":1,"type":"prefetch","all":true}"#).unwrap();
        assert_eq!(
            r,
            Request::Prefetch {
                all: true,
                paths: vec![],
                bandwidth: None,
                concurrency: None
            }
        );
        let line = encode_line(&Request::PrefetchStatus).unwrap();
        assert_eq!(line, b"{\"v\":1,\"type\":\"prefetch_status\"}\n");
        let line = encode_line(&Response::NoPrefetch).unwrap();
        assert_eq!(line, b"{\"v\":1,\"type\":\"no_prefetch\"}\n");
    }

    fn start(dir: &Path, ranges: usize) -> Server {
        serve(&dir.join("run/t.sock"), Arc::new(Fake { ranges })).unwrap()
    }

    const T: Duration = Duration::from_secs(10);

    /// Send raw bytes, read raw answer lines until EOF or `lines` lines.
    fn raw(socket: &Path, send: &[u8], lines: usize) -> Vec<String> {
        let s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        (&s).write_all(send).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut r = BufReader::new(&s);
        let mut out = Vec::new();
        for _ in 0..lines {
            let mut l = String::new();
            if r.read_line(&mut l).unwrap() == 0 {
                break;
            }
            out.push(l);
        }
        out
    }

    #[test]
    fn wire_paths_are_lossless() {
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"plain/file.txt".to_vec(),
            "ünïcode/日本".as_bytes().to_vec(),
            b"bad\xff\xfe/\x80x".to_vec(),
            b"quote\"back\\slash\nnewline\ttab".to_vec(),
            (0..=255u8).filter(|b| *b != b'/').collect(),
        ];
        for bytes in cases {
            let p = WirePath::from(bytes.clone());
            let json = serde_json::to_string(&p).unwrap();
            let back: WirePath = serde_json::from_str(&json).unwrap();
            assert_eq!(back.as_bytes(), &bytes[..], "{json}");
            assert_eq!(Vec::<u8>::from(back.clone()), bytes);
            assert_eq!(WirePath::from_path(&back.to_path_buf()), back);
            // Inside a request too (internally tagged enums buffer their content).
            let req = Request::Diff { path: Some(p) };
            let line = encode_line(&req).unwrap();
            assert_eq!(decode_line::<Request>(&line).unwrap(), req);
        }
        assert_eq!(
            serde_json::to_string(&WirePath::from("a/b")).unwrap(),
            r#""a/b""#
        );
        assert_eq!(
            serde_json::to_string(&WirePath::new(b"a\xff".to_vec())).unwrap(),
            r#"{"hex":"61ff"}"#
        );
        let upper: WirePath = serde_json::from_str(r#"{"hex":"61FF"}"#).unwrap();
        assert_eq!(upper.as_bytes(), b"a\xff");
        for bad in [
            r#"{"hex":"6"}"#,
            r#"{"hex":"zz"}"#,
            r#"{"b64":"YQ=="}"#,
            r#"{}"#,
            "7",
        ] {
            assert!(serde_json::from_str::<WirePath>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wire_paths_display_and_checks() {
        assert_eq!(
            WirePath::new(b"a b/\xffc".to_vec()).to_string(),
            "a b/\\xffc"
        );
        assert_eq!(WirePath::from("x\ny\\z").to_string(), "x\\x0ay\\\\z");
        assert_eq!(WirePath::from("日本").to_string(), "日本");
        assert!(WirePath::root().check().is_ok());
        assert!(WirePath::from("a/b\u{e9}").check().is_ok());
        for bad in ["/a", "a/", "a//b", "./a", "a/..", "a\0b"] {
            assert!(WirePath::from(bad).check().is_err(), "{bad}");
        }
        let p = WirePath::from("db/ib");
        assert!(p.starts_with(&WirePath::root()));
        assert!(p.starts_with(&WirePath::from("db")));
        assert!(p.starts_with(&WirePath::from("db/ib")));
        assert!(!p.starts_with(&WirePath::from("d")));
        assert!(!p.starts_with(&WirePath::from("db/i")));
    }

    #[test]
    fn stats_reports_round_trip() {
        let mut r = StatsReport {
            volume: "AMCC".into(),
            metrics_addr: Some("127.0.0.1:9184".into()),
            passthrough: Some(PassthroughFigures {
                active: true,
                opens: 4,
                registered: 1,
                not_cached: 2,
            }),
            ..Default::default()
        };
        r.cache.direct_bytes = 1 << 20;
        r.fetch.errors.insert("verify".into(), 2);
        r.sources.push(SourceFigures {
            source: "file:///r".into(),
            requests: 3,
            latency: HistogramFigures {
                bounds_us: vec![100],
                buckets: vec![1, 2],
                sum_us: 900,
                count: 3,
            },
            ..Default::default()
        });
        let line = encode_line(&Response::Stats(Box::new(r.clone()))).unwrap();
        assert_eq!(
            decode_line::<Response>(&line).unwrap(),
            Response::Stats(Box::new(r))
        );
        assert_eq!(
            encode_line(&Request::Stats).unwrap(),
            b"{\"v\":1,\"type\":\"stats\"}\n"
        );
        // An older daemon's report without `metrics_addr` still reads.
        let mut v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        v["data"].as_object_mut().unwrap().remove("metrics_addr");
        let back: Response = decode_line(v.to_string().as_bytes()).unwrap();
        assert!(matches!(back, Response::Stats(r) if r.metrics_addr.is_none()));
        // Nor does one without the passthrough figures or the direct-write bytes.
        v["data"].as_object_mut().unwrap().remove("passthrough");
        v["data"]["cache"]
            .as_object_mut()
            .unwrap()
            .remove("direct_bytes");
        let back: Response = decode_line(v.to_string().as_bytes()).unwrap();
        assert!(
            matches!(back, Response::Stats(r) if r.passthrough.is_none() && r.cache.direct_bytes == 0)
        );
    }

    #[test]
    fn lines_have_the_documented_shape() {
        let s = |m: &dyn erased::Ser| String::from_utf8(m.line()).unwrap();
        assert_eq!(s(&Request::Ping), "{\"v\":1,\"type\":\"ping\"}\n");
        assert_eq!(s(&Request::Status), "{\"v\":1,\"type\":\"status\"}\n");
        assert_eq!(
            s(&Request::Diff {
                path: Some("a".into())
            }),
            "{\"v\":1,\"type\":\"diff\",\"path\":\"a\"}\n"
        );
        assert_eq!(
            s(&Response::Discarded { entries: 2 }),
            "{\"v\":1,\"type\":\"discarded\",\"data\":{\"entries\":2}}\n"
        );
        assert_eq!(
            s(&Response::Diff(vec![])),
            "{\"v\":1,\"type\":\"diff\",\"data\":[]}\n"
        );
        let renamed = serde_json::to_string(&ChangeKind::Renamed { from: "x".into() }).unwrap();
        assert_eq!(renamed, r#"{"renamed":{"from":"x"}}"#);
        assert_eq!(
            serde_json::to_string(&ChangeKind::Added).unwrap(),
            r#""added""#
        );
        // Leniency: the path may be absent; unknown fields are ignored; "v" may come anywhere.
        let r: Request = decode_line(br#"{"type":"discard","later":true,"v":1}"#).unwrap();
        assert_eq!(r, Request::Discard { path: None });
        let r: Response =
            decode_line(br#"{"data":{"entries":1},"v":1,"type":"discarded","x":0}"#).unwrap();
        assert_eq!(r, Response::Discarded { entries: 1 });
        assert!(matches!(
            decode_line::<Request>(br#"{"type":"ping"}"#),
            Err(DecodeError::MissingVersion)
        ));
        assert!(matches!(
            decode_line::<Request>(br#"{"v":2,"type":"ping"}"#),
            Err(DecodeError::Version(2))
        ));
    }

    /// `encode_line` over both message types through one object-safe trait, for the test.
    mod erased {
        pub trait Ser {
            fn line(&self) -> Vec<u8>;
        }
        impl<T: serde::Serialize> Ser for T {
            fn line(&self) -> Vec<u8> {
                super::encode_line(self).unwrap()
            }
        }
    }

    #[test]
    fn round_trips_over_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let server = start(dir.path(), 3);
        let sock = server.socket().to_path_buf();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let run = std::fs::metadata(dir.path().join("run")).unwrap();
        assert_eq!(run.permissions().mode() & 0o777, 0o700);

        let mut c = Client::connect(&sock, T).unwrap();
        match c.call(&Request::Ping).unwrap() {
            Response::Pong { volume, pid, .. } => {
                assert_eq!(volume, "AMCC");
                assert_eq!(pid, std::process::id());
            }
            other => panic!("{other:?}"),
        }
        let commit = Request::Commit {
            message: "seven b".into(),
            author: "me".into(),
        };
        match c.call(&commit).unwrap() {
            Response::Committed(r) => assert_eq!((r.branch.as_str(), r.bytes), ("main", 7)),
            other => panic!("{other:?}"),
        }
        let Response::Status(st) = c.call(&Request::Status).unwrap() else {
            panic!()
        };
        assert_eq!(st.changes.len(), 2);
        assert_eq!(
            st.changes[1].kind,
            ChangeKind::Renamed {
                from: WirePath::new(b"d/\xff".to_vec())
            }
        );
        let Response::Diff(d) = c
            .call(&Request::Diff {
                path: Some("x/y".into()),
            })
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(d[0].change.path, WirePath::from("x/y"));
        assert_eq!(d[0].ranges, vec![[0, 4096], [8192, 12288], [16384, 20480]]);
        assert_eq!(
            call(&sock, &Request::Discard { path: None }, T).unwrap(),
            Response::Discarded { entries: 3 }
        );
        drop(c);
        server.shutdown();
        assert!(!sock.exists(), "socket removed on shutdown");
    }

    #[test]
    fn garbage_gets_errors_and_the_connection_survives() {
        let dir = tempfile::tempdir().unwrap();
        let server = start(dir.path(), 1);
        let input = b"not json\n\n{\"v\":1,\"type\":\"nope\"}\n{\"type\":\"ping\"}\n\
            {\"v\":2,\"type\":\"ping\"}\n[1,2]\n{\"v\":1,\"type\":\"diff\",\"path\":\"panic\"}\n\
            {\"v\":1,\"type\":\"ping\"}\n";
        let lines = raw(server.socket(), input, 7);
        assert_eq!(lines.len(), 7, "{lines:?}");
        let resp: Vec<Response> = lines
            .iter()
            .map(|l| decode_line(l.as_bytes()).unwrap())
            .collect();
        let msg = |i: usize| match &resp[i] {
            Response::Error { message } => message.clone(),
            other => panic!("{i}: {other:?}"),
        };
        assert!(msg(0).contains("bad request"), "{}", msg(0));
        assert!(msg(1).contains("unknown variant `nope`"), "{}", msg(1));
        assert!(msg(2).contains("no protocol version"), "{}", msg(2));
        assert!(msg(3).contains("version 2 is not supported"), "{}", msg(3));
        assert!(msg(4).contains("bad request"), "{}", msg(4));
        assert!(msg(5).contains("internal error"), "{}", msg(5));
        assert!(matches!(resp[6], Response::Pong { .. }));
        // A last request without a newline (the client's end then closed) is still answered.
        let lines = raw(server.socket(), b"{\"v\":1,\"type\":\"ping\"}", 2);
        assert_eq!(lines.len(), 1);
    }

    #[test]
    fn overlong_lines_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let server = start(dir.path(), 1);
        let sock = server.socket().to_path_buf();
        let s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        // Write from another thread: the daemon stops reading at the cap.
        let w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = (&w).write_all(&vec![b'x'; MAX_REQUEST_LINE + 4096]);
        });
        let mut l = String::new();
        BufReader::new(&s).read_line(&mut l).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Both);
        writer.join().unwrap();
        match decode_line::<Response>(l.as_bytes()).unwrap() {
            Response::Error { message } => assert!(message.contains("longer than"), "{message}"),
            other => panic!("{other:?}"),
        }
        // The server goes on.
        assert!(matches!(
            call(&sock, &Request::Ping, T).unwrap(),
            Response::Pong { .. }
        ));
    }

    #[test]
    fn large_responses() {
        let dir = tempfile::tempdir().unwrap();
        let server = start(dir.path(), 300_000);
        let Response::Diff(d) = call(server.socket(), &Request::Diff { path: None }, T).unwrap()
        else {
            panic!()
        };
        assert_eq!(d[0].ranges.len(), 300_000);
        assert_eq!(
            d[0].ranges[299_999],
            [299_999 * 8192, 299_999 * 8192 + 4096]
        );
    }

    #[test]
    fn stale_sockets_are_replaced_live_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("run/t.sock");
        std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
        // A dead daemon's socket: bound, then its listener gone.
        drop(UnixListener::bind(&sock).unwrap());
        assert!(sock.exists());
        let e = call(&sock, &Request::Ping, T).unwrap_err();
        assert!(matches!(e, ControlError::NotListening { .. }), "{e}");
        let server = start(dir.path(), 1);
        assert!(matches!(
            call(&sock, &Request::Ping, T).unwrap(),
            Response::Pong { .. }
        ));
        // A second daemon on the same socket is refused; the first keeps serving.
        let e = serve(&sock, Arc::new(Fake { ranges: 1 })).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert!(e.to_string().contains("already listens"), "{e}");
        assert!(matches!(
            call(&sock, &Request::Ping, T).unwrap(),
            Response::Pong { .. }
        ));
        drop(server);
        assert!(!sock.exists());
        // Not a socket: left alone.
        std::fs::write(&sock, b"precious").unwrap();
        let e = serve(&sock, Arc::new(Fake { ranges: 1 })).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&sock).unwrap(), b"precious");
    }

    #[test]
    fn a_replaced_socket_is_not_removed_by_the_old_server() {
        let dir = tempfile::tempdir().unwrap();
        let server = start(dir.path(), 1);
        let sock = server.socket().to_path_buf();
        std::fs::remove_file(&sock).unwrap();
        let _other = UnixListener::bind(&sock).unwrap();
        drop(server);
        assert!(sock.exists());
    }

    #[test]
    fn shutdown_closes_idle_connections_promptly() {
        let dir = tempfile::tempdir().unwrap();
        let server = start(dir.path(), 1);
        let mut c = Client::connect(server.socket(), T).unwrap();
        assert!(matches!(
            c.call(&Request::Ping).unwrap(),
            Response::Pong { .. }
        ));
        let t0 = std::time::Instant::now();
        drop(server);
        assert!(t0.elapsed() < Duration::from_secs(2));
        let e = c.call(&Request::Ping).unwrap_err();
        assert!(matches!(e, ControlError::Closed { .. }), "{e}");
        assert!(e.to_string().contains("may have crashed"), "{e}");
    }

    #[test]
    fn connections_beyond_the_cap_are_told_to_retry() {
        let dir = tempfile::tempdir().unwrap();
        let server = start(dir.path(), 1);
        let mut open: Vec<Client> = (0..MAX_CONNECTIONS)
            .map(|_| Client::connect(server.socket(), T).unwrap())
            .collect();
        for c in &mut open {
            assert!(matches!(
                c.call(&Request::Ping).unwrap(),
                Response::Pong { .. }
            ));
        }
        match call(server.socket(), &Request::Ping, T).unwrap() {
            Response::Error { message } => assert!(message.contains("busy"), "{message}"),
            other => panic!("{other:?}"),
        }
        drop(open);
        // Their threads notice the hang-up and leave.
        let deadline = std::time::Instant::now() + T;
        loop {
            match call(server.socket(), &Request::Ping, T).unwrap() {
                Response::Pong { .. } => break,
                _ if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn client_errors_say_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.sock");
        let e = call(&missing, &Request::Ping, T).unwrap_err();
        assert!(matches!(e, ControlError::NotListening { .. }));
        let m = e.to_string();
        assert!(m.contains("no horcrux daemon is listening on"), "{m}");
        assert!(m.contains("is the volume mounted?"), "{m}");

        // A listener that never answers.
        let mute = dir.path().join("mute.sock");
        let l = UnixListener::bind(&mute).unwrap();
        let e = call(&mute, &Request::Ping, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, ControlError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("did not answer within 0.2 s"), "{e}");

        drop(l);

        // One that hangs up, one from the future, one that speaks nonsense, one cut short.
        for (i, (reply, want)) in [
            (&b""[..], "closed the connection"),
            (
                b"{\"v\":2,\"type\":\"pong\"}\n",
                "speaks control protocol version 2",
            ),
            (b"{\"v\":1,\"type\":\"what\"}\n", "cannot read"),
            (b"{\"v\":1,\"type\":\"pong\"", "cut off"),
        ]
        .into_iter()
        .enumerate()
        {
            let sock = dir.path().join(format!("fake{i}.sock"));
            let l = UnixListener::bind(&sock).unwrap();
            let server = std::thread::spawn(move || {
                let (s, _) = l.accept().unwrap();
                let mut line = String::new();
                let _ = BufReader::new(&s).read_line(&mut line);
                let _ = (&s).write_all(reply);
            });
            let e = call(&sock, &Request::Ping, T).unwrap_err().to_string();
            server.join().unwrap();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}

//! The peer service: a server that answers other nodes out of a [`PeerBackend`], and a
//! [`PeerClient`] to read from one.
//!
//! Transport: gRPC (tonic) over HTTP/2 over TLS 1.3 with mutual authentication (see
//! [`crate::tls`]). The schema is `horcrux/peer.proto`; its wire rules are in
//! `docs/FORMAT.md` ("Peer protocol").
//!
//! Data path: a range read is a server stream of frames of at most [`FRAME`] bytes. Frames are
//! `Bytes` end to end — the backend's buffer is sliced, never copied per byte, and the client's
//! decoder hands out slices of its receive buffer. HTTP/2 flow-control windows are raised far
//! above their 64 KiB defaults so one stream is not throttled by round trips on a fast link.
//!
//! Nothing here trusts a peer's bytes: the caller (the core's fetcher) verifies every block
//! against the hashes of its own manifest.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio_rustls::rustls::{ClientConfig, ServerConfig, pki_types::ServerName};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status};

/// Generated protobuf messages and tonic stubs (`horcrux.peer.v1`).
#[allow(missing_debug_implementations, clippy::all)]
pub mod pb {
    tonic::include_proto!("horcrux.peer.v1");
}

use pb::peer_server::{Peer, PeerServer};

/// Largest frame of a data stream. One block (1 MiB by default) per frame.
pub const FRAME: usize = 1 << 20;
/// Largest message either side accepts (a frame plus its envelope, a big `Have` or list batch).
const MAX_MESSAGE: usize = 16 << 20;
/// HTTP/2 flow-control windows: a stream may have this much in flight before its reader
/// acknowledges. 16 MiB per stream, 64 MiB per connection: enough for GB/s on a LAN.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;
/// HTTP/2 DATA frame size we accept: larger frames mean fewer frame headers and wakeups.
const H2_FRAME: u32 = (1 << 20) - 1;
/// Entries per `List` reply.
const LIST_BATCH: usize = 10_000;
/// Frames a range stream reads ahead of the network.
const READ_AHEAD: usize = 4;
/// Bound on a TLS handshake (a client that connects and says nothing holds nothing for long).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a client knows about the chunk it reads (from its manifest); see `ChunkHint` in the
/// schema. The backend must check that the block hashes hash up to `chunk_id` before trusting
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHint {
    pub chunk_id: [u8; 32],
    pub len: u64,
    pub block_size: u32,
    pub block_hashes: Vec<[u8; 32]>,
}

impl ChunkHint {
    /// As sent on the wire.
    pub fn to_pb(&self) -> pb::ChunkHint {
        let mut hashes = BytesMut::with_capacity(self.block_hashes.len() * 32);
        for h in &self.block_hashes {
            hashes.extend_from_slice(h);
        }
        pb::ChunkHint {
            chunk_id: Bytes::copy_from_slice(&self.chunk_id),
            len: self.len,
            block_size: self.block_size,
            block_hashes: hashes.freeze(),
        }
    }

    /// From the wire: checks the shape only (32-byte id, whole hashes, a block size); whether
    /// the hashes hash up to the id is the backend's check.
    pub fn from_pb(h: &pb::ChunkHint) -> Result<Self, Status> {
        let chunk_id: [u8; 32] = h.chunk_id[..]
            .try_into()
            .map_err(|_| Status::invalid_argument("chunk hint: chunk_id must be 32 bytes"))?;
        if h.block_hashes.len() % 32 != 0 || h.block_size == 0 {
            return Err(Status::invalid_argument(
                "chunk hint: block_hashes must be 32-byte hashes and block_size > 0",
            ));
        }
        Ok(Self {
            chunk_id,
            len: h.len,
            block_size: h.block_size,
            block_hashes: h
                .block_hashes
                .chunks_exact(32)
                .map(|c| c.try_into().expect("32 bytes"))
                .collect(),
        })
    }
}

/// Which blocks of a chunk a node holds (see `ChunkPresence` in the schema).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChunkPresence {
    pub chunk_id: [u8; 32],
    /// 0 = not held.
    pub block_size: u32,
    pub len: u64,
    pub bitmap: Vec<u8>,
}

/// Errors a backend reports; each becomes one gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Nobody here has it: the client moves to its next mirror without blaming this one.
    #[error("{0}")]
    NotFound(String),
    /// The request itself is wrong (bad key, bad hint, range past the end).
    #[error("{0}")]
    Invalid(String),
    /// The backend could not answer now (its own source failed, disk error).
    #[error("{0}")]
    Failed(String),
}

impl From<BackendError> for Status {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::NotFound(m) => Status::not_found(m),
            BackendError::Invalid(m) => Status::invalid_argument(m),
            BackendError::Failed(m) => Status::unavailable(m),
        }
    }
}

/// What a peer server serves. Implemented by the core (repositories, read-through caches);
/// tests implement it to serve whatever they like, lies included.
#[async_trait::async_trait]
pub trait PeerBackend: Send + Sync + fmt::Debug + 'static {
    /// Bytes `range` of `key` in repository `repo`.
    async fn get_range(
        &self,
        repo: &str,
        key: &str,
        range: Range<u64>,
        hint: Option<&ChunkHint>,
    ) -> Result<Bytes, BackendError>;

    /// A whole object.
    async fn get(&self, repo: &str, key: &str) -> Result<Bytes, BackendError>;

    /// Whether each key exists.
    async fn exists(&self, repo: &str, keys: &[String]) -> Result<Vec<bool>, BackendError>;

    /// Keys under `prefix` with sizes, sorted.
    async fn list(&self, repo: &str, prefix: &str) -> Result<Vec<(String, u64)>, BackendError>;

    /// Which blocks of these chunks are held locally. Default: none.
    async fn chunks_present(&self, ids: &[[u8; 32]]) -> Vec<ChunkPresence> {
        ids.iter()
            .map(|id| ChunkPresence {
                chunk_id: *id,
                ..Default::default()
            })
            .collect()
    }
}

/// Server limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Data streams (`ReadRange`, `Get`) served at once; more wait up to `queue_wait`, then are
    /// refused with `RESOURCE_EXHAUSTED` (the client falls over to its next mirror).
    pub max_streams: usize,
    /// Bytes per second over all streams (`None` = unlimited).
    pub bandwidth: Option<u64>,
    pub queue_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_streams: 64,
            bandwidth: None,
            queue_wait: Duration::from_secs(5),
        }
    }
}

/// A token bucket shared by all streams of a server. A sender takes its frame's tokens and,
/// when that leaves the bucket in debt, sleeps until the debt would be repaid: the long-run
/// rate is exact and no frame is ever split.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(rate: u64) -> Self {
        let rate = rate.max(1) as f64;
        // A tenth of a second of traffic, at least one frame, so a frame never waits for
        // more than it needs.
        let burst = (rate / 10.0).max(FRAME as f64);
        Self {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    async fn take(&self, n: usize) {
        let wait = {
            let mut s = self.state.lock().await;
            let now = Instant::now();
            let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
            s.0 = (s.0 + refill).min(self.burst) - n as f64;
            s.1 = now;
            if s.0 >= 0.0 {
                return;
            }
            Duration::from_secs_f64(-s.0 / self.rate)
        };
        tokio::time::sleep(wait).await;
    }
}

#[derive(Debug)]
struct PeerService {
    backend: Arc<dyn PeerBackend>,
    streams: Arc<Semaphore>,
    bucket: Option<Arc<Bucket>>,
    queue_wait: Duration,
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<pb::DataFrame, Status>> + Send>>;
type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListReply, Status>> + Send>>;

impl PeerService {
    async fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        match tokio::time::timeout(self.queue_wait, self.streams.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(Status::resource_exhausted(
                "this peer is serving its maximum number of streams; try another source",
            )),
        }
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn have(&self, req: Request<pb::HaveRequest>) -> Result<Response<pb::HaveReply>, Status> {
        let r = req.into_inner();
        let ids = have_chunk_ids(&r)?;
        let keys_present = if r.keys.is_empty() {
            Vec::new()
        } else {
            self.backend.exists(&r.repo, &r.keys).await?
        };
        let chunks = if ids.is_empty() {
            Vec::new()
        } else {
            self.backend
                .chunks_present(&ids)
                .await
                .into_iter()
                .map(|p| pb::ChunkPresence {
                    chunk_id: Bytes::copy_from_slice(&p.chunk_id),
                    block_size: p.block_size,
                    len: p.len,
                    bitmap: Bytes::from(p.bitmap),
                })
                .collect()
        };
        Ok(Response::new(pb::HaveReply {
            keys_present,
            chunks,
        }))
    }

    type ReadRangeStream = FrameStream;

    async fn read_range(
        &self,
        req: Request<pb::ReadRangeRequest>,
    ) -> Result<Response<FrameStream>, Status> {
        let remote = req.remote_addr();
        let r = req.into_inner();
        let (range, hint) = read_range_args(&r)?;
        let end = range.end;
        let permit = self.permit().await?;
        let span = tracing::debug_span!("peer_read", ?remote, repo = %r.repo, key = %r.key, offset = r.offset, len = r.length);
        tracing::debug!(parent: &span, "range read");
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let backend = self.backend.clone();
        let bucket = self.bucket.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut at = r.offset;
            while at < end {
                // Frames end on FRAME boundaries of the object, so block-aligned reads map to
                // whole blocks of the backend.
                let next = ((at / FRAME as u64) + 1) * FRAME as u64;
                let piece = at..next.min(end);
                let out = backend
                    .get_range(&r.repo, &r.key, piece.clone(), hint.as_ref())
                    .await;
                let frame = match out {
                    Ok(b) if b.len() as u64 == piece.end - piece.start => b,
                    Ok(b) => {
                        let _ = tx
                            .send(Err(Status::internal(format!(
                                "backend returned {} bytes for a {}-byte range",
                                b.len(),
                                piece.end - piece.start
                            ))))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                if let Some(b) = &bucket {
                    b.take(frame.len()).await;
                }
                at = piece.end;
                let msg = pb::DataFrame {
                    data: frame,
                    total_len: 0,
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return; // the client went away
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type GetStream = FrameStream;

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<FrameStream>, Status> {
        let r = req.into_inner();
        let permit = self.permit().await?;
        let data = self.backend.get(&r.repo, &r.key).await?;
        let bucket = self.bucket.clone();
        let total = data.len() as u64;
        let stream = async_stream_frames(data, total, bucket, permit);
        Ok(Response::new(stream))
    }

    type ListStream = ListStream;

    async fn list(&self, req: Request<pb::ListRequest>) -> Result<Response<ListStream>, Status> {
        let r = req.into_inner();
        let entries = self.backend.list(&r.repo, &r.prefix).await?;
        let batches: Vec<Result<pb::ListReply, Status>> = if entries.is_empty() {
            vec![Ok(pb::ListReply::default())]
        } else {
            entries
                .chunks(LIST_BATCH)
                .map(|b| {
                    Ok(pb::ListReply {
                        entries: b
                            .iter()
                            .map(|(key, size)| pb::ListEntry {
                                key: key.clone(),
                                size: *size,
                            })
                            .collect(),
                    })
                })
                .collect()
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }
}

/// The chunk ids of a `Have` request, each exactly 32 bytes.
pub fn have_chunk_ids(r: &pb::HaveRequest) -> Result<Vec<[u8; 32]>, Status> {
    r.chunk_ids
        .iter()
        .map(|id| {
            <[u8; 32]>::try_from(&id[..])
                .map_err(|_| Status::invalid_argument("chunk ids must be 32 bytes"))
        })
        .collect()
}

/// The byte range and chunk hint of a `ReadRange` request: the range must not wrap around,
/// the hint must be well-formed.
pub fn read_range_args(
    r: &pb::ReadRangeRequest,
) -> Result<(Range<u64>, Option<ChunkHint>), Status> {
    let end = r
        .offset
        .checked_add(r.length)
        .ok_or_else(|| Status::invalid_argument("range overflows"))?;
    let hint = r.hint.as_ref().map(ChunkHint::from_pb).transpose()?;
    Ok((r.offset..end, hint))
}

/// A peer's answer to `Have` for `keys` keys and `chunks` chunk ids: one item per question,
/// in order, or a protocol error.
pub fn have_reply(
    r: pb::HaveReply,
    keys: usize,
    chunks: usize,
) -> Result<(Vec<bool>, Vec<ChunkPresence>), PeerError> {
    if r.keys_present.len() != keys || r.chunks.len() != chunks {
        return Err(PeerError::Protocol(
            "Have answered a different number of items than asked".into(),
        ));
    }
    let chunks = r
        .chunks
        .into_iter()
        .map(|c| ChunkPresence {
            chunk_id: c.chunk_id[..].try_into().unwrap_or([0; 32]),
            block_size: c.block_size,
            len: c.len,
            bitmap: c.bitmap.to_vec(),
        })
        .collect();
    Ok((r.keys_present, chunks))
}

/// A whole object as frames: zero-copy slices of `data`.
fn async_stream_frames(
    data: Bytes,
    total: u64,
    bucket: Option<Arc<Bucket>>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> FrameStream {
    let n = data.len().div_ceil(FRAME).max(1);
    let s = futures_util::stream::iter(0..n).then(move |i| {
        let data = data.clone();
        let bucket = bucket.clone();
        let _keep = &permit;
        async move {
            let piece = data.slice(i * FRAME..((i + 1) * FRAME).min(data.len()));
            if let Some(b) = &bucket {
                b.take(piece.len()).await;
            }
            Ok(pb::DataFrame {
                data: piece,
                total_len: if i == 0 { total } else { 0 },
            })
        }
    });
    Box::pin(s)
}

/// A server-side TLS connection that reports its TCP addresses to handlers (for logs).
struct TlsConn(tokio_rustls::server::TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        let tcp = self.0.get_ref().0;
        tonic::transport::server::TcpConnectInfo {
            local_addr: tcp.local_addr().ok(),
            remote_addr: tcp.peer_addr().ok(),
        }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Errors of the server as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("peer server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serve peers on `listener` until `shutdown` completes. With `tls` (the normal case) every
/// connection must complete a mutually authenticated TLS 1.3 handshake first; a client
/// without a certificate of the CA is dropped there and logged. Without `tls` the service is
/// plain HTTP/2 — only for measuring what TLS costs (`bench/peer`).
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    backend: Arc<dyn PeerBackend>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let svc = PeerService {
        backend,
        streams: Arc::new(Semaphore::new(limits.max_streams.max(1))),
        bucket: limits.bandwidth.map(|r| Arc::new(Bucket::new(r))),
        queue_wait: limits.queue_wait,
    };
    let server = PeerServer::new(svc)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let mut builder = Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(H2_FRAME)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    match tls {
        Some(cfg) => {
            let (tx, rx) = mpsc::channel::<Result<_, std::io::Error>>(64);
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            let accept = tokio::spawn(async move {
                loop {
                    let (tcp, addr) = match listener.accept().await {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "accepting a peer connection failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let _ = tcp.set_nodelay(true);
                    let acceptor = acceptor.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => {
                                tracing::debug!(%addr, "peer connected");
                                let _ = tx.send(Ok(TlsConn(s))).await;
                            }
                            Ok(Err(e)) => {
                                tracing::warn!(%addr, error = %e, "refused a peer connection (TLS handshake failed)");
                            }
                            Err(_) => {
                                tracing::warn!(%addr, "refused a peer connection (no TLS handshake within {HANDSHAKE_TIMEOUT:?})");
                            }
                        }
                    });
                }
            });
            let r = builder
                .add_service(server)
                .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown)
                .await;
            accept.abort();
            r?;
        }
        None => {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|c| {
                if let Ok(s) = &c {
                    let _ = s.set_nodelay(true);
                }
                c
            });
            builder
                .add_service(server)
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await?;
        }
    }
    Ok(())
}

/// Errors of a peer client call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// The peer does not have it (not a failure of the peer).
    #[error("{0}")]
    NotFound(String),
    /// The peer answered with an error, or could not be reached.
    #[error("{0}")]
    Failed(String),
    /// The answer broke the protocol (wrong length, bad frame).
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl From<Status> for PeerError {
    fn from(s: Status) -> Self {
        use std::error::Error as _;
        let mut msg = format!("{:?}: {}", s.code(), s.message());
        let mut src = s.source();
        while let Some(e) = src {
            // Transport errors repeat their cause in their own text: say each thing once.
            let text = e.to_string();
            if !msg.contains(&text) {
                msg.push_str(": ");
                msg.push_str(&text);
            }
            src = e.source();
        }
        if msg.contains("certificate") {
            msg.push_str(
                " (the TLS handshake failed: both nodes need certificates of the same CA — the \
                 ca.crt of --tls-dir — and the peer's certificate must name the address dialled; \
                 see `horcrux tls issue --san`)",
            );
        }
        match s.code() {
            tonic::Code::NotFound => PeerError::NotFound(s.message().to_string()),
            _ => PeerError::Failed(msg),
        }
    }
}

/// How to reach one peer.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `None` = plain HTTP/2 (benchmarks only).
    pub tls: Option<Arc<ClientConfig>>,
    /// Bound on TCP connect plus TLS handshake: a dead peer is left for the next mirror fast.
    pub connect_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            tls: None,
            connect_timeout: Duration::from_secs(2),
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A connection (lazily made, re-made after failures) to one peer.
#[derive(Debug, Clone)]
pub struct PeerClient {
    inner: pb::peer_client::PeerClient<Channel>,
    addr: String,
}

impl PeerClient {
    /// A client of the peer at `host:port`. Connects on first use (so it must be called
    /// inside a tokio runtime, but never waits); the server's certificate must be valid for
    /// `host` (a DNS name or an IP address).
    pub fn new(host: &str, port: u16, options: ClientOptions) -> Result<Self, PeerError> {
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let uri_host = if bare.contains(':') {
            format!("[{bare}]")
        } else {
            bare.clone()
        };
        let addr = format!("{uri_host}:{port}");
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| PeerError::Failed(format!("{addr}: {e}")))?
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(H2_FRAME)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .tcp_nodelay(true);
        let server_name = ServerName::try_from(bare.clone())
            .map_err(|e| PeerError::Failed(format!("{bare}: not a host name or address: {e}")))?;
        let tls = options.tls.map(tokio_rustls::TlsConnector::from);
        let timeout = options.connect_timeout;
        let connector = tower::service_fn(move |_: http::Uri| {
            let bare = bare.clone();
            let tls = tls.clone();
            let server_name = server_name.clone();
            async move {
                let connect = async {
                    let tcp = TcpStream::connect((bare.as_str(), port)).await?;
                    tcp.set_nodelay(true)?;
                    let io: Box<dyn Io> = match tls {
                        Some(c) => Box::new(c.connect(server_name, tcp).await?),
                        None => Box::new(tcp),
                    };
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(io))
                };
                match tokio::time::timeout(timeout, connect).await {
                    Ok(r) => r,
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no connection within {timeout:?}"),
                    )),
                }
            }
        });
        let channel = endpoint.connect_with_connector_lazy(connector);
        let inner = pb::peer_client::PeerClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Ok(Self { inner, addr })
    }

    /// `host:port` of the peer.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The frames of a range read, as they arrive.
    pub async fn read_range_stream(
        &self,
        repo: &str,
        key: &str,
        range: Range<u64>,
        hint: Option<&ChunkHint>,
    ) -> Result<impl Stream<Item = Result<Bytes, PeerError>> + use<>, PeerError> {
        let req = pb::ReadRangeRequest {
            repo: repo.to_string(),
            key: key.to_string(),
            offset: range.start,
            length: range.end.saturating_sub(range.start),
            hint: hint.map(ChunkHint::to_pb),
        };
        let s = self.inner.clone().read_range(req).await?.into_inner();
        Ok(s.map(|f| f.map(|f| f.data).map_err(PeerError::from)))
    }

    /// Bytes `range` of `key`: exactly that many bytes, or an error.
    pub async fn read_range(
        &self,
        repo: &str,
        key: &str,
        range: Range<u64>,
        hint: Option<&ChunkHint>,
    ) -> Result<Bytes, PeerError> {
        let want = range.end.saturating_sub(range.start);
        let s = self.read_range_stream(repo, key, range, hint).await?;
        collect(s, want).await
    }

    /// The frames of a whole object and its size (from the first frame).
    pub async fn get_stream(
        &self,
        repo: &str,
        key: &str,
    ) -> Result<(u64, impl Stream<Item = Result<Bytes, PeerError>> + use<>), PeerError> {
        let req = pb::GetRequest {
            repo: repo.to_string(),
            key: key.to_string(),
        };
        let mut s = self.inner.clone().get(req).await?.into_inner();
        let first = match s.next().await {
            Some(f) => f?,
            None => return Err(PeerError::Protocol("empty reply to Get".into())),
        };
        let total = first.total_len;
        let head = futures_util::stream::once(async move { Ok(first.data) });
        let rest = s.map(|f| f.map(|f| f.data).map_err(PeerError::from));
        Ok((total, head.chain(rest)))
    }

    /// A whole object.
    pub async fn get(&self, repo: &str, key: &str) -> Result<Bytes, PeerError> {
        let (total, s) = self.get_stream(repo, key).await?;
        collect(s, total).await
    }

    /// Whether each key exists on the peer, and which blocks of these chunks it holds.
    pub async fn have(
        &self,
        repo: &str,
        keys: &[String],
        chunk_ids: &[[u8; 32]],
    ) -> Result<(Vec<bool>, Vec<ChunkPresence>), PeerError> {
        let req = pb::HaveRequest {
            repo: repo.to_string(),
            keys: keys.to_vec(),
            chunk_ids: chunk_ids
                .iter()
                .map(|c| Bytes::copy_from_slice(c))
                .collect(),
        };
        let r = self.inner.clone().have(req).await?.into_inner();
        have_reply(r, keys.len(), chunk_ids.len())
    }

    /// Keys under `prefix` with sizes.
    pub async fn list(&self, repo: &str, prefix: &str) -> Result<Vec<(String, u64)>, PeerError> {
        let req = pb::ListRequest {
            repo: repo.to_string(),
            prefix: prefix.to_string(),
        };
        let mut s = self.inner.clone().list(req).await?.into_inner();
        let mut out = Vec::new();
        while let Some(batch) = s.next().await {
            out.extend(batch?.entries.into_iter().map(|e| (e.key, e.size)));
        }
        Ok(out)
    }
}

/// Largest buffer reserved up front when joining frames: `want` comes from the peer (the
/// `total_len` of a `Get`), so reserving it whole would let a peer make this process abort on
/// an impossible allocation. Bigger objects grow the buffer as their bytes actually arrive.
const MAX_RESERVE: u64 = 64 << 20;

/// Join frames into exactly `want` bytes (one frame: no copy). `want` may come from the peer.
pub async fn collect(
    s: impl Stream<Item = Result<Bytes, PeerError>>,
    want: u64,
) -> Result<Bytes, PeerError> {
    let mut s = std::pin::pin!(s);
    let mut first: Option<Bytes> = None;
    let mut buf: Option<BytesMut> = None;
    let mut got = 0u64;
    while let Some(f) = s.next().await {
        let f = f?;
        got += f.len() as u64;
        if got > want {
            return Err(PeerError::Protocol(format!(
                "peer sent more than the {want} bytes asked"
            )));
        }
        match (&mut first, &mut buf) {
            (None, None) => first = Some(f),
            (Some(a), None) => {
                let mut b = BytesMut::with_capacity(want.min(MAX_RESERVE) as usize);
                b.extend_from_slice(a);
                b.extend_from_slice(&f);
                buf = Some(b);
                first = None;
            }
            (_, Some(b)) => b.extend_from_slice(&f),
        }
    }
    if got != want {
        return Err(PeerError::Protocol(format!(
            "peer sent {got} of {want} bytes"
        )));
    }
    Ok(match (first, buf) {
        (_, Some(b)) => b.freeze(),
        (Some(a), None) => a,
        (None, None) => Bytes::new(),
    })
}

/// Parse `host:port` (IPv6 in brackets).
pub fn parse_host_port(s: &str) -> Option<(String, u16)> {
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some((a.ip().to_string(), a.port()));
    }
    let (h, p) = s.rsplit_once(':')?;
    if h.is_empty() || h.contains(':') {
        return None;
    }
    Some((h.to_string(), p.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{self, TlsConfig, TlsFiles};
    use std::path::Path;

    /// Serves `repo` "r": key "obj" = 3.5 frames of a pattern; anything else is not found.
    #[derive(Debug)]
    struct Fixed(Bytes);

    #[async_trait::async_trait]
    impl PeerBackend for Fixed {
        async fn get_range(
            &self,
            repo: &str,
            key: &str,
            range: Range<u64>,
            _hint: Option<&ChunkHint>,
        ) -> Result<Bytes, BackendError> {
            if repo != "r" || key != "obj" {
                return Err(BackendError::NotFound(key.into()));
            }
            if range.end > self.0.len() as u64 {
                return Err(BackendError::Invalid("past the end".into()));
            }
            Ok(self.0.slice(range.start as usize..range.end as usize))
        }
        async fn get(&self, repo: &str, key: &str) -> Result<Bytes, BackendError> {
            self.get_range(repo, key, 0..self.0.len() as u64, None)
                .await
        }
        async fn exists(&self, _repo: &str, keys: &[String]) -> Result<Vec<bool>, BackendError> {
            Ok(keys.iter().map(|k| k == "obj").collect())
        }
        async fn list(&self, _: &str, _: &str) -> Result<Vec<(String, u64)>, BackendError> {
            Ok(vec![("obj".into(), self.0.len() as u64)])
        }
    }

    fn pki(dir: &Path, name: &str, san: &str) -> TlsFiles {
        if !dir.join(tls::CA_CERT).exists() {
            tls::init_ca(dir, "test", false).unwrap();
        }
        tls::issue(dir, name, &[san.to_string()]).unwrap();
        TlsFiles::find(dir, Some(Path::new(name)), None).unwrap()
    }

    async fn start(
        files: &TlsFiles,
        data: Bytes,
        limits: Limits,
    ) -> (u16, tokio::sync::oneshot::Sender<()>) {
        let cfg = TlsConfig::load(files).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(serve(
            l,
            Some(cfg.server),
            Arc::new(Fixed(data)),
            limits,
            async {
                let _ = rx.await;
            },
        ));
        (port, tx)
    }

    fn client(files: &TlsFiles, host: &str, port: u16) -> PeerClient {
        PeerClient::new(
            host,
            port,
            ClientOptions {
                tls: Some(tls::client_config(files).unwrap()),
                connect_timeout: Duration::from_secs(2),
            },
        )
        .unwrap()
    }

    fn pattern(n: usize) -> Bytes {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mtls_reads_ranges_objects_and_lists() {
        let d = tempfile::tempdir().unwrap();
        let files = pki(d.path(), "node", "127.0.0.1");
        let data = pattern(3 * FRAME + FRAME / 2);
        let (port, _stop) = start(&files, data.clone(), Limits::default()).await;
        let c = client(&files, "127.0.0.1", port);
        // A range across frame boundaries, not aligned.
        let r = 1000..(2 * FRAME as u64 + 5);
        let got = c.read_range("r", "obj", r.clone(), None).await.unwrap();
        assert_eq!(got, data.slice(r.start as usize..r.end as usize));
        assert_eq!(c.get("r", "obj").await.unwrap(), data);
        assert!(matches!(
            c.get("r", "missing").await,
            Err(PeerError::NotFound(_))
        ));
        assert!(matches!(
            c.read_range("r", "obj", 0..(data.len() as u64 + 1), None)
                .await,
            Err(PeerError::Failed(_))
        ));
        let (keys, _) = c.have("r", &["obj".into(), "x".into()], &[]).await.unwrap();
        assert_eq!(keys, vec![true, false]);
        assert_eq!(
            c.list("r", "").await.unwrap(),
            vec![("obj".to_string(), data.len() as u64)]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn foreign_ca_and_wrong_name_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let ours = pki(&d.path().join("a"), "node", "127.0.0.1");
        let theirs = pki(&d.path().join("b"), "intruder", "127.0.0.1");
        let (port, _stop) = start(&ours, pattern(10), Limits::default()).await;
        // A client whose certificate another CA signed (and which does not trust ours).
        let e = client(&theirs, "127.0.0.1", port).get("r", "obj").await;
        assert!(matches!(e, Err(PeerError::Failed(_))), "{e:?}");
        // Our own CA, but the server's certificate is not valid for the name dialled.
        let e = client(&ours, "localhost", port)
            .get("r", "obj")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("certificate"), "{e}");
        // The right name works.
        assert_eq!(
            client(&ours, "127.0.0.1", port)
                .get("r", "obj")
                .await
                .unwrap(),
            pattern(10)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bandwidth_and_stream_limits() {
        let d = tempfile::tempdir().unwrap();
        let files = pki(d.path(), "node", "127.0.0.1");
        let data = pattern(4 * FRAME);
        let limits = Limits {
            max_streams: 1,
            bandwidth: Some(8 << 20),
            queue_wait: Duration::from_millis(200),
        };
        let (port, _stop) = start(&files, data.clone(), limits).await;
        let c = client(&files, "127.0.0.1", port);
        let t = Instant::now();
        // The burst covers 1 MiB; the remaining 3 MiB take ~0.37 s at 8 MiB/s.
        let (a, b) = tokio::join!(c.read_range("r", "obj", 0..4 * FRAME as u64, None), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.read_range("r", "obj", 0..FRAME as u64, None).await
        });
        assert_eq!(a.unwrap(), data);
        // One stream at a time: the second waited past its queue bound and was refused.
        let e = b.unwrap_err().to_string();
        assert!(e.contains("ResourceExhausted"), "{e}");
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn host_ports() {
        assert_eq!(
            parse_host_port("10.0.0.5:7443"),
            Some(("10.0.0.5".into(), 7443))
        );
        assert_eq!(parse_host_port("[::1]:7"), Some(("::1".into(), 7)));
        assert_eq!(parse_host_port("node-a:1"), Some(("node-a".into(), 1)));
        assert_eq!(parse_host_port("node-a"), None);
    }

    /// Regression (found while writing the fuzz target `peer_messages`): the size a peer announces for a `Get` was
    /// reserved whole once a second frame arrived, so `total_len = 2^63` aborted the process.
    /// Now the frames are refused for what they are: fewer bytes than announced.
    #[tokio::test]
    async fn announced_size_is_not_reserved() {
        let frames = futures_util::stream::iter([
            Ok(Bytes::from_static(b"ab")),
            Ok(Bytes::from_static(b"cd")),
        ]);
        let e = collect(frames, 1 << 63).await.unwrap_err().to_string();
        assert!(e.contains("peer sent 4 of"), "{e}");
        let frames = futures_util::stream::iter([
            Ok(Bytes::from_static(b"ab")),
            Ok(Bytes::from_static(b"cd")),
        ]);
        assert_eq!(&collect(frames, 4).await.unwrap()[..], b"abcd");
    }

    /// Requests are checked before a backend sees them (fuzz target `peer_messages`).
    #[test]
    fn request_shapes() {
        let r = pb::ReadRangeRequest {
            offset: u64::MAX,
            length: 2,
            ..Default::default()
        };
        assert!(read_range_args(&r).is_err());
        let r = pb::ReadRangeRequest {
            offset: 1,
            length: 2,
            hint: Some(pb::ChunkHint {
                chunk_id: Bytes::from_static(&[0; 31]),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(read_range_args(&r).is_err());
        let r = pb::HaveRequest {
            chunk_ids: vec![Bytes::from_static(&[1; 32]), Bytes::from_static(&[1; 33])],
            ..Default::default()
        };
        assert!(have_chunk_ids(&r).is_err());
        let reply = pb::HaveReply {
            keys_present: vec![true],
            chunks: vec![],
        };
        assert!(have_reply(reply, 2, 0).is_err());
    }
}

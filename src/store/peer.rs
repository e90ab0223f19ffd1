//! `horcrux://host:port/repo`: a peer (`horcrux serve`) as a read-only store.
//!
//! A peer is a mirror, never an authority: chunk bytes it returns are verified by the fetcher
//! against the manifest's block hashes (a lying peer is marked unhealthy by the mirror set),
//! and objects named by their hash (commits, manifests) are checked by their readers. Refs
//! read through a peer are only as fresh as the peer's own source.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use horcrux_proto::peer::{ChunkHint, ClientOptions, PeerClient, PeerError};
use horcrux_proto::tls::{self, TlsFiles};
use tokio::io::AsyncWriteExt;

use super::{Store, StoreError};
use crate::manifest::ChunkInfo;

/// How to reach peers: this node's TLS files and how long to wait for a connection.
#[derive(Debug, Clone)]
pub struct PeerOptions {
    /// CA certificate, node certificate and key (`--tls-dir`). Required for `horcrux://`.
    pub tls: Option<TlsFiles>,
    /// Why `tls` is missing although TLS files were asked for (reported when a peer is used).
    pub tls_error: Option<String>,
    /// Bound on TCP connect + TLS handshake: a dead peer is left for the next mirror quickly.
    pub connect_timeout: Duration,
}

impl Default for PeerOptions {
    fn default() -> Self {
        Self {
            tls: None,
            tls_error: None,
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// A repository served by a peer.
#[derive(Debug)]
pub struct PeerStore {
    host: String,
    port: u16,
    repo: String,
    options: ClientOptions,
    /// Made on first use: a tonic channel needs a running tokio runtime.
    client: OnceLock<PeerClient>,
}

impl PeerStore {
    /// A peer store; reads the TLS files now (so a bad file is reported at once) but
    /// connects on first use (so a peer that is down does not stop a mount that has mirrors).
    pub fn new(
        host: &str,
        port: u16,
        repo: &str,
        options: &PeerOptions,
    ) -> Result<Self, StoreError> {
        let describe = format!("horcrux://{host}:{port}/{repo}");
        let files = options
            .tls
            .as_ref()
            .ok_or_else(|| match &options.tls_error {
                Some(e) => StoreError::Other {
                    store: describe.clone(),
                    message: e.clone(),
                },
                None => StoreError::Unsupported(format!(
                    "{describe}: peers need TLS files: pass --tls-dir DIR (holding ca.crt and this \
                 node's certificate and key; see `horcrux tls init` and `horcrux tls issue`)"
                )),
            })?;
        let tls = tls::client_config(files).map_err(|e| StoreError::Other {
            store: describe.clone(),
            message: e.to_string(),
        })?;
        Ok(Self::with_client_options(
            host,
            port,
            repo,
            ClientOptions {
                tls: Some(tls),
                connect_timeout: options.connect_timeout,
            },
        ))
    }

    /// A peer store with explicit client options (plain HTTP/2 is possible here: benchmarks).
    pub fn with_client_options(host: &str, port: u16, repo: &str, options: ClientOptions) -> Self {
        Self {
            host: host.to_string(),
            port,
            repo: repo.to_string(),
            options,
            client: OnceLock::new(),
        }
    }

    fn client(&self) -> Result<&PeerClient, StoreError> {
        if let Some(c) = self.client.get() {
            return Ok(c);
        }
        let c = PeerClient::new(&self.host, self.port, self.options.clone()).map_err(|e| {
            StoreError::Other {
                store: self.describe(),
                message: e.to_string(),
            }
        })?;
        // Two first users may race: either client works, one is kept.
        let _ = self.client.set(c);
        Ok(self.client.get().expect("set above"))
    }

    fn err(&self, key: &str, e: PeerError) -> StoreError {
        match e {
            PeerError::NotFound(_) => StoreError::NotFound {
                store: self.describe(),
                key: key.to_string(),
            },
            other => StoreError::Other {
                store: self.describe(),
                message: format!("`{key}`: {other}"),
            },
        }
    }

    fn read_only(&self, key: &str) -> StoreError {
        StoreError::Unsupported(format!(
            "{}: cannot write `{key}`: peers are read-only mirrors; write to the origin \
             (the last URL of the list)",
            self.describe()
        ))
    }
}

fn hint_of(info: &ChunkInfo, block_size: u32) -> ChunkHint {
    ChunkHint {
        chunk_id: *info.id.as_bytes(),
        len: info.len,
        block_size,
        block_hashes: info.blocks.clone(),
    }
}

#[async_trait::async_trait]
impl Store for PeerStore {
    fn describe(&self) -> String {
        format!("horcrux://{}:{}/{}", self.host, self.port, self.repo)
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        self.client()?
            .read_range(&self.repo, key, range, None)
            .await
            .map_err(|e| self.err(key, e))
    }

    async fn get_chunk_range(
        &self,
        info: &ChunkInfo,
        block_size: u32,
        range: Range<u64>,
    ) -> Result<Bytes, StoreError> {
        let key = crate::format::chunk_key(&info.id);
        let hint = hint_of(info, block_size);
        self.client()?
            .read_range(&self.repo, &key, range, Some(&hint))
            .await
            .map_err(|e| self.err(&key, e))
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.client()?
            .get(&self.repo, key)
            .await
            .map_err(|e| self.err(key, e))
    }

    async fn put(&self, key: &str, _data: Bytes) -> Result<(), StoreError> {
        Err(self.read_only(key))
    }

    async fn put_file(&self, key: &str, _src: &Path) -> Result<(), StoreError> {
        Err(self.read_only(key))
    }

    async fn exists(&self, keys: &[String]) -> Result<Vec<bool>, StoreError> {
        self.client()?
            .have(&self.repo, keys, &[])
            .await
            .map(|(k, _)| k)
            .map_err(|e| self.err("", e))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .list_sizes(prefix)
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    async fn list_sizes(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        self.client()?
            .list(&self.repo, prefix)
            .await
            .map_err(|e| self.err(prefix, e))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        Err(self.read_only(key))
    }

    async fn compare_and_delete(&self, key: &str, _expected: &[u8]) -> Result<(), StoreError> {
        Err(self.read_only(key))
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        _expected: Option<&[u8]>,
        _new: Bytes,
    ) -> Result<(), StoreError> {
        Err(self.read_only(key))
    }

    async fn get_to_file(&self, key: &str, dest: &Path) -> Result<(), StoreError> {
        // Manifests can be large: write frames as they come, then rename into place.
        let (total, stream) = self
            .client()?
            .get_stream(&self.repo, key)
            .await
            .map_err(|e| self.err(key, e))?;
        let tmp = PathBuf::from(format!("{}.peer{}.tmp", dest.display(), std::process::id()));
        let io = |source| StoreError::Io {
            store: "local file".into(),
            key: dest.display().to_string(),
            source,
        };
        let result = async {
            let mut f = tokio::fs::File::create(&tmp).await.map_err(io)?;
            let mut got = 0u64;
            let mut stream = std::pin::pin!(stream);
            while let Some(frame) = stream.next().await {
                let frame = frame.map_err(|e| self.err(key, e))?;
                got += frame.len() as u64;
                f.write_all(&frame).await.map_err(io)?;
            }
            if got != total {
                return Err(self.err(
                    key,
                    PeerError::Protocol(format!("peer sent {got} of {total} bytes")),
                ));
            }
            f.sync_all().await.map_err(io)?;
            tokio::fs::rename(&tmp, dest).await.map_err(io)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }
}

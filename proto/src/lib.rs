//! Wire protocol definitions for horcrux: the peer service and the local control API.
//!
//! - [`peer`]: nodes serve repository objects and cached chunks to each other — gRPC (tonic)
//!   over mutually authenticated TLS 1.3. The protobuf schema is `horcrux/peer.proto`
//!   ([`PEER_PROTO`]), compiled at build time without a system `protoc`.
//! - [`tls`]: the private CA, node certificates, and the rustls configurations of both ends.
//! - [`control`]: the local channel between the `horcrux` command and a live mount daemon
//!   (`status`, `diff`, `discard`): JSON lines over a Unix socket.
//!
//! This crate knows nothing of repositories or caches: the core implements
//! [`peer::PeerBackend`] and wraps [`peer::PeerClient`] in a store.

pub mod control;
pub mod peer;
pub mod tls;

/// Protobuf source of the peer service.
pub const PEER_PROTO: &str = include_str!("../horcrux/peer.proto");

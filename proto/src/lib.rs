//! Wire protocol definitions for horcrux (peer service and control API).
//!
//! The protobuf sources live in `proto/`; tonic/prost code generation is wired in when the peer
//! service lands (issue 7). Until then this crate exports the schema text so the format is
//! versioned alongside the code.
//!
//! [`control`] is the local channel between the `horcrux` command and a live mount daemon
//! (`status`, `diff`, `discard`): JSON lines over a Unix socket.

pub mod control;

/// Protobuf source of the peer service.
pub const PEER_PROTO: &str = include_str!("../horcrux/peer.proto");

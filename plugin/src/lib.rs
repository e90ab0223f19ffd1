//! Docker volume driver for horcrux.
//!
//! This crate holds the transport-free part of the driver: the VolumeDriver protocol v1 message
//! types exactly as the Docker engine sends and expects them ([`protocol`]), a dispatcher from
//! an endpoint path and a JSON body to a [`protocol::VolumeDriver`] implementation, and the
//! parsing of `docker volume create -o ...` options ([`options`]). The Unix-socket server, the
//! persisted volume registry and the ref-counted mounts come with the driver itself (issue 6);
//! they use an injected mounter, never the FUSE crate directly.

pub mod options;
pub mod protocol;

pub use options::{OptionsError, VolumeOptions};
pub use protocol::{DispatchReply, VolumeDriver, dispatch};

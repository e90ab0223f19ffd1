//! Docker volume driver for horcrux.
//!
//! - [`protocol`]: the VolumeDriver protocol v1 message types exactly as the Docker engine
//!   sends and expects them, and a transport-free dispatcher to a [`protocol::VolumeDriver`];
//! - [`options`]: parsing of `docker volume create -o ...` options;
//! - [`server`]: HTTP/1.1 over the plugin's Unix socket;
//! - [`registry`]: the persisted volume registry and mount counts (SQLite);
//! - [`driver`]: the driver itself, over an injected [`driver::Mounter`] (the CLI runs
//!   `horcrux mount` daemons; this crate never uses FUSE directly).

pub mod driver;
pub mod options;
pub mod protocol;
pub mod registry;
pub mod server;

pub use driver::{Driver, MountSpec, MountState, Mounter};
pub use options::{OptionsError, VolumeOptions};
pub use protocol::{DispatchReply, VolumeDriver, dispatch};
pub use registry::{Registry, VolumeRecord};

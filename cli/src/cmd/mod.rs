//! One module per subcommand.

pub mod cache;
pub mod changes;
pub mod config;
pub mod control_handler;
pub mod copy;
pub mod demo;
pub mod docs;
pub mod fetch;
pub mod gc;
pub mod generate;
pub mod history;
pub mod import;
pub mod mount;
pub mod peers;
pub mod plugin;
pub mod prefetch;
pub mod pull;
pub mod remotes;
pub mod stats;
pub mod verify;
pub mod versions;

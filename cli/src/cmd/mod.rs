//! One module per subcommand.

pub mod cache;
pub mod changes;
pub mod control_handler;
pub mod copy;
pub mod demo;
pub mod gc;
pub mod generate;
pub mod history;
pub mod mount;
pub mod peers;
pub mod plugin;
pub mod pull;
pub mod remotes;
pub mod versions;

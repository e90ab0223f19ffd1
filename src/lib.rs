//! horcrux core: content-addressed, lazily fetched, verified volumes.
//!
//! Layers (see `docs/ARCHITECTURE.md`): [`ids`] and [`hashtree`] (naming and verification),
//! [`format`], [`manifest`] and [`commit`] (what is stored; [`compare`] diffs two versions),
//! [`store`] (where it is stored), [`repo`] (a repository in a store), [`cache`] (local
//! verified copies), [`fetch`]
//! (cache-then-source reads), [`volume`] (filesystem semantics, protocol-free) and
//! [`generate`] (turning a directory into a repository).

pub mod cache;
pub mod commit;
pub mod compare;
pub mod fetch;
pub mod format;
pub mod gc;
pub mod generate;
pub mod hashtree;
pub mod history;
pub mod ids;
pub mod import;
pub mod manifest;
pub mod metrics;
pub mod overlay;
pub mod prefetch;
pub mod remotes;
pub mod repo;
pub mod serve;
pub mod store;
pub mod transfer;
pub mod util;
pub mod verify;
pub mod versions;
pub mod volume;

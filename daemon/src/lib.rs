//! nix-p2p-cache: a peer-to-peer, content-addressed binary cache for Nix.
//!
//! See `docs/ARCHITECTURE.md` for the code map and invariants.

pub mod announce;
pub mod compactor;
pub mod config;
pub mod core;
pub mod daemon;
pub mod doctor;
pub mod fetch;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod gc_policy;
pub mod http;
pub mod import;
pub mod maintain;
pub mod metrics;
pub mod net;
pub mod pending;
pub mod quota;
pub mod resolve;
pub mod store;
pub mod uploader;
pub mod upstream;

//! nix-p2p-cache: a peer-to-peer, content-addressed binary cache for Nix.
//!
//! See `docs/ARCHITECTURE.md` for the code map and invariants.

pub mod core;
pub mod import;
pub mod store;

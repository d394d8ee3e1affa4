//! The pure core: Nix formats, identifiers, chunking and manifests.
//!
//! Invariant: nothing under `core` does I/O beyond `std::io::Read`/`Write` on values the caller
//! hands in; no files, no network, no clock, no async.

pub mod base32;
pub mod chunker;
pub mod hash;
pub mod manifest;
pub mod nar;
pub mod narinfo;
pub mod normalise;
pub mod signing;
pub mod store_path;
pub mod summary;

pub use hash::{ChunkId, NarHash, NarKey};

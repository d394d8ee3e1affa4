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

/// An error and its causes as one line, each text once: some errors print nothing of their
/// own (libp2p's transport errors: the reason is in their source), many repeat their source's
/// text (which `{:#}` would print again).
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let t = err.to_string();
        if !t.is_empty() && !out.contains(&t) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&t);
        }
        cur = err.source();
    }
    if out.is_empty() {
        out.push_str("unknown error");
    }
    out
}

/// A byte count for people: `1.5 GiB` (binary units, one decimal).
pub fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

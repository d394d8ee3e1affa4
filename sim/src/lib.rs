//! `nix-p2p-cache-sim`: what a network of N nix-p2p-cache nodes would cost and how fast it
//! would be, before anyone runs it.
//!
//! Model mode (`model`): a seeded discrete-event simulation driven by a scenario file
//! (`scenario`), with a DHT placement model (`dht`), a dated cost layer (`cost`) and the
//! writers of `summary.json`, CSV, SVG plots and a report (`output`, `svg`). Real mode
//! (`real`): the daemon's own nodes in one process over libp2p's memory transport.

pub mod cost;
pub mod dht;
pub mod model;
pub mod output;
pub mod real;
pub mod rng;
pub mod scenario;
pub mod svg;
pub mod trace;

use thiserror::Error;

/// Errors of the simulator library.
#[derive(Debug, Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The scenario is malformed or inconsistent.
    #[error("scenario {path}: {msg}")]
    Scenario {
        /// Where it came from.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// A data file under `sim/data/` is malformed or lacks a named entry.
    #[error("data file {file}: {msg}")]
    Data {
        /// The data file.
        file: String,
        /// What is wrong.
        msg: String,
    },
    /// A `--param key=values` override cannot be applied.
    #[error("parameter {key}: {msg}")]
    Param {
        /// The dotted key.
        key: String,
        /// What is wrong.
        msg: String,
    },
    /// Real mode could not set up or run its nodes.
    #[error("real mode: {0}")]
    Real(String),
    /// JSON encoding failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

/// Runs one scenario with `seed` in real mode, the nodes' data dirs under `work`.
pub fn run_real(
    sc: &scenario::Scenario,
    seed: u64,
    work: &std::path::Path,
) -> Result<model::Outcome, Error> {
    real::run_real(sc, seed, work)
}

/// Runs one scenario with `seed` in model mode.
pub fn run_model(sc: &scenario::Scenario, seed: u64) -> Result<model::Outcome, Error> {
    Ok(model::Model::new(sc, seed)?.run())
}

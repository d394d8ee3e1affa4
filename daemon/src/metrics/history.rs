//! `History`: the last hour of traffic and hits by source, one sample of the cumulative
//! counters every [`SAMPLE_INTERVAL`], for the dashboard's graphs (`GET /api/history`): a page
//! opened late still draws the whole hour. Bounded ([`SAMPLES`]); the oldest sample goes first.
//!
//! A sample holds totals since the daemon started; rates are differences of neighbours (the
//! page computes them), so a missed tick loses no bytes.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// How often a sample is taken.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(10);
/// Samples kept: one hour.
pub const SAMPLES: usize = 360;

/// Counters at one moment (totals since the daemon started).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Sample {
    /// Unix time, seconds.
    pub time: u64,
    /// NAR bytes sent to HTTP clients (Nix).
    pub http_bytes_out: u64,
    /// Bytes received in uploads (`nix copy --to`).
    pub http_bytes_in: u64,
    /// Bytes sent to peers.
    pub p2p_bytes_up: u64,
    /// Bytes received from peers.
    pub p2p_bytes_down: u64,
    /// Bytes downloaded from upstream caches (as sent, compressed).
    pub upstream_bytes_down: u64,
    /// NAR requests answered from the local store.
    pub hits_store: u64,
    /// NARs fetched from peers found on the LAN (mDNS).
    pub hits_lan: u64,
    /// NARs fetched from other peers.
    pub hits_peers: u64,
    /// NARs fetched from upstream caches.
    pub hits_upstream: u64,
    /// NAR requests nobody could answer.
    pub misses: u64,
}

/// The ring of samples; see the module docs.
#[derive(Debug, Default)]
pub struct History {
    ring: Mutex<VecDeque<Sample>>,
}

impl History {
    /// Appends a sample, dropping the oldest beyond [`SAMPLES`].
    pub fn push(&self, s: Sample) {
        let mut r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        r.push_back(s);
        while r.len() > SAMPLES {
            r.pop_front();
        }
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        let r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        r.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_hour_in_order() {
        let h = History::default();
        for t in 0..(SAMPLES as u64 + 10) {
            h.push(Sample {
                time: t,
                ..Default::default()
            });
        }
        let s = h.samples();
        assert_eq!(s.len(), SAMPLES);
        assert_eq!(s[0].time, 10);
        assert_eq!(s[SAMPLES - 1].time, SAMPLES as u64 + 9);
    }
}

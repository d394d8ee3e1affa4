//! `Metrics`: counters exported at `/metrics` in the Prometheus text format.
//!
//! Lock-free atomics for the hot counters; one small mutex-guarded map for requests by route
//! and status (bounded: routes are a fixed set of names, statuses a few codes).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::store::Stats;

/// Counters of the daemon.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub nar_bytes_served: AtomicU64,
    pub narinfo_hits: AtomicU64,
    pub narinfo_misses: AtomicU64,
    pub nar_hits: AtomicU64,
    pub nar_misses: AtomicU64,
    pub nar_aborted: AtomicU64,
    pub uploads: AtomicU64,
    pub upload_bytes: AtomicU64,
    pub upstream_nars: AtomicU64,
}

impl Metrics {
    pub fn request(&self, route: &'static str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((route, status)).or_default() += 1;
    }

    pub fn inc(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Renders everything, with the store's counts, in the Prometheus text format.
    pub fn render(&self, stats: Option<&Stats>) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP nix_p2p_cache_http_requests_total HTTP requests by route and status.\n",
        );
        out.push_str("# TYPE nix_p2p_cache_http_requests_total counter\n");
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "nix_p2p_cache_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let counters = [
            (
                "nar_bytes_served_total",
                "NAR bytes sent to clients.",
                &self.nar_bytes_served,
            ),
            (
                "narinfo_hits_total",
                "narinfo requests answered from the store.",
                &self.narinfo_hits,
            ),
            (
                "narinfo_misses_total",
                "narinfo requests for unknown paths.",
                &self.narinfo_misses,
            ),
            (
                "nar_hits_total",
                "NAR requests answered from the store.",
                &self.nar_hits,
            ),
            (
                "nar_misses_total",
                "NAR requests for unknown NARs.",
                &self.nar_misses,
            ),
            (
                "nar_aborted_total",
                "NAR streams aborted because of damage.",
                &self.nar_aborted,
            ),
            ("uploads_total", "narinfo uploads committed.", &self.uploads),
            (
                "upload_bytes_total",
                "Bytes received in NAR uploads.",
                &self.upload_bytes,
            ),
            (
                "upstream_nars_total",
                "NAR requests answered after fetching the NAR from an upstream cache.",
                &self.upstream_nars,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(out, "# HELP nix_p2p_cache_{name} {help}");
            let _ = writeln!(out, "# TYPE nix_p2p_cache_{name} counter");
            let _ = writeln!(out, "nix_p2p_cache_{name} {}", c.load(Ordering::Relaxed));
        }
        if let Some(s) = stats {
            let gauges = [
                ("store_narinfos", "narinfos in the store.", s.narinfos),
                ("store_nars", "NARs in the store.", s.nars),
                (
                    "store_nar_bytes",
                    "Uncompressed size of the stored NARs.",
                    s.nar_bytes,
                ),
                ("store_chunks", "Distinct chunks in the store.", s.chunks),
                (
                    "store_unique_chunk_bytes",
                    "Uncompressed bytes of distinct chunks.",
                    s.unique_chunk_bytes,
                ),
                (
                    "store_stored_bytes",
                    "Bytes on disk (packs and index).",
                    s.stored_bytes,
                ),
            ];
            for (name, help, v) in gauges {
                let _ = writeln!(out, "# HELP nix_p2p_cache_{name} {help}");
                let _ = writeln!(out, "# TYPE nix_p2p_cache_{name} gauge");
                let _ = writeln!(out, "nix_p2p_cache_{name} {v}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.request("narinfo", 200);
        m.request("narinfo", 200);
        m.request("nar", 404);
        Metrics::inc(&m.nar_bytes_served, 42);
        let s = Stats {
            chunks: 7,
            ..Default::default()
        };
        let text = m.render(Some(&s));
        assert!(text
            .contains("nix_p2p_cache_http_requests_total{route=\"narinfo\",status=\"200\"} 2\n"));
        assert!(
            text.contains("nix_p2p_cache_http_requests_total{route=\"nar\",status=\"404\"} 1\n")
        );
        assert!(text.contains("nix_p2p_cache_nar_bytes_served_total 42\n"));
        assert!(text.contains("nix_p2p_cache_store_chunks 7\n"));
    }
}

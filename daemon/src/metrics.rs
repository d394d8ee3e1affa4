//! `Metrics`: counters exported at `/metrics` in the Prometheus text format, and what the
//! dashboard reads besides: the running transfers ([`transfers`]), the last hour of samples
//! ([`history`]) and the recent warn/error events ([`events`]).
//!
//! Lock-free atomics for the hot counters; one small mutex-guarded map for requests by route
//! and status (bounded: routes are a fixed set of names, statuses a few codes); every table
//! and ring bounded.

pub mod events;
pub mod history;
pub mod transfers;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::store::Stats;
use history::{History, Sample};
use transfers::Transfers;

/// Upper bounds, in seconds, of the buckets of the HTTP request-latency histogram.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// One route's request latencies: counts per bucket (not cumulative), sum and count.
#[derive(Debug, Default, Clone, Copy)]
struct Latency {
    buckets: [u64; LATENCY_BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// Counters of the daemon.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Time to the response head by route (bounded: routes are a fixed set of names).
    latency: Mutex<BTreeMap<&'static str, Latency>>,
    pub nar_bytes_served: AtomicU64,
    pub narinfo_hits: AtomicU64,
    pub narinfo_misses: AtomicU64,
    pub nar_hits: AtomicU64,
    pub nar_misses: AtomicU64,
    pub nar_aborted: AtomicU64,
    pub uploads: AtomicU64,
    pub upload_bytes: AtomicU64,
    pub upstream_nars: AtomicU64,
    /// NARs fetched from peers and stored.
    pub p2p_nars: AtomicU64,
    /// NAR fetches from peers that failed (every provider tried).
    pub p2p_nar_failures: AtomicU64,
    /// Blocks received from peers that matched their id.
    pub p2p_blocks: AtomicU64,
    /// Blocks received from peers that did not match their id (the peer is banned).
    pub p2p_bad_blocks: AtomicU64,
    /// Manifests from peers that did not parse or did not reproduce NarHash (peer banned).
    pub p2p_bad_manifests: AtomicU64,
    /// Chunks of fetched NARs the store already had (not asked of peers).
    pub p2p_chunks_local: AtomicU64,
    /// Exchange requests to peers that failed or timed out.
    pub p2p_request_failures: AtomicU64,
    /// Duplicate requests sent in the endgame of a fetch.
    pub p2p_endgame_requests: AtomicU64,
    /// DHT provider lookups made.
    pub p2p_provider_lookups: AtomicU64,
    /// Providers those lookups found (summed).
    pub p2p_providers_found: AtomicU64,
    /// Connected peers not asked for a narinfo because their path summary says they lack it.
    pub p2p_narinfo_asks_skipped: AtomicU64,
    /// narinfo lookups that waited for a source past its short budget.
    pub narinfo_late_waits: AtomicU64,
    /// narinfos found at sources remembered in the index (found again after a restart).
    pub narinfos_remembered: AtomicU64,
    /// NAR requests that joined a fetch already running for the same NAR.
    pub nar_flight_joins: AtomicU64,
    /// NAR fetches (flights) that no source could complete.
    pub nar_fetch_failures: AtomicU64,
    /// NAR requests answered from the local store (not from a flight).
    pub nar_store_hits: AtomicU64,
    /// NARs fetched from peers whose manifest came from a LAN (mDNS) peer.
    pub p2p_nars_lan: AtomicU64,
    /// Bytes downloaded from upstream caches (NAR files as sent).
    pub upstream_bytes: AtomicU64,
    /// NARs moving now (fetches and serves), for the dashboard.
    pub transfers: Transfers,
    /// The last hour of samples, for the dashboard's graphs.
    pub history: History,
}

/// P2P gauges and totals read off the network layer when `/metrics` is rendered.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct NetGauges {
    pub connected_peers: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub requests_in: u64,
    pub requests_refused: u64,
    pub peers_banned: u64,
    /// DHT calls made and answered, by type.
    pub dht_calls: crate::net::DhtCallCounts,
}

impl Metrics {
    pub fn request(&self, route: &'static str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((route, status)).or_default() += 1;
    }

    /// Records how long a request of `route` took to its response head.
    pub fn observe_latency(&self, route: &'static str, secs: f64) {
        let mut m = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let l = m.entry(route).or_default();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            l.buckets[i] += 1;
        }
        l.sum += secs;
        l.count += 1;
    }

    pub fn inc(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Appends a sample of the counters to the history (taken every
    /// [`history::SAMPLE_INTERVAL`]); `net`: the P2P layer's totals, when it is on.
    pub fn sample(&self, net: Option<&NetGauges>) {
        self.history.push(self.snapshot(net));
    }

    /// The counters now, as a history sample.
    pub fn snapshot(&self, net: Option<&NetGauges>) -> Sample {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let p2p = get(&self.p2p_nars);
        let lan = get(&self.p2p_nars_lan).min(p2p);
        Sample {
            time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            http_bytes_out: get(&self.nar_bytes_served),
            http_bytes_in: get(&self.upload_bytes),
            p2p_bytes_up: net.map_or(0, |n| n.bytes_up),
            p2p_bytes_down: net.map_or(0, |n| n.bytes_down),
            upstream_bytes_down: get(&self.upstream_bytes),
            hits_store: get(&self.nar_store_hits),
            hits_lan: lan,
            hits_peers: p2p - lan,
            hits_upstream: get(&self.upstream_nars),
            misses: get(&self.nar_misses),
        }
    }

    /// The latency histogram in the Prometheus text format (cumulative buckets).
    fn render_latency(&self, out: &mut String) {
        out.push_str(
            "# HELP nix_p2p_cache_http_request_duration_seconds Time from a request to its \
             response head, by route (a NAR body streams after it).\n\
             # TYPE nix_p2p_cache_http_request_duration_seconds histogram\n",
        );
        let m = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let name = "nix_p2p_cache_http_request_duration_seconds";
        for (route, l) in m.iter() {
            let mut below = 0;
            for (le, n) in LATENCY_BUCKETS.iter().zip(l.buckets) {
                below += n;
                let _ = writeln!(
                    out,
                    "{name}_bucket{{route=\"{route}\",le=\"{le}\"}} {below}"
                );
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{route=\"{route}\",le=\"+Inf\"}} {c}\n\
                 {name}_sum{{route=\"{route}\"}} {s}\n{name}_count{{route=\"{route}\"}} {c}",
                c = l.count,
                s = l.sum,
            );
        }
    }

    /// Renders everything, with the store's counts, in the Prometheus text format.
    pub fn render(&self, stats: Option<&Stats>, net: Option<&NetGauges>) -> String {
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
        self.render_latency(&mut out);
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
                "NAR streams aborted, or refused before their status, because of damage or an unreachable pack storage.",
                &self.nar_aborted,
            ),
            ("uploads_total", "narinfo uploads committed.", &self.uploads),
            (
                "p2p_narinfo_asks_skipped_total",
                "Peers not asked for a narinfo because their path summary says they lack it.",
                &self.p2p_narinfo_asks_skipped,
            ),
            (
                "narinfo_late_waits_total",
                "narinfo lookups that waited for a source past its short budget.",
                &self.narinfo_late_waits,
            ),
            (
                "narinfos_remembered_total",
                "narinfos found at sources remembered in the index (their NARs are found again after a restart).",
                &self.narinfos_remembered,
            ),
            (
                "nar_flight_joins_total",
                "NAR requests that joined a fetch already running for the same NAR.",
                &self.nar_flight_joins,
            ),
            (
                "nar_fetch_failures_total",
                "NAR fetches that no source could complete.",
                &self.nar_fetch_failures,
            ),
            (
                "nar_store_hits_total",
                "NAR requests answered from the local store.",
                &self.nar_store_hits,
            ),
            (
                "p2p_nars_lan_total",
                "NARs fetched from peers whose manifest came from a LAN (mDNS) peer.",
                &self.p2p_nars_lan,
            ),
            (
                "upstream_bytes_total",
                "Bytes downloaded from upstream caches.",
                &self.upstream_bytes,
            ),
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
            (
                "p2p_nars_total",
                "NARs fetched from peers and stored.",
                &self.p2p_nars,
            ),
            (
                "p2p_nar_failures_total",
                "NAR fetches from peers that failed.",
                &self.p2p_nar_failures,
            ),
            (
                "p2p_blocks_total",
                "Blocks from peers that matched their id.",
                &self.p2p_blocks,
            ),
            (
                "p2p_bad_blocks_total",
                "Blocks from peers that did not match their id.",
                &self.p2p_bad_blocks,
            ),
            (
                "p2p_bad_manifests_total",
                "Manifests from peers that were malformed or did not reproduce NarHash.",
                &self.p2p_bad_manifests,
            ),
            (
                "p2p_chunks_local_total",
                "Chunks of fetched NARs already in the store.",
                &self.p2p_chunks_local,
            ),
            (
                "p2p_request_failures_total",
                "Exchange requests to peers that failed or timed out.",
                &self.p2p_request_failures,
            ),
            (
                "p2p_endgame_requests_total",
                "Duplicate block requests sent in the endgame of a fetch.",
                &self.p2p_endgame_requests,
            ),
            (
                "p2p_provider_lookups_total",
                "DHT provider lookups made.",
                &self.p2p_provider_lookups,
            ),
            (
                "p2p_providers_found_total",
                "Providers found by DHT lookups (summed).",
                &self.p2p_providers_found,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(out, "# HELP nix_p2p_cache_{name} {help}");
            let _ = writeln!(out, "# TYPE nix_p2p_cache_{name} counter");
            let _ = writeln!(out, "nix_p2p_cache_{name} {}", c.load(Ordering::Relaxed));
        }
        if let Some(n) = net {
            let rows = [
                (
                    "p2p_connected_peers",
                    "gauge",
                    "Peers connected now.",
                    n.connected_peers,
                ),
                (
                    "p2p_bytes_up_total",
                    "counter",
                    "Bytes sent to peers.",
                    n.bytes_up,
                ),
                (
                    "p2p_bytes_down_total",
                    "counter",
                    "Bytes received from peers.",
                    n.bytes_down,
                ),
                (
                    "p2p_requests_in_total",
                    "counter",
                    "Peer requests answered.",
                    n.requests_in,
                ),
                (
                    "p2p_requests_refused_total",
                    "counter",
                    "Peer requests refused (--share, bans, too many at once).",
                    n.requests_refused,
                ),
                (
                    "p2p_peers_banned_total",
                    "counter",
                    "Peers disconnected and banned for misbehaving.",
                    n.peers_banned,
                ),
            ];
            for (name, kind, help, v) in rows {
                let _ = writeln!(out, "# HELP nix_p2p_cache_{name} {help}");
                let _ = writeln!(out, "# TYPE nix_p2p_cache_{name} {kind}");
                let _ = writeln!(out, "nix_p2p_cache_{name} {v}");
            }
            let _ = writeln!(
                out,
                "# HELP nix_p2p_cache_p2p_dht_calls_total DHT queries started (out) and requests answered (in), by type."
            );
            let _ = writeln!(out, "# TYPE nix_p2p_cache_p2p_dht_calls_total counter");
            for (direction, kind, v) in n.dht_calls.labelled() {
                let _ = writeln!(
                    out,
                    "nix_p2p_cache_p2p_dht_calls_total{{direction=\"{direction}\",type=\"{kind}\"}} {v}"
                );
            }
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
                (
                    "store_pack_bytes",
                    "Bytes of pack files (compaction makes them smaller).",
                    s.pack_bytes,
                ),
                (
                    "store_chunk_compressed_bytes",
                    "Compressed bytes of distinct chunks.",
                    s.chunk_compressed_bytes,
                ),
            ];
            for (name, help, v) in gauges {
                let _ = writeln!(out, "# HELP nix_p2p_cache_{name} {help}");
                let _ = writeln!(out, "# TYPE nix_p2p_cache_{name} gauge");
                let _ = writeln!(out, "nix_p2p_cache_{name} {v}");
            }
            if let Some(st) = &s.storage {
                let b = st.backend;
                let c = &st.requests;
                let _ = writeln!(
                    out,
                    "# HELP nix_p2p_cache_storage_requests_total Requests to the pack storage \
                     (a multipart upload is one put; its parts are counted apart).\n\
                     # TYPE nix_p2p_cache_storage_requests_total counter"
                );
                for (op, v) in [
                    ("put", c.puts),
                    ("get", c.gets),
                    ("delete", c.deletes),
                    ("list", c.lists),
                    ("multipart_part", c.multipart_parts),
                ] {
                    let _ = writeln!(
                        out,
                        "nix_p2p_cache_storage_requests_total{{backend=\"{b}\",op=\"{op}\"}} {v}"
                    );
                }
                let _ = writeln!(
                    out,
                    "# HELP nix_p2p_cache_storage_errors_total Failed pack storage requests.\n\
                     # TYPE nix_p2p_cache_storage_errors_total counter\n\
                     nix_p2p_cache_storage_errors_total{{backend=\"{b}\"}} {}",
                    c.errors
                );
                let _ = writeln!(
                    out,
                    "# HELP nix_p2p_cache_storage_bytes_total Pack bytes downloaded (in) and \
                     uploaded (out).\n# TYPE nix_p2p_cache_storage_bytes_total counter\n\
                     nix_p2p_cache_storage_bytes_total{{backend=\"{b}\",direction=\"in\"}} {}\n\
                     nix_p2p_cache_storage_bytes_total{{backend=\"{b}\",direction=\"out\"}} {}",
                    c.bytes_in, c.bytes_out
                );
                let _ = writeln!(
                    out,
                    "# HELP nix_p2p_cache_storage_cache_bytes Bytes of remote pack ranges cached \
                     locally.\n# TYPE nix_p2p_cache_storage_cache_bytes gauge\n\
                     nix_p2p_cache_storage_cache_bytes{{backend=\"{b}\"}} {}",
                    st.cache_bytes
                );
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
        m.observe_latency("nar", 0.003);
        m.observe_latency("nar", 20.0);
        Metrics::inc(&m.nar_bytes_served, 42);
        let s = Stats {
            chunks: 7,
            ..Default::default()
        };
        let text = m.render(
            Some(&s),
            Some(&NetGauges {
                peers_banned: 3,
                dht_calls: crate::net::DhtCallCounts {
                    in_add_provider: 5,
                    ..Default::default()
                },
                ..Default::default()
            }),
        );
        assert!(text.contains("nix_p2p_cache_p2p_peers_banned_total 3\n"));
        assert!(text.contains(
            "nix_p2p_cache_p2p_dht_calls_total{direction=\"in\",type=\"add_provider\"} 5\n"
        ));
        assert!(text
            .contains("nix_p2p_cache_http_requests_total{route=\"narinfo\",status=\"200\"} 2\n"));
        assert!(
            text.contains("nix_p2p_cache_http_requests_total{route=\"nar\",status=\"404\"} 1\n")
        );
        assert!(text.contains("nix_p2p_cache_nar_bytes_served_total 42\n"));
        assert!(text.contains("nix_p2p_cache_store_chunks 7\n"));
        let h = "nix_p2p_cache_http_request_duration_seconds";
        assert!(text.contains(&format!("# TYPE {h} histogram\n")));
        assert!(text.contains(&format!("{h}_bucket{{route=\"nar\",le=\"0.0025\"}} 0\n")));
        assert!(text.contains(&format!("{h}_bucket{{route=\"nar\",le=\"0.005\"}} 1\n")));
        assert!(text.contains(&format!("{h}_bucket{{route=\"nar\",le=\"10\"}} 1\n")));
        assert!(text.contains(&format!("{h}_bucket{{route=\"nar\",le=\"+Inf\"}} 2\n")));
        assert!(text.contains(&format!("{h}_count{{route=\"nar\"}} 2\n")));
    }
}

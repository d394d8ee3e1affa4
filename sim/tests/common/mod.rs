//! What the integration tests share.

/// `summary.json` fields the issue names as the contract (tools read them), besides `mode`.
pub const SUMMARY_FIELDS: &[&str] = &[
    "nodes",
    "seed",
    "sim_seconds",
    "delivered_bytes",
    "seed_egress_bytes",
    "seed_egress_share",
    "closure_fetch_p50_s",
    "closure_fetch_p95_s",
    "dht_provider_queries_per_node_per_s",
    "dht_records_per_node",
    "monthly_bill_usd",
];

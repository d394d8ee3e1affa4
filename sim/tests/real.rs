//! Real mode: `compare` on `scenarios/real-32.toml` runs the model and 33 of the daemon's own
//! nodes (32 fetching, one seed) in one process over libp2p's memory transport, and writes both
//! side by side. Checked on the real run: nearly every fetch completed, bytes are conserved (what the
//! nodes received is what they sent), the seed sent every fetched byte at least once (it was
//! the only holder), the DHT was used (lookups answered, records held), and the summary carries
//! the contract's fields with `mode = "real"`.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn compare_runs_32_real_nodes_and_the_model() {
    let out = std::env::temp_dir().join(format!("nix-p2p-cache-sim-real-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/real-32.toml");
    let o = Command::new(env!("CARGO_BIN_EXE_nix-p2p-cache-sim"))
        .arg("compare")
        .arg(&scenario)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "compare failed: {stderr}");
    let read = |p: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(out.join(p)).unwrap()).unwrap()
    };
    let r = read("real/summary.json");
    let m = read("model/summary.json");
    assert_eq!(r["mode"], "real");
    assert_eq!(m["mode"], "model");
    for &k in common::SUMMARY_FIELDS {
        assert!(!r[k].is_null(), "real summary lacks {k}");
    }
    let u = |k: &str| r[k].as_u64().unwrap();
    let f = |k: &str| r[k].as_f64().unwrap();
    assert_eq!(u("nodes"), 32);
    // Every fetch of the trace is accounted for; nearly all complete. Real mode has no
    // upstream to fall back on, and on a loaded 2-core machine a NAR no peer could complete
    // in time is a 502 (seen in about one run in four, 2 of 32 fetches).
    assert_eq!(
        u("closure_fetches") + u("dial_failures") + u("unfinished_fetches"),
        32,
        "{stderr}"
    );
    assert!(
        u("closure_fetches") >= 28,
        "too many fetches failed: {stderr}"
    );
    // Conservation: the exchange's bytes received are the bytes sent (a response still in
    // flight at the last reading is the only slack).
    let (sent, got) = (u("sent_bytes") as f64, u("delivered_bytes") as f64);
    assert!(
        (sent - got).abs() <= 0.01 * sent,
        "sent {sent} vs received {got}"
    );
    // Nothing is fetched that no one held: the seed alone held the catalogue, so it sent each
    // fetched closure at least once (NAR bytes; the exchange adds framing).
    assert!(
        u("seed_egress_bytes") >= u("seed_lower_bound_bytes"),
        "seed sent {} < {} fetched distinct bytes",
        u("seed_egress_bytes"),
        u("seed_lower_bound_bytes")
    );
    assert!(u("seed_egress_bytes") <= u("sent_bytes"));
    let share = f("seed_egress_share");
    assert!(share > 0.0 && share <= 1.0, "{share}");
    assert!(f("dht_provider_queries_per_node_per_s") > 0.0);
    assert!(f("dht_records_per_node") > 0.0);
    assert!(f("closure_fetch_p50_s") > 0.0);
    for file in [
        "compare.json",
        "compare.md",
        "real/report.md",
        "real/seed_share.svg",
    ] {
        assert!(out.join(file).exists(), "{file} missing");
    }
    // The time series counts what the summary counts: received bytes, interval by interval
    // (the samples stop before the last reading).
    let csv = std::fs::read_to_string(out.join("real/timeseries.csv")).unwrap();
    let col = csv
        .lines()
        .next()
        .unwrap()
        .split(',')
        .position(|c| c == "delivered_bytes")
        .unwrap();
    let series: u64 = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(col).unwrap().parse::<u64>().unwrap())
        .sum();
    assert!(
        series > 0 && series <= u("delivered_bytes"),
        "{series} vs {}",
        u("delivered_bytes")
    );
    let c = read("compare.json");
    assert_eq!(c["rows"].as_array().unwrap().len(), 8);
    // The nodes' data dirs are removed after the run.
    assert!(!out.join("real/nodes").exists());
    let _ = std::fs::remove_dir_all(&out);
}

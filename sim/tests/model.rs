//! Model-mode checks: determinism, conservation of bytes, closed-form bounds, record survival,
//! and that every GUESS in a shipped scenario is swept.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use nix_p2p_cache_sim::cost::Prices;
use nix_p2p_cache_sim::output::write_run;
use nix_p2p_cache_sim::run_model;
use nix_p2p_cache_sim::scenario::Scenario;

fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

fn smoke(overrides: &[(&str, &str)]) -> Scenario {
    let o: Vec<(String, String)> = overrides
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Scenario::load(&scenarios_dir().join("smoke.toml"), &o).expect("smoke.toml loads")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "nix-p2p-cache-sim-test-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A flash crowd: `n` always-on public peers, one closure, nobody holds it, no new generations.
fn flash_crowd(n: u32, announce: &str) -> Scenario {
    let text = format!(
        r#"
name = "flash"
nodes = {n}
sim_hours = 12.0
checks = true
[workload]
closures = 1
zipf_s = 1.0
closure_mix = "small"
gen_interval_h = 100.0
first_release_h = 100.0
mass_rebuild_every = 0
bump_changed_nar_frac = 0.2
bump_new_bytes_frac = 0.036
rebuild_new_bytes_frac = 0.0005
upgrade_delay_mean_h = 1.0
warm_frac = 0.0
popular_closures = 1
[net]
parallel_sources = 4
piece_mib = 8.0
seed_if_fewer_than = 1
holepunch_success = 1.0
dial_timeout_s = 1.0
sample_tries = 8
uplink_scale = 1.0
seed_slots = 2
[dht]
k = 20
alpha = 3
announce = "{announce}"
reprovide_h = 22.0
record_ttl_h = 48.0
extra_hops_mean = 3.0
hop_latency_ms = 100.0
announce_walks_per_key = 1.0
chunk_kib = 128.0
[[class]]
name = "peer"
kind = "peer"
share = 1.0
sessions = "always"
bandwidth = "test_uniform"
upload_slots = 4
[[class]]
name = "seed"
kind = "seed"
count = 1
sessions = "always"
bandwidth = "seed"
"#
    );
    Scenario::from_str_with(&text, "flash", &[]).expect("flash crowd scenario")
}

#[test]
fn same_seed_gives_byte_identical_outputs() {
    let sc = smoke(&[]);
    let prices = Prices::builtin().unwrap();
    let (a, b, c) = (tmp("det-a"), tmp("det-b"), tmp("det-c"));
    write_run(&a, &run_model(&sc, 7).unwrap(), &sc, &prices).unwrap();
    write_run(&b, &run_model(&sc, 7).unwrap(), &sc, &prices).unwrap();
    write_run(&c, &run_model(&sc, 8).unwrap(), &sc, &prices).unwrap();
    for f in [
        "summary.json",
        "timeseries.csv",
        "classes.csv",
        "fetch_times.csv",
        "seed_share.svg",
        "fetch_cdf.svg",
        "dht_records.svg",
        "report.md",
    ] {
        let x = std::fs::read(a.join(f)).unwrap();
        let y = std::fs::read(b.join(f)).unwrap();
        assert!(!x.is_empty(), "{f} is empty");
        assert_eq!(x, y, "{f} differs between two runs with the same seed");
    }
    assert_ne!(
        std::fs::read(a.join("summary.json")).unwrap(),
        std::fs::read(c.join("summary.json")).unwrap(),
        "a different seed should give a different run"
    );
    for d in [a, b, c] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn bytes_are_conserved_and_only_holders_send() {
    for announce in ["roots", "all"] {
        let sc = smoke(&[("checks", "true"), ("dht.announce", announce)]);
        let o = run_model(&sc, 3).unwrap();
        assert!(o.delivered_bytes > 0);
        assert_eq!(
            o.delivered_bytes, o.sent_bytes,
            "delivered = sent summed over senders"
        );
        let recv: u64 = o.classes.iter().map(|c| c.received_bytes).sum();
        let sent: u64 = o.classes.iter().map(|c| c.sent_bytes).sum();
        assert_eq!(recv, o.delivered_bytes);
        assert_eq!(sent, o.delivered_bytes);
        let ci = o.classes.iter().find(|c| c.class == "ci").unwrap();
        assert_eq!(ci.sent_bytes, 0, "CI runners only download");
        let seed = o.classes.iter().find(|c| c.class == "seed").unwrap();
        assert_eq!(seed.sent_bytes, o.seed_egress_bytes);
        assert_eq!(seed.received_bytes, 0);
        assert_eq!(
            o.serve_violations, 0,
            "bytes credited from a node that did not hold them"
        );
        assert_eq!(
            o.capacity_violations, 0,
            "a link carried more than its capacity"
        );
        let series: u64 = o.samples.iter().map(|s| s.delivered_bytes).sum();
        assert_eq!(
            series, o.delivered_bytes,
            "time series adds up to the total"
        );
    }
}

#[test]
fn seed_sends_at_least_one_copy_of_every_new_chunk() {
    // Warm start: the new bytes of every generation fetched at all must leave a seed once.
    let o = run_model(&smoke(&[]), 5).unwrap();
    assert!(o.seed_lower_bound_bytes > 0);
    assert!(
        o.seed_egress_bytes >= o.seed_lower_bound_bytes,
        "{} < {}",
        o.seed_egress_bytes,
        o.seed_lower_bound_bytes
    );
    // Cold start: nobody holds anything, so each fetched closure leaves a seed whole at least once.
    let o = run_model(&smoke(&[("workload.warm_frac", "0.0")]), 5).unwrap();
    assert!(o.seed_lower_bound_bytes >= o.closure_bytes.iter().min().copied().unwrap());
    assert!(o.seed_egress_bytes >= o.seed_lower_bound_bytes);
}

#[test]
fn swarm_never_beats_the_minimum_distribution_time() {
    // Kumar & Ross (2006): the m-th node cannot finish before m·F / (u_s + Σu_i), nor any node
    // before F / d_min or F / u_s.
    for announce in ["roots", "all"] {
        let n = 60;
        let sc = flash_crowd(n, announce);
        let o = run_model(&sc, 11).unwrap();
        let f = o.closure_bytes[0] as f64;
        let (sum_up, seed_up, min_down) = o.capacity;
        assert_eq!(
            o.fresh_completions.len(),
            n as usize,
            "every node got the closure"
        );
        assert_eq!(o.capacity_violations, 0);
        assert_eq!(o.unfinished_fetches, 0);
        let mut times: Vec<f64> = o.fresh_completions.iter().map(|&(t, _)| t).collect();
        times.sort_by(f64::total_cmp);
        let floor = (f / min_down).max(f / seed_up);
        for (m, &t) in times.iter().enumerate() {
            let bound = ((m + 1) as f64 * f / sum_up).max(floor);
            assert!(
                t >= bound * (1.0 - 1e-9),
                "completion {} at {t:.2} s beats the bound {bound:.2} s",
                m + 1
            );
        }
        assert!(
            o.seed_egress_bytes < o.delivered_bytes / 2,
            "peers carried most bytes"
        );
    }
}

#[test]
fn record_survival_matches_one_minus_churn_to_the_k() {
    // Exponential on/off sessions (2 h / 2 h), records placed once on the k closest online
    // servers and never republished. A server online at placement is online τ later with
    // p = π + (1 − π)·e^{−(λ+μ)τ}; a record survives if any of its k holders is: 1 − (1 − p)^k.
    let text = std::fs::read_to_string(scenarios_dir().join("smoke.toml")).unwrap();
    let over: Vec<(String, String)> = [
        ("nodes", "3000"),
        ("sim_hours", "10.0"),
        ("workload.first_release_h", "100.0"),
        ("workload.warm_frac", "1.0"),
        ("class.home.share", "1.0"),
        ("class.home.nat_frac", "0.0"),
        ("class.home.sessions", "\"exp_test\""),
        ("class.home.off_mean_h", "2.0"),
        ("class.server.share", "0.0"),
        ("class.lan.share", "0.0"),
        ("class.ci.share", "0.0"),
        ("dht.k", "3"),
        ("dht.probe_keys", "4000"),
        ("dht.probe_at_h", "4.0"),
        ("dht.probe_age_h", "4.0"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let sc = Scenario::from_str_with(&text, "survival", &over).unwrap();
    let o = run_model(&sc, 21).unwrap();
    let survival = o.probe_survival.unwrap();
    let (pi, rate, tau) = (0.5, 1.0 / 2.0 + 1.0 / 2.0, 4.0);
    let p = pi + (1.0 - pi) * f64::exp(-rate * tau);
    let expected = 1.0 - (1.0 - p).powi(3);
    assert!(
        (survival - expected).abs() < 0.03,
        "survival {survival:.3} vs 1 − churn^k {expected:.3}"
    );
    let p_seen = o.probe_holder_online.unwrap();
    assert!(
        (p_seen - p).abs() < 0.03,
        "holders online {p_seen:.3} vs {p:.3}"
    );
    // With k = 20 the same churn loses almost nothing.
    let mut over20 = over.clone();
    over20.retain(|(k, _)| k != "dht.k");
    over20.push(("dht.k".into(), "20".into()));
    let sc = Scenario::from_str_with(&text, "survival20", &over20).unwrap();
    let s20 = run_model(&sc, 21).unwrap().probe_survival.unwrap();
    assert!(s20 > 0.999, "{s20}");
}

#[test]
fn announce_all_costs_more_records_than_roots() {
    let roots = run_model(&smoke(&[]), 2).unwrap();
    let all = run_model(&smoke(&[("dht.announce", "all")]), 2).unwrap();
    assert!(all.mean_records_per_server > 10.0 * roots.mean_records_per_server);
    assert!(all.announce_msgs > 10 * roots.announce_msgs);
}

/// Every line of a shipped scenario marked GUESS names a key that `sweep.toml` sweeps.
#[test]
fn every_guess_is_swept() {
    let sweep = Scenario::load(&scenarios_dir().join("sweep.toml"), &[]).unwrap();
    let swept: BTreeSet<String> = sweep.sweep.keys().cloned().collect();
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(scenarios_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut table = String::new();
        let mut class_name = String::new();
        for line in text.lines() {
            let l = line.trim();
            if l.starts_with("[[class]]") {
                table = "class".into();
                class_name.clear();
                continue;
            }
            if l.starts_with('[') {
                table = l.trim_matches(|c| c == '[' || c == ']').to_string();
                continue;
            }
            let Some((key, _)) = l.split_once('=') else {
                continue;
            };
            let key = key.trim();
            if table == "class" && key == "name" {
                class_name = l.split('"').nth(1).unwrap_or("").to_string();
            }
            if !l.contains("GUESS") || key.starts_with('#') {
                continue;
            }
            let full = match table.as_str() {
                "" => key.to_string(),
                "class" => format!("class.{class_name}.{key}"),
                t => format!("{t}.{key}"),
            };
            if !swept.contains(&full) {
                missing.push(format!("{}: {full}", path.display()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "GUESS parameters not swept in sweep.toml: {missing:#?}"
    );
}

#[test]
fn shipped_scenarios_parse() {
    for name in [
        "smoke.toml",
        "nodes-10k.toml",
        "nodes-100k.toml",
        "sweep.toml",
    ] {
        Scenario::load(&scenarios_dir().join(name), &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

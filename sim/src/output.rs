//! Run outputs: `summary.json`, `timeseries.csv`, `classes.csv`, `fetch_times.csv`, SVG plots
//! and `report.md`, all in one directory.
//!
//! Owns: the field names of `summary.json` (a contract other tools read), the cost usage a run
//! implies, and deterministic formatting (the same outcome gives byte-identical files).
//! Must not: simulate — it only formats an `Outcome`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::cost::{bills, Prices, Usage, MONTH_S};
use crate::model::{percentile, ClassStats, Outcome};
use crate::scenario::{Announce, Scenario};
use crate::svg::{line_chart, Chart, Series};
use crate::Error;

/// `summary.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// "model" or "real".
    pub mode: String,
    /// Scenario name.
    pub scenario: String,
    /// Non-seed nodes.
    pub nodes: u64,
    /// Seed nodes.
    pub seeds: u64,
    /// Random seed.
    pub seed: u64,
    /// Simulated seconds.
    pub sim_seconds: f64,
    /// Bytes received by all nodes.
    pub delivered_bytes: u64,
    /// Bytes sent, summed over senders (equals `delivered_bytes`).
    pub sent_bytes: u64,
    /// Bytes sent by seeds.
    pub seed_egress_bytes: u64,
    /// `seed_egress_bytes / delivered_bytes`.
    pub seed_egress_share: f64,
    /// Seed share of delivered bytes for the `popular_closures` most popular closures.
    pub seed_egress_share_popular: f64,
    /// How many closures count as popular.
    pub popular_closures: u32,
    /// Full-closure fetch time p50 over all classes, seconds.
    pub closure_fetch_p50_s: Option<f64>,
    /// p95.
    pub closure_fetch_p95_s: Option<f64>,
    /// p99.
    pub closure_fetch_p99_s: Option<f64>,
    /// Completed full-closure fetches.
    pub closure_fetches: u64,
    /// Upgrade (changed bytes only) time p50, seconds.
    pub upgrade_fetch_p50_s: Option<f64>,
    /// p95.
    pub upgrade_fetch_p95_s: Option<f64>,
    /// Completed upgrades.
    pub upgrade_fetches: u64,
    /// Fetches still running (or stuck) at the end, left out of the percentiles.
    pub unfinished_fetches: u64,
    /// `roots` or `all`.
    pub dht_announce: String,
    /// Replication factor.
    pub dht_k: u32,
    /// Provider-lookup messages received per online DHT server per second.
    pub dht_provider_queries_per_node_per_s: f64,
    /// Announce (ADD_PROVIDER and walk) messages per online DHT server per second.
    pub dht_announce_msgs_per_node_per_s: f64,
    /// Live provider records stored per online DHT server (time average).
    pub dht_records_per_node: f64,
    /// Mean bytes held per non-seed node at the end.
    pub stored_bytes_per_node: f64,
    /// Bytes the seeds hold (all generations, deduplicated, before pack overhead).
    pub seed_stored_bytes: u64,
    /// Lower bound on seed egress: new bytes of each generation that was fetched at all.
    pub seed_lower_bound_bytes: u64,
    /// The seeds' monthly bill by provider for this run's catalogue and egress, USD.
    pub monthly_bill_usd: BTreeMap<String, f64>,
    /// Usage behind `monthly_bill_usd`.
    pub monthly_usage: Usage,
    /// Bill for a cache.nixos.org-sized history with this run's seed share, USD/month.
    pub history_bill_usd: BTreeMap<String, f64>,
    /// Usage behind `history_bill_usd`.
    pub history_usage: Usage,
    /// Date of the price table.
    pub prices_as_of: String,
    /// Fraction of probe records still held by an online server after `probe_age_h`.
    pub record_survival: Option<f64>,
    /// 1 − (1 − p)^k with p the fraction of probe holders online at the check.
    pub record_survival_expected: Option<f64>,
    /// Failed dials (NAT, stale records).
    pub dial_failures: u64,
    /// Events processed.
    pub events: u64,
    /// Flows started from a node that could not serve (must be 0).
    pub serve_violations: u64,
    /// Link capacity violations (checked only with `checks = true`; must be 0).
    pub capacity_violations: u64,
    /// Per-class results.
    pub classes: Vec<ClassStats>,
}

fn share(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Builds the summary (and its bills) from an outcome.
pub fn summarize(o: &Outcome, sc: &Scenario, prices: &Prices) -> Result<Summary, Error> {
    let mix = sc.closure_mix()?;
    let mean_nar = mix.mean_nar_mib * 1024.0 * 1024.0;
    let pack = sc.bill.pack_mib * 1024.0 * 1024.0;
    let scale = MONTH_S / o.sim_seconds;
    // Catalogue growth per month: each closure's new bytes per generation.
    let w = &sc.workload;
    let per_gen: f64 = o.closure_bytes.iter().map(|&b| b as f64).sum::<f64>()
        * if w.mass_rebuild_every > 0 {
            let n = f64::from(w.mass_rebuild_every);
            ((n - 1.0) * w.bump_new_bytes_frac + w.rebuild_new_bytes_frac) / n
        } else {
            w.bump_new_bytes_frac
        };
    let gens_per_month = MONTH_S / (w.gen_interval_h * 3600.0);
    let monthly_usage = Usage {
        stored_bytes: o.seed_stored_bytes as f64,
        puts: (per_gen * gens_per_month / pack).ceil(),
        gets: (o.seed_egress_bytes as f64 * scale / mean_nar).ceil(),
        egress_bytes: o.seed_egress_bytes as f64 * scale,
    };
    let seed_share = share(o.seed_egress_bytes, o.delivered_bytes);
    let hist_stored = sc.bill.history_nar_bytes * sc.bill.stored_ratio;
    // Growth: 90.2 TiB of NARs added in 2023 (discourse t/34580), stored at the same ratio.
    let growth = 90.2 * 1024f64.powi(4) / 12.0 * sc.bill.stored_ratio;
    let hist_egress = sc.bill.monthly_delivered_bytes * seed_share;
    let history_usage = Usage {
        stored_bytes: hist_stored,
        puts: (growth / pack).ceil(),
        gets: (hist_egress / mean_nar).ceil(),
        egress_bytes: hist_egress,
    };
    let servers = o.mean_online_servers.max(1.0);
    let expected = o
        .probe_holder_online
        .map(|p| 1.0 - (1.0 - p).powi(sc.dht.k as i32));
    Ok(Summary {
        mode: o.mode.into(),
        scenario: o.name.clone(),
        nodes: o.nodes,
        seeds: o.seeds,
        seed: o.seed,
        sim_seconds: o.sim_seconds,
        delivered_bytes: o.delivered_bytes,
        sent_bytes: o.sent_bytes,
        seed_egress_bytes: o.seed_egress_bytes,
        seed_egress_share: seed_share,
        seed_egress_share_popular: share(o.popular_seed_bytes, o.popular_delivered_bytes),
        popular_closures: sc.workload.popular_closures,
        closure_fetch_p50_s: percentile(&o.fresh_times, 0.50),
        closure_fetch_p95_s: percentile(&o.fresh_times, 0.95),
        closure_fetch_p99_s: percentile(&o.fresh_times, 0.99),
        closure_fetches: o.fresh_times.len() as u64,
        upgrade_fetch_p50_s: percentile(&o.upgrade_times, 0.50),
        upgrade_fetch_p95_s: percentile(&o.upgrade_times, 0.95),
        upgrade_fetches: o.upgrade_times.len() as u64,
        unfinished_fetches: o.unfinished_fetches,
        dht_announce: match sc.dht.announce {
            Announce::Roots => "roots".into(),
            Announce::All => "all".into(),
        },
        dht_k: sc.dht.k,
        dht_provider_queries_per_node_per_s: o.lookup_msgs as f64 / servers / o.sim_seconds,
        dht_announce_msgs_per_node_per_s: o.announce_msgs as f64 / servers / o.sim_seconds,
        dht_records_per_node: o.mean_records_per_server,
        stored_bytes_per_node: o.stored_bytes_per_node,
        seed_stored_bytes: o.seed_stored_bytes,
        seed_lower_bound_bytes: o.seed_lower_bound_bytes,
        monthly_bill_usd: bills(prices, &monthly_usage),
        monthly_usage,
        history_bill_usd: bills(prices, &history_usage),
        history_usage,
        prices_as_of: prices.as_of.clone(),
        record_survival: o.probe_survival,
        record_survival_expected: expected,
        dial_failures: o.dial_failures,
        events: o.events,
        serve_violations: o.serve_violations,
        capacity_violations: o.capacity_violations,
        classes: o.classes.clone(),
    })
}

fn write(dir: &Path, name: &str, text: &str) -> Result<(), Error> {
    let p = dir.join(name);
    std::fs::write(&p, text).map_err(|e| Error::Io {
        path: p.display().to_string(),
        source: e,
    })
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(String::new, |x| format!("{x:.3}"))
}

/// The time series as CSV.
pub fn timeseries_csv(o: &Outcome) -> String {
    let mut s = String::from(
        "t_h,online_nodes,online_servers,active_fetches,delivered_bytes,seed_bytes,seed_share,seed_share_cum,dht_records_per_server,lookup_msgs_per_server_per_s,announce_msgs_per_server_per_s,stored_bytes_per_node\n",
    );
    for r in &o.samples {
        let _ = writeln!(
            s,
            "{:.4},{},{},{},{},{},{:.6},{:.6},{:.3},{:.6},{:.6},{:.0}",
            r.t_h,
            r.online_nodes,
            r.online_servers,
            r.active_fetches,
            r.delivered_bytes,
            r.seed_bytes,
            r.seed_share,
            r.seed_share_cum,
            r.dht_records_per_server,
            r.lookup_msgs_per_server_per_s,
            r.announce_msgs_per_server_per_s,
            r.stored_bytes_per_node
        );
    }
    s
}

/// Per-class results as CSV.
pub fn classes_csv(o: &Outcome) -> String {
    let mut s = String::from("class,nodes,fresh_fetches,fresh_p50_s,fresh_p95_s,fresh_p99_s,upgrade_fetches,upgrade_p50_s,upgrade_p95_s,upgrade_p99_s,sent_bytes,received_bytes\n");
    for c in &o.classes {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{}",
            c.class,
            c.nodes,
            c.fresh_fetches,
            opt(c.fresh_p50_s),
            opt(c.fresh_p95_s),
            opt(c.fresh_p99_s),
            c.upgrade_fetches,
            opt(c.upgrade_p50_s),
            opt(c.upgrade_p95_s),
            opt(c.upgrade_p99_s),
            c.sent_bytes,
            c.received_bytes
        );
    }
    s
}

/// Writes every output of one run into `dir` (created if missing).
pub fn write_run(
    dir: &Path,
    o: &Outcome,
    sc: &Scenario,
    prices: &Prices,
) -> Result<Summary, Error> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io {
        path: dir.display().to_string(),
        source: e,
    })?;
    let summary = summarize(o, sc, prices)?;
    let mut json = serde_json::to_string_pretty(&summary)?;
    json.push('\n');
    write(dir, "summary.json", &json)?;
    write(dir, "timeseries.csv", &timeseries_csv(o))?;
    write(dir, "classes.csv", &classes_csv(o))?;

    // Fetch-time percentiles (deciles and tails) for the CDF plot, per class is in classes.csv.
    let mut ft = String::from("quantile,fresh_s,upgrade_s\n");
    for q in (1..=99).map(|q| f64::from(q) / 100.0) {
        let _ = writeln!(
            ft,
            "{q:.2},{},{}",
            opt(percentile(&o.fresh_times, q)),
            opt(percentile(&o.upgrade_times, q))
        );
    }
    write(dir, "fetch_times.csv", &ft)?;

    let seed_share = line_chart(
        &Chart {
            title: "Seed share of delivered bytes",
            x_label: "time (h)",
            y_label: "share",
            log_x: false,
            y_from_zero: true,
        },
        &[
            Series {
                label: "per interval".into(),
                points: o
                    .samples
                    .iter()
                    .filter(|r| r.delivered_bytes > 0)
                    .map(|r| (r.t_h, r.seed_share))
                    .collect(),
            },
            Series {
                label: "cumulative".into(),
                points: o
                    .samples
                    .iter()
                    .map(|r| (r.t_h, r.seed_share_cum))
                    .collect(),
            },
        ],
    );
    write(dir, "seed_share.svg", &seed_share)?;
    let cdf = |v: &[f64]| -> Vec<(f64, f64)> {
        let n = v.len();
        let step = (n / 400).max(1);
        (0..n)
            .step_by(step)
            .chain(n.checked_sub(1))
            .map(|i| (v[i], (i + 1) as f64 / n as f64))
            .collect()
    };
    let fetch_cdf = line_chart(
        &Chart {
            title: "Closure fetch time (CDF)",
            x_label: "seconds (log)",
            y_label: "fraction of fetches",
            log_x: true,
            y_from_zero: true,
        },
        &[
            Series {
                label: "full closure".into(),
                points: cdf(&o.fresh_times),
            },
            Series {
                label: "upgrade".into(),
                points: cdf(&o.upgrade_times),
            },
        ],
    );
    write(dir, "fetch_cdf.svg", &fetch_cdf)?;
    let dht = line_chart(
        &Chart {
            title: "DHT provider records per online server",
            x_label: "time (h)",
            y_label: "records",
            log_x: false,
            y_from_zero: true,
        },
        &[Series {
            label: format!("announce {}", summary.dht_announce),
            points: o
                .samples
                .iter()
                .map(|r| (r.t_h, r.dht_records_per_server))
                .collect(),
        }],
    );
    write(dir, "dht_records.svg", &dht)?;
    write(dir, "report.md", &report(&summary, sc))?;
    Ok(summary)
}

fn gib(b: f64) -> String {
    format!("{:.2} GiB", b / 1024f64.powi(3))
}

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |x| format!("{x:.1} s"))
}

/// The one-page Markdown report.
pub fn report(s: &Summary, sc: &Scenario) -> String {
    let mut r = String::new();
    let _ = writeln!(r, "# Simulation report: `{}` (model mode)\n", s.scenario);
    let _ = writeln!(
        r,
        "{} nodes + {} seeds, seed {}, {:.1} simulated hours, `--announce {}`, k = {}. \
         Model mode only: **not yet validated against real mode**.\n",
        s.nodes,
        s.seeds,
        s.seed,
        s.sim_seconds / 3600.0,
        s.dht_announce,
        s.dht_k
    );
    let _ = writeln!(r, "| figure | value |\n|---|---|");
    let _ = writeln!(r, "| delivered | {} |", gib(s.delivered_bytes as f64));
    let _ = writeln!(
        r,
        "| seed egress | {} ({:.1} % of delivered; {:.1} % for the {} most popular closures) |",
        gib(s.seed_egress_bytes as f64),
        100.0 * s.seed_egress_share,
        100.0 * s.seed_egress_share_popular,
        s.popular_closures
    );
    let _ = writeln!(
        r,
        "| full closure fetch p50 / p95 / p99 | {} / {} / {} ({} fetches) |",
        secs(s.closure_fetch_p50_s),
        secs(s.closure_fetch_p95_s),
        secs(s.closure_fetch_p99_s),
        s.closure_fetches
    );
    let _ = writeln!(
        r,
        "| upgrade fetch p50 / p95 | {} / {} ({} fetches; {} fetches unfinished at the end) |",
        secs(s.upgrade_fetch_p50_s),
        secs(s.upgrade_fetch_p95_s),
        s.upgrade_fetches,
        s.unfinished_fetches
    );
    let _ = writeln!(
        r,
        "| DHT per online server | {:.1} records, {:.4} provider queries/s, {:.4} announce msgs/s |",
        s.dht_records_per_node, s.dht_provider_queries_per_node_per_s, s.dht_announce_msgs_per_node_per_s
    );
    let _ = writeln!(r, "| stored per node | {} |", gib(s.stored_bytes_per_node));
    if let (Some(a), Some(b)) = (s.record_survival, s.record_survival_expected) {
        let _ = writeln!(
            r,
            "| probe record survival after {} h without republishing | {:.3} (1 − (1 − p)^k = {:.3}) |",
            sc.dht.probe_age_h, a, b
        );
    }
    let _ = writeln!(
        r,
        "\n## Seed bill, USD per month (prices as of {})\n",
        s.prices_as_of
    );
    let _ = writeln!(r, "| provider | this run's catalogue and egress | cache.nixos.org-sized history |\n|---|---|---|");
    for (k, v) in &s.monthly_bill_usd {
        let h = s.history_bill_usd.get(k).copied().unwrap_or(f64::NAN);
        let _ = writeln!(r, "| {k} | {v:.2} | {h:.0} |");
    }
    let _ = writeln!(
        r,
        "\nHistory: {:.0} TB of NARs stored at ratio {:.3} ({:.0} TB in {} MiB packs), {:.0} TiB/month delivered of which the seed share above leaves the seeds.\n",
        sc.bill.history_nar_bytes / 1e12,
        sc.bill.stored_ratio,
        s.history_usage.stored_bytes / 1e12,
        sc.bill.pack_mib,
        sc.bill.monthly_delivered_bytes / 1024f64.powi(4)
    );
    let _ = writeln!(r, "## Per class\n\n| class | nodes | full fetches | p50 | p95 | p99 | upgrades | p50 | p95 |\n|---|---|---|---|---|---|---|---|---|");
    for c in &s.classes {
        let _ = writeln!(
            r,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.class,
            c.nodes,
            c.fresh_fetches,
            secs(c.fresh_p50_s),
            secs(c.fresh_p95_s),
            secs(c.fresh_p99_s),
            c.upgrade_fetches,
            secs(c.upgrade_p50_s),
            secs(c.upgrade_p95_s)
        );
    }
    let _ = writeln!(
        r,
        "\n## Plots\n\n![seed share](seed_share.svg)\n![fetch time CDF](fetch_cdf.svg)\n![DHT records](dht_records.svg)\n\n\
         Data: `summary.json`, `timeseries.csv`, `classes.csv`, `fetch_times.csv`. \
         Parameters marked GUESS in the scenario file are swept in `sim/scenarios/sweep.toml`."
    );
    r
}

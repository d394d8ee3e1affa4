//! `nix-p2p-cache-sim`: run a scenario, sweep a parameter, (later) compare model and real mode.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use nix_p2p_cache_sim::cost::Prices;
use nix_p2p_cache_sim::output::{write_run, Summary};
use nix_p2p_cache_sim::run_model;
use nix_p2p_cache_sim::scenario::Scenario;

#[derive(Parser)]
#[command(
    name = "nix-p2p-cache-sim",
    about = "Simulate a nix-p2p-cache network (model mode)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one scenario and write summary.json, CSVs, SVG plots and report.md.
    Run {
        /// Scenario file (TOML).
        scenario: PathBuf,
        /// Random seed (defaults to the scenario's `seed`).
        #[arg(long)]
        seed: Option<u64>,
        /// Output directory (default: sim-out/<scenario name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override a scenario field: key=value (dotted keys, e.g. dht.k=10). Repeatable.
        #[arg(long = "set")]
        set: Vec<String>,
    },
    /// Run once per value of each parameter (one at a time, others at the scenario's values).
    Sweep {
        /// Scenario file (TOML).
        scenario: PathBuf,
        /// key=v1,v2,... (repeatable); without it, the scenario's [sweep] table is used.
        #[arg(long)]
        param: Vec<String>,
        /// Random seed (defaults to the scenario's `seed`).
        #[arg(long)]
        seed: Option<u64>,
        /// Output directory (default: sim-out/<scenario name>-sweep).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Model vs real mode on the same trace (not built yet).
    Compare {
        /// Scenario file (TOML).
        scenario: PathBuf,
    },
}

fn split_kv(s: &str) -> Result<(String, String)> {
    let (k, v) = s
        .split_once('=')
        .with_context(|| format!("expected key=value, got {s:?}"))?;
    if k.trim().is_empty() {
        bail!("empty key in {s:?}");
    }
    Ok((k.trim().to_string(), v.trim().to_string()))
}

fn run_one(sc: &Scenario, seed: u64, out: &Path, prices: &Prices) -> Result<Summary> {
    let t = Instant::now();
    let outcome = run_model(sc, seed)?;
    let summary = write_run(out, &outcome, sc, prices)?;
    eprintln!(
        "{}: {} nodes, {} events in {:.1} s; seed share {:.3}, closure p50 {} s → {}",
        sc.name,
        summary.nodes,
        summary.events,
        t.elapsed().as_secs_f64(),
        summary.seed_egress_share,
        summary
            .closure_fetch_p50_s
            .map_or_else(|| "-".into(), |x| format!("{x:.1}")),
        out.display()
    );
    Ok(summary)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let prices = Prices::builtin()?;
    match cli.cmd {
        Cmd::Run {
            scenario,
            seed,
            out,
            set,
        } => {
            let overrides = set
                .iter()
                .map(|s| split_kv(s))
                .collect::<Result<Vec<_>>>()?;
            let sc = Scenario::load(&scenario, &overrides)?;
            let out = out.unwrap_or_else(|| PathBuf::from("sim-out").join(&sc.name));
            run_one(&sc, seed.unwrap_or(sc.seed), &out, &prices)?;
        }
        Cmd::Sweep {
            scenario,
            param,
            seed,
            out,
        } => {
            let base = Scenario::load(&scenario, &[])?;
            let mut params: Vec<(String, Vec<String>)> = Vec::new();
            for p in &param {
                let (k, vs) = split_kv(p)?;
                let values: Vec<String> = vs.split(',').map(|v| v.trim().to_string()).collect();
                if values.iter().any(String::is_empty) {
                    bail!("empty value in {p:?}");
                }
                params.push((k, values));
            }
            if params.is_empty() {
                for (k, vs) in &base.sweep {
                    params.push((k.clone(), vs.iter().map(toml_literal).collect()));
                }
            }
            if params.is_empty() {
                bail!(
                    "nothing to sweep: give --param key=v1,v2 or a [sweep] table in the scenario"
                );
            }
            let out = out
                .unwrap_or_else(|| PathBuf::from("sim-out").join(format!("{}-sweep", base.name)));
            let seed = seed.unwrap_or(base.seed);
            let mut rows: Vec<serde_json::Value> = Vec::new();
            let mut csv = String::from("param,value,nodes,seed_egress_share,seed_egress_share_popular,closure_fetch_p50_s,closure_fetch_p95_s,upgrade_fetch_p50_s,dht_provider_queries_per_node_per_s,dht_announce_msgs_per_node_per_s,dht_records_per_node,record_survival,bill_aws_s3_standard_usd,dir\n");
            for (key, values) in &params {
                for v in values {
                    let sc = Scenario::load(&scenario, &[(key.clone(), v.clone())])
                        .with_context(|| format!("{key}={v}"))?;
                    let dir_name = format!("{key}={}", v.replace(['/', '"', ' '], "_"));
                    let s = run_one(&sc, seed, &out.join(&dir_name), &prices)?;
                    let f = |x: Option<f64>| x.map_or_else(String::new, |x| format!("{x:.3}"));
                    let _ =
                        writeln!(
                        csv,
                        "{key},{v},{},{:.6},{:.6},{},{},{},{:.6},{:.6},{:.3},{},{:.2},{dir_name}",
                        s.nodes,
                        s.seed_egress_share,
                        s.seed_egress_share_popular,
                        f(s.closure_fetch_p50_s),
                        f(s.closure_fetch_p95_s),
                        f(s.upgrade_fetch_p50_s),
                        s.dht_provider_queries_per_node_per_s,
                        s.dht_announce_msgs_per_node_per_s,
                        s.dht_records_per_node,
                        f(s.record_survival),
                        s.monthly_bill_usd.get("aws_s3_standard").copied().unwrap_or(0.0),
                    );
                    rows.push(serde_json::json!({
                        "param": key, "value": v, "dir": dir_name, "summary": s,
                    }));
                }
            }
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join("sweep.csv"), csv)?;
            std::fs::write(
                out.join("sweep.json"),
                serde_json::to_string_pretty(&rows)? + "\n",
            )?;
            eprintln!("sweep table: {}", out.join("sweep.csv").display());
        }
        Cmd::Compare { scenario } => {
            bail!(
                "compare: real mode is not built yet (issue 12, deliverable 2); \
                 only model mode runs today — try `nix-p2p-cache-sim run {}`",
                scenario.display()
            );
        }
    }
    Ok(())
}

fn toml_literal(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

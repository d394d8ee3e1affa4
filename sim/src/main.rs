//! `nix-p2p-cache-sim`: run a scenario, sweep a parameter, (later) compare model and real mode.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use nix_p2p_cache_sim::cost::Prices;
use nix_p2p_cache_sim::output::{write_run, Summary};
use nix_p2p_cache_sim::scenario::Scenario;
use nix_p2p_cache_sim::{run_model, run_real};

#[derive(Parser)]
#[command(
    name = "nix-p2p-cache-sim",
    about = "Simulate a nix-p2p-cache network (model mode)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Model,
    Real,
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
        /// `model` (the discrete-event model) or `real` (the daemon's own nodes in one process).
        #[arg(long, value_enum, default_value_t = Mode::Model)]
        mode: Mode,
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
    /// Runs a scenario in model and in real mode and writes both side by side
    /// (`OUT/compare.json`, `OUT/compare.md`, each run in `OUT/model` and `OUT/real`).
    Compare {
        /// Scenario file (TOML).
        scenario: PathBuf,
        /// Random seed (defaults to the scenario's `seed`).
        #[arg(long)]
        seed: Option<u64>,
        /// Output directory (default: sim-out/<scenario name>-compare).
        #[arg(long)]
        out: Option<PathBuf>,
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

fn run_one(sc: &Scenario, seed: u64, out: &Path, prices: &Prices, mode: Mode) -> Result<Summary> {
    let t = Instant::now();
    let outcome = match mode {
        Mode::Model => run_model(sc, seed)?,
        Mode::Real => {
            // The nodes' data dirs, removed after the run.
            let work = out.join("nodes");
            let _ = std::fs::remove_dir_all(&work);
            std::fs::create_dir_all(&work)
                .with_context(|| format!("creating {}", work.display()))?;
            let r = run_real(sc, seed, &work);
            let _ = std::fs::remove_dir_all(&work);
            r?
        }
    };
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
    // Real mode's nodes log through `tracing`; shown only when RUST_LOG asks.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_thread_names(true) // real mode: each node's threads are named after it
            .with_writer(std::io::stderr)
            .init();
    }
    let prices = Prices::builtin()?;
    match cli.cmd {
        Cmd::Run {
            scenario,
            seed,
            out,
            set,
            mode,
        } => {
            let overrides = set
                .iter()
                .map(|s| split_kv(s))
                .collect::<Result<Vec<_>>>()?;
            let sc = Scenario::load(&scenario, &overrides)?;
            let out = out.unwrap_or_else(|| PathBuf::from("sim-out").join(&sc.name));
            run_one(&sc, seed.unwrap_or(sc.seed), &out, &prices, mode)?;
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
                    let s = run_one(&sc, seed, &out.join(&dir_name), &prices, Mode::Model)?;
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
        Cmd::Compare {
            scenario,
            seed,
            out,
        } => {
            let sc = Scenario::load(&scenario, &[])?;
            let out = out
                .unwrap_or_else(|| PathBuf::from("sim-out").join(format!("{}-compare", sc.name)));
            let seed = seed.unwrap_or(sc.seed);
            let model = run_one(&sc, seed, &out.join("model"), &prices, Mode::Model)?;
            let real = run_one(&sc, seed, &out.join("real"), &prices, Mode::Real)?;
            let (json, md) = compare(&sc, &model, &real);
            std::fs::write(
                out.join("compare.json"),
                serde_json::to_string_pretty(&json)? + "\n",
            )?;
            std::fs::write(out.join("compare.md"), &md)?;
            print!("{md}");
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

/// The figures model and real mode both report, side by side. Real mode's byte counts are of
/// closures shrunk by `real.bytes_scale`: they are scaled back. `tolerance` is the validation
/// target (docs/simulation.md): relative for rates and times, absolute for shares.
fn compare(sc: &Scenario, m: &Summary, r: &Summary) -> (serde_json::Value, String) {
    let unscale = 1.0 / sc.real.bytes_scale;
    let rows: Vec<(&str, f64, f64, f64, bool)> = vec![
        (
            "seed_egress_share",
            m.seed_egress_share,
            r.seed_egress_share,
            0.10,
            false,
        ),
        (
            "closure_fetch_p50_s",
            m.closure_fetch_p50_s.unwrap_or(f64::NAN),
            r.closure_fetch_p50_s.unwrap_or(f64::NAN),
            0.15,
            true,
        ),
        (
            "closure_fetch_p95_s",
            m.closure_fetch_p95_s.unwrap_or(f64::NAN),
            r.closure_fetch_p95_s.unwrap_or(f64::NAN),
            0.15,
            true,
        ),
        (
            "dht_provider_queries_per_node_per_s",
            m.dht_provider_queries_per_node_per_s,
            r.dht_provider_queries_per_node_per_s,
            0.10,
            true,
        ),
        (
            "dht_announce_msgs_per_node_per_s",
            m.dht_announce_msgs_per_node_per_s,
            r.dht_announce_msgs_per_node_per_s,
            0.10,
            true,
        ),
        (
            "dht_records_per_node",
            m.dht_records_per_node,
            r.dht_records_per_node,
            0.10,
            true,
        ),
        (
            "delivered_bytes",
            m.delivered_bytes as f64,
            r.delivered_bytes as f64 * unscale,
            0.10,
            true,
        ),
        (
            "closure_fetches",
            m.closure_fetches as f64,
            r.closure_fetches as f64,
            0.0,
            true,
        ),
    ];
    let mut md = format!(
        "# {}: model vs real (seed {}, {} nodes)\n\n| figure | model | real | real/model | target | within |\n|---|---|---|---|---|---|\n",
        sc.name, m.seed, m.nodes
    );
    let mut list = Vec::new();
    for (name, a, b, tol, relative) in rows {
        let within = if relative {
            a.is_finite()
                && b.is_finite()
                && ((b - a).abs() <= tol * a.abs().max(f64::MIN_POSITIVE))
        } else {
            (b - a).abs() <= tol
        };
        let ratio = if a == 0.0 { f64::NAN } else { b / a };
        let target = if relative {
            format!("±{:.0} %", tol * 100.0)
        } else {
            format!("±{tol:.2}")
        };
        let _ = writeln!(
            md,
            "| {name} | {a:.4} | {b:.4} | {ratio:.3} | {target} | {} |",
            if within { "yes" } else { "no" }
        );
        list.push(serde_json::json!({
            "figure": name, "model": a, "real": b, "ratio": ratio,
            "tolerance": tol, "relative": relative, "within": within,
        }));
    }
    md.push_str(
        "\nReal mode's bytes are scaled back by 1/real.bytes_scale. Both runs draw their \
         trace from the same scenario and seed, not the same list of fetches; what real mode \
         leaves out is in docs/simulation.md.\n",
    );
    (
        serde_json::json!({ "scenario": sc.name, "seed": m.seed, "rows": list }),
        md,
    )
}

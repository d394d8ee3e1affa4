//! The binary's contract: `run` on the smoke scenario writes the files and `summary.json` fields
//! other tools read; `sweep` writes one run per value and a table; bad input fails cleanly
//! (`compare` and real mode: `tests/real.rs`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nix-p2p-cache-sim"))
}

fn smoke() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/smoke.toml")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "nix-p2p-cache-sim-cli-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn run_smoke_writes_the_contract() {
    let out = tmp("run");
    let st = bin()
        .arg("run")
        .arg(smoke())
        .args(["--seed", "4", "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
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
        let len = std::fs::metadata(out.join(f)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "{f} missing or empty");
    }
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["mode"], "model");
    assert_eq!(s["seed"], 4);
    assert_eq!(s["nodes"], 300);
    for &k in common::SUMMARY_FIELDS {
        let v = &s[k];
        assert!(v.is_number() || v.is_object(), "{k} is not a number: {v}");
    }
    let bill = s["monthly_bill_usd"].as_object().unwrap();
    for p in [
        "aws_s3_standard",
        "aws_s3_ia",
        "cloudflare_r2",
        "backblaze_b2",
        "hetzner",
    ] {
        assert!(bill[p].as_f64().unwrap() > 0.0, "bill for {p}");
    }
    let delivered = s["delivered_bytes"].as_u64().unwrap();
    let seed = s["seed_egress_bytes"].as_u64().unwrap();
    assert!(delivered > 0);
    let share = s["seed_egress_share"].as_f64().unwrap();
    assert!((share - seed as f64 / delivered as f64).abs() < 1e-12);
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn sweep_writes_one_run_per_value_and_a_table() {
    let out = tmp("sweep");
    let st = bin()
        .arg("sweep")
        .arg(smoke())
        .args([
            "--param",
            "dht.k=4,20",
            "--param",
            "dht.announce=roots,all",
            "--out",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    for d in [
        "dht.k=4",
        "dht.k=20",
        "dht.announce=roots",
        "dht.announce=all",
    ] {
        assert!(out.join(d).join("summary.json").exists(), "{d}");
    }
    let csv = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");
    let rows: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("sweep.json")).unwrap()).unwrap();
    let k4 = &rows[0]["summary"];
    let k20 = &rows[1]["summary"];
    assert_eq!(k4["dht_k"], 4);
    // Records per server scale with k.
    let r4 = k4["dht_records_per_node"].as_f64().unwrap();
    let r20 = k20["dht_records_per_node"].as_f64().unwrap();
    assert!((r20 / r4 - 5.0).abs() < 0.5, "{r4} {r20}");
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn bad_input_fails_cleanly() {
    let o = bin()
        .arg("run")
        .arg(smoke())
        .args(["--mode", "imaginary"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let o = bin()
        .arg("run")
        .arg(smoke())
        .args(["--set", "dht.nosuch=1", "--out"])
        .arg(tmp("bad"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nosuch"));
    let o = bin().arg("run").arg("/nonexistent.toml").output().unwrap();
    assert!(!o.status.success());
    let o = bin()
        .arg("sweep")
        .arg(smoke())
        .args(["--param", "dht.k"])
        .output()
        .unwrap();
    assert!(!o.status.success());
}

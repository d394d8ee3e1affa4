//! Issue 11 end to end: cold compaction on a store imported from a closure the real Nix built.
//! `compact` rewrites the packs smaller, every NAR still equals `nix-store --dump`, `verify`
//! passes, and the real `nix copy` substitutes the closure from the compacted store; a seed
//! compacts its cold packs by itself while it serves.

use std::process::Command;

use nix_p2p_cache_tests::harness::*;
use nix_p2p_cache_tests::{cmd, run_ok, stats, Corpus};

fn assert_same_nars(data: &std::path::Path, closure: &[String]) {
    for p in closure {
        let ours = run_ok(cmd().args(["nar", "--data-dir"]).arg(data).arg(p)).stdout;
        let nix = run_ok(Command::new("nix-store").args(["--dump", p])).stdout;
        assert!(ours == nix, "{p}: NAR differs from nix-store --dump");
    }
}

#[test]
fn compact_shrinks_the_store_and_nix_substitutes_from_it() {
    let corpus = Corpus::small();
    let env = Env::new();
    let (out, closure) = small_closure(corpus);
    let (sk, pk) = env.key("compact");
    let cache = env.signed_file_cache("cache", &out, &sk);
    let data = env.imported("data", &cache, &pk);
    let before = stats(&data);

    let report = run_ok(cmd().args(["compact", "--json", "--data-dir"]).arg(&data));
    let r: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    eprintln!("{r}");
    assert!(r["packs_in"].as_u64().unwrap() >= 1, "{r}");
    assert!(
        r["bytes_out"].as_u64().unwrap() < r["bytes_in"].as_u64().unwrap(),
        "{r}"
    );
    let after = stats(&data);
    assert!(
        after["pack_bytes"].as_u64().unwrap() < before["pack_bytes"].as_u64().unwrap(),
        "packs shrink: {before} -> {after}"
    );
    assert_eq!(after["nars"], before["nars"]);
    run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));
    assert_same_nars(&data, &closure);
    // Nothing is left to compact at that level.
    let again = run_ok(cmd().args(["compact", "--json", "--data-dir"]).arg(&data));
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["packs_in"], 0, "{again}");

    let d = Daemon::start(&data, &["--trusted-public-key", &pk]);
    env.copy_closure_ok("compacted", &d, Some(&pk), &out, &closure, &[]);
    d.stop();
}

#[test]
fn a_seed_compacts_its_cold_packs_while_serving() {
    let corpus = Corpus::small();
    let env = Env::new();
    let (out, closure) = small_closure(corpus);
    let (sk, pk) = env.key("seed-compact");
    let cache = env.signed_file_cache("cache", &out, &sk);
    let data = env.imported("data", &cache, &pk);
    let pack_bytes = stats(&data)["pack_bytes"].as_u64().unwrap();

    // A seed compacts by default; every pack is cold at once here.
    let d = Daemon::start(
        &data,
        &[
            "--trusted-public-key",
            &pk,
            "--role",
            "seed",
            "--compact-min-age-secs",
            "0",
        ],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while d.metric("store_pack_bytes") >= pack_bytes {
        assert!(
            std::time::Instant::now() < deadline,
            "no compaction: {}",
            d.stderr()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    env.copy_closure_ok("seed", &d, Some(&pk), &out, &closure, &[]);
    d.stop();
    run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));
    assert_same_nars(&data, &closure);
}

/// kill -9 in the middle of a compaction loses nothing: the store verifies and every NAR still
/// equals `nix-store --dump`; the next run finishes the job.
#[test]
fn kill_9_during_compaction_loses_nothing() {
    let corpus = Corpus::small();
    let env = Env::new();
    let closure = closure_of(&corpus.out_path(1));
    let (sk, pk) = env.key("compact-kill");
    let cache = env.signed_file_cache("cache", &corpus.out_path(1), &sk);
    let data = env.imported("data", &cache, &pk);
    for delay_ms in [300u64, 1500] {
        let mut child = cmd()
            .args(["compact", "--data-dir"])
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));
        assert_same_nars(&data, &closure);
    }
    run_ok(cmd().args(["compact", "--data-dir"]).arg(&data));
    run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));
    assert_same_nars(&data, &closure);
}

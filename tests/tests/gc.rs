//! Issue 4 end to end: `pin`, `unpin` and `gc [--max-size]` on a store imported from a closure
//! the real Nix built. Imports are pinned; unpinned paths are evicted by `gc --max-size`, the
//! packs shrink on disk, what is kept reassembles byte-identical to `nix-store --dump` and
//! `verify` passes; evicted paths can be imported again; a running daemon keeps `gc` out.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;

use nix_p2p_cache_tests::harness::Daemon;
use nix_p2p_cache_tests::{cmd, run_ok, stats, Corpus};

fn pack_files_bytes(data: &Path) -> u64 {
    fs::read_dir(data.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_same_nar(data: &Path, p: &str) {
    let ours = run_ok(cmd().args(["nar", "--data-dir"]).arg(data).arg(p)).stdout;
    let nix = run_ok(Command::new("nix-store").args(["--dump", p])).stdout;
    assert!(ours == nix, "{p}: NAR differs from nix-store --dump");
}

#[test]
fn unpinned_paths_are_evicted_pinned_ones_kept_and_packs_shrink() {
    let corpus = Corpus::small();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    corpus.import_into(&data);
    let gen2: BTreeSet<String> = corpus.paths(2).into_iter().collect();
    let all: BTreeSet<String> = corpus.paths(1).into_iter().chain(gen2.clone()).collect();
    let gen1_only: Vec<&String> = all.difference(&gen2).collect();
    assert!(!gen1_only.is_empty());

    // Imports are pinned: even a 1-byte quota evicts nothing.
    let s0 = stats(&data);
    assert_eq!(s0["pinned_paths"], s0["narinfos"]);
    assert_eq!(s0["narinfos"], all.len() as u64);
    run_ok(
        cmd()
            .args(["gc", "--max-size", "1", "--data-dir"])
            .arg(&data),
    );
    assert_eq!(stats(&data)["narinfos"], all.len() as u64);

    // Everything unpinned, then generation 2 pinned again: generation 1 is a cache.
    run_ok(cmd().args(["unpin", "--data-dir"]).arg(&data).args(&all));
    assert_eq!(stats(&data)["pinned_paths"], 0);
    let out = run_ok(cmd().args(["pin", "--data-dir"]).arg(&data).args(&gen2));
    assert_eq!(text(&out.stdout).matches("pinned: ").count(), gen2.len());
    let s1 = stats(&data);
    assert_eq!(s1["pinned_paths"], gen2.len() as u64);

    let packs_before = pack_files_bytes(&data);
    assert_eq!(packs_before, s1["pack_bytes"].as_u64().unwrap());
    let out = run_ok(
        cmd()
            .args(["gc", "--max-size", "1MiB", "--data-dir"])
            .arg(&data),
    );
    let report = text(&out.stdout);
    eprintln!("{report}");
    assert!(
        report.contains(&format!("evicted {} paths", gen1_only.len())),
        "{report}"
    );
    assert!(report.contains("still above"), "{report}");
    let s2 = stats(&data);
    let packs_after = pack_files_bytes(&data);
    eprintln!("packs on disk: {packs_before} -> {packs_after} bytes");
    assert_eq!(s2["narinfos"], gen2.len() as u64);
    assert_eq!(s2["dead_bytes"], 0);
    assert_eq!(packs_after, s2["pack_bytes"].as_u64().unwrap());
    assert!(
        packs_after < packs_before,
        "{packs_before} -> {packs_after}"
    );
    // The packs lost exactly the compressed records only generation 1 used.
    let freed_chunk_bytes = s1["chunk_compressed_bytes"].as_u64().unwrap()
        - s2["chunk_compressed_bytes"].as_u64().unwrap();
    let freed_chunks = s1["chunks"].as_u64().unwrap() - s2["chunks"].as_u64().unwrap();
    assert!(freed_chunks > 0);
    // Each pack deleted or created also frees or takes its 16-byte header, and each evicted
    // path its metadata record.
    let packs_delta = s1["packs"].as_i64().unwrap() - s2["packs"].as_i64().unwrap();
    let freed_metadata =
        s1["metadata_bytes"].as_i64().unwrap() - s2["metadata_bytes"].as_i64().unwrap();
    assert!(freed_metadata > 0);
    assert_eq!(
        packs_before as i64 - packs_after as i64,
        (freed_chunk_bytes + 48 * freed_chunks) as i64 + 16 * packs_delta + freed_metadata,
        "packs shrink by exactly the dead records"
    );
    run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));
    for p in &gen2 {
        assert_same_nar(&data, p);
    }
    for p in &gen1_only {
        let out = cmd()
            .args(["nar", "--data-dir"])
            .arg(&data)
            .arg(p)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{p} was evicted");
    }

    // Evicted paths come back with a re-import (pinned again).
    corpus.import_into(&data);
    let s3 = stats(&data);
    assert_eq!(s3["narinfos"], all.len() as u64);
    assert_eq!(s3["chunks"], s0["chunks"]);
    assert_eq!(s3["nar_bytes"], s0["nar_bytes"]);
    run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));
    for p in &gen1_only {
        assert_same_nar(&data, p);
    }
}

#[test]
fn pin_of_an_unknown_path_fails_and_gc_refuses_while_the_daemon_runs() {
    let corpus = Corpus::small();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let top = corpus.out_path(1);
    run_ok(cmd().args(["import", "--data-dir"]).arg(&data).args([
        "--from",
        &corpus.xz_url(),
        &top,
    ]));
    let out = cmd()
        .args(["pin", "--data-dir"])
        .arg(&data)
        .args([
            top.as_str(),
            "/nix/store/00000000000000000000000000000000-nope",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stdout).contains(&format!("already pinned: {top}")));
    assert!(
        text(&out.stderr).contains("-nope: not in the store"),
        "{}",
        text(&out.stderr)
    );

    let daemon = Daemon::start(&data, &[]);
    for args in [
        vec!["gc"],
        vec!["pin", top.as_str()],
        vec!["unpin", top.as_str()],
    ] {
        let out = cmd()
            .args(&args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} must refuse");
        let err = text(&out.stderr);
        assert!(err.contains("the daemon is running"), "{args:?}: {err}");
    }
    daemon.stop();
    run_ok(cmd().args(["gc", "--data-dir"]).arg(&data));
    assert_eq!(stats(&data)["narinfos"], 1);
}

/// Seed GC with soft-delete (issue 11): a policy keeping generation 2's closure hides the
/// paths only generation 1 has (not served, listed by `--dry-run` first), `undelete` brings
/// them back, and once their grace period is over the next run collects them, keeping
/// tombstones; what is kept stays byte-identical and the store verifies.
#[test]
fn a_gc_policy_hides_then_collects_and_undelete_brings_back() {
    let corpus = Corpus::small();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    corpus.import_into(&data);
    let gen2: BTreeSet<String> = corpus.paths(2).into_iter().collect();
    let all: BTreeSet<String> = corpus.paths(1).into_iter().chain(gen2.clone()).collect();
    let gen1_only: BTreeSet<String> = all.difference(&gen2).cloned().collect();
    let policy = tmp.path().join("policy.toml");
    fs::write(
        &policy,
        format!(
            "keep-pinned = false\nkeep-roots = [\"{}\"]\ngrace-days = 0\n",
            corpus.out_path(2)
        ),
    )
    .unwrap();
    let gc = |extra: &[&str]| {
        let out = run_ok(
            cmd()
                .args(["gc", "--policy"])
                .arg(&policy)
                .args(extra)
                .arg("--data-dir")
                .arg(&data),
        );
        text(&out.stdout)
    };

    // A dry run lists what would go and changes nothing.
    let dry: serde_json::Value = serde_json::from_str(&gc(&["--dry-run", "--json"])).unwrap();
    let listed: BTreeSet<String> = dry["hide"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["store_path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, gen1_only);
    assert!(dry["freed_bytes"].as_u64().unwrap() > 0, "{dry}");
    assert!(
        dry["monthly_savings_usd"]["aws_s3_standard"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert_eq!(stats(&data)["hidden_paths"], 0);

    // Hidden: not served; undelete brings them back.
    eprintln!("{}", gc(&[]));
    assert_eq!(stats(&data)["hidden_paths"], gen1_only.len() as u64);
    let one = gen1_only.iter().next().unwrap();
    let out = cmd()
        .args(["nar", "--data-dir"])
        .arg(&data)
        .arg(one)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("hidden"),
        "{}",
        text(&out.stderr)
    );
    {
        let d = Daemon::start(&data, &[]);
        let hash = &one["/nix/store/".len()..][..32];
        let r = nix_p2p_cache_tests::harness::http(
            d.port,
            &nix_p2p_cache_tests::harness::get(&format!("/{hash}.narinfo")),
        );
        assert_eq!(r.status, 404, "a hidden path is not served");
        let kept = gen2.iter().next().unwrap();
        let hash = &kept["/nix/store/".len()..][..32];
        let r = nix_p2p_cache_tests::harness::http(
            d.port,
            &nix_p2p_cache_tests::harness::get(&format!("/{hash}.narinfo")),
        );
        assert_eq!(r.status, 200);
        d.stop();
    }
    run_ok(cmd().args(["undelete", "--all", "--data-dir"]).arg(&data));
    assert_eq!(stats(&data)["hidden_paths"], 0);
    assert_same_nar(&data, one);

    // Hidden again; a policy that keeps them now brings them back instead of collecting.
    gc(&[]);
    assert_eq!(stats(&data)["hidden_paths"], gen1_only.len() as u64);
    let narrow = fs::read_to_string(&policy).unwrap();
    fs::write(
        &policy,
        format!(
            "keep-pinned = false\nkeep-roots = [\"{}\", \"{}\"]\ngrace-days = 0\n",
            corpus.out_path(1),
            corpus.out_path(2)
        ),
    )
    .unwrap();
    gc(&[]);
    let s = stats(&data);
    assert_eq!(
        (s["hidden_paths"].as_u64(), s["collected_paths"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(s["narinfos"], all.len() as u64);
    fs::write(&policy, narrow).unwrap();

    // Hidden again, then collected by the next run (grace 0): tombstones, bytes reclaimed.
    gc(&[]);
    let packs_before = pack_files_bytes(&data);
    eprintln!("{}", gc(&[]));
    let s = stats(&data);
    assert_eq!(s["hidden_paths"], 0);
    assert_eq!(s["collected_paths"], gen1_only.len() as u64);
    assert_eq!(s["narinfos"], gen2.len() as u64);
    assert!(
        pack_files_bytes(&data) < packs_before,
        "collected bytes reclaimed"
    );
    let out = cmd()
        .args(["nar", "--data-dir"])
        .arg(&data)
        .arg(one)
        .output()
        .unwrap();
    assert!(
        text(&out.stderr).contains("collected"),
        "{}",
        text(&out.stderr)
    );
    for p in &gen2 {
        assert_same_nar(&data, p);
    }
    run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));
}

/// kill -9 during a policy GC's collection and pack GC (issue 11): the store verifies, what is
/// kept stays byte-identical, and the next run finishes the job.
#[test]
fn kill_9_during_a_policy_gc_loses_nothing_kept() {
    let corpus = Corpus::small();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    corpus.import_into(&data);
    let gen2: BTreeSet<String> = corpus.paths(2).into_iter().collect();
    let policy = tmp.path().join("policy.toml");
    fs::write(
        &policy,
        format!(
            "keep-pinned = false\nkeep-roots = [\"{}\"]\ngrace-days = 0\n",
            corpus.out_path(2)
        ),
    )
    .unwrap();
    let gc = || {
        let mut c = cmd();
        c.args(["gc", "--policy"])
            .arg(&policy)
            .arg("--data-dir")
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };
    run_ok(&mut gc()); // hide
    for delay_ms in [20u64, 120, 400] {
        let mut child = gc().spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL (it may have finished)
        child.wait().unwrap();
        run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));
        for p in &gen2 {
            assert_same_nar(&data, p);
        }
    }
    run_ok(&mut gc());
    let s = stats(&data);
    assert_eq!(s["narinfos"], gen2.len() as u64);
    assert_eq!(s["hidden_paths"], 0);
    run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));
    for p in &gen2 {
        assert_same_nar(&data, p);
    }
}

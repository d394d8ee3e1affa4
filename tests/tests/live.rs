//! `pin`, `unpin`, `gc` and `undelete` against a running daemon (through its API, with the
//! upload token) and on the same store once stopped: the CLI finds the daemon from `--url` or
//! `--config`, the API refuses callers without the token (401/403, never 5xx) and bad bodies
//! (400), and what it changed shows in `status` and in what the daemon serves.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use nix_p2p_cache_tests::harness::{get, hash_part, http, Daemon, Env, TOKEN};
use nix_p2p_cache_tests::{cmd, run_ok, stats, Corpus};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `nix-p2p-cache <args> --url <daemon> --upload-token-file <token>`.
fn live(d: &Daemon, token: &Path, args: &[&str]) -> Command {
    let mut c = cmd();
    c.args(args)
        .args(["--url", &d.url(), "--upload-token-file"])
        .arg(token);
    c
}

fn status(d: &Daemon) -> serde_json::Value {
    let out = run_ok(cmd().args(["status", "--json", "--url", &d.url()]));
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

fn post(port: u16, path: &str, auth: Option<&str>, body: &str) -> (u16, String) {
    let auth = auth
        .map(|a| format!("Authorization: Basic {a}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = http(port, req.as_bytes());
    (r.status, text(&r.body))
}

/// `x:<TOKEN>` in base64 (computed by coreutils, not by the code under test).
fn basic(password: &str) -> String {
    let out = run_ok(
        Command::new("sh").args(["-c", &format!("printf '%s' 'x:{password}' | base64 -w0")]),
    );
    text(&out.stdout)
}

fn fails_with(o: &Output, needle: &str) {
    assert!(!o.status.success(), "must fail: {}", text(&o.stdout));
    let err = text(&o.stderr);
    assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
}

#[test]
fn pin_unpin_gc_undelete_through_a_running_daemon_then_on_the_stopped_store() {
    let corpus = Corpus::small();
    let env = Env::new();
    let token = env.path("token");
    let data = env.path("data");
    corpus.import_into(&data);
    let gen2: BTreeSet<String> = corpus.paths(2).into_iter().collect();
    let all: BTreeSet<String> = corpus.paths(1).into_iter().chain(gen2.clone()).collect();
    let gen1_only: Vec<String> = all.difference(&gen2).cloned().collect();
    assert!(!gen1_only.is_empty());
    let d = Daemon::start(&data, &["--upload-token-file", token.to_str().unwrap()]);
    assert_eq!(status(&d)["store"]["pinned_paths"], all.len() as u64);

    // Without a token the CLI says the daemon has the store; with a wrong one the daemon
    // refuses (401) and nothing changes.
    let o = cmd()
        .args(["unpin", "--data-dir"])
        .arg(&data)
        .arg(&gen1_only[0])
        .output()
        .unwrap();
    fails_with(&o, "the daemon is running");
    let wrong = env.path("wrong-token");
    fs::write(&wrong, "not-the-token\n").unwrap();
    let mut c = cmd();
    c.args(["unpin", "--url", &d.url(), "--upload-token-file"])
        .arg(&wrong)
        .arg(&gen1_only[0]);
    fails_with(&c.output().unwrap(), "401");
    assert_eq!(status(&d)["store"]["pinned_paths"], all.len() as u64);

    // Unpin generation 1's own paths while the daemon runs; the report is the offline one.
    let mut args = vec!["unpin"];
    args.extend(gen1_only.iter().map(String::as_str));
    let out = run_ok(&mut live(&d, &token, &args));
    assert_eq!(
        text(&out.stdout).matches("unpinned: ").count(),
        gen1_only.len(),
        "{}",
        text(&out.stdout)
    );
    let pinned = (all.len() - gen1_only.len()) as u64;
    assert_eq!(status(&d)["store"]["pinned_paths"], pinned);
    let out = run_ok(&mut live(&d, &token, &["pin", "--json", &gen1_only[0]]));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["paths"][0]["outcome"], "pinned");
    assert_eq!(status(&d)["store"]["pinned_paths"], pinned + 1);
    run_ok(&mut live(&d, &token, &["unpin", &gen1_only[0]]));
    // A path the store lacks: reported, exit non-zero, the others still done.
    let nope = "/nix/store/00000000000000000000000000000000-nope";
    let o = live(&d, &token, &["pin", nope, gen1_only[0].as_str()])
        .output()
        .unwrap();
    fails_with(&o, "-nope: not in the store");
    assert!(text(&o.stdout).contains(&format!("pinned: {}", gen1_only[0])));
    run_ok(&mut live(&d, &token, &["unpin", &gen1_only[0]]));

    // A policy dry run through the daemon (the config file names its address and token).
    let config = env.path("daemon.toml");
    fs::write(
        &config,
        format!(
            "data-dir = \"{}\"\nlisten = \"127.0.0.1:{}\"\nupload-token-file = \"{}\"\n",
            data.display(),
            d.port,
            token.display()
        ),
    )
    .unwrap();
    let roots = env.path("roots");
    fs::write(&roots, format!("{}\n", corpus.out_path(2))).unwrap();
    let policy = env.path("policy.toml");
    fs::write(
        &policy,
        "keep-pinned = false\nkeep-roots-files = [\"roots\"]\ngrace-days = 0\n",
    )
    .unwrap();
    let out = run_ok(
        cmd()
            .args(["gc", "--dry-run", "--json", "--config"])
            .arg(&config)
            .arg("--policy")
            .arg(&policy),
    );
    let dry: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: BTreeSet<String> = dry["hide"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["store_path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        listed,
        gen1_only.iter().cloned().collect(),
        "the roots file was read by the CLI"
    );
    assert!(dry["applied"].is_null());
    assert_eq!(status(&d)["store"]["hidden_paths"], 0);

    // The narinfo of a path about to go is served (and cached by the daemon) ...
    let victim = hash_part(&gen1_only[0]).to_string();
    assert_eq!(
        http(d.port, &get(&format!("/{victim}.narinfo"))).status,
        200
    );
    // ... `gc --max-size` through the daemon evicts the unpinned paths ...
    let out = run_ok(&mut live(&d, &token, &["gc", "--max-size", "1MiB"]));
    let report = text(&out.stdout);
    assert!(
        report.contains(&format!("evicted {} paths", gen1_only.len())),
        "{report}"
    );
    assert!(report.contains("still above"), "{report}");
    let st = status(&d);
    assert_eq!(st["store"]["narinfos"], gen2.len() as u64, "{st}");
    assert_eq!(st["store"]["dead_bytes"], 0, "{st}");
    // ... and the daemon no longer serves them.
    assert_eq!(
        http(d.port, &get(&format!("/{victim}.narinfo"))).status,
        404
    );
    let kept = hash_part(gen2.iter().next().unwrap()).to_string();
    assert_eq!(http(d.port, &get(&format!("/{kept}.narinfo"))).status, 200);

    // A policy keeping what is pinned hides the one path unpinned now; undelete brings it back.
    let one = gen2
        .iter()
        .find(|p| **p != corpus.out_path(2))
        .unwrap()
        .clone();
    run_ok(&mut live(&d, &token, &["unpin", &one]));
    fs::write(&policy, "keep-pinned = true\ngrace-days = 1\n").unwrap();
    let out = run_ok(
        cmd()
            .args(["gc", "--json", "--config"])
            .arg(&config)
            .arg("--policy")
            .arg(&policy),
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["applied"]["hidden"], 1, "{r}");
    assert_eq!(status(&d)["store"]["hidden_paths"], 1);
    let h = hash_part(&one).to_string();
    assert_eq!(http(d.port, &get(&format!("/{h}.narinfo"))).status, 404);
    let out = run_ok(cmd().args(["undelete", "--config"]).arg(&config).arg(&one));
    assert_eq!(text(&out.stdout).trim(), "undeleted 1 paths");
    assert_eq!(status(&d)["store"]["hidden_paths"], 0);
    assert_eq!(http(d.port, &get(&format!("/{h}.narinfo"))).status, 200);

    // The raw API: no token 401, bad token 401, bad bodies 400, reads still work.
    let good = basic(TOKEN);
    let bad = basic("nope");
    for (path, body) in [
        ("/api/pin", r#"{"paths":[]}"#),
        ("/api/unpin", r#"{"paths":[]}"#),
        ("/api/gc", r#"{"max_size":1}"#),
        ("/api/undelete", r#"{"all":true}"#),
    ] {
        assert_eq!(post(d.port, path, None, body).0, 401, "{path}");
        assert_eq!(post(d.port, path, Some(&bad), body).0, 401, "{path}");
        assert_eq!(post(d.port, path, None, "garbage").0, 401, "{path}");
        let (st, msg) = post(d.port, path, Some(&good), "garbage");
        assert_eq!(st, 400, "{path}: {msg}");
    }
    for (path, body, needle) in [
        (
            "/api/pin",
            r#"{"paths":["/nix/store/short"]}"#,
            "bad store path",
        ),
        ("/api/pin", r#"{"paths":[]}"#, "no store paths"),
        (
            "/api/gc",
            r#"{"max_size":1,"policy":"grace-days = 0"}"#,
            "not both",
        ),
        ("/api/gc", r#"{"dry_run":true}"#, "needs a policy"),
        ("/api/gc", r#"{"policy":"grace-days = -2"}"#, "grace-days"),
        (
            "/api/gc",
            r#"{"policy":"keep-roots-files = [\"/etc/passwd\"]"}"#,
            "keep-roots-files",
        ),
        ("/api/gc", r#"{"max_size":1,"extra":true}"#, "unknown field"),
        ("/api/undelete", r#"{}"#, "no store paths"),
    ] {
        let (st, msg) = post(d.port, path, Some(&good), body);
        assert_eq!(st, 400, "{path} {body}: {msg}");
        assert!(msg.contains(needle), "{path} {body}: {msg}");
    }
    assert_eq!(http(d.port, &get("/api/pin")).status, 405);
    assert_eq!(status(&d)["store"]["narinfos"], gen2.len() as u64);
    d.stop();

    // Stopped: the same commands open the store.
    run_ok(cmd().args(["pin", "--data-dir"]).arg(&data).arg(&one));
    assert_eq!(stats(&data)["pinned_paths"], gen2.len() as u64);
    let out = run_ok(cmd().args(["gc", "--json", "--data-dir"]).arg(&data));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["index_compacted"], true, "{r}");
    run_ok(cmd().args(["verify", "--data-dir"]).arg(&data));
}

#[test]
fn a_daemon_without_an_upload_token_refuses_changes_with_403() {
    let env = Env::new();
    let data = env.path("data");
    let d = Daemon::start(&data, &[]);
    let good = basic(TOKEN);
    for path in ["/api/pin", "/api/unpin", "/api/gc", "/api/undelete"] {
        let (st, msg) = post(d.port, path, Some(&good), r#"{"paths":[]}"#);
        assert_eq!(st, 403, "{path}: {msg}");
        assert!(msg.contains("--upload-token-file"), "{msg}");
    }
    let o = cmd()
        .args(["gc", "--url", &d.url(), "--upload-token-file"])
        .arg(env.path("token"))
        .output()
        .unwrap();
    fails_with(&o, "403");
    assert_eq!(status(&d)["store"]["narinfos"], 0);
    d.stop();
}

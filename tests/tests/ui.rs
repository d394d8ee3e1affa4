//! The operator's views (issue 15): the dashboard at `/ui/` in a real headless browser
//! (Debian's `chromium` driven by `playwright-core`, `tests/ui/dashboard.mjs`), its JSON API,
//! and the Grafana dashboard in `contrib/`, whose every metric must exist in a live daemon's
//! `/metrics`.
//!
//! `scripts/install-deps.sh` installs chromium and playwright-core. When they are missing the
//! browser test fails saying so; it is skipped (printing SKIPPED) only on a machine that cannot
//! install them (not root and no apt-get).

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix_p2p_cache::store::storage::testing::S3Server;
use nix_p2p_cache_tests::harness::{get, http, Daemon, Env};
use nix_p2p_cache_tests::nar_of_file;
use nix_p2p_cache_tests::root;
use nix_p2p_cache_tests::test_upstream::{fake_path, noise, File, TestUpstream};

const CHROMIUM: &str = "/usr/bin/chromium";

/// `tests/ui` with playwright-core installed, or `None` (SKIPPED) on a machine that could not
/// install it; panics, naming what is missing, on one that could.
fn browser_kit() -> Option<PathBuf> {
    let dir = root().join("tests/ui");
    let mut missing = Vec::new();
    if !Path::new(CHROMIUM).exists() {
        missing.push(CHROMIUM.to_string());
    }
    if !dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        missing.push(format!("{}/node_modules/playwright-core", dir.display()));
    }
    if Command::new("node").arg("--version").output().is_err() {
        missing.push("node".into());
    }
    if missing.is_empty() {
        return Some(dir);
    }
    let uid = Command::new("id").arg("-u").output().ok();
    let is_root = uid.is_some_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let apt = Command::new("apt-get").arg("--version").output().is_ok();
    if !is_root && !apt {
        eprintln!(
            "SKIPPED: the browser test needs {} and this machine cannot install them \
             (not root, no apt-get)",
            missing.join(", ")
        );
        return None;
    }
    panic!(
        "the browser test needs {}: run scripts/install-deps.sh",
        missing.join(", ")
    );
}

/// The dashboard in chromium: no console error, the numbers of `/api/status`, and a transfer
/// followed as it runs (a 24 MiB NAR trickling in from an upstream at 1 MiB/s while a client
/// downloads it through the daemon). Writes the screenshot to the target dir, and to
/// `docs/dashboard.png` with `UPDATE_DOCS_SCREENSHOT=1`.
#[test]
fn the_dashboard_shows_the_node_and_follows_a_transfer() {
    let Some(kit) = browser_kit() else {
        return;
    };
    let env = Env::new();
    // Three NARs fetched before the page loads (two share most of their bytes: dedup), and a
    // slow one fetched while it watches.
    let shared = noise(7, 3 << 20);
    let mut twin = shared.clone();
    twin.extend_from_slice(b"and a little more");
    // Store-path hashes 2…6 (nix-base32, 32 characters).
    let path = |i: u8, name: &str, nar: Vec<u8>| {
        fake_path(&format!("{i}123456789abcdfghijklmnpqrsvwxyz"), name, nar)
    };
    let fast = [
        path(2, "one", nar_of_file(&shared)),
        path(3, "twin", nar_of_file(&twin)),
        path(4, "small", nar_of_file(&noise(8, 300 << 10))),
    ];
    let slow = path(5, "slow", nar_of_file(&noise(9, 24 << 20)));
    // A path whose NAR the upstream lost: its failed fetch is a recent error on the page.
    let lost = path(6, "lost", nar_of_file(b"lost"));
    let [lost_narinfo, _] = lost.files(lost.nar.clone(), None);
    let files: HashMap<String, File> = fast
        .iter()
        .flat_map(|p| p.files(p.nar.clone(), None))
        .chain(slow.files(slow.nar.clone(), Some(1 << 20)))
        .chain([lost_narinfo])
        .collect();
    let up = TestUpstream::start(files);
    // A peer, so the page has one to list.
    let peer = Daemon::start(
        &env.path("peer"),
        &["--p2p-listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"],
    );
    let d = Daemon::start(
        &env.path("data"),
        &[
            "--upstream",
            &up.url(),
            "--p2p-listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
            "--bootstrap",
            peer.p2p.as_deref().unwrap(),
        ],
    );
    for p in fast.iter().chain([&slow, &lost]) {
        let r = http(d.port, &get(&format!("/{}.narinfo", p.hash)));
        assert_eq!(r.status, 200, "{r:?}\n{}", d.stderr());
    }
    for p in &fast {
        let r = http(d.port, &get(&p.nar_path()));
        assert!(
            r.status == 200 && r.complete && r.body == p.nar,
            "{}",
            d.stderr()
        );
    }
    assert_eq!(d.wait_metric("store_nars", 3), 3, "{}", d.stderr());
    // Served again, now from the store.
    let r = http(d.port, &get(&fast[0].nar_path()));
    assert!(r.status == 200 && r.body == fast[0].nar);
    let r = http(d.port, &get(&lost.nar_path()));
    assert!(r.status >= 400, "{r:?}");
    // The warning names the path and the NAR, not only the NarHash (the flight's span is on
    // at the default log level).
    let stderr = d.stderr();
    let warned = stderr
        .lines()
        .find(|l| l.contains("fetching the NAR failed"))
        .unwrap_or_else(|| panic!("no warning: {stderr}"));
    assert!(
        warned.contains(&format!("/nix/store/{}-lost", lost.hash)) && warned.contains("nar="),
        "{warned}"
    );

    let profile = env.path("chromium-profile");
    std::fs::create_dir_all(&profile).unwrap();
    let shot = nix_p2p_cache_tests::target_dir().join("ui-dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let mut node = Command::new("node")
        .arg("dashboard.mjs")
        .current_dir(&kit)
        .env("UI_URL", d.url())
        .env("UI_PROFILE", &profile)
        .env("UI_SCREENSHOT", &shot)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("running node");
    let mut out = BufReader::new(node.stdout.take().unwrap());
    let mut said = Vec::new();
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 && !line.starts_with("READY") {
        said.push(std::mem::take(&mut line));
        line.clear();
    }
    assert!(
        line.starts_with("READY"),
        "the browser check failed before the page showed the daemon's numbers:\n{}\ndaemon:\n{}",
        said.concat(),
        d.stderr()
    );
    // A client downloads the slow NAR through the daemon while the page watches.
    let (port, path) = (d.port, slow.nar_path());
    let client = std::thread::spawn(move || http(port, &get(&path)));
    let mut stdin = node.stdin.take().unwrap();
    writeln!(stdin, "GO").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = node.wait().unwrap();
    let got = client.join().unwrap();
    assert!(
        status.success() && rest.lines().any(|l| l == "PASS"),
        "the browser check failed ({status}):\n{rest}\ndaemon:\n{}",
        d.stderr()
    );
    assert!(got.status == 200 && got.complete && got.body == slow.nar);
    assert_eq!(d.wait_metric("upstream_nars_total", 4), 4);
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real PNG"
    );
    if std::env::var_os("UPDATE_DOCS_SCREENSHOT").is_some() {
        std::fs::write(root().join("docs/dashboard.png"), &png).unwrap();
    }
    d.stop();
    peer.stop();
}

/// The dashboard's files and redirects over plain HTTP, and its JSON (the fields the page and
/// `docs/operations.md` name).
#[test]
fn the_dashboard_is_served_from_the_binary_and_its_api_answers() {
    let env = Env::new();
    let d = Daemon::start(&env.path("data"), &[]);
    let home = http(d.port, &get("/"));
    assert_eq!(home.status, 303);
    assert_eq!(home.header("location"), Some("/ui/"));
    let page = http(d.port, &get("/ui/"));
    assert_eq!(page.status, 200);
    let html = String::from_utf8(page.body.clone()).unwrap();
    assert!(html.contains("data-testid=\"store-narinfos\""), "{html}");
    assert!(page
        .header("content-security-policy")
        .is_some_and(|c| c.contains("default-src 'none'")));
    for (file, kind) in [("app.js", "text/javascript"), ("style.css", "text/css")] {
        let r = http(d.port, &get(&format!("/ui/{file}")));
        assert_eq!(r.status, 200, "{file}");
        assert!(r.header("content-type").unwrap().starts_with(kind));
    }
    assert_eq!(http(d.port, &get("/ui/nope.js")).status, 404);
    let help = String::from_utf8(http(d.port, &get("/help")).body).unwrap();
    assert!(help.contains("substituters = http://") && help.contains("/ui/"));
    let json = |p: &str| -> serde_json::Value {
        let r = http(d.port, &get(p));
        assert_eq!(r.status, 200, "{p}");
        serde_json::from_slice(&r.body).unwrap()
    };
    let t = json("/api/transfers");
    assert!(t["transfers"].as_array().unwrap().is_empty() && t["untracked"] == 0);
    let h = json("/api/history");
    assert_eq!(h["interval_secs"], 10);
    let first = &h["samples"][0];
    for k in [
        "time",
        "http_bytes_out",
        "http_bytes_in",
        "p2p_bytes_up",
        "p2p_bytes_down",
        "upstream_bytes_down",
        "hits_store",
        "hits_lan",
        "hits_peers",
        "hits_upstream",
        "misses",
    ] {
        assert!(first[k].is_u64(), "{k} in {h}");
    }
    assert!(json("/api/errors")["events"].is_array());
    // The page is read-only: nothing it can reach changes state without the token.
    let post = http(
        d.port,
        b"POST /api/gc HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    );
    assert!(post.status == 401 || post.status == 403, "{post:?}");
    d.stop();
}

/// Every metric `contrib/grafana-dashboard.json` queries is in a live daemon's `/metrics` (a
/// seed on S3 storage with P2P on, so every family is exported).
#[test]
fn the_grafana_dashboard_queries_only_metrics_the_daemon_exports() {
    let text = std::fs::read_to_string(root().join("contrib/grafana-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert!(dash["title"].is_string() && dash["schemaVersion"].is_u64());
    let panels = dash["panels"].as_array().expect("panels");
    let mut queried = BTreeSet::new();
    let mut graphs = 0;
    for p in panels {
        let Some(targets) = p["targets"].as_array() else {
            continue; // a row
        };
        graphs += 1;
        assert!(p["title"].is_string() && p["type"].is_string(), "{p}");
        for t in targets {
            let expr = t["expr"].as_str().expect("a PromQL expr");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr}");
            queried.extend(names);
        }
    }
    assert!(graphs >= 8, "one panel per metric family ({graphs})");

    let s3 = S3Server::start();
    s3.create_bucket("seed");
    let env = Env::new();
    let d = Daemon::start_with_env(
        &env.path("data"),
        &[
            "--role",
            "seed",
            "--storage",
            "s3://seed/v1",
            "--s3-endpoint",
            &s3.endpoint(),
            "--p2p-listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
        ],
        &s3.env(),
    );
    let _ = http(d.port, &get("/nix-cache-info"));
    let text = String::from_utf8(http(d.port, &get("/metrics")).body).unwrap();
    assert!(
        text.contains(
            "nix_p2p_cache_http_request_duration_seconds_count{route=\"nix-cache-info\"} 1\n"
        ),
        "the request's latency is recorded:\n{text}"
    );
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| {
            l.strip_prefix("# TYPE ")
                .and_then(|t| t.split(' ').next())
                .map(String::from)
        })
        .collect();
    // A histogram's series are its family's name plus `_bucket`, `_sum`, `_count`.
    let family = |q: &String| {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| q.strip_suffix(s).filter(|f| exported.contains(*f)))
            .map_or_else(|| q.clone(), String::from)
    };
    let missing: Vec<&String> = queried
        .iter()
        .filter(|q| !exported.contains(&family(q)))
        .collect();
    assert!(
        missing.is_empty(),
        "the Grafana dashboard queries metrics the daemon does not export: {missing:?}\n\
         exported: {exported:?}"
    );
    assert!(queried.len() >= 20, "{queried:?}");
    d.stop();
}

/// The `nix_p2p_cache_…` names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("nix_p2p_cache_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        out.push(name);
    }
    out
}

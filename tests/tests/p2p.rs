//! The P2P layer end to end (`daemon --p2p-listen … --bootstrap …`): a seed daemon S holds a
//! signed closure (uploaded); daemon A, with an empty store and no upstream, bootstraps from
//! S and serves the closure to the real `nix copy`: narinfos from connected peers, NARs as
//! chunks checked against their ids and ingested. Then S goes away and daemon B, bootstrapping
//! only from A, gets the closure from A.

use std::fs;
use std::path::Path;

use nix_p2p_cache_tests::Corpus;

use nix_p2p_cache_tests::harness::*;

fn p2p(bootstrap: Option<&str>) -> Vec<String> {
    let mut v = vec![
        "--p2p-listen".to_string(),
        "/ip4/127.0.0.1/tcp/0".to_string(),
    ];
    if let Some(b) = bootstrap {
        v.push("--bootstrap".into());
        v.push(b.into());
    }
    v.push("--no-mdns".into());
    v
}

fn start(data: &Path, pk: &str, extra: &[String]) -> Daemon {
    let mut args: Vec<&str> = vec!["--trusted-public-key", pk];
    args.extend(extra.iter().map(String::as_str));
    Daemon::start(data, &args)
}

#[test]
fn closure_through_peers() {
    let corpus = Corpus::small();
    let env = Env::new();
    let (out, closure) = small_closure(corpus);
    let n = closure.len() as u64;
    let (sk, pk) = env.key("p2p");
    let src = env.signed_store("src", &out, &sk);
    let token = env.path("token");
    let mut s_args = p2p(None);
    s_args.extend(["--upload-token-file".into(), token.display().to_string()]);
    let s = start(&env.path("data-s"), &pk, &s_args);
    let up = env.upload(&src, &s.url(), &out);
    assert!(up.status.success(), "upload to S: {}", text(&up));
    assert_eq!(s.metric("store_nars"), n);
    let s_addr = s.p2p.clone().unwrap();

    let a = start(&env.path("data-a"), &pk, &p2p(Some(&s_addr)));
    assert_eq!(a.metric("store_nars"), 0);
    let key = env.path("data-a/node.key");
    let mode = {
        use std::os::unix::fs::PermissionsExt as _;
        fs::metadata(&key).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode, 0o600, "node.key permissions");

    env.copy_closure_ok("1", &a, Some(&pk), &out, &closure, &[&s]);
    assert_eq!(
        a.wait_metric("store_nars", n),
        n,
        "A ingested the closure from S"
    );
    assert_eq!(a.wait_metric("store_narinfos", n), n);

    // Without S: B bootstraps only from A and gets the closure from A's chunks.
    s.stop();
    let a_addr = a.p2p.clone().unwrap();
    let b = start(&env.path("data-b"), &pk, &p2p(Some(&a_addr)));
    env.copy_closure_ok("2", &b, Some(&pk), &out, &closure, &[&a]);
    assert_eq!(
        b.wait_metric("store_nars", n),
        n,
        "B ingested the closure from A"
    );

    // A restarted keeps its peer id (node.key persisted).
    let a_id = a_addr.rsplit('/').next().unwrap().to_string();
    a.stop();
    let a2 = start(&env.path("data-a"), &pk, &p2p(None));
    assert!(
        a2.p2p.as_deref().unwrap().ends_with(&a_id),
        "same peer id after restart"
    );
    a2.stop();
    b.stop();
}

/// `nix-p2p-cache status|peers --url … --json`.
fn api(d: &Daemon, what: &str) -> serde_json::Value {
    let out = nix_p2p_cache_tests::run_ok(nix_p2p_cache_tests::cmd().args([
        what,
        "--url",
        &d.url(),
        "--json",
    ]));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `--share none` and `--share lan` serve nothing to a peer that came through the DHT /
/// bootstrap (not mDNS), and withdraw what `--share all` provided; `--share all` serves.
/// `status` and `peers` report the exchange.
#[test]
fn sharing_modes_status_and_peers() {
    let corpus = Corpus::small();
    let env = Env::new();
    let (out, closure) = small_closure(corpus);
    let n = closure.len() as u64;
    let (sk, pk) = env.key("share");
    let src = env.signed_store("src", &out, &sk);
    let token = env.path("token");
    let data_s = env.path("data-s");
    let mut s_args = p2p(None);
    s_args.extend(["--upload-token-file".into(), token.display().to_string()]);
    let s = start(&data_s, &pk, &s_args);
    let up = env.upload(&src, &s.url(), &out);
    assert!(up.status.success(), "upload to S: {}", text(&up));
    // Sharing with everyone, S provides what it was given.
    let provided = |d: &Daemon| api(d, "status")["p2p"]["dht_records"]["provided"].as_u64();
    let started = std::time::Instant::now();
    while provided(&s).unwrap_or(0) == 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "S never provided its paths: {:?}",
            provided(&s)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    s.stop();
    let root = hash_part(&out).to_string();

    for share in ["none", "lan"] {
        let mut args = p2p(None);
        args.extend(["--share".into(), share.into()]);
        let s = start(&data_s, &pk, &args);
        let a = start(
            &env.path(&format!("data-a-{share}")),
            &pk,
            &p2p(Some(s.p2p.as_deref().unwrap())),
        );
        let r = http(a.port, &get(&format!("/{root}.narinfo")));
        assert_eq!(
            r.status, 404,
            "--share {share}: A must not get the narinfo from S"
        );
        assert!(
            s.metric("p2p_requests_refused_total") > 0,
            "--share {share}: S counted the refused request"
        );
        assert_eq!(s.metric("p2p_requests_in_total"), 0, "--share {share}");
        let st = api(&s, "status");
        assert_eq!(st["share"], share);
        // Restarted without sharing with everyone, it no longer provides anything: its DHT
        // server stops naming it and nothing is reprovided (issue 15).
        assert_eq!(st["p2p"]["dht_records"]["provided"], 0, "--share {share}");
        a.stop();
        s.stop();
    }

    let mut args = p2p(None);
    args.extend(["--share".into(), "all".into()]);
    let s = start(&data_s, &pk, &args);
    let a = start(
        &env.path("data-a-all"),
        &pk,
        &p2p(Some(s.p2p.as_deref().unwrap())),
    );
    env.copy_closure_ok("all", &a, Some(&pk), &out, &closure, &[&s]);

    let st = api(&a, "status");
    assert_eq!(st["role"], "peer");
    assert_eq!(st["store"]["nars"], n);
    assert_eq!(st["p2p"]["nars_fetched"], n);
    assert_eq!(st["p2p"]["connected_peers"], 1);
    assert_eq!(st["p2p"]["bad_blocks"], 0);
    assert!(st["p2p"]["bytes_down"].as_u64().unwrap() > 0);
    assert!(st["peer_id"].as_str().unwrap().len() > 40);
    let s_id = s
        .p2p
        .as_deref()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let peers = api(&a, "peers");
    let sp = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == s_id.as_str())
        .expect("S in A's peers");
    assert_eq!(sp["connected"], true);
    assert_eq!(sp["lan"], false);
    assert!(sp["bytes_down"].as_u64().unwrap() > 0, "{sp}");
    let s_st = api(&s, "status");
    assert!(s_st["p2p"]["bytes_up"].as_u64().unwrap() >= sp["bytes_down"].as_u64().unwrap());
    // The human-readable forms work too.
    let human =
        nix_p2p_cache_tests::run_ok(nix_p2p_cache_tests::cmd().args(["status", "--url", &a.url()]));
    assert!(String::from_utf8_lossy(&human.stdout).contains("connected"));
    let human =
        nix_p2p_cache_tests::run_ok(nix_p2p_cache_tests::cmd().args(["peers", "--url", &a.url()]));
    assert!(String::from_utf8_lossy(&human.stdout).contains(&s_id));
    a.stop();
    s.stop();
}

/// A peer with `--max-cache-size` keeps its store under the quota (least-recently-used NARs
/// fetched from peers are evicted; packs are compacted) and still serves the whole closure,
/// fetching evicted NARs again. The uploading seed pins what it was given.
#[test]
fn max_cache_size_evicts_fetched_nars() {
    let corpus = Corpus::small();
    let env = Env::new();
    let (out, closure) = small_closure(corpus);
    let (sk, pk) = env.key("quota");
    let src = env.signed_store("src", &out, &sk);
    let token = env.path("token");
    let mut s_args = p2p(None);
    s_args.extend(["--upload-token-file".into(), token.display().to_string()]);
    s_args.extend(["--role".into(), "seed".into()]);
    let s = start(&env.path("data-s"), &pk, &s_args);
    let up = env.upload(&src, &s.url(), &out);
    assert!(up.status.success(), "upload to S: {}", text(&up));
    let full = s.metric("store_stored_bytes");
    let quota = full / 2;
    let mut a_args = vec!["--trusted-public-key".to_string(), pk.clone()];
    a_args.extend(p2p(Some(s.p2p.as_deref().unwrap())));
    a_args.extend(["--max-cache-size".into(), quota.to_string()]);
    let a_args: Vec<&str> = a_args.iter().map(String::as_str).collect();
    // NARs used in the last second are spared (the default is 2 minutes): eviction happens
    // during the download, so a narinfo served must keep its NAR until Nix fetched it.
    let a = Daemon::start_with_env(
        &env.path("data-a"),
        &a_args,
        &[("NIX_P2P_CACHE_EVICT_GRACE_SECS", "1")],
    );
    for round in ["1", "2"] {
        env.copy_closure_ok(round, &a, Some(&pk), &out, &closure, &[&s]);
        // Eviction runs in the background after each fetch; what was just used is spared for
        // the grace second, then the next run (poked by the next fetch) evicts it.
        let t = std::time::Instant::now();
        while a.metric("store_stored_bytes") > quota && t.elapsed().as_secs() < 30 {
            std::thread::sleep(std::time::Duration::from_millis(1500));
            let _ = http(a.port, &get("/nix-cache-info"));
        }
        let used = a.metric("store_stored_bytes");
        assert!(
            used <= quota,
            "round {round}: A uses {used} bytes, quota {quota}"
        );
        assert!(
            a.metric("store_nars") < closure.len() as u64,
            "round {round}: nothing evicted"
        );
    }
    assert!(
        a.wait_metric("p2p_nars_total", closure.len() as u64 + 1) > closure.len() as u64,
        "evicted NARs fetched again"
    );
    // The seed never evicts: it still has everything.
    assert_eq!(s.metric("store_nars"), closure.len() as u64);
    a.stop();
    s.stop();
}

/// A flood of TCP connections to the P2P port (reachable from the network) that never finish
/// a handshake does not use up the daemon's file descriptors: connections over the pending
/// limit are closed at once, and the daemon keeps answering (issue 14 finding).
#[test]
fn a_connection_flood_on_the_p2p_port_is_bounded() {
    let env = Env::new();
    let (_, pk) = env.key("flood");
    let d = start(&env.path("data"), &pk, &p2p(None));
    let port: u16 = d
        .p2p
        .as_ref()
        .unwrap()
        .split('/')
        .nth(4)
        .unwrap()
        .parse()
        .unwrap();
    let pid = d.child.as_ref().unwrap().id();
    let fds = || fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let before = fds();
    let conns: Vec<_> = (0..600)
        .map_while(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    assert!(conns.len() >= 400, "only {} connections", conns.len());
    // Let the daemon accept them all (it does within milliseconds).
    std::thread::sleep(std::time::Duration::from_secs(3));
    let during = fds();
    assert!(
        during < before + 300,
        "{before} -> {during} descriptors with {} half-open P2P connections",
        conns.len()
    );
    assert_eq!(http(d.port, &get("/nix-cache-info")).status, 200);
    drop(conns);
    d.stop();
}

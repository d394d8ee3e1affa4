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

    let fresh = env.path("fresh-1/store").display().to_string();
    let down = env.download("1", &a.url(), &fresh, Some(&pk), &out);
    assert!(
        down.status.success(),
        "nix copy from A: {}\nA stderr:\n{}\nS stderr:\n{}",
        text(&down),
        a.stderr(),
        s.stderr()
    );
    env.assert_closure_valid(&fresh, &closure);
    assert_eq!(a.metric("store_nars"), n, "A ingested the closure from S");
    assert_eq!(a.metric("store_narinfos"), n);

    // Without S: B bootstraps only from A and gets the closure from A's chunks.
    s.stop();
    let a_addr = a.p2p.clone().unwrap();
    let b = start(&env.path("data-b"), &pk, &p2p(Some(&a_addr)));
    let fresh2 = env.path("fresh-2/store").display().to_string();
    let down = env.download("2", &b.url(), &fresh2, Some(&pk), &out);
    assert!(
        down.status.success(),
        "nix copy from B: {}\nB stderr:\n{}\nA stderr:\n{}",
        text(&down),
        b.stderr(),
        a.stderr()
    );
    env.assert_closure_valid(&fresh2, &closure);
    assert_eq!(b.metric("store_nars"), n, "B ingested the closure from A");

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

//! Upstream caches end to end (`daemon --upstream URL`): daemon A, with an empty store, finds
//! a signed closure on daemon U (another daemon acting as an HTTP binary cache), serves it to
//! the real `nix copy`, ingests it on the way and keeps serving it once U is gone. Also: a real
//! xz `file://` layout served over plain HTTP (unsigned, decompressed on ingest), misses and a
//! dead upstream (404, daemon stays up), and an upstream that sends the wrong NAR (502, nothing
//! stored).

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix_p2p_cache_tests::test_upstream::{plain, TestUpstream};
use nix_p2p_cache_tests::{nar_of_file, Corpus};

use nix_p2p_cache_tests::harness::*;

// ---------------------------------------------------------------------------------------------
// 1. A signed closure through an upstream daemon, then without it.

#[test]
fn closure_through_upstream_then_served_locally() {
    let corpus = Corpus::small();
    let env = Env::new();
    let (out, closure) = small_closure(corpus);
    let (sk, pk) = env.key("up");
    let src = env.signed_store("src", &out, &sk);
    let token = env.path("token");
    let u = Daemon::start(
        &env.path("data-u"),
        &[
            "--trusted-public-key",
            &pk,
            "--upload-token-file",
            token.to_str().unwrap(),
        ],
    );
    let up = env.upload(&src, &u.url(), &out);
    assert!(up.status.success(), "upload to U: {}", text(&up));
    assert_eq!(u.metric("store_nars"), closure.len() as u64);

    let a = Daemon::start(
        &env.path("data-a"),
        &["--trusted-public-key", &pk, "--upstream", &u.url()],
    );
    assert_eq!(a.metric("store_nars"), 0);

    env.copy_closure_ok("1", &a, Some(&pk), &out, &closure, &[]);
    let n = closure.len() as u64;
    assert_eq!(a.wait_metric("store_nars", n), n, "A ingested the closure");
    assert_eq!(a.wait_metric("store_narinfos", n), n);
    assert_eq!(a.wait_metric("upstream_nars_total", n), n);

    // Without U: served from A's own store.
    u.stop();
    env.copy_closure_ok("2", &a, Some(&pk), &out, &closure, &[]);
    assert_eq!(a.metric("upstream_nars_total"), n, "nothing fetched again");
    a.stop();
}

// ---------------------------------------------------------------------------------------------
// 2. A plain xz binary cache (unsigned) over HTTP: decompressed on ingest, stored untrusted.

struct PyServer(Child);

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `python3 -m http.server` on `dir`; waits until it accepts connections.
fn serve_dir(dir: &Path) -> (PyServer, u16) {
    let port = free_port();
    let child = Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .arg("--directory")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 -m http.server");
    let server = PyServer(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "http.server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (server, port)
}

#[test]
fn unsigned_xz_upstream() {
    let corpus = Corpus::small();
    let env = Env::new();
    let (out, closure) = small_closure(corpus);
    let (_server, port) = serve_dir(&corpus.dir.join("cache-xz"));
    let upstream = format!("http://127.0.0.1:{port}");
    let a = Daemon::start(&env.path("data-a"), &["--upstream", &upstream]);
    let info = String::from_utf8(http(a.port, &get(&format!("/{}.narinfo", hash_part(&out)))).body)
        .unwrap();
    assert!(info.contains("\nCompression: none\n"), "{info}");
    assert!(info.contains("\nURL: nar/"), "{info}");
    // Signatures pass through as the upstream has them (none, or keys nobody trusts here).
    let upstream_info = std::fs::read_to_string(
        corpus
            .dir
            .join("cache-xz")
            .join(format!("{}.narinfo", hash_part(&out))),
    )
    .unwrap();
    let sigs = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.starts_with("Sig: "))
            .map(String::from)
            .collect()
    };
    assert_eq!(sigs(&info), sigs(&upstream_info), "{info}");

    env.copy_closure_ok("1", &a, None, &out, &closure, &[]);
    let n = closure.len() as u64;
    assert_eq!(a.wait_metric("store_nars", n), n);
    a.stop();
}

// ---------------------------------------------------------------------------------------------
// 3. Misses and a dead upstream.

#[test]
fn misses_are_fast_404s_and_dead_upstream_is_harmless() {
    let env = Env::new();
    let u = Daemon::start(&env.path("data-u"), &[]);
    let a = Daemon::start(&env.path("data-a"), &["--upstream", &u.url()]);
    let missing = "/0123456789abcdfghijklmnpqrsvwxyz.narinfo";
    for _ in 0..2 {
        let (r, t) = get_timed(a.port, missing);
        assert_eq!(r.status, 404, "{r:?}");
        assert!(t < Duration::from_secs(1), "miss took {t:?}");
    }
    // The second lookup was answered from the negative cache: U saw one request.
    let u_narinfo = u.metric("narinfo_misses_total");
    assert_eq!(u_narinfo, 1, "U was asked {u_narinfo} times");
    let r = http(
        a.port,
        &get("/nar/1ddv0iqq47j0awyw7a8dmm8bz71c6ifrliq53kmmsfzjxf3rwvb8.nar"),
    );
    assert_eq!(r.status, 404);
    a.assert_alive();

    // Nothing listens on the upstream's port: still 404, never 5xx, and A stays up.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let b = Daemon::start(&env.path("data-b"), &["--upstream", &dead]);
    for _ in 0..3 {
        let (r, t) = get_timed(b.port, missing);
        assert_eq!(r.status, 404, "{r:?}");
        assert!(t < Duration::from_secs(3), "dead upstream took {t:?}");
    }
    b.assert_alive();
    b.stop();
    a.stop();
    u.stop();
}

// ---------------------------------------------------------------------------------------------
// 4. An upstream that sends the wrong NAR.

#[test]
fn wrong_nar_from_upstream_is_a_502_and_nothing_is_stored() {
    let env = Env::new();
    let good = nar_of_file(b"the good contents");
    let evil = nar_of_file(b"the evil contents");
    assert_eq!(good.len(), evil.len());
    let nar_hash = nix_p2p_cache_tests::nar_hash_of(&good);
    let nar_b32 = nar_hash.strip_prefix("sha256:").unwrap();
    let hash = "0123456789abcdfghijklmnpqrsvwxyz";
    let narinfo = format!(
        "StorePath: /nix/store/{hash}-fake\nURL: nar/fake.nar\nCompression: none\n\
         NarHash: {nar_hash}\nNarSize: {}\nReferences: \n",
        good.len()
    );
    let up = TestUpstream::start(HashMap::from([
        (format!("/{hash}.narinfo"), plain(narinfo.into_bytes())),
        ("/nar/fake.nar".to_string(), plain(evil)),
    ]));
    let a = Daemon::start(&env.path("data-a"), &["--upstream", &up.url()]);
    let r = http(a.port, &get(&format!("/{hash}.narinfo")));
    assert_eq!(r.status, 200, "{r:?}\n{}", a.stderr());
    let body = String::from_utf8(r.body).unwrap();
    assert!(
        body.contains(&format!("URL: nar/{nar_b32}.nar\n")),
        "{body}"
    );
    // Streamed as it arrives: the mismatch shows at the end, so the body is cut there (or,
    // if it shows before the first byte went out, a 502). Never a complete 200.
    let r = http(a.port, &get(&format!("/nar/{nar_b32}.nar")));
    assert!(
        r.status == 502 || (r.status == 200 && !r.complete),
        "{r:?}\n{}",
        a.stderr()
    );
    assert_eq!(a.metric("store_nars"), 0);
    assert_eq!(a.metric("store_narinfos"), 0);
    // The lying upstream is not asked again for this NAR: no source left, the pending entry
    // goes, and the NAR is then simply unknown.
    let r = http(a.port, &get(&format!("/nar/{nar_b32}.nar")));
    assert_eq!(r.status, 502, "{r:?}");
    let r = http(a.port, &get(&format!("/nar/{nar_b32}.nar")));
    assert_eq!(r.status, 404, "{r:?}");
    a.assert_alive();
    a.stop();
}

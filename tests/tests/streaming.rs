//! The streaming data path end to end (issue 9): a NAR the daemon lacks reaches the client as
//! it arrives, one fetch per NAR however many clients ask, a source that lies mid-stream
//! aborts the body and leaves nothing, a slow source blocks no other work, and peers that
//! answer narinfos slowly do not turn paths into 404s.
//!
//! Upstreams here are [`TestUpstream`], a small HTTP/1.1 server on loopback that serves fixed
//! files, optionally trickled at a set rate, and counts requests per path.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix_p2p_cache_tests::harness::*;
use nix_p2p_cache_tests::test_upstream::{fake_path, noise, File, TestUpstream};
use nix_p2p_cache_tests::{nar_of_file, Corpus};

/// Reads a response's head, then its body as it comes: (status, time of the first body byte,
/// body, whether the body was complete).
fn get_streaming(port: u16, path: &str) -> (u16, Option<Duration>, Vec<u8>, bool) {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(&get(path)).unwrap();
    let mut r = BufReader::new(s);
    let mut status_line = String::new();
    r.read_line(&mut status_line).unwrap();
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut len = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        let l = h.to_ascii_lowercase();
        if let Some(v) = l.strip_prefix("content-length:") {
            len = v.trim().parse::<usize>().ok();
        }
    }
    let mut body = Vec::new();
    let mut first = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                first.get_or_insert_with(|| t0.elapsed());
                body.extend_from_slice(&buf[..n]);
            }
        }
    }
    let complete = len == Some(body.len());
    (status, first, body, complete)
}

// ---------------------------------------------------------------------------------------------

/// A NAR trickling in from an upstream reaches the client long before the download ends; while
/// it trickles, another NAR is fetched and an upload is committed (nothing waits on the slow
/// source); the trickled NAR is stored.
#[test]
fn a_trickling_upstream_streams_and_blocks_nothing() {
    let corpus = Corpus::small();
    let env = Env::new();
    let rate = 1 << 20; // 1 MiB/s
    let slow = fake_path(
        "0123456789abcdfghijklmnpqrsvwxyz",
        "slow",
        nar_of_file(&noise(1, 20 << 20)),
    );
    let fast = fake_path(
        "1123456789abcdfghijklmnpqrsvwxyz",
        "fast",
        nar_of_file(&noise(2, 2 << 20)),
    );
    let files: HashMap<String, File> = slow
        .files(slow.nar.clone(), Some(rate))
        .into_iter()
        .chain(fast.files(fast.nar.clone(), None))
        .collect();
    let up = TestUpstream::start(files);
    let token = env.path("token");
    let a = Daemon::start(
        &env.path("data-a"),
        &[
            "--upstream",
            &up.url(),
            "--upload-token-file",
            token.to_str().unwrap(),
        ],
    );
    for p in [&slow, &fast] {
        let r = http(a.port, &get(&format!("/{}.narinfo", p.hash)));
        assert_eq!(r.status, 200, "{r:?}\n{}", a.stderr());
    }
    let port = a.port;
    let slow_path = slow.nar_path();
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let t0 = Instant::now();
    let client = std::thread::spawn(move || {
        let r = get_streaming(port, &slow_path);
        d.store(true, Ordering::SeqCst);
        r
    });

    // Meanwhile: another NAR, and an upload of a real closure.
    let r = http(a.port, &get(&fast.nar_path()));
    assert_eq!(r.status, 200);
    assert!(
        r.complete && r.body == fast.nar,
        "the other NAR, whole and right"
    );
    let other_done = t0.elapsed();
    let (out, closure) = small_closure(corpus);
    let (sk, _) = env.key("up");
    let src = env.signed_store("src", &out, &sk);
    let upload = env.upload(&src, &a.url(), &out);
    assert!(upload.status.success(), "upload: {}", text(&upload));
    let upload_done = t0.elapsed();
    let still_trickling = !done.load(Ordering::SeqCst);

    let (status, first, body, complete) = client.join().unwrap();
    let total = t0.elapsed();
    assert_eq!(status, 200);
    assert!(
        complete && body == slow.nar,
        "the trickled NAR, whole and right"
    );
    let first = first.expect("a first byte");
    assert!(
        first * 4 < total,
        "first byte after {first:?} of a {total:?} download: not streamed"
    );
    assert!(
        still_trickling,
        "the other NAR ({other_done:?}) and the upload ({upload_done:?}) waited for the \
         trickle ({total:?})"
    );
    assert_eq!(up.hits(&slow.nar_file), 1);
    let want = 2 + closure.len() as u64;
    assert_eq!(
        a.wait_metric("store_nars", want),
        want,
        "both fetched NARs and the upload are stored"
    );
    // And from the store now.
    let r = http(a.port, &get(&slow.nar_path()));
    assert!(r.complete && r.body == slow.nar);
    a.stop();
}

/// Ten clients asking at once for the same missing NAR (and a HEAD among them) all get it,
/// byte for byte; the upstream is asked for it once.
#[test]
fn ten_clients_share_one_fetch() {
    let env = Env::new();
    let p = fake_path(
        "2123456789abcdfghijklmnpqrsvwxyz",
        "shared",
        nar_of_file(&noise(3, 8 << 20)),
    );
    let up = TestUpstream::start(p.files(p.nar.clone(), Some(8 << 20)).into_iter().collect());
    let a = Daemon::start(&env.path("data-a"), &["--upstream", &up.url()]);
    let r = http(a.port, &get(&format!("/{}.narinfo", p.hash)));
    assert_eq!(r.status, 200, "{r:?}");
    let head = http(
        a.port,
        format!(
            "HEAD {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            p.nar_path()
        )
        .as_bytes(),
    );
    assert_eq!(head.status, 200, "HEAD before any GET: {head:?}");
    assert_eq!(
        head.header("content-length"),
        Some(p.nar.len().to_string().as_str())
    );
    let clients: Vec<_> = (0..10)
        .map(|i| {
            let (port, path) = (a.port, p.nar_path());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50 * i));
                get_streaming(port, &path)
            })
        })
        .collect();
    for c in clients {
        let (status, _, body, complete) = c.join().unwrap();
        assert_eq!(status, 200);
        assert!(complete, "cut short");
        assert!(body == p.nar, "wrong bytes");
    }
    assert_eq!(up.hits(&p.nar_file), 1, "one download for ten clients");
    assert_eq!(a.wait_metric("store_nars", 1), 1);
    a.stop();
}

/// An upstream that sends wrong bytes late in a NAR: the client's body is cut (or the request
/// fails), nothing is stored; the next request gets the right NAR from the other upstream.
#[test]
fn a_source_lying_mid_stream_aborts_and_the_next_request_succeeds() {
    let env = Env::new();
    let p = fake_path(
        "3123456789abcdfghijklmnpqrsvwxyz",
        "lied",
        nar_of_file(&noise(4, 8 << 20)),
    );
    let mut evil = p.nar.clone();
    let at = evil.len() * 3 / 4;
    evil[at] ^= 0xff;
    let liar = TestUpstream::start(p.files(evil, Some(4 << 20)).into_iter().collect());
    let honest = TestUpstream::start(p.files(p.nar.clone(), None).into_iter().collect());
    let a = Daemon::start(
        &env.path("data-a"),
        &["--upstream", &liar.url(), "--upstream", &honest.url()],
    );
    let r = http(a.port, &get(&format!("/{}.narinfo", p.hash)));
    assert_eq!(r.status, 200, "{r:?}");
    let (status, first, body, complete) = get_streaming(a.port, &p.nar_path());
    assert!(
        status == 502 || (status == 200 && !complete),
        "a lying source must never give a complete 200: {status}, complete {complete}"
    );
    if status == 200 {
        // An upstream's bytes are only proven by NarHash: what went out before the end may
        // include the lie, but never the NAR's full length.
        assert!(first.is_some() && body.len() < p.nar.len());
    }
    assert_eq!(a.metric("store_nars"), 0, "nothing stored from the liar");
    assert_eq!(liar.hits(&p.nar_file), 1);
    let (status, _, body, complete) = get_streaming(a.port, &p.nar_path());
    assert_eq!(status, 200, "{}", a.stderr());
    assert!(
        complete && body == p.nar,
        "the right NAR from the honest upstream"
    );
    assert_eq!(honest.hits(&p.nar_file), 1);
    assert_eq!(a.wait_metric("store_nars", 1), 1);
    a.assert_alive();
    a.stop();
}

/// The real Nix copies a closure whose every NAR trickles in from the upstream.
#[test]
fn nix_copy_through_a_trickling_upstream() {
    let corpus = Corpus::small();
    let env = Env::new();
    let (out, closure) = small_closure(corpus);
    let mut files = HashMap::new();
    let dir = corpus.dir.join("cache-none");
    collect_files(&dir, &dir, &mut files, 2 << 20);
    let up = TestUpstream::start(files);
    let a = Daemon::start(&env.path("data-a"), &["--upstream", &up.url()]);
    env.copy_closure_ok("1", &a, None, &out, &closure, &[]);
    let n = closure.len() as u64;
    assert_eq!(a.wait_metric("store_nars", n), n);
    a.stop();
}

fn collect_files(root: &Path, dir: &Path, out: &mut HashMap<String, File>, rate: u64) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            collect_files(root, &p, out, rate);
            continue;
        }
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        let is_nar = rel.starts_with("nar/");
        out.insert(
            format!("/{rel}"),
            File {
                body: Arc::new(std::fs::read(&p).unwrap()),
                rate: is_nar.then_some(rate),
            },
        );
    }
}

/// `nix copy` through a daemon whose only peer answers everything 200 ms late: every narinfo
/// is waited for (never a 404 Nix would remember), every NAR arrives.
#[test]
fn slow_peer_narinfos_are_waited_for() {
    let corpus = Corpus::small();
    let env = Env::new();
    let (out, closure) = small_closure(corpus);
    let (sk, pk) = env.key("seed");
    let cache = env.signed_file_cache("cache", &out, &sk);
    let data_h = env.imported("data-h", &cache, &pk);
    let mut h = std::process::Command::new(env!("CARGO_BIN_EXE_nix-p2p-cache-hostile"));
    h.arg("--data-dir").arg(&data_h).args([
        "--mode",
        "slow",
        "--delay-ms",
        "200",
        "--p2p-listen",
        "/ip4/127.0.0.1/tcp/0",
    ]);
    let mut h = h
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(h.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().strip_prefix("listening ").unwrap().to_string();
    let a = Daemon::start(
        &env.path("data-a"),
        &[
            "--trusted-public-key",
            &pk,
            "--p2p-listen",
            "/ip4/127.0.0.1/tcp/0",
            "--bootstrap",
            &addr,
            "--no-mdns",
        ],
    );
    env.copy_closure_ok("1", &a, Some(&pk), &out, &closure, &[]);
    let n = closure.len() as u64;
    assert_eq!(a.wait_metric("store_nars", n), n);
    assert!(a.metric("narinfo_late_waits_total") >= 1);
    a.stop();
    let _ = h.kill();
    let _ = h.wait();
}

/// Nix keeps a positive narinfo for a month: a narinfo served from an upstream, then a daemon
/// restart, and the NAR Nix asks for next is still found (fetched from the upstream again).
#[test]
fn a_nar_whose_narinfo_was_served_is_found_after_a_restart() {
    let env = Env::new();
    let p = fake_path(
        "3123456789abcdfghijklmnpqrsvwxyz",
        "after-restart",
        nar_of_file(&noise(5, 1 << 20)),
    );
    let up = TestUpstream::start(p.files(p.nar.clone(), None).into_iter().collect());
    let data = env.path("data-a");
    let a = Daemon::start(&data, &["--upstream", &up.url()]);
    let r = http(a.port, &get(&format!("/{}.narinfo", p.hash)));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(a.wait_metric("narinfos_remembered_total", 1), 1);
    a.stop();
    let a = Daemon::start(&data, &["--upstream", &up.url()]);
    let r = http(a.port, &get(&p.nar_path()));
    assert_eq!(r.status, 200, "the NAR after a restart: {}", a.stderr());
    assert!(r.body == p.nar, "wrong bytes");
    // Never served: still a 404.
    let other = format!("/nar/{}.nar", "1".repeat(52));
    assert_eq!(http(a.port, &get(&other)).status, 404);
    a.stop();
}

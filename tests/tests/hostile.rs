//! Hostile peers end to end (issue 4, item 6): a peer that serves wrong bytes, lies about
//! HAVE, sends a bogus manifest or answers very late never makes daemon A serve a wrong byte,
//! and with an honest seed S around the fetch completes from S.
//!
//! The hostile peer H is `nix-p2p-cache-hostile` (`src/bin/hostile.rs`): our own store and
//! libp2p node behind a lying responder. S and H hold the same signed closure (imported from
//! one signed `file://` cache: the first corpus generation when S is there, else the small
//! closure); A starts empty, without upstream or mDNS, bootstrapped from H first, then S; the
//! real `nix copy --from` A fills a fresh store.
//!
//! The `p2p_bad_blocks_total`, `p2p_bad_manifests_total` and `p2p_peers_banned_total`
//! counters are read last (and fail the test when missing), so every other check has run.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix_p2p_cache_tests::harness::*;
use nix_p2p_cache_tests::{cmd, stats, Corpus};

/// The hostile peer as a child process.
struct Hostile {
    child: Child,
    stderr: PathBuf,
    addr: String,
}

impl Hostile {
    fn start(data: &Path, mode: &str, bootstrap: Option<&str>) -> Hostile {
        let stderr = data.with_extension(format!("hostile-stderr-{}", unique()));
        let mut c = Command::new(env!("CARGO_BIN_EXE_nix-p2p-cache-hostile"));
        c.arg("--data-dir").arg(data).args([
            "--mode",
            mode,
            "--p2p-listen",
            "/ip4/127.0.0.1/tcp/0",
        ]);
        if let Some(b) = bootstrap {
            c.args(["--bootstrap", b]);
        }
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawning the hostile peer");
        let mut line = String::new();
        let read = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        let addr = line.trim().strip_prefix("listening ").map(String::from);
        let Some(addr) = addr.filter(|a| read.is_ok() && a.contains("/p2p/")) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "hostile peer did not report its address ({line:?}); stderr:\n{}",
                fs::read_to_string(&stderr).unwrap_or_default()
            );
        };
        Hostile {
            child,
            stderr,
            addr,
        }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Lies told so far (one `lie ` line each).
    fn lies(&self) -> usize {
        self.stderr()
            .lines()
            .filter(|l| l.starts_with("lie "))
            .count()
    }

    /// Still running (it must not have crashed on anything A sent).
    fn assert_running(&mut self) {
        assert!(
            matches!(self.child.try_wait(), Ok(None)),
            "hostile peer exited; stderr:\n{}",
            self.stderr()
        );
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything a test needs: the closure, its key and one signed `file://` cache of it.
struct Setup {
    env: Env,
    out: String,
    closure: Vec<String>,
    pk: String,
    cache: String,
}

/// `many`: the whole first generation (25 paths), so that H, answering narinfos from memory,
/// surely wins some of A's narinfo races against S (with the 2-path small closure, S
/// sometimes wins both and H is never asked for a block); else the small closure.
fn setup(many: bool) -> Setup {
    let corpus = Corpus::small();
    let env = Env::new();
    let (out, closure) = if many {
        (corpus.out_path(1), corpus.paths(1))
    } else {
        small_closure(corpus)
    };
    let (sk, pk) = env.key("hostile");
    let cache = env.signed_file_cache("cache", &out, &sk);
    Setup {
        env,
        out,
        closure,
        pk,
        cache,
    }
}

fn daemon(data: &Path, pk: &str, bootstrap: &[&str]) -> Daemon {
    let mut args = vec![
        "--trusted-public-key",
        pk,
        "--p2p-listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-mdns",
    ];
    if !bootstrap.is_empty() {
        args.push("--bootstrap");
        args.extend(bootstrap);
    }
    Daemon::start(data, &args)
}

/// The counters A should have raised, read while A runs (`None`: not exported).
struct Counters {
    bad_blocks: Option<u64>,
    bad_manifests: Option<u64>,
    banned: Option<u64>,
}

impl Counters {
    fn read(a: &Daemon) -> Counters {
        Counters {
            bad_blocks: a.try_metric("p2p_bad_blocks_total"),
            bad_manifests: a.try_metric("p2p_bad_manifests_total"),
            banned: a.try_metric("p2p_peers_banned_total"),
        }
    }

    /// wrong-bytes: bad blocks counted; bogus-manifest: bad manifests; both: H banned.
    fn assert_for(&self, mode: &str) {
        let want = |v: Option<u64>, name: &str, min: u64| {
            let v = v.unwrap_or_else(|| panic!("A's /metrics has no {name}"));
            assert!(v >= min, "{mode}: {name} = {v}, want >= {min}");
        };
        match mode {
            "wrong-bytes" => {
                want(self.bad_blocks, "p2p_bad_blocks_total", 1);
                want(self.banned, "p2p_peers_banned_total", 1);
            }
            "bogus-manifest" => {
                want(self.bad_manifests, "p2p_bad_manifests_total", 1);
                want(self.banned, "p2p_peers_banned_total", 1);
            }
            _ => {}
        }
    }
}

/// The common end: A holds `nars` NARs and still answers, H still runs and was asked
/// something it lies about (else the test proves nothing); A's counters are read, then A is
/// stopped and its store must pass `verify` with `nars` NARs.
fn finish(a: Daemon, h: &mut Hostile, data: &Path, mode: &str, nars: u64) -> Counters {
    assert_eq!(
        a.wait_metric("store_nars", nars),
        nars,
        "{mode}: NARs in A's store"
    );
    a.assert_alive();
    h.assert_running();
    assert!(
        h.lies() > 0,
        "{mode}: H was never asked anything it lies about; H stderr:\n{}",
        h.stderr()
    );
    let counters = Counters::read(&a);
    a.stop();
    let v = cmd()
        .args(["verify", "--data-dir"])
        .arg(data)
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "{mode}: verify of A's store: {}",
        text(&v)
    );
    assert_eq!(
        stats(data)["nars"].as_u64(),
        Some(nars),
        "{mode}: A's store"
    );
    counters
}

/// The URL of `p`'s NAR in the narinfo A serves.
fn nar_url(a: &Daemon, p: &str, mode: &str) -> String {
    let r = http(a.port, &get(&format!("/{}.narinfo", hash_part(p))));
    assert_eq!(r.status, 200, "{mode}: narinfo of {p} through A");
    let info = String::from_utf8(r.body).unwrap();
    narinfo_field(&info, "URL")
        .expect("URL in narinfo")
        .to_string()
}

/// With an honest seed S: `nix copy` from A succeeds, every path verifies, and every NAR A
/// serves is byte for byte `nix-store --dump`.
fn with_honest_seed(mode: &str) {
    let Setup {
        env,
        out,
        closure,
        pk,
        cache,
    } = setup(true);
    let n = closure.len() as u64;
    let s = daemon(&env.imported("data-s", &cache, &pk), &pk, &[]);
    let s_addr = s.p2p.clone().unwrap();
    let mut h = Hostile::start(&env.imported("data-h", &cache, &pk), mode, Some(&s_addr));
    let data_a = env.path("data-a");
    let a = daemon(&data_a, &pk, &[&h.addr, &s_addr]);

    let fresh = env.path("fresh/store").display().to_string();
    let t = Instant::now();
    let down = env.download("1", &a.url(), &fresh, Some(&pk), &out);
    let took = t.elapsed();
    assert!(
        down.status.success(),
        "{mode}: nix copy from A (H then S): {}\nA stderr:\n{}\nH stderr:\n{}",
        text(&down),
        a.stderr(),
        h.stderr()
    );
    env.assert_closure_valid(&fresh, &closure);
    assert!(
        took < Duration::from_secs(120),
        "{mode}: nix copy took {took:?}"
    );
    for p in &closure {
        let url = nar_url(&a, p, mode);
        let r = http(a.port, &get(&format!("/{url}")));
        assert_eq!(r.status, 200, "{mode}: NAR of {p}");
        assert!(r.complete, "{mode}: NAR of {p} cut short");
        assert!(r.body == dump(p), "{mode}: A serves a wrong NAR for {p}");
    }
    let counters = finish(a, &mut h, &data_a, mode, n);
    s.stop();
    counters.assert_for(mode);
}

/// H the only peer: Nix fails cleanly, A never answers 200 for a NAR it cannot prove, no path
/// becomes valid and A's store holds nothing from H.
fn hostile_alone(mode: &str) {
    let Setup {
        env,
        out,
        closure,
        pk,
        cache,
    } = setup(false);
    let mut h = Hostile::start(&env.imported("data-h", &cache, &pk), mode, None);
    let data_a = env.path("data-a");
    let a = daemon(&data_a, &pk, &[&h.addr]);

    // Straight to A first: the narinfo comes from H, the NAR must not. Once H has sent a bad
    // block or a lying manifest it is banned (disconnected): later narinfos are then 404s.
    let mut nar_asked = 0;
    for p in &closure {
        let r = http(a.port, &get(&format!("/{}.narinfo", hash_part(p))));
        if r.status == 404 && nar_asked > 0 && mode != "lying-have" {
            continue;
        }
        let url = nar_url(&a, p, mode);
        nar_asked += 1;
        let r = http(a.port, &get(&format!("/{url}")));
        // A NAR streams as its chunks check; a lying manifest shows only at the end, so its
        // body is cut there: an error status, or a 200 never complete.
        assert!(
            r.status >= 400 || (r.status == 200 && !r.complete),
            "{mode}: A answered {} for the NAR of {p} only H had (complete: {}, right bytes: {})",
            r.status,
            r.complete,
            r.body == dump(p)
        );
    }
    // Then the real Nix.
    let fresh = env.path("fresh/store").display().to_string();
    let down = env.download("1", &a.url(), &fresh, Some(&pk), &out);
    assert!(
        !down.status.success(),
        "{mode}: nix copy succeeded with only a hostile peer: {}",
        text(&down)
    );
    for p in &closure {
        let valid = env
            .nix("nix-store")
            .args(["--store", &fresh, "--check-validity", p])
            .output()
            .unwrap();
        assert!(
            !valid.status.success(),
            "{mode}: {p} became valid with only a hostile peer"
        );
    }
    let counters = finish(a, &mut h, &data_a, mode, 0);
    counters.assert_for(mode);
}

#[test]
fn wrong_bytes_with_honest_seed() {
    with_honest_seed("wrong-bytes");
}

#[test]
fn lying_have_with_honest_seed() {
    with_honest_seed("lying-have");
}

#[test]
fn bogus_manifest_with_honest_seed() {
    with_honest_seed("bogus-manifest");
}

#[test]
fn slow_with_honest_seed() {
    with_honest_seed("slow");
}

#[test]
fn wrong_bytes_alone() {
    hostile_alone("wrong-bytes");
}

#[test]
fn lying_have_alone() {
    hostile_alone("lying-have");
}

#[test]
fn bogus_manifest_alone() {
    hostile_alone("bogus-manifest");
}

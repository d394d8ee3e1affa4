//! Upstream caches end to end (`daemon --upstream URL`): daemon A, with an empty store, finds
//! a signed closure on daemon U (another daemon acting as an HTTP binary cache), serves it to
//! the real `nix copy`, ingests it on the way and keeps serving it once U is gone. Also: a real
//! xz `file://` layout served over plain HTTP (unsigned, decompressed on ingest), misses and a
//! dead upstream (404, daemon stays up), and an upstream that sends the wrong NAR (502, nothing
//! stored).

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix_p2p_cache_tests::{cmd, nix, run_ok, Corpus};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------------
// Copied from substituter.rs: the daemon as a child process, raw HTTP.

// The daemon as a child process.

struct Daemon {
    child: Option<Child>,
    port: u16,
    stderr: PathBuf,
}

impl Daemon {
    /// Starts `nix-p2p-cache daemon` on a free loopback port and waits for its
    /// `listening http://…` line.
    fn start(data: &Path, extra: &[&str]) -> Daemon {
        fs::create_dir_all(data).unwrap();
        let stderr = data.with_extension(format!("stderr-{}", unique()));
        let mut child = cmd()
            .args(["daemon", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawning the daemon");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening http://127.0.0.1:")
            .and_then(|p| p.parse().ok());
        let Some(port) = port else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "daemon did not report its address (stdout {line:?}); stderr:\n{}",
                fs::read_to_string(&stderr).unwrap_or_default()
            );
        };
        Daemon {
            child: Some(child),
            port,
            stderr,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGTERM, then the exit status (killed after 10 s).
    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Stops the daemon and asserts that SIGTERM made it exit 0.
    fn stop(mut self) {
        let st = self.terminate();
        assert!(
            st.is_some_and(|s| s.success()),
            "daemon did not exit 0 on SIGTERM ({st:?}); stderr:\n{}",
            self.stderr()
        );
    }

    /// A Prometheus counter or gauge (`nix_p2p_cache_<name>`).
    fn metric(&self, name: &str) -> u64 {
        let r = http(self.port, &get("/metrics"));
        assert_eq!(r.status, 200, "GET /metrics");
        let text = String::from_utf8(r.body).unwrap();
        let key = format!("nix_p2p_cache_{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    fn assert_alive(&self) {
        let r = http(self.port, &get("/nix-cache-info"));
        assert_eq!(r.status, 200, "daemon no longer answers; {}", self.stderr());
        assert_eq!(
            r.body,
            b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n"
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
    }
}

fn unique() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{t}", std::process::id())
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1 over TcpStream (no client library: exactly the bytes we mean).

#[derive(Debug)]
struct Resp {
    /// 0 when the server closed without a status line.
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The body has exactly `Content-Length` bytes (false: connection cut short).
    complete: bool,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").into_bytes()
}

/// Sends `req` (with `Connection: close`), reads the answer until EOF. No half-close: hyper
/// (as axum::serve configures it) drops a connection whose read side ends, answer unsent.
fn http(port: u16, req: &[u8]) -> Resp {
    http_with(port, req, false)
}

fn http_with(port: u16, req: &[u8], half_close: bool) -> Resp {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the daemon");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // The server may answer (and close) before reading a large body: ignore write errors.
    let _ = s.write_all(req);
    if half_close {
        let _ = s.shutdown(Shutdown::Write);
    }
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading from the daemon: {e}"),
        }
    }
    parse_resp(&raw)
}

fn parse_resp(raw: &[u8]) -> Resp {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Resp {
            status: 0,
            headers: vec![],
            body: raw.to_vec(),
            complete: false,
        };
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let body = raw[end + 4..].to_vec();
    let mut r = Resp {
        status,
        headers,
        body,
        complete: true,
    };
    if let Some(len) = r.header("content-length") {
        let len: usize = len.parse().unwrap();
        r.complete = r.body.len() == len;
    }
    assert!(
        r.header("transfer-encoding").is_none(),
        "unexpected chunked response: {head}"
    );
    r
}

// ---------------------------------------------------------------------------------------------
// Nix helpers (a subset of substituter.rs's).

struct Env {
    tmp: tempfile::TempDir,
}

const TOKEN: &str = "s3cret-upload-token";

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("token"), format!("{TOKEN}\n")).unwrap();
        fs::write(
            tmp.path().join("netrc"),
            format!("machine 127.0.0.1 login x password {TOKEN}\n"),
        )
        .unwrap();
        Env { tmp }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// A fresh Nix cache dir (a machine that never asked anybody for these narinfos).
    fn xdg(&self, name: &str) -> PathBuf {
        let p = self.path(&format!("xdg-{name}"));
        fs::create_dir_all(&p).unwrap();
        p
    }

    fn nix(&self, program: &str) -> Command {
        nix(program, &self.xdg("main"))
    }

    fn key(&self, label: &str) -> (PathBuf, String) {
        let name = format!("e2e-{label}-{}", unique());
        let (sk, pk) = (
            self.path(&format!("{label}.sk")),
            self.path(&format!("{label}.pk")),
        );
        run_ok(
            self.nix("nix-store")
                .args(["--generate-binary-cache-key", &name])
                .args([&sk, &pk]),
        );
        (sk, fs::read_to_string(&pk).unwrap().trim().to_string())
    }

    fn signed_store(&self, name: &str, out: &str, sk: &Path) -> String {
        let store = self.path(name).display().to_string();
        run_ok(self.nix("nix").args(["copy", "--to", &store, out]));
        run_ok(
            self.nix("nix")
                .args(["store", "sign", "--store", &store, "--key-file"])
                .arg(sk)
                .args(["-r", out]),
        );
        store
    }

    fn upload(&self, from: &str, to: &str, out: &str) -> Output {
        self.nix("nix")
            .args(["copy", "--from", from, "--to", to, "--option", "netrc-file"])
            .arg(self.path("netrc"))
            .arg(out)
            .output()
            .unwrap()
    }

    /// `nix copy --from <url> --to <store>` with a fresh cache dir; `pk`: require signatures
    /// by it, `None`: no signatures required.
    fn download(&self, xdg: &str, url: &str, store: &str, pk: Option<&str>, out: &str) -> Output {
        let mut c = nix("nix", &self.xdg(xdg));
        c.args(["copy", "--from", url, "--to", store])
            .args(["--option", "substituters", ""]);
        if let Some(pk) = pk {
            c.args(["--option", "trusted-public-keys", pk]).args([
                "--option",
                "require-sigs",
                "true",
            ]);
        }
        c.arg(out).output().unwrap()
    }

    fn verify_path(&self, store: &str, p: &str) -> Output {
        self.nix("nix-store")
            .args(["--store", store, "--verify-path", p])
            .output()
            .unwrap()
    }

    fn assert_closure_valid(&self, store: &str, closure: &[String]) {
        for p in closure {
            let v = self.verify_path(store, p);
            assert!(v.status.success(), "{p} in {store}: {}", text(&v));
        }
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn closure_of(p: &str) -> Vec<String> {
    let out = run_ok(Command::new("nix-store").args(["-qR", p]));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

/// A small closure of the corpus (a path with a single reference).
fn small_closure(corpus: &Corpus) -> (String, Vec<String>) {
    let p = corpus
        .paths(1)
        .into_iter()
        .find(|p| p.ends_with("-bzip2-1.0.8"))
        .unwrap_or_else(|| corpus.out_path(1));
    let closure = closure_of(&p);
    (p, closure)
}

fn hash_part(p: &str) -> &str {
    &p.trim_start_matches("/nix/store/")[..32]
}

/// A loopback port nothing listens on (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn get_timed(port: u16, path: &str) -> (Resp, Duration) {
    let t = Instant::now();
    let r = http(port, &get(path));
    (r, t.elapsed())
}

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

    let fresh = env.path("fresh-1/store").display().to_string();
    let down = env.download("1", &a.url(), &fresh, Some(&pk), &out);
    assert!(
        down.status.success(),
        "nix copy from A: {}\nA stderr:\n{}",
        text(&down),
        a.stderr()
    );
    env.assert_closure_valid(&fresh, &closure);
    let n = closure.len() as u64;
    assert_eq!(a.metric("store_nars"), n, "A ingested the closure");
    assert_eq!(a.metric("store_narinfos"), n);
    assert_eq!(a.metric("upstream_nars_total"), n);

    // Without U: served from A's own store.
    u.stop();
    let fresh2 = env.path("fresh-2/store").display().to_string();
    let down = env.download("2", &a.url(), &fresh2, Some(&pk), &out);
    assert!(
        down.status.success(),
        "nix copy from A without U: {}\nA stderr:\n{}",
        text(&down),
        a.stderr()
    );
    env.assert_closure_valid(&fresh2, &closure);
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
    assert!(!info.contains("Sig:"), "{info}");

    let fresh = env.path("fresh/store").display().to_string();
    let down = env.download("1", &a.url(), &fresh, None, &out);
    assert!(
        down.status.success(),
        "nix copy from A: {}\nA stderr:\n{}",
        text(&down),
        a.stderr()
    );
    env.assert_closure_valid(&fresh, &closure);
    assert_eq!(a.metric("store_nars"), closure.len() as u64);
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

/// A NAR holding one regular file.
fn nar_of_file(contents: &[u8]) -> Vec<u8> {
    fn s(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    let mut out = Vec::new();
    for t in [
        &b"nix-archive-1"[..],
        b"(",
        b"type",
        b"regular",
        b"contents",
        contents,
        b")",
    ] {
        s(&mut out, t);
    }
    out
}

/// Nix's base32 (as in `sha256:…` hashes).
fn nix_base32(hash: &[u8]) -> String {
    const CHARS: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let len = (hash.len() * 8 - 1) / 5 + 1;
    (0..len)
        .rev()
        .map(|n| {
            let b = n * 5;
            let (i, j) = (b / 8, b % 8);
            let lo = (hash[i] as u16) >> j;
            let hi = if i + 1 < hash.len() {
                (hash[i + 1] as u16) << (8 - j)
            } else {
                0
            };
            CHARS[((lo | hi) & 0x1f) as usize] as char
        })
        .collect()
}

/// A minimal HTTP/1.1 server answering GETs from a fixed map (404 otherwise).
fn fake_upstream(files: HashMap<String, Vec<u8>>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let files = Arc::new(files);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let files = files.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    return;
                }
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let path = line.split(' ').nth(1).unwrap_or("");
                let resp = match files.get(path) {
                    Some(body) => {
                        let mut v = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        v.extend_from_slice(body);
                        v
                    }
                    None => {
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_vec()
                    }
                };
                let _ = s.write_all(&resp);
                let _ = s.flush();
            });
        }
    });
    port
}

#[test]
fn wrong_nar_from_upstream_is_a_502_and_nothing_is_stored() {
    let env = Env::new();
    let good = nar_of_file(b"the good contents");
    let evil = nar_of_file(b"the evil contents");
    assert_eq!(good.len(), evil.len());
    let nar_hash = nix_base32(&Sha256::digest(&good));
    let hash = "0123456789abcdfghijklmnpqrsvwxyz";
    let narinfo = format!(
        "StorePath: /nix/store/{hash}-fake\nURL: nar/fake.nar\nCompression: none\n\
         NarHash: sha256:{nar_hash}\nNarSize: {}\nReferences: \n",
        good.len()
    );
    let port = fake_upstream(HashMap::from([
        (format!("/{hash}.narinfo"), narinfo.into_bytes()),
        ("/nar/fake.nar".to_string(), evil),
    ]));
    let a = Daemon::start(
        &env.path("data-a"),
        &["--upstream", &format!("http://127.0.0.1:{port}")],
    );
    let r = http(a.port, &get(&format!("/{hash}.narinfo")));
    assert_eq!(r.status, 200, "{r:?}\n{}", a.stderr());
    let body = String::from_utf8(r.body).unwrap();
    assert!(
        body.contains(&format!("URL: nar/{nar_hash}.nar\n")),
        "{body}"
    );
    let r = http(a.port, &get(&format!("/nar/{nar_hash}.nar")));
    assert_eq!(r.status, 502, "{r:?}\n{}", a.stderr());
    assert_eq!(a.metric("store_nars"), 0);
    assert_eq!(a.metric("store_narinfos"), 0);
    // The pending entry is gone: the NAR is now simply unknown.
    let r = http(a.port, &get(&format!("/nar/{nar_hash}.nar")));
    assert_eq!(r.status, 404, "{r:?}");
    a.assert_alive();
    a.stop();
}

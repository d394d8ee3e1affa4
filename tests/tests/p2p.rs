//! The P2P layer end to end (`daemon --p2p-listen … --bootstrap …`): a seed daemon S holds a
//! signed closure (uploaded); daemon A, with an empty store and no upstream, bootstraps from
//! S and serves the closure to the real `nix copy`: narinfos from connected peers, NARs as
//! chunks checked against their ids and ingested. Then S goes away and daemon B, bootstrapping
//! only from A, gets the closure from A.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix_p2p_cache_tests::{cmd, nix, run_ok, Corpus};

// ---------------------------------------------------------------------------------------------
// Copied from substituter.rs: the daemon as a child process, raw HTTP.

// The daemon as a child process.

struct Daemon {
    child: Option<Child>,
    port: u16,
    stderr: PathBuf,
    /// The P2P listen address it printed (with `/p2p/<peer id>`), if P2P is on.
    p2p: Option<String>,
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
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
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
        let mut p2p = None;
        if extra.contains(&"--p2p-listen") {
            let mut l = String::new();
            out.read_line(&mut l).unwrap();
            p2p = l.trim().strip_prefix("listening ").map(String::from);
            assert!(
                p2p.as_deref()
                    .is_some_and(|a| a.starts_with("/ip4/127.0.0.1/tcp/") && a.contains("/p2p/")),
                "no P2P address line: {l:?}; stderr:\n{}",
                fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        Daemon {
            child: Some(child),
            port,
            stderr,
            p2p,
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

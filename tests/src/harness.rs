//! Shared pieces of the end-to-end tests: the daemon as a child process, a raw HTTP/1.1
//! client that notices short bodies, and an environment of keys, stores and Nix cache dirs.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{cmd, nix, run_ok, Corpus};

// The daemon as a child process.

pub struct Daemon {
    pub child: Option<Child>,
    pub port: u16,
    pub stderr: PathBuf,
    /// The P2P listen address it printed (with `/p2p/<peer id>`), if P2P is on.
    pub p2p: Option<String>,
}

impl Daemon {
    /// Starts `nix-p2p-cache daemon` on a free loopback port and waits for its
    /// `listening http://…` line.
    pub fn start(data: &Path, extra: &[&str]) -> Daemon {
        Self::start_with_env(data, extra, &[])
    }

    /// [`Daemon::start`] with extra environment variables.
    pub fn start_with_env(data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        Self::spawn(cmd(), data, extra, env)
    }

    /// [`Daemon::start`] run through `wrapper` (a program and its arguments, e.g.
    /// `["prlimit", "--nofile=1024:1024", "--"]`), which runs the daemon binary.
    pub fn start_under(wrapper: &[&str], data: &Path, extra: &[&str]) -> Daemon {
        let mut c = Command::new(wrapper[0]);
        c.args(&wrapper[1..]).arg(crate::bin());
        Self::spawn(c, data, extra, &[])
    }

    fn spawn(mut command: Command, data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        fs::create_dir_all(data).unwrap();
        let stderr = data.with_extension(format!("stderr-{}", unique()));
        let mut child = command
            .envs(env.iter().copied())
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

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGTERM, then the exit status (killed after 10 s).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
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
    pub fn stop(mut self) {
        let st = self.terminate();
        assert!(
            st.is_some_and(|s| s.success()),
            "daemon did not exit 0 on SIGTERM ({st:?}); stderr:\n{}",
            self.stderr()
        );
    }

    /// A Prometheus counter or gauge (`nix_p2p_cache_<name>`).
    pub fn metric(&self, name: &str) -> u64 {
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
    /// A counter or gauge, `None` when `/metrics` does not export it (yet).
    /// Waits (up to 60 s) for a metric to reach at least `want`; returns its value then. A
    /// client gets a fetched NAR's last byte once it is verified; the daemon's commit (and the
    /// counters that follow it) come right after.
    pub fn wait_metric(&self, name: &str, want: u64) -> u64 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let v = self.metric(name);
            if v >= want || std::time::Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn try_metric(&self, name: &str) -> Option<u64> {
        let r = http(self.port, &get("/metrics"));
        assert_eq!(r.status, 200, "GET /metrics");
        let key = format!("nix_p2p_cache_{name} ");
        String::from_utf8(r.body)
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse().ok())
    }

    /// The daemon still answers `/nix-cache-info` with the exact body.
    pub fn assert_alive(&self) {
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

pub fn unique() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{t}", std::process::id())
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1 over TcpStream (no client library: exactly the bytes we mean).

#[derive(Debug)]
pub struct Resp {
    /// 0 when the server closed without a status line.
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body has exactly `Content-Length` bytes (false: connection cut short).
    pub complete: bool,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").into_bytes()
}

/// Sends `req` (with `Connection: close`), reads the answer until EOF. No half-close: hyper
/// (as axum::serve configures it) drops a connection whose read side ends, answer unsent.
pub fn http(port: u16, req: &[u8]) -> Resp {
    http_with(port, req, false)
}

pub fn http_with(port: u16, req: &[u8], half_close: bool) -> Resp {
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

pub fn parse_resp(raw: &[u8]) -> Resp {
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

pub struct Env {
    pub tmp: tempfile::TempDir,
}

pub const TOKEN: &str = "s3cret-upload-token";

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Env {
    pub fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("token"), format!("{TOKEN}\n")).unwrap();
        fs::write(
            tmp.path().join("netrc"),
            format!("machine 127.0.0.1 login x password {TOKEN}\n"),
        )
        .unwrap();
        Env { tmp }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// A fresh Nix cache dir (a machine that never asked anybody for these narinfos).
    pub fn xdg(&self, name: &str) -> PathBuf {
        let p = self.path(&format!("xdg-{name}"));
        fs::create_dir_all(&p).unwrap();
        p
    }

    pub fn nix(&self, program: &str) -> Command {
        nix(program, &self.xdg("main"))
    }

    pub fn key(&self, label: &str) -> (PathBuf, String) {
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

    pub fn signed_store(&self, name: &str, out: &str, sk: &Path) -> String {
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

    /// A `file://` binary cache (uncompressed) of `out`'s closure, signed with `sk`; its URL.
    pub fn signed_file_cache(&self, name: &str, out: &str, sk: &Path) -> String {
        let dir = self.path(name);
        let to = format!(
            "file://{}?compression=none&secret-key={}",
            dir.display(),
            sk.display()
        );
        run_ok(self.nix("nix").args(["copy", "--to", &to, out]));
        format!("file://{}", dir.display())
    }

    /// A data dir `name` holding everything of the `file://` cache `from` (`import`).
    pub fn imported(&self, name: &str, from: &str, pk: &str) -> PathBuf {
        let data = self.path(name);
        run_ok(cmd().args(["import", "--data-dir"]).arg(&data).args([
            "--from",
            from,
            "--trusted-public-key",
            pk,
        ]));
        data
    }

    pub fn upload(&self, from: &str, to: &str, out: &str) -> Output {
        self.nix("nix")
            .args(["copy", "--from", from, "--to", to, "--option", "netrc-file"])
            .arg(self.path("netrc"))
            .arg(out)
            .output()
            .unwrap()
    }

    /// `nix copy --from <url> --to <store>` with a fresh cache dir; `pk`: require signatures
    /// by it, `None`: no signatures required.
    pub fn download(
        &self,
        xdg: &str,
        url: &str,
        store: &str,
        pk: Option<&str>,
        out: &str,
    ) -> Output {
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

    pub fn verify_path(&self, store: &str, p: &str) -> Output {
        self.nix("nix-store")
            .args(["--store", store, "--verify-path", p])
            .output()
            .unwrap()
    }

    pub fn assert_closure_valid(&self, store: &str, closure: &[String]) {
        for p in closure {
            let v = self.verify_path(store, p);
            assert!(v.status.success(), "{p} in {store}: {}", text(&v));
        }
    }

    /// `nix copy --from` daemon `via` into a fresh store `fresh-<name>` (Nix cache dir `name`;
    /// `pk` as in [`Env::download`]); asserts that it succeeded — showing the stderr of `via`
    /// and of `also` when not — and that every path of `closure` verifies there.
    pub fn copy_closure_ok(
        &self,
        name: &str,
        via: &Daemon,
        pk: Option<&str>,
        out: &str,
        closure: &[String],
        also: &[&Daemon],
    ) -> String {
        let fresh = self
            .path(&format!("fresh-{name}/store"))
            .display()
            .to_string();
        let down = self.download(name, &via.url(), &fresh, pk, out);
        if !down.status.success() {
            let others: String = also
                .iter()
                .map(|d| format!("\n--\n{}", d.stderr()))
                .collect();
            panic!(
                "nix copy from {}: {}\nits stderr:\n{}{others}",
                via.url(),
                text(&down),
                via.stderr()
            );
        }
        self.assert_closure_valid(&fresh, closure);
        fresh
    }
}

pub fn text(o: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn closure_of(p: &str) -> Vec<String> {
    let out = run_ok(Command::new("nix-store").args(["-qR", p]));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

/// A small closure of the corpus (a path with a single reference).
pub fn small_closure(corpus: &Corpus) -> (String, Vec<String>) {
    let p = corpus
        .paths(1)
        .into_iter()
        .find(|p| p.ends_with("-bzip2-1.0.8"))
        .unwrap_or_else(|| corpus.out_path(1));
    let closure = closure_of(&p);
    (p, closure)
}

/// `nix-store --dump` of a path of this machine's store.
pub fn dump(p: &str) -> Vec<u8> {
    run_ok(Command::new("nix-store").args(["--dump", p])).stdout
}

/// The value of `key` in a narinfo.
pub fn narinfo_field<'a>(narinfo: &'a str, key: &str) -> Option<&'a str> {
    narinfo
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(": ")))
}

pub fn hash_part(p: &str) -> &str {
    &p.trim_start_matches("/nix/store/")[..32]
}

/// A loopback port nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn get_timed(port: u16, path: &str) -> (Resp, Duration) {
    let t = Instant::now();
    let r = http(port, &get(path));
    (r, t.elapsed())
}

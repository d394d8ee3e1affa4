//! `nix-p2p-cache-bench-p2p`: fetching a closure from P seed daemons through a fresh fetcher
//! daemon, against nginx serving the same closure as plain files (design §8, "P2P fetch").
//!
//! Setup, once: the `--cache` narinfos are signed with a throw-away key (seeds share only
//! trusted NARs) into `<work>/cache-signed` (NARs linked, not copied), imported with
//! `nix-p2p-cache import` into one data dir, which is copied for each seed. A daemon on that
//! data dir (no P2P) serves the closure once; its narinfos and NARs, checked against their
//! NarHash, become nginx's root: the reference serves byte for byte what the fetcher serves.
//!
//! Per configuration (P seeds for each `--peers` value, then `--capped-peers` seeds with
//! `--upload-rate-limit`): the seeds start one after the other (the first alone, the others
//! bootstrapping from it, each waited for until it has announced its NARs) and stay up for
//! the configuration's `--runs` runs. A run is one nginx pass, then one pass through a fresh
//! fetcher daemon (empty data dir, no upstream, `--no-mdns`, bootstrapping from every seed,
//! started before the clock starts). A pass fetches the closure the way Nix does: for each
//! path `GET /<hash>.narinfo`, then `GET /<its URL>` (or, with `--narinfos-first`, every
//! narinfo before any NAR, as `nix copy` walks a closure), `--concurrency` paths at a time,
//! each on its own keep-alive connection; every body is read whole and every NAR checked
//! against the narinfo's NarHash and NarSize. After a P2P pass the fetcher's `/metrics` must
//! count every NAR of the closure as stored. A failed P2P pass (a 404, a wrong NAR) is
//! reported and left out of the medians; a failed nginx pass ends the benchmark. While the
//! fetcher still runs, each seed's bytes sent to it are read from the kernel (`ss`).
//!
//! Every child (daemons, nginx, import) is killed when the benchmark ends, fails or is
//! interrupted (SIGINT/SIGTERM): [`Proc`] kills on drop.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use nix_p2p_cache::config::ByteSize;
use nix_p2p_cache::core::narinfo::NarInfo;
use nix_p2p_cache::core::signing::SecretKey;
use nix_p2p_cache::core::store_path::parse_hash_or_path;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Fetching a closure from P seeds through a fresh fetcher daemon, against nginx.
#[derive(Parser)]
#[command(name = "nix-p2p-cache-bench-p2p")]
struct Args {
    /// A file:// binary cache (directory or file:// URL): narinfos and NARs, any compression.
    #[arg(long)]
    cache: String,
    /// Store paths (or their hashes) to fetch, one per line [default: every path of the cache].
    #[arg(long)]
    paths_file: Option<PathBuf>,
    /// Seed counts measured without an upload cap, e.g. 1,2,4.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 4])]
    peers: Vec<usize>,
    /// Timed runs per configuration (a fresh fetcher each); figures are medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Store paths fetched at once (narinfo, then NAR), each on its own connection.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Each seed's upload cap in the capped configuration (the daemon's syntax: 10M = 10⁷ B/s).
    #[arg(long, default_value = "10M")]
    upload_rate_limit: ByteSize,
    /// Seeds in the capped configuration.
    #[arg(long, default_value_t = 4)]
    capped_peers: usize,
    /// Fetch every narinfo first, then every NAR (as `nix copy` does), instead of narinfo then
    /// NAR path by path.
    #[arg(long)]
    narinfos_first: bool,
    /// Leave out the capped configuration.
    #[arg(long)]
    no_capped: bool,
    /// The nix-p2p-cache binary [default: the one next to this benchmark].
    #[arg(long)]
    bin: Option<PathBuf>,
    /// nginx [default: nginx on PATH, else /usr/sbin/nginx].
    #[arg(long)]
    nginx: Option<PathBuf>,
    /// Work directory, kept afterwards [default: a temporary directory, removed].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Print the results as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
}

/// How long a daemon or nginx may take to listen, and a seed to announce its NARs.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);
/// The line a seed logs (target `nix_p2p_cache::announce`, level info) once its first
/// (re)provide round is done: every trusted NAR announced.
const ANNOUNCED: &str = "reprovided";
/// Read buffer of a client connection.
const READ_BUF: usize = 256 * 1024;

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.runs >= 1 && args.concurrency >= 1,
        "--runs and --concurrency must be ≥ 1"
    );
    ensure!(
        args.peers.iter().all(|&p| p >= 1) && args.capped_peers >= 1,
        "seed counts must be ≥ 1"
    );
    ensure!(
        args.upload_rate_limit.0 > 0,
        "--upload-rate-limit must be > 0"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // On a signal the benchmark's future is dropped, and with it every child (see `Proc`).
    rt.block_on(async {
        tokio::select! {
            r = run(args) => r,
            s = signalled() => bail!("interrupted by {s}; children stopped"),
        }
    })
}

async fn signalled() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

// --- child processes -------------------------------------------------------------------------

/// A child process with its output in log files; killed (SIGKILL) and reaped when dropped, so
/// no daemon or nginx outlives the benchmark however it ends.
struct Proc {
    name: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, logs: &Path) -> Result<Proc> {
        let stdout = logs.join(format!("{name}.out"));
        let stderr = logs.join(format!("{name}.err"));
        cmd.stdin(Stdio::null())
            .stdout(File::create(&stdout)?)
            .stderr(File::create(&stderr)?);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            stdout,
            stderr,
        })
    }

    /// An error, with the end of its stderr, if it has exited.
    fn alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its stderr ends:\n{}",
                self.name,
                self.stderr_tail()
            );
        }
        Ok(())
    }

    fn stderr_tail(&self) -> String {
        let text = fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits (without blocking the runtime) for a successful exit.
    async fn finish(mut self) -> Result<()> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                ensure!(
                    status.success(),
                    "{} failed ({status}); its stderr ends:\n{}",
                    self.name,
                    self.stderr_tail()
                );
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `found` gives a value for its (stdout, stderr) text so far; fails when it
    /// exits first or after [`STARTUP_TIMEOUT`].
    async fn wait_for<T>(
        &mut self,
        what: &str,
        found: impl Fn(&str, &str) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
            if let Some(v) = found(&read(&self.stdout), &read(&self.stderr)) {
                return Ok(v);
            }
            self.alive()?;
            ensure!(
                Instant::now() < deadline,
                "{}: no {what} within {STARTUP_TIMEOUT:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A running `nix-p2p-cache daemon`.
struct Daemon {
    proc: Proc,
    http: SocketAddr,
    /// `/ip4/…/p2p/<id>`, when P2P is on.
    p2p: Option<String>,
}

/// What every benchmark step needs.
struct Ctx {
    bin: PathBuf,
    work: PathBuf,
    logs: PathBuf,
    template: PathBuf,
    public_key: String,
    hashes: Arc<Vec<String>>,
    concurrency: usize,
    order: Order,
}

impl Ctx {
    /// Starts a daemon on `data` (`--listen 127.0.0.1:0`, our key trusted) and waits for its
    /// addresses (`p2p`: also a libp2p one).
    async fn daemon(&self, name: &str, data: &Path, extra: &[String], p2p: bool) -> Result<Daemon> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("daemon")
            .arg("--data-dir")
            .arg(data)
            .args(["--listen", "127.0.0.1:0"])
            .args(["--trusted-public-key", &self.public_key])
            .args(extra)
            .env(
                "RUST_LOG",
                "warn,nix_p2p_cache::fetch=info,nix_p2p_cache::announce=info",
            )
            .env("NO_COLOR", "1");
        let mut proc = Proc::spawn(name, &mut cmd, &self.logs)?;
        let (http, p2p_addr) = proc
            .wait_for("listen addresses", |out, _| {
                let http = out
                    .lines()
                    .find_map(|l| l.strip_prefix("listening http://"))?
                    .trim()
                    .parse::<SocketAddr>()
                    .ok()?;
                let addr = out
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("listening ")
                            .filter(|a| a.starts_with("/ip4/"))
                    })
                    .map(|a| a.trim().to_string());
                (!p2p || addr.is_some()).then_some((http, addr))
            })
            .await?;
        Ok(Daemon {
            proc,
            http,
            p2p: p2p_addr,
        })
    }

    /// `n` seeds on copies of the imported data dir, each bootstrapping from the first and
    /// waited for until it has announced its NARs.
    async fn seeds(&self, n: usize, cap: Option<u64>) -> Result<Vec<Daemon>> {
        let mut seeds: Vec<Daemon> = Vec::with_capacity(n);
        for i in 0..n {
            let dir = self.work.join(format!("seed-{i}"));
            if !dir.exists() {
                let (from, to) = (self.template.clone(), dir.clone());
                tokio::task::spawn_blocking(move || copy_data_dir(&from, &to)).await??;
            }
            let mut extra = p2p_flags();
            if let Some(first) = seeds.first().and_then(|s| s.p2p.clone()) {
                extra.extend(["--bootstrap".into(), first]);
            }
            if let Some(r) = cap {
                extra.extend(["--upload-rate-limit".into(), r.to_string()]);
            }
            let mut seed = self
                .daemon(&format!("seed-{i}"), &dir, &extra, true)
                .await?;
            seed.proc
                .wait_for("announce", |_, err| err.contains(ANNOUNCED).then_some(()))
                .await?;
            seeds.push(seed);
        }
        Ok(seeds)
    }

    /// One P2P pass: a fresh fetcher bootstrapping from `seeds`, the closure through it.
    async fn p2p_pass(&self, seeds: &[Daemon], name: &str, nars: u64) -> Result<Pass> {
        let data = self.work.join(name);
        if data.exists() {
            fs::remove_dir_all(&data)?; // left by a failed run in a kept --work-dir
        }
        let mut extra = p2p_flags();
        for s in seeds {
            extra.push("--bootstrap".into());
            extra.push(s.p2p.clone().context("a seed without a P2P address")?);
        }
        let f = self.daemon(name, &data, &extra, true).await?;
        let mut pass = fetch_closure(f.http, &self.hashes, self.concurrency, self.order)
            .await
            .with_context(|| {
                format!(
                    "fetching through {name}; its stderr ends:\n{}",
                    f.proc.stderr_tail()
                )
            })?;
        let seed_pids: Vec<u32> = seeds.iter().map(|s| s.proc.child.id()).collect();
        pass.seed_bytes = sent_to(f.proc.child.id(), &seed_pids)?;
        let stored = metric(f.http, "nix_p2p_cache_store_nars").await?;
        ensure!(
            stored == nars,
            "{name} stores {stored} NARs after the pass, the closure has {nars}"
        );
        drop(f);
        fs::remove_dir_all(&data).with_context(|| format!("removing {}", data.display()))?;
        Ok(pass)
    }
}

/// Bytes each of `seeds` has sent to `fetcher` over the TCP connections between them that are
/// still open (all of them while the fetcher runs: libp2p keeps its connections), from the
/// kernel's `bytes_sent` (TCP_INFO, as `ss -tinpH` prints it): wire bytes, noise and yamux
/// framing included.
fn sent_to(fetcher: u32, seeds: &[u32]) -> Result<Vec<u64>> {
    let out = Command::new("ss")
        .args(["-tinpH", "state", "established"])
        .output()
        .context("running ss (iproute2)")?;
    ensure!(out.status.success(), "ss failed: {}", out.status);
    let sockets = parse_ss(&String::from_utf8_lossy(&out.stdout));
    let fetcher_ends: HashSet<&str> = sockets
        .iter()
        .filter(|s| s.pid == Some(fetcher))
        .map(|s| s.local.as_str())
        .collect();
    Ok(seeds
        .iter()
        .map(|&pid| {
            sockets
                .iter()
                .filter(|s| s.pid == Some(pid) && fetcher_ends.contains(s.peer.as_str()))
                .map(|s| s.bytes_sent)
                .sum()
        })
        .collect())
}

/// One TCP socket of `ss -tinpH state established`.
struct Socket {
    local: String,
    peer: String,
    pid: Option<u32>,
    bytes_sent: u64,
}

/// A header line (`Recv-Q Send-Q Local Peer users:((…,pid=N,…))`) per socket, then indented
/// lines of TCP_INFO fields (`bytes_sent:N` absent when 0).
fn parse_ss(text: &str) -> Vec<Socket> {
    let mut out: Vec<Socket> = Vec::new();
    for line in text.lines() {
        if line.starts_with(char::is_whitespace) {
            if let Some(s) = out.last_mut() {
                s.bytes_sent += line
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix("bytes_sent:")?.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        let pid = line.split_once("pid=").and_then(|(_, rest)| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        });
        out.push(Socket {
            local: f[2].to_string(),
            peer: f[3].to_string(),
            pid,
            bytes_sent: 0,
        });
    }
    out
}

fn p2p_flags() -> Vec<String> {
    ["--p2p-listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"]
        .map(String::from)
        .to_vec()
}

/// Copies a data dir (packs and index), leaving out the node key so each copy gets its own.
fn copy_data_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_name() == "node.key" {
            continue;
        }
        if e.file_type()?.is_dir() {
            copy_data_dir(&src, &dst)?;
        } else {
            fs::copy(&src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}

// --- the client ------------------------------------------------------------------------------

/// A minimal HTTP/1.1 client: one keep-alive connection read through a buffer, each body
/// handed to the caller slice by slice straight from that buffer.
struct HttpConn {
    addr: SocketAddr,
    io: Option<BufReader<TcpStream>>,
    /// Responses read on the current connection.
    reused: u32,
}

/// Status and body length of a response.
struct Reply {
    status: u16,
    len: u64,
    close: bool,
}

impl HttpConn {
    fn new(addr: SocketAddr) -> Self {
        HttpConn {
            addr,
            io: None,
            reused: 0,
        }
    }

    /// `GET /path`: the status and body length; `body` sees the whole body.
    async fn get(
        &mut self,
        path: &str,
        body: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<(u16, u64)> {
        let reply = match self.send(path).await {
            Ok(r) => r,
            // An idle keep-alive connection may have been closed by the server: once more on
            // a new one.
            Err(_) if self.reused > 0 => {
                self.io = None;
                self.send(path).await?
            }
            Err(e) => return Err(e),
        };
        let io = self.io.as_mut().context("no connection")?;
        let mut left = reply.len;
        while left > 0 {
            let buf = io.fill_buf().await?;
            ensure!(
                !buf.is_empty(),
                "GET /{path}: connection closed, {left} of {} body bytes missing",
                reply.len
            );
            let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            body(&buf[..n]);
            io.consume(n);
            left -= n as u64;
        }
        self.reused += 1;
        if reply.close {
            self.io = None;
        }
        Ok((reply.status, reply.len))
    }

    /// Writes the request (connecting first if needed) and reads the response head.
    async fn send(&mut self, path: &str) -> Result<Reply> {
        if self.io.is_none() {
            let s = TcpStream::connect(self.addr)
                .await
                .with_context(|| format!("connecting to {}", self.addr))?;
            s.set_nodelay(true)?;
            self.io = Some(BufReader::with_capacity(READ_BUF, s));
            self.reused = 0;
        }
        let io = self.io.as_mut().context("no connection")?;
        let request = format!("GET /{path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.addr);
        io.get_mut().write_all(request.as_bytes()).await?;
        let mut line = String::new();
        let mut reply: Option<Reply> = None;
        let mut head_bytes = 0;
        loop {
            line.clear();
            let n = io.read_line(&mut line).await?;
            ensure!(n > 0, "GET /{path}: connection closed in the response head");
            head_bytes += n;
            ensure!(
                head_bytes <= 64 * 1024,
                "GET /{path}: response head too long"
            );
            let l = line.trim_end_matches(['\r', '\n']);
            let Some(r) = reply.as_mut() else {
                reply = Some(status_line(l)?);
                continue;
            };
            if l.is_empty() {
                break;
            }
            let (name, value) = l
                .split_once(':')
                .with_context(|| format!("GET /{path}: bad header {l:?}"))?;
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => r.len = value.parse().context("bad Content-Length")?,
                "connection" => r.close = value.eq_ignore_ascii_case("close"),
                "transfer-encoding" => bail!("GET /{path}: {value} bodies are not supported"),
                _ => {}
            }
        }
        reply.context("no status line")
    }
}

/// `HTTP/1.x <code> …` → a reply with no body yet (HTTP/1.0 closes by default).
fn status_line(l: &str) -> Result<Reply> {
    let mut parts = l.split(' ');
    let version = parts.next().unwrap_or_default();
    ensure!(version.starts_with("HTTP/1."), "bad status line {l:?}");
    let status = parts
        .next()
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line {l:?}"))?;
    Ok(Reply {
        status,
        len: 0,
        close: version == "HTTP/1.0",
    })
}

/// A `GET` that must answer 200; the body as bytes.
async fn get_ok(c: &mut HttpConn, path: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let (status, _) = c.get(path, &mut |b| out.extend_from_slice(b)).await?;
    ensure!(status == 200, "GET /{path} on {}: status {status}", c.addr);
    Ok(out)
}

/// The narinfo of `hash`, checked to name it and to point at an uncompressed NAR.
async fn narinfo(c: &mut HttpConn, hash: &str) -> Result<(NarInfo, Vec<u8>)> {
    let text = get_ok(c, &format!("{hash}.narinfo")).await?;
    let info = NarInfo::parse(std::str::from_utf8(&text).context("narinfo is not UTF-8")?)
        .with_context(|| format!("narinfo of {hash}"))?;
    ensure!(
        info.store_path.hash().as_str() == hash,
        "narinfo of {hash} names {}",
        info.store_path
    );
    ensure!(
        info.compression_or_default() == "none",
        "narinfo of {hash}: Compression {}",
        info.compression_or_default()
    );
    Ok((info, text))
}

/// `GET` of the NAR of `info`; `sink` sees the body. Fails unless the body has the narinfo's
/// NarSize and NarHash.
async fn nar(
    c: &mut HttpConn,
    info: &NarInfo,
    sink: &mut (dyn FnMut(&[u8]) + Send),
) -> Result<u64> {
    let mut sha = Sha256::new();
    let (status, len) = c
        .get(&info.url, &mut |b| {
            sha.update(b);
            sink(b)
        })
        .await?;
    ensure!(
        status == 200,
        "GET /{} on {}: status {status}",
        info.url,
        c.addr
    );
    ensure!(
        len == info.nar_size,
        "{}: {len} bytes, NarSize {}",
        info.url,
        info.nar_size
    );
    ensure!(
        sha.finalize().as_slice() == info.nar_hash.0.as_slice(),
        "{} from {}: body does not match NarHash {}",
        info.url,
        c.addr,
        info.nar_hash
    );
    Ok(len)
}

/// One pass over the closure.
struct Pass {
    bytes: u64,
    time: Duration,
    /// Bytes each seed sent the fetcher (P2P passes only).
    seed_bytes: Vec<u64>,
}

impl Pass {
    fn mbps(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.time.as_secs_f64()
    }
}

/// How a pass walks the closure.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    /// Each worker: a path's narinfo, then its NAR, then the next path.
    PerPath,
    /// Every narinfo first, then every NAR (as `nix copy` does: it needs the references to
    /// know the closure before it downloads); both phases are timed.
    NarinfosFirst,
}

/// What the workers of one phase ask for each path.
#[derive(Clone)]
enum Ask {
    Both,
    Narinfo,
    Nar(Arc<Vec<NarInfo>>),
}

/// Fetches the closure from `addr`, `concurrency` paths at a time.
async fn fetch_closure(
    addr: SocketAddr,
    hashes: &Arc<Vec<String>>,
    concurrency: usize,
    order: Order,
) -> Result<Pass> {
    let start = Instant::now();
    let bytes = if order == Order::NarinfosFirst {
        let (_, mut infos) = phase(addr, hashes, concurrency, Ask::Narinfo).await?;
        infos.sort_by_key(|(i, _)| *i);
        let infos = Arc::new(infos.into_iter().map(|(_, info)| info).collect());
        phase(addr, hashes, concurrency, Ask::Nar(infos)).await?.0
    } else {
        phase(addr, hashes, concurrency, Ask::Both).await?.0
    };
    Ok(Pass {
        bytes,
        time: start.elapsed(),
        seed_bytes: Vec::new(),
    })
}

/// `concurrency` workers, each on its own connection, taking paths from one queue: NAR bytes
/// fetched, and the narinfos (with their index) when asked for.
async fn phase(
    addr: SocketAddr,
    hashes: &Arc<Vec<String>>,
    concurrency: usize,
    ask: Ask,
) -> Result<(u64, Vec<(usize, NarInfo)>)> {
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency.min(hashes.len()))
        .map(|_| {
            let (hashes, next, ask) = (hashes.clone(), next.clone(), ask.clone());
            tokio::spawn(async move {
                let mut c = HttpConn::new(addr);
                let (mut bytes, mut infos) = (0u64, Vec::new());
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(hash) = hashes.get(i) else {
                        return Ok::<_, anyhow::Error>((bytes, infos));
                    };
                    match &ask {
                        Ask::Both => {
                            let (info, _) = narinfo(&mut c, hash).await?;
                            bytes += nar(&mut c, &info, &mut |_| {}).await?;
                        }
                        Ask::Narinfo => infos.push((i, narinfo(&mut c, hash).await?.0)),
                        Ask::Nar(all) => bytes += nar(&mut c, &all[i], &mut |_| {}).await?,
                    }
                }
            })
        })
        .collect();
    let (mut bytes, mut infos) = (0, Vec::new());
    for w in workers {
        let (b, i) = w.await??;
        bytes += b;
        infos.extend(i);
    }
    Ok((bytes, infos))
}

/// A counter or gauge from a daemon's `/metrics`.
async fn metric(addr: SocketAddr, name: &str) -> Result<u64> {
    let text = get_ok(&mut HttpConn::new(addr), "metrics").await?;
    let text = String::from_utf8_lossy(&text);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("no {name} in {addr}/metrics"))
}

// --- setup -----------------------------------------------------------------------------------

/// The cache's narinfos with a `Sig:` by `key` added, in `to` (NARs linked, not copied).
/// Returns the store-path hashes of the cache.
fn sign_cache(from: &Path, to: &Path, key: &SecretKey) -> Result<Vec<String>> {
    if to.exists() {
        fs::remove_dir_all(to)?;
    }
    fs::create_dir_all(to)?;
    let mut hashes = Vec::new();
    for e in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let (src, dst) = (e.path(), to.join(&name));
        if let Some(hash) = name.strip_suffix(".narinfo") {
            let text = fs::read_to_string(&src)?;
            let mut info =
                NarInfo::parse(&text).with_context(|| format!("parsing {}", src.display()))?;
            info.sigs.push(key.sign(&info.fingerprint()));
            fs::write(&dst, info.to_text())?;
            hashes.push(hash.to_string());
        } else if name == "nix-cache-info" {
            fs::copy(&src, &dst)?;
        } else if e.file_type()?.is_dir() {
            std::os::unix::fs::symlink(&src, &dst)?;
        }
    }
    ensure!(!hashes.is_empty(), "no narinfos in {}", from.display());
    hashes.sort();
    Ok(hashes)
}

/// Writes nginx's root from a daemon holding the closure: its `/nix-cache-info`, narinfos and
/// NARs (each checked against its NarHash). Returns the NAR bytes and distinct NARs.
async fn reference_root(daemon: SocketAddr, hashes: &[String], www: &Path) -> Result<(u64, u64)> {
    fs::create_dir_all(www.join("nar"))?;
    let mut c = HttpConn::new(daemon);
    fs::write(
        www.join("nix-cache-info"),
        get_ok(&mut c, "nix-cache-info").await?,
    )?;
    let (mut bytes, mut seen) = (0, HashSet::new());
    for h in hashes {
        let (info, text) = narinfo(&mut c, h).await?;
        fs::write(www.join(format!("{h}.narinfo")), &text)?;
        ensure!(
            !info.url.contains("..") && info.url.starts_with("nar/"),
            "narinfo of {h}: unexpected URL {}",
            info.url
        );
        if seen.insert(info.nar_hash) {
            let path = www.join(&info.url);
            let mut f = std::io::BufWriter::new(File::create(&path)?);
            let mut err = None;
            nar(&mut c, &info, &mut |b| {
                if let Err(e) = f.write_all(b) {
                    err.get_or_insert(e);
                }
            })
            .await?;
            if let Some(e) = err {
                return Err(e).with_context(|| format!("writing {}", path.display()));
            }
            f.flush()?;
        }
        bytes += info.nar_size;
    }
    Ok((bytes, seen.len() as u64))
}

/// nginx as the reference: one process (`master_process off`, so killing it leaves no
/// worker behind), sendfile, keep-alive, access log off, on a free loopback port.
async fn start_nginx(
    bin: &Path,
    dir: &Path,
    www: &Path,
    logs: &Path,
) -> Result<(Proc, SocketAddr)> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    fs::create_dir_all(dir.join("tmp"))?;
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\ndaemon off;\nmaster_process off;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  \
         keepalive_requests 1000000;\n  keepalive_timeout 300s;\n  \
         client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n  \
         fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  \
         scgi_temp_path {d}/tmp/scgi;\n  \
         types {{ text/x-nix-narinfo narinfo; application/x-nix-nar nar; }}\n  \
         default_type application/octet-stream;\n  \
         server {{ listen 127.0.0.1:{port}; root {}; }}\n}}\n",
        www.display()
    );
    let conf_path = dir.join("nginx.conf");
    fs::write(&conf_path, conf)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(dir.join("error.log"));
    let mut proc = Proc::spawn("nginx", &mut cmd, logs)?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    while get_ok(&mut HttpConn::new(addr), "nix-cache-info")
        .await
        .is_err()
    {
        proc.alive()?;
        ensure!(Instant::now() < deadline, "nginx did not answer on {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((proc, addr))
}

fn find_nginx() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"))
}

/// 32 random bytes for the throw-away signing key.
fn random_seed() -> Result<[u8; 32]> {
    use std::io::Read as _;
    let mut seed = [0u8; 32];
    File::open("/dev/urandom")?.read_exact(&mut seed)?;
    Ok(seed)
}

// --- the benchmark ---------------------------------------------------------------------------

/// One measured configuration.
struct Config {
    seeds: usize,
    /// Each seed's upload cap, bytes/s.
    cap: Option<u64>,
    p2p: Vec<Pass>,
    nginx: Vec<Pass>,
    /// Why P2P passes failed.
    failures: Vec<String>,
}

/// NaN for no values.
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if 2 * mid == v.len() {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

impl Config {
    fn p2p_mbps(&self) -> f64 {
        median(self.p2p.iter().map(Pass::mbps).collect())
    }
    fn p2p_secs(&self) -> f64 {
        median(self.p2p.iter().map(|p| p.time.as_secs_f64()).collect())
    }
    /// Each seed's upload, MB/s (medians over the runs).
    fn seed_mbps(&self) -> Vec<f64> {
        (0..self.seeds)
            .map(|i| {
                median(
                    self.p2p
                        .iter()
                        .map(|p| p.seed_bytes[i] as f64 / 1e6 / p.time.as_secs_f64())
                        .collect(),
                )
            })
            .collect()
    }
    fn nginx_mbps(&self) -> f64 {
        median(self.nginx.iter().map(Pass::mbps).collect())
    }
    /// NAR throughput over the seeds' summed caps.
    fn of_caps(&self) -> Option<f64> {
        self.cap
            .map(|c| self.p2p_mbps() * 1e6 / (c as f64 * self.seeds as f64))
    }
    /// What the seeds sent (wire bytes, compressed chunks) over their summed caps: above 1,
    /// the caps are not enforced.
    fn wire_of_caps(&self) -> Option<f64> {
        let sent: f64 = self.seed_mbps().iter().sum();
        self.cap
            .map(|c| sent * 1e6 / (c as f64 * self.seeds as f64))
    }
    fn label(&self) -> String {
        match self.cap {
            None => format!("p{}", self.seeds),
            Some(_) => format!("capped{}", self.seeds),
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let cache = PathBuf::from(args.cache.strip_prefix("file://").unwrap_or(&args.cache));
    let cache = fs::canonicalize(&cache).with_context(|| cache.display().to_string())?;
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory of this executable")?
            .join("nix-p2p-cache"),
    };
    ensure!(bin.is_file(), "{} not found (give --bin)", bin.display());
    let nginx_bin = args.nginx.clone().unwrap_or_else(find_nginx);
    let _tmp;
    let work = match &args.work_dir {
        Some(w) => {
            fs::create_dir_all(w)?;
            fs::canonicalize(w)?
        }
        None => {
            let t = tempfile::Builder::new().prefix("bench-p2p.").tempdir()?;
            let p = t.path().to_path_buf();
            _tmp = t;
            p
        }
    };
    let logs = work.join("logs");
    fs::create_dir_all(&logs)?;
    eprintln!("work dir {} (logs in logs/)", work.display());

    // Sign and import, once.
    // The key is kept with a kept --work-dir: the imported data dir trusts it.
    let key_file = work.join("bench.key");
    let key = if key_file.exists() {
        SecretKey::parse(&fs::read_to_string(&key_file)?)?
    } else {
        let k = SecretKey::generate("bench-p2p-1", random_seed()?);
        fs::write(&key_file, k.to_nix_format())?;
        k
    };
    let public_key = key.public_key().to_string();
    let signed = work.join("cache-signed");
    let all = sign_cache(&cache, &signed, &key)?;
    let hashes = match &args.paths_file {
        None => all.clone(),
        Some(f) => {
            let text = fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let mut v = Vec::new();
            for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let h = parse_hash_or_path(l).with_context(|| format!("bad store path {l:?}"))?;
                ensure!(
                    all.binary_search(&h.as_str().to_string()).is_ok(),
                    "{l} is not in the cache"
                );
                v.push(h.as_str().to_string());
            }
            v
        }
    };
    let template = work.join("data-template");
    if !template.join("index.redb").exists() {
        let t = Instant::now();
        let mut cmd = Command::new(&bin);
        cmd.arg("import")
            .arg("--data-dir")
            .arg(&template)
            .arg("--from")
            .arg(format!("file://{}", signed.display()))
            .args(["--trusted-public-key", &public_key]);
        Proc::spawn("import", &mut cmd, &logs)?.finish().await?;
        eprintln!(
            "imported {} paths in {:.1} s",
            all.len(),
            t.elapsed().as_secs_f64()
        );
    }
    let ctx = Ctx {
        bin,
        work: work.clone(),
        logs: logs.clone(),
        template,
        public_key,
        hashes: Arc::new(hashes),
        concurrency: args.concurrency,
        order: if args.narinfos_first {
            Order::NarinfosFirst
        } else {
            Order::PerPath
        },
    };

    // nginx's root, from what a daemon serves of the imported store.
    let www = work.join("www");
    let (nar_bytes, nars) = {
        let d = ctx.daemon("reference", &ctx.template, &[], false).await?;
        let r = reference_root(d.http, &ctx.hashes, &www).await?;
        drop(d);
        r
    };
    let (_nginx, nginx) = start_nginx(&nginx_bin, &work.join("nginx"), &www, &logs).await?;
    // Warm-up (page cache) and a first check of nginx's bytes.
    fetch_closure(nginx, &ctx.hashes, ctx.concurrency, ctx.order).await?;
    eprintln!(
        "closure: {} paths, {} NARs, {:.1} MB; {} paths at a time; {} runs per configuration",
        ctx.hashes.len(),
        nars,
        nar_bytes as f64 / 1e6,
        ctx.concurrency,
        args.runs
    );

    let mut configs: Vec<Config> = args
        .peers
        .iter()
        .map(|&p| (p, None))
        .chain((!args.no_capped).then_some((args.capped_peers, Some(args.upload_rate_limit.0))))
        .map(|(seeds, cap)| Config {
            seeds,
            cap,
            p2p: Vec::new(),
            nginx: Vec::new(),
            failures: Vec::new(),
        })
        .collect();
    for cfg in &mut configs {
        let t = Instant::now();
        let seeds = ctx.seeds(cfg.seeds, cfg.cap).await?;
        eprintln!(
            "{}: {} seeds up and announced in {:.1} s",
            cfg.label(),
            cfg.seeds,
            t.elapsed().as_secs_f64()
        );
        for run in 0..args.runs {
            let n = fetch_closure(nginx, &ctx.hashes, ctx.concurrency, ctx.order).await?;
            let name = format!("fetcher-{}-{run}", cfg.label());
            let p = match ctx.p2p_pass(&seeds, &name, nars).await {
                Ok(p) => p,
                // A failed pass (a 404, a wrong NAR) is reported, not measured.
                Err(e) => {
                    eprintln!("{} run {run}: P2P pass FAILED: {e:#}", cfg.label());
                    cfg.failures.push(e.root_cause().to_string());
                    cfg.nginx.push(n);
                    continue;
                }
            };
            let sent: Vec<String> = p
                .seed_bytes
                .iter()
                .map(|b| format!("{:.1}", *b as f64 / 1e6))
                .collect();
            eprintln!(
                "{} run {run}: nginx {:.2} s = {:.1} MB/s; P2P {:.2} s = {:.1} MB/s; \
                 seeds sent {} MB",
                cfg.label(),
                n.time.as_secs_f64(),
                n.mbps(),
                p.time.as_secs_f64(),
                p.mbps(),
                sent.join(" / ")
            );
            cfg.nginx.push(n);
            cfg.p2p.push(p);
        }
        drop(seeds);
    }

    let table = table(&configs, &ctx, nar_bytes, args.runs);
    if args.json {
        eprintln!("{table}");
        println!(
            "{}",
            serde_json::to_string_pretty(&json(&configs, &ctx, nar_bytes, nars, args.runs))?
        );
    } else {
        println!("{table}");
    }
    Ok(())
}

fn table(configs: &[Config], ctx: &Ctx, nar_bytes: u64, runs: usize) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "## P2P fetch: {} paths, {:.1} MB of NARs, {} paths at a time ({}); median of {runs} runs\n",
        ctx.hashes.len(),
        nar_bytes as f64 / 1e6,
        ctx.concurrency,
        match ctx.order {
            Order::PerPath => "narinfo then NAR, path by path",
            Order::NarinfosFirst => "every narinfo first, then every NAR",
        }
    );
    let _ = writeln!(
        t,
        "| seeds | upload cap per seed | P2P runs ok | P2P s | P2P MB/s | nginx MB/s | P2P / nginx | P2P / sum of caps | target | each seed sent, MB/s |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|");
    let mark = |ok: bool| if ok { "✓" } else { "✗" };
    for c in configs {
        let ratio = c.p2p_mbps() / c.nginx_mbps();
        let (cap, of_caps, target) = match (c.cap, c.of_caps()) {
            (Some(cap), Some(r)) => (
                format!("{:.1} MB/s", cap as f64 / 1e6),
                format!(
                    "{r:.2} {} (sent: {:.2})",
                    mark(r >= 0.8),
                    c.wire_of_caps().unwrap_or(f64::NAN)
                ),
                format!("≥ 0.8 × {:.1} MB/s", cap as f64 * c.seeds as f64 / 1e6),
            ),
            _ if c.seeds == 4 => (
                "—".into(),
                "—".into(),
                format!("≥ 0.8 × nginx {}", mark(ratio >= 0.8)),
            ),
            _ => ("—".into(), "—".into(), "—".into()),
        };
        let sent: Vec<String> = c.seed_mbps().iter().map(|m| format!("{m:.1}")).collect();
        let _ = writeln!(
            t,
            "| {} | {cap} | {}/{runs} | {:.2} | {:.1} | {:.1} | {ratio:.2} | {of_caps} | {target} | {} |",
            c.seeds,
            c.p2p.len(),
            c.p2p_secs(),
            c.p2p_mbps(),
            c.nginx_mbps(),
            sent.join(" / ")
        );
    }
    let _ = writeln!(
        t,
        "\nMB = 10⁶ bytes of NAR. P2P / sum of caps: NAR MB/s over seeds × cap; (sent: …): the \
         seeds' wire bytes over the same sum. Each seed sent: wire bytes to the fetcher per \
         second (zstd chunks, noise and yamux framing; TCP_INFO bytes_sent)."
    );
    t
}

fn json(
    configs: &[Config],
    ctx: &Ctx,
    nar_bytes: u64,
    nars: u64,
    runs: usize,
) -> serde_json::Value {
    let secs = |v: &[Pass]| v.iter().map(|p| p.time.as_secs_f64()).collect::<Vec<_>>();
    serde_json::json!({
        "paths": ctx.hashes.len(),
        "nars": nars,
        "nar_bytes": nar_bytes,
        "concurrency": ctx.concurrency,
        "narinfos_first": ctx.order == Order::NarinfosFirst,
        "runs": runs,
        "configurations": configs.iter().map(|c| serde_json::json!({
            "seeds": c.seeds,
            "upload_rate_limit": c.cap,
            "p2p_secs": secs(&c.p2p),
            "nginx_secs": secs(&c.nginx),
            "p2p_mbps": c.p2p_mbps(),
            "nginx_mbps": c.nginx_mbps(),
            "p2p_over_nginx": c.p2p_mbps() / c.nginx_mbps(),
            "p2p_over_sum_of_caps": c.of_caps(),
            "seeds_sent_over_sum_of_caps": c.wire_of_caps(),
            "seed_bytes_sent": c.p2p.iter().map(|p| p.seed_bytes.clone()).collect::<Vec<_>>(),
            "seed_mbps_sent": c.seed_mbps(),
            "failed_runs": c.failures,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        let r = status_line("HTTP/1.1 404 Not Found").unwrap();
        assert_eq!((r.status, r.close), (404, false));
        assert!(status_line("HTTP/1.0 200 OK").unwrap().close);
        assert!(status_line("SPDY 200").is_err());
        assert!(status_line("HTTP/1.1 abc").is_err());
    }

    #[test]
    fn ss_output() {
        let text = "0 0 127.0.0.1:4001 127.0.0.1:5002 users:((\"nix-p2p-cache\",pid=42,fd=9))\n\
                    \t bbr rtt:0.1/0.05 bytes_sent:1000 bytes_acked:1001 bytes_received:7\n\
                    0 0 127.0.0.1:5002 127.0.0.1:4001 users:((\"nix-p2p-cache\",pid=7,fd=3))\n\
                    \t bbr bytes_received:1000\n";
        let s = parse_ss(text);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].pid, s[0].bytes_sent), (Some(42), 1000));
        assert_eq!((s[1].pid, s[1].bytes_sent), (Some(7), 0));
        assert_eq!(
            (s[1].local.as_str(), s[1].peer.as_str()),
            ("127.0.0.1:5002", "127.0.0.1:4001")
        );
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}

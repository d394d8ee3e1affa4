//! Real mode: N of the daemon's own nodes in one process, over libp2p's memory transport.
//!
//! Each node is `nix_p2p_cache::daemon::run` — the daemon's own store (a temp dir), network
//! layer, fetcher, resolver, announcer and HTTP substituter — started with
//! [`DaemonConfig::p2p_transport`] set to the memory transport and its protocol timers
//! ([`Timers`]) divided by the scenario's `real.time_scale`, so hours of protocol time fit in
//! minutes. Seeds start holding every closure of the catalogue (signed by a key every node
//! trusts); the other nodes bootstrap from the seeds and fetch closures through their own HTTP
//! substituter, as Nix would, at the times of the scenario's trace (`trace.rs`: the same list
//! the model replays, over the model's catalogue and uplinks). Upload caps per node come from
//! the class's bandwidth profile, scaled by `time_scale × bytes_scale`.
//!
//! What real mode leaves out (the model has it): churn (every node stays online), NAT (every
//! node can dial every other), LAN clusters (no mDNS over the memory transport), download
//! caps, channel generations (generation 0 only) and closures sharing NARs. Byte counts are
//! the exchange's encoded response bytes (`p2p.bytes_up` of `/api/status`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix_p2p_cache::config::{
    Announce as DaemonAnnounce, ByteSize, DaemonConfig, Role, Share, Timers,
};
use nix_p2p_cache::core::nar::{write_nar, Node};
use nix_p2p_cache::core::narinfo::NarInfo;
use nix_p2p_cache::core::signing::{verify_narinfo, SecretKey};
use nix_p2p_cache::core::NarHash;
use nix_p2p_cache::net::Transport;
use nix_p2p_cache::store::{Retention, Store};
use serde::Deserialize;

use crate::model::{percentile, ClassStats, Outcome, SampleRow};
use crate::rng::Rng;
use crate::scenario::{Announce, Kind, Scenario};
use crate::Error;

/// Real-mode parameters (`[real]` in a scenario).
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RealCfg {
    /// Simulated seconds per wall-clock second: protocol timers are divided by it, upload caps
    /// multiplied (with `bytes_scale`), measured times multiplied.
    pub time_scale: f64,
    /// Bytes of a real closure per byte of its stand-in (closures are shrunk by this factor).
    pub bytes_scale: f64,
    /// At most this many NARs per closure (each NAR is then larger).
    pub max_nars_per_closure: u32,
    /// NARs of one closure fetched at once (Nix's `max-substitution-jobs` is 16).
    pub parallel_nars: usize,
    /// Wall-clock seconds given to fetches still running at `sim_hours`.
    pub grace_secs: f64,
    /// Non-seed nodes have the first seed's HTTP substituter as their upstream, as a real
    /// deployment has cache.nixos.org: what no connected peer answers comes from there (and
    /// counts as seed egress).
    pub upstream: bool,
}

impl Default for RealCfg {
    fn default() -> Self {
        Self {
            time_scale: 3600.0,
            bytes_scale: 1e-4,
            max_nars_per_closure: 8,
            parallel_nars: 4,
            grace_secs: 120.0,
            upstream: false,
        }
    }
}

/// One NAR of the catalogue.
struct Nar {
    hash: String,
    bytes: Vec<u8>,
}

/// A node as real mode drives it.
struct NodeHandle {
    class: usize,
    kind: Kind,
    http: SocketAddr,
    /// Also read `/metrics` (HTTP bytes: a seed's served, a peer's from its upstream).
    http_bytes: bool,
}

/// What one node's `/api/status` says (the fields real mode reads).
#[derive(Default, Clone, Copy)]
struct NodeNumbers {
    bytes_up: u64,
    bytes_down: u64,
    nar_bytes: u64,
    remote_providers: u64,
    in_get_providers: u64,
    in_add_provider: u64,
    in_find_node: u64,
}

fn real_err(msg: impl std::fmt::Display) -> Error {
    Error::Real(msg.to_string())
}

/// A store-path hash: 20 pseudo-random bytes in Nix's base32, as Nix's own (160 bits).
fn path_hash(r: &mut Rng) -> String {
    let bytes: Vec<u8> = (0..3)
        .flat_map(|_| r.next_u64().to_le_bytes())
        .take(20)
        .collect();
    nix_p2p_cache::core::base32::encode(&bytes)
}

/// A valid NAR of one regular file holding `len` pseudo-random (incompressible) bytes.
fn make_nar(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut contents = Vec::with_capacity(len + 8);
    while contents.len() < len {
        contents.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    contents.truncate(len);
    let mut nar = Vec::with_capacity(len + 256);
    write_nar(
        &mut nar,
        &Node::Regular {
            executable: false,
            contents,
        },
    )
    .expect("a regular file is a valid NAR");
    nar
}

/// The catalogue: the model's closures (same sizes, same seed), each shrunk by `bytes_scale`
/// and cut into at most `max_nars_per_closure` NARs of pseudo-random bytes.
fn catalogue(sc: &Scenario, seed: u64) -> Result<Vec<Vec<Nar>>, Error> {
    let cfg = &sc.real;
    let (bytes, nars) = crate::model::catalogue(sc, &mut Rng::stream(seed, "init"))?;
    let mut r = Rng::stream(seed, "real-content");
    let mut out = Vec::new();
    for (&bytes, &nars) in bytes.iter().zip(&nars) {
        let nars = nars.clamp(1, u64::from(cfg.max_nars_per_closure.max(1)));
        let scaled = (bytes as f64 * cfg.bytes_scale).max(1024.0);
        let each = (scaled / nars as f64).ceil() as usize;
        let list = (0..nars as usize)
            .map(|_| Nar {
                hash: path_hash(&mut r),
                bytes: make_nar(&mut r, each),
            })
            .collect();
        out.push(list);
    }
    Ok(out)
}

/// A signed narinfo for `nar`.
fn narinfo(key: &SecretKey, nar: &Nar, closure: usize, i: usize) -> NarInfo {
    let nar_hash = NarHash::digest(&nar.bytes);
    let text = format!(
        "StorePath: /nix/store/{}-sim-c{closure}-n{i}\nURL: nar/{}.nar\nCompression: none\n\
         NarHash: {nar_hash}\nNarSize: {}\nReferences: \n",
        nar.hash,
        nar_hash.to_base32(),
        nar.bytes.len()
    );
    let mut info = NarInfo::parse(&text).expect("well-formed narinfo");
    info.sigs.push(key.sign(&info.fingerprint()));
    info
}

/// Fills a seed's data dir with every NAR of the catalogue (pinned, trusted).
fn fill_seed(dir: &Path, key: &SecretKey, cat: &[Vec<Nar>]) -> Result<u64, Error> {
    let store = Store::open(dir).map_err(real_err)?;
    let trusted = [key.public_key()];
    let mut bytes = 0;
    for (c, nars) in cat.iter().enumerate() {
        for (i, nar) in nars.iter().enumerate() {
            let info = narinfo(key, nar, c, i);
            let text = info.to_text();
            let trust = verify_narinfo(&info, &trusted).map_err(real_err)?;
            store
                .ingest_with(&info, &text, &trust, "sim", Retention::Pinned, || {
                    Ok(&nar.bytes[..])
                })
                .map_err(real_err)?;
            bytes += nar.bytes.len() as u64;
        }
    }
    Ok(bytes)
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), Error> {
    let io = |p: &Path, e: std::io::Error| Error::Io {
        path: p.display().to_string(),
        source: e,
    };
    std::fs::create_dir_all(to).map_err(|e| io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| io(from, e))? {
        let entry = entry.map_err(|e| io(from, e))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().map_err(|e| io(&src, e))?.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(|e| io(&src, e))?;
        }
    }
    Ok(())
}

/// Bytes per wall-clock second that stand for `bps` bytes per second of real uplink.
fn scaled_rate(bps: f64, cfg: &RealCfg) -> u64 {
    (bps * cfg.time_scale * cfg.bytes_scale).max(1024.0) as u64
}

/// The protocol timers divided by `time_scale` (request and query timeouts are latencies of
/// the in-process network, not protocol periods: they stay).
fn scaled_timers(sc: &Scenario) -> Timers {
    let s = sc.real.time_scale;
    Timers {
        reprovide_interval_secs: (sc.dht.reprovide_h * 3600.0 / s).max(0.05),
        provider_record_ttl_secs: (sc.dht.record_ttl_h * 3600.0 / s).max(0.1),
        dht_purge_interval_secs: (3600.0 / s).max(0.05),
        ..Timers::default()
    }
}

/// Starts one daemon on its own runtime (one worker thread, its own blocking pool), as its own
/// process would have: nodes do not share threads, so one node's blocking work cannot starve
/// another's. Answers its HTTP and P2P addresses and a receiver that fires when it has stopped.
async fn start_node(
    config: DaemonConfig,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(SocketAddr, Vec<String>, tokio::sync::oneshot::Receiver<()>), Error> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let dir = config.data_dir.clone();
    let name = format!(
        "sim-{}",
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let shutdown = async move {
        let mut stop = stop;
        let _ = stop.wait_for(|s| *s).await;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(64)
        .thread_name(name.clone())
        .enable_all()
        .build()
        .map_err(|e| Error::Io {
            path: name.clone(),
            source: e,
        })?;
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let r = rt.block_on(nix_p2p_cache::daemon::run(
                config,
                shutdown,
                move |http, p2p| {
                    let _ = tx.send((http, p2p.iter().map(|a| a.to_string()).collect::<Vec<_>>()));
                },
            ));
            if let Err(e) = r {
                eprintln!("real mode: node {} stopped: {e}", dir.display());
            }
            rt.shutdown_timeout(Duration::from_secs(5));
            let _ = done_tx.send(());
        })
        .map_err(|e| Error::Io {
            path: name,
            source: e,
        })?;
    match rx.await {
        Ok((http, p2p)) => Ok((http, p2p, done_rx)),
        Err(_) => Err(real_err("a node stopped before it listened")),
    }
}

async fn status_json(client: &reqwest::Client, http: SocketAddr) -> Option<serde_json::Value> {
    let r = client
        .get(format!("http://{http}/api/status"))
        .send()
        .await
        .ok()?;
    serde_json::from_slice(&r.bytes().await.ok()?).ok()
}

/// A counter of the node's `/metrics` (0 if absent).
async fn metric(client: &reqwest::Client, http: SocketAddr, name: &str) -> Option<u64> {
    let r = client
        .get(format!("http://{http}/metrics"))
        .send()
        .await
        .ok()?;
    let text = String::from_utf8(r.bytes().await.ok()?.to_vec()).ok()?;
    let want = format!("nix_p2p_cache_{name} ");
    Some(
        text.lines()
            .find_map(|l| l.strip_prefix(&want))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0),
    )
}

async fn status(client: &reqwest::Client, node: &NodeHandle) -> Option<NodeNumbers> {
    let v = status_json(client, node.http).await?;
    let n = |p: &str| {
        v.pointer(p)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    // With an upstream: a seed's NAR bytes served over HTTP are sent, a peer's NAR bytes from
    // its upstream received.
    let (http_up, http_down) = match (node.http_bytes, node.kind) {
        (false, _) => (0, 0),
        (true, Kind::Seed) => (
            metric(client, node.http, "nar_bytes_served_total").await?,
            0,
        ),
        (true, _) => (0, metric(client, node.http, "upstream_bytes_total").await?),
    };
    Some(NodeNumbers {
        bytes_up: n("/p2p/bytes_up") + http_up,
        bytes_down: n("/p2p/bytes_down") + http_down,
        nar_bytes: n("/store/nar_bytes"),
        remote_providers: n("/p2p/dht_records/remote_providers"),
        in_get_providers: n("/p2p/dht_calls/in_get_providers"),
        in_add_provider: n("/p2p/dht_calls/in_add_provider"),
        in_find_node: n("/p2p/dht_calls/in_find_node"),
    })
}

async fn all_status(client: &reqwest::Client, nodes: &[NodeHandle]) -> Vec<NodeNumbers> {
    use futures_util::stream::{self, StreamExt as _};
    // In order, a few at a time: one slow node does not hold up the sample.
    stream::iter(nodes)
        .map(|n| async move { status(client, n).await.unwrap_or_default() })
        .buffered(16)
        .collect()
        .await
}

/// `GET url`, a 2xx response or why not.
async fn get_ok(client: &reqwest::Client, url: &str) -> Result<reqwest::Response, String> {
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: HTTP {}", resp.status()));
    }
    Ok(resp)
}

/// Fetches one closure through `node`'s substituter, as Nix does (narinfo, then NAR, each NAR
/// checked for its NarSize); answers why it failed.
async fn fetch_closure(
    client: &reqwest::Client,
    node: SocketAddr,
    nars: &[(String, u64)],
    parallel: usize,
) -> Result<(), String> {
    use futures_util::stream::{self, StreamExt as _, TryStreamExt as _};
    stream::iter(nars.iter().cloned())
        .map(|(hash, size)| async move {
            let text = get_ok(client, &format!("http://{node}/{hash}.narinfo"))
                .await?
                .text()
                .await
                .map_err(|e| e.to_string())?;
            let url = text
                .lines()
                .find_map(|l| l.strip_prefix("URL: "))
                .ok_or_else(|| format!("{hash}.narinfo has no URL"))?
                .to_string();
            let resp = get_ok(client, &format!("http://{node}/{url}")).await?;
            let body = resp.bytes().await.map_err(|e| format!("{url}: {e}"))?;
            if body.len() as u64 != size {
                return Err(format!("{url}: {} bytes, NarSize {size}", body.len()));
            }
            Ok(())
        })
        .buffer_unordered(parallel.max(1))
        .try_collect::<()>()
        .await
}

/// Runs `sc` in real mode with `seed`; `work` holds the nodes' data dirs.
pub fn run_real(sc: &Scenario, seed: u64, work: &Path) -> Result<Outcome, Error> {
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Io {
            path: "tokio runtime".into(),
            source: e,
        })?;
    rt.block_on(run_async(sc, seed, work))
}

/// Many nodes hold many files and sockets: take the hard limit.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

async fn run_async(sc: &Scenario, seed: u64, work: &Path) -> Result<Outcome, Error> {
    let cfg = sc.real.clone();
    if !(cfg.time_scale > 0.0 && cfg.bytes_scale > 0.0 && cfg.bytes_scale <= 1.0) {
        return Err(Error::Scenario {
            path: sc.name.clone(),
            msg: "real.time_scale must be > 0 and real.bytes_scale in (0, 1]".into(),
        });
    }
    let classes = sc.resolve_classes()?;
    let counts = crate::model::class_counts(sc);
    let key = SecretKey::generate("sim-1", [7; 32]);
    let pubkey = key.public_key().to_string();

    let t0 = Instant::now();
    let cat = {
        let (sc, seed) = (sc.clone(), seed);
        tokio::task::spawn_blocking(move || catalogue(&sc, seed))
            .await
            .map_err(real_err)??
    };
    let closure_bytes: Vec<u64> = cat
        .iter()
        .map(|c| c.iter().map(|n| n.bytes.len() as u64).sum())
        .collect();
    let seed_dir = work.join("seed-template");
    let (seed_stored_bytes, cat) = {
        let (dir, key) = (seed_dir.clone(), key.clone());
        tokio::task::spawn_blocking(move || fill_seed(&dir, &key, &cat).map(|b| (b, cat)))
            .await
            .map_err(real_err)??
    };
    // What the trace asks for: (store-path hash, NarSize) per closure.
    let wanted: Vec<Vec<(String, u64)>> = cat
        .iter()
        .map(|c| {
            c.iter()
                .map(|n| (n.hash.clone(), n.bytes.len() as u64))
                .collect()
        })
        .collect();
    drop(cat);
    eprintln!(
        "real mode: catalogue of {} closures, {} NARs, {:.1} MB, ingested in {:.1} s",
        wanted.len(),
        wanted.iter().map(Vec::len).sum::<usize>(),
        seed_stored_bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );

    // Nodes: seeds first (the others bootstrap from them).
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let timers = scaled_timers(sc);
    // The model's draws: the same uplink per node as the model gives it.
    let uplinks = crate::model::Model::new(sc, seed)?.uplinks();
    let mut nodes: Vec<NodeHandle> = Vec::new();
    let mut tasks = Vec::new();
    let mut bootstrap: Vec<String> = Vec::new();
    let mut upstream: Option<String> = None;
    let started = Instant::now();
    // Seeds first (their addresses are the others' bootstrap), then the rest at once.
    let node_classes = crate::trace::node_classes(sc);
    let seeds = node_classes
        .iter()
        .take_while(|&&ci| classes[ci].cfg.kind == Kind::Seed)
        .count();
    for range in [0..seeds, seeds..node_classes.len()] {
        let mut starting = Vec::new();
        for i in range {
            let ci = node_classes[i];
            let kind = classes[ci].cfg.kind;
            let dir = work.join(format!("node-{i:04}"));
            if kind == Kind::Seed {
                copy_dir(&seed_dir, &dir)?;
            }
            let config = DaemonConfig {
                data_dir: dir,
                listen: "127.0.0.1:0".parse().expect("valid address"),
                trusted_public_keys: vec![pubkey.clone()],
                p2p_listen: vec!["/memory/0".into()],
                bootstrap: bootstrap.clone(),
                no_mdns: true,
                role: if kind == Kind::Seed {
                    Role::Seed
                } else {
                    Role::Peer
                },
                share: if kind == Kind::Ci {
                    Share::None
                } else {
                    Share::All
                },
                announce: match sc.dht.announce {
                    Announce::Roots => DaemonAnnounce::Roots,
                    Announce::All => DaemonAnnounce::All,
                },
                upload_rate_limit: Some(ByteSize(scaled_rate(uplinks[i], &cfg))),
                compact_level: Some(0),
                timers,
                upstream: match (&upstream, kind) {
                    (Some(u), Kind::Peer | Kind::Ci) => vec![u.clone()],
                    _ => Vec::new(),
                },
                p2p_transport: Transport::Memory,
                ..DaemonConfig::default()
            };
            starting.push((ci, kind, tokio::spawn(start_node(config, stop_rx.clone()))));
        }
        for (ci, kind, s) in starting {
            let (http, p2p, task) = s.await.map_err(real_err)??;
            if kind == Kind::Seed {
                bootstrap.extend(p2p.iter().cloned());
                if cfg.upstream && upstream.is_none() {
                    upstream = Some(format!("http://{http}"));
                }
            }
            tasks.push(task);
            nodes.push(NodeHandle {
                class: ci,
                kind,
                http,
                http_bytes: cfg.upstream,
            });
        }
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4)
        .build()
        .map_err(real_err)?;
    // Seeds announce everything at start: wait for their first round (bounded).
    let announce_deadline = Instant::now() + Duration::from_secs(300);
    for n in nodes.iter().filter(|n| n.kind == Kind::Seed) {
        loop {
            let v = status_json(&client, n.http).await;
            let rounds = v
                .as_ref()
                .and_then(|v| v.pointer("/p2p/announce/reprovides"))
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            if rounds > 0 || Instant::now() > announce_deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!(
        "real mode: {} nodes up and seeds announced in {:.1} s",
        nodes.len(),
        started.elapsed().as_secs_f64()
    );

    // The trace: the same as the model's for this scenario and seed.
    let sim_end = sc.sim_hours * 3600.0;
    let trace = crate::trace::wants(sc, seed)?;

    let before = all_status(&client, &nodes).await;
    let results: Arc<std::sync::Mutex<Vec<(usize, f64)>>> = Arc::default();
    let failures = Arc::new(AtomicU64::new(0));
    let kinds: Vec<Kind> = nodes.iter().map(|n| n.kind).collect();
    let sample_every = Duration::from_secs_f64(sc.sample_minutes * 60.0 / cfg.time_scale);
    let wall_end = Duration::from_secs_f64(sim_end / cfg.time_scale);
    let mut fetches = tokio::task::JoinSet::new();
    let mut samples = Vec::new();
    let mut next_sample = sample_every;
    let mut last = before.clone();
    let mut pending = trace.iter().peekable();
    let clock = Instant::now();
    loop {
        let now = clock.elapsed();
        while let Some(w) =
            pending.next_if(|w| Duration::from_secs_f64(w.at_s / cfg.time_scale) <= now)
        {
            let (client, http) = (client.clone(), nodes[w.node as usize].http);
            let nars = wanted[w.closure as usize].clone();
            let results = results.clone();
            let failures = failures.clone();
            let (node, parallel, scale) = (w.node as usize, cfg.parallel_nars, cfg.time_scale);
            fetches.spawn(async move {
                let t = Instant::now();
                match fetch_closure(&client, http, &nars, parallel).await {
                    Ok(_) => {
                        let took = t.elapsed().as_secs_f64() * scale;
                        let mut r = results.lock().unwrap_or_else(|e| e.into_inner());
                        r.push((node, took));
                    }
                    Err(e) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        eprintln!("real mode: node {node}: fetch failed: {e}");
                    }
                }
            });
        }
        while fetches.try_join_next().is_some() {}
        if now >= next_sample {
            let cur = all_status(&client, &nodes).await;
            let interval_s = sample_every.as_secs_f64() * cfg.time_scale;
            samples.push(sample_row(
                &kinds,
                [&before, &last, &cur],
                now.as_secs_f64() * cfg.time_scale,
                interval_s,
                fetches.len() as u64,
            ));
            last = cur;
            next_sample += sample_every;
            eprintln!(
                "real mode: {:.1} h: {} of {} fetches started, {} running, {} done, {} failed",
                now.as_secs_f64() * cfg.time_scale / 3600.0,
                trace.len() - pending.len(),
                trace.len(),
                fetches.len(),
                results.lock().map(|r| r.len()).unwrap_or(0),
                failures.load(Ordering::Relaxed),
            );
        }
        let done = pending.peek().is_none() && fetches.is_empty();
        if (now >= wall_end && done) || now >= wall_end + Duration::from_secs_f64(cfg.grace_secs) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let unfinished = fetches.len() as u64 + pending.count() as u64;
    fetches.abort_all();
    let elapsed = clock.elapsed();
    let after = all_status(&client, &nodes).await;
    let _ = stop_tx.send(true);
    // Every node stops at once; one that hangs is left behind after a minute.
    let stopped = tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(tasks),
    )
    .await;
    if stopped.is_err() {
        eprintln!("real mode: some nodes did not stop within 60 s");
    }

    let all = |_: usize| true;
    let seeds = |i: usize| kinds[i] == Kind::Seed;
    let servers = kinds.iter().filter(|k| **k != Kind::Ci).count().max(1) as f64;
    let non_seed = kinds.iter().filter(|k| **k != Kind::Seed).count();
    let results = std::mem::take(&mut *results.lock().unwrap_or_else(|e| e.into_inner()));
    let times = |pick: &dyn Fn(usize) -> bool| {
        let mut t: Vec<f64> = results.iter().filter(|r| pick(r.0)).map(|r| r.1).collect();
        t.sort_by(f64::total_cmp);
        t
    };
    let per_class: Vec<ClassStats> = classes
        .iter()
        .enumerate()
        .map(|(ci, c)| {
            let member = |i: usize| nodes[i].class == ci;
            let t = times(&member);
            ClassStats {
                class: c.cfg.name.clone(),
                nodes: u64::from(counts[ci]),
                fresh_fetches: t.len() as u64,
                fresh_p50_s: percentile(&t, 0.5),
                fresh_p95_s: percentile(&t, 0.95),
                fresh_p99_s: percentile(&t, 0.99),
                upgrade_fetches: 0,
                upgrade_p50_s: None,
                upgrade_p95_s: None,
                upgrade_p99_s: None,
                sent_bytes: delta(&before, &after, |n| n.bytes_up, member),
                received_bytes: delta(&before, &after, |n| n.bytes_down, member),
            }
        })
        .collect();
    let mean_records = if samples.is_empty() {
        0.0
    } else {
        samples
            .iter()
            .map(|s| s.dht_records_per_server)
            .sum::<f64>()
            / samples.len() as f64
    };
    let received = delta(&before, &after, |n| n.bytes_down, all);
    let seed_egress = delta(&before, &after, |n| n.bytes_up, seeds);
    let fetched: std::collections::BTreeSet<usize> =
        trace.iter().map(|w| w.closure as usize).collect();
    let stored: u64 = (0..kinds.len())
        .filter(|&i| !seeds(i))
        .map(|i| after[i].nar_bytes)
        .sum();
    Ok(Outcome {
        mode: "real",
        name: sc.name.clone(),
        nodes: non_seed as u64,
        seeds: (kinds.len() - non_seed) as u64,
        seed,
        sim_seconds: elapsed.as_secs_f64() * cfg.time_scale,
        delivered_bytes: received,
        sent_bytes: delta(&before, &after, |n| n.bytes_up, all),
        seed_egress_bytes: seed_egress,
        // Real mode does not split egress by closure: "popular" is every closure.
        popular_delivered_bytes: received,
        popular_seed_bytes: seed_egress,
        fresh_times: times(&all),
        upgrade_times: Vec::new(),
        fresh_completions: Vec::new(),
        classes: per_class,
        samples,
        lookup_msgs: delta(&before, &after, |n| n.in_get_providers, all),
        announce_msgs: delta(&before, &after, |n| n.in_add_provider + n.in_find_node, all),
        mean_online_servers: servers,
        mean_records_per_server: mean_records,
        stored_bytes_per_node: stored as f64 / non_seed.max(1) as f64,
        seed_lower_bound_bytes: fetched.iter().map(|&c| closure_bytes[c]).sum(),
        seed_stored_bytes,
        serve_violations: 0,
        capacity_violations: 0,
        capacity: (0.0, 0.0, 0.0),
        closure_bytes,
        probe_survival: None,
        probe_holder_online: None,
        dial_failures: failures.load(Ordering::Relaxed),
        events: trace.len() as u64,
        unfinished_fetches: unfinished,
    })
}

/// Sum over the nodes `which` picks of how much `pick` grew from `then` to `now`.
fn delta(
    then: &[NodeNumbers],
    now: &[NodeNumbers],
    pick: fn(&NodeNumbers) -> u64,
    which: impl Fn(usize) -> bool,
) -> u64 {
    (0..now.len())
        .filter(|&i| which(i))
        .map(|i| pick(&now[i]).saturating_sub(pick(&then[i])))
        .sum()
}

/// One time-series row from the nodes' numbers at the start, the last sample and now.
fn sample_row(
    kinds: &[Kind],
    [start, last, now]: [&[NodeNumbers]; 3],
    t_s: f64,
    interval_s: f64,
    active: u64,
) -> SampleRow {
    let all = |_: usize| true;
    let seeds = |i: usize| kinds[i] == Kind::Seed;
    let servers = kinds.iter().filter(|k| **k != Kind::Ci).count().max(1) as f64;
    let non_seed = kinds.iter().filter(|k| **k != Kind::Seed).count().max(1) as f64;
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let seed_up = delta(last, now, |n| n.bytes_up, seeds);
    let records: u64 = (0..kinds.len())
        .filter(|&i| kinds[i] != Kind::Ci)
        .map(|i| now[i].remote_providers)
        .sum();
    let stored: u64 = (0..kinds.len())
        .filter(|&i| !seeds(i))
        .map(|i| now[i].nar_bytes)
        .sum();
    SampleRow {
        t_h: t_s / 3600.0,
        online_nodes: non_seed as u64,
        online_servers: servers as u64,
        active_fetches: active,
        // The same measure as the summary's: what the nodes received.
        delivered_bytes: delta(last, now, |n| n.bytes_down, all),
        seed_bytes: seed_up,
        seed_share: ratio(seed_up, delta(last, now, |n| n.bytes_up, all)),
        seed_share_cum: ratio(
            delta(start, now, |n| n.bytes_up, seeds),
            delta(start, now, |n| n.bytes_up, all),
        ),
        dht_records_per_server: records as f64 / servers,
        lookup_msgs_per_server_per_s: delta(last, now, |n| n.in_get_providers, all) as f64
            / servers
            / interval_s,
        announce_msgs_per_server_per_s: delta(
            last,
            now,
            |n| n.in_add_provider + n.in_find_node,
            all,
        ) as f64
            / servers
            / interval_s,
        stored_bytes_per_node: stored as f64 / non_seed,
    }
}

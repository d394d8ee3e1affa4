//! `run`: the daemon as a library call (tests start it with port 0 and a temp dir).

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;

use crate::announce::Announcer;
use crate::config::{ConfigError, DaemonConfig, Role, Share};
use crate::core::signing::{PublicKey, SigningError, CACHE_NIXOS_ORG_KEY};
use crate::fetch::Peers;
use crate::http::{self, HttpState};
use crate::metrics::history::SAMPLE_INTERVAL;
use crate::metrics::Metrics;
use crate::net::{self, BehaviourConfig, NetConfig, StoreResponder};
use crate::quota::Quota;
use crate::resolve::{Resolver, Source};
use crate::store::{Store, StoreError};
use crate::upstream::{Upstream, UpstreamError};

/// How long a narinfo miss is answered from memory (peers and upstreams can gain the path).
const NARINFO_NEGATIVE_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// Served narinfos (and misses) kept in memory: ~1 KiB each at most.
const NARINFO_CACHE_ENTRIES: usize = 16 * 1024;

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("bad trusted public key {key:?}: {source}")]
    Key {
        key: String,
        #[source]
        source: SigningError,
    },
    #[error("opening the store: {0}")]
    Store(#[from] Box<StoreError>),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("P2P: {0}")]
    P2p(String),
    #[error("serving HTTP: {0}")]
    Serve(#[source] std::io::Error),
}

/// The trusted keys: cache.nixos.org's plus the configured ones.
pub fn trusted_keys(extra: &[String]) -> Result<Vec<PublicKey>, DaemonError> {
    std::iter::once(CACHE_NIXOS_ORG_KEY)
        .chain(extra.iter().map(String::as_str))
        .map(|k| {
            PublicKey::parse(k).map_err(|source| DaemonError::Key {
                key: k.to_string(),
                source,
            })
        })
        .collect()
}

/// The node key in `<data-dir>/node.key` (libp2p protobuf encoding), generated once (0600).
pub fn node_key(data_dir: &Path) -> Result<Keypair, DaemonError> {
    let path = data_dir.join("node.key");
    let err = |e: &dyn std::fmt::Display| DaemonError::P2p(format!("{}: {e}", path.display()));
    match std::fs::read(&path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| err(&e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| err(&e))?;
            std::fs::create_dir_all(data_dir).map_err(|e| err(&e))?;
            let tmp = data_dir.join("node.key.tmp");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| err(&e))?;
            f.write_all(&bytes).map_err(|e| err(&e))?;
            f.sync_all().map_err(|e| err(&e))?;
            std::fs::rename(&tmp, &path).map_err(|e| err(&e))?;
            Ok(key)
        }
        Err(e) => Err(err(&e)),
    }
}

/// Starts the P2P node: listens, dials the bootstrap peers, then (in the background) walks
/// the DHT and announces the store's trusted NARs. Returns the peers handle and the listen
/// addresses with `/p2p/<peer id>`.
async fn start_p2p(
    config: &DaemonConfig,
    store: &Arc<Store>,
    trusted: Vec<PublicKey>,
    metrics: Arc<Metrics>,
) -> Result<(Arc<Peers>, Option<Arc<Announcer>>, Vec<Multiaddr>), DaemonError> {
    let p2p = |e: &dyn std::fmt::Display| DaemonError::P2p(e.to_string());
    let parse = |s: &String| {
        s.parse::<Multiaddr>()
            .map_err(|e| DaemonError::P2p(format!("bad multiaddr {s:?}: {e}")))
    };
    let listen = config
        .p2p_listen
        .iter()
        .map(parse)
        .collect::<Result<Vec<_>, _>>()?;
    let bootstrap = config
        .bootstrap
        .iter()
        .map(parse)
        .collect::<Result<Vec<_>, _>>()?;
    let dir = config.data_dir.clone();
    let key = tokio::task::spawn_blocking(move || node_key(&dir))
        .await
        .map_err(|e| p2p(&e))??;
    let net_config = NetConfig {
        transport: config.p2p_transport,
        behaviour: BehaviourConfig {
            mdns: !config.no_mdns,
            timers: config.timers,
        },
        share: config.share,
        upload_rate_limit: config.upload_rate_limit.map(u64::from),
    };
    let responder = Arc::new(StoreResponder::new(store.clone()));
    let dht = store
        .dht()
        .map_err(|e| DaemonError::Store(Box::new(e)))?
        .clone();
    let dht_store = dht.clone();
    let (client, event_loop) =
        net::new_with_store(key, &net_config, responder, Some(dht)).map_err(|e| p2p(&e))?;
    tokio::spawn(event_loop.run());
    let me = client.local_peer_id();
    // Every address peers can dial (a 0.0.0.0 listener: each interface's), loopback last.
    let interfaces = net::addrs::interface_addresses();
    let mut addrs = Vec::new();
    for a in listen {
        let bound = client.listen(a.clone()).await.map_err(|e| p2p(&e))?;
        addrs.extend(net::addrs::reachable_at(&a, &bound, &interfaces));
    }
    net::addrs::sort_loopback_last(&mut addrs);
    for a in &mut addrs {
        a.push(Protocol::P2p(me));
    }
    for b in &bootstrap {
        // A dead bootstrap peer is not fatal: the DHT and mDNS may still find others.
        match client.dial(b.clone()).await {
            Ok(peer) => tracing::info!(%peer, "connected to bootstrap peer"),
            Err(e) => tracing::warn!(addr = %b, error = %e, "bootstrap peer unreachable"),
        }
    }
    if !bootstrap.is_empty() {
        tokio::spawn(redial(client.clone(), bootstrap));
    }
    // A node that no longer serves everyone (restarted with `share` lan or none) stops
    // providing what it announced: its DHT server no longer names itself, nothing is
    // reprovided, and the records other nodes hold expire within their lifetime.
    if config.share != Share::All {
        let dht = dht_store.clone();
        match tokio::task::spawn_blocking(move || dht.dht_unprovide_all()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(
                keys = n,
                share = ?config.share,
                "no longer providing what this node announced when it shared with everyone"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, "withdrawing provided DHT keys"),
            Err(e) => tracing::warn!(error = %e, "withdrawing provided DHT keys"),
        }
    }
    // Only a node that serves everyone says so in the DHT; LAN peers find a `lan` node by mDNS.
    let announcer = (config.share == Share::All).then(|| {
        Arc::new(
            Announcer::new(client.clone(), store.clone(), config.announce).with_intervals(
                config.timers.reprovide_interval(),
                config.timers.dht_purge_interval(),
            ),
        )
    });
    let peers = Arc::new(Peers::new(client, trusted, metrics));
    // Connected peers' path summaries, so narinfos are asked only of peers that may hold them.
    let weak = Arc::downgrade(&peers);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::fetch::SUMMARY_REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(p) = weak.upgrade() else {
                return;
            };
            p.refresh_summaries().await;
        }
    });
    let (p, a2) = (peers.clone(), announcer.clone());
    tokio::spawn(async move {
        if let Err(e) = p.client().bootstrap().await {
            tracing::debug!(error = %e, "DHT bootstrap");
        }
        if let Some(a) = a2 {
            if let Err(e) = a.run().await {
                tracing::warn!(error = %e, "announcer stopped");
            }
        }
    });
    Ok((peers, announcer, addrs))
}

/// Samples the counters for the dashboard's last hour (the first at once, then every
/// [`SAMPLE_INTERVAL`]) until the daemon's metrics are dropped.
fn start_sampler(metrics: &Arc<Metrics>, peers: Option<&Arc<Peers>>) {
    let (m, p) = (Arc::downgrade(metrics), peers.map(Arc::downgrade));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let net = match p.as_ref().and_then(std::sync::Weak::upgrade) {
                Some(p) => Some(p.gauges().await),
                None => None,
            };
            let Some(m) = m.upgrade() else {
                return;
            };
            m.sample(net.as_ref());
        }
    });
}

/// How often unconnected bootstrap peers are dialled again.
const REDIAL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Keeps dialling bootstrap peers that are not connected (one may start after us, or restart),
/// then refreshes the DHT routing table through them. Ends when the network stops.
async fn redial(client: net::Client, bootstrap: Vec<Multiaddr>) {
    let mut tick = tokio::time::interval(REDIAL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first dial was made at start
    loop {
        tick.tick().await;
        let Ok(connected) = client.connected_peers().await else {
            return;
        };
        let mut dialled = false;
        for b in &bootstrap {
            let peer = b.iter().find_map(|p| match p {
                Protocol::P2p(id) => Some(id),
                _ => None,
            });
            if peer.is_some_and(|p| connected.contains(&p)) {
                continue;
            }
            match client.dial(b.clone()).await {
                Ok(peer) => {
                    tracing::info!(%peer, "reconnected to bootstrap peer");
                    dialled = true;
                }
                Err(e) => tracing::debug!(addr = %b, error = %e, "bootstrap peer unreachable"),
            }
        }
        if dialled {
            if let Err(e) = client.bootstrap().await {
                tracing::debug!(error = %e, "DHT bootstrap");
            }
        }
    }
}

/// Runs the daemon until `shutdown` resolves. `on_listen` gets the bound HTTP address and the
/// P2P listen addresses (with `/p2p/<peer id>`; empty when P2P is off).
pub async fn run(
    config: DaemonConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_listen: impl FnOnce(SocketAddr, &[Multiaddr]),
) -> Result<(), DaemonError> {
    let trusted = trusted_keys(&config.trusted_public_keys)?;
    let upload_token = config.upload_token()?;
    let dir = config.data_dir.clone();
    let opts = config.storage_options();
    let store = tokio::task::spawn_blocking(move || {
        Store::open_with_storage(&dir, crate::store::DEFAULT_ZSTD_LEVEL, &opts)
    })
    .await
    .map_err(|e| DaemonError::Serve(std::io::Error::other(e)))?
    .map_err(Box::new)?;
    // Trust follows the keys this daemon runs with (a path imported before its key was
    // configured is announced and shared now).
    let store = {
        let keys = trusted.clone();
        tokio::task::spawn_blocking(move || store.retrust(&keys).map(|r| (store, r)))
            .await
            .map_err(|e| DaemonError::Serve(std::io::Error::other(e)))?
            .map(|(store, r)| {
                if r.now_trusted + r.now_untrusted > 0 {
                    tracing::info!(
                        now_trusted = r.now_trusted,
                        now_untrusted = r.now_untrusted,
                        "trusted keys changed: trust of stored paths checked again"
                    );
                }
                store
            })
            .map_err(Box::new)?
    };
    let metrics = Arc::new(Metrics::default());
    // One source per upstream, in order: a NAR one of them failed (after exposing bytes) is
    // then fetched from the next.
    let upstreams = Upstream::all(&config.upstream, trusted.clone(), metrics.clone())?;
    if !upstreams.is_empty() {
        tracing::info!(upstreams = ?config.upstream, "upstream caches");
    }
    let store = Arc::new(store);
    let (peers, announcer, p2p_addrs) = if config.p2p_listen.is_empty() {
        (None, None, Vec::new())
    } else {
        let (p, an, a) = start_p2p(&config, &store, trusted.clone(), metrics.clone()).await?;
        (Some(p), an, a)
    };
    let narinfo_cache = Arc::new(http::NarinfoCache::new(
        NARINFO_CACHE_ENTRIES,
        NARINFO_NEGATIVE_TTL,
    ));
    let mut sources: Vec<Arc<dyn Source>> = Vec::new();
    if let Some(p) = &peers {
        sources.push(p.clone());
    }
    for u in upstreams {
        sources.push(u);
    }
    let resolver = Arc::new(Resolver::new(store.clone(), sources, metrics.clone()));
    // Background compaction stops when shutdown begins.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(level) = config.effective_compact_level() {
        let min_age = std::time::Duration::from_secs(config.compact_min_age_secs);
        crate::compactor::start(store.clone(), level, min_age, stop_rx.clone());
    }
    if store.has_remote_storage() {
        crate::uploader::start(store.clone(), stop_rx);
    }
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let quota = match (config.role, config.max_cache_size) {
        (Role::Peer, Some(max)) => {
            // Evicted paths must not be announced from the served-narinfo cache any more.
            let cache = narinfo_cache.clone();
            let on_evict = Box::new(move || cache.clear());
            Some(Quota::start(store.clone(), max.into(), on_evict))
        }
        _ => None, // a seed never evicts (validate refuses a quota on one)
    };
    // The one "NAR stored" event: fetched or uploaded NARs are announced (trusted ones) and
    // kept under the quota.
    let mut stored = resolver.subscribe();
    let (an, q) = (announcer.clone(), quota.clone());
    tokio::spawn(async move {
        loop {
            match stored.recv().await {
                Ok(e) => {
                    if let (true, Some(a)) = (e.trusted, &an) {
                        a.announce(e.nar_hash);
                    }
                    if let Some(q) = &q {
                        q.poke();
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(skipped = n, "NAR stored events skipped");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    start_sampler(&metrics, peers.as_ref());
    let staging = config.data_dir.join("uploads");
    let st = staging.clone();
    match tokio::task::spawn_blocking(move || http::sweep_staging(&st)).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::info!(files = n, "removed unfinished or abandoned uploads"),
        Ok(Err(e)) => tracing::warn!(error = %e, "sweeping the upload staging dir"),
        Err(e) => tracing::warn!(error = %e, "sweeping the upload staging dir"),
    }
    let store_for_stop = store.clone();
    let trusted_names = trusted.iter().map(ToString::to_string).collect();
    let state = Arc::new(HttpState {
        store,
        metrics,
        upload_token,
        trusted,
        staging,
        max_upload: config.max_upload_size.into(),
        narinfo_cache,
        node: http::NodeInfo {
            version: env!("CARGO_PKG_VERSION"),
            role: config.role,
            share: config.share,
            announce: config.announce,
            max_cache_size: config.max_cache_size.map(u64::from),
            upload_rate_limit: config.upload_rate_limit.map(u64::from),
            upstreams: config.upstream.clone(),
            peer_id: peers
                .as_ref()
                .map(|p| p.client().local_peer_id().to_string()),
            p2p_addresses: p2p_addrs.iter().map(|a| a.to_string()).collect(),
            trusted_public_keys: trusted_names,
            data_dir: config.data_dir.clone(),
        },
        started: std::time::Instant::now(),
        announcer,
        quota,
        resolver,
        peers,
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(DaemonError::Serve)?;
    let listener = http::listener::BoundedListener::new(
        listener,
        http::listener::max_connections(),
        http::listener::idle_timeout(),
    );
    on_listen(addr, &p2p_addrs);
    tracing::info!(%addr, data_dir = %config.data_dir.display(), "serving");
    axum::serve(listener, http::router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(DaemonError::Serve)?;
    if store_for_stop.has_remote_storage() {
        // The storage alone then holds every acknowledged NAR.
        let s = store_for_stop.clone();
        match tokio::task::spawn_blocking(move || s.seal_and_upload()).await {
            Ok(Ok(r)) => tracing::info!(
                packs = r.packs,
                bytes = r.bytes,
                "open pack sealed and uploaded"
            ),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "sealing the open pack at stop failed (uploaded at the next start)")
            }
            Err(e) => tracing::warn!(error = %e, "sealing the open pack at stop failed"),
        }
    }
    tracing::info!("shut down");
    Ok(())
}

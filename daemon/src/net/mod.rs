//! The P2P layer (design §4): libp2p swarm, DHT, and the request-response exchange.
//!
//! Owns the `Swarm`. [`EventLoop`] is the only code that touches it: one task runs one
//! `select!` over swarm events, a bounded command channel from [`Client`]s and the answers of
//! inbound requests. [`Client`] is a cloneable handle; each method sends a [`Command`] with a
//! `oneshot` reply and waits. Inbound exchange requests are answered by a [`Responder`] (the
//! store-backed one is [`StoreResponder`]) on their own tasks, bounded by a semaphore, so a slow
//! store never stalls the swarm; kad's record store runs on the swarm task, on the store's DHT
//! database (`dht.redb`), which no ingest or eviction writes. This module does not decide
//! where a NAR comes from (that is `fetch`) and does not check what peers send: callers check
//! every block against its id and every NAR against its NarHash.

pub mod addrs;
pub mod behaviour;
pub mod codec;
pub mod rate;
pub mod record_store;
pub mod responder;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::core::transport::ListenerId;
use libp2p::futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::kad::{self, QueryId, QueryResult, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{identify, mdns, noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm};
use nix_p2p_cache_proto::v1 as pb;
use nix_p2p_cache_proto::KAD_PROTOCOL;
use prost::Message as _;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::config::Share;
use crate::core::NarKey;
use crate::store::dht::DhtStore;
pub use behaviour::{Behaviour, BehaviourConfig, BehaviourEvent};
pub use rate::RateLimiter;
pub use responder::{Responder, StoreResponder};

/// Commands queued from clients to the event loop.
pub const COMMAND_QUEUE: usize = 64;
/// Inbound exchange requests being answered at once, over all peers.
pub const MAX_INBOUND_REQUESTS: usize = 64;
/// Connections close after this long without a stream.
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// Disconnected peers whose counters are kept (for `peers`); older ones are forgotten.
pub const REMEMBERED_PEERS: usize = 256;

/// Totals over all peers, readable without a round trip to the event loop.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Encoded bytes of the responses sent to peers.
    pub bytes_up: AtomicU64,
    /// Encoded bytes of the responses received from peers.
    pub bytes_down: AtomicU64,
    /// Inbound requests answered.
    pub requests_in: AtomicU64,
    /// Inbound requests answered empty because of `--share` (or refused: too many, banned).
    pub requests_refused: AtomicU64,
    /// Peers disconnected and banned for misbehaving.
    pub peers_banned: AtomicU64,
    /// DHT calls by type (for the simulator's load figures and `/metrics`).
    pub dht: DhtCalls,
}

/// DHT calls this node made (queries it started) and answered (requests from other nodes).
#[derive(Debug, Default)]
pub struct DhtCalls {
    pub out_get_providers: AtomicU64,
    pub out_start_providing: AtomicU64,
    pub out_bootstrap: AtomicU64,
    pub in_find_node: AtomicU64,
    pub in_get_providers: AtomicU64,
    pub in_add_provider: AtomicU64,
    /// Value-record gets and puts (the daemon uses none; other implementations may).
    pub in_other: AtomicU64,
}

/// A snapshot of [`DhtCalls`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DhtCallCounts {
    pub out_get_providers: u64,
    pub out_start_providing: u64,
    pub out_bootstrap: u64,
    pub in_find_node: u64,
    pub in_get_providers: u64,
    pub in_add_provider: u64,
    pub in_other: u64,
}

impl DhtCalls {
    pub fn snapshot(&self) -> DhtCallCounts {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DhtCallCounts {
            out_get_providers: g(&self.out_get_providers),
            out_start_providing: g(&self.out_start_providing),
            out_bootstrap: g(&self.out_bootstrap),
            in_find_node: g(&self.in_find_node),
            in_get_providers: g(&self.in_get_providers),
            in_add_provider: g(&self.in_add_provider),
            in_other: g(&self.in_other),
        }
    }
}

impl DhtCallCounts {
    /// `(direction, type, count)` for each counter, as `/metrics` labels them.
    pub fn labelled(&self) -> [(&'static str, &'static str, u64); 7] {
        [
            ("out", "get_providers", self.out_get_providers),
            ("out", "add_provider", self.out_start_providing),
            ("out", "bootstrap", self.out_bootstrap),
            ("in", "find_node", self.in_find_node),
            ("in", "get_providers", self.in_get_providers),
            ("in", "add_provider", self.in_add_provider),
            ("in", "other", self.in_other),
        ]
    }
}

impl NetStats {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// One peer as `nix-p2p-cache peers` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerInfo {
    pub peer_id: String,
    pub connected: bool,
    /// Remote address of the (last) connection.
    pub address: Option<String>,
    /// Discovered with mDNS on the LAN.
    pub lan: bool,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub requests_in: u64,
    pub requests_out: u64,
    pub failures: u64,
    /// Seconds left of a ban (misbehaviour), if banned.
    pub banned_secs: Option<u64>,
}

#[derive(Debug, Default)]
struct PeerEntry {
    connected: bool,
    address: Option<Multiaddr>,
    bytes_up: u64,
    bytes_down: u64,
    requests_in: u64,
    requests_out: u64,
    failures: u64,
    last_seen: Option<Instant>,
}

/// Errors of the network layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetError {
    #[error("the network event loop has stopped")]
    Stopped,
    #[error("address {0} does not end in /p2p/<peer id>")]
    NoPeerId(Multiaddr),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("dialing {peer}: {reason}")]
    Dial { peer: PeerId, reason: String },
    #[error("request to {peer}: {reason}")]
    Request { peer: PeerId, reason: String },
    /// The peer could not be dialled (gone, or a stale address).
    #[error("{peer} is unreachable: {reason}")]
    Unreachable { peer: PeerId, reason: String },
    #[error("DHT: {0}")]
    Kad(String),
    #[error("transport setup: {0}")]
    Setup(String),
}

type Reply<T> = oneshot::Sender<Result<T, NetError>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a [`Client`] asks the event loop to do.
#[derive(Debug)]
pub enum Command {
    Listen {
        addr: Multiaddr,
        reply: Reply<Multiaddr>,
    },
    Dial {
        addr: Multiaddr,
        reply: Reply<PeerId>,
    },
    Bootstrap {
        reply: Reply<()>,
    },
    StartProviding {
        key: RecordKey,
        reply: Reply<()>,
    },
    GetProviders {
        key: RecordKey,
        reply: Reply<HashSet<PeerId>>,
    },
    Request {
        peer: PeerId,
        request: pb::Request,
        reply: Reply<pb::Response>,
    },
    ConnectedPeers {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    /// Closes every connection to `peer` and refuses it for `ban`.
    Disconnect {
        peer: PeerId,
        ban: Duration,
    },
    /// Every known peer (connected, or recently seen) with its counters.
    PeerInfos {
        reply: oneshot::Sender<Vec<PeerInfo>>,
    },
    /// Connected peers discovered with mDNS.
    LanPeers {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
}

/// A cloneable handle on the event loop.
#[derive(Debug, Clone)]
pub struct Client {
    peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    stats: Arc<NetStats>,
}

impl Client {
    pub fn local_peer_id(&self) -> PeerId {
        self.peer_id
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// Starts listening; answers with the first address the listener reports (with port 0
    /// resolved), without the `/p2p/` suffix.
    pub async fn listen(&self, addr: Multiaddr) -> Result<Multiaddr, NetError> {
        self.call(|reply| Command::Listen { addr, reply }).await
    }

    /// Connects to `addr`, which must end in `/p2p/<peer id>`; the address is also added to
    /// the DHT routing table (a bootstrap node).
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, NetError> {
        self.call(|reply| Command::Dial { addr, reply }).await
    }

    /// Walks the DHT towards our own id to fill the routing table.
    pub async fn bootstrap(&self) -> Result<(), NetError> {
        self.call(|reply| Command::Bootstrap { reply }).await
    }

    /// Announces that this node serves the NAR `key` (its multihash bytes are the DHT key).
    pub async fn start_providing(&self, key: NarKey) -> Result<(), NetError> {
        self.start_providing_key(record_store::nar_record_key(&key))
            .await
    }

    /// Peers the DHT names as providers of the NAR `key` (may include ourselves).
    pub async fn get_providers(&self, key: NarKey) -> Result<HashSet<PeerId>, NetError> {
        self.get_providers_key(record_store::nar_record_key(&key))
            .await
    }

    /// Announces that this node serves DHT key `key` (a NAR's or a chunk's, see
    /// [`record_store::nar_record_key`], [`record_store::chunk_record_key`]).
    pub async fn start_providing_key(&self, key: RecordKey) -> Result<(), NetError> {
        self.call(|reply| Command::StartProviding { key, reply })
            .await
    }

    /// Peers the DHT names as providers of DHT key `key` (may include ourselves).
    pub async fn get_providers_key(&self, key: RecordKey) -> Result<HashSet<PeerId>, NetError> {
        self.call(|reply| Command::GetProviders { key, reply })
            .await
    }

    /// Sends one exchange request and waits for its response (dialing the peer if its address
    /// is known).
    pub async fn request(
        &self,
        peer: PeerId,
        request: pb::Request,
    ) -> Result<pb::Response, NetError> {
        self.call(|reply| Command::Request {
            peer,
            request,
            reply,
        })
        .await
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, NetError> {
        self.ask(|reply| Command::ConnectedPeers { reply }).await
    }

    /// Connected peers found by mDNS (the LAN), which fetches try first.
    pub async fn lan_peers(&self) -> Result<Vec<PeerId>, NetError> {
        self.ask(|reply| Command::LanPeers { reply }).await
    }

    /// Known peers with their counters.
    pub async fn peer_infos(&self) -> Result<Vec<PeerInfo>, NetError> {
        self.ask(|reply| Command::PeerInfos { reply }).await
    }

    /// Disconnects a misbehaving peer and refuses it (inbound and outbound) for `ban`.
    pub async fn disconnect(&self, peer: PeerId, ban: Duration) -> Result<(), NetError> {
        self.commands
            .send(Command::Disconnect { peer, ban })
            .await
            .map_err(|_| NetError::Stopped)
    }

    pub fn stats(&self) -> &Arc<NetStats> {
        &self.stats
    }
}

/// A loopback, private (RFC 1918 / ULA) or link-local IP address, or the memory transport.
fn is_local(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback() || ip.is_private() || ip.is_link_local(),
        Some(Protocol::Ip6(ip)) => {
            ip.is_loopback()
                || (ip.segments()[0] & 0xfe00) == 0xfc00
                || (ip.segments()[0] & 0xffc0) == 0xfe80
        }
        Some(Protocol::Memory(_)) => true,
        _ => false,
    }
}

/// Which transport a node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// TCP + noise + yamux (the real network).
    #[default]
    Tcp,
    /// libp2p's in-process memory transport + noise + yamux (tests).
    Memory,
}

/// Options of a node.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub transport: Transport,
    pub behaviour: BehaviourConfig,
    /// Which peers inbound requests are answered for.
    pub share: Share,
    /// Bytes per second sent to all peers together; `None`: unlimited.
    pub upload_rate_limit: Option<u64>,
}

/// Builds a swarm and its event loop, DHT records in memory (see [`new_with_store`]).
pub fn new(
    key: Keypair,
    config: &NetConfig,
    responder: Arc<dyn Responder>,
) -> Result<(Client, EventLoop), NetError> {
    new_with_store(key, config, responder, None)
}

/// Builds a swarm and its event loop. Run [`EventLoop::run`] on a task; use the [`Client`].
/// With a `dht` store ([`Store::dht`](crate::store::Store::dht)), DHT records (provided keys,
/// other peers' provider records) persist in it; the swarm holds only that, never the `Store`.
pub fn new_with_store(
    key: Keypair,
    config: &NetConfig,
    responder: Arc<dyn Responder>,
    dht: Option<Arc<DhtStore>>,
) -> Result<(Client, EventLoop), NetError> {
    let setup = |e: &dyn std::fmt::Display| NetError::Setup(e.to_string());
    let peer_id = key.public().to_peer_id();
    let builder = libp2p::SwarmBuilder::with_existing_identity(key).with_tokio();
    let behaviour_config = config.behaviour.clone();
    let make_behaviour = move |key: &Keypair| {
        Behaviour::new(key, &behaviour_config, dht).map_err(|e| Box::new(e) as BoxError)
    };
    let swarm_config =
        |c: libp2p::swarm::Config| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT);
    let swarm = match config.transport {
        Transport::Tcp => builder
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| setup(&e))?
            .with_behaviour(make_behaviour)
            .map_err(|e| setup(&e))?
            .with_swarm_config(swarm_config)
            .build(),
        Transport::Memory => builder
            .with_other_transport(|key| {
                use libp2p::core::upgrade::Version;
                use libp2p::Transport as _;
                Ok::<_, BoxError>(
                    libp2p::core::transport::MemoryTransport::default()
                        .upgrade(Version::V1)
                        .authenticate(noise::Config::new(key)?)
                        .multiplex(yamux::Config::default())
                        .boxed(),
                )
            })
            .map_err(|e| setup(&e))?
            .with_behaviour(make_behaviour)
            .map_err(|e| setup(&e))?
            .with_swarm_config(swarm_config)
            .build(),
    };
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (answers_tx, answers_rx) = mpsc::channel(MAX_INBOUND_REQUESTS);
    let stats = Arc::new(NetStats::default());
    let client = Client {
        peer_id,
        commands: tx,
        stats: stats.clone(),
    };
    let event_loop = EventLoop {
        swarm,
        share: config.share,
        limiter: config
            .upload_rate_limit
            .map(|r| Arc::new(RateLimiter::new(r))),
        stats,
        lan: HashSet::new(),
        banned: HashMap::new(),
        peers: HashMap::new(),
        commands: rx,
        responder,
        inbound: Arc::new(Semaphore::new(MAX_INBOUND_REQUESTS)),
        answers_tx,
        answers_rx,
        pending_listen: HashMap::new(),
        pending_dial: HashMap::new(),
        pending_bootstrap: HashMap::new(),
        pending_start_providing: HashMap::new(),
        pending_get_providers: HashMap::new(),
        pending_requests: HashMap::new(),
    };
    Ok((client, event_loop))
}

type Answer = (PeerId, ResponseChannel<pb::Response>, pb::Response);

/// Owns the swarm; see the module docs.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    share: Share,
    limiter: Option<Arc<RateLimiter>>,
    stats: Arc<NetStats>,
    /// Peers discovered with mDNS (and not expired).
    lan: HashSet<PeerId>,
    /// Misbehaving peers and when their ban ends.
    banned: HashMap<PeerId, Instant>,
    /// Counters per peer: connected ones and up to [`REMEMBERED_PEERS`] others.
    peers: HashMap<PeerId, PeerEntry>,
    commands: mpsc::Receiver<Command>,
    responder: Arc<dyn Responder>,
    inbound: Arc<Semaphore>,
    answers_tx: mpsc::Sender<Answer>,
    answers_rx: mpsc::Receiver<Answer>,
    pending_listen: HashMap<ListenerId, (Multiaddr, Reply<Multiaddr>)>,
    pending_dial: HashMap<PeerId, Vec<Reply<PeerId>>>,
    pending_bootstrap: HashMap<QueryId, Reply<()>>,
    pending_start_providing: HashMap<QueryId, Reply<()>>,
    pending_get_providers: HashMap<QueryId, (HashSet<PeerId>, Reply<HashSet<PeerId>>)>,
    pending_requests: HashMap<OutboundRequestId, (PeerId, Reply<pb::Response>)>,
}

impl EventLoop {
    /// Runs until every [`Client`] is dropped.
    pub async fn run(mut self) {
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                Some((peer, channel, response)) = self.answers_rx.recv() => {
                    let len = response.encoded_len() as u64;
                    if self.swarm.behaviour_mut().exchange.send_response(channel, response).is_err() {
                        tracing::debug!(%peer, "inbound request: peer gone before the answer");
                    } else {
                        NetStats::add(&self.stats.bytes_up, len);
                        self.peers.entry(peer).or_default().bytes_up += len;
                    }
                }
            }
        }
        tracing::debug!("network event loop stopped");
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Listen { addr, reply } => match self.swarm.listen_on(addr.clone()) {
                Ok(id) => {
                    self.pending_listen.insert(id, (addr, reply));
                }
                Err(e) => {
                    let _ = reply.send(Err(NetError::Listen {
                        addr,
                        reason: crate::core::error_text(&e),
                    }));
                }
            },
            Command::Dial { addr, reply } => {
                let Some(Protocol::P2p(peer)) = addr.iter().last() else {
                    let _ = reply.send(Err(NetError::NoPeerId(addr)));
                    return;
                };
                let transport_addr: Multiaddr = addr
                    .iter()
                    .filter(|p| !matches!(p, Protocol::P2p(_)))
                    .collect();
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer, transport_addr);
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(peer));
                    return;
                }
                if self.is_banned(&peer) {
                    let _ = reply.send(Err(NetError::Dial {
                        peer,
                        reason: "banned for misbehaving".into(),
                    }));
                    return;
                }
                match self.swarm.dial(addr) {
                    Ok(()) => self.pending_dial.entry(peer).or_default().push(reply),
                    Err(e) => {
                        let _ = reply.send(Err(NetError::Dial {
                            peer,
                            reason: crate::core::error_text(&e),
                        }));
                    }
                }
            }
            Command::Bootstrap { reply } => match self.swarm.behaviour_mut().kad.bootstrap() {
                Ok(id) => {
                    NetStats::add(&self.stats.dht.out_bootstrap, 1);
                    self.pending_bootstrap.insert(id, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(NetError::Kad(e.to_string())));
                }
            },
            Command::StartProviding { key, reply } => {
                match self.swarm.behaviour_mut().kad.start_providing(key) {
                    Ok(id) => {
                        NetStats::add(&self.stats.dht.out_start_providing, 1);
                        self.pending_start_providing.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NetError::Kad(e.to_string())));
                    }
                }
            }
            Command::GetProviders { key, reply } => {
                let id = self.swarm.behaviour_mut().kad.get_providers(key);
                NetStats::add(&self.stats.dht.out_get_providers, 1);
                self.pending_get_providers
                    .insert(id, (HashSet::new(), reply));
            }
            Command::Request {
                peer,
                request,
                reply,
            } => {
                if self.is_banned(&peer) {
                    let _ = reply.send(Err(NetError::Request {
                        peer,
                        reason: "banned for misbehaving".into(),
                    }));
                    return;
                }
                self.peers.entry(peer).or_default().requests_out += 1;
                let id = self
                    .swarm
                    .behaviour_mut()
                    .exchange
                    .send_request(&peer, request);
                self.pending_requests.insert(id, (peer, reply));
            }
            Command::ConnectedPeers { reply } => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::LanPeers { reply } => {
                let lan = self
                    .swarm
                    .connected_peers()
                    .filter(|p| self.lan.contains(p))
                    .copied()
                    .collect();
                let _ = reply.send(lan);
            }
            Command::Disconnect { peer, ban } => {
                tracing::warn!(%peer, ban_secs = ban.as_secs(), "disconnecting a misbehaving peer");
                if self.banned.insert(peer, Instant::now() + ban).is_none() {
                    NetStats::add(&self.stats.peers_banned, 1);
                }
                let _ = self.swarm.disconnect_peer_id(peer);
                self.swarm.behaviour_mut().kad.remove_peer(&peer);
            }
            Command::PeerInfos { reply } => {
                let now = Instant::now();
                let infos = self
                    .peers
                    .iter()
                    .map(|(id, e)| PeerInfo {
                        peer_id: id.to_string(),
                        connected: e.connected,
                        address: e.address.as_ref().map(|a| a.to_string()),
                        lan: self.lan.contains(id),
                        bytes_up: e.bytes_up,
                        bytes_down: e.bytes_down,
                        requests_in: e.requests_in,
                        requests_out: e.requests_out,
                        failures: e.failures,
                        banned_secs: self
                            .banned
                            .get(id)
                            .filter(|until| **until > now)
                            .map(|until| (*until - now).as_secs()),
                    })
                    .collect();
                let _ = reply.send(infos);
            }
        }
    }

    fn is_banned(&mut self, peer: &PeerId) -> bool {
        match self.banned.get(peer) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                self.banned.remove(peer);
                false
            }
            None => false,
        }
    }

    /// Forgets the oldest disconnected peers beyond [`REMEMBERED_PEERS`].
    fn prune_peers(&mut self) {
        let disconnected = self.peers.values().filter(|e| !e.connected).count();
        if disconnected <= REMEMBERED_PEERS {
            return;
        }
        let mut old: Vec<(Option<Instant>, PeerId)> = self
            .peers
            .iter()
            .filter(|(_, e)| !e.connected)
            .map(|(p, e)| (e.last_seen, *p))
            .collect();
        old.sort();
        for (_, p) in old.into_iter().take(disconnected - REMEMBERED_PEERS) {
            self.peers.remove(&p);
        }
        let now = Instant::now();
        self.banned.retain(|_, until| *until > now);
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                tracing::info!(%address, peer = %self.swarm.local_peer_id(), "p2p listening");
                // Loopback and LAN addresses are reachable as they are (no NAT to learn
                // through): confirm them, so kad and identify advertise them to peers.
                if is_local(&address) {
                    self.swarm.add_external_address(address.clone());
                }
                if let Some((_, reply)) = self.pending_listen.remove(&listener_id) {
                    let _ = reply.send(Ok(address));
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some((addr, reply)) = self.pending_listen.remove(&listener_id) {
                    let reason = match reason {
                        Ok(()) => "closed".to_string(),
                        Err(e) => crate::core::error_text(&e),
                    };
                    let _ = reply.send(Err(NetError::Listen { addr, reason }));
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                if self.is_banned(&peer_id) {
                    tracing::debug!(peer = %peer_id, "refusing a banned peer");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    for reply in self.pending_dial.remove(&peer_id).unwrap_or_default() {
                        let _ = reply.send(Err(NetError::Dial {
                            peer: peer_id,
                            reason: "banned for misbehaving".into(),
                        }));
                    }
                    return;
                }
                tracing::debug!(peer = %peer_id, "connected");
                let e = self.peers.entry(peer_id).or_default();
                e.connected = true;
                e.address = Some(endpoint.get_remote_address().clone());
                e.last_seen = Some(Instant::now());
                for reply in self.pending_dial.remove(&peer_id).unwrap_or_default() {
                    let _ = reply.send(Ok(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                if let Some(e) = self.peers.get_mut(&peer_id) {
                    e.connected = false;
                    e.last_seen = Some(Instant::now());
                }
                self.prune_peers();
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                for reply in self.pending_dial.remove(&peer).unwrap_or_default() {
                    let _ = reply.send(Err(NetError::Dial {
                        peer,
                        reason: crate::core::error_text(&error),
                    }));
                }
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            // rust-libp2p's kad does not learn listen addresses by itself: feed it those of
            // peers that speak our DHT protocol.
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })
                if info.protocols.contains(&StreamProtocol::new(KAD_PROTOCOL)) =>
            {
                let kad = &mut self.swarm.behaviour_mut().kad;
                for addr in info.listen_addrs {
                    kad.add_address(&peer_id, addr);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    tracing::debug!(%peer, %addr, "mDNS: discovered");
                    self.lan.insert(peer);
                    if self.is_banned(&peer) {
                        continue;
                    }
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(gone)) => {
                for (peer, _) in gone {
                    self.lan.remove(&peer);
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            }) => self.on_query_progress(id, result, step),
            BehaviourEvent::Kad(kad::Event::InboundRequest { request }) => {
                let d = &self.stats.dht;
                let counter = match request {
                    kad::InboundRequest::FindNode { .. } => &d.in_find_node,
                    kad::InboundRequest::GetProvider { .. } => &d.in_get_providers,
                    kad::InboundRequest::AddProvider { .. } => &d.in_add_provider,
                    _ => &d.in_other,
                };
                NetStats::add(counter, 1);
            }
            BehaviourEvent::Exchange(event) => self.on_exchange_event(event),
            _ => {}
        }
    }

    fn on_query_progress(&mut self, id: QueryId, result: QueryResult, step: kad::ProgressStep) {
        match result {
            QueryResult::Bootstrap(r) => {
                let done = match &r {
                    Ok(ok) => ok.num_remaining == 0 || step.last,
                    Err(_) => true,
                };
                if done {
                    if let Some(reply) = self.pending_bootstrap.remove(&id) {
                        let _ = reply.send(r.map(|_| ()).map_err(|e| NetError::Kad(e.to_string())));
                    }
                }
            }
            QueryResult::StartProviding(r) => {
                if let Some(reply) = self.pending_start_providing.remove(&id) {
                    let _ = reply.send(r.map(|_| ()).map_err(|e| NetError::Kad(e.to_string())));
                }
            }
            QueryResult::GetProviders(r) => {
                let Some((found, _)) = self.pending_get_providers.get_mut(&id) else {
                    return;
                };
                let failed = match r {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                        found.extend(providers);
                        None
                    }
                    Ok(kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => None,
                    Err(e) => Some(e),
                };
                if step.last || failed.is_some() {
                    if let Some((found, reply)) = self.pending_get_providers.remove(&id) {
                        // A timeout after some providers were found still answers them.
                        let result = match failed {
                            Some(e) if found.is_empty() => Err(NetError::Kad(e.to_string())),
                            _ => Ok(found),
                        };
                        let _ = reply.send(result);
                    }
                }
            }
            _ => {}
        }
    }

    fn on_exchange_event(&mut self, event: request_response::Event<pb::Request, pb::Response>) {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                if self.is_banned(&peer) {
                    NetStats::add(&self.stats.requests_refused, 1);
                    return; // dropping the channel fails the request
                }
                let allowed = match self.share {
                    Share::All => true,
                    Share::Lan => self.lan.contains(&peer),
                    Share::None => false,
                };
                if !allowed {
                    // Not shared with this peer: an empty answer (nothing we have), at once.
                    NetStats::add(&self.stats.requests_refused, 1);
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .exchange
                        .send_response(channel, pb::Response::default());
                    return;
                }
                let Ok(permit) = self.inbound.clone().try_acquire_owned() else {
                    // Over the global bound: dropping the channel fails the peer's request.
                    NetStats::add(&self.stats.requests_refused, 1);
                    tracing::debug!(%peer, "inbound request refused: too many in flight");
                    return;
                };
                NetStats::add(&self.stats.requests_in, 1);
                self.peers.entry(peer).or_default().requests_in += 1;
                let responder = self.responder.clone();
                let answers = self.answers_tx.clone();
                let limiter = self.limiter.clone();
                tokio::spawn(async move {
                    let response = responder.respond(peer, request).await;
                    if let Some(l) = limiter {
                        l.acquire(response.encoded_len() as u64).await;
                    }
                    let _ = answers.send((peer, channel, response)).await;
                    drop(permit);
                });
            }
            Event::Message {
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some((peer, reply)) = self.pending_requests.remove(&request_id) {
                    let len = response.encoded_len() as u64;
                    NetStats::add(&self.stats.bytes_down, len);
                    self.peers.entry(peer).or_default().bytes_down += len;
                    let _ = reply.send(Ok(response));
                }
            }
            Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some((peer, reply)) = self.pending_requests.remove(&request_id) {
                    self.peers.entry(peer).or_default().failures += 1;
                    let reason = crate::core::error_text(&error);
                    let e = match error {
                        request_response::OutboundFailure::DialFailure => {
                            NetError::Unreachable { peer, reason }
                        }
                        _ => NetError::Request { peer, reason },
                    };
                    let _ = reply.send(Err(e));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound request failed");
            }
            Event::ResponseSent { .. } => {}
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;

//! The composed libp2p behaviour: identify, ping, Kademlia (our own protocol id), mDNS (optional,
//! behind `Toggle`) and the request-response exchange.
//!
//! Owns only how the behaviours are configured; events are handled by `net::EventLoop`, which
//! is the only code that touches the `Swarm`.
//!
//! Kademlia keeps its records in the store's DHT database ([`PersistentStore`] over
//! `store::dht::DhtStore`, `dht.redb`) when the node is given one.
//! kad's own provider publication is off: the daemon reprovides itself, in batches
//! (`announce::Announcer`), and provider records live `timers.provider-record-ttl-secs`
//! (48 h by default, `config::Timers`).

use std::sync::Arc;

use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{identify, mdns, ping, StreamProtocol};
use nix_p2p_cache_proto::{EXCHANGE_PROTOCOL, KAD_PROTOCOL};

use super::codec::ExchangeCodec;
use super::record_store::{KadStore, PersistentStore};
use crate::store::dht::DhtStore;

/// `protocol_version` sent with identify.
pub const IDENTIFY_PROTOCOL: &str = "/nix-p2p-cache/id/1.0.0";

/// Concurrent exchange streams per connection (each direction), so one peer cannot take all.
pub const MAX_STREAMS_PER_CONNECTION: usize = 32;

/// Connection limits: a flood of connections to the P2P port (reachable from the network) must
/// not use up the daemon's file descriptors — each one over a limit is closed at once.
pub const MAX_PENDING_INCOMING: u32 = 128;
pub const MAX_ESTABLISHED_INCOMING: u32 = 512;
pub const MAX_ESTABLISHED_PER_PEER: u32 = 4;

/// Options for [`Behaviour::new`].
#[derive(Debug, Clone)]
pub struct BehaviourConfig {
    /// Discover peers on the LAN with mDNS.
    pub mdns: bool,
    /// Provider-record lifetime, DHT query and request timeouts (the rest is the announcer's).
    pub timers: crate::config::Timers,
}

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// First, so a connection over a limit is denied before anything else sees it.
    pub limits: libp2p::connection_limits::Behaviour,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub kad: kad::Behaviour<KadStore>,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub exchange: request_response::Behaviour<ExchangeCodec>,
}

impl Behaviour {
    /// With a `dht` store, kad's records persist in it; without one they are kept in memory
    /// (kad's `MemoryStore`: at most 1024 provided keys, forgotten on restart).
    pub fn new(
        key: &Keypair,
        config: &BehaviourConfig,
        dht: Option<Arc<DhtStore>>,
    ) -> std::io::Result<Self> {
        let peer_id = key.public().to_peer_id();
        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
                .with_agent_version(format!("nix-p2p-cache/{}", env!("CARGO_PKG_VERSION"))),
        );
        let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
        kad_config.set_query_timeout(config.timers.dht_query_timeout());
        kad_config.set_provider_publication_interval(None);
        kad_config.set_provider_record_ttl(Some(config.timers.provider_record_ttl()));
        let records = match dht {
            Some(dht) => KadStore::Persistent(PersistentStore::new(dht, peer_id)),
            None => KadStore::Memory(MemoryStore::new(peer_id)),
        };
        let mut kad = kad::Behaviour::with_config(peer_id, records, kad_config);
        // Explicit: without a confirmed external address kad would stay a client and never
        // answer queries (peers on a LAN or behind the same NAT still need us to serve).
        kad.set_mode(Some(kad::Mode::Server));
        let mdns = if config.mdns {
            Some(mdns::tokio::Behaviour::new(
                mdns::Config::default(),
                peer_id,
            )?)
        } else {
            None
        };
        let exchange = request_response::Behaviour::with_codec(
            ExchangeCodec::default(),
            [(
                StreamProtocol::new(EXCHANGE_PROTOCOL),
                ProtocolSupport::Full,
            )],
            request_response::Config::default()
                .with_request_timeout(config.timers.request_timeout())
                .with_max_concurrent_streams(MAX_STREAMS_PER_CONNECTION),
        );
        let limits = libp2p::connection_limits::ConnectionLimits::default()
            .with_max_pending_incoming(Some(MAX_PENDING_INCOMING))
            .with_max_established_incoming(Some(MAX_ESTABLISHED_INCOMING))
            .with_max_established_per_peer(Some(MAX_ESTABLISHED_PER_PEER));
        Ok(Self {
            limits: libp2p::connection_limits::Behaviour::new(limits),
            identify,
            ping: ping::Behaviour::default(),
            kad,
            mdns: Toggle::from(mdns),
            exchange,
        })
    }
}

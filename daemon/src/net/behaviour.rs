//! The composed libp2p behaviour: identify, ping, Kademlia (our own protocol id), mDNS (optional,
//! behind `Toggle`) and the request-response exchange.
//!
//! Owns only how the behaviours are configured; events are handled by `net::EventLoop`, which
//! is the only code that touches the `Swarm`.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{identify, mdns, ping, StreamProtocol};
use nix_p2p_cache_proto::{EXCHANGE_PROTOCOL, KAD_PROTOCOL};

use super::codec::ExchangeCodec;

/// `protocol_version` sent with identify.
pub const IDENTIFY_PROTOCOL: &str = "/nix-p2p-cache/id/1.0.0";

/// How long an outbound exchange request may take before it fails.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Concurrent exchange streams per connection (each direction), so one peer cannot take all.
pub const MAX_STREAMS_PER_CONNECTION: usize = 32;

/// Options for [`Behaviour::new`].
#[derive(Debug, Clone)]
pub struct BehaviourConfig {
    /// Discover peers on the LAN with mDNS.
    pub mdns: bool,
}

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    // TODO(issue: persistent provider records): a redb-backed `RecordStore` is required —
    // `MemoryStore` forgets everything on restart and caps provided keys at 1024 (design §3).
    // It is the next step; `MemoryStore` is a placeholder.
    pub kad: kad::Behaviour<MemoryStore>,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub exchange: request_response::Behaviour<ExchangeCodec>,
}

impl Behaviour {
    pub fn new(key: &Keypair, config: &BehaviourConfig) -> std::io::Result<Self> {
        let peer_id = key.public().to_peer_id();
        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
                .with_agent_version(format!("nix-p2p-cache/{}", env!("CARGO_PKG_VERSION"))),
        );
        let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
        kad_config.set_query_timeout(Duration::from_secs(30));
        let mut kad = kad::Behaviour::with_config(peer_id, MemoryStore::new(peer_id), kad_config);
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
                .with_request_timeout(REQUEST_TIMEOUT)
                .with_max_concurrent_streams(MAX_STREAMS_PER_CONNECTION),
        );
        Ok(Self {
            identify,
            ping: ping::Behaviour::default(),
            kad,
            mdns: Toggle::from(mdns),
            exchange,
        })
    }
}

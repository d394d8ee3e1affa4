//! Fetching from peers (design §4), a [`Source`] of the resolver: narinfos from connected
//! peers within a short budget, NARs as chunks from several providers at once, streamed into
//! the flight as they are verified and stored as received.
//!
//! narinfo path: on a local miss, up to [`MAX_NARINFO_ASKS`] connected peers are asked at once
//! (`NarInfoRequest`): LAN peers first, then those whose path summary may hold the path, then
//! those with no summary yet, never one whose summary lacks it;
//! the first answer that passes [`check_narinfo`] with a trusted signature wins. What has not
//! come within [`NARINFO_BUDGET`] is handed to the resolver as a late answer (the asks go on
//! for up to [`LATE_ASK`]), so a busy peer is waited for instead of turning into a 404. A DHT
//! provider lookup for the NAR starts in the background when a narinfo is found, so the NAR
//! request finds the providers ready. Never a DHT walk on the narinfo path itself.
//!
//! NAR path: providers are the LAN (mDNS) peers, the peer that sent the narinfo, the DHT's,
//! then a few other connected peers, minus banned ones. Manifests are asked of the first two
//! providers; one is accepted only if its chunking parameters are ours, every chunk is within
//! the chunking bounds and the sizes add up to NarSize. If two providers' manifests differ,
//! one of them lies: the flight is held (no byte visible) until the NAR checks, and the other
//! manifest is tried if it does not. Chunks the store already has are read locally; the rest
//! are asked for in requests of at most [`REQUEST_BYTES`] / `MAX_WANTS_PER_REQUEST` chunks,
//! scheduled by [`Transfer`]: each provider keeps up to [`PEER_WINDOW`] requests in flight (so
//! faster peers pull more), a failed or timed-out request goes to another provider, and when
//! nothing is left to hand out, idle providers duplicate the oldest outstanding requests that
//! have been out for [`ENDGAME_AFTER`] (the endgame: a straggler is raced, a fast transfer is
//! not doubled). Every block is decompressed into a buffer of its declared size (at most the
//! chunking maximum) and checked against its id; a peer that sends a bad block is disconnected
//! and banned ([`BAN`]). Chunks go in NAR order through a bounded channel to a blocking writer
//! that restores store paths into the flight (clients see them at once) and stages the
//! received zstd frames as they are ([`crate::store::Staging`]); the NAR is checked against
//! NarHash ([`Flight::finish`]) before the commit. A NAR that fails NarHash though every block
//! checked means a lying manifest: its sender is banned. Memory is bounded by
//! [`LOOKAHEAD_BYTES`] of chunks ahead of the writer.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use libp2p::PeerId;
use nix_p2p_cache_proto::v1 as pb;
use nix_p2p_cache_proto::MAX_WANTS_PER_REQUEST;
use tokio::sync::OnceCell;
use tracing::Instrument;

use crate::core::chunker::ChunkingParams;
use crate::core::manifest::{Manifest, ManifestError};
use crate::core::narinfo::NarInfo;
use crate::core::signing::{PublicKey, Trust};
use crate::core::store_path::StorePathHash;
use crate::core::summary::PathFilter;
use crate::core::{ChunkId, NarHash};
use crate::import::check_narinfo;
use crate::metrics::{Metrics, NetGauges};
use crate::net::Client;
use crate::pending::Pending;
use crate::resolve::{FetchError, Flight, FlightError, Found, Lookup, Origin, Source};
use crate::store::{Staging, Store, StoreError};

/// Budget for connected peers to answer a narinfo before the other sources are asked.
pub const NARINFO_BUDGET: Duration = Duration::from_millis(50);
/// How long the narinfo asks to peers go on in the background after [`NARINFO_BUDGET`].
pub const LATE_ASK: Duration = Duration::from_secs(3);
/// Longest wait for the DHT's providers of a NAR.
pub const PROVIDERS_TIMEOUT: Duration = Duration::from_secs(2);
/// Connected peers without a provider record tried as providers too.
const EXTRA_CONNECTED: usize = 8;
/// Connected peers asked for one narinfo at most (LAN first, then the likeliest).
pub const MAX_NARINFO_ASKS: usize = 8;
/// Longest wait for a manifest from one provider.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a second provider's manifest is waited for once the first one is in.
const SECOND_OPINION: Duration = Duration::from_millis(300);
/// Longest wait for one block request (at most [`REQUEST_BYTES`] of chunks).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Uncompressed chunk bytes asked for in one request (fits a 4 MiB response).
const REQUEST_BYTES: u64 = 1 << 20;
/// Requests in flight to one provider.
pub const PEER_WINDOW: usize = 4;
/// Requests for chunks the store already has, read at once.
const LOCAL_WINDOW: usize = 2;
/// Chunks are not requested further than this ahead of what the writer has taken.
const LOOKAHEAD_BYTES: u64 = 32 << 20;
/// Copies of one request in flight in the endgame (the original included).
const ENDGAME_COPIES: usize = 2;
/// A request is duplicated in the endgame only once it has been out this long (a request of
/// 1 MiB takes a few ms on a LAN: duplicating every outstanding one doubled the bytes
/// received for small NARs).
const ENDGAME_AFTER: Duration = Duration::from_millis(750);
/// Consecutive failed requests after which a provider is dropped from one fetch.
const MAX_PEER_FAILURES: u32 = 3;
/// Manifests tried for one NAR (each from another provider) while the flight is held.
const MAX_MANIFESTS: usize = 3;
/// How long a peer that sent a bad block or a lying manifest is refused.
pub const BAN: Duration = Duration::from_secs(3600);
/// Overall deadline of a NAR fetch from peers: this much, plus NarSize at [`NAR_MIN_RATE`].
const NAR_DEADLINE_BASE: Duration = Duration::from_secs(60);
/// Slowest average rate a NAR deadline allows for (bytes per second).
const NAR_MIN_RATE: u64 = 64 * 1024;
/// Verified chunks queued between the network and the writing thread.
const QUEUE: usize = 16;
/// Background provider lookups kept (cleared when full).
const LOOKUP_ENTRIES: usize = 4 * 1024;
/// How often connected peers are asked whether their path summary changed.
pub const SUMMARY_REFRESH: Duration = Duration::from_secs(10);
/// Longest wait for one peer's summary.
const SUMMARY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a NAR could not be had from peers.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("no peer can provide it ({providers} providers asked)")]
    NoManifest { providers: usize },
    #[error("the manifest from {peer} does not reproduce the NAR: {source}")]
    BadManifest {
        peer: PeerId,
        #[source]
        source: Box<FlightError>,
    },
    #[error("{missing} chunk requests could not be served ({usable} of {total} providers left)")]
    Stuck {
        missing: usize,
        usable: usize,
        total: usize,
    },
    #[error("reading local chunks: {0}")]
    Local(#[source] StoreError),
    #[error("the NAR did not arrive within its deadline of {secs} s")]
    Deadline { secs: u64 },
}

type Lookups = Arc<OnceCell<Vec<PeerId>>>;

/// The P2P side of the daemon: a network client, the trusted keys and background provider
/// lookups.
pub struct Peers {
    client: Client,
    trusted: Vec<PublicKey>,
    lookups: Mutex<HashMap<NarHash, Lookups>>,
    metrics: Arc<Metrics>,
    /// Connected peers' path summaries (generation, filter); see [`Peers::refresh_summaries`].
    summaries: Mutex<HashMap<PeerId, (u64, PathFilter)>>,
    /// Providers left out for a while: stale provider records (peers gone, back under a new
    /// identity, restarted with `share` lan or none) outlive them by up to a record lifetime.
    left_out: Mutex<HashMap<PeerId, Standing>>,
}

/// Consecutive empty manifest answers after which a provider is left out for
/// [`UNREACHABLE_FOR`].
const EMPTY_ANSWERS_LIMIT: u32 = 3;

/// How long a provider that could not be dialled (or shared nothing) is left out.
pub const UNREACHABLE_FOR: Duration = Duration::from_secs(10 * 60);
/// Providers' standings remembered at most (then the expired ones go, or all: a hint only,
/// forgetting costs one more failed request each).
const UNREACHABLE_ENTRIES: usize = 4096;

/// What the fetcher remembers of a provider between NARs.
#[derive(Default)]
struct Standing {
    /// Consecutive "does not share it" answers to manifest requests.
    empty_answers: u32,
    /// Left out of the providers until then.
    out_until: Option<std::time::Instant>,
}

impl Peers {
    pub fn new(client: Client, trusted: Vec<PublicKey>, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            trusted,
            lookups: Mutex::new(HashMap::new()),
            metrics,
            summaries: Mutex::new(HashMap::new()),
            left_out: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a provider's answer to a manifest request: `empty` (it does not share the NAR)
    /// or not; the [`EMPTY_ANSWERS_LIMIT`]-th empty one in a row leaves the peer out.
    fn note_manifest_answer(&self, peer: PeerId, empty: bool) {
        let mut m = self.lock_left_out();
        if !empty {
            if let Some(s) = m.get_mut(&peer) {
                s.empty_answers = 0;
            }
            return;
        }
        let s = m.entry(peer).or_default();
        s.empty_answers += 1;
        if s.empty_answers >= EMPTY_ANSWERS_LIMIT {
            s.empty_answers = 0;
            s.out_until = Some(std::time::Instant::now() + UNREACHABLE_FOR);
            tracing::debug!(%peer, "provider shares none of the NARs asked lately: left out");
        }
    }

    /// Leaves `peer` out of the providers for [`UNREACHABLE_FOR`] (it could not be dialled).
    fn mark_unreachable(&self, peer: PeerId) {
        let until = std::time::Instant::now() + UNREACHABLE_FOR;
        self.lock_left_out().entry(peer).or_default().out_until = Some(until);
    }

    /// Whether `peer` is left out of the providers now.
    fn is_unreachable(&self, peer: &PeerId) -> bool {
        let now = std::time::Instant::now();
        self.lock_left_out()
            .get(peer)
            .and_then(|s| s.out_until)
            .is_some_and(|until| until > now)
    }

    /// The providers' standings, bounded: full, the expired ones go (and all if that is not
    /// enough).
    fn lock_left_out(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Standing>> {
        let mut m = self.left_out.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= UNREACHABLE_ENTRIES {
            let now = std::time::Instant::now();
            m.retain(|_, s| s.out_until.is_some_and(|u| u > now));
            if m.len() >= UNREACHABLE_ENTRIES {
                m.clear();
            }
        }
        m
    }

    /// Asks every connected peer for its path summary (only the changed ones send their
    /// filter again) and forgets those of peers gone. Runs every [`SUMMARY_REFRESH`].
    pub async fn refresh_summaries(&self) {
        let Ok(connected) = self.client.connected_peers().await else {
            return;
        };
        let known: HashMap<PeerId, u64> = {
            let mut m = self.lock_summaries();
            m.retain(|p, _| connected.contains(p));
            m.iter().map(|(p, s)| (*p, s.0)).collect()
        };
        let mut asks: FuturesUnordered<_> = connected
            .into_iter()
            .map(|peer| {
                let client = self.client.clone();
                let have = known.get(&peer).copied().unwrap_or(0);
                let req = pb::Request {
                    kind: Some(pb::request::Kind::Summary(pb::SummaryRequest {
                        have_generation: have,
                    })),
                };
                async move {
                    let r = tokio::time::timeout(SUMMARY_TIMEOUT, client.request(peer, req)).await;
                    (peer, have, r)
                }
            })
            .collect();
        while let Some((peer, have, r)) = asks.next().await {
            let summary = match r {
                Ok(Ok(pb::Response {
                    summary: Some(s), ..
                })) => s,
                // No summary (an older peer, or one that shares nothing with us): always asked.
                Ok(Ok(_)) => {
                    self.lock_summaries().remove(&peer);
                    continue;
                }
                _ => continue, // keep what we had; asked again next round
            };
            if summary.generation == have && summary.bits.is_empty() {
                continue; // unchanged
            }
            match PathFilter::from_parts(summary.bits, summary.hashes) {
                Ok(f) => {
                    self.lock_summaries().insert(peer, (summary.generation, f));
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "peer sent an unusable path summary");
                    self.lock_summaries().remove(&peer);
                }
            }
        }
    }

    fn lock_summaries(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, (u64, PathFilter)>> {
        self.summaries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connected peers worth asking for `hash`, at most [`MAX_NARINFO_ASKS`]: LAN peers
    /// first, then peers whose summary says they may hold it, then peers with no summary yet;
    /// never one whose summary says it lacks it. The fan-out does not grow with the network.
    async fn narinfo_candidates(&self, hash: &StorePathHash) -> Vec<PeerId> {
        let Ok(peers) = self.client.connected_peers().await else {
            return Vec::new();
        };
        let lan: HashSet<PeerId> = self
            .client
            .lan_peers()
            .await
            .unwrap_or_default()
            .into_iter()
            .collect();
        let before = peers.len();
        // Rank: 0 LAN, 1 summary says maybe, 2 no summary; lacking it: left out.
        let mut ranked: Vec<(u8, PeerId)> = {
            let summaries = self.lock_summaries();
            peers
                .into_iter()
                .filter_map(|p| {
                    if lan.contains(&p) {
                        return Some((0, p));
                    }
                    match summaries.get(&p) {
                        Some(s) if s.1.may_contain(hash) => Some((1, p)),
                        Some(_) => None,
                        None => Some((2, p)),
                    }
                })
                .collect()
        };
        ranked.sort_by_key(|(rank, _)| *rank);
        ranked.truncate(MAX_NARINFO_ASKS);
        Metrics::inc(
            &self.metrics.p2p_narinfo_asks_skipped,
            (before - ranked.len()) as u64,
        );
        ranked.into_iter().map(|(_, p)| p).collect()
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The network's counters for `/metrics` and `status`.
    pub async fn gauges(&self) -> NetGauges {
        use std::sync::atomic::Ordering::Relaxed;
        let s = self.client.stats();
        NetGauges {
            connected_peers: self
                .client
                .connected_peers()
                .await
                .map(|p| p.len() as u64)
                .unwrap_or(0),
            bytes_up: s.bytes_up.load(Relaxed),
            bytes_down: s.bytes_down.load(Relaxed),
            requests_in: s.requests_in.load(Relaxed),
            requests_refused: s.requests_refused.load(Relaxed),
            peers_banned: s.peers_banned.load(Relaxed),
            dht_calls: s.dht.snapshot(),
        }
    }

    /// Asks the connected peers for the narinfo of `hash`; see the module docs.
    async fn ask_narinfo(&self, hash: &StorePathHash) -> Lookup {
        let peers = self.narinfo_candidates(hash).await;
        if peers.is_empty() {
            return Lookup::Missing;
        }
        let mut asks: FuturesUnordered<_> = peers
            .into_iter()
            .map(|peer| {
                let client = self.client.clone();
                let req = pb::Request {
                    kind: Some(pb::request::Kind::Narinfo(pb::NarInfoRequest {
                        store_path_hash: hash.as_str().to_string(),
                    })),
                };
                async move { (peer, client.request(peer, req).await) }
            })
            .collect();
        let trusted = self.trusted.clone();
        let h = hash.clone();
        // The asks run on their own task: what is not in by the budget becomes a late answer.
        let (tx, mut rx) = tokio::sync::oneshot::channel::<Lookup>();
        tokio::spawn(async move {
            let outcome = tokio::time::timeout(LATE_ASK, async {
                while let Some((peer, r)) = asks.next().await {
                    let Ok(pb::Response {
                        narinfo: Some(text),
                        ..
                    }) = r
                    else {
                        continue;
                    };
                    match check_narinfo(&text, Some(&h), &trusted) {
                        Ok((info, trust @ Trust::Trusted { .. })) => {
                            tracing::debug!(%peer, hash = h.as_str(), "narinfo from a peer");
                            return Lookup::Found(Pending {
                                source: Origin::Peer(peer),
                                text: Arc::from(text),
                                info: Arc::new(info),
                                trust,
                            });
                        }
                        Ok(_) => tracing::debug!(%peer, "peer narinfo not trusted"),
                        Err(e) => tracing::warn!(%peer, error = %e, "peer narinfo refused"),
                    }
                }
                Lookup::Missing
            })
            .await
            .unwrap_or(Lookup::Unsure);
            let _ = tx.send(outcome);
        });
        match tokio::time::timeout(NARINFO_BUDGET, &mut rx).await {
            Ok(Ok(l)) => l,
            Ok(Err(_)) => Lookup::Unsure,
            Err(_) => Lookup::Late(Box::pin(async move { rx.await.unwrap_or(Lookup::Unsure) })),
        }
    }

    fn lookup_cell(&self, nar_hash: NarHash) -> Lookups {
        let mut m = self.lookups.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= LOOKUP_ENTRIES {
            m.clear();
        }
        m.entry(nar_hash).or_default().clone()
    }

    /// Starts the DHT provider lookup of a NAR in the background.
    fn start_lookup(&self, nar_hash: NarHash) {
        let cell = self.lookup_cell(nar_hash);
        let client = self.client.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            cell.get_or_init(|| dht_providers(client, metrics, nar_hash))
                .await;
        });
    }

    /// The DHT's providers of a NAR: the background lookup's answer (waiting for it if it is
    /// still running), or a new lookup.
    async fn dht_providers(&self, nar_hash: NarHash) -> Vec<PeerId> {
        let cell = self.lookup_cell(nar_hash);
        let found = cell
            .get_or_init(|| dht_providers(self.client.clone(), self.metrics.clone(), nar_hash))
            .await
            .clone();
        self.lookups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&nar_hash);
        found
    }

    /// Providers in the order they are tried: LAN peers, the narinfo's sender, the DHT's,
    /// then (up to [`EXTRA_CONNECTED`]) other connected peers, which may hold the NAR without
    /// a provider record yet; one that does not is dropped after a few empty answers.
    async fn providers(&self, first: Option<PeerId>, nar_hash: NarHash) -> Vec<PeerId> {
        let me = self.client.local_peer_id();
        let mut out: Vec<PeerId> = self.client.lan_peers().await.unwrap_or_default();
        out.extend(first);
        out.extend(self.dht_providers(nar_hash).await);
        let mut seen = HashSet::new();
        out.retain(|p| *p != me && seen.insert(*p));
        let connected = self.client.connected_peers().await.unwrap_or_default();
        // A peer that could not be dialled lately is not asked again (unless connected since).
        let before = out.len();
        out.retain(|p| connected.contains(p) || !self.is_unreachable(p));
        if out.len() < before {
            tracing::debug!(
                skipped = before - out.len(),
                "providers left out: unreachable lately"
            );
        }
        out.extend(
            connected
                .into_iter()
                .filter(|p| *p != me && seen.insert(*p))
                .take(EXTRA_CONNECTED),
        );
        out
    }

    async fn fetch_from_peers(
        &self,
        store: &Arc<Store>,
        found: &Found,
        flight: &Arc<Flight>,
    ) -> Result<(), FetchError> {
        let first = match &found.source {
            Origin::Peer(p) => Some(*p),
            Origin::Upstream(_) => None,
        };
        let info = &found.info;
        let mut providers = self.providers(first, info.nar_hash).await;
        tracing::debug!(providers = providers.len(), "fetching from peers");
        let mut asked = HashSet::new();
        let mut manifests = self.manifests(&providers, &mut asked, info).await;
        // Two providers, two different manifests: one lies. Hold the bytes until one checks.
        let held = manifests.len() > 1 && manifests[0].0 != manifests[1].0;
        tracing::debug!(manifests = manifests.len(), held, "manifests");
        flight.hold(held);
        if !held {
            manifests.truncate(1);
        }
        let mut tried = 0;
        loop {
            if manifests.is_empty() && held && tried < MAX_MANIFESTS {
                // Held: look for another manifest among the providers not asked yet.
                manifests = self.manifests(&providers, &mut asked, info).await;
            }
            if manifests.is_empty() {
                return Err(PeerError::NoManifest {
                    providers: providers.len(),
                }
                .into());
            }
            let (manifest, from) = manifests.remove(0);
            tried += 1;
            match self
                .transfer(store, found, flight, manifest, from, &providers)
                .await
            {
                Err(FetchError::Peers(PeerError::BadManifest { peer, source })) => {
                    Metrics::inc(&self.metrics.p2p_bad_manifests, 1);
                    tracing::warn!(%peer, error = %source, "manifest did not reproduce the NAR");
                    self.ban(peer).await;
                    providers.retain(|p| *p != peer);
                    if !flight.reset() {
                        return Err(PeerError::BadManifest { peer, source }.into());
                    }
                }
                r => {
                    flight.hold(false);
                    if r.is_ok()
                        && self
                            .client
                            .lan_peers()
                            .await
                            .is_ok_and(|lan| lan.contains(&from))
                    {
                        Metrics::inc(&self.metrics.p2p_nars_lan, 1);
                    }
                    return r;
                }
            }
        }
    }

    async fn ban(&self, peer: PeerId) {
        if let Err(e) = self.client.disconnect(peer, BAN).await {
            tracing::debug!(%peer, error = %e, "disconnecting");
        }
    }

    /// Asks the next providers not asked yet for the manifest of `info`'s NAR until one
    /// sends a usable one; then waits briefly ([`SECOND_OPINION`]) for the next provider's,
    /// so a lying manifest can be noticed. A provider that sends garbage or a manifest that
    /// cannot be ours is banned.
    async fn manifests(
        &self,
        providers: &[PeerId],
        asked: &mut HashSet<PeerId>,
        info: &NarInfo,
    ) -> Vec<(Manifest, PeerId)> {
        let mut out = Vec::new();
        let fresh: Vec<PeerId> = providers
            .iter()
            .copied()
            .filter(|p| !asked.contains(p))
            .collect();
        let mut queue = fresh.into_iter();
        let mut inflight = FuturesUnordered::new();
        let ask = |peer: PeerId| {
            let client = self.client.clone();
            let key = info.nar_hash.nar_key().multihash_bytes();
            async move {
                let req = pb::Request {
                    kind: Some(pb::request::Kind::Manifest(pb::ManifestRequest {
                        nar_key: key,
                        chunkings: ChunkingParams::READ.map(|p| p.id).to_vec(),
                    })),
                };
                (
                    peer,
                    tokio::time::timeout(MANIFEST_TIMEOUT, client.request(peer, req)).await,
                )
            }
        };
        // The first two at once, then one more per provider that has none.
        for p in queue.by_ref().take(2) {
            asked.insert(p);
            inflight.push(ask(p));
        }
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let next = match deadline {
                Some(d) => match tokio::time::timeout_at(d, inflight.next()).await {
                    Ok(n) => n,
                    Err(_) => break,
                },
                None => inflight.next().await,
            };
            let Some((peer, r)) = next else {
                break;
            };
            let bytes = match r {
                Ok(Ok(pb::Response {
                    manifest: Some(b), ..
                })) => {
                    self.note_manifest_answer(peer, false);
                    Some(b)
                }
                Ok(Ok(_)) => {
                    self.note_manifest_answer(peer, true); // does not share it
                    None
                }
                Ok(Err(e)) => {
                    if matches!(e, crate::net::NetError::Unreachable { .. }) {
                        self.mark_unreachable(peer);
                    }
                    tracing::debug!(%peer, error = %e, "manifest request failed");
                    None
                }
                Err(_) => None,
            };
            if let Some(bytes) = bytes {
                match self.check_manifest(&bytes, info) {
                    Ok(m) => {
                        out.push((m, peer));
                        if out.len() >= 2 {
                            break;
                        }
                        deadline.get_or_insert(tokio::time::Instant::now() + SECOND_OPINION);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "peer sent an unusable manifest");
                        Metrics::inc(&self.metrics.p2p_bad_manifests, 1);
                        self.ban(peer).await;
                    }
                }
            }
            if out.is_empty() {
                if let Some(p) = queue.next() {
                    asked.insert(p);
                    inflight.push(ask(p));
                }
            }
        }
        // Tried in provider order (LAN, the narinfo's sender, the DHT's), not arrival order.
        out.sort_by_key(|(_, p)| providers.iter().position(|q| q == p));
        out
    }

    /// A peer's manifest, accepted only if it is for this NAR and could be ours: our chunking
    /// parameters, every chunk within their bounds, sizes adding up to NarSize (checked by
    /// `decode`). Nothing of the claimed sizes is allocated before these checks.
    fn check_manifest(&self, bytes: &[u8], info: &NarInfo) -> Result<Manifest, ManifestError> {
        let m = Manifest::decode(bytes)?;
        if m.nar_hash != info.nar_hash || m.nar_size != info.nar_size {
            return Err(ManifestError::OtherNar);
        }
        m.check_chunking()?;
        Ok(m)
    }

    /// Streams the NAR of `manifest` into the flight and the store from `providers` (and
    /// local chunks); see the module docs.
    async fn transfer(
        &self,
        store: &Arc<Store>,
        found: &Found,
        flight: &Arc<Flight>,
        manifest: Manifest,
        manifest_from: PeerId,
        providers: &[PeerId],
    ) -> Result<(), FetchError> {
        let ids: Vec<ChunkId> = manifest.chunks.iter().map(|c| c.id).collect();
        let s = store.clone();
        let local: HashSet<ChunkId> = tokio::task::spawn_blocking(move || s.stored_chunks(&ids))
            .await
            .map_err(|_| FetchError::Task("local chunk check"))?
            .map_err(PeerError::Local)?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Fetched, PeerError>>(QUEUE);
        let (s, f) = (store.clone(), flight.clone());
        // The writer: restored bytes into the flight, received frames into the staging.
        let mut writer = tokio::task::spawn_blocking(move || {
            let mut staging = s.staging()?;
            while let Some(item) = rx.blocking_recv() {
                let c = item?;
                if let Some(frame) = &c.frame {
                    staging
                        .append_frame(&c.id, c.raw_len, frame)
                        .map_err(StoreError::from)?;
                }
                f.write(&c.data)?;
            }
            Ok::<Staging, FetchError>(staging)
        });
        let transfer = Transfer::new(
            manifest.clone(),
            &local,
            providers,
            self.client.clone(),
            store.clone(),
            self.metrics.clone(),
        );
        let pump = tokio::spawn(transfer.run(tx));
        // An overall deadline besides the per-request timeouts: a swarm of providers that each
        // answer just in time cannot hold a fetch forever.
        let deadline = NAR_DEADLINE_BASE + Duration::from_secs(found.info.nar_size / NAR_MIN_RATE);
        let written = match tokio::time::timeout(deadline, &mut writer).await {
            Ok(w) => w.map_err(|_| FetchError::Task("peer writer"))?,
            Err(_) => {
                pump.abort(); // the writer then sees the channel close and ends
                return Err(PeerError::Deadline {
                    secs: deadline.as_secs(),
                }
                .into());
            }
        };
        // The pump ends by itself once everything is sent or the writer hung up.
        let pumped = pump.await.map_err(|_| FetchError::Task("peer transfer"))?;
        pumped?;
        let staging = written?;
        // Every block checked against its id: a NAR that fails now was a lying manifest.
        if let Err(source) = flight.finish() {
            return Err(PeerError::BadManifest {
                peer: manifest_from,
                source: Box::new(source),
            }
            .into());
        }
        let source = format!("peer {manifest_from}");
        let (s, i, t, tr) = (
            store.clone(),
            found.info.clone(),
            found.text.clone(),
            found.trust.clone(),
        );
        let outcome = tokio::task::spawn_blocking(move || {
            s.commit_fetched(&i, &t, &tr, &source, manifest, staging)
        })
        .await
        .map_err(|_| FetchError::Task("commit"))??;
        tracing::info!(
            nar_size = outcome.nar_size,
            new_chunks = outcome.new_chunks,
            "stored NAR from peers"
        );
        Ok(())
    }
}

#[async_trait::async_trait]
impl Source for Peers {
    fn name(&self) -> &'static str {
        "peers"
    }

    fn owns(&self, origin: &Origin) -> bool {
        matches!(origin, Origin::Peer(_))
    }

    async fn narinfo(&self, hash: &StorePathHash) -> Lookup {
        let l = self.ask_narinfo(hash).await;
        if let Lookup::Found(f) = &l {
            self.start_lookup(f.info.nar_hash);
        }
        l
    }

    async fn fetch(
        &self,
        store: &Arc<Store>,
        found: &Found,
        flight: &Arc<Flight>,
    ) -> Result<(), FetchError> {
        let span = tracing::warn_span!("peer_fetch", nar = %found.info.nar_hash);
        match self
            .fetch_from_peers(store, found, flight)
            .instrument(span)
            .await
        {
            Ok(()) => {
                Metrics::inc(&self.metrics.p2p_nars, 1);
                Ok(())
            }
            Err(e) => {
                Metrics::inc(&self.metrics.p2p_nar_failures, 1);
                Err(e)
            }
        }
    }
}

/// DHT providers of a NAR within [`PROVIDERS_TIMEOUT`] (empty on failure).
async fn dht_providers(client: Client, metrics: Arc<Metrics>, nar_hash: NarHash) -> Vec<PeerId> {
    Metrics::inc(&metrics.p2p_provider_lookups, 1);
    match tokio::time::timeout(PROVIDERS_TIMEOUT, client.get_providers(nar_hash.nar_key())).await {
        Ok(Ok(found)) => {
            Metrics::inc(&metrics.p2p_providers_found, found.len() as u64);
            found.into_iter().collect()
        }
        Ok(Err(e)) => {
            tracing::debug!(nar = %nar_hash, error = %e, "provider lookup");
            Vec::new()
        }
        Err(_) => Vec::new(),
    }
}

/// Checks one block: its zstd frame no larger than zstd's bound for `size` bytes, decompressed
/// into a buffer of exactly `size` (a frame that inflates further fails), content hashing to
/// `id`. Returns the content.
fn check_block(id: &ChunkId, size: u32, frame: &[u8]) -> Option<Vec<u8>> {
    if frame.len() > zstd::zstd_safe::compress_bound(size as usize) {
        return None;
    }
    // One decompression context per thread: making one costs more than a small chunk.
    thread_local! {
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let out = DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        let dctx = match &mut *slot {
            Some(d) => d,
            None => slot.insert(zstd::bulk::Decompressor::new().ok()?),
        };
        dctx.decompress(frame, size as usize).ok()
    })?;
    (out.len() == size as usize && ChunkId::of(&out) == *id).then_some(out)
}

/// One chunk of the NAR in order, for the writer: its restored bytes, and the verified frame
/// it came in when it is new to the store (first use only).
struct Fetched {
    id: ChunkId,
    /// Length of the chunk itself (normalised), not of its restored bytes.
    raw_len: u32,
    data: Bytes,
    frame: Option<Bytes>,
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Via {
    Local,
    Peer(PeerId),
}

/// A set of distinct chunks asked for together.
struct Req {
    /// Chunks still missing (id, uncompressed size).
    want: Vec<(ChunkId, u32)>,
    /// NAR offset of the first chunk that needs it (scheduling order and lookahead).
    first_offset: u64,
    local: bool,
    /// Sources this request is in flight to.
    inflight: HashSet<Via>,
    /// Providers that failed it.
    failed: HashSet<PeerId>,
    /// When its current copy was sent (the endgame duplicates only requests this old).
    sent: Option<tokio::time::Instant>,
}

struct PeerState {
    id: PeerId,
    inflight: usize,
    /// Consecutive requests that brought nothing.
    failures: u32,
    dropped: bool,
}

/// What one request brought: each chunk checked (`Err(())`: it did not match its id).
type Checked = Vec<(ChunkId, Result<(Vec<u8>, Option<Bytes>), ()>)>;
type Outcome = (usize, Via, Result<Checked, String>);
type InFlight = FuturesUnordered<futures_util::future::BoxFuture<'static, Outcome>>;

/// The scheduler of one NAR's chunks over providers; see the module docs.
struct Transfer {
    manifest: Manifest,
    reqs: Vec<Req>,
    /// Requests neither done nor in flight, by first offset.
    queue: VecDeque<usize>,
    peers: Vec<PeerState>,
    /// Verified chunks not yet handed to the writer, with their remaining uses and the frame
    /// they came in (peers' only; taken by the first use).
    ready: HashMap<ChunkId, (Vec<u8>, u32, Option<Bytes>)>,
    /// Uses of each chunk in the NAR.
    uses: HashMap<ChunkId, u32>,
    local_inflight: usize,
    client: Client,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
}

impl Transfer {
    fn new(
        manifest: Manifest,
        local: &HashSet<ChunkId>,
        providers: &[PeerId],
        client: Client,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut uses: HashMap<ChunkId, u32> = HashMap::new();
        let mut reqs: Vec<Req> = Vec::new();
        // The open request for remote ([0]) and local ([1]) chunks, filled in NAR order.
        let mut open: [Option<(usize, u64)>; 2] = [None, None];
        for (offset, c) in manifest.chunk_offsets() {
            let n = uses.entry(c.id).or_default();
            *n += 1;
            if *n > 1 {
                continue; // already asked for
            }
            let is_local = local.contains(&c.id);
            let slot = &mut open[usize::from(is_local)];
            let full = match slot {
                Some((i, bytes)) => {
                    *bytes + u64::from(c.size) > REQUEST_BYTES
                        || reqs[*i].want.len() >= MAX_WANTS_PER_REQUEST
                }
                None => true,
            };
            if full {
                reqs.push(Req {
                    want: Vec::new(),
                    first_offset: offset,
                    local: is_local,
                    inflight: HashSet::new(),
                    failed: HashSet::new(),
                    sent: None,
                });
                *slot = Some((reqs.len() - 1, 0));
            }
            if let Some((i, bytes)) = slot {
                reqs[*i].want.push((c.id, c.size));
                *bytes += u64::from(c.size);
            }
        }
        Metrics::inc(&metrics.p2p_chunks_local, local.len() as u64);
        let queue = (0..reqs.len()).collect();
        Self {
            manifest,
            reqs,
            queue,
            peers: providers
                .iter()
                .map(|&id| PeerState {
                    id,
                    inflight: 0,
                    failures: 0,
                    dropped: false,
                })
                .collect(),
            ready: HashMap::new(),
            uses,
            local_inflight: 0,
            client,
            store,
            metrics,
        }
    }

    /// Fetches and sends every chunk in order; `Err` when some chunk cannot be had.
    async fn run(
        mut self,
        tx: tokio::sync::mpsc::Sender<Result<Fetched, PeerError>>,
    ) -> Result<(), PeerError> {
        let order: Vec<(u64, ChunkId)> = self
            .manifest
            .chunk_offsets()
            .map(|(o, c)| (o, c.id))
            .collect();
        let mut next = 0usize;
        let mut inflight: InFlight = FuturesUnordered::new();
        let result = loop {
            // Hand over every chunk that is ready, in order.
            while let Some(&(offset, id)) = order.get(next) {
                let Some((data, left, frame)) = self.ready.get_mut(&id) else {
                    break;
                };
                let frame = frame.take();
                let chunk = if *left <= 1 {
                    self.ready
                        .remove(&id)
                        .map(|(d, _, _)| d)
                        .unwrap_or_default()
                } else {
                    *left -= 1;
                    data.clone()
                };
                let raw_len = chunk.len() as u32;
                let chunk = self.manifest.restore(offset, chunk);
                let item = Fetched {
                    id,
                    raw_len,
                    data: Bytes::from(chunk),
                    frame,
                };
                if tx.send(Ok(item)).await.is_err() {
                    return Ok(()); // the writer gave up; it reports why
                }
                next += 1;
            }
            let Some(&(offset, _)) = order.get(next) else {
                break Ok(());
            };
            self.schedule(offset + LOOKAHEAD_BYTES, &mut inflight);
            // In the endgame, wake up when the oldest outstanding request becomes old enough
            // to be duplicated on an idle provider.
            let wake = self.endgame_wake();
            let next = async {
                match wake {
                    Some(at) => tokio::time::timeout_at(at, inflight.next()).await.ok(),
                    None => Some(inflight.next().await),
                }
            };
            let Some(next) = next.await else {
                continue; // a request became old enough to duplicate
            };
            let Some(outcome) = next else {
                break Err(self.stuck());
            };
            self.on_outcome(outcome).await;
        };
        if result.is_err() {
            let _ = tx.send(Err(self.stuck())).await;
        }
        result
    }

    /// When the next outstanding remote request becomes old enough for the endgame (`None`:
    /// not the endgame, or nothing to duplicate).
    fn endgame_wake(&self) -> Option<tokio::time::Instant> {
        if self.queue.iter().any(|&i| !self.reqs[i].local) {
            return None;
        }
        self.reqs
            .iter()
            .filter(|r| {
                !r.local
                    && !r.want.is_empty()
                    && !r.inflight.is_empty()
                    && r.inflight.len() < ENDGAME_COPIES
            })
            .filter_map(|r| r.sent)
            .map(|t| t + ENDGAME_AFTER)
            .filter(|&t| t > tokio::time::Instant::now())
            .min()
    }

    fn stuck(&self) -> PeerError {
        PeerError::Stuck {
            missing: self.reqs.iter().filter(|r| !r.want.is_empty()).count(),
            usable: self.peers.iter().filter(|p| !p.dropped).count(),
            total: self.peers.len(),
        }
    }

    /// Fills every source's window with queued requests within `horizon`; then, when nothing
    /// remote is queued any more (the endgame), gives idle providers copies of outstanding
    /// requests, oldest first.
    fn schedule(&mut self, horizon: u64, inflight: &mut InFlight) {
        while self.local_inflight < LOCAL_WINDOW {
            let Some(pos) = self
                .queue
                .iter()
                .position(|&i| self.reqs[i].local && self.reqs[i].first_offset < horizon)
            else {
                break;
            };
            let i = self.queue.remove(pos).unwrap_or_default();
            self.launch(i, Via::Local, inflight);
        }
        loop {
            let mut progressed = false;
            for p in 0..self.peers.len() {
                let (peer, free) = {
                    let s = &self.peers[p];
                    (s.id, !s.dropped && s.inflight < PEER_WINDOW)
                };
                if !free {
                    continue;
                }
                let queued = self.queue.iter().position(|&i| {
                    let r = &self.reqs[i];
                    !r.local && r.first_offset < horizon && !r.failed.contains(&peer)
                });
                if let Some(pos) = queued {
                    let i = self.queue.remove(pos).unwrap_or_default();
                    self.launch(i, Via::Peer(peer), inflight);
                    progressed = true;
                    continue;
                }
                if self.queue.iter().any(|&i| !self.reqs[i].local) {
                    continue; // not the endgame yet
                }
                let dup = (0..self.reqs.len())
                    .filter(|&i| {
                        let r = &self.reqs[i];
                        !r.local
                            && !r.want.is_empty()
                            && !r.inflight.is_empty()
                            && r.inflight.len() < ENDGAME_COPIES
                            && !r.inflight.contains(&Via::Peer(peer))
                            && !r.failed.contains(&peer)
                            && r.sent.is_some_and(|t| t.elapsed() >= ENDGAME_AFTER)
                    })
                    .min_by_key(|&i| self.reqs[i].first_offset);
                if let Some(i) = dup {
                    Metrics::inc(&self.metrics.p2p_endgame_requests, 1);
                    self.launch(i, Via::Peer(peer), inflight);
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
        }
    }

    fn launch(&mut self, i: usize, src: Via, inflight: &mut InFlight) {
        let want = self.reqs[i].want.clone();
        if self.reqs[i].inflight.is_empty() {
            self.reqs[i].sent = Some(tokio::time::Instant::now());
        }
        self.reqs[i].inflight.insert(src);
        match src {
            Via::Local => {
                self.local_inflight += 1;
                let store = self.store.clone();
                inflight.push(Box::pin(async move {
                    let r = tokio::task::spawn_blocking(move || read_local(&store, &want))
                        .await
                        .map_err(|e| format!("local read task: {e}"));
                    (i, src, r)
                }));
            }
            Via::Peer(peer) => {
                if let Some(p) = self.peers.iter_mut().find(|p| p.id == peer) {
                    p.inflight += 1;
                }
                let client = self.client.clone();
                inflight.push(Box::pin(async move {
                    (i, src, request_blocks(&client, peer, &want).await)
                }));
            }
        }
    }

    async fn on_outcome(&mut self, (i, src, result): Outcome) {
        self.reqs[i].inflight.remove(&src);
        match src {
            Via::Local => self.local_inflight -= 1,
            Via::Peer(peer) => {
                if let Some(p) = self.peers.iter_mut().find(|p| p.id == peer) {
                    p.inflight -= 1;
                }
            }
        }
        let mut progress = false;
        let mut bad = false;
        match result {
            Ok(checked) => {
                for (id, r) in checked {
                    let Some(pos) = self.reqs[i].want.iter().position(|(w, _)| *w == id) else {
                        continue; // not asked for, or already had from another copy
                    };
                    match r {
                        Ok((data, frame)) => {
                            self.reqs[i].want.swap_remove(pos);
                            let uses = self.uses.get(&id).copied().unwrap_or(1);
                            self.ready.insert(id, (data, uses, frame));
                            progress = true;
                            if src != Via::Local {
                                Metrics::inc(&self.metrics.p2p_blocks, 1);
                            }
                        }
                        Err(()) => bad = true,
                    }
                }
            }
            Err(e) => {
                tracing::debug!(?src, error = %e, "chunk request failed");
                if src != Via::Local {
                    Metrics::inc(&self.metrics.p2p_request_failures, 1);
                }
            }
        }
        match src {
            Via::Local => {
                if !self.reqs[i].want.is_empty() {
                    // Damaged or gone since the plan: ask the peers instead.
                    tracing::warn!(chunks = self.reqs[i].want.len(), "local chunks unreadable");
                    self.reqs[i].local = false;
                }
            }
            Via::Peer(peer) => {
                if bad {
                    Metrics::inc(&self.metrics.p2p_bad_blocks, 1);
                    tracing::warn!(%peer, "peer sent a block that does not match its id: banned");
                    if let Err(e) = self.client.disconnect(peer, BAN).await {
                        tracing::debug!(%peer, error = %e, "disconnecting");
                    }
                }
                if let Some(p) = self.peers.iter_mut().find(|p| p.id == peer) {
                    if bad {
                        p.dropped = true;
                    } else if progress {
                        p.failures = 0;
                    } else {
                        p.failures += 1;
                        p.dropped |= p.failures >= MAX_PEER_FAILURES;
                    }
                }
                if bad || !progress {
                    self.reqs[i].failed.insert(peer);
                }
            }
        }
        let r = &self.reqs[i];
        if !r.want.is_empty() && r.inflight.is_empty() && !self.queue.contains(&i) {
            let at = self
                .queue
                .iter()
                .position(|&q| self.reqs[q].first_offset > r.first_offset)
                .unwrap_or(self.queue.len());
            self.queue.insert(at, i);
        }
    }
}

/// Reads chunks from the store, each checked against its id like a peer's.
fn read_local(store: &Store, want: &[(ChunkId, u32)]) -> Checked {
    want.iter()
        .filter_map(|&(id, size)| match store.chunk_data(&id) {
            // Checked against its id by the store; the manifest's size must match too.
            Ok(Some(data)) => Some((
                id,
                (data.len() == size as usize)
                    .then_some((data, None))
                    .ok_or(()),
            )),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(chunk = %id, error = %e, "reading a local chunk");
                None
            }
        })
        .collect()
}

/// Asks `peer` for blocks; checks each one it sends (blocks not asked for are dropped).
async fn request_blocks(
    client: &Client,
    peer: PeerId,
    want: &[(ChunkId, u32)],
) -> Result<Checked, String> {
    let entries = want
        .iter()
        .enumerate()
        .map(|(i, (id, _))| pb::wantlist::Entry {
            cid: id.to_cid_bytes().to_vec(),
            priority: (MAX_WANTS_PER_REQUEST - i.min(MAX_WANTS_PER_REQUEST)) as i32,
            cancel: false,
            want_type: pb::wantlist::WantType::Block as i32,
            send_dont_have: true,
        })
        .collect();
    let req = pb::Request {
        kind: Some(pb::request::Kind::Wantlist(pb::Wantlist {
            entries,
            full: false,
        })),
    };
    let resp = match tokio::time::timeout(REQUEST_TIMEOUT, client.request(peer, req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("no answer from {peer} within {REQUEST_TIMEOUT:?}")),
    };
    let sizes: HashMap<ChunkId, u32> = want.iter().copied().collect();
    Ok(resp
        .blocks
        .into_iter()
        .filter_map(|b| {
            let id = ChunkId::from_cid_bytes(&b.cid).ok()?;
            let size = *sizes.get(&id)?;
            let data = check_block(&id, size, &b.data).ok_or(());
            Some((id, data.map(|d| (d, Some(Bytes::from(b.data))))))
        })
        .collect())
}

#[cfg(test)]
#[path = "fetch_tests.rs"]
mod swarm_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_block_refuses_wrong_and_oversized() {
        let data = b"hello chunk".repeat(10);
        let id = ChunkId::of(&data);
        let z = zstd::bulk::compress(&data, 1).unwrap();
        assert_eq!(check_block(&id, data.len() as u32, &z), Some(data.clone()));
        assert!(check_block(&id, data.len() as u32 - 1, &z).is_none());
        assert!(check_block(&ChunkId::of(b"x"), data.len() as u32, &z).is_none());
    }
}

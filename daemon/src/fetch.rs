//! Fetching from peers (design §4): narinfos from connected peers within a short budget, NARs
//! as chunks from several providers at once.
//!
//! narinfo path: on a local miss, every connected peer is asked at once (`NarInfoRequest`);
//! the first answer within [`NARINFO_BUDGET`] that passes [`check_narinfo`] is kept *pending*
//! (with the peer that sent it) and served, and a DHT provider lookup for its NAR starts in the
//! background so the NAR request that follows finds the providers ready. Never a DHT walk on
//! the narinfo path itself.
//!
//! NAR path (one fetch per NarHash at a time, different NARs in parallel): providers are the
//! LAN (mDNS) peers, the peer that sent the narinfo and the DHT's, minus banned ones. A
//! manifest is taken from the first provider that sends one matching the narinfo's
//! NarHash/NarSize; chunks the store already has are read locally; the rest are asked for in
//! requests of at most [`REQUEST_BYTES`] / `MAX_WANTS_PER_REQUEST` chunks, scheduled by
//! [`Transfer`]: each provider keeps up to [`PEER_WINDOW`] requests in flight (so faster peers
//! pull more), a failed or timed-out request goes to another provider, and when nothing is left
//! to hand out, idle providers duplicate the oldest outstanding requests (the endgame). Every
//! block is decompressed within its declared size and checked against its id; a peer that
//! sends a bad block is disconnected and banned ([`BAN`]). Chunks are restored (slot table) in
//! order and streamed through a bounded channel into [`Store::ingest`] on a blocking thread,
//! which checks NarHash, NarSize and the NAR structure. If every block checked out but the NAR
//! does not hash to NarHash, the manifest lied: its sender is banned and the next provider's
//! manifest is tried. Memory is bounded by [`LOOKAHEAD_BYTES`] of chunks ahead of the ingest.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use libp2p::PeerId;
use nix_p2p_cache_proto::v1 as pb;
use nix_p2p_cache_proto::MAX_WANTS_PER_REQUEST;
use tokio::sync::OnceCell;
use tracing::Instrument;

use crate::core::manifest::Manifest;
use crate::core::narinfo::NarInfo;
use crate::core::signing::{PublicKey, Trust};
use crate::core::store_path::StorePathHash;
use crate::core::{ChunkId, NarHash};
use crate::import::check_narinfo;
use crate::metrics::{Metrics, NetGauges};
use crate::net::Client;
use crate::pending::{NarLocks, Pending, PendingNarinfos};
use crate::store::{Store, StoreError};
use crate::upstream::ChannelReader;

/// Overall budget for asking connected peers for a narinfo.
pub const NARINFO_BUDGET: Duration = Duration::from_millis(50);
/// Longest wait for the DHT's providers of a NAR.
pub const PROVIDERS_TIMEOUT: Duration = Duration::from_secs(2);
/// Connected peers without a provider record tried as providers too.
const EXTRA_CONNECTED: usize = 8;
/// Longest wait for a manifest from one provider.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for one block request (at most [`REQUEST_BYTES`] of chunks).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Uncompressed chunk bytes asked for in one request (fits a 4 MiB response).
const REQUEST_BYTES: u64 = 1 << 20;
/// Requests in flight to one provider.
pub const PEER_WINDOW: usize = 4;
/// Requests for chunks the store already has, read at once.
const LOCAL_WINDOW: usize = 2;
/// Chunks are not requested further than this ahead of what the ingest has taken.
const LOOKAHEAD_BYTES: u64 = 32 << 20;
/// Copies of one request in flight in the endgame (the original included).
const ENDGAME_COPIES: usize = 2;
/// Consecutive failed requests after which a provider is dropped from one fetch.
const MAX_PEER_FAILURES: u32 = 3;
/// Manifests tried for one NAR (each from another provider) before giving up.
const MAX_MANIFESTS: usize = 3;
/// How long a peer that sent a bad block or a lying manifest is refused.
pub const BAN: Duration = Duration::from_secs(3600);
/// Restored chunks queued between the network and the ingesting thread.
const QUEUE: usize = 16;
/// Pending narinfos kept (cleared when full).
const PENDING_ENTRIES: usize = 16 * 1024;
/// Background provider lookups kept (cleared when full).
const LOOKUP_ENTRIES: usize = 4 * 1024;
/// NAR fetch locks kept before idle ones are pruned.
const LOCK_ENTRIES: usize = 1024;

/// What [`Peers::fetch_nar`] did.
#[derive(Debug)]
pub enum PeerFetch {
    /// No pending peer narinfo names this NAR.
    NotPending,
    /// The store has the NAR now.
    Stored,
    /// Every provider failed; the pending narinfo of `path` was dropped.
    Failed { path: StorePathHash, error: String },
}

type Lookup = Arc<OnceCell<Vec<PeerId>>>;

/// Some connected peer did not answer a narinfo request within [`NARINFO_BUDGET`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unanswered;

/// The P2P side of the daemon: a network client, the trusted keys, pending narinfos and
/// background provider lookups.
pub struct Peers {
    client: Client,
    trusted: Vec<PublicKey>,
    pending: PendingNarinfos<PeerId>,
    lookups: Mutex<HashMap<NarHash, Lookup>>,
    locks: NarLocks,
    metrics: Arc<Metrics>,
    announce: Box<dyn Fn(NarHash) + Send + Sync>,
}

impl Peers {
    /// `announce` is called with every NAR fetched and stored (it must not block).
    pub fn new(
        client: Client,
        trusted: Vec<PublicKey>,
        metrics: Arc<Metrics>,
        announce: Box<dyn Fn(NarHash) + Send + Sync>,
    ) -> Self {
        Self {
            client,
            trusted,
            pending: PendingNarinfos::new(PENDING_ENTRIES),
            lookups: Mutex::new(HashMap::new()),
            locks: NarLocks::new(LOCK_ENTRIES),
            metrics,
            announce,
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Announces a NAR (callable from any thread; never blocks).
    pub fn announce(&self, nar_hash: NarHash) {
        (self.announce)(nar_hash)
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
        }
    }

    /// Asks the connected peers for the narinfo of `hash` (within [`NARINFO_BUDGET`]).
    /// `Ok(None)`: every peer answered without it (or there are none); `Err(Unanswered)`: none
    /// had it, but some did not answer in time.
    pub async fn narinfo(&self, hash: &StorePathHash) -> Result<Option<Arc<str>>, Unanswered> {
        if let Some(t) = self.pending.text(hash) {
            return Ok(Some(t));
        }
        let Ok(peers) = self.client.connected_peers().await else {
            return Ok(None);
        };
        if peers.is_empty() {
            return Ok(None);
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
        let found = tokio::time::timeout(NARINFO_BUDGET, async {
            while let Some((peer, r)) = asks.next().await {
                let Ok(pb::Response {
                    narinfo: Some(text),
                    ..
                }) = r
                else {
                    continue;
                };
                match check_narinfo(&text, Some(hash), &self.trusted) {
                    Ok((info, trust @ Trust::Trusted { .. })) => {
                        return Some((peer, text, info, trust))
                    }
                    Ok(_) => tracing::debug!(%peer, "peer narinfo not trusted"),
                    Err(e) => tracing::warn!(%peer, error = %e, "peer narinfo refused"),
                }
            }
            None
        })
        .await;
        let (peer, text, info, trust) = match found {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(None),
            Err(_) => return Err(Unanswered),
        };
        self.start_lookup(info.nar_hash);
        let text: Arc<str> = Arc::from(text);
        self.pending.insert(
            hash.clone(),
            Pending {
                source: peer,
                text: text.clone(),
                info: Arc::new(info),
                trust,
            },
        );
        tracing::debug!(%peer, hash = hash.as_str(), "narinfo from a peer");
        Ok(Some(text))
    }

    fn lookup_cell(&self, nar_hash: NarHash) -> Lookup {
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

    /// Makes sure the store holds `nar_hash`, fetching it from peers if a pending peer
    /// narinfo names it. One fetch per NAR at a time; different NARs in parallel.
    pub async fn fetch_nar(&self, store: &Arc<Store>, nar_hash: &NarHash) -> PeerFetch {
        let span = tracing::info_span!("peer_fetch", nar = %nar_hash);
        self.locks
            .with(
                nar_hash,
                self.fetch_locked(store, nar_hash).instrument(span),
            )
            .await
    }

    async fn fetch_locked(&self, store: &Arc<Store>, nar_hash: &NarHash) -> PeerFetch {
        let Some((path, pending)) = self.pending.by_nar(nar_hash) else {
            return PeerFetch::NotPending;
        };
        let s = store.clone();
        let h = *nar_hash;
        let stored = matches!(
            tokio::task::spawn_blocking(move || s.has_nar(&h)).await,
            Ok(Ok(true))
        );
        let r = if stored {
            Ok(())
        } else {
            self.fetch_from_peers(store, pending).await
        };
        self.pending.remove(nar_hash, &path);
        match r {
            Ok(()) => {
                Metrics::inc(&self.metrics.p2p_nars, 1);
                self.announce(*nar_hash);
                PeerFetch::Stored
            }
            Err(error) => {
                Metrics::inc(&self.metrics.p2p_nar_failures, 1);
                tracing::warn!(%error, "fetching the NAR from peers failed");
                PeerFetch::Failed { path, error }
            }
        }
    }

    /// Providers in the order they are tried: LAN peers, the narinfo's sender, the DHT's,
    /// then (up to [`EXTRA_CONNECTED`]) other connected peers, which may hold the NAR without
    /// a provider record yet; one that does not is dropped after a few empty answers.
    async fn providers(&self, first: PeerId, nar_hash: NarHash) -> Vec<PeerId> {
        let me = self.client.local_peer_id();
        let mut out: Vec<PeerId> = self.client.lan_peers().await.unwrap_or_default();
        out.push(first);
        out.extend(self.dht_providers(nar_hash).await);
        let mut seen = HashSet::new();
        out.retain(|p| *p != me && seen.insert(*p));
        let connected = self.client.connected_peers().await.unwrap_or_default();
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
        pending: Pending<PeerId>,
    ) -> Result<(), String> {
        let Pending {
            source: first,
            text,
            info,
            trust,
        } = pending;
        let mut providers = self.providers(first, info.nar_hash).await;
        tracing::debug!(providers = providers.len(), "fetching from peers");
        let mut asked = HashSet::new();
        for _ in 0..MAX_MANIFESTS {
            let (manifest, from) = self.manifest(&providers, &mut asked, &info).await?;
            match self
                .transfer(store, &info, &text, &trust, (manifest, from), &providers)
                .await
            {
                Ok(()) => return Ok(()),
                Err(TransferError::BadManifest(e)) => {
                    Metrics::inc(&self.metrics.p2p_bad_manifests, 1);
                    tracing::warn!(peer = %from, error = %e, "manifest did not reproduce the NAR");
                    self.ban(from).await;
                    providers.retain(|p| *p != from);
                }
                Err(TransferError::Other(e)) => return Err(e),
            }
        }
        Err(format!("{MAX_MANIFESTS} manifests from peers were wrong"))
    }

    async fn ban(&self, peer: PeerId) {
        if let Err(e) = self.client.disconnect(peer, BAN).await {
            tracing::debug!(%peer, error = %e, "disconnecting");
        }
    }

    /// The manifest of `info`'s NAR from the first provider not asked yet that sends a
    /// matching one. A provider that sends garbage or another NAR's manifest is banned.
    async fn manifest(
        &self,
        providers: &[PeerId],
        asked: &mut HashSet<PeerId>,
        info: &NarInfo,
    ) -> Result<(Manifest, PeerId), String> {
        let key = info.nar_hash.nar_key().multihash_bytes();
        for &peer in providers {
            if !asked.insert(peer) {
                continue;
            }
            let req = pb::Request {
                kind: Some(pb::request::Kind::Manifest(pb::ManifestRequest {
                    nar_key: key.clone(),
                })),
            };
            let bytes = match tokio::time::timeout(MANIFEST_TIMEOUT, self.client.request(peer, req))
                .await
            {
                Ok(Ok(pb::Response {
                    manifest: Some(b), ..
                })) => b,
                Ok(Ok(_)) => continue, // does not share it
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "manifest request failed");
                    continue;
                }
                Err(_) => continue,
            };
            match Manifest::decode(&bytes) {
                Ok(m) if m.nar_hash == info.nar_hash && m.nar_size == info.nar_size => {
                    return Ok((m, peer))
                }
                Ok(_) => tracing::warn!(%peer, "peer sent a manifest of another NAR"),
                Err(e) => tracing::warn!(%peer, error = %e, "peer sent a bad manifest"),
            }
            Metrics::inc(&self.metrics.p2p_bad_manifests, 1);
            self.ban(peer).await;
        }
        Err(format!(
            "no provider sent a usable manifest ({} providers)",
            providers.len()
        ))
    }

    /// Streams the NAR of `manifest` into the store from `providers` (and local chunks).
    async fn transfer(
        &self,
        store: &Arc<Store>,
        info: &Arc<NarInfo>,
        text: &Arc<str>,
        trust: &Trust,
        (manifest, manifest_from): (Manifest, PeerId),
        providers: &[PeerId],
    ) -> Result<(), TransferError> {
        let ids: Vec<ChunkId> = manifest.chunks.iter().map(|c| c.id).collect();
        let s = store.clone();
        let local: HashSet<ChunkId> = tokio::task::spawn_blocking(move || {
            let mut out = HashSet::new();
            for id in ids {
                if s.has_chunk(&id)? {
                    out.insert(id);
                }
            }
            Ok::<_, StoreError>(out)
        })
        .await
        .map_err(|e| TransferError::Other(format!("task: {e}")))?
        .map_err(|e| TransferError::Other(format!("store: {e}")))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(QUEUE);
        // The store records where a narinfo's NAR came from: the manifest's sender.
        let source = format!("peer {manifest_from}");
        let (s, i, t, tr) = (store.clone(), info.clone(), text.clone(), trust.clone());
        let ingest = tokio::task::spawn_blocking(move || {
            s.ingest(&i, &t, &tr, &source, || {
                Ok(io::BufReader::with_capacity(
                    1 << 20,
                    ChannelReader::new(rx),
                ))
            })
        });
        let transfer = Transfer::new(
            manifest,
            &local,
            providers,
            self.client.clone(),
            store.clone(),
            self.metrics.clone(),
        );
        let pump = tokio::spawn(transfer.run(tx));
        let outcome = ingest.await;
        // The pump ends by itself once everything is sent or the ingest hung up.
        let pumped = match pump.await {
            Ok(r) => r,
            Err(e) => Err(format!("transfer task: {e}")),
        };
        match outcome {
            Ok(Ok(o)) => {
                tracing::info!(nar_size = o.nar_size, "ingested NAR from peers");
                Ok(())
            }
            // Every chunk checked against its id, yet the NAR is wrong: the manifest lied.
            Ok(Err(
                e @ (StoreError::NarHashMismatch { .. }
                | StoreError::NarSizeMismatch { .. }
                | StoreError::BadNar { .. }),
            )) if pumped.is_ok() => Err(TransferError::BadManifest(e.to_string())),
            Ok(Err(e)) => Err(TransferError::Other(match pumped {
                Err(p) => p,
                Ok(()) => format!("ingest: {e}"),
            })),
            Err(e) => Err(TransferError::Other(format!("ingest task: {e}"))),
        }
    }
}

#[derive(Debug)]
enum TransferError {
    BadManifest(String),
    Other(String),
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

/// Checks one block: decompresses within `size` and compares its id.
fn check_block(id: &ChunkId, size: u32, data: &[u8]) -> Option<Vec<u8>> {
    let out = zstd::bulk::decompress(data, size as usize).ok()?;
    (out.len() == size as usize && ChunkId::of(&out) == *id).then_some(out)
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
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
    inflight: HashSet<Source>,
    /// Providers that failed it.
    failed: HashSet<PeerId>,
}

struct PeerState {
    id: PeerId,
    inflight: usize,
    /// Consecutive requests that brought nothing.
    failures: u32,
    dropped: bool,
}

/// What one request brought: each chunk checked (`Err(())`: it did not match its id).
type Checked = Vec<(ChunkId, Result<Vec<u8>, ()>)>;
type Outcome = (usize, Source, Result<Checked, String>);
type InFlight = FuturesUnordered<futures_util::future::BoxFuture<'static, Outcome>>;

/// The scheduler of one NAR's chunks over providers; see the module docs.
struct Transfer {
    manifest: Manifest,
    reqs: Vec<Req>,
    /// Requests neither done nor in flight, by first offset.
    queue: VecDeque<usize>,
    peers: Vec<PeerState>,
    /// Verified chunks not yet handed to the ingest, with their remaining uses.
    ready: HashMap<ChunkId, (Vec<u8>, u32)>,
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
    async fn run(mut self, tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>) -> Result<(), String> {
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
                let Some((data, left)) = self.ready.get_mut(&id) else {
                    break;
                };
                let mut chunk = if *left <= 1 {
                    self.ready.remove(&id).map(|(d, _)| d).unwrap_or_default()
                } else {
                    *left -= 1;
                    data.clone()
                };
                self.manifest.slots.restore(offset, &mut chunk);
                if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                    return Ok(()); // the ingest gave up; it reports why
                }
                next += 1;
            }
            let Some(&(offset, _)) = order.get(next) else {
                break Ok(());
            };
            self.schedule(offset + LOOKAHEAD_BYTES, &mut inflight);
            let Some(outcome) = inflight.next().await else {
                break Err(self.stuck());
            };
            self.on_outcome(outcome).await;
        };
        if let Err(e) = &result {
            let _ = tx.send(Err(io::Error::other(e.clone()))).await;
        }
        result
    }

    fn stuck(&self) -> String {
        let missing = self.reqs.iter().filter(|r| !r.want.is_empty()).count();
        let usable = self.peers.iter().filter(|p| !p.dropped).count();
        format!(
            "{missing} chunk requests could not be served ({usable} of {} providers left)",
            self.peers.len()
        )
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
            self.launch(i, Source::Local, inflight);
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
                    self.launch(i, Source::Peer(peer), inflight);
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
                            && !r.inflight.contains(&Source::Peer(peer))
                            && !r.failed.contains(&peer)
                    })
                    .min_by_key(|&i| self.reqs[i].first_offset);
                if let Some(i) = dup {
                    Metrics::inc(&self.metrics.p2p_endgame_requests, 1);
                    self.launch(i, Source::Peer(peer), inflight);
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
        }
    }

    fn launch(&mut self, i: usize, src: Source, inflight: &mut InFlight) {
        let want = self.reqs[i].want.clone();
        self.reqs[i].inflight.insert(src);
        match src {
            Source::Local => {
                self.local_inflight += 1;
                let store = self.store.clone();
                inflight.push(Box::pin(async move {
                    let r = tokio::task::spawn_blocking(move || read_local(&store, &want))
                        .await
                        .map_err(|e| format!("local read task: {e}"));
                    (i, src, r)
                }));
            }
            Source::Peer(peer) => {
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
            Source::Local => self.local_inflight -= 1,
            Source::Peer(peer) => {
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
                        Ok(data) => {
                            self.reqs[i].want.swap_remove(pos);
                            let uses = self.uses.get(&id).copied().unwrap_or(1);
                            self.ready.insert(id, (data, uses));
                            progress = true;
                            if src != Source::Local {
                                Metrics::inc(&self.metrics.p2p_blocks, 1);
                            }
                        }
                        Err(()) => bad = true,
                    }
                }
            }
            Err(e) => {
                tracing::debug!(?src, error = %e, "chunk request failed");
                if src != Source::Local {
                    Metrics::inc(&self.metrics.p2p_request_failures, 1);
                }
            }
        }
        match src {
            Source::Local => {
                if !self.reqs[i].want.is_empty() {
                    // Damaged or gone since the plan: ask the peers instead.
                    tracing::warn!(chunks = self.reqs[i].want.len(), "local chunks unreadable");
                    self.reqs[i].local = false;
                }
            }
            Source::Peer(peer) => {
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
        .filter_map(|&(id, size)| match store.chunk_frame(&id) {
            Ok(Some(frame)) => Some((id, check_block(&id, size, &frame).ok_or(()))),
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
            Some((id, check_block(&id, size, &b.data).ok_or(())))
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

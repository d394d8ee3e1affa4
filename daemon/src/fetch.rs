//! Fetching from peers (design §4): narinfos from connected peers within a short budget, NARs
//! as chunks from providers, and announcing what the store holds.
//!
//! narinfo path: on a local miss, every connected peer is asked at once (`NarInfoRequest`);
//! the first answer within [`NARINFO_BUDGET`] that passes [`check_narinfo`] is kept *pending*
//! (with the peer that sent it) and served. Never a DHT walk on this path.
//!
//! NAR path: providers are the peer that sent the narinfo plus the DHT's (bounded by
//! [`PROVIDERS_TIMEOUT`]). The manifest is fetched and checked against the narinfo's
//! NarHash/NarSize; blocks are requested in batches of at most `MAX_WANTS_PER_REQUEST`,
//! spread round-robin over providers, a few batches in flight ([`BATCHES_IN_FLIGHT`]); each
//! block is decompressed within its declared size and checked against its id (a bad or missing
//! block is asked of the next provider). Chunks are restored (slot table) in order and streamed
//! through a bounded channel into [`Store::ingest`] on a blocking thread, which checks NarHash,
//! NarSize and the NAR structure. Memory is bounded by the batches in flight.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, FuturesUnordered, StreamExt};
use libp2p::PeerId;
use nix_p2p_cache_proto::v1 as pb;
use nix_p2p_cache_proto::MAX_WANTS_PER_REQUEST;

use crate::core::manifest::Manifest;
use crate::core::narinfo::NarInfo;
use crate::core::signing::{PublicKey, Trust};
use crate::core::store_path::StorePathHash;
use crate::core::{ChunkId, NarHash};
use crate::import::check_narinfo;
use crate::net::Client;
use crate::pending::{Pending, PendingNarinfos};
use crate::store::Store;
use crate::upstream::ChannelReader;

/// Overall budget for asking connected peers for a narinfo.
pub const NARINFO_BUDGET: Duration = Duration::from_millis(50);
/// Longest wait for the DHT's providers of a NAR.
pub const PROVIDERS_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for one exchange request while fetching a NAR.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Block batches requested at once for one NAR.
const BATCHES_IN_FLIGHT: usize = 4;
/// Restored chunks queued between the network and the ingesting thread.
const QUEUE: usize = 16;
/// `start_providing` calls at once (startup announce).
const ANNOUNCE_CONCURRENCY: usize = 8;
/// Pending narinfos kept (cleared when full).
const PENDING_ENTRIES: usize = 16 * 1024;

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

/// The P2P side of the daemon: a network client, the trusted keys and pending narinfos.
pub struct Peers {
    client: Client,
    trusted: Vec<PublicKey>,
    pending: PendingNarinfos<PeerId>,
    fetching: tokio::sync::Mutex<()>,
    runtime: tokio::runtime::Handle,
}

impl Peers {
    /// Must be called on the runtime (announcements are spawned on it).
    pub fn new(client: Client, trusted: Vec<PublicKey>) -> Self {
        Self {
            client,
            trusted,
            pending: PendingNarinfos::new(PENDING_ENTRIES),
            fetching: tokio::sync::Mutex::new(()),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Announces a NAR in the background (callable from any thread).
    pub fn announce(&self, nar_hash: NarHash) {
        let client = self.client.clone();
        self.runtime.spawn(async move {
            if let Err(e) = client.start_providing(nar_hash.nar_key()).await {
                tracing::debug!(nar = %nar_hash, error = %e, "announce failed");
            }
        });
    }

    /// Announces every trusted NAR of the store, a few at a time.
    pub async fn announce_all(&self, store: Arc<Store>) {
        let nars = match tokio::task::spawn_blocking(move || store.shareable_nars()).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "listing NARs to announce");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "listing NARs to announce");
                return;
            }
        };
        let n = nars.len();
        let client = self.client.clone();
        stream::iter(nars)
            .map(|h| {
                let client = client.clone();
                async move {
                    if let Err(e) = client.start_providing(h.nar_key()).await {
                        tracing::debug!(nar = %h, error = %e, "announce failed");
                    }
                }
            })
            .buffer_unordered(ANNOUNCE_CONCURRENCY)
            .collect::<()>()
            .await;
        tracing::info!(nars = n, "announced the store's trusted NARs");
    }

    /// Asks the connected peers for the narinfo of `hash` (within [`NARINFO_BUDGET`]).
    pub async fn narinfo(&self, hash: &StorePathHash) -> Option<Arc<str>> {
        if let Some(t) = self.pending.text(hash) {
            return Some(t);
        }
        let peers = self.client.connected_peers().await.ok()?;
        if peers.is_empty() {
            return None;
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
        .await
        .ok()
        .flatten()?;
        let (peer, text, info, trust) = found;
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
        Some(text)
    }

    /// Makes sure the store holds `nar_hash`, fetching it from peers if a pending peer
    /// narinfo names it. One fetch at a time.
    pub async fn fetch_nar(&self, store: &Arc<Store>, nar_hash: &NarHash) -> PeerFetch {
        let _guard = self.fetching.lock().await;
        let Some((path, pending)) = self.pending.by_nar(nar_hash) else {
            return PeerFetch::NotPending;
        };
        let Pending {
            source: peer,
            text,
            info,
            trust,
        } = pending;
        let s = store.clone();
        let h = *nar_hash;
        let stored = matches!(
            tokio::task::spawn_blocking(move || s.has_nar(&h)).await,
            Ok(Ok(true))
        );
        let r = if stored {
            Ok(())
        } else {
            self.fetch_from_peers(store, peer, text, info, trust).await
        };
        self.pending.remove(nar_hash, &path);
        match r {
            Ok(()) => {
                self.announce(*nar_hash);
                PeerFetch::Stored
            }
            Err(error) => {
                tracing::warn!(nar = %nar_hash, %error, "fetching the NAR from peers failed");
                PeerFetch::Failed { path, error }
            }
        }
    }

    async fn fetch_from_peers(
        &self,
        store: &Arc<Store>,
        first: PeerId,
        text: Arc<str>,
        info: Arc<NarInfo>,
        trust: Trust,
    ) -> Result<(), String> {
        let me = self.client.local_peer_id();
        let mut providers = vec![first];
        if let Ok(Ok(found)) = tokio::time::timeout(
            PROVIDERS_TIMEOUT,
            self.client.get_providers(info.nar_hash.nar_key()),
        )
        .await
        {
            for p in found {
                if p != me && !providers.contains(&p) {
                    providers.push(p);
                }
            }
        }
        let manifest = self.manifest(&providers, &info).await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(QUEUE);
        let source = format!("peer {first}");
        let s = store.clone();
        let ingest = tokio::task::spawn_blocking(move || {
            s.ingest(&info, &text, &trust, &source, || {
                Ok(io::BufReader::with_capacity(
                    1 << 20,
                    ChannelReader::new(rx),
                ))
            })
        });
        let manifest = Arc::new(manifest);
        let batches: Vec<Vec<(u64, ChunkId, u32)>> = manifest
            .chunk_offsets()
            .map(|(off, c)| (off, c.id, c.size))
            .collect::<Vec<_>>()
            .chunks(MAX_WANTS_PER_REQUEST)
            .map(<[_]>::to_vec)
            .collect();
        let providers = Arc::new(providers);
        let client = self.client.clone();
        let m = manifest.clone();
        let pump = async move {
            let mut results = stream::iter(batches.into_iter().enumerate())
                .map(|(i, batch)| fetch_batch(client.clone(), providers.clone(), i, batch))
                .buffered(BATCHES_IN_FLIGHT);
            while let Some(r) = results.next().await {
                match r {
                    Ok(chunks) => {
                        for (off, mut data) in chunks {
                            m.slots.restore(off, &mut data);
                            if tx.send(Ok(Bytes::from(data))).await.is_err() {
                                return; // the ingest gave up
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(io::Error::other(e))).await;
                        return;
                    }
                }
            }
        };
        let pump = tokio::spawn(pump);
        let outcome = ingest.await;
        pump.abort();
        match outcome {
            Ok(Ok(o)) => {
                tracing::info!(nar_size = o.nar_size, "ingested NAR from peers");
                Ok(())
            }
            Ok(Err(e)) => Err(format!("ingest: {e}")),
            Err(e) => Err(format!("ingest task: {e}")),
        }
    }

    /// The manifest of `info`'s NAR from the first provider that sends a matching one.
    async fn manifest(&self, providers: &[PeerId], info: &NarInfo) -> Result<Manifest, String> {
        let key = info.nar_hash.nar_key().multihash_bytes();
        for &peer in providers {
            let req = pb::Request {
                kind: Some(pb::request::Kind::Manifest(pb::ManifestRequest {
                    nar_key: key.clone(),
                })),
            };
            let bytes =
                match tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(peer, req)).await {
                    Ok(Ok(pb::Response {
                        manifest: Some(b), ..
                    })) => b,
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "manifest request failed");
                        continue;
                    }
                    Err(_) => continue,
                };
            match Manifest::decode(&bytes) {
                Ok(m) if m.nar_hash == info.nar_hash && m.nar_size == info.nar_size => {
                    return Ok(m)
                }
                Ok(_) => tracing::warn!(%peer, "peer sent a manifest of another NAR"),
                Err(e) => tracing::warn!(%peer, error = %e, "peer sent a bad manifest"),
            }
        }
        Err(format!(
            "no provider sent the manifest ({} asked)",
            providers.len()
        ))
    }
}

/// Checks one block: decompresses within `size` and compares its id.
fn check_block(id: &ChunkId, size: u32, data: &[u8]) -> Option<Vec<u8>> {
    let out = zstd::bulk::decompress(data, size as usize).ok()?;
    (out.len() == size as usize && ChunkId::of(&out) == *id).then_some(out)
}

/// Fetches one batch of chunks (in order, with their NAR offsets), starting with provider
/// `index % n` and asking the next providers for whatever is missing or wrong.
async fn fetch_batch(
    client: Client,
    providers: Arc<Vec<PeerId>>,
    index: usize,
    batch: Vec<(u64, ChunkId, u32)>,
) -> Result<Vec<(u64, Vec<u8>)>, String> {
    let mut got: HashMap<ChunkId, Vec<u8>> = HashMap::new();
    let n = providers.len();
    // Each provider gets up to two tries (a response can leave blocks out when it is full).
    for attempt in 0..2 * n {
        let missing: Vec<(ChunkId, u32)> = {
            let mut seen = std::collections::HashSet::new();
            batch
                .iter()
                .filter(|(_, id, _)| !got.contains_key(id) && seen.insert(*id))
                .map(|&(_, id, size)| (id, size))
                .collect()
        };
        if missing.is_empty() {
            break;
        }
        let peer = providers[(index + attempt) % n];
        let entries = missing
            .iter()
            .enumerate()
            .map(|(i, (id, _))| pb::wantlist::Entry {
                cid: id.to_cid_bytes().to_vec(),
                priority: (MAX_WANTS_PER_REQUEST - i) as i32,
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
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "block request failed");
                continue;
            }
            Err(_) => {
                tracing::debug!(%peer, "block request timed out");
                continue;
            }
        };
        let sizes: HashMap<ChunkId, u32> = missing.into_iter().collect();
        for block in resp.blocks {
            let Ok(id) = ChunkId::from_cid_bytes(&block.cid) else {
                continue;
            };
            let Some(&size) = sizes.get(&id) else {
                continue;
            };
            match check_block(&id, size, &block.data) {
                Some(data) => {
                    got.insert(id, data);
                }
                None => tracing::warn!(%peer, chunk = %id, "peer sent a bad block: dropped"),
            }
        }
    }
    let mut out = Vec::with_capacity(batch.len());
    for (off, id, _) in &batch {
        let Some(data) = got.get(id) else {
            return Err(format!("no provider sent chunk {id}"));
        };
        out.push((*off, data.clone()));
    }
    Ok(out)
}

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
